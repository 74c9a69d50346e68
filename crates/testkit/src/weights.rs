//! Realistic bf16 weights and one AdamW step over them, for the delta tests and bench (shared by path).
#![allow(dead_code)]

/// f32 → bf16 bits, round to nearest even (as PyTorch's `.to(torch.bfloat16)`).
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounding = 0x7fff + ((b >> 16) & 1);
    ((b + rounding) >> 16) as u16
}

/// bf16 bits → f32.
pub fn bf16_value(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `n` weights ~ N(0, 0.02) (the usual initialisation), as bf16 little-endian bytes.
pub fn bf16_weights(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n * 2);
    while out.len() < n * 2 {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        for z in [
            r * (std::f64::consts::TAU * u2).cos(),
            r * (std::f64::consts::TAU * u2).sin(),
        ] {
            if out.len() < n * 2 {
                out.extend_from_slice(&bf16_bits((0.02 * z) as f32).to_le_bytes());
            }
        }
    }
    out
}

/// One AdamW step at learning rate `lr` (weight decay 0.01) from bf16 weights: Adam's first,
/// bias-corrected step moves each weight by `lr * sign(grad)`; gradients have random signs. Computed in
/// f32 and stored back as bf16, as a bf16 model is exported for serving.
pub fn adamw_step_bf16(weights: &[u8], lr: f32, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    weights
        .chunks_exact(2)
        .flat_map(|c| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = bf16_value(u16::from_le_bytes([c[0], c[1]]));
            let sign = if x & 1 == 0 { 1.0 } else { -1.0 };
            let updated = w - lr * sign - lr * 0.01 * w;
            bf16_bits(updated).to_le_bytes()
        })
        .collect()
}
