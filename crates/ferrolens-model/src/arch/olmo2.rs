//! OLMo-2: no norms on the sublayers' inputs; an RMSNorm on each sublayer's output before it
//! joins the residual (`x + post_attention_layernorm(attn(x))`, `x + post_feedforward_layernorm(mlp(x))`),
//! RMSNorms on the whole query and key projections (`[h*d]`, `[kv*d]`) before the rotary
//! embedding, SwiGLU MLP. Hugging Face `Olmo2ForCausalLM` (no GGUF in ferrolens).

use super::{activation, activation_name, lin, parse_hf, to_json, vec, DecoderFields, Family, Slot, TensorName};
use crate::config::{Config, NormPlacement, QkNorm};
use crate::error::Result;
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `Olmo2Config`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Olmo2Config {
    /// Shape, rotary and token fields.
    #[serde(flatten)]
    pub base: DecoderFields,
    /// The MLP activation.
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Biases on q/k/v/o (loaded when the file has them).
    #[serde(default)]
    pub attention_bias: bool,
}

fn silu() -> String {
    "silu".into()
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let c: Olmo2Config = parse_hf(j, "olmo2")?;
    let mut cfg = c.base.config(name, FAMILY.name, 1e-5, 10000.0, false, activation("hidden_act", &c.hidden_act)?)?;
    cfg.norm_placement = NormPlacement::Post;
    cfg.qk_norm = Some(QkNorm::Full);
    Ok(cfg)
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, w: &Weights) -> Result<serde_json::Value> {
    to_json(&Olmo2Config { base: DecoderFields::from_config(c)?, hidden_act: activation_name(c.act).into(), attention_bias: super::has_biases(w).0 })
}

/// OLMo-2's table.
pub const TENSORS: &[TensorName] = &[
    vec(Slot::Embed, "model.embed_tokens.weight", ""),
    lin(Slot::Q, "model.layers.{l}.self_attn.q_proj.weight", ""),
    vec(Slot::QBias, "model.layers.{l}.self_attn.q_proj.bias", ""),
    lin(Slot::K, "model.layers.{l}.self_attn.k_proj.weight", ""),
    vec(Slot::KBias, "model.layers.{l}.self_attn.k_proj.bias", ""),
    lin(Slot::V, "model.layers.{l}.self_attn.v_proj.weight", ""),
    vec(Slot::VBias, "model.layers.{l}.self_attn.v_proj.bias", ""),
    vec(Slot::QNorm, "model.layers.{l}.self_attn.q_norm.weight", ""),
    vec(Slot::KNorm, "model.layers.{l}.self_attn.k_norm.weight", ""),
    lin(Slot::O, "model.layers.{l}.self_attn.o_proj.weight", ""),
    vec(Slot::OBias, "model.layers.{l}.self_attn.o_proj.bias", ""),
    vec(Slot::Ln1Post, "model.layers.{l}.post_attention_layernorm.weight", ""),
    lin(Slot::Gate, "model.layers.{l}.mlp.gate_proj.weight", ""),
    lin(Slot::Up, "model.layers.{l}.mlp.up_proj.weight", ""),
    lin(Slot::Down, "model.layers.{l}.mlp.down_proj.weight", ""),
    vec(Slot::Ln2Post, "model.layers.{l}.post_feedforward_layernorm.weight", ""),
    vec(Slot::FinalNorm, "model.norm.weight", ""),
    lin(Slot::Unembed, "lm_head.weight", ""),
];

/// The OLMo-2 family.
pub const FAMILY: Family = Family {
    name: "olmo2",
    about: "OLMo-2 (output-only RMSNorms, full-width q/k norms, SwiGLU)",
    hf_model_types: &["olmo2"],
    hf_architecture: "Olmo2ForCausalLM",
    gguf_archs: &[],
    from_hf,
    to_hf,
    gguf_keys: &[],
    gguf_extra: super::no_gguf_extra,
    tensors: TENSORS,
    gguf_permute_qk: false,
    gguf_norm_offset_included: false,
};
