//! One optimizer step — forward, the recipe's loss, backward, gradient sum over the ranks, clipping,
//! AdamW — and the boundary that runs it: tch's methods panic on a libtorch error (a CUDA
//! out-of-memory included), and [`libtorch_boundary`] turns that panic into an error, so the run
//! ends as `FAILED` with the message and exit 1. The loop ([`crate::run`]) chooses the batches and
//! records the metrics; the objective is the [`Recipe`]'s.

use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::{anyhow, ensure, Context, Result};
use tch::Tensor;

use crate::collective::ranks::Ranks;
use crate::model::Model;
use crate::optim::{accumulate, clip_grad_norm, clip_to_norm, gradients, squared_norm, AdamW};
use crate::recipe::{sequence_logps, MicroBatch, Recipe};

/// What a step trains and with what.
pub(crate) struct StepParts<'a> {
    /// The model (its trainable weights are updated).
    pub model: &'a Model,
    /// The optimizer.
    pub opt: &'a mut AdamW,
    /// The ranks (gradients and the loss are summed over them).
    pub ranks: &'a mut Ranks,
    /// The objective.
    pub recipe: &'a dyn Recipe,
}

/// The settings a step reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepSettings {
    /// The run's seed (dropout is reseeded from it and the step).
    pub seed: u64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Recompute each layer in the backward pass.
    pub activation_checkpointing: bool,
}

