//! Preference recipes over chosen/rejected pairs, as TRL 1.16 computes them: a micro-batch holds
//! its pairs' chosen rows, then their rejected rows; a pair's log-prob counts its completion tokens
//! (the labels); the loss is a mean over the step's pairs.
//!
//! - [`Dpo`] (`DPOTrainer._compute_loss`): sequence log-probs are sums over the completion;
//!   `sigmoid` −log σ(βΔ), `hinge` relu(1 − βΔ), `ipo` (Δ/len − 1/(2β))² with each completion's
//!   log-ratio divided by its length, Δ the chosen log-ratio minus the rejected one, each against
//!   the reference model; `rpo_alpha` adds TRL's `"sft"` loss (the mean NLL of the micro-batch's
//!   chosen completion tokens) with that weight.
//! - [`Orpo`] (`trl.experimental.orpo`): log-probs are per-token means over the completion; the
//!   loss is the micro-batch's mean NLL over the chosen rows' prompt *and* completion tokens minus
//!   β times the mean log σ of the log odds ratio. No reference model.
//!
//! A term TRL takes as a mean over a micro-batch's tokens enters here as that mean times the
//! micro-batch's pairs, so that the step's mean over pairs equals TRL's mean over micro-batches
//! whenever they hold as many pairs (as they do, but for a short last batch TRL would have).

use tch::{Kind, Tensor};
use waypoint_config::DpoLoss;

use waypoint_observe::metrics::RECIPE_METRICS;

use crate::recipe::{token_logps, MicroBatch, Recipe, Scored};

/// The statistics [`Dpo`] reports, by TRL's names: the first six of [`RECIPE_METRICS`].
fn dpo_stats() -> &'static [&'static str] {
    &RECIPE_METRICS[..6]
}

/// Direct preference optimization (`--recipe dpo`).
#[derive(Debug, Clone, Copy)]
pub struct Dpo {
    /// β.
    pub beta: f64,
    /// The loss over the log-ratio difference.
    pub loss: DpoLoss,
    /// Weight of the chosen completions' NLL (0: none).
    pub rpo_alpha: f64,
}

/// Odds-ratio preference optimization (`--recipe orpo`).
#[derive(Debug, Clone, Copy)]
pub struct Orpo {
    /// The weight of the odds-ratio term.
    pub beta: f64,
}

/// The pairs in a micro-batch (half its rows).
fn pairs_in(batch: &MicroBatch) -> i64 {
    batch.ids.size()[0] / 2
}

/// The sum of `t` as f64.
fn total(t: &Tensor) -> f64 {
    t.sum(Kind::Double).double_value(&[])
}

/// The reward statistics both recipes report, summed over pairs: rewards (β × `chosen_r`,
/// `rejected_r`), their accuracy and margin, and the policy log-probs.
fn reward_stats(
    beta: f64,
    chosen_r: &Tensor,
    rejected_r: &Tensor,
    chosen: &Tensor,
    rejected: &Tensor,
) -> Vec<f64> {
    let (c, r) = (chosen_r.detach() * beta, rejected_r.detach() * beta);
    vec![
        total(&c),
        total(&r),
        total(&c.gt_tensor(&r).to_kind(Kind::Float)),
        total(&(&c - &r)),
        total(&chosen.detach()),
        total(&rejected.detach()),
    ]
}

