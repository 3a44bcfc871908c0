//! Phi-3: Llama's blocks with q, k, v fused in one `qkv_proj` and gate and up fused in one
//! `gate_up_proj`, optional partial rotary (`partial_rotary_factor`) and a sliding window on
//! every layer (`sliding_window`, e.g. 2047 in Phi-3-mini-4k). `longrope` / `su` scaling (the
//! 128k variants) is refused. Hugging Face `Phi3ForCausalLM`; llama.cpp `phi3` GGUF files.

use super::{activation, activation_name, lin, parse_hf, to_json, vec, DecoderFields, Family, GgufMeta, Slot, TensorName};
use crate::config::{Config, Positional};
use crate::error::Result;
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `Phi3Config`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phi3Config {
    /// Shape, rotary and token fields.
    #[serde(flatten)]
    pub base: DecoderFields,
    /// The MLP activation.
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Rotated fraction of each head.
    #[serde(default = "one")]
    pub partial_rotary_factor: f64,
    /// Keys a query sees: `i - w < j <= i`, on every layer.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// The pre-training context (used by `longrope`, which is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

fn silu() -> String {
    "silu".into()
}

fn one() -> f64 {
    1.0
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let c: Phi3Config = parse_hf(j, "phi3")?;
    let mut cfg = c.base.config(name, FAMILY.name, 1e-5, 10000.0, false, activation("hidden_act", &c.hidden_act)?)?;
    if let Positional::Rotary { dim, .. } = &mut cfg.positional {
        *dim = (cfg.d_head as f64 * c.partial_rotary_factor) as usize;
    }
    if let Some(w) = c.sliding_window {
        cfg.windows = vec![Some(w); cfg.n_layers];
    }
    Ok(cfg)
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, _: &Weights) -> Result<serde_json::Value> {
    let factor = match c.positional {
        Positional::Rotary { dim, .. } => dim as f64 / c.d_head as f64,
        Positional::Learned => 1.0,
    };
    to_json(&Phi3Config {
        base: DecoderFields::from_config(c)?,
        hidden_act: activation_name(c.act).into(),
        partial_rotary_factor: factor,
        sliding_window: super::window_size(&c.windows),
        original_max_position_embeddings: Some(c.n_ctx),
    })
}

/// llama.cpp's `phi3` metadata: the rotary width gives the partial factor, the window its own key.
fn gguf_extra(meta: &GgufMeta, m: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let (d, h) = (m.get("hidden_size").and_then(|v| v.as_f64()), m.get("num_attention_heads").and_then(|v| v.as_f64()));
    if let (Some(rot), Some(d), Some(h)) = (meta.get("rope.dimension_count").and_then(|v| v.as_f64()), d, h) {
        m.insert("partial_rotary_factor".into(), (rot / (d / h)).into());
    }
    if let Some(w) = meta.get("attention.sliding_window") {
        m.insert("sliding_window".into(), w);
    }
    Ok(())
}

/// Phi-3's table.
pub const TENSORS: &[TensorName] = &[
    vec(Slot::Embed, "model.embed_tokens.weight", "token_embd.weight"),
    vec(Slot::Ln1, "model.layers.{l}.input_layernorm.weight", "blk.{l}.attn_norm.weight"),
    lin(Slot::QkvConcat, "model.layers.{l}.self_attn.qkv_proj.weight", "blk.{l}.attn_qkv.weight"),
    lin(Slot::O, "model.layers.{l}.self_attn.o_proj.weight", "blk.{l}.attn_output.weight"),
    vec(Slot::Ln2, "model.layers.{l}.post_attention_layernorm.weight", "blk.{l}.ffn_norm.weight"),
    lin(Slot::GateUp, "model.layers.{l}.mlp.gate_up_proj.weight", "blk.{l}.ffn_up.weight"),
    lin(Slot::Down, "model.layers.{l}.mlp.down_proj.weight", "blk.{l}.ffn_down.weight"),
    vec(Slot::FinalNorm, "model.norm.weight", "output_norm.weight"),
    lin(Slot::Unembed, "lm_head.weight", "output.weight"),
];

/// The Phi-3 family.
pub const FAMILY: Family = Family {
    name: "phi3",
    about: "Phi-3 (Llama blocks, fused qkv and gate_up, sliding window)",
    hf_model_types: &["phi3"],
    hf_architecture: "Phi3ForCausalLM",
    gguf_archs: &["phi3"],
    from_hf,
    to_hf,
    gguf_keys: &[
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("block_count", "num_hidden_layers"),
        ("feed_forward_length", "intermediate_size"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
        ("rope.freq_base", "rope_theta"),
        ("vocab_size", "vocab_size"),
    ],
    gguf_extra,
    tensors: TENSORS,
    gguf_permute_qk: false,
    gguf_norm_offset_included: false,
};
