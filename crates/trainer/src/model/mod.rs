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

use crate::checkpointing::convert;
use crate::collective::shard::{rows_of, Rows};
use crate::run::UsageError;

mod recompute;
mod sharded;

pub(crate) use sharded::RowCollective;

/// The dtype a LoRA run holds its frozen base in on `device`: bf16 on CUDA, the compute dtype and
/// the stored dtype of the models people adapt (no fp32 copy); fp32 on CPU, whose compute stays
/// fp32 so its results are exact.
pub fn frozen_base_kind(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

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

    /// Each projection LoRA can wrap, with its weight's (outputs, inputs), in [`LORA_TARGETS`] order.
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
        per_layer * self.num_hidden_layers as u128
    }

    /// The built-in demo model: a 2-layer Llama over the byte tokenizer's 259 ids.
    pub fn tiny() -> Self {
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": crate::data::tokenizer::BYTE_VOCAB,
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
            "bos_token_id": crate::data::tokenizer::BYTE_BOS,
            "eos_token_id": crate::data::tokenizer::BYTE_EOS,
            "pad_token_id": crate::data::tokenizer::BYTE_PAD,
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
            // A weight held in another dtype than the activations (a bf16 base): cast per call.
            None if self.weight.kind() != x.kind() => x.linear(
                &self.weight.to_kind(x.kind()),
                self.bias.as_ref().map(|b| b.to_kind(x.kind())),
            ),
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
    /// With `--sharding full`: which rows of each base weight this rank holds (`base` holds only
    /// those; the layers are built from gathered weights when they run).
    shards: Option<Vec<Shard>>,
    /// The matmul dtype (bf16 on CUDA, as autocast would), else `None`: the weights' own (fp32).
    compute: Option<Kind>,
}

/// This rank's part of one sharded base weight.
#[derive(Debug, Clone)]
struct Shard {
    /// The rows it holds.
    rows: Rows,
    /// The whole weight's shape.
    whole: Vec<i64>,
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
    /// `model.safetensors.index.json`. Weights are held in `hold`: fp32 for training them, the
    /// frozen base's dtype for LoRA ([`frozen_base_kind`], never an fp32 copy on the way); with `shard` =
    /// (rank, world), only the rows of each weight that rank holds ([`Model::shard`]), read from a
    /// map of the files so the rest is never brought into memory. Also returns the sha256 of the
    /// weight files (in order), which identifies the base of a LoRA run.
    pub fn load_hf_dir(
        dir: &Path,
        device: Device,
        shard: Option<(u32, u32)>,
        hold: Kind,
    ) -> Result<(Self, String)> {
        let usage = |e: anyhow::Error| anyhow::Error::from(UsageError(format!("{e:#}")));
        let config = ModelConfig::read_hf_dir(dir)?;
        let config_path = dir.join("config.json");
        let weights = weight_files(dir)?;
        // Bound what the config makes us allocate by what the files hold: every weight takes at
        // least a byte.
        let mut file_bytes = 0u128;
        for file in &weights.files {
            let meta =
                std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
            file_bytes += u128::from(meta.len());
        }
        let count = config.parameter_count();
        if count > file_bytes {
            return Err(usage(anyhow::anyhow!(
                "{}: its sizes make {count} parameters, but the weight files of {} hold {file_bytes} \
                 bytes; the config does not describe these weights",
                config_path.display(),
                dir.display()
            )));
        }
        let mut params = BTreeMap::new();
        let mut hasher = Sha256::new();
        for file in &weights.files {
            let reading = || format!("reading {}", file.display());
            let mut f = std::fs::File::open(file).with_context(reading)?;
            // The fingerprint streams the file; the tensors come from a map of it.
            std::io::copy(&mut f, &mut hasher).with_context(reading)?;
            // SAFETY: a read-only map, dropped at the end of this iteration; the weight files must
            // not change while they load (as for every reader that maps safetensors files).
            let map = unsafe { memmap2::Mmap::map(&f) }.with_context(reading)?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .with_context(|| format!("parsing {}", file.display()))?;
            for (name, view) in st.tensors() {
                weights.check_holder(&name, file)?;
                let mut shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                let mut data = view.data();
                if let (Some((rank, world)), Some(&d0)) = (shard, shape.first()) {
                    let r = rows_of(d0, rank, world);
                    let row_bytes = data.len() / (d0.max(1) as usize);
                    data =
                        &data[r.start as usize * row_bytes..(r.start + r.len) as usize * row_bytes];
                    shape[0] = r.len;
                }
                let t = Tensor::f_from_data_size(data, &shape, convert::kind_of(view.dtype())?)
                    .with_context(|| format!("tensor {name} of {}", file.display()))?
                    .to_kind(hold)
                    .to_device(device);
                params.insert(name, t);
            }
        }
        weights.check_all_found(&params)?;
        if config.tie_word_embeddings {
            params.remove("lm_head.weight");
        }
        let model = Self::assemble_rows(config, params, shard, hold, device)
            .with_context(|| format!("loading the weights of {}", dir.display()))?;
        Ok((model, hex::encode(hasher.finalize())))
    }

