//! Preference rows: a JSONL row holding a prompt with a chosen and a rejected completion, in any of
//! the formats TRL and the control plane use, tokenized into two documents — prompt + chosen and
//! prompt + rejected, the completion tokens learned — exactly as TRL 1.16 tokenizes them for DPO
//! (`DPOTrainer._prepare_dataset`) or for ORPO (`trl.experimental.orpo.ORPOTrainer.tokenize_row`).
//!
//! Formats, detected per row:
//! - standard: `prompt`, `chosen`, `rejected` strings;
//! - conversational: the same keys holding lists of `{role, content}` messages, rendered with the
//!   model's chat template (the prompt with the generation prompt);
//! - implicit prompt: only `chosen` and `rejected` (strings or message lists); the prompt is their
//!   longest common prefix (TRL's `extract_prompt`, character by character or message by message);
//! - Fireworks: `{"input": {"messages": [...]}, "preferred_output": [...],
//!   "non_preferred_output": [...]}`, read as conversational.
//!
//! How the two recipes tokenize (TRL's choices, followed token for token):
//! - DPO: standard rows get the EOS text appended to each completion (unless they end with it) and
//!   are tokenized with the tokenizer's special tokens (BOS); conversational rows are rendered and
//!   tokenized without them. The prompt, prompt + chosen and prompt + rejected are tokenized
//!   separately, and the completion starts where the tokenized prompt stops being a prefix of both.
//! - ORPO: conversational rows are first rendered to text (the prompt is the common text prefix of
//!   the renderings); then everything is tokenized without special tokens, the completion starting
//!   where the prompt's tokens end (one earlier when the last prompt token merged with the
//!   completion), BOS is put first when the tokenizer has one and the tokenizer's EOS id last
//!   (`eos_token` of `tokenizer_config.json`, as transformers reads it).

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::cache::Row;
use crate::tokenizer::{chat_turn, Tokenizer};

/// Whose tokenization a pair follows (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairStyle {
    /// TRL's `DPOTrainer`.
    Dpo,
    /// TRL's `ORPOTrainer`.
    Orpo,
}

impl PairStyle {
    /// Its name in the token cache's key.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dpo => "dpo",
            Self::Orpo => "orpo",
        }
    }
}

/// A preference row, read: text or messages.
enum Parts {
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    Chat {
        prompt: Vec<Value>,
        chosen: Vec<Value>,
        rejected: Vec<Value>,
    },
}

/// The two documents of `line` — prompt + chosen, then prompt + rejected, each with its completion
/// tokens learned — tokenized as TRL tokenizes a pair for `style`. A pair whose prompt alone fills
/// `max_len` tokens is refused (no completion token would be left).
pub fn encode_pair(
    line: &str,
    tokenizer: &Tokenizer,
    style: PairStyle,
    max_len: usize,
) -> Result<Vec<Row>> {
    let row: Value = serde_json::from_str(line).context("not valid JSON")?;
    let parts = read_parts(&row)?;
    let same = match &parts {
        Parts::Text {
            chosen, rejected, ..
        } => chosen == rejected,
        Parts::Chat {
            chosen, rejected, ..
        } => chosen == rejected,
    };
    if same {
        tracing::warn!(
            prompt = %prompt_start(&parts),
            "a pair's chosen and rejected completions are the same: it teaches nothing"
        );
    }
    let (chosen, rejected) = match style {
        PairStyle::Dpo => dpo_tokens(parts, tokenizer)?,
        PairStyle::Orpo => orpo_tokens(parts, tokenizer)?,
    };
    for (name, (ids, mask)) in [("chosen", &chosen), ("rejected", &rejected)] {
        let prompt = mask.iter().take_while(|&&m| !m).count();
        ensure!(
            prompt < ids.len(),
            "`{name}` gives no completion token after the prompt"
        );
        ensure!(
            prompt < max_len,
            "the prompt alone is {prompt} tokens, which fills --max_seq_len {max_len}: no \
             completion token would be trained on (raise --max_seq_len or shorten the prompt)"
        );
    }
    Ok(vec![chosen, rejected])
}

/// The first characters of a pair's prompt (to say which pair a warning is about).
fn prompt_start(parts: &Parts) -> String {
    let text = match parts {
        Parts::Text { prompt, .. } => prompt.clone(),
        Parts::Chat { prompt, .. } => serde_json::to_string(prompt).unwrap_or_default(),
    };
    text.chars().take(40).collect()
}

