//! A process group over a TCPStore: barriers and all-gathers through the store, and a ring
//! all-reduce over direct TCP connections between neighbouring ranks (the CPU path; the numbers are
//! the same on every rank, so replicas stay identical).
//!
//! Every collective has a timeout: a dead or hung peer ends it with an error that names the rank and
//! the collective, never a hang. On an agent's store, which outlives the worker group, keys
//! live under `waypoint/<round>/` (the restart count, which `waypoint launch` numbers for the whole
//! job), so a re-formed group never reads the keys of the one before; a store rank 0 hosts is new
//! with each group, and its keys are under `waypoint/0/` whatever each node's restart count says.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{DistError, Result};
use crate::{StoreClient, StoreServer};

/// Where a rank is and how it reaches the others.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// This rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// Host of the store.
    pub master_addr: String,
    /// Port of the store.
    pub master_port: u16,
    /// The store is hosted by an agent (torchrun, `waypoint launch`); else rank 0 hosts it.
    pub agent_store: bool,
    /// Namespace of this incarnation of the group on an agent's store (the restart count).
    pub restart_count: u32,
    /// Limit of every collective and of joining.
    pub timeout: Duration,
}

impl GroupConfig {
    /// The round this group's keys live under: the restart count on an agent's store, which holds
    /// the keys of every earlier round; 0 on a store rank 0 hosts, which starts empty with each
    /// group (under torchrun with `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` a node started in place of
    /// a dead one has restart count 0 while the survivors count on: they must still meet).
    fn namespace(&self) -> u32 {
        if self.agent_store {
            self.restart_count
        } else {
            0
        }
    }
}

/// Joined ranks.
pub struct Group {
    config: GroupConfig,
    store: Mutex<StoreClient>,
    server: Option<StoreServer>,
    ring: Option<Mutex<Ring>>,
    /// The ring's connections seen from beside it, for waits on the store to notice a dead peer.
    neighbours: Option<Arc<Neighbours>>,
    counter: Mutex<u64>,
}

struct Ring {
    next: TcpStream,
    prev: TcpStream,
}

/// The collective that links the ring: each rank's listening address (the group's first).
const RING_ADDR: &str = "ring-addr";

/// The name of the `n`-th collective of a group, called `what`.
fn call_name(what: &str, n: u64) -> String {
    format!("{what}/{n}")
}

/// How often a wait on the store looks whether a ring neighbour has gone.
const NEIGHBOUR_WATCH: Duration = Duration::from_millis(500);

/// Clones of this rank's two ring connections. A rank that dies (killed, its node gone) closes
/// them, and a rank waiting on the store for that rank's key would otherwise wait out the whole
/// collective timeout; its neighbours see the closed connection at once and fail, which closes
/// theirs in turn, so every rank learns of it within a few watches.
struct Neighbours {
    next: (u32, TcpStream),
    prev: (u32, TcpStream),
}

impl Neighbours {
    /// The neighbour whose connection has closed, if one has. Peeks without waiting and without
    /// taking bytes, so the ring's own reads (on another thread, maybe) are undisturbed.
    fn gone(&self) -> Option<u32> {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        [&self.next, &self.prev].into_iter().find_map(|(rank, s)| {
            let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
            match socket2::SockRef::from(s).recv_with_flags(&mut byte, flags) {
                Ok(0) => Some(*rank),
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                Err(_) => Some(*rank),
            }
        })
    }
}

impl Group {
    /// Joins: connects to (or, without an agent, on rank 0 hosts) the store, then links the ring.
    pub fn join(config: GroupConfig) -> Result<Self> {
        let server = if !config.agent_store && config.rank == 0 {
            Some(StoreServer::bind("0.0.0.0", config.master_port)?)
        } else {
            None
        };
        let store = StoreClient::connect(&config.master_addr, config.master_port, config.timeout)?;
        let mut group = Self {
            config,
            store: Mutex::new(store),
            server,
            ring: None,
            neighbours: None,
            counter: Mutex::new(0),
        };
        if group.config.world_size > 1 {
            group.refuse_a_used_namespace()?;
            let ring = group.link_ring()?;
            let (world, rank) = (group.config.world_size, group.config.rank);
            let clone = |s: &TcpStream| {
                s.try_clone()
                    .map_err(DistError::io("cloning a ring socket"))
            };
            group.neighbours = Some(Arc::new(Neighbours {
                next: ((rank + 1) % world, clone(&ring.next)?),
                prev: ((rank + world - 1) % world, clone(&ring.prev)?),
            }));
            group.ring = Some(Mutex::new(ring));
        }
        Ok(group)
    }

