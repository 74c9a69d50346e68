//! What one rank saves, as tensors: the resumable state under DCP's names ([`state_items`]), a
//! snapshot of it on the GPU when there is room, its copy to host memory, and the promotable part
//! (a PEFT adapter, full weights or this rank's share of them, or a delta); and the way back:
//! [`restore_state`] puts a checkpoint's `dcp/` tensors into the live model and optimizer.

use std::collections::HashMap;
use std::sync::mpsc;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use tch::{Device, Tensor};
use waypoint_checkpoint::peft::{adapter_tensor_name, AdapterConfig};
use waypoint_checkpoint::{
    dcp, CheckpointManager, Commit, Manifest, SamplerPart, StepName, Tensor as Blob, WeightsPlan,
};

use crate::collective::ranks::Ranks;
use crate::convert::{byte_size, from_blob, sampler_kind, to_blob};
use crate::model::Model;
use crate::optim::AdamW;
use crate::shard::Rows;

/// What every save needs besides the live state.
pub(crate) struct SaveContext {
    /// sha256 of the resume-relevant configuration.
    pub fingerprint: String,
    /// dtype of the promotable weights.
    pub sampler_dtype: waypoint_config::SamplerDtype,
    /// Tokenizer files carried into the sampler directory.
    pub tokenizer_files: Vec<(String, Bytes)>,
    /// The base model (named in a PEFT adapter's config).
    pub model_id: String,
    /// Samples in the training data (to derive the epoch).
    pub n_samples: u64,
    /// A new full sampler base after this many deltas (0: every periodic sampler save is a base).
    pub sampler_base_every: u64,
    /// The settings that decide the trajectory, recorded in every manifest.
    pub training: Value,
}

impl SaveContext {
    /// The counters and identity of a checkpoint at `step`.
    pub(crate) fn commit(&self, step: u64, data_consumed: u64, world_size: u32) -> Commit {
        Commit {
            step,
            data_consumed,
            epoch: data_consumed / self.n_samples.max(1),
            world_size,
            config_fingerprint: self.fingerprint.clone(),
            delta_base: None,
            training: Some(self.training.clone()),
        }
    }
}

/// One tensor of the resumable state: a handle that shares the live tensor's memory, under its DCP
/// name; with `offsets`, this rank's slice of a sharded tensor (DCP's `saved_offsets`).
pub(crate) struct StateItem {
    pub(crate) name: String,
    pub(crate) tensor: Tensor,
    pub(crate) offsets: Option<Vec<usize>>,
}

/// The resumable state under DCP's names: trainable weights and their AdamW state — with sharded
/// optimizer state, this rank's rows of the moments, as slices.
pub(crate) fn state_items(model: &Model, opt: &AdamW) -> Vec<StateItem> {
    let whole = |name: String, t: &Tensor| StateItem {
        name,
        tensor: t.shallow_clone(),
        offsets: None,
    };
    let mut items = Vec::new();
    let item = |name: String, t: &Tensor, rows: Option<Rows>| match rows {
        None => whole(name, t),
        Some(rows) => {
            let mut offsets = vec![0usize; t.dim()];
            if let Some(o) = offsets.first_mut() {
                *o = rows.start as usize;
            }
            StateItem {
                name,
                tensor: t.shallow_clone(),
                offsets: Some(offsets),
            }
        }
    };
    for (i, (p, s)) in model.trainable().iter().zip(&opt.state).enumerate() {
        let weight_rows = model.trainable_rows(i);
        items.push(item(dcp::model_key(&p.name), &p.tensor, weight_rows));
        let rows = weight_rows.or(opt.rows.as_ref().map(|r| r[i]));
        for (field, t) in [("exp_avg", &s.exp_avg), ("exp_avg_sq", &s.exp_avg_sq)] {
            items.push(item(dcp::optim_key(&p.name, field), t, rows));
        }
        items.push(whole(dcp::optim_key(&p.name, "step"), &s.step));
    }
    items
}

/// Free GPU memory kept beyond a snapshot, for the activations of the steps that run beside it.
const SNAPSHOT_HEADROOM: u64 = 2 << 30;

