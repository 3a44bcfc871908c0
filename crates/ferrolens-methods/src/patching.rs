//! Exact activation patching (TransformerLens `patching` semantics) at sweep speed.
//!
//! Denoising (default): run the corrupt prompts and patch in one clean activation at a time;
//! noising: run the clean prompts and patch in corrupt activations. Each score is the metric of
//! the patched run (with a [`Normalised`](crate::metrics::Normalised) metric: 0 = corrupt, 1 = clean).
//!
//! Speed: every patch at layer `L` starts from the target run's cached `resid_pre(L)` instead of
//! recomputing layers `0..L`, and many patches ride in one batched forward: patch `c` of a chunk
//! occupies rows `c*b..(c+1)*b`, with a per-row mask choosing its position/head.
//!
//! Prompts of different lengths come as one left-padded batch with a real-token mask
//! ([`PatchingData::mask`]): every prompt ends at the last position, where the metric reads, and
//! positions are chosen per prompt by label ([`Positions::Labels`]).
//!
//! [`generic_patching`] patches any hook point over any index axes (TransformerLens's
//! `generic_activation_patch`: positions, heads, (dest, src) of a pattern, neuron slices);
//! [`activation_patching`] is its preset for a [`Component`] at every layer.

use crate::metrics::{mean_value, Metric};
use crate::scores::{Component, Positions, ScoreGrid};
use candle_core::{DType, Tensor};
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, Patch, Result, RunSpan};
use ndarray::{ArrayD, Dimension, IxDyn};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Arc;

/// Which way activations flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Direction {
    /// Clean activations patched into the corrupt run.
    #[cfg_attr(feature = "clap", value(name = "denoising"))]
    Denoise,
    /// Corrupt activations patched into the clean run.
    #[cfg_attr(feature = "clap", value(name = "noising"))]
    Noise,
}

/// What every method takes first: clean and corrupt prompts `[b, p]` (equal shapes; a clean
/// prompt and its corrupt twin have one length), the real-token mask `[b, p]` when prompts of
/// different lengths are left-padded to one batch, and the metric to score.
#[derive(Clone, Copy)]
pub struct PatchingData<'a> {
    /// Clean tokens `[b, p]`.
    pub clean: &'a Tensor,
    /// Corrupt tokens `[b, p]`.
    pub corrupt: &'a Tensor,
    /// Real tokens (1) and left padding (0), `[b, p]`, shared by clean and corrupt; `None` when
    /// every prompt has `p` tokens. See [`ferrolens_model::RunSpan::mask`].
    pub mask: Option<&'a Tensor>,
    /// The metric (usually normalised).
    pub metric: &'a dyn Metric,
}

impl<'a> PatchingData<'a> {
    /// Prompts of one length.
    pub fn new(clean: &'a Tensor, corrupt: &'a Tensor, metric: &'a dyn Metric) -> Self {
        PatchingData { clean, corrupt, mask: None, metric }
    }

    /// With a real-token mask (left-padded prompts of different lengths).
    pub fn with_mask(mut self, mask: Option<&'a Tensor>) -> Self {
        self.mask = mask;
        self
    }

    /// The same prompts scored with another metric (e.g. the raw metric for faithfulness).
    pub fn with_metric(mut self, metric: &'a dyn Metric) -> Self {
        self.metric = metric;
        self
    }

    /// Check shapes: clean and corrupt equal, the mask (if any) of their shape. Returns `(b, p)`.
    pub fn check(&self) -> Result<(usize, usize)> {
        if self.clean.dims() != self.corrupt.dims() {
            return Err(Error::Input(format!("clean tokens {:?} and corrupt tokens {:?} must have the same shape", self.clean.dims(), self.corrupt.dims())));
        }
        let (b, p) = self.clean.dims2()?;
        if let Some(m) = self.mask {
            if m.dims() != [b, p] {
                return Err(Error::Input(format!("the mask {:?} must have the tokens' shape [{b}, {p}]", m.dims())));
            }
        }
        Ok((b, p))
    }

    /// A run span over these prompts (their mask), unembedding the last position only when asked.
    pub fn span(&self, last_logits_only: bool) -> RunSpan {
        RunSpan { last_logits_only, mask: self.mask.cloned(), ..Default::default() }
    }

