//! Token ids equal Hugging Face's on a 240-string corpus (fixtures/tokenizers, made by
//! scripts/make_references.py with transformers 4.57).

mod common;
use common::*;
use ferrolens::model::Tokenizer;

fn corpus() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizers/corpus.json")).unwrap()).unwrap()
}

fn expected(name: &str) -> Vec<Vec<u32>> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("tokenizers/{name}_ids.json"))).unwrap()).unwrap()
}

fn check(tok: &Tokenizer, want: &[Vec<u32>]) {
    let c = corpus();
    assert!(c.len() >= 200);
    assert_eq!(c.len(), want.len());
    let mut bad = Vec::new();
    for (s, w) in c.iter().zip(want) {
        let got = tok.encode(s).unwrap();
        if &got != w {
            bad.push(format!("{s:?}: got {got:?}, HF {w:?}"));
        }
    }
    assert!(bad.is_empty(), "{} of {} strings differ:\n{}", bad.len(), c.len(), bad.join("\n"));
}

#[test]
fn gpt2_bpe_matches_hugging_face() {
    let dir = fixtures().join("gpt2-tokenizer");
    let tok = Tokenizer::gpt2(dir.join("encoder.json"), dir.join("vocab.bpe")).unwrap();
    check(&tok, &expected("gpt2"));
    assert_eq!(tok.encode(" Mary").unwrap(), vec![5335]);
    assert_eq!(tok.bos_id(), Some(50256));
}

#[test]
fn smollm2_gguf_tokenizer_matches_hugging_face() {
    let tok = smollm2().tokenizer().unwrap();
    check(tok, &expected("smollm2"));
    // Digits one by one, no prefix space, control tokens special.
    let ids = tok.encode("2026").unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(tok.single_token(" Mary").unwrap(), tok.encode(" Mary").unwrap()[0]);
    let e = tok.single_token(" Christopherson").unwrap_err().to_string();
    assert!(e.contains("not one"), "{e}");
}

/// Gemma-3's GGUF vocabulary as SentencePiece BPE: the same ids as the SentencePiece library with
/// a model built from the same pieces, scores and types (scripts/make_references.py). transformers
/// 4.57's GGUF reader builds a Unigram model instead and splits words into characters (" c ap it
/// al"); ferrolens follows the model's own tokenizer.
#[test]
fn gemma3_gguf_tokenizer_matches_sentencepiece() {
    let model = gemma3();
    let tok = model.tokenizer().unwrap();
    check(tok, &expected("gemma3"));
    assert_eq!(tok.encode("The capital of France is").unwrap(), vec![818, 5279, 529, 7001, 563]);
    // Prompts get <bos> first: Gemma is meaningless without it.
    assert!(model.cfg.prepend_bos);
    assert_eq!(model.encode_prompt("The").unwrap(), vec![2, 818]);
    assert_eq!(tok.single_token(" Mary").unwrap(), 8712);
}