    /// This rank.
    pub fn rank(&self) -> u32 {
        self.config.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> u32 {
        self.config.world_size
    }

    fn key(&self, name: &str) -> String {
        format!("waypoint/{}/{name}", self.config.namespace())
    }

    fn store(&self) -> std::sync::MutexGuard<'_, StoreClient> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address other nodes reach this rank at: the one its store connection leaves from.
    pub fn reachable_ip(&self) -> Result<IpAddr> {
        let probe = TcpStream::connect((self.config.master_addr.as_str(), self.config.master_port))
            .map_err(DistError::io("finding this node's address"))?;
        Ok(probe
            .local_addr()
            .map_err(DistError::io("finding this node's address"))?
            .ip())
    }

    /// Fails when an earlier group of the same round already used this agent's store: this rank's
    /// first key is there before it wrote it (only this rank writes it). That happens under
    /// torchrun's shared rendezvous store when the restart counts of a re-formed group repeat one
    /// (a node started in place of a dead one counts from 0): the earlier group's ring addresses
    /// would be read as this one's.
    fn refuse_a_used_namespace(&self) -> Result<()> {
        if !self.config.agent_store {
            return Ok(());
        }
        // The group's first collective (see `link_ring`), as `all_gather` names this rank's key.
        let first = format!(
            "{}/{}",
            self.key(&call_name(RING_ADDR, 1)),
            self.config.rank
        );
        if self.store().check(&[&first])? {
            return Err(DistError::Protocol(format!(
                "rank {}: the agent's store already holds the keys of an earlier worker group of \
                 round {} (a node was restarted or replaced, and its restart count repeats one \
                 the store has seen). Under torchrun, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so \
                 that each round gets a store of its own, or launch with `waypoint launch`, whose \
                 rounds are numbered for the whole job",
                self.config.rank,
                self.config.namespace()
            )));
        }
        Ok(())
    }

    /// Each rank's listening address goes through the store; rank r connects to r+1 and accepts r-1.
    fn link_ring(&self) -> Result<Ring> {
        let (rank, world) = (self.config.rank, self.config.world_size);
        let ip = self.reachable_ip()?;
        let listener = TcpListener::bind((ip, 0))
            .map_err(DistError::io(format!("binding a ring port on {ip}")))?;
        let port = listener
            .local_addr()
            .map_err(DistError::io("reading the ring port"))?
            .port();
        let addrs = self.all_gather(RING_ADDR, format!("{ip}:{port}").as_bytes())?;
        let next_addr = String::from_utf8_lossy(&addrs[((rank + 1) % world) as usize]).to_string();
        let deadline = Instant::now() + self.config.timeout;
        let next = loop {
            match TcpStream::connect(&next_addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(%next_addr, "ring peer not up yet: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(DistError::io(format!(
                        "connecting to rank {}'s ring port {next_addr}",
                        (rank + 1) % world
                    ))(e))
                }
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(DistError::io("ring listener"))?;
        let prev = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => {
                    return Err(DistError::io(format!(
                        "waiting for rank {} to connect",
                        (rank + world - 1) % world
                    ))(e))
                }
            }
        };
        for s in [&next, &prev] {
            s.set_nonblocking(false)
                .map_err(DistError::io("ring socket"))?;
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(self.config.timeout)).ok();
            s.set_write_timeout(Some(self.config.timeout)).ok();
        }
        Ok(Ring { next, prev })
    }

    /// A name unique to this call, the same on every rank (collectives run in the same order).
    fn next_name(&self, what: &str) -> String {
        let mut c = self.counter.lock().unwrap_or_else(|e| e.into_inner());
        *c += 1;
        call_name(what, *c)
    }

    /// Every rank's `data`, in rank order.
    pub fn all_gather(&self, what: &str, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let name = self.key(&self.next_name(what));
        let neighbours = self.neighbours.as_deref();
        gather(
            &mut self.store(),
            &self.config,
            neighbours,
            what,
            &name,
            data,
        )
    }

    /// Waits until every rank reaches the barrier called `what`.
    pub fn barrier(&self, what: &str) -> Result<()> {
        self.all_gather(what, b"").map(|_| ())
    }

    /// Rank 0's `data` on every rank.
    pub fn broadcast(&self, what: &str, data: &[u8]) -> Result<Vec<u8>> {
        let name = self.key(&self.next_name(what));
        let neighbours = self.neighbours.as_deref();
        broadcast(
            &mut self.store(),
            &self.config,
            neighbours,
            what,
            &name,
            data,
        )
    }

    /// Collectives on a store connection of their own, named by the caller: for work beside the
    /// training loop (a background save) whose collectives must not interleave with the loop's.
    pub fn side_channel(&self) -> Result<SideChannel> {
        let c = &self.config;
        Ok(SideChannel {
            store: StoreClient::connect(&c.master_addr, c.master_port, c.timeout)?,
            config: c.clone(),
            neighbours: self.neighbours.clone(),
            scope: String::new(),
        })
    }

    /// Collectives among the ranks of one node — `local_world` of them, this one `local_rank` —
    /// on a store connection of their own, their keys apart from every other node's (each node's
    /// memory tier commits its own checkpoints).
    pub fn node_channel(
        &self,
        node: u32,
        local_rank: u32,
        local_world: u32,
    ) -> Result<SideChannel> {
        let c = &self.config;
        Ok(SideChannel {
            store: StoreClient::connect(&c.master_addr, c.master_port, c.timeout)?,
            config: GroupConfig {
                rank: local_rank,
                world_size: local_world,
                ..c.clone()
            },
            neighbours: self.neighbours.clone(),
            scope: format!("node{node}/"),
        })
    }

    /// Sums `data` over all ranks, in place, with a ring reduce-scatter then all-gather. Every rank
    /// ends with the same bits.
    pub fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let world = self.config.world_size as usize;
        let n = data.len();
        let chunks: Vec<(usize, usize)> = (0..world)
            .map(|c| (c * n / world, (c + 1) * n / world))
            .collect();
        self.ring_reduce_scatter(data, &chunks)?;
        self.ring_all_gather(data, &chunks)
    }

    /// Sums `data` over all ranks into each rank's own part: afterwards `data[owned[r].0..owned[r].1]`
    /// on rank r holds the sum of that range over the ranks (the rest of `data` is scratch). The
    /// parts may differ in size (an uneven last shard, an empty one); every rank passes the same
    /// `owned`, which must tile `data` in rank order. Each rank sends (N-1)/N of `data`: half of
    /// what an all-reduce sends.
    pub fn reduce_scatter_sum(&self, data: &mut [f32], owned: &[(usize, usize)]) -> Result<()> {
        self.check_parts(data.len(), owned)?;
        self.ring_reduce_scatter(data, &ring_order(owned))
    }

    /// Every rank's own part of `data` (`owned[r]` on rank r, the same `owned` on every rank, tiling
    /// `data` in rank order) copied into the others', so all ranks end with the whole of it.
    pub fn all_gather_parts(&self, data: &mut [f32], owned: &[(usize, usize)]) -> Result<()> {
        self.check_parts(data.len(), owned)?;
        self.ring_all_gather(data, &ring_order(owned))
    }

    fn check_parts(&self, n: usize, owned: &[(usize, usize)]) -> Result<()> {
        let tiles = owned.len() == self.config.world_size as usize
            && owned.first().is_none_or(|p| p.0 == 0)
            && owned.last().is_none_or(|p| p.1 == n)
            && owned.windows(2).all(|w| w[0].1 == w[1].0)
            && owned.iter().all(|p| p.0 <= p.1);
        if tiles {
            Ok(())
        } else {
            Err(DistError::Protocol(format!(
                "the parts {owned:?} do not tile {n} elements over {} ranks",
                self.config.world_size
            )))
        }
    }

    fn ring(&self) -> Result<std::sync::MutexGuard<'_, Ring>> {
        let ring = self
            .ring
            .as_ref()
            .ok_or_else(|| DistError::Protocol("no ring".into()))?;
        Ok(ring.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The ring's reduce-scatter over `chunks`: after world-1 steps rank r holds the full sum of
    /// chunk (r + 1) % world.
    fn ring_reduce_scatter(&self, data: &mut [f32], chunks: &[(usize, usize)]) -> Result<()> {
        self.ring_pass(data, chunks, RingPhase::ReduceScatter)
    }

    /// The ring's all-gather over `chunks`, rank r starting with chunk (r + 1) % world.
    fn ring_all_gather(&self, data: &mut [f32], chunks: &[(usize, usize)]) -> Result<()> {
        self.ring_pass(data, chunks, RingPhase::AllGather)
    }

    /// world-1 steps around the ring: at each, send one chunk to the next rank and take one from
    /// the previous, adding it in (reduce-scatter) or copying it (all-gather). The all-gather starts
    /// one chunk further on, where the reduce-scatter left each rank's sum.
    fn ring_pass(
        &self,
        data: &mut [f32],
        chunks: &[(usize, usize)],
        phase: RingPhase,
    ) -> Result<()> {
        let world = self.config.world_size as usize;
        if world == 1 {
            return Ok(());
        }
        let mut ring = self.ring()?;
        let rank = self.config.rank as usize;
        let largest = chunks.iter().map(|(a, b)| b - a).max().unwrap_or(0);
        let mut incoming = vec![0f32; largest];
        let (prev_rank, next_rank) = ((rank + world - 1) % world, (rank + 1) % world);
        let start = match phase {
            RingPhase::ReduceScatter => rank,
            RingPhase::AllGather => rank + 1,
        };
        for step in 0..world - 1 {
            let send_chunk = (start + world - step) % world;
            let recv_chunk = (start + world - step - 1) % world;
            let (s0, s1) = chunks[send_chunk];
            let (r0, r1) = chunks[recv_chunk];
            exchange(&mut ring, &data[s0..s1], &mut incoming[..r1 - r0])
                .map_err(|e| self.peer_error(e, prev_rank, next_rank))?;
            let got = &incoming[..r1 - r0];
            match phase {
                RingPhase::ReduceScatter => {
                    for (d, x) in data[r0..r1].iter_mut().zip(got) {
                        *d += *x;
                    }
                }
                RingPhase::AllGather => data[r0..r1].copy_from_slice(got),
            }
        }
        Ok(())
    }

    fn peer_error(&self, e: std::io::Error, prev: usize, next: usize) -> DistError {
        DistError::Io {
            context: format!(
                "rank {}: a ring collective with ranks {prev} and {next} failed (a rank died or hangs; \
                 timeout {:?})",
                self.config.rank, self.config.timeout
            ),
            source: e,
        }
    }
}

