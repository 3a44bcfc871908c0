//! Circuits as node sets, and their faithfulness under mean ablation.
//!
//! A node is an attention head (its `hook_z`, all positions) or a layer's MLP (`hook_mlp_out`).
//! Faithfulness of a circuit C: mean-ablate every node outside C (replace its activation by the
//! mean over a reference distribution, per position; for IOI the ABC corrupt prompts), run the
//! clean prompts, and report `metric(ablated) / metric(full model)` (Wang et al. 2022, Sec. 4).
//!
//! [`discover`] runs a whole circuit study (node scores, the smallest faithful circuit, EAP edges,
//! IOI head classes) as one call; `ferrolens discover` is this call plus the report.
//!
//! ```no_run
//! # use ferrolens_methods::circuit::{discover, DiscoverOptions};
//! # fn f(model: &ferrolens_model::HookedTransformer, batch: &ferrolens_tasks::PairBatch) -> ferrolens_model::Result<()> {
//! let found = discover(model, batch, "ioi", &DiscoverOptions::default())?;
//! println!("{} nodes at {:.1}%", found.circuit.size, 100.0 * found.circuit.faithfulness);
//! std::fs::write("circuit.json", serde_json::to_string_pretty(&found.circuit).unwrap()).unwrap();
//! # Ok(()) }
//! ```

use crate::edges::{edge_attribution, Edge, EdgeOptions, Receiver};
use crate::heads::attention_between;
use crate::patching::{Direction, PatchingData};
use crate::scores::{Component, ScoreGrid};
use crate::shard::Shard;
use crate::study::{planned_grids, prepare, run_methods, Batching, Method, MethodRun, Prepared, Progress, RunOptions};
use candle_core::{DType, Tensor};
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, LrpRules, Patch, Result, RunSpan};
use ferrolens_tasks::PairBatch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

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
        let w = position_weights(mask)?;
        let mean = |t: &Tensor| position_mean(t, w.as_ref());
        let mut z = Vec::new();
        let mut mlp = Vec::new();
        for l in 0..n {
            z.push(mean(c.get(HookPoint::Z(l))?)?);
            mlp.push(mean(c.get(HookPoint::MlpOut(l))?)?);
        }
        Ok(AblationMeans { z, mlp })
    }
}

/// Weights `[b, p]` of a per-position mean over a left-padded batch: 1/count of real rows at
/// each position, 0 at padding (`None` without a mask: a plain mean).
pub(crate) fn position_weights(mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(match mask {
        Some(m) => {
            let m = m.to_dtype(DType::F32)?;
            let count = m.sum_keepdim(0)?.maximum(1.0)?; // [1, p]
            Some(m.broadcast_div(&count)?)
        }
        None => None,
    })
}

/// The mean of `t` `[b, p, ...]` over the batch at each position, `[p, ...]`, with the
/// weights of [`position_weights`].
pub(crate) fn position_mean(t: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    Ok(match w {
        None => t.mean(0)?,
        Some(w) => {
            let mut shape = w.dims().to_vec();
            shape.resize(t.rank(), 1);
            t.broadcast_mul(&w.to_device(t.device())?.to_dtype(t.dtype())?.reshape(shape)?)?.sum(0)?
        }
    })
}

/// Mean metric of `data.clean` (with `data.mask`) under `data.metric`, with everything outside
/// each circuit mean-ablated: one value per circuit. Circuits ride in batched forwards of at most
/// `max_rows` rows.
pub fn ablated_metric(model: &HookedTransformer, data: &PatchingData, means: &AblationMeans, circuits: &[Vec<Node>], max_rows: usize) -> Result<Vec<f64>> {
    let (b, p) = data.check()?;
    // The runs unembed the last position's columns the metric reads.
    let (metric_span, reduced) = data.metric_span()?;
    let (tokens, metric, columns) = (data.clean, reduced.as_deref().unwrap_or(data.metric), metric_span.columns);
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
        let span = RunSpan { last_logits_only: true, mask: data.mask_rows(c)?, columns: columns.clone(), ..Default::default() };
        let logits = model.run_span(Some(&rows), &span, &mut hooks)?;
        let v = metric.per_row(&logits)?.to_dtype(DType::F64)?.reshape((c, b))?.mean(1)?.to_vec1::<f64>()?;
        out.extend(v);
    }
    Ok(out)
}

