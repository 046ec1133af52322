// LayerNorm (no affine, f32 statistics) + adaLN modulate: the f32 residual stream -> the bf16
// input of the next GEMM. One warp per token row; two-pass statistics (mean, then the mean of
// squared deviations) so large offsets in x cost no precision.
// Rows of up to 128 * kMaxChunks elements (every DiT: 384 .. 1152) are loaded into registers
// with all loads in flight at once, so a row costs one memory round trip instead of one per
// 128 elements per pass (the small-batch case is latency-bound). Longer float4 rows re-read the
// row from L1/L2 for each pass; the sums are taken in the same order on both paths.
// residual_layernorm puts the residual epilogue of the GEMM before it into the same pass.
//
// Few rows (batch 2: 512 token rows, a warp each = one warp per SM) leave the GPU idle while
// each warp waits on its loads, so the _w4 variants give a token row four warps (a block): four
// times the warps in flight, a quarter of the registers each, and the row's sums finished
// across the warps through shared memory in a fixed order. Every other load (shift, scale,
// bias, gate) is issued with the row's before the first reduction, so a row costs one memory
// round trip.
#include "common.cuh"

namespace {

constexpr int kWarps = 4;      // token rows per block: more blocks for the few rows of batch 2
constexpr int kMaxChunks = 12;  // float4 chunks per lane held in registers: dim <= 1536

struct Row {
    const float* x;
    const float* shift;
    const float* scale;
    __nv_bfloat16* out;
};

FORA_DEVICE Row row_of(const LayerNormModulateParams& p, long long token) {
    const long long model_row = token / p.tokens;
    const float* mod = reinterpret_cast<const float*>(p.modulation) + model_row * p.ld_mod;
    Row r;
    r.x = reinterpret_cast<const float*>(p.x) + token * p.dim;
    r.shift = mod + p.shift_col;
    r.scale = mod + p.scale_col;
    r.out = reinterpret_cast<__nv_bfloat16*>(p.out) + token * p.dim;
    return r;
}

// The sum of v over the WPR warps that hold one token row, the same value in every thread of
// them, in a fixed order. With WPR > 1 every thread of the block must call it, and each sum of
// a block needs a `partial` of its own (kWarps floats): with no barrier after the reads, a
// second sum into the same one could overwrite a value a slower warp has yet to read.
template <int WPR>
FORA_DEVICE float row_sum(float v, float* partial) {
    v = warp_sum(v);
    if (WPR == 1) return v;
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) partial[warp] = v;
    __syncthreads();
    const int first = warp / WPR * WPR;
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < WPR; ++w) s += partial[first + w];
    return s;
}

// Whether the _w4 paths issue the shift / scale / bias / gate loads with the row's: with one
// warp per row the registers for all of them would spill (12 float4 chunks of each).
template <int WPR>
constexpr bool kPrefetch = WPR > 1;

// The register path's LayerNorm + modulate of one token row held by WPR warps: chunk c of
// thread t (of the row's 32 * WPR) holds columns 4t + 128 WPR c .. + 3 (zeros past the row
// end); with kPrefetch, sh / sc hold the shift and scale of the same columns, else they are
// loaded from shift / scale here. Two-pass statistics; `partial`: 2 * kWarps floats of shared
// memory (one set a row_sum).
template <int WPR, int CH>
FORA_DEVICE void layernorm_row_in_registers(const float4 (&v)[CH], const float4 (&sh)[CH],
                                             const float4 (&sc)[CH], const float* shift,
                                             const float* scale, int t, int dim,
                                             __nv_bfloat16* out, float eps, float* partial) {
    constexpr int kStride = 128 * WPR;
    const float inv_dim = 1.0f / (float)dim;
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        if (t * 4 + c * kStride < dim) sum += (v[c].x + v[c].y) + (v[c].z + v[c].w);
    }
    const float mean = row_sum<WPR>(sum, partial) * inv_dim;
    float sq = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        if (t * 4 + c * kStride < dim) {
            const float a = v[c].x - mean, b = v[c].y - mean, e = v[c].z - mean, f = v[c].w - mean;
            sq += (a * a + b * b) + (e * e + f * f);
        }
    }
    const float var = row_sum<WPR>(sq, partial + kWarps) * inv_dim;
    const float rstd = 1.0f / sqrtf(var + eps);  // IEEE sqrt and divide, not rsqrtf
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int d = t * 4 + c * kStride;
        if (d < dim) {
            const float4 h = kPrefetch<WPR> ? sh[c] : *reinterpret_cast<const float4*>(shift + d);
            const float4 k = kPrefetch<WPR> ? sc[c] : *reinterpret_cast<const float4*>(scale + d);
            uint2 packed;
            packed.x = pack_bf16x2(modulate(v[c].x, mean, rstd, h.x, k.x),
                                   modulate(v[c].y, mean, rstd, h.y, k.y));
            packed.y = pack_bf16x2(modulate(v[c].z, mean, rstd, h.z, k.z),
                                   modulate(v[c].w, mean, rstd, h.w, k.w));
            *reinterpret_cast<uint2*>(out + d) = packed;
        }
    }
}

