//! `ferrolens device-check`: the same computations on the CPU in f32 and on `--device` in
//! `--dtype`, compared number by number (logits, a residual cache, a cache of every hook, the
//! exact head sweep, AtP, RelP, AtP*, EAP with both receiver kinds, EAP-IG and an edge-patched
//! circuit, path patching, the head detectors, retrieval decoding) and timed. Exits with an error when an f32 difference exceeds
//! `--tol`. scripts/gpu-check.sh runs it on a GPU machine; CI runs it on the CPU in bf16 so that
//! the mixed-precision path does not rot.

use crate::cmd_discover::TaskArgs;
use anyhow::{bail, Result};
use ferrolens_methods::atp_star::{grad_drop, qk_fix};
use ferrolens_methods::eap_ig::{eap_ig, EapIgOptions, EapVariant};
use ferrolens_methods::edge_circuit::{edge_patched_metric, AblatedSenders, EdgeAblation, EdgeGraph};
use ferrolens_methods::heads::{detect_heads, Detector};
use ferrolens_methods::retrieval::{build_prompt, decode_with_copy_hits, default_needles, stop_tokens, PromptFormat};
use ferrolens_methods::study::prepare;
use ferrolens_methods::{activation_patching, attribution, AttributionOptions, Component, Positions, ScoreGrid, SweepOptions};
use ferrolens_methods::{edge_attribution, path_patch, EdgeOptions, HeadInput};
use ferrolens_model::{device_name, load, DType, Device, HookPoint, HookedTransformer, Hooks, LoadOptions, LrpRules, Tensor};
use ferrolens_tasks::PairBatch;
use std::time::Instant;

