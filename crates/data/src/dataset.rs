//! A dataset: JSONL rows tokenized once into the token cache ([`crate::cache`]) and read back as
//! packed (or padded) fixed-length samples, in the order [`crate::order`] gives; [`Batch`] is what
//! leaves this crate for the model.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use serde_json::{json, Value};

use crate::cache::{BuildSpec, Meta, Row, RowEncoder};
use crate::pairs::{encode_pair, PairStyle};
use crate::source::Source;
use crate::tokenizer::{chat_turn, Tokenizer};

use crate::cache;
use crate::order::permuted;

/// Label value that the loss ignores.
pub const IGNORE: i64 = -100;

/// The chat roles `messages` may use (those of Hugging Face chat templates).
pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Inputs and labels of some samples, row-major `[rows, columns]`: the model sees `ids` and learns
/// `labels` (the next token, or [`IGNORE`] where the loss does not apply). The trainer turns it
/// into tensors at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Samples.
    pub rows: usize,
    /// Tokens per sample (`max_seq_len`).
    pub columns: usize,
    /// Input token ids, `rows × columns`.
    pub ids: Vec<i64>,
    /// Target token ids, `rows × columns`; [`IGNORE`] where the loss does not apply.
    pub labels: Vec<i64>,
    /// The real (unpadded) tokens at the start of each row's ids.
    pub lengths: Vec<usize>,
    /// The learned tokens of each row's ids — a pair's completion tokens —, the first token
    /// included when it is learned (no label holds it: nothing predicts it).
    pub learned: Vec<usize>,
}

/// How rows become samples.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// The JSON field holding the text (when a row has no `messages`).
    pub text_field: String,
    /// Tokens per sample (the model sees `max_seq_len` inputs and as many labels); a preference
    /// pair's sequences are cut to it.
    pub max_seq_len: usize,
    /// Rows are preference pairs, tokenized in this style (each sample is then a pair: its chosen
    /// and its rejected sequence, never packed); `None`: text and chat rows.
    pub pairs: Option<PairStyle>,
    /// Concatenate documents and cut fixed blocks; else one padded sample per document.
    pub packing: bool,
    /// Skip and count malformed rows instead of failing.
    pub skip_bad_lines: bool,
    /// Where token caches live (see [`cache`]).
    pub cache_dir: PathBuf,
    /// Tokenizing threads when a cache is built.
    pub threads: usize,
}

/// The token cache key of a dataset: sha256 of everything that changes its tokens — the files'
/// identities (path or URI, size, modification time), the tokenizer and chat template, the text
/// field, the sample length, packing, skipping, and the cache format.
pub fn cache_key(sources: &[Source], tokenizer: &Tokenizer, opts: &DataOptions) -> String {
    waypoint_config::fingerprint(&json!({
        "format": cache::VERSION,
        "sources": sources.iter().map(|s| &s.identity).collect::<Vec<_>>(),
        "tokenizer": tokenizer.identity(),
        "text_field": opts.text_field,
        "max_seq_len": opts.max_seq_len,
        "packing": opts.packing,
        "skip_bad_lines": opts.skip_bad_lines,
        "pairs": opts.pairs.map(|p| json!({
            "style": p.name(),
            "bos": tokenizer.bos(),
            "eos_text": tokenizer.encode_with_eos("", false).ok(),
        })),
    }))
}

/// The default `--data_cache_dir`: `$XDG_CACHE_HOME/waypoint/data`, else
/// `~/.cache/waypoint/data`, else `./.waypoint-cache/data`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".cache"))
        })
        .unwrap_or_else(|| PathBuf::from(".waypoint-cache"));
    base.join("waypoint").join("data")
}

