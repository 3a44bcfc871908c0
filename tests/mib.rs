//! Edge circuits, EAP-IG and MIB's CPR/CMD: the graph has MIB's edge count; the full circuit is
//! the clean run and the empty one the corrupt run; a missing edge carries exactly the ablated
//! sender output into its receiver (hand-built runs, also through Gemma's post-attention norm);
//! EAP-IG with one step is EAP (two independent implementations), with many steps it is
//! complete; CPR/CMD of hand-built curves equal the formula; the random floor is reproducible.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use ferrolens::methods::eap_ig::{eap_ig, EapIgOptions, EapVariant};
use ferrolens::methods::edge_circuit::{edge_patched_metric, AblatedSenders, EdgeAblation, EdgeGraph, Sender};
use ferrolens::methods::mib::{areas, circuit_at, random_scores, Ranking, PERCENTAGES};
use ferrolens::methods::{edge_attribution, EdgeOptions, HeadInput, Node, Receiver};
use ferrolens::model::NormSite;
use ferrolens::prelude::*;

/// Two prompts of 7 tokens for a tiny family model (vocabulary 96), and their corruptions.
fn family_pairs() -> (Tensor, Tensor) {
    let clean = Tensor::new(&[[3u32, 17, 40, 5, 88, 17, 9], [12, 7, 61, 30, 2, 7, 44]], &candle_core::Device::Cpu).unwrap();
    let corrupt = Tensor::new(&[[3u32, 17, 40, 5, 88, 52, 9], [12, 7, 61, 30, 2, 90, 44]], &candle_core::Device::Cpu).unwrap();
    (clean, corrupt)
}

#[test]
fn the_graph_has_mibs_edge_count() {
    // GPT-2 small: 32,491 edges in MIB (q, k, v inputs of every head; input and logits nodes).
    assert_eq!(EdgeGraph::from_shape(12, 12, 12, false, true).len(), 32491);
    // One receiver per block: 12*(1+13l) + MLPs + logits.
    let blocks = EdgeGraph::from_shape(12, 12, 12, false, false);
    assert_eq!(blocks.len(), (0..12).map(|l| 1 + 13 * l).sum::<usize>() + 1014 + 157);
    // Parallel blocks: no edge from a layer's heads to its own MLP.
    assert_eq!(EdgeGraph::from_shape(12, 12, 12, true, true).len(), 32491 - 12 * 12);
    // Grouped-query attention: key and value receivers per KV head.
    let g = EdgeGraph::from_shape(2, 4, 2, false, true);
    assert_eq!(g.receivers.iter().filter(|r| matches!(r, Receiver::Head(0, _, HeadInput::K))).count(), 2);
    assert!(g.edge_index(Sender::Head(0, 3), Receiver::Mlp(0)).is_some());
    assert!(g.edge_index(Sender::Mlp(0), Receiver::Head(0, 1, HeadInput::Q)).is_none());
    assert!(g.edge_index(Sender::Input, Receiver::Logits).is_some());
    assert_eq!("INPUT".parse::<Sender>().unwrap(), Sender::Input);
    assert_eq!("L1H2".parse::<Sender>().unwrap(), Sender::Head(1, 2));
}

