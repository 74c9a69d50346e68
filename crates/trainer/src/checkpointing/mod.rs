//! Checkpoints from the training loop. [`policy`] decides when and what to save (pure functions of
//! the step and the settings); [`saver`] carries it out — it stages the live state to host memory
//! ([`state`]: what a rank saves, snapshots and host copies) and writes it on [`worker`]'s
//! long-lived threads through the checkpoint crate's save protocol (one rank or N); [`tier`] is the
//! node's memory tier, a second saver of the same format on a tmpfs, [`peer`] copies a tier's
//! checkpoint from one node to another that lacks it, and [`replica`] streams a node's shards to the
//! next node's tier after each commit, so that a replaced node finds them there. The on-storage formats are the checkpoint
//! crate's.

pub(crate) mod peer;
pub(crate) mod policy;
pub(crate) mod replica;
pub(crate) mod saver;
pub(crate) mod state;
pub(crate) mod tier;
pub(crate) mod worker;
