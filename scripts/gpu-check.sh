#!/usr/bin/env bash
# GPU parity and benchmarks (issue 6). GPU machines here have no Rust toolchain and no network,
# and take at most 64 MiB of untracked files per call (the repository itself is ~13 MB of it),
# so the work is split:
#
#   scripts/gpu-check.sh pack            # here: CUDA build, packed into .gpu/ and .gpu-model/
#   scripts/gpu-check.sh run synthetic   # there: parity + timings on stand-in checkpoints
#   scripts/gpu-check.sh run real        # there: the same on SmolLM2's real GGUF, if carried
#   scripts/gpu-check.sh table DIR       # here: docs/benchmarks.md rows from the results
#
# pack writes (both ignored by git):
#   .gpu/ferrolens.xz        the CUDA binary, stripped and xz-compressed (~13 MB)
#   .gpu/smollm2/            SmolLM2's config.json + tokenizer.json (`models export --weights none`)
#   .gpu/smollm2.gguf.sha256 the real GGUF's checksum
#   .gpu-model/part.NN       the real GGUF in parts that fit a call (98 MB: three calls)
#
# On the GPU machine (the device tool; each call's command runs in the repo root, $OUT comes back):
#   call 1: carry [".gpu", ".gpu-model/part.00"], command "scripts/gpu-check.sh run synthetic"
#   call 2: carry [".gpu-model/part.01"], command "true"     (within 30 s, while the machine is warm:
#   call 3: carry [".gpu-model/part.02"], command "scripts/gpu-check.sh run real"  parts accumulate)
#
# `run synthetic` checks two stand-ins made there by scripts/synthetic_checkpoint.py (no weights
# travel): SmolLM2-shaped, matrices drawn with the real tensors' mean/std and the real norm gains
# (fixtures/smollm2/synthetic_spec.json), and GPT-2 small at initialisation. Parity compares the GPU
# with the same machine's CPU on the same file, so stand-ins check the kernels and their timings
# equal the real model's (same shapes). `run real` does the same on the real GGUF.
#
# Run libraries: the binary links libcublas/libcublasLt/libcudart .so.13, libcurand.so.10,
# libnvrtc.so.13 (CUDA 13.0) and the driver's libcuda.so.1 (driver >= 580). The GPU image's
# PyTorch (cu130) ships the first five as nvidia-* wheels; `run` finds them there or in a CUDA
# install. A dry run on this machine: GPU_CHECK_DEVICE=cpu FERROLENS_BIN=target/release/ferrolens
# (GPU_CHECK_BENCH=0 skips the timings).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

