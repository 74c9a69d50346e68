//! waypoint-trainer: the `waypoint` command — a Llama-family trainer on libtorch that checkpoints and
//! resumes exactly, through the checkpoint and storage crates.
//!
//! - [`cli`]: flags, exit codes, dispatch; [`config`]: defaults ← `--config_path` ← flags.
//! - [`run`]: one start of the trainer — setup, resume, step, finish; [`saving`]: checkpoints from the loop, async and sharded;
//!   [`records`]: status, metrics, error file.
//! - [`model`]: Llama/Qwen2/Qwen3 and LoRA; [`tokenizer`]; [`data`]: JSONL to packed samples;
//!   [`optim`]: AdamW and the LR schedule; [`convert`]: tch ↔ checkpoint tensors.
//! - [`ckpt`]: `waypoint ckpt list|verify|promote|gc`; [`launch`]: `waypoint launch`, torchrun's job
//!   for local workers; [`device`], [`torchrun`]: where to run.

pub mod ckpt;
pub mod cli;
pub mod config;
pub mod convert;
pub mod cuda;
pub mod data;
pub mod device;
pub mod model;
pub mod nccl;
pub mod optim;
pub mod ranks;
pub mod records;
pub mod run;
pub mod saving;
pub mod tokenizer;
