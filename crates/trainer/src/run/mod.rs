//! `waypoint train`: one start of the trainer.
//!
//! - [`setup`]: join the ranks, load the model, tokenizer and data, open the run's checkpoints;
//! - [`resume`]: find the newest resumable checkpoint that loads whole (passing over damaged ones),
//!   refuse a drifted configuration, take an attempt number (fencing), write the run records, and
//!   restore weights, optimizer state and data position (or `init_from_checkpoint`, or fresh);
//! - this file: the loop — each step's micro-batches taken from the data and handed to
//!   [`crate::step`] (one optimizer step over the recipe, behind a boundary that turns any libtorch
//!   failure — a CUDA out-of-memory included — into an error), its metrics line, eval, and the saves
//!   [`crate::checkpointing::policy`] asks for;
//! - [`finish`]: the final save (resumable and promotable), promotion, `FINISHED`; or, on
//!   SIGTERM/SIGINT, saving the current step and `CANCELLED`;
//! - [`outputs`]: rank 0's watched outputs (observe's watch) started and closed; [`memory`]: the
//!   memory plan; [`device`]: the device choice.
//!
//! Periodic saves are resumable; the final save is resumable and promotable (see
//! [`crate::checkpointing::saver`]). With several ranks, each takes its slice of every global batch and gradients
//! are summed ([`crate::collective::ranks`]); all ranks stop after the same step on a signal.
//!
//! Exactness: dropout (LoRA's) draws from libtorch's generator reseeded from (seed, step) at every
//! step, the data order is a pure function of (seed, epoch), and the learning rate a pure function of
//! the step — so restoring weights, optimizer state and counters restores everything. Any failure
//! (usage errors aside, which write nothing) ends in `status.json` as `FAILED` and exit code 1.

mod batch;
pub mod device;
mod finish;
pub mod memory;
mod outputs;
mod reference;
mod resume;
mod setup;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use waypoint_checkpoint::RunLayout;
use waypoint_config::TrainConfig;
pub use waypoint_config::UsageError;
use waypoint_observe::progress::Progress;
use waypoint_observe::records::{self, JobState, Status};
use waypoint_observe::saves::OverlapMeter;
use waypoint_observe::watch;
use waypoint_storage::Store;

use crate::checkpointing::policy::{
    sampler_save_due, save_cost_s, save_due, DurableSchedule, SaveDue,
};
use crate::recipe::{MicroBatch, Recipe};
use crate::step::{evaluate, libtorch_boundary, train_step, StepParts, StepSettings};
use reference::ReferenceTable;

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
    let store = Store::open(&config.run.checkpoint_base_uri)
        .map_err(|e| UsageError(format!("--checkpoint_base_uri: {e}")))?;
    let layout = RunLayout::new(&config.run.run_id, &config.run.framework)
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
        resumed_from: None,
        watch: None,
        rank_log: None,
    };
    match session.train(&stop, rt) {
        Ok(outcome) => {
            session.end_watch(None, rt);
            Ok(outcome)
        }
        Err(e) => {
            // A usage or configuration error writes nothing (a finished run stays FINISHED);
            // anything else is the run's failure, recorded for the control plane.
            let failure = e.downcast_ref::<UsageError>().is_none() && session.main;
            if failure {
                let mut status = Status::new(JobState::Failed, session.step, session.total_steps);
                status.error = Some(waypoint_observe::explain(&e));
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
            session.end_watch(failure.then_some(&e), rt);
            Err(e)
        }
    }
}

/// A run ready to step: the live training state and what the loop uses.
struct Live {
    /// The checkpoint section of the configuration, built once.
    checkpoint: waypoint_config::CheckpointSection,
    ranks: crate::collective::ranks::Ranks,
    device: tch::Device,
    /// The objective (`sft`, `dpo`, `orpo`).
    recipe: Box<dyn Recipe>,
    /// A full-parameter DPO run's reference log-probs (see [`reference`]), of the training data
    /// and of the eval data.
    reference: Option<reference::ReferenceTable>,
    eval_reference: Option<reference::ReferenceTable>,
    model: crate::model::Model,
    opt: crate::optim::AdamW,
    train: waypoint_data::Dataset,
    eval: Option<waypoint_data::Dataset>,
    manager: Arc<waypoint_checkpoint::CheckpointManager>,
    saver: crate::checkpointing::saver::Saver,
    /// When the durable saves fall (every N steps, or `--save_steps auto`'s interval).
    durable: DurableSchedule,
    /// The node's memory tier, when this start has one.
    memory: Option<crate::checkpointing::tier::MemoryTier>,
    ctx: crate::checkpointing::state::SaveContext,
    schedule: crate::optim::Schedule,
    /// `logs/metrics.jsonl` so far (rank 0).
    metrics: String,
    /// Samples consumed, globally.
    data_consumed: u64,
    /// Samples per optimizer step over all ranks.
    global_batch: u64,
    attempt: u64,
    /// The step of the checkpoint this start resumed from.
    resumed_step: Option<u64>,
    /// Loss of the last step this process ran (NaN before the first).
    last_loss: f64,
}

