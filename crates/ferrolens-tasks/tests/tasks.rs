//! Task generators on the GPT-2 tokenizer (committed fixtures): single-token answers, equal
//! lengths, correct position labels, reproducible seeds, and clear errors.

use ferrolens_model::Tokenizer;
use ferrolens_tasks::{colored, ioi, read_jsonl, PairBatch, Task};
use std::path::PathBuf;

fn gpt2() -> Tokenizer {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gpt2-tokenizer");
    Tokenizer::gpt2(d.join("encoder.json"), d.join("vocab.bpe")).unwrap()
}

#[test]
fn ioi_pairs_are_well_formed() {
    let tok = gpt2();
    let pairs = ioi::generate(&tok, &ioi::IoiConfig { n: 20, seed: 1, ..Default::default() }).unwrap();
    assert_eq!(pairs, ioi::generate(&tok, &ioi::IoiConfig { n: 20, seed: 1, ..Default::default() }).unwrap());
    let batch = PairBatch::new(&tok, pairs.clone(), "ioi").unwrap();
    assert_eq!(batch.len(), 20);
    for (i, p) in pairs.iter().enumerate() {
        let ids = tok.encode(&p.clean).unwrap();
        // Labels point at the names.
        assert_eq!(tok.decode(&[ids[p.labels["IO"]]]).unwrap(), p.answer, "{p:?}");
        assert_eq!(tok.decode(&[ids[p.labels["S1"]]]).unwrap(), p.wrong);
        assert_eq!(tok.decode(&[ids[p.labels["S2"]]]).unwrap(), p.wrong);
        assert_eq!(p.labels["end"], ids.len() - 1);
        // ABC: the corrupt prompt names none of the clean names.
        assert!(!p.corrupt.contains(p.answer.trim()) && !p.corrupt.contains(p.wrong.trim()), "{p:?}");
        // Mixed: even pairs BABA (S first), odd ABBA (IO first).
        assert_eq!(p.labels["IO"] < p.labels["S1"], i % 2 == 1);
    }
    let s2io = ioi::generate(&tok, &ioi::IoiConfig { n: 4, corruption: ioi::IoiCorruption::S2Io, ..Default::default() }).unwrap();
    for p in &s2io {
        let ids = tok.encode(&p.corrupt).unwrap();
        assert_eq!(tok.decode(&[ids[p.labels["S2"]]]).unwrap(), p.answer);
    }
}

#[test]
fn colored_objects_pairs_are_well_formed() {
    let tok = gpt2();
    let cfg = colored::ColoredConfig { n: 12, seed: 2, n_objects: 3, shots: 1, all_lengths: false, wording: colored::Wording::Qa };
    let pairs = colored::generate(&tok, &cfg).unwrap();
    let batch = PairBatch::new(&tok, pairs.clone(), "colored").unwrap();
    assert_eq!(batch.len(), 12);
    for p in &pairs {
        assert!(p.clean.starts_with("Q: On the ") && p.clean.ends_with("?\nA:"), "{}", p.clean);
        assert_eq!(p.clean.matches("Q: ").count(), 2, "one solved example");
        assert_ne!(p.answer, p.wrong);
        let query = p.clean.rsplit("What color is the ").next().unwrap().trim_end_matches("?\nA:");
        let colour = p.answer.trim().to_lowercase();
        let last_q = p.clean.rsplit("Q: ").next().unwrap();
        assert!(last_q.contains(&format!("{colour} {query}")), "{last_q} / {colour} {query}");
        // Labels point at the words they name, in both prompts.
        let ids = tok.encode(&p.clean).unwrap();
        let word = |l: &str| tok.decode(&[ids[p.labels[l]]]).unwrap();
        assert_eq!(word("answer_color"), format!(" {colour}"), "{p:?}");
        assert_eq!(word("wrong_color"), format!(" {}", p.wrong.trim().to_lowercase()), "{p:?}");
        assert!(query.ends_with(word("query").trim()) && query.ends_with(word("answer_object").trim()), "{p:?}");
        assert_eq!(p.labels["end"], ids.len() - 1);
        let wrong_obj = p.corrupt.rsplit("What color is the ").next().unwrap().trim_end_matches("?\nA:");
        assert!(wrong_obj.ends_with(word("wrong_object").trim()), "{p:?}");
        let cids = tok.encode(&p.corrupt).unwrap();
        assert_eq!(tok.decode(&[cids[p.labels["query"]]]).unwrap(), tok.decode(&[ids[p.labels["wrong_object"]]]).unwrap(), "{p:?}");
        assert!(p.labels["answer_object"] < p.labels["query"] && p.labels["wrong_object"] < p.labels["query"]);
    }
    // Every object is one GPT-2 token, so every pair has one length and `all_lengths` changes
    // nothing (tests/cli.rs checks mixed lengths on SmolLM2's tokenizer).
    assert_eq!(colored::generate(&tok, &colored::ColoredConfig { all_lengths: true, ..cfg.clone() }).unwrap(), pairs);
}

