//! `BlobReader`: stream an object (or a byte range of it) in chunks, hashing as the bytes pass.
//!
//! Local files are read straight from the file in large chunks with positional reads, two chunks in
//! flight on blocking threads; remote objects arrive as the backend's byte stream. Memory held is at most
//! [`READ_AHEAD`] + 1 chunks.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::{GetOptions, GetRange, GetResultPayload};
use sha2::{Digest, Sha256};

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
    hasher: Option<Sha256>,
    read: u64,
    len: u64,
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
            .layer_retry
            .run("get", || store.inner.get_opts(&path, options.clone()))
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
            hasher: Some(Sha256::new()),
            read: 0,
            len,
        })
    }

    /// Turns hashing off, for reads whose integrity another layer checks; [`BlobReader::finish`]
    /// then reports an empty digest.
    pub fn without_hash(mut self) -> Self {
        self.hasher = None;
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
            h.update(&chunk);
        }
        self.read += chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// Reads everything left; returns the bytes read in all and their sha256 (hex).
    pub async fn drain(mut self) -> Result<(u64, String)> {
        while self.next_chunk().await?.is_some() {}
        Ok(self.finish())
    }

    /// Bytes read so far and the sha256 (hex) of them (empty if hashing was turned off).
    pub fn finish(self) -> (u64, String) {
        let digest = self.hasher.map(|h| hex::encode(h.finalize()));
        (self.read, digest.unwrap_or_default())
    }
}
