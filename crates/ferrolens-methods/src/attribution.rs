//! Attribution patching (AtP, Nanda 2023; Kramár et al. 2024) and relevance patching
//! (RelP, Jafari et al. 2025).
//!
//! `score(n) = sum over batch and features of (a_clean(n) - a_corrupt(n)) * g(n)`, with `g` the
//! gradient of the (mean) metric at the corrupt run (AtP), or the LRP propagation coefficient
//! obtained by the same backward pass with the rules of [`LrpRules`] switched on (RelP).
//! Two forwards and one backward score every component at once. In a left-padded batch the
//! padding positions have equal clean and corrupt activations (a pair shares its padding), so
//! they add nothing.

use crate::patching::PatchingData;
use crate::scores::{Component, Positions, ScoreGrid};
use candle_core::{DType, IndexOp, Tensor, D};
use ferrolens_model::{HookPoint, HookedTransformer, Hooks, LrpRules, Patch, Result};

/// Options of an attribution run.
#[derive(Debug, Clone, Default)]
pub struct AttributionOptions {
    /// The components to score at every layer.
    pub components: Vec<Component>,
    /// LRP rules for the backward pass (`LrpRules::NONE` = AtP).
    pub rules: LrpRules,
    /// Take the gradient at the clean run instead of the corrupt run.
    pub at_clean: bool,
    /// Which positions get scores of their own (all summed by default).
    pub positions: Positions,
    /// Extra interventions on the gradient run (e.g. GradDrop's stop-gradients).
    pub extra: Vec<Patch>,
    /// The grids' method name; `None`: `atp` without rules, `relp` with.
    pub name: Option<String>,
}

impl AttributionOptions {
    /// AtP of `components`.
    pub fn atp(components: &[Component]) -> Self {
        AttributionOptions { components: components.to_vec(), ..Default::default() }
    }

    /// RelP of `components` with RelP's default rules.
    pub fn relp(components: &[Component]) -> Self {
        AttributionOptions { components: components.to_vec(), rules: LrpRules::RELP, ..Default::default() }
    }

    /// With these positions scored separately.
    pub fn positions(mut self, p: Positions) -> Self {
        self.positions = p;
        self
    }

    /// The method name the grids carry.
    pub fn method_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| if self.rules.any() { "relp".into() } else { "atp".into() })
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

/// AtP / RelP scores of `opts.components` at every layer.
pub fn attribution(model: &HookedTransformer, data: &PatchingData, opts: &AttributionOptions) -> Result<Attribution> {
    let (b, p) = data.check()?;
    opts.positions.check(b, p)?;
    let n_layers = model.cfg.n_layers;
    let points: Vec<HookPoint> = opts.components.iter().flat_map(|c| (0..n_layers).map(move |l| c.hook(l))).collect();
    // The gradient run unembeds the columns its metric reads; the other run's logits are not
    // read at all, so it stops after the last block.
    let (span, reduced) = data.metric_span()?;
    let (other_tokens, grad_tokens) = if opts.at_clean { (data.corrupt, data.clean) } else { (data.clean, data.corrupt) };
    let mut other = Hooks::new().cache_hooks(&points);
    model.run_span(Some(other_tokens), &data.cache_span(n_layers), &mut other)?;
    let other = other.take_cache();
    let mut hooks = Hooks::new().grad(&points).cache_hooks(&points).lrp(opts.rules).patches(opts.extra.iter().cloned());
    let metric = reduced.as_deref().unwrap_or(data.metric);
    let run = model.run_span_with_grads(Some(grad_tokens), &span, &mut hooks, |logits| {
        let per_row = metric.per_row(logits)?;
        Ok(per_row.mean_all()?)
    })?;
    let at = hooks.take_cache();
    let method = opts.method_name();
    let mut grids = Vec::new();
    for &c in &opts.components {
        let mut grid = ScoreGrid::for_positions(&method, c, &opts.positions, n_layers, p, c.n_heads(model));
        for l in 0..n_layers {
            let h = c.hook(l);
            let (clean_act, corrupt_act) = if opts.at_clean { (at.get(h)?, other.get(h)?) } else { (other.get(h)?, at.get(h)?) };
            let prod = ((clean_act - corrupt_act)? * &run.grads[&h])?.to_dtype(DType::F64)?;
            // Sum over features, keeping (batch, pos, head): [b, p, heads].
            let s = match h.head_axis() {
                None => prod.sum(D::Minus1)?.unsqueeze(2)?,       // [b, p, 1]
                Some(2) => prod.sum(D::Minus1)?,                  // [b, p, h]
                Some(_) => prod.sum(D::Minus1)?.transpose(1, 2)?, // pattern [b, h, q] -> [b, q, h]
            };
            let v: Vec<Vec<Vec<f64>>> = s.to_vec3()?;
            for slot in 0..opts.positions.slots(p) {
                for hi in 0..grid.n_heads {
                    let mut total = 0.0;
                    for (row, rows) in v.iter().enumerate() {
                        total += match opts.positions.index(slot, row) {
                            Some(pos) => rows[pos][hi],
                            None => rows.iter().map(|r| r[hi]).sum::<f64>(),
                        };
                    }
                    let i = grid.idx(l, slot, hi);
                    grid.values[i] = total;
                }
            }
        }
        grids.push(grid);
    }
    Ok(Attribution { grids, metric: run.metric })
}

/// Per-row sums at labelled positions: `s[b, p, h]` picked at each row's label index (used by
/// methods that compute per-position terms themselves).
pub(crate) fn gather_slots(s: &Tensor, positions: &Positions, p: usize) -> Result<Vec<Vec<f64>>> {
    // -> [slots][heads]
    let (b, _, nh) = s.dims3()?;
    let mut out = vec![vec![0.0; nh]; positions.slots(p)];
    for (slot, o) in out.iter_mut().enumerate() {
        for row in 0..b {
            let part = match positions.index(slot, row) {
                Some(pos) => s.i((row, pos))?,
                None => s.i(row)?.sum(0)?,
            };
            for (x, v) in o.iter_mut().zip(part.to_vec1::<f64>()?) {
                *x += v;
            }
        }
    }
    Ok(out)
}
