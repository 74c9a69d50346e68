//! When and what to save: pure functions of the step, the settings and what was saved before — the
//! policy, apart from the saver that carries it out.

use waypoint_checkpoint::StepName;

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

/// What save is due once `step` of `total` is done, with saves every `save_steps` (0: none but the
/// final one) and `signal` when a stop was requested. A stop at step 0 has nothing to save.
pub(crate) fn save_due(step: u64, save_steps: u64, total: u64, signal: bool) -> SaveDue {
    if step >= total {
        SaveDue::Final
    } else if signal {
        if step > 0 {
            SaveDue::Stop
        } else {
            SaveDue::None
        }
    } else if save_steps > 0 && step % save_steps == 0 {
        SaveDue::Periodic
    } else {
        SaveDue::None
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

    #[test]
    fn periodic_saves_fall_on_multiples_before_the_last_step() {
        let due: Vec<u64> = (1..10)
            .filter(|&s| save_due(s, 3, 10, false) == SaveDue::Periodic)
            .collect();
        assert_eq!(due, [3, 6, 9]);
        // The last step gets the final save, even on a multiple.
        assert_eq!(save_due(9, 3, 9, false), SaveDue::Final);
        assert_eq!(save_due(10, 3, 10, false), SaveDue::Final);
        // save_steps 0: only the final one.
        assert!((1..10).all(|s| save_due(s, 0, 10, false) == SaveDue::None));
        assert_eq!(save_due(10, 0, 10, false), SaveDue::Final);
    }

    #[test]
    fn a_stop_saves_the_current_step_unless_nothing_was_done() {
        assert_eq!(save_due(4, 3, 10, true), SaveDue::Stop);
        assert_eq!(save_due(6, 3, 10, true), SaveDue::Stop);
        assert_eq!(save_due(0, 3, 10, true), SaveDue::None);
        assert_eq!(save_due(10, 3, 10, true), SaveDue::Final);
    }
}
