//! The node's memory tier (`--memory_save_steps`, `--memory_tier_dir`): a worker really killed
//! (SIGKILL) resumes from the tier, not from the older durable checkpoint, and ends bit-identical to
//! an uninterrupted run; a damaged tier checkpoint is named, set aside and passed over; a wiped tier
//! falls back to the durable tier; an unusable tier is named and training goes on without it; a
//! finished run leaves nothing in the tier.

mod common;

use std::path::Path;
use std::process::Child;

use common::runs::{
    launch_args, logged_step, max_diff, rank_pid, read_until, set_flag, train_flags, weights,
};

const STEPS: u32 = 30;

/// `waypoint train` flags: a tiny model on CPU, `STEPS` steps, a durable save every `save_steps`,
/// the memory tier in `tier`.
fn flags(base: &str, run: &str, tier: &Path, save_steps: u32) -> Vec<String> {
    let mut args = train_flags("cpu", base, run, 2, STEPS);
    set_flag(&mut args, "--save_steps", &save_steps.to_string());
    set_flag(&mut args, "--memory_save_steps", "1");
    args.extend([
        "--memory_tier_dir".to_string(),
        tier.to_str().unwrap().to_string(),
    ]);
    args
}

/// One process, followed until it logged step `step`, then SIGKILLed; the step it last logged.
/// With `tier` (the tier's folder and the run), not before the tier committed a checkpoint.
fn kill_after_step(args: &[String], step: u64, tier: Option<(&Path, &str)>) -> u64 {
    let mut child: Child = common::spawn_logged(common::waypoint().args(args));
    let mut last = 0;
    let (_, rest) = read_until(&mut child, |l| {
        last = logged_step(l).unwrap_or(last);
        last >= step && tier.is_none_or(|(dir, run)| has_tier_checkpoint(dir, run))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    drop(rest);
    last
}

fn status(base: &str, run: &str) -> serde_json::Value {
    common::read_json(
        Path::new(base)
            .join(run)
            .join("framework=waypoint/status.json"),
    )
}

/// The run's folder in the tier (there is one per run).
fn tier_folder(tier: &Path) -> std::path::PathBuf {
    let mut runs: Vec<_> = std::fs::read_dir(tier)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs.pop().unwrap()
}

/// Whether the tier holds a committed checkpoint of `run` (its only run).
fn has_tier_checkpoint(tier: &Path, run: &str) -> bool {
    let Some(Ok(folder)) = std::fs::read_dir(tier).ok().and_then(|mut d| d.next()) else {
        return false;
    };
    let dir = folder
        .path()
        .join(run)
        .join("framework=waypoint/checkpoints");
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".json"))
    })
}

