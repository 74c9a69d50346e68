//! The flags of `waypoint train` as plain data, grouped in sections. Each section is flattened
//! into one table of keys: the keys (and so the flags, the `--config_path` keys and
//! `config/run.json`) are the field names, whatever section holds them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every setting of `waypoint train`, in sections. Field names are the flag names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// The run: where it lives, how long it trains, its seed and how it reports.
    #[serde(flatten)]
    pub run: RunFlags,
    /// The model and where it computes.
    #[serde(flatten)]
    pub model: ModelFlags,
    /// LoRA adapters (`lora_rank` 0: full-parameter training).
    #[serde(flatten)]
    pub lora: LoraFlags,
    /// AdamW and the learning-rate schedule.
    #[serde(flatten)]
    pub optim: OptimFlags,
    /// The data and the batch it is cut into.
    #[serde(flatten)]
    pub data: DataFlags,
    /// Checkpoints: when and what to save, keep, promote and start from.
    #[serde(flatten)]
    pub checkpointing: CheckpointFlags,
    /// The ranks: how long to wait for them and what is sharded over them.
    #[serde(flatten)]
    pub distributed: DistributedFlags,
    /// The memory plan.
    #[serde(flatten)]
    pub memory: MemoryFlags,
    /// The objective: supervised, or preference training (DPO, ORPO) and its settings.
    #[serde(flatten)]
    pub recipe: RecipeFlags,
}

/// The run: where it lives, how long it trains, its seed and how it reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunFlags {
    /// The framework segment of the run layout.
    pub framework: String,
    /// The run's id.
    pub run_id: String,
    /// Where runs live (local path, file://, s3://, gs://, az://, memory://).
    pub checkpoint_base_uri: String,
    /// Optimizer steps; 0: as many as `num_epochs` take.
    pub max_steps: u64,
    /// Passes over the data when `max_steps` is 0.
    pub num_epochs: u64,
    /// Seed of weights, data order and dropout.
    pub seed: u64,
    /// Log eval loss every this many steps (0: never).
    pub eval_steps: u64,
    /// Log a progress line every this many steps (when stderr is not a terminal).
    pub logging_steps: u64,
}

impl Default for RunFlags {
    fn default() -> Self {
        Self {
            framework: "waypoint".into(),
            run_id: "demo".into(),
            checkpoint_base_uri: "./runs".into(),
            max_steps: 0,
            num_epochs: 3,
            seed: 42,
            eval_steps: 0,
            logging_steps: 10,
        }
    }
}

/// The model and where it computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelFlags {
    /// `builtin:tiny`, or a local Hugging Face model directory.
    pub model_id: String,
    /// `auto`, `cpu`, `cuda` or `cuda:<i>`.
    pub device: String,
    /// libtorch CPU threads (0: libtorch's default).
    pub num_threads: u64,
    /// Keep only each decoder layer's input through the forward pass and recompute the layer in
    /// the backward pass: activation memory of one layer instead of all, for ~1/3 more compute.
    pub activation_checkpointing: bool,
}

impl Default for ModelFlags {
    fn default() -> Self {
        Self {
            model_id: "builtin:tiny".into(),
            device: "auto".into(),
            num_threads: 0,
            activation_checkpointing: false,
        }
    }
}

/// LoRA adapters (`lora_rank` 0: full-parameter training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraFlags {
    /// LoRA rank (0: full-parameter training).
    pub lora_rank: u64,
    /// LoRA alpha (0: twice the rank).
    pub lora_alpha: f64,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// Comma-separated projections LoRA wraps.
    pub lora_target_modules: String,
}

impl Default for LoraFlags {
    fn default() -> Self {
        Self {
            lora_rank: 0,
            lora_alpha: 0.0,
            lora_dropout: 0.0,
            lora_target_modules: "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".into(),
        }
    }
}

/// AdamW and the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimFlags {
    /// Peak learning rate.
    pub lr: f64,
    /// `cosine`, `linear` or `constant`.
    pub lr_scheduler: String,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// The final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
}

impl Default for OptimFlags {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            lr_scheduler: "cosine".into(),
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
        }
    }
}

/// The data and the batch it is cut into.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataFlags {
    /// Training data: `builtin:demo`, a JSONL file or directory, or a store URI.
    pub dataset_uri: String,
    /// The JSON field with the text of a row.
    pub dataset_text_field: String,
    /// Data for `eval_steps` (same forms as `dataset_uri`); empty: none.
    pub eval_dataset_uri: String,
    /// Samples per micro-batch.
    pub batch_size: u64,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation: u64,
    /// Tokens per sample.
    pub max_seq_len: u64,
    /// Pad each document to `max_seq_len` instead of packing documents together.
    pub disable_packing: bool,
    /// Skip and count malformed dataset rows instead of failing.
    pub skip_bad_lines: bool,
    /// Accepted for compatibility with the control plane; tokenization happens once, up front.
    pub dataloader_workers: u64,
    /// Where tokenized datasets are cached (empty: `$XDG_CACHE_HOME/waypoint/data`, else
    /// `~/.cache/waypoint/data`).
    pub data_cache_dir: String,
}

impl Default for DataFlags {
    fn default() -> Self {
        Self {
            dataset_uri: "builtin:demo".into(),
            dataset_text_field: "text".into(),
            eval_dataset_uri: String::new(),
            batch_size: 8,
            gradient_accumulation: 1,
            max_seq_len: 64,
            disable_packing: false,
            skip_bad_lines: false,
            dataloader_workers: 0,
            data_cache_dir: String::new(),
        }
    }
}

