//! GPT-2: learned positions, LayerNorm with biases, GELU (tanh) MLP, tied unembedding, q/k/v
//! fused in `c_attn`, `Conv1D` weights stored `[in, out]`. Hugging Face `GPT2LMHeadModel`
//! (keys with or without the `transformer.` prefix); llama.cpp `gpt2` GGUF files.

use super::{activation, activation_name, first_id, parse_hf, refuse, to_json, vec, Family, Layout, Slot, TensorName};
use crate::config::{Config, NormKind, NormPlacement, Positional};
use crate::error::{Error, Result};
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `GPT2Config`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// `V`.
    pub vocab_size: usize,
    /// Context length.
    #[serde(default)]
    pub n_positions: Option<usize>,
    /// Its name in old configs (transformers writes both).
    #[serde(default)]
    pub n_ctx: Option<usize>,
    /// `D`.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// `M` (default `4 D`).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// The MLP activation.
    #[serde(default = "gelu_new")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    /// Scores divided by `sqrt(d_head)` (off: not divided).
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    /// Scores further divided by the layer index + 1; refused.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Tied unembedding.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// BOS id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// EOS id.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn gelu_new() -> String {
    "gelu_new".into()
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let c: Gpt2Config = parse_hf(j, "gpt2")?;
    refuse("scale_attn_by_inverse_layer_idx", c.scale_attn_by_inverse_layer_idx, "per-layer score scaling")?;
    if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
        return Err(Error::Config(format!("n_embd {} is not divisible by n_head {}", c.n_embd, c.n_head)));
    }
    let d_head = c.n_embd / c.n_head;
    let n_ctx = c.n_positions.or(c.n_ctx).ok_or_else(|| Error::Config("config.json lacks `n_positions` (the context length)".into()))?;
    Ok(Config {
        name: name.to_string(),
        family: FAMILY.name.into(),
        d_model: c.n_embd,
        n_layers: c.n_layer,
        n_heads: c.n_head,
        n_kv_heads: c.n_head,
        d_head,
        d_mlp: c.n_inner.unwrap_or(4 * c.n_embd),
        d_vocab: c.vocab_size,
        n_ctx,
        eps: c.layer_norm_epsilon,
        norm: NormKind::LayerNorm,
        norm_offset: 0.0,
        norm_placement: NormPlacement::Pre,
        parallel_attn_mlp: false,
        qk_norm: None,
        act: activation("activation_function", &c.activation_function)?,
        gated_mlp: false,
        positional: Positional::Learned,
        attn_scale: if c.scale_attn_weights { 1.0 / (d_head as f64).sqrt() } else { 1.0 },
        attn_softcap: None,
        final_softcap: None,
        embed_scale: None,
        windows: vec![],
        tied_embeddings: c.tie_word_embeddings,
        bos_token_id: first_id(&c.bos_token_id),
        eos_token_id: first_id(&c.eos_token_id),
        prepend_bos: false,
    })
}

/// [`Config`] to `config.json`.
pub fn to_hf(c: &Config, _: &Weights) -> Result<serde_json::Value> {
    to_json(&Gpt2Config {
        vocab_size: c.d_vocab,
        n_positions: Some(c.n_ctx),
        n_ctx: Some(c.n_ctx),
        n_embd: c.d_model,
        n_layer: c.n_layers,
        n_head: c.n_heads,
        n_inner: Some(c.d_mlp),
        activation_function: match activation_name(c.act) {
            "gelu_pytorch_tanh" => "gelu_new".into(),
            other => other.into(),
        },
        layer_norm_epsilon: c.eps,
        scale_attn_weights: (c.attn_scale - 1.0 / (c.d_head as f64).sqrt()).abs() < 1e-12,
        scale_attn_by_inverse_layer_idx: false,
        tie_word_embeddings: c.tied_embeddings,
        bos_token_id: c.bos_token_id.map(Into::into),
        eos_token_id: c.eos_token_id.map(Into::into),
    })
}

const fn conv(slot: Slot, hf: &'static str, gguf: &'static str) -> TensorName {
    TensorName { slot, hf, gguf, layout: Layout::Conv1d }
}

/// GPT-2's table (`Conv1D` matrices; llama.cpp stores them transposed, as `nn.Linear`).
pub const TENSORS: &[TensorName] = &[
    vec(Slot::Embed, "transformer.wte.weight", "token_embd.weight"),
    vec(Slot::PosEmbed, "transformer.wpe.weight", "position_embd.weight"),
    vec(Slot::Ln1, "transformer.h.{l}.ln_1.weight", "blk.{l}.attn_norm.weight"),
    vec(Slot::Ln1Bias, "transformer.h.{l}.ln_1.bias", "blk.{l}.attn_norm.bias"),
    conv(Slot::QkvConcat, "transformer.h.{l}.attn.c_attn.weight", "blk.{l}.attn_qkv.weight"),
    vec(Slot::QkvConcatBias, "transformer.h.{l}.attn.c_attn.bias", "blk.{l}.attn_qkv.bias"),
    conv(Slot::O, "transformer.h.{l}.attn.c_proj.weight", "blk.{l}.attn_output.weight"),
    vec(Slot::OBias, "transformer.h.{l}.attn.c_proj.bias", "blk.{l}.attn_output.bias"),
    vec(Slot::Ln2, "transformer.h.{l}.ln_2.weight", "blk.{l}.ffn_norm.weight"),
    vec(Slot::Ln2Bias, "transformer.h.{l}.ln_2.bias", "blk.{l}.ffn_norm.bias"),
    conv(Slot::Up, "transformer.h.{l}.mlp.c_fc.weight", "blk.{l}.ffn_up.weight"),
    vec(Slot::UpBias, "transformer.h.{l}.mlp.c_fc.bias", "blk.{l}.ffn_up.bias"),
    conv(Slot::Down, "transformer.h.{l}.mlp.c_proj.weight", "blk.{l}.ffn_down.weight"),
    vec(Slot::DownBias, "transformer.h.{l}.mlp.c_proj.bias", "blk.{l}.ffn_down.bias"),
    vec(Slot::FinalNorm, "transformer.ln_f.weight", "output_norm.weight"),
    vec(Slot::FinalNormBias, "transformer.ln_f.bias", "output_norm.bias"),
    super::lin(Slot::Unembed, "lm_head.weight", "output.weight"),
];

/// The GPT-2 family.
pub const FAMILY: Family = Family {
    name: "gpt2",
    about: "GPT-2 (learned positions, LayerNorm, GELU, fused Conv1D qkv)",
    hf_model_types: &["gpt2"],
    hf_architecture: "GPT2LMHeadModel",
    gguf_archs: &["gpt2"],
    from_hf,
    to_hf,
    gguf_keys: &[
        ("context_length", "n_positions"),
        ("embedding_length", "n_embd"),
        ("block_count", "n_layer"),
        ("feed_forward_length", "n_inner"),
        ("attention.head_count", "n_head"),
        ("attention.layer_norm_epsilon", "layer_norm_epsilon"),
        ("vocab_size", "vocab_size"),
    ],
    gguf_extra: super::no_gguf_extra,
    tensors: TENSORS,
    gguf_permute_qk: false,
    gguf_norm_offset_included: false,
};
