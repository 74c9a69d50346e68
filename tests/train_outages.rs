//! The storage fault matrix of `waypoint train` against the real S3 test server (`s3s-fs` behind
//! the fault proxy of `waypoint_testkit::s3fault`, a server of its own per cell).
//!
//! A run trains in two attempts — 2 steps with a final resumable + promotable save, then resumed
//! to 6 steps with a save every 2, retention keeping 1, log uploads at every save and the final
//! checkpoint promoted — so it makes every kind of call of the save, resume, promotion, retention
//! and log-upload paths. Each cell injects one fault at one kind of call (the first, the middle or
//! the last of that kind in the run): the server killed for 2 s before it acts or after it acted
//! (its answer lost), frozen for longer than one request may take, or one `503 SlowDown`. Every
//! cell finishes with the same checkpoints, weights (sha256), losses and promoted model as an
//! uninterrupted run. A fault longer than the deadline ends the run FAILED (exit 1) in bounded time
//! with nothing half-visible. Two trainers of one run started at many offsets: the newer always
//! finishes, the older is fenced, the weights are an uninterrupted run's.

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{Duration, Instant};

use waypoint_checkpoint::{CheckpointManager, ManagerOptions, RunLayout, StepName};
use waypoint_storage::{RetryPolicy, StoreOptions};
use waypoint_testkit::s3fault::{cell_width, run_cells, Call, Fault, FaultyS3};

const RUN: &str = "outage";
const MODEL: &str = "outage-model";

/// The retry budget of the cells: 20 s deadline, 2 s per request (a 3 s freeze outlasts one).
const RETRY_SECS: &str = "20";
const TIMEOUT_SECS: &str = "2";

/// A random Llama big enough that its checkpoint files go up in several 5 MiB parts (made once by
/// `tests/python/hf_models.py`, in the venv).
fn model_dir() -> &'static str {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        common::root_python_script(
            "hf_models.py",
            &["make", path, "llama", "--hidden", "160", "--inter", "320"],
        );
        dir
    });
    dir.path().to_str().unwrap()
}

/// `waypoint train` on the faulty server: attempt 1 trains 2 steps, attempt 2 resumes to 6.
fn train(s3: &FaultyS3, attempt: u8, retry_secs: &str) -> std::process::Command {
    let steps = if attempt == 1 { "2" } else { "6" };
    let mut flags = vec![
        "--max_steps",
        steps,
        "--save_steps",
        "2",
        "--keep_last",
        "1",
        "--logging_steps",
        "1",
    ];
    if attempt == 2 {
        // Training on past attempt 1's 2 steps lengthens the schedule: a change asked for.
        flags.extend(["--output_model_id", MODEL, "--allow_config_change"]);
    }
    flags.extend(["--model_id", model_dir(), "--max_seq_len", "64"]);
    let mut cmd = common::waypoint();
    cmd.args(common::runs::train_args(
        "cpu",
        1,
        &flags,
        RUN,
        &s3.uri("runs"),
    ))
    .env("WAYPOINT_STORAGE_RETRY_SECS", retry_secs)
    .env("WAYPOINT_STORAGE_TIMEOUT_SECS", TIMEOUT_SECS)
    // 5 MiB parts (S3's smallest): the checkpoint's files go up in several.
    .env("WAYPOINT_STORAGE_PART_MB", "5");
    for (k, v) in s3.settings() {
        cmd.env(k, v);
    }
    cmd
}

/// Both attempts, each to its end; their outputs.
fn run_both(s3: &FaultyS3) -> (Output, Output) {
    let first = train(s3, 1, RETRY_SECS).output().unwrap();
    let second = train(s3, 2, RETRY_SECS).output().unwrap();
    (first, second)
}

/// What a finished run left: committed steps, the files of each checkpoint (path, bytes, sha256),
/// the loss of every step, the promoted model's files (sha256), and the final state.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    steps: Vec<u64>,
    files: BTreeMap<u64, Vec<(String, u64, String)>>,
    losses: BTreeMap<u64, u64>,
    promoted: BTreeMap<String, String>,
    state: String,
}

fn store_options() -> StoreOptions {
    StoreOptions {
        retry: RetryPolicy {
            deadline: Duration::from_secs(30),
            ..RetryPolicy::default()
        },
        ..StoreOptions::default()
    }
}

