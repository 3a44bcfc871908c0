//! AtP* (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour
//! to components"): the QK fix and GradDrop.
//!
//! **QK fix.** Queries and keys act only through the attention pattern, where AtP's linearisation
//! through the softmax is poor. For a query or key patch the patched pattern `A'` is recomputed
//! exactly and the score is `sum (A' - A) . dM/dA` (gradient at `hook_pattern` of the corrupt run).
//! Patching query positions changes their rows only, so one recomputation
//! `A' = softmax(score(q_clean, k))` gives every query score (`score` and the mask are the model's
//! own: [`HookedTransformer::attn_scores`] with its scale and soft-cap,
//! [`HookedTransformer::attn_mask`] with its sliding window). Patching the key at position `s`
//! changes column `s` of every row: with `D = score(q, k_clean[s]) - score(q, k[s])`,
//! `r = 1 - A[q,s] + A[q,s] e^D` and `S_q = sum_k A[q,k] g[q,k]`, the row's term is
//! `(1/r - 1) S_q + A[q,s] g[q,s] (e^D - 1) / r`. Keys of GQA models sum over the query heads
//! that share them. The patched quantity is the head's rotated query / key (`hook_rot_q` /
//! `hook_rot_k`): the same as patching `hook_q` / `hook_k` for every family except OLMo-2, whose
//! norm over the whole key projection makes one head's pre-norm key move every head's key.
//!
//! **GradDrop.** For each layer `l`, a backward pass in which the gradient through layer `l`'s
//! residual writes (`hook_attn_out` and `hook_mlp_out`) is stopped; the score is the mean over
//! `l` of the absolute AtP scores, `(1/L) sum_l |AtP_l(n)|`, which counters cancellation between
//! paths. (The paper leaves out the layer of the node itself; here every layer is used.)

use crate::attribution::{attribution, gather_slots, AttributionOptions};
use crate::patching::PatchingData;
use crate::scores::{Component, Positions, ScoreGrid};
use candle_core::{DType, Tensor, D};
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, Patch, Result};

