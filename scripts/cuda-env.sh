#!/usr/bin/env bash
# Prepare a CUDA toolkit from PyPI and run a command with what candle's `cuda` feature needs at
# build time, on any machine (no GPU, no system CUDA):
#
#   scripts/cuda-env.sh cargo check --release --workspace --features cuda
#   scripts/cuda-env.sh cargo build --release -p ferrolens-cli --features cuda
#
# or `source scripts/cuda-env.sh` to set the variables in the current shell.
#
# The toolkit is CUDA 13.0 (the first CUDA whose PyPI `nvidia-cuda-nvcc` ships the nvcc driver;
# the cu12 wheels carry ptxas only). It lands in $FERROLENS_CUDA_HOME (default target/cuda-toolkit),
# once. Binaries built with it need an NVIDIA driver >= 580 and libcudart.so.13 at run time
# ($CUDA_HOME/lib, carried next to the binary by scripts/gpu-check.sh).
#
# CUDA_COMPUTE_CAP picks the GPU architecture the kernels are compiled for (default 90: H100/H200);
# candle's build would otherwise ask nvidia-smi, which a build machine does not have.
set -euo pipefail
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CUDA_HOME="${FERROLENS_CUDA_HOME:-$_here/target/cuda-toolkit}"
_v=13.0.88
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "cuda-env: installing the CUDA $_v build toolkit from PyPI into $CUDA_HOME" >&2
    _py="$CUDA_HOME.pip"
    rm -rf "$_py"
    python3 -m pip install --quiet --no-deps --target "$_py" \
        "nvidia-cuda-nvcc==$_v" "nvidia-nvvm==$_v" "nvidia-cuda-crt==$_v" "nvidia-cuda-runtime==$_v" "nvidia-cuda-cccl==13.0.85"
    rm -rf "$CUDA_HOME"
    mv "$_py/nvidia/cu13" "$CUDA_HOME"
    rm -rf "$_py"
    # Link names the linker and nvcc look for.
    [ -d "$CUDA_HOME/lib" ] && [ ! -e "$CUDA_HOME/lib64" ] && ln -s lib "$CUDA_HOME/lib64"
    for so in "$CUDA_HOME"/lib/libcudart.so.*; do
        [ -e "$so" ] && ln -sf "$(basename "$so")" "$CUDA_HOME/lib/libcudart.so" && break
    done
fi
# FERROLENS_CUDA_LINK=1: also the libraries a full link needs (candle links cudarc with
# `dynamic-linking`): cuBLAS, cuRAND, NVRTC from PyPI. libcuda.so (the driver) has no wheel;
# scripts/gpu-check.sh makes a link-time stub of it in $CUDA_HOME/lib/stubs.
if [ "${FERROLENS_CUDA_LINK:-0}" = 1 ] && [ ! -e "$CUDA_HOME/lib/libcublas.so" ]; then
    echo "cuda-env: installing cuBLAS, cuRAND and NVRTC for linking" >&2
    _py="$CUDA_HOME.link"
    rm -rf "$_py"
    python3 -m pip install --quiet --no-deps --target "$_py" "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==$_v"
    cp -a "$_py"/nvidia/cu13/lib/. "$CUDA_HOME/lib/"
    rm -rf "$_py"
    for so in "$CUDA_HOME"/lib/lib*.so.[0-9]*; do
        base="${so%%.so.*}.so"
        [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
    done
fi
export NVCC="$CUDA_HOME/bin/nvcc"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
export LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ $# -gt 0 ]; then
    exec "$@"
fi
