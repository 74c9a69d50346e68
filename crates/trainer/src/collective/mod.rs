//! The ranks of a job: joining the c10d group ([`ranks`]), summing gradients with the NCCL that
//! libtorch loaded on CUDA ([`nccl`], through [`cuda`]'s runtime calls) or over a TCP ring on CPU.
//! Which rows a rank owns is [`crate::shard`]'s.

pub(crate) mod cuda;
pub(crate) mod nccl;
pub(crate) mod ranks;