/// One point of a faithfulness curve.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Number of nodes kept.
    pub size: usize,
    /// Metric with the rest mean-ablated, divided by the full model's metric.
    pub faithfulness: f64,
}

/// How a circuit is scored: the rest of the model mean-ablated with `means`, the metric divided
/// by the full model's mean metric `full`, at most `max_rows` rows per forward.
#[derive(Clone, Copy)]
pub struct Ablation<'a> {
    /// The means written into every node outside the circuit.
    pub means: &'a AblationMeans,
    /// The full model's mean metric (faithfulness = circuit metric / this).
    pub full: f64,
    /// Largest number of rows (circuits x prompts) in one forward.
    pub max_rows: usize,
}

/// Faithfulness of the top-`k` prefixes of `ranked` for each `k` in `sizes`.
pub fn faithfulness_curve(model: &HookedTransformer, data: &PatchingData, ablation: &Ablation, ranked: &[Node], sizes: &[usize]) -> Result<Vec<CurvePoint>> {
    let circuits: Vec<Vec<Node>> = sizes.iter().map(|&k| ranked[..k.min(ranked.len())].to_vec()).collect();
    let v = ablated_metric(model, data, ablation.means, &circuits, ablation.max_rows)?;
    Ok(sizes.iter().zip(v).map(|(&size, m)| CurvePoint { size, faithfulness: m / ablation.full }).collect())
}

/// The smallest prefix of `ranked` whose faithfulness reaches `target`: scans `sizes`, then
/// bisects between the last size below the target and the first at or above it. Returns the size
/// and every point evaluated (sorted by size), or `None` when even all nodes fall short.
pub fn smallest_faithful(
    model: &HookedTransformer,
    data: &PatchingData,
    ablation: &Ablation,
    ranked: &[Node],
    sizes: &[usize],
    target: f64,
) -> Result<(Option<usize>, Vec<CurvePoint>)> {
    let pts = faithfulness_curve(model, data, ablation, ranked, sizes)?;
    smallest_faithful_from(model, data, ablation, ranked, pts, target)
}

/// [`smallest_faithful`] after its scan: `pts` are the faithfulness at the scanned sizes (in
/// increasing size), from [`faithfulness_curve`] or merged shards of it.
pub fn smallest_faithful_from(
    model: &HookedTransformer,
    data: &PatchingData,
    ablation: &Ablation,
    ranked: &[Node],
    mut pts: Vec<CurvePoint>,
    target: f64,
) -> Result<(Option<usize>, Vec<CurvePoint>)> {
    let first = pts.iter().position(|p| p.faithfulness >= target);
    let Some(i) = first else {
        return Ok((None, pts));
    };
    let (mut lo, mut hi) = (if i == 0 { 0 } else { pts[i - 1].size }, pts[i].size);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let p = faithfulness_curve(model, data, ablation, ranked, &[mid])?.remove(0);
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

/// How [`discover`] runs.
#[derive(Clone, Copy)]
pub struct DiscoverOptions<'a> {
    /// The method whose node scores rank the nodes (act, atp or relp).
    pub method: Method,
    /// Noising (corrupt activations into the clean run; necessity, the default) or denoising.
    pub direction: Direction,
    /// Keep exactly this many nodes instead of searching for the smallest circuit reaching `target`.
    pub top_k: Option<usize>,
    /// Faithfulness to reach (fraction of the full model's logit difference).
    pub target: f64,
    /// EAP receivers: each head's q/k/v inputs (true) or one per attention block.
    pub head_inputs: bool,
    /// Pairs of different lengths: padded or grouped for the node scores.
    pub batching: Batching,
    /// Largest number of rows in one ablation forward.
    pub max_rows: usize,
    /// Progress: `(what, done, total)`.
    pub progress: Option<Progress<'a>>,
    /// Steps already done elsewhere (merged shards), used instead of computing them.
    pub resume: Option<&'a DiscoverResume>,
}

