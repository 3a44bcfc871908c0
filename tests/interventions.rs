//! Interventions, start/stop spans and cache files, checked against identities that hold exactly.

mod common;
use candle_core::{DType, IndexOp, Tensor, D};
use common::*;
use ferrolens::model::{ActivationCache, HookPoint, Hooks, Intervention, Patch, RunSpan};

fn setup() -> (ferrolens::model::HookedTransformer, Tensor, Tensor) {
    let model = tiny_gpt2(DType::F32);
    let r = reference("tiny-gpt2/reference.safetensors");
    let clean = ids(&r, "p3.input_ids");
    // A corrupt prompt of the same length: the same ids shifted by one.
    let corrupt = ((clean.to_dtype(DType::F32).unwrap() + 1.0).unwrap()).to_dtype(DType::U32).unwrap();
    (model, clean, corrupt)
}

#[test]
fn zero_ablating_a_head_removes_exactly_its_result() {
    let (model, clean, _) = setup();
    let mut h = Hooks::new().cache_hooks(&[HookPoint::Result(1)]);
    model.run(&clean, &mut h).unwrap();
    let result = h.cache_ref().get(HookPoint::Result(1)).unwrap().clone(); // [1,p,h,D]
    let head2 = result.i((.., .., 2, ..)).unwrap();
    let ablated = model.run(&clean, &mut Hooks::new().patch(Patch::new(HookPoint::Z(1), Intervention::Zero).heads(&[2]))).unwrap();
    let subtracted = model.run(&clean, &mut Hooks::new().patch(Patch::new(HookPoint::AttnOut(1), Intervention::Add(head2.neg().unwrap())))).unwrap();
    assert!(max_abs(&ablated, &subtracted) < 1e-4);
    let plain = model.forward(&clean).unwrap();
    assert!(max_abs(&ablated, &plain) > 1e-2, "ablation had no effect");
}

#[test]
fn patching_all_of_resid_pre_0_recovers_the_clean_run() {
    let (model, clean, corrupt) = setup();
    let mut h = Hooks::new().cache("blocks.0.hook_resid_pre").unwrap();
    let clean_logits = model.run(&clean, &mut h).unwrap();
    let cache = h.take_cache();
    let patched = model
        .run(&corrupt, &mut Hooks::new().patch(Patch::new(HookPoint::ResidPre(0), Intervention::from_cache(&cache, HookPoint::ResidPre(0)).unwrap())))
        .unwrap();
    assert_eq!(max_abs(&patched, &clean_logits), 0.0);
    let corrupt_logits = model.forward(&corrupt).unwrap();
    assert!(max_abs(&corrupt_logits, &clean_logits) > 1e-2);
}

#[test]
fn position_restricted_patch_changes_only_those_positions() {
    let (model, clean, _) = setup();
    let p = clean.dim(1).unwrap();
    let plain = model.forward(&clean).unwrap();
    // After the last block nothing mixes positions: a patch of resid_post at position 2 changes
    // the logits there and nowhere else.
    // Not a constant vector: LayerNorm would remove that.
    let delta = Tensor::arange(0f32, 64.0, model.device()).unwrap();
    let patched = model.run(&clean, &mut Hooks::new().patch(Patch::new(HookPoint::ResidPost(1), Intervention::Add(delta)).positions(&[2]))).unwrap();
    for pos in 0..p {
        let d = max_abs(&plain.i((.., pos)).unwrap(), &patched.i((.., pos)).unwrap());
        if pos == 2 {
            assert!(d > 1e-3, "position 2 unchanged");
        } else {
            assert_eq!(d, 0.0, "position {pos} changed");
        }
    }
    // Scale(0) equals Zero, restricted to a head of hook_v.
    let a = model.run(&clean, &mut Hooks::new().patch(Patch::new(HookPoint::V(0), Intervention::Scale(0.0)).heads(&[1]))).unwrap();
    let b = model.run(&clean, &mut Hooks::new().patch(Patch::new(HookPoint::V(0), Intervention::Zero).heads(&[1]))).unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
}

