//! Edge circuits in the computational graph the Mechanistic Interpretability Benchmark scores
//! (MIB, Mueller et al. 2025, whose circuit track runs Hanna et al.'s EAP-IG code): which edges
//! exist, how a circuit is picked from edge scores, and how a circuit is run.
//!
//! **Graph.** Senders are the input (`hook_embed`, the token embedding; learned position
//! embeddings are not a node, as in EAP-IG), every attention head (its `hook_result`) and every
//! MLP (`hook_mlp_out`). Receivers are, with [`EdgeGraph::new`]'s `head_inputs`, every head's
//! query input and every KV head's key and value inputs (TransformerLens's split-qkv inputs; a
//! grouped-query model has one key and one value receiver per KV head, where MIB's GPT-2 has one
//! per head), otherwise one input per attention block; then every MLP's input and the logits.
//! An edge joins a sender to every receiver downstream of it: heads feed their own layer's MLP
//! (not in a parallel block, GPT-NeoX) and every later layer, MLPs and the input feed later
//! layers. GPT-2 small with per-head inputs has 32,491 edges, MIB's count.
//!
//! **Running a circuit** ([`edge_patched_metric`]): the clean prompts run, and every receiver's
//! input has, for each edge into it *not* in the circuit, the sender's current output replaced
//! by its ablated output (the corrupt run's output, or its mean over a reference batch): input
//! `+ sum over missing edges (ablated_s - current_s)`, exactly EAP-IG's `evaluate_graph`. A
//! receiver with every edge present sees the unmodified residual stream; the empty circuit
//! reproduces the corrupt run (counterfactual ablation). A head input is rebuilt from its own
//! residual copy: `W_Q[h] . ln1(attn_in + delta_h) + b_Q[h]`. Families whose attention output
//! passes a norm (Gemma's sandwich norms, OLMo-2) do not add heads linearly: there each
//! receiver sees `ln1_post(sum of its heads' mixed outputs + b_O)` for that layer, exact too.

use crate::circuit::{position_mean, position_weights, Node};
use crate::edges::Receiver;
use crate::patching::PatchingData;
use crate::path::HeadInput;
use candle_core::{DType, Tensor};
use ferrolens_model::layout::matmul;
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, NormSite, Patch, Result, RunSpan};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A sender of an edge: the input embedding, a head or an MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Sender {
    /// The token embedding (`hook_embed`).
    Input,
    /// Attention head `(layer, head)` (`hook_result`).
    Head(usize, usize),
    /// The MLP of a layer (`hook_mlp_out`).
    Mlp(usize),
}

impl Sender {
    /// `INPUT` / `L5H3` / `MLP5`.
    pub fn label(&self) -> String {
        match self {
            Sender::Input => "INPUT".into(),
            Sender::Head(l, h) => Node::Head(*l, *h).label(),
            Sender::Mlp(l) => Node::Mlp(*l).label(),
        }
    }

    /// The circuit node (`None` for the input).
    pub fn node(&self) -> Option<Node> {
        match self {
            Sender::Input => None,
            Sender::Head(l, h) => Some(Node::Head(*l, *h)),
            Sender::Mlp(l) => Some(Node::Mlp(*l)),
        }
    }
}

impl std::fmt::Display for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

impl std::str::FromStr for Sender {
    type Err = Error;
    /// `INPUT`, `L5H3` or `MLP5`.
    fn from_str(s: &str) -> Result<Sender> {
        if s.trim() == "INPUT" {
            return Ok(Sender::Input);
        }
        Ok(match s.parse::<Node>().map_err(|_| Error::Input(format!("`{s}` is not an edge sender; write INPUT, L5H3 or MLP5")))? {
            Node::Head(l, h) => Sender::Head(l, h),
            Node::Mlp(l) => Sender::Mlp(l),
        })
    }
}

