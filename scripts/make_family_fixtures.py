#!/usr/bin/env python3
"""Tiny random checkpoints of every architecture family, written by transformers' own model
classes, and the reference numbers the parity tests compare ferrolens against.

Pinned: torch 2.x (CPU), transformers 4.57, transformer_lens 2.18, gguf (see scripts/README.md).

For each family F this writes fixtures/families/F/:
  config.json, model.safetensors   transformers' save_pretrained of a seeded random model whose
                                   weights are drawn larger than the default init (x4 for matrices,
                                   norm gains and biases perturbed) so every path matters; configs
                                   switch on the family's variations (GQA, sliding windows shorter
                                   than the prompts, soft-caps, partial rotary, llama3 / linear
                                   rope scaling, two rotary bases, biases, q/k norms, ...)
  reference.safetensors            for 3 prompts p0..p2 (random ids; p0, p1 share a length):
                                   p{i}.input_ids, p{i}.logits (HF, eager attention),
                                   p{i}.hf.hidden.{l} (HF hidden_states: resid_pre of layer l and,
                                   at l = n_layers, the final residual), p{i}.hf.pattern.{l}
                                   (HF attentions), and where TransformerLens 2.18 has the family,
                                   p0.tl.{hook} for every TL hook and p0.tl_logits
  model.gguf                       (llama, qwen2) the same weights as
                                   llama.cpp's converter writes them (q/k rows permuted for llama,
                                   Gemma norm gains + 1, fused tensors as llama.cpp keeps them), and
                                   p0.gguf_logits: transformers' logits of that file (gguf_file=),
                                   equal to p0.logits except where GGUF cannot hold a variation
                                   (llama3 rope scaling); report.json has the differences.
Families TL does not have (OLMo-2) get HF module outputs instead: p{i}.hfm.{hook} for the hooks
the HF modules expose directly. report.json: TL vs HF logits, GGUF vs HF logits per family.

Usage: python scripts/make_family_fixtures.py [--only llama,gemma3]
"""
import argparse, json, os
import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "families")
VOCAB, D, H, KV, DH, M, CTX = 96, 64, 4, 2, 16, 96, 64
LENS = [12, 12, 9]


def common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=M, num_hidden_layers=2,
                num_attention_heads=H, num_key_value_heads=KV, head_dim=DH, max_position_embeddings=CTX,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    base.update(kw)
    return base


def families():
    import transformers as T
    return {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, common(
            rope_theta=10000.0, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, common(sliding_window=4, rope_theta=10000.0, rms_norm_eps=1e-5)),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, common(use_sliding_window=True, sliding_window=4,
                                                             max_window_layers=1, rope_theta=1000000.0,
                                                             tie_word_embeddings=True)),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, common(rope_theta=1000000.0)),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, common(
            query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
            tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, common(
            num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=4, rope_theta=1000000.0,
            rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")),
        "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(
            vocab_size=VOCAB, hidden_size=D, intermediate_size=M, num_hidden_layers=2, num_attention_heads=H,
            max_position_embeddings=CTX, rotary_pct=0.5, rotary_emb_base=10000, use_parallel_residual=True,
            hidden_act="gelu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, common(partial_rotary_factor=0.5, sliding_window=4,
                                                         rope_theta=10000.0, pad_token_id=0)),
        "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, common(rope_theta=10000.0)),
    }


def build(name):
    cfg_cls, model_cls, kw = families()[name]
    torch.manual_seed(sum(name.encode()))  # stable across runs (str hash is salted)
    cfg = cfg_cls(**kw)
    hf = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                if "bias" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif name.startswith("gemma"):
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))  # gain = 1 + w
                else:
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(4.0)
    return cfg, hf


def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (1, n), generator=g) for n in LENS]


def hf_refs(hf, ids, i, ref):
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, output_attentions=True)
    ref[f"p{i}.input_ids"] = ids[0].to(torch.int64)
    ref[f"p{i}.logits"] = out.logits[0].contiguous()
    for l, h in enumerate(out.hidden_states[:-1]):
        ref[f"p{i}.hf.hidden.{l}"] = h[0].contiguous()
    for l, a in enumerate(out.attentions):
        ref[f"p{i}.hf.pattern.{l}"] = a[0].contiguous()


