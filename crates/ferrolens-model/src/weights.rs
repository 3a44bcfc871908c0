//! A model's weights in ferrolens's own layout: matrices `[in, out]` so that `x @ W` applies
//! them, q/k in Hugging Face's rotate-half order, fused checkpoint tensors (qkv, gate_up)
//! already split, and norm gains with the family's offset folded in (Gemma's `1 + w`).
//! The family files' weight tables ([`crate::arch`]) fill these; [`check_shapes`] checks them.
//!
//! [`crate::HookedTransformer::new`] then packs each block's `W_Q|W_K|W_V` and `W_gate|W_in`
//! into one matrix each and makes those fields views of it (same shapes and values, not
//! contiguous); see `Packed` below. Assigning a new tensor to such a field is supported.

use crate::config::{Config, Positional, QkNorm};
use crate::error::{Error, Result};
use candle_core::Tensor;

/// A normalisation layer's weights: `w` `[n]`, and `b` `[n]` for LayerNorm.
#[derive(Debug, Clone)]
pub struct NormWeights {
    /// Gain `[n]` (offset already added: the effective gain).
    pub w: Tensor,
    /// Bias `[n]` (LayerNorm only).
    pub b: Option<Tensor>,
}

/// Attention weights.
#[derive(Debug, Clone)]
pub struct AttnWeights {
    /// `[D, h*d]`.
    pub w_q: Tensor,
    /// `[h*d]`.
    pub b_q: Option<Tensor>,
    /// `[D, kv*d]`.
    pub w_k: Tensor,
    /// `[kv*d]`.
    pub b_k: Option<Tensor>,
    /// `[D, kv*d]`.
    pub w_v: Tensor,
    /// `[kv*d]`.
    pub b_v: Option<Tensor>,
    /// `[h*d, D]`.
    pub w_o: Tensor,
    /// `[D]`.
    pub b_o: Option<Tensor>,
    /// Query norm: gain `[d]` per head ([`QkNorm::PerHead`]) or `[h*d]` ([`QkNorm::Full`]).
    pub q_norm: Option<NormWeights>,
    /// Key norm: gain `[d]` or `[kv*d]`.
    pub k_norm: Option<NormWeights>,
}

/// MLP weights, `[in, out]`.
#[derive(Debug, Clone)]
pub struct MlpWeights {
    /// `[D, M]` (gated MLPs: the linear branch, `up_proj`).
    pub w_in: Tensor,
    /// `[M]`.
    pub b_in: Option<Tensor>,
    /// `[D, M]` (`gate_proj`), gated MLPs only.
    pub w_gate: Option<Tensor>,
    /// `[M]`, gated MLPs with biases only.
    pub b_gate: Option<Tensor>,
    /// `[M, D]`.
    pub w_out: Tensor,
    /// `[D]`.
    pub b_out: Option<Tensor>,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// Norm before attention (absent for output-norm-only blocks, OLMo-2).
    pub ln1: Option<NormWeights>,
    /// Attention.
    pub attn: AttnWeights,
    /// Norm on the attention output (Gemma-2/3 `post_attention_layernorm`, OLMo-2).
    pub ln1_post: Option<NormWeights>,
    /// Norm before the MLP (absent for OLMo-2).
    pub ln2: Option<NormWeights>,
    /// MLP.
    pub mlp: MlpWeights,
    /// Norm on the MLP output (Gemma-2/3 `post_feedforward_layernorm`, OLMo-2).
    pub ln2_post: Option<NormWeights>,
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embedding `W_E` `[V, D]` (unscaled; [`Config::embed_scale`] applies in the forward).
    pub embed: Tensor,
    /// Position embedding `W_pos` `[n_ctx, D]` (learned positions only).
    pub pos_embed: Option<Tensor>,
    /// Blocks.
    pub blocks: Vec<BlockWeights>,
    /// Final norm.
    pub ln_final: NormWeights,
    /// Unembedding `W_U` `[D, V]`.
    pub unembed: Tensor,
    /// Unembedding bias `[V]`.
    pub b_u: Option<Tensor>,
}

