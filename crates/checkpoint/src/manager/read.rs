//! Loading: the tensors of a committed checkpoint, each file checked against its manifest entry, and
//! the sampler weights (rebuilt from a delta where it is one). Reads pin their checkpoint.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use waypoint_storage::digest::Checksum;
use waypoint_storage::{BlobReader, DigestScheme};

use super::CheckpointManager;
use crate::delta::{self, CheckpointFiles};
use crate::error::{CheckpointError, Result};
use crate::file_entry::FileEntry;
use crate::manifest::Manifest;
use crate::safetensors_file::read_bytes;
use crate::tensor::Tensor;
use crate::StepName;

/// What a delta reads of the run's committed checkpoints.
impl CheckpointFiles for CheckpointManager {
    async fn committed_manifest(&self, step: StepName) -> Result<Manifest> {
        self.manifest(step).await
    }

    fn file_key(&self, step: StepName, path: &str) -> String {
        format!("{}/{path}", self.layout.checkpoint_dir(step))
    }

    async fn read_checked(&self, step: StepName, entry: &FileEntry) -> Result<Bytes> {
        self.read_file_checked(&self.file_key(step, &entry.path), entry)
            .await
    }
}

impl CheckpointManager {
    /// Reads the tensors of `manifest`'s files under `part` (`"dcp/"` or `"sampler/"`) whose names
    /// `want` accepts; with `verify_on_load`, each file's digest is checked as it is read.
    pub async fn load_tensors(
        &self,
        manifest: &Manifest,
        part: &str,
        want: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Tensor>> {
        let per_file: Vec<Vec<Tensor>> = self
            .tensor_files(manifest, part, want)
            .try_collect()
            .await?;
        Ok(per_file.into_iter().flatten().collect())
    }

    /// The tensors of `manifest`'s files under `part` whose names `want` accepts, one file's worth at
    /// a time in the manifest's order, as soon as that file is read and checked: `parallel_files`
    /// files are read at once, so a caller that builds its own tensors from each item overlaps that
    /// work with the reading of the next files. The checkpoint stays pinned while the stream lives.
    pub fn tensor_files<'a>(
        &'a self,
        manifest: &'a Manifest,
        part: &'a str,
        want: &'a dyn Fn(&str) -> bool,
    ) -> impl futures::Stream<Item = Result<Vec<Tensor>>> + 'a {
        // Every read holds the pin until it is done.
        let pin = std::sync::Arc::new(self.pin(manifest.step));
        let dir = self.layout.checkpoint_dir(manifest.step_name());
        let reads = manifest
            .files
            .iter()
            .filter(move |f| f.path.starts_with(part) && f.path.ends_with(".safetensors"))
            .map(move |f| {
                let key = format!("{dir}/{}", f.path);
                let pin = pin.clone();
                async move {
                    let bytes = self.read_file_checked(&key, f).await?;
                    drop(pin);
                    read_bytes(&key, bytes, want)
                }
            });
        futures::stream::iter(reads).buffered(self.options.parallel_files.max(1))
    }

    /// How `f`'s digest is checked on this store: a CRC32C digest is accepted only where the store
    /// itself records CRC32C (a memory tier); on a store that records sha256 (every durable tier)
    /// it is damage, so that a manifest cannot weaken its own check.
    pub(super) fn scheme_for(&self, f: &FileEntry) -> std::result::Result<DigestScheme, String> {
        let recorded = Checksum::of_digest(&f.sha256);
        if recorded == Checksum::Crc32c && self.store.options().checksum != Checksum::Crc32c {
            return Err(format!(
                "{}: a CRC32C digest ({}) where this store's checkpoints record sha256",
                f.path, f.sha256
            ));
        }
        Ok(f.digest_scheme())
    }

    /// Reads a file of a checkpoint, checking size and (with `verify_on_load`) its digest, computed
    /// in parts on all cores as the bytes arrive (a plain sha256 for manifests of format 1).
    pub(super) async fn read_file_checked(&self, key: &str, f: &FileEntry) -> Result<Bytes> {
        let damaged = |problem: String| CheckpointError::Damaged {
            name: key.to_string(),
            problems: vec![problem],
        };
        let reader = BlobReader::open(&self.store, key, None).await?;
        let reader = if self.options.verify_on_load {
            reader.with_digest(self.scheme_for(f).map_err(damaged)?)
        } else {
            reader.without_hash()
        };
        let (bytes, sha) = reader.read_all().await?;
        if bytes.len() as u64 != f.bytes {
            return Err(damaged(format!(
                "{} bytes, manifest says {}",
                bytes.len(),
                f.bytes
            )));
        }
        if self.options.verify_on_load && sha != f.sha256 {
            return Err(damaged(format!("sha256 {sha}, manifest says {}", f.sha256)));
        }
        Ok(bytes)
    }

    /// The full sampler weights of a checkpoint as (file name relative to `sampler/`, bytes): read as
    /// they are, or rebuilt from a delta and its base (checked bit for bit).
    pub async fn sampler_weight_files(&self, manifest: &Manifest) -> Result<Vec<(String, Bytes)>> {
        let _pin = self.pin(manifest.step);
        if manifest.delta_base.is_some() {
            return delta::rebuild(self, manifest).await;
        }
        let dir = &self.layout.checkpoint_dir(manifest.step_name());
        let reads = manifest
            .sampler_files()
            .filter(|f| f.path.ends_with(".safetensors"))
            .map(|f| async move {
                let bytes = self
                    .read_file_checked(&format!("{dir}/{}", f.path), f)
                    .await?;
                Ok::<_, CheckpointError>((f.path.trim_start_matches("sampler/").to_string(), bytes))
            });
        futures::stream::iter(reads)
            .buffered(self.options.parallel_files.max(1))
            .try_collect()
            .await
    }

    /// The sampler weights of a checkpoint as tensors (rebuilding a delta).
    pub async fn sampler_tensors(&self, manifest: &Manifest) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for (name, bytes) in self.sampler_weight_files(manifest).await? {
            out.extend(read_bytes(&name, bytes, &|_| true)?);
        }
        Ok(out)
    }
}