/// Samples of `max_seq_len + 1` ids with per-token loss masks, read from a memory-mapped token
/// cache (see [`cache`]): opening one costs the same whatever its size, and only the pages of the
/// samples read are ever loaded.
pub struct Dataset {
    map: Mmap,
    meta: Meta,
    width: usize,
    packing: bool,
    pairs: bool,
    pad: i64,
    samples: usize,
    /// Rows skipped as malformed.
    pub skipped: usize,
    /// Rows cut to `max_seq_len` (padded samples and pairs; packing cuts nothing).
    pub truncated: usize,
    /// Documents read.
    pub documents: usize,
    /// Where the cache file is.
    pub cache_path: PathBuf,
    /// Whether this process built the cache (else it was reused).
    pub built_cache: bool,
}

/// Line → (ids, mask) with a tokenizer and the data options.
struct Rows<'a> {
    tokenizer: &'a Tokenizer,
    opts: &'a DataOptions,
}

impl RowEncoder for Rows<'_> {
    fn encode(&self, line: &str) -> Result<Vec<Row>> {
        let docs = match self.opts.pairs {
            Some(style) => encode_pair(line, self.tokenizer, style, self.opts.max_seq_len)?,
            None => vec![encode_row(line, self.tokenizer, self.opts)?],
        };
        ensure!(
            docs.iter().all(|(ids, mask)| ids.len() == mask.len()),
            "internal: a row's mask is not as long as its ids"
        );
        Ok(docs)
    }
}

impl Dataset {
    /// Opens the token cache of `sources` in `opts.cache_dir`, tokenizing them into it first when
    /// no valid one exists (one process of the node builds; the others wait for it). Remote
    /// sources are read through `rt`; call from outside its worker threads.
    pub fn load(
        sources: &[Source],
        tokenizer: &Tokenizer,
        opts: &DataOptions,
        rt: tokio::runtime::Handle,
    ) -> Result<Self> {
        let width = opts.max_seq_len + 1;
        // Pairs are never packed: each sequence is one padded row.
        let packing = opts.packing && opts.pairs.is_none();
        let opts = &DataOptions {
            packing,
            ..opts.clone()
        };
        let key = cache_key(sources, tokenizer, opts);
        let rows = Rows { tokenizer, opts };
        let spec = BuildSpec {
            sources,
            encoder: &rows,
            token_bytes: cache::token_bytes_for(tokenizer.vocab_size().max(1) as u64),
            // A pair's sequence is cut to max_seq_len tokens (TRL's max_length); a padded
            // document keeps one more, the last target.
            truncate: match opts.pairs {
                Some(_) => Some(opts.max_seq_len),
                None => (!opts.packing).then_some(width),
            },
            skip_bad_lines: opts.skip_bad_lines,
            threads: opts.threads.max(1),
            rt,
        };
        let opened = cache::open_or_build(&opts.cache_dir, &key, &spec)?;
        // SAFETY: the file is a published cache: it is only ever replaced by a rename (a new
        // inode), never written in place, so the mapped bytes do not change under the map. A
        // process that truncates it anyway breaks the cache contract (as deleting a checkpoint
        // under a running job would).
        let map = unsafe { Mmap::map(&opened.file) }
            .with_context(|| format!("mapping {}", opened.path.display()))?;
        // Samples are read in a shuffled order: no read-ahead.
        let _ = map.advise(memmap2::Advice::Random);
        let meta = opened.meta;
        let samples = if opts.packing {
            (meta.tokens / width as u64) as usize
        } else if opts.pairs.is_some() {
            (meta.documents / 2) as usize
        } else {
            meta.documents as usize
        };
        ensure!(
            samples > 0,
            "the dataset gives no sample of {width} tokens ({} documents); lower --max_seq_len or \
             add data",
            meta.documents
        );
        Ok(Self {
            map,
            width,
            packing: opts.packing,
            pairs: opts.pairs.is_some(),
            pad: tokenizer.pad(),
            samples,
            skipped: meta.skipped as usize,
            truncated: meta.truncated as usize,
            documents: meta.documents as usize,
            cache_path: opened.path,
            built_cache: opened.built,
            meta,
        })
    }

