//! Building a token cache: a reader thread cuts the sources into chunks of whole lines, workers
//! tokenize them, and the writer appends their results in order, hashing as it writes; chunks in
//! flight are bounded by credits the writer returns, so memory does not grow with the dataset.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use xxhash_rust::xxh3::Xxh3;

use crate::cache::format::{Meta, Section, ALIGN, HASH_CHUNK, MAGIC, VERSION};
use crate::source::{stream_chunks, Chunk, Source};

/// How often a build logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// One tokenized row: ids and loss mask (as long as the ids).
pub type Row = (Vec<u32>, Vec<bool>);

/// Tokenizes one line of JSONL into its documents (one, or two for a preference pair).
pub trait RowEncoder: Sync {
    /// The documents of `line`, or why it is malformed.
    fn encode(&self, line: &str) -> Result<Vec<Row>>;
}

/// How to build: the sources, the encoder, the id width and the per-document cut.
pub struct BuildSpec<'a> {
    /// The dataset's files.
    pub sources: &'a [Source],
    /// Line → row.
    pub encoder: &'a dyn RowEncoder,
    /// Bytes per id (see [`token_bytes_for`]).
    pub token_bytes: u8,
    /// Cut each document to this many tokens (padded samples, pairs); `None` keeps them whole
    /// (packing). The rows cut are counted ([`Meta::truncated`]).
    pub truncate: Option<usize>,
    /// Skip and count malformed rows instead of failing.
    pub skip_bad_lines: bool,
    /// Tokenizing threads.
    pub threads: usize,
    /// Runtime of the stores that remote sources come from.
    pub rt: tokio::runtime::Handle,
}

/// A tokenized chunk, or the first malformed row in it.
struct Encoded {
    input_bytes: u64,
    tokens: Vec<u32>,
    mask: Vec<bool>,
    doc_lens: Vec<u64>,
    skipped: u64,
    truncated: u64,
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
        truncated: 0,
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
            Ok(docs) => {
                let mut cut_any = false;
                for (mut ids, mut mask) in docs {
                    if let Some(cut) = spec.truncate {
                        cut_any |= ids.len() > cut;
                        ids.truncate(cut);
                        mask.truncate(cut);
                    }
                    out.doc_lens.push(ids.len() as u64);
                    out.tokens.extend(ids);
                    out.mask.extend(mask);
                }
                out.truncated += u64::from(cut_any);
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
    truncated: u64,
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
        self.truncated += e.truncated;
        Ok(())
    }
}

/// Tokenizes `spec.sources` into `tmp` (see the module doc); returns its footer.
pub(crate) fn build(tmp: &Path, key: &str, spec: &BuildSpec<'_>) -> Result<Meta> {
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
            truncated: 0,
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
            truncated,
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
            truncated,
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
