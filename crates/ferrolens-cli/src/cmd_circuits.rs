//! `ferrolens circuits eval`: MIB's circuit-localisation evaluation (CPR and CMD) of node
//! methods (act, AtP, RelP) and edge methods (EAP, EAP-IG on inputs or activations) on one set of
//! prompt pairs. The evaluation is `ferrolens_methods::mib::evaluate`; this command parses, calls
//! it, and writes mib.csv, the curves, the edge and node scores, a figure and report.html.

use crate::cmd_discover::TaskArgs;
use crate::parts::{sha256, write_part, Manifest, Part};
use crate::study::Bars;
use anyhow::{bail, Result};
use ferrolens_methods::edge_circuit::{EdgeAblation, EdgeGraph};
use ferrolens_methods::mib::{evaluate, planned_rankings, CircuitMethod, MibEvaluation, MibOptions, PERCENTAGES};
use ferrolens_methods::shard::Shard;
use ferrolens_report::{line_chart, write_table, Column, Report, Table};
use ferrolens_tasks::{PairBatch, Task};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `ferrolens circuits`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// CPR and CMD (Mechanistic Interpretability Benchmark) of every method's circuits, with a
    /// seeded random ranking as the floor.
    Eval(EvalArgs),
    /// Merullo et al.'s repair: the IOI circuit's inhibition heads made to attend to the wrong
    /// colours in Colored Objects; accuracy before and after, with random heads as a control.
    Repair(RepairArgs),
}

/// Arguments of `ferrolens circuits repair`.
#[derive(clap::Args)]
pub struct RepairArgs {
    /// Model: a registry name, a .gguf file, a HF directory or a hub id.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// IOI pairs used to find the heads.
    #[arg(long, default_value_t = 24)]
    ioi_n: usize,
    /// Colored Objects prompts scored.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Colored Objects: objects per question.
    #[arg(long, default_value_t = 3)]
    objects: usize,
    /// Colored Objects: solved examples before the query.
    #[arg(long, default_value_t = 1)]
    shots: usize,
    /// Colored Objects wording: qa or statement.
    #[arg(long, default_value = "qa")]
    wording: String,
    /// Seed of both prompt samplers and of the random heads.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Heads taken as the IOI circuit (largest |AtP| score).
    #[arg(long, default_value_t = 40)]
    circuit_heads: usize,
    /// S-inhibition heads intervened on.
    #[arg(long, default_value_t = 3)]
    n_inhibition: usize,
    /// Negative name movers intervened on.
    #[arg(long, default_value_t = 1)]
    n_negative: usize,
    /// Random-head control draws.
    #[arg(long, default_value_t = 5)]
    draws: usize,
    /// Output directory (default out/repair).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No summary on stderr.
    #[arg(long)]
    quiet: bool,
}

/// Arguments of `ferrolens circuits eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// Your own pairs as JSONL instead of a built-in task (--task is then ignored).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model: a registry name, a .gguf file, a HF directory or a hub id.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// Methods, comma-separated: act, atp, relp, atp_ig (node level; atp_ig: IG on the input
    /// embedding, MIB's NAP-IG) and eap, eap_ig (EAP-IG on the input embedding), eap_ig_act
    /// (EAP-IG on each node's activations) (edge level).
    #[arg(long, value_delimiter = ',', value_parser = parse_method, default_value = "act,atp,relp,eap,eap_ig")]
    methods: Vec<CircuitMethod>,
    /// How edges outside a circuit are ablated (in scoring and evaluation): cf (the paired
    /// corrupt prompt's activations, MIB's default) or mean (per-position mean over the corrupt
    /// prompts).
    #[arg(long, value_enum, default_value = "cf")]
    ablation: EdgeAblation,
    /// EAP-IG interpolation steps (MIB's default 5).
    #[arg(long, default_value_t = 5)]
    ig_steps: usize,
    /// Receivers: `heads` (each head's query input, each KV head's key and value inputs, as MIB)
    /// or `blocks` (one per attention block).
    #[arg(long, value_enum, default_value = "heads")]
    edge_receivers: crate::cmd_discover::EdgeReceivers,
    /// Fractions of edges (nodes) for the curves, comma-separated and increasing; MIB's
    /// 0.001 .. 1 by default (other fractions give areas not comparable with MIB's tables).
    #[arg(long, value_delimiter = ',', default_values_t = PERCENTAGES.to_vec())]
    fractions: Vec<f64>,
    /// Seed of the random ranking.
    #[arg(long, default_value_t = 0)]
    random_seed: u64,
    /// Output directory (default out/circuits-eval).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Score and evaluate shard I of N (0-based) of the rankings (methods, then random; round
    /// robin) and write them with a manifest to OUT/shard.json; `ferrolens merge` joins the parts
    /// into the unsharded outputs (docs/scale-out.md).
    #[arg(long)]
    shard: Option<Shard>,
    /// Print the rankings (work units) and this shard's share, then stop.
    #[arg(long)]
    dry_run: bool,
}

