// Fused attention step for KV-cache decoding with retrieval-head statistics.
//
// One block per (batch row, head); each warp walks keys t = warp, warp + n_warps, ... with an
// online softmax (running max m, normaliser l, accumulator acc over d_head) and the running
// argmax (first maximal key). Warps are merged in shared memory. Nothing of size [heads, T]
// leaves the kernel: the output per (row, head) is z [d_head] followed by the argmax key as a
// float (exact below 2^24 keys).
//
// q   [b, h, d]        one query per head
// k,v [b, T, kvh, d]   the KV cache (GQA heads not repeated)
// out [b, h, d + 1]
//
// kernels/emulate/ runs this file on the CPU (one OS thread per CUDA thread) so that
// tests/kernel_emulation.rs checks it against the Rust reference on machines without a GPU.
#include <math.h>

#define MAX_PER_LANE 8   // d_head <= 256
#define MAX_WARPS 8      // block of 256 threads

extern "C" __global__ void ferrolens_decode_attn_f32(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, int h, int kvh, int T, int d, float scale,
    unsigned long long uniform_mask)
{
    const int bh = blockIdx.x;
    const int bi = bh / h, head = bh % h;
    const int kv = head / (h / kvh);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nwarps = blockDim.x / 32;
    const bool uniform = (uniform_mask >> head) & 1ULL;
    const int per = (d + 31) / 32;
    const float* qp = q + (size_t)bh * d;
    float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        int c = lane + 32 * i;
        qr[i] = (i < per && c < d) ? qp[c] : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f, best = -INFINITY;
    int besti = 0x7fffffff;
    for (int t = warp; t < T; t += nwarps) {
        const size_t row = (((size_t)bi * T + t) * kvh + kv) * d;
        float s = 0.f;
        for (int i = 0; i < per; ++i) {
            int c = lane + 32 * i;
            if (c < d) s += qr[i] * k[row + c];
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        s = uniform ? 0.f : s * scale;
        if (s > best) { best = s; besti = t; }
        const float mn = fmaxf(m, s);
        const float a = expf(m - mn);
        const float e = expf(s - mn);
        for (int i = 0; i < per; ++i) {
            int c = lane + 32 * i;
            acc[i] = acc[i] * a + ((c < d) ? e * v[row + c] : 0.f);
        }
        l = l * a + e;
        m = mn;
    }
    __shared__ float sm[MAX_WARPS], sl[MAX_WARPS], sbest[MAX_WARPS];
    __shared__ int sbi[MAX_WARPS];
    __shared__ float sacc[MAX_WARPS * 32 * MAX_PER_LANE];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; sbest[warp] = best; sbi[warp] = besti; }
    for (int i = 0; i < per; ++i) {
        int c = lane + 32 * i;
        if (c < d) sacc[warp * d + c] = acc[i];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < nwarps; ++w) M = fmaxf(M, sm[w]);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float num = 0.f, den = 0.f;
        for (int w = 0; w < nwarps; ++w) {
            if (sm[w] == -INFINITY) continue;
            const float f = expf(sm[w] - M);
            num += sacc[w * d + c] * f;
            den += sl[w] * f;
        }
        out[(size_t)bh * (d + 1) + c] = num / den;
    }
    if (threadIdx.x == 0) {
        float B = -INFINITY;
        int I = 0x7fffffff;
        for (int w = 0; w < nwarps; ++w) {
            if (sbest[w] > B || (sbest[w] == B && sbi[w] < I)) { B = sbest[w]; I = sbi[w]; }
        }
        if (I == 0x7fffffff) I = 0;  // no finite score (NaN query): key 0, as the CPU reference
        out[(size_t)bh * (d + 1) + d] = (float)I;
    }
}