/// Collectives named by the caller (names must be unique per use and the same on every rank), on a
/// connection of their own. See [`Group::side_channel`].
pub struct SideChannel {
    store: StoreClient,
    config: GroupConfig,
    neighbours: Option<Arc<Neighbours>>,
    /// What its keys are under, after `side/` (a node's: `node<k>/`).
    scope: String,
}

impl SideChannel {
    fn key(&self, name: &str) -> String {
        format!(
            "waypoint/{}/side/{}{name}",
            self.config.namespace(),
            self.scope
        )
    }

    /// Every rank's `data` for the collective called `name`, in rank order.
    pub fn all_gather(&mut self, name: &str, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let key = self.key(name);
        let neighbours = self.neighbours.as_deref();
        gather(&mut self.store, &self.config, neighbours, name, &key, data)
    }

    /// Waits until every rank reaches the barrier called `name`.
    pub fn barrier(&mut self, name: &str) -> Result<()> {
        self.all_gather(name, b"").map(|_| ())
    }

    /// Rank 0's `data` for the collective called `name`, on every rank.
    pub fn broadcast(&mut self, name: &str, data: &[u8]) -> Result<Vec<u8>> {
        let key = self.key(name);
        let neighbours = self.neighbours.as_deref();
        broadcast(&mut self.store, &self.config, neighbours, name, &key, data)
    }
}

