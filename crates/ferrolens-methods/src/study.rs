//! Running several methods over a set of prompt pairs: the pieces `ferrolens patch` and
//! [`crate::circuit::discover`] share, as library calls.
//!
//! ```no_run
//! # use ferrolens_methods::study::*;
//! # use ferrolens_methods::Component;
//! # fn f(model: &ferrolens_model::HookedTransformer, batch: &ferrolens_tasks::PairBatch) -> ferrolens_model::Result<()> {
//! let prep = prepare(model, batch)?; // tokens (left-padded when lengths differ), metrics
//! let opts = RunOptions { by_pos: true, ..Default::default() };
//! let run = run_methods(model, batch, &prep, &[Method::Act, Method::Atp], &[Component::HeadZ], &opts)?;
//! for (method, component, r, n) in correlations(&run.grids) {
//!     println!("{method} vs act on {component}: r = {r:.3} over {n}");
//! }
//! # Ok(()) }
//! ```

use crate::atp_star::{grad_drop, qk_fix};
use crate::attribution::{attribution, AttributionOptions};
use crate::metrics::{LogitDiff, Metric, Normalised};
use crate::patching::{activation_patching, metric_of, Direction, PatchingData, SweepOptions};
use crate::scores::{pearson, Component, Positions, ScoreGrid};
use crate::shard::Shard;
use candle_core::{DType, Tensor};
use ferrolens_model::{Error, HookedTransformer, Hooks, LrpRules, PadSide, Result, RunSpan};
use ferrolens_tasks::PairBatch;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

/// A node- or component-scoring method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Method {
    /// Exact activation patching.
    #[cfg_attr(feature = "clap", value(name = "act"))]
    Act,
    /// Attribution patching (gradient x difference).
    #[cfg_attr(feature = "clap", value(name = "atp"))]
    Atp,
    /// Relevance patching (AtP with LRP rules).
    #[cfg_attr(feature = "clap", value(name = "relp"))]
    Relp,
    /// AtP* QK fix (on heads_q / heads_k; plain AtP elsewhere).
    #[cfg_attr(feature = "clap", value(name = "atp_qk"))]
    AtpQk,
    /// AtP* GradDrop.
    #[cfg_attr(feature = "clap", value(name = "atp_graddrop"))]
    AtpGd,
}

impl Method {
    /// Every method.
    pub const ALL: [Method; 5] = [Method::Act, Method::Atp, Method::Relp, Method::AtpQk, Method::AtpGd];

    /// The name in tables and on the command line.
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

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        Ok(match s.trim() {
            "act" => Method::Act,
            "atp" => Method::Atp,
            "relp" => Method::Relp,
            "atp_qk" | "atp-qk" => Method::AtpQk,
            "atp_graddrop" | "atp-graddrop" | "atp_gd" => Method::AtpGd,
            o => return Err(Error::Input(format!("unknown method `{o}`; use act, atp, relp, atp_qk (AtP* QK fix) or atp_graddrop (AtP* GradDrop)"))),
        })
    }
}

/// How prompt pairs of different lengths are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Batching {
    /// Group by length when padding would add more than [`GROUP_ABOVE`] of the real positions,
    /// else pad (docs/benchmarks.md has the measurements behind the threshold).
    #[default]
    Auto,
    /// One left-padded batch with a mask.
    Pad,
    /// One batch per token length, combined by the metric's averaging (a prompt-weighted mean).
    Group,
}

/// [`Batching::Auto`] groups by length above this padding overhead (padding positions over
/// real ones).
pub const GROUP_ABOVE: f64 = 0.25;

/// Tokens and metrics of a pair batch: one batch, left-padded with a mask when pairs differ in
/// length, the logit-difference metric and its normalisation.
pub struct Prepared {
    /// Clean tokens `[b, p]`.
    pub clean: Tensor,
    /// Corrupt tokens `[b, p]`.
    pub corrupt: Tensor,
    /// Real tokens of the padded batch (`None`: every pair has one length).
    pub mask: Option<Tensor>,
    /// Per-position slots: every position when pairs share a length, else the common labels.
    pub positions: Positions,
    /// Left padding of each pair in the batch.
    pub pads: Vec<usize>,
    /// `logit[answer] - logit[wrong]` at the last position.
    pub raw: Arc<LogitDiff>,
    /// The same, normalised: 0 = corrupt, 1 = clean.
    pub metric: Normalised,
    /// Mean clean logit difference.
    pub clean_value: f64,
    /// Mean corrupt logit difference.
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

/// Tokens, metric and baselines of `batch` for `model`.
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
    let span = RunSpan { last_logits_only: true, mask: mask.clone(), ..Default::default() };
    let logits = model.run_span(Some(&clean), &span, &mut Hooks::new())?;
    let per = raw.per_row(&logits)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let clean_accuracy = per.iter().filter(|v| **v > 0.0).count() as f64 / per.len() as f64;
    let clean_value = per.iter().map(|v| *v as f64).sum::<f64>() / per.len() as f64;
    let corrupt_value = metric_of(model, &corrupt, mask.as_ref(), raw.as_ref())?;
    let (nc, nk) = norm.unwrap_or((clean_value, corrupt_value));
    let metric = Normalised::new(raw.clone(), nc, nk)?;
    let pads = (0..batch.len()).map(|i| batch.pad(i)).collect();
    Ok(Prepared { clean, corrupt, mask, positions, pads, raw, metric, clean_value, corrupt_value, clean_accuracy })
}

