//! `waypoint train` and `waypoint ckpt` as people and the control plane use them: the embedded demo,
//! run records, restart of a finished run, promotion, config drift, bad input, the torchrun worker
//! environment, and `ckpt list|verify|promote|gc` — locally and on the S3-compatible server.

mod common;

use std::process::Output;

use waypoint_checkpoint::RunLayout;
use waypoint_storage::Store;

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

    // Settings that decide the trajectory (the lr, the schedule's length) differ from what the
    // checkpoint was trained with: refused, each change named old → new, nothing written...
    let before = store.get(&layout.run_config()).await.unwrap();
    let changed = ["--lr", "0.001", "--max_steps", "40"];
    let out = train(base, "demo", &changed);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("lr: was 0.003, now 0.001")
            && err.contains("total_steps: was 30, now 40")
            && err.contains("--allow_config_change"),
        "{err}"
    );
    assert_eq!(store.get(&layout.run_config()).await.unwrap(), before);
    // ...and with --allow_config_change applied, logged, and kept in the attempt record and in
    // config/run.json, beside every earlier attempt's settings.
    let out = train(
        base,
        "demo",
        &[&changed[..], &["--allow_config_change"]].concat(),
    );
    let stdout = common::ok(&out);
    assert!(stdout.contains("finished 40 steps"), "{stdout}");
    assert!(stderr(&out).contains("--allow_config_change: lr: was 0.003, now 0.001"));
    let attempt = json(&store, &layout.attempt(3)).await;
    let recorded: Vec<&str> = attempt["info"]["config_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(recorded.contains(&"lr: was 0.003, now 0.001"), "{attempt}");
    assert_eq!(attempt["info"]["training"]["lr"], 0.001);
    let run = json(&store, &layout.run_config()).await;
    assert_eq!(run["attempt"], 3);
    assert_eq!(run["training"]["total_steps"], 40);
    let history: Vec<u64> = run["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(history, [1, 2], "{run}");
    assert_eq!(run["history"][0]["config"]["lr"], 0.003);
    // Each checkpoint records what it was trained with, the data's content fingerprint included.
    let manifest = |step| {
        let key = layout.manifest(waypoint_checkpoint::StepName::new(step));
        let store = store.clone();
        async move { json(&store, &key).await }
    };
    let (old, new) = (manifest(30).await, manifest(40).await);
    assert_eq!(old["training"]["lr"], 0.003, "{old}");
    assert_eq!(new["training"]["lr"], 0.001, "{new}");
    assert_eq!(new["training"]["total_steps"], 40);
    let data = new["training"]["data"].as_str().unwrap();
    assert_eq!(data.len(), 64, "{new}");
    assert_eq!(old["training"]["data"], data);
}

/// A dataset whose content changes under the same URI changes the trajectory: refused, naming the
/// data; a file only touched (same tokens) resumes.
#[test]
fn a_dataset_whose_tokens_changed_is_a_change_of_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("runs");
    let data = dir.path().join("train.jsonl");
    let rows = |tag: &str| {
        (0..64)
            .map(|i| format!("{{\"text\": \"{tag} row {i}: some words to train on\"}}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    std::fs::write(&data, rows("first")).unwrap();
    let base = base.to_str().unwrap();
    let run = |steps: &str, allow: bool| {
        let mut args = vec![
            "--dataset_uri",
            data.to_str().unwrap(),
            "--max_steps",
            steps,
            "--save_steps",
            "2",
        ];
        if allow {
            args.push("--allow_config_change");
        }
        train(base, "data", &args)
    };
    common::ok(&run("2", false));
    // Touched, same rows: the same tokens, so the same run.
    std::fs::write(&data, rows("first")).unwrap();
    let out = run("4", true);
    let stdout = common::ok(&out);
    assert!(stdout.contains("finished 4 steps"), "{stdout}");
    assert!(!stderr(&out).contains("data: was"), "{}", stderr(&out));
    // Other rows at the same URI: refused, naming the data, until the change is asked for.
    std::fs::write(&data, rows("second")).unwrap();
    let out = run("4", false);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("data: was"), "{}", stderr(&out));
    let out = run("6", true);
    common::ok(&out);
    assert!(
        stderr(&out).contains("--allow_config_change: data: was"),
        "{}",
        stderr(&out)
    );
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
        .env_remove("HOSTNAME")
        .output()
        .unwrap();
    let stdout = common::ok(&out);
    assert!(stdout.contains("finished"), "{stdout}");
    let run = dir.path().join("runs/demo/framework=waypoint");
    assert!(run.join("status.json").is_file());
    assert!(run.join("config/run.json").is_file());
    assert!(run.join("logs/metrics.jsonl").is_file());
    // Without HOSTNAME (outside a pod) the attempt record names the machine all the same.
    let attempt = common::read_json(run.join("attempts/000001.json"));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(attempt["info"]["host"], host.trim(), "{attempt}");
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
        (
            vec!["--save_steps", "auto"],
            "--save_steps auto needs --mtbf_hours",
        ),
        (
            vec!["--save_steps", "auto", "--mtbf_hours", "0"],
            "--save_steps auto needs --mtbf_hours",
        ),
        (
            vec!["--mtbf_hours", "12"],
            "--mtbf_hours 12 only sets the interval of --save_steps auto",
        ),
        (
            vec!["--save_steps", "often"],
            "neither a number of steps nor `auto`",
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
    // A lasting local condition (a file where a folder must go) is an answer, not retried for the
    // whole deadline: the job fails at once, naming the save.
    assert!(!err.contains("transient storage error, retrying"), "{err}");
    assert!(
        err.contains("saving checkpoint step-000006 failed"),
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

/// Runs `waypoint train` over `base` with `args` and checks it is refused as bad usage: exit 2, the
/// expected words on stderr, no panic, and nothing written (`base` not even created).
fn refused_before_any_work(base: &std::path::Path, args: &[String], expect: &str) {
    let out = common::waypoint()
        .args(["train", "--device", "cpu", "--checkpoint_base_uri"])
        .arg(base)
        .args(args)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        err.contains(expect),
        "{args:?}: expected {expect:?} in: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(!base.exists(), "{args:?} wrote {}", base.display());
}

#[test]
fn hostile_and_meaningless_values_are_refused_naming_the_flag_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut cases: Vec<(Vec<String>, String)> = [
        (
            &["--batch_size", "18446744073709551615"][..],
            "--batch_size 18446744073709551615 is out of range: use 1 to 65536",
        ),
        (
            &["--batch_size", "1000000000"],
            "--batch_size 1000000000 is out of range",
        ),
        (
            &["--num_threads", "2147483648"],
            "--num_threads 2147483648 is out of range: use 0 to 1024",
        ),
        (&["--num_threads", "1000000"], "--num_threads 1000000"),
        (
            &["--gradient_accumulation", "1000000000000"],
            "--gradient_accumulation 1000000000000 is out of range",
        ),
        (
            &["--lora_rank", "1000000"],
            "--lora_rank 1000000 is out of range",
        ),
        (
            &["--batch_size", "4096", "--max_seq_len", "65536"],
            "tokens per step on each rank",
        ),
        (
            &["--num_epochs", "18446744073709551615"],
            "--num_epochs 18446744073709551615 is out of range",
        ),
        (
            &["--dist_timeout_secs", "18446744073709551615"],
            "--dist_timeout_secs",
        ),
        (
            &["--min_lr_ratio=-1"],
            "--min_lr_ratio must be a number in [0, 1]; got -1",
        ),
        (
            &["--weight_decay=-1"],
            "--weight_decay must be a finite number ≥ 0",
        ),
        (
            &["--adam_epsilon=-1"],
            "--adam_epsilon must be a finite positive number",
        ),
        (
            &["--adam_epsilon", "0"],
            "--adam_epsilon must be a finite positive number",
        ),
        (
            &["--max_grad_norm=-1"],
            "--max_grad_norm must be a finite number ≥ 0 (0: no clipping)",
        ),
        (
            &["--lora_rank", "4", "--lora_alpha=-8"],
            "--lora_alpha must be",
        ),
        (
            &["--eval_steps", "5"],
            "--eval_steps 5 needs eval data: set --eval_dataset_uri",
        ),
        (
            &["--lr", "NaN"],
            "--lr must be a finite positive number; got NaN",
        ),
    ]
    .iter()
    .map(|(a, e)| (a.iter().map(|s| s.to_string()).collect(), e.to_string()))
    .collect();
    // NaN and the infinities, for every float flag.
    for flag in [
        "lr",
        "min_lr_ratio",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "lora_alpha",
        "lora_dropout",
    ] {
        for value in ["NaN", "inf", "-inf"] {
            cases.push((
                vec![format!("--{flag}={value}")],
                format!("--{flag} must be"),
            ));
        }
    }
    // Config files: `extra_args` that is not a table, a TOML nan.
    let json_cfg = dir.path().join("extra.json");
    std::fs::write(&json_cfg, r#"{"max_steps": 3, "extra_args": 5}"#).unwrap();
    cases.push((
        vec!["--config_path".into(), json_cfg.display().to_string()],
        "`extra_args` must be a table of settings".into(),
    ));
    let toml_cfg = dir.path().join("nan.toml");
    std::fs::write(&toml_cfg, "lr = nan\n").unwrap();
    cases.push((
        vec!["--config_path".into(), toml_cfg.display().to_string()],
        "nan.toml: `lr` must be a finite positive number".into(),
    ));
    for (args, expect) in &cases {
        refused_before_any_work(&base, args, expect);
    }
}

/// A Hugging Face model directory: the built-in model, trained 2 steps and promoted.
fn hf_model_dir(root: &std::path::Path) -> std::path::PathBuf {
    let base = root.join("source");
    let out = train(
        base.to_str().unwrap(),
        "source",
        &[
            "--max_steps",
            "2",
            "--save_steps",
            "0",
            "--output_model_id",
            "m",
        ],
    );
    common::ok(&out);
    let model = base.join("models/m");
    assert!(model.join("config.json").is_file() && model.join("tokenizer.json").is_file());
    model
}

/// A copy of the model directory `from` with `edit` applied to its config.json.
fn model_with_config(
    from: &std::path::Path,
    to: &std::path::Path,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    let path = to.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
}

#[test]
fn hostile_model_configs_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = hf_model_dir(dir.path());
    let big: serde_json::Value = serde_json::from_str("1e12").unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "eos_token_id",
            (-5).into(),
            "eos_token_id -5 is not a token id of the vocabulary (0 to 258)",
        ),
        (
            "pad_token_id",
            259.into(),
            "pad_token_id 259 is not a token id",
        ),
        (
            "num_hidden_layers",
            1_000_000_000_000u64.into(),
            "num_hidden_layers 1000000000000 is out of range: use 1 to 1024",
        ),
        (
            "num_hidden_layers",
            big,
            "`num_hidden_layers` is missing or not an integer",
        ),
        (
            "hidden_size",
            (-64).into(),
            "hidden_size -64 is out of range",
        ),
        (
            "vocab_size",
            (1u64 << 40).into(),
            "vocab_size 1099511627776 is out of range",
        ),
        (
            "num_hidden_layers",
            50.into(),
            "the config does not describe these weights",
        ),
    ];
    for (i, (key, value, expect)) in cases.into_iter().enumerate() {
        let bad = dir.path().join(format!("bad-{i}"));
        model_with_config(&model, &bad, |c| c[key] = value);
        let args = vec!["--model_id".to_string(), bad.display().to_string()];
        refused_before_any_work(&dir.path().join("base"), &args, expect);
    }
    // The model itself trains (the refusals above are about the edits alone).
    common::ok(&train(
        dir.path().join("base").to_str().unwrap(),
        "ok",
        &["--model_id", model.to_str().unwrap(), "--max_steps", "2"],
    ));
}

#[test]
fn lora_rank_beyond_the_models_projections_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        dir.path().to_str().unwrap(),
        "big-rank",
        &["--lora_rank", "100", "--max_steps", "2"],
    );
    let err = stderr(&out);
    // A usage error: exit 2, found before anything is written.
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--lora_rank 100 is larger than q_proj allows (64"),
        "{err}"
    );
    assert!(
        !dir.path().join("big-rank").exists(),
        "exit 2 wrote the run folder"
    );
}