/// A copy of the state on its own GPU, when the state lives on a GPU with room for it.
pub(crate) fn snapshot_on_device(items: &[StateItem]) -> Option<Vec<StateItem>> {
    let Device::Cuda(gpu) = items.first()?.tensor.device() else {
        return None;
    };
    let bytes: u64 = items.iter().map(|i| byte_size(&i.tensor) as u64).sum();
    match crate::collective::cuda::free_memory(gpu) {
        Ok(free) if free >= bytes + SNAPSHOT_HEADROOM => {}
        Ok(free) => {
            // Once at info (the memory tier may ask every step), then at debug.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(
                    state_mb = bytes >> 20,
                    free_mb = free >> 20,
                    "no room on the GPU for a snapshot: the optimizer waits for the copy to host"
                );
            } else {
                tracing::debug!(
                    state_mb = bytes >> 20,
                    free_mb = free >> 20,
                    "no room for a snapshot"
                );
            }
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "free GPU memory unknown: no snapshot");
            return None;
        }
    }
    tracing::debug!(state_mb = bytes >> 20, gpu, "state snapshotted on the GPU");
    tch::no_grad(|| {
        Some(
            items
                .iter()
                .map(|i| StateItem {
                    name: i.name.clone(),
                    tensor: i.tensor.detach().copy(),
                    offsets: i.offsets.clone(),
                })
                .collect(),
        )
    })
}

/// Another save's host copy of the same step's state, as it will arrive from the copy thread of
/// the save that lends it (the durable save drains the memory tier's copy: the state leaves the
/// device once). Its tensors share their bytes with the lender's: no second copy in host memory.
pub(crate) struct CopyLoan {
    copy: mpsc::Receiver<Vec<Blob>>,
}

/// The lender's end of a [`CopyLoan`]: its copy, once made, goes to the borrower.
pub(crate) struct CopyLender(mpsc::Sender<Vec<Blob>>);

impl CopyLender {
    /// Hands the copy over (shared bytes); a borrower gone is no error.
    pub(crate) fn send(self, copy: &[Blob]) {
        let _ = self.0.send(copy.to_vec());
    }
}

/// A loan of a host copy still to be made, and its lender's end.
pub(crate) fn lend_copy() -> (CopyLender, CopyLoan) {
    let (tx, rx) = mpsc::channel();
    (CopyLender(tx), CopyLoan { copy: rx })
}

/// The host copy of `items`: those `loan` holds taken from the lender's copy when it arrives (all
/// copied here if it never does: the lender failed), the others copied here. Returns the copy and
/// the bytes taken from the loan. Reads the live tensors for what it copies: the optimizer must
/// wait for it.
pub(crate) fn copy_to_host_drawing_on(
    items: &[StateItem],
    loan: Option<CopyLoan>,
) -> Result<(Vec<Blob>, u64)> {
    let Some(loan) = loan else {
        return Ok((copy_to_host(items)?, 0));
    };
    let mut lent: HashMap<(String, Option<Vec<usize>>), Blob> = loan
        .copy
        .recv()
        .map(|copy| {
            copy.into_iter()
                .map(|b| ((b.name.clone(), b.offsets.clone()), b))
                .collect()
        })
        .unwrap_or_default();
    let mut drained = 0u64;
    let copy = items
        .iter()
        .map(
            |i| match lent.remove(&(i.name.clone(), i.offsets.clone())) {
                Some(blob) => {
                    drained += blob.data.len() as u64;
                    Ok(blob)
                }
                None => copy_to_host(std::slice::from_ref(i)).map(|mut one| one.remove(0)),
            },
        )
        .collect::<Result<Vec<_>>>()?;
    Ok((copy, drained))
}

/// Copies named tensors to host memory, as they are.
pub(crate) fn copy_to_host(items: &[StateItem]) -> Result<Vec<Blob>> {
    items
        .iter()
        .map(|i| {
            let blob = to_blob(&i.name, &i.tensor, None)?;
            Ok(match &i.offsets {
                Some(o) => blob.with_offsets(o.clone())?,
                None => blob,
            })
        })
        .collect()
}

/// This rank's share of the promotable weights of a model sharded over the ranks: every rank
/// writes the files of the plan that are its own, from whole tensors gathered for it alone.
pub(crate) struct PromotableShare {
    plan: WeightsPlan,
    tensors: Vec<Blob>,
}

