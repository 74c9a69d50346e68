//! Checking a committed checkpoint's files against its manifest (sizes, and digests when
//! re-hashing). Files are checked a few at once; each is re-hashed in parts on all cores, the same
//! path loading takes.

use futures::{StreamExt, TryStreamExt};
use waypoint_storage::{BlobReader, StorageError};

use super::CheckpointManager;
use crate::error::Result;
use crate::file_entry::FileEntry;
use crate::manifest::Manifest;
use crate::StepName;

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The checkpoint.
    pub name: String,
    /// Files re-hashed.
    pub files: usize,
    /// Bytes re-hashed.
    pub bytes: u64,
    /// Each problem found (empty when intact).
    pub problems: Vec<String>,
}

impl CheckpointManager {
    /// Checks a committed checkpoint's files against its manifest: present with the recorded size and,
    /// with `rehash`, the recorded sha256. Returns the problems found.
    pub async fn check(&self, manifest: &Manifest, rehash: bool) -> Result<Vec<String>> {
        self.check_files(manifest, manifest.files.iter(), rehash)
            .await
    }

    /// [`Self::check`] of some of a manifest's files.
    pub(super) async fn check_files(
        &self,
        manifest: &Manifest,
        files: impl Iterator<Item = &FileEntry>,
        rehash: bool,
    ) -> Result<Vec<String>> {
        let dir = self.layout.checkpoint_dir(manifest.step_name());
        let dir = &dir;
        let checks = files.map(|f| async move {
            let key = format!("{dir}/{}", f.path);
            match self.store.head(&key).await {
                Ok(o) if o.size != f.bytes => {
                    return Ok(Some(format!(
                        "{}: {} bytes, manifest says {}",
                        f.path, o.size, f.bytes
                    )));
                }
                Ok(_) => {}
                Err(StorageError::NotFound { .. }) => {
                    return Ok(Some(format!("{}: missing", f.path)));
                }
                Err(e) => return Err(e.into()),
            }
            if rehash {
                let (_, sha) = BlobReader::open(&self.store, &key, None)
                    .await?
                    .with_digest(f.digest_scheme())
                    .drain()
                    .await?;
                if sha != f.sha256 {
                    return Ok(Some(format!(
                        "{}: sha256 {sha}, manifest says {}",
                        f.path, f.sha256
                    )));
                }
            }
            Ok::<_, crate::error::CheckpointError>(None)
        });
        let found: Vec<Option<String>> = futures::stream::iter(checks)
            .buffered(self.options.parallel_files.max(1))
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// Re-hashes every file of `step` against its manifest.
    pub async fn verify(&self, step: StepName) -> Result<VerifyReport> {
        let manifest = self.manifest(step).await?;
        let problems = self.check(&manifest, true).await?;
        Ok(VerifyReport {
            name: manifest.name.clone(),
            files: manifest.files.len(),
            bytes: manifest.total_bytes(),
            problems,
        })
    }
}
