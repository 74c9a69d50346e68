//! Training on a CUDA GPU. CI has none, so these tests are `#[ignore]`d: run them on a GPU box with
//! `cargo test --release --test train_cuda -- --ignored` (they fail, not skip, without a GPU).
//! - 2 ranks summing gradients over NCCL × batch b reach the weights of 1 rank × batch 2b. With one
//!   GPU both ranks share it: each gets its own `NCCL_HOSTID`, so NCCL treats them as two hosts
//!   talking over loopback sockets instead of refusing a duplicate GPU.
//! - a run stopped by SIGTERM on the GPU resumes and ends where an uninterrupted run ends.
//! - a killed rank: the launcher restarts the group, which joins a fresh NCCL communicator and
//!   resumes; a frozen rank (SIGSTOP): the other gives up after `--dist_timeout_secs`, no hang.
//!
//! GPU runs compute matmuls in bf16 and libtorch's CUDA backward is not bit-deterministic
//! (atomics), so weights are compared against the spread of two identical runs, not bit for bit.

mod common;

use std::process::{Child, Command};
use std::thread::JoinHandle;

use common::runs::{
    launch_flags, logged_step, max_diff, rank_pid, read_until, sigterm_after_step, train_flags,
    weights,
};

fn single(base: &str, run: &str, batch: u32, steps: u32) -> Command {
    let mut c = common::waypoint();
    c.args(train_flags("cuda:0", base, run, batch, steps));
    c
}

/// Two ranks under `waypoint launch`, one GPU each, or both on GPU 0 as two NCCL "hosts".
fn two_ranks(base: &str, run: &str, batch: u32, steps: u32, restarts: u32) -> Command {
    let exe = env!("CARGO_BIN_EXE_waypoint");
    let restarts = restarts.to_string();
    let mut c = common::waypoint();
    c.args(launch_flags(2, &["--max_restarts", &restarts, "--"]));
    if tch::Cuda::device_count() >= 2 {
        c.arg(exe)
            .args(train_flags("cuda", base, run, batch, steps));
    } else {
        c.args([
            "sh",
            "-c",
            r#"NCCL_HOSTID="waypoint-test-$RANK" exec "$0" "$@""#,
            exe,
        ])
        .args(train_flags("cuda:0", base, run, batch, steps))
        .env("NCCL_SOCKET_IFNAME", "lo")
        .env("NCCL_IB_DISABLE", "1");
    }
    c
}

/// Two ranks (batch 4 each) started in the background and followed until step 20: the launcher,
/// rank 1's pid, and a thread collecting the rest of the log.
fn two_ranks_at_step_20(
    base: &str,
    run: &str,
    steps: u32,
    restarts: u32,
) -> (Child, String, JoinHandle<String>) {
    let mut child = common::spawn_logged(&mut two_ranks(base, run, 4, steps, restarts));
    let mut rank1 = None;
    let (_, rest) = read_until(&mut child, |l| {
        rank1 = rank1.take().or_else(|| rank_pid(l, 1));
        rank1.is_some() && logged_step(l).is_some_and(|s| s >= 20)
    });
    (child, rank1.unwrap(), rest)
}

fn assert_gpu() {
    assert!(
        tch::Cuda::is_available(),
        "these tests need a CUDA GPU (they are #[ignore]d for CPU-only machines)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA GPU"]
async fn two_ranks_over_nccl_match_one_rank_with_twice_the_batch() {
    assert_gpu();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&single(base, "one", 8, 12).output().unwrap());
    common::ok(&single(base, "one-again", 8, 12).output().unwrap());
    let out = two_ranks(base, "two", 4, 12, 0).output().unwrap();
    common::ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.matches("NCCL communicator ready").count() == 2,
        "both ranks use NCCL:\n{log}"
    );
    let (_, one) = weights(base, "one", 12).await;
    let (_, again) = weights(base, "one-again", 12).await;
    let (manifest, two) = weights(base, "two", 12).await;
    assert_eq!(manifest.world_size, 2);
    let noise = max_diff(&one, &again);
    let diff = max_diff(&one, &two);
    eprintln!("1 rank x 8 twice: max |dw| {noise:e}; 2 ranks x 4 vs 1 rank x 8: {diff:e}");
    assert!(
        diff < 2e-3,
        "2 ranks x 4 vs 1 rank x 8 differ by {diff} (two identical 1-rank runs: {noise})"
    );
}

