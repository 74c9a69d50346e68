//! The token cache: a dataset tokenized once into one compact file, memory-mapped by every later
//! run, restart and rank of the node.
//!
//! In three parts: [`format`] is what the file is and the checks that trust it, [`build`] writes
//! one, and this file finds the published one or has it built, under the lock.
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

mod build;
mod format;

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use build::{BuildSpec, Row, RowEncoder};
pub use format::{
    open_checked, open_trusted, token_bytes_for, Invalid, Meta, Section, MAGIC, VERSION,
};

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
    let meta = match build::build(&tmp, key, spec) {
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
    format::write_stamp(&path, &file);
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
