//! `ferrolens discover`: a circuit-discovery study with an HTML report.
//!
//! 1. node scores for every head and MLP (activation patching, AtP or RelP; the other two are
//!    computed too, for the correlation table), 2. the faithfulness curve under mean ablation
//!    (corrupt-prompt means) over circuit sizes and the smallest circuit reaching `--target`,
//! 3. EAP edge scores between the circuit's nodes (receivers: head q/k/v inputs or blocks), 4. IOI head classes from attention at the
//!    labelled positions, 5. tables, figures, circuit.json and report.html.

use crate::study::{correlations, prepare, run_methods_batched, scores_table, Batching, Method, Prepared, RunOptions};
use anyhow::{Context, Result};
use candle_core::IndexOp;
use ferrolens_methods::heads::attention_between;
use ferrolens_methods::{edge_attribution, smallest_faithful, AblationMeans, Component, CurvePoint, Direction, EdgeOptions, Node, Receiver, ScoreGrid};
use ferrolens_model::{HookPoint, HookedTransformer, Hooks, LrpRules};
use ferrolens_report::{bar_chart, heatmap, line_chart, write_table, Column, Heatmap, Report, Table};
use ferrolens_tasks::{colored, ioi, read_jsonl, PairBatch, PromptPair, Task};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The prompt set of a built-in task (shared by `discover`, `data` and `path-patch`).
#[derive(clap::Args, Debug, Clone)]
pub struct TaskArgs {
    /// Task: ioi or colored-objects.
    #[arg(long, default_value = "ioi")]
    pub task: String,
    /// Number of prompt pairs.
    #[arg(long, default_value_t = 24)]
    pub n: usize,
    /// Seed of the prompt sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// IOI corruption: abc or s2io.
    #[arg(long, default_value = "abc")]
    pub corruption: String,
    /// Colored Objects: objects per question.
    #[arg(long, default_value_t = 3)]
    pub objects: usize,
    /// Colored Objects: solved examples before the query.
    #[arg(long, default_value_t = 1)]
    pub shots: usize,
    /// IOI: use every template, whatever its token length (one padded batch; per-position scores
    /// by label: IO, S1, S1+1, S2, end). By default only the most common length is used.
    #[arg(long)]
    pub all_templates: bool,
}

impl TaskArgs {
    /// The pairs of this task for `model`'s tokenizer.
    pub fn pairs(&self, model: &HookedTransformer) -> Result<Vec<PromptPair>> {
        task_pairs(model, Task::parse(&self.task)?, self)
    }
}

/// Arguments of `ferrolens discover`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    task: TaskArgs,
    /// Your own pairs as JSONL instead of a built-in task (--task is then ignored).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model: a registry name, a .gguf file, a HF directory or a hub id.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// Node-scoring method that ranks the circuit: act (exact), atp or relp. Activation patching
    /// also runs with atp/relp (for the correlation table) unless --top-k is given.
    #[arg(long, default_value = "act")]
    method: String,
    /// Node scores by noising (each node's clean activation replaced by its corrupt one in the
    /// clean run; score = the drop it causes) or denoising (corrupt run, clean activation patched
    /// in; score = the recovery). Noising measures necessity, which is what mean-ablation
    /// faithfulness tests.
    #[arg(long, default_value = "noising")]
    direction: String,
    /// Faithfulness the circuit must reach (fraction of the full model's logit difference).
    #[arg(long, default_value_t = 0.8)]
    target: f64,
    /// Fix the circuit size instead of searching for the smallest faithful one.
    #[arg(long)]
    top_k: Option<usize>,
    /// Output directory (default out/TASK).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// EAP edge receivers: `heads` (each head's query input, each KV head's key and value
    /// inputs, as TransformerLens's split-qkv receivers) or `blocks` (one per attention block).
    #[arg(long, default_value = "heads")]
    edge_receivers: String,
    /// Node scoring over pairs of different lengths: one padded batch, one batch per length, or
    /// whichever the padding overhead favours (same numbers either way). Faithfulness and EAP
    /// always run the padded batch.
    #[arg(long, value_enum, default_value_t = Batching::Auto)]
    batching: Batching,
}

