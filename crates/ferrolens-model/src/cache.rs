//! [`ActivationCache`]: activations keyed by hook point, saved as safetensors.

use crate::error::{Error, Result};
use crate::hook::HookPoint;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Activations recorded in a forward pass, keyed by hook point (shapes as in [`HookPoint`]).
///
/// Saved files are plain safetensors keyed by the TL hook name, so
/// `safetensors.numpy.load_file(path)["blocks.0.hook_resid_pre"]` works in Python.
#[derive(Debug, Clone, Default)]
pub struct ActivationCache {
    map: BTreeMap<HookPoint, Tensor>,
    mask: Option<Tensor>,
}

impl ActivationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Which positions are real tokens, `[b, p]` u8 (1 = token), when the forward ran a padded
    /// batch ([`crate::RunSpan::mask`]); `None` when every position is real. Statistics over a
    /// cache (means, sums) should skip the zeros.
    pub fn mask(&self) -> Option<&Tensor> {
        self.mask.as_ref()
    }

    pub(crate) fn set_mask(&mut self, mask: Option<Tensor>) {
        self.mask = mask;
    }

    /// Store `t` under `hook` (replacing an earlier value).
    pub fn insert(&mut self, hook: HookPoint, t: Tensor) {
        self.map.insert(hook, t);
    }

    /// The activation at `hook`, or an error naming what the cache holds.
    pub fn get(&self, hook: HookPoint) -> Result<&Tensor> {
        self.map.get(&hook).ok_or_else(|| {
            let held: Vec<String> = self.map.keys().take(6).map(|h| h.to_string()).collect();
            Error::Input(format!(
                "`{hook}` is not in the cache (it holds {} hooks: {}{}); add it to the cache filter",
                self.map.len(),
                held.join(", "),
                if self.map.len() > 6 { ", ..." } else { "" }
            ))
        })
    }

    /// The activation by TL name, e.g. `cache.by_name("blocks.0.attn.hook_z")`.
    pub fn by_name(&self, name: &str) -> Result<&Tensor> {
        self.get(name.parse()?)
    }

    /// Whether `hook` is held.
    pub fn contains(&self, hook: HookPoint) -> bool {
        self.map.contains_key(&hook)
    }

    /// Number of hooks held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Hook points held, in forward order.
    pub fn keys(&self) -> impl Iterator<Item = &HookPoint> {
        self.map.keys()
    }

    /// `(hook, activation)` pairs in forward order.
    pub fn iter(&self) -> impl Iterator<Item = (&HookPoint, &Tensor)> {
        self.map.iter()
    }

    /// Remove and return an activation.
    pub fn remove(&mut self, hook: HookPoint) -> Option<Tensor> {
        self.map.remove(&hook)
    }

    /// Concatenate caches along the batch axis (axis 0 for every hook). All caches must hold
    /// the same hooks with equal non-batch shapes.
    pub fn concat(caches: &[ActivationCache]) -> Result<ActivationCache> {
        let first = caches.first().ok_or_else(|| Error::Input("no caches to concatenate".into()))?;
        let mut out = ActivationCache::new();
        for hook in first.map.keys() {
            let parts: Vec<&Tensor> = caches.iter().map(|c| c.get(*hook)).collect::<Result<_>>()?;
            out.insert(*hook, Tensor::cat(&parts, 0)?);
        }
        Ok(out)
    }

    /// Write the cache as safetensors keyed by TL hook name (f32 written as f32).
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors: Vec<(String, Tensor)> =
            self.map.iter().map(|(h, t)| Ok((h.to_string(), t.to_device(&Device::Cpu)?.contiguous()?))).collect::<Result<_>>()?;
        candle_core::safetensors::save(&tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect(), path)
            .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
    }

    /// Read a cache written by [`ActivationCache::save_safetensors`] (or by Python with TL names).
    pub fn load_safetensors(path: impl AsRef<Path>, device: &Device) -> Result<ActivationCache> {
        let path = path.as_ref();
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::Weights(format!("cannot read cache {}: {e}", path.display())))?;
        let mut out = ActivationCache::new();
        for (k, v) in tensors {
            out.insert(k.parse()?, v);
        }
        Ok(out)
    }
}
