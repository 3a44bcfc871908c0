#!/usr/bin/env python3
"""Generate the reference fixtures that ferrolens' tests compare against.

Needs a venv with torch, transformers 4.57, transformer_lens 2.18 (see scripts/README.md).
Writes (all small, committed):
  fixtures/tiny-gpt2/{config.json,model.safetensors}   seeded random GPT-2 made with transformers
  fixtures/tiny-gpt2/reference.safetensors              HF logits + TL run_with_cache activations
  fixtures/smollm2/reference.safetensors                HF logits (subset) + TL activations for SmolLM2-135M
  fixtures/tokenizers/corpus.json                       >= 200 strings
  fixtures/tokenizers/{smollm2,gpt2}_ids.json           HF token ids of the corpus
  fixtures/gemma3/reference.safetensors                 Gemma-3-270M (GGUF) logits from transformers' GGUF reader
  fixtures/tokenizers/gemma3_ids.json                   SentencePiece's token ids of the corpus, with
                                                        the GGUF's vocabulary as a BPE model
Usage: python scripts/make_references.py --smollm2-gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
           [--gemma3-gguf PATH/gemma-3-270m-q4_k_m.gguf]
"""
import argparse, json, os, random, sys
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")

HOOKS = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z",
         "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result", "hook_attn_out",
         "hook_resid_mid", "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_normalized",
         "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]


def tl_cache(model, tokens, layers, extra=()):
    names = [f"blocks.{l}.{h}" for l in layers for h in HOOKS] + list(extra)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n][0].detach().clone().contiguous() for n in names if n in cache}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                     activation_function="gelu_new", layer_norm_epsilon=1e-5,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    # Larger-than-default weights so the attention patterns are not uniform.
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "ln" not in n:
                p.mul_(4.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    out = os.path.join(FIX, "tiny-gpt2")
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    tcfg = HookedTransformerConfig(d_model=64, d_head=16, n_heads=4, n_layers=2, n_ctx=64, d_vocab=1000,
                                   d_mlp=256, act_fn="gelu_new", normalization_type="LN", eps=1e-5,
                                   positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
                                   use_attn_result=True, default_prepend_bos=False)
    tl = HookedTransformer(tcfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, tcfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    tl.eval()
    g = torch.Generator().manual_seed(1)
    ref = {}
    for i, n in enumerate([5, 7, 9, 11, 13, 16, 20, 31]):
        ids = torch.randint(0, 1000, (1, n), generator=g)
        ref[f"p{i}.input_ids"] = ids[0].to(torch.int64)
        with torch.no_grad():
            ref[f"p{i}.logits"] = hf(ids).logits[0].contiguous()
        if i < 3:
            for k, v in tl_cache(tl, ids, [0, 1], ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized",
                                                   "ln_final.hook_scale"]).items():
                ref[f"p{i}.{k}"] = v
            with torch.no_grad():
                ref[f"p{i}.tl_logits"] = tl(ids)[0].contiguous()
    save_file(ref, os.path.join(out, "reference.safetensors"))
    print("tiny-gpt2:", len(ref), "tensors")


SMOL_PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "Then, Michael and Jessica had a lot of fun at the school. Michael gave a ring to",
    "After David and Sarah went to the garden, David gave a bone to",
    "The capital of France is",
    "Q: On the table, there is a red pencil, a blue cup, and a green plate. What color is the cup?\nA:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1492, Columbus sailed across the Atlantic Ocean, and in 1969 humans",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
]


