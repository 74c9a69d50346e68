//! Removing checkpoints: retention (keep the newest N resumable ones) and GC of uncommitted leftovers.
//! Deletes never follow a symbolic link.

use std::time::{Duration, SystemTime};

use super::CheckpointManager;
use crate::error::Result;
use crate::StepName;

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
        let bases: Vec<String> = manifests
            .iter()
            .filter_map(|m| m.delta_base.as_ref().map(|d| d.name.clone()))
            .collect();
        let pinned: Vec<u64> = self
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        let mut resumable_seen = 0;
        let mut removed = Vec::new();
        for m in &manifests {
            if m.dcp_files().next().is_none() {
                continue;
            }
            resumable_seen += 1;
            let step = m.step_name();
            let protected = resumable_seen <= keep
                || step == newest
                || pinned.contains(&m.step)
                || bases.contains(&m.name)
                || (!self.options.prune_sampler && m.sampler_files().next().is_some());
            if protected {
                continue;
            }
            self.store.delete(&self.layout.manifest(step)).await?;
            self.store
                .delete_prefix(&self.layout.checkpoint_dir(step))
                .await?;
            tracing::info!(checkpoint = %step, "retention removed checkpoint");
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
