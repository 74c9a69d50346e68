//! Sharded training state on CPU, one run of each, figure beside anchor:
//! - the memory plan against the measured peak (`VmHWM`) of every rank, for sharding none,
//!   optimizer and full at world 1, 2, 3, with a background save every 2 steps (target: peak ≤ plan
//!   ≤ 1.15 × peak; a line whose plan is below its peak says FAILED, and the bench exits 1);
//! - peak resident memory per rank with `--sharding full` at world 1, 2, 4 against the replicated
//!   state divided by N (target: per-rank state ≤ 1.15 × replicated / N + one layer), where a rank's
//!   state is its peak RSS less that of the same start on the built-in 2-layer model (libtorch, the
//!   process, the data) — over the training steps, and over the whole run with its final save (a
//!   host copy of the rank's state and its share of the promotable weights);
//! - the loop's stall per async save at world 2 with `--sharding full` (target < 5 ms);
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
    /// The memory plan each rank logged at its start, MiB.
    plan_mb: Vec<f64>,
    /// Peak RSS of each rank over the training steps, MiB.
    training_peak_mb: Vec<f64>,
    /// Peak RSS of each rank over the whole run (the final save included), MiB.
    peak_mb: Vec<f64>,
    /// Mean `save_stall_s` of the steps that recorded one (rank 0), seconds.
    save_stall_s: Option<f64>,
    /// Mean tokens/s over the steps after the first.
    tokens_per_s: f64,
}

fn train(dir: &Path, model: Option<&Path>, data: &Path, world: u32, extra: &[&str]) -> Run {
    train_batch(dir, model, data, world, 2, extra)
}

