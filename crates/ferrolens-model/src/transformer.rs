//! [`HookedTransformer`]: one forward pass for every family of [`crate::arch`], with a
//! TransformerLens hook point at every activation.
//!
//! The forward is written only with differentiable candle ops (manual norms, `ops::softmax`,
//! rotate-half rotary, dense weights), so gradients reach every hook point. It reads the
//! [`Config`] flags (norm kind and placement, parallel residual, q/k norms, rotary variants,
//! sliding windows, soft-caps, scales, activation); the attention-score, mask and norm math is
//! exposed ([`HookedTransformer::attn_scores`], [`HookedTransformer::attn_mask`],
//! [`HookedTransformer::norm_vjp`], [`HookedTransformer::norm_jvp`]) so that methods that
//! re-enter a layer (EAP, AtP*) use this code rather than their own copies.

use crate::config::{Activation, Config, NormKind, Positional, QkNorm, RopeFreqs};
use crate::error::{Error, Result};
use crate::hook::HookPoint;
use crate::hooks::Hooks;
use crate::kv::KvCache;
use crate::tokenizer::Tokenizer;
pub use crate::weights::{AttnWeights, BlockWeights, MlpWeights, NormWeights, Weights};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

/// Which norm of the model (for [`HookedTransformer::norm_vjp`] / [`HookedTransformer::norm_jvp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormSite {
    /// `blocks.l.ln1` (before attention).
    Ln1(usize),
    /// `blocks.l.ln2` (before the MLP).
    Ln2(usize),
    /// `blocks.l.ln1_post` (on the attention output).
    Ln1Post(usize),
    /// `blocks.l.ln2_post` (on the MLP output).
    Ln2Post(usize),
    /// `ln_final`.
    Final,
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
    /// Which positions of a padded batch are real tokens: `[b, pos_offset + p]` (1 = token, 0 =
    /// padding; any numeric dtype), left or right padding or both. Real tokens get the positions
    /// of the prompt alone (padding is skipped), no query attends to a padding key, and a padding
    /// query attends to itself only, so padding never changes a real position's activations.
    /// `None`: every position is real.
    pub mask: Option<Tensor>,
}

/// Which side of a prompt padding goes ([`HookedTransformer::tokens_padded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum PadSide {
    /// Padding before the prompt: every row's last token is at the last position, which is
    /// where metrics read the answer (the default for patching and decoding).
    #[default]
    Left,
    /// Padding after the prompt.
    Right,
}

