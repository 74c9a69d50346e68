//! Every kind of storage call rides out a transient fault of the real S3 test server (`s3s-fs`
//! behind the fault proxy of `waypoint_testkit::s3fault`), injected at that kind of call: the server
//! killed for 2 s (before it acts, or after it acted with its answer lost), frozen for longer than
//! one request may take, or one `503 SlowDown`. A fault longer than the deadline fails the call
//! within the deadline plus one request timeout, with nothing half-visible.

use std::time::{Duration, Instant};

use bytes::Bytes;
use waypoint_storage::{BlobWriter, RetryPolicy, Store, StoreOptions};
use waypoint_testkit::s3fault::{cell_width, run_cells, Call, Fault, FaultyS3};
use waypoint_testkit::{part_digest_hex, pattern};

/// S3's smallest part (except the last).
const PART: usize = 5 << 20;

/// Requests time out after 2 s (a 3 s freeze outlasts one); retries go on for 20 s.
fn options() -> StoreOptions {
    StoreOptions {
        part_size: PART,
        max_concurrency: 2,
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            deadline: Duration::from_secs(20),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        },
        fsync: false,
        checksum: Default::default(),
    }
}

const FAULTS: [Fault; 4] = [
    Fault::Outage(Duration::from_secs(2)),
    Fault::LostAnswer(Duration::from_secs(2)),
    Fault::Freeze(Duration::from_secs(3)),
    Fault::SlowDown,
];

/// The kinds of call a store makes: all but the single `DELETE` (a delete goes as a batch
/// `POST ?delete`).
fn calls() -> impl Iterator<Item = Call> {
    Call::ALL.into_iter().filter(|c| *c != Call::Delete)
}

/// Does the work that makes a `call` on a store, with the fault armed for the first one, and checks
/// the outcome is as if nothing had happened.
async fn exercise(s3: &FaultyS3, s: &Store, call: Call, fault: Fault) {
    let small = Bytes::from(pattern(3000, 5));
    let big = pattern(PART * 2 + 77, 7);
    let arm = || s3.arm(call, 1, fault);
    match call {
        Call::Put => {
            arm();
            s.put("k", small.clone()).await.unwrap();
            assert_eq!(s.get("k").await.unwrap(), small);
        }
        Call::Create => {
            arm();
            s.put_create("c", small.clone()).await.unwrap();
            assert_eq!(s.get("c").await.unwrap(), small);
        }
        Call::StartUpload | Call::Part | Call::Complete => {
            arm();
            let mut w = BlobWriter::new(s, "blob").unwrap();
            w.write(&big).await.unwrap();
            let info = w.finish().await.unwrap();
            assert_eq!(info.sha256, part_digest_hex(&big, PART));
            assert!(s.get("blob").await.unwrap() == big, "stored bytes differ");
        }
        Call::Abort => {
            let mut w = BlobWriter::new(s, "aborted").unwrap();
            w.write(&big[..PART + 1]).await.unwrap();
            arm();
            w.abort().await.unwrap();
            assert!(!s.exists("aborted").await.unwrap());
            assert_eq!(s3.server.pending_uploads(), 0, "the upload was not aborted");
        }
        Call::Get | Call::GetRange | Call::Head | Call::List | Call::DeleteBatch | Call::Copy => {
            s.put("k", small.clone()).await.unwrap();
            arm();
            match call {
                Call::Get => assert_eq!(s.get("k").await.unwrap(), small),
                Call::GetRange => {
                    assert_eq!(
                        s.get_range("k", 10..2010).await.unwrap(),
                        small.slice(10..2010)
                    )
                }
                Call::Head => assert_eq!(s.head("k").await.unwrap().size, 3000),
                Call::List => assert_eq!(s.list("").await.unwrap().len(), 1),
                Call::DeleteBatch => {
                    s.delete("k").await.unwrap();
                    assert!(!s.exists("k").await.unwrap());
                }
                _ => {
                    s.copy("k", "k2").await.unwrap();
                    assert_eq!(s.get("k2").await.unwrap(), small);
                }
            }
        }
        other => panic!("no scenario for {other:?}"),
    }
    let injected = s3.injected();
    assert_eq!(
        injected.len(),
        1,
        "{call:?}/{}: the fault was not injected (seen {:?})",
        fault.name(),
        s3.seen()
    );
}

