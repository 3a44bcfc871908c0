#!/usr/bin/env python3
"""TransformerLens 2.18 references for ferrolens's generic patching (`generic_patching`) on
SmolLM2-135M and the IOI pairs of fixtures/smollm2/ioi4.jsonl.

Usage: python scripts/generic_patching_reference.py --smollm2-gguf PATH \
          --out fixtures/smollm2/generic_patching_reference.json
Writes, for TL's normalised IOI logit difference (denoising: clean activations into the corrupt run):
- pattern_L7: TL `get_act_patch_attn_head_pattern_dest_src_pos` restricted to layer 7 and dest
  positions 10 and 14 (an `index_df` over every head and src position), shape [9, 2, 15];
- k_all_pos: `get_act_patch_attn_head_k_all_pos` (key heads of a GQA model), [30, 3];
- mlp5_slices: `blocks.5.mlp.hook_post` patched one neuron slice of 256 at a time over all
  positions (TL hooks by hand; TL has no neuron preset), [6];
- embed_pos: `hook_embed` patched at each position (a hook before any layer), [15].
"""
import argparse, json, os, sys
import torch
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patching_reference import load_tl, load_pairs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-gguf", required=True)
    ap.add_argument("--pairs", default="fixtures/smollm2/ioi4.jsonl")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    from transformer_lens import patching
    tl, tok, _ = load_tl(a.smollm2_gguf)
    clean, corrupt, ans, wrong = load_pairs(tok, a.pairs)
    idx = torch.arange(len(ans))

    def ld(logits):
        last = logits[:, -1]
        return (last[idx, ans] - last[idx, wrong]).mean()

    _, clean_cache = tl.run_with_cache(clean)
    ld_clean, ld_corrupt = ld(tl(clean)).item(), ld(tl(corrupt)).item()
    metric = lambda logits: (ld(logits) - ld_corrupt) / (ld_clean - ld_corrupt)
    p = clean.shape[1]
    out = {"ld_clean": ld_clean, "ld_corrupt": ld_corrupt, "seq_len": p}
    rows = [(7, h, d, s) for h in range(9) for d in (10, 14) for s in range(p)]
    df = pd.DataFrame(rows, columns=["layer", "head_index", "dest_pos", "src_pos"])
    r = patching.generic_activation_patch(tl, corrupt, clean_cache, metric, patching.layer_head_dest_src_pos_pattern_patch_setter,
                                          "pattern", index_df=df)
    out["pattern_L7"] = r.reshape(9, 2, p).tolist()
    out["k_all_pos"] = patching.get_act_patch_attn_head_k_all_pos(tl, corrupt, clean_cache, metric).tolist()
    name = "blocks.5.mlp.hook_post"
    slices = []
    for s in range(6):
        def hook(act, hook, s=s):
            act[..., 256 * s:256 * (s + 1)] = clean_cache[name][..., 256 * s:256 * (s + 1)]
            return act
        slices.append(metric(tl.run_with_hooks(corrupt, fwd_hooks=[(name, hook)])).item())
    out["mlp5_slices"] = slices
    emb = []
    for q in range(p):
        def hook(act, hook, q=q):
            act[:, q] = clean_cache["hook_embed"][:, q]
            return act
        emb.append(metric(tl.run_with_hooks(corrupt, fwd_hooks=[("hook_embed", hook)])).item())
    out["embed_pos"] = emb
    json.dump(out, open(a.out, "w"))
    print({k: v for k, v in out.items() if k.startswith("ld")}, "max |pattern|", r.abs().max().item())


if __name__ == "__main__":
    main()
