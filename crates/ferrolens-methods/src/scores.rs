//! Components and score grids shared by every method.

use ferrolens_model::{Error, HookPoint, HookedTransformer, Result};
use serde::{Deserialize, Serialize};

/// A kind of model component that a method scores, at every layer (a preset of the patchable
/// hook points; `FromStr`/`Display` use the CLI names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Component {
    /// `blocks.L.hook_resid_pre` by position.
    #[cfg_attr(feature = "clap", value(name = "resid_pre"))]
    ResidPre,
    /// `blocks.L.hook_resid_mid` by position.
    #[cfg_attr(feature = "clap", value(name = "resid_mid"))]
    ResidMid,
    /// `blocks.L.hook_attn_out` by position.
    #[cfg_attr(feature = "clap", value(name = "attn_out"))]
    AttnOut,
    /// `blocks.L.hook_mlp_out` by position.
    #[cfg_attr(feature = "clap", value(name = "mlp_out"))]
    MlpOut,
    /// Attention heads' outputs, `blocks.L.attn.hook_z` (the "heads" of the CLI).
    #[cfg_attr(feature = "clap", value(name = "heads", alias = "z"))]
    HeadZ,
    /// Queries `hook_q`.
    #[cfg_attr(feature = "clap", value(name = "heads_q", alias = "q"))]
    HeadQ,
    /// Keys `hook_k` (key/value heads for GQA models).
    #[cfg_attr(feature = "clap", value(name = "heads_k", alias = "k"))]
    HeadK,
    /// Values `hook_v` (key/value heads for GQA models).
    #[cfg_attr(feature = "clap", value(name = "heads_v", alias = "v"))]
    HeadV,
    /// Attention patterns `hook_pattern` (query positions).
    #[cfg_attr(feature = "clap", value(name = "heads_pattern", alias = "pattern"))]
    HeadPattern,
}

impl std::str::FromStr for Component {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Component::parse(s.trim())
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Component {
    /// The hook point at layer `l`.
    pub fn hook(&self, l: usize) -> HookPoint {
        match self {
            Component::ResidPre => HookPoint::ResidPre(l),
            Component::ResidMid => HookPoint::ResidMid(l),
            Component::AttnOut => HookPoint::AttnOut(l),
            Component::MlpOut => HookPoint::MlpOut(l),
            Component::HeadZ => HookPoint::Z(l),
            Component::HeadQ => HookPoint::Q(l),
            Component::HeadK => HookPoint::K(l),
            Component::HeadV => HookPoint::V(l),
            Component::HeadPattern => HookPoint::Pattern(l),
        }
    }

    /// The name used in tables and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Component::ResidPre => "resid_pre",
            Component::ResidMid => "resid_mid",
            Component::AttnOut => "attn_out",
            Component::MlpOut => "mlp_out",
            Component::HeadZ => "heads",
            Component::HeadQ => "heads_q",
            Component::HeadK => "heads_k",
            Component::HeadV => "heads_v",
            Component::HeadPattern => "heads_pattern",
        }
    }

    /// Parse a CLI name (`heads` = `z`).
    pub fn parse(s: &str) -> Result<Component> {
        Ok(match s {
            "resid_pre" => Component::ResidPre,
            "resid_mid" => Component::ResidMid,
            "attn_out" => Component::AttnOut,
            "mlp_out" => Component::MlpOut,
            "heads" | "z" | "heads_z" => Component::HeadZ,
            "heads_q" | "q" => Component::HeadQ,
            "heads_k" | "k" => Component::HeadK,
            "heads_v" | "v" => Component::HeadV,
            "heads_pattern" | "pattern" => Component::HeadPattern,
            other => {
                return Err(Error::Input(format!(
                    "unknown component `{other}`; use resid_pre, resid_mid, attn_out, mlp_out, heads, heads_q, heads_k, heads_v or heads_pattern"
                )))
            }
        })
    }

    /// Whether the component has a head axis.
    pub fn has_heads(&self) -> bool {
        matches!(self, Component::HeadZ | Component::HeadQ | Component::HeadK | Component::HeadV | Component::HeadPattern)
    }

    /// Number of heads of this component in `model` (KV heads for keys and values).
    pub fn n_heads(&self, model: &HookedTransformer) -> usize {
        match self {
            Component::HeadK | Component::HeadV => model.cfg.n_kv_heads,
            c if c.has_heads() => model.cfg.n_heads,
            _ => 0,
        }
    }
}

/// Which positions a method scores separately.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Positions {
    /// All positions at once (a whole-layer patch; gradient scores summed over positions).
    #[default]
    All,
    /// Every position index of the batch (prompts of one length, or a padded batch's indices).
    Each,
    /// Named positions that differ per prompt (IOI's `IO`, `S1`, `S2`, `end`, ...): each label
    /// with the index it has in every prompt row (in the padded batch), `[prompts]`.
    Labels(Vec<(String, Vec<usize>)>),
}

impl Positions {
    /// Whether scores are per position (or per label).
    pub fn separate(&self) -> bool {
        !matches!(self, Positions::All)
    }

