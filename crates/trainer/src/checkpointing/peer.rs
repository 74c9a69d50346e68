//! Peer copies of the memory tier: a node whose tier lacks the newest checkpoint another node's tier
//! holds — a node started in place of a dead one, its tier empty, or one a save behind — receives it
//! from that node over TCP, node to node (not through the object store), before the job resumes.
//!
//! Every node's tier holds the node's own whole checkpoint of the replicated state (see [`tier`]),
//! so any node that has a step can give it. The policy ([`plan`]) is a pure function of each rank's
//! newest step: the newest step of all is resumed; the node of the lowest rank holding it gives it
//! (its local rank 0 sends), and every node lacking it receives it (its local rank 0 listens, its
//! address passed through the store). The files go as they are — the manifest last, so a copy cut
//! short is never a checkpoint — and the normal load path checks every blob's digest afterwards.
//!
//! A state sharded over several nodes leaves each node's tier holding only its own shards; the next
//! node keeps a replica of them ([`replica`]), and [`replica_plan`] gives a node lacking the step
//! its shards back from there, over the same wire.
//!
//! [`replica`]: crate::checkpointing::replica
//!
//! [`tier`]: crate::checkpointing::tier

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use waypoint_checkpoint::{Manifest, RunLayout, StepName};

use crate::collective::ranks::Ranks;

/// What the ranks do about the newest memory-tier step, from every rank's newest (`newest[r]`, 0
/// for none) and the node size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerPlan {
    /// The step to resume from the memory tier (0: none holds one).
    pub step: u64,
    /// The rank that sends it (a local rank 0 whose node holds it), when some node lacks it.
    pub giver: Option<u32>,
    /// The ranks that receive it (local ranks 0 of the nodes lacking it).
    pub takers: Vec<u32>,
}

/// The newest step every rank's node holds, of the steps each holds (`held[r]`); 0 for none.
pub(crate) fn newest_held_by_all(held: &[Vec<u64>]) -> u64 {
    let Some((first, rest)) = held.split_first() else {
        return 0;
    };
    first
        .iter()
        .copied()
        .filter(|s| rest.iter().all(|h| h.contains(s)))
        .max()
        .unwrap_or(0)
}

/// The plan for ranks whose nodes' newest tier steps are `newest` (`local_world` ranks a node, in
/// rank order).
pub(crate) fn plan(newest: &[u64], local_world: u32) -> PeerPlan {
    let step = newest.iter().copied().max().unwrap_or(0);
    let local_world = local_world.max(1) as usize;
    let heads: Vec<(u32, u64)> = newest
        .iter()
        .enumerate()
        .filter(|(r, _)| r % local_world == 0)
        .map(|(r, s)| (r as u32, *s))
        .collect();
    let takers: Vec<u32> = heads
        .iter()
        .filter(|(_, s)| *s != step)
        .map(|(r, _)| *r)
        .collect();
    let giver = (step > 0 && !takers.is_empty())
        .then(|| heads.iter().find(|(_, s)| *s == step).map(|(r, _)| *r))
        .flatten();
    PeerPlan {
        step,
        giver,
        takers: if giver.is_some() { takers } else { Vec::new() },
    }
}

/// What the nodes do when each node's tier holds only its own shards and the next node's tier a
/// replica of them (see [`replica`](super::replica)): the step to resume and, for each node lacking
/// it in its own tier, the node that gives it from the replica it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplicaPlan {
    /// The newest step every node holds or can receive (0: none).
    pub step: u64,
    /// (The node giving it from its replica, the node taking it into its own tier.)
    pub copies: Vec<(u32, u32)>,
}

/// The plan for nodes whose tiers hold `own[n]` (node `n`'s own steps) and `replicas[n]` (the
/// steps of node `n - 1`'s shards that node `n` keeps; the first node keeps the last's): the
/// newest step each node holds itself or can receive from the next node, copies only where a node
/// lacks it.
pub(crate) fn replica_plan(own: &[Vec<u64>], replicas: &[Vec<u64>]) -> ReplicaPlan {
    let nodes = own.len();
    let mut steps: Vec<u64> = own.iter().chain(replicas).flatten().copied().collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    for step in steps.into_iter().filter(|&s| s > 0) {
        let mut copies = Vec::new();
        let whole = (0..nodes).all(|n| {
            if own[n].contains(&step) {
                return true;
            }
            let keeper = (n + 1) % nodes;
            let kept = keeper != n && replicas.get(keeper).is_some_and(|r| r.contains(&step));
            if kept {
                copies.push((keeper as u32, n as u32));
            }
            kept
        });
        if whole {
            return ReplicaPlan { step, copies };
        }
    }
    ReplicaPlan {
        step: 0,
        copies: Vec::new(),
    }
}

