//! Run records: `status.json` (the job states of the control plane), `logs/metrics.jsonl`, and the
//! `TORCHELASTIC_ERROR_FILE` that torchrun's agent reads when a worker fails.

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use waypoint_checkpoint::now_ms;
use waypoint_checkpoint::RunLayout;
use waypoint_storage::Store;

/// A job state, spelled as the control plane spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Started, not yet training.
    Pending,
    /// Training.
    Running,
    /// Done; the final checkpoint is committed.
    Finished,
    /// Stopped by an error (see `error`).
    Failed,
    /// Stopped by a signal after saving; a restart resumes.
    Cancelled,
}

/// The content of `status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The state.
    pub state: JobState,
    /// Optimizer steps done.
    pub step: u64,
    /// Steps the run will take.
    pub total_steps: u64,
    /// The newest committed checkpoint.
    pub checkpoint: Option<String>,
    /// The error, on failure; the reason, when cancelled.
    pub error: Option<String>,
    /// This start's attempt number.
    pub attempt: Option<u64>,
    /// The checkpoint this start resumed from, and its tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<ResumedFrom>,
    /// When this was written (ms since the Unix epoch).
    pub updated_unix_ms: u64,
}

/// Where a start resumed from (`status.json`'s `resumed_from`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumedFrom {
    /// `step-XXXXXX`.
    pub checkpoint: String,
    /// `memory` (the node's memory tier), `peer` (the memory tier, a copy received from a peer
    /// node's) or `durable`.
    pub tier: String,
}

impl Status {
    /// A status with the given state and counters.
    pub fn new(state: JobState, step: u64, total_steps: u64) -> Self {
        Self {
            state,
            step,
            total_steps,
            checkpoint: None,
            error: None,
            attempt: None,
            resumed_from: None,
            updated_unix_ms: now_ms(),
        }
    }
}

/// The run records of one run — `status.json`, `logs/metrics.jsonl`, and `config/run.json` when it
/// must be written again — through a handle of their own, not the checkpoint manager's.
#[derive(Clone)]
pub struct RunRecords {
    store: Store,
    layout: RunLayout,
    /// The watched outputs (rank 0): plot and log uploads at checkpoints, save times.
    watch: Option<Arc<crate::watch::Watch>>,
}

impl std::fmt::Debug for RunRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunRecords")
            .field("layout", &self.layout)
            .finish()
    }
}

impl RunRecords {
    /// The records of `layout`'s run in `store` (the checkpoint base).
    pub fn new(store: Store, layout: RunLayout) -> Self {
        Self {
            store,
            layout,
            watch: None,
        }
    }

    /// These records, also drawing the plot and uploading the logs of `watch` at checkpoints.
    pub fn watched(mut self, watch: Option<Arc<crate::watch::Watch>>) -> Self {
        self.watch = watch;
        self
    }

    /// Writes `status.json`.
    pub async fn write_status(&self, status: &Status) -> Result<()> {
        write_status(&self.store, &self.layout, status).await
    }

    /// Writes `logs/metrics.jsonl`. Before a commit: a resumed run keeps the lines up to its
    /// checkpoint and redoes the rest, so lines past a checkpoint that never commits are harmless;
    /// lines missing below a committed one would not be.
    pub async fn write_metrics(&self, metrics: String) -> Result<()> {
        if let Some(watch) = &self.watch {
            watch.saving(&metrics);
        }
        self.store
            .put(&self.layout.metrics(), Bytes::from(metrics))
            .await
            .context("writing logs/metrics.jsonl")?;
        Ok(())
    }

    /// After a commit: `status.json` names checkpoint `name`, whose save took `secs`; a
    /// `config/run.json` that vanished (the run folder was deleted mid-run) is written again from
    /// `run_record`, with a warning.
    pub async fn committed(
        &self,
        mut status: Status,
        run_record: &Bytes,
        name: &str,
        secs: f64,
    ) -> Result<()> {
        let key = self.layout.run_config();
        if !run_record.is_empty() && !self.store.exists(&key).await? {
            tracing::warn!(%key, "config/run.json is gone (was the run folder deleted?); writing it again");
            self.store.put(&key, run_record.clone()).await?;
        }
        status.checkpoint = Some(name.to_string());
        self.write_status(&status).await?;
        if let Some(watch) = &self.watch {
            watch.committed(status.step, secs).await;
        }
        Ok(())
    }
}

/// Writes `status.json`.
pub async fn write_status(store: &Store, layout: &RunLayout, status: &Status) -> Result<()> {
    let mut status = status.clone();
    status.updated_unix_ms = now_ms();
    store
        .put(
            &layout.status(),
            Bytes::from(serde_json::to_vec_pretty(&status)?),
        )
        .await
        .context("writing status.json")?;
    Ok(())
}

/// The lines of an existing `logs/metrics.jsonl` up to and including `step` (a resumed run drops
/// the lines of steps it redoes).
pub async fn metrics_until(store: &Store, layout: &RunLayout, step: u64) -> Result<String> {
    let Some(bytes) = store
        .get_if_exists(&layout.metrics())
        .await
        .context("reading logs/metrics.jsonl")?
    else {
        return Ok(String::new());
    };
    Ok(lines_between(&String::from_utf8_lossy(&bytes), 0, step))
}

/// The lines of a `metrics.jsonl` text whose step is in `after + 1 ..= until`.
pub fn lines_between(metrics: &str, after: u64, until: u64) -> String {
    let mut out = String::new();
    for line in metrics.lines() {
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64())
            .is_some_and(|s| s > after && s <= until);
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The last step of a `metrics.jsonl` text (0 when it has none).
pub fn last_step(metrics: &str) -> u64 {
    metrics
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .unwrap_or(0)
}
