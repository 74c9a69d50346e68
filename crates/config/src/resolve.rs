//! Defaults ← a `--config_path` file ← flags: reading the file (JSON or TOML, the control plane's
//! `extra_args` shape too) and merging key → value maps over a configuration, every key and value
//! checked and named in errors.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{ConfigError, Origin};
use crate::flags::{closest_key, keys, TrainConfig};

/// The accepted values of a floating-point setting (always finite).
#[derive(Debug, Clone, Copy)]
pub(crate) enum FloatRange {
    /// > 0.
    Positive,
    /// ≥ 0.
    NonNegative,
    /// [0, 1].
    UnitClosed,
    /// [0, 1).
    UnitHalfOpen,
}

impl FloatRange {
    pub(crate) fn of(key: &str) -> Option<Self> {
        Some(match key {
            "lr" | "adam_epsilon" => Self::Positive,
            "weight_decay" | "max_grad_norm" | "lora_alpha" | "rpo_alpha" => Self::NonNegative,
            "beta" => Self::Positive,
            "min_lr_ratio" => Self::UnitClosed,
            "adam_beta1" | "adam_beta2" | "lora_dropout" => Self::UnitHalfOpen,
            _ => return None,
        })
    }

    pub(crate) fn contains(self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Self::Positive => x > 0.0,
                Self::NonNegative => x >= 0.0,
                Self::UnitClosed => (0.0..=1.0).contains(&x),
                Self::UnitHalfOpen => (0.0..1.0).contains(&x),
            }
    }

    pub(crate) fn describe(self, key: &str) -> String {
        let what = match self {
            Self::Positive => "a finite positive number",
            Self::NonNegative => "a finite number ≥ 0",
            Self::UnitClosed => "a number in [0, 1]",
            Self::UnitHalfOpen => "a number in [0, 1)",
        };
        let zero = match key {
            "max_grad_norm" => " (0: no clipping)",
            "lora_alpha" => " (0: twice --lora_rank)",
            _ => "",
        };
        format!("{what}{zero}")
    }
}

/// Reads a `--config_path` file (`.toml`, else JSON) into a key → value map, rejecting unknown keys.
pub fn read_config_file(path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let shown = path.display();
    let err = |m: String| ConfigError::new("config_path", format!("--config_path {shown}: {m}"));
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let value: Value = if path.extension().is_some_and(|e| e == "toml") {
        let t: toml::Table =
            toml::from_str(&text).map_err(|e| err(format!("not valid TOML: {e}")))?;
        serde_json::to_value(t).map_err(|e| err(format!("not representable as settings: {e}")))?
    } else {
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?
    };
    let Value::Object(mut map) = value else {
        return Err(err("the top level must be a table of settings".into()));
    };
    let valid = keys();
    // The control plane's job spec nests trainer flags under `extra_args`; accept that shape too.
    match map.remove("extra_args") {
        None => {}
        Some(Value::Object(extra)) => {
            for (k, v) in extra {
                if let Some(top) = map.get(&k) {
                    // (An unknown key is reported as such below, whatever its values.)
                    if *top != v && valid.contains(&k) {
                        return Err(ConfigError::new(
                            &k,
                            format!(
                                "--config_path {shown}: `{k}` is set both at the top level ({top}) \
                                 and under `extra_args` ({v}); keep one"
                            ),
                        ));
                    }
                }
                map.insert(k, v);
            }
        }
        Some(other) => {
            return Err(err(format!(
                "`extra_args` must be a table of settings (like the top level), not {other}"
            )))
        }
    }
    for key in map.keys() {
        if !valid.contains(key) {
            let hint = closest_key(key)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            return Err(ConfigError::new(
                "config_path",
                format!("--config_path {shown}: unknown setting `{key}`{hint}"),
            ));
        }
    }
    Ok(map)
}

/// Applies `overrides` (from a file, then from flags) over `base`; a value of the wrong type, or a
/// number that is not finite (NaN and infinities arrive as null), names its key and source.
pub fn merge(
    base: &TrainConfig,
    overrides: &Map<String, Value>,
    origin: &Origin,
) -> Result<TrainConfig, ConfigError> {
    let internal = |e: serde_json::Error| ConfigError::new("config_path", e.to_string());
    let Value::Object(defaults) = serde_json::to_value(base).map_err(internal)? else {
        return Err(ConfigError::new(
            "config_path",
            "the configuration does not serialize to a table",
        ));
    };
    let mut merged = defaults.clone();
    for (k, v) in overrides {
        let name = origin.name(k);
        let Some(default) = defaults.get(k) else {
            let hint = closest_key(k)
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            return Err(ConfigError::new(
                k,
                format!("{name}: unknown setting{hint}"),
            ));
        };
        if default.is_f64() && !v.as_f64().is_some_and(f64::is_finite) {
            let what = FloatRange::of(k).map_or("a finite number".into(), |r| r.describe(k));
            let got = match (v, origin) {
                (Value::Null, Origin::Flags) => "NaN or an infinity".to_string(),
                (Value::Null, Origin::File(_)) => "null, NaN or an infinity".to_string(),
                _ => v.to_string(),
            };
            return Err(ConfigError::new(
                k,
                format!("{name} must be {what}; got {got}"),
            ));
        }
        // Check this one value alone, so that a type error names it.
        let mut probe = defaults.clone();
        probe.insert(k.clone(), v.clone());
        if let Err(e) = serde_json::from_value::<TrainConfig>(Value::Object(probe)) {
            return Err(ConfigError::new(k, format!("{name}: {e}")));
        }
        merged.insert(k.clone(), v.clone());
    }
    serde_json::from_value(Value::Object(merged))
        .map_err(|e| ConfigError::new("config_path", format!("{origin:?}: {e}")))
}
