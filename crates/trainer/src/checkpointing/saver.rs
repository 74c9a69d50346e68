//! Checkpoints from inside the training loop: the [`Saver`] that stages and writes a save (what a
//! save holds is [`crate::checkpointing::state`]'s).
//!
//! A save is copied to host memory, then written and committed on a thread of its own while
//! training goes on; at most one is in flight, and a save's copy starts once the one before it is
//! written, so at most one save's host copy exists at a time (what the memory plan counts). The copy and write threads live as long as the saver
//! ([`Worker`]), so memory stays flat over any number of saves. In the background mode the copy itself also runs on a
//! thread. On a GPU with room for it, the state is first snapshotted on the device (a device-to-device
//! copy, queued in well under a millisecond), and the host copy reads the snapshot while training
//! goes on untouched. Otherwise the host copy reads the live tensors, overlapping the next step's
//! forward and backward passes (they only read the weights), and [`Saver::before_update`] waits for
//! it before the optimizer changes them.
//!
//! Every save, with one rank or several, goes through the checkpoint crate's one protocol
//! ([`CheckpointManager::save_with`]): every rank writes its share of `dcp/` (replicated tensors
//! spread by size), rank 0 also the sampler part, and rank 0 commits once every rank's file list has
//! come through the store (on a side channel, so these collectives never interleave with the loop's);
//! a rank that fails or dies mid-save leaves no commit. One rank alone is the trivial case. Run
//! records go through their own handle ([`RunRecords`]): `logs/metrics.jsonl` before the commit,
//! `status.json` after it (by rank 0).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use tokio::runtime::Handle;
use waypoint_c10d::SideChannel;
use waypoint_checkpoint::dcp::LoopState;
use waypoint_checkpoint::StepName;
use waypoint_checkpoint::{
    dcp, CheckpointError, CheckpointManager, Commit, Peers, SamplerPart, SaveRequest, SingleRank,
    Tensor as Blob,
};

use crate::checkpointing::policy::{delta_base_for, SamplerChain};
use crate::checkpointing::state::{
    copy_to_host_drawing_on, lend_copy, sampler_part, snapshot_on_device, state_items, CopyLender,
    CopyLoan, PromotableShare, SaveContext, StateItem,
};
use crate::checkpointing::worker::{Task, Worker};
use crate::collective::ranks::Ranks;
use crate::convert::byte_size;
use crate::model::Model;
use crate::optim::AdamW;
use waypoint_observe::records::{RunRecords, Status};
use waypoint_observe::saves::SaveReport;

/// One save asked of the [`Saver`]: the live state, what the checkpoint is, and how to save it.
pub(crate) struct SaveOrder<'a> {
    /// The model (its trainable weights, and the sampler part's weights).
    pub model: &'a Model,
    /// The optimizer (its state).
    pub opt: &'a AdamW,
    /// What every save needs besides the live state.
    pub ctx: &'a SaveContext,
    /// The counters and identity of the checkpoint.
    pub commit: Commit,
    /// Write the resumable part (`dcp/`); off for a sampler save alone.
    pub resumable: bool,
    /// Also write the promotable (sampler) part.
    pub promotable: bool,
    /// The sampler part may be a delta over the newest base this saver wrote (periodic sampler
    /// saves; see [`delta_base_for`]).
    pub delta_ok: bool,
    /// `status.json` once it is committed.
    pub status: Status,
    /// `logs/metrics.jsonl` as of this step.
    pub metrics: String,
    /// Copy and write behind training instead of returning once committed.
    pub background: bool,
    /// With sharded weights: this rank's share of the promotable weights, which every rank writes
    /// ([`promotable_share`]).
    pub share: Option<PromotableShare>,
    /// The scheduler, train state and seeds a PyTorch loop continues from (rank 0 writes them into
    /// `dcp/` with the resumable part).
    pub loop_state: LoopState,
    /// Where the resumable part's host copy comes from, and whether it is lent on.
    pub host_copy: HostCopy,
}

