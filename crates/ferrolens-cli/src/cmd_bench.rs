//! `ferrolens bench`: timings that docs/benchmarks.md reports (JSON on stdout).

use anyhow::Result;
use candle_core::{Device, Tensor};
use ferrolens_methods::study::prepare;
use ferrolens_methods::{activation_patching, attribution, edge_attribution, AttributionOptions, Component, EdgeOptions, Positions, SweepOptions};
use ferrolens_model::{HookPoint, Hooks, KvCache, LrpRules};
use ferrolens_tasks::{read_jsonl, PairBatch};
use std::time::Instant;

/// Arguments of `ferrolens bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// Pairs (JSONL); the clean prompts are the forward batch.
    #[arg(long)]
    data: std::path::PathBuf,
    /// Repeats per timing (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// What to time (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Bench::Sgemm, Bench::Forward, Bench::Atp, Bench::Relp, Bench::Heads])]
    what: Vec<Bench>,
    /// Context length of the `decode` benchmark (prefill, then greedy decoding with a KV cache).
    #[arg(long, default_value_t = 2048)]
    decode_context: usize,
    /// Tokens decoded per `decode` timing.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
}

/// One benchmark of `ferrolens bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bench {
    /// A 1024x1024 f32 matmul (the device's GEMM rate).
    Sgemm,
    /// A plain forward and one caching every hook.
    Forward,
    /// AtP over heads, resid_pre, attn_out and mlp_out by position.
    Atp,
    /// RelP over the same components.
    Relp,
    /// Activation patching of every head (all positions).
    Heads,
    /// EAP over every edge (block and head-input receivers).
    Edges,
    /// Prefill and greedy decoding with a KV cache (fused and generic attention).
    Decode,
    /// MIB pieces: EAP, EAP-IG (5 steps, inputs) and one edge-patched circuit run (half the
    /// edges, random ranking).
    Circuits,
    /// AtP*: the QK fix on keys (all positions) and GradDrop on heads.
    AtpStar,
    /// Path patching of a mid-layer head into the last layer's head 0 (q, k, v).
    Path,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median wall time of `n` runs after a warm-up; waits for the device after each run.
