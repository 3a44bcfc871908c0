//! Hook points: TransformerLens names, parsed into a typed value.
//!
//! ```
//! use ferrolens_model::HookPoint;
//! let h: HookPoint = "blocks.3.attn.hook_z".parse().unwrap();
//! assert_eq!(h, HookPoint::Z(3));
//! assert_eq!(h.to_string(), "blocks.3.attn.hook_z");
//! ```

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// One TransformerLens hook point. Shapes (b = batch, p = position, h = query heads,
/// kv = key/value heads, d = d_head, D = d_model, M = d_mlp, V = d_vocab):
///
/// | variant | TL name | shape |
/// |---|---|---|
/// | `Embed` | `hook_embed` | `[b,p,D]` |
/// | `PosEmbed` | `hook_pos_embed` | `[b,p,D]` (GPT-2 only) |
/// | `ResidPre(l)` .. `ResidPost(l)`, `AttnOut(l)`, `MlpOut(l)` | `blocks.l.hook_*` | `[b,p,D]` |
/// | `AttnIn(l)`, `MlpIn(l)` | `blocks.l.hook_attn_in`, `blocks.l.hook_mlp_in` | `[b,p,D]` (the sublayer's own copy of the residual) |
/// | `Ln1Scale(l)`, `Ln2Scale(l)`, `Ln1PostScale(l)`, `Ln2PostScale(l)`, `LnFinalScale` | `*.hook_scale` | `[b,p,1]` |
/// | `Ln1Normalized(l)`, `Ln2Normalized(l)`, `Ln1PostNormalized(l)`, `Ln2PostNormalized(l)`, `LnFinalNormalized` | `*.hook_normalized` | `[b,p,D]` |
/// | `QNormScale(l)`, `KNormScale(l)` | `blocks.l.attn.q_norm.hook_scale`, `k_norm` | `[b,p,h,1]` per head, `[b,p,1,1]` full width (`kv` for keys) |
/// | `QNormNormalized(l)`, `KNormNormalized(l)` | `blocks.l.attn.q_norm.hook_normalized`, `k_norm` | `[b,p,h,d]` (`kv` for keys) |
/// | `Q(l)`, `RotQ(l)`, `Z(l)` | `blocks.l.attn.hook_q/rot_q/z` | `[b,p,h,d]` |
/// | `K(l)`, `V(l)`, `RotK(l)` | `blocks.l.attn.hook_k/v/rot_k` | `[b,p,kv,d]` |
/// | `AttnScores(l)`, `Pattern(l)` | `blocks.l.attn.hook_attn_scores/pattern` | `[b,h,q,k]` |
/// | `Result(l)` | `blocks.l.attn.hook_result` | `[b,p,h,D]` |
/// | `MlpPre(l)`, `MlpPreLinear(l)`, `MlpPost(l)` | `blocks.l.mlp.hook_*` | `[b,p,M]` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum HookPoint {
    Embed,
    PosEmbed,
    ResidPre(usize),
    AttnIn(usize),
    Ln1Scale(usize),
    Ln1Normalized(usize),
    Q(usize),
    K(usize),
    V(usize),
    QNormScale(usize),
    QNormNormalized(usize),
    KNormScale(usize),
    KNormNormalized(usize),
    RotQ(usize),
    RotK(usize),
    AttnScores(usize),
    Pattern(usize),
    Z(usize),
    Result(usize),
    Ln1PostScale(usize),
    Ln1PostNormalized(usize),
    AttnOut(usize),
    ResidMid(usize),
    MlpIn(usize),
    Ln2Scale(usize),
    Ln2Normalized(usize),
    MlpPre(usize),
    MlpPreLinear(usize),
    MlpPost(usize),
    Ln2PostScale(usize),
    Ln2PostNormalized(usize),
    MlpOut(usize),
    ResidPost(usize),
    LnFinalScale,
    LnFinalNormalized,
}

/// A hook point's constructor from its layer.
type LayerHook = fn(usize) -> HookPoint;

/// The per-layer hook suffixes in forward order, with their constructors.
const LAYER_HOOKS: &[(&str, LayerHook)] = &[
    ("hook_resid_pre", HookPoint::ResidPre),
    ("hook_attn_in", HookPoint::AttnIn),
    ("ln1.hook_scale", HookPoint::Ln1Scale),
    ("ln1.hook_normalized", HookPoint::Ln1Normalized),
    ("attn.hook_q", HookPoint::Q),
    ("attn.hook_k", HookPoint::K),
    ("attn.hook_v", HookPoint::V),
    ("attn.q_norm.hook_scale", HookPoint::QNormScale),
    ("attn.q_norm.hook_normalized", HookPoint::QNormNormalized),
    ("attn.k_norm.hook_scale", HookPoint::KNormScale),
    ("attn.k_norm.hook_normalized", HookPoint::KNormNormalized),
    ("attn.hook_rot_q", HookPoint::RotQ),
    ("attn.hook_rot_k", HookPoint::RotK),
    ("attn.hook_attn_scores", HookPoint::AttnScores),
    ("attn.hook_pattern", HookPoint::Pattern),
    ("attn.hook_z", HookPoint::Z),
    ("attn.hook_result", HookPoint::Result),
    ("ln1_post.hook_scale", HookPoint::Ln1PostScale),
    ("ln1_post.hook_normalized", HookPoint::Ln1PostNormalized),
    ("hook_attn_out", HookPoint::AttnOut),
    ("hook_resid_mid", HookPoint::ResidMid),
    ("hook_mlp_in", HookPoint::MlpIn),
    ("ln2.hook_scale", HookPoint::Ln2Scale),
    ("ln2.hook_normalized", HookPoint::Ln2Normalized),
    ("mlp.hook_pre", HookPoint::MlpPre),
    ("mlp.hook_pre_linear", HookPoint::MlpPreLinear),
    ("mlp.hook_post", HookPoint::MlpPost),
    ("ln2_post.hook_scale", HookPoint::Ln2PostScale),
    ("ln2_post.hook_normalized", HookPoint::Ln2PostNormalized),
    ("hook_mlp_out", HookPoint::MlpOut),
    ("hook_resid_post", HookPoint::ResidPost),
];

