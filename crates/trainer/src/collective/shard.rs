//! Row sharding, as PyTorch FSDP2's `Shard(0)`: rank r of N owns rows `[r·⌈d0/N⌉, …)` of a tensor
//! whose first dimension is d0 (the last shard may be shorter, or empty). A pure function of
//! (d0, rank, world), so any world size can cut a checkpoint's tensors anew (resharding).

/// What `--sharding` shards over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sharding {
    /// Everything replicated (data parallelism).
    None,
    /// AdamW's state: each rank keeps and updates only its rows (ZeRO-1).
    Optimizer,
    /// Weights, gradients and AdamW's state: each rank holds its rows of every weight, and the
    /// layers run on weights gathered just before them (FSDP).
    Full,
}

impl Sharding {
    /// Parses the flag's value.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "optimizer" => Some(Self::Optimizer),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    /// Whether AdamW's state is cut into rows apart from the weights (ZeRO-1): `optimizer`, and
    /// `full` under LoRA — whose frozen base is what is sharded, the adapters staying whole.
    pub(crate) fn cuts_optimizer_state_alone(self, lora: bool) -> bool {
        self == Self::Optimizer || (self == Self::Full && lora)
    }
}

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
        assert_eq!(Sharding::parse("optimizer"), Some(Sharding::Optimizer));
        assert_eq!(Sharding::parse("full"), Some(Sharding::Full));
        assert_eq!(Sharding::parse("zero3"), None);
        assert!(Sharding::Optimizer.cuts_optimizer_state_alone(false));
        assert!(Sharding::Full.cuts_optimizer_state_alone(true));
        assert!(!Sharding::Full.cuts_optimizer_state_alone(false));
        assert!(!Sharding::None.cuts_optimizer_state_alone(true));
    }
}
