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

// The epilogue of a thread's accumulator fragments in the mma / wgmma layout: for j < NJ,
// acc[4j], acc[4j + 1] at (row, c, c + 1) and acc[4j + 2], acc[4j + 3] at (row + 8, c, c + 1),
// c = col_base + 8j. The same maths as epilogue_pair, element by element, but every load of a
// chunk of column pairs (bias, gates, residual) is issued before any of its stores: with
// epilogue_pair per element the compiler may not hoist a load above a store to memory it
// cannot prove disjoint, so each pair waited one round trip, and beside a GEMM's shared-memory
// carve-out L1 keeps little (the TMA GEMM's epilogue took longer than its mainloop on an H200).

// The largest divisor of nj up to max: column pairs of one chunk (registers for its loads).
__host__ __device__ constexpr int epilogue_chunk(int nj, int max) {
    int c = nj < max ? nj : max;
    while (nj % c != 0) --c;
    return c;
}

// Stores the epilogue of one column pair of row rr for epilogue KIND (e.kind, known at compile
// time): v0, v1 with the bias added, and for the gated residual the loaded gate and residual
// pairs. ALIGNED: the caller knows the pair is whole and the leading dimensions even (every
// access a pair), so nothing is checked.
template <int KIND, bool ALIGNED = false>
FORA_DEVICE void epilogue_store_pair_of(const Epilogue& e, int rr, int col, bool has1, float v0, float v1,
                                        float2 gate, float2 res) {
    static_assert(KIND >= FORA_EPI_BIAS_BF16 && KIND <= FORA_EPI_BIAS_GATE_RESIDUAL, "a stored kind");
    const long long o = static_cast<long long>(rr) * e.ldo + col;
    const bool out_pair = ALIGNED || (has1 && (e.ldo & 1) == 0);
    if constexpr (KIND == FORA_EPI_BIAS_BF16 || KIND == FORA_EPI_BIAS_GELU_BF16) {
        if constexpr (KIND == FORA_EPI_BIAS_GELU_BF16) {
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
    } else if constexpr (KIND == FORA_EPI_BIAS_F32) {
        float* out = static_cast<float*>(e.out) + o;
        if (out_pair) {
            *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
        } else {
            out[0] = v0;
            if (has1) out[1] = v1;
        }
    } else {  // FORA_EPI_BIAS_GATE_RESIDUAL
        if (e.cache != nullptr) {
            __nv_bfloat16* cp = e.cache + static_cast<long long>(rr) * e.ldc + col;
            if (ALIGNED || (has1 && (e.ldc & 1) == 0)) {
                *reinterpret_cast<__nv_bfloat162*>(cp) = __floats2bfloat162_rn(v0, v1);
            } else {
                cp[0] = f32_to_bf16(v0);
                if (has1) cp[1] = f32_to_bf16(v1);
            }
        }
        res.x += gate.x * v0;
        res.y += gate.y * v1;
        float* out = static_cast<float*>(e.out) + o;
        if (out_pair) {
            *reinterpret_cast<float2*>(out) = res;
        } else {
            out[0] = res.x;
            if (has1) out[1] = res.y;
        }
    }
}

// epilogue_store_pair_of for the kind e.kind holds at run time (GELU, then the bf16 kind's
// store: one copy of the store code for both bf16 kinds).
FORA_DEVICE void epilogue_store_pair(const Epilogue& e, int rr, int col, bool has1, float v0, float v1, float2 gate,
                                     float2 res) {
    if (e.kind == FORA_EPI_BIAS_BF16 || e.kind == FORA_EPI_BIAS_GELU_BF16) {
        if (e.kind == FORA_EPI_BIAS_GELU_BF16) {
            v0 = gelu_tanh(v0);
            v1 = gelu_tanh(v1);
        }
        epilogue_store_pair_of<FORA_EPI_BIAS_BF16>(e, rr, col, has1, v0, v1, gate, res);
    } else if (e.kind == FORA_EPI_BIAS_F32) {
        epilogue_store_pair_of<FORA_EPI_BIAS_F32>(e, rr, col, has1, v0, v1, gate, res);
    } else {
        epilogue_store_pair_of<FORA_EPI_BIAS_GATE_RESIDUAL>(e, rr, col, has1, v0, v1, gate, res);
    }
}

// The gated residual's loads for one column pair of row rr: the gate pair and the f32 residual
// pair it is added to (the second of each 0 without has1). ALIGNED as epilogue_store_pair_of.
template <bool ALIGNED = false>
FORA_DEVICE void epilogue_load_gated(const Epilogue& e, int rr, int col, bool has1, float2& gate,
                                     float2& res) {
    const float* g = e.gate + static_cast<long long>(rr / e.rows_per_gate) * e.ldg + col;
    const float* x = static_cast<const float*>(e.out) + static_cast<long long>(rr) * e.ldo + col;
    gate = make_float2(g[0], has1 ? g[1] : 0.0f);
    if (ALIGNED || (has1 && (e.ldo & 1) == 0)) {
        res = *reinterpret_cast<const float2*>(x);
    } else {
        res = make_float2(x[0], has1 ? x[1] : 0.0f);
    }
}

// Applies the epilogue to (row, col) and, when col + 1 < n, (row, col + 1). `col` is even, and
// out/cache are 8-byte aligned, so an even leading dimension makes the pair access aligned.
FORA_DEVICE void epilogue_pair(const Epilogue& e, int row, int col, float v0, float v1) {
    const bool has1 = col + 1 < e.n;
    if (e.bias != nullptr) {
        v0 += e.bias[col];
        if (has1) v1 += e.bias[col + 1];
    }
    float2 gate = make_float2(0.0f, 0.0f), res = make_float2(0.0f, 0.0f);
    if (e.kind == FORA_EPI_BIAS_GATE_RESIDUAL) epilogue_load_gated(e, row, col, has1, gate, res);
    epilogue_store_pair(e, row, col, has1, v0, v1, gate, res);
}

// epilogue_fragments for one epilogue KIND (e.kind), so that the code a tile runs holds no
// other kind's: the gated residual (gates and residual loaded per row, 4 column pairs a chunk)
// or a bias-only kind (8 a chunk). FULL: every row and column of the fragments is inside the
// output and the leading dimensions are even, so no access is checked (the common case: a
// whole tile; the checks were most of the epilogue's instructions). One kind a copy matters
// because this code is unrolled and run once a tile: with the kinds interleaved pair by pair,
// most of what the instruction fetch brought in was jumped over (session 19's ncu: the
// register epilogue's warps mostly wait on instruction fetch). In gemm_tma_128x128 a whole
// tile's epilogue spanned 1304 SASS instructions (1448 gated) with 161 branches; one kind a
// copy: bf16 216, GELU 792, f32 184, gated 488, one branch.
template <int NJ, int KIND, bool FULL>
FORA_DEVICE void epilogue_fragments_of(const Epilogue& e, int row, int col_base, const float* acc) {
    constexpr bool GATED = KIND == FORA_EPI_BIAS_GATE_RESIDUAL;
    constexpr int kChunk = epilogue_chunk(NJ, GATED ? 4 : 8);
    constexpr int kRows = GATED ? 2 : 1;  // rows of gate / residual registers
#pragma unroll
    for (int j0 = 0; j0 < NJ; j0 += kChunk) {
        float2 bias[kChunk];
        float2 gate[kRows][kChunk];
        float2 res[kRows][kChunk];
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
            const int col = col_base + 8 * (j0 + c);
            const bool has1 = FULL || col + 1 < e.n;
            bias[c] = make_float2(0.0f, 0.0f);
            if (e.bias != nullptr && (FULL || col < e.n)) {
                bias[c].x = e.bias[col];
                if (has1) bias[c].y = e.bias[col + 1];
            }
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                gate[r][c] = make_float2(0.0f, 0.0f);
                res[r][c] = make_float2(0.0f, 0.0f);
                const int rr = row + 8 * r;
                if (!GATED || (!FULL && (col >= e.n || rr >= e.m))) continue;
                epilogue_load_gated<FULL>(e, rr, col, has1, gate[r][c], res[r][c]);
            }
        }
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
            const int col = col_base + 8 * (j0 + c);
            if (!FULL && col >= e.n) continue;
            const bool has1 = FULL || col + 1 < e.n;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int rr = row + 8 * r;
                if (!FULL && rr >= e.m) continue;
                float v0 = acc[4 * (j0 + c) + 2 * r];
                float v1 = acc[4 * (j0 + c) + 2 * r + 1];
                if (e.bias != nullptr) {
                    v0 += bias[c].x;
                    if (has1) v1 += bias[c].y;
                }
                epilogue_store_pair_of<KIND, FULL>(e, rr, col, has1, v0, v1, gate[GATED ? r : 0][c],
                                                   res[GATED ? r : 0][c]);
            }
        }
    }
}

