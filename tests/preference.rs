//! Preference training against TRL 1.16 (the venv's `trl`, pinned in scripts/requirements.txt):
//! - the pairs waypoint trains on are TRL's, token for token, for DPO and ORPO, in the standard,
//!   conversational and implicit-prompt formats (and the Fireworks format gives the conversational
//!   pairs' tokens), with long pairs cut as TRL cuts them;
//! - `waypoint train --recipe dpo|orpo` gives TRL's loss and metrics at every step (DPO sigmoid, ipo
//!   and hinge, with RPO; ORPO; full-parameter and LoRA; Llama- and Qwen3-shaped models), on data
//!   where each step holds every pair, so the order within a step cannot matter;
//! - bad rows name their file, line and field, or are skipped and counted.

mod common;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use waypoint_data::tokenizer::Tokenizer;
use waypoint_data::{list_sources, DataOptions, Dataset, PairStyle};

const SCRIPT: &str = "trl_preference.py";

/// A tiny model (`arch`, with a BOS token and a chat template) under `dir/name`.
fn model(dir: &Path, name: &str, arch: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir(&path).unwrap();
    common::root_python_script(
        SCRIPT,
        &["make", path.to_str().unwrap(), arch, "--bos", "--chat"],
    );
    path
}

fn write_rows(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    path
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn assistant(text: &str) -> Value {
    json!([{"role": "assistant", "content": text}])
}

/// (prompt, chosen, rejected) texts; the first pair is long enough to be cut at 64 tokens.
const PAIRS: [(&str, &str, &str); 5] = [
    (
        "the trainer writes",
        " the weights and the optimizer state, then the manifest that makes it real; a checkpoint \
         is real once its manifest exists, and resume continues from the newest complete one",
        " nothing at all",
    ),
    (
        "a checkpoint is",
        " real once its manifest exists",
        " a file",
    ),
    (
        "resume continues",
        " from the newest complete checkpoint",
        " from scratch",
    ),
    ("the optimizer", " state is saved", " is lost"),
    // No prompt: the completion starts at the first token, which nothing predicts (IPO still
    // counts it in the completion's length, as TRL does).
    ("", " yes", " no"),
];

/// The datasets of every format, by name.
fn datasets(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let standard: Vec<Value> = PAIRS
        .iter()
        .map(|(p, c, r)| json!({"prompt": p, "chosen": c, "rejected": r}))
        .collect();
    let implicit: Vec<Value> = PAIRS
        .iter()
        .map(|(p, c, r)| json!({"chosen": format!("{p}{c}"), "rejected": format!("{p}{r}")}))
        .collect();
    let chat: Vec<Value> = PAIRS
        .iter()
        .map(|(p, c, r)| json!({"prompt": user(p), "chosen": assistant(c), "rejected": assistant(r)}))
        .collect();
    let implicit_chat: Vec<Value> = PAIRS
        .iter()
        .map(|(p, c, r)| {
            let both = |a: &str| json!([{"role": "user", "content": p}, {"role": "assistant", "content": a}]);
            json!({"chosen": both(c), "rejected": both(r)})
        })
        .collect();
    vec![
        ("standard", write_rows(dir, "standard.jsonl", &standard)),
        ("implicit", write_rows(dir, "implicit.jsonl", &implicit)),
        ("chat", write_rows(dir, "chat.jsonl", &chat)),
        (
            "implicit_chat",
            write_rows(dir, "implicit_chat.jsonl", &implicit_chat),
        ),
    ]
}

/// Waypoint's documents of `data` for `style`: per pair, (chosen ids, its prompt length,
/// rejected ids, its prompt length).
fn waypoint_pairs(
    model: &Path,
    data: &Path,
    style: PairStyle,
    max_len: usize,
    cache: &Path,
) -> Vec<(Vec<i64>, usize, Vec<i64>, usize)> {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let tokenizer = Tokenizer::from_hf_dir(model, &config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let sources = rt.block_on(list_sources(data.to_str().unwrap())).unwrap();
    let opts = DataOptions {
        text_field: "text".into(),
        max_seq_len: max_len,
        packing: true,
        pairs: Some(style),
        skip_bad_lines: false,
        cache_dir: cache.to_path_buf(),
        threads: 2,
    };
    let d = Dataset::load(&sources, &tokenizer, &opts, rt.handle().clone()).unwrap();
    (0..d.len())
        .map(|p| {
            let side = |doc: usize| {
                let ((ids, mask), len) = d.document(doc);
                let prompt = mask.iter().take_while(|&&m| !m).count();
                (ids[..len].to_vec(), prompt)
            };
            let ((c, cp), (r, rp)) = (side(2 * p), side(2 * p + 1));
            (c, cp, r, rp)
        })
        .collect()
}

#[test]
fn pairs_are_tokenized_as_trl_tokenizes_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path(), "llama", "llama");
    let cache = dir.path().join("cache");
    for (style, name) in [(PairStyle::Dpo, "dpo"), (PairStyle::Orpo, "orpo")] {
        for (format, data) in datasets(dir.path()) {
            let out = dir.path().join(format!("{name}-{format}.json"));
            common::root_python_script(
                SCRIPT,
                &[
                    "tokens",
                    model.to_str().unwrap(),
                    data.to_str().unwrap(),
                    name,
                    "64",
                    out.to_str().unwrap(),
                ],
            );
            let trl: Vec<Value> =
                serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
            let ours = waypoint_pairs(&model, &data, style, MAX_LEN, &cache);
            assert_eq!(ours.len(), trl.len(), "{name} {format}");
            assert_eq!(
                ours[0].0.len(),
                MAX_LEN,
                "{name} {format}: the long pair is cut"
            );
            for (k, (t, (c, cp, r, rp))) in trl.iter().zip(&ours).enumerate() {
                let ids = |v: &Value| -> Vec<i64> {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_i64().unwrap())
                        .collect()
                };
                // TRL's ORPO keeps a prompt longer than max_length whole; none is here.
                let cut = |v: Vec<i64>| v.into_iter().take(MAX_LEN).collect::<Vec<_>>();
                assert_eq!(
                    c,
                    &cut(ids(&t["chosen"])),
                    "{name} {format} pair {k}: chosen ids"
                );
                assert_eq!(
                    r,
                    &cut(ids(&t["rejected"])),
                    "{name} {format} pair {k}: rejected ids"
                );
                assert_eq!(
                    *cp as i64,
                    t["chosen_prompt"].as_i64().unwrap(),
                    "{name} {format} pair {k}"
                );
                assert_eq!(
                    *rp as i64,
                    t["rejected_prompt"].as_i64().unwrap(),
                    "{name} {format} pair {k}"
                );
            }
        }
        // Fireworks' format is the conversational pairs.
        let fireworks: Vec<Value> = PAIRS
            .iter()
            .map(|(p, c, r)| {
                json!({"input": {"messages": user(p)}, "preferred_output": assistant(c),
                       "non_preferred_output": assistant(r)})
            })
            .collect();
        let fw = write_rows(dir.path(), "fireworks.jsonl", &fireworks);
        let chat = dir.path().join("chat.jsonl");
        assert_eq!(
            waypoint_pairs(&model, &fw, style, MAX_LEN, &cache),
            waypoint_pairs(&model, &chat, style, MAX_LEN, &cache),
            "{name}: Fireworks rows"
        );
    }
}

