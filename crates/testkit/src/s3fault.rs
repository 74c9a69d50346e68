//! A real S3 test server that a test may kill, restart and freeze, behind a fault proxy.
//!
//! [`S3Server`] runs `s3s-fs` (the project's S3 test server, `scripts/setup.sh` installs it) on a
//! port and folder of its own. [`FaultyS3`] puts a TCP proxy on 127.0.0.1 in front of it that reads
//! each HTTP request's head, classifies it by the storage call it is ([`Call`]: method, query and
//! headers), and, for the Nth request of a chosen kind, injects a [`Fault`]: the server killed
//! (before it acts on the request, or after it acted but before its answer leaves) and restarted
//! after a while, frozen (SIGSTOP) for a while, or one `503 SlowDown`. So a test hits a fault at a
//! chosen call, not at whatever call the timing happens to land on. Each request gets a connection
//! of its own upstream (`Connection: close`), so every request is classified.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use waypoint_storage::{Store, StoreOptions};

/// The test server's access key.
pub const ACCESS_KEY: &str = "waypoint-test";
/// The test server's secret key.
pub const SECRET_KEY: &str = "waypoint-test-secret";
/// The bucket every test server holds.
pub const BUCKET: &str = "waypoint-test";

/// The kinds of request a store makes, as the proxy tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    /// `PUT` of a whole object.
    Put,
    /// `PUT` with `If-None-Match: *`: the create-only commit.
    Create,
    /// `POST ?uploads`: a multipart upload starts.
    StartUpload,
    /// `PUT ?partNumber&uploadId`: one part.
    Part,
    /// `POST ?uploadId`: a multipart upload completes.
    Complete,
    /// `DELETE ?uploadId`: a multipart upload is aborted.
    Abort,
    /// `GET` of a whole object.
    Get,
    /// `GET` with `Range`.
    GetRange,
    /// `HEAD`.
    Head,
    /// `GET ?list-type=2`.
    List,
    /// `DELETE` of one object.
    Delete,
    /// `POST ?delete`: a batch delete.
    DeleteBatch,
    /// `PUT` with `x-amz-copy-source`.
    Copy,
    /// Anything else.
    Other,
}

impl Call {
    /// Every kind a store makes.
    pub const ALL: [Call; 13] = [
        Call::Put,
        Call::Create,
        Call::StartUpload,
        Call::Part,
        Call::Complete,
        Call::Abort,
        Call::Get,
        Call::GetRange,
        Call::Head,
        Call::List,
        Call::Delete,
        Call::DeleteBatch,
        Call::Copy,
    ];
}

/// The kind of storage call an HTTP request is.
pub fn classify(method: &str, target: &str, headers: &[(String, String)]) -> Call {
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let has = |name: &str| {
        query
            .split('&')
            .any(|kv| kv.split('=').next() == Some(name))
    };
    let header = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    match method {
        "PUT" if has("partNumber") => Call::Part,
        "PUT" if header("x-amz-copy-source") => Call::Copy,
        "PUT" if header("if-none-match") => Call::Create,
        "PUT" => Call::Put,
        "POST" if has("uploads") => Call::StartUpload,
        "POST" if has("uploadId") => Call::Complete,
        "POST" if has("delete") => Call::DeleteBatch,
        "DELETE" if has("uploadId") => Call::Abort,
        "DELETE" => Call::Delete,
        "GET" if has("list-type") => Call::List,
        "GET" if header("range") => Call::GetRange,
        "GET" => Call::Get,
        "HEAD" => Call::Head,
        _ => Call::Other,
    }
}

/// What to do to the server at the chosen request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The server is killed as the request arrives, before acting on it (the request and every one
    /// in flight die with it); nothing listens for the duration; then it restarts on its port with
    /// its data.
    Outage(Duration),
    /// The server acts on the request and is killed before its answer leaves (the answer is lost);
    /// down for the duration, then restarted.
    LostAnswer(Duration),
    /// The server stops answering (SIGSTOP) as the request arrives, for the duration; requests
    /// sent meanwhile wait (or time out), then it goes on (SIGCONT).
    Freeze(Duration),
    /// This request is answered `503 SlowDown` and never reaches the server.
    SlowDown,
    /// This request is answered `404 NoSuchUpload` and never reaches the server: the server lost
    /// the multipart upload (as one that keeps uploads in memory does when it restarts).
    NoSuchUpload,
}

impl Fault {
    /// A short name for test output.
    pub fn name(&self) -> String {
        match self {
            Fault::Outage(d) => format!("outage {:.1}s", d.as_secs_f64()),
            Fault::LostAnswer(d) => format!("lost answer + outage {:.1}s", d.as_secs_f64()),
            Fault::Freeze(d) => format!("freeze {:.1}s", d.as_secs_f64()),
            Fault::SlowDown => "503 SlowDown".into(),
            Fault::NoSuchUpload => "404 NoSuchUpload".into(),
        }
    }
}

