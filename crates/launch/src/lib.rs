//! waypoint-launch: both sides of the torchrun contract, without libtorch.
//!
//! - [`vars`]: the worker environment's variable names, defined once;
//! - [`launcher`]: what torchrun's agent does for the workers of one node (`waypoint launch`): host
//!   the c10d TCPStore, start the workers with that environment, forward signals, restart the group,
//!   report the failing rank;
//! - [`rendezvous`]: how the launchers of a job's nodes agree on the round of the worker group (a
//!   replaced node joins the job's current round);
//! - [`worker`]: what a worker reads of that environment ([`WorkerEnv`]) and the error file it leaves
//!   for its agent ([`write_error_file`]).

mod error;
pub mod launcher;
pub mod rendezvous;
pub mod vars;
pub mod worker;

pub use error::{LaunchError, Result};
pub use launcher::{run, LaunchArgs};
pub use worker::{write_error_file, WorkerEnv};
