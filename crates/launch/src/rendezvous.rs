//! The launchers' rendezvous: how the nodes of a job agree on which round of the worker group runs.
//!
//! A round is one incarnation of the worker group, numbered from 0 for the whole job (not per node:
//! a node started in place of a dead one joins the job's current round, never round 0). Its number
//! is the workers' `TORCHELASTIC_RESTART_COUNT`, so every rank of a round namespaces its store keys
//! alike and nothing of an earlier round (a dead rank's ring address) is ever read again.
//!
//! Everything lives in the job's TCPStore (node 0's launcher hosts it), under `waypoint-rdzv/`:
//! - `round`: the job's current round (a counter; absent is 0);
//! - `<round>/seat/<node_rank>`: the launcher holding that node's place in the round (its start
//!   time and pid; set once). A launcher finding another in its seat closes the round when it is
//!   the newer (the node was started again: the job re-forms around it), and stops when it is the
//!   older (it was replaced while cut off: it never takes the place back);
//! - `<round>/joined`, `<round>/done`: how many nodes joined the round, finished in it;
//! - `<round>/why`: the failures that closed the round, one line each (every node that saw one adds
//!   it), for the message of every node.
//!
//! A round ends when any node closes it (a worker failed, a node joined again): the round counter
//! moves on once (compare-and-set), every launcher still running workers of the old round notices
//! (it polls the counter), stops them and joins the new round, which starts when all `--nnodes`
//! nodes have joined. Each new round is one restart of the job, counted against `--max_restarts`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use waypoint_c10d::StoreClient;

use crate::error::{LaunchError, Result};

const PREFIX: &str = "waypoint-rdzv";

/// The most a store answer may take before the launcher gives up on the call (and connects again
/// for the next).
const STORE_ANSWER: Duration = Duration::from_secs(10);

/// How often a waiting launcher looks at the store again.
const POLL: Duration = Duration::from_millis(100);

/// Whether a job that has reached `round` may run it: round `r` is the job's `r`-th restart.
pub fn within_restarts(round: u32, max_restarts: u32) -> bool {
    round <= max_restarts
}

/// How joining a round ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// All nodes joined this round: start its workers.
    Round(u32),
    /// A signal arrived while waiting (its number).
    Signalled(usize),
}

/// One launcher's view of the job's rendezvous.
pub struct Rendezvous {
    store: StoreClient,
    /// Where the store is, to connect again after a call failed.
    host: String,
    port: u16,
    /// A call failed: the connection's state is unknown, the next call connects again.
    broken: std::cell::Cell<bool>,
    /// This launcher: its start time (ns since the epoch, zero-padded) and pid, ordered as started.
    id: String,
    nnodes: u32,
    node_rank: u32,
    max_restarts: u32,
    join_timeout: Duration,
}

