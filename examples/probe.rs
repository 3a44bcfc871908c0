//! A linear probe per layer: does the residual stream at the last position of an IOI prompt
//! encode whether the subject was mentioned first (BABA: "Then, John and Mary ... John gave")
//! or second (ABBA)? The cache goes to `ndarray` ([`ferrolens::model::arrays`]) and
//! `linfa-logistic` fits an L2-regularised logistic regression on each layer's standardised
//! `resid_pre`; held-out accuracy per layer is written as `probe_accuracy.csv` and a line plot
//! (`probe_accuracy.svg`/`.png`). Run: `cargo run --release --example probe`.

use ferrolens::model::ndarray::{Array1, Array2, Axis};
use ferrolens::prelude::*;
use ferrolens::report::{line_chart, write_table, Column, Table};
use ferrolens::tasks::ioi;
use linfa::prelude::*;
use linfa_logistic::LogisticRegression;

/// Features `[n, D]` at the last position of every layer's resid_pre (as ndarray), and labels
/// (true = BABA).
fn features(model: &HookedTransformer, seed: u64, n: usize) -> anyhow::Result<(Vec<Array2<f64>>, Array1<bool>)> {
    let pairs = ioi::generate(model.tokenizer()?, &ioi::IoiConfig { n, seed, ..Default::default() })?;
    let labels: Array1<bool> = pairs.iter().map(|p| p.labels["S1"] < p.labels["IO"]).collect();
    let batch = PairBatch::new(model.tokenizer()?, pairs, "ioi")?;
    let tokens = model.tokens_tensor(&batch.clean)?;
    let (_, cache) = model.run_with_cache(&tokens, "blocks.*.hook_resid_pre")?;
    let p = batch.seq_len();
    let feats = (0..model.cfg.n_layers)
        .map(|l| {
            // A zero-copy view of [n, p, D]; the last position copied out as f64 [n, D].
            let x = cache.with_view(HookPoint::ResidPre(l), |a| a.index_axis(Axis(1), p - 1).mapv(f64::from))?;
            Ok(x.into_dimensionality()?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((feats, labels))
}

fn main() -> anyhow::Result<()> {
    let model = load("smollm2-135m", &LoadOptions::default())?;
    let (train_x, train_y) = features(&model, 1, 64)?;
    let (test_x, test_y) = features(&model, 2, 32)?;
    let mut acc: Vec<f64> = Vec::new();
    for l in 0..model.cfg.n_layers {
        // Standardise with the training statistics.
        let mu = train_x[l].mean_axis(Axis(0)).expect("64 training rows");
        let sd = train_x[l].std_axis(Axis(0), 0.0).mapv(|s| s + 1e-6);
        let (xtr, xte) = ((&train_x[l] - &mu) / &sd, (&test_x[l] - &mu) / &sd);
        let fit = LogisticRegression::default().alpha(1.0).max_iterations(200).fit(&Dataset::new(xtr, train_y.clone()))?;
        let pred = fit.predict(&xte);
        let a = pred.iter().zip(test_y.iter()).filter(|(p, y)| p == y).count() as f64 / test_y.len() as f64;
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
