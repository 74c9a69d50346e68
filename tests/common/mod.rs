//! Helpers of the end-to-end tests of the `waypoint` binary; what every suite shares is in
//! `waypoint-testkit`.
#![allow(dead_code)]

pub(crate) mod runs;

pub(crate) use waypoint_testkit::*;

/// The `waypoint` binary, finding libtorch through its rpath alone.
pub(crate) fn waypoint() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_waypoint"));
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
