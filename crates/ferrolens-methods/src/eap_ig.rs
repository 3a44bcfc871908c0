//! Edge attribution with integrated gradients (EAP-IG, Hanna et al. 2024, "Have faith in
//! faithfulness"), in the two variants the MIB circuit track runs, and plain EAP in MIB's
//! convention, scoring every edge of an [`EdgeGraph`] (the input embedding included).
//!
//! `score(s -> r) = mean over prompts of sum over positions and d_model of
//! (out_s(clean) - out_s(ablated)) . mean over runs of dm/d(in_r)`, with `m` the per-prompt
//! metric (`data.metric`) and `ablated` the corrupt run or the per-position mean
//! ([`AblatedSenders`]). A positive score estimates the drop of `m` when the edge is ablated.
//! This is MIB's `(corrupt - clean) . d(-logit diff)` up to a constant factor (MIB averages the
//! metric over the batch and the scores over prompts, so its scores are ours divided by its batch
//! size); rankings are the same. The runs, as EAP-IG's code (hannamw/EAP-IG at the commit MIB
//! pins):
//! - [`EapVariant::Eap`]: the clean prompts, once.
//! - [`EapVariant::IgInputs`]: the input embedding interpolated, `ablated + k/m (clean -
//!   ablated)` for `k = 0 .. m-1` (a left Riemann sum: the corrupt end included, the clean end
//!   not; with one step this is EAP with the gradient at the corrupt run, which is what
//!   [`crate::edges::edge_attribution`] computes).
//! - [`EapVariant::IgActivations`]: for each node group in turn (the input, each layer's heads
//!   together, each MLP) its output interpolated `k/m clean + (1 - k/m) ablated`, `k = 1 .. m`,
//!   every other node clean; every receiver's gradient averaged over all `(1 + 2 L) m` runs (as
//!   the pinned code does). The interpolated output is a constant of the run (the pinned code
//!   returns it as a new tensor), so no gradient flows back through that node: with one step
//!   this is not EAP, except into the logits.
//!
//! Heads of families with a post-attention norm (Gemma, OLMo-2) write `ln1_post` of their sum:
//! a head's difference is linearised at the clean run.

use crate::edge_circuit::{sender_outputs, AblatedSenders, EdgeGraph, Sender};
use crate::patching::PatchingData;
use candle_core::{DType, Tensor};
use ferrolens_model::layout::matmul;
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, NormSite, Patch, Result};
use serde::{Deserialize, Serialize};

/// Which gradient EAP multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EapVariant {
    /// The gradient at the clean run (MIB's "EAP").
    Eap,
    /// Integrated gradients over the input embedding (MIB's "EAP-IG-inputs").
    #[default]
    IgInputs,
    /// Integrated gradients over each node's output (MIB's "EAP-IG-activations").
    IgActivations,
}

impl EapVariant {
    /// `eap` / `eap_ig` / `eap_ig_act`.
    pub fn name(&self) -> &'static str {
        match self {
            EapVariant::Eap => "eap",
            EapVariant::IgInputs => "eap_ig",
            EapVariant::IgActivations => "eap_ig_act",
        }
    }
}

/// Options of [`eap_ig`].
#[derive(Debug, Clone, Copy)]
pub struct EapIgOptions {
    /// Which runs the gradient is averaged over.
    pub variant: EapVariant,
    /// Interpolation steps `m` (MIB's default 5); ignored by [`EapVariant::Eap`].
    pub steps: usize,
    /// Most rows (prompts x interpolation steps) in one forward and backward.
    pub max_rows: usize,
}

impl Default for EapIgOptions {
    fn default() -> Self {
        EapIgOptions { variant: EapVariant::IgInputs, steps: 5, max_rows: 160 }
    }
}

/// Gradient runs: the hook interpolated with its chunk (`None`: the clean run), and the alphas.
type Runs = Vec<(Option<(HookPoint, usize)>, Vec<f64>)>;

