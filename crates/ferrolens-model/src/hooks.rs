//! Interventions and the per-run hook context.
//!
//! A [`Hooks`] value says, for one forward pass, which activations to cache, which to
//! change (an [`Intervention`] restricted by a [`Patch`] to batch rows, positions and heads),
//! where to take gradients, and which LRP rules to switch on.
//!
//! ```no_run
//! # use ferrolens_model::*;
//! # fn f(model: &HookedTransformer, tokens: &candle_core::Tensor) -> Result<()> {
//! let mut hooks = Hooks::new()
//!     .cache("blocks.*.hook_resid_pre")?
//!     .patch(Patch::new(HookPoint::Z(3), Intervention::Zero).heads(&[1]));
//! let logits = model.run(tokens, &mut hooks)?;           // [batch, pos, d_vocab]
//! let resid0 = hooks.cache_ref().get(HookPoint::ResidPre(0))?; // [batch, pos, d_model]
//! # Ok(()) }
//! ```

use crate::cache::ActivationCache;
use crate::error::{Error, Result};
use crate::hook::{HookPoint, NameFilter};
use crate::lrp::LrpRules;
use candle_core::{Tensor, Var};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// A user function applied at a hook point: `(activation, hook) -> new activation` of the same shape.
pub type HookFn = Arc<dyn Fn(&Tensor, HookPoint) -> candle_core::Result<Tensor> + Send + Sync>;

/// What to do to an activation.
#[derive(Clone)]
pub enum Intervention {
    /// Replace with this tensor (broadcastable to the activation's shape).
    Replace(Tensor),
    /// Add this tensor (broadcastable), e.g. a steering vector `[d_model]`.
    Add(Tensor),
    /// Set to zero.
    Zero,
    /// Multiply by a constant.
    Scale(f64),
    /// Replace by a mean activation (broadcastable, e.g. `[pos, ...]` or `[...]` averaged over a
    /// reference batch). Same as `Replace`; kept separate so reports can say what was done.
    MeanAblate(Tensor),
    /// Any function of the activation.
    Func(HookFn),
}

impl std::fmt::Debug for Intervention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Intervention::Replace(t) => write!(f, "Replace({:?})", t.shape()),
            Intervention::Add(t) => write!(f, "Add({:?})", t.shape()),
            Intervention::Zero => write!(f, "Zero"),
            Intervention::Scale(s) => write!(f, "Scale({s})"),
            Intervention::MeanAblate(t) => write!(f, "MeanAblate({:?})", t.shape()),
            Intervention::Func(_) => write!(f, "Func"),
        }
    }
}

impl Intervention {
    /// A closure intervention.
    pub fn func(f: impl Fn(&Tensor, HookPoint) -> candle_core::Result<Tensor> + Send + Sync + 'static) -> Self {
        Intervention::Func(Arc::new(f))
    }

    /// Patch in the activation that `cache` holds at `hook` (e.g. clean into corrupt).
    pub fn from_cache(cache: &ActivationCache, hook: HookPoint) -> Result<Self> {
        Ok(Intervention::Replace(cache.get(hook)?.clone()))
    }

    fn apply(&self, x: &Tensor, hook: HookPoint) -> Result<Tensor> {
        let fit = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_device(x.device())?.to_dtype(x.dtype())?;
            t.broadcast_as(x.shape())
                .map_err(|_| Error::Input(format!("intervention tensor of shape {:?} does not broadcast to `{hook}` of shape {:?}", t.dims(), x.dims())))
        };
        Ok(match self {
            Intervention::Replace(t) | Intervention::MeanAblate(t) => fit(t)?,
            Intervention::Add(t) => (x + fit(t)?)?,
            Intervention::Zero => x.zeros_like()?,
            Intervention::Scale(s) => (x * *s)?,
            Intervention::Func(f) => {
                let y = f(x, hook)?;
                if y.dims() != x.dims() {
                    return Err(Error::Input(format!("hook function at `{hook}` returned shape {:?}, expected {:?}", y.dims(), x.dims())));
                }
                y
            }
        })
    }
}

/// An intervention at one hook point, optionally restricted to batch rows, positions and heads.
/// Positions index the query axis for patterns `[b,h,q,k]`.
#[derive(Debug, Clone)]
pub struct Patch {
    /// Where.
    pub hook: HookPoint,
    /// What.
    pub op: Intervention,
    /// Only these batch rows (all if `None`).
    pub batch: Option<Vec<usize>>,
    /// Only these positions (all if `None`).
    pub positions: Option<Vec<usize>>,
    /// Only these heads (all if `None`); for hooks with a head axis.
    pub heads: Option<Vec<usize>>,
    /// A 0/1 mask broadcastable to the activation (1 = intervene), combined with the restrictions
    /// above. Lets one batched forward carry a different patch in every row.
    pub mask: Option<Tensor>,
}

