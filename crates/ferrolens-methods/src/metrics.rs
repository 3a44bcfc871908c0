//! Metrics: functions of the logits that patching methods score against.
//!
//! A [`Metric`] maps logits `[rows, p, V]` (or `[rows, 1, V]` when only the last position was
//! unembedded) to one value per row, `[rows]`. Row `r` belongs to prompt `r % n_prompts`, so one
//! batched forward can carry many patched copies of the same prompt set. The scalar used for
//! gradients is the mean over rows.

use candle_core::{DType, Device, IndexOp, Tensor, D};
use ferrolens_model::{Error, Result};
use std::sync::Arc;

/// A per-row metric on logits `[rows, p, V]` -> `[rows]` (f32).
pub trait Metric: Send + Sync {
    /// One value per row; row `r` is prompt `r % n_prompts`.
    fn per_row(&self, logits: &Tensor) -> Result<Tensor>;
    /// A short name for tables ("logit_diff").
    fn name(&self) -> String;
    /// When the metric reads the logits of a few tokens only (a logit difference): those
    /// vocabulary columns (ascending, distinct) and the same metric for logits restricted to
    /// them (`[rows, p, k]`, column `i` the logit of token `columns[i]`; see
    /// [`ferrolens_model::RunSpan::columns`]). Sweeps then unembed those columns alone. `None`
    /// (the default, and for metrics that normalise over the vocabulary): every column.
    fn on_columns(&self) -> Option<(Vec<u32>, Arc<dyn Metric>)> {
        None
    }
}

/// The distinct ids of `lists`, ascending, and each list with its ids replaced by their index
/// in that set.
fn columns_of(lists: &[&[u32]]) -> (Vec<u32>, Vec<Vec<u32>>) {
    let mut cols: Vec<u32> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    cols.sort_unstable();
    cols.dedup();
    let remap = lists.iter().map(|l| l.iter().map(|id| cols.binary_search(id).expect("an id of the set") as u32).collect()).collect();
    (cols, remap)
}

/// Any closure `logits [rows,p,V] -> [rows]` is a metric (library users' custom metrics).
pub struct FnMetric<F>(pub String, pub F);

impl<F: Fn(&Tensor) -> Result<Tensor> + Send + Sync> Metric for FnMetric<F> {
    fn per_row(&self, logits: &Tensor) -> Result<Tensor> {
        (self.1)(logits)
    }
    fn name(&self) -> String {
        self.0.clone()
    }
}

/// The last position's logits `[rows, V]`, in f32 (f64 models stay f64; bf16/f16 are widened).
pub fn last_logits(logits: &Tensor) -> Result<Tensor> {
    let p = logits.dim(1)?;
    let last = logits.i((.., p - 1, ..))?;
    Ok(match last.dtype() {
        DType::F64 | DType::F32 => last,
        _ => last.to_dtype(DType::F32)?,
    })
}

/// A `[rows, V]` one-hot selector of `ids[r % n]` (differentiable selection by product).
fn one_hot(ids: &[u32], rows: usize, vocab: usize, device: &Device) -> Result<Tensor> {
    if ids.is_empty() || !rows.is_multiple_of(ids.len()) {
        return Err(Error::Input(format!("{rows} logit rows is not a multiple of the {} prompts", ids.len())));
    }
    let mut v = vec![0f32; rows * vocab];
    for r in 0..rows {
        let id = ids[r % ids.len()] as usize;
        if id >= vocab {
            return Err(Error::Input(format!("answer token id {id} is outside the vocabulary ({vocab})")));
        }
        v[r * vocab + id] = 1.0;
    }
    Ok(Tensor::from_vec(v, (rows, vocab), device)?)
}

fn pick(last: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = last.dims2()?;
    let oh = one_hot(ids, rows, vocab, last.device())?.to_dtype(last.dtype())?;
    Ok((last * oh)?.sum(1)?)
}

/// `logit[answer] - logit[wrong]` at the last position, per prompt (the IOI logit difference).
#[derive(Debug, Clone)]
pub struct LogitDiff {
    /// Correct answer token per prompt.
    pub answer: Vec<u32>,
    /// Counterfactual (wrong) answer token per prompt.
    pub wrong: Vec<u32>,
}

impl Metric for LogitDiff {
    fn per_row(&self, logits: &Tensor) -> Result<Tensor> {
        let last = last_logits(logits)?;
        Ok((pick(&last, &self.answer)? - pick(&last, &self.wrong)?)?)
    }
    fn name(&self) -> String {
        "logit_diff".into()
    }
    fn on_columns(&self) -> Option<(Vec<u32>, Arc<dyn Metric>)> {
        let (cols, mut ids) = columns_of(&[&self.answer, &self.wrong]);
        let wrong = ids.pop()?;
        let answer = ids.pop()?;
        Some((cols, Arc::new(LogitDiff { answer, wrong })))
    }
}

/// `log p(answer)` at the last position.
#[derive(Debug, Clone)]
pub struct LogProb {
    /// Answer token per prompt.
    pub answer: Vec<u32>,
}

