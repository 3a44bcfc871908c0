#!/usr/bin/env python3
"""Time TransformerLens 2.18 and ferrolens on the same machine in one run; print a markdown table.

Usage: python scripts/bench_vs_tl.py --smollm2-gguf PATH --pairs FILE.jsonl [--ferrolens target/release/ferrolens]
       python scripts/bench_vs_tl.py --gemma3-gguf PATH --pairs FILE.jsonl ...   # Gemma-3-270M
Measures (median of --repeat after a warm-up): plain forward, forward with a full cache, AtP over
hook_z/resid_pre/attn_out/mlp_out (TL: hooks saving activations and gradients, as in TL's
attribution-patching demo), and the exact head sweep get_act_patch_attn_head_out_all_pos (once).

Gemma-3-270M: make the pairs with `ferrolens data --model gemma3-270m`; TL loads google/gemma-3-270m
from transformers' reading of the GGUF (its config is written to a throwaway offline hub cache, as
TL asks the hub for it), prompts are encoded with the GGUF's own SentencePiece vocabulary (BOS first,
as ferrolens does; transformers' GGUF tokenizer splits Gemma's text differently).
"""
import argparse, json, os, subprocess, sys, tempfile, time
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patching_reference import load_pairs, load_tl  # noqa: E402


def med(f, n):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def load_gemma3(gguf_path, pairs_path):
    """TL's google/gemma-3-270m on the GGUF's weights, and the pairs encoded as ferrolens encodes
    them: (tl, clean, corrupt, answer ids, wrong ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import HookedTransformer
    from make_references import gemma3_sentencepiece
    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    snap = os.path.join(os.environ["HF_HUB_CACHE"], "models--google--gemma-3-270m")
    os.makedirs(os.path.join(snap, "refs"), exist_ok=True)
    open(os.path.join(snap, "refs", "main"), "w").write("0" * 40)
    hf.config.save_pretrained(os.path.join(snap, "snapshots", "0" * 40))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)  # TL wants one; prompts use SentencePiece
    tl = HookedTransformer.from_pretrained_no_processing("google/gemma-3-270m", hf_model=hf, tokenizer=tok,
                                                         device="cpu", dtype=torch.float32)
    sp = gemma3_sentencepiece(gguf_path)
    bos = sp.bos_id()
    pairs = [json.loads(l) for l in open(pairs_path) if l.strip()]
    ids = lambda key: torch.tensor([[bos] + sp.encode(p[key]) for p in pairs])
    first = lambda key: torch.tensor([sp.encode(p[key])[0] for p in pairs])
    return tl.eval(), ids("clean"), ids("corrupt"), first("answer"), first("wrong")


def main():
    ap = argparse.ArgumentParser()
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--smollm2-gguf")
    model.add_argument("--gemma3-gguf")
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--ferrolens", default="target/release/ferrolens")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-heads", action="store_true")
    a = ap.parse_args()
    if a.gemma3_gguf:
        # Before transformers and huggingface_hub read their settings at import.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="tl-hub-")
    from transformer_lens import patching
    if a.gemma3_gguf:
        tl, clean, corrupt, ans, wrong = load_gemma3(a.gemma3_gguf, a.pairs)
        model_args = ["--model", "gemma3-270m"]
    else:
        tl, tok, _ = load_tl(a.smollm2_gguf)
        clean, corrupt, ans, wrong = load_pairs(tok, a.pairs)
        model_args = []
    idx = torch.arange(len(ans))
    ld = lambda lg: (lg[:, -1][idx, ans] - lg[:, -1][idx, wrong]).mean()
    r = {"torch_threads": torch.get_num_threads(), "batch": clean.shape[0], "seq_len": clean.shape[1]}
    x = torch.randn(1024, 1024)
    y = torch.randn(1024, 1024)
    r["sgemm_1024_gflops"] = 2 * 1024 ** 3 / med(lambda: x @ y, 10) / 1e9
    with torch.no_grad():
        r["forward_s"] = med(lambda: tl(clean), a.repeat)
        r["forward_full_cache_s"] = med(lambda: tl.run_with_cache(clean), a.repeat)
        with torch.no_grad():
            ld_clean = ld(tl(clean)).item()
            ld_corrupt = ld(tl(corrupt)).item()
    metric = lambda lg: (ld(lg) - ld_corrupt) / (ld_clean - ld_corrupt)
    filt = lambda n: n.endswith("hook_z") or n.endswith("hook_resid_pre") or n.endswith("hook_attn_out") or n.endswith("hook_mlp_out")

    def atp():
        tl.reset_hooks()
        with torch.no_grad():
            _, cc = tl.run_with_cache(clean, names_filter=filt)
        acts, grads = {}, {}

        def fwd(t, hook):
            acts[hook.name] = t.detach()

        def bwd(t, hook):
            grads[hook.name] = t.detach()

        tl.add_hook(filt, fwd, "fwd")
        tl.add_hook(filt, bwd, "bwd")
        m = metric(tl(corrupt))
        m.backward()
        tl.reset_hooks()
        out = {}
        for n in acts:
            d = (cc[n] - acts[n]) * grads[n]
            out[n] = d.sum(dim=(0, -1)) if d.dim() == 3 else d.sum(dim=(0, -1))
        return out

    torch.set_grad_enabled(True)
    r["atp_s"] = med(atp, a.repeat)
    torch.set_grad_enabled(False)
    if not a.skip_heads:
        _, cache = tl.run_with_cache(clean)
        t = time.perf_counter()
        patching.get_act_patch_attn_head_out_all_pos(tl, corrupt, cache, metric)
        r["heads_all_pos_s"] = time.perf_counter() - t
    print("transformer_lens:", json.dumps(r), file=sys.stderr)
    what = "sgemm,forward,atp,relp" + ("" if a.skip_heads else ",heads")
    f = json.loads(subprocess.check_output([a.ferrolens, "bench", *model_args, "--data", a.pairs, "--repeat", str(a.repeat), "--what", what]))
    print("ferrolens:", json.dumps(f), file=sys.stderr)
    rows = [("forward (no cache)", "forward_s"), ("forward with full cache", "forward_full_cache_s"),
            ("AtP (z, resid_pre, attn_out, mlp_out)", "atp_s"), ("exact head sweep, all positions", "heads_all_pos_s")]
    print(f"| measurement | TransformerLens (s) | ferrolens (s) | speed-up |\n|---|---|---|---|")
    for name, k in rows:
        if k in r and k in f:
            print(f"| {name} | {r[k]:.3f} | {f[k]:.3f} | {r[k] / f[k]:.2f}x |")
    print(f"| RelP (same components) | n/a (not in TL) | {f['relp_s']:.3f} | |")
    print(f"\nsgemm 1024x1024 f32: torch {r['sgemm_1024_gflops']:.1f} GFLOP/s, candle {f['sgemm_1024_gflops']:.1f} GFLOP/s; "
          f"ferrolens forward {f['forward_gflops']:.1f} GFLOP/s, with full cache {f['forward_full_cache_gflops']:.1f} GFLOP/s"
          + (f", head sweep {f['heads_all_pos_gflops']:.1f} GFLOP/s" if 'heads_all_pos_gflops' in f else "")
          + f" ({f['forward_gflop']:.1f} GFLOP per forward of {f['batch']}x{f['seq_len']} tokens).")


if __name__ == "__main__":
    main()