    /// The fingerprint of what the model is trained on: sha256 of the tokens, loss masks and
    /// document bounds (through the cache's checksums of them) and their counts. Unlike the cache
    /// key, it does not change when a file is touched or moved, only when its tokens do.
    pub fn content_fingerprint(&self) -> String {
        waypoint_config::fingerprint(&json!({
            "token_bytes": self.meta.token_bytes,
            "tokens": self.meta.tokens,
            "documents": self.meta.documents,
            "xxh3": self.meta.hashes,
        }))
    }

    /// Bytes per token id in the cache (1, 2 or 4: the smallest that holds the vocabulary).
    pub fn token_bytes(&self) -> u8 {
        self.meta.token_bytes
    }

    /// Whether each sample is a preference pair (two rows: chosen, rejected).
    pub fn is_pairs(&self) -> bool {
        self.pairs
    }

    /// Number of samples (pairs, for preference data).
    pub fn len(&self) -> usize {
        self.samples
    }

    /// Whether there are no samples (never, once built).
    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// The sample index of global position `g` (see [`crate::order`]).
    pub fn sample_at(&self, seed: u64, g: u64) -> usize {
        let n = self.len() as u64;
        permuted(seed, g / n, self.len(), (g % n) as usize)
    }

    /// The samples at global positions `start..start + count` (see [`Dataset::sample_at`]), for
    /// [`Dataset::rows`].
    pub fn samples_at(&self, seed: u64, start: u64, count: usize) -> Vec<usize> {
        (0..count as u64)
            .map(|k| self.sample_at(seed, start + k))
            .collect()
    }

    /// Token `i` of the stream.
    fn token(&self, i: u64) -> i64 {
        let b = usize::from(self.meta.token_bytes);
        let at = (self.meta.tokens_at.offset + i * b as u64) as usize;
        let bytes = &self.map[at..at + b];
        match b {
            1 => i64::from(bytes[0]),
            2 => i64::from(u16::from_le_bytes([bytes[0], bytes[1]])),
            _ => i64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        }
    }

    /// Whether the loss applies to token `i` of the stream.
    fn learned(&self, i: u64) -> bool {
        let byte = self.map[(self.meta.mask_at.offset + i / 8) as usize];
        (byte >> (i % 8)) & 1 == 1
    }

