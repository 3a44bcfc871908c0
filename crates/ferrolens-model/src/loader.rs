//! Loading models: Hugging Face directories (local or through the hub cache), GGUF files,
//! and the named models of the registry.
//!
//! ```no_run
//! use ferrolens_model::{load, LoadOptions};
//! let model = load("smollm2-135m", &LoadOptions::default())?;      // fetched on first use
//! let gpt2 = load("./my-gpt2-dir", &LoadOptions::default())?;       // config.json + model.safetensors
//! let hub = load("openai-community/gpt2", &LoadOptions::default())?; // through hf-hub's cache
//! # Ok::<(), ferrolens_model::Error>(())
//! ```

use crate::arch::{self, GgufMeta, SourceKind};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::registry;
use crate::tokenizer::Tokenizer;
use crate::transformer::HookedTransformer;
use crate::weights::Weights;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Options for [`load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Weight dtype: F32 (default), F64 for finite-difference checks, BF16/F16 on GPU.
    pub dtype: DType,
    /// Device for the weights (the first stage's device when `devices` is given).
    pub device: Device,
    /// A pipeline ([`crate::pipeline`]): split the layers into contiguous stages over these
    /// devices, each layer loaded straight onto its stage's. Empty: everything on `device`.
    /// Set both with [`LoadOptions::split`]; a load refuses a `device` other than `devices[0]`.
    pub devices: Vec<Device>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, device: Device::Cpu, devices: Vec::new() }
    }
}

impl LoadOptions {
    /// Options that load in `dtype` onto `device`.
    pub fn on(device: Device, dtype: DType) -> Self {
        LoadOptions { dtype, device, devices: Vec::new() }
    }

    /// These options with the layers split over `devices` (the first holds the embedding, the
    /// last the unembedding); one device is a plain load onto it.
    pub fn split(mut self, devices: &[Device]) -> Self {
        if let Some(d) = devices.first() {
            self.device = d.clone();
        }
        self.devices = if devices.len() > 1 { devices.to_vec() } else { Vec::new() };
        self
    }

    /// The device of each of `n_layers` layers: empty when unsplit.
    pub(crate) fn stage_devices(&self, n_layers: usize) -> Result<Vec<Device>> {
        if self.devices.is_empty() {
            return Ok(Vec::new());
        }
        if !self.devices[0].same_device(&self.device) {
            return Err(Error::Input(format!(
                "LoadOptions.device is {} but the first of LoadOptions.devices is {}; set both with LoadOptions::split",
                crate::device_name(&self.device),
                crate::device_name(&self.devices[0])
            )));
        }
        let ranges = crate::pipeline::stage_ranges(n_layers, self.devices.len())?;
        Ok(ranges.iter().zip(&self.devices).flat_map(|(r, d)| r.clone().map(move |_| d.clone())).collect())
    }
}

/// Load a model from a registry name (`smollm2-135m`), a `.gguf` file, a Hugging Face model
/// directory, or a hub id (`org/name`, optionally `org/name@revision`).
pub fn load(spec: &str, opts: &LoadOptions) -> Result<HookedTransformer> {
    if let Some(entry) = registry::find(spec) {
        let path = registry::ensure(entry)?;
        return load_gguf(&path, opts).map(|m| m.renamed(entry.name));
    }
    let p = Path::new(spec);
    if p.is_file() {
        return match p.extension().and_then(|e| e.to_str()) {
            Some("gguf") => load_gguf(p, opts),
            _ => Err(Error::Input(format!("{spec} is a file but not a .gguf; give a GGUF file or a directory with config.json"))),
        };
    }
    if p.is_dir() {
        return load_hf_dir(p, opts);
    }
    if spec.contains('/') && !spec.starts_with('.') && !spec.starts_with('/') {
        return load_hub(spec, opts);
    }
    Err(Error::Fetch(format!(
        "`{spec}` is not a known model name ({}), an existing file or directory, or a hub id like org/name",
        registry::names().join(", ")
    )))
}

/// Where tensors come from: safetensors files or a GGUF file (dequantized to `dtype` on read).
pub enum TensorSource {
    /// Memory-mapped safetensors (one or more shards).
    Safetensors(candle_core::safetensors::MmapedSafetensors, PathBuf),
    /// A GGUF file.
    Gguf(gguf_file::Content, PathBuf),
}

impl TensorSource {
    /// Which naming scheme the source uses.
    pub fn kind(&self) -> SourceKind {
        match self {
            TensorSource::Safetensors(..) => SourceKind::Hf,
            TensorSource::Gguf(..) => SourceKind::Gguf,
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            TensorSource::Safetensors(st, _) => st.get(name).is_ok(),
            TensorSource::Gguf(ct, _) => ct.tensor_infos.contains_key(name),
        }
    }

    /// The name under which the source holds `name`: itself, or (Hugging Face files) the same
    /// tensor saved by a base model without its first prefix (`transformer.`, `model.`), or
    /// inside a multimodal checkpoint's language model.
    fn resolve(&self, name: &str) -> Option<String> {
        if self.contains(name) {
            return Some(name.to_string());
        }
        if self.kind() == SourceKind::Gguf {
            return None;
        }
        let mut alts = Vec::new();
        if let Some((_, rest)) = name.split_once('.') {
            alts.push(rest.to_string());
        }
        if let Some(rest) = name.strip_prefix("model.") {
            alts.push(format!("model.language_model.{rest}"));
            alts.push(format!("language_model.model.{rest}"));
        }
        if name == "lm_head.weight" {
            alts.push("language_model.lm_head.weight".into());
        }
        alts.into_iter().find(|a| self.contains(a))
    }

    /// Whether the source holds `name` (under one of the names [`TensorSource::get`] accepts).
    pub fn has(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    fn path(&self) -> &Path {
        match self {
            TensorSource::Safetensors(_, p) | TensorSource::Gguf(_, p) => p,
        }
    }

    /// The tensor `name` in `dtype` on `device` (torch layout: `[out, in]` for linear weights).
    pub fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(real) = self.resolve(name) else {
            return Err(Error::Weights(format!("tensor `{name}` is missing from {}", self.path().display())));
        };
        match self {
            TensorSource::Safetensors(st, path) => {
                let t = st
                    .load(&real, device)
                    .map_err(|e| Error::Weights(format!("cannot read `{real}` from {}: {e}; the file may be truncated, download it again", path.display())))?;
                Ok(t.to_dtype(dtype)?)
            }
            TensorSource::Gguf(ct, path) => {
                let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
                let q = ct.tensor(&mut f, &real, &Device::Cpu).map_err(|e| {
                    Error::Weights(format!(
                        "cannot read `{real}` from {}: {}; the file is truncated or corrupt, delete it and fetch it again",
                        path.display(),
                        crate::error::first_line(&e)
                    ))
                })?;
                let t = q.dequantize(&Device::Cpu)?;
                Ok(t.to_dtype(dtype)?.to_device(device)?)
            }
        }
    }

    /// An optional tensor.
    pub fn opt(&self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        if self.has(name) {
            self.get(name, dtype, device).map(Some)
        } else {
            Ok(None)
        }
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))
}

fn open_safetensors(dir: &Path) -> Result<TensorSource> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single.clone()]
    } else if index.is_file() {
        let j = read_json(&index)?;
        let map = j["weight_map"].as_object().ok_or_else(|| Error::Weights(format!("{} has no weight_map", index.display())))?;
        let mut v: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        v.sort();
        v.dedup();
        v
    } else {
        return Err(Error::Weights(format!(
            "no model.safetensors or model.safetensors.index.json in {}; ferrolens reads safetensors weights (convert .bin files with transformers' save_pretrained(safe_serialization=True))",
            dir.display()
        )));
    };
    for f in &files {
        if !f.is_file() {
            return Err(Error::Weights(format!("shard {} named in the index is missing", f.display())));
        }
    }
    // SAFETY: the files are memory-mapped read-only; they must not change while the model is loaded.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::Weights(format!("cannot read {}: {e}; the file is truncated or corrupt, download it again", files[0].display())))?;
    Ok(TensorSource::Safetensors(st, files[0].clone()))
}

/// Load a Hugging Face model directory: `config.json`, `model.safetensors` (or a sharded index),
/// and `tokenizer.json` or GPT-2's `vocab.json` + `merges.txt` when present.
pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<HookedTransformer> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::Config(format!("{} has no config.json; is this a Hugging Face model directory?", dir.display())));
    }
    let j = read_json(&cfg_path)?;
    let name = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let src = open_safetensors(dir)?;
    let (cfg, w) = from_hf_parts(&j, &name, &src, opts)?;
    let bos = cfg.bos_token_id;
    let model = HookedTransformer::new(cfg, w)?;
    // A tokenizer.json does not say which token is the BOS: config.json does.
    let tok = find_tokenizer(|f| Some(dir.join(f)).filter(|p| p.is_file()))?.map(|t| if t.bos_id().is_none() { t.with_bos(bos) } else { t });
    Ok(model.with_tokenizer(tok))
}

/// Build config and weights from a parsed `config.json` and a tensor source, through the family
/// that `model_type` names ([`crate::arch::FAMILIES`]).
pub fn from_hf_parts(j: &serde_json::Value, name: &str, src: &TensorSource, opts: &LoadOptions) -> Result<(Config, Weights)> {
    let mt = j["model_type"].as_str().ok_or_else(|| Error::Config("config.json has no `model_type`; is it a transformers model config?".into()))?;
    let fam = arch::by_model_type(mt)?;
    let mut cfg = (fam.from_hf)(j, name)?;
    cfg.validate()?;
    let (w, tied) = arch::load_weights(fam, &cfg, src, opts)?;
    cfg.tied_embeddings = tied;
    Ok((cfg, w))
}

fn find_tokenizer(find: impl Fn(&str) -> Option<PathBuf>) -> Result<Option<Tokenizer>> {
    if let Some(p) = find("tokenizer.json") {
        return Tokenizer::from_file(p).map(Some);
    }
    let vocab = find("vocab.json").or_else(|| find("encoder.json"));
    let merges = find("merges.txt").or_else(|| find("vocab.bpe"));
    match (vocab, merges) {
        (Some(v), Some(m)) => Tokenizer::gpt2(v, m).map(Some),
        _ => Ok(None),
    }
}

/// A getter of one hub repository's files (`org/name[@revision]`): the hf-hub cache first, then
/// the hub unless `HF_HUB_OFFLINE=1`. Returns the repository id and `get(file)`, which is
/// `Ok(None)` for a file the repository does not have; `config.json` is required.
#[allow(clippy::type_complexity)]
fn hub_files(id: &str) -> Result<(String, impl Fn(&str) -> Result<Option<PathBuf>>)> {
    let (repo_id, rev) = match id.split_once('@') {
        Some((r, v)) => (r.to_string(), v.to_string()),
        None => (id.to_string(), "main".to_string()),
    };
    let repo = hf_hub::Repo::with_revision(repo_id.clone(), hf_hub::RepoType::Model, rev.clone());
    let offline = std::env::var("HF_HUB_OFFLINE").map(|v| v == "1" || v.eq_ignore_ascii_case("true")).unwrap_or(false);
    let cache = hf_hub::Cache::from_env();
    let cached = cache.repo(repo.clone());
    let api = if offline {
        None
    } else {
        Some(hf_hub::api::sync::ApiBuilder::from_env().build().map_err(|e| Error::Fetch(format!("cannot set up the hub client: {e}")))?)
    };
    let rid = repo_id.clone();
    let get = move |file: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(file) {
            return Ok(Some(p));
        }
        let got = match &api {
            None => None,
            Some(api) => match api.repo(repo.clone()).get(file) {
                Ok(p) => Some(p),
                Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => None,
                Err(e) => {
                    return Err(Error::Fetch(format!(
                        "cannot fetch {file} of {rid}@{rev}: {e}. Offline? Set HF_HUB_OFFLINE=1 to use the cache in {}",
                        cache.path().display()
                    )))
                }
            },
        };
        if got.is_none() && file == "config.json" {
            return Err(Error::Fetch(format!(
                "{rid}@{rev} has no config.json in the hub cache {}{}",
                cache.path().display(),
                if offline { " (HF_HUB_OFFLINE is set: download it once while online)" } else { "" }
            )));
        }
        Ok(got)
    };
    Ok((repo_id, get))
}

/// The configuration of a model without loading its weights: from a registry name or GGUF file
/// (the metadata only), a Hugging Face directory or `config.json` file, or a hub id (its
/// `config.json` only). For memory plans (`ferrolens plan`) before anything large is read.
pub fn config_of(spec: &str) -> Result<Config> {
    let from_json = |j: &serde_json::Value, name: &str| -> Result<Config> {
        let mt = j["model_type"].as_str().ok_or_else(|| Error::Config("config.json has no `model_type`; is it a transformers model config?".into()))?;
        let cfg = (arch::by_model_type(mt)?.from_hf)(j, name)?;
        cfg.validate()?;
        Ok(cfg)
    };
    let gguf = |path: &Path, name: &str| -> Result<Config> {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let ct = gguf_file::Content::read(&mut f)
            .map_err(|e| Error::Weights(format!("{} is not a readable GGUF file ({})", path.display(), crate::error::first_line(&e))))?;
        let arch_name = ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let fam = arch::by_gguf_arch(&arch_name)?;
        let meta = GgufMeta { md: &ct.metadata, arch: arch_name.clone() };
        let j = arch::gguf_to_hf(fam, &meta, ct.tensor_infos.contains_key("output.weight"))?;
        let mut cfg = from_json(&j, name)?;
        cfg.tied_embeddings = !ct.tensor_infos.contains_key("output.weight");
        Ok(cfg)
    };
    if let Some(entry) = registry::find(spec) {
        return gguf(&registry::ensure(entry)?, entry.name);
    }
    let p = Path::new(spec);
    let stem = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    if p.is_file() {
        return match p.extension().and_then(|e| e.to_str()) {
            Some("gguf") => gguf(p, &stem),
            Some("json") => from_json(&read_json(p)?, &stem),
            _ => Err(Error::Input(format!("{spec} is a file but neither a .gguf nor a config.json; give one of those or a model directory"))),
        };
    }
    if p.is_dir() {
        let c = p.join("config.json");
        if !c.is_file() {
            return Err(Error::Config(format!("{} has no config.json; is this a Hugging Face model directory?", p.display())));
        }
        let name = p.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        return from_json(&read_json(&c)?, &name);
    }
    if spec.contains('/') && !spec.starts_with('.') && !spec.starts_with('/') {
        let (repo_id, get) = hub_files(spec)?;
        let c = get("config.json")?.expect("hub_files requires config.json");
        return from_json(&read_json(&c)?, &repo_id);
    }
    Err(Error::Fetch(format!(
        "`{spec}` is not a known model name ({}), an existing file or directory, or a hub id like org/name",
        registry::names().join(", ")
    )))
}

/// Load a model by hub id (`org/name[@revision]`) through hf-hub's cache (`HF_HOME`,
/// default `~/.cache/huggingface`). With `HF_HUB_OFFLINE=1` only the cache is read.
pub fn load_hub(id: &str, opts: &LoadOptions) -> Result<HookedTransformer> {
    let (repo_id, get) = hub_files(id)?;
    let cfg_path = get("config.json")?.expect("hub_files requires config.json");
    let dir = cfg_path.parent().expect("a file has a parent").to_path_buf();
    // Make sure the weight files are present in the snapshot folder.
    if get("model.safetensors")?.is_none() {
        let idx = get("model.safetensors.index.json")?
            .ok_or_else(|| Error::Fetch(format!("{repo_id} has neither model.safetensors nor model.safetensors.index.json")))?;
        let j = read_json(&idx)?;
        let mut shards: Vec<String> =
            j["weight_map"].as_object().map(|m| m.values().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            get(&s)?.ok_or_else(|| Error::Fetch(format!("shard {s} of {repo_id} is not available")))?;
        }
    }
    for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
        let _ = get(f)?;
    }
    load_hf_dir(&dir, opts).map(|m| m.renamed(&repo_id))
}

/// Load a GGUF file of any family with a GGUF reader ([`crate::arch::FAMILIES`]): every tensor
/// is dequantized to `opts.dtype`, llama.cpp's Q/K row permutation is undone for `llama` files
/// (so `hook_q`/`hook_k` equal Hugging Face's), and the metadata is read as transformers reads it.
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<HookedTransformer> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let ct = gguf_file::Content::read(&mut f).map_err(|e| {
        Error::Weights(format!(
            "{} is not a readable GGUF file ({}); it may be truncated or corrupt: delete it and fetch it again",
            path.display(),
            crate::error::first_line(&e)
        ))
    })?;
    let arch_name = ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let fam = arch::by_gguf_arch(&arch_name)?;
    if ct.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::Config(format!(
            "{} holds `rope_freqs.weight` (per-frequency rotary factors, llama.cpp's form of Llama-3.1 rope scaling), which ferrolens does not read from GGUF; load the Hugging Face checkpoint instead (its rope_scaling is supported)",
            path.display()
        )));
    }
    let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    // A GGUF file may carry no vocabulary (converted weights only): the model then runs on ids.
    let tokenizer = if ct.metadata.contains_key("tokenizer.ggml.model") { Some(Tokenizer::from_gguf(&ct)?) } else { None };
    let meta = GgufMeta { md: &ct.metadata, arch: arch_name.clone() };
    let j = arch::gguf_to_hf(fam, &meta, ct.tensor_infos.contains_key("output.weight"))?;
    let src = TensorSource::Gguf(ct, path.to_path_buf());
    let (cfg, w) = from_hf_parts(&j, &name, &src, opts)?;
    let cfg = Config { bos_token_id: cfg.bos_token_id.or(tokenizer.as_ref().and_then(|t| t.bos_id())), ..cfg };
    Ok(HookedTransformer::new(cfg, w)?.with_tokenizer(tokenizer))
}
