//! No secret inside a URI reaches stderr, `status.json`, `config/run.json` or the torchrun error file,
//! whichever flag, config key or subcommand carries it.

mod common;

const SECRET: &str = "hunter2SECRET";

fn assert_no_secret(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "{what} leaks the secret:\n{text}");
}

#[test]
fn uris_with_credentials_never_leak() {
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "--dataset_uri with user-info",
            vec![
                "--dataset_uri".into(),
                format!("s3://AKIAEXAMPLE:{SECRET}@bucket/d.jsonl"),
            ],
        ),
        (
            "--dataset_uri with a token query",
            vec![
                "--dataset_uri".into(),
                format!("s3://bucket/d.jsonl?token={SECRET}"),
            ],
        ),
        (
            "--eval_dataset_uri with user-info",
            vec![
                "--eval_dataset_uri".into(),
                format!("gs://u:{SECRET}@bucket/e.jsonl"),
                "--eval_steps".into(),
                "1".into(),
            ],
        ),
        (
            "--dataset_uri with a fragment",
            vec![
                "--dataset_uri".into(),
                format!("s3://bucket/d.jsonl#token={SECRET}"),
            ],
        ),
        (
            "--dataset_uri file:// with user-info",
            vec![
                "--dataset_uri".into(),
                format!("file://u:{SECRET}@/tmp/d.jsonl"),
            ],
        ),
        (
            "--init_from_checkpoint with a URI",
            vec![
                "--init_from_checkpoint".into(),
                format!("s3://AKIAEXAMPLE:{SECRET}@bucket/x:step-000002"),
            ],
        ),
        (
            "a stray argument the parser echoes",
            vec![format!("s3://AKIAEXAMPLE:{SECRET}@bucket/x")],
        ),
        (
            "--checkpoint_base_uri with user-info",
            vec![
                "--checkpoint_base_uri".into(),
                format!("s3://AKIAEXAMPLE:{SECRET}@bucket/runs"),
            ],
        ),
    ];
    for (what, flags) in cases {
        let dir = tempfile::tempdir().unwrap();
        let error_file = dir.path().join("error.json");
        let base = dir.path().join("runs");
        let mut cmd = common::waypoint();
        cmd.args([
            "train",
            "--device",
            "cpu",
            "--max_steps",
            "2",
            "--run_id",
            "s",
        ]);
        if !flags.contains(&"--checkpoint_base_uri".to_string()) {
            cmd.args(["--checkpoint_base_uri", base.to_str().unwrap()]);
        }
        let out = cmd
            .args(&flags)
            .env("TORCHELASTIC_ERROR_FILE", &error_file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what}: accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("***"),
            "{what}: the URI is not shown masked:\n{err}"
        );
        assert_no_secret(&format!("{what}: stderr"), &err);
        assert_no_secret(
            &format!("{what}: stdout"),
            &String::from_utf8_lossy(&out.stdout),
        );
        assert_no_secret(
            &format!("{what}: files"),
            &common::all_text_under(dir.path()),
        );
    }
}

#[test]
fn a_config_file_and_the_ckpt_commands_do_not_leak_either() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.json");
    std::fs::write(
        &config,
        format!(r#"{{"dataset_uri": "s3://AKIAEXAMPLE:{SECRET}@bucket/d.jsonl", "max_steps": 2}}"#),
    )
    .unwrap();
    let out = common::waypoint()
        .args([
            "train",
            "--run_id",
            "c",
            "--checkpoint_base_uri",
            dir.path().join("runs").to_str().unwrap(),
            "--config_path",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_no_secret("config file: stderr", &String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&config).unwrap();
    assert_no_secret("config file: files", &common::all_text_under(dir.path()));
    for sub in [&["list"][..], &["verify"], &["gc"]] {
        let out = common::waypoint()
            .arg("ckpt")
            .args(sub)
            .arg(format!(
                "s3://AKIAEXAMPLE:{SECRET}@bucket/runs/r/framework=w"
            ))
            .output()
            .unwrap();
        assert!(!out.status.success(), "ckpt {sub:?} accepted it");
        assert_no_secret(
            &format!("ckpt {sub:?}"),
            &String::from_utf8_lossy(&out.stderr),
        );
    }
}
