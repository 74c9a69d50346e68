//! DPO's reference log-probs. The reference is the model as it starts (under LoRA: the base with
//! its adapters off, which is the same model, the adapters starting at zero). [`reference_source`]
//! (the policy) says where they come from; this file carries out the stored kind: rather than keep
//! a frozen copy of the weights beside the trained ones, or score every batch twice, each pair's
//! chosen and rejected log-probs are computed once, before the first step — a forward pass over
//! the data, split over the ranks — and stored with the run: `reference/<key>.bin` (fp32, chosen
//! then rejected per pair) with `reference/<key>.json` (its sha256, the pairs and what it took),
//! the record written last. The key is a fingerprint of the model, the data and the settings that
//! decide the tokens, so any change computes a new table. Every later start, a resume included,
//! reads it back and checks its digest: a full-parameter reference is never recomputed from weights
//! that have since been trained (a LoRA one can be: its base never changes).

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use tokio::runtime::Runtime;
use waypoint_checkpoint::RunLayout;
use waypoint_data::Dataset;
use waypoint_storage::Store;

use crate::collective::ranks::Ranks;
use crate::model::Model;
use crate::recipe::MicroBatch;
use crate::step::reference_logps;

/// Where a DPO run's reference log-probs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReferenceSource {
    /// The recipe has no reference (SFT, ORPO).
    None,
    /// A table computed once and stored with the run.
    Stored,
    /// The base with the adapters off, with every batch (LoRA).
    AdaptersOff,
}

/// The policy: a full-parameter run stores its reference (the starting weights are gone after step
/// 1, and a frozen copy would double them); a LoRA run stores it when it trains on at least as many
/// pairs as the data holds (`pairs_trained` ≥ `pairs`: one scoring pass costs no more than scoring
/// each batch as it comes, and saves a forward pass per step from then on), and otherwise scores
/// each batch with the adapters off (no pass over data it will never see).
pub(crate) fn reference_source(
    needs_reference: bool,
    lora: bool,
    pairs: u64,
    pairs_trained: u64,
) -> ReferenceSource {
    match (needs_reference, lora) {
        (false, _) => ReferenceSource::None,
        (true, false) => ReferenceSource::Stored,
        (true, true) if pairs_trained >= pairs => ReferenceSource::Stored,
        (true, true) => ReferenceSource::AdaptersOff,
    }
}

/// [`ReferenceKey`]'s name of the training data.
pub(crate) const TRAIN: &str = "training data";
/// [`ReferenceKey`]'s name of the eval data.
pub(crate) const EVAL: &str = "eval data (--eval_dataset_uri)";

/// Each pair's reference log-probs, `[chosen, rejected]` per pair.
pub(crate) struct ReferenceTable {
    logps: Vec<f32>,
}

impl ReferenceTable {
    /// `batch` (of the pairs `pairs`) with its reference log-probs from `table`, when there is
    /// one; else as it is (a recipe that needs them scores them itself, see `step`).
    pub(crate) fn attach(table: Option<&Self>, batch: MicroBatch, pairs: &[usize]) -> MicroBatch {
        match table {
            Some(t) => {
                let device = batch.ids.device();
                batch.with_reference(t.rows(pairs, device))
            }
            None => batch,
        }
    }

    /// The reference log-probs of the rows of `pairs` as a micro-batch lays them out (the chosen
    /// rows, then the rejected ones), `[2 × pairs]` on `device`.
    pub(crate) fn rows(&self, pairs: &[usize], device: Device) -> Tensor {
        let chosen = pairs.iter().map(|&p| self.logps[2 * p]);
        let rejected = pairs.iter().map(|&p| self.logps[2 * p + 1]);
        let all: Vec<f32> = chosen.chain(rejected).collect();
        Tensor::from_slice(&all).to_device(device)
    }
}

/// Where a table is and what identifies it.
pub(crate) struct ReferenceKey {
    /// sha256 of what decides the reference log-probs and stays the run's across restarts: the
    /// model, the data, the settings that decide the tokens.
    pub fingerprint: String,
    /// `--init_from_checkpoint` as this start gives it: recorded with the table, and compared only
    /// on a run's first starts (a resumed run ignores the flag, and so does its table).
    start: Option<String>,
    /// Which data (for messages): the training data or the eval data.
    what: &'static str,
}

impl ReferenceKey {
    /// The key of the reference of `model` (its fingerprint) started from `start` over `data` (its
    /// content fingerprint; `what` names it) with `settings` (what decides the tokens).
    pub(crate) fn new(
        model: &str,
        start: Option<&str>,
        data: &str,
        what: &'static str,
        settings: Value,
    ) -> Self {
        Self {
            fingerprint: waypoint_config::fingerprint(&json!({
                "model": model,
                "data": data,
                "settings": settings,
            })),
            start: start.map(str::to_string),
            what,
        }
    }

    fn blob(&self, layout: &RunLayout) -> String {
        layout.reference(&format!("dpo-{}.bin", &self.fingerprint[..16]))
    }

    fn record(&self, layout: &RunLayout) -> String {
        layout.reference(&format!("dpo-{}.json", &self.fingerprint[..16]))
    }
}