/// The row's prompt, chosen and rejected, in whichever format it is.
fn read_parts(row: &Value) -> Result<Parts> {
    let obj = row.as_object().context("a row must be a JSON object")?;
    if obj.contains_key("preferred_output") || obj.contains_key("non_preferred_output") {
        let prompt = row["input"]["messages"]
            .as_array()
            .context("a Fireworks pair needs `input.messages`, a list of messages")?;
        let list = |key: &str| -> Result<Vec<Value>> {
            messages(&row[key], key)?.with_context(|| format!("`{key}` is missing"))
        };
        return Ok(Parts::Chat {
            prompt: checked_messages(prompt, "input.messages")?,
            chosen: list("preferred_output")?,
            rejected: list("non_preferred_output")?,
        });
    }
    ensure!(
        obj.contains_key("chosen") && obj.contains_key("rejected"),
        "not a preference pair: it needs `chosen` and `rejected` (with `prompt`, or the prompt is \
         their common start), or Fireworks' `input`, `preferred_output` and \
         `non_preferred_output`"
    );
    let (chosen, rejected) = (&row["chosen"], &row["rejected"]);
    match (&row.get("prompt"), chosen, rejected) {
        (Some(Value::String(p)), Value::String(c), Value::String(r)) => Ok(Parts::Text {
            prompt: p.clone(),
            chosen: nonempty_text(c, "chosen")?,
            rejected: nonempty_text(r, "rejected")?,
        }),
        (None, Value::String(c), Value::String(r)) => {
            let (c, r) = (nonempty_text(c, "chosen")?, nonempty_text(r, "rejected")?);
            let (prompt, chosen, rejected) = split_common_text(&c, &r);
            Ok(Parts::Text {
                prompt,
                chosen,
                rejected,
            })
        }
        (Some(p @ Value::Array(_)), _, _) => Ok(Parts::Chat {
            prompt: messages(p, "prompt")?.context("`prompt` is missing")?,
            chosen: messages(chosen, "chosen")?.context("`chosen` is missing")?,
            rejected: messages(rejected, "rejected")?.context("`rejected` is missing")?,
        }),
        (None, Value::Array(_), Value::Array(_)) => {
            let c = messages(chosen, "chosen")?.context("`chosen` is missing")?;
            let r = messages(rejected, "rejected")?.context("`rejected` is missing")?;
            // TRL's extract_prompt: the messages up to the first that differs (or all but the last
            // of the shorter list when none does).
            let n = c.len().min(r.len());
            let at = (0..n)
                .find(|&i| c[i] != r[i])
                .unwrap_or(n.saturating_sub(1));
            Ok(Parts::Chat {
                prompt: c[..at].to_vec(),
                chosen: nonempty_list(c[at..].to_vec(), "chosen")?,
                rejected: nonempty_list(r[at..].to_vec(), "rejected")?,
            })
        }
        (Some(p), _, _) if !p.is_string() => {
            bail!("`prompt` must be a string or a list of messages")
        }
        _ => bail!(
            "`prompt`, `chosen` and `rejected` must all be strings (standard) or all be lists of \
             messages (conversational)"
        ),
    }
}

/// `value` as a list of `{role, content}` messages named `what` in errors; `None` when absent.
fn messages(value: &Value, what: &str) -> Result<Option<Vec<Value>>> {
    match value {
        Value::Null => Ok(None),
        Value::Array(list) => {
            let list = checked_messages(list, what)?;
            Ok(Some(nonempty_list(list, what)?))
        }
        _ => bail!("`{what}` must be a list of messages with `role` and `content`"),
    }
}

/// Checks each message has a string `role` and `content`.
fn checked_messages(list: &[Value], what: &str) -> Result<Vec<Value>> {
    for (k, m) in list.iter().enumerate() {
        ensure!(m["role"].is_string(), "{what}[{k}] has no string `role`");
        ensure!(
            m["content"].is_string(),
            "{what}[{k}] has no string `content`"
        );
    }
    Ok(list.to_vec())
}

fn nonempty_text(s: &str, what: &str) -> Result<String> {
    ensure!(!s.is_empty(), "`{what}` is empty");
    Ok(s.to_string())
}

fn nonempty_list(list: Vec<Value>, what: &str) -> Result<Vec<Value>> {
    ensure!(!list.is_empty(), "`{what}` is empty");
    Ok(list)
}