/// The keys (under the tier's store, whose root is `folder`) of checkpoint `m` that a copy carries:
/// its files, the tier's tail of the metrics (the steps since the last durable save) when there is
/// one, then the manifest.
pub(crate) fn keys_of(folder: &Path, layout: &RunLayout, m: &Manifest) -> Vec<String> {
    let dir = layout.checkpoint_dir(m.step_name());
    let metrics = Some(layout.metrics()).filter(|k| folder.join(k).is_file());
    m.files
        .iter()
        .map(|f| format!("{dir}/{}", f.path))
        .chain(metrics)
        .chain([layout.manifest(m.step_name())])
        .collect()
}

/// Carries out `plan` on this rank: the giver sends its checkpoint of `plan.step` (read under
/// `send_from`: the tier's run root on this node, or the replica of another node's shards it
/// keeps) to every taker, each taker writes it under `receive_into` (its tier's run root); the
/// other ranks only wait. Every rank takes the same collectives whatever fails here, and returns the
/// same answer: whether every copy was made (a copy that failed is a warning; a collective that
/// failed is an error, as anywhere). A copy must end within `timeout` (the collective timeout: the
/// ranks not copying wait that long).
pub(crate) fn carry_out(
    plan: &PeerPlan,
    ranks: &Ranks,
    send_from: &Path,
    receive_into: &Path,
    layout: &RunLayout,
    manifest: Option<&Manifest>,
    timeout: Duration,
) -> Result<bool> {
    let Some(giver) = plan.giver else {
        return Ok(true);
    };
    let rank = ranks.rank();
    let taker = plan.takers.contains(&rank);
    // Each taker listens and says where; the giver says from where it sends and a token the takers
    // check (a stray connection is not the giver).
    let mut local: Result<()> = Ok(());
    let listener = if taker {
        match listen(ranks) {
            Ok(l) => Some(l),
            Err(e) => {
                local = Err(e);
                None
            }
        }
    } else {
        None
    };
    // The giver opens every file before it offers them: one it cannot open makes it offer
    // nothing, so the takers do not wait for it.
    let offer = match (rank == giver).then_some(manifest) {
        Some(Some(m)) => {
            let keys = keys_of(send_from, layout, m);
            let opened = Outgoing::open(send_from, plan.step, &keys)
                .and_then(|files| Ok((files, ranks.local_ip()?)));
            match opened {
                Ok((files, ip)) => Some((std::cell::Cell::new(Some(files)), ip, token())),
                Err(e) => {
                    local = Err(e);
                    None
                }
            }
        }
        Some(None) => {
            local = Err(anyhow::anyhow!(
                "the giving node has no manifest of step {}",
                plan.step
            ));
            None
        }
        None => None,
    };
    let said = match (&listener, &offer) {
        (Some(l), _) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        (_, Some((_, ip, token))) => format!("{ip} {token}"),
        _ => String::new(),
    };
    let said_all = ranks.all_gather("memory-tier-peer-addr", said.as_bytes())?;
    let said_all: Vec<String> = said_all
        .iter()
        .map(|b| String::from_utf8_lossy(b).to_string())
        .collect();
    let outcome = local.and_then(|()| {
        if let Some((files, _, token)) = &offer {
            plan.takers.iter().enumerate().try_for_each(|(i, &taker)| {
                let addr = &said_all[taker as usize];
                ensure!(!addr.is_empty(), "rank {taker} could not listen");
                // The files opened for the first taker; opened again for each other one.
                let outgoing = match (i, files.take()) {
                    (0, Some(opened)) => opened,
                    _ => Outgoing::open(
                        send_from,
                        plan.step,
                        &keys_of(send_from, layout, manifest.context("no manifest")?),
                    )?,
                };
                send(addr, outgoing, *token, timeout).with_context(|| {
                    format!("sending step-{:06} to rank {taker} at {addr}", plan.step)
                })
            })
        } else if let Some(listener) = &listener {
            let offer: Vec<&str> = said_all[giver as usize].split(' ').collect();
            let [ip, token] = offer[..] else {
                bail!("rank {giver} could not offer step-{:06}", plan.step);
            };
            let giver_is = Sender {
                from: ip.parse().context("the giver's address")?,
                token: token.parse().context("the giver's token")?,
            };
            let deadline = Instant::now() + timeout;
            let (stream, mut input) =
                accept(listener, &giver_is, timeout, &|| Instant::now() < deadline)?
                    .context("waiting for the giving node to connect: it did not in time")?;
            receive(&stream, &mut input, receive_into, layout, Some(plan.step))
                .map(|_| ())
                .with_context(|| format!("receiving step-{:06} from rank {giver}", plan.step))
        } else {
            Ok(())
        }
    });
    if let Err(e) = &outcome {
        tracing::warn!("the peer copy of the memory tier failed: {e:#}");
    }
    Ok(!ranks.any("memory-tier-peer-failed", outcome.is_err())?)
}

