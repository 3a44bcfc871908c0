//! Gradients at hook points equal central finite differences (f64, tiny GPT-2), relative error < 1e-5.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use ferrolens::model::{HookPoint, HookedTransformer, Hooks, Intervention, LrpRules, PadSide, Patch, Result, RunSpan};

fn metric(logits: &Tensor) -> Result<Tensor> {
    let p = logits.dim(1)?;
    let last = logits.i((0, p - 1))?;
    Ok((last.i(17)? - last.i(423)?)?)
}

fn metric_value(model: &ferrolens::model::HookedTransformer, tokens: &Tensor, patch: Option<Patch>) -> f64 {
    let mut hooks = Hooks::new();
    if let Some(p) = patch {
        hooks = hooks.patch(p);
    }
    let logits = model.run(tokens, &mut hooks).unwrap();
    metric(&logits).unwrap().to_scalar::<f64>().unwrap()
}

/// A fixed pseudo-random direction in [-1, 1) (a small LCG, so the test is deterministic).
fn direction(dims: &[usize], seed: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Every family's tiny checkpoint and the tiny GPT-2, in f32 and f64, with names for messages.
fn every_model() -> Vec<(String, ferrolens::model::HookedTransformer)> {
    let mut models = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        models.extend(FAMILIES.iter().map(|f| (format!("{f} {dtype:?}"), family(f, dtype))));
        models.push((format!("gpt2 {dtype:?}"), tiny_gpt2(dtype)));
    }
    models
}

/// Two prompts of different lengths (9 and 5 tokens; ids below every fixture's vocabulary), so
/// that batching them pads one and sliding windows of 4 matter.
fn two_prompts() -> Vec<Vec<u32>> {
    vec![vec![5, 17, 3, 42, 9, 28, 11, 6, 30], vec![7, 1, 33, 8, 2]]
}

/// The first prompt alone and both prompts left-padded, each with a span that unembeds the last
/// position: `(padded, tokens, span)`.
fn last_logit_batches(model: &ferrolens::model::HookedTransformer) -> Vec<(bool, Tensor, RunSpan)> {
    let prompts = two_prompts();
    let plain = model.tokens_padded(&prompts[..1], PadSide::Left).unwrap().0;
    let (padded, mask) = model.tokens_padded(&prompts, PadSide::Left).unwrap();
    vec![
        (false, plain, RunSpan { last_logits_only: true, ..Default::default() }),
        (true, padded, RunSpan { last_logits_only: true, mask: Some(mask), ..Default::default() }),
    ]
}

/// `logit[3] - logit[7]` at the last unembedded position (the only one in a last-logits span),
/// summed over rows.
fn last_logit_diff(l: &Tensor) -> Result<Tensor> {
    let p = l.dim(1)?;
    Ok((l.i((.., p - 1, 3))? - l.i((.., p - 1, 7))?)?.sum_all()?)
}

