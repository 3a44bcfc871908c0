//! TransformerLens's cache conveniences, with the model's own norms: `run_with_cache`,
//! `accumulated_resid`, `decompose_resid`, `stack_head_results`, `apply_ln_to_stack`, and a logit
//! lens. They work for every family: LayerNorm or RMSNorm, Gemma's `(1 + w)` gains (already in
//! the weights), its final soft-cap, and models whose sublayer outputs pass a norm before the
//! residual (what `hook_attn_out` / `hook_mlp_out` hold is what joins the residual, so the
//! decomposition still adds up).
//!
//! ```no_run
//! # use ferrolens_model::*;
//! # fn f(model: &HookedTransformer, tokens: &Tensor) -> Result<()> {
//! let (logits, cache) = model.run_with_cache(tokens, "re:.*")?;            // [b,p,V], every hook
//! let (stack, labels) = model.decompose_resid(&cache, Some(tokens.dim(1)? - 1))?; // [n, b, D]
//! let scaled = model.apply_ln_to_stack(&cache, &stack, Some(tokens.dim(1)? - 1))?; // [n, b, D]
//! let lens = model.logit_lens(&cache, Some(tokens.dim(1)? - 1))?;           // [L+1, b, V]
//! # Ok(()) }
//! ```

use crate::cache::ActivationCache;
use crate::config::NormKind;
use crate::error::{Error, Result};
use crate::hook::HookPoint;
use crate::hooks::Hooks;
use crate::transformer::{linear, HookedTransformer};
use candle_core::{DType, IndexOp, Tensor, D};

impl HookedTransformer {
    /// Run and keep the activations `filter` matches (names, globs or `re:REGEX`; see
    /// [`crate::NameFilter`]): logits `[b,p,V]` and the cache (TL's `run_with_cache`).
    pub fn run_with_cache(&self, tokens: &Tensor, filter: &str) -> Result<(Tensor, ActivationCache)> {
        let hooks = self.hooks_matching(filter)?;
        let mut h = Hooks::new().cache_hooks(&hooks);
        let logits = self.run(tokens, &mut h)?;
        Ok((logits, h.take_cache()))
    }

