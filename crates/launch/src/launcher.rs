//! The launcher side of the contract: what torchrun does for the workers of one node.
//!
//! Node 0's launcher hosts the c10d TCPStore (at `--master_addr:--master_port`, listening on
//! `--store_bind_addr`). Every node's launcher joins the job's rendezvous ([`crate::rendezvous`]),
//! starts `--nproc_per_node` copies of the command with the torchrun worker environment for the
//! round all nodes agreed on, forwards SIGTERM and SIGINT (then SIGKILL after `--term_grace_secs`),
//! and when a worker fails — or another node closes the round, or a node is started in place of a
//! dead one — stops its workers and joins the next round, up to `--max_restarts` rounds for the
//! whole job. It ends with the failing rank's exit code, and prints (and passes on) that rank's error
//! file. Defaults come from the `PET_*` variables, as torchrun reads them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use waypoint_c10d::StoreServer;

use crate::error::{LaunchError, Result};
use crate::rendezvous::{Joined, Rendezvous};
use crate::vars;
use crate::worker::write_error_file;

/// `waypoint launch` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Workers on this node.
    #[arg(
        long = "nproc_per_node",
        env = "PET_NPROC_PER_NODE",
        default_value_t = 1
    )]
    pub nproc_per_node: u32,
    /// Nodes in the job.
    #[arg(long = "nnodes", env = "PET_NNODES", default_value_t = 1)]
    pub nnodes: u32,
    /// This node's index.
    #[arg(long = "node_rank", env = "PET_NODE_RANK", default_value_t = 0)]
    pub node_rank: u32,
    /// Host of node 0, where the store runs.
    #[arg(
        long = "master_addr",
        env = "PET_MASTER_ADDR",
        default_value = "127.0.0.1"
    )]
    pub master_addr: String,
    /// Port of the store (0 on a single node: any free port).
    #[arg(long = "master_port", env = "PET_MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// Address node 0's store listens on (default: `--master_addr` on one node, every interface on
    /// several).
    #[arg(long = "store_bind_addr")]
    pub store_bind_addr: Option<String>,
    /// Restarts of the worker group after a failure, counted for the whole job (a round re-formed
    /// around a replaced node is one).
    #[arg(long = "max_restarts", env = "PET_MAX_RESTARTS", default_value_t = 0)]
    pub max_restarts: u32,
    /// Seconds a launcher waits for the other nodes to join a round (and node 0 for them to end).
    #[arg(long = "join_timeout_secs", default_value_t = 600)]
    pub join_timeout_secs: u64,
    /// Seconds workers get to exit after SIGTERM before SIGKILL (at most a day).
    #[arg(long = "term_grace_secs", default_value_t = 30)]
    pub term_grace_secs: u64,
    /// Start more workers than this machine can run well (more than 4 per CPU).
    #[arg(long = "oversubscribe")]
    pub oversubscribe: bool,
    /// The worker command (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// How one round of the worker group ended.
enum Round {
    Succeeded,
    Failed {
        rank: u32,
        code: i32,
        error: Option<String>,
    },
    Signalled(usize),
    /// Another node closed the round (a failure there, a node started again): join the next one.
    MovedOn,
}

/// How often a launcher running workers looks whether the job has left their round.
const ROUND_WATCH: Duration = Duration::from_millis(500);

/// The most `--term_grace_secs` (and `--join_timeout_secs`) may be (a day).
pub const MAX_TERM_GRACE_SECS: u64 = 24 * 3600;

/// Workers per CPU beyond which `--nproc_per_node` needs `--oversubscribe`.
pub const WORKERS_PER_CPU: u32 = 4;

/// The most workers this machine runs without `--oversubscribe`: [`WORKERS_PER_CPU`] per CPU, and
/// at least 8.
pub fn max_workers() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cpus)
        .unwrap_or(u32::MAX)
        .saturating_mul(WORKERS_PER_CPU)
        .max(8)
}

impl LaunchArgs {
    /// Checks the flags against each other and against what this machine can run.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(LaunchError::Usage(m));
        if self.nproc_per_node < 1 {
            return fail("--nproc_per_node must be at least 1".into());
        }
        let limit = max_workers();
        if self.nproc_per_node > limit && !self.oversubscribe {
            return fail(format!(
                "--nproc_per_node {} is more than this machine runs well ({limit}: {WORKERS_PER_CPU} \
                 per CPU); use fewer workers, or pass --oversubscribe to start them anyway",
                self.nproc_per_node
            ));
        }
        if self.nnodes < 1 {
            return fail("--nnodes must be at least 1".into());
        }
        if self.nproc_per_node.checked_mul(self.nnodes).is_none() {
            return fail(format!(
                "--nproc_per_node {} × --nnodes {} workers is more than a job can have ({})",
                self.nproc_per_node,
                self.nnodes,
                u32::MAX
            ));
        }
        if self.node_rank >= self.nnodes {
            return fail(format!(
                "--node_rank {} is not below --nnodes {}",
                self.node_rank, self.nnodes
            ));
        }
        if self.nnodes > 1 && self.master_port == 0 {
            return fail(
                "--master_port 0 only works on one node: the other nodes must know the port".into(),
            );
        }
        if self.term_grace_secs > MAX_TERM_GRACE_SECS {
            return fail(format!(
                "--term_grace_secs {} is out of range: use 0 to {MAX_TERM_GRACE_SECS}",
                self.term_grace_secs
            ));
        }
        if self.join_timeout_secs == 0 || self.join_timeout_secs > MAX_TERM_GRACE_SECS {
            return fail(format!(
                "--join_timeout_secs {} is out of range: use 1 to {MAX_TERM_GRACE_SECS}",
                self.join_timeout_secs
            ));
        }
        if self.command.first().is_none_or(|c| c.is_empty()) {
            return fail("no worker command: pass it after `--`".into());
        }
        Ok(())
    }
}