impl Drop for Live {
    /// A start that ends early (an error) lets the save in flight finish first, so that its commit
    /// and the `status.json` it writes come before the failure is recorded, never after it. With
    /// several ranks it lets the saves in flight go: a save whose peer died would hold the exit,
    /// and so the job's restart, for the collective timeout (`tests/train_elastic.rs` kills a node
    /// while a save is in flight).
    fn drop(&mut self) {
        if self.ranks.world() > 1 {
            self.saver.abandon();
            if let Some(tier) = &mut self.memory {
                tier.abandon();
            }
            return;
        }
        if let Err(e) = self.saver.finish_inflight() {
            tracing::warn!(
                "the checkpoint in flight did not commit: {}",
                waypoint_observe::explain(&e)
            );
        }
    }
}

/// One start of the trainer: the run it works on and how far it got.
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
    /// The checkpoint this start resumed from, and its tier (recorded in `status.json`).
    resumed_from: Option<records::ResumedFrom>,
    /// Rank 0's `train.log`, TensorBoard events, plot and progress (see [`watch`]).
    watch: Option<Arc<watch::Watch>>,
    /// Another rank's whole log, `logs/ranks/rank-0000N.log` (its stderr has only its warnings).
    rank_log: Option<watch::RankLog>,
}

impl Session {
    /// Setup, resume, the steps with their periodic saves, finish.
    fn train(&mut self, stop: &AtomicUsize, rt: &Runtime) -> Result<Outcome> {
        let setup = self.setup(rt)?;
        let mut run = self.resume(setup, rt)?;
        let total = self.total_steps;
        let progress = Progress::new(total, self.step, self.config.run.logging_steps, self.main);
        let mut save_stall: Option<f64> = None;
        let mut overlap = OverlapMeter::default();
        while self.step < total {
            let signal = stop.load(Ordering::SeqCst);
            run.saver.check()?;
            if run.saver.committed.is_some() {
                self.last_checkpoint = run.saver.committed.clone();
            }
            // The first step of an attempt warms up: it is no measure of a step's time.
            let saving = run.saver.busy();
            let started = Instant::now();
            let Some(mut line) = self.step(&mut run, signal)? else {
                let signal = if signal != 0 { signal } else { 15 };
                return self.stop_for_signal(signal, &mut run, rt);
            };
            if self.step > run.resumed_step.unwrap_or(0) + 1 {
                overlap.step(started.elapsed().as_secs_f64(), saving);
            }
            run.saver.check()?;
            for mut report in run.saver.take_committed() {
                (report.overlap_steps, report.overlap_slowdown) = overlap.take();
                if let Some(step_s) = overlap.clean_mean().filter(|_| self.main) {
                    let cost = save_cost_s(
                        report.stall_s,
                        report.overlap_steps,
                        report.overlap_slowdown,
                        step_s,
                    );
                    run.durable.measured(cost, step_s);
                }
                tracing::info!(checkpoint = %report.checkpoint, "save report: {}", report.describe());
                if let (Some(line), Some(fields)) =
                    (line.as_object_mut(), report.metrics_fields().as_object())
                {
                    line.extend(fields.clone());
                }
            }
            if let Some(stall) = save_stall.take() {
                // Time the loop spent blocked by the save started after the previous step (the
                // step itself may have waited for its copy too).
                let during = line["save_stall_s"].as_f64().unwrap_or(0.0);
                line["save_stall_s"] = json!(stall + during);
            }
            progress.step(
                self.step,
                run.last_loss,
                line["lr"].as_f64().unwrap_or(0.0),
                &line,
            );
            run.metrics.push_str(&line.to_string());
            run.metrics.push('\n');
            if let Some(watch) = &self.watch {
                watch.step(self.step, &line);
            }
            let due = save_due(self.step, run.durable.due(self.step), total, false);
            let sampler = sampler_save_due(self.step, run.checkpoint.sampler_save_steps, total);
            let resumable = due == SaveDue::Periodic;
            // The memory tier's save first: a durable save of the same step drains its host copy
            // (the state leaves the device once). On a sampler save's step it comes after: the
            // sampler save gathers whole weights on the device, before any snapshot of the tier's.
            let tier_copy = match sampler {
                false => self.save_to_memory(&mut run, resumable)?,
                true => None,
            };
            if resumable || sampler {
                let blocked = Instant::now();
                let background = run.checkpoint.background;
                self.save_periodic(&mut run, resumable, sampler, background, tier_copy)?;
                save_stall = Some(blocked.elapsed().as_secs_f64());
            }
            if resumable {
                self.next_durable_interval(&mut run)?;
            }
            if sampler {
                self.save_to_memory(&mut run, false)?;
            }
        }
        progress.finish();
        self.finish(&mut run, rt)
    }
}

