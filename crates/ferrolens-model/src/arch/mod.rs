//! Architectures as data: one file a family.
//!
//! A family file holds three things, and nothing else in ferrolens reads a checkpoint's config
//! or tensor names:
//! - its config: a serde struct with Hugging Face's field names and defaults, converted into the
//!   shared [`Config`] (refusing, by name, every field that changes the math and that ferrolens
//!   does not implement), and back (for `models export`);
//! - its weight names: one [`TensorName`] table from ferrolens's slots to the Hugging Face name
//!   and the GGUF name, read by both loaders ([`load_weights`]) and written by the exporter
//!   ([`hf_tensors`]); fused tensors (qkv, gate_up) are split here, once;
//! - the flags of the shared forward, which its config conversion sets.
//!
//! [`FAMILIES`] lists every family; the loaders dispatch over it. docs/architecture.md walks
//! through adding one.

pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod mistral;
pub mod olmo2;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use crate::config::{Activation, Config, RopeFreqs, RopeScaling};
use crate::error::{Error, Result};
use crate::loader::{LoadOptions, TensorSource};
use crate::weights::{AttnWeights, BlockWeights, MlpWeights, NormWeights, Weights};

/// Whether the weights have attention biases and MLP biases.
pub fn has_biases(w: &Weights) -> (bool, bool) {
    let b = w.blocks.first();
    (b.is_some_and(|b| b.attn.b_q.is_some()), b.is_some_and(|b| b.mlp.b_in.is_some()))
}
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use std::collections::HashMap;

/// Every family ferrolens runs. The loaders pick the one whose `hf_model_types` holds a
/// `config.json`'s `model_type`, or whose `gguf_archs` holds a GGUF's `general.architecture`.
pub const FAMILIES: &[&Family] = &[
    &gpt2::FAMILY,
    &llama::FAMILY,
    &mistral::FAMILY,
    &qwen2::FAMILY,
    &qwen3::FAMILY,
    &gemma2::FAMILY,
    &gemma3::FAMILY,
    &gpt_neox::FAMILY,
    &phi3::FAMILY,
    &olmo2::FAMILY,
];

/// One architecture family.
pub struct Family {
    /// The family's name (`Config::family`).
    pub name: &'static str,
    /// One line for `ferrolens info` and the docs.
    pub about: &'static str,
    /// `model_type` values of its `config.json`.
    pub hf_model_types: &'static [&'static str],
    /// The `architectures` entry `models export` writes.
    pub hf_architecture: &'static str,
    /// `general.architecture` values of its GGUF files (empty: llama.cpp does not write it).
    pub gguf_archs: &'static [&'static str],
    /// `config.json` to [`Config`].
    pub from_hf: fn(&serde_json::Value, &str) -> Result<Config>,
    /// [`Config`] (and which optional tensors the weights have) to the family's `config.json`
    /// fields (without `model_type`/`architectures`).
    pub to_hf: fn(&Config, &Weights) -> Result<serde_json::Value>,
    /// GGUF metadata keys (after `{arch}.`) and the `config.json` fields they fill.
    pub gguf_keys: &'static [(&'static str, &'static str)],
    /// Extra `config.json` fields derived from GGUF metadata (beyond `gguf_keys`).
    pub gguf_extra: fn(&GgufMeta, &mut serde_json::Map<String, serde_json::Value>) -> Result<()>,
    /// The weight-name table.
    pub tensors: &'static [TensorName],
    /// llama.cpp permutes this family's q/k rows for its interleaved rotary (`llama` only).
    pub gguf_permute_qk: bool,
    /// llama.cpp already added the norm offset to the gains (Gemma: `w + 1`).
    pub gguf_norm_offset_included: bool,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Family({})", self.name)
    }
}

/// The family named `name`.
pub fn family(name: &str) -> Result<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.name == name).ok_or_else(|| Error::Config(format!("unknown family `{name}`; ferrolens knows {}", names().join(", "))))
}

/// Every family's name.
pub fn names() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.name).collect()
}

/// The family of a `config.json` `model_type`.
pub fn by_model_type(mt: &str) -> Result<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.hf_model_types.contains(&mt)).ok_or_else(|| {
        let known: Vec<&str> = FAMILIES.iter().flat_map(|f| f.hf_model_types.iter().copied()).collect();
        Error::Config(format!("model_type `{mt}` is not supported; ferrolens runs {} (docs/architecture.md shows how to add a family)", known.join(", ")))
    })
}

/// The family of a GGUF `general.architecture`.
pub fn by_gguf_arch(arch: &str) -> Result<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.gguf_archs.contains(&arch)).ok_or_else(|| {
        let known: Vec<&str> = FAMILIES.iter().flat_map(|f| f.gguf_archs.iter().copied()).collect();
        Error::Config(format!("GGUF architecture `{arch}` is not supported; ferrolens loads GGUF files of {}", known.join(", ")))
    })
}

