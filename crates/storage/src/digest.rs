//! Blob digests computed in fixed-size parts on all cores, combined S3's way.
//!
//! A blob is cut into parts of `part_size` bytes (the last one shorter). Each part's sha256 is
//! computed on its own thread while the bytes stream, so hashing is never one core in series with
//! the I/O. The blob's digest is S3's convention for multipart objects: the sha256 of the
//! concatenated part digests, with `-N` for N parts (`<64 hex>-N`); a blob of one part (or empty) has
//! its plain sha256. Older manifests recorded a plain sha256 of the whole blob, whatever its size:
//! [`DigestScheme::Whole`] checks those.

use std::collections::VecDeque;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::error::{Result, StorageError};

/// One part's sha256.
pub type PartDigest = [u8; 32];

/// How a recorded digest was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestScheme {
    /// One sha256 of the whole blob (manifests before part digests).
    Whole,
    /// Parts of this many bytes, combined as [`combine`] does.
    Parts(u64),
}

/// The blob digest of a list of part digests: plain hex for zero or one part, else S3's composite
/// `hex(sha256(d1 ‖ d2 ‖ …))-N`.
pub fn combine(parts: &[PartDigest]) -> String {
    match parts {
        [] => hex::encode(Sha256::digest(b"")),
        [one] => hex::encode(one),
        many => {
            let mut h = Sha256::new();
            for d in many {
                h.update(d);
            }
            format!("{}-{}", hex::encode(h.finalize()), many.len())
        }
    }
}

/// The digest of `data` in parts of `part_size`, hashed on all cores (rayon). Blocking: call it
/// from a blocking thread for large data.
pub fn digest_slice(data: &[u8], part_size: u64) -> String {
    use rayon::prelude::*;
    let part = part_size.max(1) as usize;
    let parts: Vec<PartDigest> = data
        .par_chunks(part)
        .map(|c| Sha256::digest(c).into())
        .collect();
    combine(&parts)
}

/// The digest of `data` under `scheme`, hashed on a blocking thread (all cores for parts).
pub async fn digest_bytes(data: Bytes, scheme: DigestScheme) -> Result<String> {
    tokio::task::spawn_blocking(move || match scheme {
        DigestScheme::Whole => hex::encode(Sha256::digest(&data)),
        DigestScheme::Parts(p) => digest_slice(&data, p),
    })
    .await
    .map_err(|e| StorageError::Task(format!("the hashing thread failed: {e}")))
}

/// Whether `digest` is a blob digest as [`combine`] writes it: 64 lower- or upper-case hex digits,
/// optionally followed by `-N` with N ≥ 2. Returns the part count N (1 for a plain digest).
pub fn parse_digest(digest: &str) -> Option<u64> {
    let (hex_part, count) = match digest.split_once('-') {
        None => (digest, 1),
        Some((h, n)) => {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.starts_with('0') {
                return None;
            }
            (h, n.parse::<u64>().ok().filter(|&n| n >= 2)?)
        }
    };
    (hex_part.len() == 64 && hex_part.bytes().all(|b| b.is_ascii_hexdigit())).then_some(count)
}

/// The number of parts a blob of `bytes` has with parts of `part_size` (at least 1).
pub fn part_count(bytes: u64, part_size: u64) -> u64 {
    bytes.div_ceil(part_size.max(1)).max(1)
}

/// Part digests computed while bytes stream: fed chunks of any size in order, it cuts them at part
/// boundaries (without copying) and hashes each full part on a blocking thread, with at most
/// `max_in_flight` parts hashing at once (the caller waits beyond that, which bounds memory).
pub struct PartHasher {
    part_size: usize,
    current: Vec<Bytes>,
    current_len: usize,
    in_flight: VecDeque<JoinHandle<PartDigest>>,
    done: Vec<PartDigest>,
    max_in_flight: usize,
}

impl PartHasher {
    /// A hasher of parts of `part_size` bytes, hashing on about as many threads as there are cores.
    pub fn new(part_size: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::with_threads(part_size, cores + 1)
    }

