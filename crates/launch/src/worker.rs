//! The worker side of the contract: the torchrun worker environment (`RANK`, `LOCAL_RANK`,
//! `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_RESTART_COUNT`,
//! `TORCHELASTIC_USE_AGENT_STORE`; absent variables mean a single worker started by hand), and the
//! error file a failing worker leaves for its agent (`TORCHELASTIC_ERROR_FILE`).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{LaunchError, Result};
use crate::vars;

/// What torchrun (or a PyTorchJob) tells a worker about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Global rank.
    pub rank: u64,
    /// Rank on this node (picks the GPU).
    pub local_rank: u64,
    /// Number of workers.
    pub world_size: u64,
    /// Workers on this node (`LOCAL_WORLD_SIZE`; they share its memory).
    pub local_world_size: u64,
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
        let bad = |var: &'static str, value: String, reason: &str| LaunchError::Env {
            var,
            value,
            reason: reason.to_string(),
        };
        let num = |key: &'static str, default: u64| -> Result<u64> {
            match lookup(key) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| bad(key, v, "is not a non-negative integer")),
            }
        };
        let port = num(vars::MASTER_PORT, 29500)?;
        let env = Self {
            rank: num(vars::RANK, 0)?,
            local_rank: num(vars::LOCAL_RANK, 0)?,
            world_size: num(vars::WORLD_SIZE, 1)?,
            local_world_size: num(vars::LOCAL_WORLD_SIZE, 1)?.max(1),
            restart_count: num(vars::RESTART_COUNT, 0)?,
            master_addr: lookup(vars::MASTER_ADDR).unwrap_or_else(|| "127.0.0.1".into()),
            master_port: u16::try_from(port)
                .map_err(|_| bad(vars::MASTER_PORT, port.to_string(), "is not a port number"))?,
            agent_store: lookup(vars::USE_AGENT_STORE)
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
        };
        if env.world_size < 1 {
            return Err(bad(
                vars::WORLD_SIZE,
                "0".into(),
                "there must be at least one worker",
            ));
        }
        if env.rank >= env.world_size {
            return Err(bad(
                vars::RANK,
                env.rank.to_string(),
                &format!("is not below WORLD_SIZE={}", env.world_size),
            ));
        }
        Ok(env)
    }
}

/// Writes the error file the agent reads (`TORCHELASTIC_ERROR_FILE`, torchelastic's JSON shape), if
/// that variable is set. `message` must already be fit to persist (secrets redacted).
pub fn write_error_file(message: &str) {
    let Ok(path) = std::env::var(vars::ERROR_FILE) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = serde_json::json!({
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": message,
                "timestamp": now.to_string(),
            }
        }
    });
    if let Err(e) = std::fs::write(&path, body.to_string()) {
        tracing::warn!(%path, %e, "could not write TORCHELASTIC_ERROR_FILE");
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
