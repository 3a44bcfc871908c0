//! Mistral: Llama's blocks and tensor names with a sliding attention window on every layer
//! (`sliding_window`; `null` in Mistral v0.2+ and later, which makes it plain Llama). Hugging
//! Face `MistralForCausalLM`; llama.cpp writes Mistral GGUF files as `llama` (no window).

use super::{activation, activation_name, parse_hf, to_json, DecoderFields, Family};
use crate::config::Config;
use crate::error::Result;
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `MistralConfig`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MistralConfig {
    /// Shape, rotary and token fields.
    #[serde(flatten)]
    pub base: DecoderFields,
    /// The MLP activation.
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Keys a query sees: `i - w < j <= i` (transformers' convention), on every layer.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

fn silu() -> String {
    "silu".into()
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let c: MistralConfig = parse_hf(j, "mistral")?;
    let mut cfg = c.base.config(name, FAMILY.name, 1e-6, 10000.0, false, activation("hidden_act", &c.hidden_act)?)?;
    if let Some(w) = c.sliding_window {
        cfg.windows = vec![Some(w); cfg.n_layers];
    }
    Ok(cfg)
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, _: &Weights) -> Result<serde_json::Value> {
    to_json(&MistralConfig { base: DecoderFields::from_config(c)?, hidden_act: activation_name(c.act).into(), sliding_window: super::window_size(&c.windows) })
}

/// The Mistral family.
pub const FAMILY: Family = Family {
    name: "mistral",
    about: "Mistral (Llama blocks, sliding-window attention on every layer)",
    hf_model_types: &["mistral"],
    hf_architecture: "MistralForCausalLM",
    gguf_archs: &[],
    from_hf,
    to_hf,
    gguf_keys: super::LLAMA_GGUF_KEYS,
    gguf_extra: super::no_gguf_extra,
    tensors: super::LLAMA_TENSORS,
    gguf_permute_qk: true,
    gguf_norm_offset_included: false,
};
