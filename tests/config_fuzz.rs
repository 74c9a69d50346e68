//! Fuzzes `waypoint train`'s flag and config-file parser with hostile values: huge and negative
//! integers, NaN and infinities, empty and long strings, wrong JSON/TOML types, unknown keys. Whatever
//! comes in, resolving never panics; it gives a configuration within every documented range, or a
//! typed error whose message names the flag, key or file at fault.

use std::io::Write;

use proptest::prelude::*;
use serde_json::{json, Value};
use waypoint::cli::{resolve_train_args, ArgsError};
use waypoint_config::{keys, limits, TrainConfig};

/// Hostile command-line values.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-9223372036854775809".to_string()),
        Just("2147483648".to_string()),
        Just("1000000000000".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1".to_string()),
        Just("0.5".to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("1e309".to_string()),
        Just("-0".to_string()),
        Just(String::new()),
        Just("x".repeat(10_000)),
        Just("s3://AKIA:secret@bucket/x".to_string()),
        Just("run:step-1".to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| x.to_string()),
        "\\PC{0,40}",
    ]
}

/// A flag name: a real one most of the time, else something near or random.
fn flag_name() -> impl Strategy<Value = String> {
    let valid = keys();
    prop_oneof![
        4 => proptest::sample::select(valid),
        1 => "[a-z_]{1,20}",
        1 => Just("config_path".to_string()),
    ]
}

/// Hostile JSON values for a config file.
fn hostile_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::from)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e308)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!("")),
        Just(json!("x".repeat(5_000))),
        "\\PC{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(flag_name(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Hostile TOML values (TOML has nan and inf, and no null).
fn hostile_toml() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-9223372036854775808".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e308".to_string()),
        Just("true".to_string()),
        Just("\"\"".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z]{0,12}".prop_map(|s| format!("{s:?}")),
    ]
}

/// A configuration that resolved must be inside every range the parser promises.
fn assert_in_range(c: &TrainConfig) {
    assert!(
        (1..=limits::BATCH_SIZE).contains(&c.data.batch_size),
        "{c:?}"
    );
    assert!(
        (1..=limits::GRADIENT_ACCUMULATION).contains(&c.data.gradient_accumulation),
        "{c:?}"
    );
    assert!(
        (2..=limits::MAX_SEQ_LEN).contains(&c.data.max_seq_len),
        "{c:?}"
    );
    assert!(
        c.data.batch_size * c.data.gradient_accumulation * c.data.max_seq_len
            <= limits::TOKENS_PER_STEP
    );
    assert!(c.model.num_threads <= limits::NUM_THREADS);
    assert!(c.lora.lora_rank <= limits::LORA_RANK);
    assert!((1..=limits::DIST_TIMEOUT_SECS).contains(&c.distributed.dist_timeout_secs));
    assert!(c.optim.lr.is_finite() && c.optim.lr > 0.0, "{c:?}");
    assert!(
        c.optim.adam_epsilon.is_finite() && c.optim.adam_epsilon > 0.0,
        "{c:?}"
    );
    for x in [
        c.optim.weight_decay,
        c.optim.max_grad_norm,
        c.lora.lora_alpha,
    ] {
        assert!(x.is_finite() && x >= 0.0, "{c:?}");
    }
    assert!((0.0..=1.0).contains(&c.optim.min_lr_ratio), "{c:?}");
    for x in [c.optim.adam_beta1, c.optim.adam_beta2, c.lora.lora_dropout] {
        assert!((0.0..1.0).contains(&x), "{c:?}");
    }
    assert!(c.run.eval_steps == 0 || !c.data.eval_dataset_uri.is_empty());
}

