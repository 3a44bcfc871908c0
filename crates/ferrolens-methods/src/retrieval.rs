//! Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
//! Factuality"): heads that copy tokens from a needle hidden in a long context.
//!
//! A needle sentence is inserted at depth `d` of a haystack cut to `L` tokens (backing up to a
//! sentence boundary), the question is appended and the model decodes greedily with a KV cache.
//! At each decode step `t`, for every head, let `i*` be the key position its last query attends
//! to most. If `i*` lies in the answer's span inside the needle and the token just generated
//! equals `prompt[i*]`, the head scores a copy hit. The score of a run is `hits / span length`; runs whose answer
//! is wrong (ROUGE-1 recall of the answer below 0.5) are dropped, and a head's retrieval score is
//! the mean over the kept runs. Heads scoring above 0.1 are retrieval heads.
//!
//! The argmax is taken inside attention ([`KvCache::with_argmax`]); no attention pattern is
//! stored, and the prompt is prefilled in chunks, so memory grows linearly with `L`.

use ferrolens_model::{Error, HookedTransformer, Hooks, KvCache, Result, Tensor, Tokenizer};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::ops::Range;

/// One needle: the sentence hidden in the haystack, the question and the expected answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Needle {
    /// The sentence inserted into the haystack.
    pub needle: String,
    /// The question appended after the haystack.
    pub question: String,
    /// The reference answer, a part of the needle: ROUGE-1 recall is measured against it, and
    /// its tokens in the prompt are the span where copy hits count.
    pub answer: String,
}

/// Three built-in needles: facts the haystack does not contain, each answered by copying.
pub fn default_needles() -> Vec<Needle> {
    let n = |needle: &str, question: &str, answer: &str| Needle { needle: needle.into(), question: question.into(), answer: answer.into() };
    vec![
        n(
            "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
            "What is the best thing to do in San Francisco?",
            "eat a sandwich and sit in Dolores Park on a sunny day",
        ),
        n(
            "The secret ingredient in Grandma Rosa's tomato soup is a spoonful of smoked paprika from Lisbon.",
            "What is the secret ingredient in Grandma Rosa's tomato soup?",
            "a spoonful of smoked paprika from Lisbon",
        ),
        n(
            "The password to the old lighthouse on Marble Island is silver falcon seventeen.",
            "What is the password to the old lighthouse on Marble Island?",
            "silver falcon seventeen",
        ),
    ]
}

/// How the context and the question are wrapped around each other.
#[derive(Debug, Clone)]
pub struct PromptFormat {
    /// Text before the haystack.
    pub prefix: String,
    /// Text between the haystack and the question.
    pub before_question: String,
    /// Text after the question (where the answer starts).
    pub suffix: String,
}

impl PromptFormat {
    /// ChatML (`<|im_start|>user ... <|im_start|>assistant`) when the tokenizer knows
    /// `<|im_start|>` (SmolLM2, Qwen), else Wu et al.'s "... Based on the content of the book,
    /// Question: {q}\nAnswer:" layout.
    pub fn for_tokenizer(tok: &Tokenizer) -> Self {
        if tok.token_to_id("<|im_start|>").is_some() && tok.token_to_id("<|im_end|>").is_some() {
            PromptFormat {
                prefix: "<|im_start|>user\nRead the document and answer the question.\n<document>\n".into(),
                before_question: "\n</document>\nQuestion: ".into(),
                suffix: " Answer in one sentence, using the document.<|im_end|>\n<|im_start|>assistant\n".into(),
            }
        } else {
            // Wu et al.'s layout.
            PromptFormat {
                prefix: "This is a very long story book: <book> ".into(),
                before_question: " </book>.\nBased on the content of the book, Question: ".into(),
                suffix: "\nAnswer:".into(),
            }
        }
    }
}

/// A needle-in-a-haystack prompt.
#[derive(Debug, Clone)]
pub struct NiahPrompt {
    /// Token ids of the whole prompt `[L]` (no BOS unless the format holds one).
    pub ids: Vec<u32>,
    /// Where the needle's tokens are in `ids`.
    pub needle_span: Range<usize>,
    /// Where the answer's tokens are in `ids` (inside the needle): the span copy hits count in
    /// (Wu et al.: the token window best matching the answer).
    pub answer_span: Range<usize>,
    /// Requested depth in `[0, 1]` (fraction of the haystack before the needle).
    pub depth: f64,
    /// Actual depth after backing up to a sentence boundary.
    pub actual_depth: f64,
}

/// Tokens that end a sentence in `tok`'s vocabulary: ids whose text ends with `.`, `!` or `?`.
fn ends_sentence(tok: &Tokenizer, id: u32) -> bool {
    tok.decode(&[id]).map(|s| s.trim_end().ends_with(['.', '!', '?'])).unwrap_or(false)
}

