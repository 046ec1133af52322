// The sampler's device side: the per-step update (unpatchify by index + CFG combine + DDPM or
// DDIM + noise) in one kernel, the same with the model's final Linear in front of it
// (final_sampler_step), the plain unpatchify for `forward`, and x_T from Philox.
// The update's arithmetic is the order of crate::diffusion::apply_update with explicit _rn
// operations (no FMA contraction), so given the same model output it matches the CPU to the
// last bit except where exp/log/cos/sin round differently (see philox.cuh).
#include "common.cuh"
#include "philox.cuh"

namespace {

constexpr int kThreads = 256;
// The update's blocks are smaller: one image + CFG is 2048 threads, which 256-thread blocks
// put on 8 SMs (src/cuda/sampler.rs, STEP_THREADS, must match).
constexpr int kStepThreads = 64;

struct Geometry {
    int hw, gw, tokens, token_cols;
};

FORA_DEVICE Geometry geometry(int height, int width, int patch, int out_channels) {
    Geometry g;
    g.hw = height * width;
    g.gw = width / patch;
    g.tokens = (height / patch) * g.gw;
    g.token_cols = patch * patch * out_channels;
    return g;
}

// Offset of model-output value (row n, channel ch, pixel (y, x)) in the token layout
// [rows * T, p*p*out_channels] (unpatchify: einsum nhwpqc->nchpwq).
FORA_DEVICE long long token_offset(const Geometry& g, int patch, int out_channels, int n, int ch,
                                   int y, int x) {
    const int token = (y / patch) * g.gw + x / patch;
    const int within = ((y % patch) * patch + x % patch) * out_channels + ch;
    return ((long long)n * g.tokens + token) * g.token_cols + within;
}

// uncond + scale * (cond - uncond), as torch evaluates it in f32.
FORA_DEVICE float guide(float cond, float uncond, float scale) {
    return __fadd_rn(uncond, __fmul_rn(scale, __fsub_rn(cond, uncond)));
}

// diffusion::apply_update of one latent value xt of channel ch: (eps_c, eps_u) are the model's
// output of channel ch for the image's conditional and unconditional rows (equal where the
// channel is not guided), (var_c, var_u) those of channel C + ch (DDPM with learn_sigma), z the
// value's noise (read only with add_noise). The one copy of the update's arithmetic, shared by
// sampler_step and final_sampler_step.
FORA_DEVICE float updated_value(const SamplerStepParams& p, bool guided, int ch, float eps_c,
                                float eps_u, float var_c, float var_u, float xt, float z) {
    auto model = [&](int c, float cond, float uncond) {
        return guided && c < p.guided_channels ? guide(cond, uncond, p.cfg_scale) : cond;
    };
    const float eps = model(ch, eps_c, eps_u);
    const float x0 = __fsub_rn(__fmul_rn(p.sqrt_recip_abar, xt), __fmul_rn(p.sqrt_recipm1_abar, eps));
    float next;
    float sd;  // standard deviation of the added noise
    if (p.kind == FORA_SAMPLER_DDPM) {
        next = __fadd_rn(__fmul_rn(p.post_coef1, x0), __fmul_rn(p.post_coef2, xt));
        float log_var = p.max_log;
        if (p.learn_sigma) {
            const float v = model(p.channels + ch, var_c, var_u);
            const float frac = __fdiv_rn(__fadd_rn(v, 1.0f), 2.0f);
            log_var = __fadd_rn(__fmul_rn(frac, p.max_log), __fmul_rn(__fsub_rn(1.0f, frac), p.min_log));
        }
        sd = (float)exp((double)__fmul_rn(0.5f, log_var));
    } else {
        const float eps2 = __fdiv_rn(__fsub_rn(__fmul_rn(p.sqrt_recip_abar, xt), x0), p.sqrt_recipm1_abar);
        next = __fadd_rn(__fmul_rn(x0, p.sqrt_abar_prev), __fmul_rn(p.dir_coef, eps2));
        sd = p.sigma;
    }
    if (p.add_noise) next = __fadd_rn(next, __fmul_rn(sd, z));
    return next;
}

}  // namespace

