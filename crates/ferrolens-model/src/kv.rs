//! Key/value cache for incremental decoding, with the per-head attention argmax that
//! retrieval-head scoring reads (Wu et al. 2024).
//!
//! A [`KvCache`] holds, for every layer, the rotated keys and the values of every token seen so
//! far (`[b, T, n_kv_heads, d_head]` each; GQA heads are not repeated in the cache). Feeding a
//! block of `p` new tokens through [`HookedTransformer::run_with_kv_cache`] attends the new
//! queries to all `T + p` keys and appends the block's keys and values, so nothing is recomputed.
//! Long prompts are fed in chunks ([`HookedTransformer::prefill`]): the score matrix of one chunk
//! is `[b, h, chunk, T]`, so memory grows linearly with the context, never with `T²`.
//!
//! [`HookedTransformer::run_with_kv_cache`]: crate::HookedTransformer::run_with_kv_cache
//! [`HookedTransformer::prefill`]: crate::HookedTransformer::prefill

use crate::error::{Error, Result};
use candle_core::Tensor;

/// Keys and values of every layer for the tokens seen so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    mask: Option<Tensor>,
    len: usize,
    track_argmax: bool,
    fused: bool,
    argmax: Vec<Option<Tensor>>,
}

impl KvCache {
    /// An empty cache for a model with `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![None; n_layers], mask: None, len: 0, track_argmax: false, fused: true, argmax: vec![None; n_layers] }
    }

    /// Also record, at every forward, the argmax key position of the last query of each head
    /// (see [`KvCache::argmax`]). The score matrix itself is never stored.
    pub fn with_argmax(mut self) -> Self {
        self.track_argmax = true;
        self
    }

    /// Use the fused decode-attention step ([`crate::fused::decode_attention`]) for single-token
    /// forwards where nothing needs the scores or the pattern (on by default; off gives the
    /// generic path, which the fused one must match).
    pub fn fused(mut self, on: bool) -> Self {
        self.fused = on;
        self
    }

    /// Whether the fused step may be used.
    pub fn uses_fused(&self) -> bool {
        self.fused
    }

    /// Number of positions cached (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of layers the cache was made for.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Whether argmax tracking is on.
    pub fn tracks_argmax(&self) -> bool {
        self.track_argmax
    }

    /// Which cached (and announced) positions are real tokens, `[b, T]` u8, after a padded
    /// prefill ([`crate::HookedTransformer::prefill_padded`]); `None` when all are.
    pub fn mask(&self) -> Option<&Tensor> {
        self.mask.as_ref()
    }

    /// Announce the real-token mask `[b, p]` of the next `p` positions (ones before it).
    pub(crate) fn push_mask(&mut self, m: &Tensor) -> Result<()> {
        let (b, _) = m.dims2()?;
        let have = self.mask.as_ref().map(|x| x.dim(1)).transpose()?.unwrap_or(0);
        let prev = match self.mask.take() {
            Some(x) if have < self.len => Some(Tensor::cat(&[x, Tensor::ones((b, self.len - have), candle_core::DType::U8, m.device())?], 1)?),
            Some(x) => Some(x),
            None if self.len > 0 => Some(Tensor::ones((b, self.len), candle_core::DType::U8, m.device())?),
            None => None,
        };
        self.mask = Some(match prev {
            Some(x) => Tensor::cat(&[x, m.clone()], 1)?,
            None => m.clone(),
        });
        Ok(())
    }

    /// Forget every cached token.
    pub fn clear(&mut self) {
        self.mask = None;
        self.layers.iter_mut().for_each(|l| *l = None);
        self.argmax.iter_mut().for_each(|a| *a = None);
        self.len = 0;
    }

    /// Rotated keys and values of layer `l`: `([b,T,n_kv,d_head], [b,T,n_kv,d_head])`.
    pub fn layer(&self, l: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(l).and_then(|x| x.as_ref())
    }

    /// Argmax key position `[b, n_heads]` (u32) of the last query at layer `l` in the latest
    /// forward; `None` before the first forward or when tracking is off.
    pub fn argmax(&self, l: usize) -> Option<&Tensor> {
        self.argmax.get(l).and_then(|x| x.as_ref())
    }

    /// Argmax positions of every layer for batch row `row`: `[n_layers][n_heads]`.
    /// One device-to-host copy for all layers (decoding reads this at every step).
    pub fn argmax_rows(&self, row: usize) -> Result<Vec<Vec<u32>>> {
        let mut rows: Vec<Tensor> = Vec::with_capacity(self.argmax.len());
        for (l, a) in self.argmax.iter().enumerate() {
            let a = a.as_ref().ok_or_else(|| {
                Error::Input(format!("no attention argmax recorded at layer {l}: build the cache with KvCache::with_argmax and run a forward first"))
            })?;
            // A split model's layers hold theirs on their own devices: gather on the first's.
            let a = a.get(row)?;
            rows.push(match rows.first() {
                Some(r0) => a.to_device(r0.device())?,
                None => a,
            });
        }
        Ok(Tensor::stack(&rows, 0)?.to_vec2::<u32>()?)
    }

    /// Bytes held by the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }

    /// Append a block's keys and values at layer `l`; returns the full keys and values.
    pub(crate) fn append(&mut self, l: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = self.layers.get_mut(l).ok_or_else(|| Error::Input(format!("the KV cache has no layer {l}")))?;
        let (k, v) = match slot.take() {
            Some((k0, v0)) => (Tensor::cat(&[&k0, &k], 1)?, Tensor::cat(&[&v0, &v], 1)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    pub(crate) fn set_argmax(&mut self, l: usize, a: Tensor) {
        if let Some(slot) = self.argmax.get_mut(l) {
            *slot = Some(a);
        }
    }

    pub(crate) fn advance(&mut self, p: usize) {
        self.len += p;
    }
}
