//! `ferrolens discover`: a circuit-discovery study with an HTML report.

use anyhow::Result;
use ferrolens_model::HookedTransformer;
use ferrolens_tasks::{colored, ioi, PromptPair, Task};

/// Arguments of `ferrolens discover`.
#[derive(clap::Args)]
pub struct Args {
    /// Task: ioi or colored-objects.
    #[arg(long, default_value = "ioi")]
    task: String,
}

/// Pairs of a built-in task for `model`'s tokenizer.
pub fn task_pairs(model: &HookedTransformer, task: Task, n: usize, seed: u64, corruption: &str, objects: usize, shots: usize) -> Result<Vec<PromptPair>> {
    let tok = model.tokenizer()?;
    Ok(match task {
        Task::Ioi => {
            let corruption = match corruption {
                "abc" => ioi::IoiCorruption::Abc,
                "s2io" | "s2-io" => ioi::IoiCorruption::S2Io,
                o => anyhow::bail!("unknown IOI corruption `{o}`; use abc or s2io"),
            };
            ioi::generate(tok, &ioi::IoiConfig { n, seed, corruption, ..Default::default() })?
        }
        Task::ColoredObjects => colored::generate(tok, &colored::ColoredConfig { n, seed, n_objects: objects, shots })?,
    })
}

pub fn run(_a: Args) -> Result<()> {
    anyhow::bail!("not yet")
}
