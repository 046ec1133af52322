// The VAE decoder's own kernels (src/cuda/vae.rs); its convolutions and attention products are
// cuBLASLt GEMMs between them. Activations are f32 channels-last [images, height, width, C], so
// that a convolution's unfolded input has a pixel a row, channels contiguous (coalesced), and
// its GEMM output is the next activation as it stands.
#include "common.cuh"

namespace {
constexpr int kThreads = 256;
// Channel slots a thread of vae_group_stats sums (channels up to 4 * kThreads).
constexpr int kMaxSlots = 4;
}  // namespace

// Grid-stride over the unfolded matrix, one element a thread-iteration: column (ky, kx, c) of
// row r reads x at output pixel first + r shifted by (ky - pad, kx - pad), 0 outside the image;
// upsampling reads source pixel (y / 2, x / 2).
extern "C" __global__ void __launch_bounds__(kThreads) vae_unfold(const VaeUnfoldParams p) {
    grid_dependency_sync();
    const float* x = reinterpret_cast<const float*>(p.x);
    __nv_bfloat16* cols = reinterpret_cast<__nv_bfloat16*>(p.cols);
    const int k = p.kernel, pad = p.kernel / 2, c_all = p.channels;
    const int used = k * k * c_all;
    const int sh = p.upsample ? p.height / 2 : p.height;
    const int sw = p.upsample ? p.width / 2 : p.width;
    const long long per_image = (long long)p.height * p.width;
    const long long total = p.pixels * p.ldc;
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < total;
         i += (long long)gridDim.x * kThreads) {
        const long long r = i / p.ldc;
        const int col = (int)(i % p.ldc);
        float v = 0.0f;
        if (col < used) {
            const int tap = col / c_all, c = col % c_all;
            const int ky = tap / k, kx = tap % k;
            const long long q = p.first + r;
            const long long image = q / per_image;
            const int rem = (int)(q % per_image);
            const int y = rem / p.width + ky - pad, xx = rem % p.width + kx - pad;
            if (y >= 0 && y < p.height && xx >= 0 && xx < p.width) {
                const int sy = p.upsample ? y / 2 : y, sx = p.upsample ? xx / 2 : xx;
                v = x[((image * sh + sy) * sw + sx) * c_all + c];
            }
        }
        cols[i] = f32_to_bf16(v);
    }
}

extern "C" __global__ void __launch_bounds__(kThreads) vae_cast_bf16(const VaeElementwiseParams p) {
    grid_dependency_sync();
    const float* x = reinterpret_cast<const float*>(p.x);
    __nv_bfloat16* y = reinterpret_cast<__nv_bfloat16*>(p.y);
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < p.n;
         i += (long long)gridDim.x * kThreads)
        y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void __launch_bounds__(kThreads) vae_add(const VaeElementwiseParams p) {
    grid_dependency_sync();
    const float* x = reinterpret_cast<const float*>(p.x);
    float* y = reinterpret_cast<float*>(p.y);
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < p.n;
         i += (long long)gridDim.x * kThreads)
        y[i] += x[i];
}

