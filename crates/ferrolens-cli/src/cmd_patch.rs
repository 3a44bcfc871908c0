//! `ferrolens patch`: activation patching, AtP and RelP on a JSONL file of pairs; with `--hooks`,
//! generic patching of any hook point over any axes.

use crate::parts::{join_values, sha256_file, to_part_values, write_part, Manifest, Part};
use crate::study::{grid_heatmaps, scores_table, Bars};
use anyhow::{bail, Result};
use ferrolens_methods::shard::Shard;
use ferrolens_methods::study::{correlations, parse_rules, planned_grids, prepare, run_methods, Batching, Method, Prepared, RunOptions};
use ferrolens_methods::{generic_patching, Component, Direction, PatchSpec, ScoreGrid, Sweep, SweepOptions};
use ferrolens_model::HookedTransformer;
use ferrolens_report::{Column, Table};
use ferrolens_tasks::{read_jsonl, PairBatch};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Arguments of `ferrolens patch`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a registry name, a .gguf file, a HF directory or a hub id.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// JSONL of {"clean","corrupt","answer","wrong"[,"labels"]}; a pair's two prompts of one token
    /// length; pairs of different lengths are padded, and then per-position scores are by label.
    #[arg(long)]
    data: std::path::PathBuf,
    /// Methods, comma-separated (atp_qk: AtP* QK fix; atp_graddrop: AtP* GradDrop).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "act,atp,relp")]
    method: Vec<Method>,
    /// Components, comma-separated (heads = hook_z).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "heads,resid_pre,attn_out,mlp_out")]
    component: Vec<Component>,
    /// Head scores per position too (residual-like components are always per position).
    #[arg(long)]
    by_pos: bool,
    /// Patch corrupt activations into the clean run (noising) instead of clean into corrupt.
    #[arg(long)]
    noising: bool,
    /// RelP rules: ln, identity, half, attn (comma-separated); `default` = ln,identity,half.
    #[arg(long, default_value = "default")]
    rules: String,
    /// Pairs of different lengths: one padded batch, one batch per length, or whichever
    /// the padding overhead favours (same numbers either way).
    #[arg(long, value_enum, default_value_t = Batching::Auto)]
    batching: Batching,
    /// Generic patching instead of the methods: the hook points to patch, a TL name with `*` for
    /// any layer (e.g. `blocks.*.attn.hook_pattern`, `blocks.5.mlp.hook_post`). Writes
    /// generic.csv/.parquet (hook, one column per axis, score).
    #[arg(long, conflicts_with_all = ["method", "component", "by_pos"])]
    hooks: Option<String>,
    /// With --hooks: an axis to sweep (repeat for several; axes not given are patched whole):
    /// `head`, `pos`, `dest_pos`, `src_pos`, `neuron`, each optionally `=3,7` (indices),
    /// `=0..256,256..512` (ranges) or `=IO,S2` (position labels of the data).
    #[arg(long, requires = "hooks")]
    axis: Vec<String>,
    /// Output directory.
    #[arg(long)]
    out: std::path::PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Print summary.json to stdout.
    #[arg(long)]
    json: bool,
    /// Compute shard I of N (0-based) of the sweep's rows (round robin over the rows an unsharded
    /// run writes) and write them with a manifest to OUT/shard.json; `ferrolens merge` joins the
    /// N parts into exactly the unsharded outputs. Activation patching runs only this shard's
    /// patches (docs/scale-out.md).
    #[arg(long)]
    shard: Option<Shard>,
    /// Print the work units (and this shard's share), a time estimate from one timed forward and
    /// a memory estimate, then stop.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(a: Args) -> Result<()> {
    let rules = parse_rules(&a.rules)?;
    let model = crate::load_model(&a.model)?;
    let pairs = read_jsonl(&a.data)?;
    let batch = PairBatch::new(model.tokenizer()?, pairs, &a.data.display().to_string())?;
    let direction = if a.noising { Direction::Noise } else { Direction::Denoise };
    if a.dry_run {
        return dry_run(&a, &model, &batch, rules);
    }
    crate::in_new_dir(&a.out, || match &a.hooks {
        Some(pattern) => generic(&a, &model, &batch, pattern, rules, direction),
        None => by_component(&a, &model, &batch, rules, direction),
    })
}

