//! Setup: join the ranks, load the model, tokenizer and data, open the run's checkpoints.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use serde_json::json;
use tch::{Device, Kind};
use tokio::runtime::Runtime;
use waypoint_checkpoint::{CheckpointManager, ManagerOptions};

use super::batch::{keep_global_batch, previous_global_batch, BatchKeep};
use super::memory::{self, MemoryCheck, MemoryPlan, MemoryPlanError, OtherPlans, PlanInputs};
use super::{Session, UsageError};
use crate::collective::ranks::Ranks;
use crate::model::{Model, ModelConfig};
use waypoint_config::{fingerprint, TrainConfig};
use waypoint_config::{Objective, Sharding};
use waypoint_data::tokenizer::Tokenizer;
use waypoint_data::{list_sources, DataOptions, Dataset, PairStyle};
use waypoint_launch::WorkerEnv;

/// What the run starts from, before anything is written.
pub(super) struct Setup {
    pub env: WorkerEnv,
    pub device: Device,
    pub ranks: Ranks,
    pub loaded: Loaded,
    /// Samples per optimizer step over all ranks.
    pub global_batch: u64,
    pub manager: CheckpointManager,
    /// The memory plan fits with the memory tier's host copies (when it does not, but fits without
    /// them, the tier is off for this start rather than the start refused).
    pub memory_tier_fits: bool,
}

/// What is loaded before training: model, tokenizer, data.
pub(super) struct Loaded {
    pub model: Model,
    pub tokenizer_files: Vec<(String, Bytes)>,
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub model_fingerprint: String,
}

impl Session {
    /// Joins the ranks, loads model and data, sets the total steps, opens the checkpoints.
    pub(super) fn setup(&mut self, rt: &Runtime) -> Result<Setup> {
        let env = WorkerEnv::from_env()?;
        let device =
            crate::run::device::parse_device_for(&self.config.model.device, env.local_rank)
                .map_err(|e| UsageError(format!("{e:#}")))?;
        self.main = env.rank == 0;
        let ranks = Ranks::join(
            &env,
            Duration::from_secs(self.config.distributed.dist_timeout_secs),
            device,
        )?;
        let manager = CheckpointManager::new(
            self.store.clone(),
            self.layout.clone(),
            ManagerOptions {
                keep_last: self.config.checkpoint().keep_last,
                ..ManagerOptions::default()
            },
        );
        self.keep_global_batch(&manager, &ranks, env.world_size, rt)?;
        let cfg = &self.config;
        if cfg.model.num_threads > 0 {
            tch::set_num_threads(cfg.model.num_threads as i32);
        }
        let model_config = model_config(cfg)?;
        let memory_tier_fits = check_memory(cfg, &model_config, &env, device, &ranks)?;
        // With --sharding full, each rank reads only its rows of the weights.
        let shard = (cfg.sharding() == Sharding::Full).then(|| (ranks.rank(), ranks.world()));
        let loaded = rt.block_on(load(cfg, device, shard))?;
        let global_batch = cfg.data.batch_size * cfg.data.gradient_accumulation * env.world_size;
        self.total_steps = if cfg.run.max_steps > 0 {
            cfg.run.max_steps
        } else {
            (cfg.run.num_epochs * loaded.train.len() as u64).div_ceil(global_batch)
        };
        Ok(Setup {
            env,
            device,
            ranks,
            loaded,
            global_batch,
            manager,
            memory_tier_fits,
        })
    }
}

impl Session {
    /// A restart at another world size keeps the run's global batch by its gradient accumulation
    /// ([`keep_global_batch`]), said in the log; refused (exit 2, nothing written) when none does.
    /// Rank 0 reads the run's checkpoints and tells the others.
    fn keep_global_batch(
        &mut self,
        manager: &CheckpointManager,
        ranks: &Ranks,
        world: u64,
        rt: &Runtime,
    ) -> Result<()> {
        let previous = if ranks.is_main() {
            rt.block_on(previous_global_batch(manager))
        } else {
            None
        };
        let said = previous
            .map(|(g, w)| format!("{g} {w}"))
            .unwrap_or_default();
        let said =
            String::from_utf8_lossy(&ranks.broadcast("global-batch", said.as_bytes())?).to_string();
        let Some((previous, previous_world)) = said
            .split_once(' ')
            .and_then(|(g, w)| Some((g.parse::<u64>().ok()?, w.parse::<u64>().ok()?)))
        else {
            return Ok(());
        };
        let data = &mut self.config.data;
        match keep_global_batch(
            previous,
            previous_world,
            data.batch_size,
            data.gradient_accumulation,
            world,
        ) {
            BatchKeep::Same => Ok(()),
            BatchKeep::Accumulate(accumulation) => {
                if ranks.is_main() {
                    tracing::warn!(
                        "world size {previous_world} → {world}: --gradient_accumulation {} → {accumulation} \
                         keeps the run's global batch of {previous} samples per step \
                         (--batch_size {})",
                        data.gradient_accumulation,
                        data.batch_size
                    );
                }
                data.gradient_accumulation = accumulation;
                Ok(())
            }
            BatchKeep::Refuse(why) => Err(UsageError(why).into()),
        }
    }
}