fn parse_method(s: &str) -> std::result::Result<CircuitMethod, String> {
    s.parse::<CircuitMethod>().map_err(|e| e.to_string())
}

pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        Sub::Eval(a) => eval(a),
        Sub::Repair(a) => repair_cmd(a),
    }
}

/// What `circuits eval` writes its outputs from (besides the evaluation): everything that does
/// not need the model, so a merge runs without it.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct EvalInfo {
    model: String,
    task: String,
    pairs: usize,
    ig_steps: usize,
    head_inputs: bool,
    random_seed: u64,
    fractions: Vec<f64>,
    /// (sender, receiver) of every edge, graph order.
    edge_labels: Vec<(String, String)>,
    /// Every node, sender-id order.
    node_labels: Vec<String>,
}

/// A `circuits eval` shard's part: the info, the rows it owns and their scores.
#[derive(Serialize, Deserialize)]
pub(crate) struct EvalPayload {
    info: EvalInfo,
    /// The rankings of the whole evaluation, in row order.
    planned: Vec<String>,
    ev: MibEvaluation,
    edge_scores: Vec<(String, Vec<f64>)>,
    node_scores: Vec<(String, Vec<f64>)>,
    pairs_jsonl: String,
}

fn eval(a: EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut methods = a.methods.clone();
    methods.dedup();
    let opts = MibOptions {
        methods: &methods,
        ablation: a.ablation,
        head_inputs: a.edge_receivers == crate::cmd_discover::EdgeReceivers::Heads,
        ig_steps: a.ig_steps,
        seed: a.random_seed,
        fractions: &a.fractions,
        progress: None,
        shard: a.shard,
    };
    opts.check()?;
    let planned = planned_rankings(&methods);
    if a.dry_run {
        let shard = a.shard.unwrap_or(Shard { index: 0, count: 1 });
        println!("circuits eval: {} rankings (work units), in order: {}", planned.len(), planned.join(", "));
        let mine: Vec<&String> = planned.iter().enumerate().filter(|(i, _)| shard.owns(*i)).map(|(_, n)| n).collect();
        println!(
            "shard {shard} scores and evaluates: {}",
            if mine.is_empty() { "nothing (more shards than rankings)".to_string() } else { mine.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ") }
        );
        println!(
            "cost (this repository's 2-core CPU, SmolLM2-135M, 24 IOI pairs, docs/benchmarks.md): eap_ig_act scoring ~36 min, \
             act node scores ~2 min, the others under a minute each; every ranking's two curves take 20 edge-patched runs"
        );
        return Ok(());
    }
    if let Some(s) = a.shard {
        if s.count > planned.len() {
            bail!(
                "{} shards for {} rankings ({}): shard {s} would have nothing to do; give at most {} shards",
                s.count,
                planned.len(),
                planned.join(", "),
                planned.len()
            );
        }
    }
    let model = crate::load_model(&a.model)?;
    let (task_name, pairs) = a.task.load(a.data.as_deref(), &model)?;
    let batch = PairBatch::new(model.tokenizer()?, pairs, &task_name)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("out").join("circuits-eval"));
    let bars = Bars::new(a.quiet);
    let progress = |what: &str, done: usize, total: usize| bars.report(what, done, total);
    let opts = MibOptions { progress: Some(&progress), ..opts };
    crate::in_new_dir(&out, || {
        let graph = EdgeGraph::new(&model, opts.head_inputs);
        if !a.quiet {
            eprintln!(
                "{} on {task_name}: {} pairs, {} edges, {} nodes, {} ablation",
                model.cfg.name,
                batch.len(),
                graph.len(),
                graph.senders.len(),
                a.ablation.name()
            );
        }
        let mut ev = evaluate(&model, &batch, &opts)?;
        bars.finish();
        let info = EvalInfo {
            model: model.cfg.name.clone(),
            task: task_name.clone(),
            pairs: batch.len(),
            ig_steps: a.ig_steps,
            head_inputs: opts.head_inputs,
            random_seed: a.random_seed,
            fractions: a.fractions.clone(),
            edge_labels: (0..graph.len()).map(|i| graph.labels(i)).collect(),
            node_labels: graph.senders.iter().map(|s| s.label()).collect(),
        };
        let mut jsonl = Vec::new();
        for p in &batch.pairs {
            jsonl.push(serde_json::to_string(p)?);
        }
        let pairs_jsonl = jsonl.join("\n") + "\n";
        if let Some(shard) = a.shard {
            let (edge_scores, node_scores) = (std::mem::take(&mut ev.edge_scores), std::mem::take(&mut ev.node_scores));
            let options = serde_json::json!({
                "methods": methods.iter().map(|m| m.name()).collect::<Vec<_>>(), "ablation": a.ablation.name(), "ig_steps": a.ig_steps,
                "receivers": format!("{:?}", a.edge_receivers), "fractions": a.fractions, "random_seed": a.random_seed,
            });
            let rule = "ranking % N == I over the rankings in row order (node methods, edge methods, atp_ig, random)";
            let manifest = Manifest {
                data: task_name.clone(),
                data_sha256: sha256(pairs_jsonl.as_bytes()),
                options,
                ..Manifest::new("circuits eval", shard, &model, planned.len(), rule, t0.elapsed().as_secs_f64())?
            };
            let mine = planned.iter().enumerate().filter(|(i, _)| shard.owns(*i)).map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", ");
            write_part(&out, &Part { manifest, payload: EvalPayload { info, planned, ev, edge_scores, node_scores, pairs_jsonl } })?;
            if !a.quiet {
                eprintln!("shard {shard}: {} in {:.1} s; wrote {}", mine, t0.elapsed().as_secs_f64(), out.join(crate::parts::PART_FILE).display());
            }
            return Ok(());
        }
        std::fs::write(out.join("pairs.jsonl"), &pairs_jsonl)?;
        write_outputs(&out, &info, &ev, t0.elapsed().as_secs_f64(), None)?;
        if !a.quiet {
            for r in &ev.rows {
                eprintln!("{:>10}  CPR {:6.3}  CMD {:6.3}", r.method, r.cpr, r.cmd);
            }
            eprintln!("report: {}", out.join("report.html").display());
        }
        Ok(())
    })
}

