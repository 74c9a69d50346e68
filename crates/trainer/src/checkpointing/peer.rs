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

impl PeerPlan {
    /// No copy.
    pub(crate) fn none() -> Self {
        Self {
            step: 0,
            giver: None,
            takers: Vec::new(),
        }
    }
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
/// `folder`; the other ranks only wait. Every rank takes the same collectives whatever fails here,
/// and returns the same answer: whether every copy was made (a copy that failed is a warning; a
/// collective that failed is an error, as anywhere). A copy must end within `timeout` (the
/// collective timeout: the ranks not copying wait that long).
pub(crate) fn carry_out(
    plan: &PeerPlan,
    ranks: &Ranks,
    folder: &Path,
    layout: &RunLayout,
    manifest: Option<&Manifest>,
    timeout: Duration,
) -> Result<bool> {
    let Some(giver) = plan.giver else {
        return Ok(true);
    };
    let rank = ranks.rank();
    let taker = plan.takers.contains(&rank);
    // Each taker listens and says where; the giver says from where it sends, how many bytes, and a
    // token the takers check (a stray connection is not the giver).
    let mut local: Result<()> = Ok(());
    let listener = if taker {
        let bound = ranks.local_ip().and_then(|ip| {
            TcpListener::bind((ip, 0)).with_context(|| format!("listening on {ip}"))
        });
        match bound {
            Ok(l) => Some(l),
            Err(e) => {
                local = Err(e);
                None
            }
        }
    } else {
        None
    };
    let keys = (rank == giver).then(|| match manifest {
        Some(m) => Ok(keys_of(folder, layout, m)),
        None => Err(anyhow::anyhow!(
            "the giving node has no manifest of step {}",
            plan.step
        )),
    });
    let offer = match keys {
        Some(Ok(keys)) => match total_bytes(folder, &keys).and_then(|t| Ok((t, ranks.local_ip()?)))
        {
            Ok((total, ip)) => Some((keys, total, ip, token())),
            Err(e) => {
                local = Err(e);
                None
            }
        },
        Some(Err(e)) => {
            local = Err(e);
            None
        }
        None => None,
    };
    let said = match (&listener, &offer) {
        (Some(l), _) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        (_, Some((_, total, ip, token))) => format!("{ip} {total} {token}"),
        _ => String::new(),
    };
    let said_all = ranks.all_gather("memory-tier-peer-addr", said.as_bytes())?;
    let said_all: Vec<String> = said_all
        .iter()
        .map(|b| String::from_utf8_lossy(b).to_string())
        .collect();
    let outcome = local.and_then(|()| {
        if let Some((keys, _, _, token)) = &offer {
            plan.takers.iter().try_for_each(|&taker| {
                let addr = &said_all[taker as usize];
                ensure!(!addr.is_empty(), "rank {taker} could not listen");
                send(addr, folder, keys, *token, timeout).with_context(|| {
                    format!("sending step-{:06} to rank {taker} at {addr}", plan.step)
                })
            })
        } else if let Some(listener) = &listener {
            let offer: Vec<&str> = said_all[giver as usize].split(' ').collect();
            let [ip, total, token] = offer[..] else {
                bail!("rank {giver} could not offer step-{:06}", plan.step);
            };
            let expect = Expected {
                from: ip.parse().context("the giver's address")?,
                total: total.parse().context("the giver's size")?,
                token: token.parse().context("the giver's token")?,
                dir: layout.checkpoint_dir(StepName::new(plan.step)),
                manifest: layout.manifest(StepName::new(plan.step)),
                metrics: layout.metrics(),
            };
            receive(listener, folder, &expect, timeout)
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

/// What a taker accepts: a connection from `from` that starts with `token`, at most `total` bytes,
/// files under `dir`, the `metrics` tail, and `manifest` last.
struct Expected {
    from: IpAddr,
    total: u64,
    token: u64,
    dir: String,
    manifest: String,
    metrics: String,
}

/// A token no stray connection guesses.
fn token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// The bytes of the files at `keys` under `folder`.
fn total_bytes(folder: &Path, keys: &[String]) -> Result<u64> {
    keys.iter().try_fold(0u64, |sum, k| {
        let path = folder.join(k);
        let len = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        Ok(sum + len)
    })
}

/// Streams the files at `keys` (under `folder`) to `addr`: the token, a count, then each file's
/// key, length and bytes; waits for the receiver's acknowledgement.
fn send(addr: &str, folder: &Path, keys: &[String], token: u64, timeout: Duration) -> Result<()> {
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
    out.write_all(&token.to_le_bytes())?;
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

/// Takes the giver's files under `folder` — a connection from elsewhere, or without the token, is
/// dropped and the wait goes on — each written to a temporary name then renamed, the manifest
/// last; then acknowledges. Refuses keys outside what `expect` allows, more bytes than announced,
/// and more than the tier's filesystem has free.
fn receive(
    listener: &TcpListener,
    folder: &Path,
    expect: &Expected,
    timeout: Duration,
) -> Result<()> {
    if let Some(free) = super::tier::free_bytes(folder) {
        ensure!(
            free >= expect.total,
            "the tier has {free} bytes free, the checkpoint needs {}",
            expect.total
        );
    }
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let (stream, mut input) = loop {
        match listener.accept() {
            Ok((s, peer)) if peer.ip() == expect.from => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(timeout)).ok();
                let mut input = BufReader::with_capacity(8 << 20, s.try_clone()?);
                if read_u64(&mut input).ok() == Some(expect.token) {
                    break (s, input);
                }
                tracing::warn!(%peer, "a connection without the giver's token: dropped");
            }
            Ok((_, peer)) => {
                tracing::warn!(%peer, "a connection from elsewhere than the giver: dropped")
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).context("waiting for the giving node to connect"),
        }
    };
    let count = read_u64(&mut input)?;
    ensure!(
        count <= 1 << 20,
        "a copy of {count} files is not one checkpoint"
    );
    let mut received = 0u64;
    for i in 0..count {
        let key_len = read_u64(&mut input)?;
        ensure!(key_len <= 4096, "a key of {key_len} bytes");
        let mut key = vec![0u8; key_len as usize];
        input.read_exact(&mut key)?;
        let key = String::from_utf8(key).context("a key that is not UTF-8")?;
        let last = i + 1 == count;
        let inside = key
            .strip_prefix(&format!("{}/", expect.dir))
            .is_some_and(|rest| {
                !rest
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
            });
        let allowed = if last {
            key == expect.manifest
        } else {
            inside || key == expect.metrics
        };
        ensure!(
            allowed,
            "refusing the key {key:?}: not a file of the checkpoint being copied"
        );
        let len = read_u64(&mut input)?;
        received = received.saturating_add(len);
        ensure!(
            received <= expect.total,
            "the giver sends more than the {} bytes it announced",
            expect.total
        );
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

    fn expected(total: u64, token: u64) -> Expected {
        Expected {
            from: IpAddr::from([127, 0, 0, 1]),
            total,
            token,
            dir: "r/checkpoints/step-000003".into(),
            manifest: "r/checkpoints/step-000003.json".into(),
            metrics: "r/logs/metrics.jsonl".into(),
        }
    }

    #[test]
    fn a_copy_carries_files_then_the_manifest_and_refuses_what_it_was_not_offered() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let keys: Vec<String> = [
            "r/checkpoints/step-000003/dcp/a.safetensors",
            "r/logs/metrics.jsonl",
            "r/checkpoints/step-000003.json",
        ]
        .iter()
        .map(|k| k.to_string())
        .collect();
        for (i, k) in keys.iter().enumerate() {
            let p = from.path().join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![i as u8; 100_000 * (i + 1)]).unwrap();
        }
        let total = total_bytes(from.path(), &keys).unwrap();
        let copy = |keys: Vec<String>, token: u64, expect: Expected| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let src = from.path().to_path_buf();
            let sender =
                std::thread::spawn(move || send(&addr, &src, &keys, token, Duration::from_secs(5)));
            let got = receive(&listener, to.path(), &expect, Duration::from_secs(5));
            let _ = sender.join();
            got
        };
        copy(keys.clone(), 7, expected(total, 7)).unwrap();
        for k in &keys {
            assert_eq!(
                std::fs::read(to.path().join(k)).unwrap(),
                std::fs::read(from.path().join(k)).unwrap()
            );
        }
        // More bytes than announced, a key of another step, the manifest not last: refused.
        let err = copy(keys.clone(), 7, expected(total - 1, 7)).unwrap_err();
        assert!(format!("{err:#}").contains("more than"), "{err:#}");
        let other = vec!["r/checkpoints/step-000004.json".to_string()];
        std::fs::create_dir_all(from.path().join("r/checkpoints")).unwrap();
        std::fs::write(from.path().join(&other[0]), b"{}").unwrap();
        let err = copy(other, 7, expected(total, 7)).unwrap_err();
        assert!(format!("{err:#}").contains("refusing the key"), "{err:#}");
        let reordered = vec![keys[2].clone(), keys[0].clone()];
        let err = copy(reordered, 7, expected(total, 7)).unwrap_err();
        assert!(format!("{err:#}").contains("refusing the key"), "{err:#}");
        // A connection without the token is dropped, and the wait ends with the timeout.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stray = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&8u64.to_le_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        let err = receive(
            &listener,
            to.path(),
            &expected(total, 7),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("waiting for the giving node"),
            "{err:#}"
        );
        stray.join().unwrap();
    }
}
