//! The smoke run: a real training loop on libtorch, small enough for any machine.
//!
//! A two-layer MLP learns a fixed random linear map with AdamW; loss must fall. The run records
//! `config/run.json`, `logs/metrics.jsonl` and `status.json` through the storage crate, under the run
//! layout, so the path from trainer to storage is exercised end to end.

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use serde::Serialize;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use waypoint_storage::{RunLayout, Store};

/// Settings of a smoke run.
#[derive(Debug, Clone, Serialize)]
pub struct SmokeConfig {
    /// Where runs live.
    pub checkpoint_base_uri: String,
    /// The run's id.
    pub run_id: String,
    /// The framework segment of the layout.
    pub framework: String,
    /// Optimizer steps.
    pub max_steps: u64,
    /// Learning rate.
    pub lr: f64,
    /// Rows per batch.
    pub batch_size: i64,
    /// Seed of weights and data.
    pub seed: i64,
}

/// What the run ended with.
#[derive(Debug, Clone, Serialize)]
pub struct SmokeOutcome {
    /// Loss at the first step.
    pub first_loss: f64,
    /// Loss at the last step.
    pub last_loss: f64,
    /// Steps done.
    pub steps: u64,
}

/// Runs the smoke training on `device` and records it in the run layout.
pub async fn run(config: &SmokeConfig, device: Device) -> Result<SmokeOutcome> {
    let store = Store::open(&config.checkpoint_base_uri)
        .with_context(|| format!("--checkpoint_base_uri {}", config.checkpoint_base_uri))?;
    let layout = RunLayout::new(&config.run_id, &config.framework)?;
    store
        .put(&layout.run_config(), json(config)?)
        .await
        .context("writing config/run.json")?;
    store
        .put(
            &layout.status(),
            json(&serde_json::json!({"state": "RUNNING", "step": 0}))?,
        )
        .await?;

    tch::manual_seed(config.seed);
    let (d_in, d_hidden, d_out) = (32, 64, 8);
    let target_map = Tensor::randn([d_in, d_out], (Kind::Float, device));
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let model = nn::seq()
        .add(nn::linear(
            &root / "fc1",
            d_in,
            d_hidden,
            Default::default(),
        ))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(
            &root / "fc2",
            d_hidden,
            d_out,
            Default::default(),
        ));
    let mut opt = nn::AdamW::default()
        .build(&vs, config.lr)
        .context("building AdamW")?;

    let mut metrics = String::new();
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in 1..=config.max_steps {
        let x = Tensor::randn([config.batch_size, d_in], (Kind::Float, device));
        let y = x.matmul(&target_map);
        let loss = model.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        opt.backward_step(&loss);
        last_loss = loss.double_value(&[]);
        if step == 1 {
            first_loss = last_loss;
        }
        ensure!(
            last_loss.is_finite(),
            "loss became {last_loss} at step {step}"
        );
        tracing::info!(step, loss = last_loss, "smoke step");
        metrics.push_str(&serde_json::to_string(
            &serde_json::json!({"step": step, "loss": last_loss, "lr": config.lr}),
        )?);
        metrics.push('\n');
    }
    store.put(&layout.metrics(), Bytes::from(metrics)).await?;
    let outcome = SmokeOutcome {
        first_loss,
        last_loss,
        steps: config.max_steps,
    };
    store
        .put(
            &layout.status(),
            json(&serde_json::json!({"state": "FINISHED", "step": config.max_steps}))?,
        )
        .await?;
    Ok(outcome)
}

fn json<T: Serialize>(value: &T) -> Result<Bytes> {
    Ok(Bytes::from(serde_json::to_vec_pretty(value)?))
}
