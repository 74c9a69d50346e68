//! A Llama-family causal LM in libtorch: Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm), with
//! grouped-query attention, RoPE and tied or untied embeddings — the same computation as Hugging Face
//! transformers' implementations, under the same parameter names, so an HF directory loads as it is and
//! the weights save back as one.
//!
//! The parts, as candle's `llama.rs` reads: [`config`] (the architecture from `config.json`),
//! [`linear`] (a projection with its LoRA adapter), [`attention`] (RoPE and attention),
//! [`layers`] (a decoder layer), this file (the [`Model`]: its parameters and the forward pass),
//! [`load`] (from an HF directory), [`lora`] (adapters on a frozen base), and two other ways of
//! running it: [`recompute`] (activation checkpointing) and [`sharded`] (over weights sharded by
//! rows). The last four extend [`Model`]; nothing here imports them.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use waypoint_config::LoraConfig;

use crate::model::attention::{rope_tables, Rope};
use crate::model::layers::{embed_lookup, rms_norm, Layer};
use crate::model::linear::Lora;
use crate::shard::{rows_of, Rows};

pub(crate) mod attention;
pub mod config;
pub(crate) mod layers;
pub(crate) mod linear;
pub mod load;
pub mod lora;
mod recompute;
mod sharded;

pub use config::{
    ModelConfig, MAX_HEADS, MAX_HEAD_DIM, MAX_LAYERS, MAX_PARAMETERS, MAX_VOCAB, MAX_WIDTH,
};

/// The keys and values of the positions decoded so far, a layer each (see
/// [`Model::forward_cached`]).
#[derive(Default)]
pub struct KvCache(Vec<Option<(Tensor, Tensor)>>);

impl KvCache {
    /// The cache of rows `index` (a row may come several times: sequences that go on from the
    /// same positions).
    pub fn rows(&self, index: &[i64]) -> KvCache {
        let device = self.0.iter().flatten().next().map(|(k, _)| k.device());
        let index = Tensor::from_slice(index).to_device(device.unwrap_or(Device::Cpu));
        let rows = |t: &Tensor| t.index_select(0, &index);
        KvCache(
            self.0
                .iter()
                .map(|kv| kv.as_ref().map(|(k, v)| (rows(k), rows(v))))
                .collect(),
        )
    }
}

