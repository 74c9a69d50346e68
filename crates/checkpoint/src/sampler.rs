//! The sampler part's weights: a full HF model directory (`model.safetensors`, or shards with
//! `model.safetensors.index.json` as transformers writes them).

use bytes::Bytes;

use crate::dcp::split_into_files;
use crate::error::{to_json_pretty, Result};
use crate::file_entry::WrittenFile;
use crate::tensor::Tensor;
use crate::writer::FileWriter;

/// Weights files (name, tensors) and, when sharded, the index's bytes.
pub(crate) type FullWeightsLayout = (Vec<(String, Vec<Tensor>)>, Option<Bytes>);

/// How full weights are laid out: `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards
/// with the bytes of `model.safetensors.index.json` when they exceed `max_file_bytes`.
pub(crate) fn full_weights_layout(
    tensors: Vec<Tensor>,
    max_file_bytes: u64,
) -> Result<FullWeightsLayout> {
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let groups = split_into_files(tensors, max_file_bytes);
    if groups.len() == 1 {
        let all = groups.into_iter().flatten().collect();
        return Ok((vec![("model.safetensors".to_string(), all)], None));
    }
    let count = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut named = Vec::new();
    for (i, group) in groups.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        for t in &group {
            weight_map.insert(t.name.clone(), serde_json::Value::String(name.clone()));
        }
        named.push((name, group));
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let index = Bytes::from(to_json_pretty("model.safetensors.index.json", &index)?);
    Ok((named, Some(index)))
}

/// Writes `tensors` as an HF model directory's weights (see [`full_weights_layout`]), `parallel`
/// files at once.
pub(crate) async fn write_full_weights(
    writer: &FileWriter,
    tensors: Vec<Tensor>,
    max_file_bytes: u64,
    parallel: usize,
) -> Result<Vec<WrittenFile>> {
    use futures::{StreamExt, TryStreamExt};
    let (groups, index) = full_weights_layout(tensors, max_file_bytes)?;
    let writes = groups.into_iter().map(|(name, group)| async move {
        writer
            .write_tensors(&format!("sampler/{name}"), &group)
            .await
    });
    let mut files: Vec<WrittenFile> = futures::stream::iter(writes)
        .buffered(parallel.max(1))
        .try_collect()
        .await?;
    if let Some(index) = index {
        files.push(
            writer
                .write_bytes("sampler/model.safetensors.index.json", index)
                .await?,
        );
    }
    Ok(files)
}
