//! `ferrolens formats`: Colored Objects accuracy over prompt formats (objects, shots, wording),
//! to pick the format a model can do before studying its circuit.

use anyhow::Result;
use ferrolens_methods::formats::colored_formats;
use ferrolens_report::{write_table, Column, Table};
use ferrolens_tasks::colored::Wording;
use std::path::PathBuf;

/// Arguments of `ferrolens formats`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a registry name, a .gguf file, a HF directory or a hub id.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// Objects per question, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 3, 4])]
    objects: Vec<usize>,
    /// Solved examples before the query, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 1, 2, 3])]
    shots: Vec<usize>,
    /// Wordings, comma-separated: qa, statement.
    #[arg(long, value_delimiter = ',', default_value = "qa,statement")]
    wording: Vec<String>,
    /// Prompts per format.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Seed of the prompt sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (default out/formats).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar or table on stderr.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let wordings: Vec<Wording> = a.wording.iter().map(|w| w.parse()).collect::<ferrolens_model::Result<_>>()?;
    if let Some(o) = a.objects.iter().find(|o| !(2..=8).contains(*o)) {
        anyhow::bail!("--objects {o}: Colored Objects needs 2..=8 objects per question");
    }
    let model = crate::load_model(&a.model)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("out").join("formats"));
    let bar = crate::progress_bar(a.quiet, "formats");
    crate::in_new_dir(&out, || {
        let rows = colored_formats(&model, &a.objects, &a.shots, &wordings, a.n, a.seed, &|d, t| {
            bar.set_length(t as u64);
            bar.set_position(d as u64);
        })?;
        bar.finish_and_clear();
        let t = Table::new()
            .col("objects", Column::OptU64(rows.iter().map(|r| Some(r.objects as u64)).collect()))
            .col("shots", Column::OptU64(rows.iter().map(|r| Some(r.shots as u64)).collect()))
            .col("wording", Column::Str(rows.iter().map(|r| r.wording.name().to_string()).collect()))
            .col("n", Column::OptU64(rows.iter().map(|r| Some(r.n as u64)).collect()))
            .col("tokens", Column::OptU64(rows.iter().map(|r| Some(r.tokens as u64)).collect()))
            .col("accuracy", Column::F64(rows.iter().map(|r| r.score.accuracy).collect()))
            .col("chance", Column::F64(rows.iter().map(|r| 1.0 / r.objects as f64).collect()))
            .col("above_chance", Column::F64(rows.iter().map(|r| r.score.accuracy - 1.0 / r.objects as f64).collect()))
            .col("logit_diff", Column::F64(rows.iter().map(|r| r.score.logit_diff).collect()));
        write_table(&t, &out.join("formats"))?;
        // Best = furthest above chance among the listed colours (2 objects start at 50%, 4 at
        // 25%), then the larger logit difference.
        let margin = |r: &ferrolens_methods::formats::FormatScore| (r.score.accuracy - 1.0 / r.objects as f64, r.score.logit_diff);
        let best = rows.iter().max_by(|x, y| margin(x).partial_cmp(&margin(y)).expect("finite")).expect("at least one format");
        let summary = serde_json::json!({
            "model": model.cfg.name,
            "n": a.n,
            "seed": a.seed,
            "formats": rows,
            "best": best,
        });
        std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
        if !a.quiet {
            eprintln!("{:>7} {:>5} {:>9} {:>6} {:>8} {:>7}", "objects", "shots", "wording", "tokens", "accuracy", "LD");
            for r in &rows {
                eprintln!(
                    "{:>7} {:>5} {:>9} {:>6} {:>7.1}% {:>7.3}",
                    r.objects,
                    r.shots,
                    r.wording.name(),
                    r.tokens,
                    100.0 * r.score.accuracy,
                    r.score.logit_diff
                );
            }
            eprintln!(
                "best (furthest above chance): {} objects, {} shots, {} ({:.1}%, chance {:.0}%); use --objects {} --shots {} --wording {} with discover/data",
                best.objects,
                best.shots,
                best.wording.name(),
                100.0 * best.score.accuracy,
                100.0 / best.objects as f64,
                best.objects,
                best.shots,
                best.wording.name()
            );
        }
        Ok(())
    })
}
