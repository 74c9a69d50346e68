//! Checkpoints from inside the training loop: what a save holds, and the [`Saver`] that writes it.
//!
//! A save is copied to host memory, then written and committed on a thread of its own while
//! training goes on; at most one is in flight. In the background mode the copy itself also runs on a
//! thread. On a GPU with room for it, the state is first snapshotted on the device (a device-to-device
//! copy, queued in well under a millisecond), and the host copy reads the snapshot while training
//! goes on untouched. Otherwise the host copy reads the live tensors, overlapping the next step's
//! forward and backward passes (they only read the weights), and [`Saver::before_update`] waits for
//! it before the optimizer changes them.
//!
//! With one rank the writer thread calls [`CheckpointManager::save`] (storage calls retried inside).
//! With several, every rank writes its share of `dcp/` (replicated tensors spread by size), rank 0
//! also the sampler part, and rank 0 commits once every rank's file list has come through the store
//! (on a side channel, so these collectives never interleave with the loop's); a rank that fails or
//! dies mid-save leaves no commit. `logs/metrics.jsonl` is written before the commit, `status.json`
//! after it (by rank 0).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tokio::runtime::Handle;
use waypoint_c10d::SideChannel;
use waypoint_checkpoint::peft::{adapter_tensor_name, AdapterConfig};
use waypoint_checkpoint::StepName;
use waypoint_checkpoint::{
    dcp, CheckpointManager, Commit, SamplerPart, SaveRequest, Tensor as Blob, WrittenFile,
};

use crate::convert::{byte_size, to_blob};
use crate::model::Model;
use crate::optim::AdamW;
use crate::ranks::Ranks;
use crate::records::{self, Status};

/// What every save needs besides the live state.
pub struct SaveContext {
    /// sha256 of the resume-relevant configuration.
    pub fingerprint: String,
    /// dtype of the promotable weights.
    pub sampler_kind: Kind,
    /// Its `torch_dtype` spelling for `config.json`.
    pub sampler_dtype_name: &'static str,
    /// Tokenizer files carried into the sampler directory.
    pub tokenizer_files: Vec<(String, Bytes)>,
    /// The base model (named in a PEFT adapter's config).
    pub model_id: String,
    /// Samples in the training data (to derive the epoch).
    pub n_samples: u64,
}

impl SaveContext {
    /// The counters and identity of a checkpoint at `step`.
    pub fn commit(&self, step: u64, data_consumed: u64, world_size: u32) -> Commit {
        Commit {
            step,
            data_consumed,
            epoch: data_consumed / self.n_samples.max(1),
            world_size,
            config_fingerprint: self.fingerprint.clone(),
            delta_base: None,
        }
    }
}

/// One save, staged in host memory.
struct Job {
    commit: Commit,
    dcp: Vec<Blob>,
    sampler: Option<SamplerPart>,
    status: Status,
    metrics: String,
    /// `config/run.json`, written again after the commit if the run folder lost it.
    run_record: Bytes,
}

/// A copy of the state to host memory running on its own thread.
struct Staging {
    copy: JoinHandle<Result<Vec<Blob>>>,
    /// The copy reads a snapshot, not the live tensors: the optimizer need not wait for it.
    from_snapshot: bool,
    commit: Commit,
    status: Status,
    metrics: String,
}

/// Writes saves in the background, one at a time, for this rank.
pub struct Saver {
    manager: Arc<CheckpointManager>,
    handle: Handle,
    rank: u32,
    world: u32,
    side: Option<Arc<Mutex<SideChannel>>>,
    staging: Option<Staging>,
    inflight: Option<JoinHandle<Result<String>>>,
    /// The newest checkpoint committed since this process started.
    pub committed: Option<String>,
    /// `config/run.json` as written at the start (rank 0).
    run_record: Bytes,
}

impl Saver {
    /// A saver for this rank; with other ranks it opens its own store connection.
    pub fn new(
        manager: Arc<CheckpointManager>,
        ranks: &Ranks,
        handle: Handle,
        run_record: Bytes,
    ) -> Result<Self> {
        let side = match ranks.group() {
            Some(g) => Some(Arc::new(Mutex::new(
                g.side_channel().context("opening the save channel")?,
            ))),
            None => None,
        };
        Ok(Self {
            manager,
            handle,
            rank: ranks.rank(),
            world: ranks.world(),
            side,
            staging: None,
            inflight: None,
            committed: None,
            run_record,
        })
    }