/// One training case: the same settings on both sides.
struct Case {
    arch: &'static str,
    format: &'static str,
    recipe: &'static str,
    loss: &'static str,
    beta: f64,
    rpo_alpha: f64,
    lora: u64,
}

const STEPS: u64 = 4;
const LR: f64 = 5e-3;
const SEED: u64 = 7;
const MAX_LEN: usize = 64;

/// `waypoint train` on `case`; its metrics lines.
fn waypoint_run(case: &Case, model: &Path, data: &Path, base: &Path, cache: &Path) -> Vec<Value> {
    let run_id = format!("{}-{}-{}-{}", case.recipe, case.loss, case.arch, case.lora);
    let mut cmd = common::waypoint();
    cmd.args(["train", "--recipe", case.recipe, "--model_id"])
        .arg(model)
        .arg("--dataset_uri")
        .arg(data)
        .arg("--checkpoint_base_uri")
        .arg(base)
        .arg("--data_cache_dir")
        .arg(cache)
        .args(["--run_id", &run_id])
        .args(["--beta", &case.beta.to_string()])
        .args([
            "--max_steps",
            &STEPS.to_string(),
            "--batch_size",
            &PAIRS.len().to_string(),
        ])
        .args([
            "--lr",
            &LR.to_string(),
            "--lr_scheduler",
            "constant",
            "--warmup_steps",
            "0",
        ])
        .args([
            "--weight_decay",
            "0",
            "--max_grad_norm",
            "1",
            "--seed",
            &SEED.to_string(),
        ])
        .args([
            "--max_seq_len",
            &MAX_LEN.to_string(),
            "--logging_steps",
            "1",
        ]);
    if case.recipe == "dpo" {
        cmd.args(["--dpo_loss", case.loss]);
        if case.rpo_alpha > 0.0 {
            cmd.args(["--rpo_alpha", &case.rpo_alpha.to_string()]);
        }
    }
    if case.lora > 0 {
        cmd.args(["--lora_rank", &case.lora.to_string()]);
    }
    let out = cmd.output().unwrap();
    common::train_log(&out);
    let metrics = base
        .join(&run_id)
        .join("framework=waypoint/logs/metrics.jsonl");
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn dpo_and_orpo_match_trl_step_for_step() {
    let dir = tempfile::tempdir().unwrap();
    let llama = model(dir.path(), "llama", "llama");
    let qwen3 = model(dir.path(), "qwen3", "qwen3");
    let data: std::collections::HashMap<_, _> = datasets(dir.path()).into_iter().collect();
    let cases = [
        Case {
            arch: "llama",
            format: "standard",
            recipe: "dpo",
            loss: "sigmoid",
            beta: 0.1,
            rpo_alpha: 0.0,
            lora: 0,
        },
        Case {
            arch: "qwen3",
            format: "standard",
            recipe: "dpo",
            loss: "ipo",
            beta: 0.5,
            rpo_alpha: 0.0,
            lora: 4,
        },
        Case {
            arch: "qwen3",
            format: "implicit",
            recipe: "dpo",
            loss: "hinge",
            beta: 0.2,
            rpo_alpha: 0.0,
            lora: 0,
        },
        Case {
            arch: "llama",
            format: "implicit_chat",
            recipe: "dpo",
            loss: "sigmoid",
            beta: 0.1,
            rpo_alpha: 0.5,
            lora: 4,
        },
        Case {
            arch: "llama",
            format: "standard",
            recipe: "orpo",
            loss: "",
            beta: 0.1,
            rpo_alpha: 0.0,
            lora: 0,
        },
        Case {
            arch: "qwen3",
            format: "chat",
            recipe: "orpo",
            loss: "",
            beta: 0.25,
            rpo_alpha: 0.0,
            lora: 4,
        },
    ];
    let model_of = |arch: &str| if arch == "llama" { &llama } else { &qwen3 };
    let specs: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({
                "model": model_of(c.arch), "data": data[c.format], "recipe": c.recipe,
                "loss": c.loss, "beta": c.beta, "rpo_alpha": c.rpo_alpha, "lora": c.lora,
                "steps": STEPS, "batch": PAIRS.len(), "lr": LR, "max_len": MAX_LEN, "seed": SEED,
            })
        })
        .collect();
    let cases_path = dir.path().join("cases.json");
    std::fs::write(&cases_path, serde_json::to_string(&specs).unwrap()).unwrap();
    let trl_path = dir.path().join("trl.json");
    common::root_python_script(
        SCRIPT,
        &[
            "run",
            cases_path.to_str().unwrap(),
            trl_path.to_str().unwrap(),
        ],
    );
    let trl: Vec<Vec<Value>> =
        serde_json::from_str(&std::fs::read_to_string(&trl_path).unwrap()).unwrap();
    let (base, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    for (case, theirs) in cases.iter().zip(&trl) {
        let what = format!(
            "{} {} {} lora {} ({})",
            case.recipe, case.loss, case.arch, case.lora, case.format
        );
        let ours = waypoint_run(case, model_of(case.arch), &data[case.format], &base, &cache);
        assert_eq!(ours.len(), STEPS as usize, "{what}");
        assert_eq!(theirs.len(), STEPS as usize, "{what}: TRL's log");
        // Step 1 starts at the reference: the loss is the loss of a zero margin.
        let first = ours[0]["loss"].as_f64().unwrap();
        let at_zero = match (case.recipe, case.loss) {
            ("dpo", "sigmoid") if case.rpo_alpha == 0.0 => Some(std::f64::consts::LN_2),
            ("dpo", "hinge") => Some(1.0),
            ("dpo", "ipo") => Some((1.0 / (2.0 * case.beta)).powi(2)),
            _ => None,
        };
        if let Some(want) = at_zero {
            assert!(
                (first - want).abs() < 1e-6 * want,
                "{what}: step 1 loss {first}, want {want}"
            );
        }
        let mut names = vec![
            "loss",
            "grad_norm",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ];
        if case.recipe == "orpo" {
            names.extend(["nll_loss", "log_odds_ratio", "log_odds_chosen"]);
        }
        let mut off = Vec::new();
        for (step, (a, b)) in ours.iter().zip(theirs).enumerate() {
            for name in &names {
                let (x, y) = (a[*name].as_f64(), b[*name].as_f64());
                let (Some(x), Some(y)) = (x, y) else {
                    panic!(
                        "{what}: step {} lacks {name}: ours {} theirs {}",
                        step + 1,
                        a[*name],
                        b[*name]
                    );
                };
                // Relative. A reward is β × a difference of two log-probs (DPO: policy minus
                // reference) and ORPO's log odds a difference of log-probs: each carries their
                // rounding, so it is judged against (β ×) the log-probs.
                let logp = |k: &str| a[k].as_f64().unwrap_or(0.0).abs();
                let logps = logp("logps/chosen").max(logp("logps/rejected"));
                let scale = match *name {
                    "rewards/chosen" | "rewards/rejected" | "rewards/margins" => case.beta * logps,
                    "log_odds_chosen" => logps,
                    _ => 0.0,
                };
                let tol = 1e-5 * x.abs().max(y.abs()).max(scale).max(1e-6);
                if (x - y).abs() > tol {
                    off.push(format!("step {} {name}: waypoint {x}, TRL {y}", step + 1));
                }
            }
        }
        assert!(off.is_empty(), "{what}:\n{}", off.join("\n"));
    }
}

