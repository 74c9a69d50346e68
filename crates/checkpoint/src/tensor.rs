//! `Tensor`: a named tensor as bytes, dtype and shape — how the trainer hands state to this crate and
//! gets it back. The dtype vocabulary is safetensors'.

use bytes::Bytes;
pub use safetensors::Dtype;

use crate::error::{CheckpointError, Result};

/// A named tensor (or a slice of one) as raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The name (a DCP flattened key in `dcp/`, an HF fqn in `sampler/`).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape of this tensor (of the slice, when `offsets` is set).
    pub shape: Vec<usize>,
    /// For a slice of a larger tensor: where it starts in each dimension (DCP's `saved_offsets`).
    pub offsets: Option<Vec<usize>>,
    /// `numel * dtype size` bytes, row-major.
    pub data: Bytes,
}

impl Tensor {
    /// A whole tensor; checks that the byte count matches dtype and shape.
    pub fn new(
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<usize>,
        data: Bytes,
    ) -> Result<Self> {
        let t = Self {
            name: name.into(),
            dtype,
            shape,
            offsets: None,
            data,
        };
        t.validate()?;
        Ok(t)
    }

    /// Marks this tensor as the slice starting at `offsets` of a larger one.
    pub fn with_offsets(mut self, offsets: Vec<usize>) -> Result<Self> {
        if offsets.len() != self.shape.len() {
            return Err(CheckpointError::BadTensor {
                name: self.name,
                reason: format!(
                    "{} offsets for {} dimensions",
                    offsets.len(),
                    self.shape.len()
                ),
            });
        }
        self.offsets = Some(offsets);
        Ok(self)
    }

    /// Number of elements.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }

    /// Checks that the data length is `numel * dtype size`.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| CheckpointError::BadTensor {
            name: self.name.clone(),
            reason,
        };
        if self.name.is_empty() {
            return Err(bad("empty name".into()));
        }
        let bits = self
            .numel()
            .and_then(|n| n.checked_mul(self.dtype.bitsize()))
            .ok_or_else(|| bad(format!("shape {:?} overflows", self.shape)))?;
        if bits % 8 != 0 || bits / 8 != self.data.len() {
            return Err(bad(format!(
                "{} bytes of data for {:?} {:?} ({} bits)",
                self.data.len(),
                self.dtype,
                self.shape,
                bits
            )));
        }
        Ok(())
    }
}
