//! The service-mode trainer's model (`waypoint serve`): a LoRA training client that a remote loop
//! drives one call at a time — `forward_backward` accumulates the gradients of a loss over the
//! datums it is given, `optim_step` applies them with the Adam parameters the call carries —
//! instead of the batch loop's fused step. Same model code, LoRA and AdamW as `waypoint train`.
//!
//! Its interface holds no libtorch types (tokens, weights and log-probs are plain vectors): the
//! HTTP side (`waypoint-serve`) never sees a tensor. Every call runs behind the libtorch
//! boundary, so a libtorch error comes back as an error, never a panic.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use waypoint_config::LoraConfig;

use crate::model::lora::frozen_base_kind;
use crate::model::Model;
use crate::optim::{clip_grad_norm, gradients, AdamW, AdamWConfig};
use crate::step::libtorch_boundary;

/// Which projections a LoRA client trains, as the Tinker SDK's `LoraConfig` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraSpec {
    /// Rank r.
    pub rank: i64,
    /// The attention projections (q, k, v, o).
    pub attn: bool,
    /// The MLP projections (gate, up, down).
    pub mlp: bool,
    /// The unembedding (`lm_head`).
    pub unembed: bool,
    /// The seed of the adapters' initialisation.
    pub seed: i64,
}

impl LoraSpec {
    /// The adapters' configuration: alpha = r (a scale of 1), no dropout.
    fn config(&self) -> LoraConfig {
        let attn = ["q_proj", "k_proj", "v_proj", "o_proj"];
        let mlp = ["gate_proj", "up_proj", "down_proj"];
        let targets = attn
            .iter()
            .filter(|_| self.attn)
            .chain(mlp.iter().filter(|_| self.mlp))
            .chain(["lm_head"].iter().filter(|_| self.unembed))
            .map(|t| t.to_string())
            .collect();
        LoraConfig {
            rank: self.rank,
            alpha: self.rank as f64,
            dropout: 0.0,
            targets,
        }
    }
}

/// One sequence of a `forward`/`forward_backward` call: position i of `tokens` predicts
/// `targets[i]`, whose log-prob counts with `weights[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    /// The model's input.
    pub tokens: Vec<i64>,
    /// The token each position should predict.
    pub targets: Vec<i64>,
    /// Each position's weight in the loss.
    pub weights: Vec<f32>,
}

/// What a `forward`/`forward_backward` call gives back.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Each datum's target log-probs under the model as it was before the call.
    pub logprobs: Vec<Vec<f32>>,
    /// The loss: the sum over datums and positions of `-logprob × weight`.
    pub loss_sum: f64,
}

/// The Adam parameters of one `optim_step` (decoupled weight decay, as `torch.optim.AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    /// Learning rate.
    pub learning_rate: f64,
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the gradients' global L2 norm to this (0: no clipping).
    pub grad_clip_norm: f64,
}

/// What an `optim_step` did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stepped {
    /// The gradients' global L2 norm before clipping (0 when there were none).
    pub grad_norm: f64,
    /// Optimizer steps taken so far.
    pub steps: u64,
}

/// A LoRA model being trained by calls.
pub struct TrainingModel {
    model: Model,
    opt: AdamW,
    /// The gradients accumulated since the last `optim_step`.
    grads: Option<Vec<Tensor>>,
    steps: u64,
    /// Tokens the model knows (`vocab_size`).
    vocab: i64,
}

impl TrainingModel {
    /// Loads the base model of the Hugging Face directory `dir` (on CUDA when there is one, else
    /// the CPU) and adds LoRA adapters as `spec` asks.
    pub fn lora(dir: &Path, spec: LoraSpec) -> Result<Self> {
        ensure!(
            spec.rank > 0,
            "the LoRA rank must be positive, not {}",
            spec.rank
        );
        ensure!(
            spec.attn || spec.mlp || spec.unembed,
            "a LoRA client must train something: train_attn, train_mlp or train_unembed"
        );
        let device = Device::cuda_if_available();
        libtorch_boundary("loading the base model", || {
            let (mut model, _) = Model::load_hf_dir(dir, device, None, frozen_base_kind(device))
                .with_context(|| format!("loading the base model in {}", dir.display()))?;
            model.add_lora(spec.config(), spec.seed)?;
            let opt = AdamW::new(
                AdamWConfig {
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-12,
                    weight_decay: 0.0,
                },
                model.trainable(),
            );
            let vocab = model.config.vocab_size;
            Ok(Self {
                model,
                opt,
                grads: None,
                steps: 0,
                vocab,
            })
        })
    }

    /// The LoRA rank.
    pub fn lora_rank(&self) -> i64 {
        self.model.lora.as_ref().map_or(0, |l| l.rank)
    }

    /// Whether `data` fits this model (one target and weight a token, tokens in the vocabulary):
    /// the error names the datum and what is wrong.
    pub fn check(&self, data: &[Datum]) -> Result<()> {
        ensure!(!data.is_empty(), "no datums");
        data.iter()
            .enumerate()
            .try_for_each(|(i, d)| check_datum(i, d, self.vocab))
    }