    /// The number of position slots for a batch of `p` positions.
    pub fn slots(&self, p: usize) -> usize {
        match self {
            Positions::All => 1,
            Positions::Each => p,
            Positions::Labels(l) => l.len(),
        }
    }

    /// The label names (empty unless [`Positions::Labels`]).
    pub fn names(&self) -> Vec<String> {
        match self {
            Positions::Labels(l) => l.iter().map(|(n, _)| n.clone()).collect(),
            _ => vec![],
        }
    }

    /// The position index of slot `slot` in prompt row `row` (`None`: every position).
    pub fn index(&self, slot: usize, row: usize) -> Option<usize> {
        match self {
            Positions::All => None,
            Positions::Each => Some(slot),
            Positions::Labels(l) => Some(l[slot].1[row]),
        }
    }

    /// Check label indices against a batch of `b` prompts of `p` positions.
    pub fn check(&self, b: usize, p: usize) -> Result<()> {
        if let Positions::Labels(l) = self {
            for (name, idx) in l {
                if idx.len() != b {
                    return Err(Error::Input(format!("label `{name}` has {} indices for {b} prompts", idx.len())));
                }
                if let Some(i) = idx.iter().find(|&&i| i >= p) {
                    return Err(Error::Input(format!("label `{name}` points at position {i} of {p}-position prompts")));
                }
            }
        }
        Ok(())
    }
}

/// One scored component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    /// Method name (`act`, `atp`, `relp`, ...).
    pub method: String,
    /// Component name.
    pub component: String,
    /// Layer.
    pub layer: usize,
    /// Head (None for residual-like components).
    pub head: Option<usize>,
    /// Position (None for head scores over all positions; the label's slot for labelled positions).
    pub pos: Option<usize>,
    /// The position's label (IOI's `S2`, ...) when scores are by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The score.
    pub score: f64,
}

/// Scores of one method on one component over layers (x positions) (x heads).
/// `values` is laid out `[layer][pos][head]`, with the pos axis of length 1 when `by_pos` is
/// false and the head axis of length 1 for residual-like components.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreGrid {
    /// Method name.
    pub method: String,
    /// Component.
    pub component: Component,
    /// Whether scores are per position.
    pub by_pos: bool,
    /// Layers.
    pub n_layers: usize,
    /// Positions (1 when not `by_pos`).
    pub n_pos: usize,
    /// Heads (1 for residual-like components).
    pub n_heads: usize,
    /// `[layer][pos][head]` values.
    pub values: Vec<f64>,
    /// The names of the position slots when scores are by label (empty otherwise).
    #[serde(default)]
    pub labels: Vec<String>,
}

impl ScoreGrid {
    /// A zero grid.
    pub fn zeros(method: &str, component: Component, by_pos: bool, n_layers: usize, n_pos: usize, n_heads: usize) -> Self {
        let n_pos = if by_pos { n_pos } else { 1 };
        let n_heads = n_heads.max(1);
        ScoreGrid { method: method.into(), component, by_pos, n_layers, n_pos, n_heads, values: vec![0.0; n_layers * n_pos * n_heads], labels: vec![] }
    }

    /// A zero grid over the slots of `positions` for a batch of `p` positions.
    pub fn for_positions(method: &str, component: Component, positions: &Positions, n_layers: usize, p: usize, n_heads: usize) -> Self {
        let mut g = Self::zeros(method, component, positions.separate(), n_layers, positions.slots(p), n_heads);
        g.labels = positions.names();
        g
    }

    /// The scores as a zero-copy `ndarray` view `[layer, pos, head]` (pos and head of size 1
    /// where the axis is absent), for ndarray-stats, linfa or plotting crates.
    pub fn array(&self) -> ndarray::ArrayView3<'_, f64> {
        ndarray::ArrayView3::from_shape((self.n_layers, self.n_pos, self.n_heads), &self.values).expect("values hold n_layers * n_pos * n_heads scores")
    }

    /// Index of (layer, pos, head) in `values`.
    pub fn idx(&self, layer: usize, pos: usize, head: usize) -> usize {
        (layer * self.n_pos + pos) * self.n_heads + head
    }

    /// The value at (layer, pos, head); pos and head are 0 where the axis is absent.
    pub fn get(&self, layer: usize, pos: usize, head: usize) -> f64 {
        self.values[self.idx(layer, pos, head)]
    }

    /// Table rows in `method,component,layer,head,pos,score` form.
    pub fn rows(&self) -> Vec<ScoreRow> {
        let mut out = Vec::with_capacity(self.values.len());
        for l in 0..self.n_layers {
            for p in 0..self.n_pos {
                for h in 0..self.n_heads {
                    out.push(ScoreRow {
                        method: self.method.clone(),
                        component: self.component.name().into(),
                        layer: l,
                        head: self.component.has_heads().then_some(h),
                        pos: self.by_pos.then_some(p),
                        label: self.labels.get(p).cloned(),
                        score: self.get(l, p, h),
                    });
                }
            }
        }
        out
    }
}

/// Pearson correlation of two equally long series (NaN when either is constant).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let ma = a.iter().sum::<f64>() / n;
    let mb = b.iter().sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    sab / (saa.sqrt() * sbb.sqrt())
}
