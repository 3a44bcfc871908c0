//! Shared pieces of the study commands: loading pairs, metrics, running methods, writing outputs.

use anyhow::{Context, Result};
use candle_core::Tensor;
use ferrolens_methods::{
    activation_patching, attribution, metric_of, AttributionOptions, Component, Direction, LogitDiff, Metric, Normalised, PatchingData, ScoreGrid, SweepOptions,
};
use ferrolens_model::{HookedTransformer, LrpRules};
use ferrolens_report::{heatmap, Column, Heatmap, Table};
use ferrolens_tasks::PairBatch;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Tokens and metrics of a pair batch.
pub struct Prepared {
    pub clean: Tensor,
    pub corrupt: Tensor,
    pub raw: Arc<LogitDiff>,
    pub metric: Normalised,
    pub clean_value: f64,
    pub corrupt_value: f64,
    /// Fraction of clean prompts where `logit[answer] > logit[wrong]`.
    pub clean_accuracy: f64,
}

pub fn prepare(model: &HookedTransformer, batch: &PairBatch) -> Result<Prepared> {
    let clean = model.tokens_tensor(&batch.clean)?;
    let corrupt = model.tokens_tensor(&batch.corrupt)?;
    let raw = Arc::new(LogitDiff { answer: batch.answer.clone(), wrong: batch.wrong.clone() });
    let span = ferrolens_model::RunSpan { last_logits_only: true, ..Default::default() };
    let logits = model.run_span(Some(&clean), &span, &mut ferrolens_model::Hooks::new())?;
    let per = raw.per_row(&logits)?.to_vec1::<f32>()?;
    let clean_accuracy = per.iter().filter(|v| **v > 0.0).count() as f64 / per.len() as f64;
    let clean_value = per.iter().map(|v| *v as f64).sum::<f64>() / per.len() as f64;
    let corrupt_value = metric_of(model, &corrupt, raw.as_ref())?;
    let metric = Normalised::new(raw.clone(), clean_value, corrupt_value)?;
    Ok(Prepared { clean, corrupt, raw, metric, clean_value, corrupt_value, clean_accuracy })
}

/// Which methods to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Act,
    Atp,
    Relp,
    /// AtP* QK fix (heads_q / heads_k; plain AtP elsewhere).
    AtpQk,
    /// AtP* GradDrop.
    AtpGd,
}

impl Method {
    pub fn parse(s: &str) -> Result<Method> {
        Ok(match s {
            "act" => Method::Act,
            "atp" => Method::Atp,
            "relp" => Method::Relp,
            "atp_qk" | "atp-qk" => Method::AtpQk,
            "atp_graddrop" | "atp-graddrop" | "atp_gd" => Method::AtpGd,
            o => anyhow::bail!("unknown method `{o}`; use act, atp, relp, atp_qk (AtP* QK fix) or atp_graddrop (AtP* GradDrop)"),
        })
    }
    pub fn name(&self) -> &'static str {
        match self {
            Method::Act => "act",
            Method::Atp => "atp",
            Method::Relp => "relp",
            Method::AtpQk => "atp_qk",
            Method::AtpGd => "atp_graddrop",
        }
    }
}

pub fn parse_rules(s: &str) -> Result<LrpRules> {
    let mut r = LrpRules::NONE;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "ln" => r.ln = true,
            "identity" => r.identity = true,
            "half" => r.half = true,
            "attn" | "ah" => r.attn = true,
            "default" => r = LrpRules { attn: r.attn, ..LrpRules::RELP },
            o => anyhow::bail!("unknown LRP rule `{o}`; use ln, identity, half, attn (comma-separated) or default"),
        }
    }
    Ok(r)
}

/// How [`run_methods`] runs.
pub struct RunOptions {
    /// Head scores per position.
    pub by_pos: bool,
    /// Residual-like components per position (TL's sweeps) or over all positions (circuit nodes).
    pub resid_by_pos: bool,
    /// RelP rules.
    pub rules: LrpRules,
    /// Activation-patching direction.
    pub direction: Direction,
    /// Take AtP/RelP gradients at the clean run.
    pub at_clean: bool,
    /// No progress bars.
    pub quiet: bool,
}