/// `ferrolens merge` of `circuits eval` parts (checked to be every shard of one evaluation, in
/// shard order): rows and score columns in the unsharded order.
pub(crate) fn merge(parts: Vec<Part<EvalPayload>>, out: &Path, quiet: bool) -> Result<()> {
    let n = parts.len();
    let seconds: f64 = parts.iter().map(|p| p.manifest.seconds).sum();
    let first = &parts[0].payload;
    let (info, planned, pairs_jsonl) = (first.info.clone(), first.planned.clone(), first.pairs_jsonl.clone());
    let mut ev = MibEvaluation { rows: vec![], edge_scores: vec![], node_scores: vec![], ..first.ev.clone() };
    for (i, name) in planned.iter().enumerate() {
        let owner = &parts[i % n].payload;
        let row = owner
            .ev
            .rows
            .iter()
            .find(|r| &r.method == name)
            .ok_or_else(|| anyhow::anyhow!("shard {}/{n} has no row for {name}, which it owns; rerun it", i % n))?;
        ev.rows.push(row.clone());
        if let Some(s) = owner.edge_scores.iter().find(|(m, _)| m == name) {
            ev.edge_scores.push(s.clone());
        }
        if let Some(s) = owner.node_scores.iter().find(|(m, _)| m == name) {
            ev.node_scores.push(s.clone());
        }
    }
    for p in &parts {
        if (p.payload.ev.ends.full - ev.ends.full).abs() > 1e-6 || (p.payload.ev.ends.empty - ev.ends.empty).abs() > 1e-6 {
            bail!("the shards measured different full-model or empty-circuit metrics; they did not run on the same model and data");
        }
    }
    crate::in_new_dir(out, || {
        std::fs::write(out.join("pairs.jsonl"), &pairs_jsonl)?;
        write_outputs(out, &info, &ev, seconds, Some(n))?;
        if !quiet {
            eprintln!("merged {n} shards; report: {}", out.join("report.html").display());
        }
        Ok(())
    })
}

