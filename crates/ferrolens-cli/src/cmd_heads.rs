//! `ferrolens heads detect`: previous-token, duplicate-token and induction scores.

use anyhow::{Context, Result};
use ferrolens_methods::heads::{detect_heads, repeated_random_tokens, Detector};
use ferrolens_report::{heatmap, write_table, Column, Heatmap, Table};

/// Arguments of `ferrolens heads`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Head-detector scores on repeated random tokens (TransformerLens `head_detector`, mul measure).
    Detect {
        /// Model.
        #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
        model: String,
        /// Prompts.
        #[arg(long, default_value_t = 8)]
        n: usize,
        /// Random tokens per half (each prompt is them twice).
        #[arg(long, default_value_t = 24)]
        half: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Put the BOS token first and exclude attention to it from the scores.
        #[arg(long)]
        bos: bool,
        /// Output directory.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

pub fn run(a: Args) -> Result<()> {
    let Sub::Detect { model, n, half, seed, bos, out } = a.cmd;
    let model = crate::load_model(&model)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bos_id = if bos { model.cfg.bos_token_id.or(model.tokenizer.as_ref().and_then(|t| t.bos_id())) } else { None };
    // Ordinary vocabulary ids (skip the first 1000, where special and byte tokens live).
    let lo = 1000.min(model.cfg.d_vocab as u32 / 2);
    let tokens = repeated_random_tokens(n, half, lo, model.cfg.d_vocab as u32, seed, bos_id);
    let (mut det, mut layer, mut head, mut score) = (vec![], vec![], vec![], vec![]);
    let mut summary = serde_json::Map::new();
    let all = detect_heads(&model, &tokens, &Detector::ALL, bos, false)?;
    for (d, s) in Detector::ALL.into_iter().zip(all) {
        for (l, row) in s.iter().enumerate() {
            for (h, v) in row.iter().enumerate() {
                det.push(d.name().to_string());
                layer.push(Some(l as u64));
                head.push(Some(h as u64));
                score.push(*v);
            }
        }
        let mut best: Vec<(usize, usize, f64)> = s.iter().enumerate().flat_map(|(l, r)| r.iter().enumerate().map(move |(h, v)| (l, h, *v))).collect();
        best.sort_by(|x, y| y.2.total_cmp(&x.2));
        summary.insert(d.name().into(), serde_json::json!(best.iter().take(5).map(|(l, h, v)| format!("L{l}H{h}={v:.3}")).collect::<Vec<_>>()));
        heatmap(&Heatmap { title: format!("{} score", d.name()), values: s, row_label: "layer".into(), col_label: "head".into(), col_ticks: vec![] }, &out.join(format!("{}", d.name())))?;
    }
    let t = Table::new().col("detector", Column::Str(det)).col("layer", Column::OptU64(layer)).col("head", Column::OptU64(head)).col("score", Column::F64(score));
    write_table(&t, &out.join("scores"))?;
    println!("{}", serde_json::to_string_pretty(&serde_json::Value::Object(summary))?);
    Ok(())
}
