// The qkv Linear and the flash attention after it in one launch, for few token rows (one image
// + CFG: M = 512), sm_90a only (QkvAttentionParams in params.h):
//
//   q, k, v = bf16(A @ W^T + bias)   (one head's 3 x d columns; never stored)
//   out[b, t, h] = softmax(q k^T * scale) v
//
// Why: at 2 rows the qkv GEMM (~9.4 us on an H200) and the attention (~7.1 us) are two launches
// of mostly latency each, 28 of each a step, and qkv's 3.5 MB round trip through L2 sits
// between them. A (batch, head)'s attention needs only that head's 3 x d columns of qkv for its
// T <= 256 tokens, so a cluster of four CTAs, 64 tokens each, computes them and keeps them in
// shared memory: B x H clusters, 128 CTAs at 2 rows of DiT-XL/2, about one an SM.
//
// A CTA: one consumer warpgroup (warps 0-3) and a producer warp (warp 4), as gemm_ln_sm90.cu.
//   GEMM:     acc[64 x 3d] over all of K (dim) by wgmma m64n{3d}k16 (n216 for d 72, n192 for
//             d 64) from a STAGES-deep TMA ring; the W tile is three d-row slabs (the head's q,
//             k and v rows of W) stacked into one 3d-row operand. The _mc kernels share W across
//             the cluster (all four CTAs need the same head's rows): ranks 0-2 each load one
//             slab and multicast it to all four, and every `empty` barrier counts the consumer
//             warps of the whole cluster.
//   Epilogue: bias, then Q to the RS A-fragments of S = Q K^T straight from the accumulators
//             (bf16: the accumulator and A-fragment layouts line up, as P's do in attention),
//             and this CTA's 64 keys' K and V (bf16 pairs) pushed into slot [rank] of every
//             CTA's K / V tiles (st.shared::cluster), in the wgmma attention's swizzled layout
//             (V in K's layout, read MN-major as FORA_ATTENTION=wgmma_mn does).
//   Exchange: one cluster barrier before the pushes (every CTA's GEMM is done: the K / V tiles
//             overlay its ring) and one after (every key is in place).
//   Attention: the 64 queries over the ceil(T / 64) key tiles, fp32 online softmax, as
//             attention_wgmma_mn_m64 (attention_sm90.cuh's pieces); O staged in shared memory
//             past the K / V tiles and written in 16-byte chunks.
// Tokens past T (a CTA's rows beyond its sequence) are computed on whatever rows follow and never
// stored; keys past T are masked to -inf. Not persistent: a CTA takes one (batch, head, 64-token)
// unit. Shared memory: d 72 144,448 B, d 64 132,160 B (one CTA an SM).

#include "attention_common.cuh"
#include "attention_sm90.cuh"
#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_ring.cuh"

namespace {

template <int D>
struct QkvAttentionShape {
    static constexpr int CLUSTER = 4;     // CTAs a sequence: 4 x 64 = 256 tokens at most
    static constexpr int ROWS = 64;       // tokens a CTA (the consumer warpgroup's m64)
    static constexpr int DEPTH = 64;      // k-depth of a ring slot: one 128-byte swizzle row
    static constexpr int STAGES = 4;
    static constexpr int CONSUMERS = 128;
    static constexpr int THREADS = CONSUMERS + 32;
    static constexpr int N = 3 * D;                      // GEMM columns: q | k | v of one head
    static constexpr int STAGE_A = ROWS * DEPTH * 2;     // 8 KiB
    static constexpr int SLAB_B = D * DEPTH * 2;         // the q (or k, or v) rows of W
    static constexpr int STAGE_B = 3 * SLAB_B;
    static constexpr int STAGE_BYTES = STAGE_A + STAGE_B;
    static constexpr int RING_BYTES = STAGES * STAGE_BYTES;
    static constexpr int DK = (D + 15) / 16 * 16;        // QK^T depth, padded to the k of 16
    static constexpr int KSTEPS = DK / 16;
    static constexpr int PANELS = (DK + 63) / 64;        // 128-byte panels a K (or V) tile
    static constexpr int KV_TILE = PANELS * ROWS * 128;  // 64 keys' K (or V)
    static constexpr int KV_BYTES = 2 * CLUSTER * KV_TILE;  // [4] K tiles | [4] V tiles
    static constexpr int O_STRIDE = DK + 8;              // bf16 a staged output row
    static constexpr int O_BYTES = ROWS * O_STRIDE * 2;
    static constexpr int DATA_BYTES = RING_BYTES > KV_BYTES + O_BYTES ? RING_BYTES : KV_BYTES + O_BYTES;
    // + two mbarriers a stage + 1 KiB to round the base up to 1024 bytes (src/cuda/qkv_attention.rs).
    static constexpr int SMEM_BYTES = DATA_BYTES + STAGES * 16 + 1024;
    static_assert(D == 64 || D == 72, "instantiated for head_dim 64 and 72");
    static_assert(SLAB_B % 1024 == 0 && STAGE_A % 1024 == 0, "tiles start on 1024-byte swizzle atoms");
    static_assert(DK - D == 0 || DK - D == 8, "padding is one 16-byte chunk at most");
    static_assert(THREADS == 160, "the kernels' __launch_bounds__");
    static_assert(SMEM_BYTES <= 227 * 1024, "a CTA's shared memory on a Hopper");
};

}  // namespace

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