#[test]
fn top_n_and_pruning() {
    let g = EdgeGraph::from_shape(2, 2, 2, false, true);
    let e = |s: Sender, r: Receiver| g.edge_index(s, r).unwrap();
    let mut scores = vec![0.0; g.len()];
    scores[e(Sender::Input, Receiver::Head(0, 0, HeadInput::Q))] = 3.0;
    scores[e(Sender::Head(0, 0), Receiver::Logits)] = -5.0;
    scores[e(Sender::Head(1, 1), Receiver::Logits)] = 2.0;
    // Signed: the two positive edges; absolute: -5 first.
    let signed = g.top_n(&scores, 2, false).unwrap();
    assert!(signed[e(Sender::Input, Receiver::Head(0, 0, HeadInput::Q))] && signed[e(Sender::Head(1, 1), Receiver::Logits)]);
    let abs = g.top_n(&scores, 2, true).unwrap();
    assert!(abs[e(Sender::Head(0, 0), Receiver::Logits)] && abs[e(Sender::Input, Receiver::Head(0, 0, HeadInput::Q))]);
    // L1H1 has no edge in: pruned with its edge; INPUT -> L0H0.q -> (L0H0 -> LOGITS) stays.
    let all3 = g.top_n(&scores, 3, true).unwrap();
    let kept = g.prune(&all3);
    assert_eq!(kept.iter().filter(|&&k| k).count(), 2);
    assert!(!kept[e(Sender::Head(1, 1), Receiver::Logits)]);
    // A dead end (L0H0 reads the input but writes nowhere kept) goes, and the input's edge with it.
    let pruned = g.prune(&signed);
    assert_eq!(pruned.iter().filter(|&&k| k).count(), 0);
    // Bad scores are refused.
    scores[0] = f64::NAN;
    assert!(g.top_n(&scores, 2, true).unwrap_err().to_string().contains("must be finite"));
    // Node rankings: the best nodes with every edge among them and to the logits.
    let mut nodes = vec![0.0; g.senders.len()];
    nodes[g.sender_id(Sender::Input)] = 1.0;
    nodes[g.sender_id(Sender::Head(1, 0))] = 0.5;
    let (n, flags) = circuit_at(&g, &Ranking::Nodes(nodes), false, 2.0 / g.senders.len() as f64).unwrap();
    assert_eq!(n, 2);
    let on: Vec<(String, String)> = (0..g.len()).filter(|&i| flags[i]).map(|i| g.labels(i)).collect();
    // INPUT -> L1H0.q, L1KV0.k, L1KV0.v (KV head 0 serves heads 0 and 1), INPUT -> LOGITS, L1H0 -> LOGITS.
    assert_eq!(on.len(), 5, "{on:?}");
    assert!(on.contains(&("L1H0".into(), "LOGITS".into())));
}

#[test]
fn cpr_and_cmd_follow_the_formula() {
    // MIB's random circuit: f = 0 up to 50 %, 1 at 100 %: CPR 0.25, CMD 0.749.
    let mut f = vec![0.0; 10];
    f[9] = 1.0;
    let (cpr, cmd) = areas(&PERCENTAGES, &f);
    assert!((cpr - 0.25).abs() < 1e-12 && (cmd - 0.749).abs() < 1e-12, "{cpr} {cmd}");
    // f = x: the trapezoid rule is exact, (1 - 0.001^2) / 2; |1 - x| integrates to (1 - 0.001)^2 / 2.
    let (cpr, cmd) = areas(&PERCENTAGES, &PERCENTAGES);
    assert!((cpr - (1.0 - 1e-6) / 2.0).abs() < 1e-12 && (cmd - 0.999f64.powi(2) / 2.0).abs() < 1e-12, "{cpr} {cmd}");
    // A perfect circuit from the first point: CPR = CMD-complement = 0.999.
    let (cpr, cmd) = areas(&PERCENTAGES, &[1.0; 10]);
    assert!((cpr - 0.999).abs() < 1e-12 && cmd.abs() < 1e-12);
    let g = EdgeGraph::from_shape(4, 4, 4, false, true);
    assert_eq!(random_scores(&g, 7), random_scores(&g, 7));
    assert_ne!(random_scores(&g, 7), random_scores(&g, 8));
    assert!(random_scores(&g, 7).iter().all(|x| (-1.0..1.0).contains(x)));
}

