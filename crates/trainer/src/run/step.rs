//! One optimizer step — forward, backward, gradient sum over the ranks, clipping, AdamW — behind a
//! boundary: tch's methods panic on a libtorch error (a CUDA out-of-memory included), and the
//! boundary turns that panic into an error, so the run ends as `FAILED` with the message and exit 1.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::{Live, Session};
use crate::collective::ranks::Ranks;
use crate::data::{Dataset, IGNORE};
use crate::model::Model;
use crate::run::optim::{accumulate, clip_grad_norm, clip_to_norm, gradients, squared_norm};

impl Session {
    /// Runs optimizer step `self.step + 1`; returns its metrics line, or `None` when the ranks agreed
    /// to stop before it (a signal reached one of them: `signal` is this rank's, 0 for none).
    pub(super) fn step(&mut self, run: &mut Live, signal: usize) -> Result<Option<Value>> {
        let step = self.step + 1;
        libtorch_boundary(&format!("training step {step}"), || {
            self.step_unguarded(run, signal)
        })
    }

    fn step_unguarded(&mut self, run: &mut Live, signal: usize) -> Result<Option<Value>> {
        let cfg = &self.config;
        let started = Instant::now();
        let (rank, world) = (run.ranks.rank() as u64, run.ranks.world() as u64);
        let bs = cfg.batch_size as usize;
        #[cfg(feature = "fault-injection")]
        inject_fault(self.step + 1, run.device);
        let params = run.model.trainable();
        tch::manual_seed(step_seed(cfg.seed, self.step));
        // Rank r takes the r-th slice of each micro-batch of the global batch.
        let micro: Vec<(Tensor, Tensor)> = (0..cfg.gradient_accumulation)
            .map(|a| {
                let start = run.data_consumed + (a * world + rank) * cfg.batch_size;
                run.train.batch(cfg.seed, start, bs, run.device)
            })
            .collect();
        let tokens: i64 = micro
            .iter()
            .map(|(_, l)| l.ne(IGNORE).sum(Kind::Int64).int64_value(&[]))
            .sum();
        // All ranks stop after the same step, whichever of them got the signal.
        let (tokens, stop_now) = run.ranks.agree(tokens, signal != 0)?;
        if stop_now {
            return Ok(None);
        }
        let mut loss_value = 0.0;
        let mut grads: Option<Vec<Tensor>> = None;
        let divisor = tokens.max(1) as f64;
        let vocab = run.model.config.vocab_size;
        for (a, (ids, labels)) in micro.iter().enumerate() {
            // Recomputing passes reseed libtorch's generator per layer from this.
            let seed = step_seed(cfg.seed, self.step).wrapping_add(a as i64 * 7919);
            let loss = if run.model.is_sharded() {
                let (loss, g) = run.model.loss_and_gradients_sharded(
                    ids,
                    seed,
                    true,
                    |logits| loss_of_logits(logits, labels, vocab) / divisor,
                    &mut run.ranks,
                )?;
                grads = Some(accumulate(grads.take(), g));
                loss
            } else if cfg.activation_checkpointing {
                let (loss, g) =
                    run.model
                        .loss_and_gradients_recomputed(ids, seed, true, |logits| {
                            loss_of_logits(logits, labels, vocab) / divisor
                        });
                grads = Some(accumulate(grads.take(), g));
                loss
            } else {
                let loss = loss_of_logits(&run.model.forward(ids, true), labels, vocab) / divisor;
                grads = Some(gradients(&loss, params, grads.take()));
                loss
            };
            loss_value += loss.double_value(&[]);
        }
        let mut grads = grads.context("no micro-batch ran")?;
        let grad_norm = if run.model.gradients_come_reduced() {
            // The gradients are already summed and cut into this rank's rows: only the loss and
            // the squared norm are summed over the ranks.
            run.ranks.all_reduce(&mut [], &mut loss_value)?;
            let mut squares = squared_norm(&grads);
            run.ranks.all_reduce(&mut [], &mut squares)?;
            clip_to_norm(&mut grads, squares.sqrt(), cfg.max_grad_norm)
        } else {
            run.ranks.all_reduce(&mut grads, &mut loss_value)?;
            clip_grad_norm(&mut grads, cfg.max_grad_norm)
        };
        let lr = run.schedule.lr_at(self.step);
        // The copy of the previous step's state must end before the weights change.
        let stall = run.saver.before_update()?;
        run.opt.step(params, &grads, lr);
        drop(grads);
        if let Some(rows) = &run.opt.rows {
            // Each rank updated its rows: share them.
            let tensors: Vec<Tensor> = params.iter().map(|p| p.tensor.shallow_clone()).collect();
            run.ranks.all_gather_rows(&tensors, rows)?;
        }
        ensure!(
            loss_value.is_finite(),
            "loss became {loss_value} at step {}; lower --lr or check the data",
            self.step + 1
        );
        self.step += 1;
        run.data_consumed += run.global_batch;
        run.last_loss = loss_value;
        let secs = started.elapsed().as_secs_f64();
        let mut line = json!({
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": (run.global_batch * cfg.max_seq_len) as f64 / secs.max(1e-9),
            "data_consumed": run.data_consumed,
            "epoch": run.data_consumed / run.ctx.n_samples,
            "time_unix_ms": waypoint_checkpoint::now_ms(),
        });
        if let Some(blocked) = stall {
            line["save_stall_s"] = json!(blocked);
        }
        if let Some(eval) = &run.eval {
            if cfg.eval_steps > 0 && self.step % cfg.eval_steps == 0 {
                let eval_loss = evaluate(&run.model, eval, bs, run.device, &mut run.ranks)?;
                line["eval_loss"] = json!(eval_loss);
                tracing::info!(step = self.step, eval_loss, "eval");
            }
        }
        Ok(Some(line))
    }
}

