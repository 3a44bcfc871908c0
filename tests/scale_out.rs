//! Shards and memory plans (issue 16): the rows of N shards, joined, are exactly the unsharded
//! run's; the shard plan matches the grids a run returns; the model fingerprint identifies
//! weights and dtype; memory plans of Llama-3 configs count the published parameters.

mod common;
use common::*;
use ferrolens::methods::shard::Shard;
use ferrolens::methods::study::{planned_grids, prepare, run_methods, Method, RunOptions};
use ferrolens::methods::Component;
use ferrolens::model::plan::{block_params, device_memory, memory_plan, PlanOptions};
use ferrolens::model::{config_of, load, load_gguf, LoadOptions};
use ferrolens::tasks::{read_jsonl, PairBatch};

#[test]
fn three_shards_join_to_the_unsharded_run() {
    let model = smollm2();
    let pairs = read_jsonl(&fixtures().join("smollm2/ioi4.jsonl")).unwrap();
    let batch = PairBatch::new(model.tokenizer().unwrap(), pairs, "ioi4").unwrap();
    let prep = prepare(model, &batch).unwrap();
    let methods = [Method::Act, Method::Atp, Method::Relp];
    let components = [Component::MlpOut, Component::HeadZ];
    // Residual-like components over all positions (a node per layer) keep the sweep small.
    let o = RunOptions { resid_by_pos: false, ..Default::default() };
    let full = run_methods(model, &batch, &prep, &methods, &components, &o).unwrap().grids;
    // The plan is the run's grids in order (gradient methods: heads first).
    let plan = planned_grids(model, &prep, &methods, &components, &o);
    let got: Vec<(String, Component, usize)> = full.iter().map(|g| (g.method.clone(), g.component, g.values.len())).collect();
    let want: Vec<(String, Component, usize)> = plan.iter().map(|g| (g.method.to_string(), g.component, g.rows())).collect();
    assert_eq!(got, want);
    assert_eq!(full[2].component, Component::HeadZ, "AtP lists head components first");
    let n = 3;
    let parts: Vec<_> = (0..n)
        .map(|i| run_methods(model, &batch, &prep, &methods, &components, &RunOptions { shard: Some(Shard::new(i, n).unwrap()), ..o }).unwrap().grids)
        .collect();
    let mut u = 0;
    let mut max_diff = 0f64;
    for (gi, g) in full.iter().enumerate() {
        for (k, v) in g.values.iter().enumerate() {
            let owner = u % n;
            for (i, p) in parts.iter().enumerate() {
                let x = p[gi].values[k];
                if i == owner {
                    assert!(x.is_finite(), "shard {i} left its unit {u} empty");
                    max_diff = max_diff.max((x - v).abs());
                } else {
                    assert!(x.is_nan(), "shard {i} filled unit {u} of shard {owner}");
                }
            }
            u += 1;
        }
    }
    assert!(max_diff < 1e-6, "sharded rows differ from the unsharded run by {max_diff}");
    // The sweep is not trivial: activation patching moves the metric.
    assert!(full[0].values.iter().any(|v| v.abs() > 0.05));
}

#[test]
fn the_fingerprint_names_the_weights_and_dtype() {
    let a = smollm2();
    let path = ferrolens::model::registry::ensure(ferrolens::model::registry::find("smollm2-135m").unwrap()).unwrap();
    let b = load_gguf(&path, &LoadOptions::default()).unwrap();
    assert_ne!(a.cfg.name, b.cfg.name);
    assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap(), "the same weights by name and by path");
    let c = load("smollm2-135m", &LoadOptions { dtype: candle_core::DType::F64, ..Default::default() }).unwrap();
    assert_ne!(a.fingerprint().unwrap(), c.fingerprint().unwrap(), "another dtype");
    let t = tiny_gpt2(candle_core::DType::F32);
    assert_ne!(a.fingerprint().unwrap(), t.fingerprint().unwrap());
}

#[test]
fn memory_plans_of_llama3_configs() {
    let gb = 1e9;
    let c8 = config_of(fixtures().join("configs/meta-llama-3-8b.json").to_str().unwrap()).unwrap();
    let c70 = config_of(fixtures().join("configs/meta-llama-3-70b.json").to_str().unwrap()).unwrap();
    // Published sizes: 8.03 B and 70.6 B parameters (untied embeddings).
    let params = |c: &ferrolens::model::Config| c.n_layers as f64 * block_params(c) + 2.0 * (c.d_vocab * c.d_model) as f64;
    assert!((params(&c8) / 1e9 - 8.03).abs() < 0.01, "{}", params(&c8));
    assert!((params(&c70) / 1e9 - 70.55).abs() < 0.05, "{}", params(&c70));
    let bf16 = PlanOptions { dtype_bytes: 2, batch: 16, seq: 128, ..Default::default() };
    let one = memory_plan(&c8, &["cuda:0".into()], &bf16).unwrap();
    assert!((one[0].weights - params(&c8) * 2.0).abs() < 1e6, "every weight on one device");
    assert!(one[0].total() < device_memory("h100").unwrap());
    // 70B in bf16 is 141 GB of weights: more than an H200 holds; two H200s or four H100s do.
    let h200 = device_memory("h200").unwrap();
    let one = memory_plan(&c70, &["cuda:0".into()], &bf16).unwrap();
    assert!(one[0].weights > 140.0 * gb && one[0].total() > h200);
    let devs = |k: usize| (0..k).map(|i| format!("cuda:{i}")).collect::<Vec<_>>();
    let two = memory_plan(&c70, &devs(2), &bf16).unwrap();
    assert_eq!((two[0].layers.clone(), two[1].layers.clone()), (0..40, 40..80));
    assert!(two.iter().all(|d| d.total() < h200));
    let w: f64 = two.iter().map(|d| d.weights).sum();
    assert!((w - one[0].weights).abs() < 1e6, "a split keeps every weight once (untied)");
    let four = memory_plan(&c70, &devs(4), &PlanOptions { grads: true, ..bf16.clone() }).unwrap();
    assert!(four.iter().all(|d| d.total() < device_memory("h100").unwrap()));
    assert_eq!(four.iter().map(|d| d.layers.len()).collect::<Vec<_>>(), vec![20; 4]);
    // Gradients keep every block's activations: more than a forward.
    let fwd = memory_plan(&c70, &devs(4), &bf16).unwrap();
    assert!(four[0].activations > 10.0 * fwd[0].activations);
    // Bad plans say what to do.
    assert!(memory_plan(&c8, &devs(33), &bf16).unwrap_err().to_string().contains("at most 32 devices"));
    assert!(device_memory("h300").unwrap_err().to_string().contains("GiB"));
}

#[test]
fn shard_strings() {
    let e = "4/4".parse::<Shard>().unwrap_err().to_string();
    assert!(e.contains("numbered from 0"), "{e}");
    assert_eq!("0/1".parse::<Shard>().unwrap(), Shard { index: 0, count: 1 });
}
