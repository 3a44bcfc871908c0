//! `ferrolens patch`: activation patching, AtP and RelP on a JSONL file of pairs; with `--hooks`,
//! generic patching of any hook point over any axes.

use crate::study::{grid_heatmaps, scores_table, Bars};
use anyhow::Result;
use ferrolens_methods::study::{correlations, parse_rules, prepare, run_methods, Batching, Method, RunOptions};
use ferrolens_methods::{generic_patching, Component, Direction, PatchSpec, Sweep, SweepOptions};
use ferrolens_report::{Column, Table};
use ferrolens_tasks::{read_jsonl, PairBatch};

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
}

pub fn run(a: Args) -> Result<()> {
    let rules = parse_rules(&a.rules)?;
    let model = crate::load_model(&a.model)?;
    let pairs = read_jsonl(&a.data)?;
    let batch = PairBatch::new(model.tokenizer()?, pairs, &a.data.display().to_string())?;
    let direction = if a.noising { Direction::Noise } else { Direction::Denoise };
    crate::in_new_dir(&a.out, || match &a.hooks {
        Some(pattern) => generic(&a, &model, &batch, pattern, direction),
        None => by_component(&a, &model, &batch, rules, direction),
    })
}

/// `patch` of built-in components by the chosen methods.
fn by_component(a: &Args, model: &ferrolens_model::HookedTransformer, batch: &PairBatch, rules: ferrolens_model::LrpRules, direction: Direction) -> Result<()> {
    let prep = prepare(model, batch)?;
    // Residual-like components by position, as TL's sweeps; gradients at the corrupt run.
    let bars = Bars::new(a.quiet);
    let progress = |what: &str, done: usize, total: usize| bars.report(what, done, total);
    let opts = RunOptions { by_pos: a.by_pos, resid_by_pos: true, rules, direction, at_clean: false, batching: a.batching, progress: Some(&progress) };
    let run = run_methods(model, batch, &prep, &a.method, &a.component, &opts)?;
    bars.finish();
    let (grids, times, grouped) = (run.grids, run.times, run.grouped);
    ferrolens_report::write_table(&scores_table(&grids), &a.out.join("scores"))?;
    let tokens = model.to_str_tokens(&batch.pairs[0].clean)?;
    grid_heatmaps(&grids, &tokens, &a.out)?;
    let corr = correlations(&grids);
    let summary = serde_json::json!({
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
        "timings_s": times.iter().map(|(m, t)| (m.to_string(), serde_json::json!(t))).collect::<serde_json::Map<_, _>>(),
        "pearson_vs_act": corr.iter().map(|(m, c, r, n)| serde_json::json!({"method": m, "component": c, "r": r, "n": n})).collect::<Vec<_>>(),
    });
    std::fs::write(a.out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !a.quiet {
        eprintln!("clean logit diff {:.3}, corrupt {:.3}; wrote {}", prep.clean_value, prep.corrupt_value, a.out.display());
        for (m, c, r, _) in &corr {
            eprintln!("  pearson r({m}, act) on {c}: {r:.3}");
        }
    }
    Ok(())
}

/// `patch --hooks`: generic patching, checked before the sweep.
fn generic(a: &Args, model: &ferrolens_model::HookedTransformer, batch: &PairBatch, pattern: &str, direction: Direction) -> Result<()> {
    let hooks = model.hooks_matching(pattern)?;
    let labels = batch.label_indices();
    let axes = a.axis.iter().map(|s| Sweep::parse(s, &labels)).collect::<ferrolens_model::Result<Vec<_>>>()?;
    let prep = prepare(model, batch)?;
    let bars = Bars::new(a.quiet);
    let progress = |done: usize, total: usize| bars.report("patch", done, total);
    let t0 = std::time::Instant::now();
    let spec = PatchSpec { hooks, axes };
    let r = generic_patching(model, &prep.data(), &spec, &SweepOptions { direction, progress: Some(&progress), ..Default::default() })?;
    bars.finish();
    let rows = r.rows();
    let mut t = Table::new().col("hook", Column::Str(rows.iter().map(|r| r.0.clone()).collect()));
    for (i, ax) in r.axes.iter().enumerate() {
        t = t.col(ax.name(), Column::Str(rows.iter().map(|r| r.1[i].clone()).collect()));
    }
    t = t.col("score", Column::F64(rows.iter().map(|r| r.2).collect()));
    ferrolens_report::write_table(&t, &a.out.join("generic"))?;
    let summary = serde_json::json!({
        "model": model.cfg.name, "data": a.data.display().to_string(), "n_pairs": batch.len(), "seq_len": batch.seq_len(),
        "hooks": pattern, "n_hooks": r.hooks.len(), "axes": a.axis, "shape": r.values.shape(), "n_patches": rows.len(),
        "metric": "normalised logit difference (answer - wrong, last position)",
        "clean_logit_diff": prep.clean_value, "corrupt_logit_diff": prep.corrupt_value,
        "direction": if a.noising { "noising" } else { "denoising" }, "time_s": t0.elapsed().as_secs_f64(),
    });
    std::fs::write(a.out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !a.quiet {
        eprintln!("{} patches of {} hooks; wrote {}", rows.len(), r.hooks.len(), a.out.join("generic.csv").display());
    }
    Ok(())
}
