//! The token cache: a dataset tokenized once into one compact file, memory-mapped by every later
//! run, restart and rank of the node.
//!
//! File layout (little-endian), `<cache dir>/<key>.tokens`:
//!
//! | section | content |
//! |---|---|
//! | tokens | every document's ids, concatenated, `token_bytes` (1, 2 or 4: the smallest unsigned width that holds the vocabulary) each |
//! | mask   | one bit per token (bit `i % 8` of byte `i / 8`): whether the loss applies |
//! | bounds | one u64 per document: the token offset where it ends |
//! | footer | [`Meta`] as JSON, then its length (u64) and [`MAGIC`] |
//!
//! Every section starts on a 4 KiB boundary. The footer holds the xxh3 of each 64 MiB of the
//! sections, checked (in parallel, with reads that do not map the file) before a run trusts a
//! version of the file for the first time; `<key>.verified` then records that version (device,
//! inode, size, modification time), so that later opens check only the footer and sections —
//! opening costs the same whatever the size — and anything that rewrites, truncates or replaces
//! the file makes the next open check every byte again.
//!
//! The key is a fingerprint of everything that changes the tokens (see
//! [`crate::cache_key`]). A cache is built under a temporary name and published by a rename,
//! under an exclusive lock on `<key>.lock` that the other processes of the node wait on: one
//! builds, the others map what it published. A builder's leftovers (killed mid-way) are never
//! opened and are removed by the next builder; a published file that fails its checks is rebuilt
//! with a warning.
//!
//! The build streams: a reader thread cuts the sources into chunks of whole lines, workers (one per
//! core) tokenize them, and the writer appends their results in order; chunks in flight are bounded
//! by credits the writer returns, so memory does not grow with the dataset.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use super::source::{stream_chunks, Chunk, Source};

/// The footer's last eight bytes.
pub const MAGIC: &[u8; 8] = b"WPTOKC01";
/// The format version (in [`Meta`]).
pub const VERSION: u32 = 1;
/// Bytes of payload per checksum.
const HASH_CHUNK: u64 = 64 << 20;
/// Section alignment.
const ALIGN: u64 = 4096;
/// How often a build logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// A byte range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// Where it starts.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// What the footer records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// [`VERSION`].
    pub version: u32,
    /// The cache key the file was built for.
    pub key: String,
    /// Bytes per token id: 1, 2 or 4.
    pub token_bytes: u8,
    /// Token ids in all.
    pub tokens: u64,
    /// Documents (rows) kept.
    pub documents: u64,
    /// Rows skipped as malformed.
    pub skipped: u64,
    /// The largest token id stored.
    pub max_token: u32,
    /// The tokens section.
    pub tokens_at: Section,
    /// The mask section.
    pub mask_at: Section,
    /// The bounds section.
    pub bounds_at: Section,
    /// xxh3-64 of each [`HASH_CHUNK`] of bytes `0..bounds_at.offset + bounds_at.len`, hex.
    pub hashes: Vec<String>,
}

/// Why a published cache file is not used (and is rebuilt).
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// No such file.
    #[error("not built yet")]
    Missing,
    /// The file does not hold what its footer says, or no valid footer.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// Built for another key or format.
    #[error("built for other settings: {0}")]
    Mismatch(String),
    /// Reading it failed.
    #[error("unreadable: {0}")]
    Io(#[from] std::io::Error),
}

/// One tokenized row: ids and loss mask (as long as the ids).
pub type Row = (Vec<u32>, Vec<bool>);

/// Tokenizes one line of JSONL into a row.
pub trait RowEncoder: Sync {
    /// The row of `line`, or why it is malformed.
    fn encode(&self, line: &str) -> Result<Row>;
}

/// How to build: the sources, the encoder, the id width and the per-document cut.
pub struct BuildSpec<'a> {
    /// The dataset's files.
    pub sources: &'a [Source],
    /// Line → row.
    pub encoder: &'a dyn RowEncoder,
    /// Bytes per id (see [`token_bytes_for`]).
    pub token_bytes: u8,
    /// Cut each document to this many tokens (padded samples); `None` keeps them whole (packing).
    pub truncate: Option<usize>,
    /// Skip and count malformed rows instead of failing.
    pub skip_bad_lines: bool,
    /// Tokenizing threads.
    pub threads: usize,
    /// Runtime of the stores that remote sources come from.
    pub rt: tokio::runtime::Handle,
}