/// The `s3s-fs` binary, when installed (`WAYPOINT_S3S_BIN`, else where `scripts/setup.sh` puts it).
/// Missing: `None`, or a failure when `WAYPOINT_REQUIRE_S3` is set.
pub fn s3s_binary() -> Option<PathBuf> {
    let bin = std::env::var_os("WAYPOINT_S3S_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/waypoint/s3s/bin/s3s-fs"))
        })
        .filter(|p| p.is_file());
    if bin.is_none() {
        assert!(
            std::env::var_os("WAYPOINT_REQUIRE_S3").is_none(),
            "WAYPOINT_REQUIRE_S3 is set but s3s-fs is not installed (scripts/setup.sh installs it)"
        );
        eprintln!("skipped: s3s-fs is not installed (scripts/setup.sh installs it)");
    }
    bin
}

/// An `s3s-fs` server on a port and folder of its own, which a test may kill, restart and freeze.
#[derive(Debug)]
pub struct S3Server {
    bin: PathBuf,
    port: u16,
    root: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl S3Server {
    /// Starts a server, or `None` when `s3s-fs` is not installed (see [`s3s_binary`]).
    pub fn start() -> Option<Arc<Self>> {
        let bin = s3s_binary()?;
        let root = tempfile::tempdir().expect("server folder");
        std::fs::create_dir_all(root.path().join(BUCKET)).expect("bucket folder");
        let server = Arc::new(Self {
            bin,
            port: crate::free_port(),
            root,
            child: Mutex::new(None),
        });
        server.spawn();
        Some(server)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the process and waits until it accepts connections.
    fn spawn(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("s3s-fs.log"))
            .expect("server log");
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port over the same folder.
    pub fn restart(&self) {
        self.kill();
        self.spawn();
    }

    /// Multipart uploads started and neither completed nor aborted (`s3s-fs` keeps one record file
    /// per upload in its folder).
    pub fn pending_uploads(&self) -> usize {
        std::fs::read_dir(self.root.path())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.starts_with(".upload-") && name.ends_with(".json")
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{signal} failed");
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
    }
}

/// A fault armed for the `nth` (1-based) request of kind `call`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Armed {
    /// The kind of request.
    pub call: Call,
    /// Which one of that kind, counted from when it was armed (1-based).
    pub nth: usize,
    /// What happens then.
    pub fault: Fault,
}

#[derive(Debug, Default)]
struct Counts {
    /// Requests seen per kind since the counts were last cleared.
    seen: HashMap<Call, usize>,
    /// Every request since the counts were last cleared: its kind and target (path and query).
    log: Vec<(Call, String)>,
    armed: Option<Armed>,
    /// When set, the armed fault's `nth` counts from the first request whose target contains it.
    marker: Option<String>,
    /// Requests of the armed kind counted towards its `nth`.
    matched: usize,
    /// Faults injected: (kind, nth, fault, when).
    injected: Vec<(Armed, Instant)>,
}

#[derive(Debug)]
struct Shared {
    server: Arc<S3Server>,
    counts: Mutex<Counts>,
    conns: Mutex<Vec<tokio::task::AbortHandle>>,
    outage: tokio::sync::mpsc::UnboundedSender<Duration>,
}

/// The S3 test server behind the fault proxy. See the module documentation.
pub struct FaultyS3 {
    /// The server behind the proxy.
    pub server: Arc<S3Server>,
    port: u16,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for FaultyS3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyS3")
            .field("port", &self.port)
            .finish()
    }
}

