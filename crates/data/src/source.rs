//! Where JSONL rows come from: listing a dataset URI into its files (with the identity — size and
//! modification time — that keys the token cache), and streaming each file as chunks of whole lines,
//! so that no file is ever held in memory whole.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use waypoint_storage::{BlobReader, Store};

/// The demo dataset shipped in the binary (`dataset_uri = builtin:demo`).
pub const DEMO_DATASET: &str = include_str!("../assets/demo.jsonl");

/// The demo preference pairs shipped in the binary (`dataset_uri = builtin:demo_preference`), for
/// `--recipe dpo|orpo`: 64 pairs, in turn in each of the four formats of [`crate::pairs`].
pub const DEMO_PREFERENCE_DATASET: &str = include_str!("../assets/demo_preference.jsonl");

/// The UTF-8 byte order mark, accepted (and dropped) at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Bytes of whole lines handed out at a time (a longer line makes a longer chunk).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Where a source's bytes are.
#[derive(Clone)]
pub enum Location {
    /// Bytes built into the binary.
    Builtin(&'static [u8]),
    /// A local file.
    File(PathBuf),
    /// An object in a store.
    Object {
        /// The store (the dataset URI's parent prefix).
        store: Box<Store>,
        /// The object's key in it.
        key: String,
    },
}

/// One JSONL file of a dataset.
#[derive(Clone)]
pub struct Source {
    /// A path or URI (for messages).
    pub name: String,
    /// Where its bytes are.
    pub location: Location,
    /// Its size in bytes.
    pub size: u64,
    /// What identifies this version of it (name, size, modification time): part of the cache key.
    pub identity: Value,
}

/// Whole lines of one source: the bytes (without a leading byte order mark) and the number of the
/// first line in them (from 1).
pub struct Chunk {
    /// Index of the source in the dataset's list.
    pub source: usize,
    /// The number of the chunk's first line in its file.
    pub first_line: usize,
    /// Whole lines, `\n`-separated (the last one may lack its `\n`).
    pub bytes: Vec<u8>,
}

impl Chunk {
    /// The non-blank lines, numbered, as text; a line that is not UTF-8 is an error naming where
    /// it goes wrong. `\r` line ends are dropped.
    pub fn lines(&self) -> impl Iterator<Item = (usize, Result<&str, std::str::Utf8Error>)> + '_ {
        let bytes = self.bytes.strip_suffix(b"\n").unwrap_or(&self.bytes);
        bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .map(|(i, line)| {
                (
                    self.first_line + i,
                    line.strip_suffix(b"\r").unwrap_or(line),
                )
            })
            .filter(|(_, line)| !line.trim_ascii().is_empty())
            .map(|(n, line)| (n, std::str::from_utf8(line)))
    }
}

/// Lists `uri`: `builtin:demo` or `builtin:demo_preference`, a local file or directory (its
/// `*.jsonl`, sorted), or a store URI of a file or a prefix (its `*.jsonl` objects, sorted). Reads
/// no data.
pub async fn list_sources(uri: &str) -> Result<Vec<Source>> {
    let builtin = match uri {
        "builtin:demo" => Some(("demo", DEMO_DATASET)),
        "builtin:demo_preference" => Some(("demo_preference", DEMO_PREFERENCE_DATASET)),
        _ => None,
    };
    if let Some((name, text)) = builtin {
        return Ok(vec![Source {
            name: uri.into(),
            location: Location::Builtin(text.as_bytes()),
            size: text.len() as u64,
            identity: json!({"builtin": name, "sha256": waypoint_config::fingerprint(&json!(text))}),
        }]);
    }
    if !uri.contains("://") || uri.starts_with("file://") {
        let path = uri.strip_prefix("file://").unwrap_or(uri);
        // A file:// URI takes no host or credentials (`file://user:pw@/…`): refused without echoing.
        ensure!(
            !uri.starts_with("file://") || path.starts_with('/'),
            "file:// URIs take no host or credentials; write file:///absolute/path"
        );
        let path = Path::new(path);
        let files = if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("listing {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect();
            files.sort();
            ensure!(
                !files.is_empty(),
                "{} holds no *.jsonl file",
                path.display()
            );
            files
        } else {
            vec![path.to_path_buf()]
        };
        return files.into_iter().map(|f| local_source(&f)).collect();
    }
    let (parent, leaf) = match uri.trim_end_matches('/').rsplit_once('/') {
        Some((p, l)) if uri.ends_with(".jsonl") => (p.to_string(), Some(l.to_string())),
        _ => (uri.trim_end_matches('/').to_string(), None),
    };
    let store = Store::open(&parent).with_context(|| format!("opening {parent}"))?;
    let objects = match leaf {
        Some(l) => vec![store
            .head(&l)
            .await
            .with_context(|| format!("reading {parent}/{l}"))?],
        None => {
            let objects: Vec<_> = store
                .list("")
                .await
                .with_context(|| format!("listing {uri}"))?
                .into_iter()
                .filter(|m| m.key.ends_with(".jsonl"))
                .collect();
            ensure!(!objects.is_empty(), "{uri} holds no *.jsonl object");
            objects
        }
    };
    Ok(objects
        .into_iter()
        .map(|o| {
            let name = format!("{parent}/{}", o.key);
            let modified = o
                .last_modified
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            Source {
                identity: json!({
                    "uri": waypoint_storage::redact_uri(&name),
                    "size": o.size,
                    "modified_ns": modified.to_string(),
                }),
                name,
                size: o.size,
                location: Location::Object {
                    store: Box::new(store.clone()),
                    key: o.key,
                },
            }
        })
        .collect())
}

