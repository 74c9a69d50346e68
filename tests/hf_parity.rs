//! Interoperability with Hugging Face: tiny random Llama, Qwen2 and Qwen3 models that `transformers`
//! creates in the test venv give the same fp32 logits in waypoint (within 1e-4); and the LoRA adapter
//! `waypoint train --lora_rank` saves is loaded by `peft` onto the transformers model with matching
//! logits; and the model promoted from the built-in demo loads in transformers with its tokenizer,
//! which gives the ids the demo trained on, and the same logits.

mod common;

use std::path::Path;

use tch::{Device, Kind, Tensor};
use waypoint_config::LoraConfig;
use waypoint_trainer::model::Model;

fn hf_models(args: &[&str]) {
    common::root_python_script("hf_models.py", args);
}

/// `ids` and `logits` from a file the Python side wrote.
/// A transformers-made model (`make` `arch`…) under `dir/base` and `rows` rows of JSONL text in
/// `dir/data.jsonl`.
fn model_and_data(
    dir: &Path,
    arch: &[&str],
    rows: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let base_dir = dir.join("base");
    std::fs::create_dir(&base_dir).unwrap();
    let mut args = vec!["make", base_dir.to_str().unwrap()];
    args.extend_from_slice(arch);
    hf_models(&args);
    let data = dir.join("data.jsonl");
    let rows: Vec<String> = (0..rows)
        .map(|i| format!("{{\"text\": \"the trainer writes checkpoint {i} and resumes from it\"}}"))
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    (base_dir, data)
}

