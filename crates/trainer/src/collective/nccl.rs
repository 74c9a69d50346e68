//! NCCL for multi-rank training on CUDA: one communicator per worker, and the collectives the loop
//! needs — the sum all-reduce (replicated gradients), all-gather and reduce-scatter (sharded weights
//! and their gradients, over equal parts: the caller pads uneven shards).
//!
//! The NCCL used is the one libtorch already loaded: `libtorch_cuda` links `libnccl.so.2`, so its
//! symbols are in the process's global scope and are looked up there. That
//! keeps waypoint on the very NCCL its libtorch was built with, needs no NCCL at build time, and
//! leaves a CPU-only libtorch working (the lookup then fails with a clear error). `cudarc`'s loader
//! was the first plan, but it searches for `libnccl.so` / `libnccl.so.<cuda major>`, which the
//! PyTorch wheels do not ship, and its NCCL module pulls in the driver API.
//!
//! Collectives run on the legacy default stream, which libtorch also uses (waypoint never sets
//! another), so they are ordered after the backward kernels that made the gradients and before the
//! optimizer kernels that read them. A collective that does not finish within the timeout (another
//! rank died mid-step) aborts the communicator and fails the step with a message, never a hang.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::collective::cuda::loaded_fn;

/// Bytes of an `ncclUniqueId`.
pub(crate) const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: passed by value to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([u8; UNIQUE_ID_BYTES]);

type Comm = *mut c_void;
type Stream = *mut c_void;

const NCCL_SUCCESS: c_int = 0;
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_BFLOAT16: c_int = 9;
const NCCL_SUM: c_int = 0;

/// NCCL's `ncclDataType_t` of a tensor kind the collectives carry.
fn nccl_dtype(kind: Kind) -> Result<c_int> {
    Ok(match kind {
        Kind::Float => NCCL_FLOAT32,
        Kind::BFloat16 => NCCL_BFLOAT16,
        Kind::Half => NCCL_FLOAT16,
        other => bail!("NCCL collectives here carry fp32, bf16 or fp16 tensors, not {other:?}"),
    })
}

/// The NCCL entry points, resolved from the library libtorch loaded.
pub(crate) struct Nccl {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int,
    reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl Nccl {
    /// Finds NCCL among the libraries already loaded (through libtorch_cuda).
    pub(crate) fn load() -> Result<Self> {
        // SAFETY: each field's type matches NCCL's header.
        unsafe {
            Ok(Self {
                get_version: loaded_fn("ncclGetVersion")?,
                get_unique_id: loaded_fn("ncclGetUniqueId")?,
                comm_init_rank: loaded_fn("ncclCommInitRank")?,
                all_reduce: loaded_fn("ncclAllReduce")?,
                all_gather: loaded_fn("ncclAllGather")?,
                reduce_scatter: loaded_fn("ncclReduceScatter")?,
                comm_destroy: loaded_fn("ncclCommDestroy")?,
                comm_abort: loaded_fn("ncclCommAbort")?,
                get_error_string: loaded_fn("ncclGetErrorString")?,
            })
        }
    }

    /// NCCL's version as (major, minor, patch), e.g. (2, 29, 7).
    pub(crate) fn version(&self) -> Result<(u32, u32, u32)> {
        let mut v: c_int = 0;
        // SAFETY: writes one int.
        self.check(unsafe { (self.get_version)(&mut v) }, "ncclGetVersion")?;
        let v = u32::try_from(v).context("negative NCCL version")?;
        Ok((v / 10000, v % 10000 / 100, v % 100))
    }

    /// A new communicator id: rank 0 makes it and sends it to the others.
    pub(crate) fn unique_id(&self) -> Result<Vec<u8>> {
        let mut id = UniqueId([0; UNIQUE_ID_BYTES]);
        // SAFETY: writes one ncclUniqueId.
        self.check(unsafe { (self.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        Ok(id.0.to_vec())
    }

    fn check(&self, code: c_int, what: &str) -> Result<()> {
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: NCCL returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.get_error_string)(code)) };
        bail!(
            "{what} failed: {} (NCCL error {code})",
            msg.to_string_lossy()
        )
    }
}

/// This worker's NCCL communicator on its GPU.
pub(crate) struct Communicator {
    nccl: Nccl,
    comm: Comm,
    gpu: usize,
    timeout: Duration,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; every `Communicator` method that calls NCCL takes `&mut self`.
unsafe impl Send for Communicator {}

impl Communicator {
    /// Joins the communicator named by `id` (every rank passes the same id) on GPU `gpu`, which
    /// also becomes this thread's current CUDA device.
    pub(crate) fn join(
        nccl: Nccl,
        id: &[u8],
        rank: u32,
        world: u32,
        gpu: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let id: [u8; UNIQUE_ID_BYTES] = id.try_into().map_err(|_| {
            anyhow::anyhow!("an NCCL id has {UNIQUE_ID_BYTES} bytes, got {}", id.len())
        })?;
        crate::collective::cuda::set_device(gpu)?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the handle; the id is passed by value as NCCL declares it.
        let code = unsafe {
            (nccl.comm_init_rank)(&mut comm, world as c_int, UniqueId(id), rank as c_int)
        };
        nccl.check(
            code,
            &format!("ncclCommInitRank (rank {rank} of {world}, GPU {gpu})"),
        )?;
        Ok(Self {
            nccl,
            comm,
            gpu,
            timeout,
        })
    }

