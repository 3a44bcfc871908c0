//! Writing a model back out as a Hugging Face directory (`config.json`, `tokenizer.json`,
//! `model.safetensors`), e.g. to load a GGUF checkpoint's dequantized weights in `transformers`
//! or TransformerLens and compare numbers, or to ship only the config and tokenizer
//! ([`ExportWeights::None`]).
//!
//! The layout is the one [`crate::load_hf_dir`] reads: Llama models as `LlamaForCausalLM`
//! (`nn.Linear` weights `[out, in]`, q/k in Hugging Face's rotate-half order), GPT-2 as
//! `GPT2LMHeadModel` (`Conv1D` weights `[in, out]`, q/k/v fused in `c_attn`). Loading the
//! directory back gives the same logits as the source model (tests/export.rs).

use crate::config::{Activation, Arch, Positional};
use crate::error::{Error, Result};
use crate::transformer::HookedTransformer;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Which weights [`save_hf_dir`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportWeights {
    /// `model.safetensors` in this dtype (F32, F16 or BF16).
    Dtype(DType),
    /// No weights: `config.json` and `tokenizer.json` only.
    None,
}

/// The `config.json` of `model` (Hugging Face field names).
pub fn hf_config(model: &HookedTransformer, dtype: DType) -> Result<serde_json::Value> {
    let c = &model.cfg;
    let dt = match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => return Err(Error::Input(format!("cannot export weights as {other:?}; use f32, f16 or bf16"))),
    };
    Ok(match c.arch {
        Arch::Llama => {
            let Positional::Rotary { base, dim } = c.positional else {
                return Err(Error::Config("a llama model without rotary embeddings cannot be exported".into()));
            };
            if dim != c.d_head {
                return Err(Error::Config(format!("partial rotary ({dim} of {} features) has no LlamaForCausalLM field", c.d_head)));
            }
            let b0 = &model.w.blocks[0];
            serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": c.d_model,
                "intermediate_size": c.d_mlp,
                "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads,
                "num_key_value_heads": c.n_kv_heads,
                "head_dim": c.d_head,
                "vocab_size": c.d_vocab,
                "max_position_embeddings": c.n_ctx,
                "rms_norm_eps": c.eps,
                "rope_theta": base,
                "rope_scaling": null,
                "hidden_act": "silu",
                "attention_bias": b0.attn.b_q.is_some(),
                "mlp_bias": false,
                "tie_word_embeddings": c.tied_embeddings,
                "bos_token_id": c.bos_token_id,
                "eos_token_id": c.eos_token_id,
                "torch_dtype": dt,
            })
        }
        Arch::Gpt2 => serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": c.d_model,
            "n_head": c.n_heads,
            "n_layer": c.n_layers,
            "n_inner": c.d_mlp,
            "n_positions": c.n_ctx,
            "n_ctx": c.n_ctx,
            "vocab_size": c.d_vocab,
            "layer_norm_epsilon": c.eps,
            "activation_function": if c.act == Activation::Gelu { "gelu" } else { "gelu_new" },
            "tie_word_embeddings": c.tied_embeddings,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "torch_dtype": dt,
        }),
    })
}

