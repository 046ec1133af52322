// Patch embedding into the f32 residual stream: out[r*T + t, d] =
//   (bias[d] + sum_k weight[d, k] * patch_k) + pos[t, d],
// the conv with kernel = stride = p written as a dot product over k = (c, i, j) of C*p*p
// (the weight [D, C, p, p] flattened), reading image r % images so the CFG rows [x; x] share it.
#include "common.cuh"

namespace {
constexpr int kThreads = 128;
constexpr int kMaxPatch = 1024;  // C*p*p limit (validated by the launcher): 4 KiB of shared memory
}  // namespace

// One block per output token row.
extern "C" __global__ void __launch_bounds__(kThreads) patch_embed(const PatchEmbedParams p) {
    __shared__ float patch[kMaxPatch];
    const int gw = p.width / p.patch;
    const int tokens = (p.height / p.patch) * gw;
    const long long row_token = blockIdx.x;  // r * tokens + t
    const int r = (int)(row_token / tokens);
    const int t = (int)(row_token % tokens);
    if (r >= p.rows) return;
    const int image = r % p.images;
    const int ty = t / gw, tx = t % gw;
    const int pp = p.patch * p.patch;
    const int k_total = p.channels * pp;
    const float* lat = reinterpret_cast<const float*>(p.latents) +
                       (size_t)image * p.channels * p.height * p.width;
    for (int k = threadIdx.x; k < k_total; k += kThreads) {
        const int c = k / pp, i = (k % pp) / p.patch, j = k % p.patch;
        patch[k] = lat[((size_t)c * p.height + ty * p.patch + i) * p.width + tx * p.patch + j];
    }
    __syncthreads();
    const float* w = reinterpret_cast<const float*>(p.weight);
    const float* bias = reinterpret_cast<const float*>(p.bias);
    const float* pos = reinterpret_cast<const float*>(p.pos) + (size_t)t * p.dim;
    float* out = reinterpret_cast<float*>(p.out) + (size_t)row_token * p.dim;
    for (int d = threadIdx.x; d < p.dim; d += kThreads) {
        const float* wd = w + (size_t)d * k_total;
        float acc = 0.0f;
        for (int k = 0; k < k_total; ++k) acc = fmaf(wd[k], patch[k], acc);
        out[d] = (acc + bias[d]) + pos[d];
    }
}
