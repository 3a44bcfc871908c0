//! Tables: a small column store written as CSV and Parquet through polars.

use anyhow::{Context, Result};
use polars::prelude::*;
use std::path::Path;

/// One column of a [`Table`].
#[derive(Debug, Clone)]
pub enum Column {
    /// Text.
    Str(Vec<String>),
    /// Floats.
    F64(Vec<f64>),
    /// Optional integers (empty cells where `None`).
    OptU64(Vec<Option<u64>>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Str(v) => v.len(),
            Column::F64(v) => v.len(),
            Column::OptU64(v) => v.len(),
        }
    }
}

/// Named columns of equal length.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// `(name, column)` in order.
    pub columns: Vec<(String, Column)>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a column.
    pub fn col(mut self, name: &str, c: Column) -> Self {
        self.columns.push((name.to_string(), c));
        self
    }

    /// Rows.
    pub fn n_rows(&self) -> usize {
        self.columns.first().map(|(_, c)| c.len()).unwrap_or(0)
    }

    fn frame(&self) -> Result<DataFrame> {
        let cols: Vec<polars::prelude::Column> = self
            .columns
            .iter()
            .map(|(n, c)| {
                let s = match c {
                    Column::Str(v) => Series::new(n.as_str().into(), v),
                    Column::F64(v) => Series::new(n.as_str().into(), v),
                    Column::OptU64(v) => Series::new(n.as_str().into(), v),
                };
                s.into()
            })
            .collect();
        Ok(DataFrame::new(self.n_rows(), cols)?)
    }

    /// The table as an HTML `<table>` (numbers with 4 significant digits).
    pub fn to_html(&self, max_rows: usize) -> String {
        let mut s = String::from("<table><thead><tr>");
        for (n, _) in &self.columns {
            s.push_str(&format!("<th>{}</th>", crate::html::escape(n)));
        }
        s.push_str("</tr></thead><tbody>");
        for r in 0..self.n_rows().min(max_rows) {
            s.push_str("<tr>");
            for (_, c) in &self.columns {
                let cell = match c {
                    Column::Str(v) => crate::html::escape(&v[r]),
                    Column::F64(v) => format!("{:.4}", v[r]),
                    Column::OptU64(v) => v[r].map(|x| x.to_string()).unwrap_or_default(),
                };
                s.push_str(&format!("<td>{cell}</td>"));
            }
            s.push_str("</tr>");
        }
        s.push_str("</tbody></table>");
        if self.n_rows() > max_rows {
            s.push_str(&format!("<p class=\"note\">{} of {} rows shown; the CSV holds all.</p>", max_rows, self.n_rows()));
        }
        s
    }
}

/// Write `table` to `stem.csv` and `stem.parquet`.
pub fn write_table(table: &Table, stem: &Path) -> Result<()> {
    let mut df = table.frame()?;
    let csv = stem.with_extension("csv");
    let mut f = std::fs::File::create(&csv).with_context(|| format!("creating {}", csv.display()))?;
    CsvWriter::new(&mut f).include_header(true).finish(&mut df)?;
    let pq = stem.with_extension("parquet");
    let f = std::fs::File::create(&pq).with_context(|| format!("creating {}", pq.display()))?;
    ParquetWriter::new(f).finish(&mut df)?;
    Ok(())
}
