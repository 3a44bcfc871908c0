//! Indirect Object Identification (Wang et al. 2022, "Interpretability in the Wild").

use crate::pairs::PromptPair;
use ferrolens_model::{Error, Result, Tokenizer};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use std::collections::BTreeMap;

/// The 15 BABA templates (`[A]` = indirect object, `[B]` = subject); the prompt ends before the
/// final `[A]`.
pub const BABA_TEMPLATES: [&str; 15] = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
];

/// Places.
pub const PLACES: [&str; 8] = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"];
/// Objects.
pub const OBJECTS: [&str; 8] = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"];
/// The IOI name list (the 99 names given in PAPERS.md; Wang et al. describe 100).
pub const NAMES: &[&str] = &[
    "Michael",
    "Christopher",
    "Jessica",
    "Matthew",
    "Ashley",
    "Jennifer",
    "Joshua",
    "Amanda",
    "Daniel",
    "David",
    "James",
    "Robert",
    "John",
    "Joseph",
    "Andrew",
    "Ryan",
    "Brandon",
    "Jason",
    "Justin",
    "Sarah",
    "William",
    "Jonathan",
    "Stephanie",
    "Brian",
    "Nicole",
    "Nicholas",
    "Anthony",
    "Heather",
    "Eric",
    "Elizabeth",
    "Adam",
    "Megan",
    "Melissa",
    "Kevin",
    "Steven",
    "Thomas",
    "Timothy",
    "Christina",
    "Kyle",
    "Rachel",
    "Laura",
    "Lauren",
    "Amber",
    "Brittany",
    "Danielle",
    "Richard",
    "Kimberly",
    "Jeffrey",
    "Amy",
    "Crystal",
    "Michelle",
    "Tiffany",
    "Jeremy",
    "Benjamin",
    "Mark",
    "Emily",
    "Aaron",
    "Charles",
    "Rebecca",
    "Jacob",
    "Stephen",
    "Patrick",
    "Sean",
    "Erin",
    "Jamie",
    "Kelly",
    "Samantha",
    "Nathan",
    "Sara",
    "Dustin",
    "Paul",
    "Angela",
    "Tyler",
    "Scott",
    "Katherine",
    "Andrea",
    "Gregory",
    "Erica",
    "Mary",
    "Travis",
    "Lisa",
    "Kenneth",
    "Bryan",
    "Lindsey",
    "Kristen",
    "Jose",
    "Alexander",
    "Jesse",
    "Katie",
    "Lindsay",
    "Shannon",
    "Vanessa",
    "Courtney",
    "Christine",
    "Alicia",
    "Cody",
    "Allison",
    "Bradley",
    "Samuel",
];

/// Which template order to sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoiOrder {
    /// `Then, [B] and [A] ...` (subject first).
    Baba,
    /// `Then, [A] and [B] ...` (indirect object first).
    Abba,
    /// Half and half.
    Mixed,
}

/// How the corrupt prompt is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoiCorruption {
    /// IO, S1 and S2 replaced by three other names, positions kept.
    Abc,
    /// The second S replaced by IO (the answer flips).
    S2Io,
}

impl std::str::FromStr for IoiCorruption {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "abc" => Ok(IoiCorruption::Abc),
            "s2io" | "s2-io" => Ok(IoiCorruption::S2Io),
            o => Err(Error::Input(format!("unknown IOI corruption `{o}`; use abc or s2io"))),
        }
    }
}

/// Settings of an IOI prompt set.
#[derive(Debug, Clone)]
pub struct IoiConfig {
    /// Number of pairs.
    pub n: usize,
    /// RNG seed.
    pub seed: u64,
    /// Template order.
    pub order: IoiOrder,
    /// Corruption.
    pub corruption: IoiCorruption,
    /// Restrict to these template indices (0-based); all when empty.
    pub templates: Vec<usize>,
    /// Use every chosen template whatever its token length (pairs then differ in length and run
    /// as one padded batch, positions by label); otherwise only the templates of the most common
    /// length.
    pub all_lengths: bool,
}

impl Default for IoiConfig {
    fn default() -> Self {
        IoiConfig { n: 32, seed: 0, order: IoiOrder::Mixed, corruption: IoiCorruption::Abc, templates: vec![], all_lengths: false }
    }
}

fn abba(t: &str) -> String {
    // Swap the first [B] and [A] of the opening clause.
    let b = t.find("[B]").expect("template has [B]");
    let a = t.find("[A]").expect("template has [A]");
    let mut s = t.to_string();
    s.replace_range(a..a + 3, "[B]");
    s.replace_range(b..b + 3, "[A]");
    s
}

/// Fill a template, cut before the final `[A]`; returns the text and the name order
/// (the names in the order they appear, as `(slot, name)`).
fn fill(t: &str, io: &str, s: &str, s2: &str, place: &str, object: &str) -> String {
    let cut = t.rfind("[A]").expect("template ends with [A]");
    let body = t[..cut].trim_end().to_string();
    // Replace the second subject occurrence separately (S2 may differ from S1 in corruptions).
    let first_b = body.find("[B]").expect("[B]");
    let second_b = body[first_b + 3..].find("[B]").map(|i| i + first_b + 3);
    let mut out = body.clone();
    if let Some(j) = second_b {
        out.replace_range(j..j + 3, "\u{1}");
    }
    out.replace("[B]", s).replace("\u{1}", s2).replace("[A]", io).replace("[PLACE]", place).replace("[OBJECT]", object)
}

