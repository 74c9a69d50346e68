//! When and what to save: pure functions of the step, the settings and what was saved before — the
//! policy, apart from the saver that carries it out.

use waypoint_checkpoint::StepName;
use waypoint_config::DurableInterval;

/// Which save, if any, is due after a step: the policy apart from the saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SaveDue {
    /// None.
    None,
    /// A periodic resumable save (every `save_steps`, before the last step).
    Periodic,
    /// The final save at the last step: resumable and promotable.
    Final,
    /// A stop was requested (a signal): save this step, resumable, then stop.
    Stop,
}

/// What save is due once `step` of `total` is done, `periodic` when the durable schedule asks for
/// one at this step ([`DurableSchedule::due`]) and `signal` when a stop was requested. A stop at
/// step 0 has nothing to save.
pub(crate) fn save_due(step: u64, periodic: bool, total: u64, signal: bool) -> SaveDue {
    if step >= total {
        SaveDue::Final
    } else if signal {
        if step > 0 {
            SaveDue::Stop
        } else {
            SaveDue::None
        }
    } else if periodic {
        SaveDue::Periodic
    } else {
        SaveDue::None
    }
}

/// Steps of the first `--save_steps auto` interval, before the cost of a save has been measured.
pub(crate) const AUTO_FIRST_INTERVAL: u64 = 10;

/// The durable save interval, in steps, of Young and Daly's first-order model: a save every
/// τ = √(2·C·M) seconds minimises the time lost to saves (C each) plus the work redone after a
/// failure (τ/2 on average, one failure every M seconds). At least 1 step.
pub(crate) fn young_daly_steps(save_cost_s: f64, mtbf_s: f64, step_s: f64) -> u64 {
    if !(step_s > 0.0 && save_cost_s.is_finite() && mtbf_s.is_finite()) {
        return 1;
    }
    let tau = (2.0 * save_cost_s.max(0.0) * mtbf_s.max(0.0)).sqrt();
    (tau / step_s).round().clamp(1.0, 1e15) as u64
}

/// What a durable save cost the training loop, in seconds: the time it blocked the loop, plus
/// the extra time of the steps that ran slower while it was written (`slowdown` is their mean
/// over a step without a save, `step_s`).
pub(crate) fn save_cost_s(
    stall_s: f64,
    overlap_steps: u64,
    slowdown: Option<f64>,
    step_s: f64,
) -> f64 {
    let overlap = slowdown.map_or(0.0, |s| (s - 1.0).max(0.0) * overlap_steps as f64 * step_s);
    stall_s.max(0.0) + overlap
}

/// When the durable saves fall: every N steps, or at `--save_steps auto`'s interval, which rank 0
/// recomputes from each save's measured cost and the ranks agree on at each save.
#[derive(Debug, Clone)]
pub(crate) struct DurableSchedule {
    interval: DurableInterval,
    /// The interval in force (auto).
    every: u64,
    /// The step of the newest durable save (or the start).
    last: u64,
    /// Rank 0's estimate: the newest save's cost and a step's time, in seconds.
    measured: Option<(f64, f64)>,
}

impl DurableSchedule {
    /// The schedule of a start at `start_step`.
    pub(crate) fn new(interval: DurableInterval, start_step: u64) -> Self {
        let every = match interval {
            DurableInterval::Every(n) => n,
            DurableInterval::Auto { .. } => AUTO_FIRST_INTERVAL,
        };
        Self {
            interval,
            every,
            last: start_step,
            measured: None,
        }
    }

    /// Whether `--save_steps auto` sets the interval.
    pub(crate) fn is_auto(&self) -> bool {
        matches!(self.interval, DurableInterval::Auto { .. })
    }

    /// The interval in force, in steps (0: only the final save).
    pub(crate) fn every(&self) -> u64 {
        self.every
    }

