//! A linear probe per layer: does the residual stream at the last position of an IOI prompt
//! encode whether the subject was mentioned first (BABA: "Then, John and Mary ... John gave")
//! or second (ABBA)? Logistic regression on `resid_pre(L)` with candle's AdamW, held-out
//! accuracy per layer as `probe_accuracy.csv` and a line plot (`probe_accuracy.svg`/`.png`).
//! Run: `cargo run --release --example probe`.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ferrolens::prelude::*;
use ferrolens::report::{line_chart, write_table, Column, Table};
use ferrolens::tasks::ioi;

/// Features `[n, D]` at the last position of every layer's resid_pre, and labels (1 = BABA).
fn features(model: &HookedTransformer, seed: u64, n: usize) -> anyhow::Result<(Vec<Tensor>, Tensor)> {
    let pairs = ioi::generate(model.tokenizer()?, &ioi::IoiConfig { n, seed, ..Default::default() })?;
    let labels: Vec<f32> = pairs.iter().map(|p| if p.labels["S1"] < p.labels["IO"] { 1.0 } else { 0.0 }).collect();
    let batch = PairBatch::new(model.tokenizer()?, pairs, "ioi")?;
    let tokens = model.tokens_tensor(&batch.clean)?;
    let p = batch.seq_len();
    let mut hooks = Hooks::new().cache("blocks.*.hook_resid_pre")?;
    model.run_span(Some(&tokens), &RunSpan { last_logits_only: true, ..Default::default() }, &mut hooks)?;
    let feats = (0..model.cfg.n_layers)
        .map(|l| Ok(hooks.cache_ref().get(HookPoint::ResidPre(l))?.i((.., p - 1, ..))?.contiguous()?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((feats, Tensor::new(labels, &Device::Cpu)?))
}

fn accuracy(w: &Tensor, b: &Tensor, x: &Tensor, y: &Tensor) -> anyhow::Result<f64> {
    let pred = x.matmul(&w.unsqueeze(1)?)?.squeeze(1)?.broadcast_add(b)?.ge(0.0)?.to_dtype(DType::F32)?;
    Ok(pred.eq(y)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()? as f64)
}

fn main() -> anyhow::Result<()> {
    let model = load("smollm2-135m", &LoadOptions::default())?;
    let (train_x, train_y) = features(&model, 1, 64)?;
    let (test_x, test_y) = features(&model, 2, 32)?;
    let mut acc: Vec<f64> = Vec::new();
    for l in 0..model.cfg.n_layers {
        // Standardise with the training statistics.
        let mu = train_x[l].mean_keepdim(0)?;
        let sd = (train_x[l].broadcast_sub(&mu)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
        let norm = |x: &Tensor| -> anyhow::Result<Tensor> { Ok(x.broadcast_sub(&mu)?.broadcast_div(&sd)?) };
        let (xtr, xte) = (norm(&train_x[l])?, norm(&test_x[l])?);
        let d = xtr.dim(1)?;
        let w = candle_core::Var::zeros(d, DType::F32, &Device::Cpu)?;
        let b = candle_core::Var::zeros(1, DType::F32, &Device::Cpu)?;
        let mut opt = AdamW::new(vec![w.clone(), b.clone()], ParamsAdamW { lr: 0.01, weight_decay: 0.01, ..Default::default() })?;
        for _ in 0..150 {
            let z = xtr.matmul(&w.as_tensor().unsqueeze(1)?)?.squeeze(1)?.broadcast_add(b.as_tensor())?;
            // Binary cross-entropy with logits: softplus(z) - y z.
            let loss = ((z.exp()? + 1.0)?.log()? - (&z * &train_y)?)?.mean_all()?;
            opt.backward_step(&loss)?;
        }
        let a = accuracy(w.as_tensor(), b.as_tensor(), &xte, &test_y)?;
        println!("layer {l:2}: held-out accuracy {:.1}%", 100.0 * a);
        acc.push(a);
    }
    let t = Table::new().col("layer", Column::OptU64((0..acc.len()).map(|l| Some(l as u64)).collect())).col("accuracy", Column::F64(acc.clone()));
    write_table(&t, std::path::Path::new("probe_accuracy"))?;
    let pts: Vec<(f64, f64)> = acc.iter().enumerate().map(|(l, a)| (l as f64, *a)).collect();
    line_chart(
        "Probe: subject mentioned first?",
        "layer",
        "held-out accuracy",
        &[("probe".into(), pts), ("chance".into(), vec![(0.0, 0.5), ((acc.len() - 1) as f64, 0.5)])],
        std::path::Path::new("probe_accuracy"),
    )?;
    let (best, best_acc) = acc.iter().enumerate().fold((0, 0.0), |m, (l, a)| if *a > m.1 { (l, *a) } else { m });
    println!("best layer {best}: {:.1}% (chance 50%); wrote probe_accuracy.csv/.parquet/.svg/.png", 100.0 * best_acc);
    assert!(best_acc >= 0.8, "the best layer should beat chance by 30 points, got {best_acc}");
    // Layer 0 sees only the last token's embedding (the same " to" in every prompt): chance.
    assert!(acc[0] <= 0.6, "layer 0 cannot know the order, got {}", acc[0]);
    Ok(())
}
