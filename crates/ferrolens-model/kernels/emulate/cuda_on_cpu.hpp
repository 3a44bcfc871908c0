// A minimal CUDA-on-CPU emulation, enough to run ferrolens's kernels (kernels/*.cu) on a machine
// without a GPU and check them against the Rust CPU reference (tests/kernel_emulation.rs).
//
// Every CUDA thread of a block is an OS thread; blocks run one after another, so `__shared__`
// variables (function-local statics here) are the block's shared memory. `__syncthreads` is a
// barrier over the block, `__shfl_xor_sync` exchanges through a per-warp buffer between two
// barriers over the warp (every lane of a warp must call it, as the kernels do: full mask only).
// This checks indexing, reductions, tie-breaking and the online softmax; it says nothing about
// speed, memory coalescing or races the barriers would hide.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace emu {
constexpr int kMaxThreads = 1024;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float warp_exchange[kMaxThreads];
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) {
        std::fprintf(stderr, "emulation: only full-warp shuffles are supported\n");
        std::abort();
    }
    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    emu::warp_exchange[t] = v;
    emu::warp_barriers[warp]->arrive_and_wait();
    const float r = emu::warp_exchange[warp * 32 + (lane ^ lane_mask)];
    emu::warp_barriers[warp]->arrive_and_wait();
    return r;
}

// Run `kernel(args...)` over a 1-D grid of `grid` blocks of `block` threads (a multiple of 32).
template <typename F>
void launch(unsigned grid, unsigned block, F kernel) {
    if (block % 32 != 0 || block > emu::kMaxThreads) {
        std::fprintf(stderr, "emulation: block of %u threads is not a multiple of 32 up to 1024\n", block);
        std::abort();
    }
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        emu::block_barrier = std::make_unique<std::barrier<>>(block);
        emu::warp_barriers.clear();
        for (unsigned w = 0; w < block / 32; ++w) emu::warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([=] {
                threadIdx = dim3{t, 0, 0};
                blockIdx = dim3{b, 0, 0};
                kernel();
            });
        }
        for (auto& th : threads) th.join();
    }
}
