//! A projection: its weight and bias, and the LoRA adapter on it when it has one (`lora_A`
//! `[r, in]`, `lora_B` `[out, r]`, scaled by alpha / r, with dropout on its input while training).

use tch::{Kind, Tensor};

pub(crate) struct Lora {
    pub(crate) a: Tensor,
    pub(crate) b: Tensor,
    pub(crate) scale: f64,
    pub(crate) dropout: f64,
}

pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) lora: Option<Lora>,
}

impl Linear {
    /// `compute`: the matmul dtype (bf16 on CUDA, as autocast would), else the weights' own;
    /// `adapters` off leaves the LoRA adapter out (the base projection alone).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        train: bool,
        compute: Option<Kind>,
        adapters: bool,
    ) -> Tensor {
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
            Some(_) if !adapters => y,
            Some(l) => y + l.delta(x, train, compute),
        }
    }
}

impl Lora {
    /// What the adapter adds to its projection's output for input `x`: `scale · B(A(dropout(x)))`
    /// (dropout only with `train`), in the `compute` dtype when there is one.
    pub(crate) fn delta(&self, x: &Tensor, train: bool, compute: Option<Kind>) -> Tensor {
        let x = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let (x, a, b) = match compute {
            None => (x, self.a.shallow_clone(), self.b.shallow_clone()),
            Some(k) => (x.to_kind(k), self.a.to_kind(k), self.b.to_kind(k)),
        };
        x.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * self.scale
    }
}