fn write_outputs(out: &Path, info: &EvalInfo, ev: &MibEvaluation, seconds: f64, shards: Option<usize>) -> Result<()> {
    let task = &info.task;
    let rows = &ev.rows;
    let mib = Table::new()
        .col("method", Column::Str(rows.iter().map(|r| r.method.clone()).collect()))
        .col("cpr", Column::F64(rows.iter().map(|r| r.cpr).collect()))
        .col("cmd", Column::F64(rows.iter().map(|r| r.cmd).collect()))
        .col("level", Column::Str(rows.iter().map(|r| level(&r.method).to_string()).collect()))
        .col("score_seconds", Column::F64(rows.iter().map(|r| r.score_seconds).collect()));
    write_table(&mib, &out.join("mib"))?;
    // Curves: one row per (method, ranking, fraction).
    let (mut m, mut rk, mut x, mut req, mut kept, mut metric, mut f) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in rows {
        for (name, curve) in [("signed", &r.signed), ("absolute", &r.absolute)] {
            for p in curve {
                m.push(r.method.clone());
                rk.push(name.to_string());
                x.push(p.fraction);
                req.push(Some(p.requested as u64));
                kept.push(Some(p.edges as u64));
                metric.push(p.metric);
                f.push(p.faithfulness);
            }
        }
    }
    let curves = Table::new()
        .col("method", Column::Str(m))
        .col("ranking", Column::Str(rk))
        .col("fraction", Column::F64(x))
        .col("requested", Column::OptU64(req))
        .col("edges", Column::OptU64(kept))
        .col("logit_diff", Column::F64(metric))
        .col("faithfulness", Column::F64(f));
    write_table(&curves, &out.join("curves"))?;
    if !ev.edge_scores.is_empty() {
        let mut t = Table::new()
            .col("sender", Column::Str(info.edge_labels.iter().map(|l| l.0.clone()).collect()))
            .col("receiver", Column::Str(info.edge_labels.iter().map(|l| l.1.clone()).collect()));
        for (name, s) in &ev.edge_scores {
            t = t.col(name, Column::F64(s.clone()));
        }
        write_table(&t, &out.join("edge_scores"))?;
    }
    if !ev.node_scores.is_empty() {
        let mut t = Table::new().col("node", Column::Str(info.node_labels.clone()));
        for (name, s) in &ev.node_scores {
            t = t.col(name, Column::F64(s.clone()));
        }
        write_table(&t, &out.join("node_scores"))?;
    }
    let series = |absolute: bool| -> Vec<(String, Vec<(f64, f64)>)> {
        rows.iter()
            .map(|r| (r.method.clone(), (if absolute { &r.absolute } else { &r.signed }).iter().map(|p| (p.fraction.log10(), p.faithfulness)).collect()))
            .collect()
    };
    let xl = "log10 fraction of edges (of nodes for act/atp/relp)";
    line_chart("Faithfulness, signed ranking (CPR = area)", xl, "faithfulness", &series(false), &out.join("curves_signed"))?;
    line_chart("Faithfulness, |score| ranking (CMD = area under |1 - f|)", xl, "faithfulness", &series(true), &out.join("curves_absolute"))?;
    let mut summary = serde_json::json!({
        "model": info.model,
        "task": task,
        "pairs": info.pairs,
        "ablation": ev.ablation.name(),
        "ig_steps": info.ig_steps,
        "receivers": if info.head_inputs { "heads" } else { "blocks" },
        "n_edges": ev.n_edges,
        "n_nodes": ev.n_nodes,
        "logit_diff_full": ev.ends.full,
        "logit_diff_empty": ev.ends.empty,
        "random_seed": info.random_seed,
        "fractions": info.fractions,
        "rows": rows.iter().map(|r| serde_json::json!({"method": r.method, "cpr": r.cpr, "cmd": r.cmd, "score_seconds": r.score_seconds})).collect::<Vec<_>>(),
        "seconds": seconds,
    });
    if let Some(n) = shards {
        summary["shards"] = n.into();
        summary["seconds_note"] = "seconds: summed over the shards; score_seconds: of the shard that ran the method".into();
    }
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    let mut rep = Report::new(&format!("Circuit evaluation (MIB CPR/CMD): {} on {task}", info.model));
    rep.heading("Circuit localisation, MIB metrics");
    rep.para(
        "Each method ranks the edges (edge methods) or the nodes (node methods); the circuit at fraction x is the best floor(x * total) items \
         (pruned to input-to-logits paths), run on the clean prompts with every other edge ablated. Faithfulness \
         f = (m(C) - m(empty)) / (m(full) - m(empty)) with m the mean logit difference. CPR is the area under f with signed scores \
         (higher is better), CMD the area under |1 - f| with |scores| (lower is better), by the trapezoid rule over the fractions \
         0.001 .. 1 (MIB's released code).",
    );
    rep.kv(&[
        ("model", info.model.clone()),
        ("prompt pairs", format!("{} ({task})", info.pairs)),
        ("ablation", ev.ablation.name().to_string()),
        ("edges / nodes", format!("{} / {}", ev.n_edges, ev.n_nodes)),
        ("logit diff: full model / empty circuit", format!("{:.3} / {:.3}", ev.ends.full, ev.ends.empty)),
        ("EAP-IG steps", info.ig_steps.to_string()),
        ("seconds", if let Some(n) = shards { format!("{seconds:.1} (summed over {n} shards)") } else { format!("{seconds:.1}") }),
    ]);
    rep.html(&mib.to_html(50));
    rep.figure(&out.join("curves_signed.svg"), "Faithfulness against the fraction of edges (nodes), signed ranking")?;
    rep.figure(&out.join("curves_absolute.svg"), "Faithfulness against the fraction of edges (nodes), ranking by |score|")?;
    rep.para(
        "MIB's published GPT-2 small IOI figures (counterfactual ablation), for scale: exact edge patching CPR 2.30 / CMD 0.02, \
         EAP-IG-inputs 1.85 / 0.03, EAP-IG-activations 1.82 / 0.03, EAP 1.20 / 0.03, random 0.25 / 0.75. Different model, data and \
         edge count: compare the ordering, not the values.",
    );
    rep.write(&out.join("report.html"))?;
    Ok(())
}

