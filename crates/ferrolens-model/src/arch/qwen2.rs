//! Qwen2 / Qwen2.5: Llama's blocks with biases on q, k and v, and optional sliding windows on
//! the layers from `max_window_layers` on (`use_sliding_window`, or explicit `layer_types`).
//! Hugging Face `Qwen2ForCausalLM`; llama.cpp `qwen2` GGUF files (no q/k permutation).

use super::{activation, activation_name, parse_hf, to_json, windows_from_layer_types, DecoderFields, Family};
use crate::config::Config;
use crate::error::Result;
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `Qwen2Config`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// Shape, rotary and token fields.
    #[serde(flatten)]
    pub base: DecoderFields,
    /// The MLP activation.
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Whether any layer uses a sliding window.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The window (keys `i - w < j <= i`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Layers from this index on slide (when `layer_types` is absent).
    #[serde(default = "max_window_layers")]
    pub max_window_layers: usize,
    /// Per-layer attention kind (`full_attention` / `sliding_attention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
}

fn silu() -> String {
    "silu".into()
}

fn max_window_layers() -> usize {
    28
}

/// Per-layer windows as transformers computes them for Qwen2 and Qwen3.
pub fn qwen_windows(use_sw: bool, window: Option<usize>, max_window_layers: usize, types: &Option<Vec<String>>, n: usize) -> Result<Vec<Option<usize>>> {
    let window = if use_sw { window } else { None };
    let types: Vec<String> = match types {
        Some(t) => t.clone(),
        None => (0..n).map(|i| if window.is_some() && i >= max_window_layers { "sliding_attention".into() } else { "full_attention".into() }).collect(),
    };
    if window.is_none() {
        // transformers drops the window when use_sliding_window is off, whatever layer_types says.
        return Ok(vec![]);
    }
    windows_from_layer_types(&types, window, n)
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let c: Qwen2Config = parse_hf(j, "qwen2")?;
    let mut cfg = c.base.config(name, FAMILY.name, 1e-6, 10000.0, false, activation("hidden_act", &c.hidden_act)?)?;
    cfg.windows = qwen_windows(c.use_sliding_window, c.sliding_window, c.max_window_layers, &c.layer_types, cfg.n_layers)?;
    Ok(cfg)
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, _: &Weights) -> Result<serde_json::Value> {
    let window = super::window_size(&c.windows);
    to_json(&Qwen2Config {
        base: DecoderFields::from_config(c)?,
        hidden_act: activation_name(c.act).into(),
        use_sliding_window: window.is_some(),
        sliding_window: window,
        max_window_layers: c.n_layers,
        layer_types: Some(super::layer_types(&c.windows, c.n_layers)),
    })
}

/// The Qwen2 family.
pub const FAMILY: Family = Family {
    name: "qwen2",
    about: "Qwen2 / Qwen2.5 (Llama blocks with q/k/v biases, optional sliding windows)",
    hf_model_types: &["qwen2"],
    hf_architecture: "Qwen2ForCausalLM",
    gguf_archs: &["qwen2"],
    from_hf,
    to_hf,
    gguf_keys: super::LLAMA_GGUF_KEYS,
    gguf_extra: super::no_gguf_extra,
    tensors: super::LLAMA_TENSORS,
    gguf_permute_qk: false,
    gguf_norm_offset_included: false,
};
