// The FORA reuse step in one launch: every block's cached attention and MLP outputs applied to
// the f32 residual stream with the CURRENT step's gates, layer by layer in order:
//   for l: x += gate_msa_l * A_l; x += gate_mlp_l * M_l
// Each thread owns a few elements of x, keeps them in registers across all layers and writes
// them once: the launch reads the cache once and x once. Products and sums are explicit _rn
// operations (no FMA contraction) so the result is the CPU reference's, bit for bit.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread on the vector path: one 16-byte bf16 load per slab

FORA_DEVICE float gated_add(float x, float gate, float cached) {
    return __fadd_rn(x, __fmul_rn(gate, cached));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) fora_reuse(const ForaReuseParams p) {
    const long long total = (long long)p.rows * p.tokens * p.dim;
    float* x = reinterpret_cast<float*>(p.x);
    const __nv_bfloat16* cache = reinterpret_cast<const __nv_bfloat16*>(p.cache);
    const float* mod = reinterpret_cast<const float*>(p.modulation);
    const long long per_row = (long long)p.tokens * p.dim;  // elements of one model row
    // Vector path when the 8 elements of a thread share a token row and every address is
    // 16-byte aligned (DiT: dim is a multiple of 64, the table's columns of 4).
    const bool vec = (p.dim % kVec == 0) && (p.slab % kVec == 0) && (p.ld_mod % 4 == 0) &&
                     (p.layer_cols % 4 == 0) && (p.gate_msa_col % 4 == 0) &&
                     (p.gate_mlp_col % 4 == 0);
    if (vec) {
        const long long i0 = ((long long)blockIdx.x * kThreads + threadIdx.x) * kVec;
        if (i0 >= total) return;
        const long long model_row = i0 / per_row;
        const int d0 = (int)(i0 % p.dim);
        float acc[kVec];
        const float4 x0 = *reinterpret_cast<const float4*>(x + i0);
        const float4 x1 = *reinterpret_cast<const float4*>(x + i0 + 4);
        acc[0] = x0.x; acc[1] = x0.y; acc[2] = x0.z; acc[3] = x0.w;
        acc[4] = x1.x; acc[5] = x1.y; acc[6] = x1.z; acc[7] = x1.w;
        const float* gates = mod + model_row * p.ld_mod + d0;
#pragma unroll 2
        for (int l = 0; l < p.layers; ++l) {
#pragma unroll
            for (int which = 0; which < 2; ++which) {
                const float* g = gates + (long long)l * p.layer_cols +
                                 (which == 0 ? p.gate_msa_col : p.gate_mlp_col);
                const float4 g0 = *reinterpret_cast<const float4*>(g);
                const float4 g1 = *reinterpret_cast<const float4*>(g + 4);
                const uint4 raw = *reinterpret_cast<const uint4*>(
                    cache + (2LL * l + which) * p.slab + i0);
                const __nv_bfloat162* c = reinterpret_cast<const __nv_bfloat162*>(&raw);
                const float2 c0 = __bfloat1622float2(c[0]), c1 = __bfloat1622float2(c[1]);
                const float2 c2 = __bfloat1622float2(c[2]), c3 = __bfloat1622float2(c[3]);
                acc[0] = gated_add(acc[0], g0.x, c0.x);
                acc[1] = gated_add(acc[1], g0.y, c0.y);
                acc[2] = gated_add(acc[2], g0.z, c1.x);
                acc[3] = gated_add(acc[3], g0.w, c1.y);
                acc[4] = gated_add(acc[4], g1.x, c2.x);
                acc[5] = gated_add(acc[5], g1.y, c2.y);
                acc[6] = gated_add(acc[6], g1.z, c3.x);
                acc[7] = gated_add(acc[7], g1.w, c3.y);
            }
        }
        *reinterpret_cast<float4*>(x + i0) = make_float4(acc[0], acc[1], acc[2], acc[3]);
        *reinterpret_cast<float4*>(x + i0 + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
    } else {
        const long long i = (long long)blockIdx.x * kThreads + threadIdx.x;
        if (i >= total) return;
        const long long model_row = i / per_row;
        const int d = (int)(i % p.dim);
        const float* gates = mod + model_row * p.ld_mod + d;
        float acc = x[i];
        for (int l = 0; l < p.layers; ++l) {
            const float* g = gates + (long long)l * p.layer_cols;
            acc = gated_add(acc, g[p.gate_msa_col], bf16_to_f32(cache[(2LL * l) * p.slab + i]));
            acc = gated_add(acc, g[p.gate_mlp_col], bf16_to_f32(cache[(2LL * l + 1) * p.slab + i]));
        }
        x[i] = acc;
    }
}
