//! AdamW with explicit state tensors, gradient clipping, and the learning-rate schedule.
//!
//! The state is exactly PyTorch's (`exp_avg`, `exp_avg_sq`, and `step` as a float32 scalar) and the
//! update is `torch.optim.AdamW`'s single-tensor path, so it saves under DCP's `optim.state.<fqn>.*`
//! names and resumes bit for bit. tch exposes neither the fused nor the foreach kernels, so each
//! parameter is updated with in-place ops (on the parameter's device).

use tch::{Kind, Tensor};

use waypoint_config::ScheduleKind;

use crate::model::Param;
use crate::shard::{rows_of, Rows};

/// Hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// The state of one parameter.
pub struct ParamState {
    /// First moment.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
    /// Steps taken (float32 scalar, as PyTorch keeps it).
    pub step: Tensor,
}

/// AdamW over a fixed list of parameters.
pub struct AdamW {
    config: AdamWConfig,
    /// One state per trainable parameter, in the parameters' order.
    pub state: Vec<ParamState>,
    /// With sharded state (`--sharding optimizer`): the rows of each parameter this rank keeps
    /// state for and updates; the state tensors hold only those rows.
    pub(crate) rows: Option<Vec<Rows>>,
}

impl AdamW {
    /// Zero state for `params`, all of it on this rank.
    pub fn new(config: AdamWConfig, params: &[Param]) -> Self {
        Self::with_rows(config, params, None)
    }

    /// Zero state for the rows of `params` that `rank` of `world` owns ([`rows_of`]).
    pub(crate) fn sharded(config: AdamWConfig, params: &[Param], rank: u32, world: u32) -> Self {
        let rows = params
            .iter()
            .map(|p| rows_of(p.tensor.size().first().copied().unwrap_or(1), rank, world))
            .collect();
        Self::with_rows(config, params, Some(rows))
    }

    fn with_rows(config: AdamWConfig, params: &[Param], rows: Option<Vec<Rows>>) -> Self {
        let state = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mine = own_rows(&p.tensor, rows.as_ref().map(|r| r[i]));
                ParamState {
                    exp_avg: mine.zeros_like().detach(),
                    exp_avg_sq: mine.zeros_like().detach(),
                    step: Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
                }
            })
            .collect();
        Self {
            config,
            state,
            rows,
        }
    }

    /// Takes new hyper-parameters for the next steps (the state is kept): a service-mode client
    /// sends them with every step.
    pub fn reconfigure(&mut self, config: AdamWConfig) {
        self.config = config;
    }

    /// One update of every parameter with its gradient (`grads[i]` for `params[i]`), at rate `lr`.
    /// With sharded state only this rank's rows change: gather them afterwards
    /// ([`crate::collective::ranks::Ranks::all_gather_rows`]).
    pub fn step(&mut self, params: &[Param], grads: &[Tensor], lr: f64) {
        let c = &self.config;
        tch::no_grad(|| {
            for (i, ((p, s), g)) in params.iter().zip(&mut self.state).zip(grads).enumerate() {
                if !g.defined() {
                    continue;
                }
                let _ = s.step.g_add_scalar_(1.0);
                let step = s.step.double_value(&[]);
                let rows = self.rows.as_ref().map(|r| r[i]);
                if rows.is_some_and(|r| r.len == 0) {
                    continue;
                }
                let g = &own_rows(g, rows);
                let _ = s.exp_avg.lerp_(g, 1.0 - c.beta1);
                let _ = s
                    .exp_avg_sq
                    .g_mul_scalar_(c.beta2)
                    .addcmul_(g, &(g * (1.0 - c.beta2)));
                let mut w = own_rows(&p.tensor, rows);
                let _ = w.g_mul_scalar_(1.0 - lr * c.weight_decay);
                let bias1 = 1.0 - c.beta1.powf(step);
                let bias2 = 1.0 - c.beta2.powf(step);
                // Few temporaries: the update is memory-bound on CPU.
                let mut denom = s.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bias2.sqrt()).g_add_scalar_(c.eps);
                let _ = w.addcdiv_(&(&s.exp_avg * (-lr / bias1)), &denom);
            }
        });
    }
}

/// The rows of `t` this rank owns (a view), or all of it.
fn own_rows(t: &Tensor, rows: Option<Rows>) -> Tensor {
    match rows {
        Some(r) => t.narrow(0, r.start, r.len),
        None => t.shallow_clone(),
    }
}

/// Gradients of `loss` for `params`, computed as `torch.autograd.grad` does: returned, not
/// accumulated into `.grad`, so nothing has to be zeroed and the first micro-batch's gradients are
/// kept without a copy. With `into`, they are added to earlier micro-batches' gradients.
pub fn gradients(loss: &Tensor, params: &[Param], into: Option<Vec<Tensor>>) -> Vec<Tensor> {
    let inputs: Vec<&Tensor> = params.iter().map(|p| &p.tensor).collect();
    accumulate(into, Tensor::run_backward(&[loss], &inputs, false, false))
}