/// All-gather through the store: each rank sets `<key>/<rank>`, waits for all, reads all.
fn gather(
    store: &mut StoreClient,
    c: &GroupConfig,
    neighbours: Option<&Neighbours>,
    what: &str,
    key: &str,
    data: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let keys: Vec<String> = (0..c.world_size).map(|r| format!("{key}/{r}")).collect();
    store.set(&keys[c.rank as usize], data)?;
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    wait_for_keys(store, c, neighbours, what, &refs)?;
    store.multi_get(&refs)
}

/// Broadcast through the store: rank 0 sets `key`, every rank waits for it and reads it.
fn broadcast(
    store: &mut StoreClient,
    c: &GroupConfig,
    neighbours: Option<&Neighbours>,
    what: &str,
    key: &str,
    data: &[u8],
) -> Result<Vec<u8>> {
    if c.rank == 0 {
        store.set(key, data)?;
    }
    wait_for_keys(store, c, neighbours, what, &[key])?;
    store.get(key)
}

/// Waits for the other ranks' `keys` up to the collective timeout; with ring neighbours, it looks
/// every [`NEIGHBOUR_WATCH`] whether one has gone and then fails at once, naming it.
fn wait_for_keys(
    store: &mut StoreClient,
    c: &GroupConfig,
    neighbours: Option<&Neighbours>,
    what: &str,
    keys: &[&str],
) -> Result<()> {
    let deadline = Instant::now() + c.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let slice = if neighbours.is_some() {
            left.min(NEIGHBOUR_WATCH)
        } else {
            left
        };
        match store.wait(keys, slice) {
            Ok(()) => return Ok(()),
            Err(DistError::Timeout { .. }) if Instant::now() < deadline => {
                if let Some(gone) = neighbours.and_then(Neighbours::gone) {
                    // A neighbour that completed this collective and then exited has closed its
                    // connection too: the keys decide.
                    if store.check(keys)? {
                        return Ok(());
                    }
                    return Err(DistError::Protocol(format!(
                        "rank {}: collective `{what}`: rank {gone} is gone (its ring connection \
                         closed: it died, or its node did)",
                        c.rank
                    )));
                }
            }
            Err(DistError::Timeout { keys, .. }) => {
                let timeout = c.timeout;
                return Err(collective_error(
                    c,
                    what,
                    DistError::Timeout { keys, timeout },
                ));
            }
            Err(e) => return Err(collective_error(c, what, e)),
        }
    }
}

