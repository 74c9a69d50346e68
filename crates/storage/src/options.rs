//! [`StoreOptions`]: the knobs of a store — part size, upload concurrency, the retry budget, fsync.

use crate::retry::RetryPolicy;

/// Knobs of a [`Store`](crate::Store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Size of each multipart part in bytes (S3 needs at least 5 MiB). Also the size below which a
    /// blob is written with one plain put.
    pub part_size: usize,
    /// Parts uploaded at once; memory held by a writer is at most `part_size * (2 * max_concurrency + 1)`
    /// (parts in flight, parts queued for hashing, the part being filled).
    pub max_concurrency: usize,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// `fsync` local files and their folders before a write is reported done.
    pub fsync: bool,
    /// The checksum blobs written through the store are digested with (sha256 unless a local
    /// copy asks for CRC32C: see [`crate::digest`]).
    pub checksum: crate::digest::Checksum,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            part_size: 16 << 20,
            max_concurrency: 4,
            retry: RetryPolicy::default(),
            fsync: true,
            checksum: crate::digest::Checksum::Sha256,
        }
    }
}

/// Environment variable: the part size of streaming writes, in MiB (1 to 5120; S3 needs at least 5).
pub const PART_ENV: &str = "WAYPOINT_STORAGE_PART_MB";

/// The part size [`PART_ENV`] sets, if it is set.
pub(crate) fn part_size_from_env() -> Result<Option<usize>, String> {
    match std::env::var(PART_ENV) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=5120).contains(&n) => Ok(Some(n << 20)),
            _ => Err(format!(
                "{PART_ENV}={v:?}: give whole MiB from 1 to 5120 (S3 needs at least 5)"
            )),
        },
    }
}
