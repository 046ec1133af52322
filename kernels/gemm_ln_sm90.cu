// proj / fc2 with their gated residual and the LayerNorm + modulate that follows them, in one
// launch, for few token rows (one image + CFG: M = 512), sm_90a only:
//
//   v = A[m] @ W^T + bias (bf16-rounded with round_v);  cache[m] = bf16(v);  x[m] += gate * v;
//   out[m] = bf16(LN(x[m]) * (1 + scale) + shift)
//
// (GemmLayerNormParams in params.h: residual_layernorm's contract over the f32 product, or with
// round_v over its bf16 v as FORA_BF16_RESIDUAL has it.)
//
// Why: at M = 512 the block's 1152-wide products have 36 tiles of 128 x 128 for 132 SMs, and
// the LayerNorm after each needs whole rows, so it has been a launch of its own
// (residual_layernorm, ~4.4 us of mostly latency on an H200, 56 a step). Here a cluster of 16
// CTAs covers a 64-row block of whole rows (1152 = 16 x 72 columns): at M = 512 that is 8
// clusters, 128 CTAs, about one a SM, each computing a 64 x 72 tile (wgmma m64n72k16, the
// tile cuBLASLt's heuristic picks for proj at this size) over the whole of K. The epilogue adds
// the bias, stores the cache, updates the f32 residual in place and keeps the new x in
// registers; the row statistics are exchanged through distributed shared memory: each CTA
// pushes, per row, the sum of its 72 columns and the sum of squared deviations from their own
// mean into every CTA of the cluster (st.shared::cluster), one cluster barrier, and each CTA
// combines the 16 pairs in rank order (Chan's parallel variance: M2 = sum of the M2_s + 72 *
// sum of (mean_s - mean)^2, so no E[x^2] - mean^2 cancellation) and writes its 64 x 72 of out.
//
// Roles: warps 0-3 are the consumer warpgroup (the wgmmas and the epilogue), warp 4 the
// producer (one thread issues the TMA copies into a STAGES-deep ring, with `full` / `empty`
// mbarriers as in gemm_sm90.cu's TMA kernels; another of its lanes asks L2 for this CTA's share
// of the next GEMMs' weights under FORA_PREFETCH_WEIGHTS). Not persistent: a CTA takes one
// tile. The _mc kernel shares the A tile across the cluster by multicast (gemm_ln_tile). At most
// 94 KiB of shared memory and 160 threads, so two CTAs fit an SM and a cluster of 16 fits any
// GPC (clusters of 16 are non-portable: the launcher opts the kernel in).
//
// For many rows (256 model rows: M = 65,536) the same LayerNorm pass costs an H200 ~300 us
// after each of these GEMMs (12 bytes of memory traffic an element), ~15% of the step, and the
// 64-row tiles read a 72 x 64 W tile from L2 for every 64 x 72 x 64 of work. The _128x72
// kernels give a cluster 128 rows (two consumer warpgroups on one W tile: half the L2 bytes a
// FLOP) and fit two CTAs an SM (three stages, 94 KiB, at most 112 registers), so that one CTA's
// epilogue traffic overlaps the other's tensor-core work. The _128x144 kernels are the other
// answer to the same rows: clusters of 8 CTAs of 144 columns (wgmma m64n144k16: the tensor
// cores' work a k-step is 2x that of m64n72k16 for 1.5x the shared-memory operand bytes, where
// m64n72k16 needs about as many cycles of shared-memory reads as of math), six stages and one
// CTA an SM (213 KiB), the epilogue's traffic overlapping only other SMs' mainloops.

#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_ring.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kLnDim = 1152;  // a row's width (DiT-XL/2); a cluster's CTAs cover it
constexpr int kLnDepth = 64;  // k-depth of a ring slot: one 128-byte swizzle row of bf16

