//! # ferrolens-report
//!
//! Results as files a researcher can open: tables as CSV and Parquet ([`tables`]), figures as SVG
//! and PNG ([`figures`]), and one self-contained HTML report with every figure inline ([`html`]).
#![warn(missing_docs)]

pub mod figures;
pub mod html;
pub mod tables;

pub use figures::{bar_chart, graph, heatmap, line_chart, GraphNode, Heatmap};
pub use html::Report;
pub use tables::{write_table, Column, Table};
