//! `waypoint serve`'s service path against the batch loop, figure beside anchor: tokens/s of a
//! LoRA client's `forward_backward` + `optim_step` driven by the Tinker SDK over HTTP on loopback
//! (`tests/python/tinker_client.py bench`), against the same LoRA step (attention, MLP and
//! `lm_head`, rank 8) inside `waypoint train` on the same model, batch and sequence length
//! (target: the service ≥ 1/1.05 of the batch loop's tokens/s); and greedy sampling tokens/s
//! through the SDK (a KV cache; the client's LoRA adapters on) against transformers' `generate`
//! with its cache on the same base model (target ≥ 1×), and 8 samples a request decoded together
//! against `generate`'s `num_return_sequences` (target ≥ 1×), and 8 requests sent at once (prompts of
//! different lengths, decoded together) against `generate` over the 8 prompts padded in one batch
//! (target ≥ 1×); and the server's resident memory per LoRA
//! client beyond the first against the base model's size (one base is shared by every client: a
//! small fraction, where a copy each would be 1×).
//!
//! WAYPOINT_BENCH_HIDDEN / _LAYERS size the model (default 512 / 6), WAYPOINT_BENCH_BATCH /
//! _SEQ the step (default 4 × 128); libtorch on 2 threads, CPU.

#[path = "support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{env_or, model_and_data, python};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (dir, model, data, (hidden, layers)) = model_and_data();
    let (batch, seq) = (
        env_or("WAYPOINT_BENCH_BATCH", 4),
        env_or("WAYPOINT_BENCH_SEQ", 128),
    );
    let steps = 12;
    let targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head";

    // The anchor: the batch loop, the same LoRA.
    let base = dir.path().join("runs");
    support::run(
        Command::new(env!("CARGO_BIN_EXE_waypoint"))
            .env_remove("LD_LIBRARY_PATH")
            .env("RUST_LOG", "warn")
            .args(["train", "--device", "cpu", "--num_threads", "2"])
            .args(["--memory_save_steps", "0", "--save_steps", "0"])
            .args(["--run_id", "batch"])
            .args(["--model_id", model.to_str().unwrap()])
            .args(["--dataset_uri", data.to_str().unwrap()])
            .args(["--checkpoint_base_uri", base.to_str().unwrap()])
            .args([
                "--batch_size",
                &batch.to_string(),
                "--max_seq_len",
                &seq.to_string(),
            ])
            .args([
                "--lora_rank",
                "8",
                "--lora_alpha",
                "8",
                "--lora_target_modules",
                targets,
            ])
            .args(["--warmup_steps", "0", "--max_steps", &steps.to_string()]),
    );
    let metrics = std::fs::read_to_string(base.join("batch/framework=waypoint/logs/metrics.jsonl"))
        .expect("metrics.jsonl");
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train = median(
        lines[2..]
            .iter()
            .map(|l| l["tokens_per_s"].as_f64().unwrap())
            .collect(),
    );

    // The figure: the same step through the SDK.
    let key = dir.path().join("key");
    std::fs::write(&key, "tml-waypoint-bench\n").unwrap();
    let port = waypoint_testkit::free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "warn")
        .args(["serve", "--port", &port.to_string(), "--api_key_file"])
        .arg(&key)
        .arg("--base_model")
        .arg(format!("bench={}", model.display()))
        .arg("--checkpoint_base_uri")
        .arg(dir.path().join("served"))
        .stdout(Stdio::null())
        .spawn()
        .expect("start waypoint serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "waypoint serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = |args: &[&str]| -> serde_json::Value {
        let url = format!("http://127.0.0.1:{port}");
        let env = [
            ("TINKER_BASE_URL", url.as_str()),
            ("TINKER_API_KEY", "tml-waypoint-bench"),
            ("TINKER_TELEMETRY", "0"),
        ];
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/tinker_client.py");
        let stdout = waypoint_testkit::python_script_with(script, args, &env);
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    let sdk = |args: &[&str]| report(args)["tokens_per_s"].as_f64().unwrap();
    // First, on the fresh server: what each client adds to its memory.
    let clients = 4;
    let memory = report(&[
        "bench_memory",
        "bench",
        &server.id().to_string(),
        &clients.to_string(),
    ]);
    let mb = |k: &str| memory[k].as_f64().unwrap();
    let base_mb = std::fs::read_dir(&model)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().unwrap().len() as f64 / (1 << 20) as f64)
        .sum::<f64>();
    let served = sdk(&[
        "bench",
        "bench",
        &steps.to_string(),
        &batch.to_string(),
        &seq.to_string(),
    ]);
    let (requests, prompt, new_tokens) = ("6", "32", "64");
    let sampled = sdk(&["bench_sample", "bench", requests, prompt, new_tokens]);
    let samples = "8";
    let sampled_n = sdk(&[
        "bench_sample",
        "bench",
        requests,
        prompt,
        new_tokens,
        samples,
    ]);
    let (rounds, together_n) = ("4", "8");
    let together = sdk(&["bench_together", "bench", rounds, together_n, new_tokens]);
    let _ = server.kill();
    let _ = server.wait();
    println!(
        "LoRA step tokens/s on cpu (hidden {hidden}, {layers} layers, {batch} x {seq}, rank 8, 2 \
         threads): waypoint serve through the Tinker SDK {served:.0} vs waypoint train {train:.0} \
         = {:.2}x the batch loop's time (target <= 1.05x)",
        train / served
    );
    let per_client = (mb("all_mb") - mb("one_mb")) / (clients - 1) as f64;
    println!(
        "server memory with LoRA clients (rank 8, attention, MLP, lm_head): the first {:.0} MB \
         (the base model loads), each of {} more {per_client:.1} MB vs the base model's {base_mb:.0} \
         MB = {:.3}x (a copy each would be 1x; target: well under)",
        mb("one_mb") - mb("before_mb"),
        clients - 1,
        per_client / base_mb
    );
    let generate = |samples: &str| {
        let out = support::run(Command::new(python()).args([
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/benches/anchors/generate_anchor.py"
            ),
            model.to_str().unwrap(),
            requests,
            prompt,
            new_tokens,
            "2",
            samples,
        ]));
        let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        out["tokens_per_s"].as_f64().unwrap()
    };
    let greedy = generate("1");
    println!(
        "greedy sampling tokens/s on cpu ({prompt}-token prompt, {new_tokens} new, 2 threads): \
         waypoint serve through the Tinker SDK {sampled:.1} vs transformers generate {greedy:.1} \
         = {:.2}x (target >= 1.0x)",
        sampled / greedy
    );
    let anchor = support::run(Command::new(python()).args([
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/anchors/generate_anchor.py"
        ),
        "batch",
        model.to_str().unwrap(),
        rounds,
        together_n,
        new_tokens,
        "2",
    ]));
    let anchor: serde_json::Value = serde_json::from_str(anchor.trim()).unwrap();
    let batched = anchor["tokens_per_s"].as_f64().unwrap();
    println!(
        "{together_n} greedy requests sent at once (prompts of 16 to 48 tokens, {new_tokens} new), \
         tokens/s on cpu (decoded together): waypoint serve through the Tinker SDK {together:.1} \
         vs transformers generate over the {together_n} prompts padded in one batch {batched:.1} \
         = {:.2}x (target >= 1.0x; one request at a time above: {sampled:.1})",
        together / batched
    );
    let drawn = generate(samples);
    println!(
        "{samples} samples a request, temperature 1, tokens/s on cpu (rows decoded together): \
         waypoint serve through the Tinker SDK {sampled_n:.1} vs transformers generate \
         (num_return_sequences) {drawn:.1} = {:.2}x (target >= 1.0x)",
        sampled_n / drawn
    );
}
