//! CheckpointManager on local FS, memory and the S3-compatible server: save, list, resume discovery,
//! load, dataloader.json, promotion, retention, fencing, GC, verify and corruption fallback.

use waypoint_testkit as common;

use std::time::Duration;

use bytes::Bytes;
use common::{backends, commit, intact, training_state};
use waypoint_checkpoint::{
    parse_checkpoint_ref, CheckpointError, CheckpointKind, CheckpointManager, Dtype,
    ManagerOptions, SamplerPart, SaveRequest, Tensor,
};
use waypoint_checkpoint::{RunLayout, StepName};
use waypoint_storage::{Store, StoreOptions};

fn manager(store: &Store, run: &str, options: ManagerOptions) -> CheckpointManager {
    CheckpointManager::new(store.clone(), RunLayout::new(run, "hf").unwrap(), options)
}

fn resumable(step: u64) -> SaveRequest {
    SaveRequest {
        commit: commit(step),
        dcp: Some(training_state(step)),
        sampler: None,
    }
}

fn full_sampler(seed: u64) -> SamplerPart {
    let w = Tensor::new(
        "model.embed_tokens.weight",
        Dtype::BF16,
        vec![64, 32],
        common::pattern(4096, seed).into(),
    )
    .unwrap();
    SamplerPart::Full {
        config_json: Bytes::from_static(br#"{"model_type": "llama"}"#),
        tensors: vec![w],
        extra_files: vec![("tokenizer.json".into(), Bytes::from_static(b"{}"))],
    }
}

fn sorted(mut v: Vec<Tensor>) -> Vec<Tensor> {
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Manager options that keep the newest `n` checkpoints.
fn keeping(n: usize) -> ManagerOptions {
    ManagerOptions {
        keep_last: Some(n),
        ..Default::default()
    }
}

async fn started(store: &Store, run: &str, options: ManagerOptions) -> CheckpointManager {
    let mut m = manager(store, run, options);
    m.start_attempt(&serde_json::json!({"test": true}))
        .await
        .unwrap();
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_lists_resumes_and_loads_bit_for_bit() {
    for b in backends("ckpt-roundtrip", StoreOptions::default()) {
        let m = started(
            &b.store,
            "run1",
            ManagerOptions {
                max_file_bytes: 20_000,
                ..Default::default()
            },
        )
        .await;
        assert!(m.latest_resumable(true).await.unwrap().is_none());
        m.save(resumable(100)).await.unwrap();
        let final_save = SaveRequest {
            sampler: Some(full_sampler(7)),
            ..resumable(1_000_000)
        };
        let manifest = m.save(final_save).await.unwrap();
        assert!(
            manifest.dcp_files().count() > 1,
            "{}: state split over several files",
            b.name
        );
        assert_eq!(
            manifest.kinds,
            [CheckpointKind::Training, CheckpointKind::InferenceBase]
        );

        let list = m.list().await.unwrap();
        let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["step-1000000", "step-000100"],
            "{}: numeric order",
            b.name
        );
        assert!(
            list[0].resumable && list[0].promotable && list[1].resumable && !list[1].promotable
        );

        let latest = m.latest_resumable(true).await.unwrap().unwrap();
        assert_eq!(latest.step, 1_000_000);
        let loaded = m.load_tensors(&latest, "dcp/", &|_| true).await.unwrap();
        assert_eq!(
            sorted(loaded),
            sorted(training_state(1_000_000)),
            "{}",
            b.name
        );
        let pos = m.data_position(&latest).await.unwrap();
        assert_eq!(pos.data_consumed, 64_000_000);
        let dl: serde_json::Value =
            serde_json::from_slice(&b.store.get(&m.layout().dataloader()).await.unwrap()).unwrap();
        assert_eq!(dl["step-000100"]["data_consumed"], 6400, "{}", b.name);

        // The sampler part is an HF directory.
        let weights = m
            .load_tensors(&latest, "sampler/", &|_| true)
            .await
            .unwrap();
        assert_eq!(weights.len(), 1);
        let dir = m.layout().sampler_dir(StepName::new(1_000_000));
        assert!(b.store.exists(&format!("{dir}/config.json")).await.unwrap());
        assert!(b
            .store
            .exists(&format!("{dir}/model.safetensors"))
            .await
            .unwrap());

        // A committed step is never saved over.
        assert!(matches!(
            m.save(resumable(100)).await,
            Err(CheckpointError::AlreadyCommitted { .. })
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotes_promotable_checkpoints_and_refuses_others() {
    for b in backends("ckpt-promote", StoreOptions::default()) {
        let m = started(&b.store, "run1", ManagerOptions::default()).await;
        m.save(resumable(10)).await.unwrap();
        m.save(SaveRequest {
            sampler: Some(full_sampler(3)),
            ..resumable(20)
        })
        .await
        .unwrap();
        let lora = SamplerPart::Lora {
            adapter_config: waypoint_checkpoint::peft::AdapterConfig::new(
                4,
                8.0,
                0.0,
                vec!["q_proj".into()],
                "tiny",
            )
            .to_json()
            .unwrap()
            .into(),
            tensors: vec![Tensor::new(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                Dtype::F32,
                vec![4, 32],
                common::pattern(512, 1).into(),
            )
            .unwrap()],
        };
        let mk = m
            .save(SaveRequest {
                commit: commit(30),
                dcp: None,
                sampler: Some(lora),
            })
            .await
            .unwrap();
        assert_eq!(mk.kinds, [CheckpointKind::InferenceLora]);

        let e = m.promote(StepName::new(10), "m1").await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("TRAINING")
                && msg.contains("promotable=true")
                && msg.contains("step-000020"),
            "{msg}"
        );

        let dest = m.promote(StepName::new(20), "m1").await.unwrap();
        assert_eq!(dest, "models/m1");
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "waypoint_promotion.json",
        ] {
            assert!(
                b.store.exists(&format!("models/m1/{f}")).await.unwrap(),
                "{}: {f}",
                b.name
            );
        }
        let again = m
            .promote(StepName::new(20), "m1")
            .await
            .unwrap_err()
            .to_string();
        assert!(again.contains("already exists"), "{again}");
        m.promote(StepName::new(30), "adapter").await.unwrap();
        assert!(b
            .store
            .exists("models/adapter/adapter_config.json")
            .await
            .unwrap());
        assert!(m.promote(StepName::new(20), "../x").await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_and_never_the_sampler_blobs() {
    for b in backends("ckpt-retain", StoreOptions::default()) {
        let m = started(&b.store, "run1", keeping(2)).await;
        m.save(SaveRequest {
            sampler: Some(full_sampler(1)),
            ..resumable(1)
        })
        .await
        .unwrap();
        for step in 2..=5 {
            m.save(resumable(step)).await.unwrap();
        }
        let steps: Vec<u64> = common::committed_steps(&m).await;
        assert_eq!(
            steps,
            [5, 4, 1],
            "{}: kept newest two and the one with sampler blobs",
            b.name
        );
        assert!(b
            .store
            .list(&m.layout().checkpoint_dir(StepName::new(2)))
            .await
            .unwrap()
            .is_empty());
        let dl: serde_json::Value =
            serde_json::from_slice(&b.store.get(&m.layout().dataloader()).await.unwrap()).unwrap();
        let keys: Vec<&String> = dl.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["step-000001", "step-000004", "step-000005"],
            "{}",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_of_an_older_attempt_never_commits() {
    for b in backends("ckpt-fence", StoreOptions::default()) {
        let zombie = started(&b.store, "run1", ManagerOptions::default()).await;
        zombie.save(resumable(1)).await.unwrap();
        let newer = started(&b.store, "run1", ManagerOptions::default()).await;
        assert_eq!((zombie.attempt(), newer.attempt()), (Some(1), Some(2)));
        match zombie.save(resumable(2)).await {
            Err(CheckpointError::Fenced {
                ours: 1, newest: 2, ..
            }) => {}
            other => panic!("{}: zombie committed: {other:?}", b.name),
        }
        assert!(!b
            .store
            .exists(&newer.layout().manifest(StepName::new(2)))
            .await
            .unwrap());
        newer.save(resumable(2)).await.unwrap();
        assert_eq!(
            newer.latest_resumable(true).await.unwrap().unwrap().attempt,
            2
        );
        // An unstarted manager cannot commit.
        let e = manager(&b.store, "run1", ManagerOptions::default())
            .save(resumable(3))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("start_attempt"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_named_and_resume_falls_back() {
    for b in backends("ckpt-corrupt", StoreOptions::default()) {
        let m = started(&b.store, "run1", ManagerOptions::default()).await;
        for step in [1, 2, 3, 4] {
            m.save(resumable(step)).await.unwrap();
        }
        let file_of = |step: u64| {
            format!(
                "{}/dcp/model-00001-of-00001.safetensors",
                m.layout().checkpoint_dir(StepName::new(step))
            )
        };
        // 4: a flipped byte (same size); 3: truncated; 2: blob deleted.
        let mut bytes = b.store.get(&file_of(4)).await.unwrap().to_vec();
        let at = bytes.len() - 10;
        bytes[at] ^= 0xff;
        b.store
            .put(&file_of(4), bytes.clone().into())
            .await
            .unwrap();
        b.store
            .put(&file_of(3), Bytes::from(bytes[..bytes.len() / 2].to_vec()))
            .await
            .unwrap();
        b.store.delete(&file_of(2)).await.unwrap();

        let r4 = m.verify(StepName::new(4)).await.unwrap();
        assert!(
            r4.problems.len() == 1 && r4.problems[0].contains("sha256"),
            "{}: {:?}",
            b.name,
            r4.problems
        );
        let r3 = m.verify(StepName::new(3)).await.unwrap();
        assert!(
            r3.problems[0].contains("bytes, manifest says"),
            "{:?}",
            r3.problems
        );
        let r2 = m.verify(StepName::new(2)).await.unwrap();
        assert!(r2.problems[0].contains("missing"), "{:?}", r2.problems);
        assert!(intact(&m, 1).await);

        // Without re-hashing, the flipped byte passes the cheap check but loading catches it.
        let cheap = m.latest_resumable(false).await.unwrap().unwrap();
        assert_eq!(cheap.step, 4);
        let e = m
            .load_tensors(&cheap, "dcp/", &|_| true)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("sha256"), "{e}");
        let good = m.latest_resumable(true).await.unwrap().unwrap();
        assert_eq!(good.step, 1, "{}", b.name);
        assert_eq!(
            sorted(m.load_tensors(&good, "dcp/", &|_| true).await.unwrap()),
            sorted(training_state(1))
        );

        // A manifest that does not parse is skipped too.
        b.store
            .put(
                &m.layout().manifest(StepName::new(9)),
                Bytes::from_static(b"{not json"),
            )
            .await
            .unwrap();
        assert_eq!(m.latest_resumable(true).await.unwrap().unwrap().step, 1);
        // A dataloader.json that lies is overruled by the manifest.
        b.store
            .put(
                &m.layout().dataloader(),
                Bytes::from_static(br#"{"step-000001": {"data_consumed": 5}}"#),
            )
            .await
            .unwrap();
        assert_eq!(m.data_position(&good).await.unwrap().data_consumed, 64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_uncommitted_leftovers_after_the_grace_period() {
    for b in backends("ckpt-gc", StoreOptions::default()) {
        let m = started(&b.store, "run1", ManagerOptions::default()).await;
        m.save(resumable(1)).await.unwrap();
        let orphan = m.file_writer(StepName::new(2), 0);
        orphan
            .write_tensors("dcp/model-00001-of-00001.safetensors", &training_state(2))
            .await
            .unwrap();
        assert!(
            m.gc(Duration::from_secs(3600)).await.unwrap().is_empty(),
            "{}: young orphans kept",
            b.name
        );
        let removed = m.gc(Duration::ZERO).await.unwrap();
        assert_eq!(removed.len(), 1, "{}: {removed:?}", b.name);
        assert!(removed[0].contains("step-000002/dcp/"));
        assert_eq!(m.latest_resumable(true).await.unwrap().unwrap().step, 1);
        // prepare_save also clears leftovers of the step it is about to write.
        orphan
            .write_bytes("dcp/stale.safetensors", Bytes::from_static(b"junk"))
            .await
            .unwrap();
        let manifest = m.save(resumable(2)).await.unwrap();
        let listed = b
            .store
            .list(&m.layout().checkpoint_dir(StepName::new(2)))
            .await
            .unwrap();
        assert_eq!(
            listed.len(),
            manifest.files.len(),
            "{}: folder holds exactly the manifest's files",
            b.name
        );
    }
}

#[test]
fn checkpoint_refs_parse_or_say_the_form() {
    let (run, step) = parse_checkpoint_ref("i44pvd4syzg8hjfk:step-000004").unwrap();
    assert_eq!((run.as_str(), step.step()), ("i44pvd4syzg8hjfk", 4));
    assert!(parse_checkpoint_ref("nocolon")
        .unwrap_err()
        .to_string()
        .contains("run_id:step-N"));
    assert!(parse_checkpoint_ref("../x:step-000001").is_err());
    assert!(parse_checkpoint_ref("run:step-4").is_err());
}

fn bf16_model(seed: u64, step: Option<u64>) -> Vec<Tensor> {
    [
        ("model.embed_tokens.weight", 256 * 64),
        ("model.layers.0.mlp.up_proj.weight", 128 * 64),
    ]
    .iter()
    .enumerate()
    .map(|(i, (name, n))| {
        let mut w = common::weights::bf16_weights(*n, seed + i as u64);
        if let Some(s) = step {
            w = common::weights::adamw_step_bf16(&w, 1e-5, s * 7 + i as u64);
        }
        Tensor::new(*name, Dtype::BF16, vec![n / 64, 64], w.into()).unwrap()
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_rebuild_bit_for_bit_are_small_and_guard_their_base() {
    for b in backends("ckpt-delta", StoreOptions::default()) {
        let m = started(&b.store, "run1", keeping(1)).await;
        let config = Bytes::from_static(br#"{"model_type": "llama"}"#);
        let full = SamplerPart::Full {
            config_json: config.clone(),
            tensors: bf16_model(1, None),
            extra_files: vec![],
        };
        let base = m
            .save(SaveRequest {
                commit: commit(10),
                dcp: None,
                sampler: Some(full),
            })
            .await
            .unwrap();
        let updated = bf16_model(1, Some(11));
        let delta = SamplerPart::Delta {
            base: StepName::new(10),
            config_json: config.clone(),
            tensors: updated.clone(),
        };
        let dm = m
            .save(SaveRequest {
                sampler: Some(delta),
                ..resumable(11)
            })
            .await
            .unwrap();
        assert_eq!(
            dm.kinds,
            [CheckpointKind::Training, CheckpointKind::InferenceArcV2],
            "{}",
            b.name
        );
        assert_eq!(dm.delta_base.as_ref().unwrap().name, "step-000010");

        let rebuilt = m.sampler_tensors(&dm).await.unwrap();
        assert_eq!(
            sorted(rebuilt),
            sorted(updated.clone()),
            "{}: rebuilt weights differ",
            b.name
        );
        let full_bytes = base
            .sampler_files()
            .find(|f| f.path == "sampler/model.safetensors")
            .unwrap()
            .bytes;
        let delta_bytes = dm
            .sampler_files()
            .find(|f| f.path.ends_with(".xor.zst"))
            .unwrap()
            .bytes;
        assert!(
            delta_bytes * 4 <= full_bytes,
            "{}: delta {delta_bytes} vs full {full_bytes}",
            b.name
        );

        // Not promotable on its own; the message says what to do.
        let e = m
            .promote(StepName::new(11), "d")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("INFERENCE_ARC_V2") && e.contains("promote its base"),
            "{e}"
        );
        // Retention (keep_last = 1) kept the base: a kept delta needs it.
        assert!(b
            .store
            .exists(&m.layout().manifest(StepName::new(10)))
            .await
            .unwrap());

        // A base whose blob changed is refused, naming the base; a base that is gone too.
        let base_file = format!(
            "{}/model.safetensors",
            m.layout().sampler_dir(StepName::new(10))
        );
        let original = b.store.get(&base_file).await.unwrap();
        let mut changed = original.to_vec();
        changed[100] ^= 1;
        b.store.put(&base_file, changed.into()).await.unwrap();
        let e = m.sampler_tensors(&dm).await.unwrap_err().to_string();
        assert!(e.contains("step-000010") && e.contains("sha256"), "{e}");
        b.store.put(&base_file, original).await.unwrap();
        b.store
            .delete(&m.layout().manifest(StepName::new(10)))
            .await
            .unwrap();
        let e = m.sampler_tensors(&dm).await.unwrap_err();
        assert!(
            matches!(e, CheckpointError::DeltaBase { .. }) && e.to_string().contains("gone"),
            "{e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_from_checkpoint_resolves_in_another_run() {
    for b in backends("ckpt-init", StoreOptions::default()) {
        let donor = started(&b.store, "donor_run", ManagerOptions::default()).await;
        donor.save(resumable(4)).await.unwrap();
        let me = started(&b.store, "new_run", ManagerOptions::default()).await;
        let (run, step) = parse_checkpoint_ref("donor_run:step-000004").unwrap();
        let other = me.other_run(&run).unwrap();
        let manifest = other.manifest(step).await.unwrap();
        let weights = other
            .load_tensors(&manifest, "dcp/", &|n| n.starts_with("model."))
            .await
            .unwrap();
        assert_eq!(weights.len(), 2, "{}", b.name);
        assert!(
            me.latest_resumable(true).await.unwrap().is_none(),
            "the new run has no checkpoints of its own"
        );
        let missing = me
            .other_run("donor_run")
            .unwrap()
            .manifest(StepName::new(5))
            .await
            .unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("step-000005 not found in run donor_run"),
            "{missing}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_larger_than_half_the_full_size_is_written_as_a_new_base() {
    for b in backends("ckpt-delta-big", StoreOptions::default()) {
        let m = started(&b.store, "run1", ManagerOptions::default()).await;
        let config = Bytes::from_static(br#"{"model_type": "llama"}"#);
        m.save(SaveRequest {
            commit: commit(10),
            dcp: None,
            sampler: Some(SamplerPart::Full {
                config_json: config.clone(),
                tensors: bf16_model(1, None),
                extra_files: vec![],
            }),
        })
        .await
        .unwrap();
        // Unrelated weights: the XOR is noise and compresses to nearly the full size.
        let other = bf16_model(99, None);
        let saved = m
            .save(SaveRequest {
                commit: commit(11),
                dcp: None,
                sampler: Some(SamplerPart::Delta {
                    base: StepName::new(10),
                    config_json: config,
                    tensors: other.clone(),
                }),
            })
            .await
            .unwrap();
        assert_eq!(saved.kinds, [CheckpointKind::InferenceBase], "{}", b.name);
        assert!(saved.delta_base.is_none());
        assert!(saved.sampler_files().all(|f| !f.path.ends_with(".xor.zst")));
        assert_eq!(
            sorted(m.sampler_tensors(&saved).await.unwrap()),
            sorted(other)
        );
    }
}
