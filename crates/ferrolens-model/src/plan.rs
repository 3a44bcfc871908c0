//! Memory plans from a configuration alone: how much a model's weights and one run's
//! activations take on each device when its layers are split into contiguous blocks across
//! devices (a pipeline), before anything large is loaded (`ferrolens plan`).
//!
//! The figures are estimates of ferrolens' own forward: weights at the load dtype (a GGUF is
//! dequantized on load, so its file size is not what it takes in memory); the residual stream
//! and the largest transient of a block (attention scores and pattern in f32, the MLP hidden
//! layer); with gradients (AtP, RelP, EAP) every block's saved activations and, at the peak of
//! the backward, their gradients; a KV cache for decoding. Allocator slack and the CUDA context
//! (about 0.5 GiB) are not included.
//!
//! ```
//! use ferrolens_model::plan::{memory_plan, PlanOptions};
//! let cfg = ferrolens_model::loader::config_of(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny-gpt2")).unwrap();
//! let p = memory_plan(&cfg, &["cuda:0".into(), "cuda:1".into()], &PlanOptions::default()).unwrap();
//! assert_eq!(p.len(), 2);
//! assert_eq!(p[0].layers.len() + p[1].layers.len(), cfg.n_layers);
//! ```

use crate::config::Config;
use crate::error::{Error, Result};
use serde::Serialize;
use std::ops::Range;

/// What the plan is for.
#[derive(Debug, Clone, Serialize)]
pub struct PlanOptions {
    /// Bytes per weight and activation value (4 for f32, 2 for bf16/f16).
    pub dtype_bytes: usize,
    /// Prompts per forward (rows: prompts x patches in a sweep).
    pub batch: usize,
    /// Tokens per prompt.
    pub seq: usize,
    /// Keep activations for a backward (AtP, RelP, EAP, EAP-IG).
    pub grads: bool,
    /// Tokens of KV cache per prompt (decoding; 0 for none).
    pub kv_tokens: usize,
    /// Full logits `[b, p, V]` (f32) instead of the last position only.
    pub full_logits: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { dtype_bytes: 4, batch: 16, seq: 128, grads: false, kv_tokens: 0, full_logits: false }
    }
}

/// One device's share of a plan. Sizes in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct DevicePlan {
    /// The device (`cuda:0`, ...).
    pub device: String,
    /// The blocks it holds.
    pub layers: Range<usize>,
    /// Weights (blocks; the embedding on the first device; final norm and unembedding on the last).
    pub weights: f64,
    /// Activations of one run (and their gradients with `grads`).
    pub activations: f64,
    /// KV cache.
    pub kv_cache: f64,
    /// The residual stream `[b, p, D]` sent to the next device (0 on the last).
    pub transfer: f64,
}

impl DevicePlan {
    /// Weights + activations + KV cache.
    pub fn total(&self) -> f64 {
        self.weights + self.activations + self.kv_cache
    }
}

/// Parameters of one block (attention and MLP matrices, biases ignored, norms included).
pub fn block_params(cfg: &Config) -> f64 {
    let attn = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * cfg.n_kv_heads);
    let mlp = cfg.d_model * cfg.d_mlp * if cfg.gated_mlp { 3 } else { 2 };
    (attn + mlp + 4 * cfg.d_model) as f64
}

/// Split `cfg`'s blocks into contiguous ranges over `devices` (as even as possible, the first
/// devices taking one more when they do not divide), and estimate each device's memory.
pub fn memory_plan(cfg: &Config, devices: &[String], o: &PlanOptions) -> Result<Vec<DevicePlan>> {
    let k = devices.len();
    // The split a pipeline load makes (crate::pipeline).
    let ranges = crate::pipeline::stage_ranges(cfg.n_layers, k)?;
    if o.batch == 0 || o.seq == 0 || o.dtype_bytes == 0 {
        return Err(Error::Input("batch, sequence length and dtype size must be positive".into()));
    }
    let (b, p, d, x) = (o.batch as f64, o.seq as f64, cfg.d_model as f64, o.dtype_bytes as f64);
    let (h, hkv, dh, dm, v) = (cfg.n_heads as f64, cfg.n_kv_heads as f64, cfg.d_head as f64, cfg.d_mlp as f64, cfg.d_vocab as f64);
    let embed = v * d * x + if matches!(cfg.positional, crate::config::Positional::Learned) { cfg.n_ctx as f64 } else { 0.0 } * d * x;
    let unembed = if cfg.tied_embeddings && k == 1 { 0.0 } else { v * d * x } + 2.0 * d * x;
    let resid = b * p * d * x;
    // The largest transient of a block: scores and pattern in f32, q/k/v and z, or the MLP hidden.
    let scores = 2.0 * b * h * p * p * 4.0;
    let qkvz = b * p * (2.0 * h + 2.0 * hkv) * dh * x;
    let mlp = b * p * dm * if cfg.gated_mlp { 3.0 } else { 2.0 } * x;
    let transient = scores.max(qkvz).max(mlp);
    // What a backward keeps per block: residual-sized tensors (resid pre/mid, norm outputs,
    // attn_out, mlp_out), q/k/v/z, the MLP hidden layers, scores and pattern.
    let saved = b * p * (6.0 * d) * x + qkvz + mlp + scores;
    let logits = if o.full_logits { b * p * v * 4.0 } else { b * v * 4.0 };
    let kv_per_layer = 2.0 * b * o.kv_tokens as f64 * hkv * dh * x;
    let mut out = Vec::with_capacity(k);
    for (i, (dev, layers)) in devices.iter().zip(ranges).enumerate() {
        let n = layers.len();
        let (first, last) = (i == 0, i + 1 == k);
        let mut weights = n as f64 * block_params(cfg) * x;
        if first {
            weights += embed;
        }
        if last {
            weights += unembed;
        }
        let acts = if o.grads {
            // Saved activations of its blocks and, at the peak of the backward, as much again
            // for their gradients; the residual stream in and out.
            2.0 * n as f64 * saved + 2.0 * resid + if last { 2.0 * logits } else { 0.0 }
        } else {
            2.0 * resid + transient + if last { logits } else { 0.0 }
        };
        out.push(DevicePlan {
            device: dev.clone(),
            layers,
            weights,
            activations: acts,
            kv_cache: n as f64 * kv_per_layer,
            transfer: if last { 0.0 } else { resid },
        });
    }
    Ok(out)
}

/// Memory of a named device kind in bytes (`h100` 80 GB, `h200` 141 GB, `a100` 80 GB, `l40s`
/// 48 GB, `a10g` 24 GB, `4090` 24 GB), or a number of GiB (`80`).
pub fn device_memory(s: &str) -> Result<f64> {
    let gb = 1e9;
    let gib = (1u64 << 30) as f64;
    Ok(match s.to_ascii_lowercase().as_str() {
        "h100" => 80.0 * gb,
        "h200" => 141.0 * gb,
        "a100" => 80.0 * gb,
        "l40s" => 48.0 * gb,
        "a10g" | "4090" => 24.0 * gb,
        other => other.parse::<f64>().ok().filter(|v| *v > 0.0).map(|v| v * gib).ok_or_else(|| {
            Error::Input(format!("`{s}` is not a device memory; give a GPU name (h100, h200, a100, l40s, a10g, 4090) or a size in GiB (e.g. 80)"))
        })?,
    })
}