    /// Whether a periodic durable save falls on `step`.
    pub(crate) fn due(&self, step: u64) -> bool {
        match self.interval {
            DurableInterval::Every(n) => n > 0 && step % n == 0,
            DurableInterval::Auto { .. } => step >= self.last + self.every,
        }
    }

    /// Rank 0: a committed save cost the loop `cost_s`, a step takes `step_s`. Returns the interval
    /// Young and Daly's model gives now (auto only).
    pub(crate) fn measured(&mut self, cost_s: f64, step_s: f64) -> Option<u64> {
        let DurableInterval::Auto { mtbf_s } = self.interval else {
            return None;
        };
        self.measured = Some((cost_s, step_s));
        Some(young_daly_steps(cost_s, mtbf_s, step_s))
    }

    /// The interval rank 0 proposes for after the next save: the model's, once a save was
    /// measured, when it differs from the one in force by a tenth or more (saves vary a little; the
    /// interval need not follow each).
    pub(crate) fn proposal(&self) -> u64 {
        match (self.interval, self.measured) {
            (DurableInterval::Auto { mtbf_s }, Some((cost, step))) => {
                let model = young_daly_steps(cost, mtbf_s, step);
                let moved = model.abs_diff(self.every) as f64 >= 0.1 * self.every as f64;
                if moved {
                    model
                } else {
                    self.every
                }
            }
            _ => self.every,
        }
    }

    /// The mean time between failures `--save_steps auto` plans for, in seconds.
    pub(crate) fn mtbf_s(&self) -> Option<f64> {
        match self.interval {
            DurableInterval::Auto { mtbf_s } => Some(mtbf_s),
            DurableInterval::Every(_) => None,
        }
    }

    /// The measured save cost and step time the interval came from (rank 0, once measured).
    pub(crate) fn measured_costs(&self) -> Option<(f64, f64)> {
        self.measured
    }

    /// A durable save was made at `step`; the next comes `every` steps later (auto: the interval
    /// all ranks agreed on). Returns whether the interval changed.
    pub(crate) fn saved(&mut self, step: u64, every: u64) -> bool {
        self.last = step;
        if !self.is_auto() {
            return false;
        }
        let changed = every != self.every;
        self.every = every.max(1);
        changed
    }
}

/// Whether a periodic sampler save is due once `step` of `total` is done, with one every `every`
/// steps (0: none); the final save carries its own sampler part.
pub(crate) fn sampler_save_due(step: u64, every: u64, total: u64) -> bool {
    every > 0 && step < total && step % every == 0
}

/// The base a periodic sampler save is a delta over, or `None` for a full save (a new base): none
/// was made yet by this process, or `base_every` deltas were made over the newest (0: always a
/// base).
pub(crate) fn delta_base_for(chain: Option<SamplerChain>, base_every: u64) -> Option<StepName> {
    chain.filter(|c| c.deltas < base_every).map(|c| c.base)
}

