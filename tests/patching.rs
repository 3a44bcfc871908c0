//! The patching engine: exactness identities, TransformerLens reference numbers, AtP against a
//! hand-computed gradient x difference, RelP rule switches and the conservation they imply.

mod common;
use candle_core::{DType, IndexOp, Tensor};
use common::*;
use ferrolens::prelude::*;
use ferrolens::tasks::read_jsonl;
use std::sync::Arc;

struct Setup {
    clean: Tensor,
    corrupt: Tensor,
    metric: Normalised,
}

fn smol_ioi() -> Setup {
    let model = smollm2();
    let pairs = read_jsonl(&fixtures().join("smollm2/ioi4.jsonl")).unwrap();
    let batch = PairBatch::new(model.tokenizer().unwrap(), pairs, "ioi4").unwrap();
    let clean = model.tokens_tensor(&batch.clean).unwrap();
    let corrupt = model.tokens_tensor(&batch.corrupt).unwrap();
    let raw: Arc<dyn Metric> = Arc::new(LogitDiff { answer: batch.answer.clone(), wrong: batch.wrong.clone() });
    let c = ferrolens::methods::metric_of(model, &clean, None, raw.as_ref()).unwrap();
    let k = ferrolens::methods::metric_of(model, &corrupt, None, raw.as_ref()).unwrap();
    Setup { clean, corrupt, metric: Normalised::new(raw, c, k).unwrap() }
}

/// A TransformerLens reference file of fixtures/smollm2/.
fn tl_json(file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2").join(file)).unwrap()).unwrap()
}

fn tl_reference() -> serde_json::Value {
    tl_json("patching_reference.json")
}

#[test]
fn baselines_match_transformer_lens() {
    let s = smol_ioi();
    let r = tl_reference();
    assert!((s.metric.clean - r["ld_clean"].as_f64().unwrap()).abs() < 1e-4, "{} vs {}", s.metric.clean, r["ld_clean"]);
    assert!((s.metric.corrupt - r["ld_corrupt"].as_f64().unwrap()).abs() < 1e-4);
}

#[test]
fn head_sweep_matches_transformer_lens() {
    let s = smol_ioi();
    let model = smollm2();
    let data = PatchingData::new(&s.clean, &s.corrupt, &s.metric);
    let g = activation_patching(model, &data, Component::HeadZ, &Positions::All, &SweepOptions::default()).unwrap();
    let r = tl_reference();
    let mut worst = 0f64;
    for l in 0..30 {
        for h in 0..9 {
            let want = r["heads_all_pos"][l][h].as_f64().unwrap();
            worst = worst.max((g.get(l, 0, h) - want).abs());
        }
    }
    eprintln!("heads: max |ferrolens - TL| = {worst:e}");
    assert!(worst < 1e-4, "{worst}");
    // The sweep is not trivial: some head moves the metric by more than 0.1.
    assert!(g.values.iter().any(|v| v.abs() > 0.1));
}

#[test]
fn residual_sweeps_match_transformer_lens() {
    let s = smol_ioi();
    let model = smollm2();
    let data = PatchingData::new(&s.clean, &s.corrupt, &s.metric);
    let r = tl_reference();
    for (c, key) in [(Component::ResidPre, "resid_pre"), (Component::AttnOut, "attn_out"), (Component::MlpOut, "mlp_out")] {
        let g = activation_patching(model, &data, c, &Positions::Each, &SweepOptions { max_rows: 128, ..Default::default() }).unwrap();
        let mut worst = 0f64;
        for l in 0..30 {
            for p in 0..g.n_pos {
                worst = worst.max((g.get(l, p, 0) - r[key][l][p].as_f64().unwrap()).abs());
            }
        }
        eprintln!("{key}: max |ferrolens - TL| = {worst:e}");
        assert!(worst < 1e-4, "{key}: {worst}");
    }
}

