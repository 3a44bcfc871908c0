//! Circuits as node sets, and their faithfulness under mean ablation.
//!
//! A node is an attention head (its `hook_z`, all positions) or a layer's MLP (`hook_mlp_out`).
//! Faithfulness of a circuit C: mean-ablate every node outside C (replace its activation by the
//! mean over a reference distribution, per position; for IOI the ABC corrupt prompts), run the
//! clean prompts, and report `metric(ablated) / metric(full model)` (Wang et al. 2022, Sec. 4).

use crate::patching::PatchingData;
use candle_core::{DType, Tensor};
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, Patch, Result, RunSpan};
use serde::{Deserialize, Serialize};

/// A circuit node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Node {
    /// Attention head `(layer, head)`.
    Head(usize, usize),
    /// MLP of a layer.
    Mlp(usize),
}

impl Node {
    /// `L5H3` / `MLP5`.
    pub fn label(&self) -> String {
        match self {
            Node::Head(l, h) => format!("L{l}H{h}"),
            Node::Mlp(l) => format!("MLP{l}"),
        }
    }

    /// The node's layer.
    pub fn layer(&self) -> usize {
        match self {
            Node::Head(l, _) | Node::Mlp(l) => *l,
        }
    }

    /// Every node of a model, heads first within a layer.
    pub fn all(model: &HookedTransformer) -> Vec<Node> {
        let mut v = Vec::new();
        for l in 0..model.cfg.n_layers {
            v.extend((0..model.cfg.n_heads).map(|h| Node::Head(l, h)));
            v.push(Node::Mlp(l));
        }
        v
    }
}

/// Per-position means of every `hook_z` and `hook_mlp_out` over a reference batch `[b, p]`.
/// In a left-padded batch (`mask`), position `i` averages the prompts that have a token there
/// (positions are aligned at the end, where every prompt's answer is read); padding never enters.
pub struct AblationMeans {
    z: Vec<Tensor>,   // per layer [p, h, d]
    mlp: Vec<Tensor>, // per layer [p, D]
}

impl AblationMeans {
    /// Means over `reference` tokens `[b, p]` (`mask` `[b, p]` for a left-padded batch).
    pub fn new(model: &HookedTransformer, reference: &Tensor, mask: Option<&Tensor>) -> Result<Self> {
        let n = model.cfg.n_layers;
        let pts: Vec<HookPoint> = (0..n).flat_map(|l| [HookPoint::Z(l), HookPoint::MlpOut(l)]).collect();
        let mut hooks = Hooks::new().cache_hooks(&pts);
        model.run_span(Some(reference), &RunSpan { last_logits_only: true, mask: mask.cloned(), ..Default::default() }, &mut hooks)?;
        let c = hooks.cache_ref();
        // Weights [b, p]: 1/count of real rows at each position (0 at padding).
        let w = match mask {
            Some(m) => {
                let m = m.to_dtype(DType::F32)?;
                let count = m.sum_keepdim(0)?.maximum(1.0)?; // [1, p]
                Some(m.broadcast_div(&count)?)
            }
            None => None,
        };
        let mean = |t: &Tensor| -> Result<Tensor> {
            Ok(match &w {
                None => t.mean(0)?,
                Some(w) => {
                    let mut shape = w.dims().to_vec();
                    shape.resize(t.rank(), 1);
                    t.broadcast_mul(&w.to_dtype(t.dtype())?.reshape(shape)?)?.sum(0)?
                }
            })
        };
        let mut z = Vec::new();
        let mut mlp = Vec::new();
        for l in 0..n {
            z.push(mean(c.get(HookPoint::Z(l))?)?);
            mlp.push(mean(c.get(HookPoint::MlpOut(l))?)?);
        }
        Ok(AblationMeans { z, mlp })
    }
}

