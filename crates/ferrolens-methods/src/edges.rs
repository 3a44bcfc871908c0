//! Edge attribution patching (EAP, Syed et al. 2023) between heads, MLPs and the logits.
//!
//! `score(s -> r) = sum over batch and positions of (out_s(clean) - out_s(corrupt)) . dM/d(in_r)`,
//! where `out_s` is what sender `s` writes to the residual stream (a head's `hook_result`, an
//! MLP's `hook_mlp_out`) and `in_r` is receiver `r`'s residual input. Receivers are sublayers:
//! the attention block of layer L (gradient at `hook_attn_in`, the block's own copy of the
//! residual, so the skip path is excluded), the MLP of layer L (`hook_mlp_in`), and the logits
//! (the last `hook_resid_post`, which only the final norm reads); with
//! [`EdgeOptions::head_inputs`] the attention block is split into the query input of every head
//! and the key and value inputs of every KV head (the gradient of one path only: `hook_q`'s
//! gradient for that head times `W_Q`'s columns of that head, then back through `ln1` with the
//! model's own [`HookedTransformer::norm_vjp`]), as TransformerLens's `use_split_qkv_input`
//! receivers. Families whose attention output passes a norm before the residual (Gemma's
//! sandwich norms, OLMo-2) write `ln1_post(sum of heads)`: a head's write is linearised at the
//! corrupt run with [`HookedTransformer::norm_jvp`], so the heads' writes still add up to the
//! block's to first order. Parallel blocks (GPT-NeoX) have no edge from a layer's heads to its
//! own MLP. One clean forward, one corrupt forward and backward; the scores of one sender layer
//! into one receiver layer are one matrix product.

use crate::circuit::Node;
use crate::patching::PatchingData;
use crate::path::HeadInput;
use candle_core::{DType, Tensor};
use ferrolens_model::layout::{broadcast_matmul, matmul};
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, NormSite, Result};
use serde::{Deserialize, Serialize};

/// A receiver of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Receiver {
    /// The attention block of a layer (all its heads, through Q, K and V).
    Attn(usize),
    /// One input of one head of a layer ([`EdgeOptions::head_inputs`]): `(layer, index, input)`,
    /// the index being the query head for `Q` and the KV head for `K` / `V` (equal to the head
    /// without grouped-query attention; KV head g serves query heads `g*h/kv .. (g+1)*h/kv`).
    Head(usize, usize, HeadInput),
    /// The MLP of a layer.
    Mlp(usize),
    /// The unembedding.
    Logits,
}

impl Receiver {
    /// `ATTN5` / `L5H3.q`, `L5KV1.k`, `L5KV1.v` / `MLP5` / `LOGITS`.
    pub fn label(&self) -> String {
        match self {
            Receiver::Attn(l) => format!("ATTN{l}"),
            Receiver::Head(l, h, HeadInput::Q) => format!("L{l}H{h}.q"),
            Receiver::Head(l, g, HeadInput::K) => format!("L{l}KV{g}.k"),
            Receiver::Head(l, g, HeadInput::V) => format!("L{l}KV{g}.v"),
            Receiver::Mlp(l) => format!("MLP{l}"),
            Receiver::Logits => "LOGITS".into(),
        }
    }

    /// The query heads whose computation this receiver feeds (`group` = heads per KV head).
    pub fn heads(&self, n_heads: usize, group: usize) -> Vec<usize> {
        match self {
            Receiver::Attn(_) => (0..n_heads).collect(),
            Receiver::Head(_, h, HeadInput::Q) => vec![*h],
            Receiver::Head(_, g, _) => (g * group..(g + 1) * group).collect(),
            Receiver::Mlp(_) | Receiver::Logits => vec![],
        }
    }
}

