//! `waypoint train`: one start of the trainer, in four parts.
//!
//! - [`setup`]: join the ranks, load the model, tokenizer and data, open the run's checkpoints;
//! - [`resume`]: find the newest resumable checkpoint that loads whole (passing over damaged ones),
//!   refuse a drifted configuration, take an attempt number (fencing), write the run records, and
//!   restore weights, optimizer state and data position (or `init_from_checkpoint`, or fresh);
//! - [`step`]: one optimizer step (forward, backward, gradient sum over ranks, clipping, AdamW), behind
//!   a boundary that turns any libtorch failure — a CUDA out-of-memory included — into an error;
//! - [`finish`]: the final save (resumable and promotable), promotion, `FINISHED`; or, on
//!   SIGTERM/SIGINT, saving the current step and `CANCELLED`.
//!
//! Periodic saves are resumable; the final save is resumable and promotable (see
//! [`crate::checkpointing::saver`]). With several ranks, each takes its slice of every global batch and gradients
//! are summed ([`crate::collective::ranks`]); all ranks stop after the same step on a signal.
//!
//! Exactness: dropout (LoRA's) draws from libtorch's generator reseeded from (seed, step) at every
//! step, the data order is a pure function of (seed, epoch), and the learning rate a pure function of
//! the step — so restoring weights, optimizer state and counters restores everything. Any failure
//! (usage errors aside, which write nothing) ends in `status.json` as `FAILED` and exit code 1.

pub mod device;
mod finish;
pub mod memory;
pub mod optim;
pub mod plot;
mod progress;
pub mod records;
mod resume;
mod setup;
mod step;
pub mod tensorboard;
pub mod trainlog;
pub(crate) mod watch;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;
use tokio::runtime::Runtime;
use waypoint_checkpoint::RunLayout;
use waypoint_storage::Store;

use crate::checkpointing::saver::{sampler_save_due, save_due, SaveDue};
use crate::config::TrainConfig;
use records::{JobState, Status};

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
        watch: None,
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
            session.end_watch(failure.then_some(&e), rt);
            Err(e)
        }
    }
}

/// A run ready to step: the live training state and what the loop uses.
struct Live {
    /// The checkpoint section of the configuration, built once.
    checkpoint: crate::config::CheckpointSection,
    ranks: crate::collective::ranks::Ranks,
    device: tch::Device,
    model: crate::model::Model,
    opt: crate::run::optim::AdamW,
    train: crate::data::Dataset,
    eval: Option<crate::data::Dataset>,
    manager: Arc<waypoint_checkpoint::CheckpointManager>,
    saver: crate::checkpointing::saver::Saver,
    ctx: crate::checkpointing::saver::SaveContext,
    schedule: crate::run::optim::Schedule,
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
    /// and the `status.json` it writes come before the failure is recorded, never after it. (With
    /// several ranks it does not wait: a save whose peer died would hold the exit for the
    /// collective timeout.)
    fn drop(&mut self) {
        if self.ranks.world() > 1 {
            return;
        }
        if let Err(e) = self.saver.finish_inflight() {
            tracing::warn!(
                "the checkpoint in flight did not commit: {}",
                records::explain(&e)
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
    /// Rank 0's `train.log`, TensorBoard events, plot and progress (see [`watch`]).
    watch: Option<Arc<watch::Watch>>,
}

impl Session {
    /// Setup, resume, the steps with their periodic saves, finish.
    fn train(&mut self, stop: &AtomicUsize, rt: &Runtime) -> Result<Outcome> {
        let setup = self.setup(rt)?;
        let mut run = self.resume(setup, rt)?;
        let total = self.total_steps;
        let progress =
            progress::Progress::new(total, self.step, self.config.logging_steps, self.main);
        let mut save_stall: Option<f64> = None;
        while self.step < total {
            let signal = stop.load(Ordering::SeqCst);
            run.saver.check()?;
            if run.saver.committed.is_some() {
                self.last_checkpoint = run.saver.committed.clone();
            }
            let Some(mut line) = self.step(&mut run, signal)? else {
                let signal = if signal != 0 { signal } else { 15 };
                return self.stop_for_signal(signal, &mut run, rt);
            };
            if let Some(stall) = save_stall.take() {
                // Time the loop spent blocked by the save started after the previous step (the
                // step itself may have waited for its copy too).
                let during = line["save_stall_s"].as_f64().unwrap_or(0.0);
                line["save_stall_s"] = json!(stall + during);
            }
            progress.step(self.step, run.last_loss, line["lr"].as_f64().unwrap_or(0.0));
            run.metrics.push_str(&line.to_string());
            run.metrics.push('\n');
            if let Some(watch) = &self.watch {
                watch.step(self.step, &line);
            }
            let due = save_due(self.step, run.checkpoint.save_steps, total, false);
            let sampler = sampler_save_due(self.step, run.checkpoint.sampler_save_steps, total);
            if due == SaveDue::Periodic || sampler {
                let blocked = Instant::now();
                let background = run.checkpoint.background;
                self.save_periodic(&mut run, due == SaveDue::Periodic, sampler, background)?;
                save_stall = Some(blocked.elapsed().as_secs_f64());
            }
        }
        progress.finish();
        self.finish(&mut run, rt)
    }
}
