//! The training configuration: built-in defaults (the embedded demo), overridden by a `--config_path`
//! JSON or TOML file with the same keys, overridden by flags. Unknown keys are errors that name the
//! closest valid key; the resolved configuration is recorded as `config/run.json`, redacted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Every setting of `waypoint train`. Field names are the flag names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The framework segment of the run layout.
    pub framework: String,
    /// `builtin:tiny`, or a local Hugging Face model directory.
    pub model_id: String,
    /// The run's id.
    pub run_id: String,
    /// Where runs live (local path, file://, s3://, gs://, az://, memory://).
    pub checkpoint_base_uri: String,
    /// Training data: `builtin:demo`, a JSONL file or directory, or a store URI.
    pub dataset_uri: String,
    /// The JSON field with the text of a row.
    pub dataset_text_field: String,
    /// Data for `eval_steps` (same forms as `dataset_uri`); empty: none.
    pub eval_dataset_uri: String,
    /// Log eval loss every this many steps (0: never).
    pub eval_steps: u64,
    /// Optimizer steps; 0: as many as `num_epochs` take.
    pub max_steps: u64,
    /// Passes over the data when `max_steps` is 0.
    pub num_epochs: u64,
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
    /// Save a resumable checkpoint every this many steps (0: only at the end).
    pub save_steps: u64,
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
    /// dtype of the promotable weights: `bf16`, `fp16` or `fp32`.
    pub sampler_dtype: String,
    /// Promote the final checkpoint to `models/<output_model_id>/`.
    pub output_model_id: String,
    /// `run_id:step-N`: start from another run's weights (ignored once this run has checkpoints).
    pub init_from_checkpoint: String,
    /// Accepted as the control plane passes it: resuming is always automatic.
    pub resume_from_checkpoint: bool,
    /// Seed of weights, data order and dropout.
    pub seed: u64,
    /// LoRA rank (0: full-parameter training).
    pub lora_rank: u64,
    /// LoRA alpha (0: twice the rank).
    pub lora_alpha: f64,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// Comma-separated projections LoRA wraps.
    pub lora_target_modules: String,
    /// `auto`, `cpu`, `cuda` or `cuda:<i>`.
    pub device: String,
    /// libtorch CPU threads (0: libtorch's default).
    pub num_threads: u64,
    /// Log a progress line every this many steps (when stderr is not a terminal).
    pub logging_steps: u64,
    /// Limit of joining the other ranks and of every collective, in seconds.
    pub dist_timeout_secs: u64,
    /// Keep only each decoder layer's input through the forward pass and recompute the layer in
    /// the backward pass: activation memory of one layer instead of all, for ~1/3 more compute.
    pub activation_checkpointing: bool,
    /// When the memory plan exceeds the memory available: `refuse` to start, or `warn`.
    pub memory_check: String,
    /// What is sharded over the ranks: `none` (replicated data parallelism), `optimizer` (each
    /// rank keeps and updates AdamW's state for its rows of every weight) or `full` (weights,
    /// gradients and AdamW's state; each layer runs on weights gathered just before it).
    pub sharding: String,
    /// Where tokenized datasets are cached (empty: `$XDG_CACHE_HOME/waypoint/data`, else
    /// `~/.cache/waypoint/data`).
    pub data_cache_dir: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            framework: "waypoint".into(),
            model_id: "builtin:tiny".into(),
            run_id: "demo".into(),
            checkpoint_base_uri: "./runs".into(),
            dataset_uri: "builtin:demo".into(),
            dataset_text_field: "text".into(),
            eval_dataset_uri: String::new(),
            eval_steps: 0,
            max_steps: 0,
            num_epochs: 3,
            lr: 3e-3,
            lr_scheduler: "cosine".into(),
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            batch_size: 8,
            gradient_accumulation: 1,
            max_seq_len: 64,
            disable_packing: false,
            skip_bad_lines: false,
            dataloader_workers: 0,
            save_steps: 50,
            dcp_save_interval: 0,
            keep_last: 3,
            sampler_save_steps: 0,
            sampler_base_every: 8,
            sync_save: false,
            sampler_dtype: "bf16".into(),
            output_model_id: String::new(),
            init_from_checkpoint: String::new(),
            resume_from_checkpoint: false,
            seed: 42,
            lora_rank: 0,
            lora_alpha: 0.0,
            lora_dropout: 0.0,
            lora_target_modules: "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".into(),
            device: "auto".into(),
            num_threads: 0,
            logging_steps: 10,
            dist_timeout_secs: 300,
            activation_checkpointing: false,
            memory_check: "refuse".into(),
            sharding: "none".into(),
            data_cache_dir: String::new(),
        }
    }
}

