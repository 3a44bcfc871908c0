//! EAP edge scores: the receiver-input gradient taken through the norm equals autograd's, and
//! scores into a receiver add up to its input difference times that gradient.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use ferrolens::methods::{edge_attribution, Node, Receiver};
use ferrolens::prelude::*;

#[test]
fn edge_scores_decompose_the_receiver_input() {
    let model = tiny_gpt2(DType::F64);
    let r = reference("tiny-gpt2/reference.safetensors");
    let p = 9;
    let clean = Tensor::cat(&[ids(&r, "p4.input_ids").narrow(1, 0, p).unwrap(), ids(&r, "p5.input_ids").narrow(1, 0, p).unwrap()], 0).unwrap();
    let corrupt = Tensor::cat(&[ids(&r, "p6.input_ids").narrow(1, 0, p).unwrap(), ids(&r, "p7.input_ids").narrow(1, 0, p).unwrap()], 0).unwrap();
    let metric = LogitDiff { answer: vec![17, 40], wrong: vec![423, 9] };
    let edges = edge_attribution(&model, &PatchingData::new(&clean, &corrupt, &metric), &Default::default()).unwrap();
    // The logits receiver's input is resid_post(last), which feeds nothing else: its gradient is
    // autograd's gradient there. Sum of all senders' edges into LOGITS + the embedding term
    // = (resid_post_clean - resid_post_corrupt) . g  (biases cancel in the difference).
    let last = HookPoint::ResidPost(1);
    let pts = [last, HookPoint::Embed, HookPoint::PosEmbed];
    let mut hk = Hooks::new().cache_hooks(&pts).grad(&[last]);
    let run = model.run_with_grads(&corrupt, &mut hk, |l| Ok(metric.per_row(l)?.mean_all()?)).unwrap();
    let mut hc = Hooks::new().cache_hooks(&pts);
    model.run(&clean, &mut hc).unwrap();
    let g = &run.grads[&last];
    let d = |h: HookPoint| (hc.cache_ref().get(h).unwrap() - hk.cache_ref().get(h).unwrap()).unwrap();
    let total = (d(last) * g).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let embed = ((d(HookPoint::Embed) + d(HookPoint::PosEmbed)).unwrap() * g).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let senders: f64 = edges.iter().filter(|e| e.receiver == Receiver::Logits).map(|e| e.score).sum();
    eprintln!("into LOGITS: senders {senders:.10} + embed {embed:.10} = {:.10}; direct {total:.10}", senders + embed);
    assert!((senders + embed - total).abs() < 1e-9 * total.abs().max(1.0));
    assert!(total.abs() > 1e-3);
    // Edges only go downstream: no MLP0 -> ATTN0, but heads of layer 0 feed MLP0.
    assert!(!edges.iter().any(|e| e.sender == Node::Mlp(0) && e.receiver == Receiver::Attn(0)));
    assert!(edges.iter().any(|e| e.sender == Node::Head(0, 1) && e.receiver == Receiver::Mlp(0)));
    assert_eq!(edges.iter().filter(|e| e.receiver == Receiver::Logits).count(), 2 * (4 + 1));
}

