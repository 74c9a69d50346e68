//! Blob digests computed in fixed-size parts on all cores, combined S3's way.
//!
//! A blob is cut into parts of `part_size` bytes (the last one shorter). Each part's checksum is
//! computed on its own thread while the bytes stream, so hashing is never one core in series with
//! the I/O. The blob's digest is S3's convention for multipart objects: the sha256 of the
//! concatenated part digests, with `-N` for N parts (`<64 hex>-N`); a blob of one part (or empty) has
//! its plain sha256. Older manifests recorded a plain sha256 of the whole blob, whatever its size:
//! [`DigestScheme::Whole`] checks those.
//!
//! A store may checksum with CRC32C instead ([`Checksum::Crc32c`], `StoreOptions::checksum`): the
//! same parts, each part's CRC32C, combined as the CRC32C of the parts' big-endian CRCs, written
//! `crc32c:<8 hex>` or `crc32c:<8 hex>-N`. It runs in hardware at about ten times sha256's speed
//! and catches the damage a local copy meets (torn writes, truncation, bit flips), not tampering:
//! the memory tier uses it; everything durable keeps sha256.

use std::collections::VecDeque;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::error::{Result, StorageError};

/// One part's digest: its sha256, or its CRC32C (big-endian) in the first 4 bytes.
pub type PartDigest = [u8; 32];

/// The prefix of a CRC32C blob digest.
pub const CRC32C_PREFIX: &str = "crc32c:";

/// The checksum a blob's parts are digested with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksum {
    /// sha256: what durable checkpoints record (and S3 checks on upload).
    #[default]
    Sha256,
    /// CRC32C (Castagnoli): for local copies guarded against damage, not tampering.
    Crc32c,
}

impl Checksum {
    /// The checksum a recorded blob digest was made with.
    pub fn of_digest(digest: &str) -> Self {
        if digest.starts_with(CRC32C_PREFIX) {
            Self::Crc32c
        } else {
            Self::Sha256
        }
    }

    /// The digest of one part, given as consecutive slices.
    pub fn part<B: AsRef<[u8]>>(self, slices: &[B]) -> PartDigest {
        match self {
            Self::Sha256 => {
                let mut h = Sha256::new();
                for b in slices {
                    h.update(b.as_ref());
                }
                h.finalize().into()
            }
            Self::Crc32c => {
                let crc = slices
                    .iter()
                    .fold(0u32, |crc, b| crc32c::crc32c_append(crc, b.as_ref()));
                let mut d = [0u8; 32];
                d[..4].copy_from_slice(&crc.to_be_bytes());
                d
            }
        }
    }

    /// The blob digest of its part digests (see the module's documentation).
    pub fn combine(self, parts: &[PartDigest]) -> String {
        match self {
            Self::Sha256 => combine(parts),
            Self::Crc32c => match parts {
                [] => format!("{CRC32C_PREFIX}{:08x}", crc32c::crc32c(b"")),
                [one] => format!("{CRC32C_PREFIX}{}", hex::encode(&one[..4])),
                many => {
                    let crc = many
                        .iter()
                        .fold(0u32, |crc, d| crc32c::crc32c_append(crc, &d[..4]));
                    format!("{CRC32C_PREFIX}{crc:08x}-{}", many.len())
                }
            },
        }
    }
}

/// How a recorded digest was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestScheme {
    /// One sha256 of the whole blob (manifests before part digests).
    Whole,
    /// sha256s of parts of this many bytes, combined as [`combine`] does.
    Parts(u64),
    /// CRC32Cs of parts of this many bytes, combined as [`Checksum::combine`] does.
    Crc32cParts(u64),
}

impl DigestScheme {
    /// The scheme of parts of `part_size` bytes digested with `checksum`.
    pub fn parts(part_size: u64, checksum: Checksum) -> Self {
        match checksum {
            Checksum::Sha256 => Self::Parts(part_size),
            Checksum::Crc32c => Self::Crc32cParts(part_size),
        }
    }

    /// The part size, for a scheme of parts.
    pub fn part_size(self) -> Option<u64> {
        match self {
            Self::Whole => None,
            Self::Parts(p) | Self::Crc32cParts(p) => Some(p),
        }
    }

    /// The checksum of its parts (or of the whole).
    pub fn checksum(self) -> Checksum {
        match self {
            Self::Crc32cParts(_) => Checksum::Crc32c,
            _ => Checksum::Sha256,
        }
    }
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
        DigestScheme::Crc32cParts(p) => {
            let parts: Vec<PartDigest> = data
                .chunks(p.max(1) as usize)
                .map(|c| Checksum::Crc32c.part(&[c]))
                .collect();
            Checksum::Crc32c.combine(&parts)
        }
    })
    .await
    .map_err(|e| StorageError::Task(format!("the hashing thread failed: {e}")))
}

