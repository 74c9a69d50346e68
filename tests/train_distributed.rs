//! Data-parallel training on CPU under `waypoint launch`: 2 ranks × batch b reach the weights of
//! 1 rank × batch 2b; each rank writes its share of every checkpoint; a run saved by 2 ranks resumes
//! with 1 and with 3 and ends where an uninterrupted run ends (another world size keeps the global
//! batch through gradient accumulation, or is refused); a killed rank makes the others exit
//! promptly, the group restarts, and training resumes from the last committed checkpoint.

mod common;

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::runs::{
    launch_args, logged_step, manager, max_diff, rank_pid, read_until, sigterm_after_step, weights,
};

fn train_flags(base: &str, run: &str, batch: u32, steps: u32) -> Vec<String> {
    common::runs::train_flags("cpu", base, run, batch, steps)
}

fn single(base: &str, run: &str, batch: u32, steps: u32) -> Output {
    common::waypoint()
        .args(train_flags(base, run, batch, steps))
        .output()
        .unwrap()
}

fn launched(base: &str, run: &str, ranks: u32, batch: u32, steps: u32) -> Output {
    common::waypoint()
        .args(launch_args(ranks, 0))
        .args(train_flags(base, run, batch, steps))
        .output()
        .unwrap()
}

fn spawn_launched(
    base: &str,
    run: &str,
    ranks: u32,
    restarts: u32,
    batch: u32,
    steps: u32,
) -> Child {
    common::spawn_logged(
        common::waypoint()
            .args(launch_args(ranks, restarts))
            .args(train_flags(base, run, batch, steps)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_match_one_rank_with_twice_the_batch_and_share_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&single(base, "one", 4, 8));
    let out = launched(base, "two", 2, 2, 8);
    let stdout = common::ok(&out);
    rank_0_speaks_for_the_run(base, &stdout, &String::from_utf8_lossy(&out.stderr));
    let (_, one) = weights(base, "one", 8).await;
    let (manifest, two) = weights(base, "two", 8).await;
    let diff = max_diff(&one, &two);
    assert!(
        diff < 2e-5,
        "2 ranks x 2 vs 1 rank x 4: weights differ by {diff}"
    );
    assert_eq!(manifest.world_size, 2);
    let per_rank: Vec<u64> = (0..2)
        .map(|r| {
            manifest
                .dcp_files()
                .filter(|f| f.rank == r)
                .map(|f| f.bytes)
                .sum()
        })
        .collect();
    let total: u64 = per_rank.iter().sum();
    for (r, b) in per_rank.iter().enumerate() {
        let share = *b as f64 / total as f64;
        assert!(
            (0.35..0.65).contains(&share),
            "rank {r} wrote {share:.2} of the bytes"
        );
    }
    assert!(manifest.dcp_files().all(|f| f.path.contains("shard-")));
    let m = manager(base, "two");
    assert!(common::intact(&m, 8).await);
}

/// Under a launcher, the run's events and outcome are printed once (rank 0's); rank 1's stderr
/// carries only its warnings and errors, prefixed with its rank, and its whole log is in its file.
fn rank_0_speaks_for_the_run(base: &str, stdout: &str, stderr: &str) {
    assert_eq!(stdout.matches("finished 8 steps").count(), 1, "{stdout}");
    for once in ["dataset ready", "attempt started", "memory plan:"] {
        assert_eq!(stderr.matches(once).count(), 1, "{once}:\n{stderr}");
    }
    // (The launcher's own lines name the rank too.)
    let of_rank_1 = |l: &&str| {
        l.contains("[rank 1]") || (l.contains("rank=1") && !l.contains("waypoint_launch"))
    };
    for line in stderr.lines().filter(of_rank_1) {
        assert!(
            line.starts_with("[rank 1] ") && (line.contains("WARN") || line.contains("ERROR")),
            "rank 1 printed more than its warnings and errors: {line}"
        );
    }
    let own = std::fs::read_to_string(format!(
        "{base}/two/framework=waypoint/logs/ranks/rank-00001.log"
    ))
    .unwrap();
    assert!(
        own.contains("dataset ready") && own.contains("rank=1") && !own.contains("rank=0"),
        "{own}"
    );
    // An error every rank meets: each rank that gets to print it before the launcher stops the
    // group (the first to fail ends the others) prints it, rank 1's prefixed.
    let out = common::waypoint()
        .args(launch_args(2, 0))
        .args(train_flags(base, "bad", 2, 8))
        .arg("--lr=-1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("error: --lr")).collect();
    assert!(!errors.is_empty(), "{err}");
    assert!(
        errors
            .iter()
            .all(|l| l.starts_with("error: --lr") || l.starts_with("[rank 1] error: --lr")),
        "{err}"
    );
    // Only rank 0 prints it bare.
    assert!(
        errors
            .iter()
            .filter(|l| l.starts_with("error: --lr"))
            .count()
            <= 1,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_saved_by_two_ranks_resumes_with_one_and_with_three() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&single(base, "reference", 6, 12));
    let (_, reference) = weights(base, "reference", 12).await;

    for (run, resume_ranks) in [("to-one", 1u32), ("to-three", 3)] {
        // Two ranks × 3, stopped by SIGTERM to the launcher after a few steps.
        let mut child = spawn_launched(base, run, 2, 0, 3, 12);
        sigterm_after_step(&mut child, 4);
        let saved = manager(base, run)
            .latest_resumable(true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(saved.world_size, 2);
        assert!(
            saved.step >= 4 && saved.step < 12,
            "stopped at {}",
            saved.step
        );

        let out = if resume_ranks == 1 {
            single(base, run, 6, 12)
        } else {
            launched(base, run, 3, 2, 12)
        };
        common::ok(&out);
        assert!(String::from_utf8_lossy(&out.stderr).contains("resumed"));
        let (m, w) = weights(base, run, 12).await;
        assert_eq!(m.world_size, resume_ranks);
        let diff = max_diff(&reference, &w);
        assert!(
            diff < 5e-5,
            "{run}: differs from the uninterrupted run by {diff}"
        );
    }
}

/// A restart at another world size keeps the run's global batch through the gradient
/// accumulation (said in the log) and ends where an uninterrupted run ends; when no accumulation
/// keeps it, the restart is refused before any work, naming the choices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_world_size_keeps_the_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&single(base, "reference", 4, 8));
    let (_, reference) = weights(base, "reference", 8).await;
    // Two ranks × 2: a global batch of 4, stopped after a few steps.
    let mut child = spawn_launched(base, "kept", 2, 0, 2, 8);
    sigterm_after_step(&mut child, 3);
    let saved = manager(base, "kept")
        .latest_resumable(true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((saved.world_size, saved.data_consumed), (2, 4 * saved.step));
    // One rank × 3 cannot make 4: refused (exit 2), the choices named, nothing written.
    let out = single(base, "kept", 3, 8);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("global batch of 4 samples"), "{err}");
    assert!(
        err.contains("--batch_size 1 or 2 or 4 at world size 1"),
        "{err}"
    );
    assert_eq!(
        manager(base, "kept")
            .latest_resumable(true)
            .await
            .unwrap()
            .unwrap()
            .step,
        saved.step
    );
    // One rank × 2 accumulates 2 micro-batches: the same global batch, the same weights.
    let out = single(base, "kept", 2, 8);
    let err = common::ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("--gradient_accumulation 1 → 2"), "{err}{log}");
    let (m, kept) = weights(base, "kept", 8).await;
    assert_eq!((m.world_size, m.data_consumed), (1, 32));
    let diff = max_diff(&reference, &kept);
    assert!(diff < 5e-5, "differs from the uninterrupted run by {diff}");
}

#[test]
fn a_killed_rank_stops_the_others_and_the_group_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let mut child = spawn_launched(base, "killed", 2, 1, 2, 40);
    let mut rank1 = None;
    let (_, rest) = read_until(&mut child, |l| {
        rank1 = rank1.take().or_else(|| rank_pid(l, 1));
        rank1.is_some() && logged_step(l).is_some_and(|s| s >= 8)
    });
    let killed_at = Instant::now();
    common::send_signal(rank1.unwrap(), "KILL").unwrap();
    let code = child.wait().unwrap();
    let log = rest.join().unwrap();
    assert!(code.success(), "the restarted group finishes:\n{log}");
    assert!(log.contains("restarting the group"), "{log}");
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed"))
        .unwrap_or_else(|| panic!("the restarted group resumes:\n{log}"));
    assert!(resumed.contains("checkpoint=step-0000"), "{resumed}");
    // The survivor noticed within seconds (a closed connection), not after a long timeout.
    assert!(killed_at.elapsed() < Duration::from_secs(60));
    let status = common::read_json(dir.path().join("killed/framework=waypoint/status.json"));
    assert_eq!(status["state"], "FINISHED");
    assert_eq!(status["step"], 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_under_pytorchs_torchrun() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&single(base, "one", 4, 6));
    let torchrun = common::python().replace("/bin/python", "/bin/torchrun");
    let port = common::free_port().to_string();
    let out = std::process::Command::new(torchrun)
        .args([
            "--nproc_per_node",
            "2",
            "--master_port",
            &port,
            "--no-python",
        ])
        .arg(env!("CARGO_BIN_EXE_waypoint"))
        .args(train_flags(base, "torchrun", 2, 6))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    common::ok(&out);
    let (_, one) = weights(base, "one", 6).await;
    let (manifest, two) = weights(base, "torchrun", 6).await;
    assert_eq!(manifest.world_size, 2);
    let diff = max_diff(&one, &two);
    assert!(diff < 2e-5, "under torchrun: weights differ by {diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_failing_mid_save_leaves_no_committed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    common::runs::rank1_failing_mid_save_leaves_no_commit(dir.path(), &[]).await;
}
