//! [`Peers`]: what a save needs from the other ranks (a barrier, an all-gather, a broadcast), and
//! [`SingleRank`], the trivial case of one rank. The trainer implements [`Peers`] over its c10d store
//! channel; this crate knows nothing of how the bytes travel.

use crate::error::Result;

/// The other ranks of a save, as the save protocol ([`crate::CheckpointManager::save_with`]) uses
/// them. Every rank calls the same collectives with the same names, in the same order; rank 0 is the
/// committer. The calls may block (a save runs on a thread of its own).
pub trait Peers {
    /// This rank.
    fn rank(&self) -> u32;

    /// How many ranks there are.
    fn world(&self) -> u32;

    /// Waits until every rank has reached the barrier called `name`.
    fn barrier(&mut self, name: &str) -> Result<()>;

    /// Every rank's `data` for the all-gather called `name`, in rank order.
    fn all_gather(&mut self, name: &str, data: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Rank 0's `data` for the broadcast called `name`, on every rank.
    fn broadcast(&mut self, name: &str, data: &[u8]) -> Result<Vec<u8>>;
}

/// One rank alone: every collective returns at once with its own data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SingleRank;

impl Peers for SingleRank {
    fn rank(&self) -> u32 {
        0
    }

    fn world(&self) -> u32 {
        1
    }

    fn barrier(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }

    fn all_gather(&mut self, _name: &str, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![data.to_vec()])
    }

    fn broadcast(&mut self, _name: &str, data: &[u8]) -> Result<Vec<u8>> {
        Ok(data.to_vec())
    }
}
