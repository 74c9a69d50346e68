//! `waypoint train`: the training loop, with checkpoints in it.
//!
//! One start of the trainer: open the run, find its newest resumable checkpoint (or
//! `init_from_checkpoint`), check that the configuration has not drifted, take an attempt number, and
//! train from the restored step, data position and optimizer state. Periodic saves are resumable;
//! the final save is resumable and promotable (see [`crate::saving`]). With several ranks, each takes
//! its slice of every global batch and gradients are summed ([`crate::ranks`]). On SIGTERM/SIGINT
//! the current step finishes (on every rank), a resumable checkpoint is saved, and the process exits
//! so that a restart redoes no step.
//!
//! Exactness: dropout (LoRA's) draws from libtorch's generator reseeded from (seed, step) at every
//! step, the data order is a pure function of (seed, epoch), and the learning rate a pure function of
//! the step — so restoring weights, optimizer state and counters restores everything.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tokio::runtime::Runtime;
use waypoint_checkpoint::{
    dcp, CheckpointManager, ManagerOptions, Promotion, Skipped, Tensor as Blob,
};
use waypoint_storage::Store;
use waypoint_checkpoint::{model_dir, RunLayout};

use crate::config::{fingerprint, TrainConfig};
use crate::convert::from_blob;
use crate::data::{read_sources, DataOptions, Dataset, IGNORE};
use crate::model::{LoraConfig, Model, ModelConfig};
use crate::optim::{clip_grad_norm, gradients, AdamW, AdamWConfig, Schedule, ScheduleKind};
use crate::ranks::Ranks;
use crate::records::{self, JobState, Status};
use crate::saving::{SaveContext, Saver};
use crate::tokenizer::Tokenizer;
use crate::torchrun::WorkerEnv;

/// A configuration problem found before any work: the command exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// How a run ended without error.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done and the final checkpoint committed.
    Finished {
        /// Steps done.
        steps: u64,
        /// Loss of the last step this process ran (NaN if it ran none).
        last_loss: f64,
        /// The final checkpoint.
        checkpoint: String,
        /// Where the model was promoted to, if it was.
        model: Option<String>,
    },
    /// Stopped by a signal after committing a resumable checkpoint.
    Stopped {
        /// The signal number.
        signal: usize,
        /// Steps done (and saved).
        step: u64,
    },
}

/// Runs `waypoint train`. `stop` holds a signal number once SIGTERM/SIGINT arrived (0 before).
pub fn run(config: TrainConfig, stop: Arc<AtomicUsize>, rt: &Runtime) -> Result<Outcome> {
    let store = Store::open(&config.checkpoint_base_uri)
        .map_err(|e| UsageError(format!("--checkpoint_base_uri: {e}")))?;
    let layout = RunLayout::new(&config.run_id, &config.framework)
        .map_err(|e| UsageError(format!("--run_id/--framework: {e}")))?;
    let mut session = Session {
        config,
        store,
        layout,
        attempt: None,
        total_steps: 0,
        step: 0,
        last_checkpoint: None,
        main: true,
    };
    match session.train(&stop, rt) {
        Ok(outcome) => Ok(outcome),
        Err(e) => {
            // A usage or configuration error writes nothing (a finished run stays FINISHED);
            // anything else is the run's failure, recorded for the control plane.
            if e.downcast_ref::<UsageError>().is_none() && session.main {
                let mut status = Status::new(JobState::Failed, session.step, session.total_steps);
                status.error = Some(records::explain(&e));
                status.attempt = session.attempt;
                status.checkpoint = session.last_checkpoint.clone();
                if let Err(w) = rt.block_on(records::write_status(
                    &session.store,
                    &session.layout,
                    &status,
                )) {
                    tracing::warn!("could not record the failure in status.json: {w:#}");
                }
            }
            Err(e)
        }
    }
}

struct Session {
    config: TrainConfig,
    store: Store,
    layout: RunLayout,
    attempt: Option<u64>,
    total_steps: u64,
    step: u64,
    last_checkpoint: Option<String>,
    /// Rank 0 (or the only worker): it writes the run records.
    main: bool,
}

/// What is loaded before training: model, tokenizer, data.
struct Loaded {
    model: Model,
    tokenizer_files: Vec<(String, Bytes)>,
    train: Dataset,
    eval: Option<Dataset>,
    model_fingerprint: String,
}