/// The smallest id width that holds ids `0..vocab`.
pub fn token_bytes_for(vocab: u64) -> u8 {
    match vocab {
        0..=0x100 => 1,
        0x101..=0x1_0000 => 2,
        _ => 4,
    }
}

/// The published file of `key` in `dir`.
pub fn cache_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.tokens"))
}

/// The result of [`open_or_build`]: the checked file and whether this process built it.
pub struct Opened {
    /// The published file, checked.
    pub file: File,
    /// Its footer.
    pub meta: Meta,
    /// Where it is.
    pub path: PathBuf,
    /// Whether this call built it (else it was found, maybe after waiting for another builder).
    pub built: bool,
}

/// The published cache at `path` when it passes its checks, else `None` (missing, or bad and
/// reported). Before the build lock (`locked` false) a bad one is only reported; under the lock a
/// good one was built by another process while this one waited, and a bad one is removed.
fn open_published(path: &Path, key: &str, threads: usize, locked: bool) -> Result<Option<Opened>> {
    match open_trusted(path, key, threads) {
        Ok((file, meta)) => {
            if locked {
                tracing::info!(cache = %path.display(), "token cache built by another process");
            }
            Ok(Some(Opened {
                file,
                meta,
                path: path.to_path_buf(),
                built: false,
            }))
        }
        Err(Invalid::Missing) => Ok(None),
        Err(e) if !locked => {
            tracing::warn!(cache = %path.display(), "token cache {e}; taking the build lock to rebuild it");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(cache = %path.display(), "token cache {e}; rebuilding it (it is never trained on)");
            std::fs::remove_file(path)
                .with_context(|| format!("removing the bad token cache {}", path.display()))?;
            Ok(None)
        }
    }
}