/// Build the prompt for `needle` at `depth` in a haystack (`haystack` = its token ids) such that
/// the whole prompt is `length` tokens. Errors when the haystack is too short or the frame and
/// needle leave no room for it.
pub fn build_prompt(tok: &Tokenizer, fmt: &PromptFormat, haystack: &[u32], needle: &Needle, length: usize, depth: f64) -> Result<NiahPrompt> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(Error::Input(format!("depth {depth} is outside [0, 1]")));
    }
    let prefix = tok.encode_prompt(&fmt.prefix)?;
    let question = tok.encode(&format!("{}{}{}", fmt.before_question, needle.question, fmt.suffix))?;
    let needle_ids = tok.encode(&format!(" {}", needle.needle.trim()))?;
    let frame = prefix.len() + question.len() + needle_ids.len();
    if length <= frame + 16 {
        return Err(Error::Input(format!(
            "a context of {length} tokens leaves no room for the haystack: the prompt frame, question and needle take {frame}; ask for a longer context"
        )));
    }
    let budget = length - frame;
    if budget > haystack.len() {
        return Err(Error::Input(format!(
            "the haystack has {} tokens but a {length}-token context needs {budget}; give a longer haystack or a shorter length",
            haystack.len()
        )));
    }
    let hay = &haystack[..budget];
    let mut at = ((budget as f64) * depth).round() as usize;
    while at > 0 && !ends_sentence(tok, hay[at - 1]) {
        at -= 1;
    }
    let mut ids = Vec::with_capacity(length);
    ids.extend_from_slice(&prefix);
    ids.extend_from_slice(&hay[..at]);
    let start = ids.len();
    ids.extend_from_slice(&needle_ids);
    let end = ids.len();
    ids.extend_from_slice(&hay[at..]);
    ids.extend_from_slice(&question);
    let answer = answer_window(&needle_ids, &tok.encode(&format!(" {}", needle.answer.trim()))?).ok_or_else(|| {
        Error::Input(format!("the answer {:?} does not occur in the needle {:?}; the answer must be a part of the needle", needle.answer, needle.needle))
    })?;
    Ok(NiahPrompt { ids, needle_span: start..end, answer_span: start + answer.start..start + answer.end, depth, actual_depth: at as f64 / budget as f64 })
}

/// The window of `needle` (token ids) that best matches `answer`, as Wu et al.'s
/// `find_needle_idx`: windows of the answer's length, scored by the fraction of the answer's
/// distinct tokens they contain; the first best window, if it holds more than half of them.
pub fn answer_window(needle: &[u32], answer: &[u32]) -> Option<Range<usize>> {
    use std::collections::HashSet;
    let want: HashSet<u32> = answer.iter().copied().collect();
    if want.is_empty() || answer.len() > needle.len() {
        return None;
    }
    let mut best: Option<(f64, usize)> = None;
    for i in 0..=needle.len() - answer.len() {
        let have: HashSet<u32> = needle[i..i + answer.len()].iter().copied().collect();
        let overlap = have.intersection(&want).count() as f64 / want.len() as f64;
        if best.is_none_or(|(b, _)| overlap > b) {
            best = Some((overlap, i));
        }
    }
    best.filter(|(o, _)| *o > 0.5).map(|(_, i)| i..i + answer.len())
}

/// The outcome of one greedy decode with copy-hit counting.
#[derive(Debug, Clone)]
pub struct DecodeRun {
    /// Generated token ids (the stop token included when one was produced).
    pub generated: Vec<u32>,
    /// Copy hits per head `[n_layers][n_heads]`.
    pub hits: Vec<Vec<f64>>,
}

/// Greedy decoding of up to `max_new` tokens after `prompt` with a KV cache (prefilled in
/// blocks of `chunk`), counting for every head the steps where its argmax key lies in
/// `span` (the answer's tokens, [`NiahPrompt::answer_span`]) and holds the token
/// generated at that step. Stops after a token in `stop`.
/// `hooks` apply to every forward (e.g. [`Hooks::uniform_attention`] for masking).
pub fn decode_with_copy_hits(
    model: &HookedTransformer,
    prompt: &[u32],
    span: Range<usize>,
    max_new: usize,
    stop: &[u32],
    chunk: usize,
    hooks: &mut Hooks,
) -> Result<DecodeRun> {
    let cfg = &model.cfg;
    if span.end > prompt.len() || span.is_empty() {
        return Err(Error::Input(format!("span {span:?} is empty or outside the prompt of {} tokens", prompt.len())));
    }
    if prompt.len() + max_new > cfg.n_ctx {
        return Err(Error::Input(format!(
            "the prompt ({} tokens) plus {max_new} new tokens exceeds {}'s context of {} tokens; use a shorter length or fewer new tokens",
            prompt.len(),
            cfg.name,
            cfg.n_ctx
        )));
    }
    let dev = model.device();
    let mut kv = KvCache::new(cfg.n_layers).with_argmax();
    let tokens = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    let mut logits = model.prefill(&tokens, &mut kv, chunk, hooks)?;
    let mut hits = vec![vec![0.0; cfg.n_heads]; cfg.n_layers];
    let mut generated = Vec::with_capacity(max_new);
    for _ in 0..max_new {
        let next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
        let am = kv.argmax_rows(0)?;
        for (l, row) in am.iter().enumerate() {
            for (h, &i) in row.iter().enumerate() {
                let i = i as usize;
                if span.contains(&i) && prompt[i] == next {
                    hits[l][h] += 1.0;
                }
            }
        }
        generated.push(next);
        if stop.contains(&next) || generated.len() == max_new {
            break;
        }
        let t = Tensor::new(&[next], dev)?.unsqueeze(0)?;
        logits = model.run_with_kv_cache(&t, &mut kv, true, hooks)?;
    }
    Ok(DecodeRun { generated, hits })
}