impl Session {
    fn train(&mut self, stop: &AtomicUsize, rt: &Runtime) -> Result<Outcome> {
        let cfg = self.config.clone();
        let env = WorkerEnv::from_env()?;
        let device = crate::device::parse_device_for(&cfg.device, env.local_rank)
            .map_err(|e| UsageError(format!("{e:#}")))?;
        self.main = env.rank == 0;
        let mut ranks = Ranks::join(&env, Duration::from_secs(cfg.dist_timeout_secs), device)?;
        let (main, rank, world) = (ranks.is_main(), ranks.rank() as u64, ranks.world() as u64);
        if cfg.num_threads > 0 {
            tch::set_num_threads(cfg.num_threads as i32);
        }
        let loaded = rt.block_on(load(&cfg, device))?;
        let Loaded {
            mut model,
            tokenizer_files,
            train,
            eval,
            model_fingerprint,
        } = loaded;
        let resume_fields = cfg.resume_fields(&model_fingerprint);
        let config_fp = fingerprint(&resume_fields);
        let global_batch = cfg.batch_size * cfg.gradient_accumulation * env.world_size;
        self.total_steps = if cfg.max_steps > 0 {
            cfg.max_steps
        } else {
            (cfg.num_epochs * train.len() as u64).div_ceil(global_batch)
        };
        let total = self.total_steps;

        let mut manager = CheckpointManager::new(
            self.store.clone(),
            self.layout.clone(),
            ManagerOptions {
                keep_last: (cfg.keep_last > 0).then_some(cfg.keep_last as usize),
                ..ManagerOptions::default()
            },
        );
        // Rank 0 picks the checkpoint to resume from (sizes checked); every rank loads it, checking
        // each blob's sha256 as it is read. A checkpoint any rank finds damaged is passed over (and
        // set aside once this attempt owns the run) and the next older one tried.
        let mut damaged: Vec<Skipped> = Vec::new();
        let mut passed_over = Vec::new();
        let (latest, mut resume_blobs) = loop {
            let mut pick = None;
            if main {
                let (found, skipped) =
                    rt.block_on(manager.resume_candidate(false, &passed_over))
                        .context("looking for the run's newest resumable checkpoint")?;
                damaged.extend(skipped);
                pick = found;
            }
            let chosen = pick.as_ref().map(|m| m.name.clone()).unwrap_or_default();
            let chosen =
                String::from_utf8_lossy(&ranks.broadcast("resume-from", chosen.as_bytes())?)
                    .to_string();
            if chosen.is_empty() {
                break (None, Vec::new());
            }
            let step: waypoint_checkpoint::StepName = chosen.parse()?;
            let m = match pick {
                Some(m) => m,
                None => rt.block_on(manager.manifest(step))?,
            };
            let (blobs, problem) = match rt.block_on(manager.load_tensors(&m, "dcp/", &|_| true)) {
                Ok(blobs) => (blobs, None),
                Err(e) if e.is_damage() => (Vec::new(), Some(e.to_string())),
                Err(e) => return Err(e).context(format!("loading checkpoint {chosen}")),
            };
            if !ranks.any(&format!("resume-damaged/{chosen}"), problem.is_some())? {
                break (Some(m), blobs);
            }
            tracing::warn!(checkpoint = %chosen, "passing over a damaged checkpoint: {}",
                problem.as_deref().unwrap_or("another rank found it damaged"));
            damaged.push(Skipped {
                step,
                reason: problem.unwrap_or_else(|| "another rank found it damaged".into()),
            });
            passed_over.push(step);
        };
        if let Some(m) = &latest {
            if m.config_fingerprint != config_fp {
                let drift = rt.block_on(describe_drift(
                    &self.store,
                    &self.layout,
                    &serde_json::to_value(&resume_fields)?,
                ));
                return Err(UsageError(format!(
                    "configuration drift: run {} has checkpoints up to {} made with other settings \
                     ({drift}). Resuming would not continue that run. Restore the settings, or start \
                     a new --run_id. Nothing was written.",
                    cfg.run_id, m.name
                ))
                .into());
            }
        }
        if !cfg.output_model_id.is_empty() {
            let dir = model_dir(&cfg.output_model_id)
                .map_err(|e| UsageError(format!("--output_model_id: {e}")))?;
            // A finished promotion of another source, or files that are not a promotion, are never
            // overwritten; this run's own promotion (done, or interrupted) is finished at the end.
            let final_name = waypoint_checkpoint::StepName::new(total).to_string();
            let refuse = match rt.block_on(manager.promotion(&cfg.output_model_id))? {
                Promotion::Absent | Promotion::Partial(_) => false,
                done => !done.is_done_from(&self.layout, &final_name),
            };
            if refuse {
                return Err(UsageError(format!(
                    "--output_model_id {}: {dir} already exists; choose another id (nothing is \
                     overwritten)",
                    cfg.output_model_id
                ))
                .into());
            }
        }

        // The starting weights, before anything is written (a bad LoRA setting is a usage error):
        // own checkpoint first (restored below); else init_from_checkpoint; else fresh.
        if latest.is_some() {
            if !cfg.init_from_checkpoint.is_empty() {
                tracing::info!(
                    init_from_checkpoint = %cfg.init_from_checkpoint,
                    "ignoring --init_from_checkpoint: the run has checkpoints of its own"
                );
            }
        } else if !cfg.init_from_checkpoint.is_empty() {
            rt.block_on(init_from(&manager, &cfg.init_from_checkpoint, &mut model))?;
        }
        if cfg.lora_rank > 0 {
            model
                .add_lora(
                    LoraConfig {
                        rank: cfg.lora_rank as i64,
                        alpha: cfg.lora_alpha,
                        dropout: cfg.lora_dropout,
                        targets: cfg
                            .lora_target_modules
                            .split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    },
                    cfg.seed as i64 + 1,
                )
                .map_err(|e| UsageError(format!("--lora_rank/--lora_target_modules: {e:#}")))?;
        }
        // From here on the run is ours: rank 0 takes an attempt number (fencing), records the start.
        let attempt = if main {
            rt.block_on(manager.start_attempt(&json!({
                "pid": std::process::id(),
                "host": std::env::var("HOSTNAME").unwrap_or_default(),
                "restart_count": env.restart_count,
                "world_size": world,
            })))?
        } else {
            0
        };
        self.attempt = Some(attempt);
        // Damaged checkpoints newer than the one resumed are set aside, so the steps they held can
        // be saved again as training goes past them.
        for skipped in damaged.iter().filter(|_| main) {
            rt.block_on(manager.set_aside(skipped.step, &skipped.reason))
                .with_context(|| {
                    format!("setting the damaged checkpoint {} aside", skipped.step)
                })?;
        }
        let manager = Arc::new(manager);
        let run_record = json!({
            "config": cfg.redacted(),
            "resume_fields": resume_fields,
            "config_fingerprint": config_fp,
            "model": model.config.raw,
            "world_size": env.world_size,
            "device": format!("{device:?}"),
            "attempt": attempt,
            "train_samples": train.len(),
            "train_documents": train.documents,
            "skipped_rows": train.skipped,
            "total_steps": total,
            "started_unix_ms": records::now_ms(),
        });
        let mut status = Status::new(JobState::Pending, 0, total);
        status.attempt = Some(attempt);
        if main {
            rt.block_on(self.store.put(
                &self.layout.run_config(),
                Bytes::from(serde_json::to_vec_pretty(&run_record)?),
            ))
            .context("writing config/run.json")?;
            rt.block_on(records::write_status(&self.store, &self.layout, &status))?;
        }

        let mut data_consumed = 0u64;
        let mut opt = AdamW::new(
            AdamWConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
            model.trainable(),
        );
        if let Some(m) = &latest {
            restore_state(&m.name, std::mem::take(&mut resume_blobs), &model, &mut opt)?;
            let pos = rt.block_on(manager.data_position(m))?;
            let remaining = (total.saturating_sub(m.step)).saturating_add(1);
            ensure!(
                pos.data_consumed / train.len().max(1) as u64 == pos.epoch
                    && remaining
                        .checked_mul(global_batch)
                        .and_then(|n| n.checked_add(pos.data_consumed))
                        .is_some(),
                "checkpoint {} records data_consumed {} and epoch {}, which do not fit this \
                 dataset of {} samples; it was not written by this run's settings",
                m.name,
                pos.data_consumed,
                pos.epoch,
                train.len()
            );
            self.step = m.step;
            data_consumed = pos.data_consumed;
            self.last_checkpoint = Some(m.name.clone());
            tracing::info!(checkpoint = %m.name, step = m.step, data_consumed, "resumed");
        }
        let mut metrics = if main {
            rt.block_on(records::metrics_until(&self.store, &self.layout, self.step))?
        } else {
            String::new()
        };

        let schedule = Schedule {
            lr: cfg.lr,
            warmup_steps: cfg.warmup_steps,
            total_steps: total,
            kind: ScheduleKind::parse(&cfg.lr_scheduler)?,
            min_lr_ratio: cfg.min_lr_ratio,
        };
        let mut saver = Saver::new(
            manager.clone(),
            &ranks,
            rt.handle().clone(),
            Bytes::from(serde_json::to_vec_pretty(&run_record)?),
        )?;
        let ctx = SaveContext {
            fingerprint: config_fp.clone(),
            sampler_kind: match cfg.sampler_dtype.as_str() {
                "fp32" => Kind::Float,
                "fp16" => Kind::Half,
                _ => Kind::BFloat16,
            },
            sampler_dtype_name: match cfg.sampler_dtype.as_str() {
                "fp32" => "float32",
                "fp16" => "float16",
                _ => "bfloat16",
            },
            tokenizer_files,
            model_id: cfg.model_id.clone(),
            n_samples: train.len() as u64,
        };
        status.state = JobState::Running;
        status.step = self.step;
        status.checkpoint = self.last_checkpoint.clone();
        if main {
            rt.block_on(records::write_status(&self.store, &self.layout, &status))?;
        }

        let progress = Progress::new(total, self.step, cfg.logging_steps, main);
        let bs = cfg.batch_size as usize;
        let mut last_loss = f64::NAN;
        let mut save_stall: Option<f64> = None;
        while self.step < total {
            let signal = stop.load(Ordering::SeqCst);
            saver.check()?;
            if saver.committed.is_some() {
                self.last_checkpoint = saver.committed.clone();
            }
            let started = Instant::now();
            let params = model.trainable();
            tch::manual_seed(step_seed(cfg.seed, self.step));
            // Rank r takes the r-th slice of each micro-batch of the global batch.
            let micro: Vec<(Tensor, Tensor)> = (0..cfg.gradient_accumulation)
                .map(|a| {
                    let start = data_consumed + (a * world + rank) * cfg.batch_size;
                    train.batch(cfg.seed, start, bs, device)
                })
                .collect();
            let tokens: i64 = micro
                .iter()
                .map(|(_, l)| l.ne(IGNORE).sum(Kind::Int64).int64_value(&[]))
                .sum();
            // All ranks stop after the same step, whichever of them got the signal.
            let (tokens, stop_now) = ranks.agree(tokens, signal != 0)?;
            if stop_now {
                let signal = if signal != 0 { signal } else { 15 };
                return self.stop_for_signal(
                    signal,
                    &ranks,
                    &mut saver,
                    &model,
                    &opt,
                    &ctx,
                    data_consumed,
                    &metrics,
                    rt,
                );
            }
            let mut loss_value = 0.0;
            let mut grads: Option<Vec<Tensor>> = None;
            for (ids, labels) in &micro {
                let loss = summed_loss(&model, ids, labels, true) / tokens.max(1) as f64;
                grads = Some(gradients(&loss, params, grads.take()));
                loss_value += loss.double_value(&[]);
            }
            let mut grads = grads.context("no micro-batch ran")?;
            ranks.all_reduce(&mut grads, &mut loss_value)?;
            let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
            let lr = schedule.lr_at(self.step);
            // The copy of the previous step's state must end before the weights change.
            if let Some(blocked) = saver.before_update()? {
                *save_stall.get_or_insert(0.0) += blocked;
            }
            opt.step(params, &grads, lr);
            drop(grads);
            ensure!(
                loss_value.is_finite(),
                "loss became {loss_value} at step {}; lower --lr or check the data",
                self.step + 1
            );
            self.step += 1;
            data_consumed += global_batch;
            last_loss = loss_value;
            let secs = started.elapsed().as_secs_f64();
            let mut line = json!({
                "step": self.step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "tokens_per_s": (global_batch * cfg.max_seq_len) as f64 / secs.max(1e-9),
                "data_consumed": data_consumed,
                "epoch": data_consumed / ctx.n_samples,
                "time_unix_ms": records::now_ms(),
            });
            if let Some(stall) = save_stall.take() {
                // Time the loop spent blocked by the save started after the previous step.
                line["save_stall_s"] = json!(stall);
            }
            if let Some(eval) = &eval {
                if cfg.eval_steps > 0 && self.step % cfg.eval_steps == 0 {
                    let eval_loss = evaluate(&model, eval, bs, device);
                    line["eval_loss"] = json!(eval_loss);
                    tracing::info!(step = self.step, eval_loss, "eval");
                }
            }
            metrics.push_str(&line.to_string());
            metrics.push('\n');
            progress.step(self.step, loss_value, lr);

            let periodic = cfg.save_steps > 0 && self.step % cfg.save_steps == 0;
            if periodic && self.step < total {
                let blocked = Instant::now();
                saver.save(
                    &model,
                    &opt,
                    &ctx,
                    ctx.commit(self.step, data_consumed, ranks.world()),
                    false,
                    self.status_for(attempt),
                    metrics.clone(),
                    !cfg.sync_save,
                )?;
                save_stall = Some(blocked.elapsed().as_secs_f64());
            }
        }
        progress.finish();

        // The final save: resumable and promotable. Already there when a finished run is restarted.
        let final_name = waypoint_checkpoint::StepName::new(total).to_string();
        if latest.as_ref().is_none_or(|m| m.step < total) {
            saver.wait()?;
            saver.save(
                &model,
                &opt,
                &ctx,
                ctx.commit(total, data_consumed, ranks.world()),
                true,
                self.status_for(attempt),
                metrics.clone(),
                false,
            )?;
        }
        saver.wait()?;
        self.last_checkpoint = Some(final_name.clone());
        let mut promoted = None;
        if !main {
            return Ok(Outcome::Finished {
                steps: total,
                last_loss,
                checkpoint: final_name,
                model: None,
            });
        }
        if !cfg.output_model_id.is_empty() {
            // A finished promotion of this checkpoint (a restart of a finished run) is left as it
            // is; an interrupted one is finished by promote.
            let final_step = waypoint_checkpoint::StepName::new(total);
            let done = rt
                .block_on(manager.promotion(&cfg.output_model_id))?
                .is_done_from(&self.layout, &final_name);
            let at = if done {
                model_dir(&cfg.output_model_id)?
            } else {
                let at = rt.block_on(manager.promote(final_step, &cfg.output_model_id))?;
                tracing::info!(model = %at, "promoted the final checkpoint");
                at
            };
            promoted = Some(at);
        }
        let mut status = self.status_for(attempt);
        status.state = JobState::Finished;
        rt.block_on(records::write_status(&self.store, &self.layout, &status))?;
        Ok(Outcome::Finished {
            steps: total,
            last_loss,
            checkpoint: final_name,
            model: promoted,
        })
    }