/// A named trainable or frozen tensor.
pub struct Param {
    /// HF name (`model.layers.0.self_attn.q_proj.weight`, or `….lora_A.weight`).
    pub name: String,
    /// The tensor (a leaf; `requires_grad` when trained).
    pub tensor: Tensor,
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
    /// Whether the LoRA adapters take part in the forward pass (see [`Model::without_adapters`]).
    adapters_on: std::sync::atomic::AtomicBool,
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
            adapters_on: std::sync::atomic::AtomicBool::new(true),
        };
        if !model.is_sharded() {
            model.wire();
        }
        Ok(model)
    }

    /// A model over the same base weights — the same memory, no copy — frozen and without
    /// adapters: each training client of `waypoint serve` adds its own adapters over one base.
    /// The base must never change while shared (only adapters train). Not for a sharded model.
    pub fn sharing_base(&self) -> Result<Self> {
        ensure!(
            !self.is_sharded(),
            "a sharded model's base cannot be shared"
        );
        let hold = self.base.first().map_or(Kind::Float, |p| p.tensor.kind());
        // `detach` aliases the storage with autograd flags of its own.
        let params = self
            .base
            .iter()
            .map(|p| (p.name.clone(), p.tensor.detach()))
            .collect();
        let model = Self::assemble_rows(self.config.clone(), params, None, hold, self.device)?;
        for p in &model.base {
            let _ = p.tensor.set_requires_grad(false);
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
        self.logits(&h, train)
    }

    /// Logits `[batch, t, vocab]` of `ids` `[batch, t]` at positions `past..past + t`, the keys and
    /// values of the positions before in `cache` (one entry a layer, extended here): a prompt
    /// with an empty cache, then one token at a time. No autograd, no dropout; not for a sharded
    /// model.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, past: i64) -> Tensor {
        let rope = self.rope_after(past, ids.size()[1]);
        self.cached(ids, cache, &rope, false)
    }

    /// The tables of `t` places after `past`, every row at the same positions (no mask).
    fn rope_after(&self, past: i64, t: i64) -> Rope {
        let c = &self.config;
        let (cos, sin) = rope_tables(past + t, c.head_dim, c.rope_theta, self.device);
        // Mixed precision on CUDA: bf16 matmuls and attention, fp32 norms, residuals and weights.
        Rope {
            cos: cos.narrow(0, past, t),
            sin: sin.narrow(0, past, t),
            compute: self.compute,
            adapters: self.adapters_on.load(std::sync::atomic::Ordering::Relaxed),
            mask: None,
        }
    }

    /// The logits `[batch, vocab]` of the last place of each row, decoding as
    /// [`Model::forward_cached`] does rows of different lengths, each padded on the left to the
    /// longest: the first `pad[r]` of row r's `past + t` places hold no token (never seen, and
    /// its positions count from its first token), so each row's logits are those it has alone.
    /// (A padded place sees only itself: no query is left without a key. Only the last place
    /// goes through the head: a batch of long prompts needs no `[batch, t, vocab]`.)
    pub fn forward_padded(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        past: i64,
        pad: &[i64],
    ) -> Tensor {
        if pad.iter().all(|&p| p == 0) {
            let rope = self.rope_after(past, ids.size()[1]);
            return self.cached(ids, cache, &rope, true).select(1, 0);
        }
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let c = &self.config;
        let d = self.device;
        let pad = Tensor::from_slice(pad).view([b, 1]).to_device(d);
        // [b, t]: each query's place, and its position in its own row.
        let places = Tensor::arange_start(past, past + t, (Kind::Int64, d)).view([1, t]);
        let positions = (&places - &pad).clamp_min(0);
        let (cos, sin) = rope_tables(past + t, c.head_dim, c.rope_theta, d);
        let table = |x: &Tensor| {
            x.index_select(0, &positions.reshape([-1]))
                .view([b, 1, t, c.head_dim])
        };
        // [b, 1, t, keys]: a key is seen when it holds a token and comes no later, or is the
        // query's own place.
        let keys = Tensor::arange(past + t, (Kind::Int64, d)).view([1, 1, past + t]);
        let queries = places.view([1, t, 1]);
        let real = keys.ge_tensor(&pad.view([b, 1, 1]));
        let mask = (real.logical_and(&keys.le_tensor(&queries)))
            .logical_or(&keys.eq_tensor(&queries))
            .unsqueeze(1);
        let rope = Rope {
            cos: table(&cos),
            sin: table(&sin),
            compute: self.compute,
            adapters: self.adapters_on.load(std::sync::atomic::Ordering::Relaxed),
            mask: Some(mask),
        };
        self.cached(ids, cache, &rope, true).select(1, 0)
    }

    /// The cached forward pass over `ids` with `rope`'s tables (and mask): the logits of every
    /// place, or with `last` of the last one only (`[batch, 1, vocab]`).
    fn cached(&self, ids: &Tensor, cache: &mut KvCache, rope: &Rope, last: bool) -> Tensor {
        let c = &self.config;
        tch::no_grad(|| {
            let mut h = self.embed_tokens(ids);
            cache.0.resize_with(self.layers.len(), || None);
            for (layer, kv) in self.layers.iter().zip(cache.0.iter_mut()) {
                h = layer.forward_with(&h, rope, c, false, Some(kv));
            }
            if last {
                h = h.narrow(1, h.size()[1] - 1, 1);
            }
            self.logits(&h, false)
        })
    }

    /// Runs `work` with the LoRA adapters left out of every forward pass: the base model, DPO's
    /// reference. (Without adapters, `work` runs the model as it is.)
    pub fn without_adapters<T>(&self, work: impl FnOnce() -> T) -> T {
        use std::sync::atomic::Ordering;
        self.adapters_on.store(false, Ordering::Relaxed);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        self.adapters_on.store(true, Ordering::Relaxed);
        out.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// The RoPE tables and compute dtype for a batch of ids `[batch, seq]`.
    fn rope(&self, ids: &Tensor) -> Rope {
        self.rope_after(0, ids.size()[1])
    }

    /// The residual stream's start: the embeddings of `ids`.
    fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        embed_lookup(&self.embed, ids)
    }

    /// The final norm and the LM head over the residual stream (`train`: LoRA dropout on).
    fn logits(&self, h: &Tensor, train: bool) -> Tensor {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.logits_with(h, &self.norm, head, train)
    }

    /// [`Model::logits`] with the given final norm and head weights, and the head's LoRA adapter
    /// when it has one (`lm_head` among the targets; on the head's own projection even when it is
    /// tied to the embedding, as `peft` does).
    fn logits_with(&self, h: &Tensor, norm: &Tensor, head: &Tensor, train: bool) -> Tensor {
        let h = rms_norm(h, norm, self.config.rms_norm_eps);
        let logits = match self.compute {
            None if head.kind() != h.kind() => h.linear::<Tensor>(&head.to_kind(h.kind()), None),
            None => h.linear::<Tensor>(head, None),
            Some(k) => h.to_kind(k).linear::<Tensor>(&head.to_kind(k), None),
        };
        let adapters = self.adapters_on.load(std::sync::atomic::Ordering::Relaxed);
        match self.lora_at("lm_head").filter(|_| adapters) {
            Some(lora) => logits + lora.delta(&h, train, self.compute),
            None => logits,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::Path;

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
    fn decoding_with_the_cache_gives_the_full_forward_passes_logits() {
        let _turn = seeded();
        let model = Model::init(ModelConfig::tiny(), 0, Device::Cpu).unwrap();
        let all = [1i64, 5, 9, 200, 3, 4];
        let full = model.forward(&Tensor::from_slice(&all).view([1, 6]), false);
        let mut cache = KvCache::default();
        let prompt =
            model.forward_cached(&Tensor::from_slice(&all[..3]).view([1, 3]), &mut cache, 0);
        let mut got = vec![prompt];
        for (i, &t) in all.iter().enumerate().skip(3) {
            let one = Tensor::from_slice(&[t]).view([1, 1]);
            got.push(model.forward_cached(&one, &mut cache, i as i64));
        }
        let got = Tensor::cat(&got, 1);
        let diff = (got - full).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "cached decoding differs by {diff}");
    }

    /// Rows of different lengths padded on the left and decoded together get each the logits
    /// they get alone.
    #[test]
    fn rows_padded_on_the_left_decode_as_each_alone() {
        let _turn = seeded();
        let model = Model::init(ModelConfig::tiny(), 0, Device::Cpu).unwrap();
        let rows: [&[i64]; 3] = [&[1, 5, 9, 200], &[7], &[3, 4]];
        let next = [[11i64, 12, 13], [21, 22, 23], [31, 32, 33]];
        let alone: Vec<Tensor> = rows
            .iter()
            .zip(&next)
            .map(|(row, next)| {
                let all: Vec<i64> = row.iter().chain(next).copied().collect();
                model.forward(&Tensor::from_slice(&all).view([1, all.len() as i64]), false)
            })
            .collect();
        let pad = [0i64, 3, 2];
        let ids: Vec<i64> = rows
            .iter()
            .zip(&pad)
            .flat_map(|(row, &p)| std::iter::repeat_n(0, p as usize).chain(row.iter().copied()))
            .collect();
        let mut cache = KvCache::default();
        let prompt =
            model.forward_padded(&Tensor::from_slice(&ids).view([3, 4]), &mut cache, 0, &pad);
        for (r, row) in rows.iter().enumerate() {
            let want = alone[r].get(0).get(row.len() as i64 - 1);
            let diff = (prompt.get(r as i64) - want).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "row {r}'s prompt: {diff}");
        }
        for step in 0..3 {
            let tokens: Vec<i64> = next.iter().map(|n| n[step]).collect();
            let out = model.forward_padded(
                &Tensor::from_slice(&tokens).view([3, 1]),
                &mut cache,
                4 + step as i64,
                &pad,
            );
            for (r, row) in rows.iter().enumerate() {
                let want = alone[r].get(0).get(row.len() as i64 + step as i64);
                let diff = (out.get(r as i64) - want).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "row {r}, step {step}: {diff}");
            }
        }
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

    /// Two LoRA models over one base hold its weights once; each trains its own adapters, and
    /// a step of one leaves the other (and the base) as they were.
    #[test]
    fn models_sharing_a_base_hold_it_once_and_train_their_own_adapters() {
        let _turn = seeded();
        let base = Model::init(ModelConfig::tiny(), 1, Device::Cpu)
            .unwrap()
            .sharing_base()
            .unwrap();
        let lora = |seed| {
            let mut m = base.sharing_base().unwrap();
            let targets = vec!["q_proj".into(), "lm_head".into()];
            m.add_lora(
                LoraConfig {
                    rank: 2,
                    alpha: 2.0,
                    dropout: 0.0,
                    targets,
                },
                seed,
            )
            .unwrap();
            m
        };
        let (one, two) = (lora(3), lora(4));
        for ((b, x), y) in base.base().iter().zip(one.base()).zip(two.base()) {
            assert_eq!(b.tensor.data_ptr(), x.tensor.data_ptr(), "{}", b.name);
            assert_eq!(b.tensor.data_ptr(), y.tensor.data_ptr(), "{}", b.name);
            assert!(!x.tensor.requires_grad() && !b.tensor.requires_grad());
        }
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        let before = two.forward(&ids, false);
        let weights: Vec<Tensor> = base.base().iter().map(|p| p.tensor.copy()).collect();
        // A step on the first model's adapters (B starts at zero: step it so it counts).
        let loss = one.forward(&ids, true).square().mean(Kind::Float);
        let params = one.trainable();
        let inputs: Vec<&Tensor> = params.iter().map(|p| &p.tensor).collect();
        let grads = Tensor::run_backward(&[loss], &inputs, false, false);
        tch::no_grad(|| {
            for (p, g) in params.iter().zip(&grads) {
                let _ = p.tensor.shallow_clone().g_add_(&(g * -0.1));
            }
        });
        assert!(
            !one.forward(&ids, false).equal(&before),
            "the step changed the first"
        );
        assert!(
            two.forward(&ids, false).equal(&before),
            "the second is as it was"
        );
        for (p, w) in base.base().iter().zip(&weights) {
            assert!(p.tensor.equal(w), "{} changed", p.name);
        }
    }
}
