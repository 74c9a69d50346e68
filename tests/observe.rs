//! Watching a run: the TensorBoard event files load in TensorBoard's own reader with the values of
//! `logs/metrics.jsonl`, each step once, also after a SIGKILL and a resume; `logs/loss.svg` is a valid
//! image, redrawn after the resume; `logs/train.log` holds both attempts' lines without colour codes
//! or secrets; `waypoint status` reports a running, a cancelled, a finished and a failed run. Locally
//! and on the S3-compatible server.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::runs::{logged_step, read_until};
use serde_json::Value;
use waypoint_storage::Store;

/// Fake AWS keys in the environment of the local runs: they must end up in no file of the run.
const FAKE_KEY_ID: &str = "AKIAOBSERVEFAKEKEYID";
const FAKE_SECRET: &str = "observeFakeSecretAccessKey0123456789";

fn train_args(base: &str, run_id: &str, steps: u64, save_steps: u64) -> Vec<String> {
    let (steps, save_steps) = (steps.to_string(), save_steps.to_string());
    let flags = [
        "--max_steps",
        &steps,
        "--save_steps",
        &save_steps,
        "--eval_steps",
        "5",
        "--eval_dataset_uri",
        "builtin:demo",
        "--logging_steps",
        "1",
    ];
    common::runs::train_args("cpu", 1, &flags, run_id, base)
}

/// The AWS keys a run started by [`train`] sees: the environment's (the S3 test server's), else
/// the fake ones it is given.
fn keys_in_env() -> Vec<String> {
    match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(id), Ok(secret)) if !secret.is_empty() => vec![id, secret],
        _ => vec![FAKE_KEY_ID.into(), FAKE_SECRET.into()],
    }
}

fn train(args: &[String]) -> std::process::Command {
    let mut c = common::waypoint();
    c.args(args);
    if std::env::var_os("AWS_SECRET_ACCESS_KEY").is_none() {
        c.env("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", FAKE_SECRET);
    }
    c
}

