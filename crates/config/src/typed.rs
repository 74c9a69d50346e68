//! The configuration's values as types: each section read the way its part of the trainer uses it
//! (the checkpoint section, the sharding, LoRA, the schedule's shape, the memory check), parsed
//! from a validated [`TrainConfig`] in one place.

use crate::flags::TrainConfig;

impl TrainConfig {
    /// The checkpoint section, typed: built here once from the flags (spelled as the control plane
    /// spells them), used by the saver, resume and promotion. Call on a validated configuration.
    pub fn checkpoint(&self) -> CheckpointSection {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        CheckpointSection {
            save_steps: match self.checkpointing.save_steps {
                crate::flags::SaveSteps::Every(n) => DurableInterval::Every(n),
                crate::flags::SaveSteps::Auto => DurableInterval::Auto {
                    mtbf_s: self.checkpointing.mtbf_hours * 3600.0,
                },
            },
            keep_last: (self.checkpointing.keep_last > 0)
                .then_some(self.checkpointing.keep_last as usize),
            sampler_save_steps: self.checkpointing.sampler_save_steps,
            sampler_base_every: self.checkpointing.sampler_base_every,
            background: !self.checkpointing.sync_save,
            memory_save_steps: self.checkpointing.memory_save_steps,
            memory_tier_dir: if self.checkpointing.memory_tier_dir.is_empty() {
                DEFAULT_MEMORY_TIER_DIR.to_string()
            } else {
                self.checkpointing.memory_tier_dir.clone()
            },
            sampler_dtype: SamplerDtype::parse(&self.checkpointing.sampler_dtype)
                .unwrap_or(SamplerDtype::Bf16),
            output_model_id: some(&self.checkpointing.output_model_id),
            init_from_checkpoint: some(&self.checkpointing.init_from_checkpoint),
        }
    }

    /// `--sharding`, typed. Call on a validated configuration.
    pub fn sharding(&self) -> Sharding {
        Sharding::parse(&self.distributed.sharding).unwrap_or(Sharding::None)
    }

    /// The LoRA settings, when `--lora_rank` asks for adapters. Call on a validated configuration.
    pub fn lora(&self) -> Option<LoraConfig> {
        (self.lora.lora_rank > 0).then(|| LoraConfig {
            rank: self.lora.lora_rank as i64,
            alpha: self.lora.lora_alpha,
            dropout: self.lora.lora_dropout,
            targets: self
                .lora
                .lora_target_modules
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        })
    }

    /// `--lr_scheduler`, typed. Call on a validated configuration.
    pub fn schedule_kind(&self) -> ScheduleKind {
        ScheduleKind::parse(&self.optim.lr_scheduler).unwrap_or(ScheduleKind::Cosine)
    }

    /// The objective and its settings, typed. Call on a validated configuration.
    pub fn objective(&self) -> Objective {
        let r = &self.recipe;
        match RecipeKind::parse(&r.recipe).unwrap_or(RecipeKind::Sft) {
            RecipeKind::Sft => Objective::Sft,
            RecipeKind::Dpo => Objective::Dpo {
                beta: r.beta,
                loss: DpoLoss::parse(&r.dpo_loss).unwrap_or(DpoLoss::Sigmoid),
                rpo_alpha: r.rpo_alpha,
            },
            RecipeKind::Orpo => Objective::Orpo { beta: r.beta },
        }
    }

    /// `--memory_check`, typed. Call on a validated configuration.
    pub fn memory_check(&self) -> MemoryCheck {
        MemoryCheck::parse(&self.memory.memory_check).unwrap_or(MemoryCheck::Refuse)
    }
}

/// Where the memory tier lives unless `--memory_tier_dir` says: a tmpfs, which outlives the worker
/// process (and a restarted container of the same pod).
pub const DEFAULT_MEMORY_TIER_DIR: &str = "/dev/shm/waypoint";

/// When durable resumable saves are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DurableInterval {
    /// Every this many steps (0: only the final one).
    Every(u64),
    /// At the interval Young and Daly's model gives from the measured cost of a save and the
    /// job's mean time between failures (seconds).
    Auto {
        /// Mean time between failures, seconds.
        mtbf_s: f64,
    },
}

/// The checkpoint section of the configuration (see [`TrainConfig::checkpoint`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSection {
    /// When durable resumable saves are made.
    pub save_steps: DurableInterval,
    /// Keep this many newest resumable checkpoints (`None`: all).
    pub keep_last: Option<usize>,
    /// A promotable sampler save every this many steps (0: none besides the final one).
    pub sampler_save_steps: u64,
    /// A new full sampler base after this many deltas (0: every sampler save is a base).
    pub sampler_base_every: u64,
    /// Saves run behind training (`--sync_save` makes the loop wait).
    pub background: bool,
    /// A memory-tier save every this many steps (0: none).
    pub memory_save_steps: u64,
    /// The node's memory tier (each run in a folder of its own inside).
    pub memory_tier_dir: String,
    /// The dtype of the promotable weights.
    pub sampler_dtype: SamplerDtype,
    /// Promote the final checkpoint to `models/<id>/`.
    pub output_model_id: Option<String>,
    /// `run_id:step-N`: start from another run's weights (ignored once the run has its own).
    pub init_from_checkpoint: Option<String>,
}

