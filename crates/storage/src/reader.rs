//! `BlobReader`: stream an object (or a byte range of it) in chunks, hashing as the bytes pass.
//!
//! Local files are read straight from the file in large chunks with positional reads, two chunks in
//! flight on blocking threads; remote objects arrive as the backend's byte stream. Memory held is at most
//! [`READ_AHEAD`] + 1 chunks. The digest is a plain sha256 of the whole ([`DigestScheme::Whole`], the
//! default) or part digests on all cores ([`BlobReader::with_digest`]). Reading a whole local file
//! at once ([`BlobReader::read_all`], [`BlobReader::drain`]) reads and hashes its parts in parallel,
//! each part read by the thread that hashes it; a remote object read at once in parts is fetched with
//! ranged requests, a few at once, each part hashed as it arrives.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::{GetOptions, GetRange, GetResultPayload};
use sha2::{Digest, Sha256};

use crate::digest::{Checksum, DigestScheme, PartDigest, StreamDigest};
use crate::error::{Result, StorageError};
use crate::store::Store;

/// Chunk size for reads from local files.
const LOCAL_CHUNK: usize = 8 << 20;

/// Local chunks read ahead of the one being consumed.
pub(crate) const READ_AHEAD: usize = 2;

/// A streaming read of one object. See the module documentation.
pub struct BlobReader {
    key: String,
    store: Store,
    source: Source,
    scheme: Option<DigestScheme>,
    hasher: Option<StreamDigest>,
    read: u64,
    len: u64,
    /// The first byte of the object this reader yields.
    start: u64,
}

enum Source {
    File {
        file: Arc<std::fs::File>,
        path: std::path::PathBuf,
        next: u64,
        end: u64,
        pending: VecDeque<tokio::task::JoinHandle<std::io::Result<Vec<u8>>>>,
    },
    Stream(BoxStream<'static, object_store::Result<Bytes>>),
}

impl BlobReader {
    /// A streaming read of a whole object (`None`) or of a byte range of it.
    pub async fn open(store: &Store, key: &str, range: Option<Range<u64>>) -> Result<Self> {
        let path = store.path(key)?;
        let options = GetOptions {
            range: range.clone().map(GetRange::from),
            ..Default::default()
        };
        let result = store
            .retrying("get", || store.inner.get_opts(&path, options.clone()))
            .await
            .map_err(|e| store.error("get", key, e))?;
        let got = result.range.clone();
        let len = got.end - got.start;
        let source = match result.payload {
            GetResultPayload::File(file, path) => Source::File {
                file: Arc::new(file),
                path,
                next: got.start,
                end: got.end,
                pending: VecDeque::new(),
            },
            GetResultPayload::Stream(s) => Source::Stream(s),
        };
        Ok(Self {
            key: key.to_string(),
            store: store.clone(),
            source,
            scheme: Some(DigestScheme::Whole),
            hasher: Some(StreamDigest::new(DigestScheme::Whole)),
            read: 0,
            len,
            start: got.start,
        })
    }

    /// Turns hashing off, for reads whose integrity another layer checks; [`BlobReader::finish`]
    /// then reports an empty digest.
    pub fn without_hash(mut self) -> Self {
        self.scheme = None;
        self.hasher = None;
        self
    }

    /// Computes the digest under `scheme` (parts are counted from the first byte read). Call it
    /// before the first chunk is read.
    pub fn with_digest(mut self, scheme: DigestScheme) -> Self {
        self.scheme = Some(scheme);
        self.hasher = Some(StreamDigest::new(scheme));
        self
    }

