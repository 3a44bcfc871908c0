//! Strict layouts (issue 14): every method runs with `layout::set_strict(true)`, where a matrix
//! product whose operands candle's CUDA backend would refuse is an error on the CPU too. A
//! layout that breaks a GPU run (as EAP's head slice of `z` times `W_O` did on an H200) fails
//! here without a GPU. Every family's tiny checkpoint, both receiver kinds, padded batches.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use ferrolens::methods::atp_star::{grad_drop, qk_fix};
use ferrolens::methods::eap_ig::{eap_ig, EapIgOptions, EapVariant};
use ferrolens::methods::edge_circuit::{edge_patched_metric, AblatedSenders, EdgeAblation, EdgeGraph};
use ferrolens::methods::heads::{detect_heads, Detector};
use ferrolens::methods::retrieval::decode_with_copy_hits;
use ferrolens::methods::{edge_attribution, path_patch, EdgeOptions, HeadInput};
use ferrolens::model::layout::set_strict;
use ferrolens::prelude::*;

fn pairs() -> (Tensor, Tensor) {
    let clean = Tensor::new(&[[3u32, 17, 40, 5, 88, 17, 9], [12, 7, 61, 30, 2, 7, 44]], &candle_core::Device::Cpu).unwrap();
    let corrupt = Tensor::new(&[[3u32, 17, 40, 5, 88, 52, 9], [12, 7, 61, 30, 2, 90, 44]], &candle_core::Device::Cpu).unwrap();
    (clean, corrupt)
}

/// Every method of the library on one model; panics (with the method) on any error.
fn every_method(name: &str, model: &HookedTransformer) {
    let (clean, corrupt) = pairs();
    let metric = LogitDiff { answer: vec![5, 9], wrong: vec![17, 40] };
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], &candle_core::Device::Cpu).unwrap();
    for (padded, data) in [(false, PatchingData::new(&clean, &corrupt, &metric)), (true, PatchingData::new(&clean, &corrupt, &metric).with_mask(Some(&mask)))] {
        let at = |what: &str| format!("{name} (padded: {padded}): {what}");
        // A cache of every hook point.
        let mut hooks = Hooks::new().cache_hooks(&model.hook_points());
        model.run_span(Some(&clean), &data.span(false), &mut hooks).unwrap_or_else(|e| panic!("{}: {e}", at("cache of every hook")));
        let sweep = SweepOptions { max_rows: 16, ..Default::default() };
        for c in [Component::HeadZ, Component::HeadQ, Component::HeadPattern, Component::ResidPre, Component::AttnOut, Component::MlpOut] {
            activation_patching(model, &data, c, &Positions::Each, &sweep).unwrap_or_else(|e| panic!("{}: {e}", at(&format!("act {}", c.name()))));
        }
        let comps = [Component::HeadZ, Component::HeadQ, Component::HeadK, Component::HeadV, Component::ResidPre, Component::AttnOut, Component::MlpOut];
        for opts in [AttributionOptions::atp(&comps), AttributionOptions::relp(&comps)] {
            attribution(model, &data, &opts).unwrap_or_else(|e| panic!("{}: {e}", at("AtP/RelP")));
        }
        qk_fix(model, &data, Component::HeadK, &Positions::Each).unwrap_or_else(|e| panic!("{}: {e}", at("AtP* QK fix")));
        grad_drop(model, &data, &AttributionOptions::atp(&[Component::HeadZ])).unwrap_or_else(|e| panic!("{}: {e}", at("AtP* GradDrop")));
        for head_inputs in [true, false] {
            edge_attribution(model, &data, &EdgeOptions { head_inputs }).unwrap_or_else(|e| panic!("{}: {e}", at("EAP")));
            let graph = EdgeGraph::new(model, head_inputs);
            for ablation in [EdgeAblation::Counterfactual, EdgeAblation::Mean] {
                let ab = AblatedSenders::new(model, &data, ablation).unwrap();
                let half: Vec<bool> = (0..graph.len()).map(|i| i % 2 == 0).collect();
                edge_patched_metric(model, &data, &graph, &half, &ab).unwrap_or_else(|e| panic!("{}: {e}", at("edge-patched circuit")));
            }
            let ab = AblatedSenders::new(model, &data, EdgeAblation::Counterfactual).unwrap();
            for variant in [EapVariant::Eap, EapVariant::IgInputs, EapVariant::IgActivations] {
                let o = EapIgOptions { variant, steps: 2, ..Default::default() };
                eap_ig(model, &data, &graph, &ab, &o, &|_, _| {}).unwrap_or_else(|e| panic!("{}: {e}", at(&format!("{variant:?}"))));
            }
        }
        let last = model.cfg.n_layers - 1;
        path_patch(model, &data, (0, 0), &[(last, 0, HeadInput::Q), (last, 0, HeadInput::K), (last, 0, HeadInput::V)])
            .unwrap_or_else(|e| panic!("{}: {e}", at("path patching")));
    }
    let toks: Vec<Vec<u32>> = vec![(0..12).map(|i| (i * 7 % 90) as u32 + 3).collect(); 2];
    detect_heads(model, &toks, &Detector::ALL, false, false).unwrap_or_else(|e| panic!("{name}: head detectors: {e}"));
    let prompt: Vec<u32> = (0..20).map(|i| (i * 11 % 90) as u32 + 3).collect();
    decode_with_copy_hits(model, &prompt, 5..9, 4, &[], 8, &mut Hooks::new()).unwrap_or_else(|e| panic!("{name}: KV-cache decoding: {e}"));
}

#[test]
fn every_method_on_every_family_under_strict_layouts() {
    set_strict(true);
    every_method("gpt2", &tiny_gpt2(DType::F32));
    for name in FAMILIES {
        every_method(name, &family(name, DType::F32));
    }
    // The rule is live: the layout that failed on the H200 is refused here.
    let z = Tensor::zeros((16, 15, 9, 64), DType::F32, &candle_core::Device::Cpu).unwrap();
    let w = Tensor::zeros((16, 64, 576), DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = ferrolens::model::layout::matmul(&z.narrow(2, 3, 1).unwrap().squeeze(2).unwrap(), &w).unwrap_err().to_string();
    assert!(e.contains("[8640, 576, 1]"), "{e}");
}
