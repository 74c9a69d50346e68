//! [`FileEntry`]: one file of a checkpoint as writers report it and manifests list it. Shared by the
//! manifest, kind detection and the writers, so none of them depends on another for it.

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