    /// Bytes this reader will yield in all.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the object (or range) is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next chunk, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        let chunk = match &mut self.source {
            Source::File {
                file,
                path,
                next,
                end,
                pending,
            } => {
                while pending.len() <= READ_AHEAD && *next < *end {
                    let (offset, want) = (*next, (*end - *next).min(LOCAL_CHUNK as u64) as usize);
                    *next += want as u64;
                    let file = file.clone();
                    pending.push_back(tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; want];
                        file.read_exact_at(&mut buf, offset).map(|()| buf)
                    }));
                }
                let Some(task) = pending.pop_front() else {
                    return Ok(None);
                };
                let buf = task
                    .await
                    .map_err(|e| StorageError::Task(e.to_string()))?
                    .map_err(|source| StorageError::Io {
                        op: "read",
                        path: path.clone(),
                        source,
                    })?;
                Bytes::from(buf)
            }
            Source::Stream(s) => match s.next().await {
                None => return Ok(None),
                Some(r) => r.map_err(|e| self.store.error("read", &self.key, e))?,
            },
        };
        if let Some(h) = self.hasher.as_mut() {
            h.update(&chunk).await?;
        }
        self.read += chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// Reads everything left; returns the bytes read in all and their digest (hex).
    pub async fn drain(mut self) -> Result<(u64, String)> {
        if let Some((_, digest)) = self.read_local_at_once(false).await? {
            return Ok((self.len, digest));
        }
        if let Some((_, digest)) = self.read_ranges_at_once(false).await? {
            return Ok((self.len, digest));
        }
        while self.next_chunk().await?.is_some() {}
        self.finish().await
    }

    /// Reads everything left into one buffer; returns it and its digest (empty if hashing was
    /// turned off).
    pub async fn read_all(mut self) -> Result<(Bytes, String)> {
        if let Some((Some(all), digest)) = self.read_local_at_once(true).await? {
            return Ok((all, digest));
        }
        if let Some((Some(all), digest)) = self.read_ranges_at_once(true).await? {
            return Ok((all, digest));
        }
        let mut all = bytes::BytesMut::with_capacity((self.len - self.read) as usize);
        while let Some(chunk) = self.next_chunk().await? {
            all.extend_from_slice(&chunk);
        }
        let (_, digest) = self.finish().await?;
        Ok((all.freeze(), digest))
    }

    /// Bytes read so far and the digest (hex) of them (empty if hashing was turned off).
    pub async fn finish(self) -> Result<(u64, String)> {
        let digest = match self.hasher {
            Some(h) => h.finish().await?,
            None => String::new(),
        };
        Ok((self.read, digest))
    }

    /// For a local file not yet read from: reads it all at once on every core, each part hashed by
    /// the thread that read it; `keep` keeps the bytes. `None` for other sources.
    async fn read_local_at_once(&mut self, keep: bool) -> Result<Option<(Option<Bytes>, String)>> {
        let Source::File {
            file,
            path,
            next,
            end,
            pending,
        } = &mut self.source
        else {
            return Ok(None);
        };
        let parts = digests_parts(self.scheme);
        if self.read != 0 || !pending.is_empty() || !(keep || parts) {
            // (Draining under the whole-blob scheme, or unhashed, is one stream: see next_chunk.)
            return Ok(None);
        }
        let (file, path, start, end) = (file.clone(), path.clone(), *next, *end);
        *next = end;
        let scheme = self.scheme;
        let (all, digest) =
            tokio::task::spawn_blocking(move || read_parts(&file, start, end, scheme, keep))
                .await
                .map_err(|e| StorageError::Task(e.to_string()))?
                .map_err(|source| StorageError::Io {
                    op: "read",
                    path,
                    source,
                })?;
        self.read = end - start;
        self.hasher = None;
        Ok(Some((all.map(Bytes::from), digest)))
    }
}