impl HookPoint {
    /// The layer of a per-block hook point, `None` for `hook_embed`, `hook_pos_embed`, `ln_final.*`.
    pub fn layer(&self) -> Option<usize> {
        use HookPoint::*;
        match *self {
            Embed | PosEmbed | LnFinalScale | LnFinalNormalized => None,
            ResidPre(l) | AttnIn(l) | Ln1Scale(l) | Ln1Normalized(l) | Q(l) | K(l) | V(l) | QNormScale(l) | QNormNormalized(l) | KNormScale(l)
            | KNormNormalized(l) | RotQ(l) | RotK(l) | AttnScores(l) | Pattern(l) | Z(l) | Result(l) | Ln1PostScale(l) | Ln1PostNormalized(l) | AttnOut(l)
            | ResidMid(l) | MlpIn(l) | Ln2Scale(l) | Ln2Normalized(l) | MlpPre(l) | MlpPreLinear(l) | MlpPost(l) | Ln2PostScale(l) | Ln2PostNormalized(l)
            | MlpOut(l) | ResidPost(l) => Some(l),
        }
    }

    /// The TL suffix after `blocks.{l}.` (or the whole name for global hooks).
    pub fn suffix(&self) -> &'static str {
        use HookPoint::*;
        match self {
            Embed => "hook_embed",
            PosEmbed => "hook_pos_embed",
            LnFinalScale => "ln_final.hook_scale",
            LnFinalNormalized => "ln_final.hook_normalized",
            _ => {
                let l = self.layer().unwrap_or(0);
                LAYER_HOOKS.iter().find(|(_, f)| f(l) == *self).map(|(s, _)| *s).unwrap_or("?")
            }
        }
    }

    /// Whether the activation has a head axis, and which one: `Some(2)` for `[b,p,h,..]`,
    /// `Some(1)` for `[b,h,q,k]`, `None` otherwise.
    pub fn head_axis(&self) -> Option<usize> {
        use HookPoint::*;
        match self {
            Q(_) | K(_) | V(_) | RotQ(_) | RotK(_) | Z(_) | Result(_) => Some(2),
            // q/k norms are [b,p,h,d] (a full-width norm's scale is [b,p,1,1]).
            QNormScale(_) | QNormNormalized(_) | KNormScale(_) | KNormNormalized(_) => Some(2),
            AttnScores(_) | Pattern(_) => Some(1),
            _ => None,
        }
    }

    /// The axis that indexes (query) positions: 2 for `[b,h,q,k]` patterns, 1 otherwise.
    pub fn pos_axis(&self) -> usize {
        match self {
            HookPoint::AttnScores(_) | HookPoint::Pattern(_) => 2,
            _ => 1,
        }
    }

    /// Every hook point of a model with `n_layers` layers, in forward order (including
    /// the ones that a given architecture lacks, e.g. `hook_pos_embed` for rotary models).
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let mut v = vec![HookPoint::Embed, HookPoint::PosEmbed];
        for l in 0..n_layers {
            v.extend(LAYER_HOOKS.iter().map(|(_, f)| f(l)));
        }
        v.push(HookPoint::LnFinalScale);
        v.push(HookPoint::LnFinalNormalized);
        v
    }

    /// The position of the hook in the forward pass (a sort key; dense for per-layer hooks).
    pub fn slot(&self) -> usize {
        use HookPoint::*;
        let per = LAYER_HOOKS.len();
        match self {
            Embed => 0,
            PosEmbed => 1,
            LnFinalScale => usize::MAX - 1,
            LnFinalNormalized => usize::MAX,
            _ => {
                let l = self.layer().unwrap_or(0);
                let k = LAYER_HOOKS.iter().position(|(_, f)| f(l) == *self).unwrap_or(0);
                2 + l * per + k
            }
        }
    }

    /// Parse a TL hook name. Errors name the closest valid hook.
    pub fn parse_name(name: &str) -> Result<HookPoint> {
        let bad = || Error::UnknownHook { name: name.to_string(), suggestion: suggest(name) };
        match name {
            "hook_embed" => return Ok(HookPoint::Embed),
            "hook_pos_embed" => return Ok(HookPoint::PosEmbed),
            "ln_final.hook_scale" => return Ok(HookPoint::LnFinalScale),
            "ln_final.hook_normalized" => return Ok(HookPoint::LnFinalNormalized),
            _ => {}
        }
        let rest = name.strip_prefix("blocks.").ok_or_else(bad)?;
        let (num, suffix) = rest.split_once('.').ok_or_else(bad)?;
        let layer: usize = num.parse().map_err(|_| bad())?;
        LAYER_HOOKS.iter().find(|(s, _)| *s == suffix).map(|(_, f)| f(layer)).ok_or_else(bad)
    }
}

