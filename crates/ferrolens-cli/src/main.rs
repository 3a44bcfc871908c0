//! The `ferrolens` command-line tool.

mod cmd_bench;
mod cmd_cache;
mod cmd_circuits;
mod cmd_data;
mod cmd_device;
mod cmd_discover;
mod cmd_formats;
mod cmd_heads;
mod cmd_merge;
mod cmd_models;
mod cmd_overlap;
mod cmd_patch;
mod cmd_path;
mod cmd_plan;
mod cmd_run;
mod discover_report;
mod parts;
mod study;

use clap::{Parser, Subcommand};

/// ferrolens: a mechanistic-interpretability workbench (hooked transformers, patching, circuits).
#[derive(Parser)]
#[command(name = "ferrolens", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Device for the model: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// Split the model's layers across devices (a pipeline: contiguous blocks of layers a device,
    /// the residual moved at the boundaries), e.g. `cuda:0,cuda:1`; `ferrolens plan` shows the
    /// memory per device first. Replaces --device.
    #[arg(long, global = true, value_delimiter = ',')]
    devices: Vec<String>,
    /// Weight dtype: f32, bf16 or f16 (GPU; norms and softmax still run in f32), or f64.
    #[arg(long, global = true, default_value = "f32")]
    dtype: String,
}

/// Where and in which dtype `load_model` puts the weights (from `--device` / `--dtype`).
pub(crate) static LOAD_OPTIONS: std::sync::OnceLock<ferrolens_model::LoadOptions> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Cmd {
    /// Next-token top-k with logits for a prompt.
    Run(cmd_run::Args),
    /// Write cached activations of prompts to a safetensors file.
    Cache(cmd_cache::Args),
    /// Activation patching, AtP and RelP on a JSONL file of prompt pairs.
    Patch(cmd_patch::Args),
    /// A circuit-discovery study on a task, with an HTML report.
    Discover(cmd_discover::Args),
    /// Head scores: `heads detect` (previous-token, duplicate-token, induction).
    Heads(cmd_heads::Args),
    /// Path patching of a sender head into receiver head inputs.
    PathPatch(cmd_path::Args),
    /// Circuit evaluation: `circuits eval` (MIB's CPR and CMD for node and edge methods).
    Circuits(cmd_circuits::Args),
    /// Colored Objects accuracy over prompt formats (objects, shots, wording).
    Formats(cmd_formats::Args),
    /// Heads shared by two circuits (circuit.json files of `discover`).
    Overlap(cmd_overlap::Args),
    /// Join the parts of a sharded sweep (`--shard I/N`) into the outputs of an unsharded run.
    Merge(cmd_merge::Args),
    /// Memory per device of a model from its configuration alone (weights, activations, KV cache).
    Plan(cmd_plan::Args),
    /// Write a built-in task's prompt pairs as JSONL.
    Data(cmd_data::Args),
    /// Time forwards, sweeps and attribution (JSON, for docs/benchmarks.md).
    Bench(cmd_bench::Args),
    /// List, fetch or export models (as Hugging Face directories).
    Models(cmd_models::Args),
    /// Compare --device/--dtype against the CPU in f32: logits, caches, patching, AtP/RelP, decoding.
    DeviceCheck(cmd_device::Args),
    /// Print the devices and build features.
    Info,
}

