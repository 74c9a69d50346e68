//! A Llama-family causal LM in libtorch: Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm), with
//! grouped-query attention, RoPE and tied or untied embeddings — the same computation as Hugging Face
//! transformers' implementations, under the same parameter names, so an HF directory loads as it is and
//! the weights save back as one.
//!
//! LoRA (`lora_rank > 0`) freezes the base and adds `lora_A` `[r, in]` / `lora_B` `[out, r]` to the
//! targeted projections, initialised as `peft` does (A Kaiming-uniform, B zero).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

/// The projections LoRA can wrap, as `peft` names them.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

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
        Ok(Self {
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
        })
    }

    /// The built-in demo model: a 2-layer Llama over the byte tokenizer's 259 ids.
    pub fn tiny() -> Self {
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": crate::tokenizer::BYTE_VOCAB,
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
            "bos_token_id": crate::tokenizer::BYTE_BOS,
            "eos_token_id": crate::tokenizer::BYTE_EOS,
            "pad_token_id": crate::tokenizer::BYTE_PAD,
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

/// A named trainable or frozen tensor.
pub struct Param {
    /// HF name (`model.layers.0.self_attn.q_proj.weight`, or `….lora_A.weight`).
    pub name: String,
    /// The tensor (a leaf; `requires_grad` when trained).
    pub tensor: Tensor,
}

struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
}

impl Linear {
    /// `compute`: the matmul dtype (bf16 on CUDA, as autocast would), else the weights' own.
    fn forward(&self, x: &Tensor, train: bool, compute: Option<Kind>) -> Tensor {
        let y = match compute {
            None => x.linear(&self.weight, self.bias.as_ref()),
            Some(k) => x.to_kind(k).linear(
                &self.weight.to_kind(k),
                self.bias.as_ref().map(|b| b.to_kind(k)),
            ),
        };
        match &self.lora {
            None => y,
            Some(l) => {
                let x = if train && l.dropout > 0.0 {
                    x.dropout(l.dropout, true)
                } else {
                    x.shallow_clone()
                };
                let (x, a, b) = match compute {
                    None => (x, l.a.shallow_clone(), l.b.shallow_clone()),
                    Some(k) => (x.to_kind(k), l.a.to_kind(k), l.b.to_kind(k)),
                };
                y + x.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * l.scale
            }
        }
    }
}

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The model: parameters by name plus the structure the forward pass walks.
pub struct Model {
    /// Architecture.
    pub config: ModelConfig,
    /// LoRA settings, when training adapters.
    pub lora: Option<LoraConfig>,
    base: Vec<Param>,
    adapters: Vec<Param>,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    device: Device,
}

