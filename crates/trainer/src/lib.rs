//! waypoint-trainer: everything that knows libtorch (through `tch`): a Llama-family trainer that
//! checkpoints and resumes exactly, through the checkpoint and storage crates.
//!
//! - [`config`]: the training configuration — defaults ← `--config_path` ← flags, every value checked;
//! - [`model`]: Llama/Qwen2/Qwen3 and LoRA on tch, from a Hugging Face directory;
//! - [`data`]: JSONL to packed samples ([`data::tokenizer`]: `tokenizer.json` or bytes);
//! - [`run`]: one start of the trainer — setup, resume, step, finish — with the optimizer
//!   ([`run::optim`]), the device ([`run::device`]) and progress;
//! - `checkpointing`: the saver (checkpoints from the loop, async and sharded, over the checkpoint
//!   crate's save protocol) and tch ↔ checkpoint tensors; [`run::records`]: `status.json`,
//!   `logs/metrics.jsonl`;
//! - `collective`: the ranks — the c10d group, NCCL on CUDA, a TCP ring on CPU.

pub(crate) mod checkpointing;
pub(crate) mod collective;
pub mod config;
pub mod data;
pub mod model;
pub mod run;
