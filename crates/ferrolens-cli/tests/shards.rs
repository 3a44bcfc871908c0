//! `--shard I/N` and `ferrolens merge` (issue 16) on the default model: three shards merged are
//! the unsharded run's files; merge refuses parts of different sweeps, overlapping parts and a
//! missing shard (naming it); a killed shard rerun alone completes the merge.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ferrolens() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrolens"))
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn err(o: Output) -> String {
    assert!(!o.status.success(), "expected a refusal; stdout {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!e.contains("panicked") && !e.contains("RUST_BACKTRACE"), "{e}");
    e
}

/// A CSV as (key columns joined, score) rows.
fn csv(p: &Path) -> HashMap<String, f64> {
    let s = std::fs::read_to_string(p).unwrap();
    let mut lines = s.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let si = head.iter().position(|h| *h == "score").unwrap();
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let key = f.iter().enumerate().filter(|(i, _)| *i != si).map(|(_, v)| *v).collect::<Vec<_>>().join(",");
            (key, f[si].parse::<f64>().unwrap_or(f64::NAN))
        })
        .collect()
}

fn same_rows(a: &Path, b: &Path) {
    let (x, y) = (csv(a), csv(b));
    assert_eq!(x.len(), y.len(), "{} vs {}", a.display(), b.display());
    assert!(x.len() >= 60);
    for (k, v) in &x {
        let w = y.get(k).unwrap_or_else(|| panic!("row {k} missing from {}", b.display()));
        assert!((v - w).abs() < 1e-6, "{k}: {v} vs {w}");
    }
}

/// Two CSV files with the same cells, numbers within 1e-6.
fn same_table(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read_to_string(a).unwrap(), std::fs::read_to_string(b).unwrap());
    assert_eq!(x.lines().count(), y.lines().count(), "{} vs {}", a.display(), b.display());
    assert!(x.lines().count() > 2);
    for (l, m) in x.lines().zip(y.lines()) {
        for (c, d) in l.split(',').zip(m.split(',')) {
            match (c.parse::<f64>(), d.parse::<f64>()) {
                (Ok(u), Ok(v)) => assert!((u - v).abs() < 1e-6, "{l} vs {m}"),
                _ => assert_eq!(c, d, "{l} vs {m}"),
            }
        }
    }
}

