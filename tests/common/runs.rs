//! Reading what a `waypoint train` run left behind: its manager, its weights, its log lines.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;

use waypoint_checkpoint::{CheckpointManager, ManagerOptions, Manifest};
use waypoint_checkpoint::{RunLayout, StepName};
use waypoint_storage::Store;

/// `waypoint train` flags on `device` with `threads` libtorch threads, then `flags`, for run `run`
/// under `base`.
pub(crate) fn train_args(
    device: &str,
    threads: u32,
    flags: &[&str],
    run: &str,
    base: &str,
) -> Vec<String> {
    let threads = threads.to_string();
    // The memory tier (on by default) is off unless a test asks for it: these tests pin down the
    // durable tier's protocol (what a restart resumes from); tests/memory_tier.rs the tier's.
    let tier_off: &[&str] = if flags.contains(&"--memory_save_steps") {
        &[]
    } else {
        &["--memory_save_steps", "0"]
    };
    ["train", "--device", device, "--num_threads", &threads]
        .iter()
        .chain(flags)
        .chain(tier_off)
        .chain(&["--run_id", run, "--checkpoint_base_uri", base])
        .map(|s| s.to_string())
        .collect()
}

/// `waypoint train` flags of the multi-rank tests: a tiny model on `device`, one libtorch thread, a
/// log line per step, a save every 3 steps, a 20 s collective timeout.
pub(crate) fn train_flags(
    device: &str,
    base: &str,
    run: &str,
    batch: u32,
    steps: u32,
) -> Vec<String> {
    let (batch, steps) = (batch.to_string(), steps.to_string());
    let flags = [
        "--logging_steps",
        "1",
        "--save_steps",
        "3",
        "--dist_timeout_secs",
        "20",
        "--batch_size",
        &batch,
        "--max_steps",
        &steps,
    ];
    train_args(device, 1, &flags, run, base)
}

/// `waypoint launch` flags starting `nproc` local workers with a free store port, then `flags`
/// (`--` and the worker among them).
pub(crate) fn launch_flags(nproc: u32, flags: &[&str]) -> Vec<String> {
    let nproc = nproc.to_string();
    ["launch", "--nproc_per_node", &nproc, "--master_port", "0"]
        .iter()
        .chain(flags)
        .map(|s| s.to_string())
        .collect()
}

/// The LoRA flags of the multi-rank tests: rank-4 adapters on two projections.
pub(crate) const LORA_FLAGS: [&str; 4] = [
    "--lora_rank",
    "4",
    "--lora_target_modules",
    "q_proj,down_proj",
];

/// `waypoint launch` flags starting `ranks` local workers of this binary (a free store port, up to
/// `restarts` group restarts, 20 s for workers to stop), before the worker's own flags.
pub(crate) fn launch_args(ranks: u32, restarts: u32) -> Vec<String> {
    let exe = env!("CARGO_BIN_EXE_waypoint");
    let restarts = restarts.to_string();
    launch_flags(
        ranks,
        &[
            "--max_restarts",
            &restarts,
            "--term_grace_secs",
            "20",
            "--",
            exe,
        ],
    )
}

/// Sets the value of `flag` in `args`, in place (the CLI refuses a second copy of a flag).
pub(crate) fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1] = value.to_string();
}

/// The pid the launcher's `worker started` log line of rank `rank` names.
pub(crate) fn rank_pid(line: &str, rank: u32) -> Option<String> {
    if !(line.contains("worker started") && line.contains(&format!("rank={rank} "))) {
        return None;
    }
    let at = line.find("pid=")? + 4;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .map(str::to_string)
}

/// Makes a directory where rank 1 of 2 must write its file of checkpoint `step` of run `run` under
/// `dir`, so that its save fails and rank 0's does not; returns it.
fn block_rank1_file(dir: &Path, run: &str, step: u64) -> PathBuf {
    let blocked = dir
        .join(format!(
            "{run}/framework=waypoint/checkpoints/step-{step:06}/dcp"
        ))
        .join("shard-00002-model-00001-of-00001.safetensors");
    std::fs::create_dir_all(&blocked).unwrap();
    blocked
}