/// How a save gets the host copy of its resumable state.
pub(crate) enum HostCopy {
    /// It copies the state itself.
    Own,
    /// It copies the state itself and lends the copy to another save of the same step
    /// ([`Saver::lent_copy`] hands out the loan).
    Lend,
    /// It takes what the loan holds of its state from another save's copy of the same step — the
    /// durable save drains the memory tier's —, copying only the rest itself.
    Borrow(CopyLoan),
}

/// When a save began (the end of its step) and what it has cost the loop so far.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// The save call: the end of the checkpoint's step.
    began: Instant,
    /// Seconds the loop was blocked by this save.
    stall_s: f64,
    /// Seconds the copy to host memory took.
    snapshot_s: f64,
    /// Bytes of the copy taken from another save's ([`HostCopy::Borrow`]).
    drained_bytes: u64,
}

/// One save, staged in host memory.
struct Job {
    timing: Timing,
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
    timing: Timing,
    /// The copy, the seconds it took and the bytes of it borrowed.
    copy: Task<Result<(Vec<Blob>, f64, u64)>>,
    /// Written beside the copy: the loop state's tensors (rank 0).
    loop_state: Vec<Blob>,
    /// The copy reads a snapshot, not the live tensors: the optimizer need not wait for it.
    from_snapshot: bool,
    commit: Commit,
    status: Status,
    metrics: String,
}

/// The tier a saver writes: its keys on the store, its voice in the log, and the ranks its
/// checkpoints span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SaverTier {
    /// The durable tier: every rank of the job; commits are info lines.
    Durable,
    /// A node's memory tier: the ranks of one node — `local_world` of them, this one `local_rank`,
    /// on node `node` — whose checkpoint is the node's own: the replicated state is split among
    /// them and the node's local rank 0 commits; commits are debug lines (it saves every step).
    Memory {
        /// The node's index.
        node: u32,
        /// This rank on the node.
        local_rank: u32,
        /// The node's ranks.
        local_world: u32,
    },
}

/// Writes saves in the background, one at a time, for this rank.
pub(crate) struct Saver {
    manager: Arc<CheckpointManager>,
    handle: Handle,
    rank: u32,
    world: u32,
    /// The other ranks of a save ([`SingleRank`] alone).
    peers: Arc<Mutex<Box<dyn Peers + Send>>>,
    /// `status.json` and `logs/metrics.jsonl` (the memory tier's own: its tail of the metrics).
    records: RunRecords,
    /// Commits are debug lines.
    quiet: bool,
    staging: Option<Staging>,
    inflight: Option<Task<Result<Committed>>>,
    /// The thread that copies a background save to host memory, kept across saves.
    copier: Worker,
    /// The thread that writes and commits saves, kept across saves.
    writer: Worker,
    /// The newest checkpoint committed since this process started.
    pub committed: Option<String>,
    /// The newest full sampler base this saver committed and the deltas made over it since.
    chain: Option<SamplerChain>,
    /// `config/run.json` as written at the start (rank 0).
    run_record: Bytes,
    /// Saves committed since the loop last asked ([`Saver::take_committed`]).
    reports: Vec<SaveReport>,
    /// Closed once the save in flight is written and its host copy freed.
    written: Option<std::sync::mpsc::Receiver<()>>,
    /// Set when the run let its saves go ([`Saver::abandon`]): a write that still commits then
    /// leaves `status.json` to the failure being recorded.
    abandoned: Arc<std::sync::atomic::AtomicBool>,
    /// The loan of the last save's host copy ([`HostCopy::Lend`]), until it is taken.
    lent: Option<CopyLoan>,
}

