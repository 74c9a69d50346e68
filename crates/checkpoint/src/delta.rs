//! INFERENCE_ARC_V2: a sampler part stored as a delta over an earlier full (INFERENCE_BASE) checkpoint
//! of the same run.
//!
//! Each weights file is serialized exactly as a full save would write it; its bytes are XORed with the
//! base's file of the same name and zstd-compressed (`<file>.xor.zst`). After a small optimizer step most
//! bf16 values do not change at all, so the XOR is mostly zeros and compresses to a small fraction.
//! `sampler/delta.json` names the base and records, per file, the sha256 of the base file it was made
//! against and of the file it rebuilds: rebuilding checks both, so a delta is never applied to the
//! wrong base, and the result is bit for bit what a full save would have written.

use std::collections::BTreeMap;

use crate::StepName;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::{to_json_pretty, CheckpointError, Result};
use crate::file_entry::{FileEntry, WrittenFile};
use crate::manifest::{DeltaBase, Manifest};
use crate::safetensors_file::encode_header;
use crate::sampler::full_weights_layout;
use crate::tensor::Tensor;
use crate::writer::FileWriter;

/// What a delta needs from the committed checkpoints of its run: their manifests, and their files
/// read and checked against their manifest entries. The checkpoint manager is one.
pub(crate) trait CheckpointFiles {
    /// The manifest of committed checkpoint `step`.
    fn committed_manifest(
        &self,
        step: StepName,
    ) -> impl std::future::Future<Output = Result<Manifest>> + Send;

    /// The storage key of `path` (`dcp/…`, `sampler/…`) of checkpoint `step`, for messages.
    fn file_key(&self, step: StepName, path: &str) -> String;

    /// The bytes of `entry` of checkpoint `step`, checked against its size (and sha256).
    fn read_checked(
        &self,
        step: StepName,
        entry: &FileEntry,
    ) -> impl std::future::Future<Output = Result<Bytes>> + Send;
}

/// Suffix of a compressed XOR delta file.
pub const DELTA_SUFFIX: &str = ".xor.zst";

/// zstd level: fast, and XOR deltas are mostly zeros anyway.
const ZSTD_LEVEL: i32 = 3;

/// `sampler/delta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaIndex {
    /// The base checkpoint's name.
    pub base: String,
    /// One entry per rebuilt file.
    pub files: Vec<DeltaFile>,
}

/// One file a delta rebuilds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaFile {
    /// The rebuilt file, relative to `sampler/` (also its name in the base).
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// sha256 of the rebuilt file.
    pub sha256: String,
    /// sha256 of the base file it is XORed with.
    pub base_sha256: String,
}

/// Whether a delta of `delta_bytes` is worth keeping over a full save of `full_bytes`: at most half
/// its size (a delta larger than that — after many steps, or a large learning rate — costs nearly a
/// full save to store and more to rebuild, so a new base is written instead).
pub fn delta_worth_it(delta_bytes: u64, full_bytes: u64) -> bool {
    delta_bytes.saturating_mul(2) <= full_bytes
}

/// Writes the delta of `tensors` over `base`'s sampler weights; returns the files and the base
/// record, or `None` (nothing written) when the delta would not be worth it ([`delta_worth_it`]):
/// the caller then writes a full save, a new base.
pub(crate) async fn write_delta(
    checkpoints: &impl CheckpointFiles,
    writer: &FileWriter,
    base: &Manifest,
    tensors: Vec<Tensor>,
    max_file_bytes: u64,
) -> Result<Option<(Vec<WrittenFile>, DeltaBase)>> {
    let base_name = base.name.clone();
    let delta_err = |reason: String| CheckpointError::DeltaBase {
        name: "(new delta)".into(),
        base: base_name.clone(),
        reason,
    };
    if base.delta_base.is_some() {
        return Err(delta_err(
            "the base is itself a delta; deltas are made over full saves".into(),
        ));
    }
    let (groups, index) = full_weights_layout(tensors, max_file_bytes)?;
    let mut files = Vec::new();
    let mut entries = Vec::new();
    let mut base_files = Vec::new();
    let mut deltas = Vec::new();
    for (name, group) in groups {
        let base_entry = base
            .files
            .iter()
            .find(|f| f.path == format!("sampler/{name}"))
            .ok_or_else(|| {
                delta_err(format!(
                    "the base has no sampler/{name}; save a full checkpoint instead"
                ))
            })?
            .clone();
        let mut target = encode_header(&group, &BTreeMap::new())?;
        for t in &group {
            target.extend_from_slice(&t.data);
        }
        if target.len() as u64 != base_entry.bytes {
            return Err(delta_err(format!(
                "sampler/{name} is {} bytes here but {} in the base (the weights changed shape or dtype); save a full checkpoint instead",
                target.len(),
                base_entry.bytes
            )));
        }
        let base_bytes = checkpoints
            .read_checked(base.step_name(), &base_entry)
            .await?;
        let (sha256, compressed) = tokio::task::spawn_blocking(move || {
            let sha = hex::encode(sha2::Sha256::digest(&target));
            for (t, b) in target.iter_mut().zip(base_bytes.iter()) {
                *t ^= b;
            }
            zstd::stream::encode_all(&target[..], ZSTD_LEVEL).map(|z| (sha, z))
        })
        .await
        .map_err(|e| CheckpointError::Invalid(format!("delta task failed: {e}")))?
        .map_err(|e| CheckpointError::Invalid(format!("zstd: {e}")))?;
        entries.push(DeltaFile {
            path: name.clone(),
            bytes: base_entry.bytes,
            sha256,
            base_sha256: base_entry.sha256.clone(),
        });
        deltas.push((name, compressed));
        base_files.push(base_entry);
    }
    let full: u64 = entries.iter().map(|e| e.bytes).sum();
    let delta: u64 = deltas.iter().map(|(_, z)| z.len() as u64).sum();
    if !delta_worth_it(delta, full) {
        tracing::info!(base = %base.name, delta, full, "a delta would exceed half the full size: writing a new base instead");
        return Ok(None);
    }
    for (name, compressed) in deltas {
        files.push(
            writer
                .write_bytes(
                    &format!("sampler/{name}{DELTA_SUFFIX}"),
                    Bytes::from(compressed),
                )
                .await?,
        );
    }
    if let Some(index) = index {
        files.push(
            writer
                .write_bytes("sampler/model.safetensors.index.json", index)
                .await?,
        );
    }
    let delta = DeltaIndex {
        base: base.name.clone(),
        files: entries,
    };
    files.push(
        writer
            .write_bytes(
                "sampler/delta.json",
                Bytes::from(to_json_pretty("sampler/delta.json", &delta)?),
            )
            .await?,
    );
    Ok(Some((
        files,
        DeltaBase {
            name: base.name.clone(),
            files: base_files,
        },
    )))
}