/// Mean metric of `data.clean` (with `data.mask`) under `data.metric`, with everything outside
/// each circuit mean-ablated: one value per circuit. Circuits ride in batched forwards of at most
/// `max_rows` rows.
pub fn ablated_metric(model: &HookedTransformer, data: &PatchingData, means: &AblationMeans, circuits: &[Vec<Node>], max_rows: usize) -> Result<Vec<f64>> {
    let (tokens, metric) = (data.clean, data.metric);
    let (b, p) = data.check()?;
    if means.z.first().map(|t| t.dim(0).ok() != Some(p)).unwrap_or(true) {
        return Err(Error::Input("the ablation means were taken on prompts of another length".into()));
    }
    let n_layers = model.cfg.n_layers;
    let nh = model.cfg.n_heads;
    let per = (max_rows / b).max(1);
    let mut out = Vec::with_capacity(circuits.len());
    for group in circuits.chunks(per) {
        let c = group.len();
        let parts: Vec<&Tensor> = std::iter::repeat_n(tokens, c).collect();
        let rows = Tensor::cat(&parts, 0)?;
        let mut hooks = Hooks::new();
        for l in 0..n_layers {
            // 1 = ablate. Head mask [c*b, 1, h, 1]; MLP mask [c*b, 1, 1].
            let mut hm = vec![0f32; c * b * nh];
            let mut mm = vec![0f32; c * b];
            for (ci, circ) in group.iter().enumerate() {
                for bi in 0..b {
                    let r = ci * b + bi;
                    for h in 0..nh {
                        if !circ.contains(&Node::Head(l, h)) {
                            hm[r * nh + h] = 1.0;
                        }
                    }
                    if !circ.contains(&Node::Mlp(l)) {
                        mm[r] = 1.0;
                    }
                }
            }
            let dev = model.device();
            let hmask = Tensor::from_vec(hm, (c * b, 1, nh, 1), dev)?;
            let mmask = Tensor::from_vec(mm, (c * b, 1, 1), dev)?;
            hooks = hooks
                .patch(Patch::new(HookPoint::Z(l), Intervention::MeanAblate(means.z[l].clone())).mask(hmask))
                .patch(Patch::new(HookPoint::MlpOut(l), Intervention::MeanAblate(means.mlp[l].clone())).mask(mmask));
        }
        let span = RunSpan { last_logits_only: true, mask: data.mask_rows(c)?, ..Default::default() };
        let logits = model.run_span(Some(&rows), &span, &mut hooks)?;
        let v = metric.per_row(&logits)?.to_dtype(DType::F64)?.reshape((c, b))?.mean(1)?.to_vec1::<f64>()?;
        out.extend(v);
    }
    Ok(out)
}

/// One point of a faithfulness curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Number of nodes kept.
    pub size: usize,
    /// Metric with the rest mean-ablated, divided by the full model's metric.
    pub faithfulness: f64,
}

/// Faithfulness of the top-`k` prefixes of `ranked` for each `k` in `sizes`, given the full
/// model's mean metric `full`.
pub fn faithfulness_curve(
    model: &HookedTransformer,
    data: &PatchingData,
    means: &AblationMeans,
    ranked: &[Node],
    sizes: &[usize],
    full: f64,
    max_rows: usize,
) -> Result<Vec<CurvePoint>> {
    let circuits: Vec<Vec<Node>> = sizes.iter().map(|&k| ranked[..k.min(ranked.len())].to_vec()).collect();
    let v = ablated_metric(model, data, means, &circuits, max_rows)?;
    Ok(sizes.iter().zip(v).map(|(&size, m)| CurvePoint { size, faithfulness: m / full }).collect())
}

/// The smallest prefix of `ranked` whose faithfulness reaches `target`: scans `sizes`, then
/// bisects between the last size below the target and the first at or above it. Returns the size
/// and every point evaluated (sorted by size), or `None` when even all nodes fall short.
#[allow(clippy::too_many_arguments)]
pub fn smallest_faithful(
    model: &HookedTransformer,
    data: &PatchingData,
    means: &AblationMeans,
    ranked: &[Node],
    sizes: &[usize],
    full: f64,
    target: f64,
    max_rows: usize,
) -> Result<(Option<usize>, Vec<CurvePoint>)> {
    let mut pts = faithfulness_curve(model, data, means, ranked, sizes, full, max_rows)?;
    let first = pts.iter().position(|p| p.faithfulness >= target);
    let Some(i) = first else {
        return Ok((None, pts));
    };
    let (mut lo, mut hi) = (if i == 0 { 0 } else { pts[i - 1].size }, pts[i].size);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let p = faithfulness_curve(model, data, means, ranked, &[mid], full, max_rows)?.remove(0);
        if p.faithfulness >= target {
            hi = mid;
        } else {
            lo = mid;
        }
        pts.push(p);
    }
    pts.sort_by_key(|p| p.size);
    Ok((Some(hi), pts))
}
