//! Training throughput and checkpoint stall, end to end through the `waypoint` binary:
//! - tokens/s of `waypoint train` against PyTorch eager (transformers + torch.optim.AdamW, same HF
//!   model, batch shape and thread count; benches/anchors/train_anchor.py) — target ≥ 1.0×;
//! - the time the training loop is blocked by an async (default) save against a synchronous one
//!   (`--sync_save`), from the `save_stall_s` the trainer records — target ≤ 1/20. The extra wall time
//!   of each run over a run without saves is printed too: background uploads share the CPU;
//! - the slowdown of the steps that overlap a background save against the steps with none, as the
//!   trainer reports it per save (`save_overlap_slowdown`), beside its snapshot, upload and
//!   step → commit seconds;
//! - DPO with LoRA: pairs/s of `waypoint train --recipe dpo` against TRL 1.16's DPOTrainer on the
//!   same model and pairs (benches/anchors/dpo_anchor.py; both compute the reference with the
//!   adapters off, in fp32, every sequence cut to the same length) — target ≥ 1.2×; and the peak
//!   resident memory of that run against LoRA SFT over the same tokens (the pairs' chosen and
//!   rejected sequences as text rows, twice the batch) — target ≤ 1.1×.
//!
//! WAYPOINT_BENCH_ONLY=dpo runs the DPO part alone. WAYPOINT_BENCH_HIDDEN / _LAYERS size the model (default 512 / 6: ~19M parameters, a ~230 MB
//! resumable checkpoint); WAYPOINT_BENCH_THREADS the libtorch threads (default 2);
//! WAYPOINT_BENCH_BATCH / _SEQ the batch shape (default 4 × 128); WAYPOINT_BENCH_DEVICE `cpu`
//! (default) or `cuda`, where both sides compute matmuls in bf16 (the anchor under autocast);
//! WAYPOINT_BENCH_SAVE_STEPS the save interval of the stall runs (default 3). One save is in flight
//! at a time, so the interval must give the writer time to finish: on a GPU, 3 steps are far less
//! than one write of the state, and the loop would wait on storage, not on the copy.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use support::{env_or, model_and_data, python, run};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `waypoint train` on the model; returns (metrics lines, wall seconds).
fn waypoint(
    model: &Path,
    data: &Path,
    base: &Path,
    run: &str,
    extra: &[&str],
) -> (Vec<serde_json::Value>, f64) {
    let threads = env_or("WAYPOINT_BENCH_THREADS", 2).to_string();
    let (batch, seq) = (
        env_or("WAYPOINT_BENCH_BATCH", 4).to_string(),
        env_or("WAYPOINT_BENCH_SEQ", 128).to_string(),
    );
    let start = Instant::now();
    run_quiet(
        Command::new(env!("CARGO_BIN_EXE_waypoint"))
            .args(["train", "--device", &device(), "--num_threads", &threads])
            // The step against PyTorch's, without the memory tier's saves (their cost is
            // benches/memory_tier.rs's).
            .args(["--memory_save_steps", "0"])
            .args(["--run_id", run])
            .args(["--model_id", model.to_str().unwrap()])
            .args(["--dataset_uri", data.to_str().unwrap()])
            .args(["--checkpoint_base_uri", base.to_str().unwrap()])
            .args(["--batch_size", &batch, "--max_seq_len", &seq])
            .args(["--warmup_steps", "0"])
            .args(["--lr", "1e-4", "--keep_last", "1"])
            .args(extra),
    );
    let secs = start.elapsed().as_secs_f64();
    let text =
        std::fs::read_to_string(base.join(run).join("framework=waypoint/logs/metrics.jsonl"))
            .expect("metrics.jsonl");
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line"))
        .collect();
    (lines, secs)
}

