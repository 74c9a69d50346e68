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
        let info = write_file(&self.store, &format!("{}/{path}", self.dir), tensors, extra).await?;
        Ok(WrittenFile {
            entry: self.entry(path, info),
            tensors: tensors.iter().map(|t| t.name.clone()).collect(),
        })
    }

    /// Writes a small file (JSON, tokenizer) at `path`.
    pub async fn write_bytes(&self, path: &str, data: Bytes) -> Result<WrittenFile> {
        let mut w =
            waypoint_storage::BlobWriter::new(&self.store, &format!("{}/{path}", self.dir))?;
        w.write_bytes(data).await?;
        let info = w.finish().await?;
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