/// The edges of a model's graph (see the module docs), in a fixed order: receivers in forward
/// order, and within a receiver its senders in forward order.
#[derive(Debug, Clone)]
pub struct EdgeGraph {
    /// Every sender: the input, then each layer's heads and MLP. Index = sender id.
    pub senders: Vec<Sender>,
    /// Every receiver: each layer's head inputs (query heads, then key and value KV heads) or
    /// attention block, then its MLP; the logits last.
    pub receivers: Vec<Receiver>,
    /// `(sender id, receiver id)` of every edge.
    pub edges: Vec<(usize, usize)>,
    /// Per-head query/key/value receivers (else one per attention block).
    pub head_inputs: bool,
    n_layers: usize,
    n_heads: usize,
    n_kv: usize,
    parallel: bool,
    index: HashMap<(usize, usize), usize>,
}

impl EdgeGraph {
    /// The graph of `model`: per-head q/k/v receivers with `head_inputs`, else per block.
    pub fn new(model: &HookedTransformer, head_inputs: bool) -> EdgeGraph {
        let cfg = &model.cfg;
        EdgeGraph::from_shape(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.parallel_attn_mlp, head_inputs)
    }

    /// The graph of a model of `n` layers of `nh` heads (`nkv` KV heads), with parallel
    /// attention and MLP blocks or not; from its shape alone (edge counts, plans).
    pub fn from_shape(n: usize, nh: usize, nkv: usize, parallel: bool, head_inputs: bool) -> EdgeGraph {
        let mut senders = vec![Sender::Input];
        let mut receivers = Vec::new();
        for l in 0..n {
            senders.extend((0..nh).map(|h| Sender::Head(l, h)));
            senders.push(Sender::Mlp(l));
            if head_inputs {
                receivers.extend((0..nh).map(|h| Receiver::Head(l, h, HeadInput::Q)));
                receivers.extend((0..nkv).map(|g| Receiver::Head(l, g, HeadInput::K)));
                receivers.extend((0..nkv).map(|g| Receiver::Head(l, g, HeadInput::V)));
            } else {
                receivers.push(Receiver::Attn(l));
            }
            receivers.push(Receiver::Mlp(l));
        }
        receivers.push(Receiver::Logits);
        let mut g = EdgeGraph { senders, receivers, edges: Vec::new(), head_inputs, n_layers: n, n_heads: nh, n_kv: nkv, parallel, index: HashMap::new() };
        for (ri, r) in g.receivers.iter().enumerate() {
            for (si, s) in g.senders.iter().enumerate() {
                if g.allowed(*s, *r) {
                    g.index.insert((si, ri), g.edges.len());
                    g.edges.push((si, ri));
                }
            }
        }
        g
    }

    /// An error unless this graph has `model`'s shape (layers, heads, KV heads, block layout).
    pub fn check(&self, model: &HookedTransformer) -> Result<()> {
        let c = &model.cfg;
        if (self.n_layers, self.n_heads, self.n_kv, self.parallel) != (c.n_layers, c.n_heads, c.n_kv_heads, c.parallel_attn_mlp) {
            return Err(Error::Input(format!(
                "the edge graph is of a model with {} layers of {} heads ({} KV heads), not of {} ({} layers of {} heads, {} KV heads); build it with EdgeGraph::new(&model, ..)",
                self.n_layers, self.n_heads, self.n_kv, c.name, c.n_layers, c.n_heads, c.n_kv_heads
            )));
        }
        Ok(())
    }

    /// Number of edges.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// Whether the graph has no edges (never, for a model with a layer).
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// Whether `s -> r` is an edge of this model's graph.
    pub fn allowed(&self, s: Sender, r: Receiver) -> bool {
        let rl = self.receiver_layer(r);
        match (s, r) {
            (_, Receiver::Logits) => true,
            (Sender::Input, _) => true,
            (Sender::Head(sl, _), Receiver::Mlp(_)) => sl < rl || (sl == rl && !self.parallel),
            (Sender::Head(sl, _), _) | (Sender::Mlp(sl), _) => sl < rl,
        }
    }

    /// The layer of a receiver (`n_layers` for the logits).
    pub fn receiver_layer(&self, r: Receiver) -> usize {
        match r {
            Receiver::Attn(l) | Receiver::Head(l, _, _) | Receiver::Mlp(l) => l,
            Receiver::Logits => self.n_layers,
        }
    }

