//! Models split across devices (issue 16, `--devices`): a pipeline of contiguous blocks of
//! layers gives the unsplit model's numbers.
//!
//! Two CPU handles are one device to candle, so a split across `cpu,cpu` checks the plumbing
//! (every method, bit for bit) but cannot see a tensor left on the wrong device. The second
//! split puts alternate stages in f64 ([`Place`]): a tensor that reaches a stage without being
//! moved there is then a dtype error on the CPU, as it would be a device error across GPUs, and
//! the numbers agree to the f32/f64 rounding. Every family's tiny checkpoint runs every method
//! both ways; SmolLM2 runs the patching study (act, AtP, RelP) and a sharded-looking load
//! ([`LoadOptions::split`]) straight onto its stages.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use ferrolens::methods::atp_star::{grad_drop, qk_fix};
use ferrolens::methods::circuit::{discover, DiscoverOptions};
use ferrolens::methods::eap_ig::{eap_ig, EapIgOptions, EapVariant};
use ferrolens::methods::edge_circuit::{edge_patched_metric, AblatedSenders, EdgeAblation, EdgeGraph};
use ferrolens::methods::heads::{detect_heads, Detector};
use ferrolens::methods::retrieval::decode_with_copy_hits;
use ferrolens::methods::study::{prepare, run_methods, Method, RunOptions};
use ferrolens::methods::{edge_attribution, path_patch, EdgeOptions, HeadInput};
use ferrolens::model::pipeline::Place;
use ferrolens::model::{load, HookPoint, LoadOptions};
use ferrolens::prelude::*;
use ferrolens::tasks::{read_jsonl, PairBatch};

fn pairs() -> (Tensor, Tensor) {
    let clean = Tensor::new(&[[3u32, 17, 40, 5, 88, 17, 9], [12, 7, 61, 30, 2, 7, 44]], &Device::Cpu).unwrap();
    let corrupt = Tensor::new(&[[3u32, 17, 40, 5, 88, 52, 9], [12, 7, 61, 30, 2, 90, 44]], &Device::Cpu).unwrap();
    (clean, corrupt)
}

