//! Parity with Hugging Face transformers (logits) and TransformerLens 2.18 (cached activations).
//! References: fixtures/*/reference.safetensors, made by scripts/make_references.py.

mod common;
use candle_core::{DType, IndexOp, Tensor};
use common::*;
use ferrolens::model::{HookPoint, Hooks};

const TOL: f64 = 1e-4;

fn check_cache(model: &ferrolens::model::HookedTransformer, r: &std::collections::HashMap<String, Tensor>, prompts: usize) -> usize {
    let mut checked = 0;
    for i in 0..prompts {
        let tokens = ids(r, &format!("p{i}.input_ids"));
        let mut hooks = Hooks::new().cache("blocks.*,hook_embed,hook_pos_embed,ln_final.*").unwrap();
        model.run(&tokens, &mut hooks).unwrap();
        let cache = hooks.cache_ref();
        let prefix = format!("p{i}.");
        for (k, v) in r.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let name = &k[prefix.len()..];
            let Ok(h) = name.parse::<HookPoint>() else {
                continue;
            };
            let ours = cache.get(h).unwrap().i(0).unwrap();
            let d = max_abs(&ours, v);
            // Scores and activations after large matmuls scale with their magnitude.
            let scale = v
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .into_iter()
                .filter(|x| x.is_finite())
                .fold(1.0, f64::max);
            assert!(d <= TOL * scale.max(1.0), "{k}: max abs diff {d:e} (magnitude {scale:.1})");
            checked += 1;
        }
    }
    checked
}

#[test]
fn tiny_gpt2_logits_match_hugging_face() {
    let model = tiny_gpt2(DType::F32);
    let r = reference("tiny-gpt2/reference.safetensors");
    for i in 0..8 {
        let tokens = ids(&r, &format!("p{i}.input_ids"));
        let logits = model.forward(&tokens).unwrap().i(0).unwrap();
        let d = max_abs(&logits, &r[&format!("p{i}.logits")]);
        assert!(d < TOL, "prompt {i}: logits differ from HF by {d:e}");
    }
}

#[test]
fn tiny_gpt2_cache_matches_transformer_lens() {
    let model = tiny_gpt2(DType::F32);
    let r = reference("tiny-gpt2/reference.safetensors");
    let n = check_cache(&model, &r, 3);
    assert!(n >= 3 * 30, "only {n} activations checked");
}

#[test]
fn smollm2_logits_match_hugging_face() {
    let model = smollm2();
    let r = reference("smollm2/reference.safetensors");
    let cols = r["vocab_cols"].to_dtype(DType::U32).unwrap();
    for i in 0..8 {
        let tokens = ids(&r, &format!("p{i}.input_ids"));
        let logits = model.forward(&tokens).unwrap().i(0).unwrap(); // [p, V]
                                                                    // Compare after subtracting each row's mean (logits are defined up to a per-row constant).
        let centre = |t: &Tensor| t.broadcast_sub(&t.mean_keepdim(candle_core::D::Minus1).unwrap()).unwrap();
        let sub = logits.index_select(&cols, 1).unwrap();
        let d = max_abs(&centre(&sub), &centre(&r[&format!("p{i}.logits_cols")]));
        let p = logits.dim(0).unwrap();
        let dl = max_abs(&centre(&logits.i(p - 1).unwrap()), &centre(&r[&format!("p{i}.logits_last")]));
        let raw = max_abs(&sub, &r[&format!("p{i}.logits_cols")]);
        eprintln!("prompt {i}: {p} tokens, max abs diff {d:e} (column subset, all positions), {dl:e} (last position, all columns); {raw:e} before centring");
        assert!(d < TOL && dl < TOL, "prompt {i}: logits differ from HF by {d:e} / {dl:e}");
    }
}

