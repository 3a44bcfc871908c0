//! Every architecture family against transformers 4.57 (and TransformerLens 2.18 where it has the
//! family), on tiny random checkpoints written by transformers' own classes
//! (scripts/make_family_fixtures.py): logits, residual streams, attention patterns and every TL
//! hook; llama.cpp-layout GGUF files against transformers' GGUF reader; the exporter's round trip;
//! gradients at every hook kind against central finite differences; and every method on every
//! family (activation patching, AtP, RelP conservation, AtP*'s QK fix, EAP, KV-cache decoding).

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use ferrolens::methods::*;
use ferrolens::model::*;
use std::collections::HashMap;
use std::sync::Arc;

/// max |a - b| / max(1, max |b|) over the elements of two tensors with equal element counts
/// (layouts agree; TL flattens some hooks' leading axes).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.elem_count(), b.elem_count(), "element counts differ: {:?} vs {:?}", a.dims(), b.dims());
    let a = a.flatten_all().unwrap();
    let b = b.flatten_all().unwrap();
    let scale = b.to_dtype(DType::F64).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap().max(1.0);
    max_abs(&a, &b) / scale
}

/// Standard normal entries from a fixed seed (the test must not depend on the run).
fn seeded_normal(dims: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let (a, b): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random::<f64>());
            (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn refs(name: &str) -> HashMap<String, Tensor> {
    reference(&format!("families/{name}/reference.safetensors"))
}

/// TL hooks ferrolens does not have, by name suffix (none today).
const TL_ONLY: &[&str] = &[];

#[test]
fn parity_with_transformers_and_transformer_lens() {
    let mut report = Vec::new();
    for name in FAMILIES {
        let model = family(name, DType::F32);
        let r = refs(name);
        let mut worst: HashMap<&str, f64> = HashMap::new();
        let mut bump = |k: &'static str, v: f64| {
            let e = worst.entry(k).or_insert(0.0);
            *e = e.max(v);
        };
        let n = model.cfg.n_layers;
        for i in 0..3 {
            let t = ids(&r, &format!("p{i}.input_ids"));
            let pts: Vec<HookPoint> = (0..n).flat_map(|l| [HookPoint::ResidPre(l), HookPoint::Pattern(l)]).collect();
            let mut h = Hooks::new().cache_hooks(&pts);
            let logits = model.run(&t, &mut h).unwrap();
            bump("logits", rel(&logits, &r[&format!("p{i}.logits")]));
            for l in 0..n {
                bump("resid_pre", rel(h.cache_ref().get(HookPoint::ResidPre(l)).unwrap(), &r[&format!("p{i}.hf.hidden.{l}")]));
                bump("pattern", rel(h.cache_ref().get(HookPoint::Pattern(l)).unwrap(), &r[&format!("p{i}.hf.pattern.{l}")]));
            }
        }
        // Every TL hook of prompt 0 (or the HF module outputs for OLMo-2).
        let t = ids(&r, "p0.input_ids");
        let mut h = Hooks::new().cache("re:.*").unwrap();
        model.run(&t, &mut h).unwrap();
        let mut tl_hooks = 0;
        for (k, v) in &r {
            let (source, hook) = if let Some(x) = k.strip_prefix("p0.tl.") {
                ("tl", x.to_string())
            } else if let Some(x) = k.strip_prefix("p0.hfm.") {
                let x = x.replace("attn.q_proj", "attn.hook_q").replace("attn.k_proj", "attn.hook_k");
                ("hf", x)
            } else {
                continue;
            };
            if TL_ONLY.iter().any(|s| hook.ends_with(s)) {
                continue;
            }
            let hp = model.hook(&hook).unwrap_or_else(|e| panic!("{name}: {source} hook {hook} is not a ferrolens hook: {e}"));
            let ours = h.cache_ref().get(hp).unwrap();
            let d = rel(ours, v);
            assert!(d < 1e-4, "{name}: {source} {hook}: {d:e}");
            bump(if source == "tl" { "tl_hooks" } else { "hf_modules" }, d);
            tl_hooks += 1;
        }
        if r.contains_key("p0.tl_logits") {
            let logits = model.run(&t, &mut Hooks::new()).unwrap();
            bump("tl_logits", rel(&logits, &r["p0.tl_logits"]));
        }
        for (k, v) in &worst {
            assert!(*v < 1e-4, "{name}: {k} differs by {v:e} (relative)");
        }
        assert!(tl_hooks >= 10 * n, "{name}: only {tl_hooks} reference hooks compared");
        let mut w: Vec<_> = worst.into_iter().collect();
        w.sort_by(|a, b| a.0.cmp(b.0));
        report.push(format!("{name:<9} {tl_hooks:>3} hooks  {}", w.iter().map(|(k, v)| format!("{k} {v:.1e}")).collect::<Vec<_>>().join("  ")));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn every_hook_point_is_produced_with_its_documented_shape() {
    for name in FAMILIES {
        let model = family(name, DType::F32);
        let r = refs(name);
        let t = ids(&r, "p0.input_ids");
        let p = t.dim(1).unwrap();
        let mut h = Hooks::new().cache("re:.*").unwrap();
        model.run(&t, &mut h).unwrap();
        let c = &model.cfg;
        for hp in model.hook_points() {
            let got = h.cache_ref().get(hp).unwrap_or_else(|e| panic!("{name}: {e}")).dims().to_vec();
            use HookPoint::*;
            let want: Vec<usize> = match hp {
                Q(_) | RotQ(_) | Z(_) | QNormNormalized(_) => vec![1, p, c.n_heads, c.d_head],
                K(_) | V(_) | RotK(_) | KNormNormalized(_) => vec![1, p, c.n_kv_heads, c.d_head],
                QNormScale(_) => vec![1, p, if c.qk_norm == Some(QkNorm::Full) { 1 } else { c.n_heads }, 1],
                KNormScale(_) => vec![1, p, if c.qk_norm == Some(QkNorm::Full) { 1 } else { c.n_kv_heads }, 1],
                AttnScores(_) | Pattern(_) => vec![1, c.n_heads, p, p],
                Result(_) => vec![1, p, c.n_heads, c.d_model],
                MlpPre(_) | MlpPreLinear(_) | MlpPost(_) => vec![1, p, c.d_mlp],
                Ln1Scale(_) | Ln2Scale(_) | Ln1PostScale(_) | Ln2PostScale(_) | LnFinalScale => {
                    vec![1, p, 1]
                }
                _ => vec![1, p, c.d_model],
            };
            assert_eq!(got, want, "{name}: {hp}");
        }
        // And a hook the family lacks is refused by name.
        let absent = match c.norm_placement {
            NormPlacement::Pre => "blocks.0.ln1_post.hook_normalized",
            NormPlacement::Post => "blocks.0.ln1.hook_normalized",
            NormPlacement::Sandwich => "hook_pos_embed",
        };
        let e = model.hook(absent).unwrap_err().to_string();
        assert!(e.contains(&format!("{name} models have no such hook")), "{name}: {e}");
    }
}

#[test]
fn gguf_files_match_transformers_gguf_reader() {
    for name in ["llama", "qwen2"] {
        let r = refs(name);
        let m = load_gguf(&fixtures().join(format!("families/{name}/model.gguf")), &LoadOptions::default()).unwrap();
        assert_eq!(m.cfg.family, name);
        let logits = m.run(&ids(&r, "p0.input_ids"), &mut Hooks::new()).unwrap();
        let d = rel(&logits, &r["p0.gguf_logits"]);
        eprintln!("{name} GGUF vs transformers' GGUF reader: {d:.1e}");
        assert!(d < 1e-4, "{name}: {d}");
        // The GGUF loses what llama.cpp cannot store (the llama3 rope scaling, Qwen2's window),
        // as transformers' reader does: the HF checkpoint's logits differ.
        assert!(rel(&logits, &r["p0.logits"]) > 1e-3, "{name}: the fixture does not exercise the difference");
    }
}

#[test]
fn export_round_trips_every_family() {
    let dir = std::env::temp_dir().join(format!("ferrolens-export-families-{}", std::process::id()));
    for name in FAMILIES {
        let model = family(name, DType::F32);
        let out = dir.join(name);
        save_hf_dir(&model, &out, ExportWeights::Dtype(DType::F32)).unwrap();
        let back = load_hf_dir(&out, &LoadOptions::default()).unwrap();
        assert_eq!(back.cfg, Config { name: back.cfg.name.clone(), ..model.cfg.clone() }, "{name}: config changed");
        // The tensors under the family's Hugging Face names are the checkpoint's own.
        let orig = candle_core::safetensors::load(fixtures().join(format!("families/{name}/model.safetensors")), &Device::Cpu).unwrap();
        let mine = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        for (k, v) in &orig {
            if k == "lm_head.weight" && model.cfg.tied_embeddings {
                continue;
            }
            let m = mine.get(k).unwrap_or_else(|| panic!("{name}: export lacks {k}"));
            assert!(max_abs(m, v) < 1e-6, "{name}: {k}");
        }
        let r = refs(name);
        let t = ids(&r, "p2.input_ids");
        let a = model.run(&t, &mut Hooks::new()).unwrap();
        let b = back.run(&t, &mut Hooks::new()).unwrap();
        assert!(max_abs(&a, &b) < 1e-6, "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// dM/d(activation) from one backward pass equals the central finite difference of the metric
/// along a random direction (seeded), at every hook kind the family has (f64).
#[test]
fn gradients_match_finite_differences_at_every_hook_kind() {
    for name in FAMILIES {
        let model = family(name, DType::F64);
        let r = refs(name);
        let t = Tensor::cat(&[ids(&r, "p0.input_ids"), ids(&r, "p1.input_ids")], 0).unwrap();
        let metric = LogitDiff { answer: vec![5, 9], wrong: vec![7, 11] };
        let last = model.cfg.n_layers - 1;
        use HookPoint::*;
        let candidates = [
            Embed,
            ResidPre(0),
            AttnIn(1),
            Ln1Normalized(1),
            Q(1),
            K(0),
            V(1),
            QNormNormalized(1),
            KNormScale(0),
            RotQ(0),
            RotK(1),
            AttnScores(0),
            Pattern(1),
            Z(0),
            Result(1),
            Ln1PostNormalized(0),
            AttnOut(0),
            ResidMid(1),
            MlpIn(0),
            Ln2Scale(1),
            MlpPre(0),
            MlpPreLinear(1),
            MlpPost(1),
            Ln2PostNormalized(1),
            MlpOut(0),
            ResidPost(last),
            LnFinalScale,
            LnFinalNormalized,
        ];
        let have = model.hook_points();
        let pts: Vec<HookPoint> = candidates.into_iter().filter(|h| have.contains(h)).collect();
        let m = |hooks: &mut Hooks| -> f64 {
            let logits = model.run(&t, hooks).unwrap();
            metric.per_row(&logits).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let mut hg = Hooks::new().grad(&pts).cache_hooks(&pts);
        let run = model.run_with_grads(&t, &mut hg, |l| Ok(metric.per_row(l)?.sum_all()?)).unwrap();
        for (i, &hp) in pts.iter().enumerate() {
            let x = hg.cache_ref().get(hp).unwrap();
            // Scores hold -inf where masked: move only the finite entries.
            let finite = x.abs().unwrap().lt(1e30).unwrap().to_dtype(DType::F64).unwrap();
            let u = (seeded_normal(x.dims(), i as u64) * &finite).unwrap();
            let u = (u * (1.0 + i as f64 * 0.01)).unwrap();
            let an = sum(&(&run.grads[&hp] * &u).unwrap());
            // Central differences with Richardson extrapolation: (4 D(h/2) - D(h)) / 3 cancels the
            // h^2 term, so h can be large enough for f64 rounding and still exact for the curvature
            // of models without pre-norms (OLMo-2).
            let d = |h: f64| -> f64 {
                let mut plus = Hooks::new().patch(Patch::new(hp, Intervention::Add((&u * h).unwrap())));
                let mut minus = Hooks::new().patch(Patch::new(hp, Intervention::Add((&u * -h).unwrap())));
                (m(&mut plus) - m(&mut minus)) / (2.0 * h)
            };
            let h = 1e-4;
            let fd = (4.0 * d(h / 2.0) - d(h)) / 3.0;
            assert!((fd - an).abs() <= 1e-6 * an.abs().max(1e-2), "{name} {hp}: backward {an:.10} vs finite difference {fd:.10}");
        }
        eprintln!("{name}: {} hook points", pts.len());
    }
}

/// Clean/corrupt prompts `[2, 12]` of a family's fixture, a raw logit-difference metric and its
/// normalised version.
fn setup(model: &HookedTransformer, r: &HashMap<String, Tensor>) -> (Tensor, Tensor, LogitDiff, Normalised) {
    let a = ids(r, "p0.input_ids");
    let b = ids(r, "p1.input_ids");
    let clean = Tensor::cat(&[a.clone(), b.clone()], 0).unwrap();
    let corrupt = Tensor::cat(&[b, a], 0).unwrap();
    let raw = LogitDiff { answer: vec![5, 9], wrong: vec![7, 11] };
    let arc: Arc<dyn Metric> = Arc::new(raw.clone());
    let c = metric_of(model, &clean, None, arc.as_ref()).unwrap();
    let k = metric_of(model, &corrupt, None, arc.as_ref()).unwrap();
    (clean, corrupt, raw, Normalised::new(arc, c, k).unwrap())
}

fn sum(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn every_method_on_every_family() {
    for name in FAMILIES {
        let model = family(name, DType::F64);
        let r = refs(name);
        let (clean, corrupt, raw, norm) = setup(&model, &r);
        let n = model.cfg.n_layers;
        let data = PatchingData::new(&clean, &corrupt, &norm);
        let rawd = PatchingData::new(&clean, &corrupt, &raw);

        // Activation patching: all of resid_pre at any layer is the clean run.
        let all = activation_patching(&model, &data, Component::ResidPre, &Positions::All, &SweepOptions::default()).unwrap();
        for l in 0..n {
            assert!((all.get(l, 0, 0) - 1.0).abs() < 1e-10, "{name} resid_pre L{l}: {}", all.get(l, 0, 0));
        }
        // Batched head sweeps equal one patch at a time.
        let a = activation_patching(&model, &data, Component::HeadZ, &Positions::Each, &SweepOptions { max_rows: 2, ..Default::default() }).unwrap();
        let b = activation_patching(&model, &data, Component::HeadZ, &Positions::Each, &SweepOptions { max_rows: 1000, ..Default::default() }).unwrap();
        assert!(a.values.iter().zip(&b.values).all(|(x, y)| (x - y).abs() < 1e-10), "{name}: batched sweep");

        // AtP = gradient x difference at the corrupt run.
        let comps = [Component::HeadZ, Component::MlpOut];
        let atp = attribution(&model, &rawd, &AttributionOptions::atp(&comps).positions(Positions::Each)).unwrap();
        let pts = [HookPoint::Z(1), HookPoint::MlpOut(0)];
        let mut hc = Hooks::new().cache_hooks(&pts);
        model.run(&clean, &mut hc).unwrap();
        let mut hk = Hooks::new().cache_hooks(&pts).grad(&pts);
        let run = model.run_with_grads(&corrupt, &mut hk, |l| Ok(raw.per_row(l)?.mean_all()?)).unwrap();
        let d = |h: HookPoint| (hc.cache_ref().get(h).unwrap() - hk.cache_ref().get(h).unwrap()).unwrap();
        let want = sum(&(d(HookPoint::Z(1)) * &run.grads[&HookPoint::Z(1)]).unwrap().i((.., 5, 1, ..)).unwrap());
        assert!((atp.grids[0].get(1, 5, 1) - want).abs() < 1e-10 * want.abs().max(1.0), "{name}: AtP head");
        let want = sum(&(d(HookPoint::MlpOut(0)) * &run.grads[&HookPoint::MlpOut(0)]).unwrap().i((.., 7, ..)).unwrap());
        assert!((atp.grids[1].get(0, 7, 0) - want).abs() < 1e-10 * want.abs().max(1.0), "{name}: AtP mlp");

        // RelP: with all four rules a bias-free model conserves relevance layer by layer.
        let biases =
            model.w.blocks.iter().any(|b| b.attn.b_q.is_some() || b.attn.b_o.is_some() || b.mlp.b_in.is_some()) || model.cfg.norm == NormKind::LayerNorm;
        if !biases {
            let layers: Vec<HookPoint> = (0..n).map(HookPoint::ResidPre).collect();
            let one = clean.i(0..1).unwrap();
            let raw = LogitDiff { answer: vec![5], wrong: vec![7] };
            let mut h = Hooks::new().grad(&layers).cache_hooks(&layers).lrp(LrpRules::ALL);
            let run = model.run_with_grads(&one, &mut h, |l| Ok(raw.per_row(l)?.sum_all()?)).unwrap();
            for hp in layers {
                let rel = sum(&(h.cache_ref().get(hp).unwrap() * &run.grads[&hp]).unwrap());
                assert!((rel - run.metric).abs() < 1e-6 * run.metric.abs().max(1.0), "{name} {hp}: relevance {rel} vs metric {}", run.metric);
            }
        }

        // AtP*'s QK fix equals the patterns recomputed by a real patched forward (the model's own
        // scale, soft-cap and sliding window). The patch is of a head's rotated query / key (equal
        // to patching hook_q / hook_k except under OLMo-2's full-width norms, where one head's
        // pre-norm key moves every head's normalised key).
        let kq = qk_fix(&model, &rawd, Component::HeadK, &Positions::Each).unwrap();
        let qq = qk_fix(&model, &rawd, Component::HeadQ, &Positions::Each).unwrap();
        let l = n - 1;
        let pats: Vec<HookPoint> = (0..n).map(HookPoint::Pattern).collect();
        let mut hk = Hooks::new().grad(&pats).cache_hooks(&pats);
        let run = model
            .run_span_with_grads(Some(&corrupt), &RunSpan { last_logits_only: true, ..Default::default() }, &mut hk, |lg| Ok(raw.per_row(lg)?.mean_all()?))
            .unwrap();
        let mut hc = Hooks::new().cache_hooks(&[HookPoint::RotK(l), HookPoint::RotQ(l)]);
        model.run(&clean, &mut hc).unwrap();
        let group = model.cfg.kv_repeat();
        let brute = |patch: Patch, heads: Vec<usize>| -> f64 {
            let mut h = Hooks::new().patch(patch).cache_hooks(&[HookPoint::Pattern(l)]);
            model.run(&corrupt, &mut h).unwrap();
            heads
                .iter()
                .map(|&hd| {
                    let a2 = h.cache_ref().get(HookPoint::Pattern(l)).unwrap().i((.., hd)).unwrap();
                    let a = hk.cache_ref().get(HookPoint::Pattern(l)).unwrap().i((.., hd)).unwrap();
                    let g = run.grads[&HookPoint::Pattern(l)].i((.., hd)).unwrap();
                    sum(&((a2 - a).unwrap() * g).unwrap())
                })
                .sum()
        };
        let kc = hc.cache_ref().get(HookPoint::RotK(l)).unwrap().clone();
        let qc = hc.cache_ref().get(HookPoint::RotQ(l)).unwrap().clone();
        for (kvh, pos) in [(0usize, 2usize), (model.cfg.n_kv_heads - 1, 9)] {
            let want = brute(
                Patch::new(HookPoint::RotK(l), Intervention::Replace(kc.clone())).positions(&[pos]).heads(&[kvh]),
                (kvh * group..(kvh + 1) * group).collect(),
            );
            assert!((kq.get(l, pos, kvh) - want).abs() < 1e-9 * want.abs().max(1e-3), "{name}: key KV{kvh}@{pos}: {} vs {want}", kq.get(l, pos, kvh));
        }
        for (hd, pos) in [(1usize, 4usize), (3, 11)] {
            let want = brute(Patch::new(HookPoint::RotQ(l), Intervention::Replace(qc.clone())).positions(&[pos]).heads(&[hd]), vec![hd]);
            assert!((qq.get(l, pos, hd) - want).abs() < 1e-9 * want.abs().max(1e-3), "{name}: query H{hd}@{pos}: {} vs {want}", qq.get(l, pos, hd));
        }

        // EAP: per-head receivers add up to the block receiver; into the logits, the senders plus
        // the embedding add up to the residual difference times its gradient.
        let blocks = edge_attribution(&model, &rawd, &EdgeOptions { head_inputs: false }).unwrap();
        let heads = edge_attribution(&model, &rawd, &EdgeOptions { head_inputs: true }).unwrap();
        for rl in 1..n {
            for sender in [Node::Head(0, 1), Node::Mlp(0)] {
                let block: f64 = blocks.iter().filter(|e| e.sender == sender && e.receiver == Receiver::Attn(rl)).map(|e| e.score).sum();
                let parts: f64 = heads.iter().filter(|e| e.sender == sender && matches!(e.receiver, Receiver::Head(x, _, _) if x == rl)).map(|e| e.score).sum();
                assert!((block - parts).abs() < 1e-9 * block.abs().max(1e-3), "{name}: {sender:?} -> ATTN{rl}: {block} vs {parts}");
            }
        }
        if model.cfg.norm_placement == NormPlacement::Pre {
            // Exact decomposition holds when what a head writes is its hook_result.
            let lastp = HookPoint::ResidPost(n - 1);
            let pts = [lastp, HookPoint::Embed];
            let mut hk = Hooks::new().cache_hooks(&pts).grad(&[lastp]);
            let run = model.run_with_grads(&corrupt, &mut hk, |l| Ok(raw.per_row(l)?.mean_all()?)).unwrap();
            let mut hc = Hooks::new().cache_hooks(&pts);
            model.run(&clean, &mut hc).unwrap();
            let d = |h: HookPoint| (hc.cache_ref().get(h).unwrap() - hk.cache_ref().get(h).unwrap()).unwrap();
            let total = sum(&(d(lastp) * &run.grads[&lastp]).unwrap());
            let embed = sum(&(d(HookPoint::Embed) * &run.grads[&lastp]).unwrap());
            let senders: f64 = blocks.iter().filter(|e| e.receiver == Receiver::Logits).map(|e| e.score).sum();
            assert!((senders + embed - total).abs() < 1e-9 * total.abs().max(1.0), "{name}: logits receiver {senders} + {embed} vs {total}");
        }
        // A parallel block has no edge from its heads to its own MLP.
        let own = blocks.iter().any(|e| e.sender == Node::Head(0, 0) && e.receiver == Receiver::Mlp(0));
        assert_eq!(own, !model.cfg.parallel_attn_mlp, "{name}: head -> own MLP edge");
        eprintln!("{name}: methods ok");
    }
}

/// Decoding with a KV cache (prefill in chunks, then token by token, fused attention step where
/// allowed, sliding windows shorter than the context) gives the full forward's logits and the
/// full pattern's argmax.
#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    for name in FAMILIES {
        let model = family(name, DType::F32);
        let r = refs(name);
        let mut seq: Vec<u32> = r["p0.input_ids"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        seq.extend(r["p1.input_ids"].to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap());
        check_kv_against_full(&model, &seq, 7, 3, 1e-4, &[]);
        check_kv_against_full(&model, &seq, 5, 2, 1e-4, &[(0, 1)]);
    }
}

/// Config fields that change the math and that ferrolens does not implement are errors naming
/// the field, never ignored.
#[test]
fn unimplemented_config_fields_are_refused_by_name() {
    let base = std::fs::read_to_string(fixtures().join("families/llama/config.json")).unwrap();
    let j: serde_json::Value = serde_json::from_str(&base).unwrap();
    let dir = std::env::temp_dir().join(format!("ferrolens-refuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join("families/llama/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let try_cfg = |edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let mut c = j.clone();
        edit(&mut c);
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        load_hf_dir(&dir, &LoadOptions::default()).unwrap_err().to_string()
    };
    let e = try_cfg(&|c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    assert!(e.contains("rope_scaling type `yarn`"), "{e}");
    let e = try_cfg(&|c| c["hidden_act"] = "relu2".into());
    assert!(e.contains("hidden_act `relu2`"), "{e}");
    let e = try_cfg(&|c| c["model_type"] = "mamba".into());
    assert!(e.contains("model_type `mamba`") && e.contains("gemma3_text"), "{e}");
    let e = try_cfg(&|c| {
        c["model_type"] = "mistral".into();
        c["sliding_window"] = "wide".into();
    });
    assert!(e.contains("sliding_window"), "{e}");
    let gemma = std::fs::read_to_string(fixtures().join("families/gemma3/config.json")).unwrap();
    let mut g: serde_json::Value = serde_json::from_str(&gemma).unwrap();
    g["layer_types"][0] = "chunked_attention".into();
    let e = ferrolens::model::arch::gemma3::from_hf(&g, "g").unwrap_err().to_string();
    assert!(e.contains("layer_types entry `chunked_attention`"), "{e}");
    g["layer_types"][0] = "sliding_attention".into();
    g["use_bidirectional_attention"] = true.into();
    let e = ferrolens::model::arch::gemma3::from_hf(&g, "g").unwrap_err().to_string();
    assert!(e.contains("use_bidirectional_attention"), "{e}");
    let mut c = j.clone();
    c.as_object_mut().unwrap().remove("hidden_size");
    let e = ferrolens::model::arch::llama::from_hf(&c, "x").unwrap_err().to_string();
    assert!(e.contains("missing field `hidden_size`"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
