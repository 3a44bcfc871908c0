//! `ferrolens run`: next-token top-k.

use candle_core::{IndexOp, D};

/// Arguments of `ferrolens run`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a registry name (smollm2-135m), a .gguf file, a HF directory or a hub id.
    #[arg(long, default_value = ferrolens_model::registry::DEFAULT_MODEL)]
    model: String,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// How many next-token candidates to print.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Prepend the BOS token (Gemma models always get it).
    #[arg(long)]
    bos: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.top_k == 0 {
        anyhow::bail!("--top-k 0 would print no candidates; give --top-k 1 or more");
    }
    let model = crate::load_model(&a.model)?;
    let tok = model.tokenizer()?;
    let ids = if a.bos && !tok.prepends_bos() { tok.encode_with_bos(&a.prompt)? } else { tok.encode_prompt(&a.prompt)? };
    let tokens = model.tokens_tensor(std::slice::from_ref(&ids))?;
    let logits = model.forward(&tokens)?;
    let last = logits.i((0, ids.len() - 1))?.to_dtype(candle_core::DType::F32)?;
    let logprobs = candle_nn::ops::log_softmax(&last, D::Minus1)?.to_vec1::<f32>()?;
    let last = last.to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&x, &y| last[y].total_cmp(&last[x]));
    let top: Vec<serde_json::Value> = order
        .iter()
        .take(a.top_k)
        .map(|&i| {
            serde_json::json!({"token_id": i, "token": tok.decode(&[i as u32]).unwrap_or_default(),
                               "logit": last[i], "prob": logprobs[i].exp()})
        })
        .collect();
    if a.json {
        let out = serde_json::json!({"model": model.cfg.name, "prompt": a.prompt, "n_tokens": ids.len(), "top_k": top});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{} | {} tokens", model.cfg.name, ids.len());
        println!("{:>4}  {:>8}  {:>8}  {:>7}  token", "rank", "id", "logit", "prob");
        for (r, t) in top.iter().enumerate() {
            println!(
                "{:>4}  {:>8}  {:>8.3}  {:>7.4}  {:?}",
                r + 1,
                t["token_id"].as_u64().unwrap_or(0),
                t["logit"].as_f64().unwrap_or(0.0),
                t["prob"].as_f64().unwrap_or(0.0),
                t["token"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