fn manager(s3: &FaultyS3) -> CheckpointManager {
    CheckpointManager::new(
        s3.store("runs", store_options()),
        RunLayout::new(RUN, "waypoint").unwrap(),
        ManagerOptions::default(),
    )
}

async fn outcome(s3: &FaultyS3) -> Outcome {
    let m = manager(s3);
    let store = m.store().clone();
    let mut files = BTreeMap::new();
    let steps: Vec<u64> = common::committed_steps(&m).await;
    for &step in &steps {
        let manifest = m.manifest(StepName::new(step)).await.unwrap();
        let problems = m.check(&manifest, true).await.unwrap();
        assert!(problems.is_empty(), "step {step} is damaged: {problems:?}");
        files.insert(
            step,
            manifest
                .files
                .iter()
                .map(|f| (f.path.clone(), f.bytes, f.sha256.clone()))
                .collect(),
        );
    }
    let metrics = store.get(&m.layout().metrics()).await.unwrap();
    let mut losses = BTreeMap::new();
    for line in String::from_utf8_lossy(&metrics).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            losses.insert(step, loss.to_bits());
        }
    }
    let mut promoted = BTreeMap::new();
    for o in store.list(&format!("models/{MODEL}")).await.unwrap() {
        // The promotion record holds times; the model's own files must be identical.
        if o.key.ends_with("waypoint_promotion.json") {
            continue;
        }
        let bytes = store.get(&o.key).await.unwrap();
        promoted.insert(o.key.clone(), common::sha256_hex(&bytes));
    }
    let status: serde_json::Value =
        serde_json::from_slice(&store.get(&m.layout().status()).await.unwrap()).unwrap();
    Outcome {
        steps,
        files,
        losses,
        promoted,
        state: status["state"].as_str().unwrap_or_default().to_string(),
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The uninterrupted run: its outcome and the number of calls of each kind it made.
fn baseline() -> Option<(Outcome, BTreeMap<Call, usize>)> {
    let s3 = FaultyS3::start()?;
    let (a, b) = run_both(&s3);
    common::train_log(&a);
    common::train_log(&b);
    let seen: BTreeMap<Call, usize> = s3.seen().into_iter().collect();
    let out = block_on(outcome(&s3));
    Some((out, seen))
}

/// Where a cell's fault lands: the `nth` call of its kind in the run, or (`after` set) the `nth`
/// after the first request whose key contains `after`.
#[derive(Debug, Clone, Copy)]
struct Place {
    call: Call,
    nth: usize,
    after: Option<&'static str>,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} #{}", self.call, self.nth)?;
        if let Some(after) = self.after {
            write!(f, " after {after}")?;
        }
        Ok(())
    }
}

/// The promotion's create-only record: the last landmark of a run; what follows it are the final
/// status and log uploads.
const PROMOTION_RECORD: &str = "waypoint_promotion.json";

/// Attempt 2's first commit (its first save, after resuming from attempt 1's step 2).
const ATTEMPT_2_FIRST_COMMIT: &str = "checkpoints/step-000004.json";

