//! [`FileEntry`]: one file of a checkpoint as manifests list it, and [`WrittenFile`]: as its writer
//! reports it. Shared by the manifest, kind detection and the writers, so none of them depends on
//! another for it.

use serde::{Deserialize, Serialize};

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the checkpoint folder: `dcp/…` or `sampler/…`.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
    /// The rank that wrote it.
    #[serde(default)]
    pub rank: u32,
}

impl FileEntry {
    /// Whether it belongs to the resumable part (`dcp/`).
    pub fn is_dcp(&self) -> bool {
        self.path.starts_with("dcp/")
    }

    /// Whether it belongs to the sampler part (`sampler/`).
    pub fn is_sampler(&self) -> bool {
        self.path.starts_with("sampler/")
    }
}

/// A file as its writer reports it: the manifest entry (bytes and sha256 as written) and the names
/// of the tensors it holds (none for a file that is not safetensors). A commit takes these and
/// never reads back what was just written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenFile {
    /// What the manifest lists.
    pub entry: FileEntry,
    /// The tensor names written, in file order.
    #[serde(default)]
    pub tensors: Vec<String>,
}
