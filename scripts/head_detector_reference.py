#!/usr/bin/env python3
"""TransformerLens 2.18 head_detector scores on the tiny GPT-2 fixture (fixtures/tiny-gpt2/head_detector.json).

The token batch is passed in as ids (repeated random tokens made by ferrolens' LCG, copied here),
so both sides score the same prompts. Usage: python scripts/head_detector_reference.py
"""
import json, os
import torch
from transformers import GPT2LMHeadModel
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.head_detector import (compute_head_attention_similarity_score, get_previous_token_head_detection_pattern,
                                            get_duplicate_token_head_detection_pattern, get_induction_head_detection_pattern)
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lcg_tokens(batch, half, lo, hi, seed):
    M = 2 ** 64
    x = (seed * 6364136223846793005 + 1442695040888963407) % M
    out = []
    for _ in range(batch):
        r = []
        for _ in range(half):
            x = (x * 6364136223846793005 + 1442695040888963407) % M
            r.append(lo + ((x >> 33) % (hi - lo)))
        out.append(r + r)
    return out


hf = GPT2LMHeadModel.from_pretrained(os.path.join(ROOT, "fixtures/tiny-gpt2")).eval()
cfg = HookedTransformerConfig(d_model=64, d_head=16, n_heads=4, n_layers=2, n_ctx=64, d_vocab=1000, d_mlp=256, act_fn="gelu_new",
                              normalization_type="LN", eps=1e-5, positional_embedding_type="standard",
                              original_architecture="GPT2LMHeadModel", default_prepend_bos=False)
tl = HookedTransformer(cfg)
tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                               center_unembed=False, fold_value_biases=False)
toks = lcg_tokens(4, 10, 1, 1000, 5)
pats = {"previous_token": get_previous_token_head_detection_pattern, "duplicate_token": get_duplicate_token_head_detection_pattern,
        "induction": get_induction_head_detection_pattern}
out = {"tokens": toks}
with torch.no_grad():
    for name, fn in pats.items():
        scores = torch.zeros(2, 4)
        for t in toks:
            t = torch.tensor([t])
            _, cache = tl.run_with_cache(t)
            det = fn(t.cpu())
            for l in range(2):
                for h in range(4):
                    scores[l, h] += compute_head_attention_similarity_score(cache["pattern", l][0, h], det, exclude_bos=False,
                                                                            exclude_current_token=False, error_measure="mul")
        out[name] = (scores / len(toks)).tolist()
json.dump(out, open(os.path.join(ROOT, "fixtures/tiny-gpt2/head_detector.json"), "w"))
print(json.dumps(out)[:300])
