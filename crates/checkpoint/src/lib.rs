//! waypoint-checkpoint: checkpoint formats and the CheckpointManager (no libtorch).
//!
//! Tensors come in and go out as [`Tensor`] (name, dtype, shape, bytes); the trainer converts to and
//! from its tensor library. Blobs are safetensors streamed through `waypoint-storage`.
//!
//! - [`CheckpointManager`]: save (several writers, one committer, fencing), list, resume discovery,
//!   load, verify, promote, retention, GC.
//! - [`Manifest`]: the commit record; [`Dataloader`]: `dataloader.json`; [`CheckpointKind`]: kinds
//!   detected from blobs; [`dcp`]: PyTorch DCP-compatible names; [`safetensors_file`]: blob I/O.

#![forbid(unsafe_code)]

mod dataloader;
pub mod dcp;
pub mod delta;
mod error;
mod file_entry;
mod kind;
mod layout;
mod manager;
mod manifest;
pub mod names;
mod peers;
pub mod peft;
pub mod safetensors_file;
mod sampler;
mod tensor;
mod writer;

pub use dataloader::{DataPosition, Dataloader};
pub use error::{CheckpointError, Result};
pub use file_entry::{FileEntry, WrittenFile};
pub use kind::CheckpointKind;
pub use layout::{model_dir, RunLayout};
pub use manager::{
    parse_checkpoint_ref, CheckpointInfo, CheckpointManager, Commit, ManagerOptions, Promotion,
    Retention, RowRange, SamplerPart, SaveRequest, Skipped, VerifyReport, PROMOTION_RECORD,
};
pub use manifest::{DeltaBase, Manifest, FORMAT_VERSION};
pub use names::{validate_name, StepName};
pub use peers::{Peers, SingleRank};
pub use sampler::{PlannedFile, WeightsPlan};
pub use tensor::{Dtype, Tensor};
pub use waypoint_storage as storage;

/// Milliseconds since the Unix epoch (0 if the clock is before it): the timestamps of manifests,
/// attempt and promotion records, and the trainer's run records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
pub use writer::FileWriter;
