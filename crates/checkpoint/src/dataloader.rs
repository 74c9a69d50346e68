//! `dataloader.json`: the data_consumed counter per checkpoint, as the Fireworks cookbook keeps it.
//!
//! It is written after each commit, so it can lag the manifests (a crash between the two) or be edited
//! by hand. The manifest is the commit and carries the same counter, so **the manifest wins**: resume
//! takes data_consumed from the manifest, warns when `dataloader.json` disagrees, and the next commit
//! rewrites `dataloader.json` from the manifests.

use std::collections::BTreeMap;

use crate::StepName;
use serde::{Deserialize, Serialize};

use crate::error::{CheckpointError, Result};

/// The data position recorded for one checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// Samples consumed, globally.
    pub data_consumed: u64,
    /// The epoch.
    #[serde(default)]
    pub epoch: u64,
}

/// The whole file: checkpoint name → position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Dataloader(pub BTreeMap<String, DataPosition>);

impl Dataloader {
    /// Parses and validates (every key a checkpoint name).
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self> {
        let d: Dataloader =
            serde_json::from_slice(bytes).map_err(|e| CheckpointError::BadDataloader {
                key: key.to_string(),
                reason: e.to_string(),
            })?;
        for name in d.0.keys() {
            name.parse::<StepName>()
                .map_err(|e| CheckpointError::BadDataloader {
                    key: key.to_string(),
                    reason: e.to_string(),
                })?;
        }
        Ok(d)
    }

    /// Serializes (pretty JSON).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        crate::error::to_json_pretty("dataloader.json", self)
    }

    /// The position recorded for `step`.
    pub fn get(&self, step: StepName) -> Option<DataPosition> {
        self.0.get(&step.to_string()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cookbook_shape_and_rejects_junk() {
        let d = Dataloader::parse(
            "dataloader.json",
            br#"{"step-000100": {"data_consumed": 6400, "epoch": 0}, "step-000200": {"data_consumed": 12800}}"#,
        )
        .unwrap();
        assert_eq!(d.get(StepName::new(200)).unwrap().data_consumed, 12800);
        assert_eq!(Dataloader::parse("k", &d.to_json().unwrap()).unwrap(), d);
        for bad in [
            &b"[1,2]"[..],
            br#"{"step-1": {"data_consumed": 1}}"#,
            br#"{"step-000001": {"data_consumed": -1}}"#,
            b"{",
        ] {
            let e = Dataloader::parse("runs/x/dataloader.json", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("runs/x/dataloader.json"), "{e}");
        }
    }
}