/// What shards of a discovery computed, merged ([`node_scores`] and [`faithfulness_scan`] with
/// a shard each, joined): [`discover`] takes these instead of running those steps.
#[derive(Debug, Clone, Default)]
pub struct DiscoverResume {
    /// Every method's node-score grids (step 1), as [`node_scores`] returns them unsharded.
    pub grids: Option<Vec<ScoreGrid>>,
    /// Faithfulness at every size of [`faithfulness_sizes`] (the scan of step 2; a search for
    /// the smallest faithful circuit bisects after it).
    pub scan: Option<Vec<CurvePoint>>,
    /// Seconds per scoring method of the resumed scores (summed over their shards).
    pub times: Vec<(Method, f64)>,
}

impl Default for DiscoverOptions<'_> {
    fn default() -> Self {
        DiscoverOptions {
            method: Method::Act,
            direction: Direction::Noise,
            top_k: None,
            target: 0.8,
            head_inputs: true,
            batching: Batching::Auto,
            max_rows: 240,
            progress: None,
            resume: None,
        }
    }
}

/// One node of a discovered circuit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CircuitNode {
    /// `L5H3` / `MLP7`.
    pub node: String,
    /// Layer.
    pub layer: usize,
    /// Head (`None` for an MLP).
    pub head: Option<usize>,
    /// Node score of the ranking method.
    pub score: f64,
    /// IOI class from attention at labelled positions (`None` for MLPs or without labels).
    pub class: Option<String>,
}

/// One edge of a discovered circuit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CircuitEdge {
    /// Sender label.
    pub sender: String,
    /// Receiver label.
    pub receiver: String,
    /// EAP score.
    pub score: f64,
}

/// A discovered circuit: what `circuit.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Circuit {
    /// Model name.
    pub model: String,
    /// Task or data name.
    pub task: String,
    /// Ranking method.
    pub method: String,
    /// The nodes, by decreasing |score|.
    pub nodes: Vec<CircuitNode>,
    /// EAP edges between circuit nodes, by decreasing |score| (at most 200).
    pub edges: Vec<CircuitEdge>,
    /// Faithfulness of the circuit.
    pub faithfulness: f64,
    /// The target.
    pub target: f64,
    /// Whether the smallest circuit reaching the target was found (false with `top_k`).
    pub reached_target: bool,
    /// Number of nodes.
    pub size: usize,
    /// Heads in the circuit.
    pub n_heads: usize,
    /// MLPs in the circuit.
    pub n_mlps: usize,
    /// Faithfulness at every size evaluated.
    pub curve: Vec<CurvePoint>,
}

/// Everything a discovery computes: the circuit and what the report shows beside it.
pub struct Discovery {
    /// The circuit (`circuit.json`).
    pub circuit: Circuit,
    /// The circuit's nodes.
    pub nodes: Vec<Node>,
    /// Node scores of the ranking method, every node.
    pub scores: BTreeMap<Node, f64>,
    /// Every node, by decreasing |score|.
    pub ranked: Vec<Node>,
    /// Every method's grids (act, AtP, RelP on heads and MLPs).
    pub grids: Vec<ScoreGrid>,
    /// EAP edges between circuit nodes, by decreasing |score|.
    pub edges: Vec<Edge>,
    /// IOI head classes of the circuit's heads: `(node, class, attention)`.
    pub classes: Vec<(Node, String, f64)>,
    /// The prepared prompts and metrics.
    pub prep: Prepared,
    /// Seconds: node scores, faithfulness, edges; and per scoring method.
    pub timings: (f64, f64, f64, Vec<(Method, f64)>),
}

/// Circuit sizes evaluated first (then bisected).
fn size_grid(total: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300, 400, 500];
    v.retain(|&k| k < total);
    v.push(total);
    v
}