#[test]
fn mean_ablation_and_closures() {
    let (model, clean, corrupt) = setup();
    let batch = Tensor::cat(&[&clean, &corrupt], 0).unwrap();
    let mut h = Hooks::new().cache_hooks(&[HookPoint::MlpOut(0)]);
    model.run(&batch, &mut h).unwrap();
    let mean = h.cache_ref().get(HookPoint::MlpOut(0)).unwrap().mean(0).unwrap(); // [p, D]
    let a = model.run(&batch, &mut Hooks::new().patch(Patch::new(HookPoint::MlpOut(0), Intervention::MeanAblate(mean.clone())))).unwrap();
    let m2 = mean.clone();
    let b = model
        .run(&batch, &mut Hooks::new().patch(Patch::new(HookPoint::MlpOut(0), Intervention::func(move |x, _| m2.broadcast_as(x.shape())?.contiguous()))))
        .unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
    // Mean ablation makes the two rows' MLP outputs equal, so it changes both logits rows.
    let plain = model.forward(&batch).unwrap();
    assert!(max_abs(&a, &plain) > 1e-3);
    // A closure that returns the wrong shape is an error, not a panic.
    let e = model
        .run(&clean, &mut Hooks::new().patch(Patch::new(HookPoint::MlpOut(0), Intervention::func(|x, _| x.sum_keepdim(D::Minus1)))))
        .unwrap_err()
        .to_string();
    assert!(e.contains("returned shape"), "{e}");
    let e = model
        .run(&clean, &mut Hooks::new().patch(Patch::new(HookPoint::MlpOut(0), Intervention::Add(Tensor::zeros(3, DType::F32, model.device()).unwrap()))))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not broadcast"), "{e}");
}

#[test]
fn start_and_stop_at_layer() {
    let (model, clean, _) = setup();
    let mut h = Hooks::new().cache("blocks.1.hook_resid_pre").unwrap();
    let full = model.run(&clean, &mut h).unwrap();
    let resid1 = h.cache_ref().get(HookPoint::ResidPre(1)).unwrap().clone();
    let stopped = model.run_span(Some(&clean), &RunSpan { stop_at_layer: Some(1), ..Default::default() }, &mut Hooks::new()).unwrap();
    assert_eq!(max_abs(&stopped, &resid1), 0.0);
    let resumed = model.run_span(None, &RunSpan { start: Some((1, resid1)), ..Default::default() }, &mut Hooks::new()).unwrap();
    assert_eq!(max_abs(&resumed, &full), 0.0);
}

#[test]
fn cache_filters_and_safetensors_round_trip() {
    let (model, clean, _) = setup();
    let mut h = Hooks::new().cache("blocks.*.attn.hook_pattern,re:^blocks\\.1\\.hook_resid_(pre|post)$").unwrap();
    model.run(&clean, &mut h).unwrap();
    let cache = h.take_cache();
    let names: Vec<String> = cache.keys().map(|k| k.to_string()).collect();
    assert_eq!(names, ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"]);
    // Patterns are distributions over keys.
    let sums = cache.get(HookPoint::Pattern(1)).unwrap().sum(D::Minus1).unwrap();
    let ones = sums.ones_like().unwrap();
    assert!(max_abs(&sums, &ones) < 1e-5);
    let path = std::env::temp_dir().join(format!("ferrolens-cache-{}.safetensors", std::process::id()));
    cache.save_safetensors(&path).unwrap();
    let back = ActivationCache::load_safetensors(&path, model.device()).unwrap();
    assert_eq!(back.len(), 4);
    for (k, v) in cache.iter() {
        assert_eq!(max_abs(v, back.get(*k).unwrap()), 0.0);
    }
    std::fs::remove_file(path).ok();
    let e = cache.by_name("blocks.0.hook_mlp_out").unwrap_err().to_string();
    assert!(e.contains("not in the cache"), "{e}");
}
