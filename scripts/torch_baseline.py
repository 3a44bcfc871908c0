#!/usr/bin/env python3
"""PyTorch baseline for docs/benchmarks.md (issue 14): the same work as `ferrolens bench` on the
same card, done the way TransformerLens does it on a Hugging Face model (transformers, sdpa
attention, module hooks), so GPU-vs-PyTorch ratios come from one run on one machine.

    ferrolens models export smollm2-135m --weights f32 --out /tmp/smollm2-hf
    ferrolens data --task ioi --n 16 --seed 11 --out ioi16.jsonl
    python3 scripts/torch_baseline.py --model /tmp/smollm2-hf --data ioi16.jsonl --device cuda --dtype bf16

Timed (median of --repeat after a warm-up, synchronised):
  forward     one forward of the corrupt batch (full logits);
  head_sweep  exact activation patching of every head over all positions, denoising: one corrupt
              forward per (layer, head) with that head's z (the o_proj input slice) replaced by the
              clean run's, the normalised logit difference read at the last position (TL's
              get_act_patch_attn_head_out_all_pos);
  atp         attribution patching of every head: clean z cached, one corrupt forward and backward
              with gradients at the o_proj inputs of the mean normalised metric, score = sum over
              prompts, positions and d_head of (clean - corrupt) * grad.
Prints JSON (and writes --out). The scores are returned too, so a run can be compared with
`ferrolens patch` on the same pairs (head sweep r and AtP r against ferrolens' grids).
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, repeat, f):
    f()
    sync(dev)
    ts = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory (ferrolens models export)")
    ap.add_argument("--data", required=True, help="JSONL pairs of one token length (ferrolens data)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--what", default="forward,head_sweep,atp")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    pairs = [json.loads(l) for l in open(a.data) if l.strip()]
    bos = [tok.bos_token_id] if getattr(model.config, "bos_token_id", None) is not None and tok.bos_token_id is not None and tok("a")["input_ids"][0] != tok.bos_token_id and model.config.model_type.startswith("gemma") else []
    enc = lambda s: bos + tok(s, add_special_tokens=False)["input_ids"]
    clean = [enc(p["clean"]) for p in pairs]
    corrupt = [enc(p["corrupt"]) for p in pairs]
    lens = {len(x) for x in clean + corrupt}
    if len(lens) != 1:
        raise SystemExit(f"the pairs have token lengths {sorted(lens)}; give pairs of one length (ferrolens data without --all-templates)")
    clean = torch.tensor(clean, device=dev)
    corrupt = torch.tensor(corrupt, device=dev)
    ans = torch.tensor([enc(p["answer"])[len(bos)] for p in pairs], device=dev)
    wrong = torch.tensor([enc(p["wrong"])[len(bos)] for p in pairs], device=dev)
    rows = torch.arange(len(pairs), device=dev)
    layers = model.model.layers
    cfg = model.config
    nh = cfg.num_attention_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh

    def ld(logits):
        last = logits[:, -1, :].float()
        return last[rows, ans] - last[rows, wrong]

    with torch.no_grad():
        ld_clean = ld(model(clean).logits).mean().item()
        ld_corrupt = ld(model(corrupt).logits).mean().item()

    # The o_proj inputs (z, [b, p, h*dh]) of the clean run.
    z_clean = [None] * len(layers)

    def cache_z(i):
        def hook(mod, args):
            z_clean[i] = args[0].detach()
        return hook

    hs = [layers[i].self_attn.o_proj.register_forward_pre_hook(cache_z(i)) for i in range(len(layers))]
    with torch.no_grad():
        model(clean)
    for h in hs:
        h.remove()

    out = {"model": a.model, "device": str(dev), "dtype": a.dtype, "batch": len(pairs), "seq_len": clean.shape[1],
           "torch": torch.__version__, "clean_logit_diff": ld_clean, "corrupt_logit_diff": ld_corrupt}
    what = a.what.split(",")
    if "forward" in what:
        with torch.no_grad():
            t, _ = timed(dev, a.repeat, lambda: model(corrupt).logits)
        out["forward_s"] = t

    if "head_sweep" in what:
        def sweep():
            scores = torch.zeros(len(layers), nh)
            with torch.no_grad():
                for l in range(len(layers)):
                    for h in range(nh):
                        def patch(mod, args, l=l, h=h):
                            z = args[0].clone()
                            z[..., h * dh:(h + 1) * dh] = z_clean[l][..., h * dh:(h + 1) * dh]
                            return (z,)
                        hk = layers[l].self_attn.o_proj.register_forward_pre_hook(patch)
                        v = ld(model(corrupt).logits).mean()
                        hk.remove()
                        scores[l, h] = (v - ld_corrupt) / (ld_clean - ld_corrupt)
            return scores
        t, s = timed(dev, max(1, a.repeat // 3), sweep)
        out["head_sweep_s"] = t
        out["head_sweep_scores"] = s.tolist()

    if "atp" in what:
        def atp():
            zs = [None] * len(layers)

            def grab(i):
                def hook(mod, args):
                    z = args[0]
                    z.retain_grad()
                    zs[i] = z
                return hook
            # Frozen weights: the embedding output is where the graph starts.
            hks = [model.model.embed_tokens.register_forward_hook(lambda mod, inp, o: o.requires_grad_(True))]
            hks += [layers[i].self_attn.o_proj.register_forward_pre_hook(grab(i)) for i in range(len(layers))]
            model.zero_grad(set_to_none=True)
            m = (ld(model(corrupt).logits).mean() - ld_corrupt) / (ld_clean - ld_corrupt)
            m.backward()
            for hk in hks:
                hk.remove()
            with torch.no_grad():
                s = torch.stack([((z_clean[i] - zs[i]) * zs[i].grad).float().reshape(len(pairs), -1, nh, dh).sum(dim=(0, 1, 3)) for i in range(len(layers))])
            return s.cpu()
        for p in model.parameters():
            p.requires_grad_(False)
        t, s = timed(dev, a.repeat, atp)
        out["atp_s"] = t
        out["atp_scores"] = s.tolist()

    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        open(a.out, "w").write(text)


if __name__ == "__main__":
    main()