/// The dtype of the promotable (sampler) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerDtype {
    /// bfloat16 (the default).
    Bf16,
    /// float16.
    Fp16,
    /// float32.
    Fp32,
}

impl SamplerDtype {
    /// `--sampler_dtype`'s spelling: `bf16`, `fp16` or `fp32`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bf16" => Some(Self::Bf16),
            "fp16" => Some(Self::Fp16),
            "fp32" => Some(Self::Fp32),
            _ => None,
        }
    }

    /// Its `torch_dtype` spelling in a Hugging Face `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::Fp16 => "float16",
            Self::Fp32 => "float32",
        }
    }
}

/// What `--sharding` shards over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// Everything replicated (data parallelism).
    None,
    /// AdamW's state: each rank keeps and updates only its rows (ZeRO-1).
    Optimizer,
    /// Weights, gradients and AdamW's state: each rank holds its rows of every weight, and the
    /// layers run on weights gathered just before them (FSDP).
    Full,
}

impl Sharding {
    /// Parses the flag's value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "optimizer" => Some(Self::Optimizer),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    /// Whether AdamW's state is cut into rows apart from the weights (ZeRO-1): `optimizer`, and
    /// `full` under LoRA — whose frozen base is what is sharded, the adapters staying whole.
    pub fn cuts_optimizer_state_alone(self, lora: bool) -> bool {
        self == Self::Optimizer || (self == Self::Full && lora)
    }
}

/// The learning rate's shape after warmup (`--lr_scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Half-cosine down to `min_lr_ratio * lr`.
    Cosine,
    /// Straight line down to `min_lr_ratio * lr`.
    Linear,
    /// Flat.
    Constant,
}

impl ScheduleKind {
    /// Parses `--lr_scheduler`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cosine" => Some(Self::Cosine),
            "linear" => Some(Self::Linear),
            "constant" => Some(Self::Constant),
            _ => None,
        }
    }
}

/// `--recipe`: the objective's family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipeKind {
    /// Next-token cross-entropy.
    Sft,
    /// Direct preference optimization over chosen/rejected pairs.
    Dpo,
    /// Odds-ratio preference optimization (no reference model).
    Orpo,
}

impl RecipeKind {
    /// Parses `--recipe`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sft" => Some(Self::Sft),
            "dpo" => Some(Self::Dpo),
            "orpo" => Some(Self::Orpo),
            _ => None,
        }
    }
}

/// `--dpo_loss`: TRL's `loss_type` of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLoss {
    /// `-logsigmoid(β·Δ)` (the DPO paper).
    Sigmoid,
    /// `(Δ/len − 1/(2β))²` with each completion's log-ratio divided by its length (TRL's IPO).
    Ipo,
    /// `relu(1 − β·Δ)` (SLiC).
    Hinge,
}

impl DpoLoss {
    /// Parses `--dpo_loss`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sigmoid" => Some(Self::Sigmoid),
            "ipo" => Some(Self::Ipo),
            "hinge" => Some(Self::Hinge),
            _ => None,
        }
    }
}

/// The objective a run trains, with its settings (see [`TrainConfig::objective`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Next-token cross-entropy over the learned tokens.
    Sft,
    /// DPO.
    Dpo {
        /// β: the weight of the log-ratio in the loss and the rewards.
        beta: f64,
        /// The loss over the log-ratio difference.
        loss: DpoLoss,
        /// Weight of the NLL of the chosen completions (0: none).
        rpo_alpha: f64,
    },
    /// ORPO.
    Orpo {
        /// The weight of the odds-ratio term.
        beta: f64,
    },
}

impl Objective {
    /// Whether it trains on chosen/rejected pairs.
    pub fn is_preference(self) -> bool {
        !matches!(self, Self::Sft)
    }
}

/// `--memory_check`: what to do when the plan exceeds the memory available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCheck {
    /// Refuse to start (the default).
    Refuse,
    /// Say so, and start anyway.
    Warn,
}

impl MemoryCheck {
    /// Parses the flag's value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "refuse" => Some(Self::Refuse),
            "warn" => Some(Self::Warn),
            _ => None,
        }
    }
}

/// The projections LoRA can wrap, as `peft` names them: each decoder layer's, and the unembedding
/// (`lm_head`, once; on its own projection even when tied to the embedding).
pub const LORA_TARGETS: [&str; 8] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

/// LoRA settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: i64,
    /// Scale numerator: the update is scaled by alpha / r.
    pub alpha: f64,
    /// Dropout on the adapter input while training.
    pub dropout: f64,
    /// Projection names to wrap (a subset of [`LORA_TARGETS`]).
    pub targets: Vec<String>,
}