/// Check every tensor's shape against the config and the presence of every part the config's
/// flags need (norms for the placement, q/k norms, gate). Errors list the first mismatches.
pub fn check_shapes(cfg: &Config, w: &Weights) -> Result<()> {
    let mut errs: Vec<String> = Vec::new();
    let mut want = |name: String, t: &Tensor, shape: &[usize]| {
        if t.dims() != shape {
            errs.push(format!("{name}: file has {:?}, config implies {shape:?}", t.dims()));
        }
    };
    let (dm, h, kv, d, m, v) = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab);
    want("embed".into(), &w.embed, &[v, dm]);
    if let Some(p) = &w.pos_embed {
        want("pos_embed".into(), p, &[cfg.n_ctx, dm]);
    }
    want("ln_final.w".into(), &w.ln_final.w, &[dm]);
    for (l, b) in w.blocks.iter().enumerate() {
        let norm = |want: &mut dyn FnMut(String, &Tensor, &[usize]), n: &Option<NormWeights>, name: &str, len: usize| {
            if let Some(n) = n {
                want(format!("blocks.{l}.{name}.w"), &n.w, &[len]);
                if let Some(bias) = &n.b {
                    want(format!("blocks.{l}.{name}.b"), bias, &[len]);
                }
            }
        };
        norm(&mut want, &b.ln1, "ln1", dm);
        norm(&mut want, &b.ln2, "ln2", dm);
        norm(&mut want, &b.ln1_post, "ln1_post", dm);
        norm(&mut want, &b.ln2_post, "ln2_post", dm);
        let (qn, kn) = match cfg.qk_norm {
            Some(QkNorm::Full) => (h * d, kv * d),
            _ => (d, d),
        };
        norm(&mut want, &b.attn.q_norm, "attn.q_norm", qn);
        norm(&mut want, &b.attn.k_norm, "attn.k_norm", kn);
        want(format!("blocks.{l}.attn.W_Q"), &b.attn.w_q, &[dm, h * d]);
        want(format!("blocks.{l}.attn.W_K"), &b.attn.w_k, &[dm, kv * d]);
        want(format!("blocks.{l}.attn.W_V"), &b.attn.w_v, &[dm, kv * d]);
        want(format!("blocks.{l}.attn.W_O"), &b.attn.w_o, &[h * d, dm]);
        for (n, t, len) in [("b_Q", &b.attn.b_q, h * d), ("b_K", &b.attn.b_k, kv * d), ("b_V", &b.attn.b_v, kv * d), ("b_O", &b.attn.b_o, dm)] {
            if let Some(t) = t {
                want(format!("blocks.{l}.attn.{n}"), t, &[len]);
            }
        }
        want(format!("blocks.{l}.mlp.W_in"), &b.mlp.w_in, &[dm, m]);
        if let Some(g) = &b.mlp.w_gate {
            want(format!("blocks.{l}.mlp.W_gate"), g, &[dm, m]);
        }
        want(format!("blocks.{l}.mlp.W_out"), &b.mlp.w_out, &[m, dm]);
        for (n, t, len) in [("b_in", &b.mlp.b_in, m), ("b_gate", &b.mlp.b_gate, m), ("b_out", &b.mlp.b_out, dm)] {
            if let Some(t) = t {
                want(format!("blocks.{l}.mlp.{n}"), t, &[len]);
            }
        }
    }
    want("unembed".into(), &w.unembed, &[dm, v]);
    if let Some(b) = &w.b_u {
        want("b_U".into(), b, &[v]);
    }
    // Parts the flags need.
    if w.pos_embed.is_none() && cfg.positional == Positional::Learned {
        errs.push("learned positions need a position embedding, none was loaded".into());
    }
    if w.blocks.len() != cfg.n_layers {
        errs.push(format!("{} blocks loaded, config says n_layers = {}", w.blocks.len(), cfg.n_layers));
    }
    let pre = cfg.norm_placement.has_pre();
    let post = cfg.norm_placement.has_post();
    for (l, b) in w.blocks.iter().enumerate() {
        let mut need = |what: &str, present: bool, wanted: bool| {
            if present != wanted {
                errs.push(format!(
                    "block {l}: {what} is {} but the config {} it",
                    if present { "present" } else { "missing" },
                    if wanted { "needs" } else { "has no place for" }
                ));
            }
        };
        need("ln1", b.ln1.is_some(), pre);
        need("ln2", b.ln2.is_some(), pre);
        need("ln1_post", b.ln1_post.is_some(), post);
        need("ln2_post", b.ln2_post.is_some(), post);
        need("the query norm", b.attn.q_norm.is_some(), cfg.qk_norm.is_some());
        need("the key norm", b.attn.k_norm.is_some(), cfg.qk_norm.is_some());
        need("the MLP gate", b.mlp.w_gate.is_some(), cfg.gated_mlp);
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(Error::Weights(format!(
            "the weights do not match the config ({} mismatches): {}{}",
            errs.len(),
            errs.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
            if errs.len() > 5 { "; ..." } else { "" }
        )))
    }
}