    fn status_for(&self, attempt: u64) -> Status {
        let mut s = Status::new(JobState::Running, self.step, self.total_steps);
        s.attempt = Some(attempt);
        s.checkpoint = self.last_checkpoint.clone();
        s
    }

    #[allow(clippy::too_many_arguments)]
    fn stop_for_signal(
        &mut self,
        signal: usize,
        ranks: &Ranks,
        saver: &mut Saver,
        model: &Model,
        opt: &AdamW,
        ctx: &SaveContext,
        data_consumed: u64,
        metrics: &str,
        rt: &Runtime,
    ) -> Result<Outcome> {
        let attempt = self.attempt.unwrap_or(0);
        tracing::warn!(
            signal,
            step = self.step,
            "stop requested; saving the current step"
        );
        saver.wait()?;
        if saver.committed.is_some() {
            self.last_checkpoint = saver.committed.clone();
        }
        if self.last_checkpoint.as_deref()
            != Some(&waypoint_checkpoint::StepName::new(self.step).to_string())
            && self.step > 0
        {
            saver.save(
                model,
                opt,
                ctx,
                ctx.commit(self.step, data_consumed, ranks.world()),
                false,
                self.status_for(attempt),
                metrics.to_string(),
                false,
            )?;
            self.last_checkpoint = Some(waypoint_checkpoint::StepName::new(self.step).to_string());
        }
        if !ranks.is_main() {
            return Ok(Outcome::Stopped {
                signal,
                step: self.step,
            });
        }
        let mut status = self.status_for(attempt);
        status.state = JobState::Cancelled;
        status.error = Some(format!(
            "stopped by signal {signal} after step {}; a restart resumes from {}",
            self.step,
            self.last_checkpoint.as_deref().unwrap_or("the start")
        ));
        rt.block_on(records::write_status(&self.store, &self.layout, &status))?;
        Ok(Outcome::Stopped {
            signal,
            step: self.step,
        })
    }
}

