//! Save-time replicas of a node's shards: with the state sharded over several nodes, each node's
//! memory tier holds only its own ranks' shards, so a node lost for good would take them with it.
//! After each commit to its tier, the node's local rank 0 streams the checkpoint over TCP to the
//! next node in the ring (node `n` to node `n + 1`, the last to the first), whose local rank 0
//! keeps it in its own tier under the sender's folder name — as many as the sender's tier keeps. A replaced node, its tier empty, then receives its shards back from that node at the
//! restart ([`peer::replica_plan`], [`peer::carry_out`]).
//!
//! Nothing here ever fails training: a send that fails is named once in the log (the next commit
//! is sent again), a copy cut short leaves nothing of its step behind, and the receiver only takes
//! connections from the previous node's address carrying the token this node published through the
//! store. A commit made while the previous one is still being sent is not queued: the newest is
//! sent next.
//!
//! [`peer::replica_plan`]: super::peer::replica_plan
//! [`peer::carry_out`]: super::peer::carry_out

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use waypoint_checkpoint::{Manifest, RunLayout, StepName};

use super::peer::{self, NodePlace};
use crate::collective::ranks::Ranks;

/// The steps committed (with a manifest) in the tier folder `folder`, newest first.
pub(crate) fn committed_in(folder: &Path, layout: &RunLayout) -> Vec<u64> {
    let mut steps: Vec<u64> = entries_by_step(folder, layout)
        .filter(|(_, path, _)| path.is_file())
        .map(|(step, _, _)| step)
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    steps
}

/// The manifest of `step` in the tier folder `folder`, when it is committed there.
pub(crate) fn manifest_in(folder: &Path, layout: &RunLayout, step: u64) -> Option<Manifest> {
    let key = layout.manifest(StepName::new(step));
    let bytes = std::fs::read(folder.join(&key)).ok()?;
    Manifest::parse(&key, &bytes).ok()
}

/// The entries of `folder`'s checkpoints: (step, path, whether it is the manifest).
fn entries_by_step(
    folder: &Path,
    layout: &RunLayout,
) -> impl Iterator<Item = (u64, PathBuf, bool)> {
    std::fs::read_dir(folder.join(layout.checkpoints_dir()))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let (stem, manifest) = match name.strip_suffix(".json") {
                Some(stem) => (stem.to_string(), true),
                None => (name, false),
            };
            let step = stem.parse::<StepName>().ok()?.step();
            Some((step, e.path(), manifest))
        })
}

/// Keeps the newest `keep` committed checkpoints of `folder` and removes every other checkpoint's
/// files (older ones, and any left without a manifest).
pub(crate) fn prune(folder: &Path, layout: &RunLayout, keep: usize) {
    let kept: Vec<u64> = committed_in(folder, layout)
        .into_iter()
        .take(keep)
        .collect();
    let mut gone: Vec<(u64, PathBuf, bool)> = entries_by_step(folder, layout)
        .filter(|(step, _, _)| !kept.contains(step))
        .collect();
    // Every manifest first: a checkpoint half removed is never one.
    gone.sort_by_key(|(_, _, manifest)| !*manifest);
    for (_, path, manifest) in gone {
        let removed = match manifest {
            true => std::fs::remove_file(&path),
            false => std::fs::remove_dir_all(&path),
        };
        if let Err(e) = removed {
            tracing::debug!(path = %path.display(), "memory tier: could not remove a replica: {e}");
        }
    }
}

/// Where a node's end of the ring reads and writes, and its bounds.
#[derive(Debug, Clone)]
pub(crate) struct Folders {
    /// The tier's run folder on this node (what is sent).
    pub(crate) own: PathBuf,
    /// The previous node's folder in this node's tier (what is received).
    pub(crate) replica: PathBuf,
    /// The run's layout in both.
    pub(crate) layout: RunLayout,
    /// Checkpoints kept of the previous node's (as many as its tier keeps).
    pub(crate) keep: usize,
    /// How long one copy may take.
    pub(crate) timeout: Duration,
}

