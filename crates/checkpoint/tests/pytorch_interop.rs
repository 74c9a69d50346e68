//! Interoperability with PyTorch's own DCP (from the set-up's venv): PyTorch's
//! `HuggingFaceStorageReader` loads what waypoint wrote, bit for bit, and waypoint reads what
//! `HuggingFaceStorageWriter` wrote, including `save_distributed=True` shards from two gloo ranks.

use waypoint_testkit as common;

use std::collections::BTreeMap;

use serde_json::Value;
use waypoint_checkpoint::{dcp, CheckpointManager, Commit, Dtype, ManagerOptions, Tensor};
use waypoint_checkpoint::{RunLayout, StepName};
use waypoint_storage::Store;

fn interop(args: &[&str]) -> BTreeMap<String, Value> {
    let stdout = common::python_script(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/dcp_interop.py"),
        args,
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad JSON from python ({e}): {stdout}"))
}

fn torch_dtype(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
        Dtype::I64 => "int64",
        Dtype::U8 => "uint8",
        other => panic!("no torch name for {other:?}"),
    }
}

fn digest(t: &Tensor) -> Value {
    serde_json::json!({"dtype": torch_dtype(t.dtype), "shape": t.shape, "sha256": common::sha256_hex(&t.data)})
}

fn digests(ts: &[Tensor]) -> BTreeMap<String, Value> {
    ts.iter().map(|t| (t.name.clone(), digest(t))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pytorch_loads_what_waypoint_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let store = Store::open(base).unwrap();
    let layout = RunLayout::new("interop", "hf").unwrap();
    let mut m = CheckpointManager::new(
        store.clone(),
        layout.clone(),
        ManagerOptions {
            max_file_bytes: 16 * 1024,
            ..Default::default()
        },
    );
    m.start_attempt(&serde_json::json!({})).await.unwrap();

    // A single-writer save split over several files…
    let mut state = common::training_state(5);
    state.push(
        Tensor::new(
            "counters.data_consumed",
            Dtype::I64,
            vec![1],
            320i64.to_le_bytes().to_vec().into(),
        )
        .unwrap(),
    );
    let commit = |step| Commit {
        step,
        data_consumed: 320,
        epoch: 0,
        world_size: 2,
        config_fingerprint: "c".repeat(64),
        delta_base: None,
        training: None,
    };
    let manifest = m
        .save(waypoint_checkpoint::SaveRequest {
            commit: Commit {
                world_size: 1,
                ..commit(5)
            },
            dcp: Some(state.clone()),
            sampler: None,
        })
        .await
        .unwrap();
    assert!(manifest.dcp_files().count() > 1);
    let got = interop(&[
        "load",
        &format!("{base}/{}", layout.dcp_dir(StepName::new(5))),
    ]);
    assert_eq!(got, digests(&state), "PyTorch read back something else");

    // …and a two-writer save where one tensor is split by rows between the ranks and the others are
    // written once, by their owner.
    let step = StepName::new(6);
    m.prepare_save(step).await.unwrap();
    let whole = common::training_state(6);
    let big = whole
        .iter()
        .find(|t| t.name == "model.model.embed_tokens.weight")
        .unwrap()
        .clone();
    let rows = big.shape[0];
    let row_bytes = big.data.len() / rows;
    let mut files = Vec::new();
    let owners = dcp::assign_owners(
        &whole
            .iter()
            .map(|t| t.data.len() as u64)
            .collect::<Vec<_>>(),
        2,
    );
    for rank in 0..2u32 {
        let half = rows / 2;
        let slice = Tensor::new(
            big.name.clone(),
            big.dtype,
            vec![half, big.shape[1]],
            big.data
                .slice(rank as usize * half * row_bytes..(rank as usize + 1) * half * row_bytes),
        )
        .unwrap()
        .with_offsets(vec![rank as usize * half, 0])
        .unwrap();
        let mut mine = vec![slice];
        mine.extend(
            whole
                .iter()
                .zip(&owners)
                .filter(|(t, &o)| o == rank && t.name != big.name)
                .map(|(t, _)| t.clone()),
        );
        let path = format!("dcp/{}", dcp::file_name(rank, 2, 1, 1));
        files.push(
            m.file_writer(step, rank)
                .write_tensors(&path, &mine)
                .await
                .unwrap(),
        );
    }
    m.commit(commit(6), files).await.unwrap();
    let got = interop(&["load", &format!("{base}/{}", layout.dcp_dir(step))]);
    assert_eq!(
        got,
        digests(&whole),
        "PyTorch assembled the sharded save differently"
    );
    // waypoint assembles the same whole tensors.
    let ours = dcp::read_dir(&store, &layout.dcp_dir(step)).await.unwrap();
    assert_eq!(digests(&ours), digests(&whole));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_reads_what_pytorch_wrote() {
    for world in ["1", "2"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dcp");
        let want = interop(&["save", path.to_str().unwrap(), world]);
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let files = store.list_dir("dcp").await.unwrap();
        if world == "2" {
            let shards = files
                .objects
                .iter()
                .filter(|o| o.key.contains("shard-0000"))
                .count();
            assert_eq!(shards, 2, "PyTorch wrote one shard per rank: {files:?}");
        }
        let ours = dcp::read_dir(&store, "dcp").await.unwrap();
        assert_eq!(digests(&ours), want, "world size {world}");
    }
}