// Block (chunk, image): the chunk's pixels of the image. With channels >= kThreads thread t
// sums channels t, t + kThreads, ... of every pixel; with fewer, kThreads / channels pixels at
// once, thread t on channel t % channels. So a thread's channels are fixed, and its sums are
// per channel; the block then adds them up per group. f64 throughout: a group of a 256 x 256
// image holds a quarter of a million values.
extern "C" __global__ void __launch_bounds__(kThreads) vae_group_stats(const VaeGroupNormParams p) {
    grid_dependency_sync();
    __shared__ double sums[kMaxSlots * kThreads][2];
    const float* x = reinterpret_cast<const float*>(p.x);
    const int c_all = p.channels, t = threadIdx.x;
    const bool wide = c_all >= kThreads;
    const int slots = wide ? c_all / kThreads : 1;
    const int step = wide ? 1 : kThreads / c_all;
    const int channel = wide ? t : t % c_all;
    const long long per_chunk = (p.pixels + p.chunks - 1) / p.chunks;
    const long long p0 = (long long)blockIdx.x * per_chunk;
    const long long p1 = p0 + per_chunk < p.pixels ? p0 + per_chunk : p.pixels;
    const float* base = x + (long long)blockIdx.y * p.pixels * c_all;
    double s[kMaxSlots], q[kMaxSlots];
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j) s[j] = q[j] = 0.0;
    for (long long px = p0 + (wide ? 0 : t / c_all); px < p1; px += step) {
#pragma unroll
        for (int j = 0; j < kMaxSlots; ++j) {
            if (j < slots) {
                const double v = base[px * c_all + channel + j * kThreads];
                s[j] += v;
                q[j] += v * v;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < kMaxSlots; ++j) {
        sums[j * kThreads + t][0] = s[j];
        sums[j * kThreads + t][1] = q[j];
    }
    __syncthreads();
    const int per_group = c_all / p.groups;
    for (int g = t; g < p.groups; g += kThreads) {
        double gs = 0.0, gq = 0.0;
        for (int c = g * per_group; c < (g + 1) * per_group; ++c) {
            if (wide) {  // slot j of thread t held channel j * kThreads + t
                gs += sums[c][0];
                gq += sums[c][1];
            } else {  // threads c, c + channels, ... held channel c
                for (int copy = c; copy < kThreads; copy += c_all) {
                    gs += sums[copy][0];
                    gq += sums[copy][1];
                }
            }
        }
        double* out = reinterpret_cast<double*>(p.partials) +
                      (((long long)blockIdx.y * p.chunks + blockIdx.x) * p.groups + g) * 2;
        out[0] = gs;
        out[1] = gq;
    }
}

// Block image, thread g: the chunks' sums of group g into its mean and 1 / sqrt(var + eps).
extern "C" __global__ void __launch_bounds__(kThreads) vae_group_finalize(const VaeGroupNormParams p) {
    grid_dependency_sync();
    const double* partials = reinterpret_cast<const double*>(p.partials);
    float* stats = reinterpret_cast<float*>(p.stats);
    for (int g = threadIdx.x; g < p.groups; g += kThreads) {
        double s = 0.0, q = 0.0;
        for (int chunk = 0; chunk < p.chunks; ++chunk) {
            const double* e = partials + (((long long)blockIdx.x * p.chunks + chunk) * p.groups + g) * 2;
            s += e[0];
            q += e[1];
        }
        const double n = (double)p.pixels * (p.channels / p.groups);
        const double mean = s / n;
        const double var = fmax(q / n - mean * mean, 0.0);
        float* out = stats + ((long long)blockIdx.x * p.groups + g) * 2;
        out[0] = (float)mean;
        out[1] = (float)(1.0 / sqrt(var + (double)p.eps));
    }
}

extern "C" __global__ void __launch_bounds__(kThreads) vae_group_apply(const VaeGroupNormParams p) {
    grid_dependency_sync();
    const float* x = reinterpret_cast<const float*>(p.x);
    float* y = reinterpret_cast<float*>(p.y);
    const float* stats = reinterpret_cast<const float*>(p.stats);
    const float* weight = reinterpret_cast<const float*>(p.weight);
    const float* bias = reinterpret_cast<const float*>(p.bias);
    const long long per_image = p.pixels * p.channels;
    const long long total = per_image * p.images;
    const int per_group = p.channels / p.groups;
    for (long long i = (long long)blockIdx.x * kThreads + threadIdx.x; i < total;
         i += (long long)gridDim.x * kThreads) {
        const int c = (int)(i % p.channels);
        const float* st = stats + ((i / per_image) * p.groups + c / per_group) * 2;
        float v = (x[i] - st[0]) * st[1] * weight[c] + bias[c];
        if (p.silu) v = silu(v);
        y[i] = v;
    }
}

// Block row: the row's max, then the sum of exp(scale (s - max)), then the probabilities.
extern "C" __global__ void __launch_bounds__(kThreads) vae_softmax(const VaeSoftmaxParams p) {
    grid_dependency_sync();
    __shared__ float partial[kThreads / 32];
    const float* s = reinterpret_cast<const float*>(p.scores) + (long long)blockIdx.x * p.ld;
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.probs) + (long long)blockIdx.x * p.ld;
    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    float m = -INFINITY;
    for (int c = t; c < p.cols; c += kThreads) m = fmaxf(m, s[c]);
    m = warp_max(m);
    if (lane == 0) partial[warp] = m;
    __syncthreads();
    m = partial[0];
    for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, partial[w]);
    __syncthreads();
    float sum = 0.0f;
    for (int c = t; c < p.cols; c += kThreads) sum += expf(p.scale * (s[c] - m));
    sum = warp_sum(sum);
    if (lane == 0) partial[warp] = sum;
    __syncthreads();
    sum = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) sum += partial[w];
    const float inv = 1.0f / sum;
    for (int c = t; c < p.ld; c += kThreads)
        out[c] = f32_to_bf16(c < p.cols ? expf(p.scale * (s[c] - m)) * inv : 0.0f);
}
