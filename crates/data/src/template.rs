//! The model's own chat template: `messages` rendered with the tokenizer's Jinja `chat_template`
//! (from `tokenizer_config.json` or `chat_template.jinja`) through `minijinja`, in the environment
//! transformers gives it (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`,
//! `strftime_now`, a `tojson` that does not escape HTML), with the assistant spans transformers'
//! `apply_chat_template(..., return_assistant_tokens_mask=True)` computes:
//!
//! - a template with `{% generation %}` blocks: the rendered text of those blocks (the tags are
//!   rewritten, before compiling, into markers that the rendering is then cut at);
//! - a template without them: each assistant turn as rendered, without its own header and without
//!   the next turn's — the text between the conversation up to the turn rendered with
//!   `add_generation_prompt=True` and the conversation through the turn. (transformers returns an
//!   all-zero mask there; this rule needs the template to render earlier turns the same whatever
//!   follows them, and a row where it does not is an error naming the turn.)

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use minijinja::{Environment, Error, ErrorKind, Value};

/// Marks where a `{% generation %}` block starts in the rendered text (a private-use character).
const GEN_START: char = '\u{F0000}';
/// Marks where a `{% generation %}` block ends.
const GEN_END: char = '\u{F0001}';

/// A compiled chat template and the special tokens it may read.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    generation: bool,
    special: serde_json::Map<String, serde_json::Value>,
}

/// One rendered conversation: the text and the byte ranges of it that are learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The rendered text.
    pub text: String,
    /// Learned byte ranges of `text`, in order.
    pub spans: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// The template of a Hugging Face model directory: `chat_template.jinja`, else the
    /// `chat_template` of `tokenizer_config.json` (a string, or the entry named `default` of a
    /// list); `None` when there is none.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", config_path.display()))?
        } else {
            serde_json::Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("reading {}", jinja.display()))?
        } else {
            match &config["chat_template"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(list) => match list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                {
                    Some(s) => s.to_string(),
                    None => bail!(
                        "{}: `chat_template` is a list without an entry named \"default\"",
                        config_path.display()
                    ),
                },
                _ => return Ok(None),
            }
        };
        let mut special = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let token = match &config[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v["content"].as_str().map(str::to_string),
            };
            if let Some(t) = token {
                special.insert(key.into(), t.into());
            }
        }
        Self::new(&source, special)
            .with_context(|| format!("{}: compiling the chat template", dir.display()))
            .map(Some)
    }

    /// Compiles `source`; `special` (`bos_token`, `eos_token`, …) is visible to it.
    pub fn new(source: &str, special: serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let (rewritten, generation) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> String {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", rewritten)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(Self {
            env,
            source: source.to_string(),
            generation,
            special,
        })
    }

    /// The template's source text (part of the token cache's key).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks assistant text with `{% generation %}`.
    pub fn has_generation_tags(&self) -> bool {
        self.generation
    }

    /// Renders `messages` (a JSON list) and finds the learned spans (see the module doc).
    pub fn render(&self, messages: &serde_json::Value) -> Result<Rendered> {
        let list = messages.as_array().context("`messages` is not a list")?;
        let full = self.render_text(list, false)?;
        ensure!(
            !full.contains([GEN_START, GEN_END]) || self.generation,
            "a message holds the private-use characters U+F0000/U+F0001"
        );
        if self.generation {
            return Ok(cut_markers(&full));
        }
        let mut spans = Vec::new();
        for (k, m) in list.iter().enumerate() {
            if m["role"] != "assistant" {
                continue;
            }
            let head = self.render_text(&list[..k], true)?;
            let through = self.render_text(&list[..=k], false)?;
            ensure!(
                full.starts_with(&head) && full.starts_with(&through),
                "messages[{k}]: the chat template renders the conversation before this assistant \
                 turn differently when the turn is last, so the turn cannot be located; give the \
                 template {{% generation %}} tags"
            );
            if through.len() > head.len() {
                spans.push(head.len()..through.len());
            }
        }
        Ok(Rendered { text: full, spans })
    }

    /// The text of `messages` as transformers' `apply_chat_template(..., tokenize=False)` renders
    /// it, with `add_generation_prompt` when `generation_prompt`.
    pub fn text(&self, messages: &[serde_json::Value], generation_prompt: bool) -> Result<String> {
        let text = self.render_text(messages, generation_prompt)?;
        Ok(if self.generation {
            text.replace([GEN_START, GEN_END], "")
        } else {
            text
        })
    }

    /// Renders `messages` with `add_generation_prompt`; generation markers still in the text.
    fn render_text(&self, messages: &[serde_json::Value], prompt: bool) -> Result<String> {
        let messages: Vec<serde_json::Value> = messages.iter().map(alias_reasoning).collect();
        let mut ctx = self.special.clone();
        ctx.insert("messages".into(), messages.into());
        ctx.insert("add_generation_prompt".into(), prompt.into());
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| anyhow::anyhow!("rendering the chat template: {e:#}"))
    }
}

