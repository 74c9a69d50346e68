//! What identifies a configuration: the sha256 [`fingerprint`] of canonical JSON, the settings a
//! resume must not change ([`TrainConfig::resume_fields`]), everything that decides the trajectory
//! ([`TrainConfig::trajectory`], which a resume changes only when asked), the [`changes`] between
//! two records, and the configuration as recorded with the run (secrets redacted).

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::flags::TrainConfig;

impl TrainConfig {
    /// The settings that must not change across a resume, by name (a JSON object, keys sorted). A
    /// checkpoint records their [`fingerprint`].
    pub fn resume_fields(&self, model_fingerprint: &str) -> Value {
        json!({
            "model": model_fingerprint,
            "lora_rank": self.lora.lora_rank,
            "lora_target_modules": self.lora.lora_target_modules,
            "dataset_uri": self.data.dataset_uri,
            "dataset_text_field": self.data.dataset_text_field,
            "max_seq_len": self.data.max_seq_len,
            "disable_packing": self.data.disable_packing,
            "seed": self.run.seed,
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

/// How the global batch is split over this start's ranks: recorded with the trajectory, but a
/// restart may split it otherwise (see [`TrainConfig::trajectory`]).
pub const BATCH_SPLIT: [&str; 3] = ["batch_size", "gradient_accumulation", "world_size"];

impl TrainConfig {
    /// Everything that decides the run's trajectory, by name (a JSON object, keys sorted): the
    /// [`resume_fields`](TrainConfig::resume_fields), the LoRA scale, AdamW and clipping, the
    /// schedule (kind, warmup, floor, `total_steps`), the global batch, the recipe — and how the
    /// batch is split over the ranks ([`BATCH_SPLIT`]: recorded, not a change of trajectory).
    pub fn trajectory(
        &self,
        resume_fields: &Value,
        world_size: u64,
        total_steps: u64,
        recipe: &str,
    ) -> Value {
        let mut t = resume_fields.clone();
        let d = &self.data;
        let o = &self.optim;
        let more = json!({
            "lora_alpha": self.lora.lora_alpha,
            "lora_dropout": self.lora.lora_dropout,
            "lr": o.lr,
            "adam_beta1": o.adam_beta1,
            "adam_beta2": o.adam_beta2,
            "adam_epsilon": o.adam_epsilon,
            "weight_decay": o.weight_decay,
            "max_grad_norm": o.max_grad_norm,
            "lr_scheduler": o.lr_scheduler,
            "warmup_steps": o.warmup_steps,
            "min_lr_ratio": o.min_lr_ratio,
            "total_steps": total_steps,
            "global_batch": d.batch_size * d.gradient_accumulation * world_size,
            "batch_size": d.batch_size,
            "gradient_accumulation": d.gradient_accumulation,
            "world_size": world_size,
            "recipe": recipe,
        });
        let mut more = more;
        if self.objective().is_preference() {
            // Recorded only for preference runs: an SFT run's record stays what it was.
            let r = &self.recipe;
            more["beta"] = json!(r.beta);
            if recipe == "dpo" {
                more["dpo_loss"] = json!(r.dpo_loss);
                more["rpo_alpha"] = json!(r.rpo_alpha);
            }
        }
        if let (Some(t), Some(more)) = (t.as_object_mut(), more.as_object()) {
            t.extend(more.clone());
        }
        t
    }
}

/// The settings that differ between two records of them (`before`, `now`: JSON objects), as
/// `key: was X, now Y` (or `now Y` for a key `before` lacks), sorted by key; keys in `ignore` are
/// left out.
pub fn changes(before: &Value, now: &Value, ignore: &[&str]) -> Vec<String> {
    let Some(now) = now.as_object() else {
        return Vec::new();
    };
    now.iter()
        .filter(|(k, v)| !ignore.contains(&k.as_str()) && before.get(k.as_str()) != Some(v))
        .map(|(k, v)| match before.get(k.as_str()) {
            Some(b) => format!("{k}: was {b}, now {v}"),
            None => format!("{k}: now {v}"),
        })
        .collect()
}

/// sha256 (hex) of a JSON value's canonical text (compact, keys sorted).
pub fn fingerprint(value: &Value) -> String {
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}
