//! Which Colored Objects format a model can do: accuracy and logit difference of the clean
//! prompts over objects per question, solved examples and wording, so a study runs on a format
//! where the model solves the task (a circuit of a task the model fails says little).

use crate::repair::{colored_accuracy, ColoredScore};
use ferrolens_model::{Error, HookedTransformer, Result};
use ferrolens_tasks::colored::{generate, ColoredConfig, Wording};
use ferrolens_tasks::PairBatch;
use serde::{Deserialize, Serialize};

/// One format's scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FormatScore {
    /// Objects per question.
    pub objects: usize,
    /// Solved examples before the query.
    pub shots: usize,
    /// Wording.
    pub wording: Wording,
    /// Prompts scored.
    pub n: usize,
    /// Tokens of the longest prompt.
    pub tokens: usize,
    /// Accuracy (the answer colour's logit is the largest of the colour answers) and mean
    /// `logit[answer] - logit[wrong]` (the pair's other listed colour).
    pub score: ColoredScore,
}

/// Scores of every format in `objects` x `shots` x `wordings`, `n` prompts each (seed `seed`).
/// `progress(done, total)` after each format.
pub fn colored_formats(
    model: &HookedTransformer,
    objects: &[usize],
    shots: &[usize],
    wordings: &[Wording],
    n: usize,
    seed: u64,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<FormatScore>> {
    if objects.is_empty() || shots.is_empty() || wordings.is_empty() || n == 0 {
        return Err(Error::Input("give at least one object count, one shot count, one wording and --n 1 or more".into()));
    }
    let tok = model.tokenizer()?;
    let total = objects.len() * shots.len() * wordings.len();
    let mut out = Vec::with_capacity(total);
    for &o in objects {
        for &s in shots {
            for &w in wordings {
                // Every token length (a padded batch): a format whose prompts vary in length is
                // still scored on `n` prompts.
                let cfg = ColoredConfig { n, seed, n_objects: o, shots: s, all_lengths: true, wording: w };
                let batch = PairBatch::new(tok, generate(tok, &cfg)?, "colored-objects")?;
                let score = colored_accuracy(model, &batch, &[])?;
                let tokens = batch.clean.iter().map(|c| c.len()).max().unwrap_or(0);
                out.push(FormatScore { objects: o, shots: s, wording: w, n: batch.len(), tokens, score });
                progress(out.len(), total);
            }
        }
    }
    Ok(out)
}
