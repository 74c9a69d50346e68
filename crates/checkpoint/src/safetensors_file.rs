//! Safetensors blobs streamed through storage.
//!
//! Writing: the header is computed up front from names, dtypes and shapes, then each tensor's bytes are
//! handed to the storage writer without another copy. Reading: the 8-byte length and the header are read
//! with ranged reads and validated (by the `safetensors` crate: contiguous, non-overlapping offsets that
//! match dtype and shape; known dtypes) before any tensor byte is touched; the header must also account
//! for exactly the blob's size.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use safetensors::tensor::{Metadata, TensorInfo};
use waypoint_storage::{BlobInfo, Store};

use crate::error::{CheckpointError, Result};
use crate::tensor::Tensor;

/// `__metadata__` key that PyTorch DCP reads slice offsets from.
pub const DCP_SHARDING_INFO: &str = "DCP_SHARDING_INFO";

/// The largest header accepted (the safetensors crate's own bound is 100 MB).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// A parsed safetensors header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Byte where tensor data starts (8 + header length).
    pub data_start: u64,
    /// Tensor name → (dtype, shape, offsets within the data region), in file order.
    pub tensors: Vec<(String, TensorInfo)>,
    /// `__metadata__`.
    pub metadata: HashMap<String, String>,
}

impl Header {
    /// The tensors whose names `want` accepts, as slices of `data` (the blob's data region).
    fn tensors_in(&self, data: Bytes, want: &dyn Fn(&str) -> bool) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for (name, info) in &self.tensors {
            if !want(name) {
                continue;
            }
            let (s, e) = info.data_offsets;
            out.push(Tensor {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                offsets: self.saved_offsets(name)?,
                data: data.slice(s..e),
            });
        }
        Ok(out)
    }

    /// The DCP slice offsets of `name`, if the file carries `DCP_SHARDING_INFO`.
    pub fn saved_offsets(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let Some(info) = self.metadata.get(DCP_SHARDING_INFO) else {
            return Ok(None);
        };
        let parsed: HashMap<String, HashMap<String, Vec<usize>>> = serde_json::from_str(info)
            .map_err(|e| CheckpointError::BadBlob {
                key: name.to_string(),
                reason: format!("{DCP_SHARDING_INFO} is not valid JSON: {e}"),
            })?;
        Ok(parsed
            .get(name)
            .and_then(|m| m.get("saved_offsets"))
            .cloned())
    }
}

