//! Text to token ids: an HF `tokenizer.json` through the `tokenizers` crate, or the built-in byte
//! tokenizer of the demo model (ids 0–255 are bytes, then BOS, EOS, PAD).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

/// The byte tokenizer's vocabulary size.
pub const BYTE_VOCAB: i64 = 259;
/// The byte tokenizer's beginning-of-sequence id.
pub const BYTE_BOS: i64 = 256;
/// The byte tokenizer's end-of-sequence id.
pub const BYTE_EOS: i64 = 257;
/// The byte tokenizer's padding id.
pub const BYTE_PAD: i64 = 258;

/// How chat `messages` are laid out as text, chosen from the tokenizer's special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (Qwen).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (Llama 3).
    Llama3,
    /// `role: content\n` (anything else).
    Plain,
}

/// A tokenizer.
pub enum Tokenizer {
    /// Bytes, plus BOS/EOS/PAD.
    Bytes,
    /// A Hugging Face tokenizer and its special ids.
    Hf {
        /// The tokenizer.
        inner: Box<tokenizers::Tokenizer>,
        /// Appended after each document.
        eos: i64,
        /// Used to pad when packing is off.
        pad: i64,
        /// The tokenizer's `bos_token` (from `tokenizer_config.json`), when it has one.
        bos: Option<i64>,
        /// The tokenizer's `eos_token` as text (appended to preference completions, as TRL does).
        eos_text: Option<String>,
        /// Its id (transformers' `tokenizer.eos_token_id`, which may differ from `config.json`'s
        /// first `eos_token_id`: Llama 3 instruct models end turns with `<|eot_id|>`).
        eos_token_id: Option<i64>,
        /// Chat layout when there is no chat template.
        chat: ChatFormat,
        /// The tokenizer's own chat template, when it has one (or why it does not compile: chat
        /// rows then fail with that reason, text rows are unaffected).
        template: Result<Option<Box<crate::template::ChatTemplate>>, String>,
        /// sha256 (hex) of `tokenizer.json`: part of the token cache's key.
        sha256: String,
    },
}

