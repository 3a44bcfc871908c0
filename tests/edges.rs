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
    let edges = edge_attribution(&model, &clean, &corrupt, &metric).unwrap();
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
    let c = ferrolens::methods::metric_of(&model, &clean, raw.as_ref()).unwrap();
    let k = ferrolens::methods::metric_of(&model, &corrupt, raw.as_ref()).unwrap();
    let metric = Normalised::new(raw, c, k).unwrap();
    let none = path_patch(&model, &clean, &corrupt, &metric, (0, 1), &[]).unwrap();
    assert!((none - 1.0).abs() < 1e-12, "{none}");
    // Sender in layer 0 -> all of layer 1's queries, keys and values. In a 2-layer model with
    // layer-1 heads receiving everything the sender writes into them, this equals a manual run:
    // clean run whose layer-1 q/k/v are computed from a residual where head (0,1) is corrupt and
    // the MLP0 sees it (step 2), then only those q/k/v patched (step 3).
    let recv: Vec<(usize, usize, HeadInput)> = (0..4).flat_map(|h| [(1, h, HeadInput::Q), (1, h, HeadInput::K), (1, h, HeadInput::V)]).collect();
    let all = path_patch(&model, &clean, &corrupt, &metric, (0, 1), &recv).unwrap();
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
    assert!(path_patch(&model, &clean, &corrupt, &metric, (1, 0), &[(0, 0, HeadInput::Q)]).is_err());
}