/// The weights of `model` under Hugging Face names, in `dtype`, on the CPU.
pub fn hf_tensors(model: &HookedTransformer, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let c = &model.cfg;
    let w = &model.w;
    let mut out = HashMap::new();
    let mut put = |name: String, t: &Tensor| -> Result<()> {
        out.insert(name, t.to_device(&candle_core::Device::Cpu)?.to_dtype(dtype)?.contiguous()?);
        Ok(())
    };
    // Our matrices are `[in, out]`; nn.Linear stores `[out, in]`.
    let lin = |t: &Tensor| -> Result<Tensor> { Ok(t.t()?.contiguous()?) };
    match c.arch {
        Arch::Llama => {
            put("model.embed_tokens.weight".into(), &w.embed)?;
            for (l, b) in w.blocks.iter().enumerate() {
                let p = format!("model.layers.{l}");
                put(format!("{p}.input_layernorm.weight"), &b.ln1.w)?;
                put(format!("{p}.post_attention_layernorm.weight"), &b.ln2.w)?;
                for (n, m, bias) in [
                    ("q_proj", &b.attn.w_q, &b.attn.b_q),
                    ("k_proj", &b.attn.w_k, &b.attn.b_k),
                    ("v_proj", &b.attn.w_v, &b.attn.b_v),
                    ("o_proj", &b.attn.w_o, &b.attn.b_o),
                ] {
                    put(format!("{p}.self_attn.{n}.weight"), &lin(m)?)?;
                    if let Some(bias) = bias {
                        put(format!("{p}.self_attn.{n}.bias"), bias)?;
                    }
                }
                let gate = b.mlp.w_gate.as_ref().ok_or_else(|| Error::Config("a llama MLP without gate_proj".into()))?;
                put(format!("{p}.mlp.gate_proj.weight"), &lin(gate)?)?;
                put(format!("{p}.mlp.up_proj.weight"), &lin(&b.mlp.w_in)?)?;
                put(format!("{p}.mlp.down_proj.weight"), &lin(&b.mlp.w_out)?)?;
            }
            put("model.norm.weight".into(), &w.ln_final.w)?;
            if !c.tied_embeddings {
                put("lm_head.weight".into(), &lin(&w.unembed)?)?;
            }
        }
        Arch::Gpt2 => {
            let need = |t: &Option<Tensor>, what: &str| -> Result<Tensor> {
                t.clone().ok_or_else(|| Error::Config(format!("GPT-2 export needs the {what} bias")))
            };
            put("transformer.wte.weight".into(), &w.embed)?;
            let wpe = w.pos_embed.as_ref().ok_or_else(|| Error::Config("GPT-2 export needs W_pos".into()))?;
            put("transformer.wpe.weight".into(), wpe)?;
            for (l, b) in w.blocks.iter().enumerate() {
                let p = format!("transformer.h.{l}");
                put(format!("{p}.ln_1.weight"), &b.ln1.w)?;
                put(format!("{p}.ln_1.bias"), &need(&b.ln1.b, "ln_1")?)?;
                put(format!("{p}.ln_2.weight"), &b.ln2.w)?;
                put(format!("{p}.ln_2.bias"), &need(&b.ln2.b, "ln_2")?)?;
                // Conv1D keeps `[in, out]`: q, k, v side by side.
                put(format!("{p}.attn.c_attn.weight"), &Tensor::cat(&[&b.attn.w_q, &b.attn.w_k, &b.attn.w_v], 1)?)?;
                let (bq, bk, bv) = (need(&b.attn.b_q, "q")?, need(&b.attn.b_k, "k")?, need(&b.attn.b_v, "v")?);
                put(format!("{p}.attn.c_attn.bias"), &Tensor::cat(&[&bq, &bk, &bv], 0)?)?;
                put(format!("{p}.attn.c_proj.weight"), &b.attn.w_o)?;
                put(format!("{p}.attn.c_proj.bias"), &need(&b.attn.b_o, "attention output")?)?;
                put(format!("{p}.mlp.c_fc.weight"), &b.mlp.w_in)?;
                put(format!("{p}.mlp.c_fc.bias"), &need(&b.mlp.b_in, "c_fc")?)?;
                put(format!("{p}.mlp.c_proj.weight"), &b.mlp.w_out)?;
                put(format!("{p}.mlp.c_proj.bias"), &need(&b.mlp.b_out, "MLP output")?)?;
            }
            put("transformer.ln_f.weight".into(), &w.ln_final.w)?;
            put("transformer.ln_f.bias".into(), &need(&w.ln_final.b, "ln_f")?)?;
            if !c.tied_embeddings {
                put("lm_head.weight".into(), &lin(&w.unembed)?)?;
            }
        }
    }
    Ok(out)
}

/// Write `model` as a Hugging Face directory `dir` (created if missing): `config.json`,
/// `tokenizer.json` when the model has a tokenizer, and `model.safetensors` unless `weights` is
/// [`ExportWeights::None`]. Returns the files written.
pub fn save_hf_dir(model: &HookedTransformer, dir: &Path, weights: ExportWeights) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dtype = match weights {
        ExportWeights::Dtype(d) => d,
        ExportWeights::None => DType::F32,
    };
    let cfg = hf_config(model, dtype)?;
    let mut files = vec![];
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).map_err(|e| Error::io(&p, e))?;
    files.push(p);
    if let Some(tok) = &model.tokenizer {
        let p = dir.join("tokenizer.json");
        tok.save(&p)?;
        files.push(p);
    }
    if let ExportWeights::Dtype(dt) = weights {
        let p = dir.join("model.safetensors");
        candle_core::safetensors::save(&hf_tensors(model, dt)?, &p)
            .map_err(|e| Error::Weights(format!("cannot write {}: {e}", p.display())))?;
        files.push(p);
    }
    Ok(files)
}
