//! Removing checkpoints: retention (keep the newest N resumable ones) and GC of uncommitted leftovers.
//! Deletes never follow a symbolic link.

use std::time::{Duration, SystemTime};

use super::CheckpointManager;
use crate::error::Result;
use crate::manifest::Manifest;
use crate::StepName;

/// The retention policy, apart from the I/O: which committed checkpoints to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Resumable checkpoints kept, newest first.
    pub keep_last: usize,
    /// Whether checkpoints holding sampler blobs may go too.
    pub prune_sampler: bool,
}

impl Retention {
    /// The steps to remove, given the readable manifests newest first, the newest committed step
    /// and the steps being read (`pinned`). Kept: the newest `keep_last` resumable checkpoints, the
    /// newest committed one, pinned ones, the base of any delta listed, and (unless `prune_sampler`)
    /// any holding sampler blobs; checkpoints without a resumable part are never removed.
    pub fn victims(
        &self,
        manifests_newest_first: &[Manifest],
        newest: StepName,
        pinned: &[u64],
    ) -> Vec<StepName> {
        let bases: Vec<&str> = manifests_newest_first
            .iter()
            .filter_map(|m| m.delta_base.as_ref().map(|d| d.name.as_str()))
            .collect();
        let mut resumable_seen = 0;
        let mut remove = Vec::new();
        for m in manifests_newest_first {
            if m.dcp_files().next().is_none() {
                continue;
            }
            resumable_seen += 1;
            let step = m.step_name();
            let protected = resumable_seen <= self.keep_last
                || step == newest
                || pinned.contains(&m.step)
                || bases.contains(&m.name.as_str())
                || (!self.prune_sampler && m.sampler_files().next().is_some());
            if !protected {
                remove.push(step);
            }
        }
        remove
    }
}

impl CheckpointManager {
    /// Keeps the newest `keep` resumable checkpoints and removes older ones — never the newest
    /// committed checkpoint, one being read, the base of a kept delta, or (unless `prune_sampler`) one
    /// holding sampler blobs. The manifest goes first, so a crash mid-way leaves garbage, not a broken
    /// commit. Returns the removed names.
    pub async fn retain(&self, keep: usize) -> Result<Vec<StepName>> {
        let steps = self.committed_steps().await?;
        let Some(&newest) = steps.first() else {
            return Ok(Vec::new());
        };
        let mut manifests = Vec::new();
        for s in &steps {
            if let Ok(m) = self.manifest(*s).await {
                manifests.push(m);
            }
        }
        let pinned: Vec<u64> = self
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        let policy = Retention {
            keep_last: keep,
            prune_sampler: self.options.prune_sampler,
        };
        let mut removed = Vec::new();
        for step in policy.victims(&manifests, newest, &pinned) {
            self.store.delete(&self.layout.manifest(step)).await?;
            self.store
                .delete_prefix(&self.layout.checkpoint_dir(step))
                .await?;
            if self.options.quiet {
                tracing::debug!(checkpoint = %step, "retention removed checkpoint");
            } else {
                tracing::info!(checkpoint = %step, "retention removed checkpoint");
            }
            removed.push(step);
        }
        Ok(removed)
    }

    /// Removes blobs of uncommitted saves (step folders without a manifest) whose newest object is
    /// older than `grace`. Returns the removed keys.
    pub async fn gc(&self, grace: Duration) -> Result<Vec<String>> {
        let committed = self.committed_steps().await?;
        let listing = self.store.list_dir(&self.layout.checkpoints_dir()).await?;
        let now = SystemTime::now();
        let mut removed = Vec::new();
        for prefix in listing.prefixes {
            let Some(step) = prefix
                .rsplit('/')
                .next()
                .and_then(|n| n.parse::<StepName>().ok())
            else {
                continue;
            };
            if committed.contains(&step) {
                continue;
            }
            let objects = self.store.list(&prefix).await?;
            let young = objects.iter().any(|o| {
                now.duration_since(o.last_modified)
                    .map(|age| age < grace)
                    .unwrap_or(true)
            });
            if young {
                continue;
            }
            // Never through a symbolic link: a link in the run folder is removed, not followed.
            removed.extend(self.store.delete_prefix(&prefix).await?);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file_entry::FileEntry;
    use crate::manifest::{DeltaBase, FORMAT_VERSION};

    fn file(path: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            bytes: 1,
            sha256: "a".repeat(64),
            part_size: None,
            rank: 0,
        }
    }

    /// A manifest of `step` with a resumable part when `dcp`, sampler files when `sampler`.
    fn m(step: u64, dcp: bool, sampler: bool) -> Manifest {
        let mut files = Vec::new();
        if dcp {
            files.push(file("dcp/model-00001-of-00001.safetensors"));
        }
        if sampler {
            files.push(file("sampler/model.safetensors"));
        }
        Manifest {
            format_version: FORMAT_VERSION,
            name: StepName::new(step).to_string(),
            step,
            data_consumed: step,
            epoch: 0,
            kinds: Vec::new(),
            world_size: 1,
            attempt: 1,
            config_fingerprint: "c".repeat(64),
            created_unix_ms: 0,
            files,
            delta_base: None,
            training: None,
        }
    }

    fn steps(v: &[StepName]) -> Vec<u64> {
        v.iter().map(|s| s.step()).collect()
    }

    #[test]
    fn keeps_the_newest_resumable_ones() {
        let all: Vec<Manifest> = (1..=5).rev().map(|s| m(s, true, false)).collect();
        let keep2 = Retention {
            keep_last: 2,
            prune_sampler: false,
        };
        assert_eq!(
            steps(&keep2.victims(&all, StepName::new(5), &[])),
            [3, 2, 1]
        );
        // Pinned steps (being read) stay.
        assert_eq!(steps(&keep2.victims(&all, StepName::new(5), &[2])), [3, 1]);
        // The newest committed checkpoint stays even with nothing else kept.
        let keep0 = Retention {
            keep_last: 0,
            prune_sampler: false,
        };
        assert_eq!(
            steps(&keep0.victims(&all, StepName::new(5), &[])),
            [4, 3, 2, 1]
        );
    }

    #[test]
    fn sampler_only_and_sampler_holding_and_delta_bases_are_protected() {
        let mut delta = m(6, true, true);
        delta.delta_base = Some(DeltaBase {
            name: StepName::new(2).to_string(),
            files: Vec::new(),
        });
        let all = vec![
            delta,
            m(5, false, true), // sampler only: not counted, never removed
            m(4, true, false),
            m(3, true, true), // holds sampler blobs
            m(2, true, true), // a kept delta's base
            m(1, true, false),
        ];
        let keep1 = Retention {
            keep_last: 1,
            prune_sampler: false,
        };
        assert_eq!(steps(&keep1.victims(&all, StepName::new(6), &[])), [4, 1]);
        let prune = Retention {
            keep_last: 1,
            prune_sampler: true,
        };
        assert_eq!(
            steps(&prune.victims(&all, StepName::new(6), &[])),
            [4, 3, 1]
        );
    }
}
