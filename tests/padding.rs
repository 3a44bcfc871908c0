//! Padded batches: prompts of different lengths in one batch (left or right padding) give, at
//! every real position, the numbers of each prompt run alone (and so transformers' logits and
//! TransformerLens's caches), for every family; gradients and LRP rules at real positions are
//! unchanged; KV-cache decoding of a left-padded batch equals each prompt's full forward.

mod common;

use candle_core::{DType, IndexOp, Tensor};
use common::*;
use ferrolens::model::*;

fn ids_of(r: &std::collections::HashMap<String, Tensor>, key: &str) -> Vec<u32> {
    r[key].to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

/// Rows of a padded activation `[b, T, ...]` (or `[b, h, T, T]` for scores/patterns) at the real
/// positions of row `row`, which starts at `start` and has `n` tokens.
fn real(t: &Tensor, hp: HookPoint, row: usize, start: usize, n: usize) -> Tensor {
    let x = t.i(row).unwrap();
    match hp {
        HookPoint::AttnScores(_) | HookPoint::Pattern(_) => x.narrow(1, start, n).unwrap().narrow(2, start, n).unwrap(),
        _ => x.narrow(0, start, n).unwrap(),
    }
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap().max(1.0);
    max_abs(a, b) / scale
}

fn check_family(model: &HookedTransformer, prompts: &[Vec<u32>], hf_logits: Option<&[Tensor]>, name: &str) {
    let t = prompts.iter().map(|p| p.len()).max().unwrap();
    for side in [PadSide::Left, PadSide::Right] {
        let (tokens, mask) = model.tokens_padded(prompts, side).unwrap();
        let span = RunSpan { mask: Some(mask.clone()), ..Default::default() };
        let mut h = Hooks::new().cache("re:.*").unwrap();
        let logits = model.run_span(Some(&tokens), &span, &mut h).unwrap();
        assert_eq!(h.cache_ref().mask().unwrap().to_vec2::<u8>().unwrap(), mask.to_vec2::<u8>().unwrap());
        // Without the mask the padded row would be wrong (the check below can fail).
        let naive = model.run(&tokens, &mut Hooks::new()).unwrap();
        let short = prompts.iter().position(|p| p.len() < t).unwrap();
        let n = prompts[short].len();
        let start = if side == PadSide::Left { t - n } else { 0 };
        let alone = model.run(&Tensor::new(prompts[short].as_slice(), model.device()).unwrap().unsqueeze(0).unwrap(), &mut Hooks::new()).unwrap();
        if side == PadSide::Left {
            assert!(rel(&naive.i(short).unwrap().narrow(0, start, n).unwrap(), &alone.i(0).unwrap()) > 1e-3, "{name}: padding is inert even unmasked");
        }
        for (row, p) in prompts.iter().enumerate() {
            let n = p.len();
            let start = if side == PadSide::Left { t - n } else { 0 };
            let alone = Tensor::new(p.as_slice(), model.device()).unwrap().unsqueeze(0).unwrap();
            let mut ha = Hooks::new().cache("re:.*").unwrap();
            let want = model.run(&alone, &mut ha).unwrap();
            let got = logits.i(row).unwrap().narrow(0, start, n).unwrap();
            let d = rel(&got, &want.i(0).unwrap());
            assert!(d < 1e-5, "{name} {side:?} row {row}: logits differ from the prompt alone by {d:e}");
            if let Some(hf) = hf_logits {
                let d = rel(&got, &hf[row]);
                assert!(d < 1e-4, "{name} {side:?} row {row}: logits differ from transformers by {d:e}");
            }
            for hp in model.hook_points() {
                let a = ha.cache_ref().get(hp).unwrap();
                let b = real(h.cache_ref().get(hp).unwrap(), hp, row, start, n);
                let a = match hp {
                    HookPoint::AttnScores(_) | HookPoint::Pattern(_) => a.i(0).unwrap(),
                    _ => a.i(0).unwrap(),
                };
                let d = rel(&b, &a);
                assert!(d < 1e-5, "{name} {side:?} row {row} {hp}: {d:e}");
            }
        }
    }
}

#[test]
fn padded_batches_equal_each_prompt_alone_for_every_family() {
    for name in FAMILIES {
        let model = family(name, DType::F32);
        let r = reference(&format!("families/{name}/reference.safetensors"));
        let prompts = vec![ids_of(&r, "p0.input_ids"), ids_of(&r, "p2.input_ids")];
        let hf = [r["p0.logits"].clone(), r["p2.logits"].clone()];
        check_family(&model, &prompts, Some(&hf), name);
    }
    // Learned positions (GPT-2): the padded rows read W_pos at their own positions.
    let g = tiny_gpt2(DType::F32);
    let r = reference("tiny-gpt2/reference.safetensors");
    let prompts = vec![ids_of(&r, "p3.input_ids"), ids_of(&r, "p1.input_ids"), ids_of(&r, "p5.input_ids")];
    let hf: Vec<Tensor> = ["p3.logits", "p1.logits", "p5.logits"].iter().map(|k| r[*k].clone()).collect();
    check_family(&g, &prompts, Some(&hf), "gpt2");
}

/// The gradient of a per-row metric at every real position (and with LRP rules) equals each
/// prompt's own gradient; the padding positions get none.
#[test]
fn gradients_and_lrp_rules_at_real_positions_are_unchanged() {
    for name in ["gemma3", "gpt_neox", "llama"] {
        let model = family(name, DType::F64);
        let r = reference(&format!("families/{name}/reference.safetensors"));
        let prompts = vec![ids_of(&r, "p0.input_ids"), ids_of(&r, "p2.input_ids")];
        let (tokens, mask) = model.tokens_padded(&prompts, PadSide::Left).unwrap();
        let t = tokens.dim(1).unwrap();
        let pts = [HookPoint::ResidPre(0), HookPoint::Z(1), HookPoint::MlpPost(0)];
        for rules in [LrpRules::NONE, LrpRules::ALL] {
            let metric = |l: &Tensor| -> ferrolens::model::Result<Tensor> {
                let last = l.i((.., l.dim(1)? - 1))?; // left padding: every row ends at the last position
                Ok((last.i((.., 5))? - last.i((.., 7))?)?.sum_all()?)
            };
            let mut h = Hooks::new().grad(&pts).lrp(rules);
            let span = RunSpan { mask: Some(mask.clone()), ..Default::default() };
            let run = model.run_span_with_grads(Some(&tokens), &span, &mut h, metric).unwrap();
            for (row, p) in prompts.iter().enumerate() {
                let n = p.len();
                let alone = Tensor::new(p.as_slice(), model.device()).unwrap().unsqueeze(0).unwrap();
                let mut ha = Hooks::new().grad(&pts).lrp(rules);
                let one = model.run_with_grads(&alone, &mut ha, metric).unwrap();
                for hp in pts {
                    let got = run.grads[&hp].i(row).unwrap().narrow(0, t - n, n).unwrap();
                    let d = rel(&got, &one.grads[&hp].i(0).unwrap());
                    assert!(d < 1e-10, "{name} {rules:?} row {row} {hp}: {d:e}");
                    if t > n {
                        let pad = run.grads[&hp].i(row).unwrap().narrow(0, 0, t - n).unwrap();
                        assert_eq!(pad.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0, "{name} {hp}: gradient at padding");
                    }
                }
            }
        }
    }
}

/// A left-padded batch prefilled in chunks and decoded token by token gives each prompt's full
/// forward logits at every step (the padding stays masked in the cache).
#[test]
fn kv_cache_decoding_of_a_padded_batch() {
    for name in ["mistral", "gemma2", "phi3"] {
        let model = family(name, DType::F32);
        let r = reference(&format!("families/{name}/reference.safetensors"));
        let a = ids_of(&r, "p0.input_ids");
        let b = ids_of(&r, "p2.input_ids");
        // Prefill all but the last 4 tokens of each prompt, then decode 4 steps.
        let pre: Vec<Vec<u32>> = [&a, &b].iter().map(|p| p[..p.len() - 4].to_vec()).collect();
        let (tokens, mask) = model.tokens_padded(&pre, PadSide::Left).unwrap();
        let mut kv = KvCache::new(model.cfg.n_layers);
        model.prefill_padded(&tokens, Some(&mask), &mut kv, 3, &mut Hooks::new()).unwrap();
        let full: Vec<Tensor> =
            [&a, &b].iter().map(|p| model.run(&Tensor::new(p.as_slice(), model.device()).unwrap().unsqueeze(0).unwrap(), &mut Hooks::new()).unwrap()).collect();
        for step in 0..4 {
            let next: Vec<u32> = [&a, &b].iter().map(|p| p[p.len() - 4 + step]).collect();
            let t = Tensor::new(next.as_slice(), model.device()).unwrap().unsqueeze(1).unwrap();
            let logits = model.run_with_kv_cache(&t, &mut kv, true, &mut Hooks::new()).unwrap();
            for (row, p) in [&a, &b].iter().enumerate() {
                let want = full[row].i((0, p.len() - 4 + step)).unwrap();
                let d = rel(&logits.i((row, 0)).unwrap(), &want);
                assert!(d < 1e-4, "{name} step {step} row {row}: {d:e}");
            }
        }
    }
}

#[test]
fn bad_masks_are_refused() {
    let model = family("llama", DType::F32);
    let (tokens, _) = model.tokens_padded(&[vec![5, 6, 7], vec![8]], PadSide::Left).unwrap();
    let wrong = Tensor::ones((2, 4), DType::U8, model.device()).unwrap();
    let e = model.run_span(Some(&tokens), &RunSpan { mask: Some(wrong), ..Default::default() }, &mut Hooks::new()).unwrap_err().to_string();
    assert!(e.contains("attention mask must be [batch, earlier + new positions] = [2, 3]"), "{e}");
    let e = model.tokens_padded(&[vec![5], vec![]], PadSide::Left).unwrap_err().to_string();
    assert!(e.contains("every prompt"), "{e}");
}

/// A mixed-length prompt set as one left-padded batch gives exactly the numbers of its length
/// groups run separately, combined by the metric's own averaging (a mean over prompts, so each
/// group weighs by its share): metrics, activation patching (all positions and by label), AtP,
/// RelP, AtP*'s QK fix by label, and EAP.
#[test]
fn a_padded_mixed_batch_equals_its_length_groups() {
    use ferrolens::methods::*;
    let model = family("qwen3", DType::F64);
    let r = reference("families/qwen3/reference.safetensors");
    let (a, b, c) = (ids_of(&r, "p0.input_ids"), ids_of(&r, "p1.input_ids"), ids_of(&r, "p2.input_ids"));
    let rev = |v: &[u32]| v.iter().rev().copied().collect::<Vec<u32>>();
    // Four pairs: two of 12 tokens, two of 9 (each corrupt prompt as long as its clean one).
    let clean = [a.clone(), c.clone(), b.clone(), c[1..].iter().chain(&c[..1]).copied().collect()];
    let corrupt = [b.clone(), rev(&c), rev(&a), rev(&c[1..].iter().chain(&c[..1]).copied().collect::<Vec<_>>())];
    let answer = [5, 9, 11, 13];
    let wrong = [7, 3, 17, 19];
    let labels = |row: &[u32], pad: usize| vec![2 + pad, row.len() - 1 + pad];
    let names = ["second", "end"];

    let run_set = |idx: &[usize]| {
        let cl: Vec<Vec<u32>> = idx.iter().map(|&i| clean[i].clone()).collect();
        let co: Vec<Vec<u32>> = idx.iter().map(|&i| corrupt[i].clone()).collect();
        let (ct, mask) = model.tokens_padded(&cl, PadSide::Left).unwrap();
        let (kt, _) = model.tokens_padded(&co, PadSide::Left).unwrap();
        let t = ct.dim(1).unwrap();
        let uniform = cl.iter().all(|v| v.len() == t);
        let mask = if uniform { None } else { Some(mask) };
        let metric = LogitDiff { answer: idx.iter().map(|&i| answer[i]).collect(), wrong: idx.iter().map(|&i| wrong[i]).collect() };
        let pos = Positions::Labels(names.iter().enumerate().map(|(j, n)| (n.to_string(), cl.iter().map(|v| labels(v, t - v.len())[j]).collect())).collect());
        let data = PatchingData::new(&ct, &kt, &metric).with_mask(mask.as_ref());
        let m = metric_of(&model, &ct, mask.as_ref(), &metric).unwrap();
        let heads = activation_patching(&model, &data, Component::HeadZ, &Positions::All, &SweepOptions::default()).unwrap();
        let resid = activation_patching(&model, &data, Component::ResidPre, &pos, &SweepOptions::default()).unwrap();
        let atp = attribution(&model, &data, &AttributionOptions::atp(&[Component::HeadZ, Component::MlpOut]).positions(pos.clone())).unwrap();
        let relp = attribution(&model, &data, &AttributionOptions::relp(&[Component::HeadZ])).unwrap();
        let qk = qk_fix(&model, &data, Component::HeadK, &pos).unwrap();
        let eap = edge_attribution(&model, &data, &EdgeOptions { head_inputs: true }).unwrap();
        let mut v = vec![m];
        for g in [&heads, &resid, &atp.grids[0], &atp.grids[1], &relp.grids[0], &qk] {
            v.extend(&g.values);
        }
        v.extend(eap.iter().map(|e| e.score));
        v
    };
    let all = run_set(&[0, 1, 2, 3]);
    let long = run_set(&[0, 2]);
    let short = run_set(&[1, 3]);
    assert_eq!(all.len(), long.len());
    let mut worst = 0f64;
    for ((x, l), s) in all.iter().zip(&long).zip(&short) {
        let want = 0.5 * l + 0.5 * s;
        worst = worst.max((x - want).abs() / want.abs().max(1.0));
    }
    eprintln!("padded batch vs its length groups: worst relative difference {worst:.1e} over {} numbers", all.len());
    assert!(worst < 1e-9, "{worst}");
    // The groups really differ (the check can fail).
    assert!(long.iter().zip(&short).any(|(x, y)| (x - y).abs() > 1e-3));
}
