//! The boundary between libtorch and the crates that do not know it: tch tensors ↔ the checkpoint
//! crate's [`waypoint_checkpoint::Tensor`] (name, dtype, shape, little-endian bytes), the
//! configuration's sampler dtype → a libtorch kind, and a data [`Batch`] → input and label tensors.
//! The only place that knows both sides.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use tch::{Device, Kind, Tensor};
use waypoint_checkpoint::{Dtype, Tensor as Blob};
use waypoint_config::SamplerDtype;
use waypoint_data::Batch;

/// A batch's inputs and labels as `[rows, columns]` int64 tensors on `device`.
pub(crate) fn batch_tensors(batch: &Batch, device: Device) -> (Tensor, Tensor) {
    let shape = [batch.rows as i64, batch.columns as i64];
    (
        Tensor::from_slice(&batch.ids).view(shape).to_device(device),
        Tensor::from_slice(&batch.labels)
            .view(shape)
            .to_device(device),
    )
}

/// The libtorch dtype of the promotable weights.
pub(crate) fn sampler_kind(dtype: SamplerDtype) -> Kind {
    match dtype {
        SamplerDtype::Bf16 => Kind::BFloat16,
        SamplerDtype::Fp16 => Kind::Half,
        SamplerDtype::Fp32 => Kind::Float,
    }
}

/// The libtorch kind of a safetensors dtype.
pub(crate) fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("tensor dtype {other:?} has no libtorch equivalent here"),
    })
}

/// The safetensors dtype of a libtorch kind.
pub(crate) fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Double => Dtype::F64,
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("libtorch kind {other:?} cannot be saved as safetensors"),
    })
}

/// Bytes of `t`'s elements.
pub(crate) fn byte_size(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Copies `tensor` (any device) to host bytes under `name`, converted to `kind` when given. The
/// conversion runs where the tensor lives, and the bytes land in the blob's buffer in one copy.
pub(crate) fn to_blob(name: &str, tensor: &Tensor, kind: Option<Kind>) -> Result<Blob> {
    let t = tensor.detach();
    let t = match kind {
        Some(k) if k != t.kind() => t.to_kind(k),
        _ => t,
    };
    let shape = t.size();
    let mut data = vec![0u8; byte_size(&t)];
    if !data.is_empty() {
        // SAFETY: `host` views `data` (exactly its size, contiguous) and is dropped before it.
        let mut host =
            unsafe { Tensor::f_from_blob(data.as_mut_ptr(), &shape, &[], t.kind(), Device::Cpu) }
                .with_context(|| format!("tensor {name}: a host view"))?;
        host.f_copy_(&t)
            .with_context(|| format!("copying tensor {name} to host memory"))?;
    }
    Ok(Blob::new(
        name,
        dtype_of(t.kind())?,
        shape.iter().map(|&d| d as usize).collect(),
        Bytes::from(data),
    )?)
}

/// A libtorch tensor (on the CPU) holding a copy of `blob`'s bytes.
pub(crate) fn from_blob(blob: &Blob) -> Result<Tensor> {
    let shape: Vec<i64> = blob.shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(&blob.data, &shape, kind_of(blob.dtype)?)
        .with_context(|| format!("tensor {} ({:?} {:?})", blob.name, blob.dtype, blob.shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind_bit_for_bit() {
        // No draws from libtorch's global generator here: other tests seed it.
        let base = (Tensor::arange(15, (Kind::Float, Device::Cpu)) / 7.0 - 1.0).view([3, 5]);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double] {
            let t = base.to_kind(kind);
            let blob = to_blob("w", &t, None).unwrap();
            assert_eq!(blob.shape, vec![3, 5]);
            let back = from_blob(&blob).unwrap();
            assert_eq!(back.kind(), kind);
            assert!(back.equal(&t));
        }
        let ints = Tensor::arange(10, (Kind::Int64, Device::Cpu));
        assert!(from_blob(&to_blob("i", &ints, None).unwrap())
            .unwrap()
            .equal(&ints));
        let bf = to_blob("w", &base, Some(Kind::BFloat16)).unwrap();
        assert_eq!(bf.dtype, Dtype::BF16);
        assert_eq!(bf.data.len(), 15 * 2);
    }
}