    /// Sums `buf` (a contiguous fp32 tensor on this worker's GPU) over all ranks, in place, and
    /// waits for the result.
    pub(crate) fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<()> {
        let dtype = self.check_buffer(buf, "all-reduce")?;
        let (n, ptr) = (buf.numel(), buf.data_ptr());
        // SAFETY: `ptr` holds `n` elements of `dtype` on this communicator's GPU and stays alive
        // (held by `buf`) until the wait below sees the collective finish; null is the default
        // stream.
        let code = unsafe {
            (self.nccl.all_reduce)(
                ptr,
                ptr,
                n,
                dtype,
                NCCL_SUM,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.nccl.check(code, "ncclAllReduce")?;
        self.wait(buf)
    }

    /// Every rank's `send` (the same length on every rank), concatenated in rank order: a new
    /// tensor of `world` × its length, once the collective has finished.
    pub(crate) fn all_gather(&mut self, send: &Tensor, world: u32) -> Result<Tensor> {
        let dtype = self.check_buffer(send, "all-gather")?;
        let n = send.numel();
        let recv = Tensor::empty([(n * world as usize) as i64], (send.kind(), send.device()));
        // SAFETY: `send` holds `n` elements and `recv` world × n of `dtype` on this GPU; both live
        // until the wait below sees the collective finish.
        let code = unsafe {
            (self.nccl.all_gather)(
                send.data_ptr(),
                recv.data_ptr(),
                n,
                dtype,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.nccl.check(code, "ncclAllGather")?;
        self.wait(&recv)?;
        Ok(recv)
    }

    /// The sum over the ranks of `send` (`world` equal parts), this rank's part of it: a new tensor
    /// of 1/`world` of its length, once the collective has finished.
    pub(crate) fn reduce_scatter_sum(&mut self, send: &Tensor, world: u32) -> Result<Tensor> {
        let dtype = self.check_buffer(send, "reduce-scatter")?;
        let n = send.numel() / world.max(1) as usize;
        ensure!(
            n * world as usize == send.numel(),
            "reduce-scatter wants {world} equal parts, got {} elements",
            send.numel()
        );
        let recv = Tensor::empty([n as i64], (send.kind(), send.device()));
        // SAFETY: `send` holds world × n and `recv` n elements of `dtype` on this GPU; both live
        // until the wait below sees the collective finish.
        let code = unsafe {
            (self.nccl.reduce_scatter)(
                send.data_ptr(),
                recv.data_ptr(),
                n,
                dtype,
                NCCL_SUM,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.nccl.check(code, "ncclReduceScatter")?;
        self.wait(&recv)?;
        Ok(recv)
    }

    /// `buf` is a non-empty contiguous tensor of a carried kind on this communicator's GPU: its
    /// NCCL dtype.
    fn check_buffer(&self, buf: &Tensor, what: &str) -> Result<c_int> {
        ensure!(
            buf.device() == Device::Cuda(self.gpu) && buf.is_contiguous() && buf.numel() > 0,
            "NCCL {what} wants a non-empty contiguous tensor on cuda:{}, got {:?} on {:?}",
            self.gpu,
            buf.size(),
            buf.device()
        );
        nccl_dtype(buf.kind())
    }

    /// Waits until the kernels queued so far (the collective included) have run: a copy of one
    /// element to the host, on a helper thread so that a collective stuck on a dead peer can be
    /// aborted after the timeout.
    fn wait(&mut self, buf: &Tensor) -> Result<()> {
        let probe = buf.narrow(0, 0, 1);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(probe.to_device(Device::Cpu).double_value(&[]));
        });
        match rx.recv_timeout(self.timeout) {
            Ok(_) => Ok(()),
            Err(_) => {
                // SAFETY: aborting makes the stuck kernels return; the communicator is not used
                // again (the step fails and the worker exits).
                unsafe { (self.nccl.comm_abort)(self.comm) };
                self.comm = std::ptr::null_mut();
                bail!(
                    "an NCCL collective did not finish within {} s: another rank probably died or \
                     hangs; the communicator was aborted (raise --dist_timeout_secs if steps are \
                     that slow)",
                    self.timeout.as_secs()
                )
            }
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: the handle came from ncclCommInitRank and is released once.
            unsafe { (self.nccl.comm_destroy)(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wheel's libtorch_cuda loads NCCL even on a machine without a GPU (the set-up installs
    /// the CUDA build): the symbols resolve, the version is sane, and ids (no GPU needed) differ.
    #[test]
    fn finds_libtorchs_nccl() {
        let nccl = Nccl::load().expect("NCCL symbols");
        let (major, minor, _) = nccl.version().expect("version");
        assert!(major == 2 && minor >= 18, "NCCL {major}.{minor}");
        let a = nccl.unique_id().expect("id");
        let b = nccl.unique_id().expect("id");
        assert_eq!(a.len(), UNIQUE_ID_BYTES);
        assert_ne!(a, b, "two ids must differ");
        assert_eq!(nccl_dtype(Kind::BFloat16).unwrap(), NCCL_BFLOAT16);
        assert!(nccl_dtype(Kind::Int64).is_err());
    }
}
