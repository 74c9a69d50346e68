//! Checkpoints from the training loop: [`saver`] stages the live state to host memory and writes it
//! on a thread through the checkpoint crate's save protocol (one rank or N); [`convert`] turns tch
//! tensors into checkpoint tensors and back; [`worker`] is the saver's long-lived threads. The
//! on-storage formats are the checkpoint crate's.

pub(crate) mod convert;
pub(crate) mod saver;
pub(crate) mod worker;
