//! What follows a commit, as steps of their own: retention (when `keep_last` is set), removing the
//! committed step's leftovers (files in its folder its manifest does not list), then
//! `dataloader.json` (the data position of every committed checkpoint).
//!
//! None of it can undo or endanger a commit, so none of it fails a save: [`CheckpointManager::upkeep`]
//! runs it after every commit, logs a failure as a warning, and the next save's upkeep does it again
//! (each step works from what is in the store, not from what the failed one did).

use waypoint_storage::StorageError;

use super::CheckpointManager;
use crate::dataloader::{DataPosition, Dataloader};
use crate::error::Result;
use crate::manifest::Manifest;
use crate::StepName;

impl CheckpointManager {
    /// The upkeep after committing `manifest`, never failing the save: runs
    /// [`Self::after_commit`] and, when part of it fails (after the storage retries), logs a
    /// warning; the next save's upkeep (the final save's, at the end) does it again. Returns whether
    /// all of it was done.
    pub async fn upkeep(&self, manifest: &Manifest) -> bool {
        match self.after_commit(manifest).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    checkpoint = %manifest.name,
                    "upkeep after the commit failed; the checkpoint is committed, and the next \
                     save retries the upkeep: {e}"
                );
                false
            }
        }
    }

    /// The upkeep after committing `manifest`: applies retention (`keep_last`), removes files in
    /// its folder that it does not list (leftovers [`Self::prepare_save`] could not remove), then
    /// records its data position in `dataloader.json` — after retention, so that the file lists
    /// exactly the committed checkpoints. Each step runs even when an earlier one failed; the first
    /// error is returned.
    pub async fn after_commit(&self, manifest: &Manifest) -> Result<()> {
        let retention = match self.options.keep_last {
            Some(keep) => self.retain(keep).await.map(|_| ()),
            None => Ok(()),
        };
        let leftovers = self.remove_unlisted(manifest).await;
        let position = self
            .record_data_position(manifest.step_name(), manifest)
            .await;
        retention.and(leftovers).and(position)
    }

    /// Removes the objects under `manifest`'s folder that it does not list.
    async fn remove_unlisted(&self, manifest: &Manifest) -> Result<()> {
        let dir = self.layout.checkpoint_dir(manifest.step_name());
        let listed: std::collections::HashSet<String> = manifest
            .files
            .iter()
            .map(|f| format!("{dir}/{}", f.path))
            .collect();
        for o in self.store.list(&dir).await? {
            if !listed.contains(&o.key) {
                self.store.delete(&o.key).await?;
                tracing::warn!(checkpoint = %manifest.name, key = %o.key, "removed a leftover the manifest does not list");
            }
        }
        Ok(())
    }

    /// Writes `dataloader.json` with `manifest`'s data position, dropping the entries of checkpoints
    /// that no longer exist and adding those of committed checkpoints it lacks (an earlier update
    /// that failed), from their manifests.
    pub async fn record_data_position(&self, step: StepName, manifest: &Manifest) -> Result<()> {
        let key = self.layout.dataloader();
        let mut d = match self.store.get(&key).await {
            Ok(bytes) => Dataloader::parse(&key, &bytes).unwrap_or_else(|e| {
                tracing::warn!(%e, "dataloader.json unreadable; rebuilding it from the manifests");
                Dataloader::default()
            }),
            Err(StorageError::NotFound { .. }) => Dataloader::default(),
            Err(e) => return Err(e.into()),
        };
        // Entries of checkpoints that no longer exist are dropped; missing ones are filled in; the
        // manifest's counter is written.
        let committed: Vec<StepName> = self.committed_steps().await?;
        d.0.retain(|k, _| k.parse::<StepName>().is_ok_and(|s| committed.contains(&s)));
        for s in committed.iter().filter(|s| **s != step) {
            if d.get(*s).is_none() {
                if let Ok(m) = self.manifest(*s).await {
                    d.0.insert(
                        s.to_string(),
                        DataPosition {
                            data_consumed: m.data_consumed,
                            epoch: m.epoch,
                        },
                    );
                }
            }
        }
        d.0.insert(
            step.to_string(),
            DataPosition {
                data_consumed: manifest.data_consumed,
                epoch: manifest.epoch,
            },
        );
        self.store.put(&key, d.to_json()?.into()).await?;
        Ok(())
    }
}
