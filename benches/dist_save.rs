//! Checkpoint save time at world size 1, 2 and 4 on CPU (local FS), with the bytes each rank wrote:
//! `waypoint launch --nproc_per_node N -- waypoint train` on the same model, the resumable save of
//! step 1 as the trainer times it (from the start of the save to rank 0's commit). Each rank writes
//! about 1/N of the state; on a 2-core machine N processes share the cores.

#[path = "support/mod.rs"]
mod support;

use std::process::Command;

use support::{field, model_and_data, run_log};

fn main() {
    if support::probed() {
        return;
    }
    let (dir, model, data, (hidden, layers)) = model_and_data();
    let exe = env!("CARGO_BIN_EXE_waypoint");
    let mut baseline = None;
    for world in [1u32, 2, 4] {
        let run = format!("w{world}");
        let log = run_log(
            Command::new(exe)
                .args([
                    "launch",
                    "--nproc_per_node",
                    &world.to_string(),
                    "--master_port",
                    "0",
                ])
                .args(["--", exe, "train", "--device", "cpu", "--num_threads", "1"])
                // The durable save alone (the memory tier's cost is benches/memory_tier.rs's).
                .args(["--memory_save_steps", "0"])
                .args(["--model_id", model.to_str().unwrap()])
                .args(["--dataset_uri", data.to_str().unwrap()])
                .args([
                    "--checkpoint_base_uri",
                    dir.path().to_str().unwrap(),
                    "--run_id",
                    &run,
                ])
                .args([
                    "--batch_size",
                    "1",
                    "--max_seq_len",
                    "64",
                    "--max_steps",
                    "2",
                ])
                .args(["--save_steps", "1", "--sync_save"])
                .env("RUST_LOG", "info"),
        );
        let secs = log
            .lines()
            .filter(|l| l.contains("checkpoint committed") && l.contains("step-000001"))
            .find_map(|l| field(l, "secs"))
            .expect("the save of step 1 was logged");
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!(
                "{run}/framework=waypoint/checkpoints/step-000001.json"
            )))
            .unwrap(),
        )
        .unwrap();
        let mut per_rank = vec![0u64; world as usize];
        for f in manifest["files"].as_array().unwrap() {
            per_rank[f["rank"].as_u64().unwrap() as usize] += f["bytes"].as_u64().unwrap();
        }
        let total: u64 = per_rank.iter().sum();
        let split: Vec<String> = per_rank
            .iter()
            .map(|b| format!("{:.0} MB", *b as f64 / 1e6))
            .collect();
        let base = *baseline.get_or_insert(secs);
        println!(
            "save at world size {world} (hidden {hidden}, {layers} layers, {:.0} MB): {secs:.2} s = {:.2}x \
             world 1; per-rank bytes [{}]",
            total as f64 / 1e6,
            base / secs,
            split.join(", ")
        );
    }
}