    /// The id of a sender.
    pub fn sender_id(&self, s: Sender) -> usize {
        match s {
            Sender::Input => 0,
            Sender::Head(l, h) => 1 + l * (self.n_heads + 1) + h,
            Sender::Mlp(l) => 1 + l * (self.n_heads + 1) + self.n_heads,
        }
    }

    /// The index of edge `s -> r` in [`EdgeGraph::edges`], if it is an edge.
    pub fn edge_index(&self, s: Sender, r: Receiver) -> Option<usize> {
        let ri = self.receivers.iter().position(|x| *x == r)?;
        self.index.get(&(self.sender_id(s), ri)).copied()
    }

    /// The index of the edge from sender id `s` to receiver id `r`, if it is an edge.
    pub fn edge_at(&self, s: usize, r: usize) -> Option<usize> {
        self.index.get(&(s, r)).copied()
    }

    /// `(sender, receiver)` labels of edge `i`, e.g. `("L5H3", "L9H6.q")`.
    pub fn labels(&self, i: usize) -> (String, String) {
        let (s, r) = self.edges[i];
        (self.senders[s].label(), self.receivers[r].label())
    }

    /// The sender ids of the heads and MLPs a receiver feeds (node ids are sender ids; the
    /// logits feed none).
    fn receiver_nodes(&self, r: Receiver) -> Vec<usize> {
        let group = self.n_heads / self.n_kv.max(1);
        match r {
            Receiver::Mlp(l) => vec![self.sender_id(Sender::Mlp(l))],
            Receiver::Logits => vec![],
            _ => {
                let l = self.receiver_layer(r);
                r.heads(self.n_heads, group).into_iter().map(|h| self.sender_id(Sender::Head(l, h))).collect()
            }
        }
    }

    /// The `n` highest-scoring edges (by `|score|` when `absolute`), as MIB's `apply_topn`:
    /// ties keep the graph's order. Errors on a score that is not finite.
    pub fn top_n(&self, scores: &[f64], n: usize, absolute: bool) -> Result<Vec<bool>> {
        if scores.len() != self.len() {
            return Err(Error::Input(format!("{} edge scores for a graph of {} edges", scores.len(), self.len())));
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            let (s, r) = self.labels(i);
            return Err(Error::Input(format!("the score of edge {s} -> {r} is {}; edge scores must be finite", scores[i])));
        }
        Ok(top_flags(scores, n, absolute))
    }

    /// Drop edges off every input-to-logits path: repeatedly, a head or MLP without a kept edge
    /// into it (any of its query/key/value inputs) or without a kept edge out of it leaves the
    /// circuit with its edges, until nothing changes (the input needs an edge out, the logits
    /// an edge in). Under counterfactual patching a dropped edge carried the corrupt output
    /// anyway (its sender saw only corrupt inputs), so pruning changes the edge count, not the
    /// metric.
    pub fn prune(&self, in_graph: &[bool]) -> Vec<bool> {
        let mut keep = in_graph.to_vec();
        let nodes = self.senders.len();
        let recv_nodes: Vec<Vec<usize>> = self.receivers.iter().map(|r| self.receiver_nodes(*r)).collect();
        loop {
            let mut has_in = vec![false; nodes];
            let mut has_out = vec![false; nodes];
            has_in[0] = true;
            for (e, &(s, r)) in self.edges.iter().enumerate() {
                if keep[e] {
                    has_out[s] = true;
                    for &t in &recv_nodes[r] {
                        has_in[t] = true;
                    }
                }
            }
            let alive: Vec<bool> = (0..nodes).map(|i| has_in[i] && has_out[i]).collect();
            let mut changed = false;
            for (e, &(s, r)) in self.edges.iter().enumerate() {
                let child_alive = self.receivers[r] == Receiver::Logits || recv_nodes[r].iter().any(|&t| alive[t]);
                if keep[e] && !(alive[s] && child_alive) {
                    keep[e] = false;
                    changed = true;
                }
            }
            if !changed {
                return keep;
            }
        }
    }