impl Recipe for Dpo {
    fn name(&self) -> &'static str {
        "dpo"
    }

    fn units(&self, batch: &MicroBatch) -> i64 {
        pairs_in(batch)
    }

    fn stat_names(&self) -> &'static [&'static str] {
        dpo_stats()
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn score(&self, logits: &Tensor, batch: &MicroBatch) -> Scored {
        let pairs = pairs_in(batch);
        let (tokens, mask) = token_logps(logits, &batch.labels);
        let logps = tokens.sum_dim_intlist(-1, false, Kind::Float);
        let (chosen, rejected) = (logps.narrow(0, 0, pairs), logps.narrow(0, pairs, pairs));
        let reference = match &batch.reference {
            Some(r) => r.to_kind(Kind::Float),
            // The step computes it for every micro-batch of a recipe that needs it.
            None => logps.detach().zeros_like(),
        };
        let chosen_r = &chosen - reference.narrow(0, 0, pairs);
        let rejected_r = &rejected - reference.narrow(0, pairs, pairs);
        let delta = &chosen_r - &rejected_r;
        let beta = self.beta;
        let per_pair = match self.loss {
            DpoLoss::Sigmoid => -(&delta * beta).log_sigmoid(),
            DpoLoss::Hinge => (-(&delta * beta) + 1.0).relu(),
            DpoLoss::Ipo => {
                // Each completion's tokens, as TRL counts them (its first included).
                let lens = batch.learned.to_kind(Kind::Float).clamp_min(1.0);
                let (lc, lr) = (lens.narrow(0, 0, pairs), lens.narrow(0, pairs, pairs));
                (&chosen_r / lc - &rejected_r / lr - 1.0 / (2.0 * beta)).square()
            }
        };
        let preference = per_pair.sum(Kind::Float);
        let loss = if self.rpo_alpha > 0.0 {
            // TRL's "sft" loss: the mean NLL of the micro-batch's chosen completion tokens.
            let chosen_tokens = tokens.narrow(0, 0, pairs);
            let count = mask.narrow(0, 0, pairs).sum(Kind::Float).clamp_min(1.0);
            let nll = -chosen_tokens.sum(Kind::Float) / count;
            preference + nll * (self.rpo_alpha * pairs as f64)
        } else {
            preference
        };
        Scored {
            loss,
            stats: reward_stats(beta, &chosen_r, &rejected_r, &chosen, &rejected),
        }
    }
}

/// log(1 − exp(x)) for x < 0, stable on both sides of −ln 2 (TRL's `log1mexp`).
fn log1mexp(x: &Tensor) -> Tensor {
    let t = -std::f64::consts::LN_2;
    let small = (-x.exp()).log1p();
    let large = (-x.expm1()).log();
    small.where_self(&x.lt(t), &large)
}

impl Recipe for Orpo {
    fn name(&self) -> &'static str {
        "orpo"
    }

    fn units(&self, batch: &MicroBatch) -> i64 {
        pairs_in(batch)
    }

    fn stat_names(&self) -> &'static [&'static str] {
        &RECIPE_METRICS
    }

    fn score(&self, logits: &Tensor, batch: &MicroBatch) -> Scored {
        let pairs = pairs_in(batch);
        let (tokens, mask) = token_logps(logits, &batch.labels);
        let counts = mask.sum_dim_intlist(-1, false, Kind::Float);
        let mean = tokens.sum_dim_intlist(-1, false, Kind::Float) / counts;
        let (chosen, rejected) = (mean.narrow(0, 0, pairs), mean.narrow(0, pairs, pairs));
        // The NLL over the chosen rows' every real token after the first (prompt included).
        let chosen_logits = logits.narrow(0, 0, pairs);
        let ids = batch.ids.narrow(0, 0, pairs);
        let seq = ids.size()[1];
        let next = Tensor::cat(&[ids.narrow(1, 1, seq - 1), ids.narrow(1, 0, 1)], 1);
        let positions = Tensor::arange(seq, (Kind::Int64, ids.device())).unsqueeze(0);
        let real = positions.lt_tensor(&(batch.lengths.narrow(0, 0, pairs) - 1).unsqueeze(1));
        let targets = next.where_self(&real, &next.full_like(waypoint_data::IGNORE));
        let (nll_tokens, nll_mask) = token_logps(&chosen_logits, &targets);
        let nll = -nll_tokens.sum(Kind::Float) / nll_mask.sum(Kind::Float).clamp_min(1.0);
        let log_odds = (&chosen - &rejected) - (log1mexp(&chosen) - log1mexp(&rejected));
        let ratio = log_odds.log_sigmoid();
        let loss = &nll * pairs as f64 - (&ratio * self.beta).sum(Kind::Float);
        let mut stats = reward_stats(self.beta, &chosen, &rejected, &chosen, &rejected);
        stats.push(nll.double_value(&[]) * pairs as f64);
        stats.push(total(&ratio.detach()));
        stats.push(total(&log_odds.detach()));
        Scored { loss, stats }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log1mexp_is_log_of_one_minus_exp_on_both_branches() {
        let x = Tensor::from_slice(&[-5.0f64, -1.0, -0.5, -0.01]);
        let got = Vec::<f64>::try_from(log1mexp(&x)).unwrap();
        for (g, x) in got.iter().zip([-5.0f64, -1.0, -0.5, -0.01]) {
            let want = (1.0 - x.exp()).ln();
            assert!((g - want).abs() < 1e-12, "{x}: {g} vs {want}");
        }
    }
}