/// Opens the cache of `key` in `dir`, building it first (under the node-wide lock) when it is
/// missing, partial or fails its checks.
pub fn open_or_build(dir: &Path, key: &str, spec: &BuildSpec<'_>) -> Result<Opened> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "creating the data cache directory {} (--data_cache_dir)",
            dir.display()
        )
    })?;
    let path = cache_path(dir, key);
    if let Some(opened) = open_published(&path, key, spec.threads, false)? {
        return Ok(opened);
    }
    let lock_path = dir.join(format!("{key}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if !flock(&lock, false).with_context(|| format!("locking {}", lock_path.display()))? {
        tracing::info!(lock = %lock_path.display(), "another process is building this token cache; waiting for it");
        flock(&lock, true).with_context(|| format!("locking {}", lock_path.display()))?;
    }
    // Another process may have published it while this one waited.
    if let Some(opened) = open_published(&path, key, spec.threads, true)? {
        return Ok(opened);
    }
    remove_leftovers(dir, key);
    let tmp = dir.join(format!("{key}.tokens.tmp-{}", std::process::id()));
    let started = std::time::Instant::now();
    let meta = match build(&tmp, key, spec) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("publishing {} as {}", tmp.display(), path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    tracing::info!(
        cache = %path.display(),
        tokens = meta.tokens,
        documents = meta.documents,
        secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        "token cache built"
    );
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // Its checksums were computed from the bytes written: this version is trusted as is.
    write_stamp(&path, &file);
    drop(lock);
    Ok(Opened {
        file,
        meta,
        path,
        built: true,
    })
}

/// Takes the exclusive advisory lock of `file` (released when the file is closed, also when the
/// process dies): waits for it when `wait`, else returns whether it was free.
fn flock(file: &File, wait: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let op = libc::LOCK_EX | if wait { 0 } else { libc::LOCK_NB };
    loop {
        // SAFETY: flock takes a file descriptor, which `file` keeps open for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Removes temporary files of `key` left by killed builders (the caller holds the lock).
fn remove_leftovers(dir: &Path, key: &str) {
    let prefix = format!("{key}.tokens.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            tracing::warn!(file = %e.path().display(), "removing a partial token cache left by a killed build");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The stamp beside a cache file that records which version of it (device, inode, size,
/// modification time) passed the checksum check.
fn stamp_path(path: &Path) -> PathBuf {
    path.with_extension("verified")
}

/// What identifies this version of the file at `file`.
fn stamp_of(file: &File) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok(format!(
        "{} {} {} {}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// Records that `file` (published at `path`) passed its checks; a failure only means the next
/// open checks again.
fn write_stamp(path: &Path, file: &File) {
    if let Ok(stamp) = stamp_of(file) {
        let tmp = path.with_extension(format!("verified.tmp-{}", std::process::id()));
        if std::fs::write(&tmp, stamp).is_ok() {
            let _ = std::fs::rename(&tmp, stamp_path(path));
        }
    }
}

/// Opens the published cache `path` for training: its footer and sections are always checked;
/// its checksums when this version of the file has not passed them before (see [`stamp_path`]):
/// once per build, or again after anything rewrote, truncated or replaced the file.
pub fn open_trusted(path: &Path, key: &str, threads: usize) -> Result<(File, Meta), Invalid> {
    let (file, meta, payload) = open_footer(path, key)?;
    let stamped = std::fs::read_to_string(stamp_path(path)).ok();
    if stamped.is_some() && stamped == stamp_of(&file).ok() {
        return Ok((file, meta));
    }
    let started = Instant::now();
    verify_hashes(&file, payload, &meta.hashes, threads)?;
    tracing::info!(
        cache = %path.display(),
        mb = payload >> 20,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "token cache checksums verified"
    );
    write_stamp(path, &file);
    Ok((file, meta))
}

/// Opens `path` and checks its footer, sections and every checksum against `key`.
pub fn open_checked(path: &Path, key: &str, threads: usize) -> Result<(File, Meta), Invalid> {
    let (file, meta, payload) = open_footer(path, key)?;
    verify_hashes(&file, payload, &meta.hashes, threads)?;
    Ok((file, meta))
}

/// Opens `path` and checks its footer and sections against `key`; returns the payload length.
fn open_footer(path: &Path, key: &str) -> Result<(File, Meta, u64), Invalid> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Invalid::Missing),
        Err(e) => return Err(e.into()),
    };
    let len = file.metadata()?.len();
    let corrupt = |m: &str| Invalid::Corrupt(m.to_string());
    if len < 16 {
        return Err(corrupt("shorter than its footer"));
    }
    let mut tail = [0u8; 16];
    file.read_exact_at(&mut tail, len - 16)?;
    if &tail[8..] != MAGIC {
        return Err(corrupt("no footer"));
    }
    let footer_len = u64::from_le_bytes(tail[..8].try_into().unwrap_or_default());
    if footer_len > len - 16 || footer_len > 64 << 20 {
        return Err(corrupt("footer length out of the file"));
    }
    let mut footer = vec![0u8; footer_len as usize];
    file.read_exact_at(&mut footer, len - 16 - footer_len)?;
    let meta: Meta =
        serde_json::from_slice(&footer).map_err(|e| Invalid::Corrupt(format!("footer: {e}")))?;
    if meta.version != VERSION {
        return Err(Invalid::Mismatch(format!(
            "format version {}",
            meta.version
        )));
    }
    if meta.key != key {
        return Err(Invalid::Mismatch(format!("key {}", meta.key)));
    }
    let payload = meta.bounds_at.offset + meta.bounds_at.len;
    let consistent = [1, 2, 4].contains(&meta.token_bytes)
        && meta.tokens_at.offset == 0
        && meta.tokens_at.len == meta.tokens * u64::from(meta.token_bytes)
        && meta.mask_at.len == meta.tokens.div_ceil(8)
        && meta.mask_at.offset >= meta.tokens_at.len
        && meta.bounds_at.offset >= meta.mask_at.offset + meta.mask_at.len
        && meta.bounds_at.len == meta.documents * 8
        && payload + footer_len + 16 == len
        && meta.hashes.len() as u64 == payload.div_ceil(HASH_CHUNK);
    if !consistent {
        return Err(corrupt("sections do not match the footer"));
    }
    Ok((file, meta, payload))
}

/// Checks the xxh3 of every [`HASH_CHUNK`] of `0..payload`, `threads` chunks at a time, with
/// positional reads (the pages are not mapped into this process).
fn verify_hashes(
    file: &File,
    payload: u64,
    hashes: &[String],
    threads: usize,
) -> Result<(), Invalid> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let bad: std::sync::Mutex<Option<Invalid>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, hashes.len().max(1)) {
            s.spawn(|| {
                let mut buf = vec![0u8; 4 << 20];
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= hashes.len() || bad.lock().map(|b| b.is_some()).unwrap_or(true) {
                        return;
                    }
                    let start = k as u64 * HASH_CHUNK;
                    let end = (start + HASH_CHUNK).min(payload);
                    let mut h = Xxh3::new();
                    let mut at = start;
                    let mut failed = None;
                    while at < end {
                        let n = ((end - at) as usize).min(buf.len());
                        if let Err(e) = file.read_exact_at(&mut buf[..n], at) {
                            failed = Some(Invalid::Io(e));
                            break;
                        }
                        h.update(&buf[..n]);
                        at += n as u64;
                    }
                    let failed = failed.or_else(|| {
                        (format!("{:016x}", h.digest()) != hashes[k]).then(|| {
                            Invalid::Corrupt(format!("checksum of bytes {start}..{end} differs"))
                        })
                    });
                    if let Some(f) = failed {
                        if let Ok(mut b) = bad.lock() {
                            b.get_or_insert(f);
                        }
                        return;
                    }
                }
            });
        }
    });
    match bad.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(()),
        Err(_) => Err(Invalid::Corrupt("a checking thread panicked".into())),
    }
}

