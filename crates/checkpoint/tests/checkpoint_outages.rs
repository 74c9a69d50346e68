//! The checkpoint manager on the real S3 test server behind the fault proxy
//! (`waypoint_testkit::s3fault`): upkeep that fails (past the storage deadline) never fails a save
//! and is done by the next save; a file whose multipart upload the server lost is written again.

use std::time::Duration;

use waypoint_checkpoint::{CheckpointManager, ManagerOptions, RunLayout, SaveRequest, StepName};
use waypoint_storage::{RetryPolicy, StoreOptions};
use waypoint_testkit::s3fault::{Call, Fault, FaultyS3};
use waypoint_testkit::{commit, training_state};

/// A 2 s deadline and 1 s requests; 5 MiB parts.
fn options() -> StoreOptions {
    StoreOptions {
        part_size: 5 << 20,
        max_concurrency: 2,
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            deadline: Duration::from_secs(2),
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        },
        fsync: false,
        checksum: Default::default(),
    }
}

async fn started(s3: &FaultyS3, prefix: &str, keep_last: Option<usize>) -> CheckpointManager {
    let mut m = CheckpointManager::new(
        s3.store(prefix, options()),
        RunLayout::new("upkeep", "waypoint").unwrap(),
        ManagerOptions {
            keep_last,
            ..Default::default()
        },
    );
    m.start_attempt(&serde_json::json!({})).await.unwrap();
    m
}

fn save(step: u64) -> SaveRequest {
    SaveRequest {
        commit: commit(step),
        dcp: Some(training_state(step)),
        sampler: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upkeep_that_fails_never_fails_the_save_and_the_next_save_does_it() {
    let Some(s3) = FaultyS3::start() else { return };
    let m = started(&s3, &waypoint_testkit::unique("upkeep"), Some(1)).await;
    m.save(save(1)).await.unwrap();
    // Retention's delete at the save of step 2 meets an outage longer than the deadline.
    s3.arm(Call::DeleteBatch, 1, Fault::Outage(Duration::from_secs(5)));
    let manifest = m.save(save(2)).await.expect("upkeep never fails a save");
    assert_eq!(manifest.step, 2);
    assert_eq!(s3.injected().len(), 1, "the fault was not injected");
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Retention did not happen: step 1 is still there, and dataloader.json may lack step 2.
    assert_eq!(waypoint_testkit::committed_steps(&m).await, [2, 1]);
    // The next save's upkeep does it all.
    m.save(save(3)).await.unwrap();
    assert_eq!(waypoint_testkit::committed_steps(&m).await, [3]);
    let dl = m.store().get(&m.layout().dataloader()).await.unwrap();
    let dl: serde_json::Value = serde_json::from_slice(&dl).unwrap();
    assert_eq!(
        dl.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["step-000003"]
    );
    assert!(m
        .store()
        .list(&m.layout().checkpoint_dir(StepName::new(1)))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_upload_the_server_lost_is_written_again() {
    let Some(s3) = FaultyS3::start() else { return };
    let m = started(&s3, &waypoint_testkit::unique("lost"), None).await;
    // A state big enough for a multipart upload.
    let mut state = training_state(5);
    let big = waypoint_checkpoint::Tensor::new(
        waypoint_checkpoint::dcp::model_key("model.layers.0.mlp.down_proj.weight"),
        waypoint_checkpoint::Dtype::F32,
        vec![1536, 1024],
        waypoint_testkit::pattern(1536 * 1024 * 4, 77).into(),
    )
    .unwrap();
    state.push(big);
    s3.arm(Call::Complete, 1, Fault::NoSuchUpload);
    let manifest = m
        .save(SaveRequest {
            commit: commit(5),
            dcp: Some(state.clone()),
            sampler: None,
        })
        .await
        .unwrap();
    assert_eq!(s3.injected().len(), 1, "the fault was not injected");
    assert!(m.check(&manifest, true).await.unwrap().is_empty());
    let mut got = m.load_tensors(&manifest, "dcp/", &|_| true).await.unwrap();
    got.sort_by(|a, b| a.name.cmp(&b.name));
    state.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(got, state);
}