template <int D>
FORA_DEVICE void wgmma_qkv(float (&acc)[QkvAttentionShape<D>::N / 2], uint64_t desc_a, uint64_t desc_b) {
    if constexpr (D == 72) {
        wgmma_m64n216k16(acc, desc_a, desc_b);
    } else {
        wgmma_m64n192k16(acc, desc_a, desc_b);
    }
}

// Byte offset of the bf16 pair (row, col), col even, in a K / V tile (PANELS 128-byte-swizzled
// panels of 64 rows).
FORA_DEVICE uint32_t kv_tile_offset(int row, int col) {
    return static_cast<uint32_t>((col >> 6) * (64 * 128)) + sw128_chunk(row, (col & 63) >> 3) +
           static_cast<uint32_t>((col & 7) * 2);
}

template <int D, bool MC>
FORA_DEVICE void qkv_attention_block(const QkvAttentionParams& p) {
    using S = QkvAttentionShape<D>;
    constexpr int CL = S::CLUSTER;
    constexpr int F = D / 8;  // accumulator fragments (8 columns) of one of q, k, v
    FORA_DYNAMIC_SMEM(uint4, qkv_attention_smem);
    const uint32_t raw = smem_addr(qkv_attention_smem);
    const uint32_t base = (raw + 1023u) & ~1023u;
    // The ring (during the GEMM); the K / V tiles and the output staging (after it).
    const uint32_t smem_a = base;
    const uint32_t smem_b = base + S::STAGES * S::STAGE_A;
    const uint32_t k_tiles = base;
    const uint32_t v_tiles = base + CL * S::KV_TILE;
    const uint32_t full = base + S::DATA_BYTES;
    const uint32_t empty = full + 8 * S::STAGES;

    const AttentionParams& at = p.attn;
    const int tid = threadIdx.x;
    const int rank = static_cast<int>(cluster_ctarank());
    const int head = static_cast<int>(blockIdx.x) / CL;
    const int batch = static_cast<int>(blockIdx.y);
    const int tokens = at.tokens;
    const int k_steps = (p.dim + S::DEPTH - 1) / S::DEPTH;
    // This CTA's 64 token rows of A; rows wholly past M (tokens past T) read row 0 instead
    // (never stored; no box lies wholly outside its tensor).
    const int a_row0 = batch * tokens + S::ROWS * rank;
    const int a_row = a_row0 < at.batch * tokens ? a_row0 : 0;
    if (tid == 0) {
        for (int s = 0; s < S::STAGES; ++s) {
            mbarrier_init(full + 8 * s, 1);
            // The consumer warps (lane 0 each; MC: of every CTA of the cluster).
            mbarrier_init(empty + 8 * s, MC ? 4 * CL : 4);
        }
        fence_mbarrier_init();
    }
    __syncthreads();
    // MC: every CTA has started and initialized its barriers before any multicast into it or
    // remote arrival on it (this arrival's wait comes first in each role).
    if (MC) cluster_arrive_relaxed();

    // k-step kt's W tile into ring slot `slot`: the head's q, k and v rows of W (rows
    // s * dim + head * d, s = 0, 1, 2) as three stacked slabs; MC: rank s < 3 loads slab s
    // into every CTA of the cluster.
    auto load_w = [&](int kt, uint32_t slot) {
        const uint32_t dst = smem_b + slot * S::STAGE_B;
        if constexpr (MC) {
            if (rank < 3) {
                tma_load_2d_multicast(dst + rank * S::SLAB_B, &p.w_map, kt * S::DEPTH, rank * p.dim + head * D,
                                      full + 8 * slot, (1u << CL) - 1u);
            }
        } else {
#pragma unroll
            for (int s = 0; s < 3; ++s) {
                tma_load_2d(dst + s * S::SLAB_B, &p.w_map, kt * S::DEPTH, s * p.dim + head * D, full + 8 * slot);
            }
        }
    };
    auto load_a = [&](int kt, uint32_t slot) {
        tma_load_2d(smem_a + slot * S::STAGE_A, &p.a_map, kt * S::DEPTH, a_row, full + 8 * slot);
    };

    if (tid >= S::CONSUMERS) {
        if (tid == S::CONSUMERS) {
            tma_prefetch_descriptor(&p.a_map);
            tma_prefetch_descriptor(&p.w_map);
            if (MC) cluster_wait();  // the peers' barriers are ready for the multicasts
            // Launched early (FORA_PDL), the kernel before may still be writing A, but no kernel
            // writes W: the first k-steps' W (a fresh ring) before the wait, their A after it.
            const int early = min(S::STAGES, k_steps);
#pragma unroll 1
            for (int kt = 0; kt < early; ++kt) {
                mbarrier_arrive_expect_tx(full + 8 * kt, S::STAGE_BYTES);
                load_w(kt, static_cast<uint32_t>(kt));
            }
            grid_dependency_wait();
            grid_launch_dependents();
#pragma unroll 1
            for (int kt = 0; kt < early; ++kt) load_a(kt, static_cast<uint32_t>(kt));
#pragma unroll 1
            for (int kt = early; kt < k_steps; ++kt) {
                const uint32_t slot = kt % S::STAGES;
                mbarrier_wait(empty + 8 * slot, ((kt / S::STAGES) & 1u) ^ 1u);
                mbarrier_arrive_expect_tx(full + 8 * slot, S::STAGE_BYTES);
                load_a(kt, slot);
                load_w(kt, slot);
            }
        } else if (MC) {
            cluster_wait();  // the start's barrier
        }
        // The producer warp's part in the exchange's two cluster barriers.
        cluster_arrive_release();
        cluster_wait();
        cluster_arrive_release();
        cluster_wait();
        return;
    }

    // ---- consumers: the GEMM ----
    // The output may still be read by the kernel before (the previous block's proj).
    grid_dependency_wait();
    grid_launch_dependents();
    const int lane = tid & 31, warp = tid >> 5;
    uint32_t peer_empty = 0;
    if (MC) {
        cluster_wait();
        if (lane < CL) peer_empty = mapa_shared(empty, static_cast<uint32_t>(lane));
    }
    float acc[S::N / 2];
#pragma unroll
    for (int i = 0; i < S::N / 2; ++i) acc[i] = 0.0f;
    consume_ring<S::STAGES, MC>(acc, k_steps, full, empty, peer_empty, CL, lane,
                                [&](float (&d)[S::N / 2], uint32_t slot) {
                                    const uint64_t desc_a = wgmma_desc_sw128(smem_a + slot * S::STAGE_A);
                                    const uint64_t desc_b = wgmma_desc_sw128(smem_b + slot * S::STAGE_B);
#pragma unroll
                                    for (int kk = 0; kk < S::DEPTH / 16; ++kk) {
                                        wgmma_qkv<D>(d, desc_a + 2 * kk, desc_b + 2 * kk);
                                    }
                                });

    // ---- the epilogue: bias; Q into A fragments ----
    // This thread's fragments: rows 16 warp + g and + 8 (h = 0, 1), columns 8 j + 2 t and + 1
    // (acc[4 j + 2 h], acc[4 j + 2 h + 1]); q is fragments 0 .. F - 1, k F .. 2F - 1, v 2F ..
    const int g = lane >> 2, t = lane & 3;
    const float* bias = reinterpret_cast<const float*>(p.bias);
#pragma unroll
    for (int s = 0; s < 3; ++s) {
#pragma unroll
        for (int j = 0; j < F; ++j) {
            const float2 b = *reinterpret_cast<const float2*>(bias + s * p.dim + head * D + 8 * j + 2 * t);
            const int f = s * F + j;
            acc[4 * f] += b.x;
            acc[4 * f + 1] += b.y;
            acc[4 * f + 2] += b.x;
            acc[4 * f + 3] += b.y;
        }
    }
    // S's k-step kk reads q columns 16 kk .. 16 kk + 15: fragments 2 kk and 2 kk + 1 (zero past
    // d: the padding to DK).
    uint32_t q_frag[S::KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < S::KSTEPS; ++kk) {
        q_frag[kk][0] = pack_bf16x2(acc[8 * kk], acc[8 * kk + 1]);
        q_frag[kk][1] = pack_bf16x2(acc[8 * kk + 2], acc[8 * kk + 3]);
        const bool second = 2 * kk + 1 < F;
        q_frag[kk][2] = second ? pack_bf16x2(acc[8 * kk + 4], acc[8 * kk + 5]) : 0u;
        q_frag[kk][3] = second ? pack_bf16x2(acc[8 * kk + 6], acc[8 * kk + 7]) : 0u;
    }

    // ---- the exchange: K and V into slot [rank] of every CTA ----
    // Every CTA's GEMM is done (its ring, which the K / V tiles overlay, is free), and every
    // CTA has started.
    cluster_arrive_release();
    cluster_wait();
    // This CTA's K and V tiles into its own slot [rank] (bf16 pairs from the accumulators):
    // warp w writes its rows 16 w .. 16 w + 15, two 8-row swizzle atoms of each panel.
    unsigned char* smem = reinterpret_cast<unsigned char*>(qkv_attention_smem) + (base - raw);
    constexpr uint32_t kPanel = S::ROWS * 128;
    const uint32_t k_slot = rank * S::KV_TILE;  // byte offsets from base
    const uint32_t v_slot = (CL + rank) * S::KV_TILE;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = 16 * warp + g + 8 * h;
#pragma unroll
        for (int j = 0; j < F; ++j) {
            const uint32_t off = kv_tile_offset(row, 8 * j + 2 * t);
            st_shared_for_async_proxy(smem + k_slot + off,
                                      pack_bf16x2(acc[4 * (F + j) + 2 * h], acc[4 * (F + j) + 2 * h + 1]));
            st_shared_for_async_proxy(smem + v_slot + off,
                                      pack_bf16x2(acc[4 * (2 * F + j) + 2 * h], acc[4 * (2 * F + j) + 2 * h + 1]));
        }
        // K's depth padding [D, DK): zeros (stale shared memory could hold NaN bit patterns).
        if constexpr (S::DK > D) st_shared_for_async_proxy(smem + k_slot + kv_tile_offset(row, D + 2 * t), 0u);
    }
    __syncwarp();
    // Then the warp copies its rows into slot [rank] of the other CTAs in 16-byte chunks: the
    // first panel's 2 KiB of them whole (a warp's stores 512 contiguous bytes: distributed
    // shared memory wants global memory's coalesced accesses), and of the second panel (d
    // 64 ..) only the chunks that hold columns (K: d 64 .. DK, V: d 64 .. D).
    uint32_t peer[CL - 1];