/// Full = clean run, empty = corrupt run (counterfactual) or a prompt-independent run (mean),
/// for GPT-2 (LayerNorm, learned positions), Llama (RMSNorm, GQA), Gemma-2 (post-attention
/// norm), GPT-NeoX (parallel blocks), per-head and per-block receivers.
#[test]
fn full_and_empty_circuits_are_the_clean_and_corrupt_runs() {
    let tiny = tiny_gpt2(DType::F64);
    let (tc, tk) = tiny_pair();
    let tc2 = Tensor::cat(&[tc.clone(), tk.clone()], 0).unwrap();
    let tk2 = Tensor::cat(&[tk.clone(), tc.clone()], 0).unwrap();
    let mut cases: Vec<(HookedTransformer, Tensor, Tensor, LogitDiff)> = vec![(tiny, tc2, tk2, LogitDiff { answer: vec![17, 17], wrong: vec![423, 423] })];
    for f in ["llama", "gemma2", "gpt_neox"] {
        let (c, k) = family_pairs();
        cases.push((family(f, DType::F64), c, k, LogitDiff { answer: vec![5, 5], wrong: vec![9, 9] }));
    }
    for (model, clean, corrupt, metric) in &cases {
        let data = PatchingData::new(clean, corrupt, metric);
        let m_clean = metric.per_row(&model.run(clean, &mut Hooks::new()).unwrap()).unwrap().to_vec1::<f64>().unwrap();
        let m_corrupt = metric.per_row(&model.run(corrupt, &mut Hooks::new()).unwrap()).unwrap().to_vec1::<f64>().unwrap();
        for head_inputs in [true, false] {
            let g = EdgeGraph::new(model, head_inputs);
            let cf = AblatedSenders::new(model, &data, EdgeAblation::Counterfactual).unwrap();
            let full = edge_patched_metric(model, &data, &g, &vec![true; g.len()], &cf).unwrap();
            let empty = edge_patched_metric(model, &data, &g, &vec![false; g.len()], &cf).unwrap();
            for i in 0..2 {
                assert!((full[i] - m_clean[i]).abs() < 1e-10, "{} full {} vs clean {}", model.cfg.name, full[i], m_clean[i]);
                assert!((empty[i] - m_corrupt[i]).abs() < 1e-9, "{} heads {head_inputs}: empty {} vs corrupt {}", model.cfg.name, empty[i], m_corrupt[i]);
            }
            assert!((m_clean[0] - m_corrupt[0]).abs() > 1e-4, "{}: the corruption changes nothing", model.cfg.name);
            let mean_ab = AblatedSenders::new(model, &data, EdgeAblation::Mean).unwrap();
            let full = edge_patched_metric(model, &data, &g, &vec![true; g.len()], &mean_ab).unwrap();
            let empty = edge_patched_metric(model, &data, &g, &vec![false; g.len()], &mean_ab).unwrap();
            assert!((full[0] - m_clean[0]).abs() < 1e-10 && (full[1] - m_clean[1]).abs() < 1e-10);
            // Every receiver sees only means: both prompts get the same logits.
            assert!((empty[0] - empty[1]).abs() < 1e-9, "{}: mean-ablated empty circuit depends on the prompt: {empty:?}", model.cfg.name);
        }
    }
}

