#!/usr/bin/env python3
"""Run the notebooks in notebooks/ through evcxr (the Rust REPL behind the Jupyter kernel) and
check them: no evcxr or compiler error, no panic, and every line of each notebook's saved output
(the example's printed output) printed again.

  cargo install evcxr_repl --locked     # once (~6 min)
  python3 scripts/run_notebooks.py [NAME ...]

The REPL evaluates statement by statement, which is stricter than a Jupyter cell: every top-level
variable must be kept between evaluations (owned, no borrows, no closures) and have a type of its
own (`Vec<f64>`, not a `Vec::new()` inferred from later lines); method chains split over lines are
joined first, as a cell would see them. Dependencies are
built once at -O2 into evcxr's cache (~9 min the first time). Not part of CI (needs evcxr).
"""
import json, os, re, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB = os.path.join(ROOT, "notebooks")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def join_chains(cell):
    """Join method-chain lines (`    .col(...)`) to the statement above: the REPL would otherwise
    take `let t = Table::new()` as a whole statement, where a Jupyter cell sees the chain."""
    out = []
    for line in cell.split("\n"):
        if line.lstrip().startswith(".") and out:
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return "\n".join(out)


def main():
    names = sys.argv[1:] or sorted(f[:-6] for f in os.listdir(NB) if f.endswith(".ipynb"))
    failed = []
    for name in names:
        nb = json.load(open(os.path.join(NB, name + ".ipynb")))
        cells = [join_chains("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]
        saved = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
        # Run in a scratch folder (the notebooks write files, e.g. probe_accuracy.*), with the
        # notebooks' relative `:dep ferrolens = { path = ".." }` made absolute.
        cells = [c.replace('path = ".."', f'path = "{ROOT}"') for c in cells]
        script = ":opt 2\n:cache 4000\n" + "\n".join(cells) + "\n"
        t = time.time()
        with tempfile.TemporaryDirectory(prefix=f"nb-{name}-") as cwd:
            r = subprocess.run(["evcxr"], input=script, capture_output=True, text=True, cwd=cwd, timeout=3600)
        out = ANSI.sub("", r.stdout + r.stderr)
        errors = [l for l in out.splitlines() if l.startswith("Error") or re.match(r"\[E\d+\] Error", l) or "panicked" in l]
        missing = [l for l in saved.splitlines() if l.strip() and l not in out]
        ok = r.returncode == 0 and not errors and not missing
        print(f"{name}: {'ok' if ok else 'FAILED'} ({time.time() - t:.0f} s; {len(saved.splitlines())} saved output lines"
              f"{', missing: ' + repr(missing[:3]) if missing else ''})")
        for l in errors[:5]:
            print("   ", l)
        if not ok:
            failed.append(name)
            with open(f"/tmp/evcxr-{name}.log", "w") as f:
                f.write(out)
            print(f"    full output: /tmp/evcxr-{name}.log")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