/// Run `methods` x `components`; returns grids and (method, seconds) timings.
pub fn run_methods(
    model: &HookedTransformer,
    prep: &Prepared,
    methods: &[Method],
    components: &[Component],
    o: &RunOptions,
) -> Result<(Vec<ScoreGrid>, Vec<(String, f64)>)> {
    let (by_pos, rules, direction, quiet) = (o.by_pos, o.rules, o.direction, o.quiet);
    let pos_of = |c: &Component| {
        if c.has_heads() {
            by_pos
        } else {
            o.resid_by_pos
        }
    };
    let mut grids = Vec::new();
    let mut times = Vec::new();
    for &m in methods {
        let t0 = Instant::now();
        match m {
            Method::Act => {
                for &c in components {
                    let bar = crate::progress_bar(quiet, &format!("act {}", c.name()));
                    let cb = |done: usize, total: usize| {
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    };
                    let data = PatchingData { clean: &prep.clean, corrupt: &prep.corrupt, metric: &prep.metric };
                    let opts = SweepOptions { direction, progress: Some(&cb), ..Default::default() };
                    grids.push(activation_patching(model, &data, c, pos_of(&c), &opts)?);
                    bar.finish_and_clear();
                }
            }
            Method::AtpQk | Method::AtpGd => {
                let (heads, resid): (Vec<Component>, Vec<Component>) = components.iter().partition(|c| c.has_heads());
                for (cs, bp) in [(heads, by_pos), (resid, o.resid_by_pos)] {
                    let opts = AttributionOptions { rules: LrpRules::NONE, at_clean: o.at_clean, by_pos: bp };
                    for &c in &cs {
                        let mut g = if m == Method::AtpQk && matches!(c, Component::HeadQ | Component::HeadK) {
                            ferrolens_methods::qk_fix(model, &prep.clean, &prep.corrupt, &prep.metric, c, bp)?
                        } else if m == Method::AtpGd {
                            ferrolens_methods::grad_drop(model, &prep.clean, &prep.corrupt, &prep.metric, &[c], &opts)?.remove(0)
                        } else {
                            attribution(model, &prep.clean, &prep.corrupt, &prep.metric, &[c], m.name(), &opts)?.grids.remove(0)
                        };
                        g.method = m.name().to_string();
                        grids.push(g);
                    }
                }
            }
            Method::Atp | Method::Relp => {
                let r = if m == Method::Atp { LrpRules::NONE } else { rules };
                let (heads, resid): (Vec<Component>, Vec<Component>) = components.iter().partition(|c| c.has_heads());
                for (cs, bp) in [(heads, by_pos), (resid, o.resid_by_pos)] {
                    if cs.is_empty() {
                        continue;
                    }
                    let opts = AttributionOptions { rules: r, at_clean: o.at_clean, by_pos: bp };
                    grids.extend(attribution(model, &prep.clean, &prep.corrupt, &prep.metric, &cs, m.name(), &opts)?.grids);
                }
            }
        }
        times.push((m.name().to_string(), t0.elapsed().as_secs_f64()));
    }
    Ok((grids, times))
}

/// The rows of all grids as the scores table (`method,component,layer,head,pos,score`).
pub fn scores_table(grids: &[ScoreGrid]) -> Table {
    let rows: Vec<_> = grids.iter().flat_map(|g| g.rows()).collect();
    Table::new()
        .col("method", Column::Str(rows.iter().map(|r| r.method.clone()).collect()))
        .col("component", Column::Str(rows.iter().map(|r| r.component.clone()).collect()))
        .col("layer", Column::OptU64(rows.iter().map(|r| Some(r.layer as u64)).collect()))
        .col("head", Column::OptU64(rows.iter().map(|r| r.head.map(|h| h as u64)).collect()))
        .col("pos", Column::OptU64(rows.iter().map(|r| r.pos.map(|p| p as u64)).collect()))
        .col("score", Column::F64(rows.iter().map(|r| r.score).collect()))
}

/// A heatmap per grid, as `DIR/heatmap_{method}_{component}.svg|png`; returns the stems.
pub fn grid_heatmaps(grids: &[ScoreGrid], tokens: &[String], dir: &Path) -> Result<Vec<(std::path::PathBuf, String)>> {
    let mut out = Vec::new();
    for g in grids {
        let (values, row_label, col_label, ticks): (Vec<Vec<f64>>, &str, &str, Vec<String>) = if g.component.has_heads() && !g.by_pos {
            ((0..g.n_layers).map(|l| (0..g.n_heads).map(|h| g.get(l, 0, h)).collect()).collect(), "layer", "head", vec![])
        } else if g.component.has_heads() {
            let v = (0..g.n_layers).flat_map(|l| (0..g.n_heads).map(move |h| (l, h))).map(|(l, h)| (0..g.n_pos).map(|p| g.get(l, p, h)).collect()).collect();
            (v, "layer * n_heads + head", "position", tokens.to_vec())
        } else {
            ((0..g.n_layers).map(|l| (0..g.n_pos).map(|p| g.get(l, p, 0)).collect()).collect(), "layer", "position", tokens.to_vec())
        };
        let title = format!("{} on {}", g.method, g.component.name());
        let stem = dir.join(format!("heatmap_{}_{}", g.method, g.component.name()));
        heatmap(&Heatmap { title: title.clone(), values, row_label: row_label.into(), col_label: col_label.into(), col_ticks: ticks }, &stem)
            .with_context(|| format!("drawing {}", stem.display()))?;
        out.push((stem, title));
    }
    Ok(out)
}

/// Pearson r of each non-act method against act, per component.
pub fn correlations(grids: &[ScoreGrid]) -> Vec<(String, String, f64, usize)> {
    let mut out = Vec::new();
    for a in grids.iter().filter(|g| g.method == "act") {
        for o in grids.iter().filter(|g| g.method != "act" && g.component == a.component && g.by_pos == a.by_pos) {
            if o.values.len() == a.values.len() {
                out.push((o.method.clone(), a.component.name().to_string(), ferrolens_methods::pearson(&o.values, &a.values), a.values.len()));
            }
        }
    }
    out
}