// One CTA: columns [rank * BN, rank * BN + BN) of rows [64 c, 64 c + 64) of cluster c.
// MC: the 16 CTAs of a cluster share the A tile: ranks 0-7 each load 8 of its rows, multicast
// into every CTA of the cluster (the same slot, the same `full` barrier byte), so the cluster
// reads each A tile from L2 once instead of 16 times (A then costs an SM as many L2 bytes as
// a 128 x 128 tile's, whose launches session 18 found not L2-bound). A slot is then refilled
// by 8 producers, so every CTA's `empty` barrier counts the consumer warps of all 16 CTAs
// (each warp arrives on all 16, lanes 0-15 one each), and every thread waits on the cluster
// barrier that follows the barriers' initialization before its first multicast or remote
// arrival.
//
// WG consumer warpgroups (warps 0 .. 4 WG - 1), each the m64 of 64 rows: a cluster covers
// kLnRows = 64 WG rows (WG 2: the many-rows tile, half the W bytes a FLOP of WG 1's).
//
// BN = 144 (the _128x144 kernels): clusters of 8 CTAs of 144 columns, each A slice 16 rows.
template <int WG, int BN, int STAGES, bool MC>
FORA_DEVICE void gemm_ln_tile(const GemmLayerNormParams& p) {
    static_assert(BN == 72 || BN == 144, "72 or 144 columns: clusters of 16 or 8 cover a 1152-wide row");
    constexpr int kLnCluster = kLnDim / BN;  // CTAs a cluster: the whole width of a row
    constexpr int kLnRows = 64 * WG;         // token rows a cluster
    constexpr int kLnConsumers = 128 * WG;   // threads of the consumer warpgroups
    // MC: the CTAs of a cluster that load a slice of the A tile each and multicast it to all
    // (8 rows, or as many more as spread the tile over the cluster: whole 1024-byte swizzle
    // atoms either way).
    constexpr int kLnSliceRows = kLnRows / kLnCluster > 8 ? kLnRows / kLnCluster : 8;
    constexpr int kLnASlices = kLnRows / kLnSliceRows;
    static_assert(kLnASlices <= kLnCluster && kLnSliceRows % 8 == 0, "an A slice a CTA at most, whole atoms");
    constexpr uint16_t kLnMask = static_cast<uint16_t>((1u << kLnCluster) - 1u);
    constexpr int kFragments = BN / 8;  // accumulator fragments (8 columns) a thread's rows
    constexpr uint32_t kStageA = kLnRows * kLnDepth * 2;
    constexpr uint32_t kStageB = BN * kLnDepth * 2;
    static_assert(kStageB % 1024 == 0, "every W tile must start on a 1024-byte swizzle atom");
    // Dynamic smem (the launcher adds 1 KiB to round the base up to 1024 bytes): [STAGES] A
    // tiles | [STAGES] W tiles | statistics [16 ranks][kLnRows] float2 | STAGES full barriers |
    // STAGES empty barriers.
    FORA_DYNAMIC_SMEM(uint4, gemm_ln_smem);
    const uint32_t raw = smem_addr(gemm_ln_smem);
    const uint32_t smem_a = (raw + 1023u) & ~1023u;
    const uint32_t smem_b = smem_a + STAGES * kStageA;
    const uint32_t stats = smem_b + STAGES * kStageB;
    const uint32_t full = stats + kLnCluster * kLnRows * 8;
    const uint32_t empty = full + STAGES * 8;

    const int tid = threadIdx.x;
    const int rank = static_cast<int>(cluster_ctarank());
    const int m0 = static_cast<int>(blockIdx.x) / kLnCluster * kLnRows;
    const int n0 = rank * BN;
    const int k_tiles = (p.k + kLnDepth - 1) / kLnDepth;
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(full + 8 * s, 1);
            // The consumer warps (lane 0 each; MC: of every CTA of the cluster).
            mbarrier_init(empty + 8 * s, MC ? 4 * WG * kLnCluster : 4 * WG);
        }
        fence_mbarrier_init();
    }
    __syncthreads();
    // Before a thread stores into another CTA's shared memory (or arrives on its barriers, or
    // multicasts into it), every CTA of the cluster must have started and initialized its
    // barriers: this arrival's wait comes right before the first such access (without MC:
    // the statistics' push, so the mainloop runs in between).
    cluster_arrive_relaxed();
    // This CTA's part of k-tile kt's A tile into ring slot `slot`: all kLnRows rows, or (MC,
    // ranks 0 .. kLnASlices - 1) its slice into every CTA; a slice wholly past M reads the
    // first rows instead (rows never stored; no box lies wholly outside its tensor).
    auto load_a = [&](int kt, uint32_t slot) {
        if constexpr (MC) {
            if (rank >= kLnASlices) return;
            const int row = m0 + kLnSliceRows * rank;
            tma_load_2d_multicast(smem_a + slot * kStageA + rank * (kLnSliceRows * 128u), &p.a_map, kt * kLnDepth,
                                  row < p.m ? row : 0, full + 8 * slot, kLnMask);
        } else {
            tma_load_2d(smem_a + slot * kStageA, &p.a_map, kt * kLnDepth, m0, full + 8 * slot);
        }
    };

    if (tid >= kLnConsumers) {
        if (tid == kLnConsumers + 1) {
            // FORA_PREFETCH_WEIGHTS: this CTA's share of the next GEMMs' weights (never written
            // by a kernel, so before the grid dependency's wait as W's loads).
            const fora_ptr base[2] = {p.prefetch_a, p.prefetch_b};
            const long long bytes[2] = {p.prefetch_a_bytes, p.prefetch_b_bytes};
            prefetch_shares_l2(base, bytes, blockIdx.x, gridDim.x, 0, 1);
        }
        if (tid == kLnConsumers) {
            tma_prefetch_descriptor(&p.a_map);
            tma_prefetch_descriptor(&p.w_map);
            // Launched early (FORA_PDL), the kernel before may still be writing A, but no kernel
            // writes W: the first k-tiles' W (a fresh ring) before the wait, their A after it.
            const int early = min(STAGES, k_tiles);
#pragma unroll 1
            for (int kt = 0; kt < early; ++kt) {
                mbarrier_arrive_expect_tx(full + 8 * kt, kStageA + kStageB);
                tma_load_2d(smem_b + kt * kStageB, &p.w_map, kt * kLnDepth, n0, full + 8 * kt);
            }
            grid_dependency_wait();
            grid_launch_dependents();
            if (MC) cluster_wait();  // the peers' barriers are ready for the multicasts
#pragma unroll 1
            for (int kt = 0; kt < early; ++kt) load_a(kt, static_cast<uint32_t>(kt));
#pragma unroll 1
            for (int kt = early; kt < k_tiles; ++kt) {
                const uint32_t slot = kt % STAGES;
                mbarrier_wait(empty + 8 * slot, ((kt / STAGES) & 1u) ^ 1u);
                mbarrier_arrive_expect_tx(full + 8 * slot, kStageA + kStageB);
                load_a(kt, slot);
                tma_load_2d(smem_b + slot * kStageB, &p.w_map, kt * kLnDepth, n0, full + 8 * slot);
            }
        }
        // The producer warp's part in the cluster barriers (the start's wait, the exchange).
        if (!MC || tid != kLnConsumers) cluster_wait();
        cluster_arrive_release();
        cluster_wait();
        return;
    }

    // ---- consumers: the mainloop ----
    // The epilogue reads and writes what earlier kernels use.
    grid_dependency_wait();
    grid_launch_dependents();
    const int lane = tid & 31, warp = tid >> 5;
    // MC: lane i < 16 frees a slot on CTA i's `empty` barrier (the peers' barriers are ready
    // once the start's cluster barrier is passed).
    uint32_t peer_empty = 0;
    if (MC) {
        cluster_wait();
        if (lane < kLnCluster) peer_empty = mapa_shared(empty, static_cast<uint32_t>(lane));
    }
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
    consume_ring<STAGES, MC>(acc, k_tiles, full, empty, peer_empty, kLnCluster, lane,
                             [&](float (&d)[BN / 2], uint32_t slot) {
                                 // This warpgroup's 64 rows: 8 swizzle atoms further a group.
                                 const uint32_t group_a = WG > 1 ? (warp / 4) * 8192u : 0u;
                                 const uint64_t desc_a = wgmma_desc_sw128(smem_a + slot * kStageA + group_a);
                                 const uint64_t desc_b = wgmma_desc_sw128(smem_b + slot * kStageB);
#pragma unroll
                                 for (int kk = 0; kk < kLnDepth / 16; ++kk) {
                                     wgmma_m64k16<BN>(d, desc_a + 2 * kk, desc_b + 2 * kk);
                                 }
                             });

    // ---- the epilogue: bias, cache, residual ----
    // This thread's fragments: rows 16 warp + g and + 8 of the block (h = 0, 1; warps 4-7 are
    // the second warpgroup's rows 64-127), columns
    // n0 + 8 j + 2 t and + 1 (acc[4 j + 2 h], acc[4 j + 2 h + 1]).
    const int g = lane >> 2, t = lane & 3;
    const int local_row[2] = {16 * warp + g, 16 * warp + g + 8};
    int row[2];
    bool valid[2];
    const float* mod[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        row[h] = m0 + local_row[h];
        valid[h] = row[h] < p.m;
        mod[h] = reinterpret_cast<const float*>(p.modulation) +
                 static_cast<long long>(valid[h] ? row[h] / p.tokens : 0) * p.ld_mod;
    }
    const float* bias = reinterpret_cast<const float*>(p.bias);
    float* x = reinterpret_cast<float*>(p.x);
    __nv_bfloat16* cache = reinterpret_cast<__nv_bfloat16*>(p.cache);
    // The loads first (bias, gates, residuals: one memory round trip), then the stores: all of
    // them at once with one warpgroup; in chunks of 3 fragments with two (whose 112 registers
    // a thread, for two CTAs an SM, do not hold them all; the other CTA's mainloop hides the
    // extra round trips), of 6 at 144 columns (one CTA an SM: registers for twice that chunk
    // beside 72 accumulators, not for all 18 fragments' operands).
    constexpr int kChunk = WG == 1 ? kFragments : (BN == 144 ? 6 : 3);
    static_assert(kFragments % kChunk == 0, "whole chunks");
    const float2 zero = make_float2(0.0f, 0.0f);
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j0 = 0; j0 < kFragments; j0 += kChunk) {
        float2 bias2[kChunk], gate[2][kChunk], res[2][kChunk];
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
            const int col = n0 + 8 * (j0 + c) + 2 * t;
            bias2[c] = *reinterpret_cast<const float2*>(bias + col);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                gate[h][c] = valid[h] ? *reinterpret_cast<const float2*>(mod[h] + p.gate_col + col) : zero;
                res[h][c] = valid[h] ? *reinterpret_cast<const float2*>(x + static_cast<long long>(row[h]) * p.dim + col)
                                     : zero;
            }
        }
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
            const int j = j0 + c;
            const int col = n0 + 8 * j + 2 * t;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float& a0 = acc[4 * j + 2 * h];
                float& a1 = acc[4 * j + 2 * h + 1];
                float v0 = a0 + bias2[c].x, v1 = a1 + bias2[c].y;
                if (p.round_v) {
                    v0 = bf16_to_f32(f32_to_bf16(v0));
                    v1 = bf16_to_f32(f32_to_bf16(v1));
                }
                // As residual_layernorm (norm.cu): residual += gate * v.
                a0 = res[h][c].x + gate[h][c].x * v0;
                a1 = res[h][c].y + gate[h][c].y * v1;
                if (valid[h]) {
                    const long long o = static_cast<long long>(row[h]) * p.dim + col;
                    if (cache != nullptr) *reinterpret_cast<uint32_t*>(cache + o) = pack_bf16x2(v0, v1);
                    *reinterpret_cast<float2*>(x + o) = make_float2(a0, a1);
                }
                sum[h] += a0 + a1;
            }
        }
    }

    // ---- the row statistics across the cluster ----
    // This CTA's BN columns of each row: their sum and the squared deviations from their mean
    // (a quad of lanes holds a row's columns).
    float sq[2] = {0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 1);
        sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 2);
        const float local_mean = sum[h] * (1.0f / BN);