impl FaultyS3 {
    /// A fresh server and its proxy, or `None` when `s3s-fs` is not installed.
    pub fn start() -> Option<Self> {
        let server = S3Server::start()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            server: server.clone(),
            counts: Mutex::default(),
            conns: Mutex::default(),
            outage: tx,
        });
        let port = crate::free_port();
        // Entered, not blocked on: a test may start the proxy from inside its own runtime.
        let listener = {
            let _in = rt.enter();
            listen(port).expect("proxy listens")
        };
        rt.spawn(accept_loop(shared.clone(), listener, port, rx));
        Some(Self {
            server,
            port,
            shared,
            rt: Some(rt),
        })
    }

    /// The proxy's URL (what `AWS_ENDPOINT_URL` is set to).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The settings a process needs to reach the server through the proxy.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn uri(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{}", prefix.trim_matches('/'))
    }

    /// A store under `prefix` that reaches the server through the proxy.
    pub fn store(&self, prefix: &str, options: StoreOptions) -> Store {
        let settings: HashMap<&str, String> = self.settings().into_iter().collect();
        Store::open_with_settings(
            &self.uri(prefix),
            options,
            &|name| settings.get(name).cloned(),
            None,
        )
        .expect("open the store behind the proxy")
    }

    /// Arms `fault` for the `nth` request of kind `call` from now (clears the counts).
    pub fn arm(&self, call: Call, nth: usize, fault: Fault) {
        self.arm_where(call, None, nth, fault);
    }

    /// Arms `fault` for the `nth` request of kind `call` after the first request (of any kind)
    /// whose target (path and query) contains `marker`, counted from now (clears the counts). For
    /// a call whose place among the others of its kind depends on timing (status writes come as
    /// often as the clock says), counting from a landmark keeps the cell deterministic.
    pub fn arm_where(&self, call: Call, marker: Option<&str>, nth: usize, fault: Fault) {
        let mut c = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.seen.clear();
        c.log.clear();
        c.matched = 0;
        c.marker = marker.map(str::to_string);
        c.armed = Some(Armed { call, nth, fault });
    }

    /// Disarms any fault not yet injected and clears the counts.
    pub fn disarm(&self) {
        let mut c = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.seen.clear();
        c.log.clear();
        c.matched = 0;
        c.marker = None;
        c.armed = None;
    }

    /// Every request since the last [`FaultyS3::arm`] / [`FaultyS3::disarm`], in the order the
    /// proxy read them: kind and target (path and query).
    pub fn requests(&self) -> Vec<(Call, String)> {
        let c = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.log.clone()
    }

    /// The faults injected so far.
    pub fn injected(&self) -> Vec<Armed> {
        let c = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.injected.iter().map(|(a, _)| *a).collect()
    }

    /// When the first fault was injected.
    pub fn injected_at(&self) -> Option<Instant> {
        let c = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.injected.first().map(|(_, at)| *at)
    }

    /// Requests seen per kind since the last [`FaultyS3::arm`] / [`FaultyS3::disarm`].
    pub fn seen(&self) -> HashMap<Call, usize> {
        let c = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.seen.clone()
    }
}

impl Drop for FaultyS3 {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(([127, 0, 0, 1], port).into())?;
    socket.listen(1024)
}

/// Accepts connections; an outage closes the listener (connections are refused), cuts every
/// connection in flight, kills the server, and after the outage restarts it and listens again.
async fn accept_loop(
    shared: Arc<Shared>,
    mut listener: TcpListener,
    port: u16,
    mut outages: tokio::sync::mpsc::UnboundedReceiver<Duration>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let s = shared.clone();
                let task = tokio::spawn(async move {
                    let _ = handle(s, client).await;
                });
                let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|h| !h.is_finished());
                conns.push(task.abort_handle());
            }
            Some(down) = outages.recv() => {
                drop(listener);
                for h in shared.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                    h.abort();
                }
                let server = shared.server.clone();
                let _ = tokio::task::spawn_blocking(move || server.kill()).await;
                tokio::time::sleep(down).await;
                let server = shared.server.clone();
                let _ = tokio::task::spawn_blocking(move || server.restart()).await;
                listener = loop {
                    match listen(port) {
                        Ok(l) => break l,
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                };
                // Outages signalled while this one lasted are part of it.
                while outages.try_recv().is_ok() {}
            }
        }
    }
}

