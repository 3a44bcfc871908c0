//! Repairing Colored Objects with the IOI circuit's inhibition heads (Merullo, Eickhoff, Pavlick
//! 2024, "Circuit Component Reuse Across Tasks in Transformer Language Models", Sec. 5: forcing
//! three inhibition heads and one negative mover head of GPT-2 Medium to attend to the incorrect
//! colours raised its Colored Objects accuracy from 49.6 % to 93.7 %).
//!
//! 1. **Heads** ([`inhibition_heads`]): the IOI circuit's heads by attribution (AtP at the clean
//!    run, noising: the `circuit_heads` heads with the largest |score|), classified by attention
//!    ([`crate::circuit::ioi_head_classes`]); the `n_inhibition` S-inhibition heads attending
//!    most from the end to S2, and the `n_negative` negative name movers with the most negative
//!    score.
//! 2. **Intervention** ([`colored_accuracy`]): on the Colored Objects prompts, the attention of
//!    each chosen head at the last position is replaced by a uniform distribution over the
//!    tokens of the listed colours that are *not* the answer (the pattern after the softmax,
//!    `hook_pattern`). This is our reading of the paper's Sec. 5 (its code release does not
//!    contain the intervention): an inhibition head that attends to the wrong colours tells the
//!    mover heads to avoid them, as S-inhibition heads attending to S2 do in IOI.
//! 3. **Control**: the same intervention on as many random heads, several seeded draws.
//!
//! Accuracy: the answer colour has the largest logit among the eight colour answers (`" Red"`,
//! `" Orange"`, ..., or `" red"`, ... in the statement wording) at the last position.

use crate::circuit::{ioi_head_classes, Node};
use crate::scores::Component;
use crate::study::{prepare, run_methods, Batching, Method, RunOptions};
use crate::Direction;
use candle_core::{DType, Tensor, D};
use ferrolens_model::{Error, HookPoint, HookedTransformer, Hooks, Intervention, LrpRules, Patch, Result};
use ferrolens_tasks::colored::{query_colors, Wording, COLORS};
use ferrolens_tasks::PairBatch;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Options of [`repair`].
#[derive(Debug, Clone, Copy)]
pub struct RepairOptions {
    /// Heads taken as the IOI circuit (largest |AtP| score).
    pub circuit_heads: usize,
    /// S-inhibition heads to intervene on (the paper: 3).
    pub n_inhibition: usize,
    /// Negative name movers to intervene on (the paper: 1).
    pub n_negative: usize,
    /// Random-head control draws.
    pub random_draws: usize,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for RepairOptions {
    fn default() -> Self {
        RepairOptions { circuit_heads: 40, n_inhibition: 3, n_negative: 1, random_draws: 5, seed: 0 }
    }
}

/// A head chosen for the intervention.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChosenHead {
    /// `(layer, head)`.
    pub head: (usize, usize),
    /// `S-inhibition` or `negative name mover`.
    pub class: String,
    /// Its AtP score on IOI (drop of the normalised logit difference).
    pub score: f64,
    /// Its class's attention probe on IOI (end -> S2, or end -> IO).
    pub attention: f64,
}