/// The seed of libtorch's generator at optimizer step `step`.
fn step_seed(seed: u64, step: u64) -> i64 {
    (seed.wrapping_mul(1_000_003).wrapping_add(step) & 0x7FFF_FFFF_FFFF_FFFF) as i64
}

/// Loads the model, tokenizer and data that `cfg` names.
async fn load(cfg: &TrainConfig, device: Device) -> Result<Loaded> {
    let (model, tokenizer, tokenizer_files, model_fingerprint) = if cfg.model_id == "builtin:tiny" {
        let config = ModelConfig::tiny();
        let fp = fingerprint(&json!({"builtin": "tiny", "config": config.raw, "seed": cfg.seed}));
        (
            Model::init(config, cfg.seed as i64, device)?,
            Tokenizer::Bytes,
            crate::tokenizer::byte_tokenizer_files()?,
            fp,
        )
    } else {
        let dir = Path::new(&cfg.model_id);
        if !dir.join("config.json").is_file() {
            return Err(UsageError(format!(
                "--model_id {}: not a model directory with config.json; pass a local Hugging Face \
                 model directory, or builtin:tiny",
                cfg.model_id
            ))
            .into());
        }
        let (model, weights_sha) = Model::load_hf_dir(dir, device)?;
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
        text_field: cfg.dataset_text_field.clone(),
        max_seq_len: cfg.max_seq_len as usize,
        packing: !cfg.disable_packing,
        skip_bad_lines: cfg.skip_bad_lines,
    };
    let sources = read_sources(&cfg.dataset_uri)
        .await
        .with_context(|| format!("--dataset_uri {}", cfg.dataset_uri))?;
    let train = Dataset::build(&sources, &tokenizer, &opts)
        .with_context(|| format!("--dataset_uri {}", cfg.dataset_uri))?;
    let eval = if cfg.eval_dataset_uri.is_empty() {
        None
    } else {
        let sources = read_sources(&cfg.eval_dataset_uri)
            .await
            .with_context(|| format!("--eval_dataset_uri {}", cfg.eval_dataset_uri))?;
        Some(
            Dataset::build(&sources, &tokenizer, &opts)
                .with_context(|| format!("--eval_dataset_uri {}", cfg.eval_dataset_uri))?,
        )
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
    tracing::info!(
        samples = train.len(),
        documents = train.documents,
        skipped = train.skipped,
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

/// Loads another run's weights (`run_id:step-N`) into the base model.
async fn init_from(manager: &CheckpointManager, spec: &str, model: &mut Model) -> Result<()> {
    let (run, step) = waypoint_checkpoint::parse_checkpoint_ref(spec)?;
    let other = manager.other_run(&run)?;
    let m = other
        .manifest(step)
        .await
        .with_context(|| format!("--init_from_checkpoint {spec}"))?;
    let blobs: Vec<Blob> = if m.dcp_files().next().is_some() {
        other
            .load_tensors(&m, "dcp/", &|n| n.starts_with("model."))
            .await?
            .into_iter()
            .map(|mut b| {
                b.name = b.name["model.".len()..].to_string();
                b
            })
            .collect()
    } else {
        other.sampler_tensors(&m).await?
    };
    let blobs = assemble_slices(blobs)?;
    if blobs.keys().any(|n| n.contains(".lora_")) {
        bail!("--init_from_checkpoint {spec}: a LoRA checkpoint holds adapters, not full weights");
    }
    tch::no_grad(|| -> Result<()> {
        for p in model.base() {
            let b = blobs.get(&p.name).with_context(|| {
                format!(
                    "--init_from_checkpoint {spec}: weight {} is missing",
                    p.name
                )
            })?;
            copy_into(&p.tensor, b, spec)?;
        }
        Ok(())
    })?;
    tracing::info!(
        from = spec,
        "initialised the weights from another run's checkpoint"
    );
    Ok(())
}

/// Joins DCP slices (from multi-rank saves) into whole tensors, by name.
fn assemble_slices(blobs: Vec<Blob>) -> Result<HashMap<String, Blob>> {
    let mut groups: HashMap<String, Vec<Blob>> = HashMap::new();
    for b in blobs {
        groups.entry(b.name.clone()).or_default().push(b);
    }
    groups
        .into_iter()
        .map(|(name, parts)| {
            let whole = if parts.len() == 1 && parts[0].offsets.is_none() {
                parts.into_iter().next().context("one part")?
            } else {
                dcp::assemble(parts)?
            };
            Ok((name, whole))
        })
        .collect()
}

/// Copies a saved tensor into a live one (shape checked), converting dtype and device.
fn copy_into(dst: &Tensor, src: &Blob, checkpoint: &str) -> Result<()> {
    let t = from_blob(src)?;
    ensure!(
        t.size() == dst.size(),
        "{checkpoint}: tensor {} has shape {:?}, the model expects {:?}",
        src.name,
        t.size(),
        dst.size()
    );
    let mut d = dst.shallow_clone();
    tch::no_grad(|| d.copy_(&t.to_kind(dst.kind()).to_device(dst.device())));
    Ok(())
}

/// Restores trainable weights and optimizer state from a checkpoint's `dcp/` tensors.
fn restore_state(checkpoint: &str, blobs: Vec<Blob>, model: &Model, opt: &mut AdamW) -> Result<()> {
    let blobs = assemble_slices(blobs)?;
    let get = |key: String| {
        blobs.get(&key).with_context(|| {
            format!("{checkpoint} lacks tensor {key}; was it saved with another configuration?")
        })
    };
    for (p, s) in model.trainable().iter().zip(&mut opt.state) {
        copy_into(&p.tensor, get(dcp::model_key(&p.name))?, checkpoint)?;
        copy_into(
            &s.exp_avg,
            get(dcp::optim_key(&p.name, "exp_avg"))?,
            checkpoint,
        )?;
        copy_into(
            &s.exp_avg_sq,
            get(dcp::optim_key(&p.name, "exp_avg_sq"))?,
            checkpoint,
        )?;
        copy_into(&s.step, get(dcp::optim_key(&p.name, "step"))?, checkpoint)?;
    }
    Ok(())
}

/// Cross-entropy summed over the tokens whose label is not [`IGNORE`] (fp32).
fn summed_loss(model: &Model, ids: &Tensor, labels: &Tensor, train: bool) -> Tensor {
    model
        .forward(ids, train)
        .view([-1, model.config.vocab_size])
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(&labels.view([-1]), None, tch::Reduction::Sum, IGNORE, 0.0)
}

/// Mean loss over the eval data.
fn evaluate(model: &Model, data: &Dataset, batch: usize, device: Device) -> f64 {
    tch::no_grad(|| {
        let (mut sum, mut tokens) = (0.0, 0i64);
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(batch.max(1)) {
            let (ids, labels) = data.rows(chunk, device);
            sum += summed_loss(model, &ids, &labels, false).double_value(&[]);
            tokens += labels.ne(IGNORE).sum(Kind::Int64).int64_value(&[]);
        }
        sum / tokens.max(1) as f64
    })
}

/// Progress: a bar on an interactive terminal, log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    every: u64,
}

impl Progress {
    fn new(total: u64, start: u64, every: u64, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_position(start);
            bar
        });
        Self {
            bar,
            every: if enabled { every.max(1) } else { u64::MAX },
        }
    }

    fn step(&self, step: u64, loss: f64, lr: f64) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.4}  lr {lr:.2e}"));
            }
            None if step % self.every == 0 || (step == 1 && self.every != u64::MAX) => {
                tracing::info!(step, loss, lr, "train")
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Which resume-relevant settings differ from those recorded in `config/run.json`.
async fn describe_drift(store: &Store, layout: &RunLayout, now: &Value) -> String {
    let recorded = match store.get(&layout.run_config()).await {
        Ok(b) => serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let before = &recorded["resume_fields"];
    let Some(now) = now.as_object() else {
        return "unknown".into();
    };
    let diffs: Vec<String> = now
        .iter()
        .filter(|(k, v)| before.get(k.as_str()) != Some(v))
        .map(|(k, v)| match before.get(k.as_str()) {
            Some(b) => format!("{k}: was {b}, now {v}"),
            None => format!("{k}: now {v}"),
        })
        .collect();
    if diffs.is_empty() {
        "the recorded fingerprint differs".into()
    } else {
        diffs.join("; ")
    }
}
