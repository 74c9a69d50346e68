//! The checkpoint manager over a store that fails on purpose.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::flaky::flaky_stores;
use waypoint_storage::StorageError;
use waypoint_testkit as common;

/// A commit that landed but whose answer was lost (the server went away just then) is recognised as
/// committed: by the retried create (same bytes there) and, when no retry is left, by the manager
/// reading the manifest back. Before, the save failed with "already committed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_counts_as_committed() {
    for deadline in [Duration::from_secs(2), Duration::ZERO] {
        for (name, s, faults, _dir) in flaky_stores(deadline) {
            let mut m = waypoint_checkpoint::CheckpointManager::new(
                s.clone(),
                waypoint_checkpoint::RunLayout::new("r", "waypoint").unwrap(),
                Default::default(),
            );
            m.start_attempt(&serde_json::json!({})).await.unwrap();
            faults.lose_create_answers.store(1, Ordering::SeqCst);
            let request = waypoint_checkpoint::SaveRequest {
                commit: waypoint_checkpoint::Commit {
                    data_consumed: 40,
                    ..common::commit(10)
                },
                dcp: Some(common::training_state(10)),
                sampler: None,
            };
            let manifest = m
                .save(request)
                .await
                .unwrap_or_else(|e| panic!("{name}, retrying for {deadline:?}: {e}"));
            assert_eq!(
                faults.lose_create_answers.load(Ordering::SeqCst),
                0,
                "{name}: fault not hit"
            );
            assert_eq!(manifest.name, "step-000010");
            let found = m.latest_resumable(true).await.unwrap().unwrap();
            assert_eq!(found, manifest, "{name}");
            // A create of different bytes is still refused: only our own bytes count.
            let key = m.layout().manifest(waypoint_checkpoint::StepName::new(10));
            assert!(matches!(
                s.put_create(&key, Bytes::from_static(b"{}")).await,
                Err(StorageError::AlreadyExists { .. })
            ));
        }
    }
}