fn time<F: FnMut() -> Result<()>>(dev: &Device, n: usize, mut f: F) -> Result<f64> {
    f()?; // warm-up
    dev.synchronize()?;
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

/// Prefill `context` tokens of the haystack, then decode `n` tokens greedily; returns
/// (prefill tokens/s, decode tokens/s).
fn decode_speed(model: &ferrolens_model::HookedTransformer, context: usize, n: usize, fused: bool) -> Result<(f64, f64)> {
    let tok = model.tokenizer()?;
    let mut ids = tok.encode(crate::cmd_heads::HAYSTACK)?;
    anyhow::ensure!(ids.len() >= context, "the haystack has {} tokens; ask for a shorter --decode-context", ids.len());
    ids.truncate(context);
    let dev = model.device();
    let mut kv = KvCache::new(model.cfg.n_layers).with_argmax().fused(fused);
    let mut hooks = Hooks::new();
    let t0 = Instant::now();
    let mut logits = model.prefill(&Tensor::new(ids.as_slice(), dev)?.unsqueeze(0)?, &mut kv, 512, &mut hooks)?;
    dev.synchronize()?;
    let prefill = context as f64 / t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..n {
        let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        let _ = kv.argmax_rows(0)?;
        logits = model.run_with_kv_cache(&Tensor::new(&[next], dev)?.unsqueeze(0)?, &mut kv, true, &mut hooks)?;
    }
    dev.synchronize()?;
    Ok((prefill, n as f64 / t1.elapsed().as_secs_f64()))
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.repeat > 0, "--repeat 0 times nothing; give --repeat 1 or more (the median of the repeats is reported)");
    let model = crate::load_model(&a.model)?;
    let batch = PairBatch::new(model.tokenizer()?, read_jsonl(&a.data)?, &a.data.display().to_string())?;
    let prep = prepare(&model, &batch)?;
    let (b, p) = (batch.len(), batch.seq_len());
    let flops = model.cfg.forward_flops(b, p);
    let dev = model.device();
    let mut out = serde_json::Map::new();
    out.insert("model".into(), model.cfg.name.clone().into());
    out.insert("device".into(), ferrolens_model::device_name(model.device()).into());
    out.insert("dtype".into(), format!("{:?}", model.dtype()).into());
    out.insert("batch".into(), b.into());
    out.insert("seq_len".into(), p.into());
    out.insert("threads".into(), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).into());
    out.insert("forward_gflop".into(), (flops / 1e9).into());
    for &w in &a.what {
        match w {
            Bench::Sgemm => {
                let n = 1024;
                let x = Tensor::randn(0f32, 1.0, (n, n), dev)?;
                let y = Tensor::randn(0f32, 1.0, (n, n), dev)?;
                let t = time(dev, a.repeat.max(5), || {
                    ferrolens_model::layout::matmul(&x, &y)?;
                    Ok(())
                })?;
                out.insert("sgemm_1024_gflops".into(), (2.0 * (n as f64).powi(3) / t / 1e9).into());
            }
            Bench::Forward => {
                let t = time(dev, a.repeat, || {
                    model.forward(&prep.clean)?;
                    Ok(())
                })?;
                out.insert("forward_s".into(), t.into());
                out.insert("forward_gflops".into(), (flops / t / 1e9).into());
                // Every hook that TL's run_with_cache returns (TL computes hook_result only with
                // use_attn_result=True, so it is left out here too).
                let all: Vec<HookPoint> = model.hook_points().into_iter().filter(|h| !matches!(h, HookPoint::Result(_))).collect();
                let t = time(dev, a.repeat, || {
                    let mut h = Hooks::new().cache_hooks(&all);
                    model.run(&prep.clean, &mut h)?;
                    Ok(())
                })?;
                out.insert("forward_full_cache_s".into(), t.into());
                out.insert("forward_full_cache_gflops".into(), (flops / t / 1e9).into());
            }
            Bench::Atp | Bench::Relp => {
                let rules = if w == Bench::Atp { LrpRules::NONE } else { LrpRules::RELP };
                let comps = [Component::HeadZ, Component::ResidPre, Component::AttnOut, Component::MlpOut];
                let t = time(dev, a.repeat, || {
                    attribution(
                        &model,
                        &prep.data(),
                        &AttributionOptions { components: comps.to_vec(), rules, positions: Positions::Each, ..Default::default() },
                    )?;
                    Ok(())
                })?;
                out.insert(format!("{}_s", if w == Bench::Atp { "atp" } else { "relp" }), t.into());
            }
            Bench::Heads => {
                let t0 = Instant::now();
                activation_patching(&model, &prep.data(), Component::HeadZ, &Positions::All, &SweepOptions::default())?;
                dev.synchronize()?;
                let t = t0.elapsed().as_secs_f64();
                // Each layer-L patch runs layers L.. of a forward of b rows: that share of the
                // forward's FLOPs (a fixed count across binaries; the work done is less, since
                // the last layer runs the last position alone and the unembedding reads only the
                // metric's columns).
                let n = model.cfg.n_layers as f64;
                let work: f64 = (0..model.cfg.n_layers).map(|l| (n - l as f64) / n).sum::<f64>() * model.cfg.n_heads as f64 * flops;
                out.insert("heads_all_pos_s".into(), t.into());
                out.insert("heads_all_pos_gflops".into(), (work / t / 1e9).into());
            }
            Bench::Decode => {
                for fused in [true, false] {
                    let (pre, dec) = decode_speed(&model, a.decode_context, a.decode_tokens, fused)?;
                    let tag = if fused { "fused" } else { "generic" };
                    out.insert(format!("prefill_{}_tokens_per_s", a.decode_context), pre.into());
                    out.insert(format!("decode_{}_{tag}_tokens_per_s", a.decode_context), dec.into());
                }
            }
            Bench::Edges => {
                // EAP over every edge, attention receivers per block and per head input.
                for (tag, head_inputs) in [("blocks", false), ("heads", true)] {
                    let t = time(dev, a.repeat, || {
                        edge_attribution(&model, &prep.data(), &EdgeOptions { head_inputs })?;
                        Ok(())
                    })?;
                    out.insert(format!("edges_{tag}_s"), t.into());
                }
            }
            Bench::AtpStar => {
                use ferrolens_methods::atp_star::{grad_drop, qk_fix};
                let t = time(dev, a.repeat, || {
                    qk_fix(&model, &prep.data(), Component::HeadK, &Positions::All)?;
                    Ok(())
                })?;
                out.insert("atp_qk_fix_s".into(), t.into());
                let t = time(dev, a.repeat, || {
                    grad_drop(&model, &prep.data(), &AttributionOptions::atp(&[Component::HeadZ]))?;
                    Ok(())
                })?;
                out.insert("atp_graddrop_s".into(), t.into());
            }
            Bench::Path => {
                use ferrolens_methods::{path_patch, HeadInput};
                let n = model.cfg.n_layers;
                let recv = [(n - 1, 0, HeadInput::Q), (n - 1, 0, HeadInput::K), (n - 1, 0, HeadInput::V)];
                let t = time(dev, a.repeat, || {
                    path_patch(&model, &prep.data(), (n / 2, 0), &recv)?;
                    Ok(())
                })?;
                out.insert("path_patch_s".into(), t.into());
            }
            Bench::Circuits => {
                use ferrolens_methods::eap_ig::{eap_ig, EapIgOptions, EapVariant};
                use ferrolens_methods::edge_circuit::{edge_patched_metric, AblatedSenders, EdgeAblation, EdgeGraph};
                let data = prep.raw_data();
                let g = EdgeGraph::new(&model, true);
                let ab = AblatedSenders::new(&model, &data, EdgeAblation::Counterfactual)?;
                for (tag, variant) in [("eap", EapVariant::Eap), ("eap_ig", EapVariant::IgInputs)] {
                    let t = time(dev, a.repeat, || {
                        eap_ig(&model, &data, &g, &ab, &EapIgOptions { variant, ..Default::default() }, &|_, _| {})?;
                        Ok(())
                    })?;
                    out.insert(format!("{tag}_s"), t.into());
                }
                let half = g.top_n(&ferrolens_methods::mib::random_scores(&g, 0), g.len() / 2, false)?;
                let t = time(dev, a.repeat, || {
                    edge_patched_metric(&model, &data, &g, &half, &ab)?;
                    Ok(())
                })?;
                out.insert("edge_patched_run_s".into(), t.into());
                out.insert("edges".into(), g.len().into());
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&serde_json::Value::Object(out))?);
    Ok(())
}
