//! The sampler part's weights: a full HF model directory (`model.safetensors`, or shards with
//! `model.safetensors.index.json` as transformers writes them), written by one rank or by every
//! rank of a run whose weights are sharded — each writing the files a [`WeightsPlan`] gives it.

use bytes::Bytes;

use crate::dcp::assign_owners;
use crate::error::{to_json_pretty, CheckpointError, Result};
use crate::file_entry::WrittenFile;
use crate::tensor::Tensor;
use crate::writer::FileWriter;

/// One weights file of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// The file name in the model directory (`model.safetensors`, `model-0000i-of-0000n.safetensors`).
    pub name: String,
    /// The rank that writes it.
    pub writer: u32,
    /// The tensors it holds, in the model's order.
    pub tensors: Vec<String>,
}

/// Which file holds each tensor of a model's full weights and which rank writes it: a pure function
/// of the tensors' names and sizes, the number of writers and the largest file, so every rank
/// computes the same plan without a word between them. Tensors go to writers balanced by bytes
/// ([`assign_owners`]); each writer's tensors, in the model's order, fill files of at most
/// `max_file_bytes`, numbered writer by writer. One file in all is `model.safetensors` (no index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsPlan {
    /// The files, in number order.
    pub files: Vec<PlannedFile>,
    total_bytes: u64,
}

impl WeightsPlan {
    /// The plan for `tensors` (name, bytes, in the model's order) over `writers` ranks.
    pub fn new(tensors: &[(String, u64)], writers: u32, max_file_bytes: u64) -> Self {
        let sizes: Vec<u64> = tensors.iter().map(|(_, n)| *n).collect();
        let owners = assign_owners(&sizes, writers.max(1));
        let mut groups: Vec<(u32, Vec<String>)> = Vec::new();
        for writer in 0..writers.max(1) {
            let mut bytes = 0u64;
            let mut current: Vec<String> = Vec::new();
            for ((name, n), _) in tensors.iter().zip(&owners).filter(|(_, &o)| o == writer) {
                if !current.is_empty() && bytes + n > max_file_bytes {
                    groups.push((writer, std::mem::take(&mut current)));
                    bytes = 0;
                }
                bytes += n;
                current.push(name.clone());
            }
            if !current.is_empty() {
                groups.push((writer, current));
            }
        }
        if groups.is_empty() {
            groups.push((0, Vec::new()));
        }
        let count = groups.len();
        let files = groups
            .into_iter()
            .enumerate()
            .map(|(i, (writer, tensors))| PlannedFile {
                name: if count == 1 {
                    "model.safetensors".to_string()
                } else {
                    format!("model-{:05}-of-{count:05}.safetensors", i + 1)
                },
                writer,
                tensors,
            })
            .collect();
        Self {
            files,
            total_bytes: sizes.iter().sum(),
        }
    }

    /// The rank that writes tensor `name`, if the plan has it.
    pub fn writer_of(&self, name: &str) -> Option<u32> {
        self.files
            .iter()
            .find(|f| f.tensors.iter().any(|t| t == name))
            .map(|f| f.writer)
    }

    /// The bytes of `model.safetensors.index.json` when there is more than one file.
    pub fn index(&self) -> Result<Option<Bytes>> {
        if self.files.len() < 2 {
            return Ok(None);
        }
        let mut weight_map = serde_json::Map::new();
        for f in &self.files {
            for t in &f.tensors {
                weight_map.insert(t.clone(), serde_json::Value::String(f.name.clone()));
            }
        }
        let index = serde_json::json!({
            "metadata": {"total_size": self.total_bytes},
            "weight_map": weight_map,
        });
        Ok(Some(Bytes::from(to_json_pretty(
            "model.safetensors.index.json",
            &index,
        )?)))
    }