/// Every number the library's methods produce on `model`, in a fixed order, with labels.
fn every_number(model: &HookedTransformer) -> Vec<(String, Vec<f64>)> {
    let (clean, corrupt) = pairs();
    let metric = LogitDiff { answer: vec![5, 9], wrong: vec![17, 40] };
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let flat = |t: &Tensor| -> Vec<f64> { t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    for (padded, data) in [(false, PatchingData::new(&clean, &corrupt, &metric)), (true, PatchingData::new(&clean, &corrupt, &metric).with_mask(Some(&mask)))] {
        let at = |what: &str| format!("padded {padded}: {what}");
        // Logits, and a cache of every hook point (a split model's cache is split).
        let mut hooks = Hooks::new().cache_hooks(&model.hook_points());
        let logits = model.run_span(Some(&clean), &data.span(false), &mut hooks).unwrap_or_else(|e| panic!("{}: {e}", at("cache")));
        assert!(logits.device().same_device(model.device()), "logits come back on the home device");
        out.push((at("logits"), flat(&logits)));
        for h in model.hook_points() {
            out.push((at(&h.to_string()), flat(hooks.cache_ref().get(h).unwrap())));
        }
        // Gradients at every residual and head hook, through the stage boundaries.
        let points: Vec<HookPoint> = (0..model.cfg.n_layers).flat_map(|l| [HookPoint::ResidPre(l), HookPoint::Z(l), HookPoint::MlpOut(l)]).collect();
        let mut gh = Hooks::new().grad(&points);
        let g = model
            .run_span_with_grads(Some(&clean), &data.span(false), &mut gh, |lg| Ok(data.metric.per_row(lg)?.mean_all()?))
            .unwrap_or_else(|e| panic!("{}: {e}", at("grads")));
        out.push((at("metric"), vec![g.metric]));
        for h in &points {
            out.push((at(&format!("grad {h}")), flat(&g.grads[h])));
        }
        let sweep = SweepOptions { max_rows: 16, ..Default::default() };
        for c in [Component::HeadZ, Component::HeadQ, Component::HeadPattern, Component::ResidPre, Component::AttnOut, Component::MlpOut] {
            let g = activation_patching(model, &data, c, &Positions::Each, &sweep).unwrap_or_else(|e| panic!("{}: {e}", at(&format!("act {}", c.name()))));
            out.push((at(&format!("act {}", c.name())), g.values));
        }
        let comps = [Component::HeadZ, Component::HeadQ, Component::HeadK, Component::HeadV, Component::ResidPre, Component::AttnOut, Component::MlpOut];
        for opts in [AttributionOptions::atp(&comps), AttributionOptions::relp(&comps)] {
            for g in attribution(model, &data, &opts).unwrap_or_else(|e| panic!("{}: {e}", at("AtP/RelP"))).grids {
                out.push((at(&format!("{} {}", g.method, g.component.name())), g.values));
            }
        }
        out.push((at("AtP* QK"), qk_fix(model, &data, Component::HeadK, &Positions::Each).unwrap_or_else(|e| panic!("{}: {e}", at("AtP* QK"))).values));
        for g in grad_drop(model, &data, &AttributionOptions::atp(&[Component::HeadZ])).unwrap_or_else(|e| panic!("{}: {e}", at("GradDrop"))) {
            out.push((at("GradDrop"), g.values));
        }
        for head_inputs in [true, false] {
            let e = edge_attribution(model, &data, &EdgeOptions { head_inputs }).unwrap_or_else(|e| panic!("{}: {e}", at("EAP")));
            out.push((at(&format!("EAP heads {head_inputs}")), e.iter().map(|e| e.score).collect()));
            let graph = EdgeGraph::new(model, head_inputs);
            for ablation in [EdgeAblation::Counterfactual, EdgeAblation::Mean] {
                let ab = AblatedSenders::new(model, &data, ablation).unwrap();
                let half: Vec<bool> = (0..graph.len()).map(|i| i % 2 == 0).collect();
                let v = edge_patched_metric(model, &data, &graph, &half, &ab).unwrap_or_else(|e| panic!("{}: {e}", at("edge-patched circuit")));
                out.push((at(&format!("circuit {head_inputs} {ablation:?}")), v));
            }
            let ab = AblatedSenders::new(model, &data, EdgeAblation::Counterfactual).unwrap();
            for variant in [EapVariant::Eap, EapVariant::IgInputs, EapVariant::IgActivations] {
                let o = EapIgOptions { variant, steps: 2, ..Default::default() };
                let v = eap_ig(model, &data, &graph, &ab, &o, &|_, _| {}).unwrap_or_else(|e| panic!("{}: {e}", at(&format!("{variant:?}"))));
                out.push((at(&format!("{variant:?} {head_inputs}")), v));
            }
        }
        let last = model.cfg.n_layers - 1;
        let pp = path_patch(model, &data, (0, 0), &[(last, 0, HeadInput::Q), (last, 0, HeadInput::K), (last, 0, HeadInput::V)])
            .unwrap_or_else(|e| panic!("{}: {e}", at("path patching")));
        out.push((at("path patching"), vec![pp]));
    }
    let toks: Vec<Vec<u32>> = vec![(0..12).map(|i| (i * 7 % 90) as u32 + 3).collect(); 2];
    let d = detect_heads(model, &toks, &Detector::ALL, false, false).unwrap_or_else(|e| panic!("head detectors: {e}"));
    out.push(("head detectors".into(), d.into_iter().flatten().flatten().collect()));
    let prompt: Vec<u32> = (0..20).map(|i| (i * 11 % 90) as u32 + 3).collect();
    let r = decode_with_copy_hits(model, &prompt, 5..9, 4, &[], 8, &mut Hooks::new()).unwrap_or_else(|e| panic!("KV-cache decoding: {e}"));
    out.push(("decoded tokens".into(), r.generated.iter().map(|&t| t as f64).collect()));
    out.push(("copy hits".into(), r.hits.into_iter().flatten().collect()));
    out
}

/// The largest difference of `got` from `want`, relative to each series' largest magnitude
/// (+1), with the label where it is; the series must match in names and lengths.
fn worst(want: &[(String, Vec<f64>)], got: &[(String, Vec<f64>)]) -> (f64, String) {
    assert_eq!(want.len(), got.len());
    let mut worst = (0f64, String::new());
    for ((n, a), (m, b)) in want.iter().zip(got) {
        assert_eq!(n, m);
        assert_eq!(a.len(), b.len(), "{n}: lengths differ");
        let scale = 1.0 + a.iter().filter(|x| x.is_finite()).fold(0f64, |s, x| s.max(x.abs()));
        for (x, y) in a.iter().zip(b) {
            if x.is_nan() || y.is_nan() || x.is_infinite() || y.is_infinite() {
                assert!(x == y || (x.is_nan() && y.is_nan()), "{n}: {x} vs {y}");
                continue;
            }
            let d = (x - y).abs() / scale;
            if d > worst.0 {
                worst = (d, n.clone());
            }
        }
    }
    worst
}

fn stages_for(model: &HookedTransformer, tagged: bool) -> Vec<Place> {
    let k = model.cfg.n_layers.min(3);
    (0..k).map(|i| Place { device: Device::Cpu, dtype: if tagged && i % 2 == 1 { DType::F64 } else { DType::F32 } }).collect()
}

#[test]
fn every_method_on_every_family_split_across_stages() {
    let mut models = vec![("gpt2".to_string(), tiny_gpt2(DType::F32))];
    models.extend(FAMILIES.iter().map(|n| (n.to_string(), family(n, DType::F32))));
    for (name, model) in models {
        let want = every_number(&model);
        // Two CPU handles: the same numbers, bit for bit up to 1e-6.
        let split = model.split(&vec![Device::Cpu; model.cfg.n_layers.min(3)]).unwrap();
        assert!(!split.is_split(), "cpu handles are one device");
        let (d, at) = worst(&want, &every_number(&split));
        assert!(d < 1e-6, "{name}: cpu,cpu split differs by {d} at {at}");
        // Alternate stages in f64: every boundary is crossed by an explicit move.
        let places = stages_for(&model, true);
        let tagged = model.split_places(&places).unwrap();
        assert!(tagged.is_split());
        let st = tagged.stages();
        assert_eq!(st.len(), places.len(), "{name}: {st:?}");
        assert!(st[0].embed && st[st.len() - 1].unembed);
        assert_eq!(st.iter().map(|s| s.layers.len()).sum::<usize>(), model.cfg.n_layers);
        assert_eq!(tagged.layer_place(model.cfg.n_layers - 1).dtype, places[places.len() - 1].dtype);
        let (d, at) = worst(&want, &every_number(&tagged));
        eprintln!("{name}: f32/f64 split, largest relative difference {d:.2e} ({at})");
        assert!(d < 1e-5, "{name}: the f32/f64 split differs by {d} (relative) at {at}");
    }
}

#[test]
fn a_block_with_weights_in_two_places_is_refused() {
    let model = tiny_gpt2(DType::F32);
    let mut w = model.w.clone();
    w.blocks[1].mlp.w_out = w.blocks[1].mlp.w_out.to_dtype(DType::F64).unwrap();
    let e = HookedTransformer::new(model.cfg.clone(), w).unwrap_err().to_string();
    assert!(e.contains("block 1's W_out") && e.contains("split"), "{e}");
    let e = model.split(&[Device::Cpu, Device::Cpu, Device::Cpu]).unwrap_err().to_string();
    assert!(e.contains("2 layers") && e.contains("at most 2 devices"), "{e}");
    let o = LoadOptions { devices: vec![Device::Cpu, Device::Cpu], dtype: DType::F64, ..LoadOptions::on(Device::Cpu, DType::F32) };
    // `device` agrees with devices[0] (both cpu): loads, split.
    let m = ferrolens::model::load_hf_dir(&fixtures().join("tiny-gpt2"), &o).unwrap();
    assert_eq!(m.stages().len(), 1, "cpu handles are one stage");
    assert_eq!(m.dtype(), DType::F64);
}

#[test]
fn smollm2_patching_study_split_equals_unsplit() {
    let model = smollm2();
    let pairs = read_jsonl(&fixtures().join("smollm2/ioi4.jsonl")).unwrap();
    let batch = PairBatch::new(model.tokenizer().unwrap(), pairs, "ioi4").unwrap();
    let prep = prepare(model, &batch).unwrap();
    let methods = [Method::Act, Method::Atp, Method::Relp];
    let components = [Component::MlpOut, Component::HeadZ, Component::ResidPre];
    let o = RunOptions { resid_by_pos: false, ..Default::default() };
    let run = |m: &HookedTransformer| -> Vec<(String, Vec<f64>)> {
        let prep = prepare(m, &batch).unwrap();
        run_methods(m, &batch, &prep, &methods, &components, &o)
            .unwrap()
            .grids
            .into_iter()
            .map(|g| (format!("{} {}", g.method, g.component.name()), g.values))
            .collect()
    };
    let want = run_methods(model, &batch, &prep, &methods, &components, &o)
        .unwrap()
        .grids
        .into_iter()
        .map(|g| (format!("{} {}", g.method, g.component.name()), g.values))
        .collect::<Vec<_>>();
    assert!(want[0].1.iter().any(|v| v.abs() > 0.05), "the sweep moves the metric");
    // Loaded straight onto four stages (cpu handles), and split f32/f64/f32/f64 after loading.
    let four = load("smollm2-135m", &LoadOptions::default().split(&[Device::Cpu, Device::Cpu, Device::Cpu, Device::Cpu])).unwrap();
    let (d, at) = worst(&want, &run(&four));
    assert!(d < 1e-6, "a four-stage load differs by {d} at {at}");
    let places: Vec<Place> = (0..4).map(|i| Place { device: Device::Cpu, dtype: if i % 2 == 1 { DType::F64 } else { DType::F32 } }).collect();
    let tagged = model.split_places(&places).unwrap();
    let st = tagged.stages();
    assert_eq!(st.iter().map(|s| s.layers.clone()).collect::<Vec<_>>(), vec![0..8, 8..16, 16..23, 23..30]);
    let (d, at) = worst(&want, &run(&tagged));
    eprintln!("SmolLM2 f32/f64 split: largest relative difference {d:.2e} ({at})");
    assert!(d < 1e-4, "the f32/f64 split differs by {d} (relative) at {at}");
    // A whole discovery (AtP ranking, mean-ablation faithfulness scan, EAP edges, head classes).
    let o = DiscoverOptions { method: Method::Atp, top_k: Some(12), ..Default::default() };
    let (x, y) = (discover(model, &batch, "ioi4", &o).unwrap(), discover(&tagged, &batch, "ioi4", &o).unwrap());
    assert_eq!(x.nodes, y.nodes);
    let d = (x.circuit.faithfulness - y.circuit.faithfulness).abs();
    assert!(d < 1e-4 && x.circuit.faithfulness.is_finite(), "faithfulness {} vs {}", x.circuit.faithfulness, y.circuit.faithfulness);
    let top = |e: &[ferrolens::methods::Edge]| e.iter().take(20).map(|e| (e.sender, e.receiver)).collect::<Vec<_>>();
    assert_eq!(top(&x.edges), top(&y.edges));
    // A KV-cache decode of the split model: the same tokens.
    let prompt = model.encode_prompt("The capital of France is Paris. The capital of Italy is").unwrap();
    let a = decode_with_copy_hits(model, &prompt, 0..3, 6, &[], 8, &mut Hooks::new()).unwrap();
    let b = decode_with_copy_hits(&tagged, &prompt, 0..3, 6, &[], 8, &mut Hooks::new()).unwrap();
    assert_eq!(a.generated, b.generated);
    assert_eq!(a.hits, b.hits);
}
