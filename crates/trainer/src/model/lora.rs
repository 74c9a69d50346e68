//! LoRA on the model: the base frozen (held in bf16 on CUDA), adapters added to the targeted
//! projections and initialised as `peft` does (A Kaiming-uniform, B zero).

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use waypoint_config::{LoraConfig, LORA_TARGETS};

use crate::model::{Model, Param};

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

impl Model {
    /// Holds the frozen base in `kind` (bf16 under LoRA on CUDA: the stored dtype of the models
    /// people adapt, with no fp32 copy). Call before the adapters are added.
    pub(crate) fn hold_base_in(&mut self, kind: Kind) {
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
        let head = ("lm_head", self.config.unembedding_shape());
        for (target, (out, inp)) in self.config.projection_shapes().into_iter().chain([head]) {
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
        // The unembedding's, once (drawn after every layer's).
        if lora.targets.iter().any(|t| t == "lm_head") {
            let (out, inp) = self.config.unembedding_shape();
            let bound = 1.0 / (inp as f64).sqrt();
            let a =
                (Tensor::rand([lora.rank, inp], (Kind::Float, self.device)) * 2.0 - 1.0) * bound;
            let b = Tensor::zeros([out, lora.rank], (Kind::Float, self.device));
            adapters.push(Param {
                name: "lm_head.lora_A.weight".into(),
                tensor: a.set_requires_grad(true),
            });
            adapters.push(Param {
                name: "lm_head.lora_B.weight".into(),
                tensor: b.set_requires_grad(true),
            });
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
}
