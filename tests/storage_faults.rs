//! Failure injection: transient errors are retried; a part that fails mid-upload aborts the write
//! cleanly, with nothing visible under the key.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::flaky::{Faults, FlakyStore};
use common::{pattern, sha256_hex};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::ObjectStore;
use waypoint_storage::{RetryPolicy, StorageError, Store, StoreOptions};

fn options(max_retries: u32) -> StoreOptions {
    StoreOptions {
        part_size: 1 << 20,
        max_concurrency: 3,
        retry: RetryPolicy {
            max_retries,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            ..RetryPolicy::default()
        },
        fsync: false,
    }
}

/// Flaky wrappers over memory and local FS (the temp dir lives as long as the returned guard).
fn flaky_stores(max_retries: u32) -> Vec<(&'static str, Store, Arc<Faults>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let inners: Vec<(&'static str, Arc<dyn ObjectStore>)> = vec![
        ("memory", Arc::new(InMemory::new())),
        (
            "local",
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
        ),
    ];
    let mut out = Vec::new();
    for (name, inner) in inners {
        let faults = Arc::new(Faults::default());
        let flaky = Arc::new(FlakyStore {
            inner,
            faults: faults.clone(),
        });
        let store = Store::from_object_store(flaky, "root", name, options(max_retries)).unwrap();
        out.push((name, store, faults, tempfile::tempdir().unwrap()));
    }
    // Keep the local store's directory alive with the first entry.
    out[1].3 = dir;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_of_the_first_calls_are_retried() {
    for (name, s, faults, _dir) in flaky_stores(3) {
        faults.fail_next_calls.store(3, Ordering::SeqCst);
        s.put("k", Bytes::from_static(b"v")).await.unwrap();
        faults.fail_next_calls.store(2, Ordering::SeqCst);
        assert_eq!(
            s.get("k").await.unwrap(),
            Bytes::from_static(b"v"),
            "{name}"
        );
        faults.fail_next_calls.store(1, Ordering::SeqCst);
        s.put_create("marker", Bytes::from_static(b"m"))
            .await
            .unwrap();
        faults.fail_next_calls.store(2, Ordering::SeqCst);
        assert_eq!(s.list("").await.unwrap().len(), 2, "{name}");
        // A streaming write whose start fails transiently still lands intact.
        let data = pattern(5 * 1024 * 1024 + 17, 9);
        faults.fail_next_calls.store(2, Ordering::SeqCst);
        let mut w = s.writer("blob").unwrap();
        w.write(&data).await.unwrap();
        let info = w.finish().await.unwrap();
        assert_eq!(info.sha256, sha256_hex(&data), "{name}");
        assert_eq!(
            sha256_hex(&s.get("blob").await.unwrap()),
            info.sha256,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_failures_than_retries_fail_with_nothing_written() {
    for (name, s, faults, _dir) in flaky_stores(2) {
        faults.fail_next_calls.store(3, Ordering::SeqCst);
        let err = s.put("k", Bytes::from_static(b"v")).await.unwrap_err();
        assert!(
            matches!(err, StorageError::Backend { op: "put", .. }),
            "{name}: {err}"
        );
        assert!(
            err.to_string().contains("injected transient failure"),
            "{err}"
        );
        assert!(!s.exists("k").await.unwrap(), "{name}");
        // Permanent answers are not retried: a second create fails at once.
        s.put_create("marker", Bytes::from_static(b"1"))
            .await
            .unwrap();
        let before = faults.calls.load(Ordering::SeqCst);
        assert!(matches!(
            s.put_create("marker", Bytes::from_static(b"2")).await,
            Err(StorageError::AlreadyExists { .. })
        ));
        assert_eq!(
            faults.calls.load(Ordering::SeqCst) - before,
            1,
            "{name}: retried a permanent error"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_mid_upload_aborts_cleanly() {
    for (name, s, faults, _dir) in flaky_stores(3) {
        faults.fail_part.store(4, Ordering::SeqCst);
        let data = pattern(9 * 1024 * 1024 + 5, 11);
        let mut w = s.writer("ckpt/blob.safetensors").unwrap();
        let mut result = Ok(());
        for chunk in data.chunks(300_000) {
            result = w.write(chunk).await;
            if result.is_err() {
                break;
            }
        }
        let result = match result {
            Ok(()) => w.finish().await.map(|_| ()),
            Err(e) => {
                drop(w);
                Err(e)
            }
        };
        let err = result.expect_err("the injected part failure must surface");
        assert!(err.to_string().contains("part 4"), "{name}: {err}");
        assert_eq!(
            faults.aborts.load(Ordering::SeqCst),
            1,
            "{name}: upload not aborted"
        );
        faults.fail_part.store(0, Ordering::SeqCst);
        assert!(
            !s.exists("ckpt/blob.safetensors").await.unwrap(),
            "{name}: half object visible"
        );
        assert!(
            s.list("ckpt").await.unwrap().is_empty(),
            "{name}: leftovers listed"
        );
        // The same writer path works again once the fault is gone.
        let mut w = s.writer("ckpt/blob.safetensors").unwrap();
        w.write(&data).await.unwrap();
        let info = w.finish().await.unwrap();
        assert_eq!(
            sha256_hex(&s.get("ckpt/blob.safetensors").await.unwrap()),
            info.sha256,
            "{name}"
        );
    }
}

/// A commit that landed but whose answer was lost (the server went away just then) is recognised as
/// committed: by the retried create (same bytes there) and, when no retry is left, by the manager
/// reading the manifest back. Before, the save failed with "already committed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_counts_as_committed() {
    for max_retries in [2, 0] {
        for (name, s, faults, _dir) in flaky_stores(max_retries) {
            let mut m = waypoint_checkpoint::CheckpointManager::new(
                s.clone(),
                waypoint_storage::RunLayout::new("r", "waypoint").unwrap(),
                Default::default(),
            );
            m.start_attempt(&serde_json::json!({})).await.unwrap();
            faults.lose_create_answers.store(1, Ordering::SeqCst);
            let request = waypoint_checkpoint::SaveRequest {
                commit: waypoint_checkpoint::Commit {
                    step: 10,
                    data_consumed: 40,
                    epoch: 0,
                    world_size: 1,
                    config_fingerprint: "c".repeat(64),
                    delta_base: None,
                },
                dcp: Some(common::training_state(10)),
                sampler: None,
            };
            let manifest = m
                .save(request)
                .await
                .unwrap_or_else(|e| panic!("{name}, {max_retries} retries: {e}"));
            assert_eq!(
                faults.lose_create_answers.load(Ordering::SeqCst),
                0,
                "{name}: fault not hit"
            );
            assert_eq!(manifest.name, "step-000010");
            let found = m.latest_resumable(true).await.unwrap().unwrap();
            assert_eq!(found, manifest, "{name}");
            // A create of different bytes is still refused: only our own bytes count.
            let key = m.layout().manifest(waypoint_storage::StepName::new(10));
            assert!(matches!(
                s.put_create(&key, Bytes::from_static(b"{}")).await,
                Err(StorageError::AlreadyExists { .. })
            ));
        }
    }
}