pack() {
  export FERROLENS_CUDA_LINK=1 CARGO_TARGET_DIR=target/cuda-check
  build() { scripts/cuda-env.sh cargo build --release -p ferrolens-cli --features cuda; }
  STUB=target/cuda-toolkit/lib/stubs/libcuda.so
  if [ ! -e "$STUB" ]; then
    # candle links cudarc with `dynamic-linking`; the driver's libcuda has no wheel. First pass
    # compiles everything (its link fails); then stub the driver API from the undefined cu*
    # symbols of the compiled cudarc (soname libcuda.so.1, never shipped) and link again.
    build || true
    mkdir -p "$(dirname "$STUB")"
    nm -u "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib 2>/dev/null | awk '$1=="U" && $2 ~ /^cu[A-Z]/ {print "void " $2 "(void) {}"}' | sort -u > target/libcuda-stub.c
    [ -s target/libcuda-stub.c ] || { echo "no cudarc symbols found for the libcuda stub" >&2; exit 1; }
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" target/libcuda-stub.c
  fi
  build
  unset CARGO_TARGET_DIR
  rm -rf .gpu .gpu-model && mkdir -p .gpu .gpu-model
  strip -o target/ferrolens-cuda-stripped target/cuda-check/release/ferrolens
  xz -T0 -6 -c target/ferrolens-cuda-stripped > .gpu/ferrolens.xz
  # Config and tokenizer of the default model (the CPU build fetches it).
  cargo build --release -q -p ferrolens-cli
  target/release/ferrolens models export smollm2-135m --weights none --out .gpu/smollm2 >/dev/null
  local gguf
  gguf=$(ls "${FERROLENS_HOME:-$HOME/.cache/ferrolens}"/models/smollm2-135m/*.gguf)
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .gpu/smollm2.gguf.sha256
  # Parts sized to what a call can carry beside the repository (64 MiB a call, 1 MB spare):
  # part.00 travels with .gpu, every later part alone.
  local tree gpu budget first
  tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb | tail -1 | cut -f1)
  gpu=$(du -sb .gpu | cut -f1)
  budget=$((64 * 1048576 - tree - 1000000))
  first=$((budget - gpu))
  [ "$first" -gt 0 ] || { echo "gpu-check: .gpu ($gpu B) and the repository ($tree B) leave no room for a model part" >&2; exit 1; }
  head -c "$first" "$gguf" > .gpu-model/part.00
  tail -c +"$((first + 1))" "$gguf" | split -b "$budget" -d -a 2 --numeric-suffixes=1 - .gpu-model/part.
  echo "repository: $tree B, .gpu: $gpu B, 64 MiB a call; carry per call:"
  local i=1 f
  for f in .gpu-model/part.*; do
    if [ "$i" = 1 ]; then echo "  call $i: .gpu + $f ($((tree + gpu + $(stat -c %s "$f"))) B)"; else echo "  call $i: $f ($((tree + $(stat -c %s "$f"))) B)"; fi
    i=$((i + 1))
  done
}

# Directories holding the CUDA 13 runtime libraries the binary links, for LD_LIBRARY_PATH.
cuda_lib_dirs() {
  local roots=() lib p dirs=()
  for p in $(python3 -c 'import site, sysconfig; print(" ".join(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]))' 2>/dev/null) \
           /opt /usr/local/cuda /usr/local/cuda-13.0 /usr/local/nvidia /usr/lib/x86_64-linux-gnu; do
    [ -d "$p" ] && roots+=("$p")
  done
  for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13; do
    p=$(find "${roots[@]}" -name "$lib" -print -quit 2>/dev/null || true)
    if [ -n "$p" ]; then dirs+=("$(dirname "$p")"); else echo "gpu-check: $lib not found under ${roots[*]}" >&2; fi
  done
  # The driver's libcuda.so.1, when the loader's cache does not know it (never a toolkit stub).
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    p=$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 -name libcuda.so.1 -not -path '*stubs*' -print -quit 2>/dev/null || true)
    [ -n "$p" ] && dirs+=("$(dirname "$p")")
  fi
  printf '%s\n' "${dirs[@]}" | sort -u | paste -sd:
}

run_checks() {
  local mode=$1 dev=${GPU_CHECK_DEVICE:-cuda:0}
  local res=/tmp/gpu-results/$mode work=/tmp/ferrolens-gpu
  rm -rf "$res" && mkdir -p "$res" "$work"
  local F=${FERROLENS_BIN:-}
  if [ -z "$F" ]; then
    F=$work/ferrolens
    [ -s .gpu/ferrolens.xz ] || { echo "gpu-check: .gpu/ferrolens.xz is missing: run 'scripts/gpu-check.sh pack' here and carry .gpu" >&2; exit 2; }
    if [ ! -x "$F" ] || [ .gpu/ferrolens.xz -nt "$F" ]; then
      xz -dc .gpu/ferrolens.xz > "$F" 2>/dev/null || python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(".gpu/ferrolens.xz").read())' > "$F"
      chmod +x "$F"
    fi
    local libs
    libs=$(cuda_lib_dirs)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if ldd "$F" | grep -q "not found"; then
      ldd "$F" | grep "not found" >&2
      echo "gpu-check: the CUDA binary misses the libraries above; install CUDA 13 (or torch cu130) there" >&2
      exit 2
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$res/gpu.csv"
  fi
  "$F" info | tee "$res/info.txt"
  local models=()
  case $mode in
    synthetic)
      [ -s .gpu/smollm2/tokenizer.json ] || { echo "gpu-check: .gpu/smollm2/tokenizer.json is missing: run pack, carry .gpu" >&2; exit 2; }
      python3 scripts/synthetic_checkpoint.py make fixtures/smollm2/synthetic_spec.json "$work/smollm2-synthetic" --tokenizer .gpu/smollm2/tokenizer.json
      python3 scripts/synthetic_checkpoint.py gpt2-small-spec "$work/gpt2-small.spec.json"
      python3 scripts/synthetic_checkpoint.py make "$work/gpt2-small.spec.json" "$work/gpt2-small-synthetic" \
        --tokenizer fixtures/gpt2-tokenizer/encoder.json --tokenizer fixtures/gpt2-tokenizer/vocab.bpe
      models=("$work/smollm2-synthetic" "$work/gpt2-small-synthetic")
      ;;
    real)
      local parts=(.gpu-model/part.*)
      [ -e "${parts[0]}" ] || { echo "gpu-check: no .gpu-model/part.* here: carry them (see the header of this script)" >&2; exit 2; }
      local name
      name=$(awk '{print $2}' .gpu/smollm2.gguf.sha256)
      cat "${parts[@]}" > "$work/$name"
      if ! (cd "$work" && sha256sum -c "$ROOT/.gpu/smollm2.gguf.sha256"); then
        echo "gpu-check: the GGUF assembled from ${parts[*]} does not match its checksum: a part is missing (the machine went back between calls?)" >&2
        exit 2
      fi
      models=("$work/$name")
      ;;
    *) echo "usage: scripts/gpu-check.sh run synthetic|real" >&2; exit 2 ;;
  esac
  local failed=0 m tag
  for m in "${models[@]}"; do
    tag=$(basename "$m" .gguf)
    echo "== $tag: device-check f32 (must agree with the CPU to 1e-3)"
    "$F" device-check --model "$m" --device "$dev" --n 8 --out "$res/$tag-f32" > /dev/null || failed=1
    if [ "$dev" != cpu ]; then
      echo "== $tag: device-check bf16 (differences reported)"
      "$F" device-check --model "$m" --device "$dev" --dtype bf16 --n 8 --what logits,cache,atp,decode --out "$res/$tag-bf16" > /dev/null || true
      # Pipeline split (issue 16): two handles of one GPU are two devices to candle, so a tensor
      # left on the wrong stage fails here as it would across two cards.
      echo "== $tag: device-check f32 split over two device handles (--devices $dev,$dev)"
      "$F" device-check --model "$m" --devices "$dev,$dev" --n 8 --out "$res/$tag-split" > /dev/null || failed=1
    fi
  done
  # Timings on the first model (the real one in `real` mode), GPU against the same machine's CPU.
  m=${models[0]}
  tag=$(basename "$m" .gguf)
  "$F" data --task ioi --n 16 --model "$m" --out "$res/ioi16.jsonl"
  local d devices=("$dev")
  [ "$dev" = cpu ] || devices+=(cpu)
  [ "${GPU_CHECK_BENCH:-1}" = 1 ] || devices=()
  for d in "${devices[@]}"; do
    echo "== $tag: bench on $d"
    "$F" bench --model "$m" --device "$d" --data "$res/ioi16.jsonl" --what sgemm,forward,atp,relp,atp-star,path,heads,edges,circuits,decode \
      --decode-context 4096 > "$res/$tag-bench-${d/:/}.json" || failed=1
    if [ "$d" != cpu ]; then
      "$F" bench --model "$m" --device "$d" --dtype bf16 --data "$res/ioi16.jsonl" --what forward,heads \
        > "$res/$tag-bench-${d/:/}-bf16.json" || true
    fi
  done
  # The PyTorch baseline on the same card (transformers + module hooks, as TransformerLens does):
  # the same pairs, an HF export of the same model, f32 and bf16.
  if [ "$dev" != cpu ] && python3 -c 'import torch, transformers' 2>/dev/null; then
    echo "== $tag: PyTorch baseline (scripts/torch_baseline.py)"
    "$F" models export "$m" --weights f32 --out "$work/$tag-hf" > /dev/null
    for dt in f32 bf16; do
      python3 scripts/torch_baseline.py --model "$work/$tag-hf" --data "$res/ioi16.jsonl" --device "$dev" --dtype "$dt" \
        --out "$res/$tag-torch-$dt.json" > /dev/null || failed=1
    done
  fi
  for f in "$res"/*/device_check.json; do
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(sys.argv[1].split("/")[-2], j["dtype"], "failures:", j["failures"] or "none"); [print("  ", k, v) for k, v in j["checks"].items()]' "$f"
  done
  local out=${OUT:-$ROOT/target/gpu-results}
  mkdir -p "$out"
  tar -C /tmp/gpu-results -czf "$out/gpu-results-$mode.tgz" "$mode"
  echo "results: $out/gpu-results-$mode.tgz (failed=$failed)"
  return $failed
}

# Markdown rows for docs/benchmarks.md from an unpacked results folder (DIR/<model>-bench-*.json).
table() {
  python3 - "$1" <<'EOF'
import glob, json, os, sys
d = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(d, "*-bench-*.json"))):
    j = json.load(open(f))
    rows[(j["model"], j["device"], j["dtype"])] = j