/// The valid keys (the flag names), in declaration order.
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

/// A setting that cannot be used, found before any work (the command exits with code 2). The message
/// names the flag or config key and says what is accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The setting at fault: a key of [`TrainConfig`] (the flag without its dashes), or `config_path`
    /// when the file itself is at fault.
    pub key: String,
    /// What is wrong and what is accepted; it names the flag (`--key`) or the file and key.
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Where overriding values come from, for naming them in errors.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Command-line flags: a key is named `--key`.
    Flags,
    /// A `--config_path` file: a key is named by the file and the key.
    File(PathBuf),
}

impl Origin {
    /// How `key` is named in an error.
    fn name(&self, key: &str) -> String {
        match self {
            Self::Flags => format!("--{key}"),
            Self::File(path) => format!("--config_path {}: `{key}`", path.display()),
        }
    }
}

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
}

/// The accepted values of a floating-point setting (always finite).
#[derive(Debug, Clone, Copy)]
enum FloatRange {
    /// > 0.
    Positive,
    /// ≥ 0.
    NonNegative,
    /// [0, 1].
    UnitClosed,
    /// [0, 1).
    UnitHalfOpen,
}

impl FloatRange {
    fn of(key: &str) -> Option<Self> {
        Some(match key {
            "lr" | "adam_epsilon" => Self::Positive,
            "weight_decay" | "max_grad_norm" | "lora_alpha" => Self::NonNegative,
            "min_lr_ratio" => Self::UnitClosed,
            "adam_beta1" | "adam_beta2" | "lora_dropout" => Self::UnitHalfOpen,
            _ => return None,
        })
    }

    fn contains(self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Self::Positive => x > 0.0,
                Self::NonNegative => x >= 0.0,
                Self::UnitClosed => (0.0..=1.0).contains(&x),
                Self::UnitHalfOpen => (0.0..1.0).contains(&x),
            }
    }

    fn describe(self, key: &str) -> String {
        let what = match self {
            Self::Positive => "a finite positive number",
            Self::NonNegative => "a finite number ≥ 0",
            Self::UnitClosed => "a number in [0, 1]",
            Self::UnitHalfOpen => "a number in [0, 1)",
        };
        let zero = match key {
            "max_grad_norm" => " (0: no clipping)",
            "lora_alpha" => " (0: twice --lora_rank)",
            _ => "",
        };
        format!("{what}{zero}")
    }
}

/// Reads a `--config_path` file (`.toml`, else JSON) into a key → value map, rejecting unknown keys.
pub fn read_config_file(path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let shown = path.display();
    let err = |m: String| ConfigError::new("config_path", format!("--config_path {shown}: {m}"));
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let value: Value = if path.extension().is_some_and(|e| e == "toml") {
        let t: toml::Table =
            toml::from_str(&text).map_err(|e| err(format!("not valid TOML: {e}")))?;
        serde_json::to_value(t).map_err(|e| err(format!("not representable as settings: {e}")))?
    } else {
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?
    };
    let Value::Object(mut map) = value else {
        return Err(err("the top level must be a table of settings".into()));
    };
    // The control plane's job spec nests trainer flags under `extra_args`; accept that shape too.
    match map.remove("extra_args") {
        None => {}
        Some(Value::Object(extra)) => {
            for (k, v) in extra {
                if let Some(top) = map.get(&k) {
                    if *top != v {
                        return Err(ConfigError::new(
                            &k,
                            format!(
                                "--config_path {shown}: `{k}` is set both at the top level ({top}) \
                                 and under `extra_args` ({v}); keep one"
                            ),
                        ));
                    }
                }
                map.insert(k, v);
            }
        }
        Some(other) => {
            return Err(err(format!(
                "`extra_args` must be a table of settings (like the top level), not {other}"
            )))
        }
    }
    let valid = keys();
    for key in map.keys() {
        if !valid.contains(key) {
            let hint = closest_key(key)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            return Err(ConfigError::new(
                "config_path",
                format!("--config_path {shown}: unknown setting `{key}`{hint}"),
            ));
        }
    }
    Ok(map)
}

