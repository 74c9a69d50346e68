//! A job of two nodes on loopback (one launcher per node, one rank each) where a node dies for good
//! and a fresh one is started in its place, as a Kubernetes PyTorchJob does: the job re-forms in the
//! next round agreed by all nodes, the new node resumes with the survivor from the newest checkpoint,
//! and the end is bit-identical to an uninterrupted run of the same world size. Under `waypoint
//! launch` (its rendezvous) and under PyTorch's own `torchrun --rdzv-backend c10d`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::runs::{launch_flags, logged_step, max_diff, metrics_steps, rank_pid, weights};

const STEPS: u32 = 18;

fn train_flags(base: &str, run: &str) -> Vec<String> {
    common::runs::train_flags("cpu", base, run, 1, STEPS)
}

/// One node's launcher of a 2-node job whose store node 0 hosts at `port`.
fn node(base: &str, run: &str, port: &str, node_rank: u32) -> Child {
    node_with(base, run, port, node_rank, &[])
}

/// [`node`] with more `waypoint train` flags.
fn node_with(base: &str, run: &str, port: &str, node_rank: u32, extra: &[&str]) -> Child {
    let exe = env!("CARGO_BIN_EXE_waypoint");
    let node_rank = node_rank.to_string();
    common::spawn_logged(
        common::waypoint()
            .args(["launch", "--nnodes", "2", "--node_rank", &node_rank])
            .args(["--nproc_per_node", "1", "--master_addr", "127.0.0.1"])
            .args(["--master_port", port, "--max_restarts", "2"])
            .args(["--term_grace_secs", "20", "--join_timeout_secs", "120"])
            .args(["--", exe])
            .args(with_flags(train_flags(base, run), extra)),
    )
}