/// Pairs of a built-in task for `model`'s tokenizer.
pub fn task_pairs(model: &HookedTransformer, task: Task, a: &TaskArgs) -> Result<Vec<PromptPair>> {
    let tok = model.tokenizer()?;
    let (n, seed, corruption, objects, shots) = (a.n, a.seed, a.corruption.as_str(), a.objects, a.shots);
    Ok(match task {
        Task::Ioi => {
            let corruption = match corruption {
                "abc" => ioi::IoiCorruption::Abc,
                "s2io" | "s2-io" => ioi::IoiCorruption::S2Io,
                o => anyhow::bail!("unknown IOI corruption `{o}`; use abc or s2io"),
            };
            ioi::generate(tok, &ioi::IoiConfig { n, seed, corruption, all_lengths: a.all_templates, ..Default::default() })?
        }
        Task::ColoredObjects => colored::generate(tok, &colored::ColoredConfig { n, seed, n_objects: objects, shots })?,
    })
}

fn node_scores(g_heads: &ScoreGrid, g_mlp: &ScoreGrid, model: &HookedTransformer) -> BTreeMap<Node, f64> {
    let mut m = BTreeMap::new();
    for l in 0..model.cfg.n_layers {
        for h in 0..model.cfg.n_heads {
            m.insert(Node::Head(l, h), g_heads.get(l, 0, h));
        }
        m.insert(Node::Mlp(l), g_mlp.get(l, 0, 0));
    }
    m
}

fn size_grid(total: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300, 400, 500];
    v.retain(|&k| k < total);
    v.push(total);
    v
}

