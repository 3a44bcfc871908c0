//! Shared pieces of the study commands: loading pairs, metrics, running methods, writing outputs.

use anyhow::{Context, Result};
use candle_core::Tensor;
use ferrolens_methods::{
    activation_patching, attribution, metric_of, AttributionOptions, Component, Direction, LogitDiff, Metric, Normalised, PatchingData, Positions, ScoreGrid,
    SweepOptions,
};
use ferrolens_model::{HookedTransformer, LrpRules, PadSide};
use ferrolens_report::{heatmap, Column, Heatmap, Table};
use ferrolens_tasks::PairBatch;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Tokens and metrics of a pair batch: one batch, left-padded with a mask when pairs differ in
/// length.
pub struct Prepared {
    pub clean: Tensor,
    pub corrupt: Tensor,
    /// Real tokens of the padded batch (`None`: every pair has one length).
    pub mask: Option<Tensor>,
    /// Per-position slots: every position when pairs share a length, else the common labels.
    pub positions: Positions,
    /// Left padding of each pair in the batch.
    pub pads: Vec<usize>,
    pub raw: Arc<LogitDiff>,
    pub metric: Normalised,
    pub clean_value: f64,
    pub corrupt_value: f64,
    /// Fraction of clean prompts where `logit[answer] > logit[wrong]`.
    pub clean_accuracy: f64,
}

impl Prepared {
    /// The patching data (normalised metric).
    pub fn data(&self) -> PatchingData<'_> {
        PatchingData::new(&self.clean, &self.corrupt, &self.metric).with_mask(self.mask.as_ref())
    }

    /// The same prompts under the raw logit difference.
    pub fn raw_data(&self) -> PatchingData<'_> {
        self.data().with_metric(self.raw.as_ref())
    }
}

pub fn prepare(model: &HookedTransformer, batch: &PairBatch) -> Result<Prepared> {
    prepare_as(model, batch, None, None)
}

/// [`prepare`], optionally normalising with given clean/corrupt values (a length group of a
/// larger set keeps the set's normalisation) and with given label names for positions.
fn prepare_as(model: &HookedTransformer, batch: &PairBatch, norm: Option<(f64, f64)>, labels: Option<&[String]>) -> Result<Prepared> {
    let (clean, corrupt, mask, positions) = if batch.uniform_len().is_some() {
        (model.tokens_tensor(&batch.clean)?, model.tokens_tensor(&batch.corrupt)?, None, Positions::Each)
    } else {
        let (c, m) = model.tokens_padded(&batch.clean, PadSide::Left)?;
        let (k, _) = model.tokens_padded(&batch.corrupt, PadSide::Left)?;
        (c, k, Some(m), Positions::Labels(batch.label_indices()))
    };
    let positions = match labels {
        Some(names) => Positions::Labels(batch.label_indices_for(names)),
        None => positions,
    };
    let raw = Arc::new(LogitDiff { answer: batch.answer.clone(), wrong: batch.wrong.clone() });
    let span = ferrolens_model::RunSpan { last_logits_only: true, mask: mask.clone(), ..Default::default() };
    let logits = model.run_span(Some(&clean), &span, &mut ferrolens_model::Hooks::new())?;
    let per = raw.per_row(&logits)?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    let clean_accuracy = per.iter().filter(|v| **v > 0.0).count() as f64 / per.len() as f64;
    let clean_value = per.iter().map(|v| *v as f64).sum::<f64>() / per.len() as f64;
    let corrupt_value = metric_of(model, &corrupt, mask.as_ref(), raw.as_ref())?;
    let (nc, nk) = norm.unwrap_or((clean_value, corrupt_value));
    let metric = Normalised::new(raw.clone(), nc, nk)?;
    let pads = (0..batch.len()).map(|i| batch.pad(i)).collect();
    Ok(Prepared { clean, corrupt, mask, positions, pads, raw, metric, clean_value, corrupt_value, clean_accuracy })
}

