//! [`HookedTransformer`]: one forward pass for GPT-2 and Llama-family models, with a
//! TransformerLens hook point at every activation.
//!
//! The forward is written only with differentiable candle ops (manual norms, `ops::softmax`,
//! rotate-half rotary, f32/f64 dense weights), so gradients reach every hook point.

use crate::config::{Activation, Config, NormKind, Positional};
use crate::error::{Error, Result};
use crate::hook::HookPoint;
use crate::hooks::Hooks;
use crate::kv::KvCache;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

/// A normalisation layer's weights: `w` `[D]`, `b` `[D]` for LayerNorm.
#[derive(Debug, Clone)]
pub struct NormWeights {
    /// Gain `[D]`.
    pub w: Tensor,
    /// Bias `[D]` (LayerNorm only).
    pub b: Option<Tensor>,
}

/// Attention weights, stored `[in, out]` so that `x @ W` applies them.
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
}

/// MLP weights, `[in, out]`.
#[derive(Debug, Clone)]
pub struct MlpWeights {
    /// `[D, M]` (Llama: `up_proj`).
    pub w_in: Tensor,
    /// `[M]`.
    pub b_in: Option<Tensor>,
    /// `[D, M]` (Llama: `gate_proj`), gated MLPs only.
    pub w_gate: Option<Tensor>,
    /// `[M, D]`.
    pub w_out: Tensor,
    /// `[D]`.
    pub b_out: Option<Tensor>,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// Norm before attention.
    pub ln1: NormWeights,
    /// Attention.
    pub attn: AttnWeights,
    /// Norm before the MLP.
    pub ln2: NormWeights,
    /// MLP.
    pub mlp: MlpWeights,
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embedding `W_E` `[V, D]`.
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

/// A transformer with TransformerLens hook points.
#[derive(Debug, Clone)]
pub struct HookedTransformer {
    /// The configuration.
    pub cfg: Config,
    /// The weights.
    pub w: Weights,
    /// The tokenizer, where the checkpoint ships one.
    pub tokenizer: Option<Tokenizer>,
    rope: Option<(Tensor, Tensor)>,
    device: Device,
    dtype: DType,
}

/// Where a forward pass starts and stops.
#[derive(Debug, Clone, Default)]
pub struct RunSpan {
    /// Start at this block with the given residual stream `[b,p,D]` (TL `start_at_layer`).
    pub start: Option<(usize, Tensor)>,
    /// Stop before this block and return its `resid_pre` `[b,p,D]` (TL `stop_at_layer`).
    pub stop_at_layer: Option<usize>,
    /// Position of the first token (for rotary / learned positions); 0 for a fresh prompt.
    pub pos_offset: usize,
    /// Unembed the last position only: logits `[b,1,V]` (the final-norm hooks then see `[b,1,..]`).
    /// Saves most of the unembedding cost when a metric reads the last position.
    pub last_logits_only: bool,
}

/// The outcome of [`HookedTransformer::run_with_grads`].
#[derive(Debug)]
pub struct GradRun {
    /// The metric's value.
    pub metric: f64,
    /// The logits `[b,p,V]` (detached).
    pub logits: Tensor,
    /// dMetric/dActivation at each requested hook point (shape of the activation).
    pub grads: HashMap<HookPoint, Tensor>,
}

impl HookedTransformer {
    /// Build from a config and weights, checking every shape against the config.
    pub fn new(cfg: Config, w: Weights) -> Result<Self> {
        cfg.validate()?;
        check_shapes(&cfg, &w)?;
        let device = w.embed.device().clone();
        let dtype = w.embed.dtype();
        let rope = match cfg.positional {
            Positional::Rotary { base, dim } => {
                let half = dim / 2;
                let inv: Vec<f64> = (0..half).map(|i| 1.0 / base.powf(2.0 * i as f64 / dim as f64)).collect();
                let n = cfg.n_ctx;
                let mut cos = Vec::with_capacity(n * half);
                let mut sin = Vec::with_capacity(n * half);
                for p in 0..n {
                    for f in &inv {
                        // Match HF: freqs computed in f32 (inv_freq f32, positions f32).
                        let a = (p as f32) * (*f as f32);
                        cos.push(a.cos() as f64);
                        sin.push(a.sin() as f64);
                    }
                }
                let cos = Tensor::from_vec(cos, (n, half), &device)?.to_dtype(dtype)?;
                let sin = Tensor::from_vec(sin, (n, half), &device)?.to_dtype(dtype)?;
                Some((cos, sin))
            }
            Positional::Learned => None,
        };
        Ok(HookedTransformer { cfg, w, tokenizer: None, rope, device, dtype })
    }

