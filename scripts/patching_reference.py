#!/usr/bin/env python3
"""TransformerLens 2.18 activation-patching references (and timings) for SmolLM2-135M on IOI pairs.

Usage: python scripts/patching_reference.py --smollm2-gguf PATH --pairs fixtures/smollm2/ioi4.jsonl \
          --out fixtures/smollm2/patching_reference.json [--only-time]
The metric is TL's IOI normalised logit difference: (ld - ld_corrupt) / (ld_clean - ld_corrupt),
ld = mean over prompts of logit[answer] - logit[wrong] at the last position.
"""
import argparse, json, os, sys, time
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_tl(gguf_path, use_attn_result=False, **cfg_extra):
    """(TransformerLens model, tokenizer, Hugging Face model) for the SmolLM2 GGUF, with the hand-made
    TL config that reproduces Hugging Face's logits (no weight processing). `cfg_extra` goes to
    HookedTransformerConfig (e.g. the RelP fork's use_lrp)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    cfg = HookedTransformerConfig(d_model=576, d_head=64, n_heads=9, n_key_value_heads=3, d_mlp=1536, n_layers=30,
                                  n_ctx=8192, d_vocab=49152, eps=1e-5, act_fn="silu", normalization_type="RMS",
                                  positional_embedding_type="rotary", rotary_dim=64, rotary_base=100000,
                                  rotary_adjacent_pairs=False, final_rms=True, gated_mlp=True,
                                  original_architecture="LlamaForCausalLM", default_prepend_bos=False,
                                  use_attn_result=use_attn_result, **cfg_extra)
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    return tl.eval(), tok, hf


def load_pairs(tok, path):
    """Clean and corrupt ids [n, p] and answer / wrong ids [n] of a pairs JSONL file."""
    pairs = [json.loads(l) for l in open(path) if l.strip()]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    return (torch.tensor([enc(p["clean"]) for p in pairs]), torch.tensor([enc(p["corrupt"]) for p in pairs]),
            torch.tensor([enc(p["answer"])[0] for p in pairs]), torch.tensor([enc(p["wrong"])[0] for p in pairs]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-gguf", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--out")
    ap.add_argument("--only-time", action="store_true")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    from transformer_lens import patching
    tl, tok, _ = load_tl(a.smollm2_gguf)
    clean, corrupt, ans, wrong = load_pairs(tok, a.pairs)
    idx = torch.arange(len(ans))

    def ld(logits):
        last = logits[:, -1]
        return (last[idx, ans] - last[idx, wrong]).mean()

    clean_logits, clean_cache = tl.run_with_cache(clean)
    ld_clean = ld(clean_logits).item()
    ld_corrupt = ld(tl(corrupt)).item()
    metric = lambda logits: (ld(logits) - ld_corrupt) / (ld_clean - ld_corrupt)
    out = {"ld_clean": ld_clean, "ld_corrupt": ld_corrupt, "n_pairs": len(ans), "seq_len": clean.shape[1]}
    t0 = time.time()
    heads = patching.get_act_patch_attn_head_out_all_pos(tl, corrupt, clean_cache, metric)
    out["time_attn_head_out_all_pos_s"] = time.time() - t0
    out["heads_all_pos"] = heads.tolist()
    if not a.only_time:
        t0 = time.time()
        out["resid_pre"] = patching.get_act_patch_resid_pre(tl, corrupt, clean_cache, metric).tolist()
        out["time_resid_pre_s"] = time.time() - t0
        out["attn_out"] = patching.get_act_patch_attn_out(tl, corrupt, clean_cache, metric).tolist()
        out["mlp_out"] = patching.get_act_patch_mlp_out(tl, corrupt, clean_cache, metric).tolist()
    out["torch_threads"] = torch.get_num_threads()
    print(json.dumps({k: v for k, v in out.items() if k.startswith("time") or k.startswith("ld")}))
    if a.out:
        json.dump(out, open(a.out, "w"))


if __name__ == "__main__":
    main()