/// ", did you mean `X`?" for the closest valid hook name by edit distance, if close.
fn suggest(name: &str) -> String {
    // Keep the layer number the user typed where there is one.
    let layer = name.strip_prefix("blocks.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
    let mut candidates: Vec<String> = vec!["hook_embed".into(), "hook_pos_embed".into(), "ln_final.hook_scale".into(), "ln_final.hook_normalized".into()];
    candidates.extend(LAYER_HOOKS.iter().map(|(s, _)| format!("blocks.{layer}.{s}")));
    let best = candidates.into_iter().map(|c| (strsim::levenshtein(&c, name), c)).min();
    match best {
        Some((d, c)) if d <= name.len().max(4) / 2 => format!(", did you mean `{c}`?"),
        _ => ". Hook names look like `blocks.0.attn.hook_z` (see docs/hooks.md)".to_string(),
    }
}

/// Hook points order as the forward pass visits them.
impl Ord for HookPoint {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.slot().cmp(&other.slot())
    }
}

impl PartialOrd for HookPoint {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for HookPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        HookPoint::parse_name(s)
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layer() {
            Some(l) => write!(f, "blocks.{l}.{}", self.suffix()),
            None => f.write_str(self.suffix()),
        }
    }
}

/// A filter over hook names: exact names, globs (`blocks.*.attn.hook_z`) or a regex
/// (`re:^blocks\.[0-3]\.hook_resid_pre$`). Comma-separated lists combine with "or".
#[derive(Debug, Clone)]
pub struct NameFilter {
    res: Vec<regex::Regex>,
}

impl NameFilter {
    /// Parse a comma-separated list of patterns. A pattern that starts with `re:` is a regex;
    /// one with `*` or `?` is a glob; anything else must be a valid hook name.
    pub fn parse(patterns: &str) -> Result<Self> {
        let mut res = Vec::new();
        for p in patterns.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let re = if let Some(r) = p.strip_prefix("re:") {
                regex::Regex::new(r).map_err(|e| Error::Input(format!("bad regex `{r}`: {e}")))?
            } else if p.contains('*') || p.contains('?') {
                let mut s = String::from("^");
                for c in p.chars() {
                    match c {
                        '*' => s.push_str(".*"),
                        '?' => s.push('.'),
                        c => s.push_str(&regex::escape(&c.to_string())),
                    }
                }
                s.push('$');
                regex::Regex::new(&s).map_err(|e| Error::Input(format!("bad glob `{p}`: {e}")))?
            } else {
                let h = HookPoint::parse_name(p)?;
                regex::Regex::new(&format!("^{}$", regex::escape(&h.to_string()))).expect("escaped literal is a valid regex")
            };
            res.push(re);
        }
        if res.is_empty() {
            return Err(Error::Input("empty hook filter: give a name, glob or re:REGEX".into()));
        }
        Ok(NameFilter { res })
    }

    /// Whether `hook` matches.
    pub fn matches(&self, hook: &HookPoint) -> bool {
        let n = hook.to_string();
        self.res.iter().any(|r| r.is_match(&n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_name() {
        for h in HookPoint::all(3) {
            let s = h.to_string();
            assert_eq!(s.parse::<HookPoint>().unwrap(), h, "{s}");
        }
        assert_eq!(HookPoint::all(3).len(), 4 + 3 * LAYER_HOOKS.len());
    }

    #[test]
    fn unknown_hook_suggests() {
        let e = "blocks.2.attn.hook_zz".parse::<HookPoint>().unwrap_err().to_string();
        assert!(e.contains("did you mean `blocks.2.attn.hook_z`"), "{e}");
        let e = "blocks.1.hook_resid_pr".parse::<HookPoint>().unwrap_err().to_string();
        assert!(e.contains("blocks.1.hook_resid_pre"), "{e}");
    }

    #[test]
    fn filters() {
        let f = NameFilter::parse("blocks.*.attn.hook_z,hook_embed").unwrap();
        assert!(f.matches(&HookPoint::Z(7)));
        assert!(f.matches(&HookPoint::Embed));
        assert!(!f.matches(&HookPoint::Q(7)));
        let f = NameFilter::parse(r"re:^blocks\.[0-1]\.hook_resid_pre$").unwrap();
        assert!(f.matches(&HookPoint::ResidPre(1)));
        assert!(!f.matches(&HookPoint::ResidPre(2)));
        assert!(NameFilter::parse("blocks.0.hook_nope").is_err());
    }
}