/// The run's stored table for `key`, checked, with the `--init_from_checkpoint` it was scored
/// from; `None` when there is none.
async fn read(
    store: &Store,
    layout: &RunLayout,
    key: &ReferenceKey,
    pairs: usize,
) -> Result<Option<(ReferenceTable, Option<String>)>> {
    let record_key = key.record(layout);
    if !store.exists(&record_key).await? {
        return Ok(None);
    }
    let record: Value = serde_json::from_slice(&store.get(&record_key).await?)
        .with_context(|| format!("{record_key}: not valid JSON"))?;
    let bytes = store.get(&key.blob(layout)).await?;
    let sha = hex::encode(Sha256::digest(&bytes));
    ensure!(
        record["fingerprint"] == key.fingerprint.as_str()
            && record["sha256"] == sha.as_str()
            && bytes.len() == pairs * 8,
        "the stored reference log-probs {} do not match their record {record_key} (digest \
         {sha}); delete both to compute them again",
        key.blob(layout)
    );
    let logps = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let start = record["init_from_checkpoint"].as_str().map(str::to_string);
    Ok(Some((ReferenceTable { logps }, start)))
}

/// The reference table of a DPO run: read back when the run has it; else computed from `model`'s
/// weights as they are now, its adapters off — all ranks take part — and stored by rank 0, on a
/// run's first start or under LoRA (whose base does not train; a full-parameter run `resuming`
/// has trained its weights, and fails). `batch` pairs per forward pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_or_compute(
    store: &Store,
    layout: &RunLayout,
    key: &ReferenceKey,
    model: &Model,
    train: &Dataset,
    ranks: &mut Ranks,
    batch: usize,
    resuming: bool,
    rt: &Runtime,
) -> Result<ReferenceTable> {
    let pairs = train.len();
    let what = key.what;
    match rt.block_on(read(store, layout, key, pairs))? {
        Some((table, _)) if resuming => {
            tracing::info!(pairs, data = what, record = %key.record(layout), "reference log-probs read back (not recomputed)");
            return Ok(table);
        }
        Some((table, start)) if start == key.start => {
            tracing::info!(pairs, data = what, record = %key.record(layout), "reference log-probs read back (not recomputed)");
            return Ok(table);
        }
        Some(_) => tracing::info!(
            data = what,
            "the stored reference log-probs were scored from another --init_from_checkpoint, \
             before the run's first checkpoint: scoring them again"
        ),
        None if resuming && model.lora.is_none() => bail!(
            "the run's reference log-probs of the {what} ({}) are not stored, and its weights have \
             been trained since: they cannot be scored again. {}",
            key.record(layout),
            if what == TRAIN {
                "Restore the run's reference/ folder, or start a new --run_id"
            } else {
                "A full-parameter DPO run scores its eval data at its first start: drop \
                 --eval_dataset_uri (or give the one it started with), or start a new --run_id"
            }
        ),
        None => {}
    }
    let started = Instant::now();
    let (rank, world) = (ranks.rank() as usize, ranks.world() as usize);
    let mut table = vec![0f32; 2 * pairs];
    // Rank r scores pairs r, r + world, … in batches; every rank runs as many batches (a sharded
    // model needs all of them in each forward pass).
    let mine: Vec<usize> = (rank..pairs).step_by(world).collect();
    let rounds = pairs.div_ceil(world).div_ceil(batch.max(1));
    for round in 0..rounds {
        let chunk: Vec<usize> = mine
            .iter()
            .copied()
            .skip(round * batch)
            .take(batch)
            .collect();
        // A rank out of pairs scores its first again (discarded) to keep in step.
        let scored = if chunk.is_empty() {
            vec![mine.first().copied().unwrap_or(0)]
        } else {
            chunk.clone()
        };
        let micro = MicroBatch::on(&train.rows(&scored), model.device());
        let logps = reference_logps(model, &micro, ranks)?
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let values = Vec::<f32>::try_from(&logps).context("reading the reference log-probs")?;
        let n = chunk.len();
        for (k, &p) in chunk.iter().enumerate() {
            table[2 * p] = values[k];
            table[2 * p + 1] = values[n + k];
        }
    }
    // Each pair was scored by one rank; the others hold zeros there.
    let mut summed = [Tensor::from_slice(&table)];
    let mut unused = 0.0;
    ranks.all_reduce(&mut summed, &mut unused)?;
    let logps = Vec::<f32>::try_from(&summed[0]).context("reading the reference log-probs")?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        pairs,
        secs = format!("{secs:.1}"),
        "reference log-probs computed from the initial weights"
    );
    if rank == 0 {
        let bytes: Vec<u8> = logps.iter().flat_map(|v| v.to_le_bytes()).collect();
        let sha = hex::encode(Sha256::digest(&bytes));
        let record = json!({
            "fingerprint": key.fingerprint,
            "init_from_checkpoint": key.start,
            "sha256": sha,
            "pairs": pairs,
            "dtype": "float32",
            "layout": "chosen, rejected per pair, in dataset order",
            "secs": secs,
            "world_size": world,
        });
        let record = Bytes::from(serde_json::to_vec_pretty(&record)?);
        rt.block_on(async {
            store.put(&key.blob(layout), Bytes::from(bytes)).await?;
            store.put(&key.record(layout), record).await
        })
        .context("storing the reference log-probs")?;
    }
    Ok(ReferenceTable { logps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_parameter_runs_store_their_reference_and_lora_runs_when_they_see_all_the_data() {
        use ReferenceSource::*;
        assert_eq!(reference_source(false, false, 10, 100), None);
        assert_eq!(reference_source(false, true, 10, 100), None);
        assert_eq!(reference_source(true, false, 1000, 10), Stored);
        assert_eq!(reference_source(true, true, 100, 100), Stored);
        assert_eq!(reference_source(true, true, 100, 99), AdaptersOff);
    }
}
