//! Logit lens and direct logit attribution on an IOI prompt.
//!
//! Every residual stream `resid_post(L)` is read through the final RMSNorm (with the final
//! norm's cached scale, as TransformerLens's `apply_ln_to_stack`) and the unembedding direction
//! `W_U[:, IO] - W_U[:, S]`. Direct logit attribution splits the final residual into the
//! embedding, every head's `hook_result` and every MLP's output; the parts add up exactly to the
//! model's logit difference. Run: `cargo run --release --example logit_lens`.

use candle_core::{DType, IndexOp, Tensor};
use ferrolens::prelude::*;

/// `x` `[.., D]` at the last position -> its logit difference along `dir` `[D]`, with the final
/// norm's `scale` `[1]` held fixed.
fn lens(x: &Tensor, scale: &Tensor, dir: &Tensor) -> anyhow::Result<f64> {
    Ok(x.broadcast_div(scale)?.mul(dir)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn main() -> anyhow::Result<()> {
    let model = load("smollm2-135m", &LoadOptions::default())?;
    let tok = model.tokenizer()?.clone();
    let prompt = "When Mary and John went to the store, John gave a drink to";
    let tokens = model.to_tokens(&[prompt])?; // [1, p]
    let p = tokens.dim(1)?;
    let (io, s) = (tok.single_token(" Mary")?, tok.single_token(" John")?);
    let mut hooks = Hooks::new().cache("blocks.*.hook_resid_post,blocks.*.attn.hook_result,blocks.*.hook_mlp_out,hook_embed,ln_final.hook_scale")?;
    let logits = model.run(&tokens, &mut hooks)?; // [1, p, V]
    let cache = hooks.take_cache();
    let last = logits.i((0, p - 1))?;
    let model_ld = (last.i(io as usize)?.to_scalar::<f32>()? - last.i(s as usize)?.to_scalar::<f32>()?) as f64;

    // The logit-difference direction, folded with the final norm's gain: [D].
    let w_u = model.w.unembed.clone(); // [D, V]
    let dir = (w_u.i((.., io as usize))? - w_u.i((.., s as usize))?)?.mul(&model.w.ln_final.w)?;
    let scale = cache.get(HookPoint::LnFinalScale)?.i((0, p - 1))?; // [1]

    println!("logit lens (logit[ Mary] - logit[ John] read from each layer's resid_post):");
    let mut lens_ld: Vec<f64> = Vec::new();
    for l in 0..model.cfg.n_layers {
        let v = lens(&cache.get(HookPoint::ResidPost(l))?.i((0, p - 1))?, &scale, &dir)?;
        lens_ld.push(v);
        println!("  layer {l:2}: {v:+.3}");
    }
    // Direct logit attribution.
    let mut parts: Vec<(String, f64)> = vec![("embed".into(), lens(&cache.get(HookPoint::Embed)?.i((0, p - 1))?, &scale, &dir)?)];
    for l in 0..model.cfg.n_layers {
        let r = cache.get(HookPoint::Result(l))?.i((0, p - 1))?; // [h, D]
        for h in 0..model.cfg.n_heads {
            parts.push((format!("L{l}H{h}"), lens(&r.i(h)?, &scale, &dir)?));
        }
        parts.push((format!("MLP{l}"), lens(&cache.get(HookPoint::MlpOut(l))?.i((0, p - 1))?, &scale, &dir)?));
    }
    let total: f64 = parts.iter().map(|p| p.1).sum();
    parts.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    println!("direct logit attribution, top 10 of {} components:", parts.len());
    for (n, v) in parts.iter().take(10) {
        println!("  {n:>8}: {v:+.3}");
    }
    println!("model logit difference {model_ld:.4}; sum of attributions {total:.4}; logit lens at the last layer {:.4}", lens_ld[lens_ld.len() - 1]);

    // The decomposition is exact (Llama has no biases) and the lens at the last layer is the model.
    assert!((total - model_ld).abs() < 1e-3 * model_ld.abs().max(1.0), "DLA does not add up: {total} vs {model_ld}");
    assert!((lens_ld[lens_ld.len() - 1] - model_ld).abs() < 1e-3 * model_ld.abs().max(1.0));
    // The answer forms late: the early layers do not prefer Mary, the last does (by more than 3).
    assert!(lens_ld[0].abs() < 1.0 && model_ld > 3.0, "lens {:.3} -> {model_ld:.3}", lens_ld[0]);
    Ok(())
}