    /// Where document `d` ends in the stream.
    fn doc_end(&self, d: u64) -> u64 {
        let at = (self.meta.bounds_at.offset + d * 8) as usize;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.map[at..at + 8]);
        u64::from_le_bytes(b)
    }

    /// Sample `i`: `max_seq_len + 1` ids and their loss mask (padding is not learned). For pairs,
    /// see [`Dataset::document`].
    pub fn sample(&self, i: usize) -> (Vec<i64>, Vec<bool>) {
        self.document(i).0
    }

    /// Document `i` padded to `max_seq_len + 1` ids with its loss mask, and its real length (a
    /// packed block: block `i`, all real). Pair `p` is documents `2p` (chosen) and `2p + 1`.
    pub fn document(&self, i: usize) -> ((Vec<i64>, Vec<bool>), usize) {
        let (start, end) = if self.packing {
            let s = (i * self.width) as u64;
            (s, s + self.width as u64)
        } else {
            let i = i as u64;
            let start = if i == 0 { 0 } else { self.doc_end(i - 1) };
            (start, self.doc_end(i))
        };
        let mut ids: Vec<i64> = (start..end).map(|t| self.token(t)).collect();
        let mut mask: Vec<bool> = (start..end).map(|t| self.learned(t)).collect();
        let b = u64::from(self.meta.token_bytes);
        let tokens = self.meta.tokens_at.offset;
        self.release(tokens + start * b..tokens + end * b);
        let bits = self.meta.mask_at.offset;
        self.release(bits + start / 8..bits + end.div_ceil(8));
        if !self.packing {
            let bounds = self.meta.bounds_at.offset + (i as u64).saturating_sub(1) * 8;
            self.release(bounds..bounds + 16);
        }
        let len = ids.len();
        ids.resize(self.width, self.pad);
        mask.resize(self.width, false);
        ((ids, mask), len)
    }

    /// Drops the pages around `bytes` of the file from this process's memory once a sample is
    /// copied out (they stay in the page cache): the resident set holds the batch being read, not
    /// every page an epoch has touched, so it does not grow with the dataset.
    fn release(&self, bytes: std::ops::Range<u64>) {
        // Wide enough to cover the kernel's fault-around (it maps up to 64 KiB around a fault).
        const AROUND: u64 = 64 << 10;
        const PAGE: u64 = 4096;
        let start = bytes.start.saturating_sub(AROUND) / PAGE * PAGE;
        let end = (bytes.end + AROUND).min(self.map.len() as u64);
        if end <= start {
            return;
        }
        // SAFETY: the map is a read-only shared mapping of a file that is never written in place
        // (see `load`); MADV_DONTNEED only unmaps the pages, and the next access reads the same
        // bytes back from the page cache, so no reference into the map — here or on another
        // thread — sees different contents. A failure only leaves the pages resident.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start as usize,
                (end - start) as usize,
            )
        };
    }

    /// Inputs and labels of samples `indices`, in order; for pairs, the chosen rows of the pairs
    /// in order, then their rejected rows (TRL's layout).
    pub fn rows(&self, indices: &[usize]) -> Batch {
        let docs: Vec<usize> = if self.pairs {
            let chosen = indices.iter().map(|&p| 2 * p);
            chosen.chain(indices.iter().map(|&p| 2 * p + 1)).collect()
        } else {
            indices.to_vec()
        };
        let width = self.width;
        let mut ids = Vec::with_capacity(docs.len() * (width - 1));
        let mut labels = Vec::with_capacity(docs.len() * (width - 1));
        let mut lengths = Vec::with_capacity(docs.len());
        let mut learned = Vec::with_capacity(docs.len());
        for &d in &docs {
            let ((t, m), len) = self.document(d);
            ids.extend_from_slice(&t[..width - 1]);
            labels.extend((1..width).map(|j| if m[j] { t[j] } else { IGNORE }));
            let len = len.min(width - 1);
            lengths.push(len);
            learned.push(m[..len].iter().filter(|&&on| on).count());
        }
        Batch {
            rows: docs.len(),
            columns: width - 1,
            ids,
            labels,
            lengths,
            learned,
        }
    }

    /// The largest token id in the data, padding included (checked against the model's
    /// vocabulary); recorded in the cache, so this reads nothing.
    pub fn max_token(&self) -> i64 {
        let pad = if self.packing { 0 } else { self.pad };
        i64::from(self.meta.max_token).max(pad)
    }
}

