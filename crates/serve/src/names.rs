//! Where a served model's checkpoints live and what clients call them. Each training client is a
//! run of its own under `--checkpoint_base_uri` (run id: its model id with `:` as `-`), with
//! `step-N` checkpoints like a batch run's. The SDK names a save (`save_state("s3")` →
//! `tinker://<model_id>/weights/s3`, `save_weights_for_sampler("s3")` → `…/sampler_weights/s3`);
//! each name is a small create-only record in the run, `serve/<kind>/<name>.json`, holding the
//! checkpoint it names — so both names of one step point at the same checkpoint, a name is never
//! silently reused, and the records outlive the server.

use serde::{Deserialize, Serialize};
use waypoint_checkpoint::{RunLayout, StepName};

use crate::error::ServeError;

/// The two kinds of named checkpoints the SDK addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `save_state`: resumable (`weights`).
    Weights,
    /// `save_weights_for_sampler`: promotable (`sampler_weights`).
    Sampler,
}

impl Kind {
    /// The path segment.
    pub(crate) fn segment(self) -> &'static str {
        match self {
            Kind::Weights => "weights",
            Kind::Sampler => "sampler_weights",
        }
    }

    /// The SDK's `checkpoint_type`.
    pub(crate) fn checkpoint_type(self) -> &'static str {
        match self {
            Kind::Weights => "training",
            Kind::Sampler => "sampler",
        }
    }

    fn parse(segment: &str) -> Option<Self> {
        match segment {
            "weights" => Some(Kind::Weights),
            "sampler_weights" => Some(Kind::Sampler),
            _ => None,
        }
    }
}

/// Model `n` of `session`: `<session>:train:<n>`, as the SDK builds model ids.
pub(crate) fn model_id(session: &str, n: i64) -> String {
    format!("{session}:train:{n}")
}

/// Sampler `n` of `session`: `<session>:sample:<n>`.
pub(crate) fn sampler_id(session: &str, n: i64) -> String {
    format!("{session}:sample:{n}")
}

/// Whether `id` names a sampler of `session`.
pub(crate) fn is_sampler_of(id: &str, session: &str) -> bool {
    id.strip_prefix(session)
        .is_some_and(|rest| rest.starts_with(":sample:"))
}

/// The session of a model or sampler id.
pub(crate) fn session_of(id: &str) -> &str {
    id.split(':').next().unwrap_or_default()
}

/// A `tinker://<model_id>/<kind>/<name>` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TinkerPath {
    pub(crate) model_id: String,
    pub(crate) kind: Kind,
    pub(crate) name: String,
}