// Thread g owns flat latent indices 4g .. 4g+3: exactly Philox block g, one generator call.
// Every load of the four (model outputs, x_t, the noise file's values) is issued before any
// store: element by element, the compiler may not hoist the next element's loads above this
// one's store to x, so each element waited a memory round trip (8.4 us a 2-row step on an
// H200, 2026-11-26, for 8192 values).
extern "C" __global__ void __launch_bounds__(kStepThreads) sampler_step(const SamplerStepParams p) {
    grid_dependency_sync();
    const long long total = (long long)p.images * p.channels * p.height * p.width;
    const long long group = (long long)blockIdx.x * kStepThreads + threadIdx.x;
    const long long j0 = group * 4;
    if (j0 >= total) return;
    const Geometry g = geometry(p.height, p.width, p.patch, p.out_channels);
    const float* mo = reinterpret_cast<const float*>(p.model_out);
    float* xs = reinterpret_cast<float*>(p.x);
    const float* noise = reinterpret_cast<const float*>(p.noise);
    const bool guided = p.rows == 2 * p.images;

    // Model output of channel ch for image b at (y, x): the conditional row's, and the
    // unconditional row's when that channel is guided (else a copy of the conditional).
    auto load_model = [&](int b, int ch, int y, int x, float& cond, float& uncond) {
        cond = mo[token_offset(g, p.patch, p.out_channels, b, ch, y, x)];
        uncond = guided && ch < p.guided_channels
                     ? mo[token_offset(g, p.patch, p.out_channels, b + p.images, ch, y, x)]
                     : cond;
    };

    // The position of j0; later elements step x, then y, c and b.
    const long long per_image = (long long)p.channels * g.hw;
    int b = (int)(j0 / per_image);
    const int rem = (int)(j0 % per_image);
    int c = rem / g.hw;
    int y = (rem % g.hw) / p.width, x = rem % p.width;
    int cs[4];
    float eps_c[4], eps_u[4], var_c[4], var_u[4], xt[4], file_noise[4];
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
        const long long j = j0 + lane;
        cs[lane] = c;
        eps_c[lane] = eps_u[lane] = var_c[lane] = var_u[lane] = xt[lane] = file_noise[lane] = 0.0f;
        if (j < total) {
            load_model(b, c, y, x, eps_c[lane], eps_u[lane]);
            if (p.kind == FORA_SAMPLER_DDPM && p.learn_sigma) {
                load_model(b, p.channels + c, y, x, var_c[lane], var_u[lane]);
            }
            xt[lane] = xs[j];
            if (p.add_noise && noise != nullptr) file_noise[lane] = noise[j];
        }
        if (++x == p.width) {
            x = 0;
            if (++y == p.height) {
                y = 0;
                if (++c == p.channels) {
                    c = 0;
                    ++b;
                }
            }
        }
    }

    PhiloxNormals z;
    if (p.add_noise && noise == nullptr) z = philox_normal_block(p.seed, p.noise_stream, group);

#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
        const long long j = j0 + lane;
        if (j >= total) break;
        const float zj = !p.add_noise ? 0.0f : noise != nullptr ? file_noise[lane] : z.v[lane];
        xs[j] = updated_value(p, guided, cs[lane], eps_c[lane], eps_u[lane], var_c[lane], var_u[lane],
                              xt[lane], zj);
    }
}

// ---- the final Linear and the update in one kernel (final_sampler_step) ----------------------
//
// The model's last GEMM (N = p*p*out_channels = 32 for every DiT/2, K = D) is too narrow for a
// GEMM library to fill the GPU, and its only reader is the update: a CTA here computes the model
// output of kFinalTokens tokens of one image, its conditional rows (mma rows 0..7) and its
// unconditional rows (8..15; none without guidance) with mma.sync, keeps it in shared memory and
// applies the update to those tokens' latent values. One launch and no f32 round trip instead of
// a GEMM and sampler_step.
//
// The k dimension is split over the CTA's warps in chunks of 32: a thread loads 16 bytes (8 k
// values, from 8t) of its A rows and of its W rows for a chunk, and the chunk's two m16n8k16
// k-steps take their halves: logical k (2t, 2t+1 | 2t+8, 2t+9) of step s is physical k
// (8t + 4s + 0, 1 | 2, 3) of the chunk, the same map for A's rows and B's columns, so the
// products pair as in the plain order and the chunk's 32 products are all summed. The warps'
// partial tiles are added in warp order (deterministic) through shared memory.

