//! Recipes: what turns a micro-batch into a loss. The step (`crate::step`) runs the model and
//! hands its logits to the recipe; the recipe says how many units (tokens, pairs, …) its loss is a
//! mean over, so that gradient accumulation and data parallelism divide by the step's global
//! count. A new objective is one new file here, not an edit of the step, the loop or the saver.
//!
//! Today: [`Sft`] (supervised next-token cross-entropy).

mod sft;

use tch::{Device, Tensor};
use waypoint_data::Batch;

pub use sft::Sft;

use crate::convert::batch_tensors;

/// One micro-batch on the device: the model reads `ids`, the recipe scores its logits against
/// `labels` (both `[batch, seq]`, int64; [`waypoint_data::IGNORE`] where no loss applies).
pub struct MicroBatch {
    /// Input token ids.
    pub ids: Tensor,
    /// Targets.
    pub labels: Tensor,
}

impl MicroBatch {
    /// A data batch on `device`.
    pub fn on(batch: &Batch, device: Device) -> Self {
        let (ids, labels) = batch_tensors(batch, device);
        Self { ids, labels }
    }
}

/// An objective: a loss over the logits of a micro-batch.
pub trait Recipe: Send + Sync {
    /// The recipe's name, as the run records it (`sft`).
    fn name(&self) -> &'static str;

    /// The units the loss is a mean over in `batch` (for SFT, the tokens whose label counts);
    /// summed over the step's micro-batches and ranks, it divides each micro-batch's loss.
    fn units(&self, batch: &MicroBatch) -> i64;

    /// The loss of `batch` summed over its units, in fp32, from the model's `logits`
    /// `[batch, seq, vocab]`.
    fn loss_sum(&self, logits: &Tensor, batch: &MicroBatch) -> Tensor;
}
