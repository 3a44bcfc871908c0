//! A self-contained HTML report: every figure is inlined (SVG markup), no external resources.

use anyhow::{Context, Result};
use std::path::Path;

/// HTML-escape text.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A report built section by section.
#[derive(Debug, Clone, Default)]
pub struct Report {
    title: String,
    body: String,
}

impl Report {
    /// A report with a title.
    pub fn new(title: &str) -> Self {
        Report { title: title.to_string(), body: String::new() }
    }

    /// A section heading.
    pub fn heading(&mut self, h: &str) -> &mut Self {
        self.body.push_str(&format!("<h2>{}</h2>\n", escape(h)));
        self
    }

    /// A paragraph of plain text.
    pub fn para(&mut self, t: &str) -> &mut Self {
        self.body.push_str(&format!("<p>{}</p>\n", escape(t)));
        self
    }

    /// A key/value table.
    pub fn kv(&mut self, rows: &[(&str, String)]) -> &mut Self {
        self.body.push_str("<table class=\"kv\"><tbody>");
        for (k, v) in rows {
            self.body.push_str(&format!("<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v)));
        }
        self.body.push_str("</tbody></table>\n");
        self
    }

    /// Raw HTML (already escaped), e.g. [`crate::Table::to_html`].
    pub fn html(&mut self, h: &str) -> &mut Self {
        self.body.push_str(h);
        self.body.push('\n');
        self
    }

    /// Inline an SVG file as a figure with a caption.
    pub fn figure(&mut self, svg: &Path, caption: &str) -> Result<&mut Self> {
        let s = std::fs::read_to_string(svg).with_context(|| format!("reading {}", svg.display()))?;
        let start = s.find("<svg").unwrap_or(0);
        self.body.push_str(&format!("<figure>{}<figcaption>{}</figcaption></figure>\n", &s[start..], escape(caption)));
        Ok(self)
    }

    /// The whole page.
    pub fn render(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>{css}</style></head>\n<body><h1>{t}</h1>\n{b}<footer>Made by ferrolens {v}.</footer>\n<script>{js}</script></body></html>\n",
            t = escape(&self.title),
            css = CSS,
            b = self.body,
            v = env!("CARGO_PKG_VERSION"),
            js = JS
        )
    }

    /// Write the page.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.render()).with_context(|| format!("writing {}", path.display()))
    }
}

/// Marks the page once laid out: `data-figures` = figures in the page, `data-figures-rendered` =
/// those drawn with a non-empty box (a headless-browser test reads both).
const JS: &str = "window.addEventListener('load',function(){var f=document.querySelectorAll('figure svg');\
var n=0;f.forEach(function(s){var r=s.getBoundingClientRect();if(r.width>10&&r.height>10)n++;});\
document.body.setAttribute('data-figures',f.length);document.body.setAttribute('data-figures-rendered',n);});";

const CSS: &str = "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
h1{border-bottom:2px solid #c33}h2{margin-top:2em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f4f4f4}table.kv th{text-align:left}figure{margin:1em 0}figure svg{max-width:100%;height:auto}\
figcaption{font-size:13px;color:#555}.note{font-size:12px;color:#666}footer{margin-top:3em;font-size:12px;color:#888}";
