//! Edge attribution patching (EAP, Syed et al. 2023) between heads, MLPs and the logits.
//!
//! `score(s -> r) = sum over batch and positions of (out_s(clean) - out_s(corrupt)) . dM/d(in_r)`,
//! where `out_s` is what sender `s` writes to the residual stream (a head's `hook_result`, an
//! MLP's `hook_mlp_out`) and `in_r` is receiver `r`'s residual input. Receivers are sublayers:
//! the attention block of layer L (input `resid_pre(L)`, gradient taken through `ln1` only), the
//! MLP of layer L (`resid_mid(L)` through `ln2` only), and the logits (`ln_final`). The gradient
//! through a norm is computed exactly from the gradient at its `hook_normalized`, so the skip
//! path around the receiver is excluded. One clean forward, one corrupt forward and backward.

use crate::circuit::Node;
use crate::metrics::Metric;
use candle_core::{DType, Tensor, D};
use ferrolens_model::{HookPoint, HookedTransformer, Hooks, NormKind, Result, RunSpan};
use serde::{Deserialize, Serialize};

/// A receiver of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Receiver {
    /// The attention block of a layer (all its heads, through Q, K and V).
    Attn(usize),
    /// The MLP of a layer.
    Mlp(usize),
    /// The unembedding.
    Logits,
}

impl Receiver {
    /// `ATTN5` / `MLP5` / `LOGITS`.
    pub fn label(&self) -> String {
        match self {
            Receiver::Attn(l) => format!("ATTN{l}"),
            Receiver::Mlp(l) => format!("MLP{l}"),
            Receiver::Logits => "LOGITS".into(),
        }
    }
}

/// One scored edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Edge {
    /// Sender node.
    pub sender: Node,
    /// Receiver sublayer.
    pub receiver: Receiver,
    /// EAP score.
    pub score: f64,
}

/// Gradient at a norm's input from the gradient at its `hook_normalized` (this path only).
fn through_norm(model: &HookedTransformer, x: &Tensor, scale: &Tensor, g_norm: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F64)?;
    let s = scale.to_dtype(DType::F64)?;
    let g = g_norm.to_dtype(DType::F64)?;
    Ok(match model.cfg.norm {
        NormKind::RmsNorm => {
            // hook_normalized = x / s (before the gain): dM/dx = (u - n * mean(n u)) / s.
            let n = x.broadcast_div(&s)?;
            let nu = (&n * &g)?.mean_keepdim(D::Minus1)?;
            (g - n.broadcast_mul(&nu)?)?.broadcast_div(&s)?
        }
        NormKind::LayerNorm => {
            // hook_normalized = n * w + b, n = (x - mean) / s: u = w * g.
            let u = g.broadcast_mul(&w.to_dtype(DType::F64)?)?;
            let n = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?.broadcast_div(&s)?;
            let nu = (&n * &u)?.mean_keepdim(D::Minus1)?;
            let um = u.mean_keepdim(D::Minus1)?;
            u.broadcast_sub(&um)?.sub(&n.broadcast_mul(&nu)?)?.broadcast_div(&s)?
        }
    })
}

/// EAP scores of every (sender, receiver) edge with the sender upstream of the receiver.
pub fn edge_attribution(model: &HookedTransformer, clean: &Tensor, corrupt: &Tensor, metric: &dyn Metric) -> Result<Vec<Edge>> {
    let n = model.cfg.n_layers;
    let span = RunSpan::default();
    let senders: Vec<HookPoint> = (0..n).flat_map(|l| [HookPoint::Result(l), HookPoint::MlpOut(l)]).collect();
    let mut hc = Hooks::new().cache_hooks(&senders);
    model.run_span(Some(clean), &span, &mut hc)?;
    let hc = hc.take_cache();
    let mut grads = vec![HookPoint::LnFinalNormalized];
    let mut cache = senders.clone();
    cache.extend([HookPoint::LnFinalScale, HookPoint::LnFinalNormalized, HookPoint::ResidPost(n - 1)]);
    for l in 0..n {
        grads.extend([HookPoint::Ln1Normalized(l), HookPoint::Ln2Normalized(l)]);
        cache.extend([HookPoint::ResidPre(l), HookPoint::ResidMid(l), HookPoint::Ln1Scale(l), HookPoint::Ln2Scale(l)]);
    }
    let mut hk = Hooks::new().cache_hooks(&cache).grad(&grads);
    let run = model.run_span_with_grads(Some(corrupt), &span, &mut hk, |logits| Ok(metric.per_row(logits)?.mean_all()?))?;
    let hk = hk.take_cache();
    // Receiver input gradients [b, p, D] (f64).
    let mut recv: Vec<(Receiver, Tensor)> = Vec::new();
    for l in 0..n {
        let b = &model.w.blocks[l];
        recv.push((Receiver::Attn(l), through_norm(model, hk.get(HookPoint::ResidPre(l))?, hk.get(HookPoint::Ln1Scale(l))?, &run.grads[&HookPoint::Ln1Normalized(l)], &b.ln1.w)?));
        recv.push((Receiver::Mlp(l), through_norm(model, hk.get(HookPoint::ResidMid(l))?, hk.get(HookPoint::Ln2Scale(l))?, &run.grads[&HookPoint::Ln2Normalized(l)], &b.ln2.w)?));
    }
    recv.push((
        Receiver::Logits,
        through_norm(model, hk.get(HookPoint::ResidPost(n - 1))?, hk.get(HookPoint::LnFinalScale)?, &run.grads[&HookPoint::LnFinalNormalized], &model.w.ln_final.w)?,
    ));
    let mut edges = Vec::new();
    for l in 0..n {
        // Head output differences [b, p, h, D] and MLP [b, p, D].
        let dres = (hc.get(HookPoint::Result(l))? - hk.get(HookPoint::Result(l))?)?.to_dtype(DType::F64)?;
        let dmlp = (hc.get(HookPoint::MlpOut(l))? - hk.get(HookPoint::MlpOut(l))?)?.to_dtype(DType::F64)?;
        for (r, g) in &recv {
            let downstream = match r {
                Receiver::Attn(rl) => *rl > l,
                Receiver::Mlp(rl) => *rl >= l,
                Receiver::Logits => true,
            };
            if downstream {
                // Heads: sum_{b,p,D} dres[b,p,h,D] g[b,p,D] -> [h].
                let hs = dres.broadcast_mul(&g.unsqueeze(2)?)?.sum(D::Minus1)?.sum(1)?.sum(0)?.to_vec1::<f64>()?;
                for (h, s) in hs.into_iter().enumerate() {
                    edges.push(Edge { sender: Node::Head(l, h), receiver: *r, score: s });
                }
            }
            let mlp_down = match r {
                Receiver::Attn(rl) | Receiver::Mlp(rl) => *rl > l,
                Receiver::Logits => true,
            };
            if mlp_down {
                let s = (&dmlp * g)?.sum_all()?.to_scalar::<f64>()?;
                edges.push(Edge { sender: Node::Mlp(l), receiver: *r, score: s });
            }
        }
    }
    Ok(edges)
}
