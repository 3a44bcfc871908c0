//! Models split across devices: a pipeline of contiguous blocks of layers, one block a device
//! (`--devices cuda:0,cuda:1`).
//!
//! Where the weights are is the placement: [`HookedTransformer::new`] reads each layer's device
//! and dtype from its weights, the token embedding's from `W_E` (the *home* device) and the final
//! norm's and unembedding's from `W_U`. [`HookedTransformer::split`] moves a loaded model's
//! weights into that shape, and [`crate::LoadOptions::devices`] loads each layer straight onto its
//! device (a model larger than one device never sits whole on one).
//!
//! The forward moves the residual stream `[b,p,D]` to a layer's device (and dtype) when the
//! layer before it sits elsewhere, and returns the logits, or a `stop_at_layer` residual, on the
//! home device, so that tokens, answer indices and metrics live where they did unsplit.
//! Activations a hook sees, caches and gradients at hook points stay on their layer's device (a
//! cache of a split model is split too); a hook's replacement value is moved to the activation's
//! device. Moves are differentiable, so gradients flow back through the boundaries. A KV cache
//! keeps each layer's keys and values on that layer's device.
//!
//! The CPU has one device, so two `cpu` handles test the plumbing but cannot catch a tensor left
//! on the wrong device. The tests therefore also split with the second stage in f64 (each layer
//! runs in its weights' dtype; a move casts): any tensor that meets a stage it was not moved to
//! is then a dtype error on the CPU, as it would be a device error on two GPUs.
//!
//! ```
//! use ferrolens_model::{load, Device, LoadOptions};
//! let m = load(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny-gpt2"), &LoadOptions::default()).unwrap();
//! let tokens = m.tokens_tensor(&[vec![1, 2, 3]]).unwrap();
//! let whole = m.forward(&tokens).unwrap();
//! // On GPUs: m.split(&[Device::new_cuda(0)?, Device::new_cuda(1)?]) gives two stages; two CPU
//! // handles are one device to candle, so here the stages merge into one.
//! let split = m.split(&[Device::Cpu, Device::Cpu]).unwrap();
//! assert_eq!(split.stages().len(), 1);
//! let diff = (split.forward(&tokens).unwrap() - whole).unwrap().abs().unwrap().max_all().unwrap();
//! assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
//! ```

use crate::device::device_name;
use crate::error::{Error, Result};
use crate::transformer::HookedTransformer;
use crate::weights::{AttnWeights, BlockWeights, MlpWeights, NormWeights};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// Where a part of the model runs: its weights' device and dtype.
#[derive(Debug, Clone)]
pub struct Place {
    /// The device.
    pub device: Device,
    /// The dtype its activations are computed in.
    pub dtype: DType,
}

impl Place {
    /// The place of a tensor.
    pub fn of(t: &Tensor) -> Place {
        Place { device: t.device().clone(), dtype: t.dtype() }
    }

    /// Whether `t` is already here (same device and dtype).
    pub fn holds(&self, t: &Tensor) -> bool {
        t.device().same_device(&self.device) && t.dtype() == self.dtype
    }

    /// Move (and cast) `t` here; a no-op when it is already here. Differentiable. A view (such
    /// as a packed projection's `W_Q`) moves its own elements only.
    pub fn take(&self, t: Tensor) -> Result<Tensor> {
        if self.holds(&t) {
            return Ok(t);
        }
        // candle's to_device copies the whole storage under a view.
        let t = if t.device().same_device(&self.device) || t.is_contiguous() { t } else { t.contiguous()? };
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    pub(crate) fn same(&self, o: &Place) -> bool {
        self.device.same_device(&o.device) && self.dtype == o.dtype
    }
}

/// One stage of a split model: the layers on one device.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The device's name (`cpu`, `cuda:1`).
    pub device: String,
    /// Its layers.
    pub layers: Range<usize>,
    /// Whether it holds the token embedding (the first stage).
    pub embed: bool,
    /// Whether it holds the final norm and the unembedding (the last stage).
    pub unembed: bool,
}

/// Split `n_layers` layers into `k` contiguous ranges, as even as possible, the first ranges
/// taking one more when `k` does not divide `n_layers` (the split [`crate::plan::memory_plan`]
/// estimates). Errors when `k` is 0 or larger than `n_layers`.
pub fn stage_ranges(n_layers: usize, k: usize) -> Result<Vec<Range<usize>>> {
    if k == 0 {
        return Err(Error::Input("a split needs at least one device; give --devices cuda:0[,cuda:1,...]".into()));
    }
    if k > n_layers {
        return Err(Error::Input(format!("the model has {n_layers} layers, fewer than the {k} devices given; give at most {n_layers} devices")));
    }
    let (base, extra) = (n_layers / k, n_layers % k);
    let mut start = 0;
    Ok((0..k)
        .map(|i| {
            let n = base + usize::from(i < extra);
            start += n;
            start - n..start
        })
        .collect())
}