impl Tokenizer {
    /// Loads `<dir>/tokenizer.json`; EOS and PAD come from `config.json` (`eos_token_id`,
    /// `pad_token_id`) or the tokenizer's own special tokens.
    pub fn from_hf_dir(dir: &Path, config: &serde_json::Value) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&json));
        let inner = tokenizers::Tokenizer::from_bytes(&json)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("loading {}", path.display()))?;
        let id = |tok: &str| inner.token_to_id(tok).map(i64::from);
        let first_id = |v: &serde_json::Value| {
            v.as_i64().or_else(|| {
                v.as_array()
                    .and_then(|a| a.first())
                    .and_then(|x| x.as_i64())
            })
        };
        let eos = first_id(&config["eos_token_id"])
            .or_else(|| id("<|endoftext|>"))
            .or_else(|| id("</s>"))
            .or_else(|| id("<|end_of_text|>"))
            .with_context(|| {
                format!(
                    "{}: no eos_token_id in config.json and no known end-of-text token",
                    dir.display()
                )
            })?;
        let pad = first_id(&config["pad_token_id"]).unwrap_or(eos);
        // Every sample carries these ids into the embedding: out of the vocabulary they would fail
        // (or index out of bounds) only once training is under way.
        let vocab = config["vocab_size"]
            .as_i64()
            .unwrap_or_else(|| inner.get_vocab_size(true) as i64);
        for (what, id) in [("end-of-text", eos), ("padding", pad)] {
            if !(0..vocab).contains(&id) {
                return Err(waypoint_config::UsageError(format!(
                    "{}: the {what} token id {id} is not in the model's vocabulary (0 to {}); fix \
                     eos_token_id/pad_token_id in config.json",
                    dir.display(),
                    vocab - 1
                ))
                .into());
            }
        }
        let chat = if id("<|im_start|>").is_some() && id("<|im_end|>").is_some() {
            ChatFormat::ChatMl
        } else if id("<|start_header_id|>").is_some() && id("<|eot_id|>").is_some() {
            ChatFormat::Llama3
        } else {
            ChatFormat::Plain
        };
        let template = crate::template::ChatTemplate::from_hf_dir(dir)
            .map(|t| t.map(Box::new))
            .map_err(|e| format!("{e:#}"));
        if let Err(e) = &template {
            tracing::warn!("{e}; chat rows will fail, text rows are unaffected");
        }
        let (bos, eos_text) = special_tokens(dir, &inner, eos);
        let eos_token_id = eos_text
            .as_deref()
            .and_then(|t| inner.token_to_id(t).map(i64::from));
        Ok(Self::Hf {
            inner: Box::new(inner),
            eos,
            pad,
            bos,
            eos_text,
            eos_token_id,
            chat,
            template,
            sha256,
        })
    }

    /// Token ids of `text`, with the tokenizer's own special tokens (BOS) when `add_special`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match self {
            Self::Bytes => {
                let mut ids = Vec::with_capacity(text.len() + 1);
                if add_special {
                    ids.push(BYTE_BOS as u32);
                }
                ids.extend(text.bytes().map(u32::from));
                Ok(ids)
            }
            Self::Hf { inner, .. } => Ok(inner
                .encode_fast(text, add_special)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    /// The tokenizer's own chat template, when it has one.
    pub fn chat_template(&self) -> Option<&crate::template::ChatTemplate> {
        match self {
            Self::Bytes => None,
            Self::Hf { template, .. } => template.as_ref().ok().and_then(|t| t.as_deref()),
        }
    }

    /// Whether chat rows fall back to the built-in layouts (no template, rather than one that
    /// does not compile).
    pub fn uses_builtin_chat_layout(&self) -> bool {
        match self {
            Self::Bytes => true,
            Self::Hf { template, .. } => matches!(template, Ok(None)),
        }
    }

    /// A chat row rendered with the tokenizer's template and tokenized as transformers'
    /// `apply_chat_template` does (no added special tokens), with the assistant mask; `None` when
    /// the tokenizer has no template.
    pub fn encode_chat(
        &self,
        messages: &serde_json::Value,
    ) -> Result<Option<(Vec<u32>, Vec<bool>)>> {
        let Self::Hf {
            inner, template, ..
        } = self
        else {
            return Ok(None);
        };
        let template = match template {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(None),
            Err(e) => anyhow::bail!("{e}"),
        };
        let rendered = template.render(messages)?;
        let encoding = inner
            .encode(rendered.text.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mask = crate::template::spans_to_mask(&encoding, &rendered.spans);
        Ok(Some((encoding.get_ids().to_vec(), mask)))
    }

    /// What identifies the tokenizer and its chat template (part of the token cache's key).
    pub fn identity(&self) -> serde_json::Value {
        match self {
            Self::Bytes => serde_json::json!("bytes"),
            Self::Hf {
                sha256,
                template,
                eos,
                pad,
                ..
            } => serde_json::json!({
                "tokenizer_json_sha256": sha256,
                "chat_template": match template {
                    Ok(t) => serde_json::json!(t.as_ref().map(|t| t.source())),
                    Err(e) => serde_json::json!({ "error": e }),
                },
                "eos": eos,
                "pad": pad,
            }),
        }
    }

    /// The id appended after every document.
    pub fn eos(&self) -> i64 {
        match self {
            Self::Bytes => BYTE_EOS,
            Self::Hf { eos, .. } => *eos,
        }
    }

    /// The tokenizer's beginning-of-sequence id (`bos_token_id` in transformers), if it has one.
    pub fn bos(&self) -> Option<i64> {
        match self {
            Self::Bytes => Some(BYTE_BOS),
            Self::Hf { bos, .. } => *bos,
        }
    }

    /// Appends the end-of-text token to `text` as TRL appends `eos_token` to a preference
    /// completion (unless the text ends with it), and tokenizes: the token's text for a Hugging Face
    /// tokenizer (which reads it as the special token), the id for the byte tokenizer.
    pub fn encode_with_eos(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match self {
            Self::Hf {
                eos_text: Some(e), ..
            } => {
                if text.ends_with(e.as_str()) {
                    self.encode(text, add_special)
                } else {
                    self.encode(&format!("{text}{e}"), add_special)
                }
            }
            _ => {
                let mut ids = self.encode(text, add_special)?;
                let eos = self.tokenizer_eos();
                if ids.last().map(|&i| i64::from(i)) != Some(eos) {
                    ids.push(eos as u32);
                }
                Ok(ids)
            }
        }
    }

    /// The tokenizer's own end-of-text id (transformers' `tokenizer.eos_token_id`, from
    /// `tokenizer_config.json`), which TRL appends to preference completions; else [`Self::eos`].
    pub fn tokenizer_eos(&self) -> i64 {
        match self {
            Self::Hf {
                eos_token_id: Some(id),
                ..
            } => *id,
            _ => self.eos(),
        }
    }

    /// The padding id.
    pub fn pad(&self) -> i64 {
        match self {
            Self::Bytes => BYTE_PAD,
            Self::Hf { pad, .. } => *pad,
        }
    }

    /// The chat layout.
    pub fn chat_format(&self) -> ChatFormat {
        match self {
            Self::Bytes => ChatFormat::Plain,
            Self::Hf { chat, .. } => *chat,
        }
    }

    /// The text of `ids`, special tokens included (what a stop string is looked for in).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Self::Hf { inner, .. } => inner.decode(ids, false).map_err(|e| anyhow::anyhow!("{e}")),
        }
    }

    /// The number of ids the tokenizer can produce.
    pub fn vocab_size(&self) -> i64 {
        match self {
            Self::Bytes => BYTE_VOCAB,
            Self::Hf { inner, .. } => inner.get_vocab_size(true) as i64,
        }
    }
}