/// IOI head classes in Wang et al.'s terms, from mean attention at labelled positions.
fn head_classes(
    model: &HookedTransformer,
    prep: &Prepared,
    pairs: &[PromptPair],
    circuit: &[Node],
    scores: &BTreeMap<Node, f64>,
) -> Result<Vec<(Node, String, f64)>> {
    // Label positions in the (left-padded) batch.
    let labels: Vec<BTreeMap<String, usize>> =
        pairs.iter().zip(&prep.pads).map(|(p, pad)| p.labels.iter().map(|(k, v)| (k.clone(), v + pad)).collect()).collect();
    let probes = [
        ("end", "IO", "name mover"),
        ("end", "S2", "S-inhibition"),
        ("S2", "S1+1", "induction"),
        ("S2", "S1", "duplicate-token"),
        ("S1+1", "S1", "previous-token"),
    ];
    let pairs: Vec<(&str, &str)> = probes.iter().map(|(q, k, _)| (*q, *k)).collect();
    let Some(scores_by_probe) = attention_between(model, &prep.clean, prep.mask.as_ref(), &labels, &pairs)? else {
        return Ok(vec![]);
    };
    let maps: Vec<(&str, Vec<Vec<f64>>)> = probes.iter().map(|p| p.2).zip(scores_by_probe).collect();
    let mut out = Vec::new();
    for n in circuit {
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

pub fn run(a: Args) -> Result<()> {
    let t_start = Instant::now();
    let method = Method::parse(&a.method)?;
    let model = crate::load_model(&a.model)?;
    // Checked before the long work: a circuit cannot have more nodes than the model.
    let n_nodes = model.cfg.n_layers * (model.cfg.n_heads + 1);
    if let Some(k) = a.top_k {
        anyhow::ensure!(
            (1..=n_nodes).contains(&k),
            "--top-k {k}: {} has {n_nodes} nodes ({} heads and {} MLPs); give 1..={n_nodes}",
            model.cfg.name,
            model.cfg.n_layers * model.cfg.n_heads,
            model.cfg.n_layers
        );
    }
    let (task_name, pairs) = match &a.data {
        Some(p) => (format!("jsonl:{}", p.display()), read_jsonl(p)?),
        None => (Task::parse(&a.task.task)?.name().to_string(), a.task.pairs(&model)?),
    };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("out").join(task_name.replace([':', '/'], "_")));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let batch = PairBatch::new(model.tokenizer()?, pairs, &task_name)?;
    ferrolens_tasks::write_jsonl(&out.join("pairs.jsonl"), &batch.pairs)?;
    let prep = prepare(&model, &batch)?;
    if !a.quiet {
        eprintln!(
            "{} on {task_name}: {} pairs of {} tokens; clean logit diff {:.3} (accuracy {:.0}%), corrupt {:.3}",
            model.cfg.name,
            batch.len(),
            batch.seq_len(),
            prep.clean_value,
            100.0 * prep.clean_accuracy,
            prep.corrupt_value
        );
    }
    // 1. Node scores by all three methods (heads over all positions; MLPs over all positions).
    let t0 = Instant::now();
    let comps = [Component::HeadZ, Component::MlpOut];
    let mut methods = vec![Method::Atp, Method::Relp];
    if method == Method::Act || a.top_k.is_none() {
        methods.insert(0, Method::Act);
    }
    let direction = match a.direction.as_str() {
        "noising" => Direction::Noise,
        "denoising" => Direction::Denoise,
        o => anyhow::bail!("unknown direction `{o}`; use noising or denoising"),
    };
    // One node per head and per MLP: every component over all positions. Noising: AtP/RelP
    // gradients at the clean run estimate the drop M(clean) - M(node corrupted), and the act
    // scores are turned into the same drop (1 - patched metric, in normalised units).
    let noise = direction == Direction::Noise;
    let opts = RunOptions { by_pos: false, resid_by_pos: false, rules: LrpRules::RELP, direction, at_clean: noise, quiet: a.quiet };
    let (mut grids, times, _) = run_methods_batched(&model, &batch, &prep, a.batching, &methods, &comps, &opts)?;
    if noise {
        grids.iter_mut().filter(|g| g.method == "act").for_each(|g| g.values.iter_mut().for_each(|v| *v = 1.0 - *v));
    }
    let get = |m: &str, c: Component| grids.iter().find(|g| g.method == m && g.component == c).expect("grid");
    let scores = node_scores(get(method.name(), Component::HeadZ), get(method.name(), Component::MlpOut), &model);
    let t_scores = t0.elapsed().as_secs_f64();
    let mut ranked: Vec<Node> = scores.keys().copied().collect();
    ranked.sort_by(|x, y| scores[y].abs().total_cmp(&scores[x].abs()));

    // 2. Faithfulness under mean ablation (means over the corrupt prompts).
    let t0 = Instant::now();
    let bar = crate::progress_bar(a.quiet, "faithfulness");
    bar.set_length(1);
    let means = AblationMeans::new(&model, &prep.corrupt, prep.mask.as_ref())?;
    let (size, curve): (Option<usize>, Vec<CurvePoint>) = match a.top_k {
        Some(k) => {
            let mut sizes = size_grid(ranked.len());
            if !sizes.contains(&k) {
                sizes.push(k);
                sizes.sort();
            }
            (Some(k), ferrolens_methods::faithfulness_curve(&model, &prep.raw_data(), &means, &ranked, &sizes, prep.clean_value, 240)?)
        }
        None => smallest_faithful(&model, &prep.raw_data(), &means, &ranked, &size_grid(ranked.len()), prep.clean_value, a.target, 240)?,
    };
    bar.finish_and_clear();
    let t_faith = t0.elapsed().as_secs_f64();
    let k = size.unwrap_or(ranked.len());
    let circuit: Vec<Node> = ranked[..k].to_vec();
    let faith = curve.iter().find(|p| p.size == k).map(|p| p.faithfulness).unwrap_or(f64::NAN);

    // 3. Edges between circuit nodes (EAP).
    let t0 = Instant::now();
    let head_inputs = match a.edge_receivers.as_str() {
        "heads" => true,
        "blocks" => false,
        other => anyhow::bail!("--edge-receivers `{other}`: use heads or blocks"),
    };
    let edges = edge_attribution(&model, &prep.data(), &EdgeOptions { head_inputs })?;
    let in_circ = |n: &Node| circuit.contains(n);
    let recv_in = |r: &Receiver| receiver_targets(r, &model, |n| circuit.contains(n)).is_some_and(|t| !t.is_empty());
    let mut circ_edges: Vec<&ferrolens_methods::Edge> = edges.iter().filter(|e| in_circ(&e.sender) && recv_in(&e.receiver)).collect();
    circ_edges.sort_by(|x, y| y.score.abs().total_cmp(&x.score.abs()));
    let t_edges = t0.elapsed().as_secs_f64();

    // 4. Head classes (IOI labels).
    let classes = head_classes(&model, &prep, &batch.pairs, &circuit, &scores)?;

    // 5. Outputs.
    write_table(&scores_table(&grids), &out.join("scores"))?;
    let class_of: BTreeMap<Node, String> = classes.iter().map(|(n, c, _)| (*n, c.clone())).collect();
    let node_table = Table::new()
        .col("node", Column::Str(ranked.iter().map(|n| n.label()).collect()))
        .col("layer", Column::OptU64(ranked.iter().map(|n| Some(n.layer() as u64)).collect()))
        .col(
            "head",
            Column::OptU64(
                ranked
                    .iter()
                    .map(|n| match n {
                        Node::Head(_, h) => Some(*h as u64),
                        _ => None,
                    })
                    .collect(),
            ),
        )
        .col("score", Column::F64(ranked.iter().map(|n| scores[n]).collect()))
        .col("in_circuit", Column::Str(ranked.iter().map(|n| in_circ(n).to_string()).collect()))
        .col("class", Column::Str(ranked.iter().map(|n| class_of.get(n).cloned().unwrap_or_default()).collect()));
    write_table(&node_table, &out.join("nodes"))?;
    let edge_table = Table::new()
        .col("sender", Column::Str(circ_edges.iter().map(|e| e.sender.label()).collect()))
        .col("receiver", Column::Str(circ_edges.iter().map(|e| e.receiver.label()).collect()))
        .col("score", Column::F64(circ_edges.iter().map(|e| e.score).collect()));
    write_table(&edge_table, &out.join("edges"))?;
    let curve_table = Table::new()
        .col("size", Column::OptU64(curve.iter().map(|p| Some(p.size as u64)).collect()))
        .col("faithfulness", Column::F64(curve.iter().map(|p| p.faithfulness).collect()));
    write_table(&curve_table, &out.join("faithfulness"))?;
    let corr = correlations(&grids);

    let circuit_json = serde_json::json!({
        "model": model.cfg.name, "task": task_name, "method": method.name(),
        "nodes": circuit.iter().map(|n| serde_json::json!({"node": n.label(), "layer": n.layer(),
            "head": match n { Node::Head(_, h) => Some(*h), _ => None }, "score": scores[n], "class": class_of.get(n)})).collect::<Vec<_>>(),
        "edges": circ_edges.iter().take(200).map(|e| serde_json::json!({"sender": e.sender.label(), "receiver": e.receiver.label(), "score": e.score})).collect::<Vec<_>>(),
        "faithfulness": faith, "target": a.target, "reached_target": size.is_some() && a.top_k.is_none(),
        "size": k, "n_heads": circuit.iter().filter(|n| matches!(n, Node::Head(..))).count(),
        "n_mlps": circuit.iter().filter(|n| matches!(n, Node::Mlp(_))).count(),
        "curve": curve,
    });
    std::fs::write(out.join("circuit.json"), serde_json::to_string_pretty(&circuit_json)?)?;

    let figs = figures(&model, &out, &grids, method, &curve, &circuit, &circ_edges, &prep, &batch, a.target)?;
    let summary = serde_json::json!({
        "model": model.cfg.name, "task": task_name, "n_pairs": batch.len(), "seq_len": batch.seq_len(),
        "clean_logit_diff": prep.clean_value, "corrupt_logit_diff": prep.corrupt_value, "clean_accuracy": prep.clean_accuracy,
        "method": method.name(), "circuit_size": k, "faithfulness": faith, "target": a.target,
        "n_heads": circuit_json["n_heads"], "n_mlps": circuit_json["n_mlps"],
        "pearson_vs_act": corr.iter().map(|(m, c, r, n)| serde_json::json!({"method": m, "component": c, "r": r, "n": n})).collect::<Vec<_>>(),
        "timings_s": {"node_scores": t_scores, "faithfulness": t_faith, "edges": t_edges, "total": t_start.elapsed().as_secs_f64(),
                      "per_method": times.iter().map(|(m, t)| (m.clone(), serde_json::json!(t))).collect::<serde_json::Map<_, _>>()},
        "out": out.display().to_string(),
    });
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    write_report(&out, &model, &task_name, &a, &prep, &batch, &summary, &node_table, &edge_table, &classes, &corr, &figs)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !a.quiet {
        eprintln!(
            "circuit: {k} nodes ({} heads, {} MLPs), faithfulness {:.1}% (target {:.0}%); report: {}",
            circuit_json["n_heads"],
            circuit_json["n_mlps"],
            100.0 * faith,
            100.0 * a.target,
            out.join("report.html").display()
        );
    }
    Ok(())
}

struct Figs {
    list: Vec<(PathBuf, String)>,
}

impl Figs {
    /// Inline into `r`, in list order, the figures whose file name starts with one of `prefixes`.
    fn add_to(&self, r: &mut Report, prefixes: &[&str]) -> Result<()> {
        for (stem, cap) in &self.list {
            let name = stem.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
            if prefixes.iter().any(|p| name.starts_with(p)) {
                r.figure(&stem.with_extension("svg"), cap)?;
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn figures(
    model: &HookedTransformer,
    out: &Path,
    grids: &[ScoreGrid],
    method: Method,
    curve: &[CurvePoint],
    circuit: &[Node],
    edges: &[&ferrolens_methods::Edge],
    prep: &Prepared,
    batch: &PairBatch,
    target: f64,
) -> Result<Figs> {
    let mut list = Vec::new();
    for g in grids.iter().filter(|g| g.component == Component::HeadZ) {
        let stem = out.join(format!("heads_{}", g.method));
        let values = (0..g.n_layers).map(|l| (0..g.n_heads).map(|h| g.get(l, 0, h)).collect()).collect();
        let title = format!("Head scores ({}), normalised logit difference", g.method);
        heatmap(&Heatmap { title: title.clone(), values, row_label: "layer".into(), col_label: "head".into(), col_ticks: vec![] }, &stem)?;
        list.push((stem, title));
    }
    if let Some(g) = grids.iter().find(|g| g.component == Component::MlpOut && g.method == method.name()) {
        let stem = out.join("mlps");
        let bars: Vec<(String, f64)> = (0..g.n_layers).map(|l| (format!("MLP{l}"), g.get(l, 0, 0))).collect();
        bar_chart(&format!("MLP scores ({})", g.method), "score", &bars, &stem)?;
        list.push((stem, format!("MLP scores ({})", g.method)));
    }
    let stem = out.join("faithfulness_curve");
    let pts: Vec<(f64, f64)> = curve.iter().map(|p| (p.size as f64, p.faithfulness)).collect();
    let tgt: Vec<(f64, f64)> = vec![(0.0, target), (curve.last().map(|p| p.size as f64).unwrap_or(1.0), target)];
    line_chart(
        "Faithfulness under mean ablation",
        "circuit size (nodes, ranked by score)",
        "fraction of logit difference",
        &[("circuit".into(), pts), (format!("target {:.0}%", 100.0 * target), tgt)],
        &stem,
    )?;
    list.push((stem, "Faithfulness curve: top-k nodes kept, the rest mean-ablated".into()));
    // Circuit graph: nodes placed by layer, edges with the largest |EAP| scores.
    let stem = out.join("circuit_graph");
    circuit_graph(model, circuit, edges, &stem)?;
    list.push((stem, "Circuit graph: nodes by layer; edges are the 60 largest |EAP| scores among circuit nodes (red positive, blue negative)".into()));
    // Attention patterns of the top heads on the first clean prompt.
    let tokens = model.to_str_tokens(&batch.pairs[0].clean)?;
    // The first prompt alone (without the batch's padding).
    let pad0 = prep.pads.first().copied().unwrap_or(0);
    let first = prep.clean.i(0..1)?.narrow(1, pad0, tokens.len())?;
    let heads: Vec<(usize, usize)> = circuit
        .iter()
        .filter_map(|n| match n {
            Node::Head(l, h) => Some((*l, *h)),
            _ => None,
        })
        .take(3)
        .collect();
    let pts: Vec<HookPoint> = heads.iter().map(|(l, _)| HookPoint::Pattern(*l)).collect();
    let mut hooks = Hooks::new().cache_hooks(&pts);
    model.run(&first, &mut hooks)?;
    for (l, h) in heads {
        let pat: Vec<Vec<f32>> = hooks.cache_ref().get(HookPoint::Pattern(l))?.i((0, h))?.to_vec2()?;
        let stem = out.join(format!("pattern_L{l}H{h}"));
        let title = format!("Attention pattern of L{l}H{h} (rows: query position)");
        heatmap(
            &Heatmap {
                title: title.clone(),
                values: pat.iter().map(|r| r.iter().map(|v| *v as f64).collect()).collect(),
                row_label: "query position".into(),
                col_label: "key token".into(),
                col_ticks: tokens.clone(),
            },
            &stem,
        )?;
        list.push((stem, title));
    }
    Ok(Figs { list })
}

/// The circuit nodes an edge into `r` lands on (`None` for the logits): the MLP, or the circuit
/// heads whose query, key or value input (or whole block) the receiver is.
fn receiver_targets(r: &Receiver, model: &HookedTransformer, in_circuit: impl Fn(&Node) -> bool) -> Option<Vec<Node>> {
    let group = model.cfg.n_heads / model.cfg.n_kv_heads;
    match r {
        Receiver::Logits => None,
        Receiver::Mlp(l) => Some([Node::Mlp(*l)].into_iter().filter(|n| in_circuit(n)).collect()),
        Receiver::Attn(l) | Receiver::Head(l, _, _) => {
            Some(r.heads(model.cfg.n_heads, group).into_iter().map(|h| Node::Head(*l, h)).filter(|n| in_circuit(n)).collect())
        }
    }
}

fn circuit_graph(model: &HookedTransformer, circuit: &[Node], edges: &[&ferrolens_methods::Edge], stem: &Path) -> Result<()> {
    use ferrolens_report::GraphNode;
    // One row per layer that has circuit nodes (output at the top), nodes left to right.
    let mut layers: BTreeMap<usize, Vec<Node>> = BTreeMap::new();
    for n in circuit {
        layers.entry(n.layer()).or_default().push(*n);
    }
    let used: Vec<usize> = layers.keys().rev().copied().collect();
    let rows = used.len() + 1;
    let y_of = |row: usize| row as f64 / (rows.max(2) - 1) as f64;
    let mut nodes = vec![GraphNode { x: 0.5, y: 0.0, label: "LOGITS".into(), fill: (220, 220, 220) }];
    let mut index: BTreeMap<Node, usize> = BTreeMap::new();
    let mut side = Vec::new();
    for (row, l) in used.iter().enumerate() {
        let ns = &layers[l];
        side.push((y_of(row + 1), format!("layer {l}")));
        for (j, n) in ns.iter().enumerate() {
            let fill = if matches!(n, Node::Mlp(_)) { (253, 226, 196) } else { (207, 227, 247) };
            index.insert(*n, nodes.len());
            nodes.push(GraphNode { x: (j as f64 + 0.5) / ns.len() as f64, y: y_of(row + 1), label: n.label(), fill });
        }
    }
    // An edge into a sublayer is drawn to each circuit node of that sublayer.
    let mut lines = Vec::new();
    for e in edges.iter().take(60) {
        let Some(&a) = index.get(&e.sender) else {
            continue;
        };
        let targets: Vec<usize> = match receiver_targets(&e.receiver, model, |n| index.contains_key(n)) {
            None => vec![0],
            Some(ns) => ns.iter().map(|n| index[n]).collect(),
        };
        lines.extend(targets.into_iter().map(|b| (a, b, e.score)));
    }
    ferrolens_report::graph(&format!("Circuit: {} nodes, strongest EAP edges", circuit.len()), &nodes, &lines, &side, stem)
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    out: &Path,
    model: &HookedTransformer,
    task: &str,
    a: &Args,
    prep: &Prepared,
    batch: &PairBatch,
    summary: &serde_json::Value,
    nodes: &Table,
    edges: &Table,
    classes: &[(Node, String, f64)],
    corr: &[(String, String, f64, usize)],
    figs: &Figs,
) -> Result<()> {
    let mut r = Report::new(&format!("ferrolens circuit study: {task} on {}", model.cfg.name));
    r.heading("Setup");
    r.kv(&[
        (
            "model",
            format!(
                "{} ({}, {} layers, {} heads, {} KV heads, d_model {})",
                model.cfg.name, model.cfg.family, model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_model
            ),
        ),
        ("task", task.to_string()),
        ("pairs", format!("{} pairs of {} tokens (seed {})", batch.len(), batch.seq_len(), a.task.seed)),
        ("example clean", batch.pairs[0].clean.clone()),
        ("example corrupt", batch.pairs[0].corrupt.clone()),
        ("answer / wrong", format!("{:?} / {:?}", batch.pairs[0].answer, batch.pairs[0].wrong)),
        ("metric", "logit difference logit[answer] - logit[wrong] at the last position; patching scores are normalised: 0 = corrupt, 1 = clean".into()),
        ("ranking method", format!("{} ({})", a.method, a.direction)),
        ("ablation", "mean ablation over the corrupt prompts, per position (ABC distribution for IOI)".into()),
    ]);
    r.heading("Model behaviour");
    r.kv(&[
        ("clean logit diff", format!("{:.3}", prep.clean_value)),
        ("corrupt logit diff", format!("{:.3}", prep.corrupt_value)),
        ("task accuracy (clean, answer beats wrong)", format!("{:.1}%", 100.0 * prep.clean_accuracy)),
    ]);
    r.heading("Circuit");
    r.kv(&[
        ("size", format!("{} nodes: {} heads, {} MLPs", summary["circuit_size"], summary["n_heads"], summary["n_mlps"])),
        (
            "faithfulness",
            format!(
                "{:.1}% of the full model's logit difference (target {:.0}%)",
                100.0 * summary["faithfulness"].as_f64().unwrap_or(f64::NAN),
                100.0 * a.target
            ),
        ),
    ]);
    figs.add_to(&mut r, &["faithfulness", "circuit"])?;
    if !classes.is_empty() {
        r.heading("Head classes (Wang et al. 2022 terms)");
        r.para("Each circuit head gets the class whose probe it attends along most (mean over prompts): name mover end->IO, S-inhibition end->S2, induction S2->S1+1, duplicate-token S2->S1, previous-token S1+1->S1; below 0.2 it stays unclassified.");
        let t = Table::new()
            .col("head", Column::Str(classes.iter().map(|c| c.0.label()).collect()))
            .col("class", Column::Str(classes.iter().map(|c| c.1.clone()).collect()))
            .col("attention", Column::F64(classes.iter().map(|c| c.2).collect()));
        r.html(&t.to_html(100));
    }
    r.heading("Node scores");
    r.html(&nodes.to_html(40));
    figs.add_to(&mut r, &["heads_", "mlps"])?;
    if !corr.is_empty() {
        r.heading("Agreement of the gradient methods with activation patching");
        let t = Table::new()
            .col("method", Column::Str(corr.iter().map(|c| c.0.clone()).collect()))
            .col("component", Column::Str(corr.iter().map(|c| c.1.clone()).collect()))
            .col("pearson r", Column::F64(corr.iter().map(|c| c.2).collect()));
        r.html(&t.to_html(20));
    }
    r.heading("Edges (EAP) among circuit nodes");
    r.para(if a.edge_receivers == "heads" {
        "Receivers: a head's query input (LxHy.q), a KV head's key or value input (LxKVg.k / .v, shared by its group of query heads), an MLP, or the logits."
    } else {
        "Receivers: an attention block (ATTNx, all its heads), an MLP, or the logits."
    });
    r.html(&edges.to_html(30));
    r.heading("Attention patterns of the top heads");
    figs.add_to(&mut r, &["pattern_"])?;
    r.heading("Timings");
    r.html(&format!("<pre>{}</pre>", ferrolens_report::html::escape(&serde_json::to_string_pretty(&summary["timings_s"])?)));
    r.para("Files: scores.csv/.parquet (every method and component), nodes.csv, edges.csv, faithfulness.csv, circuit.json, summary.json, pairs.jsonl, figures as SVG and PNG.");
    r.write(&out.join("report.html"))
}
