//! Retrieval heads: the KV-cache path against the full forward, a hand-built model whose copying
//! head is known, the uniform-attention mask, ROUGE-1, prompt construction and a memory bound on
//! the streaming path.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{check_kv_against_full, max_abs, smollm2, tiny_gpt2};
use ferrolens::methods::retrieval::{build_prompt, decode_with_copy_hits, default_needles, rouge1_recall, PromptFormat};
use ferrolens::model::*;

#[test]
fn kv_cache_matches_full_forward_tiny_gpt2() {
    let m = tiny_gpt2(DType::F64);
    let ids: Vec<u32> = (0..23).map(|i| (i * 37 + 11) % m.cfg.d_vocab as u32).collect();
    check_kv_against_full(&m, &ids, 17, 5, 1e-10, &[]);
    check_kv_against_full(&m, &ids, 17, 4, 1e-10, &[(0, 1), (1, 0)]);
}

#[test]
fn kv_cache_matches_full_forward_smollm2() {
    let m = smollm2();
    let ids = m
        .tokenizer()
        .unwrap()
        .encode("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid, and the capital of France is")
        .unwrap();
    assert!(ids.len() > 24, "{} tokens", ids.len());
    let n = ids.len();
    check_kv_against_full(m, &ids, n - 4, 7, 2e-4, &[]);
    check_kv_against_full(m, &ids, n - 2, 9, 2e-4, &[(3, 2), (17, 0), (29, 8)]);
}

/// A masked head's pattern is uniform over the positions it may see: 1/(i+1) at query i.
#[test]
fn uniform_attention_is_uniform_and_causal() {
    let m = tiny_gpt2(DType::F64);
    let ids = Tensor::new(&[[5u32, 9, 2, 7, 1, 3]], &Device::Cpu).unwrap();
    let mut hooks = Hooks::new().uniform_attention(&[(1, 2)]).cache_hooks(&[HookPoint::Pattern(1)]);
    m.run(&ids, &mut hooks).unwrap();
    let p = hooks.cache_ref().get(HookPoint::Pattern(1)).unwrap().get(0).unwrap(); // [h,q,k]
    let rows: Vec<Vec<f64>> = p.get(2).unwrap().to_vec2().unwrap();
    for (i, row) in rows.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let want = if j <= i { 1.0 / (i + 1) as f64 } else { 0.0 };
            assert!((v - want).abs() < 1e-12, "query {i} key {j}: {v} vs {want}");
        }
    }
    // Other heads are untouched.
    let mut plain = Hooks::new().cache_hooks(&[HookPoint::Pattern(1)]);
    m.run(&ids, &mut plain).unwrap();
    let q = plain.cache_ref().get(HookPoint::Pattern(1)).unwrap().get(0).unwrap();
    assert!(max_abs(&p.get(0).unwrap(), &q.get(0).unwrap()) == 0.0);
    // Bad head / layer.
    let e = m.run(&ids, &mut Hooks::new().uniform_attention(&[(0, 99)])).unwrap_err().to_string();
    assert!(e.contains("head 99"), "{e}");
    let e = m.run(&ids, &mut Hooks::new().uniform_attention(&[(7, 0)])).unwrap_err().to_string();
    assert!(e.contains("layer 7"), "{e}");
}