/// Lower-case alphanumeric words, as `rouge_score`'s default tokenizer (no stemming).
fn rouge_words(s: &str) -> Vec<String> {
    s.to_lowercase().split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).map(String::from).collect()
}

/// ROUGE-1 recall of `reference` in `candidate`: the fraction of the reference's words (with
/// multiplicity) that the candidate contains. 0 for an empty reference.
pub fn rouge1_recall(reference: &str, candidate: &str) -> f64 {
    let r = rouge_words(reference);
    if r.is_empty() {
        return 0.0;
    }
    let mut cand: std::collections::HashMap<String, usize> = Default::default();
    for w in rouge_words(candidate) {
        *cand.entry(w).or_default() += 1;
    }
    let mut matched = 0usize;
    for w in &r {
        if let Some(c) = cand.get_mut(w) {
            if *c > 0 {
                *c -= 1;
                matched += 1;
            }
        }
    }
    matched as f64 / r.len() as f64
}

/// Options of a needle-in-a-haystack sweep.
#[derive(Debug, Clone)]
pub struct NiahOptions {
    /// Context lengths in tokens.
    pub lengths: Vec<usize>,
    /// Needle depths in `[0, 1]`.
    pub depths: Vec<f64>,
    /// Tokens decoded per run at most.
    pub max_new_tokens: usize,
    /// Prefill block size.
    pub chunk: usize,
    /// Keep runs whose ROUGE-1 recall is above this.
    pub rouge_threshold: f64,
    /// Run only this shard's runs ([`crate::shard`]: run index in (length, depth, needle)
    /// order, round robin); `None` runs all.
    pub shard: Option<crate::shard::Shard>,
}

impl Default for NiahOptions {
    fn default() -> Self {
        NiahOptions {
            lengths: vec![512, 1024, 2048],
            depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            max_new_tokens: 50,
            chunk: 512,
            rouge_threshold: 0.5,
            shard: None,
        }
    }
}

/// One (needle, length, depth) run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NiahRun {
    /// Index into the needle list.
    pub needle: usize,
    /// Context length in tokens.
    pub length: usize,
    /// Requested depth.
    pub depth: f64,
    /// Depth after backing up to a sentence boundary.
    pub actual_depth: f64,
    /// Needle length in tokens.
    pub needle_tokens: usize,
    /// Answer span length in tokens (the score's denominator).
    pub answer_tokens: usize,
    /// The decoded answer.
    pub answer: String,
    /// ROUGE-1 recall of the reference answer.
    pub rouge1: f64,
    /// Whether the run counts (ROUGE-1 recall above the threshold).
    pub correct: bool,
    /// Per-head score `hits / needle length`, `[n_layers][n_heads]`.
    #[serde(skip)]
    pub scores: Vec<Vec<f64>>,
}

/// Every run of a sweep, with the per-head retrieval scores over the correct ones.
#[derive(Debug, Clone)]
pub struct NiahSweep {
    /// The runs, in (length, depth, needle) order.
    pub runs: Vec<NiahRun>,
}

impl NiahSweep {
    /// Fraction of runs answered correctly.
    pub fn accuracy(&self) -> f64 {
        self.runs.iter().filter(|r| r.correct).count() as f64 / self.runs.len().max(1) as f64
    }

    /// Mean ROUGE-1 recall over all runs.
    pub fn mean_rouge(&self) -> f64 {
        self.runs.iter().map(|r| r.rouge1).sum::<f64>() / self.runs.len().max(1) as f64
    }