/// The launcher's folder of worker error files, removed when the launcher ends (returns, fails or
/// stops on a signal). Folders of launchers that were killed outright are removed by the next one.
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<Self> {
        let tmp = std::env::temp_dir();
        remove_stale_run_dirs(&tmp);
        let dir = tmp.join(format!("waypoint-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| LaunchError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        Ok(Self(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), "could not remove the launcher's folder: {e}");
            }
        }
    }
}

/// Removes `waypoint-launch-<pid>` folders under `tmp` whose launcher is gone (killed by SIGKILL).
fn remove_stale_run_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("waypoint-launch-"))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs the launcher; returns the exit code. Flags that cannot work fail with
/// [`LaunchError::Usage`] before anything starts.
pub fn run(args: &LaunchArgs, stop: Arc<AtomicUsize>) -> Result<ExitCode> {
    args.validate()?;
    // torchrun's agent also stops its workers on SIGHUP and SIGQUIT; so does this launcher (and its
    // folder goes with it).
    for signal in [libc::SIGHUP, libc::SIGQUIT] {
        if let Err(e) = signal_hook::flag::register_usize(signal, stop.clone(), signal as usize) {
            tracing::warn!(signal, %e, "could not install the signal handler");
        }
    }
    // Node 0 hosts the store for the whole job, for every round (as torchrun's agent does).
    let server = if args.node_rank == 0 {
        let bind = match &args.store_bind_addr {
            Some(addr) => addr.as_str(),
            None if args.nnodes > 1 => "0.0.0.0",
            None => args.master_addr.as_str(),
        };
        Some(
            StoreServer::bind(bind, args.master_port).map_err(|source| LaunchError::Store {
                addr: format!("{bind}:{}", args.master_port),
                source,
            })?,
        )
    } else {
        None
    };
    let port = server.as_ref().map_or(args.master_port, |s| s.port());
    let run_dir = RunDir::create()?;
    tracing::info!(
        nproc_per_node = args.nproc_per_node,
        nnodes = args.nnodes,
        node_rank = args.node_rank,
        store = %format!("{}:{port}", args.master_addr),
        "launching workers"
    );
    let mut rdzv = Rendezvous::connect(
        &args.master_addr,
        port,
        args.nnodes,
        args.node_rank,
        args.max_restarts,
        Duration::from_secs(args.join_timeout_secs),
    )?;
    loop {
        let round_no = match rdzv.join(&stop)? {
            Joined::Round(r) => r,
            Joined::Signalled(sig) => return Ok(ExitCode::from((128 + sig).min(255) as u8)),
        };
        match round(args, port, round_no, &run_dir.0, &stop, &mut rdzv)? {
            Round::Succeeded => {
                rdzv.finish(round_no)?;
                return Ok(ExitCode::SUCCESS);
            }
            Round::Signalled(sig) => return Ok(ExitCode::from((128 + sig).min(255) as u8)),
            Round::MovedOn => {
                let why = rdzv.why(round_no);
                tracing::warn!(
                    round = round_no,
                    "another node ended round {round_no} ({}); stopped this node's workers, \
                     re-forming the group",
                    if why.is_empty() {
                        "no failure recorded"
                    } else {
                        why.as_str()
                    }
                );
            }
            Round::Failed { rank, code, error } => {
                let detail = error.as_deref().unwrap_or("(no error file)");
                rdzv.close(
                    round_no,
                    &format!("rank {rank} failed with exit code {code}: {detail}"),
                )?;
                if round_no < args.max_restarts {
                    tracing::warn!(
                        rank,
                        code,
                        restart = round_no + 1,
                        max_restarts = args.max_restarts,
                        "worker failed: {detail}; restarting the group"
                    );
                    continue;
                }
                // (A closed stderr is no reason to fail differently.)
                let _ = writeln!(
                    std::io::stderr(),
                    "error: rank {rank} failed with exit code {code} after {round_no} restart(s): {detail}"
                );
                // Passed on as it is, for the agent above (torchrun, a PyTorchJob) to read.
                if let Some(e) = &error {
                    write_error_file(e);
                }
                return Ok(ExitCode::from(code.clamp(1, 255) as u8));
            }
        }
    }
}

