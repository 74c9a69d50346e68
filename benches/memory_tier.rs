//! The memory tier, end to end through the `waypoint` binary on CPU, figure beside anchor:
//! - step time with a memory-tier save every step against none (`--memory_save_steps 1` vs `0`;
//!   target ≤ 1.02×), and the loop's stall per step;
//! - the tier's write speed (the state's bytes over a memory-tier save's write-to-commit seconds)
//!   against a plain write of as many bytes to the same tmpfs (target ≥ 0.9×);
//! - a durable save's host copy on a tier save's step, drained from the tier's copy, against one
//!   copied from the state;
//! - recovery after a SIGKILL: seconds from the restart to its first step and steps redone, from
//!   the memory tier, from the durable tier on local disk, and from the durable tier on the S3
//!   test server (`s3s-fs` on loopback; target: memory ≥ 5× faster than S3).
//!
//! WAYPOINT_BENCH_HIDDEN / _LAYERS size the model (default 1024 / 6: ~75M parameters, ~0.9 GB of
//! resumable state); the tier lives in /dev/shm.

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use support::{env_or, make_model, write_dataset};
use waypoint_testkit::s3fault::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};

fn waypoint() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_waypoint"));
    c.env_remove("LD_LIBRARY_PATH");
    c
}

struct Bench<'a> {
    model: &'a Path,
    data: &'a Path,
    tier: &'a Path,
    s3: Vec<(&'static str, String)>,
}

