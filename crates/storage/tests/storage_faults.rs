//! Failure injection: transient errors are retried; a part that fails mid-upload aborts the write
//! cleanly, with nothing visible under the key.

use waypoint_testkit as common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::flaky::flaky_stores;
use common::{part_digest_hex, pattern};
use waypoint_storage::StorageError;

/// The part size of the flaky stores (digests are S3 composites of parts of this size).
const PART: usize = 1 << 20;

/// The retry deadline of the flaky stores that retry.
const DEADLINE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_of_the_first_calls_are_retried() {
    for (name, s, faults, _dir) in flaky_stores(DEADLINE) {
        // Far more failures than the old count of five retries: the deadline, not a count, decides.
        faults.fail_next_calls.store(40, Ordering::SeqCst);
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
        let mut w = waypoint_storage::BlobWriter::new(&s, "blob").unwrap();
        w.write(&data).await.unwrap();
        let info = w.finish().await.unwrap();
        assert_eq!(info.sha256, part_digest_hex(&data, PART), "{name}");
        assert_eq!(
            part_digest_hex(&s.get("blob").await.unwrap(), PART),
            info.sha256,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_past_the_deadline_fail_with_nothing_written() {
    for (name, s, faults, _dir) in flaky_stores(Duration::from_millis(300)) {
        faults.fail_next_calls.store(usize::MAX, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let err = s.put("k", Bytes::from_static(b"v")).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{name}: gave up after {took:?}"
        );
        faults.fail_next_calls.store(0, Ordering::SeqCst);
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
    for (name, s, faults, _dir) in flaky_stores(DEADLINE) {
        faults.fail_part.store(4, Ordering::SeqCst);
        let data = pattern(9 * 1024 * 1024 + 5, 11);
        let mut w = waypoint_storage::BlobWriter::new(&s, "ckpt/blob.safetensors").unwrap();
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
        let mut w = waypoint_storage::BlobWriter::new(&s, "ckpt/blob.safetensors").unwrap();
        w.write(&data).await.unwrap();
        let info = w.finish().await.unwrap();
        assert_eq!(
            part_digest_hex(&s.get("ckpt/blob.safetensors").await.unwrap(), PART),
            info.sha256,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_damaged_on_the_way_to_s3_is_rejected_and_retried() {
    let Ok(base) = std::env::var("WAYPOINT_TEST_S3_URI") else {
        assert!(
            std::env::var("WAYPOINT_REQUIRE_S3").is_err(),
            "WAYPOINT_REQUIRE_S3 is set but the S3 test server is not"
        );
        eprintln!("skipped: no S3 test server (scripts/test.sh starts one)");
        return;
    };
    let transport = common::flaky::CorruptingTransport::new(2);
    let store = waypoint_storage::Store::open_with_transport(
        &format!("{base}/{}", common::unique("wire")),
        waypoint_storage::StoreOptions {
            part_size: PART * 5,
            max_concurrency: 2,
            ..Default::default()
        },
        Some(transport.clone()),
    )
    .unwrap();
    let data = pattern(PART * 12 + 3, 21);
    let mut w = waypoint_storage::BlobWriter::new(&store, "blob").unwrap();
    w.write(&data).await.unwrap();
    let info = w.finish().await.unwrap();
    assert_eq!(
        transport.damaged.load(Ordering::SeqCst),
        1,
        "part 2 was damaged"
    );
    let answers = transport.answers.lock().unwrap().clone();
    eprintln!("the server answered the damaged part with HTTP {answers:?}");
    assert!(
        answers.len() == 1 && answers[0] >= 400,
        "the server must refuse the damaged part: {answers:?}"
    );
    // Retried with the intact bytes: what is stored is exactly what was written.
    assert_eq!(info.sha256, part_digest_hex(&data, PART * 5));
    assert!(
        store.get("blob").await.unwrap() == data,
        "stored bytes differ"
    );
}
