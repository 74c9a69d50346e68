//! Checkpoint kinds, as the Fireworks control plane reports them, detected from the blobs.

use serde::{Deserialize, Serialize};

use crate::file_entry::FileEntry;

/// What a checkpoint's blobs hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CheckpointKind {
    /// `dcp/`: all parameters, optimizer state, RNG and counters. Resumable.
    Training,
    /// `dcp/`: LoRA parameters and their optimizer state. Resumable.
    TrainingLora,
    /// `sampler/`: a full HF model directory. Promotable.
    InferenceBase,
    /// `sampler/`: a PEFT adapter. Promotable.
    InferenceLora,
    /// `sampler/`: a delta over an earlier INFERENCE_BASE. Neither resumable nor promotable.
    InferenceArcV2,
}

impl CheckpointKind {
    /// Whether training can resume from it.
    pub fn resumable(self) -> bool {
        matches!(self, Self::Training | Self::TrainingLora)
    }

    /// Whether it can be promoted to a deployable model.
    pub fn promotable(self) -> bool {
        matches!(self, Self::InferenceBase | Self::InferenceLora)
    }

    /// The control plane's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Training => "TRAINING",
            Self::TrainingLora => "TRAINING_LORA",
            Self::InferenceBase => "INFERENCE_BASE",
            Self::InferenceLora => "INFERENCE_LORA",
            Self::InferenceArcV2 => "INFERENCE_ARC_V2",
        }
    }
}

impl std::fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// File names that mark each sampler kind.
pub(crate) const DELTA_MARKER: &str = "sampler/delta.json";
const ADAPTER_CONFIG: &str = "sampler/adapter_config.json";
const ADAPTER_WEIGHTS: &str = "sampler/adapter_model.safetensors";
const MODEL_CONFIG: &str = "sampler/config.json";

/// Detects the kinds from the files of a checkpoint and the tensor names of its first `dcp/` blob
/// (`dcp_tensor_names`; LoRA state is recognised by `lora_A`/`lora_B` names).
pub(crate) fn detect(files: &[FileEntry], dcp_tensor_names: &[String]) -> Vec<CheckpointKind> {
    let has = |p: &str| files.iter().any(|f| f.path == p);
    let mut kinds = Vec::new();
    if files
        .iter()
        .any(|f| f.is_dcp() && f.path.ends_with(".safetensors"))
    {
        let lora = dcp_tensor_names
            .iter()
            .any(|n| n.contains(".lora_A") || n.contains(".lora_B"));
        kinds.push(if lora {
            CheckpointKind::TrainingLora
        } else {
            CheckpointKind::Training
        });
    }
    if has(DELTA_MARKER) {
        kinds.push(CheckpointKind::InferenceArcV2);
    } else if has(ADAPTER_CONFIG) && has(ADAPTER_WEIGHTS) {
        kinds.push(CheckpointKind::InferenceLora);
    } else if has(MODEL_CONFIG)
        && files
            .iter()
            .any(|f| f.path.starts_with("sampler/model") && f.path.ends_with(".safetensors"))
    {
        kinds.push(CheckpointKind::InferenceBase);
    }
    kinds
}
