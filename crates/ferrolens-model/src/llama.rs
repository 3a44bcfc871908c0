//! Llama family: RMSNorm, rotate-half rotary embeddings, grouped-query attention, SwiGLU MLP,
//! tied or untied unembedding. Reads Hugging Face `LlamaForCausalLM` checkpoints and llama.cpp GGUF files.

use crate::config::{Activation, Arch, Config, NormKind, Positional};
use crate::error::{Error, Result};
use crate::loader::{gguf_num, t_in_out, LoadOptions, TensorSource};
use crate::transformer::{AttnWeights, BlockWeights, MlpWeights, NormWeights, Weights};
use candle_core::quantized::gguf_file;
use candle_core::Tensor;
use std::collections::HashMap;

fn num(j: &serde_json::Value, key: &str) -> Result<usize> {
    j[key].as_u64().map(|v| v as usize).ok_or_else(|| Error::Config(format!("config.json lacks the integer `{key}`")))
}

/// A [`Config`] from a Llama-family `config.json`.
pub fn config_from_hf(j: &serde_json::Value, name: &str) -> Result<Config> {
    if !j["rope_scaling"].is_null() {
        return Err(Error::Config(format!(
            "rope_scaling {} is not supported yet; ferrolens implements plain rotary embeddings",
            j["rope_scaling"]
        )));
    }
    match j["hidden_act"].as_str().unwrap_or("silu") {
        "silu" => {}
        other => return Err(Error::Config(format!("hidden_act `{other}` is not supported for llama models (silu)"))),
    }
    let d_model = num(j, "hidden_size")?;
    let n_heads = num(j, "num_attention_heads")?;
    let d_head = j["head_dim"].as_u64().map(|v| v as usize).unwrap_or(d_model / n_heads);
    Ok(Config {
        name: name.to_string(),
        arch: Arch::Llama,
        d_model,
        n_layers: num(j, "num_hidden_layers")?,
        n_heads,
        n_kv_heads: j["num_key_value_heads"].as_u64().map(|v| v as usize).unwrap_or(n_heads),
        d_head,
        d_mlp: num(j, "intermediate_size")?,
        d_vocab: num(j, "vocab_size")?,
        n_ctx: num(j, "max_position_embeddings")?,
        eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        norm: NormKind::RmsNorm,
        act: Activation::Silu,
        gated_mlp: true,
        positional: Positional::Rotary { base: j["rope_theta"].as_f64().unwrap_or(10000.0), dim: d_head },
        tied_embeddings: j["tie_word_embeddings"].as_bool().unwrap_or(false),
        bos_token_id: j["bos_token_id"].as_u64().map(|v| v as u32),
        eos_token_id: j["eos_token_id"].as_u64().map(|v| v as u32),
    })
}

/// Llama weights from Hugging Face safetensors (`model.layers.N.self_attn.q_proj.weight`, ...).
pub fn weights_hf(cfg: &Config, src: &TensorSource, opts: &LoadOptions) -> Result<Weights> {
    let (dt, dev) = (opts.dtype, &opts.device);
    let get = |n: &str| src.get(n, dt, dev);
    let lin = |n: &str| -> Result<Tensor> { t_in_out(get(n)?) };
    let opt = |n: &str| src.opt(n, dt, dev);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        blocks.push(BlockWeights {
            ln1: NormWeights { w: get(&format!("{p}.input_layernorm.weight"))?, b: None },
            attn: AttnWeights {
                w_q: lin(&format!("{p}.self_attn.q_proj.weight"))?,
                b_q: opt(&format!("{p}.self_attn.q_proj.bias"))?,
                w_k: lin(&format!("{p}.self_attn.k_proj.weight"))?,
                b_k: opt(&format!("{p}.self_attn.k_proj.bias"))?,
                w_v: lin(&format!("{p}.self_attn.v_proj.weight"))?,
                b_v: opt(&format!("{p}.self_attn.v_proj.bias"))?,
                w_o: lin(&format!("{p}.self_attn.o_proj.weight"))?,
                b_o: opt(&format!("{p}.self_attn.o_proj.bias"))?,
            },
            ln2: NormWeights { w: get(&format!("{p}.post_attention_layernorm.weight"))?, b: None },
            mlp: MlpWeights {
                w_in: lin(&format!("{p}.mlp.up_proj.weight"))?,
                b_in: None,
                w_gate: Some(lin(&format!("{p}.mlp.gate_proj.weight"))?),
                w_out: lin(&format!("{p}.mlp.down_proj.weight"))?,
                b_out: None,
            },
        });
    }
    let embed = get("model.embed_tokens.weight")?;
    let unembed = match (cfg.tied_embeddings, opt("lm_head.weight")?) {
        (false, Some(w)) => t_in_out(w)?,
        (_, _) => t_in_out(embed.clone())?,
    };
    Ok(Weights { embed, pos_embed: None, blocks, ln_final: NormWeights { w: get("model.norm.weight")?, b: None }, unembed, b_u: None })
}