/// TRL's `extract_prompt` on two texts: the prompt is their common start (by character), minus a
/// space just before where they differ, which goes to the completions.
fn split_common_text(chosen: &str, rejected: &str) -> (String, String, String) {
    let (c, r): (Vec<char>, Vec<char>) = (chosen.chars().collect(), rejected.chars().collect());
    let n = c.len().min(r.len());
    let mut at = n.saturating_sub(1);
    for i in 0..n {
        if c[i] != r[i] {
            at = if i > 0 && c[i - 1] == ' ' { i - 1 } else { i };
            break;
        }
    }
    let s = |v: &[char]| v.iter().collect::<String>();
    (s(&c[..at]), s(&c[at..]), s(&r[at..]))
}

/// The number of leading ids `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A document: `ids`, the first `prompt` of them not learned, the rest learned.
fn document(ids: Vec<u32>, prompt: usize) -> Row {
    let mask = (0..ids.len()).map(|i| i >= prompt).collect();
    (ids, mask)
}

/// `messages` as the model's chat template renders them (with the generation prompt when
/// `generation_prompt`), or, without a template, in the tokenizer's built-in chat layout.
fn chat_text(tokenizer: &Tokenizer, messages: &[Value], generation_prompt: bool) -> Result<String> {
    if let Some(template) = tokenizer.chat_template() {
        return template.text(messages, generation_prompt);
    }
    ensure!(
        tokenizer.uses_builtin_chat_layout(),
        "the tokenizer's chat template does not compile, so conversational pairs cannot be rendered"
    );
    let mut text = String::new();
    for m in messages {
        let (head, body, tail) = chat_turn(
            tokenizer.chat_format(),
            m["role"].as_str().unwrap_or_default(),
            m["content"].as_str().unwrap_or_default(),
        );
        text.push_str(&head);
        text.push_str(&body);
        text.push_str(&tail);
    }
    if generation_prompt {
        text.push_str(&chat_turn(tokenizer.chat_format(), "assistant", "").0);
    }
    Ok(text)
}

/// Tokens of a chat rendering: with the template, as `apply_chat_template` tokenizes (no special
/// tokens added); in the built-in layout, with the tokenizer's BOS first.
fn chat_ids(
    tokenizer: &Tokenizer,
    messages: &[Value],
    generation_prompt: bool,
) -> Result<Vec<u32>> {
    let text = chat_text(tokenizer, messages, generation_prompt)?;
    tokenizer.encode(&text, tokenizer.chat_template().is_none())
}

/// TRL's DPO tokenization (see the module doc).
fn dpo_tokens(parts: Parts, tokenizer: &Tokenizer) -> Result<(Row, Row)> {
    let (prompt, chosen, rejected) = match parts {
        Parts::Text {
            prompt,
            chosen,
            rejected,
        } => (
            tokenizer.encode(&prompt, true)?,
            tokenizer.encode_with_eos(&format!("{prompt}{chosen}"), true)?,
            tokenizer.encode_with_eos(&format!("{prompt}{rejected}"), true)?,
        ),
        Parts::Chat {
            prompt,
            chosen,
            rejected,
        } => {
            let joined = |c: &[Value]| [prompt.as_slice(), c].concat();
            (
                chat_ids(tokenizer, &prompt, true)?,
                chat_ids(tokenizer, &joined(&chosen), false)?,
                chat_ids(tokenizer, &joined(&rejected), false)?,
            )
        }
    };
    let at = common_prefix(&prompt, &chosen).min(common_prefix(&prompt, &rejected));
    Ok((document(chosen, at), document(rejected, at)))
}

