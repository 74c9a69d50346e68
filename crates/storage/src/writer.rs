//! `BlobWriter`: stream a blob of any size with bounded memory, hashing it as it passes.
//!
//! Bytes are cut into parts of `part_size`; at most `max_concurrency` parts are in flight, so memory
//! stays at about `part_size * (max_concurrency + cores + 2)` whatever the blob's size. Each part's
//! sha256 is computed on a blocking thread of its own while the parts upload ([`PartHasher`]): hashing
//! runs on all cores and overlaps the writing instead of adding to it. The blob's digest is S3's
//! composite of the part digests ([`crate::digest`]). A blob that ends before its first part is full
//! is written with one plain put (its digest is then its plain sha256). Until [`BlobWriter::finish`] returns, nothing is
//! visible under the key: a failure, an explicit [`BlobWriter::abort`] or a drop aborts the upload.

use bytes::{Bytes, BytesMut};
use object_store::path::Path;
use object_store::{MultipartUpload, PutOptions, PutPayload};
use tokio::task::JoinSet;

use crate::digest::{digest_bytes, DigestScheme, PartHasher};

use crate::error::{Result, StorageError};
use crate::store::{BlobInfo, Store};

/// A streaming write to one key. See the module documentation.
pub struct BlobWriter {
    store: Store,
    key: String,
    path: Path,
    hasher: Option<PartHasher>,
    bytes: u64,
    buffer: BytesMut,
    upload: Option<Upload>,
    /// When the write started (a completion whose answer was lost is recognised by a newer object).
    started: std::time::SystemTime,
}

/// An open multipart upload and its parts in flight.
struct Upload {
    upload: Box<dyn MultipartUpload>,
    in_flight: JoinSet<object_store::Result<()>>,
}

impl BlobWriter {
    /// A streaming writer to `key` of `store`; nothing is visible there until [`BlobWriter::finish`].
    pub fn new(store: &Store, key: &str) -> Result<Self> {
        let store = store.clone();
        let path = store.path(key)?;
        let part_size = store.options.part_size.max(1);
        Ok(Self {
            store,
            key: key.to_string(),
            path,
            hasher: None,
            bytes: 0,
            buffer: BytesMut::with_capacity(part_size.min(1 << 20)),
            upload: None,
            started: std::time::SystemTime::now(),
        })
    }

