// Patch embedding into the f32 residual stream: out[r*T + t, d] =
//   (bias[d] + sum_k weight[d, k] * patch_k) + pos[t, d],
// the conv with kernel = stride = p written as a dot product over k = (c, i, j) of C*p*p,
// reading image r % images so the CFG rows [x; x] share it. The weight comes transposed,
// [C*p*p, dim], so that the threads of a warp read consecutive channels of one k (coalesced),
// and each weight a thread loads serves the kTokens token rows of its block. blockIdx.y picks
// the block's kThreads channels, one a thread, so that batch 2 (512 token rows: 64 blocks in x)
// still fills the GPU.
#include "common.cuh"

namespace {
constexpr int kThreads = 128;
constexpr int kTokens = 8;       // token rows per block
}  // namespace

// Block (b, c): token rows b * kTokens .. + kTokens - 1 (of rows * T; the last block may be
// short), channels c * kThreads .. + kThreads - 1.
extern "C" __global__ void __launch_bounds__(kThreads) patch_embed(const PatchEmbedParams p) {
    grid_dependency_sync();
    FORA_DYNAMIC_SMEM(float, patch);  // [kTokens][C*p*p], sized by the launcher
    const int tokens = (p.height / p.patch) * (p.width / p.patch);
    const long long total = (long long)p.rows * tokens;
    const long long first = (long long)blockIdx.x * kTokens;
    const int k_total = p.channels * p.patch * p.patch;
    for (int idx = threadIdx.x; idx < kTokens * k_total; idx += kThreads) {
        const int j = idx / k_total;
        const long long token = first + j;
        patch[idx] = token < total ? latent_patch_value(
                                         reinterpret_cast<const float*>(p.latents),
                                         (int)(token / tokens) % p.images, p.channels, p.height,
                                         p.width, p.patch, (int)(token % tokens), idx % k_total)
                                   : 0.0f;
    }
    __syncthreads();
    const float* w_t = reinterpret_cast<const float*>(p.weight_t);
    const float* bias = reinterpret_cast<const float*>(p.bias);
    const float* pos = reinterpret_cast<const float*>(p.pos);
    float* out = reinterpret_cast<float*>(p.out);
    const int d = blockIdx.y * kThreads + threadIdx.x;
    if (d < p.dim) {
        float acc[kTokens];
#pragma unroll
        for (int j = 0; j < kTokens; ++j) acc[j] = 0.0f;
#pragma unroll 4
        for (int k = 0; k < k_total; ++k) {
            const float w = w_t[(size_t)k * p.dim + d];
#pragma unroll
            for (int j = 0; j < kTokens; ++j) acc[j] = fmaf(w, patch[j * k_total + k], acc[j]);
        }
#pragma unroll
        for (int j = 0; j < kTokens; ++j) {
            const long long token = first + j;
            if (token < total) {
                const int t = (int)(token % tokens);
                out[token * p.dim + d] = (acc[j] + bias[d]) + pos[(size_t)t * p.dim + d];
            }
        }
    }
}