/// Where a checkpoint tensor goes in [`Weights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Slot {
    Embed,
    PosEmbed,
    /// The unembedding (absent, or ignored when the config ties it to the embedding).
    Unembed,
    UnembedBias,
    FinalNorm,
    FinalNormBias,
    Ln1,
    Ln1Bias,
    Ln2,
    Ln2Bias,
    Ln1Post,
    Ln2Post,
    QNorm,
    KNorm,
    Q,
    QBias,
    K,
    KBias,
    V,
    VBias,
    O,
    OBias,
    Gate,
    GateBias,
    Up,
    UpBias,
    Down,
    DownBias,
    /// q, k and v stacked along the output axis: `[(h + 2 kv) d, D]` (Phi-3 `qkv_proj`, GPT-2 `c_attn`).
    QkvConcat,
    /// Its bias `[(h + 2 kv) d]`.
    QkvConcatBias,
    /// q, k and v interleaved per head: `[h, 3, d, D]` flattened (GPT-NeoX `query_key_value`).
    QkvPerHead,
    /// Its bias `[h, 3, d]` flattened.
    QkvPerHeadBias,
    /// gate then up along the output axis: `[2 M, D]` (Phi-3 `gate_up_proj`).
    GateUp,
}

impl Slot {
    fn is_norm(&self) -> bool {
        matches!(self, Slot::FinalNorm | Slot::Ln1 | Slot::Ln2 | Slot::Ln1Post | Slot::Ln2Post | Slot::QNorm | Slot::KNorm)
    }

    fn is_optional(&self) -> bool {
        matches!(
            self,
            Slot::Unembed
                | Slot::UnembedBias
                | Slot::QBias
                | Slot::KBias
                | Slot::VBias
                | Slot::OBias
                | Slot::GateBias
                | Slot::UpBias
                | Slot::DownBias
                | Slot::QkvConcatBias
                | Slot::QkvPerHeadBias
        )
    }
}

/// How a tensor is stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `nn.Linear` weight `[out, in]` (GGUF tensors read the same way).
    Linear,
    /// GPT-2's `Conv1D` weight `[in, out]`.
    Conv1d,
    /// A vector (bias or norm gain) or an embedding table, stored as ferrolens keeps it.
    Plain,
}

/// One row of a family's weight table.
#[derive(Debug, Clone, Copy)]
pub struct TensorName {
    /// Where it goes.
    pub slot: Slot,
    /// Hugging Face name; `{l}` stands for the layer.
    pub hf: &'static str,
    /// GGUF name (`""`: llama.cpp has none).
    pub gguf: &'static str,
    /// Storage layout.
    pub layout: Layout,
}

/// A table row with a Linear layout.
pub const fn lin(slot: Slot, hf: &'static str, gguf: &'static str) -> TensorName {
    TensorName { slot, hf, gguf, layout: Layout::Linear }
}

/// A table row for a vector or embedding.
pub const fn vec(slot: Slot, hf: &'static str, gguf: &'static str) -> TensorName {
    TensorName { slot, hf, gguf, layout: Layout::Plain }
}

/// Parse a `config.json` into a family's serde struct; a missing required field or a wrongly
/// typed one is an error naming it.
pub fn parse_hf<T: DeserializeOwned>(j: &serde_json::Value, family: &str) -> Result<T> {
    serde_path_to_error::deserialize(j).map_err(|e| {
        let path = e.path().to_string();
        let at = if path.is_empty() || path == "." { String::new() } else { format!(" (field `{path}`)") };
        Error::Config(format!("config.json is not a valid {family} config: {}{at}", e.inner()))
    })
}

/// Serialize a family's serde struct back to `config.json` fields.
pub fn to_json<T: serde::Serialize>(t: &T) -> Result<serde_json::Value> {
    serde_json::to_value(t).map_err(|e| Error::Config(format!("cannot write the config: {e}")))
}

/// A Hugging Face activation name to ferrolens's (`hidden_act` / `hidden_activation`).
pub fn activation(field: &str, name: &str) -> Result<Activation> {
    Ok(match name {
        "silu" | "swish" => Activation::Silu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluNew,
        "gelu" => Activation::Gelu,
        other => {
            return Err(Error::Config(format!(
                "{field} `{other}` is not implemented by ferrolens (it has silu, gelu, gelu_new/gelu_pytorch_tanh); the model would compute something else"
            )))
        }
    })
}

/// The Hugging Face name of an activation.
pub fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Silu => "silu",
        Activation::GeluNew => "gelu_pytorch_tanh",
        Activation::Gelu => "gelu",
    }
}