/// The IOI circuit's inhibition-like heads (module docs, step 1) from IOI pairs `ioi` (with the
/// IOI labels `IO`, `S1`, `S1+1`, `S2`, `end`).
pub fn inhibition_heads(model: &HookedTransformer, ioi: &PairBatch, opts: &RepairOptions) -> Result<Vec<ChosenHead>> {
    let prep = prepare(model, ioi)?;
    let ro = RunOptions {
        by_pos: false,
        resid_by_pos: false,
        rules: LrpRules::NONE,
        direction: Direction::Noise,
        at_clean: true,
        batching: Batching::Pad,
        progress: None,
        shard: None,
    };
    let run = run_methods(model, ioi, &prep, &[Method::Atp], &[Component::HeadZ], &ro)?;
    let grid = &run.grids[0];
    let mut scores = BTreeMap::new();
    for l in 0..model.cfg.n_layers {
        for h in 0..model.cfg.n_heads {
            scores.insert(Node::Head(l, h), grid.get(l, 0, h));
        }
    }
    let mut ranked: Vec<Node> = scores.keys().copied().collect();
    ranked.sort_by(|a, b| scores[b].abs().total_cmp(&scores[a].abs()));
    ranked.truncate(opts.circuit_heads);
    let classes = ioi_head_classes(model, &prep, ioi, &ranked, &scores)?;
    if classes.is_empty() {
        return Err(Error::Input("the IOI pairs carry no position labels (IO, S1, S1+1, S2, end); generate them with `ferrolens data --task ioi`".into()));
    }
    let pick = |class: &str, n: usize, key: &dyn Fn(&(Node, String, f64)) -> f64| -> Vec<ChosenHead> {
        let mut v: Vec<&(Node, String, f64)> = classes.iter().filter(|c| c.1 == class).collect();
        v.sort_by(|a, b| key(b).total_cmp(&key(a)));
        v.into_iter()
            .take(n)
            .filter_map(|(node, class, att)| match node {
                Node::Head(l, h) => Some(ChosenHead { head: (*l, *h), class: class.clone(), score: scores[node], attention: *att }),
                Node::Mlp(_) => None,
            })
            .collect()
    };
    let mut out = pick("S-inhibition", opts.n_inhibition, &|c| c.2);
    out.extend(pick("negative name mover", opts.n_negative, &|c| -scores[&c.0]));
    if out.is_empty() {
        return Err(Error::Input(format!(
            "no S-inhibition or negative name-mover head among the IOI circuit's {} heads; raise circuit_heads",
            opts.circuit_heads
        )));
    }
    Ok(out)
}

/// Accuracy and mean logit difference of Colored Objects prompts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ColoredScore {
    /// Fraction of prompts whose answer colour has the largest logit among the colour answers.
    pub accuracy: f64,
    /// Mean `logit[answer] - logit[wrong]` (the pair's wrong colour).
    pub logit_diff: f64,
}

