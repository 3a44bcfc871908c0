//! `ferrolens discover`: a circuit-discovery study with an HTML report. The study itself is
//! `ferrolens_methods::circuit::discover` (node scores by act/AtP/RelP, the smallest faithful
//! circuit under mean ablation, EAP edges, IOI head classes); this command parses, calls it, and
//! writes the tables, figures, circuit.json and report.html.

use crate::discover_report::Settings;
use crate::parts::{join_values, sha256, to_part_values, write_part, Manifest, Part};
use crate::study::Bars;
use anyhow::{bail, Context, Result};
use ferrolens_methods::circuit::{
    discover, faithfulness_scan, faithfulness_sizes, node_score_units, node_scores, rank_nodes, CurvePoint, DiscoverOptions, DiscoverResume,
};
use ferrolens_methods::shard::Shard;
use ferrolens_methods::study::{prepare, Batching, Method};
use ferrolens_methods::{Direction, ScoreGrid};
use ferrolens_model::HookedTransformer;
use ferrolens_tasks::{read_jsonl, PairBatch, PromptPair, Task, TaskOptions};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::path::PathBuf;
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
    /// Colored Objects wording: qa (`Q: ... What color is the pen?\nA:`, answers " Red") or
    /// statement (`... The pen is`, answers " red"). `ferrolens formats` finds the one a model does best.
    #[arg(long, default_value = "qa")]
    pub wording: String,
    /// Pairs of every token length: IOI's every template, Colored Objects' every object list (one
    /// padded batch; per-position scores by label: IO, S1, S1+1, S2, end for IOI; answer_color,
    /// answer_object, wrong_color, wrong_object, query, end for Colored Objects). By default only
    /// the most common length is used.
    #[arg(long)]
    pub all_templates: bool,
}

impl TaskArgs {
    /// The library's task options.
    pub fn options(&self) -> Result<TaskOptions> {
        Ok(TaskOptions {
            task: Task::parse(&self.task)?,
            n: self.n,
            seed: self.seed,
            corruption: self.corruption.parse()?,
            objects: self.objects,
            shots: self.shots,
            wording: self.wording.parse()?,
            all_templates: self.all_templates,
        })
    }

    /// The pairs of `data` (JSONL, named `jsonl:PATH`) or else of this task, with their name.
    pub fn load(&self, data: Option<&std::path::Path>, model: &HookedTransformer) -> Result<(String, Vec<PromptPair>)> {
        Ok(match data {
            Some(p) => (format!("jsonl:{}", p.display()), read_jsonl(p)?),
            None => (Task::parse(&self.task)?.name().to_string(), self.pairs(model)?),
        })
    }

    /// The pairs of this task for `model`'s tokenizer.
    pub fn pairs(&self, model: &HookedTransformer) -> Result<Vec<PromptPair>> {
        Ok(self.options()?.generate(model.tokenizer()?)?)
    }
}

/// EAP receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EdgeReceivers {
    /// Each head's query input and each KV head's key and value inputs.
    Heads,
    /// One per attention block.
    Blocks,
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
    #[arg(long, value_enum, default_value = "act")]
    method: Method,
    /// Node scores by noising (each node's clean activation replaced by its corrupt one in the
    /// clean run; score = the drop it causes) or denoising (corrupt run, clean activation patched
    /// in; score = the recovery). Noising measures necessity, which is what mean-ablation
    /// faithfulness tests.
    #[arg(long, value_enum, default_value = "noising")]
    direction: Direction,
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
    #[arg(long, value_enum, default_value = "heads")]
    edge_receivers: EdgeReceivers,
    /// Node scoring over pairs of different lengths: one padded batch, one batch per length, or
    /// whichever the padding overhead favours (same numbers either way). Faithfulness and EAP
    /// always run the padded batch.
    #[arg(long, value_enum, default_value_t = Batching::Auto)]
    batching: Batching,
    /// Run shard I of N (0-based) of one step and write it to OUT/shard.json for `ferrolens
    /// merge`: without --from, the node scores (rows of every method's grids, round robin);
    /// with --from a merge of those, the faithfulness scan (circuit sizes, round robin). The
    /// study finishes with `discover --from MERGED` (docs/scale-out.md).
    #[arg(long)]
    shard: Option<Shard>,
    /// Resume from a merge of discover shards (its discover.json): their node scores, and the
    /// faithfulness scan when merged too, instead of computing them. Same model, pairs and options.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Print the work units of the step this run would do (and the shard's share) with time and
    /// memory estimates, then stop without writing anything.
    #[arg(long)]
    dry_run: bool,
}

/// The file a merge of discover parts writes, and `--from` reads.
pub const RESUME_FILE: &str = "discover.json";

