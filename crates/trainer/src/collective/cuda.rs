//! The few CUDA runtime calls that tch does not expose: making a GPU the thread's current device,
//! and asking how much memory a GPU has free. Like NCCL ([`crate::collective::nccl`]), they are looked up in the
//! CUDA runtime that libtorch_cuda already loaded, so a CPU-only libtorch still runs (the calls then
//! fail with a clear error).

use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use libloading::os::unix::Library;

struct Runtime {
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    get_device: unsafe extern "C" fn(*mut c_int) -> c_int,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// A function that libtorch_cuda's libraries put in the process's global scope.
///
/// # Safety
/// `F` must be the function pointer type of `name` as its C header declares it.
pub(crate) unsafe fn loaded_fn<F: Copy>(name: &str) -> Result<F> {
    let symbol = format!("{name}\0");
    // SAFETY: the caller vouches for `F`; the libraries stay loaded for the process's life.
    let f = unsafe { Library::this().get::<F>(symbol.as_bytes()) }.map_err(|_| {
        anyhow!(
            "`{name}` is not loaded: this libtorch has no CUDA support (a CPU-only build?); \
             GPU training needs the CUDA build of PyTorch"
        )
    })?;
    Ok(*f)
}

fn runtime() -> Result<&'static Runtime> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let load = || -> Result<Runtime> {
                // SAFETY: each field's type matches the CUDA runtime's header.
                unsafe {
                    Ok(Runtime {
                        set_device: loaded_fn("cudaSetDevice")?,
                        get_device: loaded_fn("cudaGetDevice")?,
                        mem_get_info: loaded_fn("cudaMemGetInfo")?,
                        get_error_string: loaded_fn("cudaGetErrorString")?,
                    })
                }
            };
            load().map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn check(rt: &Runtime, code: c_int, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the runtime returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr((rt.get_error_string)(code)) };
    bail!(
        "{what} failed: {} (CUDA error {code})",
        msg.to_string_lossy()
    )
}

/// Makes GPU `gpu` this thread's current CUDA device (what NCCL and raw CUDA calls act on).
pub(crate) fn set_device(gpu: usize) -> Result<()> {
    let rt = runtime()?;
    // SAFETY: plain int argument.
    check(
        rt,
        unsafe { (rt.set_device)(gpu as c_int) },
        &format!("cudaSetDevice({gpu})"),
    )
}

/// Bytes free on GPU `gpu` (memory libtorch's allocator caches counts as used).
pub(crate) fn free_memory(gpu: usize) -> Result<u64> {
    let rt = runtime()?;
    let mut current: c_int = 0;
    check(
        rt,
        // SAFETY: writes one int.
        unsafe { (rt.get_device)(&mut current) },
        "cudaGetDevice",
    )?;
    set_device(gpu)?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: writes two size_t.
    let code = unsafe { (rt.mem_get_info)(&mut free, &mut total) };
    // SAFETY: plain int argument; restores the thread's device.
    unsafe { (rt.set_device)(current) };
    check(rt, code, "cudaMemGetInfo")?;
    Ok(free as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime resolves from the loaded libtorch_cuda; without a GPU its calls fail with CUDA's
    /// own message instead of crashing.
    #[test]
    fn resolves_and_reports_errors() {
        match free_memory(0) {
            Ok(free) => assert!(tch::Cuda::is_available() && free > 0),
            Err(e) => {
                assert!(!tch::Cuda::is_available());
                assert!(e.to_string().contains("CUDA error"), "{e}");
            }
        }
    }
}
