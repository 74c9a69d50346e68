//! Exact resume, on CPU: a run SIGKILLed at random steps and restarted each time ends with weights and
//! optimizer state bit-identical to an uninterrupted run's, and the same loss at every step; on
//! SIGTERM the trainer saves the current step within 10 s and exits 143, and the restart redoes no
//! step. Locally and on the S3-compatible server.

mod common;

use std::collections::BTreeMap;
use std::process::Child;
use std::time::{Duration, Instant};

use common::runs::{manager, read_until};
use waypoint_checkpoint::RunLayout;
use waypoint_storage::Store;

const STEPS: u64 = 60;

/// The flags of every run; runs whose id starts with `lora` train rank-4 adapters with dropout (so
/// resuming must restore libtorch's generator too).
fn train_args(base: &str, run_id: &str) -> Vec<String> {
    let lora: &[&str] = if run_id.starts_with("lora") {
        &["--lora_rank", "4", "--lora_dropout", "0.1"]
    } else {
        &[]
    };
    let steps = STEPS.to_string();
    let flags = [
        "--max_steps",
        &steps,
        "--save_steps",
        "7",
        "--keep_last",
        "2",
        "--batch_size",
        "4",
        "--gradient_accumulation",
        "2",
        "--logging_steps",
        "1",
    ];
    let mut args = common::runs::train_args("cpu", 2, &flags, run_id, base);
    args.extend(lora.iter().map(|s| s.to_string()));
    args
}

fn spawn(base: &str, run_id: &str) -> Child {
    common::spawn_logged(common::waypoint().args(train_args(base, run_id)))
}

/// Runs to completion and returns stderr.
fn run_to_end(base: &str, run_id: &str) -> String {
    let out = common::waypoint()
        .args(train_args(base, run_id))
        .output()
        .unwrap();
    common::train_log(&out)
}

/// Reads the child's log until it reports training step `step` (or later); returns that step and
/// the rest of the log, collected until the child exits.
fn wait_for_step(child: &mut Child, step: u64) -> (u64, std::thread::JoinHandle<String>) {
    let (line, rest) = read_until(child, |l| logged_step(l).is_some_and(|s| s >= step));
    (logged_step(&line).unwrap(), rest)
}

/// The step of a `train step=N` log line, colour codes or not.
fn logged_step(line: &str) -> Option<u64> {
    common::runs::logged_step(&common::strip_ansi(line))
}

/// The final checkpoint's `dcp/` tensors (weights and optimizer state) by name, as raw bytes.
async fn final_state(base: &str, run_id: &str) -> BTreeMap<String, Vec<u8>> {
    common::runs::final_state(base, run_id, STEPS).await
}

/// (step → loss) from `logs/metrics.jsonl`, and whether any step appears twice.
async fn losses(base: &str, run_id: &str) -> (BTreeMap<u64, u64>, bool) {
    let store = Store::open(base).unwrap();
    let layout = RunLayout::new(run_id, "waypoint").unwrap();
    let text = store.get(&layout.metrics()).await.unwrap();
    let mut out = BTreeMap::new();
    let mut dup = false;
    for line in String::from_utf8_lossy(&text).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        let loss = v["loss"].as_f64().unwrap().to_bits();
        dup |= out.insert(step, loss).is_some();
    }
    (out, dup)
}

async fn status(base: &str, run_id: &str) -> serde_json::Value {
    let store = Store::open(base).unwrap();
    let layout = RunLayout::new(run_id, "waypoint").unwrap();
    serde_json::from_slice(&store.get(&layout.status()).await.unwrap()).unwrap()
}

/// A small deterministic generator for kill points (no dependency needed for a handful of numbers).
fn kill_steps(seed: u64, count: usize) -> Vec<u64> {
    let mut x = seed;
    let mut out: Vec<u64> = (0..count)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            3 + (x >> 33) % (STEPS - 6)
        })
        .collect();
    out.sort();
    out
}