    /// Builds the model from named fp32 tensors, checking every name and shape.
    pub fn assemble(
        config: ModelConfig,
        params: BTreeMap<String, Tensor>,
        device: Device,
    ) -> Result<Self> {
        Self::assemble_rows(config, params, None, Kind::Float, device)
    }

    /// [`Model::assemble`] with the weights held in `hold`, or with `shard` = (rank, world) from
    /// the rows of each weight that rank holds: a sharded model ([`Model::shard`]).
    fn assemble_rows(
        config: ModelConfig,
        mut params: BTreeMap<String, Tensor>,
        shard: Option<(u32, u32)>,
        hold: Kind,
        device: Device,
    ) -> Result<Self> {
        let mut base = Vec::new();
        let mut shards = Vec::new();
        for (name, mut shape) in config.parameter_shapes() {
            if let (Some((rank, world)), Some(&d0)) = (shard, shape.first()) {
                let r = rows_of(d0, rank, world);
                shards.push(Shard {
                    rows: r,
                    whole: shape.clone(),
                });
                shape[0] = r.len;
            }
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
                tensor: t.to_kind(hold).to_device(device).set_requires_grad(true),
            });
        }
        let stray: Vec<&String> = params
            .keys()
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .collect();
        ensure!(stray.is_empty(), "unexpected weights: {stray:?}");
        let mut model = Self {
            config,
            lora: None,
            base,
            adapters: Vec::new(),
            embed: Tensor::new(),
            layers: Vec::new(),
            norm: Tensor::new(),
            lm_head: None,
            device,
            shards: shard.map(|_| shards),
            compute: device.is_cuda().then_some(Kind::BFloat16),
        };
        if !model.is_sharded() {
            model.wire();
        }
        Ok(model)
    }

    /// Builds the structure the forward pass walks (layers, embedding, norm, head) over `base`, with
    /// the LoRA adapters (if any) on their projections.
    fn wire(&mut self) {
        let base = &self.base;
        let get = |name: &str| -> Tensor {
            base.iter()
                .find(|p| p.name == name)
                .map(|p| p.tensor.shallow_clone())
                .expect("base holds every name of parameter_shapes (checked when assembled)")
        };
        let c = &self.config;
        let layers = (0..c.num_hidden_layers)
            .map(|l| Layer::from_weights(c, l, &get, &|p| self.lora_at(p)))
            .collect();
        self.layers = layers;
        self.embed = get("model.embed_tokens.weight");
        self.norm = get("model.norm.weight");
        self.lm_head = (!c.tie_word_embeddings).then(|| get("lm_head.weight"));
    }

    /// The LoRA adapter of the projection `prefix` (`model.layers.0.self_attn.q_proj`), if it has
    /// one (sharing the trained tensors).
    fn lora_at(&self, prefix: &str) -> Option<Lora> {
        let lora = self.lora.as_ref()?;
        let find = |which: &str| {
            let name = format!("{prefix}.lora_{which}.weight");
            self.adapters
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.tensor.shallow_clone())
        };
        Some(Lora {
            a: find("A")?,
            b: find("B")?,
            scale: lora.alpha / lora.rank as f64,
            dropout: lora.dropout,
        })
    }

    /// Holds the frozen base in `kind` (bf16 under LoRA on CUDA: the stored dtype of the models
    /// people adapt, with no fp32 copy). Call before the adapters are added.
    fn hold_base_in(&mut self, kind: Kind) {
        for p in &mut self.base {
            p.tensor = p.tensor.detach().to_kind(kind);
        }
        if !self.is_sharded() {
            self.wire();
        }
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
        // An adapter of rank r adds r × (in + out) weights to a projection: beyond min(in, out) it
        // can express nothing more, so a larger rank is a mistake (and could exhaust memory).
        for (target, (out, inp)) in self.config.projection_shapes() {
            let limit = out.min(inp);
            ensure!(
                !lora.targets.iter().any(|t| t == target) || lora.rank <= limit,
                "--lora_rank {} is larger than {target} allows ({limit}: the smaller of its {inp} \
                 inputs and {out} outputs); use at most {limit}, or leave {target} out of \
                 --lora_target_modules",
                lora.rank
            );
        }
        tch::manual_seed(seed);
        // `set_requires_grad` acts on the tensor itself, which the layers share.
        for p in &self.base {
            let _ = p.tensor.set_requires_grad(false);
        }
        let frozen = frozen_base_kind(self.device);
        if self.base.iter().any(|p| p.tensor.kind() != frozen) {
            self.hold_base_in(frozen);
        }
        let shapes = self.config.projection_shapes();
        let mut adapters = Vec::new();
        for l in 0..self.config.num_hidden_layers {
            for path in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ] {
                let short = path.rsplit('.').next().unwrap_or(path);
                if !lora.targets.iter().any(|t| t == short) {
                    continue;
                }
                let Some(&(_, (out, inp))) = shapes.iter().find(|(name, _)| *name == short) else {
                    continue;
                };
                let bound = 1.0 / (inp as f64).sqrt();
                let a = (Tensor::rand([lora.rank, inp], (Kind::Float, self.device)) * 2.0 - 1.0)
                    * bound;
                let b = Tensor::zeros([out, lora.rank], (Kind::Float, self.device));
                let fqn = format!("model.layers.{l}.{path}");
                adapters.push(Param {
                    name: format!("{fqn}.lora_A.weight"),
                    tensor: a.set_requires_grad(true),
                });
                adapters.push(Param {
                    name: format!("{fqn}.lora_B.weight"),
                    tensor: b.set_requires_grad(true),
                });
            }
        }
        ensure!(
            !adapters.is_empty(),
            "--lora_target_modules matched no projection"
        );
        self.adapters = adapters;
        self.lora = Some(lora);
        if !self.is_sharded() {
            self.wire();
        }
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

    /// Keeps only the rows of every base weight that `rank` of `world` owns ([`rows_of`]) and drops
    /// the rest: from here on the layers run on weights gathered from all ranks
    /// ([`Model::loss_and_gradients_sharded`]). Under LoRA the frozen base is sharded (in the dtype
    /// it is held in) and the adapters stay whole.
    pub(crate) fn shard(&mut self, rank: u32, world: u32) -> Result<()> {
        if self.is_sharded() {
            return Ok(());
        }
        let mut shards = Vec::with_capacity(self.base.len());
        for p in &mut self.base {
            let whole = p.tensor.size();
            let r = rows_of(whole[0], rank, world);
            let shard = tch::no_grad(|| p.tensor.narrow(0, r.start, r.len).copy());
            p.tensor = shard.set_requires_grad(self.lora.is_none());
            shards.push(Shard { rows: r, whole });
        }
        self.layers.clear();
        self.embed = Tensor::new();
        self.norm = Tensor::new();
        self.lm_head = None;
        self.shards = Some(shards);
        Ok(())
    }

    /// Whether the weights are sharded over the ranks (`--sharding full`).
    pub fn is_sharded(&self) -> bool {
        self.shards.is_some()
    }

    /// The rows of base weight `i` this rank holds, when the weights are sharded.
    pub(crate) fn shard_rows(&self, i: usize) -> Option<Rows> {
        self.shards.as_ref().map(|s| s[i].rows)
    }

    /// The rows of trainable weight `i` ([`Model::trainable`]) this rank holds, when they are
    /// sharded: full-parameter sharded training; LoRA adapters are whole.
    pub(crate) fn trainable_rows(&self, i: usize) -> Option<Rows> {
        if self.lora.is_some() {
            return None;
        }
        self.shard_rows(i)
    }

    /// Whether the sharded pass hands back gradients already summed over the ranks and cut to this
    /// rank's rows (full-parameter sharded training); else the step sums them.
    pub(crate) fn gradients_come_reduced(&self) -> bool {
        self.is_sharded() && self.lora.is_none()
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
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        let rope = self.rope(ids);
        let mut h = self.embed_tokens(ids);
        for layer in &self.layers {
            h = layer.forward(&h, &rope, &self.config, train);
        }
        self.logits(&h)
    }

    /// The RoPE tables and compute dtype for a batch of ids `[batch, seq]`.
    fn rope(&self, ids: &Tensor) -> Rope {
        let c = &self.config;
        let (cos, sin) = rope_tables(ids.size()[1], c.head_dim, c.rope_theta, self.device);
        // Mixed precision on CUDA: bf16 matmuls and attention, fp32 norms, residuals and weights.
        Rope {
            cos,
            sin,
            compute: self.compute,
        }
    }

    /// The residual stream's start: the embeddings of `ids`.
    fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        embed_lookup(&self.embed, ids)
    }

    /// The final norm and the LM head over the residual stream.
    fn logits(&self, h: &Tensor) -> Tensor {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.logits_with(h, &self.norm, head)
    }

    /// [`Model::logits`] with the given final norm and head weights.
    fn logits_with(&self, h: &Tensor, norm: &Tensor, head: &Tensor) -> Tensor {
        let h = rms_norm(h, norm, self.config.rms_norm_eps);
        match self.compute {
            None if head.kind() != h.kind() => h.linear::<Tensor>(&head.to_kind(h.kind()), None),
            None => h.linear::<Tensor>(head, None),
            Some(k) => h.to_kind(k).linear::<Tensor>(&head.to_kind(k), None),
        }
    }
}

