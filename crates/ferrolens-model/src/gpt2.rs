//! GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, tied unembedding.
//! Reads Hugging Face `GPT2LMHeadModel` checkpoints (`config.json` + safetensors).

use crate::config::{Activation, Arch, Config, NormKind, Positional};
use crate::error::{Error, Result};
use crate::loader::{LoadOptions, TensorSource};
use crate::transformer::{AttnWeights, BlockWeights, MlpWeights, NormWeights, Weights};

fn num(j: &serde_json::Value, key: &str) -> Result<usize> {
    j[key].as_u64().map(|v| v as usize).ok_or_else(|| Error::Config(format!("config.json lacks the integer `{key}`")))
}

/// A [`Config`] from a GPT-2 `config.json`.
pub fn config_from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    let d_model = num(j, "n_embd")?;
    let n_heads = num(j, "n_head")?;
    if d_model % n_heads != 0 {
        return Err(Error::Config(format!("n_embd {d_model} is not divisible by n_head {n_heads}")));
    }
    let act = match j["activation_function"].as_str().unwrap_or("gelu_new") {
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluNew,
        "gelu" => Activation::Gelu,
        other => return Err(Error::Config(format!("GPT-2 activation `{other}` is not supported (gelu_new, gelu)"))),
    };
    Ok(Config {
        name: name.to_string(),
        arch: Arch::Gpt2,
        d_model,
        n_layers: num(j, "n_layer")?,
        n_heads,
        n_kv_heads: n_heads,
        d_head: d_model / n_heads,
        d_mlp: j["n_inner"].as_u64().map(|v| v as usize).unwrap_or(4 * d_model),
        d_vocab: num(j, "vocab_size")?,
        n_ctx: num(j, "n_positions").or_else(|_| num(j, "n_ctx"))?,
        eps: j["layer_norm_epsilon"].as_f64().unwrap_or(1e-5),
        norm: NormKind::LayerNorm,
        act,
        gated_mlp: false,
        positional: Positional::Learned,
        tied_embeddings: true,
        bos_token_id: j["bos_token_id"].as_u64().map(|v| v as u32),
        eos_token_id: j["eos_token_id"].as_u64().map(|v| v as u32),
    })
}

/// GPT-2 weights from a safetensors source (keys with or without the `transformer.` prefix).
/// GPT-2's `Conv1D` weights are already `[in, out]`.
pub fn weights(cfg: &Config, src: &TensorSource, opts: &LoadOptions) -> Result<Weights> {
    let prefix = if src.has("transformer.wte.weight") { "transformer." } else { "" };
    let (dt, dev) = (opts.dtype, &opts.device);
    let get = |n: &str| src.get(&format!("{prefix}{n}"), dt, dev);
    let norm = |n: &str| -> Result<NormWeights> { Ok(NormWeights { w: get(&format!("{n}.weight"))?, b: Some(get(&format!("{n}.bias"))?) }) };
    let d = cfg.d_model;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = format!("h.{l}");
        let c_attn = get(&format!("{p}.attn.c_attn.weight"))?;
        let c_attn_b = get(&format!("{p}.attn.c_attn.bias"))?;
        if c_attn.dims() != [d, 3 * d] {
            return Err(Error::Weights(format!(
                "{p}.attn.c_attn.weight has shape {:?}, config.json implies [{d}, {}]", c_attn.dims(), 3 * d
            )));
        }
        let cols = |i: usize| -> Result<_> { Ok(c_attn.narrow(1, i * d, d)?.contiguous()?) };
        let bias = |i: usize| -> Result<_> { Ok(c_attn_b.narrow(0, i * d, d)?.contiguous()?) };
        blocks.push(BlockWeights {
            ln1: norm(&format!("{p}.ln_1"))?,
            attn: AttnWeights {
                w_q: cols(0)?,
                b_q: Some(bias(0)?),
                w_k: cols(1)?,
                b_k: Some(bias(1)?),
                w_v: cols(2)?,
                b_v: Some(bias(2)?),
                w_o: get(&format!("{p}.attn.c_proj.weight"))?,
                b_o: Some(get(&format!("{p}.attn.c_proj.bias"))?),
            },
            ln2: norm(&format!("{p}.ln_2"))?,
            mlp: MlpWeights {
                w_in: get(&format!("{p}.mlp.c_fc.weight"))?,
                b_in: Some(get(&format!("{p}.mlp.c_fc.bias"))?),
                w_gate: None,
                w_out: get(&format!("{p}.mlp.c_proj.weight"))?,
                b_out: Some(get(&format!("{p}.mlp.c_proj.bias"))?),
            },
        });
    }
    let embed = get("wte.weight")?;
    let unembed = match src.opt("lm_head.weight", dt, dev)? {
        Some(w) => w.t()?.contiguous()?,
        None => embed.t()?.contiguous()?,
    };
    Ok(Weights {
        pos_embed: Some(get("wpe.weight")?),
        embed,
        blocks,
        ln_final: norm("ln_f")?,
        unembed,
        b_u: None,
    })
}
