//! What follows a commit, as steps of their own: retention (when `keep_last` is set), then
//! `dataloader.json` (the data position of every committed checkpoint).

use waypoint_storage::StorageError;

use super::CheckpointManager;
use crate::dataloader::{DataPosition, Dataloader};
use crate::error::Result;
use crate::manifest::Manifest;
use crate::StepName;

impl CheckpointManager {
    /// The upkeep after committing `manifest`: applies retention (`keep_last`), then records its data
    /// position in `dataloader.json` — after retention, so that the file lists exactly the committed
    /// checkpoints.
    pub async fn after_commit(&self, manifest: &Manifest) -> Result<()> {
        if let Some(keep) = self.options.keep_last {
            self.retain(keep).await?;
        }
        self.record_data_position(manifest.step_name(), manifest)
            .await
    }

    /// Writes `dataloader.json` with `manifest`'s data position, dropping the entries of checkpoints
    /// that no longer exist.
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
        // Entries of checkpoints that no longer exist are dropped; the manifest's counter is written.
        let committed: Vec<StepName> = self.committed_steps().await?;
        d.0.retain(|k, _| k.parse::<StepName>().is_ok_and(|s| committed.contains(&s)));
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