/// A listener on this rank's reachable address, on a port the system picks.
pub(crate) fn listen(ranks: &Ranks) -> Result<TcpListener> {
    let ip = ranks.local_ip()?;
    TcpListener::bind((ip, 0)).with_context(|| format!("listening on {ip}"))
}

/// Whom a receiver takes a checkpoint from: a connection from `from` that starts with `token`.
pub(crate) struct Sender {
    pub from: IpAddr,
    pub token: u64,
}

/// A token no stray connection guesses (from the operating system's entropy).
pub(crate) fn token() -> u64 {
    rand::random()
}

/// A checkpoint's files opened for sending: each file's key, handle and length. Opened before
/// anything is sent, so a file the tier's retention removes meanwhile is still read whole (an
/// open file outlives its name).
pub(crate) struct Outgoing {
    step: u64,
    files: Vec<(String, std::fs::File, u64)>,
}

impl Outgoing {
    /// Opens the files at `keys` (under `folder`) of checkpoint `step`.
    pub(crate) fn open(folder: &Path, step: u64, keys: &[String]) -> Result<Self> {
        let files = keys
            .iter()
            .map(|k| {
                let path = folder.join(k);
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                let len = file
                    .metadata()
                    .with_context(|| format!("reading {}", path.display()))?
                    .len();
                Ok((k.clone(), file, len))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { step, files })
    }
}

/// Streams `outgoing` (the manifest last) to `addr`: the token, the step, the bytes in all and the
/// count, then each file's key, length and bytes; waits for the receiver's acknowledgement.
pub(crate) fn send(addr: &str, outgoing: Outgoing, token: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        }
    };
    stream.set_write_timeout(Some(timeout)).ok();
    stream.set_read_timeout(Some(timeout)).ok();
    let mut out = BufWriter::with_capacity(8 << 20, stream.try_clone()?);
    let total: u64 = outgoing.files.iter().map(|(_, _, len)| len).sum();
    let count = outgoing.files.len() as u64;
    for n in [token, outgoing.step, total, count] {
        out.write_all(&n.to_le_bytes())?;
    }
    for (key, mut file, len) in outgoing.files {
        out.write_all(&(key.len() as u64).to_le_bytes())?;
        out.write_all(key.as_bytes())?;
        out.write_all(&len.to_le_bytes())?;
        let copied = std::io::copy(&mut (&mut file).take(len), &mut out)?;
        ensure!(copied == len, "{key} shrank while it was sent");
    }
    out.flush()?;
    let mut ack = [0u8; 1];
    (&stream)
        .read_exact(&mut ack)
        .context("waiting for the receiver's acknowledgement")?;
    ensure!(ack[0] == 1, "the receiver refused the copy");
    Ok(())
}

/// The next connection from `sender` carrying its token (a connection from elsewhere, or without
/// the token, is dropped and the wait goes on), with reads bounded by `timeout`; `None` once
/// `keep_waiting` says no.
pub(crate) fn accept(
    listener: &TcpListener,
    sender: &Sender,
    timeout: Duration,
    keep_waiting: &dyn Fn() -> bool,
) -> Result<Option<(TcpStream, BufReader<TcpStream>)>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, peer)) if peer.ip() == sender.from => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(timeout)).ok();
                let mut input = BufReader::with_capacity(8 << 20, s.try_clone()?);
                if read_u64(&mut input).ok() == Some(sender.token) {
                    return Ok(Some((s, input)));
                }
                tracing::warn!(%peer, "a connection without the giver's token: dropped");
            }
            Ok((_, peer)) => {
                tracing::warn!(%peer, "a connection from elsewhere than the giver: dropped")
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !keep_waiting() {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).context("waiting for the giving node to connect"),
        }
    }
}