/// Whether `digest` is a blob digest as [`combine`] writes it — 64 lower- or upper-case hex digits,
/// optionally followed by `-N` with N ≥ 2 — or as [`Checksum::combine`] writes a CRC32C one
/// (`crc32c:` and 8 hex digits, the same suffix). Returns the part count N (1 for a plain digest).
pub fn parse_digest(digest: &str) -> Option<u64> {
    let (digest, hex_len) = match digest.strip_prefix(CRC32C_PREFIX) {
        Some(rest) => (rest, 8),
        None => (digest, 64),
    };
    let (hex_part, count) = match digest.split_once('-') {
        None => (digest, 1),
        Some((h, n)) => {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.starts_with('0') {
                return None;
            }
            (h, n.parse::<u64>().ok().filter(|&n| n >= 2)?)
        }
    };
    (hex_part.len() == hex_len && hex_part.bytes().all(|b| b.is_ascii_hexdigit())).then_some(count)
}

/// The number of parts a blob of `bytes` has with parts of `part_size` (at least 1).
pub fn part_count(bytes: u64, part_size: u64) -> u64 {
    bytes.div_ceil(part_size.max(1)).max(1)
}

/// Part digests computed while bytes stream: fed chunks of any size in order, it cuts them at part
/// boundaries (without copying) and hashes each full part on a blocking thread, with at most
/// `max_in_flight` parts hashing at once (the caller waits beyond that, which bounds memory).
pub struct PartHasher {
    checksum: Checksum,
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

    /// A hasher of parts of `part_size` bytes with `checksum`, on about as many threads as there
    /// are cores.
    pub fn with_checksum(part_size: u64, checksum: Checksum) -> Self {
        Self {
            checksum,
            ..Self::new(part_size)
        }
    }

    /// A hasher with at most `max_in_flight` parts hashing at once.
    pub fn with_threads(part_size: u64, max_in_flight: usize) -> Self {
        Self {
            checksum: Checksum::Sha256,
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
        let checksum = self.checksum;
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || checksum.part(&part)));
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
        Ok(self.checksum.combine(&self.done))
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
            DigestScheme::Crc32cParts(p) => {
                Self::Parts(PartHasher::with_checksum(p, Checksum::Crc32c))
            }
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
    async fn crc32c_digests_are_parts_combined_and_parsed_alike() {
        // The standard check value of CRC32C.
        let one = Checksum::Crc32c.combine(&[Checksum::Crc32c.part(&[b"123456789"])]);
        assert_eq!(one, "crc32c:e3069283");
        assert_eq!(Checksum::of_digest(&one), Checksum::Crc32c);
        assert_eq!(parse_digest(&one), Some(1));
        // Three parts: the CRC32C of the parts' big-endian CRCs, `-3`.
        let data = bytes(25);
        let crcs: Vec<u32> = data.chunks(10).map(crc32c::crc32c).collect();
        let concat: Vec<u8> = crcs.iter().flat_map(|c| c.to_be_bytes()).collect();
        let want = format!("crc32c:{:08x}-3", crc32c::crc32c(&concat));
        let scheme = DigestScheme::parts(10, Checksum::Crc32c);
        assert_eq!(scheme, DigestScheme::Crc32cParts(10));
        let got = digest_bytes(Bytes::from(data.clone()), scheme)
            .await
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(parse_digest(&want), Some(3));
        // Streamed in odd chunks, as a writer feeds it.
        let mut h = PartHasher::with_checksum(10, Checksum::Crc32c);
        for c in data.chunks(7) {
            h.update(Bytes::copy_from_slice(c)).await.unwrap();
        }
        assert_eq!(h.finish().await.unwrap(), want);
        // One byte changed: another digest.
        let mut bad = data.clone();
        bad[13] ^= 1;
        assert_ne!(digest_bytes(Bytes::from(bad), scheme).await.unwrap(), want);
        for bad in [
            "crc32c:",
            "crc32c:e306928",
            "crc32c:e30692833",
            "crc32c:e3069283-1",
            "crc32c:zz069283",
        ] {
            assert_eq!(parse_digest(bad), None, "{bad:?}");
        }
        assert_eq!(Checksum::of_digest(&"a".repeat(64)), Checksum::Sha256);
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
