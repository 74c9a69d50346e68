//! `CheckpointManager`: saving, committing, finding, loading, promoting, retaining and collecting the
//! checkpoints of one run. See DESIGN.md, "Commit protocol".
//!
//! A save by several writers (ranks) goes: the committer calls [`CheckpointManager::prepare_save`]
//! (it clears uncommitted leftovers of that step); every rank writes its files with a
//! [`FileWriter`](crate::FileWriter) and reports them; the committer calls
//! [`CheckpointManager::commit`] with all of them (it only commits), then
//! [`CheckpointManager::upkeep`] (retention, leftovers, `dataloader.json`; a failure there is a
//! warning, redone at the next save, never a failed save). A single process can call
//! [`CheckpointManager::save`], which does all of it.
//!
//! One file per verb: [`attempts`] (fencing), [`write`] (the save path and the commit), [`upkeep`]
//! (what follows a commit), [`discover`] (listing, resume discovery), [`read`] (loading tensors),
//! [`verify`], [`promote`], [`retention`] (the retention policy, retention
//! and GC), and [`save`]: the one save protocol, for one rank and N, over [`Peers`](crate::Peers). This file holds the manager itself, its
//! options and what a save is made of.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use waypoint_storage::Store;

use crate::error::{CheckpointError, Result};
use crate::manifest::DeltaBase;
pub(crate) use crate::now_ms;
use crate::sampler::WeightsPlan;
use crate::tensor::Tensor;
use crate::{RunLayout, StepName};

mod attempts;
mod discover;
mod promote;
mod read;
mod retention;
mod rows;
mod save;
mod upkeep;
mod verify;
mod write;

pub use discover::{CheckpointInfo, Skipped};
pub use promote::{Promotion, PROMOTION_RECORD};
pub use retention::Retention;
pub use rows::RowRange;
pub use verify::VerifyReport;

/// Knobs of a [`CheckpointManager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerOptions {
    /// Keep this many newest resumable checkpoints; `None` keeps all. The newest committed checkpoint
    /// and checkpoints being read are never removed.
    pub keep_last: Option<usize>,
    /// Also remove checkpoints that hold sampler blobs when retention drops them.
    pub prune_sampler: bool,
    /// Largest `dcp/` file before the state is split over several.
    pub max_file_bytes: u64,
    /// Files written or read at once: each has its own sha256 thread, so on a machine with spare cores
    /// several files hash in parallel.
    pub parallel_files: usize,
    /// Check every file's sha256 while loading.
    pub verify_on_load: bool,
    /// Log commits and retention at debug level, not info (a tier that saves every step).
    pub quiet: bool,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            keep_last: None,
            prune_sampler: false,
            max_file_bytes: 512 << 20,
            parallel_files: 2,
            verify_on_load: true,
            quiet: false,
        }
    }
}

/// The counters and identity of a checkpoint being committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Optimizer steps done.
    pub step: u64,
    /// Samples consumed, globally.
    pub data_consumed: u64,
    /// The epoch.
    pub epoch: u64,
    /// Ranks that wrote files.
    pub world_size: u32,
    /// sha256 of the resume-relevant configuration.
    pub config_fingerprint: String,
    /// For a delta sampler part: its base.
    pub delta_base: Option<DeltaBase>,
    /// The settings that decided the trajectory (recorded in the manifest as `training`).
    pub training: Option<serde_json::Value>,
}