/// Applies `overrides` (from a file, then from flags) over `base`; a value of the wrong type, or a
/// number that is not finite (NaN and infinities arrive as null), names its key and source.
pub fn merge(
    base: &TrainConfig,
    overrides: &Map<String, Value>,
    origin: &Origin,
) -> Result<TrainConfig, ConfigError> {
    let internal = |e: serde_json::Error| ConfigError::new("config_path", e.to_string());
    let Value::Object(defaults) = serde_json::to_value(base).map_err(internal)? else {
        return Err(ConfigError::new(
            "config_path",
            "the configuration does not serialize to a table",
        ));
    };
    let mut merged = defaults.clone();
    for (k, v) in overrides {
        let name = origin.name(k);
        let Some(default) = defaults.get(k) else {
            let hint = closest_key(k)
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            return Err(ConfigError::new(
                k,
                format!("{name}: unknown setting{hint}"),
            ));
        };
        if default.is_f64() && !v.as_f64().is_some_and(f64::is_finite) {
            let what = FloatRange::of(k).map_or("a finite number".into(), |r| r.describe(k));
            let got = match (v, origin) {
                (Value::Null, Origin::Flags) => "NaN or an infinity".to_string(),
                (Value::Null, Origin::File(_)) => "null, NaN or an infinity".to_string(),
                _ => v.to_string(),
            };
            return Err(ConfigError::new(
                k,
                format!("{name} must be {what}; got {got}"),
            ));
        }
        // Check this one value alone, so that a type error names it.
        let mut probe = defaults.clone();
        probe.insert(k.clone(), v.clone());
        if let Err(e) = serde_json::from_value::<TrainConfig>(Value::Object(probe)) {
            return Err(ConfigError::new(k, format!("{name}: {e}")));
        }
        merged.insert(k.clone(), v.clone());
    }
    serde_json::from_value(Value::Object(merged))
        .map_err(|e| ConfigError::new("config_path", format!("{origin:?}: {e}")))
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
        if self.dcp_save_interval > 0 {
            check(
                self.save_steps == TrainConfig::default().save_steps
                    || self.save_steps == self.dcp_save_interval,
                "dcp_save_interval",
                || {
                    format!(
                        "--save_steps {} and --dcp_save_interval {} disagree; they are the same \
                         setting, pass one",
                        self.save_steps, self.dcp_save_interval
                    )
                },
            )?;
            self.save_steps = self.dcp_save_interval;
        }
        in_range("batch_size", self.batch_size, 1, limits::BATCH_SIZE)?;
        in_range(
            "gradient_accumulation",
            self.gradient_accumulation,
            1,
            limits::GRADIENT_ACCUMULATION,
        )?;
        in_range("max_seq_len", self.max_seq_len, 2, limits::MAX_SEQ_LEN)?;
        let tokens = self.batch_size * self.gradient_accumulation * self.max_seq_len;
        check(tokens <= limits::TOKENS_PER_STEP, "batch_size", || {
            format!(
                "--batch_size {} × --gradient_accumulation {} × --max_seq_len {} = {tokens} tokens \
                 per step on each rank, more than the {} one rank can hold; lower them (more ranks \
                 give a larger global batch)",
                self.batch_size,
                self.gradient_accumulation,
                self.max_seq_len,
                limits::TOKENS_PER_STEP
            )
        })?;
        in_range("max_steps", self.max_steps, 0, limits::MAX_STEPS)?;
        in_range("num_epochs", self.num_epochs, 0, limits::NUM_EPOCHS)?;
        check(
            self.max_steps > 0 || self.num_epochs > 0,
            "max_steps",
            || "--max_steps and --num_epochs are both 0: there is nothing to train".into(),
        )?;
        in_range("num_threads", self.num_threads, 0, limits::NUM_THREADS)?;
        in_range(
            "dist_timeout_secs",
            self.dist_timeout_secs,
            1,
            limits::DIST_TIMEOUT_SECS,
        )?;
        in_range("lora_rank", self.lora_rank, 0, limits::LORA_RANK)?;
        for (key, value) in [
            ("lr", self.lr),
            ("min_lr_ratio", self.min_lr_ratio),
            ("weight_decay", self.weight_decay),
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
            ("adam_epsilon", self.adam_epsilon),
            ("max_grad_norm", self.max_grad_norm),
            ("lora_alpha", self.lora_alpha),
            ("lora_dropout", self.lora_dropout),
        ] {
            if let Some(range) = FloatRange::of(key) {
                check(range.contains(value), key, || {
                    format!("--{key} must be {}; got {value}", range.describe(key))
                })?;
            }
        }
        crate::run::optim::ScheduleKind::parse(&self.lr_scheduler)
            .map_err(|e| usage("lr_scheduler", format!("{e:#}")))?;
        check(
            SamplerDtype::parse(&self.sampler_dtype).is_some(),
            "sampler_dtype",
            || {
                format!(
                    "--sampler_dtype {:?}: use bf16, fp16 or fp32",
                    self.sampler_dtype
                )
            },
        )?;
        check(
            crate::collective::shard::Sharding::parse(&self.sharding).is_some(),
            "sharding",
            || {
                format!(
                    "--sharding {:?}: use none, optimizer or full",
                    self.sharding
                )
            },
        )?;
        check(
            crate::run::memory::MemoryCheck::parse(&self.memory_check).is_some(),
            "memory_check",
            || format!("--memory_check {:?}: use refuse or warn", self.memory_check),
        )?;
        check(
            self.eval_steps == 0 || !self.eval_dataset_uri.is_empty(),
            "eval_steps",
            || {
                format!(
                    "--eval_steps {} needs eval data: set --eval_dataset_uri, or drop --eval_steps",
                    self.eval_steps
                )
            },
        )?;
        if self.lora_rank == 0 {
            let d = TrainConfig::default();
            check(
                self.lora_alpha == d.lora_alpha && self.lora_dropout == d.lora_dropout,
                "lora_rank",
                || {
                    "--lora_alpha/--lora_dropout are set but --lora_rank is 0; set --lora_rank to \
                     train adapters"
                        .into()
                },
            )?;
        } else {
            for t in self.lora_target_modules.split(',').map(str::trim) {
                check(
                    t.is_empty() || crate::model::LORA_TARGETS.contains(&t),
                    "lora_target_modules",
                    || {
                        format!(
                            "--lora_target_modules: {t:?} is not one of {}",
                            crate::model::LORA_TARGETS.join(", ")
                        )
                    },
                )?;
            }
            if self.lora_alpha == 0.0 {
                self.lora_alpha = 2.0 * self.lora_rank as f64;
            }
        }
        if !self.init_from_checkpoint.is_empty() {
            waypoint_checkpoint::parse_checkpoint_ref(&self.init_from_checkpoint).map_err(|e| {
                usage(
                    "init_from_checkpoint",
                    format!("--init_from_checkpoint: {e}"),
                )
            })?;
        }
        Ok(())
    }

    /// The checkpoint section, typed: built here once from the flags (spelled as the control plane
    /// spells them), used by the saver, resume and promotion. Call on a validated configuration.
    pub fn checkpoint(&self) -> CheckpointSection {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        CheckpointSection {
            save_steps: self.save_steps,
            keep_last: (self.keep_last > 0).then_some(self.keep_last as usize),
            sampler_save_steps: self.sampler_save_steps,
            sampler_base_every: self.sampler_base_every,
            background: !self.sync_save,
            sampler_dtype: SamplerDtype::parse(&self.sampler_dtype).unwrap_or(SamplerDtype::Bf16),
            output_model_id: some(&self.output_model_id),
            init_from_checkpoint: some(&self.init_from_checkpoint),
        }
    }

    /// `--sharding`, typed. Call on a validated configuration.
    pub(crate) fn sharding(&self) -> crate::collective::shard::Sharding {
        crate::collective::shard::Sharding::parse(&self.sharding)
            .unwrap_or(crate::collective::shard::Sharding::None)
    }

    /// The LoRA settings, when `--lora_rank` asks for adapters. Call on a validated configuration.
    pub fn lora(&self) -> Option<crate::model::LoraConfig> {
        (self.lora_rank > 0).then(|| crate::model::LoraConfig {
            rank: self.lora_rank as i64,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self
                .lora_target_modules
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        })
    }

    /// The settings that must not change across a resume, by name (a JSON object, keys sorted). A
    /// checkpoint records their [`fingerprint`].
    pub fn resume_fields(&self, model_fingerprint: &str) -> Value {
        json!({
            "model": model_fingerprint,
            "lora_rank": self.lora_rank,
            "lora_target_modules": self.lora_target_modules,
            "dataset_uri": self.dataset_uri,
            "dataset_text_field": self.dataset_text_field,
            "max_seq_len": self.max_seq_len,
            "disable_packing": self.disable_packing,
            "seed": self.seed,
        })
    }

    /// The configuration as recorded in `config/run.json`: credentials in URIs are redacted.
    pub fn redacted(&self) -> serde_json::Result<Value> {
        let mut v = serde_json::to_value(self)?;
        if let Some(obj) = v.as_object_mut() {
            for (_, val) in obj.iter_mut() {
                if let Value::String(s) = val {
                    *s = waypoint_storage::redact_uri(s);
                }
            }
        }
        Ok(v)
    }
}