async fn sigkill_then_resume_is_exact(base: &str) {
    run_to_end(base, "reference");
    let reference = final_state(base, "reference").await;
    let (ref_losses, _) = losses(base, "reference").await;
    assert_eq!(ref_losses.len() as u64, STEPS);

    let mut kills = 0;
    for at in kill_steps(base.len() as u64, 3) {
        let mut child = spawn(base, "killed");
        let (reached, _) = wait_for_step(&mut child, at);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        eprintln!("killed at step {reached} (aimed at {at})");
    }
    assert_eq!(kills, 3);
    let stderr = run_to_end(base, "killed");
    assert!(
        stderr.contains("resumed"),
        "the last start resumed: {stderr}"
    );
    let resumed = final_state(base, "killed").await;
    assert_eq!(reference.len(), resumed.len());
    for (name, bytes) in &reference {
        assert!(
            resumed.get(name) == Some(bytes),
            "{name} differs after SIGKILLs and resume"
        );
    }
    let (killed_losses, _) = losses(base, "killed").await;
    assert_eq!(killed_losses, ref_losses, "the same loss at every step");
}

async fn sigterm_saves_and_the_restart_redoes_no_step(base: &str) {
    let mut child = spawn(base, "termed");
    let (reached, log) = wait_for_step(&mut child, 20);
    let sent = Instant::now();
    assert!(common::send_signal(child.id(), "TERM").unwrap().success());
    let code = child.wait().unwrap();
    let took = sent.elapsed();
    let log = log.join().unwrap();
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM"
    );
    assert_eq!(
        code.code(),
        Some(143),
        "exit code after SIGTERM; log:\n{log}"
    );
    let s = status(base, "termed").await;
    assert_eq!(s["state"], "CANCELLED");
    let stopped_at = s["step"].as_u64().unwrap();
    assert!(stopped_at >= reached);
    assert_eq!(
        s["checkpoint"],
        format!("step-{stopped_at:06}"),
        "the current step was saved"
    );

    let stderr = run_to_end(base, "termed");
    let first = common::strip_ansi(&stderr)
        .lines()
        .find_map(logged_step)
        .expect("the restart logs its steps");
    assert_eq!(first, stopped_at + 1, "the restart starts at the next step");
    let (l, dup) = losses(base, "termed").await;
    assert!(!dup, "no step was done twice");
    assert_eq!(l.len() as u64, STEPS);
    let (ref_losses, _) = losses(base, "reference").await;
    assert_eq!(l, ref_losses);
    assert_eq!(status(base, "termed").await["state"], "FINISHED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_lora_run_with_dropout_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    run_to_end(base, "lora-reference");
    let mut child = spawn(base, "lora-killed");
    wait_for_step(&mut child, 25);
    child.kill().unwrap();
    child.wait().unwrap();
    let stderr = run_to_end(base, "lora-killed");
    assert!(stderr.contains("resumed"), "{stderr}");
    let reference = final_state(base, "lora-reference").await;
    assert!(
        reference.keys().any(|k| k.contains(".lora_A.")),
        "adapters were trained"
    );
    assert!(
        !reference.keys().any(|k| k.contains("embed_tokens")),
        "the base is frozen"
    );
    let resumed = final_state(base, "lora-killed").await;
    let differing: Vec<&String> = reference
        .iter()
        .filter(|(name, bytes)| resumed.get(*name) != Some(bytes))
        .map(|(name, _)| name)
        .collect();
    assert!(differing.is_empty(), "differ after resume: {differing:?}");
    assert_eq!(
        losses(base, "lora-reference").await.0,
        losses(base, "lora-killed").await.0
    );
    let m = manager(base, "lora-killed");
    let last = m.list().await.unwrap().into_iter().next().unwrap();
    let kinds: Vec<&str> = last.kinds.iter().map(|k| k.as_str()).collect();
    assert_eq!(kinds, ["TRAINING_LORA", "INFERENCE_LORA"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_runs_end_bit_identical_locally() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    sigkill_then_resume_is_exact(base).await;
    sigterm_saves_and_the_restart_redoes_no_step(base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_runs_end_bit_identical_on_s3() {
    let Some(s3) = common::s3_base() else {
        return;
    };
    let base = format!("{s3}/{}", common::unique("resume"));
    sigkill_then_resume_is_exact(&base).await;
    sigterm_saves_and_the_restart_redoes_no_step(&base).await;
}