/// Names, places and objects that are one token with a leading space for `tok`.
pub fn single_token_words<'a>(tok: &Tokenizer, words: &[&'a str]) -> Vec<&'a str> {
    words.iter().copied().filter(|w| tok.single_token(&format!(" {w}")).is_ok()).collect()
}

/// Generate IOI pairs for `tok`: names filtered to single tokens; only templates whose prompts
/// share the most common token length are used (unless [`IoiConfig::all_lengths`]), so that the
/// prompts share positions.
pub fn generate(tok: &Tokenizer, cfg: &IoiConfig) -> Result<Vec<PromptPair>> {
    let names = single_token_words(tok, NAMES);
    if names.len() < 6 {
        return Err(Error::Input(format!("only {} of the 100 IOI names are single tokens for this tokenizer; IOI needs at least 6", names.len())));
    }
    let places = single_token_words(tok, &PLACES);
    let objects = single_token_words(tok, &OBJECTS);
    if places.is_empty() || objects.is_empty() {
        return Err(Error::Input("no IOI place or object is a single token for this tokenizer".into()));
    }
    let wanted: Vec<usize> = if cfg.templates.is_empty() { (0..15).collect() } else { cfg.templates.clone() };
    if let Some(bad) = wanted.iter().find(|&&t| t >= 15) {
        return Err(Error::Input(format!("IOI template {bad} does not exist (0..=14)")));
    }
    // Token length of each template with a probe filling (names/places/objects are single tokens).
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &t in &wanted {
        let text = fill(BABA_TEMPLATES[t], names[0], names[1], names[1], places[0], objects[0]);
        by_len.entry(tok.encode_prompt(&text)?.len()).or_default().push(t);
    }
    let all: Vec<usize> = by_len.values().flatten().copied().collect();
    // Refuse impossible or runaway requests before generating anything.
    let used = if cfg.all_lengths { all.len() } else { by_len.values().map(|v| v.len()).max().unwrap_or(0) };
    let orders = if cfg.order == IoiOrder::Mixed { 2 } else { 1 };
    let distinct = (used * orders) as u128 * (names.len() * (names.len() - 1)) as u128 * places.len() as u128 * objects.len() as u128;
    if cfg.n as u128 > distinct.min(crate::MAX_PAIRS as u128) {
        return Err(Error::Input(format!(
            "asked for {} IOI pairs; with this tokenizer IOI makes {distinct} distinct clean prompts ({used} templates x {orders} name orders x {} names x {} other names x {} places x {} objects), and one call makes at most {} pairs: ask for fewer (several files with different --seed give more)",
            cfg.n,
            names.len(),
            names.len() - 1,
            places.len(),
            objects.len(),
            crate::MAX_PAIRS
        )));
    }
    let templates = if cfg.all_lengths { &all } else { by_len.iter().max_by_key(|(l, v)| (v.len(), std::cmp::Reverse(**l))).expect("non-empty").1 };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut out = Vec::with_capacity(cfg.n);
    for i in 0..cfg.n {
        let t = templates[i % templates.len()];
        let baba = match cfg.order {
            IoiOrder::Baba => true,
            IoiOrder::Abba => false,
            IoiOrder::Mixed => i % 2 == 0,
        };
        let template = if baba { BABA_TEMPLATES[t].to_string() } else { abba(BABA_TEMPLATES[t]) };
        let mut pick: Vec<&str> = names.clone();
        pick.shuffle(&mut rng);
        let (io, s) = (pick[0], pick[1]);
        let place = *places.choose(&mut rng).expect("places");
        let object = *objects.choose(&mut rng).expect("objects");
        let clean = fill(&template, io, s, s, place, object);
        let (corrupt, wrong) = match cfg.corruption {
            IoiCorruption::Abc => (fill(&template, pick[2], pick[3], pick[4], place, object), s),
            IoiCorruption::S2Io => (fill(&template, io, s, io, place, object), s),
        };
        let labels = positions(tok, &template, io, s, place, object)?;
        out.push(PromptPair { clean, corrupt, answer: format!(" {io}"), wrong: format!(" {wrong}"), labels });
    }
    Ok(out)
}

/// Token positions of IO, S1, S1+1, S2 and end in a filled template.
fn positions(tok: &Tokenizer, template: &str, io: &str, s: &str, place: &str, object: &str) -> Result<BTreeMap<String, usize>> {
    let cut = template.rfind("[A]").expect("[A]");
    let body = &template[..cut];
    let fill_prefix = |t: &str| t.replace("[A]", io).replace("[B]", s).replace("[PLACE]", place).replace("[OBJECT]", object);
    // The index of the token that starts at a slot = the token count of the text before it.
    let index = |slot: usize| -> Result<usize> { Ok(tok.encode_prompt(fill_prefix(&body[..slot]).trim_end())?.len()) };
    let n = tok.encode_prompt(&fill(template, io, s, s, place, object))?.len();
    let a = body.find("[A]").expect("[A]");
    let b1 = body.find("[B]").expect("[B]");
    let b2 = body[b1 + 3..].find("[B]").map(|i| i + b1 + 3);
    let mut m = BTreeMap::new();
    m.insert("IO".to_string(), index(a)?);
    m.insert("S1".to_string(), index(b1)?);
    m.insert("S1+1".to_string(), index(b1)? + 1);
    if let Some(j) = b2 {
        m.insert("S2".to_string(), index(j)?);
    }
    m.insert("end".to_string(), n - 1);
    Ok(m)
}