// epilogue_fragments_of<NJ, KIND, full>.
template <int NJ, int KIND>
FORA_DEVICE void epilogue_fragments_by_bounds(const Epilogue& e, int row, int col_base, const float* acc, bool full) {
    if (full) {
        epilogue_fragments_of<NJ, KIND, true>(e, row, col_base, acc);
    } else {
        epilogue_fragments_of<NJ, KIND, false>(e, row, col_base, acc);
    }
}

// whole_tile: the caller's tile lies inside the output (its last row and column < m, n); the
// unchecked path then also needs even leading dimensions.
template <int NJ>
FORA_DEVICE void epilogue_fragments(const Epilogue& e, int row, int col_base, const float* acc,
                                    bool whole_tile) {
    const bool full = whole_tile && (e.ldo & 1) == 0 && (e.cache == nullptr || (e.ldc & 1) == 0);
    switch (e.kind) {
        case FORA_EPI_BIAS_BF16:
            epilogue_fragments_by_bounds<NJ, FORA_EPI_BIAS_BF16>(e, row, col_base, acc, full);
            break;
        case FORA_EPI_BIAS_GELU_BF16:
            epilogue_fragments_by_bounds<NJ, FORA_EPI_BIAS_GELU_BF16>(e, row, col_base, acc, full);
            break;
        case FORA_EPI_BIAS_F32:
            epilogue_fragments_by_bounds<NJ, FORA_EPI_BIAS_F32>(e, row, col_base, acc, full);
            break;
        default:
            epilogue_fragments_by_bounds<NJ, FORA_EPI_BIAS_GATE_RESIDUAL>(e, row, col_base, acc, full);
            break;
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