/// A Hugging Face `rope_scaling` object to ferrolens's. `default` or absent is plain rotary;
/// `linear` and `llama3` are implemented; any other type is an error that names it.
pub fn rope_scaling(v: &Option<serde_json::Value>) -> Result<RopeScaling> {
    let Some(v) = v.as_ref().filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| Error::Config(format!("rope_scaling of type `{kind}` lacks the number `{k}`")))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::Config(format!(
                "rope_scaling type `{other}` is not implemented by ferrolens (it implements linear and llama3); loading it without would give wrong numbers at long positions"
            )))
        }
    })
}

/// ferrolens's rotary scaling back to a `rope_scaling` value.
pub fn rope_scaling_json(f: &RopeFreqs) -> serde_json::Value {
    match f.scaling {
        RopeScaling::None => serde_json::Value::Null,
        RopeScaling::Linear { factor } => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => serde_json::json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}

/// Per-layer windows from `layer_types` (`full_attention` / `sliding_attention`); any other entry
/// is an error naming it.
pub fn windows_from_layer_types(types: &[String], window: Option<usize>, n_layers: usize) -> Result<Vec<Option<usize>>> {
    if types.len() != n_layers {
        return Err(Error::Config(format!("layer_types has {} entries for {n_layers} layers", types.len())));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => window.map(Some).ok_or_else(|| Error::Config("layer_types has sliding_attention layers but sliding_window is null".into())),
            other => Err(Error::Config(format!("layer_types entry `{other}` is not implemented by ferrolens (it has full_attention and sliding_attention)"))),
        })
        .collect()
}

/// `layer_types` from per-layer windows.
pub fn layer_types(windows: &[Option<usize>], n_layers: usize) -> Vec<String> {
    (0..n_layers).map(|l| if windows.get(l).copied().flatten().is_some() { "sliding_attention".into() } else { "full_attention".into() }).collect()
}

/// The one window size of a config's windowed layers (families have one `sliding_window`).
pub fn window_size(windows: &[Option<usize>]) -> Option<usize> {
    windows.iter().flatten().next().copied()
}

/// Refuse a config field set to a value that changes the math and that ferrolens ignores.
pub fn refuse(field: &str, set: bool, why: &str) -> Result<()> {
    if set {
        return Err(Error::Config(format!("config.json sets `{field}`, which ferrolens does not implement ({why}); loading it would give wrong numbers")));
    }
    Ok(())
}

/// GGUF metadata, as read by candle.
pub struct GgufMeta<'a> {
    /// The raw metadata.
    pub md: &'a HashMap<String, gguf_file::Value>,
    /// `general.architecture`.
    pub arch: String,
}

impl GgufMeta<'_> {
    /// `{arch}.{key}` as a JSON value (numbers, strings, booleans, arrays of them).
    pub fn get(&self, key: &str) -> Option<serde_json::Value> {
        self.md.get(&format!("{}.{key}", self.arch)).and_then(gguf_json)
    }

    /// A number at a full key.
    pub fn num(&self, full_key: &str) -> Option<f64> {
        self.md.get(full_key).and_then(gguf_json).and_then(|v| v.as_f64())
    }
}

fn gguf_json(v: &gguf_file::Value) -> Option<serde_json::Value> {
    use gguf_file::Value::*;
    Some(match v {
        U8(x) => (*x).into(),
        I8(x) => (*x).into(),
        U16(x) => (*x).into(),
        I16(x) => (*x).into(),
        U32(x) => (*x).into(),
        I32(x) => (*x).into(),
        U64(x) => (*x).into(),
        I64(x) => (*x).into(),
        F32(x) => serde_json::Number::from_f64(*x as f64)?.into(),
        F64(x) => serde_json::Number::from_f64(*x)?.into(),
        Bool(b) => (*b).into(),
        String(s) => s.clone().into(),
        Array(a) => serde_json::Value::Array(a.iter().filter_map(gguf_json).collect()),
    })
}

/// A `config.json` equivalent of a GGUF file's metadata, for `fam`'s own config parser (as
/// transformers reads GGUF files). Common fields: vocabulary size (from the token list when
/// the key is missing), BOS/EOS, and tied embeddings (no `output.weight`).
pub fn gguf_to_hf(fam: &Family, meta: &GgufMeta, has_output: bool) -> Result<serde_json::Value> {
    let mut m = serde_json::Map::new();
    for (key, field) in fam.gguf_keys {
        if let Some(v) = meta.get(key) {
            // llama.cpp writes epsilons as f32: round them back to the decimal HF wrote.
            let v = match v.as_f64() {
                Some(x) if field.ends_with("eps") || field.ends_with("epsilon") => {
                    serde_json::json!(format!("{:e}", x as f32).parse::<f64>().unwrap_or(x))
                }
                _ => v,
            };
            m.insert((*field).into(), v);
        }
    }
    if !m.contains_key("vocab_size") {
        if let Some(n) = meta.md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map(|v| v.len()) {
            m.insert("vocab_size".into(), n.into());
        }
    }
    for (k, f) in [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")] {
        if let Some(x) = meta.num(k) {
            m.insert(f.into(), (x as u64).into());
        }
    }
    m.insert("tie_word_embeddings".into(), (!has_output).into());
    (fam.gguf_extra)(meta, &mut m)?;
    m.insert("model_type".into(), fam.hf_model_types[0].into());
    Ok(serde_json::Value::Object(m))
}

