//! Writing a model back out as a Hugging Face directory (`config.json`, `tokenizer.json`,
//! `model.safetensors`), e.g. to load a GGUF checkpoint's dequantized weights in `transformers`
//! or TransformerLens and compare numbers, or to ship only the config and tokenizer
//! ([`ExportWeights::None`]).
//!
//! The layout is the family's own ([`crate::arch`]): its `config.json` struct and its weight
//! table, read backwards (fused tensors re-fused, Gemma's norm offset subtracted, q/k in Hugging
//! Face's rotate-half order). Loading the directory back gives the same logits as the source
//! model (tests/export.rs).

use crate::arch;
use crate::error::{Error, Result};
use crate::transformer::HookedTransformer;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Which weights [`save_hf_dir`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportWeights {
    /// `model.safetensors` in this dtype (F32, F16 or BF16).
    Dtype(DType),
    /// No weights: `config.json` and `tokenizer.json` only.
    None,
}

/// The `config.json` of `model` (Hugging Face field names of its family).
pub fn hf_config(model: &HookedTransformer, dtype: DType) -> Result<serde_json::Value> {
    let c = &model.cfg;
    let dt = match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => return Err(Error::Input(format!("cannot export weights as {other:?}; use f32, f16 or bf16"))),
    };
    let fam = arch::family(&c.family)?;
    let mut j = (fam.to_hf)(c, &model.w)?;
    let mut extra = arch::common_hf_fields(c);
    extra.insert("architectures".into(), serde_json::json!([fam.hf_architecture]));
    extra.insert("model_type".into(), fam.hf_model_types[0].into());
    extra.insert("torch_dtype".into(), dt.into());
    j = arch::merge(j, extra);
    Ok(j)
}

/// The weights of `model` under its family's Hugging Face names, in `dtype`, on the CPU.
pub fn hf_tensors(model: &HookedTransformer, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let fam = arch::family(&model.cfg.family)?;
    arch::hf_tensors(fam, &model.cfg, &model.w, dtype)
}

/// Write `model` as a Hugging Face directory `dir` (created if missing): `config.json`,
/// `tokenizer.json` when the model has a tokenizer, and `model.safetensors` unless `weights` is
/// [`ExportWeights::None`]. Returns the files written.
pub fn save_hf_dir(model: &HookedTransformer, dir: &Path, weights: ExportWeights) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dtype = match weights {
        ExportWeights::Dtype(d) => d,
        ExportWeights::None => DType::F32,
    };
    let cfg = hf_config(model, dtype)?;
    let mut files = vec![];
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).map_err(|e| Error::io(&p, e))?;
    files.push(p);
    if let Some(tok) = &model.tokenizer {
        let p = dir.join("tokenizer.json");
        tok.save(&p)?;
        files.push(p);
    }
    if let ExportWeights::Dtype(dt) = weights {
        let p = dir.join("model.safetensors");
        candle_core::safetensors::save(&hf_tensors(model, dt)?, &p).map_err(|e| Error::Weights(format!("cannot write {}: {e}", p.display())))?;
        files.push(p);
    }
    Ok(files)
}