#[test]
fn bad_task_input_is_a_clear_error() {
    let tok = gpt2();
    let e = Task::parse("ioii").unwrap_err().to_string();
    assert!(e.contains("unknown task `ioii`"), "{e}");
    let dir = std::env::temp_dir().join(format!("ferrolens-tasks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("empty.jsonl");
    std::fs::write(&f, "\n").unwrap();
    assert!(read_jsonl(&f).unwrap_err().to_string().contains("empty"));
    std::fs::write(&f, "{\"clean\": \"a b\"}\n").unwrap();
    assert!(read_jsonl(&f).unwrap_err().to_string().contains("line 1"));
    let mk = |c: &str, k: &str, a: &str| ferrolens_tasks::PromptPair {
        clean: c.into(),
        corrupt: k.into(),
        answer: a.into(),
        wrong: " John".into(),
        labels: Default::default(),
    };
    let e = PairBatch::new(&tok, vec![mk("When Mary and John", "When Mary and Johnathan went", " Mary")], "f.jsonl").unwrap_err().to_string();
    assert!(e.contains("pair 0") && e.contains("equal lengths"), "{e}");
    // Pairs of different lengths are one left-padded batch, with labels shifted by the padding.
    let mut long = mk("a b c d", "a b c e", " Mary");
    long.labels.insert("end".into(), 3);
    let mut short = mk("a b c", "a b d", " Mary");
    short.labels.insert("end".into(), 2);
    let batch = PairBatch::new(&tok, vec![short.clone(), long], "f.jsonl").unwrap();
    assert_eq!((batch.seq_len(), batch.uniform_len(), batch.pad(0), batch.pad(1)), (4, None, 1, 0));
    assert_eq!(batch.label_indices(), vec![("end".to_string(), vec![3, 3])]);
    assert_eq!(batch.length_groups(), vec![(3, vec![0]), (4, vec![1])]);
    short.labels.insert("end".into(), 9);
    let e = PairBatch::new(&tok, vec![short], "f.jsonl").unwrap_err().to_string();
    assert!(e.contains("pair 0") && e.contains("label `end` points at token 9"), "{e}");
    let e = PairBatch::new(&tok, vec![mk("a b c", "a b d", " Christopherson")], "f.jsonl").unwrap_err().to_string();
    assert!(e.contains("not one"), "{e}");
    // A tokenizer that splits every name (a byte-level BPE with no merges) cannot do IOI.
    let d = dir.join("nomerge");
    std::fs::create_dir_all(&d).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256u32).map(|b| (tok.id_to_token(b).unwrap(), serde_json::json!(b))).collect();
    std::fs::write(d.join("vocab.json"), serde_json::to_string(&vocab).unwrap()).unwrap();
    std::fs::write(d.join("merges.txt"), "#version: 0.2\n").unwrap();
    let bytes = Tokenizer::gpt2(d.join("vocab.json"), d.join("merges.txt")).unwrap();
    let e = ioi::generate(&bytes, &ioi::IoiConfig::default()).unwrap_err().to_string();
    assert!(e.contains("single tokens"), "{e}");
}

/// `query_colors` finds every colour of the query's list (not the solved example's), in order,
/// at the token that spells it; the answer and the wrong colour are among them.
#[test]
fn query_colors_point_at_the_listed_colours() {
    let tok = gpt2();
    let cfg = colored::ColoredConfig { n: 8, seed: 3, n_objects: 3, shots: 2, all_lengths: false, wording: colored::Wording::Qa };
    for p in colored::generate(&tok, &cfg).unwrap() {
        let ids = tok.encode(&p.clean).unwrap();
        let cs = colored::query_colors(&tok, &p.clean).unwrap().expect("a Colored Objects prompt");
        assert_eq!(cs.len(), 3, "{p:?}");
        let last_q = p.clean.rfind("Q: ").unwrap();
        let first_in_query = tok.encode(&p.clean[..last_q]).unwrap().len();
        for w in cs.windows(2) {
            assert!(w[0].1 < w[1].1);
        }
        for (c, i) in &cs {
            assert_eq!(tok.decode(&[ids[*i]]).unwrap(), format!(" {c}"), "{p:?}");
            assert!(*i >= first_in_query, "{c} at {i} is before the query");
        }
        assert!(cs.iter().any(|(_, i)| *i == p.labels["answer_color"]));
        assert!(cs.iter().any(|(_, i)| *i == p.labels["wrong_color"]));
    }
    assert!(colored::query_colors(&tok, "When Mary and John went to the store").unwrap().is_none());
}

/// The statement wording: `... The pen is` answered with a lower-case colour, labels and query
/// colours still pointing at their words.
#[test]
fn colored_objects_statement_wording() {
    let tok = gpt2();
    let cfg = colored::ColoredConfig { n: 6, seed: 4, n_objects: 3, shots: 2, all_lengths: false, wording: colored::Wording::Statement };
    for p in colored::generate(&tok, &cfg).unwrap() {
        assert!(p.clean.starts_with("On the ") && p.clean.ends_with(" is"), "{}", p.clean);
        assert_eq!(p.clean.matches("On the ").count(), 3, "two solved examples");
        assert!(p.answer.starts_with(' ') && p.answer.trim().chars().all(|c| c.is_lowercase()), "{p:?}");
        let ids = tok.encode(&p.clean).unwrap();
        assert_eq!(tok.decode(&[ids[p.labels["answer_color"]]]).unwrap(), p.answer);
        assert_eq!(tok.decode(&[ids[p.labels["wrong_color"]]]).unwrap(), p.wrong);
        let cs = colored::query_colors(&tok, &p.clean).unwrap().unwrap();
        assert_eq!(cs.len(), 3);
        assert!(cs.iter().any(|(c, _)| format!(" {c}") == p.answer));
    }
    assert_eq!("statement".parse::<colored::Wording>().unwrap(), colored::Wording::Statement);
    assert!("nope".parse::<colored::Wording>().unwrap_err().to_string().contains("use qa or statement"));
}