fn collective_error(c: &GroupConfig, what: &str, e: DistError) -> DistError {
    match e {
        DistError::Timeout { timeout, .. } => DistError::Protocol(format!(
            "rank {}: collective `{what}` timed out after {timeout:?}; another rank died or hangs",
            c.rank
        )),
        other => other,
    }
}

impl Drop for Group {
    /// Ranks say they are leaving; the rank hosting the store waits (briefly) for all of them, so
    /// no rank loses the store in the middle of its last collective.
    fn drop(&mut self) {
        let (rank, world) = (self.config.rank, self.config.world_size);
        let mine = self.key(&format!("leaving/{rank}"));
        let others: Vec<String> = (0..world)
            .filter(|&r| r != rank)
            .map(|r| self.key(&format!("leaving/{r}")))
            .collect();
        let hosting = self.server.is_some();
        let wait = self.config.timeout.min(Duration::from_secs(30));
        let mut store = self.store();
        let _ = store.set(&mine, b"");
        if hosting && !others.is_empty() {
            let refs: Vec<&str> = others.iter().map(String::as_str).collect();
            let _ = store.wait(&refs, wait);
        }
    }
}

/// The two halves of a ring all-reduce.
#[derive(Clone, Copy)]
enum RingPhase {
    /// Each chunk is summed as it travels; each rank ends with one chunk's sum.
    ReduceScatter,
    /// Each rank's chunk is passed around until every rank has all of them.
    AllGather,
}

