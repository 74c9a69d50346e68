//! `waypoint train` and `waypoint ckpt` as people and the control plane use them: the embedded demo,
//! run records, restart of a finished run, promotion, config drift, bad input, the torchrun worker
//! environment, and `ckpt list|verify|promote|gc` — locally and on the S3-compatible server.

mod common;

use std::process::Output;

use waypoint_storage::{RunLayout, Store};

/// `waypoint train` on CPU: 30 steps saving every 10, unless `extra` sets `--max_steps` or `--save_steps`.
fn train(base: &str, run_id: &str, extra: &[&str]) -> Output {
    let mut cmd = common::waypoint();
    cmd.args(["train", "--device", "cpu", "--run_id", run_id])
        .args(["--checkpoint_base_uri", base]);
    if !extra.contains(&"--save_steps") {
        cmd.args(["--save_steps", "10"]);
    }
    if !extra.contains(&"--max_steps") {
        cmd.args(["--max_steps", "30"]);
    }
    cmd.args(extra).output().expect("run waypoint")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

async fn json(store: &Store, key: &str) -> serde_json::Value {
    serde_json::from_slice(&store.get(key).await.unwrap()).unwrap()
}

async fn trains_records_restarts_and_promotes(base: &str) {
    let store = Store::open(base).unwrap();
    let layout = RunLayout::new("demo", "waypoint").unwrap();
    let first = [
        "--output_model_id",
        "demo-model",
        "--eval_dataset_uri",
        "builtin:demo",
        "--eval_steps",
        "15",
    ];
    let stdout = common::ok(&train(base, "demo", &first));
    assert!(stdout.contains("finished 30 steps"), "{stdout}");
    assert!(stdout.contains("promoted to"), "{stdout}");

    let status = json(&store, &layout.status()).await;
    assert_eq!(status["state"], "FINISHED");
    assert_eq!(status["step"], 30);
    assert_eq!(status["checkpoint"], "step-000030");
    let metrics = String::from_utf8(store.get(&layout.metrics()).await.unwrap().to_vec()).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 30);
    assert!(losses[29] < losses[0] * 0.8, "loss falls: {losses:?}");
    let evals: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eval_loss"].as_f64())
        .collect();
    assert_eq!(evals.len(), 2, "eval at steps 15 and 30");
    assert!(evals[1] < evals[0], "eval loss falls: {evals:?}");
    let run = json(&store, &layout.run_config()).await;
    assert_eq!(run["config"]["max_steps"], 30);
    assert_eq!(run["config_fingerprint"].as_str().unwrap().len(), 64);
    let dl = json(&store, &layout.dataloader()).await;
    assert_eq!(dl["step-000030"]["data_consumed"], 30 * 8);
    for file in ["config.json", "model.safetensors"] {
        assert!(store
            .exists(&format!("models/demo-model/{file}"))
            .await
            .unwrap());
    }

    // A restarted pod with the same command: nothing to redo, nothing overwritten.
    let stdout = common::ok(&train(base, "demo", &first));
    assert!(stdout.contains("already finished"), "{stdout}");
    assert_eq!(json(&store, &layout.status()).await["attempt"], 2);

    // Config drift: a clear error naming the setting, exit 2, nothing written.
    let before = store.get(&layout.run_config()).await.unwrap();
    let out = train(base, "demo", &["--seed", "7"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("configuration drift") && err.contains("seed: was 42, now 7"),
        "{err}"
    );
    assert_eq!(store.get(&layout.run_config()).await.unwrap(), before);
    assert_eq!(json(&store, &layout.status()).await["state"], "FINISHED");

    // The ckpt tool over the same run.
    let run_uri = format!("{}/demo/framework=waypoint", base.trim_end_matches('/'));
    let list = common::ok(
        &common::waypoint()
            .args(["ckpt", "list", &run_uri])
            .output()
            .unwrap(),
    );
    assert!(
        list.contains("step-000030") && list.contains("TRAINING,INFERENCE_BASE"),
        "{list}"
    );
    assert!(
        list.contains("step-000020") && list.contains("step-000010"),
        "{list}"
    );
    let verify = common::ok(
        &common::waypoint()
            .args(["ckpt", "verify", &run_uri])
            .output()
            .unwrap(),
    );
    assert_eq!(verify.matches(": ok").count(), 3, "{verify}");
    let out = common::waypoint()
        .args(["ckpt", "promote", &run_uri, "step-000020", "m2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("TRAINING"),
        "a resumable-only checkpoint is refused: {}",
        stderr(&out)
    );
    common::ok(
        &common::waypoint()
            .args(["ckpt", "promote", &run_uri, "step-000030", "m2"])
            .output()
            .unwrap(),
    );
    assert!(store.exists("models/m2/model.safetensors").await.unwrap());
    let gc = common::ok(
        &common::waypoint()
            .args(["ckpt", "gc", &run_uri])
            .output()
            .unwrap(),
    );
    assert!(gc.contains("0 orphan blob(s) removed"), "{gc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_run_records_restarts_and_promotes_locally() {
    let dir = tempfile::tempdir().unwrap();
    trains_records_restarts_and_promotes(dir.path().to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_run_records_restarts_and_promotes_on_s3() {
    let Some(s3) = common::s3_base() else {
        return;
    };
    let base = format!("{s3}/{}", common::unique("cli"));
    trains_records_restarts_and_promotes(&base).await;

    // The dataset can live in the store too.
    let store = Store::open(&base).unwrap();
    let rows: Vec<String> = (0..200)
        .map(|i| format!("{{\"text\": \"row {i} of a dataset that lives in S3\"}}"))
        .collect();
    store
        .put("data/train.jsonl", rows.join("\n").into())
        .await
        .unwrap();
    let out = train(
        &base,
        "s3-data",
        &[
            "--dataset_uri",
            &format!("{base}/data/"),
            "--max_steps",
            "5",
        ],
    );
    common::ok(&out);
    let run = json(
        &store,
        &RunLayout::new("s3-data", "waypoint").unwrap().run_config(),
    )
    .await;
    assert_eq!(run["train_documents"], 200);
}

#[test]
fn the_default_command_runs_the_embedded_demo() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::waypoint()
        .arg("train")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = common::ok(&out);
    assert!(stdout.contains("finished"), "{stdout}");
    let run = dir.path().join("runs/demo/framework=waypoint");
    assert!(run.join("status.json").is_file());
    assert!(run.join("config/run.json").is_file());
    assert!(run.join("logs/metrics.jsonl").is_file());
}

#[test]
fn bad_input_is_named_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--max_stesp", "3"], "--max_steps"),
        (
            vec!["--run_id", "../escape"],
            "invalid run id \"../escape\"",
        ),
        (
            vec!["--save_steps", "5", "--dcp_save_interval", "6"],
            "--dcp_save_interval",
        ),
        (vec!["--lora_alpha", "8"], "--lora_rank"),
        (
            vec!["--model_id", "/nonexistent/model"],
            "--model_id /nonexistent/model",
        ),
        (
            vec!["--lr_scheduler", "cosin"],
            "cosine, linear or constant",
        ),
        (vec!["--device", "tpu"], "--device tpu"),
        (vec!["--init_from_checkpoint", "nocolon"], "run_id:step-N"),
    ];
    for (args, expect) in cases {
        let out = common::waypoint()
            .args(["train", "--checkpoint_base_uri", base])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    // Nothing was written for any of them.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A config file with an unknown key names it and the closest valid one.
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "learning_rate = 0.1\n").unwrap();
    let out = common::waypoint()
        .args(["train", "--config_path", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown setting `learning_rate`"),
        "{}",
        stderr(&out)
    );

    // A bad dataset row names the file and line.
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap();
    let out = train(base, "bad", &["--dataset_uri", data.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("d.jsonl, line 2"), "{}", stderr(&out));
}

#[test]
fn runs_as_a_single_torchrun_worker() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let error_file = dir.path().join("error.json");
    let torchrun_env = [
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("GROUP_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_RESTART_COUNT", "0"),
        ("TORCHELASTIC_USE_AGENT_STORE", "False"),
    ];
    let out = common::waypoint()
        .args(["train", "--device", "cpu", "--max_steps", "5"])
        .args(["--checkpoint_base_uri", base])
        .envs(torchrun_env)
        .env("TORCHELASTIC_ERROR_FILE", &error_file)
        .output()
        .unwrap();
    common::ok(&out);
    assert!(!error_file.exists());

    // A failing worker leaves the error file torchrun's agent reads, and a FAILED status.
    let data = dir.path().join("empty.jsonl");
    std::fs::write(&data, "{\"text\": \"x\"}\n").unwrap();
    let out = common::waypoint()
        .args(["train", "--device", "cpu", "--run_id", "tiny-data"])
        .args([
            "--checkpoint_base_uri",
            base,
            "--dataset_uri",
            data.to_str().unwrap(),
        ])
        .envs(torchrun_env)
        .env("TORCHELASTIC_ERROR_FILE", &error_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let body: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&error_file).unwrap()).unwrap();
    let message = body["message"]["message"].as_str().unwrap();
    assert!(message.contains("--max_seq_len"), "{message}");
    let status: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("tiny-data/framework=waypoint/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status["state"], "FAILED");
    assert!(status["error"].as_str().unwrap().contains("--max_seq_len"));

    // A rank whose peers never come: a clear error after --dist_timeout_secs, never a hang.
    let port = common::free_port().to_string();
    let started = std::time::Instant::now();
    let out = common::waypoint()
        .args(["train", "--device", "cpu", "--checkpoint_base_uri", base])
        .args(["--dist_timeout_secs", "2"])
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", port.as_str()),
        ])
        .env("TORCHELASTIC_USE_AGENT_STORE", "True")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let err = stderr(&out);
    assert!(
        err.contains("rank 1 of 2") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn init_from_checkpoint_starts_from_another_runs_weights_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&train(base, "parent", &[]));
    let child = [
        "--init_from_checkpoint",
        "parent:step-000030",
        "--max_steps",
        "10",
    ];
    let out = train(base, "child", &child);
    let err = stderr(&out);
    common::ok(&out);
    assert!(
        err.contains("initialised the weights from another run"),
        "{err}"
    );
    // The child's first loss is far below a fresh model's: it starts from trained weights.
    let first_loss = |run: &str| -> f64 {
        let text = std::fs::read_to_string(
            dir.path()
                .join(format!("{run}/framework=waypoint/logs/metrics.jsonl")),
        )
        .unwrap();
        serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    assert!(first_loss("child") < first_loss("parent") - 0.5);
    // Once the child has checkpoints, a restart resumes them and ignores the flag.
    let out = train(base, "child", &child);
    common::ok(&out);
    assert!(
        stderr(&out).contains("ignoring --init_from_checkpoint"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_that_keeps_failing_fails_the_job_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    // A file where step 6's folder must go: every write of that save fails (even for root).
    let checkpoints = dir.path().join("broken/framework=waypoint/checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    std::fs::write(checkpoints.join("step-000006"), b"in the way").unwrap();
    let out = train(base, "broken", &["--max_steps", "30", "--save_steps", "3"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("save failed, retrying"), "{err}");
    assert!(
        err.contains("saving checkpoint step-000006 failed after 3 tries"),
        "{err}"
    );
    let store = Store::open(base).unwrap();
    let layout = RunLayout::new("broken", "waypoint").unwrap();
    let status = json(&store, &layout.status()).await;
    assert_eq!(status["state"], "FAILED");
    assert!(status["error"].as_str().unwrap().contains("step-000006"));
    // What was committed before stays intact and resumable.
    let m = waypoint_checkpoint::CheckpointManager::new(store, layout, Default::default());
    assert_eq!(m.latest_resumable(true).await.unwrap().unwrap().step, 3);
}
