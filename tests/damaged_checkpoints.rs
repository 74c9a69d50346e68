//! Resume survives any damaged checkpoint, and the checkpoint tools never make damage worse: the
//! `waypoint` binary against checkpoints damaged on purpose (truncated, bit-flipped, deleted, with a
//! broken or misnamed manifest), locally and on the S3-compatible server; `ckpt verify` reports every
//! checkpoint; `ckpt promote` refuses a damaged model; an interrupted promotion is finished by the
//! restart; `ckpt gc` never deletes through a symbolic link.

mod common;

use std::process::Output;

use bytes::Bytes;
use common::runs::manager;
use waypoint_checkpoint::StepName;
use waypoint_checkpoint::{CheckpointManager, Promotion};

/// `waypoint train` flags on the built-in demo: a save every `save_steps`, `steps` in all.
/// (Restarts here train on past the first run's `steps`: a longer schedule, allowed.)
fn train_args(base: &str, run: &str, steps: u32, save_steps: u32) -> Vec<String> {
    let (steps, save_steps) = (steps.to_string(), save_steps.to_string());
    let flags = [
        "--batch_size",
        "2",
        "--save_steps",
        &save_steps,
        "--max_steps",
        &steps,
        "--allow_config_change",
    ];
    common::runs::train_args("cpu", 1, &flags, run, base)
}

/// `waypoint train` on the built-in demo, a save every 2 steps.
fn train(base: &str, run: &str, steps: u32, extra: &[&str]) -> Output {
    common::waypoint()
        .args(train_args(base, run, steps, 2))
        .args(extra)
        .output()
        .expect("run waypoint train")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Local temp folder and (when running) the S3 test server, each a fresh base.
fn bases(label: &str) -> Vec<(String, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let mut out = vec![(dir.path().to_str().unwrap().to_string(), Some(dir))];
    if let Some(s3) = common::s3_base() {
        out.push((
            format!("{}/{}", s3.trim_end_matches('/'), common::unique(label)),
            None,
        ));
    }
    out
}

/// The key of the first `dcp/` blob of `step`.
async fn dcp_blob(m: &CheckpointManager, step: u64) -> String {
    let manifest = m.manifest(StepName::new(step)).await.unwrap();
    let f = manifest.dcp_files().next().unwrap();
    format!(
        "{}/{}",
        m.layout().checkpoint_dir(StepName::new(step)),
        f.path
    )
}

/// Flips one bit of the object at `key`, `from_end` bytes before its end (same size, new bytes).
async fn flip_bit(m: &CheckpointManager, key: &str, from_end: usize) {
    let mut bytes = m.store().get(key).await.unwrap().to_vec();
    let at = bytes.len() - from_end;
    bytes[at] ^= 0x10;
    m.store().put(key, bytes.into()).await.unwrap();
}

/// The key of step `step`'s promotable weights.
fn sampler_weights(m: &CheckpointManager, step: u64) -> String {
    format!(
        "{}/sampler/model.safetensors",
        m.layout().checkpoint_dir(StepName::new(step))
    )
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    Truncate,
    FlipByte,
    DeleteBlob,
    BadManifest,
}

async fn damage(m: &CheckpointManager, step: u64, how: Damage) {
    let store = m.store();
    match how {
        Damage::BadManifest => store
            .put(
                &m.layout().manifest(StepName::new(step)),
                Bytes::from_static(b"{ not json"),
            )
            .await
            .unwrap(),
        Damage::DeleteBlob => store.delete(&dcp_blob(m, step).await).await.unwrap(),
        Damage::Truncate => {
            let key = dcp_blob(m, step).await;
            let mut bytes = store.get(&key).await.unwrap().to_vec();
            bytes.truncate(bytes.len() - 100);
            store.put(&key, bytes.into()).await.unwrap();
        }
        Damage::FlipByte => {
            let key = dcp_blob(m, step).await;
            let len = store.head(&key).await.unwrap().size as usize;
            flip_bit(m, &key, len / 2).await;
        }
    }
}

/// Each damage of the newest checkpoint: the restart warns, names it, resumes from the one before,
/// sets it aside, saves that step again and finishes; and a further restart is fine too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_newest_checkpoint_is_passed_over_and_set_aside() {
    for (base, _dir) in bases("damaged") {
        for how in [
            Damage::Truncate,
            Damage::FlipByte,
            Damage::DeleteBlob,
            Damage::BadManifest,
        ] {
            let run = format!("dmg-{how:?}").to_lowercase();
            common::ok(&train(&base, &run, 6, &[]));
            let m = manager(&base, &run);
            damage(&m, 6, how).await;
            let out = train(&base, &run, 10, &[]);
            let err = stderr(&out);
            assert!(out.status.success(), "{base} {how:?}: {err}");
            assert!(err.contains("step-000006"), "{how:?}: not named: {err}");
            assert!(
                err.contains("checkpoint=step-000004") && err.contains("resumed"),
                "{how:?}: did not resume from step-000004: {err}"
            );
            // (--keep_last keeps the newest three by default.)
            assert_eq!(common::committed_steps(&m).await, [10, 8, 6], "{how:?}");
            // The new step-000006 is whole, and the damaged one is kept aside with its reason.
            assert!(common::intact(&m, 6).await);
            let aside = m
                .store()
                .list(&format!("{}/quarantine/", m.layout().checkpoints_dir()))
                .await
                .unwrap();
            assert_eq!(aside.len(), 1, "{how:?}: {aside:?}");
            assert!(aside[0].key.contains("step-000006-attempt-"), "{aside:?}");
            // And the run goes on from there.
            let again = train(&base, &run, 12, &[]);
            assert!(again.status.success(), "{how:?}: {}", stderr(&again));
            assert!(stderr(&again).contains("checkpoint=step-000010"));
        }
    }
}

