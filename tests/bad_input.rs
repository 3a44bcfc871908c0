//! Bad input gives an error that says what to do; nothing panics.

mod common;
use candle_core::DType;
use common::*;
use ferrolens::model::{load, load_gguf, load_hf_dir, HookPoint, Hooks, LoadOptions};
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrolens-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_tiny(to: &std::path::Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-gpt2").join(f), to.join(f)).unwrap();
    }
}

#[test]
fn truncated_safetensors() {
    let d = scratch("trunc-st");
    copy_tiny(&d);
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_hf_dir(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("truncated or corrupt") && e.contains("model.safetensors"), "{e}");
    std::fs::write(&f, &bytes[..5]).unwrap();
    let e = load_hf_dir(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn missing_weights_and_config() {
    let d = scratch("missing");
    let e = load_hf_dir(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("no config.json"), "{e}");
    std::fs::copy(fixtures().join("tiny-gpt2/config.json"), d.join("config.json")).unwrap();
    let e = load_hf_dir(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
    let e = load("no-such-model", &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not a known model name") && e.contains("smollm2-135m"), "{e}");
}

#[test]
fn config_that_does_not_match_the_weights() {
    let d = scratch("mismatch");
    copy_tiny(&d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    // Wrong number of layers: the third block's tensors are missing.
    std::fs::write(d.join("config.json"), cfg.replace("\"n_layer\": 2", "\"n_layer\": 3")).unwrap();
    let e = load_hf_dir(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("h.2") && e.contains("missing"), "{e}");
    // Wrong width.
    std::fs::write(d.join("config.json"), cfg.replace("\"n_embd\": 64", "\"n_embd\": 128")).unwrap();
    let e = load_hf_dir(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("config.json implies") || e.contains("do not match the config"), "{e}");
    // Wrong vocabulary size: caught by the shape check.
    std::fs::write(d.join("config.json"), cfg.replace("\"vocab_size\": 1000", "\"vocab_size\": 999")).unwrap();
    let e = load_hf_dir(&d, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("do not match the config") && e.contains("embed"), "{e}");
}

#[test]
fn truncated_gguf() {
    let src = ferrolens::model::registry::ensure(ferrolens::model::registry::find("smollm2-135m").unwrap()).unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let d = scratch("trunc-gguf");
    for (len, what) in [(20_000_000usize, "tensor data cut"), (1_000, "header cut")] {
        let f = d.join("cut.gguf");
        std::fs::write(&f, &bytes[..len]).unwrap();
        let e = load_gguf(&f, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("truncated or corrupt"), "{what}: {e}");
    }
    let f = d.join("junk.gguf");
    std::fs::write(&f, b"not a gguf file at all").unwrap();
    let e = load_gguf(&f, &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not a readable GGUF"), "{e}");
}

#[test]
fn unknown_hooks_and_layers() {
    let model = tiny_gpt2(DType::F32);
    let e = model.hook("blocks.0.attn.hook_patern").unwrap_err().to_string();
    assert!(e.contains("did you mean `blocks.0.attn.hook_pattern`"), "{e}");
    let e = model.hook("blocks.7.hook_resid_pre").unwrap_err().to_string();
    assert!(e.contains("2 layers"), "{e}");
    let e = model.hook("blocks.0.attn.hook_rot_q").unwrap_err().to_string();
    assert!(e.contains("gpt2 models have no such hook"), "{e}");
    let e = Hooks::new().cache("blocks.0.mlp.hook_postt").err().unwrap().to_string();
    assert!(e.contains("blocks.0.mlp.hook_post"), "{e}");
    let tokens = model.tokens_tensor(&[vec![1, 2, 3]]).unwrap();
    let e = model.run(&tokens, &mut Hooks::new().grad(&[HookPoint::Z(5)])).unwrap_err().to_string();
    assert!(e.contains("blocks.5.attn.hook_z"), "{e}");
}

#[test]
fn prompts_past_the_context_and_bad_batches() {
    let model = tiny_gpt2(DType::F32);
    let long = model.tokens_tensor(&[vec![5; 65]]).unwrap();
    let e = model.forward(&long).unwrap_err().to_string();
    assert!(e.contains("65 tokens") && e.contains("at most 64"), "{e}");
    let e = model.tokens_tensor(&[vec![1, 2, 3], vec![1, 2]]).unwrap_err().to_string();
    assert!(e.contains("equal lengths"), "{e}");
    let oov = model.tokens_tensor(&[vec![1, 5000]]).unwrap();
    let e = model.forward(&oov).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = model.tokens_tensor(&[vec![]]).unwrap_err().to_string();
    assert!(e.contains("empty prompt"), "{e}");
    let e = model.to_tokens(&["hi"]).unwrap_err().to_string();
    assert!(e.contains("without a tokenizer"), "{e}");
}
