//! The `waypoint` command line: flags, subcommands, exit codes and what is printed. The work is done
//! by the crates under `crates/`: [`waypoint_trainer`] (`train`), [`waypoint_launch`] (`launch`) and
//! [`waypoint_checkpoint`] (`ckpt`).
//!
//! - [`cli`]: parsing, dispatch, exit codes (0 done, 1 failed, 2 usage, 3 damage, 128+N signal);
//! - [`ckpt`]: `waypoint ckpt list|verify|promote|gc`;
//! - [`status`]: `waypoint status`, where a run stands.

pub mod ckpt;
pub mod cli;
pub mod runs;
pub mod status;
