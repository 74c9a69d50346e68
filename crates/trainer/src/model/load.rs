//! Loading a Hugging Face model directory: `config.json` and `model.safetensors` or the shards of
//! `model.safetensors.index.json`, each tensor checked against the file the index names, read
//! from a map of the files (only this rank's rows when sharded) straight into the dtype it is held
//! in.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use waypoint_config::UsageError;

use crate::convert;
use crate::model::config::ModelConfig;
use crate::model::Model;
use crate::shard::rows_of;

impl Model {
    /// Loads an HF model directory: `config.json` and `model.safetensors` or the shards listed in
    /// `model.safetensors.index.json`. Weights are held in `hold`: fp32 for training them, the
    /// frozen base's dtype for LoRA ([`crate::model::lora::frozen_base_kind`], never an fp32 copy on the way); with `shard` =
    /// (rank, world), only the rows of each weight that rank holds ([`Model::shard`]), read from a
    /// map of the files so the rest is never brought into memory. Also returns the sha256 of the
    /// weight files (in order), which identifies the base of a LoRA run.
    pub fn load_hf_dir(
        dir: &Path,
        device: Device,
        shard: Option<(u32, u32)>,
        hold: Kind,
    ) -> Result<(Self, String)> {
        let usage = |e: anyhow::Error| anyhow::Error::from(UsageError(format!("{e:#}")));
        let config = ModelConfig::read_hf_dir(dir)?;
        let config_path = dir.join("config.json");
        let weights = weight_files(dir)?;
        // Bound what the config makes us allocate by what the files hold: every weight takes at
        // least a byte.
        let mut file_bytes = 0u128;
        for file in &weights.files {
            let meta =
                std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
            file_bytes += u128::from(meta.len());
        }
        let count = config.parameter_count();
        if count > file_bytes {
            return Err(usage(anyhow::anyhow!(
                "{}: its sizes make {count} parameters, but the weight files of {} hold {file_bytes} \
                 bytes; the config does not describe these weights",
                config_path.display(),
                dir.display()
            )));
        }
        let mut params = BTreeMap::new();
        let mut hasher = Sha256::new();
        for file in &weights.files {
            let reading = || format!("reading {}", file.display());
            let mut f = std::fs::File::open(file).with_context(reading)?;
            // The fingerprint streams the file; the tensors come from a map of it.
            std::io::copy(&mut f, &mut hasher).with_context(reading)?;
            // SAFETY: a read-only map, dropped at the end of this iteration; the weight files must
            // not change while they load (as for every reader that maps safetensors files).
            let map = unsafe { memmap2::Mmap::map(&f) }.with_context(reading)?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .with_context(|| format!("parsing {}", file.display()))?;
            for (name, view) in st.tensors() {
                weights.check_holder(&name, file)?;
                let mut shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                let mut data = view.data();
                if let (Some((rank, world)), Some(&d0)) = (shard, shape.first()) {
                    let r = rows_of(d0, rank, world);
                    let row_bytes = data.len() / (d0.max(1) as usize);
                    data =
                        &data[r.start as usize * row_bytes..(r.start + r.len) as usize * row_bytes];
                    shape[0] = r.len;
                }
                let t = Tensor::f_from_data_size(data, &shape, convert::kind_of(view.dtype())?)
                    .with_context(|| format!("tensor {name} of {}", file.display()))?
                    .to_kind(hold)
                    .to_device(device);
                params.insert(name, t);
            }
        }
        weights.check_all_found(&params)?;
        if config.tie_word_embeddings {
            params.remove("lm_head.weight");
        }
        let model = Self::assemble_rows(config, params, shard, hold, device)
            .with_context(|| format!("loading the weights of {}", dir.display()))?;
        Ok((model, hex::encode(hasher.finalize())))
    }
}

/// The weight files of an HF directory and, for a sharded one, which file holds each tensor.
struct WeightFiles {
    /// The files, in a fixed order (sorted).
    files: Vec<std::path::PathBuf>,
    /// `model.safetensors.index.json` and its `weight_map` (tensor name → file name), when sharded.
    index: Option<(std::path::PathBuf, BTreeMap<String, String>)>,
}

impl WeightFiles {
    /// Fails unless the index assigns `name` to `file` (the one that holds it): a tensor in a shard
    /// the index does not name for it would silently replace, or be replaced by, the one it names.
    fn check_holder(&self, name: &str, file: &Path) -> Result<()> {
        let Some((index, map)) = &self.index else {
            return Ok(());
        };
        let here = file
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        match map.get(name) {
            Some(assigned) if assigned == here => Ok(()),
            Some(assigned) => bail!(
                "tensor {name} is in {here} although the weight_map of {} assigns it to \
                 {assigned}; remove the copy, or fix the weight_map",
                index.display()
            ),
            None => bail!(
                "{} holds tensor {name}, which the weight_map of {} does not list; add it to the \
                 weight_map, or remove it",
                file.display(),
                index.display()
            ),
        }
    }

    /// Fails if a tensor of the index was not in the file the index names for it.
    fn check_all_found(&self, params: &BTreeMap<String, Tensor>) -> Result<()> {
        let Some((index, map)) = &self.index else {
            return Ok(());
        };
        for (name, file) in map {
            ensure!(
                params.contains_key(name),
                "{}: the weight_map assigns tensor {name} to {file}, but {file} does not hold it",
                index.display()
            );
        }
        Ok(())
    }
}

/// The weight files of an HF directory: `model.safetensors`, or the shards its index names.
fn weight_files(dir: &Path) -> Result<WeightFiles> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(WeightFiles {
            files: vec![single],
            index: None,
        });
    }
    let index = dir.join("model.safetensors.index.json");
    let raw: Value = serde_json::from_slice(&std::fs::read(&index).with_context(|| {
        format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?)
    .with_context(|| format!("parsing {}", index.display()))?;
    let entries = raw["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut map = BTreeMap::new();
    for (name, file) in entries {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: the weight_map entry of {name} is not a file name",
                index.display()
            )
        })?;
        ensure!(
            !file.is_empty() && !file.contains('/') && !file.contains(".."),
            "{}: bad file name {file:?}",
            index.display()
        );
        map.insert(name.clone(), file.to_string());
    }
    let mut files: Vec<String> = map.values().cloned().collect();
    files.sort();
    files.dedup();
    Ok(WeightFiles {
        files: files.into_iter().map(|f| dir.join(f)).collect(),
        index: Some((index, map)),
    })
}