/// The circuit nodes a receiver feeds (`None` for the logits, which are always kept).
pub fn receiver_nodes(r: &Receiver, model: &HookedTransformer, in_circuit: impl Fn(&Node) -> bool) -> Option<Vec<Node>> {
    let group = model.cfg.n_heads / model.cfg.n_kv_heads;
    match r {
        Receiver::Logits => None,
        Receiver::Mlp(l) => Some([Node::Mlp(*l)].into_iter().filter(|n| in_circuit(n)).collect()),
        Receiver::Attn(l) | Receiver::Head(l, _, _) => {
            Some(r.heads(model.cfg.n_heads, group).into_iter().map(|h| Node::Head(*l, h)).filter(|n| in_circuit(n)).collect())
        }
    }
}

impl DiscoverOptions<'_> {
    /// The checks [`discover`] makes before any work: `top_k` within the model's node count,
    /// `target` in (0, 1], a node-ranking method. Call it to fail early (the CLI does, before
    /// writing anything).
    pub fn check(&self, model: &HookedTransformer) -> Result<()> {
        let n_nodes = model.cfg.n_layers * (model.cfg.n_heads + 1);
        if let Some(k) = self.top_k {
            if !(1..=n_nodes).contains(&k) {
                return Err(Error::Input(format!(
                    "--top-k {k}: {} has {n_nodes} nodes ({} heads and {} MLPs); give 1..={n_nodes}",
                    model.cfg.name,
                    model.cfg.n_layers * model.cfg.n_heads,
                    model.cfg.n_layers
                )));
            }
        }
        if self.top_k.is_none() && !(self.target > 0.0 && self.target <= 1.0) {
            return Err(Error::Input(format!(
            "--target {}: faithfulness targets are fractions of the full model's metric in (0, 1] (0.8 = the smallest circuit keeping 80%); give one there, or a node count with top-k",
            self.target
        )));
        }
        if !matches!(self.method, Method::Act | Method::Atp | Method::Relp) {
            return Err(Error::Input(format!("circuits are ranked by act, atp or relp, not {}", self.method)));
        }
        Ok(())
    }
}