/// An error must say which flag, key or file is at fault.
fn assert_names_the_culprit(err: &ArgsError) {
    match err {
        ArgsError::Flags(message) => {
            assert!(
                message.contains("--") || message.contains("argument"),
                "{message}"
            )
        }
        ArgsError::Config(e) => {
            let named = e.message.contains(&format!("--{}", e.key))
                || e.message.contains(&format!("`{}`", e.key));
            assert!(
                named,
                "the message does not name `{}`: {}",
                e.key, e.message
            );
            assert!(
                e.key == "config_path" || keys().contains(&e.key),
                "unknown key {:?} in {}",
                e.key,
                e.message
            );
        }
    }
}

fn check(result: Result<TrainConfig, ArgsError>) {
    match result {
        Ok(c) => assert_in_range(&c),
        Err(e) => assert_names_the_culprit(&e),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn hostile_flags_never_panic(
        pairs in proptest::collection::vec((flag_name(), hostile_text()), 0..6),
        equals in any::<bool>(),
    ) {
        let mut argv = Vec::new();
        for (flag, value) in pairs {
            if equals {
                argv.push(format!("--{flag}={value}"));
            } else {
                argv.push(format!("--{flag}"));
                argv.push(value);
            }
        }
        check(resolve_train_args(&argv));
    }

    #[test]
    fn hostile_json_config_files_never_panic(
        settings in proptest::collection::btree_map(flag_name(), hostile_json(), 0..6),
        extra_args in proptest::option::of(hostile_json()),
        flags in proptest::collection::vec((flag_name(), hostile_text()), 0..3),
    ) {
        let mut doc: serde_json::Map<String, Value> = settings.into_iter().collect();
        if let Some(extra) = extra_args {
            doc.insert("extra_args".into(), extra);
        }
        let mut file = tempfile::Builder::new().suffix(".json").tempfile().unwrap();
        file.write_all(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let mut argv = vec!["--config_path".to_string(), file.path().display().to_string()];
        for (flag, value) in flags {
            argv.push(format!("--{flag}={value}"));
        }
        check(resolve_train_args(&argv));
    }

    #[test]
    fn hostile_toml_config_files_never_panic(
        settings in proptest::collection::btree_map(flag_name(), hostile_toml(), 0..6),
    ) {
        let text: String = settings.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        check(resolve_train_args(["--config_path", file.path().to_str().unwrap()]));
    }
}

#[test]
fn the_issues_examples_name_the_flag_and_the_range() {
    for (argv, expect) in [
        (
            vec!["--batch_size", "18446744073709551615"],
            "--batch_size 18446744073709551615 is out of range: use 1 to 65536",
        ),
        (vec!["--num_threads", "2147483648"], "--num_threads"),
        (
            vec!["--gradient_accumulation", "1000000000000"],
            "--gradient_accumulation",
        ),
        (vec!["--lora_rank", "1000000"], "--lora_rank"),
        (vec!["--lr", "NaN"], "--lr must be a finite positive number"),
        (vec!["--lr", "inf"], "--lr must be a finite positive number"),
        (
            vec!["--min_lr_ratio=-1"],
            "--min_lr_ratio must be a number in [0, 1]",
        ),
        (
            vec!["--weight_decay=-1"],
            "--weight_decay must be a finite number ≥ 0",
        ),
        (
            vec!["--adam_epsilon=-1"],
            "--adam_epsilon must be a finite positive number",
        ),
        (
            vec!["--max_grad_norm=-1"],
            "--max_grad_norm must be a finite number ≥ 0 (0: no clipping)",
        ),
        (
            vec!["--lora_rank", "4", "--lora_alpha=-8"],
            "--lora_alpha must be",
        ),
        (vec!["--eval_steps", "5"], "--eval_steps 5 needs eval data"),
    ] {
        match resolve_train_args(&argv) {
            Ok(c) => panic!("{argv:?} was accepted: {c:?}"),
            Err(e) => assert!(e.to_string().contains(expect), "{argv:?}: {e}"),
        }
    }
    // 0 is the documented "no clipping", and stays accepted.
    assert_eq!(
        resolve_train_args(["--max_grad_norm", "0"])
            .unwrap()
            .optim
            .max_grad_norm,
        0.0
    );
}
