//! What the end-to-end benches share: a Hugging Face model made by the test venv's transformers, a
//! JSONL dataset, and running processes.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// An environment variable as a number, or `default`.
pub(crate) fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The venv's Python.
pub(crate) fn python() -> String {
    std::env::var("VIRTUAL_ENV")
        .map(|v| format!("{v}/bin/python"))
        .expect("VIRTUAL_ENV unset: run scripts/bench.sh (or source scripts/env.sh)")
}

/// Runs `cmd`, fails loudly, returns stdout.
pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start process");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `cmd`, fails loudly, returns stderr (the log).
pub(crate) fn run_log(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start process");
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{cmd:?} failed:\n{log}");
    log
}

/// A random Llama (`WAYPOINT_BENCH_HIDDEN`, default 512; `WAYPOINT_BENCH_LAYERS`, default 6) in
/// `dir`; returns (hidden, layers).
pub(crate) fn make_model(dir: &Path) -> (usize, usize) {
    let hidden = env_or("WAYPOINT_BENCH_HIDDEN", 512);
    let layers = env_or("WAYPOINT_BENCH_LAYERS", 6);
    std::fs::create_dir_all(dir).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/hf_models.py");
    run(Command::new(python()).args([
        script,
        "make",
        dir.to_str().unwrap(),
        "llama",
        "--hidden",
        &hidden.to_string(),
        "--inter",
        &(hidden * 11 / 4).to_string(),
        "--layers",
        &layers.to_string(),
    ]));
    (hidden, layers)
}

/// 400 rows of text.
pub(crate) fn write_dataset(path: &Path) {
    let rows: Vec<String> = (0..400)
        .map(|i| {
            format!(
                "{{\"text\": \"row {i}: the trainer writes the weights, the optimizer state and the \
                 data position; a checkpoint is real once its manifest exists, and resume continues \
                 from the newest complete one.\"}}"
            )
        })
        .collect();
    std::fs::write(path, rows.join("\n")).unwrap();
}