impl Model {
    /// Random weights (normal(0, 0.02) matrices, unit norms, zero biases) drawn after seeding libtorch
    /// with `seed`, so a seed always gives the same model. libtorch's generator is process-wide: do
    /// not draw from it on another thread meanwhile.
    pub fn init(config: ModelConfig, seed: i64, device: Device) -> Result<Self> {
        tch::manual_seed(seed);
        let mut params = BTreeMap::new();
        for (name, shape) in config.parameter_shapes() {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(&shape, (Kind::Float, device))
            } else if name.ends_with(".bias") {
                Tensor::zeros(&shape, (Kind::Float, device))
            } else {
                Tensor::randn(&shape, (Kind::Float, device)) * 0.02
            };
            params.insert(name, t);
        }
        Self::assemble(config, params, device)
    }

    /// Loads an HF model directory: `config.json` and `model.safetensors` or the shards listed in
    /// `model.safetensors.index.json`. Weights are held in fp32 for training. Also returns the sha256
    /// of the weight files (in order), which identifies the base of a LoRA run.
    pub fn load_hf_dir(dir: &Path, device: Device) -> Result<(Self, String)> {
        let config_path = dir.join("config.json");
        let raw: Value = serde_json::from_slice(
            &std::fs::read(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("parsing {}", config_path.display()))?;
        let config = ModelConfig::from_json(&config_path.display().to_string(), raw)?;
        let files = weight_files(dir)?;
        let mut params = BTreeMap::new();
        let mut hasher = Sha256::new();
        for file in files {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            hasher.update(&bytes);
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .with_context(|| format!("parsing {}", file.display()))?;
            for (name, view) in st.tensors() {
                let shape: Vec<usize> = view.shape().to_vec();
                let blob = waypoint_checkpoint::Tensor::new(
                    name.clone(),
                    view.dtype(),
                    shape,
                    bytes::Bytes::copy_from_slice(view.data()),
                )?;
                let t = crate::convert::from_blob(&blob)?
                    .to_kind(Kind::Float)
                    .to_device(device);
                params.insert(name, t);
            }
        }
        if config.tie_word_embeddings {
            params.remove("lm_head.weight");
        }
        let model = Self::assemble(config, params, device)
            .with_context(|| format!("loading the weights of {}", dir.display()))?;
        Ok((model, hex::encode(hasher.finalize())))
    }

    /// Builds the model from named fp32 tensors, checking every name and shape.
    pub fn assemble(
        config: ModelConfig,
        mut params: BTreeMap<String, Tensor>,
        device: Device,
    ) -> Result<Self> {
        let mut base = Vec::new();
        for (name, shape) in config.parameter_shapes() {
            let t = params
                .remove(&name)
                .with_context(|| format!("weight {name} is missing"))?;
            ensure!(
                t.size() == shape,
                "weight {name} has shape {:?}, the config says {shape:?}",
                t.size()
            );
            base.push(Param {
                name,
                tensor: t
                    .to_kind(Kind::Float)
                    .to_device(device)
                    .set_requires_grad(true),
            });
        }
        let stray: Vec<&String> = params
            .keys()
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .collect();
        ensure!(stray.is_empty(), "unexpected weights: {stray:?}");
        let get = |name: &str| -> Tensor {
            base.iter()
                .find(|p| p.name == name)
                .map(|p| p.tensor.shallow_clone())
                .expect("every name of parameter_shapes was checked above")
        };
        let linear = |prefix: &str, bias: bool| Linear {
            weight: get(&format!("{prefix}.weight")),
            bias: bias.then(|| get(&format!("{prefix}.bias"))),
            lora: None,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let ab = config.attention_bias;
                Layer {
                    input_norm: get(&format!("{p}.input_layernorm.weight")),
                    q: linear(&format!("{p}.self_attn.q_proj"), ab),
                    k: linear(&format!("{p}.self_attn.k_proj"), ab),
                    v: linear(&format!("{p}.self_attn.v_proj"), ab),
                    o: linear(&format!("{p}.self_attn.o_proj"), false),
                    q_norm: config
                        .qk_norm
                        .then(|| get(&format!("{p}.self_attn.q_norm.weight"))),
                    k_norm: config
                        .qk_norm
                        .then(|| get(&format!("{p}.self_attn.k_norm.weight"))),
                    post_norm: get(&format!("{p}.post_attention_layernorm.weight")),
                    gate: linear(&format!("{p}.mlp.gate_proj"), false),
                    up: linear(&format!("{p}.mlp.up_proj"), false),
                    down: linear(&format!("{p}.mlp.down_proj"), false),
                }
            })
            .collect();
        let embed = get("model.embed_tokens.weight");
        let norm = get("model.norm.weight");
        let lm_head = (!config.tie_word_embeddings).then(|| get("lm_head.weight"));
        Ok(Self {
            config,
            lora: None,
            base,
            adapters: Vec::new(),
            embed,
            layers,
            norm,
            lm_head,
            device,
        })
    }

    /// Freezes the base and adds LoRA adapters (drawn after seeding libtorch with `seed`).
    pub fn add_lora(&mut self, lora: LoraConfig, seed: i64) -> Result<()> {
        ensure!(lora.rank > 0, "--lora_rank must be positive");
        for t in &lora.targets {
            ensure!(
                LORA_TARGETS.contains(&t.as_str()),
                "--lora_target_modules: {t:?} is not one of {LORA_TARGETS:?}"
            );
        }
        tch::manual_seed(seed);
        // `set_requires_grad` acts on the tensor itself, which the layers share.
        for p in &self.base {
            let _ = p.tensor.set_requires_grad(false);
        }
        let scale = lora.alpha / lora.rank as f64;
        let mut adapters = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let slots: [(&str, &mut Linear); 7] = [
                ("self_attn.q_proj", &mut layer.q),
                ("self_attn.k_proj", &mut layer.k),
                ("self_attn.v_proj", &mut layer.v),
                ("self_attn.o_proj", &mut layer.o),
                ("mlp.gate_proj", &mut layer.gate),
                ("mlp.up_proj", &mut layer.up),
                ("mlp.down_proj", &mut layer.down),
            ];
            for (path, linear) in slots {
                let short = path.rsplit('.').next().unwrap_or(path);
                if !lora.targets.iter().any(|t| t == short) {
                    continue;
                }
                let (out, inp) = (linear.weight.size()[0], linear.weight.size()[1]);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = (Tensor::rand([lora.rank, inp], (Kind::Float, self.device)) * 2.0 - 1.0)
                    * bound;
                let a = a.set_requires_grad(true);
                let b = Tensor::zeros([out, lora.rank], (Kind::Float, self.device))
                    .set_requires_grad(true);
                let fqn = format!("model.layers.{l}.{path}");
                adapters.push(Param {
                    name: format!("{fqn}.lora_A.weight"),
                    tensor: a.shallow_clone(),
                });
                adapters.push(Param {
                    name: format!("{fqn}.lora_B.weight"),
                    tensor: b.shallow_clone(),
                });
                linear.lora = Some(Lora {
                    a,
                    b,
                    scale,
                    dropout: lora.dropout,
                });
            }
        }
        ensure!(
            !adapters.is_empty(),
            "--lora_target_modules matched no projection"
        );
        self.adapters = adapters;
        self.lora = Some(lora);
        Ok(())
    }

    /// The parameters the optimizer updates: the adapters under LoRA, else every base weight.
    pub fn trainable(&self) -> &[Param] {
        if self.lora.is_some() {
            &self.adapters
        } else {
            &self.base
        }
    }

    /// The base weights under their HF names.
    pub fn base(&self) -> &[Param] {
        &self.base
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`; `train` enables LoRA dropout.
    // `h = h + …`, not `h += …`: an in-place add would overwrite what the norms saved for backward.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        let c = &self.config;
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (cos, sin) = rope_tables(t, hd, c.rope_theta, self.device);
        // Mixed precision on CUDA: bf16 matmuls and attention, fp32 norms, residuals and weights.
        let ac = self.device.is_cuda().then_some(Kind::BFloat16);
        let mut h = Tensor::embedding(&self.embed, ids, -1, false, false);
        for layer in &self.layers {
            let x = rms_norm(&h, &layer.input_norm, c.rms_norm_eps);
            let mut q = layer.q.forward(&x, train, ac).view([b, t, nh, hd]);
            let mut k = layer.k.forward(&x, train, ac).view([b, t, nkv, hd]);
            let v = layer.v.forward(&x, train, ac).view([b, t, nkv, hd]);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(&q, qn, c.rms_norm_eps);
                k = rms_norm(&k, kn, c.rms_norm_eps);
            }
            let q = apply_rope(&q.transpose(1, 2), &cos, &sin);
            let k = apply_rope(&k.transpose(1, 2), &cos, &sin);
            let v = v.transpose(1, 2);
            let a = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                true,
                None,
                nkv != nh,
            );
            let a = a.transpose(1, 2).reshape([b, t, nh * hd]);
            h = h + layer.o.forward(&a, train, ac);
            let x = rms_norm(&h, &layer.post_norm, c.rms_norm_eps);
            let m = layer.gate.forward(&x, train, ac).silu() * layer.up.forward(&x, train, ac);
            h = h + layer.down.forward(&m, train, ac);
        }
        let h = rms_norm(&h, &self.norm, c.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        match ac {
            None => h.linear::<Tensor>(head, None),
            Some(k) => h.to_kind(k).linear::<Tensor>(&head.to_kind(k), None),
        }
    }
}

/// The weight files of an HF directory, in the order of its index.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let raw: Value = serde_json::from_slice(&std::fs::read(&index).with_context(|| {
        format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?)
    .with_context(|| format!("parsing {}", index.display()))?;
    let map = raw["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    for f in &files {
        ensure!(
            !f.contains('/') && !f.contains(".."),
            "{}: bad file name {f:?}",
            index.display()
        );
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// HF's RMSNorm: normalise in fp32, scale by the weight.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = xf * (var + eps).rsqrt();
    weight * normed.to_kind(kind)
}

/// cos and sin tables `[seq, head_dim]` for positions `0..seq`.
fn rope_tables(seq: i64, head_dim: i64, theta: f64, device: Device) -> (Tensor, Tensor) {
    let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device))
        .to_kind(Kind::Float)
        / head_dim as f64;
    let inv_freq = Tensor::from(theta)
        .to_kind(Kind::Float)
        .to_device(device)
        .pow(&exponents)
        .reciprocal();
    let positions = Tensor::arange(seq, (Kind::Float, device));
    let freqs = positions.unsqueeze(1).matmul(&inv_freq.unsqueeze(0));
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

/// `x * cos + rotate_half(x) * sin` over `[batch, heads, seq, head_dim]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], -1);
    x * cos.to_kind(x.kind()) + rotated * sin.to_kind(x.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtorch's generator is global to the process: tests that seed it take turns.
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn seeded() -> std::sync::MutexGuard<'static, ()> {
        SEEDED.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn tiny_model_is_causal_and_shapes_are_right() {
        let _turn = seeded();
        let model = Model::init(ModelConfig::tiny(), 0, Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&[1i64, 5, 9, 200, 3, 4]).view([1, 6]);
        let logits = model.forward(&ids, false);
        assert_eq!(logits.size(), vec![1, 6, ModelConfig::tiny().vocab_size]);
        // Changing a later token leaves earlier positions' logits unchanged.
        let ids2 = Tensor::from_slice(&[1i64, 5, 9, 201, 3, 4]).view([1, 6]);
        let logits2 = model.forward(&ids2, false);
        assert!(logits.narrow(1, 0, 3).equal(&logits2.narrow(1, 0, 3)));
        assert!(!logits.narrow(1, 3, 1).equal(&logits2.narrow(1, 3, 1)));
    }

    #[test]
    fn same_seed_same_weights_and_bad_configs_are_named() {
        let _turn = seeded();
        let a = Model::init(ModelConfig::tiny(), 7, Device::Cpu).unwrap();
        let b = Model::init(ModelConfig::tiny(), 7, Device::Cpu).unwrap();
        for (x, y) in a.base().iter().zip(b.base()) {
            assert!(x.tensor.equal(&y.tensor), "{}", x.name);
        }
        let mut raw = ModelConfig::tiny().raw;
        raw["model_type"] = "gpt2".into();
        let err = ModelConfig::from_json("cfg.json", raw)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cfg.json") && err.contains("gpt2"), "{err}");
        let mut raw = ModelConfig::tiny().raw;
        raw["num_key_value_heads"] = 3.into();
        assert!(ModelConfig::from_json("c", raw).is_err());
    }

    #[test]
    fn lora_starts_as_the_base_model_and_trains_only_adapters() {
        let _turn = seeded();
        let base = Model::init(ModelConfig::tiny(), 1, Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        let before = base.forward(&ids, false);
        let mut lora = Model::init(ModelConfig::tiny(), 1, Device::Cpu).unwrap();
        lora.add_lora(
            LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: vec!["q_proj".into(), "down_proj".into()],
            },
            3,
        )
        .unwrap();
        let after = lora.forward(&ids, false);
        let diff = (&after - &before).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        assert_eq!(lora.trainable().len(), 2 * 2 * 2);
        assert!(lora.trainable().iter().all(|p| p.tensor.requires_grad()));
        assert!(lora.base().iter().all(|p| !p.tensor.requires_grad()));
        let names: Vec<&str> = lora.trainable().iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"model.layers.1.mlp.down_proj.lora_B.weight"));
    }
}