#pragma unroll
    for (int i = 0; i < CL - 1; ++i) peer[i] = mapa_shared(base, static_cast<uint32_t>((rank + 1 + i) % CL));
    auto push = [&](uint32_t off) {
        const uint4 v = *reinterpret_cast<const uint4*>(smem + off);
#pragma unroll
        for (int i = 0; i < CL - 1; ++i) st_shared_cluster_u32x4(peer[i] + off, v);
    };
    const uint32_t warp_rows = 2048u * static_cast<uint32_t>(warp);
#pragma unroll
    for (int c = lane; c < 128; c += 32) {
        push(k_slot + warp_rows + 16u * c);
        push(v_slot + warp_rows + 16u * c);
    }
    if constexpr (S::PANELS > 1) {
        constexpr int kChunksK = (S::DK - 64) / 8, kChunksV = (D - 64) / 8;
        for (int c = lane; c < 16 * kChunksK; c += 32) {
            push(k_slot + kPanel + sw128_chunk(16 * warp + c / kChunksK, c % kChunksK));
        }
        for (int c = lane; c < 16 * kChunksV; c += 32) {
            push(v_slot + kPanel + sw128_chunk(16 * warp + c / kChunksV, c % kChunksV));
        }
    }
    // The pushes are read by the receivers' wgmmas (the async proxy) after the barrier.
    fence_proxy_async_shared_cluster();
    cluster_arrive_release();
    cluster_wait();
    fence_proxy_async_shared();

    // ---- attention over the sequence's key tiles (tile j: CTA j's 64 tokens) ----
    float o_acc[D / 2], row_max[2], row_sum[2];
    start_online_softmax<D>(o_acc, row_max, row_sum);
    const float scale_log2 = softmax_scale_log2(at);
    const int n_tiles = (tokens + S::ROWS - 1) / S::ROWS;
