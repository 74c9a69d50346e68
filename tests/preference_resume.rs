//! Preference runs checkpoint and resume as supervised ones do, on CPU:
//! - a full-parameter DPO run SIGKILLed twice and restarted ends with weights and optimizer state
//!   bit-identical to an uninterrupted run's, the same loss and rewards at every step, and its
//!   reference log-probs computed once, at the first start, and read back (never recomputed) at
//!   every restart;
//! - a LoRA ORPO run SIGKILLed once ends bit-identical too;
//! - a DPO run on two ranks (`waypoint launch`, weights sharded) stopped by SIGTERM resumes on one
//!   rank, keeping the global batch of pairs, and ends where a one-rank run ends; the reference the
//!   two ranks computed is the one a single rank computes.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Child;

use common::runs::{launch_args, logged_step, manager, max_diff, sigterm_after_step, weights};

const STEPS: u64 = 24;
const COMPUTED: &str = "reference log-probs computed from the initial weights";
const READ_BACK: &str = "reference log-probs read back (not recomputed)";

/// The flags of a preference run `run` under `base` with `ranks` × `batch` pairs per step.
fn flags(base: &str, run: &str, recipe: &str, batch: u32, extra: &[&str]) -> Vec<String> {
    let batch = batch.to_string();
    let steps = STEPS.to_string();
    let mut f = common::runs::train_args(
        "cpu",
        1,
        &[
            "--recipe",
            recipe,
            "--dataset_uri",
            "builtin:demo_preference",
            "--max_seq_len",
            "192",
            "--batch_size",
            &batch,
            "--gradient_accumulation",
            "2",
            "--max_steps",
            &steps,
            "--save_steps",
            "5",
            "--logging_steps",
            "1",
            "--dist_timeout_secs",
            "20",
        ],
        run,
        base,
    );
    f.extend(extra.iter().map(|s| s.to_string()));
    f
}

/// Runs to the end; returns the log.
fn run_to_end(args: &[String]) -> String {
    common::train_log(&common::waypoint().args(args).output().unwrap())
}

/// Starts a run, reads its log until step `at` is logged, SIGKILLs it; returns the log read.
fn kill_at(args: &[String], at: u64) -> String {
    let mut child: Child = common::spawn_logged(common::waypoint().args(args));
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = common::strip_ansi(&line.unwrap());
        log.push_str(&line);
        log.push('\n');
        if logged_step(&line).is_some_and(|s| s >= at) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    log
}

/// The final checkpoint's `dcp/` tensors as raw bytes, by name.
async fn final_state(base: &str, run: &str) -> BTreeMap<String, Vec<u8>> {
    common::runs::final_state(base, run, STEPS).await
}

/// step → (loss, rewards/margins or nll_loss) bits from the run's metrics.
fn metrics(base: &str, run: &str, field: &str) -> BTreeMap<u64, (u64, u64)> {
    let path = format!("{base}/{run}/framework=waypoint/logs/metrics.jsonl");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let bits = |k: &str| {
                v[k].as_f64()
                    .unwrap_or_else(|| panic!("{k} in {l}"))
                    .to_bits()
            };
            (v["step"].as_u64().unwrap(), (bits("loss"), bits(field)))
        })
        .collect()
}

async fn interrupted_ends_bit_identical(recipe: &str, extra: &[&str], kills: &[u64], field: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let straight = flags(base, "straight", recipe, 2, extra);
    let log = run_to_end(&straight);
    let full_dpo = recipe == "dpo" && !extra.contains(&"--lora_rank");
    assert_eq!(log.contains(COMPUTED), full_dpo, "{log}");
    let killed = flags(base, "killed", recipe, 2, extra);
    for (k, &at) in kills.iter().enumerate() {
        let log = kill_at(&killed, at);
        if full_dpo {
            // The first start scores the reference; every later one reads it back.
            assert_eq!(log.contains(COMPUTED), k == 0, "start {}:\n{log}", k + 1);
            assert_eq!(log.contains(READ_BACK), k > 0, "start {}:\n{log}", k + 1);
        }
    }
    let log = run_to_end(&killed);
    assert!(log.contains("resumed"), "{log}");
    assert!(
        !log.contains(COMPUTED),
        "the reference was computed again:\n{log}"
    );
    assert_eq!(log.contains(READ_BACK), full_dpo, "{log}");
    let (a, b) = (
        final_state(base, "straight").await,
        final_state(base, "killed").await,
    );
    assert_eq!(a.len(), b.len());
    for (name, bytes) in &a {
        assert!(
            b.get(name) == Some(bytes),
            "{recipe}: {name} differs after SIGKILLs"
        );
    }
    let (ma, mb) = (
        metrics(base, "straight", field),
        metrics(base, "killed", field),
    );
    assert_eq!(ma.len() as u64, STEPS);
    assert_eq!(ma, mb, "{recipe}: the same loss and {field} at every step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_full_parameter_dpo_run_ends_bit_identical_and_never_rescores_its_reference()
{
    interrupted_ends_bit_identical("dpo", &[], &[7, 16], "rewards/margins").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_lora_orpo_run_ends_bit_identical() {
    interrupted_ends_bit_identical("orpo", &["--lora_rank", "4"], &[12], "nll_loss").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_rank_sharded_dpo_run_resumes_on_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    // One rank, 2 pairs × 2 micro-batches: the global batch is 4 pairs.
    run_to_end(&flags(base, "one", "dpo", 2, &[]));
    // Two ranks, 1 pair × 2 micro-batches each, weights sharded; stopped after step 8.
    let mut child = common::spawn_logged(common::waypoint().args(launch_args(2, 0)).args(flags(
        base,
        "two",
        "dpo",
        1,
        &["--sharding", "full"],
    )));
    sigterm_after_step(&mut child, 8);
    let saved = manager(base, "two")
        .latest_resumable(true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(saved.world_size, 2);
    assert!(saved.step >= 8 && saved.step < STEPS, "{}", saved.step);
    // The same run resumed by one rank with 1 pair per micro-batch: 4 micro-batches keep the
    // global batch of 4 pairs.
    let log = run_to_end(&flags(base, "two", "dpo", 1, &[]));
    assert!(log.contains("resumed") && log.contains(READ_BACK), "{log}");
    assert!(!log.contains(COMPUTED), "{log}");
    let (_, one) = weights(base, "one", STEPS).await;
    let (manifest, two) = weights(base, "two", STEPS).await;
    assert_eq!(manifest.world_size, 1);
    let diff = max_diff(&one, &two);
    assert!(
        diff < 5e-5,
        "two ranks then one differ from one rank by {diff}"
    );
    // The reference scored by two sharded ranks is the one a single rank scored.
    let table = |run: &str| -> Vec<f32> {
        let dir = dir.path().join(run).join("framework=waypoint/reference");
        let bin = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "bin"))
            .expect("a reference table")
            .path();
        std::fs::read(bin)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (t1, t2) = (table("one"), table("two"));
    assert_eq!(t1.len(), 2 * 64);
    let worst = t1
        .iter()
        .zip(&t2)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
        .fold(0.0, f32::max);
    assert!(
        worst < 1e-5,
        "reference tables differ by {worst} (relative)"
    );
    assert!(t1.iter().all(|v| v.is_finite() && *v < 0.0));
}
