//! The files of a `ferrolens discover` study: tables (CSV + Parquet), circuit.json, summary.json,
//! figures (SVG + PNG) and report.html, written from a [`Discovery`].

use crate::study::scores_table;
use anyhow::Result;
use candle_core::IndexOp;
use ferrolens_methods::circuit::Discovery;
use ferrolens_methods::study::{correlations, Method, Prepared};
use ferrolens_methods::{Component, CurvePoint, Direction, Edge, Node, ScoreGrid};
use ferrolens_model::{HookPoint, HookedTransformer, Hooks};
use ferrolens_report::{bar_chart, heatmap, line_chart, write_table, Column, Heatmap, Report, Table};
use ferrolens_tasks::PairBatch;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the report states about how the study was run.
pub struct Settings {
    /// Ranking method.
    pub method: Method,
    /// Node-score direction.
    pub direction: Direction,
    /// Faithfulness target.
    pub target: f64,
    /// Prompt-sampler seed.
    pub seed: u64,
    /// EAP receivers are head inputs (else attention blocks).
    pub head_inputs: bool,
    /// When the command started (for the total time).
    pub started: Instant,
}

/// Write every file of the study into `out`; returns the summary (also in summary.json).
pub fn write_study(out: &Path, model: &HookedTransformer, task_name: &str, batch: &PairBatch, found: &Discovery, s: &Settings) -> Result<serde_json::Value> {
    let (prep, circuit, c) = (&found.prep, &found.nodes, &found.circuit);
    let in_circ = |n: &Node| circuit.contains(n);
    let class_of: BTreeMap<Node, String> = found.classes.iter().map(|(n, c, _)| (*n, c.clone())).collect();
    let ranked = &found.ranked;
    write_table(&scores_table(&found.grids), &out.join("scores"))?;
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
        .col("score", Column::F64(ranked.iter().map(|n| found.scores[n]).collect()))
        .col("in_circuit", Column::Str(ranked.iter().map(|n| in_circ(n).to_string()).collect()))
        .col("class", Column::Str(ranked.iter().map(|n| class_of.get(n).cloned().unwrap_or_default()).collect()));
    write_table(&node_table, &out.join("nodes"))?;
    let circ_edges: Vec<&Edge> = found.edges.iter().collect();
    let edge_table = Table::new()
        .col("sender", Column::Str(circ_edges.iter().map(|e| e.sender.label()).collect()))
        .col("receiver", Column::Str(circ_edges.iter().map(|e| e.receiver.label()).collect()))
        .col("score", Column::F64(circ_edges.iter().map(|e| e.score).collect()));
    write_table(&edge_table, &out.join("edges"))?;
    let curve_table = Table::new()
        .col("size", Column::OptU64(c.curve.iter().map(|p| Some(p.size as u64)).collect()))
        .col("faithfulness", Column::F64(c.curve.iter().map(|p| p.faithfulness).collect()));
    write_table(&curve_table, &out.join("faithfulness"))?;
    std::fs::write(out.join("circuit.json"), serde_json::to_string_pretty(c)?)?;
    let corr = correlations(&found.grids);
    let t_figs = Instant::now();
    let figs = figures(model, out, &found.grids, s.method, &c.curve, circuit, &circ_edges, prep, batch, s.target)?;
    let t_figs = t_figs.elapsed().as_secs_f64();
    let (t_scores, t_faith, t_edges, times) = &found.timings;
    let summary = serde_json::json!({
        "model": model.cfg.name, "task": task_name, "n_pairs": batch.len(), "seq_len": batch.seq_len(),
        "clean_logit_diff": prep.clean_value, "corrupt_logit_diff": prep.corrupt_value, "clean_accuracy": prep.clean_accuracy,
        "method": s.method.name(), "circuit_size": c.size, "faithfulness": c.faithfulness, "target": s.target,
        "n_heads": c.n_heads, "n_mlps": c.n_mlps,
        "pearson_vs_act": corr.iter().map(|(m, c, r, n)| serde_json::json!({"method": m, "component": c, "r": r, "n": n})).collect::<Vec<_>>(),
        "timings_s": {"node_scores": t_scores, "faithfulness": t_faith, "edges": t_edges, "figures": t_figs, "total": s.started.elapsed().as_secs_f64(),
                      "per_method": times.iter().map(|(m, t)| (m.to_string(), serde_json::json!(t))).collect::<serde_json::Map<_, _>>()},
        "out": out.display().to_string(),
    });
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    write_report(out, model, task_name, s, prep, batch, &summary, &node_table, &edge_table, &found.classes, &corr, &figs)?;
    Ok(summary)
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
    edges: &[&Edge],
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
        let targets: Vec<usize> = match ferrolens_methods::circuit::receiver_nodes(&e.receiver, model, |n| index.contains_key(n)) {
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
    s: &Settings,
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
        ("pairs", format!("{} pairs of {} tokens (seed {})", batch.len(), batch.seq_len(), s.seed)),
        ("example clean", batch.pairs[0].clean.clone()),
        ("example corrupt", batch.pairs[0].corrupt.clone()),
        ("answer / wrong", format!("{:?} / {:?}", batch.pairs[0].answer, batch.pairs[0].wrong)),
        ("metric", "logit difference logit[answer] - logit[wrong] at the last position; patching scores are normalised: 0 = corrupt, 1 = clean".into()),
        ("ranking method", format!("{} ({})", s.method, if s.direction == Direction::Noise { "noising" } else { "denoising" })),
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
                100.0 * s.target
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
    r.para(if s.head_inputs {
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
