//! The protobuf messages of the Tinker SDK's wire (package `tinker_public`, proto3) that this
//! server reads and writes: a `forward_backward` request in, its output back. Written with
//! prost's derives from the schema the SDK's generated module embeds (see
//! `docs/tinker-protocol.md` §6); fields this server does not read (provenance spans, images) are
//! left out, and prost skips them on decoding. Numbers travel as packed little-endian bytes.

use std::collections::HashMap;

/// The element type of a tensor's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum DType {
    Unspecified = 0,
    Float32 = 1,
    Int64 = 2,
    Int32 = 3,
    Bfloat16 = 4,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ForwardBackwardRequest {
    #[prost(string, tag = "1")]
    pub(crate) model_id: String,
    #[prost(int32, tag = "2")]
    pub(crate) seq_id: i32,
    #[prost(message, repeated, tag = "3")]
    pub(crate) data: Vec<Datum>,
    #[prost(string, tag = "4")]
    pub(crate) loss_fn: String,
    #[prost(map = "string, double", tag = "5")]
    pub(crate) loss_fn_config: HashMap<String, f64>,
    #[prost(bool, tag = "6")]
    pub(crate) forward_only: bool,
    #[prost(map = "string, message", tag = "7")]
    pub loss_fn_config_v2: HashMap<String, LossConfigValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LossConfigValue {
    #[prost(oneof = "loss_config_value::Value", tags = "1, 2")]
    pub(crate) value: Option<loss_config_value::Value>,
}

pub(crate) mod loss_config_value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(crate) enum Value {
        #[prost(double, tag = "1")]
        Number(f64),
        #[prost(string, tag = "2")]
        Text(String),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Datum {
    #[prost(message, repeated, tag = "1")]
    pub(crate) model_input: Vec<Chunk>,
    #[prost(map = "string, message", tag = "2")]
    pub(crate) loss_fn_inputs: HashMap<String, Tensor>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Chunk {
    #[prost(oneof = "chunk::Kind", tags = "1")]
    pub(crate) chunk: Option<chunk::Kind>,
}

pub(crate) mod chunk {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(crate) enum Kind {
        #[prost(message, tag = "1")]
        EncodedText(crate::proto::EncodedTextChunk),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct EncodedTextChunk {
    /// int32, little-endian.
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) tokens: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Tensor {
    #[prost(oneof = "tensor::Encoding", tags = "1, 2")]
    pub(crate) encoding: Option<tensor::Encoding>,
    #[prost(enumeration = "DType", tag = "3")]
    pub(crate) dtype: i32,
    #[prost(int64, repeated, tag = "4")]
    pub(crate) shape: Vec<i64>,
}

pub(crate) mod tensor {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(crate) enum Encoding {
        #[prost(bytes = "vec", tag = "1")]
        Dense(Vec<u8>),
        #[prost(message, tag = "2")]
        SparseCsr(crate::proto::SparseCsr),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SparseCsr {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) values: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) crow_indices: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) col_indices: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ForwardBackwardOutput {
    #[prost(string, tag = "1")]
    pub(crate) loss_fn_output_type: String,
    #[prost(message, repeated, tag = "2")]
    pub(crate) loss_fn_outputs: Vec<ArrayRecord>,
    #[prost(map = "string, double", tag = "3")]
    pub(crate) metrics: HashMap<String, f64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ArrayRecord {
    #[prost(string, tag = "1")]
    pub(crate) type_tag: String,
    #[prost(map = "string, message", tag = "2")]
    pub(crate) fields: HashMap<String, BatchedTensor>,
    #[prost(int64, tag = "3")]
    pub(crate) num_datums: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct BatchedTensor {
    /// Every datum's values, concatenated.
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) data: Vec<u8>,
    /// int64 byte offsets into `data`, one more than the datums.
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) offsets: Vec<u8>,
    #[prost(enumeration = "DType", tag = "3")]
    pub(crate) dtype: i32,
    #[prost(int64, repeated, tag = "4")]
    pub(crate) trailing_shape: Vec<i64>,
}

/// Why a sample ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum StopReason {
    Stop = 0,
    Length = 1,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SampleResponse {
    #[prost(message, repeated, tag = "1")]
    pub(crate) sequences: Vec<SampledSequence>,
    /// float32, one a prompt token, NaN for the first.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub(crate) prompt_logprobs: Option<Vec<u8>>,
    #[prost(int32, tag = "4")]
    pub(crate) prompt_cache_hit_tokens: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SampledSequence {
    #[prost(enumeration = "StopReason", tag = "1")]
    pub(crate) stop_reason: i32,
    /// int32, little-endian.
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) tokens: Vec<u8>,
    /// float32, one a token.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub(crate) logprobs: Option<Vec<u8>>,
}

/// Little-endian values of a packed byte field.
pub(crate) fn unpack<const N: usize, T>(bytes: &[u8], from: fn([u8; N]) -> T) -> Option<Vec<T>> {
    if bytes.len() % N != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(N)
            .map(|c| from(c.try_into().expect("chunks_exact gives N bytes")))
            .collect(),
    )
}

/// A batched float32 field: one vector a datum, each `[-1, *trailing_shape]`.
pub(crate) fn batched_f32(per_datum: &[Vec<f32>], trailing_shape: Vec<i64>) -> BatchedTensor {
    let mut data = Vec::new();
    let mut offsets = vec![0i64];
    for values in per_datum {
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        offsets.push(data.len() as i64);
    }
    BatchedTensor {
        data,
        offsets: offsets.iter().flat_map(|o| o.to_le_bytes()).collect(),
        dtype: DType::Float32 as i32,
        trailing_shape,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Produced by the SDK's own `forward_backward_request_to_proto` (tinker 0.38.0): one datum,
    /// model_input [10, 11, 12], target_tokens [11, 12, 13], weights [0, 1, 1], loss_fn ppo with
    /// its two clip thresholds, model `S:train:0`, seq_id 1.
    const SDK_REQUEST: &str =
        "0a09533a747261696e3a3010011a640a100a0e0a0c0a0000000b0000000c00000012\
        1e0a077765696768747312130a0c000000000000803f0000803f180122010312300a0d7461726765745f746f6b\
        656e73121f0a180b000000000000000c000000000000000d000000000000001802220103220370706f2a1d0a12\
        636c69705f6c6f775f7468726573686f6c64119a9999999999e93f2a1e0a13636c69705f686967685f74687265\
        73686f6c6411333333333333f33f3a1f0a12636c69705f6c6f775f7468726573686f6c641209099a9999999999\
        e93f3a200a13636c69705f686967685f7468726573686f6c64120909333333333333f33f";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect::<Vec<_>>().join("");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_sdks_own_encoding_of_a_request_decodes() {
        let r = ForwardBackwardRequest::decode(hex(SDK_REQUEST).as_slice()).unwrap();
        assert_eq!((r.model_id.as_str(), r.seq_id), ("S:train:0", 1));
        assert_eq!((r.loss_fn.as_str(), r.forward_only), ("ppo", false));
        assert_eq!(r.loss_fn_config["clip_low_threshold"], 0.8);
        assert_eq!(r.loss_fn_config["clip_high_threshold"], 1.2);
        let d = &r.data[0];
        let Some(chunk::Kind::EncodedText(text)) = &d.model_input[0].chunk else {
            panic!("an encoded text chunk: {d:?}");
        };
        assert_eq!(
            unpack(&text.tokens, i32::from_le_bytes).unwrap(),
            [10, 11, 12]
        );
        let targets = &d.loss_fn_inputs["target_tokens"];
        assert_eq!(targets.dtype, DType::Int64 as i32);
        let Some(tensor::Encoding::Dense(bytes)) = &targets.encoding else {
            panic!("dense targets");
        };
        assert_eq!(unpack(bytes, i64::from_le_bytes).unwrap(), [11, 12, 13]);
        let Some(tensor::Encoding::Dense(bytes)) = &d.loss_fn_inputs["weights"].encoding else {
            panic!("dense weights");
        };
        assert_eq!(unpack(bytes, f32::from_le_bytes).unwrap(), [0.0, 1.0, 1.0]);
    }

    #[test]
    fn a_batched_field_carries_byte_offsets() {
        let b = batched_f32(&[vec![1.0, 2.0], vec![], vec![3.0]], Vec::new());
        assert_eq!(
            unpack(&b.offsets, i64::from_le_bytes).unwrap(),
            [0, 8, 8, 12]
        );
        assert_eq!(
            unpack(&b.data, f32::from_le_bytes).unwrap(),
            [1.0, 2.0, 3.0]
        );
        assert!(unpack(&[0u8; 3], f32::from_le_bytes).is_none());
    }
}