/// What discover shards carry, and what their merge keeps for `--from`.
#[derive(Serialize, Deserialize)]
pub struct DiscoverPayload {
    /// `scores` (node-score shards) or `faithfulness` (scan shards).
    pub step: String,
    /// Every method's grids (values empty; see `values`).
    pub grids: Vec<ScoreGrid>,
    /// The grids' values (`None`: not this shard's).
    pub values: Vec<Vec<Option<f64>>>,
    /// Seconds per scoring method.
    pub times: Vec<(String, f64)>,
    /// The faithfulness scan's sizes and values (`None`: not this shard's); empty for `scores`.
    pub scan: Vec<(usize, Option<f64>)>,
}

/// A merged discover run (`OUT/discover.json`): the manifest of its parts and their joined payload.
#[derive(Serialize, Deserialize)]
pub struct Resumable {
    /// The parts' manifest (shard fields of the first part).
    pub manifest: Manifest,
    /// The joined payload.
    pub payload: DiscoverPayload,
}

pub fn run(a: Args) -> Result<()> {
    let t_start = Instant::now();
    let model = crate::load_model(&a.model)?;
    let (task_name, pairs) = a.task.load(a.data.as_deref(), &model)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("out").join(task_name.replace([':', '/'], "_")));
    let batch = PairBatch::new(model.tokenizer()?, pairs, &task_name)?;
    let data_sha = sha256(serde_json::to_string(&batch.pairs)?.as_bytes());
    // The options that change the numbers (a resumed or merged run must share them).
    let options = serde_json::json!({"method": a.method.name(), "direction": format!("{:?}", a.direction), "top_k": a.top_k});
    let resumed = match &a.from {
        Some(dir) => Some(read_resumable(dir, &model, &data_sha, &options)?),
        None => None,
    };
    let resume = resumed.as_ref().map(|r| DiscoverResume {
        grids: Some(
            r.payload
                .grids
                .iter()
                .zip(&r.payload.values)
                .map(|(g, v)| ScoreGrid { values: v.iter().map(|x| x.unwrap_or(f64::NAN)).collect(), ..g.clone() })
                .collect(),
        ),
        scan: (!r.payload.scan.is_empty())
            .then(|| r.payload.scan.iter().map(|(size, f)| CurvePoint { size: *size, faithfulness: f.unwrap_or(f64::NAN) }).collect()),
        times: r.payload.times.iter().filter_map(|(m, t)| m.parse::<Method>().ok().map(|m| (m, *t))).collect(),
    });
    let bars = Bars::new(a.quiet);
    let progress = |what: &str, done: usize, total: usize| bars.report(what, done, total);
    let opts = DiscoverOptions {
        method: a.method,
        direction: a.direction,
        top_k: a.top_k,
        target: a.target,
        head_inputs: a.edge_receivers == EdgeReceivers::Heads,
        batching: a.batching,
        progress: Some(&progress),
        resume: resume.as_ref(),
        ..Default::default()
    };
    // Checked before the long work and before anything is written (discover checks again).
    opts.check(&model)?;
    if a.dry_run {
        return dry_run(&a, &model, &batch, &opts, resumed.as_ref());
    }
    if let Some(shard) = a.shard {
        return run_shard(&a, &model, &batch, &opts, shard, ShardIds { data_sha, options, out: &out, resumed: resumed.as_ref() });
    }
    crate::in_new_dir(&out, || {
        ferrolens_tasks::write_jsonl(&out.join("pairs.jsonl"), &batch.pairs)?;
        if !a.quiet {
            eprintln!("{} on {task_name}: {} pairs of {} tokens", model.cfg.name, batch.len(), batch.seq_len());
        }
        let found = discover(&model, &batch, &task_name, &opts)?;
        bars.finish();
        let (prep, c) = (&found.prep, &found.circuit);
        if !a.quiet {
            eprintln!("clean logit diff {:.3} (accuracy {:.0}%), corrupt {:.3}", prep.clean_value, 100.0 * prep.clean_accuracy, prep.corrupt_value);
        }
        let summary = crate::discover_report::write_study(
            &out,
            &model,
            &task_name,
            &batch,
            &found,
            &Settings {
                method: a.method,
                direction: a.direction,
                target: a.target,
                seed: a.task.seed,
                head_inputs: a.edge_receivers == EdgeReceivers::Heads,
                started: t_start,
            },
        )?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else if !a.quiet {
            eprintln!(
                "circuit: {} nodes ({} heads, {} MLPs), faithfulness {:.1}% (target {:.0}%); report: {}",
                c.size,
                c.n_heads,
                c.n_mlps,
                100.0 * c.faithfulness,
                100.0 * a.target,
                out.join("report.html").display()
            );
        }
        Ok(())
    })
}

