//! waypoint-trainer: the training loop on libtorch (through `tch`), a Llama-family trainer that
//! checkpoints and resumes exactly through the checkpoint and storage crates. Its configuration
//! (`waypoint-config`), data (`waypoint-data`) and what people watch (`waypoint-observe`) live in
//! crates of their own, without libtorch.
//!
//! Inside, dependencies point one way (each module imports only those listed before it):
//! - `shard`: which rows of a tensor a rank owns, and what sharded weights need of the ranks;
//! - `convert`: tch tensors ↔ checkpoint tensors, and a data [`waypoint_data::Batch`] → tensors;
//! - [`model`]: Llama/Qwen2/Qwen3 and LoRA on tch, from a Hugging Face directory;
//! - `collective`: the ranks — the c10d group, NCCL on CUDA, a TCP ring on CPU;
//! - [`optim`]: AdamW, gradient clipping and the learning-rate schedule;
//! - [`recipe`]: what turns a batch into a loss (today: supervised cross-entropy);
//! - `step`: one optimizer step over a recipe, behind the libtorch boundary;
//! - `checkpointing`: when and what to save (`policy`) and the saver that does it;
//! - [`run`]: one start of the trainer — setup, resume, the loop, finish;
//! - [`service`]: the service-mode trainer's model (`waypoint serve`), driven call by call.

pub(crate) mod checkpointing;
pub(crate) mod collective;
pub(crate) mod convert;
pub mod model;
pub mod optim;
pub mod recipe;
pub mod run;
pub mod service;
pub(crate) mod shard;
pub(crate) mod step;
