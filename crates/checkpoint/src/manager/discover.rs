//! Finding checkpoints: committed steps, manifests, kinds, the listing, resume discovery (passing
//! over damage and setting it aside) and the data position to resume at.

use waypoint_storage::StorageError;

use super::{json_stems, now_ms, CheckpointManager};
use crate::dataloader::{DataPosition, Dataloader};
use crate::error::{to_json_pretty, CheckpointError, Result};
use crate::kind::{detect, CheckpointKind};
use crate::manifest::Manifest;
use crate::safetensors_file::read_header;
use crate::StepName;

/// A listed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// `step-XXXXXX`.
    pub name: String,
    /// Its step.
    pub step: u64,
    /// Kinds detected from the blobs.
    pub kinds: Vec<CheckpointKind>,
    /// Any kind resumable.
    pub resumable: bool,
    /// Any kind promotable.
    pub promotable: bool,
    /// Bytes of all files.
    pub bytes: u64,
    /// Samples consumed at this checkpoint.
    pub data_consumed: u64,
    /// When it was committed (ms since the Unix epoch).
    pub created_unix_ms: u64,
}

/// A committed checkpoint that resume passed over as damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its step.
    pub step: StepName,
    /// What is wrong with it.
    pub reason: String,
}

impl CheckpointManager {
    /// Steps with a manifest, newest first (numeric order). Keys that are not manifests are ignored.
    pub async fn committed_steps(&self) -> Result<Vec<StepName>> {
        let listing = self.store.list_dir(&self.layout.checkpoints_dir()).await?;
        let mut steps: Vec<StepName> = json_stems(&listing)
            .filter_map(|stem| stem.parse().ok())
            .collect();
        steps.sort_by(|a, b| b.cmp(a));
        Ok(steps)
    }

    /// Reads and parses the manifest of `step`.
    pub async fn manifest(&self, step: StepName) -> Result<Manifest> {
        let key = self.layout.manifest(step);
        match self.store.get(&key).await {
            Ok(bytes) => Manifest::parse(&key, &bytes),
            Err(StorageError::NotFound { .. }) => Err(CheckpointError::NotFound {
                name: step.to_string(),
                run: self.layout.root().to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The kinds a manifest's blobs hold (reads the header of its first `dcp/` file).
    pub async fn detect_kinds(&self, manifest: &Manifest) -> Result<Vec<CheckpointKind>> {
        let names = match manifest
            .dcp_files()
            .find(|f| f.path.ends_with(".safetensors"))
        {
            Some(f) => {
                let key = format!(
                    "{}/{}",
                    self.layout.checkpoint_dir(manifest.step_name()),
                    f.path
                );
                read_header(&self.store, &key, f.bytes)
                    .await?
                    .tensors
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect()
            }
            None => Vec::new(),
        };
        Ok(detect(&manifest.files, &names))
    }

    /// Every committed checkpoint, newest first. Unreadable ones are skipped with a warning.
    pub async fn list(&self) -> Result<Vec<CheckpointInfo>> {
        let mut out = Vec::new();
        for step in self.committed_steps().await? {
            let manifest = match self.manifest(step).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(checkpoint = %step, %e, "skipping unreadable checkpoint");
                    continue;
                }
            };
            let kinds = match self.detect_kinds(&manifest).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(checkpoint = %step, %e, "skipping checkpoint whose blobs cannot be read");
                    continue;
                }
            };
            out.push(CheckpointInfo {
                name: manifest.name.clone(),
                step: manifest.step,
                resumable: kinds.iter().any(|k| k.resumable()),
                promotable: kinds.iter().any(|k| k.promotable()),
                kinds,
                bytes: manifest.total_bytes(),
                data_consumed: manifest.data_consumed,
                created_unix_ms: manifest.created_unix_ms,
            });
        }
        Ok(out)
    }

    /// The newest committed, complete, resumable checkpoint. Damaged ones (unparseable or misnamed
    /// manifest, missing blob, wrong size, and with `rehash` a wrong sha256) are skipped with a
    /// warning that names them and what is wrong.
    pub async fn latest_resumable(&self, rehash: bool) -> Result<Option<Manifest>> {
        Ok(self.resume_candidate(rehash, &[]).await?.0)
    }