/// What a `patch` shard carries for the merge: the rows it owns and everything the outputs of an
/// unsharded run are drawn from.
#[derive(Serialize, Deserialize)]
pub(crate) enum PatchPayload {
    /// `patch --method ... --component ...`.
    Components {
        /// String tokens of the first clean prompt (heatmap ticks).
        tokens: Vec<String>,
        /// summary.json without timings and correlations.
        base: serde_json::Value,
        /// Seconds per method in this shard.
        times: Vec<(String, f64)>,
        /// The grids with this shard's values (None elsewhere).
        grids: Vec<(ScoreGrid, Vec<Option<f64>>)>,
    },
    /// `patch --hooks ...`.
    Generic {
        /// Column names: hook, the axes.
        columns: Vec<String>,
        /// Every row's hook and axis labels.
        keys: Vec<Vec<String>>,
        /// This shard's scores (None elsewhere).
        scores: Vec<Option<f64>>,
        /// summary.json.
        summary: serde_json::Value,
    },
}

/// The options of a `patch` run that change its results (a shard manifest's `options`).
fn options_of(a: &Args, rules: ferrolens_model::LrpRules) -> serde_json::Value {
    serde_json::json!({
        "method": a.method.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
        "component": a.component.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "by_pos": a.by_pos, "noising": a.noising, "rules": rules, "batching": format!("{:?}", a.batching),
        "hooks": a.hooks, "axis": a.axis,
    })
}

/// Write a shard's part into `out` (after its results are computed).
fn write_shard(
    a: &Args,
    model: &HookedTransformer,
    rules: ferrolens_model::LrpRules,
    shard: Shard,
    units: usize,
    seconds: f64,
    payload: PatchPayload,
) -> Result<()> {
    let manifest = Manifest {
        data: a.data.display().to_string(),
        data_sha256: sha256_file(&a.data)?,
        options: options_of(a, rules),
        ..Manifest::new("patch", shard, model, units, "row % N == I over the rows of the unsharded scores table", seconds)?
    };
    write_part(&a.out, &Part { manifest, payload })?;
    if !a.quiet {
        eprintln!("shard {shard}: {} of {units} rows in {seconds:.1} s; wrote {}", shard.count_of(units), a.out.join(crate::parts::PART_FILE).display());
    }
    Ok(())
}

/// `patch` of built-in components by the chosen methods.
fn by_component(a: &Args, model: &HookedTransformer, batch: &PairBatch, rules: ferrolens_model::LrpRules, direction: Direction) -> Result<()> {
    let t0 = Instant::now();
    let prep = prepare(model, batch)?;
    // Residual-like components by position, as TL's sweeps; gradients at the corrupt run.
    let bars = Bars::new(a.quiet);
    let progress = |what: &str, done: usize, total: usize| bars.report(what, done, total);
    let opts =
        RunOptions { by_pos: a.by_pos, resid_by_pos: true, rules, direction, at_clean: false, batching: a.batching, progress: Some(&progress), shard: a.shard };
    let run = run_methods(model, batch, &prep, &a.method, &a.component, &opts)?;
    bars.finish();
    let (grids, grouped) = (run.grids, run.grouped);
    let times: Vec<(String, f64)> = run.times.iter().map(|(m, t)| (m.to_string(), *t)).collect();
    let tokens = model.to_str_tokens(&batch.pairs[0].clean)?;
    let base = serde_json::json!({
        "model": model.cfg.name,
        "data": a.data.display().to_string(),
        "n_pairs": batch.len(),
        "seq_len": batch.seq_len(),
        "uniform_length": batch.uniform_len().is_some(),
        "batching": if grouped { "group" } else { "pad" },
        "padding_overhead": batch.padding_overhead(),
        "metric": "normalised logit difference (answer - wrong, last position)",
        "clean_logit_diff": prep.clean_value,
        "corrupt_logit_diff": prep.corrupt_value,
        "clean_accuracy": prep.clean_accuracy,
        "direction": if a.noising { "noising" } else { "denoising" },
        "relp_rules": rules,
    });
    if let Some(shard) = a.shard {
        let units = grids.iter().map(|g| g.values.len()).sum();
        let grids = grids.into_iter().map(|g| (ScoreGrid { values: vec![], ..g.clone() }, to_part_values(&g.values))).collect();
        return write_shard(a, model, rules, shard, units, t0.elapsed().as_secs_f64(), PatchPayload::Components { tokens, base, times, grids });
    }
    write_components(&a.out, &grids, &tokens, base, &times, None, a.json, a.quiet)
}

