//! Model configuration, in TransformerLens's vocabulary (`HookedTransformerConfig`), plus the
//! flags that the one shared forward reads (see docs/architecture.md).
//!
//! A family file under [`crate::arch`] turns a checkpoint's own config (Hugging Face
//! `config.json` or GGUF metadata) into a [`Config`]; nothing else reads checkpoint configs.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The normalisation layer of the architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    /// `LayerNorm`: `(x - mean) / sqrt(var + eps) * w + b` (GPT-2, GPT-NeoX).
    LayerNorm,
    /// `RMSNorm`: `x / sqrt(mean(x^2) + eps) * w` (Llama and most current families). Gemma's
    /// `x / rms * (1 + w)` is this norm with the `+1` folded into the stored gain at load time
    /// (as TransformerLens does; see [`Config::norm_offset`]).
    RmsNorm,
}

/// Where a block's norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormPlacement {
    /// `x + attn(ln1(x))`, then `x + mlp(ln2(x))` (GPT-2, Llama, Qwen, Mistral, Phi-3, NeoX).
    Pre,
    /// Pre-norms and a norm on each sublayer's output before it joins the residual:
    /// `x + ln1_post(attn(ln1(x)))`, `x + ln2_post(mlp(ln2(x)))` (Gemma-2, Gemma-3).
    Sandwich,
    /// Output norms only: `x + ln1_post(attn(x))`, `x + ln2_post(mlp(x))` (OLMo-2).
    Post,
}

impl NormPlacement {
    /// Whether the sublayers' inputs are normalised (`ln1`, `ln2`).
    pub fn has_pre(&self) -> bool {
        matches!(self, NormPlacement::Pre | NormPlacement::Sandwich)
    }

    /// Whether the sublayers' outputs are normalised (`ln1_post`, `ln2_post`).
    pub fn has_post(&self) -> bool {
        matches!(self, NormPlacement::Sandwich | NormPlacement::Post)
    }
}

/// Normalisation of queries and keys before the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QkNorm {
    /// An RMSNorm over each head's `d_head` features, one gain `[d_head]` shared by the heads
    /// (Qwen3, Gemma-3).
    PerHead,
    /// An RMSNorm over the whole projection, `[h*d_head]` for queries and `[kv*d_head]` for keys
    /// (OLMo-2).
    Full,
}

/// The MLP activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`; GPT-2 and Gemma's GeGLU).
    GeluNew,
    /// The exact (erf) GELU (GPT-NeoX/Pythia).
    Gelu,
    /// SiLU / swish (Llama's SwiGLU).
    Silu,
}

/// How a rotary embedding's inverse frequencies are rescaled (`rope_scaling` in Hugging Face).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain rotary frequencies `base^(-2i/dim)`.
    None,
    /// `rope_type: linear`: every inverse frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `rope_type: llama3` (Llama 3.1+): low frequencies divided by `factor`, high ones kept, the
    /// band between smoothly interpolated.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
}

/// One set of rotary frequencies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeFreqs {
    /// The base (theta).
    pub base: f64,
    /// The rescaling.
    pub scaling: RopeScaling,
}

impl RopeFreqs {
    /// Plain frequencies with base `base`.
    pub fn plain(base: f64) -> Self {
        RopeFreqs { base, scaling: RopeScaling::None }
    }

    /// The `dim / 2` inverse frequencies, computed as Hugging Face does (`base ** (2i/dim)` in
    /// f32, then the scaling).
    pub fn inv_freq(&self, dim: usize) -> Vec<f32> {
        let base = self.base as f32;
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        match self.scaling {
            RopeScaling::None => inv,
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            (f as f64 / factor) as f32
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * f as f64 / factor + smooth * f as f64) as f32
                        }
                    })
                    .collect()
            }
        }
    }
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Positional {
    /// Learned absolute position embeddings `W_pos` `[n_ctx, d_model]` (GPT-2).
    Learned,
    /// Rotary embeddings in Hugging Face's rotate-half layout, on the first `dim` features of
    /// each head (`dim < d_head` is partial rotary: GPT-NeoX `rotary_pct`, Phi-3
    /// `partial_rotary_factor`).
    Rotary {
        /// The rotated features per head.
        dim: usize,
        /// The frequencies of global-attention layers (all layers when `local` is `None`).
        global: RopeFreqs,
        /// The frequencies of sliding-window layers, when they differ (Gemma-3's
        /// `rope_local_base_freq`).
        local: Option<RopeFreqs>,
    },
}

