//! `ferrolens cache`: activations of a prompt file as safetensors.

use anyhow::Context;
use candle_core::Tensor;
use ferrolens_model::{ActivationCache, Hooks};
use std::collections::BTreeMap;

/// Arguments of `ferrolens cache`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a registry name, a .gguf file, a HF directory or a hub id.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// A text file with one prompt a line (empty lines are skipped).
    #[arg(long)]
    prompts: std::path::PathBuf,
    /// Hooks to keep: names, globs (blocks.*.attn.hook_z) or re:REGEX, comma-separated.
    #[arg(long)]
    hooks: String,
    /// Output safetensors file.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

/// Batching rule: prompts are grouped by token length. When every prompt has the same length the
/// file holds one tensor per hook, `[n_prompts, ...]`, plus `tokens` `[n_prompts, pos]`. Otherwise
/// each length L gets keys `len{L}.{hook}`, `len{L}.tokens` and `len{L}.prompt_index` (0-based line
/// numbers among the non-empty lines), so nothing is padded.
pub fn run(a: Args) -> anyhow::Result<()> {
    let model = crate::load_model(&a.model)?;
    // Check the filter against the model before any work: a typo or a layer past the last one
    // fails here instead of writing an empty file.
    let wanted = model.hooks_matching(&a.hooks)?;
    let tok = model.tokenizer()?;
    let text = std::fs::read_to_string(&a.prompts).with_context(|| format!("reading {}", a.prompts.display()))?;
    let prompts: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    anyhow::ensure!(!prompts.is_empty(), "{} has no prompts (one prompt a line)", a.prompts.display());
    let mut groups: BTreeMap<usize, Vec<(usize, Vec<u32>)>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        let ids = tok.encode_prompt(p)?;
        groups.entry(ids.len()).or_default().push((i, ids));
    }
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} prompts {elapsed}").unwrap());
    let single = groups.len() == 1;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut n_hooks = 0;
    for (len, items) in &groups {
        let mut caches = Vec::new();
        for chunk in items.chunks(a.batch_size.max(1)) {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, v)| v.clone()).collect();
            let tokens = model.tokens_tensor(&ids)?;
            let mut hooks = Hooks::new().cache_hooks(&wanted);
            model.run(&tokens, &mut hooks)?;
            caches.push(hooks.take_cache());
            bar.inc(chunk.len() as u64);
        }
        let cache = ActivationCache::concat(&caches)?;
        n_hooks = cache.len();
        let prefix = if single { String::new() } else { format!("len{len}.") };
        for (h, t) in cache.iter() {
            out.push((format!("{prefix}{h}"), t.clone()));
        }
        let all: Vec<Vec<u32>> = items.iter().map(|(_, v)| v.clone()).collect();
        out.push((format!("{prefix}tokens"), model.tokens_tensor(&all)?.to_dtype(candle_core::DType::I64)?));
        if !single {
            let idx: Vec<i64> = items.iter().map(|(i, _)| *i as i64).collect();
            out.push((format!("{prefix}prompt_index"), Tensor::new(idx, &candle_core::Device::Cpu)?));
        }
    }
    bar.finish_and_clear();
    let map: std::collections::HashMap<String, Tensor> = out.into_iter().collect();
    candle_core::safetensors::save(&map, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {} ({} prompts in {} length group(s), {} hooks each)", a.out.display(), prompts.len(), groups.len(), n_hooks);
    Ok(())
}
