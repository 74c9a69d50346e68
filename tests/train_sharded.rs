//! Sharded training state on CPU under `waypoint launch`. `--sharding optimizer`: each rank keeps and
//! updates AdamW's state for its rows of every weight — bit-identical to replicated data
//! parallelism. `--sharding full`: weights, gradients and AdamW's state sharded, layers run on
//! gathered weights — within float tolerance of replicated training and of one rank with the whole
//! batch. Both save their shards as DCP slices (`saved_offsets`) that PyTorch's
//! `HuggingFaceStorageReader` reassembles bit for bit; a checkpoint saved by 3 ranks resumes with 2
//! and with 4 (resharded), sharded or not, and ends where an uninterrupted run ends; a rank SIGKILLed
//! mid-run makes the group restart and end bit-identical to an uninterrupted sharded run; a rank
//! failing mid-save leaves no commit, and the restart resumes from the last good one.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Output};

use common::runs::{
    launch_args, logged_step, manager, max_diff, rank_pid, read_until, sigterm_after_step, weights,
};
use waypoint_checkpoint::{dcp, StepName};

fn flags(base: &str, run: &str, batch: u32, steps: u32, sharding: &str) -> Vec<String> {
    let mut f = common::runs::train_flags("cpu", base, run, batch, steps);
    f.extend(["--sharding".to_string(), sharding.to_string()]);
    f
}

fn launched(base: &str, run: &str, ranks: u32, batch: u32, steps: u32, sharding: &str) -> Output {
    let mut c = common::waypoint();
    if ranks > 1 {
        c.args(launch_args(ranks, 0));
    }
    c.args(flags(base, run, batch, steps, sharding))
        .output()
        .unwrap()
}

fn spawn(
    base: &str,
    run: &str,
    ranks: u32,
    restarts: u32,
    batch: u32,
    steps: u32,
    sharding: &str,
) -> Child {
    common::spawn_logged(
        common::waypoint()
            .args(launch_args(ranks, restarts))
            .args(flags(base, run, batch, steps, sharding)),
    )
}

/// Every `dcp/` tensor of a checkpoint, slices joined, as raw bytes by name.
async fn state(base: &str, run: &str, step: u64) -> BTreeMap<String, Vec<u8>> {
    let m = manager(base, run);
    let manifest = m.manifest(StepName::new(step)).await.unwrap();
    let slices = m.load_tensors(&manifest, "dcp/", &|_| true).await.unwrap();
    dcp::assemble_by_name(slices)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.data.to_vec()))
        .collect()
}

