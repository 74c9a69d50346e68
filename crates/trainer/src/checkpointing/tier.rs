//! The node's memory tier: the resumable state saved every `--memory_save_steps` steps to a tmpfs
//! (`--memory_tier_dir`, default `/dev/shm/waypoint`) that outlives the worker, so a crashed or
//! killed worker resumes having redone at most that many steps, without reading object storage.
//!
//! It is the durable tier's format on a local store — the same `step-XXXXXX` names, manifests with
//! their digests (CRC32C here, `crc32c:…`, at about ten times sha256's speed; see
//! `waypoint_storage::digest`), create-only commits, attempts and retention (the newest 2) — written by a second
//! [`Saver`] of its own, so one discovery/verify/load path reads both tiers. Nothing of it ever
//! fails training: a tier that cannot be opened, or a save that fails, turns the tier off with a
//! warning, and the durable tier goes on alone. A finished run removes its folder, and so does one
//! stopped by a signal once its step is durable.
//!
//! Each node's tier is its own: the node's ranks split the state among them and the node's local
//! rank 0 commits it there ([`SaverTier::Memory`]), so with several nodes every node holds a whole
//! checkpoint of the replicated state, and a restart resumes from the newest step every node has.
//! A state sharded over the ranks of several nodes (`--sharding optimizer|full`) leaves each node's
//! tier holding its own ranks' shards (and the replicated tensors): a restart of the same ranks on
//! the same nodes resumes from the tiers, each rank reading its rows from its node's; the folder
//! is named after the world size, the node's first rank and its ranks ([`Shards`]), so any other
//! set of ranks (another world size, other ranks a node) finds none of its own. After each commit
//! the node's shards go to the next node's tier too, kept there under this node's folder name
//! ([`replica`](super::replica)): a replaced node, its tier empty, receives them back from there at
//! the restart. LoRA cut that way keeps the tier off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use waypoint_checkpoint::{CheckpointManager, ManagerOptions, RunLayout};
use waypoint_config::CheckpointSection;
use waypoint_storage::digest::Checksum;
use waypoint_storage::{Store, StoreOptions};

use waypoint_observe::records::RunRecords;

use crate::checkpointing::peer::free_bytes;
pub(crate) use crate::checkpointing::peer::NodePlace;
use crate::checkpointing::replica::{self, Replicas};
use crate::checkpointing::saver::{SaveOrder, Saver, SaverTier};
use crate::checkpointing::state::CopyLoan;
use crate::collective::ranks::Ranks;

/// Memory-tier checkpoints kept (the newest 2: one may be half-written when a worker dies).
pub(crate) const KEEP: usize = 2;

/// This run's folder in the tier: `<tier>/<run_id>-<12 hex digits of sha256 of the run's URI>`, so
/// that runs of the same name under different bases never meet; for a node holding only its ranks'
/// shards, `…-w<world>-r<first rank>-l<its ranks>`, so that only the same ranks read it again.
pub(crate) fn run_folder(
    tier: &Path,
    run_uri: &str,
    run_id: &str,
    shards: Option<Shards>,
) -> PathBuf {
    let digest = hex::encode(Sha256::digest(run_uri.as_bytes()));
    let owner = shards.map_or(String::new(), |s| {
        format!("-w{}-r{}-l{}", s.world, s.first_rank, s.local_world)
    });
    tier.join(format!("{run_id}-{}{owner}", &digest[..12]))
}

/// Whether `name`, a folder in the tier, is one of this run's: the run's folder (`base`, named by
/// [`run_folder`] without shards) or one of its nodes' shard folders (`<base>-w…`).
fn is_folder_of_run(name: &str, base: &str) -> bool {
    name == base
        || name
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix("-w"))
            .is_some_and(|rest| rest.split_once("-r").is_some())
}

/// A node's tier that holds only its own ranks' shards of a state sharded over several nodes: the
/// ranks whose rows it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shards {
    /// The job's ranks.
    pub world: u32,
    /// The node's first rank.
    pub first_rank: u32,
    /// The node's ranks (from `first_rank` on).
    pub local_world: u32,
}