    /// Every edge from a kept node to a kept node or to the logits (`nodes` indexed by sender
    /// id, the input included): how a node circuit becomes an edge circuit (MIB's node-level
    /// `apply_topn`).
    pub fn edges_between(&self, nodes: &[bool]) -> Vec<bool> {
        let recv_nodes: Vec<Vec<usize>> = self.receivers.iter().map(|r| self.receiver_nodes(*r)).collect();
        self.edges.iter().map(|&(s, r)| nodes[s] && (self.receivers[r] == Receiver::Logits || recv_nodes[r].iter().any(|&t| nodes[t]))).collect()
    }

    /// Chunk of a sender id: 0 the input, `1 + 2l` layer `l`'s heads, `2 + 2l` its MLP.
    fn chunk_of(&self, s: usize) -> (usize, usize) {
        if s == 0 {
            return (0, 0);
        }
        let (l, i) = ((s - 1) / (self.n_heads + 1), (s - 1) % (self.n_heads + 1));
        if i < self.n_heads {
            (1 + 2 * l, i)
        } else {
            (2 + 2 * l, 0)
        }
    }
}

/// Flags of the `n` highest `scores` (by `|score|` when `absolute`), ties in index order: the
/// selection of MIB's `apply_topn`, for edges and for nodes.
pub(crate) fn top_flags(scores: &[f64], n: usize, absolute: bool) -> Vec<bool> {
    let key = |i: usize| if absolute { scores[i].abs() } else { scores[i] };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
    let mut keep = vec![false; scores.len()];
    for &i in order.iter().take(n) {
        keep[i] = true;
    }
    keep
}

/// How edges outside a circuit are ablated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum EdgeAblation {
    /// Counterfactual: the sender's output on the paired corrupt prompt (MIB's default).
    #[default]
    #[cfg_attr(feature = "clap", value(name = "cf"))]
    Counterfactual,
    /// The sender's output averaged over the corrupt prompts, per position.
    #[cfg_attr(feature = "clap", value(name = "mean"))]
    Mean,
}

impl EdgeAblation {
    /// `cf` / `mean`.
    pub fn name(&self) -> &'static str {
        match self {
            EdgeAblation::Counterfactual => "cf",
            EdgeAblation::Mean => "mean",
        }
    }
}

/// The ablated output of every sender: the input `[b|1, p, D]`, each layer's heads
/// `[b|1, p, h, D]` and MLP `[b|1, p, D]` (a leading 1 for per-position means).
#[derive(Debug, Clone)]
pub struct AblatedSenders {
    /// The ablation these outputs implement.
    pub ablation: EdgeAblation,
    /// Chunk `c` as in the sender order: 0 the input, `1 + 2l` heads, `2 + 2l` MLP.
    pub chunks: Vec<Tensor>,
}

impl AblatedSenders {
    /// The sender outputs of `data.corrupt` (counterfactual) or their per-position means over
    /// `data.corrupt` (mean; left padding never enters a mean).
    pub fn new(model: &HookedTransformer, data: &PatchingData, ablation: EdgeAblation) -> Result<Self> {
        data.check()?;
        let mut c = sender_outputs(model, data.corrupt, data.mask)?;
        if ablation == EdgeAblation::Mean {
            let w = position_weights(data.mask)?;
            c = c.iter().map(|t| position_mean(t, w.as_ref())?.unsqueeze(0).map_err(Into::into)).collect::<Result<_>>()?;
        }
        Ok(AblatedSenders { ablation, chunks: c })
    }
}

/// Every sender's output on `tokens` (chunk order of [`AblatedSenders::chunks`]).
pub(crate) fn sender_outputs(model: &HookedTransformer, tokens: &Tensor, mask: Option<&Tensor>) -> Result<Vec<Tensor>> {
    let n = model.cfg.n_layers;
    let mut pts = vec![HookPoint::Embed];
    for l in 0..n {
        pts.extend([HookPoint::Result(l), HookPoint::MlpOut(l)]);
    }
    let mut hooks = Hooks::new().cache_hooks(&pts);
    model.run_span(Some(tokens), &RunSpan { last_logits_only: true, mask: mask.cloned(), ..Default::default() }, &mut hooks)?;
    let mut cache = hooks.take_cache();
    pts.iter().map(|h| cache.remove(*h).ok_or_else(|| Error::Input(format!("`{h}` was not cached")))).collect()
}