#[test]
fn exactness_identities() {
    let model = tiny_gpt2(DType::F64);
    let r = reference("tiny-gpt2/reference.safetensors");
    let clean = ids(&r, "p3.input_ids");
    let corrupt = ids(&r, "p4.input_ids").narrow(1, 0, clean.dim(1).unwrap()).unwrap();
    let raw: Arc<dyn Metric> = Arc::new(LogitDiff { answer: vec![17], wrong: vec![423] });
    let c = ferrolens::methods::metric_of(&model, &clean, None, raw.as_ref()).unwrap();
    let k = ferrolens::methods::metric_of(&model, &corrupt, None, raw.as_ref()).unwrap();
    let metric = Normalised::new(raw, c, k).unwrap();
    let data = PatchingData::new(&clean, &corrupt, &metric);
    // Every position of resid_pre at layer 0 patched: exactly the clean run (1); layer L too.
    let all = activation_patching(&model, &data, Component::ResidPre, &Positions::All, &SweepOptions::default()).unwrap();
    for l in 0..2 {
        assert!((all.get(l, 0, 0) - 1.0).abs() < 1e-12, "layer {l}: {}", all.get(l, 0, 0));
    }
    // Nothing patched: the corrupt run (0). A zero mask patches nothing.
    let zero = Patch::new(HookPoint::ResidPre(0), Intervention::Zero).mask(Tensor::zeros(1, DType::F64, model.device()).unwrap());
    let logits = model.run(&corrupt, &mut Hooks::new().patch(zero)).unwrap();
    let v = metric.per_row(&logits).unwrap().to_vec1::<f64>().unwrap()[0];
    assert!(v.abs() < 1e-12, "{v}");
    // Patching the last position of the final resid_pre gives what recomputation says, and
    // noising at every position gives the corrupt run (0).
    let noise =
        activation_patching(&model, &data, Component::ResidPre, &Positions::All, &SweepOptions { direction: Direction::Noise, ..Default::default() }).unwrap();
    assert!(noise.get(0, 0, 0).abs() < 1e-12);
    // Batched sweeps equal one-patch-at-a-time sweeps.
    let a = activation_patching(&model, &data, Component::HeadZ, &Positions::Each, &SweepOptions { max_rows: 1, ..Default::default() }).unwrap();
    let b = activation_patching(&model, &data, Component::HeadZ, &Positions::Each, &SweepOptions { max_rows: 1000, ..Default::default() }).unwrap();
    let worst = a.values.iter().zip(&b.values).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-10, "{worst}");
}

/// Rows per sweep forward when `max_rows` is 0: 256 on the CPU; on a GPU SmolLM2's 15-token rows
/// (8142 elements a position: 4 x 576 + 15 x 64 + 2 x 9 x 15 + 3 x 1536) fill 2 GiB at 4395 in
/// f32, bf16 reaches the 8192 cap and 1000-token prompts the 256 floor.
#[test]
fn sweeps_take_more_rows_per_forward_on_a_gpu() {
    let model = smollm2();
    assert_eq!(ferrolens::methods::auto_rows(model, 15), 256);
    let rows = |dtype, p| ferrolens::methods::device_rows(&model.cfg, dtype, p);
    assert_eq!(rows(DType::F32, 15), (2usize << 30) / (15 * 8142 * 4));
    assert_eq!(rows(DType::F32, 15), 4395);
    assert_eq!(rows(DType::BF16, 15), 8192);
    assert_eq!(rows(DType::F32, 1000), 256);
}