/// Two ranks (with the train flags `extra`) where rank 1's write of step 6 fails: the job fails
/// naming rank 1, step 6 is never committed (step 3 stays the newest resumable), and with the
/// obstacle gone the same command resumes from step 3 and finishes.
pub(crate) async fn rank1_failing_mid_save_leaves_no_commit(dir: &Path, extra: &[&str]) {
    let base = dir.to_str().unwrap();
    let blocked = block_rank1_file(dir, "half", 6);
    let mut args = launch_args(2, 0);
    args.extend(train_flags("cpu", base, "half", 2, 12));
    args.extend(extra.iter().map(|s| s.to_string()));
    // A short collective timeout instead of the one train_flags set.
    set_flag(&mut args, "--dist_timeout_secs", "5");
    let out = super::waypoint().args(&args).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("rank 1 failed"), "{log}");
    let m = manager(base, "half");
    assert_eq!(
        super::committed_steps(&m).await,
        [3],
        "step 6 was never committed"
    );
    assert_eq!(m.latest_resumable(true).await.unwrap().unwrap().step, 3);

    // With the obstacle gone, the same command resumes from step 3 and finishes.
    std::fs::remove_dir_all(&blocked).unwrap();
    set_flag(&mut args, "--dist_timeout_secs", "20");
    let out = super::waypoint().args(&args).output().unwrap();
    super::ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("checkpoint=step-000003"));
    assert_eq!(m.latest_resumable(true).await.unwrap().unwrap().step, 12);
}

/// The checkpoint manager of run `run` under `base`.
pub(crate) fn manager(base: &str, run: &str) -> CheckpointManager {
    CheckpointManager::new(
        Store::open(base).unwrap(),
        RunLayout::new(run, "waypoint").unwrap(),
        ManagerOptions::default(),
    )
}

/// The `dcp/` tensors (weights and optimizer state) of run `run`'s newest resumable checkpoint,
/// which must be at step `steps`, as raw bytes by name.
pub(crate) async fn final_state(base: &str, run: &str, steps: u64) -> BTreeMap<String, Vec<u8>> {
    let m = manager(base, run);
    let latest = m
        .latest_resumable(true)
        .await
        .unwrap()
        .expect("a checkpoint");
    assert_eq!(latest.step, steps);
    m.load_tensors(&latest, "dcp/", &|_| true)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.data.to_vec()))
        .collect()
}

/// The `model.*` tensors of a checkpoint (slices joined) as f32 values, by name.
pub(crate) async fn weights(
    base: &str,
    run: &str,
    step: u64,
) -> (Manifest, BTreeMap<String, Vec<f32>>) {
    let m = manager(base, run);
    let manifest = m.manifest(StepName::new(step)).await.unwrap();
    let slices = m
        .load_tensors(&manifest, "dcp/", &|n| n.starts_with("model."))
        .await
        .unwrap();
    // Sharded weights are saved as slices, one per rank.
    let tensors = waypoint_checkpoint::dcp::assemble_by_name(slices)
        .unwrap()
        .into_values()
        .map(|t| {
            let v = t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (t.name, v)
        })
        .collect();
    (manifest, tensors)
}

/// The largest element-wise difference between two sets of the same tensors.
pub(crate) fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, v)| v.iter().zip(&b[k]).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

/// The `step` of every line of a run's `logs/metrics.jsonl` (`run_dir`: the run URI's folder), in
/// order.
pub(crate) fn metrics_steps(run_dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(run_dir.join("logs/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// The step of a `train step=N` log line.
pub(crate) fn logged_step(line: &str) -> Option<u64> {
    logged_number(line, ": train step=")
}

/// The number right after `key` in a log line (`attempt=` → N of `… attempt=N …`).
pub(crate) fn logged_number(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Reads the launcher's log until `until` says stop; returns the line that did, and a thread
/// collecting the rest.
pub(crate) fn read_until(
    child: &mut Child,
    mut until: impl FnMut(&str) -> bool,
) -> (String, std::thread::JoinHandle<String>) {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the launcher ended early").unwrap();
        if until(&line) {
            let rest = std::thread::spawn(move || {
                lines.map_while(Result::ok).collect::<Vec<_>>().join("\n")
            });
            return (line, rest);
        }
    }
}

/// Follows `child`'s log (stderr, piped) until a `train step=N` line with N ≥ `step`, sends it
/// SIGTERM, and checks that it exits 143 (saved, then stopped). Returns the rest of the log.
pub(crate) fn sigterm_after_step(child: &mut Child, step: u64) -> String {
    let (_, rest) = read_until(child, |l| logged_step(l).is_some_and(|s| s >= step));
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let code = child.wait().unwrap();
    let log = rest.join().unwrap();
    assert_eq!(code.code(), Some(143), "{log}");
    log
}
