// The sampler's device side: the per-step update (unpatchify by index + CFG combine + DDPM or
// DDIM + noise) in one kernel, the plain unpatchify for `forward`, and x_T from Philox.
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
    auto model = [&](int ch, float cond, float uncond) {
        return guided && ch < p.guided_channels ? guide(cond, uncond, p.cfg_scale) : cond;
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
        const int ch = cs[lane];
        const float eps = model(ch, eps_c[lane], eps_u[lane]);
        const float x0 = __fsub_rn(__fmul_rn(p.sqrt_recip_abar, xt[lane]), __fmul_rn(p.sqrt_recipm1_abar, eps));
        float next;
        float sd;  // standard deviation of the added noise
        if (p.kind == FORA_SAMPLER_DDPM) {
            next = __fadd_rn(__fmul_rn(p.post_coef1, x0), __fmul_rn(p.post_coef2, xt[lane]));
            float log_var = p.max_log;
            if (p.learn_sigma) {
                const float v = model(p.channels + ch, var_c[lane], var_u[lane]);
                const float frac = __fdiv_rn(__fadd_rn(v, 1.0f), 2.0f);
                log_var = __fadd_rn(__fmul_rn(frac, p.max_log),
                                    __fmul_rn(__fsub_rn(1.0f, frac), p.min_log));
            }
            sd = (float)exp((double)__fmul_rn(0.5f, log_var));
        } else {
            const float eps2 = __fdiv_rn(__fsub_rn(__fmul_rn(p.sqrt_recip_abar, xt[lane]), x0), p.sqrt_recipm1_abar);
            next = __fadd_rn(__fmul_rn(x0, p.sqrt_abar_prev), __fmul_rn(p.dir_coef, eps2));
            sd = p.sigma;
        }
        if (p.add_noise) {
            const float zj = noise != nullptr ? file_noise[lane] : z.v[lane];
            next = __fadd_rn(next, __fmul_rn(sd, zj));
        }
        xs[j] = next;
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