/// The tier's committed steps, newest first.
fn tier_steps(tier: &Path, run: &str) -> Vec<u64> {
    let dir = tier_folder(tier)
        .join(run)
        .join("framework=waypoint/checkpoints");
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("step-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps
}

/// The final weights of `run` equal those of `reference`, bit for bit.
async fn same_end(base: &str, reference: &str, run: &str) {
    let (_, want) = weights(base, reference, STEPS as u64).await;
    let (_, got) = weights(base, run, STEPS as u64).await;
    assert_eq!(
        max_diff(&want, &got),
        0.0,
        "{run} ended elsewhere than {reference}"
    );
}

/// One node, 2 ranks under `waypoint launch`: rank 1 SIGKILLed mid-run; the group restarts and
/// resumes from the memory tier (no durable checkpoint before the end), redoing only the steps
/// since the tier's newest save, and ends bit-identical to an uninterrupted run. The finished run
/// leaves nothing in the tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_resumes_from_the_memory_tier_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let shm = common::tier_dir();
    let tier = shm.path().to_path_buf();
    let run = |name: &str, restarts: u32| {
        let mut args = launch_args(2, restarts);
        args.extend(flags(base, name, &tier, 100));
        args
    };
    common::ok(
        &common::waypoint()
            .args(run("reference", 0))
            .output()
            .unwrap(),
    );
    assert!(
        std::fs::read_dir(&tier).unwrap().next().is_none(),
        "a finished run leaves nothing in the tier"
    );

    let mut child = common::spawn_logged(common::waypoint().args(run("killed", 1)));
    let (mut rank1, mut last) = (None, 0);
    let (_, rest) = read_until(&mut child, |l| {
        rank1 = rank1.take().or_else(|| rank_pid(l, 1));
        last = logged_step(l).unwrap_or(last);
        rank1.is_some() && last >= 12
    });
    common::send_signal(rank1.unwrap(), "KILL").unwrap();
    let code = child.wait().unwrap();
    let log = rest.join().unwrap();
    assert!(code.success(), "the restarted group finishes:\n{log}");
    let s = status(base, "killed");
    assert_eq!(s["state"], "FINISHED", "{s}");
    assert_eq!(s["resumed_from"]["tier"], "memory", "{s}\n{log}");
    let resumed: u64 = s["resumed_from"]["checkpoint"].as_str().unwrap()[5..]
        .parse()
        .unwrap();
    eprintln!("killed after step {last}; resumed from memory-tier step {resumed}");
    assert!(
        (1..=last + 1).contains(&resumed),
        "resumed at {resumed}, killed after {last}"
    );
    same_end(base, "reference", "killed").await;
    // What the failure cost, in progress.json's goodput and on `waypoint status`'s screen.
    let run_dir = dir.path().join("killed/framework=waypoint");
    let progress = common::read_json(run_dir.join("logs/progress.json"));
    let g = &progress["goodput"];
    assert_eq!(g["attempts"], 2, "{progress}");
    let restart = &g["last_restart"];
    assert_eq!(restart["attempt"], 2, "{g}");
    assert_eq!(restart["resumed_step"], resumed, "{g}");
    let recovery = restart["start_to_first_step_s"].as_f64().unwrap();
    assert!(recovery > 0.0 && recovery < 60.0, "{g}");
    // At most the steps the killed attempt had reported beyond the resumed one.
    assert!(
        g["steps_redone"].as_u64().unwrap() <= last + 1 - resumed.min(last + 1),
        "{g}"
    );
    let ratio = g["goodput"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio <= 1.0, "{g}");
    assert!(g["lost_s"].as_f64().unwrap() >= recovery, "{g}");
    let screen = common::waypoint()
        .args(["status", run_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&screen.stdout);
    assert!(
        screen.contains("goodput") && screen.contains("2 attempt(s)"),
        "{screen}"
    );
    assert!(screen.contains("from start to first step"), "{screen}");
    // Every step's loss is in metrics.jsonl once, those before the resume included.
    let steps = common::runs::metrics_steps(&run_dir);
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>());
    assert!(std::fs::read_dir(&tier).unwrap().next().is_none());
}

/// A damaged blob in the tier's newest checkpoint: named in the log, set aside, and the next older
/// one (the tier keeps 2) resumes — or, without one, a fresh start (no durable checkpoint yet);
/// the end is bit-identical. With the tier wiped, the durable tier resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_wiped_memory_tier_falls_back_tier_by_tier() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let shm = common::tier_dir();
    let tier = shm.path().to_path_buf();
    common::ok(
        &common::waypoint()
            .args(flags(base, "reference", &tier, 5))
            .output()
            .unwrap(),
    );

    // Damaged: one byte of the newest tier checkpoint's state flipped; no durable checkpoint
    // before the end, so the tier is what resumes.
    let args = flags(base, "damaged", &tier, 1000);
    let killed = kill_after_step(&args, 13, Some((&tier, "damaged")));
    let steps = tier_steps(&tier, "damaged");
    assert!(
        !steps.is_empty(),
        "the tier holds checkpoints after step {killed}"
    );
    let newest = format!("step-{:06}", steps[0]);
    // The tier's manifests record CRC32C digests (the durable tier's, sha256).
    let manifest = common::read_json(
        tier_folder(&tier)
            .join("damaged/framework=waypoint/checkpoints")
            .join(format!("{newest}.json")),
    );
    let digests: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["sha256"].as_str().unwrap())
        .collect();
    assert!(
        !digests.is_empty() && digests.iter().all(|d| d.starts_with("crc32c:")),
        "{manifest}"
    );
    let dcp = tier_folder(&tier)
        .join("damaged/framework=waypoint/checkpoints")
        .join(&newest)
        .join("dcp");
    let file = std::fs::read_dir(&dcp)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 8;
    bytes[at] ^= 0xFF;
    std::fs::write(&file, bytes).unwrap();
    let out = common::waypoint().args(&args).output().unwrap();
    let log = common::train_log(&out);
    assert!(
        log.contains("passing over a damaged checkpoint") && log.contains(&newest),
        "{log}"
    );
    let s = status(base, "damaged");
    assert_ne!(s["resumed_from"]["checkpoint"], newest.as_str(), "{s}");
    assert!(
        log.contains("set the damaged checkpoint aside"),
        "the damaged checkpoint is set aside in the tier: {log}"
    );
    // (The finished run's folder in the tier is gone.)
    assert!(std::fs::read_dir(&tier).unwrap().next().is_none());
    same_end(base, "reference", "damaged").await;

    // Wiped: the durable tier (saved every 5 steps) resumes.
    let args = flags(base, "wiped", &tier, 5);
    let killed = kill_after_step(&args, 13, None);
    std::fs::remove_dir_all(&tier).unwrap();
    let out = common::waypoint().args(&args).output().unwrap();
    common::train_log(&out);
    let s = status(base, "wiped");
    assert_eq!(s["resumed_from"]["tier"], "durable", "{s}");
    let resumed: u64 = s["resumed_from"]["checkpoint"].as_str().unwrap()[5..]
        .parse()
        .unwrap();
    assert!(
        resumed >= 5 && resumed <= killed,
        "resumed {resumed}, killed after {killed}"
    );
    same_end(base, "reference", "wiped").await;
}

