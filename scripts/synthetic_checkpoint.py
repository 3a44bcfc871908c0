#!/usr/bin/env python3
"""A synthetic stand-in for a checkpoint too large to carry: same config, tokenizer and tensor
shapes, every matrix drawn N(mean, std) with the real tensor's mean and std, every vector (the
norm gains, biases) copied exactly. GPU machines here take 64 MiB per call; SmolLM2's GGUF is
98 MB, so scripts/gpu-check.sh runs its parity and timing checks on this stand-in (and on the
real weights when they were carried in parts). Parity compares the GPU with the same machine's
CPU on the same file, so the stand-in checks the kernels; its timings match the real model's
(same shapes). Only numpy is needed.

  # here, once (commits fixtures/smollm2/synthetic_spec.json, ~0.5 MB):
  ferrolens models export smollm2-135m --out /tmp/smollm2-hf
  python3 scripts/synthetic_checkpoint.py spec /tmp/smollm2-hf fixtures/smollm2/synthetic_spec.json
  # where the stand-in is needed:
  python3 scripts/synthetic_checkpoint.py make fixtures/smollm2/synthetic_spec.json OUT_DIR \\
      --tokenizer DIR/tokenizer.json [--seed 0]
  python3 scripts/synthetic_checkpoint.py gpt2-small-spec SPEC.json   # GPT-2 small, initialised
"""
import argparse, json, os, shutil, struct, sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path):
    """name -> numpy array (f32/f16/f64 tensors), without the safetensors package."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                sys.exit(f"{path}: tensor {name} is {info['dtype']}; export the model with --weights f32")
            a, b = info["data_offsets"]
            f.seek(base + a)
            out[name] = np.frombuffer(f.read(b - a), dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        return out


def write_safetensors(path, tensors):
    """Write f32 tensors (dict name -> array) as safetensors."""
    header, offset = {}, 0
    names = sorted(tensors)
    for name in names:
        nbytes = tensors[name].size * 4
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())


def spec(args):
    with open(os.path.join(args.dir, "config.json")) as f:
        config = json.load(f)
    tensors = read_safetensors(os.path.join(args.dir, "model.safetensors"))
    out = {"config": config, "tensors": {}}
    for name in sorted(tensors):
        t = tensors[name].astype(np.float64)
        if t.ndim == 1:
            out["tensors"][name] = {"shape": list(t.shape), "values": [float(np.float32(x)) for x in t]}
        else:
            out["tensors"][name] = {"shape": list(t.shape), "mean": float(t.mean()), "std": float(t.std())}
    with open(args.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"{args.out}: {len(tensors)} tensors", file=sys.stderr)


def gpt2_small_spec(args):
    """GPT-2 small's config with GPT-2's initialisation (N(0, 0.02); residual projections
    N(0, 0.02 / sqrt(2 n_layer)); LayerNorm gains 1, biases 0): no GPT-2 weights ship in a
    registry, and the GPT-2 code path (LayerNorm, GELU, learned positions, fused c_attn) needs a check too."""
    d, n, v, ctx = 768, 12, 50257, 1024
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": d, "n_head": 12, "n_layer": n,
              "n_positions": ctx, "n_ctx": ctx, "vocab_size": v, "layer_norm_epsilon": 1e-5,
              "activation_function": "gelu_new", "bos_token_id": 50256, "eos_token_id": 50256}
    T = {"transformer.wte.weight": {"shape": [v, d], "mean": 0.0, "std": 0.02},
         "transformer.wpe.weight": {"shape": [ctx, d], "mean": 0.0, "std": 0.01},
         "transformer.ln_f.weight": {"shape": [d], "fill": 1.0}, "transformer.ln_f.bias": {"shape": [d], "fill": 0.0}}
    proj = 0.02 / (2 * n) ** 0.5
    for l in range(n):
        p = f"transformer.h.{l}"
        for ln in ("ln_1", "ln_2"):
            T[f"{p}.{ln}.weight"] = {"shape": [d], "fill": 1.0}
            T[f"{p}.{ln}.bias"] = {"shape": [d], "fill": 0.0}
        for name, shape, std in (("attn.c_attn", [d, 3 * d], 0.02), ("attn.c_proj", [d, d], proj),
                                 ("mlp.c_fc", [d, 4 * d], 0.02), ("mlp.c_proj", [4 * d, d], proj)):
            T[f"{p}.{name}.weight"] = {"shape": shape, "mean": 0.0, "std": std}
            T[f"{p}.{name}.bias"] = {"shape": [shape[1]], "fill": 0.0}
    with open(args.out, "w") as f:
        json.dump({"config": config, "tensors": T}, f, indent=1)


def make(args):
    with open(args.spec) as f:
        s = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    tensors = {}
    for name in sorted(s["tensors"]):
        t = s["tensors"][name]
        if "values" in t:
            tensors[name] = np.asarray(t["values"], dtype=np.float32).reshape(t["shape"])
        elif "fill" in t:
            tensors[name] = np.full(t["shape"], t["fill"], dtype=np.float32)
        else:
            x = rng.standard_normal(t["shape"], dtype=np.float32)
            tensors[name] = x * np.float32(t["std"]) + np.float32(t["mean"])
    write_safetensors(os.path.join(args.out, "model.safetensors"), tensors)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(dict(s["config"], synthetic={"spec": os.path.basename(args.spec), "seed": args.seed}), f, indent=1)
    for tok in args.tokenizer or []:
        shutil.copy(tok, args.out)
    print(f"{args.out}: {len(tensors)} tensors, seed {args.seed}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("spec", help="statistics of an exported f32 Hugging Face directory")
    a.add_argument("dir")
    a.add_argument("out")
    a.set_defaults(func=spec)
    b = sub.add_parser("make", help="a synthetic checkpoint from a spec")
    b.add_argument("spec")
    b.add_argument("out")
    b.add_argument("--tokenizer", action="append", help="tokenizer file(s) to copy into the checkpoint (tokenizer.json, or encoder.json and vocab.bpe)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=make)
    c = sub.add_parser("gpt2-small-spec", help="a spec of GPT-2 small at initialisation")
    c.add_argument("out")
    c.set_defaults(func=gpt2_small_spec)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
