//! The torchrun worker environment's variable names (PyTorch's `torch.distributed.elastic`), set by
//! the launcher and read by the worker.

/// Global rank of the worker.
pub const RANK: &str = "RANK";
/// Rank on this node (picks the GPU).
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// Index of this node.
pub const GROUP_RANK: &str = "GROUP_RANK";
/// Rank within the role (the same as `RANK` here: one role).
pub const ROLE_RANK: &str = "ROLE_RANK";
/// Number of workers in the job.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// Number of workers of the role (the same as `WORLD_SIZE` here).
pub const ROLE_WORLD_SIZE: &str = "ROLE_WORLD_SIZE";
/// Number of workers on this node.
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// Host of the TCPStore.
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// Port of the TCPStore.
pub const MASTER_PORT: &str = "MASTER_PORT";
/// How many times the agent restarted the group.
pub const RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";
/// The most restarts the agent makes.
pub const MAX_RESTARTS: &str = "TORCHELASTIC_MAX_RESTARTS";
/// `True` when the store is the agent's (else rank 0 hosts one).
pub const USE_AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";
/// The job's run id.
pub const RUN_ID: &str = "TORCHELASTIC_RUN_ID";
/// Where a failing worker writes its error for the agent.
pub const ERROR_FILE: &str = "TORCHELASTIC_ERROR_FILE";