#pragma unroll
        for (int j = 0; j < kFragments; ++j) {
            const float d0 = acc[4 * j + 2 * h] - local_mean, d1 = acc[4 * j + 2 * h + 1] - local_mean;
            sq[h] += d0 * d0 + d1 * d1;
        }
        sq[h] += __shfl_xor_sync(0xffffffffu, sq[h], 1);
        sq[h] += __shfl_xor_sync(0xffffffffu, sq[h], 2);
    }
    // One warpgroup: the modulation's loads now, so that they overlap the exchange (two: as
    // they are used, for the registers).
    constexpr bool kEarlyModulation = WG == 1;
    float2 shift[2][kFragments], scale[2][kFragments];
    auto load_modulation = [&](int h, int j) {
        const int col = n0 + 8 * j + 2 * t;
        shift[h][j] = valid[h] ? *reinterpret_cast<const float2*>(mod[h] + p.shift_col + col) : zero;
        scale[h][j] = valid[h] ? *reinterpret_cast<const float2*>(mod[h] + p.scale_col + col) : zero;
    };
    if constexpr (kEarlyModulation) {
#pragma unroll
        for (int j = 0; j < kFragments; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) load_modulation(h, j);
        }
    }
    // Every CTA has started (the kernel's first cluster barrier): push (sum, sq) of each row
    // into slot [rank][row] of every CTA, a quad's lanes four CTAs each, then the exchange's
    // barrier (release: the stores are visible to every CTA after its wait).
    if (!MC) cluster_wait();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const uint32_t mine = stats + static_cast<uint32_t>(rank * kLnRows + local_row[h]) * 8u;
