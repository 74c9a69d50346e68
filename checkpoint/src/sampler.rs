//! The sampler part's weights: a full HF model directory (`model.safetensors`, or shards with
//! `model.safetensors.index.json` as transformers writes them).

use bytes::Bytes;

use crate::dcp::split_into_files;
use crate::error::Result;
use crate::manager::FileWriter;
use crate::manifest::FileEntry;
use crate::tensor::Tensor;

/// Writes `tensors` as `sampler/model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards
/// plus the index when they exceed `max_file_bytes`.
pub async fn write_full_weights(
    writer: &FileWriter,
    tensors: Vec<Tensor>,
    max_file_bytes: u64,
) -> Result<Vec<FileEntry>> {
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let groups = split_into_files(tensors, max_file_bytes);
    let mut files = Vec::new();
    if groups.len() == 1 {
        let group = groups.into_iter().next().unwrap_or_default();
        files.push(
            writer
                .write_tensors("sampler/model.safetensors", &group)
                .await?,
        );
        return Ok(files);
    }
    let count = groups.len();
    let mut weight_map = serde_json::Map::new();
    for (i, group) in groups.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        for t in &group {
            weight_map.insert(t.name.clone(), serde_json::Value::String(name.clone()));
        }
        files.push(
            writer
                .write_tensors(&format!("sampler/{name}"), &group)
                .await?,
        );
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    files.push(
        writer
            .write_bytes(
                "sampler/model.safetensors.index.json",
                Bytes::from(serde_json::to_vec_pretty(&index).unwrap_or_default()),
            )
            .await?,
    );
    Ok(files)
}