/// The largest absolute value of `t`, as f64.
fn peak(t: &Tensor) -> f64 {
    t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn hook_gradients_equal_finite_differences() {
    check_finite_differences(&[
        HookPoint::Embed,
        HookPoint::PosEmbed,
        HookPoint::ResidPre(0),
        HookPoint::Ln1Scale(0),
        HookPoint::Q(0),
        HookPoint::K(1),
        HookPoint::V(0),
        HookPoint::AttnScores(1),
        HookPoint::Pattern(0),
        HookPoint::Z(1),
        HookPoint::Result(0),
        HookPoint::AttnOut(1),
        HookPoint::ResidMid(0),
        HookPoint::MlpPre(1),
        HookPoint::MlpPost(0),
        HookPoint::MlpOut(1),
        HookPoint::ResidPost(0),
        HookPoint::LnFinalNormalized,
    ]);
}

/// The same check with no hook on any layer's scores or pattern, so both layers run the CPU's
/// fused attention and its own backward.
#[test]
fn fused_attention_gradients_equal_finite_differences() {
    check_finite_differences(&[
        HookPoint::ResidPre(0),
        HookPoint::Q(0),
        HookPoint::K(0),
        HookPoint::V(0),
        HookPoint::Q(1),
        HookPoint::K(1),
        HookPoint::Z(1),
        HookPoint::AttnOut(1),
    ]);
}

/// At every point: the analytic directional derivative of the metric (one backward pass) equals
/// the central finite difference (f64 tiny GPT-2, relative error < 1e-5).
fn check_finite_differences(points: &[HookPoint]) {
    let model = tiny_gpt2(DType::F64);
    let r = reference("tiny-gpt2/reference.safetensors");
    let tokens = ids(&r, "p3.input_ids");
    let mut hooks = Hooks::new().grad(points).cache_hooks(points);
    let run = model.run_with_grads(&tokens, &mut hooks, metric).unwrap();
    let base = metric_value(&model, &tokens, None);
    assert!((run.metric - base).abs() < 1e-12);
    let eps = 1e-5;
    for (k, h) in points.iter().enumerate() {
        let g = &run.grads[h];
        let act = hooks.cache_ref().get(*h).unwrap();
        assert_eq!(g.dims(), act.dims(), "{h}");
        // Random direction; directional derivative vs central difference.
        let dir = direction(act.dims(), k as u64);
        let analytic = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(analytic.is_finite(), "{h}: gradient not finite");
        let plus = metric_value(&model, &tokens, Some(Patch::new(*h, Intervention::Add((&dir * eps).unwrap()))));
        let minus = metric_value(&model, &tokens, Some(Patch::new(*h, Intervention::Add((&dir * -eps).unwrap()))));
        let fd = (plus - minus) / (2.0 * eps);
        let rel = (fd - analytic).abs() / fd.abs().max(1e-3);
        eprintln!("{k:2} {h:32} analytic {analytic:+.8e}  finite-diff {fd:+.8e}  rel {rel:.1e}");
        assert!(rel < 1e-5, "{h}: analytic {analytic} vs finite difference {fd} (rel {rel:e})");
        assert!(analytic.abs() > 1e-6, "{h}: zero gradient makes the check vacuous");
    }
}

#[test]
fn gradients_respect_causality_and_lrp_off_equals_plain() {
    let model = tiny_gpt2(DType::F64);
    let r = reference("tiny-gpt2/reference.safetensors");
    let tokens = ids(&r, "p2.input_ids");
    let p = tokens.dim(1).unwrap();
    let pts = [HookPoint::ResidPost(1), HookPoint::Z(0)];
    let mut h1 = Hooks::new().grad(&pts);
    let a = model.run_with_grads(&tokens, &mut h1, metric).unwrap();
    let mut h2 = Hooks::new().grad(&pts).lrp(LrpRules::NONE);
    let b = model.run_with_grads(&tokens, &mut h2, metric).unwrap();
    for q in pts {
        assert_eq!(max_abs(&a.grads[&q], &b.grads[&q]), 0.0);
    }
    // The metric reads the last position: after the last block nothing mixes positions, so the
    // gradient at earlier positions of the last resid_post is exactly zero, and nonzero at the last.
    let g = a.grads[&HookPoint::ResidPost(1)].i(0).unwrap();
    let early = g.narrow(0, 0, p - 1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let last = g.i(p - 1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert_eq!(early, 0.0);
    assert!(last > 1e-3, "{last}");
    // Layer-0 z reaches the last position through layer-1 attention: nonzero at earlier positions.
    let z0 = a.grads[&HookPoint::Z(0)].i((0, 0)).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(z0 > 0.0);
}

/// A forward without gradients takes candle's fused RMSNorm and softmax (the no-gradient fast
/// path); a forward with a gradient hook at `resid_pre` 0 runs the written-out ops everywhere.
/// Their logits agree to f32 rounding on every family (RMSNorm and LayerNorm ones alike), and a
/// hook on a norm's scale (which forces the written-out norm) changes nothing either.
#[test]
fn the_no_gradient_fast_path_equals_the_written_out_ops() {
    let models = every_model();
    for (name, model) in &models {
        let tokens = Tensor::new(&[[5u32, 17, 3, 42, 9, 28, 11], [7, 1, 33, 8, 2, 19, 4]], &Device::Cpu).unwrap(); // ids below every fixture's vocabulary (96)
        let fast = model.forward(&tokens).unwrap();
        let mut h = Hooks::new().grad(&[HookPoint::ResidPre(0)]);
        let slow = model.run_with_grads(&tokens, &mut h, |l| Ok(l.i((.., .., 0))?.sum_all()?)).unwrap().logits;
        let scale = peak(&fast);
        let d = max_abs(&fast, &slow);
        assert!(d <= 1e-5 * scale.max(1.0), "{name}: fast path vs written-out ops differ by {d} (logits up to {scale})");
        let mut cached = Hooks::new().cache("blocks.*.ln1.hook_scale").unwrap();
        let d2 = max_abs(&fast, &model.run(&tokens, &mut cached).unwrap());
        assert!(d2 <= 1e-5 * scale.max(1.0), "{name}: {d2}");
    }
}

/// A run that reads the last position's logits only computes the last layer's queries, output
/// projection and MLP at the last position alone (when no hook looks at that layer). Its logits
/// equal those of the full forward's last position, in plain and left-padded batches, and the
/// gradient it sends back to `resid_pre` 0 equals the gradient of the same run with a hook on the
/// last layer (which keeps that layer whole), on every family, f32 and f64.
#[test]
fn the_last_layer_runs_at_the_last_position_only_when_nothing_else_is_read() {
    let models = every_model();
    let prompts = two_prompts();
    for (name, model) in &models {
        assert!(model.cfg.n_layers >= 2, "{name}: a layer before the last one");
        let last = model.cfg.n_layers - 1;
        let whole = |pat: &str| Hooks::new().cache(pat).unwrap();
        let keep_last = format!("blocks.{last}.hook_resid_post");
        for side in [None, Some(PadSide::Left)] {
            let (tokens, mask) = match side {
                Some(s) => {
                    let (t, m) = model.tokens_padded(&prompts, s).unwrap();
                    (t, Some(m))
                }
                None => (model.tokens_padded(&prompts[..1], PadSide::Left).unwrap().0, None),
            };
            let p = tokens.dim(1).unwrap();
            let span = RunSpan { last_logits_only: true, mask: mask.clone(), ..Default::default() };
            let full =
                model.run_span(Some(&tokens), &RunSpan { mask: mask.clone(), ..Default::default() }, &mut Hooks::new()).unwrap().narrow(1, p - 1, 1).unwrap();
            let pruned = model.run_span(Some(&tokens), &span, &mut Hooks::new()).unwrap();
            let kept = model.run_span(Some(&tokens), &span, &mut whole(&keep_last)).unwrap();
            assert_eq!(pruned.dims(), full.dims(), "{name} {side:?}");
            let scale = peak(&full).max(1.0);
            let d = max_abs(&pruned, &full);
            assert!(d <= 1e-5 * scale, "{name} {side:?}: last-position-only logits differ from the full forward's by {d}");
            assert!(max_abs(&kept, &full) <= 1e-5 * scale, "{name} {side:?}");
            // Gradients through the shortened last layer.
            let m = |l: &Tensor| -> Result<Tensor> { Ok(l.i((.., 0, 3))?.sum_all()?) };
            let g_pruned = model.run_span_with_grads(Some(&tokens), &span, &mut Hooks::new().grad(&[HookPoint::ResidPre(0)]), m).unwrap();
            let mut hk = whole(&keep_last).grad(&[HookPoint::ResidPre(0)]);
            let g_kept = model.run_span_with_grads(Some(&tokens), &span, &mut hk, m).unwrap();
            let (a, b) = (&g_pruned.grads[&HookPoint::ResidPre(0)], &g_kept.grads[&HookPoint::ResidPre(0)]);
            let gs = peak(b);
            assert!(gs > 0.0, "{name}: the gradient reaches resid_pre 0");
            let dg = max_abs(a, b);
            assert!(dg <= 1e-5 * gs.max(1e-3), "{name} {side:?}: gradients differ by {dg} (up to {gs})");
        }
    }
}

/// Without gradients and without a hook on the scores or pattern, the CPU runs attention as one
/// fused pass per query row (`fused::prefill_attention`). Its logits equal those of the written-out
/// path (forced by caching `hook_pattern`) on every family, f32 and f64, in plain, left- and
/// right-padded batches (sliding windows of 4 and Gemma-2's soft-capped scores included at 9
/// tokens), and through a KV cache filled in chunks of 4.
#[test]
fn fused_prefill_attention_equals_the_written_out_attention() {
    let models = every_model();
    let prompts = two_prompts();
    for (name, model) in &models {
        let written = || Hooks::new().cache("blocks.*.attn.hook_pattern").unwrap();
        let mut cases = vec![(model.tokens_padded(&prompts[..1], PadSide::Left).unwrap().0, None, "plain")];
        for (side, what) in [(PadSide::Left, "left-padded"), (PadSide::Right, "right-padded")] {
            let (t, m) = model.tokens_padded(&prompts, side).unwrap();
            cases.push((t, Some(m), what));
        }
        for (tokens, mask, what) in &cases {
            let span = RunSpan { mask: mask.clone(), ..Default::default() };
            let fused = model.run_span(Some(tokens), &span, &mut Hooks::new()).unwrap();
            let slow = model.run_span(Some(tokens), &span, &mut written()).unwrap();
            let scale = peak(&slow).max(1.0);
            let d = max_abs(&fused, &slow);
            assert!(d <= 1e-5 * scale, "{name} {what}: fused attention differs from the written-out one by {d}");
        }
        let tokens = &cases[0].0;
        let p = tokens.dim(1).unwrap();
        let full = model.forward(tokens).unwrap().narrow(1, p - 1, 1).unwrap();
        let mut kv = ferrolens::model::KvCache::new(model.cfg.n_layers);
        let chunked = model.prefill(tokens, &mut kv, 4, &mut Hooks::new()).unwrap();
        let scale = peak(&full).max(1.0);
        let d = max_abs(&chunked, &full);
        assert!(d <= 1e-5 * scale, "{name}: chunked prefill with fused attention differs by {d}");
    }
}

/// The fused CPU attention's own backward: the gradients it sends to `hook_v`, `hook_q` and
/// `resid_pre` 0 equal those of the written-out attention (forced by caching `hook_pattern`) on
/// every family, f32 and f64, plain and left-padded, with RelP's AH rule (pattern constant) off
/// and on.
#[test]
fn fused_attention_gradients_equal_the_written_out_ones() {
    let models = every_model();
    let points = [HookPoint::ResidPre(0), HookPoint::V(0), HookPoint::Q(0), HookPoint::V(1)];
    for (name, model) in &models {
        for (padded, tokens, span) in last_logit_batches(model) {
            for rules in [LrpRules::NONE, LrpRules::ALL] {
                let fused = model.run_span_with_grads(Some(&tokens), &span, &mut Hooks::new().grad(&points).lrp(rules), last_logit_diff).unwrap();
                let mut h = Hooks::new().cache("blocks.*.attn.hook_pattern").unwrap().grad(&points).lrp(rules);
                let slow = model.run_span_with_grads(Some(&tokens), &span, &mut h, last_logit_diff).unwrap();
                for pt in &points {
                    let (a, b) = (&fused.grads[pt], &slow.grads[pt]);
                    let scale = peak(b);
                    // Under the AH rule nothing reaches q (the pattern is a constant): zero both ways.
                    let through_pattern_only = rules.attn && matches!(pt, HookPoint::Q(_));
                    assert!(scale > 0.0 || through_pattern_only, "{name}: a gradient reaches {pt}");
                    let d = max_abs(a, b);
                    assert!(d <= 1e-5 * scale.max(1e-3), "{name} padded={padded} attn rule={}: gradients at {pt} differ by {d} (up to {scale})", rules.attn);
                }
            }
        }
    }
}

/// The fused CPU RMSNorm and LayerNorm (forward and their own backward): logits and the
/// gradients at `resid_pre` 0, `hook_v` 0 and `mlp_out` 0 equal those of the written-out norms
/// (forced by caching every `hook_scale`, which the fused norms do not produce) on every family
/// (LayerNorm: GPT-2, GPT-NeoX), f32 and f64, plain and left-padded, with RelP's rules (the LN
/// rule holds the scale constant) off and on.
#[test]
fn fused_norms_equal_the_written_out_norms() {
    let models = every_model();
    let points = [HookPoint::ResidPre(0), HookPoint::V(0), HookPoint::MlpOut(0)];
    for (name, model) in &models {
        for (padded, tokens, span) in last_logit_batches(model) {
            for rules in [LrpRules::NONE, LrpRules::ALL] {
                let fused = model.run_span_with_grads(Some(&tokens), &span, &mut Hooks::new().grad(&points).lrp(rules), last_logit_diff).unwrap();
                let mut h = Hooks::new().cache("*hook_scale").unwrap().grad(&points).lrp(rules);
                let slow = model.run_span_with_grads(Some(&tokens), &span, &mut h, last_logit_diff).unwrap();
                assert!(!h.cache_ref().is_empty(), "{name}: the norms' scales were cached");
                let d = max_abs(&fused.logits, &slow.logits);
                assert!(d <= 1e-5 * peak(&slow.logits).max(1.0), "{name} padded={padded}: logits differ by {d}");
                for pt in &points {
                    let (a, b) = (&fused.grads[pt], &slow.grads[pt]);
                    let scale = peak(b);
                    assert!(scale > 0.0, "{name}: a gradient reaches {pt}");
                    let d = max_abs(a, b);
                    assert!(d <= 1e-5 * scale.max(1e-3), "{name} padded={padded} ln rule={}: gradients at {pt} differ by {d} (up to {scale})", rules.ln);
                }
            }
        }
    }
}

/// The fused rotary, gated-MLP product (SwiGLU; GeGLU's tanh GELU on Gemma-2/3), RMSNorm and
/// attention backward passes against central finite differences on rotary families (f64;
/// GPT-NeoX has LayerNorm and an ungated MLP): gradients at `hook_q`/`hook_k` (before the
/// rotation), at the MLP's gate and up projections (before `act(gate) * up`; layer 0 takes the
/// unpacked op, as hooks look at its gate and up, layer 1 the packed one) and at `resid_pre` 0.
#[test]
fn fused_rotary_and_swiglu_gradients_equal_finite_differences() {
    let tokens = Tensor::new(&[[5u32, 17, 3, 42, 9, 28, 11]], &Device::Cpu).unwrap();
    let m = |l: &Tensor| -> Result<Tensor> {
        let p = l.dim(1)?;
        Ok((l.i((0, p - 1, 3))? - l.i((0, p - 1, 7))?)?)
    };
    for name in ["llama", "qwen3", "phi3", "gpt_neox", "olmo2", "gemma2", "gemma3"] {
        let model = family(name, DType::F64);
        let gated = name != "gpt_neox";
        let mut points = vec![HookPoint::ResidPre(0), HookPoint::Q(0), HookPoint::K(0), HookPoint::Q(1), HookPoint::MlpPre(0)];
        if gated {
            points.push(HookPoint::MlpPreLinear(0));
        }
        let value = |patch: Option<Patch>| -> f64 {
            let mut h = Hooks::new();
            if let Some(p) = patch {
                h = h.patch(p);
            }
            m(&model.run(&tokens, &mut h).unwrap()).unwrap().to_scalar::<f64>().unwrap()
        };
        let mut hooks = Hooks::new().grad(&points).cache_hooks(&points);
        let run = model.run_with_grads(&tokens, &mut hooks, m).unwrap();
        for (k, h) in points.iter().enumerate() {
            let g = &run.grads[h];
            let act = hooks.cache_ref().get(*h).unwrap();
            let dir = direction(act.dims(), 100 + k as u64);
            let analytic = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            let eps = 1e-5;
            let plus = value(Some(Patch::new(*h, Intervention::Add((&dir * eps).unwrap()))));
            let minus = value(Some(Patch::new(*h, Intervention::Add((&dir * -eps).unwrap()))));
            let fd = (plus - minus) / (2.0 * eps);
            let rel = (fd - analytic).abs() / fd.abs().max(1e-3);
            assert!(rel < 1e-5, "{name} {h}: analytic {analytic} vs finite difference {fd} (rel {rel:e})");
            assert!(analytic.abs() > 1e-6, "{name} {h}: zero gradient makes the check vacuous");
        }
    }
}

/// The fused MLP activations equal the written-out ones (`x sigmoid(x)`; Hugging Face's
/// `gelu_pytorch_tanh`, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))`; the exact GELU
/// `0.5 x (1 + erf(x / sqrt 2))`): `fused::act` alone
/// (an ungated MLP), and times `up` as `fused::act_mul` on separate gate and up and
/// `fused::act_mul_packed` on the packed product; values and candle's gradients of every operand,
/// f32 and f64, inputs from -12 to 12. Under RelP's identity rule (`fused::act` alone, and the
/// packed product with the half rule too) against the rule written out: `x r` with the constant
/// ratio `r = act(x) / (x ± 1e-6)`, the product's gradient halved.
#[test]
fn fused_mlp_activations_equal_the_written_out_ones() {
    use ferrolens::model::fused::{act, act_mul, act_mul_packed, MlpAct};
    for dtype in [DType::F32, DType::F64] {
        let (rows, m) = (6, 37);
        let gate = candle_core::Var::from_tensor(&(direction(&[rows, m], 1) * 12.0).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let up = candle_core::Var::from_tensor(&(direction(&[rows, m], 2) * 3.0).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let out_grad = direction(&[rows, m], 3).to_dtype(dtype).unwrap();
        let tol = if dtype == DType::F32 { 2e-6 } else { 1e-13 };
        for kind in [MlpAct::Silu, MlpAct::GeluTanh, MlpAct::GeluErf] {
            let x = gate.as_tensor();
            let written = match kind {
                MlpAct::Silu => (x * candle_nn::ops::sigmoid(x).unwrap()).unwrap(),
                MlpAct::GeluErf => ((x * 0.5).unwrap() * ((x / std::f64::consts::SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap()).unwrap(),
                MlpAct::GeluTanh => {
                    let c = (2.0f64 / std::f64::consts::PI).sqrt();
                    let inner = ((x + (x.powf(3.0).unwrap() * 0.044715).unwrap()).unwrap() * c).unwrap().tanh().unwrap();
                    ((x * 0.5).unwrap() * (inner + 1.0).unwrap()).unwrap()
                }
            };
            let gated = (&written * up.as_tensor()).unwrap();
            let packed = Tensor::cat(&[gate.as_tensor(), up.as_tensor()], 1).unwrap();
            // RelP's identity rule as layers.rs writes it, and the half rule.
            let xd = x.detach();
            let sign = xd.ge(&xd.zeros_like().unwrap()).unwrap().to_dtype(dtype).unwrap().affine(2.0, -1.0).unwrap();
            let ratio = (written.detach() / (&xd + (sign * 1e-6).unwrap()).unwrap()).unwrap();
            let identity = (x * &ratio).unwrap();
            let halved = ((&identity * up.as_tensor()).unwrap() * 0.5).unwrap();
            let relp = (&halved + halved.detach()).unwrap();
            let cases = [
                ("ungated", act(kind, x, false).unwrap(), &written),
                ("ungated, identity rule", act(kind, x, true).unwrap(), &identity),
                ("separate", act_mul(kind, x, up.as_tensor()).unwrap(), &gated),
                ("packed", act_mul_packed(kind, &packed, (false, false)).unwrap(), &gated),
                ("packed, identity and half rules", act_mul_packed(kind, &packed, (true, true)).unwrap(), &relp),
            ];
            for (how, fused, want) in cases {
                let scale = peak(want);
                let d = max_abs(&fused, want);
                assert!(d <= tol * scale, "{kind:?} {dtype:?} {how}: values differ by {d} (up to {scale})");
                let grads = |t: &Tensor| (t * &out_grad).unwrap().sum_all().unwrap().backward().unwrap();
                let (gw, gf) = (grads(want), grads(&fused));
                for (what, v) in [("gate", &gate), ("up", &up)] {
                    if how.starts_with("ungated") && what == "up" {
                        continue;
                    }
                    let (a, b) = (gf.get(v.as_tensor()).unwrap(), gw.get(v.as_tensor()).unwrap());
                    let scale = peak(b);
                    assert!(scale > 0.1, "{kind:?}: a gradient reaches {what}");
                    let d = max_abs(a, b);
                    assert!(d <= tol * scale, "{kind:?} {dtype:?} {how}: gradients of {what} differ by {d} (up to {scale})");
                }
            }
        }
    }
}

/// `RunSpan::columns`: the logits of the chosen tokens only, equal to those columns of the whole
/// unembedding on every family (Gemma-2's final soft-cap included), with the last-position
/// shortcut; a column past the vocabulary is a clear error.
#[test]
fn runs_unembed_the_chosen_columns_only() {
    let prompts = two_prompts();
    for (name, model) in &every_model() {
        let (tokens, mask) = model.tokens_padded(&prompts, PadSide::Left).unwrap();
        let cols = Tensor::new(&[9u32, 0, 3, 9], &Device::Cpu).unwrap();
        for last in [false, true] {
            let full =
                model.run_span(Some(&tokens), &RunSpan { last_logits_only: last, mask: Some(mask.clone()), ..Default::default() }, &mut Hooks::new()).unwrap();
            let span = RunSpan { last_logits_only: last, mask: Some(mask.clone()), columns: Some(cols.clone()), ..Default::default() };
            let some = model.run_span(Some(&tokens), &span, &mut Hooks::new()).unwrap();
            assert_eq!(some.dims(), &[full.dim(0).unwrap(), full.dim(1).unwrap(), 4], "{name}");
            let want = full.index_select(&cols, 2).unwrap();
            let d = max_abs(&some, &want);
            assert!(d <= 1e-5 * peak(&want).max(1.0), "{name} last={last}: column logits differ by {d}");
        }
        let bad = RunSpan { columns: Some(Tensor::new(&[model.cfg.d_vocab as u32], &Device::Cpu).unwrap()), ..Default::default() };
        let e = model.run_span(Some(&tokens), &bad, &mut Hooks::new()).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{name}: {e}");
    }
}

/// Packed projections (one product for `W_Q|W_K|W_V` and for `W_gate|W_in`; the rotary and the
/// fused attention on the packed tensor with its packed backward; the packed SwiGLU op with
/// RelP's identity and half rules) against the same model unpacked
/// ([`HookedTransformer::unpacked`]: a product a matrix, separate q/k/v operands): logits of
/// full and last-position runs, plain and left-padded; a cache of every hook point (which reads
/// the packed product's slices); gradients at points the packed path keeps (`resid_pre` 0,
/// `hook_z` 0, `mlp_out` 0, the last `attn_out`) with no rule, RelP's and all four. Every family
/// and the tiny GPT-2 (fused c_attn split and packed again), f32 and f64.
#[test]
fn packed_projections_equal_separate_ones() {
    for (name, model) in &every_model() {
        assert!(!model.w.blocks[0].attn.w_q.is_contiguous(), "{name}: W_Q is a view of the packed q/k/v matrix");
        let sep = model.unpacked().unwrap();
        assert!(sep.w.blocks[0].attn.w_q.is_contiguous());
        let tol = if name.ends_with("F64") { 1e-10 } else { 1e-5 };
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = max_abs(a, b);
            assert!(d <= tol * peak(b).max(1.0), "{name}: {what} differ by {d} (up to {})", peak(b));
        };
        let last = model.cfg.n_layers - 1;
        let points = [HookPoint::ResidPre(0), HookPoint::Z(0), HookPoint::MlpOut(0), HookPoint::AttnOut(last)];
        for (padded, tokens, last_span) in last_logit_batches(model) {
            for span in [last_span.clone(), RunSpan { last_logits_only: false, ..last_span }] {
                let at = format!("padded={padded} last only={}", span.last_logits_only);
                let run = |m: &HookedTransformer, h: &mut Hooks| m.run_span(Some(&tokens), &span, h).unwrap();
                close(&run(model, &mut Hooks::new()), &run(&sep, &mut Hooks::new()), &format!("{at}: logits"));
                let (mut ha, mut hb) = (Hooks::new().cache_hooks(&model.hook_points()), Hooks::new().cache_hooks(&model.hook_points()));
                close(&run(model, &mut ha), &run(&sep, &mut hb), &format!("{at}: logits with every hook cached"));
                assert_eq!(ha.cache_ref().len(), hb.cache_ref().len());
                for (hp, a) in ha.cache_ref().iter() {
                    close(a, hb.cache_ref().get(*hp).unwrap(), &format!("{at}: cached {hp}"));
                }
                for rules in [LrpRules::NONE, LrpRules::RELP, LrpRules::ALL] {
                    let grads = |m: &HookedTransformer| {
                        m.run_span_with_grads(Some(&tokens), &span, &mut Hooks::new().grad(&points).lrp(rules), last_logit_diff).unwrap()
                    };
                    let (a, b) = (grads(model), grads(&sep));
                    assert!((a.metric - b.metric).abs() <= tol * b.metric.abs().max(1.0), "{name} {at}: metric {} vs {}", a.metric, b.metric);
                    for pt in &points {
                        assert!(peak(&b.grads[pt]) > 0.0, "{name}: a gradient reaches {pt}");
                        close(&a.grads[pt], &b.grads[pt], &format!("{at} {rules:?}: gradients at {pt}"));
                    }
                }
            }
        }
    }
}

/// A packed model whose `W_Q` (or `W_in`) is replaced after loading runs that block's group as
/// separate products with the new matrix: the same logits as a model built from the edited
/// weights, and not those of the original.
#[test]
fn replacing_a_packed_field_uses_the_new_matrix() {
    for name in ["llama", "qwen2"] {
        let model = family(name, DType::F64);
        let tokens = model.tokens_padded(&two_prompts()[..1], PadSide::Left).unwrap().0;
        let mut edited = model.clone();
        edited.w.blocks[1].attn.w_q = (&edited.w.blocks[1].attn.w_q * 1.5).unwrap();
        edited.w.blocks[0].mlp.w_in = (&edited.w.blocks[0].mlp.w_in * -0.5).unwrap();
        let rebuilt = HookedTransformer::new(model.cfg.clone(), edited.w.clone()).unwrap();
        let (a, b, c) = (edited.forward(&tokens).unwrap(), rebuilt.forward(&tokens).unwrap(), model.forward(&tokens).unwrap());
        assert!(max_abs(&a, &b) < 1e-10, "{name}: the edited model runs its new W_Q and W_in");
        assert!(max_abs(&a, &c) > 1e-3, "{name}: the edit changes the logits");
    }
}
