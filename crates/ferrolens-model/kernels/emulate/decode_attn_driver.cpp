// Runs kernels/decode_attn.cu under the CPU emulation (cuda_on_cpu.hpp).
//
//   decode_attn_driver IN OUT
//
// IN (little-endian): i32 b, h, kvh, T, d; f32 scale; u64 uniform_mask; f32 q[b*h*d],
// k[b*T*kvh*d], v[b*T*kvh*d]. OUT: f32 [b*h*(d+1)], what the kernel writes, launched as
// fused.rs launches it (b*h blocks of 256 threads).
#include "cuda_on_cpu.hpp"
#include "../decode_attn.cu"

#include <cstdint>
#include <fstream>

template <typename T>
static T get(std::ifstream& f) {
    T x;
    f.read(reinterpret_cast<char*>(&x), sizeof x);
    return x;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    const int b = get<int32_t>(in), h = get<int32_t>(in), kvh = get<int32_t>(in), T = get<int32_t>(in), d = get<int32_t>(in);
    const float scale = get<float>(in);
    const unsigned long long mask = get<uint64_t>(in);
    std::vector<float> q((size_t)b * h * d), k((size_t)b * T * kvh * d), v(k.size()), out((size_t)b * h * (d + 1), NAN);
    in.read(reinterpret_cast<char*>(q.data()), q.size() * 4);
    in.read(reinterpret_cast<char*>(k.data()), k.size() * 4);
    in.read(reinterpret_cast<char*>(v.data()), v.size() * 4);
    if (!in) {
        std::fprintf(stderr, "short input\n");
        return 2;
    }
    launch(b * h, 256, [&] { ferrolens_decode_attn_f32(q.data(), k.data(), v.data(), out.data(), h, kvh, T, d, scale, mask); });
    std::ofstream o(argv[2], std::ios::binary);
    o.write(reinterpret_cast<const char*>(out.data()), out.size() * 4);
    return o ? 0 : 1;
}
