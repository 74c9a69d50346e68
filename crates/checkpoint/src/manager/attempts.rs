//! Attempts and fencing: each start of the trainer takes the next attempt number with a create-only
//! `attempts/NNNNNN.json`, and a writer whose attempt is no longer the newest never changes the run.

use waypoint_storage::StorageError;

use super::{json_stems, now_ms, CheckpointManager};
use crate::error::{to_json_pretty, CheckpointError, Result};

impl CheckpointManager {
    /// Takes the next attempt number with a create-only `attempts/NNNNNN.json` (the fencing token).
    /// `info` is recorded in it (host, pid, start time; never secrets).
    pub async fn start_attempt(&mut self, info: &serde_json::Value) -> Result<u64> {
        let mut next = self.newest_attempt().await?.unwrap_or(0) + 1;
        loop {
            let body = to_json_pretty(
                "an attempt record",
                &serde_json::json!({
                    "attempt": next,
                    "started_unix_ms": now_ms(),
                    "info": info,
                }),
            )?;
            match self
                .store
                .put_create(&self.layout.attempt(next), body.into())
                .await
            {
                Ok(()) => {
                    self.attempt = Some(next);
                    tracing::info!(
                        attempt = next,
                        run = self.layout.run_id(),
                        "attempt started"
                    );
                    return Ok(next);
                }
                Err(StorageError::AlreadyExists { .. }) => next += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The newest attempt number recorded for the run.
    pub async fn newest_attempt(&self) -> Result<Option<u64>> {
        let listing = self.store.list_dir(&self.layout.attempts_dir()).await?;
        Ok(json_stems(&listing)
            .filter_map(|stem| stem.parse::<u64>().ok())
            .max())
    }

    /// Refuses to change `name` when a newer attempt than `ours` has started. When the run's attempt
    /// records are gone (the run folder was deleted mid-run), ours is written again first, with a
    /// warning, so that fencing goes on working.
    pub(super) async fn check_fence(&self, name: &str, ours: u64) -> Result<()> {
        let newest = self.newest_attempt().await?.unwrap_or(0);
        if newest > ours {
            return Err(CheckpointError::Fenced {
                name: name.to_string(),
                ours,
                newest,
            });
        }
        if newest < ours {
            tracing::warn!(
                attempt = ours,
                run = self.layout.run_id(),
                "the run's attempt records are gone (was the run folder deleted?); re-taking attempt {ours}"
            );
            let body = to_json_pretty(
                "an attempt record",
                &serde_json::json!({
                    "attempt": ours,
                    "started_unix_ms": now_ms(),
                    "info": {"retaken": "the run's attempt records were gone at a commit"},
                }),
            )?;
            match self
                .store
                .put_create(&self.layout.attempt(ours), body.into())
                .await
            {
                Ok(()) | Err(StorageError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