/// Whether a node's tier holds only its ranks' shards: the state is sharded over the ranks
/// (`sharded`) of several nodes.
pub(crate) fn shards_of(place: NodePlace, world: u32, sharded: bool) -> Option<Shards> {
    let nodes = world / place.local_world.max(1);
    (sharded && nodes > 1).then_some(Shards {
        world,
        first_rank: place.node * place.local_world,
        local_world: place.local_world,
    })
}

/// Why the tier is off for this start, when it is (a line for the log), else `None`: asked off,
/// or LoRA whose optimizer state is cut by rank over several nodes (`shards`): a LoRA resume
/// reads whole tensors, which no node's tier holds then.
pub(crate) fn off_because(
    section: &CheckpointSection,
    shards: Option<Shards>,
    lora: bool,
) -> Option<String> {
    if section.memory_save_steps == 0 {
        return Some("--memory_save_steps 0".into());
    }
    (shards.is_some() && lora).then(|| {
        "LoRA with --sharding over several nodes: the adapters' optimizer state is cut by rank \
         and a node's tier would hold only its ranks' rows, which a LoRA resume does not read; \
         the durable tier goes on alone"
            .into()
    })
}

/// The memory tier of this rank's node, for this run.
pub(crate) struct MemoryTier {
    /// The tier's checkpoints (a local store at [`MemoryTier::folder`]).
    pub(crate) manager: CheckpointManager,
    folder: PathBuf,
    every: u64,
    saver: Option<Saver>,
    /// Whether the tier was found to have room for its checkpoints (before the first save).
    room_checked: bool,
    /// The tier is on for every rank: the ranks agree on it (at the start, the room check, and
    /// each due step), so that they all take the same collectives; a rank whose own saver failed
    /// says so at the next due step and the tier goes off everywhere.
    on: bool,
    /// Where this rank is among the nodes (the node's ranks share the tier).
    place: NodePlace,
    /// Set when the node's checkpoints hold only its ranks' shards.
    shards: Option<Shards>,
    /// The job's ranks.
    world: u32,
    /// The run's folder named without shards (the stem of every folder of the run in the tier).
    run_base: PathBuf,
    /// With shards: the previous node's folder in this node's tier, where its replicas are kept.
    replica: Option<PathBuf>,
    /// The nodes send their commits to the next node (agreed by every rank).
    replicating: bool,
    /// This node's end of the ring (on its local rank 0).
    replicas: Option<Replicas>,
}

impl MemoryTier {
    /// Lets the tier's save in flight go without waiting for it (see [`Saver::abandon`]).
    pub(crate) fn abandon(&mut self) {
        if let Some(saver) = &mut self.saver {
            saver.abandon();
        }
    }

    /// Opens (creating) this run's folder in the tier at `section.memory_tier_dir`, shared by the
    /// ranks of this rank's node (`place`); `None`, with the reason logged, when it cannot be used
    /// (missing, read-only, full).
    pub(crate) fn open(
        section: &CheckpointSection,
        layout: &RunLayout,
        run_uri: &str,
        place: NodePlace,
        world: u32,
        shards: Option<Shards>,
    ) -> Option<Self> {
        let tier = Path::new(&section.memory_tier_dir);
        let folder = run_folder(tier, run_uri, layout.run_id(), shards);
        let run_base = run_folder(tier, run_uri, layout.run_id(), None);
        // The previous node's shards are kept under its folder's name.
        let replica = shards.map(|s| {
            let nodes = (s.world / s.local_world.max(1)).max(1);
            let previous = (place.node + nodes - 1) % nodes;
            let of_previous = Shards {
                first_rank: previous * s.local_world,
                ..s
            };
            run_folder(tier, run_uri, layout.run_id(), Some(of_previous))
        });
        match Self::try_open(&folder, layout) {
            Ok(manager) => Some(Self {
                manager,
                folder,
                every: section.memory_save_steps,
                saver: None,
                room_checked: false,
                on: false,
                place,
                shards,
                world,
                run_base,
                replica,
                replicating: false,
                replicas: None,
            }),
            Err(e) => {
                tracing::warn!(
                    folder = %folder.display(),
                    "the memory tier is off: {e:#}; set --memory_tier_dir to a writable tmpfs, or \
                     --memory_save_steps 0. Training goes on with the durable tier alone"
                );
                None
            }
        }
    }