/// A tokenized chunk, or the first malformed row in it.
struct Encoded {
    input_bytes: u64,
    tokens: Vec<u32>,
    mask: Vec<bool>,
    doc_lens: Vec<u64>,
    skipped: u64,
    error: Option<anyhow::Error>,
}

/// Tokenizes the rows of `chunk`.
fn encode_chunk(chunk: &Chunk, spec: &BuildSpec<'_>) -> Encoded {
    let mut out = Encoded {
        input_bytes: chunk.bytes.len() as u64,
        tokens: Vec::with_capacity(chunk.bytes.len() / 2),
        mask: Vec::with_capacity(chunk.bytes.len() / 2),
        doc_lens: Vec::new(),
        skipped: 0,
        error: None,
    };
    let name = &spec.sources[chunk.source].name;
    for (n, line) in chunk.lines() {
        let row = line
            .map_err(|e| {
                anyhow::anyhow!(
                    "not UTF-8: byte {} of the line starts an invalid sequence",
                    e.valid_up_to() + 1
                )
            })
            .and_then(|line| spec.encoder.encode(line));
        match row {
            Ok((mut ids, mut mask)) => {
                if let Some(cut) = spec.truncate {
                    ids.truncate(cut);
                    mask.truncate(cut);
                }
                out.doc_lens.push(ids.len() as u64);
                out.tokens.extend(ids);
                out.mask.extend(mask);
            }
            Err(e) if spec.skip_bad_lines => {
                out.skipped += 1;
                tracing::warn!(file = %name, line = n, "skipping row: {e:#}");
            }
            Err(e) => {
                out.error = Some(e.context(format!(
                    "{name}, line {n}: bad row (fix it, or pass --skip_bad_lines to skip and count \
                     bad rows)"
                )));
                return out;
            }
        }
    }
    out
}

/// Writes payload bytes, keeping the position and the checksum of each [`HASH_CHUNK`].
struct HashingWriter<W: Write> {
    inner: W,
    at: u64,
    hasher: Xxh3,
    hashes: Vec<String>,
}

