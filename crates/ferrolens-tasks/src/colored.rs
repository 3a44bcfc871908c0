//! Colored Objects (Merullo, Eickhoff, Pavlick 2023, "Circuit Component Reuse Across Tasks").
//!
//! `Q: On the {surface}, {start} {items}. What color is the {object}?\nA:` (the paper's
//! [`Wording::Qa`], answers `" Red"`) or `On the {surface}, {start} {items}. The {object} is`
//! ([`Wording::Statement`], answers `" red"`), with solved examples before the query; the
//! corrupt prompt asks for a different listed object.
//!
//! Position labels (token index of the last token of each, in both prompts of a pair):
//! `answer_color` and `answer_object` (the queried item in the query's list), `wrong_color` and
//! `wrong_object` (the item the corrupt prompt asks about), `query` (the object after "What
//! color is the") and `end`.

use crate::pairs::PromptPair;
use ferrolens_model::{Error, Result, Tokenizer};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// The 8 colours.
pub const COLORS: [&str; 8] = ["red", "orange", "yellow", "green", "blue", "purple", "brown", "black"];
/// The 17 objects.
pub const OBJECTS: [&str; 17] = [
    "pencil", "notebook", "pen", "cup", "plate", "jug", "mug", "puzzle", "textbook", "leash", "necklace", "bracelet", "bottle", "ball", "envelope", "lighter",
    "bowl",
];
/// Surfaces.
pub const SURFACES: [&str; 3] = ["table", "desk", "floor"];
/// Sentence starts.
pub const STARTS: [&str; 3] = ["there is", "you see", "I see"];

/// How a question is worded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Wording {
    /// `Q: On the desk, I see a red pen, ... What color is the pen?\nA:` answered `" Red"`
    /// (Merullo et al.'s format).
    #[default]
    Qa,
    /// `On the desk, I see a red pen, ... The pen is` answered `" red"`.
    Statement,
}

impl std::str::FromStr for Wording {
    type Err = Error;
    fn from_str(s: &str) -> Result<Wording> {
        match s.trim() {
            "qa" => Ok(Wording::Qa),
            "statement" => Ok(Wording::Statement),
            o => Err(Error::Input(format!("unknown Colored Objects wording `{o}`; use qa or statement"))),
        }
    }
}

impl Wording {
    /// `qa` / `statement`.
    pub fn name(&self) -> &'static str {
        match self {
            Wording::Qa => "qa",
            Wording::Statement => "statement",
        }
    }

    /// The answer token's text for `color`: `" Red"` or `" red"`.
    pub fn answer(&self, color: &str) -> String {
        match self {
            Wording::Qa => format!(" {}", cap(color)),
            Wording::Statement => format!(" {color}"),
        }
    }

    /// What follows the query's object at the end of the prompt.
    fn tail(&self) -> &'static str {
        match self {
            Wording::Qa => "?\nA:",
            Wording::Statement => " is",
        }
    }
}

/// Settings of a Colored Objects prompt set.
#[derive(Debug, Clone)]
pub struct ColoredConfig {
    /// Number of pairs.
    pub n: usize,
    /// RNG seed.
    pub seed: u64,
    /// Objects listed per question (3, as the paper; SmolLM2-135M's clean logit difference is
    /// about 0.5 with 3 objects and 1 shot, but below 0.15 with 2).
    pub n_objects: usize,
    /// Solved examples before the query.
    pub shots: usize,
    /// Keep pairs of every token length (a padded batch, positions by label); by default only
    /// the most common length is kept.
    pub all_lengths: bool,
    /// How questions are worded.
    pub wording: Wording,
}

impl Default for ColoredConfig {
    fn default() -> Self {
        ColoredConfig { n: 32, seed: 0, n_objects: 3, shots: 1, all_lengths: false, wording: Wording::Qa }
    }
}