#[test]
fn bad_utf8_bom_and_unknown_roles_name_file_and_line_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let data = dir.path().join("d.jsonl");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    for i in 0..20 {
        bytes.extend_from_slice(
            format!("{{\"text\": \"row {i}: a sentence long enough to fill a sample or two\"}}\n")
                .as_bytes(),
        );
    }
    bytes.extend_from_slice(b"{\"text\": \"one bad \xC3\x28 byte\"}\n");
    bytes.extend_from_slice(
        b"{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}, \
          {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
    );
    std::fs::write(&data, &bytes).unwrap();
    let path = data.to_str().unwrap();

    let out = train(base, "strict", &["--dataset_uri", path, "--max_steps", "2"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("d.jsonl, line 21") && err.contains("not UTF-8"),
        "{err}"
    );

    let out = train(
        base,
        "skipping",
        &[
            "--dataset_uri",
            path,
            "--max_steps",
            "2",
            "--skip_bad_lines",
        ],
    );
    let err = stderr(&out);
    common::ok(&out);
    assert!(
        err.contains("role \\\"robot\\\"") || err.contains("role \"robot\""),
        "{err}"
    );
    assert!(err.contains("system, user, assistant, tool"), "{err}");
    let run: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join("skipping/framework=waypoint/config/run.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // The BOM did not spoil line 1: 20 rows, 2 skipped.
    assert_eq!(run["train_documents"], 20, "{run}");
    assert_eq!(run["skipped_rows"], 2, "{run}");
}

/// Runs `waypoint args…` with its stdout already closed by the reader (as `| head -0` would).
fn with_closed_stdout(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = common::waypoint()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The child takes far longer to load libtorch than this takes.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (out.status, stderr(&out))
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let finished = ["--max_steps", "4", "--save_steps", "2"];
    common::ok(&train(base, "demo", &finished));
    let run = format!("{base}/demo/framework=waypoint");
    for sub in ["list", "verify"] {
        let (status, err) = with_closed_stdout(&["ckpt", sub, &run]);
        assert!(!err.contains("panicked"), "ckpt {sub}: {err}");
        // Ended by SIGPIPE, as `ls | head` ends `ls`: no panic (exit 101), no error message.
        assert_eq!(status.signal(), Some(13), "ckpt {sub}: {status:?} {err}");
    }
    // `train` finishes its work and exits 0 even though nobody reads its result line.
    let mut args = vec!["train", "--device", "cpu", "--checkpoint_base_uri", base];
    args.extend(["--run_id", "demo", "--save_steps", "2", "--max_steps", "4"]);
    let (status, err) = with_closed_stdout(&args);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(0), "{err}");
}

