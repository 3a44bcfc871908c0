//! # ferrolens-methods
//!
//! Localisation methods on the ferrolens runtime: exact activation patching
//! ([`patching`]), attribution patching and relevance patching ([`mod@attribution`]), with the
//! metrics they score ([`metrics`]) and the score tables they produce ([`scores`]).
#![warn(missing_docs)]

pub mod atp_star;
pub mod attribution;
pub mod circuit;
pub mod eap_ig;
pub mod edge_circuit;
pub mod edges;
pub mod formats;
pub mod heads;
pub mod metrics;
pub mod mib;
pub mod patching;
pub mod path;
pub mod repair;
pub mod retrieval;
pub mod scores;
pub mod shard;
pub mod study;

pub use atp_star::{grad_drop, qk_fix};
pub use attribution::{attribution, Attribution, AttributionOptions};
pub use circuit::{
    ablated_metric, discover, faithfulness_curve, smallest_faithful, Ablation, AblationMeans, Circuit, CurvePoint, DiscoverOptions, Discovery, Node,
};
pub use edges::{edge_attribution, Edge, EdgeOptions, Receiver};
pub use metrics::{FnMetric, LogProb, LogitDiff, Metric, NegKlToClean, Normalised};
pub use patching::{
    activation_patching, auto_rows, device_rows, generic_patching, metric_of, Axis, Direction, PatchResult, PatchSpec, PatchingData, Sweep, SweepOptions,
};
pub use path::{path_patch, HeadInput};
pub use scores::{pearson, Component, Positions, ScoreGrid, ScoreRow};
pub use study::{Batching, Method};