/// A [`Config`] from llama.cpp GGUF metadata (`llama.*` keys).
pub fn config_from_gguf(md: &HashMap<String, gguf_file::Value>, name: &str) -> Result<Config> {
    let n = |k: &str| gguf_num(md, &format!("llama.{k}"));
    let d_model = n("embedding_length")? as usize;
    let n_heads = n("attention.head_count")? as usize;
    let d_head = d_model / n_heads;
    let d_vocab = match n("vocab_size") {
        Ok(v) => v as usize,
        Err(_) => md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| Error::Config("GGUF has neither llama.vocab_size nor a token list".into()))?,
    };
    Ok(Config {
        name: name.to_string(),
        arch: Arch::Llama,
        d_model,
        n_layers: n("block_count")? as usize,
        n_heads,
        n_kv_heads: n("attention.head_count_kv").map(|v| v as usize).unwrap_or(n_heads),
        d_head,
        d_mlp: n("feed_forward_length")? as usize,
        d_vocab,
        n_ctx: n("context_length")? as usize,
        eps: n("attention.layer_norm_rms_epsilon")?,
        norm: NormKind::RmsNorm,
        act: Activation::Silu,
        gated_mlp: true,
        positional: Positional::Rotary {
            base: n("rope.freq_base").unwrap_or(10000.0),
            dim: n("rope.dimension_count").map(|v| v as usize).unwrap_or(d_head),
        },
        tied_embeddings: true, // corrected by weights_gguf when output.weight exists
        bos_token_id: None,
        eos_token_id: md.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()),
    })
}

/// Undo llama.cpp's Q/K permutation: its converter reorders each head's rows from
/// rotate-half `[2, d/2]` to interleaved `[d/2, 2]`. `w` is `[n_head*d, in]`.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = out / n_head;
    Ok(w.reshape((n_head, d / 2, 2, inp))?.transpose(1, 2)?.reshape((out, inp))?)
}

/// Llama weights from a GGUF file (`blk.N.attn_q.weight`, ...), dequantized.
pub fn weights_gguf(cfg: &Config, src: &TensorSource, opts: &LoadOptions) -> Result<Weights> {
    let (dt, dev) = (opts.dtype, &opts.device);
    let get = |n: &str| src.get(n, dt, dev);
    let lin = |n: &str| -> Result<Tensor> { t_in_out(get(n)?) };
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = format!("blk.{l}");
        let q = unpermute_qk(&get(&format!("{p}.attn_q.weight"))?, cfg.n_heads)?;
        let k = unpermute_qk(&get(&format!("{p}.attn_k.weight"))?, cfg.n_kv_heads)?;
        blocks.push(BlockWeights {
            ln1: NormWeights { w: get(&format!("{p}.attn_norm.weight"))?, b: None },
            attn: AttnWeights {
                w_q: t_in_out(q)?,
                b_q: None,
                w_k: t_in_out(k)?,
                b_k: None,
                w_v: lin(&format!("{p}.attn_v.weight"))?,
                b_v: None,
                w_o: lin(&format!("{p}.attn_output.weight"))?,
                b_o: None,
            },
            ln2: NormWeights { w: get(&format!("{p}.ffn_norm.weight"))?, b: None },
            mlp: MlpWeights {
                w_in: lin(&format!("{p}.ffn_up.weight"))?,
                b_in: None,
                w_gate: Some(lin(&format!("{p}.ffn_gate.weight"))?),
                w_out: lin(&format!("{p}.ffn_down.weight"))?,
                b_out: None,
            },
        });
    }
    let embed = get("token_embd.weight")?;
    let unembed = match src.opt("output.weight", dt, dev)? {
        Some(w) => t_in_out(w)?,
        None => t_in_out(embed.clone())?,
    };
    Ok(Weights { embed, pos_embed: None, blocks, ln_final: NormWeights { w: get("output_norm.weight")?, b: None }, unembed, b_u: None })
}
