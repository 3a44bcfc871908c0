//! Gemma-3 (text): Gemma-2's blocks without soft-capping by default, with per-head q/k
//! RMSNorms (`(1 + w)` gains), five local layers to one global layer, and two rotary bases:
//! `rope_theta` (with `rope_scaling`) on global layers, `rope_local_base_freq` on local ones.
//! Hugging Face `Gemma3ForCausalLM` (`gemma3_text`); llama.cpp `gemma3` GGUF files.

use super::gemma2::{gemma_flags, gguf_gemma_extra, GEMMA_GGUF_KEYS};
use super::{activation, activation_name, lin, parse_hf, refuse, to_json, vec, windows_from_layer_types, DecoderFields, Family, Slot, TensorName};
use crate::config::{Config, Positional, QkNorm, RopeFreqs};
use crate::error::Result;
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `Gemma3TextConfig`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gemma3Config {
    /// Shape, rotary and token fields (`head_dim` defaults to 256, `rope_theta` to 1e6).
    #[serde(flatten)]
    pub base: DecoderFields,
    /// The MLP activation (GeGLU with the tanh GELU).
    #[serde(default = "gelu_tanh")]
    pub hidden_activation: String,
    /// Scores are `q . k * query_pre_attn_scalar^-0.5`.
    #[serde(default = "scalar")]
    pub query_pre_attn_scalar: f64,
    /// The window of the local layers.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// `c * tanh(logits / c)` on the output.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// `c * tanh(scores / c)` on attention scores.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// The rotary base of local layers (no scaling there).
    #[serde(default = "local_base")]
    pub rope_local_base_freq: f64,
    /// Every n-th layer is global (when `layer_types` is absent).
    #[serde(default = "pattern", rename = "_sliding_window_pattern", alias = "sliding_window_pattern")]
    pub sliding_window_pattern: usize,
    /// Per-layer attention kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Bidirectional attention (the embedding-model variant); refused.
    #[serde(default)]
    pub use_bidirectional_attention: bool,
}

fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}

fn scalar() -> f64 {
    256.0
}

fn local_base() -> f64 {
    10000.0
}

fn pattern() -> usize {
    6
}

/// `config.json` to [`Config`]. A multimodal `gemma3` config is read through its `text_config`.
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let j = if j["model_type"] == "gemma3" && j.get("text_config").is_some() { &j["text_config"] } else { j };
    let mut c: Gemma3Config = parse_hf(j, "gemma3_text")?;
    refuse("use_bidirectional_attention", c.use_bidirectional_attention, "ferrolens runs causal language models")?;
    c.base.head_dim.get_or_insert(256);
    let mut cfg = c.base.config(name, FAMILY.name, 1e-6, 1_000_000.0, true, activation("hidden_activation", &c.hidden_activation)?)?;
    gemma_flags(&mut cfg, c.query_pre_attn_scalar);
    cfg.qk_norm = Some(QkNorm::PerHead);
    cfg.attn_softcap = c.attn_logit_softcapping;
    cfg.final_softcap = c.final_logit_softcapping;
    let p = c.sliding_window_pattern.max(1);
    let types = c
        .layer_types
        .unwrap_or_else(|| (0..cfg.n_layers).map(|i| if (i + 1) % p != 0 { "sliding_attention".into() } else { "full_attention".into() }).collect());
    cfg.windows = windows_from_layer_types(&types, c.sliding_window, cfg.n_layers)?;
    if let Positional::Rotary { local, .. } = &mut cfg.positional {
        *local = Some(RopeFreqs::plain(c.rope_local_base_freq));
    }
    Ok(cfg)
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, _: &Weights) -> Result<serde_json::Value> {
    let local = match &c.positional {
        Positional::Rotary { local: Some(l), .. } => l.base,
        _ => local_base(),
    };
    to_json(&Gemma3Config {
        base: DecoderFields::from_config(c)?,
        hidden_activation: activation_name(c.act).into(),
        query_pre_attn_scalar: c.attn_scale.powi(-2),
        sliding_window: super::window_size(&c.windows),
        final_logit_softcapping: c.final_softcap,
        attn_logit_softcapping: c.attn_softcap,
        rope_local_base_freq: local,
        sliding_window_pattern: pattern(),
        layer_types: Some(super::layer_types(&c.windows, c.n_layers)),
        use_bidirectional_attention: false,
    })
}

/// Gemma-2's table plus the q/k norms.
pub const TENSORS: &[TensorName] = &[
    vec(Slot::Embed, "model.embed_tokens.weight", "token_embd.weight"),
    vec(Slot::Ln1, "model.layers.{l}.input_layernorm.weight", "blk.{l}.attn_norm.weight"),
    lin(Slot::Q, "model.layers.{l}.self_attn.q_proj.weight", "blk.{l}.attn_q.weight"),
    lin(Slot::K, "model.layers.{l}.self_attn.k_proj.weight", "blk.{l}.attn_k.weight"),
    lin(Slot::V, "model.layers.{l}.self_attn.v_proj.weight", "blk.{l}.attn_v.weight"),
    vec(Slot::QNorm, "model.layers.{l}.self_attn.q_norm.weight", "blk.{l}.attn_q_norm.weight"),
    vec(Slot::KNorm, "model.layers.{l}.self_attn.k_norm.weight", "blk.{l}.attn_k_norm.weight"),
    lin(Slot::O, "model.layers.{l}.self_attn.o_proj.weight", "blk.{l}.attn_output.weight"),
    vec(Slot::Ln1Post, "model.layers.{l}.post_attention_layernorm.weight", "blk.{l}.post_attention_norm.weight"),
    vec(Slot::Ln2, "model.layers.{l}.pre_feedforward_layernorm.weight", "blk.{l}.ffn_norm.weight"),
    lin(Slot::Gate, "model.layers.{l}.mlp.gate_proj.weight", "blk.{l}.ffn_gate.weight"),
    lin(Slot::Up, "model.layers.{l}.mlp.up_proj.weight", "blk.{l}.ffn_up.weight"),
    lin(Slot::Down, "model.layers.{l}.mlp.down_proj.weight", "blk.{l}.ffn_down.weight"),
    vec(Slot::Ln2Post, "model.layers.{l}.post_feedforward_layernorm.weight", "blk.{l}.post_ffw_norm.weight"),
    vec(Slot::FinalNorm, "model.norm.weight", "output_norm.weight"),
];

/// The Gemma-3 family.
pub const FAMILY: Family = Family {
    name: "gemma3",
    about: "Gemma-3 text (sandwich (1+w) RMSNorms, q/k norms, 5 local : 1 global layers, two rotary bases)",
    hf_model_types: &["gemma3_text", "gemma3"],
    hf_architecture: "Gemma3ForCausalLM",
    gguf_archs: &["gemma3"],
    from_hf,
    to_hf,
    gguf_keys: GEMMA_GGUF_KEYS,
    gguf_extra: gguf_gemma_extra,
    tensors: TENSORS,
    gguf_permute_qk: false,
    gguf_norm_offset_included: true,
};
