//! The global batch across restarts at another world size. A run's global batch (samples per
//! optimizer step over all ranks) decides its trajectory and its sample schedule, so a restart at
//! another world size keeps it: [`keep_global_batch`] (the policy, a pure function) picks the
//! `--gradient_accumulation` that does, or refuses naming the choices; [`previous_global_batch`]
//! reads what the run's newest checkpoint used.

use waypoint_checkpoint::CheckpointManager;

/// The most choices a refusal lists of each kind.
const CHOICES: usize = 8;

/// What a restart does about the global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BatchKeep {
    /// The settings give the run's global batch already.
    Same,
    /// Another `--gradient_accumulation` keeps it at this world size.
    Accumulate(u64),
    /// Nothing does with this `--batch_size`: why, and the choices.
    Refuse(String),
}

/// How to keep a run's global batch `previous` (samples per step, saved at world size
/// `previous_world`) when restarting at world size `world` with `--batch_size batch` and
/// `--gradient_accumulation accumulation`. Only a change of world size is acted on; other
/// changes of the global batch are the configuration's to judge.
pub(crate) fn keep_global_batch(
    previous: u64,
    previous_world: u64,
    batch: u64,
    accumulation: u64,
    world: u64,
) -> BatchKeep {
    if batch * accumulation * world == previous || world == previous_world {
        return BatchKeep::Same;
    }
    let per_pass = batch * world;
    if previous % per_pass == 0 {
        return BatchKeep::Accumulate(previous / per_pass);
    }
    let worlds: Vec<String> = (1..=previous / batch.max(1))
        .filter(|w| previous % (batch * w) == 0)
        .take(CHOICES)
        .map(|w| w.to_string())
        .collect();
    let batches: Vec<String> = (1..=previous / world.max(1))
        .filter(|b| previous % (b * world) == 0)
        .take(CHOICES)
        .map(|b| b.to_string())
        .collect();
    let mut choices = Vec::new();
    if !batches.is_empty() {
        choices.push(format!(
            "--batch_size {} at world size {world} (the accumulation follows)",
            batches.join(" or ")
        ));
    }
    if !worlds.is_empty() {
        choices.push(format!(
            "world size {} with --batch_size {batch}",
            worlds.join(" or ")
        ));
    }
    choices.push("a new --run_id to train with another global batch".into());
    BatchKeep::Refuse(format!(
        "the run's checkpoints were trained with a global batch of {previous} samples per step \
         (world size {previous_world}); at world size {world}, --batch_size {batch} × the world \
         size ({per_pass}) does not divide it, so no --gradient_accumulation keeps it, and a \
         different global batch would change the run's trajectory and sample schedule. Choose: {}. \
         Nothing was written.",
        choices.join("; or ")
    ))
}

/// The global batch and world size of the run's newest committed checkpoint past step 0, from
/// its counters (`data_consumed` is steps × global batch); `None` for a new run, or when no
/// manifest tells (damaged ones are passed over here and judged by the resume).
pub(crate) async fn previous_global_batch(manager: &CheckpointManager) -> Option<(u64, u64)> {
    let mut steps = manager.committed_steps().await.ok()?;
    steps.sort();
    for step in steps.into_iter().rev() {
        let Ok(m) = manager.manifest(step).await else {
            continue;
        };
        if m.step > 0 && m.data_consumed % m.step == 0 {
            return Some((m.data_consumed / m.step, u64::from(m.world_size)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_world_size_keeps_the_global_batch_or_names_the_choices() {
        // Same settings, or the same world size: nothing to do.
        assert_eq!(keep_global_batch(12, 2, 2, 3, 2), BatchKeep::Same);
        assert_eq!(keep_global_batch(12, 2, 4, 3, 2), BatchKeep::Same);
        // 2 ranks × 2 × 3 = 12: at 3 ranks × 2, accumulate 2; at 1 rank, 6.
        assert_eq!(keep_global_batch(12, 2, 2, 3, 3), BatchKeep::Accumulate(2));
        assert_eq!(keep_global_batch(12, 2, 2, 3, 1), BatchKeep::Accumulate(6));
        // Given settings that already keep it (1 rank × 6 × 2) are the same.
        assert_eq!(keep_global_batch(12, 2, 6, 2, 1), BatchKeep::Same);
        // 5 ranks × 2 = 10 does not divide 12: refused, naming what would.
        let BatchKeep::Refuse(why) = keep_global_batch(12, 2, 2, 3, 5) else {
            panic!("5 ranks cannot keep 12");
        };
        assert!(why.contains("global batch of 12"), "{why}");
        assert!(
            why.contains("world size 1 or 2 or 3 or 6 with --batch_size 2"),
            "{why}"
        );
        assert!(why.contains("--run_id"), "{why}");
        // No batch size fits 12 at 5 ranks: only world sizes are offered.
        assert!(!why.contains("at world size 5 (the"), "{why}");
    }
}
