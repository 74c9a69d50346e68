//! Part digests end to end, on local FS, memory and the S3-compatible server: a multi-part file's
//! digest is S3's composite of its parts (with the part size in the manifest); verify and load catch a
//! flipped byte in every part position; checkpoints whose manifests predate part digests (format 1,
//! one sha256 per whole file) still load and verify.

use waypoint_testkit as common;

use bytes::Bytes;
use common::{backends, commit, intact, part_digest_hex, sha256_hex};
use waypoint_checkpoint::RunLayout;
use waypoint_checkpoint::{
    CheckpointManager, Commit, Dtype, ManagerOptions, Manifest, SaveRequest, StepName, Tensor,
};
use waypoint_storage::{Store, StoreOptions};

/// Parts of 5 MiB (S3's smallest), so the 16 MiB file has 4 of them, the last shorter.
const PART: usize = 5 << 20;

fn options() -> StoreOptions {
    StoreOptions {
        part_size: PART,
        max_concurrency: 2,
        ..StoreOptions::default()
    }
}

fn state() -> Vec<Tensor> {
    vec![Tensor::new(
        "model.embed_tokens.weight",
        Dtype::F32,
        vec![4096, 1024],
        common::pattern(4096 * 1024 * 4, 5).into(),
    )
    .unwrap()]
}

async fn saved(store: &Store, run: &str) -> (CheckpointManager, Manifest) {
    let mut m = CheckpointManager::new(
        store.clone(),
        RunLayout::new(run, "hf").unwrap(),
        ManagerOptions::default(),
    );
    m.start_attempt(&serde_json::json!({})).await.unwrap();
    let manifest = m
        .save(SaveRequest {
            commit: Commit {
                data_consumed: 1,
                ..commit(1)
            },
            dcp: Some(state()),
            sampler: None,
        })
        .await
        .unwrap();
    (m, manifest)
}

fn file_key(m: &CheckpointManager, path: &str) -> String {
    format!("{}/{path}", m.layout().checkpoint_dir(StepName::new(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_load_catch_a_flipped_byte_in_every_part_position() {
    for b in backends("ckpt-parts", options()) {
        let (m, manifest) = saved(&b.store, "run1").await;
        assert_eq!(manifest.format_version, 2);
        let f = manifest.dcp_files().next().unwrap().clone();
        let key = file_key(&m, &f.path);
        let good = b.store.get(&key).await.unwrap();
        let parts = good.len().div_ceil(PART);
        assert_eq!(parts, 4);
        // The manifest records S3's composite, computed here by hand, and the part size.
        assert_eq!(f.part_size, Some(PART as u64), "{}", b.name);
        assert_eq!(f.sha256, part_digest_hex(&good, PART), "{}", b.name);
        assert!(f.sha256.ends_with(&format!("-{parts}")), "{}", f.sha256);
        assert!(intact(&m, 1).await);

        for p in 0..parts {
            let (start, end) = (p * PART, ((p + 1) * PART).min(good.len()));
            for at in [start, (start + end) / 2, end - 1] {
                let mut bad = good.to_vec();
                bad[at] ^= 0x20;
                b.store.put(&key, Bytes::from(bad)).await.unwrap();
                let report = m.verify(StepName::new(1)).await.unwrap();
                assert!(
                    report.problems.len() == 1
                        && report.problems[0].contains(&f.path)
                        && report.problems[0].contains("sha256"),
                    "{}: byte {at} of part {p}: {:?}",
                    b.name,
                    report.problems
                );
                if at == start {
                    // Loading takes the same path (once a part: it reads the whole file).
                    let e = m
                        .load_tensors(&manifest, "dcp/", &|_| true)
                        .await
                        .unwrap_err()
                        .to_string();
                    assert!(e.contains("sha256"), "{}: byte {at}: {e}", b.name);
                }
            }
        }
        b.store.put(&key, good).await.unwrap();
        assert!(intact(&m, 1).await);
        assert_eq!(
            m.load_tensors(&manifest, "dcp/", &|_| true).await.unwrap(),
            state()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_of_format_1_still_load_and_verify() {
    for b in backends("ckpt-format1", options()) {
        let (m, mut manifest) = saved(&b.store, "run1").await;
        // Rewrite the manifest as waypoint wrote it before part digests: format 1, each file's
        // plain sha256 of the whole file, no part size.
        manifest.format_version = 1;
        for f in &mut manifest.files {
            let bytes = b.store.get(&file_key(&m, &f.path)).await.unwrap();
            f.sha256 = sha256_hex(&bytes);
            f.part_size = None;
        }
        let manifest_key = m.layout().manifest(StepName::new(1));
        let json = manifest.to_json().unwrap();
        assert!(!String::from_utf8_lossy(&json).contains("part_size"));
        b.store.put(&manifest_key, json.into()).await.unwrap();

        let old = m.manifest(StepName::new(1)).await.unwrap();
        assert_eq!(old, manifest);
        assert!(intact(&m, 1).await);
        assert_eq!(
            m.latest_resumable(true).await.unwrap().map(|m| m.step),
            Some(1)
        );
        assert_eq!(
            m.load_tensors(&old, "dcp/", &|_| true).await.unwrap(),
            state()
        );
        // And its check still bites.
        let f = old.dcp_files().next().unwrap();
        let key = file_key(&m, &f.path);
        let mut bad = b.store.get(&key).await.unwrap().to_vec();
        let at = bad.len() / 3;
        bad[at] ^= 1;
        b.store.put(&key, Bytes::from(bad)).await.unwrap();
        let report = m.verify(StepName::new(1)).await.unwrap();
        assert!(
            report.problems[0].contains("sha256"),
            "{:?}",
            report.problems
        );
        assert!(m.load_tensors(&old, "dcp/", &|_| true).await.is_err());
    }
}