fn main() {
    // Freed tensors' memory back to the heap for the next op, not to the kernel (src/alloc.rs).
    ferrolens_model::alloc::keep_freed_memory();
    let cli = Cli::parse();
    // `plan` reads configurations only: its --devices need not exist on this machine.
    let opts = match cli.cmd {
        Cmd::Plan(_) => ferrolens_model::parse_dtype(&cli.dtype).map(|d| ferrolens_model::LoadOptions::on(ferrolens_model::Device::Cpu, d)),
        _ => load_options(&cli.device, &cli.devices, &cli.dtype),
    };
    match opts {
        Ok(o) => {
            let _ = LOAD_OPTIONS.set(o);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
    let res = match cli.cmd {
        Cmd::Run(a) => cmd_run::run(a),
        Cmd::Cache(a) => cmd_cache::run(a),
        Cmd::Models(a) => cmd_models::run(a),
        Cmd::Patch(a) => cmd_patch::run(a),
        Cmd::Discover(a) => cmd_discover::run(a),
        Cmd::Circuits(a) => cmd_circuits::run(a),
        Cmd::Formats(a) => cmd_formats::run(a),
        Cmd::Data(a) => cmd_data::run(a),
        Cmd::Merge(a) => cmd_merge::run(a),
        Cmd::Plan(a) => cmd_plan::run(a, &cli.devices),
        Cmd::Overlap(a) => cmd_overlap::run(a),
        Cmd::Heads(a) => cmd_heads::run(a),
        Cmd::PathPatch(a) => cmd_path::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::DeviceCheck(a) => cmd_device::run(a),
        Cmd::Info => info(),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `--device`/`--devices`/`--dtype` as load options.
fn load_options(device: &str, devices: &[String], dtype: &str) -> ferrolens_model::Result<ferrolens_model::LoadOptions> {
    let dtype = ferrolens_model::parse_dtype(dtype)?;
    if devices.is_empty() {
        return Ok(ferrolens_model::LoadOptions::on(ferrolens_model::parse_device(device)?, dtype));
    }
    if device.trim() != "cpu" {
        return Err(ferrolens_model::Error::Input(format!(
            "--device {device} and --devices {} were both given; --devices names every device, the first holding the embedding: drop --device",
            devices.join(",")
        )));
    }
    let devs = devices.iter().map(|d| ferrolens_model::parse_device(d)).collect::<ferrolens_model::Result<Vec<_>>>()?;
    Ok(ferrolens_model::LoadOptions::on(devs[0].clone(), dtype).split(&devs))
}

fn info() -> anyhow::Result<()> {
    println!("ferrolens {}", env!("CARGO_PKG_VERSION"));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let devices: Vec<String> =
        ferrolens_model::available_devices().into_iter().map(|d| if d == "cpu" { format!("cpu ({threads} threads)") } else { d }).collect();
    println!("devices: {}", devices.join(", "));
    if !ferrolens_model::device::CUDA_BUILT {
        println!("cuda: not built in (scripts/cuda-env.sh cargo build --release --features cuda)");
    } else if devices.len() > 1 {
        println!("cuda: built in");
    } else {
        // Say why no GPU opened (no driver, no device, a library mismatch).
        let why = match ferrolens_model::Device::new_cuda(0) {
            Err(e) => e.to_string(),
            Ok(_) => "cuda:0 opened on a second try".into(),
        };
        println!("cuda: built in, but no GPU opened: {}", why.lines().next().unwrap_or(""));
    }
    println!("models dir: {}", ferrolens_model::registry::models_dir().display());
    println!("families (config.json model_type / GGUF architecture):");
    for f in ferrolens_model::arch::FAMILIES {
        let gguf = if f.gguf_archs.is_empty() { "-".to_string() } else { f.gguf_archs.join(", ") };
        println!("  {:<9} {:<22} {:<8} {}", f.name, f.hf_model_types.join(", "), gguf, f.about);
    }
    Ok(())
}

/// A progress bar on stderr (hidden with `--quiet`).
/// Run `f`, which writes into the folder `out`: the folder is created first, and removed again
/// when `f` fails and the folder did not exist before (a failed command leaves no empty results).
pub(crate) fn in_new_dir<T>(out: &std::path::Path, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let existed = out.exists();
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("creating the output folder {}: {e}", out.display()))?;
    let r = f();
    if r.is_err() && !existed {
        std::fs::remove_dir_all(out).ok();
    }
    r
}

pub(crate) fn progress_bar(quiet: bool, what: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(0);
    b.set_style(indicatif::ProgressStyle::with_template("{msg:>18} {bar:40} {pos}/{len} {elapsed}/{duration}").unwrap());
    b.set_message(what.to_string());
    b
}

/// Load a model by name, path or hub id (shared by the subcommands).
pub(crate) fn load_model(spec: &str) -> anyhow::Result<ferrolens_model::HookedTransformer> {
    let opts = LOAD_OPTIONS.get().cloned().unwrap_or_default();
    Ok(ferrolens_model::load(spec, &opts)?)
}
