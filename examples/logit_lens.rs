//! Logit lens and direct logit attribution on an IOI prompt, with the model's own final norm
//! (so the same code is right for GPT-2's LayerNorm, Llama's RMSNorm and Gemma's `(1 + w)` gains).
//!
//! The logit lens reads every residual stream (before each block and after the last) through the
//! final norm and the unembedding (`logit_lens`, TransformerLens's `accumulated_resid` + norm).
//! Direct logit attribution splits the final residual into the embedding, every head's
//! `hook_result` and every MLP's output, scales them by the final norm's cached scale
//! (`apply_ln_to_stack`) and unembeds them (`stack_to_logits`); the parts add up exactly to the
//! model's logit difference. Run: `cargo run --release --example logit_lens`.

use candle_core::{IndexOp, Tensor};
use ferrolens::prelude::*;

/// `logit[io] - logit[s]` of every row of logits `[n, 1, V]`.
fn diff(logits: &Tensor, io: u32, s: u32) -> anyhow::Result<Vec<f64>> {
    let l = logits.i((.., 0))?.to_dtype(DType::F64)?; // [n, V]
    let d = (l.i((.., io as usize))? - l.i((.., s as usize))?)?;
    Ok(d.to_vec1::<f64>()?)
}

fn main() -> anyhow::Result<()> {
    let model = load("smollm2-135m", &LoadOptions::default())?;
    let tok = model.tokenizer()?.clone();
    let prompt = "When Mary and John went to the store, John gave a drink to";
    let tokens = model.to_tokens(&[prompt])?; // [1, p]
    let p = tokens.dim(1)?;
    let (io, s) = (tok.single_token(" Mary")?, tok.single_token(" John")?);
    let (logits, cache) = model.run_with_cache(
        &tokens,
        "blocks.*.hook_resid_pre,blocks.*.hook_resid_post,blocks.*.attn.hook_result,blocks.*.hook_mlp_out,hook_embed,ln_final.hook_scale",
    )?;
    let model_ld = diff(&logits.i((.., p - 1..p))?.transpose(0, 1)?, io, s)?[0];

    // Logit lens: [layers + 1, 1, V] at the last position.
    let lens_ld: Vec<f64> = diff(&model.logit_lens(&cache, Some(p - 1))?, io, s)?;
    println!("logit lens (logit[ Mary] - logit[ John] read before each block and after the last):");
    for (l, v) in lens_ld.iter().enumerate() {
        println!("  {:>10}: {v:+.3}", if l < model.cfg.n_layers { format!("layer {l}") } else { "final".into() });
    }
    // Direct logit attribution: embedding, every head, every MLP.
    let (heads, head_labels) = model.stack_head_results(&cache, None, Some(p - 1))?; // [h*L, 1, D]
    let mut parts: Vec<Tensor> = vec![cache.get(HookPoint::Embed)?.i((.., p - 1))?.unsqueeze(0)?, heads];
    let mut labels: Vec<String> = vec!["embed".into()];
    labels.extend(head_labels);
    for l in 0..model.cfg.n_layers {
        parts.push(cache.get(HookPoint::MlpOut(l))?.i((.., p - 1))?.unsqueeze(0)?);
        labels.push(format!("MLP{l}"));
    }
    let stack = Tensor::cat(&parts, 0)?; // [n, 1, D]
    let dla = diff(&model.stack_to_logits(&model.apply_ln_to_stack(&cache, &stack, Some(p - 1))?)?, io, s)?;
    let total: f64 = dla.iter().sum();
    let mut order: Vec<usize> = (0..dla.len()).collect();
    order.sort_by(|&a, &b| dla[b].abs().total_cmp(&dla[a].abs()));
    println!("direct logit attribution, top 10 of {} components:", dla.len());
    for &i in order.iter().take(10) {
        println!("  {:>8}: {:+.3}", labels[i], dla[i]);
    }
    println!("model logit difference {model_ld:.4}; sum of attributions {total:.4}; logit lens at the end {:.4}", lens_ld[lens_ld.len() - 1]);

    // The decomposition is exact (Llama has no biases) and the lens at the end is the model.
    assert!((total - model_ld).abs() < 1e-3 * model_ld.abs().max(1.0), "DLA does not add up: {total} vs {model_ld}");
    assert!((lens_ld[lens_ld.len() - 1] - model_ld).abs() < 1e-3 * model_ld.abs().max(1.0));
    // The answer forms late: read through the final norm, the residual prefers the subject (John)
    // up to layer 23 and the indirect object (Mary) from layer 24 on, right after L23H3, the
    // largest direct contributor.
    let flip = lens_ld.iter().position(|v| *v > 0.0).unwrap_or(lens_ld.len());
    assert!(lens_ld[flip..].iter().all(|v| *v > 0.0), "the lens flips back: {lens_ld:?}");
    assert_eq!((flip, labels[order[0]].as_str()), (24, "L23H3"), "lens {lens_ld:?}");
    Ok(())
}
