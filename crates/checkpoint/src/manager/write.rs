//! The save path: clearing a step's leftovers, writing the resumable (`dcp/`) and sampler parts, and
//! the commit (the manifest, written last and create-only).

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use waypoint_storage::StorageError;

use super::{now_ms, CheckpointManager, Commit, SamplerPart};
use crate::dcp;
use crate::error::{CheckpointError, Result};
use crate::file_entry::{FileEntry, WrittenFile};
use crate::kind::{detect, CheckpointKind};
use crate::manifest::{Manifest, FORMAT_VERSION};
use crate::sampler::{write_full_weights, write_weight_files};
use crate::tensor::Tensor;
use crate::writer::FileWriter;
use crate::StepName;

impl CheckpointManager {
    /// Committer, before any rank writes step `step`: refuses a step this attempt already committed
    /// (and, when a newer attempt has started, refuses to touch the run at all); sets aside a step an
    /// older attempt committed after this one chose its resume point (see `docs/fencing.md`); then
    /// removes uncommitted leftovers under the step's folder, so that it ends up holding exactly what
    /// its manifest will list. The leftovers are removed again after the commit
    /// ([`Self::after_commit`]), so failing to remove them here is a warning, not an error.
    pub async fn prepare_save(&self, step: StepName) -> Result<()> {
        if let Some(ours) = self.attempt {
            self.check_fence(&step.to_string(), ours).await?;
        }
        if self.store.exists(&self.layout.manifest(step)).await? {
            self.older_commit_before_writing(step).await?;
        }
        match self
            .store
            .delete_prefix(&self.layout.checkpoint_dir(step))
            .await
        {
            Ok(removed) if !removed.is_empty() => {
                tracing::warn!(checkpoint = %step, removed = removed.len(), "removed uncommitted leftovers");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                checkpoint = %step,
                "could not remove uncommitted leftovers before writing (removed after the commit instead): {e}"
            ),
        }
        Ok(())
    }

    /// A writer of `rank`'s files of step `step`.
    pub fn file_writer(&self, step: StepName, rank: u32) -> FileWriter {
        FileWriter::new(self.store.clone(), self.layout.checkpoint_dir(step), rank)
    }

