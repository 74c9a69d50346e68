//! The torchrun worker environment: `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`,
//! `TORCHELASTIC_RESTART_COUNT`, `TORCHELASTIC_USE_AGENT_STORE`. Absent variables mean a single
//! worker started by hand.

use anyhow::{ensure, Context, Result};

/// What torchrun (or a PyTorchJob) tells a worker about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Global rank.
    pub rank: u64,
    /// Rank on this node (picks the GPU).
    pub local_rank: u64,
    /// Number of workers.
    pub world_size: u64,
    /// How many times the agent restarted the group.
    pub restart_count: u64,
    /// Host of the TCPStore.
    pub master_addr: String,
    /// Port of the TCPStore.
    pub master_port: u16,
    /// The store is the agent's (torchrun, `waypoint launch`); else rank 0 hosts it.
    pub agent_store: bool,
}

impl WorkerEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads variables through `lookup` (testable without touching the process environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |key: &str, default: u64| -> Result<u64> {
            match lookup(key) {
                None => Ok(default),
                Some(v) => v.trim().parse().with_context(|| {
                    format!("environment variable {key}={v:?} is not a non-negative integer")
                }),
            }
        };
        let env = Self {
            rank: num("RANK", 0)?,
            local_rank: num("LOCAL_RANK", 0)?,
            world_size: num("WORLD_SIZE", 1)?,
            restart_count: num("TORCHELASTIC_RESTART_COUNT", 0)?,
            master_addr: lookup("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: u16::try_from(num("MASTER_PORT", 29500)?)
                .context("MASTER_PORT is not a port number")?,
            agent_store: lookup("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
        };
        ensure!(
            env.world_size >= 1,
            "WORLD_SIZE=0: there must be at least one worker"
        );
        ensure!(
            env.rank < env.world_size,
            "RANK={} is not below WORLD_SIZE={}",
            env.rank,
            env.world_size
        );
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_torchrun_variables_with_defaults_and_clear_errors() {
        let env = WorkerEnv::from_lookup(|_| None).unwrap();
        assert_eq!((env.rank, env.world_size), (0, 1));
        let vars = [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")];
        let get = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let env = WorkerEnv::from_lookup(get).unwrap();
        assert_eq!((env.rank, env.local_rank, env.world_size), (1, 1, 2));
        let err = WorkerEnv::from_lookup(|k| (k == "RANK").then(|| "x".to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=\"x\""), "{err}");
        assert!(WorkerEnv::from_lookup(|k| (k == "RANK").then(|| "3".into())).is_err());
    }
}