/// Which names a source uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Hugging Face safetensors.
    Hf,
    /// A llama.cpp GGUF file.
    Gguf,
}

/// Undo llama.cpp's Q/K permutation: its converter reorders each head's rows from
/// rotate-half `[2, d/2]` to interleaved `[d/2, 2]`. `w` is `[n_head*d, in]` (or a bias `[n_head*d]`).
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let d = out / n_head;
    let rest: usize = dims[1..].iter().product();
    Ok(w.reshape((n_head, d / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

fn name_of(t: &TensorName, kind: SourceKind, l: usize) -> Option<String> {
    let tpl = match kind {
        SourceKind::Hf => t.hf,
        SourceKind::Gguf => t.gguf,
    };
    (!tpl.is_empty()).then(|| tpl.replace("{l}", &l.to_string()))
}

fn per_layer(t: &TensorName) -> bool {
    t.hf.contains("{l}")
}

/// Load a family's weights from `src`: read every table row, turn storage layouts into
/// ferrolens's (`[in, out]` matrices, q/k unpermuted for llama GGUF files), split fused
/// tensors, and add the norm offset. Returns whether the unembedding is tied (no separate
/// tensor, or the config ties it).
pub fn load_weights(fam: &Family, cfg: &Config, src: &TensorSource, opts: &LoadOptions) -> Result<(Weights, bool)> {
    let kind = src.kind();
    let dt = opts.dtype;
    // A pipeline load puts each layer on its stage's device, the embedding on the first and the
    // final norm and unembedding on the last (see crate::pipeline).
    let stages = opts.stage_devices(cfg.n_layers)?;
    let last = stages.last().cloned().unwrap_or_else(|| opts.device.clone());
    let mut global: HashMap<Slot, Tensor> = HashMap::new();
    let mut layers: Vec<HashMap<Slot, Tensor>> = vec![HashMap::new(); cfg.n_layers];
    let offset_added_by_file = kind == SourceKind::Gguf && fam.gguf_norm_offset_included;
    for t in fam.tensors {
        let count = if per_layer(t) { cfg.n_layers } else { 1 };
        #[allow(clippy::needless_range_loop)] // `l` also names the tensor
        for l in 0..count {
            let Some(name) = name_of(t, kind, l) else {
                continue;
            };
            if t.slot == Slot::Unembed && cfg.tied_embeddings {
                continue;
            }
            let dev = match t.slot {
                _ if per_layer(t) => stages.get(l).unwrap_or(&opts.device),
                Slot::Unembed | Slot::UnembedBias | Slot::FinalNorm | Slot::FinalNormBias => &last,
                _ => &opts.device,
            };
            let raw = if t.slot.is_optional() { src.opt(&name, DType::F32, dev)? } else { Some(src.get(&name, DType::F32, dev)?) };
            let Some(raw) = raw else { continue };
            // To torch layout [out, in] for matrices.
            // llama.cpp stores every matrix as nn.Linear does, Conv1D ones included.
            let mut x = match (t.layout, kind) {
                (Layout::Conv1d, SourceKind::Hf) => raw.t()?.contiguous()?,
                _ => raw,
            };
            if kind == SourceKind::Gguf && fam.gguf_permute_qk {
                match t.slot {
                    Slot::Q | Slot::QBias => x = unpermute_qk(&x, cfg.n_heads)?,
                    Slot::K | Slot::KBias => x = unpermute_qk(&x, cfg.n_kv_heads)?,
                    _ => {}
                }
            }
            if t.slot.is_norm() && cfg.norm_offset != 0.0 && !offset_added_by_file {
                x = (x + cfg.norm_offset)?;
            }
            let parts = split_fused(t.slot, &x, cfg).map_err(|e| match e {
                Error::Weights(m) => Error::Weights(format!("`{name}`: {m}")),
                e => e,
            })?;
            let dest = if per_layer(t) { &mut layers[l] } else { &mut global };
            for (slot, part) in parts {
                let part = match (t.layout, part.rank()) {
                    (Layout::Linear | Layout::Conv1d, 2) => part.t()?.contiguous()?,
                    _ => part.contiguous()?,
                };
                dest.insert(slot, part.to_dtype(dt)?);
            }
        }
    }
    let take = |m: &mut HashMap<Slot, Tensor>, s: Slot| m.remove(&s);
    let need = |m: &mut HashMap<Slot, Tensor>, s: Slot, l: Option<usize>| -> Result<Tensor> {
        m.remove(&s).ok_or_else(|| {
            Error::Weights(format!(
                "the checkpoint has no tensor for {s:?}{} (a {} model needs it)",
                l.map(|l| format!(" of layer {l}")).unwrap_or_default(),
                fam.name
            ))
        })
    };
    let norm = |m: &mut HashMap<Slot, Tensor>, w: Slot, b: Option<Slot>| -> Option<NormWeights> {
        let w = m.remove(&w)?;
        Some(NormWeights { w, b: b.and_then(|b| m.remove(&b)) })
    };
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for (l, m) in layers.iter_mut().enumerate() {
        blocks.push(BlockWeights {
            ln1: norm(m, Slot::Ln1, Some(Slot::Ln1Bias)),
            ln1_post: norm(m, Slot::Ln1Post, None),
            ln2: norm(m, Slot::Ln2, Some(Slot::Ln2Bias)),
            ln2_post: norm(m, Slot::Ln2Post, None),
            attn: AttnWeights {
                w_q: need(m, Slot::Q, Some(l))?,
                b_q: take(m, Slot::QBias),
                w_k: need(m, Slot::K, Some(l))?,
                b_k: take(m, Slot::KBias),
                w_v: need(m, Slot::V, Some(l))?,
                b_v: take(m, Slot::VBias),
                w_o: need(m, Slot::O, Some(l))?,
                b_o: take(m, Slot::OBias),
                q_norm: norm(m, Slot::QNorm, None),
                k_norm: norm(m, Slot::KNorm, None),
            },
            mlp: MlpWeights {
                w_in: need(m, Slot::Up, Some(l))?,
                b_in: take(m, Slot::UpBias),
                w_gate: take(m, Slot::Gate),
                b_gate: take(m, Slot::GateBias),
                w_out: need(m, Slot::Down, Some(l))?,
                b_out: take(m, Slot::DownBias),
            },
        });
    }
    let embed = need(&mut global, Slot::Embed, None)?;
    let (unembed, tied) = match take(&mut global, Slot::Unembed) {
        Some(u) => (u, false),
        None => (embed.t()?.contiguous()?.to_device(&last)?, true),
    };
    let w = Weights {
        pos_embed: take(&mut global, Slot::PosEmbed),
        ln_final: norm(&mut global, Slot::FinalNorm, Some(Slot::FinalNormBias))
            .ok_or_else(|| Error::Weights(format!("the checkpoint has no final norm (a {} model needs it)", fam.name)))?,
        b_u: take(&mut global, Slot::UnembedBias),
        embed,
        unembed,
        blocks,
    };
    Ok((w, tied))
}

/// Split a fused tensor (torch layout) into its slots; other slots pass through.
fn split_fused(slot: Slot, x: &Tensor, cfg: &Config) -> Result<Vec<(Slot, Tensor)>> {
    let (h, kv, d, m) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp);
    let rows = x.dim(0)?;
    let check = |want: usize| -> Result<()> {
        if rows != want {
            return Err(Error::Weights(format!("the fused tensor has {rows} rows, config.json implies {want}")));
        }
        Ok(())
    };
    Ok(match slot {
        Slot::QkvConcat | Slot::QkvConcatBias => {
            check((h + 2 * kv) * d)?;
            let bias = slot == Slot::QkvConcatBias;
            let names = if bias { [Slot::QBias, Slot::KBias, Slot::VBias] } else { [Slot::Q, Slot::K, Slot::V] };
            vec![(names[0], x.narrow(0, 0, h * d)?), (names[1], x.narrow(0, h * d, kv * d)?), (names[2], x.narrow(0, (h + kv) * d, kv * d)?)]
        }
        Slot::QkvPerHead | Slot::QkvPerHeadBias => {
            check(3 * h * d)?;
            if kv != h {
                return Err(Error::Weights("a per-head fused qkv tensor needs as many KV heads as heads".into()));
            }
            let bias = slot == Slot::QkvPerHeadBias;
            let rest: usize = x.dims()[1..].iter().product();
            let y = x.reshape((h, 3, d, rest))?;
            let part = |i: usize| -> Result<Tensor> {
                let p = y.narrow(1, i, 1)?.contiguous()?;
                Ok(if bias { p.reshape(h * d)? } else { p.reshape((h * d, rest))? })
            };
            let names = if bias { [Slot::QBias, Slot::KBias, Slot::VBias] } else { [Slot::Q, Slot::K, Slot::V] };
            vec![(names[0], part(0)?), (names[1], part(1)?), (names[2], part(2)?)]
        }
        Slot::GateUp => {
            check(2 * m)?;
            vec![(Slot::Gate, x.narrow(0, 0, m)?), (Slot::Up, x.narrow(0, m, m)?)]
        }
        s => vec![(s, x.clone())],
    })
}

/// The tensor a model holds for `slot` at layer `l`, in ferrolens's layout (`None` if absent).
fn slot_tensor(w: &Weights, slot: Slot, l: usize) -> Option<Tensor> {
    let b = w.blocks.get(l);
    let nw = |n: Option<&NormWeights>| n.map(|n| n.w.clone());
    let nb = |n: Option<&NormWeights>| n.and_then(|n| n.b.clone());
    match slot {
        Slot::Embed => Some(w.embed.clone()),
        Slot::PosEmbed => w.pos_embed.clone(),
        Slot::Unembed => Some(w.unembed.clone()),
        Slot::UnembedBias => w.b_u.clone(),
        Slot::FinalNorm => Some(w.ln_final.w.clone()),
        Slot::FinalNormBias => w.ln_final.b.clone(),
        Slot::Ln1 => nw(b?.ln1.as_ref()),
        Slot::Ln1Bias => nb(b?.ln1.as_ref()),
        Slot::Ln2 => nw(b?.ln2.as_ref()),
        Slot::Ln2Bias => nb(b?.ln2.as_ref()),
        Slot::Ln1Post => nw(b?.ln1_post.as_ref()),
        Slot::Ln2Post => nw(b?.ln2_post.as_ref()),
        Slot::QNorm => nw(b?.attn.q_norm.as_ref()),
        Slot::KNorm => nw(b?.attn.k_norm.as_ref()),
        Slot::Q => Some(b?.attn.w_q.clone()),
        Slot::QBias => b?.attn.b_q.clone(),
        Slot::K => Some(b?.attn.w_k.clone()),
        Slot::KBias => b?.attn.b_k.clone(),
        Slot::V => Some(b?.attn.w_v.clone()),
        Slot::VBias => b?.attn.b_v.clone(),
        Slot::O => Some(b?.attn.w_o.clone()),
        Slot::OBias => b?.attn.b_o.clone(),
        Slot::Gate => b?.mlp.w_gate.clone(),
        Slot::GateBias => b?.mlp.b_gate.clone(),
        Slot::Up => Some(b?.mlp.w_in.clone()),
        Slot::UpBias => b?.mlp.b_in.clone(),
        Slot::Down => Some(b?.mlp.w_out.clone()),
        Slot::DownBias => b?.mlp.b_out.clone(),
        Slot::QkvConcat | Slot::QkvConcatBias | Slot::QkvPerHead | Slot::QkvPerHeadBias | Slot::GateUp => None,
    }
}

/// The weights of a model under its family's Hugging Face names, in `dtype`, on the CPU: the
/// inverse of [`load_weights`] (fused tensors re-fused, the norm offset subtracted, `lm_head`
/// written only when untied).
pub fn hf_tensors(fam: &Family, cfg: &Config, w: &Weights, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let cpu = Device::Cpu;
    let mut out = HashMap::new();
    // ferrolens layout ([in, out]) -> torch layout ([out, in]) for matrices.
    let torch = |t: Tensor, layout: Layout| -> Result<Tensor> {
        Ok(match (layout, t.rank()) {
            (Layout::Linear | Layout::Conv1d, 2) => t.t()?.contiguous()?,
            _ => t,
        })
    };
    // torch layout -> the row's storage layout (Conv1D keeps [in, out]).
    let from_torch = |t: Tensor, layout: Layout| -> Result<Tensor> {
        Ok(match (layout, t.rank()) {
            (Layout::Conv1d, 2) => t.t()?.contiguous()?,
            _ => t,
        })
    };
    for t in fam.tensors {
        let count = if per_layer(t) { cfg.n_layers } else { 1 };
        #[allow(clippy::needless_range_loop)] // `l` also names the tensor
        for l in 0..count {
            let name = t.hf.replace("{l}", &l.to_string());
            let fused = |slots: [Slot; 3]| -> Option<Vec<Tensor>> { slots.iter().map(|s| slot_tensor(w, *s, l)).collect() };
            // Fused tensors are assembled in torch layout ([out, in]); single ones are taken in
            // ferrolens's and turned into the row's storage layout.
            let x = match t.slot {
                Slot::Unembed if cfg.tied_embeddings => None,
                Slot::QkvConcat => fused([Slot::Q, Slot::K, Slot::V])
                    .map(|p| -> Result<Tensor> { Ok(Tensor::cat(&p.into_iter().map(|t| torch(t, Layout::Linear)).collect::<Result<Vec<_>>>()?, 0)?) })
                    .transpose()?
                    .map(|x| from_torch(x, t.layout))
                    .transpose()?,
                Slot::QkvConcatBias => fused([Slot::QBias, Slot::KBias, Slot::VBias]).map(|p| Tensor::cat(&p, 0)).transpose()?,
                Slot::QkvPerHead | Slot::QkvPerHeadBias => {
                    let slots = if t.slot == Slot::QkvPerHead { [Slot::Q, Slot::K, Slot::V] } else { [Slot::QBias, Slot::KBias, Slot::VBias] };
                    match fused(slots) {
                        None => None,
                        Some(p) => {
                            let (h, d) = (cfg.n_heads, cfg.d_head);
                            let parts: Vec<Tensor> = p
                                .into_iter()
                                .map(|x| -> Result<Tensor> {
                                    let x = torch(x, Layout::Linear)?;
                                    let rest: usize = x.dims()[1..].iter().product();
                                    Ok(x.reshape((h, 1, d, rest))?)
                                })
                                .collect::<Result<_>>()?;
                            let y = Tensor::cat(&parts, 1)?; // [h, 3, d, rest]
                            Some(if t.slot == Slot::QkvPerHead { from_torch(y.reshape((3 * h * d, ()))?, t.layout)? } else { y.reshape(3 * h * d)? })
                        }
                    }
                }
                Slot::GateUp => match (slot_tensor(w, Slot::Gate, l), slot_tensor(w, Slot::Up, l)) {
                    (Some(g), Some(u)) => Some(from_torch(Tensor::cat(&[torch(g, Layout::Linear)?, torch(u, Layout::Linear)?], 0)?, t.layout)?),
                    _ => None,
                },
                // ferrolens keeps [in, out] = Conv1D's layout; nn.Linear stores [out, in].
                s => slot_tensor(w, s, l).map(|x| torch(x, if t.layout == Layout::Linear { Layout::Linear } else { Layout::Plain })).transpose()?,
            };
            let Some(mut x) = x else { continue };
            if t.slot.is_norm() && cfg.norm_offset != 0.0 {
                x = (x.to_dtype(DType::F32)? - cfg.norm_offset)?;
            }
            out.insert(name, x.to_device(&cpu)?.to_dtype(dtype)?.contiguous()?);
        }
    }
    Ok(out)
}

/// Fields every family's `config.json` shares, from [`Config`].
pub fn common_hf_fields(c: &Config) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("vocab_size".into(), c.d_vocab.into());
    m.insert("tie_word_embeddings".into(), c.tied_embeddings.into());
    m.insert("bos_token_id".into(), c.bos_token_id.into());
    m.insert("eos_token_id".into(), c.eos_token_id.into());
    m
}

/// Merge `extra` into the JSON object `base`.
pub fn merge(mut base: serde_json::Value, extra: serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    if let Some(o) = base.as_object_mut() {
        for (k, v) in extra {
            o.insert(k, v);
        }
    }
    base
}

/// The `config.json` fields most decoder families share (Llama's names), flattened into the
/// families' own structs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DecoderFields {
    /// `V`.
    pub vocab_size: usize,
    /// `D`.
    pub hidden_size: usize,
    /// `M`.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// KV heads (default: as many as query heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Head width (default `hidden_size / num_attention_heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Context length.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon (family default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    /// Rotary base (family default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Rotary rescaling.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Tied unembedding (family default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// BOS id (an integer; a list takes its first).
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// EOS id (an integer; a list takes its first).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_ctx() -> usize {
    2048
}