    /// Saves the state at `commit.step`, and the promotable part when `promotable`. With
    /// `background` the copy overlaps the next step and the write runs behind training; else this
    /// returns once the checkpoint is committed.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &mut self,
        model: &Model,
        opt: &AdamW,
        ctx: &SaveContext,
        commit: Commit,
        promotable: bool,
        status: Status,
        metrics: String,
        background: bool,
    ) -> Result<()> {
        self.hand_over_staged()?;
        let items = self.my_items(model, opt);
        let sampler = if promotable && self.rank == 0 {
            Some(sampler_part(model, ctx)?)
        } else {
            None
        };
        if background && sampler.is_none() {
            let (items, from_snapshot) = match snapshot_on_device(&items) {
                Some(snapshot) => (snapshot, true),
                None => (items, false),
            };
            self.staging = Some(Staging {
                copy: std::thread::spawn(move || copy_to_host(&items)),
                from_snapshot,
                commit,
                status,
                metrics,
            });
            return Ok(());
        }
        let job = Job {
            commit,
            dcp: copy_to_host(&items)?,
            sampler,
            status,
            metrics,
            run_record: Bytes::new(),
        };
        self.launch(job)?;
        if !background {
            self.wait()?;
        }
        Ok(())
    }

    /// Before the optimizer changes the weights: waits for a copy in progress and hands it to the
    /// writer. Returns the seconds this blocked, if a copy was pending.
    pub fn before_update(&mut self) -> Result<Option<f64>> {
        if self.staging.as_ref().is_none_or(|s| s.from_snapshot) {
            return Ok(None);
        }
        let started = Instant::now();
        self.hand_over_staged()?;
        Ok(Some(started.elapsed().as_secs_f64()))
    }

    /// Fails if the save in flight has failed, and hands a finished copy from a snapshot to the
    /// writer once it is free; never waits.
    pub fn check(&mut self) -> Result<()> {
        if self.inflight.as_ref().is_some_and(|h| h.is_finished()) {
            self.join()?;
        }
        let copied = self
            .staging
            .as_ref()
            .is_some_and(|s| s.from_snapshot && s.copy.is_finished());
        if copied && self.inflight.is_none() {
            self.hand_over_staged()?;
        }
        Ok(())
    }

    /// Waits until every save started so far is committed (or has failed).
    pub fn wait(&mut self) -> Result<()> {
        self.hand_over_staged()?;
        self.join()
    }

    /// This rank's part of the resumable state: all of it alone, else the tensors it owns.
    fn my_items(&self, model: &Model, opt: &AdamW) -> Vec<(String, Tensor)> {
        let items = state_items(model, opt);
        if self.world == 1 {
            return items;
        }
        let sizes: Vec<u64> = items.iter().map(|(_, t)| byte_size(t) as u64).collect();
        let owners = dcp::assign_owners(&sizes, self.world);
        items
            .into_iter()
            .zip(owners)
            .filter(|(_, owner)| *owner == self.rank)
            .map(|(item, _)| item)
            .collect()
    }

    fn hand_over_staged(&mut self) -> Result<()> {
        let Some(s) = self.staging.take() else {
            return Ok(());
        };
        let dcp = s
            .copy
            .join()
            .map_err(|_| anyhow::anyhow!("the staging thread panicked"))??;
        self.launch(Job {
            commit: s.commit,
            dcp,
            sampler: None,
            status: s.status,
            metrics: s.metrics,
            run_record: Bytes::new(),
        })
    }

    /// Waits for the save in flight, then starts writing `job` on a thread.
    fn launch(&mut self, mut job: Job) -> Result<()> {
        self.join()?;
        job.run_record = self.run_record.clone();
        let manager = self.manager.clone();
        let handle = self.handle.clone();
        let (rank, world, side) = (self.rank, self.world, self.side.clone());
        self.inflight = Some(std::thread::spawn(move || match side {
            None => write_alone(&manager, &handle, job),
            Some(side) => write_share(&manager, &handle, rank, world, &side, job),
        }));
        Ok(())
    }

    fn join(&mut self) -> Result<()> {
        if let Some(h) = self.inflight.take() {
            let name = h
                .join()
                .map_err(|_| anyhow::anyhow!("the save thread panicked"))??;
            self.committed = Some(name);
        }
        Ok(())
    }
}

/// The single-rank write: the whole save through the manager.
fn write_alone(manager: &CheckpointManager, handle: &Handle, job: Job) -> Result<String> {
    handle.block_on(async {
        let name = StepName::new(job.commit.step).to_string();
        write_metrics(manager, job.metrics).await?;
        let request = SaveRequest {
            commit: job.commit,
            dcp: Some(job.dcp),
            sampler: job.sampler,
        };
        let started = Instant::now();
        // One try: every storage call inside is already retried within the storage budget
        // (waypoint_storage::RetryPolicy), and a commit whose answer was lost is recognised there.
        let manifest = manager
            .save(request)
            .await
            .with_context(|| format!("saving checkpoint {name} failed"))?;
        let secs = started.elapsed().as_secs_f64();
        committed(manager, job.status, &job.run_record, &manifest.name).await?;
        tracing::info!(checkpoint = %manifest.name, secs, "checkpoint committed");
        Ok(manifest.name)
    })
}