/// Reads a request's head (through the blank line); returns it and the body bytes read past it.
async fn read_head(client: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > 256 << 10 {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Method, target and headers of a request head.
fn parse_head(head: &[u8]) -> (String, String, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    (method, target, headers)
}

/// The head with `Connection: close` (one request per upstream connection).
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len() + 20);
    for line in text.trim_end_matches("\r\n").split("\r\n") {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

async fn handle(shared: Arc<Shared>, mut client: TcpStream) -> std::io::Result<()> {
    let (head, rest) = read_head(&mut client).await?;
    let (method, target, headers) = parse_head(&head);
    let call = classify(&method, &target, &headers);
    let fault = {
        let mut c = shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.seen.entry(call).or_insert(0) += 1;
        c.log.push((call, target.clone()));
        let counts = c.armed.is_some_and(|a| a.call == call) && c.marker.is_none();
        if c.marker.as_deref().is_some_and(|m| target.contains(m)) {
            c.marker = None;
        }
        if counts {
            c.matched += 1;
        }
        match c.armed {
            Some(a) if counts && a.nth == c.matched => {
                c.armed = None;
                c.injected.push((a, Instant::now()));
                Some(a.fault)
            }
            _ => None,
        }
    };
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    match fault {
        Some(f @ (Fault::SlowDown | Fault::NoSuchUpload)) => {
            // Take the body first, so the client reads the answer rather than a broken pipe.
            pass_body(&mut client, length.saturating_sub(rest.len()), None).await?;
            let (status, code, message) = if f == Fault::SlowDown {
                (
                    "503 Service Unavailable",
                    "SlowDown",
                    "Please reduce your request rate.",
                )
            } else {
                (
                    "404 Not Found",
                    "NoSuchUpload",
                    "The specified upload does not exist.",
                )
            };
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                 <Message>{message}</Message></Error>"
            );
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            client.write_all(head.as_bytes()).await?;
            if method != "HEAD" {
                client.write_all(body.as_bytes()).await?;
            }
            client.shutdown().await
        }
        Some(Fault::Outage(down)) => {
            let _ = shared.outage.send(down);
            Ok(())
        }
        Some(Fault::LostAnswer(down)) => {
            // Let the server act on the whole request and answer; the answer never leaves.
            let mut up = TcpStream::connect(("127.0.0.1", shared.server.port())).await?;
            up.write_all(&closing(&head)).await?;
            up.write_all(&rest).await?;
            pass_body(
                &mut client,
                length.saturating_sub(rest.len()),
                Some(&mut up),
            )
            .await?;
            let mut answer = Vec::new();
            let _ = up.read_to_end(&mut answer).await;
            let _ = shared.outage.send(down);
            Ok(())
        }
        Some(Fault::Freeze(d)) => {
            shared.server.signal("STOP");
            let server = shared.server.clone();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                let _ = tokio::task::spawn_blocking(move || server.signal("CONT")).await;
            });
            forward(&shared, client, &head, &rest).await
        }
        None => forward(&shared, client, &head, &rest).await,
    }
}

/// Reads the `left` bytes of a request body still to come from `client`, into `to` (or nowhere).
async fn pass_body(
    client: &mut TcpStream,
    mut left: usize,
    mut to: Option<&mut TcpStream>,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 << 10];
    while left > 0 {
        let n = client.read(&mut chunk[..left.min(64 << 10)]).await?;
        if n == 0 {
            break;
        }
        if let Some(to) = to.as_mut() {
            to.write_all(&chunk[..n]).await?;
        }
        left -= n;
    }
    Ok(())
}

async fn forward(
    shared: &Shared,
    mut client: TcpStream,
    head: &[u8],
    rest: &[u8],
) -> std::io::Result<()> {
    let mut up = TcpStream::connect(("127.0.0.1", shared.server.port())).await?;
    up.write_all(&closing(head)).await?;
    up.write_all(rest).await?;
    tokio::io::copy_bidirectional(&mut client, &mut up).await?;
    Ok(())
}

/// Runs `cell` over every item of `cells`, `width` at once (fault cells mostly wait out their
/// faults, so more than the cores), each result reported by `report` as it comes; returns the
/// results in the order of `cells`.
pub fn run_cells<T: Sync, R: Send>(
    cells: &[T],
    width: usize,
    cell: impl Fn(&T) -> R + Sync,
    report: impl Fn(&T, &R) + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new(cells.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..width.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(item) = cells.get(i) else { break };
                let r = cell(item);
                report(item, &r);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every cell ran"))
        .collect()
}

/// How many fault cells to run at once: twice the cores, from 4 to 16.
pub fn cell_width() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .clamp(4, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_apart_by_the_call_they_are() {
        let h = |k: &str| vec![(k.to_string(), "x".to_string())];
        let none = Vec::new();
        assert_eq!(classify("PUT", "/b/k", &none), Call::Put);
        assert_eq!(classify("PUT", "/b/k", &h("If-None-Match")), Call::Create);
        assert_eq!(classify("PUT", "/b/k", &h("x-amz-copy-source")), Call::Copy);
        assert_eq!(
            classify("PUT", "/b/k?partNumber=2&uploadId=u", &none),
            Call::Part
        );
        assert_eq!(classify("POST", "/b/k?uploads", &none), Call::StartUpload);
        assert_eq!(classify("POST", "/b/k?uploadId=u", &none), Call::Complete);
        assert_eq!(classify("POST", "/b?delete", &none), Call::DeleteBatch);
        assert_eq!(classify("DELETE", "/b/k?uploadId=u", &none), Call::Abort);
        assert_eq!(classify("DELETE", "/b/k", &none), Call::Delete);
        assert_eq!(
            classify("GET", "/b?list-type=2&prefix=p", &none),
            Call::List
        );
        assert_eq!(classify("GET", "/b/k", &h("Range")), Call::GetRange);
        assert_eq!(classify("GET", "/b/k", &none), Call::Get);
        assert_eq!(classify("HEAD", "/b/k", &none), Call::Head);
    }
}