/// How prompt pairs of different lengths are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Batching {
    /// Group by length when padding would add more than [`GROUP_ABOVE`] of the real positions,
    /// else pad (docs/benchmarks.md has the measurements behind the threshold).
    Auto,
    /// One left-padded batch with a mask.
    Pad,
    /// One batch per token length, combined by the metric's averaging (a prompt-weighted mean).
    Group,
}

/// [`Batching::Auto`] groups by length above this padding overhead (padding positions over
/// real ones).
pub const GROUP_ABOVE: f64 = 0.25;

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

/// Run `methods` x `components`; returns grids and (method, seconds) timings. Per-position
/// scores are by position when every pair has one length, else by label (an error when the
/// pairs have no labels in common).
pub fn run_methods(
    model: &HookedTransformer,
    prep: &Prepared,
    methods: &[Method],
    components: &[Component],
    o: &RunOptions,
) -> Result<(Vec<ScoreGrid>, Vec<(String, f64)>)> {
    let (rules, direction, quiet) = (o.rules, o.direction, o.quiet);
    if (o.by_pos || o.resid_by_pos) && matches!(&prep.positions, Positions::Labels(l) if l.is_empty()) {
        anyhow::bail!(
            "the pairs have different token lengths and no labels in common, so there are no per-position scores to report; \
             give every pair `labels` (name -> token index, as `ferrolens data` writes), or pairs of one length, or drop --by-pos"
        );
    }
    let pos_for = |by: bool| if by { prep.positions.clone() } else { Positions::All };
    let pos_of = |c: &Component| pos_for(if c.has_heads() { o.by_pos } else { o.resid_by_pos });
    let data = prep.data();
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
                    let opts = SweepOptions { direction, progress: Some(&cb), ..Default::default() };
                    grids.push(activation_patching(model, &data, c, &pos_of(&c), &opts)?);
                    bar.finish_and_clear();
                }
            }
            Method::AtpQk | Method::AtpGd => {
                let (heads, resid): (Vec<Component>, Vec<Component>) = components.iter().partition(|c| c.has_heads());
                for (cs, by) in [(heads, o.by_pos), (resid, o.resid_by_pos)] {
                    for &c in &cs {
                        let opts = AttributionOptions { at_clean: o.at_clean, positions: pos_for(by), ..AttributionOptions::atp(&[c]) };
                        let mut g = if m == Method::AtpQk && matches!(c, Component::HeadQ | Component::HeadK) {
                            ferrolens_methods::qk_fix(model, &data, c, &pos_for(by))?
                        } else if m == Method::AtpGd {
                            ferrolens_methods::grad_drop(model, &data, &opts)?.remove(0)
                        } else {
                            attribution(model, &data, &opts)?.grids.remove(0)
                        };
                        g.method = m.name().to_string();
                        grids.push(g);
                    }
                }
            }
            Method::Atp | Method::Relp => {
                let r = if m == Method::Atp { LrpRules::NONE } else { rules };
                let (heads, resid): (Vec<Component>, Vec<Component>) = components.iter().partition(|c| c.has_heads());
                for (cs, by) in [(heads, o.by_pos), (resid, o.resid_by_pos)] {
                    if cs.is_empty() {
                        continue;
                    }
                    let opts = AttributionOptions {
                        components: cs.clone(),
                        rules: r,
                        at_clean: o.at_clean,
                        positions: pos_for(by),
                        name: Some(m.name().into()),
                        ..Default::default()
                    };
                    grids.extend(attribution(model, &data, &opts)?.grids);
                }
            }
        }
        times.push((m.name().to_string(), t0.elapsed().as_secs_f64()));
    }
    Ok((grids, times))
}

