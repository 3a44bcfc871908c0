//! Head scores from attention patterns: attention between labelled positions (IOI head classes)
//! and TransformerLens's head detectors (previous-token, duplicate-token, induction).

use candle_core::{DType, IndexOp, Tensor};
use ferrolens_model::{HookPoint, HookedTransformer, Hooks, Result, RunSpan};
use std::collections::BTreeMap;

/// Mean attention (over prompts) from a query label to a key label, for every head and every
/// `(query, key)` probe: `[probe][layer][head]`, from one forward pass. `labels[i]` maps label names
/// to token positions of prompt `i` in `tokens` (a left-padded batch with `mask`: positions in the
/// padded rows); `None` when some prompt lacks a label.
pub fn attention_between(
    model: &HookedTransformer,
    tokens: &Tensor,
    mask: Option<&Tensor>,
    labels: &[BTreeMap<String, usize>],
    probes: &[(&str, &str)],
) -> Result<Option<Vec<Vec<Vec<f64>>>>> {
    if labels.iter().any(|m| probes.iter().any(|(q, k)| !m.contains_key(*q) || !m.contains_key(*k))) {
        return Ok(None);
    }
    let n = model.cfg.n_layers;
    let pts: Vec<HookPoint> = (0..n).map(HookPoint::Pattern).collect();
    let mut hooks = Hooks::new().cache_hooks(&pts);
    model.run_span(Some(tokens), &RunSpan { mask: mask.cloned(), ..Default::default() }, &mut hooks)?;
    let c = hooks.cache_ref();
    let mut out = vec![vec![vec![0f64; model.cfg.n_heads]; n]; probes.len()];
    for l in 0..n {
        let pat = c.get(HookPoint::Pattern(l))?.to_dtype(DType::F64)?; // [b,h,q,k]
        for (per_probe, (query, key)) in out.iter_mut().zip(probes) {
            for (i, m) in labels.iter().enumerate() {
                let a = pat.i((i, .., m[*query], m[*key]))?.to_vec1::<f64>()?;
                for (h, v) in a.into_iter().enumerate() {
                    per_probe[l][h] += v / labels.len() as f64;
                }
            }
        }
    }
    Ok(Some(out))
}

/// The head detectors of TransformerLens's `head_detector` module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detector {
    /// Attention from position i to i-1.
    PreviousToken,
    /// Attention from i to earlier positions j holding the same token.
    DuplicateToken,
    /// The duplicate-token pattern shifted one column right (attend to the token after the earlier copy).
    Induction,
}

impl Detector {
    /// All three.
    pub const ALL: [Detector; 3] = [Detector::PreviousToken, Detector::DuplicateToken, Detector::Induction];

    /// `previous_token` / `duplicate_token` / `induction`.
    pub fn name(&self) -> &'static str {
        match self {
            Detector::PreviousToken => "previous_token",
            Detector::DuplicateToken => "duplicate_token",
            Detector::Induction => "induction",
        }
    }

    /// The reference pattern `[p*p]` (row = query) for one prompt, as TL builds it.
    pub fn pattern(&self, tokens: &[u32]) -> Vec<f64> {
        let p = tokens.len();
        let mut m = vec![0f64; p * p];
        match self {
            Detector::PreviousToken => {
                for i in 1..p {
                    m[i * p + i - 1] = 1.0;
                }
            }
            Detector::DuplicateToken | Detector::Induction => {
                let shift = usize::from(*self == Detector::Induction);
                for i in 0..p {
                    for j in 0..p {
                        // duplicate: tok_i == tok_j, j != i, lower triangle; induction: column j+1.
                        if j != i && tokens[i] == tokens[j] {
                            let c = j + shift;
                            if c < p && c <= i && (shift == 1 || j < i) {
                                m[i * p + c] = 1.0;
                            }
                        }
                    }
                }
            }
        }
        m
    }
}

/// TL `head_detector` scores with the `mul` measure for each of `detectors` (one forward per
/// prompt serves them all): per prompt and head `sum(A * P) / sum(A)`, averaged over prompts;
/// `[detector][layer][head]`. `exclude_bos` zeroes attention to position 0, `exclude_current` the
/// diagonal, before scoring (both off in TL by default).
pub fn detect_heads(
    model: &HookedTransformer,
    tokens: &[Vec<u32>],
    detectors: &[Detector],
    exclude_bos: bool,
    exclude_current: bool,
) -> Result<Vec<Vec<Vec<f64>>>> {
    let n = model.cfg.n_layers;
    let nh = model.cfg.n_heads;
    let mut out = vec![vec![vec![0f64; nh]; n]; detectors.len()];
    let pts: Vec<HookPoint> = (0..n).map(HookPoint::Pattern).collect();
    for t in tokens {
        let p = t.len();
        let tt = model.tokens_tensor(std::slice::from_ref(t))?;
        let mut hooks = Hooks::new().cache_hooks(&pts);
        model.run(&tt, &mut hooks)?;
        let refs: Vec<Vec<f64>> = detectors.iter().map(|d| d.pattern(t)).collect();
        for l in 0..n {
            let pat = hooks.cache_ref().get(HookPoint::Pattern(l))?.to_dtype(DType::F64)?.i(0)?; // [h,q,k]
            let v: Vec<Vec<Vec<f64>>> = pat.to_vec3()?;
            for (h, a) in v.iter().enumerate() {
                for (scores, refp) in out.iter_mut().zip(&refs) {
                    let (mut num, mut den) = (0.0, 0.0);
                    for i in 0..p {
                        for j in 0..p {
                            let mut x = a[i][j];
                            if (exclude_bos && j == 0) || (exclude_current && i == j) {
                                x = 0.0;
                            }
                            num += x * refp[i * p + j];
                            den += x;
                        }
                    }
                    scores[l][h] += if den > 0.0 { num / den } else { 0.0 } / tokens.len() as f64;
                }
            }
        }
    }
    Ok(out)
}

/// `batch` prompts of `half` random tokens repeated twice (ids drawn from `lo..hi` with a small
/// LCG seeded by `seed`), optionally preceded by `bos`.
pub fn repeated_random_tokens(batch: usize, half: usize, lo: u32, hi: u32, seed: u64, bos: Option<u32>) -> Vec<Vec<u32>> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..batch)
        .map(|_| {
            let r: Vec<u32> = (0..half)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    lo + ((x >> 33) % (hi - lo) as u64) as u32
                })
                .collect();
            bos.into_iter().chain(r.iter().copied()).chain(r.iter().copied()).collect()
        })
        .collect()
}