fn train_batch(
    dir: &Path,
    model: Option<&Path>,
    data: &Path,
    world: u32,
    batch: u32,
    extra: &[&str],
) -> Run {
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
        // The sharded step alone (the memory tier's cost is benches/memory_tier.rs's).
        .args(["--memory_save_steps", "0"])
        .args(["--dataset_uri", data.to_str().unwrap()])
        .args([
            "--checkpoint_base_uri",
            dir.to_str().unwrap(),
            "--run_id",
            &run,
        ])
        .args([
            "--batch_size",
            &batch.to_string(),
            "--max_seq_len",
            "128",
            "--max_steps",
            "4",
        ])
        .args(extra)
        .env("RUST_LOG", "info");
    if let Some(m) = model {
        cmd.args(["--model_id", m.to_str().unwrap()]);
    }
    let mut log = run_log(&mut cmd);
    // Ranks other than 0 log their figures to their own files.
    for rank in 1..world {
        let own = dir.join(format!(
            "{run}/framework=waypoint/logs/ranks/rank-{rank:05}.log"
        ));
        log.push_str(&std::fs::read_to_string(&own).unwrap_or_default());
    }
    let mut peak_mb = vec![0.0; world as usize];
    let mut training_peak_mb = vec![0.0; world as usize];
    let mut plan_mb = vec![0.0; world as usize];
    for l in log
        .lines()
        .filter(|l| l.contains("memory plan of this rank"))
    {
        let rank = field(l, "rank").unwrap_or(0.0) as usize;
        plan_mb[rank] = field(l, "plan_mb").expect("plan_mb logged");
    }
    for l in log.lines().filter(|l| l.contains("memory: peak resident")) {
        let rank = field(l, "rank").unwrap_or(0.0) as usize;
        peak_mb[rank] = field(l, "peak_rss_mb").expect("peak_rss_mb logged");
        training_peak_mb[rank] = field(l, "training_peak_rss_mb").expect("training peak logged");
    }
    let metrics =
        std::fs::read_to_string(dir.join(format!("{run}/framework=waypoint/logs/metrics.jsonl")))
            .unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rates: Vec<f64> = lines
        .iter()
        .skip(1)
        .map(|l| l["tokens_per_s"].as_f64().unwrap())
        .collect();
    let stalls: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["save_stall_s"].as_f64())
        .collect();
    Run {
        plan_mb,
        training_peak_mb,
        peak_mb,
        save_stall_s: (!stalls.is_empty())
            .then(|| stalls.iter().sum::<f64>() / stalls.len() as f64),
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

    // The plan against the peak, with a background save every 2 steps (the first written while the
    // next steps run) and the final save.
    let mut low = Vec::new();
    for sharding in ["none", "optimizer", "full"] {
        for world in [1u32, 2, 3] {
            let r = train(
                dir.path(),
                Some(&model),
                &data,
                world,
                &[
                    "--sharding",
                    sharding,
                    "--save_steps",
                    "2",
                    "--keep_last",
                    "1",
                ],
            );
            for (rank, (&plan, &peak)) in r.plan_mb.iter().zip(&r.peak_mb).enumerate() {
                let ratio = plan / peak;
                let verdict = if plan < peak {
                    low.push(format!("{sharding} at world {world}, rank {rank}"));
                    "  FAILED: the plan is below the peak"
                } else if ratio > 1.15 {
                    "  (above 1.15x)"
                } else {
                    ""
                };
                println!(
                    "memory plan, --sharding {sharding} at world {world}, rank {rank}: plan \
                     {plan:.0} MiB, peak RSS {peak:.0} MiB = plan {ratio:.3}x of peak (target 1 to \
                     1.15x){verdict}"
                );
            }
        }
    }

    let no_saves = ["--save_steps", "0", "--sync_save"];
    let floor_run = train(dir.path(), None, &data, 1, &no_saves);
    let (training_floor, floor) = (floor_run.training_peak_mb[0], floor_run.peak_mb[0]);
    println!(
        "model: hidden {hidden}, {layers} layers, {params} parameters, state {state_mb:.0} MiB \
         (16 bytes each); the runtime floor (built-in model's peak RSS) is {training_floor:.0} MiB \
         training, {floor:.0} MiB with its final save"
    );
    let worst = |mb: &[f64]| mb.iter().cloned().fold(0.0, f64::max);
    let mut flags = vec!["--sharding", "full"];
    flags.extend(no_saves);
    // Activations do not shrink with the ranks (each runs the same micro-batch): measured as what
    // a second micro-batch of 2 sequences adds to the training peak, and left out of the state.
    let doubled = train_batch(dir.path(), Some(&model), &data, 1, 4, &flags);
    let mut anchors = None;
    let mut activations = 0.0;
    for world in [1u32, 2, 4] {
        let r = train(dir.path(), Some(&model), &data, world, &flags);
        if world == 1 {
            activations = (doubled.training_peak_mb[0] - r.training_peak_mb[0]).max(0.0);
            println!(
                "activations of a micro-batch of 2 x 128 tokens: {activations:.0} MiB (batch 4 \
                 peaks at {:.0} MiB, batch 2 at {:.0} MiB)",
                doubled.training_peak_mb[0], r.training_peak_mb[0]
            );
        }
        let held = [
            worst(&r.training_peak_mb) - training_floor - activations,
            worst(&r.peak_mb) - floor,
        ];
        let replicated = *anchors.get_or_insert(held);
        for (i, what) in [
            "training (state: peak less floor less activations)",
            "with the final save (peak less floor)",
        ]
        .iter()
        .enumerate()
        {
            let target = 1.15 * replicated[i] / world as f64 + part_mb;
            println!(
                "--sharding full at world {world}, {what}: peak RSS per rank {:?} MiB; held \
                 {:.0} MiB = {:.2}x of target {target:.0} MiB (1.15 x {:.0} / {world} + one part \
                 {part_mb:.0})",
                [&r.training_peak_mb, &r.peak_mb][i]
                    .iter()
                    .map(|m| m.round())
                    .collect::<Vec<_>>(),
                held[i],
                held[i] / target,
                replicated[i]
            );
        }
    }

    let saving = train(
        dir.path(),
        Some(&model),
        &data,
        2,
        &["--sharding", "full", "--save_steps", "1"],
    );
    println!(
        "loop stall per async save at world 2, --sharding full: {:.2} ms (target < 5 ms)",
        saving.save_stall_s.expect("save_stall_s recorded") * 1e3
    );

    let none = train(
        dir.path(),
        Some(&model),
        &data,
        2,
        &["--sharding", "none", "--save_steps", "0"],
    );
    for sharding in ["full", "optimizer"] {
        let r = train(
            dir.path(),
            Some(&model),
            &data,
            2,
            &["--sharding", sharding, "--save_steps", "0"],
        );
        println!(
            "tokens/s at world 2, --sharding {sharding}: {:.0} vs replicated {:.0} = {:.2}x (target >= 0.8x)",
            r.tokens_per_s,
            none.tokens_per_s,
            r.tokens_per_s / none.tokens_per_s
        );
    }

    let plain = train(dir.path(), Some(&model), &data, 1, &no_saves);
    let recomputed = train(
        dir.path(),
        Some(&model),
        &data,
        1,
        &["--activation_checkpointing", "--save_steps", "0"],
    );
    println!(
        "step time with --activation_checkpointing: {:.2}x of without ({:.0} vs {:.0} tokens/s; \
         target <= 1.4x)",
        plain.tokens_per_s / recomputed.tokens_per_s,
        recomputed.tokens_per_s,
        plain.tokens_per_s
    );
    if !low.is_empty() {
        println!(
            "FAILED: the memory plan is below the measured peak for {}",
            low.join("; ")
        );
        std::process::exit(1);
    }
}