    /// `tensors` (all of this writer's, in any order) grouped into the files `writer` writes:
    /// (file name, its tensors in the plan's order). Fails unless they are exactly the plan's.
    pub fn files_of(
        &self,
        writer: u32,
        tensors: Vec<Tensor>,
    ) -> Result<Vec<(String, Vec<Tensor>)>> {
        let mut by_name: std::collections::HashMap<String, Tensor> =
            tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut out = Vec::new();
        for f in self.files.iter().filter(|f| f.writer == writer) {
            let group = f
                .tensors
                .iter()
                .map(|name| {
                    by_name.remove(name).ok_or_else(|| {
                        CheckpointError::Invalid(format!(
                            "rank {writer} must write tensor {name} into sampler/{} but was not \
                             given it",
                            f.name
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            out.push((f.name.clone(), group));
        }
        if let Some(stray) = by_name.keys().next() {
            return Err(CheckpointError::Invalid(format!(
                "rank {writer} was given tensor {stray}, which the weights plan gives to another \
                 rank or does not hold"
            )));
        }
        Ok(out)
    }
}

/// Weights files (name, tensors) and, when sharded, the index's bytes.
pub(crate) type FullWeightsLayout = (Vec<(String, Vec<Tensor>)>, Option<Bytes>);

/// How full weights written by one rank are laid out: `model.safetensors`, or
/// `model-0000i-of-0000n.safetensors` shards with the bytes of `model.safetensors.index.json` when
/// they exceed `max_file_bytes` (the [`WeightsPlan`] of one writer).
pub(crate) fn full_weights_layout(
    tensors: Vec<Tensor>,
    max_file_bytes: u64,
) -> Result<FullWeightsLayout> {
    let plan = WeightsPlan::new(&sizes_of(&tensors), 1, max_file_bytes);
    Ok((plan.files_of(0, tensors)?, plan.index()?))
}

/// (name, bytes) of each tensor, as a [`WeightsPlan`] takes them.
fn sizes_of(tensors: &[Tensor]) -> Vec<(String, u64)> {
    tensors
        .iter()
        .map(|t| (t.name.clone(), t.data.len() as u64))
        .collect()
}

/// Writes `files` (name, tensors) under `sampler/`, `parallel` files at once, and the index when
/// given.
pub(crate) async fn write_weight_files(
    writer: &FileWriter,
    files: Vec<(String, Vec<Tensor>)>,
    index: Option<Bytes>,
    parallel: usize,
) -> Result<Vec<WrittenFile>> {
    use futures::{StreamExt, TryStreamExt};
    let writes = files.into_iter().map(|(name, group)| async move {
        writer
            .write_tensors(&format!("sampler/{name}"), &group)
            .await
    });
    let mut written: Vec<WrittenFile> = futures::stream::iter(writes)
        .buffered(parallel.max(1))
        .try_collect()
        .await?;
    if let Some(index) = index {
        written.push(
            writer
                .write_bytes("sampler/model.safetensors.index.json", index)
                .await?,
        );
    }
    Ok(written)
}

/// Writes `tensors` as an HF model directory's weights by one rank (see [`full_weights_layout`]),
/// `parallel` files at once.
pub(crate) async fn write_full_weights(
    writer: &FileWriter,
    tensors: Vec<Tensor>,
    max_file_bytes: u64,
    parallel: usize,
) -> Result<Vec<WrittenFile>> {
    let (files, index) = full_weights_layout(tensors, max_file_bytes)?;
    write_weight_files(writer, files, index, parallel).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(n: &[u64]) -> Vec<(String, u64)> {
        n.iter()
            .enumerate()
            .map(|(i, &b)| (format!("t{i}"), b))
            .collect()
    }

    #[test]
    fn one_writer_writes_one_file_until_it_exceeds_the_limit() {
        let one = WeightsPlan::new(&sizes(&[10, 20, 30]), 1, 100);
        assert_eq!(one.files.len(), 1);
        assert_eq!(one.files[0].name, "model.safetensors");
        assert_eq!(one.index().unwrap(), None);
        let split = WeightsPlan::new(&sizes(&[60, 50, 30]), 1, 100);
        let names: Vec<&str> = split.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        assert_eq!(split.files[1].tensors, ["t1", "t2"]);
    }

    #[test]
    fn writers_share_the_bytes_and_every_tensor_is_in_one_file() {
        let tensors = sizes(&[400, 10, 30, 30, 30, 10, 30, 30, 30, 400, 10]);
        for writers in 1..=5u32 {
            let plan = WeightsPlan::new(&tensors, writers, 1 << 30);
            let mut seen: Vec<String> = plan.files.iter().flat_map(|f| f.tensors.clone()).collect();
            seen.sort();
            let mut all: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
            all.sort();
            assert_eq!(seen, all, "{writers} writers");
            // Numbered writer by writer; each writer's tensors keep the model's order.
            let order: Vec<u32> = plan.files.iter().map(|f| f.writer).collect();
            assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
            for f in &plan.files {
                let idx: Vec<usize> = f.tensors.iter().map(|t| t[1..].parse().unwrap()).collect();
                assert!(idx.windows(2).all(|w| w[0] < w[1]), "{idx:?}");
            }
            let index: serde_json::Value =
                serde_json::from_slice(&plan.index().unwrap().unwrap_or_default())
                    .unwrap_or_default();
            if plan.files.len() > 1 {
                assert_eq!(index["metadata"]["total_size"], 1010);
                assert_eq!(
                    index["weight_map"]["t9"],
                    plan.files
                        .iter()
                        .find(|f| f.tensors.contains(&"t9".into()))
                        .unwrap()
                        .name
                );
            }
        }
        // The two big tensors go to different writers.
        let two = WeightsPlan::new(&tensors, 2, 1 << 30);
        assert_ne!(two.writer_of("t0"), two.writer_of("t9"));
    }

    #[test]
    fn a_writer_must_be_given_exactly_its_tensors() {
        let plan = WeightsPlan::new(&sizes(&[4, 4, 4, 4]), 2, 1 << 20);
        let t = |name: &str| {
            Tensor::new(
                name,
                safetensors::Dtype::F32,
                vec![1],
                Bytes::from(vec![0u8; 4]),
            )
            .unwrap()
        };
        let mine: Vec<Tensor> = ["t0", "t1", "t2", "t3"]
            .into_iter()
            .filter(|n| plan.writer_of(n) == Some(1))
            .map(t)
            .collect();
        let files = plan.files_of(1, mine.clone()).unwrap();
        assert_eq!(
            files.iter().map(|(_, g)| g.len()).sum::<usize>(),
            mine.len()
        );
        let mut short = mine.clone();
        short.pop();
        assert!(plan.files_of(1, short).is_err());
        let mut extra = mine;
        extra.push(t("t9"));
        assert!(plan.files_of(1, extra).is_err());
    }
}