fn device() -> String {
    std::env::var("WAYPOINT_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn run_quiet(cmd: &mut Command) {
    run(cmd.env("RUST_LOG", "warn"));
}

fn main() {
    if support::probed() {
        return;
    }
    let (dir, model, data, (hidden, layers)) = model_and_data();
    let threads = env_or("WAYPOINT_BENCH_THREADS", 2);
    let (batch, seq) = (
        env_or("WAYPOINT_BENCH_BATCH", 4),
        env_or("WAYPOINT_BENCH_SEQ", 128),
    );
    let device = device();
    if std::env::var("WAYPOINT_BENCH_ONLY").is_ok_and(|v| v == "dpo") {
        dpo(&model, dir.path(), threads);
        return;
    }

    // Throughput: no saves until the final one.
    let steps = 14;
    let (lines, plain_secs) = waypoint(
        &model,
        &data,
        dir.path(),
        "speed",
        &["--max_steps", &steps.to_string(), "--save_steps", "0"],
    );
    let ours = median(
        lines[2..]
            .iter()
            .map(|l| l["tokens_per_s"].as_f64().unwrap())
            .collect(),
    );
    let anchor: serde_json::Value = serde_json::from_str(
        run(Command::new(python()).args([
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/benches/anchors/train_anchor.py"
            ),
            model.to_str().unwrap(),
            &batch.to_string(),
            &seq.to_string(),
            &steps.to_string(),
            &threads.to_string(),
            &device,
        ]))
        .trim(),
    )
    .unwrap();
    let theirs = anchor["tokens_per_s"].as_f64().unwrap();
    println!(
        "train tokens/s on {device} (hidden {hidden}, {layers} layers, batch {batch} x {seq}, \
         {threads} threads): waypoint {ours:.0} vs PyTorch eager {theirs:.0} = {:.2}x (target >= 1.0x)",
        ours / theirs
    );

    // Stall: 4 saves, async (default) vs --sync_save.
    let every = env_or("WAYPOINT_BENCH_SAVE_STEPS", 3);
    let (every_s, stall_steps) = (every.to_string(), (4 * every + 2).to_string());
    let stall = |run: &str, extra: &[&str]| {
        let mut args = vec!["--max_steps", &stall_steps, "--save_steps", &every_s];
        args.extend_from_slice(extra);
        let (lines, secs) = waypoint(&model, &data, dir.path(), run, &args);
        let stalls: Vec<f64> = lines
            .iter()
            .filter_map(|l| l["save_stall_s"].as_f64())
            .collect();
        (
            stalls.iter().sum::<f64>() / stalls.len().max(1) as f64,
            stalls.len(),
            secs,
            lines,
        )
    };
    let (sync_stall, n, sync_secs, _) = stall("sync", &["--sync_save"]);
    let (async_stall, _, async_secs, async_lines) = stall("async", &[]);
    let mean_of = |field: &str| {
        let v: Vec<f64> = async_lines
            .iter()
            .filter_map(|l| l[field].as_f64())
            .collect();
        (v.iter().sum::<f64>() / v.len().max(1) as f64, v.len())
    };
    let (slowdown, reported) = mean_of("save_overlap_slowdown");
    let (overlapped, _) = mean_of("save_overlap_steps");
    println!(
        "steps overlapping a background save ({reported} saves reported, {overlapped:.1} steps \
         each): {slowdown:.2}x the time of steps without one; per save: snapshot {:.2} s, upload \
         {:.2} s, step -> commit {:.2} s",
        mean_of("save_snapshot_s").0,
        mean_of("save_upload_s").0,
        mean_of("save_commit_latency_s").0
    );
    let ckpt_mb = std::fs::read_dir(dir.path().join("sync/framework=waypoint/checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| walk(&e.path().join("dcp")).iter().sum::<u64>())
        .max()
        .unwrap_or(0) as f64
        / 1e6;
    println!(
        "save stall per checkpoint ({n} saves of ~{ckpt_mb:.0} MB resumable state): async {:.1} ms vs \
         sync {:.1} ms = 1/{:.0} (target <= 1/20)",
        async_stall * 1e3,
        sync_stall * 1e3,
        sync_stall / async_stall.max(1e-9)
    );
    println!(
        "wall time: 14 steps without saves {plain_secs:.1} s; {stall_steps} steps saving every \
         {every} async {async_secs:.1} s, sync {sync_secs:.1} s (includes start-up and the final save)"
    );
    dpo(&model, dir.path(), threads);
}

/// `count` preference pairs whose every sequence is longer than `seq` tokens (so that both sides
/// cut them to the same length), and the same sequences as text rows.
fn write_pairs(pairs: &Path, text: &Path, count: usize) {
    let body = "the trainer writes the weights, the optimizer state and the data position; a \
                checkpoint is real once its manifest exists, and resume continues from the newest \
                complete one";
    let (mut p, mut t) = (Vec::new(), Vec::new());
    for i in 0..count {
        let prompt = format!("question {i}: what makes a checkpoint real?");
        let chosen = format!(" the manifest, written last. {body}");
        let rejected = format!(" the first file. {body}");
        p.push(
            serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected})
                .to_string(),
        );
        for c in [&chosen, &rejected] {
            t.push(serde_json::json!({"text": format!("{prompt}{c}")}).to_string());
        }
    }
    std::fs::write(pairs, p.join("\n")).unwrap();
    std::fs::write(text, t.join("\n")).unwrap();
}

