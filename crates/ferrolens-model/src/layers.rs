//! The layer math of [`HookedTransformer`]: embedding, norms, rotary tables, the block (attention
//! and MLP by the [`crate::config::Config`] flags), unembedding, and the norm VJP/JVP that EAP and
//! AtP* reuse. The run entry points that drive it are in [`crate::transformer`].

use crate::config::{Activation, NormKind, Positional, QkNorm, RopeFreqs};
use crate::error::{Error, Result};
use crate::hook::HookPoint;
use crate::hooks::Hooks;
use crate::kv::KvCache;
use crate::transformer::{HookedTransformer, NormSite, Padding};
use crate::weights::NormWeights;
use candle_core::{DType, Device, Tensor, D};

impl HookedTransformer {
    /// Token (and learned position) embedding: tokens `[b,p]` to `resid_pre` of block 0 `[b,p,D]`.
    /// Families with [`crate::config::Config::embed_scale`] (Gemma) scale the token embedding before `hook_embed`.
    pub fn embed(&self, tokens: &Tensor, pos_offset: usize, hooks: &mut Hooks) -> Result<Tensor> {
        self.embed_at(tokens, pos_offset, None, hooks)
    }

    /// [`HookedTransformer::embed`] with per-row positions `[b,p]` (u32) for padded batches.
    pub(crate) fn embed_at(&self, tokens: &Tensor, pos_offset: usize, positions: Option<&Tensor>, hooks: &mut Hooks) -> Result<Tensor> {
        let (b, p) = tokens.dims2().map_err(|_| Error::Input(format!("tokens must be [batch, pos], got {:?}", tokens.dims())))?;
        self.check_len(p, pos_offset)?;
        let tokens = tokens.to_dtype(DType::U32)?;
        let max = tokens.max_keepdim(0)?.max_keepdim(1)?.flatten_all()?.to_vec1::<u32>()?[0];
        if max as usize >= self.cfg.d_vocab {
            return Err(Error::Input(format!("token id {max} is outside the vocabulary (size {})", self.cfg.d_vocab)));
        }
        let d = self.cfg.d_model;
        let mut e = self.w.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, p, d))?;
        if let Some(s) = self.cfg.embed_scale {
            // transformers multiplies by the scale rounded to the weights' dtype.
            let s = Tensor::new(s as f32, &self.device)?.to_dtype(self.dtype)?;
            e = e.broadcast_mul(&s)?;
        }
        let e = hooks.at(HookPoint::Embed, e)?;
        match &self.w.pos_embed {
            Some(wp) => {
                let pe = match positions {
                    Some(pos) => wp.index_select(&pos.flatten_all()?, 0)?.reshape((b, p, d))?,
                    None => wp.narrow(0, pos_offset, p)?.unsqueeze(0)?.broadcast_as((b, p, d))?.contiguous()?,
                };
                let pe = hooks.at(HookPoint::PosEmbed, pe)?;
                Ok((e + pe)?)
            }
            None => Ok(e),
        }
    }

    pub(crate) fn norm_weights(&self, site: NormSite) -> Option<&NormWeights> {
        match site {
            NormSite::Ln1(l) => self.w.blocks[l].ln1.as_ref(),
            NormSite::Ln2(l) => self.w.blocks[l].ln2.as_ref(),
            NormSite::Ln1Post(l) => self.w.blocks[l].ln1_post.as_ref(),
            NormSite::Ln2Post(l) => self.w.blocks[l].ln2_post.as_ref(),
            NormSite::Final => Some(&self.w.ln_final),
        }
    }

    /// The norm over the last axis with its hooks. LayerNorm's `hook_normalized` is after the
    /// gain and bias, RMSNorm's before the gain (as in TL). The LN-rule holds the scale constant.
    pub(crate) fn norm(&self, x: &Tensor, nw: &NormWeights, scale_hook: HookPoint, norm_hook: HookPoint, hooks: &mut Hooks) -> Result<Tensor> {
        let eps = self.cfg.eps;
        // bf16/f16 models normalise in f32 (the scale and normalized hooks then see f32).
        let dtype = x.dtype();
        let x = &widen(x)?;
        let wide = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(x.dtype())?) };
        match self.cfg.norm {
            NormKind::LayerNorm => {
                // One pass with its own backward (CPU, f32/f64) when neither hook is wanted.
                if crate::fused::fused_elementwise_fits(x)
                    && !hooks.wants(scale_hook)
                    && !hooks.wants(norm_hook)
                    && !nw.w.track_op()
                    && !nw.b.as_ref().is_some_and(Tensor::track_op)
                {
                    let b = nw.b.as_ref().map(wide).transpose()?;
                    return Ok(crate::fused::layer_norm(x, &wide(&nw.w)?, b.as_ref(), eps, hooks.lrp.ln)?.to_dtype(dtype)?);
                }
                let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let scale = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
                let scale = hooks.at(scale_hook, scale)?;
                let scale = if hooks.lrp.ln { scale.detach() } else { scale };
                let mut y = xc.broadcast_div(&scale)?.broadcast_mul(&wide(&nw.w)?)?;
                if let Some(b) = &nw.b {
                    y = y.broadcast_add(&wide(b)?)?;
                }
                Ok(hooks.at(norm_hook, y)?.to_dtype(dtype)?)
            }
            NormKind::RmsNorm => self.rms(x, &nw.w, &[D::Minus1], scale_hook, norm_hook, hooks)?.to_dtype(dtype).map_err(Into::into),
        }
    }

    /// RMSNorm of `x` (already widened) over `axes` (the last one or two), gain `w` broadcast
    /// over them; `hook_scale` keeps those axes as 1s, `hook_normalized` is `x / scale`.
    ///
    /// No-gradient fast path: when no gradient flows through `x` and neither hook is wanted,
    /// one-axis f32/bf16/f16 norms (candle's kernel has no f64) run candle's fused `rms_norm`
    /// (same formula; the mean of squares is a sum divided once rather than multiplied by `1/n`,
    /// so values can differ in the last bit). Otherwise, on the CPU in f32/f64 without those
    /// hooks, [`crate::fused::rms_norm`] (one pass, with its own backward; the LN rule holds its scale).
    pub(crate) fn rms(&self, x: &Tensor, w: &Tensor, axes: &[D], scale_hook: HookPoint, norm_hook: HookPoint, hooks: &mut Hooks) -> Result<Tensor> {
        if axes == [D::Minus1] && x.dtype() != DType::F64 && !x.track_op() && !hooks.wants(scale_hook) && !hooks.wants(norm_hook) && w.rank() == 1 {
            return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &w.to_dtype(x.dtype())?.contiguous()?, self.cfg.eps as f32)?);
        }
        if axes == [D::Minus1]
            && crate::fused::fused_elementwise_fits(x)
            && !hooks.wants(scale_hook)
            && !hooks.wants(norm_hook)
            && w.rank() == 1
            && !w.track_op()
        {
            return crate::fused::rms_norm(x, &w.to_dtype(x.dtype())?, self.cfg.eps, hooks.lrp.ln);
        }
        let mut ms = x.sqr()?;
        for ax in axes {
            ms = ms.mean_keepdim(*ax)?;
        }
        let scale = (ms + self.cfg.eps)?.sqrt()?;
        let scale = hooks.at(scale_hook, scale)?;
        let scale = if hooks.lrp.ln { scale.detach() } else { scale };
        let n = hooks.at(norm_hook, x.broadcast_div(&scale)?)?;
        Ok(n.broadcast_mul(&w.to_dtype(x.dtype())?)?)
    }

    /// The `dim/2`-wide cos and sin tables `[p, dim/2]` of the positions `offset..offset+p`
    /// (padded batches: `[b, p, dim/2]` of each row's own positions), one pair per distinct set
    /// of frequencies (global, local), in the model's dtype.
    pub(crate) fn rope_tables(&self, offset: usize, p: usize, pad: Option<&Padding>) -> Result<Vec<(RopeFreqs, Tensor, Tensor)>> {
        let Positional::Rotary { dim, global, local } = &self.cfg.positional else {
            return Ok(vec![]);
        };
        let (from, n) = match pad {
            Some(pd) => (0, pd.max_pos),
            None => (offset, p),
        };
        let mut out = Vec::new();
        for f in std::iter::once(global).chain(local.iter()) {
            let inv = f.inv_freq(*dim);
            let half = inv.len();
            let mut cos = Vec::with_capacity(n * half);
            let mut sin = Vec::with_capacity(n * half);
            for pos in from..from + n {
                for fr in &inv {
                    // As transformers: angles in f32 (positions and inverse frequencies f32).
                    let a = (pos as f32) * fr;
                    cos.push((a as f64).cos() as f32);
                    sin.push((a as f64).sin() as f32);
                }
            }
            let mut cos = Tensor::from_vec(cos, (n, half), &self.device)?.to_dtype(self.dtype)?;
            let mut sin = Tensor::from_vec(sin, (n, half), &self.device)?.to_dtype(self.dtype)?;
            if let Some(pd) = pad {
                let (b, p) = pd.pos.dims2()?;
                let idx = pd.pos.flatten_all()?;
                cos = cos.index_select(&idx, 0)?.reshape((b, p, half))?;
                sin = sin.index_select(&idx, 0)?.reshape((b, p, half))?;
            }
            out.push((*f, cos, sin));
        }
        Ok(out)
    }

    /// Rotate-half rotary on the first `dim` features of `x` `[b,p,n,d]`, with tables `[p,half]`
    /// or (padded batches) `[b,p,half]`.
    pub(crate) fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if crate::fused::fused_elementwise_fits(x) {
            return crate::fused::rotate_half(x, cos, sin);
        }
        let (_b, _p, _n, d) = x.dims4()?;
        let half = cos.dim(D::Minus1)?;
        let dim = 2 * half;
        let axis = cos.rank() - 1;
        let cos = cos.unsqueeze(axis)?; // [p,1,half] or [b,p,1,half]
        let sin = sin.unsqueeze(axis)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        if dim < d {
            let rest = x.narrow(D::Minus1, dim, d - dim)?;
            Ok(Tensor::cat(&[r1, r2, rest], D::Minus1)?)
        } else {
            Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
        }
    }

    /// Block `l` on the residual `[b,p,D]`. With `last_only` (the last layer of a run that reads
    /// the last position's logits only, no hook at this layer) the keys and values cover every
    /// position but the query, output projection and MLP run on the last position only, and the
    /// block returns `[b,1,D]`: what the unembedding reads, with none of the other positions' work.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block(
        &self,
        l: usize,
        resid: Tensor,
        rope: &[(RopeFreqs, Tensor, Tensor)],
        pad: Option<&Padding>,
        kv: Option<&mut KvCache>,
        last_only: bool,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        use HookPoint::*;
        let bw = &self.w.blocks[l];
        let resid_pre = hooks.at(ResidPre(l), resid)?;
        let attn_in = hooks.at(AttnIn(l), resid_pre.clone())?;
        let x = match &bw.ln1 {
            Some(n) => self.norm(&attn_in, n, Ln1Scale(l), Ln1Normalized(l), hooks)?,
            None => attn_in,
        };
        let mut attn_out = self.attention(l, &x, rope, pad, kv, last_only, hooks)?;
        let resid_pre = if last_only {
            let p = resid_pre.dim(1)?;
            resid_pre.narrow(1, p - 1, 1)?
        } else {
            resid_pre
        };
        if let Some(n) = &bw.ln1_post {
            attn_out = self.norm(&attn_out, n, Ln1PostScale(l), Ln1PostNormalized(l), hooks)?;
        }
        let attn_out = hooks.at(AttnOut(l), attn_out)?;
        let (skip, mlp_in) = if self.cfg.parallel_attn_mlp {
            (resid_pre.clone(), hooks.at(MlpIn(l), resid_pre)?)
        } else {
            let resid_mid = hooks.at(ResidMid(l), (resid_pre + &attn_out)?)?;
            (resid_mid.clone(), hooks.at(MlpIn(l), resid_mid)?)
        };
        let x = match &bw.ln2 {
            Some(n) => self.norm(&mlp_in, n, Ln2Scale(l), Ln2Normalized(l), hooks)?,
            None => mlp_in,
        };
        let mut mlp_out = self.mlp(l, &x, hooks)?;
        if let Some(n) = &bw.ln2_post {
            mlp_out = self.norm(&mlp_out, n, Ln2PostScale(l), Ln2PostNormalized(l), hooks)?;
        }
        let mlp_out = hooks.at(MlpOut(l), mlp_out)?;
        let resid_post = if self.cfg.parallel_attn_mlp { ((skip + attn_out)? + mlp_out)? } else { (skip + mlp_out)? };
        hooks.at(ResidPost(l), resid_post)
    }

    /// q or k `[b,p,n,d]` through its norm (per head, or over the whole projection).
    pub(crate) fn qk_norm(&self, x: Tensor, w: &NormWeights, scale_hook: HookPoint, norm_hook: HookPoint, hooks: &mut Hooks) -> Result<Tensor> {
        let dtype = x.dtype();
        let xw = widen(&x)?;
        let (_, _, n, d) = xw.dims4()?;
        let y = match self.cfg.qk_norm {
            Some(QkNorm::Full) => self.rms(&xw, &w.w.reshape((n, d))?, &[D::Minus1, D::Minus2], scale_hook, norm_hook, hooks)?,
            _ => self.rms(&xw, &w.w, &[D::Minus1], scale_hook, norm_hook, hooks)?,
        };
        Ok(y.to_dtype(dtype)?)
    }

    /// Attention scores of layer `l` before the mask: `q . k * attn_scale`, soft-capped where
    /// the family caps them. `q` `[b,h,q,d]`, `k` `[b,h,k,d]` (KV heads already repeated) to
    /// `[b,h,q,k]`. Methods that recompute a pattern (AtP*'s QK fix) call this.
    pub fn attn_scores(&self, _l: usize, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let kt = k.transpose(2, 3)?.contiguous()?;
        let scores = (crate::layout::matmul(&q.contiguous()?, &kt)? * self.cfg.attn_scale)?;
        Ok(match self.cfg.attn_softcap {
            Some(c) => ((scores / c)?.tanh()? * c)?,
            None => scores,
        })
    }

    /// Which keys each query of layer `l` may see, `[q, k]` u8 (1 = allowed), for `q` queries at
    /// the end of `k` keys: causal, and within the layer's sliding window. `None` when every key
    /// is allowed (one query, no window reaching it).
    pub fn attn_mask(&self, l: usize, q: usize, k: usize) -> Result<Option<Tensor>> {
        let window = self.cfg.window(l);
        let off = k - q;
        if q == 1 && window.is_none_or(|w| w >= k) {
            return Ok(None);
        }
        let allowed = |i: usize, j: usize| j <= i + off && window.is_none_or(|w| i + off - j < w);
        let mask: Vec<u8> = (0..q).flat_map(|i| (0..k).map(move |j| u8::from(allowed(i, j)))).collect();
        Ok(Some(Tensor::from_vec(mask, (q, k), self.layer_device(l))?))
    }

    /// [`HookedTransformer::attn_mask`] of a padded batch: `keys` `[b, k]` marks real tokens
    /// (1); a real query sees the real keys its layer allows, a padding query sees itself only.
    /// `[b, 1, q, k]` u8.
    pub fn attn_mask_padded(&self, l: usize, q: usize, keys: &Tensor) -> Result<Tensor> {
        let rows: Vec<Vec<u8>> = keys.to_dtype(DType::U8)?.to_device(&Device::Cpu)?.to_vec2()?;
        let rows: Vec<Vec<bool>> = rows.iter().map(|r| r.iter().map(|&x| x != 0).collect()).collect();
        self.mask_rows(l, q, &rows)
    }

    pub(crate) fn mask_rows(&self, l: usize, q: usize, keys: &[Vec<bool>]) -> Result<Tensor> {
        let b = keys.len();
        let k = keys.first().map(|r| r.len()).unwrap_or(0);
        let window = self.cfg.window(l);
        let off = k - q;
        let mut m = Vec::with_capacity(b * q * k);
        for r in keys {
            for i in 0..q {
                let qi = i + off;
                for j in 0..k {
                    let ok = if r[qi] { r[j] && j <= qi && window.is_none_or(|w| qi - j < w) } else { j == qi };
                    m.push(u8::from(ok));
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, q, k), self.layer_device(l))?)
    }

    /// Attention of layer `l` on `x` `[b,p,D]` (normalized); `[b,p,D]` out, or `[b,1,D]` (the
    /// last query only, keys and values of every position) with `last_only`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        l: usize,
        x: &Tensor,
        rope: &[(RopeFreqs, Tensor, Tensor)],
        pad: Option<&Padding>,
        mut kv: Option<&mut KvCache>,
        last_only: bool,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        use HookPoint::*;
        let cfg = &self.cfg;
        let aw = &self.w.blocks[l].attn;
        let (b, p, _) = x.dims3()?;
        let (h, kvh, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
        // Queries: every position, or the last one only.
        let (xq, pq) = if last_only { (x.narrow(1, p - 1, 1)?, 1) } else { (x.clone(), p) };
        let packed = self.packed[l].qkv(&self.w.blocks[l]);
        // The packed path (CPU): one product for q, k and v, the q/k norms and the rotary
        // embedding of the query and key heads inside the packed tensor, and the fused attention
        // reading all three from it, whose backward writes the packed gradient (no slices, no
        // copies). Where nothing looks at q, k, v, their norms or the pattern apart, without a KV
        // cache.
        if let Some((w, bias)) = packed {
            let points = [Q(l), K(l), V(l), QNormScale(l), QNormNormalized(l), KNormScale(l), KNormNormalized(l), RotQ(l), RotK(l), AttnScores(l), Pattern(l)];
            let quiet = !points.into_iter().any(|hp| hooks.wants(hp)) && hooks.uniform_heads(l).is_none();
            let norms_paired = aw.q_norm.is_some() == aw.k_norm.is_some();
            if quiet && norms_paired && kv.is_none() && !last_only && crate::fused::fused_elementwise_fits(x) && kvh > 0 && h % kvh == 0 {
                let y = linear(x, w, bias)?.reshape((b, p, h + 2 * kvh, d))?;
                let y = match (&aw.q_norm, &aw.k_norm) {
                    (Some(qn), Some(kn)) => {
                        let (wq, wk) = (qn.w.to_dtype(y.dtype())?, kn.w.to_dtype(y.dtype())?);
                        crate::fused::rms_norm_qk_packed(&y, (h, kvh), &wq, &wk, cfg.eps, hooks.lrp.ln)?
                    }
                    _ => y,
                };
                let y = match cfg.rope_freqs(l) {
                    Some(f) => {
                        let (_, cos, sin) = rope.iter().find(|(g, _, _)| *g == f).expect("tables for every layer's frequencies");
                        crate::fused::rotate_half_heads(&y, cos, sin, h + kvh)?
                    }
                    None => y,
                };
                let mask = match pad {
                    Some(pd) => Some(self.mask_rows(l, p, &pd.keys)?),
                    None => self.attn_mask(l, p, p)?,
                };
                let z = crate::fused::prefill_attention_packed(&y, (h, kvh), mask.as_ref(), cfg.attn_scale, cfg.attn_softcap, hooks.lrp.attn)?;
                return self.attn_output(l, z, hooks);
            }
        }
        // Else one product for q, k and v when packed (the last query alone: q on its own, k and
        // v together), or one each. Not when gradients flow back through the projections:
        // candle's backward of each slice of the packed product pads its gradient to the packed
        // width and adds the three up, which costs more than the one product saves.
        let packed = if x.track_op() { None } else { packed };
        let (q, k, v) = match packed {
            Some((w, bias)) => {
                let (qn, kn) = (h * d, kvh * d);
                let (y, q) = if last_only {
                    let kv_bias = bias.map(|bi| bi.narrow(0, qn, 2 * kn)).transpose()?;
                    (linear(x, &w.narrow(1, qn, 2 * kn)?, kv_bias.as_ref())?, linear(&xq, &aw.w_q, aw.b_q.as_ref())?)
                } else {
                    let y = linear(x, w, bias)?;
                    let q = y.narrow(2, 0, qn)?;
                    (y.narrow(2, qn, 2 * kn)?, q)
                };
                (q.reshape((b, pq, h, d))?, y.narrow(2, 0, kn)?.reshape((b, p, kvh, d))?, y.narrow(2, kn, kn)?.reshape((b, p, kvh, d))?)
            }
            None => (
                linear(&xq, &aw.w_q, aw.b_q.as_ref())?.reshape((b, pq, h, d))?,
                linear(x, &aw.w_k, aw.b_k.as_ref())?.reshape((b, p, kvh, d))?,
                linear(x, &aw.w_v, aw.b_v.as_ref())?.reshape((b, p, kvh, d))?,
            ),
        };
        let q = hooks.at(Q(l), q)?;
        let k = hooks.at(K(l), k)?;
        let v = hooks.at(V(l), v)?;
        let q = match &aw.q_norm {
            Some(n) => self.qk_norm(q, n, QNormScale(l), QNormNormalized(l), hooks)?,
            None => q,
        };
        let k = match &aw.k_norm {
            Some(n) => self.qk_norm(k, n, KNormScale(l), KNormNormalized(l), hooks)?,
            None => k,
        };
        let (q, k) = match cfg.rope_freqs(l) {
            Some(f) => {
                let (_, cos, sin) = rope.iter().find(|(g, _, _)| *g == f).expect("tables for every layer's frequencies");
                let q = if last_only {
                    let axis = cos.rank() - 2; // the position axis of [p,half] or [b,p,half]
                    self.rotate(&q, &cos.narrow(axis, p - 1, 1)?, &sin.narrow(axis, p - 1, 1)?)?
                } else {
                    self.rotate(&q, cos, sin)?
                };
                let q = hooks.at(RotQ(l), q)?;
                let k = hooks.at(RotK(l), self.rotate(&k, cos, sin)?)?;
                (q, k)
            }
            None => (q, k),
        };
        let (k, v) = match kv.as_deref_mut() {
            Some(cache) => cache.append(l, k, v)?,
            None => (k, v),
        };
        let fused = match kv.as_deref() {
            Some(cache) => {
                cache.uses_fused()
                    && p == 1
                    && q.dtype() == DType::F32
                    && h <= 64
                    && d <= 256
                    && cfg.attn_softcap.is_none()
                    && pad.is_none()
                    && !hooks.wants(AttnScores(l))
                    && !hooks.wants(Pattern(l))
                    && hooks.grad_point_set().is_empty()
            }
            None => false,
        };
        if fused {
            // One decode step: scores, softmax, argmax and the weighted sum in one op; a sliding
            // window is the last `w` keys.
            let t = k.dim(1)?;
            let start = cfg.window(l).map(|w| t.saturating_sub(w)).unwrap_or(0);
            let (kk, vv) = if start > 0 { (k.narrow(1, start, t - start)?.contiguous()?, v.narrow(1, start, t - start)?.contiguous()?) } else { (k, v) };
            let uniform = hooks.uniform_heads(l).unwrap_or(&[]).to_vec();
            let (z, arg) = crate::fused::decode_attention(&q.squeeze(1)?, &kk, &vv, cfg.attn_scale, &uniform)?;
            if let Some(cache) = kv.as_deref_mut() {
                if cache.tracks_argmax() {
                    let arg = if start > 0 { (arg + start as f64)? } else { arg };
                    cache.set_argmax(l, arg);
                }
            }
            let z = z.unsqueeze(1)?; // [b,1,h,d]
            return self.attn_output(l, z, hooks);
        }
        // No hook on the scores or pattern: the CPU's fused attention (no transposed copies, no
        // repeated KV heads, no [b,h,q,k] tensors), with its own backward when gradients flow.
        let watched = hooks.wants(AttnScores(l)) || hooks.wants(Pattern(l)) || hooks.uniform_heads(l).is_some();
        let argmax = kv.as_deref().is_some_and(|c| c.tracks_argmax());
        let fused_prefill = crate::fused::prefill_attention_fits(&q, &k) && !watched && !argmax;
        if fused_prefill {
            let t = k.dim(1)?;
            let mask = match pad {
                Some(pd) => Some(self.mask_rows(l, pq, &pd.keys)?),
                None => self.attn_mask(l, pq, t)?,
            };
            let z = crate::fused::prefill_attention(&q, &k, &v, mask.as_ref(), cfg.attn_scale, cfg.attn_softcap, hooks.lrp.attn)?;
            return self.attn_output(l, z, hooks);
        }
        let k = repeat_kv(&k, cfg.kv_repeat())?;
        let v = repeat_kv(&v, cfg.kv_repeat())?;
        let qt = q.transpose(1, 2)?.contiguous()?; // [b,h,p,d]
        let kt = k.transpose(1, 2)?.contiguous()?; // [b,h,T,d]
        let vt = v.transpose(1, 2)?.contiguous()?; // [b,h,T,d]
        let scores = self.attn_scores(l, &qt, &kt)?;
        let scores = match hooks.uniform_heads(l) {
            Some(heads) => {
                let keep: Vec<f32> = (0..h).map(|i| if heads.contains(&i) { 0.0 } else { 1.0 }).collect();
                let keep = Tensor::from_vec(keep, (1, h, 1, 1), scores.device())?.to_dtype(scores.dtype())?;
                scores.broadcast_mul(&keep)?
            }
            None => scores,
        };
        let t = kt.dim(2)?;
        let mask = match pad {
            Some(pd) => Some(self.mask_rows(l, pq, &pd.keys)?),
            None => self.attn_mask(l, pq, t)?,
        };
        let scores = match mask {
            Some(mask) => {
                let mask = mask.broadcast_as(scores.shape())?;
                let neg = Tensor::new(f32::NEG_INFINITY, scores.device())?.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?;
                mask.where_cond(&scores, &neg)?
            }
            None => scores,
        };
        let scores = hooks.at(AttnScores(l), scores)?;
        if let Some(cache) = kv {
            if cache.tracks_argmax() {
                // Argmax of the last query over keys: the pattern's argmax (softmax is monotone).
                let last = scores.narrow(2, pq - 1, 1)?.squeeze(2)?; // [b,h,T]
                cache.set_argmax(l, last.argmax(D::Minus1)?);
            }
        }
        // Softmax in f32 for bf16/f16 models; candle's fused kernel when no gradient flows
        // (same max-subtracted exponentials and sum).
        let wide = widen(&scores)?;
        let pattern = if wide.track_op() { candle_nn::ops::softmax(&wide, D::Minus1)? } else { candle_nn::ops::softmax_last_dim(&wide.contiguous()?)? };
        let pattern = pattern.to_dtype(scores.dtype())?;
        // AH-rule: the weights are constants for the backward pass (detached before the hook, so
        // the gradient at hook_pattern itself is still available).
        let pattern = if hooks.lrp.attn { pattern.detach() } else { pattern };
        let pattern = hooks.at(Pattern(l), pattern)?;
        let z = crate::layout::matmul(&pattern, &vt)?.transpose(1, 2)?.contiguous()?; // [b,p,h,d]
        self.attn_output(l, z, hooks)
    }

    /// `hook_z` `[b,p,h,d]`, then (optionally `hook_result`) the output projection to `[b,p,D]`.
    pub(crate) fn attn_output(&self, l: usize, z: Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let cfg = &self.cfg;
        let aw = &self.w.blocks[l].attn;
        let (b, p, h, d) = z.dims4()?;
        let z = hooks.at(HookPoint::Z(l), z)?;
        if hooks.wants(HookPoint::Result(l)) {
            // result[b,p,h,:] = z[b,p,h,:] @ W_O[h]   -> [b,p,h,D]
            let wo = aw.w_o.reshape((h, d, cfg.d_model))?;
            let zt = z.transpose(1, 2)?.contiguous()?; // [b,h,p,d]
            let r = crate::layout::broadcast_matmul(&zt, &wo.unsqueeze(0)?)?.transpose(1, 2)?.contiguous()?; // [b,p,h,D]
            let r = hooks.at(HookPoint::Result(l), r)?;
            let mut out = r.sum(2)?;
            if let Some(bo) = &aw.b_o {
                out = out.broadcast_add(bo)?;
            }
            Ok(out)
        } else {
            linear(&z.reshape((b, p, h * d))?, &aw.w_o, aw.b_o.as_ref())
        }
    }

    pub(crate) fn act(&self, x: &Tensor, identity_rule: bool) -> Result<Tensor> {
        let f = |x: &Tensor| -> Result<Tensor> {
            Ok(match self.cfg.act {
                // Written out: candle's fused gelu backward rounds its constants to 6 digits.
                Activation::GeluNew => {
                    let c = (2.0f64 / std::f64::consts::PI).sqrt();
                    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?.tanh()?;
                    ((x * 0.5)? * (inner + 1.0)?)?
                }
                // Written out too: candle's gelu_erf backward rounds 1/sqrt(2 pi) to 0.398942.
                Activation::Gelu => ((x * 0.5)? * ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?)?,
                Activation::Silu => x.silu()?,
            })
        };
        identity_rule_apply(x, identity_rule, f)
    }

    pub(crate) fn mlp(&self, l: usize, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let mw = &self.w.blocks[l].mlp;
        let post = match &mw.w_gate {
            Some(wg) => {
                let gate = crate::fused::MlpAct::of(self.cfg.act);
                let watched = hooks.wants(HookPoint::MlpPre(l)) || hooks.wants(HookPoint::MlpPreLinear(l));
                let rules = (hooks.lrp.identity, hooks.lrp.half);
                // Gate and up in one product, straight into the packed fused op (RelP's identity
                // and half rules included; its backward writes the packed gradient), when the
                // block's projections are packed and no hook looks at the two apart. Else one
                // product each (over the packed matrix's column-major views: as fast as separate
                // matrices, and no copies of the halves of a packed product).
                let prod = match (self.packed[l].gate_up(&self.w.blocks[l]), gate) {
                    (Some((w, bias)), Some(act)) if !watched && crate::fused::fused_elementwise_fits(x) => {
                        crate::fused::act_mul_packed(act, &linear(x, w, bias)?, rules)?
                    }
                    _ => {
                        let pre = hooks.at(HookPoint::MlpPre(l), linear(x, wg, mw.b_gate.as_ref())?)?;
                        let lin = hooks.at(HookPoint::MlpPreLinear(l), linear(x, &mw.w_in, mw.b_in.as_ref())?)?;
                        // One pass for act(gate) * up (and its own backward) unless RelP's
                        // identity rule rewrites the activation.
                        let fused =
                            gate.filter(|_| !hooks.lrp.identity && crate::fused::fused_elementwise_fits(&pre) && crate::fused::fused_elementwise_fits(&lin));
                        let prod = match fused {
                            Some(act) => crate::fused::act_mul(act, &pre, &lin)?,
                            None => (self.act(&pre, hooks.lrp.identity)? * lin)?,
                        };
                        if hooks.lrp.half {
                            let half = (prod * 0.5)?;
                            (&half + half.detach())?
                        } else {
                            prod
                        }
                    }
                };
                hooks.at(HookPoint::MlpPost(l), prod)?
            }
            None => {
                let pre = hooks.at(HookPoint::MlpPre(l), linear(x, &mw.w_in, mw.b_in.as_ref())?)?;
                // One pass and its own backward (RelP's identity rule included).
                let post = match crate::fused::MlpAct::of(self.cfg.act).filter(|_| crate::fused::fused_elementwise_fits(&pre)) {
                    Some(act) => crate::fused::act(act, &pre, hooks.lrp.identity)?,
                    None => self.act(&pre, hooks.lrp.identity)?,
                };
                hooks.at(HookPoint::MlpPost(l), post)?
            }
        };
        linear(&post, &mw.w_out, mw.b_out.as_ref())
    }

    /// The final norm and the unembedding (and final soft-cap): `[b,p,D]` to logits `[b,p,V]`;
    /// with `columns` (u32 ids `[k]`), onto those vocabulary columns only, logits `[b,p,k]`
    /// (see [`crate::RunSpan::columns`]).
    pub(crate) fn unembed(&self, resid: Tensor, columns: Option<&Tensor>, hooks: &mut Hooks) -> Result<Tensor> {
        let resid = self.head_place.take(resid)?;
        let x = self.norm(&resid, &self.w.ln_final, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized, hooks)?;
        let logits = match columns {
            None => linear(&x, &self.w.unembed, self.w.b_u.as_ref())?,
            Some(c) => {
                let v = self.cfg.d_vocab;
                let host = c.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
                if let Some(bad) = host.iter().find(|&&i| i as usize >= v) {
                    return Err(Error::Input(format!("logit column {bad} is outside the vocabulary ({v} tokens)")));
                }
                let ids = Tensor::new(host.as_slice(), self.w.unembed.device())?;
                // CUDA's index_select wants a contiguous source: pick rows of W_Uᵀ when W_U is a
                // transposed view (an untied `lm_head` kept as loaded).
                let wu = &self.w.unembed;
                let w = if !wu.is_contiguous() && wu.t()?.is_contiguous() {
                    wu.t()?.index_select(&ids, 0)?.t()?
                } else {
                    wu.contiguous()?.index_select(&ids, 1)?
                };
                let b = self.w.b_u.as_ref().map(|b| b.index_select(&ids, 0)).transpose()?;
                linear(&x, &w, b.as_ref())?
            }
        };
        match self.cfg.final_softcap {
            // Soft-capping is elementwise: RelP's identity rule treats it as an activation.
            Some(c) => identity_rule_apply(&logits, hooks.lrp.identity, |x| Ok(((x / c)?.tanh()? * c)?)),
            None => Ok(logits),
        }
    }

    /// The hook point whose activation is the input of norm `site` (`None` for a model without
    /// that norm): `hook_attn_in` / `hook_mlp_in` for the pre-norms, the last `hook_resid_post`
    /// for the final norm. Post-norm inputs have no hook (compute them from `hook_result` or
    /// the MLP).
    pub fn norm_input_hook(&self, site: NormSite) -> Option<HookPoint> {
        self.norm_weights(site)?;
        match site {
            NormSite::Ln1(l) => Some(HookPoint::AttnIn(l)),
            NormSite::Ln2(l) => Some(HookPoint::MlpIn(l)),
            NormSite::Final => Some(HookPoint::ResidPost(self.cfg.n_layers - 1)),
            NormSite::Ln1Post(_) | NormSite::Ln2Post(_) => None,
        }
    }

    /// Norm `site` applied to `x` `[.., D]` (any leading axes), exactly as the forward applies
    /// it but without hooks; `x` itself when the model has no such norm. Edge patching calls this
    /// to rebuild one head's query/key/value input or a post-norm block output.
    pub fn apply_norm(&self, site: NormSite, x: &Tensor) -> Result<Tensor> {
        let Some(nw) = self.norm_weights(site) else {
            return Ok(x.clone());
        };
        let mut none = Hooks::new();
        let x = &crate::pipeline::Place::of(&nw.w).take(x.clone())?;
        self.norm(x, nw, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized, &mut none)
    }

    /// The vector-Jacobian product of norm `site` at input `x` `[.., D]`: the gradient at the
    /// norm's input given the gradient `g_out` at its output (after the gain and bias), in f64.
    /// `x` and `g_out` broadcast against each other (e.g. `[b,p,1,D]` and `[b,p,h,D]`).
    /// Identity when the model has no such norm (e.g. OLMo-2's missing pre-norms).
    pub fn norm_vjp(&self, site: NormSite, x: &Tensor, g_out: &Tensor) -> Result<Tensor> {
        let Some(nw) = self.norm_weights(site) else {
            return Ok(g_out.to_dtype(DType::F64)?);
        };
        let dev = nw.w.device();
        let (n, s) = self.norm_parts(&x.to_device(dev)?)?;
        // u = dM/d(normalized before the gain)
        let u = g_out.to_device(dev)?.to_dtype(DType::F64)?.broadcast_mul(&nw.w.to_dtype(DType::F64)?)?;
        let nu = n.broadcast_mul(&u)?.mean_keepdim(D::Minus1)?;
        let r = match self.cfg.norm {
            NormKind::RmsNorm => u.broadcast_sub(&n.broadcast_mul(&nu)?)?,
            NormKind::LayerNorm => u.broadcast_sub(&u.mean_keepdim(D::Minus1)?)?.sub(&n.broadcast_mul(&nu)?)?,
        };
        Ok(r.broadcast_div(&s)?)
    }

    /// The Jacobian-vector product of norm `site` at input `x` `[.., D]` applied to `dx`: the
    /// first-order change of the norm's output when its input moves by `dx`, in f64. Identity when
    /// the model has no such norm. `x` and `dx` broadcast (e.g. `[b,p,1,D]` and `[b,p,h,D]`).
    /// (EAP linearises a post-norm sublayer's output this way.)
    pub fn norm_jvp(&self, site: NormSite, x: &Tensor, dx: &Tensor) -> Result<Tensor> {
        let Some(nw) = self.norm_weights(site) else {
            return Ok(dx.to_dtype(DType::F64)?);
        };
        let dev = nw.w.device();
        let (n, s) = self.norm_parts(&x.to_device(dev)?)?;
        let dx = dx.to_device(dev)?.to_dtype(DType::F64)?;
        let dx = match self.cfg.norm {
            NormKind::LayerNorm => dx.broadcast_sub(&dx.mean_keepdim(D::Minus1)?)?,
            NormKind::RmsNorm => dx,
        };
        let ndx = n.broadcast_mul(&dx)?.mean_keepdim(D::Minus1)?;
        let dn = dx.broadcast_sub(&n.broadcast_mul(&ndx)?)?.broadcast_div(&s)?;
        Ok(dn.broadcast_mul(&nw.w.to_dtype(DType::F64)?)?)
    }

    /// `(normalized before the gain, scale)` of the model's norm kind at `x`, in f64.
    pub(crate) fn norm_parts(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = x.to_dtype(DType::F64)?;
        let xc = match self.cfg.norm {
            NormKind::LayerNorm => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
            NormKind::RmsNorm => x,
        };
        let s = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.cfg.eps)?.sqrt()?;
        Ok((xc.broadcast_div(&s)?, s))
    }
}

