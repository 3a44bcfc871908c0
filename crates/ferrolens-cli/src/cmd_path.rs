//! `ferrolens path-patch`: confirm a circuit edge set by path patching (Wang et al. 2022).

use anyhow::{Context, Result};
use ferrolens_methods::study::prepare;
use ferrolens_methods::{path_patch, HeadInput};
use ferrolens_tasks::{read_jsonl, PairBatch};

/// Arguments of `ferrolens path-patch`.
#[derive(clap::Args)]
pub struct Args {
    /// Model.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    #[command(flatten)]
    task: crate::cmd_discover::TaskArgs,
    /// Pairs as JSONL instead of a built-in task.
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Sender head, e.g. L23H3.
    #[arg(long)]
    sender: String,
    /// Receiver head inputs, e.g. L24H4:q,L24H5:kv,L29H1:qkv (k and v of a GQA query head mean
    /// its KV head's).
    #[arg(long)]
    receivers: String,
}

fn head(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("`{s}` is not a head; write LxHy, e.g. L23H3");
    let rest = s.trim().strip_prefix('L').ok_or_else(bad)?;
    let (l, h) = rest.split_once('H').ok_or_else(bad)?;
    Ok((l.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?))
}

pub fn run(a: Args) -> Result<()> {
    let model = crate::load_model(&a.model)?;
    let pairs = match &a.data {
        Some(p) => read_jsonl(p)?,
        None => a.task.pairs(&model)?,
    };
    let batch = PairBatch::new(model.tokenizer()?, pairs, "pairs")?;
    let prep = prepare(&model, &batch)?;
    let sender = head(&a.sender)?;
    let mut receivers = Vec::new();
    for r in a.receivers.split(',') {
        let (h, inputs) = r.split_once(':').unwrap_or((r, "qkv"));
        let (l, hh) = head(h)?;
        for c in inputs.chars() {
            let input = match c {
                'q' => HeadInput::Q,
                'k' => HeadInput::K,
                'v' => HeadInput::V,
                o => anyhow::bail!("unknown head input `{o}` in `{r}`; use q, k, v"),
            };
            // Keys and values of GQA models belong to KV heads: query head h reads KV head h / repeat.
            let idx = if input == HeadInput::Q { hh } else { hh / model.cfg.kv_repeat() };
            receivers.push((l, idx, input));
        }
    }
    let v = path_patch(&model, &prep.data(), sender, &receivers).context("path patching")?;
    let out = serde_json::json!({"sender": a.sender, "receivers": a.receivers, "normalised_metric": v, "effect": v - 1.0,
        "clean_logit_diff": prep.clean_value, "corrupt_logit_diff": prep.corrupt_value, "n_pairs": batch.len()});
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
