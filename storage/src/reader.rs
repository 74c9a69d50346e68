//! `BlobReader`: stream an object (or a byte range of it) in chunks, hashing as the bytes pass.
//!
//! Local files are read straight from the file in large chunks on a blocking thread; remote objects
//! arrive as the backend's byte stream. Memory held is one chunk at a time.

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::{GetOptions, GetRange, GetResultPayload};
use sha2::{Digest, Sha256};

use crate::error::{Result, StorageError};
use crate::store::Store;

/// Chunk size for reads from local files.
const LOCAL_CHUNK: usize = 8 << 20;

/// A streaming read of one object. See the module documentation.
pub struct BlobReader {
    key: String,
    store: Store,
    source: Source,
    hasher: Sha256,
    read: u64,
    len: u64,
}

enum Source {
    File {
        file: Option<std::fs::File>,
        remaining: u64,
    },
    Stream(BoxStream<'static, object_store::Result<Bytes>>),
}

impl BlobReader {
    pub(crate) async fn open(store: &Store, key: &str, range: Option<Range<u64>>) -> Result<Self> {
        let path = store.path(key)?;
        let options = GetOptions {
            range: range.clone().map(GetRange::from),
            ..Default::default()
        };
        let result = store
            .options
            .retry
            .run("get", || store.inner.get_opts(&path, options.clone()))
            .await
            .map_err(|e| store.error("get", key, e))?;
        let got = result.range.clone();
        let len = got.end - got.start;
        let source = match result.payload {
            GetResultPayload::File(mut file, path) => {
                file.seek(SeekFrom::Start(got.start))
                    .map_err(|source| StorageError::Io {
                        op: "seek in",
                        path,
                        source,
                    })?;
                Source::File {
                    file: Some(file),
                    remaining: len,
                }
            }
            GetResultPayload::Stream(s) => Source::Stream(s),
        };
        Ok(Self {
            key: key.to_string(),
            store: store.clone(),
            source,
            hasher: Sha256::new(),
            read: 0,
            len,
        })
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
            Source::File { file, remaining } => {
                if *remaining == 0 {
                    return Ok(None);
                }
                let want = (*remaining).min(LOCAL_CHUNK as u64) as usize;
                let Some(mut f) = file.take() else {
                    return Err(StorageError::Task("local read interrupted".into()));
                };
                let (f, buf) = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; want];
                    let r = f.read_exact(&mut buf).map(|()| buf);
                    (f, r)
                })
                .await
                .map_err(|e| StorageError::Task(e.to_string()))?;
                *file = Some(f);
                let buf = buf.map_err(|source| StorageError::Io {
                    op: "read",
                    path: self.key.clone().into(),
                    source,
                })?;
                *remaining -= want as u64;
                Bytes::from(buf)
            }
            Source::Stream(s) => match s.next().await {
                None => return Ok(None),
                Some(r) => r.map_err(|e| self.store.error("read", &self.key, e))?,
            },
        };
        self.hasher.update(&chunk);
        self.read += chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// Reads everything left; returns the bytes read in all and their sha256 (hex).
    pub async fn drain(mut self) -> Result<(u64, String)> {
        while self.next_chunk().await?.is_some() {}
        Ok(self.finish())
    }

    /// Bytes read so far and the sha256 (hex) of them.
    pub fn finish(self) -> (u64, String) {
        (self.read, hex::encode(self.hasher.finalize()))
    }
}