    /// Attach a tokenizer.
    pub fn with_tokenizer(mut self, t: Option<Tokenizer>) -> Self {
        self.tokenizer = t;
        self
    }

    /// Rename (the name shows in reports and errors).
    pub fn renamed(mut self, name: &str) -> Self {
        self.cfg.name = name.to_string();
        self
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!("{} was loaded without a tokenizer; put tokenizer.json (or vocab.json + merges.txt) beside the weights", self.cfg.name))
        })
    }

    /// Tokenize prompts (no BOS: SmolLM2 and TL's `prepend_bos=False` convention) into `[b, p]`.
    /// All prompts must have the same token length.
    pub fn to_tokens(&self, prompts: &[&str]) -> Result<Tensor> {
        let tok = self.tokenizer()?;
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p)).collect::<Result<_>>()?;
        self.tokens_tensor(&ids)
    }

    /// The token strings of a prompt (TL `to_str_tokens`).
    pub fn to_str_tokens(&self, prompt: &str) -> Result<Vec<String>> {
        let tok = self.tokenizer()?;
        tok.encode(prompt)?.iter().map(|&i| tok.decode(&[i])).collect()
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every hook point this model has, in forward order.
    pub fn hook_points(&self) -> Vec<HookPoint> {
        let learned = self.cfg.positional == Positional::Learned;
        let gated = self.cfg.gated_mlp;
        HookPoint::all(self.cfg.n_layers)
            .into_iter()
            .filter(|h| match h {
                HookPoint::PosEmbed => learned,
                HookPoint::RotQ(_) | HookPoint::RotK(_) => !learned,
                HookPoint::MlpPreLinear(_) => gated,
                _ => true,
            })
            .collect()
    }

    /// Validate a hook name against this model.
    pub fn hook(&self, name: &str) -> Result<HookPoint> {
        let h: HookPoint = name.parse()?;
        if !self.hook_points().contains(&h) {
            return Err(Error::HookNotInModel {
                name: name.into(),
                why: match h.layer() {
                    Some(l) if l >= self.cfg.n_layers => format!("the model has {} layers (0..={})", self.cfg.n_layers, self.cfg.n_layers - 1),
                    _ => format!("{:?} models have no such hook", self.cfg.arch),
                },
            });
        }
        Ok(h)
    }

    /// Token ids as a `[1, p]` or `[b, p]` u32 tensor on the model's device.
    pub fn tokens_tensor(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let p = ids.first().map(|v| v.len()).unwrap_or(0);
        if p == 0 {
            return Err(Error::Input("empty prompt: give at least one token".into()));
        }
        if let Some((i, v)) = ids.iter().enumerate().find(|(_, v)| v.len() != p) {
            return Err(Error::Input(format!(
                "prompt {i} has {} tokens but prompt 0 has {p}; a batch needs equal lengths (group prompts by length)",
                v.len()
            )));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (ids.len(), p), &self.device)?)
    }

    /// Plain forward: tokens `[b,p]` (u32) to logits `[b,p,V]`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        self.run(tokens, &mut Hooks::new())
    }

    /// Forward with hooks: tokens `[b,p]` to logits `[b,p,V]`; caches land in `hooks`.
    pub fn run(&self, tokens: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        self.run_span(Some(tokens), &RunSpan::default(), hooks)
    }

    /// Forward with a start/stop span. `tokens` may be `None` when `span.start` supplies the residual.
    /// Returns logits `[b,p,V]`, or the residual `[b,p,D]` when `span.stop_at_layer` is set.
    pub fn run_span(&self, tokens: Option<&Tensor>, span: &RunSpan, hooks: &mut Hooks) -> Result<Tensor> {
        self.run_inner(tokens, span, None, hooks)
    }

    /// Feed `tokens` `[b,p]` after the positions already in `kv`, attending to all of them, and
    /// append the new keys and values. Returns logits `[b,p,V]` (`[b,1,V]` when
    /// `last_logits_only`). Hooks fire on this block only: `hook_k`/`hook_v` see `[b,p,kv,d]`,
    /// `hook_attn_scores`/`hook_pattern` see `[b,h,p,T+p]`.
    pub fn run_with_kv_cache(&self, tokens: &Tensor, kv: &mut KvCache, last_logits_only: bool, hooks: &mut Hooks) -> Result<Tensor> {
        if kv.n_layers() != self.cfg.n_layers {
            return Err(Error::Input(format!(
                "the KV cache has {} layers but {} has {}; make it with KvCache::new(model.cfg.n_layers)",
                kv.n_layers(),
                self.cfg.name,
                self.cfg.n_layers
            )));
        }
        if let Some((k, _)) = kv.layer(0) {
            let b = tokens.dim(0)?;
            if k.dim(0)? != b {
                return Err(Error::Input(format!("the KV cache holds {} rows but the tokens have {b}; use one cache per batch", k.dim(0)?)));
            }
        }
        let span = RunSpan { pos_offset: kv.len(), last_logits_only, ..Default::default() };
        self.run_inner(Some(tokens), &span, Some(kv), hooks)
    }

    /// Feed a long prompt `[b,p]` through `kv` in blocks of `chunk` positions, so that no score
    /// matrix is larger than `[b,h,chunk,T]`. Returns the logits of the last position `[b,1,V]`.
    /// Hooks fire once per block (a cache keeps the last block).
    pub fn prefill(&self, tokens: &Tensor, kv: &mut KvCache, chunk: usize, hooks: &mut Hooks) -> Result<Tensor> {
        let (_, p) = tokens.dims2().map_err(|_| Error::Input(format!("tokens must be [batch, pos], got {:?}", tokens.dims())))?;
        if p == 0 {
            return Err(Error::Input("nothing to prefill: the prompt has no tokens".into()));
        }
        self.check_len(p, kv.len())?;
        let chunk = chunk.max(1);
        let mut start = 0;
        loop {
            let n = chunk.min(p - start);
            let last = start + n == p;
            let logits = self.run_with_kv_cache(&tokens.narrow(1, start, n)?, kv, true, hooks)?;
            if last {
                return Ok(logits);
            }
            start += n;
        }
    }

    fn run_inner(&self, tokens: Option<&Tensor>, span: &RunSpan, mut kv: Option<&mut KvCache>, hooks: &mut Hooks) -> Result<Tensor> {
        hooks.prepare(&self.hook_points())?;
        let cfg = &self.cfg;
        // Checked before any work, so that a bad request leaves a KV cache untouched.
        for l in 0..cfg.n_layers {
            if let Some(bad) = hooks.uniform_heads(l).and_then(|hs| hs.iter().find(|&&x| x >= cfg.n_heads)) {
                return Err(Error::Input(format!("uniform attention asked for head {bad} of layer {l}, but layers have {} heads", cfg.n_heads)));
            }
        }
        let (start_layer, mut resid) = match (&span.start, tokens) {
            (Some((l, r)), _) => {
                if *l > cfg.n_layers {
                    return Err(Error::Input(format!("start layer {l} is past the last layer {}", cfg.n_layers)));
                }
                let d = r.dims();
                if d.len() != 3 || d[2] != cfg.d_model {
                    return Err(Error::Input(format!("start residual must be [batch, pos, {}], got {d:?}", cfg.d_model)));
                }
                self.check_len(d[1], span.pos_offset)?;
                (*l, r.to_dtype(self.dtype)?)
            }
            (None, Some(t)) => (0, self.embed(t, span.pos_offset, hooks)?),
            (None, None) => return Err(Error::Input("give tokens or a start residual".into())),
        };
        let p = resid.dim(1)?;
        if p == 0 {
            return Err(Error::Input("the input has no positions: give at least one token".into()));
        }
        let stop = span.stop_at_layer.unwrap_or(cfg.n_layers).min(cfg.n_layers);
        for l in start_layer..stop {
            resid = self.block(l, resid, span.pos_offset, kv.as_deref_mut(), hooks)?;
        }
        if let Some(kv) = kv {
            kv.advance(p);
        }
        if span.stop_at_layer.is_some() {
            return Ok(resid);
        }
        if span.last_logits_only {
            resid = resid.narrow(1, p - 1, 1)?;
        }
        self.unembed(resid, hooks)
    }

    /// Run, compute `metric(logits)` (a scalar), and return the gradient of the metric at
    /// every hook point registered with [`Hooks::grad`], in one backward pass.
    pub fn run_with_grads(
        &self,
        tokens: &Tensor,
        hooks: &mut Hooks,
        metric: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<GradRun> {
        self.run_span_with_grads(Some(tokens), &RunSpan::default(), hooks, metric)
    }

    /// [`HookedTransformer::run_with_grads`] over a [`RunSpan`] (e.g. last-position logits only).
    pub fn run_span_with_grads(
        &self,
        tokens: Option<&Tensor>,
        span: &RunSpan,
        hooks: &mut Hooks,
        metric: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<GradRun> {
        if hooks.grad_point_set().is_empty() {
            return Err(Error::Input("no gradient hook points: call Hooks::grad(&[...]) first".into()));
        }
        let logits = self.run_span(tokens, span, hooks)?;
        let m = metric(&logits)?;
        if m.elem_count() != 1 {
            return Err(Error::Input(format!("the metric must be a scalar, got shape {:?}", m.dims())));
        }
        let m = m.flatten_all()?.sum(0)?;
        let value = m.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Input(format!("the metric is {value} (not finite); check the answer tokens and the logits")));
        }
        let store = m.backward()?;
        let mut grads = HashMap::new();
        for (h, v) in hooks.grad_vars() {
            let g = match store.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            grads.insert(*h, g);
        }
        Ok(GradRun { metric: value, logits: logits.detach(), grads })
    }

    fn check_len(&self, p: usize, offset: usize) -> Result<()> {
        if p + offset > self.cfg.n_ctx {
            return Err(Error::Input(format!(
                "the prompt has {} tokens but {} takes at most {} (its context length); shorten the prompt",
                p + offset,
                self.cfg.name,
                self.cfg.n_ctx
            )));
        }
        Ok(())
    }

    /// Token (and learned position) embedding: tokens `[b,p]` to `resid_pre` of block 0 `[b,p,D]`.
    pub fn embed(&self, tokens: &Tensor, pos_offset: usize, hooks: &mut Hooks) -> Result<Tensor> {
        let (b, p) = tokens.dims2().map_err(|_| Error::Input(format!("tokens must be [batch, pos], got {:?}", tokens.dims())))?;
        self.check_len(p, pos_offset)?;
        let tokens = tokens.to_dtype(DType::U32)?;
        let max = tokens.max_keepdim(0)?.max_keepdim(1)?.flatten_all()?.to_vec1::<u32>()?[0];
        if max as usize >= self.cfg.d_vocab {
            return Err(Error::Input(format!("token id {max} is outside the vocabulary (size {})", self.cfg.d_vocab)));
        }
        let d = self.cfg.d_model;
        let e = self.w.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, p, d))?;
        let e = hooks.at(HookPoint::Embed, e)?;
        match &self.w.pos_embed {
            Some(wp) => {
                let pe = wp.narrow(0, pos_offset, p)?.unsqueeze(0)?.broadcast_as((b, p, d))?.contiguous()?;
                let pe = hooks.at(HookPoint::PosEmbed, pe)?;
                Ok((e + pe)?)
            }
            None => Ok(e),
        }
    }

    fn norm(&self, x: &Tensor, nw: &NormWeights, scale_hook: HookPoint, norm_hook: HookPoint, hooks: &mut Hooks) -> Result<Tensor> {
        let eps = self.cfg.eps;
        // bf16/f16 models normalise in f32 (the scale and normalized hooks then see f32).
        let dtype = x.dtype();
        let x = &widen(x)?;
        let wide = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(x.dtype())?) };
        match self.cfg.norm {
            NormKind::LayerNorm => {
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
            NormKind::RmsNorm => {
                let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
                let scale = hooks.at(scale_hook, scale)?;
                let scale = if hooks.lrp.ln { scale.detach() } else { scale };
                let n = x.broadcast_div(&scale)?;
                let n = hooks.at(norm_hook, n)?;
                Ok(n.broadcast_mul(&wide(&nw.w)?)?.to_dtype(dtype)?)
            }
        }
    }

    fn rotate(&self, x: &Tensor, pos_offset: usize) -> Result<Tensor> {
        // x: [b,p,n,d]; rotate-half on the first `dim` features.
        let (cos, sin) = self.rope.as_ref().expect("rotary model");
        let dim = match self.cfg.positional {
            Positional::Rotary { dim, .. } => dim,
            Positional::Learned => unreachable!(),
        };
        let (_b, p, _n, d) = x.dims4()?;
        let half = dim / 2;
        let cos = cos.narrow(0, pos_offset, p)?.unsqueeze(1)?; // [p,1,half]
        let sin = sin.narrow(0, pos_offset, p)?.unsqueeze(1)?;
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

    fn block(&self, l: usize, resid: Tensor, pos_offset: usize, kv: Option<&mut KvCache>, hooks: &mut Hooks) -> Result<Tensor> {
        let bw = &self.w.blocks[l];
        let resid_pre = hooks.at(HookPoint::ResidPre(l), resid)?;
        let x = self.norm(&resid_pre, &bw.ln1, HookPoint::Ln1Scale(l), HookPoint::Ln1Normalized(l), hooks)?;
        let attn_out = self.attention(l, &x, pos_offset, kv, hooks)?;
        let attn_out = hooks.at(HookPoint::AttnOut(l), attn_out)?;
        let resid_mid = hooks.at(HookPoint::ResidMid(l), (resid_pre + attn_out)?)?;
        let x = self.norm(&resid_mid, &bw.ln2, HookPoint::Ln2Scale(l), HookPoint::Ln2Normalized(l), hooks)?;
        let mlp_out = self.mlp(l, &x, hooks)?;
        let mlp_out = hooks.at(HookPoint::MlpOut(l), mlp_out)?;
        hooks.at(HookPoint::ResidPost(l), (resid_mid + mlp_out)?)
    }

    fn attention(&self, l: usize, x: &Tensor, pos_offset: usize, mut kv: Option<&mut KvCache>, hooks: &mut Hooks) -> Result<Tensor> {
        let cfg = &self.cfg;
        let aw = &self.w.blocks[l].attn;
        let (b, p, _) = x.dims3()?;
        let (h, kvh, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
        let q = linear(x, &aw.w_q, aw.b_q.as_ref())?.reshape((b, p, h, d))?;
        let q = hooks.at(HookPoint::Q(l), q)?;
        let k = linear(x, &aw.w_k, aw.b_k.as_ref())?.reshape((b, p, kvh, d))?;
        let k = hooks.at(HookPoint::K(l), k)?;
        let v = linear(x, &aw.w_v, aw.b_v.as_ref())?.reshape((b, p, kvh, d))?;
        let v = hooks.at(HookPoint::V(l), v)?;
        let (q, k) = if self.rope.is_some() {
            let q = hooks.at(HookPoint::RotQ(l), self.rotate(&q, pos_offset)?)?;
            let k = hooks.at(HookPoint::RotK(l), self.rotate(&k, pos_offset)?)?;
            (q, k)
        } else {
            (q, k)
        };
        let (k, v) = match kv.as_deref_mut() {
            Some(cache) => cache.append(l, k, v)?,
            None => (k, v),
        };
        let scale = 1.0 / (d as f64).sqrt();
        let fused = match kv.as_deref() {
            Some(cache) => {
                cache.uses_fused()
                    && p == 1
                    && q.dtype() == DType::F32
                    && h <= 64
                    && d <= 256
                    && !hooks.wants(HookPoint::AttnScores(l))
                    && !hooks.wants(HookPoint::Pattern(l))
                    && hooks.grad_point_set().is_empty()
            }
            None => false,
        };
        if fused {
            // One decode step: scores, softmax, argmax and the weighted sum in one op.
            let uniform = hooks.uniform_heads(l).unwrap_or(&[]).to_vec();
            let (z, arg) = crate::fused::decode_attention(&q.squeeze(1)?, &k, &v, scale, &uniform)?;
            if let Some(cache) = kv.as_deref_mut() {
                if cache.tracks_argmax() {
                    cache.set_argmax(l, arg);
                }
            }
            let z = z.unsqueeze(1)?; // [b,1,h,d]
            return self.attn_output(l, z, hooks);
        }
        let k = repeat_kv(&k, cfg.kv_repeat())?;
        let v = repeat_kv(&v, cfg.kv_repeat())?;
        let qt = q.transpose(1, 2)?.contiguous()?; // [b,h,p,d]
        let kt = k.transpose(1, 2)?.transpose(2, 3)?.contiguous()?; // [b,h,d,p]
        let vt = v.transpose(1, 2)?.contiguous()?; // [b,h,p,d]
        let scores = (qt.matmul(&kt)? * scale)?;
        let scores = match hooks.uniform_heads(l) {
            Some(heads) => {
                let keep: Vec<f32> = (0..h).map(|i| if heads.contains(&i) { 0.0 } else { 1.0 }).collect();
                let keep = Tensor::from_vec(keep, (1, h, 1, 1), scores.device())?.to_dtype(scores.dtype())?;
                scores.broadcast_mul(&keep)?
            }
            None => scores,
        };
        let scores = causal_mask(&scores)?;
        let scores = hooks.at(HookPoint::AttnScores(l), scores)?;
        if let Some(cache) = kv.as_deref_mut() {
            if cache.tracks_argmax() {
                // Argmax of the last query over keys: the pattern's argmax (softmax is monotone).
                let last = scores.narrow(2, p - 1, 1)?.squeeze(2)?; // [b,h,T]
                cache.set_argmax(l, last.argmax(D::Minus1)?);
            }
        }
        // Softmax in f32 for bf16/f16 models.
        let pattern = candle_nn::ops::softmax(&widen(&scores)?, D::Minus1)?.to_dtype(scores.dtype())?;
        // AH-rule: the weights are constants for the backward pass (detached before the hook, so
        // the gradient at hook_pattern itself is still available).
        let pattern = if hooks.lrp.attn { pattern.detach() } else { pattern };
        let pattern = hooks.at(HookPoint::Pattern(l), pattern)?;
        let z = pattern.matmul(&vt)?.transpose(1, 2)?.contiguous()?; // [b,p,h,d]
        self.attn_output(l, z, hooks)
    }

    /// `hook_z` `[b,p,h,d]`, then (optionally `hook_result`) the output projection to `[b,p,D]`.
    fn attn_output(&self, l: usize, z: Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let cfg = &self.cfg;
        let aw = &self.w.blocks[l].attn;
        let (b, p, h, d) = z.dims4()?;
        let z = hooks.at(HookPoint::Z(l), z)?;
        if hooks.wants(HookPoint::Result(l)) {
            // result[b,p,h,:] = z[b,p,h,:] @ W_O[h]   -> [b,p,h,D]
            let wo = aw.w_o.reshape((h, d, cfg.d_model))?;
            let zt = z.transpose(1, 2)?.contiguous()?; // [b,h,p,d]
            let r = zt.broadcast_matmul(&wo.unsqueeze(0)?)?.transpose(1, 2)?.contiguous()?; // [b,p,h,D]
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

    fn act(&self, x: &Tensor, identity_rule: bool) -> Result<Tensor> {
        let f = |x: &Tensor| -> Result<Tensor> {
            Ok(match self.cfg.act {
                // Written out: candle's fused gelu backward rounds its constants to 6 digits.
                Activation::GeluNew => {
                    let c = (2.0f64 / std::f64::consts::PI).sqrt();
                    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?.tanh()?;
                    ((x * 0.5)? * (inner + 1.0)?)?
                }
                Activation::Gelu => x.gelu_erf()?,
                Activation::Silu => x.silu()?,
            })
        };
        if !identity_rule {
            return f(x);
        }
        // Identity rule: y = x * sg(f(x) / x), x nudged away from 0 by 1e-6 * sign(x).
        let xd = x.detach();
        let sign = xd.ge(&xd.zeros_like()?)?.to_dtype(xd.dtype())?.affine(2.0, -1.0)?;
        let nudged = (&xd + (sign * 1e-6)?)?;
        let ratio = (f(&xd)? / nudged)?;
        Ok((x * ratio)?)
    }

    fn mlp(&self, l: usize, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let mw = &self.w.blocks[l].mlp;
        let post = match &mw.w_gate {
            Some(wg) => {
                let pre = hooks.at(HookPoint::MlpPre(l), linear(x, wg, None)?)?;
                let lin = hooks.at(HookPoint::MlpPreLinear(l), linear(x, &mw.w_in, mw.b_in.as_ref())?)?;
                let prod = (self.act(&pre, hooks.lrp.identity)? * lin)?;
                let prod = if hooks.lrp.half {
                    let half = (prod * 0.5)?;
                    (&half + half.detach())?
                } else {
                    prod
                };
                hooks.at(HookPoint::MlpPost(l), prod)?
            }
            None => {
                let pre = hooks.at(HookPoint::MlpPre(l), linear(x, &mw.w_in, mw.b_in.as_ref())?)?;
                hooks.at(HookPoint::MlpPost(l), self.act(&pre, hooks.lrp.identity)?)?
            }
        };
        linear(&post, &mw.w_out, mw.b_out.as_ref())
    }

    fn unembed(&self, resid: Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let x = self.norm(&resid, &self.w.ln_final, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized, hooks)?;
        linear(&x, &self.w.unembed, self.w.b_u.as_ref())
    }
}

/// `x @ w + b` for `x` `[.., in]`, `w` `[in, out]`, `b` `[out]`; flattens the leading axes into one GEMM.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let din = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, din))?.matmul(w)?;
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
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, p, kv, d) = x.dims4()?;
    Ok(x.unsqueeze(3)?.broadcast_as((b, p, kv, n, d))?.reshape((b, p, kv * n, d))?)
}

/// Set scores `[b,h,q,k]` above the diagonal to -inf (queries at the end of the key axis).
fn causal_mask(scores: &Tensor) -> Result<Tensor> {
    let (_, _, q, k) = scores.dims4()?;
    if q == 1 {
        return Ok(scores.clone());
    }
    let off = k - q;
    let mask: Vec<u8> = (0..q).flat_map(|i| (0..k).map(move |j| u8::from(j <= i + off))).collect();
    let mask = Tensor::from_vec(mask, (q, k), scores.device())?.broadcast_as(scores.shape())?;
    let neg = Tensor::new(f32::NEG_INFINITY, scores.device())?.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?;
    Ok(mask.where_cond(scores, &neg)?)
}

fn check_shapes(cfg: &Config, w: &Weights) -> Result<()> {
    let errs = std::cell::RefCell::new(Vec::new());
    let want = |name: String, t: &Tensor, shape: &[usize]| {
        if t.dims() != shape {
            errs.borrow_mut().push(format!("{name}: file has {:?}, config implies {shape:?}", t.dims()));
        }
    };
    let (dm, h, kv, d, m, v) = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab);
    want("embed".into(), &w.embed, &[v, dm]);
    if let Some(p) = &w.pos_embed {
        want("pos_embed".into(), p, &[cfg.n_ctx, dm]);
    } else if cfg.positional == Positional::Learned {
        errs.borrow_mut().push("learned positions need a position embedding, none was loaded".into());
    }
    if w.blocks.len() != cfg.n_layers {
        errs.borrow_mut().push(format!("{} blocks loaded, config says n_layers = {}", w.blocks.len(), cfg.n_layers));
    }
    for (l, b) in w.blocks.iter().enumerate() {
        want(format!("blocks.{l}.ln1.w"), &b.ln1.w, &[dm]);
        want(format!("blocks.{l}.attn.W_Q"), &b.attn.w_q, &[dm, h * d]);
        want(format!("blocks.{l}.attn.W_K"), &b.attn.w_k, &[dm, kv * d]);
        want(format!("blocks.{l}.attn.W_V"), &b.attn.w_v, &[dm, kv * d]);
        want(format!("blocks.{l}.attn.W_O"), &b.attn.w_o, &[h * d, dm]);
        want(format!("blocks.{l}.ln2.w"), &b.ln2.w, &[dm]);
        want(format!("blocks.{l}.mlp.W_in"), &b.mlp.w_in, &[dm, m]);
        if let Some(g) = &b.mlp.w_gate {
            want(format!("blocks.{l}.mlp.W_gate"), g, &[dm, m]);
        }
        want(format!("blocks.{l}.mlp.W_out"), &b.mlp.w_out, &[m, dm]);
    }
    want("unembed".into(), &w.unembed, &[dm, v]);
    let errs = errs.into_inner();
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