/// The byte tokenizer as Hugging Face files (`tokenizer.json`, `tokenizer_config.json`), so that a
/// model promoted from `builtin:tiny` loads with `AutoTokenizer` (and back into waypoint) and turns
/// text into the ids it was trained on: a BPE without merges whose byte-fallback tokens `<0x00>` …
/// `<0xFF>` are ids 0–255, then `<s>`, `</s>`, `<pad>`, with `<s>` put first as waypoint does. One
/// difference, as with any HF tokenizer: the literal texts `<s>`, `</s>`, `<pad>` read as those
/// special tokens, where the byte tokenizer spells them out in bytes.
pub fn byte_tokenizer_files() -> Result<Vec<(String, Bytes)>> {
    let vocab: Vocab = (0..=255u32).map(|b| (format!("<0x{b:02X}>"), b)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .byte_fallback(true)
        .build()
        .map_err(|e| anyhow!("byte tokenizer: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let specials = [("<s>", BYTE_BOS), ("</s>", BYTE_EOS), ("<pad>", BYTE_PAD)];
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|(t, _)| AddedToken::from(*t, true))
        .collect();
    tok.add_special_tokens(&added);
    for (t, id) in specials {
        anyhow::ensure!(
            tok.token_to_id(t) == Some(id as u32),
            "byte tokenizer: {t} is not id {id}"
        );
    }
    let bos = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| anyhow!("byte tokenizer template: {e}"))?
        .special_tokens(vec![("<s>", BYTE_BOS as u32)])
        .build()
        .map_err(|e| anyhow!("byte tokenizer template: {e}"))?;
    tok.with_post_processor(Some(bos));
    tok.with_decoder(Some(Sequence::new(vec![
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ])));
    let json = tok
        .to_string(true)
        .map_err(|e| anyhow!("byte tokenizer to JSON: {e}"))?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
    });
    Ok(vec![
        ("tokenizer.json".into(), Bytes::from(json)),
        (
            "tokenizer_config.json".into(),
            Bytes::from(serde_json::to_vec_pretty(&config)?),
        ),
    ])
}