/// A missing edge replaces the sender's *current* output by its ablated one at that receiver only.
#[test]
fn a_missing_edge_carries_the_ablated_output_into_its_receiver() {
    let model = tiny_gpt2(DType::F64);
    let (clean, corrupt) = tiny_pair();
    let metric = LogitDiff { answer: vec![17], wrong: vec![423] };
    let data = PatchingData::new(&clean, &corrupt, &metric);
    let cf = AblatedSenders::new(&model, &data, EdgeAblation::Counterfactual).unwrap();
    let g = EdgeGraph::new(&model, true);
    let cache = |t: &Tensor| {
        let mut h = Hooks::new().cache_hooks(&[HookPoint::Result(0), HookPoint::ResidPre(1), HookPoint::Embed, HookPoint::ResidPre(0)]);
        model.run(t, &mut h).unwrap();
        h.take_cache()
    };
    let (cc, ck) = (cache(&clean), cache(&corrupt));
    let head = |c: &ActivationCache, h: usize| c.get(HookPoint::Result(0)).unwrap().narrow(2, h, 1).unwrap().squeeze(2).unwrap();
    let value = |hooks: &mut Hooks| metric.per_row(&model.run(&clean, hooks).unwrap()).unwrap().to_vec1::<f64>().unwrap()[0];
    // Head h's query input of layer `l` from residual `x`, as the layer computes it.
    let q_from = |l: usize, x: &Tensor| -> Tensor {
        let bw = &model.w.blocks[l];
        let n = model.apply_norm(NormSite::Ln1(l), x).unwrap();
        let q = ferrolens::model::layout::broadcast_matmul(&n, &bw.attn.w_q).unwrap().broadcast_add(bw.attn.b_q.as_ref().unwrap()).unwrap();
        let (b, p, _) = q.dims3().unwrap();
        q.reshape((b, p, model.cfg.n_heads, model.cfg.d_head)).unwrap()
    };
    // 1. L0H2 -> L1H1.q missing.
    let mut flags = vec![true; g.len()];
    flags[g.edge_index(Sender::Head(0, 2), Receiver::Head(1, 1, HeadInput::Q)).unwrap()] = false;
    let got = edge_patched_metric(&model, &data, &g, &flags, &cf).unwrap()[0];
    let x = (cc.get(HookPoint::ResidPre(1)).unwrap() + (head(&ck, 2) - head(&cc, 2)).unwrap()).unwrap();
    let mut hooks = Hooks::new().patch(Patch::new(HookPoint::Q(1), Intervention::Replace(q_from(1, &x))).heads(&[1]));
    let want = value(&mut hooks);
    eprintln!("L0H2 -> L1H1.q missing: {got:.12} by hand {want:.12}, clean {:.6}", value(&mut Hooks::new()));
    assert!((got - want).abs() < 1e-10);
    assert!((got - value(&mut Hooks::new())).abs() > 1e-6, "the edge carries nothing");
    // 2. INPUT -> L0H0.q missing: L0H0's output changes, and its present edges carry the changed
    // output (its current one, not the clean one) downstream: a plain forward with that query.
    let mut flags = vec![true; g.len()];
    flags[g.edge_index(Sender::Input, Receiver::Head(0, 0, HeadInput::Q)).unwrap()] = false;
    let got = edge_patched_metric(&model, &data, &g, &flags, &cf).unwrap()[0];
    let x = (cc.get(HookPoint::ResidPre(0)).unwrap() + (ck.get(HookPoint::Embed).unwrap() - cc.get(HookPoint::Embed).unwrap()).unwrap()).unwrap();
    let mut hooks = Hooks::new().patch(Patch::new(HookPoint::Q(0), Intervention::Replace(q_from(0, &x))).heads(&[0]));
    let want = value(&mut hooks);
    eprintln!("INPUT -> L0H0.q missing: {got:.12} by hand {want:.12}");
    assert!((got - want).abs() < 1e-10);
    // 3. Per-block receiver: L0H2 -> ATTN1 missing = hook_attn_in(1) plus the head's difference.
    let gb = EdgeGraph::new(&model, false);
    let mut flags = vec![true; gb.len()];
    flags[gb.edge_index(Sender::Head(0, 2), Receiver::Attn(1)).unwrap()] = false;
    let got = edge_patched_metric(&model, &data, &gb, &flags, &cf).unwrap()[0];
    let mut hooks = Hooks::new().patch(Patch::new(HookPoint::AttnIn(1), Intervention::Add((head(&ck, 2) - head(&cc, 2)).unwrap())));
    let want = value(&mut hooks);
    assert!((got - want).abs() < 1e-10, "{got} vs {want}");

    // 4. Gemma-2 (attention output through ln1_post): L0H1 -> MLP1 missing = hook_mlp_in(1) plus
    // ln1_post(sum of heads with head 1 corrupt + b_O) - ln1_post(sum of clean heads + b_O).
    let gem = family("gemma2", DType::F64);
    let (c, k) = family_pairs();
    let metric = LogitDiff { answer: vec![5, 5], wrong: vec![9, 9] };
    let data = PatchingData::new(&c, &k, &metric);
    let cf = AblatedSenders::new(&gem, &data, EdgeAblation::Counterfactual).unwrap();
    let g = EdgeGraph::new(&gem, true);
    let mut flags = vec![true; g.len()];
    flags[g.edge_index(Sender::Head(0, 1), Receiver::Mlp(1)).unwrap()] = false;
    let got = edge_patched_metric(&gem, &data, &g, &flags, &cf).unwrap();
    let res = |t: &Tensor| {
        let mut h = Hooks::new().cache_hooks(&[HookPoint::Result(0)]);
        gem.run(t, &mut h).unwrap();
        h.take_cache().get(HookPoint::Result(0)).unwrap().clone()
    };
    let (rc, rk) = (res(&c), res(&k));
    let nh = gem.cfg.n_heads;
    let mixed = Tensor::cat(&[rc.narrow(2, 0, 1).unwrap(), rk.narrow(2, 1, 1).unwrap(), rc.narrow(2, 2, nh - 2).unwrap()], 2).unwrap();
    let post = |r: &Tensor| {
        let mut x = r.sum(2).unwrap();
        if let Some(bo) = &gem.w.blocks[0].attn.b_o {
            x = x.broadcast_add(bo).unwrap();
        }
        gem.apply_norm(NormSite::Ln1Post(0), &x).unwrap()
    };
    let delta = (post(&mixed) - post(&rc)).unwrap();
    let mut hooks = Hooks::new().patch(Patch::new(HookPoint::MlpIn(1), Intervention::Add(delta)));
    let want = metric.per_row(&gem.run(&c, &mut hooks).unwrap()).unwrap().to_vec1::<f64>().unwrap();
    eprintln!("gemma2 L0H1 -> MLP1 missing: {got:?} by hand {want:?}");
    for i in 0..2 {
        assert!((got[i] - want[i]).abs() < 1e-10);
    }
    // A mismatched flag vector, or a graph of another model, is refused.
    assert!(edge_patched_metric(&gem, &data, &g, &[true; 3], &cf).is_err());
    let other = EdgeGraph::from_shape(3, 4, 2, false, true);
    let err = edge_patched_metric(&gem, &data, &other, &vec![true; other.len()], &cf).unwrap_err().to_string();
    assert!(err.contains("build it with EdgeGraph::new"), "{err}");
}