/// Scores of every edge of `graph` (in its order) by `opts.variant`, ablating with `ablated`.
/// `progress(done, total)` after each forward and backward.
pub fn eap_ig(
    model: &HookedTransformer,
    data: &PatchingData,
    graph: &EdgeGraph,
    ablated: &AblatedSenders,
    opts: &EapIgOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<f64>> {
    let (b, p) = data.check()?;
    graph.check(model)?;
    if opts.steps == 0 && opts.variant != EapVariant::Eap {
        return Err(Error::Input("EAP-IG needs at least one interpolation step (--ig-steps 1 or more)".into()));
    }
    let n = model.cfg.n_layers;
    let d = model.cfg.d_model;
    let clean = sender_outputs(model, data.clean, data.mask)?;
    // The runs: (hook interpolated and its chunk, alphas); `None`: the clean run.
    let steps = opts.steps.max(1);
    let runs: Runs = match opts.variant {
        EapVariant::Eap => vec![(None, vec![1.0])],
        EapVariant::IgInputs => vec![(Some((HookPoint::Embed, 0)), (0..steps).map(|k| k as f64 / steps as f64).collect())],
        EapVariant::IgActivations => {
            let alphas: Vec<f64> = (1..=steps).map(|k| k as f64 / steps as f64).collect();
            let mut v = vec![(Some((HookPoint::Embed, 0)), alphas.clone())];
            for l in 0..n {
                v.push((Some((HookPoint::Result(l), 1 + 2 * l)), alphas.clone()));
                v.push((Some((HookPoint::MlpOut(l), 2 + 2 * l)), alphas.clone()));
            }
            v
        }
    };
    let per = (opts.max_rows / b).max(1);
    // Gradients are summed in f32 (f64 for an f64 model): 4 bytes per receiver, prompt, position
    // and model dimension.
    let acc_dtype = if model.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let forwards: Runs = runs.iter().flat_map(|(h, alphas)| alphas.chunks(per).map(move |a| (*h, a.to_vec()))).collect();
    let total_runs: usize = runs.iter().map(|(_, a)| a.len()).sum();
    // Gradient rows of every receiver layer (index n: the logits), summed over runs, [R_l, b*p*D].
    let mut acc: Vec<Option<Tensor>> = vec![None; n + 1];
    let recv_of_layer = |l: usize| -> Vec<usize> { (0..graph.receivers.len()).filter(|&r| graph.receiver_layer(graph.receivers[r]) == l).collect() };
    let mut grad_points = vec![HookPoint::ResidPost(n - 1)];
    let mut cache_points = Vec::new();
    for l in 0..n {
        grad_points.push(HookPoint::MlpIn(l));
        if graph.head_inputs {
            grad_points.extend([HookPoint::Q(l), HookPoint::K(l), HookPoint::V(l)]);
            cache_points.push(HookPoint::AttnIn(l));
        } else {
            grad_points.push(HookPoint::AttnIn(l));
        }
    }
    // The gradient runs unembed the last position's columns the metric reads.
    let (metric_span, reduced) = data.metric_span()?;
    let (metric, columns) = (reduced.as_deref().unwrap_or(data.metric), metric_span.columns);
    for (fi, (interp, alphas)) in forwards.iter().enumerate() {
        let k = alphas.len();
        let tokens = Tensor::cat(&std::iter::repeat_n(data.clean, k).collect::<Vec<_>>(), 0)?;
        let mask = data.mask_rows(k)?;
        let mut hooks = Hooks::new().cache_hooks(&cache_points).grad(&grad_points);
        if let Some((hook, c)) = interp {
            let (hi, lo) = (&clean[*c], &ablated.chunks[*c]);
            let diff = hi.broadcast_sub(lo)?;
            let rows: Vec<Tensor> = alphas.iter().map(|a| lo.broadcast_add(&(&diff * *a)?)).collect::<candle_core::Result<_>>()?;
            let x = Tensor::cat(&rows, 0)?.to_dtype(model.dtype())?;
            hooks = hooks.patch(Patch::new(*hook, Intervention::Replace(x)));
        }
        let span = ferrolens_model::RunSpan { last_logits_only: true, mask, columns: columns.clone(), ..Default::default() };
        let run = model.run_span_with_grads(Some(&tokens), &span, &mut hooks, |logits| Ok(metric.per_row(logits)?.sum_all()?))?;
        let cache = hooks.take_cache();
        // Sum a [k*b, p, D]-shaped gradient (any leading axes before it) over the k copies.
        let fold = |g: Tensor, lead: usize| -> Result<Tensor> { Ok(g.to_dtype(acc_dtype)?.reshape((lead, k, b * p * d))?.sum(1)?) };
        for (l, slot) in acc.iter_mut().enumerate() {
            let mut rows = Vec::new();
            if l == n {
                rows.push(fold(run.grads[&HookPoint::ResidPost(n - 1)].clone(), 1)?);
            } else {
                if graph.head_inputs {
                    let attn_in = cache.get(HookPoint::AttnIn(l))?;
                    let aw = &model.w.blocks[l].attn;
                    for (hook, w) in [(HookPoint::Q(l), &aw.w_q), (HookPoint::K(l), &aw.w_k), (HookPoint::V(l), &aw.w_v)] {
                        let g = &run.grads[&hook]; // [kb, p, c, dh]
                        let (kb, _, c, dh) = g.dims4()?;
                        let gt = g.permute((2, 0, 1, 3))?.contiguous()?.reshape((c, kb * p, dh))?;
                        let wt = w.reshape((d, c, dh))?.permute((1, 2, 0))?.contiguous()?; // [c, dh, D]
                        let gx = matmul(&gt, &wt)?.reshape((c, kb, p, d))?;
                        rows.push(fold(model.norm_vjp(NormSite::Ln1(l), attn_in, &gx)?, c)?);
                    }
                } else {
                    rows.push(fold(run.grads[&HookPoint::AttnIn(l)].clone(), 1)?);
                }
                rows.push(fold(run.grads[&HookPoint::MlpIn(l)].clone(), 1)?);
            }
            let g = Tensor::cat(&rows, 0)?;
            *slot = Some(match slot.take() {
                Some(a) => (a + g)?,
                None => g,
            });
        }
        progress(fi + 1, forwards.len());
    }
    // Sender differences in the residual stream, per chunk [s_c, b*p*D] f64.
    let mut diffs = Vec::with_capacity(1 + 2 * n);
    for (c, (hi, lo)) in clean.iter().zip(&ablated.chunks).enumerate() {
        let diff = hi.broadcast_sub(lo)?.to_dtype(DType::F64)?;
        let diff = if c % 2 == 1 {
            let l = (c - 1) / 2;
            let diff = if model.w.blocks[l].ln1_post.is_some() {
                let mut x = hi.sum_keepdim(2)?;
                if let Some(bo) = &model.w.blocks[l].attn.b_o {
                    x = x.broadcast_add(bo)?;
                }
                model.norm_jvp(NormSite::Ln1Post(l), &x, &diff)?
            } else {
                diff
            };
            let h = diff.dim(2)?;
            diff.permute((2, 0, 1, 3))?.contiguous()?.reshape((h, b * p * d))?
        } else {
            diff.broadcast_as((b, p, d))?.contiguous()?.reshape((1, b * p * d))?
        };
        diffs.push(diff);
    }
    let norm = (b * total_runs) as f64;
    let mut scores = vec![0.0; graph.len()];
    for (l, g) in acc.into_iter().enumerate() {
        let g = g.expect("every layer accumulated").to_dtype(DType::F64)?.t()?.contiguous()?; // [bpD, R]
        let rs = recv_of_layer(l);
        for (c, diff) in diffs.iter().enumerate() {
            let s = (matmul(diff, &g)? / norm)?.to_vec2::<f64>()?; // [s_c, R]
            for (k, row) in s.iter().enumerate() {
                let sender = graph.sender_id(chunk_sender(c, k));
                for (j, &r) in rs.iter().enumerate() {
                    if let Some(e) = graph.edge_at(sender, r) {
                        scores[e] = row[j];
                    }
                }
            }
        }
    }
    Ok(scores)
}

/// The sender `k` of chunk `c` (chunk order of [`AblatedSenders::chunks`]).
fn chunk_sender(c: usize, k: usize) -> Sender {
    match c {
        0 => Sender::Input,
        c if c % 2 == 1 => Sender::Head((c - 1) / 2, k),
        c => Sender::Mlp((c - 2) / 2),
    }
}