/// For a promotable save of sharded weights (full-parameter): every rank takes part in gathering
/// each weight whole, one at a time, and keeps those the plan gives it to write, in the sampler
/// dtype — so no rank ever holds more than its share of the model. `None` when the weights are not
/// sharded (rank 0 writes the whole model from its own copy) or under LoRA (the adapter is whole on
/// every rank).
pub(crate) fn promotable_share(
    model: &Model,
    ctx: &SaveContext,
    manager: &CheckpointManager,
    ranks: &mut Ranks,
) -> Result<Option<PromotableShare>> {
    if !model.is_sharded() || model.lora.is_some() {
        return Ok(None);
    }
    let kind = sampler_kind(ctx.sampler_dtype);
    let sizes: Vec<(String, u64)> = model
        .whole_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let numel: i64 = shape.iter().product();
            (name, numel as u64 * kind.elt_size_in_bytes() as u64)
        })
        .collect();
    let plan = WeightsPlan::new(&sizes, ranks.world(), manager.options().max_file_bytes);
    let rank = ranks.rank();
    let mut tensors = Vec::new();
    model.gather_each_base(
        kind,
        &|name| plan.writer_of(name) == Some(rank),
        &mut |name, t| {
            tensors.push(to_blob(name, &t, None)?);
            Ok(())
        },
        ranks,
    )?;
    Ok(Some(PromotableShare { plan, tensors }))
}

