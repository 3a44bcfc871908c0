//! Shared pieces of the study commands' output: progress, score tables, heatmaps. (Running the
//! methods is `ferrolens_methods::study`.)

use anyhow::{Context, Result};
use ferrolens_methods::ScoreGrid;
use ferrolens_report::{heatmap, Column, Heatmap, Table};
use std::path::Path;

/// A progress callback for the library's `(what, done, total)` reports: one bar, relabelled as
/// the work changes (hidden with `--quiet`).
pub struct Bars {
    bar: indicatif::ProgressBar,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        Bars { bar: crate::progress_bar(quiet, "") }
    }

    pub fn report(&self, what: &str, done: usize, total: usize) {
        if self.bar.message() != what {
            self.bar.set_message(what.to_string());
            self.bar.reset();
        }
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The rows of all grids as the scores table (`method,component,layer,head,pos,score`, and
/// `label` when positions are labelled).
pub fn scores_table(grids: &[ScoreGrid]) -> Table {
    let rows: Vec<_> = grids.iter().flat_map(|g| g.rows()).collect();
    let mut t = Table::new()
        .col("method", Column::Str(rows.iter().map(|r| r.method.clone()).collect()))
        .col("component", Column::Str(rows.iter().map(|r| r.component.clone()).collect()))
        .col("layer", Column::OptU64(rows.iter().map(|r| Some(r.layer as u64)).collect()))
        .col("head", Column::OptU64(rows.iter().map(|r| r.head.map(|h| h as u64)).collect()))
        .col("pos", Column::OptU64(rows.iter().map(|r| r.pos.map(|p| p as u64)).collect()))
        .col("score", Column::F64(rows.iter().map(|r| r.score).collect()));
    // Pairs of different lengths score positions by label (IO, S1, S2, end, ...).
    if rows.iter().any(|r| r.label.is_some()) {
        t = t.col("label", Column::Str(rows.iter().map(|r| r.label.clone().unwrap_or_default()).collect()));
    }
    t
}

/// A heatmap per grid, as `DIR/heatmap_{method}_{component}.svg|png`; returns the stems.
pub fn grid_heatmaps(grids: &[ScoreGrid], tokens: &[String], dir: &Path) -> Result<Vec<(std::path::PathBuf, String)>> {
    let mut out = Vec::new();
    for g in grids {
        // Labelled positions (pairs of different lengths) are ticked by label.
        let (pos_label, pos_ticks) = if g.labels.is_empty() { ("position", tokens.to_vec()) } else { ("label", g.labels.clone()) };
        let (values, row_label, col_label, ticks): (Vec<Vec<f64>>, &str, &str, Vec<String>) = if g.component.has_heads() && !g.by_pos {
            ((0..g.n_layers).map(|l| (0..g.n_heads).map(|h| g.get(l, 0, h)).collect()).collect(), "layer", "head", vec![])
        } else if g.component.has_heads() {
            let v = (0..g.n_layers).flat_map(|l| (0..g.n_heads).map(move |h| (l, h))).map(|(l, h)| (0..g.n_pos).map(|p| g.get(l, p, h)).collect()).collect();
            (v, "layer * n_heads + head", pos_label, pos_ticks)
        } else {
            ((0..g.n_layers).map(|l| (0..g.n_pos).map(|p| g.get(l, p, 0)).collect()).collect(), "layer", pos_label, pos_ticks)
        };
        let title = format!("{} on {}", g.method, g.component.name());
        let stem = dir.join(format!("heatmap_{}_{}", g.method, g.component.name()));
        heatmap(&Heatmap { title: title.clone(), values, row_label: row_label.into(), col_label: col_label.into(), col_ticks: ticks }, &stem)
            .with_context(|| format!("drawing {}", stem.display()))?;
        out.push((stem, title));
    }
    Ok(out)
}