    /// Stack parts from any layer on the home place (a split model's layers are elsewhere).
    fn gather(&self, parts: Vec<Tensor>) -> Result<Tensor> {
        let parts = parts.into_iter().map(|t| self.to_home(t)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&parts, 0)?)
    }

    /// `t` `[b,p,...]` at position `pos` (`[b,...]`), or unchanged.
    fn at_pos(t: &Tensor, pos: Option<usize>) -> Result<Tensor> {
        Ok(match pos {
            Some(p) => t.i((.., p))?,
            None => t.clone(),
        })
    }

    /// The residual stream before each block and after the last, `[L+1, b, (p,) D]`
    /// (TL's `accumulated_resid(incl_mid=False)`): `resid_pre(0..L)` then `resid_post(L-1)`; at
    /// one position with `pos`. Labels `0_pre` .. `final_post`. Needs those hooks in the cache.
    pub fn accumulated_resid(&self, cache: &ActivationCache, pos: Option<usize>) -> Result<(Tensor, Vec<String>)> {
        let n = self.cfg.n_layers;
        let mut parts = Vec::with_capacity(n + 1);
        let mut labels = Vec::with_capacity(n + 1);
        for l in 0..n {
            parts.push(Self::at_pos(cache.get(HookPoint::ResidPre(l))?, pos)?);
            labels.push(format!("{l}_pre"));
        }
        parts.push(Self::at_pos(cache.get(HookPoint::ResidPost(n - 1))?, pos)?);
        labels.push("final_post".into());
        Ok((self.gather(parts)?, labels))
    }

    /// The final residual split into what each part wrote (TL's `decompose_resid`):
    /// `hook_embed` (and `hook_pos_embed`), then every layer's `hook_attn_out` and
    /// `hook_mlp_out`; `[n, b, (p,) D]` with labels `embed`, `pos_embed`, `0_attn_out`,
    /// `0_mlp_out`, ... The parts add up to the last `resid_post` exactly.
    pub fn decompose_resid(&self, cache: &ActivationCache, pos: Option<usize>) -> Result<(Tensor, Vec<String>)> {
        let mut parts = vec![Self::at_pos(cache.get(HookPoint::Embed)?, pos)?];
        let mut labels = vec!["embed".to_string()];
        if self.hook_points().contains(&HookPoint::PosEmbed) {
            parts.push(Self::at_pos(cache.get(HookPoint::PosEmbed)?, pos)?);
            labels.push("pos_embed".into());
        }
        for l in 0..self.cfg.n_layers {
            parts.push(Self::at_pos(cache.get(HookPoint::AttnOut(l))?, pos)?);
            labels.push(format!("{l}_attn_out"));
            parts.push(Self::at_pos(cache.get(HookPoint::MlpOut(l))?, pos)?);
            labels.push(format!("{l}_mlp_out"));
        }
        Ok((self.gather(parts)?, labels))
    }

    /// Every head's output `hook_result` of the layers before `layer` (all layers with `None`)
    /// stacked as `[n_heads * layers, b, (p,) D]`, labels `L0H0`, ... (TL's
    /// `stack_head_results`). Run with `blocks.*.attn.hook_result` cached. For families whose
    /// attention output passes a norm (Gemma, OLMo-2) the heads' results add up to the attention
    /// output before that norm, not to `hook_attn_out`.
    pub fn stack_head_results(&self, cache: &ActivationCache, layer: Option<usize>, pos: Option<usize>) -> Result<(Tensor, Vec<String>)> {
        let upto = layer.unwrap_or(self.cfg.n_layers).min(self.cfg.n_layers);
        let mut parts = Vec::new();
        let mut labels = Vec::new();
        for l in 0..upto {
            let r = Self::at_pos(cache.get(HookPoint::Result(l))?, pos)?; // [b,(p,)h,D]
            let ax = r.rank() - 2;
            for h in 0..self.cfg.n_heads {
                parts.push(r.narrow(ax, h, 1)?.squeeze(ax)?);
                labels.push(format!("L{l}H{h}"));
            }
        }
        if parts.is_empty() {
            return Err(Error::Input("no layers before the requested one: nothing to stack".into()));
        }
        Ok((self.gather(parts)?, labels))
    }

    /// Put a stack of residual components `[n, b, (p,) D]` through the final norm with the scale
    /// cached at `ln_final.hook_scale` held fixed (TL's `apply_ln_to_stack`): LayerNorm centres
    /// each component, then everything is divided by the final residual's scale. The result is
    /// linear in the components, so their images add up to the normalised final residual. As in
    /// TL, the gain is not applied (TL folds it into `W_U`; here [`HookedTransformer::stack_to_logits`]
    /// applies it).
    pub fn apply_ln_to_stack(&self, cache: &ActivationCache, stack: &Tensor, pos: Option<usize>) -> Result<Tensor> {
        let scale = Self::at_pos(cache.get(HookPoint::LnFinalScale)?, pos)?; // [b,(p,)1]
        let x = match self.cfg.norm {
            NormKind::LayerNorm => stack.broadcast_sub(&stack.mean_keepdim(D::Minus1)?)?,
            NormKind::RmsNorm => stack.clone(),
        };
        Ok(x.broadcast_div(&scale.unsqueeze(0)?.to_device(x.device())?.to_dtype(x.dtype())?)?)
    }

    /// The logits a stack of components scaled by [`HookedTransformer::apply_ln_to_stack`]
    /// contributes: `stack * w_ln_final @ W_U`, `[n, b, (p,) V]` (no bias: the final norm's bias and
    /// `b_U` belong to no component; no soft-cap: it is not linear).
    pub fn stack_to_logits(&self, scaled: &Tensor) -> Result<Tensor> {
        let scaled = scaled.to_device(&self.head_place.device)?;
        let w = self.w.ln_final.w.to_dtype(scaled.dtype())?;
        let logits = linear(&scaled.broadcast_mul(&w)?, &self.w.unembed.to_dtype(scaled.dtype())?, None)?;
        Ok(logits.to_device(&self.device)?)
    }

    /// The logit lens (nostalgebraist 2020): every accumulated residual
    /// ([`HookedTransformer::accumulated_resid`]) read through the model's own final norm, computed
    /// afresh for each layer (LayerNorm or RMSNorm, its gain and bias), the unembedding and the
    /// final soft-cap: `[L+1, b, (p,) V]`. Its last row is the model's logits.
    pub fn logit_lens(&self, cache: &ActivationCache, pos: Option<usize>) -> Result<Tensor> {
        let (stack, _) = self.accumulated_resid(cache, pos)?;
        // f64 models stay f64; the rest norm in f32 (as the forward does).
        let x = stack.to_device(&self.head_place.device)?.to_dtype(if self.dtype() == DType::F64 { DType::F64 } else { DType::F32 })?;
        let xc = match self.cfg.norm {
            NormKind::LayerNorm => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
            NormKind::RmsNorm => x,
        };
        let scale = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.cfg.eps)?.sqrt()?;
        let nw = &self.w.ln_final;
        let mut y = xc.broadcast_div(&scale)?.broadcast_mul(&nw.w.to_dtype(xc.dtype())?)?;
        if let Some(b) = &nw.b {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        let bu = self.w.b_u.as_ref().map(|b| b.to_dtype(y.dtype())).transpose()?;
        let logits = linear(&y, &self.w.unembed.to_dtype(y.dtype())?, bu.as_ref())?;
        let logits = match self.cfg.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        };
        Ok(logits.to_device(&self.device)?)
    }
}