/// A token id field that may be an integer or a list of them (Llama-3's `eos_token_id`).
pub fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
        serde_json::Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl DecoderFields {
    /// The shared part of a [`Config`] for a pre-norm RMSNorm decoder with full rotary, GQA and a
    /// gated MLP (Llama's shape); families change the flags that differ.
    pub fn config(&self, name: &str, family: &str, eps: f64, theta: f64, tied: bool, act: Activation) -> Result<Config> {
        let h = self.num_attention_heads;
        if h == 0 || !self.hidden_size.is_multiple_of(h) && self.head_dim.is_none() {
            return Err(Error::Config(format!("hidden_size {} is not divisible by num_attention_heads {h}, and there is no head_dim", self.hidden_size)));
        }
        let d_head = self.head_dim.unwrap_or(self.hidden_size / h);
        let global = RopeFreqs { base: self.rope_theta.unwrap_or(theta), scaling: rope_scaling(&self.rope_scaling)? };
        Ok(Config {
            name: name.to_string(),
            family: family.to_string(),
            d_model: self.hidden_size,
            n_layers: self.num_hidden_layers,
            n_heads: h,
            n_kv_heads: self.num_key_value_heads.unwrap_or(h),
            d_head,
            d_mlp: self.intermediate_size,
            d_vocab: self.vocab_size,
            n_ctx: self.max_position_embeddings,
            eps: self.rms_norm_eps.unwrap_or(eps),
            norm: crate::config::NormKind::RmsNorm,
            norm_offset: 0.0,
            norm_placement: crate::config::NormPlacement::Pre,
            parallel_attn_mlp: false,
            qk_norm: None,
            act,
            gated_mlp: true,
            positional: crate::config::Positional::Rotary { dim: d_head, global, local: None },
            attn_scale: 1.0 / (d_head as f64).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            embed_scale: None,
            windows: vec![],
            tied_embeddings: self.tie_word_embeddings.unwrap_or(tied),
            bos_token_id: first_id(&self.bos_token_id),
            eos_token_id: first_id(&self.eos_token_id),
            prepend_bos: false,
        })
    }

    /// The fields back from a [`Config`].
    pub fn from_config(c: &Config) -> Result<DecoderFields> {
        let crate::config::Positional::Rotary { global, .. } = &c.positional else {
            return Err(Error::Config(format!("a {} model needs rotary positions", c.family)));
        };
        Ok(DecoderFields {
            vocab_size: c.d_vocab,
            hidden_size: c.d_model,
            intermediate_size: c.d_mlp,
            num_hidden_layers: c.n_layers,
            num_attention_heads: c.n_heads,
            num_key_value_heads: Some(c.n_kv_heads),
            head_dim: Some(c.d_head),
            max_position_embeddings: c.n_ctx,
            rms_norm_eps: Some(c.eps),
            rope_theta: Some(global.base),
            rope_scaling: Some(rope_scaling_json(global)),
            tie_word_embeddings: Some(c.tied_embeddings),
            bos_token_id: c.bos_token_id.map(Into::into),
            eos_token_id: c.eos_token_id.map(Into::into),
        })
    }
}

