//! Sharded training state on CPU, one run of each, figure beside anchor:
//! - peak resident memory per rank with `--sharding full` at world 1, 2, 4 against the replicated
//!   state divided by N (target: per-rank state ≤ 1.15 × replicated / N + one layer), where a rank's
//!   state is its peak RSS less that of the same start on the built-in 2-layer model (libtorch, the
//!   process, the data);
//! - tokens/s with `--sharding full` and `--sharding optimizer` against replicated data parallelism
//!   at world 2 (target ≥ 0.8×);
//! - the step time of `--activation_checkpointing` against without, on one rank (target ≤ 1.4×).
//!
//! The model is a random Llama made by the venv's transformers (`WAYPOINT_BENCH_HIDDEN`,
//! `WAYPOINT_BENCH_LAYERS`); N processes share the machine's cores.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use support::{field, model_and_data, run_log};

struct Run {
    /// Peak RSS of each rank, MiB.
    peak_mb: Vec<f64>,
    /// Mean tokens/s over the steps after the first.
    tokens_per_s: f64,
}

fn train(dir: &Path, model: Option<&Path>, data: &Path, world: u32, extra: &[&str]) -> Run {
    let exe = env!("CARGO_BIN_EXE_waypoint");
    let run = format!("r{}", std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos());
    let mut cmd = Command::new(exe);
    if world > 1 {
        cmd.args([
            "launch",
            "--nproc_per_node",
            &world.to_string(),
            "--master_port",
            "0",
            "--",
            exe,
        ]);
    }
    cmd.args(["train", "--device", "cpu", "--num_threads", "1"])
        .args(["--dataset_uri", data.to_str().unwrap()])
        .args([
            "--checkpoint_base_uri",
            dir.to_str().unwrap(),
            "--run_id",
            &run,
        ])
        .args([
            "--batch_size",
            "2",
            "--max_seq_len",
            "128",
            "--max_steps",
            "4",
        ])
        .args(["--save_steps", "0", "--sync_save"])
        .args(extra)
        .env("RUST_LOG", "info");
    if let Some(m) = model {
        cmd.args(["--model_id", m.to_str().unwrap()]);
    }
    let log = run_log(&mut cmd);
    let mut peak_mb = vec![0.0; world as usize];
    for l in log.lines().filter(|l| l.contains("memory: peak resident")) {
        let rank = field(l, "rank").unwrap_or(0.0) as usize;
        peak_mb[rank] = field(l, "peak_rss_mb").expect("peak_rss_mb logged");
    }
    let metrics =
        std::fs::read_to_string(dir.join(format!("{run}/framework=waypoint/logs/metrics.jsonl")))
            .unwrap();
    let rates: Vec<f64> = metrics
        .lines()
        .skip(1)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["tokens_per_s"]
                .as_f64()
                .unwrap()
        })
        .collect();
    Run {
        peak_mb,
        tokens_per_s: rates.iter().sum::<f64>() / rates.len().max(1) as f64,
    }
}

fn main() {
    if support::probed() {
        return;
    }
    let (dir, model, data, (hidden, layers)) = model_and_data();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap();
    let inter = config["intermediate_size"].as_u64().unwrap();
    let h = hidden as u64;
    let heads = config["num_attention_heads"].as_u64().unwrap();
    let kv = config["num_key_value_heads"].as_u64().unwrap_or(heads) * (h / heads);
    let layer_params = 2 * h * h + 2 * kv * h + 3 * h * inter + 2 * h;
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(false);
    let params = (if tied { 1 } else { 2 }) * vocab * h + layers as u64 * layer_params + h;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    // Weights, gradients and AdamW's two moments in fp32.
    let state_mb = mib(16 * params);
    // One part's whole weights and gradients (the largest: a layer or the embedding).
    let part_mb = mib(2 * 4 * layer_params.max(vocab * h));

    let floor = train(dir.path(), None, &data, 1, &[]).peak_mb[0];
    println!(
        "model: hidden {hidden}, {layers} layers, {params} parameters, state {state_mb:.0} MiB \
         (16 bytes each); the runtime floor (built-in model's peak RSS) is {floor:.0} MiB"
    );
    let mut replicated_state = None;
    for world in [1u32, 2, 4] {
        let r = train(
            dir.path(),
            Some(&model),
            &data,
            world,
            &["--sharding", "full"],
        );
        let worst = r.peak_mb.iter().cloned().fold(0.0, f64::max);
        let held = worst - floor;
        let replicated = *replicated_state.get_or_insert(held);
        let target = 1.15 * replicated / world as f64 + part_mb;
        println!(
            "--sharding full at world {world}: peak RSS per rank {:?} MiB; state held {held:.0} MiB \
             = {:.2}x of target {target:.0} MiB (1.15 x {replicated:.0} / {world} + one part {part_mb:.0})",
            r.peak_mb.iter().map(|m| m.round()).collect::<Vec<_>>(),
            held / target
        );
    }

    let none = train(dir.path(), Some(&model), &data, 2, &["--sharding", "none"]);
    for sharding in ["full", "optimizer"] {
        let r = train(
            dir.path(),
            Some(&model),
            &data,
            2,
            &["--sharding", sharding],
        );
        println!(
            "tokens/s at world 2, --sharding {sharding}: {:.0} vs replicated {:.0} = {:.2}x (target >= 0.8x)",
            r.tokens_per_s,
            none.tokens_per_s,
            r.tokens_per_s / none.tokens_per_s
        );
    }

    let plain = train(dir.path(), Some(&model), &data, 1, &[]);
    let recomputed = train(
        dir.path(),
        Some(&model),
        &data,
        1,
        &["--activation_checkpointing"],
    );
    println!(
        "step time with --activation_checkpointing: {:.2}x of without ({:.0} vs {:.0} tokens/s; \
         target <= 1.4x)",
        plain.tokens_per_s / recomputed.tokens_per_s,
        recomputed.tokens_per_s,
        plain.tokens_per_s
    );
}
