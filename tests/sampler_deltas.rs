//! Periodic sampler saves from the training loop (`--sampler_save_steps`): the first a full base
//! (INFERENCE_BASE), later ones deltas over it (INFERENCE_ARC_V2), a new base every
//! `--sampler_base_every` deltas; each delta rebuilds bit for bit what a full save at that step
//! holds; `ckpt list` names the kinds; a delta whose base was removed is reported by `ckpt verify`
//! and refused when read, never applied to something else.

mod common;

use std::process::Output;

use waypoint_checkpoint::{CheckpointManager, ManagerOptions, RunLayout, StepName};
use waypoint_storage::Store;

/// 6 steps of the demo on CPU at a small learning rate (so that bf16 weights mostly keep their
/// values and deltas are small), only the final resumable save, sampler saves every
/// `sampler_every` steps.
fn train(base: &str, run: &str, sampler_every: u32) -> Output {
    common::waypoint()
        .args(["train", "--device", "cpu", "--run_id", run])
        .args(["--checkpoint_base_uri", base])
        .args(["--max_steps", "6", "--save_steps", "0", "--lr", "1e-5"])
        .args(["--sampler_save_steps", &sampler_every.to_string()])
        .args(["--sampler_base_every", "1"])
        .output()
        .expect("run waypoint")
}

fn manager(base: &str, run: &str) -> CheckpointManager {
    CheckpointManager::new(
        Store::open(base).unwrap(),
        RunLayout::new(run, "waypoint").unwrap(),
        ManagerOptions::default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampler_saves_are_a_base_then_deltas_rebuilt_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    // Run a: sampler saves at 2 (base) and 4 (delta over 2); the final save at 6 is a full one.
    common::ok(&train(base, "a", 2));
    // Run b, the same training: its first sampler save, at 4, is a full base.
    common::ok(&train(base, "b", 4));

    let (a, b) = (manager(base, "a"), manager(base, "b"));
    let kinds = |m: &waypoint_checkpoint::Manifest| {
        m.kinds
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let a2 = a.manifest(StepName::new(2)).await.unwrap();
    let a4 = a.manifest(StepName::new(4)).await.unwrap();
    let a6 = a.manifest(StepName::new(6)).await.unwrap();
    let b4 = b.manifest(StepName::new(4)).await.unwrap();
    assert_eq!(kinds(&a2), "INFERENCE_BASE");
    assert_eq!(kinds(&a4), "INFERENCE_ARC_V2");
    assert_eq!(a4.delta_base.as_ref().unwrap().name, "step-000002");
    assert_eq!(kinds(&a6), "TRAINING,INFERENCE_BASE");
    assert_eq!(kinds(&b4), "INFERENCE_BASE");
    let (delta_bytes, full_bytes): (u64, u64) = (
        a4.sampler_files().map(|f| f.bytes).sum(),
        b4.sampler_files().map(|f| f.bytes).sum(),
    );
    assert!(
        delta_bytes * 2 <= full_bytes,
        "{delta_bytes} of {full_bytes}"
    );

    // Base + delta = the full save of the same step, bit for bit.
    let rebuilt = a.sampler_weight_files(&a4).await.unwrap();
    let full = b.sampler_weight_files(&b4).await.unwrap();
    assert_eq!(rebuilt.len(), full.len());
    for ((rn, rb), (fn_, fb)) in rebuilt.iter().zip(&full) {
        assert_eq!(rn, fn_);
        assert!(rb == fb, "{rn} differs from the full save");
    }

    // `ckpt list` names the kinds.
    let run_uri = format!("{base}/a/framework=waypoint");
    let list = common::ok(
        &common::waypoint()
            .args(["ckpt", "list", &run_uri])
            .output()
            .unwrap(),
    );
    for (name, kind) in [
        ("step-000002", "INFERENCE_BASE"),
        ("step-000004", "INFERENCE_ARC_V2"),
        ("step-000006", "TRAINING,INFERENCE_BASE"),
    ] {
        assert!(
            list.lines().any(|l| l.contains(name) && l.contains(kind)),
            "{name} {kind}:\n{list}"
        );
    }
    let verify = common::waypoint()
        .args(["ckpt", "verify", &run_uri, "step-000004"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // The base removed: reported by verify (exit 3, naming it), refused when read.
    let store = Store::open(base).unwrap();
    let layout = RunLayout::new("a", "waypoint").unwrap();
    store
        .delete(&layout.manifest(StepName::new(2)))
        .await
        .unwrap();
    store
        .delete_prefix(&layout.checkpoint_dir(StepName::new(2)))
        .await
        .unwrap();
    let verify = common::waypoint()
        .args(["ckpt", "verify", &run_uri, "step-000004"])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(verify.status.code(), Some(3), "{said}");
    assert!(
        said.contains("step-000002") && said.contains("gone"),
        "{said}"
    );
    let e = a.sampler_weight_files(&a4).await.unwrap_err().to_string();
    assert!(e.contains("step-000002") && e.contains("gone"), "{e}");
}
