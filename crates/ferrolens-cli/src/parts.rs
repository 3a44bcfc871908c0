//! Shard parts on disk: what `--shard I/N` writes next to its results (`shard.json`: a manifest
//! and the shard's rows), and the checks `ferrolens merge` makes before it joins parts.
//!
//! A part is written last and atomically (a temporary file renamed), so a folder with a
//! `shard.json` holds a finished shard and a killed shard leaves none: rerunning that shard
//! alone, then the merge, completes the sweep.

use anyhow::{bail, Context, Result};
use ferrolens_methods::shard::Shard;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file a shard writes into its output folder.
pub const PART_FILE: &str = "shard.json";

/// What identifies a sweep: parts merge only when every field but `shard`, `units_covered`,
/// `seconds` and `data` (the path, which may differ between machines) agrees.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Format version of the part file.
    pub format: u32,
    /// The command that wrote it (`patch`, `circuits eval`, `heads retrieval`, `cache`).
    pub command: String,
    /// The shard.
    pub shard: Shard,
    /// The model's display name.
    pub model: String,
    /// [`ferrolens_model::HookedTransformer::fingerprint`].
    pub model_fingerprint: String,
    /// The data file as given (informational).
    pub data: String,
    /// SHA-256 of the data (the JSONL bytes, or the generated inputs' description).
    pub data_sha256: String,
    /// The options that change the results.
    pub options: serde_json::Value,
    /// Work units of the whole sweep.
    pub units_total: usize,
    /// Work units this shard computed.
    pub units_covered: usize,
    /// Which units a shard owns.
    pub rule: String,
    /// Wall time of the shard's computation.
    pub seconds: f64,
    /// The command line that reruns this shard (for the merge's "missing shard" message).
    pub rerun: String,
}

impl Manifest {
    /// The manifest of `shard` of `units` work units of `command` on `model`, `seconds` of work,
    /// owned by `rule`: the format, fingerprint, units covered and rerun line filled in. The
    /// data (`data`, `data_sha256`) and `options` are the caller's, set with struct update.
    pub fn new(command: &str, shard: Shard, model: &ferrolens_model::HookedTransformer, units: usize, rule: &str, seconds: f64) -> Result<Self> {
        Ok(Manifest {
            format: 1,
            command: command.into(),
            shard,
            model: model.cfg.name.clone(),
            model_fingerprint: model.fingerprint()?,
            data: String::new(),
            data_sha256: String::new(),
            options: serde_json::Value::Null,
            units_total: units,
            units_covered: shard.count_of(units),
            rule: rule.into(),
            seconds,
            rerun: rerun_line(shard),
        })
    }
}

/// A part: the manifest and the command's payload.
#[derive(Serialize, Deserialize)]
pub struct Part<T> {
    /// The manifest.
    pub manifest: Manifest,
    /// The command's rows and whatever else its merge needs.
    pub payload: T,
}

/// SHA-256 (hex) of bytes.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file.
pub fn sha256_file(p: &Path) -> Result<String> {
    Ok(sha256(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?))
}

/// The command line of this process with `--shard` set to `shard` (for the manifest's `rerun`).
pub fn rerun_line(shard: Shard) -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--shard") {
        if i + 1 < args.len() {
            args[i + 1] = shard.to_string();
        }
    } else if let Some(a) = args.iter_mut().find(|a| a.starts_with("--shard=")) {
        *a = format!("--shard={shard}");
    }
    if let Some(first) = args.first_mut() {
        *first = "ferrolens".into();
    }
    args.join(" ")
}