impl<W: Write> HashingWriter<W> {
    fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let room = (HASH_CHUNK - self.at % HASH_CHUNK) as usize;
            let n = room.min(bytes.len());
            self.hasher.update(&bytes[..n]);
            self.inner.write_all(&bytes[..n])?;
            self.at += n as u64;
            bytes = &bytes[n..];
            if self.at % HASH_CHUNK == 0 {
                self.hashes.push(format!("{:016x}", self.hasher.digest()));
                self.hasher.reset();
            }
        }
        Ok(())
    }

    fn pad_to_align(&mut self) -> std::io::Result<()> {
        let pad = (ALIGN - self.at % ALIGN) % ALIGN;
        self.write(&vec![0u8; pad as usize])
    }

    fn finish(mut self) -> (W, u64, Vec<String>) {
        if self.at % HASH_CHUNK != 0 {
            self.hashes.push(format!("{:016x}", self.hasher.digest()));
        }
        (self.inner, self.at, self.hashes)
    }
}

/// The appended state of a build: the token file being written, the mask and bounds spooled to
/// side files (copied after the tokens at the end).
struct Sink {
    tokens: HashingWriter<BufWriter<File>>,
    mask: BufWriter<File>,
    mask_byte: u8,
    bounds: BufWriter<File>,
    count: u64,
    documents: u64,
    max_token: u32,
    token_bytes: u8,
}

impl Sink {
    fn append(&mut self, e: &Encoded) -> Result<()> {
        let mut buf = Vec::with_capacity(e.tokens.len() * usize::from(self.token_bytes));
        let limit: u64 = 1 << (8 * u32::from(self.token_bytes));
        for &t in &e.tokens {
            ensure!(
                u64::from(t) < limit,
                "token id {t} does not fit the cache's {}-byte ids (the tokenizer's vocabulary is \
                 smaller than its ids)",
                self.token_bytes
            );
            self.max_token = self.max_token.max(t);
            match self.token_bytes {
                1 => buf.push(t as u8),
                2 => buf.extend_from_slice(&(t as u16).to_le_bytes()),
                _ => buf.extend_from_slice(&t.to_le_bytes()),
            }
        }
        self.tokens.write(&buf)?;
        let mut bits = Vec::with_capacity(e.mask.len() / 8 + 1);
        for &m in &e.mask {
            let k = self.count % 8;
            if m {
                self.mask_byte |= 1 << k;
            }
            self.count += 1;
            if k == 7 {
                bits.push(self.mask_byte);
                self.mask_byte = 0;
            }
        }
        self.mask.write_all(&bits)?;
        let mut end = self.count - e.tokens.len() as u64;
        let mut b = Vec::with_capacity(e.doc_lens.len() * 8);
        for &l in &e.doc_lens {
            end += l;
            b.extend_from_slice(&end.to_le_bytes());
        }
        self.bounds.write_all(&b)?;
        self.documents += e.doc_lens.len() as u64;
        Ok(())
    }
}