/// Encodes the header (length prefix included, padded to 8 bytes) for `tensors` in the given order.
pub fn encode_header(tensors: &[Tensor], extra: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    let mut sharding = BTreeMap::new();
    let sliced = tensors.iter().any(|t| t.offsets.is_some());
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        t.validate()?;
        if !seen.insert(t.name.as_str()) {
            return Err(CheckpointError::BadTensor {
                name: t.name.clone(),
                reason: "appears twice in one file".into(),
            });
        }
        let end = offset + t.data.len();
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
        if sliced {
            // PyTorch's reader looks up every tensor of a file that carries the key.
            let offsets = t.offsets.clone().unwrap_or_else(|| vec![0; t.shape.len()]);
            sharding.insert(t.name.clone(), BTreeMap::from([("saved_offsets", offsets)]));
        }
    }
    let mut meta: HashMap<String, String> = extra.clone().into_iter().collect();
    meta.insert("format".into(), "pt".into());
    if sliced {
        meta.insert(
            DCP_SHARDING_INFO.into(),
            serde_json::to_string(&sharding)
                .map_err(|e| CheckpointError::Invalid(e.to_string()))?,
        );
    }
    let metadata = Metadata::new(Some(meta), infos).map_err(|e| CheckpointError::BadBlob {
        key: "<new blob>".into(),
        reason: e.to_string(),
    })?;
    let mut json =
        serde_json::to_vec(&metadata).map_err(|e| CheckpointError::Invalid(e.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Streams `tensors` as one safetensors blob to `key`; returns its size and sha256.
pub async fn write_file(
    store: &Store,
    key: &str,
    tensors: &[Tensor],
    extra: &BTreeMap<String, String>,
) -> Result<BlobInfo> {
    let header = encode_header(tensors, extra)?;
    let mut w = waypoint_storage::BlobWriter::new(store, key)?;
    w.write(&header).await?;
    for t in tensors {
        w.write_bytes(t.data.clone()).await?;
    }
    Ok(w.finish().await?)
}

/// Parses a header from its bytes: `prefix` holds at least the first 8 bytes of the blob, `size` is
/// the blob's total size. Returns the header length when `prefix` is too short to hold the header.
pub fn parse_header(key: &str, prefix: &[u8], size: u64) -> Result<Result<Header, u64>> {
    let bad = |reason: String| CheckpointError::BadBlob {
        key: key.to_string(),
        reason,
    };
    let Some(len_bytes) = prefix.get(..8) else {
        return Err(bad(format!(
            "{size} bytes is too short for a safetensors header"
        )));
    };
    let mut arr = [0u8; 8];
    arr.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(arr);
    if n > MAX_HEADER_LEN {
        return Err(bad(format!("header length {n} exceeds {MAX_HEADER_LEN}")));
    }
    if 8 + n > size {
        return Err(bad(format!(
            "header length {n} runs past the end of the {size}-byte blob"
        )));
    }
    let Some(json) = prefix.get(8..(8 + n) as usize) else {
        return Ok(Err(n));
    };
    let metadata: Metadata =
        serde_json::from_slice(json).map_err(|e| bad(format!("header does not parse: {e}")))?;
    let data_len = metadata.data_len() as u64;
    if 8 + n + data_len != size {
        return Err(bad(format!(
            "header describes {data_len} bytes of tensor data but the blob holds {}",
            size - 8 - n
        )));
    }
    let mut tensors: Vec<(String, TensorInfo)> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    Ok(Ok(Header {
        data_start: 8 + n,
        tensors,
        metadata: metadata.metadata().clone().unwrap_or_default(),
    }))
}

/// Reads and validates the header of the blob at `key`, `size` bytes long.
pub async fn read_header(store: &Store, key: &str, size: u64) -> Result<Header> {
    let first = store.get_range(key, 0..size.min(64 * 1024)).await?;
    match parse_header(key, &first, size)? {
        Ok(h) => Ok(h),
        Err(n) => {
            let all = store.get_range(key, 0..8 + n).await?;
            match parse_header(key, &all, size)? {
                Ok(h) => Ok(h),
                Err(_) => Err(CheckpointError::BadBlob {
                    key: key.to_string(),
                    reason: "header shorter than announced".into(),
                }),
            }
        }
    }
}

/// Reads the tensors of the blob at `key` (`size` bytes) whose names `want` accepts.
pub async fn read_file(
    store: &Store,
    key: &str,
    size: u64,
    want: &dyn Fn(&str) -> bool,
) -> Result<Vec<Tensor>> {
    let header = read_header(store, key, size).await?;
    let data = if header.tensors.iter().any(|(n, _)| want(n)) {
        store.get_range(key, header.data_start..size).await?
    } else {
        Bytes::new()
    };
    header.tensors_in(data, want)
}

/// The tensors whose names `want` accepts out of a whole blob held in memory (zero-copy slices of
/// `bytes`); `key` names it in errors.
pub fn read_bytes(key: &str, bytes: Bytes, want: &dyn Fn(&str) -> bool) -> Result<Vec<Tensor>> {
    let header = match parse_header(key, &bytes, bytes.len() as u64)? {
        Ok(h) => h,
        Err(_) => {
            return Err(CheckpointError::BadBlob {
                key: key.to_string(),
                reason: "header longer than the file".into(),
            })
        }
    };
    let data = bytes.slice(header.data_start as usize..);
    header.tensors_in(data, want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    fn t(name: &str, dtype: Dtype, shape: Vec<usize>) -> Tensor {
        let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        let data: Vec<u8> = (0..n).map(|i| (i * 31 + name.len()) as u8).collect();
        Tensor::new(name, dtype, shape, Bytes::from(data)).unwrap()
    }

    fn encode(tensors: &[Tensor]) -> Vec<u8> {
        let mut blob = encode_header(tensors, &BTreeMap::new()).unwrap();
        for x in tensors {
            blob.extend_from_slice(&x.data);
        }
        blob
    }

    #[test]
    fn header_round_trips_and_the_python_format_parses_it() {
        let ts = vec![
            t("b", Dtype::BF16, vec![3, 5]),
            t("a", Dtype::F32, vec![2]),
            t("s", Dtype::I64, vec![]),
        ];
        let blob = encode(&ts);
        assert_eq!(u64::from_le_bytes(blob[..8].try_into().unwrap()) % 8, 0);
        let st = safetensors::SafeTensors::deserialize(&blob).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &ts[0].data[..]);
        let h = parse_header("k", &blob, blob.len() as u64)
            .unwrap()
            .unwrap();
        assert_eq!(
            h.tensors
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["b", "a", "s"]
        );
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        assert!(h.saved_offsets("b").unwrap().is_none());
    }

    #[test]
    fn sliced_files_list_every_tensor_in_the_sharding_info() {
        let ts = vec![
            t("w", Dtype::F32, vec![2, 4])
                .with_offsets(vec![2, 0])
                .unwrap(),
            t("v", Dtype::F32, vec![3]),
        ];
        let blob = encode(&ts);
        let h = parse_header("k", &blob, blob.len() as u64)
            .unwrap()
            .unwrap();
        assert_eq!(h.saved_offsets("w").unwrap(), Some(vec![2, 0]));
        assert_eq!(h.saved_offsets("v").unwrap(), Some(vec![0]));
    }

    fn lie(header: &str, data_len: usize) -> String {
        let mut json = header.as_bytes().to_vec();
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let mut blob = (json.len() as u64).to_le_bytes().to_vec();
        blob.extend_from_slice(&json);
        blob.extend(std::iter::repeat_n(0u8, data_len));
        match parse_header("blob.safetensors", &blob, blob.len() as u64) {
            Ok(Ok(_)) => panic!("accepted a lying header: {header}"),
            Ok(Err(n)) => panic!("asked for {n} more bytes"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn lying_headers_are_typed_errors() {
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(lie(overlap, 12).contains("blob.safetensors"));
        let past_end = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        assert!(
            lie(past_end, 8).contains("tensor data"),
            "{}",
            lie(past_end, 8)
        );
        let unknown = r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(lie(unknown, 1).contains("does not parse"));
        let wrong_size = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(lie(wrong_size, 8).contains("does not parse"));
        let mut absurd = (u64::MAX - 3).to_le_bytes().to_vec();
        absurd.extend_from_slice(b"{}");
        let e = parse_header("k", &absurd, absurd.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds"), "{e}");
        let mut long = 1000u64.to_le_bytes().to_vec();
        long.extend_from_slice(b"{}");
        let e = parse_header("k", &long, long.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("past the end"), "{e}");
        assert!(parse_header("k", b"abc", 3).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_header_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
                                     len in 0u64..64) {
            let mut blob = len.to_le_bytes().to_vec();
            blob.extend_from_slice(&bytes);
            let _ = parse_header("fuzz", &blob, blob.len() as u64);
            let _ = parse_header("fuzz", &bytes, bytes.len() as u64);
        }

        #[test]
        fn mutated_valid_headers_never_panic(flip in 0usize..400, to in proptest::num::u8::ANY) {
            let mut blob = encode(&[t("x", Dtype::F32, vec![2, 3]), t("y", Dtype::BF16, vec![4])]);
            let i = flip % blob.len();
            blob[i] = to;
            let _ = parse_header("fuzz", &blob, blob.len() as u64);
        }
    }
}