/// The tokenizer's `bos_token` id and `eos_token` text from `tokenizer_config.json` (a string or
/// `{content}`), the EOS text falling back to the token of `eos`.
fn special_tokens(
    dir: &Path,
    inner: &tokenizers::Tokenizer,
    eos: i64,
) -> (Option<i64>, Option<String>) {
    let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let token = |key: &str| match &config[key] {
        serde_json::Value::String(s) => Some(s.clone()),
        v => v["content"].as_str().map(str::to_string),
    };
    let bos = token("bos_token").and_then(|t| inner.token_to_id(&t).map(i64::from));
    let eos_text = token("eos_token").or_else(|| inner.id_to_token(eos as u32));
    (bos, eos_text)
}

/// The text of one chat turn and the text that ends it, in `format`.
pub fn chat_turn(format: ChatFormat, role: &str, content: &str) -> (String, String, String) {
    match format {
        ChatFormat::ChatMl => (
            format!("<|im_start|>{role}\n"),
            content.to_string(),
            "<|im_end|>\n".to_string(),
        ),
        ChatFormat::Llama3 => (
            format!("<|start_header_id|>{role}<|end_header_id|>\n\n"),
            content.to_string(),
            "<|eot_id|>".to_string(),
        ),
        ChatFormat::Plain => (format!("{role}: "), content.to_string(), "\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_files_encode_and_decode_like_the_byte_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in byte_tokenizer_files().unwrap() {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let config = serde_json::json!({"eos_token_id": BYTE_EOS, "pad_token_id": BYTE_PAD});
        let hf = Tokenizer::from_hf_dir(dir.path(), &config).unwrap();
        for text in ["héllo wörld ✓\n\tend", "", " two  spaces ", "a < s > b"] {
            for special in [true, false] {
                let want = Tokenizer::Bytes.encode(text, special).unwrap();
                assert!(hf.chat_template().is_none());
                assert_eq!(
                    hf.encode(text, special).unwrap(),
                    want,
                    "{text:?} {special}"
                );
            }
        }
        assert_eq!(
            (hf.eos(), hf.pad(), hf.vocab_size()),
            (BYTE_EOS, BYTE_PAD, BYTE_VOCAB)
        );
        let Tokenizer::Hf { inner, .. } = &hf else {
            panic!("not an HF tokenizer")
        };
        let ids: Vec<u32> = "héllo ✓".bytes().map(u32::from).collect();
        assert_eq!(inner.decode(&ids, true).unwrap(), "héllo ✓");
    }

    #[test]
    fn a_template_that_does_not_compile_fails_chat_rows_only() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in byte_tokenizer_files().unwrap() {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let config = serde_json::json!({"chat_template": "{% for m in messages %}{{ m.content }"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let tok = Tokenizer::from_hf_dir(dir.path(), &serde_json::json!({})).unwrap();
        assert!(!tok.uses_builtin_chat_layout());
        assert_eq!(tok.encode("ab", false).unwrap(), vec![97, 98]);
        let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
        let err = format!("{:#}", tok.encode_chat(&messages).unwrap_err());
        assert!(err.contains("compiling the chat template"), "{err}");
        // A template that compiles is used.
        let config = serde_json::json!({
            "chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let tok = Tokenizer::from_hf_dir(dir.path(), &serde_json::json!({})).unwrap();
        let (ids, mask) = tok.encode_chat(&messages).unwrap().unwrap();
        assert_eq!(ids, "[user]hi".bytes().map(u32::from).collect::<Vec<_>>());
        assert!(mask.iter().all(|&m| !m));
    }

    #[test]
    fn bytes_round_trip() {
        let t = Tokenizer::Bytes;
        assert_eq!(t.encode("hé", true).unwrap(), vec![256, 104, 195, 169]);
        assert_eq!(t.encode("a", false).unwrap(), vec![97]);
        assert_eq!(t.vocab_size(), 259);
    }
}