/// Projections that read the same input, packed into one matrix: a block's `W_Q | W_K | W_V`
/// (`[D, (h + 2 kv) d]`) and `W_gate | W_in` (`[D, 2 M]`), so that the forward computes each
/// group with one product (one pass over the input, one GEMM launch on a GPU; the backward's
/// input gradient is one product too). The block's own fields become views of the packed
/// storage (no second copy of the weights), and [`Packed::get`] hands the packed matrix out only
/// while those fields still hold exactly these views: a field a user replaced after loading makes
/// the forward fall back to separate products for that group.
///
/// Storage: q/k/v on the CPU is row-major `[D, n]` and the fields are column views of it (the
/// gemm crate's fastest right operand for the forward: 5% off a SmolLM2 forward, measured against
/// column-major). Gate/up everywhere, and q/k/v on other devices and in strict layout mode
/// ([`crate::layout::strict`]), is stored as Hugging Face's `[n, D]`, so that the packed matrix
/// and the fields are transposed (column-major) views, which cuBLAS accepts; on the CPU that
/// costs the gate/up forward nothing measurable and makes its backward product (`dy · Wᵀ`, a
/// row-major right operand then) a third faster.
#[derive(Debug, Clone)]
pub(crate) struct Packed {
    /// The packed `[D, n]` matrix (a view when stored `[n, D]`).
    pub(crate) w: Tensor,
    /// The packed bias `[n]` (every part has one) or `None` (none has).
    pub(crate) b: Option<Tensor>,
    /// The ids of the field views, then of the biases, that this packing made.
    ids: Vec<Option<candle_core::TensorId>>,
}

impl Packed {
    /// Pack `parts` (`[D, n_i]` each, one device and dtype) with their biases `[n_i]`, row-major
    /// when `cpu_row_major` and on the CPU outside strict mode, else as `[n, D]`; `None` when only
    /// some parts have a bias (the group then stays unpacked). Returns the packing and the views
    /// to put back in the fields, in order.
    fn new(parts: &[&Tensor], biases: &[Option<&Tensor>], cpu_row_major: bool) -> Result<Option<(Packed, Vec<Tensor>)>> {
        let with_bias = biases.iter().filter(|b| b.is_some()).count();
        if with_bias != 0 && with_bias != biases.len() {
            return Ok(None);
        }
        let row_major = cpu_row_major && parts[0].device().is_cpu() && !crate::layout::strict();
        // The storage (`[D, n]`, or `[n, D]` read through transposes) and the axis of its parts.
        let (stored, axis) =
            if row_major { (Tensor::cat(parts, 1)?, 1) } else { (Tensor::cat(&parts.iter().map(|p| p.t()).collect::<candle_core::Result<Vec<_>>>()?, 0)?, 0) };
        let as_in_out = |t: Tensor| if row_major { Ok(t) } else { t.t() };
        let mut views = Vec::with_capacity(parts.len());
        let mut at = 0;
        for p in parts {
            let n = p.dim(1)?;
            views.push(as_in_out(stored.narrow(axis, at, n)?)?);
            at += n;
        }
        let w = as_in_out(stored)?;
        let b = if with_bias == 0 { None } else { Some(Tensor::cat(&biases.iter().map(|b| b.expect("every part has a bias")).collect::<Vec<_>>(), 0)?) };
        let mut ids: Vec<Option<candle_core::TensorId>> = views.iter().map(|v| Some(v.id())).collect();
        ids.extend(biases.iter().map(|b| b.map(|b| b.id())));
        Ok(Some((Packed { w, b, ids }, views)))
    }