impl Bench<'_> {
    fn args(&self, base: &str, run: &str, steps: u32, save_steps: u32, memory: u32) -> Vec<String> {
        [
            "train",
            "--device",
            "cpu",
            "--num_threads",
            "2",
            "--model_id",
            self.model.to_str().unwrap(),
            "--dataset_uri",
            self.data.to_str().unwrap(),
            "--max_seq_len",
            "128",
            "--batch_size",
            "2",
            "--logging_steps",
            "1",
            "--max_steps",
            &steps.to_string(),
            "--save_steps",
            &save_steps.to_string(),
            "--memory_save_steps",
            &memory.to_string(),
            "--memory_tier_dir",
            self.tier.to_str().unwrap(),
            "--run_id",
            run,
            "--checkpoint_base_uri",
            base,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn command(&self, args: &[String]) -> Command {
        let mut c = waypoint();
        c.args(args)
            .env("RUST_LOG", "info,waypoint_trainer::checkpointing=debug")
            .envs(self.s3.iter().map(|(k, v)| (*k, v.as_str())));
        c
    }
}

/// The step of a `train step=N` log line.
fn logged_step(line: &str) -> Option<u64> {
    let at = line.find(": train step=")? + ": train step=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The number after `key` in a line.
fn number_after(line: &str, key: &str) -> Option<f64> {
    let at = line.find(key)? + key.len();
    line[at..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

/// Runs to the end; returns the log.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    log
}

/// The mean step seconds after the first two (from the `train step` lines' timestamps).
fn mean_step_secs(log: &str) -> f64 {
    let times: Vec<f64> = log
        .lines()
        .filter(|l| logged_step(l).is_some())
        .filter_map(|l| {
            let t = l.split_whitespace().next()?;
            let hms = t.split('T').nth(1)?.trim_end_matches('Z');
            let mut parts = hms.split(':').map(|p| p.parse::<f64>().unwrap_or(0.0));
            Some(parts.next()? * 3600.0 + parts.next()? * 60.0 + parts.next()?)
        })
        .collect();
    let later = &times[2.min(times.len())..];
    (later.last().unwrap() - later.first().unwrap()) / (later.len().max(2) - 1) as f64
}

/// Starts a run, SIGKILLs it once the durable tier committed step `durable` and (with `memory`)
/// the memory tier a later one; the step it last logged.
fn kill_after(cmd: &mut Command, durable: u64, memory: bool) -> u64 {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (mut last, mut durable_done, mut memory_done) = (0, false, !memory);
    let durable_name = format!("checkpoint=step-{durable:06}");
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(s) = logged_step(&line) {
            last = s;
        }
        durable_done |=
            line.contains("checkpoint committed rank=0") && line.contains(&durable_name);
        if durable_done && line.contains("memory-tier checkpoint committed rank=0") {
            memory_done |=
                number_after(&line, "checkpoint=step-").is_some_and(|s| s as u64 > durable);
        }
        if durable_done && memory_done && last > durable {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    last
}

/// Restarts and follows it to its first step: (seconds to it, the step it resumed at, the tier).
fn recover(cmd: &mut Command) -> (f64, u64, String) {
    let started = Instant::now();
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (mut resumed, mut tier) = (0, String::new());
    let mut secs = 0.0;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("resumed checkpoint=") {
            resumed = number_after(&line, " step=").unwrap_or(0.0) as u64;
            tier = line
                .split("tier=\"")
                .nth(1)
                .and_then(|t| t.split('"').next())
                .unwrap_or("")
                .to_string();
        }
        if logged_step(&line).is_some() {
            secs = started.elapsed().as_secs_f64();
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    (secs, resumed, tier)
}

fn main() {
    if support::probed() {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let model = dir.path().join("model");
    std::env::set_var(
        "WAYPOINT_BENCH_HIDDEN",
        env_or("WAYPOINT_BENCH_HIDDEN", 1024).to_string(),
    );
    let (hidden, layers) = make_model(&model);
    let data = dir.path().join("data.jsonl");
    write_dataset(&data);
    let tier_dir = tempfile::tempdir_in("/dev/shm").expect("a folder in /dev/shm");
    let s3 = S3Server::start().expect("s3s-fs (scripts/setup.sh installs it)");
    let bench = Bench {
        model: &model,
        data: &data,
        tier: tier_dir.path(),
        s3: vec![
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", s3.port()),
            ),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ],
    };
    let local = dir.path().join("runs");
    let local = local.to_str().unwrap();

    // Step overhead and write speed.
    let off = run(&mut bench.command(&bench.args(local, "off", 12, 1000, 0)));
    let on = run(&mut bench.command(&bench.args(local, "on", 12, 1000, 1)));
    let (t_off, t_on) = (mean_step_secs(&off), mean_step_secs(&on));
    let stalls: Vec<f64> = on
        .lines()
        .filter(|l| l.contains("memory tier: step-"))
        .filter_map(|l| number_after(l, "loop stalled "))
        .collect();
    let uploads: Vec<f64> = on
        .lines()
        .filter(|l| l.contains("memory tier: step-"))
        .filter_map(|l| number_after(l, "upload "))
        .collect();
    let state_bytes: u64 = std::fs::read_dir(
        Path::new(local).join("on/framework=waypoint/checkpoints/step-000012/dcp"),
    )
    .unwrap()
    .map(|e| e.unwrap().metadata().unwrap().len())
    .sum();
    let saves = uploads.len();
    let tier_gbs = state_bytes as f64 / (uploads.iter().sum::<f64>() / saves.max(1) as f64) / 1e9;
    let raw = tier_dir.path().join("raw");
    let bytes = vec![7u8; state_bytes as usize];
    let t = Instant::now();
    std::fs::write(&raw, &bytes).unwrap();
    let raw_gbs = state_bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
    std::fs::remove_file(&raw).unwrap();
    println!(
        "memory tier on CPU (hidden {hidden}, {layers} layers, {:.2} GB of state): step {:.3} s \
         with a save every step vs {:.3} s without = {:.3}x (target <= 1.02x); {saves} saves in 12 \
         steps, loop stall {:.1} ms a save",
        state_bytes as f64 / 1e9,
        t_on,
        t_off,
        t_on / t_off,
        stalls.iter().sum::<f64>() / stalls.len().max(1) as f64 * 1e3
    );
    println!(
        "memory tier write: {tier_gbs:.2} GB/s vs plain tmpfs write {raw_gbs:.2} GB/s = {:.2}x \
         (target >= 0.9x; the tier also checksums every byte, CRC32C)",
        tier_gbs / raw_gbs
    );

    // A durable save on a tier save's step: its host copy drained from the tier's, against one
    // taken from the live state.
    let durable_copy = |log: &str| -> (f64, usize) {
        let secs: Vec<f64> = log
            .lines()
            .filter(|l| l.contains("save report: step-") && !l.contains("step-000012"))
            .filter_map(|l| number_after(l, "snapshot "))
            .collect();
        (
            secs.iter().sum::<f64>() / secs.len().max(1) as f64,
            secs.len(),
        )
    };
    // Tier saves on the durable saves' steps (every 4): a tier save every step is still being
    // written at most of them here (a step is shorter than a tier write), and is then skipped.
    let own = run(&mut bench.command(&bench.args(local, "own-copy", 12, 4, 0)));
    let drained = run(&mut bench.command(&bench.args(local, "drained", 12, 4, 4)));
    let ((t_own, n_own), (t_drained, n_drained)) = (durable_copy(&own), durable_copy(&drained));
    let drained_saves = drained
        .lines()
        .filter(|l| l.contains("save report: step-") && l.contains("the memory tier's copy"))
        .count();
    println!(
        "durable save's host copy: {t_own:.3} s copied from the state without the tier ({n_own} \
         saves) vs {t_drained:.3} s with the tier's copy of the step drained ({drained_saves} of \
         {n_drained} saves; one copy serves both tiers); steps {:.3} s vs {:.3} s",
        mean_step_secs(&own),
        mean_step_secs(&drained)
    );

    // Recovery: killed once the durable tier committed step 4 (and, for the memory tier's figure,
    // the tier a later step), restarted from each tier.
    let s3_base = format!("s3://{BUCKET}/bench");
    let mut figures = Vec::new();
    for (name, base, wipe) in [
        ("memory tier", local, false),
        ("durable, local disk", local, true),
        ("durable, S3 on loopback", s3_base.as_str(), true),
    ] {
        let run_id =
            name.split([' ', ',']).next().unwrap().to_string() + if wipe { "-d" } else { "" };
        let run_id = format!("{run_id}-{}", figures.len());
        let args = bench.args(base, &run_id, 40, 4, 1);
        let killed = kill_after(&mut bench.command(&args), 4, !wipe);
        if wipe {
            std::fs::remove_dir_all(tier_dir.path()).unwrap();
            std::fs::create_dir_all(tier_dir.path()).unwrap();
        }
        let (secs, resumed, tier) = recover(&mut bench.command(&args));
        println!(
            "recovery from the {name}: {secs:.2} s from restart to the first step, resumed at step \
             {resumed} ({tier}), {} step(s) redone",
            killed.saturating_sub(resumed)
        );
        figures.push(secs);
    }
    println!(
        "recovery: memory tier {:.2} s vs durable S3 {:.2} s = {:.1}x faster (target >= 5x); vs \
         durable local disk {:.2} s = {:.1}x",
        figures[0],
        figures[2],
        figures[2] / figures[0],
        figures[1],
        figures[1] / figures[0]
    );
}