/// Takes one checkpoint from an accepted connection (`stream`, read through `input`) under
/// `folder` — `step` when given, else the one announced — each file written to a temporary name
/// then renamed, the manifest last; then acknowledges; returns its step. Refuses keys outside the
/// checkpoint's folder, its manifest and the metrics tail, more bytes than announced, and more than
/// the filesystem has free. A copy cut short leaves no file of its step behind (it has no manifest,
/// so it was never a checkpoint).
pub(crate) fn receive(
    stream: &TcpStream,
    input: &mut BufReader<TcpStream>,
    folder: &Path,
    layout: &RunLayout,
    step: Option<u64>,
) -> Result<u64> {
    let announced = read_u64(input)?;
    if let Some(wanted) = step {
        ensure!(
            announced == wanted,
            "the giver offers step {announced}, step {wanted} was agreed"
        );
    }
    let name = StepName::new(announced);
    let dir = folder.join(layout.checkpoint_dir(name));
    let received = receive_files(input, folder, layout, name);
    if received.is_err() && !folder.join(layout.manifest(name)).exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    received?;
    (&*stream).write_all(&[1])?;
    Ok(announced)
}

/// The files of checkpoint `name` after its header (see [`receive`]).
fn receive_files(
    input: &mut BufReader<TcpStream>,
    folder: &Path,
    layout: &RunLayout,
    name: StepName,
) -> Result<()> {
    let total = read_u64(input)?;
    if let Some(free) = free_bytes(folder) {
        ensure!(
            free >= total,
            "the tier has {free} bytes free, the checkpoint needs {total}"
        );
    }
    let (dir, manifest, metrics) = (
        layout.checkpoint_dir(name),
        layout.manifest(name),
        layout.metrics(),
    );
    let count = read_u64(input)?;
    ensure!(
        count <= 1 << 20,
        "a copy of {count} files is not one checkpoint"
    );
    let mut received = 0u64;
    for i in 0..count {
        let key_len = read_u64(input)?;
        ensure!(key_len <= 4096, "a key of {key_len} bytes");
        let mut key = vec![0u8; key_len as usize];
        input.read_exact(&mut key)?;
        let key = String::from_utf8(key).context("a key that is not UTF-8")?;
        let last = i + 1 == count;
        let inside = key.strip_prefix(&format!("{dir}/")).is_some_and(|rest| {
            !rest
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        });
        let allowed = if last {
            key == manifest
        } else {
            inside || key == metrics
        };
        ensure!(
            allowed,
            "refusing the key {key:?}: not a file of the checkpoint being copied"
        );
        let len = read_u64(input)?;
        received = received.saturating_add(len);
        ensure!(
            received <= total,
            "the giver sends more than the {total} bytes it announced"
        );
        let path = folder.join(&key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let partial = path.with_extension("peer-partial");
        let mut file = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let copied = std::io::copy(&mut input.take(len), &mut file)?;
        ensure!(
            copied == len,
            "the copy of {key} was cut short ({copied} of {len} bytes)"
        );
        drop(file);
        std::fs::rename(&partial, &path)
            .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    }
    Ok(())
}

/// Bytes free to an unprivileged writer in the filesystem holding `dir`, when it can be read.
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: statvfs writes one `statvfs` into the zeroed buffer for a NUL-terminated path.
    let code = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if code != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Where this rank is among the job's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodePlace {
    /// The node's index.
    pub node: u32,
    /// This rank on the node.
    pub local_rank: u32,
    /// The node's ranks.
    pub local_world: u32,
}

