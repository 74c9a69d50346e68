//! Attempts and fencing: each start of the trainer takes the next attempt number with a create-only
//! `attempts/NNNNNN.json`, and a writer whose attempt is no longer the newest never changes the run.

use bytes::Bytes;
use waypoint_storage::StorageError;

use super::{json_stems, now_ms, CheckpointManager};
use crate::error::{to_json_pretty, CheckpointError, Result};
use crate::manifest::Manifest;
use crate::StepName;

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
                    if self.options.quiet {
                        tracing::debug!(
                            attempt = next,
                            run = self.layout.run_id(),
                            "attempt started"
                        );
                    } else {
                        tracing::info!(
                            attempt = next,
                            run = self.layout.run_id(),
                            "attempt started"
                        );
                    }
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

/// The reason recorded when a step an older attempt committed is set aside.
fn set_aside_reason(older: u64, ours: u64) -> String {
    format!(
        "committed by attempt {older} after attempt {ours} (newer) had started from an earlier \
         checkpoint; attempt {ours} saves this step itself"
    )
}

/// Whether two manifests list the same files with the same bytes.
fn same_files(a: &Manifest, b: &Manifest) -> bool {
    let key = |m: &Manifest| {
        let mut v: Vec<(String, u64, String)> = m
            .files
            .iter()
            .map(|f| (f.path.clone(), f.bytes, f.sha256.clone()))
            .collect();
        v.sort();
        v
    };
    key(a) == key(b) && a.delta_base == b.delta_base && a.data_consumed == b.data_consumed
}

impl CheckpointManager {
    /// Before writing `step`, whose manifest exists. Committed by this attempt: refused
    /// ([`CheckpointError::AlreadyCommitted`]). By a newer attempt: fenced. By an older attempt —
    /// a zombie that committed it after this attempt had chosen its resume point — the newer
    /// attempt wins: the older commit is set aside (said in the log) and this attempt writes the
    /// step itself. See `docs/fencing.md`.
    pub(super) async fn older_commit_before_writing(&self, step: StepName) -> Result<()> {
        let name = step.to_string();
        let Some(ours) = self.attempt else {
            return Err(CheckpointError::AlreadyCommitted { name });
        };
        let theirs = match self.manifest(step).await {
            Ok(m) => m.attempt,
            // Gone meanwhile (retention, set aside): nothing in the way.
            Err(CheckpointError::NotFound { .. }) => return Ok(()),
            Err(e) if e.is_damage() => return Err(CheckpointError::AlreadyCommitted { name }),
            Err(e) => return Err(e),
        };
        match theirs.cmp(&ours) {
            std::cmp::Ordering::Less => {
                self.set_aside(step, &set_aside_reason(theirs, ours))
                    .await?;
                tracing::warn!(
                    checkpoint = %name,
                    older_attempt = theirs,
                    attempt = ours,
                    "an older attempt committed this step after this attempt started from an earlier \
                     checkpoint: set it aside; this attempt saves the step itself"
                );
                Ok(())
            }
            std::cmp::Ordering::Equal => Err(CheckpointError::AlreadyCommitted { name }),
            std::cmp::Ordering::Greater => Err(CheckpointError::Fenced {
                name,
                ours,
                newest: theirs,
            }),
        }
    }

    /// At the commit of `mine` (serialized as `body`): a manifest of the step appeared after
    /// [`Self::prepare_save`]. An older attempt's that lists exactly the files this attempt wrote
    /// (same bytes, same sha256) and whose blobs are all there is adopted; any other older one is
    /// set aside and this attempt's own manifest committed, once its files are checked intact
    /// (sha256) — the older writer may have written over them. Both are said in the log. This
    /// attempt's own or a newer one's: as [`Self::older_commit_before_writing`].
    pub(super) async fn older_commit_at_commit(
        &self,
        mine: Manifest,
        body: Bytes,
    ) -> Result<Manifest> {
        let step = mine.step_name();
        let name = mine.name.clone();
        let ours = mine.attempt;
        let theirs = match self.manifest(step).await {
            Ok(m) => m,
            // Gone or unreadable since: a newer attempt may have set it aside (or committed past
            // it) meanwhile — then this attempt is fenced off; else it stays committed.
            Err(e) if e.is_damage() => {
                self.check_fence(&name, ours).await?;
                return Err(CheckpointError::AlreadyCommitted { name });
            }
            Err(e) => return Err(e),
        };
        match theirs.attempt.cmp(&ours) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => {
                // A newer attempt, if any, is what this attempt must yield to.
                self.check_fence(&name, ours).await?;
                return Err(CheckpointError::AlreadyCommitted { name });
            }
            std::cmp::Ordering::Greater => {
                return Err(CheckpointError::Fenced {
                    name,
                    ours,
                    newest: theirs.attempt,
                })
            }
        }
        let older = theirs.attempt;
        if same_files(&theirs, &mine) && self.check(&theirs, false).await?.is_empty() {
            tracing::warn!(
                checkpoint = %name,
                older_attempt = older,
                attempt = ours,
                "an older attempt committed this step while this attempt wrote it, with exactly the \
                 same files (verified there): adopted its commit"
            );
            return Ok(theirs);
        }
        self.set_aside(step, &set_aside_reason(older, ours)).await?;
        let problems = self.check(&mine, true).await?;
        if !problems.is_empty() {
            return Err(CheckpointError::Damaged { name, problems });
        }
        match self
            .store
            .put_create(&self.layout.manifest(step), body)
            .await
        {
            Ok(()) => {}
            Err(StorageError::AlreadyExists { .. }) => {
                return Err(CheckpointError::AlreadyCommitted { name })
            }
            Err(e) => return Err(e.into()),
        }
        tracing::warn!(
            checkpoint = %name,
            older_attempt = older,
            attempt = ours,
            "an older attempt committed this step while this attempt wrote it, with other files: \
             set it aside and committed this attempt's own"
        );
        Ok(mine)
    }
}
