//! Circuit-localisation metrics of the Mechanistic Interpretability Benchmark (MIB, Mueller et
//! al. 2025), computed as its released code (hannamw/MIB-circuit-track) computes them.
//!
//! For each ranking of the edges and each fraction `x` in [`PERCENTAGES`] (0.1 % .. 100 %), the
//! circuit is the `floor(x * |E|)` best edges (MIB's `apply_topn`), pruned to the edges on
//! input-to-logits paths ([`EdgeGraph::prune`]), and run with every other edge ablated
//! ([`edge_patched_metric`]). Faithfulness is a ratio of means over the prompts,
//! `f = (m(C) - m(empty)) / (m(full) - m(empty))`, `m` the logit difference. Then, by the
//! trapezoid rule over the requested fractions (a linear axis of width 0.999, no point at 0, no
//! clipping, so CPR can exceed 1):
//! - **CPR** (circuit performance ratio, higher is better) = area under `f`, with edges ranked by
//!   their signed score;
//! - **CMD** (circuit-model distance, lower is better) = area under `|1 - f|`, with edges ranked
//!   by `|score|`.
//!
//! Node methods (activation patching, AtP, RelP: one score for the input and each head and MLP)
//! enter as MIB's `level='node'` does: the circuit is the best `floor(x * |N|)` nodes (`|N|` =
//! input + heads + MLPs) with every edge from a kept node to a kept node or to the logits
//! ([`EdgeGraph::edges_between`]); the fractions are then of nodes. A seeded random ranking of the
//! edges (uniform in [-1, 1], as MIB's notebook draws it, there without a seed) is the floor.

use crate::eap_ig::{eap_ig, EapIgOptions, EapVariant};
use crate::edge_circuit::{edge_patched_metric, top_flags, AblatedSenders, EdgeAblation, EdgeGraph, Sender};
use crate::patching::{Direction, PatchingData};
use crate::scores::Component;
use crate::shard::Shard;
use crate::study::{prepare, run_methods, Batching, Method, Prepared, Progress, RunOptions};
use ferrolens_model::{Error, HookedTransformer, LrpRules, Result};
use ferrolens_tasks::PairBatch;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// MIB's fractions of edges (or nodes): 0.1 % to 100 %.
pub const PERCENTAGES: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// One point of a faithfulness curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    /// The requested fraction of edges (or nodes, for node rankings).
    pub fraction: f64,
    /// Items (edges or nodes) requested: `floor(fraction * total)`.
    pub requested: usize,
    /// Edges left after pruning.
    pub edges: usize,
    /// Mean metric of the circuit.
    pub metric: f64,
    /// Faithfulness `(m(C) - m(empty)) / (m(full) - m(empty))`.
    pub faithfulness: f64,
}

/// The metric of the full model and of the empty circuit, the ends faithfulness is measured
/// between.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Ends {
    /// Mean metric with every edge in (the clean run).
    pub full: f64,
    /// Mean metric with no edge in (the corrupt run, for counterfactual ablation).
    pub empty: f64,
}

impl Ends {
    /// Both ends on `data` (two forwards). Errors when they coincide (faithfulness undefined).
    pub fn new(model: &HookedTransformer, data: &PatchingData, graph: &EdgeGraph, ablated: &AblatedSenders) -> Result<Ends> {
        let full = mean(&edge_patched_metric(model, data, graph, &vec![true; graph.len()], ablated)?);
        let empty = mean(&edge_patched_metric(model, data, graph, &vec![false; graph.len()], ablated)?);
        if (full - empty).abs() < 1e-9 {
            return Err(Error::Input(format!(
                "the full model and the empty circuit score the same ({full:.4}), so faithfulness is undefined; \
                 use pairs whose corruption changes the metric"
            )));
        }
        Ok(Ends { full, empty })
    }

