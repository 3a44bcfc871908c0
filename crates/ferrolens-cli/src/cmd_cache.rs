//! `ferrolens cache`: activations of a prompt file as safetensors; `--shard I/N` caches every
//! N-th prompt into a part folder that `ferrolens merge` joins into the unsharded file.

use crate::parts::{sha256_file, write_part, Manifest, Part};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ferrolens_methods::shard::Shard;
use ferrolens_model::{ActivationCache, Hooks};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Arguments of `ferrolens cache`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a registry name, a .gguf file, a HF directory or a hub id.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// A text file with one prompt a line (empty lines are skipped).
    #[arg(long)]
    prompts: std::path::PathBuf,
    /// Hooks to keep: names, globs (blocks.*.attn.hook_z) or re:REGEX, comma-separated.
    #[arg(long)]
    hooks: String,
    /// Output safetensors file (with --shard: the shard's output folder).
    #[arg(long)]
    out: std::path::PathBuf,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Cache shard I of N (0-based): the prompts whose index (among the non-empty lines) is I
    /// modulo N, into OUT/cache.safetensors with a manifest OUT/shard.json; `ferrolens merge`
    /// joins the parts into the file an unsharded run writes.
    #[arg(long)]
    shard: Option<Shard>,
    /// Print the prompts (and the shard's share), a time estimate from one timed batch and the
    /// size of the file, then stop without writing anything.
    #[arg(long)]
    dry_run: bool,
}

/// The file a shard writes into its folder, and a merge into its output folder.
pub const CACHE_FILE: &str = "cache.safetensors";

/// One length group of cached prompts: their indices (ascending), tokens `[n, L]` and the
/// activations `[n, ...]` of every hook.
struct Group {
    index: Vec<usize>,
    tokens: Tensor,
    acts: BTreeMap<String, Tensor>,
}

/// A `cache` shard's part: where its tensors are and which prompts it holds.
#[derive(Serialize, Deserialize)]
pub struct CachePart {
    /// The safetensors file in the part folder.
    pub file: String,
    /// Number of prompts of the whole file.
    pub n_prompts: usize,
    /// The hooks cached, in order.
    pub hooks: Vec<String>,
}