impl BlobReader {
    /// For a remote object not yet read from, in parts: reads its parts with ranged requests, a few
    /// at once (as S3's own transfer tools do; one stream is bound by one connection), each hashed
    /// on a blocking thread as it arrives; `keep` keeps the bytes. `None` for other sources or
    /// schemes, and for objects of one part.
    async fn read_ranges_at_once(&mut self, keep: bool) -> Result<Option<(Option<Bytes>, String)>> {
        use futures::TryStreamExt;
        let Some(scheme @ (DigestScheme::Parts(_) | DigestScheme::Crc32cParts(_))) = self.scheme
        else {
            return Ok(None);
        };
        let (part, checksum) = (scheme.part_size().unwrap_or(1).max(1), scheme.checksum());
        if !matches!(self.source, Source::Stream(_)) || self.read != 0 || self.len <= part {
            return Ok(None);
        }
        // The open stream is dropped unread: its connection goes, the ranges take over.
        self.source = Source::Stream(futures::stream::empty().boxed());
        let (store, key, start, len) = (&self.store, &self.key, self.start, self.len);
        let parts = len.div_ceil(part);
        let reads = (0..parts).map(|i| async move {
            let range = start + i * part..start + ((i + 1) * part).min(len);
            let bytes = store.get_range(key, range).await?;
            let hashed = bytes.clone();
            let digest: PartDigest = tokio::task::spawn_blocking(move || checksum.part(&[&hashed]))
                .await
                .map_err(|e| StorageError::Task(e.to_string()))?;
            Ok::<_, StorageError>((keep.then_some(bytes), digest))
        });
        let concurrency = (store.options.max_concurrency * 2).max(2);
        let got: Vec<(Option<Bytes>, PartDigest)> = futures::stream::iter(reads)
            .buffered(concurrency)
            .try_collect()
            .await?;
        let digest = checksum.combine(&got.iter().map(|(_, d)| *d).collect::<Vec<_>>());
        let all = keep.then(|| {
            let mut all = bytes::BytesMut::with_capacity(len as usize);
            for (b, _) in &got {
                if let Some(b) = b {
                    all.extend_from_slice(b);
                }
            }
            all.freeze()
        });
        self.read = len;
        self.hasher = None;
        Ok(Some((all, digest)))
    }
}

/// Whether `scheme` digests parts (rather than the whole blob, or nothing).
fn digests_parts(scheme: Option<DigestScheme>) -> bool {
    scheme.and_then(DigestScheme::part_size).is_some()
}

/// Reads bytes `start..end` of `file` in parts on all cores (rayon), hashing each part under
/// `scheme` as it is read; keeps the bytes when `keep`. Memory without `keep`: one part per thread.
fn read_parts(
    file: &std::fs::File,
    start: u64,
    end: u64,
    scheme: Option<DigestScheme>,
    keep: bool,
) -> std::io::Result<(Option<Vec<u8>>, String)> {
    use rayon::prelude::*;
    let len = (end - start) as usize;
    let part = match scheme.and_then(DigestScheme::part_size) {
        Some(p) => p.clamp(1, usize::MAX as u64) as usize,
        None => LOCAL_CHUNK,
    };
    let hash_parts = digests_parts(scheme);
    let checksum = scheme.map_or(Checksum::Sha256, DigestScheme::checksum);
    let read_one = |i: usize, buf: &mut [u8]| -> std::io::Result<Option<PartDigest>> {
        file.read_exact_at(buf, start + (i * part) as u64)?;
        Ok(hash_parts.then(|| checksum.part(&[&*buf])))
    };
    let (all, parts) = if keep {
        let mut all = vec![0u8; len];
        let parts: Vec<Option<PartDigest>> = all
            .par_chunks_mut(part)
            .enumerate()
            .map(|(i, buf)| read_one(i, buf))
            .collect::<std::io::Result<_>>()?;
        (Some(all), parts)
    } else {
        let parts: Vec<Option<PartDigest>> = (0..len.div_ceil(part))
            .into_par_iter()
            .map_init(Vec::new, |buf: &mut Vec<u8>, i| {
                let n = part.min(len - i * part);
                buf.resize(n, 0);
                read_one(i, &mut buf[..n])
            })
            .collect::<std::io::Result<_>>()?;
        (None, parts)
    };
    let digest = match scheme {
        None => String::new(),
        Some(DigestScheme::Parts(_) | DigestScheme::Crc32cParts(_)) => {
            checksum.combine(&parts.into_iter().flatten().collect::<Vec<_>>())
        }
        Some(DigestScheme::Whole) => all
            .as_ref()
            .map(|all| hex::encode(Sha256::digest(all)))
            .unwrap_or_default(),
    };
    Ok((all, digest))
}
