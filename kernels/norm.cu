// LayerNorm (no affine, f32 statistics) + adaLN modulate: the f32 residual stream -> the bf16
// input of the next GEMM. One warp per token row; two-pass statistics (mean, then the mean of
// squared deviations) so large offsets in x cost no precision.
// Rows of up to 128 * kMaxChunks elements (every DiT: 384 .. 1152) are loaded into registers
// with all loads in flight at once, so a row costs one memory round trip instead of one per
// 128 elements per pass (the small-batch case is latency-bound). Longer float4 rows re-read the
// row from L1/L2 for each pass; the sums are taken in the same order on both paths.
// residual_layernorm puts the residual epilogue of the GEMM before it into the same pass.
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

FORA_DEVICE float modulate(float x, float mean, float rstd, float shift, float scale) {
    return (x - mean) * rstd * (1.0f + scale) + shift;
}

// The register path's LayerNorm + modulate of one token row held by a warp: chunk c of this
// lane holds columns lane * 4 + 128 c .. + 3 (zeros past the row end). Two-pass statistics.
FORA_DEVICE void layernorm_row_in_registers(const float4 (&v)[kMaxChunks], int lane, int dim,
                                             const float* shift, const float* scale,
                                             __nv_bfloat16* out, float eps) {
    const float inv_dim = 1.0f / (float)dim;
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        if (lane * 4 + c * 128 < dim) sum += (v[c].x + v[c].y) + (v[c].z + v[c].w);
    }
    const float mean = warp_sum(sum) * inv_dim;
    float sq = 0.0f;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        if (lane * 4 + c * 128 < dim) {
            const float a = v[c].x - mean, b = v[c].y - mean, e = v[c].z - mean, f = v[c].w - mean;
            sq += (a * a + b * b) + (e * e + f * f);
        }
    }
    const float var = warp_sum(sq) * inv_dim;
    const float rstd = 1.0f / sqrtf(var + eps);  // IEEE sqrt and divide, not rsqrtf
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int d = lane * 4 + c * 128;
        if (d < dim) {
            const float4 sh = *reinterpret_cast<const float4*>(shift + d);
            const float4 sc = *reinterpret_cast<const float4*>(scale + d);
            uint2 packed;
            packed.x = pack_bf16x2(modulate(v[c].x, mean, rstd, sh.x, sc.x),
                                   modulate(v[c].y, mean, rstd, sh.y, sc.y));
            packed.y = pack_bf16x2(modulate(v[c].z, mean, rstd, sh.z, sc.z),
                                   modulate(v[c].w, mean, rstd, sh.w, sc.w));
            *reinterpret_cast<uint2*>(out + d) = packed;
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kWarps * 32)
layernorm_modulate(const LayerNormModulateParams p) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * kWarps + (threadIdx.x >> 5);
    if (token >= (long long)p.rows * p.tokens) return;
    const Row r = row_of(p, token);
    // float4 path when every row start and column offset is 16-byte aligned (DiT: always).
    const bool vec = (p.dim % 4 == 0) && (p.ld_mod % 4 == 0) && (p.shift_col % 4 == 0) &&
                     (p.scale_col % 4 == 0);
    if (vec && p.dim <= 128 * kMaxChunks) {
        float4 v[kMaxChunks];
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
            const int d = lane * 4 + c * 128;
            v[c] = d < p.dim ? *reinterpret_cast<const float4*>(r.x + d)
                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        layernorm_row_in_registers(v, lane, p.dim, r.shift, r.scale, r.out, p.eps);
        return;
    }

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

// proj / fc2's residual epilogue (as gemm_epilogue_f32 with FORA_EPI_BIAS_GATE_RESIDUAL) and the
// next LayerNorm + modulate in one pass, one warp per token row: the row's GEMM product and
// residual are loaded with every load in flight, updated, stored, and normalized from registers.
extern "C" __global__ void __launch_bounds__(kWarps * 32)
residual_layernorm(const ResidualLayerNormParams p) {
    const int lane = threadIdx.x & 31;
    const long long token = (long long)blockIdx.x * kWarps + (threadIdx.x >> 5);
    if (token >= (long long)p.rows * p.tokens) return;
    const float* mod = reinterpret_cast<const float*>(p.modulation) + (token / p.tokens) * p.ld_mod;
    const float* acc = reinterpret_cast<const float*>(p.acc) + token * p.ld_acc;
    const float* bias = reinterpret_cast<const float*>(p.bias);
    float* x = reinterpret_cast<float*>(p.x) + token * p.dim;
    __nv_bfloat16* cache =
        p.cache ? reinterpret_cast<__nv_bfloat16*>(p.cache) + token * p.dim : nullptr;
    // The product and the residual of the whole row first (all in flight), then the rest.
    float4 a[kMaxChunks], v[kMaxChunks];
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int d = lane * 4 + c * 128;
        const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        a[c] = d < p.dim ? *reinterpret_cast<const float4*>(acc + d) : zero;
        v[c] = d < p.dim ? *reinterpret_cast<const float4*>(x + d) : zero;
    }
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
        const int d = lane * 4 + c * 128;
        if (d < p.dim) {
            const float4 b = *reinterpret_cast<const float4*>(bias + d);
            const float4 g = *reinterpret_cast<const float4*>(mod + p.gate_col + d);
            const float4 y = make_float4(a[c].x + b.x, a[c].y + b.y, a[c].z + b.z, a[c].w + b.w);
            if (cache) {
                uint2 packed;
                packed.x = pack_bf16x2(y.x, y.y);
                packed.y = pack_bf16x2(y.z, y.w);
                *reinterpret_cast<uint2*>(cache + d) = packed;
            }
            // As epilogue_pair (gemm_epilogue.cuh): residual += gate * v.
            v[c].x += g.x * y.x;
            v[c].y += g.y * y.y;
            v[c].z += g.z * y.z;
            v[c].w += g.w * y.w;
            *reinterpret_cast<float4*>(x + d) = v[c];
        }
    }
    layernorm_row_in_registers(v, lane, p.dim, mod + p.shift_col, mod + p.scale_col,
                                reinterpret_cast<__nv_bfloat16*>(p.out) + token * p.dim, p.eps);
}
