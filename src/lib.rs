//! # ferrolens
//!
//! A mechanistic-interpretability workbench: TransformerLens-named hook points on ten model
//! families, GPT-2 to Gemma-3 ([`model`]), activation patching, attribution patching and relevance
//! patching ([`methods`]), prompt sets ([`tasks`]) and reports ([`report`]).
//!
//! ```no_run
//! use ferrolens::prelude::*;
//! let model = load("smollm2-135m", &LoadOptions::default())?;
//! let tokens = model.to_tokens(&["When Mary and John went to the store, John gave a drink to"])?; // [1, 14]
//! let mut hooks = Hooks::new().cache("blocks.*.hook_resid_pre")?;
//! let logits = model.run(&tokens, &mut hooks)?;                         // [1, 14, 49152]
//! let resid = hooks.cache_ref().get(HookPoint::ResidPre(10))?;          // [1, 14, 576]
//! # Ok::<(), ferrolens::model::Error>(())
//! ```
#![warn(missing_docs)]

pub use ferrolens_methods as methods;
pub use ferrolens_model as model;
pub use ferrolens_report as report;
pub use ferrolens_tasks as tasks;

/// docs/getting-started.md, included so that its Rust snippet is compiled by `cargo test`.
#[doc = include_str!("../docs/getting-started.md")]
pub mod getting_started {}

/// The names most probes need.
pub mod prelude {
    pub use ferrolens_methods::{
        activation_patching, attribution, generic_patching, AttributionOptions, Axis, Component, Direction, FnMetric, LogProb, LogitDiff, Metric, Normalised,
        PatchResult, PatchSpec, PatchingData, Positions, ScoreGrid, Sweep, SweepOptions,
    };
    pub use ferrolens_model::{
        load, ActivationCache, DType, Device, HookPoint, HookedTransformer, Hooks, Intervention, LoadOptions, LrpRules, PadSide, Patch, RunSpan, Tensor,
    };
    pub use ferrolens_tasks::{PairBatch, PromptPair};
}
