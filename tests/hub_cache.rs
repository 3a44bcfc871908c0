//! Loading by hub id from a directory laid out like the Hugging Face hub cache
//! (`$HF_HOME/hub/models--ORG--NAME/{refs,snapshots,blobs}`), offline.

mod common;
use candle_core::IndexOp;
use common::*;
use ferrolens::model::{load, LoadOptions};

#[test]
fn loads_from_the_hub_cache_offline() {
    let home = std::env::temp_dir().join(format!("ferrolens-hfhome-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let repo = home.join("hub/models--ferrolens--tiny-gpt2");
    let hash = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(hash)).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    let files = [
        ("config.json", fixtures().join("tiny-gpt2/config.json")),
        ("model.safetensors", fixtures().join("tiny-gpt2/model.safetensors")),
        ("vocab.json", fixtures().join("gpt2-tokenizer/encoder.json")),
        ("merges.txt", fixtures().join("gpt2-tokenizer/vocab.bpe")),
    ];
    for (i, (name, src)) in files.iter().enumerate() {
        // Snapshots hold symlinks into blobs/, as the hub client writes them.
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::copy(src, &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), repo.join("snapshots").join(hash).join(name)).unwrap();
    }
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let model = load("ferrolens/tiny-gpt2", &LoadOptions::default()).unwrap();
    assert_eq!(model.cfg.name, "ferrolens/tiny-gpt2");
    let r = reference("tiny-gpt2/reference.safetensors");
    let tokens = ids(&r, "p0.input_ids");
    let logits = model.forward(&tokens).unwrap().i(0).unwrap();
    assert!(max_abs(&logits, &r["p0.logits"]) < 1e-4);
    // The tokenizer came from vocab.json + merges.txt.
    assert_eq!(model.tokenizer().unwrap().encode(" Mary").unwrap(), vec![5335]);

    // A revision that is not in the cache: a clear error, no network use.
    let e = load("ferrolens/tiny-gpt2@v2", &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains("no config.json"), "{e}");
    let e = load("nobody/nothing", &LoadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("nobody/nothing"), "{e}");
    std::fs::remove_dir_all(&home).ok();
}
