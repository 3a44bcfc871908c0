//! Attribution patching (AtP, Nanda 2023; Kramár et al. 2024) and relevance patching
//! (RelP, Jafari et al. 2025).
//!
//! `score(n) = sum over batch and features of (a_clean(n) - a_corrupt(n)) * g(n)`, with `g` the
//! gradient of the (mean) metric at the corrupt run (AtP), or the LRP propagation coefficient
//! obtained by the same backward pass with the rules of [`LrpRules`] switched on (RelP).
//! Two forwards and one backward score every component at once.

use crate::metrics::Metric;
use crate::scores::{Component, ScoreGrid};
use candle_core::{DType, Tensor, D};
use ferrolens_model::{HookPoint, HookedTransformer, Hooks, LrpRules, Result, RunSpan};

/// Options of an attribution run.
#[derive(Debug, Clone, Copy)]
pub struct AttributionOptions {
    /// LRP rules for the backward pass (`LrpRules::NONE` = AtP).
    pub rules: LrpRules,
    /// Take the gradient at the clean run instead of the corrupt run.
    pub at_clean: bool,
    /// Per-position scores (otherwise summed over positions).
    pub by_pos: bool,
}

impl Default for AttributionOptions {
    fn default() -> Self {
        AttributionOptions { rules: LrpRules::NONE, at_clean: false, by_pos: false }
    }
}

/// The outcome of [`attribution`]: one grid per component, plus the metric at the run where the
/// gradient was taken.
#[derive(Debug, Clone)]
pub struct Attribution {
    /// One grid per component requested.
    pub grids: Vec<ScoreGrid>,
    /// The metric at the gradient run.
    pub metric: f64,
}

/// AtP / RelP scores of `components` at every layer. `method` names the grids (`atp`, `relp`).
pub fn attribution(
    model: &HookedTransformer,
    clean: &Tensor,
    corrupt: &Tensor,
    metric: &dyn Metric,
    components: &[Component],
    method: &str,
    opts: &AttributionOptions,
) -> Result<Attribution> {
    attribution_with(model, clean, corrupt, metric, components, method, opts, &[])
}

/// [`attribution`] with extra interventions on the gradient run (e.g. GradDrop's stop-gradients).
#[allow(clippy::too_many_arguments)]
pub fn attribution_with(
    model: &HookedTransformer,
    clean: &Tensor,
    corrupt: &Tensor,
    metric: &dyn Metric,
    components: &[Component],
    method: &str,
    opts: &AttributionOptions,
    extra: &[ferrolens_model::Patch],
) -> Result<Attribution> {
    let (_, p) = clean.dims2()?;
    let n_layers = model.cfg.n_layers;
    let points: Vec<HookPoint> = components.iter().flat_map(|c| (0..n_layers).map(move |l| c.hook(l))).collect();
    let span = RunSpan { last_logits_only: true, ..Default::default() };
    let (other_tokens, grad_tokens) = if opts.at_clean { (corrupt, clean) } else { (clean, corrupt) };
    let mut other = Hooks::new().cache_hooks(&points);
    model.run_span(Some(other_tokens), &span, &mut other)?;
    let other = other.take_cache();
    let mut hooks = Hooks::new().grad(&points).cache_hooks(&points).lrp(opts.rules).patches(extra.iter().cloned());
    let run = model.run_span_with_grads(Some(grad_tokens), &span, &mut hooks, |logits| {
        let per_row = metric.per_row(logits)?;
        Ok(per_row.mean_all()?)
    })?;
    let at = hooks.take_cache();
    let mut grids = Vec::new();
    for &c in components {
        let by_pos = opts.by_pos;
        let mut grid = ScoreGrid::zeros(method, c, by_pos, n_layers, p, c.n_heads(model));
        for l in 0..n_layers {
            let h = c.hook(l);
            let (clean_act, corrupt_act) = if opts.at_clean { (at.get(h)?, other.get(h)?) } else { (other.get(h)?, at.get(h)?) };
            let prod = ((clean_act - corrupt_act)? * &run.grads[&h])?.to_dtype(DType::F64)?;
            // Sum over batch and features, keeping (pos, head).
            let s = match h.head_axis() {
                None => prod.sum(0)?.sum(D::Minus1)?.unsqueeze(1)?, // [p, 1]
                Some(2) => prod.sum(0)?.sum(D::Minus1)?,            // [p, h]
                Some(_) => prod.sum(0)?.sum(D::Minus1)?.t()?,       // pattern [h, q] -> [q, h]
            };
            let s = if by_pos { s } else { s.sum_keepdim(0)? };
            let v: Vec<Vec<f64>> = s.to_vec2()?;
            for (pi, row) in v.iter().enumerate() {
                for (hi, x) in row.iter().enumerate() {
                    let i = grid.idx(l, pi, hi);
                    grid.values[i] = *x;
                }
            }
        }
        grids.push(grid);
    }
    Ok(Attribution { grids, metric: run.metric })
}