/// Tokenizes `spec.sources` into `tmp` (see the module doc); returns its footer.
fn build(tmp: &Path, key: &str, spec: &BuildSpec<'_>) -> Result<Meta> {
    let create = |p: &Path| {
        File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(p)
            .with_context(|| format!("creating {}", p.display()))
    };
    let side = |ext: &str| {
        tmp.with_extension(format!(
            "{}.{ext}",
            tmp.extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
    };
    let (mask_path, bounds_path) = (side("mask"), side("bounds"));
    let result = (|| {
        let mut sink = Sink {
            tokens: HashingWriter {
                inner: BufWriter::with_capacity(4 << 20, create(tmp)?),
                at: 0,
                hasher: Xxh3::new(),
                hashes: Vec::new(),
            },
            mask: BufWriter::with_capacity(1 << 20, create(&mask_path)?),
            mask_byte: 0,
            bounds: BufWriter::with_capacity(1 << 20, create(&bounds_path)?),
            count: 0,
            documents: 0,
            max_token: 0,
            token_bytes: spec.token_bytes,
        };
        let skipped = run_pipeline(spec, &mut sink)?;
        if sink.count % 8 != 0 {
            sink.mask.write_all(&[sink.mask_byte])?;
        }
        let tokens_len = sink.tokens.at;
        let Sink {
            tokens: mut w,
            mask,
            bounds,
            count,
            documents,
            max_token,
            token_bytes,
            ..
        } = sink;
        let mut sections = Vec::new();
        for spool in [mask, bounds] {
            let mut f = spool.into_inner().map_err(|e| e.into_error())?;
            w.pad_to_align()?;
            let offset = w.at;
            f.seek(SeekFrom::Start(0))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                w.write(&buf[..n])?;
            }
            sections.push(Section {
                offset,
                len: w.at - offset,
            });
        }
        let (mut out, _, hashes) = w.finish();
        let meta = Meta {
            version: VERSION,
            key: key.to_string(),
            token_bytes,
            tokens: count,
            documents,
            skipped,
            max_token,
            tokens_at: Section {
                offset: 0,
                len: tokens_len,
            },
            mask_at: sections[0],
            bounds_at: sections[1],
            hashes,
        };
        let footer = serde_json::to_vec(&meta)?;
        out.write_all(&footer)?;
        out.write_all(&(footer.len() as u64).to_le_bytes())?;
        out.write_all(MAGIC)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(meta)
    })();
    let _ = std::fs::remove_file(&mask_path);
    let _ = std::fs::remove_file(&bounds_path);
    result
}

/// Reader → workers → in-order writer; returns the rows skipped.
fn run_pipeline(spec: &BuildSpec<'_>, sink: &mut Sink) -> Result<u64> {
    let threads = spec.threads.max(1);
    let window = 4 * threads;
    let (work_tx, work_rx) = crossbeam_channel::bounded::<(u64, Chunk)>(window);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<(u64, Encoded)>(window);
    let (credit_tx, credit_rx) = crossbeam_channel::bounded::<()>(window);
    for _ in 0..window {
        let _ = credit_tx.send(());
    }
    std::thread::scope(|s| -> Result<u64> {
        let reader = s.spawn(move || -> Result<()> {
            let mut seq = 0u64;
            for index in 0..spec.sources.len() {
                stream_chunks(spec.sources, index, &spec.rt, &mut |chunk| {
                    // Waits for the writer to make room; a closed channel means it stopped.
                    if credit_rx.recv().is_err() || work_tx.send((seq, chunk)).is_err() {
                        bail!("the token cache writer stopped");
                    }
                    seq += 1;
                    Ok(())
                })?;
            }
            Ok(())
        });
        for _ in 0..threads {
            let (rx, tx) = (work_rx.clone(), done_tx.clone());
            s.spawn(move || {
                for (seq, chunk) in rx {
                    if tx.send((seq, encode_chunk(&chunk, spec))).is_err() {
                        return;
                    }
                }
            });
        }
        drop((work_rx, done_tx));
        let written = (|| -> Result<u64> {
            let mut pending: BTreeMap<u64, Encoded> = BTreeMap::new();
            let (mut next, mut skipped) = (0u64, 0u64);
            let total: u64 = spec.sources.iter().map(|s| s.size).sum();
            let (started, mut read, mut logged) = (Instant::now(), 0u64, Instant::now());
            for (seq, enc) in &done_rx {
                pending.insert(seq, enc);
                while let Some(enc) = pending.remove(&next) {
                    if let Some(e) = enc.error {
                        return Err(e);
                    }
                    sink.append(&enc).context("writing the token cache")?;
                    skipped += enc.skipped;
                    read += enc.input_bytes;
                    next += 1;
                    if logged.elapsed() >= PROGRESS_EVERY {
                        logged = Instant::now();
                        let secs = started.elapsed().as_secs_f64();
                        tracing::info!(
                            read_mb = read >> 20,
                            total_mb = total >> 20,
                            mb_per_s = format!("{:.1}", read as f64 / 1e6 / secs),
                            tokens = sink.count,
                            "tokenizing the dataset into the token cache"
                        );
                    }
                    let _ = credit_tx.send(());
                }
            }
            Ok(skipped)
        })();
        // Unblocks the reader and workers when the writer stopped early.
        drop(done_rx);
        drop(credit_tx);
        let read = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the dataset reader panicked"))?;
        let skipped = written?;
        read?;
        Ok(skipped)
    })
}
