//! What identifies a configuration: the sha256 [`fingerprint`] of canonical JSON, the settings a
//! resume must not change ([`TrainConfig::resume_fields`]), and the configuration as recorded with
//! the run (secrets redacted).

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

/// sha256 (hex) of a JSON value's canonical text (compact, keys sorted).
pub fn fingerprint(value: &Value) -> String {
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}