/// Write a part atomically into `dir`.
pub fn write_part<T: Serialize>(dir: &Path, part: &Part<T>) -> Result<()> {
    let tmp = dir.join(format!(".{PART_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(part)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(PART_FILE)).with_context(|| format!("writing {}", dir.join(PART_FILE).display()))?;
    Ok(())
}

/// The manifest of a part folder, if it holds a finished shard.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    #[derive(Deserialize)]
    struct Head {
        manifest: Manifest,
    }
    let p = dir.join(PART_FILE);
    if !p.is_file() {
        bail!(
            "{} has no {PART_FILE}: it is not the output folder of a finished `--shard` run (a shard that was killed writes none); \
             rerun that shard with the same command and --shard, then merge again",
            dir.display()
        );
    }
    let h: Head = serde_json::from_slice(&std::fs::read(&p)?).with_context(|| format!("{} is not a ferrolens shard part", p.display()))?;
    Ok(h.manifest)
}

/// Read the parts in `dirs` and check that they are every shard of one sweep, once each:
/// returns them in shard order.
pub fn read_parts<T: DeserializeOwned>(dirs: &[PathBuf]) -> Result<Vec<Part<T>>> {
    Ok(read_parts_in(dirs)?.into_iter().map(|(_, p)| p).collect())
}

/// [`read_parts`] with each part's folder (for parts that keep files beside `shard.json`).
pub fn read_parts_in<T: DeserializeOwned>(dirs: &[PathBuf]) -> Result<Vec<(PathBuf, Part<T>)>> {
    if dirs.is_empty() {
        bail!("give the output folders of the shards to merge (e.g. ferrolens merge out/part-* --out out/all)");
    }
    let manifests: Vec<Manifest> = dirs.iter().map(|d| read_manifest(d)).collect::<Result<_>>()?;
    check_manifests(dirs, &manifests)?;
    let mut parts: Vec<(usize, PathBuf, Part<T>)> = Vec::with_capacity(dirs.len());
    for (d, m) in dirs.iter().zip(&manifests) {
        let p = d.join(PART_FILE);
        let part: Part<T> = serde_json::from_slice(&std::fs::read(&p)?)
            .with_context(|| format!("{} is a `{}` part this version of ferrolens cannot read", p.display(), m.command))?;
        parts.push((m.shard.index, d.clone(), part));
    }
    parts.sort_by_key(|(i, _, _)| *i);
    Ok(parts.into_iter().map(|(_, d, p)| (d, p)).collect())
}

/// The checks of [`read_parts`] on the manifests alone.
pub fn check_manifests(dirs: &[PathBuf], ms: &[Manifest]) -> Result<()> {
    let (d0, m0) = (&dirs[0], &ms[0]);
    for (d, m) in dirs.iter().zip(ms).skip(1) {
        let differ = |what: &str, a: &str, b: &str| -> Result<()> {
            bail!(
                "{} and {} are shards of different sweeps: {what} differs ({a} vs {b}); merge only the parts of one sweep (same model, data and options)",
                d0.display(),
                d.display()
            )
        };
        if m.command != m0.command {
            differ("the command", &m0.command, &m.command)?;
        }
        if m.model_fingerprint != m0.model_fingerprint {
            differ(
                "the model or its dtype",
                &format!("{} {}", m0.model, short(&m0.model_fingerprint)),
                &format!("{} {}", m.model, short(&m.model_fingerprint)),
            )?;
        }
        if m.data_sha256 != m0.data_sha256 {
            differ("the data", &format!("{} sha256 {}", m0.data, short(&m0.data_sha256)), &format!("{} sha256 {}", m.data, short(&m.data_sha256)))?;
        }
        if m.options != m0.options {
            let keys: Vec<String> = match (m0.options.as_object(), m.options.as_object()) {
                (Some(a), Some(b)) => a
                    .iter()
                    .filter(|(k, v)| b.get(*k) != Some(v))
                    .map(|(k, v)| format!("{k}: {v} vs {}", b.get(k).map(|x| x.to_string()).unwrap_or("absent".into())))
                    .collect(),
                _ => vec![],
            };
            differ("the options", &keys.join("; "), "")?;
        }
        if m.shard.count != m0.shard.count {
            differ("the number of shards", &m0.shard.count.to_string(), &m.shard.count.to_string())?;
        }
        if m.units_total != m0.units_total || m.rule != m0.rule {
            differ("the work units", &m0.units_total.to_string(), &m.units_total.to_string())?;
        }
    }
    let n = m0.shard.count;
    let mut seen: Vec<Option<&PathBuf>> = vec![None; n];
    for (d, m) in dirs.iter().zip(ms) {
        if let Some(prev) = seen[m.shard.index] {
            bail!("{} and {} are both shard {}: the parts overlap; give each shard's folder once", prev.display(), d.display(), m.shard);
        }
        seen[m.shard.index] = Some(d);
        if m.units_covered != m.shard.count_of(m.units_total) {
            bail!(
                "{} covers {} units, but shard {} of {} units owns {}; rerun that shard",
                d.display(),
                m.units_covered,
                m.shard,
                m.units_total,
                m.shard.count_of(m.units_total)
            );
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&i| seen[i].is_none()).collect();
    if !missing.is_empty() {
        let list = missing.iter().map(|i| format!("{i}/{n}")).collect::<Vec<_>>().join(", ");
        let example = rerun_of(&m0.rerun, Shard { index: missing[0], count: n });
        bail!(
            "shard{} {list} of this sweep {} missing: run {} (e.g. `{example}`, with its own --out), then merge every part again",
            if missing.len() > 1 { "s" } else { "" },
            if missing.len() > 1 { "are" } else { "is" },
            if missing.len() > 1 { "them" } else { "it" }
        );
    }
    Ok(())
}

/// The first 12 characters of a hash.
fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// A manifest's rerun line with another shard (and the output folder left as written).
fn rerun_of(line: &str, shard: Shard) -> String {
    let mut words: Vec<String> = line.split(' ').map(String::from).collect();
    if let Some(i) = words.iter().position(|a| a == "--shard") {
        if i + 1 < words.len() {
            words[i + 1] = shard.to_string();
        }
    }
    words.join(" ")
}

/// Values of a sharded result as they travel in a part: `None` where the shard does not own the
/// unit (and where an owned score is NaN).
pub fn to_part_values(v: &[f64]) -> Vec<Option<f64>> {
    v.iter().map(|x| if x.is_nan() { None } else { Some(*x) }).collect()
}

/// Join the parts' values of one result (units `offset..offset + len` of the sweep): each
/// unit's value comes from the shard that owns it; a unit another shard filled is an error.
pub fn join_values(parts: &[&[Option<f64>]], offset: usize) -> Result<Vec<f64>> {
    let n = parts.len();
    let len = parts[0].len();
    if parts.iter().any(|p| p.len() != len) {
        bail!("the parts hold results of different sizes; they are not shards of one sweep");
    }
    let mut out = Vec::with_capacity(len);
    for u in 0..len {
        let owner = (offset + u) % n;
        for (i, p) in parts.iter().enumerate() {
            if i != owner && p[u].is_some() {
                bail!("shard {i}/{n} holds unit {} that shard {owner}/{n} owns; the parts were not written by the same version of ferrolens", offset + u);
            }
        }
        out.push(parts[owner][u].unwrap_or(f64::NAN));
    }
    Ok(out)
}