namespace {

constexpr int kFinalTokens = 8;    // tokens a CTA: the 8 rows of each mma half
constexpr int kFinalWarps = 8;     // the k split
constexpr int kFinalChunk = 32;    // k values of one 16-byte load
// Chunks a warp loads before their mmas: all five of DiT-XL/2's (1152 = 36 chunks over 8 warps)
// in one round trip where the registers allow (up to 4 n-tiles: 5 x 6 loads of 16 bytes),
// three otherwise.
template <int NT>
constexpr int kFinalGroup = NT <= 4 ? 5 : 3;

FORA_DEVICE uint4 load16_or_zero(const __nv_bfloat16* p, bool in) {
    return in ? *reinterpret_cast<const uint4*>(p) : make_uint4(0u, 0u, 0u, 0u);
}

constexpr int kFinalMaxTiles = 8;  // n-tiles: p*p*out_channels <= 64

// Floats of the shared tiles for NT n-tiles: the warps' partial 16-row tiles, then the sum.
// Rows are 8 NT + 1 floats apart (spreads the banks).
__host__ __device__ constexpr int final_smem_floats(int nt) { return (kFinalWarps + 1) * 16 * (8 * nt + 1); }

// NT: n-tiles of 8 model-output columns (p*p*out_channels = 8 NT). smem: final_smem_floats(NT).
template <int NT>
FORA_DEVICE void final_sampler_tile(const SamplerStepParams& p, float* smem) {
    constexpr int kCols = 8 * NT;
    constexpr int kPad = kCols + 1;
    float(*partial)[16][kPad] = reinterpret_cast<float(*)[16][kPad]>(smem);
    float(*model_out)[kPad] = reinterpret_cast<float(*)[kPad]>(smem + kFinalWarps * 16 * kPad);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y;
    const int t0 = blockIdx.x * kFinalTokens;
    const Geometry geo = geometry(p.height, p.width, p.patch, p.out_channels);
    const bool guided = p.rows == 2 * p.images;
    const __nv_bfloat16* xn = reinterpret_cast<const __nv_bfloat16*>(p.xn);
    const __nv_bfloat16* w = reinterpret_cast<const __nv_bfloat16*>(p.final_w);

    // This thread's A rows: token t0 + g of the image's conditional row (mma row g) and of its
    // unconditional row (row g + 8); tokens past T and, without guidance, row g + 8 are zeros.
    const bool token_in = t0 + g < geo.tokens;
    const bool uncond_in = token_in && guided;
    const __nv_bfloat16* row_c = xn + ((long long)b * geo.tokens + t0 + g) * p.dim;
    const __nv_bfloat16* row_u = xn + ((long long)(b + p.images) * geo.tokens + t0 + g) * p.dim;
    const __nv_bfloat16* w_g = w + (long long)g * p.dim;  // n-tile nt: W row 8 nt + g

    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

    const int chunks = p.dim / kFinalChunk;
    constexpr int kGroup = kFinalGroup<NT>;
    for (int c0 = warp; c0 < chunks; c0 += kFinalWarps * kGroup) {
        uint4 ac[kGroup], au[kGroup], bw[kGroup][NT];
#pragma unroll
        for (int s = 0; s < kGroup; ++s) {
            const int c = c0 + s * kFinalWarps;
            const bool in = c < chunks;
            const int k = c * kFinalChunk + 8 * t;
            ac[s] = load16_or_zero(row_c + k, in && token_in);
            au[s] = load16_or_zero(row_u + k, in && uncond_in);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) bw[s][nt] = load16_or_zero(w_g + (long long)nt * 8 * p.dim + k, in);
        }
        // Every load issued before the first mma: ptxas otherwise interleaved them, and the
        // first mma's wait for its operands held back the remaining loads one memory round trip
        // (a warp issues in order). ptxas does not move instructions across the warp barrier.
        __syncwarp();
#pragma unroll
        for (int s = 0; s < kGroup; ++s) {
            const uint32_t a_lo[4] = {ac[s].x, au[s].x, ac[s].y, au[s].y};
            const uint32_t a_hi[4] = {ac[s].z, au[s].z, ac[s].w, au[s].w};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const uint32_t b_lo[2] = {bw[s][nt].x, bw[s][nt].y};
                const uint32_t b_hi[2] = {bw[s][nt].z, bw[s][nt].w};
                mma_bf16_16816(acc[nt], a_lo, b_lo);
                mma_bf16_16816(acc[nt], a_hi, b_hi);
            }
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int col = 8 * nt + 2 * t;
        partial[warp][g][col] = acc[nt][0];
        partial[warp][g][col + 1] = acc[nt][1];
        partial[warp][g + 8][col] = acc[nt][2];
        partial[warp][g + 8][col + 1] = acc[nt][3];
    }
    __syncthreads();
    const float* bias = reinterpret_cast<const float*>(p.final_b);
    for (int i = threadIdx.x; i < 16 * kCols; i += blockDim.x) {
        const int r = i / kCols, col = i % kCols;
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < kFinalWarps; ++k) sum += partial[k][r][col];
        model_out[r][col] = sum + bias[col];
    }
    __syncthreads();

    // The update of the tokens' latent values: element e = ((c * p + qy) * kFinalTokens + i) * p
    // + qx is channel c, pixel (qy, qx) of token t0 + i, so neighbouring threads store
    // neighbouring x.
    float* xs = reinterpret_cast<float*>(p.x);
    const float* noise = reinterpret_cast<const float*>(p.noise);
    const int per_tile = kFinalTokens * p.patch * p.patch * p.channels;
    for (int e = threadIdx.x; e < per_tile; e += blockDim.x) {
        const int qx = e % p.patch;
        int r = e / p.patch;
        const int i = r % kFinalTokens;
        r /= kFinalTokens;
        const int qy = r % p.patch;
        const int c = r / p.patch;
        const int token = t0 + i;
        if (token >= geo.tokens) continue;
        const int y = (token / geo.gw) * p.patch + qy;
        const int x = (token % geo.gw) * p.patch + qx;
        const long long j = (((long long)b * p.channels + c) * p.height + y) * p.width + x;
        const int within = (qy * p.patch + qx) * p.out_channels;
        const float xt = xs[j];
        float z = 0.0f;
        if (p.add_noise) {
            if (noise != nullptr) {
                z = noise[j];
            } else {
                // Value j is lane j % 4 of Philox block j / 4 (sampler_step: one block a thread).
                const PhiloxNormals n = philox_normal_block(p.seed, p.noise_stream, (unsigned long long)j >> 2);
                const int l = (int)(j & 3);
                z = l == 0 ? n.v[0] : l == 1 ? n.v[1] : l == 2 ? n.v[2] : n.v[3];
            }
        }
        const bool sigma = p.kind == FORA_SAMPLER_DDPM && p.learn_sigma;
        const float eps_c = model_out[i][within + c];
        const float eps_u = guided ? model_out[kFinalTokens + i][within + c] : eps_c;
        const float var_c = sigma ? model_out[i][within + p.channels + c] : 0.0f;
        const float var_u = sigma && guided ? model_out[kFinalTokens + i][within + p.channels + c] : var_c;
        xs[j] = updated_value(p, guided, c, eps_c, eps_u, var_c, var_u, xt, z);
    }
}

}  // namespace