impl Patch {
    /// An unrestricted patch.
    pub fn new(hook: HookPoint, op: Intervention) -> Self {
        Patch { hook, op, batch: None, positions: None, heads: None, mask: None }
    }
    /// Restrict to positions.
    pub fn positions(mut self, p: &[usize]) -> Self {
        self.positions = Some(p.to_vec());
        self
    }
    /// Restrict to heads.
    pub fn heads(mut self, h: &[usize]) -> Self {
        self.heads = Some(h.to_vec());
        self
    }
    /// Restrict to batch rows.
    pub fn batch(mut self, b: &[usize]) -> Self {
        self.batch = Some(b.to_vec());
        self
    }

    /// Restrict with a 0/1 mask broadcastable to the activation's shape.
    pub fn mask(mut self, m: Tensor) -> Self {
        self.mask = Some(m);
        self
    }

    /// Apply to `x`: where the restriction selects, the intervened value, elsewhere `x`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let new = self.op.apply(x, self.hook)?;
        if self.batch.is_none() && self.positions.is_none() && self.heads.is_none() && self.mask.is_none() {
            return Ok(new);
        }
        let dims = x.dims();
        let mut mask_dims = vec![1usize; dims.len()];
        let mut axes: Vec<(usize, &Vec<usize>)> = Vec::new();
        if let Some(b) = &self.batch {
            axes.push((0, b));
        }
        if let Some(p) = &self.positions {
            axes.push((self.hook.pos_axis(), p));
        }
        if let Some(h) = &self.heads {
            let ax = self.hook.head_axis().ok_or_else(|| Error::Input(format!("`{}` has no head axis; drop the head restriction", self.hook)))?;
            axes.push((ax, h));
        }
        // Build the mask as an outer product of per-axis 0/1 vectors.
        let mut mask = Tensor::ones(mask_dims.clone(), x.dtype(), x.device())?;
        for (ax, idx) in axes {
            let n = dims[ax];
            let mut v = vec![0f32; n];
            for &i in idx {
                if i >= n {
                    return Err(Error::Input(format!("index {i} out of range for axis {ax} of `{}` (size {n})", self.hook)));
                }
                v[i] = 1.0;
            }
            mask_dims.iter_mut().for_each(|d| *d = 1);
            mask_dims[ax] = n;
            let m = Tensor::from_vec(v, mask_dims.clone(), x.device())?.to_dtype(x.dtype())?;
            mask = mask.broadcast_mul(&m)?;
        }
        if let Some(m) = &self.mask {
            let m = m.to_device(x.device())?.to_dtype(x.dtype())?;
            mask = mask
                .broadcast_mul(&m)
                .map_err(|_| Error::Input(format!("patch mask of shape {:?} does not broadcast to `{}` of shape {:?}", m.dims(), self.hook, dims)))?;
        }
        let mask = mask.broadcast_as(x.shape())?;
        Ok((x + (new - x)?.mul(&mask)?)?)
    }
}

/// The hook context of one or more forward passes: cache filter, patches, gradient points, LRP rules.
#[derive(Default)]
pub struct Hooks {
    cache_filter: Vec<NameFilter>,
    cache_set: HashSet<HookPoint>,
    patches: Vec<Patch>,
    grad_points: HashSet<HookPoint>,
    /// LRP rules for this run.
    pub lrp: LrpRules,
    cache: ActivationCache,
    grad_vars: HashMap<HookPoint, Var>,
    active: HashSet<HookPoint>,
    uniform: BTreeMap<usize, Vec<usize>>,
}

impl Hooks {
    /// No hooks: a plain forward.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cache the hooks matching `pattern` (names, globs or `re:REGEX`, comma-separated).
    pub fn cache(mut self, pattern: &str) -> Result<Self> {
        self.cache_filter.push(NameFilter::parse(pattern)?);
        Ok(self)
    }

    /// Cache exactly these hook points.
    pub fn cache_hooks(mut self, hooks: &[HookPoint]) -> Self {
        self.cache_set.extend(hooks.iter().copied());
        self
    }

    /// Add an intervention (applied in the order added).
    pub fn patch(mut self, p: Patch) -> Self {
        self.patches.push(p);
        self
    }

    /// Add several interventions.
    pub fn patches(mut self, ps: impl IntoIterator<Item = Patch>) -> Self {
        self.patches.extend(ps);
        self
    }