#pragma unroll 1
    for (int j = 0; j < n_tiles; ++j) {
        float s_acc[S::ROWS / 2];
        issue_scores<S::ROWS, S::KSTEPS>(s_acc, q_frag, k_tiles + j * S::KV_TILE);
        wgmma_commit();
        wgmma_wait<0>();
        pin_accumulators(s_acc);
        uint32_t p_frag[S::ROWS / 16][4];
        scores_to_p_fragments<S::ROWS, D>(s_acc, o_acc, row_max, row_sum, scale_log2, j * S::ROWS, tokens, lane,
                                          p_frag);
        pin_accumulators(o_acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < S::ROWS / 16; ++kk) {
            // V MN-major: keys 16 kk .. are two 8-row atoms from byte 2048 kk; d 64 .. in the
            // next panel.
            const uint64_t desc =
                wgmma_desc_sw128_mn(v_tiles + j * S::KV_TILE + kk * 2048, S::ROWS * 128, 1024);
            wgmma_pv<D, true>(o_acc, p_frag[kk], desc);
        }
        wgmma_commit();
        wgmma_wait<0>();
        pin_accumulators(o_acc);
#pragma unroll
        for (int kk = 0; kk < S::ROWS / 16; ++kk) pin_registers(p_frag[kk]);
    }

    // ---- O: normalized, staged past the K / V tiles (ring memory no one uses now), stored ----
    float inv_sum[2];
    quad_inverse_sums(row_sum, inv_sum);
    __nv_bfloat16* s_o = reinterpret_cast<__nv_bfloat16*>(reinterpret_cast<unsigned char*>(qkv_attention_smem) +
                                                          (base - raw) + S::KV_BYTES) +
                         warp * 16 * S::O_STRIDE;
    stage_output_rows<D>(s_o, S::O_STRIDE, o_acc, inv_sum, lane);
    __syncwarp();
    store_output_rows<D>(s_o, S::O_STRIDE, 16, S::ROWS * rank + 16 * warp, batch, head, at, lane);
}

}  // namespace