/// The receivers fed at one hook point, with the masks of their missing edges.
struct Group {
    /// `[R, S]` over the first `S` sender ids (1 = missing edge), for the senders whose outputs
    /// add into the residual stream; `None` when none is missing.
    additive: Option<Tensor>,
    /// Heads of layers whose attention output passes `ln1_post`: `(layer, mask [R, h])`.
    post_norm: Vec<(usize, Tensor)>,
    /// Which of the `R` receivers have a missing edge.
    touched: Vec<bool>,
}

struct Plan {
    model: HookedTransformer,
    /// Ablated outputs per chunk (input, then each layer's heads and MLP).
    ablated: Vec<Tensor>,
    groups: HashMap<HookPoint, Group>,
    n_senders: usize,
}

/// What one forward has produced so far.
#[derive(Default)]
struct Live {
    /// `ablated - current` of every recorded sender, `[senders, b*p*D]`, row = sender id: the
    /// senders recorded so far are a contiguous block of rows, so the receivers' product is one
    /// GEMM on operands every backend takes (a column block of the transposed layout is strided,
    /// which CUDA's matmul refuses: tests/layouts.rs).
    diffs: Option<Tensor>,
    /// Current heads' outputs of post-norm layers `[b,p,h,D]`.
    heads: HashMap<usize, Tensor>,
    attn_in: HashMap<usize, Tensor>,
    /// The key/value groups' additive deltas, computed with their layer's query group.
    pending: HashMap<HookPoint, Tensor>,
}

impl Plan {
    /// A sender hook: keep `ablated - current` (rows of its sender ids) for the receivers.
    fn record(&self, live: &mut Live, chunk: usize, x: &Tensor) -> Result<()> {
        let diff = self.ablated[chunk].broadcast_sub(x)?;
        let (rows, first) = if chunk % 2 == 1 {
            let l = (chunk - 1) / 2;
            if self.model.w.blocks[l].ln1_post.is_some() {
                live.heads.insert(l, x.clone());
                return Ok(());
            }
            let h = self.model.cfg.n_heads;
            (diff.permute((2, 0, 1, 3))?.contiguous()?, 1 + l * (h + 1))
        } else if chunk == 0 {
            (diff.unsqueeze(0)?, 0)
        } else {
            let l = (chunk - 2) / 2;
            (diff.unsqueeze(0)?, 1 + l * (self.model.cfg.n_heads + 1) + self.model.cfg.n_heads)
        };
        let s = rows.dim(0)?;
        // A split model's senders are on their layers' devices: the differences gather on the
        // home device (the receivers' products move back to theirs).
        let flat = self.model.to_home(rows.reshape((s, ()))?)?; // [s, bpD]
        if live.diffs.is_none() {
            live.diffs = Some(Tensor::zeros((self.n_senders, flat.dim(1)?), flat.dtype(), flat.device())?);
        }
        live.diffs.as_ref().expect("allocated").slice_set(&flat, 0, first)?;
        Ok(())
    }