#pragma unroll
        for (int i = 0; i < kLnCluster / 4; ++i) {
            st_shared_cluster_f32x2(mapa_shared(mine, static_cast<uint32_t>(t + 4 * i)), make_float2(sum[h], sq[h]));
        }
    }
    cluster_arrive_release();
    cluster_wait();

    // ---- LayerNorm + modulate from registers ----
    const float2* all = reinterpret_cast<const float2*>(reinterpret_cast<const char*>(gemm_ln_smem) + (stats - raw));
    const float inv_dim = 1.0f / static_cast<float>(p.dim);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        // In rank order, the same sums in every CTA.
        float total = 0.0f;
#pragma unroll
        for (int s = 0; s < kLnCluster; ++s) total += all[s * kLnRows + local_row[h]].x;
        const float mean = total * inv_dim;
        float m2 = 0.0f;
#pragma unroll
        for (int s = 0; s < kLnCluster; ++s) {
            const float2 part = all[s * kLnRows + local_row[h]];
            const float d = part.x * (1.0f / BN) - mean;
            m2 += part.y + static_cast<float>(BN) * d * d;
        }
        const float rstd = 1.0f / sqrtf(m2 * inv_dim + p.eps);  // IEEE sqrt and divide
        if (!valid[h]) continue;
        __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out) + static_cast<long long>(row[h]) * p.dim;
