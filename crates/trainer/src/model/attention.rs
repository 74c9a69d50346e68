//! Self-attention's parts that are not projections: rotary position embeddings (RoPE) and the
//! scaled dot-product attention itself (causal, grouped-query when there are fewer key/value heads).

use tch::{Device, Kind, Tensor};

/// What every decoder layer of one forward pass shares.
pub(crate) struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// The matmul dtype (bf16 on CUDA, as autocast would), else the weights' own.
    pub(crate) compute: Option<Kind>,
    /// Whether the LoRA adapters take part (off: the base model, DPO's reference).
    pub(crate) adapters: bool,
    /// Which keys each query sees (`[batch, 1, queries, keys]`, true: seen), for rows padded on
    /// the left (see `Model::forward_padded`); `None`: causal over every key.
    pub(crate) mask: Option<Tensor>,
}

/// cos and sin tables `[seq, head_dim]` for positions `0..seq`.
pub(crate) fn rope_tables(seq: i64, head_dim: i64, theta: f64, device: Device) -> (Tensor, Tensor) {
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

/// `x * cos + rotate_half(x) * sin` over `[batch, heads, seq, head_dim]` (the tables `[seq,
/// head_dim]`, or `[batch, 1, seq, head_dim]` for rows at positions of their own).
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], -1);
    x * cos.to_kind(x.kind()) + rotated * sin.to_kind(x.kind())
}