/// A one-layer GPT-2-style model built by hand. Residual = one-hot token (first `V` coordinates)
/// plus one-hot position (next `N`). Head 0 attends from position `i` to `i - c` and writes that
/// position's token to the residual, so the model predicts `tokens[i - c]` (a pure copier);
/// head 1 attends to position 0 and writes nothing. MLP weights are zero.
fn copy_model(v: usize, n: usize, c: usize) -> HookedTransformer {
    let dev = Device::Cpu;
    let d = v + n; // d_model
    let dh = n.max(v); // d_head
    let (h, dm) = (2usize, 4usize);
    let t = |data: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(data, shape, &dev).unwrap();
    let mut embed = vec![0f32; v * d];
    (0..v).for_each(|i| embed[i * d + i] = 1.0);
    let mut pos = vec![0f32; n * d];
    (0..n).for_each(|i| pos[i * d + v + i] = 1.0);
    let (mut wq, mut wk, mut wv, mut wo) = (vec![0f32; d * h * dh], vec![0f32; d * h * dh], vec![0f32; d * h * dh], vec![0f32; h * dh * d]);
    let col = |head: usize, j: usize| head * dh + j;
    for i in 0..n {
        // head 0: query at i looks for key i - c; keys are their position.
        if i >= c {
            wq[(v + i) * h * dh + col(0, i - c)] = 4.0;
        }
        wk[(v + i) * h * dh + col(0, i)] = 1.0;
        // head 1: every query has a positive weight on dim 0 after LayerNorm's centring; only
        // position 0's key does.
        wq[(v + i) * h * dh + col(1, 0)] = -4.0;
    }
    wk[v * h * dh + col(1, 0)] = 4.0;
    for tkn in 0..v {
        wv[tkn * h * dh + col(0, tkn)] = 1.0; // head 0 values: the token
        wo[col(0, tkn) * d + tkn] = 1.0; // head 0 writes it back to the token coordinates
    }
    let ones = Tensor::ones(d, DType::F32, &dev).unwrap();
    let zeros = Tensor::zeros(d, DType::F32, &dev).unwrap();
    let ln = || NormWeights { w: ones.clone(), b: Some(zeros.clone()) };
    let mut unembed = vec![0f32; d * v];
    (0..v).for_each(|i| unembed[i * v + i] = 1.0);
    let w = Weights {
        embed: t(embed, (v, d)),
        pos_embed: Some(t(pos, (n, d))),
        blocks: vec![BlockWeights {
            ln1: Some(ln()),
            attn: AttnWeights {
                w_q: t(wq, (d, h * dh)),
                b_q: None,
                w_k: t(wk, (d, h * dh)),
                b_k: None,
                w_v: t(wv, (d, h * dh)),
                b_v: None,
                w_o: t(wo, (h * dh, d)),
                b_o: None,
                q_norm: None,
                k_norm: None,
            },
            ln1_post: None,
            ln2: Some(ln()),
            mlp: MlpWeights { w_in: t(vec![0.0; d * dm], (d, dm)), b_in: None, w_gate: None, b_gate: None, w_out: t(vec![0.0; dm * d], (dm, d)), b_out: None },
            ln2_post: None,
        }],
        ln_final: ln(),
        unembed: t(unembed, (d, v)),
        b_u: None,
    };
    let mut cfg = ferrolens::model::arch::gpt2::from_hf(
        &serde_json::json!({"vocab_size": v, "n_positions": n, "n_embd": d, "n_layer": 1, "n_head": h, "n_inner": dm, "tie_word_embeddings": false}),
        "copy-model",
    )
    .unwrap();
    // Heads wider than d_model / h (a shape GPT-2's config cannot state).
    cfg.d_head = dh;
    cfg.attn_scale = 1.0 / (dh as f64).sqrt();
    HookedTransformer::new(cfg, w).unwrap()
}

#[test]
fn known_copy_head_gets_the_expected_score() {
    let (v, n, c) = (16usize, 64usize, 8usize);
    let m = copy_model(v, n, c);
    let prompt: Vec<u32> = (0..40u32).map(|i| 1 + (i * 7 + 3) % 15).collect();
    let p = prompt.len();
    // The needle starts 2 tokens before the first copied position and is 6 tokens long: decode
    // steps 0..3 copy from inside it (positions p-1-c .. p-1-c+3), later steps from outside.
    let span = (p - 1 - c - 2)..(p - 1 - c + 4);
    let run = decode_with_copy_hits(&m, &prompt, span.clone(), 8, &[], 5, &mut Hooks::new()).unwrap();
    let want: Vec<u32> = (0..8).map(|s| if s <= c { prompt[p - 1 + s - c] } else { run.generated[s - c - 1] }).collect();
    assert_eq!(run.generated, want, "the model must copy tokens[i - {c}]");
    let score = |hits: f64| hits / span.len() as f64;
    assert!((score(run.hits[0][0]) - 4.0 / 6.0).abs() < 1e-12, "copy head score {} (want 4/6)", score(run.hits[0][0]));
    assert_eq!(run.hits[0][1], 0.0, "head 1 attends to position 0, outside the needle");
    // Same prompt, needle moved elsewhere: no hits although the head still copies.
    let run2 = decode_with_copy_hits(&m, &prompt, 2..10, 8, &[], 64, &mut Hooks::new()).unwrap();
    assert_eq!(run2.generated, run.generated);
    assert_eq!(run2.hits[0][0], 0.0);
    // Masking the copy head (uniform attention) breaks the copy and its hits.
    let masked = decode_with_copy_hits(&m, &prompt, span.clone(), 8, &[], 5, &mut Hooks::new().uniform_attention(&[(0, 0)])).unwrap();
    assert_ne!(masked.generated, run.generated);
    assert_eq!(masked.hits[0][0], 0.0);
    // Masking the other head changes nothing.
    let other = decode_with_copy_hits(&m, &prompt, span, 8, &[], 5, &mut Hooks::new().uniform_attention(&[(0, 1)])).unwrap();
    assert_eq!(other.generated, run.generated);
    assert_eq!(other.hits, run.hits);
}

