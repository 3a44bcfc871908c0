//! Figures as SVG and PNG (plotters; text drawn with the bundled DejaVu Sans, so PNGs look the
//! same on every machine).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, bytes);
    });
}

/// A heatmap: `values[row][col]`, with axis labels.
#[derive(Debug, Clone)]
pub struct Heatmap {
    /// Title.
    pub title: String,
    /// Values `[rows][cols]` (NaN cells are grey).
    pub values: Vec<Vec<f64>>,
    /// Label of the y axis (rows), e.g. "layer".
    pub row_label: String,
    /// Label of the x axis (columns), e.g. "head" or "position".
    pub col_label: String,
    /// Tick labels of the columns (e.g. token strings); numbers when empty.
    pub col_ticks: Vec<String>,
}

fn color(v: f64, max: f64) -> RGBColor {
    if !v.is_finite() {
        return RGBColor(200, 200, 200);
    }
    // Diverging blue-white-red, symmetric around 0.
    let t = (v / max).clamp(-1.0, 1.0);
    if t >= 0.0 {
        let k = (255.0 * (1.0 - t)) as u8;
        RGBColor(255, k, k)
    } else {
        let k = (255.0 * (1.0 + t)) as u8;
        RGBColor(k, k, 255)
    }
}

fn draw_heatmap<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, h: &Heatmap) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let rows = h.values.len();
    let cols = h.values.first().map(|r| r.len()).unwrap_or(0);
    let max = h.values.iter().flatten().filter(|v| v.is_finite()).fold(1e-12f64, |m, v| m.max(v.abs()));
    let (main, legend) = root.split_horizontally(root.dim_in_pixel().0.saturating_sub(90));
    let mut chart = ChartBuilder::on(&main)
        .caption(&h.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(if h.col_ticks.is_empty() { 35 } else { 80 })
        .y_label_area_size(45)
        .build_cartesian_2d(0..cols, 0..rows)
        .map_err(|e| anyhow!("{e:?}"))?;
    let ticks = h.col_ticks.clone();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(&h.col_label)
        .y_desc(&h.row_label)
        .x_labels(cols.min(40))
        .y_labels(rows.min(40))
        .x_label_formatter(&|x| {
            if ticks.is_empty() {
                x.to_string()
            } else {
                ticks.get(*x).cloned().unwrap_or_default()
            }
        })
        .label_style(("sans-serif", 11))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .draw_series(
            h.values
                .iter()
                .enumerate()
                .flat_map(|(r, row)| row.iter().enumerate().map(move |(c, v)| Rectangle::new([(c, r), (c + 1, r + 1)], color(*v, max).filled()))),
        )
        .map_err(|e| anyhow!("{e:?}"))?;
    // Colour legend.
    let (_, lh) = legend.dim_in_pixel();
    let steps = 50;
    let top = 40i32;
    let bottom = lh as i32 - 60;
    for i in 0..steps {
        let v = max * (1.0 - 2.0 * i as f64 / (steps - 1) as f64);
        let y0 = top + (bottom - top) * i / steps;
        let y1 = top + (bottom - top) * (i + 1) / steps;
        legend.draw(&Rectangle::new([(10, y0), (30, y1)], color(v, max).filled())).map_err(|e| anyhow!("{e:?}"))?;
    }
    let style = ("sans-serif", 11).into_font();
    legend.draw(&Text::new(format!("{max:.3}"), (34, top - 4), style.clone())).map_err(|e| anyhow!("{e:?}"))?;
    legend.draw(&Text::new("0", (34, (top + bottom) / 2 - 4), style.clone())).map_err(|e| anyhow!("{e:?}"))?;
    legend.draw(&Text::new(format!("{:.3}", -max), (34, bottom - 8), style)).map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn size_for(rows: usize, cols: usize) -> (u32, u32) {
    let w = (160 + cols as u32 * 22).clamp(600, 1400);
    let h = (140 + rows as u32 * 16).clamp(320, 1000);
    (w, h)
}

/// Draw a heatmap to `stem.svg` and `stem.png`.
pub fn heatmap(h: &Heatmap, stem: &Path) -> Result<()> {
    register_font();
    let (w, ht) = size_for(h.values.len(), h.values.first().map(|r| r.len()).unwrap_or(0));
    draw_heatmap(SVGBackend::new(&stem.with_extension("svg"), (w, ht)).into_drawing_area(), h)?;
    let png = stem.with_extension("png");
    let root = BitMapBackend::new(&png, (w, ht)).into_drawing_area();
    draw_heatmap(root.clone(), h)?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// Lines `(name, points)` on one chart, to `stem.svg` and `stem.png`.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)], stem: &Path) -> Result<()> {
    register_font();
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        title: &str,
        xl: &str,
        yl: &str,
        series: &[(String, Vec<(f64, f64)>)],
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
        let pts = series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in pts {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y0 = y0.min(*y);
            y1 = y1.max(*y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.08).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
            .map_err(|e| anyhow!("{e:?}"))?;
        chart.configure_mesh().x_desc(xl).y_desc(yl).label_style(("sans-serif", 12)).draw().map_err(|e| anyhow!("{e:?}"))?;
        for (i, (name, p)) in series.iter().enumerate() {
            let c = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))
                .map_err(|e| anyhow!("{e:?}"))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            chart.draw_series(p.iter().map(|&(x, y)| Circle::new((x, y), 3, c.filled()))).map_err(|e| anyhow!("{e:?}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        Ok(())
    }
    draw(SVGBackend::new(&stem.with_extension("svg"), (720, 440)).into_drawing_area(), title, x_label, y_label, series)?;
    let png = stem.with_extension("png");
    let root = BitMapBackend::new(&png, (720, 440)).into_drawing_area();
    draw(root.clone(), title, x_label, y_label, series)?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// A horizontal-category bar chart of `(label, value)` to `stem.svg` and `stem.png`.
pub fn bar_chart(title: &str, y_label: &str, bars: &[(String, f64)], stem: &Path) -> Result<()> {
    register_font();
    fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, title: &str, yl: &str, bars: &[(String, f64)]) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
        let lo = bars.iter().map(|b| b.1).fold(0f64, f64::min);
        let hi = bars.iter().map(|b| b.1).fold(0f64, f64::max).max(lo + 1e-9);
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(55)
            .build_cartesian_2d(0..bars.len(), lo..hi * 1.05)
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(yl)
            .x_labels(bars.len().min(40))
            .x_label_formatter(&|x| labels.get(*x).cloned().unwrap_or_default())
            .x_label_style(("sans-serif", 10).into_font().transform(FontTransform::Rotate90))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let c = if *v >= 0.0 { RGBColor(200, 60, 60) } else { RGBColor(60, 60, 200) };
                Rectangle::new([(i, 0.0), (i + 1, *v)], c.filled())
            }))
            .map_err(|e| anyhow!("{e:?}"))?;
        Ok(())
    }
    let w = (200 + bars.len() as u32 * 24).clamp(480, 1400);
    draw(SVGBackend::new(&stem.with_extension("svg"), (w, 440)).into_drawing_area(), title, y_label, bars)?;
    let png = stem.with_extension("png");
    let root = BitMapBackend::new(&png, (w, 440)).into_drawing_area();
    draw(root.clone(), title, y_label, bars)?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// A node of [`graph`]: position in `[0,1]^2` (y = 0 at the top), label, fill colour.
