//! TransformerLens's cache conveniences on every family: the logit lens's last row is the model,
//! the residual decomposition adds up to the final residual, and direct logit attribution through
//! `apply_ln_to_stack` adds up to the logits (plus the biases no component owns).

mod common;

use candle_core::{DType, IndexOp, Tensor};
use common::*;
use ferrolens::model::*;

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap().max(1.0);
    max_abs(a, b) / scale
}

#[test]
fn lens_decomposition_and_dla_on_every_family() {
    let mut models: Vec<(String, HookedTransformer)> = FAMILIES.iter().map(|n| (n.to_string(), family(n, DType::F64))).collect();
    models.push(("gpt2".into(), tiny_gpt2(DType::F64)));
    for (name, model) in &models {
        let r = if name == "gpt2" { reference("tiny-gpt2/reference.safetensors") } else { reference(&format!("families/{name}/reference.safetensors")) };
        let tokens = ids(&r, if name == "gpt2" { "p3.input_ids" } else { "p0.input_ids" });
        let p = tokens.dim(1).unwrap();
        let (logits, cache) = model.run_with_cache(&tokens, "re:.*").unwrap();
        let last = logits.i((.., p - 1)).unwrap(); // [1, V]
                                                   // Logit lens: the last row is the model.
        let lens = model.logit_lens(&cache, Some(p - 1)).unwrap(); // [L+1, 1, V]
        assert_eq!(lens.dim(0).unwrap(), model.cfg.n_layers + 1);
        let d = rel(&lens.i(model.cfg.n_layers).unwrap(), &last);
        assert!(d < 1e-10, "{name}: logit lens at the end vs the model: {d:e}");
        // The decomposition adds up to the final residual.
        let (stack, labels) = model.decompose_resid(&cache, Some(p - 1)).unwrap();
        assert_eq!(labels.len(), stack.dim(0).unwrap());
        let final_resid = cache.get(HookPoint::ResidPost(model.cfg.n_layers - 1)).unwrap().i((.., p - 1)).unwrap();
        let d = rel(&stack.sum(0).unwrap(), &final_resid);
        assert!(d < 1e-10, "{name}: decomposition: {d:e}");
        // DLA: the components' logits plus the biases no component owns are the model's logits
        // (before the soft-cap of Gemma-2, applied after).
        let dla = model.stack_to_logits(&model.apply_ln_to_stack(&cache, &stack, Some(p - 1)).unwrap()).unwrap(); // [n,1,V]
        let mut total = dla.sum(0).unwrap();
        if let Some(b) = &model.w.ln_final.b {
            // The final LayerNorm's bias enters after the gain.
            total = (total + ferrolens::model::transformer::linear(&b.unsqueeze(0).unwrap(), &model.w.unembed, None).unwrap()).unwrap();
        }
        if let Some(bu) = &model.w.b_u {
            total = total.broadcast_add(bu).unwrap();
        }
        if let Some(c) = model.cfg.final_softcap {
            total = ((total / c).unwrap().tanh().unwrap() * c).unwrap();
        }
        let d = rel(&total, &last);
        assert!(d < 1e-10, "{name}: DLA does not add up: {d:e}");
        // Heads: their results add up to the attention output before any output norm.
        let (heads, hl) = model.stack_head_results(&cache, None, Some(p - 1)).unwrap();
        assert_eq!(hl.len(), model.cfg.n_layers * model.cfg.n_heads);
        assert_eq!(hl[0], "L0H0");
        if model.cfg.norm_placement == NormPlacement::Pre {
            let l0: Tensor = heads.narrow(0, 0, model.cfg.n_heads).unwrap().sum(0).unwrap();
            let mut want = cache.get(HookPoint::AttnOut(0)).unwrap().i((.., p - 1)).unwrap();
            if let Some(bo) = &model.w.blocks[0].attn.b_o {
                want = want.broadcast_sub(bo).unwrap();
            }
            assert!(rel(&l0, &want) < 1e-10, "{name}: heads do not add up to attn_out");
        }
    }
}

#[test]
fn run_with_cache_refuses_filters_that_match_nothing() {
    let model = family("llama", DType::F32);
    let t = Tensor::new(&[[5u32, 6, 7]], &candle_core::Device::Cpu).unwrap();
    let e = model.run_with_cache(&t, "blocks.9.hook_resid_pre").unwrap_err().to_string();
    assert!(e.contains("2 layers"), "{e}");
    let (_, c) = model.run_with_cache(&t, "blocks.*.hook_resid_post").unwrap();
    assert_eq!(c.len(), 2);
}
