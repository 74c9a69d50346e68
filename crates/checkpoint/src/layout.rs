//! `RunLayout`: every key of a run, derived in one place.
//!
//! ```text
//! <base>/<run_id>/framework=<framework>/
//!   config/run.json  status.json  dataloader.json  attempts/000007.json
//!   logs/train.log  logs/metrics.jsonl  logs/progress.json  logs/loss.svg
//!   logs/tensorboard/events.out.tfevents.<unix secs>.waypoint.<attempt>
//!   checkpoints/step-000100.json          the manifest (the commit)
//!   checkpoints/step-000100/dcp/          resumable blobs
//!   checkpoints/step-000100/sampler/      inference blobs
//! <base>/models/<model_id>/               promoted models
//! ```
//! Keys are relative to the store's root (the `checkpoint_base_uri`).

use crate::error::{CheckpointError, Result};
use crate::names::{validate_name, StepName};

/// The keys of one run under a checkpoint base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLayout {
    run_id: String,
    framework: String,
    root: String,
}

impl RunLayout {
    /// The layout of `run_id` for `framework`; both are validated.
    pub fn new(run_id: &str, framework: &str) -> Result<Self> {
        validate_name("run id", run_id)?;
        validate_name("framework", framework)?;
        Ok(Self {
            run_id: run_id.to_string(),
            framework: framework.to_string(),
            root: format!("{run_id}/framework={framework}"),
        })
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The framework.
    pub fn framework(&self) -> &str {
        &self.framework
    }

    /// `<run_id>/framework=<framework>`: the run's folder.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The run's URI under `base` (a `checkpoint_base_uri`): `<base>/<run_id>/framework=<framework>`,
    /// what `waypoint ckpt` takes and [`RunLayout::from_uri`] splits again.
    pub fn uri_under(&self, base: &str) -> String {
        format!("{}/{}", base.trim_end_matches('/'), self.root)
    }

    /// Splits a run URI (`<base>/<run_id>/framework=<framework>`) into its base and layout.
    pub fn from_uri(uri: &str) -> Result<(String, Self)> {
        let bad = || {
            CheckpointError::Invalid(format!(
                "{uri:?} is not a run URI; expected \
                 <checkpoint_base_uri>/<run_id>/framework=<framework>, e.g. \
                 ./runs/demo/framework=waypoint"
            ))
        };
        let trimmed = uri.trim_end_matches('/');
        let (rest, fw) = trimmed.rsplit_once('/').ok_or_else(bad)?;
        let framework = fw.strip_prefix("framework=").ok_or_else(bad)?;
        let (base, run_id) = rest.rsplit_once('/').unwrap_or((".", rest));
        if run_id.is_empty() || framework.is_empty() {
            return Err(bad());
        }
        let base = if base.is_empty() { "/" } else { base };
        Ok((base.to_string(), Self::new(run_id, framework)?))
    }

    /// `config/run.json`: the resolved configuration, written at start.
    pub fn run_config(&self) -> String {
        format!("{}/config/run.json", self.root)
    }

    /// `status.json`: the job state.
    pub fn status(&self) -> String {
        format!("{}/status.json", self.root)
    }

    /// `dataloader.json`: the data_consumed counter per checkpoint.
    pub fn dataloader(&self) -> String {
        format!("{}/dataloader.json", self.root)
    }

    /// `attempts/`: one create-only object per start of the trainer.
    pub fn attempts_dir(&self) -> String {
        format!("{}/attempts", self.root)
    }

    /// `attempts/000007.json`: the fencing token of attempt `n`.
    pub fn attempt(&self, n: u64) -> String {
        format!("{}/attempts/{n:06}.json", self.root)
    }

    /// `reference/<name>`: DPO's reference log-probs of a full-parameter run (computed once).
    pub fn reference(&self, name: &str) -> String {
        format!("{}/reference/{name}", self.root)
    }

    /// `logs/train.log`.
    pub fn train_log(&self) -> String {
        format!("{}/logs/train.log", self.root)
    }

    /// `logs/ranks/rank-0000N.log`: the whole log of rank `rank` (> 0) under a launcher.
    pub fn rank_log(&self, rank: u32) -> String {
        format!("{}/logs/ranks/rank-{rank:05}.log", self.root)
    }

    /// `logs/metrics.jsonl`: one JSON object per step.
    pub fn metrics(&self) -> String {
        format!("{}/logs/metrics.jsonl", self.root)
    }

    /// `logs/tensorboard/`: TensorBoard event files, one per attempt.
    pub fn tensorboard_dir(&self) -> String {
        format!("{}/logs/tensorboard", self.root)
    }

    /// `logs/loss.svg`: the loss plot.
    pub fn loss_plot(&self) -> String {
        format!("{}/logs/loss.svg", self.root)
    }

    /// `logs/progress.json`: the live position of a running attempt (step, rate, last loss).
    pub fn progress(&self) -> String {
        format!("{}/logs/progress.json", self.root)
    }

    /// `checkpoints/`: manifests and checkpoint folders.
    pub fn checkpoints_dir(&self) -> String {
        format!("{}/checkpoints", self.root)
    }

    /// `checkpoints/step-XXXXXX.json`: the manifest; its existence is the commit.
    pub fn manifest(&self, step: StepName) -> String {
        format!("{}/checkpoints/{step}.json", self.root)
    }

    /// `checkpoints/quarantine/step-XXXXXX-attempt-NNNNNN.json`: the manifest of a damaged checkpoint
    /// that attempt `attempt` set aside, with the reason (not a manifest: discovery never reads it).
    pub fn quarantined_manifest(&self, step: StepName, attempt: u64) -> String {
        format!(
            "{}/checkpoints/quarantine/{step}-attempt-{attempt:06}.json",
            self.root
        )
    }

    /// `checkpoints/step-XXXXXX/`: all blobs of one checkpoint.
    pub fn checkpoint_dir(&self, step: StepName) -> String {
        format!("{}/checkpoints/{step}", self.root)
    }

    /// `checkpoints/step-XXXXXX/dcp/`: the resumable part.
    pub fn dcp_dir(&self, step: StepName) -> String {
        format!("{}/checkpoints/{step}/dcp", self.root)
    }

    /// `checkpoints/step-XXXXXX/sampler/`: the promotable (or delta) part.
    pub fn sampler_dir(&self, step: StepName) -> String {
        format!("{}/checkpoints/{step}/sampler", self.root)
    }
}

/// `models/<model_id>`: where a checkpoint is promoted to, beside the runs under the same base.
pub fn model_dir(model_id: &str) -> Result<String> {
    validate_name("model id", model_id)?;
    Ok(format!("models/{model_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_every_key_of_the_design() {
        let l = RunLayout::new("meta_demo_001", "meta").unwrap();
        let s = StepName::new(100);
        assert_eq!(l.root(), "meta_demo_001/framework=meta");
        assert_eq!(
            l.run_config(),
            "meta_demo_001/framework=meta/config/run.json"
        );
        assert_eq!(l.status(), "meta_demo_001/framework=meta/status.json");
        assert_eq!(
            l.dataloader(),
            "meta_demo_001/framework=meta/dataloader.json"
        );
        assert_eq!(
            l.attempt(7),
            "meta_demo_001/framework=meta/attempts/000007.json"
        );
        assert_eq!(
            l.metrics(),
            "meta_demo_001/framework=meta/logs/metrics.jsonl"
        );
        assert_eq!(l.train_log(), "meta_demo_001/framework=meta/logs/train.log");
        assert_eq!(
            l.manifest(s),
            "meta_demo_001/framework=meta/checkpoints/step-000100.json"
        );
        assert_eq!(
            l.dcp_dir(s),
            "meta_demo_001/framework=meta/checkpoints/step-000100/dcp"
        );
        assert_eq!(
            l.sampler_dir(s),
            "meta_demo_001/framework=meta/checkpoints/step-000100/sampler"
        );
        assert_eq!(model_dir("my-model").unwrap(), "models/my-model");
    }

    #[test]
    fn rejects_bad_parts_naming_them() {
        let e = RunLayout::new("../etc", "meta").unwrap_err().to_string();
        assert!(e.contains("run id") && e.contains("../etc"), "{e}");
        let e = RunLayout::new("ok", "a/b").unwrap_err().to_string();
        assert!(e.contains("framework"), "{e}");
        let e = model_dir("").unwrap_err().to_string();
        assert!(e.contains("model id"), "{e}");
    }

    #[test]
    fn run_uris_split_into_base_and_layout_and_back() {
        let (base, l) = RunLayout::from_uri("s3://b/runs/demo/framework=hf/").unwrap();
        assert_eq!(
            (base.as_str(), l.run_id(), l.framework()),
            ("s3://b/runs", "demo", "hf")
        );
        assert_eq!(l.uri_under(&base), "s3://b/runs/demo/framework=hf");
        let (base, l) = RunLayout::from_uri("demo/framework=waypoint").unwrap();
        assert_eq!((base.as_str(), l.run_id()), (".", "demo"));
        let err = RunLayout::from_uri("./runs/demo").unwrap_err().to_string();
        assert!(err.contains("framework=<framework>"), "{err}");
    }
}