    /// The additive part of [`Plan::delta`] for `hook`, `[R, b, p, D]`. A layer's query, key and
    /// value groups read the same senders: their products are one GEMM (one pass over the
    /// differences), the later groups' parts kept in `live.pending` until their hooks fire.
    fn additive(&self, live: &mut Live, hook: HookPoint, shape: (usize, usize, usize)) -> Result<Option<Tensor>> {
        if let Some(t) = live.pending.remove(&hook) {
            return Ok(Some(t));
        }
        let Some(m) = &self.groups[&hook].additive else { return Ok(None) };
        let (b, p, d) = shape;
        let later = match hook {
            HookPoint::Q(l) => vec![HookPoint::K(l), HookPoint::V(l)],
            HookPoint::K(l) => vec![HookPoint::V(l)],
            _ => vec![],
        };
        let mut parts = vec![(hook, m)];
        parts.extend(later.into_iter().filter_map(|h| self.groups.get(&h).and_then(|g| g.additive.as_ref()).map(|m| (h, m))));
        let width = m.dim(1)?;
        if parts.iter().any(|(_, m)| m.dim(1).ok() != Some(width)) {
            parts.truncate(1);
        }
        let diffs = live.diffs.as_ref().ok_or_else(|| Error::Input("no sender recorded before a receiver".into()))?;
        let masks: Vec<&Tensor> = parts.iter().map(|(_, m)| *m).collect();
        let all = Tensor::cat(&masks, 0)?; // [R_all, S]
        let prod = matmul(&all, &diffs.narrow(0, 0, width)?)?; // [R_all, S] x [S, b*p*D]
        let mut first = None;
        let mut at = 0;
        for (h, m) in parts {
            let r = m.dim(0)?;
            let t = self.at_receiver(h, prod.narrow(0, at, r)?.reshape((r, b, p, d))?)?;
            at += r;
            if first.is_none() {
                first = Some(t);
            } else {
                live.pending.insert(h, t);
            }
        }
        Ok(first)
    }

    /// `sum over missing edges (ablated - current)` for each receiver of `hook`'s group, `[R, b, p, D]`.
    fn delta(&self, live: &mut Live, hook: HookPoint, shape: (usize, usize, usize)) -> Result<Option<Tensor>> {
        let (b, p, d) = shape;
        let g = &self.groups[&hook];
        let mut acc = self.additive(live, hook, shape)?;
        for (l, m) in &g.post_norm {
            let cur = live.heads.get(l).ok_or_else(|| Error::Input(format!("heads of layer {l} not recorded before a receiver")))?;
            let diff = self.ablated[1 + 2 * l].broadcast_sub(cur)?;
            let h = diff.dim(2)?;
            let r = m.dim(0)?;
            let flat = diff.permute((2, 0, 1, 3))?.contiguous()?.reshape((h, b * p * d))?;
            let m = ferrolens_model::pipeline::Place::of(&flat).take(m.clone())?;
            let mixed = matmul(&m, &flat)?.reshape((r, b, p, d))?;
            let mut pre = cur.sum(2)?;
            if let Some(bo) = &self.model.w.blocks[*l].attn.b_o {
                pre = pre.broadcast_add(bo)?;
            }
            let out = self.model.apply_norm(NormSite::Ln1Post(*l), &pre)?;
            let new = self.model.apply_norm(NormSite::Ln1Post(*l), &mixed.broadcast_add(&pre.unsqueeze(0)?)?)?;
            let contrib = self.at_receiver(hook, new.broadcast_sub(&out.unsqueeze(0)?)?)?;
            acc = Some(match acc {
                Some(a) => (a + contrib)?,
                None => contrib,
            });
        }
        Ok(acc)
    }

    /// `t` on the place of receiver hook `hook`'s layer.
    fn at_receiver(&self, hook: HookPoint, t: Tensor) -> Result<Tensor> {
        match hook.layer() {
            Some(l) => self.model.to_layer(l, t),
            None => Ok(t),
        }
    }