/// [`run_methods`] over pairs of any lengths: one padded batch, or one batch per length whose
/// grids are combined by the prompts' share (the metrics are means over prompts, so both give the
/// same numbers; tests/padding.rs). Returns grids, timings and whether it grouped.
#[allow(clippy::too_many_arguments)]
pub fn run_methods_batched(
    model: &HookedTransformer,
    batch: &PairBatch,
    prep: &Prepared,
    batching: Batching,
    methods: &[Method],
    components: &[Component],
    o: &RunOptions,
) -> Result<(Vec<ScoreGrid>, Vec<(String, f64)>, bool)> {
    let groups = batch.length_groups();
    let group = groups.len() > 1
        && match batching {
            Batching::Pad => false,
            Batching::Group => true,
            Batching::Auto => batch.padding_overhead() > GROUP_ABOVE,
        };
    if !group {
        let (g, t) = run_methods(model, prep, methods, components, o)?;
        return Ok((g, t, false));
    }
    let names = batch.common_labels();
    let n = batch.len() as f64;
    let mut grids: Option<Vec<ScoreGrid>> = None;
    let mut times: Vec<(String, f64)> = Vec::new();
    for (_, idx) in &groups {
        let sub = batch.subset(idx);
        let sp = prepare_as(model, &sub, Some((prep.clean_value, prep.corrupt_value)), Some(&names))?;
        let (g, t) = run_methods(model, &sp, methods, components, o)?;
        let w = idx.len() as f64 / n;
        match &mut grids {
            None => {
                let mut g = g;
                g.iter_mut().for_each(|g| g.values.iter_mut().for_each(|v| *v *= w));
                grids = Some(g);
                times = t;
            }
            Some(acc) => {
                for (a, b) in acc.iter_mut().zip(g) {
                    a.values.iter_mut().zip(b.values).for_each(|(x, y)| *x += w * y);
                }
                for (a, b) in times.iter_mut().zip(t) {
                    a.1 += b.1;
                }
            }
        }
    }
    Ok((grids.unwrap_or_default(), times, true))
}

/// The rows of all grids as the scores table (`method,component,layer,head,pos,score`, and
/// `label` when positions are labelled).
pub fn scores_table(grids: &[ScoreGrid]) -> Table {
    let rows: Vec<_> = grids.iter().flat_map(|g| g.rows()).collect();
    let mut t = Table::new()
        .col("method", Column::Str(rows.iter().map(|r| r.method.clone()).collect()))
        .col("component", Column::Str(rows.iter().map(|r| r.component.clone()).collect()))
        .col("layer", Column::OptU64(rows.iter().map(|r| Some(r.layer as u64)).collect()))
        .col("head", Column::OptU64(rows.iter().map(|r| r.head.map(|h| h as u64)).collect()))
        .col("pos", Column::OptU64(rows.iter().map(|r| r.pos.map(|p| p as u64)).collect()))
        .col("score", Column::F64(rows.iter().map(|r| r.score).collect()));
    // Pairs of different lengths score positions by label (IO, S1, S2, end, ...).
    if rows.iter().any(|r| r.label.is_some()) {
        t = t.col("label", Column::Str(rows.iter().map(|r| r.label.clone().unwrap_or_default()).collect()));
    }
    t
}

/// A heatmap per grid, as `DIR/heatmap_{method}_{component}.svg|png`; returns the stems.
pub fn grid_heatmaps(grids: &[ScoreGrid], tokens: &[String], dir: &Path) -> Result<Vec<(std::path::PathBuf, String)>> {
    let mut out = Vec::new();
    for g in grids {
        // Labelled positions (pairs of different lengths) are ticked by label.
        let (pos_label, pos_ticks) = if g.labels.is_empty() { ("position", tokens.to_vec()) } else { ("label", g.labels.clone()) };
        let (values, row_label, col_label, ticks): (Vec<Vec<f64>>, &str, &str, Vec<String>) = if g.component.has_heads() && !g.by_pos {
            ((0..g.n_layers).map(|l| (0..g.n_heads).map(|h| g.get(l, 0, h)).collect()).collect(), "layer", "head", vec![])
        } else if g.component.has_heads() {
            let v = (0..g.n_layers).flat_map(|l| (0..g.n_heads).map(move |h| (l, h))).map(|(l, h)| (0..g.n_pos).map(|p| g.get(l, p, h)).collect()).collect();
            (v, "layer * n_heads + head", pos_label, pos_ticks)
        } else {
            ((0..g.n_layers).map(|l| (0..g.n_pos).map(|p| g.get(l, p, 0)).collect()).collect(), "layer", pos_label, pos_ticks)
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
