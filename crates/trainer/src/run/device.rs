//! `--device auto|cpu|cuda[:i]`.

use anyhow::{bail, Context, Result};
use tch::Device;

/// Resolves a `--device` value; `auto` is CUDA:0 when libtorch sees a GPU, else CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    parse_device_for(spec, 0)
}

/// Like [`parse_device`], for the worker with `local_rank` on its node: `auto` and `cuda` pick GPU
/// `local_rank`, as torchrun workers expect.
pub fn parse_device_for(spec: &str, local_rank: u64) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let gpu = local_rank as usize;
    let device = match spec.as_str() {
        "auto" if tch::Cuda::is_available() => Device::Cuda(gpu),
        "auto" => Device::Cpu,
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(gpu),
        s => match s.strip_prefix("cuda:") {
            Some(i) => Device::Cuda(
                i.parse()
                    .with_context(|| format!("--device {spec}: `{i}` is not a GPU index"))?,
            ),
            None => bail!("--device {spec}: expected auto, cpu, cuda or cuda:<index>"),
        },
    };
    if let Device::Cuda(i) = device {
        let n = tch::Cuda::device_count();
        if i as i64 >= n {
            bail!("--device {spec}: libtorch sees {n} CUDA device(s); use --device cpu or auto");
        }
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device(" CPU ").unwrap(), Device::Cpu);
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("expected auto, cpu"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("not a GPU index"), "{e}");
        let auto = parse_device("auto").unwrap();
        assert_eq!(auto.is_cuda(), tch::Cuda::is_available());
    }
}