/// One JSONL row to (ids, loss mask). A text row is BOS (when the tokenizer adds one), the text
/// and a learned EOS. A chat row is the tokenizer's chat template as transformers renders and
/// tokenizes it, assistant spans learned, with an EOS (not learned: it only separates packed
/// documents) when the rendering holds none; without a template, the built-in layout of
/// [`chat_turn`] with a learned EOS.
fn encode_row(line: &str, tokenizer: &Tokenizer, opts: &DataOptions) -> Result<Row> {
    let row: Value = serde_json::from_str(line).context("not valid JSON")?;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    let eos = tokenizer.eos() as u32;
    if let Some(messages) = row.get("messages") {
        let list = messages.as_array().context("`messages` is not a list")?;
        ensure!(!list.is_empty(), "`messages` is empty");
        let mut any_assistant = false;
        for (k, m) in list.iter().enumerate() {
            let role = m["role"]
                .as_str()
                .with_context(|| format!("messages[{k}] has no string `role`"))?;
            ensure!(
                CHAT_ROLES.contains(&role),
                "messages[{k}] has role {role:?}; the accepted roles are {}",
                CHAT_ROLES.join(", ")
            );
            any_assistant |= role == "assistant";
        }
        ensure!(any_assistant, "`messages` has no assistant turn to learn");
        if let Some((t_ids, t_mask)) = tokenizer.encode_chat(messages)? {
            let ends = t_ids.contains(&eos);
            (ids, mask) = (t_ids, t_mask);
            if !ends {
                ids.push(eos);
                mask.push(false);
            }
            return Ok((ids, mask));
        }
        let prefix = tokenizer.encode("", true)?;
        mask.extend(std::iter::repeat_n(false, prefix.len()));
        ids.extend(prefix);
        for (k, m) in list.iter().enumerate() {
            let role = m["role"].as_str().unwrap_or_default();
            let content = m["content"]
                .as_str()
                .with_context(|| format!("messages[{k}] has no string `content`"))?;
            let learn = role == "assistant";
            let (head, body, tail) = chat_turn(tokenizer.chat_format(), role, content);
            for (text, on) in [(head, false), (body, learn), (tail, learn)] {
                let t = tokenizer.encode(&text, false)?;
                mask.extend(std::iter::repeat_n(on, t.len()));
                ids.extend(t);
            }
        }
    } else {
        let text = match row.get(&opts.text_field) {
            Some(Value::String(s)) => s,
            Some(_) => bail!("field `{}` is not a string", opts.text_field),
            None => bail!(
                "no `{}` field and no `messages` (set --dataset_text_field to the field that holds \
                 the text)",
                opts.text_field
            ),
        };
        ids = tokenizer.encode(text, true)?;
        mask = vec![true; ids.len()];
    }
    ids.push(eos);
    mask.push(true);
    Ok((ids, mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::list_sources;

    fn opts(packing: bool) -> DataOptions {
        DataOptions {
            text_field: "text".into(),
            max_seq_len: 8,
            packing,
            pairs: None,
            skip_bad_lines: false,
            cache_dir: PathBuf::new(),
            threads: 2,
        }
    }

    /// `bytes` as the file `name` of a fresh directory, loaded through a token cache there.
    fn load_bytes(name: &str, bytes: &[u8], o: &DataOptions) -> Result<Dataset> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let sources = rt.block_on(list_sources(path.to_str().unwrap()))?;
        let o = DataOptions {
            cache_dir: dir.path().join("cache"),
            ..o.clone()
        };
        // The map outlives the directory: the unlinked file stays readable.
        Dataset::load(&sources, &Tokenizer::Bytes, &o, rt.handle().clone())
    }

    fn build(text: &str, o: &DataOptions) -> Result<Dataset> {
        load_bytes("d.jsonl", text.as_bytes(), o)
    }

    #[test]
    fn packs_rows_and_masks_chat_to_assistant_turns() {
        let s =
            "{\"text\": \"abcdefghij\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, \
             {\"role\": \"assistant\", \"content\": \"yo\"}]}\n";
        let d = build(s, &opts(false)).unwrap();
        assert_eq!((d.len(), d.documents), (2, 2));
        let Batch { ids, labels, .. } = d.rows(&[1]);
        // BOS "user: hi\n" "assistant: " are not learned; "yo" would be, but 8 tokens cut it off.
        assert_eq!(ids[0], crate::tokenizer::BYTE_BOS);
        assert!(labels.iter().all(|&l| l == IGNORE), "{labels:?}");
        let packed = build(s, &opts(true)).unwrap();
        // 12 + 25 tokens → 4 blocks of 9.
        assert_eq!(packed.len(), 4);
    }

    #[test]
    fn bad_rows_name_file_and_line_or_are_counted() {
        let s = "{\"text\": \"abcdefghijkl\"}\n{\"txt\": 1}\n";
        let err = build(s, &opts(true)).err().unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("d.jsonl, line 2") && msg.contains("--dataset_text_field"),
            "{msg}"
        );
        let mut o = opts(true);
        o.skip_bad_lines = true;
        let d = build(s, &o).unwrap();
        assert_eq!(d.skipped, 1);
    }

    #[test]
    fn packing_a_long_document_is_linear_and_exact() {
        // One 4 MB document (the quadratic packing took minutes over this), then a short one: every
        // block is the next `width` tokens of the concatenation, masks alongside.
        let long = "abcdefghijklmnopqrstuvwxyz".repeat((4 << 20) / 26);
        let text = format!("{{\"text\": \"{long}\"}}\n{{\"text\": \"tail\"}}\n");
        let o = DataOptions {
            max_seq_len: 100,
            ..opts(true)
        };
        let d = build(&text, &o).unwrap();
        let mut all: Vec<i64> = vec![crate::tokenizer::BYTE_BOS];
        all.extend(long.bytes().map(i64::from));
        all.push(crate::tokenizer::BYTE_EOS);
        all.push(crate::tokenizer::BYTE_BOS);
        all.extend("tail".bytes().map(i64::from));
        all.push(crate::tokenizer::BYTE_EOS);
        assert_eq!(d.len(), all.len() / 101);
        for (k, block) in all.chunks_exact(101).enumerate() {
            let (ids, mask) = d.sample(k);
            assert_eq!(ids, block, "block {k}");
            assert!(mask.iter().all(|&m| m));
        }
    }

    #[test]
    fn invalid_utf8_names_its_line_and_is_skipped_and_a_bom_is_accepted() {
        let mut bytes = b"\xEF\xBB\xBF{\"text\": \"first row\"}\r\n".to_vec();
        bytes.extend_from_slice(b"{\"text\": \"bad \xFF byte\"}\n");
        bytes.extend_from_slice(b"{\"text\": \"third row\"}\n");
        let err = format!(
            "{:#}",
            load_bytes("u.jsonl", &bytes, &opts(false)).err().unwrap()
        );
        assert!(
            err.contains("u.jsonl, line 2") && err.contains("not UTF-8") && err.contains("byte 15"),
            "{err}"
        );
        let mut o = opts(false);
        o.skip_bad_lines = true;
        let d = load_bytes("u.jsonl", &bytes, &o).unwrap();
        assert_eq!((d.documents, d.skipped), (2, 1));
        // The BOM and the \r are not part of the first row.
        let ids = d.rows(&[0]).ids;
        assert_eq!(
            &ids[1..8],
            &"first r".bytes().map(i64::from).collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn unknown_chat_roles_are_named_or_skipped() {
        let s = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, \
             {\"role\": \"assistant\", \"content\": \"yo\"}]}\n\
             {\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}, \
             {\"role\": \"assistant\", \"content\": \"yo\"}]}\n";
        let err = format!("{:#}", build(s, &opts(false)).err().unwrap());
        assert!(
            err.contains("d.jsonl, line 2")
                && err.contains("\"robot\"")
                && err.contains("system, user, assistant, tool"),
            "{err}"
        );
        let mut o = opts(false);
        o.skip_bad_lines = true;
        let d = build(s, &o).unwrap();
        assert_eq!((d.documents, d.skipped), (1, 1));
    }

    #[test]
    fn order_is_a_permutation_and_a_pure_function_of_seed_and_epoch() {
        let order = |seed, epoch, n| {
            (0..n)
                .map(|i| permuted(seed, epoch, n, i))
                .collect::<Vec<_>>()
        };
        for n in [1, 2, 3, 5, 100, 1000, 4097] {
            let a = order(1, 0, n);
            assert_eq!(a, order(1, 0, n));
            let mut sorted = a.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n = {n}");
            if n >= 5 {
                assert_ne!(a, order(1, 1, n));
                assert_ne!(a, order(2, 0, n));
                assert_ne!(a, (0..n).collect::<Vec<_>>());
            }
        }
        // Shuffled, not merely rotated: neighbours rarely stay neighbours.
        let a = order(7, 3, 10_000);
        let adjacent = a.windows(2).filter(|w| w[0].abs_diff(w[1]) == 1).count();
        assert!(adjacent < 50, "{adjacent}");
    }
}
