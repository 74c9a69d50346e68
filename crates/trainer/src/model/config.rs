//! The architecture as Hugging Face's `config.json` states it ([`ModelConfig`], its fields named
//! as there), checked against limits before anything is allocated, and the parameter names and
//! shapes it implies.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use waypoint_config::UsageError;

/// The largest vocabulary a model config may have.
pub const MAX_VOCAB: i64 = 1 << 24;
/// The largest `hidden_size` (`intermediate_size`: 8 times this).
pub const MAX_WIDTH: i64 = 1 << 16;
/// The most decoder layers.
pub const MAX_LAYERS: i64 = 1024;
/// The most attention heads.
pub const MAX_HEADS: i64 = 1024;
/// The largest `head_dim`.
pub const MAX_HEAD_DIM: i64 = 4096;
/// The most parameters a model config may imply (a trillion).
pub const MAX_PARAMETERS: u128 = 1 << 40;

/// The architecture fields of an HF `config.json` that the forward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama`, `qwen2` or `qwen3`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Model width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (GQA when fewer than the query heads).
    pub num_key_value_heads: i64,
    /// Width of one head.
    pub head_dim: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2; optional for Llama/Qwen3).
    pub attention_bias: bool,
    /// q/k RMSNorm over each head (Qwen3).
    pub qk_norm: bool,
    /// The `config.json` as read, carried into sampler checkpoints.
    pub raw: Value,
}

impl ModelConfig {
    /// Parses an HF `config.json`; `source` names it in errors.
    pub fn from_json(source: &str, raw: Value) -> Result<Self> {
        let model_type = raw["model_type"].as_str().unwrap_or_default().to_string();
        let int = |key: &str| -> Result<i64> {
            raw[key]
                .as_i64()
                .with_context(|| format!("{source}: `{key}` is missing or not an integer"))
        };
        let (qk_norm, default_bias) = match model_type.as_str() {
            "llama" | "mistral" => (false, false),
            "qwen2" => (false, true),
            "qwen3" => (true, false),
            other => bail!(
                "{source}: model_type {other:?} is not supported; waypoint trains llama, qwen2 and \
                 qwen3 (Llama-family decoders)"
            ),
        };
        // transformers 5 writes `rope_parameters`; older versions `rope_theta` and `rope_scaling`.
        let rope = raw
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .or(raw.get("rope_scaling").filter(|v| v.is_object()));
        if let Some(rope) = rope {
            let kind = rope["rope_type"]
                .as_str()
                .or(rope["type"].as_str())
                .unwrap_or("default");
            ensure!(
                kind == "default",
                "{source}: RoPE type {kind:?} is not supported yet; only plain RoPE is"
            );
        }
        let rope_theta = raw["rope_theta"]
            .as_f64()
            .or(rope.and_then(|r| r["rope_theta"].as_f64()))
            .unwrap_or(10000.0);
        if let Some(types) = raw["layer_types"].as_array() {
            ensure!(
                types.iter().all(|t| t.as_str() == Some("full_attention")),
                "{source}: only full-attention layers are supported (layer_types: {types:?})"
            );
        }
        if raw["use_sliding_window"].as_bool() == Some(true) {
            bail!("{source}: use_sliding_window is not supported");
        }
        if raw["mlp_bias"].as_bool() == Some(true) {
            bail!("{source}: mlp_bias is not supported");
        }
        let hidden_size = int("hidden_size")?;
        let num_attention_heads = int("num_attention_heads")?;
        let num_key_value_heads = raw["num_key_value_heads"]
            .as_i64()
            .unwrap_or(num_attention_heads);
        let head_dim = raw["head_dim"]
            .as_i64()
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        ensure!(
            num_attention_heads > 0
                && num_key_value_heads > 0
                && num_attention_heads % num_key_value_heads == 0,
            "{source}: num_attention_heads {num_attention_heads} is not a multiple of \
             num_key_value_heads {num_key_value_heads}"
        );
        ensure!(
            head_dim % 2 == 0,
            "{source}: head_dim {head_dim} must be even for RoPE"
        );
        let config = Self {
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta,
            tie_word_embeddings: raw["tie_word_embeddings"].as_bool().unwrap_or(false),
            attention_bias: raw["attention_bias"].as_bool().unwrap_or(default_bias),
            qk_norm,
            model_type,
            raw,
        };
        config.check_sizes(source)?;
        Ok(config)
    }

