//! The resumable part's naming, shared with PyTorch DCP's `HuggingFaceStorageWriter`/`Reader`.
//!
//! Tensor names are DCP's flattened keys of `{"model": model.state_dict(), "optim": optimizer state}`:
//! `model.<fqn>`, `optim.state.<fqn>.exp_avg`, `.exp_avg_sq`, `.step`. File names follow PyTorch's:
//! `model-00001-of-00002.safetensors` for a single writer, `shard-00001-model-00001-of-00001.safetensors`
//! (shard = rank + 1) when several ranks each write their share.
//!
//! Beside them, [`LoopState`]: what else a PyTorch loop needs to continue exactly — the learning-rate
//! scheduler's `state_dict` (`lr_scheduler.*`) and the train state (`train_state.*`) under
//! torchtitan's checkpointer names, and the dropout generator's seeds (`rng.*`) — as small tensors,
//! since DCP's Hugging Face storage holds tensors only.

use bytes::Bytes;

use crate::error::{CheckpointError, Result};
use crate::tensor::{Dtype, Tensor};

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

/// The loop's state at a checkpoint, beyond the weights and AdamW's state (see the module doc and
/// `docs/continue-in-pytorch.md`). Every value is a pure function of the run's settings and the
/// step, so waypoint itself resumes without it; it is written for the loops that continue a
/// waypoint checkpoint, and read back to check a checkpoint's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopState {
    /// Optimizer steps done (`train_state.step`; the scheduler's `last_epoch`).
    pub step: u64,
    /// Samples consumed, globally: the position in the sample order (`train_state.data_consumed`).
    pub data_consumed: u64,
    /// The epoch that position is in (`train_state.epoch`).
    pub epoch: u64,
    /// Token positions fed to the model so far, padding included, as torchtitan counts them
    /// (`train_state.ntokens_seen` = `data_consumed × max_seq_len`).
    pub tokens_seen: u64,
    /// The scheduler's `base_lrs` (the peak learning rate), one per parameter group.
    pub base_lrs: Vec<f64>,
    /// The scheduler's `_last_lr`: the learning rate of the next optimizer step, one per group.
    pub last_lrs: Vec<f64>,
    /// The run's `--seed` (`rng.seed`, as int64: two's complement above 2^63).
    pub seed: u64,
    /// The seed libtorch's generator is given before the next step's dropout draws
    /// (`rng.step_seed`).
    pub next_step_seed: i64,
}

/// The tensor names of [`LoopState`], in the order it writes them.
pub const LOOP_STATE_KEYS: [&str; 10] = [
    "lr_scheduler.last_epoch",
    "lr_scheduler._step_count",
    "lr_scheduler.base_lrs",
    "lr_scheduler._last_lr",
    "train_state.step",
    "train_state.ntokens_seen",
    "train_state.epoch",
    "train_state.data_consumed",
    "rng.seed",
    "rng.step_seed",
];

impl LoopState {
    /// The state as tensors: int64 scalars for counts and seeds, float64 vectors (one entry per
    /// parameter group) for the scheduler's lists — the values `LambdaLR.state_dict()` holds.
    pub fn tensors(&self) -> Result<Vec<Tensor>> {
        let int = |v: i64| (Dtype::I64, Vec::new(), v.to_le_bytes().to_vec());
        let floats = |v: &[f64]| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (Dtype::F64, vec![v.len()], bytes)
        };
        let values = [
            int(self.step as i64),
            // PyTorch counts the `step()` call its constructor makes.
            int(self.step as i64 + 1),
            floats(&self.base_lrs),
            floats(&self.last_lrs),
            int(self.step as i64),
            int(self.tokens_seen as i64),
            int(self.epoch as i64),
            int(self.data_consumed as i64),
            int(self.seed as i64),
            int(self.next_step_seed),
        ];
        LOOP_STATE_KEYS
            .iter()
            .zip(values)
            .map(|(name, (dtype, shape, bytes))| {
                Tensor::new(*name, dtype, shape, Bytes::from(bytes))
            })
            .collect()
    }

    /// Reads the state back from `tensors` (those of a `dcp/` folder, any order, others ignored);
    /// `None` when the checkpoint predates it.
    pub fn from_tensors(tensors: &[Tensor]) -> Result<Option<Self>> {
        let find = |name: &str| tensors.iter().find(|t| t.name == name);
        if find(LOOP_STATE_KEYS[0]).is_none() {
            return Ok(None);
        }
        let bad = |name: &str, reason: &str| CheckpointError::BadTensor {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        let int = |name: &str| -> Result<i64> {
            let t = find(name).ok_or_else(|| bad(name, "missing beside the other loop state"))?;
            match (t.dtype, t.data.as_ref().try_into()) {
                (Dtype::I64, Ok(b)) if t.shape.is_empty() => Ok(i64::from_le_bytes(b)),
                _ => Err(bad(name, "not an int64 scalar")),
            }
        };
        let floats = |name: &str| -> Result<Vec<f64>> {
            let t = find(name).ok_or_else(|| bad(name, "missing beside the other loop state"))?;
            if t.dtype != Dtype::F64 || t.shape.len() != 1 {
                return Err(bad(name, "not a float64 vector"));
            }
            Ok(t.data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect())
        };
        let count = |name: &str| -> Result<u64> {
            u64::try_from(int(name)?).map_err(|_| bad(name, "negative"))
        };
        Ok(Some(Self {
            step: count("train_state.step")?,
            data_consumed: count("train_state.data_consumed")?,
            epoch: count("train_state.epoch")?,
            tokens_seen: count("train_state.ntokens_seen")?,
            base_lrs: floats("lr_scheduler.base_lrs")?,
            last_lrs: floats("lr_scheduler._last_lr")?,
            seed: int("rng.seed")? as u64,
            next_step_seed: int("rng.step_seed")?,
        }))
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
    fn loop_state_round_trips_as_int64_and_float64_tensors() {
        let state = LoopState {
            step: 7,
            data_consumed: 56,
            epoch: 1,
            tokens_seen: 56 * 128,
            base_lrs: vec![1e-4],
            last_lrs: vec![7.5e-5],
            seed: u64::MAX - 3,
            next_step_seed: 12345,
        };
        let tensors = state.tensors().unwrap();
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, LOOP_STATE_KEYS);
        let step_count = tensors
            .iter()
            .find(|t| t.name == "lr_scheduler._step_count");
        assert_eq!(step_count.unwrap().data.as_ref(), 8i64.to_le_bytes());
        let mut shuffled = tensors.clone();
        shuffled.reverse();
        shuffled.push(Tensor::new("model.w", Dtype::U8, vec![1], Bytes::from(vec![0u8])).unwrap());
        assert_eq!(LoopState::from_tensors(&shuffled).unwrap(), Some(state));
        assert_eq!(LoopState::from_tensors(&shuffled[10..]).unwrap(), None);
        let mut wrong = tensors;
        wrong[4] = Tensor::new(
            "train_state.step",
            Dtype::F64,
            vec![],
            Bytes::from(vec![0u8; 8]),
        )
        .unwrap();
        assert!(LoopState::from_tensors(&wrong).is_err());
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