#pragma unroll
        for (int j = 0; j < kFragments; ++j) {
            const int col = n0 + 8 * j + 2 * t;
            if constexpr (!kEarlyModulation) load_modulation(h, j);
            const float o0 = modulate(acc[4 * j + 2 * h], mean, rstd, shift[h][j].x, scale[h][j].x);
            const float o1 = modulate(acc[4 * j + 2 * h + 1], mean, rstd, shift[h][j].y, scale[h][j].y);
            *reinterpret_cast<uint32_t*>(out + col) = pack_bf16x2(o0, o1);
        }
    }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace

// DiT-XL/2 (dim 1152 = 16 x 72 = 8 x 144). The launcher's gemm_ln_smem_bytes must match:
// 64-row tiles, five stages: 5 * (64 + 72) * 64 * 2 + 16 * 64 * 8 + 5 * 16 + 1024 = 96,336
// bytes; 128-row tiles, three: 3 * (128 + 72) * 64 * 2 + 16 * 128 * 8 + 3 * 16 + 1024 = 94,256;
// 128 x 144, six: 6 * (128 + 144) * 64 * 2 + 8 * 128 * 8 + 6 * 16 + 1024 = 218,208.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FORA_GEMM_LN_BODY(...) gemm_ln_tile<__VA_ARGS__>(p)
#else
// Not sm_90a: wgmma does not exist; the launcher never launches this.
#define FORA_GEMM_LN_BODY(...) \
    do {                       \
        (void)p;               \
        __trap();              \
    } while (0)
