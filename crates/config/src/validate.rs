//! Range and cross-field checks of a resolved configuration, each naming the flags involved and
//! what they accept; [`limits`] are the largest values a setting may take.

use crate::error::ConfigError;
use crate::flags::{SaveSteps, TrainConfig};
use crate::resolve::FloatRange;
use crate::typed::{
    DpoLoss, MemoryCheck, RecipeKind, SamplerDtype, ScheduleKind, Sharding, LORA_TARGETS,
};

/// The most a setting may be, where more would exhaust the machine or overflow before any use of it.
pub mod limits {
    /// `--batch_size`.
    pub const BATCH_SIZE: u64 = 65_536;
    /// `--gradient_accumulation`.
    pub const GRADIENT_ACCUMULATION: u64 = 65_536;
    /// `--max_seq_len`.
    pub const MAX_SEQ_LEN: u64 = 1 << 20;
    /// Tokens of one optimizer step on one rank (`batch_size × gradient_accumulation × max_seq_len`):
    /// their ids and labels are held at once (16 bytes a token).
    pub const TOKENS_PER_STEP: u64 = 1 << 27;
    /// `--num_threads`.
    pub const NUM_THREADS: u64 = 1024;
    /// `--lora_rank` (the model's projection sizes bound it further).
    pub const LORA_RANK: u64 = 65_536;
    /// `--max_steps`.
    pub const MAX_STEPS: u64 = 1 << 40;
    /// `--num_epochs`.
    pub const NUM_EPOCHS: u64 = 1 << 20;
    /// `--dist_timeout_secs` (a week).
    pub const DIST_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
    /// The most `--mtbf_hours` may be (ten years).
    pub const MTBF_HOURS: f64 = 24.0 * 3650.0;
}

fn usage(key: &str, message: String) -> ConfigError {
    ConfigError::new(key, message)
}

/// Fails with `message` about `key` unless `ok`.
fn check(ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(usage(key, message()))
    }
}

/// Fails unless `lo <= value <= hi`, naming the flag and the range.
fn in_range(key: &str, value: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    check((lo..=hi).contains(&value), key, || {
        format!("--{key} {value} is out of range: use {lo} to {hi}")
    })
}