impl Session {
    /// After a periodic durable save: the interval to the next one. With `--save_steps auto`, rank
    /// 0's proposal from the measured cost of the saves, agreed by all ranks (each measures its
    /// own), and logged when it changes.
    fn next_durable_interval(&mut self, run: &mut Live) -> Result<()> {
        let mut every = run.durable.proposal();
        if run.durable.is_auto() {
            every = run.ranks.broadcast_u64("durable-interval", every)?;
        }
        let changed = run.durable.saved(self.step, every);
        if let (true, true, Some((cost, step_s)), Some(mtbf_s)) = (
            changed,
            self.main,
            run.durable.measured_costs(),
            run.durable.mtbf_s(),
        ) {
            tracing::info!(
                every,
                save_cost_s = cost,
                step_s,
                "durable saves now every {every} steps (Young/Daly: √(2 × {cost:.4} s a save × \
                 {} h between failures) = {:.4} s, at {step_s:.4} s a step)",
                mtbf_s / 3600.0,
                (2.0 * cost * mtbf_s).sqrt()
            );
        }
        Ok(())
    }

    /// Runs optimizer step `self.step + 1`; returns its metrics line, or `None` when the ranks agreed
    /// to stop before it (a signal reached one of them: `signal` is this rank's, 0 for none).
    fn step(&mut self, run: &mut Live, signal: usize) -> Result<Option<Value>> {
        let step = self.step + 1;
        libtorch_boundary(&format!("training step {step}"), || {
            self.step_unguarded(run, signal)
        })
    }

    fn step_unguarded(&mut self, run: &mut Live, signal: usize) -> Result<Option<Value>> {
        let cfg = &self.config;
        let started = Instant::now();
        let (rank, world) = (run.ranks.rank() as u64, run.ranks.world() as u64);
        let bs = cfg.data.batch_size;
        // Rank r takes the r-th slice of each micro-batch of the global batch.
        let micro: Vec<MicroBatch> = (0..cfg.data.gradient_accumulation)
            .map(|a| {
                let start = run.data_consumed + (a * world + rank) * bs;
                let samples = run.train.samples_at(cfg.run.seed, start, bs as usize);
                let batch = MicroBatch::on(&run.train.rows(&samples), run.device);
                ReferenceTable::attach(run.reference.as_ref(), batch, &samples)
            })
            .collect();
        let lr = run.schedule.lr_at(self.step);
        let settings = StepSettings {
            seed: cfg.run.seed,
            max_grad_norm: cfg.optim.max_grad_norm,
            activation_checkpointing: cfg.model.activation_checkpointing,
        };
        let parts = StepParts {
            model: &run.model,
            opt: &mut run.opt,
            ranks: &mut run.ranks,
            recipe: run.recipe.as_ref(),
        };
        let (saver, memory) = (&mut run.saver, &mut run.memory);
        // Both tiers' copies of the previous step end before the weights change.
        let mut before_update = || {
            let durable = saver.before_update()?;
            let in_memory = memory.as_mut().and_then(|t| t.before_update());
            Ok(match (durable, in_memory) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            })
        };
        let done = train_step(
            parts,
            &micro,
            self.step,
            lr,
            settings,
            signal != 0,
            &mut before_update,
        )?;
        let Some(done) = done else {
            return Ok(None);
        };
        self.step += 1;
        run.data_consumed += run.global_batch;
        run.last_loss = done.loss;
        let secs = started.elapsed().as_secs_f64();
        // A preference step's units are pairs, each two sequences.
        let pairs = run.train.is_pairs();
        let sequences = run.global_batch * if pairs { 2 } else { 1 };
        let mut line = json!({
            "step": self.step,
            "loss": done.loss,
            "lr": lr,
            "grad_norm": done.grad_norm,
            if pairs { "pairs" } else { "tokens" }: done.units,
            "tokens_per_s": (sequences * cfg.data.max_seq_len) as f64 / secs.max(1e-9),
            "data_consumed": run.data_consumed,
            "epoch": run.data_consumed / run.ctx.n_samples,
            "step_s": secs,
            "time_unix_ms": waypoint_checkpoint::now_ms(),
        });
        if let Some(blocked) = done.stall {
            line["save_stall_s"] = json!(blocked);
        }
        if pairs {
            line["pairs_per_s"] = json!(run.global_batch as f64 / secs.max(1e-9));
        }
        for (name, value) in &done.stats {
            line[*name] = json!(value);
        }
        if let Some(eval) = &run.eval {
            if cfg.run.eval_steps > 0 && self.step % cfg.run.eval_steps == 0 {
                let indices: Vec<usize> = (0..eval.len()).collect();
                let device = run.device;
                let table = run.eval_reference.as_ref();
                let batches = indices.chunks((bs as usize).max(1)).map(|chunk| {
                    ReferenceTable::attach(table, MicroBatch::on(&eval.rows(chunk), device), chunk)
                });
                let (eval_loss, stats) =
                    evaluate(&run.model, run.recipe.as_ref(), batches, &mut run.ranks)?;
                line["eval_loss"] = json!(eval_loss);
                // TRL's names: `eval_rewards/margins`, …
                for (name, value) in stats {
                    line[format!("eval_{name}")] = json!(value);
                }
                tracing::info!(step = self.step, eval_loss, "eval");
            }
        }
        Ok(Some(line))
    }
}