/// The GGUF metadata keys llama.cpp writes for a Llama-shaped family, and their `config.json`
/// fields.
pub const LLAMA_GGUF_KEYS: &[(&str, &str)] = &[
    ("context_length", "max_position_embeddings"),
    ("embedding_length", "hidden_size"),
    ("block_count", "num_hidden_layers"),
    ("feed_forward_length", "intermediate_size"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.key_length", "head_dim"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("rope.freq_base", "rope_theta"),
    ("vocab_size", "vocab_size"),
];

/// No extra GGUF fields.
pub fn no_gguf_extra(_: &GgufMeta, _: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    Ok(())
}

/// The Llama weight table (Hugging Face `LlamaForCausalLM` names, llama.cpp names), shared by the
/// families that keep Llama's tensor names (Mistral, Qwen2).
pub const LLAMA_TENSORS: &[TensorName] = &[
    vec(Slot::Embed, "model.embed_tokens.weight", "token_embd.weight"),
    vec(Slot::Ln1, "model.layers.{l}.input_layernorm.weight", "blk.{l}.attn_norm.weight"),
    lin(Slot::Q, "model.layers.{l}.self_attn.q_proj.weight", "blk.{l}.attn_q.weight"),
    vec(Slot::QBias, "model.layers.{l}.self_attn.q_proj.bias", "blk.{l}.attn_q.bias"),
    lin(Slot::K, "model.layers.{l}.self_attn.k_proj.weight", "blk.{l}.attn_k.weight"),
    vec(Slot::KBias, "model.layers.{l}.self_attn.k_proj.bias", "blk.{l}.attn_k.bias"),
    lin(Slot::V, "model.layers.{l}.self_attn.v_proj.weight", "blk.{l}.attn_v.weight"),
    vec(Slot::VBias, "model.layers.{l}.self_attn.v_proj.bias", "blk.{l}.attn_v.bias"),
    lin(Slot::O, "model.layers.{l}.self_attn.o_proj.weight", "blk.{l}.attn_output.weight"),
    vec(Slot::OBias, "model.layers.{l}.self_attn.o_proj.bias", "blk.{l}.attn_output.bias"),
    vec(Slot::Ln2, "model.layers.{l}.post_attention_layernorm.weight", "blk.{l}.ffn_norm.weight"),
    lin(Slot::Gate, "model.layers.{l}.mlp.gate_proj.weight", "blk.{l}.ffn_gate.weight"),
    vec(Slot::GateBias, "model.layers.{l}.mlp.gate_proj.bias", ""),
    lin(Slot::Up, "model.layers.{l}.mlp.up_proj.weight", "blk.{l}.ffn_up.weight"),
    vec(Slot::UpBias, "model.layers.{l}.mlp.up_proj.bias", ""),
    lin(Slot::Down, "model.layers.{l}.mlp.down_proj.weight", "blk.{l}.ffn_down.weight"),
    vec(Slot::DownBias, "model.layers.{l}.mlp.down_proj.bias", ""),
    vec(Slot::FinalNorm, "model.norm.weight", "output_norm.weight"),
    lin(Slot::Unembed, "lm_head.weight", "output.weight"),
];