/// Starts a run, follows its log until checkpoint `committed` is committed and training step `step`
/// or later is reported, SIGKILLs it; returns the step seen.
fn kill_after_step(args: &[String], committed: u64, step: u64) -> u64 {
    let mut child = common::spawn_logged(&mut train(args));
    let checkpoint = format!("checkpoint=step-{committed:06}");
    let mut saved = false;
    let (line, rest) = read_until(&mut child, |l| {
        saved |= l.contains("checkpoint committed rank=0") && l.contains(&checkpoint);
        saved && logged_step(l).is_some_and(|s| s >= step)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    drop(rest.join());
    logged_step(&line).unwrap()
}

fn run_to_end(args: &[String]) -> String {
    common::train_log(&train(args).output().unwrap())
}

/// What TensorBoard's reader makes of a run's `logs/` folder (tests/python/tensorboard_events.py).
fn read_logs(logs: &Path) -> Value {
    let out = common::root_python_script("tensorboard_events.py", &[logs.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

/// The lines of `logs/metrics.jsonl`, by step.
fn metrics_by_step(text: &str) -> BTreeMap<u64, Value> {
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["step"].as_u64().unwrap(), v))
        .collect()
}

/// Every curve TensorBoard shows has each step once, with the value metrics.jsonl holds (as the
/// f32 of a TensorBoard scalar); train/loss covers steps 1..=total without a gap.
fn assert_events_match_metrics(seen: &Value, metrics: &BTreeMap<u64, Value>, total: u64) {
    let scalars = &seen["scalars"];
    for (field, tag) in [
        ("loss", "train/loss"),
        ("lr", "train/lr"),
        ("grad_norm", "train/grad_norm"),
        ("tokens_per_s", "train/tokens_per_s"),
        ("eval_loss", "eval/loss"),
        ("save_stall_s", "checkpoint/save_stall_s"),
        ("save_snapshot_s", "checkpoint/snapshot_s"),
        ("save_upload_s", "checkpoint/upload_s"),
        ("save_commit_latency_s", "checkpoint/commit_latency_s"),
        ("save_overlap_slowdown", "checkpoint/overlap_slowdown"),
    ] {
        let expected: Vec<(u64, f32)> = metrics
            .iter()
            .filter_map(|(s, l)| l[field].as_f64().map(|v| (*s, v as f32)))
            .collect();
        // (A tag with no scalar at all is absent.)
        let got: Vec<(u64, f32)> = scalars[tag]
            .as_array()
            .map(|points| {
                points
                    .iter()
                    .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
                    .collect()
            })
            .unwrap_or_default();
        // (A save stall is recorded only on a step a save held up; a save's report at the step its
        // commit is seen, when that is before the end — the local run checks them apart.)
        assert!(
            !expected.is_empty() || field.starts_with("save_"),
            "metrics.jsonl has no {field}"
        );
        assert_eq!(got, expected, "{tag} differs from metrics.jsonl's {field}");
    }
    let loss_steps: Vec<u64> = scalars["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(loss_steps, (1..=total).collect::<Vec<_>>());
    // Goodput goes in with progress.json (every few seconds, the first step included): a ratio.
    let goodput = scalars["goodput/goodput"]
        .as_array()
        .expect("goodput/goodput");
    assert!(
        goodput
            .iter()
            .all(|p| (0.0..=1.0).contains(&p[1].as_f64().unwrap())),
        "{goodput:?}"
    );
    assert!(scalars["goodput/lost_s"].is_array() && scalars["goodput/steps_redone"].is_array());
}

/// The point counts of the plot's polylines, after checking it is an SVG of the plot's size.
/// The logs of a run that ended after one resume: its events equal `metrics.jsonl` up to `steps`,
/// the plot reaches `steps`, and there are two event files (one per attempt). Returns what was read
/// ([`read_logs`]) and the last step the first (killed) attempt's file recorded.
fn resumed_logs(logs: &Path, steps: u64) -> (Value, Option<u64>) {
    let seen = read_logs(logs);
    let metrics = metrics_by_step(&std::fs::read_to_string(logs.join("metrics.jsonl")).unwrap());
    assert_events_match_metrics(&seen, &metrics, steps);
    assert_eq!(plot_points(&seen).iter().max(), Some(&steps));
    let files = seen["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    let first_max = files[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .max();
    (seen, first_max)
}

fn plot_points(seen: &Value) -> Vec<u64> {
    let plot = &seen["plot"];
    assert_eq!(plot["tag"], "{http://www.w3.org/2000/svg}svg", "{plot}");
    assert_eq!(
        (plot["width"].as_u64(), plot["height"].as_u64()),
        (Some(960), Some(540))
    );
    plot["polylines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect()
}

fn assert_no_secrets(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "{what} holds the secret {s:?}");
    }
}

/// `waypoint status <run> --json`.
fn status_json(run: &str) -> Value {
    let out = common::waypoint()
        .args(["status", run, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "waypoint status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `waypoint status <run>`, the screen.
fn status_screen(run: &str) -> String {
    let out = common::waypoint().args(["status", run]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Steps of the local SIGKILL-and-resume run (checkpoints every 10).
const STEPS: u64 = 40;

#[test]
fn events_plot_and_log_survive_a_sigkill_and_resume_locally() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let args = train_args(base, "tb", STEPS, 10);
    let run = dir.path().join("tb/framework=waypoint");
    let logs = run.join("logs");

    let killed_at = kill_after_step(&args, 20, 25);
    let log = std::fs::read_to_string(logs.join("train.log")).unwrap();
    // Written line by line: the killed attempt's last reported step is in the file.
    assert!(
        log.contains(&format!("train step={killed_at} ")),
        "train.log lacks step {killed_at}:\n{log}"
    );
    let before = read_logs(&logs);
    // Drawn at the checkpoint of step 20: train loss and lr have 20 points.
    assert_eq!(plot_points(&before).iter().max(), Some(&20));

    run_to_end(&args);
    // Redrawn after the resume, to the last step. One file per attempt; the killed one recorded
    // steps past its checkpoint (which TensorBoard dropped), the resumed one starts with a session
    // start at step 21.
    let (after, first_max) = resumed_logs(&logs, STEPS);
    assert!(first_max.is_some_and(|s| s > 20), "{first_max:?}");
    assert_eq!(after["files"][1]["session_starts"], serde_json::json!([21]));
    // Save times at every checkpoint, once each.
    let saves: Vec<u64> = after["scalars"]["checkpoint/save_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(saves, [10, 20, 30, 40]);
    // Each background save's report, on the line of the step at which its commit was seen: the
    // commit comes after the step, the upload within that.
    let metrics = metrics_by_step(&std::fs::read_to_string(logs.join("metrics.jsonl")).unwrap());
    let reported: Vec<u64> = metrics
        .iter()
        .filter_map(|(step, l)| {
            let saved = l["save_step"].as_u64()?;
            let (upload, latency) = (
                l["save_upload_s"].as_f64()?,
                l["save_commit_latency_s"].as_f64()?,
            );
            assert!(saved <= *step && 0.0 < upload && upload <= latency, "{l}");
            assert!(l["save_snapshot_s"].as_f64()? >= 0.0, "{l}");
            Some(saved)
        })
        .collect();
    assert!(
        reported.contains(&10) && reported.contains(&30),
        "save reports for {reported:?}"
    );
    assert!(!after["scalars"]["checkpoint/save_stall_s"]
        .as_array()
        .unwrap()
        .is_empty());

    // The log: both attempts, appended; no colour codes; no secret.
    let log = std::fs::read_to_string(logs.join("train.log")).unwrap();
    assert!(log.contains("attempt started attempt=1") && log.contains("attempt started attempt=2"));
    assert!(log.find("attempt=1").unwrap() < log.find("attempt=2").unwrap());
    assert!(log.contains(&format!("train step={STEPS} ")));
    assert!(!log.contains('\u{1b}'), "colour codes in train.log");
    assert_no_secrets(
        "the run folder",
        &common::all_text_under(&run),
        &keys_in_env(),
    );
}

#[test]
fn status_reports_running_cancelled_finished_and_failed_runs() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();

    // Running: a long run, watched once its progress is recorded; then stopped by SIGTERM.
    let run = format!("{base}/long/framework=waypoint");
    let mut child = common::spawn_logged(&mut train(&train_args(base, "long", 5000, 50)));
    let (_, rest) = read_until(&mut child, |l| logged_step(l).is_some_and(|s| s >= 1));
    let started = Instant::now();
    let progress = dir
        .path()
        .join("long/framework=waypoint/logs/progress.json");
    let running = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress.json"
        );
        if progress.exists() {
            let s = status_json(&run);
            if s["step"].as_u64() > Some(1) && s["steps_per_s"].is_number() {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(running["state"], "RUNNING", "{running}");
    assert_eq!(running["total_steps"], 5000);
    assert!(running["eta_s"].as_f64().unwrap() > 0.0, "{running}");
    assert!(running["loss"].as_f64().unwrap().is_finite());
    assert!(running["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(running["stale"], false);
    let screen = status_screen(&run);
    assert!(
        screen.contains("RUNNING (attempt 1)") && screen.contains(" / 5000 ("),
        "{screen}"
    );
    common::send_signal(child.id(), "TERM").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(143));
    drop(rest.join());
    let cancelled = status_json(&run);
    assert_eq!(cancelled["state"], "CANCELLED");
    let step = cancelled["step"].as_u64().unwrap();
    assert_eq!(
        cancelled["resumable_checkpoint"],
        format!("step-{step:06}"),
        "{cancelled}"
    );
    assert!(cancelled["error"]
        .as_str()
        .unwrap()
        .contains("stopped by signal 15"));
    assert_eq!(cancelled["eta_s"], Value::Null);

    // Finished.
    let run = format!("{base}/short/framework=waypoint");
    run_to_end(&train_args(base, "short", 12, 5));
    let finished = status_json(&run);
    assert_eq!(finished["state"], "FINISHED", "{finished}");
    assert_eq!(
        (finished["step"].as_u64(), finished["progress"].as_f64()),
        (Some(12), Some(1.0))
    );
    assert_eq!(finished["resumable_checkpoint"], "step-000012");
    assert_eq!(finished["promotable_checkpoint"], "step-000012");
    assert_eq!(finished["error"], Value::Null);
    let screen = status_screen(&run);
    assert!(
        screen.contains("FINISHED") && screen.contains("12 / 12 (100.0%)"),
        "{screen}"
    );

    // Failed: a libtorch error in step 8; the last checkpoint is step 5.
    let run = format!("{base}/broken/framework=waypoint");
    let out = train(&train_args(base, "broken", 12, 5))
        .env("WAYPOINT_FAULT_INJECT_STEP", "8")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let failed = status_json(&run);
    assert_eq!(failed["state"], "FAILED", "{failed}");
    assert_eq!(failed["step"], 7);
    assert_eq!(failed["resumable_checkpoint"], "step-000005");
    assert_eq!(failed["promotable_checkpoint"], Value::Null);
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("training step 8 failed in libtorch"),
        "{error}"
    );
    assert!(status_screen(&run).contains("error       training step 8 failed"));
    // The error is the last thing train.log says.
    let log = std::fs::read_to_string(dir.path().join("broken/framework=waypoint/logs/train.log"))
        .unwrap();
    let last = log.lines().last().unwrap();
    assert!(last.starts_with("error: training step 8 failed"), "{last}");

    // Failed before training began (a bad row in the data): the error still ends train.log.
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n{\"oops\n").unwrap();
    let mut args = train_args(base, "early", 12, 5);
    args.extend([
        "--dataset_uri".to_string(),
        data.to_str().unwrap().to_string(),
    ]);
    assert_eq!(train(&args).output().unwrap().status.code(), Some(1));
    let run = format!("{base}/early/framework=waypoint");
    let failed = status_json(&run);
    assert_eq!(failed["state"], "FAILED", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("line 2"),
        "{failed}"
    );
    let log = std::fs::read_to_string(dir.path().join("early/framework=waypoint/logs/train.log"))
        .unwrap();
    let last = log.lines().last().unwrap();
    assert!(
        last.starts_with("error: --dataset_uri") && last.contains("line 2"),
        "{last}"
    );

    // No run there: an error naming the URI.
    let out = common::waypoint()
        .args(["status", &format!("{base}/nothing/framework=waypoint")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no status.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_run_uploads_its_logs_and_events_without_secrets() {
    let Some(s3) = common::s3_base() else {
        return;
    };
    let base = format!("{s3}/{}", common::unique("observe"));
    let steps = 20;
    let args = train_args(&base, "s3", steps, 10);
    let killed_at = kill_after_step(&args, 10, 13);
    let stderr = run_to_end(&args);
    let run = format!("{base}/s3/framework=waypoint");

    // Everything under the run, downloaded as it is stored.
    let store = Store::open(&run).unwrap();
    let local = tempfile::tempdir().unwrap();
    for object in store.list("").await.unwrap() {
        let bytes = store.get(&object.key).await.unwrap();
        let path = local.path().join(&object.key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let logs = local.path().join("logs");
    // The killed attempt's events went up at its checkpoint (step 10), not after.
    let (_, first_max) = resumed_logs(&logs, steps);
    assert!(
        first_max.is_some_and(|s| (10..steps).contains(&s)),
        "{first_max:?} {killed_at}"
    );

    // train.log: appended per attempt (the store's copy read back at the start).
    let log = std::fs::read_to_string(logs.join("train.log")).unwrap();
    assert!(log.contains("attempt started attempt=1") && log.contains("attempt started attempt=2"));
    assert!(log.contains(&format!("train step={steps} ")));

    let status = status_json(&run);
    assert_eq!(status["state"], "FINISHED", "{status}");
    assert_eq!(status["resumable_checkpoint"], format!("step-{steps:06}"));

    // The credentials the run used are in no object of the run, nor in what it printed.
    // (The test server's key id also names its bucket, so it is checked only where the URI is not.)
    let secrets = keys_in_env();
    assert_ne!(
        secrets[1], FAKE_SECRET,
        "the S3 test server's keys are not in the environment"
    );
    let secrets: Vec<String> = secrets.into_iter().filter(|k| !run.contains(k)).collect();
    assert!(!secrets.is_empty());
    assert_no_secrets(
        "the run on S3",
        &common::all_text_under(local.path()),
        &secrets,
    );
    assert_no_secrets("stderr", &stderr, &secrets);
}

#[test]
fn on_a_terminal_train_log_keeps_the_step_lines_the_bar_stands_for_without_colour() {
    // `script` (util-linux) gives the run a terminal: colour codes and a progress bar on it.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("this test needs `script` (util-linux) to give the run a terminal");
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let command = format!(
        "{} {}",
        env!("CARGO_BIN_EXE_waypoint"),
        train_args(base, "tty", 12, 5).join(" ")
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{terminal}");
    assert!(
        terminal.contains('\u{1b}'),
        "no colour on the terminal:\n{terminal}"
    );
    assert!(
        !terminal.contains("train step="),
        "step lines beside the bar:\n{terminal}"
    );
    let log =
        std::fs::read_to_string(dir.path().join("tty/framework=waypoint/logs/train.log")).unwrap();
    assert!(!log.contains('\u{1b}'), "colour codes in train.log:\n{log}");
    for step in [1, 5, 10, 12] {
        assert!(
            log.contains(&format!("train step={step} ")),
            "no step {step}:\n{log}"
        );
    }
    assert!(log.contains("checkpoint committed"));
}