    /// Reads and checks `config.json` of an HF model directory. A config that cannot be trained is
    /// found before any work: a usage error (exit 2).
    pub fn read_hf_dir(dir: &Path) -> Result<Self> {
        let usage = |e: anyhow::Error| anyhow::Error::from(UsageError(format!("{e:#}")));
        let config_path = dir.join("config.json");
        let raw: Value = serde_json::from_slice(
            &std::fs::read(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("parsing {}", config_path.display()))
        .map_err(usage)?;
        ModelConfig::from_json(&config_path.display().to_string(), raw).map_err(usage)
    }

    /// Bounds every size before anything is allocated from it: each within what any real model of
    /// these families has (with room), the token ids within the vocabulary, and the parameter count
    /// within [`MAX_PARAMETERS`].
    fn check_sizes(&self, source: &str) -> Result<()> {
        for (key, value, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH * 8),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
        ] {
            ensure!(
                (1..=max).contains(&value),
                "{source}: {key} {value} is out of range: use 1 to {max}"
            );
        }
        for (key, value) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            ensure!(
                value.is_finite() && value > 0.0,
                "{source}: {key} {value} must be a finite positive number"
            );
        }
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            let ids = match &self.raw[key] {
                Value::Null => continue,
                Value::Array(a) => a.iter().collect(),
                v => vec![v],
            };
            for id in ids {
                ensure!(
                    id.as_i64()
                        .is_some_and(|i| (0..self.vocab_size).contains(&i)),
                    "{source}: {key} {id} is not a token id of the vocabulary (0 to {})",
                    self.vocab_size - 1
                );
            }
        }
        let count = self.parameter_count();
        ensure!(
            count <= MAX_PARAMETERS,
            "{source}: these sizes make {count} parameters, more than waypoint trains \
             ({MAX_PARAMETERS}); check num_hidden_layers, hidden_size, intermediate_size and \
             vocab_size"
        );
        Ok(())
    }

    /// The number of base parameters, computed without building their list (sizes are bounded by
    /// `check_sizes`, so it cannot overflow).
    pub fn parameter_count(&self) -> u128 {
        let (h, i, v) = (
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.vocab_size as u128,
        );
        let q = (self.num_attention_heads * self.head_dim) as u128;
        let kv = (self.num_key_value_heads * self.head_dim) as u128;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let qk_norm = if self.qk_norm {
            2 * self.head_dim as u128
        } else {
            0
        };
        let layer = 2 * h + (q + 2 * kv) * h + bias + h * q + qk_norm + 3 * i * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers as u128 * layer + h + head
    }

    /// Each projection LoRA can wrap, with its weight's (outputs, inputs), in [`waypoint_config::LORA_TARGETS`] order.
    pub fn projection_shapes(&self) -> [(&'static str, (i64, i64)); 7] {
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let (h, i) = (self.hidden_size, self.intermediate_size);
        [
            ("q_proj", (q, h)),
            ("k_proj", (kv, h)),
            ("v_proj", (kv, h)),
            ("o_proj", (h, q)),
            ("gate_proj", (i, h)),
            ("up_proj", (i, h)),
            ("down_proj", (h, i)),
        ]
    }

    /// The number of LoRA weights of rank `rank` on the projections named in `targets`: r × (in + out)
    /// for each, in every layer.
    pub fn lora_parameter_count(&self, rank: i64, targets: &[String]) -> u128 {
        let per_layer: u128 = self
            .projection_shapes()
            .iter()
            .filter(|(name, _)| targets.iter().any(|t| t == name))
            .map(|(_, (out, inp))| (rank * (out + inp)) as u128)
            .sum();
        let (out, inp) = self.unembedding_shape();
        let head = match targets.iter().any(|t| t == "lm_head") {
            true => (rank * (out + inp)) as u128,
            false => 0,
        };
        per_layer * self.num_hidden_layers as u128 + head
    }

    /// The unembedding's (`lm_head`) weight shape: (vocabulary, hidden).
    pub fn unembedding_shape(&self) -> (i64, i64) {
        (self.vocab_size, self.hidden_size)
    }

    /// The built-in demo model: a 2-layer Llama over the byte tokenizer's 259 ids.
    pub fn tiny() -> Self {
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": waypoint_data::tokenizer::BYTE_VOCAB,
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "hidden_act": "silu",
            "bos_token_id": waypoint_data::tokenizer::BYTE_BOS,
            "eos_token_id": waypoint_data::tokenizer::BYTE_EOS,
            "pad_token_id": waypoint_data::tokenizer::BYTE_PAD,
            "torch_dtype": "bfloat16",
        });
        Self::from_json("built-in tiny config", raw).expect("the built-in config is valid")
    }

    /// Every base parameter as (HF name, shape), in a fixed order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                out.push((format!("{p}.self_attn.{name}.weight"), vec![rows, h]));
                if self.attention_bias {
                    out.push((format!("{p}.self_attn.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if self.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![self.head_dim]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![self.head_dim]));
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }
}