/// Options of [`edge_attribution`].
#[derive(Debug, Clone, Copy, Default)]
pub struct EdgeOptions {
    /// Split attention receivers into per-head query inputs and per-KV-head key and value inputs.
    pub head_inputs: bool,
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

/// EAP scores of every (sender, receiver) edge with the sender upstream of the receiver
/// (attention receivers per block, or per head input with [`EdgeOptions::head_inputs`]).
pub fn edge_attribution(model: &HookedTransformer, data: &PatchingData, opts: &EdgeOptions) -> Result<Vec<Edge>> {
    data.check()?;
    let (clean, corrupt, metric) = (data.clean, data.corrupt, data.metric);
    let cfg = &model.cfg;
    let n = cfg.n_layers;
    let (nh, nkv, dh) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
    let senders: Vec<HookPoint> = (0..n).flat_map(|l| [HookPoint::Result(l), HookPoint::MlpOut(l)]).collect();
    let mut hc = Hooks::new().cache_hooks(&senders);
    // The clean run's logits are not read: it stops after the last block.
    model.run_span(Some(clean), &data.cache_span(n), &mut hc)?;
    let hc = hc.take_cache();
    let mut grads = vec![HookPoint::ResidPost(n - 1)];
    let mut cache = senders.clone();
    for l in 0..n {
        grads.extend([HookPoint::AttnIn(l), HookPoint::MlpIn(l)]);
        if opts.head_inputs {
            grads.extend([HookPoint::Q(l), HookPoint::K(l), HookPoint::V(l)]);
            cache.push(HookPoint::AttnIn(l));
        }
    }
    let mut hk = Hooks::new().cache_hooks(&cache).grad(&grads);
    // The gradient run unembeds the last position's columns the metric reads.
    let (span, reduced) = data.metric_span()?;
    let metric = reduced.as_deref().unwrap_or(metric);
    let run = model.run_span_with_grads(Some(corrupt), &span, &mut hk, |logits| Ok(metric.per_row(logits)?.mean_all()?))?;
    let hk = hk.take_cache();
    let (b, p, _, d) = hk.get(HookPoint::Result(0))?.dims4()?;
    let flat = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F64)?.reshape((1, b * p * d))?) };

    // Receivers of each layer (index n: the logits) with their input gradients, one row each
    // of a [receivers, b*p*D] f64 matrix.
    let receivers_of = |l: usize| -> Result<(Vec<Receiver>, Tensor)> {
        if l == n {
            return Ok((vec![Receiver::Logits], flat(run.grads[&HookPoint::ResidPost(n - 1)].clone())?));
        }
        let bw = &model.w.blocks[l];
        let mut rs = Vec::new();
        let mut rows = Vec::new();
        if opts.head_inputs {
            // dM/d(ln1 output) along one head's path: g_hook [b,p,1,dh] . W[:, head cols]^T,
            // then back through ln1 (identity for a model without it).
            let attn_in = hk.get(HookPoint::AttnIn(l))?;
            for (input, hook, w, count) in [
                (HeadInput::Q, HookPoint::Q(l), &bw.attn.w_q, nh),
                (HeadInput::K, HookPoint::K(l), &bw.attn.w_k, nkv),
                (HeadInput::V, HookPoint::V(l), &bw.attn.w_v, nkv),
            ] {
                let g = run.grads[&hook].to_dtype(DType::F64)?;
                let w = w.to_dtype(DType::F64)?;
                for i in 0..count {
                    let gi = g.narrow(2, i, 1)?.squeeze(2)?.contiguous()?; // [b,p,dh]
                    let wi = w.narrow(1, i * dh, dh)?.t()?.contiguous()?; // [dh,D]
                    let gx = broadcast_matmul(&gi, &wi)?; // [b,p,D]
                    rows.push(flat(model.norm_vjp(NormSite::Ln1(l), attn_in, &gx)?)?);
                    rs.push(Receiver::Head(l, i, input));
                }
            }
        } else {
            rows.push(flat(run.grads[&HookPoint::AttnIn(l)].clone())?);
            rs.push(Receiver::Attn(l));
        }
        rows.push(flat(run.grads[&HookPoint::MlpIn(l)].clone())?);
        rs.push(Receiver::Mlp(l));
        Ok((rs, Tensor::cat(&rows, 0)?))
    };
    // Senders of each layer: the heads' output differences, then the MLP's, [h+1, b*p*D] f64.
    let senders_of = |l: usize| -> Result<Tensor> {
        let rk = hk.get(HookPoint::Result(l))?;
        let dres = (hc.get(HookPoint::Result(l))? - rk)?.to_dtype(DType::F64)?; // [b,p,h,D]
        let dres = if model.w.blocks[l].ln1_post.is_some() {
            // The block writes ln1_post(sum_h result_h + b_O): linearise at the corrupt run.
            let mut x = rk.sum_keepdim(2)?; // [b,p,1,D]
            if let Some(bo) = &model.w.blocks[l].attn.b_o {
                x = x.broadcast_add(bo)?;
            }
            model.norm_jvp(NormSite::Ln1Post(l), &x, &dres)?
        } else {
            dres
        };
        let dres = dres.permute((2, 0, 1, 3))?.contiguous()?.reshape((nh, b * p * d))?;
        let dmlp = flat((hc.get(HookPoint::MlpOut(l))? - hk.get(HookPoint::MlpOut(l))?)?)?;
        Ok(Tensor::cat(&[dres, dmlp], 0)?)
    };
    let senders: Vec<Tensor> = (0..n).map(senders_of).collect::<Result<_>>()?;
    let parallel = cfg.parallel_attn_mlp;
    let mut edges = Vec::new();
    for rl in 0..=n {
        let (rs, g) = receivers_of(rl)?;
        let gt = g.t()?.contiguous()?;
        for (sl, sender) in senders.iter().enumerate().take(rl.min(n - 1) + 1) {
            let scores = matmul(sender, &gt)?.to_vec2::<f64>()?; // [h+1, receivers]
            for (j, r) in rs.iter().enumerate() {
                // Heads feed their own layer's MLP (not in a parallel block) and everything later;
                // an MLP feeds later layers.
                let heads_ok = match r {
                    Receiver::Mlp(_) => sl < rl || !parallel,
                    Receiver::Logits => true,
                    _ => sl < rl,
                };
                let mlp_ok = sl < rl;
                if heads_ok {
                    for (h, row) in scores.iter().take(nh).enumerate() {
                        edges.push(Edge { sender: Node::Head(sl, h), receiver: *r, score: row[j] });
                    }
                }
                if mlp_ok {
                    edges.push(Edge { sender: Node::Mlp(sl), receiver: *r, score: scores[nh][j] });
                }
            }
        }
    }
    Ok(edges)
}