/// Adds one micro-batch's gradients to the earlier ones' (`into`), or starts with them.
pub fn accumulate(into: Option<Vec<Tensor>>, grads: Vec<Tensor>) -> Vec<Tensor> {
    match into {
        None => grads,
        Some(mut acc) => {
            tch::no_grad(|| {
                for (a, g) in acc.iter_mut().zip(grads) {
                    if !g.defined() {
                        continue;
                    }
                    if a.defined() {
                        let _ = a.g_add_(&g);
                    } else {
                        *a = g;
                    }
                }
            });
            acc
        }
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm` (`max_norm <= 0` only measures).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = grads
            .iter()
            .filter(|g| g.defined())
            .map(|g| g.norm().to_kind(Kind::Float))
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&norms, 0).norm();
        let total_value = total.double_value(&[]);
        if max_norm > 0.0 {
            let coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
            for g in grads.iter_mut().filter(|g| g.defined()) {
                let _ = g.g_mul_(&coef);
            }
        }
        total_value
    })
}

/// The sum of the squared elements of the gradients (of this rank's rows, when sharded).
pub fn squared_norm(grads: &[Tensor]) -> f64 {
    tch::no_grad(|| {
        grads
            .iter()
            .filter(|g| g.defined())
            .map(|g| {
                g.to_kind(Kind::Double)
                    .pow_tensor_scalar(2)
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum()
    })
}

/// Scales gradients whose global L2 norm is `norm` so that it is at most `max_norm` (`max_norm <= 0`
/// only measures), as [`clip_grad_norm`] does once the norm is known. Returns `norm`.
pub fn clip_to_norm(grads: &mut [Tensor], norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        tch::no_grad(|| {
            for g in grads.iter_mut().filter(|g| g.defined()) {
                let _ = g.g_mul_scalar_(coef);
            }
        });
    }
    norm
}

/// The learning-rate schedule: linear warmup, then cosine, linear or constant — transformers'
/// `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` (with a floor of
/// `min_lr_ratio`; 0 is transformers' own) and `get_cosine_with_min_lr_schedule_with_warmup`
/// (`min_lr_rate` = `min_lr_ratio`), step for step and in the same floating-point operations, as
/// a loop that calls `scheduler.step()` after `optimizer.step()` sees them: optimizer step `s + 1`
/// runs at `lr_at(s)`, so the first warmup step runs at 0 (tests/schedule_parity.rs).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// `cosine`, `linear` or `constant`.
    pub kind: ScheduleKind,
    /// The final learning rate as a fraction of the peak (cosine and linear).
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based): a pure function, so resume restores it.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step as f64 / self.warmup_steps.max(1) as f64);
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let floor = self.min_lr_ratio;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                let left = self.total_steps.saturating_sub(step) as f64 / decay_steps;
                (left * (1.0 - floor) + floor).max(0.0)
            }
            ScheduleKind::Cosine => {
                let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (cosine * (1.0 - floor) + floor).max(0.0)
            }
        };
        self.lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn matches_the_closed_form_first_step_and_decays() {
        let w = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        let params = vec![Param {
            name: "w".into(),
            tensor: w.shallow_clone(),
        }];
        let mut opt = AdamW::new(
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            &params,
        );
        let mut grads = gradients(&(&w * &w).sum(Kind::Float), &params, None);
        let norm = clip_grad_norm(&mut grads, 0.0);
        assert!((norm - (4.0f64 + 16.0 + 36.0).sqrt()).abs() < 1e-4);
        opt.step(&params, &grads, 0.01);
        // First step: w * (1 - lr*wd) - lr * sign(g) (up to eps).
        let got: Vec<f32> = Vec::try_from(w.detach()).unwrap();
        for (g, x) in got.iter().zip([1.0f32, -2.0, 3.0]) {
            let expect = x * (1.0 - 0.001) - 0.01 * x.signum();
            assert!((g - expect).abs() < 1e-6, "{g} vs {expect}");
        }
        assert_eq!(opt.state[0].step.double_value(&[]), 1.0);
        assert_eq!(opt.state[0].step.device(), Device::Cpu);

        let s = Schedule {
            lr: 1.0,
            warmup_steps: 2,
            total_steps: 12,
            kind: ScheduleKind::Cosine,
            min_lr_ratio: 0.0,
        };
        // transformers' convention: the first warmup step runs at 0 (tests/schedule_parity.rs
        // holds every step against transformers itself).
        assert_eq!(s.lr_at(0), 0.0);
        assert_eq!(s.lr_at(1), 0.5);
        assert_eq!(s.lr_at(2), 1.0);
        assert!((s.lr_at(7) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(11) < 0.03);
        assert!(ScheduleKind::parse("cosin").is_none());
    }

    #[test]
    fn gradients_accumulate_and_clip_to_the_max_norm() {
        let w = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let params = vec![Param {
            name: "w".into(),
            tensor: w.shallow_clone(),
        }];
        let loss = || (&w * &w).sum(Kind::Float); // grad = (6, 8), norm 10
        let once = gradients(&loss(), &params, None);
        let mut twice = gradients(&loss(), &params, Some(once));
        assert!(!w.grad().defined(), "nothing accumulates into .grad");
        assert!((clip_grad_norm(&mut twice, 1.0) - 20.0).abs() < 1e-4);
        let g: Vec<f32> = Vec::try_from(&twice[0]).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
    }
}