#[test]
fn decode_rejects_bad_requests() {
    let m = copy_model(16, 64, 8);
    let prompt: Vec<u32> = (0..40).map(|i| 1 + i % 15).collect();
    let e = decode_with_copy_hits(&m, &prompt, 30..50, 4, &[], 8, &mut Hooks::new()).unwrap_err().to_string();
    assert!(e.contains("outside the prompt"), "{e}");
    let e = decode_with_copy_hits(&m, &prompt, 3..6, 30, &[], 8, &mut Hooks::new()).unwrap_err().to_string();
    assert!(e.contains("context of 64 tokens"), "{e}");
    let mut kv = KvCache::new(3);
    let t = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let e = m.run_with_kv_cache(&t, &mut kv, true, &mut Hooks::new()).unwrap_err().to_string();
    assert!(e.contains("KvCache::new"), "{e}");
    let mut kv = KvCache::new(1);
    m.run_with_kv_cache(&t, &mut kv, true, &mut Hooks::new()).unwrap();
    let t2 = Tensor::new(&[[1u32], [2]], &Device::Cpu).unwrap();
    let e = m.run_with_kv_cache(&t2, &mut kv, true, &mut Hooks::new()).unwrap_err().to_string();
    assert!(e.contains("one cache per batch"), "{e}");
    let empty = Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap();
    assert!(m.run_with_kv_cache(&empty, &mut KvCache::new(1), true, &mut Hooks::new()).is_err());
    assert!(m.prefill(&empty, &mut KvCache::new(1), 8, &mut Hooks::new()).is_err());
    let long = Tensor::new(vec![1u32; 63], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let e = m.prefill(&long, &mut kv, 16, &mut Hooks::new()).unwrap_err().to_string();
    assert!(e.contains("at most 64"), "{e}");
}

#[test]
fn answer_window_finds_the_best_matching_span() {
    use ferrolens::methods::retrieval::answer_window;
    assert_eq!(answer_window(&[1, 2, 3, 4, 5, 6], &[3, 4, 5]), Some(2..5));
    // One token differs (tokenized differently in context): still the best window.
    assert_eq!(answer_window(&[1, 2, 3, 9, 5, 6], &[3, 4, 5]), Some(2..5));
    assert_eq!(answer_window(&[1, 2, 3], &[7, 8]), None);
    assert_eq!(answer_window(&[1, 2], &[1, 2, 3]), None);
    let tok = smollm2().tokenizer().unwrap();
    let mut bad = default_needles()[0].clone();
    bad.answer = "an unrelated reply about bicycles".into();
    let hay = tok.encode(&"The quick brown fox jumps over the lazy dog. ".repeat(60)).unwrap();
    let e = build_prompt(tok, &PromptFormat::for_tokenizer(tok), &hay, &bad, 300, 0.5).unwrap_err().to_string();
    assert!(e.contains("does not occur in the needle"), "{e}");
}

#[test]
fn rouge1_recall_counts_words_with_multiplicity() {
    assert_eq!(rouge1_recall("eat a sandwich", "I would eat a sandwich."), 1.0);
    assert_eq!(rouge1_recall("Silver falcon seventeen", "silver FALCON"), 2.0 / 3.0);
    // Repeated reference words need repeated candidate words.
    assert_eq!(rouge1_recall("a b a b", "a b"), 0.5);
    assert_eq!(rouge1_recall("smoked paprika", "nothing here"), 0.0);
    assert_eq!(rouge1_recall("", "anything"), 0.0);
}

#[test]
fn prompts_have_the_asked_length_and_the_needle_after_a_sentence() {
    let m = smollm2();
    let tok = m.tokenizer().unwrap();
    let fmt = PromptFormat::for_tokenizer(tok);
    assert!(fmt.prefix.starts_with("<|im_start|>"), "SmolLM2 is a ChatML model");
    let hay_text = std::fs::read_to_string(common::fixtures().join("haystack/factbook-backgrounds.txt")).unwrap();
    for n in default_needles() {
        assert!(!hay_text.contains(&n.needle), "the haystack must not contain the needle");
    }
    let hay = tok.encode(&hay_text).unwrap();
    assert!(hay.len() > 8192, "the haystack has {} tokens", hay.len());
    let needle = &default_needles()[0];
    for (len, depth) in [(300usize, 0.0f64), (600, 0.5), (1000, 1.0)] {
        let p = build_prompt(tok, &fmt, &hay, needle, len, depth).unwrap();
        assert_eq!(p.ids.len(), len);
        let text = tok.decode(&p.ids[p.needle_span.clone()]).unwrap();
        assert_eq!(text.trim(), needle.needle);
        // Copy hits count in the answer's tokens, inside the needle.
        assert!(p.needle_span.start <= p.answer_span.start && p.answer_span.end <= p.needle_span.end);
        assert_eq!(tok.decode(&p.ids[p.answer_span.clone()]).unwrap().trim(), needle.answer);
        assert!(p.actual_depth <= depth + 1e-9 && p.actual_depth > depth - 0.2, "depth {depth} -> {}", p.actual_depth);
        if p.needle_span.start > tok.encode(&fmt.prefix).unwrap().len() {
            let before = tok.decode(&p.ids[p.needle_span.start - 1..p.needle_span.start]).unwrap();
            assert!(before.trim_end().ends_with('.'), "needle inserted after {before:?}");
        }
    }
    let e = build_prompt(tok, &fmt, &hay, needle, 40, 0.5).unwrap_err().to_string();
    assert!(e.contains("no room"), "{e}");
    let e = build_prompt(tok, &fmt, &hay[..100], needle, 1000, 0.5).unwrap_err().to_string();
    assert!(e.contains("haystack has 100 tokens"), "{e}");
    let e = build_prompt(tok, &fmt, &hay, needle, 1000, 1.5).unwrap_err().to_string();
    assert!(e.contains("outside [0, 1]"), "{e}");
}

/// Peak and current resident memory of this process (Linux), in bytes.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let l = s.lines().find(|l| l.starts_with(name)).unwrap();
        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The streaming path at an 8192-token context on a random 2-layer model: a full score matrix
/// would be 4 heads x 8192² x 4 bytes = 1 GiB per layer; chunked prefill (128 positions) and
/// decoding must stay within the KV cache plus 8 score blocks (`[4, 128, 8192]` f32 = 16 MiB each:
/// scores, mask, softmax temporaries) plus 48 MiB. Runs in a child process so that other tests'
/// memory does not count.
#[test]
fn streaming_memory_is_bounded() {
    if std::env::var("FERROLENS_MEMORY_CHILD").is_ok() {
        return memory_child();
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "streaming_memory_is_bounded", "--nocapture", "--test-threads=1"])
        .env("FERROLENS_MEMORY_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    let at = text.find("MEMORY ").unwrap_or_else(|| panic!("no MEMORY line in:\n{text}"));
    let v: Vec<f64> = text[at..].lines().next().unwrap().split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
    let (growth, kv, block) = (v[0], v[1], v[2]);
    let mib = 1024.0 * 1024.0;
    println!("peak growth {:.0} MiB, KV cache {:.1} MiB, score block {:.0} MiB", growth / mib, kv / mib, block / mib);
    assert!(growth < kv + 8.0 * block + 48.0 * mib, "peak memory grew by {:.0} MiB (KV cache {:.1} MiB)", growth / mib, kv / mib);
    assert!(growth < 1024.0 * mib, "a full score matrix would be 1 GiB; the streaming path used {:.0} MiB", growth / mib);
}

fn memory_child() {
    let (t, d, h, dh, layers, v) = (8192usize, 64usize, 4usize, 16usize, 2usize, 256usize);
    let dev = Device::Cpu;
    let r = |shape: &[usize], s: f64| Tensor::randn(0f32, s as f32, shape, &dev).unwrap();
    let norm = || NormWeights { w: Tensor::ones(d, DType::F32, &dev).unwrap(), b: None };
    let blocks = (0..layers)
        .map(|_| BlockWeights {
            ln1: Some(norm()),
            attn: AttnWeights {
                w_q: r(&[d, h * dh], 0.3),
                b_q: None,
                w_k: r(&[d, h * dh], 0.3),
                b_k: None,
                w_v: r(&[d, h * dh], 0.1),
                b_v: None,
                w_o: r(&[h * dh, d], 0.1),
                b_o: None,
                q_norm: None,
                k_norm: None,
            },
            ln1_post: None,
            ln2: Some(norm()),
            mlp: MlpWeights { w_in: r(&[d, 4 * d], 0.1), b_in: None, w_gate: Some(r(&[d, 4 * d], 0.1)), b_gate: None, w_out: r(&[4 * d, d], 0.1), b_out: None },
            ln2_post: None,
        })
        .collect();
    let w = Weights { embed: r(&[v, d], 1.0), pos_embed: None, blocks, ln_final: norm(), unembed: r(&[d, v], 0.1), b_u: None };
    let cfg = ferrolens::model::arch::llama::from_hf(
        &serde_json::json!({"vocab_size": v, "hidden_size": d, "intermediate_size": 4 * d, "num_hidden_layers": layers,
            "num_attention_heads": h, "max_position_embeddings": t + 8, "rms_norm_eps": 1e-5}),
        "random-llama",
    )
    .unwrap();
    let m = HookedTransformer::new(cfg, w).unwrap();
    let prompt: Vec<u32> = (0..t as u32).map(|i| (i * 31 + 7) % v as u32).collect();
    let (_, before) = rss();
    let chunk = 128;
    let run = decode_with_copy_hits(&m, &prompt, 100..120, 4, &[], chunk, &mut Hooks::new()).unwrap();
    assert_eq!(run.generated.len(), 4);
    let (peak, _) = rss();
    let kv_bytes = (layers * 2 * (t + 4) * h * dh * 4) as f64;
    let block = (h * chunk * t * 4) as f64;
    println!("MEMORY {} {} {}", peak.saturating_sub(before), kv_bytes, block);
}

/// The fused decode step (CPU reference of the CUDA kernel) against the unfused formula:
/// GQA (8 query heads on 2 KV heads), two heads made uniform.
#[test]
fn fused_decode_attention_matches_the_formula() {
    let dev = Device::Cpu;
    let (b, h, kvh, t, d) = (2usize, 8usize, 2usize, 37usize, 16usize);
    let q = Tensor::randn(0f32, 1.0, (b, h, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (b, t, kvh, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (b, t, kvh, d), &dev).unwrap();
    let scale = 0.25;
    let (z, arg) = ferrolens::model::fused::decode_attention(&q, &k, &v, scale, &[1, 6]).unwrap();
    assert_eq!(z.dims(), &[b, h, d]);
    assert_eq!(arg.dims(), &[b, h]);
    let qv: Vec<Vec<Vec<f32>>> = q.to_vec3().unwrap();
    let kf: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
    let vf: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
    let zv: Vec<Vec<Vec<f32>>> = z.to_vec3().unwrap();
    let av: Vec<Vec<u32>> = arg.to_vec2().unwrap();
    for bi in 0..b {
        for head in 0..h {
            let g = head / (h / kvh);
            let at = |buf: &[f32], j: usize, c: usize| buf[((bi * t + j) * kvh + g) * d + c] as f64;
            let uniform = head == 1 || head == 6;
            let s: Vec<f64> = (0..t).map(|j| if uniform { 0.0 } else { (0..d).map(|c| qv[bi][head][c] as f64 * at(&kf, j, c)).sum::<f64>() * scale }).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let want_arg = s.iter().position(|x| *x == m).unwrap();
            assert_eq!(av[bi][head] as usize, want_arg, "row {bi} head {head}");
            let den: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for (c, got) in zv[bi][head].iter().enumerate().take(d) {
                let want: f64 = (0..t).map(|j| (s[j] - m).exp() / den * at(&vf, j, c)).sum();
                assert!((*got as f64 - want).abs() < 1e-5, "row {bi} head {head} col {c}: {got} vs {want}");
            }
        }
    }
    let e = ferrolens::model::fused::decode_attention(&q, &k, &v, scale, &[8]).unwrap_err().to_string();
    assert!(e.contains("head 8"), "{e}");
}

/// Decoding with the fused step and with the generic path gives the same logits and argmaxes.
#[test]
fn fused_and_generic_decoding_agree_on_smollm2() {
    let m = smollm2();
    let ids = m.tokenizer().unwrap().encode("The password to the lighthouse is silver falcon. Repeat it: the password to the lighthouse is").unwrap();
    let all = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let n = ids.len();
    let mut out = vec![];
    for fused in [true, false] {
        let mut kv = KvCache::new(m.cfg.n_layers).with_argmax().fused(fused);
        let mut hooks = Hooks::new().uniform_attention(&[(5, 4)]);
        m.prefill(&all.narrow(1, 0, n - 3).unwrap(), &mut kv, 8, &mut hooks).unwrap();
        let mut steps = vec![];
        for pos in n - 3..n {
            let l = m.run_with_kv_cache(&all.narrow(1, pos, 1).unwrap(), &mut kv, true, &mut hooks).unwrap();
            steps.push((l, kv.argmax_rows(0).unwrap()));
        }
        out.push(steps);
    }
    for ((lf, af), (lg, ag)) in out[0].iter().zip(&out[1]) {
        assert!(max_abs(lf, lg) < 1e-4, "fused vs generic logits: {}", max_abs(lf, lg));
        for (l, (rf, rg)) in af.iter().zip(ag).enumerate() {
            for (hd, (x, y)) in rf.iter().zip(rg).enumerate() {
                if (l, hd) != (5, 4) {
                    assert_eq!(x, y, "argmax at layer {l} head {hd}");
                }
            }
        }
    }
}

/// Against Hugging Face transformers (scripts/retrieval_reference.py: eager attention, greedy
/// decoding with past_key_values, argmax of `output_attentions` per head): the same prompt ids
/// and spans from `build_prompt`, the same 24 generated tokens and the same copy hits per head.
#[test]
fn copy_hits_match_hugging_face() {
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("smollm2/retrieval_reference.json")).unwrap()).unwrap();
    let v = |k: &str| -> Vec<u32> { r[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let (ids, generated) = (v("ids"), v("generated"));
    let span = |k: &str| -> std::ops::Range<usize> {
        let s = v(k);
        s[0] as usize..s[1] as usize
    };
    let m = smollm2();
    let tok = m.tokenizer().unwrap();
    let hay = tok.encode(&std::fs::read_to_string(common::fixtures().join("haystack/factbook-backgrounds.txt")).unwrap()).unwrap();
    let p = build_prompt(tok, &PromptFormat::for_tokenizer(tok), &hay, &default_needles()[0], ids.len(), 0.5).unwrap();
    assert_eq!(p.ids, ids, "prompt ids differ from the reference script's");
    assert_eq!(p.needle_span, span("needle_span"));
    assert_eq!(p.answer_span, span("answer_span"));
    let run = decode_with_copy_hits(m, &ids, p.answer_span.clone(), generated.len(), &[], 128, &mut Hooks::new()).unwrap();
    assert_eq!(run.generated, generated, "greedy tokens differ from HF");
    let want: Vec<Vec<f64>> = r["hits"].as_array().unwrap().iter().map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect();
    let (mut same, mut total, mut hit_heads) = (0, 0, 0);
    for (a, b) in run.hits.iter().flatten().zip(want.iter().flatten()) {
        total += 1;
        same += usize::from(a == b);
        hit_heads += usize::from(*b > 0.0);
    }
    eprintln!("copy hits equal to HF for {same} of {total} heads ({hit_heads} heads with hits)");
    assert!(hit_heads >= 10, "the reference must exercise the scorer");
    // Argmax ties broken differently by a 1e-6 score difference may flip a rare hit; allow 1%.
    assert!(same * 100 >= total * 99, "copy hits differ from HF on {} of {total} heads", total - same);
}
