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

    /// Problems with a delta's base: gone, or holding other files than the delta was made against.
    async fn check_delta_base(&self, d: &crate::manifest::DeltaBase) -> Result<Vec<String>> {
        let gone = |why: &str| {
            vec![format!(
                "its base {} {why}: this delta (INFERENCE_ARC_V2) cannot be rebuilt",
                d.name
            )]
        };
        let Ok(step) = d.name.parse::<StepName>() else {
            return Ok(gone("is not a checkpoint name"));
        };
        let base = match self.manifest(step).await {
            Ok(m) => m,
            Err(crate::error::CheckpointError::NotFound { .. }) => {
                return Ok(gone("is gone (removed)"))
            }
            Err(e) => return Err(e),
        };
        let mut problems = Vec::new();
        for want in &d.files {
            match base.files.iter().find(|f| f.path == want.path) {
                Some(f) if f.sha256 == want.sha256 => {}
                _ => problems.extend(gone(&format!("no longer holds {} as it was", want.path))),
            }
        }
        if problems.is_empty() {
            problems = self.check_files(&base, d.files.iter(), false).await?;
            for p in &mut problems {
                *p = format!("base {}: {p}", d.name);
            }
        }
        Ok(problems)
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
                let scheme = match self.scheme_for(f) {
                    Ok(scheme) => scheme,
                    Err(problem) => return Ok(Some(problem)),
                };
                let (_, sha) = BlobReader::open(&self.store, &key, None)
                    .await?
                    .with_digest(scheme)
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

    /// Re-hashes every file of `step` against its manifest; for a delta, also checks that its base
    /// is still there with the files it was made against (else it cannot be rebuilt, and says so).
    pub async fn verify(&self, step: StepName) -> Result<VerifyReport> {
        let manifest = self.manifest(step).await?;
        let mut problems = self.check(&manifest, true).await?;
        if let Some(d) = &manifest.delta_base {
            problems.extend(self.check_delta_base(d).await?);
        }
        Ok(VerifyReport {
            name: manifest.name.clone(),
            files: manifest.files.len(),
            bytes: manifest.total_bytes(),
            problems,
        })
    }
}