/// What identifies a discover shard's sweep.
struct ShardIds<'a> {
    data_sha: String,
    options: serde_json::Value,
    out: &'a Path,
    resumed: Option<&'a Resumable>,
}

/// `discover --shard`: one shard of the node scores, or (with --from merged scores) of the
/// faithfulness scan.
fn run_shard(a: &Args, model: &HookedTransformer, batch: &PairBatch, opts: &DiscoverOptions, shard: Shard, ids: ShardIds) -> Result<()> {
    let t0 = Instant::now();
    let prep = prepare(model, batch)?;
    let data = match &a.data {
        Some(p) => p.display().to_string(),
        None => format!("{} (n {}, seed {})", a.task.task, a.task.n, a.task.seed),
    };
    let (payload, units, rule) = match ids.resumed {
        None => {
            let units = node_score_units(model, &prep, opts);
            let run = node_scores(model, batch, &prep, opts, Some(shard))?;
            let (grids, times) = (run.grids, run.times);
            let values = grids.iter().map(|g| to_part_values(&g.values)).collect();
            let grids = grids.into_iter().map(|g| ScoreGrid { values: vec![], ..g }).collect();
            let times = times.iter().map(|(m, t)| (m.name().to_string(), *t)).collect();
            (
                DiscoverPayload { step: "scores".into(), grids, values, times, scan: vec![] },
                units,
                "row % N == I over every method's grids (act, AtP, RelP; heads, then MLPs)",
            )
        }
        Some(r) if r.payload.scan.is_empty() => {
            let grids = opts.resume.and_then(|x| x.grids.as_deref()).unwrap_or_default();
            let (_, ranked) = rank_nodes(model, grids, opts.method)?;
            let sizes = faithfulness_sizes(ranked.len(), opts.top_k);
            let pts = faithfulness_scan(model, &prep, &ranked, &sizes, opts.max_rows, Some(shard))?;
            let scan = pts.iter().map(|p| (p.size, (!p.faithfulness.is_nan()).then_some(p.faithfulness))).collect();
            (
                DiscoverPayload { step: "faithfulness".into(), grids: r.payload.grids.clone(), values: r.payload.values.clone(), times: r.payload.times.clone(), scan },
                sizes.len(),
                "size index % N == I over the faithfulness scan's circuit sizes",
            )
        }
        Some(_) => bail!(
            "{} already holds the merged faithfulness scan: nothing of this study is left to shard; finish it without --shard (`ferrolens discover --from DIR ...`)",
            a.from.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
        ),
    };
    let step = payload.step.clone();
    crate::in_new_dir(ids.out, || {
        let part = Part {
            manifest: Manifest {
                data,
                data_sha256: ids.data_sha.clone(),
                options: ids.options.clone(),
                ..Manifest::new(&format!("discover {step}"), shard, model, units, rule, t0.elapsed().as_secs_f64())?
            },
            payload,
        };
        write_part(ids.out, &part)?;
        if !a.quiet {
            eprintln!(
                "shard {shard} of the {step} step: {} of {units} units; wrote {}",
                shard.count_of(units),
                ids.out.join(crate::parts::PART_FILE).display()
            );
        }
        Ok(())
    })
}

/// Read a merged discover run and check that it belongs to this model, these pairs and options.
fn read_resumable(dir: &Path, model: &HookedTransformer, data_sha: &str, options: &serde_json::Value) -> Result<Resumable> {
    let p = dir.join(RESUME_FILE);
    let r: Resumable = serde_json::from_slice(
        &std::fs::read(&p)
            .with_context(|| format!("{} has no {RESUME_FILE}: give the output folder of `ferrolens merge` over `discover --shard` parts", dir.display()))?,
    )
    .with_context(|| format!("{} is not a merged discover run", p.display()))?;
    let m = &r.manifest;
    if m.model_fingerprint != model.fingerprint()? {
        bail!("{} was computed with another model or dtype ({}); resume with the same --model and --dtype", dir.display(), m.model);
    }
    if m.data_sha256 != data_sha {
        bail!("{} was computed on other prompt pairs ({}); resume with the same --data or task options (--task, --n, --seed, ...)", dir.display(), m.data);
    }
    if &m.options != options {
        bail!("{} was computed with other options ({}); resume with the same --method, --direction and --top-k", dir.display(), m.options);
    }
    Ok(r)
}