    /// A receiver hook: the residual input (block, MLP, logits) plus its delta, or a head
    /// input rebuilt per head.
    fn receive(&self, live: &mut Live, hook: HookPoint, x: &Tensor) -> Result<Tensor> {
        let g = &self.groups[&hook];
        let (l, which) = match hook {
            HookPoint::Q(l) => (l, HeadInput::Q),
            HookPoint::K(l) => (l, HeadInput::K),
            HookPoint::V(l) => (l, HeadInput::V),
            _ => {
                let Some(delta) = self.delta(live, hook, x.dims3()?)? else { return Ok(x.clone()) };
                return Ok((x + delta.squeeze(0)?)?);
            }
        };
        let attn_in = live.attn_in.get(&l).ok_or_else(|| Error::Input(format!("hook_attn_in of layer {l} not recorded")))?.clone();
        let Some(delta) = self.delta(live, hook, attn_in.dims3()?)? else { return Ok(x.clone()) };
        let normed = self.model.apply_norm(NormSite::Ln1(l), &delta.broadcast_add(&attn_in.unsqueeze(0)?)?)?; // [R,b,p,D]
        let aw = &self.model.w.blocks[l].attn;
        let (w, bias) = match which {
            HeadInput::Q => (&aw.w_q, &aw.b_q),
            HeadInput::K => (&aw.w_k, &aw.b_k),
            HeadInput::V => (&aw.w_v, &aw.b_v),
        };
        let (r, b, p, d) = normed.dims4()?;
        let dh = self.model.cfg.d_head;
        let wr = w.reshape((d, r, dh))?.permute((1, 0, 2))?.contiguous()?; // [R, D, dh]
        let mut y = matmul(&normed.reshape((r, b * p, d))?, &wr)?; // [R, bp, dh]
        if let Some(bias) = bias {
            y = y.broadcast_add(&bias.reshape((r, 1, dh))?)?;
        }
        let y = y.reshape((r, b, p, dh))?.permute((1, 2, 0, 3))?.contiguous()?; // [b,p,R,dh]
        let keep: Vec<f32> = g.touched.iter().map(|&t| if t { 1.0 } else { 0.0 }).collect();
        let keep = Tensor::from_vec(keep, (1, 1, r, 1), x.device())?.to_dtype(x.dtype())?;
        Ok((x + (y - x)?.broadcast_mul(&keep)?)?)
    }
}

