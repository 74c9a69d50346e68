//! The resumable part's naming, shared with PyTorch DCP's `HuggingFaceStorageWriter`/`Reader`.
//!
//! Tensor names are DCP's flattened keys of `{"model": model.state_dict(), "optim": optimizer state}`:
//! `model.<fqn>`, `optim.state.<fqn>.exp_avg`, `.exp_avg_sq`, `.step`. File names follow PyTorch's:
//! `model-00001-of-00002.safetensors` for a single writer, `shard-00001-model-00001-of-00001.safetensors`
//! (shard = rank + 1) when several ranks each write their share.

use crate::tensor::Tensor;

/// `model.<fqn>`.
pub fn model_key(fqn: &str) -> String {
    format!("model.{fqn}")
}

/// `optim.state.<fqn>.<field>` (`exp_avg`, `exp_avg_sq`, `step`).
pub fn optim_key(fqn: &str, field: &str) -> String {
    format!("optim.state.{fqn}.{field}")
}

/// The DCP file name of file `index` (1-based) of `count`, written by `rank` of `world_size`.
pub fn file_name(rank: u32, world_size: u32, index: usize, count: usize) -> String {
    if world_size <= 1 {
        format!("model-{index:05}-of-{count:05}.safetensors")
    } else {
        format!(
            "shard-{:05}-model-{index:05}-of-{count:05}.safetensors",
            rank + 1
        )
    }
}

/// Splits tensors, in order, into groups of at most `max_bytes` each (a larger tensor gets a file of
/// its own).
pub fn split_into_files(tensors: Vec<Tensor>, max_bytes: u64) -> Vec<Vec<Tensor>> {
    let mut files: Vec<Vec<Tensor>> = Vec::new();
    let mut current: Vec<Tensor> = Vec::new();
    let mut bytes = 0u64;
    for t in tensors {
        let n = t.data.len() as u64;
        if !current.is_empty() && bytes + n > max_bytes {
            files.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += n;
        current.push(t);
    }
    if !current.is_empty() || files.is_empty() {
        files.push(current);
    }
    files
}

/// Assigns replicated tensors (given by size) to ranks so each writes about the same number of bytes:
/// largest first, each to the rank with the fewest bytes so far. Returns the owner rank of each.
pub fn assign_owners(sizes: &[u64], world_size: u32) -> Vec<u32> {
    let world = world_size.max(1) as usize;
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0u64; world];
    let mut owner = vec![0u32; sizes.len()];
    for i in order {
        let (rank, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(r, &l)| (l, r))
            .unwrap_or((0, &0));
        owner[i] = rank as u32;
        load[rank] += sizes[i];
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use safetensors::Dtype;

    #[test]
    fn names_match_pytorch() {
        assert_eq!(file_name(0, 1, 1, 2), "model-00001-of-00002.safetensors");
        assert_eq!(
            file_name(1, 4, 1, 1),
            "shard-00002-model-00001-of-00001.safetensors"
        );
        assert_eq!(
            optim_key("layers.0.w", "exp_avg"),
            "optim.state.layers.0.w.exp_avg"
        );
        assert_eq!(model_key("embed.weight"), "model.embed.weight");
    }

    #[test]
    fn splits_by_bytes_and_balances_owners() {
        let t = |n: usize| {
            Tensor::new(
                format!("t{n}"),
                Dtype::U8,
                vec![n],
                Bytes::from(vec![0u8; n]),
            )
            .unwrap()
        };
        let files = split_into_files(vec![t(4), t(4), t(10), t(1)], 8);
        let sizes: Vec<usize> = files.iter().map(|f| f.len()).collect();
        assert_eq!(sizes, [2, 1, 1]);
        assert_eq!(split_into_files(vec![], 8).len(), 1);
        let owners = assign_owners(&[100, 60, 50, 10], 2);
        let mut load = [0u64; 2];
        for (i, o) in owners.iter().enumerate() {
            load[*o as usize] += [100, 60, 50, 10][i];
        }
        assert_eq!(load, [110, 110]);
    }
}
