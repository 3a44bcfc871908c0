//! Qwen3: Llama's blocks with an RMSNorm on each head's queries and keys before the rotary
//! embedding (`q_norm`, `k_norm`, one `[d_head]` gain shared by the heads), optional q/k/v
//! biases (`attention_bias`) and Qwen2's sliding-window rule. Hugging Face `Qwen3ForCausalLM`;
//! llama.cpp `qwen3` GGUF files.

use super::qwen2::qwen_windows;
use super::{activation, activation_name, lin, parse_hf, to_json, vec, DecoderFields, Family, Slot, TensorName};
use crate::config::{Config, QkNorm};
use crate::error::Result;
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `Qwen3Config`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qwen3Config {
    /// Shape, rotary and token fields (`head_dim` defaults to 128 here, as in transformers).
    #[serde(flatten)]
    pub base: DecoderFields,
    /// The MLP activation.
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Biases on q/k/v/o (loaded when the file has them).
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether any layer uses a sliding window.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The window (keys `i - w < j <= i`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Layers from this index on slide (when `layer_types` is absent).
    #[serde(default = "max_window_layers")]
    pub max_window_layers: usize,
    /// Per-layer attention kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
}

fn silu() -> String {
    "silu".into()
}

fn max_window_layers() -> usize {
    28
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let mut c: Qwen3Config = parse_hf(j, "qwen3")?;
    c.base.head_dim.get_or_insert(128);
    let mut cfg = c.base.config(name, FAMILY.name, 1e-6, 10000.0, false, activation("hidden_act", &c.hidden_act)?)?;
    cfg.qk_norm = Some(QkNorm::PerHead);
    cfg.windows = qwen_windows(c.use_sliding_window, c.sliding_window, c.max_window_layers, &c.layer_types, cfg.n_layers)?;
    Ok(cfg)
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, w: &Weights) -> Result<serde_json::Value> {
    let window = super::window_size(&c.windows);
    to_json(&Qwen3Config {
        base: DecoderFields::from_config(c)?,
        hidden_act: activation_name(c.act).into(),
        attention_bias: super::has_biases(w).0,
        use_sliding_window: window.is_some(),
        sliding_window: window,
        max_window_layers: c.n_layers,
        layer_types: Some(super::layer_types(&c.windows, c.n_layers)),
    })
}

/// Llama's table plus the q/k norms.
pub const TENSORS: &[TensorName] = &[
    vec(Slot::Embed, "model.embed_tokens.weight", "token_embd.weight"),
    vec(Slot::Ln1, "model.layers.{l}.input_layernorm.weight", "blk.{l}.attn_norm.weight"),
    lin(Slot::Q, "model.layers.{l}.self_attn.q_proj.weight", "blk.{l}.attn_q.weight"),
    vec(Slot::QBias, "model.layers.{l}.self_attn.q_proj.bias", "blk.{l}.attn_q.bias"),
    lin(Slot::K, "model.layers.{l}.self_attn.k_proj.weight", "blk.{l}.attn_k.weight"),
    vec(Slot::KBias, "model.layers.{l}.self_attn.k_proj.bias", "blk.{l}.attn_k.bias"),
    lin(Slot::V, "model.layers.{l}.self_attn.v_proj.weight", "blk.{l}.attn_v.weight"),
    vec(Slot::VBias, "model.layers.{l}.self_attn.v_proj.bias", "blk.{l}.attn_v.bias"),
    vec(Slot::QNorm, "model.layers.{l}.self_attn.q_norm.weight", "blk.{l}.attn_q_norm.weight"),
    vec(Slot::KNorm, "model.layers.{l}.self_attn.k_norm.weight", "blk.{l}.attn_k_norm.weight"),
    lin(Slot::O, "model.layers.{l}.self_attn.o_proj.weight", "blk.{l}.attn_output.weight"),
    vec(Slot::OBias, "model.layers.{l}.self_attn.o_proj.bias", "blk.{l}.attn_output.bias"),
    vec(Slot::Ln2, "model.layers.{l}.post_attention_layernorm.weight", "blk.{l}.ffn_norm.weight"),
    lin(Slot::Gate, "model.layers.{l}.mlp.gate_proj.weight", "blk.{l}.ffn_gate.weight"),
    lin(Slot::Up, "model.layers.{l}.mlp.up_proj.weight", "blk.{l}.ffn_up.weight"),
    lin(Slot::Down, "model.layers.{l}.mlp.down_proj.weight", "blk.{l}.ffn_down.weight"),
    vec(Slot::FinalNorm, "model.norm.weight", "output_norm.weight"),
    lin(Slot::Unembed, "lm_head.weight", "output.weight"),
];

/// The Qwen3 family.
pub const FAMILY: Family = Family {
    name: "qwen3",
    about: "Qwen3 (Llama blocks with per-head q/k RMSNorm)",
    hf_model_types: &["qwen3"],
    hf_architecture: "Qwen3ForCausalLM",
    gguf_archs: &["qwen3"],
    from_hf,
    to_hf,
    gguf_keys: super::LLAMA_GGUF_KEYS,
    gguf_extra: super::no_gguf_extra,
    tensors: TENSORS,
    gguf_permute_qk: false,
    gguf_norm_offset_included: false,
};