impl Metric for LogProb {
    fn per_row(&self, logits: &Tensor) -> Result<Tensor> {
        let lp = candle_nn::ops::log_softmax(&last_logits(logits)?, D::Minus1)?;
        pick(&lp, &self.answer)
    }
    fn name(&self) -> String {
        "logprob".into()
    }
}

/// Negative KL divergence `-KL(p_clean || p)` at the last position (0 for the clean run, so that
/// larger is "more clean" as with the other metrics).
#[derive(Debug, Clone)]
pub struct NegKlToClean {
    /// Clean log-probabilities at the last position, `[n_prompts, V]`.
    pub clean_logprobs: Tensor,
}

impl NegKlToClean {
    /// From clean logits `[n, p, V]`.
    pub fn from_clean_logits(clean: &Tensor) -> Result<Self> {
        Ok(NegKlToClean { clean_logprobs: candle_nn::ops::log_softmax(&last_logits(clean)?, D::Minus1)?.detach() })
    }
}

impl Metric for NegKlToClean {
    fn per_row(&self, logits: &Tensor) -> Result<Tensor> {
        let lp = candle_nn::ops::log_softmax(&last_logits(logits)?, D::Minus1)?;
        let n = self.clean_logprobs.dim(0)?;
        let rows = lp.dim(0)?;
        if rows % n != 0 {
            return Err(Error::Input(format!("{rows} logit rows is not a multiple of the {n} prompts")));
        }
        let reps: Vec<&Tensor> = std::iter::repeat_n(&self.clean_logprobs, rows / n).collect();
        let clean = Tensor::cat(&reps, 0)?;
        let kl = (clean.exp()? * (clean - lp)?)?.sum(1)?;
        Ok(kl.neg()?)
    }
    fn name(&self) -> String {
        "neg_kl".into()
    }
}

/// `(m - m_corrupt) / (m_clean - m_corrupt)`: 0 at the corrupt run, 1 at the clean run, with the
/// baselines taken as means over prompts (TransformerLens's IOI normalisation).
#[derive(Clone)]
pub struct Normalised {
    /// The raw metric.
    pub inner: Arc<dyn Metric>,
    /// Mean raw metric on the clean prompts.
    pub clean: f64,
    /// Mean raw metric on the corrupt prompts.
    pub corrupt: f64,
}

impl Normalised {
    /// Wrap `inner` with baselines; errors when the clean and corrupt values coincide.
    pub fn new(inner: Arc<dyn Metric>, clean: f64, corrupt: f64) -> Result<Self> {
        if !(clean - corrupt).is_finite() || (clean - corrupt).abs() < 1e-6 {
            return Err(Error::Input(format!(
                "the clean ({clean:.4}) and corrupt ({corrupt:.4}) {} are equal, so the normalised metric is undefined; \
                 choose corruptions that change the answer",
                inner.name()
            )));
        }
        Ok(Normalised { inner, clean, corrupt })
    }
}

impl Metric for Normalised {
    fn per_row(&self, logits: &Tensor) -> Result<Tensor> {
        let m = self.inner.per_row(logits)?;
        Ok(((m - self.corrupt)? / (self.clean - self.corrupt))?)
    }
    fn name(&self) -> String {
        format!("normalised_{}", self.inner.name())
    }
    fn on_columns(&self) -> Option<(Vec<u32>, Arc<dyn Metric>)> {
        let (cols, inner) = self.inner.on_columns()?;
        Some((cols, Arc::new(Normalised { inner, clean: self.clean, corrupt: self.corrupt })))
    }
}

/// The mean over rows as an f64.
pub fn mean_value(per_row: &Tensor) -> Result<f64> {
    Ok(per_row.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A logit difference (plain and normalised) on logits restricted to its columns equals
    /// the metric on the whole vocabulary; repeated and shared answer ids map to one column.
    #[test]
    fn metrics_on_their_columns_equal_the_whole_vocabulary() {
        let d = Device::Cpu;
        let logits = Tensor::randn(0f32, 3.0, (6, 4, 50), &d).unwrap();
        let ld = LogitDiff { answer: vec![7, 31, 7], wrong: vec![31, 2, 49] };
        let norm = Normalised::new(Arc::new(ld.clone()), 1.5, -0.25).unwrap();
        for m in [&ld as &dyn Metric, &norm] {
            let (cols, reduced) = m.on_columns().expect("a logit difference reads a few columns");
            assert_eq!(cols, vec![2, 7, 31, 49]);
            let ids = Tensor::new(cols.as_slice(), &d).unwrap();
            let small = logits.index_select(&ids, 2).unwrap();
            let (a, b) = (m.per_row(&logits).unwrap(), reduced.per_row(&small).unwrap());
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{}", m.name());
        }
        // Metrics over the whole vocabulary keep it.
        assert!(LogProb { answer: vec![1] }.on_columns().is_none());
        let fm = FnMetric("custom".to_string(), |l: &Tensor| Ok(l.sum((1, 2))?));
        assert!(fm.on_columns().is_none());
    }
}
