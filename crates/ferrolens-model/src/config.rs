//! Model configuration, in TransformerLens's vocabulary (`HookedTransformerConfig`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The normalisation layer of the architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    /// `LayerNorm`: `(x - mean) / sqrt(var + eps) * w + b` (GPT-2).
    LayerNorm,
    /// `RMSNorm`: `x / sqrt(mean(x^2) + eps) * w` (Llama).
    RmsNorm,
}

/// The MLP activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// GPT-2's tanh approximation of GELU (`gelu_new` in TL).
    GeluNew,
    /// The exact (erf) GELU.
    Gelu,
    /// SiLU / swish (Llama).
    Silu,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Positional {
    /// Learned absolute position embeddings `W_pos` `[n_ctx, d_model]` (GPT-2).
    Learned,
    /// Rotary embeddings in Hugging Face's rotate-half layout, on the first `dim` features of each head.
    Rotary {
        /// The rotary base (theta).
        base: f64,
        /// The rotated features per head (`rotary_dim`; equals `d_head` for Llama).
        dim: usize,
    },
}

/// The architecture family, for display and for loader choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// GPT-2 (`GPT2LMHeadModel`).
    Gpt2,
    /// Llama family (`LlamaForCausalLM`: Llama, SmolLM2, TinyLlama, ...).
    Llama,
}

/// A model's shape and variant switches; the same fields as TL's `HookedTransformerConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Human-readable model name.
    pub name: String,
    /// The architecture family.
    pub arch: Arch,
    /// Residual width `D`.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads `h`.
    pub n_heads: usize,
    /// Number of key/value heads `kv` (`== n_heads` without grouped-query attention).
    pub n_kv_heads: usize,
    /// Per-head width `d`.
    pub d_head: usize,
    /// MLP hidden width `M`.
    pub d_mlp: usize,
    /// Vocabulary size `V`.
    pub d_vocab: usize,
    /// Context length (the largest number of positions a prompt may have).
    pub n_ctx: usize,
    /// Norm epsilon.
    pub eps: f64,
    /// Norm kind.
    pub norm: NormKind,
    /// MLP activation.
    pub act: Activation,
    /// SwiGLU-style gated MLP (`act(x W_gate) * (x W_in)`).
    pub gated_mlp: bool,
    /// Positional scheme.
    pub positional: Positional,
    /// Whether the unembedding is the transposed token embedding.
    pub tied_embeddings: bool,
    /// Beginning-of-sequence token, where the tokenizer has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, where the tokenizer has one.
    pub eos_token_id: Option<u32>,
}

impl Config {
    /// Query heads per key/value head (`n_heads / n_kv_heads`).
    pub fn kv_repeat(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Check the internal consistency of the shape fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.n_layers == 0 || self.n_heads == 0 || self.d_model == 0 || self.d_vocab == 0 {
            return bad(format!("zero-sized model: {self:?}"));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if let Positional::Rotary { dim, .. } = self.positional {
            if dim > self.d_head || dim % 2 != 0 {
                return bad(format!("rotary dim {dim} must be even and at most d_head {}", self.d_head));
            }
        }
        Ok(())
    }

    /// Parameters in the blocks' matrices (for FLOP counts): per token a forward costs about
    /// `2 * matmul_params() + attention` FLOPs.
    pub fn matmul_params(&self) -> usize {
        let attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads);
        let mlp = self.d_model * self.d_mlp * if self.gated_mlp { 3 } else { 2 };
        self.n_layers * (attn + mlp) + self.d_model * self.d_vocab
    }

    /// Forward FLOPs for `batch` prompts of `pos` tokens (matmuls and attention; norms ignored).
    pub fn forward_flops(&self, batch: usize, pos: usize) -> f64 {
        let tokens = (batch * pos) as f64;
        let attn = 2.0 * 2.0 * (self.n_layers * self.n_heads * self.d_head) as f64 * (pos * pos) as f64 * batch as f64 / 2.0;
        2.0 * tokens * self.matmul_params() as f64 + attn
    }
}
