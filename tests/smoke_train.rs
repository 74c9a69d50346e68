//! The `waypoint` binary trains on libtorch and records its run, on local disk and on S3.

mod common;

use std::process::Command;

fn run_train(base: &str, run_id: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .args([
            "train",
            "--max_steps",
            "20",
            "--device",
            "cpu",
            "--run_id",
            run_id,
        ])
        .args(["--checkpoint_base_uri", base])
        // The binary must find libtorch through its rpath alone.
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run waypoint");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "waypoint train failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn check_recorded(store: &waypoint_storage::Store, run_id: &str) {
    let layout = waypoint_storage::RunLayout::new(run_id, "waypoint").unwrap();
    let status: serde_json::Value =
        serde_json::from_slice(&store.get(&layout.status()).await.unwrap()).unwrap();
    assert_eq!(status["state"], "FINISHED");
    assert_eq!(status["step"], 20);
    let metrics = store.get(&layout.metrics()).await.unwrap();
    let losses: Vec<f64> = String::from_utf8_lossy(&metrics)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 20);
    assert!(
        losses[19] < losses[0] * 0.8,
        "loss did not fall: {losses:?}"
    );
    assert!(store.exists(&layout.run_config()).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trains_and_records_the_run_locally_and_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let stdout = run_train(base, "smoke");
    assert!(stdout.contains("trained 20 steps"), "{stdout}");
    check_recorded(&waypoint_storage::Store::open(base).unwrap(), "smoke").await;

    if let Some(s3) = common::s3_base() {
        let base = format!("{s3}/{}", common::unique("smoke"));
        run_train(&base, "smoke-s3");
        check_recorded(&waypoint_storage::Store::open(&base).unwrap(), "smoke-s3").await;
    }
}

#[test]
fn bad_input_is_reported_with_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .args(["train", "--run_id", "../escape", "--checkpoint_base_uri"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid run id \"../escape\""), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .args(["train", "--max_stesp", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max_steps"),
        "the closest valid flag is suggested: {err}"
    );
}
