//! `CheckpointManager`: saving, committing, finding, loading, promoting, retaining and collecting the
//! checkpoints of one run. See DESIGN.md, "Commit protocol".
//!
//! A save by several writers (ranks) goes: the committer calls [`CheckpointManager::prepare_save`] (it
//! clears uncommitted leftovers of that step); every rank writes its files with a [`FileWriter`] and
//! reports the [`FileEntry`]s; the committer calls [`CheckpointManager::commit`] with all of them. A
//! single process can call [`CheckpointManager::save`], which does all three.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use waypoint_storage::{StorageError, Store};
use crate::{model_dir, RunLayout, StepName};

use crate::dataloader::{DataPosition, Dataloader};
use crate::dcp;
use crate::error::{CheckpointError, Result};
use crate::kind::{detect, CheckpointKind};
use crate::manifest::{DeltaBase, FileEntry, Manifest, FORMAT_VERSION};
use crate::safetensors_file::{parse_header, read_header, write_file};
use crate::tensor::Tensor;

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
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            keep_last: None,
            prune_sampler: false,
            max_file_bytes: 512 << 20,
            parallel_files: 2,
            verify_on_load: true,
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
    /// A delta (INFERENCE_ARC_V2) over the full sampler weights of an earlier checkpoint of this run.
    Delta {
        /// The base: a committed INFERENCE_BASE checkpoint.
        base: StepName,
        /// `config.json`, carried through.
        config_json: Bytes,
        /// The weights under their HF names.
        tensors: Vec<Tensor>,
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

/// A listed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// `step-XXXXXX`.
    pub name: String,
    /// Its step.
    pub step: u64,
    /// Kinds detected from the blobs.
    pub kinds: Vec<CheckpointKind>,
    /// Any kind resumable.
    pub resumable: bool,
    /// Any kind promotable.
    pub promotable: bool,
    /// Bytes of all files.
    pub bytes: u64,
    /// Samples consumed at this checkpoint.
    pub data_consumed: u64,
    /// When it was committed (ms since the Unix epoch).
    pub created_unix_ms: u64,
}

/// The record written last into a promoted model's folder: its presence is the promotion's commit.
pub const PROMOTION_RECORD: &str = "waypoint_promotion.json";

/// What `models/<model_id>/` holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Promotion {
    /// Nothing.
    Absent,
    /// A finished promotion, with its record.
    Done(serde_json::Value),
    /// Files but no record: a promotion that was interrupted (keys and sizes).
    Partial(Vec<(String, u64)>),
}

impl Promotion {
    /// Whether this is a finished promotion of `checkpoint` of the run laid out by `run`.
    pub fn is_done_from(&self, run: &RunLayout, checkpoint: &str) -> bool {
        match self {
            Self::Done(r) => {
                r["source_run"].as_str() == Some(run.run_id())
                    && r["source_framework"].as_str() == Some(run.framework())
                    && r["source_checkpoint"].as_str() == Some(checkpoint)
            }
            _ => false,
        }
    }
}

/// A committed checkpoint that resume passed over as damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its step.
    pub step: StepName,
    /// What is wrong with it.
    pub reason: String,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The checkpoint.
    pub name: String,
    /// Files re-hashed.
    pub files: usize,
    /// Bytes re-hashed.
    pub bytes: u64,
    /// Each problem found (empty when intact).
    pub problems: Vec<String>,
}

/// Writes one rank's files into a checkpoint folder.
#[derive(Debug, Clone)]
pub struct FileWriter {
    store: Store,
    dir: String,
    rank: u32,
}

impl FileWriter {
    /// Streams `tensors` as a safetensors file at `path` (`dcp/…` or `sampler/…`).
    pub async fn write_tensors(&self, path: &str, tensors: &[Tensor]) -> Result<FileEntry> {
        self.write_tensors_with(path, tensors, &BTreeMap::new())
            .await
    }

    /// Like [`FileWriter::write_tensors`], with extra `__metadata__` entries.
    pub async fn write_tensors_with(
        &self,
        path: &str,
        tensors: &[Tensor],
        extra: &BTreeMap<String, String>,
    ) -> Result<FileEntry> {
        let info = write_file(&self.store, &format!("{}/{path}", self.dir), tensors, extra).await?;
        Ok(self.entry(path, info))
    }

    /// Writes a small file (JSON, tokenizer) at `path`.
    pub async fn write_bytes(&self, path: &str, data: Bytes) -> Result<FileEntry> {
        let mut w = self.store.writer(&format!("{}/{path}", self.dir))?;
        w.write_bytes(data).await?;
        let info = w.finish().await?;
        Ok(self.entry(path, info))
    }