fn reference(path: &Path) -> (Tensor, Tensor) {
    let mut ids = None;
    let mut logits = None;
    for (name, t) in Tensor::read_safetensors(path).expect("read reference") {
        match name.as_str() {
            "ids" => ids = Some(t),
            "logits" => logits = Some(t),
            _ => {}
        }
    }
    (ids.expect("ids"), logits.expect("logits"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn logits_match_transformers_for_llama_qwen2_and_qwen3() {
    for (arch, tied) in [
        ("llama", true),
        ("llama", false),
        ("qwen2", false),
        ("qwen3", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        let mut args = vec!["make", path, arch];
        if tied {
            args.push("--tied");
        }
        hf_models(&args);
        let (model, _) = Model::load_hf_dir(dir.path(), Device::Cpu, None, Kind::Float).unwrap();
        assert_eq!(model.config.model_type, arch);
        let (ids, expected) = reference(&dir.path().join("reference.safetensors"));
        let got = tch::no_grad(|| model.forward(&ids, false));
        let diff = max_abs_diff(&got, &expected);
        assert!(diff < 1e-4, "{arch} (tied {tied}): logits differ by {diff}");
        assert!(
            expected.abs().max().double_value(&[]) > 0.1,
            "non-trivial logits"
        );
    }
}

#[test]
fn lora_adapter_loads_in_peft_with_matching_logits() {
    let models = tempfile::tempdir().unwrap();
    let (base_dir, data) = model_and_data(models.path(), &["qwen2"], 40);

    let runs = tempfile::tempdir().unwrap();
    let out = common::waypoint()
        .args(["train", "--run_id", "lora", "--device", "cpu"])
        .args(["--model_id", base_dir.to_str().unwrap()])
        .args(["--dataset_uri", data.to_str().unwrap()])
        .args(["--checkpoint_base_uri", runs.path().to_str().unwrap()])
        .args(["--lora_rank", "4", "--lora_alpha", "8", "--lr", "0.02"])
        .args(["--lora_target_modules", "q_proj,v_proj,down_proj,lm_head"])
        .args([
            "--max_steps",
            "6",
            "--warmup_steps",
            "0",
            "--batch_size",
            "2",
        ])
        .args(["--max_seq_len", "16", "--sampler_dtype", "fp32"])
        .output()
        .unwrap();
    common::ok(&out);
    let run = runs.path().join("lora/framework=waypoint");
    let list = common::waypoint()
        .args(["ckpt", "list"])
        .arg(&run)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("TRAINING_LORA,INFERENCE_LORA"),
        "kinds of a LoRA run: {list}"
    );
    let sampler = run.join("checkpoints/step-000006/sampler");
    assert!(sampler.join("adapter_config.json").is_file());

    let peft_out = models.path().join("peft.safetensors");
    hf_models(&[
        "peft",
        base_dir.to_str().unwrap(),
        sampler.to_str().unwrap(),
        peft_out.to_str().unwrap(),
    ]);
    let (ids, peft_logits) = reference(&peft_out);
    let (_, base_logits) = reference(&base_dir.join("reference.safetensors"));

    // waypoint's own forward pass with the adapter it saved.
    let (mut model, _) = Model::load_hf_dir(&base_dir, Device::Cpu, None, Kind::Float).unwrap();
    model
        .add_lora(
            LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: ["q_proj", "v_proj", "down_proj", "lm_head"]
                    .map(String::from)
                    .into(),
            },
            0,
        )
        .unwrap();
    let saved = Tensor::read_safetensors(sampler.join("adapter_model.safetensors")).unwrap();
    assert_eq!(saved.len(), model.trainable().len());
    for p in model.trainable() {
        let peft_name = format!("base_model.model.{}", p.name);
        let (_, t) = saved
            .iter()
            .find(|(n, _)| *n == peft_name)
            .unwrap_or_else(|| panic!("{peft_name} not in the adapter"));
        let mut dst = p.tensor.shallow_clone();
        tch::no_grad(|| dst.copy_(t));
    }
    let ours = tch::no_grad(|| model.forward(&ids, false));
    let diff = max_abs_diff(&ours, &peft_logits);
    assert!(diff < 1e-4, "waypoint vs peft logits differ by {diff}");
    let moved = max_abs_diff(&peft_logits, &base_logits);
    assert!(
        moved > 1e-3,
        "the trained adapter changes the logits ({moved})"
    );
}

#[test]
fn the_promoted_demo_model_loads_in_transformers_with_its_tokenizer() {
    let runs = tempfile::tempdir().unwrap();
    let out = common::waypoint()
        .args(["train", "--run_id", "demo", "--device", "cpu"])
        .args(["--checkpoint_base_uri", runs.path().to_str().unwrap()])
        .args(["--max_steps", "5", "--sampler_dtype", "fp32"])
        .args(["--output_model_id", "tiny"])
        .output()
        .unwrap();
    common::ok(&out);
    let dir = runs.path().join("models/tiny");
    assert!(dir.join("tokenizer.json").is_file());

    let text = "héllo, wörld ✓";
    let logits_file = runs.path().join("hf.safetensors");
    let printed = common::root_python_script(
        "hf_models.py",
        &[
            "tokenize",
            dir.to_str().unwrap(),
            text,
            logits_file.to_str().unwrap(),
        ],
    );
    let got: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    let want: Vec<i64> = std::iter::once(waypoint_data::tokenizer::BYTE_BOS)
        .chain(text.bytes().map(i64::from))
        .collect();
    let ids: Vec<i64> = got["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ids, want, "transformers' ids are the byte tokenizer's");
    assert_eq!(got["decoded"], text);
    assert_eq!(got["eos"], waypoint_data::tokenizer::BYTE_EOS);

    let (hf_ids, hf_logits) = reference(&logits_file);
    let (model, _) = Model::load_hf_dir(&dir, Device::Cpu, None, Kind::Float).unwrap();
    let ours = tch::no_grad(|| model.forward(&hf_ids, false));
    let diff = max_abs_diff(&ours, &hf_logits);
    assert!(
        diff < 1e-4,
        "promoted demo logits differ from transformers' by {diff}"
    );
}

/// A model made by transformers 5 records `"dtype": "float32"` in its config.json; promoted with
/// bf16 weights, its config must say bf16 in every key a loader reads, so transformers loads it at
/// the weights' size (`dtype="auto"` reads `dtype`), not at twice it.
#[test]
fn a_promoted_model_states_the_dtype_of_its_weights() {
    let models = tempfile::tempdir().unwrap();
    let (base_dir, data) = model_and_data(models.path(), &["qwen3", "--tied"], 16);
    let made: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(made["dtype"], "float32", "the oracle's own config: {made}");
    let runs = tempfile::tempdir().unwrap();
    let out = common::waypoint()
        .args(["train", "--run_id", "bf16", "--device", "cpu"])
        .args(["--model_id", base_dir.to_str().unwrap()])
        .args(["--dataset_uri", data.to_str().unwrap()])
        .args(["--checkpoint_base_uri", runs.path().to_str().unwrap()])
        .args([
            "--max_steps",
            "2",
            "--batch_size",
            "2",
            "--max_seq_len",
            "16",
        ])
        .args(["--output_model_id", "bf16"])
        .output()
        .unwrap();
    common::ok(&out);
    let promoted = runs.path().join("models/bf16");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(promoted.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16", "{config}");
    assert_eq!(config["torch_dtype"], "bfloat16", "{config}");
    let out = common::root_python_script("hf_models.py", &["state", promoted.to_str().unwrap()]);
    let loaded: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(!loaded.is_empty());
    for (name, t) in &loaded {
        assert_eq!(
            t["dtype"], "torch.bfloat16",
            "{name} loaded as {}",
            t["dtype"]
        );
    }
}