impl Rendezvous {
    /// Connects to the job's store (waiting up to `join_timeout` for node 0 to host it).
    pub fn connect(
        addr: &str,
        port: u16,
        nnodes: u32,
        node_rank: u32,
        max_restarts: u32,
        join_timeout: Duration,
    ) -> Result<Self> {
        let store = Self::open(addr, port, join_timeout)?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Self {
            store,
            host: addr.to_string(),
            port,
            broken: std::cell::Cell::new(false),
            id: format!("{started:032}-{:010}", std::process::id()),
            nnodes,
            node_rank,
            max_restarts,
            join_timeout,
        })
    }

    fn open(addr: &str, port: u16, timeout: Duration) -> Result<StoreClient> {
        let mut store =
            StoreClient::connect(addr, port, timeout).map_err(|source| LaunchError::Store {
                addr: format!("{addr}:{port} (node 0's launcher hosts it)"),
                source,
            })?;
        store.set_io_timeout(Some(STORE_ANSWER));
        Ok(store)
    }

    /// Connects again when the last call failed.
    fn heal(&mut self) -> Result<()> {
        if self.broken.get() {
            self.store = Self::open(&self.host, self.port, STORE_ANSWER)?;
            self.broken.set(false);
        }
        Ok(())
    }

    fn key(round: u32, name: &str) -> String {
        format!("{PREFIX}/{round}/{name}")
    }

    fn lost(&self, what: &str) -> impl Fn(waypoint_c10d::DistError) -> LaunchError + '_ {
        let what = what.to_string();
        self.broken.set(true);
        move |e| {
            LaunchError::Rendezvous(format!(
                "node {}: {what}: the job's store at {} stopped answering ({e}); node 0's launcher \
                 hosts it: is node 0 still up?",
                self.node_rank,
                self.store.addr()
            ))
        }
    }

    /// The job's current round.
    pub fn current(&mut self) -> Result<u32> {
        self.heal()?;
        let round = self
            .store
            .add(&format!("{PREFIX}/round"), 0)
            .map_err(|e| (self.lost("reading the round"))(e))?;
        u32::try_from(round).map_err(|_| {
            LaunchError::Rendezvous(format!("the store holds a round out of range: {round}"))
        })
    }

    /// Whether the job has left `round` (another node closed it).
    pub fn moved_on(&mut self, round: u32) -> Result<bool> {
        Ok(self.current()? > round)
    }

    /// The failures that closed `round`, one per line (empty when none was recorded).
    pub fn why(&mut self, round: u32) -> String {
        if self.heal().is_err() {
            return String::new();
        }
        let key = Self::key(round, "why");
        match self.store.check(&[&key]) {
            Ok(true) => self
                .store
                .get(&key)
                .map(|v| String::from_utf8_lossy(&v).trim().to_string())
                .unwrap_or_default(),
            Ok(false) => String::new(),
            Err(_) => {
                self.broken.set(true);
                String::new()
            }
        }
    }

    /// Closes `round` for `why` (recorded for every node's message); the job moves to the next
    /// round unless another node closed it first.
    pub fn close(&mut self, round: u32, why: &str) -> Result<()> {
        self.heal()?;
        let line = format!("node {}: {why}\n", self.node_rank);
        self.store
            .append(&Self::key(round, "why"), line.as_bytes())
            .map_err(|e| (self.lost("recording a failure"))(e))?;
        let (now, next) = (round.to_string(), (round + 1).to_string());
        self.store
            .compare_set(&format!("{PREFIX}/round"), now.as_bytes(), next.as_bytes())
            .map_err(|e| (self.lost("closing the round"))(e))?;
        Ok(())
    }

    /// Joins the job's current round and waits until all nodes have; a round this node had already
    /// joined (it was started again) is closed first and the next one joined. Fails when the job has
    /// used its restarts or the other nodes do not come within the join timeout.
    pub fn join(&mut self, stop: &AtomicUsize) -> Result<Joined> {
        'rounds: loop {
            let round = self.current()?;
            if !within_restarts(round, self.max_restarts) {
                let why = self.why(round.saturating_sub(1));
                return Err(LaunchError::Rendezvous(format!(
                    "the job has used its {} restart(s) (--max_restarts); the last round ended \
                     with: {}",
                    self.max_restarts,
                    if why.is_empty() {
                        "(no failure recorded)"
                    } else {
                        &why
                    }
                )));
            }
            let seat_key = Self::key(round, &format!("seat/{}", self.node_rank));
            let held = self
                .store
                .compare_set(&seat_key, b"", self.id.as_bytes())
                .map_err(|e| (self.lost("joining"))(e))?;
            let held = String::from_utf8_lossy(&held).to_string();
            if held != self.id {
                if held > self.id {
                    return Err(LaunchError::Rendezvous(format!(
                        "node {}'s place in round {round} was taken by a launcher started after \
                         this one (this node was replaced); this launcher stops",
                        self.node_rank
                    )));
                }
                tracing::warn!(
                    round,
                    node = self.node_rank,
                    "this node had joined round {round} already (it was started again): \
                     re-forming the job"
                );
                self.close(round, "started again; the job re-forms around it")?;
                continue;
            }
            let joined_key = Self::key(round, "joined");
            self.store
                .add(&joined_key, 1)
                .map_err(|e| (self.lost("joining"))(e))?;
            tracing::info!(
                round,
                node = self.node_rank,
                "joined round {round}; waiting for the other nodes"
            );
            let deadline = Instant::now() + self.join_timeout;
            loop {
                if let sig @ 1.. = stop.load(Ordering::SeqCst) {
                    return Ok(Joined::Signalled(sig));
                }
                if self.moved_on(round)? {
                    continue 'rounds;
                }
                let joined = self
                    .store
                    .add(&joined_key, 0)
                    .map_err(|e| (self.lost("waiting for the other nodes"))(e))?;
                if joined >= i64::from(self.nnodes) {
                    return Ok(Joined::Round(round));
                }
                if Instant::now() >= deadline {
                    let missing = self.missing(round);
                    return Err(LaunchError::Rendezvous(format!(
                        "round {round}: {joined} of {} nodes joined within {:?}; missing: node(s) \
                         {missing}. Start their launchers (same --master_addr, --master_port and \
                         --nnodes) or raise --join_timeout_secs",
                        self.nnodes, self.join_timeout
                    )));
                }
                std::thread::sleep(POLL);
            }
        }
    }

    /// The nodes that have not joined `round`, as a list for a message.
    fn missing(&mut self, round: u32) -> String {
        let missing: Vec<String> = (0..self.nnodes)
            .filter(|n| {
                let key = Self::key(round, &format!("seat/{n}"));
                !self.store.check(&[&key]).unwrap_or(false)
            })
            .map(|n| n.to_string())
            .collect();
        missing.join(", ")
    }

    /// Records that this node's workers finished in `round`; node 0 (whose store the others use)
    /// then waits, up to the join timeout, until every node has, or the job has moved on.
    pub fn finish(&mut self, round: u32) -> Result<()> {
        self.heal()?;
        let key = Self::key(round, "done");
        self.store
            .add(&key, 1)
            .map_err(|e| (self.lost("reporting the end"))(e))?;
        if self.node_rank != 0 {
            return Ok(());
        }
        let deadline = Instant::now() + self.join_timeout;
        while Instant::now() < deadline {
            let done = self
                .store
                .add(&key, 0)
                .map_err(|e| (self.lost("waiting for the end"))(e))?;
            if done >= i64::from(self.nnodes) || self.moved_on(round)? {
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        tracing::warn!(
            round,
            "not every node reported its end; closing the store anyway"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypoint_c10d::StoreServer;

    fn node(port: u16, nnodes: u32, rank: u32, max_restarts: u32) -> Rendezvous {
        Rendezvous::connect(
            "127.0.0.1",
            port,
            nnodes,
            rank,
            max_restarts,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    #[test]
    fn the_restart_budget_counts_rounds() {
        assert!(within_restarts(0, 0));
        assert!(!within_restarts(1, 0));
        assert!(within_restarts(3, 3));
        assert!(!within_restarts(4, 3));
    }

    #[test]
    fn nodes_form_a_round_and_a_node_started_again_re_forms_it() {
        let server = StoreServer::bind("127.0.0.1", 0).unwrap();
        let port = server.port();
        let stop = AtomicUsize::new(0);
        let other = std::thread::spawn(move || {
            let stop = AtomicUsize::new(0);
            node(port, 2, 1, 3).join(&stop).unwrap()
        });
        let mut zero = node(port, 2, 0, 3);
        assert_eq!(zero.join(&stop).unwrap(), Joined::Round(0));
        assert_eq!(other.join().unwrap(), Joined::Round(0));
        assert!(!zero.moved_on(0).unwrap());

        // Node 1 comes back (its replacement): it closes round 0 and waits in round 1, which node 0
        // joins once it has noticed.
        let replacement = std::thread::spawn(move || {
            let stop = AtomicUsize::new(0);
            node(port, 2, 1, 3).join(&stop).unwrap()
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !zero.moved_on(0).unwrap() {
            assert!(Instant::now() < deadline, "the round was never closed");
            std::thread::sleep(POLL);
        }
        assert!(
            zero.why(0).contains("node 1: started again"),
            "{}",
            zero.why(0)
        );
        assert_eq!(zero.join(&stop).unwrap(), Joined::Round(1));
        assert_eq!(replacement.join().unwrap(), Joined::Round(1));
    }

    #[test]
    fn a_launcher_replaced_while_cut_off_stops_instead_of_taking_its_place_back() {
        let server = StoreServer::bind("127.0.0.1", 0).unwrap();
        let port = server.port();
        let stop = AtomicUsize::new(0);
        let mut old = node(port, 1, 0, 5);
        assert_eq!(old.join(&stop).unwrap(), Joined::Round(0));
        // Its replacement (started later) closes round 0 and holds the seat of round 1.
        let mut new = node(port, 1, 0, 5);
        assert_eq!(new.join(&stop).unwrap(), Joined::Round(1));
        let err = old.join(&stop).unwrap_err().to_string();
        assert!(
            err.contains("was taken by a launcher started after this one"),
            "{err}"
        );
        assert_eq!(new.current().unwrap(), 1, "the old launcher closed nothing");
    }

    #[test]
    fn closing_moves_the_job_on_once_and_the_budget_ends_it() {
        let server = StoreServer::bind("127.0.0.1", 0).unwrap();
        let (mut a, mut b) = (node(server.port(), 1, 0, 1), node(server.port(), 1, 0, 1));
        let stop = AtomicUsize::new(0);
        assert_eq!(a.join(&stop).unwrap(), Joined::Round(0));
        // Two nodes close the same round: one restart, both failures recorded.
        a.close(0, "rank 0 failed with exit code 1").unwrap();
        b.close(0, "rank 1 failed with exit code 9").unwrap();
        assert_eq!(a.current().unwrap(), 1);
        let why = a.why(0);
        assert!(
            why.contains("exit code 1") && why.contains("exit code 9"),
            "{why}"
        );
        assert_eq!(a.join(&stop).unwrap(), Joined::Round(1));
        a.close(1, "rank 0 failed again").unwrap();
        let err = a.join(&stop).unwrap_err().to_string();
        assert!(
            err.contains("used its 1 restart(s)") && err.contains("rank 0 failed again"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_node_is_named_after_the_join_timeout() {
        let server = StoreServer::bind("127.0.0.1", 0).unwrap();
        let mut zero = Rendezvous::connect(
            "127.0.0.1",
            server.port(),
            3,
            0,
            0,
            Duration::from_millis(300),
        )
        .unwrap();
        let err = zero.join(&AtomicUsize::new(0)).unwrap_err().to_string();
        assert!(
            err.contains("1 of 3 nodes joined") && err.contains("missing: node(s) 1, 2"),
            "{err}"
        );
    }
}