/// The `peak_rss_mb` the trainer logs at the end of a run.
fn peak_rss_mb(log: &str) -> f64 {
    log.lines()
        .filter_map(|l| l.split("peak_rss_mb=").nth(1))
        .filter_map(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .next_back()
        .expect("the trainer logs its peak resident memory")
}

/// DPO throughput against TRL, and DPO's peak memory against SFT's on the same tokens.
fn dpo(model: &Path, dir: &Path, threads: usize) {
    let (batch, seq, steps, rank) = (
        env_or("WAYPOINT_BENCH_BATCH", 4),
        env_or("WAYPOINT_BENCH_SEQ", 128),
        12,
        16,
    );
    // AutoTokenizer (TRL's side) needs the tokenizer's special tokens.
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let (pairs, text) = (dir.join("pairs.jsonl"), dir.join("text.jsonl"));
    // One epoch: the run sees every pair, so its LoRA reference is scored once and stored (the
    // policy of run/reference.rs); TRL scores it with every step.
    write_pairs(&pairs, &text, steps * batch);
    let logged = |run: &str, data: &Path, batch: usize, extra: &[&str]| {
        let (batch, seq, steps, rank) = (
            batch.to_string(),
            seq.to_string(),
            steps.to_string(),
            rank.to_string(),
        );
        let log = support::run_log(
            Command::new(env!("CARGO_BIN_EXE_waypoint"))
                .args([
                    "train",
                    "--device",
                    "cpu",
                    "--num_threads",
                    &threads.to_string(),
                ])
                .args(["--run_id", run, "--model_id", model.to_str().unwrap()])
                .args(["--dataset_uri", data.to_str().unwrap()])
                .args(["--checkpoint_base_uri", dir.to_str().unwrap()])
                .args([
                    "--max_seq_len",
                    &seq,
                    "--max_steps",
                    &steps,
                    "--save_steps",
                    "0",
                    "--memory_save_steps",
                    "0",
                ])
                .args(["--lora_rank", &rank, "--warmup_steps", "0", "--lr", "1e-4"])
                .args(["--logging_steps", "1000", "--batch_size", &batch])
                .args(extra)
                .env("RUST_LOG", "info"),
        );
        let text =
            std::fs::read_to_string(dir.join(run).join("framework=waypoint/logs/metrics.jsonl"))
                .expect("metrics.jsonl");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines, log)
    };
    let (lines, dpo_log) = logged("dpo", &pairs, batch, &["--recipe", "dpo"]);
    let ours = median(
        lines[2..]
            .iter()
            .map(|l| l["pairs_per_s"].as_f64().unwrap())
            .collect(),
    );
    let anchor: serde_json::Value = serde_json::from_str(
        run(Command::new(python()).args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/benches/anchors/dpo_anchor.py"),
            model.to_str().unwrap(),
            pairs.to_str().unwrap(),
            &batch.to_string(),
            &seq.to_string(),
            &steps.to_string(),
            &threads.to_string(),
            &rank.to_string(),
        ]))
        .trim()
        .lines()
        .last()
        .unwrap_or_default(),
    )
    .unwrap();
    let theirs = anchor["pairs_per_s"].as_f64().unwrap();
    // The scoring pass before the first step, counted against the epoch's steps.
    let reference = std::fs::read_dir(dir.join("dpo/framework=waypoint/reference"))
        .expect("the stored reference")
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(e.path()).unwrap()).unwrap()
        })
        .expect("the reference record");
    let scoring = reference["secs"].as_f64().unwrap();
    let epoch = (steps * batch) as f64;
    let amortized = epoch / (epoch / ours + scoring);
    println!(
        "DPO pairs/s (LoRA rank {rank}, {batch} pairs x 2 x {seq} tokens, {threads} threads, cpu): \
         waypoint {ours:.2} vs TRL DPOTrainer {theirs:.2} = {:.2}x (target >= 1.2x); with the \
         reference scoring pass ({scoring:.1} s) counted over the epoch: {amortized:.2} = {:.2}x",
        ours / theirs,
        amortized / theirs
    );
    let (_, sft_log) = logged("sft", &text, 2 * batch, &["--disable_packing"]);
    let (dpo_mb, sft_mb) = (peak_rss_mb(&dpo_log), peak_rss_mb(&sft_log));
    println!(
        "peak resident memory, LoRA: DPO {dpo_mb:.0} MB vs SFT over the same tokens {sft_mb:.0} MB \
         = {:.2}x (target <= 1.1x)",
        dpo_mb / sft_mb
    );
}

fn walk(dir: &Path) -> Vec<u64> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .collect()
        })
        .unwrap_or_default()
}