    /// `(m - empty) / (full - empty)`.
    pub fn faithfulness(&self, m: f64) -> f64 {
        (m - self.empty) / (self.full - self.empty)
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// What a ranking ranks.
#[derive(Debug, Clone)]
pub enum Ranking {
    /// One score per edge of the graph.
    Edges(Vec<f64>),
    /// One score per sender id of the graph: the input (id 0), every head and MLP.
    Nodes(Vec<f64>),
}

/// The faithfulness curve of a ranking over `fractions`, ranked by `|score|` when `absolute`.
/// `progress(done, total)` after each circuit.
#[allow(clippy::too_many_arguments)]
pub fn faithfulness_curve(
    model: &HookedTransformer,
    data: &PatchingData,
    graph: &EdgeGraph,
    ablated: &AblatedSenders,
    ends: &Ends,
    ranking: &Ranking,
    absolute: bool,
    fractions: &[f64],
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<CurvePoint>> {
    let mut out = Vec::with_capacity(fractions.len());
    for (i, &x) in fractions.iter().enumerate() {
        if !(0.0..=1.0).contains(&x) {
            return Err(Error::Input(format!("fraction {x} is outside [0, 1]")));
        }
        let (requested, in_graph) = circuit_at(graph, ranking, absolute, x)?;
        let in_graph = graph.prune(&in_graph);
        let edges = in_graph.iter().filter(|&&k| k).count();
        let metric = mean(&edge_patched_metric(model, data, graph, &in_graph, ablated)?);
        out.push(CurvePoint { fraction: x, requested, edges, metric, faithfulness: ends.faithfulness(metric) });
        progress(i + 1, fractions.len());
    }
    Ok(out)
}

/// The circuit of fraction `x` of a ranking: `(items requested, edge flags before pruning)`.
pub fn circuit_at(graph: &EdgeGraph, ranking: &Ranking, absolute: bool, x: f64) -> Result<(usize, Vec<bool>)> {
    match ranking {
        Ranking::Edges(s) => {
            let n = (x * graph.len() as f64) as usize;
            Ok((n, graph.top_n(s, n, absolute)?))
        }
        Ranking::Nodes(s) => {
            if s.len() != graph.senders.len() {
                return Err(Error::Input(format!("{} node scores for a graph of {} senders", s.len(), graph.senders.len())));
            }
            if let Some(i) = s.iter().position(|v| !v.is_finite()) {
                return Err(Error::Input(format!("the score of node {} is {}; node scores must be finite", graph.senders[i], s[i])));
            }
            let n = (x * s.len() as f64) as usize;
            Ok((n, graph.edges_between(&top_flags(s, n, absolute))))
        }
    }
}

/// `(area under f, area under |1 - f|)` by the trapezoid rule over `fractions` (MIB's
/// `evaluate_area_under_curve` with `log_scale=False`).
pub fn areas(fractions: &[f64], f: &[f64]) -> (f64, f64) {
    let (mut under, mut from_1) = (0.0, 0.0);
    for i in 1..fractions.len().min(f.len()) {
        let w = fractions[i] - fractions[i - 1];
        under += w * (f[i - 1] + f[i]) / 2.0;
        from_1 += w * ((1.0 - f[i - 1]).abs() + (1.0 - f[i]).abs()) / 2.0;
    }
    (under, from_1)
}

/// One method's row of the MIB table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MibScore {
    /// Method name.
    pub method: String,
    /// Area under faithfulness, signed ranking (higher is better).
    pub cpr: f64,
    /// Area under |1 - faithfulness|, absolute ranking (lower is better).
    pub cmd: f64,
    /// The curve behind CPR (signed ranking).
    pub signed: Vec<CurvePoint>,
    /// The curve behind CMD (absolute ranking).
    pub absolute: Vec<CurvePoint>,
    /// Seconds spent scoring (not evaluating).
    pub score_seconds: f64,
}

/// CPR and CMD of a ranking: its signed curve and its absolute curve (one curve when the
/// scores are all non-negative, where both rankings coincide).
#[allow(clippy::too_many_arguments)]
pub fn mib_score(
    model: &HookedTransformer,
    data: &PatchingData,
    graph: &EdgeGraph,
    ablated: &AblatedSenders,
    ends: &Ends,
    method: &str,
    ranking: &Ranking,
    fractions: &[f64],
    progress: &dyn Fn(usize, usize),
) -> Result<MibScore> {
    let nonneg = match ranking {
        Ranking::Edges(s) => s.iter().all(|v| *v >= 0.0),
        Ranking::Nodes(s) => s.iter().all(|v| *v >= 0.0),
    };
    let total = if nonneg { fractions.len() } else { 2 * fractions.len() };
    let signed = faithfulness_curve(model, data, graph, ablated, ends, ranking, false, fractions, &|d, _| progress(d, total))?;
    let absolute = if nonneg {
        signed.clone()
    } else {
        faithfulness_curve(model, data, graph, ablated, ends, ranking, true, fractions, &|d, _| progress(fractions.len() + d, total))?
    };
    let f = |c: &[CurvePoint]| c.iter().map(|p| p.faithfulness).collect::<Vec<_>>();
    let (cpr, _) = areas(fractions, &f(&signed));
    let (_, cmd) = areas(fractions, &f(&absolute));
    Ok(MibScore { method: method.to_string(), cpr, cmd, signed, absolute, score_seconds: 0.0 })
}

/// Seeded uniform random edge scores in `[-1, 1)`: the floor of the table (reproducible under
/// `seed`).
pub fn random_scores(graph: &EdgeGraph, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..graph.len()).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// A circuit-finding method of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum CircuitMethod {
    /// Node level: exact activation patching of each node (noising: the drop when the node's
    /// output is the corrupt one), the input node by patching the embedding.
    #[cfg_attr(feature = "clap", value(name = "act"))]
    Act,
    /// Node level: attribution patching at the clean run (MIB's node-level EAP).
    #[cfg_attr(feature = "clap", value(name = "atp"))]
    Atp,
    /// Node level: relevance patching (AtP with the LRP rules).
    #[cfg_attr(feature = "clap", value(name = "relp"))]
    Relp,
    /// Node level: integrated gradients over the input embedding (MIB's node-level EAP-IG,
    /// "NAP-IG"): a node's score is the sum of its EAP-IG edge scores, which is its output
    /// difference times the IG gradient at its output (every downstream reader sums to it).
    #[cfg_attr(feature = "clap", value(name = "atp_ig"))]
    AtpIg,
    /// Edge level: EAP, gradient at the clean run.
    #[cfg_attr(feature = "clap", value(name = "eap"))]
    Eap,
    /// Edge level: EAP-IG on the input embedding.
    #[cfg_attr(feature = "clap", value(name = "eap_ig"))]
    EapIg,
    /// Edge level: EAP-IG on each node's activations.
    #[cfg_attr(feature = "clap", value(name = "eap_ig_act"))]
    EapIgAct,
}

impl CircuitMethod {
    /// Every method.
    pub const ALL: [CircuitMethod; 6] =
        [CircuitMethod::Act, CircuitMethod::Atp, CircuitMethod::Relp, CircuitMethod::Eap, CircuitMethod::EapIg, CircuitMethod::EapIgAct];