/// QK-fixed AtP scores for `HeadQ` or `HeadK`, over all positions, at each position, or at
/// labelled positions.
pub fn qk_fix(model: &HookedTransformer, data: &PatchingData, component: Component, positions: &Positions) -> Result<ScoreGrid> {
    if !matches!(component, Component::HeadQ | Component::HeadK) {
        return Err(Error::Input(format!("the QK fix applies to heads_q and heads_k, not {}", component.name())));
    }
    let (b, p) = data.check()?;
    positions.check(b, p)?;
    let n = model.cfg.n_layers;
    let (h, kvh) = (model.cfg.n_heads, model.cfg.n_kv_heads);
    let rep = h / kvh;
    let rot = model.hook_points().contains(&HookPoint::RotQ(0));
    let (qh, kh) = if rot {
        (HookPoint::RotQ as fn(usize) -> HookPoint, HookPoint::RotK as fn(usize) -> HookPoint)
    } else {
        (HookPoint::Q as fn(usize) -> HookPoint, HookPoint::K as fn(usize) -> HookPoint)
    };
    let qk: Vec<HookPoint> = (0..n).flat_map(|l| [qh(l), kh(l)]).collect();
    let mut hc = Hooks::new().cache_hooks(&qk);
    // The clean run's logits are not read: it stops after the last block.
    model.run_span(Some(data.clean), &data.cache_span(n), &mut hc)?;
    let hc = hc.take_cache();
    let pats: Vec<HookPoint> = (0..n).map(HookPoint::Pattern).collect();
    let mut cache_pts = qk.clone();
    cache_pts.extend(pats.iter().copied());
    let mut hk = Hooks::new().cache_hooks(&cache_pts).grad(&pats);
    let (span, reduced) = data.metric_span()?;
    let metric = reduced.as_deref().unwrap_or(data.metric);
    let run = model.run_span_with_grads(Some(data.corrupt), &span, &mut hk, |l| Ok(metric.per_row(l)?.mean_all()?))?;
    let hk = hk.take_cache();
    let nh = if component == Component::HeadQ { h } else { kvh };
    let mut grid = ScoreGrid::for_positions("atp_qk", component, positions, n, p, nh);
    // [b,p,heads,d] -> [b,heads,p,d], repeating KV heads for the query heads.
    let heads_first = |t: &Tensor, repeat: usize| -> Result<Tensor> {
        let t = ferrolens_model::transformer::repeat_kv(&t.to_dtype(DType::F64)?, repeat)?;
        Ok(t.transpose(1, 2)?.contiguous()?)
    };
    for l in 0..n {
        let a = hk.get(HookPoint::Pattern(l))?.to_dtype(DType::F64)?; // [b,h,q,k]
        let g = run.grads[&HookPoint::Pattern(l)].to_dtype(DType::F64)?;
        let q = heads_first(hk.get(qh(l))?, 1)?;
        let k = heads_first(hk.get(kh(l))?, rep)?;
        // The layer's mask (causal, sliding window, padding), 1 = allowed, as f64 [p,p] or [b,1,p,p].
        let mask = match (data.mask, model.attn_mask(l, p, p)?) {
            (Some(m), _) => model.attn_mask_padded(l, p, m)?.to_dtype(DType::F64)?,
            (None, Some(m)) => m.to_dtype(DType::F64)?,
            (None, None) => Tensor::ones((p, p), DType::F64, model.device())?,
        };
        // sum_k (A' - A) . g per query row, with A' the exact masked softmax of the model's own
        // scores of qq and kk: [b,h,q].
        let exact = |qq: &Tensor, kk: &Tensor| -> Result<Tensor> {
            let scores = model.attn_scores(l, qq, kk)?;
            let neg = Tensor::new(f64::NEG_INFINITY, model.device())?.broadcast_as(scores.shape())?;
            let scores = mask.broadcast_as(scores.shape())?.ne(0.0)?.where_cond(&scores, &neg)?;
            let a2 = candle_nn::ops::softmax(&scores, D::Minus1)?;
            Ok(((a2 - &a)? * &g)?.sum(D::Minus1)?)
        };
        // s[b, h, pos] for query heads, later summed into KV heads for keys.
        let s = match (component, positions.separate()) {
            (Component::HeadQ, _) => exact(&heads_first(hc.get(qh(l))?, 1)?, &k)?,
            // Every key position patched at once is not the sum of single-key patches: recompute.
            (_, false) => exact(&q, &heads_first(hc.get(kh(l))?, rep)?)?,
            (_, true) => {
                let kc = heads_first(hc.get(kh(l))?, rep)?;
                // D[b,h,q,s] = score(q, k_clean[s]) - score(q, k[s]) (the model's scale and
                // soft-cap), 0 where the key is masked.
                let delta = (model.attn_scores(l, &q, &kc)? - model.attn_scores(l, &q, &k)?)?.broadcast_mul(&mask)?;
                let e = (delta.exp()? - 1.0)?; // e^D - 1 (0 where masked)
                let ag = (&a * &g)?;
                let srow = ag.sum_keepdim(D::Minus1)?; // S_q [b,h,q,1]
                let r = ((&a * &e)? + 1.0)?; // 1 - A + A e^D
                let inv = r.recip()?;
                let term = ((inv.clone() - 1.0)?.broadcast_mul(&srow)? + ((&ag * &e)? * &inv)?)?.broadcast_mul(&mask)?;
                term.sum(2)? // over queries -> [b,h,s]
            }
        };
        let s = if component == Component::HeadK && rep > 1 { s.reshape((b, kvh, rep, p))?.sum(2)? } else { s };
        let per = gather_slots(&s.transpose(1, 2)?.contiguous()?, positions, p)?; // [slots][heads]
        for (slot, row) in per.iter().enumerate() {
            for (hi, x) in row.iter().enumerate() {
                let i = grid.idx(l, slot, hi);
                grid.values[i] = *x;
            }
        }
    }
    Ok(grid)
}

/// GradDrop AtP scores: the mean over layers `l` of |AtP| with the gradient through layer `l`'s
/// residual writes stopped. `opts` as in [`attribution`] (its `extra` patches are kept).
pub fn grad_drop(model: &HookedTransformer, data: &PatchingData, opts: &AttributionOptions) -> Result<Vec<ScoreGrid>> {
    let n = model.cfg.n_layers;
    let mut acc: Option<Vec<ScoreGrid>> = None;
    for l in 0..n {
        let stop = |h: HookPoint| Patch::new(h, Intervention::func(|x, _| Ok(x.detach())));
        let mut o = opts.clone();
        o.extra.extend([stop(HookPoint::AttnOut(l)), stop(HookPoint::MlpOut(l))]);
        o.name = Some("atp_graddrop".into());
        let a = attribution(model, data, &o)?;
        match &mut acc {
            None => {
                let mut g = a.grids;
                g.iter_mut().for_each(|g| g.values.iter_mut().for_each(|v| *v = v.abs() / n as f64));
                acc = Some(g);
            }
            Some(acc) => {
                for (t, g) in acc.iter_mut().zip(a.grids) {
                    t.values.iter_mut().zip(g.values).for_each(|(t, v)| *t += v.abs() / n as f64);
                }
            }
        }
    }
    Ok(acc.unwrap_or_default())
}