impl Saver {
    /// A saver of `tier` for this rank, writing run records through `records`; with other ranks it
    /// opens its own store connection, its keys under the tier's name.
    pub(crate) fn new(
        manager: Arc<CheckpointManager>,
        records: RunRecords,
        ranks: &Ranks,
        handle: Handle,
        run_record: Bytes,
        tier: SaverTier,
    ) -> Result<Self> {
        let (rank, world, channel, quiet) = match tier {
            SaverTier::Durable => (ranks.rank(), ranks.world(), "durable", false),
            SaverTier::Memory {
                local_rank,
                local_world,
                ..
            } => (local_rank, local_world, "memory", true),
        };
        let side = match (ranks.group(), tier) {
            (Some(g), SaverTier::Durable) => Some(g.side_channel()),
            (Some(g), SaverTier::Memory { node, .. }) if world > 1 => {
                Some(g.node_channel(node, rank, world))
            }
            _ => None,
        };
        let peers: Box<dyn Peers + Send> = match side {
            Some(side) => Box::new(SidePeers {
                side: side.context("opening the save channel")?,
                rank,
                world,
                channel,
            }),
            None => Box::new(SingleRank),
        };
        Ok(Self {
            manager,
            handle,
            rank: if world > 1 { rank } else { 0 },
            world,
            peers: Arc::new(Mutex::new(peers)),
            records,
            staging: None,
            inflight: None,
            copier: Worker::new("ckpt-copy")?,
            writer: Worker::new("ckpt-write")?,
            committed: None,
            chain: None,
            run_record,
            reports: Vec::new(),
            quiet,
            written: None,
            abandoned: Arc::default(),
            lent: None,
        })
    }

