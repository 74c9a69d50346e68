//! A decoder layer as transformers computes it: RMSNorm, attention with q/k/v/o projections (q/k
//! norms on Qwen3), RMSNorm, the SwiGLU MLP, each with its residual; and the embedding lookup.

use tch::{Kind, Tensor};

use crate::model::attention::{apply_rope, Rope};
use crate::model::config::ModelConfig;
use crate::model::linear::{Linear, Lora};

pub(crate) struct Layer {
    pub(crate) input_norm: Tensor,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) q_norm: Option<Tensor>,
    pub(crate) k_norm: Option<Tensor>,
    pub(crate) post_norm: Tensor,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

impl Layer {
    /// Decoder layer `l` over the weights `get` gives by HF name, with the LoRA adapters `lora`
    /// gives by projection (`model.layers.0.self_attn.q_proj`).
    pub(crate) fn from_weights(
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
    pub(crate) fn forward(&self, h: &Tensor, rope: &Rope, c: &ModelConfig, train: bool) -> Tensor {
        self.forward_with(h, rope, c, train, None)
    }

    /// [`Layer::forward`] with a cache of the keys and values of the positions before `h`'s
    /// (`[batch, kv heads, past, head_dim]` each), which it extends: `rope` holds the tables of
    /// `h`'s positions. With a past, `h` is one position (a decoding step: it sees every key).
    #[allow(clippy::assign_op_pattern)]
    pub(crate) fn forward_with(
        &self,
        h: &Tensor,
        rope: &Rope,
        c: &ModelConfig,
        train: bool,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (b, t) = (h.size()[0], h.size()[1]);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (ac, on) = (rope.compute, rope.adapters);
        let x = rms_norm(h, &self.input_norm, c.rms_norm_eps);
        let mut q = self.q.forward(&x, train, ac, on).view([b, t, nh, hd]);
        let mut k = self.k.forward(&x, train, ac, on).view([b, t, nkv, hd]);
        let v = self.v.forward(&x, train, ac, on).view([b, t, nkv, hd]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm(&q, qn, c.rms_norm_eps);
            k = rms_norm(&k, kn, c.rms_norm_eps);
        }
        let q = apply_rope(&q.transpose(1, 2), &rope.cos, &rope.sin);
        let k = apply_rope(&k.transpose(1, 2), &rope.cos, &rope.sin);
        let v = v.transpose(1, 2);
        let (k, v, causal) = match cache {
            None => (k, v, true),
            Some(cache) => {
                let (k, v) = match cache.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
                    None => (k, v),
                };
                *cache = Some((k.shallow_clone(), v.shallow_clone()));
                // A prompt (no past) attends causally; one new position sees every key.
                (k, v, t > 1)
            }
        };
        // Rows padded on the left see the keys their mask gives (causal over their own tokens).
        // With a mask on CUDA, each key/value head is repeated for its queries' heads: CUDA's
        // memory-efficient kernel takes a mask but not grouped-query attention (the CPU's takes
        // both).
        let repeat = rope.mask.is_some() && nkv != nh && q.device().is_cuda();
        let grouped = nkv != nh && !repeat;
        let (k, v) = match repeat {
            true => (
                k.repeat_interleave_self_int(nh / nkv, 1, None),
                v.repeat_interleave_self_int(nh / nkv, 1, None),
            ),
            false => (k, v),
        };
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            rope.mask.as_ref(),
            0.0,
            causal && rope.mask.is_none(),
            None,
            grouped,
        );
        let a = a.transpose(1, 2).reshape([b, t, nh * hd]);
        let h = h + self.o.forward(&a, train, ac, on);
        let x = rms_norm(&h, &self.post_norm, c.rms_norm_eps);
        let m = self.gate.forward(&x, train, ac, on).silu() * self.up.forward(&x, train, ac, on);
        h + self.down.forward(&m, train, ac, on)
    }
}

/// The rows of `embedding` for `ids`, in fp32 whatever dtype the embedding is held in (as mixed
/// precision keeps the residual stream).
pub(crate) fn embed_lookup(embedding: &Tensor, ids: &Tensor) -> Tensor {
    let h = Tensor::embedding(embedding, ids, -1, false, false);
    if h.kind() == Kind::Float {
        h
    } else {
        h.to_kind(Kind::Float)
    }
}

/// HF's RMSNorm: normalise in fp32, scale by the weight.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = xf * (var + eps).rsqrt();
    weight * normed.to_kind(kind)
}
