//! The loop's side of what people watch: starting this attempt's outputs (rank 0: the watch of
//! `waypoint-observe`; other ranks: their log file) and closing them at the end, with the error of
//! a failed start.

use waypoint_observe::watch::{log_failed_start, RankLog, Watch};
use waypoint_observe::{explain, trainlog};

impl super::Session {
    /// At the end of this start: the error of a failed run (`error`) goes to `train.log`, then the
    /// outputs are closed (the last progress, the log's upload); a start that failed before its
    /// outputs began still appends its log and error (rank 0).
    pub(super) fn end_watch(
        &mut self,
        error: Option<&anyhow::Error>,
        rt: &tokio::runtime::Runtime,
    ) {
        let message = error.map(|e| format!("error: {}", explain(e)));
        if let Some(log) = self.rank_log.take() {
            if let Some(m) = &message {
                trainlog::note(m);
            }
            rt.block_on(log.close());
            return;
        }
        match self.watch.take() {
            Some(watch) => {
                if let Some(m) = &message {
                    trainlog::note(m);
                }
                rt.block_on(watch.close(self.step));
            }
            None => {
                let Some(m) = message.filter(|_| self.main) else {
                    return;
                };
                if let Err(e) = rt.block_on(log_failed_start(&self.store, &self.layout, &m)) {
                    tracing::warn!(
                        "could not write logs/train.log: {}",
                        waypoint_storage::redact_text(&format!("{e:#}"))
                    );
                }
            }
        }
    }

    /// The whole log of a rank other than 0, in its file of the run; none (with a warning) when it
    /// cannot be opened.
    pub(super) fn start_rank_log(
        &self,
        rank: u32,
        rt: &tokio::runtime::Runtime,
    ) -> Option<RankLog> {
        match rt.block_on(RankLog::start(&self.store, &self.layout, rank)) {
            Ok(log) => Some(log),
            Err(e) => {
                tracing::warn!(
                    "no log file for rank {rank}: {}",
                    waypoint_storage::redact_text(&format!("{e:#}"))
                );
                None
            }
        }
    }

    /// Rank 0's watched outputs for `attempt`, resuming after the current step; none on other ranks,
    /// or (with a warning) when they cannot be started — training goes on without them.
    pub(super) fn start_watch(
        &self,
        main: bool,
        attempt: u64,
        rt: &tokio::runtime::Runtime,
    ) -> Option<std::sync::Arc<Watch>> {
        if !main {
            return None;
        }
        let started = rt.block_on(Watch::start(
            &self.store,
            &self.layout,
            attempt,
            self.step,
            self.total_steps,
        ));
        match started {
            Ok(watch) => Some(std::sync::Arc::new(watch)),
            Err(e) => {
                tracing::warn!(
                    "no train.log, TensorBoard events or progress for this attempt: {}",
                    waypoint_storage::redact_text(&format!("{e:#}"))
                );
                None
            }
        }
    }
}