impl TinkerPath {
    /// Parses `path`, the error saying what a path looks like.
    pub(crate) fn parse(path: &str) -> Result<Self, ServeError> {
        let bad = |why: &str| {
            ServeError::BadRequest(format!(
                "{path:?}: {why}; a checkpoint path is tinker://<model_id>/weights/<name> or \
                 tinker://<model_id>/sampler_weights/<name>"
            ))
        };
        let rest = path
            .strip_prefix("tinker://")
            .ok_or_else(|| bad("not a tinker:// path"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [model_id, kind, name] = parts[..] else {
            return Err(bad("not three parts"));
        };
        let kind = Kind::parse(kind).ok_or_else(|| bad("unknown kind"))?;
        check_name(name)?;
        run_of(model_id)?;
        Ok(Self {
            model_id: model_id.to_string(),
            kind,
            name: name.to_string(),
        })
    }

    /// The path of checkpoint `name` of `kind` of model `model_id`.
    pub(crate) fn of(model_id: &str, kind: Kind, name: &str) -> String {
        format!("tinker://{model_id}/{}/{name}", kind.segment())
    }
}

/// Whether `name` may name a checkpoint: 1 to 128 of letters, digits, `.`, `_`, `-`, not starting
/// with `.`.
pub(crate) fn check_name(name: &str) -> Result<(), ServeError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    match ok {
        true => Ok(()),
        false => Err(ServeError::BadRequest(format!(
            "checkpoint name {name:?}: use 1 to 128 letters, digits, '.', '_' or '-', not \
             starting with '.'"
        ))),
    }
}

/// The run of model `model_id` (`<session>:train:<n>` → run id `<session>-train-<n>`).
pub(crate) fn run_of(model_id: &str) -> Result<RunLayout, ServeError> {
    RunLayout::new(&model_id.replace(':', "-"), "waypoint")
        .map_err(|e| ServeError::BadRequest(format!("model id {model_id:?} names no run: {e}")))
}

/// The model whose run is `run_id` (the inverse of [`run_of`]), if it is a served model's.
pub(crate) fn model_of_run(run_id: &str) -> Option<String> {
    let (session, n) = run_id.rsplit_once("-train-")?;
    let n: i64 = n.parse().ok()?;
    let plain = !session.is_empty() && session.chars().all(|c| c.is_ascii_alphanumeric());
    let model = model_id(session, n);
    // (Exactly the inverse: `-train-07` is not model 7's run.)
    let inverse = run_of(&model).is_ok_and(|run| run.run_id() == run_id);
    (plain && n >= 0 && inverse).then_some(model)
}

/// The key of name record `name` of `kind` in `run`.
pub(crate) fn record_key(run: &RunLayout, kind: Kind, name: &str) -> String {
    format!("{}/{name}.json", records_dir(run, kind))
}

/// The folder of `run`'s name records of `kind`.
pub(crate) fn records_dir(run: &RunLayout, kind: Kind) -> String {
    format!("{}/serve/{}", run.root(), kind.segment())
}

/// A name record: the checkpoint it names, and when it was named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) checkpoint: String,
    pub(crate) time: String,
}

impl Record {
    /// The checkpoint's step name.
    pub(crate) fn step(&self) -> Result<StepName, ServeError> {
        self.checkpoint.parse().map_err(|e| {
            ServeError::Internal(format!("a name record holds no checkpoint name: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tinker_path_names_a_model_kind_and_checkpoint() {
        let p = TinkerPath::parse("tinker://s1:train:0/weights/step-3").unwrap();
        assert_eq!(
            (p.model_id.as_str(), p.kind, p.name.as_str()),
            ("s1:train:0", Kind::Weights, "step-3")
        );
        assert_eq!(
            TinkerPath::of("s1:train:0", Kind::Sampler, "a"),
            "tinker://s1:train:0/sampler_weights/a"
        );
        assert_eq!(model_id("s1", 0), "s1:train:0");
        assert_eq!(session_of(&sampler_id("s1", 3)), "s1");
        assert!(is_sampler_of("s1:sample:3", "s1"));
        assert!(!is_sampler_of("s12:sample:3", "s1") && !is_sampler_of("s1:train:3", "s1"));
        let run = run_of("s1:train:0").unwrap();
        assert_eq!(model_of_run(run.run_id()).as_deref(), Some("s1:train:0"));
        for not_served in [
            "s1-train-x",
            "-train-0",
            "a-b-train-0",
            "run",
            "s1-train--1",
            "s1-train-07",
        ] {
            assert_eq!(model_of_run(not_served), None, "{not_served}");
        }
        assert_eq!(
            record_key(&run, Kind::Weights, "x"),
            "s1-train-0/framework=waypoint/serve/weights/x.json"
        );
        for bad in [
            "s1:train:0/weights/a",
            "tinker://s1:train:0/weights",
            "tinker://s1:train:0/other/a",
            "tinker://s1:train:0/weights/../a",
            "tinker://s1:train:0/weights/.hidden",
            "tinker://../weights/a",
        ] {
            let err = TinkerPath::parse(bad).unwrap_err().to_string();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(check_name(&"a".repeat(129)).is_err());
    }
}
