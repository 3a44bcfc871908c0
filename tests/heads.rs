//! Head detectors equal TransformerLens 2.18 `head_detector` (mul measure) on the tiny GPT-2
//! (fixtures/tiny-gpt2/head_detector.json, made by scripts/head_detector_reference.py).

mod common;
use candle_core::DType;
use common::*;
use ferrolens::methods::heads::{detect_heads, repeated_random_tokens, Detector};

#[test]
fn head_detectors_match_transformer_lens() {
    let model = tiny_gpt2(DType::F32);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-gpt2/head_detector.json")).unwrap()).unwrap();
    let tokens = repeated_random_tokens(4, 10, 1, 1000, 5, None);
    let want: Vec<Vec<u32>> = serde_json::from_value(r["tokens"].clone()).unwrap();
    assert_eq!(tokens, want, "the token generator must match the script's copy");
    let all = detect_heads(&model, &tokens, &Detector::ALL, false, false).unwrap();
    for (d, got) in Detector::ALL.into_iter().zip(all) {
        for l in 0..2 {
            for h in 0..4 {
                let w = r[d.name()][l][h].as_f64().unwrap();
                assert!((got[l][h] - w).abs() < 1e-5, "{} L{l}H{h}: {} vs TL {w}", d.name(), got[l][h]);
            }
        }
    }
    // A pattern that is exactly the reference scores 1: the previous-token pattern checked on itself.
    let t = &tokens[0];
    let p = Detector::PreviousToken.pattern(t);
    assert_eq!(p.iter().sum::<f64>(), (t.len() - 1) as f64);
    // Induction targets the token after the first copy: position 10+k attends to k+1.
    let ind = Detector::Induction.pattern(t);
    assert_eq!(ind[13 * t.len() + 4], 1.0);
}