def hf_module_refs(hf, ids, i, ref):
    """OLMo-2 hooks read off the HF modules (TransformerLens does not have the family)."""
    caps = {}
    hooks = []
    def cap(key, what="out"):
        def f(mod, args, out):
            t = args[0] if what == "in" else (out[0] if isinstance(out, tuple) else out)
            caps[key] = t[0].detach().clone().contiguous()
        return f
    for l, layer in enumerate(hf.model.layers):
        a = layer.self_attn
        hooks += [a.q_proj.register_forward_hook(cap(f"blocks.{l}.attn.q_proj")),
                  a.k_proj.register_forward_hook(cap(f"blocks.{l}.attn.k_proj")),
                  a.v_proj.register_forward_hook(cap(f"blocks.{l}.attn.hook_v")),
                  a.o_proj.register_forward_hook(cap(f"blocks.{l}.attn.hook_z", "in")),
                  layer.post_attention_layernorm.register_forward_hook(cap(f"blocks.{l}.hook_attn_out")),
                  layer.mlp.gate_proj.register_forward_hook(cap(f"blocks.{l}.mlp.hook_pre")),
                  layer.mlp.up_proj.register_forward_hook(cap(f"blocks.{l}.mlp.hook_pre_linear")),
                  layer.mlp.down_proj.register_forward_hook(cap(f"blocks.{l}.mlp.hook_post", "in")),
                  layer.post_feedforward_layernorm.register_forward_hook(cap(f"blocks.{l}.hook_mlp_out")),
                  layer.register_forward_hook(cap(f"blocks.{l}.hook_resid_post"))]
    with torch.no_grad():
        hf(ids)
    for h in hooks:
        h.remove()
    for k, v in caps.items():
        ref[f"p{i}.hfm.{k}"] = v