    /// The span of runs that only cache activations of the blocks (their logits are not read):
    /// they stop after the last of the model's `n_layers` blocks, skipping the unembedding.
    pub fn cache_span(&self, n_layers: usize) -> RunSpan {
        RunSpan { stop_at_layer: Some(n_layers), ..self.span(false) }
    }

    /// The span of runs whose last position's logits feed the metric alone, and the metric to
    /// apply to their logits: when the metric reads a few tokens' logits
    /// ([`Metric::on_columns`]), the span unembeds those columns only and the returned metric
    /// (`Some`) reads them; otherwise the whole vocabulary and `None` (use `self.metric`).
    pub fn metric_span(&self) -> Result<(RunSpan, Option<Arc<dyn Metric>>)> {
        let mut span = self.span(true);
        Ok(match self.metric.on_columns() {
            Some((cols, m)) => {
                span.columns = Some(Tensor::new(cols.as_slice(), &candle_core::Device::Cpu)?);
                (span, Some(m))
            }
            None => (span, None),
        })
    }

    /// The mask repeated for `c` copies of the batch stacked as rows (`None` without a mask).
    pub fn mask_rows(&self, c: usize) -> Result<Option<Tensor>> {
        Ok(match self.mask {
            Some(m) if c > 1 => Some(Tensor::cat(&std::iter::repeat_n(m, c).collect::<Vec<_>>(), 0)?),
            Some(m) => Some(m.clone()),
            None => None,
        })
    }
}

/// Options of a sweep.
pub struct SweepOptions<'a> {
    /// Denoise or noise.
    pub direction: Direction,
    /// Largest number of rows (patches x prompts) in one forward; 0 (the default): [`auto_rows`].
    pub max_rows: usize,
    /// Called with (done, total) patches.
    pub progress: Option<&'a (dyn Fn(usize, usize) + Sync)>,
    /// Run only the patches whose flat index in the result (hook-major, row-major over the swept
    /// axes, as [`PatchResult::values`]) passes; the others are left NaN. For shards
    /// ([`crate::shard`]); `None` runs every patch.
    pub only: Option<&'a (dyn Fn(usize) -> bool + Sync)>,
}

impl Default for SweepOptions<'_> {
    fn default() -> Self {
        SweepOptions { direction: Direction::Denoise, max_rows: 0, progress: None, only: None }
    }
}

/// Rows (patches x prompts) per forward of a sweep whose `max_rows` is 0: 256 on the CPU (the
/// best measured there; 128 to 1024 were within noise, docs/benchmarks.md), on a GPU
/// [`device_rows`] (a 256-row sweep left an H200 launch-bound at 1.7% of its bf16 peak).
pub fn auto_rows(model: &HookedTransformer, seq_len: usize) -> usize {
    if model.device().is_cpu() {
        256
    } else {
        device_rows(&model.cfg, model.dtype(), seq_len)
    }
}

/// Rows per forward on a GPU: as many as keep one row's largest live activations of a
/// no-gradient forward (residual stream and norms, q/k/v, the scores and pattern, the MLP's
/// packed and activated hidden states: `p (4 D + (h + 2 kv) d + 2 h p + 3 M)` elements for `p`
/// tokens) within 2 GiB, between 256 and 8192.
pub fn device_rows(cfg: &ferrolens_model::Config, dtype: DType, seq_len: usize) -> usize {
    let p = seq_len.max(1);
    let per_position = 4 * cfg.d_model + (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head + 2 * cfg.n_heads * p + 3 * cfg.d_mlp;
    let bytes = p * per_position * dtype.size_in_bytes();
    ((2usize << 30) / bytes.max(1)).clamp(256, 8192)
}

/// The mean metric of a plain run on `tokens` (last-position logits only; `mask` for a
/// left-padded batch).
pub fn metric_of(model: &HookedTransformer, tokens: &Tensor, mask: Option<&Tensor>, metric: &dyn Metric) -> Result<f64> {
    let span = RunSpan { last_logits_only: true, mask: mask.cloned(), ..Default::default() };
    let logits = model.run_span(Some(tokens), &span, &mut Hooks::new())?;
    mean_value(&metric.per_row(&logits)?)
}

/// An axis of an activation that [`generic_patching`] sweeps (TransformerLens's
/// `index_axis_names`: `pos`, `head_index`, `dest_pos`, `src_pos`; `Neuron` is ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Axis {
    /// Token position: axis 1 of `[b,p,..]` activations, the query axis (2) of `[b,h,q,k]` scores
    /// and patterns.
    Pos,
    /// Head: axis 2 of `[b,p,h,d]` (`hook_q/k/v/z/result`; key/value heads for `k`/`v` of GQA
    /// models), axis 1 of `[b,h,q,k]`.
    Head,
    /// Query position of `hook_attn_scores` / `hook_pattern` `[b,h,q,k]` (axis 2).
    DestPos,
    /// Key position of `hook_attn_scores` / `hook_pattern` (axis 3).
    SrcPos,
    /// The last axis of `[b,p,n]` and `[b,p,h,n]` activations: a neuron of `mlp.hook_pre/post`,
    /// a residual-stream direction, a coordinate of a head's `z`.
    Neuron,
}