/// `waypoint status` and `waypoint ckpt` find a run the way `train` names it: its URI, its run
/// folder when one framework is inside, or `--checkpoint_base_uri`/`--run_id`/`--framework`;
/// `waypoint status` alone lists the runs under `./runs`.
#[test]
fn status_and_ckpt_find_runs_as_train_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("runs");
    let base_s = base.to_str().unwrap();
    for (run, framework) in [("a", "waypoint"), ("b", "waypoint"), ("b", "hf")] {
        common::ok(&train(
            base_s,
            run,
            &[
                "--framework",
                framework,
                "--max_steps",
                "2",
                "--save_steps",
                "0",
            ],
        ));
    }
    let waypoint = |args: &[&str]| {
        common::waypoint()
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let status_of = |args: &[&str]| -> serde_json::Value {
        let out = waypoint(args);
        serde_json::from_str(common::ok(&out).trim()).unwrap()
    };
    let a = format!("{base_s}/a/framework=waypoint");
    // The run folder of a run with one framework, and train's flags, name the same run.
    for args in [
        vec!["status", "--json", &format!("{base_s}/a")],
        vec![
            "status",
            "--json",
            "--checkpoint_base_uri",
            base_s,
            "--run_id",
            "a",
        ],
        vec!["status", "--json", &a],
    ] {
        let report = status_of(&args);
        assert_eq!(report["run"], a.as_str(), "{args:?}");
        assert_eq!(report["state"], "FINISHED", "{args:?}");
    }
    let hf = status_of(&[
        "status",
        "--json",
        "--checkpoint_base_uri",
        base_s,
        "--run_id",
        "b",
        "--framework",
        "hf",
    ]);
    assert_eq!(hf["run"], format!("{base_s}/b/framework=hf"));
    // A folder with two frameworks: refused, naming both.
    let out = waypoint(&["status", &format!("{base_s}/b")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("framework=hf") && err.contains("framework=waypoint"),
        "{err}"
    );
    // Two ways of naming a run at once: refused.
    let out = waypoint(&["status", &a, "--run_id", "a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("give one"), "{}", stderr(&out));
    // Nothing named: every run under ./runs, with its state.
    let out = waypoint(&["status"]);
    let listed = common::ok(&out);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    for run in [
        "runs/a/framework=waypoint",
        "runs/b/framework=hf",
        "runs/b/framework=waypoint",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(run) && l.contains("FINISHED")),
            "{run} in {listed}"
        );
    }
    // ckpt takes the run folder too.
    let out = waypoint(&["ckpt", "list", "--json", &format!("{base_s}/a")]);
    let listed = common::ok(&out);
    assert!(listed.contains("step-000002"), "{listed}");
}

/// `--save_steps auto` (here from a config file, as the control plane's `extra_args` pass it):
/// the first durable save after 10 steps measures what a save costs, then the saves fall at the
/// interval Young and Daly's model gives for that cost, the step time and `--mtbf_hours`, as logged.
#[test]
fn save_steps_auto_measures_a_save_then_follows_young_daly() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let cfg = dir.path().join("extra_args.json");
    // A failure every 0.036 s: the model asks for a save every step or few.
    std::fs::write(&cfg, r#"{"save_steps": "auto", "mtbf_hours": 0.00001}"#).unwrap();
    let out = common::waypoint()
        .args(["train", "--device", "cpu", "--run_id", "auto"])
        .args(["--checkpoint_base_uri", base, "--max_steps", "40"])
        .args(["--keep_last", "0", "--config_path", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let log = common::train_log(&out);
    assert!(
        log.contains("--save_steps auto for 0.00001 h between failures"),
        "{log}"
    );
    let committed: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("checkpoint committed checkpoint=step-"))
        .filter_map(|l| common::runs::logged_number(l, "checkpoint=step-"))
        .filter(|&s| s < 40)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(committed[..2], [10, 20], "{log}");
    // Each interval announced is the model's for the figures it names.
    let announced: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("durable saves now every"))
        .map(|l| {
            let every = common::runs::logged_number(l, "now every ").unwrap();
            let figure = |key: &str| -> f64 {
                let at = l.find(key).unwrap() + key.len();
                l[at..].split(' ').next().unwrap().parse().unwrap()
            };
            let (tau, step) = (figure(") = "), figure(", at "));
            assert!(
                (every as f64 - (tau / step).max(1.0)).abs() <= 1.0 + 0.01 * every as f64,
                "{l}"
            );
            every
        })
        .collect();
    assert!(!announced.is_empty(), "the interval moved from 10:\n{log}");
    // After the measured save, every gap is an announced interval.
    for gap in committed[1..].windows(2).map(|w| w[1] - w[0]) {
        assert!(
            announced.contains(&gap),
            "gap {gap}, announced {announced:?}: {committed:?}"
        );
    }
    assert!(committed.len() > 3, "{committed:?}");
}
