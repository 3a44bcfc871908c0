#!/usr/bin/env python3
"""AtP and RelP references from the official RelP code (the TransformerLens fork FarnoushRJ/RelP,
commit aa0e228) for SmolLM2-135M on IOI pairs, for tests/relp_reference.rs.

The fork is a TransformerLens 2.x with `cfg.use_lrp` and `cfg.LRP_rules` (default LN-rule,
Identity-rule, Half-rule). Put its `TransformerLens/` folder first on the path:

  python scripts/relp_reference.py --fork PATH/TransformerLens --smollm2-gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
      --pairs fixtures/smollm2/ioi4.jsonl --out fixtures/smollm2/relp_reference.json

Scores are Neel Nanda's attribution patching in the denoising direction (ferrolens' default):
score = sum over pairs and features of (a_clean - a_corrupt) * d metric / d a at the corrupt run,
metric = (ld - ld_corrupt) / (ld_clean - ld_corrupt), ld = mean over pairs of
logit[answer] - logit[wrong] at the last position. RelP takes the gradient through the fork's
modified backward (use_lrp=True, fixed when the model is built). Components: hook_z per head
(summed over positions), resid_pre, attn_out, mlp_out per layer and position.
"""
import argparse, json, os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load(fork, gguf_path, use_lrp):
    """The fork's HookedTransformer for SmolLM2 (patching_reference.load_tl's config + use_lrp)."""
    sys.path.insert(0, fork)
    import transformer_lens
    assert os.path.abspath(transformer_lens.__file__).startswith(os.path.abspath(fork)), transformer_lens.__file__
    from patching_reference import load_tl
    tl, tok, _ = load_tl(gguf_path, use_lrp=use_lrp)
    # The fork's default rule set (the identity rule is fixed when the MLPs are built).
    tl.cfg.LRP_rules = ["LN-rule", "Identity-rule", "Half-rule"]
    return tl, tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fork", required=True, help="the fork's TransformerLens/ folder")
    ap.add_argument("--smollm2-gguf", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {"fork": "FarnoushRJ/RelP@aa0e228", "rules": ["LN-rule", "Identity-rule", "Half-rule"]}
    for method, use_lrp in (("atp", False), ("relp", True)):
        tl, tok = load(a.fork, a.smollm2_gguf, use_lrp)
        pairs = [json.loads(l) for l in open(a.pairs) if l.strip()]
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        clean = torch.tensor([enc(p["clean"]) for p in pairs])
        corrupt = torch.tensor([enc(p["corrupt"]) for p in pairs])
        ans = torch.tensor([enc(p["answer"])[0] for p in pairs])
        wrong = torch.tensor([enc(p["wrong"])[0] for p in pairs])
        idx = torch.arange(len(pairs))
        ld = lambda logits: (logits[idx, -1, ans] - logits[idx, -1, wrong]).mean()
        names = lambda n: n.endswith("hook_z") or n.endswith("hook_resid_pre") or n.endswith("hook_attn_out") or n.endswith("hook_mlp_out")
        with torch.no_grad():
            clean_logits, clean_cache = tl.run_with_cache(clean, names_filter=names)
            ld_clean, ld_corrupt = ld(clean_logits).item(), ld(tl(corrupt)).item()
        acts, grads = {}, {}
        def fwd(t, hook):
            acts[hook.name] = t.detach()
        def bwd(t, hook):
            grads[hook.name] = t.detach()
        tl.reset_hooks()
        for name in clean_cache.keys():
            tl.add_hook(name, fwd, "fwd")
            tl.add_hook(name, bwd, "bwd")
        torch.set_grad_enabled(True)
        metric = (ld(tl(corrupt)) - ld_corrupt) / (ld_clean - ld_corrupt)
        metric.backward()
        tl.reset_hooks()
        res = {"ld_clean": ld_clean, "ld_corrupt": ld_corrupt}
        L = tl.cfg.n_layers
        s = lambda n: (clean_cache[n] - acts[n]) * grads[n]
        res["heads"] = [s(f"blocks.{l}.attn.hook_z").sum(dim=(0, 1, 3)).tolist() for l in range(L)]  # [L][h]
        for comp in ("resid_pre", "attn_out", "mlp_out"):
            hook = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}[comp]
            res[comp] = [s(f"blocks.{l}.{hook}").sum(dim=(0, 2)).tolist() for l in range(L)]  # [L][pos]
        out[method] = res
        sys.path.pop(0)
        for m in [m for m in sys.modules if m == "transformer_lens" or m.startswith("transformer_lens.")]:
            del sys.modules[m]
    json.dump(out, open(a.out, "w"))
    print({m: {k: out[m][k] for k in ("ld_clean", "ld_corrupt")} for m in ("atp", "relp")})


if __name__ == "__main__":
    main()