/// `--sharding full` over NCCL (its own all-gather and reduce-scatter over padded parts, the
/// projections gathered in bf16), full-parameter and LoRA (the bf16 base sharded): within bf16
/// tolerance of one rank with the whole batch; both ranks write their part of the promotable weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA GPU"]
async fn two_fully_sharded_ranks_over_nccl_match_one_rank() {
    assert_gpu();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let lora = common::runs::LORA_FLAGS;
    for (name, with_lora) in [("full", false), ("lora", true)] {
        let extra: &[&str] = if with_lora { &lora } else { &[] };
        let (one, two) = (format!("{name}-one"), format!("{name}-two"));
        common::ok(&single(base, &one, 8, 12).args(extra).output().unwrap());
        let out = two_ranks(base, &two, 4, 12, 0)
            .args(["--sharding", "full"])
            .args(extra)
            .output()
            .unwrap();
        common::ok(&out);
        let (_, a) = weights(base, &one, 12).await;
        let (manifest, b) = weights(base, &two, 12).await;
        let diff = max_diff(&a, &b);
        let loss = |run: &str| -> f64 {
            let path = format!("{base}/{run}/framework=waypoint/logs/metrics.jsonl");
            let text = std::fs::read_to_string(path).unwrap();
            let last: serde_json::Value =
                serde_json::from_str(text.lines().last().unwrap()).unwrap();
            last["loss"].as_f64().unwrap()
        };
        let (la, lb) = (loss(&one), loss(&two));
        eprintln!(
            "{name}: 2 fully sharded ranks over NCCL vs 1 rank: max |dw| {diff:e}, final loss \
             {lb} vs {la}"
        );
        assert!(diff < 2e-3, "{name}: {diff}");
        // LoRA's adapters stay small: the loss shows a residual stream kept in the wrong dtype.
        assert!(
            (la - lb).abs() <= 1e-2 * la.abs(),
            "{name}: loss {lb} vs {la}"
        );
        let writers: std::collections::BTreeSet<u32> = manifest
            .sampler_files()
            .filter(|f| f.path.ends_with(".safetensors"))
            .map(|f| f.rank)
            .collect();
        let expected: &[u32] = if with_lora { &[0] } else { &[0, 1] };
        assert_eq!(writers.into_iter().collect::<Vec<_>>(), expected, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a CUDA GPU"]
async fn a_gpu_run_stopped_by_sigterm_resumes_where_it_stopped() {
    assert_gpu();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&single(base, "reference", 8, 12).output().unwrap());
    let mut child = common::spawn_logged(&mut single(base, "stopped", 8, 12));
    sigterm_after_step(&mut child, 4);
    let saved = common::runs::manager(base, "stopped")
        .latest_resumable(true)
        .await
        .unwrap()
        .unwrap();
    assert!(
        saved.step >= 4 && saved.step < 12,
        "stopped at {}",
        saved.step
    );
    let out = single(base, "stopped", 8, 12).output().unwrap();
    common::ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    let first = log
        .lines()
        .find_map(logged_step)
        .expect("a step was logged");
    assert_eq!(
        first,
        saved.step + 1,
        "the restart continues at the next step"
    );
    let (_, reference) = weights(base, "reference", 12).await;
    let (_, resumed) = weights(base, "stopped", 12).await;
    let diff = max_diff(&reference, &resumed);
    eprintln!(
        "stopped at {} and resumed vs uninterrupted: max |dw| {diff:e}",
        saved.step
    );
    assert!(
        diff < 2e-3,
        "resumed run ends {diff} away from the uninterrupted one"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_killed_rank_restarts_the_group_on_a_fresh_communicator() {
    assert_gpu();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let (mut child, rank1, rest) = two_ranks_at_step_20(base, "killed", 300, 1);
    common::send_signal(&rank1, "KILL").unwrap();
    let code = child.wait().unwrap();
    let log = rest.join().unwrap();
    assert!(code.success(), "the restarted group finishes:\n{log}");
    assert!(log.contains("restarting the group"), "{log}");
    assert_eq!(log.matches("NCCL communicator ready").count(), 2, "{log}");
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed"))
        .unwrap_or_else(|| panic!("the restarted group resumes:\n{log}"));
    assert!(resumed.contains("checkpoint=step-000"), "{resumed}");
    let status = common::read_json(dir.path().join("killed/framework=waypoint/status.json"));
    assert_eq!(status["state"], "FINISHED");
    assert_eq!(status["step"], 300);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_frozen_rank_fails_the_other_after_the_timeout_not_a_hang() {
    assert_gpu();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let (mut child, rank1, rest) = two_ranks_at_step_20(base, "frozen", 100_000, 0);
    let frozen_at = std::time::Instant::now();
    common::send_signal(&rank1, "STOP").unwrap();
    let code = child.wait().unwrap();
    let log = rest.join().unwrap();
    let took = frozen_at.elapsed();
    assert!(!code.success(), "{log}");
    let named = log
        .lines()
        .find(|l| l.contains("did not finish within") || l.contains("timed out"))
        .unwrap_or_else(|| panic!("rank 0 names the timeout:\n{log}"));
    eprintln!("after {took:?}: {named}");
    // 20 s of --dist_timeout_secs, then the launcher's grace period for the frozen rank.
    assert!(took.as_secs() < 90, "took {took:?}:\n{log}");
}
