//! `ferrolens data`: write a built-in task's prompt pairs as JSONL (the `patch --data` schema).

use anyhow::Result;
use ferrolens_tasks::{write_jsonl, Task};

/// Arguments of `ferrolens data`.
#[derive(clap::Args)]
pub struct Args {
    /// Task: ioi or colored-objects.
    #[arg(long)]
    task: String,
    /// Model whose tokenizer filters the prompts.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// Number of pairs.
    #[arg(long, default_value_t = 32)]
    n: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// IOI corruption: abc or s2io.
    #[arg(long, default_value = "abc")]
    corruption: String,
    /// Colored Objects: objects per question.
    #[arg(long, default_value_t = 3)]
    objects: usize,
    /// Colored Objects: solved examples.
    #[arg(long, default_value_t = 1)]
    shots: usize,
    /// Output JSONL file.
    #[arg(long)]
    out: std::path::PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let model = crate::load_model(&a.model)?;
    let pairs = crate::cmd_discover::task_pairs(&model, Task::parse(&a.task)?, a.n, a.seed, &a.corruption, a.objects, a.shots)?;
    write_jsonl(&a.out, &pairs)?;
    eprintln!("wrote {} pairs to {}", pairs.len(), a.out.display());
    Ok(())
}
