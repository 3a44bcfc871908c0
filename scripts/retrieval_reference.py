#!/usr/bin/env python3
"""Reference for retrieval-head copy hits: Hugging Face transformers (eager attention, KV cache).

Builds one needle-in-a-haystack prompt from fixtures/haystack with the first built-in needle
(same layout as ferrolens' ChatML format, needle spliced in at a sentence end near depth 0.5),
decodes greedily with past_key_values and output_attentions=True, and at every step counts, per
head, whether the argmax key of the newest query lies in the answer window and holds the token
generated at that step (Wu et al. 2024). Writes fixtures/smollm2/retrieval_reference.json with the
prompt ids, both spans, the generated ids and the hits [layer][head]; tests/retrieval.rs replays
the same ids through ferrolens and compares.

Usage: python scripts/retrieval_reference.py --smollm2-gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse, json, os
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
PREFIX = "<|im_start|>user\nRead the document and answer the question.\n<document>\n"
BEFORE_Q = "\n</document>\nQuestion: "
SUFFIX = " Answer in one sentence, using the document.<|im_end|>\n<|im_start|>assistant\n"


def answer_window(needle, answer):
    want = set(answer)
    best = None
    for i in range(len(needle) - len(answer) + 1):
        o = len(set(needle[i:i + len(answer)]) & want) / len(want)
        if best is None or o > best[0]:
            best = (o, i)
    return best[1], best[1] + len(answer)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-gguf", required=True)
    ap.add_argument("--length", type=int, default=400)
    ap.add_argument("--new", type=int, default=24)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_grad_enabled(False)
    d, f = os.path.dirname(a.smollm2_gguf), os.path.basename(a.smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager").eval()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    hay = enc(open(os.path.join(ROOT, "fixtures/haystack/factbook-backgrounds.txt"), encoding="utf-8").read())
    prefix, question, needle = enc(PREFIX), enc(BEFORE_Q + QUESTION + SUFFIX), enc(" " + NEEDLE)
    budget = a.length - len(prefix) - len(question) - len(needle)
    hay = hay[:budget]
    at = round(budget * 0.5)
    while at > 0 and not tok.decode([hay[at - 1]]).rstrip().endswith((".", "!", "?")):
        at -= 1
    ids = prefix + hay[:at] + needle + hay[at:] + question
    n0 = len(prefix) + at
    s, e = answer_window(needle, enc(" " + ANSWER))
    span = (n0 + s, n0 + e)
    L, H = hf.config.num_hidden_layers, hf.config.num_attention_heads
    hits = [[0] * H for _ in range(L)]
    out = hf(torch.tensor([ids[:-1]]), use_cache=True)
    past, nxt = out.past_key_values, ids[-1]
    generated = []
    for _ in range(a.new):
        out = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True, output_attentions=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        for l, att in enumerate(out.attentions):  # [1, H, 1, T]
            for h, j in enumerate(att[0, :, -1].argmax(-1).tolist()):
                if span[0] <= j < span[1] and ids[j] == nxt:
                    hits[l][h] += 1
        generated.append(nxt)
    path = os.path.join(ROOT, "fixtures/smollm2/retrieval_reference.json")
    json.dump({"source": "transformers %s, eager attention, greedy with past_key_values" % __import__("transformers").__version__,
               "ids": ids, "needle_span": [n0, n0 + len(needle)], "answer_span": list(span),
               "generated": generated, "hits": hits}, open(path, "w"))
    print(path, "answer:", repr(tok.decode(generated)), "heads with hits:", sum(1 for r in hits for x in r if x))


if __name__ == "__main__":
    main()