/// One rank's part of a multi-rank save; rank 0 commits. Every rank returns rank 0's verdict.
fn write_share(
    manager: &CheckpointManager,
    handle: &Handle,
    rank: u32,
    world: u32,
    side: &Mutex<SideChannel>,
    job: Job,
) -> Result<String> {
    let mut side = side.lock().unwrap_or_else(|e| e.into_inner());
    let step = StepName::new(job.commit.step);
    let started = Instant::now();
    let mut commit = job.commit;
    if rank == 0 {
        handle.block_on(write_metrics(manager, job.metrics))?;
        handle.block_on(manager.prepare_save(step))?;
    }
    side.barrier(&format!("save/{step}/prepared"))?;
    let writer = manager.file_writer(step, rank);
    let mut files = Vec::new();
    if !job.dcp.is_empty() {
        files = handle.block_on(manager.write_dcp(&writer, world, job.dcp))?;
    }
    if let Some(sampler) = job.sampler {
        files.extend(handle.block_on(manager.write_sampler(&writer, sampler, &mut commit))?);
    }
    let bytes: u64 = files.iter().map(|f| f.entry.bytes).sum();
    tracing::info!(rank, checkpoint = %step, files = files.len(), bytes, "wrote this rank's share");
    let lists = side.all_gather(&format!("save/{step}/files"), &serde_json::to_vec(&files)?)?;
    let verdict = if rank == 0 {
        let mut all = Vec::new();
        for list in &lists {
            all.extend(serde_json::from_slice::<Vec<WrittenFile>>(list)?);
        }
        commit.world_size = world;
        let committed_and_kept = async {
            let m = manager.commit(commit, all).await?;
            manager.after_commit(&m).await?;
            Ok::<_, waypoint_checkpoint::CheckpointError>(m)
        };
        match handle.block_on(committed_and_kept) {
            Ok(m) => {
                handle.block_on(committed(manager, job.status, &job.run_record, &m.name))?;
                format!("ok {}", m.name)
            }
            Err(e) => format!("error {e}"),
        }
    } else {
        String::new()
    };
    let verdict = side.broadcast(&format!("save/{step}/result"), verdict.as_bytes())?;
    let verdict = String::from_utf8_lossy(&verdict);
    match verdict.strip_prefix("ok ") {
        Some(name) => {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                rank,
                checkpoint = name,
                secs,
                "checkpoint committed by rank 0"
            );
            Ok(name.to_string())
        }
        None => bail!(
            "rank 0 could not commit {step}: {}",
            verdict.trim_start_matches("error ")
        ),
    }
}

/// Metrics first: a resumed run keeps the lines up to its checkpoint and redoes the rest, so lines
/// past a checkpoint that never commits are harmless; lines missing below a committed one would not
/// be.
async fn write_metrics(manager: &CheckpointManager, metrics: String) -> Result<()> {
    manager
        .store()
        .put(&manager.layout().metrics(), Bytes::from(metrics))
        .await
        .context("writing logs/metrics.jsonl")?;
    Ok(())
}

/// Records a commit in `status.json`.
/// After a commit: `status.json` names it; a `config/run.json` that vanished (the run folder was
/// deleted mid-run) is written again, with a warning.
async fn committed(
    manager: &CheckpointManager,
    mut status: Status,
    run_record: &Bytes,
    name: &str,
) -> Result<()> {
    let key = manager.layout().run_config();
    if !run_record.is_empty() && !manager.store().exists(&key).await? {
        tracing::warn!(%key, "config/run.json is gone (was the run folder deleted?); writing it again");
        manager.store().put(&key, run_record.clone()).await?;
    }
    status.checkpoint = Some(name.to_string());
    records::write_status(manager.store(), manager.layout(), &status).await
}

/// The resumable state under DCP's names: trainable weights and their AdamW state (handles that
/// share the live tensors' memory).
fn state_items(model: &Model, opt: &AdamW) -> Vec<(String, Tensor)> {
    let mut items = Vec::new();
    for (p, s) in model.trainable().iter().zip(&opt.state) {
        items.push((dcp::model_key(&p.name), p.tensor.shallow_clone()));
        items.push((
            dcp::optim_key(&p.name, "exp_avg"),
            s.exp_avg.shallow_clone(),
        ));
        items.push((
            dcp::optim_key(&p.name, "exp_avg_sq"),
            s.exp_avg_sq.shallow_clone(),
        ));
        items.push((dcp::optim_key(&p.name, "step"), s.step.shallow_clone()));
    }
    items
}

/// Free GPU memory kept beyond a snapshot, for the activations of the steps that run beside it.
const SNAPSHOT_HEADROOM: u64 = 2 << 30;