/// TRL's ORPO tokenization (see the module doc).
fn orpo_tokens(parts: Parts, tokenizer: &Tokenizer) -> Result<(Row, Row)> {
    let (prompt, chosen, rejected) = match parts {
        Parts::Text {
            prompt,
            chosen,
            rejected,
        } => (prompt, chosen, rejected),
        Parts::Chat {
            prompt,
            chosen,
            rejected,
        } => {
            // TRL's apply_chat_template: a prompt ending on an assistant turn is continued, which
            // the renderer here does not do.
            let last = prompt.last().and_then(|m| m["role"].as_str());
            ensure!(
                matches!(last, Some("user" | "tool") | None),
                "the prompt's last message is {:?}: ORPO needs a prompt that ends with a user or \
                 tool message",
                last.unwrap_or_default()
            );
            let head = chat_text(tokenizer, &prompt, true)?;
            let pc = chat_text(tokenizer, &[prompt.as_slice(), &chosen].concat(), false)?;
            let pr = chat_text(tokenizer, &[prompt.as_slice(), &rejected].concat(), false)?;
            let common = |a: &str, b: &str| -> usize {
                a.char_indices()
                    .zip(b.chars())
                    .find(|((_, x), y)| x != y)
                    .map_or(a.len().min(b.len()), |((i, _), _)| i)
            };
            let mut cut = common(&head, &pc);
            cut = cut.min(common(&head[..cut], &pr));
            (
                head[..cut].to_string(),
                pc[cut..].to_string(),
                pr[cut..].to_string(),
            )
        }
    };
    let prompt_ids = tokenizer.encode(&prompt, false)?;
    // build_tokenized_answer: the answer's ids are those of prompt + answer after the prompt's,
    // starting one earlier when the prompt's last token merged with the answer.
    let answer = |text: &str| -> Result<(Vec<u32>, Vec<u32>)> {
        let full = tokenizer.encode(&format!("{prompt}{text}"), false)?;
        ensure!(
            full.len() >= prompt_ids.len(),
            "the prompt tokenizes longer alone than with its completion"
        );
        let mut start = prompt_ids.len();
        if full[..start] != prompt_ids[..] {
            start = start.saturating_sub(1);
        }
        Ok((full[..start].to_vec(), full[start..].to_vec()))
    };
    let (mut cp, mut ca) = answer(&chosen)?;
    let (mut rp, mut ra) = answer(&rejected)?;
    let differing = cp.iter().zip(&rp).filter(|(a, b)| a != b).count();
    ensure!(
        differing <= 1 && cp.len().abs_diff(rp.len()) <= 1,
        "the prompt tokenizes differently before the chosen and the rejected completions"
    );
    if let Some(bos) = tokenizer.bos().map(|b| b as u32) {
        for p in [&mut cp, &mut rp] {
            if p.first() != Some(&bos) {
                p.insert(0, bos);
            }
        }
    }
    let eos = tokenizer.tokenizer_eos() as u32;
    for a in [&mut ca, &mut ra] {
        if a.last() != Some(&eos) {
            a.push(eos);
        }
    }
    let (cl, rl) = (cp.len(), rp.len());
    cp.extend(ca);
    rp.extend(ra);
    Ok((document(cp, cl), document(rp, rl)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{BYTE_BOS, BYTE_EOS};

    fn bytes(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    #[test]
    fn implicit_prompts_split_as_trl_does() {
        assert_eq!(
            split_common_text("The sky is blue.", "The sky is green."),
            ("The sky is".into(), " blue.".into(), " green.".into())
        );
        // No difference within the shorter: all but its last character.
        assert_eq!(
            split_common_text("abc", "abcd"),
            ("ab".into(), "c".into(), "cd".into())
        );
    }

    #[test]
    fn dpo_and_orpo_documents_of_a_standard_pair() {
        let line = r#"{"prompt": "Q:", "chosen": " yes", "rejected": " no"}"#;
        let rows = encode_pair(line, &Tokenizer::Bytes, PairStyle::Dpo, 64).unwrap();
        let mut want = vec![BYTE_BOS as u32];
        want.extend(bytes("Q: yes"));
        want.push(BYTE_EOS as u32);
        assert_eq!(rows[0].0, want);
        // BOS and "Q:" are the prompt.
        assert_eq!(rows[0].1.iter().filter(|&&m| !m).count(), 3);
        let orpo = encode_pair(line, &Tokenizer::Bytes, PairStyle::Orpo, 64).unwrap();
        assert_eq!(orpo[0].0, want);
        assert_eq!(orpo[1].1.iter().filter(|&&m| m).count(), 4);
    }

    #[test]
    fn bad_pairs_say_which_field() {
        let err = |line: &str| {
            format!(
                "{:#}",
                encode_pair(line, &Tokenizer::Bytes, PairStyle::Dpo, 64).unwrap_err()
            )
        };
        assert!(err(r#"{"prompt": "a", "chosen": "b"}"#).contains("`chosen` and `rejected`"));
        assert!(
            err(r#"{"prompt": "a", "chosen": "", "rejected": "c"}"#).contains("`chosen` is empty")
        );
        assert!(
            err(r#"{"prompt": "a", "chosen": ["x"], "rejected": "c"}"#).contains("all be strings")
        );
        assert!(err(
            r#"{"input": {"messages": []}, "preferred_output": 3, "non_preferred_output": []}"#
        )
        .contains("`preferred_output` must be a list"));
        let long = format!(
            r#"{{"prompt": "{}", "chosen": "b", "rejected": "c"}}"#,
            "p".repeat(80)
        );
        assert!(err(&long).contains("fills --max_seq_len 64"));
    }
}