impl Axis {
    /// TransformerLens's name of the axis (`neuron` for ours).
    pub fn name(&self) -> &'static str {
        match self {
            Axis::Pos => "pos",
            Axis::Head => "head_index",
            Axis::DestPos => "dest_pos",
            Axis::SrcPos => "src_pos",
            Axis::Neuron => "neuron",
        }
    }

    /// Whether the axis indexes token positions (so per-prompt labels apply).
    pub fn is_position(&self) -> bool {
        matches!(self, Axis::Pos | Axis::DestPos | Axis::SrcPos)
    }

    /// The axis of `hook`'s activation (rank `rank`, batch first) that this names.
    fn dim(&self, hook: HookPoint, rank: usize) -> Result<usize> {
        let scores = matches!(hook, HookPoint::AttnScores(_) | HookPoint::Pattern(_));
        let d = match self {
            Axis::Pos => Some(hook.pos_axis()),
            Axis::Head => hook.head_axis(),
            Axis::DestPos => scores.then_some(2),
            Axis::SrcPos => scores.then_some(3),
            Axis::Neuron => (!scores && rank >= 3).then_some(rank - 1),
        };
        d.ok_or_else(|| {
            let hint = match self {
                Axis::Head => "only q, k, v, z, result, attention scores and patterns have a head axis",
                Axis::DestPos | Axis::SrcPos => "only hook_attn_scores and hook_pattern have dest_pos and src_pos",
                _ => "patterns index keys with src_pos, not neuron",
            };
            Error::Input(format!("`{hook}` has no `{}` axis; {hint}", self.name()))
        })
    }
}

impl std::str::FromStr for Axis {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "pos" => Axis::Pos,
            "head" | "head_index" => Axis::Head,
            "dest_pos" | "dest" | "query" => Axis::DestPos,
            "src_pos" | "src" | "key" => Axis::SrcPos,
            "neuron" | "neurons" => Axis::Neuron,
            other => return Err(Error::Input(format!("unknown axis `{other}`; use pos, head, dest_pos, src_pos or neuron"))),
        })
    }
}

/// Which indices of an [`Axis`] are patched, one patch each.
#[derive(Debug, Clone, PartialEq)]
pub enum Sweep {
    /// Every index of the axis, one at a time.
    Each,
    /// These indices, one at a time.
    Indices(Vec<usize>),
    /// These ranges, one patch each (e.g. neuron slices `0..256`, `256..512`).
    Ranges(Vec<Range<usize>>),
    /// Named positions that differ per prompt row (position axes only): each label with its
    /// index in every prompt row, `[prompts]` (as [`Positions::Labels`]).
    Labels(Vec<(String, Vec<usize>)>),
}

/// What [`generic_patching`] patches: each hook point, at every combination of the swept
/// indices (the cartesian product over `axes`); axes not listed are patched whole.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchSpec {
    /// Hook points, one sweep each (e.g. `model.hooks_matching("blocks.*.attn.hook_pattern")?`).
    pub hooks: Vec<HookPoint>,
    /// Swept axes, in the order of the result's axes.
    pub axes: Vec<(Axis, Sweep)>,
}