fn move_norm(n: &Option<NormWeights>, p: &Place) -> Result<Option<NormWeights>> {
    n.as_ref().map(|n| Ok(NormWeights { w: p.take(n.w.clone())?, b: move_opt(&n.b, p)? })).transpose()
}

fn move_opt(t: &Option<Tensor>, p: &Place) -> Result<Option<Tensor>> {
    t.as_ref().map(|t| p.take(t.clone())).transpose()
}

/// A block's weights moved (and cast) to `p`.
pub fn move_block(b: &BlockWeights, p: &Place) -> Result<BlockWeights> {
    let (a, m) = (&b.attn, &b.mlp);
    Ok(BlockWeights {
        ln1: move_norm(&b.ln1, p)?,
        ln1_post: move_norm(&b.ln1_post, p)?,
        ln2: move_norm(&b.ln2, p)?,
        ln2_post: move_norm(&b.ln2_post, p)?,
        attn: AttnWeights {
            w_q: p.take(a.w_q.clone())?,
            b_q: move_opt(&a.b_q, p)?,
            w_k: p.take(a.w_k.clone())?,
            b_k: move_opt(&a.b_k, p)?,
            w_v: p.take(a.w_v.clone())?,
            b_v: move_opt(&a.b_v, p)?,
            w_o: p.take(a.w_o.clone())?,
            b_o: move_opt(&a.b_o, p)?,
            q_norm: move_norm(&a.q_norm, p)?,
            k_norm: move_norm(&a.k_norm, p)?,
        },
        mlp: MlpWeights {
            w_in: p.take(m.w_in.clone())?,
            b_in: move_opt(&m.b_in, p)?,
            w_gate: move_opt(&m.w_gate, p)?,
            b_gate: move_opt(&m.b_gate, p)?,
            w_out: p.take(m.w_out.clone())?,
            b_out: move_opt(&m.b_out, p)?,
        },
    })
}

