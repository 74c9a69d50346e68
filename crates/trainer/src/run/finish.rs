//! The end of a start: the final save (resumable and promotable), promotion and `FINISHED`; or, on
//! SIGTERM/SIGINT, the current step saved and `CANCELLED`. Also the periodic save of the loop.

use anyhow::Result;
use tokio::runtime::Runtime;
use waypoint_checkpoint::dcp::LoopState;
use waypoint_checkpoint::{model_dir, StepName};

use super::{Live, Outcome, Session};
use crate::checkpointing::saver::{HostCopy, SaveOrder};
use crate::checkpointing::state::promotable_share;
use crate::checkpointing::state::CopyLoan;
use crate::step::{libtorch_boundary, step_seed};
use waypoint_observe::records::{self, JobState, Status};

/// Once the durable tier holds the run's newest step: each node's local rank 0, which commits its
/// tier's saves, removes the node's folders of the run (every rank is past its last tier save: it
/// took part in the durable save after waiting for its own).
fn retire_memory_tier(run: &mut Live) {
    if let Some(tier) = run.memory.take() {
        if tier.commits_here() {
            tier.remove();
        }
    }
}

impl Session {
    /// Saves the state at the current step (resumable; also promotable when `promotable`), in the
    /// background when `background`.
    pub(super) fn save(
        &mut self,
        run: &mut Live,
        promotable: bool,
        background: bool,
    ) -> Result<()> {
        self.save_parts(run, true, promotable, false, background, HostCopy::Own)
    }

    /// The loop's periodic save at the current step: resumable when `resumable` (drawing on the
    /// memory tier's host copy of the step when it lent one), and a periodic sampler save (a full
    /// base, or a delta over the newest) when `sampler`.
    pub(super) fn save_periodic(
        &mut self,
        run: &mut Live,
        resumable: bool,
        sampler: bool,
        background: bool,
        tier_copy: Option<CopyLoan>,
    ) -> Result<()> {
        let host_copy = tier_copy.map_or(HostCopy::Own, HostCopy::Borrow);
        self.save_parts(run, resumable, sampler, sampler, background, host_copy)
    }

    /// The loop state a PyTorch loop continues from, at the current step.
    fn loop_state(&self, run: &Live, epoch: u64) -> LoopState {
        LoopState {
            step: self.step,
            data_consumed: run.data_consumed,
            epoch,
            tokens_seen: run.data_consumed * self.config.data.max_seq_len,
            base_lrs: vec![run.schedule.lr],
            last_lrs: vec![run.schedule.lr_at(self.step)],
            seed: self.config.run.seed,
            next_step_seed: step_seed(self.config.run.seed, self.step),
        }
    }

    /// Saves the resumable state of this step to the node's memory tier, in the background, when
    /// it is due and every rank's tier is free (the ranks agree: a save is all ranks' or none's);
    /// a tier still writing the previous one is skipped this step, never waited for. With `lend`
    /// (a durable save of the step follows), the loan of its host copy.
    pub(super) fn save_to_memory(
        &mut self,
        run: &mut Live,
        lend: bool,
    ) -> Result<Option<CopyLoan>> {
        let Some(tier) = run.memory.as_mut() else {
            return Ok(None);
        };
        tier.check();
        tier.check_room(&run.model, &run.opt, &run.ranks)?;
        if !tier.due(self.step, self.total_steps) {
            return Ok(None);
        }
        if !tier.agree_to_save(&run.ranks, self.step)? {
            return Ok(None);
        }
        let commit = run
            .ctx
            .commit(self.step, run.data_consumed, run.ranks.world());
        let loop_state = self.loop_state(run, commit.epoch);
        let status = self.status_for(run.attempt);
        // The metrics since the last durable checkpoint (the durable tier has the rest).
        let durable_step = self
            .last_checkpoint
            .as_deref()
            .and_then(|n| n.parse::<StepName>().ok())
            .map_or(0, |s| s.step());
        let metrics = records::lines_between(&run.metrics, durable_step, self.step);
        if let Some(tier) = run.memory.as_mut() {
            tier.save(SaveOrder {
                model: &run.model,
                opt: &run.opt,
                ctx: &run.ctx,
                commit,
                resumable: true,
                promotable: false,
                delta_ok: false,
                status,
                metrics,
                background: true,
                share: None,
                loop_state,
                host_copy: if lend && tier.copy_holds_the_durable_share() {
                    HostCopy::Lend
                } else {
                    HostCopy::Own
                },
            });
            return Ok(tier.lent_copy());
        }
        Ok(None)
    }