/// A LoRA DPO run that trains on fewer pairs than the data holds scores its reference with the
/// adapters off as batches come; one that sees them all stores a table scored once. The two give
/// the same steps (a constant learning rate makes the runs' first steps the same).
#[test]
fn both_sources_of_a_lora_reference_agree() {
    let dir = tempfile::tempdir().unwrap();
    let run = |run_id: &str, steps: &str| {
        let out = common::waypoint()
            .args([
                "train",
                "--recipe",
                "dpo",
                "--dataset_uri",
                "builtin:demo_preference",
            ])
            .args([
                "--max_seq_len",
                "192",
                "--batch_size",
                "4",
                "--lora_rank",
                "4",
            ])
            .args([
                "--lr_scheduler",
                "constant",
                "--warmup_steps",
                "0",
                "--lr",
                "1e-2",
            ])
            .args([
                "--max_steps",
                steps,
                "--run_id",
                run_id,
                "--logging_steps",
                "1",
            ])
            .arg("--checkpoint_base_uri")
            .arg(dir.path())
            .output()
            .unwrap();
        let log = common::train_log(&out);
        let metrics = dir
            .path()
            .join(run_id)
            .join("framework=waypoint/logs/metrics.jsonl");
        let lines: Vec<Value> = std::fs::read_to_string(metrics)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (log, lines)
    };
    // 3 steps × 4 pairs < 64 pairs: adapters off; 16 steps × 4 = 64: stored.
    let (log, on_the_fly) = run("few", "3");
    assert!(
        log.contains("the adapters off, scored with each batch"),
        "{log}"
    );
    assert!(!dir.path().join("few/framework=waypoint/reference").exists());
    let (log, stored) = run("all", "16");
    assert!(
        log.contains("reference log-probs computed from the initial weights"),
        "{log}"
    );
    for (a, b) in on_the_fly.iter().zip(&stored).take(3) {
        for name in [
            "loss",
            "grad_norm",
            "rewards/chosen",
            "rewards/margins",
            "logps/rejected",
        ] {
            let (x, y) = (a[name].as_f64().unwrap(), b[name].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(y.abs()).max(1e-2),
                "step {} {name}: {x} vs {y}",
                a["step"]
            );
        }
    }
}