    /// A hasher with at most `max_in_flight` parts hashing at once.
    pub fn with_threads(part_size: u64, max_in_flight: usize) -> Self {
        Self {
            part_size: part_size.clamp(1, usize::MAX as u64) as usize,
            current: Vec::new(),
            current_len: 0,
            in_flight: VecDeque::new(),
            done: Vec::new(),
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// The part size.
    pub fn part_size(&self) -> u64 {
        self.part_size as u64
    }

    /// Feeds the next bytes of the blob.
    pub async fn update(&mut self, mut chunk: Bytes) -> Result<()> {
        while !chunk.is_empty() {
            let take = (self.part_size - self.current_len).min(chunk.len());
            let head = chunk.split_to(take);
            self.current_len += head.len();
            self.current.push(head);
            if self.current_len == self.part_size {
                let part = std::mem::take(&mut self.current);
                self.current_len = 0;
                self.spawn(part).await?;
            }
        }
        Ok(())
    }

    /// Feeds one whole part (exactly `part_size` bytes, or the last, shorter one) when nothing is
    /// pending: the writer's path, where parts are already cut.
    pub async fn update_part(&mut self, part: Bytes) -> Result<()> {
        if self.current_len == 0 && part.len() == self.part_size {
            self.spawn(vec![part]).await
        } else {
            self.update(part).await
        }
    }

    async fn spawn(&mut self, part: Vec<Bytes>) -> Result<()> {
        while self.in_flight.len() >= self.max_in_flight {
            self.join_oldest().await?;
        }
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || {
                let mut h = Sha256::new();
                for b in &part {
                    h.update(b);
                }
                h.finalize().into()
            }));
        Ok(())
    }

    async fn join_oldest(&mut self) -> Result<()> {
        if let Some(task) = self.in_flight.pop_front() {
            let d = task
                .await
                .map_err(|e| StorageError::Task(format!("a hashing thread failed: {e}")))?;
            self.done.push(d);
        }
        Ok(())
    }

    /// Hashes the last part and returns the blob's digest (see [`combine`]).
    pub async fn finish(mut self) -> Result<String> {
        if self.current_len > 0 {
            let part = std::mem::take(&mut self.current);
            self.spawn(part).await?;
        }
        while !self.in_flight.is_empty() {
            self.join_oldest().await?;
        }
        Ok(combine(&self.done))
    }
}

/// A digest being computed under either scheme, fed in order.
pub(crate) enum StreamDigest {
    Whole(Box<Sha256>),
    Parts(PartHasher),
}

impl StreamDigest {
    pub(crate) fn new(scheme: DigestScheme) -> Self {
        match scheme {
            DigestScheme::Whole => Self::Whole(Box::default()),
            DigestScheme::Parts(p) => Self::Parts(PartHasher::new(p)),
        }
    }

    pub(crate) async fn update(&mut self, chunk: &Bytes) -> Result<()> {
        match self {
            Self::Whole(h) => {
                h.update(chunk);
                Ok(())
            }
            Self::Parts(p) => p.update(chunk.clone()).await,
        }
    }

    pub(crate) async fn finish(self) -> Result<String> {
        match self {
            Self::Whole(h) => Ok(hex::encode(h.finalize())),
            Self::Parts(p) => p.finish().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn composite_is_s3s_convention() {
        let data = bytes(25);
        let parts: Vec<PartDigest> = data.chunks(10).map(|c| Sha256::digest(c).into()).collect();
        let mut concat = Vec::new();
        for p in &parts {
            concat.extend_from_slice(p);
        }
        let want = format!("{}-3", hex::encode(Sha256::digest(&concat)));
        assert_eq!(digest_slice(&data, 10), want);
        assert_eq!(parse_digest(&want), Some(3));
        // One part (or none): the plain sha256, as older manifests recorded it.
        assert_eq!(digest_slice(&data, 25), hex::encode(Sha256::digest(&data)));
        assert_eq!(digest_slice(b"", 10), hex::encode(Sha256::digest(b"")));
        assert_eq!(parse_digest(&hex::encode(Sha256::digest(b""))), Some(1));
        for bad in [
            "",
            "abc",
            &format!("{}-1", "a".repeat(64)),
            &format!("{}-01", "a".repeat(64)),
            &format!("{}-", "a".repeat(64)),
            &format!("{}-x", "a".repeat(64)),
            &"g".repeat(64),
        ] {
            assert_eq!(parse_digest(bad), None, "{bad:?}");
        }
        assert_eq!(part_count(0, 10), 1);
        assert_eq!(part_count(20, 10), 2);
        assert_eq!(part_count(21, 10), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_parts_match_the_in_memory_digest_for_any_chunking() {
        let data = bytes(100_003);
        for part in [1_000u64, 4_096, 33_333, 100_003, 200_000] {
            let want = digest_slice(&data, part);
            for chunk in [1usize, 999, 4_096, 50_000, 100_003] {
                let mut h = PartHasher::with_threads(part, 2);
                for c in data.chunks(chunk) {
                    h.update(Bytes::copy_from_slice(c)).await.unwrap();
                }
                assert_eq!(h.finish().await.unwrap(), want, "part {part} chunk {chunk}");
            }
            let got = digest_bytes(Bytes::from(data.clone()), DigestScheme::Parts(part))
                .await
                .unwrap();
            assert_eq!(got, want);
        }
    }
}