    /// Saves the state at `order.commit.step`, and the promotable part when `order.promotable`.
    /// With `order.background` the copy overlaps the next step and the write runs behind training;
    /// else this returns once the checkpoint is committed.
    pub(crate) fn save(&mut self, order: SaveOrder<'_>) -> Result<()> {
        let SaveOrder {
            model,
            opt,
            ctx,
            commit,
            resumable,
            promotable,
            delta_ok,
            status,
            metrics,
            background,
            share,
            loop_state,
            host_copy,
        } = order;
        let began = Instant::now();
        self.hand_over_staged()?;
        self.lent = None;
        let (lender, loan) = match host_copy {
            HostCopy::Own => (None, None),
            HostCopy::Lend if resumable => {
                let (lender, loan) = lend_copy();
                self.lent = Some(loan);
                (Some(lender), None)
            }
            HostCopy::Lend => (None, None),
            HostCopy::Borrow(loan) => (None, Some(loan)),
        };
        let items = if resumable {
            self.my_items(model, opt)
        } else {
            Vec::new()
        };
        let loop_state = if resumable && self.rank == 0 {
            loop_state.tensors()?
        } else {
            Vec::new()
        };
        let sampler = if promotable && (self.rank == 0 || share.is_some()) {
            // Its weights are copied now: once the save in flight is written (one copy at a time).
            self.join()?;
            let base = if delta_ok && model.lora.is_none() && share.is_none() {
                // The base is decided by what is committed: wait for the save in flight.
                self.join()?;
                delta_base_for(self.chain, ctx.sampler_base_every)
            } else {
                None
            };
            Some(sampler_part(model, share, ctx, base)?)
        } else {
            None
        };
        if background && sampler.is_none() {
            // A borrowed copy may never come (its lender failed): what it held is then copied
            // from the live tensors, so the optimizer waits for this copy.
            let (items, from_snapshot) = match loan.is_none().then(|| snapshot_on_device(&items)) {
                Some(Some(snapshot)) => (snapshot, true),
                _ => (items, false),
            };
            // At most one save's host copy at a time: this copy starts on the copy thread once the
            // save in flight is written, while the loop goes on (the optimizer waits for it).
            let written = self.written.take();
            let copy = move || {
                if let Some(written) = written {
                    let _ = written.recv();
                }
                let copying = Instant::now();
                let (blobs, drained) = host_copy_of(&items, loan, lender)?;
                Ok((blobs, copying.elapsed().as_secs_f64(), drained))
            };
            self.staging = Some(Staging {
                timing: Timing {
                    began,
                    stall_s: began.elapsed().as_secs_f64(),
                    snapshot_s: 0.0,
                    drained_bytes: 0,
                },
                copy: self.copier.run(copy),
                loop_state,
                from_snapshot,
                commit,
                status,
                metrics,
            });
            return Ok(());
        }
        // The save in flight is written (and its copy freed) before this one's copy is made; waiting
        // for it is part of this save's stall.
        self.join()?;
        let copying = Instant::now();
        let (mut dcp, drained_bytes) = host_copy_of(&items, loan, lender)?;
        let snapshot_s = copying.elapsed().as_secs_f64();
        dcp.extend(loop_state);
        let job = Job {
            // The stall of a save that returns once committed is all of it (added in `wait`).
            timing: Timing {
                began,
                stall_s: began.elapsed().as_secs_f64(),
                snapshot_s,
                drained_bytes,
            },
            commit,
            dcp,
            sampler,
            status,
            metrics,
            run_record: Bytes::new(),
        };
        self.launch(job)?;
        if !background {
            self.wait()?;
            if let Some(r) = self.reports.last_mut() {
                r.stall_s = began.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }

    /// Before the optimizer changes the weights: waits for a copy in progress and hands it to the
    /// writer. Returns the seconds this blocked, if a copy was pending.
    pub(crate) fn before_update(&mut self) -> Result<Option<f64>> {
        let Some(staging) = self.staging.as_mut().filter(|s| !s.from_snapshot) else {
            return Ok(None);
        };
        // Blocked until the copy is done and the writer is free (the previous save committed).
        let started = Instant::now();
        staging.copy.wait();
        self.join()?;
        let blocked = started.elapsed().as_secs_f64();
        if let Some(s) = self.staging.as_mut() {
            s.timing.stall_s += blocked;
        }
        self.hand_over_staged()?;
        Ok(Some(blocked))
    }

    /// The loan of the host copy of the save just started with [`HostCopy::Lend`], once.
    pub(crate) fn lent_copy(&mut self) -> Option<CopyLoan> {
        self.lent.take()
    }

    /// Whether a save is being copied or written (a step run now overlaps it).
    pub(crate) fn busy(&self) -> bool {
        self.staging.is_some() || self.inflight.is_some()
    }

    /// The saves committed since the last call, with what each cost.
    pub(crate) fn take_committed(&mut self) -> Vec<SaveReport> {
        std::mem::take(&mut self.reports)
    }

    /// Fails if the save in flight has failed, and hands a finished copy from a snapshot to the
    /// writer once it is free; never waits.
    pub(crate) fn check(&mut self) -> Result<()> {
        if self.inflight.as_mut().is_some_and(|h| h.is_finished()) {
            self.join()?;
        }
        let copied = self
            .staging
            .as_mut()
            .is_some_and(|s| s.from_snapshot && s.copy.is_finished());
        if copied && self.inflight.is_none() {
            self.hand_over_staged()?;
        }
        Ok(())
    }

    /// Waits until every save started so far is committed (or has failed).
    pub(crate) fn wait(&mut self) -> Result<()> {
        self.hand_over_staged()?;
        self.join()
    }

    /// When the run ends early (an error): waits for the save already writing, so that its commit
    /// (and the `status.json` it writes) lands before the failure is recorded; a copy only staged is
    /// dropped, not written — the run is failing.
    pub(crate) fn finish_inflight(&mut self) -> Result<()> {
        self.staging = None;
        self.join()
    }

    /// When the run ends early with other ranks: lets the save in flight go without waiting for
    /// it (its commit needs every rank's share, and a rank that died never sends its own: waiting
    /// would hold this rank's exit, and so the job's restart, for the collective timeout). What it
    /// wrote stays uncommitted and is cleared by the next save of that step.
    pub(crate) fn abandon(&mut self) {
        self.abandoned
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.staging = None;
        self.inflight = None;
        self.copier.abandon();
        self.writer.abandon();
    }

    /// Bytes of this rank's part of the resumable state (what one save of it writes).
    pub(crate) fn share_bytes(&self, model: &Model, opt: &AdamW) -> u64 {
        self.my_items(model, opt)
            .iter()
            .map(|i| byte_size(&i.tensor) as u64)
            .sum()
    }

    /// This rank's part of the resumable state: all of it alone; else the replicated tensors it
    /// owns (spread by size) and its own slices of sharded ones (empty slices left out).
    fn my_items(&self, model: &Model, opt: &AdamW) -> Vec<StateItem> {
        let items = state_items(model, opt);
        if self.world == 1 {
            return items;
        }
        let (sliced, replicated): (Vec<StateItem>, Vec<StateItem>) =
            items.into_iter().partition(|i| i.offsets.is_some());
        let sizes: Vec<u64> = replicated
            .iter()
            .map(|i| byte_size(&i.tensor) as u64)
            .collect();
        let owners = dcp::assign_owners(&sizes, self.world);
        replicated
            .into_iter()
            .zip(owners)
            .filter(|(_, owner)| *owner == self.rank)
            .map(|(item, _)| item)
            .chain(sliced.into_iter().filter(|i| i.tensor.numel() > 0))
            .collect()
    }

    fn hand_over_staged(&mut self) -> Result<()> {
        let Some(s) = self.staging.take() else {
            return Ok(());
        };
        let (mut dcp, snapshot_s, drained_bytes) = s.copy.join()??;
        dcp.extend(s.loop_state);
        self.launch(Job {
            timing: Timing {
                snapshot_s,
                drained_bytes,
                ..s.timing
            },
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
        let (records, peers, quiet) = (self.records.clone(), self.peers.clone(), self.quiet);
        let abandoned = self.abandoned.clone();
        let (done, written) = std::sync::mpsc::channel::<()>();
        self.written = Some(written);
        self.inflight = Some(self.writer.run(move || {
            // `job` (the host copy) is dropped by the time `write` returns; then `done` closes.
            let result = write(&manager, &records, quiet, &handle, &peers, &abandoned, job);
            drop(done);
            result
        }));
        Ok(())
    }

    fn join(&mut self) -> Result<()> {
        if let Some(h) = self.inflight.take() {
            let done = h.join()??;
            // The save's host copy is gone: its memory goes back to the system.
            release_freed();
            self.chain = match done.sampler {
                Some(SamplerWritten::Delta) => self.chain.map(|c| SamplerChain {
                    deltas: c.deltas + 1,
                    ..c
                }),
                Some(SamplerWritten::Full) => Some(SamplerChain {
                    base: StepName::new(done.step),
                    deltas: 0,
                }),
                None => self.chain,
            };
            self.reports.push(SaveReport {
                checkpoint: done.name.clone(),
                step: done.step,
                stall_s: done.timing.stall_s,
                snapshot_s: done.timing.snapshot_s,
                drained_bytes: done.timing.drained_bytes,
                upload_s: done.upload_s,
                commit_latency_s: done
                    .committed_at
                    .duration_since(done.timing.began)
                    .as_secs_f64(),
                // The loop knows the steps that ran meanwhile.
                overlap_steps: 0,
                overlap_slowdown: None,
            });
            self.committed = Some(done.name);
        }
        Ok(())
    }
}

/// The host copy of `items`, drawing on `loan` (a borrowed copy) and handed on to `lender`'s
/// borrower once made; with the bytes taken from the loan.
fn host_copy_of(
    items: &[StateItem],
    loan: Option<CopyLoan>,
    lender: Option<CopyLender>,
) -> Result<(Vec<Blob>, u64)> {
    let (copy, drained) = copy_to_host_drawing_on(items, loan)?;
    if let Some(lender) = lender {
        lender.send(&copy);
    }
    Ok((copy, drained))
}

/// What sampler part a committed save held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SamplerWritten {
    /// Full weights (or a PEFT adapter): a base.
    Full,
    /// A delta over a base.
    Delta,
}

/// A committed save, as the write thread reports it.
struct Committed {
    name: String,
    step: u64,
    sampler: Option<SamplerWritten>,
    timing: Timing,
    upload_s: f64,
    committed_at: Instant,
}

/// This rank's part of a save, by the one protocol of the checkpoint crate (rank 0 commits; one rank
/// alone is the trivial case). Rank 0 writes `logs/metrics.jsonl` first and `status.json` after the
/// commit. Every rank returns the committed checkpoint or the save's error.
fn write(
    manager: &CheckpointManager,
    records: &RunRecords,
    quiet: bool,
    handle: &Handle,
    peers: &Mutex<Box<dyn Peers + Send>>,
    abandoned: &std::sync::atomic::AtomicBool,
    job: Job,
) -> Result<Committed> {
    let mut peers = peers.lock().unwrap_or_else(|e| e.into_inner());
    let rank = peers.rank();
    let name = StepName::new(job.commit.step).to_string();
    let timing = job.timing;
    handle.block_on(async {
        if rank == 0 {
            records.write_metrics(job.metrics).await?;
        }
        let request = SaveRequest {
            commit: job.commit,
            dcp: (!job.dcp.is_empty()).then_some(job.dcp),
            sampler: job.sampler,
        };
        let started = Instant::now();
        // One try: every storage call inside is already retried within the storage budget
        // (waypoint_storage::RetryPolicy), and a commit whose answer was lost is recognised there.
        let manifest = manager
            .save_with(&mut **peers, request)
            .await
            .with_context(|| format!("saving checkpoint {name} failed"))?;
        let secs = started.elapsed().as_secs_f64();
        // (A save the run let go as it failed commits, but the failure owns `status.json`.)
        if rank == 0 && !abandoned.load(std::sync::atomic::Ordering::SeqCst) {
            records
                .committed(job.status, &job.run_record, &manifest.name, secs)
                .await?;
        }
        // (The memory tier commits every step: a debug line.)
        if !quiet {
            tracing::info!(rank, checkpoint = %manifest.name, kinds = ?manifest.kinds, secs, "checkpoint committed");
        } else {
            tracing::debug!(rank, checkpoint = %manifest.name, secs, "memory-tier checkpoint committed");
        }
        let sampler = match (manifest.sampler_files().next(), &manifest.delta_base) {
            (None, _) => None,
            (Some(_), Some(_)) => Some(SamplerWritten::Delta),
            (Some(_), None) => Some(SamplerWritten::Full),
        };
        Ok(Committed {
            name: manifest.name,
            step: manifest.step,
            sampler,
            timing,
            upload_s: secs,
            committed_at: Instant::now(),
        })
    })
}

/// The other ranks of a save, over a store connection of their own ([`SideChannel`]), so that the
/// save's collectives never interleave with the training loop's.
struct SidePeers {
    side: SideChannel,
    rank: u32,
    world: u32,
    /// What this saver's keys are under (the durable and the memory tier save the same steps).
    channel: &'static str,
}

impl Peers for SidePeers {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world(&self) -> u32 {
        self.world
    }

    fn barrier(&mut self, name: &str) -> waypoint_checkpoint::Result<()> {
        let key = format!("{}/{name}", self.channel);
        self.side.barrier(&key).map_err(|e| peers_error(name, e))
    }

    fn all_gather(&mut self, name: &str, data: &[u8]) -> waypoint_checkpoint::Result<Vec<Vec<u8>>> {
        let key = format!("{}/{name}", self.channel);
        self.side
            .all_gather(&key, data)
            .map_err(|e| peers_error(name, e))
    }

    fn broadcast(&mut self, name: &str, data: &[u8]) -> waypoint_checkpoint::Result<Vec<u8>> {
        let key = format!("{}/{name}", self.channel);
        self.side
            .broadcast(&key, data)
            .map_err(|e| peers_error(name, e))
    }
}

fn peers_error(op: &str, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Peers {
        op: op.to_string(),
        reason: e.to_string(),
    }
}

/// Hands the memory freed in every malloc arena back to the system (glibc's `malloc_trim`; nothing
/// elsewhere). A save's host copy is made on the copy thread, in that thread's arena, and freed on
/// the write thread: glibc keeps the freed chunks of an arena for that arena alone (a chunk below
/// its mmap threshold, which grows up to 32 MiB as such chunks are freed), so without this the
/// process would hold a dead copy beside the next one made on another thread — twice what the
/// memory plan counts. Called once a save is written: a few milliseconds a save.
fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::Device;

    /// Resident memory of this process, from `/proc/self/status`.
    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// 1,000 consecutive async saves of a small state in one process (PyTorch's `async_save` leaks
    /// here: pytorch#170163): resident memory grows by at most 16 MiB over them. The state is the
    /// built-in tiny model with its AdamW state (about 1 MiB); retention keeps the store small.
    #[test]
    fn a_thousand_async_saves_do_not_leak() {
        use crate::model::{Model, ModelConfig};
        use crate::optim::{AdamW, AdamWConfig};
        use waypoint_checkpoint::{ManagerOptions, RunLayout};
        use waypoint_observe::records::{JobState, RunRecords, Status};

        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store =
            waypoint_checkpoint::storage::Store::open(dir.path().to_str().unwrap()).unwrap();
        let layout = RunLayout::new("leak", "hf").unwrap();
        let mut manager = CheckpointManager::new(
            store.clone(),
            layout.clone(),
            ManagerOptions {
                keep_last: Some(2),
                ..Default::default()
            },
        );
        rt.block_on(manager.start_attempt(&json!({}))).unwrap();
        let env = waypoint_launch::WorkerEnv::from_lookup(|_| None).unwrap();
        let ranks = Ranks::join(&env, std::time::Duration::from_secs(5), Device::Cpu).unwrap();
        let mut saver = Saver::new(
            Arc::new(manager),
            RunRecords::new(store, layout),
            &ranks,
            rt.handle().clone(),
            Bytes::new(),
            SaverTier::Durable,
        )
        .unwrap();
        let model = {
            // Seeds and draws from libtorch's process-wide generator: in turn with the other tests.
            let _turn = crate::model::tests::seeded();
            Model::init(ModelConfig::tiny(), 0, Device::Cpu).unwrap()
        };
        let opt = AdamW::new(
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            model.trainable(),
        );
        let ctx = SaveContext {
            fingerprint: "0".repeat(64),
            sampler_dtype: waypoint_config::SamplerDtype::Bf16,
            tokenizer_files: Vec::new(),
            model_id: "tiny".into(),
            n_samples: 1_000_000,
            sampler_base_every: 0,
            training: json!({}),
        };
        let (warm_up, saves) = (100u64, 1_000u64);
        let mut before = 0;
        for step in 1..=warm_up + saves {
            if step == warm_up + 1 {
                saver.wait().unwrap();
                before = rss_bytes();
            }
            saver
                .save(SaveOrder {
                    model: &model,
                    opt: &opt,
                    ctx: &ctx,
                    commit: ctx.commit(step, step, 1),
                    resumable: true,
                    promotable: false,
                    delta_ok: false,
                    status: Status::new(JobState::Running, step, warm_up + saves),
                    metrics: String::new(),
                    background: true,
                    share: None,
                    loop_state: LoopState {
                        step,
                        data_consumed: step,
                        epoch: 0,
                        tokens_seen: step,
                        base_lrs: vec![1e-3],
                        last_lrs: vec![1e-3],
                        seed: 0,
                        next_step_seed: 0,
                    },
                    host_copy: HostCopy::Own,
                })
                .unwrap();
            saver.before_update().unwrap();
            saver.check().unwrap();
            if step % 100 == 0 && std::env::var("WAYPOINT_RSS_TRACE").is_ok() {
                eprintln!(
                    "step {step}: RSS {:.1} MiB",
                    rss_bytes() as f64 / (1 << 20) as f64
                );
            }
        }
        saver.wait().unwrap();
        let after = rss_bytes();
        assert_eq!(
            saver.committed.as_deref(),
            Some(StepName::new(warm_up + saves).to_string().as_str())
        );
        let growth = after.saturating_sub(before) as f64 / (1 << 20) as f64;
        println!(
            "RSS over {saves} async saves: {:.1} MiB -> {:.1} MiB, growth {growth:.2} MiB (limit 16)",
            before as f64 / (1 << 20) as f64,
            after as f64 / (1 << 20) as f64
        );
        assert!(before > 0, "VmRSS unreadable");
        assert!(
            growth <= 16.0,
            "RSS grew {growth:.2} MiB over {saves} saves"
        );
    }
}