/// A preference run set up through a config file in the control plane's `extra_args` shape shows
/// its statistics in TensorBoard and `waypoint status`; its recipe settings are part of its record,
/// so a restart with another β is refused; pairs cut to `--max_seq_len` are counted.
#[test]
fn a_dpo_job_from_extra_args_reports_its_metrics_and_keeps_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("job.json");
    std::fs::write(
        &config,
        json!({"extra_args": {"recipe": "dpo", "beta": 0.2, "dpo_loss": "hinge",
            "dataset_uri": "builtin:demo_preference", "max_seq_len": 96, "max_steps": 4,
            "batch_size": 4, "lora_rank": 4, "logging_steps": 1,
            "eval_dataset_uri": "builtin:demo_preference", "eval_steps": 2}})
        .to_string(),
    )
    .unwrap();
    let train = |extra: &[&str]| {
        common::waypoint()
            .args(["train", "--config_path"])
            .arg(&config)
            .arg("--checkpoint_base_uri")
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let log = common::train_log(&train(&[]));
    // Byte-level pairs of the demo are longer than 96 tokens: their completions are cut.
    let cut = log
        .lines()
        .find(|l| l.contains("dataset ready"))
        .and_then(|l| common::runs::logged_number(l, "truncated="))
        .expect("the dataset line counts the pairs cut");
    assert!(
        cut > 0
            && log.contains(&format!(
                "{cut} of 64 pairs are longer than --max_seq_len 96"
            )),
        "{log}"
    );
    let run = dir.path().join("demo/framework=waypoint");
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(run.join("logs/metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        first["loss"].as_f64().unwrap(),
        1.0,
        "hinge at the reference"
    );
    assert_eq!(first["pairs"], 4);
    // The eval set reports TRL's eval names; at step 2 the policy has moved off the reference.
    let second: Value = serde_json::from_str(
        std::fs::read_to_string(run.join("logs/metrics.jsonl"))
            .unwrap()
            .lines()
            .nth(1)
            .unwrap(),
    )
    .unwrap();
    for name in [
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_logps/chosen",
    ] {
        assert!(second[name].is_f64(), "{name} in {second}");
    }
    assert!(second["eval_loss"].as_f64().unwrap() < 1.0, "{second}");
    let events = std::fs::read_dir(run.join("logs/tensorboard"))
        .unwrap()
        .flatten()
        .next()
        .unwrap();
    let bytes = std::fs::read(events.path()).unwrap();
    for tag in [
        "train/rewards/margins",
        "train/logps/chosen",
        "train/pairs_per_s",
    ] {
        assert!(
            bytes.windows(tag.len()).any(|w| w == tag.as_bytes()),
            "no {tag} in the events"
        );
    }
    let status = common::waypoint().arg("status").arg(&run).output().unwrap();
    let screen = String::from_utf8_lossy(&status.stdout);
    assert!(screen.contains("preference  rewards/chosen"), "{screen}");
    // The same run asked to go on with another β.
    let out = train(&["--beta", "0.3", "--max_steps", "4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("beta: was 0.2, now 0.3"), "{err}");
}

#[test]
fn bad_rows_name_file_line_and_field_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        json!({"prompt": "a", "chosen": " b", "rejected": " c"}),
        json!({"prompt": "a", "chosen": " b"}),
        json!({"prompt": "a", "chosen": "", "rejected": " c"}),
        json!({"prompt": "a", "chosen": " same", "rejected": " same"}),
        json!({"prompt": "a", "chosen": " d", "rejected": " e"}),
    ];
    let data = write_rows(dir.path(), "pairs.jsonl", &rows);
    let run = |extra: &[&str]| {
        common::waypoint()
            .args([
                "train",
                "--recipe",
                "dpo",
                "--max_steps",
                "1",
                "--batch_size",
                "2",
            ])
            .arg("--dataset_uri")
            .arg(&data)
            .arg("--checkpoint_base_uri")
            .arg(dir.path().join("runs"))
            .arg("--data_cache_dir")
            .arg(dir.path().join("cache"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pairs.jsonl, line 2")
            && err.contains("`chosen` and `rejected`")
            && err.contains("--skip_bad_lines"),
        "{err}"
    );
    let out = run(&["--skip_bad_lines", "--run_id", "skipping"]);
    let log = common::train_log(&out);
    assert!(log.contains("skipped=2"), "{log}");
    assert!(
        log.contains("pairs.jsonl") && log.contains("line=3") && log.contains("`chosen` is empty"),
        "{log}"
    );
    assert!(
        log.contains("chosen and rejected completions are the same"),
        "{log}"
    );
}