/// `f(x)`, or with RelP's identity rule `x * sg(f(x) / x)` (x nudged away from 0 by 1e-6 * sign(x)).
fn identity_rule_apply(x: &Tensor, on: bool, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if !on {
        return f(x);
    }
    let xd = x.detach();
    let sign = xd.ge(&xd.zeros_like()?)?.to_dtype(xd.dtype())?.affine(2.0, -1.0)?;
    let nudged = (&xd + (sign * 1e-6)?)?;
    let ratio = (f(&xd)? / nudged)?;
    Ok((x * ratio)?)
}

/// `x @ w + b` for `x` `[.., in]`, `w` `[in, out]`, `b` `[out]`; flattens the leading axes into one GEMM.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let din = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = crate::layout::matmul(&x.reshape((rows, din))?, w)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(1)?);
    Ok(y.reshape(out)?)
}

/// `x` in f32 when it is bf16/f16, else itself (no copy).
fn widen(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    })
}

/// `[b,p,kv,d]` to `[b,p,kv*n,d]`, each kv head repeated `n` times consecutively (HF `repeat_kv`).
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, p, kv, d) = x.dims4()?;
    Ok(x.unsqueeze(3)?.broadcast_as((b, p, kv, n, d))?.reshape((b, p, kv * n, d))?)
}
