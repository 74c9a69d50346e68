//! Reading a rank's rows of a checkpoint's tensors, for sharded training state resumed at any world
//! size: each file's header is read (a ranged read), then only the byte ranges of the rows that
//! overlap what the rank asks for — rows of a tensor (dimension 0) are contiguous in every slice,
//! whichever way the saving ranks cut it. Nothing reads a whole file but [`verify_files`], which
//! checks the sha256 of the share of files a rank is given (one at a time, keeping nothing), so that
//! the ranks together check every file once.
//!
//! [`verify_files`]: CheckpointManager::verify_files

use crate::error::{CheckpointError, Result};
use crate::manifest::Manifest;
use crate::safetensors_file::read_header;
use crate::tensor::Tensor;

use super::CheckpointManager;

/// Rows `start..start + len` of dimension 0 (`len` may run past the end: all the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRange {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
}

impl RowRange {
    /// Every row.
    pub const ALL: Self = Self {
        start: 0,
        len: usize::MAX,
    };
}

impl CheckpointManager {
    /// Checks size and sha256 of the files under `part` whose index (in manifest order) `mine`
    /// accepts, reading each whole, one at a time, and keeping nothing.
    pub async fn verify_files(
        &self,
        manifest: &Manifest,
        part: &str,
        mine: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        let _pin = self.pin(manifest.step);
        let dir = self.layout.checkpoint_dir(manifest.step_name());
        let files = manifest
            .files
            .iter()
            .filter(|f| f.path.starts_with(part) && f.path.ends_with(".safetensors"));
        for (i, f) in files.enumerate() {
            if mine(i) {
                self.read_file_checked(&format!("{dir}/{}", f.path), f)
                    .await?;
            }
        }
        Ok(())
    }

    /// For each tensor under `part` that `want` asks rows of, those rows, read as byte ranges of the
    /// slices that hold them. Each piece returned is a slice whose `offsets` are relative to the
    /// first row asked for, so [`crate::dcp::assemble_by_name`] joins them into exactly the rows
    /// asked for (a 0-dimensional tensor is one row). Files are not verified here: see
    /// [`CheckpointManager::verify_files`].
    pub async fn load_rows(
        &self,
        manifest: &Manifest,
        part: &str,
        want: &dyn Fn(&str) -> Option<RowRange>,
    ) -> Result<Vec<Tensor>> {
        let _pin = self.pin(manifest.step);
        let dir = self.layout.checkpoint_dir(manifest.step_name());
        let mut out = Vec::new();
        for f in manifest
            .files
            .iter()
            .filter(|f| f.path.starts_with(part) && f.path.ends_with(".safetensors"))
        {
            let key = format!("{dir}/{}", f.path);
            let header = read_header(&self.store, &key, f.bytes).await?;
            for (name, info) in &header.tensors {
                let Some(asked) = want(name) else {
                    continue;
                };
                let offsets = header
                    .saved_offsets(name)?
                    .unwrap_or_else(|| vec![0; info.shape.len()]);
                let bad = |reason: String| CheckpointError::BadTensor {
                    name: name.clone(),
                    reason,
                };
                if offsets.len() != info.shape.len() {
                    return Err(bad(format!(
                        "{} offsets for {} dimensions in {key}",
                        offsets.len(),
                        info.shape.len()
                    )));
                }
                let (s0, e0) = info.data_offsets;
                let rows = info.shape.first().copied().unwrap_or(1);
                let first = offsets.first().copied().unwrap_or(0);
                let from = asked.start.max(first);
                let to = asked.start.saturating_add(asked.len).min(first + rows);
                if from >= to {
                    continue;
                }
                let row_bytes = (e0 - s0) / rows.max(1);
                let begin = header.data_start + (s0 + (from - first) * row_bytes) as u64;
                let data = self
                    .store
                    .get_range(&key, begin..begin + ((to - from) * row_bytes) as u64)
                    .await?;
                let mut shape = info.shape.clone();
                let mut at = offsets.clone();
                if let (Some(d0), Some(o0)) = (shape.first_mut(), at.first_mut()) {
                    *d0 = to - from;
                    *o0 = from - asked.start;
                }
                let piece = Tensor::new(name.clone(), info.dtype, shape, data)?;
                out.push(if at.is_empty() {
                    piece
                } else {
                    piece.with_offsets(at)?
                });
            }
        }
        Ok(out)
    }
}
