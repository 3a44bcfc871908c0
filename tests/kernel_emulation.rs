//! The CUDA decode-attention kernel (`crates/ferrolens-model/kernels/decode_attn.cu`), run on the
//! CPU through a small CUDA emulation (`kernels/emulate/`: one OS thread per CUDA thread, barriers
//! for `__syncthreads` and warp shuffles), against the Rust CPU reference
//! [`ferrolens::model::fused::decode_attention`]. This checks the kernel's indexing, GQA head
//! mapping, online softmax across warps, argmax tie-breaking and uniform-head mask on machines
//! without a GPU; `ferrolens device-check --what decode` checks the real kernel on a GPU.
//!
//! Needs a C++20 compiler (`c++`, or `$CXX`).

use candle_core::{Device, Tensor};
use ferrolens::model::fused::decode_attention;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Compile the emulated kernel once per test binary.
fn driver() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let src = root.join("crates/ferrolens-model/kernels/emulate/decode_attn_driver.cpp");
        let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("decode_attn_emulated");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-pthread"])
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}` ({e}); install g++ (Debian: build-essential) or set CXX"));
        assert!(out.status.success(), "compiling the emulated kernel failed:\n{}", String::from_utf8_lossy(&out.stderr));
        exe
    })
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Run the emulated kernel: `(z [b,h,d], argmax [b,h])`.
fn emulated(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, uniform: &[usize], tag: &str) -> (Vec<f32>, Vec<u32>) {
    let (b, h, d) = q.dims3().unwrap();
    let (_, t, kvh, _) = k.dims4().unwrap();
    let mut input = Vec::new();
    for x in [b, h, kvh, t, d] {
        input.extend((x as i32).to_le_bytes());
    }
    input.extend(scale.to_le_bytes());
    input.extend(uniform.iter().fold(0u64, |m, &u| m | 1 << u).to_le_bytes());
    for x in [q, k, v] {
        input.extend(bytes(x));
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (inp, outp) = (dir.join(format!("decode_attn_{tag}.in")), dir.join(format!("decode_attn_{tag}.out")));
    std::fs::write(&inp, input).unwrap();
    let st = Command::new(driver()).arg(&inp).arg(&outp).status().unwrap();
    assert!(st.success(), "emulated kernel failed on {tag}");
    let raw = std::fs::read(&outp).unwrap();
    let out: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(out.len(), b * h * (d + 1));
    let mut z = Vec::with_capacity(b * h * d);
    let mut arg = Vec::with_capacity(b * h);
    for row in out.chunks_exact(d + 1) {
        z.extend_from_slice(&row[..d]);
        let a = row[d];
        assert!(a >= 0.0 && a.fract() == 0.0 && (a as usize) < t, "{tag}: argmax {a} is not a key index below {t}");
        arg.push(a as u32);
    }
    (z, arg)
}

/// Kernel vs reference on one case; returns max |dz|.
fn check(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, uniform: &[usize], tag: &str) -> f32 {
    let (zr, ar) = decode_attention(q, k, v, scale as f64, uniform).unwrap();
    let zr: Vec<f32> = zr.flatten_all().unwrap().to_vec1().unwrap();
    let ar: Vec<u32> = ar.flatten_all().unwrap().to_vec1().unwrap();
    let (ze, ae) = emulated(q, k, v, scale, uniform, tag);
    assert_eq!(ae, ar, "{tag}: argmax keys differ (kernel vs reference)");
    let dz = zr.iter().zip(&ze).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(dz < 2e-5, "{tag}: max |z kernel - z reference| = {dz}");
    dz
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    // Box-Muller: candle's randn has no seed on the CPU.
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// SmolLM2's shape (9 query heads on 3 KV heads, d_head 64), two rows, two uniform heads.
#[test]
fn kernel_matches_reference_gqa_smollm2_shape() {
    let (b, h, kvh, t, d) = (2, 9, 3, 37, 64);
    let dz = check(&randn(&[b, h, d], 1), &randn(&[b, t, kvh, d], 2), &randn(&[b, t, kvh, d], 3), 0.125, &[1, 6], "gqa");
    println!("gqa max |dz| = {dz:e}");
}

/// d_head not a multiple of 32 (partial lanes), a single key, and d_head 256 (8 values a lane)
/// with many keys a warp.
#[test]
fn kernel_matches_reference_odd_and_extreme_shapes() {
    check(&randn(&[1, 4, 100], 4), &randn(&[1, 1, 2, 100], 5), &randn(&[1, 1, 2, 100], 6), 0.1, &[], "one_key_d100");
    check(&randn(&[1, 4, 100], 7), &randn(&[1, 300, 2, 100], 8), &randn(&[1, 300, 2, 100], 9), 0.1, &[3], "d100");
    check(&randn(&[1, 2, 256], 10), &randn(&[1, 700, 2, 256], 11), &randn(&[1, 700, 2, 256], 12), 0.0625, &[], "d256");
    // Fewer keys than warps: warps 5..7 see no key and must drop out of the merge.
    check(&randn(&[1, 3, 32], 13), &randn(&[1, 5, 1, 32], 14), &randn(&[1, 5, 1, 32], 15), 0.2, &[], "five_keys");
}

/// Sharp attention (large scores) and ties: the first maximal key wins, also when the tied keys
/// sit in different warps and the lower-numbered warp holds the later key.
#[test]
fn kernel_breaks_argmax_ties_like_the_reference() {
    let (h, t, d) = (2, 40, 32);
    let q = randn(&[1, h, d], 16);
    let mut k: Vec<f32> = randn(&[1, t, 1, d], 17).flatten_all().unwrap().to_vec1().unwrap();
    let qv: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
    // Keys 9 (warp 1) and 2 (warp 2) equal 10 q_0: both maximal for head 0, key 2 must win.
    for j in [9, 2] {
        for c in 0..d {
            k[j * d + c] = 10.0 * qv[c];
        }
    }
    let k = Tensor::from_vec(k, (1, t, 1, d), &Device::Cpu).unwrap();
    let v = randn(&[1, t, 1, d], 18);
    let (_, arg) = emulated(&q, &k, &v, 1.0, &[], "ties");
    assert_eq!(arg[0], 2, "tied keys 2 and 9: the first must win");
    check(&q, &k, &v, 1.0, &[], "ties_ref");
    // Identical keys everywhere: every score ties, key 0 wins; uniform heads likewise.
    let same = Tensor::ones((1, t, 1, d), candle_core::DType::F32, &Device::Cpu).unwrap();
    let (_, arg) = emulated(&q, &same, &v, 1.0, &[1], "all_tied");
    assert_eq!(arg, vec![0, 0]);
    check(&q, &same, &v, 1.0, &[1], "all_tied_ref");
}