/// The ring's chunk order for parts owned by rank: the ring leaves rank r with chunk (r + 1) %
/// world, so chunk j is the part of rank j - 1.
fn ring_order(owned: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let world = owned.len();
    (0..world).map(|j| owned[(j + world - 1) % world]).collect()
}

/// Sends `out` to the next rank while receiving `into` from the previous one.
fn exchange(ring: &mut Ring, out: &[f32], into: &mut [f32]) -> std::io::Result<()> {
    let out_bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut next = ring.next.try_clone()?;
    let sender = std::thread::spawn(move || next.write_all(&out_bytes));
    let mut buf = vec![0u8; into.len() * 4];
    let read = ring.prev.read_exact(&mut buf);
    let sent = sender
        .join()
        .map_err(|_| std::io::Error::other("ring sender panicked"))?;
    read?;
    sent?;
    for (x, b) in into.iter_mut().zip(buf.chunks_exact(4)) {
        *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn config(rank: u32, world_size: u32, master_port: u16, timeout_secs: u64) -> GroupConfig {
        GroupConfig {
            rank,
            world_size,
            master_addr: "127.0.0.1".into(),
            master_port,
            agent_store: false,
            restart_count: 0,
            timeout: Duration::from_secs(timeout_secs),
        }
    }

    #[test]
    fn ranks_all_reduce_gather_and_broadcast() {
        for world in [1u32, 2, 3, 4] {
            let master_port = port();
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    std::thread::spawn(move || {
                        let g = Group::join(config(rank, world, master_port, 20)).unwrap();
                        let mut v: Vec<f32> = (0..11).map(|i| (i * (rank + 1)) as f32).collect();
                        g.all_reduce_sum(&mut v).unwrap();
                        let names = g
                            .all_gather("names", format!("r{rank}").as_bytes())
                            .unwrap();
                        let b = g.broadcast("b", format!("from {rank}").as_bytes()).unwrap();
                        let mut side = g.side_channel().unwrap();
                        let side_b = side.broadcast("s/1", b"side").unwrap();
                        assert_eq!(side_b, b"side");
                        let side_all = side.all_gather("s/2", &[rank as u8]).unwrap();
                        assert_eq!(
                            side_all,
                            (0..world).map(|r| vec![r as u8]).collect::<Vec<_>>()
                        );
                        g.barrier("end").unwrap();
                        (v, names, b)
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let factor: u32 = (1..=world).sum();
            for (v, names, b) in &results {
                let expect: Vec<f32> = (0..11).map(|i| (i * factor) as f32).collect();
                assert_eq!(v, &expect, "world {world}");
                let want: Vec<Vec<u8>> = (0..world).map(|r| format!("r{r}").into_bytes()).collect();
                assert_eq!(names, &want);
                assert_eq!(b, b"from 0");
            }
        }
    }

    /// A rank that dies while the others wait on the store for its key: they fail within a few
    /// watches, naming it, not after the collective timeout.
    #[test]
    fn a_dead_rank_fails_a_wait_on_the_store_promptly() {
        let master_port = port();
        // The survivors keep their groups until both have failed: a survivor that ended first
        // would close its own connections, and the other could name it instead of rank 2.
        let survivors = std::sync::Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let survivors = survivors.clone();
                std::thread::spawn(move || {
                    let g = Group::join(config(rank, 3, master_port, 30)).unwrap();
                    g.barrier("joined").unwrap();
                    if rank == 2 {
                        return None;
                    }
                    let started = Instant::now();
                    let err = g.all_gather("step", b"x").unwrap_err().to_string();
                    let took = started.elapsed();
                    survivors.wait();
                    Some((took, err))
                })
            })
            .collect();
        for h in handles {
            if let Some((took, err)) = h.join().unwrap() {
                assert!(took < Duration::from_secs(5), "{took:?}: {err}");
                assert!(err.contains("rank 2 is gone"), "{err}");
            }
        }
    }

    /// On an agent's store, a group of the same round as an earlier one is refused with what to do;
    /// the next round joins.
    #[test]
    fn a_round_already_used_on_an_agents_store_is_refused() {
        let server = StoreServer::bind("127.0.0.1", 0).unwrap();
        let master_port = server.port();
        let join = |round: u32| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    std::thread::spawn(move || {
                        let mut c = config(rank, 2, master_port, 3);
                        c.agent_store = true;
                        c.restart_count = round;
                        Group::join(c).map(|g| g.barrier("b"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        };
        assert!(join(0).iter().all(|r| matches!(r, Ok(Ok(())))));
        for r in join(0) {
            let err = r.expect_err("round 0 again is refused").to_string();
            assert!(
                err.contains("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"),
                "{err}"
            );
        }
        assert!(join(1).iter().all(|r| matches!(r, Ok(Ok(())))));
    }

    /// Uneven parts (an empty one included): the reduce-scatter leaves each rank the sum of its
    /// part, the all-gather each rank's part everywhere; parts that do not tile are refused.
    #[test]
    fn reduce_scatter_and_all_gather_over_uneven_parts() {
        for world in [1u32, 2, 3, 4] {
            let master_port = port();
            let n = 10usize;
            // Rank r owns ⌈10/world⌉ elements, the last fewer; at world 4: 3, 3, 3, 1.
            let chunk = n.div_ceil(world as usize);
            let owned: Vec<(usize, usize)> = (0..world as usize)
                .map(|r| ((r * chunk).min(n), ((r + 1) * chunk).min(n)))
                .collect();
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let owned = owned.clone();
                    std::thread::spawn(move || {
                        let g = Group::join(config(rank, world, master_port, 20)).unwrap();
                        let mut v: Vec<f32> =
                            (0..n).map(|i| (i as u32 * (rank + 1)) as f32).collect();
                        g.reduce_scatter_sum(&mut v, &owned).unwrap();
                        let (a, b) = owned[rank as usize];
                        let mine = v[a..b].to_vec();
                        // Each rank's part becomes 1000 × rank + index, then is gathered.
                        let mut w = vec![-1f32; n];
                        for (i, x) in w.iter_mut().enumerate().take(b).skip(a) {
                            *x = (1000 * rank) as f32 + i as f32;
                        }
                        g.all_gather_parts(&mut w, &owned).unwrap();
                        let bad = g.all_gather_parts(&mut w, &[(0, n - 1)]).unwrap_err();
                        (mine, w, bad.to_string())
                    })
                })
                .collect();
            let factor: u32 = (1..=world).sum();
            for (rank, h) in handles.into_iter().enumerate() {
                let (mine, w, bad) = h.join().unwrap();
                let (a, b) = owned[rank];
                let want: Vec<f32> = (a..b).map(|i| (i as u32 * factor) as f32).collect();
                assert_eq!(mine, want, "world {world} rank {rank}");
                let gathered: Vec<f32> = (0..n)
                    .map(|i| {
                        let owner = owned
                            .iter()
                            .position(|(s, e)| (*s..*e).contains(&i))
                            .unwrap();
                        (1000 * owner) as f32 + i as f32
                    })
                    .collect();
                assert_eq!(w, gathered, "world {world} rank {rank}");
                assert!(bad.contains("do not tile"), "{bad}");
            }
        }
    }

    #[test]
    fn a_dead_peer_fails_the_collective_promptly() {
        let master_port = port();
        let survivor = std::thread::spawn(move || {
            let g = Group::join(config(0, 2, master_port, 30)).unwrap();
            let started = Instant::now();
            let mut v = vec![1.0f32; 1000];
            let err = g.all_reduce_sum(&mut v).unwrap_err();
            (err.to_string(), started.elapsed())
        });
        let g = Group::join(config(1, 2, master_port, 30)).unwrap();
        drop(g); // rank 1 "dies": its sockets close
        let (err, took) = survivor.join().unwrap();
        assert!(
            err.contains("rank 0: a ring collective with ranks 1 and 1 failed"),
            "{err}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}
