//! `ferrolens discover`: a circuit-discovery study with an HTML report. The study itself is
//! `ferrolens_methods::circuit::discover` (node scores by act/AtP/RelP, the smallest faithful
//! circuit under mean ablation, EAP edges, IOI head classes); this command parses, calls it, and
//! writes the tables, figures, circuit.json and report.html.

use crate::discover_report::Settings;
use crate::study::Bars;
use anyhow::Result;
use ferrolens_methods::circuit::{discover, DiscoverOptions};
use ferrolens_methods::study::{Batching, Method};
use ferrolens_methods::Direction;
use ferrolens_model::HookedTransformer;
use ferrolens_tasks::{read_jsonl, PairBatch, PromptPair, Task, TaskOptions};
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
}

pub fn run(a: Args) -> Result<()> {
    let t_start = Instant::now();
    let model = crate::load_model(&a.model)?;
    let (task_name, pairs) = a.task.load(a.data.as_deref(), &model)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("out").join(task_name.replace([':', '/'], "_")));
    let batch = PairBatch::new(model.tokenizer()?, pairs, &task_name)?;
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
        ..Default::default()
    };
    // Checked before the long work and before anything is written (discover checks again).
    opts.check(&model)?;
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
