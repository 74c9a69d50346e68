//! waypoint-c10d: how ranks find and talk to each other, with no libtorch.
//!
//! - [`StoreClient`] / [`StoreServer`]: PyTorch c10d's TCPStore, wire-compatible with PyTorch 2.13
//!   (a waypoint worker joins the store torchrun's agent hosts; `waypoint launch` hosts one that
//!   PyTorch clients can use).
//! - [`Group`]: ranks joined through the store: barrier, all-gather, broadcast, and a TCP ring
//!   all-reduce (the CPU path for gradients).
//! - [`wire`]: the protocol's messages and encoding, shared by both ends.

#![forbid(unsafe_code)]

mod client;
mod error;
mod group;
mod server;
pub mod wire;

pub use client::StoreClient;
pub use error::{DistError, Result};
pub use group::{Group, GroupConfig, SideChannel};
pub use server::StoreServer;