/// `--save_steps`: a durable save every this many steps (0: only the final one), or `auto`: the
/// interval Young and Daly's model gives from the measured cost of a save and `--mtbf_hours`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveSteps {
    /// Every this many steps (0: only the final save).
    Every(u64),
    /// From the measured cost of a save and the job's mean time between failures.
    Auto,
}

impl std::fmt::Display for SaveSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Every(n) => write!(f, "{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for SaveSteps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        s.trim()
            .parse()
            .map(Self::Every)
            .map_err(|_| format!("{s:?} is neither a number of steps nor `auto`"))
    }
}

impl Serialize for SaveSteps {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Every(n) => s.serialize_u64(*n),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for SaveSteps {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n.as_u64().map(Self::Every).ok_or_else(|| {
                serde::de::Error::custom(format!("{n} is not a whole number of steps"))
            }),
            Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "{other} is neither a number of steps nor `auto`"
            ))),
        }
    }
}

/// Checkpoints: when and what to save, keep, promote and start from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointFlags {
    /// Save a resumable checkpoint every this many steps (0: only at the end), or `auto`.
    pub save_steps: SaveSteps,
    /// The job's mean time between failures, in hours, for `--save_steps auto` (0: unset).
    pub mtbf_hours: f64,
    /// Same as `save_steps` (the recipe's spelling); when both are set they must agree.
    pub dcp_save_interval: u64,
    /// Keep this many newest resumable checkpoints (0: all).
    pub keep_last: u64,
    /// A promotable sampler save every this many steps (0: none but the final save's): the first a
    /// full base (INFERENCE_BASE), later ones deltas over it (INFERENCE_ARC_V2).
    pub sampler_save_steps: u64,
    /// A new full base after this many deltas (also whenever a delta would exceed half the full
    /// size); 0: every sampler save is a base.
    pub sampler_base_every: u64,
    /// Save synchronously (the training loop waits for each upload).
    pub sync_save: bool,
    /// Save the resumable state to the node's memory tier every this many steps (0: off; 1, every
    /// step, by default).
    pub memory_save_steps: u64,
    /// The folder of the node's memory tier (empty: `/dev/shm/waypoint`); each run has its own
    /// folder inside.
    pub memory_tier_dir: String,
    /// dtype of the promotable weights: `bf16`, `fp16` or `fp32`.
    pub sampler_dtype: String,
    /// Promote the final checkpoint to `models/<output_model_id>/`.
    pub output_model_id: String,
    /// `run_id:step-N`: start from another run's weights (ignored once this run has checkpoints).
    pub init_from_checkpoint: String,
    /// Accepted as the control plane passes it: resuming is always automatic.
    pub resume_from_checkpoint: bool,
    /// Resume although settings that decide the trajectory (optimizer, schedule, global batch,
    /// LoRA scale, recipe) differ from those the checkpoint was trained with: the new ones apply,
    /// and the change is logged and kept in the attempt record and `config/run.json`.
    pub allow_config_change: bool,
}

impl Default for CheckpointFlags {
    fn default() -> Self {
        Self {
            save_steps: SaveSteps::Every(50),
            mtbf_hours: 0.0,
            dcp_save_interval: 0,
            keep_last: 3,
            sampler_save_steps: 0,
            sampler_base_every: 8,
            sync_save: false,
            memory_save_steps: 1,
            memory_tier_dir: String::new(),
            sampler_dtype: "bf16".into(),
            output_model_id: String::new(),
            init_from_checkpoint: String::new(),
            resume_from_checkpoint: false,
            allow_config_change: false,
        }
    }
}

/// The objective: `sft` (next-token cross-entropy) or a preference recipe over chosen/rejected
/// pairs, with TRL 1.16's settings and names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecipeFlags {
    /// `sft`, `dpo` or `orpo`.
    pub recipe: String,
    /// DPO: the KL weight β; ORPO: the weight of the odds-ratio term (TRL's `beta`).
    pub beta: f64,
    /// DPO's loss: `sigmoid`, `ipo` or `hinge`.
    pub dpo_loss: String,
    /// DPO: weight of an NLL term on the chosen completions (TRL's `loss_type=[…, "sft"]`); 0: none.
    pub rpo_alpha: f64,
}

impl Default for RecipeFlags {
    fn default() -> Self {
        Self {
            recipe: "sft".into(),
            beta: 0.1,
            dpo_loss: "sigmoid".into(),
            rpo_alpha: 0.0,
        }
    }
}

/// The ranks: how long to wait for them and what is sharded over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DistributedFlags {
    /// Limit of joining the other ranks and of every collective, in seconds.
    pub dist_timeout_secs: u64,
    /// What is sharded over the ranks: `none` (replicated data parallelism), `optimizer` (each
    /// rank keeps and updates AdamW's state for its rows of every weight) or `full` (weights,
    /// gradients and AdamW's state; each layer runs on weights gathered just before it).
    pub sharding: String,
}

impl Default for DistributedFlags {
    fn default() -> Self {
        Self {
            dist_timeout_secs: 300,
            sharding: "none".into(),
        }
    }
}

/// The memory plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryFlags {
    /// When the memory plan exceeds the memory available: `refuse` to start, or `warn`.
    pub memory_check: String,
}

impl Default for MemoryFlags {
    fn default() -> Self {
        Self {
            memory_check: "refuse".into(),
        }
    }
}

/// The valid keys (the flag names), sorted by name.
pub fn keys() -> Vec<String> {
    match serde_json::to_value(TrainConfig::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The valid key closest to `key`, if any is close.
pub fn closest_key(key: &str) -> Option<String> {
    keys()
        .into_iter()
        .map(|k| (strsim::jaro_winkler(key, &k), k))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}
