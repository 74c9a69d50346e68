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
    /// The file's digest: the sha256 of its parts of `part_size` bytes combined S3's way (in the
    /// memory tier, CRC32Cs combined alike, `crc32c:…`: see `waypoint_storage::digest`)
    /// (`waypoint_storage::digest`: plain lower-case hex for one part, `<hex>-N` for N parts); in
    /// manifests without `part_size` (format 1), the plain sha256 of the whole file.
    pub sha256: String,
    /// The rank that wrote it.
    #[serde(default)]
    pub rank: u32,
    /// The part size the digest was computed with; absent in manifests of format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_size: Option<u64>,
}

impl FileEntry {
    /// Whether it belongs to the resumable part (`dcp/`).
    pub fn is_dcp(&self) -> bool {
        self.path.starts_with("dcp/")
    }

    /// How its digest was computed.
    pub fn digest_scheme(&self) -> waypoint_storage::DigestScheme {
        use waypoint_storage::digest::Checksum;
        match self.part_size {
            Some(p) => waypoint_storage::DigestScheme::parts(p, Checksum::of_digest(&self.sha256)),
            None => waypoint_storage::DigestScheme::Whole,
        }
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
