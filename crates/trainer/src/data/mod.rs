//! Training data: JSONL rows (a text field, or chat `messages` with loss on assistant turns only),
//! tokenized and packed (or padded) into fixed-length samples, visited in an order that is a pure
//! function of (seed, epoch).
//!
//! The position in the data is one global counter, `data_consumed`: sample `g` of the run is
//! `order(seed, g / n)[g % n]` of the `n` samples. Resuming at any counter — with any batch split —
//! continues the same sequence.

pub mod tokenizer;

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use tch::{Device, Tensor};
use waypoint_storage::Store;

use crate::data::tokenizer::{chat_turn, Tokenizer};

/// The demo dataset shipped in the binary (`dataset_uri = builtin:demo`).
pub const DEMO_DATASET: &str = include_str!("../../assets/demo.jsonl");

/// Label value that the loss ignores.
pub const IGNORE: i64 = -100;

/// A JSONL source: its name (for error messages) and bytes. Lines are checked for UTF-8 one by one,
/// so that a bad byte names its line (and can be skipped with the rest of a bad row).
pub struct Source {
    /// A path or URI.
    pub name: String,
    /// The file's bytes.
    pub bytes: Bytes,
}

/// The chat roles `messages` may use (those of Hugging Face chat templates).
pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// The UTF-8 byte order mark, accepted (and dropped) at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Source {
    /// The non-blank lines, numbered from 1, as text; a line that is not UTF-8 is an error naming
    /// where it goes wrong. A byte order mark at the start and `\r` line ends are dropped.
    pub fn lines(&self) -> impl Iterator<Item = (usize, Result<&str, std::str::Utf8Error>)> + '_ {
        let bytes = self.bytes.strip_prefix(BOM).unwrap_or(&self.bytes);
        bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .map(|(i, line)| (i + 1, line.strip_suffix(b"\r").unwrap_or(line)))
            .filter(|(_, line)| !line.trim_ascii().is_empty())
            .map(|(n, line)| (n, std::str::from_utf8(line)))
    }
}