/// A model's shape and variant switches: the fields of TL's `HookedTransformerConfig` that
/// ferrolens needs, and one flag per architectural variation (docs/architecture.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Human-readable model name.
    pub name: String,
    /// The family (a name from [`crate::arch::FAMILIES`]: `gpt2`, `llama`, `gemma3`, ...).
    pub family: String,
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
    /// Norm epsilon (every norm of the model).
    pub eps: f64,
    /// Norm kind.
    pub norm: NormKind,
    /// What the checkpoint's norm gains are offset by (`1.0` for Gemma's `(1 + w)`, else `0`).
    /// The loaded gains already include it (`w + norm_offset`, as TL's weights); the exporter
    /// subtracts it again.
    pub norm_offset: f64,
    /// Where the block's norms sit.
    pub norm_placement: NormPlacement,
    /// Attention and MLP read the same residual and both write to it (`x + attn(ln1(x)) +
    /// mlp(ln2(x))`, GPT-NeoX's `use_parallel_residual`). There is no `hook_resid_mid` then.
    pub parallel_attn_mlp: bool,
    /// Query/key norms, if any.
    pub qk_norm: Option<QkNorm>,
    /// MLP activation.
    pub act: Activation,
    /// Gated MLP (`act(x W_gate) * (x W_in)`: SwiGLU with SiLU, GeGLU with GELU).
    pub gated_mlp: bool,
    /// Positional scheme.
    pub positional: Positional,
    /// The factor on `q . k` (`1/sqrt(d_head)`, or Gemma's `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f64,
    /// Attention-logit soft-capping `c * tanh(s / c)` before the mask (Gemma-2).
    pub attn_softcap: Option<f64>,
    /// Final-logit soft-capping `c * tanh(logits / c)` (Gemma-2).
    pub final_softcap: Option<f64>,
    /// Factor on the token embedding (Gemma: `sqrt(d_model)`), applied before `hook_embed`.
    pub embed_scale: Option<f64>,
    /// Per-layer sliding attention window (`Some(w)`: a query at `i` sees keys `j` with
    /// `i - w < j <= i`), `None` for global layers. Empty means all layers are global.
    pub windows: Vec<Option<usize>>,
    /// Whether the unembedding is the transposed token embedding.
    pub tied_embeddings: bool,
    /// Beginning-of-sequence token, where the tokenizer has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, where the tokenizer has one.
    pub eos_token_id: Option<u32>,
    /// Whether prompts get the BOS token in front (TL's `default_prepend_bos`): on for Gemma,
    /// whose outputs are meaningless without it; off for the other families, as ferrolens has
    /// always tokenized (docs/architecture.md).
    pub prepend_bos: bool,
}

impl Config {
    /// Query heads per key/value head (`n_heads / n_kv_heads`).
    pub fn kv_repeat(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The sliding window of layer `l` (`None`: global attention).
    pub fn window(&self, l: usize) -> Option<usize> {
        self.windows.get(l).copied().flatten()
    }

    /// The rotary frequencies of layer `l` (`None` for learned positions).
    pub fn rope_freqs(&self, l: usize) -> Option<RopeFreqs> {
        match self.positional {
            Positional::Learned => None,
            Positional::Rotary { global, local, .. } => Some(match (self.window(l), local) {
                (Some(_), Some(local)) => local,
                _ => global,
            }),
        }
    }

    /// Check the internal consistency of the shape fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.n_layers == 0 || self.n_heads == 0 || self.d_model == 0 || self.d_vocab == 0 || self.d_head == 0 {
            return bad(format!("zero-sized model: {self:?}"));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads));
        }
        if let Positional::Rotary { dim, .. } = self.positional {
            if dim > self.d_head || dim % 2 != 0 || dim == 0 {
                return bad(format!("rotary dim {dim} must be even, positive and at most d_head {}", self.d_head));
            }
        }
        if !self.windows.is_empty() && self.windows.len() != self.n_layers {
            return bad(format!("{} per-layer windows for {} layers", self.windows.len(), self.n_layers));
        }
        if self.windows.iter().flatten().any(|&w| w == 0) {
            return bad("a sliding window of 0 keys lets a query see nothing".into());
        }
        for (what, c) in [("attention", self.attn_softcap), ("final", self.final_softcap)] {
            if c.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
                return bad(format!("the {what} soft-cap must be positive, got {c:?}"));
            }
        }
        if !(self.attn_scale > 0.0 && self.attn_scale.is_finite()) {
            return bad(format!("attention scale {} must be positive", self.attn_scale));
        }
        if self.parallel_attn_mlp && self.norm_placement != NormPlacement::Pre {
            return bad("a parallel attention + MLP block with output norms is not a known architecture".into());
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
