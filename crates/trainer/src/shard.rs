//! Row sharding, as PyTorch FSDP2's `Shard(0)`: rank r of N owns rows `[r·⌈d0/N⌉, …)` of a tensor
//! whose first dimension is d0 (the last shard may be shorter, or empty). A pure function of
//! (d0, rank, world), so any world size can cut a checkpoint's tensors anew
//! (resharding). [`RowCollective`] is what sharded weights need of the ranks: the model runs over
//! it, the collectives implement it.

use anyhow::Result;
use tch::Tensor;

/// A range of rows of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rows {
    /// First row.
    pub(crate) start: i64,
    /// Number of rows (0: this rank owns none).
    pub(crate) len: i64,
}

/// The rows of a tensor with `d0` rows that `rank` of `world` owns.
pub(crate) fn rows_of(d0: i64, rank: u32, world: u32) -> Rows {
    let world = i64::from(world.max(1));
    let chunk = (d0 + world - 1) / world;
    let start = (i64::from(rank) * chunk).min(d0);
    Rows {
        start,
        len: chunk.min(d0 - start),
    }
}

/// The two collectives sharded weights need, over whole tensors cut into rows.
pub(crate) trait RowCollective {
    /// Whole tensors of `shapes` from every rank's rows of them ([`rows_of`]
    /// its rank; `shards[i]`: this rank's rows of tensor i), in the dtype each shard comes in.
    fn gather(&mut self, shards: &[Tensor], shapes: &[Vec<i64>]) -> Result<Vec<Tensor>>;
    /// The sum over the ranks of whole tensors, returning this rank's `rows` of each (`whole` is
    /// consumed, so it can be freed as soon as it is staged).
    fn reduce(&mut self, whole: Vec<Tensor>, rows: &[Rows]) -> Result<Vec<Tensor>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_rows_with_the_last_short_or_empty() {
        for d0 in [1i64, 2, 3, 7, 64, 259] {
            for world in 1u32..=5 {
                let mut next = 0;
                for rank in 0..world {
                    let r = rows_of(d0, rank, world);
                    assert_eq!(r.start, next.min(d0), "d0 {d0} world {world} rank {rank}");
                    assert!(r.len >= 0 && r.len <= (d0 + world as i64 - 1) / world as i64);
                    next = r.start + r.len;
                }
                assert_eq!(next, d0, "d0 {d0} world {world}");
            }
        }
        // FSDP2's layout: 7 rows over 3 ranks are 3 + 3 + 1; 2 rows over 3 ranks leave one empty.
        let lens: Vec<i64> = (0..3).map(|r| rows_of(7, r, 3).len).collect();
        assert_eq!(lens, [3, 3, 1]);
        assert_eq!(rows_of(2, 2, 3), Rows { start: 2, len: 0 });
    }
}