impl TrainConfig {
    /// Range and cross-field checks, each naming the flags involved and what they accept.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.checkpointing.dcp_save_interval > 0 {
            let dcp = SaveSteps::Every(self.checkpointing.dcp_save_interval);
            check(
                self.checkpointing.save_steps == TrainConfig::default().checkpointing.save_steps
                    || self.checkpointing.save_steps == dcp,
                "dcp_save_interval",
                || {
                    format!(
                        "--save_steps {} and --dcp_save_interval {} disagree; they are the same \
                         setting, pass one",
                        self.checkpointing.save_steps, self.checkpointing.dcp_save_interval
                    )
                },
            )?;
            self.checkpointing.save_steps = dcp;
        }
        let mtbf = self.checkpointing.mtbf_hours;
        match self.checkpointing.save_steps {
            SaveSteps::Auto => check(
                mtbf.is_finite() && mtbf > 0.0 && mtbf <= limits::MTBF_HOURS,
                "mtbf_hours",
                || {
                    format!(
                        "--save_steps auto needs --mtbf_hours: the job's mean time between \
                         failures in hours (above 0, at most {}; e.g. 24 for a failure a day), \
                         got {mtbf}",
                        limits::MTBF_HOURS
                    )
                },
            )?,
            SaveSteps::Every(_) => check(mtbf == 0.0, "mtbf_hours", || {
                format!(
                    "--mtbf_hours {mtbf} only sets the interval of --save_steps auto; pass \
                     --save_steps auto, or drop --mtbf_hours"
                )
            })?,
        }
        in_range("batch_size", self.data.batch_size, 1, limits::BATCH_SIZE)?;
        in_range(
            "gradient_accumulation",
            self.data.gradient_accumulation,
            1,
            limits::GRADIENT_ACCUMULATION,
        )?;
        in_range("max_seq_len", self.data.max_seq_len, 2, limits::MAX_SEQ_LEN)?;
        let tokens = self.data.batch_size * self.data.gradient_accumulation * self.data.max_seq_len;
        check(tokens <= limits::TOKENS_PER_STEP, "batch_size", || {
            format!(
                "--batch_size {} × --gradient_accumulation {} × --max_seq_len {} = {tokens} tokens \
                 per step on each rank, more than the {} one rank can hold; lower them (more ranks \
                 give a larger global batch)",
                self.data.batch_size,
                self.data.gradient_accumulation,
                self.data.max_seq_len,
                limits::TOKENS_PER_STEP
            )
        })?;
        in_range("max_steps", self.run.max_steps, 0, limits::MAX_STEPS)?;
        in_range("num_epochs", self.run.num_epochs, 0, limits::NUM_EPOCHS)?;
        check(
            self.run.max_steps > 0 || self.run.num_epochs > 0,
            "max_steps",
            || "--max_steps and --num_epochs are both 0: there is nothing to train".into(),
        )?;
        in_range(
            "num_threads",
            self.model.num_threads,
            0,
            limits::NUM_THREADS,
        )?;
        in_range(
            "dist_timeout_secs",
            self.distributed.dist_timeout_secs,
            1,
            limits::DIST_TIMEOUT_SECS,
        )?;
        in_range("lora_rank", self.lora.lora_rank, 0, limits::LORA_RANK)?;
        for (key, value) in [
            ("lr", self.optim.lr),
            ("min_lr_ratio", self.optim.min_lr_ratio),
            ("weight_decay", self.optim.weight_decay),
            ("adam_beta1", self.optim.adam_beta1),
            ("adam_beta2", self.optim.adam_beta2),
            ("adam_epsilon", self.optim.adam_epsilon),
            ("max_grad_norm", self.optim.max_grad_norm),
            ("lora_alpha", self.lora.lora_alpha),
            ("lora_dropout", self.lora.lora_dropout),
            ("beta", self.recipe.beta),
            ("rpo_alpha", self.recipe.rpo_alpha),
        ] {
            if let Some(range) = FloatRange::of(key) {
                check(range.contains(value), key, || {
                    format!("--{key} must be {}; got {value}", range.describe(key))
                })?;
            }
        }
        check(
            ScheduleKind::parse(&self.optim.lr_scheduler).is_some(),
            "lr_scheduler",
            || {
                format!(
                    "--lr_scheduler {:?}: use cosine, linear or constant",
                    self.optim.lr_scheduler
                )
            },
        )?;
        check(
            SamplerDtype::parse(&self.checkpointing.sampler_dtype).is_some(),
            "sampler_dtype",
            || {
                format!(
                    "--sampler_dtype {:?}: use bf16, fp16 or fp32",
                    self.checkpointing.sampler_dtype
                )
            },
        )?;
        check(
            Sharding::parse(&self.distributed.sharding).is_some(),
            "sharding",
            || {
                format!(
                    "--sharding {:?}: use none, optimizer or full",
                    self.distributed.sharding
                )
            },
        )?;
        let recipe = RecipeKind::parse(&self.recipe.recipe);
        check(recipe.is_some(), "recipe", || {
            format!("--recipe {:?}: use sft, dpo or orpo", self.recipe.recipe)
        })?;
        check(
            DpoLoss::parse(&self.recipe.dpo_loss).is_some(),
            "dpo_loss",
            || {
                format!(
                    "--dpo_loss {:?}: use sigmoid, ipo or hinge",
                    self.recipe.dpo_loss
                )
            },
        )?;
        let d = TrainConfig::default();
        if recipe != Some(RecipeKind::Dpo) {
            check(
                self.recipe.dpo_loss == d.recipe.dpo_loss && self.recipe.rpo_alpha == 0.0,
                "recipe",
                || {
                    format!(
                        "--dpo_loss/--rpo_alpha are DPO settings but --recipe is {}; set --recipe dpo",
                        self.recipe.recipe
                    )
                },
            )?;
        }
        if recipe.is_some_and(|r| r != RecipeKind::Sft) {
            for (key, uri) in [
                ("dataset_uri", &self.data.dataset_uri),
                ("eval_dataset_uri", &self.data.eval_dataset_uri),
            ] {
                check(uri != "builtin:demo", key, || {
                    format!(
                        "--{key} builtin:demo holds text and chat rows, not preference pairs; use \
                         builtin:demo_preference with --recipe {}",
                        self.recipe.recipe
                    )
                })?;
            }
        }
        if recipe == Some(RecipeKind::Sft) {
            check(self.recipe.beta == d.recipe.beta, "recipe", || {
                "--beta is a DPO/ORPO setting but --recipe is sft; set --recipe dpo or orpo".into()
            })?;
        }
        check(
            MemoryCheck::parse(&self.memory.memory_check).is_some(),
            "memory_check",
            || {
                format!(
                    "--memory_check {:?}: use refuse or warn",
                    self.memory.memory_check
                )
            },
        )?;
        check(
            self.run.eval_steps == 0 || !self.data.eval_dataset_uri.is_empty(),
            "eval_steps",
            || {
                format!(
                    "--eval_steps {} needs eval data: set --eval_dataset_uri, or drop --eval_steps",
                    self.run.eval_steps
                )
            },
        )?;
        if self.lora.lora_rank == 0 {
            let d = TrainConfig::default();
            check(
                self.lora.lora_alpha == d.lora.lora_alpha
                    && self.lora.lora_dropout == d.lora.lora_dropout,
                "lora_rank",
                || {
                    "--lora_alpha/--lora_dropout are set but --lora_rank is 0; set --lora_rank to \
                     train adapters"
                        .into()
                },
            )?;
        } else {
            for t in self.lora.lora_target_modules.split(',').map(str::trim) {
                check(
                    t.is_empty() || LORA_TARGETS.contains(&t),
                    "lora_target_modules",
                    || {
                        format!(
                            "--lora_target_modules: {t:?} is not one of {}",
                            LORA_TARGETS.join(", ")
                        )
                    },
                )?;
            }
            if self.lora.lora_alpha == 0.0 {
                self.lora.lora_alpha = 2.0 * self.lora.lora_rank as f64;
            }
        }
        if !self.checkpointing.init_from_checkpoint.is_empty() {
            waypoint_checkpoint::parse_checkpoint_ref(&self.checkpointing.init_from_checkpoint)
                .map_err(|e| {
                    usage(
                        "init_from_checkpoint",
                        format!("--init_from_checkpoint: {e}"),
                    )
                })?;
        }
        Ok(())
    }
}
