//! Memory: `--activation_checkpointing` trains bit for bit as without it (CPU), full-parameter and
//! LoRA; a memory plan that does not fit is refused before any work — the new user, whose
//! `--batch_size 20000 --max_seq_len 4096` used to be killed by the kernel with `status.json` left at
//! `RUNNING` — with exit 2, the figures and what to change, recorded in `status.json`.

mod common;

use std::time::{Duration, Instant};

use common::runs::{max_diff, train_flags, weights};
use common::waypoint;

fn train(base: &str, run: &str, extra: &[&str]) {
    let mut flags = train_flags("cpu", base, run, 4, 6);
    flags.extend(["--gradient_accumulation", "2", "--max_seq_len", "32"].map(String::from));
    flags.extend(extra.iter().map(|s| s.to_string()));
    let out = waypoint().args(&flags).output().unwrap();
    assert!(
        out.status.success(),
        "{run}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn activation_checkpointing_trains_bit_for_bit_as_without() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let lora = common::runs::LORA_FLAGS;
    train(base, "plain", &[]);
    train(base, "recomputed", &["--activation_checkpointing"]);
    train(base, "lora-plain", &lora);
    let mut with = lora.to_vec();
    with.push("--activation_checkpointing");
    train(base, "lora-recomputed", &with);
    for (a, b) in [("plain", "recomputed"), ("lora-plain", "lora-recomputed")] {
        let (_, wa) = weights(base, a, 6).await;
        let (_, wb) = weights(base, b, 6).await;
        assert!(!wa.is_empty());
        assert_eq!(max_diff(&wa, &wb), 0.0, "{a} vs {b}");
        // And training moved the weights (the comparison is not between two untouched models).
        let (_, w0) = weights(base, a, 3).await;
        assert!(max_diff(&wa, &w0) > 0.0, "{a} did not train");
    }
}

#[test]
fn a_plan_that_does_not_fit_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let started = Instant::now();
    let out = waypoint()
        .args([
            "train",
            "--checkpoint_base_uri",
            base,
            "--run_id",
            "huge",
            "--batch_size",
            "20000",
            "--max_seq_len",
            "4096",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60));
    for what in [
        "the memory plan does not fit",
        "activations",
        "--batch_size",
        "--memory_check warn",
    ] {
        assert!(stderr.contains(what), "{what} not in {stderr}");
    }
    let run = dir.path().join("huge/framework=waypoint");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "FAILED");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("memory plan does not fit"),
        "{status}"
    );
    // Nothing was trained or saved.
    assert!(
        !run.join("checkpoints").exists()
            || std::fs::read_dir(run.join("checkpoints"))
                .unwrap()
                .next()
                .is_none()
    );

    // The plan that fits is logged at the start of a run.
    let out = waypoint()
        .args(train_flags("cpu", base, "small", 2, 1))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("memory plan: "), "{stderr}");
}

/// The memory plan never under-estimates: for sharding none, optimizer and full at 1 and 2 ranks,
/// with a background save during training (and the final save), every rank's peak resident set —
/// the kernel's high-water mark (`VmHWM`), read by this test from `/proc` while the rank runs and
/// reported by the rank itself as it finishes — is at most the plan the rank logged at its start,
/// and the plan at most 1.15 × that peak. The model (a random Llama, ~12 M weights: 46 MiB fp32) is
/// big enough that its state, the save's host copy and the step's buffers are about half the peak,
/// the rest being libtorch and the process.
#[test]
fn the_memory_plan_bounds_the_measured_peak_from_above_within_15_percent() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    common::root_python_script(
        "hf_models.py",
        &[
            "make",
            model.to_str().unwrap(),
            "llama",
            "--hidden",
            "512",
            "--inter",
            "1408",
            "--layers",
            "4",
        ],
    );
    let data = dir.path().join("data.jsonl");
    let rows: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{{\"text\": \"row {i}: the trainer writes the weights, the optimizer state and \
                 the data position; a checkpoint is real once its manifest exists.\"}}"
            )
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for sharding in ["none", "optimizer", "full"] {
        for world in [1u32, 2] {
            let run = format!("{sharding}-{world}");
            let base = dir.path().join("runs");
            let mut worker: Vec<String> = common::runs::train_args(
                "cpu",
                1,
                &[
                    "--model_id",
                    model.to_str().unwrap(),
                    "--dataset_uri",
                    data.to_str().unwrap(),
                    "--sharding",
                    sharding,
                    "--batch_size",
                    "2",
                    "--max_seq_len",
                    "128",
                    "--max_steps",
                    "3",
                    // A background save at step 2, written while step 3 runs.
                    "--save_steps",
                    "2",
                    "--dist_timeout_secs",
                    "120",
                ],
                &run,
                base.to_str().unwrap(),
            );
            let mut cmd = waypoint();
            if world > 1 {
                let mut args = common::runs::launch_flags(world, &["--"]);
                args.push(env!("CARGO_BIN_EXE_waypoint").to_string());
                args.append(&mut worker);
                worker = args;
            }
            let child = cmd
                .args(&worker)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let (mut log, polled) = common::memory::follow_peaks(child, world);
            // Ranks other than 0 log their figures to their own files.
            for rank in 1..world {
                let own = base.join(format!(
                    "{run}/framework=waypoint/logs/ranks/rank-{rank:05}.log"
                ));
                log.push_str(&std::fs::read_to_string(&own).unwrap_or_default());
            }
            for rank in 0..world {
                let plan =
                    common::memory::logged_mb(&log, "memory plan of this rank", rank, "plan_mb")
                        .unwrap_or_else(|| panic!("{run}: no plan of rank {rank} in\n{log}"));
                let reported =
                    common::memory::logged_mb(&log, "memory: peak resident", rank, "peak_rss_mb")
                        .unwrap_or_else(|| panic!("{run}: no peak of rank {rank} in\n{log}"));
                let seen = polled.get(&rank).copied().unwrap_or(0);
                // The rank's own figure is the kernel's: what this test saw of it cannot exceed it
                // (but for the MiB it rounds down, and what the process pages in as it exits).
                assert!(
                    seen <= reported + 64,
                    "{run} rank {rank}: /proc said {seen} MiB, the rank {reported} MiB"
                );
                let peak = seen.max(reported);
                let ratio = plan as f64 / peak as f64;
                let line = format!(
                    "--sharding {sharding} at world {world}, rank {rank}: plan {plan} MiB, peak {peak} \
                     MiB ({seen} seen in /proc, {reported} reported), plan/peak {ratio:.3}"
                );
                if !(plan >= peak && ratio <= 1.15) {
                    failures.push(line.clone());
                }
                lines.push(line);
            }
        }
    }
    eprintln!("{}", lines.join("\n"));
    assert!(
        failures.is_empty(),
        "the plan must be at or above the peak and within 15% of it:\n{}",
        failures.join("\n")
    );
    eprintln!("took {:.0?}", started.elapsed());
}