/// Every tensor of a block, for the placement check.
fn block_tensors(b: &BlockWeights) -> Vec<(&'static str, &Tensor)> {
    let mut v: Vec<(&'static str, &Tensor)> = vec![("W_Q", &b.attn.w_q), ("W_K", &b.attn.w_k), ("W_V", &b.attn.w_v), ("W_O", &b.attn.w_o)];
    v.push(("W_in", &b.mlp.w_in));
    v.push(("W_out", &b.mlp.w_out));
    for (n, t) in [
        ("b_Q", &b.attn.b_q),
        ("b_K", &b.attn.b_k),
        ("b_V", &b.attn.b_v),
        ("b_O", &b.attn.b_o),
        ("W_gate", &b.mlp.w_gate),
        ("b_in", &b.mlp.b_in),
        ("b_gate", &b.mlp.b_gate),
        ("b_out", &b.mlp.b_out),
    ] {
        if let Some(t) = t {
            v.push((n, t));
        }
    }
    for (n, nw) in
        [("ln1", &b.ln1), ("ln2", &b.ln2), ("ln1_post", &b.ln1_post), ("ln2_post", &b.ln2_post), ("q_norm", &b.attn.q_norm), ("k_norm", &b.attn.k_norm)]
    {
        if let Some(nw) = nw {
            v.push((n, &nw.w));
            if let Some(bias) = &nw.b {
                v.push((n, bias));
            }
        }
    }
    v
}

/// The places of a model's parts, read from its weights: (home, per layer, head). Errors when
/// one block's tensors are on different devices or in different dtypes.
pub(crate) fn places_of(w: &crate::weights::Weights) -> Result<(Place, Vec<Place>, Place)> {
    let home = Place::of(&w.embed);
    let mut layers = Vec::with_capacity(w.blocks.len());
    for (l, b) in w.blocks.iter().enumerate() {
        let p = Place::of(&b.attn.w_q);
        if let Some((n, t)) = block_tensors(b).into_iter().find(|(_, t)| !p.holds(t)) {
            return Err(Error::Weights(format!(
                "block {l}'s {n} is on {} in {:?} but its W_Q is on {} in {:?}; a block's weights must share a device and dtype (move them with HookedTransformer::split)",
                device_name(t.device()),
                t.dtype(),
                device_name(&p.device),
                p.dtype
            )));
        }
        layers.push(p);
    }
    let head = Place::of(&w.unembed);
    for (n, t) in [("ln_final", Some(&w.ln_final.w)), ("ln_final bias", w.ln_final.b.as_ref()), ("b_U", w.b_u.as_ref())] {
        if let Some(t) = t {
            if !head.holds(t) {
                return Err(Error::Weights(format!("{n} is not on W_U's device and dtype; the final norm and the unembedding must be together")));
            }
        }
    }
    if let Some(pe) = &w.pos_embed {
        if !home.holds(pe) {
            return Err(Error::Weights("W_pos is not on W_E's device and dtype; the embeddings must be together".into()));
        }
    }
    Ok((home, layers, head))
}

impl HookedTransformer {
    /// The same model with its layers split over `devices` in contiguous stages
    /// ([`stage_ranges`]): the token embedding on the first device, the final norm and the
    /// unembedding on the last (a copy when the embeddings are tied), each stage's blocks on its
    /// device in the model's dtype. One device moves the whole model there. The weights are
    /// copied stage by stage; a model too large for one device is loaded split with
    /// [`crate::LoadOptions::devices`] instead.
    pub fn split(&self, devices: &[Device]) -> Result<HookedTransformer> {
        let dtype = self.dtype;
        let places: Vec<Place> = devices.iter().map(|d| Place { device: d.clone(), dtype }).collect();
        self.split_places(&places)
    }

    /// [`HookedTransformer::split`] with a dtype per stage too. Each layer computes in its
    /// stage's dtype and the residual is cast at the boundaries; the CPU tests use an f64 second
    /// stage to catch a tensor that crosses a boundary without being moved.
    pub fn split_places(&self, places: &[Place]) -> Result<HookedTransformer> {
        let ranges = stage_ranges(self.cfg.n_layers, places.len())?;
        let (first, last) = (&places[0], &places[places.len() - 1]);
        let mut w = self.w.clone();
        w.embed = first.take(w.embed.clone())?;
        w.pos_embed = move_opt(&w.pos_embed, first)?;
        for (r, p) in ranges.iter().zip(places) {
            for l in r.clone() {
                w.blocks[l] = move_block(&self.w.blocks[l], p)?;
            }
        }
        w.ln_final = NormWeights { w: last.take(w.ln_final.w.clone())?, b: move_opt(&w.ln_final.b, last)? };
        w.unembed = last.take(w.unembed.clone())?;
        w.b_u = move_opt(&w.b_u, last)?;
        Ok(HookedTransformer::packing(self.cfg.clone(), w, &self.packed)?.with_tokenizer(self.tokenizer.clone()))
    }

    /// The stages of the model: contiguous layers that share a device and dtype, in order. An
    /// unsplit model has one.
    pub fn stages(&self) -> Vec<Stage> {
        let mut out: Vec<Stage> = Vec::new();
        let mut prev: Option<&Place> = None;
        for (l, p) in self.layer_places.iter().enumerate() {
            match (prev, out.last_mut()) {
                (Some(q), Some(s)) if q.same(p) => s.layers.end = l + 1,
                _ => out.push(Stage { device: device_name(&p.device), layers: l..l + 1, embed: l == 0, unembed: false }),
            }
            prev = Some(p);
        }
        if let Some(s) = out.last_mut() {
            s.unembed = true;
        }
        out
    }

    /// Whether the model's parts sit in more than one place.
    pub fn is_split(&self) -> bool {
        self.layer_places.iter().chain(std::iter::once(&self.head_place)).any(|p| !p.same(&self.home_place()))
    }

    /// The device of layer `l`'s weights (its activations live there).
    pub fn layer_device(&self, l: usize) -> &Device {
        &self.layer_places[l].device
    }

    /// The place of layer `l`.
    pub fn layer_place(&self, l: usize) -> &Place {
        &self.layer_places[l]
    }

    /// The place of the final norm and the unembedding.
    pub fn head_place(&self) -> &Place {
        &self.head_place
    }

    /// The home place: the token embedding's device and dtype (tokens, logits and metrics).
    pub fn home_place(&self) -> Place {
        Place { device: self.device.clone(), dtype: self.dtype }
    }

    /// `x` moved to layer `l`'s place (a no-op unsplit).
    pub fn to_layer(&self, l: usize, x: Tensor) -> Result<Tensor> {
        self.layer_places[l].take(x)
    }

    /// `x` moved to the home place (a no-op unsplit).
    pub fn to_home(&self, x: Tensor) -> Result<Tensor> {
        self.home_place().take(x)
    }
}