/// A local file's source entry: its canonical path, size and modification time.
fn local_source(path: &Path) -> Result<Source> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading {} (a JSONL file or directory)", path.display()))?;
    ensure!(
        meta.is_file(),
        "{} is not a file (a JSONL file or directory)",
        path.display()
    );
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let modified = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(Source {
        name: path.display().to_string(),
        identity: json!({
            "path": canonical.display().to_string(),
            "size": meta.len(),
            "modified_ns": modified.to_string(),
        }),
        size: meta.len(),
        location: Location::File(path.to_path_buf()),
    })
}

/// Splits a byte stream into [`Chunk`]s of whole lines of about [`CHUNK_BYTES`].
struct LineChunker<'a> {
    source: usize,
    next_line: usize,
    pending: Vec<u8>,
    started: bool,
    emit: &'a mut dyn FnMut(Chunk) -> Result<()>,
}

impl LineChunker<'_> {
    fn push(&mut self, mut bytes: &[u8]) -> Result<()> {
        if !self.started {
            // The byte order mark may arrive split over reads: wait for three bytes.
            if self.pending.len() + bytes.len() < BOM.len() {
                self.pending.extend_from_slice(bytes);
                return Ok(());
            }
            self.pending.extend_from_slice(bytes);
            bytes = &[];
            if self.pending.starts_with(BOM) {
                self.pending.drain(..BOM.len());
            }
            self.started = true;
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= CHUNK_BYTES {
            if let Some(cut) = self.pending.iter().rposition(|&b| b == b'\n') {
                let rest = self.pending.split_off(cut + 1);
                let whole = std::mem::replace(&mut self.pending, rest);
                self.emit(whole)?;
            }
        }
        Ok(())
    }

    fn emit(&mut self, bytes: Vec<u8>) -> Result<()> {
        let first_line = self.next_line;
        self.next_line += bytes.iter().filter(|&&b| b == b'\n').count();
        (self.emit)(Chunk {
            source: self.source,
            first_line,
            bytes,
        })
    }

    fn finish(mut self) -> Result<()> {
        if !self.started && self.pending.starts_with(BOM) {
            self.pending.drain(..BOM.len());
        }
        if !self.pending.is_empty() {
            let last = std::mem::take(&mut self.pending);
            self.emit(last)?;
        }
        Ok(())
    }
}

/// Streams source `index` of `sources` as chunks of whole lines into `emit`, in order. Remote
/// objects are read through `rt` (a handle of the runtime that opened their store); memory held is
/// one read plus the longest line.
pub fn stream_chunks(
    sources: &[Source],
    index: usize,
    rt: &tokio::runtime::Handle,
    emit: &mut dyn FnMut(Chunk) -> Result<()>,
) -> Result<()> {
    let source = &sources[index];
    let mut chunker = LineChunker {
        source: index,
        next_line: 1,
        pending: Vec::new(),
        started: false,
        emit,
    };
    match &source.location {
        Location::Builtin(bytes) => {
            for piece in bytes.chunks(CHUNK_BYTES) {
                chunker.push(piece)?;
            }
        }
        Location::File(path) => {
            let mut file = std::fs::File::open(path)
                .with_context(|| format!("reading {} (a JSONL file or directory)", source.name))?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let n = file
                    .read(&mut buf)
                    .with_context(|| format!("reading {}", source.name))?;
                if n == 0 {
                    break;
                }
                chunker.push(&buf[..n])?;
            }
        }
        Location::Object { store, key } => {
            let mut reader = rt
                .block_on(BlobReader::open(store, key, None))
                .with_context(|| format!("reading {}", source.name))?
                .without_hash();
            while let Some(bytes) = rt
                .block_on(reader.next_chunk())
                .with_context(|| format!("reading {}", source.name))?
            {
                chunker.push(&bytes)?;
            }
        }
    }
    chunker.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks_of(bytes: &'static [u8]) -> Vec<(usize, String)> {
        let sources = vec![Source {
            name: "t".into(),
            location: Location::Builtin(bytes),
            size: bytes.len() as u64,
            identity: Value::Null,
        }];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut lines = Vec::new();
        stream_chunks(&sources, 0, rt.handle(), &mut |c| {
            for (n, l) in c.lines() {
                lines.push((n, l.unwrap().to_string()));
            }
            Ok(())
        })
        .unwrap();
        lines
    }

    #[test]
    fn lines_are_numbered_across_chunks_and_the_bom_and_cr_are_dropped() {
        let mut text = b"\xEF\xBB\xBFfirst\r\n\n".to_vec();
        // Enough lines to span several chunks; the last without its newline.
        for k in 0..300_000 {
            text.extend_from_slice(format!("row {k}\n").as_bytes());
        }
        text.extend_from_slice(b"last");
        let lines = chunks_of(Box::leak(text.into_boxed_slice()));
        assert_eq!(lines[0], (1, "first".to_string()));
        assert_eq!(lines[1], (3, "row 0".to_string()));
        assert_eq!(lines[300_000], (300_002, "row 299999".to_string()));
        assert_eq!(lines.last().unwrap(), &(300_003, "last".to_string()));
        assert_eq!(lines.len(), 300_002);
    }
}
