//! GPT-NeoX / Pythia: LayerNorm with biases, attention and MLP reading the same residual and
//! both writing to it (`use_parallel_residual`), partial rotary (`rotary_pct` of each head),
//! q, k, v fused and interleaved per head, biases everywhere, exact GELU, untied unembedding.
//! Hugging Face `GPTNeoXForCausalLM` (no GGUF: ferrolens does not read llama.cpp's `gptneox`).

use super::{activation, activation_name, first_id, lin, parse_hf, rope_scaling, rope_scaling_json, to_json, vec, Family, Slot, TensorName};
use crate::config::{Config, NormKind, NormPlacement, Positional, RopeFreqs};
use crate::error::{Error, Result};
use crate::weights::Weights;
use serde::{Deserialize, Serialize};

/// `GPTNeoXConfig`'s fields (transformers 4.57).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GptNeoXConfig {
    /// `V`.
    pub vocab_size: usize,
    /// `D`.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// `M`.
    pub intermediate_size: usize,
    /// The MLP activation.
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// Rotated fraction of each head (default 0.25).
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    /// Its newer name (transformers writes both, equal).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Rotary base (default 10000).
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    /// Its newer name (transformers writes both, equal).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary rescaling.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Context length.
    #[serde(default = "ctx")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Attention and MLP in parallel.
    #[serde(default = "yes")]
    pub use_parallel_residual: bool,
    /// Tied unembedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// BOS id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// EOS id.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn gelu() -> String {
    "gelu".into()
}
/// One of two names for the same field; both set and different is an error.
fn either(a: Option<f64>, an: &str, b: Option<f64>, bn: &str, default: f64) -> Result<f64> {
    match (a, b) {
        (Some(x), Some(y)) if (x - y).abs() > 1e-12 * x.abs().max(1.0) => {
            Err(Error::Config(format!("config.json sets `{an}` = {x} and `{bn}` = {y}; they name one thing, make them equal")))
        }
        (Some(x), _) | (None, Some(x)) => Ok(x),
        (None, None) => Ok(default),
    }
}
fn ctx() -> usize {
    2048
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// `config.json` to [`Config`].
pub fn from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let c: GptNeoXConfig = parse_hf(j, "gpt_neox")?;
    let h = c.num_attention_heads;
    if h == 0 || !c.hidden_size.is_multiple_of(h) {
        return Err(Error::Config(format!("hidden_size {} is not divisible by num_attention_heads {h}", c.hidden_size)));
    }
    let d_head = c.hidden_size / h;
    let pct = either(c.rotary_pct, "rotary_pct", c.partial_rotary_factor, "partial_rotary_factor", 0.25)?;
    let base = either(c.rotary_emb_base, "rotary_emb_base", c.rope_theta, "rope_theta", 10000.0)?;
    // transformers: rotary_ndims = int(head_size * rotary_pct).
    let dim = (d_head as f64 * pct) as usize;
    Ok(Config {
        name: name.to_string(),
        family: FAMILY.name.into(),
        d_model: c.hidden_size,
        n_layers: c.num_hidden_layers,
        n_heads: h,
        n_kv_heads: h,
        d_head,
        d_mlp: c.intermediate_size,
        d_vocab: c.vocab_size,
        n_ctx: c.max_position_embeddings,
        eps: c.layer_norm_eps,
        norm: NormKind::LayerNorm,
        norm_offset: 0.0,
        norm_placement: NormPlacement::Pre,
        parallel_attn_mlp: c.use_parallel_residual,
        qk_norm: None,
        act: activation("hidden_act", &c.hidden_act)?,
        gated_mlp: false,
        positional: Positional::Rotary { dim, global: RopeFreqs { base, scaling: rope_scaling(&c.rope_scaling)? }, local: None },
        attn_scale: 1.0 / (d_head as f64).sqrt(),
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
    let Positional::Rotary { dim, global, .. } = &c.positional else {
        return Err(Error::Config("a gpt_neox model needs rotary positions".into()));
    };
    to_json(&GptNeoXConfig {
        vocab_size: c.d_vocab,
        hidden_size: c.d_model,
        num_hidden_layers: c.n_layers,
        num_attention_heads: c.n_heads,
        intermediate_size: c.d_mlp,
        hidden_act: activation_name(c.act).into(),
        rotary_pct: Some(*dim as f64 / c.d_head as f64),
        partial_rotary_factor: Some(*dim as f64 / c.d_head as f64),
        rotary_emb_base: Some(global.base),
        rope_theta: Some(global.base),
        rope_scaling: Some(rope_scaling_json(global)),
        max_position_embeddings: c.n_ctx,
        layer_norm_eps: c.eps,
        use_parallel_residual: c.parallel_attn_mlp,
        tie_word_embeddings: c.tied_embeddings,
        bos_token_id: c.bos_token_id.map(Into::into),
        eos_token_id: c.eos_token_id.map(Into::into),
    })
}

/// GPT-NeoX's table.
pub const TENSORS: &[TensorName] = &[
    vec(Slot::Embed, "gpt_neox.embed_in.weight", ""),
    vec(Slot::Ln1, "gpt_neox.layers.{l}.input_layernorm.weight", ""),
    vec(Slot::Ln1Bias, "gpt_neox.layers.{l}.input_layernorm.bias", ""),
    lin(Slot::QkvPerHead, "gpt_neox.layers.{l}.attention.query_key_value.weight", ""),
    vec(Slot::QkvPerHeadBias, "gpt_neox.layers.{l}.attention.query_key_value.bias", ""),
    lin(Slot::O, "gpt_neox.layers.{l}.attention.dense.weight", ""),
    vec(Slot::OBias, "gpt_neox.layers.{l}.attention.dense.bias", ""),
    vec(Slot::Ln2, "gpt_neox.layers.{l}.post_attention_layernorm.weight", ""),
    vec(Slot::Ln2Bias, "gpt_neox.layers.{l}.post_attention_layernorm.bias", ""),
    lin(Slot::Up, "gpt_neox.layers.{l}.mlp.dense_h_to_4h.weight", ""),
    vec(Slot::UpBias, "gpt_neox.layers.{l}.mlp.dense_h_to_4h.bias", ""),
    lin(Slot::Down, "gpt_neox.layers.{l}.mlp.dense_4h_to_h.weight", ""),
    vec(Slot::DownBias, "gpt_neox.layers.{l}.mlp.dense_4h_to_h.bias", ""),
    vec(Slot::FinalNorm, "gpt_neox.final_layer_norm.weight", ""),
    vec(Slot::FinalNormBias, "gpt_neox.final_layer_norm.bias", ""),
    lin(Slot::Unembed, "embed_out.weight", ""),
];

/// The GPT-NeoX family.
pub const FAMILY: Family = Family {
    name: "gpt_neox",
    about: "GPT-NeoX / Pythia (LayerNorm, parallel attention + MLP, partial rotary, fused per-head qkv)",
    hf_model_types: &["gpt_neox"],
    hf_architecture: "GPTNeoXForCausalLM",
    gguf_archs: &[],
    from_hf,
    to_hf,
    gguf_keys: &[],
    gguf_extra: super::no_gguf_extra,
    tensors: TENSORS,
    gguf_permute_qk: false,
    gguf_norm_offset_included: false,
};