/// The token index of the last token of `text[..end]` in `ids` (the tokens of `text`), if the
/// prefix tokenizes to a prefix of `ids` (it does unless a token spans `end`).
fn last_token_at(tok: &Tokenizer, text: &str, end: usize, ids: &[u32]) -> Result<Option<usize>> {
    let pre = tok.encode_prompt(&text[..end])?;
    Ok((!pre.is_empty() && pre.len() <= ids.len() && ids[..pre.len()] == pre[..]).then(|| pre.len() - 1))
}

fn article(color: &str) -> &'static str {
    if color.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

struct Scene {
    surface: &'static str,
    start: &'static str,
    items: Vec<(&'static str, &'static str)>, // (colour, object)
}

impl Scene {
    fn question(&self, object: &str, wording: Wording) -> String {
        let items: Vec<String> = self.items.iter().map(|(c, o)| format!("{} {c} {o}", article(c))).collect();
        let list = match items.len() {
            1 => items[0].clone(),
            2 => format!("{} and {}", items[0], items[1]),
            n => format!("{}, and {}", items[..n - 1].join(", "), items[n - 1]),
        };
        match wording {
            Wording::Qa => format!("Q: On the {}, {} {list}. What color is the {object}?\nA:", self.surface, self.start),
            Wording::Statement => format!("On the {}, {} {list}. The {object} is", self.surface, self.start),
        }
    }
}

fn scene(rng: &mut StdRng, n_objects: usize, colors: &[&'static str], objects: &[&'static str]) -> Scene {
    let mut cs = colors.to_vec();
    cs.shuffle(rng);
    let mut os = objects.to_vec();
    os.shuffle(rng);
    Scene {
        surface: SURFACES.choose(rng).expect("surfaces"),
        start: STARTS.choose(rng).expect("starts"),
        items: cs.into_iter().zip(os).take(n_objects).collect(),
    }
}