/// A padded batch's per-row facts for one forward (see [`RunSpan::mask`]).
#[derive(Debug, Clone)]
struct Padding {
    /// `[b][T]`: key `j` is a real token.
    keys: Vec<Vec<bool>>,
    /// `[b, p]` u32: the position of each new token in its own prompt (0 for padding).
    pos: Tensor,
    /// The largest position + 1.
    max_pos: usize,
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
        crate::weights::check_shapes(&cfg, &w)?;
        let device = w.embed.device().clone();
        let dtype = w.embed.dtype();
        Ok(HookedTransformer { cfg, w, tokenizer: None, device, dtype })
    }

    /// Attach a tokenizer; its prompts get the BOS token first as the config says
    /// ([`Config::prepend_bos`]).
    pub fn with_tokenizer(mut self, t: Option<Tokenizer>) -> Self {
        let bos = self.cfg.bos_token_id;
        self.tokenizer = t.map(|t| {
            let t = if t.bos_id().is_none() { t.with_bos(bos) } else { t };
            t.with_prepend_bos(self.cfg.prepend_bos)
        });
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

    /// Tokenize prompts into `[b, p]`, with the BOS token first when the family wants it
    /// ([`Config::prepend_bos`]: Gemma; not SmolLM2/Llama/GPT-2, as TL's `prepend_bos=False`).
    /// All prompts must have the same token length.
    pub fn to_tokens(&self, prompts: &[&str]) -> Result<Tensor> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.encode_prompt(p)).collect::<Result<_>>()?;
        self.tokens_tensor(&ids)
    }

    /// One prompt's token ids as [`HookedTransformer::to_tokens`] makes them (BOS first when
    /// [`Config::prepend_bos`]).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer()?.encode_prompt(prompt)
    }

    /// The token strings of a prompt (TL `to_str_tokens`), BOS included when the model prepends it.
    pub fn to_str_tokens(&self, prompt: &str) -> Result<Vec<String>> {
        let tok = self.tokenizer()?;
        self.encode_prompt(prompt)?.iter().map(|&i| tok.decode(&[i])).collect()
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
        use HookPoint::*;
        let c = &self.cfg;
        let learned = c.positional == Positional::Learned;
        let (pre, post) = (c.norm_placement.has_pre(), c.norm_placement.has_post());
        HookPoint::all(c.n_layers)
            .into_iter()
            .filter(|h| match h {
                PosEmbed => learned,
                RotQ(_) | RotK(_) => !learned,
                MlpPreLinear(_) => c.gated_mlp,
                ResidMid(_) => !c.parallel_attn_mlp,
                Ln1Scale(_) | Ln1Normalized(_) | Ln2Scale(_) | Ln2Normalized(_) => pre,
                Ln1PostScale(_) | Ln1PostNormalized(_) | Ln2PostScale(_) | Ln2PostNormalized(_) => post,
                QNormScale(_) | QNormNormalized(_) | KNormScale(_) | KNormNormalized(_) => c.qk_norm.is_some(),
                _ => true,
            })
            .collect()
    }

    /// The model's hook points that `pattern` (names, globs or `re:REGEX`, comma-separated; see
    /// [`crate::NameFilter`]) matches, in forward order. An exact name the model lacks, or a
    /// pattern that matches nothing, is an error that says why.
    pub fn hooks_matching(&self, pattern: &str) -> Result<Vec<HookPoint>> {
        let f = crate::hook::NameFilter::parse(pattern)?;
        for part in pattern.split(',').map(str::trim).filter(|p| !p.is_empty() && !p.starts_with("re:") && !p.contains(['*', '?'])) {
            self.hook(part)?;
        }
        let hooks: Vec<HookPoint> = self.hook_points().into_iter().filter(|h| f.matches(h)).collect();
        if hooks.is_empty() {
            return Err(Error::Input(format!(
                "`{pattern}` matches none of {}'s {} hook points ({} layers, 0..={}); see docs/hooks.md for the names",
                self.cfg.name,
                self.hook_points().len(),
                self.cfg.n_layers,
                self.cfg.n_layers - 1
            )));
        }
        Ok(hooks)
    }

    /// Validate a hook name against this model.
    pub fn hook(&self, name: &str) -> Result<HookPoint> {
        let h: HookPoint = name.parse()?;
        if !self.hook_points().contains(&h) {
            return Err(Error::HookNotInModel {
                name: name.into(),
                why: match h.layer() {
                    Some(l) if l >= self.cfg.n_layers => format!("the model has {} layers (0..={})", self.cfg.n_layers, self.cfg.n_layers - 1),
                    _ => format!("{} models have no such hook (docs/hooks.md lists each family's)", self.cfg.family),
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
            return Err(Error::Input(format!("prompt {i} has {} tokens but prompt 0 has {p}; a batch needs equal lengths (group prompts by length)", v.len())));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (ids.len(), p), &self.device)?)
    }

    /// Prompts of different lengths as one padded batch: tokens `[b, T]` (padding is token 0,
    /// never seen by a real position) and the real-token mask `[b, T]` (u8, 1 = token) to pass as
    /// [`RunSpan::mask`], with `T` the longest prompt.
    pub fn tokens_padded(&self, ids: &[Vec<u32>], side: PadSide) -> Result<(Tensor, Tensor)> {
        let t = ids.iter().map(|v| v.len()).max().unwrap_or(0);
        if t == 0 || ids.iter().any(|v| v.is_empty()) {
            return Err(Error::Input("empty prompt: give at least one token in every prompt".into()));
        }
        let mut tok = Vec::with_capacity(ids.len() * t);
        let mut mask = Vec::with_capacity(ids.len() * t);
        for v in ids {
            let n = t - v.len();
            let (pre, post) = match side {
                PadSide::Left => (n, 0),
                PadSide::Right => (0, n),
            };
            tok.extend(std::iter::repeat_n(0u32, pre).chain(v.iter().copied()).chain(std::iter::repeat_n(0, post)));
            mask.extend(std::iter::repeat_n(0u8, pre).chain(std::iter::repeat_n(1, v.len())).chain(std::iter::repeat_n(0, post)));
        }
        Ok((Tensor::from_vec(tok, (ids.len(), t), &self.device)?, Tensor::from_vec(mask, (ids.len(), t), &self.device)?))
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
        self.prefill_padded(tokens, None, kv, chunk, hooks)
    }

    /// [`HookedTransformer::prefill`] of a padded batch: `mask` `[b,p]` marks the real tokens
    /// (see [`RunSpan::mask`]); the cache keeps it, so later decoding steps skip the padding.
    /// Left padding puts every row's last real token at the last position.
    pub fn prefill_padded(&self, tokens: &Tensor, mask: Option<&Tensor>, kv: &mut KvCache, chunk: usize, hooks: &mut Hooks) -> Result<Tensor> {
        let (_, p) = tokens.dims2().map_err(|_| Error::Input(format!("tokens must be [batch, pos], got {:?}", tokens.dims())))?;
        if p == 0 {
            return Err(Error::Input("nothing to prefill: the prompt has no tokens".into()));
        }
        self.check_len(p, kv.len())?;
        if let Some(m) = mask {
            if m.dims() != tokens.dims() {
                return Err(Error::Input(format!("the mask {:?} must have the tokens' shape {:?}", m.dims(), tokens.dims())));
            }
            kv.push_mask(&m.to_dtype(DType::U8)?)?;
        }
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

    /// The per-row positions and visible keys of a forward over `p` new positions after
    /// `offset` earlier ones, from the span's mask or the KV cache's (`None` when nothing is
    /// padded).
    fn padding(&self, span: &RunSpan, kv: Option<&KvCache>, b: usize, p: usize) -> Result<Option<Padding>> {
        let offset = span.pos_offset;
        let t = offset + p;
        let full: Tensor = match (&span.mask, kv.and_then(|k| k.mask())) {
            (Some(m), _) => {
                if m.dims() != [b, t] {
                    return Err(Error::Input(format!("the attention mask must be [batch, earlier + new positions] = [{b}, {t}], got {:?}", m.dims())));
                }
                m.to_dtype(DType::U8)?
            }
            // The cache's mask covers the keys fed so far (a padded prefill pushes its whole
            // mask first); tokens past it are real.
            (None, Some(m)) => {
                let have = m.dim(1)?;
                if have >= t {
                    m.narrow(1, 0, t)?
                } else {
                    Tensor::cat(&[m.clone(), Tensor::ones((b, t - have), DType::U8, m.device())?], 1)?
                }
            }
            (None, None) => return Ok(None),
        };
        let rows: Vec<Vec<u8>> = full.to_device(&Device::Cpu)?.to_vec2()?;
        if rows.iter().all(|r| r.iter().all(|&x| x != 0)) {
            return Ok(None);
        }
        let keys: Vec<Vec<bool>> = rows.iter().map(|r| r.iter().map(|&x| x != 0).collect()).collect();
        let mut pos = Vec::with_capacity(b * p);
        let mut max_pos = 1;
        for r in &keys {
            let mut seen = r[..offset].iter().filter(|&&x| x).count();
            for &real in &r[offset..] {
                if real {
                    pos.push(seen as u32);
                    seen += 1;
                    max_pos = max_pos.max(seen);
                } else {
                    pos.push(0);
                }
            }
        }
        let pos = Tensor::from_vec(pos, (b, p), &self.device)?;
        Ok(Some(Padding { keys, pos, max_pos }))
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
        let (b, p) = match (&span.start, tokens) {
            (Some((_, r)), _) => (r.dim(0)?, r.dim(1)?),
            (None, Some(t)) => t.dims2().map_err(|_| Error::Input(format!("tokens must be [batch, pos], got {:?}", t.dims())))?,
            (None, None) => return Err(Error::Input("give tokens or a start residual".into())),
        };
        let pad = self.padding(span, kv.as_deref(), b, p)?;
        hooks.record_mask(match &pad {
            Some(pd) => {
                let real: Vec<u8> = pd.keys.iter().flat_map(|r| r[span.pos_offset..].iter().map(|&x| u8::from(x))).collect();
                Some(Tensor::from_vec(real, (b, p), &Device::Cpu)?)
            }
            None => None,
        });
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
            (None, Some(t)) => (0, self.embed_at(t, span.pos_offset, pad.as_ref().map(|p| &p.pos), hooks)?),
            (None, None) => return Err(Error::Input("give tokens or a start residual".into())),
        };
        if p == 0 {
            return Err(Error::Input("the input has no positions: give at least one token".into()));
        }
        let stop = span.stop_at_layer.unwrap_or(cfg.n_layers).min(cfg.n_layers);
        let rope = self.rope_tables(span.pos_offset, p, pad.as_ref())?;
        for l in start_layer..stop {
            resid = self.block(l, resid, &rope, pad.as_ref(), kv.as_deref_mut(), hooks)?;
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
    pub fn run_with_grads(&self, tokens: &Tensor, hooks: &mut Hooks, metric: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<GradRun> {
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
    /// Families with [`Config::embed_scale`] (Gemma) scale the token embedding before `hook_embed`.
    pub fn embed(&self, tokens: &Tensor, pos_offset: usize, hooks: &mut Hooks) -> Result<Tensor> {
        self.embed_at(tokens, pos_offset, None, hooks)
    }

    /// [`HookedTransformer::embed`] with per-row positions `[b,p]` (u32) for padded batches.
    fn embed_at(&self, tokens: &Tensor, pos_offset: usize, positions: Option<&Tensor>, hooks: &mut Hooks) -> Result<Tensor> {
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

    fn norm_weights(&self, site: NormSite) -> Option<&NormWeights> {
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
            NormKind::RmsNorm => self.rms(x, &nw.w, &[D::Minus1], scale_hook, norm_hook, hooks)?.to_dtype(dtype).map_err(Into::into),
        }
    }

    /// RMSNorm of `x` (already widened) over `axes` (the last one or two), gain `w` broadcast
    /// over them; `hook_scale` keeps those axes as 1s, `hook_normalized` is `x / scale`.
    fn rms(&self, x: &Tensor, w: &Tensor, axes: &[D], scale_hook: HookPoint, norm_hook: HookPoint, hooks: &mut Hooks) -> Result<Tensor> {
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
    fn rope_tables(&self, offset: usize, p: usize, pad: Option<&Padding>) -> Result<Vec<(RopeFreqs, Tensor, Tensor)>> {
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
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

    fn block(
        &self,
        l: usize,
        resid: Tensor,
        rope: &[(RopeFreqs, Tensor, Tensor)],
        pad: Option<&Padding>,
        kv: Option<&mut KvCache>,
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
        let mut attn_out = self.attention(l, &x, rope, pad, kv, hooks)?;
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
    fn qk_norm(&self, x: Tensor, w: &NormWeights, scale_hook: HookPoint, norm_hook: HookPoint, hooks: &mut Hooks) -> Result<Tensor> {
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
        let scores = (q.contiguous()?.matmul(&kt)? * self.cfg.attn_scale)?;
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
        Ok(Some(Tensor::from_vec(mask, (q, k), &self.device)?))
    }

    /// [`HookedTransformer::attn_mask`] of a padded batch: `keys` `[b, k]` marks real tokens
    /// (1); a real query sees the real keys its layer allows, a padding query sees itself only.
    /// `[b, 1, q, k]` u8.
    pub fn attn_mask_padded(&self, l: usize, q: usize, keys: &Tensor) -> Result<Tensor> {
        let rows: Vec<Vec<u8>> = keys.to_dtype(DType::U8)?.to_device(&Device::Cpu)?.to_vec2()?;
        let rows: Vec<Vec<bool>> = rows.iter().map(|r| r.iter().map(|&x| x != 0).collect()).collect();
        self.mask_rows(l, q, &rows)
    }

    fn mask_rows(&self, l: usize, q: usize, keys: &[Vec<bool>]) -> Result<Tensor> {
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
        Ok(Tensor::from_vec(m, (b, 1, q, k), &self.device)?)
    }

    fn attention(
        &self,
        l: usize,
        x: &Tensor,
        rope: &[(RopeFreqs, Tensor, Tensor)],
        pad: Option<&Padding>,
        mut kv: Option<&mut KvCache>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        use HookPoint::*;
        let cfg = &self.cfg;
        let aw = &self.w.blocks[l].attn;
        let (b, p, _) = x.dims3()?;
        let (h, kvh, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
        let q = hooks.at(Q(l), linear(x, &aw.w_q, aw.b_q.as_ref())?.reshape((b, p, h, d))?)?;
        let k = hooks.at(K(l), linear(x, &aw.w_k, aw.b_k.as_ref())?.reshape((b, p, kvh, d))?)?;
        let v = hooks.at(V(l), linear(x, &aw.w_v, aw.b_v.as_ref())?.reshape((b, p, kvh, d))?)?;
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
                let q = hooks.at(RotQ(l), self.rotate(&q, cos, sin)?)?;
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
            Some(pd) => Some(self.mask_rows(l, p, &pd.keys)?),
            None => self.attn_mask(l, p, t)?,
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
                let last = scores.narrow(2, p - 1, 1)?.squeeze(2)?; // [b,h,T]
                cache.set_argmax(l, last.argmax(D::Minus1)?);
            }
        }
        // Softmax in f32 for bf16/f16 models.
        let pattern = candle_nn::ops::softmax(&widen(&scores)?, D::Minus1)?.to_dtype(scores.dtype())?;
        // AH-rule: the weights are constants for the backward pass (detached before the hook, so
        // the gradient at hook_pattern itself is still available).
        let pattern = if hooks.lrp.attn { pattern.detach() } else { pattern };
        let pattern = hooks.at(Pattern(l), pattern)?;
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
                // Written out too: candle's gelu_erf backward rounds 1/sqrt(2 pi) to 0.398942.
                Activation::Gelu => ((x * 0.5)? * ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?)?,
                Activation::Silu => x.silu()?,
            })
        };
        identity_rule_apply(x, identity_rule, f)
    }

    fn mlp(&self, l: usize, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let mw = &self.w.blocks[l].mlp;
        let post = match &mw.w_gate {
            Some(wg) => {
                let pre = hooks.at(HookPoint::MlpPre(l), linear(x, wg, mw.b_gate.as_ref())?)?;
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
        let logits = linear(&x, &self.w.unembed, self.w.b_u.as_ref())?;
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

    /// The vector-Jacobian product of norm `site` at input `x` `[.., D]`: the gradient at the
    /// norm's input given the gradient `g_out` at its output (after the gain and bias), in f64.
    /// `x` and `g_out` broadcast against each other (e.g. `[b,p,1,D]` and `[b,p,h,D]`).
    /// Identity when the model has no such norm (e.g. OLMo-2's missing pre-norms).
    pub fn norm_vjp(&self, site: NormSite, x: &Tensor, g_out: &Tensor) -> Result<Tensor> {
        let Some(nw) = self.norm_weights(site) else {
            return Ok(g_out.to_dtype(DType::F64)?);
        };
        let (n, s) = self.norm_parts(x)?;
        // u = dM/d(normalized before the gain)
        let u = g_out.to_dtype(DType::F64)?.broadcast_mul(&nw.w.to_dtype(DType::F64)?)?;
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
        let (n, s) = self.norm_parts(x)?;
        let dx = dx.to_dtype(DType::F64)?;
        let dx = match self.cfg.norm {
            NormKind::LayerNorm => dx.broadcast_sub(&dx.mean_keepdim(D::Minus1)?)?,
            NormKind::RmsNorm => dx,
        };
        let ndx = n.broadcast_mul(&dx)?.mean_keepdim(D::Minus1)?;
        let dn = dx.broadcast_sub(&n.broadcast_mul(&ndx)?)?.broadcast_div(&s)?;
        Ok(dn.broadcast_mul(&nw.w.to_dtype(DType::F64)?)?)
    }

    /// `(normalized before the gain, scale)` of the model's norm kind at `x`, in f64.
    fn norm_parts(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
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
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, p, kv, d) = x.dims4()?;
    Ok(x.unsqueeze(3)?.broadcast_as((b, p, kv, n, d))?.reshape((b, p, kv * n, d))?)
}