/// The rows of `embedding` for `ids`, in fp32 whatever dtype the embedding is held in (as mixed
/// precision keeps the residual stream).
fn embed_lookup(embedding: &Tensor, ids: &Tensor) -> Tensor {
    let h = Tensor::embedding(embedding, ids, -1, false, false);
    if h.kind() == Kind::Float {
        h
    } else {
        h.to_kind(Kind::Float)
    }
}

/// What every decoder layer of one forward pass shares.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The matmul dtype (bf16 on CUDA, as autocast would), else the weights' own.
    compute: Option<Kind>,
}

impl Layer {
    /// Decoder layer `l` over the weights `get` gives by HF name, with the LoRA adapters `lora`
    /// gives by projection (`model.layers.0.self_attn.q_proj`).
    fn from_weights(
        config: &ModelConfig,
        l: i64,
        get: &dyn Fn(&str) -> Tensor,
        lora: &dyn Fn(&str) -> Option<Lora>,
    ) -> Self {
        let p = format!("model.layers.{l}");
        let linear = |prefix: &str, bias: bool| Linear {
            weight: get(&format!("{prefix}.weight")),
            bias: bias.then(|| get(&format!("{prefix}.bias"))),
            lora: lora(prefix),
        };
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
    }

    /// The layer's output for its input `h` `[batch, seq, hidden]`.
    // `h = h + …`, not `h += …`: an in-place add would overwrite what the norms saved for backward.
    #[allow(clippy::assign_op_pattern)]
    fn forward(&self, h: &Tensor, rope: &Rope, c: &ModelConfig, train: bool) -> Tensor {
        let (b, t) = (h.size()[0], h.size()[1]);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let ac = rope.compute;
        let x = rms_norm(h, &self.input_norm, c.rms_norm_eps);
        let mut q = self.q.forward(&x, train, ac).view([b, t, nh, hd]);
        let mut k = self.k.forward(&x, train, ac).view([b, t, nkv, hd]);
        let v = self.v.forward(&x, train, ac).view([b, t, nkv, hd]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm(&q, qn, c.rms_norm_eps);
            k = rms_norm(&k, kn, c.rms_norm_eps);
        }
        let q = apply_rope(&q.transpose(1, 2), &rope.cos, &rope.sin);
        let k = apply_rope(&k.transpose(1, 2), &rope.cos, &rope.sin);
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
        let h = h + self.o.forward(&a, train, ac);
        let x = rms_norm(&h, &self.post_norm, c.rms_norm_eps);
        let m = self.gate.forward(&x, train, ac).silu() * self.up.forward(&x, train, ac);
        h + self.down.forward(&m, train, ac)
    }
}

