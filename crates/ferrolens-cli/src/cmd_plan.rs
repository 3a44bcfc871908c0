//! `ferrolens plan`: the memory a model takes per device from its configuration alone (weights,
//! one run's activations, KV cache), with its blocks split contiguously across devices.

use anyhow::Result;
use ferrolens_model::plan::{device_memory, memory_plan, PlanOptions};

/// Arguments of `ferrolens plan`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a registry name, a .gguf file, a HF directory, a config.json file or a hub id (only
    /// its configuration is read).
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// Memory of each device: a GPU name (h100, h200, a100, l40s, a10g, 4090) or GiB.
    #[arg(long, default_value = "h100")]
    device_memory: String,
    /// Prompts (rows) per forward.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Plan for a gradient run (AtP, RelP, EAP): activations kept for the backward.
    #[arg(long)]
    grads: bool,
    /// Tokens of KV cache per prompt (decoding, e.g. `heads retrieval`).
    #[arg(long, default_value_t = 0)]
    kv_tokens: usize,
    /// Full logits at every position (f32) instead of the last position's.
    #[arg(long)]
    full_logits: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// `devices`: the global `--devices` (contiguous blocks per device; `cuda:0` when empty).
pub fn run(a: Args, devices: &[String]) -> Result<()> {
    let devices = if devices.is_empty() { vec!["cuda:0".to_string()] } else { devices.to_vec() };
    let mem = device_memory(&a.device_memory)?;
    let cfg = ferrolens_model::config_of(&a.model)?;
    let dtype = crate::LOAD_OPTIONS.get().map(|o| o.dtype).unwrap_or(ferrolens_model::DType::F32);
    let o = PlanOptions { dtype_bytes: dtype.size_in_bytes(), batch: a.batch, seq: a.seq, grads: a.grads, kv_tokens: a.kv_tokens, full_logits: a.full_logits };
    let plan = memory_plan(&cfg, &devices, &o)?;
    let gib = (1u64 << 30) as f64;
    let params =
        cfg.n_layers as f64 * ferrolens_model::plan::block_params(&cfg) + (cfg.d_vocab * cfg.d_model) as f64 * if cfg.tied_embeddings { 1.0 } else { 2.0 };
    if a.json {
        let j = serde_json::json!({
            "model": cfg.name, "family": cfg.family, "params": params, "dtype": format!("{dtype:?}"), "options": o,
            "device_memory_bytes": mem, "devices": plan.iter().map(|d| serde_json::json!({
                "device": d.device, "layers": [d.layers.start, d.layers.end], "weights": d.weights, "activations": d.activations,
                "kv_cache": d.kv_cache, "total": d.total(), "transfer": d.transfer, "fits": d.total() <= mem,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!(
        "{} ({}, {} blocks, {:.2} B parameters) in {dtype:?}: {} prompts x {} tokens{}{}",
        cfg.name,
        cfg.family,
        cfg.n_layers,
        params / 1e9,
        a.batch,
        a.seq,
        if a.grads { ", with gradients" } else { ", forward" },
        if a.kv_tokens > 0 { format!(", KV cache of {} tokens", a.kv_tokens) } else { String::new() }
    );
    println!("{:<10} {:>9} {:>12} {:>12} {:>9} {:>10} {:>6}", "device", "blocks", "weights GiB", "activ. GiB", "KV GiB", "total GiB", "fits");
    for d in &plan {
        println!(
            "{:<10} {:>9} {:>12.2} {:>12.2} {:>9.2} {:>10.2} {:>6}",
            d.device,
            format!("{}..{}", d.layers.start, d.layers.end),
            d.weights / gib,
            d.activations / gib,
            d.kv_cache / gib,
            d.total() / gib,
            if d.total() <= mem { "yes" } else { "NO" }
        );
    }
    if plan.len() > 1 {
        println!("each boundary moves the residual stream: {:.3} GiB per forward", plan[0].transfer / gib);
    }
    println!(
        "against {:.0} GiB per device ({}); estimates of ferrolens' own forward, without allocator slack or the CUDA context (~0.5 GiB). \
         ferrolens runs a model on one device today: a plan over several devices says how a pipeline split would divide it (docs/scale-out.md)",
        mem / gib,
        a.device_memory
    );
    Ok(())
}
