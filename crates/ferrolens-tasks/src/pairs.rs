//! Clean/corrupt prompt pairs, tokenized and checked.

use ferrolens_model::{Error, Result, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One clean/corrupt pair with its answer and counterfactual answer (single tokens, usually with a
/// leading space). This is also the JSONL schema of `ferrolens patch --data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptPair {
    /// The clean prompt.
    pub clean: String,
    /// The corrupt prompt (same token length).
    pub corrupt: String,
    /// The correct answer on the clean prompt.
    pub answer: String,
    /// The answer that the corruption promotes (the metric is `logit[answer] - logit[wrong]`).
    pub wrong: String,
    /// Named token positions (IOI: `IO`, `S1`, `S1+1`, `S2`, `end`), where the task knows them:
    /// token indices in the prompt as the model tokenizes it (BOS included where the model puts
    /// one first). Pairs of different lengths report per-position scores by these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, usize>,
}

/// Pairs tokenized: `clean`/`corrupt` are `[n][len_i]` ids. A clean prompt and its corrupt twin
/// have one length; different pairs may differ, and then run as one left-padded batch
/// ([`PairBatch::pad`]) with positions aligned by label ([`PairBatch::label_indices`]).
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// The pairs.
    pub pairs: Vec<PromptPair>,
    /// Clean token ids (BOS first when the model wants it).
    pub clean: Vec<Vec<u32>>,
    /// Corrupt token ids, each as long as its clean twin.
    pub corrupt: Vec<Vec<u32>>,
    /// Answer token per pair.
    pub answer: Vec<u32>,
    /// Wrong-answer token per pair.
    pub wrong: Vec<u32>,
}

impl PairBatch {
    /// Tokenize and check: each clean prompt and its corrupt twin have one length, and answers
    /// are single tokens. Errors name the offending pair (`what` says where pairs came from, e.g.
    /// a file name).
    pub fn new(tok: &Tokenizer, pairs: Vec<PromptPair>, what: &str) -> Result<PairBatch> {
        if pairs.is_empty() {
            return Err(Error::Input(format!("{what}: no prompt pairs")));
        }
        let mut clean = Vec::new();
        let mut corrupt = Vec::new();
        let mut answer = Vec::new();
        let mut wrong = Vec::new();
        for (i, p) in pairs.iter().enumerate() {
            let c = tok.encode_prompt(&p.clean)?;
            let k = tok.encode_prompt(&p.corrupt)?;
            let at = format!("{what}, pair {} (line {})", i, i + 1);
            if c.len() != k.len() {
                return Err(Error::Input(format!(
                    "{at}: clean prompt has {} tokens but corrupt prompt has {}; a pair must tokenize to equal lengths (pairs may differ from each other)",
                    c.len(),
                    k.len()
                )));
            }
            if let Some((name, &pos)) = p.labels.iter().find(|(_, &pos)| pos >= c.len()) {
                return Err(Error::Input(format!("{at}: label `{name}` points at token {pos}, but the prompt has {} tokens", c.len())));
            }
            answer.push(tok.single_token(&p.answer).map_err(|e| Error::Input(format!("{at}: {e}")))?);
            wrong.push(tok.single_token(&p.wrong).map_err(|e| Error::Input(format!("{at}: {e}")))?);
            clean.push(c);
            corrupt.push(k);
        }
        Ok(PairBatch { pairs, clean, corrupt, answer, wrong })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The longest prompt's token length (the padded batch's length).
    pub fn seq_len(&self) -> usize {
        self.clean.iter().map(|c| c.len()).max().unwrap_or(0)
    }

    /// The one token length of every prompt, or `None` when pairs differ.
    pub fn uniform_len(&self) -> Option<usize> {
        let n = self.clean.first()?.len();
        self.clean.iter().all(|c| c.len() == n).then_some(n)
    }

    /// Left padding of pair `i` in the batch ([`PairBatch::seq_len`] minus its length).
    pub fn pad(&self, i: usize) -> usize {
        self.seq_len() - self.clean[i].len()
    }

    /// The pairs' indices grouped by token length, shortest first.
    pub fn length_groups(&self) -> Vec<(usize, Vec<usize>)> {
        let mut m: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, c) in self.clean.iter().enumerate() {
            m.entry(c.len()).or_default().push(i);
        }
        m.into_iter().collect()
    }

    /// The pairs `idx` as a batch of their own.
    pub fn subset(&self, idx: &[usize]) -> PairBatch {
        let pick = |v: &Vec<Vec<u32>>| idx.iter().map(|&i| v[i].clone()).collect();
        PairBatch {
            pairs: idx.iter().map(|&i| self.pairs[i].clone()).collect(),
            clean: pick(&self.clean),
            corrupt: pick(&self.corrupt),
            answer: idx.iter().map(|&i| self.answer[i]).collect(),
            wrong: idx.iter().map(|&i| self.wrong[i]).collect(),
        }
    }

    /// The labels every pair has (IOI: `IO`, `S1`, `S1+1`, `S2`, `end`), in a fixed order.
    pub fn common_labels(&self) -> Vec<String> {
        let mut names: Vec<String> = self.pairs.first().map(|p| p.labels.keys().cloned().collect()).unwrap_or_default();
        names.retain(|n| self.pairs.iter().all(|p| p.labels.contains_key(n)));
        // Prompt order of the first pair.
        if let Some(p) = self.pairs.first() {
            names.sort_by_key(|n| p.labels[n]);
        }
        names
    }

    /// Each common label's token index in every pair of the left-padded batch (`labels` are
    /// counted in the prompt's own tokens; the padding shifts them).
    pub fn label_indices(&self) -> Vec<(String, Vec<usize>)> {
        self.label_indices_for(&self.common_labels())
    }

    /// [`PairBatch::label_indices`] of the given labels (every pair must have them).
    pub fn label_indices_for(&self, names: &[String]) -> Vec<(String, Vec<usize>)> {
        names
            .iter()
            .map(|n| {
                let idx = self.pairs.iter().enumerate().map(|(i, p)| p.labels[n] + self.pad(i)).collect();
                (n.clone(), idx)
            })
            .collect()
    }

    /// Padding positions over real ones when the batch is padded to one length (0 for one length).
    pub fn padding_overhead(&self) -> f64 {
        let real: usize = self.clean.iter().map(|c| c.len()).sum();
        (self.seq_len() * self.len()) as f64 / real.max(1) as f64 - 1.0
    }
}

/// Read pairs from a JSONL file (`{"clean","corrupt","answer","wrong"}` a line).
pub fn read_jsonl(path: &Path) -> Result<Vec<PromptPair>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: PromptPair = serde_json::from_str(line).map_err(|e| {
            Error::Input(format!(
                "{} line {}: {e}; each line must be {{\"clean\": str, \"corrupt\": str, \"answer\": str, \"wrong\": str}}",
                path.display(),
                i + 1
            ))
        })?;
        out.push(p);
    }
    if out.is_empty() {
        return Err(Error::Input(format!("{} has no prompt pairs (it is empty)", path.display())));
    }
    Ok(out)
}

/// Write pairs as JSONL.
pub fn write_jsonl(path: &Path, pairs: &[PromptPair]) -> Result<()> {
    let mut s = String::new();
    for p in pairs {
        s.push_str(&serde_json::to_string(p).expect("pairs serialize"));
        s.push('\n');
    }
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}