keys = ["sgemm_1024_gflops", "forward_s", "forward_full_cache_s", "atp_s", "relp_s", "heads_all_pos_s", "edges_heads_s",
        "prefill_4096_tokens_per_s", "decode_4096_fused_tokens_per_s", "decode_4096_generic_tokens_per_s"]
print("| model | device | dtype | " + " | ".join(keys) + " |")
print("|" + "---|" * (3 + len(keys)))
for (m, dev, dt), j in rows.items():
    cells = [f"{j[k]:.4g}" if k in j else "" for k in keys]
    print(f"| {m} | {dev} | {dt} | " + " | ".join(cells) + " |")
# Speed-ups of each GPU row over the same model's CPU row (times: cpu/gpu; rates: gpu/cpu).
for (m, dev, dt), j in rows.items():
    c = rows.get((m, "cpu", "F32"))
    if dev == "cpu" or c is None:
        continue
    cells = []
    for k in keys:
        if k in j and k in c and j[k] > 0 and c[k] > 0:
            r = c[k] / j[k] if k.endswith("_s") else j[k] / c[k]
            cells.append(f"{r:.3g}x")
        else:
            cells.append("")
    print(f"| {m} | {dev} / cpu | {dt} | " + " | ".join(cells) + " |")
EOF
}

case "${1:-}" in
  pack) pack ;;
  run)
    # The log comes back beside the results ($OUT keeps at most 8 files).
    mkdir -p "${OUT:-$ROOT/target/gpu-results}"
    log="${OUT:-$ROOT/target/gpu-results}/run-${2:-synthetic}.log"
    rc=0
    run_checks "${2:-synthetic}" 2>&1 | tee "$log" || rc=$?
    exit $rc
    ;;
  table) table "${2:?usage: scripts/gpu-check.sh table DIR}" ;;
  *) echo "usage: scripts/gpu-check.sh pack | run synthetic|real | table DIR" >&2; exit 2 ;;
esac