impl NodePlace {
    /// This worker's place, from its torchrun environment.
    pub(crate) fn of(env: &waypoint_launch::WorkerEnv) -> Self {
        let local_world = env.local_world_size.max(1);
        Self {
            node: (env.rank / local_world) as u32,
            local_rank: env.local_rank as u32,
            local_world: local_world as u32,
        }
    }
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_step_held_by_all_is_one_every_node_holds() {
        assert_eq!(newest_held_by_all(&[vec![8, 7], vec![8, 7]]), 8);
        // A node killed mid-write is behind: 7 is the newest both hold.
        assert_eq!(newest_held_by_all(&[vec![8, 7], vec![7, 6]]), 7);
        // Behind by two: none in common (the older node's newest is gone from the other's tier).
        assert_eq!(newest_held_by_all(&[vec![7, 6], vec![5, 4]]), 0);
        assert_eq!(newest_held_by_all(&[vec![3], vec![]]), 0, "an empty tier");
        assert_eq!(newest_held_by_all(&[]), 0);
    }

    #[test]
    fn the_newest_step_is_given_by_the_first_node_holding_it_to_those_lacking_it() {
        // 3 nodes × 2 ranks: node 1 was replaced (empty), node 2 is a save behind.
        let p = plan(&[12, 12, 0, 0, 11, 11], 2);
        assert_eq!(p.step, 12);
        assert_eq!(p.giver, Some(0));
        assert_eq!(p.takers, [2, 4]);
        // All hold it: nothing to copy.
        let p = plan(&[12, 12], 1);
        assert_eq!((p.step, p.giver, p.takers.is_empty()), (12, None, true));
        // None holds any: nothing to resume from the tier.
        let p = plan(&[0, 0], 1);
        assert_eq!((p.step, p.giver), (0, None));
        // The giver is the first node holding it, not rank 0.
        let p = plan(&[0, 7], 1);
        assert_eq!((p.giver, p.takers.clone()), (Some(1), vec![0]));
    }

    #[test]
    fn a_replaced_node_takes_its_shards_from_the_next_node() {
        // 3 nodes, node 1 replaced (its tier and its replica of node 0 gone): node 2 keeps node
        // 1's replica of step 8 and gives it; node 0 holds 8 itself.
        let own = [vec![8, 4], vec![], vec![8, 4]];
        let replicas = [vec![8, 4], vec![], vec![8, 4]];
        let p = replica_plan(&own, &replicas);
        assert_eq!((p.step, p.copies), (8, vec![(2, 1)]));
        // The replica of 8 did not arrive before node 1 died: 4 is the newest all can have.
        let p = replica_plan(&own, &[vec![8, 4], vec![], vec![4]]);
        assert_eq!((p.step, p.copies), (4, vec![(2, 1)]));
        // Every node holds its own: nothing to copy.
        let p = replica_plan(&[vec![8, 4], vec![8, 4]], &[vec![8, 4], vec![8, 4]]);
        assert_eq!((p.step, p.copies), (8, vec![]));
        // Both nodes' own step 12 set aside (damaged), their replicas whole: each takes its own
        // back from the other.
        let p = replica_plan(&[vec![8], vec![8]], &[vec![12, 8], vec![12, 8]]);
        assert_eq!((p.step, p.copies), (12, vec![(1, 0), (0, 1)]));
        // Node 0 a save behind, node 1 keeps its replica of the newer step: copied back.
        let p = replica_plan(&[vec![8, 4], vec![12, 8]], &[vec![12, 8], vec![12, 8]]);
        assert_eq!((p.step, p.copies), (12, vec![(1, 0)]));
        // Two neighbours replaced: node 1's shards are nowhere.
        let p = replica_plan(&[vec![8], vec![], vec![]], &[vec![8], vec![], vec![]]);
        assert_eq!((p.step, p.copies), (0, vec![]));
        // One node keeps no replica of itself.
        let p = replica_plan(&[vec![]], &[vec![8]]);
        assert_eq!(p.step, 0);
    }