#[derive(Debug, Clone)]
pub struct GraphNode {
    /// x in [0, 1].
    pub x: f64,
    /// y in [0, 1], 0 = top.
    pub y: f64,
    /// Label.
    pub label: String,
    /// Fill (r, g, b).
    pub fill: (u8, u8, u8),
}

/// A node-link diagram: `edges` are `(from, to, weight)` indices into `nodes`; line width scales
/// with |weight|, red for positive, blue for negative. Writes `stem.svg` and `stem.png`.
pub fn graph(title: &str, nodes: &[GraphNode], edges: &[(usize, usize, f64)], side_labels: &[(f64, String)], stem: &Path) -> Result<()> {
    register_font();
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        title: &str,
        nodes: &[GraphNode],
        edges: &[(usize, usize, f64)],
        side: &[(f64, String)],
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |x: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{x:?}");
        root.fill(&WHITE).map_err(e)?;
        let (w, h) = root.dim_in_pixel();
        let (l, r, t, b) = (90.0, 30.0, 45.0, 20.0);
        let px = |n: &GraphNode| ((l + n.x * (w as f64 - l - r)) as i32, (t + n.y * (h as f64 - t - b)) as i32);
        root.draw(&Text::new(title.to_string(), (10, 10), ("sans-serif", 16).into_font())).map_err(e)?;
        for (y, s) in side {
            let yy = (t + y * (h as f64 - t - b)) as i32;
            root.draw(&Text::new(s.clone(), (8, yy - 6), ("sans-serif", 11).into_font().color(&RGBColor(130, 130, 130)))).map_err(e)?;
        }
        let max = edges.iter().map(|x| x.2.abs()).fold(1e-12, f64::max);
        for &(a, bb, wgt) in edges {
            let c = if wgt >= 0.0 { RGBColor(200, 50, 50) } else { RGBColor(50, 50, 200) };
            let width = (1.0 + 4.0 * wgt.abs() / max) as u32;
            root.draw(&PathElement::new(vec![px(&nodes[a]), px(&nodes[bb])], c.mix(0.55).stroke_width(width))).map_err(e)?;
        }
        for n in nodes {
            let (x, y) = px(n);
            root.draw(&Rectangle::new([(x - 30, y - 10), (x + 30, y + 10)], RGBColor(n.fill.0, n.fill.1, n.fill.2).filled())).map_err(e)?;
            root.draw(&Rectangle::new([(x - 30, y - 10), (x + 30, y + 10)], BLACK.stroke_width(1))).map_err(e)?;
            let style = TextStyle::from(("sans-serif", 11).into_font())
                .pos(plotters::style::text_anchor::Pos::new(plotters::style::text_anchor::HPos::Center, plotters::style::text_anchor::VPos::Center));
            root.draw(&Text::new(n.label.clone(), (x, y), style)).map_err(e)?;
        }
        Ok(())
    }
    let h = (120.0 + 40.0 * side_labels.len().max(3) as f64) as u32;
    draw(SVGBackend::new(&stem.with_extension("svg"), (960, h)).into_drawing_area(), title, nodes, edges, side_labels)?;
    let png = stem.with_extension("png");
    let root = BitMapBackend::new(&png, (960, h)).into_drawing_area();
    draw(root.clone(), title, nodes, edges, side_labels)?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}