    /// The name in tables and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            CircuitMethod::Act => "act",
            CircuitMethod::Atp => "atp",
            CircuitMethod::Relp => "relp",
            CircuitMethod::AtpIg => "atp_ig",
            CircuitMethod::Eap => "eap",
            CircuitMethod::EapIg => "eap_ig",
            CircuitMethod::EapIgAct => "eap_ig_act",
        }
    }

    /// Whether it scores nodes (else edges).
    pub fn node_level(&self) -> bool {
        matches!(self, CircuitMethod::Act | CircuitMethod::Atp | CircuitMethod::Relp | CircuitMethod::AtpIg)
    }
}

impl std::fmt::Display for CircuitMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CircuitMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<CircuitMethod> {
        Ok(match s.trim() {
            "act" => CircuitMethod::Act,
            "atp" => CircuitMethod::Atp,
            "relp" => CircuitMethod::Relp,
            "atp_ig" | "atp-ig" | "nap_ig" => CircuitMethod::AtpIg,
            "eap" => CircuitMethod::Eap,
            "eap_ig" | "eap-ig" | "eap_ig_inputs" => CircuitMethod::EapIg,
            "eap_ig_act" | "eap-ig-act" | "eap_ig_activations" => CircuitMethod::EapIgAct,
            "atp_qk" | "atp-qk" => {
                return Err(Error::Input(
                    "atp_qk is not a circuit method here: AtP*'s QK fix corrects query and key patches, and a circuit node is a whole head \
                     (its output, where AtP is already exact in the pattern); use atp, or eap/eap_ig for edges"
                        .into(),
                ))
            }
            o => {
                return Err(Error::Input(format!(
                    "unknown circuit method `{o}`; use act, atp, relp, atp_ig (node level) or eap, eap_ig, eap_ig_act (edge level)"
                )))
            }
        })
    }
}

/// Options of [`evaluate`].
#[derive(Clone, Copy)]
pub struct MibOptions<'a> {
    /// Methods to score and evaluate (a `random` row is always added).
    pub methods: &'a [CircuitMethod],
    /// How edges outside a circuit are ablated, in scoring and in evaluation.
    pub ablation: EdgeAblation,
    /// Per-head query/key/value receivers (else one per attention block).
    pub head_inputs: bool,
    /// EAP-IG interpolation steps.
    pub ig_steps: usize,
    /// Seed of the random ranking.
    pub seed: u64,
    /// The fractions of the curves (MIB: [`PERCENTAGES`]).
    pub fractions: &'a [f64],
    /// Progress: `(what, done, total)`.
    pub progress: Option<Progress<'a>>,
    /// Score and evaluate only this shard's rankings ([`crate::shard`]: the rows of
    /// [`planned_rankings`], round robin); `None` does every one.
    pub shard: Option<Shard>,
}