#[test]
fn atp_equals_gradient_times_difference_and_relp_off_equals_atp() {
    let model = tiny_gpt2(DType::F64);
    let r = reference("tiny-gpt2/reference.safetensors");
    let p = ids(&r, "p3.input_ids").dim(1).unwrap();
    let clean = Tensor::cat(&[ids(&r, "p3.input_ids"), ids(&r, "p5.input_ids").narrow(1, 0, p).unwrap()], 0).unwrap();
    let corrupt = Tensor::cat(&[ids(&r, "p4.input_ids").narrow(1, 0, p).unwrap(), ids(&r, "p6.input_ids").narrow(1, 0, p).unwrap()], 0).unwrap();
    let metric = LogitDiff { answer: vec![17, 40], wrong: vec![423, 9] };
    let comps = [Component::HeadZ, Component::ResidPre, Component::MlpOut, Component::HeadPattern];
    let opts = AttributionOptions::atp(&comps).positions(Positions::Each);
    let data = PatchingData::new(&clean, &corrupt, &metric);
    let atp = attribution(&model, &data, &opts).unwrap();
    // By hand: one gradient at the corrupt run, times the clean - corrupt difference.
    let mut hc = Hooks::new().cache_hooks(&[HookPoint::Z(1), HookPoint::MlpOut(0)]);
    model.run(&clean, &mut hc).unwrap();
    let mut hk = Hooks::new().cache_hooks(&[HookPoint::Z(1), HookPoint::MlpOut(0)]).grad(&[HookPoint::Z(1), HookPoint::MlpOut(0)]);
    let run = model.run_with_grads(&corrupt, &mut hk, |l| Ok(metric.per_row(l)?.mean_all()?.to_dtype(DType::F64)?)).unwrap();
    let dz = (hc.cache_ref().get(HookPoint::Z(1)).unwrap() - hk.cache_ref().get(HookPoint::Z(1)).unwrap()).unwrap();
    let want_z = (dz * &run.grads[&HookPoint::Z(1)]).unwrap(); // [b,p,h,d]
    let want = want_z.i((.., 4, 2, ..)).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert!((atp.grids[0].get(1, 4, 2) - want).abs() < 1e-12, "{} vs {want}", atp.grids[0].get(1, 4, 2));
    let dm = (hc.cache_ref().get(HookPoint::MlpOut(0)).unwrap() - hk.cache_ref().get(HookPoint::MlpOut(0)).unwrap()).unwrap();
    let want = (dm * &run.grads[&HookPoint::MlpOut(0)]).unwrap().i((.., 6, ..)).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert!((atp.grids[2].get(0, 6, 0) - want).abs() < 1e-12);
    assert!(want.abs() > 1e-6);
    // RelP with every rule off is AtP.
    let off = attribution(&model, &data, &AttributionOptions { rules: LrpRules::NONE, name: Some("relp".into()), ..opts.clone() }).unwrap();
    for (a, b) in atp.grids.iter().zip(&off.grids) {
        assert_eq!(a.values, b.values);
    }
    // And the rules change the answer.
    let on = attribution(&model, &data, &AttributionOptions { rules: LrpRules::RELP, ..opts }).unwrap();
    assert!(on.grids[0].values.iter().zip(&atp.grids[0].values).any(|(x, y)| (x - y).abs() > 1e-6));
}