/// The checkpoint section of the configuration (see [`TrainConfig::checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSection {
    /// A resumable save every this many steps (0: only the final one).
    pub save_steps: u64,
    /// Keep this many newest resumable checkpoints (`None`: all).
    pub keep_last: Option<usize>,
    /// A promotable sampler save every this many steps (0: none besides the final one).
    pub sampler_save_steps: u64,
    /// A new full sampler base after this many deltas (0: every sampler save is a base).
    pub sampler_base_every: u64,
    /// Saves run behind training (`--sync_save` makes the loop wait).
    pub background: bool,
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

    /// The libtorch dtype.
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::Bf16 => tch::Kind::BFloat16,
            Self::Fp16 => tch::Kind::Half,
            Self::Fp32 => tch::Kind::Float,
        }
    }
}

/// sha256 (hex) of a JSON value's canonical text (compact, keys sorted).
pub fn fingerprint(value: &Value) -> String {
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_are_checked_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("c.toml");
        std::fs::write(
            &toml_path,
            "lr = 0.5\nmax_steps = 7\n[extra_args]\nbatch_size = 3\n",
        )
        .unwrap();
        let map = read_config_file(&toml_path).unwrap();
        let c = merge(
            &TrainConfig::default(),
            &map,
            &Origin::File(toml_path.clone()),
        )
        .unwrap();
        assert_eq!((c.lr, c.max_steps, c.batch_size), (0.5, 7, 3));
        let flags = Map::from_iter([("lr".to_string(), Value::from(0.25))]);
        assert_eq!(merge(&c, &flags, &Origin::Flags).unwrap().lr, 0.25);

        let json_path = dir.path().join("c.json");
        std::fs::write(&json_path, r#"{"max_stpes": 3}"#).unwrap();
        let err = read_config_file(&json_path).unwrap_err().to_string();
        assert!(
            err.contains("`max_stpes`") && err.contains("`max_steps`"),
            "{err}"
        );
        std::fs::write(&json_path, r#"{"max_steps": "many"}"#).unwrap();
        let map = read_config_file(&json_path).unwrap();
        let err = merge(
            &TrainConfig::default(),
            &map,
            &Origin::File(json_path.clone()),
        )
        .unwrap_err();
        assert_eq!(err.key, "max_steps");
        assert!(
            err.message.contains("c.json") && err.message.contains("`max_steps`"),
            "{err}"
        );
    }

    #[test]
    fn conflicts_are_named() {
        let mut c = TrainConfig {
            save_steps: 10,
            dcp_save_interval: 20,
            ..TrainConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--save_steps") && err.contains("--dcp_save_interval"));
        let mut c = TrainConfig {
            lora_alpha: 4.0,
            ..TrainConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--lora_rank"));
        let mut c = TrainConfig {
            lora_rank: 4,
            ..TrainConfig::default()
        };
        c.validate().unwrap();
        assert_eq!(c.lora_alpha, 8.0);
    }

    #[test]
    fn fingerprints_hash_the_compact_sorted_json_as_checkpoints_recorded_it() {
        // Checkpoints written before record sha256 of serde_json::to_vec of a BTreeMap of the resume
        // fields; the fingerprint must stay the same bytes, or every existing run would read as
        // drifted.
        let fields = TrainConfig::default().resume_fields("m");
        let map: std::collections::BTreeMap<&str, &Value> = fields
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let before = hex::encode(Sha256::digest(serde_json::to_vec(&map).unwrap()));
        assert_eq!(fingerprint(&fields), before);
    }
}