/// [`ColoredScore`] of the clean prompts of `batch` (Colored Objects; prompts of different
/// lengths run left-padded), with the last-position attention of `heads` set uniformly onto the
/// query's wrong colours.
pub fn colored_accuracy(model: &HookedTransformer, batch: &PairBatch, heads: &[(usize, usize)]) -> Result<ColoredScore> {
    let tok = model.tokenizer()?;
    // Prompts of different lengths are left-padded (every answer is read at the last position).
    let p = batch.clean.iter().map(|c| c.len()).max().unwrap_or(0);
    let pads: Vec<usize> = batch.clean.iter().map(|c| p - c.len()).collect();
    let b = batch.len();
    // The colour answers in the batch's wording (`" Red"` or `" red"`).
    let wording = if batch.pairs[0].answer.trim().starts_with(char::is_uppercase) { Wording::Qa } else { Wording::Statement };
    let answers: Vec<u32> = COLORS.iter().filter_map(|c| tok.single_token(&wording.answer(c)).ok()).collect();
    // Target pattern rows [b, k]: uniform over the wrong colours of each prompt's query.
    let mut target = vec![0f32; b * p];
    for (i, pair) in batch.pairs.iter().enumerate() {
        let colors = query_colors(tok, &pair.clean)?
            .ok_or_else(|| Error::Input(format!("pair {i} is not a Colored Objects prompt: its last question lists no colours")))?;
        let answer = pair.answer.trim().to_lowercase();
        let wrong: Vec<usize> = colors.iter().filter(|(c, _)| *c != answer).map(|(_, j)| *j).collect();
        if wrong.is_empty() {
            return Err(Error::Input(format!("pair {i}: the query lists no colour other than the answer")));
        }
        for j in &wrong {
            target[i * p + pads[i] + j] = 1.0 / wrong.len() as f32;
        }
    }
    let target = Tensor::from_vec(target, (b, 1, 1, p), model.device())?.to_dtype(model.dtype())?;
    let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(l, h) in heads {
        if l >= model.cfg.n_layers || h >= model.cfg.n_heads {
            return Err(Error::Input(format!("L{l}H{h} is not a head of this model")));
        }
        by_layer.entry(l).or_default().push(h);
    }
    let mut hooks = Hooks::new();
    for (l, hs) in by_layer {
        let full = target.broadcast_as((b, model.cfg.n_heads, p, p))?.contiguous()?;
        hooks = hooks.patch(Patch::new(HookPoint::Pattern(l), Intervention::Replace(full)).heads(&hs).positions(&[p - 1]));
    }
    let (tokens, mask) = if pads.iter().all(|&x| x == 0) {
        (model.tokens_tensor(&batch.clean)?, None)
    } else {
        let (t, m) = model.tokens_padded(&batch.clean, ferrolens_model::PadSide::Left)?;
        (t, Some(m))
    };
    let logits = model.run_span(Some(&tokens), &ferrolens_model::RunSpan { last_logits_only: true, mask, ..Default::default() }, &mut hooks)?;
    let last = logits.squeeze(1)?.to_dtype(DType::F32)?; // [b, V]
    let ids = Tensor::new(answers.as_slice(), model.device())?;
    let color_logits = last.index_select(&ids, 1)?; // [b, 8]
    let best: Vec<u32> = color_logits.argmax(D::Minus1)?.to_vec1()?;
    let rows: Vec<Vec<f32>> = last.to_vec2()?;
    let mut correct = 0usize;
    let mut ld = 0.0;
    for i in 0..b {
        if answers[best[i] as usize] == batch.answer[i] {
            correct += 1;
        }
        ld += (rows[i][batch.answer[i] as usize] - rows[i][batch.wrong[i] as usize]) as f64;
    }
    Ok(ColoredScore { accuracy: correct as f64 / b as f64, logit_diff: ld / b as f64 })
}

/// The outcome of [`repair`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairReport {
    /// The heads intervened on.
    pub heads: Vec<ChosenHead>,
    /// No intervention.
    pub before: ColoredScore,
    /// The chosen heads.
    pub after: ColoredScore,
    /// Only the S-inhibition heads, and only the negative movers (when both kinds were found).
    pub parts: Vec<(String, ColoredScore)>,
    /// Random heads, as many as chosen, per draw: `(heads, score)`.
    pub random: Vec<(Vec<(usize, usize)>, ColoredScore)>,
}

/// The whole experiment (module docs): heads from `ioi`, accuracy on `colored` before, after,
/// per kind of head, and for random heads.
pub fn repair(model: &HookedTransformer, ioi: &PairBatch, colored: &PairBatch, opts: &RepairOptions) -> Result<RepairReport> {
    let heads = inhibition_heads(model, ioi, opts)?;
    let chosen: Vec<(usize, usize)> = heads.iter().map(|h| h.head).collect();
    let before = colored_accuracy(model, colored, &[])?;
    let after = colored_accuracy(model, colored, &chosen)?;
    let mut parts = Vec::new();
    for class in ["S-inhibition", "negative name mover"] {
        let hs: Vec<(usize, usize)> = heads.iter().filter(|h| h.class == class).map(|h| h.head).collect();
        if !hs.is_empty() && hs.len() < chosen.len() {
            parts.push((class.to_string(), colored_accuracy(model, colored, &hs)?));
        }
    }
    let all: Vec<(usize, usize)> = (0..model.cfg.n_layers).flat_map(|l| (0..model.cfg.n_heads).map(move |h| (l, h))).filter(|h| !chosen.contains(h)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut random = Vec::new();
    for _ in 0..opts.random_draws {
        let mut pool = all.clone();
        pool.shuffle(&mut rng);
        pool.truncate(chosen.len());
        pool.sort();
        let s = colored_accuracy(model, colored, &pool)?;
        random.push((pool, s));
    }
    Ok(RepairReport { heads, before, after, parts, random })
}