/// A circuit study as one call: node scores for every head and MLP (activation patching, AtP and
/// RelP; `opts.method` ranks), the faithfulness curve under mean ablation (means over the corrupt
/// prompts) and the smallest circuit reaching `opts.target` (or the top `opts.top_k`), EAP edges
/// between the circuit's nodes, and IOI head classes where the pairs have IOI labels.
pub fn discover(model: &HookedTransformer, batch: &PairBatch, task: &str, opts: &DiscoverOptions) -> Result<Discovery> {
    opts.check(model)?;
    let prep = prepare(model, batch)?;
    // 1. Node scores (or the merged shards' scores).
    let t0 = Instant::now();
    let (grids, times) = match opts.resume.and_then(|r| r.grids.as_ref()) {
        Some(g) => {
            check_resumed_grids(model, opts, g)?;
            (g.clone(), opts.resume.map(|r| r.times.clone()).unwrap_or_default())
        }
        None => {
            let run = node_scores(model, batch, &prep, opts, None)?;
            (run.grids, run.times)
        }
    };
    let (scores, ranked) = rank_nodes(model, &grids, opts.method)?;
    let t_scores = t0.elapsed().as_secs_f64();

    // 2. Faithfulness under mean ablation: the scan of the size grid, then (searching for the
    // smallest faithful circuit) a bisection.
    let t0 = Instant::now();
    if let Some(p) = opts.progress {
        p("faithfulness", 0, 1);
    }
    let means = AblationMeans::new(model, &prep.corrupt, prep.mask.as_ref())?;
    let ablation = Ablation { means: &means, full: prep.clean_value, max_rows: opts.max_rows };
    let sizes = faithfulness_sizes(ranked.len(), opts.top_k);
    let scan = match opts.resume.and_then(|r| r.scan.as_ref()) {
        Some(pts) => {
            if pts.iter().map(|p| p.size).collect::<Vec<_>>() != sizes {
                return Err(Error::Input(
                    "the resumed faithfulness scan was made for other circuit sizes (another --top-k or model); run that step again".into(),
                ));
            }
            pts.clone()
        }
        None => faithfulness_curve(model, &prep.raw_data(), &ablation, &ranked, &sizes)?,
    };
    let (size, curve) = match opts.top_k {
        Some(k) => (Some(k), scan),
        None => smallest_faithful_from(model, &prep.raw_data(), &ablation, &ranked, scan, opts.target)?,
    };
    if let Some(p) = opts.progress {
        p("faithfulness", 1, 1);
    }
    let t_faith = t0.elapsed().as_secs_f64();
    let k = size.unwrap_or(ranked.len());
    let nodes: Vec<Node> = ranked[..k].to_vec();
    let faith = curve.iter().find(|p| p.size == k).map(|p| p.faithfulness).unwrap_or(f64::NAN);

    // 3. EAP edges between circuit nodes.
    let t0 = Instant::now();
    let all_edges = edge_attribution(model, &prep.data(), &EdgeOptions { head_inputs: opts.head_inputs })?;
    let in_circ = |n: &Node| nodes.contains(n);
    let recv_in = |r: &Receiver| receiver_nodes(r, model, in_circ).is_none_or(|t| !t.is_empty());
    let mut edges: Vec<Edge> = all_edges.into_iter().filter(|e| in_circ(&e.sender) && recv_in(&e.receiver)).collect();
    edges.sort_by(|x, y| y.score.abs().total_cmp(&x.score.abs()));
    let t_edges = t0.elapsed().as_secs_f64();

    // 4. IOI head classes.
    let classes = ioi_head_classes(model, &prep, batch, &nodes, &scores)?;
    let class_of: BTreeMap<Node, String> = classes.iter().map(|(n, c, _)| (*n, c.clone())).collect();
    let circuit = Circuit {
        model: model.cfg.name.clone(),
        task: task.to_string(),
        method: opts.method.name().into(),
        nodes: nodes
            .iter()
            .map(|n| CircuitNode {
                node: n.label(),
                layer: n.layer(),
                head: match n {
                    Node::Head(_, h) => Some(*h),
                    Node::Mlp(_) => None,
                },
                score: scores[n],
                class: class_of.get(n).cloned(),
            })
            .collect(),
        edges: edges.iter().take(200).map(|e| CircuitEdge { sender: e.sender.label(), receiver: e.receiver.label(), score: e.score }).collect(),
        faithfulness: faith,
        target: opts.target,
        reached_target: size.is_some() && opts.top_k.is_none(),
        size: k,
        n_heads: nodes.iter().filter(|n| matches!(n, Node::Head(..))).count(),
        n_mlps: nodes.iter().filter(|n| matches!(n, Node::Mlp(_))).count(),
        curve,
    };
    Ok(Discovery { circuit, nodes, scores, ranked, grids, edges, classes, prep, timings: (t_scores, t_faith, t_edges, times) })
}

/// The scoring methods [`discover`] runs: AtP and RelP always, activation patching when it ranks
/// or when the circuit size is searched (for the correlation table).
pub fn discover_methods(opts: &DiscoverOptions) -> Vec<Method> {
    let mut methods = vec![Method::Atp, Method::Relp];
    if opts.method == Method::Act || opts.top_k.is_none() {
        methods.insert(0, Method::Act);
    }
    methods
}

/// The node components [`discover`] scores.
pub const DISCOVER_COMPONENTS: [Component; 2] = [Component::HeadZ, Component::MlpOut];

/// The run options of [`discover`]'s node scores (one score per head and MLP, over all
/// positions; AtP/RelP at the clean run when noising).
pub fn node_score_options<'a>(opts: &DiscoverOptions<'a>, shard: Option<Shard>) -> RunOptions<'a> {
    RunOptions {
        by_pos: false,
        resid_by_pos: false,
        rules: LrpRules::RELP,
        direction: opts.direction,
        at_clean: opts.direction == Direction::Noise,
        batching: opts.batching,
        progress: opts.progress,
        shard,
    }
}