    /// Commits step `commit.step` with the files every rank reported: checks the fence and writes
    /// the manifest create-only — that is all; [`Self::after_commit`] follows it. The files are
    /// taken as their writers reported them (bytes and sha256 as written, tensor names for the
    /// kinds): nothing just written is read back.
    pub async fn commit(&self, commit: Commit, files: Vec<WrittenFile>) -> Result<Manifest> {
        let step = StepName::new(commit.step);
        let name = step.to_string();
        let Some(ours) = self.attempt else {
            return Err(CheckpointError::Invalid(format!(
                "cannot commit {name}: no attempt started (call start_attempt first)"
            )));
        };
        self.check_fence(&name, ours).await?;
        let (files, kinds) = entries_and_kinds(files);
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            name: name.clone(),
            step: commit.step,
            data_consumed: commit.data_consumed,
            epoch: commit.epoch,
            kinds,
            world_size: commit.world_size,
            attempt: ours,
            config_fingerprint: commit.config_fingerprint,
            created_unix_ms: now_ms(),
            files,
            delta_base: commit.delta_base,
            training: commit.training,
        };
        // Validate exactly what readers will parse.
        let body = manifest.to_json()?;
        Manifest::parse(&self.layout.manifest(step), &body)?;
        let key = self.layout.manifest(step);
        let body = Bytes::from(body);
        match self.store.put_create(&key, body.clone()).await {
            Ok(()) => {}
            // (A create whose answer was lost is recognised by the store: our bytes there = Ok.)
            Err(StorageError::AlreadyExists { .. }) => {
                return self.older_commit_at_commit(manifest, body).await;
            }
            Err(e) => return Err(e.into()),
        }
        if self.options.quiet {
            tracing::debug!(checkpoint = %name, kinds = ?manifest.kinds, bytes = manifest.total_bytes(), "checkpoint committed");
        } else {
            tracing::info!(checkpoint = %name, kinds = ?manifest.kinds, bytes = manifest.total_bytes(), "checkpoint committed");
        }
        Ok(manifest)
    }

    /// Writes one rank's share of the resumable state under `dcp/` (split into files of at most
    /// `max_file_bytes`, named as PyTorch names them for `world_size` writers), a few files at once.
    pub async fn write_dcp(
        &self,
        writer: &FileWriter,
        world_size: u32,
        state: Vec<Tensor>,
    ) -> Result<Vec<WrittenFile>> {
        let groups = dcp::split_into_files(state, self.options.max_file_bytes);
        let count = groups.len();
        let writes = groups.into_iter().enumerate().map(|(i, group)| async move {
            let path = format!(
                "dcp/{}",
                dcp::file_name(writer.rank(), world_size, i + 1, count)
            );
            writer.write_tensors(&path, &group).await
        });
        futures::stream::iter(writes)
            .buffered(self.options.parallel_files.max(1))
            .try_collect()
            .await
    }

    /// Writes a sampler part under `sampler/`; a delta records its base in `commit`.
    pub async fn write_sampler(
        &self,
        writer: &FileWriter,
        sampler: SamplerPart,
        commit: &mut Commit,
    ) -> Result<Vec<WrittenFile>> {
        let (max, parallel) = (self.options.max_file_bytes, self.options.parallel_files);
        let mut files = Vec::new();
        match sampler {
            SamplerPart::Full {
                config_json,
                tensors,
                extra_files,
            } => {
                files.push(
                    writer
                        .write_bytes("sampler/config.json", config_json)
                        .await?,
                );
                files.extend(write_full_weights(writer, tensors, max, parallel).await?);
                files.extend(write_extra_files(writer, extra_files).await?);
            }
            SamplerPart::FullShare {
                plan,
                tensors,
                config_json,
                extra_files,
            } => {
                let mine = plan.files_of(writer.rank(), tensors)?;
                let first = writer.rank() == 0;
                let index = if first { plan.index()? } else { None };
                files.extend(write_weight_files(writer, mine, index, parallel).await?);
                if first {
                    files.push(
                        writer
                            .write_bytes("sampler/config.json", config_json)
                            .await?,
                    );
                    files.extend(write_extra_files(writer, extra_files).await?);
                }
            }
            SamplerPart::Delta {
                base,
                config_json,
                tensors,
            } => {
                let base = self.manifest(base).await?;
                let _pin = self.pin(base.step);
                // Tensors share their bytes: the copy kept for a full save instead is cheap.
                let kept = tensors.clone();
                files.push(
                    writer
                        .write_bytes("sampler/config.json", config_json)
                        .await?,
                );
                match crate::delta::write_delta(self, writer, &base, tensors, max).await? {
                    Some((delta_files, delta_base)) => {
                        files.extend(delta_files);
                        commit.delta_base = Some(delta_base);
                    }
                    None => files.extend(write_full_weights(writer, kept, max, parallel).await?),
                }
            }
            SamplerPart::Lora {
                adapter_config,
                tensors,
            } => {
                let config: crate::peft::AdapterConfig = serde_json::from_slice(&adapter_config)
                    .map_err(|e| CheckpointError::Invalid(format!("adapter_config.json: {e}")))?;
                crate::peft::validate_adapter(&config, &tensors)?;
                files.push(
                    writer
                        .write_bytes("sampler/adapter_config.json", adapter_config)
                        .await?,
                );
                files.push(
                    writer
                        .write_tensors("sampler/adapter_model.safetensors", &tensors)
                        .await?,
                );
            }
        }
        Ok(files)
    }
}

/// Writes the other files of a model directory (tokenizer) under `sampler/`.
async fn write_extra_files(
    writer: &FileWriter,
    extra_files: Vec<(String, Bytes)>,
) -> Result<Vec<WrittenFile>> {
    let mut files = Vec::new();
    for (name, data) in extra_files {
        files.push(writer.write_bytes(&format!("sampler/{name}"), data).await?);
    }
    Ok(files)
}

/// The manifest's entries, sorted by path, and the kinds they hold: detected as
/// [`detect_kinds`](CheckpointManager::detect_kinds) does for a committed checkpoint, from the tensor
/// names of the first `dcp/` safetensors file — here as its writer reported them.
fn entries_and_kinds(mut files: Vec<WrittenFile>) -> (Vec<FileEntry>, Vec<CheckpointKind>) {
    files.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    let names = files
        .iter()
        .find(|f| f.entry.is_dcp() && f.entry.path.ends_with(".safetensors"))
        .map(|f| f.tensors.clone())
        .unwrap_or_default();
    let entries: Vec<FileEntry> = files.into_iter().map(|f| f.entry).collect();
    let kinds = detect(&entries, &names);
    (entries, kinds)
}