    fn save_parts(
        &mut self,
        run: &mut Live,
        resumable: bool,
        promotable: bool,
        delta_ok: bool,
        background: bool,
        host_copy: HostCopy,
    ) -> Result<()> {
        let commit = run
            .ctx
            .commit(self.step, run.data_consumed, run.ranks.world());
        let status = self.status_for(run.attempt);
        let share = if promotable {
            // Gathering whole weights allocates on the device: behind the libtorch boundary.
            let what = format!("gathering the promotable weights of step {}", self.step);
            libtorch_boundary(&what, || {
                promotable_share(&run.model, &run.ctx, &run.manager, &mut run.ranks)
            })?
        } else {
            None
        };
        let loop_state = self.loop_state(run, commit.epoch);
        run.saver.save(SaveOrder {
            model: &run.model,
            opt: &run.opt,
            ctx: &run.ctx,
            commit,
            resumable,
            promotable,
            delta_ok,
            status,
            metrics: run.metrics.clone(),
            background,
            share,
            loop_state,
            host_copy,
        })
    }

    /// After the last step: the final save (already there when a finished run is restarted),
    /// promotion (rank 0), `FINISHED`.
    pub(super) fn finish(&mut self, run: &mut Live, rt: &Runtime) -> Result<Outcome> {
        let total = self.total_steps;
        let main = self.main;
        let last_loss = run.last_loss;
        // The final save: resumable and promotable. Already there when a finished run is restarted.
        let final_name = StepName::new(total).to_string();
        let training_peak = super::memory::peak_rss();
        // The memory tier's last save ends before the final save, whose collectives then tell
        // every rank that all of them are past it.
        if let Some(tier) = run.memory.as_mut() {
            tier.wait();
        }
        if run.resumed_step.is_none_or(|s| s < total) {
            run.saver.wait()?;
            self.save(run, true, false)?;
        }
        run.saver.wait()?;
        for report in run.saver.take_committed() {
            tracing::info!(checkpoint = %report.checkpoint, "save report: {}", report.describe());
        }
        // The run's peak, the final save (a host copy of the state, the promotable weights)
        // included, and the peak of the training before it.
        if let (Some(training), Some(peak)) = (training_peak, super::memory::peak_rss()) {
            tracing::info!(
                rank = run.ranks.rank(),
                peak_rss_mb = peak >> 20,
                training_peak_rss_mb = training >> 20,
                "memory: peak resident"
            );
        }
        self.last_checkpoint = Some(final_name.clone());
        // The run is durable to its end: nothing will resume from the memory tier.
        retire_memory_tier(run);
        let mut promoted = None;
        if !main {
            return Ok(Outcome::Finished {
                steps: total,
                last_loss,
                checkpoint: final_name,
                model: None,
            });
        }
        if let Some(model_id) = &run.checkpoint.output_model_id {
            // A finished promotion of this checkpoint (a restart of a finished run) is left as it
            // is; an interrupted one is finished by promote.
            let final_step = StepName::new(total);
            let done = rt
                .block_on(run.manager.promotion(model_id))?
                .is_done_from(&self.layout, &final_name);
            let at = if done {
                model_dir(model_id)?
            } else {
                let at = rt.block_on(run.manager.promote(final_step, model_id))?;
                tracing::info!(model = %at, "promoted the final checkpoint");
                at
            };
            promoted = Some(at);
        }
        let mut status = self.status_for(run.attempt);
        status.state = JobState::Finished;
        rt.block_on(records::write_status(&self.store, &self.layout, &status))?;
        Ok(Outcome::Finished {
            steps: total,
            last_loss,
            checkpoint: final_name,
            model: promoted,
        })
    }

    /// The status of this start at its current step.
    pub(super) fn status_for(&self, attempt: u64) -> Status {
        let mut s = Status::new(JobState::Running, self.step, self.total_steps);
        s.attempt = Some(attempt);
        s.checkpoint = self.last_checkpoint.clone();
        s.resumed_from = self.resumed_from.clone();
        s
    }

    /// The ranks agreed to stop before a step: saves the current step (unless saved) and records
    /// `CANCELLED`.
    pub(super) fn stop_for_signal(
        &mut self,
        signal: usize,
        run: &mut Live,
        rt: &Runtime,
    ) -> Result<Outcome> {
        let attempt = run.attempt;
        tracing::warn!(
            signal,
            step = self.step,
            "stop requested; saving the current step"
        );
        if let Some(tier) = run.memory.as_mut() {
            tier.wait();
        }
        run.saver.wait()?;
        if run.saver.committed.is_some() {
            self.last_checkpoint = run.saver.committed.clone();
        }
        if self.last_checkpoint.as_deref() != Some(&StepName::new(self.step).to_string())
            && self.step > 0
        {
            self.save(run, false, false)?;
            self.last_checkpoint = Some(StepName::new(self.step).to_string());
        }
        // The durable tier holds this step (committed by every rank): the memory tier's copies,
        // no newer, are spare — their RAM goes back to the node. (A save that failed, as when a
        // rank died, returned above and leaves them for the restart.)
        if self.step > 0 {
            retire_memory_tier(run);
        }
        if !run.ranks.is_main() {
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
