//! Chat rows through the tokenizer's own chat template, compared token for token with
//! transformers' `apply_chat_template(..., tokenize=True, return_dict=True,
//! return_assistant_tokens_mask=True)` from the venv, on Qwen's real 151k vocabulary: a ChatML
//! template with `{% generation %}`, a Llama-3 template with `{% generation %}`, and Qwen3's
//! template, which has no generation tags (there transformers' mask is all zeros, and waypoint's
//! "assistant turns as rendered" mask is compared with a reference computed in Python from
//! transformers' own rendering).

mod common;

use common::*;
use serde_json::{json, Value};
use waypoint_trainer::data::tokenizer::Tokenizer;

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

#[test]
fn chat_rows_match_transformers_ids_and_assistant_masks_token_for_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let vocab: usize = root_python_script("chat_templates.py", &["vocab", d])
        .trim()
        .parse()
        .unwrap();
    assert!(vocab > 151_000, "{vocab}");
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
