//! PEFT LoRA adapters: `adapter_config.json` and the tensor names and shapes `peft` loads.

use serde::{Deserialize, Serialize};

use crate::error::{CheckpointError, Result};
use crate::tensor::Tensor;

/// The fields of `adapter_config.json` that `peft` needs to load a LoRA adapter for a causal LM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// Always `"CAUSAL_LM"`.
    pub task_type: String,
    /// The rank.
    pub r: usize,
    /// The scaling numerator (scale = lora_alpha / r).
    pub lora_alpha: f64,
    /// Dropout on the adapter input during training.
    pub lora_dropout: f64,
    /// Module names the adapters wrap (`q_proj`, `v_proj`, …).
    pub target_modules: Vec<String>,
    /// The base model the adapter applies to.
    pub base_model_name_or_path: String,
    /// `"none"`: biases are not trained.
    pub bias: String,
    /// Not an inference-mode adapter file.
    pub inference_mode: bool,
}

impl AdapterConfig {
    /// A LoRA config for a causal LM.
    pub fn new(
        r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        target_modules: Vec<String>,
        base_model: &str,
    ) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            base_model_name_or_path: base_model.into(),
            bias: "none".into(),
            inference_mode: true,
        }
    }

    /// Serializes (pretty JSON).
    pub fn to_json(&self) -> crate::Result<Vec<u8>> {
        crate::error::to_json_pretty("adapter_config.json", self)
    }
}

/// `base_model.model.<fqn>.lora_A.weight` (or `lora_B`), the name `peft` saves an adapter under.
pub fn adapter_tensor_name(module_fqn: &str, which: char) -> String {
    format!("base_model.model.{module_fqn}.lora_{which}.weight")
}

/// Checks adapter tensors against the config: names of the PEFT form, `lora_A` `[r, in]`, `lora_B`
/// `[out, r]`, each module targeted by the config.
pub fn validate_adapter(config: &AdapterConfig, tensors: &[Tensor]) -> Result<()> {
    for t in tensors {
        let bad = |reason: String| CheckpointError::BadTensor {
            name: t.name.clone(),
            reason,
        };
        let rest = t.name.strip_prefix("base_model.model.").ok_or_else(|| {
            bad("adapter tensors are named base_model.model.<fqn>.lora_A/B.weight".into())
        })?;
        let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 'A')
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 'B')
        } else {
            return Err(bad("must end in .lora_A.weight or .lora_B.weight".into()));
        };
        let leaf = module.rsplit('.').next().unwrap_or(module);
        if !config.target_modules.iter().any(|m| m == leaf) {
            return Err(bad(format!(
                "module {leaf} is not in target_modules {:?}",
                config.target_modules
            )));
        }
        let ok = t.shape.len() == 2
            && match which {
                'A' => t.shape[0] == config.r,
                _ => t.shape[1] == config.r,
            };
        if !ok {
            return Err(bad(format!(
                "shape {:?}: lora_A is [r, in] and lora_B is [out, r] with r = {}",
                t.shape, config.r
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Dtype;
    use bytes::Bytes;

    #[test]
    fn config_has_what_peft_reads_and_tensors_are_checked() {
        let c = AdapterConfig::new(
            4,
            8.0,
            0.0,
            vec!["q_proj".into(), "v_proj".into()],
            "tiny-llama",
        );
        let v: serde_json::Value = serde_json::from_slice(&c.to_json().unwrap()).unwrap();
        for k in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "target_modules",
            "base_model_name_or_path",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        let t = |name: String, shape: Vec<usize>| {
            let n = shape.iter().product::<usize>() * 4;
            Tensor::new(name, Dtype::F32, shape, Bytes::from(vec![0u8; n])).unwrap()
        };
        let a = t(
            adapter_tensor_name("model.layers.0.self_attn.q_proj", 'A'),
            vec![4, 16],
        );
        let b = t(
            adapter_tensor_name("model.layers.0.self_attn.q_proj", 'B'),
            vec![16, 4],
        );
        validate_adapter(&c, &[a.clone(), b]).unwrap();
        let wrong = t(
            adapter_tensor_name("model.layers.0.self_attn.q_proj", 'B'),
            vec![4, 16],
        );
        assert!(validate_adapter(&c, &[wrong])
            .unwrap_err()
            .to_string()
            .contains("[out, r]"));
        let untargeted = t(
            adapter_tensor_name("model.layers.0.mlp.up_proj", 'A'),
            vec![4, 16],
        );
        assert!(validate_adapter(&c, &[untargeted])
            .unwrap_err()
            .to_string()
            .contains("target_modules"));
        let mut renamed = a;
        renamed.name = "q_proj.lora_A.weight".into();
        assert!(validate_adapter(&c, &[renamed]).is_err());
    }
}