/// Starts the group, watches it, stops it.
fn round(
    args: &LaunchArgs,
    port: u16,
    restart: u32,
    run_dir: &Path,
    stop: &AtomicUsize,
    rdzv: &mut Rendezvous,
) -> Result<Round> {
    let world = args.nproc_per_node * args.nnodes;
    let mut workers: Vec<(u32, Child, PathBuf)> = Vec::new();
    for local in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local;
        let error_file = run_dir.join(format!("restart{restart}-rank{rank}-error.json"));
        let _ = std::fs::remove_file(&error_file);
        let mut cmd = Command::new(&args.command[0]);
        cmd.args(&args.command[1..])
            .env(vars::RANK, rank.to_string())
            .env(vars::LOCAL_RANK, local.to_string())
            .env(vars::GROUP_RANK, args.node_rank.to_string())
            .env(vars::ROLE_RANK, rank.to_string())
            .env(vars::WORLD_SIZE, world.to_string())
            .env(vars::ROLE_WORLD_SIZE, world.to_string())
            .env(vars::LOCAL_WORLD_SIZE, args.nproc_per_node.to_string())
            .env(vars::MASTER_ADDR, &args.master_addr)
            .env(vars::MASTER_PORT, port.to_string())
            .env(vars::RESTART_COUNT, restart.to_string())
            .env(vars::MAX_RESTARTS, args.max_restarts.to_string())
            .env(vars::USE_AGENT_STORE, "True")
            .env(vars::RUN_ID, "none")
            .env(vars::ERROR_FILE, &error_file);
        if std::env::var_os("OMP_NUM_THREADS").is_none() && args.nproc_per_node > 1 {
            cmd.env("OMP_NUM_THREADS", "1");
        }
        // Each worker leads its own process group, so stopping it stops what it started too; and it
        // dies with the launcher, so a killed launcher leaves no orphan holding the store's port.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut workers, Duration::from_secs(args.term_grace_secs));
                return Err(LaunchError::Io {
                    what: format!("starting worker {rank} ({:?})", args.command[0]),
                    source: e,
                });
            }
        };
        // The launcher names each worker's pid (the workers other than rank 0 print only their
        // warnings and errors).
        tracing::info!(rank, pid = child.id(), restart, "worker started");
        workers.push((rank, child, error_file));
    }
    let grace = Duration::from_secs(args.term_grace_secs);
    let mut done = vec![false; workers.len()];
    let mut looked = Instant::now();
    loop {
        // Whether another node ended the round (its failure, a node started again). A store that
        // does not answer is not acted on here: the workers, which use it too, fail on their own.
        if looked.elapsed() >= ROUND_WATCH {
            looked = Instant::now();
            match rdzv.moved_on(restart) {
                Ok(true) => {
                    stop_all(&mut workers, grace);
                    return Ok(Round::MovedOn);
                }
                Ok(false) => {}
                Err(e) => tracing::debug!("watching the round: {e}"),
            }
        }
        if let sig @ 1.. = stop.load(Ordering::SeqCst) {
            tracing::warn!(signal = sig, "forwarding the signal to the workers");
            stop_all(&mut workers, grace);
            return Ok(Round::Signalled(sig));
        }
        for (i, (rank, child, error_file)) in workers.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            let status = child.try_wait().map_err(|source| LaunchError::Io {
                what: format!("watching worker {rank}"),
                source,
            })?;
            if let Some(status) = status {
                done[i] = true;
                if !status.success() {
                    let code = status.code().unwrap_or_else(|| {
                        use std::os::unix::process::ExitStatusExt;
                        128 + status.signal().unwrap_or(9)
                    });
                    let (rank, error) = (*rank, std::fs::read_to_string(&*error_file).ok());
                    stop_all(&mut workers, grace);
                    return Ok(Round::Failed { rank, code, error });
                }
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(Round::Succeeded);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to every live worker's group, SIGKILL to those still alive after `grace`.
fn stop_all(workers: &mut [(u32, Child, PathBuf)], grace: Duration) {
    for (_, child, _) in workers.iter_mut() {
        if child.try_wait().ok().flatten().is_none() {
            signal_group(child, libc::SIGTERM);
        }
    }
    let deadline = Instant::now()
        .checked_add(grace)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(MAX_TERM_GRACE_SECS));
    for (rank, child, _) in workers.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    tracing::warn!(rank = *rank, "worker ignored SIGTERM; killing it");
                    signal_group(child, libc::SIGKILL);
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Sends `signal` to a worker's process group (the worker leads it; not yet reaped, so the id is
/// still its own).
fn signal_group(child: &Child, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory effects; -pid names the group our unreaped child leads.
    unsafe {
        libc::kill(-pid, signal);
    }
}