/// The outputs of `patch` by component (an unsharded run, or the merge of its shards):
/// scores.csv/.parquet, heatmaps, summary.json.
#[allow(clippy::too_many_arguments)]
fn write_components(
    out: &Path,
    grids: &[ScoreGrid],
    tokens: &[String],
    base: serde_json::Value,
    times: &[(String, f64)],
    shards: Option<usize>,
    json: bool,
    quiet: bool,
) -> Result<()> {
    ferrolens_report::write_table(&scores_table(grids), &out.join("scores"))?;
    grid_heatmaps(grids, tokens, out)?;
    let corr = correlations(grids);
    let mut summary = base;
    summary["timings_s"] = times.iter().map(|(m, t)| (m.clone(), serde_json::json!(t))).collect::<serde_json::Map<_, _>>().into();
    summary["pearson_vs_act"] = corr.iter().map(|(m, c, r, n)| serde_json::json!({"method": m, "component": c, "r": r, "n": n})).collect::<Vec<_>>().into();
    if let Some(n) = shards {
        summary["shards"] = n.into();
        summary["timings_note"] = "timings_s: summed over the shards".into();
    }
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !quiet {
        let (c, k) = (summary["clean_logit_diff"].as_f64().unwrap_or(f64::NAN), summary["corrupt_logit_diff"].as_f64().unwrap_or(f64::NAN));
        eprintln!("clean logit diff {c:.3}, corrupt {k:.3}; wrote {}", out.display());
        for (m, c, r, _) in &corr {
            eprintln!("  pearson r({m}, act) on {c}: {r:.3}");
        }
    }
    Ok(())
}

/// `ferrolens merge` of `patch` parts (already checked to be every shard of one sweep, in order).
pub(crate) fn merge(parts: Vec<Part<PatchPayload>>, out: &Path, json: bool, quiet: bool) -> Result<()> {
    let n = parts.len();
    let secs: f64 = parts.iter().map(|p| p.manifest.seconds).sum();
    let mut payloads = parts.into_iter().map(|p| p.payload);
    match payloads.next() {
        Some(PatchPayload::Components { tokens, base, mut times, grids }) => {
            let rest: Vec<_> = payloads
                .map(|p| match p {
                    PatchPayload::Components { times, grids, .. } => Ok((times, grids)),
                    PatchPayload::Generic { .. } => bail!("the parts mix `patch --hooks` and `patch --method` runs; merge the parts of one sweep"),
                })
                .collect::<Result<_>>()?;
            let mut merged = Vec::with_capacity(grids.len());
            let mut offset = 0;
            for (gi, (meta, v0)) in grids.iter().enumerate() {
                let mut all: Vec<&[Option<f64>]> = vec![v0];
                for (_, g) in &rest {
                    let (m, v) =
                        g.get(gi).ok_or_else(|| anyhow::anyhow!("the parts hold different numbers of score grids; they are not shards of one sweep"))?;
                    if m != meta {
                        bail!(
                            "the parts' grid {gi} differs ({} on {} vs {} on {}); they are not shards of one sweep",
                            meta.method,
                            meta.component.name(),
                            m.method,
                            m.component.name()
                        );
                    }
                    all.push(v);
                }
                merged.push(ScoreGrid { values: join_values(&all, offset)?, ..meta.clone() });
                offset += v0.len();
            }
            for (t, _) in &rest {
                for (acc, (_, s)) in times.iter_mut().zip(t) {
                    acc.1 += s;
                }
            }
            crate::in_new_dir(out, || write_components(out, &merged, &tokens, base, &times, Some(n), json, quiet))
        }
        Some(PatchPayload::Generic { columns, keys, scores, mut summary }) => {
            summary["time_s"] = secs.into();
            let mut all: Vec<Vec<Option<f64>>> = vec![scores];
            for p in payloads {
                match p {
                    PatchPayload::Generic { keys: k, scores, .. } if k == keys => all.push(scores),
                    _ => bail!("the parts hold different patch sweeps; merge the parts of one sweep"),
                }
            }
            let refs: Vec<&[Option<f64>]> = all.iter().map(|v| v.as_slice()).collect();
            let scores = join_values(&refs, 0)?;
            crate::in_new_dir(out, || write_generic(out, &columns, &keys, &scores, summary, Some(n), json, quiet))
        }
        None => bail!("no parts to merge"),
    }
}