    /// Copies checkpoint `step` (as `sent`, with `token`) from `from` to `to` over loopback, the
    /// receiver accepting token 7 for `wanted`; the receiver's answer.
    fn copy(
        from: &Path,
        to: &Path,
        keys: Vec<String>,
        (sent, token): (u64, u64),
        wanted: Option<u64>,
    ) -> Result<u64> {
        let layout = RunLayout::new("r", "waypoint").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let src = from.to_path_buf();
        let sender = std::thread::spawn(move || {
            let outgoing = Outgoing::open(&src, sent, &keys)?;
            send(&addr, outgoing, token, Duration::from_secs(5))
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        let giver = Sender {
            from: IpAddr::from([127, 0, 0, 1]),
            token: 7,
        };
        let got = accept(&listener, &giver, Duration::from_secs(5), &|| {
            Instant::now() < deadline
        })
        .and_then(|c| {
            let (stream, mut input) = c.context("nobody with the token came")?;
            receive(&stream, &mut input, to, &layout, wanted)
        });
        let _ = sender.join();
        got
    }

    #[test]
    fn a_copy_carries_files_then_the_manifest_and_refuses_what_it_was_not_offered() {
        let layout = RunLayout::new("r", "waypoint").unwrap();
        let (three, four) = (StepName::new(3), StepName::new(4));
        let from = tempfile::tempdir().unwrap();
        let keys: Vec<String> = vec![
            format!("{}/a.safetensors", layout.dcp_dir(three)),
            layout.metrics(),
            layout.manifest(three),
        ];
        for (i, k) in keys.iter().chain([&layout.manifest(four)]).enumerate() {
            let p = from.path().join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![i as u8; 100_000 * (i + 1)]).unwrap();
        }
        let to = tempfile::tempdir().unwrap();
        let got = copy(from.path(), to.path(), keys.clone(), (3, 7), Some(3)).unwrap();
        assert_eq!(got, 3);
        for k in &keys {
            assert_eq!(
                std::fs::read(to.path().join(k)).unwrap(),
                std::fs::read(from.path().join(k)).unwrap()
            );
        }
        // Any step when none was agreed (a replica), not another than the one agreed.
        let to = tempfile::tempdir().unwrap();
        assert_eq!(
            copy(from.path(), to.path(), keys.clone(), (3, 7), None).unwrap(),
            3
        );
        let to = tempfile::tempdir().unwrap();
        let err = copy(from.path(), to.path(), keys.clone(), (3, 7), Some(4)).unwrap_err();
        assert!(format!("{err:#}").contains("was agreed"), "{err:#}");
        // A key of another step after a file of this one: refused, and nothing of the step is
        // left behind (it has no manifest: it never was a checkpoint).
        let wrong = vec![keys[0].clone(), layout.manifest(four)];
        let err = copy(from.path(), to.path(), wrong, (3, 7), Some(3)).unwrap_err();
        assert!(format!("{err:#}").contains("refusing the key"), "{err:#}");
        assert!(!to.path().join(layout.checkpoint_dir(three)).exists());
        // The manifest not last: refused.
        let reordered = vec![keys[2].clone(), keys[0].clone()];
        let err = copy(from.path(), to.path(), reordered, (3, 7), Some(3)).unwrap_err();
        assert!(format!("{err:#}").contains("refusing the key"), "{err:#}");
        // Without the token: dropped, and the wait ends when told to.
        let err = copy(from.path(), to.path(), keys.clone(), (3, 8), Some(3)).unwrap_err();
        assert!(
            format!("{err:#}").contains("nobody with the token"),
            "{err:#}"
        );
        assert!(!to.path().join(layout.manifest(three)).exists());
    }

    #[test]
    fn a_giver_sending_more_than_it_announced_is_refused() {
        let layout = RunLayout::new("r", "waypoint").unwrap();
        let to = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let key = format!("{}/a.safetensors", layout.dcp_dir(StepName::new(3)));
        let liar = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            // Token, step, 10 bytes in all, 2 files — then a first file of 100 bytes.
            for n in [7u64, 3, 10, 2, key.len() as u64] {
                s.write_all(&n.to_le_bytes()).unwrap();
            }
            s.write_all(key.as_bytes()).unwrap();
            s.write_all(&100u64.to_le_bytes()).unwrap();
            let _ = s.write_all(&[0u8; 100]);
        });
        let giver = Sender {
            from: IpAddr::from([127, 0, 0, 1]),
            token: 7,
        };
        let (stream, mut input) = accept(&listener, &giver, Duration::from_secs(5), &|| true)
            .unwrap()
            .unwrap();
        let err = receive(&stream, &mut input, to.path(), &layout, Some(3)).unwrap_err();
        assert!(
            format!("{err:#}").contains("more than the 10 bytes"),
            "{err:#}"
        );
        assert!(!to
            .path()
            .join(layout.checkpoint_dir(StepName::new(3)))
            .exists());
        liar.join().unwrap();
    }
}
