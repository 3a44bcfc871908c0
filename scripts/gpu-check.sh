#!/usr/bin/env bash
# GPU parity and benchmarks (issue 6), in two halves because GPU machines here have no Rust
# toolchain and no network:
#
#   scripts/gpu-check.sh build     # on the build machine: CUDA build + bundle in target/gpu-bundle
#   scripts/gpu-check.sh run       # on the GPU machine (repo root, bundle carried along)
#
# `build` compiles `ferrolens` with the cuda feature (toolkit from PyPI through cuda-env.sh),
# then puts the binary, libcudart.so.13 and the default model's GGUF in target/gpu-bundle/.
#
# KNOWN GAP (2026-11-27): candle 0.11 links cudarc with `dynamic-linking`, so the final link needs
# libcuda.so (the driver; NVIDIA ships only a stub of it in the full toolkit), libcublas,
# libcublasLt, libcurand and libnvrtc. cuda-env.sh installs nvcc, headers and libcudart only, which
# is all `cargo check --features cuda` (what CI runs) needs; the link step of `build` fails with
# "unable to find library -lcuda". To finish it: pip-install nvidia-cublas, nvidia-curand and
# nvidia-cuda-nvrtc 13.0.x into the toolkit's lib/, and provide a libcuda.so stub with soname
# libcuda.so.1 (or build on a machine with the driver installed).
# `run` prints the devices, runs `device-check` (CPU f32 vs cuda:0 f32 must agree within 1e-3:
# logits, a residual cache, the exact head sweep, AtP, RelP, retrieval decoding), the same in
# bf16 (reported), and `bench` on both devices; results land in $OUT (or target/gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=target/gpu-bundle
case "${1:-}" in
  build)
    CARGO_TARGET_DIR=target/cuda-check scripts/cuda-env.sh cargo build --release -p ferrolens-cli --features cuda
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/lib" "$BUNDLE/models"
    cp target/cuda-check/release/ferrolens "$BUNDLE/"
    cp -L target/cuda-toolkit/lib/libcudart.so.13 "$BUNDLE/lib/"
    ./target/cuda-check/release/ferrolens models pull smollm2-135m >/dev/null
    cp -r "${FERROLENS_HOME:-$HOME/.cache/ferrolens}/models/smollm2-135m" "$BUNDLE/models/"
    du -sh "$BUNDLE"
    ;;
  run)
    OUT="${OUT:-target/gpu-results}"
    mkdir -p "$OUT"
    export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export FERROLENS_HOME="$PWD/$BUNDLE"
    F="$BUNDLE/ferrolens"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.csv"
    "$F" info | tee "$OUT/info.txt"
    "$F" device-check --device cuda:0 --n 8 --out "$OUT/f32" | tail -5
    "$F" device-check --device cuda:0 --dtype bf16 --n 8 --out "$OUT/bf16" | tail -5 || true
    "$F" data --task ioi --n 16 --out "$OUT/ioi16.jsonl"
    for d in cuda:0 cpu; do
      "$F" bench --device "$d" --data "$OUT/ioi16.jsonl" --what sgemm,forward,atp,relp,heads,decode --decode-context 4096 \
        > "$OUT/bench-${d/:/}.json"
    done
    ls -la "$OUT"
    ;;
  *)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