impl Default for MibOptions<'_> {
    fn default() -> Self {
        MibOptions {
            methods: &CircuitMethod::ALL,
            ablation: EdgeAblation::Counterfactual,
            head_inputs: true,
            ig_steps: 5,
            seed: 0,
            fractions: &PERCENTAGES,
            progress: None,
            shard: None,
        }
    }
}

impl MibOptions<'_> {
    /// Check before any work.
    pub fn check(&self) -> Result<()> {
        if self.methods.is_empty() {
            return Err(Error::Input("no methods to evaluate; give --methods, e.g. --methods atp,eap,eap_ig".into()));
        }
        if self.ig_steps == 0 {
            return Err(Error::Input("--ig-steps must be at least 1".into()));
        }
        if self.fractions.len() < 2 || self.fractions.windows(2).any(|w| w[1] <= w[0]) || self.fractions.iter().any(|x| !(0.0..=1.0).contains(x)) {
            return Err(Error::Input("the fractions must be at least two increasing values in [0, 1]".into()));
        }
        Ok(())
    }
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MibEvaluation {
    /// Edges of the graph.
    pub n_edges: usize,
    /// Nodes (input, heads, MLPs).
    pub n_nodes: usize,
    /// The full model's and the empty circuit's metric (logit difference).
    pub ends: Ends,
    /// The ablation used.
    pub ablation: EdgeAblation,
    /// One row per method, then `random`.
    pub rows: Vec<MibScore>,
    /// Each edge method's edge scores (graph order), for tables.
    #[serde(skip)]
    pub edge_scores: Vec<(String, Vec<f64>)>,
    /// Each node method's node scores (sender-id order).
    #[serde(skip)]
    pub node_scores: Vec<(String, Vec<f64>)>,
}

/// Node scores (sender-id order: input, heads, MLPs) of node methods, noising at the clean run:
/// each is the estimated (act: measured) drop of the normalised metric when the node's output
/// is the corrupt one.
pub fn node_scores(
    model: &HookedTransformer,
    batch: &PairBatch,
    prep: &Prepared,
    methods: &[Method],
    graph: &EdgeGraph,
    progress: Option<Progress>,
) -> Result<Vec<Vec<f64>>> {
    let comps = [Component::ResidPre, Component::HeadZ, Component::MlpOut];
    let ro = RunOptions {
        by_pos: false,
        resid_by_pos: false,
        rules: LrpRules::RELP,
        direction: Direction::Noise,
        at_clean: true,
        batching: Batching::Pad,
        progress,
        shard: None,
    };
    let run = run_methods(model, batch, prep, methods, &comps, &ro)?;
    methods
        .iter()
        .map(|m| {
            let get = |c: Component| run.grids.iter().find(|g| g.method == m.name() && g.component == c).expect("every method ran on every component");
            let drop = |v: f64| if *m == Method::Act { 1.0 - v } else { v };
            let mut s = vec![0.0; graph.senders.len()];
            for (i, sender) in graph.senders.iter().enumerate() {
                s[i] = drop(match sender {
                    Sender::Input => get(Component::ResidPre).get(0, 0, 0),
                    Sender::Head(l, h) => get(Component::HeadZ).get(*l, 0, *h),
                    Sender::Mlp(l) => get(Component::MlpOut).get(*l, 0, 0),
                });
            }
            Ok(s)
        })
        .collect()
}

/// The rankings [`evaluate`] scores and evaluates, in the order of its rows: node methods
/// (act, atp, relp), edge methods, atp_ig, then `random`. A shard's work units.
pub fn planned_rankings(methods: &[CircuitMethod]) -> Vec<String> {
    let mut out: Vec<String> =
        methods.iter().filter(|m| matches!(m, CircuitMethod::Act | CircuitMethod::Atp | CircuitMethod::Relp)).map(|m| m.name().to_string()).collect();
    out.extend(methods.iter().filter(|m| !m.node_level()).map(|m| m.name().to_string()));
    if methods.contains(&CircuitMethod::AtpIg) {
        out.push("atp_ig".into());
    }
    out.push("random".into());
    out
}