/// This node's side of the ring, on its local rank 0: the sender of its commits to the next node,
/// and the receiver of the previous node's.
pub(crate) struct Replicas {
    /// The next node's receiver: its address and token.
    to: (String, u64),
    next_node: u32,
    folders: Folders,
    sending: Option<JoinHandle<Result<u64>>>,
    /// The newest step committed and not yet sent.
    pending: Option<u64>,
    /// Whether a failed send was named in the log already.
    warned: bool,
    receiver: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Replicas {
    /// Starts the ring (every rank calls this, at the same point): each node's local rank 0 makes
    /// `replica` (the previous node's folder name in this node's tier), listens, and publishes its
    /// address and a token through the store. `Some` on each node's local rank 0 when every node
    /// could; `None` elsewhere, and everywhere (named in the log) when some node could not.
    pub(crate) fn start(ranks: &Ranks, place: NodePlace, folders: Folders) -> Result<Option<Self>> {
        let head = place.local_rank == 0;
        let local_world = place.local_world.max(1) as usize;
        let nodes = (ranks.world() as usize / local_world).max(1) as u32;
        let token = peer::token();
        let listening = match head {
            true => make_folder(&folders.replica)
                .and_then(|()| peer::listen(ranks))
                .map(Some),
            false => Ok(None),
        };
        let said = match &listening {
            Ok(Some(l)) => l
                .local_addr()
                .map(|a| format!("{a} {token}"))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let all = ranks.all_gather("memory-tier-replica-addr", said.as_bytes())?;
        let heads: Vec<String> = all
            .iter()
            .step_by(local_world)
            .map(|b| String::from_utf8_lossy(b).to_string())
            .collect();
        if let Err(e) = &listening {
            tracing::warn!(
                "the memory tier keeps no replica of another node's shards: {e:#}; a replaced \
                 node resumes from the durable tier"
            );
        }
        if heads.iter().any(String::is_empty) {
            if ranks.is_main() {
                tracing::warn!(
                    "the memory tier's replicas between nodes are off: a node could not take \
                     them (see its log); a replaced node resumes from the durable tier"
                );
            }
            return Ok(None);
        }
        let Ok(Some(listener)) = listening else {
            return Ok(None);
        };
        let started = Self::ring(place, nodes, token, &heads, listener, folders);
        if let Err(e) = &started {
            tracing::warn!(
                "the memory tier keeps no replica of another node's shards, nor sends its own: \
                 {e:#}; a replaced node resumes from the durable tier"
            );
        }
        Ok(started.ok())
    }

    /// This node's place in the ring, from every node's published address and token (`heads`).
    fn ring(
        place: NodePlace,
        nodes: u32,
        token: u64,
        heads: &[String],
        listener: TcpListener,
        folders: Folders,
    ) -> Result<Self> {
        let at = |n: u32| -> Result<(String, IpAddr, u64)> {
            let said = &heads[n as usize];
            let (addr, token) = said.split_once(' ').context("a node's replica address")?;
            let ip = addr
                .parse::<std::net::SocketAddr>()
                .context("a node's replica address")?
                .ip();
            Ok((addr.to_string(), ip, token.parse()?))
        };
        let next_node = (place.node + 1) % nodes;
        let previous_node = (place.node + nodes - 1) % nodes;
        let (addr, _, next_token) = at(next_node)?;
        let (_, previous_ip, _) = at(previous_node)?;
        let from = peer::Sender {
            from: previous_ip,
            token,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let receiving =
            receive_replicas(listener, from, folders.clone(), previous_node, stop.clone())?;
        Ok(Self {
            to: (addr, next_token),
            next_node,
            folders,
            sending: None,
            pending: None,
            warned: false,
            receiver: Some((stop, receiving)),
        })
    }

    /// Step `step` was committed to this node's tier: it is sent to the next node once the one
    /// being sent is through.
    pub(crate) fn committed(&mut self, step: u64) {
        self.pending = Some(self.pending.map_or(step, |p| p.max(step)));
        self.poll();
    }

    /// Notices a send that ended and starts the next; never waits.
    pub(crate) fn poll(&mut self) {
        if self.sending.as_ref().is_some_and(JoinHandle::is_finished) {
            self.join_sender();
        }
        if self.sending.is_some() {
            return;
        }
        let Some(step) = self.pending.take() else {
            return;
        };
        let Folders {
            own,
            layout,
            timeout,
            ..
        } = &self.folders;
        // Opened here, at once: the tier's retention may remove the step while it is sent.
        let outgoing = manifest_in(own, layout, step)
            .with_context(|| format!("step-{step:06} is gone from the tier"))
            .and_then(|m| peer::Outgoing::open(own, step, &peer::keys_of(own, layout, &m)));
        let outgoing = match outgoing {
            Ok(o) => o,
            Err(e) => return self.failed(&e),
        };
        let (addr, token, timeout) = (self.to.0.clone(), self.to.1, *timeout);
        let spawned = std::thread::Builder::new()
            .name("memory-tier-replica".into())
            .spawn(move || {
                peer::send(&addr, outgoing, token, timeout)?;
                Ok(step)
            });
        match spawned {
            Ok(h) => self.sending = Some(h),
            Err(e) => self.failed(&anyhow::Error::from(e)),
        }
    }

    fn join_sender(&mut self) {
        let Some(h) = self.sending.take() else {
            return;
        };
        match h.join() {
            Ok(Ok(step)) => tracing::debug!(
                step,
                node = self.next_node,
                "memory tier: a replica of this node's shards sent"
            ),
            Ok(Err(e)) => self.failed(&e),
            Err(_) => self.failed(&anyhow::anyhow!("the sending thread panicked")),
        }
    }

    fn failed(&mut self, e: &anyhow::Error) {
        if std::mem::replace(&mut self.warned, true) {
            tracing::debug!(
                "memory tier: a replica to node {} failed: {e:#}",
                self.next_node
            );
        } else {
            tracing::warn!(
                "the memory tier's replica of this node's shards to node {} failed: {e:#}; the \
                 next commit is sent again (until one arrives, a replaced node resumes from an \
                 older step or the durable tier)",
                self.next_node
            );
        }
    }

    /// Ends both sides: a send that ended is noticed, one in flight is let go (it reads files it
    /// opened; the next node may be gone and it would wait out its timeout); then the receiver
    /// stops once the copy it is taking (if any) is through, so that nothing is written after the
    /// run's folders are gone.
    pub(crate) fn stop(mut self) {
        if self.sending.as_ref().is_some_and(JoinHandle::is_finished) {
            self.join_sender();
        }
        drop(self.sending.take());
        if let Some((stop, receiving)) = self.receiver.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = receiving.join();
        }
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        // Not waited for: a process ending on an error lets them go.
        if let Some((stop, _)) = &self.receiver {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Makes the folder the previous node's replicas go to, its owner's alone.
fn make_folder(folder: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(folder).with_context(|| format!("creating {}", folder.display()))?;
    std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} its owner's alone", folder.display()))
}

/// The receiver's thread: takes each checkpoint node `previous_node` sends into the replica
/// folder, keeping the newest `keep`, until `stop`.
fn receive_replicas(
    listener: TcpListener,
    from: peer::Sender,
    folders: Folders,
    previous_node: u32,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    let Folders {
        replica: folder,
        layout,
        keep,
        timeout,
        ..
    } = folders;
    let run = move || loop {
        let keep_waiting = || !stop.load(Ordering::Relaxed);
        match peer::accept(&listener, &from, timeout, &keep_waiting) {
            Ok(None) => return,
            Ok(Some((stream, mut input))) => {
                match peer::receive(&stream, &mut input, &folder, &layout, None) {
                    Ok(step) => {
                        prune(&folder, &layout, keep);
                        tracing::debug!(
                            step,
                            node = previous_node,
                            "memory tier: a replica of that node's shards kept here"
                        );
                    }
                    Err(e) => tracing::debug!(
                        "memory tier: a replica from node {previous_node} was refused or cut \
                         short: {e:#}"
                    ),
                }
            }
            // A passing failure to accept (too many open files, a reset connection): the
            // receiver goes on.
            Err(e) => {
                tracing::debug!(
                    "memory tier: accepting a replica from node {previous_node}: {e:#}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    std::thread::Builder::new()
        .name("memory-tier-replicas-in".into())
        .spawn(run)
        .context("starting the memory tier's replica receiver")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(folder: &Path, layout: &RunLayout, step: u64, manifest: bool) {
        let name = StepName::new(step);
        let dir = folder.join(layout.dcp_dir(name));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.safetensors"), b"x").unwrap();
        if manifest {
            std::fs::write(folder.join(layout.manifest(name)), b"{}").unwrap();
        }
    }

    #[test]
    fn a_replica_folder_keeps_the_newest_committed_checkpoints_and_nothing_half_made() {
        let dir = tempfile::tempdir().unwrap();
        let layout = RunLayout::new("r", "waypoint").unwrap();
        for step in [4, 8, 12] {
            commit(dir.path(), &layout, step, true);
        }
        // A copy cut short: files without a manifest.
        commit(dir.path(), &layout, 16, false);
        assert_eq!(committed_in(dir.path(), &layout), [12, 8, 4]);
        prune(dir.path(), &layout, 2);
        assert_eq!(committed_in(dir.path(), &layout), [12, 8]);
        let left: Vec<u64> = entries_by_step(dir.path(), &layout)
            .map(|(s, _, _)| s)
            .collect();
        assert!(
            left.iter().all(|s| [8, 12].contains(s)),
            "older and half-made checkpoints are removed: {left:?}"
        );
        assert!(dir.path().join(layout.dcp_dir(StepName::new(8))).is_dir());
        assert!(committed_in(&dir.path().join("none"), &layout).is_empty());
    }
}