    /// The key being written.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Bytes accepted so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Appends `data` (copied into part buffers).
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        self.bytes += data.len() as u64;
        let part_size = self.part_size();
        while !data.is_empty() {
            let room = part_size - self.buffer.len();
            let take = room.min(data.len());
            if self.buffer.capacity() - self.buffer.len() < take {
                self.buffer.reserve(part_size - self.buffer.len());
            }
            self.buffer.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buffer.len() == part_size {
                let part = self.buffer.split().freeze();
                self.send_part(part).await?;
            }
        }
        Ok(())
    }

    /// Appends `data` without copying it where it lines up with part boundaries.
    pub async fn write_bytes(&mut self, mut data: Bytes) -> Result<()> {
        let part_size = self.part_size();
        if !self.buffer.is_empty() || data.len() < part_size {
            let take = (part_size - self.buffer.len()).min(data.len());
            let head = data.split_to(take);
            self.write(&head).await?;
        }
        while data.len() >= part_size {
            let part = data.split_to(part_size);
            self.bytes += part.len() as u64;
            self.send_part(part).await?;
        }
        if !data.is_empty() {
            self.write(&data).await?;
        }
        Ok(())
    }

    /// Completes the write and makes the blob visible under its key.
    pub async fn finish(mut self) -> Result<BlobInfo> {
        let tail = self.buffer.split().freeze();
        let part_size = self.part_size() as u64;
        let sha256 = match self.upload.take() {
            None => {
                let scheme = DigestScheme::parts(part_size, self.store.options.checksum);
                let sha256 = digest_bytes(tail.clone(), scheme).await?;
                let payload = PutPayload::from(tail);
                self.store
                    .retrying("put", || {
                        self.store.inner.put_opts(
                            &self.path,
                            payload.clone(),
                            PutOptions::default(),
                        )
                    })
                    .await
                    .map_err(|e| self.store.error("put", &self.key, e))?;
                sha256
            }
            Some(mut upload) => {
                let mut hasher = self.hasher.take();
                if !tail.is_empty() {
                    if let Some(h) = hasher.as_mut() {
                        h.update_part(tail.clone()).await?;
                    }
                    upload.in_flight.spawn(upload.upload.put_part(tail.into()));
                }
                // Hash the last part while the uploads finish.
                let digest = match hasher {
                    Some(h) => tokio::spawn(h.finish()),
                    None => return Err(StorageError::Task("part hasher missing".into())),
                };
                let done = match upload.drain(0).await {
                    Ok(()) => match upload.upload.complete().await {
                        Ok(_) => Ok(()),
                        Err(e) if self.completed_anyway(&e).await => Ok(()),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                if let Err(e) = done {
                    upload
                        .abort(&self.key, Some(self.failed_abort_time()))
                        .await;
                    return Err(self.upload_error("upload", e));
                }
                digest
                    .await
                    .map_err(|e| StorageError::Task(format!("the hashing task failed: {e}")))??
            }
        };
        tracing::debug!(key = %self.key, bytes = self.bytes, %sha256, "blob written");
        Ok(BlobInfo {
            key: std::mem::take(&mut self.key),
            bytes: self.bytes,
            sha256,
            part_size,
        })
    }

    /// Gives the write up; nothing becomes visible.
    pub async fn abort(mut self) -> Result<()> {
        if let Some(upload) = self.upload.take() {
            upload.abort(&self.key, None).await;
        }
        Ok(())
    }

    /// After a failed completion: whether it landed all the same (its answer was lost and the
    /// retried completion found the upload gone). It did when the key now holds an object of the
    /// size written, written since this upload started. Said in the log.
    async fn completed_anyway(&self, e: &object_store::Error) -> bool {
        if !self.store.client_retries() {
            return false;
        }
        let Ok(there) = self.store.head(&self.key).await else {
            return false;
        };
        let fresh = there.last_modified + std::time::Duration::from_secs(5) >= self.started;
        let landed = there.size == self.bytes && fresh;
        if landed {
            tracing::warn!(key = %self.key, %e, "a multipart completion's answer was lost, but the object is there: completed");
        }
        landed
    }

    /// The error of a started multipart upload that failed: [`StorageError::UploadLost`] when the
    /// server answered as if the upload it created did not exist (not found, or refused).
    fn upload_error(&self, op: &'static str, e: object_store::Error) -> StorageError {
        match e {
            object_store::Error::NotFound { .. } | object_store::Error::PermissionDenied { .. } => {
                StorageError::UploadLost {
                    store: self.store.uri().to_string(),
                    key: self.key.clone(),
                    source: Box::new(e),
                }
            }
            e => self.store.error(op, &self.key, e),
        }
    }

    /// The time an abort after a failure gets: one request (the failure spent the retry budget;
    /// an upload left behind is invisible and the store's lifecycle rules remove it).
    fn failed_abort_time(&self) -> std::time::Duration {
        self.store.options.retry.request_timeout
    }

    fn part_size(&self) -> usize {
        self.store.options.part_size.max(1)
    }

    async fn send_part(&mut self, part: Bytes) -> Result<()> {
        if self.upload.is_none() {
            let upload = self
                .store
                .retrying("start upload", || {
                    self.store
                        .inner
                        .put_multipart_opts(&self.path, Default::default())
                })
                .await
                .map_err(|e| self.store.error("start upload", &self.key, e))?;
            self.upload = Some(Upload {
                upload,
                in_flight: JoinSet::new(),
            });
            self.hasher = Some(PartHasher::with_checksum(
                self.part_size() as u64,
                self.store.options.checksum,
            ));
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update_part(part.clone()).await?;
        }
        let max = self.store.options.max_concurrency.max(1);
        let Some(upload) = self.upload.as_mut() else {
            return Err(StorageError::Task("upload vanished".into()));
        };
        let drained = upload.drain(max - 1).await;
        if let Err(e) = drained {
            let within = self.failed_abort_time();
            if let Some(upload) = self.upload.take() {
                upload.abort(&self.key, Some(within)).await;
            }
            return Err(self.upload_error("upload part", e));
        }
        upload.in_flight.spawn(upload.upload.put_part(part.into()));
        Ok(())
    }
}

impl Upload {
    /// Waits until at most `max` parts are in flight; the first failed part is the error.
    async fn drain(&mut self, max: usize) -> object_store::Result<()> {
        while self.in_flight.len() > max {
            match self.in_flight.join_next().await {
                Some(Ok(Ok(()))) | None => {}
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(join)) => {
                    return Err(object_store::Error::JoinError { source: join });
                }
            }
        }
        Ok(())
    }

    /// Aborts the upload; `within` bounds the time given to it (after a failure the call has
    /// already spent its retry budget), else the whole budget applies.
    async fn abort(mut self, key: &str, within: Option<std::time::Duration>) {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        let aborted = match within {
            None => self.upload.abort().await,
            Some(d) => match tokio::time::timeout(d, self.upload.abort()).await {
                Ok(r) => r,
                Err(_) => Err(object_store::Error::Generic {
                    store: "waypoint",
                    source: format!("no answer within {d:?}").into(),
                }),
            },
        };
        if let Err(e) = aborted {
            tracing::warn!(%key, %e, "could not abort multipart upload; the store's lifecycle rules must clean it");
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            let key = std::mem::take(&mut self.key);
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(async move { upload.abort(&key, None).await });
                }
                Err(_) => {
                    tracing::warn!(%key, "blob writer dropped outside a runtime; upload left for cleanup")
                }
            }
        }
    }
}