/// transformers passes a message's reasoning under `reasoning_content` and `thinking` whichever of
/// `reasoning_content`, `thinking`, `reasoning` the row uses.
fn alias_reasoning(message: &serde_json::Value) -> serde_json::Value {
    let mut m = message.clone();
    if let Some(obj) = m.as_object_mut() {
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|k| obj.get(*k).filter(|v| !v.is_null()).cloned());
        if let Some(r) = reasoning {
            obj.entry("thinking").or_insert_with(|| r.clone());
            obj.insert("reasoning_content".into(), r);
        }
    }
    m
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (with their whitespace control) into block
/// tags that print a marker, so that `trim_blocks` and `lstrip_blocks` act on them as on the
/// original tags. Returns the new source and whether there were any.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            rest = "";
            break;
        };
        let inner = &tag[2..close];
        let left = if inner.starts_with('-') { "-" } else { "" };
        let right = if inner.ends_with('-') { "-" } else { "" };
        let word = inner.trim_matches('-').trim();
        let marker = match word {
            "generation" => Some(GEN_START),
            "endgeneration" => Some(GEN_END),
            _ => None,
        };
        match marker {
            Some(m) => {
                found = true;
                out.push_str(&format!(
                    "{{%{left} if true %}}{{{{ \"{m}\" }}}}{{% endif {right}%}}"
                ));
            }
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Cuts the generation markers out of `text`; the text between each pair is a learned span.
fn cut_markers(rendered: &str) -> Rendered {
    let mut text = String::with_capacity(rendered.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in rendered.chars() {
        match c {
            GEN_START => open = Some(text.len()),
            GEN_END => {
                if let Some(s) = open.take() {
                    spans.push(s..text.len());
                }
            }
            c => text.push(c),
        }
    }
    Rendered { text, spans }
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=…, sort_keys=…)`,
/// without HTML escaping.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let json = if sort_keys.unwrap_or(false) {
        sort_json(json)
    } else {
        json
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter::new(indent));
    serde::Serialize::serialize(&json, &mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from(String::from_utf8_lossy(&out).into_owned()))
}

fn sort_json(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<_> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_json(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sort_json).collect())
        }
        v => v,
    }
}

/// Python's `json.dumps` layout: `", "` and `": "` separators, or `indent` spaces per level.
struct PyFormatter {
    indent: Option<usize>,
    depth: usize,
    has_value: bool,
}

impl PyFormatter {
    fn new(indent: Option<usize>) -> Self {
        Self {
            indent,
            depth: 0,
            has_value: false,
        }
    }

    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(n) = self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth * n {
                w.write_all(b" ")?;
            }
        }
        Ok(())
    }

    /// Opens an array or an object with `open` (`[` or `{`).
    fn begin<W: ?Sized + std::io::Write>(&mut self, w: &mut W, open: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(open)
    }

    /// Closes an array or an object with `close` (`]` or `}`), on a line of its own when indented
    /// and not empty.
    fn end<W: ?Sized + std::io::Write>(&mut self, w: &mut W, close: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(close)
    }

    /// What goes before an array element or an object key: a comma after the first, then the line
    /// break and indent (indented) or a space (not).
    fn separate<W: ?Sized + std::io::Write>(&self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.begin(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.end(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separate(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.begin(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.end(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separate(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// The learned tokens of `spans`, as transformers maps character spans to tokens: from the token
/// holding a span's first byte through the one holding its last (to the end when that byte is in
/// no token); a span whose first byte is in no token ends the mapping.
pub fn spans_to_mask(encoding: &tokenizers::Encoding, spans: &[Range<usize>]) -> Vec<bool> {
    let n = encoding.get_ids().len();
    let mut mask = vec![false; n];
    for span in spans {
        if span.is_empty() {
            continue;
        }
        let Some(start) = encoding.char_to_token(span.start, 0) else {
            break;
        };
        let end = match encoding.char_to_token(span.end - 1, 0) {
            // transformers' `end_token + 1 if end_token else len`: 0 reads as "to the end" too.
            Some(e) if e > 0 => e + 1,
            _ => n,
        };
        for m in &mut mask[start..end.min(n)] {
            *m = true;
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat() -> serde_json::Value {
        serde_json::json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "ok"},
        ])
    }

    #[test]
    fn generation_tags_become_spans_with_whitespace_control_kept() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>\n  {%- if m.role == 'assistant' %}\n    \
             {% generation %}\n{{ m.content | trim }}</s>{% endgeneration %}\n{% else %}{{ m.content }}\n{% endif %}{% endfor %}",
            Default::default(),
        )
        .unwrap();
        assert!(t.has_generation_tags());
        let r = t.render(&chat()).unwrap();
        assert_eq!(
            r.text,
            "<user>hi\n<assistant>yo</s><user>more\n<assistant>ok</s>"
        );
        let learned: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(learned, ["yo</s>", "ok</s>"]);
    }

    #[test]
    fn without_generation_tags_turns_are_cut_between_prompts() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}<|end|>{% endfor %}\
             {% if add_generation_prompt %}<|assistant|>{% endif %}",
            Default::default(),
        )
        .unwrap();
        let r = t.render(&chat()).unwrap();
        let learned: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(learned, ["yo<|end|>", "ok<|end|>"]);
    }

    #[test]
    fn tojson_is_pythons_and_raise_exception_fails_the_row() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}\
             {% if messages | length > 1 %}{{ raise_exception('only one') }}{% endif %}",
            Default::default(),
        )
        .unwrap();
        // Keys come sorted (serde_json's maps are ordered by key).
        let one = serde_json::json!([{"role": "user", "content": "<a> & é"}]);
        assert_eq!(
            t.render(&one).unwrap().text,
            "{\"content\": \"<a> & é\", \"role\": \"user\"}|{\n  \"content\": \"<a> & é\",\n  \"role\": \"user\"\n}"
        );
        let err = format!("{:#}", t.render(&chat()).unwrap_err());
        assert!(err.contains("only one"), "{err}");
    }
}
