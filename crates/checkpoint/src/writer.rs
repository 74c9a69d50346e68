//! [`FileWriter`]: streams one rank's files into a checkpoint folder and reports each as a
//! [`FileEntry`] (path, bytes, sha256, rank).

use std::collections::BTreeMap;

use bytes::Bytes;
use waypoint_storage::Store;

use crate::error::Result;
use crate::file_entry::FileEntry;
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
    pub async fn write_tensors(&self, path: &str, tensors: &[Tensor]) -> Result<FileEntry> {
        self.write_tensors_with(path, tensors, &BTreeMap::new())
            .await
    }

    /// Like [`FileWriter::write_tensors`], with extra `__metadata__` entries.
    pub async fn write_tensors_with(
        &self,
        path: &str,
        tensors: &[Tensor],
        extra: &BTreeMap<String, String>,
    ) -> Result<FileEntry> {
        let info = write_file(&self.store, &format!("{}/{path}", self.dir), tensors, extra).await?;
        Ok(self.entry(path, info))
    }

    /// Writes a small file (JSON, tokenizer) at `path`.
    pub async fn write_bytes(&self, path: &str, data: Bytes) -> Result<FileEntry> {
        let mut w = self.store.writer(&format!("{}/{path}", self.dir))?;
        w.write_bytes(data).await?;
        let info = w.finish().await?;
        Ok(self.entry(path, info))
    }

    fn entry(&self, path: &str, info: waypoint_storage::BlobInfo) -> FileEntry {
        FileEntry {
            path: path.to_string(),
            bytes: info.bytes,
            sha256: info.sha256,
            rank: self.rank,
        }
    }
}