/// Runs `work` (tch calls) behind the boundary: a libtorch error, which tch raises as a panic (a
/// CUDA out-of-memory included), comes back as an error naming `what`, so the run ends `FAILED`.
pub(crate) fn libtorch_boundary<T>(what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(anyhow!("{what} failed in libtorch: {message}"))
        }
    }
}

/// Test builds only (feature `fault-injection`): a libtorch error at the step named by
/// `WAYPOINT_FAULT_INJECT_STEP`, through a tch method that panics on it, as a CUDA OOM would.
#[cfg(feature = "fault-injection")]
fn inject_fault(step: u64, device: Device) {
    if std::env::var("WAYPOINT_FAULT_INJECT_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        == Some(step)
    {
        let a = Tensor::zeros([2, 3], (Kind::Float, device));
        let _ = a.matmul(&a);
    }
}

/// The seed of libtorch's generator at optimizer step `step`.
fn step_seed(seed: u64, step: u64) -> i64 {
    (seed.wrapping_mul(1_000_003).wrapping_add(step) & 0x7FFF_FFFF_FFFF_FFFF) as i64
}

/// Cross-entropy of `logits` `[batch, seq, vocab]` summed over the tokens whose label is not
/// [`IGNORE`] (fp32).
fn loss_of_logits(logits: &Tensor, labels: &Tensor, vocab: i64) -> Tensor {
    logits
        .view([-1, vocab])
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(&labels.view([-1]), None, tch::Reduction::Sum, IGNORE, 0.0)
}

/// Mean loss over the eval data (with sharded weights, every rank takes part in each batch).
fn evaluate(
    model: &Model,
    data: &Dataset,
    batch: usize,
    device: Device,
    ranks: &mut Ranks,
) -> Result<f64> {
    tch::no_grad(|| {
        let (mut sum, mut tokens) = (0.0, 0i64);
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(batch.max(1)) {
            let (ids, labels) = data.rows(chunk, device);
            let logits = if model.is_sharded() {
                model.forward_sharded(&ids, ranks)?
            } else {
                model.forward(&ids, false)
            };
            sum += loss_of_logits(&logits, &labels, model.config.vocab_size).double_value(&[]);
            tokens += labels.ne(IGNORE).sum(Kind::Int64).int64_value(&[]);
        }
        Ok(sum / tokens.max(1) as f64)
    })
}