    /// Take gradients of the metric with respect to these hook points (see
    /// [`crate::HookedTransformer::run_with_grads`]).
    pub fn grad(mut self, hooks: &[HookPoint]) -> Self {
        self.grad_points.extend(hooks.iter().copied());
        self
    }

    /// Make these `(layer, head)` pairs attend uniformly to every position they may see (their
    /// scores set to 0 before the causal mask), as in Wu et al.'s masking of retrieval heads.
    pub fn uniform_attention(mut self, heads: &[(usize, usize)]) -> Self {
        for &(l, h) in heads {
            let hs = self.uniform.entry(l).or_default();
            if !hs.contains(&h) {
                hs.push(h);
            }
        }
        self
    }

    /// Heads of layer `l` made to attend uniformly (see [`Hooks::uniform_attention`]).
    pub fn uniform_heads(&self, l: usize) -> Option<&[usize]> {
        self.uniform.get(&l).map(|v| v.as_slice())
    }

    /// Switch LRP rules on for this run.
    pub fn lrp(mut self, rules: LrpRules) -> Self {
        self.lrp = rules;
        self
    }

    /// The activations cached by the last run.
    pub fn cache_ref(&self) -> &ActivationCache {
        &self.cache
    }

    /// Take the cache out of the context.
    pub fn take_cache(&mut self) -> ActivationCache {
        std::mem::take(&mut self.cache)
    }

    /// The patches registered.
    pub fn patch_list(&self) -> &[Patch] {
        &self.patches
    }

    /// The gradient points registered.
    pub fn grad_point_set(&self) -> &HashSet<HookPoint> {
        &self.grad_points
    }

    pub(crate) fn grad_vars(&self) -> &HashMap<HookPoint, Var> {
        &self.grad_vars
    }

    /// Resolve the filters against a model's hook points. Called at the start of each run.
    pub(crate) fn prepare(&mut self, valid: &[HookPoint]) -> Result<()> {
        let valid_set: HashSet<HookPoint> = valid.iter().copied().collect();
        for h in self.patches.iter().map(|p| &p.hook).chain(self.grad_points.iter()).chain(self.cache_set.iter()) {
            if !valid_set.contains(h) {
                return Err(Error::HookNotInModel { name: h.to_string(), why: "the layer is past the last block or the architecture has no such hook".into() });
            }
        }
        if let Some(l) = self.uniform.keys().find(|l| !valid_set.contains(&HookPoint::Pattern(**l))) {
            return Err(Error::Input(format!("uniform attention asked for layer {l}, but the model has no such layer")));
        }
        self.active.clear();
        self.active.extend(self.patches.iter().map(|p| p.hook));
        self.active.extend(self.grad_points.iter().copied());
        self.active.extend(self.cache_set.iter().copied());
        for h in valid {
            if self.cache_filter.iter().any(|f| f.matches(h)) {
                self.cache_set.insert(*h);
                self.active.insert(*h);
            }
        }
        self.cache = ActivationCache::new();
        self.grad_vars.clear();
        Ok(())
    }

    /// Whether anything happens at `hook` (used to skip optional computations such as `hook_result`).
    #[inline]
    pub fn wants(&self, hook: HookPoint) -> bool {
        !self.active.is_empty() && self.active.contains(&hook)
    }

    /// Whether anything (a cache, patch, gradient probe or function) happens at a hook point of
    /// layer `l`.
    pub fn touches_layer(&self, l: usize) -> bool {
        self.active.iter().any(|h| h.layer() == Some(l))
    }

    /// Record which positions of the current forward are real tokens (`[b,p]`, padded batches)
    /// in the cache.
    pub(crate) fn record_mask(&mut self, mask: Option<Tensor>) {
        self.cache.set_mask(mask);
    }

    /// Pass an activation through the hook point: interventions, then the gradient probe, then the cache.
    #[inline]
    pub(crate) fn at(&mut self, hook: HookPoint, x: Tensor) -> Result<Tensor> {
        if !self.wants(hook) {
            return Ok(x);
        }
        let mut x = x;
        for p in self.patches.iter().filter(|p| p.hook == hook) {
            x = p.apply(&x)?;
        }
        if self.grad_points.contains(&hook) {
            let var = Var::zeros(x.shape(), x.dtype(), x.device())?;
            x = (x + var.as_tensor())?;
            self.grad_vars.insert(hook, var);
        }
        if self.cache_set.contains(&hook) {
            self.cache.insert(hook, x.detach());
        }
        Ok(x)
    }
}
