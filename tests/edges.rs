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
