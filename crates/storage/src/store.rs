//! `Store`: a rooted view of an object store with retries, typed errors and keys relative to the root.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::{Result, StorageError};
use crate::options::StoreOptions;
use crate::retry::RetryPolicy;
use crate::uri::open_backend;

/// What a listing or a head says about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the store root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the object was last written.
    pub last_modified: SystemTime,
}

/// A one-level listing: the objects directly under a prefix and the sub-prefixes ("folders").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Objects directly under the prefix.
    pub objects: Vec<ObjectInfo>,
    /// Sub-prefixes, relative to the store root, without a trailing `/`.
    pub prefixes: Vec<String>,
}

/// What a finished write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// The key, relative to the store root.
    pub key: String,
    /// Bytes written.
    pub bytes: u64,
    /// The blob's digest: the sha256 of its parts of `part_size` bytes, combined S3's way
    /// ([`crate::digest::combine`]: plain lower-case hex for one part, `<hex>-N` for N parts).
    pub sha256: String,
    /// The part size the digest was computed with.
    pub part_size: u64,
}

/// An object store rooted at a base URI. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<dyn ObjectStore>,
    root: Path,
    uri: Arc<str>,
    pub(crate) options: StoreOptions,
    /// For a local store: the folder the root key stands for, so deletes can refuse to follow
    /// symbolic links out of it.
    local_root: Option<Arc<PathBuf>>,
    /// Whether the backend's HTTP client retries requests by itself (so a create may have been sent
    /// twice even when this layer tried once, and this layer retries only the lost requests that client
    /// leaves alone: [`RetryPolicy::run`]).
    client_retries: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("uri", &self.uri).finish()
    }
}

impl Store {
    /// Opens the store a URI names, with default options, the retry budget's environment
    /// overrides ([`RetryPolicy::from_env`]) and the part size's ([`crate::PART_ENV`]).
    pub fn open(uri: &str) -> Result<Self> {
        let invalid = |reason| StorageError::InvalidUri {
            uri: crate::redact::redact_uri(uri),
            reason,
        };
        let retry = RetryPolicy::from_env().map_err(invalid)?;
        let part_size = crate::options::part_size_from_env()
            .map_err(invalid)?
            .unwrap_or(StoreOptions::default().part_size);
        Self::open_with(
            uri,
            StoreOptions {
                retry,
                part_size,
                ..StoreOptions::default()
            },
        )
    }

    /// Opens the store a URI names.
    pub fn open_with(uri: &str, options: StoreOptions) -> Result<Self> {
        Self::open_with_transport(uri, options, None)
    }

    /// Opens the store a URI names, with `transport` carrying the HTTP requests of an `s3://` store
    /// in place of the default client (tests inject network faults with it; other schemes ignore
    /// it).
    pub fn open_with_transport(
        uri: &str,
        options: StoreOptions,
        transport: Option<Arc<dyn object_store::client::HttpConnector>>,
    ) -> Result<Self> {
        Self::from_backend(open_backend(uri, &options, transport)?, options)
    }

    /// Opens the store a URI names with its settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …)
    /// read through `settings` instead of the process environment, and `transport` as in
    /// [`Store::open_with_transport`] (tests point one process at several servers with it).
    pub fn open_with_settings(
        uri: &str,
        options: StoreOptions,
        settings: &dyn Fn(&str) -> Option<String>,
        transport: Option<Arc<dyn object_store::client::HttpConnector>>,
    ) -> Result<Self> {
        Self::from_backend(
            crate::uri::open_backend_in(uri, &options, settings, transport)?,
            options,
        )
    }

    fn from_backend(backend: crate::uri::Backend, options: StoreOptions) -> Result<Self> {
        Ok(Self {
            inner: backend.store,
            root: backend.root,
            uri: backend.display.into(),
            options,
            local_root: backend.local_root.map(Arc::new),
            client_retries: backend.client_retries,
        })
    }

    /// Wraps an existing object store (tests use this to inject failures). `root` is a key prefix.
    pub fn from_object_store(
        inner: Arc<dyn ObjectStore>,
        root: &str,
        name: &str,
        options: StoreOptions,
    ) -> Result<Self> {
        let root = Path::parse(root.trim_matches('/')).map_err(|e| StorageError::InvalidUri {
            uri: name.to_string(),
            reason: format!("bad root {root:?}: {e}"),
        })?;
        Ok(Self {
            inner,
            root,
            uri: name.into(),
            options,
            local_root: None,
            client_retries: false,
        })
    }

    /// Whether the backend's HTTP client retries by itself (cloud stores): a request may then have
    /// reached the server more often than it was sent from here.
    pub(crate) fn client_retries(&self) -> bool {
        self.client_retries
    }