/// A memory tier that cannot be used (its folder would be inside a file) is named with what to do,
/// and training goes on with the durable tier alone; `--memory_save_steps 0` turns it off.
#[test]
fn an_unusable_memory_tier_is_named_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, b"x").unwrap();
    let out = common::waypoint()
        .args(flags(base, "unusable", &file.join("tier"), 10))
        .output()
        .unwrap();
    let log = common::train_log(&out);
    assert!(
        log.contains("the memory tier is off") && log.contains("--memory_tier_dir"),
        "{log}"
    );
    assert_eq!(status(base, "unusable")["state"], "FINISHED");

    let tier = dir.path().join("shm");
    let mut args = flags(base, "off", &tier, 10);
    set_flag(&mut args, "--memory_save_steps", "0");
    common::train_log(&common::waypoint().args(&args).output().unwrap());
    assert!(!tier.exists(), "--memory_save_steps 0 writes no tier");
}

/// A durable save that falls on a tier save's step drains the tier's host copy instead of copying
/// the state again (it leaves the device once): its report says so, and its checkpoint's tensors
/// are byte for byte those of the same run without the tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_save_drains_the_memory_tiers_copy() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let shm = common::tier_dir();
    let mut args = flags(base, "drained", shm.path(), 4);
    set_flag(&mut args, "--max_steps", "9");
    // The tier saves with the durable tier: a tier save still being written when the next falls
    // due is skipped (and the durable save then copies the state itself), which tier saves every
    // step on a loaded machine may meet; the first tier save never does.
    set_flag(&mut args, "--memory_save_steps", "4");
    let out = common::waypoint().args(&args).output().unwrap();
    let log = common::train_log(&out);
    let drained: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("save report") && l.contains("of it the memory tier's copy"))
        .collect();
    assert!(
        drained.iter().any(|l| l.contains("step-000004")),
        "the first periodic durable save drains the tier's copy:\n{log}"
    );
    let metrics = std::fs::read_to_string(
        dir.path()
            .join("drained/framework=waypoint/logs/metrics.jsonl"),
    )
    .unwrap();
    assert!(metrics.contains("\"save_drained_mb\""), "{metrics}");

    set_flag(&mut args, "--run_id", "own");
    set_flag(&mut args, "--memory_save_steps", "0");
    common::train_log(&common::waypoint().args(&args).output().unwrap());
    for step in [4, 8] {
        let m = common::runs::manager(base, "drained");
        let drained = m.manifest(waypoint_checkpoint::StepName::new(step)).await;
        let m = common::runs::manager(base, "own");
        let own = m.manifest(waypoint_checkpoint::StepName::new(step)).await;
        let files = |m: waypoint_checkpoint::Manifest| -> Vec<(String, String)> {
            m.dcp_files()
                .map(|f| (f.path.clone(), f.sha256.clone()))
                .collect()
        };
        assert_eq!(files(drained.unwrap()), files(own.unwrap()), "step {step}");
    }
}

/// SIGTERM: the current step is saved to the durable tier, and the memory tier's copies — no
/// newer — are removed (their RAM goes back to the node); a restart resumes from the durable tier
/// and ends bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_run_gives_its_memory_tier_back() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let shm = common::tier_dir();
    let args = |run: &str| flags(base, run, shm.path(), 100);
    common::ok(&common::waypoint().args(args("reference")).output().unwrap());
    let mut child = common::spawn_logged(common::waypoint().args(args("stopped")));
    let log = common::runs::sigterm_after_step(&mut child, 8);
    let s = status(base, "stopped");
    assert_eq!(s["state"], "CANCELLED", "{s}\n{log}");
    assert!(
        std::fs::read_dir(shm.path()).unwrap().next().is_none(),
        "the stopped run's tier is gone:\n{log}"
    );
    let out = common::waypoint().args(args("stopped")).output().unwrap();
    let log = common::train_log(&out);
    let s = status(base, "stopped");
    assert_eq!(s["state"], "FINISHED", "{s}\n{log}");
    assert_eq!(s["resumed_from"]["tier"], "durable", "{s}\n{log}");
    same_end(base, "reference", "stopped").await;
}
