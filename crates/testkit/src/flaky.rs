//! `FlakyStore`: an object store wrapper that fails on purpose, to test retries and clean aborts;
//! `CorruptingTransport`: an HTTP transport for `s3://` stores that damages a part on the wire.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::FutureExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result, UploadPart,
};

/// What to break.
#[derive(Debug, Default)]
pub struct Faults {
    /// Calls (of any operation) still to fail with a transient error.
    pub fail_next_calls: AtomicUsize,
    /// Fail the part with this 1-based index of every multipart upload (0: none).
    pub fail_part: AtomicUsize,
    /// Multipart uploads aborted so far.
    pub aborts: AtomicUsize,
    /// Calls seen so far.
    pub calls: AtomicUsize,
    /// Create-only puts still to land and then fail as if their answer was lost on the way back.
    pub lose_create_answers: AtomicUsize,
}

/// Wraps a store; see [`Faults`].
#[derive(Debug)]
pub struct FlakyStore {
    /// The store that does the work.
    pub inner: Arc<dyn ObjectStore>,
    /// What to break, shared with the test.
    pub faults: Arc<Faults>,
}

fn transient(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "flaky",
        source: format!("injected transient failure in {what}").into(),
    }
}

impl FlakyStore {
    fn check(&self, what: &str) -> Result<()> {
        self.faults.calls.fetch_add(1, Ordering::SeqCst);
        let left = &self.faults.fail_next_calls;
        if left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(transient(what));
        }
        Ok(())
    }
}

impl fmt::Display for FlakyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlakyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FlakyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.check("put")?;
        let create = matches!(opts.mode, object_store::PutMode::Create);
        let result = self.inner.put_opts(location, payload, opts).await?;
        if create
            && self
                .faults
                .lose_create_answers
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(transient("create (written, answer lost)"));
        }
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check("put_multipart")?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FlakyUpload {
            inner,
            faults: self.faults.clone(),
            parts: 0,
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.check("get")?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        if let Err(e) = self.check("delete") {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Err(e) = self.check("list") {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.check("list")?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check("copy")?;
        self.inner.copy_opts(from, to, options).await
    }
}

use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use waypoint_storage::{RetryPolicy, Store, StoreOptions};

/// Store options for fault tests: small parts, quick retries for `deadline` (zero: none).
pub fn options(deadline: Duration) -> StoreOptions {
    StoreOptions {
        part_size: 1 << 20,
        max_concurrency: 3,
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            deadline,
            ..RetryPolicy::default()
        },
        fsync: false,
        checksum: Default::default(),
    }
}

/// Flaky wrappers over memory and local FS (the temp dir lives as long as the returned guard),
/// retrying transient failures for `deadline` (zero: not at all).
pub fn flaky_stores(
    deadline: Duration,
) -> Vec<(&'static str, Store, Arc<Faults>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let inners: Vec<(&'static str, Arc<dyn ObjectStore>)> = vec![
        ("memory", Arc::new(InMemory::new())),
        (
            "local",
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
        ),
    ];
    let mut out = Vec::new();
    for (name, inner) in inners {
        let faults = Arc::new(Faults::default());
        let flaky = Arc::new(FlakyStore {
            inner,
            faults: faults.clone(),
        });
        let store = Store::from_object_store(flaky, "root", name, options(deadline)).unwrap();
        out.push((name, store, faults, tempfile::tempdir().unwrap()));
    }
    // Keep the local store's directory alive with the first entry.
    out[1].3 = dir;
    out
}

#[derive(Debug)]
struct FlakyUpload {
    inner: Box<dyn MultipartUpload>,
    faults: Arc<Faults>,
    parts: usize,
}

#[async_trait]
impl MultipartUpload for FlakyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.parts += 1;
        if self.parts == self.faults.fail_part.load(Ordering::SeqCst) {
            let n = self.parts;
            return async move { Err(transient(&format!("part {n}"))) }.boxed();
        }
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.faults.aborts.fetch_add(1, Ordering::SeqCst);
        self.inner.abort().await
    }
}

/// An HTTP transport for `s3://` stores ([`waypoint_storage::Store::open_with_transport`]) that damages a request on
/// its way to the server: it flips one byte in the body of the upload of part `part` (1-based) of
/// a multipart upload, once, after the client has computed and signed the body's checksums — as a
/// bad NIC or proxy would. Everything else goes through the default client untouched.
#[derive(Debug)]
pub struct CorruptingTransport {
    /// The 1-based part number whose upload is damaged (once).
    pub part: usize,
    /// Part uploads damaged so far.
    pub damaged: Arc<AtomicUsize>,
    /// Answers to damaged uploads: their HTTP status codes.
    pub answers: Arc<std::sync::Mutex<Vec<u16>>>,
}

impl CorruptingTransport {
    /// A transport that damages the upload of part `part` once.
    pub fn new(part: usize) -> Arc<Self> {
        Arc::new(Self {
            part,
            damaged: Arc::default(),
            answers: Arc::default(),
        })
    }
}

#[derive(Debug)]
struct CorruptingService {
    inner: object_store::client::HttpClient,
    part: usize,
    damaged: Arc<AtomicUsize>,
    answers: Arc<std::sync::Mutex<Vec<u16>>>,
}

impl object_store::client::HttpConnector for CorruptingTransport {
    fn connect(
        &self,
        options: &object_store::ClientOptions,
    ) -> Result<object_store::client::HttpClient> {
        let inner = object_store::client::ReqwestConnector::default().connect(options)?;
        Ok(object_store::client::HttpClient::new(CorruptingService {
            inner,
            part: self.part,
            damaged: self.damaged.clone(),
            answers: self.answers.clone(),
        }))
    }
}

#[async_trait]
impl object_store::client::HttpService for CorruptingService {
    async fn call(
        &self,
        req: object_store::client::HttpRequest,
    ) -> std::result::Result<object_store::client::HttpResponse, object_store::client::HttpError>
    {
        use http_body_util::BodyExt;
        let wanted = format!("partNumber={}", self.part);
        let is_part = req.method() == "PUT"
            && req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == wanted));
        if !is_part || self.damaged.load(Ordering::SeqCst) > 0 {
            return self.inner.execute(req).await;
        }
        let (parts, body) = req.into_parts();
        let mut bytes = body.collect().await?.to_bytes().to_vec();
        let middle = bytes.len() / 2;
        if let Some(b) = bytes.get_mut(middle) {
            *b ^= 0x01;
        }
        self.damaged.fetch_add(1, Ordering::SeqCst);
        let req = object_store::client::HttpRequest::from_parts(parts, bytes.into());
        let answer = self.inner.execute(req).await;
        if let Ok(r) = &answer {
            self.answers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(r.status().as_u16());
        }
        answer
    }
}
