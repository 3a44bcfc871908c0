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
# Linking: candle 0.11 links cudarc with `dynamic-linking`, so the link needs libcublas,
# libcublasLt, libcurand, libnvrtc (installed from PyPI by cuda-env.sh with FERROLENS_CUDA_LINK=1)
# and libcuda.so, the driver, which has no wheel: `build` makes a link-time stub of it (every cu*
# symbol cudarc references, soname libcuda.so.1) in target/cuda-toolkit/lib/stubs. The stub is not
# bundled; on the GPU machine the driver's libcuda.so.1 is loaded. The bundle needs the GPU
# machine's libstdc++ and a driver >= 580 (CUDA 13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=target/gpu-bundle
case "${1:-}" in
  build)
    export FERROLENS_CUDA_LINK=1 CARGO_TARGET_DIR=target/cuda-check
    build() { scripts/cuda-env.sh cargo build --release -p ferrolens-cli --features cuda; }
    STUB=target/cuda-toolkit/lib/stubs/libcuda.so
    if [ ! -e "$STUB" ]; then
      # First pass compiles everything (its link fails without libcuda); then stub the driver API
      # from the undefined cu* symbols of the compiled cudarc and link again.
      build || true
      mkdir -p "$(dirname "$STUB")"
      nm -u "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib 2>/dev/null | awk '$1=="U" && $2 ~ /^cu[A-Z]/ {print "void " $2 "(void) {}"}' | sort -u > target/libcuda-stub.c
      [ -s target/libcuda-stub.c ] || { echo "no cudarc symbols found for the libcuda stub" >&2; exit 1; }
      cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" target/libcuda-stub.c
    fi
    build
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/lib" "$BUNDLE/models"
    cp target/cuda-check/release/ferrolens "$BUNDLE/"
    for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
      if [ -e "target/cuda-toolkit/lib/$l" ]; then cp -L "target/cuda-toolkit/lib/$l" "$BUNDLE/lib/"; fi
    done
    # The CUDA binary needs the driver to start; fetch the model with the CPU build.
    cargo run --release -q -p ferrolens-cli -- models pull smollm2-135m >/dev/null
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