    /// The store's URI (or local folder), safe to print.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// For a local store, the file `key` stands for (the trainer appends logs to it in place);
    /// `None` for object stores.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root
            .as_ref()
            .map(|root| root.join(key.trim_matches('/')))
    }

    /// The options in force.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// A store rooted at `key` under this one, sharing the connection.
    pub fn sub_store(&self, key: &str) -> Result<Self> {
        let root = self.path(key)?;
        Ok(Self {
            inner: self.inner.clone(),
            uri: format!(
                "{}/{}",
                self.uri.trim_end_matches('/'),
                key.trim_matches('/')
            )
            .into(),
            root,
            options: self.options,
            local_root: self
                .local_root
                .as_ref()
                .map(|r| Arc::new(r.join(key.trim_matches('/')))),
            client_retries: self.client_retries,
        })
    }

    /// Writes `data` to `key`, replacing what was there.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        self.retrying("put", || {
            self.inner
                .put_opts(&path, PutPayload::from(data.clone()), PutOptions::default())
        })
        .await
        .map_err(|e| self.error("put", key, e))?;
        Ok(())
    }

    /// Writes `data` to `key` only if nothing is there: the commit primitive. A second create returns
    /// [`StorageError::AlreadyExists`].
    ///
    /// A create is the one request that cannot simply be repeated: when its answer is lost it may
    /// have landed. It is retried all the same (within the one deadline), and a retry that finds the
    /// key taken settles the question by reading back what is there: our own bytes mean created.
    pub async fn put_create(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        let started = std::time::Instant::now();
        let mut tries = 0u32;
        let result = self
            .retrying("create", || {
                tries += 1;
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                self.inner
                    .put_opts(&path, PutPayload::from(data.clone()), opts)
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // A create retried (here, or inside the backend's HTTP client) may have landed the first
            // time with its answer lost: it is ours exactly when the bytes there are the bytes we
            // wrote.
            Err(object_store::Error::AlreadyExists { .. }) if tries > 1 || self.client_retries => {
                if self.holds(key, &data, None).await {
                    Ok(())
                } else {
                    Err(self.already_exists(key))
                }
            }
            Err(object_store::Error::AlreadyExists { .. }) => Err(self.already_exists(key)),
            // The outcome is unknown (the answer was lost and the deadline has passed): the same
            // test, in what is left of the call's time (deadline + one request timeout).
            Err(_)
                if self
                    .holds(
                        key,
                        &data,
                        Some(
                            self.options
                                .retry
                                .give_up_after()
                                .saturating_sub(started.elapsed()),
                        ),
                    )
                    .await =>
            {
                Ok(())
            }
            Err(e) => Err(self.error("create", key, e)),
        }
    }

    /// After a create whose answer may have been lost: whether `key` holds exactly `data` (then the
    /// create landed; said in the log). Read within the retry budget, or within `within`.
    async fn holds(&self, key: &str, data: &Bytes, within: Option<std::time::Duration>) -> bool {
        let there = match within {
            None => self.get(key).await.ok(),
            Some(within) => {
                let path = self.path(key);
                let once = async { self.inner.get(&path.ok()?).await.ok()?.bytes().await.ok() };
                tokio::time::timeout(within, once).await.ok().flatten()
            }
        };
        let ours = there.is_some_and(|there| there == *data);
        if ours {
            tracing::warn!(
                key,
                "a create's answer was lost, but its bytes are there: created"
            );
        }
        ours
    }

    /// Runs one store operation under the retry budget ([`RetryPolicy::run`]).
    pub(crate) async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        self.options.retry.run(what, self.client_retries, op).await
    }

    /// Reads a whole object into memory.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        self.retrying("get", || async {
            self.inner.get(&path).await?.bytes().await
        })
        .await
        .map_err(|e| self.error("get", key, e))
    }

    /// Reads a whole object into memory, `None` when there is none at `key`.
    pub async fn get_if_exists(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads the bytes `range` of an object.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key)?;
        self.retrying("get_range", || self.inner.get_range(&path, range.clone()))
            .await
            .map_err(|e| self.error("get_range", key, e))
    }

    /// Size and time of an object; [`StorageError::NotFound`] when absent.
    pub async fn head(&self, key: &str) -> Result<ObjectInfo> {
        let path = self.path(key)?;
        let meta = self
            .retrying("head", || self.inner.head(&path))
            .await
            .map_err(|e| self.error("head", key, e))?;
        Ok(self.info(meta))
    }

    /// Whether an object exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.head(key).await {
            Ok(_) => Ok(true),
            Err(StorageError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every object under `prefix`, at any depth, sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let path = self.path(prefix)?;
        let metas: Vec<object_store::ObjectMeta> = self
            .retrying("list", || self.inner.list(Some(&path)).try_collect())
            .await
            .map_err(|e| self.error("list", prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas.into_iter().map(|m| self.info(m)).collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The objects and sub-prefixes directly under `prefix`, sorted by key.
    pub async fn list_dir(&self, prefix: &str) -> Result<Listing> {
        let path = self.path(prefix)?;
        let result = self
            .retrying("list", || self.inner.list_with_delimiter(Some(&path)))
            .await
            .map_err(|e| self.error("list", prefix, e))?;
        let mut objects: Vec<ObjectInfo> =
            result.objects.into_iter().map(|m| self.info(m)).collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        let mut prefixes: Vec<String> = result
            .common_prefixes
            .iter()
            .map(|p| self.relative(p))
            .collect();
        prefixes.sort();
        Ok(Listing { objects, prefixes })
    }

    /// Deletes an object; deleting an absent one is not an error. (Folders are deleted with
    /// [`Store::delete_prefix`], which never follows a symbolic link below the folder; a link above it
    /// — the run's `checkpoints/` moved to another disk — is the store's own layout.)
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match self.retrying("delete", || self.inner.delete(&path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    /// Deletes every object under `prefix`; returns the keys removed. In a local store a symbolic
    /// link at or under `prefix` is removed itself, never followed, so nothing outside the prefix is
    /// ever deleted.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let depth = prefix.trim_matches('/').split('/').count();
        let objects = self.list(prefix).await?;
        let mut removed = Vec::new();
        for o in &objects {
            match self.symlink_above(&o.key, depth.saturating_sub(1)) {
                Some(link) => {
                    // Unlink the link itself (once), not what it points at.
                    let key = self.key_of_local(&link);
                    if !removed.contains(&key) {
                        unlink(&link)?;
                        removed.push(key);
                    }
                }
                None => {
                    self.delete(&o.key).await?;
                    removed.push(o.key.clone());
                }
            }
        }
        // A link to a folder that holds nothing is not listed at all: remove it too.
        if let Some(root) = &self.local_root {
            let p = root.join(prefix.trim_matches('/'));
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                unlink(&p)?;
                removed.push(prefix.trim_matches('/').to_string());
            }
        }
        Ok(removed)
    }

    /// In a local store: the first symbolic link among the folders (and the object itself, when it
    /// is a folder link) on the way to `key`, skipping the first `skip` segments. `None` elsewhere.
    fn symlink_above(&self, key: &str, skip: usize) -> Option<PathBuf> {
        let root = self.local_root.as_ref()?;
        let parts: Vec<&str> = key.trim_matches('/').split('/').collect();
        let mut p = PathBuf::from(root.as_ref());
        for (i, part) in parts.iter().enumerate() {
            p.push(part);
            let is_last = i + 1 == parts.len();
            if i < skip {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                return None;
            };
            // A link to a file as the last segment is deleted as the link itself; a link anywhere
            // above it would be followed.
            if meta.file_type().is_symlink() && (!is_last || p.is_dir()) {
                return Some(p);
            }
        }
        None
    }

    /// The key of a path inside the local root.
    fn key_of_local(&self, p: &std::path::Path) -> String {
        self.local_root
            .as_ref()
            .and_then(|r| p.strip_prefix(r.as_ref()).ok())
            .map(|rel| rel.to_string_lossy().replace('\\', "/"))
            .unwrap_or_else(|| p.display().to_string())
    }

    /// Copies an object inside the store (server-side where the backend can).
    pub async fn copy(&self, from: &str, to: &str) -> Result<()> {
        let (src, dst) = (self.path(from)?, self.path(to)?);
        self.retrying("copy", || self.inner.copy(&src, &dst))
            .await
            .map_err(|e| self.error("copy", from, e))
    }

    /// The full object path of a relative key.
    pub(crate) fn path(&self, key: &str) -> Result<Path> {
        let key = key.trim_matches('/');
        let joined = match (self.root.as_ref().is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => self.root.to_string(),
            (false, false) => format!("{}/{key}", self.root),
        };
        Path::parse(&joined).map_err(|e| StorageError::InvalidName {
            what: "storage key",
            value: key.to_string(),
            rule: format!("must be `/`-separated segments without `.`, `..` or empty parts ({e})"),
        })
    }

    fn relative(&self, path: &Path) -> String {
        let full = path.as_ref();
        let root = self.root.as_ref();
        if root.is_empty() {
            return full.to_string();
        }
        full.strip_prefix(root)
            .map(|rest| rest.trim_start_matches('/').to_string())
            .unwrap_or_else(|| full.to_string())
    }

    fn info(&self, meta: object_store::ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            key: self.relative(&meta.location),
            size: meta.size,
            last_modified: meta.last_modified.into(),
        }
    }

    fn already_exists(&self, key: &str) -> StorageError {
        StorageError::AlreadyExists {
            store: self.uri.to_string(),
            key: key.to_string(),
        }
    }

    /// Maps a backend error to the crate's error, keeping "not found" and "exists" typed.
    pub(crate) fn error(
        &self,
        op: &'static str,
        key: &str,
        e: object_store::Error,
    ) -> StorageError {
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound {
                store: self.uri.to_string(),
                key: key.to_string(),
            },
            object_store::Error::AlreadyExists { .. } => self.already_exists(key),
            source => StorageError::Backend {
                op,
                store: self.uri.to_string(),
                key: key.to_string(),
                source: Box::new(source),
            },
        }
    }
}

/// Removes a symbolic link itself, never what it points at.
fn unlink(link: &std::path::Path) -> Result<()> {
    std::fs::remove_file(link).map_err(|source| StorageError::Io {
        op: "remove the symbolic link",
        path: link.to_path_buf(),
        source,
    })?;
    tracing::warn!(link = %link.display(), "removed a symbolic link without following it");
    Ok(())
}
