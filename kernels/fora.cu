// The FORA reuse step in one launch: every block's cached attention and MLP outputs applied to
// the f32 residual stream with the CURRENT step's gates, layer by layer in order:
//   for l: x += gate_msa_l * A_l; x += gate_mlp_l * M_l
// Each thread owns a few elements of x, keeps them in registers across all layers and writes
// them once: the launch reads the cache once and x once. Products and sums are explicit _rn
// operations (no FMA contraction) so the result is the CPU reference's, bit for bit.
// Below: the fused reuse forward (fora_reuse_final and its variants), the same from a cache sum
// (fora_sum_final), and the cache sums of a run of reuse steps (fora_cache_sum_<R>).
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread on the vector path: one 16-byte bf16 load per slab

FORA_DEVICE float gated_add(float x, float gate, float cached) {
    return __fadd_rn(x, __fmul_rn(gate, cached));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) fora_reuse(const ForaReuseParams p) {
    grid_dependency_sync();
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

// ---- the fused reuse forward ------------------------------------------------------------------
// fora_reuse_final: patch embedding, every block's cached residuals and the final LayerNorm +
// modulate of a token row in one pass. A token row's dim channels are split into chunks of 8,
// one per thread: a "group" of G threads per token row (G = dim/8 rounded up to a power of two
// below a warp, to whole warps above), kReuseBlock / G rows per block. x never leaves registers:
// the launch reads the latents, the cache once and writes the bf16 input of the final Linear;
// the patch_embed, fora_reuse and layernorm_modulate launches and their f32 x traffic are gone.
// x before the LayerNorm is the three-kernel path's bit for bit (same operations, same order).
//
// TPT (tokens per thread) > 1: a group does TPT consecutive tokens of one model row, so each
// gate load (f32, from L2) serves TPT cache loads (bf16, from DRAM). With one token a thread
// the gates move 2x the cache's bytes between L2 and the SMs; at many rows (the table no
// longer fits L2) that traffic, not DRAM, bounds the kernel. Few rows keep TPT = 1 for
// enough groups in flight.

namespace {

constexpr int kReuseBlock = 256;      // threads per block (at most)
constexpr int kReuseMaxPatch = 64;    // C*p*p limit (DiT: 16)
constexpr int kReuseMaxRows = 32;     // token rows per block limit (shared patch buffer)

FORA_DEVICE int reuse_group_threads(int dim) {
    const int chunks = dim / kVec;
    if (chunks >= 32) return (chunks + 31) / 32 * 32;
    int g = 1;
    while (g < chunks) g <<= 1;
    return g;
}

// The sum of v over this thread's group, the same value in every thread of it, in one fixed
// order. Every thread of the block must call it (it synchronizes when a group spans warps).
FORA_DEVICE float group_sum(float v, int group, float* warp_sums) {
    if (group <= 32) {
        for (int o = group / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
    }
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
    __syncthreads();
    const int warps = group / 32;
    const int first = (threadIdx.x / group) * warps;
    float s = 0.0f;
    for (int w = 0; w < warps; ++w) s += warp_sums[first + w];
    __syncthreads();  // the next sum reuses warp_sums
    return s;
}

FORA_DEVICE void load8(float* v, const float* src) {
    const float4 a = *reinterpret_cast<const float4*>(src);
    const float4 b = *reinterpret_cast<const float4*>(src + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

FORA_DEVICE float sum8(const float* v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

constexpr int kMaxOut = 32;  // final Linear outputs a token (p*p*out_channels of every DiT/2)

// One step of a warp's reduce-scatter over the 2N values v[0, 2N): v[0, N) becomes this lane's
// half (the upper one when bit N of the lane is set) plus the partner lane's copy of it.
template <int N>
FORA_DEVICE void reduce_scatter_step(float (&v)[kMaxOut], int lane) {
    const bool upper = (lane & N) != 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const float send = upper ? v[i] : v[i + N];
        const float keep = upper ? v[i + N] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, N);
    }
}

// The final Linear of one token row whose group (whole warps) holds y (bf16-rounded, 8
// channels a thread from d0; zeros where !live; token_exists is the same in the whole group):
// every thread's 32 partial dot products, a
// reduce-scatter across the warp (after it lane o holds the warp's sum of output o), then
// the group's warps summed in order through shared memory, + bias. Every thread of the block
// calls it.
FORA_DEVICE void final_linear(const ForaReuseFinalParams& p, const float (&y)[kVec], bool live,
                              bool token_exists, long long token, int group, int d0,
                              float (*red)[kMaxOut]) {
    float v[kMaxOut];
    const __nv_bfloat16* w = reinterpret_cast<const __nv_bfloat16*>(p.final_w) + d0;
#pragma unroll
    for (int o = 0; o < kMaxOut; ++o) {
        float s = 0.0f;
        if (live && o < p.n_out) {
            const uint4 raw = *reinterpret_cast<const uint4*>(w + (size_t)o * p.dim);
            const __nv_bfloat162* c = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
            for (int h = 0; h < kVec / 2; ++h) {
                const float2 f = __bfloat1622float2(c[h]);
                s = fmaf(y[2 * h], f.x, s);
                s = fmaf(y[2 * h + 1], f.y, s);
            }
        }
        v[o] = s;
    }
    // Each step halves the values a lane holds: it keeps the upper half when bit N of its
    // lane is set and adds the partner's copy of that half; lane o ends with output o.
    const int lane = threadIdx.x & 31;
    reduce_scatter_step<16>(v, lane);
    reduce_scatter_step<8>(v, lane);
    reduce_scatter_step<4>(v, lane);
    reduce_scatter_step<2>(v, lane);
    reduce_scatter_step<1>(v, lane);
    const int warp = threadIdx.x >> 5;
    red[warp][lane] = v[0];
    __syncthreads();
    const int j = threadIdx.x % group;  // output j of this thread's token
    if (token_exists && j < p.n_out) {
        const int first = threadIdx.x / group * (group / 32);
        float sum = 0.0f;
        for (int w = 0; w < group / 32; ++w) sum += red[first + w][j];
        reinterpret_cast<float*>(p.final_out)[token * p.n_out + j] =
            sum + reinterpret_cast<const float*>(p.final_b)[j];
    }
    __syncthreads();  // red is reused by the next token
}

// AHEAD > 0: every thread whose 8 channels start a 128-byte line of the cache also asks L2 for
// the lines of the AHEAD layers after those its registers are loading (prefetch_l2): more DRAM
// reads in flight without more registers (four layers in registers cost blocks per SM).
// A compiler barrier: cp.async's asm statements carry no memory clobber, so without it the
// compiler could move this thread's shared-memory reads of a ring slot across the copy that
// refills it or the wait that lands it.
FORA_DEVICE void compiler_fence() { asm volatile("" ::: "memory"); }

// RING > 0 (with CHUNK 1, AHEAD 0): the cache loads go through a ring of RING layers in dynamic
// shared memory, each thread's own slots ([RING][2][TPT][blockDim.x] uint4), filled by cp.async
// RING - 1 layers ahead: loads in flight hold no registers, so a thread keeps RING - 1 layers of
// DRAM reads in flight where the register path holds CHUNK. No slot is shared, so no barrier.
//
// SUMMED: the layers' residual updates come precomputed as one f32 sum per element
// (fora_cache_sum), added to the embedding instead of the cache loop.
template <int TPT, int CHUNK, int AHEAD = 0, int RING = 0, bool SUMMED = false>
FORA_DEVICE void reuse_final_body(const ForaReuseFinalParams& p) {
    static_assert(RING == 0 || (CHUNK == 1 && AHEAD == 0), "the ring path loads one layer a stage");
    // [groups per block][TPT][C*p*p] patches, one float per warp for group_sum, the final
    // Linear's warp sums.
    __shared__ float patches[kReuseMaxRows * kReuseMaxPatch];
    __shared__ float warp_sums[kReuseBlock / 32];
    __shared__ float red[kReuseBlock / 32][kMaxOut];
    const int group = reuse_group_threads(p.dim);
    const int per_block = blockDim.x / group;
    const int tokens = (p.height / p.patch) * (p.width / p.patch);
    const int chunks = (tokens + TPT - 1) / TPT;  // token chunks of a model row
    const long long groups = (long long)p.rows * chunks;
    const long long first_group = (long long)blockIdx.x * per_block;
    const int k_total = p.channels * p.patch * p.patch;

    for (int idx = threadIdx.x; idx < per_block * TPT * k_total; idx += blockDim.x) {
        const long long gi = first_group + idx / (TPT * k_total);
        const int t = (int)(gi % chunks) * TPT + (idx / k_total) % TPT;
        const long long model_row = gi / chunks;
        patches[idx] = gi < groups && t < tokens
                           ? latent_patch_value(reinterpret_cast<const float*>(p.latents),
                                                (int)(model_row % p.images), p.channels,
                                                p.height, p.width, p.patch, t, idx % k_total)
                           : 0.0f;
    }
    __syncthreads();

    const int j = threadIdx.x / group;
    const int d0 = (threadIdx.x % group) * kVec;
    const long long gi = first_group + j;
    const bool in_grid = gi < groups;
    const long long model_row = in_grid ? gi / chunks : 0;
    const int t0 = in_grid ? (int)(gi % chunks) * TPT : 0;
    // Tokens of this group that exist (the last chunk of a row may be short), and those this
    // thread holds channels of (none past the row's dim).
    const int group_tokens = in_grid ? min(TPT, tokens - t0) : 0;
    const int valid = d0 < p.dim ? group_tokens : 0;
    const long long token0 = model_row * tokens + t0;  // flat token row of t0
    const float* mod = reinterpret_cast<const float*>(p.modulation) + model_row * p.ld_mod + d0;
    float acc[TPT][kVec];
#pragma unroll
    for (int u = 0; u < TPT; ++u)
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[u][v] = 0.0f;

    if (valid > 0) {
        // Patch embedding: fmaf over k in order, then (+ bias) + pos, as patch_embed.
        const float* w_t = reinterpret_cast<const float*>(p.embed_weight_t) + d0;
        const float* patch = patches + j * TPT * k_total;
        for (int k = 0; k < k_total; ++k) {
            float w[kVec];
            load8(w, w_t + (size_t)k * p.dim);
#pragma unroll
            for (int u = 0; u < TPT; ++u) {
                const float pk = patch[u * k_total + k];
#pragma unroll
                for (int v = 0; v < kVec; ++v) acc[u][v] = fmaf(w[v], pk, acc[u][v]);
            }
        }
        float bias[kVec];
        load8(bias, reinterpret_cast<const float*>(p.embed_bias) + d0);
#pragma unroll
        for (int u = 0; u < TPT; ++u) {
            if (u < valid) {
                float pos[kVec];
                load8(pos, reinterpret_cast<const float*>(p.pos) + (size_t)(t0 + u) * p.dim + d0);
#pragma unroll
                for (int v = 0; v < kVec; ++v) acc[u][v] = (acc[u][v] + bias[v]) + pos[v];
            }
        }

        // Every block's cached residuals with this step's gates, as fora_reuse. Tokens past
        // the row's end read token t0's cache instead (in bounds) and are never written. The
        // loads of CHUNK layers are issued before any of them is applied, then applied in
        // layer order: at batch 2 (a few blocks per SM) the kernel waits on DRAM latency, and
        // the loop as written kept about one load in flight per thread; each thread's chain of
        // round trips is layers / CHUNK long. Four tokens a thread have eight loads a layer
        // already (and two layers would halve the blocks per SM).
        constexpr int kChunk = CHUNK;
        const __nv_bfloat16* cache =
            reinterpret_cast<const __nv_bfloat16*>(p.cache) + token0 * p.dim + d0;
        // Layers [from, to) of this thread's line, both slabs, every token it holds.
        const bool line_start = (d0 * 2) % 128 == 0;
        auto prefetch_layers = [&](int from, int to) {
            if constexpr (AHEAD > 0) {
                if (!line_start) return;
                for (int l = from; l < min(to, p.layers); ++l) {
#pragma unroll
                    for (int which = 0; which < 2; ++which) {
#pragma unroll
                        for (int u = 0; u < TPT; ++u) {
                            if (u < valid) prefetch_l2(cache + (2LL * l + which) * p.slab + (long long)u * p.dim);
                        }
                    }
                }
            } else {
                (void)from;
                (void)to;
            }
        };
        // One layer's cached outputs (raw: both slabs, every token) applied with its gates.
        auto apply_layer = [&](const uint4 (&raw)[2][TPT], const float (&g)[2][kVec]) {
#pragma unroll
            for (int which = 0; which < 2; ++which) {
#pragma unroll
                for (int u = 0; u < TPT; ++u) {
                    const __nv_bfloat162* c = reinterpret_cast<const __nv_bfloat162*>(&raw[which][u]);
#pragma unroll
                    for (int h = 0; h < kVec / 2; ++h) {
                        const float2 cf = __bfloat1622float2(c[h]);
                        acc[u][2 * h] = gated_add(acc[u][2 * h], g[which][2 * h], cf.x);
                        acc[u][2 * h + 1] = gated_add(acc[u][2 * h + 1], g[which][2 * h + 1], cf.y);
                    }
                }
            }
        };
        auto load_gates = [&](int l, float (&g)[2][kVec]) {
#pragma unroll
            for (int which = 0; which < 2; ++which) {
                load8(g[which], mod + (long long)l * p.layer_cols + (which == 0 ? p.gate_msa_col : p.gate_mlp_col));
            }
        };
        // Token u's chunk of slab `which` of layer l (token t0's past the row's end).
        auto cache_chunk = [&](int l, int which, int u) {
            return cache + (2LL * l + which) * p.slab + (u < valid ? (long long)u * p.dim : 0);
        };
        if constexpr (SUMMED) {
            // x = embedding + the sum of every layer's update: one f32 add an element.
            const float* sum = reinterpret_cast<const float*>(p.sum) + token0 * p.dim + d0;
#pragma unroll
            for (int u = 0; u < TPT; ++u) {
                if (u < valid) {
                    float s[kVec];
                    load8(s, sum + (long long)u * p.dim);
#pragma unroll
                    for (int v = 0; v < kVec; ++v) acc[u][v] = __fadd_rn(acc[u][v], s[v]);
                }
            }
        } else if constexpr (RING > 0) {
            FORA_DYNAMIC_SMEM(uint4, reuse_ring);
            auto slot = [&](int l, int which, int u) {
                return reuse_ring + (((l % RING) * 2 + which) * TPT + u) * blockDim.x + threadIdx.x;
            };
            // Every call commits one group (empty past the last layer), so at layer l the
            // groups of layers <= l are done once at most RING - 1 are pending.
            auto issue = [&](int l) {
                if (l < p.layers) {
#pragma unroll
                    for (int which = 0; which < 2; ++which) {
#pragma unroll
                        for (int u = 0; u < TPT; ++u) cp_async_16(slot(l, which, u), cache_chunk(l, which, u), 16);
                    }
                }
                cp_async_commit();
            };
#pragma unroll
            for (int l = 0; l < RING - 1; ++l) issue(l);
            for (int l = 0; l < p.layers; ++l) {
                // Refills the slot of layer l - 1, which this thread read last iteration.
                compiler_fence();
                issue(l + RING - 1);
                cp_async_wait<RING - 1>();
                compiler_fence();
                uint4 raw[2][TPT];
                float g[2][kVec];
                load_gates(l, g);
#pragma unroll
                for (int which = 0; which < 2; ++which) {
#pragma unroll
                    for (int u = 0; u < TPT; ++u) raw[which][u] = *slot(l, which, u);
                }
                apply_layer(raw, g);
            }
            cp_async_wait<0>();
        } else {
            prefetch_layers(kChunk, kChunk + AHEAD);
            for (int l0 = 0; l0 < p.layers; l0 += kChunk) {
                prefetch_layers(l0 + kChunk + AHEAD, l0 + 2 * kChunk + AHEAD);
                uint4 raw[kChunk][2][TPT];
                float g[kChunk][2][kVec];
#pragma unroll
                for (int i = 0; i < kChunk; ++i) {
                    if (l0 + i < p.layers) {
                        load_gates(l0 + i, g[i]);
#pragma unroll
                        for (int which = 0; which < 2; ++which) {
#pragma unroll
                            for (int u = 0; u < TPT; ++u) {
                                raw[i][which][u] = *reinterpret_cast<const uint4*>(cache_chunk(l0 + i, which, u));
                            }
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < kChunk; ++i) {
                    if (l0 + i < p.layers) apply_layer(raw[i], g[i]);
                }
            }
        }
        if (p.x) {
#pragma unroll
            for (int u = 0; u < TPT; ++u) {
                if (u < valid) {
                    float* x = reinterpret_cast<float*>(p.x) + (token0 + u) * p.dim + d0;
                    *reinterpret_cast<float4*>(x) =
                        make_float4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]);
                    *reinterpret_cast<float4*>(x + 4) =
                        make_float4(acc[u][4], acc[u][5], acc[u][6], acc[u][7]);
                }
            }
        }
    }

    // The final LayerNorm (two-pass statistics over the group) + modulate, token by token.
    const float inv_dim = 1.0f / (float)p.dim;
    float shift[kVec] = {}, scale[kVec] = {};
    if (valid > 0) {
        load8(shift, mod + p.shift_col);
        load8(scale, mod + p.scale_col);
    }
#pragma unroll
    for (int u = 0; u < TPT; ++u) {
        const bool live = u < valid;
        const float mean = group_sum(live ? sum8(acc[u]) : 0.0f, group, warp_sums) * inv_dim;
        float dev[kVec];
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
            const float a = acc[u][v] - mean;
            dev[v] = a * a;
        }
        const float var = group_sum(live ? sum8(dev) : 0.0f, group, warp_sums) * inv_dim;
        const float rstd = 1.0f / sqrtf(var + p.eps);  // IEEE sqrt and divide, not rsqrtf
        float y[kVec];
#pragma unroll
        for (int v = 0; v < kVec; ++v)
            y[v] = live ? modulate(acc[u][v], mean, rstd, shift[v], scale[v]) : 0.0f;
        if (p.final_w) {
            // The Linear's input is the bf16 LayerNorm output, as the GEMM path reads it.
#pragma unroll
            for (int v = 0; v < kVec; ++v) y[v] = __bfloat162float(__float2bfloat16_rn(y[v]));
            final_linear(p, y, live, u < group_tokens, token0 + u, group, d0, red);
        } else if (live) {
            uint4 packed;
            packed.x = pack_bf16x2(y[0], y[1]);
            packed.y = pack_bf16x2(y[2], y[3]);
            packed.z = pack_bf16x2(y[4], y[5]);
            packed.w = pack_bf16x2(y[6], y[7]);
            *reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(p.out) +
                                      (token0 + u) * p.dim + d0) = packed;
        }
    }
}

}  // namespace

// One token a thread: few rows (enough groups to keep DRAM busy); two layers of loads in
// flight (76 registers: every block of one image + CFG resident at once on an H100).
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_reuse_final(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<1, 2>(p);
}

// One token a thread, four layers of loads in flight: half the round trips, more registers
// (fewer blocks resident). A candidate for few rows, measured by `fora bench`.
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_reuse_final_l4(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<1, 4>(p);
}

// Two tokens a thread, two layers in flight: a candidate between the two (16 to 64 rows).
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_reuse_final_t2(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<2, 2>(p);
}

// Four tokens a thread: many rows (gate traffic from L2 a quarter).
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_reuse_final_t4(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<4, 1>(p);
}

// fora_reuse_final with four more layers asked of L2 ahead of the two in registers: a candidate
// for few rows (at 2 rows the kernel read its 66 MB at 2.8 TB/s on an H200), measured by
// `fora bench`.
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_reuse_final_p4(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<1, 2, 4>(p);
}

// fora_reuse_final_t4 with its cache loads through a ring of three layers in shared memory
// (cp.async two layers ahead, no registers held in flight; 96 KiB dynamic shared memory): a
// candidate for many rows, where t4 read the 8.68 GB cache at 3.81 TB/s on an H200 with one
// layer of loads in flight a thread.
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_reuse_final_t4_r3(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<4, 1, 0, 3>(p);
}

// fora_reuse_final (one token a thread) with a ring of four layers (three in flight; 32 KiB):
// a candidate for few rows.
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_reuse_final_r4(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<1, 1, 0, 4>(p);
}

// fora_reuse_final_t4 with two more layers asked of L2 ahead: a candidate for many rows.
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_reuse_final_t4_p2(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<4, 1, 2>(p);
}

// The reuse forward of a step whose cache sum fora_cache_sum computed: the patch embedding,
// + the sum, the final LayerNorm + modulate (and optionally the final Linear), one token a
// thread. Reads 4 bytes an element of the sum instead of 2 x layers x 2 of the cache.
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_sum_final(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<1, 1, 0, 0, true>(p);
}

// Four tokens a thread: many rows, where each thread's loads of the embedding weight (its 8
// channels x C*p*p, from L1) would otherwise outweigh its 32 bytes of sum a token.
extern "C" __global__ void __launch_bounds__(kReuseBlock)
fora_sum_final_t4(const ForaReuseFinalParams p) {
    grid_dependency_sync();
    reuse_final_body<4, 1, 0, 0, true>(p);
}

// ---- the cache sums of a run of reuse steps ------------------------------------------------------
// fora_cache_sum_<R>: a thread holds 8 channels of TOKENS consecutive tokens of one model row
// and R sums of each (two tokens up to two sums, one beyond: registers). A block is kSumLanes channel chunks x (kSumThreads / kSumLanes) token
// groups, consecutive groups of (mostly) one row: the block's groups load the same gates, so a
// gate line comes from L2 once a block and from L1 after. Blocks of one token range cover the
// row's channel chunks in turn (chunk block fastest), so the cache is read in whole rows. Two
// layers of cache loads are issued before either is applied (DRAM latency, as CHUNK above).

namespace {

constexpr int kSumThreads = 256;
constexpr int kSumLanes = 16;  // channel chunks of 8 a block spans
constexpr int kSumChunk = 2;   // layers of cache loads in flight

template <int R, int TOKENS>
FORA_DEVICE void cache_sum_body(const ForaCacheSumParams& p) {
    constexpr int kSumTokens = TOKENS;
    const int chunks = p.dim / kVec;
    const int chunk_blocks = (chunks + kSumLanes - 1) / kSumLanes;
    const int groups_per_row = (p.tokens + kSumTokens - 1) / kSumTokens;
    const long long groups = (long long)p.rows * groups_per_row;
    const int chunk = (int)(blockIdx.x % chunk_blocks) * kSumLanes + (int)threadIdx.x % kSumLanes;
    const long long gi = (long long)(blockIdx.x / chunk_blocks) * (kSumThreads / kSumLanes) +
                         threadIdx.x / kSumLanes;
    if (chunk >= chunks || gi >= groups) return;  // no barrier below
    const long long row = gi / groups_per_row;
    const int t0 = (int)(gi % groups_per_row) * kSumTokens;
    const int valid = min(kSumTokens, p.tokens - t0);  // tokens of this group in the row
    const int d0 = chunk * kVec;
    const long long e0 = (row * p.tokens + t0) * p.dim + d0;  // element of (token t0, d0)
    const __nv_bfloat16* cache = reinterpret_cast<const __nv_bfloat16*>(p.cache) + e0;
    const float* gates = reinterpret_cast<const float*>(p.tables) + row * p.ld_mod + d0;

    float acc[R][kSumTokens][kVec];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int u = 0; u < kSumTokens; ++u)
#pragma unroll
            for (int v = 0; v < kVec; ++v) acc[r][u][v] = 0.0f;

    for (int l0 = 0; l0 < p.layers; l0 += kSumChunk) {
        // Both slabs of kSumChunk layers, every token (a token past the row's end reads token
        // t0's, in bounds, and is never written).
        uint4 raw[kSumChunk][2][kSumTokens];
#pragma unroll
        for (int i = 0; i < kSumChunk; ++i) {
            if (l0 + i < p.layers) {
#pragma unroll
                for (int which = 0; which < 2; ++which)
#pragma unroll
                    for (int u = 0; u < kSumTokens; ++u)
                        raw[i][which][u] = *reinterpret_cast<const uint4*>(
                            cache + (2LL * (l0 + i) + which) * p.slab + (u < valid ? (long long)u * p.dim : 0));
            }
        }
#pragma unroll
        for (int i = 0; i < kSumChunk; ++i) {
            if (l0 + i >= p.layers) continue;
            // In layer order: A_l (gate_msa) then M_l (gate_mlp), for every sum.
#pragma unroll
            for (int which = 0; which < 2; ++which) {
                float c[kSumTokens][kVec];
#pragma unroll
                for (int u = 0; u < kSumTokens; ++u) {
                    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[i][which][u]);
#pragma unroll
                    for (int k = 0; k < kVec / 2; ++k) {
                        const float2 f = __bfloat1622float2(h[k]);
                        c[u][2 * k] = f.x;
                        c[u][2 * k + 1] = f.y;
                    }
                }
                const long long col = (long long)(l0 + i) * p.layer_cols +
                                      (which == 0 ? p.gate_msa_col : p.gate_mlp_col);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    float g[kVec];
                    load8(g, gates + r * p.table_stride + col);
#pragma unroll
                    for (int u = 0; u < kSumTokens; ++u)
#pragma unroll
                        for (int v = 0; v < kVec; ++v) acc[r][u][v] = gated_add(acc[r][u][v], g[v], c[u][v]);
                }
            }
        }
    }

    float* sums = reinterpret_cast<float*>(p.sums) + e0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int u = 0; u < kSumTokens; ++u) {
            if (u < valid) {
                float* s = sums + r * p.sum_stride + (long long)u * p.dim;
                *reinterpret_cast<float4*>(s) = make_float4(acc[r][u][0], acc[r][u][1], acc[r][u][2], acc[r][u][3]);
                *reinterpret_cast<float4*>(s + 4) = make_float4(acc[r][u][4], acc[r][u][5], acc[r][u][6], acc[r][u][7]);
            }
        }
    }
}

}  // namespace

// R sums: one pass over the cache for the next R reuse steps.
extern "C" __global__ void __launch_bounds__(kSumThreads) fora_cache_sum_1(const ForaCacheSumParams p) {
    grid_dependency_sync();
    cache_sum_body<1, 2>(p);
}

extern "C" __global__ void __launch_bounds__(kSumThreads) fora_cache_sum_2(const ForaCacheSumParams p) {
    grid_dependency_sync();
    cache_sum_body<2, 2>(p);
}

extern "C" __global__ void __launch_bounds__(kSumThreads) fora_cache_sum_3(const ForaCacheSumParams p) {
    grid_dependency_sync();
    cache_sum_body<3, 1>(p);
}

extern "C" __global__ void __launch_bounds__(kSumThreads) fora_cache_sum_4(const ForaCacheSumParams p) {
    grid_dependency_sync();
    cache_sum_body<4, 1>(p);
}