/// A manifest copied under another step's name is not that checkpoint: verify says so, list does not
/// show the copy, and resume does not jump to it past the good step-000006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_under_another_name_is_damaged() {
    for (base, _dir) in bases("misnamed") {
        let run = "misnamed";
        common::ok(&train(&base, run, 6, &[]));
        let m = manager(&base, run);
        let layout = m.layout();
        let body = m
            .store()
            .get(&layout.manifest(StepName::new(4)))
            .await
            .unwrap();
        m.store()
            .put(&layout.manifest(StepName::new(8)), body)
            .await
            .unwrap();
        let uri = format!("{base}/{run}/framework=waypoint");
        let verify = common::waypoint()
            .args(["ckpt", "verify", &uri])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&verify.stdout).into_owned();
        assert_eq!(verify.status.code(), Some(3), "{said}");
        assert!(
            said.contains("step-000008: DAMAGED") && said.contains("stored as step-000008"),
            "{said}"
        );
        let list = common::waypoint()
            .args(["ckpt", "list", &uri, "--json"])
            .output()
            .unwrap();
        let listed = common::ok(&list);
        assert_eq!(listed.matches("\"step-000004\"").count(), 1, "{listed}");
        assert!(!listed.contains("step-000008"), "{listed}");
        let out = train(&base, run, 8, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("checkpoint=step-000006"),
            "{}",
            stderr(&out)
        );
        assert!(common::intact(&m, 8).await);
    }
}

/// `ckpt verify` checks every checkpoint and reports each, whatever an earlier one showed; exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_every_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&train(base, "v", 6, &[]));
    let m = manager(base, "v");
    damage(&m, 6, Damage::BadManifest).await;
    damage(&m, 4, Damage::FlipByte).await;
    let out = common::waypoint()
        .args(["ckpt", "verify", &format!("{base}/v/framework=waypoint")])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(3), "{said}\n{}", stderr(&out));
    assert!(said.contains("step-000006: DAMAGED"), "{said}");
    assert!(
        said.contains("step-000004: DAMAGED") && said.contains("sha256"),
        "{said}"
    );
    assert!(said.contains("step-000002: ok"), "{said}");
}

/// `ckpt promote` re-hashes what it would deploy: a flipped byte in the sampler weights is refused
/// and nothing appears under `models/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_refuses_a_damaged_model() {
    for (base, _dir) in bases("promote-damaged") {
        common::ok(&train(&base, "p", 4, &[]));
        let m = manager(&base, "p");
        flip_bit(&m, &sampler_weights(&m, 4), 7).await;
        let out = common::waypoint()
            .args([
                "ckpt",
                "promote",
                &format!("{base}/p/framework=waypoint"),
                "step-000004",
                "deployed",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "promoted a damaged model");
        assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
        assert!(m.store().list("models/deployed/").await.unwrap().is_empty());
    }
}