impl PatchSpec {
    /// The preset of a [`Component`] at every layer: its hook at each layer, positions by
    /// `positions` (not swept for [`Positions::All`]) and each head for head components.
    pub fn component(model: &HookedTransformer, component: Component, positions: &Positions) -> Self {
        let mut axes = Vec::new();
        match positions {
            Positions::All => {}
            Positions::Each => axes.push((Axis::Pos, Sweep::Each)),
            Positions::Labels(l) => axes.push((Axis::Pos, Sweep::Labels(l.clone()))),
        }
        if component.has_heads() {
            axes.push((Axis::Head, Sweep::Each));
        }
        PatchSpec { hooks: (0..model.cfg.n_layers).map(|l| component.hook(l)).collect(), axes }
    }
}

impl Sweep {
    /// Parse a command-line axis: `AXIS` (every index), `AXIS=3,7` (indices),
    /// `AXIS=0..256,256..512` (ranges) or `AXIS=IO,S2` (position labels, looked up in `labels`,
    /// each label's index per prompt row).
    pub fn parse(s: &str, labels: &[(String, Vec<usize>)]) -> Result<(Axis, Sweep)> {
        let (axis, values) = match s.split_once('=') {
            Some((a, v)) => (a.parse::<Axis>()?, Some(v)),
            None => (s.parse::<Axis>()?, None),
        };
        let Some(values) = values else {
            return Ok((axis, Sweep::Each));
        };
        let parts: Vec<&str> = values.split(',').map(str::trim).filter(|v| !v.is_empty()).collect();
        if parts.is_empty() {
            return Err(Error::Input(format!("`{s}` lists no indices; write e.g. {}=0,3 or drop `=` to sweep every index", axis.name())));
        }
        if parts.iter().all(|v| v.parse::<usize>().is_ok()) {
            return Ok((axis, Sweep::Indices(parts.iter().map(|v| v.parse().unwrap_or_default()).collect())));
        }
        if parts.iter().all(|v| v.contains("..")) {
            let ranges = parts
                .iter()
                .map(|v| {
                    let (a, b) = v.split_once("..").unwrap_or_default();
                    match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                        (Ok(a), Ok(b)) => Ok(a..b),
                        _ => Err(Error::Input(format!("`{v}` in `{s}` is not a range; write START..END, e.g. 0..256"))),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok((axis, Sweep::Ranges(ranges)));
        }
        let picked = parts
            .iter()
            .map(|v| {
                labels.iter().find(|(n, _)| n == v).cloned().ok_or_else(|| {
                    let known: Vec<&str> = labels.iter().map(|(n, _)| n.as_str()).collect();
                    Error::Input(format!(
                        "`{v}` in `{s}` is neither an index, a range nor a position label of these pairs (labels: {}); use numbers, START..END or one of the labels",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((axis, Sweep::Labels(picked)))
    }
}

/// The outcome of [`generic_patching`]: the metric of each patched run.
#[derive(Debug, Clone)]
pub struct PatchResult {
    /// The patched hook points (the result's first axis).
    pub hooks: Vec<HookPoint>,
    /// The swept axes (the result's other axes).
    pub axes: Vec<Axis>,
    /// For each swept axis, the name of each patched index (`"3"`, `"256..512"`, `"IO"`).
    pub labels: Vec<Vec<String>>,
    /// `[hooks, n_1, .., n_k]`: the mean metric over prompts of the run with that patch.
    pub values: ArrayD<f64>,
}

impl PatchResult {
    /// One row per patch: hook name, the index name on each axis, score.
    pub fn rows(&self) -> Vec<(String, Vec<String>, f64)> {
        self.values
            .indexed_iter()
            .map(|(ix, v)| {
                let ix = ix.slice();
                (self.hooks[ix[0]].to_string(), self.axes.iter().enumerate().map(|(a, _)| self.labels[a][ix[a + 1]].clone()).collect(), *v)
            })
            .collect()
    }
}

/// One choice on one axis: the indices it patches in each prompt row.
#[derive(Debug, Clone)]
enum Choice {
    Index(usize),
    Range(Range<usize>),
    Label(Vec<usize>),
}

impl Choice {
    fn indices(&self, row: usize) -> Range<usize> {
        match self {
            Choice::Index(i) => *i..i + 1,
            Choice::Range(r) => r.clone(),
            Choice::Label(v) => v[row]..v[row] + 1,
        }
    }
}

/// One swept axis resolved for a hook: the tensor axis, its choices and their names.
type ResolvedAxis = (usize, Vec<Choice>, Vec<String>);

/// The choices of each swept axis for `hook` with activation shape `dims`, checked: the
/// resolved tensor axis, its choices and their names.
fn resolve(spec: &PatchSpec, hook: HookPoint, dims: &[usize], b: usize) -> Result<Vec<ResolvedAxis>> {
    let mut out: Vec<ResolvedAxis> = Vec::new();
    for (axis, sweep) in &spec.axes {
        let d = axis.dim(hook, dims.len())?;
        if let Some((prev, _)) = spec.axes.iter().find(|(a, _)| a != axis && a.dim(hook, dims.len()).ok() == Some(d)) {
            return Err(Error::Input(format!("axes `{}` and `{}` are the same axis of `{hook}`; sweep it once", prev.name(), axis.name())));
        }
        if out.iter().any(|(od, _, _)| *od == d) {
            return Err(Error::Input(format!("axis `{}` is listed twice; list each axis once", axis.name())));
        }
        let n = dims[d];
        let bad = |what: String| Error::Input(format!("{what} is outside `{hook}`'s `{}` axis of size {n}; give indices below {n}", axis.name()));
        let (choices, names): (Vec<Choice>, Vec<String>) = match sweep {
            Sweep::Each => ((0..n).map(Choice::Index).collect(), (0..n).map(|i| i.to_string()).collect()),
            Sweep::Indices(v) => {
                if let Some(i) = v.iter().find(|&&i| i >= n) {
                    return Err(bad(format!("index {i}")));
                }
                (v.iter().map(|&i| Choice::Index(i)).collect(), v.iter().map(|i| i.to_string()).collect())
            }
            Sweep::Ranges(v) => {
                if let Some(r) = v.iter().find(|r| r.start >= r.end) {
                    return Err(Error::Input(format!("range {}..{} on axis `{}` is empty; give start < end", r.start, r.end, axis.name())));
                }
                if let Some(r) = v.iter().find(|r| r.end > n) {
                    return Err(bad(format!("range {}..{}", r.start, r.end)));
                }
                (v.iter().map(|r| Choice::Range(r.clone())).collect(), v.iter().map(|r| format!("{}..{}", r.start, r.end)).collect())
            }
            Sweep::Labels(l) => {
                if !axis.is_position() {
                    return Err(Error::Input(format!("labels name positions, but axis `{}` is not a position axis; use Indices or Ranges", axis.name())));
                }
                for (name, idx) in l {
                    if idx.len() != b {
                        return Err(Error::Input(format!("label `{name}` has {} indices for {b} prompts; give one per prompt", idx.len())));
                    }
                    if let Some(i) = idx.iter().find(|&&i| i >= n) {
                        return Err(bad(format!("label `{name}` position {i}")));
                    }
                }
                (l.iter().map(|(_, v)| Choice::Label(v.clone())).collect(), l.iter().map(|(n, _)| n.clone()).collect())
            }
        };
        if choices.is_empty() {
            return Err(Error::Input(format!("axis `{}` sweeps nothing; give at least one index", axis.name())));
        }
        out.push((d, choices, names));
    }
    Ok(out)
}

/// Patch each hook point of `spec` at every combination of its swept indices, one patched run
/// each (denoising: source = clean, target = corrupt; noising the reverse): the target run with
/// the source activation written at those indices (whole along unlisted axes). Runs start at the
/// hook's layer from the target's cached `resid_pre`, many patches to a batched forward.
///
/// Generalises TransformerLens's `generic_activation_patch` (and its `get_act_patch_*`
/// presets): e.g. hooks `blocks.*.attn.hook_pattern` with axes `[Head, DestPos, SrcPos]`, or
/// `blocks.5.mlp.hook_post` with `[Neuron: Ranges(0..256, 256..512, ..)]`. Every hook must give
/// the same number of choices on each axis. Returns values `[hooks, n_1, .., n_k]`.
pub fn generic_patching(model: &HookedTransformer, data: &PatchingData, spec: &PatchSpec, opts: &SweepOptions) -> Result<PatchResult> {
    let (target, source) = match opts.direction {
        Direction::Denoise => (data.corrupt, data.clean),
        Direction::Noise => (data.clean, data.corrupt),
    };
    let (b, p) = data.check()?;
    let max_rows = if opts.max_rows == 0 { auto_rows(model, p) } else { opts.max_rows };
    if spec.hooks.is_empty() {
        return Err(Error::Input("no hook points to patch; give at least one (e.g. model.hooks_matching(\"blocks.*.hook_resid_pre\"))".into()));
    }
    let available = model.hook_points();
    if let Some(h) = spec.hooks.iter().find(|h| !available.contains(h)) {
        return Err(Error::Input(format!("{} has no hook `{h}`; `ferrolens info` lists its hook points", model.cfg.name)));
    }
    let span = data.span(true);
    let mut src = Hooks::new().cache_hooks(&spec.hooks);
    model.run_span(Some(source), &span, &mut src)?;
    let src = src.take_cache();
    // Check every hook's axes before the sweep.
    let mut plans = Vec::with_capacity(spec.hooks.len());
    for &hook in &spec.hooks {
        let dims = src.get(hook)?.dims().to_vec();
        let plan = resolve(spec, hook, &dims, b)?;
        if let Some(first) = plans.first() {
            let (h0, p0): &(HookPoint, Vec<ResolvedAxis>) = first;
            for (a, ((_, c0, _), (_, c, _))) in p0.iter().zip(&plan).enumerate() {
                if c0.len() != c.len() {
                    return Err(Error::Input(format!(
                        "`{h0}` has {} choices on axis `{}` but `{hook}` has {}; patch hooks of different sizes in separate calls",
                        c0.len(),
                        spec.axes[a].0.name(),
                        c.len()
                    )));
                }
            }
        }
        plans.push((hook, plan));
    }
    let starts: Vec<usize> = spec.hooks.iter().filter_map(|h| h.layer()).collect();
    let mut tgt = Hooks::new().cache_hooks(&starts.iter().map(|&l| HookPoint::ResidPre(l)).collect::<Vec<_>>());
    model.run_span(Some(target), &span, &mut tgt)?;
    let tgt = tgt.take_cache();

    let sizes: Vec<usize> = plans[0].1.iter().map(|(_, c, _)| c.len()).collect();
    let n_sites: usize = sizes.iter().product();
    let mut shape = vec![spec.hooks.len()];
    shape.extend(&sizes);
    // A metric that reads a few tokens' logits (a logit difference) gets those columns alone.
    let (metric_span, reduced) = data.metric_span()?;
    let (metric, columns) = (reduced.as_deref().unwrap_or(data.metric), metric_span.columns);
    let owned = |u: usize| opts.only.is_none_or(|f| f(u));
    let mut values = ArrayD::<f64>::from_elem(IxDyn(&shape), if opts.only.is_some() { f64::NAN } else { 0.0 });
    let chunk = (max_rows / b).max(1);
    let total = (0..spec.hooks.len() * n_sites).filter(|&u| owned(u)).count();
    let mut done = 0;
    for (hi, (hook, plan)) in plans.iter().enumerate() {
        let todo: Vec<usize> = (0..n_sites).filter(|&s| owned(hi * n_sites + s)).collect();
        if todo.is_empty() {
            continue;
        }
        let src_act = src.get(*hook)?;
        for sites in todo.chunks(chunk) {
            let c = sites.len();
            let rep = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&std::iter::repeat_n(t, c).collect::<Vec<_>>(), 0)?) };
            let mask = sites_mask(src_act.dims(), plan, &sizes, sites, b)?.to_device(src_act.device())?;
            let mut hooks = Hooks::new().patch(Patch::new(*hook, Intervention::Replace(rep(src_act)?)).mask(mask));
            let mask_rows = data.mask_rows(c)?;
            let logits = match hook.layer() {
                Some(l) => {
                    let span = RunSpan {
                        start: Some((l, rep(tgt.get(HookPoint::ResidPre(l))?)?)),
                        last_logits_only: true,
                        mask: mask_rows,
                        columns: columns.clone(),
                        ..Default::default()
                    };
                    model.run_span(None, &span, &mut hooks)?
                }
                None => model.run_span(
                    Some(&rep(target)?),
                    &RunSpan { last_logits_only: true, mask: mask_rows, columns: columns.clone(), ..Default::default() },
                    &mut hooks,
                )?,
            };
            let per = metric.per_row(&logits)?.to_dtype(DType::F64)?.reshape((c, b))?.mean(1)?.to_vec1::<f64>()?;
            let flat = values.as_slice_mut().expect("a fresh array is contiguous");
            for (site, v) in sites.iter().zip(per) {
                flat[hi * n_sites + site] = v;
            }
            done += c;
            if let Some(f) = opts.progress {
                f(done, total);
            }
        }
    }
    Ok(PatchResult {
        hooks: spec.hooks.clone(),
        axes: spec.axes.iter().map(|(a, _)| *a).collect(),
        labels: plans[0].1.iter().map(|(_, _, n)| n.clone()).collect(),
        values,
    })
}

/// The `[c*b, ..]` 0/1 mask of a chunk of sites (flat indices into the product of `sizes`) on an
/// activation of shape `dims`: swept axes at full size, the rest 1 (broadcast: patched whole).
fn sites_mask(dims: &[usize], plan: &[(usize, Vec<Choice>, Vec<String>)], sizes: &[usize], sites: &[usize], b: usize) -> Result<Tensor> {
    let c = sites.len();
    let mut shape = vec![c * b];
    shape.extend(std::iter::repeat_n(1, dims.len() - 1));
    for (d, _, _) in plan {
        shape[*d] = dims[*d];
    }
    let strides: Vec<usize> = (0..shape.len()).map(|i| shape[i + 1..].iter().product()).collect();
    let mut v = vec![0f32; shape.iter().product()];
    for (ci, &site) in sites.iter().enumerate() {
        // The site's choice on each axis (row-major over `sizes`).
        let mut rest = site;
        let mut pick = vec![0; sizes.len()];
        for a in (0..sizes.len()).rev() {
            pick[a] = rest % sizes[a];
            rest /= sizes[a];
        }
        for bi in 0..b {
            let row = ci * b + bi;
            let ranges: Vec<Range<usize>> = plan.iter().zip(&pick).map(|((_, ch, _), &k)| ch[k].indices(bi)).collect();
            // Every combination of the axes' index ranges (one when nothing is swept).
            let combos: usize = ranges.iter().map(|r| r.len()).product();
            for k in 0..combos {
                let (mut rest, mut off) = (k, row * strides[0]);
                for (a, r) in ranges.iter().enumerate().rev() {
                    off += (r.start + rest % r.len()) * strides[plan[a].0];
                    rest /= r.len();
                }
                v[off] = 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?)
}

/// Exact activation patching of `component` at every layer: over all positions at once
/// ([`Positions::All`]; TL's `..._attn_head_out_all_pos`, for residual-like components a
/// whole-layer patch), at every position ([`Positions::Each`]; TL's `get_act_patch_resid_pre`,
/// `..._attn_head_out_by_pos`), or at labelled positions that differ per prompt
/// ([`Positions::Labels`]). Returns the metric of each patched run. The preset
/// [`PatchSpec::component`] of [`generic_patching`].
pub fn activation_patching(
    model: &HookedTransformer,
    data: &PatchingData,
    component: Component,
    positions: &Positions,
    opts: &SweepOptions,
) -> Result<ScoreGrid> {
    let (b, p) = data.check()?;
    positions.check(b, p)?;
    let r = generic_patching(model, data, &PatchSpec::component(model, component, positions), opts)?;
    let n_heads = component.n_heads(model);
    let mut grid = ScoreGrid::for_positions("act", component, positions, model.cfg.n_layers, p, n_heads);
    // The result is [layers, (slots), (heads)] row-major, the grid's own layout.
    let flat: Vec<f64> = r.values.iter().copied().collect();
    if flat.len() != grid.values.len() {
        return Err(Error::Input(format!("internal: {} patch results for a grid of {}", flat.len(), grid.values.len())));
    }
    grid.values = flat;
    Ok(grid)
}