// A CTA of 8 warps: kFinalTokens tokens of image blockIdx.y, from token 8 * blockIdx.x
// (src/cuda/sampler.rs, FINAL_THREADS and FINAL_TOKENS, must match).
extern "C" __global__ void __launch_bounds__(kFinalWarps * 32) final_sampler_step(const SamplerStepParams p) {
    grid_dependency_sync();
    __shared__ float smem[final_smem_floats(kFinalMaxTiles)];
    switch (p.patch * p.patch * p.out_channels / 8) {
        case 1: final_sampler_tile<1>(p, smem); break;
        case 2: final_sampler_tile<2>(p, smem); break;
        case 3: final_sampler_tile<3>(p, smem); break;
        case 4: final_sampler_tile<4>(p, smem); break;
        case 5: final_sampler_tile<5>(p, smem); break;
        case 6: final_sampler_tile<6>(p, smem); break;
        case 7: final_sampler_tile<7>(p, smem); break;
        case 8: final_sampler_tile<8>(p, smem); break;
        default: break;  // the launcher refuses other widths
    }
}

// One thread per output element of [rows, out_channels, H, W].
extern "C" __global__ void __launch_bounds__(kThreads) unpatchify(const UnpatchifyParams p) {
    grid_dependency_sync();
    const Geometry g = geometry(p.height, p.width, p.patch, p.out_channels);
    const long long total = (long long)p.rows * p.out_channels * g.hw;
    const long long i = (long long)blockIdx.x * kThreads + threadIdx.x;
    if (i >= total) return;
    const int n = (int)(i / ((long long)p.out_channels * g.hw));
    const int rem = (int)(i % ((long long)p.out_channels * g.hw));
    const int ch = rem / g.hw;
    const int y = (rem % g.hw) / p.width, x = rem % p.width;
    const float* mo = reinterpret_cast<const float*>(p.model_out);
    float v;
    if (p.guided_channels > 0 && ch < p.guided_channels) {
        const int half = p.rows / 2;
        const int b = n % half;
        v = guide(mo[token_offset(g, p.patch, p.out_channels, b, ch, y, x)],
                  mo[token_offset(g, p.patch, p.out_channels, b + half, ch, y, x)], p.cfg_scale);
    } else {
        v = mo[token_offset(g, p.patch, p.out_channels, n, ch, y, x)];
    }
    reinterpret_cast<float*>(p.out)[i] = v;
}

// Thread g writes normals 4g .. 4g+3 (Philox block g).
extern "C" __global__ void __launch_bounds__(kThreads) normal_fill(const NormalFillParams p) {
    grid_dependency_sync();
    const long long group = (long long)blockIdx.x * kThreads + threadIdx.x;
    const long long j0 = group * 4;
    if (j0 >= p.n) return;
    const PhiloxNormals z = philox_normal_block(p.seed, p.stream, group);
    float* out = reinterpret_cast<float*>(p.out);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
        if (j0 + lane < p.n) out[j0 + lane] = z.v[lane];
    }
}