    /// The packed matrix and bias while `fields` (the parts' current tensors, then their
    /// biases) are still the ones this packing made.
    pub(crate) fn get(&self, fields: &[Option<&Tensor>]) -> Option<(&Tensor, Option<&Tensor>)> {
        let same = fields.len() == self.ids.len() && fields.iter().zip(&self.ids).all(|(f, id)| f.map(|t| t.id()) == *id);
        same.then_some((&self.w, self.b.as_ref()))
    }
}

/// A block's packed projection groups (see [`Packed`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct PackedBlock {
    /// `W_Q | W_K | W_V` `[D, (h + 2 kv) d]`.
    pub(crate) qkv: Option<Packed>,
    /// `W_gate | W_in` `[D, 2 M]` (gated MLPs).
    pub(crate) gate_up: Option<Packed>,
}

impl PackedBlock {
    /// Pack block `b`'s groups, turning its fields into views of the packed storage.
    pub(crate) fn pack(b: &mut BlockWeights) -> Result<PackedBlock> {
        let a = &mut b.attn;
        let qkv = match Packed::new(&[&a.w_q, &a.w_k, &a.w_v], &[a.b_q.as_ref(), a.b_k.as_ref(), a.b_v.as_ref()], true)? {
            Some((p, v)) => {
                let [q, k, v]: [Tensor; 3] = v.try_into().expect("three views");
                (a.w_q, a.w_k, a.w_v) = (q, k, v);
                Some(p)
            }
            None => None,
        };
        let m = &mut b.mlp;
        let gate_up = match &m.w_gate {
            Some(g) => match Packed::new(&[g, &m.w_in], &[m.b_gate.as_ref(), m.b_in.as_ref()], false)? {
                Some((p, v)) => {
                    let [g, u]: [Tensor; 2] = v.try_into().expect("two views");
                    (m.w_gate, m.w_in) = (Some(g), u);
                    Some(p)
                }
                None => None,
            },
            None => None,
        };
        Ok(PackedBlock { qkv, gate_up })
    }

    /// The packed `W_Q | W_K | W_V` and its bias, while block `b`'s fields are its views.
    pub(crate) fn qkv<'a>(&'a self, b: &BlockWeights) -> Option<(&'a Tensor, Option<&'a Tensor>)> {
        let a = &b.attn;
        self.qkv.as_ref()?.get(&[Some(&a.w_q), Some(&a.w_k), Some(&a.w_v), a.b_q.as_ref(), a.b_k.as_ref(), a.b_v.as_ref()])
    }

    /// The packed `W_gate | W_in` and its bias, while block `b`'s fields are its views.
    pub(crate) fn gate_up<'a>(&'a self, b: &BlockWeights) -> Option<(&'a Tensor, Option<&'a Tensor>)> {
        let m = &b.mlp;
        self.gate_up.as_ref()?.get(&[m.w_gate.as_ref(), Some(&m.w_in), m.b_gate.as_ref(), m.b_in.as_ref()])
    }

    /// Whether block `b` still holds this packing's views (then re-packing is not needed).
    pub(crate) fn holds(&self, b: &BlockWeights) -> bool {
        let q = self.qkv.is_none() || self.qkv(b).is_some();
        let g = self.gate_up.is_none() || self.gate_up(b).is_some();
        q && g
    }
}