/// The architecture of the model `--model_id` names, read before any weight.
fn model_config(cfg: &TrainConfig) -> Result<ModelConfig> {
    if cfg.model.model_id == "builtin:tiny" {
        return Ok(ModelConfig::tiny());
    }
    let dir = Path::new(&cfg.model.model_id);
    if !dir.join("config.json").is_file() {
        return Err(UsageError(format!(
            "--model_id {}: not a model directory with config.json; pass a local Hugging Face \
             model directory, or builtin:tiny",
            cfg.model.model_id
        ))
        .into());
    }
    ModelConfig::read_hf_dir(dir)
}

/// The node's ranks that split the memory tier's copy, when the tier saves in this start.
fn memory_tier_ranks(cfg: &TrainConfig, env: &WorkerEnv) -> Option<u64> {
    use crate::checkpointing::tier;
    let place = tier::NodePlace::of(env);
    let shards = tier::shards_of(
        place,
        env.world_size as u32,
        cfg.sharding() != Sharding::None,
    );
    tier::off_because(&cfg.checkpoint(), shards, cfg.lora().is_some())
        .is_none()
        .then_some(u64::from(place.local_world))
}

/// Estimates what this rank will hold and, before anything is loaded, refuses a plan that exceeds
/// the memory available (all ranks refuse together when any does), unless `--memory_check warn`.
/// Returns whether the memory tier's host copies fit too: when only they do not, the tier is off
/// for this start (named in the log) and the start goes on.
fn check_memory(
    cfg: &TrainConfig,
    model: &ModelConfig,
    env: &WorkerEnv,
    device: Device,
    ranks: &Ranks,
) -> Result<bool> {
    let lora = cfg
        .lora()
        .map(|l| model.lora_parameter_count(l.rank, &l.targets));
    let inputs = PlanInputs {
        lora_parameters: lora,
        // A preference micro-batch of `batch_size` pairs runs twice as many sequences.
        micro_batch_tokens: cfg.data.batch_size
            * cfg.data.max_seq_len
            * if cfg.objective().is_preference() {
                2
            } else {
                1
            },
        gradient_accumulation: cfg.data.gradient_accumulation,
        world_size: env.world_size,
        cuda: device.is_cuda(),
        activation_checkpointing: cfg.model.activation_checkpointing,
        sharded_optimizer: cfg.sharding() == Sharding::Optimizer,
        sharded_weights: cfg.sharding() == Sharding::Full,
        memory_tier: memory_tier_ranks(cfg, env),
    };
    let plan = MemoryPlan::estimate(model, &inputs);
    // Every rank's plan, in figures a program reads (the run's peak is logged beside it at the end).
    let mb = |b: u64| b >> 20;
    tracing::info!(
        rank = env.rank,
        plan_mb = mb(plan.total()),
        parameters_mb = mb(plan.parameters),
        gradients_mb = mb(plan.gradients),
        optimizer_mb = mb(plan.optimizer),
        activations_mb = mb(plan.activations),
        weight_copies_mb = mb(plan.compute_copies),
        checkpoint_copy_mb = mb(plan.checkpoint_copy),
        step_buffers_mb = mb(plan.step_buffers),
        runtime_mb = mb(plan.runtime),
        "memory plan of this rank"
    );
    let with_checkpointing = (!cfg.model.activation_checkpointing)
        .then(|| {
            MemoryPlan::estimate(
                model,
                &PlanInputs {
                    activation_checkpointing: true,
                    ..inputs.clone()
                },
            )
        })
        .filter(|ac| ac.activations < plan.activations);
    let without_memory_tier = inputs.memory_tier.map(|_| {
        MemoryPlan::estimate(
            model,
            &PlanInputs {
                memory_tier: None,
                ..inputs.clone()
            },
        )
    });
    let other = OtherPlans {
        with_checkpointing,
        without_memory_tier: without_memory_tier.filter(|w| w.total() < plan.total()),
    };
    let (verdict, tier_fits_here) = match memory::available(device, env.local_world_size) {
        Some((bytes, source)) => {
            memory::judge_with_tier(&plan, bytes, &source, &other, inputs.micro_batch_tokens)
        }
        None => (
            Ok(format!(
                "memory plan: {plan} (the memory available could not be read)"
            )),
            true,
        ),
    };
    // Without the memory tier's host copies the plan fits: the tier is off for this start (every
    // rank alike), not the start refused.
    let tier_fits = !ranks.any("memory plan without the tier", !tier_fits_here)?;
    if !tier_fits_here {
        tracing::warn!(
            "the memory tier is off for this start: with its host copies the memory plan does not \
             fit ({plan} per rank), without them it does. Free memory, or set \
             --memory_save_steps 0 to silence this"
        );
    }
    let refuse = cfg.memory_check() == MemoryCheck::Refuse;
    let too_big = match &verdict {
        Ok(line) => {
            if env.rank == 0 {
                tracing::info!("{line}");
            }
            false
        }
        Err(why) if !refuse => {
            tracing::warn!("{why}; starting anyway (--memory_check warn)");
            false
        }
        Err(_) => true,
    };
    if ranks.any("memory plan", too_big)? {
        let why = verdict
            .err()
            .unwrap_or_else(|| "another rank's memory plan does not fit (see its log)".into());
        return Err(MemoryPlanError(why).into());
    }
    Ok(tier_fits)
}