/// `patch --dry-run`: the work units, this shard's share, and estimates.
fn dry_run(a: &Args, model: &HookedTransformer, batch: &PairBatch, rules: ferrolens_model::LrpRules) -> Result<()> {
    let prep = prepare(model, batch)?;
    let shard = a.shard.unwrap_or(Shard { index: 0, count: 1 });
    if let Some(pattern) = &a.hooks {
        timed_forward(model, &prep, "patch")?;
        let hooks = model.hooks_matching(pattern)?;
        println!(
            "generic patching of {} hook points over axes {:?}: the units are its patches (known once the axes are resolved on the activations)",
            hooks.len(),
            a.axis
        );
        println!("shard {shard} owns every {}th patch starting at {}", shard.count, shard.index);
        return Ok(());
    }
    let opts = RunOptions { by_pos: a.by_pos, rules, batching: a.batching, ..Default::default() };
    print_estimates(model, &prep, &a.method, &a.component, &opts, shard, "patch")
}

/// One timed forward of `prep`'s corrupt batch (after a warm-up), printed with what it is for.
pub(crate) fn timed_forward(model: &HookedTransformer, prep: &ferrolens_methods::study::Prepared, command: &str) -> Result<f64> {
    let (b, p) = (prep.clean.dim(0)?, prep.clean.dim(1)?);
    let span = ferrolens_model::RunSpan { last_logits_only: true, mask: prep.mask.clone(), ..Default::default() };
    model.run_span(Some(&prep.corrupt), &span, &mut ferrolens_model::Hooks::new())?;
    let t0 = Instant::now();
    model.run_span(Some(&prep.corrupt), &span, &mut ferrolens_model::Hooks::new())?;
    let t_fwd = t0.elapsed().as_secs_f64();
    let devices: Vec<String> = model.stages().iter().map(|s| s.device.clone()).collect();
    println!("{command} on {} ({}): {b} pairs of {p} tokens; one forward of the batch took {t_fwd:.3} s here", model.cfg.name, devices.join(","));
    Ok(t_fwd)
}

/// The dry run of a node sweep (`patch`, `discover`'s scores): rows per (method, component) and
/// this shard's share, a time estimate from one timed forward, a memory estimate per device.
pub(crate) fn print_estimates(
    model: &HookedTransformer,
    prep: &ferrolens_methods::study::Prepared,
    methods: &[Method],
    components: &[Component],
    opts: &RunOptions,
    shard: Shard,
    command: &str,
) -> Result<()> {
    let t_fwd = timed_forward(model, prep, command)?;
    let (b, p) = (prep.clean.dim(0)?, prep.clean.dim(1)?);
    let n_layers = model.cfg.n_layers;
    let plan = planned_grids(model, prep, methods, components, opts);
    let total: usize = plan.iter().map(|g| g.rows()).sum();
    println!("{:<14} {:<10} {:>8} {:>12}", "method", "component", "rows", format!("shard {shard}"));
    let (mut offset, mut est, mut act_patches) = (0, 0.0, 0);
    for g in &plan {
        let owned: Vec<usize> = (0..g.rows()).filter(|u| shard.owns(offset + u)).collect();
        println!("{:<14} {:<10} {:>8} {:>12}", g.method.to_string(), g.component.name(), g.rows(), owned.len());
        if g.method == Method::Act {
            // A patch at layer l runs the blocks from l on: (L - l) / L of a forward.
            est += owned.iter().map(|u| t_fwd * (n_layers - u / g.rows_per_layer) as f64 / n_layers as f64).sum::<f64>();
            act_patches += owned.len();
        }
        offset += g.rows();
    }
    // A gradient method costs about a forward and a backward of clean and corrupt runs.
    let grad_methods = methods.iter().filter(|m| **m != Method::Act).count();
    est += grad_methods as f64 * 4.0 * t_fwd;
    println!("work units: {total} rows; shard {shard} owns {} ({act_patches} activation patches of {b} prompts each)", shard.count_of(total));
    println!(
        "time estimate for shard {shard}: about {:.0} s (one forward per patch from its layer on; batching many patches per forward usually makes it faster)",
        est
    );
    let dtype_bytes = model.dtype().size_in_bytes();
    let fwd = ferrolens_model::plan::PlanOptions { dtype_bytes, batch: 256, seq: p, ..Default::default() };
    let grad = ferrolens_model::plan::PlanOptions { dtype_bytes, batch: b, seq: p, grads: true, ..Default::default() };
    // Per device of a split model (--devices): the largest stage.
    let dev: Vec<String> = model.stages().iter().map(|s| s.device.clone()).collect();
    let most = |o: &ferrolens_model::plan::PlanOptions| -> Result<f64> {
        Ok(ferrolens_model::plan::memory_plan(&model.cfg, &dev, o)?.iter().map(|d| d.total()).fold(0.0, f64::max))
    };
    let m1 = most(&fwd)?;
    let m2 = if grad_methods > 0 { most(&grad)? } else { 0.0 };
    println!(
        "memory estimate: {:.2} GiB{} (weights + the larger of a 256-row patched forward and {})",
        m1.max(m2) / (1u64 << 30) as f64,
        if dev.len() > 1 { " on the fullest device" } else { "" },
        if grad_methods > 0 { "a gradient run" } else { "nothing" }
    );
    Ok(())
}