/// Reads `uri`: `builtin:demo`, a local file or directory (its `*.jsonl`, sorted), or a store URI of a
/// file or a prefix (its `*.jsonl` objects, sorted).
pub async fn read_sources(uri: &str) -> Result<Vec<Source>> {
    if uri == "builtin:demo" {
        return Ok(vec![Source {
            name: uri.into(),
            bytes: Bytes::from_static(DEMO_DATASET.as_bytes()),
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
        return files
            .into_iter()
            .map(|f| {
                let bytes = std::fs::read(&f).with_context(|| {
                    format!("reading {} (a JSONL file or directory)", f.display())
                })?;
                Ok(Source {
                    name: f.display().to_string(),
                    bytes: bytes.into(),
                })
            })
            .collect();
    }
    let (parent, leaf) = match uri.trim_end_matches('/').rsplit_once('/') {
        Some((p, l)) if uri.ends_with(".jsonl") => (p.to_string(), Some(l.to_string())),
        _ => (uri.trim_end_matches('/').to_string(), None),
    };
    let store = Store::open(&parent).with_context(|| format!("opening {parent}"))?;
    let keys = match leaf {
        Some(l) => vec![l],
        None => {
            let mut keys: Vec<String> = store
                .list("")
                .await
                .with_context(|| format!("listing {uri}"))?
                .into_iter()
                .map(|m| m.key)
                .filter(|k| k.ends_with(".jsonl"))
                .collect();
            keys.sort();
            ensure!(!keys.is_empty(), "{uri} holds no *.jsonl object");
            keys
        }
    };
    let mut out = Vec::new();
    for key in keys {
        let bytes = store
            .get(&key)
            .await
            .with_context(|| format!("reading {parent}/{key}"))?;
        out.push(Source {
            name: format!("{parent}/{key}"),
            bytes,
        });
    }
    Ok(out)
}

/// How rows become samples.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// The JSON field holding the text (when a row has no `messages`).
    pub text_field: String,
    /// Tokens per sample (the model sees `max_seq_len` inputs and as many labels).
    pub max_seq_len: usize,
    /// Concatenate documents and cut fixed blocks; else one padded sample per document.
    pub packing: bool,
    /// Skip and count malformed rows instead of failing.
    pub skip_bad_lines: bool,
}

/// Tokenized samples of `max_seq_len + 1` ids each, with per-token loss masks.
pub struct Dataset {
    tokens: Vec<Vec<i64>>,
    mask: Vec<Vec<bool>>,
    /// Rows skipped as malformed.
    pub skipped: usize,
    /// Documents read.
    pub documents: usize,
}

impl Dataset {
    /// Tokenizes every row of `sources` and builds the samples.
    pub fn build(sources: &[Source], tokenizer: &Tokenizer, opts: &DataOptions) -> Result<Self> {
        let width = opts.max_seq_len + 1;
        let mut docs: Vec<(Vec<i64>, Vec<bool>)> = Vec::new();
        let mut skipped = 0;
        for source in sources {
            for (n, line) in source.lines() {
                let row = line
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "not UTF-8: byte {} of the line starts an invalid sequence",
                            e.valid_up_to() + 1
                        )
                    })
                    .and_then(|line| encode_row(line, tokenizer, opts));
                match row {
                    Ok(doc) => docs.push(doc),
                    Err(e) if opts.skip_bad_lines => {
                        skipped += 1;
                        tracing::warn!(file = %source.name, line = n, "skipping row: {e:#}");
                    }
                    Err(e) => {
                        return Err(e.context(format!(
                            "{}, line {n}: bad row (fix it, or pass --skip_bad_lines to skip and \
                             count bad rows)",
                            source.name
                        )))
                    }
                }
            }
        }
        let documents = docs.len();
        let (mut tokens, mut mask) = (Vec::new(), Vec::new());
        if opts.packing {
            (tokens, mask) = pack(docs, width);
        } else {
            for (mut dt, mut dm) in docs {
                dt.truncate(width);
                dm.truncate(width);
                while dt.len() < width {
                    dt.push(tokenizer.pad());
                    dm.push(false);
                }
                tokens.push(dt);
                mask.push(dm);
            }
        }
        ensure!(
            !tokens.is_empty(),
            "the dataset gives no sample of {width} tokens ({documents} documents); lower \
             --max_seq_len or add data"
        );
        Ok(Self {
            tokens,
            mask,
            skipped,
            documents,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are no samples (never, once built).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The sample index of global position `g` (see the module doc).
    pub fn sample_at(&self, seed: u64, g: u64) -> usize {
        let n = self.len() as u64;
        order(seed, g / n, self.len())[(g % n) as usize]
    }

    /// Inputs and labels `[count, max_seq_len]` of the samples at global positions
    /// `start..start + count`; labels are [`IGNORE`] where the loss does not apply.
    pub fn batch(&self, seed: u64, start: u64, count: usize, device: Device) -> (Tensor, Tensor) {
        let indices: Vec<usize> = (0..count as u64)
            .map(|k| self.sample_at(seed, start + k))
            .collect();
        self.rows(&indices, device)
    }

    /// Inputs and labels of samples `indices`, in order.
    pub fn rows(&self, indices: &[usize], device: Device) -> (Tensor, Tensor) {
        let width = self.tokens[0].len();
        let mut ids = Vec::with_capacity(indices.len() * (width - 1));
        let mut labels = Vec::with_capacity(indices.len() * (width - 1));
        for &i in indices {
            let (t, m) = (&self.tokens[i], &self.mask[i]);
            ids.extend_from_slice(&t[..width - 1]);
            labels.extend((1..width).map(|j| if m[j] { t[j] } else { IGNORE }));
        }
        let shape = [indices.len() as i64, width as i64 - 1];
        (
            Tensor::from_slice(&ids).view(shape).to_device(device),
            Tensor::from_slice(&labels).view(shape).to_device(device),
        )
    }

    /// The largest token id in the data (checked against the model's vocabulary).
    pub fn max_token(&self) -> i64 {
        self.tokens
            .iter()
            .flat_map(|t| t.iter().copied())
            .max()
            .unwrap_or(0)
    }
}

/// The last order computed on this thread: consecutive lookups share an epoch.
type OrderCache = Option<((u64, u64, usize), Rc<Vec<usize>>)>;

/// The visiting order of `n` samples in `epoch`: a ChaCha8 shuffle seeded by (seed, epoch) alone.
pub fn order(seed: u64, epoch: u64, n: usize) -> Rc<Vec<usize>> {
    thread_local! {
        static CACHE: RefCell<OrderCache> = const { RefCell::new(None) };
    }
    let key = (seed, epoch, n);
    if let Some(v) = CACHE.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }) {
        return v;
    }
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rng);
    let v = Rc::new(v);
    CACHE.with(|c| *c.borrow_mut() = Some((key, v.clone())));
    v
}