impl std::str::FromStr for Receiver {
    type Err = Error;
    /// The labels of [`Receiver::label`]: `ATTN5`, `L5H3.q`, `L5KV1.k`, `L5KV1.v`, `MLP5`, `LOGITS`.
    fn from_str(s: &str) -> Result<Receiver> {
        let t = s.trim();
        let bad = || Error::Input(format!("`{s}` is not an edge receiver; write ATTN5, L5H3.q, L5KV1.k, L5KV1.v, MLP5 or LOGITS"));
        let num = |x: &str| x.parse::<usize>().map_err(|_| bad());
        if t == "LOGITS" {
            return Ok(Receiver::Logits);
        }
        if let Some(l) = t.strip_prefix("ATTN") {
            return Ok(Receiver::Attn(num(l)?));
        }
        if let Some(l) = t.strip_prefix("MLP") {
            return Ok(Receiver::Mlp(num(l)?));
        }
        let rest = t.strip_prefix('L').ok_or_else(bad)?;
        let (head, input) = rest.split_once('.').ok_or_else(bad)?;
        let (l, sep, h) = match (head.split_once("KV"), head.split_once('H')) {
            (Some((l, g)), _) => (l, "KV", g),
            (None, Some((l, h))) => (l, "H", h),
            _ => return Err(bad()),
        };
        let input = match (sep, input) {
            ("H", "q") => HeadInput::Q,
            ("KV", "k") => HeadInput::K,
            ("KV", "v") => HeadInput::V,
            _ => return Err(bad()),
        };
        Ok(Receiver::Head(num(l)?, num(h)?, input))
    }
}

impl std::fmt::Display for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receivers_and_nodes_parse_their_labels() {
        let all = [
            Receiver::Attn(5),
            Receiver::Head(5, 3, HeadInput::Q),
            Receiver::Head(12, 1, HeadInput::K),
            Receiver::Head(0, 2, HeadInput::V),
            Receiver::Mlp(29),
            Receiver::Logits,
        ];
        for r in all {
            assert_eq!(r.label().parse::<Receiver>().unwrap(), r, "{}", r.label());
        }
        for bad in ["L5H3.k", "L5KV1.q", "L5H3", "ATTNx", "X5", "L5.q", ""] {
            assert!(bad.parse::<Receiver>().unwrap_err().to_string().contains("not an edge receiver"), "{bad}");
        }
        assert_eq!("L5H3".parse::<Node>().unwrap(), Node::Head(5, 3));
        assert_eq!("MLP7".parse::<Node>().unwrap(), Node::Mlp(7));
        assert!("L5".parse::<Node>().is_err());
    }
}