#endif

// Each CTA loads its A tile (a_map box 64 rows).
extern "C" __global__ void __launch_bounds__(160, 2) FORA_CLUSTER(16)
    gemm_tma_ln_64x72(const __grid_constant__ GemmLayerNormParams p) {
    grid_dependency_deferred();
    FORA_GEMM_LN_BODY(1, 72, 5, false);
}

// The A tile multicast across the cluster (a_map box 8 rows): the same shared memory.
extern "C" __global__ void __launch_bounds__(160, 2) FORA_CLUSTER(16)
    gemm_tma_ln_mc_64x72(const __grid_constant__ GemmLayerNormParams p) {
    grid_dependency_deferred();
    FORA_GEMM_LN_BODY(1, 72, 5, true);
}

// For many rows (FORA_GEMM_LN_MANY_ROWS): 128-row clusters, two consumer warpgroups. Three
// stages and at most 112 registers, so that two CTAs share an SM and one's epilogue (12 bytes of
// memory traffic an element) runs under the other's mainloop. Each CTA loads its A tile (a_map
// box 128 rows).
extern "C" __global__ void __launch_bounds__(288, 2) FORA_CLUSTER(16)
    gemm_tma_ln_128x72(const __grid_constant__ GemmLayerNormParams p) {
    grid_dependency_deferred();
    FORA_GEMM_LN_BODY(2, 72, 3, false);
}

// The A tile multicast: every CTA of the cluster loads 8 of its 128 rows (a_map box 8 rows).
extern "C" __global__ void __launch_bounds__(288, 2) FORA_CLUSTER(16)
    gemm_tma_ln_mc_128x72(const __grid_constant__ GemmLayerNormParams p) {
    grid_dependency_deferred();
    FORA_GEMM_LN_BODY(2, 72, 3, true);
}

// For many rows, 144 columns a CTA (FORA_GEMM_LN_WIDE): clusters of 8, two consumer
// warpgroups, six stages, one CTA an SM. Each CTA loads its A tile (a_map box 128 rows).
extern "C" __global__ void __launch_bounds__(288, 1) FORA_CLUSTER(8)
    gemm_tma_ln_128x144(const __grid_constant__ GemmLayerNormParams p) {
    grid_dependency_deferred();
    FORA_GEMM_LN_BODY(2, 144, 6, false);
}

// The A tile multicast: every CTA of the cluster loads 16 of its 128 rows (a_map box 16 rows).
extern "C" __global__ void __launch_bounds__(288, 1) FORA_CLUSTER(8)
    gemm_tma_ln_mc_128x144(const __grid_constant__ GemmLayerNormParams p) {
    grid_dependency_deferred();
    FORA_GEMM_LN_BODY(2, 144, 6, true);
}
