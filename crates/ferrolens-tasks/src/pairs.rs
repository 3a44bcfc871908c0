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
    /// Named token positions (IOI: `IO`, `S1`, `S1+1`, `S2`, `end`), where the task knows them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, usize>,
}

/// Pairs tokenized into equal-length batches: `clean`/`corrupt` are `[n][p]` ids.
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// The pairs.
    pub pairs: Vec<PromptPair>,
    /// Clean token ids, all of length `p`.
    pub clean: Vec<Vec<u32>>,
    /// Corrupt token ids, all of length `p`.
    pub corrupt: Vec<Vec<u32>>,
    /// Answer token per pair.
    pub answer: Vec<u32>,
    /// Wrong-answer token per pair.
    pub wrong: Vec<u32>,
}

impl PairBatch {
    /// Tokenize and check: every prompt of the batch has one common length, and answers are single
    /// tokens. Errors name the offending pair (`what` says where pairs came from, e.g. a file name).
    pub fn new(tok: &Tokenizer, pairs: Vec<PromptPair>, what: &str) -> Result<PairBatch> {
        if pairs.is_empty() {
            return Err(Error::Input(format!("{what}: no prompt pairs")));
        }
        let mut clean = Vec::new();
        let mut corrupt = Vec::new();
        let mut answer = Vec::new();
        let mut wrong = Vec::new();
        let mut len0 = None;
        for (i, p) in pairs.iter().enumerate() {
            let c = tok.encode_prompt(&p.clean)?;
            let k = tok.encode_prompt(&p.corrupt)?;
            let at = format!("{what}, pair {} (line {})", i, i + 1);
            if c.len() != k.len() {
                return Err(Error::Input(format!(
                    "{at}: clean prompt has {} tokens but corrupt prompt has {}; a pair must tokenize to equal lengths",
                    c.len(),
                    k.len()
                )));
            }
            match len0 {
                None => len0 = Some(c.len()),
                Some(l) if l != c.len() => {
                    return Err(Error::Input(format!(
                        "{at}: prompts have {} tokens but the first pair has {l}; all pairs in a file must share one token length",
                        c.len()
                    )))
                }
                _ => {}
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

    /// Token length of every prompt.
    pub fn seq_len(&self) -> usize {
        self.clean[0].len()
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