FORA_DEVICE float4 load4_or_zero(const float* p, bool in) {
    return in ? *reinterpret_cast<const float4*>(p) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

// This thread's place with WPR warps per token row (kWarps / WPR rows a block): its index t
// among the row's 32 * WPR threads, and the row.
template <int WPR>
FORA_DEVICE int row_thread() {
    return threadIdx.x % (32 * WPR);
}

template <int WPR>
FORA_DEVICE long long row_token() {
    return (long long)blockIdx.x * (kWarps / WPR) + threadIdx.x / (32 * WPR);
}

// layernorm_modulate's register path with WPR warps per token row.
template <int WPR>
FORA_DEVICE void layernorm_rows(const LayerNormModulateParams& p) {
    constexpr int CH = kMaxChunks / WPR;
    __shared__ float partial[2 * kWarps];  // one set a row sum (row_sum)
    const int t = row_thread<WPR>();
    const long long token = row_token<WPR>();
    // With WPR > 1 a block is one row: its threads return together.
    if (token >= (long long)p.rows * p.tokens) return;
    const Row r = row_of(p, token);
    float4 v[CH], sh[CH], sc[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int d = t * 4 + c * 128 * WPR;
        v[c] = load4_or_zero(r.x + d, d < p.dim);
        if (kPrefetch<WPR>) {
            sh[c] = load4_or_zero(r.shift + d, d < p.dim);
            sc[c] = load4_or_zero(r.scale + d, d < p.dim);
        }
    }
    layernorm_row_in_registers<WPR, CH>(v, sh, sc, r.shift, r.scale, t, p.dim, r.out, p.eps,
                                        partial);
}

// FORA_PREFETCH_WEIGHTS: this CTA's share of each of the pass's prefetch ranges.
FORA_DEVICE void prefetch_weight_shares(const ResidualLayerNormParams& p) {
    const fora_ptr base[2] = {p.prefetch_a, p.prefetch_b};
    const long long bytes[2] = {p.prefetch_a_bytes, p.prefetch_b_bytes};
    prefetch_shares_l2(base, bytes, blockIdx.x, gridDim.x, threadIdx.x, blockDim.x);
}

// residual_layernorm with WPR warps per token row.
template <int WPR>
FORA_DEVICE void residual_layernorm_rows(const ResidualLayerNormParams& p) {
    constexpr int CH = kMaxChunks / WPR;
    __shared__ float partial[2 * kWarps];  // one set a row sum (row_sum)
    const int t = row_thread<WPR>();
    const long long token = row_token<WPR>();
    if (token >= (long long)p.rows * p.tokens) return;
    const float* mod = reinterpret_cast<const float*>(p.modulation) + (token / p.tokens) * p.ld_mod;
    const float* acc = reinterpret_cast<const float*>(p.acc) + token * p.ld_acc;
    const __nv_bfloat16* acc16 = reinterpret_cast<const __nv_bfloat16*>(p.acc) + token * p.ld_acc;
    const float* bias = reinterpret_cast<const float*>(p.bias);
    float* x = reinterpret_cast<float*>(p.x) + token * p.dim;
    __nv_bfloat16* cache =
        p.cache ? reinterpret_cast<__nv_bfloat16*>(p.cache) + token * p.dim : nullptr;
    // The product (or bf16 v) and the residual of the row first (all in flight; with
    // kPrefetch every other load too), then the rest.
    float4 a[CH], v[CH], b[CH], g[CH], sh[CH], sc[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int d = t * 4 + c * 128 * WPR;
        const bool in = d < p.dim;
        if (p.acc_bf16) {
            a[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (in) {
                const uint2 raw = *reinterpret_cast<const uint2*>(acc16 + d);
                const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
                const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
                a[c] = make_float4(lo.x, lo.y, hi.x, hi.y);
            }
        } else {
            a[c] = load4_or_zero(acc + d, in);
            // Split-K slices, summed in slice order (the GEMM epilogue kernel's order).
            for (int s = 1; s < p.acc_splits; ++s) {
                const float4 part = load4_or_zero(acc + s * p.acc_split_stride + d, in);
                a[c] = make_float4(a[c].x + part.x, a[c].y + part.y, a[c].z + part.z, a[c].w + part.w);
            }
        }
        v[c] = load4_or_zero(x + d, in);
        if (kPrefetch<WPR>) {
            b[c] = load4_or_zero(bias + d, in && !p.acc_bf16);
            g[c] = load4_or_zero(mod + p.gate_col + d, in);
            sh[c] = load4_or_zero(mod + p.shift_col + d, in);
            sc[c] = load4_or_zero(mod + p.scale_col + d, in);
        }
    }
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int d = t * 4 + c * 128 * WPR;
        if (d < p.dim) {
            // With acc_bf16, y is v itself (the bias was added before the bf16 rounding).
            const float4 bc = p.acc_bf16         ? make_float4(0.0f, 0.0f, 0.0f, 0.0f)
                              : kPrefetch<WPR> ? b[c]
                                               : *reinterpret_cast<const float4*>(bias + d);
            const float4 gc =
                kPrefetch<WPR> ? g[c] : *reinterpret_cast<const float4*>(mod + p.gate_col + d);
            const float4 y = p.acc_bf16 ? a[c]
                                        : make_float4(a[c].x + bc.x, a[c].y + bc.y,
                                                      a[c].z + bc.z, a[c].w + bc.w);
            if (cache) {
                uint2 packed;
                packed.x = pack_bf16x2(y.x, y.y);
                packed.y = pack_bf16x2(y.z, y.w);
                *reinterpret_cast<uint2*>(cache + d) = packed;
            }
            // As epilogue_pair (gemm_epilogue.cuh): residual += gate * v.
            v[c].x += gc.x * y.x;
            v[c].y += gc.y * y.y;
            v[c].z += gc.z * y.z;
            v[c].w += gc.w * y.w;
            *reinterpret_cast<float4*>(x + d) = v[c];
        }
    }
    layernorm_row_in_registers<WPR, CH>(v, sh, sc, mod + p.shift_col, mod + p.scale_col, t, p.dim,
                                        reinterpret_cast<__nv_bfloat16*>(p.out) + token * p.dim,
                                        p.eps, partial);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kWarps * 32)
layernorm_modulate(const LayerNormModulateParams p) {
    grid_dependency_sync();
    // float4 path when every row start and column offset is 16-byte aligned (DiT: always).
    const bool vec = (p.dim % 4 == 0) && (p.ld_mod % 4 == 0) && (p.shift_col % 4 == 0) &&
                     (p.scale_col % 4 == 0);
    if (vec && p.dim <= 128 * kMaxChunks) {
        layernorm_rows<1>(p);
        return;
    }
    const int lane = threadIdx.x & 31;
    const long long token = row_token<1>();
    if (token >= (long long)p.rows * p.tokens) return;
    const Row r = row_of(p, token);

    const float inv_dim = 1.0f / (float)p.dim;
    float sum = 0.0f;
    if (vec) {
        for (int d = lane * 4; d < p.dim; d += 128) {
            const float4 v = *reinterpret_cast<const float4*>(r.x + d);
            sum += (v.x + v.y) + (v.z + v.w);
        }
    } else {
        for (int d = lane; d < p.dim; d += 32) sum += r.x[d];
    }
    const float mean = warp_sum(sum) * inv_dim;

    float sq = 0.0f;
    if (vec) {
        for (int d = lane * 4; d < p.dim; d += 128) {
            const float4 v = *reinterpret_cast<const float4*>(r.x + d);
            const float a = v.x - mean, b = v.y - mean, c = v.z - mean, e = v.w - mean;
            sq += (a * a + b * b) + (c * c + e * e);
        }
    } else {
        for (int d = lane; d < p.dim; d += 32) {
            const float a = r.x[d] - mean;
            sq += a * a;
        }
    }
    const float var = warp_sum(sq) * inv_dim;
    const float rstd = 1.0f / sqrtf(var + p.eps);  // IEEE sqrt and divide, not rsqrtf

    if (vec) {
        for (int d = lane * 4; d < p.dim; d += 128) {
            const float4 v = *reinterpret_cast<const float4*>(r.x + d);
            const float4 sh = *reinterpret_cast<const float4*>(r.shift + d);
            const float4 sc = *reinterpret_cast<const float4*>(r.scale + d);
            uint2 packed;
            packed.x = pack_bf16x2(modulate(v.x, mean, rstd, sh.x, sc.x),
                                   modulate(v.y, mean, rstd, sh.y, sc.y));
            packed.y = pack_bf16x2(modulate(v.z, mean, rstd, sh.z, sc.z),
                                   modulate(v.w, mean, rstd, sh.w, sc.w));
            *reinterpret_cast<uint2*>(r.out + d) = packed;
        }
    } else {
        for (int d = lane; d < p.dim; d += 32) {
            r.out[d] = f32_to_bf16(modulate(r.x[d], mean, rstd, r.shift[d], r.scale[d]));
        }
    }
}

// The register path with four warps per token row, for few rows: 16-byte aligned rows of at
// most 128 * kMaxChunks elements (the launcher checks).
extern "C" __global__ void __launch_bounds__(kWarps * 32)
layernorm_modulate_w4(const LayerNormModulateParams p) {
    grid_dependency_sync();
    layernorm_rows<4>(p);
}

// proj / fc2's residual epilogue (as gemm_epilogue_f32 with FORA_EPI_BIAS_GATE_RESIDUAL) and the
// next LayerNorm + modulate in one pass, one warp per token row: the row's GEMM product and
// residual are loaded with every load in flight, updated, stored, and normalized from registers.
extern "C" __global__ void __launch_bounds__(kWarps * 32)
residual_layernorm(const ResidualLayerNormParams p) {
    grid_dependency_sync();
    prefetch_weight_shares(p);
    residual_layernorm_rows<1>(p);
}

// The same with four warps per token row, for few rows.
extern "C" __global__ void __launch_bounds__(kWarps * 32)
residual_layernorm_w4(const ResidualLayerNormParams p) {
    grid_dependency_sync();
    prefetch_weight_shares(p);
    residual_layernorm_rows<4>(p);
}