    fn try_open(folder: &Path, layout: &RunLayout) -> Result<CheckpointManager> {
        use std::os::unix::fs::PermissionsExt;
        let root = folder.parent().filter(|r| !r.exists());
        std::fs::create_dir_all(folder)
            .with_context(|| format!("creating {}", folder.display()))?;
        // The tier's root, when this run made it, is shared like /tmp (every user's runs make
        // their folders in it); a run's folder — its weights and optimizer state — is its owner's.
        if let Some(root) = root {
            let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o1777));
        }
        std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} its owner's alone", folder.display()))?;
        // Writable, with room for a small file at least.
        let probe = folder.join(format!(".probe-{}", std::process::id()));
        std::fs::write(&probe, b"waypoint")
            .with_context(|| format!("writing {}", probe.display()))?;
        let _ = std::fs::remove_file(&probe);
        let uri = folder
            .to_str()
            .context("the memory tier's path is not UTF-8")?;
        // CRC32C, not sha256: hashing bounds a verified write or read of a tmpfs (see
        // docs/memory-tier.md for the figures); a durable save hashes with sha256 as ever.
        let store = Store::open_with(
            uri,
            StoreOptions {
                checksum: Checksum::Crc32c,
                ..StoreOptions::default()
            },
        )?;
        Ok(CheckpointManager::new(
            store,
            layout.clone(),
            ManagerOptions {
                keep_last: Some(KEEP),
                quiet: true,
                ..ManagerOptions::default()
            },
        ))
    }

    /// Starts saving (once this attempt owns the run): each node's local rank 0 takes its tier's
    /// attempt (`attempt`, the durable tier's number, is recorded in it), then every rank opens its
    /// saver. Off, with a warning, when that fails; every rank learns of a failure anywhere, so all
    /// save or none do. With shards, the nodes then start sending their commits to the next node
    /// (each copy bounded by `timeout`), unless any cannot.
    pub(crate) fn start_saving(
        &mut self,
        attempt: u64,
        ranks: &Ranks,
        handle: &Handle,
        timeout: std::time::Duration,
    ) -> Result<()> {
        let started = if self.place.local_rank == 0 {
            let info = serde_json::json!({"durable_attempt": attempt});
            handle
                .block_on(self.manager.start_attempt(&info))
                .map(|_| ())
                .map_err(anyhow::Error::from)
        } else {
            Ok(())
        };
        let failed = ranks.any("memory-tier-attempt", started.is_err())?;
        if let Err(e) = started {
            self.off(&e);
            return Ok(());
        }
        if failed {
            return Ok(());
        }
        let records = RunRecords::new(self.manager.store().clone(), self.manager.layout().clone());
        let saver = Saver::new(
            Arc::new(self.manager.clone()),
            records,
            ranks,
            handle.clone(),
            Bytes::new(),
            SaverTier::Memory {
                node: self.place.node,
                local_rank: self.place.local_rank,
                local_world: self.place.local_world,
            },
        );
        let failed = ranks.any("memory-tier-saver", saver.is_err())?;
        match saver {
            Ok(s) if !failed => {
                self.saver = Some(s);
                self.on = true;
            }
            Ok(_) => tracing::warn!(
                "the memory tier is off: another rank could not open its saver; the durable tier \
                 goes on alone"
            ),
            Err(e) => self.off(&e),
        }
        if let (true, Some(replica)) = (self.on, &self.replica) {
            let head = self.commits_here();
            let folders = replica::Folders {
                own: self.folder.clone(),
                replica: replica.clone(),
                layout: self.manager.layout().clone(),
                keep: KEEP,
                timeout,
            };
            self.replicas = Replicas::start(ranks, self.place, folders)?;
            let off = ranks.any("memory-tier-replicas", head && self.replicas.is_none())?;
            self.replicating = !off;
            if off {
                self.stop_replicas();
            }
        }
        Ok(())
    }

    fn stop_replicas(&mut self) {
        if let Some(r) = self.replicas.take() {
            r.stop();
        }
    }

    /// With shards: the previous node's folder in this node's tier, where its replicas are kept.
    pub(crate) fn replica_folder(&self) -> Option<&Path> {
        self.replica.as_deref()
    }

    /// The steps of the previous node's shards this node keeps, newest first (with shards, on the
    /// node's local rank 0; empty elsewhere).
    pub(crate) fn replica_steps(&self) -> Vec<u64> {
        match (&self.replica, self.commits_here()) {
            (Some(folder), true) => replica::committed_in(folder, self.manager.layout())
                .into_iter()
                .take(KEEP)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// At a due step: whether every rank saves now. All ranks agree: when any rank's tier failed
    /// since (its saver gone), it is off on every rank from here; when any is still writing the
    /// last save, no rank saves this step (a save is all ranks' or none's).
    pub(crate) fn agree_to_save(&mut self, ranks: &Ranks, step: u64) -> Result<bool> {
        let mine = [u8::from(self.busy()), u8::from(self.saver.is_none())];
        let all = ranks.all_gather("memory-tier-state", &mine)?;
        if all.iter().any(|m| m.get(1).is_some_and(|&off| off != 0)) {
            if self.saver.is_some() {
                tracing::warn!(
                    "the memory tier is off from here on: it failed on another rank; the durable \
                     tier goes on alone"
                );
            }
            self.saver = None;
            self.on = false;
            return Ok(false);
        }
        let busy = all.iter().any(|m| m.first().is_some_and(|&b| b != 0));
        if busy {
            tracing::debug!(
                step,
                "the memory tier is still writing; not saved this step"
            );
        }
        Ok(!busy)
    }

    /// This run's folder in the tier on this node (the root of its store).
    pub(crate) fn folder(&self) -> &Path {
        &self.folder
    }

    /// Whether this rank's tier copy holds every tensor of its durable share, so that a durable
    /// save of the same step can take it all from the tier's copy: one node (both split the state
    /// over the same ranks alike), or one rank a node (the tier's copy is the whole node part).
    /// Otherwise a borrowing durable save would still copy much of its share itself, after
    /// waiting for the tier's copy: it does not borrow.
    pub(crate) fn copy_holds_the_durable_share(&self) -> bool {
        self.place.local_world == 1 || self.place.local_world == self.world
    }

    /// Whether the node's checkpoints hold only its ranks' shards (no other node's can stand in
    /// for them).
    pub(crate) fn holds_own_shards_only(&self) -> bool {
        self.shards.is_some()
    }

    /// Whether this rank commits its node's tier (the node's local rank 0).
    pub(crate) fn commits_here(&self) -> bool {
        self.place.local_rank == 0
    }

    /// Whether a save is being copied or written.
    fn busy(&self) -> bool {
        self.saver.as_ref().is_some_and(Saver::busy)
    }

    /// Whether step `step` (of `total`) is one the tier saves (the final step is the durable
    /// tier's).
    pub(crate) fn due(&self, step: u64, total: u64) -> bool {
        self.on && self.every > 0 && step % self.every == 0 && step < total
    }

    /// Before the first save: whether the tier's filesystem has room for the checkpoints it keeps
    /// and the one being written (`KEEP + 1` of the node's state: this rank's share of the node's
    /// checkpoint, times the node's ranks); when not, the tier is off with the figures and what to
    /// do. Every rank decides alike (a tmpfs counts against the node's RAM: it must not fill it).
    pub(crate) fn check_room(
        &mut self,
        model: &crate::model::Model,
        opt: &crate::optim::AdamW,
        ranks: &Ranks,
    ) -> Result<()> {
        if self.room_checked || !self.on {
            return Ok(());
        }
        self.room_checked = true;
        // This rank's share of the node's checkpoint (the tier's own split over the node's ranks).
        let rank_bytes = self.saver.as_ref().map_or(0, |s| s.share_bytes(model, opt));
        let need = rank_bytes * u64::from(self.place.local_world.max(1)) * (KEEP as u64 + 1);
        let free = free_bytes(&self.folder);
        let short = free.is_some_and(|free| free < need);
        // The previous node's replicas take about as much again.
        let short_for_replicas = self.replicating && free.is_some_and(|free| free < 2 * need);
        if ranks.any("memory-tier-room-replicas", short_for_replicas)? {
            if ranks.is_main() {
                tracing::warn!(
                    folder = %self.folder.display(),
                    "the memory tier keeps no replicas between nodes: with the previous node's \
                     shards it needs {:.2} GiB and its filesystem has {:.2} GiB free on some node; \
                     a replaced node resumes from the durable tier. Give the tmpfs more room to \
                     keep them",
                    (2 * need) as f64 / (1u64 << 30) as f64,
                    free.unwrap_or(0) as f64 / (1u64 << 30) as f64,
                );
            }
            self.replicating = false;
            self.stop_replicas();
        }
        if ranks.any("memory-tier-room", short || self.saver.is_none())? {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            tracing::warn!(
                folder = %self.folder.display(),
                "the memory tier is off: it needs {:.2} GiB ({} checkpoints of the node's {:.2} GiB \
                 state) and its filesystem has {:.2} GiB free; give the tmpfs more room (e.g. a \
                 larger /dev/shm), point --memory_tier_dir elsewhere, or set --memory_save_steps 0. \
                 Training goes on with the durable tier alone",
                gib(need),
                KEEP + 1,
                gib(need / (KEEP as u64 + 1)),
                gib(free.unwrap_or(0)),
            );
            self.saver = None;
            self.on = false;
        }
        Ok(())
    }

    /// Saves in the background; a failure turns the tier off.
    pub(crate) fn save(&mut self, order: SaveOrder<'_>) {
        if let Some(Err(e)) = self.saver.as_mut().map(|s| s.save(order)) {
            self.off(&e);
        }
    }

    /// The loan of the host copy of the save just started with [`HostCopy::Lend`](crate::checkpointing::saver::HostCopy::Lend).
    pub(crate) fn lent_copy(&mut self) -> Option<CopyLoan> {
        self.saver.as_mut().and_then(Saver::lent_copy)
    }

    /// Before the optimizer changes the weights: waits for a copy in progress (seconds blocked).
    pub(crate) fn before_update(&mut self) -> Option<f64> {
        match self.saver.as_mut().map(Saver::before_update) {
            Some(Ok(blocked)) => blocked,
            Some(Err(e)) => {
                self.off(&e);
                None
            }
            None => None,
        }
    }

    /// Notices a finished write; a failure turns the tier off.
    pub(crate) fn check(&mut self) {
        if let Some(Err(e)) = self.saver.as_mut().map(Saver::check) {
            self.off(&e);
        }
        for report in self
            .saver
            .as_mut()
            .map(Saver::take_committed)
            .unwrap_or_default()
        {
            tracing::debug!(checkpoint = %report.checkpoint, "memory tier: {}", report.describe());
            if let Some(r) = &mut self.replicas {
                r.committed(report.step);
            }
        }
        if let Some(r) = &mut self.replicas {
            r.poll();
        }
    }

    /// Waits for the saves started so far (before the process ends).
    pub(crate) fn wait(&mut self) {
        if let Some(Err(e)) = self.saver.as_mut().map(Saver::wait) {
            self.off(&e);
        }
    }

    /// After the run finished: the run's folders in the node's tier are removed (nothing will
    /// resume from them) — its own, and those a sharded job left under other ranks (another world
    /// size, ranks given out in another order).
    pub(crate) fn remove(mut self) {
        self.wait();
        drop(self.saver.take());
        self.stop_replicas();
        let base = self.run_base.file_name().and_then(|n| n.to_str());
        let folders: Vec<PathBuf> = match (self.run_base.parent(), base) {
            (Some(tier), Some(base)) => std::fs::read_dir(tier)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| is_folder_of_run(n, base))
                })
                .map(|e| e.path())
                .collect(),
            _ => vec![self.folder.clone()],
        };
        for folder in folders {
            if let Err(e) = std::fs::remove_dir_all(&folder) {
                tracing::warn!(folder = %folder.display(), "could not remove the run's memory tier: {e}");
            }
        }
    }

    fn off(&mut self, e: &anyhow::Error) {
        tracing::warn!(
            "the memory tier is off from here on: {}; the durable tier goes on alone",
            waypoint_observe::explain(e)
        );
        self.saver = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystems_free_bytes_are_read() {
        let free = free_bytes(Path::new("/")).expect("statvfs of /");
        assert!(free > 0);
        assert!(free_bytes(Path::new("/no/such/folder")).is_none());
    }

    #[test]
    fn each_run_has_a_folder_of_its_own() {
        let tier = Path::new("/dev/shm/waypoint");
        let a = run_folder(tier, "s3://a/runs/r/framework=waypoint", "r", None);
        let b = run_folder(tier, "s3://b/runs/r/framework=waypoint", "r", None);
        assert_ne!(a, b);
        assert!(a.starts_with(tier) && a.file_name().unwrap().to_str().unwrap().starts_with("r-"));
        assert_eq!(
            a,
            run_folder(tier, "s3://a/runs/r/framework=waypoint", "r", None)
        );
    }

    #[test]
    fn a_node_holding_its_own_shards_has_a_folder_of_its_ranks() {
        let place = |node| NodePlace {
            node,
            local_rank: 0,
            local_world: 2,
        };
        assert_eq!(
            shards_of(place(1), 4, false),
            None,
            "replicated: every node holds all"
        );
        assert_eq!(
            shards_of(place(0), 2, true),
            None,
            "one node holds every shard"
        );
        let one = shards_of(place(1), 4, true).unwrap();
        assert_eq!(
            one,
            Shards {
                world: 4,
                first_rank: 2,
                local_world: 2
            }
        );
        let tier = Path::new("/dev/shm/waypoint");
        let uri = "s3://a/runs/r/framework=waypoint";
        let folder = run_folder(tier, uri, "r", Some(one));
        assert!(
            folder.to_str().unwrap().ends_with("-w4-r2-l2"),
            "{folder:?}"
        );
        // The same first rank and world with another number of ranks a node: other rows.
        let narrower = Shards {
            local_world: 1,
            ..one
        };
        assert_ne!(folder, run_folder(tier, uri, "r", Some(narrower)));
        // Another world size, or the node's ranks moved: another folder (found empty).
        let other = shards_of(place(0), 4, true);
        assert_ne!(folder, run_folder(tier, uri, "r", other));
        let wider = shards_of(place(1), 6, true);
        assert_ne!(folder, run_folder(tier, uri, "r", wider));
        // The run's folders, whatever their ranks; not another run's whose name extends it.
        let base = run_folder(tier, uri, "r", None);
        let base = base.file_name().unwrap().to_str().unwrap();
        for f in [
            folder.clone(),
            run_folder(tier, uri, "r", wider),
            tier.join(base),
        ] {
            assert!(
                is_folder_of_run(f.file_name().unwrap().to_str().unwrap(), base),
                "{f:?}"
            );
        }
        assert!(!is_folder_of_run(&format!("{base}x"), base));
        assert!(!is_folder_of_run(&format!("{base}-world"), base));
        let other = run_folder(tier, uri, "r-2", None);
        assert!(!is_folder_of_run(
            other.file_name().unwrap().to_str().unwrap(),
            base
        ));
    }

    #[test]
    fn the_tier_is_on_by_default_and_off_when_asked() {
        let mut section = waypoint_config::TrainConfig::default().checkpoint();
        assert_eq!(section.memory_save_steps, 1, "on by default, every step");
        assert!(off_because(&section, None, false).is_none());
        assert!(
            off_because(&section, None, true).is_none(),
            "LoRA on one node"
        );
        let shards = Some(Shards {
            world: 4,
            first_rank: 2,
            local_world: 2,
        });
        assert!(off_because(&section, shards, false).is_none());
        assert!(off_because(&section, shards, true)
            .unwrap()
            .contains("LoRA"));
        section.memory_save_steps = 0;
        assert!(off_because(&section, None, false).is_some());
    }
}