/// Generate pairs for `tok`. Colours whose answer (`" Red"`) is not one token are dropped; the
/// corrupt query object must have the clean query object's token length, and all pairs share the
/// most common total length (others are redrawn) unless `all_lengths`. Each pair carries the
/// position labels of the module doc.
pub fn generate(tok: &Tokenizer, cfg: &ColoredConfig) -> Result<Vec<PromptPair>> {
    if cfg.n > crate::MAX_PAIRS {
        return Err(Error::Input(format!(
            "asked for {} Colored Objects pairs; one call makes at most {} (several files with different --seed give more)",
            cfg.n,
            crate::MAX_PAIRS
        )));
    }
    if cfg.n_objects < 2 || cfg.n_objects > 8 {
        return Err(Error::Input(format!("Colored Objects needs 2..=8 objects per question, got {}", cfg.n_objects)));
    }
    let wd = cfg.wording;
    let colors: Vec<&'static str> = COLORS.iter().copied().filter(|c| tok.single_token(&wd.answer(c)).is_ok()).collect();
    if colors.len() < cfg.n_objects {
        return Err(Error::Input(format!("only {} colour answers are single tokens for this tokenizer", colors.len())));
    }
    let objects: Vec<&'static str> = OBJECTS.to_vec();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut candidates: Vec<PromptPair> = Vec::new();
    let mut lens: BTreeMap<usize, usize> = BTreeMap::new();
    let mut tries = 0;
    while candidates.len() < cfg.n * 4 && tries < cfg.n * 200 {
        tries += 1;
        let mut prefix = String::new();
        for _ in 0..cfg.shots {
            let ex = scene(&mut rng, cfg.n_objects, &colors, &objects);
            let (c, o) = ex.items[rng.random_range(0..ex.items.len())];
            prefix.push_str(&match wd {
                Wording::Qa => format!("{}{}\n", ex.question(o, wd), wd.answer(c)),
                Wording::Statement => format!("{}{}.\n", ex.question(o, wd), wd.answer(c)),
            });
        }
        let q = scene(&mut rng, cfg.n_objects, &colors, &objects);
        let qi = rng.random_range(0..q.items.len());
        let (qc, qo) = q.items[qi];
        let qlen = tok.encode(&format!(" {qo}"))?.len();
        let others: Vec<usize> =
            (0..q.items.len()).filter(|&j| j != qi && tok.encode(&format!(" {}", q.items[j].1)).map(|t| t.len() == qlen).unwrap_or(false)).collect();
        let Some(&oj) = others.choose(&mut rng) else {
            continue;
        };
        let (oc, oo) = q.items[oj];
        let clean = format!("{prefix}{}", q.question(qo, wd));
        let corrupt = format!("{prefix}{}", q.question(oo, wd));
        let ids = tok.encode_prompt(&clean)?;
        let len = ids.len();
        if tok.encode_prompt(&corrupt)?.len() != len {
            continue;
        }
        // Character ends of the labelled words in the query (the last question of the prompt).
        let qstart = prefix.len();
        let item_at = |c: &str, o: &str| clean[qstart..].find(&format!("{} {c} {o}", article(c))).map(|i| qstart + i + article(c).len() + 1);
        let (Some(a), Some(w)) = (item_at(qc, qo), item_at(oc, oo)) else {
            continue;
        };
        let query_end = clean.len() - wd.tail().len();
        let ends = [
            ("answer_color", a + qc.len()),
            ("answer_object", a + qc.len() + 1 + qo.len()),
            ("wrong_color", w + oc.len()),
            ("wrong_object", w + oc.len() + 1 + oo.len()),
            ("query", query_end),
        ];
        let mut labels = BTreeMap::new();
        for (name, end) in ends {
            match last_token_at(tok, &clean, end, &ids)? {
                Some(i) => labels.insert(name.to_string(), i),
                None => break,
            };
        }
        if labels.len() < ends.len() {
            continue;
        }
        *lens.entry(len).or_default() += 1;
        labels.insert("end".to_string(), len - 1);
        candidates.push(PromptPair { clean, corrupt, answer: wd.answer(qc), wrong: wd.answer(oc), labels });
    }
    let (&best, _) = lens.iter().max_by_key(|(_, n)| **n).ok_or_else(|| Error::Input("no Colored Objects prompt could be built".into()))?;
    let out: Vec<PromptPair> = candidates.into_iter().filter(|p| cfg.all_lengths || p.labels["end"] + 1 == best).take(cfg.n).collect();
    if out.len() < cfg.n {
        return Err(Error::Input(format!(
            "only {} Colored Objects pairs{} could be drawn (asked for {}); lower --n{}",
            out.len(),
            if cfg.all_lengths { "" } else { " of one token length" },
            cfg.n,
            if cfg.all_lengths { "" } else { " or allow every length (--all-templates)" }
        )));
    }
    Ok(out)
}

/// The colours listed in the query (the last question, either wording) of a Colored Objects prompt, with the
/// token index of each colour word: `[(colour, index)]` in list order. `None` when the prompt's
/// last question is not in this module's format.
pub fn query_colors(tok: &Tokenizer, prompt: &str) -> Result<Option<Vec<(String, usize)>>> {
    let Some(q) = prompt.rfind("On the ") else { return Ok(None) };
    let Some(list_end) = prompt[q..].find(". ").map(|i| q + i) else { return Ok(None) };
    let ids = tok.encode_prompt(prompt)?;
    let mut out = Vec::new();
    let mut at = q;
    while at < list_end {
        // The next " a {colour} " / " an {colour} " item.
        let next = COLORS
            .iter()
            .filter_map(|c| {
                let key = format!(" {} {c} ", article(c));
                prompt[at..list_end].find(&key).map(|i| (at + i + key.len() - 1, *c))
            })
            .min();
        let Some((end, c)) = next else { break };
        match last_token_at(tok, prompt, end, &ids)? {
            Some(i) => out.push((c.to_string(), i)),
            None => return Ok(None),
        }
        at = end;
    }
    Ok((!out.is_empty()).then_some(out))
}