/// `ferrolens merge` of discover parts (every shard of one step, in shard order): writes
/// OUT/discover.json for `discover --from OUT`.
pub fn merge(parts: Vec<Part<DiscoverPayload>>, out: &Path, quiet: bool) -> Result<()> {
    let first = &parts[0];
    let step = first.payload.step.clone();
    let n = parts.len();
    let mut payload = DiscoverPayload { step: step.clone(), grids: first.payload.grids.clone(), values: vec![], times: vec![], scan: vec![] };
    if step == "scores" {
        let mut offset = 0;
        for gi in 0..first.payload.grids.len() {
            let all: Vec<&[Option<f64>]> = parts.iter().map(|p| p.payload.values[gi].as_slice()).collect();
            let joined = join_values(&all, offset)?;
            offset += joined.len();
            payload.values.push(to_part_values(&joined));
        }
        // Seconds per method, summed over the shards.
        for (m, _) in &first.payload.times {
            let t: f64 = parts.iter().flat_map(|p| p.payload.times.iter().filter(|(x, _)| x == m).map(|(_, t)| *t)).sum();
            payload.times.push((m.clone(), t));
        }
    } else {
        payload.values = first.payload.values.clone();
        payload.times = first.payload.times.clone();
        let all: Vec<Vec<Option<f64>>> = parts.iter().map(|p| p.payload.scan.iter().map(|x| x.1).collect()).collect();
        let refs: Vec<&[Option<f64>]> = all.iter().map(|v| v.as_slice()).collect();
        let joined = join_values(&refs, 0)?;
        payload.scan = first.payload.scan.iter().zip(joined).map(|((size, _), f)| (*size, (!f.is_nan()).then_some(f))).collect();
    }
    let seconds: f64 = parts.iter().map(|p| p.manifest.seconds).sum();
    let manifest = Manifest { seconds, ..first.manifest.clone() };
    let rerun = manifest.rerun.clone();
    crate::in_new_dir(out, || {
        std::fs::write(out.join(RESUME_FILE), serde_json::to_vec(&Resumable { manifest, payload })?)
            .with_context(|| format!("writing {}", out.join(RESUME_FILE).display()))
    })?;
    if !quiet {
        // The next command: the shard's own line with --from this merge (and no --shard to finish).
        let base: Vec<&str> = rerun.split(' ').collect();
        let mut next: Vec<String> = Vec::new();
        let mut skip = 0;
        for w in &base {
            if skip > 0 {
                skip -= 1;
                continue;
            }
            if matches!(*w, "--shard" | "--from" | "--out") {
                skip = 1;
                continue;
            }
            next.push(w.to_string());
        }
        let next = next.join(" ");
        eprintln!("merged {n} {step} parts into {}", out.join(RESUME_FILE).display());
        if step == "scores" {
            eprintln!(
                "next: shard the faithfulness scan (`{next} --from {} --shard I/N --out PART`), or finish: `{next} --from {} --out DIR`",
                out.display(),
                out.display()
            );
        } else {
            eprintln!("next: finish the study: `{next} --from {} --out DIR`", out.display());
        }
    }
    Ok(())
}

/// `discover --dry-run`: the units of the step this run would do, the shard's share, estimates.
fn dry_run(a: &Args, model: &HookedTransformer, batch: &PairBatch, opts: &DiscoverOptions, resumed: Option<&Resumable>) -> Result<()> {
    let prep = prepare(model, batch)?;
    let shard = a.shard.unwrap_or(Shard { index: 0, count: 1 });
    match resumed {
        None => {
            println!("step 1 of discover: node scores of every head and MLP");
            crate::cmd_patch::print_estimates(
                model,
                &prep,
                &ferrolens_methods::circuit::discover_methods(opts),
                &ferrolens_methods::circuit::DISCOVER_COMPONENTS,
                &ferrolens_methods::circuit::node_score_options(opts, None),
                shard,
                "discover",
            )
        }
        Some(r) if r.payload.scan.is_empty() => {
            let n_nodes = model.cfg.n_layers * (model.cfg.n_heads + 1);
            let sizes = faithfulness_sizes(n_nodes, opts.top_k);
            println!("step 2 of discover: the faithfulness scan over {} circuit sizes {:?}", sizes.len(), sizes);
            let t_fwd = crate::cmd_patch::timed_forward(model, &prep, "discover")?;
            let mine = shard.count_of(sizes.len());
            println!("work units: {} sizes; shard {shard} owns {mine}", sizes.len());
            println!(
                "time estimate for shard {shard}: about {:.0} s (one mean-ablated forward of {} pairs per size; {t_fwd:.3} s each here)",
                mine as f64 * t_fwd,
                batch.len()
            );
            Ok(())
        }
        Some(_) => {
            println!("the merged scores and faithfulness scan are done: finishing (bisection for the smallest faithful circuit, EAP, report) is a few forwards and one backward, not sharded");
            Ok(())
        }
    }
}
