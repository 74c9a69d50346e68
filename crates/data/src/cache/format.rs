//! The token cache's file: its layout ([`Meta`], [`Section`], the footer), and the checks a file
//! passes before a run trusts it — footer and sections always, the xxh3 of every 64 MiB once per
//! version of the file (recorded in a stamp beside it).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

/// The footer's last eight bytes.
pub const MAGIC: &[u8; 8] = b"WPTOKC01";
/// The format version (in [`Meta`]).
pub const VERSION: u32 = 1;
/// Bytes of payload per checksum.
pub(crate) const HASH_CHUNK: u64 = 64 << 20;
/// Section alignment.
pub(crate) const ALIGN: u64 = 4096;
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
    /// Rows with a document cut to the sample length.
    #[serde(default)]
    pub truncated: u64,
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

/// The smallest id width that holds ids `0..vocab`.
pub fn token_bytes_for(vocab: u64) -> u8 {
    match vocab {
        0..=0x100 => 1,
        0x101..=0x1_0000 => 2,
        _ => 4,
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
pub(crate) fn write_stamp(path: &Path, file: &File) {
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