/// Step 1 of [`discover`]: every method's node scores on heads and MLPs (noising: activation
/// patching's scores become the drop `1 - patched metric`, as AtP/RelP at the clean run estimate
/// it), with the seconds per method. With a shard, only its rows (the rows of [`planned_grids`]
/// in order, round robin) are filled; the rest are NaN.
pub fn node_scores(model: &HookedTransformer, batch: &PairBatch, prep: &Prepared, opts: &DiscoverOptions, shard: Option<Shard>) -> Result<MethodRun> {
    let mut run = run_methods(model, batch, prep, &discover_methods(opts), &DISCOVER_COMPONENTS, &node_score_options(opts, shard))?;
    if opts.direction == Direction::Noise {
        run.grids.iter_mut().filter(|g| g.method == "act").for_each(|g| g.values.iter_mut().for_each(|v| *v = 1.0 - *v));
    }
    Ok(run)
}

/// Work units of [`node_scores`]: the rows of every grid it returns.
pub fn node_score_units(model: &HookedTransformer, prep: &Prepared, opts: &DiscoverOptions) -> usize {
    planned_grids(model, prep, &discover_methods(opts), &DISCOVER_COMPONENTS, &node_score_options(opts, None)).iter().map(|g| g.rows()).sum()
}

fn check_resumed_grids(model: &HookedTransformer, opts: &DiscoverOptions, grids: &[ScoreGrid]) -> Result<()> {
    let want = discover_methods(opts).len() * DISCOVER_COMPONENTS.len();
    let nodes = |g: &ScoreGrid| g.values.len();
    if grids.len() != want || grids.iter().any(|g| g.n_layers != model.cfg.n_layers || nodes(g) == 0) {
        return Err(Error::Input(format!(
            "the resumed node scores hold {} grids, but this discovery ({} on {}) makes {want}; resume from the scores of the same model and options",
            grids.len(),
            opts.method,
            model.cfg.name
        )));
    }
    if let Some(g) = grids.iter().find(|g| g.values.iter().any(|v| v.is_nan())) {
        return Err(Error::Input(format!("the resumed {} {} scores have empty rows: a shard is missing from the merge", g.method, g.component.name())));
    }
    Ok(())
}

/// Node scores of the ranking `method` from [`node_scores`]' grids, and every node by
/// decreasing |score|.
pub fn rank_nodes(model: &HookedTransformer, grids: &[ScoreGrid], method: Method) -> Result<(BTreeMap<Node, f64>, Vec<Node>)> {
    let get = |c: Component| {
        grids
            .iter()
            .find(|g| g.method == method.name() && g.component == c)
            .ok_or_else(|| Error::Input(format!("no {} scores of {} to rank the nodes by", method.name(), c.name())))
    };
    let (heads, mlps) = (get(Component::HeadZ)?, get(Component::MlpOut)?);
    let mut scores = BTreeMap::new();
    for l in 0..model.cfg.n_layers {
        for h in 0..model.cfg.n_heads {
            scores.insert(Node::Head(l, h), heads.get(l, 0, h));
        }
        scores.insert(Node::Mlp(l), mlps.get(l, 0, 0));
    }
    let mut ranked: Vec<Node> = scores.keys().copied().collect();
    ranked.sort_by(|x, y| scores[y].abs().total_cmp(&scores[x].abs()));
    Ok((scores, ranked))
}

/// The circuit sizes [`discover`] scans first: a fixed grid up to every node, plus `top_k`.
pub fn faithfulness_sizes(n_nodes: usize, top_k: Option<usize>) -> Vec<usize> {
    let mut sizes = size_grid(n_nodes);
    if let Some(k) = top_k {
        if !sizes.contains(&k) {
            sizes.push(k);
            sizes.sort();
        }
    }
    sizes
}

