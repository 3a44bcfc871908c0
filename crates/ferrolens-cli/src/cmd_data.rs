//! `ferrolens data`: write a built-in task's prompt pairs as JSONL (the `patch --data` schema).

use anyhow::Result;
use ferrolens_tasks::write_jsonl;

/// Arguments of `ferrolens data`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    task: crate::cmd_discover::TaskArgs,
    /// Model whose tokenizer filters the prompts.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// Output JSONL file.
    #[arg(long)]
    out: std::path::PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let model = crate::load_model(&a.model)?;
    let pairs = a.task.pairs(&model)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating the folder {} for --out: {e}", dir.display()))?;
    }
    write_jsonl(&a.out, &pairs)?;
    eprintln!("wrote {} pairs to {}", pairs.len(), a.out.display());
    Ok(())
}