/// A progress callback: `(what, done, total)`.
pub type Progress<'a> = &'a (dyn Fn(&str, usize, usize) + Sync);

/// How [`run_methods`] runs.
#[derive(Clone, Copy)]
pub struct RunOptions<'a> {
    /// Head scores per position (by label when pairs differ in length).
    pub by_pos: bool,
    /// Residual-like components per position (TL's sweeps) or over all positions (circuit nodes).
    pub resid_by_pos: bool,
    /// RelP rules.
    pub rules: LrpRules,
    /// Activation-patching direction.
    pub direction: Direction,
    /// Take AtP/RelP gradients at the clean run.
    pub at_clean: bool,
    /// Pairs of different lengths: padded or grouped.
    pub batching: Batching,
    /// Progress of the activation-patching sweeps.
    pub progress: Option<Progress<'a>>,
    /// Compute only this shard's rows of the result ([`crate::shard`]: the row index over all
    /// grids in order, round robin); the other rows are NaN. Activation patching runs only the
    /// owned patches; AtP/RelP run whole (one backward) and are masked.
    pub shard: Option<Shard>,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        RunOptions {
            by_pos: false,
            resid_by_pos: true,
            rules: LrpRules::RELP,
            direction: Direction::Denoise,
            at_clean: false,
            batching: Batching::Auto,
            progress: None,
            shard: None,
        }
    }
}

/// What [`run_methods`] returns.
pub struct MethodRun {
    /// One grid per (method, component).
    pub grids: Vec<ScoreGrid>,
    /// Seconds per method.
    pub times: Vec<(Method, f64)>,
    /// Whether pairs ran as length groups.
    pub grouped: bool,
}

/// Run `methods` x `components` over `batch` (prepared by [`prepare`]). Pairs of different
/// lengths run as one padded batch, or as one batch per length whose grids are combined by the
/// prompts' share ([`Batching`]; both give the same numbers, tests/padding.rs). Per-position
/// scores are by position when every pair has one length, else by label (an error when the pairs
/// have no labels in common).
pub fn run_methods(
    model: &HookedTransformer,
    batch: &PairBatch,
    prep: &Prepared,
    methods: &[Method],
    components: &[Component],
    o: &RunOptions,
) -> Result<MethodRun> {
    let groups = batch.length_groups();
    let group = groups.len() > 1
        && match o.batching {
            Batching::Pad => false,
            Batching::Group => true,
            Batching::Auto => batch.padding_overhead() > GROUP_ABOVE,
        };
    if !group {
        let (mut grids, times) = run_prepared(model, prep, methods, components, o)?;
        mask_shard(&mut grids, o.shard);
        return Ok(MethodRun { grids, times, grouped: false });
    }
    let names = batch.common_labels();
    let n = batch.len() as f64;
    let mut grids: Option<Vec<ScoreGrid>> = None;
    let mut times: Vec<(Method, f64)> = Vec::new();
    for (_, idx) in &groups {
        let sub = batch.subset(idx);
        let sp = prepare_as(model, &sub, Some((prep.clean_value, prep.corrupt_value)), Some(&names))?;
        let (g, t) = run_prepared(model, &sp, methods, components, o)?;
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
    let mut grids = grids.unwrap_or_default();
    mask_shard(&mut grids, o.shard);
    Ok(MethodRun { grids, times, grouped: true })
}

/// Set the rows a shard does not own to NaN (row index over all grids in order).
fn mask_shard(grids: &mut [ScoreGrid], shard: Option<Shard>) {
    let Some(s) = shard else { return };
    let mut u = 0;
    for g in grids {
        for v in &mut g.values {
            if !s.owns(u) {
                *v = f64::NAN;
            }
            u += 1;
        }
    }
}

/// One result grid [`run_methods`] will return, in its order: method, component, the layer of
/// each row block and the number of rows (`n_layers x position slots x heads`). The rows of all
/// grids in this order are a sweep's work units ([`crate::shard`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedGrid {
    /// Method.
    pub method: Method,
    /// Component.
    pub component: Component,
    /// Rows per layer (position slots x heads).
    pub rows_per_layer: usize,
    /// Layers.
    pub n_layers: usize,
}

impl PlannedGrid {
    /// Rows of the grid.
    pub fn rows(&self) -> usize {
        self.rows_per_layer * self.n_layers
    }
}

