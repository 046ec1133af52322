// The fused GEMM epilogues, shared by the mma.sync kernels (gemm.cu), the Hopper wgmma kernels
// (gemm_sm90.cu) and the stand-alone epilogue kernel: one copy of the maths, so every path
// rounds and indexes the same way.
#pragma once

#include "common.cuh"

namespace {

// Everything the epilogue needs, shared by the fused GEMM and the stand-alone epilogue kernel.
struct Epilogue {
    const float* bias;      // [N] or null
    void* out;              // bf16 or f32 [M, ldo]; the f32 residual for GATE_RESIDUAL
    __nv_bfloat16* cache;   // bf16 [M, ldc] or null
    const float* gate;      // f32, row m uses gate[(m / rows_per_gate) * ldg + n]
    int m, n, ldo, ldc, ldg, rows_per_gate, kind;
};

// Applies the epilogue to (row, col) and, when col + 1 < n, (row, col + 1). `col` is even, and
// out/cache are 8-byte aligned, so an even leading dimension makes the pair access aligned.
FORA_DEVICE void epilogue_pair(const Epilogue& e, int row, int col, float v0, float v1) {
    const bool has1 = col + 1 < e.n;
    if (e.bias != nullptr) {
        v0 += e.bias[col];
        if (has1) v1 += e.bias[col + 1];
    }
    const long long o = static_cast<long long>(row) * e.ldo + col;
    const bool out_pair = has1 && (e.ldo & 1) == 0;
    if (e.kind == FORA_EPI_BIAS_BF16 || e.kind == FORA_EPI_BIAS_GELU_BF16) {
        if (e.kind == FORA_EPI_BIAS_GELU_BF16) {
            v0 = gelu_tanh(v0);
            v1 = gelu_tanh(v1);
        }
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(e.out) + o;
        if (out_pair) {
            *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(v0, v1);
        } else {
            out[0] = f32_to_bf16(v0);
            if (has1) out[1] = f32_to_bf16(v1);
        }
    } else if (e.kind == FORA_EPI_BIAS_F32) {
        float* out = static_cast<float*>(e.out) + o;
        if (out_pair) {
            *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
        } else {
            out[0] = v0;
            if (has1) out[1] = v1;
        }
    } else {  // FORA_EPI_BIAS_GATE_RESIDUAL
        if (e.cache != nullptr) {
            __nv_bfloat16* c = e.cache + static_cast<long long>(row) * e.ldc + col;
            if (has1 && (e.ldc & 1) == 0) {
                *reinterpret_cast<__nv_bfloat162*>(c) = __floats2bfloat162_rn(v0, v1);
            } else {
                c[0] = f32_to_bf16(v0);
                if (has1) c[1] = f32_to_bf16(v1);
            }
        }
        const float* g = e.gate + static_cast<long long>(row / e.rows_per_gate) * e.ldg + col;
        float* res = static_cast<float*>(e.out) + o;
        if (out_pair) {
            float2 r = *reinterpret_cast<float2*>(res);
            r.x += g[0] * v0;
            r.y += g[1] * v1;
            *reinterpret_cast<float2*>(res) = r;
        } else {
            res[0] += g[0] * v0;
            if (has1) res[1] += g[1] * v1;
        }
    }
}

// The epilogue a GEMM CTA applies from its accumulators: the caller's, or for a split-K slice
// (FORA_EPI_PARTIAL_F32) its raw partial sums (f32, no bias) into slice `slice` of the workspace.
FORA_DEVICE Epilogue gemm_epilogue_of(const GemmParams& p, unsigned slice) {
    const bool partial = p.epilogue == FORA_EPI_PARTIAL_F32;
    void* out = partial ? static_cast<void*>(reinterpret_cast<float*>(p.out) +
                                             static_cast<long long>(slice) * p.m * p.ldo)
                        : reinterpret_cast<void*>(p.out);
    return Epilogue{partial ? nullptr : reinterpret_cast<const float*>(p.bias),
                    out,
                    reinterpret_cast<__nv_bfloat16*>(p.cache),
                    reinterpret_cast<const float*>(p.gate),
                    p.m, p.n, p.ldo, p.ldc, p.ldg, p.rows_per_gate,
                    partial ? static_cast<int>(FORA_EPI_BIAS_F32) : p.epilogue};
}

}  // namespace
