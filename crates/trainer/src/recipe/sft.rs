//! Supervised fine-tuning: next-token cross-entropy over the tokens whose label is not
//! [`IGNORE`] (padding, prompts and non-assistant chat turns carry no loss), a mean over those
//! tokens — transformers' causal-LM loss with its `num_items_in_batch` over the whole step.

use tch::{Kind, Tensor};
use waypoint_data::IGNORE;

use crate::recipe::{MicroBatch, Recipe, Scored};

/// Next-token cross-entropy (`--recipe sft`, the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sft;

impl Recipe for Sft {
    fn name(&self) -> &'static str {
        "sft"
    }

    fn units(&self, batch: &MicroBatch) -> i64 {
        batch.labels.ne(IGNORE).sum(Kind::Int64).int64_value(&[])
    }

    fn score(&self, logits: &Tensor, batch: &MicroBatch) -> Scored {
        let vocab = logits.size().last().copied().unwrap_or(1);
        let loss = logits
            .view([-1, vocab])
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &batch.labels.view([-1]),
                None,
                tch::Reduction::Sum,
                IGNORE,
                0.0,
            );
        Scored {
            loss,
            stats: Vec::new(),
        }
    }
}