/// One cell: a fault at one place; the run must finish as the baseline did.
fn cell(place: Place, fault: Fault, want: &Outcome) -> Result<Duration, String> {
    let s3 = FaultyS3::start().expect("s3s-fs");
    s3.arm_where(place.call, place.after, place.nth, fault);
    let started = Instant::now();
    let (a, b) = run_both(&s3);
    let took = started.elapsed();
    let what = format!("{place} / {}", fault.name());
    for (i, out) in [&a, &b].into_iter().enumerate() {
        if !out.status.success() {
            return Err(format!(
                "{what}: attempt {} failed ({:?}):\n{}",
                i + 1,
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    if s3.injected().is_empty() {
        return Err(format!(
            "{what}: the fault was never injected (calls seen: {:?})",
            s3.seen()
        ));
    }
    let got = block_on(outcome(&s3));
    if &got != want {
        return Err(format!(
            "{what}: the run differs from the uninterrupted one:\n got {got:?}\nwant {want:?}"
        ));
    }
    Ok(took)
}

#[test]
fn a_run_rides_out_a_storage_fault_at_every_kind_of_call() {
    let Some((want, seen)) = baseline() else {
        return;
    };
    assert_eq!(want.state, "FINISHED");
    assert_eq!(want.steps, [6, 2], "{want:?}");
    eprintln!("the uninterrupted run's calls: {seen:?}");
    let faults = [
        Fault::Outage(Duration::from_secs(2)),
        Fault::LostAnswer(Duration::from_secs(2)),
        Fault::Freeze(Duration::from_secs(3)),
        Fault::SlowDown,
    ];
    // Every kind the run makes, each fault at its middle call (attempt 2's save path); the server
    // killed at the first and last call of the kinds every path makes too (attempt 1's start, and
    // the promotion with the final uploads). How many status and log writes a run makes depends on
    // the clock, so the middle and last Put are named by landmarks: the first Put after attempt
    // 2's first commit (the data position it records) and the first after the promotion.
    let at = |call, nth| Place {
        call,
        nth,
        after: None,
    };
    let mut cells = Vec::new();
    for (&call, &n) in &seen {
        if call == Call::Other || n == 0 {
            continue;
        }
        let middle = n.div_ceil(2);
        for fault in faults {
            let place = if call == Call::Put {
                Place {
                    call,
                    nth: 1,
                    after: Some(ATTEMPT_2_FIRST_COMMIT),
                }
            } else {
                at(call, middle)
            };
            cells.push((place, fault));
        }
        if matches!(call, Call::Put | Call::Create | Call::Get | Call::List) {
            for nth in [1, n] {
                if nth == middle {
                    continue;
                }
                let place = if call == Call::Put && nth == n {
                    Place {
                        call,
                        nth: 1,
                        after: Some(PROMOTION_RECORD),
                    }
                } else {
                    at(call, nth)
                };
                cells.push((place, faults[0]));
            }
        }
    }
    let kinds: Vec<Call> = seen.keys().copied().collect();
    for needed in [
        Call::Put,
        Call::Create,
        Call::StartUpload,
        Call::Part,
        Call::Complete,
        Call::Get,
        Call::GetRange,
        Call::Head,
        Call::List,
        Call::DeleteBatch,
    ] {
        assert!(
            kinds.contains(&needed),
            "the run made no {needed:?} call: {seen:?}"
        );
    }
    let started = Instant::now();
    // Cells mostly wait out their faults: several at once, each on a server of its own.
    let results = run_cells(
        &cells,
        cell_width(),
        |&(place, fault)| {
            std::panic::catch_unwind(|| cell(place, fault, &want))
                .unwrap_or_else(|_| Err(format!("{place} / {}: panicked", fault.name())))
        },
        |&(place, fault), result| match result {
            Ok(took) => eprintln!(
                "{place} / {}: finished as uninterrupted in {took:.1?}",
                fault.name()
            ),
            Err(e) => eprintln!("FAILED {e}"),
        },
    );
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    eprintln!(
        "fault matrix: {} cells over {} kinds of call in {:.0?}",
        cells.len(),
        seen.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{} cells failed", failures.len());
}

/// A freeze longer than the deadline at attempt 2's first checkpoint commit: the save fails within
/// the deadline plus one request timeout, the run ends FAILED (exit 1) with the cause in
/// `status.json` (written once the server answers again), and everything committed is whole.
#[test]
fn a_fault_longer_than_the_deadline_fails_the_run_in_bounded_time() {
    let Some(s3) = FaultyS3::start() else {
        return;
    };
    let (deadline, timeout) = (4u64, 2u64);
    common::train_log(&train(&s3, 1, RETRY_SECS).output().unwrap());
    // Attempt 2's creates: its attempt record, then the manifest of step 4.
    s3.arm(Call::Create, 2, Fault::Freeze(Duration::from_secs(9)));
    let out = train(&s3, 2, &deadline.to_string()).output().unwrap();
    let ended = Instant::now();
    let injected_at = s3.injected_at().expect("the freeze was injected");
    let took = ended - injected_at;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    eprintln!("attempt 2 failed {took:.1?} after the server froze: {error}");
    assert!(error.contains("step-000004"), "{log}");
    // The save's calls end within deadline + one request timeout; the status write after them
    // waits for the server (at most as long again).
    let bound = Duration::from_secs(2 * (deadline + timeout) + 2);
    assert!(took <= bound, "took {took:?}, more than {bound:?}");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(injected_at.elapsed()));
    block_on(async {
        let m = manager(&s3);
        let status: serde_json::Value =
            serde_json::from_slice(&m.store().get(&m.layout().status()).await.unwrap()).unwrap();
        assert_eq!(status["state"], "FAILED", "{status}");
        assert!(
            status["error"]
                .as_str()
                .is_some_and(|e| e.contains("step-000004")),
            "{status}"
        );
        // Nothing half-visible: every committed checkpoint is whole (the frozen commit may have
        // landed once the server woke, with all of its files).
        for step in m.committed_steps().await.unwrap() {
            let manifest = m.manifest(step).await.unwrap();
            assert!(
                m.check(&manifest, true).await.unwrap().is_empty(),
                "{step} is not whole"
            );
        }
    });
    // And the run goes on from there.
    common::train_log(&train(&s3, 2, RETRY_SECS).output().unwrap());
}

/// Two trainers of one run, the second started at many offsets after the first: the one with the
/// newer attempt always finishes, the older one is fenced (unless it finished before the newer one
/// started), and the final weights are an uninterrupted run's.
#[test]
fn of_two_trainers_of_one_run_the_newer_always_wins() {
    let Some(s3) = FaultyS3::start() else {
        return;
    };
    let args = |run: &str| {
        let mut cmd = common::waypoint();
        cmd.args(common::runs::train_args(
            "cpu",
            1,
            &[
                "--max_steps",
                "30",
                "--save_steps",
                "2",
                "--logging_steps",
                "1",
            ],
            run,
            &s3.uri("runs"),
        ))
        .env("WAYPOINT_STORAGE_RETRY_SECS", RETRY_SECS)
        .env("WAYPOINT_STORAGE_TIMEOUT_SECS", TIMEOUT_SECS);
        for (k, v) in s3.settings() {
            cmd.env(k, v);
        }
        cmd
    };
    let final_files = |run: &str| {
        block_on(async {
            let m = CheckpointManager::new(
                s3.store("runs", store_options()),
                RunLayout::new(run, "waypoint").unwrap(),
                ManagerOptions::default(),
            );
            let latest = m
                .latest_resumable(true)
                .await
                .unwrap()
                .expect("a checkpoint");
            assert_eq!(latest.step, 30);
            let status: serde_json::Value =
                serde_json::from_slice(&m.store().get(&m.layout().status()).await.unwrap())
                    .unwrap();
            let files: Vec<(String, String)> = latest
                .files
                .iter()
                .map(|f| (f.path.clone(), f.sha256.clone()))
                .collect();
            (
                files,
                status["state"].as_str().unwrap_or_default().to_string(),
            )
        })
    };
    common::train_log(&args("alone").output().unwrap());
    let (want, _) = final_files("alone");
    let attempt_of = |log: &str| -> Option<u64> {
        let line = log.lines().find(|l| l.contains("attempt started"))?;
        common::runs::logged_number(line, "attempt=")
    };
    let started = Instant::now();
    for (i, offset_ms) in [0u64, 150, 400, 700, 1000, 1400, 1900, 2500]
        .into_iter()
        .enumerate()
    {
        let run = format!("pair{i}");
        let first = args(&run)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(offset_ms));
        let second = args(&run)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (a, b) = (
            first.wait_with_output().unwrap(),
            second.wait_with_output().unwrap(),
        );
        let (la, lb) = (
            String::from_utf8_lossy(&a.stderr).to_string(),
            String::from_utf8_lossy(&b.stderr).to_string(),
        );
        let (older, newer) = match (attempt_of(&la), attempt_of(&lb)) {
            (Some(x), Some(y)) if x < y => ((&a, &la), (&b, &lb)),
            (Some(_), Some(_)) => ((&b, &lb), (&a, &la)),
            other => panic!("offset {offset_ms} ms: attempts not found {other:?}:\n{la}\n{lb}"),
        };
        assert!(
            newer.0.status.success(),
            "offset {offset_ms} ms: the newer attempt failed:\n{}",
            newer.1
        );
        let older_outcome = if older.0.status.success() {
            "finished before the newer one took over"
        } else {
            assert!(
                older.1.contains("fenced off by newer attempt"),
                "offset {offset_ms} ms: the older attempt failed otherwise than fenced:\n{}",
                older.1
            );
            "fenced"
        };
        let (got, state) = final_files(&run);
        assert_eq!(got, want, "offset {offset_ms} ms: weights differ");
        assert_eq!(state, "FINISHED", "offset {offset_ms} ms");
        let set_aside = newer.1.contains("set it aside") || newer.1.contains("adopted");
        eprintln!(
            "offset {offset_ms} ms: the newer attempt finished, the older {older_outcome}{}",
            if set_aside {
                "; a late commit of the older one was set aside or adopted"
            } else {
                ""
            }
        );
    }
    eprintln!("8 offsets in {:.0?}", started.elapsed());
}
