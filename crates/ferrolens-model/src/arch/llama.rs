//! Llama (Llama 2, Llama 3.x, SmolLM2, TinyLlama, ...): pre-norm RMSNorm blocks, rotate-half
//! rotary embeddings (plain, or Llama-3 / linear `rope_scaling`), grouped-query attention,
//! SwiGLU MLP, tied or untied unembedding. Hugging Face `LlamaForCausalLM`; llama.cpp `llama`
//! GGUF files (which Mistral checkpoints become too).
//!
//! This file is the worked example of docs/architecture.md: a config struct with Hugging Face's
//! field names, its conversion into [`Config`] and back, and the family's row in
//! [`super::FAMILIES`]. The weight table is [`super::LLAMA_TENSORS`].

use super::{activation, activation_name, parse_hf, refuse, to_json, DecoderFields, Family};
use crate::config::Config;
use crate::error::Result;
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `LlamaConfig`'s fields (transformers 4.57), with its defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Shape, rotary and token fields.
    #[serde(flatten)]
    pub base: DecoderFields,
    /// The MLP activation (SiLU in every released Llama).
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Biases on q/k/v/o (loaded when the file has them).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP (loaded when the file has them).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Rotated fraction of each head. transformers' Llama rotates whole heads, so anything
    /// but 1 is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

fn silu() -> String {
    "silu".into()
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let c: LlamaConfig = parse_hf(j, "llama")?;
    refuse("partial_rotary_factor", c.partial_rotary_factor.is_some_and(|f| f != 1.0), "Llama rotates whole heads")?;
    c.base.config(name, FAMILY.name, 1e-6, 10000.0, false, activation("hidden_act", &c.hidden_act)?)
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, w: &Weights) -> Result<serde_json::Value> {
    let (attention_bias, mlp_bias) = super::has_biases(w);
    to_json(&LlamaConfig {
        base: DecoderFields::from_config(c)?,
        hidden_act: activation_name(c.act).into(),
        attention_bias,
        mlp_bias,
        partial_rotary_factor: None,
    })
}

/// The Llama family.
pub const FAMILY: Family = Family {
    name: "llama",
    about: "Llama 2/3.x, SmolLM2, TinyLlama (RMSNorm, rotary incl. llama3 scaling, GQA, SwiGLU)",
    hf_model_types: &["llama"],
    hf_architecture: "LlamaForCausalLM",
    gguf_archs: &["llama"],
    from_hf,
    to_hf,
    gguf_keys: super::LLAMA_GGUF_KEYS,
    gguf_extra: super::no_gguf_extra,
    tensors: super::LLAMA_TENSORS,
    gguf_permute_qk: true,
    gguf_norm_offset_included: false,
};