/// A copy of the state on its own GPU, when the state lives on a GPU with room for it.
fn snapshot_on_device(items: &[(String, Tensor)]) -> Option<Vec<(String, Tensor)>> {
    let Device::Cuda(gpu) = items.first()?.1.device() else {
        return None;
    };
    let bytes: u64 = items.iter().map(|(_, t)| byte_size(t) as u64).sum();
    match crate::cuda::free_memory(gpu) {
        Ok(free) if free >= bytes + SNAPSHOT_HEADROOM => {}
        Ok(free) => {
            tracing::info!(
                state_mb = bytes >> 20,
                free_mb = free >> 20,
                "no room on the GPU for a snapshot: the optimizer waits for the copy to host"
            );
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "free GPU memory unknown: no snapshot");
            return None;
        }
    }
    tracing::debug!(state_mb = bytes >> 20, gpu, "state snapshotted on the GPU");
    tch::no_grad(|| {
        Some(
            items
                .iter()
                .map(|(name, t)| (name.clone(), t.detach().copy()))
                .collect(),
        )
    })
}

/// Copies named tensors to host memory, as they are.
fn copy_to_host(items: &[(String, Tensor)]) -> Result<Vec<Blob>> {
    items
        .iter()
        .map(|(name, t)| to_blob(name, t, None))
        .collect()
}

/// The promotable part: a PEFT adapter under LoRA, else the full weights as an HF directory, in the
/// sampler dtype.
fn sampler_part(model: &Model, ctx: &SaveContext) -> Result<SamplerPart> {
    if let Some(lora) = &model.lora {
        let config = AdapterConfig::new(
            lora.rank as usize,
            lora.alpha,
            lora.dropout,
            lora.targets.clone(),
            &ctx.model_id,
        );
        let tensors = model
            .trainable()
            .iter()
            .map(|p| {
                let (fqn, which) = match p.name.strip_suffix(".lora_A.weight") {
                    Some(f) => (f, 'A'),
                    None => (
                        p.name.strip_suffix(".lora_B.weight").unwrap_or(&p.name),
                        'B',
                    ),
                };
                to_blob(
                    &adapter_tensor_name(fqn, which),
                    &p.tensor,
                    Some(ctx.sampler_kind),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(SamplerPart::Lora {
            adapter_config: Bytes::from(config.to_json()?),
            tensors,
        });
    }
    let mut config: Value = model.config.raw.clone();
    config["torch_dtype"] = json!(ctx.sampler_dtype_name);
    let tensors = model
        .base()
        .iter()
        .map(|p| to_blob(&p.name, &p.tensor, Some(ctx.sampler_kind)))
        .collect::<Result<Vec<_>>>()?;
    Ok(SamplerPart::Full {
        config_json: Bytes::from(serde_json::to_vec_pretty(&config)?),
        tensors,
        extra_files: ctx.tokenizer_files.clone(),
    })
}

/// Which save, if any, is due after a step: the policy apart from the saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDue {
    /// None.
    None,
    /// A periodic resumable save (every `save_steps`, before the last step).
    Periodic,
    /// The final save at the last step: resumable and promotable.
    Final,
    /// A stop was requested (a signal): save this step, resumable, then stop.
    Stop,
}

/// What save is due once `step` of `total` is done, with saves every `save_steps` (0: none but the
/// final one) and `signal` when a stop was requested. A stop at step 0 has nothing to save.
pub fn save_due(step: u64, save_steps: u64, total: u64, signal: bool) -> SaveDue {
    if step >= total {
        SaveDue::Final
    } else if signal {
        if step > 0 {
            SaveDue::Stop
        } else {
            SaveDue::None
        }
    } else if save_steps > 0 && step % save_steps == 0 {
        SaveDue::Periodic
    } else {
        SaveDue::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_saves_fall_on_multiples_before_the_last_step() {
        let due: Vec<u64> = (1..10)
            .filter(|&s| save_due(s, 3, 10, false) == SaveDue::Periodic)
            .collect();
        assert_eq!(due, [3, 6, 9]);
        // The last step gets the final save, even on a multiple.
        assert_eq!(save_due(9, 3, 9, false), SaveDue::Final);
        assert_eq!(save_due(10, 3, 10, false), SaveDue::Final);
        // save_steps 0: only the final one.
        assert!((1..10).all(|s| save_due(s, 0, 10, false) == SaveDue::None));
        assert_eq!(save_due(10, 0, 10, false), SaveDue::Final);
    }

    #[test]
    fn a_stop_saves_the_current_step_unless_nothing_was_done() {
        assert_eq!(save_due(4, 3, 10, true), SaveDue::Stop);
        assert_eq!(save_due(6, 3, 10, true), SaveDue::Stop);
        assert_eq!(save_due(0, 3, 10, true), SaveDue::None);
        assert_eq!(save_due(10, 3, 10, true), SaveDue::Final);
    }
}
