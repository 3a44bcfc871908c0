//! Attention-pattern scores of heads at labelled positions (for IOI head classes).

use candle_core::{DType, IndexOp, Tensor};
use ferrolens_model::{HookPoint, HookedTransformer, Hooks, Result};
use std::collections::BTreeMap;

/// Mean attention (over prompts) from a query label to a key label, for every head:
/// `[layer][head]`. `labels[i]` maps label names to token positions of prompt `i`.
pub fn attention_between(
    model: &HookedTransformer,
    tokens: &Tensor,
    labels: &[BTreeMap<String, usize>],
    query: &str,
    key: &str,
) -> Result<Option<Vec<Vec<f64>>>> {
    if labels.iter().any(|m| !m.contains_key(query) || !m.contains_key(key)) {
        return Ok(None);
    }
    let n = model.cfg.n_layers;
    let pts: Vec<HookPoint> = (0..n).map(HookPoint::Pattern).collect();
    let mut hooks = Hooks::new().cache_hooks(&pts);
    model.run(tokens, &mut hooks)?;
    let c = hooks.cache_ref();
    let mut out = vec![vec![0f64; model.cfg.n_heads]; n];
    for (l, row) in out.iter_mut().enumerate() {
        let pat = c.get(HookPoint::Pattern(l))?.to_dtype(DType::F64)?; // [b,h,q,k]
        for (i, m) in labels.iter().enumerate() {
            let a = pat.i((i, .., m[query], m[key]))?.to_vec1::<f64>()?;
            for (h, v) in a.into_iter().enumerate() {
                row[h] += v / labels.len() as f64;
            }
        }
    }
    Ok(Some(out))
}