/// Conservation. With the LN-rule the norm is linear in its input (scale held constant) and with
/// the identity rule the activation is `x * c(x)` with `c` held constant, so each is a linear map
/// `y = J x (+ b)` for the backward pass and relevance `x . dR/dx` is conserved across it:
///   LN-rule (GPT-2 LayerNorm):  sum(x * g_x) = sum((y - b) * g_y)  (b = the LayerNorm bias; checked
///                               at ln_final, whose input feeds nothing else)
///   identity rule (GELU):       sum(pre * g_pre) = sum(post * g_post)   (up to the 1e-6 nudge)
/// With all four rules on, a bias-free model (Llama/SmolLM2: no biases anywhere) is homogeneous of
/// degree 1 in the embedding for the backward pass, so for every layer L
///   sum(resid_pre(L) * g) = metric                (Euler's theorem, layer by layer).
#[test]
fn relp_conservation() {
    let model = tiny_gpt2(DType::F64);
    let r = reference("tiny-gpt2/reference.safetensors");
    let tokens = ids(&r, "p4.input_ids");
    let metric = LogitDiff { answer: vec![17], wrong: vec![423] };
    let pts = [HookPoint::ResidPost(1), HookPoint::LnFinalNormalized, HookPoint::MlpPre(1), HookPoint::MlpPost(1)];
    let rules = LrpRules { ln: true, identity: true, half: false, attn: false };
    let mut h = Hooks::new().grad(&pts).cache_hooks(&pts).lrp(rules);
    let run = model.run_with_grads(&tokens, &mut h, |l| Ok(metric.per_row(l)?.sum_all()?.to_dtype(DType::F64)?)).unwrap();
    let dot = |hp: HookPoint, sub: Option<&Tensor>| -> f64 {
        let x = h.cache_ref().get(hp).unwrap();
        let x = match sub {
            Some(b) => x.broadcast_sub(b).unwrap(),
            None => x.clone(),
        };
        (x * &run.grads[&hp]).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let ln_in = dot(HookPoint::ResidPost(1), None);
    let bf = model.w.ln_final.b.clone().unwrap();
    let ln_out = dot(HookPoint::LnFinalNormalized, Some(&bf));
    eprintln!("LN-rule: in {ln_in:.10} out {ln_out:.10}");
    assert!((ln_in - ln_out).abs() < 1e-9 * ln_in.abs().max(1.0), "{ln_in} vs {ln_out}");
    let pre = dot(HookPoint::MlpPre(1), None);
    let post = dot(HookPoint::MlpPost(1), None);
    eprintln!("identity rule: pre {pre:.10} post {post:.10}");
    assert!((pre - post).abs() < 1e-5 * pre.abs().max(1.0), "{pre} vs {post}");
    assert!(pre.abs() > 1e-3);
    // Without the LN-rule the LayerNorm identity fails (the check can fail).
    let mut h2 = Hooks::new().grad(&pts).cache_hooks(&pts);
    let run2 = model.run_with_grads(&tokens, &mut h2, |l| Ok(metric.per_row(l)?.sum_all()?.to_dtype(DType::F64)?)).unwrap();
    let x = h2.cache_ref().get(HookPoint::ResidPost(1)).unwrap();
    let plain = (x * &run2.grads[&HookPoint::ResidPost(1)]).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    // Plain gradient: LayerNorm is scale-invariant (up to eps), so x.g is ~0, not the LN-rule value.
    assert!(plain.abs() < 1e-4 && (plain - ln_in).abs() > 1e-2, "plain x.g = {plain}, LN-rule {ln_in}");

    // Global conservation on SmolLM2 (bias-free) with all four rules.
    let smol = smollm2();
    let s = smol_ioi();
    let layers: Vec<HookPoint> = [0usize, 10, 20, 29].iter().map(|&l| HookPoint::ResidPre(l)).collect();
    let mut h = Hooks::new().grad(&layers).cache_hooks(&layers).lrp(LrpRules::ALL);
    let raw = LogitDiff {
        answer: vec![smol.tokenizer().unwrap().single_token(" Jesse").unwrap()],
        wrong: vec![smol.tokenizer().unwrap().single_token(" Sarah").unwrap()],
    };
    let one = s.clean.i(0..1).unwrap();
    let run = smol.run_with_grads(&one, &mut h, |l| Ok(raw.per_row(l)?.sum_all()?)).unwrap();
    for hp in layers {
        let x = h.cache_ref().get(hp).unwrap();
        let rel = (x * &run.grads[&hp]).unwrap().to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        eprintln!("{hp}: relevance {rel:.5}, metric {:.5}", run.metric);
        assert!((rel - run.metric).abs() < 2e-3 * run.metric.abs().max(1.0), "{hp}: {rel} vs {}", run.metric);
    }
}

/// AtP*'s QK fix: the analytic per-key formula and the query recomputation equal
/// `sum (A' - A) . dM/dA` with `A'` taken from a real forward with the patch applied.
#[test]
fn qk_fix_equals_recomputed_patterns() {
    use ferrolens::methods::qk_fix;
    let model = tiny_gpt2(DType::F64);
    let (clean, corrupt) = tiny_pair();
    let metric = LogitDiff { answer: vec![17], wrong: vec![423] };
    let data = PatchingData::new(&clean, &corrupt, &metric);
    let kq = qk_fix(&model, &data, Component::HeadK, &Positions::Each).unwrap();
    let qq = qk_fix(&model, &data, Component::HeadQ, &Positions::Each).unwrap();
    let kall = qk_fix(&model, &data, Component::HeadK, &Positions::All).unwrap();
    // Gradient at the corrupt run's patterns and the corrupt patterns themselves.
    let pats: Vec<HookPoint> = (0..2).map(HookPoint::Pattern).collect();
    let mut hk = Hooks::new().grad(&pats).cache_hooks(&pats);
    let run = model.run_with_grads(&corrupt, &mut hk, |l| Ok(metric.per_row(l)?.mean_all()?)).unwrap();
    let mut hc = Hooks::new().cache_hooks(&[HookPoint::K(1), HookPoint::Q(1)]);
    model.run(&clean, &mut hc).unwrap();
    let brute = |patch: Patch, head: usize| -> f64 {
        let mut h = Hooks::new().patch(patch).cache_hooks(&[HookPoint::Pattern(1)]);
        model.run(&corrupt, &mut h).unwrap();
        let a2 = h.cache_ref().get(HookPoint::Pattern(1)).unwrap().i((.., head)).unwrap();
        let a = hk.cache_ref().get(HookPoint::Pattern(1)).unwrap().i((.., head)).unwrap();
        let g = run.grads[&HookPoint::Pattern(1)].i((.., head)).unwrap();
        ((a2 - a).unwrap() * g).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let kc = hc.cache_ref().get(HookPoint::K(1)).unwrap().clone();
    let qc = hc.cache_ref().get(HookPoint::Q(1)).unwrap().clone();
    for (head, pos) in [(0usize, 3usize), (2, 7), (3, 0)] {
        let want = brute(Patch::new(HookPoint::K(1), Intervention::Replace(kc.clone())).positions(&[pos]).heads(&[head]), head);
        assert!((kq.get(1, pos, head) - want).abs() < 1e-10, "key L1H{head}@{pos}: {} vs {want}", kq.get(1, pos, head));
        let want = brute(Patch::new(HookPoint::Q(1), Intervention::Replace(qc.clone())).positions(&[pos]).heads(&[head]), head);
        assert!((qq.get(1, pos, head) - want).abs() < 1e-10, "query L1H{head}@{pos}");
    }
    let want = brute(Patch::new(HookPoint::K(1), Intervention::Replace(kc)).heads(&[1]), 1);
    assert!((kall.get(1, 0, 1) - want).abs() < 1e-10);
    assert!(kq.values.iter().any(|v| v.abs() > 1e-4));
}

/// GradDrop: the mean over layers of |AtP| with that layer's residual writes stop-gradiented.
#[test]
fn grad_drop_is_the_mean_of_per_layer_absolute_atp() {
    use ferrolens::methods::grad_drop;
    let model = tiny_gpt2(DType::F64);
    let (clean, corrupt) = tiny_pair();
    let metric = LogitDiff { answer: vec![17], wrong: vec![423] };
    let opts = AttributionOptions::atp(&[Component::HeadZ]);
    let data = PatchingData::new(&clean, &corrupt, &metric);
    let gd = grad_drop(&model, &data, &opts).unwrap();
    let plain = attribution(&model, &data, &opts).unwrap();
    // Layer 1's writes stopped: layer-0 heads reach the logits only through layer 1's attention,
    // whose output write is stopped, and through the residual directly.
    let stop = |h| Patch::new(h, Intervention::func(|x, _| Ok(x.detach())));
    let with = |extra: Vec<Patch>| attribution(&model, &data, &AttributionOptions { extra, ..opts.clone() }).unwrap();
    let l1 = with(vec![stop(HookPoint::AttnOut(1)), stop(HookPoint::MlpOut(1))]);
    let l0 = with(vec![stop(HookPoint::AttnOut(0)), stop(HookPoint::MlpOut(0))]);
    for (i, v) in gd[0].values.iter().enumerate() {
        let want = (l0.grids[0].values[i].abs() + l1.grids[0].values[i].abs()) / 2.0;
        assert!((v - want).abs() < 1e-12);
    }
    // Stopping a layer's write changes the layer-0 scores (the check is not vacuous).
    assert!(l1.grids[0].values.iter().zip(&plain.grids[0].values).take(4).any(|(a, b)| (a - b).abs() > 1e-6));
}

/// AtP and RelP against the official RelP code (TransformerLens fork FarnoushRJ/RelP, default
/// rules LN + identity + half; scripts/relp_reference.py): every head, and resid_pre, attn_out,
/// mlp_out at every layer and position, on the 4 IOI pairs.
#[test]
fn atp_and_relp_match_the_official_relp_code() {
    let s = smol_ioi();
    let model = smollm2();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2/relp_reference.json")).unwrap()).unwrap();
    for (name, rules) in [("atp", LrpRules::NONE), ("relp", LrpRules::RELP)] {
        let data = PatchingData::new(&s.clean, &s.corrupt, &s.metric);
        let heads = attribution(model, &data, &AttributionOptions { rules, ..AttributionOptions::atp(&[Component::HeadZ]) }).unwrap();
        let comps = [Component::ResidPre, Component::AttnOut, Component::MlpOut];
        let res = attribution(model, &data, &AttributionOptions { rules, ..AttributionOptions::atp(&comps) }.positions(Positions::Each)).unwrap();
        let mut worst = 0f64;
        for l in 0..30 {
            for h in 0..9 {
                worst = worst.max((heads.grids[0].get(l, 0, h) - r[name]["heads"][l][h].as_f64().unwrap()).abs());
            }
        }
        eprintln!("{name} heads: max |ferrolens - fork| = {worst:e}");
        assert!(worst < 5e-5, "{name} heads: {worst}");
        for (g, key) in res.grids.iter().zip(["resid_pre", "attn_out", "mlp_out"]) {
            let mut worst = 0f64;
            for l in 0..30 {
                for p in 0..g.n_pos {
                    worst = worst.max((g.get(l, p, 0) - r[name][key][l][p].as_f64().unwrap()).abs());
                }
            }
            eprintln!("{name} {key}: max |ferrolens - fork| = {worst:e}");
            assert!(worst < 5e-5, "{name} {key}: {worst}");
        }
    }
    // RelP differs from AtP where the rules act (a test that could not tell them apart would pass above).
    let d = (r["relp"]["mlp_out"][20][14].as_f64().unwrap() - r["atp"]["mlp_out"][20][14].as_f64().unwrap()).abs()
        + (r["relp"]["resid_pre"][10][14].as_f64().unwrap() - r["atp"]["resid_pre"][10][14].as_f64().unwrap()).abs();
    assert!(d > 1e-3, "reference RelP equals AtP: {d}");
}

#[test]
fn generic_patching_matches_transformer_lens() {
    let s = smol_ioi();
    let model = smollm2();
    let data = PatchingData::new(&s.clean, &s.corrupt, &s.metric);
    let r = tl_json("generic_patching_reference.json");
    let opts = SweepOptions { max_rows: 512, ..Default::default() };
    let close = |what: &str, got: f64, want: &serde_json::Value| {
        let want = want.as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "{what}: ferrolens {got} vs TL {want}");
    };
    // Pattern of layer 7 by (head, dest, src): TL's get_act_patch_attn_head_pattern_dest_src_pos
    // (at dest positions 10 and 14).
    let spec = PatchSpec {
        hooks: vec![HookPoint::Pattern(7)],
        axes: vec![(Axis::Head, Sweep::Each), (Axis::DestPos, Sweep::Indices(vec![10, 14])), (Axis::SrcPos, Sweep::Each)],
    };
    let g = generic_patching(model, &data, &spec, &opts).unwrap();
    assert_eq!(g.values.shape(), &[1, 9, 2, 15]);
    let mut moved = 0f64;
    for ((_, h, d, src), v) in g.values.view().into_dimensionality::<ferrolens::model::ndarray::Ix4>().unwrap().indexed_iter() {
        close(&format!("pattern L7H{h} {d}->{src}"), *v, &r["pattern_L7"][h][d][src]);
        moved = moved.max(v.abs());
    }
    // TL: the largest |effect| at layer 7 is 0.00286 (the reference file), so not all zeros.
    assert!(moved > 1e-3, "some pattern entry matters: {moved}");
    // Key heads of a GQA model (3 KV heads), all positions: TL's get_act_patch_attn_head_k_all_pos.
    let spec = PatchSpec { hooks: model.hooks_matching("blocks.*.attn.hook_k").unwrap(), axes: vec![(Axis::Head, Sweep::Each)] };
    let g = generic_patching(model, &data, &spec, &opts).unwrap();
    assert_eq!(g.values.shape(), &[30, 3]);
    for ((l, h), v) in g.values.view().into_dimensionality::<ferrolens::model::ndarray::Ix2>().unwrap().indexed_iter() {
        close(&format!("k L{l} KV{h}"), *v, &r["k_all_pos"][l][h]);
    }
    // Neuron slices of mlp.hook_post.
    let spec = PatchSpec { hooks: vec![HookPoint::MlpPost(5)], axes: vec![(Axis::Neuron, Sweep::Ranges((0..6).map(|s| 256 * s..256 * (s + 1)).collect()))] };
    let g = generic_patching(model, &data, &spec, &opts).unwrap();
    assert_eq!(g.labels[0][1], "256..512");
    for s in 0..6 {
        close(&format!("mlp5 slice {s}"), g.values[[0, s]], &r["mlp5_slices"][s]);
    }
    // A hook before any layer, by position.
    let spec = PatchSpec { hooks: vec![HookPoint::Embed], axes: vec![(Axis::Pos, Sweep::Each)] };
    let g = generic_patching(model, &data, &spec, &opts).unwrap();
    for q in 0..15 {
        close(&format!("embed pos {q}"), g.values[[0, q]], &r["embed_pos"][q]);
    }
    let rows = g.rows();
    assert_eq!(rows.len(), 15);
    assert_eq!((rows[3].0.as_str(), rows[3].1[0].as_str()), ("hook_embed", "3"));
}

#[test]
fn generic_patching_presets_and_bad_specs() {
    let s = smol_ioi();
    let model = smollm2();
    let data = PatchingData::new(&s.clean, &s.corrupt, &s.metric);
    let opts = SweepOptions::default();
    // Each value is one patched run: checked against runs written out by hand with a hook (the
    // clean z of one head at one position written into the corrupt run), and the component preset
    // builds the same spec as activation_patching's.
    let spec = PatchSpec { hooks: vec![HookPoint::Z(3), HookPoint::Z(9)], axes: vec![(Axis::Pos, Sweep::Indices(vec![2, 14])), (Axis::Head, Sweep::Each)] };
    let g = generic_patching(model, &data, &spec, &opts).unwrap();
    assert_eq!(g.values.shape(), &[2, 2, 9]);
    let mut hooks = Hooks::new().cache("blocks.*.attn.hook_z").unwrap();
    model.run(&s.clean, &mut hooks).unwrap();
    let clean_cache = hooks.take_cache();
    for (hi, l, pi, p, h) in [(0, 3, 0, 2, 4), (1, 9, 1, 14, 0), (1, 9, 1, 14, 7), (0, 3, 1, 14, 8)] {
        let hook = HookPoint::Z(l);
        let patch = Patch::new(hook, Intervention::from_cache(&clean_cache, hook).unwrap()).positions(&[p]).heads(&[h]);
        let logits = model.run(&s.corrupt, &mut Hooks::new().patch(patch)).unwrap();
        let want = ferrolens::methods::metrics::mean_value(&s.metric.per_row(&logits).unwrap()).unwrap();
        assert!((g.values[[hi, pi, h]] - want).abs() < 1e-5, "L{l} pos {p} H{h}: {} vs {want}", g.values[[hi, pi, h]]);
    }
    assert_eq!(PatchSpec::component(model, Component::HeadZ, &Positions::Each).axes, vec![(Axis::Pos, Sweep::Each), (Axis::Head, Sweep::Each)]);
    // Labels per prompt select the same position as an index when every prompt agrees.
    let spec_l = PatchSpec { hooks: vec![HookPoint::ResidPre(4)], axes: vec![(Axis::Pos, Sweep::Labels(vec![("end".into(), vec![14; 4])]))] };
    let spec_i = PatchSpec { hooks: vec![HookPoint::ResidPre(4)], axes: vec![(Axis::Pos, Sweep::Indices(vec![14]))] };
    let (a, b) = (generic_patching(model, &data, &spec_l, &opts).unwrap(), generic_patching(model, &data, &spec_i, &opts).unwrap());
    assert_eq!(a.labels[0], vec!["end".to_string()]);
    assert!((a.values[[0, 0]] - b.values[[0, 0]]).abs() < 1e-9);
    // Bad specs fail before the sweep with a message that says what to do.
    let err = |axes: Vec<(Axis, Sweep)>, hooks: Vec<HookPoint>| generic_patching(model, &data, &PatchSpec { hooks, axes }, &opts).unwrap_err().to_string();
    assert!(err(vec![(Axis::Head, Sweep::Each)], vec![HookPoint::ResidPre(0)]).contains("has no `head_index` axis"));
    assert!(err(vec![(Axis::SrcPos, Sweep::Each)], vec![HookPoint::Z(0)]).contains("dest_pos and src_pos"));
    assert!(err(vec![(Axis::Neuron, Sweep::Indices(vec![1536]))], vec![HookPoint::MlpPost(0)]).contains("size 1536"));
    let (start, end) = (5, 5);
    assert!(err(vec![(Axis::Neuron, Sweep::Ranges(vec![start..end, 0..2]))], vec![HookPoint::MlpPost(0)]).contains("empty"));
    assert!(err(vec![(Axis::Head, Sweep::Labels(vec![("IO".into(), vec![1; 4])]))], vec![HookPoint::Z(0)]).contains("not a position axis"));
    assert!(err(vec![(Axis::Pos, Sweep::Labels(vec![("IO".into(), vec![1; 3])]))], vec![HookPoint::Z(0)]).contains("3 indices for 4 prompts"));
    assert!(err(vec![(Axis::Pos, Sweep::Each), (Axis::DestPos, Sweep::Each)], vec![HookPoint::Pattern(0)]).contains("same axis"));
    assert!(err(vec![], vec![HookPoint::ResidPre(30)]).contains("no hook `blocks.30.hook_resid_pre`"));
    assert!(err(vec![], vec![]).contains("no hook points"));
    assert!(err(vec![(Axis::Neuron, Sweep::Each)], vec![HookPoint::MlpPost(0), HookPoint::ResidPre(1)]).contains("separate calls"));
}