/// `args` with the flag–value pairs of `extra`, each replacing the flag's value when `args` has it.
fn with_flags(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    for pair in extra.chunks(2) {
        if let [flag, value] = pair {
            if args.iter().any(|a| a == flag) {
                common::runs::set_flag(&mut args, flag, value);
            } else {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
    }
    args
}

/// A launcher's whole log (stderr, piped) and how it ended, once it has.
fn finished(mut child: Child) -> (std::process::ExitStatus, String) {
    let mut log = String::new();
    let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log);
    (child.wait().unwrap(), log)
}

/// The whole log of a finished launcher; fails the test unless it succeeded.
fn succeeded(child: Child, what: &str) -> String {
    let (status, log) = finished(child);
    assert!(status.success(), "{what} failed:\n{log}");
    log
}

/// The same job of world size 2, uninterrupted, on one launcher: the anchor.
fn anchor(base: &str) {
    anchor_with(base, "anchor", &[]);
}

/// [`anchor`] as run `run`, with more `waypoint train` flags.
fn anchor_with(base: &str, run: &str, extra: &[&str]) {
    let exe = env!("CARGO_BIN_EXE_waypoint");
    let out = common::waypoint()
        .args(launch_flags(2, &["--", exe]))
        .args(with_flags(train_flags(base, run), extra))
        .output()
        .unwrap();
    common::ok(&out);
}

/// Checks that run `run` finished all steps with 2 ranks, its weights within `tolerance` of the
/// anchor's.
async fn ends_as_the_anchor(base: &str, run: &str, tolerance: f32) {
    ends_as(base, run, "anchor", tolerance).await;
}

/// Checks that run `run` finished all steps with 2 ranks, its weights within `tolerance` of run
/// `anchor`'s.
async fn ends_as(base: &str, run: &str, anchor: &str, tolerance: f32) {
    let dir = std::path::Path::new(base)
        .join(run)
        .join("framework=waypoint");
    let status = common::read_json(dir.join("status.json"));
    assert_eq!(status["state"], "FINISHED", "{status}");
    assert_eq!(status["step"], STEPS);
    let (_, anchor) = weights(base, anchor, u64::from(STEPS)).await;
    let (manifest, elastic) = weights(base, run, u64::from(STEPS)).await;
    assert_eq!(manifest.world_size, 2);
    let diff = max_diff(&anchor, &elastic);
    assert!(
        diff <= tolerance,
        "the re-formed job ends {diff} away from the uninterrupted one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_node_rejoins_under_waypoint_launch() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    anchor(base);

    let port = common::free_port().to_string();
    let zero = Follower::new(node(base, "elastic", &port, 0));
    let one = node(base, "elastic", &port, 1);
    // Node 1 dies for good — its launcher is killed, and its worker with it — while a save is in
    // flight (rank 0 wrote its share and waits for rank 1's, which never comes).
    zero.wait_line("rank 0's share of step 6", Duration::from_secs(120), |l| {
        l.contains("wrote this rank's share") && l.contains("checkpoint=step-000006")
    });
    common::send_signal(one.id(), "KILL").unwrap();
    let killed = Instant::now();
    let _ = finished(one);
    // The survivor's worker fails at once (the ring's connection closed) without waiting out the
    // save's collective timeout (20 s here), and node 0 waits for the job's next round.
    zero.wait_line("node 0 in round 1", Duration::from_secs(60), |l| {
        l.contains("joined round 1")
    });
    let recovered = killed.elapsed();
    eprintln!("node 0 left the dead round {recovered:?} after the kill");
    assert!(
        recovered < Duration::from_secs(10),
        "node 0 took {recovered:?} to leave the dead round"
    );
    // A fresh node takes its place (nothing of the old one's state on this machine is needed: the
    // durable tier is shared).
    let replacement = node(base, "elastic", &port, 1);
    let replacement_log = succeeded(replacement, "the replacement node");
    let (status, zero_log) = zero.end();
    assert!(status.success(), "node 0 failed:\n{zero_log}");
    assert!(
        zero_log.contains("restarting the group"),
        "node 0 restarts its worker in the next round:\n{zero_log}"
    );
    assert!(
        replacement_log.contains("joined round 1"),
        "the replacement joins the job's round 1, not a round 0 of its own:\n{replacement_log}"
    );
    let resumed = zero_log
        .lines()
        .find(|l| l.contains("resumed"))
        .unwrap_or_else(|| panic!("the re-formed group resumes:\n{zero_log}"));
    assert!(resumed.contains("checkpoint=step-0000"), "{resumed}");
    // The same ranks, the same sums: bit for bit.
    ends_as_the_anchor(base, "elastic", 0.0).await;
}

/// Each node of a 2-node job keeps a memory tier of its own (`--memory_tier_dir`, one per node):
/// a worker killed on node 1 makes the job re-form, and both nodes resume from their own tier at
/// the newest step both hold, and end bit-identical to the uninterrupted run. A node started in
/// place of a dead one, its tier empty, receives the newest checkpoint from its peer's tier (over
/// TCP, node to node) and the job resumes from it (`resumed_from.tier` = `peer`), bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_resumes_from_its_own_memory_tier() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    anchor(base);
    let tiers = [common::tier_dir(), common::tier_dir()];
    // No durable save before the end: the tiers are what a restart resumes from.
    let flags = tiers
        .each_ref()
        .map(|t| tier_flags(t, "1", &["--save_steps", "1000"]));
    let (f0, f1) = (as_strs(&flags[0]), as_strs(&flags[1]));

    // A worker killed: both tiers resume.
    let (killed_after, log, _) = kill_node1s_worker(base, "tiers", [&f0, &f1], 10, &|| true);
    let run = dir.path().join("tiers/framework=waypoint");
    let s = common::read_json(run.join("status.json"));
    // (`peer` when the killed worker's node was a tier save behind: it received the newest one.)
    let tier = s["resumed_from"]["tier"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(tier == "memory" || tier == "peer", "{s}\n{log}");
    let resumed: u64 = s["resumed_from"]["checkpoint"].as_str().unwrap()[5..]
        .parse()
        .unwrap();
    // (On this tiny model a step takes milliseconds, less than a tier write: saves that fall due
    // while one is written are skipped, so the newest may be a few steps back.)
    assert!(
        (1..=killed_after + 1).contains(&resumed),
        "resumed at {resumed}, killed after {killed_after}"
    );
    eprintln!("killed after step {killed_after}; both nodes resumed from their tiers at {resumed}");
    ends_as_the_anchor(base, "tiers", 0.0).await;
    for t in &tiers {
        assert!(
            std::fs::read_dir(t.path()).unwrap().next().is_none(),
            "a finished run leaves nothing in a node's tier"
        );
    }

    // A node replaced, its tier empty: it receives the newest checkpoint from node 0's tier, and
    // both resume from it (`peer`).
    let log = replace_node1(base, "replaced", [&f0, &f1], tiers[1].path(), 10, &|| true);
    let s = common::read_json(dir.path().join("replaced/framework=waypoint/status.json"));
    assert_eq!(s["resumed_from"]["tier"], "peer", "{s}\n{log}");
    assert!(log.contains("copying it from rank 0's node"), "{log}");
    ends_as_the_anchor(base, "replaced", 0.0).await;
    // Every step's line is in metrics.jsonl once (the tier's tail came with the copy).
    let steps = metrics_steps(&dir.path().join("replaced/framework=waypoint"));
    assert_eq!(steps, (1..=u64::from(STEPS)).collect::<Vec<_>>());
}

/// A launcher whose log lines a thread reads as they come.
struct Follower {
    lines: mpsc::Receiver<String>,
    seen: std::cell::RefCell<Vec<String>>,
    ended: std::thread::JoinHandle<std::process::ExitStatus>,
}

impl Follower {
    fn new(mut child: Child) -> Self {
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let ended = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
            child.wait().unwrap()
        });
        Self {
            lines,
            seen: Default::default(),
            ended,
        }
    }

    /// Waits for a line that `matches` and returns it; fails the test with the log after `limit`.
    fn wait_line(&self, what: &str, limit: Duration, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = matches(&line);
                    self.seen.borrow_mut().push(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no {what} within {limit:?}:\n{}",
                    self.seen.borrow().join("\n")
                ),
            }
        }
    }

    /// Waits for the launcher's end: its status and whole log.
    fn end(self) -> (std::process::ExitStatus, String) {
        let status = self.ended.join().unwrap();
        let mut log = self.seen.into_inner();
        log.extend(self.lines.try_iter());
        (status, log.join("\n"))
    }
}