#define FORA_QKV_ATTENTION_BODY(D, MC) qkv_attention_block<D, MC>(p)
#else
// Not sm_90a: wgmma does not exist; the launcher never launches this.
#define FORA_QKV_ATTENTION_BODY(D, MC) \
    do {                               \
        (void)p;                       \
        __trap();                      \
    } while (0)
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Grid (4 x heads, batch), clusters of four along x (a sequence's 64-token quarters), 160
// threads; dynamic shared memory QkvAttentionShape<D>::SMEM_BYTES. Each loads its own W tiles.
extern "C" __global__ void __launch_bounds__(160, 1) FORA_CLUSTER(4)
    qkv_attention_d64(const __grid_constant__ QkvAttentionParams p) {
    grid_dependency_deferred();
    FORA_QKV_ATTENTION_BODY(64, false);
}

extern "C" __global__ void __launch_bounds__(160, 1) FORA_CLUSTER(4)
    qkv_attention_d72(const __grid_constant__ QkvAttentionParams p) {
    grid_dependency_deferred();
    FORA_QKV_ATTENTION_BODY(72, false);
}

// W's tiles multicast across the cluster: the same shared memory.
extern "C" __global__ void __launch_bounds__(160, 1) FORA_CLUSTER(4)
    qkv_attention_mc_d64(const __grid_constant__ QkvAttentionParams p) {
    grid_dependency_deferred();
    FORA_QKV_ATTENTION_BODY(64, true);
}

extern "C" __global__ void __launch_bounds__(160, 1) FORA_CLUSTER(4)
    qkv_attention_mc_d72(const __grid_constant__ QkvAttentionParams p) {
    grid_dependency_deferred();
    FORA_QKV_ATTENTION_BODY(72, true);
}
