//! Crash consistency: a child process saves checkpoints in a loop and is SIGKILLed at seeded random
//! points, 50 times on local FS and 50 times on the S3-compatible server. After every kill, resume
//! discovery must return a checkpoint whose every tensor equals what was saved at that step — never a
//! partial one — and every checkpoint committed before the kill must still be there and intact.

use waypoint_testkit as common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use waypoint_checkpoint::{CheckpointManager, Dtype, ManagerOptions, SaveRequest, Tensor};
use waypoint_checkpoint::{RunLayout, StepName};
use waypoint_storage::Store;

const KILLS: u64 = 50;

/// About 3 MiB of state in several tensors, deterministic in the step, so a save takes long enough for
/// kills to land in the middle of it.
fn state(step: u64) -> Vec<Tensor> {
    let mut out = common::training_state(step);
    for i in 0..6u64 {
        let n = 128 * 1024 * (i as usize + 1) / 2;
        out.push(
            Tensor::new(
                format!("model.big.{i}.weight"),
                Dtype::F32,
                vec![n / 4],
                common::pattern(n, step * 1000 + i).into(),
            )
            .unwrap(),
        );
    }
    out
}

fn options() -> ManagerOptions {
    ManagerOptions {
        max_file_bytes: 1 << 20,
        ..Default::default()
    }
}

fn manager(base: &str) -> CheckpointManager {
    let store = Store::open(base).unwrap();
    CheckpointManager::new(store, RunLayout::new("crash", "hf").unwrap(), options())
}

/// The child: resumes after the newest checkpoint and saves forever, printing each commit. Not a test
/// of its own: the kill loops run it (`--ignored --exact crash_child`) as their child process.
#[test]
#[ignore = "child process of the SIGKILL tests, started by them"]
fn crash_child() {
    let Ok(base) = std::env::var("WAYPOINT_CRASH_CHILD") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut m = manager(&base);
        m.start_attempt(&serde_json::json!({"pid": std::process::id()}))
            .await
            .unwrap();
        let start = m
            .committed_steps()
            .await
            .unwrap()
            .first()
            .map(|s| s.step())
            .unwrap_or(0)
            + 1;
        for step in start.. {
            let request = SaveRequest {
                commit: common::commit(step),
                dcp: Some(state(step)),
                sampler: None,
            };
            m.save(request).await.unwrap();
            println!("committed {step}");
        }
    });
}

fn sorted(mut v: Vec<Tensor>) -> Vec<Tensor> {
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

async fn kill_loop(base: &str, seed: u64) {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let m = manager(base);
    let mut committed_before: BTreeSet<u64> = BTreeSet::new();
    let mut resumed_steps = Vec::new();
    let mut kills_without_commit = 0;
    for kill in 0..KILLS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("WAYPOINT_CRASH_CHILD", base)
            .env("RUST_LOG", "off")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Let it get going (its first commit, or half of the runs not even that), then kill at a
        // random point within the next save or two.
        let stdout = child.stdout.take().unwrap();
        let wait_first = next() % 2 == 0;
        let reader = std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            // The test harness prints its own lines first (`running 1 test`): skip to a commit.
            if wait_first {
                for line in lines.by_ref() {
                    if line.is_ok_and(|l| l.starts_with("committed")) {
                        break;
                    }
                }
            }
            lines
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(next() % 120));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let _ = reader.join();

        let steps: BTreeSet<u64> = common::committed_steps(&m).await.into_iter().collect();
        if steps == committed_before {
            kills_without_commit += 1;
        }
        assert!(
            committed_before.is_subset(&steps),
            "kill {kill}: committed checkpoints lost: {:?}",
            committed_before.difference(&steps).collect::<Vec<_>>()
        );
        let latest = m.latest_resumable(true).await.unwrap();
        let Some(latest) = latest else {
            assert!(
                steps.is_empty(),
                "kill {kill}: committed {steps:?} but none resumable"
            );
            continue;
        };
        assert_eq!(
            Some(&latest.step),
            steps.last(),
            "kill {kill}: the newest commit is intact"
        );
        let loaded = m.load_tensors(&latest, "dcp/", &|_| true).await.unwrap();
        assert_eq!(
            sorted(loaded),
            sorted(state(latest.step)),
            "kill {kill}: step {} differs",
            latest.step
        );
        assert_eq!(
            m.data_position(&latest).await.unwrap().data_consumed,
            latest.step * 64
        );
        for s in &committed_before {
            let earlier = m.manifest(StepName::new(*s)).await.unwrap();
            assert!(
                m.check(&earlier, false).await.unwrap().is_empty(),
                "kill {kill}: step {s} damaged"
            );
        }
        resumed_steps.push(latest.step);
        committed_before = steps;
    }
    eprintln!("{base}: {KILLS} kills; resume points {resumed_steps:?} ({kills_without_commit} kills made no new commit)");
    assert!(
        resumed_steps.last().copied().unwrap_or(0) >= 3,
        "the loop made progress: {resumed_steps:?}"
    );
    assert!(
        kills_without_commit >= 5,
        "kills must also land before a commit completes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_exposes_a_partial_checkpoint_local() {
    let dir = tempfile::tempdir().unwrap();
    kill_loop(dir.path().to_str().unwrap(), 0xC0FFEE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_exposes_a_partial_checkpoint_s3() {
    if let Some(s3) = common::s3_base() {
        kill_loop(&format!("{s3}/{}", common::unique("crash")), 0xBADC0DE).await;
    }
}