    /// What resume would continue from, passing over the steps in `except` (found damaged as they
    /// loaded): the newest committed checkpoint that is complete (and, with `rehash`, matches its
    /// sha256s) and resumable; and the newer checkpoints passed over as damaged, newest first, to be
    /// [set aside](Self::set_aside) once this writer owns the run. A checkpoint that merely could not
    /// be read (storage unreachable) is never passed over: that error is returned.
    pub async fn resume_candidate(
        &self,
        rehash: bool,
        except: &[StepName],
    ) -> Result<(Option<Manifest>, Vec<Skipped>)> {
        let mut skipped = Vec::new();
        for step in self.committed_steps().await? {
            if except.contains(&step) {
                continue;
            }
            let found = async {
                let manifest = self.manifest(step).await?;
                if manifest.dcp_files().next().is_none() {
                    return Ok(None);
                }
                let problems = self.check(&manifest, rehash).await?;
                if !problems.is_empty() {
                    return Err(CheckpointError::Damaged {
                        name: manifest.name.clone(),
                        problems,
                    });
                }
                let resumable = self
                    .detect_kinds(&manifest)
                    .await?
                    .iter()
                    .any(|k| k.resumable());
                Ok(resumable.then_some(manifest))
            }
            .await;
            match found {
                Ok(Some(m)) => return Ok((Some(m), skipped)),
                Ok(None) => continue,
                Err(e) if e.is_damage() => {
                    tracing::warn!(checkpoint = %step, "passing over a damaged checkpoint: {e}");
                    skipped.push(Skipped {
                        step,
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok((None, skipped))
    }

    /// Sets a committed checkpoint aside (a damaged one, or one an older attempt committed after
    /// this one started: `docs/fencing.md`) so that the run can go on past it: its manifest
    /// moves to `checkpoints/quarantine/<name>-attempt-<N>.json` (with `reason`), so discovery no
    /// longer sees it and the step can be saved again; its blobs become uncommitted leftovers, which
    /// the next save of that step or `gc` removes. Fenced like a commit: only the newest attempt may.
    pub async fn set_aside(&self, step: StepName, reason: &str) -> Result<()> {
        let name = step.to_string();
        let Some(ours) = self.attempt else {
            return Err(CheckpointError::Invalid(format!(
                "cannot set {name} aside: no attempt started (call start_attempt first)"
            )));
        };
        self.check_fence(&name, ours).await?;
        let key = self.layout.manifest(step);
        let manifest = match self.store.get(&key).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(StorageError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let record = serde_json::json!({
            "name": name,
            "reason": reason,
            "attempt": ours,
            "set_aside_unix_ms": now_ms(),
            "manifest": manifest,
        });
        self.store
            .put(
                &self.layout.quarantined_manifest(step, ours),
                to_json_pretty("a quarantine record", &record)?.into(),
            )
            .await?;
        self.store.delete(&key).await?;
        tracing::warn!(checkpoint = %name, reason, "set the damaged checkpoint aside; training goes on past it");
        Ok(())
    }

    /// The data position of a committed checkpoint: the manifest's (which wins), with a warning when
    /// `dataloader.json` disagrees.
    pub async fn data_position(&self, manifest: &Manifest) -> Result<DataPosition> {
        let from_manifest = DataPosition {
            data_consumed: manifest.data_consumed,
            epoch: manifest.epoch,
        };
        let key = self.layout.dataloader();
        match self.store.get(&key).await {
            Ok(bytes) => match Dataloader::parse(&key, &bytes) {
                Ok(d) => match d.get(manifest.step_name()) {
                    Some(p) if p != from_manifest => tracing::warn!(
                        checkpoint = %manifest.name, dataloader = ?p, manifest = ?from_manifest,
                        "dataloader.json disagrees with the manifest; the manifest wins"
                    ),
                    None => {
                        tracing::warn!(checkpoint = %manifest.name, "dataloader.json has no entry; using the manifest")
                    }
                    _ => {}
                },
                Err(e) => tracing::warn!(%e, "dataloader.json unreadable; using the manifest"),
            },
            Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(from_manifest)
    }
}