/// Score `batch` by every method of `opts` and evaluate each ranking by MIB's CPR and CMD
/// (counterfactual or mean ablation), with a seeded random ranking as the floor.
pub fn evaluate(model: &HookedTransformer, batch: &PairBatch, opts: &MibOptions) -> Result<MibEvaluation> {
    opts.check()?;
    let prep = prepare(model, batch)?;
    let data = prep.raw_data();
    let graph = EdgeGraph::new(model, opts.head_inputs);
    let say = |what: &str, d: usize, t: usize| {
        if let Some(p) = opts.progress {
            p(what, d, t);
        }
    };
    let ablated = AblatedSenders::new(model, &data, opts.ablation)?;
    let ends = Ends::new(model, &data, &graph, &ablated)?;
    let mut rows = Vec::new();
    let (mut edge_scores, mut node_scores_out) = (Vec::new(), Vec::new());
    // With a shard, only the rankings it owns (by their index in `planned_rankings`).
    let planned = planned_rankings(opts.methods);
    let owned = |name: &str| opts.shard.is_none_or(|s| planned.iter().position(|n| n == name).is_some_and(|i| s.owns(i)));
    let node_methods: Vec<Method> = opts
        .methods
        .iter()
        .filter(|m| owned(m.name()))
        .filter_map(|m| match m {
            CircuitMethod::Act => Some(Method::Act),
            CircuitMethod::Atp => Some(Method::Atp),
            CircuitMethod::Relp => Some(Method::Relp),
            _ => None,
        })
        .collect();
    let mut rankings: Vec<(String, Ranking, f64)> = Vec::new();
    if !node_methods.is_empty() {
        let t0 = Instant::now();
        let scores = node_scores(model, batch, &prep, &node_methods, &graph, opts.progress)?;
        let secs = t0.elapsed().as_secs_f64() / node_methods.len() as f64;
        for (m, s) in node_methods.iter().zip(scores) {
            node_scores_out.push((m.name().to_string(), s.clone()));
            rankings.push((m.name().to_string(), Ranking::Nodes(s), secs));
        }
    }
    for m in opts.methods.iter().filter(|m| !m.node_level() && owned(m.name())) {
        let variant = match m {
            CircuitMethod::Eap => EapVariant::Eap,
            CircuitMethod::EapIg => EapVariant::IgInputs,
            _ => EapVariant::IgActivations,
        };
        let t0 = Instant::now();
        let what = format!("score {}", m.name());
        let eo = EapIgOptions { variant, steps: opts.ig_steps, ..Default::default() };
        let s = eap_ig(model, &data, &graph, &ablated, &eo, &|d, t| say(&what, d, t))?;
        edge_scores.push((m.name().to_string(), s.clone()));
        rankings.push((m.name().to_string(), Ranking::Edges(s), t0.elapsed().as_secs_f64()));
    }
    if opts.methods.contains(&CircuitMethod::AtpIg) && owned("atp_ig") {
        // Node IG scores: each sender's EAP-IG-inputs edge scores summed (computed here unless
        // eap_ig ran).
        let t0 = Instant::now();
        let s = match edge_scores.iter().find(|(n, _)| n == "eap_ig") {
            Some((_, s)) => s.clone(),
            None => {
                let eo = EapIgOptions { variant: EapVariant::IgInputs, steps: opts.ig_steps, ..Default::default() };
                eap_ig(model, &data, &graph, &ablated, &eo, &|d, t| say("score atp_ig", d, t))?
            }
        };
        let mut nodes = vec![0.0; graph.senders.len()];
        for (e, &(si, _)) in graph.edges.iter().enumerate() {
            nodes[si] += s[e];
        }
        node_scores_out.push(("atp_ig".to_string(), nodes.clone()));
        rankings.push(("atp_ig".to_string(), Ranking::Nodes(nodes), t0.elapsed().as_secs_f64()));
    }
    if owned("random") {
        rankings.push(("random".into(), Ranking::Edges(random_scores(&graph, opts.seed)), 0.0));
    }
    for (name, ranking, secs) in rankings {
        let what = format!("evaluate {name}");
        let mut row = mib_score(model, &data, &graph, &ablated, &ends, &name, &ranking, opts.fractions, &|d, t| say(&what, d, t))?;
        row.score_seconds = secs;
        rows.push(row);
    }
    Ok(MibEvaluation { n_edges: graph.len(), n_nodes: graph.senders.len(), ends, ablation: opts.ablation, rows, edge_scores, node_scores: node_scores_out })
}
