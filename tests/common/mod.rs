//! Helpers of the end-to-end tests of the `waypoint` binary; what every suite shares is in
//! `waypoint-testkit`.
#![allow(dead_code)]

pub(crate) mod memory;
pub(crate) mod runs;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) use waypoint_testkit::*;

/// The `waypoint` binary, finding libtorch through its rpath alone.
pub(crate) fn waypoint() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_waypoint"));
    c.env_remove("LD_LIBRARY_PATH").env("RUST_LOG", "info");
    c
}

/// Runs `tests/python/<script>` with `args` in the venv; returns its stdout.
pub(crate) fn root_python_script(script: &str, args: &[&str]) -> String {
    python_script(
        &format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR")),
        args,
    )
}

/// Starts `cmd` with stdout discarded and stderr piped, for [`runs::read_until`] to follow its log.
pub(crate) fn spawn_logged(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the process")
}

/// Fails the test with its log unless the `waypoint train` that made `out` succeeded; returns the log
/// (stderr).
pub(crate) fn train_log(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "waypoint train failed:\n{stderr}");
    stderr
}

/// Sends signal `sig` (a name: `TERM`, `KILL`, `STOP`, …) to process `pid` with `kill`.
pub(crate) fn send_signal(pid: impl std::fmt::Display, sig: &str) -> std::io::Result<ExitStatus> {
    Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
}

/// Polls `ready` every `poll` until it holds; fails the test with `what` once `limit` has passed.
pub(crate) fn wait_for(
    what: &str,
    limit: Duration,
    poll: Duration,
    mut ready: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(poll);
    }
}

/// Every file under `dir`, as text (nothing where `dir` cannot be read).
pub(crate) fn all_text_under(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push_str(&all_text_under(&p));
        } else if let Ok(bytes) = std::fs::read(&p) {
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    out
}

/// The JSON file at `path` (a run's `status.json`, …).
pub(crate) fn read_json(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// `s` without its terminal escape sequences (CSI: ESC `[` … a letter), as a log read from a
/// terminal-like stream has them.
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A tmpfs folder for a test's memory tier (as in production), else a temporary folder.
pub(crate) fn tier_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("waypoint-test-tier")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}