/// What one step did.
#[derive(Debug, Clone)]
pub(crate) struct StepOutcome {
    /// The loss (a mean over the step's units on all ranks).
    pub loss: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    /// The units (tokens) the loss is a mean over, on all ranks.
    pub units: i64,
    /// Seconds the optimizer waited for the previous save's copy (see `before_update`).
    pub stall: Option<f64>,
    /// The recipe's statistics by name: means over the step's units on all ranks.
    pub stats: Vec<(&'static str, f64)>,
}

/// Runs optimizer step `step + 1` (`step` done so far) over this rank's `micro`-batches at learning
/// rate `lr`; `None` when the ranks agreed to stop before it (`stop`: this rank got a signal).
/// `before_update` runs just before the weights change (the copy of a save must end first).
pub(crate) fn train_step(
    parts: StepParts<'_>,
    micro: &[MicroBatch],
    step: u64,
    lr: f64,
    settings: StepSettings,
    stop: bool,
    before_update: &mut dyn FnMut() -> Result<Option<f64>>,
) -> Result<Option<StepOutcome>> {
    let StepParts {
        model,
        opt,
        ranks,
        recipe,
    } = parts;
    #[cfg(feature = "fault-injection")]
    inject_fault(step + 1, model.device());
    let params = model.trainable();
    tch::manual_seed(step_seed(settings.seed, step));
    let units: i64 = micro.iter().map(|b| recipe.units(b)).sum();
    // All ranks stop after the same step, whichever of them got the signal.
    let (units, stop_now) = ranks.agree(units, stop)?;
    if stop_now {
        return Ok(None);
    }
    let mut loss_value = 0.0;
    let mut stats = vec![0.0; recipe.stat_names().len()];
    let mut grads: Option<Vec<Tensor>> = None;
    let divisor = units.max(1) as f64;
    for (a, batch) in micro.iter().enumerate() {
        let referenced;
        let batch = if recipe.needs_reference() && batch.reference.is_none() {
            referenced = batch.with_reference(reference_for(model, batch, ranks)?);
            &referenced
        } else {
            batch
        };
        // The recipe's statistics come out of the loss closure (the model calls it once).
        let scored = std::cell::RefCell::new(Vec::new());
        let loss_of = |logits: &Tensor| {
            let s = recipe.score(logits, batch);
            *scored.borrow_mut() = s.stats;
            s.loss / divisor
        };
        // Recomputing passes reseed libtorch's generator per layer from this.
        let seed = step_seed(settings.seed, step).wrapping_add(a as i64 * 7919);
        let loss = if model.is_sharded() {
            let (loss, g) =
                model.loss_and_gradients_sharded(&batch.ids, seed, true, loss_of, ranks)?;
            grads = Some(accumulate(grads.take(), g));
            loss
        } else if settings.activation_checkpointing {
            let (loss, g) = model.loss_and_gradients_recomputed(&batch.ids, seed, true, loss_of);
            grads = Some(accumulate(grads.take(), g));
            loss
        } else {
            let loss = loss_of(&model.forward(&batch.ids, true));
            grads = Some(gradients(&loss, params, grads.take()));
            loss
        };
        loss_value += loss.double_value(&[]);
        for (total, s) in stats.iter_mut().zip(scored.into_inner()) {
            *total += s;
        }
    }
    let mut grads = grads.context("no micro-batch ran")?;
    // The statistics are summed over the ranks with the loss, then made means over the units.
    // (A recipe without statistics adds nothing to the sum.)
    let mut summed_stats: Vec<Tensor> = if stats.is_empty() {
        Vec::new()
    } else {
        vec![Tensor::from_slice(&stats).to_device(model.device())]
    };
    let grad_norm = if model.gradients_come_reduced() {
        // The gradients are already summed and cut into this rank's rows: only the loss and
        // the squared norm are summed over the ranks.
        ranks.all_reduce(&mut summed_stats, &mut loss_value)?;
        let mut squares = squared_norm(&grads);
        ranks.all_reduce(&mut [], &mut squares)?;
        clip_to_norm(&mut grads, squares.sqrt(), settings.max_grad_norm)
    } else {
        let n = grads.len();
        grads.append(&mut summed_stats);
        ranks.all_reduce(&mut grads, &mut loss_value)?;
        summed_stats = grads.split_off(n);
        clip_grad_norm(&mut grads, settings.max_grad_norm)
    };
    let stats: Vec<(&'static str, f64)> = match summed_stats.first() {
        Some(sums) => recipe
            .stat_names()
            .iter()
            .enumerate()
            .map(|(i, &name)| (name, sums.double_value(&[i as i64]) / divisor))
            .collect(),
        None => Vec::new(),
    };
    // The copy of the previous step's state must end before the weights change.
    let stall = before_update()?;
    opt.step(params, &grads, lr);
    drop(grads);
    if let Some(rows) = &opt.rows {
        // Each rank updated its rows: share them.
        let tensors: Vec<Tensor> = params.iter().map(|p| p.tensor.shallow_clone()).collect();
        ranks.all_gather_rows(&tensors, rows)?;
    }
    ensure!(
        loss_value.is_finite(),
        "loss became {loss_value} at step {}; lower --lr or check the data",
        step + 1
    );
    Ok(Some(StepOutcome {
        loss: loss_value,
        grad_norm,
        units,
        stall,
        stats,
    }))
}

/// Mean loss over `batches`, and the recipe's statistics as means over the same units (with
/// sharded weights, every rank takes part in each batch).
pub(crate) fn evaluate(
    model: &Model,
    recipe: &dyn Recipe,
    batches: impl Iterator<Item = MicroBatch>,
    ranks: &mut Ranks,
) -> Result<(f64, Vec<(&'static str, f64)>)> {
    tch::no_grad(|| {
        let (mut sum, mut units) = (0.0, 0i64);
        let mut stats = vec![0.0; recipe.stat_names().len()];
        for batch in batches {
            let logits = if model.is_sharded() {
                model.forward_sharded(&batch.ids, ranks)?
            } else {
                model.forward(&batch.ids, false)
            };
            let batch = if recipe.needs_reference() && batch.reference.is_none() {
                batch.with_reference(reference_for(model, &batch, ranks)?)
            } else {
                batch
            };
            let scored = recipe.score(&logits, &batch);
            sum += scored.loss.double_value(&[]);
            for (total, s) in stats.iter_mut().zip(scored.stats) {
                *total += s;
            }
            units += recipe.units(&batch);
        }
        let per_unit = units.max(1) as f64;
        let stats = recipe
            .stat_names()
            .iter()
            .zip(stats)
            .map(|(&name, total)| (name, total / per_unit))
            .collect();
        Ok((sum / per_unit, stats))
    })
}

/// Each row's sequence log-prob under the reference model, `[rows]`, without autograd: the model
/// with its LoRA adapters off (a full-parameter model as it is — the reference only while it has
/// not trained yet; after that its reference log-probs come with the batch).
pub(crate) fn reference_logps(
    model: &Model,
    batch: &MicroBatch,
    ranks: &mut Ranks,
) -> Result<Tensor> {
    tch::no_grad(|| {
        let logits = model.without_adapters(|| {
            if model.is_sharded() {
                model.forward_sharded(&batch.ids, ranks)
            } else {
                Ok(model.forward(&batch.ids, false))
            }
        })?;
        Ok(sequence_logps(&logits, &batch.labels))
    })
}

/// The reference log-probs of a batch that came without them: only a LoRA model can score them
/// at any step (its base does not train).
fn reference_for(model: &Model, batch: &MicroBatch, ranks: &mut Ranks) -> Result<Tensor> {
    ensure!(
        model.lora.is_some(),
        "internal: a full-parameter batch came without its reference log-probs"
    );
    reference_logps(model, batch, ranks)
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
fn inject_fault(step: u64, device: tch::Device) {
    if std::env::var("WAYPOINT_FAULT_INJECT_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        == Some(step)
    {
        let a = Tensor::zeros([2, 3], (tch::Kind::Float, device));
        let _ = a.matmul(&a);
    }
}

/// The seed of libtorch's generator at optimizer step `step` (0-based: the steps done before it).
pub(crate) fn step_seed(seed: u64, step: u64) -> i64 {
    (seed.wrapping_mul(1_000_003).wrapping_add(step) & 0x7FFF_FFFF_FFFF_FFFF) as i64
}
