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