/// EAP-IG on the inputs with one step takes the gradient at the corrupt run: it equals
/// `edge_attribution` (a separate implementation). EAP takes it at the clean run: it equals
/// minus `edge_attribution` with clean and corrupt swapped. EAP-IG on the activations with one
/// step runs the clean prompts with one node at a time held constant (MIB's pinned code returns
/// the interpolation as a new tensor, so no gradient flows through that node): into the logits,
/// which no node sits behind, it equals EAP; elsewhere it differs. Tiny GPT-2 and Llama (GQA),
/// per-head receivers.
#[test]
fn eap_ig_with_one_step_is_eap() {
    let tiny = tiny_gpt2(DType::F64);
    let (tc, tk) = tiny_pair();
    let llama = family("llama", DType::F64);
    let (lc, lk) = family_pairs();
    let cases = [(&tiny, &tc, &tk, LogitDiff { answer: vec![17], wrong: vec![423] }), (&llama, &lc, &lk, LogitDiff { answer: vec![5, 5], wrong: vec![9, 9] })];
    for (model, clean, corrupt, metric) in cases {
        let data = PatchingData::new(clean, corrupt, &metric);
        let swapped = PatchingData::new(corrupt, clean, &metric);
        let g = EdgeGraph::new(model, true);
        let cf = AblatedSenders::new(model, &data, EdgeAblation::Counterfactual).unwrap();
        let run = |variant, steps| eap_ig(model, &data, &g, &cf, &EapIgOptions { variant, steps, max_rows: 64 }, &|_, _| {}).unwrap();
        let ig1 = run(EapVariant::IgInputs, 1);
        let eap = run(EapVariant::Eap, 1);
        let act1 = run(EapVariant::IgActivations, 1);
        let at_corrupt = edge_attribution(model, &data, &EdgeOptions { head_inputs: true }).unwrap();
        let at_clean = edge_attribution(model, &swapped, &EdgeOptions { head_inputs: true }).unwrap();
        let scale = at_corrupt.iter().map(|e| e.score.abs()).fold(0.0, f64::max);
        let sender = |n: Node| match n {
            Node::Head(l, h) => Sender::Head(l, h),
            Node::Mlp(l) => Sender::Mlp(l),
        };
        let mut worst = (0f64, 0f64, 0f64);
        for (a, b) in at_corrupt.iter().zip(&at_clean) {
            let i = g.edge_index(sender(a.sender), a.receiver).unwrap();
            worst.0 = worst.0.max((ig1[i] - a.score).abs());
            worst.1 = worst.1.max((eap[i] + b.score).abs());
        }
        let mut differs = 0f64;
        for i in 0..g.len() {
            if g.receivers[g.edges[i].1] == Receiver::Logits {
                worst.2 = worst.2.max((act1[i] - eap[i]).abs());
            } else {
                differs = differs.max((act1[i] - eap[i]).abs());
            }
        }
        assert!(differs > 1e-3 * scale, "held-constant nodes changed no gradient");
        eprintln!(
            "{}: |ig1 - EAP(corrupt)| {:e}, |eap + EAP(swapped)| {:e}, |act1 - eap| into logits {:e}, scale {scale:e}",
            model.cfg.name, worst.0, worst.1, worst.2
        );
        assert!(worst.0 < 1e-9 * scale && worst.1 < 1e-9 * scale && worst.2 < 1e-9 * scale);
        assert!(scale > 1e-4);
        assert_eq!(at_corrupt.len() + g.receivers.len(), g.len(), "every edge but the input's is scored by both");
    }
}