/// Gemma-3-270M (GGUF Q4_K_M, dequantized) against transformers 4.57 reading the same file: 8
/// prompts with <bos>, centred logits at a column subset at every position within 1e-3, and the
/// same top-1 token over the whole vocabulary at every position.
#[test]
fn gemma3_logits_match_hugging_face() {
    let model = gemma3();
    assert_eq!((model.cfg.family.as_str(), model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_head), ("gemma3", 18, 4, 1, 256));
    assert_eq!(model.cfg.windows.iter().filter(|w| w.is_none()).count(), 3, "layers 5, 11, 17 are global");
    let r = reference("gemma3/reference.safetensors");
    let cols = r["vocab_cols"].to_dtype(DType::U32).unwrap();
    let centre = |t: &Tensor| t.broadcast_sub(&t.mean_keepdim(candle_core::D::Minus1).unwrap()).unwrap();
    let mut positions = 0;
    for i in 0..8 {
        let tokens = ids(&r, &format!("p{i}.input_ids"));
        let logits = model.forward(&tokens).unwrap().i(0).unwrap(); // [p, V]
        let sub = logits.index_select(&cols, 1).unwrap();
        let d = max_abs(&centre(&sub), &centre(&r[&format!("p{i}.logits_cols")]));
        let top: Vec<u32> = logits.argmax(candle_core::D::Minus1).unwrap().to_vec1().unwrap();
        let want: Vec<u32> = r[&format!("p{i}.argmax")].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        let mx = max_abs(&logits.max(candle_core::D::Minus1).unwrap(), &r[&format!("p{i}.max")]);
        eprintln!("prompt {i}: {} tokens, centred max abs diff {d:.2e}, top logit diff {mx:.2e}", top.len());
        assert!(d < 1e-3, "prompt {i}: centred logits differ from HF by {d:e}");
        assert_eq!(top, want, "prompt {i}: top-1 tokens differ");
        positions += top.len();
    }
    assert!(positions > 100);
}

#[test]
fn smollm2_cache_matches_transformer_lens() {
    let model = smollm2();
    let r = reference("smollm2/reference.safetensors");
    let n = check_cache(model, &r, 2);
    assert!(n >= 2 * 3 * 15, "only {n} activations checked");
}

/// bf16 weights (the GPU option): norms and softmax run in f32 (their hooks see f32), and the
/// last-position logits stay close to HF's f32 reference with the same top-1 token.
#[test]
fn smollm2_bf16_tracks_f32() {
    let model = ferrolens::model::load("smollm2-135m", &ferrolens::model::LoadOptions::on(candle_core::Device::Cpu, DType::BF16)).unwrap();
    let r = reference("smollm2/reference.safetensors");
    let mut worst = 0f64;
    for i in 0..4 {
        let tokens = ids(&r, &format!("p{i}.input_ids"));
        let mut hooks = ferrolens::model::Hooks::new().cache("blocks.3.ln1.hook_scale,blocks.3.hook_resid_pre,blocks.3.attn.hook_pattern").unwrap();
        let logits = model.run(&tokens, &mut hooks).unwrap().i(0).unwrap();
        assert_eq!(logits.dtype(), DType::BF16);
        let c = hooks.cache_ref();
        assert_eq!(c.by_name("blocks.3.hook_resid_pre").unwrap().dtype(), DType::BF16);
        assert_eq!(c.by_name("blocks.3.ln1.hook_scale").unwrap().dtype(), DType::F32, "norms run in f32");
        // Softmax in f32: every pattern row sums to 1 within bf16 rounding of the stored values.
        let rows = c.by_name("blocks.3.attn.hook_pattern").unwrap().to_dtype(DType::F64).unwrap().sum(candle_core::D::Minus1).unwrap();
        let dev = rows.affine(1.0, -1.0).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        assert!(dev < 2e-2, "pattern rows sum to 1 +- {dev}");
        let p = logits.dim(0).unwrap();
        let last = logits.i(p - 1).unwrap().to_dtype(DType::F64).unwrap();
        let want = r[&format!("p{i}.logits_last")].to_dtype(DType::F64).unwrap();
        let centre = |t: &Tensor| t.broadcast_sub(&t.mean_keepdim(candle_core::D::Minus1).unwrap()).unwrap();
        let d = max_abs(&centre(&last), &centre(&want));
        worst = worst.max(d);
        let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(top(&last), top(&want), "prompt {i}: bf16 changes the top-1 token");
    }
    eprintln!("bf16 vs f32 reference: max centred logit difference {worst:.3}");
    assert!(worst < 1.5, "bf16 logits drift by {worst}");
}
