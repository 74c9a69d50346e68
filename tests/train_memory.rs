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