#[test]
fn three_shards_merge_into_the_unsharded_patch_run() {
    let dir = std::env::temp_dir().join(format!("ferrolens-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("d.jsonl");
    ok(ferrolens().args(["data", "--task", "ioi", "--n", "3", "--seed", "3", "--out"]).arg(&data).output().unwrap());
    let patch = |extra: &[&str], out: &PathBuf| {
        let mut c = ferrolens();
        c.args(["patch", "--method", "act,atp", "--component", "heads", "--quiet", "--data"]).arg(&data).args(extra).arg("--out").arg(out);
        c.output().unwrap()
    };
    let full = dir.join("full");
    ok(patch(&[], &full));
    let part = |i: usize| dir.join(format!("part-{i}"));
    for i in 0..3 {
        ok(patch(&["--shard", &format!("{i}/3")], &part(i)));
        assert!(part(i).join("shard.json").is_file());
        assert!(!part(i).join("scores.csv").exists(), "a shard writes its part only");
    }
    let merged = dir.join("merged");
    let merge = |dirs: &[PathBuf], out: &PathBuf| ferrolens().arg("merge").args(dirs).arg("--out").arg(out).arg("--quiet").output().unwrap();
    let all: Vec<PathBuf> = (0..3).map(part).collect();
    ok(merge(&all, &merged));
    same_rows(&full.join("scores.csv"), &merged.join("scores.csv"));
    for f in ["scores.parquet", "heatmap_act_heads.svg", "heatmap_atp_heads.png"] {
        assert!(merged.join(f).is_file(), "{f}");
    }
    let s = |d: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(d.join("summary.json")).unwrap()).unwrap() };
    let (a, b) = (s(&full), s(&merged));
    assert_eq!(b["shards"], 3);
    for k in ["clean_logit_diff", "corrupt_logit_diff", "n_pairs"] {
        assert_eq!(a[k], b[k], "{k}");
    }
    for (x, y) in a["pearson_vs_act"].as_array().unwrap().iter().zip(b["pearson_vs_act"].as_array().unwrap()) {
        assert!((x["r"].as_f64().unwrap() - y["r"].as_f64().unwrap()).abs() < 1e-6);
    }

    // Missing shard: named, with the command that reruns it.
    let e = err(merge(&all[..2], &dir.join("m2")));
    assert!(e.contains("shard 2/3") && e.contains("missing") && e.contains("--shard 2/3"), "{e}");
    assert!(!dir.join("m2").exists(), "a refused merge leaves no folder");
    // Overlap.
    let e = err(merge(&[all[0].clone(), all[1].clone(), all[1].clone(), all[2].clone()], &dir.join("m3")));
    assert!(e.contains("both shard 1/3") && e.contains("overlap"), "{e}");
    // Other data, other options, other dtype.
    let data2 = dir.join("d2.jsonl");
    ok(ferrolens().args(["data", "--task", "ioi", "--n", "4", "--seed", "4", "--out"]).arg(&data2).output().unwrap());
    let other = dir.join("other");
    let mut c = ferrolens();
    c.args(["patch", "--method", "act,atp", "--component", "heads", "--quiet", "--shard", "2/3", "--data"]).arg(&data2).arg("--out").arg(&other);
    ok(c.output().unwrap());
    let e = err(merge(&[all[0].clone(), all[1].clone(), other.clone()], &dir.join("m4")));
    assert!(e.contains("different sweeps") && e.contains("the data"), "{e}");
    let opt = dir.join("opt");
    ok(patch(&["--shard", "2/3", "--noising"], &opt));
    let e = err(merge(&[all[0].clone(), all[1].clone(), opt], &dir.join("m5")));
    assert!(e.contains("the options") && e.contains("noising"), "{e}");
    let f64dir = dir.join("f64");
    let mut c = ferrolens();
    c.args(["--dtype", "f64", "patch", "--method", "act,atp", "--component", "heads", "--quiet", "--shard", "2/3", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&f64dir);
    ok(c.output().unwrap());
    let e = err(merge(&[all[0].clone(), all[1].clone(), f64dir], &dir.join("m6")));
    assert!(e.contains("the model"), "{e}");
    // A killed shard leaves no shard.json (it is written last, by rename): the merge names the
    // folder; rerunning that shard alone completes the merge.
    std::fs::remove_file(part(1).join("shard.json")).unwrap();
    let e = err(merge(&all, &dir.join("m7")));
    assert!(e.contains("part-1") && e.contains("no shard.json"), "{e}");
    ok(patch(&["--shard", "1/3"], &part(1)));
    let merged2 = dir.join("merged2");
    ok(merge(&all, &merged2));
    same_rows(&full.join("scores.csv"), &merged2.join("scores.csv"));
    // Bad shard strings fail before the model loads.
    let e = err(patch(&["--shard", "3/3"], &dir.join("bad")));
    assert!(e.contains("numbered from 0"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn generic_patching_shards_merge() {
    let dir = std::env::temp_dir().join(format!("ferrolens-shards-generic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("d.jsonl");
    ok(ferrolens().args(["data", "--task", "ioi", "--n", "2", "--seed", "5", "--out"]).arg(&data).output().unwrap());
    let patch = |extra: &[&str], out: &PathBuf| {
        let mut c = ferrolens();
        c.args(["patch", "--hooks", "blocks.*.attn.hook_pattern", "--axis", "head", "--axis", "dest_pos=end", "--quiet", "--data"])
            .arg(&data)
            .args(extra)
            .arg("--out")
            .arg(out);
        c.output().unwrap()
    };
    ok(patch(&[], &dir.join("full")));
    let parts: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("p{i}"))).collect();
    for (i, p) in parts.iter().enumerate() {
        ok(patch(&["--shard", &format!("{i}/2")], p));
    }
    ok(ferrolens().arg("merge").args(&parts).arg("--out").arg(dir.join("merged")).arg("--quiet").output().unwrap());
    same_rows(&dir.join("full/generic.csv"), &dir.join("merged/generic.csv"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dry_run_and_plan() {
    let dir = std::env::temp_dir().join(format!("ferrolens-dry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("d.jsonl");
    ok(ferrolens().args(["data", "--task", "ioi", "--n", "4", "--seed", "3", "--out"]).arg(&data).output().unwrap());
    let o = ok(ferrolens()
        .args(["patch", "--method", "act,atp", "--component", "heads,resid_pre", "--shard", "1/4", "--dry-run", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(dir.join("never"))
        .output()
        .unwrap());
    let s = String::from_utf8_lossy(&o.stdout);
    // SmolLM2: heads 30 x 9 = 270 rows; resid_pre 30 layers x 15 positions = 450; twice (act, AtP).
    assert!(s.contains("work units: 1440 rows; shard 1/4 owns 360"), "{s}");
    assert!(s.contains("time estimate") && s.contains("memory estimate"), "{s}");
    assert!(!dir.join("never").exists(), "a dry run writes nothing");
    // discover's node-score step: act, AtP, RelP on 270 heads and 30 MLPs.
    let o = ok(ferrolens().args(["discover", "--task", "ioi", "--n", "2", "--shard", "1/3", "--dry-run", "--out"]).arg(dir.join("never")).output().unwrap());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("work units: 900 rows; shard 1/3 owns 300"), "{s}");
    assert!(s.contains("time estimate") && s.contains("memory estimate"), "{s}");
    // cache: prompts are the units.
    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, "One two three\nFour five\nSix seven eight nine\nTen\nEleven twelve\n").unwrap();
    let o = ok(ferrolens()
        .args(["cache", "--hooks", "blocks.*.hook_resid_post", "--shard", "0/2", "--dry-run", "--prompts"])
        .arg(&prompts)
        .arg("--out")
        .arg(dir.join("never"))
        .output()
        .unwrap());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("work units: 5 prompts; shard 0/2 owns 3") && s.contains("file size estimate"), "{s}");
    assert!(!dir.join("never").exists(), "a dry run writes nothing");
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/configs/meta-llama-3-70b.json");
    let o =
        ok(ferrolens().args(["--dtype", "bf16", "plan", "--model", cfg, "--devices", "cuda:0,cuda:1", "--device-memory", "h200", "--json"]).output().unwrap());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["devices"][1]["layers"], serde_json::json!([40, 80]));
    assert_eq!(j["devices"][0]["fits"], true);
    assert!((j["params"].as_f64().unwrap() / 1e9 - 70.55).abs() < 0.05);
    let e = err(ferrolens().args(["plan", "--model", cfg, "--device-memory", "lots"]).output().unwrap());
    assert!(e.contains("GiB"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn retrieval_shards_merge_into_the_unsharded_run() {
    let dir = std::env::temp_dir().join(format!("ferrolens-shards-retrieval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |extra: &[&str], out: &PathBuf| {
        let mut c = ferrolens();
        c.args(["heads", "retrieval", "--lengths", "320", "--depths", "0.2,0.8", "--n-needles", "2", "--max-new-tokens", "20", "--mask-k", "0", "--quiet"])
            .args(extra)
            .arg("--out")
            .arg(out);
        c.output().unwrap()
    };
    ok(run(&[], &dir.join("full")));
    let parts: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("p{i}"))).collect();
    for (i, p) in parts.iter().enumerate() {
        ok(run(&["--shard", &format!("{i}/3")], p));
    }
    ok(ferrolens().arg("merge").args(&parts).arg("--out").arg(dir.join("merged")).output().unwrap());
    // Per-head scores (mean over the correct runs) and the runs table are the unsharded run's.
    same_rows(&dir.join("full/scores.csv"), &dir.join("merged/scores.csv"));
    let runs = |d: &str| std::fs::read_to_string(dir.join(d).join("runs.csv")).unwrap();
    assert_eq!(runs("full"), runs("merged"));
    assert_eq!(runs("full").lines().count(), 1 + 4, "2 depths x 2 needles");
    assert!(dir.join("merged/report.html").is_file() && dir.join("merged/retrieval_heatmap.svg").is_file());
    // The masking experiment needs the merged ranking: shards refuse it before any work.
    let e = err(run(&["--shard", "0/3", "--mask-k", "5"], &dir.join("bad")));
    assert!(e.contains("--mask-k 0"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn circuits_eval_shards_merge_into_the_unsharded_run() {
    let dir = std::env::temp_dir().join(format!("ferrolens-shards-mib-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |extra: &[&str], out: &PathBuf| {
        let mut c = ferrolens();
        c.args(["circuits", "eval", "--n", "2", "--methods", "atp,eap", "--fractions", "0.01,0.1,1", "--quiet"]).args(extra).arg("--out").arg(out);
        c.output().unwrap()
    };
    ok(run(&[], &dir.join("full")));
    // Three rankings (atp, eap, random): one a shard.
    let parts: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("p{i}"))).collect();
    for (i, p) in parts.iter().enumerate() {
        ok(run(&["--shard", &format!("{i}/3")], p));
    }
    ok(ferrolens().arg("merge").args(&parts).arg("--out").arg(dir.join("merged")).arg("--quiet").output().unwrap());
    let table = |d: &str, f: &str| std::fs::read_to_string(dir.join(d).join(f)).unwrap();
    // mib.csv: method, cpr, cmd equal (score_seconds differ by run).
    let mib = |d: &str| table(d, "mib.csv").lines().map(|l| l.split(',').take(4).collect::<Vec<_>>().join(",")).collect::<Vec<_>>();
    assert_eq!(mib("full"), mib("merged"));
    assert_eq!(mib("full").len(), 4);
    same_table(&dir.join("full/curves.csv"), &dir.join("merged/curves.csv"));
    same_table(&dir.join("full/edge_scores.csv"), &dir.join("merged/edge_scores.csv"));
    same_table(&dir.join("full/node_scores.csv"), &dir.join("merged/node_scores.csv"));
    assert!(dir.join("merged/report.html").is_file() && dir.join("merged/curves_signed.svg").is_file());
    // More shards than rankings: refused before the model loads.
    let e = err(run(&["--shard", "0/4"], &dir.join("bad")));
    assert!(e.contains("at most 3 shards"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn deploy_scripts_run_shards_as_slurm_and_kubernetes_would() {
    let dir = std::env::temp_dir().join(format!("ferrolens-shards-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("d.jsonl");
    ok(ferrolens().args(["data", "--task", "ioi", "--n", "2", "--seed", "9", "--out"]).arg(&data).output().unwrap());
    let args = ["patch", "--method", "act", "--component", "heads", "--quiet", "--data"];
    let mut c = ferrolens();
    c.args(args).arg(&data).arg("--out").arg(dir.join("full"));
    ok(c.output().unwrap());
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let sweep = dir.join("sweep");
    let shard = |var: &str, i: usize| {
        let mut c = Command::new(deploy.join("run-shard.sh"));
        c.args(args).arg(&data).env("SHARDS", "3").env("OUT", &sweep).env("FERROLENS", env!("CARGO_BIN_EXE_ferrolens")).env(var, i.to_string());
        for v in ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "SHARD_INDEX"].iter().filter(|v| **v != var) {
            c.env_remove(v);
        }
        c.output().unwrap()
    };
    // Two tasks of a Slurm array, one pod of a Kubernetes Indexed Job.
    ok(shard("SLURM_ARRAY_TASK_ID", 0));
    ok(shard("SLURM_ARRAY_TASK_ID", 1));
    ok(shard("JOB_COMPLETION_INDEX", 2));
    // Resubmitting skips finished shards.
    let o = ok(shard("SHARD_INDEX", 1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("skipping"));
    let o = Command::new(deploy.join("merge.sh")).env("OUT", &sweep).env("FERROLENS", env!("CARGO_BIN_EXE_ferrolens")).output().unwrap();
    ok(o);
    same_rows(&dir.join("full/scores.csv"), &sweep.join("merged/scores.csv"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cache_shards_merge_and_split_devices_give_the_same_file() {
    let dir = std::env::temp_dir().join(format!("ferrolens-cache-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("p.txt");
    // Two token lengths: the grouped layout with prompt_index.
    std::fs::write(&prompts, "The cat sat on the mat\nA dog ran\n\nThe bird flew over the tree\nA fish swam\nThe sun rose\n").unwrap();
    let hooks = "blocks.0.hook_resid_post,blocks.29.attn.hook_z";
    let cache = |pre: &[&str], extra: &[&str], out: &Path| {
        let mut c = ferrolens();
        c.args(pre).args(["cache", "--hooks", hooks, "--prompts"]).arg(&prompts).args(extra).arg("--out").arg(out);
        c.output().unwrap()
    };
    let full = dir.join("full.safetensors");
    ok(cache(&[], &[], &full));
    for i in 0..2 {
        ok(cache(&[], &["--shard", &format!("{i}/2"), "--batch-size", "1"], &dir.join(format!("part-{i}"))));
    }
    let merged = dir.join("merged");
    ok(ferrolens().arg("merge").arg(dir.join("part-0")).arg(dir.join("part-1")).arg("--out").arg(&merged).output().unwrap());
    // The model split over two (CPU) devices writes the same file.
    let split = dir.join("split.safetensors");
    ok(cache(&["--devices", "cpu,cpu"], &[], &split));
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let want = load(&full);
    assert!(want.keys().any(|k| k.ends_with("prompt_index")), "{:?}", want.keys());
    for got in [load(&merged.join("cache.safetensors")), load(&split)] {
        let mut keys: Vec<_> = got.keys().collect();
        keys.sort();
        let mut wk: Vec<_> = want.keys().collect();
        wk.sort();
        assert_eq!(keys, wk);
        for (k, t) in &want {
            let u = &got[k];
            assert_eq!(t.dims(), u.dims(), "{k}");
            let d = (t.to_dtype(candle_core::DType::F64).unwrap() - u.to_dtype(candle_core::DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-5, "{k}: {d}");
        }
    }
    // A missing shard is named; a shard's --out must be a folder.
    let e = err(ferrolens().arg("merge").arg(dir.join("part-1")).arg("--out").arg(dir.join("m2")).output().unwrap());
    assert!(e.contains("0/2") && e.contains("missing"), "{e}");
    let e = err(cache(&[], &["--shard", "0/2"], &dir.join("x.safetensors")));
    assert!(e.contains("folder"), "{e}");
    // --devices replaces --device; plain runs agree split and unsplit.
    let e = err(ferrolens().args(["--device", "cuda:0", "--devices", "cpu,cpu", "run", "--prompt", "Hi"]).output().unwrap());
    assert!(e.contains("drop --device"), "{e}");
    let run = |pre: &[&str]| {
        let o = ok(ferrolens().args(pre).args(["run", "--prompt", "The capital of France is", "--json"]).output().unwrap());
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["top_k"].clone()
    };
    assert_eq!(run(&[]), run(&["--devices", "cpu,cpu,cpu"]));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn discover_shards_of_both_steps_finish_into_the_unsharded_study() {
    let dir = std::env::temp_dir().join(format!("ferrolens-discover-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = ["discover", "--task", "ioi", "--n", "2", "--seed", "5", "--method", "act", "--quiet"];
    let discover = |extra: &[&str], out: &Path| ferrolens().args(base).args(extra).arg("--out").arg(out).output().unwrap();
    let full = dir.join("full");
    ok(discover(&[], &full));
    // Step 1 in three shards, merged; step 2 (the faithfulness scan) in two, merged; then finish.
    for i in 0..3 {
        ok(discover(&["--shard", &format!("{i}/3")], &dir.join(format!("s{i}"))));
    }
    let scores = dir.join("scores");
    let o = ok(ferrolens().arg("merge").args((0..3).map(|i| dir.join(format!("s{i}")))).arg("--out").arg(&scores).output().unwrap());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--from"), "the merge names the next step");
    let scores_s = scores.to_str().unwrap();
    for i in 0..2 {
        ok(discover(&["--from", scores_s, "--shard", &format!("{i}/2")], &dir.join(format!("f{i}"))));
    }
    let faith = dir.join("faith");
    ok(ferrolens().arg("merge").arg(dir.join("f0")).arg(dir.join("f1")).arg("--out").arg(&faith).output().unwrap());
    let done = dir.join("done");
    ok(discover(&["--from", faith.to_str().unwrap()], &done));
    let circuit = |d: &Path| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(d.join("circuit.json")).unwrap()).unwrap();
    let (a, b) = (circuit(&full), circuit(&done));
    assert_eq!(
        a["nodes"].as_array().unwrap().iter().map(|n| n["node"].clone()).collect::<Vec<_>>(),
        b["nodes"].as_array().unwrap().iter().map(|n| n["node"].clone()).collect::<Vec<_>>()
    );
    assert!(a["size"].as_u64().unwrap() > 0);
    assert!((a["faithfulness"].as_f64().unwrap() - b["faithfulness"].as_f64().unwrap()).abs() < 1e-6);
    assert_eq!(a["curve"].as_array().unwrap().len(), b["curve"].as_array().unwrap().len());
    same_rows(&full.join("scores.csv"), &done.join("scores.csv"));
    // Resuming from the scores alone (no scan merged) finishes the same way.
    let done2 = dir.join("done2");
    ok(discover(&["--from", scores_s], &done2));
    assert!((circuit(&done2)["faithfulness"].as_f64().unwrap() - a["faithfulness"].as_f64().unwrap()).abs() < 1e-6);
    // Refusals: other pairs, other options, a finished scan sharded again.
    let e = err(ferrolens()
        .args(["discover", "--task", "ioi", "--n", "3", "--seed", "5", "--method", "act", "--quiet", "--from", scores_s, "--out"])
        .arg(dir.join("x"))
        .output()
        .unwrap());
    assert!(e.contains("other prompt pairs"), "{e}");
    let e = err(ferrolens()
        .args(["discover", "--task", "ioi", "--n", "2", "--seed", "5", "--method", "atp", "--quiet", "--from", scores_s, "--out"])
        .arg(dir.join("x"))
        .output()
        .unwrap());
    assert!(e.contains("other options"), "{e}");
    let e = err(discover(&["--from", faith.to_str().unwrap(), "--shard", "0/2"], &dir.join("x")));
    assert!(e.contains("nothing of this study is left to shard"), "{e}");
    assert!(!dir.join("x").exists());
    std::fs::remove_dir_all(&dir).ok();
}
