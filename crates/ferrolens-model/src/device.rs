//! Device and dtype selection by name (`--device cuda:0 --dtype bf16`).
//!
//! The default build is CPU-only; `cuda` devices need the `cuda` cargo feature (build with
//! `scripts/cuda-env.sh cargo build --release --features cuda`).

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// Whether this build has CUDA support compiled in.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Parse `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Input(format!("unknown device `{s}`: use cpu, cuda or cuda:N")))?,
        None => return Err(Error::Input(format!("unknown device `{s}`: use cpu, cuda or cuda:N"))),
    };
    if !CUDA_BUILT {
        return Err(Error::Input(format!("device `{s}` needs a CUDA build: scripts/cuda-env.sh cargo build --release --features cuda")));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Input(format!("cannot open CUDA device {ordinal}: {e}; check the driver (>= 580) and `nvidia-smi`")))
}

/// Parse `f32`, `f64`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f64" | "float64" => Ok(DType::F64),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "half" => Ok(DType::F16),
        other => Err(Error::Input(format!("unknown dtype `{other}`: use f32, f64, bf16 or f16"))),
    }
}

/// The devices this build can use: `cpu`, then `cuda:N` for every GPU that opens.
pub fn available_devices() -> Vec<String> {
    let mut out = vec!["cpu".to_string()];
    if CUDA_BUILT {
        for i in 0..16 {
            match Device::new_cuda(i) {
                Ok(_) => out.push(format!("cuda:{i}")),
                Err(_) => break,
            }
        }
    }
    out
}

/// A short name of a device: `cpu` or `cuda:N`.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
