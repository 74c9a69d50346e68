//! waypoint-config: the training configuration of `waypoint train`, at the bottom of the trainer's
//! dependencies — plain data that imports nothing of the trainer, so every part reads its own
//! section of it.
//!
//! - [`flags`]: [`TrainConfig`], the flags as data in sections (run, model, LoRA, optimizer and
//!   schedule, data, checkpointing, distributed, memory, recipe), flattened into one table of keys;
//! - [`resolve`]: built-in defaults ← a `--config_path` JSON or TOML file ← flags, every key and
//!   value named in its error;
//! - [`validate`]: range and cross-field checks, and the [`limits`];
//! - [`typed`]: the sections as the trainer uses them ([`CheckpointSection`], [`Sharding`],
//!   [`LoraConfig`], [`ScheduleKind`], [`MemoryCheck`], [`SamplerDtype`], the [`Objective`]);
//! - [`fingerprint`](mod@fingerprint): what identifies a configuration, and what a resume must not change;
//! - [`error`]: [`ConfigError`] and [`UsageError`], both exit code 2 with nothing written.

pub mod error;
pub mod fingerprint;
pub mod flags;
pub mod resolve;
pub mod typed;
pub mod validate;

pub use error::{ConfigError, Origin, UsageError};
pub use fingerprint::{changes, fingerprint, BATCH_SPLIT};
pub use flags::{
    closest_key, keys, CheckpointFlags, DataFlags, DistributedFlags, LoraFlags, MemoryFlags,
    ModelFlags, OptimFlags, RecipeFlags, RunFlags, SaveSteps, TrainConfig,
};
pub use resolve::{merge, read_config_file};
pub use typed::{
    CheckpointSection, DpoLoss, DurableInterval, LoraConfig, MemoryCheck, Objective, RecipeKind,
    SamplerDtype, ScheduleKind, Sharding, LORA_TARGETS,
};
pub use validate::limits;