    /// Retrieval score per head `[n_layers][n_heads]`: the mean of the correct runs' scores
    /// (all zeros when no run is correct).
    pub fn head_scores(&self) -> Vec<Vec<f64>> {
        let kept: Vec<&NiahRun> = self.runs.iter().filter(|r| r.correct).collect();
        let Some(first) = kept.first() else {
            return self.runs.first().map(|r| r.scores.iter().map(|row| vec![0.0; row.len()]).collect()).unwrap_or_default();
        };
        let mut out: Vec<Vec<f64>> = first.scores.iter().map(|row| vec![0.0; row.len()]).collect();
        for r in &kept {
            for (o, s) in out.iter_mut().zip(&r.scores) {
                for (a, b) in o.iter_mut().zip(s) {
                    *a += b / kept.len() as f64;
                }
            }
        }
        out
    }
}

/// Stop tokens of a model: EOS and, for chat models, `<|im_end|>`.
pub fn stop_tokens(model: &HookedTransformer) -> Vec<u32> {
    let mut stop: Vec<u32> = model.cfg.eos_token_id.into_iter().collect();
    if let Some(t) = &model.tokenizer {
        for s in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = t.token_to_id(s) {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
    }
    stop
}

/// Run the needle-in-a-haystack grid (lengths x depths x needles) and score every head.
/// `masked` heads attend uniformly in every run (the masking experiment; empty for scoring).
/// `progress(done, total)` is called after each run.
pub fn niah_sweep(
    model: &HookedTransformer,
    haystack: &str,
    needles: &[Needle],
    opts: &NiahOptions,
    masked: &[(usize, usize)],
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<NiahSweep> {
    if needles.is_empty() || opts.lengths.is_empty() || opts.depths.is_empty() {
        return Err(Error::Input("the sweep needs at least one needle, one length and one depth".into()));
    }
    if let Some(l) = opts.lengths.iter().find(|&&l| l + opts.max_new_tokens > model.cfg.n_ctx) {
        return Err(Error::Input(format!(
            "length {l} plus {} new tokens exceeds {}'s context of {} tokens; use shorter lengths",
            opts.max_new_tokens, model.cfg.name, model.cfg.n_ctx
        )));
    }
    let tok = model.tokenizer()?;
    for n in needles {
        if haystack.contains(n.needle.trim()) {
            return Err(Error::Input(format!("the haystack already contains the needle {:?}; pick another needle", n.needle)));
        }
    }
    let fmt = PromptFormat::for_tokenizer(tok);
    let hay = tok.encode(haystack)?;
    let stop = stop_tokens(model);
    let all = opts.lengths.len() * opts.depths.len() * needles.len();
    let total = opts.shard.map_or(all, |s| s.count_of(all));
    let mut runs = Vec::with_capacity(total);
    let mut unit = 0;
    for &length in &opts.lengths {
        for &depth in &opts.depths {
            for (ni, needle) in needles.iter().enumerate() {
                unit += 1;
                if opts.shard.is_some_and(|s| !s.owns(unit - 1)) {
                    continue;
                }
                let p = build_prompt(tok, &fmt, &hay, needle, length, depth)?;
                let mut hooks = Hooks::new().uniform_attention(masked);
                let run = decode_with_copy_hits(model, &p.ids, p.answer_span.clone(), opts.max_new_tokens, &stop, opts.chunk, &mut hooks)?;
                let text_ids: Vec<u32> = run.generated.iter().copied().filter(|t| !stop.contains(t)).collect();
                let answer = tok.decode(&text_ids)?;
                let rouge1 = rouge1_recall(&needle.answer, &answer);
                let n = p.answer_span.len() as f64;
                runs.push(NiahRun {
                    needle: ni,
                    length: p.ids.len(),
                    depth,
                    actual_depth: p.actual_depth,
                    needle_tokens: p.needle_span.len(),
                    answer_tokens: p.answer_span.len(),
                    answer: answer.trim().to_string(),
                    rouge1,
                    correct: rouge1 > opts.rouge_threshold,
                    scores: run.hits.iter().map(|row| row.iter().map(|h| h / n).collect()).collect(),
                });
                progress(runs.len(), total);
            }
        }
    }
    Ok(NiahSweep { runs })
}

/// Heads sorted by score, highest first: `(layer, head, score)`.
pub fn ranked_heads(scores: &[Vec<f64>]) -> Vec<(usize, usize, f64)> {
    let mut v: Vec<(usize, usize, f64)> = scores.iter().enumerate().flat_map(|(l, r)| r.iter().enumerate().map(move |(h, s)| (l, h, *s))).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    v
}

/// `k` heads drawn without replacement (seeded) from those scoring at most `threshold`.
pub fn random_heads(scores: &[Vec<f64>], threshold: f64, k: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut pool: Vec<(usize, usize)> =
        scores.iter().enumerate().flat_map(|(l, r)| r.iter().enumerate().filter(|(_, s)| **s <= threshold).map(move |(h, _)| (l, h))).collect();
    pool.shuffle(&mut StdRng::seed_from_u64(seed));
    pool.truncate(k);
    pool.sort();
    pool
}
