//! # ferrolens-tasks
//!
//! Prompt sets for circuit studies: IOI ([`ioi`]), Colored Objects ([`colored`]) and the user's
//! own pairs as JSONL ([`pairs`]), filtered for a model's tokenizer; pairs of different lengths
//! become one left-padded batch ([`PairBatch`]).
#![warn(missing_docs)]

pub mod colored;
pub mod ioi;
pub mod pairs;

pub use pairs::{read_jsonl, write_jsonl, PairBatch, PromptPair};

/// The most pairs one call of a task generator makes (a study uses tens to thousands; a larger
/// request is almost always a typo and would only fill memory).
pub const MAX_PAIRS: usize = 1_000_000;

/// A built-in task by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Indirect Object Identification.
    Ioi,
    /// Colored Objects.
    ColoredObjects,
}

impl Task {
    /// Parse `ioi` / `colored-objects`.
    pub fn parse(s: &str) -> ferrolens_model::Result<Task> {
        match s {
            "ioi" => Ok(Task::Ioi),
            "colored-objects" | "colored_objects" | "colored" => Ok(Task::ColoredObjects),
            other => Err(ferrolens_model::Error::Input(format!(
                "unknown task `{other}`; built-in tasks are `ioi` and `colored-objects` (or pass --data FILE.jsonl)"
            ))),
        }
    }

    /// The task's name.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Ioi => "ioi",
            Task::ColoredObjects => "colored-objects",
        }
    }
}

/// Options of a built-in task's prompt set (what `ferrolens discover`, `data` and `path-patch`
/// take on the command line).
#[derive(Debug, Clone)]
pub struct TaskOptions {
    /// The task.
    pub task: Task,
    /// Number of prompt pairs.
    pub n: usize,
    /// Seed of the prompt sampler.
    pub seed: u64,
    /// IOI corruption.
    pub corruption: ioi::IoiCorruption,
    /// Colored Objects: objects per question.
    pub objects: usize,
    /// Colored Objects: solved examples before the query.
    pub shots: usize,
    /// Colored Objects: how questions are worded.
    pub wording: colored::Wording,
    /// Pairs of every token length: IOI's every template ([`ioi::IoiConfig::all_lengths`]),
    /// Colored Objects' every length ([`colored::ColoredConfig::all_lengths`]); positions by label.
    pub all_templates: bool,
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions {
            task: Task::Ioi,
            n: 24,
            seed: 0,
            corruption: ioi::IoiCorruption::Abc,
            objects: 3,
            shots: 1,
            wording: colored::Wording::Qa,
            all_templates: false,
        }
    }
}

impl TaskOptions {
    /// The task's prompt pairs for `tok`.
    pub fn generate(&self, tok: &ferrolens_model::Tokenizer) -> ferrolens_model::Result<Vec<PromptPair>> {
        if self.n == 0 {
            return Err(ferrolens_model::Error::Input(format!("{}: n = 0 asks for no prompt pairs; ask for at least one (e.g. --n 24)", self.task.name())));
        }
        match self.task {
            Task::Ioi => ioi::generate(
                tok,
                &ioi::IoiConfig { n: self.n, seed: self.seed, corruption: self.corruption, all_lengths: self.all_templates, ..Default::default() },
            ),
            Task::ColoredObjects => colored::generate(
                tok,
                &colored::ColoredConfig {
                    n: self.n,
                    seed: self.seed,
                    n_objects: self.objects,
                    shots: self.shots,
                    all_lengths: self.all_templates,
                    wording: self.wording,
                },
            ),
        }
    }
}
