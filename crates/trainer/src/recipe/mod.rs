//! Recipes: what turns a micro-batch into a loss. The step (`crate::step`) runs the model and
//! hands its logits to the recipe; the recipe says how many units (tokens, pairs, …) its loss is a
//! mean over, so that gradient accumulation and data parallelism divide by the step's global
//! count, and which statistics it reports beside the loss (TRL's metric names). A new objective is
//! one new file here, not an edit of the step, the loop or the saver.
//!
//! Today: [`Sft`] (supervised next-token cross-entropy), [`Dpo`] and [`Orpo`] (preference pairs,
//! as TRL 1.16 computes them), chosen by [`recipe_for`].

mod preference;
mod sft;

use tch::{Device, Kind, Tensor};
use waypoint_config::Objective;
use waypoint_data::{Batch, IGNORE};

pub use preference::{Dpo, Orpo};
pub use sft::Sft;

use crate::convert::batch_tensors;

/// One micro-batch on the device: the model reads `ids`, the recipe scores its logits against
/// `labels` (both `[rows, seq]`, int64; [`IGNORE`] where no loss applies). Preference pairs are
/// laid out as TRL lays them: the chosen rows of the pairs, then their rejected rows.
pub struct MicroBatch {
    /// Input token ids.
    pub ids: Tensor,
    /// Targets.
    pub labels: Tensor,
    /// The real (unpadded) tokens at the start of each row, `[rows]` int64.
    pub lengths: Tensor,
    /// The learned tokens of each row, `[rows]` int64 (see [`Batch::learned`]).
    pub learned: Tensor,
    /// Each row's sequence log-prob under the reference model, `[rows]` fp64, when the recipe
    /// needs one and it was computed before the step (see [`Recipe::needs_reference`]).
    pub reference: Option<Tensor>,
}

impl MicroBatch {
    /// A data batch on `device`.
    pub fn on(batch: &Batch, device: Device) -> Self {
        let (ids, labels) = batch_tensors(batch, device);
        let counts = |v: &[usize]| {
            let v: Vec<i64> = v.iter().map(|&l| l as i64).collect();
            Tensor::from_slice(&v).to_device(device)
        };
        Self {
            ids,
            labels,
            lengths: counts(&batch.lengths),
            learned: counts(&batch.learned),
            reference: None,
        }
    }

    /// The same batch with the reference log-probs `reference` `[rows]`.
    pub fn with_reference(&self, reference: Tensor) -> Self {
        Self {
            ids: self.ids.shallow_clone(),
            labels: self.labels.shallow_clone(),
            lengths: self.lengths.shallow_clone(),
            learned: self.learned.shallow_clone(),
            reference: Some(reference),
        }
    }
}

/// A micro-batch's loss and statistics.
pub struct Scored {
    /// The loss summed over the batch's units, fp32, with autograd.
    pub loss: Tensor,
    /// Each of [`Recipe::stat_names`], summed over the batch's units.
    pub stats: Vec<f64>,
}

/// An objective: a loss over the logits of a micro-batch.
pub trait Recipe: Send + Sync {
    /// The recipe's name, as the run records it (`sft`, `dpo`, `orpo`).
    fn name(&self) -> &'static str;

    /// The units the loss is a mean over in `batch` (SFT: the tokens whose label counts; pairs:
    /// the pairs); summed over the step's micro-batches and ranks, it divides each micro-batch's
    /// loss.
    fn units(&self, batch: &MicroBatch) -> i64;

    /// The loss of `batch` summed over its units and its statistics, from the model's `logits`
    /// `[rows, seq, vocab]`.
    fn score(&self, logits: &Tensor, batch: &MicroBatch) -> Scored;

    /// The statistics [`Recipe::score`] reports, by their metric names (means over the step's
    /// units once summed over its micro-batches and ranks).
    fn stat_names(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether [`Recipe::score`] reads [`MicroBatch::reference`].
    fn needs_reference(&self) -> bool {
        false
    }
}

/// The recipe of `objective`.
pub fn recipe_for(objective: Objective) -> Box<dyn Recipe> {
    match objective {
        Objective::Sft => Box::new(Sft),
        Objective::Dpo {
            beta,
            loss,
            rpo_alpha,
        } => Box::new(Dpo {
            beta,
            loss,
            rpo_alpha,
        }),
        Objective::Orpo { beta } => Box::new(Orpo { beta }),
    }
}

/// Each token's log-prob of its label, `[rows, seq]` fp32 (0 where the label is [`IGNORE`]), and
/// the mask of the labels that count.
pub(crate) fn token_logps(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let mask = labels.ne(IGNORE);
    let safe = labels.where_self(&mask, &labels.zeros_like());
    let logps = logits
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float)
        .gather(-1, &safe.unsqueeze(-1), false)
        .squeeze_dim(-1)
        * mask.to_kind(Kind::Float);
    (logps, mask)
}

/// Each row's sequence log-prob: the sum of its learned tokens' log-probs, `[rows]` fp32.
pub(crate) fn sequence_logps(logits: &Tensor, labels: &Tensor) -> Tensor {
    token_logps(logits, labels)
        .0
        .sum_dim_intlist(-1, false, Kind::Float)
}