/// The promotable part: a PEFT adapter under LoRA, else the full weights as an HF directory in the
/// sampler dtype — this rank's `share` of them when the live weights are sharded — or, given a
/// `delta_base`, a delta over that base's (which the checkpoint crate writes as full weights after
/// all when the delta would exceed half their size).
pub(crate) fn sampler_part(
    model: &Model,
    share: Option<PromotableShare>,
    ctx: &SaveContext,
    delta_base: Option<StepName>,
) -> Result<SamplerPart> {
    if let Some(lora) = &model.lora {
        let config = AdapterConfig::new(
            lora.rank as usize,
            lora.alpha,
            lora.dropout,
            lora.targets.clone(),
            &ctx.model_id,
        );
        let tensors = model
            .trainable()
            .iter()
            .map(|p| {
                let (fqn, which) = match p.name.strip_suffix(".lora_A.weight") {
                    Some(f) => (f, 'A'),
                    None => (
                        p.name.strip_suffix(".lora_B.weight").unwrap_or(&p.name),
                        'B',
                    ),
                };
                to_blob(
                    &adapter_tensor_name(fqn, which),
                    &p.tensor,
                    Some(sampler_kind(ctx.sampler_dtype)),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(SamplerPart::Lora {
            adapter_config: Bytes::from(config.to_json()?),
            tensors,
        });
    }
    let mut config: Value = model.config.raw.clone();
    // One dtype, the weights': transformers 5 reads `dtype`, earlier versions and other loaders
    // `torch_dtype`; an HF config may carry either, so both say the same.
    let dtype = json!(ctx.sampler_dtype.hf_name());
    config["dtype"] = dtype.clone();
    config["torch_dtype"] = dtype;
    let config_json = Bytes::from(serde_json::to_vec_pretty(&config)?);
    if let Some(PromotableShare { plan, tensors }) = share {
        return Ok(SamplerPart::FullShare {
            plan,
            tensors,
            config_json,
            extra_files: ctx.tokenizer_files.clone(),
        });
    }
    let tensors = model
        .base()
        .iter()
        .map(|p| to_blob(&p.name, &p.tensor, Some(sampler_kind(ctx.sampler_dtype))))
        .collect::<Result<Vec<_>>>()?;
    if let Some(base) = delta_base {
        return Ok(SamplerPart::Delta {
            base,
            config_json,
            tensors,
        });
    }
    Ok(SamplerPart::Full {
        config_json,
        tensors,
        extra_files: ctx.tokenizer_files.clone(),
    })
}

/// Joins DCP slices (from multi-rank saves) into whole tensors, by name.
pub(crate) fn assemble_slices(blobs: Vec<Blob>) -> Result<HashMap<String, Blob>> {
    Ok(dcp::assemble_by_name(blobs)?.into_iter().collect())
}

/// Copies a saved tensor into a live one (shape checked), converting dtype and device. With `rows`
/// (a live shard), `src` is either those rows already (read by rows) or the whole tensor, cut here.
pub(crate) fn copy_into(
    dst: &Tensor,
    src: &Blob,
    rows: Option<Rows>,
    checkpoint: &str,
) -> Result<()> {
    let mut t = from_blob(src)?;
    if let Some(r) = rows {
        let d0 = t.size().first().copied().unwrap_or(0);
        if d0 != r.len {
            ensure!(
                r.start + r.len <= d0,
                "{checkpoint}: tensor {} has {d0} rows, fewer than this rank's shard needs",
                src.name
            );
            t = t.narrow(0, r.start, r.len);
        }
    }
    ensure!(
        t.size() == dst.size(),
        "{checkpoint}: tensor {} has shape {:?}, the model expects {:?}",
        src.name,
        t.size(),
        dst.size()
    );
    let mut d = dst.shallow_clone();
    tch::no_grad(|| d.copy_(&t.to_kind(dst.kind()).to_device(dst.device())));
    Ok(())
}

/// Restores trainable weights and optimizer state from a checkpoint's `dcp/` tensors, after
/// checking that its loop state (when it has one) counts what its manifest counts.
pub(crate) fn restore_state(
    m: &Manifest,
    blobs: Vec<Blob>,
    model: &Model,
    opt: &mut AdamW,
) -> Result<()> {
    let checkpoint = m.name.as_str();
    if let Some(state) = dcp::LoopState::from_tensors(&blobs)
        .with_context(|| format!("reading the loop state of checkpoint {checkpoint}"))?
    {
        ensure!(
            state.step == m.step && state.data_consumed == m.data_consumed,
            "checkpoint {checkpoint} contradicts itself: its manifest says step {} after {} \
             samples, its dcp/ train_state step {} after {}; set it aside (waypoint ckpt) and \
             resume from an earlier one",
            m.step,
            m.data_consumed,
            state.step,
            state.data_consumed
        );
    }
    let blobs = assemble_slices(blobs)?;
    let get = |key: String| {
        blobs.get(&key).with_context(|| {
            format!("{checkpoint} lacks tensor {key}; was it saved with another configuration?")
        })
    };
    for (i, (p, s)) in model.trainable().iter().zip(&mut opt.state).enumerate() {
        // Sharded weights or optimizer state: this rank's rows of the whole tensors, however many
        // ranks (and however cut) saved them.
        // A rank may own no rows of a small tensor (the chunks are rounded up): nothing of it
        // was read, nothing to restore.
        let none = |rows: Option<Rows>| rows.is_some_and(|r| r.len == 0);
        let weight_rows = model.trainable_rows(i);
        if !none(weight_rows) {
            copy_into(
                &p.tensor,
                get(dcp::model_key(&p.name))?,
                weight_rows,
                checkpoint,
            )?;
        }
        let rows = weight_rows.or(opt.rows.as_ref().map(|r| r[i]));
        if !none(rows) {
            copy_into(
                &s.exp_avg,
                get(dcp::optim_key(&p.name, "exp_avg"))?,
                rows,
                checkpoint,
            )?;
            copy_into(
                &s.exp_avg_sq,
                get(dcp::optim_key(&p.name, "exp_avg_sq"))?,
                rows,
                checkpoint,
            )?;
        }
        copy_into(
            &s.step,
            get(dcp::optim_key(&p.name, "step"))?,
            None,
            checkpoint,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, values: &[f32], offsets: Option<Vec<usize>>) -> StateItem {
        StateItem {
            name: name.into(),
            tensor: Tensor::from_slice(values),
            offsets,
        }
    }

    #[test]
    fn a_borrowed_copy_is_taken_where_it_holds_the_tensor_and_the_rest_copied() {
        let mine = [
            item("a", &[1.0, 2.0], None),
            item("b", &[3.0], Some(vec![4])),
            item("c", &[5.0], None),
        ];
        // The lender holds a, b at other offsets (another slice), and d.
        let lenders = [
            item("a", &[1.0, 2.0], None),
            item("b", &[9.0], Some(vec![0])),
            item("d", &[7.0], None),
        ];
        let (lender, loan) = lend_copy();
        let lent = copy_to_host(&lenders).unwrap();
        lender.send(&lent);
        let (copy, drained) = copy_to_host_drawing_on(&mine, Some(loan)).unwrap();
        assert_eq!(drained, 8, "only a, whose name and offsets match");
        assert_eq!(copy, copy_to_host(&mine).unwrap());
        assert_eq!(
            copy[0].data.as_ptr(),
            lent[0].data.as_ptr(),
            "a's bytes are the lender's, not a second copy"
        );
    }

    #[test]
    fn a_loan_whose_lender_failed_is_copied_here() {
        let mine = [item("a", &[1.0, 2.0], None)];
        let (lender, loan) = lend_copy();
        drop(lender);
        let (copy, drained) = copy_to_host_drawing_on(&mine, Some(loan)).unwrap();
        assert_eq!(drained, 0);
        assert_eq!(copy, copy_to_host(&mine).unwrap());
    }
}
