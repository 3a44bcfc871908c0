//! # ferrolens-model: the hooking runtime
//!
//! Transformers of ten families (GPT-2, Llama 2/3.x, Mistral, Qwen2/3, Gemma-2/3, GPT-NeoX,
//! Phi-3, OLMo-2; see [`arch`]) with a TransformerLens hook point at every activation:
//! run with a cache, with interventions, from or to any layer, and with gradients of any metric
//! at any set of hook points (one backward pass). Loads Hugging Face directories (local or through
//! the hub cache) and GGUF files (dequantized to f32).
//!
//! ```no_run
//! use ferrolens_model::*;
//! let model = load("smollm2-135m", &LoadOptions::default())?;
//! let tokens = model.to_tokens(&["When Mary and John went to the store, John gave a drink to"])?; // [1, p]
//! let mut hooks = Hooks::new().cache("blocks.*.attn.hook_pattern")?;
//! let logits = model.run(&tokens, &mut hooks)?;                  // [1, p, 49152]
//! let pattern = hooks.cache_ref().get(HookPoint::Pattern(5))?;    // [1, 9, p, p]
//! # Ok::<(), Error>(())
//! ```
#![warn(missing_docs)]

pub mod alloc;
pub mod arch;
pub mod arrays;
pub mod cache;
pub mod config;
pub mod device;
pub mod error;
pub mod export;
pub mod fused;
pub mod hook;
pub mod hooks;
pub mod kv;
pub mod layers;
pub mod layout;
pub mod lens;
pub mod loader;
pub mod lrp;
pub mod pipeline;
pub mod plan;
pub mod registry;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use cache::ActivationCache;
pub use candle_core::{DType, Device, Tensor};
pub use config::{Activation, Config, NormKind, NormPlacement, Positional, QkNorm, RopeFreqs, RopeScaling};
pub use device::{available_devices, device_name, parse_device, parse_dtype};
pub use error::{Error, Result};
pub use export::{save_hf_dir, ExportWeights};
pub use hook::{HookPoint, NameFilter};
pub use hooks::{HookFn, Hooks, Intervention, Patch};
pub use kv::KvCache;
pub use loader::{config_of, load, load_gguf, load_hf_dir, load_hub, LoadOptions};
pub use lrp::LrpRules;
/// The `ndarray` version [`arrays`] speaks (use it to avoid a version mismatch).
pub use ndarray;
pub use tokenizer::Tokenizer;
pub use transformer::{AttnWeights, BlockWeights, MlpWeights, NormWeights};
pub use transformer::{GradRun, HookedTransformer, NormSite, PadSide, RunSpan, Weights};