/// Step 2's scan for a shard: faithfulness (mean ablation over `batch`'s corrupt prompts) of the
/// top `size` nodes of `ranked` for the sizes of `sizes` the shard owns (unit = index in
/// `sizes`); the others are NaN.
pub fn faithfulness_scan(
    model: &HookedTransformer,
    prep: &Prepared,
    ranked: &[Node],
    sizes: &[usize],
    max_rows: usize,
    shard: Option<Shard>,
) -> Result<Vec<CurvePoint>> {
    let means = AblationMeans::new(model, &prep.corrupt, prep.mask.as_ref())?;
    let ablation = Ablation { means: &means, full: prep.clean_value, max_rows };
    let mine: Vec<usize> = sizes.iter().enumerate().filter(|(u, _)| shard.is_none_or(|s| s.owns(*u))).map(|(_, &k)| k).collect();
    let got = if mine.is_empty() { vec![] } else { faithfulness_curve(model, &prep.raw_data(), &ablation, ranked, &mine)? };
    Ok(sizes.iter().map(|&size| got.iter().find(|p| p.size == size).copied().unwrap_or(CurvePoint { size, faithfulness: f64::NAN })).collect())
}

/// IOI head classes in Wang et al.'s terms, from mean attention at labelled positions
/// (`IO`, `S1`, `S1+1`, `S2`, `end`): name mover (end -> IO; negative when its score is),
/// S-inhibition (end -> S2), induction (S2 -> S1+1), duplicate-token (S2 -> S1), previous-token
/// (S1+1 -> S1); `unclassified` below 0.2 attention on every probe. Empty when the pairs lack
/// those labels.
pub fn ioi_head_classes(
    model: &HookedTransformer,
    prep: &Prepared,
    batch: &PairBatch,
    nodes: &[Node],
    scores: &BTreeMap<Node, f64>,
) -> Result<Vec<(Node, String, f64)>> {
    let labels: Vec<BTreeMap<String, usize>> =
        batch.pairs.iter().zip(&prep.pads).map(|(p, pad)| p.labels.iter().map(|(k, v)| (k.clone(), v + pad)).collect()).collect();
    let probes = [
        ("end", "IO", "name mover"),
        ("end", "S2", "S-inhibition"),
        ("S2", "S1+1", "induction"),
        ("S2", "S1", "duplicate-token"),
        ("S1+1", "S1", "previous-token"),
    ];
    let pairs: Vec<(&str, &str)> = probes.iter().map(|(q, k, _)| (*q, *k)).collect();
    let Some(by_probe) = attention_between(model, &prep.clean, prep.mask.as_ref(), &labels, &pairs)? else {
        return Ok(vec![]);
    };
    let maps: Vec<(&str, Vec<Vec<f64>>)> = probes.iter().map(|p| p.2).zip(by_probe).collect();
    let mut out = Vec::new();
    for n in nodes {
        if let Node::Head(l, h) = *n {
            let (best, att) = maps.iter().map(|(name, m)| (*name, m[l][h])).fold(("", 0.0), |a, b| if b.1 > a.1 { b } else { a });
            if att >= 0.2 {
                let class = if best == "name mover" && scores[n] < 0.0 { "negative name mover".to_string() } else { best.to_string() };
                out.push((*n, class, att));
            } else {
                out.push((*n, "unclassified".into(), att));
            }
        }
    }
    Ok(out)
}

impl std::str::FromStr for Node {
    type Err = Error;
    /// `L5H3` (a head) or `MLP7`.
    fn from_str(s: &str) -> Result<Node> {
        let bad = || Error::Input(format!("`{s}` is not a node; write heads as L5H3 and MLPs as MLP7"));
        let t = s.trim();
        if let Some(l) = t.strip_prefix("MLP") {
            return l.parse().map(Node::Mlp).map_err(|_| bad());
        }
        let rest = t.strip_prefix('L').ok_or_else(bad)?;
        let (l, h) = rest.split_once('H').ok_or_else(bad)?;
        Ok(Node::Head(l.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?))
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}
