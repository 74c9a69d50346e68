//! Qwen's real 151k vocabulary in the data path: text rows cached as u32 ids equal to the
//! `tokenizers` library's, and chat rows through the tokenizer's own chat template, compared token for token with
//! transformers' `apply_chat_template(..., tokenize=True, return_dict=True,
//! return_assistant_tokens_mask=True)` from the venv, on Qwen's real 151k vocabulary: a ChatML
//! template with `{% generation %}`, a Llama-3 template with `{% generation %}`, and Qwen3's
//! template, which has no generation tags (there transformers' mask is all zeros, and waypoint's
//! "assistant turns as rendered" mask is compared with a reference computed in Python from
//! transformers' own rendering).

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::*;
use serde_json::{json, Value};
use waypoint_data::tokenizer::Tokenizer;
use waypoint_data::{list_sources, DataOptions, Dataset};

fn conversations() -> Value {
    json!([
        [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi there, how can I help?"}
        ],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": " leading space and ünïcödé ✓"},
            {"role": "assistant", "content": "  two leading spaces\nand a newline"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok."}
        ],
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nThe answer is 4."}
        ],
        [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}
        ]
    ])
}

/// A directory with Qwen's 151k-token `tokenizer.json` (made once per test binary).
fn qwen_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let vocab: usize = root_python_script(
            "chat_templates.py",
            &["vocab", dir.path().to_str().unwrap()],
        )
        .trim()
        .parse()
        .unwrap();
        assert!(vocab > 151_000, "{vocab}");
        dir
    })
    .path()
}

#[test]
fn text_rows_cache_as_u32_ids_equal_to_hf_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = tempfile::tempdir().unwrap();
    // Only tokenizer.json: no template here (the other test writes tokenizer_config.json).
    std::fs::copy(
        qwen_dir().join("tokenizer.json"),
        vocab.path().join("tokenizer.json"),
    )
    .unwrap();
    let data = dir.path().join("d.jsonl");
    let rows: Vec<String> = (0..300)
        .map(|i| {
            json!({"text": format!("Row {i}: the trainer writes  weights, 東京 and naïve résumés; {}", "x".repeat(i % 7))})
                .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let want: Vec<Vec<i64>> = root_python_script(
        "chat_templates.py",
        &[
            "encode",
            vocab.path().to_str().unwrap(),
            data.to_str().unwrap(),
        ],
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let tok = Tokenizer::from_hf_dir(vocab.path(), &json!({})).unwrap();
    let eos = tok.eos();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sources = rt.block_on(list_sources(data.to_str().unwrap())).unwrap();
    let opts = DataOptions {
        text_field: "text".into(),
        max_seq_len: 31,
        packing: true,
        pairs: None,
        skip_bad_lines: false,
        cache_dir: dir.path().join("cache"),
        threads: 2,
    };
    let d = Dataset::load(&sources, &tok, &opts, rt.handle().clone()).unwrap();
    assert_eq!(d.token_bytes(), 4, "151k ids need u32");
    // The packed stream is every row's ids and an EOS, in order, cut into blocks of 32.
    let stream: Vec<i64> = want
        .iter()
        .flat_map(|ids| ids.iter().copied().chain([eos]))
        .collect();
    assert!(
        stream.iter().any(|&t| t > 65_535),
        "ids beyond u16 are exercised"
    );
    assert_eq!(d.len(), stream.len() / 32);
    for (k, block) in stream.chunks_exact(32).enumerate() {
        let (ids, mask) = d.sample(k);
        assert_eq!(ids, block, "block {k}");
        assert!(mask.iter().all(|&m| m));
    }
    assert_eq!(d.max_token(), *stream.iter().max().unwrap());
}

#[test]
fn chat_rows_match_transformers_ids_and_assistant_masks_token_for_token() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        qwen_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let convs_path = dir.path().join("convs.json");
    std::fs::write(&convs_path, conversations().to_string()).unwrap();
    let convs = conversations();
    for name in ["chatml_generation", "llama3_generation", "qwen3_plain"] {
        root_python_script("chat_templates.py", &["template", d, name]);
        let out = root_python_script(
            "chat_templates.py",
            &["render", d, convs_path.to_str().unwrap()],
        );
        let refs: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(refs.len(), 4);
        let tok = Tokenizer::from_hf_dir(dir.path(), &json!({})).unwrap();
        let template = tok.chat_template().expect("the template is read");
        let generation = template.has_generation_tags();
        assert_eq!(generation, name != "qwen3_plain");
        for (k, (conv, want)) in convs.as_array().unwrap().iter().zip(&refs).enumerate() {
            let want_ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
            let tf_mask: Vec<u8> = serde_json::from_value(want["assistant_masks"].clone()).unwrap();
            let got = tok.encode_chat(conv);
            if generation {
                let (ids, mask) = got.unwrap().unwrap();
                assert_eq!(ids, want_ids, "{name} conversation {k}: ids");
                let mask: Vec<u8> = mask.iter().map(|&m| u8::from(m)).collect();
                assert_eq!(mask, tf_mask, "{name} conversation {k}: assistant mask");
                assert!(
                    mask.contains(&1),
                    "{name} conversation {k}: nothing learned"
                );
                continue;
            }
            // No generation tags: transformers' mask is empty; the turns rule is compared with the
            // Python reference, and a template that renders earlier turns differently when they
            // come last (Qwen3, several turns) is refused on both sides.
            assert!(!tf_mask.contains(&1));
            match want["turns_error"].as_str() {
                Some(turn) => {
                    let err = format!("{:#}", got.unwrap_err());
                    assert!(
                        err.contains(turn) && err.contains("{% generation %}"),
                        "{name} conversation {k}: {err}"
                    );
                }
                None => {
                    let (ids, mask) = got.unwrap().unwrap();
                    assert_eq!(ids, want_ids, "{name} conversation {k}: ids");
                    let want_mask: Vec<u8> =
                        serde_json::from_value(want["turns_mask"].clone()).unwrap();
                    let mask: Vec<u8> = mask.iter().map(|&m| u8::from(m)).collect();
                    assert_eq!(mask, want_mask, "{name} conversation {k}: turns mask");
                    assert!(mask.contains(&1));
                }
            }
        }
    }
}
