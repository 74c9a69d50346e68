//! The configuration crate's own suite: files and flags resolved and checked, conflicts named,
//! fingerprints stable across versions.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use waypoint_config::*;

#[test]
fn file_keys_are_checked_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let toml_path = dir.path().join("c.toml");
    std::fs::write(
        &toml_path,
        "lr = 0.5\nmax_steps = 7\n[extra_args]\nbatch_size = 3\n",
    )
    .unwrap();
    let map = read_config_file(&toml_path).unwrap();
    let c = merge(
        &TrainConfig::default(),
        &map,
        &Origin::File(toml_path.clone()),
    )
    .unwrap();
    assert_eq!(
        (c.optim.lr, c.run.max_steps, c.data.batch_size),
        (0.5, 7, 3)
    );
    let flags = Map::from_iter([("lr".to_string(), Value::from(0.25))]);
    assert_eq!(merge(&c, &flags, &Origin::Flags).unwrap().optim.lr, 0.25);

    let json_path = dir.path().join("c.json");
    std::fs::write(&json_path, r#"{"max_stpes": 3}"#).unwrap();
    let err = read_config_file(&json_path).unwrap_err().to_string();
    assert!(
        err.contains("`max_stpes`") && err.contains("`max_steps`"),
        "{err}"
    );
    // An unknown key set both at the top level and under `extra_args` is named as unknown (seen
    // by the config fuzz test: it used to be reported as a conflict of a key that does not exist).
    std::fs::write(&json_path, r#"{"b": [1], "extra_args": {"b": 2}}"#).unwrap();
    let err = read_config_file(&json_path).unwrap_err();
    assert_eq!(err.key, "config_path");
    assert!(
        err.message.contains("unknown setting `b`"),
        "{}",
        err.message
    );
    std::fs::write(&json_path, r#"{"max_steps": "many"}"#).unwrap();
    let map = read_config_file(&json_path).unwrap();
    let err = merge(
        &TrainConfig::default(),
        &map,
        &Origin::File(json_path.clone()),
    )
    .unwrap_err();
    assert_eq!(err.key, "max_steps");
    assert!(
        err.message.contains("c.json") && err.message.contains("`max_steps`"),
        "{err}"
    );
}

#[test]
fn conflicts_are_named() {
    let mut c = TrainConfig::default();
    c.checkpointing.save_steps = waypoint_config::SaveSteps::Every(10);
    c.checkpointing.dcp_save_interval = 20;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("--save_steps") && err.contains("--dcp_save_interval"));
    let mut c = TrainConfig::default();
    c.lora.lora_alpha = 4.0;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--lora_rank"));
    let mut c = TrainConfig::default();
    c.lora.lora_rank = 4;
    c.validate().unwrap();
    assert_eq!(c.lora.lora_alpha, 8.0);
}

#[test]
fn fingerprints_hash_the_compact_sorted_json_as_checkpoints_recorded_it() {
    // Checkpoints written before record sha256 of serde_json::to_vec of a BTreeMap of the resume
    // fields; the fingerprint must stay the same bytes, or every existing run would read as
    // drifted.
    let fields = TrainConfig::default().resume_fields("m");
    let map: std::collections::BTreeMap<&str, &Value> = fields
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let before = hex::encode(Sha256::digest(serde_json::to_vec(&map).unwrap()));
    assert_eq!(fingerprint(&fields), before);
}

#[test]
fn sections_flatten_into_one_table_of_flag_names() {
    // The sections are how the code reads the configuration; files, flags and `config/run.json`
    // still see one flat table keyed by the flag names.
    let v = serde_json::to_value(TrainConfig::default()).unwrap();
    let table = v.as_object().unwrap();
    assert_eq!(table.len(), keys().len());
    for section in [
        "run",
        "model",
        "lora",
        "optim",
        "data",
        "checkpointing",
        "distributed",
        "memory",
    ] {
        assert!(
            !table.contains_key(section),
            "{section} is a section, not a key"
        );
    }
    assert_eq!(table["lr"], serde_json::json!(3e-3));
    let back: TrainConfig = serde_json::from_value(v).unwrap();
    assert_eq!(back, TrainConfig::default());
    let flat = Map::from_iter([
        ("lr".to_string(), Value::from(0.5)),
        ("sharding".to_string(), Value::from("full")),
        ("lora_rank".to_string(), Value::from(8)),
    ]);
    let c = merge(&TrainConfig::default(), &flat, &Origin::Flags).unwrap();
    assert_eq!(
        (
            c.optim.lr,
            c.distributed.sharding.as_str(),
            c.lora.lora_rank
        ),
        (0.5, "full", 8)
    );
    let err = merge(
        &TrainConfig::default(),
        &Map::from_iter([("optim".to_string(), Value::from(1))]),
        &Origin::Flags,
    )
    .unwrap_err();
    assert_eq!(err.key, "optim");
}

#[test]
fn sharding_says_what_it_cuts() {
    assert_eq!(Sharding::parse("optimizer"), Some(Sharding::Optimizer));
    assert_eq!(Sharding::parse("full"), Some(Sharding::Full));
    assert_eq!(Sharding::parse("zero3"), None);
    assert!(Sharding::Optimizer.cuts_optimizer_state_alone(false));
    assert!(Sharding::Full.cuts_optimizer_state_alone(true));
    assert!(!Sharding::Full.cuts_optimizer_state_alone(false));
    assert!(!Sharding::None.cuts_optimizer_state_alone(true));
}
