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

/// Joins the slices of one tensor (same name and dtype, `offsets` set) into the whole tensor. The
/// slices must tile it exactly: no gaps, no overlaps.
pub fn assemble(mut parts: Vec<Tensor>) -> crate::Result<Tensor> {
    use crate::error::CheckpointError;
    let Some(first) = parts.first() else {
        return Err(CheckpointError::Invalid("no slices to assemble".into()));
    };
    if parts.len() == 1
        && first
            .offsets
            .as_ref()
            .is_none_or(|o| o.iter().all(|&x| x == 0))
    {
        let mut whole = parts.remove(0);
        whole.offsets = None;
        return Ok(whole);
    }
    let (name, dtype, rank) = (first.name.clone(), first.dtype, first.shape.len());
    let bad = |reason: String| CheckpointError::BadTensor {
        name: name.clone(),
        reason,
    };
    let elem_bits = dtype.bitsize();
    if elem_bits % 8 != 0 {
        return Err(bad(format!("cannot assemble sub-byte dtype {dtype:?}")));
    }
    let elem = elem_bits / 8;
    let mut shape = vec![0usize; rank];
    for p in &parts {
        let offsets = p.offsets.clone().unwrap_or_else(|| vec![0; rank]);
        if p.dtype != dtype || p.shape.len() != rank || offsets.len() != rank {
            return Err(bad("slices disagree on dtype or rank".into()));
        }
        for d in 0..rank {
            shape[d] = shape[d].max(offsets[d] + p.shape[d]);
        }
    }
    let numel: usize = shape.iter().product();
    let covered: usize = parts
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    if covered != numel {
        return Err(bad(format!(
            "slices cover {covered} of {numel} elements of {shape:?}"
        )));
    }
    let mut out = vec![0u8; numel * elem];
    // Row-major strides of the whole tensor, in elements.
    let mut strides = vec![1usize; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    for p in &parts {
        let offsets = p.offsets.clone().unwrap_or_else(|| vec![0; rank]);
        if rank == 0 {
            out.copy_from_slice(&p.data);
            continue;
        }
        let run = p.shape[rank - 1] * elem; // contiguous bytes per innermost row
        let rows: usize = p.shape[..rank - 1].iter().product();
        let mut idx = vec![0usize; rank - 1];
        for row in 0..rows {
            let mut start = offsets[rank - 1];
            for d in 0..rank - 1 {
                start += (offsets[d] + idx[d]) * strides[d];
            }
            out[start * elem..start * elem + run]
                .copy_from_slice(&p.data[row * run..(row + 1) * run]);
            for d in (0..rank - 1).rev() {
                idx[d] += 1;
                if idx[d] < p.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
    Tensor::new(name.clone(), dtype, shape, out.into())
}

/// Reads every `*.safetensors` file directly under `dir` (as PyTorch's `HuggingFaceStorageReader`
/// does) and returns whole tensors, assembling slices written by several ranks. Works on folders that
/// PyTorch's `HuggingFaceStorageWriter` wrote, with or without `save_distributed`.
pub async fn read_dir(store: &waypoint_storage::Store, dir: &str) -> crate::Result<Vec<Tensor>> {
    let listing = store.list_dir(dir).await?;
    let mut all = Vec::new();
    for o in listing
        .objects
        .iter()
        .filter(|o| o.key.ends_with(".safetensors"))
    {
        all.extend(crate::safetensors_file::read_file(store, &o.key, o.size, &|_| true).await?);
    }
    Ok(assemble_by_name(all)?.into_values().collect())
}

/// Groups tensors by name and [assembles](assemble) each group into the whole tensor: what several
/// ranks wrote as slices becomes one tensor per name; a whole tensor stays as it is.
pub fn assemble_by_name(
    tensors: impl IntoIterator<Item = Tensor>,
) -> crate::Result<std::collections::BTreeMap<String, Tensor>> {
    let mut by_name: std::collections::BTreeMap<String, Vec<Tensor>> = Default::default();
    for t in tensors {
        by_name.entry(t.name.clone()).or_default().push(t);
    }
    by_name
        .into_iter()
        .map(|(name, parts)| Ok((name, assemble(parts)?)))
        .collect()
}

#[cfg(test)]
mod assemble_tests {
    use super::*;
    use bytes::Bytes;
    use safetensors::Dtype;

    fn slice(full: &[u16], cols: usize, r0: usize, rows: usize, c0: usize, ncols: usize) -> Tensor {
        let mut data = Vec::new();
        for r in r0..r0 + rows {
            for c in c0..c0 + ncols {
                data.extend_from_slice(&full[r * cols + c].to_le_bytes());
            }
        }
        Tensor::new("w", Dtype::BF16, vec![rows, ncols], Bytes::from(data))
            .unwrap()
            .with_offsets(vec![r0, c0])
            .unwrap()
    }

    #[test]
    fn assembles_row_and_column_slices() {
        let full: Vec<u16> = (0..6 * 4).collect();
        let want: Vec<u8> = full.iter().flat_map(|x| x.to_le_bytes()).collect();
        let parts = vec![
            slice(&full, 4, 0, 6, 2, 2),
            slice(&full, 4, 0, 3, 0, 2),
            slice(&full, 4, 3, 3, 0, 2),
        ];
        let whole = assemble(parts).unwrap();
        assert_eq!(whole.shape, [6, 4]);
        assert_eq!(whole.data.as_ref(), want.as_slice());
        let gap = assemble(vec![
            slice(&full, 4, 0, 3, 0, 4),
            slice(&full, 4, 4, 2, 0, 4),
        ])
        .unwrap_err();
        assert!(gap.to_string().contains("cover"), "{gap}");
    }
}