/// Rebuilds the full weights files of a delta checkpoint: (path relative to `sampler/`, bytes).
/// A missing or different base is an error that names it; each result is checked against its sha256.
pub(crate) async fn rebuild(
    checkpoints: &impl CheckpointFiles,
    manifest: &Manifest,
) -> Result<Vec<(String, Bytes)>> {
    let index_entry = manifest
        .files
        .iter()
        .find(|f| f.path == "sampler/delta.json")
        .ok_or_else(|| {
            CheckpointError::Invalid(format!("{} is not a delta checkpoint", manifest.name))
        })?;
    let raw = checkpoints
        .read_checked(manifest.step_name(), index_entry)
        .await?;
    let index: DeltaIndex =
        serde_json::from_slice(&raw).map_err(|e| CheckpointError::BadManifest {
            key: checkpoints.file_key(manifest.step_name(), "sampler/delta.json"),
            reason: e.to_string(),
        })?;
    let err = |reason: String| CheckpointError::DeltaBase {
        name: manifest.name.clone(),
        base: index.base.clone(),
        reason,
    };
    let base_step: StepName = index.base.parse().map_err(|e| err(format!("{e}")))?;
    let base =
        match checkpoints.committed_manifest(base_step).await {
            Ok(m) => m,
            Err(CheckpointError::NotFound { .. }) => return Err(err(
                "the base checkpoint is gone (retention or deletion); the delta cannot be rebuilt"
                    .into(),
            )),
            Err(e) => return Err(e),
        };
    let mut out = Vec::new();
    for f in &index.files {
        let base_entry = base
            .files
            .iter()
            .find(|b| b.path == format!("sampler/{}", f.path))
            .ok_or_else(|| err(format!("the base has no sampler/{}", f.path)))?;
        if base_entry.sha256 != f.base_sha256 {
            return Err(err(format!(
                "sampler/{} of the base has sha256 {}, the delta was made against {}",
                f.path, base_entry.sha256, f.base_sha256
            )));
        }
        let base_bytes = checkpoints.read_checked(base_step, base_entry).await?;
        let delta_path = format!("sampler/{}{DELTA_SUFFIX}", f.path);
        let delta_entry = manifest
            .files
            .iter()
            .find(|e| e.path == delta_path)
            .ok_or_else(|| err(format!("{delta_path} is not in the manifest")))?;
        let compressed = checkpoints
            .read_checked(manifest.step_name(), delta_entry)
            .await?;
        let want = f.sha256.clone();
        let path = f.path.clone();
        let rebuilt =
            tokio::task::spawn_blocking(move || -> std::result::Result<Vec<u8>, String> {
                let mut bytes =
                    zstd::stream::decode_all(&compressed[..]).map_err(|e| format!("zstd: {e}"))?;
                if bytes.len() != base_bytes.len() {
                    return Err(format!(
                        "delta of {path} is {} bytes, base {}",
                        bytes.len(),
                        base_bytes.len()
                    ));
                }
                for (d, b) in bytes.iter_mut().zip(base_bytes.iter()) {
                    *d ^= b;
                }
                let sha = hex::encode(sha2::Sha256::digest(&bytes));
                if sha != want {
                    return Err(format!("rebuilt {path} has sha256 {sha}, recorded {want}"));
                }
                Ok(bytes)
            })
            .await
            .map_err(|e| CheckpointError::Invalid(format!("delta task failed: {e}")))?
            .map_err(err)?;
        out.push((f.path.clone(), Bytes::from(rebuilt)));
    }
    Ok(out)
}