/// Batching rule: prompts are grouped by token length. When every prompt has the same length the
/// file holds one tensor per hook, `[n_prompts, ...]`, plus `tokens` `[n_prompts, pos]`. Otherwise
/// each length L gets keys `len{L}.{hook}`, `len{L}.tokens` and `len{L}.prompt_index` (0-based line
/// numbers among the non-empty lines), so nothing is padded. A shard's file always has the
/// grouped form.
pub fn run(a: Args) -> Result<()> {
    if a.shard.is_some() && a.out.extension().is_some_and(|e| e == "safetensors") {
        bail!(
            "with --shard, --out is the shard's output folder (it gets {CACHE_FILE} and shard.json), not a .safetensors file; \
             give a folder such as out/cache-part-{}, then `ferrolens merge` the folders",
            a.shard.map(|s| s.index).unwrap_or(0)
        );
    }
    let model = crate::load_model(&a.model)?;
    // Check the filter against the model before any work: a typo or a layer past the last one
    // fails here instead of writing an empty file.
    let wanted = model.hooks_matching(&a.hooks)?;
    let tok = model.tokenizer()?;
    let text = std::fs::read_to_string(&a.prompts).with_context(|| format!("reading {}", a.prompts.display()))?;
    let prompts: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    anyhow::ensure!(!prompts.is_empty(), "{} has no prompts (one prompt a line)", a.prompts.display());
    let owned = |i: usize| a.shard.is_none_or(|s| s.owns(i));
    let mut by_len: BTreeMap<usize, Vec<(usize, Vec<u32>)>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate().filter(|(i, _)| owned(*i)) {
        let ids = tok.encode_prompt(p)?;
        by_len.entry(ids.len()).or_default().push((i, ids));
    }
    let n_mine: usize = by_len.values().map(Vec::len).sum();
    if a.dry_run {
        return dry_run(&a, &model, &wanted, &by_len, prompts.len());
    }
    let bar = indicatif::ProgressBar::new(n_mine as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} prompts {elapsed}").unwrap());
    let t0 = std::time::Instant::now();
    let mut groups: BTreeMap<usize, Group> = BTreeMap::new();
    for (len, items) in &by_len {
        let mut caches = Vec::new();
        for chunk in items.chunks(a.batch_size.max(1)) {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, v)| v.clone()).collect();
            let tokens = model.tokens_tensor(&ids)?;
            let mut hooks = Hooks::new().cache_hooks(&wanted);
            model.run(&tokens, &mut hooks)?;
            caches.push(hooks.take_cache());
            bar.inc(chunk.len() as u64);
        }
        let cache = ActivationCache::concat(&caches)?;
        let all: Vec<Vec<u32>> = items.iter().map(|(_, v)| v.clone()).collect();
        let acts = cache.iter().map(|(h, t)| Ok((h.to_string(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
        groups.insert(*len, Group { index: items.iter().map(|(i, _)| *i).collect(), tokens: model.tokens_tensor(&all)?.to_device(&Device::Cpu)?, acts });
    }
    bar.finish_and_clear();
    let hooks: Vec<String> = wanted.iter().map(|h| h.to_string()).collect();
    match a.shard {
        None => {
            save(&layout(&groups, false)?, &a.out)?;
            eprintln!("wrote {} ({} prompts in {} length group(s), {} hooks each)", a.out.display(), prompts.len(), groups.len(), hooks.len());
            Ok(())
        }
        Some(shard) => crate::in_new_dir(&a.out, || {
            save(&layout(&groups, true)?, &a.out.join(CACHE_FILE))?;
            let part = Part {
                manifest: Manifest {
                    data: a.prompts.display().to_string(),
                    data_sha256: sha256_file(&a.prompts)?,
                    options: serde_json::json!({ "hooks": hooks, "dtype": format!("{:?}", model.dtype()) }),
                    ..Manifest::new("cache", shard, &model, prompts.len(), "prompt index % N == I (non-empty lines)", t0.elapsed().as_secs_f64())?
                },
                payload: CachePart { file: CACHE_FILE.into(), n_prompts: prompts.len(), hooks: hooks.clone() },
            };
            write_part(&a.out, &part)?;
            eprintln!("shard {shard}: {n_mine} of {} prompts; wrote {}", prompts.len(), a.out.join(crate::parts::PART_FILE).display());
            Ok(())
        }),
    }
}

/// The file's tensors: one group without prefixes (unless `grouped`), else `len{L}.` keys with
/// `prompt_index`.
fn layout(groups: &BTreeMap<usize, Group>, grouped: bool) -> Result<HashMap<String, Tensor>> {
    let single = groups.len() == 1 && !grouped;
    let mut out = HashMap::new();
    for (len, g) in groups {
        let prefix = if single { String::new() } else { format!("len{len}.") };
        for (h, t) in &g.acts {
            out.insert(format!("{prefix}{h}"), t.clone());
        }
        out.insert(format!("{prefix}tokens"), g.tokens.to_dtype(DType::I64)?);
        if !single {
            let idx: Vec<i64> = g.index.iter().map(|&i| i as i64).collect();
            out.insert(format!("{prefix}prompt_index"), Tensor::new(idx, &Device::Cpu)?);
        }
    }
    Ok(out)
}

fn save(map: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(map, path).with_context(|| format!("writing {}", path.display()))
}

/// `ferrolens merge` of `cache` parts (every shard of one run, in shard order): the prompts'
/// rows back in prompt order, written as OUT/cache.safetensors in the unsharded layout.
pub fn merge(parts: Vec<(std::path::PathBuf, Part<CachePart>)>, out: &Path, quiet: bool) -> Result<()> {
    let hooks = parts[0].1.payload.hooks.clone();
    let n = parts[0].1.payload.n_prompts;
    // Per length: (prompt index, part number, row) and the parts' tensors.
    let mut rows: BTreeMap<usize, Vec<(usize, usize, usize)>> = BTreeMap::new();
    let mut files: Vec<HashMap<String, Tensor>> = Vec::new();
    for (pi, (dir, part)) in parts.iter().enumerate() {
        let f = dir.join(&part.payload.file);
        let t = candle_core::safetensors::load(&f, &Device::Cpu).with_context(|| format!("reading {} (rerun this shard)", f.display()))?;
        for (k, v) in &t {
            let Some(len) = k.strip_prefix("len").and_then(|r| r.strip_suffix(".prompt_index")) else { continue };
            let len: usize = len.parse().with_context(|| format!("{}: bad key {k}", f.display()))?;
            for (row, i) in v.to_vec1::<i64>()?.into_iter().enumerate() {
                rows.entry(len).or_default().push((i as usize, pi, row));
            }
        }
        files.push(t);
    }
    let mut seen = vec![false; n];
    for &(i, _, _) in rows.values().flatten() {
        if i >= n || std::mem::replace(&mut seen[i], true) {
            bail!("prompt {i} is in two parts (or past the {n} prompts); the parts are not shards of one run");
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        bail!("no part holds prompt {i}; rerun the shard that owns it ({}/{})", i % parts.len(), parts.len());
    }
    let mut groups = BTreeMap::new();
    for (len, mut list) in rows {
        list.sort();
        let gather = |key: &str| -> Result<Tensor> {
            let mut pieces = Vec::with_capacity(list.len());
            for &(_, pi, row) in &list {
                let t = files[pi].get(&format!("len{len}.{key}")).ok_or_else(|| anyhow::anyhow!("part {pi} has no {key} for length {len}; rerun it"))?;
                pieces.push(t.narrow(0, row, 1)?);
            }
            Ok(Tensor::cat(&pieces, 0)?)
        };
        let acts = hooks.iter().map(|h| Ok((h.clone(), gather(h)?))).collect::<Result<_>>()?;
        groups.insert(len, Group { index: list.iter().map(|r| r.0).collect(), tokens: gather("tokens")?, acts });
    }
    crate::in_new_dir(out, || save(&layout(&groups, false)?, &out.join(CACHE_FILE)))?;
    if !quiet {
        eprintln!(
            "merged {} parts: {n} prompts in {} length group(s), {} hooks each; wrote {}",
            parts.len(),
            groups.len(),
            hooks.len(),
            out.join(CACHE_FILE).display()
        );
    }
    Ok(())
}

/// `cache --dry-run`: one timed batch of the first length group, scaled to the shard's prompts.
fn dry_run(
    a: &Args,
    model: &ferrolens_model::HookedTransformer,
    wanted: &[ferrolens_model::HookPoint],
    by_len: &BTreeMap<usize, Vec<(usize, Vec<u32>)>>,
    n: usize,
) -> Result<()> {
    let shard = a.shard.unwrap_or(Shard { index: 0, count: 1 });
    let mine: usize = by_len.values().map(Vec::len).sum();
    let tokens: usize = by_len.iter().map(|(len, v)| len * v.len()).sum();
    println!("cache on {}: {n} prompts in {} length group(s); {} hook points", model.cfg.name, by_len.len(), wanted.len());
    println!("work units: {n} prompts; shard {shard} owns {mine} ({tokens} tokens)");
    let Some((len, items)) = by_len.iter().next() else {
        return Ok(());
    };
    let ids: Vec<Vec<u32>> = items.iter().take(a.batch_size.max(1)).map(|(_, v)| v.clone()).collect();
    let batch = model.tokens_tensor(&ids)?;
    model.forward(&batch)?;
    let t0 = std::time::Instant::now();
    let mut hooks = Hooks::new().cache_hooks(wanted);
    model.run(&batch, &mut hooks)?;
    let t = t0.elapsed().as_secs_f64();
    let bytes: usize = hooks.cache_ref().iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum();
    let per_token = bytes as f64 / (ids.len() * len) as f64;
    let per_token_s = t / (ids.len() * len) as f64;
    println!("time estimate for shard {shard}: about {:.0} s ({} prompts of {len} tokens took {t:.3} s here)", per_token_s * tokens as f64, ids.len());
    let size = per_token * tokens as f64;
    let size = if size >= (1u64 << 30) as f64 { format!("{:.2} GiB", size / (1u64 << 30) as f64) } else { format!("{:.1} MiB", size / (1u64 << 20) as f64) };
    println!("file size estimate: {size} ({:.1} KiB per token)", per_token / 1024.0);
    Ok(())
}