fn level(method: &str) -> &'static str {
    match method {
        "act" | "atp" | "relp" | "atp_ig" => "node",
        _ => "edge",
    }
}

fn repair_cmd(a: RepairArgs) -> Result<()> {
    use ferrolens_methods::repair::{repair, RepairOptions};
    use ferrolens_tasks::TaskOptions;
    if a.n_inhibition + a.n_negative == 0 {
        anyhow::bail!("--n-inhibition and --n-negative are both 0: there is no head to intervene on");
    }
    if a.circuit_heads == 0 {
        anyhow::bail!("--circuit-heads must be at least 1");
    }
    let wording: ferrolens_tasks::colored::Wording = a.wording.parse()?;
    let model = crate::load_model(&a.model)?;
    let tok = model.tokenizer()?;
    let task = |task: Task, n: usize| TaskOptions {
        task,
        n,
        seed: a.seed,
        corruption: ferrolens_tasks::ioi::IoiCorruption::Abc,
        wording,
        objects: a.objects,
        shots: a.shots,
        all_templates: false,
    };
    let ioi = PairBatch::new(tok, task(Task::Ioi, a.ioi_n).generate(tok)?, "ioi")?;
    let co = PairBatch::new(tok, task(Task::ColoredObjects, a.n).generate(tok)?, "colored-objects")?;
    let opts = RepairOptions { circuit_heads: a.circuit_heads, n_inhibition: a.n_inhibition, n_negative: a.n_negative, random_draws: a.draws, seed: a.seed };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("out").join("repair"));
    crate::in_new_dir(&out, || {
        let r = repair(&model, &ioi, &co, &opts)?;
        let label = |hs: &[(usize, usize)]| hs.iter().map(|(l, h)| format!("L{l}H{h}")).collect::<Vec<_>>().join(" ");
        let chosen: Vec<(usize, usize)> = r.heads.iter().map(|h| h.head).collect();
        let mut rows: Vec<(String, String, f64, f64)> = vec![
            ("none".into(), String::new(), r.before.accuracy, r.before.logit_diff),
            ("chosen".into(), label(&chosen), r.after.accuracy, r.after.logit_diff),
        ];
        for (class, s) in &r.parts {
            let hs: Vec<(usize, usize)> = r.heads.iter().filter(|h| &h.class == class).map(|h| h.head).collect();
            rows.push((class.clone(), label(&hs), s.accuracy, s.logit_diff));
        }
        for (i, (hs, s)) in r.random.iter().enumerate() {
            rows.push((format!("random{i}"), label(hs), s.accuracy, s.logit_diff));
        }
        let t = Table::new()
            .col("condition", Column::Str(rows.iter().map(|r| r.0.clone()).collect()))
            .col("heads", Column::Str(rows.iter().map(|r| r.1.clone()).collect()))
            .col("accuracy", Column::F64(rows.iter().map(|r| r.2).collect()))
            .col("logit_diff", Column::F64(rows.iter().map(|r| r.3).collect()));
        write_table(&t, &out.join("repair"))?;
        let rand_acc: Vec<f64> = r.random.iter().map(|(_, s)| s.accuracy).collect();
        let mean = rand_acc.iter().sum::<f64>() / rand_acc.len().max(1) as f64;
        let sd = (rand_acc.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (rand_acc.len().max(2) - 1) as f64).sqrt();
        let summary = serde_json::json!({
            "model": model.cfg.name,
            "ioi_pairs": ioi.len(),
            "colored_prompts": co.len(),
            "objects": a.objects,
            "shots": a.shots,
            "heads": r.heads,
            "accuracy_before": r.before.accuracy,
            "accuracy_after": r.after.accuracy,
            "logit_diff_before": r.before.logit_diff,
            "logit_diff_after": r.after.logit_diff,
            "parts": r.parts.iter().map(|(c, s)| serde_json::json!({"class": c, "accuracy": s.accuracy, "logit_diff": s.logit_diff})).collect::<Vec<_>>(),
            "random_accuracy_mean": mean,
            "random_accuracy_sd": sd,
            "random": r.random.iter().map(|(hs, s)| serde_json::json!({"heads": label(hs), "accuracy": s.accuracy, "logit_diff": s.logit_diff})).collect::<Vec<_>>(),
        });
        std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
        if !a.quiet {
            eprintln!("heads: {}", r.heads.iter().map(|h| format!("L{}H{} ({})", h.head.0, h.head.1, h.class)).collect::<Vec<_>>().join(", "));
            eprintln!(
                "Colored Objects accuracy: {:.1}% before, {:.1}% after; {} random heads: {:.1}% +- {:.1}",
                100.0 * r.before.accuracy,
                100.0 * r.after.accuracy,
                chosen.len(),
                100.0 * mean,
                100.0 * sd
            );
        }
        Ok(())
    })
}