/// A promotion killed half-way (files copied, no record) is not a model: nobody reports it promoted,
/// the restart finishes it, and another run cannot take the id over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_promotion_is_finished_by_the_restart() {
    for (base, _dir) in bases("promotion") {
        let flags = ["--output_model_id", "pm"];
        common::ok(&train(&base, "pr", 4, &flags));
        let m = manager(&base, "pr");
        let store = m.store();
        // What a SIGKILL between the copies leaves: config.json only.
        for name in [
            "waypoint_promotion.json",
            "model.safetensors",
            "tokenizer.json",
        ] {
            store.delete(&format!("models/pm/{name}")).await.unwrap();
        }
        assert!(matches!(
            m.promotion("pm").await.unwrap(),
            Promotion::Partial(_)
        ));
        let out = train(&base, "pr", 4, &flags);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(m
            .promotion("pm")
            .await
            .unwrap()
            .is_done_from(m.layout(), "step-000004"));
        for name in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert!(
                store.exists(&format!("models/pm/{name}")).await.unwrap(),
                "{name}"
            );
        }
        // Locally, the copy left from the first promotion is a link to the checkpoint's file;
        // copying onto it again must not leave the copy's staging file (`config.json#N`) behind.
        if let Some(dir) = &_dir {
            let junk: Vec<String> = std::fs::read_dir(dir.path().join("models/pm"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains('#'))
                .collect();
            assert!(junk.is_empty(), "left behind: {junk:?}");
        }
        // Finished and recorded: another run does not take the id over.
        let other = train(&base, "other", 2, &flags);
        assert_eq!(other.status.code(), Some(2), "{}", stderr(&other));
        assert!(stderr(&other).contains("already exists"));
    }
}

/// `ckpt gc` never follows a symbolic link out of the run folder: the link is removed, the files it
/// pointed at are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_never_deletes_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let precious = outside.path().join("precious.bin");
    std::fs::write(&precious, b"not waypoint's").unwrap();
    let nested = outside.path().join("dcp");
    std::fs::create_dir(&nested).unwrap();
    std::fs::write(nested.join("also.bin"), b"keep").unwrap();
    // Old enough for any grace.
    let status = std::process::Command::new("touch")
        .args(["-d", "2020-01-01"])
        .arg(&precious)
        .arg(nested.join("also.bin"))
        .status()
        .unwrap();
    assert!(status.success());
    let base = dir.path().to_str().unwrap();
    common::ok(&train(base, "g", 2, &[]));
    let checkpoints = dir.path().join("g/framework=waypoint/checkpoints");
    std::os::unix::fs::symlink(outside.path(), checkpoints.join("step-000777")).unwrap();
    // A link inside an orphan step folder too.
    std::fs::create_dir_all(checkpoints.join("step-000778")).unwrap();
    std::os::unix::fs::symlink(&nested, checkpoints.join("step-000778/dcp")).unwrap();
    // And a link to an empty folder, which no listing shows.
    let empty = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(empty.path(), checkpoints.join("step-000779")).unwrap();
    let out = common::waypoint()
        .args([
            "ckpt",
            "gc",
            &format!("{base}/g/framework=waypoint"),
            "--grace_secs",
            "0",
        ])
        .output()
        .unwrap();
    common::ok(&out);
    assert!(precious.exists(), "gc deleted a file outside the run");
    assert!(
        nested.join("also.bin").exists(),
        "gc deleted through a nested link"
    );
    assert!(!checkpoints.join("step-000777").exists());
    assert!(!checkpoints.join("step-000778/dcp").exists());
    assert!(std::fs::symlink_metadata(checkpoints.join("step-000779")).is_err());
    assert!(
        empty.path().is_dir(),
        "gc deleted the folder a link pointed at"
    );
    // The committed checkpoint is untouched.
    assert_eq!(common::committed_steps(&manager(base, "g")).await, [2]);
}

