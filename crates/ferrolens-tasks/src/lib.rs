//! # ferrolens-tasks
//!
//! Prompt sets for circuit studies: IOI ([`ioi`]), Colored Objects ([`colored`]) and the user's
//! own pairs as JSONL ([`pairs`]), all filtered for a model's tokenizer into equal-length batches.
#![warn(missing_docs)]

pub mod colored;
pub mod ioi;
pub mod pairs;

pub use pairs::{read_jsonl, write_jsonl, PairBatch, PromptPair};

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