/// Path patching: no receivers leaves the clean run (metric 1); a sender's path into every
/// downstream head's Q, K and V plus its direct path add up to no more than the whole model
/// allows, and each single path is computed from real patched runs.
#[test]
fn path_patching_identities() {
    use ferrolens::methods::{path_patch, HeadInput, Normalised};
    use std::sync::Arc;
    let model = tiny_gpt2(DType::F64);
    let (clean, corrupt) = tiny_pair();
    let raw: Arc<dyn Metric> = Arc::new(LogitDiff { answer: vec![17], wrong: vec![423] });
    let c = ferrolens::methods::metric_of(&model, &clean, None, raw.as_ref()).unwrap();
    let k = ferrolens::methods::metric_of(&model, &corrupt, None, raw.as_ref()).unwrap();
    let metric = Normalised::new(raw, c, k).unwrap();
    let none = path_patch(&model, &PatchingData::new(&clean, &corrupt, &metric), (0, 1), &[]).unwrap();
    assert!((none - 1.0).abs() < 1e-12, "{none}");
    // Sender in layer 0 -> all of layer 1's queries, keys and values. In a 2-layer model with
    // layer-1 heads receiving everything the sender writes into them, this equals a manual run:
    // clean run whose layer-1 q/k/v are computed from a residual where head (0,1) is corrupt and
    // the MLP0 sees it (step 2), then only those q/k/v patched (step 3).
    let recv: Vec<(usize, usize, HeadInput)> = (0..4).flat_map(|h| [(1, h, HeadInput::Q), (1, h, HeadInput::K), (1, h, HeadInput::V)]).collect();
    let all = path_patch(&model, &PatchingData::new(&clean, &corrupt, &metric), (0, 1), &recv).unwrap();
    let mut hk = Hooks::new().cache_hooks(&[HookPoint::Z(0)]);
    model.run(&corrupt, &mut hk).unwrap();
    let zc = hk.cache_ref().get(HookPoint::Z(0)).unwrap().clone();
    let qkv = [HookPoint::Q(1), HookPoint::K(1), HookPoint::V(1)];
    let mut h2 = Hooks::new().patch(Patch::new(HookPoint::Z(0), Intervention::Replace(zc)).heads(&[1])).cache_hooks(&qkv);
    model.run(&clean, &mut h2).unwrap();
    let mut h3 = Hooks::new();
    for hp in qkv {
        h3 = h3.patch(Patch::new(hp, Intervention::Replace(h2.cache_ref().get(hp).unwrap().clone())));
    }
    let manual = metric.per_row(&model.run(&clean, &mut h3).unwrap()).unwrap().to_vec1::<f64>().unwrap()[0];
    assert!((all - manual).abs() < 1e-12, "{all} vs {manual}");
    assert!((all - 1.0).abs() > 1e-4, "the path carries nothing: {all}");
    // A receiver upstream of the sender is an error.
    assert!(path_patch(&model, &PatchingData::new(&clean, &corrupt, &metric), (1, 0), &[(0, 0, HeadInput::Q)]).is_err());
}

/// Per-head receivers (EdgeOptions::head_inputs): a sender's scores into every head's query and
/// every KV head's key and value inputs of a layer add up to its score into that attention
/// block; MLP and logit receivers are unchanged. GPT-2 (LayerNorm, f64) and SmolLM2 (RMSNorm,
/// grouped-query attention, f32).
#[test]
fn head_receivers_add_up_to_the_block() {
    use ferrolens::methods::{EdgeOptions, HeadInput};
    use std::collections::HashMap;
    let check = |model: &HookedTransformer, clean: &Tensor, corrupt: &Tensor, metric: &dyn Metric, rel: f64| {
        let data = PatchingData::new(clean, corrupt, metric);
        let blocks = edge_attribution(model, &data, &EdgeOptions::default()).unwrap();
        let heads = edge_attribution(model, &data, &EdgeOptions { head_inputs: true }).unwrap();
        let (nh, nkv) = (model.cfg.n_heads, model.cfg.n_kv_heads);
        let per_block: usize = nh + 2 * nkv;
        assert_eq!(heads.iter().filter(|e| e.sender == Node::Head(0, 0) && matches!(e.receiver, Receiver::Head(1, ..))).count(), per_block);
        let mut sum: HashMap<(Node, Receiver), f64> = HashMap::new();
        for e in &heads {
            let r = match e.receiver {
                Receiver::Head(l, _, _) => Receiver::Attn(l),
                r => r,
            };
            *sum.entry((e.sender, r)).or_default() += e.score;
        }
        let scale = blocks.iter().map(|e| e.score.abs()).fold(0.0, f64::max);
        let mut worst = 0f64;
        for e in &blocks {
            worst = worst.max((sum[&(e.sender, e.receiver)] - e.score).abs());
        }
        eprintln!("{}: max |sum of head receivers - block| = {worst:e} (largest score {scale:e}, {} edges)", model.cfg.name, heads.len());
        assert!(worst <= rel * scale, "{worst} vs {scale}");
        assert!(scale > 1e-3);
        assert_eq!(sum.len(), blocks.len());
        // KV receivers carry the key/value paths (not zero) and a query receiver is a single head.
        assert!(heads.iter().any(|e| matches!(e.receiver, Receiver::Head(_, _, HeadInput::K)) && e.score.abs() > 1e-6 * scale));
        assert!(heads.iter().any(|e| matches!(e.receiver, Receiver::Head(_, _, HeadInput::V)) && e.score.abs() > 1e-3 * scale));
    };
    let model = tiny_gpt2(DType::F64);
    let (clean, corrupt) = tiny_pair();
    check(&model, &clean, &corrupt, &LogitDiff { answer: vec![17], wrong: vec![423] }, 1e-10);
    let smol = smollm2();
    let pairs = ferrolens::tasks::read_jsonl(&fixtures().join("smollm2/ioi4.jsonl")).unwrap();
    let batch = PairBatch::new(smol.tokenizer().unwrap(), pairs[..2].to_vec(), "ioi4").unwrap();
    let (c, k) = (smol.tokens_tensor(&batch.clean).unwrap(), smol.tokens_tensor(&batch.corrupt).unwrap());
    check(smol, &c, &k, &LogitDiff { answer: batch.answer.clone(), wrong: batch.wrong.clone() }, 1e-4);
}