def tl_model(name, cfg, hf):
    """A TransformerLens 2.18 model of the tiny checkpoint, with a hand-made config that says
    everything the family needs (TL's own configs for these families are per official model
    name), or None where TL has no such family."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    import transformer_lens.pretrained.weight_conversions as W
    base = dict(d_model=D, d_head=DH, n_heads=H, d_mlp=M, n_layers=cfg.num_hidden_layers, n_ctx=CTX, d_vocab=VOCAB,
                normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
                final_rms=True, gated_mlp=True, act_fn="silu", use_attn_result=True, default_prepend_bos=False,
                eps=cfg.rms_norm_eps if hasattr(cfg, "rms_norm_eps") else 1e-5)
    if name == "llama":
        c = dict(base, n_key_value_heads=KV, rotary_dim=DH, rotary_base=cfg.rope_theta, original_architecture="LlamaForCausalLM",
                 use_NTK_by_parts_rope=True, NTK_by_parts_factor=8.0, NTK_by_parts_low_freq_factor=1.0,
                 NTK_by_parts_high_freq_factor=4.0, NTK_original_ctx_len=32)
        conv = W.convert_llama_weights
    elif name == "mistral":
        c = dict(base, n_key_value_heads=KV, rotary_dim=DH, rotary_base=cfg.rope_theta, original_architecture="MistralForCausalLM",
                 use_local_attn=True, window_size=4, attn_types=["local"] * cfg.num_hidden_layers)
        conv = W.convert_mistral_weights
    elif name == "qwen2":
        c = dict(base, n_key_value_heads=KV, rotary_dim=DH, rotary_base=cfg.rope_theta, original_architecture="Qwen2ForCausalLM",
                 use_local_attn=True, window_size=4, attn_types=["global", "local"])
        conv = W.convert_qwen2_weights
    elif name == "qwen3":
        c = dict(base, n_key_value_heads=KV, rotary_dim=DH, rotary_base=cfg.rope_theta, original_architecture="Qwen3ForCausalLM",
                 use_qk_norm=True)
        conv = W.convert_qwen3_weights
    elif name in ("gemma2", "gemma3"):
        types = ["local" if t == "sliding_attention" else "global" for t in cfg.layer_types]
        c = dict(base, n_key_value_heads=KV, rotary_dim=DH, rotary_base=cfg.rope_theta, act_fn="gelu_pytorch_tanh",
                 use_normalization_before_and_after=True, use_local_attn=True, window_size=4, attn_types=types,
                 attn_scale=cfg.query_pre_attn_scalar ** 0.5, eps=cfg.rms_norm_eps)
        if name == "gemma2":
            c.update(original_architecture="Gemma2ForCausalLM", attn_scores_soft_cap=cfg.attn_logit_softcapping,
                     output_logits_soft_cap=cfg.final_logit_softcapping)
        else:
            # TL 2.18's Gemma-3 has no rope_scaling: its global layers' tables are replaced
            # below by the linearly scaled ones transformers uses.
            c.update(original_architecture="Gemma3ForCausalLM", use_qk_norm=True, rotary_base_local=cfg.rope_local_base_freq)
        conv = W.convert_gemma_weights
    elif name == "gpt_neox":
        c = dict(base, normalization_type="LN", final_rms=False, gated_mlp=False, act_fn="gelu", rotary_dim=DH // 2,
                 rotary_base=10000, parallel_attn_mlp=True, original_architecture="GPTNeoXForCausalLM", eps=cfg.layer_norm_eps)
        conv = W.convert_neox_weights
    elif name == "phi3":
        c = dict(base, n_key_value_heads=KV, rotary_dim=DH // 2, rotary_base=cfg.rope_theta, original_architecture="Phi3ForCausalLM",
                 use_local_attn=True, window_size=4, attn_types=["local"] * cfg.num_hidden_layers)
        conv = W.convert_phi3_weights
    else:
        return None
    tcfg = HookedTransformerConfig(**c)
    tl = HookedTransformer(tcfg)
    tl.load_and_process_state_dict(conv(hf, tcfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    if name == "gemma3":
        f = cfg.rope_scaling["factor"]
        for l, t in enumerate(cfg.layer_types):
            if t == "full_attention":
                attn = tl.blocks[l].attn
                inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, DH, 2).float() / DH)) / f
                ang = torch.arange(CTX).float()[:, None] * torch.cat([inv, inv])[None, :]
                attn.rotary_sin.copy_(torch.sin(ang))
                attn.rotary_cos.copy_(torch.cos(ang))
    return tl.eval()


def tl_refs(tl, ids, i, ref):
    with torch.no_grad():
        logits, cache = tl.run_with_cache(ids)
    ref[f"p{i}.tl_logits"] = logits[0].contiguous()
    for k, v in cache.items():
        if k.startswith("blocks.") and ("hook_q_input" in k or "hook_k_input" in k or "hook_v_input" in k):
            continue
        t = v.detach()
        # q/k norms run on [b*p*h, d]: keep row 0's rows.
        if ".q_norm." in k or ".k_norm." in k:
            t = t.reshape(ids.shape[0], -1, t.shape[-1])
        ref[f"p{i}.tl.{k}"] = t[0].clone().contiguous()


# ---------------------------------------------------------------- GGUF, as llama.cpp writes it
# Tiny GGUF files only where transformers' GGUF reader can hold the tiny config: its qwen3 and
# phi3 readers ignore head_dim / the rotary width, its gemma readers ignore the soft-caps and
# query_pre_attn_scalar (defaults that suit the released models). Gemma-3's GGUF path is tested
# on the real gemma3-270m instead.
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2"}


def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    n = hf_name
    reps = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight")]
    for a, b in reps:
        if n == a:
            return b
    n = n.replace("model.layers.", "blk.")
    for a, b in [(".self_attn.q_proj.", ".attn_q."), (".self_attn.k_proj.", ".attn_k."), (".self_attn.v_proj.", ".attn_v."),
                 (".self_attn.o_proj.", ".attn_output."), (".self_attn.q_norm.", ".attn_q_norm."),
                 (".self_attn.k_norm.", ".attn_k_norm."), (".self_attn.qkv_proj.", ".attn_qkv."),
                 (".input_layernorm.", ".attn_norm."), (".pre_feedforward_layernorm.", ".ffn_norm."),
                 (".post_feedforward_layernorm.", ".post_ffw_norm."), (".mlp.gate_up_proj.", ".ffn_up."),
                 (".mlp.gate_proj.", ".ffn_gate."), (".mlp.up_proj.", ".ffn_up."), (".mlp.down_proj.", ".ffn_down.")]:
        n = n.replace(a, b)
    return n


def write_gguf(name, cfg, hf, path):
    import gguf
    arch = GGUF_ARCH[name]
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if name != "phi3":
        w.add_key_length(DH)
        w.add_value_length(DH)
        w.add_rope_dimension_count(DH)
    else:
        w.add_rope_dimension_count(int(DH * cfg.partial_rotary_factor))
    if name in ("gemma2", "gemma3", "phi3") or getattr(cfg, "sliding_window", None):
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(cfg.sliding_window)
    if name == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    sd = hf.state_dict()
    # llama.cpp omits output.weight when tied.
    tied = cfg.tie_word_embeddings
    for k, t in sd.items():
        if tied and k == "lm_head.weight":
            continue
        t = t.detach().float().numpy().copy()
        if name == "llama" and ".self_attn.q_proj." in k:
            t = permute(t, cfg.num_attention_heads)
        if name == "llama" and ".self_attn.k_proj." in k:
            t = permute(t, cfg.num_key_value_heads)
        if name.startswith("gemma") and k.endswith("norm.weight"):
            t = t + 1.0
        n = gguf_name(k)
        if name.startswith("gemma"):
            n = n.replace(".post_attention_layernorm.", ".post_attention_norm.")
        else:
            n = n.replace(".post_attention_layernorm.", ".ffn_norm.")
        w.add_tensor(n, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_logits(path, ids):
    """transformers' logits of the GGUF file (read alone: a config.json beside it would be used
    instead of the GGUF metadata)."""
    import shutil, tempfile
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(path, os.path.join(d, "model.gguf"))
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float32).eval()
        m.config._attn_implementation = "eager"
        with torch.no_grad():
            return m(ids).logits[0].contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    names = a.only.split(",") if a.only else list(families())
    report = {}
    for name in names:
        cfg, hf = build(name)
        hf.config._attn_implementation = "eager"
        out = os.path.join(OUT, name)
        os.makedirs(out, exist_ok=True)
        hf.save_pretrained(out, safe_serialization=True)
        for junk in ["generation_config.json"]:
            p = os.path.join(out, junk)
            if os.path.exists(p):
                os.remove(p)
        ref = {}
        ps = prompts()
        for i, ids in enumerate(ps):
            hf_refs(hf, ids, i, ref)
        note = {}
        tl = tl_model(name, cfg, hf)
        if tl is not None:
            worst = 0.0
            for i, ids in enumerate(ps[:1]):  # TL caches of one prompt keep the fixture small
                tl_refs(tl, ids, i, ref)
                worst = max(worst, (ref[f"p{i}.tl_logits"] - ref[f"p{i}.logits"]).abs().max().item())
            note["tl_vs_hf_logits"] = worst
        else:
            for i, ids in enumerate(ps):
                hf_module_refs(hf, ids, i, ref)
        if name in GGUF_ARCH:
            gp = os.path.join(out, "model.gguf")
            write_gguf(name, cfg, hf, gp)
            ref["p0.gguf_logits"] = gguf_logits(gp, ps[0])
            # Nonzero where the GGUF format cannot hold a variation (llama3 rope scaling, which
            # llama.cpp writes as a rope_freqs tensor that transformers and ferrolens do not read).
            note["gguf_vs_hf_logits"] = (ref["p0.gguf_logits"] - ref["p0.logits"]).abs().max().item()
        save_file(ref, os.path.join(out, "reference.safetensors"))
        report[name] = note
        print(name, json.dumps(note))
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
