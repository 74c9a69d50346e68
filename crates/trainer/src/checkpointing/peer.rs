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
//! [`tier`]: crate::checkpointing::tier

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use waypoint_checkpoint::{Manifest, RunLayout};

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

/// The keys (under the tier's store, whose root is `folder`) of checkpoint `m` that a copy carries:
/// its files, the tier's tail of the metrics (the steps since the last durable save) when there is
/// one, then the manifest.
fn keys_of(folder: &Path, layout: &RunLayout, m: &Manifest) -> Vec<String> {
    let dir = layout.checkpoint_dir(m.step_name());
    let metrics = Some(layout.metrics()).filter(|k| folder.join(k).is_file());
    m.files
        .iter()
        .map(|f| format!("{dir}/{}", f.path))
        .chain(metrics)
        .chain([layout.manifest(m.step_name())])
        .collect()
}

/// Carries out `plan` on this rank: the giver sends its tier's checkpoint of `plan.step` (read under
/// `folder`, the tier's run root on this node) to every taker, each taker writes it under its own
/// `folder`; the other ranks only wait. Every rank returns once all copies are done (or one failed:
/// then an error, on every rank).
pub(crate) fn carry_out(
    plan: &PeerPlan,
    ranks: &Ranks,
    folder: &Path,
    layout: &RunLayout,
    manifest: Option<&Manifest>,
    timeout: Duration,
) -> Result<()> {
    let Some(giver) = plan.giver else {
        return Ok(());
    };
    let rank = ranks.rank();
    // Each taker listens and says where; the giver connects to each.
    let listener = if plan.takers.contains(&rank) {
        let ip = ranks.local_ip()?;
        Some(TcpListener::bind((ip, 0)).with_context(|| format!("listening on {ip}"))?)
    } else {
        None
    };
    let mine = match &listener {
        Some(l) => l.local_addr()?.to_string(),
        None => String::new(),
    };
    let addrs = ranks.all_gather("memory-tier-peer-addr", mine.as_bytes())?;
    let outcome = if rank == giver {
        let m = manifest.context("the giving node has no manifest of the step it gives")?;
        plan.takers.iter().try_for_each(|&taker| {
            let addr = String::from_utf8_lossy(&addrs[taker as usize]).to_string();
            send(&addr, folder, &keys_of(folder, layout, m), timeout)
                .with_context(|| format!("sending step-{:06} to rank {taker} at {addr}", plan.step))
        })
    } else if let Some(listener) = listener {
        receive(&listener, folder, timeout)
            .with_context(|| format!("receiving step-{:06} from rank {giver}", plan.step))
    } else {
        Ok(())
    };
    if let Err(e) = &outcome {
        tracing::warn!("the peer copy of the memory tier failed: {e:#}");
    }
    ensure!(
        !ranks.any("memory-tier-peer-failed", outcome.is_err())?,
        "a peer copy of the memory tier failed"
    );
    Ok(())
}

/// Streams the files at `keys` (under `folder`) to `addr`: a count, then each file's key, length
/// and bytes; waits for the receiver's acknowledgement.
fn send(addr: &str, folder: &Path, keys: &[String], timeout: Duration) -> Result<()> {
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
    out.write_all(&(keys.len() as u64).to_le_bytes())?;
    for key in keys {
        let path = folder.join(key);
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        out.write_all(&(key.len() as u64).to_le_bytes())?;
        out.write_all(key.as_bytes())?;
        out.write_all(&len.to_le_bytes())?;
        let copied = std::io::copy(&mut (&mut file).take(len), &mut out)?;
        ensure!(copied == len, "{} shrank while it was sent", path.display());
    }
    out.flush()?;
    let mut ack = [0u8; 1];
    (&stream)
        .read_exact(&mut ack)
        .context("waiting for the receiver's acknowledgement")?;
    ensure!(ack[0] == 1, "the receiver refused the copy");
    Ok(())
}

/// Takes one sender's files under `folder` (each written to a temporary name, then renamed; the
/// manifest comes last), then acknowledges.
fn receive(listener: &TcpListener, folder: &Path, timeout: Duration) -> Result<()> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).context("waiting for the giving node to connect"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout)).ok();
    let mut input = BufReader::with_capacity(8 << 20, stream.try_clone()?);
    let count = read_u64(&mut input)?;
    ensure!(
        count <= 1 << 20,
        "a copy of {count} files is not one checkpoint"
    );
    for _ in 0..count {
        let key_len = read_u64(&mut input)?;
        ensure!(key_len <= 4096, "a key of {key_len} bytes");
        let mut key = vec![0u8; key_len as usize];
        input.read_exact(&mut key)?;
        let key = String::from_utf8(key).context("a key that is not UTF-8")?;
        if key.split('/').any(|c| c == ".." || c.is_empty()) || key.starts_with('/') {
            bail!("refusing the key {key:?}: it would leave the tier's folder");
        }
        let len = read_u64(&mut input)?;
        let path = folder.join(&key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let partial = path.with_extension("peer-partial");
        let mut file = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let copied = std::io::copy(&mut (&mut input).take(len), &mut file)?;
        ensure!(
            copied == len,
            "the copy of {key} was cut short ({copied} of {len} bytes)"
        );
        drop(file);
        std::fs::rename(&partial, &path)
            .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    }
    (&stream).write_all(&[1])?;
    Ok(())
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
    fn a_copy_carries_files_then_the_manifest_and_refuses_escaping_keys() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let keys = [
            "r/checkpoints/step-000003/dcp/a.safetensors",
            "r/checkpoints/step-000003.json",
        ];
        for (i, k) in keys.iter().enumerate() {
            let p = from.path().join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![i as u8; 100_000 * (i + 1)]).unwrap();
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let (src, sent) = (from.path().to_path_buf(), keys.clone());
        let sender = std::thread::spawn(move || send(&addr, &src, &sent, Duration::from_secs(10)));
        receive(&listener, to.path(), Duration::from_secs(10)).unwrap();
        sender.join().unwrap().unwrap();
        for k in &keys {
            assert_eq!(
                std::fs::read(to.path().join(k)).unwrap(),
                std::fs::read(from.path().join(k)).unwrap()
            );
        }
        // A key that climbs out of the folder is refused.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let key = b"../escape";
            s.write_all(&1u64.to_le_bytes()).unwrap();
            s.write_all(&(key.len() as u64).to_le_bytes()).unwrap();
            s.write_all(key).unwrap();
            s.write_all(&1u64.to_le_bytes()).unwrap();
            s.write_all(b"x").unwrap();
        });
        let err = receive(&listener, to.path(), Duration::from_secs(5)).unwrap_err();
        assert!(
            format!("{err:#}").contains("leave the tier's folder"),
            "{err:#}"
        );
        assert!(!to.path().join("../escape").exists());
        sender.join().unwrap();
    }
}