/// The newest full sampler base a saver committed, and the deltas made over it since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SamplerChain {
    /// The base.
    pub base: StepName,
    /// Deltas committed over it.
    pub deltas: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_saves_are_a_base_then_deltas_then_a_new_base() {
        let due: Vec<u64> = (1..=10).filter(|&s| sampler_save_due(s, 4, 10)).collect();
        assert_eq!(due, [4, 8]);
        assert!(
            !sampler_save_due(10, 5, 10),
            "the final save carries its own"
        );
        assert!((1..10).all(|s| !sampler_save_due(s, 0, 10)));
        assert_eq!(delta_base_for(None, 3), None);
        let chain = |deltas| {
            Some(SamplerChain {
                base: StepName::new(4),
                deltas,
            })
        };
        assert_eq!(delta_base_for(chain(0), 3), Some(StepName::new(4)));
        assert_eq!(delta_base_for(chain(2), 3), Some(StepName::new(4)));
        assert_eq!(
            delta_base_for(chain(3), 3),
            None,
            "K deltas made: a new base"
        );
        assert_eq!(delta_base_for(chain(0), 0), None, "0: always a base");
    }

    fn periodic(schedule: &DurableSchedule, step: u64, total: u64) -> bool {
        save_due(step, schedule.due(step), total, false) == SaveDue::Periodic
    }

    #[test]
    fn periodic_saves_fall_on_multiples_before_the_last_step() {
        let every3 = DurableSchedule::new(DurableInterval::Every(3), 0);
        let due: Vec<u64> = (1..10).filter(|&s| periodic(&every3, s, 10)).collect();
        assert_eq!(due, [3, 6, 9]);
        // The last step gets the final save, even on a multiple.
        assert_eq!(save_due(9, every3.due(9), 9, false), SaveDue::Final);
        assert_eq!(save_due(10, every3.due(10), 10, false), SaveDue::Final);
        // save_steps 0: only the final one.
        let never = DurableSchedule::new(DurableInterval::Every(0), 0);
        assert!((1..10).all(|s| !periodic(&never, s, 10)));
        assert_eq!(save_due(10, never.due(10), 10, false), SaveDue::Final);
    }

    #[test]
    fn a_stop_saves_the_current_step_unless_nothing_was_done() {
        assert_eq!(save_due(4, false, 10, true), SaveDue::Stop);
        assert_eq!(save_due(6, true, 10, true), SaveDue::Stop);
        assert_eq!(save_due(0, false, 10, true), SaveDue::None);
        assert_eq!(save_due(10, false, 10, true), SaveDue::Final);
    }

    #[test]
    fn young_daly_is_the_square_root_of_twice_cost_times_mtbf() {
        // A save costing 2 s, a failure a day: τ = √(2 × 2 × 86400) ≈ 587.9 s; at 1.5 s a step, 392.
        assert_eq!(young_daly_steps(2.0, 86_400.0, 1.5), 392);
        // Four times the cost: twice the interval.
        assert_eq!(young_daly_steps(8.0, 86_400.0, 1.5), 784);
        // A free save, or nonsense, saves every step.
        assert_eq!(young_daly_steps(0.0, 86_400.0, 1.5), 1);
        assert_eq!(young_daly_steps(2.0, 86_400.0, 0.0), 1);
        assert_eq!(young_daly_steps(f64::NAN, 86_400.0, 1.0), 1);
        // The cost of a save: its stall plus what the overlapped steps lost.
        assert!((save_cost_s(0.5, 4, Some(1.25), 2.0) - 2.5).abs() < 1e-12);
        assert_eq!(save_cost_s(0.5, 4, None, 2.0), 0.5);
        assert_eq!(save_cost_s(0.5, 4, Some(0.9), 2.0), 0.5);
    }

    #[test]
    fn auto_saves_early_then_at_the_agreed_interval() {
        let mut auto = DurableSchedule::new(DurableInterval::Auto { mtbf_s: 86_400.0 }, 100);
        assert!(auto.is_auto());
        assert!(
            !auto.due(109) && auto.due(110),
            "the first after {AUTO_FIRST_INTERVAL}"
        );
        assert_eq!(auto.proposal(), AUTO_FIRST_INTERVAL, "nothing measured yet");
        assert_eq!(auto.measured(2.0, 1.5), Some(392));
        assert_eq!(auto.proposal(), 392);
        assert!(auto.saved(110, auto.proposal()), "the interval changed");
        assert!(!auto.due(501) && auto.due(502));
        assert!(!auto.saved(502, 392));
        // A model interval within a tenth of the one in force leaves it be.
        auto.measured(2.2, 1.5);
        assert_eq!(auto.proposal(), 392);
        auto.measured(8.0, 1.5);
        assert_eq!(auto.proposal(), 784);
        // A fixed interval is not measured and never moves.
        let mut fixed = DurableSchedule::new(DurableInterval::Every(5), 0);
        assert_eq!(fixed.measured(2.0, 1.5), None);
        assert!(!fixed.saved(5, 99));
        assert!(fixed.due(10) && !fixed.due(11));
    }
}