/// One cell on a server of its own.
fn cell(call: Call, fault: Fault) -> Option<Duration> {
    let s3 = FaultyS3::start()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(async {
        let s = s3.store(&waypoint_testkit::unique("cell"), options());
        exercise(&s3, &s, call, fault).await;
    });
    Some(started.elapsed())
}

#[test]
fn every_kind_of_call_rides_out_every_transient_fault() {
    let cells: Vec<(Call, Fault)> = calls()
        .flat_map(|c| FAULTS.iter().map(move |f| (c, *f)))
        .collect();
    let started = Instant::now();
    // Cells mostly wait out their faults: several at once, each on a server of its own.
    let results = run_cells(
        &cells,
        cell_width(),
        |&(call, fault)| std::panic::catch_unwind(|| cell(call, fault)).ok(),
        |&(call, fault), result| match result {
            Some(Some(took)) => eprintln!("{call:?} / {}: ridden out in {took:.1?}", fault.name()),
            Some(None) => {}
            None => eprintln!("FAILED {call:?} / {} (see above)", fault.name()),
        },
    );
    if results.iter().any(|r| matches!(r, Some(None))) {
        return; // no s3s-fs
    }
    let failed = results.iter().filter(|r| r.is_none()).count();
    let ran = results.len();
    eprintln!(
        "{ran} cells ({} kinds of call x {} faults) in {:.1?}",
        calls().count(),
        FAULTS.len(),
        started.elapsed()
    );
    assert_eq!(failed, 0, "{failed} cells failed");
}

/// Longer than the deadline: the call fails within the deadline plus one request timeout, and a
/// streaming write leaves nothing visible.
#[test]
fn an_outage_longer_than_the_deadline_fails_in_bounded_time_with_nothing_visible() {
    let Some(s3) = FaultyS3::start() else { return };
    let retry = RetryPolicy {
        deadline: Duration::from_secs(4),
        ..options().retry
    };
    let opts = StoreOptions { retry, ..options() };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = s3.store(&waypoint_testkit::unique("long"), opts);
        let big = pattern(PART * 2 + 77, 9);
        // The second part's upload takes the server down for longer than the deadline.
        s3.arm(Call::Part, 2, Fault::Outage(Duration::from_secs(9)));
        let started = Instant::now();
        let mut w = BlobWriter::new(&s, "blob").unwrap();
        let result = match w.write(&big).await {
            Ok(()) => w.finish().await.map(|_| ()),
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        let err = result.expect_err("a 9 s outage outlasts a 4 s deadline");
        eprintln!("failed after {took:.1?}: {err}");
        let bound = retry.give_up_after() + Duration::from_secs(1);
        assert!(took <= bound, "took {took:?}, more than {bound:?}");
        assert!(
            took >= retry.deadline,
            "gave up before the deadline: {took:?}"
        );
        // Once the server is back, nothing of the write is visible.
        tokio::time::sleep(Duration::from_secs(9) - took.min(Duration::from_secs(9))).await;
        assert!(!s.exists("blob").await.unwrap(), "half a blob visible");
        // A commit during such an outage fails in the same bound and leaves nothing either.
        s3.arm(Call::Create, 1, Fault::Outage(Duration::from_secs(9)));
        let started = Instant::now();
        let err = s
            .put_create("manifest", Bytes::from_static(b"{}"))
            .await
            .expect_err("the commit cannot land");
        let took = started.elapsed();
        eprintln!("commit failed after {took:.1?}: {err}");
        assert!(took <= bound, "took {took:?}, more than {bound:?}");
        tokio::time::sleep(Duration::from_secs(9) - took.min(Duration::from_secs(9))).await;
        assert!(
            !s.exists("manifest").await.unwrap(),
            "a commit that failed is visible"
        );
    });
}

/// A server that lost a multipart upload (answers its completion `NoSuchUpload`): the write fails
/// as [`waypoint_storage::StorageError::UploadLost`] (so the caller may write it again), with
/// nothing visible.
#[test]
fn a_lost_upload_is_reported_as_such_with_nothing_visible() {
    let Some(s3) = FaultyS3::start() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = s3.store(&waypoint_testkit::unique("lost"), options());
        s3.arm(Call::Complete, 1, Fault::NoSuchUpload);
        let mut w = BlobWriter::new(&s, "blob").unwrap();
        w.write(&pattern(PART + 10, 3)).await.unwrap();
        let err = w.finish().await.unwrap_err();
        assert!(
            matches!(err, waypoint_storage::StorageError::UploadLost { .. }),
            "{err}"
        );
        assert!(!s.exists("blob").await.unwrap());
    });
}