/// Integrated gradients are complete: the input's edges (its embedding difference times the
/// gradient at every reader of the residual stream) sum to m(clean) - m(corrupt) as the steps
/// grow, with the left Riemann sum's error shrinking as 1/steps; one step (the gradient at the
/// corrupt run) misses.
#[test]
fn eap_ig_inputs_is_complete_with_many_steps() {
    let model = tiny_gpt2(DType::F64);
    let (clean, corrupt) = tiny_pair();
    let metric = LogitDiff { answer: vec![17], wrong: vec![423] };
    let data = PatchingData::new(&clean, &corrupt, &metric);
    let m = |t: &Tensor| metric.per_row(&model.run(t, &mut Hooks::new()).unwrap()).unwrap().to_vec1::<f64>().unwrap()[0];
    let want = m(&clean) - m(&corrupt);
    let g = EdgeGraph::new(&model, true);
    let cf = AblatedSenders::new(&model, &data, EdgeAblation::Counterfactual).unwrap();
    let input_sum = |steps| {
        let s = eap_ig(&model, &data, &g, &cf, &EapIgOptions { variant: EapVariant::IgInputs, steps, max_rows: 64 }, &|_, _| {}).unwrap();
        (0..g.len()).filter(|&i| g.edges[i].0 == 0).map(|i| s[i]).sum::<f64>()
    };
    let (one, hundred, many) = (input_sum(1), input_sum(100), input_sum(400));
    eprintln!("m(clean) - m(corrupt) = {want:.6}; input edges: 1 step {one:.6}, 100 steps {hundred:.6}, 400 steps {many:.6}");
    assert!((many - want).abs() < 0.01 * want.abs(), "{many} vs {want}");
    assert!((many - want).abs() < 0.35 * (hundred - want).abs(), "the error does not fall as 1/steps");
    assert!((one - want).abs() > 20.0 * (many - want).abs());
    assert!(want.abs() > 1e-3);
}