/// Loads the model (with `shard` = (rank, world), that rank's rows of its weights), tokenizer and
/// data that `cfg` names.
async fn load(cfg: &TrainConfig, device: Device, shard: Option<(u32, u32)>) -> Result<Loaded> {
    let (model, tokenizer, tokenizer_files, model_fingerprint) = if cfg.model.model_id
        == "builtin:tiny"
    {
        let config = ModelConfig::tiny();
        let fp =
            fingerprint(&json!({"builtin": "tiny", "config": config.raw, "seed": cfg.run.seed}));
        (
            Model::init(config, cfg.run.seed as i64, device)?,
            Tokenizer::Bytes,
            waypoint_data::tokenizer::byte_tokenizer_files()?,
            fp,
        )
    } else {
        let dir = Path::new(&cfg.model.model_id);
        // A LoRA run's frozen base is read straight into the dtype it is held in.
        let hold = if cfg.lora().is_some() {
            crate::model::lora::frozen_base_kind(device)
        } else {
            Kind::Float
        };
        let (model, weights_sha) = Model::load_hf_dir(dir, device, shard, hold)?;
        let tokenizer = Tokenizer::from_hf_dir(dir, &model.config.raw)?;
        let mut files = Vec::new();
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "vocab.json",
            "merges.txt",
        ] {
            let p = dir.join(name);
            if p.is_file() {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                files.push((name.to_string(), Bytes::from(bytes)));
            }
        }
        let fp = fingerprint(&json!({"config": model.config.raw, "weights_sha256": weights_sha}));
        (model, tokenizer, files, fp)
    };
    let opts = DataOptions {
        text_field: cfg.data.dataset_text_field.clone(),
        max_seq_len: cfg.data.max_seq_len as usize,
        packing: !cfg.data.disable_packing,
        pairs: match cfg.objective() {
            Objective::Sft => None,
            Objective::Dpo { .. } => Some(PairStyle::Dpo),
            Objective::Orpo { .. } => Some(PairStyle::Orpo),
        },
        skip_bad_lines: cfg.data.skip_bad_lines,
        cache_dir: if cfg.data.data_cache_dir.is_empty() {
            waypoint_data::default_cache_dir()
        } else {
            cfg.data.data_cache_dir.clone().into()
        },
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if tokenizer.uses_builtin_chat_layout() {
        tracing::info!(
            "the tokenizer has no chat_template: chat rows (if any) use waypoint's built-in layout"
        );
    }
    let load_data = |flag: &'static str, uri: String| {
        let (tokenizer, opts) = (&tokenizer, &opts);
        async move {
            let sources = list_sources(&uri)
                .await
                .with_context(|| format!("--{flag} {uri}"))?;
            // Tokenizing (or waiting for the process that does) blocks this thread, the one that
            // drives `load`, not a runtime worker: remote reads still make progress.
            Dataset::load(&sources, tokenizer, opts, tokio::runtime::Handle::current())
                .with_context(|| format!("--{flag} {uri}"))
        }
    };
    let train = load_data("dataset_uri", cfg.data.dataset_uri.clone()).await?;
    let eval = if cfg.data.eval_dataset_uri.is_empty() {
        None
    } else {
        Some(load_data("eval_dataset_uri", cfg.data.eval_dataset_uri.clone()).await?)
    };
    let vocab = model.config.vocab_size;
    for (name, d) in [("train", Some(&train)), ("eval", eval.as_ref())] {
        if let Some(d) = d {
            ensure!(
                d.max_token() < vocab,
                "the {name} data has token id {} but the model's vocabulary has {vocab} entries; \
                 is the tokenizer the model's?",
                d.max_token()
            );
        }
    }
    if train.is_pairs() && train.truncated > 0 {
        tracing::warn!(
            "{} of {} pairs are longer than --max_seq_len {}: their completions were cut to fit",
            train.truncated,
            train.len(),
            cfg.data.max_seq_len
        );
    }
    tracing::info!(
        samples = train.len(),
        pairs = train.is_pairs(),
        documents = train.documents,
        skipped = train.skipped,
        truncated = train.truncated,
        cache = %train.cache_path.display(),
        cache_hit = !train.built_cache,
        "dataset ready"
    );
    Ok(Loaded {
        model,
        tokenizer_files,
        train,
        eval,
        model_fingerprint,
    })
}
