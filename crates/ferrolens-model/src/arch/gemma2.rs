//! Gemma-2: sandwich norms (RMSNorm before and after each sublayer) with Gemma's `(1 + w)`
//! gains, embeddings scaled by `sqrt(d_model)`, GeGLU MLP, `query_pre_attn_scalar`,
//! attention-logit and final-logit soft-capping, and local (sliding-window) layers alternating
//! with global ones. Hugging Face `Gemma2ForCausalLM`; llama.cpp `gemma2` GGUF files (whose
//! norm gains already hold the `+1`).

use super::{activation, activation_name, lin, parse_hf, to_json, vec, windows_from_layer_types, DecoderFields, Family, GgufMeta, Slot, TensorName};
use crate::config::{Config, NormPlacement};
use crate::error::Result;
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `Gemma2Config`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gemma2Config {
    /// Shape, rotary and token fields (`head_dim` defaults to 256).
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
    /// Per-layer attention kind (default: sliding, full, sliding, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
}

fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}

fn scalar() -> f64 {
    256.0
}

/// Gemma's shared setup: `(1 + w)` RMSNorm gains, sandwich norms, embedding scale, BOS, scale.
pub fn gemma_flags(cfg: &mut Config, query_pre_attn_scalar: f64) {
    cfg.norm_offset = 1.0;
    cfg.norm_placement = NormPlacement::Sandwich;
    cfg.embed_scale = Some((cfg.d_model as f64).sqrt());
    cfg.attn_scale = query_pre_attn_scalar.powf(-0.5);
    cfg.prepend_bos = true;
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let mut c: Gemma2Config = parse_hf(j, "gemma2")?;
    c.base.head_dim.get_or_insert(256);
    let mut cfg = c.base.config(name, FAMILY.name, 1e-6, 10000.0, true, activation("hidden_activation", &c.hidden_activation)?)?;
    gemma_flags(&mut cfg, c.query_pre_attn_scalar);
    cfg.attn_softcap = c.attn_logit_softcapping;
    cfg.final_softcap = c.final_logit_softcapping;
    let types = c
        .layer_types
        .unwrap_or_else(|| (0..cfg.n_layers).map(|i| if (i + 1) % 2 != 0 { "sliding_attention".into() } else { "full_attention".into() }).collect());
    cfg.windows = windows_from_layer_types(&types, c.sliding_window, cfg.n_layers)?;
    Ok(cfg)
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, _: &Weights) -> Result<serde_json::Value> {
    to_json(&Gemma2Config {
        base: DecoderFields::from_config(c)?,
        hidden_activation: activation_name(c.act).into(),
        query_pre_attn_scalar: c.attn_scale.powi(-2),
        sliding_window: super::window_size(&c.windows),
        final_logit_softcapping: c.final_softcap,
        attn_logit_softcapping: c.attn_softcap,
        layer_types: Some(super::layer_types(&c.windows, c.n_layers)),
    })
}

/// llama.cpp's Gemma scale rule (`query_pre_attn_scalar` is not in its GGUF files): the 27B
/// models use `d_model / n_heads`, the others `head_dim`.
pub fn gguf_gemma_extra(meta: &GgufMeta, m: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let n = |k: &str| m.get(k).and_then(|v| v.as_f64());
    let (layers, d, h, hd) = (n("num_hidden_layers"), n("hidden_size"), n("num_attention_heads"), n("head_dim"));
    if let (Some(layers), Some(d), Some(h), Some(hd)) = (layers, d, h, hd) {
        let big = layers == 46.0 || layers == 62.0;
        m.insert("query_pre_attn_scalar".into(), if big { d / h } else { hd }.into());
    }
    for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if let Some(v) = meta.get(k) {
            m.insert(k.into(), v);
        }
    }
    if meta.get("rope.scaling.type").and_then(|t| t.as_str().map(String::from)).as_deref() == Some("linear") {
        if let Some(f) = meta.get("rope.scaling.factor") {
            m.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": f}));
        }
    }
    Ok(())
}

/// GGUF keys of the Gemma families.
pub const GEMMA_GGUF_KEYS: &[(&str, &str)] = &[
    ("context_length", "max_position_embeddings"),
    ("embedding_length", "hidden_size"),
    ("block_count", "num_hidden_layers"),
    ("feed_forward_length", "intermediate_size"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.key_length", "head_dim"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("attention.sliding_window", "sliding_window"),
    ("rope.freq_base", "rope_theta"),
    ("vocab_size", "vocab_size"),
];

/// Gemma-2's table (no `lm_head`: the unembedding is always the embedding).
pub const TENSORS: &[TensorName] = &[
    vec(Slot::Embed, "model.embed_tokens.weight", "token_embd.weight"),
    vec(Slot::Ln1, "model.layers.{l}.input_layernorm.weight", "blk.{l}.attn_norm.weight"),
    lin(Slot::Q, "model.layers.{l}.self_attn.q_proj.weight", "blk.{l}.attn_q.weight"),
    lin(Slot::K, "model.layers.{l}.self_attn.k_proj.weight", "blk.{l}.attn_k.weight"),
    lin(Slot::V, "model.layers.{l}.self_attn.v_proj.weight", "blk.{l}.attn_v.weight"),
    lin(Slot::O, "model.layers.{l}.self_attn.o_proj.weight", "blk.{l}.attn_output.weight"),
    vec(Slot::Ln1Post, "model.layers.{l}.post_attention_layernorm.weight", "blk.{l}.post_attention_norm.weight"),
    vec(Slot::Ln2, "model.layers.{l}.pre_feedforward_layernorm.weight", "blk.{l}.ffn_norm.weight"),
    lin(Slot::Gate, "model.layers.{l}.mlp.gate_proj.weight", "blk.{l}.ffn_gate.weight"),
    lin(Slot::Up, "model.layers.{l}.mlp.up_proj.weight", "blk.{l}.ffn_up.weight"),
    lin(Slot::Down, "model.layers.{l}.mlp.down_proj.weight", "blk.{l}.ffn_down.weight"),
    vec(Slot::Ln2Post, "model.layers.{l}.post_feedforward_layernorm.weight", "blk.{l}.post_ffw_norm.weight"),
    vec(Slot::FinalNorm, "model.norm.weight", "output_norm.weight"),
];

/// The Gemma-2 family.
pub const FAMILY: Family = Family {
    name: "gemma2",
    about: "Gemma-2 (sandwich (1+w) RMSNorms, GeGLU, soft-capping, local/global layers)",
    hf_model_types: &["gemma2"],
    hf_architecture: "Gemma2ForCausalLM",
    gguf_archs: &["gemma2"],
    from_hf,
    to_hf,
    gguf_keys: GEMMA_GGUF_KEYS,
    gguf_extra: gguf_gemma_extra,
    tensors: TENSORS,
    gguf_permute_qk: false,
    gguf_norm_offset_included: true,
};