/// The moments (and, fully sharded, the weights) of a checkpoint saved by 3 ranks are slices, one
/// per rank, that tile the tensor; `waypoint ckpt verify` passes; PyTorch reassembles them into
/// the tensors waypoint reads.
async fn check_slices(dir: &std::path::Path, run: &str, sliced: &[String]) {
    let base = dir.to_str().unwrap();
    let m = manager(base, run);
    let manifest = m.manifest(StepName::new(6)).await.unwrap();
    assert_eq!(manifest.world_size, 3);
    let slices = m.load_tensors(&manifest, "dcp/", &|_| true).await.unwrap();
    for name in sliced {
        let mut starts: Vec<usize> = slices
            .iter()
            .filter(|t| t.name == *name)
            .map(|t| t.offsets.as_ref().unwrap()[0])
            .collect();
        starts.sort();
        // 259 rows over 3 ranks: 87 + 87 + 85.
        assert_eq!(starts, [0, 87, 174], "{run}: {name}");
    }
    assert!(m
        .verify(StepName::new(6))
        .await
        .unwrap()
        .problems
        .is_empty());
    let whole = state(base, run, 6).await;
    let dcp_dir = dir.join(format!(
        "{run}/framework=waypoint/checkpoints/step-000006/dcp"
    ));
    let script = format!(
        "{}/crates/checkpoint/tests/python/dcp_interop.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = common::python_script(&script, &["load", dcp_dir.to_str().unwrap()]);
    let torch: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(torch.len(), whole.len());
    for (name, bytes) in &whole {
        assert_eq!(
            torch[name]["sha256"].as_str().unwrap(),
            common::sha256_hex(bytes),
            "{run}: {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_training_matches_replicated_and_pytorch_reads_its_slices() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&launched(base, "single", 1, 6, 6, "none"));
    common::ok(&launched(base, "replicated", 3, 2, 6, "none"));
    common::ok(&launched(base, "optimizer", 3, 2, 6, "optimizer"));
    common::ok(&launched(base, "full", 3, 2, 6, "full"));
    let replicated = state(base, "replicated", 6).await;

    // Sharded optimizer state: bit for bit what replicated data parallelism computes.
    let optimizer = state(base, "optimizer", 6).await;
    assert_eq!(
        replicated.keys().collect::<Vec<_>>(),
        optimizer.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &replicated {
        assert!(optimizer[name] == *bytes, "{name} differs");
    }

    // Fully sharded: the same training within float tolerance (gradients are summed per layer, in
    // another order), against 3 replicated ranks and against 1 rank with the whole batch.
    let (_, single) = weights(base, "single", 6).await;
    let (_, rep) = weights(base, "replicated", 6).await;
    let (_, full) = weights(base, "full", 6).await;
    for (what, other) in [("3 replicated ranks", &rep), ("1 rank", &single)] {
        let diff = max_diff(other, &full);
        eprintln!("3 fully sharded ranks vs {what}: max |Δw| = {diff:e}");
        assert!(diff < 2e-5, "3 fully sharded ranks vs {what}: {diff}");
    }

    // LoRA adapters with sharded optimizer state: bit for bit too.
    let lora = common::runs::LORA_FLAGS;
    for (run, sharding) in [("lora-replicated", "none"), ("lora-optimizer", "optimizer")] {
        let out = common::waypoint()
            .args(launch_args(3, 0))
            .args(flags(base, run, 2, 6, sharding))
            .args(lora)
            .output()
            .unwrap();
        common::ok(&out);
    }
    let a = state(base, "lora-replicated", 6).await;
    let b = state(base, "lora-optimizer", 6).await;
    assert!(a.keys().any(|k| k.contains("lora_A")));
    assert_eq!(a, b, "LoRA with sharded optimizer state differs");

    // The promotable weights of the fully sharded run: every rank wrote its part of the HF
    // directory (its own shard files; rank 0 the index too), and they are its weights in the
    // sampler dtype (bf16)...
    let m = manager(base, "full");
    let manifest = m.manifest(StepName::new(6)).await.unwrap();
    let mut writers: Vec<u32> = manifest
        .sampler_files()
        .filter(|f| f.path.ends_with(".safetensors"))
        .map(|f| {
            assert!(f.path.ends_with("-of-00003.safetensors"), "{}", f.path);
            f.rank
        })
        .collect();
    writers.sort();
    assert_eq!(writers, [0, 1, 2], "one shard file per rank");
    assert!(manifest
        .sampler_files()
        .any(|f| f.path == "sampler/model.safetensors.index.json"));
    let sampler = m.sampler_tensors(&manifest).await.unwrap();
    assert_eq!(sampler.len(), full.len());
    let mut bf16_sha = BTreeMap::new();
    for t in &sampler {
        let whole = &full[&format!("model.{}", t.name)];
        let bf16: Vec<u16> = whole.iter().map(|x| half_bits(*x)).collect();
        let got: Vec<u16> = t
            .data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(got, bf16, "{}", t.name);
        bf16_sha.insert(t.name.clone(), common::sha256_hex(&t.data));
    }
    // ...and the directory, promoted, loads in transformers with exactly those weights.
    let promoted = m.promote(StepName::new(6), "full-promoted").await.unwrap();
    let promoted = format!("{base}/{promoted}");
    let out = common::root_python_script("hf_models.py", &["state", &promoted]);
    let loaded: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(out.lines().last().unwrap()).unwrap();
    for (name, sha) in &bf16_sha {
        assert_eq!(loaded[name]["dtype"], "torch.bfloat16", "{name}");
        assert_eq!(
            loaded[name]["sha256"].as_str(),
            Some(sha.as_str()),
            "{name}"
        );
    }

    let embed = "model.embed_tokens.weight";
    let moment = dcp::optim_key(embed, "exp_avg");
    check_slices(dir.path(), "optimizer", std::slice::from_ref(&moment)).await;
    check_slices(dir.path(), "full", &[dcp::model_key(embed), moment]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_resumes_at_another_world_size_sharded_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&launched(base, "reference", 1, 12, 12, "none"));
    let (_, reference) = weights(base, "reference", 12).await;
    // (run, saved by ranks × batch with sharding, resumed by ranks × batch with sharding): the
    // global batch stays 12.
    for (run, (n, nb, ns), (m, mb, ms)) in [
        ("three-to-two", (3, 4, "optimizer"), (2, 6, "optimizer")),
        ("three-to-four", (3, 4, "optimizer"), (4, 3, "none")),
        ("two-to-three", (2, 6, "none"), (3, 4, "optimizer")),
        ("full-three-to-two", (3, 4, "full"), (2, 6, "full")),
        ("full-three-to-four", (3, 4, "full"), (4, 3, "full")),
        ("full-to-none", (3, 4, "full"), (2, 6, "none")),
        ("none-to-full", (2, 6, "none"), (3, 4, "full")),
    ] {
        let mut child = common::spawn_logged(
            common::waypoint()
                .args(launch_args(n, 0))
                .args(flags(base, run, nb, 12, ns)),
        );
        sigterm_after_step(&mut child, 4);
        let saved = manager(base, run)
            .latest_resumable(true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(saved.world_size, n);
        assert!(saved.step >= 4 && saved.step < 12, "{run}: {}", saved.step);
        let out = launched(base, run, m, mb, 12, ms);
        common::ok(&out);
        assert!(String::from_utf8_lossy(&out.stderr).contains("resumed"));
        let (manifest, w) = weights(base, run, 12).await;
        assert_eq!(manifest.world_size, m);
        let diff = max_diff(&reference, &w);
        assert!(diff < 5e-5, "{run}: differs from the reference by {diff}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rank_restarts_the_group_and_the_run_ends_bit_identical() {
    for sharding in ["optimizer", "full"] {
        killed_and_resumed(sharding).await;
    }
}

async fn killed_and_resumed(sharding: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    common::ok(&launched(base, "straight", 2, 2, 12, sharding));
    let mut child = spawn(base, "killed", 2, 1, 2, 12, sharding);
    let mut rank1 = None;
    let mut committed = false;
    let (_, rest) = read_until(&mut child, |l| {
        // Killed once a checkpoint is committed, so that the group resumes from it.
        committed |= l.contains("checkpoint committed");
        rank1 = rank1.take().or_else(|| rank_pid(l, 1));
        rank1.is_some() && committed && logged_step(l).is_some_and(|s| s >= 5)
    });
    common::send_signal(rank1.unwrap(), "KILL").unwrap();
    let code = child.wait().unwrap();
    let log = rest.join().unwrap();
    assert!(code.success(), "the restarted group finishes:\n{log}");
    assert!(log.contains("restarting the group"), "{log}");
    assert!(log.contains("resumed"), "{log}");
    let straight = state(base, "straight", 12).await;
    let killed = state(base, "killed", 12).await;
    assert_eq!(straight.len(), killed.len());
    for (name, bytes) in &straight {
        assert!(killed[name] == *bytes, "{sharding}: {name} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_failing_mid_a_sharded_save_leaves_no_commit() {
    let dir = tempfile::tempdir().unwrap();
    common::runs::rank1_failing_mid_save_leaves_no_commit(dir.path(), &["--sharding", "full"])
        .await;
}

/// Sharded state reads only rows of the files, so the ranks check a share of the files' sha256 each
/// and agree: a bit flipped anywhere in a rank's file of the newest checkpoint (here in rank 1's,
/// which rank 0 checks at world 2) makes every rank pass over it, and the run resumes from the one
/// before and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sharded_checkpoint_is_passed_over_by_all_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let mut child = common::spawn_logged(
        common::waypoint()
            .args(launch_args(2, 0))
            .args(flags(base, "flip", 2, 12, "full")),
    );
    sigterm_after_step(&mut child, 7);
    let m = manager(base, "flip");
    let newest = m.latest_resumable(true).await.unwrap().unwrap();
    assert!(newest.step > 3, "{}", newest.step);
    let file = newest
        .dcp_files()
        .find(|f| f.rank == 1)
        .expect("rank 1 wrote a file")
        .path
        .clone();
    let key = format!("{}/{file}", m.layout().checkpoint_dir(newest.step_name()));
    let store = m.store();
    let mut bytes = store.get(&key).await.unwrap().to_vec();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x10;
    store.put(&key, bytes.into()).await.unwrap();

    let out = launched(base, "flip", 2, 2, 12, "full");
    let log = common::ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("passing over a damaged checkpoint"),
        "{stderr}{log}"
    );
    let resumed = stderr
        .lines()
        .find(|l| l.contains("resumed"))
        .unwrap_or_else(|| panic!("no resume in {stderr}"));
    assert!(
        resumed.contains("checkpoint=step-") && !resumed.contains(&newest.name),
        "{resumed}"
    );
    assert_eq!(m.latest_resumable(true).await.unwrap().unwrap().step, 12);
}

/// `x` rounded to bf16 (round to nearest even, as libtorch converts), as its bits.
fn half_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    (rounded >> 16) as u16
}

/// The proof over 20 steps: 2 fully sharded ranks against 1 rank with the whole batch,
/// full-parameter and LoRA (the frozen base sharded, the adapters whole with their AdamW state cut
/// into rows); the fully sharded LoRA run's PEFT adapter is its trained adapters; and a LoRA run
/// saved by 3 fully sharded ranks resumes with 2 and ends where the uninterrupted run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sharded_ranks_match_one_over_twenty_steps_full_and_lora() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let lora = common::runs::LORA_FLAGS;
    let run = |name: &str, ranks: u32, batch: u32, steps: u32, sharding: &str, with_lora: bool| {
        let mut c = common::waypoint();
        if ranks > 1 {
            c.args(launch_args(ranks, 0));
        }
        c.args(flags(base, name, batch, steps, sharding));
        if with_lora {
            c.args(lora);
        }
        common::ok(&c.output().unwrap());
    };
    run("one", 1, 4, 20, "none", false);
    run("two-full", 2, 2, 20, "full", false);
    run("one-lora", 1, 4, 20, "none", true);
    run("two-lora-full", 2, 2, 20, "full", true);
    for (what, one, two) in [
        ("full-parameter", "one", "two-full"),
        ("LoRA", "one-lora", "two-lora-full"),
    ] {
        let (_, a) = weights(base, one, 20).await;
        let (_, b) = weights(base, two, 20).await;
        let diff = max_diff(&a, &b);
        eprintln!("{what}: 2 fully sharded ranks vs 1 rank, 20 steps: max |Δw| = {diff:e}");
        assert!(diff < 5e-5, "{what}: {diff}");
    }

    // The PEFT adapter (written by rank 0: the adapters are whole on every rank) holds the trained
    // adapters in the sampler dtype.
    let (_, adapters) = weights(base, "two-lora-full", 20).await;
    assert!(
        adapters.keys().all(|k| k.contains(".lora_")),
        "{:?}",
        adapters.keys()
    );
    let m = manager(base, "two-lora-full");
    let manifest = m.manifest(StepName::new(20)).await.unwrap();
    assert!(manifest
        .sampler_files()
        .any(|f| f.path == "sampler/adapter_model.safetensors"));
    let sampler = m.sampler_tensors(&manifest).await.unwrap();
    assert_eq!(sampler.len(), adapters.len());
    for t in &sampler {
        let fqn = t.name.strip_prefix("base_model.model.").unwrap();
        let want: Vec<u16> = adapters[&format!("model.{fqn}")]
            .iter()
            .map(|x| half_bits(*x))
            .collect();
        let got: Vec<u16> = t
            .data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(got, want, "{}", t.name);
    }

    // Saved by 3 fully sharded LoRA ranks, resumed by 2: ends where the uninterrupted run ends.
    run("lora-reference", 1, 12, 12, "none", true);
    let mut child = common::spawn_logged(
        common::waypoint()
            .args(launch_args(3, 0))
            .args(flags(base, "lora-resharded", 4, 12, "full"))
            .args(lora),
    );
    sigterm_after_step(&mut child, 4);
    let saved = manager(base, "lora-resharded")
        .latest_resumable(true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(saved.world_size, 3);
    assert!(saved.step >= 4 && saved.step < 12, "{}", saved.step);
    run("lora-resharded", 2, 6, 12, "full", true);
    let (_, reference) = weights(base, "lora-reference", 12).await;
    let (_, resharded) = weights(base, "lora-resharded", 12).await;
    let diff = max_diff(&reference, &resharded);
    eprintln!(
        "LoRA saved by 3 fully sharded ranks at step {}, resumed by 2: max |Δw| = {diff:e}",
        saved.step
    );
    assert!(diff < 5e-5, "{diff}");
}