/// Arguments of `ferrolens device-check`.
#[derive(clap::Args)]
pub struct Args {
    /// Model.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    #[command(flatten)]
    task: TaskArgs,
    /// Largest allowed |device - cpu| for f32 (logits, patching and attribution scores).
    #[arg(long, default_value_t = 1e-3)]
    tol: f64,
    /// Context of the retrieval decoding check.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Checks to run: logits, cache, cache_all (every hook point), heads (exact head sweep, the
    /// slowest), atp, relp, atp_star (QK fix and GradDrop), eap (block and head receivers),
    /// circuits (EAP-IG and an edge-patched circuit), path (path patching), detect (head
    /// detectors), decode.
    #[arg(long, value_delimiter = ',', default_values_t = CHECKS.map(String::from))]
    what: Vec<String>,
    /// Where to write device_check.json (stdout only when absent).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Every check, in the order they run.
const CHECKS: [&str; 12] = ["logits", "cache", "cache_all", "heads", "atp", "relp", "atp_star", "eap", "circuits", "path", "detect", "decode"];

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn grid_diff(a: &ScoreGrid, b: &ScoreGrid) -> f64 {
    a.values.iter().zip(&b.values).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Cache `hooks` on `tokens[0]` with the CPU model and `tokens[1]` with the device model: the
/// largest difference relative to each tensor's scale (at least 1), and both times.
fn cache_diff(cpu: &HookedTransformer, dev: &HookedTransformer, tokens: [&Tensor; 2], hooks: &[HookPoint]) -> Result<(f64, f64, f64)> {
    let (cc, cd, tc, td) = both(cpu, dev, |m, i| {
        let mut h = Hooks::new().cache_hooks(hooks);
        m.run(tokens[i], &mut h)?;
        Ok(h.take_cache())
    })?;
    let mut d = 0f64;
    for h in hooks {
        let (x, y) = (cc.get(*h)?, cd.get(*h)?);
        let scale = x.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?.max(1.0);
        d = d.max(max_abs(x, y)? / scale);
    }
    Ok((d, tc, td))
}

/// Run `f` on both models, time each (waiting for the device), and return both results.
/// `f(model, i)` gets i = 0 for the CPU model, 1 for the device model.
fn both<T>(cpu: &HookedTransformer, dev: &HookedTransformer, mut f: impl FnMut(&HookedTransformer, usize) -> Result<T>) -> Result<(T, T, f64, f64)> {
    let t = Instant::now();
    let a = f(cpu, 0)?;
    let tc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let b = f(dev, 1)?;
    dev.device().synchronize()?;
    let td = t.elapsed().as_secs_f64();
    Ok((a, b, tc, td))
}

pub fn run(a: Args) -> Result<()> {
    if let Some(bad) = a.what.iter().find(|w| !CHECKS.contains(&w.as_str())) {
        bail!("unknown check `{bad}`: use {}", CHECKS.join(", "));
    }
    let target = crate::LOAD_OPTIONS.get().cloned().unwrap_or_default();
    let cpu = load(&a.model, &LoadOptions::default())?;
    let dev = load(&a.model, &target)?;
    let f32_run = target.dtype == DType::F32 || target.dtype == DType::F64;
    // bf16/f16 weights round every matmul input: report their differences, judge only f32.
    let tol = if f32_run { a.tol } else { f64::INFINITY };
    let mut rows = serde_json::Map::new();
    let mut failures: Vec<String> = vec![];
    let mut check = |rows: &mut serde_json::Map<String, serde_json::Value>, name: &str, diff: f64, tc: f64, td: f64| {
        rows.insert(name.into(), serde_json::json!({"max_abs_diff": diff, "cpu_s": tc, "device_s": td}));
        if diff.is_nan() || diff > tol {
            failures.push(format!("{name}: {diff:.3e} > {tol:.0e}"));
        }
    };

    let pairs = a.task.pairs(&cpu)?;
    let batch = PairBatch::new(cpu.tokenizer()?, pairs, &a.task.task)?;
    let (pc, pd, tc, td) = both(&cpu, &dev, |m, _| Ok(prepare(m, &batch)?))?;
    let logits_c = cpu.forward(&pc.clean)?;
    let logits_d = dev.forward(&pd.clean)?;
    // Logits are compared after removing each row's mean (softmax-invariant), as the HF parity tests.
    let centre = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        Ok(t.broadcast_sub(&t.mean_keepdim(candle_core::D::Minus1)?)?)
    };
    check(&mut rows, "logits", max_abs(&centre(&logits_c)?, &centre(&logits_d)?)?, tc, td);
    check(&mut rows, "logit_diff_metric", (pc.clean_value - pd.clean_value).abs(), 0.0, 0.0);

    let want = |w: &str| a.what.iter().any(|x| x == w);
    let hooks: Vec<HookPoint> = (0..cpu.cfg.n_layers).step_by(7).map(HookPoint::ResidPost).collect();
    let prep = [&pc, &pd];
    if want("cache") {
        let (d, tc, td) = cache_diff(&cpu, &dev, [&pc.clean, &pd.clean], &hooks)?;
        check(&mut rows, "resid_post_cache_relative", d, tc, td);
    }
    if want("heads") {
        let (gc, gd, tc, td) = both(&cpu, &dev, |m, i| {
            let p = prep[i];
            Ok(activation_patching(m, &p.data(), Component::HeadZ, &Positions::All, &SweepOptions::default())?)
        })?;
        check(&mut rows, "head_sweep_scores", grid_diff(&gc, &gd), tc, td);
    }
    for (name, rules) in [("atp", LrpRules::NONE), ("relp", LrpRules::RELP)].into_iter().filter(|(n, _)| want(n)) {
        let comps = [Component::HeadZ, Component::ResidPre, Component::MlpOut];
        let (ac, ad, tc, td) = both(&cpu, &dev, |m, i| {
            let p = prep[i];
            let opts = AttributionOptions { components: comps.to_vec(), rules, positions: Positions::Each, name: Some(name.into()), ..Default::default() };
            Ok(attribution(m, &p.data(), &opts)?)
        })?;
        let d = ac.grids.iter().zip(&ad.grids).map(|(x, y)| grid_diff(x, y)).fold(0.0, f64::max);
        check(&mut rows, &format!("{name}_scores"), d, tc, td);
    }

    if want("cache_all") {
        let (d, tc, td) = cache_diff(&cpu, &dev, [&pc.clean, &pd.clean], &cpu.hook_points())?;
        check(&mut rows, "cache_every_hook_relative", d, tc, td);
    }
    if want("atp_star") {
        let (gc, gd, tc, td) = both(&cpu, &dev, |m, i| {
            let data = prep[i].data();
            let mut g = vec![qk_fix(m, &data, Component::HeadK, &Positions::All)?];
            g.extend(grad_drop(m, &data, &AttributionOptions::atp(&[Component::HeadZ]))?);
            Ok(g)
        })?;
        let d = gc.iter().zip(&gd).map(|(x, y)| grid_diff(x, y)).fold(0.0, f64::max);
        check(&mut rows, "atp_star_scores", d, tc, td);
    }
    if want("eap") {
        for head_inputs in [false, true] {
            let (ec, ed, tc, td) = both(&cpu, &dev, |m, i| Ok(edge_attribution(m, &prep[i].data(), &EdgeOptions { head_inputs })?))?;
            let d = ec.iter().zip(&ed).map(|(x, y)| (x.score - y.score).abs()).fold(0.0, f64::max);
            check(&mut rows, if head_inputs { "eap_head_receivers" } else { "eap_block_receivers" }, d, tc, td);
        }
    }
    if want("circuits") {
        let (sc, sd, tc, td) = both(&cpu, &dev, |m, i| {
            let data = prep[i].raw_data();
            let graph = EdgeGraph::new(m, true);
            let ab = AblatedSenders::new(m, &data, EdgeAblation::Counterfactual)?;
            let mut s = eap_ig(m, &data, &graph, &ab, &EapIgOptions { variant: EapVariant::IgInputs, steps: 2, ..Default::default() }, &|_, _| {})?;
            let half: Vec<bool> = (0..graph.len()).map(|e| e % 2 == 0).collect();
            s.extend(edge_patched_metric(m, &data, &graph, &half, &ab)?);
            Ok(s)
        })?;
        let d = sc.iter().zip(&sd).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        check(&mut rows, "eap_ig_and_edge_patched_circuit", d, tc, td);
    }
    if want("path") {
        let n = cpu.cfg.n_layers;
        let recv = [(n - 1, 0, HeadInput::Q), (n - 1, 0, HeadInput::K), (n - 1, 0, HeadInput::V)];
        let (vc, vd, tc, td) = both(&cpu, &dev, |m, i| Ok(path_patch(m, &prep[i].data(), (n / 2, 0), &recv)?))?;
        check(&mut rows, "path_patching", (vc - vd).abs(), tc, td);
    }
    if want("detect") {
        // Repeated random-ish ordinary tokens (a repeat makes induction and duplicate heads fire).
        let v = cpu.cfg.d_vocab as u32;
        let toks: Vec<Vec<u32>> = (0..4).map(|r| (0..40).map(|i| (v / 2 + ((i % 20) * 37 + r * 11) as u32) % v).collect()).collect();
        let (dc, dd, tc, td) = both(&cpu, &dev, |m, _| Ok(detect_heads(m, &toks, &Detector::ALL, false, false)?))?;
        let d = dc.iter().flatten().flatten().zip(dd.iter().flatten().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        check(&mut rows, "head_detector_scores", d, tc, td);
    }
    if want("decode") {
        let tok = cpu.tokenizer()?;
        let hay = tok.encode(crate::cmd_heads::HAYSTACK)?;
        let needle = &default_needles()[0];
        let p = build_prompt(tok, &PromptFormat::for_tokenizer(tok), &hay, needle, a.context, 0.5)?;
        let stop = stop_tokens(&cpu);
        let (rc, rd, tc, td) = both(&cpu, &dev, |m, _| Ok(decode_with_copy_hits(m, &p.ids, p.answer_span.clone(), 24, &stop, 512, &mut Hooks::new())?))?;
        let same_tokens = rc.generated == rd.generated;
        let hit_diff = rc.hits.iter().flatten().zip(rd.hits.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        rows.insert(
            "retrieval_decode".into(),
            serde_json::json!({"same_tokens": same_tokens, "max_hit_diff": hit_diff, "cpu_s": tc, "device_s": td,
                           "cpu_tokens_per_s": rc.generated.len() as f64 / tc, "device_tokens_per_s": rd.generated.len() as f64 / td}),
        );
        if f32_run && !same_tokens {
            failures.push("retrieval decoding generated different tokens".into());
        }
    }

    let report = serde_json::json!({
        "model": cpu.cfg.name,
        "device": device_name(dev.device()),
        // With --devices: the pipeline's stages (layers per device).
        "stages": dev.stages().iter().map(|s| serde_json::json!({"device": s.device, "layers": [s.layers.start, s.layers.end]})).collect::<Vec<_>>(),
        "dtype": format!("{:?}", target.dtype),
        "pairs": batch.len(),
        "tolerance": if f32_run { serde_json::json!(a.tol) } else { serde_json::json!("reported only (half precision)") },
        "checks": rows,
        "failures": failures,
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("device_check.json"), &text)?;
    }
    if !failures.is_empty() {
        bail!("{} check(s) above tolerance: {}", failures.len(), failures.join("; "));
    }
    Ok(())
}