/// The weight files of an HF directory and, for a sharded one, which file holds each tensor.
struct WeightFiles {
    /// The files, in a fixed order (sorted).
    files: Vec<std::path::PathBuf>,
    /// `model.safetensors.index.json` and its `weight_map` (tensor name → file name), when sharded.
    index: Option<(std::path::PathBuf, BTreeMap<String, String>)>,
}

impl WeightFiles {
    /// Fails unless the index assigns `name` to `file` (the one that holds it): a tensor in a shard
    /// the index does not name for it would silently replace, or be replaced by, the one it names.
    fn check_holder(&self, name: &str, file: &Path) -> Result<()> {
        let Some((index, map)) = &self.index else {
            return Ok(());
        };
        let here = file
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        match map.get(name) {
            Some(assigned) if assigned == here => Ok(()),
            Some(assigned) => bail!(
                "tensor {name} is in {here} although the weight_map of {} assigns it to \
                 {assigned}; remove the copy, or fix the weight_map",
                index.display()
            ),
            None => bail!(
                "{} holds tensor {name}, which the weight_map of {} does not list; add it to the \
                 weight_map, or remove it",
                file.display(),
                index.display()
            ),
        }
    }

    /// Fails if a tensor of the index was not in the file the index names for it.
    fn check_all_found(&self, params: &BTreeMap<String, Tensor>) -> Result<()> {
        let Some((index, map)) = &self.index else {
            return Ok(());
        };
        for (name, file) in map {
            ensure!(
                params.contains_key(name),
                "{}: the weight_map assigns tensor {name} to {file}, but {file} does not hold it",
                index.display()
            );
        }
        Ok(())
    }
}

