//! [`HookedTransformer`]: one forward pass for every family of [`crate::arch`], with a
//! TransformerLens hook point at every activation. This file holds the model value, its
//! tokenizing and hook-name helpers, and the run entry points; the layer math they drive is in
//! [`crate::layers`] and the weights in [`crate::weights`].
//!
//! Every entry point is one request, [`RunSpan`] (start/stop layer, position offset, padding
//! mask, last-position logits), run with or without a KV cache or gradients:
//! [`HookedTransformer::run_span`] and [`HookedTransformer::run_span_with_grads`] take it
//! whole; `forward`, `run`, `run_with_grads`, `run_with_kv_cache`, `prefill(_padded)` are
//! shorthands for common spans.
//!
//! The forward is written only with differentiable candle ops (manual norms, `ops::softmax`,
//! rotate-half rotary, dense weights), so gradients reach every hook point. It reads the
//! [`Config`] flags (norm kind and placement, parallel residual, q/k norms, rotary variants,
//! sliding windows, soft-caps, scales, activation); the attention-score, mask and norm math is
//! exposed ([`HookedTransformer::attn_scores`], [`HookedTransformer::attn_mask`],
//! [`HookedTransformer::norm_vjp`], [`HookedTransformer::norm_jvp`]) so that methods that
//! re-enter a layer (EAP, AtP*) use this code rather than their own copies.

use crate::config::{Config, Positional};
use crate::error::{Error, Result};
use crate::hook::HookPoint;
use crate::hooks::Hooks;
use crate::kv::KvCache;
pub use crate::layers::{linear, repeat_kv};
use crate::tokenizer::Tokenizer;
pub use crate::weights::{AttnWeights, BlockWeights, MlpWeights, NormWeights, Weights};
use candle_core::{DType, Device, Tensor};
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
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    /// Each layer's device and dtype (read from its weights; see [`crate::pipeline`]).
    pub(crate) layer_places: Vec<crate::pipeline::Place>,
    /// The final norm's and unembedding's.
    pub(crate) head_place: crate::pipeline::Place,
    /// Each block's packed projections (q/k/v, gate/up; see [`crate::weights::PackedBlock`]).
    pub(crate) packed: Vec<crate::weights::PackedBlock>,
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
    /// Unembed these vocabulary columns only (u32 token ids `[k]`): logits `[b, p, k]`, column
    /// `i` the logit of token `columns[i]`. For runs whose metric reads a few tokens' logits (a
    /// logit difference reads two a prompt): the unembedding is then a `[D, k]` product instead
    /// of `[D, V]`. `None`: every column.
    pub columns: Option<Tensor>,
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
pub(crate) struct Padding {
    /// `[b][T]`: key `j` is a real token.
    pub(crate) keys: Vec<Vec<bool>>,
    /// `[b, p]` u32: the position of each new token in its own prompt (0 for padding).
    pub(crate) pos: Tensor,
    /// The largest position + 1.
    pub(crate) max_pos: usize,
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
    ///
    /// Each block's `W_Q`, `W_K`, `W_V` (and a gated MLP's `W_gate`, `W_in`) are packed into one
    /// matrix that the forward multiplies by once; the fields become views of it, with the same
    /// values (see [`crate::weights::PackedBlock`]). Replacing such a field later is fine: that
    /// block's group then runs as separate products again.
    pub fn new(cfg: Config, w: Weights) -> Result<Self> {
        Self::packing(cfg, w, &[])
    }

    /// The same model with every block's projections as separate contiguous matrices, none
    /// packed: each group then runs as one product a matrix, as a model whose fields were
    /// replaced after loading does. A reference for the packed forward (same values up to the
    /// order of floating-point sums); it holds its own copy of those weights (the views of a
    /// packed model's fields are copied out).
    pub fn unpacked(&self) -> Result<HookedTransformer> {
        let mut m = self.clone();
        for b in &mut m.w.blocks {
            b.attn.w_q = b.attn.w_q.contiguous()?;
            b.attn.w_k = b.attn.w_k.contiguous()?;
            b.attn.w_v = b.attn.w_v.contiguous()?;
            b.mlp.w_in = b.mlp.w_in.contiguous()?;
            b.mlp.w_gate = b.mlp.w_gate.as_ref().map(|g| g.contiguous()).transpose()?;
        }
        m.packed = vec![crate::weights::PackedBlock::default(); m.w.blocks.len()];
        Ok(m)
    }