/// The step run `run` (its folder) last resumed from, which must be a checkpoint of tier `tier`
/// (`logs` for the failure's message).
fn resumed_from(run: &Path, tier: &str, logs: &str) -> u64 {
    let s = common::read_json(run.join("status.json"));
    assert_eq!(s["resumed_from"]["tier"], tier, "{s}\n{logs}");
    s["resumed_from"]["checkpoint"].as_str().unwrap()[5..]
        .parse()
        .unwrap()
}

/// `waypoint train` flags keeping the memory tier in `tier`, saving it every `every` steps, then
/// `extra`.
fn tier_flags(tier: &tempfile::TempDir, every: &str, extra: &[&str]) -> Vec<String> {
    let path = tier.path().to_str().unwrap();
    ["--memory_save_steps", every, "--memory_tier_dir", path]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// Run `run` on two launchers (node `n` with the train flags `flags[n]`); once node 0 logged step
/// `after` and `ready` holds, node 1's worker is SIGKILLed and the job re-forms. Returns the step node 0 had logged
/// and both nodes' logs (each finished successfully).
fn kill_node1s_worker(
    base: &str,
    run: &str,
    flags: [&[&str]; 2],
    after: u64,
    ready: &dyn Fn() -> bool,
) -> (u64, String, String) {
    let port = common::free_port().to_string();
    let zero = Follower::new(node_with(base, run, &port, 0, flags[0]));
    let one = Follower::new(node_with(base, run, &port, 1, flags[1]));
    let started = one.wait_line("node 1's worker", Duration::from_secs(60), |l| {
        rank_pid(l, 1).is_some()
    });
    let step = zero.wait_line(&format!("step {after}"), Duration::from_secs(120), |l| {
        logged_step(l).is_some_and(|s| s >= after)
    });
    wait_until(run, ready);
    let killed_after = logged_step(&step).unwrap();
    common::send_signal(rank_pid(&started, 1).unwrap(), "KILL").unwrap();
    let (status, log) = zero.end();
    assert!(status.success(), "node 0:\n{log}");
    let (status, log1) = one.end();
    assert!(status.success(), "node 1:\n{log1}");
    (killed_after, log, log1)
}

/// Waits (at most 120 s) until `ready` holds for run `run`.
fn wait_until(run: &str, ready: &dyn Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "{run}: not ready in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `run` on two launchers; once node 0 logged step `after` and `ready` holds, node 1 dies for
/// good (launcher and worker SIGKILLed), its tier (`tier1`) is wiped, and a fresh node 1 is started
/// in its place. Returns node 0's log (both finished successfully).
fn replace_node1(
    base: &str,
    run: &str,
    flags: [&[&str]; 2],
    tier1: &Path,
    after: u64,
    ready: &dyn Fn() -> bool,
) -> String {
    let port = common::free_port().to_string();
    let zero = Follower::new(node_with(base, run, &port, 0, flags[0]));
    let one = node_with(base, run, &port, 1, flags[1]);
    zero.wait_line(&format!("step {after}"), Duration::from_secs(120), |l| {
        logged_step(l).is_some_and(|s| s >= after)
    });
    wait_until(run, ready);
    common::send_signal(one.id(), "KILL").unwrap();
    let _ = finished(one);
    std::fs::remove_dir_all(tier1).unwrap();
    std::fs::create_dir_all(tier1).unwrap();
    let replacement = node_with(base, run, &port, 1, flags[1]);
    succeeded(replacement, "the replacement");
    let (status, log) = zero.end();
    assert!(status.success(), "node 0:\n{log}");
    log
}

/// One node's `torchrun` agent (its own process group) of a 2-node job with c10d rendezvous at
/// `port`; node 0's agent hosts the rendezvous store.
fn torchrun_node(base: &str, port: &str, host: bool) -> Child {
    torchrun_node_with(base, "torchrun", port, host, &[])
}

/// [`torchrun_node`] for run `run`, with more `waypoint train` flags.
fn torchrun_node_with(base: &str, run: &str, port: &str, host: bool, extra: &[&str]) -> Child {
    let torchrun = common::python().replace("/bin/python", "/bin/torchrun");
    let mut cmd = Command::new(torchrun);
    cmd.args(["--nnodes", "2", "--nproc_per_node", "1"])
        .args(["--rdzv-backend", "c10d", "--rdzv-id", "elastic"])
        .args(["--rdzv-endpoint", &format!("127.0.0.1:{port}")])
        .args(["--rdzv-conf", if host { "is_host=1" } else { "is_host=0" }])
        .args(["--local-addr", "127.0.0.1", "--max-restarts", "2"])
        .args(["--monitor-interval", "0.5", "--no-python"])
        .arg(env!("CARGO_BIN_EXE_waypoint"))
        .args(with_flags(train_flags(base, run), extra))
        // PyTorch's shared rendezvous store keeps the keys of every round, and a replaced node's
        // restart count starts again at 0: a store per round is the documented way round it.
        .env("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        .env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "info")
        .process_group(0);
    common::spawn_logged(&mut cmd)
}

/// A torchrun node dies for good: its agent and its workers (which lead sessions of their own)
/// are SIGKILLed.
fn kill_torchrun_node(agent: Child) {
    let workers = children(agent.id());
    assert!(!workers.is_empty(), "the node's agent has a worker");
    common::send_signal(agent.id(), "KILL").unwrap();
    for w in &workers {
        common::send_signal(w, "KILL").unwrap();
    }
    let _ = finished(agent);
}

/// Collects `child`'s log on a thread of its own (so that its pipe never fills) until it exits.
fn drain(child: Child) -> std::thread::JoinHandle<(std::process::ExitStatus, String)> {
    std::thread::spawn(move || finished(child))
}

/// The processes `pid` started (torchrun's workers lead sessions of their own).
fn children(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_node_rejoins_under_pytorchs_torchrun() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    anchor(base);
    let port = common::free_port().to_string();
    let zero = torchrun_node(base, &port, true);
    let one = torchrun_node(base, &port, false);
    // Rank 0, which logs the progress, may be either node's worker: watch the storage instead.
    let zero_log = drain(zero);
    let run = dir.path().join("torchrun/framework=waypoint");
    common::wait_for(
        "the job's checkpoint of step 6",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || run.join("checkpoints/step-000006.json").exists(),
    );
    // Node 1 dies for good: its agent and its worker.
    kill_torchrun_node(one);
    let replacement = torchrun_node(base, &port, false);
    let replacement_log = succeeded(replacement, "the replacement node");
    let (status, zero_log) = zero_log.join().unwrap();
    assert!(
        status.success(),
        "node 0 failed:\n{zero_log}\nreplacement:\n{replacement_log}"
    );
    let status = common::read_json(run.join("status.json"));
    assert!(status["attempt"].as_u64().unwrap() >= 2, "{status}");
    // torchrun may give the ranks to the nodes in another order in the new round, so the sums may
    // be taken in another order: equal up to rounding.
    ends_as_the_anchor(base, "torchrun", 2e-5).await;
}

/// The same under `torchrun` with each node's memory tier on and no durable save before the end:
/// the replacement, its tier empty, receives the survivor's newest tier checkpoint over TCP
/// (`peer`) and the job ends as the uninterrupted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_node_under_torchrun_receives_the_memory_tier_from_its_peer() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    anchor(base);
    let tiers = [common::tier_dir(), common::tier_dir(), common::tier_dir()];
    let flags = tiers
        .each_ref()
        .map(|t| tier_flags(t, "1", &["--save_steps", "1000"]));
    let flags = flags.each_ref().map(|f| as_strs(f));
    let port = common::free_port().to_string();
    let zero = torchrun_node_with(base, "tiers", &port, true, &flags[0]);
    let one = torchrun_node_with(base, "tiers", &port, false, &flags[1]);
    let zero_log = drain(zero);
    // Node 0's tier holds step 6 or later (whichever rank runs there; it keeps the newest 2).
    let newest_step = |tier: &std::path::Path| -> u64 {
        let runs = std::fs::read_dir(tier).into_iter().flatten().flatten();
        runs.flat_map(|r| {
            std::fs::read_dir(r.path().join("tiers/framework=waypoint/checkpoints"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("step-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
    };
    common::wait_for(
        "node 0's tier checkpoint of step 6 or later",
        Duration::from_secs(120),
        Duration::from_millis(20),
        || newest_step(tiers[0].path()) >= 6,
    );
    kill_torchrun_node(one);
    // The replacement starts with a tier of its own, empty.
    let replacement = torchrun_node_with(base, "tiers", &port, false, &flags[2]);
    let replacement_log = succeeded(replacement, "the replacement node");
    let (status, zero_log) = zero_log.join().unwrap();
    assert!(
        status.success(),
        "node 0 failed:\n{zero_log}\nreplacement:\n{replacement_log}"
    );
    let run = dir.path().join("tiers/framework=waypoint");
    let logs = format!("node 0:\n{zero_log}\nreplacement:\n{replacement_log}");
    let resumed = resumed_from(&run, "peer", &logs);
    assert!(resumed >= 6, "resumed at {resumed}");
    ends_as_the_anchor(base, "tiers", 2e-5).await;
    let steps = metrics_steps(&run);
    assert_eq!(steps, (1..=u64::from(STEPS)).collect::<Vec<_>>());
}

/// A state sharded over the ranks of both nodes (`--sharding full`): each node's tier holds its
/// own rank's shards, and the other node's tier a replica of them. A worker killed: both nodes
/// resume from their own tiers, each rank reading its rows, bit-identical to the uninterrupted
/// sharded run. A node replaced, its tier empty: it receives its shards back from the replica the
/// other node keeps (`peer`), newer than the durable tier's step, bit-identical too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_state_resumes_from_each_nodes_own_shards() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    anchor_with(base, "anchor-sharded", &["--sharding", "full"]);
    let tiers = [common::tier_dir(), common::tier_dir()];
    // Tier saves every 4 steps give each write time to end on both nodes before the kill (a tier
    // save still being written when the next falls due is skipped).
    let extra = ["--save_steps", "6", "--sharding", "full"];
    let flags = tiers.each_ref().map(|t| tier_flags(t, "4", &extra));
    let (f0, f1) = (as_strs(&flags[0]), as_strs(&flags[1]));

    // A worker killed after step 10 (the tiers' newest is 8, the durable tier's 6): the tiers
    // resume.
    let (killed_after, log, log1) = kill_node1s_worker(base, "shards", [&f0, &f1], 10, &|| true);
    let run = dir.path().join("shards/framework=waypoint");
    let resumed = resumed_from(&run, "memory", &format!("{log}\nnode 1:\n{log1}"));
    assert!(
        resumed > 6 && resumed <= killed_after + 1,
        "resumed at {resumed}, killed after {killed_after}, durable at 6:\n{log}"
    );
    ends_as(base, "shards", "anchor-sharded", 0.0).await;

    // A node replaced, its tier wiped, once node 0's tier keeps node 1's shards of step 8 (newer
    // than the durable tier's 6): node 1 receives them back and the job resumes from the tiers.
    let replica_of_8 = || holds_replica(tiers[0].path(), "-w2-r1-l1", "shards-replaced", 8);
    let log = replace_node1(
        base,
        "shards-replaced",
        [&f0, &f1],
        tiers[1].path(),
        8,
        &replica_of_8,
    );
    let run = dir.path().join("shards-replaced/framework=waypoint");
    let resumed = resumed_from(&run, "peer", &log);
    assert!(resumed >= 8, "resumed at {resumed}:\n{log}");
    eprintln!("a replaced node took its shards back from the other node's tier: step {resumed}");
    ends_as(base, "shards-replaced", "anchor-sharded", 0.0).await;
    let steps = metrics_steps(&run);
    assert_eq!(steps, (1..=u64::from(STEPS)).collect::<Vec<_>>());
    for t in &tiers {
        assert!(
            std::fs::read_dir(t.path()).unwrap().next().is_none(),
            "a finished run leaves nothing in a node's tier"
        );
    }
}

/// Whether the memory tier at `tier` keeps, in a folder whose name ends with `owner`, run `run`'s
/// committed step `step`.
fn holds_replica(tier: &Path, owner: &str, run: &str, step: u64) -> bool {
    let manifest = format!("{run}/framework=waypoint/checkpoints/step-{step:06}.json");
    std::fs::read_dir(tier)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name().to_str().is_some_and(|n| n.ends_with(owner))
                && e.path().join(&manifest).is_file()
        })
}

/// LoRA whose optimizer state is cut by rank over 2 nodes keeps the tier off, named in the log (a
/// LoRA resume reads whole tensors, which no node's tier would hold); a worker killed resumes from
/// the durable tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_sharded_over_nodes_keeps_the_tier_off() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let tiers = [common::tier_dir(), common::tier_dir()];
    let extra = [
        "--save_steps",
        "4",
        "--sharding",
        "optimizer",
        "--lora_rank",
        "4",
        // Steps enough after step 4's commit for the kill to find the job running.
        "--max_steps",
        "60",
    ];
    let flags = tiers.each_ref().map(|t| tier_flags(t, "1", &extra));
    let (f0, f1) = (as_strs(&flags[0]), as_strs(&flags[1]));
    // Killed once step 4 is durable (its upload can still be under way at step 6 on a busy
    // machine; the kill would then restart from scratch, with nothing to resume from).
    let durable_4 = dir
        .path()
        .join("lora/framework=waypoint/checkpoints/step-000004.json");
    let (_, log, _) = kill_node1s_worker(base, "lora", [&f0, &f1], 6, &|| durable_4.exists());
    assert!(
        log.contains("the memory tier is off: LoRA with --sharding over several nodes"),
        "{log}"
    );
    let s = common::read_json(dir.path().join("lora/framework=waypoint/status.json"));
    assert_eq!(s["state"], "FINISHED", "{s}");
    assert_eq!(s["resumed_from"]["tier"], "durable", "{s}\n{log}");
    for t in &tiers {
        assert!(std::fs::read_dir(t.path()).unwrap().next().is_none());
    }
}
