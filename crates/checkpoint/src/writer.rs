//! [`FileWriter`]: streams one rank's files into a checkpoint folder and reports each as a
//! [`WrittenFile`] (path, bytes, sha256, rank, and the tensor names it holds).

use std::collections::BTreeMap;

use bytes::Bytes;
use waypoint_storage::Store;

use crate::error::Result;
use crate::file_entry::{FileEntry, WrittenFile};
use crate::safetensors_file::write_file;
use crate::tensor::Tensor;

/// Writes one rank's files into a checkpoint folder.
#[derive(Debug, Clone)]
pub struct FileWriter {
    store: Store,
    dir: String,
    rank: u32,
}

impl FileWriter {
    /// A writer of `rank`'s files into the checkpoint folder `dir` of `store`.
    pub(crate) fn new(store: Store, dir: String, rank: u32) -> Self {
        Self { store, dir, rank }
    }

    /// The rank whose files this writes.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Streams `tensors` as a safetensors file at `path` (`dcp/…` or `sampler/…`).
    pub async fn write_tensors(&self, path: &str, tensors: &[Tensor]) -> Result<WrittenFile> {
        self.write_tensors_with(path, tensors, &BTreeMap::new())
            .await
    }

    /// Like [`FileWriter::write_tensors`], with extra `__metadata__` entries.
    pub async fn write_tensors_with(
        &self,
        path: &str,
        tensors: &[Tensor],
        extra: &BTreeMap<String, String>,
    ) -> Result<WrittenFile> {
        let key = format!("{}/{path}", self.dir);
        let info = again_if_lost(&self.store, &key, || {
            write_file(&self.store, &key, tensors, extra)
        })
        .await?;
        Ok(WrittenFile {
            entry: self.entry(path, info),
            tensors: tensors.iter().map(|t| t.name.clone()).collect(),
        })
    }

    /// Writes a small file (JSON, tokenizer) at `path`.
    pub async fn write_bytes(&self, path: &str, data: Bytes) -> Result<WrittenFile> {
        let key = format!("{}/{path}", self.dir);
        let info = again_if_lost(&self.store, &key, || async {
            let mut w = waypoint_storage::BlobWriter::new(&self.store, &key)?;
            w.write_bytes(data.clone()).await?;
            Ok(w.finish().await?)
        })
        .await?;
        Ok(WrittenFile {
            entry: self.entry(path, info),
            tensors: Vec::new(),
        })
    }

    fn entry(&self, path: &str, info: waypoint_storage::BlobInfo) -> FileEntry {
        FileEntry {
            path: path.to_string(),
            bytes: info.bytes,
            sha256: info.sha256,
            part_size: Some(info.part_size),
            rank: self.rank,
        }
    }
}

/// Runs `write` (of the file at `key`) again from its start when the server lost its multipart
/// upload ([`waypoint_storage::StorageError::UploadLost`]), while the store's retry deadline since
/// the first try allows; the bytes are still at hand, so nothing is lost but time.
async fn again_if_lost<F, Fut>(
    store: &Store,
    key: &str,
    mut write: F,
) -> Result<waypoint_storage::BlobInfo>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<waypoint_storage::BlobInfo>>,
{
    let started = std::time::Instant::now();
    loop {
        match write().await {
            Err(crate::error::CheckpointError::Storage(
                e @ waypoint_storage::StorageError::UploadLost { .. },
            )) if started.elapsed() < store.options().retry.deadline => {
                tracing::warn!(key, "writing the file again from its start: {e}");
            }
            other => return other,
        }
    }
}