    /// [`HookedTransformer::new`], keeping `prior[l]` for every block whose fields are still
    /// that packing's views (a split that leaves a block where it was).
    pub(crate) fn packing(cfg: Config, mut w: Weights, prior: &[crate::weights::PackedBlock]) -> Result<Self> {
        cfg.validate()?;
        crate::weights::check_shapes(&cfg, &w)?;
        let (home, layer_places, head_place) = crate::pipeline::places_of(&w)?;
        let packed = w
            .blocks
            .iter_mut()
            .enumerate()
            .map(|(l, b)| match prior.get(l) {
                Some(p) if p.holds(b) => Ok(p.clone()),
                _ => crate::weights::PackedBlock::pack(b),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HookedTransformer { cfg, w, tokenizer: None, device: home.device, dtype: home.dtype, layer_places, head_place, packed })
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

    /// A fingerprint of the model (SHA-256, hex): its configuration without the display name, the
    /// weight dtype, and every value of the token embedding `W_E` as f32. Two loads of the same
    /// checkpoint in the same dtype agree whatever path or name they were loaded by; a fine-tune
    /// or another quantization differs. Shards of one sweep compare it before they are merged.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let cfg = Config { name: String::new(), ..self.cfg.clone() };
        h.update(serde_json::to_vec(&cfg).map_err(|e| Error::Input(format!("internal: config does not serialize: {e}")))?);
        h.update(format!("{:?}", self.dtype).as_bytes());
        let v = self.w.embed.dim(0)?;
        // Row blocks, so a large vocabulary is not copied as f32 at once.
        for start in (0..v).step_by(4096) {
            let rows = self.w.embed.narrow(0, start, 4096.min(v - start))?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            h.update(rows.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The same model without its tokenizer: a cheap copy (configuration and reference-counted
    /// weights) that closures in hook interventions can own.
    pub fn without_tokenizer(&self) -> HookedTransformer {
        HookedTransformer {
            cfg: self.cfg.clone(),
            w: self.w.clone(),
            tokenizer: None,
            device: self.device.clone(),
            dtype: self.dtype,
            layer_places: self.layer_places.clone(),
            head_place: self.head_place.clone(),
            packed: self.packed.clone(),
        }
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
                // Straight to the start layer's place (the unembedding's when starting past the last).
                (*l, self.layer_places.get(*l).unwrap_or(&self.head_place).take(r.clone())?)
            }
            (None, Some(t)) => (0, self.embed_at(t, span.pos_offset, pad.as_ref().map(|p| &p.pos), hooks)?),
            (None, None) => return Err(Error::Input("give tokens or a start residual".into())),
        };
        if p == 0 {
            return Err(Error::Input("the input has no positions: give at least one token".into()));
        }
        let stop = span.stop_at_layer.unwrap_or(cfg.n_layers).min(cfg.n_layers);
        // Only the last position's logits are read: the last layer needs its other positions'
        // keys and values but not their queries, outputs or MLP (when no hook looks at that layer).
        let pruned = span.last_logits_only && span.stop_at_layer.is_none() && kv.is_none() && stop > start_layer && !hooks.touches_layer(stop - 1);
        // Rotary tables on the home place, moved along with the residual when a stage starts.
        let mut rope = self.rope_tables(span.pos_offset, p, pad.as_ref())?;
        let mut rope_place = self.home_place();
        for l in start_layer..stop {
            let place = &self.layer_places[l];
            if !place.same(&rope_place) {
                rope = rope.into_iter().map(|(f, c, s)| Ok((f, place.take(c)?, place.take(s)?))).collect::<Result<_>>()?;
                rope_place = place.clone();
            }
            resid = self.block(l, place.take(resid)?, &rope, pad.as_ref(), kv.as_deref_mut(), pruned && l + 1 == stop, hooks)?;
        }
        if let Some(kv) = kv {
            kv.advance(p);
        }
        if span.stop_at_layer.is_some() {
            return self.to_home(resid);
        }
        if span.last_logits_only && !pruned {
            resid = resid.narrow(1, p - 1, 1)?;
        }
        let logits = self.unembed(resid, span.columns.as_ref(), hooks)?;
        self.to_home(logits)
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

    pub(crate) fn check_len(&self, p: usize, offset: usize) -> Result<()> {
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
}