/// The grids [`run_methods`] returns for these arguments, in order, without running anything
/// (for `--dry-run` and shard plans). Activation patching keeps the components' order; the
/// gradient methods give head components first, then residual-like ones.
pub fn planned_grids(model: &HookedTransformer, prep: &Prepared, methods: &[Method], components: &[Component], o: &RunOptions) -> Vec<PlannedGrid> {
    let p = prep.clean.dim(1).unwrap_or(0);
    let plan = |m: Method, c: Component| {
        let by = if c.has_heads() { o.by_pos } else { o.resid_by_pos };
        let slots = if by && prep.positions.separate() { prep.positions.slots(p) } else { 1 };
        PlannedGrid { method: m, component: c, rows_per_layer: slots * c.n_heads(model).max(1), n_layers: model.cfg.n_layers }
    };
    let mut out = Vec::new();
    for &m in methods {
        if m == Method::Act {
            out.extend(components.iter().map(|&c| plan(m, c)));
        } else {
            out.extend(components.iter().filter(|c| c.has_heads()).map(|&c| plan(m, c)));
            out.extend(components.iter().filter(|c| !c.has_heads()).map(|&c| plan(m, c)));
        }
    }
    out
}

/// Score grids and (method, seconds) timings.
type GridsAndTimes = (Vec<ScoreGrid>, Vec<(Method, f64)>);

/// [`run_methods`] on one prepared batch.
fn run_prepared(model: &HookedTransformer, prep: &Prepared, methods: &[Method], components: &[Component], o: &RunOptions) -> Result<GridsAndTimes> {
    if (o.by_pos || o.resid_by_pos) && matches!(&prep.positions, Positions::Labels(l) if l.is_empty()) {
        return Err(Error::Input(
            "the pairs have different token lengths and no labels in common, so there are no per-position scores to report; \
             give every pair `labels` (name -> token index, as `ferrolens data` writes), or pairs of one length, or score over all positions"
                .into(),
        ));
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
                    let what = format!("act {}", c.name());
                    let cb = |done: usize, total: usize| {
                        if let Some(p) = o.progress {
                            p(&what, done, total);
                        }
                    };
                    // This grid's rows start after every grid before it (the shard's row order).
                    let offset: usize = grids.iter().map(|g: &ScoreGrid| g.values.len()).sum();
                    let owned = |u: usize| o.shard.is_none_or(|s| s.owns(offset + u));
                    let only: Option<&(dyn Fn(usize) -> bool + Sync)> = if o.shard.is_some() { Some(&owned) } else { None };
                    let opts = SweepOptions { direction: o.direction, progress: Some(&cb), only, ..Default::default() };
                    grids.push(activation_patching(model, &data, c, &pos_of(&c), &opts)?);
                }
            }
            Method::AtpQk | Method::AtpGd => {
                let (heads, resid): (Vec<Component>, Vec<Component>) = components.iter().partition(|c| c.has_heads());
                for (cs, by) in [(heads, o.by_pos), (resid, o.resid_by_pos)] {
                    for &c in &cs {
                        let opts = AttributionOptions { at_clean: o.at_clean, positions: pos_for(by), ..AttributionOptions::atp(&[c]) };
                        let mut g = if m == Method::AtpQk && matches!(c, Component::HeadQ | Component::HeadK) {
                            qk_fix(model, &data, c, &pos_for(by))?
                        } else if m == Method::AtpGd {
                            grad_drop(model, &data, &opts)?.remove(0)
                        } else {
                            attribution(model, &data, &opts)?.grids.remove(0)
                        };
                        g.method = m.name().to_string();
                        grids.push(g);
                    }
                }
            }
            Method::Atp | Method::Relp => {
                let r = if m == Method::Atp { LrpRules::NONE } else { o.rules };
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
        times.push((m, t0.elapsed().as_secs_f64()));
    }
    Ok((grids, times))
}

/// Pearson r of each non-act method against act, per component: `(method, component, r, n)`.
pub fn correlations(grids: &[ScoreGrid]) -> Vec<(String, String, f64, usize)> {
    let mut out = Vec::new();
    for a in grids.iter().filter(|g| g.method == "act") {
        for o in grids.iter().filter(|g| g.method != "act" && g.component == a.component && g.by_pos == a.by_pos) {
            if o.values.len() == a.values.len() {
                out.push((o.method.clone(), a.component.name().to_string(), pearson(&o.values, &a.values), a.values.len()));
            }
        }
    }
    out
}

/// LRP rules from a comma-separated list (`ln`, `identity`, `half`, `attn`; `default` = RelP's).
pub fn parse_rules(s: &str) -> Result<LrpRules> {
    let mut r = LrpRules::NONE;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "ln" => r.ln = true,
            "identity" => r.identity = true,
            "half" => r.half = true,
            "attn" | "ah" => r.attn = true,
            "default" => r = LrpRules { attn: r.attn, ..LrpRules::RELP },
            o => return Err(Error::Input(format!("unknown LRP rule `{o}`; use ln, identity, half, attn (comma-separated) or default"))),
        }
    }
    Ok(r)
}