/// The weight files of an HF directory: `model.safetensors`, or the shards its index names.
fn weight_files(dir: &Path) -> Result<WeightFiles> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(WeightFiles {
            files: vec![single],
            index: None,
        });
    }
    let index = dir.join("model.safetensors.index.json");
    let raw: Value = serde_json::from_slice(&std::fs::read(&index).with_context(|| {
        format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?)
    .with_context(|| format!("parsing {}", index.display()))?;
    let entries = raw["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut map = BTreeMap::new();
    for (name, file) in entries {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: the weight_map entry of {name} is not a file name",
                index.display()
            )
        })?;
        ensure!(
            !file.is_empty() && !file.contains('/') && !file.contains(".."),
            "{}: bad file name {file:?}",
            index.display()
        );
        map.insert(name.clone(), file.to_string());
    }
    let mut files: Vec<String> = map.values().cloned().collect();
    files.sort();
    files.dedup();
    Ok(WeightFiles {
        files: files.into_iter().map(|f| dir.join(f)).collect(),
        index: Some((index, map)),
    })
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
pub(crate) mod tests {
    use super::*;

    /// libtorch's generator is global to the process: tests that seed it take turns.
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

    pub(crate) fn seeded() -> std::sync::MutexGuard<'static, ()> {
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

    const SHARDS: [&str; 2] = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];

    /// Writes the tiny model as an HF directory with its weights over two shards, each tensor in the
    /// shards `placement` gives (none, one or both), and returns a weight map that assigns each to the
    /// first of them.
    fn write_sharded(
        dir: &Path,
        placement: impl Fn(&str) -> &'static [usize],
    ) -> serde_json::Map<String, Value> {
        let config = ModelConfig::tiny();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec(&config.raw).unwrap(),
        )
        .unwrap();
        let model = Model::init(config, 5, Device::Cpu).unwrap();
        let blobs: Vec<(String, Vec<usize>, Vec<u8>)> = model
            .base()
            .iter()
            .map(|p| {
                let shape = p.tensor.size().iter().map(|&d| d as usize).collect();
                let values = Vec::<f32>::try_from(p.tensor.detach().flatten(0, -1)).unwrap();
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (p.name.clone(), shape, bytes)
            })
            .collect();
        let mut map = serde_json::Map::new();
        for (name, _, _) in &blobs {
            if let Some(&first) = placement(name).first() {
                map.insert(name.clone(), Value::from(SHARDS[first]));
            }
        }
        for (k, file) in SHARDS.iter().enumerate() {
            let views: Vec<(String, safetensors::tensor::TensorView)> = blobs
                .iter()
                .filter(|(name, _, _)| placement(name).contains(&k))
                .map(|(name, shape, bytes)| {
                    let view = safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        bytes,
                    )
                    .unwrap();
                    (name.clone(), view)
                })
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
        }
        map
    }

    fn write_index(dir: &Path, map: &serde_json::Map<String, Value>) {
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    fn load_error(dir: &Path) -> String {
        match Model::load_hf_dir(dir, Device::Cpu, None, Kind::Float) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn sharded_weights_load_from_the_shard_the_weight_map_names() {
        let _turn = seeded();
        const EMBED: &str = "model.embed_tokens.weight";
        const NORM: &str = "model.norm.weight";
        let split = |name: &str| -> &'static [usize] {
            if name == EMBED || name.starts_with("model.layers.0.") {
                &[0]
            } else {
                &[1]
            }
        };

        // A well-formed sharded directory loads.
        let dir = tempfile::tempdir().unwrap();
        write_index(dir.path(), &write_sharded(dir.path(), split));
        Model::load_hf_dir(dir.path(), Device::Cpu, None, Kind::Float).unwrap();

        // A copy of a tensor in a later shard that the map does not assign it to (it used to win
        // silently): refused, naming the tensor and both files.
        let dir = tempfile::tempdir().unwrap();
        let map = write_sharded(dir.path(), |n| if n == EMBED { &[0, 1] } else { split(n) });
        write_index(dir.path(), &map);
        let err = load_error(dir.path());
        assert!(
            err.contains(&format!("tensor {EMBED} is in {}", SHARDS[1]))
                && err.contains(&format!("assigns it to {}", SHARDS[0])),
            "{err}"
        );

        // A tensor the map assigns to a shard that does not hold it.
        let dir = tempfile::tempdir().unwrap();
        let mut map = write_sharded(dir.path(), |n| if n == NORM { &[] } else { split(n) });
        map.insert(NORM.into(), SHARDS[0].into());
        write_index(dir.path(), &map);
        let err = load_error(dir.path());
        assert!(
            err.contains(&format!(
                "assigns tensor {NORM} to {0}, but {0} does not hold it",
                SHARDS[0]
            )),
            "{err}"
        );

        // A tensor in a shard that the map does not list at all.
        let dir = tempfile::tempdir().unwrap();
        let mut map = write_sharded(dir.path(), split);
        map.remove(NORM);
        write_index(dir.path(), &map);
        let err = load_error(dir.path());
        assert!(
            err.contains(&format!("holds tensor {NORM}, which the weight_map")),
            "{err}"
        );
    }

    /// The frozen base held in bf16 (as on CUDA): half the bytes, the adapters still fp32 and
    /// trained, the logits those of the bf16-rounded base.
    #[test]
    fn a_lora_base_held_in_bf16_trains_the_fp32_adapters() {
        let _turn = seeded();
        let mut model = Model::init(ModelConfig::tiny(), 1, Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        let rounded: BTreeMap<String, Tensor> = model
            .base()
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.tensor
                        .detach()
                        .to_kind(Kind::BFloat16)
                        .to_kind(Kind::Float),
                )
            })
            .collect();
        let want = Model::assemble(ModelConfig::tiny(), rounded, Device::Cpu)
            .unwrap()
            .forward(&ids, false);
        model.hold_base_in(Kind::BFloat16);
        assert!(model
            .base()
            .iter()
            .all(|p| p.tensor.kind() == Kind::BFloat16));
        model
            .add_lora(
                LoraConfig {
                    rank: 2,
                    alpha: 4.0,
                    dropout: 0.0,
                    targets: vec!["v_proj".into()],
                },
                3,
            )
            .unwrap();
        assert!(model
            .trainable()
            .iter()
            .all(|p| p.tensor.kind() == Kind::Float));
        let got = model.forward(&ids, false);
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{diff}");
        let loss = got.sum(Kind::Float);
        let inputs: Vec<&Tensor> = model.trainable().iter().map(|p| &p.tensor).collect();
        let grads = Tensor::run_backward(&[loss], &inputs, false, false);
        assert!(grads.iter().all(|g| g.defined()));
    }

    /// Loaded sharded, each rank holds exactly its rows of every weight of the full load, read
    /// from weights spread over two files.
    #[test]
    fn a_sharded_load_holds_the_rows_of_the_full_one() {
        let _turn = seeded();
        let dir = tempfile::tempdir().unwrap();
        let split = |name: &str| -> &'static [usize] {
            if name.starts_with("model.layers.1.") {
                &[1]
            } else {
                &[0]
            }
        };
        write_index(dir.path(), &write_sharded(dir.path(), split));
        let (full, sha) = Model::load_hf_dir(dir.path(), Device::Cpu, None, Kind::Float).unwrap();
        for world in [2u32, 3] {
            for rank in 0..world {
                let (part, part_sha) =
                    Model::load_hf_dir(dir.path(), Device::Cpu, Some((rank, world)), Kind::Float)
                        .unwrap();
                assert_eq!(part_sha, sha);
                assert!(part.is_sharded());
                for (i, (w, p)) in full.base().iter().zip(part.base()).enumerate() {
                    let r = part.shard_rows(i).unwrap();
                    assert_eq!(r, rows_of(w.tensor.size()[0], rank, world));
                    assert!(
                        p.tensor.equal(&w.tensor.narrow(0, r.start, r.len)),
                        "{}",
                        w.name
                    );
                }
            }
        }
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