def smollm2(gguf_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from patching_reference import load_tl
    tl, tok, hf = load_tl(gguf_path, use_attn_result=True)
    cols = torch.arange(0, 49152, 97)
    ref = {"vocab_cols": cols.to(torch.int64)}
    for i, p in enumerate(SMOL_PROMPTS):
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ref[f"p{i}.input_ids"] = ids[0].to(torch.int64)
        with torch.no_grad():
            lg = hf(ids).logits[0]
        ref[f"p{i}.logits_cols"] = lg[:, cols].contiguous()
        ref[f"p{i}.logits_last"] = lg[-1].contiguous()
        if i < 2:
            for k, v in tl_cache(tl, ids, [0, 14, 29], ["hook_embed", "ln_final.hook_normalized"]).items():
                ref[f"p{i}.{k}"] = v
            with torch.no_grad():
                ref[f"p{i}.tl_logits_last"] = tl(ids)[0, -1].contiguous()
    out = os.path.join(FIX, "smollm2")
    os.makedirs(out, exist_ok=True)
    save_file(ref, os.path.join(out, "reference.safetensors"))
    print("smollm2:", len(ref), "tensors")
    return tok


def gemma3_sentencepiece(gguf_path):
    """The GGUF's Gemma vocabulary as a SentencePiece BPE model (what Gemma's tokenizer.model is):
    pieces, scores (minus the merge rank) and types; no dummy prefix, whitespace escaped."""
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    r = gguf.GGUFReader(gguf_path)
    f = r.fields
    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    scores = [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data]
    unk = int(f["tokenizer.ggml.unknown_token_id"].parts[-1][0])
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = unk
    m.trainer_spec.bos_id = int(f["tokenizer.ggml.bos_token_id"].parts[-1][0])
    m.trainer_spec.eos_id = int(f["tokenizer.ggml.eos_token_id"].parts[-1][0])
    m.trainer_spec.pad_id = int(f["tokenizer.ggml.padding_token_id"].parts[-1][0])
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for i, (t, s, ty) in enumerate(zip(toks, scores, types)):
        p = m.pieces.add()
        p.piece, p.score = t, s
        p.type = 2 if i == unk else ty
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(m.SerializeToString())
    return sp


def gemma3(gguf_path, strings):
    """Gemma-3-270M: token ids of the corpus by SentencePiece, and logits of 8 prompts (BOS first)
    from transformers' GGUF reader: a column subset at every position, and the argmax over the
    whole vocabulary at every position with its logit."""
    from transformers import AutoModelForCausalLM
    sp = gemma3_sentencepiece(gguf_path)
    ids = [sp.encode(s) for s in strings]
    with open(os.path.join(FIX, "tokenizers", "gemma3_ids.json"), "w") as fh:
        json.dump(ids, fh)
    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    cols = torch.arange(0, 262144, 509)
    ref = {"vocab_cols": cols.to(torch.int64)}
    for i, p in enumerate(SMOL_PROMPTS):
        x = torch.tensor([[2] + sp.encode(p)])  # <bos> (tokenizer.ggml.bos_token_id)
        ref[f"p{i}.input_ids"] = x[0].to(torch.int64)
        with torch.no_grad():
            lg = hf(x).logits[0]
        ref[f"p{i}.logits_cols"] = lg[:, cols].contiguous()
        ref[f"p{i}.argmax"] = lg.argmax(-1).to(torch.int64)
        ref[f"p{i}.max"] = lg.max(-1).values.contiguous()
    out = os.path.join(FIX, "gemma3")
    os.makedirs(out, exist_ok=True)
    save_file(ref, os.path.join(out, "reference.safetensors"))
    print("gemma3:", len(ref), "tensors;", sum(len(v) for v in ids), "corpus tokens")


def corpus():
    rng = random.Random(7)
    base = [
        "Hello world", "Hello, world!", " leading space", "trailing space ", "  two leading", "a  b", "a   b    c",
        "tabs\tand\ttabs", "new\nline", "two\n\nnewlines", "mixed \n \n spaces", "\n", "\n\n\n", "   ", " ",
        "12345", "3.14159", "2026-11-27", "phone 555-0199", "1,000,000 dollars", "x1y2z3", "007", "0.5%",
        "don't", "I'M", "we've", "she'll", "they'd", "It's", "O'Neil", "rock'n'roll",
        "café", "naïve façade", "Ærøskøbing", "straße", "日本語のテキスト", "中文字符", "한국어", "Привет, мир",
        "Γειά σου", "مرحبا", "שלום", "emoji 😀🎉", "👍🏽", "✓ ✗ → ←", "∑ ∫ √ ∞", "©®™", "€100 £50 ¥30",
        "def f(x):\n    return x * 2\n", "if (a && b) { c++; }", "<html><body>hi</body></html>",
        "SELECT * FROM t WHERE id = 1;", "https://example.com/path?q=1&r=2", "user@example.com",
        "CamelCaseWord", "snake_case_word", "kebab-case-word", "ALLCAPS", "MiXeD cAsE",
        "Then, Mary and John went to the store. John gave a drink to Mary",
        "Q: On the desk, you see a red mug, a blue pen, and a green bowl. What color is the pen?\nA: Blue",
        "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "...", "!!!???", "--", "—", "“quoted”", "'single'",
        "a\u00a0b", "zero\u200bwidth", "\r\n windows", "end.",
    ]
    words = ("the of and to in is was he for it with as his on be at by I this had not are but from or have an they "
             "which one you were her all she there would their we him been has when who will more no if out so said "
             "what up its about into than them can only other new some could time these two may then do first any "
             "my now such like our over man me even most made after also did many before must through back years "
             "where much your way well down should because each just those people Mr how too little state good very "
             "make world still own see men work long get here between both life being under never day same another "
             "know while last might us great old year off come since against go came right used take three").split()
    out = list(base)
    while len(out) < 240:
        n = rng.randint(1, 14)
        s = " ".join(rng.choice(words) for _ in range(n))
        r = rng.random()
        if r < 0.2:
            s = s.capitalize() + "."
        elif r < 0.3:
            s += " " + str(rng.randint(0, 99999))
        elif r < 0.4:
            s = s.replace(" ", "  ", 1)
        elif r < 0.5:
            s += "\n"
        out.append(s)
    return out


def tokenizer_refs(smol_tok):
    from transformers import GPT2TokenizerFast
    os.makedirs(os.path.join(FIX, "tokenizers"), exist_ok=True)
    c = corpus()
    json.dump(c, open(os.path.join(FIX, "tokenizers", "corpus.json"), "w"), ensure_ascii=False, indent=0)
    g = GPT2TokenizerFast(vocab_file=os.path.join(FIX, "gpt2-tokenizer", "encoder.json"),
                          merges_file=os.path.join(FIX, "gpt2-tokenizer", "vocab.bpe"))
    json.dump([g(s, add_special_tokens=False)["input_ids"] for s in c],
              open(os.path.join(FIX, "tokenizers", "gpt2_ids.json"), "w"))
    if smol_tok is not None:
        json.dump([smol_tok(s, add_special_tokens=False)["input_ids"] for s in c],
                  open(os.path.join(FIX, "tokenizers", "smollm2_ids.json"), "w"))
    print("corpus:", len(c), "strings")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-gguf")
    ap.add_argument("--gemma3-gguf")
    ap.add_argument("--only-gemma3", action="store_true", help="write the Gemma-3 references only")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if not a.only_gemma3:
        tiny_gpt2()
        tok = smollm2(a.smollm2_gguf)
        tokenizer_refs(tok)
    if a.gemma3_gguf:
        gemma3(a.gemma3_gguf, json.load(open(os.path.join(FIX, "tokenizers", "corpus.json"))))