    /// Each datum's target log-probs and the weighted loss; with `backward`, the loss's gradients
    /// are added to those accumulated for the next [`TrainingModel::optim_step`].
    pub fn forward(&mut self, data: &[Datum], backward: bool) -> Result<Forward> {
        self.check(data)?;
        libtorch_boundary("forward_backward", || {
            let mut logprobs = Vec::with_capacity(data.len());
            let mut loss_sum = 0.0;
            let device = self.model.device();
            for d in data {
                let n = d.tokens.len() as i64;
                let ids = Tensor::from_slice(&d.tokens).view([1, n]).to_device(device);
                let targets = Tensor::from_slice(&d.targets)
                    .view([1, n, 1])
                    .to_device(device);
                let weights = Tensor::from_slice(&d.weights).to_device(device);
                let run = || {
                    let logits = self.model.forward(&ids, backward);
                    logits
                        .to_kind(Kind::Float)
                        .log_softmax(-1, Kind::Float)
                        .gather(-1, &targets, false)
                        .view([n])
                };
                let lp = if backward { run() } else { tch::no_grad(run) };
                let loss = -(&lp * &weights).sum(Kind::Float);
                loss_sum += loss.double_value(&[]);
                if backward {
                    let params = self.model.trainable();
                    self.grads = Some(gradients(&loss, params, self.grads.take()));
                }
                logprobs.push(Vec::<f32>::try_from(lp.detach().to_device(Device::Cpu))?);
            }
            Ok(Forward { logprobs, loss_sum })
        })
    }

    /// Applies the accumulated gradients with `p` and clears them (without gradients, nothing
    /// changes but the count).
    pub fn optim_step(&mut self, p: AdamParams) -> Result<Stepped> {
        ensure!(
            p.learning_rate >= 0.0 && p.learning_rate.is_finite(),
            "learning_rate must be a finite number ≥ 0, not {}",
            p.learning_rate
        );
        ensure!(
            (0.0..1.0).contains(&p.beta1) && (0.0..1.0).contains(&p.beta2),
            "beta1 and beta2 must be in [0, 1), not {} and {}",
            p.beta1,
            p.beta2
        );
        ensure!(p.eps > 0.0, "eps must be positive, not {}", p.eps);
        libtorch_boundary("optim_step", || {
            self.opt.reconfigure(AdamWConfig {
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                weight_decay: p.weight_decay,
            });
            let mut grad_norm = 0.0;
            if let Some(mut grads) = self.grads.take() {
                grad_norm = clip_grad_norm(&mut grads, p.grad_clip_norm);
                self.opt
                    .step(self.model.trainable(), &grads, p.learning_rate);
            }
            self.steps += 1;
            Ok(Stepped {
                grad_norm,
                steps: self.steps,
            })
        })
    }
}

/// A datum's shape and tokens are checked before libtorch sees them: a clear error naming the
/// datum, never a libtorch message (or an out-of-bounds gather).
fn check_datum(i: usize, d: &Datum, vocab: i64) -> Result<()> {
    let n = d.tokens.len();
    ensure!(n > 0, "datum {i}: model_input is empty");
    ensure!(
        d.targets.len() == n && d.weights.len() == n,
        "datum {i}: target_tokens has {} positions and weights {}, model_input {n}: each must \
         have one per input token",
        d.targets.len(),
        d.weights.len()
    );
    let bad = d
        .tokens
        .iter()
        .chain(&d.targets)
        .find(|&&t| t < 0 || t >= vocab);
    if let Some(t) = bad {
        anyhow::bail!("datum {i}: token {t} is outside the model's vocabulary (0..{vocab})");
    }
    ensure!(
        d.weights.iter().all(|w| w.is_finite()),
        "datum {i}: weights must be finite numbers"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datum_is_checked_before_libtorch_sees_it() {
        let ok = Datum {
            tokens: vec![1, 2],
            targets: vec![2, 3],
            weights: vec![1.0, 1.0],
        };
        assert!(check_datum(0, &ok, 10).is_ok());
        let short = Datum {
            weights: vec![1.0],
            ..ok.clone()
        };
        let err = check_datum(3, &short, 10).unwrap_err().to_string();
        assert!(
            err.contains("datum 3") && err.contains("weights 1"),
            "{err}"
        );
        let outside = Datum {
            targets: vec![2, 10],
            ..ok.clone()
        };
        let err = check_datum(0, &outside, 10).unwrap_err().to_string();
        assert!(err.contains("token 10 is outside"), "{err}");
        let empty = Datum {
            tokens: vec![],
            targets: vec![],
            weights: vec![],
        };
        assert!(check_datum(0, &empty, 10).is_err());
    }

    #[test]
    fn the_lora_spec_names_the_projections_it_trains() {
        let spec = LoraSpec {
            rank: 4,
            attn: false,
            mlp: true,
            unembed: true,
            seed: 0,
        };
        let c = spec.config();
        assert_eq!(c.targets, ["gate_proj", "up_proj", "down_proj", "lm_head"]);
        assert_eq!((c.rank, c.alpha, c.dropout), (4, 4.0, 0.0));
    }
}