/// A run folder deleted mid-run gets its fencing record and `config/run.json` back at the next
/// commit, with a warning; training goes on.
#[test]
fn a_run_folder_deleted_mid_run_gets_its_records_back() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let mut child = common::spawn_logged(common::waypoint().args(train_args(base, "gone", 300, 5)));
    let (_, rest) = common::runs::read_until(&mut child, |l| l.contains("checkpoint committed"));
    let run_dir = dir.path().join("gone/framework=waypoint");
    // The run keeps writing while it is removed: try until one removal goes through whole.
    for _ in 0..100 {
        match std::fs::remove_dir_all(&run_dir) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
    let status = child.wait().unwrap();
    let log = rest.join().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("attempt records are gone"), "{log}");
    assert!(log.contains("config/run.json is gone"), "{log}");
    assert!(run_dir.join("attempts/000001.json").exists());
    assert!(run_dir.join("config/run.json").exists());
    let status = common::read_json(run_dir.join("status.json"));
    assert_eq!(status["state"], "FINISHED");
}

/// With two ranks, a bit flip in the newest checkpoint is found as the ranks load it; both pass over
/// it together and the run goes on (rank 0 sets it aside).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_pass_over_a_bit_flip_together() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let launched = |steps: u32| {
        common::waypoint()
            .args(common::runs::launch_flags(
                2,
                &["--", env!("CARGO_BIN_EXE_waypoint")],
            ))
            .args(common::runs::train_flags("cpu", base, "two", 2, steps))
            .arg("--allow_config_change")
            .output()
            .unwrap()
    };
    common::ok(&launched(6));
    let m = manager(base, "two");
    damage(&m, 6, Damage::FlipByte).await;
    let out = launched(9);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("passing over a damaged checkpoint") && err.contains("step-000006"),
        "{err}"
    );
    assert!(err.contains("checkpoint=step-000003"), "{err}");
    assert_eq!(common::committed_steps(&m).await[..2], [9, 6]);
    assert!(common::intact(&m, 6).await);
}

/// A finished run whose final checkpoint's model is damaged (a flipped byte in the sampler weights)
/// is not stuck: the restart passes over it, redoes the last steps and promotes a whole model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_final_model_is_redone_before_promotion() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&train(base, "fin", 6, &[]));
    let m = manager(base, "fin");
    flip_bit(&m, &sampler_weights(&m, 6), 11).await;
    let out = train(base, "fin", 6, &["--output_model_id", "fin-model"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("checkpoint=step-000004"), "{err}");
    assert!(common::intact(&m, 6).await);
    assert!(m
        .promotion("fin-model")
        .await
        .unwrap()
        .is_done_from(m.layout(), "step-000006"));
}

/// A committed checkpoint newer than the resume point that holds no resumable state (its manifest
/// lists no `dcp/` file) does not block saving its step again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_checkpoint_without_resumable_state_does_not_block_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&train(base, "nr", 6, &[]));
    let m = manager(base, "nr");
    let key = m.layout().manifest(StepName::new(6));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&m.store().get(&key).await.unwrap()).unwrap();
    manifest["files"]
        .as_array_mut()
        .unwrap()
        .retain(|f| !f["path"].as_str().unwrap().starts_with("dcp/"));
    m.store()
        .put(&key, serde_json::to_vec(&manifest).unwrap().into())
        .await
        .unwrap();
    let out = train(base, "nr", 8, &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("checkpoint=step-000004"), "{err}");
    assert_eq!(common::committed_steps(&m).await[..3], [8, 6, 4]);
    assert!(common::intact(&m, 6).await);
}

/// A run whose `checkpoints/` folder is a symbolic link (moved to another disk) is the user's own
/// layout: retention and gc work through it; only links below a folder being deleted are never
/// followed.
#[test]
fn a_checkpoints_folder_moved_behind_a_symlink_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let other_disk = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let run_dir = dir.path().join("moved/framework=waypoint");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::symlink(other_disk.path(), run_dir.join("checkpoints")).unwrap();
    let out = train(base, "moved", 8, &["--keep_last", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut left: Vec<String> = std::fs::read_dir(other_disk.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    left.sort();
    assert_eq!(left, ["step-000008.json"], "retention kept the wrong ones");
    let gc = common::waypoint()
        .args([
            "ckpt",
            "gc",
            &format!("{base}/moved/framework=waypoint"),
            "--grace_secs",
            "0",
        ])
        .output()
        .unwrap();
    common::ok(&gc);
}