    fn entry(&self, path: &str, info: waypoint_storage::BlobInfo) -> FileEntry {
        FileEntry {
            path: path.to_string(),
            bytes: info.bytes,
            sha256: info.sha256,
            rank: self.rank,
        }
    }
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

    /// Takes the next attempt number with a create-only `attempts/NNNNNN.json` (the fencing token).
    /// `info` is recorded in it (host, pid, start time; never secrets).
    pub async fn start_attempt(&mut self, info: &serde_json::Value) -> Result<u64> {
        let mut next = self.newest_attempt().await?.unwrap_or(0) + 1;
        loop {
            let body = serde_json::to_vec_pretty(&serde_json::json!({
                "attempt": next,
                "started_unix_ms": now_ms(),
                "info": info,
            }))
            .unwrap_or_default();
            match self
                .store
                .put_create(&self.layout.attempt(next), body.into())
                .await
            {
                Ok(()) => {
                    self.attempt = Some(next);
                    tracing::info!(
                        attempt = next,
                        run = self.layout.run_id(),
                        "attempt started"
                    );
                    return Ok(next);
                }
                Err(StorageError::AlreadyExists { .. }) => next += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The newest attempt number recorded for the run.
    pub async fn newest_attempt(&self) -> Result<Option<u64>> {
        let listing = self.store.list_dir(&self.layout.attempts_dir()).await?;
        Ok(listing
            .objects
            .iter()
            .filter_map(|o| {
                o.key
                    .rsplit('/')
                    .next()?
                    .strip_suffix(".json")?
                    .parse::<u64>()
                    .ok()
            })
            .max())
    }

    /// Committer, before any rank writes step `step`: refuses a committed step and removes uncommitted
    /// leftovers under its folder, so that it ends up holding exactly what its manifest will list.
    pub async fn prepare_save(&self, step: StepName) -> Result<()> {
        if self.store.exists(&self.layout.manifest(step)).await? {
            return Err(CheckpointError::AlreadyCommitted {
                name: step.to_string(),
            });
        }
        let removed = self
            .store
            .delete_prefix(&self.layout.checkpoint_dir(step))
            .await?
            .len();
        if removed > 0 {
            tracing::warn!(checkpoint = %step, removed, "removed uncommitted leftovers");
        }
        Ok(())
    }

    /// Refuses to change `name` when a newer attempt than `ours` has started. When the run's attempt
    /// records are gone (the run folder was deleted mid-run), ours is written again first, with a
    /// warning, so that fencing goes on working.
    async fn check_fence(&self, name: &str, ours: u64) -> Result<()> {
        let newest = self.newest_attempt().await?.unwrap_or(0);
        if newest > ours {
            return Err(CheckpointError::Fenced {
                name: name.to_string(),
                ours,
                newest,
            });
        }
        if newest < ours {
            tracing::warn!(
                attempt = ours,
                run = self.layout.run_id(),
                "the run's attempt records are gone (was the run folder deleted?); re-taking attempt {ours}"
            );
            let body = serde_json::to_vec_pretty(&serde_json::json!({
                "attempt": ours,
                "started_unix_ms": now_ms(),
                "info": {"retaken": "the run's attempt records were gone at a commit"},
            }))
            .unwrap_or_default();
            match self
                .store
                .put_create(&self.layout.attempt(ours), body.into())
                .await
            {
                Ok(()) | Err(StorageError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// A writer of `rank`'s files of step `step`.
    pub fn file_writer(&self, step: StepName, rank: u32) -> FileWriter {
        FileWriter {
            store: self.store.clone(),
            dir: self.layout.checkpoint_dir(step),
            rank,
        }
    }

    /// Commits step `commit.step` with the files every rank reported: checks the fence and that each
    /// file is there with its size, writes the manifest create-only, then updates `dataloader.json`
    /// and applies retention.
    pub async fn commit(&self, commit: Commit, mut files: Vec<FileEntry>) -> Result<Manifest> {
        let step = StepName::new(commit.step);
        let name = step.to_string();
        let Some(ours) = self.attempt else {
            return Err(CheckpointError::Invalid(format!(
                "cannot commit {name}: no attempt started (call start_attempt first)"
            )));
        };
        self.check_fence(&name, ours).await?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let dir = self.layout.checkpoint_dir(step);
        let mut problems = Vec::new();
        for f in &files {
            match self.store.head(&format!("{dir}/{}", f.path)).await {
                Ok(o) if o.size == f.bytes => {}
                Ok(o) => problems.push(format!(
                    "{}: {} bytes, reported {}",
                    f.path, o.size, f.bytes
                )),
                Err(StorageError::NotFound { .. }) => problems.push(format!("{}: missing", f.path)),
                Err(e) => return Err(e.into()),
            }
        }
        if !problems.is_empty() {
            return Err(CheckpointError::Damaged { name, problems });
        }
        let mut manifest = Manifest {
            format_version: FORMAT_VERSION,
            name: name.clone(),
            step: commit.step,
            data_consumed: commit.data_consumed,
            epoch: commit.epoch,
            kinds: Vec::new(),
            world_size: commit.world_size,
            attempt: ours,
            config_fingerprint: commit.config_fingerprint,
            created_unix_ms: now_ms(),
            files,
            delta_base: commit.delta_base,
        };
        manifest.kinds = self.detect_kinds(&manifest).await?;
        // Validate exactly what readers will parse.
        let body = manifest.to_json();
        Manifest::parse(&self.layout.manifest(step), &body)?;
        let key = self.layout.manifest(step);
        let body = Bytes::from(body);
        match self.store.put_create(&key, body.clone()).await {
            Ok(()) => {}
            Err(StorageError::AlreadyExists { .. }) => {
                return Err(CheckpointError::AlreadyCommitted { name })
            }
            // The outcome is unknown (the answer was lost after the retries): the commit happened
            // exactly when our manifest is there now.
            Err(e) => match self.store.get(&key).await {
                Ok(there) if there == body => {
                    tracing::warn!(checkpoint = %name, "the commit's answer was lost, but the manifest there is ours: committed");
                }
                _ => return Err(e.into()),
            },
        }
        tracing::info!(checkpoint = %name, kinds = ?manifest.kinds, bytes = manifest.total_bytes(), "checkpoint committed");
        if let Some(keep) = self.options.keep_last {
            self.retain(keep).await?;
        }
        // After retention, so that the file lists exactly the committed checkpoints.
        self.record_data_position(step, &manifest).await?;
        Ok(manifest)
    }

    /// Single-process save: prepare, write the resumable and sampler parts, commit.
    pub async fn save(&self, mut request: SaveRequest) -> Result<Manifest> {
        let step = StepName::new(request.commit.step);
        self.prepare_save(step).await?;
        let writer = self.file_writer(step, 0);
        let mut files = Vec::new();
        if let Some(state) = request.dcp {
            files.extend(self.write_dcp(&writer, 1, state).await?);
        }
        if let Some(sampler) = request.sampler {
            files.extend(
                self.write_sampler(&writer, sampler, &mut request.commit)
                    .await?,
            );
        }
        self.commit(request.commit, files).await
    }

    /// Writes one rank's share of the resumable state under `dcp/` (split into files of at most
    /// `max_file_bytes`, named as PyTorch names them for `world_size` writers), a few files at once.
    pub async fn write_dcp(
        &self,
        writer: &FileWriter,
        world_size: u32,
        state: Vec<Tensor>,
    ) -> Result<Vec<FileEntry>> {
        let groups = dcp::split_into_files(state, self.options.max_file_bytes);
        let count = groups.len();
        let writes = groups.into_iter().enumerate().map(|(i, group)| async move {
            let path = format!(
                "dcp/{}",
                dcp::file_name(writer.rank, world_size, i + 1, count)
            );
            writer.write_tensors(&path, &group).await
        });
        futures::stream::iter(writes)
            .buffered(self.options.parallel_files.max(1))
            .try_collect()
            .await
    }

    /// Writes a sampler part under `sampler/`; a delta records its base in `commit`.
    pub async fn write_sampler(
        &self,
        writer: &FileWriter,
        sampler: SamplerPart,
        commit: &mut Commit,
    ) -> Result<Vec<FileEntry>> {
        let mut files = Vec::new();
        match sampler {
            SamplerPart::Full {
                config_json,
                tensors,
                extra_files,
            } => {
                files.push(
                    writer
                        .write_bytes("sampler/config.json", config_json)
                        .await?,
                );
                files.extend(
                    crate::sampler::write_full_weights(
                        writer,
                        tensors,
                        self.options.max_file_bytes,
                    )
                    .await?,
                );
                for (name, data) in extra_files {
                    files.push(writer.write_bytes(&format!("sampler/{name}"), data).await?);
                }
            }
            SamplerPart::Delta {
                base,
                config_json,
                tensors,
            } => {
                let base = self.manifest(base).await?;
                let _pin = self.pin(base.step);
                files.push(
                    writer
                        .write_bytes("sampler/config.json", config_json)
                        .await?,
                );
                let (delta_files, delta_base) = crate::delta::write_delta(
                    self,
                    writer,
                    &base,
                    tensors,
                    self.options.max_file_bytes,
                )
                .await?;
                files.extend(delta_files);
                commit.delta_base = Some(delta_base);
            }
            SamplerPart::Lora {
                adapter_config,
                tensors,
            } => {
                let config: crate::peft::AdapterConfig = serde_json::from_slice(&adapter_config)
                    .map_err(|e| CheckpointError::Invalid(format!("adapter_config.json: {e}")))?;
                crate::peft::validate_adapter(&config, &tensors)?;
                files.push(
                    writer
                        .write_bytes("sampler/adapter_config.json", adapter_config)
                        .await?,
                );
                files.push(
                    writer
                        .write_tensors("sampler/adapter_model.safetensors", &tensors)
                        .await?,
                );
            }
        }
        Ok(files)
    }

    async fn record_data_position(&self, step: StepName, manifest: &Manifest) -> Result<()> {
        let key = self.layout.dataloader();
        let mut d = match self.store.get(&key).await {
            Ok(bytes) => Dataloader::parse(&key, &bytes).unwrap_or_else(|e| {
                tracing::warn!(%e, "dataloader.json unreadable; rebuilding it from the manifests");
                Dataloader::default()
            }),
            Err(StorageError::NotFound { .. }) => Dataloader::default(),
            Err(e) => return Err(e.into()),
        };
        // Entries of checkpoints that no longer exist are dropped; the manifest's counter is written.
        let committed: Vec<StepName> = self.committed_steps().await?;
        d.0.retain(|k, _| k.parse::<StepName>().is_ok_and(|s| committed.contains(&s)));
        d.0.insert(
            step.to_string(),
            DataPosition {
                data_consumed: manifest.data_consumed,
                epoch: manifest.epoch,
            },
        );
        self.store.put(&key, d.to_json().into()).await?;
        Ok(())
    }

    /// Steps with a manifest, newest first (numeric order). Keys that are not manifests are ignored.
    pub async fn committed_steps(&self) -> Result<Vec<StepName>> {
        let listing = self.store.list_dir(&self.layout.checkpoints_dir()).await?;
        let mut steps: Vec<StepName> = listing
            .objects
            .iter()
            .filter_map(|o| {
                o.key
                    .rsplit('/')
                    .next()?
                    .strip_suffix(".json")?
                    .parse()
                    .ok()
            })
            .collect();
        steps.sort_by(|a, b| b.cmp(a));
        Ok(steps)
    }

    /// Reads and parses the manifest of `step`.
    pub async fn manifest(&self, step: StepName) -> Result<Manifest> {
        let key = self.layout.manifest(step);
        match self.store.get(&key).await {
            Ok(bytes) => Manifest::parse(&key, &bytes),
            Err(StorageError::NotFound { .. }) => Err(CheckpointError::NotFound {
                name: step.to_string(),
                run: self.layout.root().to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The kinds a manifest's blobs hold (reads the header of its first `dcp/` file).
    pub async fn detect_kinds(&self, manifest: &Manifest) -> Result<Vec<CheckpointKind>> {
        let names = match manifest
            .dcp_files()
            .find(|f| f.path.ends_with(".safetensors"))
        {
            Some(f) => {
                let key = format!(
                    "{}/{}",
                    self.layout.checkpoint_dir(manifest.step_name()),
                    f.path
                );
                read_header(&self.store, &key, f.bytes)
                    .await?
                    .tensors
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect()
            }
            None => Vec::new(),
        };
        Ok(detect(manifest, &names))
    }

    /// Every committed checkpoint, newest first. Unreadable ones are skipped with a warning.
    pub async fn list(&self) -> Result<Vec<CheckpointInfo>> {
        let mut out = Vec::new();
        for step in self.committed_steps().await? {
            let manifest = match self.manifest(step).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(checkpoint = %step, %e, "skipping unreadable checkpoint");
                    continue;
                }
            };
            let kinds = match self.detect_kinds(&manifest).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(checkpoint = %step, %e, "skipping checkpoint whose blobs cannot be read");
                    continue;
                }
            };
            out.push(CheckpointInfo {
                name: manifest.name.clone(),
                step: manifest.step,
                resumable: kinds.iter().any(|k| k.resumable()),
                promotable: kinds.iter().any(|k| k.promotable()),
                kinds,
                bytes: manifest.total_bytes(),
                data_consumed: manifest.data_consumed,
                created_unix_ms: manifest.created_unix_ms,
            });
        }
        Ok(out)
    }

    /// Checks a committed checkpoint's files against its manifest: present with the recorded size and,
    /// with `rehash`, the recorded sha256. Returns the problems found.
    pub async fn check(&self, manifest: &Manifest, rehash: bool) -> Result<Vec<String>> {
        self.check_files(manifest, manifest.files.iter(), rehash)
            .await
    }

    /// [`Self::check`] of some of a manifest's files.
    async fn check_files(
        &self,
        manifest: &Manifest,
        files: impl Iterator<Item = &FileEntry>,
        rehash: bool,
    ) -> Result<Vec<String>> {
        let dir = self.layout.checkpoint_dir(manifest.step_name());
        let mut problems = Vec::new();
        for f in files {
            let key = format!("{dir}/{}", f.path);
            match self.store.head(&key).await {
                Ok(o) if o.size != f.bytes => {
                    problems.push(format!(
                        "{}: {} bytes, manifest says {}",
                        f.path, o.size, f.bytes
                    ));
                    continue;
                }
                Ok(_) => {}
                Err(StorageError::NotFound { .. }) => {
                    problems.push(format!("{}: missing", f.path));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            if rehash {
                let (_, sha) = self.store.reader(&key, None).await?.drain().await?;
                if sha != f.sha256 {
                    problems.push(format!(
                        "{}: sha256 {sha}, manifest says {}",
                        f.path, f.sha256
                    ));
                }
            }
        }
        Ok(problems)
    }

    /// Re-hashes every file of `step` against its manifest.
    pub async fn verify(&self, step: StepName) -> Result<VerifyReport> {
        let manifest = self.manifest(step).await?;
        let problems = self.check(&manifest, true).await?;
        Ok(VerifyReport {
            name: manifest.name.clone(),
            files: manifest.files.len(),
            bytes: manifest.total_bytes(),
            problems,
        })
    }

    /// The newest committed, complete, resumable checkpoint. Damaged ones (unparseable or misnamed
    /// manifest, missing blob, wrong size, and with `rehash` a wrong sha256) are skipped with a
    /// warning that names them and what is wrong.
    pub async fn latest_resumable(&self, rehash: bool) -> Result<Option<Manifest>> {
        Ok(self.resume_candidate(rehash, &[]).await?.0)
    }

    /// What resume would continue from, passing over the steps in `except` (found damaged as they
    /// loaded): the newest committed checkpoint that is complete (and, with `rehash`, matches its
    /// sha256s) and resumable; and the newer checkpoints passed over as damaged, newest first, to be
    /// [set aside](Self::set_aside) once this writer owns the run. A checkpoint that merely could not
    /// be read (storage unreachable) is never passed over: that error is returned.
    pub async fn resume_candidate(
        &self,
        rehash: bool,
        except: &[StepName],
    ) -> Result<(Option<Manifest>, Vec<Skipped>)> {
        let mut skipped = Vec::new();
        for step in self.committed_steps().await? {
            if except.contains(&step) {
                continue;
            }
            let found = async {
                let manifest = self.manifest(step).await?;
                if manifest.dcp_files().next().is_none() {
                    return Ok(None);
                }
                let problems = self.check(&manifest, rehash).await?;
                if !problems.is_empty() {
                    return Err(CheckpointError::Damaged {
                        name: manifest.name.clone(),
                        problems,
                    });
                }
                let resumable = self
                    .detect_kinds(&manifest)
                    .await?
                    .iter()
                    .any(|k| k.resumable());
                Ok(resumable.then_some(manifest))
            }
            .await;
            match found {
                Ok(Some(m)) => return Ok((Some(m), skipped)),
                Ok(None) => continue,
                Err(e) if e.is_damage() => {
                    tracing::warn!(checkpoint = %step, "passing over a damaged checkpoint: {e}");
                    skipped.push(Skipped {
                        step,
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok((None, skipped))
    }

    /// Sets a damaged committed checkpoint aside so that the run can go on past it: its manifest
    /// moves to `checkpoints/quarantine/<name>-attempt-<N>.json` (with `reason`), so discovery no
    /// longer sees it and the step can be saved again; its blobs become uncommitted leftovers, which
    /// the next save of that step or `gc` removes. Fenced like a commit: only the newest attempt may.
    pub async fn set_aside(&self, step: StepName, reason: &str) -> Result<()> {
        let name = step.to_string();
        let Some(ours) = self.attempt else {
            return Err(CheckpointError::Invalid(format!(
                "cannot set {name} aside: no attempt started (call start_attempt first)"
            )));
        };
        self.check_fence(&name, ours).await?;
        let key = self.layout.manifest(step);
        let manifest = match self.store.get(&key).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(StorageError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let record = serde_json::json!({
            "name": name,
            "reason": reason,
            "attempt": ours,
            "set_aside_unix_ms": now_ms(),
            "manifest": manifest,
        });
        self.store
            .put(
                &self.layout.quarantined_manifest(step, ours),
                serde_json::to_vec_pretty(&record)
                    .unwrap_or_default()
                    .into(),
            )
            .await?;
        self.store.delete(&key).await?;
        tracing::warn!(checkpoint = %name, reason, "set the damaged checkpoint aside; training goes on past it");
        Ok(())
    }

    /// The data position of a committed checkpoint: the manifest's (which wins), with a warning when
    /// `dataloader.json` disagrees.
    pub async fn data_position(&self, manifest: &Manifest) -> Result<DataPosition> {
        let from_manifest = DataPosition {
            data_consumed: manifest.data_consumed,
            epoch: manifest.epoch,
        };
        let key = self.layout.dataloader();
        match self.store.get(&key).await {
            Ok(bytes) => match Dataloader::parse(&key, &bytes) {
                Ok(d) => match d.get(manifest.step_name()) {
                    Some(p) if p != from_manifest => tracing::warn!(
                        checkpoint = %manifest.name, dataloader = ?p, manifest = ?from_manifest,
                        "dataloader.json disagrees with the manifest; the manifest wins"
                    ),
                    None => {
                        tracing::warn!(checkpoint = %manifest.name, "dataloader.json has no entry; using the manifest")
                    }
                    _ => {}
                },
                Err(e) => tracing::warn!(%e, "dataloader.json unreadable; using the manifest"),
            },
            Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(from_manifest)
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

    /// Reads the tensors of `manifest`'s files under `part` (`"dcp/"` or `"sampler/"`) whose names
    /// `want` accepts; with `verify_on_load`, each file's sha256 is checked as it is read.
    pub async fn load_tensors(
        &self,
        manifest: &Manifest,
        part: &str,
        want: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Tensor>> {
        let _pin = self.pin(manifest.step);
        let dir = self.layout.checkpoint_dir(manifest.step_name());
        let reads = manifest
            .files
            .iter()
            .filter(|f| f.path.starts_with(part) && f.path.ends_with(".safetensors"))
            .map(|f| {
                let key = format!("{dir}/{}", f.path);
                async move {
                    let bytes = self.read_file_checked(&key, f).await?;
                    tensors_from_bytes(&key, bytes, want)
                }
            });
        let per_file: Vec<Vec<Tensor>> = futures::stream::iter(reads)
            .buffered(self.options.parallel_files.max(1))
            .try_collect()
            .await?;
        Ok(per_file.into_iter().flatten().collect())
    }

    /// Reads a file of a checkpoint, checking size and (with `verify_on_load`) sha256.
    pub(crate) async fn read_file_checked(&self, key: &str, f: &FileEntry) -> Result<Bytes> {
        let bytes = self.store.get(key).await?;
        let damaged = |problem: String| CheckpointError::Damaged {
            name: key.to_string(),
            problems: vec![problem],
        };
        if bytes.len() as u64 != f.bytes {
            return Err(damaged(format!(
                "{} bytes, manifest says {}",
                bytes.len(),
                f.bytes
            )));
        }
        if self.options.verify_on_load {
            let sha = sha256_parallel(bytes.clone()).await?;
            if sha != f.sha256 {
                return Err(damaged(format!("sha256 {sha}, manifest says {}", f.sha256)));
            }
        }
        Ok(bytes)
    }

    /// The full sampler weights of a checkpoint as (file name relative to `sampler/`, bytes): read as
    /// they are, or rebuilt from a delta and its base (checked bit for bit).
    pub async fn sampler_weight_files(&self, manifest: &Manifest) -> Result<Vec<(String, Bytes)>> {
        let _pin = self.pin(manifest.step);
        if manifest.delta_base.is_some() {
            return crate::delta::rebuild(self, manifest).await;
        }
        let dir = self.layout.checkpoint_dir(manifest.step_name());
        let mut out = Vec::new();
        for f in manifest
            .sampler_files()
            .filter(|f| f.path.ends_with(".safetensors"))
        {
            let bytes = self
                .read_file_checked(&format!("{dir}/{}", f.path), f)
                .await?;
            out.push((f.path.trim_start_matches("sampler/").to_string(), bytes));
        }
        Ok(out)
    }

    /// The sampler weights of a checkpoint as tensors (rebuilding a delta).
    pub async fn sampler_tensors(&self, manifest: &Manifest) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for (name, bytes) in self.sampler_weight_files(manifest).await? {
            out.extend(tensors_from_bytes(&name, bytes, &|_| true)?);
        }
        Ok(out)
    }

    /// Copies a promotable checkpoint's sampler files to `models/<model_id>/` (server-side where the
    /// store can). Refuses other kinds, and an existing model of that id (nothing is overwritten).
    pub async fn promote(&self, step: StepName, model_id: &str) -> Result<String> {
        let manifest = self.manifest(step).await?;
        let kinds = self.detect_kinds(&manifest).await?;
        if !kinds.iter().any(|k| k.promotable()) {
            let promotable: Vec<String> = self
                .list()
                .await?
                .into_iter()
                .filter(|c| c.promotable)
                .map(|c| c.name)
                .collect();
            let kinds_s = kinds
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let fix = if kinds.contains(&CheckpointKind::InferenceArcV2) {
                "a delta is not deployable on its own; promote its base or save with promotable=true"
                    .to_string()
            } else {
                "only INFERENCE_BASE and INFERENCE_LORA checkpoints promote; save with promotable=true"
                    .to_string()
            };
            return Err(CheckpointError::WrongKind {
                name: manifest.name,
                kinds: if kinds_s.is_empty() {
                    "empty".into()
                } else {
                    kinds_s
                },
                reason: format!("{fix} (promotable here: {promotable:?})"),
            });
        }
        let dest = model_dir(model_id)?;
        match self.promotion(model_id).await? {
            Promotion::Absent => {}
            Promotion::Done(record) => {
                return Err(CheckpointError::Invalid(format!(
                    "model {model_id} already exists at {dest} (promoted from {} {}); choose \
                     another --output_model_id (nothing was overwritten)",
                    record["source_run"], record["source_checkpoint"]
                )));
            }
            Promotion::Partial(keys) => {
                // A promotion killed half-way leaves files but no marker: nobody can deploy it.
                // Finish it when every file there is one this checkpoint would write, with its size.
                let ours: HashMap<String, u64> = manifest
                    .sampler_files()
                    .map(|f| {
                        let rel = f.path.trim_start_matches("sampler/");
                        (format!("{dest}/{rel}"), f.bytes)
                    })
                    .collect();
                let foreign: Vec<&String> = keys
                    .iter()
                    .filter(|(k, size)| ours.get(k.as_str()) != Some(size))
                    .map(|(k, _)| k)
                    .collect();
                if !foreign.is_empty() {
                    return Err(CheckpointError::Invalid(format!(
                        "{dest} holds files that are not {}'s ({foreign:?}) and no promotion \
                         record; choose another --output_model_id, or remove it if it is garbage \
                         (nothing was overwritten)",
                        manifest.name
                    )));
                }
                tracing::warn!(
                    model = model_id,
                    files = keys.len(),
                    "finishing a promotion that was interrupted"
                );
            }
        }
        // What is deployed must be what was saved: every sampler file re-hashed first.
        let _pin = self.pin(manifest.step);
        let problems = self
            .check_files(&manifest, manifest.sampler_files(), true)
            .await?;
        if !problems.is_empty() {
            return Err(CheckpointError::Damaged {
                name: manifest.name.clone(),
                problems,
            });
        }
        if manifest.delta_base.is_some() {
            // A delta rebuilds and checks its full weights bit for bit.
            self.sampler_weight_files(&manifest).await?;
        }
        let dir = self.layout.checkpoint_dir(step);
        for f in manifest.sampler_files() {
            let rel = f.path.trim_start_matches("sampler/");
            self.store
                .copy(&format!("{dir}/{}", f.path), &format!("{dest}/{rel}"))
                .await?;
        }
        // The record is written last and create-only: it is the promotion's commit. Until it exists
        // the model is not there for anyone (see [`Self::promotion`]).
        let record = serde_json::json!({
            "source_run": self.layout.run_id(),
            "source_framework": self.layout.framework(),
            "source_checkpoint": manifest.name,
            "kinds": kinds,
            "files": manifest.sampler_files().collect::<Vec<_>>(),
            "promoted_unix_ms": now_ms(),
        });
        match self
            .store
            .put_create(
                &format!("{dest}/{PROMOTION_RECORD}"),
                serde_json::to_vec_pretty(&record)
                    .unwrap_or_default()
                    .into(),
            )
            .await
        {
            Ok(()) => {}
            Err(StorageError::AlreadyExists { .. }) => {
                return Err(CheckpointError::Invalid(format!(
                    "model {model_id} was promoted by someone else while this promotion ran; \
                     choose another --output_model_id"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(checkpoint = %manifest.name, model = model_id, "promoted");
        Ok(dest)
    }

    /// The state of `models/<model_id>/`: absent, promoted (with its record, written last), or files
    /// without a record (a promotion that was interrupted; not deployable).
    pub async fn promotion(&self, model_id: &str) -> Result<Promotion> {
        let dest = model_dir(model_id)?;
        let objects = self.store.list(&format!("{dest}/")).await?;
        if objects.is_empty() {
            return Ok(Promotion::Absent);
        }
        let record_key = format!("{dest}/{PROMOTION_RECORD}");
        if objects.iter().any(|o| o.key == record_key) {
            let bytes = self.store.get(&record_key).await?;
            let record: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                CheckpointError::Invalid(format!(
                    "{record_key} is not a promotion record ({e}); remove {dest} if it is garbage"
                ))
            })?;
            return Ok(Promotion::Done(record));
        }
        Ok(Promotion::Partial(
            objects.into_iter().map(|o| (o.key, o.size)).collect(),
        ))
    }

    /// Keeps the newest `keep` resumable checkpoints and removes older ones — never the newest
    /// committed checkpoint, one being read, the base of a kept delta, or (unless `prune_sampler`) one
    /// holding sampler blobs. The manifest goes first, so a crash mid-way leaves garbage, not a broken
    /// commit. Returns the removed names.
    pub async fn retain(&self, keep: usize) -> Result<Vec<StepName>> {
        let steps = self.committed_steps().await?;
        let Some(&newest) = steps.first() else {
            return Ok(Vec::new());
        };
        let mut manifests = Vec::new();
        for s in &steps {
            if let Ok(m) = self.manifest(*s).await {
                manifests.push(m);
            }
        }
        let bases: Vec<String> = manifests
            .iter()
            .filter_map(|m| m.delta_base.as_ref().map(|d| d.name.clone()))
            .collect();
        let pinned: Vec<u64> = self
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        let mut resumable_seen = 0;
        let mut removed = Vec::new();
        for m in &manifests {
            if m.dcp_files().next().is_none() {
                continue;
            }
            resumable_seen += 1;
            let step = m.step_name();
            let protected = resumable_seen <= keep
                || step == newest
                || pinned.contains(&m.step)
                || bases.contains(&m.name)
                || (!self.options.prune_sampler && m.sampler_files().next().is_some());
            if protected {
                continue;
            }
            self.store.delete(&self.layout.manifest(step)).await?;
            self.store
                .delete_prefix(&self.layout.checkpoint_dir(step))
                .await?;
            tracing::info!(checkpoint = %step, "retention removed checkpoint");
            removed.push(step);
        }
        Ok(removed)
    }

    /// Removes blobs of uncommitted saves (step folders without a manifest) whose newest object is
    /// older than `grace`. Returns the removed keys.
    pub async fn gc(&self, grace: Duration) -> Result<Vec<String>> {
        let committed = self.committed_steps().await?;
        let listing = self.store.list_dir(&self.layout.checkpoints_dir()).await?;
        let now = SystemTime::now();
        let mut removed = Vec::new();
        for prefix in listing.prefixes {
            let Some(step) = prefix
                .rsplit('/')
                .next()
                .and_then(|n| n.parse::<StepName>().ok())
            else {
                continue;
            };
            if committed.contains(&step) {
                continue;
            }
            let objects = self.store.list(&prefix).await?;
            let young = objects.iter().any(|o| {
                now.duration_since(o.last_modified)
                    .map(|age| age < grace)
                    .unwrap_or(true)
            });
            if young {
                continue;
            }
            // Never through a symbolic link: a link in the run folder is removed, not followed.
            removed.extend(self.store.delete_prefix(&prefix).await?);
        }
        Ok(removed)
    }
}

/// Parses tensors out of a whole safetensors file held in memory (zero-copy slices).
pub(crate) fn tensors_from_bytes(
    key: &str,
    bytes: Bytes,
    want: &dyn Fn(&str) -> bool,
) -> Result<Vec<Tensor>> {
    let header = match parse_header(key, &bytes, bytes.len() as u64)? {
        Ok(h) => h,
        Err(_) => {
            return Err(CheckpointError::BadBlob {
                key: key.to_string(),
                reason: "header longer than the file".into(),
            })
        }
    };
    let start = header.data_start as usize;
    let mut out = Vec::new();
    for (name, info) in &header.tensors {
        if !want(name) {
            continue;
        }
        let (s, e) = info.data_offsets;
        out.push(Tensor {
            name: name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            offsets: header.saved_offsets(name)?,
            data: bytes.slice(start + s..start + e),
        });
    }
    Ok(out)
}

/// sha256 (hex) of `bytes`, computed on a blocking thread.
async fn sha256_parallel(bytes: Bytes) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    })
    .await
    .map_err(|e| CheckpointError::Invalid(format!("hashing task failed: {e}")))
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