/// Every reader of the residual stream is a receiver: a sender's edge scores sum to its output
/// difference times the gradient at its own output (what node-level `atp_ig` ranks by). EAP at
/// the clean run against a direct backward to `hook_result` and `hook_mlp_out`, tiny GPT-2, both
/// receiver kinds.
#[test]
fn a_senders_edges_sum_to_its_node_attribution() {
    let model = tiny_gpt2(DType::F64);
    let (clean, corrupt) = tiny_pair();
    let metric = LogitDiff { answer: vec![17], wrong: vec![423] };
    let data = PatchingData::new(&clean, &corrupt, &metric);
    let cf = AblatedSenders::new(&model, &data, EdgeAblation::Counterfactual).unwrap();
    let pts = [HookPoint::Result(0), HookPoint::MlpOut(0)];
    let mut hc = Hooks::new().cache_hooks(&pts).grad(&pts);
    let run = model.run_with_grads(&clean, &mut hc, |l| Ok(metric.per_row(l)?.sum_all()?)).unwrap();
    let mut hk = Hooks::new().cache_hooks(&pts);
    model.run(&corrupt, &mut hk).unwrap();
    let direct = |hook: HookPoint, head: Option<usize>| -> f64 {
        let pick = |t: &Tensor| match head {
            Some(h) => t.narrow(2, h, 1).unwrap(),
            None => t.clone(),
        };
        let diff = (pick(hc.cache_ref().get(hook).unwrap()) - pick(hk.cache_ref().get(hook).unwrap())).unwrap();
        (diff * pick(&run.grads[&hook])).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    for head_inputs in [true, false] {
        let g = EdgeGraph::new(&model, head_inputs);
        let s = eap_ig(&model, &data, &g, &cf, &EapIgOptions { variant: EapVariant::Eap, steps: 1, max_rows: 64 }, &|_, _| {}).unwrap();
        let sum_from = |sender: Sender| -> f64 { (0..g.len()).filter(|&i| g.senders[g.edges[i].0] == sender).map(|i| s[i]).sum() };
        for (sender, hook, head) in [(Sender::Head(0, 2), HookPoint::Result(0), Some(2)), (Sender::Mlp(0), HookPoint::MlpOut(0), None)] {
            let (a, b) = (sum_from(sender), direct(hook, head));
            eprintln!("{sender} (head inputs {head_inputs}): edges {a:.12} node {b:.12}");
            assert!((a - b).abs() < 1e-9 * b.abs().max(1e-3), "{a} vs {b}");
            assert!(b.abs() > 1e-4);
        }
    }
}

/// Left-padded prompts of different lengths: each prompt's circuit metric in the padded batch
/// equals its metric run alone (padding never leaks into a real position), for the full, the
/// empty and a half circuit, and EAP-IG scores of the padded pair equal the mean of the two
/// prompts' scores run alone. Llama (RMSNorm, GQA, rotary positions).
#[test]
fn padded_batches_equal_each_prompt_alone() {
    let model = family("llama", DType::F64);
    let dev = candle_core::Device::Cpu;
    let clean: Vec<Vec<u32>> = vec![vec![3, 17, 40, 5, 88, 17, 9], vec![12, 7, 61, 2, 7]];
    let corrupt: Vec<Vec<u32>> = vec![vec![3, 17, 40, 5, 88, 52, 9], vec![12, 7, 61, 2, 90]];
    let (c, mask) = model.tokens_padded(&clean, PadSide::Left).unwrap();
    let (k, _) = model.tokens_padded(&corrupt, PadSide::Left).unwrap();
    let metric = LogitDiff { answer: vec![5, 5], wrong: vec![9, 9] };
    let one = LogitDiff { answer: vec![5], wrong: vec![9] };
    let data = PatchingData::new(&c, &k, &metric).with_mask(Some(&mask));
    let g = EdgeGraph::new(&model, true);
    let half = g.top_n(&random_scores(&g, 3), g.len() / 2, false).unwrap();
    let ab = AblatedSenders::new(&model, &data, EdgeAblation::Counterfactual).unwrap();
    let opts = EapIgOptions { variant: EapVariant::IgInputs, steps: 3, max_rows: 64 };
    let padded_scores = eap_ig(&model, &data, &g, &ab, &opts, &|_, _| {}).unwrap();
    let mut alone_scores = vec![0.0; g.len()];
    for flags in [vec![true; g.len()], vec![false; g.len()], half] {
        let padded = edge_patched_metric(&model, &data, &g, &flags, &ab).unwrap();
        for i in 0..2 {
            let ci = Tensor::new(clean[i].as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
            let ki = Tensor::new(corrupt[i].as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
            let d1 = PatchingData::new(&ci, &ki, &one);
            let ab1 = AblatedSenders::new(&model, &d1, EdgeAblation::Counterfactual).unwrap();
            let alone = edge_patched_metric(&model, &d1, &g, &flags, &ab1).unwrap()[0];
            assert!((padded[i] - alone).abs() < 1e-9, "prompt {i}: padded {} alone {alone}", padded[i]);
            if flags.iter().all(|&f| f) {
                let s = eap_ig(&model, &d1, &g, &ab1, &opts, &|_, _| {}).unwrap();
                alone_scores.iter_mut().zip(s).for_each(|(a, b)| *a += b / 2.0);
            }
        }
    }
    let worst = padded_scores.iter().zip(&alone_scores).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let scale = alone_scores.iter().map(|x| x.abs()).fold(0.0, f64::max);
    assert!(worst < 1e-9 * scale && scale > 1e-4, "EAP-IG padded vs alone: {worst} (scale {scale})");
}
