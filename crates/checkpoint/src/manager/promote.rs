//! Promotion: a promotable checkpoint's sampler files copied to `models/<model_id>/`, re-hashed first,
//! with [`PROMOTION_RECORD`] written last and create-only as the promotion's commit.

use std::collections::HashMap;

use waypoint_storage::StorageError;

use super::{now_ms, CheckpointManager};
use crate::error::{to_json_pretty, CheckpointError, Result};
use crate::kind::CheckpointKind;
use crate::{model_dir, RunLayout, StepName};

/// The record written last into a promoted model's folder: its presence is the promotion's commit.
pub const PROMOTION_RECORD: &str = "waypoint_promotion.json";

/// What `models/<model_id>/` holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Promotion {
    /// Nothing.
    Absent,
    /// A finished promotion, with its record.
    Done(serde_json::Value),
    /// Files but no record: a promotion that was interrupted (keys and sizes).
    Partial(Vec<(String, u64)>),
}

impl Promotion {
    /// Whether this is a finished promotion of `checkpoint` of the run laid out by `run`.
    pub fn is_done_from(&self, run: &RunLayout, checkpoint: &str) -> bool {
        match self {
            Self::Done(r) => {
                r["source_run"].as_str() == Some(run.run_id())
                    && r["source_framework"].as_str() == Some(run.framework())
                    && r["source_checkpoint"].as_str() == Some(checkpoint)
            }
            _ => false,
        }
    }
}

impl CheckpointManager {
    /// Copies a promotable checkpoint's sampler files to `models/<model_id>/` (server-side where the
    /// store can). Refuses other kinds, and an existing model of that id (nothing is overwritten).
    pub async fn promote(&self, step: StepName, model_id: &str) -> Result<String> {
        let manifest = self.manifest(step).await?;
        let kinds = self.detect_kinds(&manifest).await?;
        if !kinds.iter().any(|k| k.promotable()) {
            let promotable: Vec<String> = self
                .list()
                .await?
                .into_iter()
                .filter(|c| c.promotable)
                .map(|c| c.name)
                .collect();
            let kinds_s = kinds
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let fix = if kinds.contains(&CheckpointKind::InferenceArcV2) {
                "a delta is not deployable on its own; promote its base or save with promotable=true"
                    .to_string()
            } else {
                "only INFERENCE_BASE and INFERENCE_LORA checkpoints promote; save with promotable=true"
                    .to_string()
            };
            return Err(CheckpointError::WrongKind {
                name: manifest.name,
                kinds: if kinds_s.is_empty() {
                    "empty".into()
                } else {
                    kinds_s
                },
                reason: format!("{fix} (promotable here: {promotable:?})"),
            });
        }
        let dest = model_dir(model_id)?;
        match self.promotion(model_id).await? {
            Promotion::Absent => {}
            Promotion::Done(record) => {
                return Err(CheckpointError::Invalid(format!(
                    "model {model_id} already exists at {dest} (promoted from {} {}); choose \
                     another --output_model_id (nothing was overwritten)",
                    record["source_run"], record["source_checkpoint"]
                )));
            }
            Promotion::Partial(keys) => {
                // A promotion killed half-way leaves files but no marker: nobody can deploy it.
                // Finish it when every file there is one this checkpoint would write, with its size.
                let ours: HashMap<String, u64> = manifest
                    .sampler_files()
                    .map(|f| {
                        let rel = f.path.trim_start_matches("sampler/");
                        (format!("{dest}/{rel}"), f.bytes)
                    })
                    .collect();
                // A local copy killed half-way may also leave its staging file (`<name>#<n>`).
                let staging_of_ours = |k: &str| {
                    k.rsplit_once('#').is_some_and(|(file, n)| {
                        ours.contains_key(file) && n.bytes().all(|b| b.is_ascii_digit())
                    })
                };
                let foreign: Vec<&String> = keys
                    .iter()
                    .filter(|(k, size)| ours.get(k.as_str()) != Some(size) && !staging_of_ours(k))
                    .map(|(k, _)| k)
                    .collect();
                if !foreign.is_empty() {
                    return Err(CheckpointError::Invalid(format!(
                        "{dest} holds files that are not {}'s ({foreign:?}) and no promotion \
                         record; choose another --output_model_id, or remove it if it is garbage \
                         (nothing was overwritten)",
                        manifest.name
                    )));
                }
                tracing::warn!(
                    model = model_id,
                    files = keys.len(),
                    "finishing a promotion that was interrupted"
                );
                // Copied again from scratch: a local copy onto a file that is already a link to the
                // same blob would leave its staging file behind.
                for (key, _) in &keys {
                    self.store.delete(key).await?;
                }
            }
        }
        // What is deployed must be what was saved: every sampler file re-hashed first.
        let _pin = self.pin(manifest.step);
        let problems = self
            .check_files(&manifest, manifest.sampler_files(), true)
            .await?;
        if !problems.is_empty() {
            return Err(CheckpointError::Damaged {
                name: manifest.name.clone(),
                problems,
            });
        }
        if manifest.delta_base.is_some() {
            // A delta rebuilds and checks its full weights bit for bit.
            self.sampler_weight_files(&manifest).await?;
        }
        let dir = self.layout.checkpoint_dir(step);
        for f in manifest.sampler_files() {
            let rel = f.path.trim_start_matches("sampler/");
            self.store
                .copy(&format!("{dir}/{}", f.path), &format!("{dest}/{rel}"))
                .await?;
        }
        // The record is written last and create-only: it is the promotion's commit. Until it exists
        // the model is not there for anyone (see [`Self::promotion`]).
        let record = serde_json::json!({
            "source_run": self.layout.run_id(),
            "source_framework": self.layout.framework(),
            "source_checkpoint": manifest.name,
            "kinds": kinds,
            "files": manifest.sampler_files().collect::<Vec<_>>(),
            "promoted_unix_ms": now_ms(),
        });
        match self
            .store
            .put_create(
                &format!("{dest}/{PROMOTION_RECORD}"),
                to_json_pretty("a promotion record", &record)?.into(),
            )
            .await
        {
            Ok(()) => {}
            Err(StorageError::AlreadyExists { .. }) => {
                return Err(CheckpointError::Invalid(format!(
                    "model {model_id} was promoted by someone else while this promotion ran; \
                     choose another --output_model_id"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(checkpoint = %manifest.name, model = model_id, "promoted");
        Ok(dest)
    }

    /// The state of `models/<model_id>/`: absent, promoted (with its record, written last), or files
    /// without a record (a promotion that was interrupted; not deployable).
    pub async fn promotion(&self, model_id: &str) -> Result<Promotion> {
        let dest = model_dir(model_id)?;
        let objects = self.store.list(&format!("{dest}/")).await?;
        if objects.is_empty() {
            return Ok(Promotion::Absent);
        }
        let record_key = format!("{dest}/{PROMOTION_RECORD}");
        if objects.iter().any(|o| o.key == record_key) {
            let bytes = self.store.get(&record_key).await?;
            let record: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                CheckpointError::Invalid(format!(
                    "{record_key} is not a promotion record ({e}); remove {dest} if it is garbage"
                ))
            })?;
            return Ok(Promotion::Done(record));
        }
        Ok(Promotion::Partial(
            objects.into_iter().map(|o| (o.key, o.size)).collect(),
        ))
    }
}
