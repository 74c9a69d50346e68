//! Any failure inside a training step — here a libtorch error provoked at a chosen step, as a CUDA
//! out-of-memory would arrive (tch panics on it) — ends as `FAILED` in `status.json` with the error,
//! in the torchrun error file, and with exit code 1; never as a panic (exit 101).

mod common;

#[test]
fn a_libtorch_error_in_the_step_ends_as_failed_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let error_file = dir.path().join("error.json");
    let flags = ["--max_steps", "10", "--save_steps", "2"];
    let out = common::waypoint()
        .args(common::runs::train_args(
            "cpu",
            1,
            &flags,
            "boom",
            dir.path().to_str().unwrap(),
        ))
        .env("WAYPOINT_FAULT_INJECT_STEP", "3")
        // (With RUST_BACKTRACE set the default panic report, with its backtrace, is kept.)
        .env_remove("RUST_BACKTRACE")
        .env("TORCHELASTIC_ERROR_FILE", &error_file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("training step 3 failed in libtorch"), "{err}");
    // The panic inside libtorch's wrapper is one log line, not the default hook's raw report.
    assert!(err.contains("ERROR") && err.contains("panic: "), "{err}");
    assert!(!err.contains("panicked at"), "{err}");
    let status = common::read_json(dir.path().join("boom/framework=waypoint/status.json"));
    assert_eq!(status["state"], "FAILED", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("step 3") && error.contains("mat1 and mat2"),
        "{error}"
    );
    assert_eq!(status["step"], 2, "{status}");
    let file = std::fs::read_to_string(&error_file).unwrap();
    assert!(file.contains("training step 3 failed"), "{file}");
}