/// A per-head receiver's score is the derivative of the metric when the sender's output
/// difference is added to the residual stream as that one head's query / key / value input
/// alone: central finite differences on the tiny GPT-2 in f64, with the head's q, k or v
/// recomputed by hand from `ln1(resid_pre + eps * delta)` and patched in.
#[test]
fn head_receiver_scores_are_directional_derivatives() {
    use ferrolens::methods::{EdgeOptions, HeadInput};
    let model = tiny_gpt2(DType::F64);
    let (clean, corrupt) = tiny_pair();
    let metric = LogitDiff { answer: vec![17], wrong: vec![423] };
    let edges = edge_attribution(&model, &PatchingData::new(&clean, &corrupt, &metric), &EdgeOptions { head_inputs: true }).unwrap();
    let (sl, sh, rl) = (0usize, 2usize, 1usize);
    let mut hc = Hooks::new().cache_hooks(&[HookPoint::Result(sl)]);
    model.run(&clean, &mut hc).unwrap();
    let mut hk = Hooks::new().cache_hooks(&[HookPoint::Result(sl), HookPoint::ResidPre(rl)]);
    model.run(&corrupt, &mut hk).unwrap();
    let head_out = |c: &ActivationCache| c.get(HookPoint::Result(sl)).unwrap().narrow(2, sh, 1).unwrap().squeeze(2).unwrap();
    let delta = (head_out(hc.cache_ref()) - head_out(hk.cache_ref())).unwrap(); // [1,p,D]
    let x = hk.cache_ref().get(HookPoint::ResidPre(rl)).unwrap().clone();
    let bw = &model.w.blocks[rl];
    let d = model.cfg.d_head;
    let ln = bw.ln1.as_ref().unwrap();
    let ln1 = |x: &Tensor| -> Tensor {
        let xc = x.broadcast_sub(&x.mean_keepdim(2).unwrap()).unwrap();
        let s = (xc.sqr().unwrap().mean_keepdim(2).unwrap() + model.cfg.eps).unwrap().sqrt().unwrap();
        xc.broadcast_div(&s).unwrap().broadcast_mul(&ln.w).unwrap().broadcast_add(ln.b.as_ref().unwrap()).unwrap()
    };
    for (input, hook, w, b, h) in [
        (HeadInput::Q, HookPoint::Q(rl), &bw.attn.w_q, &bw.attn.b_q, 1usize),
        (HeadInput::K, HookPoint::K(rl), &bw.attn.w_k, &bw.attn.b_k, 3),
        (HeadInput::V, HookPoint::V(rl), &bw.attn.w_v, &bw.attn.b_v, 0),
    ] {
        let m_at = |eps: f64| -> f64 {
            let xe = (&x + (&delta * eps).unwrap()).unwrap();
            let full = ferrolens::model::layout::broadcast_matmul(&ln1(&xe), w).unwrap().broadcast_add(b.as_ref().unwrap()).unwrap();
            let (bb, p, _) = full.dims3().unwrap();
            let heads = full.reshape((bb, p, model.cfg.n_heads, d)).unwrap();
            let mut hooks = Hooks::new().patch(Patch::new(hook, Intervention::Replace(heads)).heads(&[h]));
            let logits = model.run(&corrupt, &mut hooks).unwrap();
            metric.per_row(&logits).unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let eps = 1e-4;
        let fd = (m_at(eps) - m_at(-eps)) / (2.0 * eps);
        let score = edges.iter().find(|e| e.sender == Node::Head(sl, sh) && e.receiver == Receiver::Head(rl, h, input)).unwrap().score;
        eprintln!("{input:?} head {h}: EAP {score:.10} finite difference {fd:.10}");
        assert!((score - fd).abs() < 1e-6 * fd.abs().max(1e-3), "{input:?}: {score} vs {fd}");
        assert!(fd.abs() > 1e-5, "{input:?}: the path carries nothing");
    }
}
