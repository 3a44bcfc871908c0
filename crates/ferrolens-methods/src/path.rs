//! Path patching (Wang et al. 2022, "Interpretability in the Wild", Sec. 3.1).
//!
//! The effect of sender head `s` on the metric *through* a set of receiver inputs only:
//! 1. run the corrupt prompts and keep `s`'s output (`hook_z` of its head);
//! 2. run the clean prompts with every attention head's output frozen at its clean value, except
//!    `s`, whose output is the corrupt one (MLPs are recomputed), and record the receivers'
//!    inputs (`hook_q`, `hook_k` or `hook_v` of the receiver heads);
//! 3. run the clean prompts again with only those receiver inputs patched, and score the metric.
//!
//! With a normalised metric the result is 1 when the path carries nothing and falls as the path
//! carries more of the behaviour.

use crate::metrics::mean_value;
use crate::patching::PatchingData;
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, Patch, Result};

/// Which input of a receiver head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum HeadInput {
    /// Query.
    Q,
    /// Key (KV-head index for GQA models).
    K,
    /// Value (KV-head index for GQA models).
    V,
}

impl HeadInput {
    fn hook(&self, l: usize) -> HookPoint {
        match self {
            HeadInput::Q => HookPoint::Q(l),
            HeadInput::K => HookPoint::K(l),
            HeadInput::V => HookPoint::V(l),
        }
    }
}

/// The metric after path patching sender head `sender = (layer, head)` into `receivers`
/// (`(layer, head, input)`, each downstream of the sender).
pub fn path_patch(model: &HookedTransformer, data: &PatchingData, sender: (usize, usize), receivers: &[(usize, usize, HeadInput)]) -> Result<f64> {
    data.check()?;
    let (clean, corrupt, metric) = (data.clean, data.corrupt, data.metric);
    let n = model.cfg.n_layers;
    let (ls, hs) = sender;
    if ls >= n || hs >= model.cfg.n_heads {
        return Err(Error::Input(format!("sender L{ls}H{hs} is not a head of this model")));
    }
    if let Some(r) = receivers.iter().find(|r| r.0 <= ls) {
        return Err(Error::Input(format!("receiver L{}H{} is not downstream of the sender L{ls}H{hs}", r.0, r.1)));
    }
    // Only the last run's logits are read (the metric's columns); the others stop after the
    // last block.
    let span = data.cache_span(n);
    // 1 + clean outputs of every head.
    let zs: Vec<HookPoint> = (ls..n).map(HookPoint::Z).collect();
    let mut hk = Hooks::new().cache_hooks(&[HookPoint::Z(ls)]);
    model.run_span(Some(corrupt), &span, &mut hk)?;
    let z_corrupt = hk.take_cache().remove(HookPoint::Z(ls)).expect("cached");
    let mut hc = Hooks::new().cache_hooks(&zs);
    model.run_span(Some(clean), &span, &mut hc)?;
    let clean_cache = hc.take_cache();
    // 2. Heads frozen at clean (layers before the sender are unchanged anyway), sender corrupt.
    let recv_hooks: Vec<HookPoint> = receivers.iter().map(|r| r.2.hook(r.0)).collect();
    let mut frozen = Hooks::new().cache_hooks(&recv_hooks);
    for l in ls..n {
        frozen = frozen.patch(Patch::new(HookPoint::Z(l), Intervention::Replace(clean_cache.get(HookPoint::Z(l))?.clone())));
    }
    frozen = frozen.patch(Patch::new(HookPoint::Z(ls), Intervention::Replace(z_corrupt)).heads(&[hs]));
    model.run_span(Some(clean), &span, &mut frozen)?;
    let recorded = frozen.take_cache();
    // 3. Only the receivers' inputs patched.
    let mut last = Hooks::new();
    for &(l, h, input) in receivers {
        let hp = input.hook(l);
        last = last.patch(Patch::new(hp, Intervention::Replace(recorded.get(hp)?.clone())).heads(&[h]));
    }
    let (span, reduced) = data.metric_span()?;
    let logits = model.run_span(Some(clean), &span, &mut last)?;
    mean_value(&reduced.as_deref().unwrap_or(metric).per_row(&logits)?)
}
