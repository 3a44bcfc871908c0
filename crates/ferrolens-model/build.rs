//! With the `cuda` feature, compile kernels/decode_attn.cu to PTX with nvcc
//! (scripts/cuda-env.sh provides nvcc from PyPI and sets CUDA_COMPUTE_CAP).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/decode_attn.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("decode_attn.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // PTX for compute capability 8.0 runs (JIT) on every later GPU; CUDA_COMPUTE_CAP overrides.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "kernels/decode_attn.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{nvcc}` ({e}): the cuda feature needs nvcc; run the build through scripts/cuda-env.sh"));
    assert!(status.success(), "nvcc failed on kernels/decode_attn.cu");
}