/// Concatenates documents and cuts blocks of `width` (the tail shorter than `width` is dropped). Each
/// token is copied once: linear in the data, however long one document is.
fn pack(docs: Vec<(Vec<i64>, Vec<bool>)>, width: usize) -> (Vec<Vec<i64>>, Vec<Vec<bool>>) {
    let (mut tokens, mut mask) = (Vec::new(), Vec::new());
    // What is left of the previous documents: fewer than `width` tokens.
    let (mut t, mut m): (Vec<i64>, Vec<bool>) = (Vec::new(), Vec::new());
    for (dt, dm) in docs {
        t.extend(dt);
        m.extend(dm);
        let whole = t.len() / width * width;
        tokens.extend(t[..whole].chunks_exact(width).map(<[i64]>::to_vec));
        mask.extend(m[..whole].chunks_exact(width).map(<[bool]>::to_vec));
        // Moves fewer than `width` tokens to the front.
        t.drain(..whole);
        m.drain(..whole);
    }
    (tokens, mask)
}

/// One JSONL row to (ids, loss mask), EOS-terminated.
fn encode_row(
    line: &str,
    tokenizer: &Tokenizer,
    opts: &DataOptions,
) -> Result<(Vec<i64>, Vec<bool>)> {
    let row: Value = serde_json::from_str(line).context("not valid JSON")?;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    if let Some(messages) = row.get("messages") {
        let messages = messages.as_array().context("`messages` is not a list")?;
        ensure!(!messages.is_empty(), "`messages` is empty");
        let prefix = tokenizer.encode("", true)?;
        mask.extend(std::iter::repeat_n(false, prefix.len()));
        ids.extend(prefix);
        let mut any_assistant = false;
        for (k, m) in messages.iter().enumerate() {
            let role = m["role"]
                .as_str()
                .with_context(|| format!("messages[{k}] has no string `role`"))?;
            let content = m["content"]
                .as_str()
                .with_context(|| format!("messages[{k}] has no string `content`"))?;
            ensure!(
                CHAT_ROLES.contains(&role),
                "messages[{k}] has role {role:?}; the accepted roles are {}",
                CHAT_ROLES.join(", ")
            );
            let learn = role == "assistant";
            any_assistant |= learn;
            let (head, body, tail) = chat_turn(tokenizer.chat_format(), role, content);
            for (text, on) in [(head, false), (body, learn), (tail, learn)] {
                let t = tokenizer.encode(&text, false)?;
                mask.extend(std::iter::repeat_n(on, t.len()));
                ids.extend(t);
            }
        }
        ensure!(any_assistant, "`messages` has no assistant turn to learn");
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
    ids.push(tokenizer.eos());
    mask.push(true);
    Ok((ids, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(packing: bool) -> DataOptions {
        DataOptions {
            text_field: "text".into(),
            max_seq_len: 8,
            packing,
            skip_bad_lines: false,
        }
    }

    fn source(text: &str) -> Vec<Source> {
        vec![Source {
            name: "d.jsonl".into(),
            bytes: Bytes::copy_from_slice(text.as_bytes()),
        }]
    }

    #[test]
    fn packs_rows_and_masks_chat_to_assistant_turns() {
        let s = source(
            "{\"text\": \"abcdefghij\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, \
             {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
        );
        let d = Dataset::build(&s, &Tokenizer::Bytes, &opts(false)).unwrap();
        assert_eq!((d.len(), d.documents), (2, 2));
        let (ids, labels) = d.rows(&[1], Device::Cpu);
        let labels: Vec<i64> = Vec::try_from(labels.view([-1])).unwrap();
        let ids: Vec<i64> = Vec::try_from(ids.view([-1])).unwrap();
        // BOS "user: hi\n" "assistant: " are not learned; "yo" would be, but 8 tokens cut it off.
        assert_eq!(ids[0], crate::data::tokenizer::BYTE_BOS);
        assert!(labels.iter().all(|&l| l == IGNORE), "{labels:?}");
        let packed = Dataset::build(&s, &Tokenizer::Bytes, &opts(true)).unwrap();
        // 12 + 25 tokens → 4 blocks of 9.
        assert_eq!(packed.len(), 4);
    }

    #[test]
    fn bad_rows_name_file_and_line_or_are_counted() {
        let s = source("{\"text\": \"abcdefghijkl\"}\n{\"txt\": 1}\n");
        let err = Dataset::build(&s, &Tokenizer::Bytes, &opts(true))
            .err()
            .unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("d.jsonl, line 2") && msg.contains("--dataset_text_field"),
            "{msg}"
        );
        let mut o = opts(true);
        o.skip_bad_lines = true;
        let d = Dataset::build(&s, &Tokenizer::Bytes, &o).unwrap();
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
        let d = Dataset::build(&source(&text), &Tokenizer::Bytes, &o).unwrap();
        let mut all: Vec<i64> = vec![crate::data::tokenizer::BYTE_BOS];
        all.extend(long.bytes().map(i64::from));
        all.push(crate::data::tokenizer::BYTE_EOS);
        all.push(crate::data::tokenizer::BYTE_BOS);
        all.extend("tail".bytes().map(i64::from));
        all.push(crate::data::tokenizer::BYTE_EOS);
        assert_eq!(d.len(), all.len() / 101);
        for (k, block) in all.chunks_exact(101).enumerate() {
            assert_eq!(d.tokens[k], block, "block {k}");
            assert!(d.mask[k].iter().all(|&m| m));
        }
    }

    #[test]
    fn invalid_utf8_names_its_line_and_is_skipped_and_a_bom_is_accepted() {
        let mut bytes = b"\xEF\xBB\xBF{\"text\": \"first row\"}\r\n".to_vec();
        bytes.extend_from_slice(b"{\"text\": \"bad \xFF byte\"}\n");
        bytes.extend_from_slice(b"{\"text\": \"third row\"}\n");
        let s = vec![Source {
            name: "u.jsonl".into(),
            bytes: bytes.into(),
        }];
        let err = format!(
            "{:#}",
            Dataset::build(&s, &Tokenizer::Bytes, &opts(false))
                .err()
                .unwrap()
        );
        assert!(
            err.contains("u.jsonl, line 2") && err.contains("not UTF-8") && err.contains("byte 15"),
            "{err}"
        );
        let mut o = opts(false);
        o.skip_bad_lines = true;
        let d = Dataset::build(&s, &Tokenizer::Bytes, &o).unwrap();
        assert_eq!((d.documents, d.skipped), (2, 1));
        // The BOM and the \r are not part of the first row.
        let (ids, _) = d.rows(&[0], Device::Cpu);
        let ids: Vec<i64> = Vec::try_from(ids.view([-1])).unwrap();
        assert_eq!(
            &ids[1..8],
            &"first r".bytes().map(i64::from).collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn unknown_chat_roles_are_named_or_skipped() {
        let s = source(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, \
             {\"role\": \"assistant\", \"content\": \"yo\"}]}\n\
             {\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}, \
             {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
        );
        let err = format!(
            "{:#}",
            Dataset::build(&s, &Tokenizer::Bytes, &opts(false))
                .err()
                .unwrap()
        );
        assert!(
            err.contains("d.jsonl, line 2")
                && err.contains("\"robot\"")
                && err.contains("system, user, assistant, tool"),
            "{err}"
        );
        let mut o = opts(false);
        o.skip_bad_lines = true;
        let d = Dataset::build(&s, &Tokenizer::Bytes, &o).unwrap();
        assert_eq!((d.documents, d.skipped), (1, 1));
    }

    #[test]
    fn order_is_a_pure_function_of_seed_and_epoch() {
        let a = order(1, 0, 100);
        assert_eq!(a, order(1, 0, 100));
        assert_ne!(a, order(1, 1, 100));
        assert_ne!(a, order(2, 0, 100));
        let mut sorted = (*a).clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }
}
