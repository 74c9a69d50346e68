//! The ranks of a job: joining the c10d group ([`ranks`]), summing gradients with the NCCL that
//! libtorch loaded on CUDA ([`nccl`], through [`cuda`]'s runtime calls) or over a TCP ring on CPU;
//! which rows of a tensor a rank owns when state is sharded ([`shard`]).

pub(crate) mod cuda;
pub(crate) mod nccl;
pub(crate) mod ranks;
pub(crate) mod shard;