/// Hooks that run `in_graph` (one flag per edge of `graph`) as an edge circuit with the
/// senders' outputs of missing edges taken from `ablated`.
fn circuit_hooks(model: &HookedTransformer, graph: &EdgeGraph, in_graph: &[bool], ablated: &AblatedSenders) -> Result<Hooks> {
    graph.check(model)?;
    if in_graph.len() != graph.len() {
        return Err(Error::Input(format!("{} edge flags for a graph of {} edges", in_graph.len(), graph.len())));
    }
    let n = model.cfg.n_layers;
    let nh = model.cfg.n_heads;
    if ablated.chunks.len() != 1 + 2 * n {
        return Err(Error::Input("the ablated sender outputs belong to another model".into()));
    }
    let hook_of = |r: Receiver| match r {
        Receiver::Attn(l) => HookPoint::AttnIn(l),
        Receiver::Head(l, _, HeadInput::Q) => HookPoint::Q(l),
        Receiver::Head(l, _, HeadInput::K) => HookPoint::K(l),
        Receiver::Head(l, _, HeadInput::V) => HookPoint::V(l),
        Receiver::Mlp(l) => HookPoint::MlpIn(l),
        Receiver::Logits => HookPoint::ResidPost(n - 1),
    };
    // Receivers of each hook, in graph order (= head order within a q/k/v hook).
    let mut by_hook: Vec<(HookPoint, Vec<usize>)> = Vec::new();
    for (ri, r) in graph.receivers.iter().enumerate() {
        let h = hook_of(*r);
        match by_hook.last_mut() {
            Some((last, v)) if *last == h => v.push(ri),
            _ => by_hook.push((h, vec![ri])),
        }
    }
    let post_norm = |l: usize| model.w.blocks[l].ln1_post.is_some();
    let mut edges_into: Vec<Vec<(usize, usize)>> = vec![Vec::new(); graph.receivers.len()];
    for (e, &(s, r)) in graph.edges.iter().enumerate() {
        edges_into[r].push((s, e));
    }
    let mut groups = HashMap::new();
    let mut used_chunks = std::collections::BTreeSet::new();
    for (hook, rs) in by_hook {
        let width = rs.iter().flat_map(|&r| edges_into[r].iter().map(|(s, _)| s + 1)).max().unwrap_or(0);
        let mut add = vec![0f32; rs.len() * width];
        let mut post: HashMap<usize, Vec<f32>> = HashMap::new();
        let mut touched = vec![false; rs.len()];
        for (j, &ri) in rs.iter().enumerate() {
            for &(s, e) in &edges_into[ri] {
                if in_graph[e] {
                    continue;
                }
                let (c, k) = graph.chunk_of(s);
                used_chunks.insert(c);
                touched[j] = true;
                if c % 2 == 1 && post_norm((c - 1) / 2) {
                    post.entry((c - 1) / 2).or_insert_with(|| vec![0.0; rs.len() * nh])[j * nh + k] = 1.0;
                } else {
                    add[j * width + s] = 1.0;
                }
            }
        }
        if !touched.iter().any(|&t| t) {
            continue;
        }
        let additive =
            if add.iter().any(|&v| v != 0.0) { Some(Tensor::from_vec(add, (rs.len(), width), model.device())?.to_dtype(model.dtype())?) } else { None };
        let mut post_norm = Vec::new();
        for (l, v) in post {
            post_norm.push((l, Tensor::from_vec(v, (rs.len(), nh), model.device())?.to_dtype(model.dtype())?));
        }
        post_norm.sort_by_key(|(l, _)| *l);
        groups.insert(hook, Group { additive, post_norm, touched });
    }
    let plan = Arc::new(Plan {
        model: model.without_tokenizer(),
        // Each sender's ablated output on its layer's place (the input's on the home place).
        ablated: ablated
            .chunks
            .iter()
            .enumerate()
            .map(|(c, t)| if c == 0 { model.to_home(t.clone()) } else { model.to_layer((c - 1) / 2, t.clone()) })
            .collect::<Result<_>>()?,
        groups,
        n_senders: graph.senders.len(),
    });
    let live = Arc::new(Mutex::new(Live::default()));
    let wrap = |e: Error| candle_core::Error::Msg(e.to_string());
    let mut hooks = Hooks::new();
    // Record the senders whose outputs some missing edge replaces.
    for &c in &used_chunks {
        let hook = match c {
            0 => HookPoint::Embed,
            c if c % 2 == 1 => HookPoint::Result((c - 1) / 2),
            c => HookPoint::MlpOut((c - 2) / 2),
        };
        let (plan, live) = (plan.clone(), live.clone());
        hooks = hooks.patch(Patch::new(
            hook,
            Intervention::func(move |x, _| {
                plan.record(&mut live.lock().expect("one forward at a time"), c, x).map_err(wrap)?;
                Ok(x.clone())
            }),
        ));
    }
    if graph.head_inputs {
        for l in 0..n {
            if [HookPoint::Q(l), HookPoint::K(l), HookPoint::V(l)].iter().any(|h| plan.groups.contains_key(h)) {
                let live = live.clone();
                hooks = hooks.patch(Patch::new(
                    HookPoint::AttnIn(l),
                    Intervention::func(move |x, _| {
                        live.lock().expect("one forward at a time").attn_in.insert(l, x.clone());
                        Ok(x.clone())
                    }),
                ));
            }
        }
    }
    let receivers: Vec<HookPoint> = plan.groups.keys().copied().collect();
    for hook in receivers {
        let (plan, live) = (plan.clone(), live.clone());
        hooks = hooks.patch(Patch::new(
            hook,
            Intervention::func(move |x, h| {
                let mut live = live.lock().expect("one forward at a time");
                plan.receive(&mut live, h, x).map_err(wrap)
            }),
        ));
    }
    Ok(hooks)
}

/// The per-prompt metric `[b]` of `data.clean` run as the edge circuit `in_graph` (one flag per
/// edge of `graph`), missing edges carrying `ablated`'s sender outputs. All edges in: the clean
/// run; none: the corrupt run (counterfactual ablation).
pub fn edge_patched_metric(model: &HookedTransformer, data: &PatchingData, graph: &EdgeGraph, in_graph: &[bool], ablated: &AblatedSenders) -> Result<Vec<f64>> {
    data.check()?;
    let mut hooks = circuit_hooks(model, graph, in_graph, ablated)?;
    let (span, reduced) = data.metric_span()?;
    let logits = model.run_span(Some(data.clean), &span, &mut hooks)?;
    let v = reduced.as_deref().unwrap_or(data.metric).per_row(&logits)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some(x) = v.iter().find(|x| !x.is_finite()) {
        return Err(Error::Input(format!("the circuit's metric is {x} (not finite)")));
    }
    Ok(v)
}
