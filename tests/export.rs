//! `save_hf_dir` / `ferrolens models export`: a model written as a Hugging Face directory loads
//! back with the same weights, logits and tokenizer.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use ferrolens::model::{load_hf_dir, save_hf_dir, ExportWeights, LoadOptions};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("export").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// GPT-2: the exported tensors are the fixture's own tensors (same names, shapes and values,
/// fused c_attn included), and the reloaded model gives identical logits.
#[test]
fn gpt2_export_reproduces_the_checkpoint() {
    let m = tiny_gpt2(DType::F32);
    let dir = tmp("tiny-gpt2");
    let files = save_hf_dir(&m, &dir, ExportWeights::Dtype(DType::F32)).unwrap();
    assert_eq!(files.len(), 2, "config and weights (the fixture has no tokenizer): {files:?}");
    let orig = candle_core::safetensors::load(fixtures().join("tiny-gpt2/model.safetensors"), &Device::Cpu).unwrap();
    let out = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<_> = out.keys().cloned().collect();
    names.sort();
    let mut want: Vec<_> = orig.keys().filter(|k| !k.ends_with(".attn.bias") && !k.ends_with("masked_bias")).cloned().collect();
    want.sort();
    assert_eq!(names, want);
    for n in &names {
        assert_eq!(out[n].dims(), orig[n].dims(), "{n}");
        assert_eq!(max_abs(&out[n], &orig[n]), 0.0, "{n}");
    }
    let back = load_hf_dir(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(back.cfg.d_mlp, m.cfg.d_mlp);
    assert_eq!(back.cfg.n_ctx, m.cfg.n_ctx);
    let (clean, _) = tiny_pair();
    assert_eq!(max_abs(&m.forward(&clean).unwrap(), &back.forward(&clean).unwrap()), 0.0);
}

/// SmolLM2 from its GGUF: f32 export reloads to the same logits (q/k in Hugging Face order, tied
/// embeddings), the exported tokenizer.json encodes like the GGUF tokenizer, config.json's BOS
/// reaches the tokenizer; `none` writes config and tokenizer only; bf16 writes bf16; f64 is refused.
#[test]
fn smollm2_export_roundtrips() {
    let m = smollm2();
    let dir = tmp("smollm2");
    save_hf_dir(m, &dir, ExportWeights::Dtype(DType::F32)).unwrap();
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!st.contains_key("lm_head.weight"), "tied embeddings: no lm_head");
    assert_eq!(st["model.layers.0.self_attn.k_proj.weight"].dims(), &[3 * 64, 576]);
    assert_eq!(st["model.layers.0.mlp.gate_proj.weight"].dims(), &[1536, 576]);
    assert_eq!(st.len(), 30 * 9 + 2);
    let back = load_hf_dir(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(back.cfg.n_kv_heads, 3);
    assert!(back.cfg.tied_embeddings);
    let tok = m.tokenizer().unwrap();
    let tok2 = back.tokenizer().unwrap();
    assert_eq!(tok2.bos_id(), m.cfg.bos_token_id, "BOS from config.json");
    for text in [
        "When Mary and John went to the store, John gave a drink to",
        "<|im_start|>user\nIn 1987, 12345 apples cost $3.50 each?<|im_end|>\n<|im_start|>assistant\n",
        "  naïve café — 東京 🙂\t\ttabs",
    ] {
        assert_eq!(tok.encode(text).unwrap(), tok2.encode(text).unwrap(), "{text:?}");
    }
    let ids = Tensor::new(tok.encode_with_bos("The capital of France is").unwrap(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let d = max_abs(&m.forward(&ids).unwrap(), &back.forward(&ids).unwrap());
    assert!(d < 1e-4, "reloaded logits differ by {d}");

    let cfg_only = tmp("smollm2-config");
    let files = save_hf_dir(m, &cfg_only, ExportWeights::None).unwrap();
    assert_eq!(files.iter().map(|f| f.file_name().unwrap().to_str().unwrap()).collect::<Vec<_>>(), ["config.json", "tokenizer.json"]);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cfg_only.join("config.json")).unwrap()).unwrap();
    assert_eq!(j["model_type"], "llama");
    assert_eq!(j["num_key_value_heads"], 3);
    assert_eq!(j["rope_theta"].as_f64().unwrap(), 100000.0);

    let e = save_hf_dir(m, &tmp("smollm2-f64"), ExportWeights::Dtype(DType::F64)).unwrap_err().to_string();
    assert!(e.contains("f32, f16 or bf16"), "{e}");
}

/// bf16 export of the tiny GPT-2 holds bf16 tensors that round the f32 weights.
#[test]
fn bf16_export_rounds_the_weights() {
    let m = tiny_gpt2(DType::F32);
    let dir = tmp("tiny-gpt2-bf16");
    save_hf_dir(&m, &dir, ExportWeights::Dtype(DType::BF16)).unwrap();
    let out = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let w = &out["transformer.wte.weight"];
    assert_eq!(w.dtype(), DType::BF16);
    assert_eq!(max_abs(w, &m.w.embed.to_dtype(DType::BF16).unwrap()), 0.0);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(j["torch_dtype"], "bfloat16");
}

/// fixtures/smollm2/synthetic_spec.json (the stand-in that scripts/gpu-check.sh builds on GPU
/// machines, which cannot take the 98 MB GGUF) describes SmolLM2 as exported: the same config,
/// tensor names and shapes, the norm gains exactly, each matrix's mean and std.
#[test]
fn synthetic_spec_matches_smollm2() {
    let m = smollm2();
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2/synthetic_spec.json")).unwrap()).unwrap();
    assert_eq!(spec["config"], ferrolens::model::export::hf_config(m, DType::F32).unwrap());
    let tensors = ferrolens::model::export::hf_tensors(m, DType::F32).unwrap();
    let st = spec["tensors"].as_object().unwrap();
    let mut names: Vec<_> = st.keys().cloned().collect();
    names.sort();
    let mut want: Vec<_> = tensors.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want);
    for (name, t) in &tensors {
        let s = &st[name];
        let shape: Vec<usize> = s["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(shape, t.dims(), "{name}");
        let v: Vec<f64> = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        if let Some(vals) = s["values"].as_array() {
            let vals: Vec<f64> = vals.iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(vals, v, "{name}: norm gains");
        } else {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            assert!((mean - s["mean"].as_f64().unwrap()).abs() < 1e-9, "{name}: mean");
            assert!((std / s["std"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{name}: std");
        }
    }
}
