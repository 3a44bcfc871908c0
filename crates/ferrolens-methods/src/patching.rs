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

use crate::metrics::{mean_value, Metric};
use crate::scores::{Component, Positions, ScoreGrid};
use candle_core::{DType, Tensor};
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, Patch, Result, RunSpan};

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
    /// Largest number of rows (patches x prompts) in one forward.
    pub max_rows: usize,
    /// Called with (done, total) patches.
    pub progress: Option<&'a (dyn Fn(usize, usize) + Sync)>,
}

impl Default for SweepOptions<'_> {
    fn default() -> Self {
        SweepOptions { direction: Direction::Denoise, max_rows: 256, progress: None }
    }
}

/// The mean metric of a plain run on `tokens` (last-position logits only; `mask` for a
/// left-padded batch).
pub fn metric_of(model: &HookedTransformer, tokens: &Tensor, mask: Option<&Tensor>, metric: &dyn Metric) -> Result<f64> {
    let span = RunSpan { last_logits_only: true, mask: mask.cloned(), ..Default::default() };
    let logits = model.run_span(Some(tokens), &span, &mut Hooks::new())?;
    mean_value(&metric.per_row(&logits)?)
}

/// One patch of a sweep: the position slot and head it touches (None = all).
#[derive(Debug, Clone, Copy)]
struct Site {
    slot: Option<usize>,
    head: Option<usize>,
}

/// Exact activation patching of `component` at every layer: over all positions at once
/// ([`Positions::All`]; TL's `..._attn_head_out_all_pos`, for residual-like components a
/// whole-layer patch), at every position ([`Positions::Each`]; TL's `get_act_patch_resid_pre`,
/// `..._attn_head_out_by_pos`), or at labelled positions that differ per prompt
/// ([`Positions::Labels`]). Returns the metric of each patched run.
pub fn activation_patching(
    model: &HookedTransformer,
    data: &PatchingData,
    component: Component,
    positions: &Positions,
    opts: &SweepOptions,
) -> Result<ScoreGrid> {
    let (target, source) = match opts.direction {
        Direction::Denoise => (data.corrupt, data.clean),
        Direction::Noise => (data.clean, data.corrupt),
    };
    let (b, p) = data.check()?;
    positions.check(b, p)?;
    let n_layers = model.cfg.n_layers;
    let n_heads = component.n_heads(model);
    let hooks_src: Vec<HookPoint> = (0..n_layers).map(|l| component.hook(l)).collect();
    let mut src = Hooks::new().cache_hooks(&hooks_src);
    let span = data.span(true);
    model.run_span(Some(source), &span, &mut src)?;
    let src = src.take_cache();
    let resid_hooks: Vec<HookPoint> = (0..n_layers).map(HookPoint::ResidPre).collect();
    let mut tgt = Hooks::new().cache_hooks(&resid_hooks);
    model.run_span(Some(target), &span, &mut tgt)?;
    let tgt = tgt.take_cache();

    let mut sites = Vec::new();
    let slots: Vec<Option<usize>> = if positions.separate() { (0..positions.slots(p)).map(Some).collect() } else { vec![None] };
    let heads: Vec<Option<usize>> = if component.has_heads() { (0..n_heads).map(Some).collect() } else { vec![None] };
    for &slot in &slots {
        for &head in &heads {
            sites.push(Site { slot, head });
        }
    }
    let mut grid = ScoreGrid::for_positions("act", component, positions, n_layers, p, n_heads);
    let chunk = (opts.max_rows / b).max(1);
    let total = n_layers * sites.len();
    let mut done = 0;
    for l in 0..n_layers {
        let hook = component.hook(l);
        let src_act = src.get(hook)?;
        let resid = tgt.get(HookPoint::ResidPre(l))?;
        for group in sites.chunks(chunk) {
            let c = group.len();
            let rep = |t: &Tensor| -> Result<Tensor> {
                let parts: Vec<&Tensor> = std::iter::repeat_n(t, c).collect();
                Ok(Tensor::cat(&parts, 0)?)
            };
            let mask = site_mask(hook, src_act.dims(), group, positions, b)?.to_device(model.device())?;
            let patch = Patch::new(hook, Intervention::Replace(rep(src_act)?)).mask(mask);
            let mut hooks = Hooks::new().patch(patch);
            let span = RunSpan { start: Some((l, rep(resid)?)), last_logits_only: true, mask: data.mask_rows(c)?, ..Default::default() };
            let logits = model.run_span(None, &span, &mut hooks)?;
            let per_row = data.metric.per_row(&logits)?.to_dtype(DType::F64)?.reshape((c, b))?.mean(1)?.to_vec1::<f64>()?;
            for (site, v) in group.iter().zip(per_row) {
                let i = grid.idx(l, site.slot.unwrap_or(0), site.head.unwrap_or(0));
                grid.values[i] = v;
            }
            done += c;
            if let Some(f) = opts.progress {
                f(done, total);
            }
        }
    }
    Ok(grid)
}

/// The `[c*b, ...]` 0/1 mask for a chunk of sites on an activation of shape `dims` (`[b, ...]`);
/// a site's slot is a position index per prompt row through `positions`.
fn site_mask(hook: HookPoint, dims: &[usize], group: &[Site], positions: &Positions, b: usize) -> Result<Tensor> {
    // Mask shape: rows x (pos axis) x (head axis), trailing axes broadcast.
    let c = group.len();
    let pos_axis = hook.pos_axis();
    let head_axis = hook.head_axis();
    let mut shape = vec![c * b];
    shape.extend(std::iter::repeat_n(1, dims.len() - 1));
    shape[pos_axis] = dims[pos_axis];
    if let Some(h) = head_axis {
        shape[h] = dims[h];
    }
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    let strides: Vec<usize> = (0..shape.len()).map(|i| shape[i + 1..].iter().product()).collect();
    for (ci, site) in group.iter().enumerate() {
        for bi in 0..b {
            let row = ci * b + bi;
            let ps: Vec<usize> = match site.slot.and_then(|s| positions.index(s, bi)) {
                Some(p) => vec![p],
                None => (0..dims[pos_axis]).collect(),
            };
            let hs: Vec<usize> = match (site.head, head_axis) {
                (Some(h), Some(_)) => vec![h],
                (None, Some(ax)) => (0..dims[ax]).collect(),
                _ => vec![0],
            };
            for &p in &ps {
                for &h in &hs {
                    let mut i = row * strides[0] + p * strides[pos_axis];
                    if let Some(ax) = head_axis {
                        i += h * strides[ax];
                    }
                    v[i] = 1.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?)
}