/// `patch --hooks`: generic patching, checked before the sweep.
fn generic(a: &Args, model: &HookedTransformer, batch: &PairBatch, pattern: &str, rules: ferrolens_model::LrpRules, direction: Direction) -> Result<()> {
    let hooks = model.hooks_matching(pattern)?;
    let labels = batch.label_indices();
    let axes = a.axis.iter().map(|s| Sweep::parse(s, &labels)).collect::<ferrolens_model::Result<Vec<_>>>()?;
    let prep = prepare(model, batch)?;
    let bars = Bars::new(a.quiet);
    let progress = |done: usize, total: usize| bars.report("patch", done, total);
    let t0 = Instant::now();
    let spec = PatchSpec { hooks, axes };
    let owned = |u: usize| a.shard.is_none_or(|s| s.owns(u));
    let only: Option<&(dyn Fn(usize) -> bool + Sync)> = if a.shard.is_some() { Some(&owned) } else { None };
    let r = generic_patching(model, &prep.data(), &spec, &SweepOptions { direction, progress: Some(&progress), only, ..Default::default() })?;
    bars.finish();
    let rows = r.rows();
    let mut columns = vec!["hook".to_string()];
    columns.extend(r.axes.iter().map(|ax| ax.name().to_string()));
    let keys: Vec<Vec<String>> = rows.iter().map(|r| std::iter::once(r.0.clone()).chain(r.1.iter().cloned()).collect()).collect();
    let scores: Vec<f64> = rows.iter().map(|r| r.2).collect();
    let summary = summary_generic(a, model, batch, &prep, pattern, &r, rows.len(), t0.elapsed().as_secs_f64());
    if let Some(shard) = a.shard {
        let payload = PatchPayload::Generic { columns, keys, scores: to_part_values(&scores), summary };
        return write_shard(a, model, rules, shard, rows.len(), t0.elapsed().as_secs_f64(), payload);
    }
    write_generic(&a.out, &columns, &keys, &scores, summary, None, a.json, a.quiet)
}

/// summary.json of `patch --hooks`.
#[allow(clippy::too_many_arguments)]
fn summary_generic(
    a: &Args,
    model: &HookedTransformer,
    batch: &PairBatch,
    prep: &Prepared,
    pattern: &str,
    r: &ferrolens_methods::PatchResult,
    n: usize,
    secs: f64,
) -> serde_json::Value {
    serde_json::json!({
        "model": model.cfg.name, "data": a.data.display().to_string(), "n_pairs": batch.len(), "seq_len": batch.seq_len(),
        "hooks": pattern, "n_hooks": r.hooks.len(), "axes": a.axis, "shape": r.values.shape(), "n_patches": n,
        "metric": "normalised logit difference (answer - wrong, last position)",
        "clean_logit_diff": prep.clean_value, "corrupt_logit_diff": prep.corrupt_value,
        "direction": if a.noising { "noising" } else { "denoising" }, "time_s": secs,
    })
}

/// The outputs of `patch --hooks` (an unsharded run, or the merge of its shards): generic.csv/.parquet, summary.json.
#[allow(clippy::too_many_arguments)]
fn write_generic(
    out: &Path,
    columns: &[String],
    keys: &[Vec<String>],
    scores: &[f64],
    mut summary: serde_json::Value,
    shards: Option<usize>,
    json: bool,
    quiet: bool,
) -> Result<()> {
    let mut t = Table::new();
    for (i, c) in columns.iter().enumerate() {
        t = t.col(c, Column::Str(keys.iter().map(|k| k[i].clone()).collect()));
    }
    t = t.col("score", Column::F64(scores.to_vec()));
    ferrolens_report::write_table(&t, &out.join("generic"))?;
    if let Some(n) = shards {
        summary["shards"] = n.into();
        summary["time_note"] = "time_s: summed over the shards".into();
    }
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !quiet {
        eprintln!("{} patches of {} hooks; wrote {}", scores.len(), summary["n_hooks"], out.join("generic.csv").display());
    }
    Ok(())
}
