//! A PyTorch user continues a waypoint checkpoint as their own, with the example of
//! `docs/continue_in_pytorch.py` run as it is: `dcp.load` of the model, AdamW's state, the
//! scheduler's state and the train state; AdamW's parameter group from the manifest's `training`;
//! transformers' schedule; the sample order from the example's Python reference of waypoint's
//! permutation. PyTorch (transformers, torch's AdamW) is the oracle: its steps after the checkpoint
//! must lose what waypoint's lost, within 1e-5.

mod common;

use std::path::Path;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/continue_in_pytorch.py");

/// The example's Python reference of the sample order equals waypoint's, position for position,
/// over sizes around powers of two (where the cycle-walk differs), several epochs, and seeds that
/// use all 64 bits.
#[test]
fn the_python_reference_of_the_sample_order_is_waypoints() {
    let cases: &[(u64, u64, usize)] = &[
        (42, 0, 1),
        (42, 0, 2),
        (42, 1, 3),
        (0, 0, 4),
        (7, 3, 5),
        (42, 0, 255),
        (42, 2, 256),
        (u64::MAX, 1, 257),
        (1 << 63, 5, 1000),
        (123_456_789, u64::MAX, 4097),
    ];
    for &(seed, epoch, n) in cases {
        let out = common::python_script(
            EXAMPLE,
            &[
                "order",
                "--seed",
                &seed.to_string(),
                "--epoch",
                &epoch.to_string(),
                "--n",
                &n.to_string(),
            ],
        );
        let python: Vec<usize> = serde_json::from_str(out.trim()).unwrap();
        let ours: Vec<usize> = (0..n)
            .map(|i| waypoint_data::permuted(seed, epoch, n, i))
            .collect();
        assert_eq!(python, ours, "seed {seed}, epoch {epoch}, n {n}");
        let mut sorted = ours;
        sorted.sort_unstable();
        assert!(sorted.iter().copied().eq(0..n), "not a permutation");
    }
}

/// The losses and learning rates of `logs/metrics.jsonl`, by step.
fn metrics(run: &Path) -> Vec<(u64, f64, f64)> {
    std::fs::read_to_string(run.join("logs/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?, v["lr"].as_f64()?)))
        .collect()
}

/// Two ranks with AdamW's state sharded (so `dcp/` holds slices) train 6 steps with gradient
/// accumulation, warmup and a cosine floor, saving at step 3, crossing into the second epoch; PyTorch
/// continues step 3 for 3 steps in one process.
#[test]
fn pytorch_continues_a_waypoint_checkpoint_step_for_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::root_python_script("hf_models.py", &["make", model.to_str().unwrap(), "llama"]);
    let data = dir.path().join("train.jsonl");
    let rows: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "{{\"text\": \"row {i}: the trainer writes the weights and resumes from the \
                 newest checkpoint\"}}"
            )
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let base = dir.path().join("runs");
    let flags = [
        "--model_id",
        model.to_str().unwrap(),
        "--dataset_uri",
        data.to_str().unwrap(),
        "--max_steps",
        "6",
        "--save_steps",
        "3",
        "--max_seq_len",
        "16",
        "--batch_size",
        "2",
        "--gradient_accumulation",
        "2",
        "--warmup_steps",
        "2",
        "--sharding",
        "optimizer",
        "--seed",
        "7",
    ];
    let mut args = common::runs::launch_args(2, 0);
    args.extend(common::runs::train_args(
        "cpu",
        1,
        &flags,
        "cont",
        base.to_str().unwrap(),
    ));
    let out = common::waypoint().args(&args).output().unwrap();
    common::train_log(&out);
    let run = base.join("cont/framework=waypoint");
    let theirs = metrics(&run);
    assert_eq!(theirs.len(), 6, "{theirs:?}");
    let samples: u64 = {
        let m = common::read_json(run.join("checkpoints/step-000006.json"));
        assert!(
            m["epoch"].as_u64() >= Some(1),
            "the run should cross an epoch: {m}"
        );
        m["data_consumed"].as_u64().unwrap()
    };
    assert_eq!(samples, 6 * 8);

    let out = common::python_script(
        EXAMPLE,
        &[
            "continue",
            "--run",
            run.to_str().unwrap(),
            "--step",
            "3",
            "--model_dir",
            model.to_str().unwrap(),
            "--steps",
            "3",
        ],
    );
    let continued: Vec<(u64, f64, f64)> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["lr"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(continued.len(), 3, "{out}");
    for ((step, loss, lr), (w_step, w_loss, w_lr)) in continued.iter().zip(&theirs[3..]) {
        assert_eq!(step, w_step);
        assert!(
            (loss - w_loss).abs() <= 1e-5,
            "step {step}: PyTorch's loss {loss}, waypoint's {w_loss}"
        );
        assert!(
            (lr - w_lr).abs() <= 1e-12 * w_lr.abs().max(1.0),
            "step {step}: PyTorch's lr {lr}, waypoint's {w_lr}"
        );
    }
    eprintln!("waypoint: {:?}\nPyTorch:  {continued:?}", &theirs[3..]);
}