/// The sampler (promotable or delta) part of a single-process save.
#[derive(Debug, Clone)]
pub enum SamplerPart {
    /// A full HF model directory: `config.json`, the weights, and any other small files (tokenizer).
    Full {
        /// `config.json`, carried through as given.
        config_json: Bytes,
        /// The weights under their HF names.
        tensors: Vec<Tensor>,
        /// Other files of the model directory (name → bytes).
        extra_files: Vec<(String, Bytes)>,
    },
    /// A delta (INFERENCE_ARC_V2) over the full sampler weights of an earlier checkpoint of this run;
    /// written as full weights instead (a new base) when the delta would exceed half their size.
    Delta {
        /// The base: a committed INFERENCE_BASE checkpoint.
        base: StepName,
        /// `config.json`, carried through.
        config_json: Bytes,
        /// The weights under their HF names.
        tensors: Vec<Tensor>,
    },
    /// This rank's share of a full HF model directory that every rank writes (weights sharded over
    /// the ranks): the files `plan` gives this rank, with exactly the tensors they hold; rank 0 also
    /// writes `config.json`, the index and `extra_files` (the other ranks' are ignored).
    FullShare {
        /// The plan all ranks computed alike ([`WeightsPlan::new`] over the same tensors).
        plan: WeightsPlan,
        /// This rank's tensors under their HF names (the plan's for this rank, no more, no less).
        tensors: Vec<Tensor>,
        /// `config.json`, carried through (written by rank 0).
        config_json: Bytes,
        /// Other files of the model directory (written by rank 0).
        extra_files: Vec<(String, Bytes)>,
    },
    /// A PEFT adapter.
    Lora {
        /// `adapter_config.json` (see [`crate::peft::AdapterConfig`]).
        adapter_config: Bytes,
        /// `base_model.model.<fqn>.lora_A.weight` / `lora_B.weight` tensors.
        tensors: Vec<Tensor>,
    },
}

/// A whole single-process save.
#[derive(Debug, Clone)]
pub struct SaveRequest {
    /// Counters and identity.
    pub commit: Commit,
    /// Resumable state under DCP's flattened names; `None` for a sampler-only save.
    pub dcp: Option<Vec<Tensor>>,
    /// The sampler part, if promotable.
    pub sampler: Option<SamplerPart>,
}

/// The checkpoints of one run. See the module documentation.
#[derive(Debug, Clone)]
pub struct CheckpointManager {
    store: Store,
    layout: RunLayout,
    options: ManagerOptions,
    attempt: Option<u64>,
    /// Steps being read by this process, with a count; retention leaves them alone.
    pinned: Arc<Mutex<HashMap<u64, usize>>>,
}

/// Removes a pin when a read ends.
pub(crate) struct Pin {
    pinned: Arc<Mutex<HashMap<u64, usize>>>,
    step: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut p = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = p.get_mut(&self.step) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.step);
            }
        }
    }
}

impl CheckpointManager {
    /// The manager of `layout`'s run in `store` (the checkpoint base).
    pub fn new(store: Store, layout: RunLayout, options: ManagerOptions) -> Self {
        Self {
            store,
            layout,
            options,
            attempt: None,
            pinned: Default::default(),
        }
    }

    /// The manager of another run under the same base and framework (for `init_from_checkpoint`);
    /// it can read, not commit.
    pub fn other_run(&self, run_id: &str) -> Result<Self> {
        let layout = RunLayout::new(run_id, self.layout.framework())?;
        Ok(Self::new(self.store.clone(), layout, self.options.clone()))
    }

    /// The options it was made with.
    pub fn options(&self) -> &ManagerOptions {
        &self.options
    }

    /// The run's layout.
    pub fn layout(&self) -> &RunLayout {
        &self.layout
    }

    /// The store (the checkpoint base).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This writer's attempt, once started.
    pub fn attempt(&self) -> Option<u64> {
        self.attempt
    }

    pub(crate) fn pin(&self, step: u64) -> Pin {
        *self
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(step)
            .or_insert(0) += 1;
        Pin {
            pinned: self.pinned.clone(),
            step,
        }
    }
}

/// Parses `init_from_checkpoint`'s `run_id:step-N`.
pub fn parse_checkpoint_ref(spec: &str) -> Result<(String, StepName)> {
    let (run, name) = spec.split_once(':').ok_or_else(|| {
        CheckpointError::Invalid(format!(
            "init_from_checkpoint {spec:?} must be run_id:step-N (e.g. my_run:step-000100)"
        ))
    })?;
    crate::validate_name("run id", run)?;
    let step: StepName = name.parse()?;
    Ok((run.to_string(), step))
}

/// The names, without `.json`, of the JSON objects directly in a listing (manifests, attempts).
pub(crate) fn json_stems(listing: &waypoint_storage::Listing) -> impl Iterator<Item = &str> {
    listing
        .objects
        .iter()
        .filter_map(|o| o.key.rsplit('/').next()?.strip_suffix(".json"))
}
