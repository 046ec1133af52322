// Flash attention on Hopper warpgroup tensor cores (wgmma.mma_async), the opt-in
// `AttentionImpl::Wgmma` of src/cuda/attention.rs, with attention.cu's contract, layouts and
// numerics: qkv bf16 [B, T, 3, H, d] as the qkv Linear writes it; out bf16 [B, T, H, d];
// out[b, t, h] = softmax(q k^T * scale) v, fp32 online softmax with exp2 and the scale folded in.
//
// A CTA = WG warpgroups (two: 256 threads, 128 query rows; or one, for small grids) of one
// (batch, head); each warpgroup owns 64 query rows and walks over the keys in tiles of 64:
//   S = Q K^T   one wgmma m64n64k16 per 16-deep k-step, A = Q from registers (loaded once from
//               global memory in the mma A-fragment layout), B = the K tile in shared memory;
//   O += P V    one wgmma m64n{d}k16 per 16 keys, A = P re-packed from the S accumulators (the
//               accumulator and A-fragment layouts line up as in attention.cu), B = V^T.
// wgmma reads B K-major: for S that is K as stored (rows = keys, d contiguous); for P V it is
// V^T (rows = d, keys contiguous), which the CTA writes itself. V arrives by cp.async in its
// natural layout, and ldmatrix.trans turns each 8 x 8 block into the 32-bit (key, key + 1)
// pairs of one d, which are stored into the swizzled V^T tile. That transpose runs on the
// load/store units while the warpgroup's QK^T wgmmas run on the tensor cores: this uses only the
// K-major 128-byte-swizzle layout that the wgmma GEMM validated on an H200.
//
// The V_MN variant (`attention_wgmma_mn*`, FORA_ATTENTION=wgmma_mn) instead stores V's stage in
// K's swizzled panel layout and lets PV's wgmma read it MN-major (the transpose-B bit, descriptor
// wgmma_desc_sw128_mn): no V^T, no transpose, no second barrier. It rests on our reading of the
// MN-major canonical layout, which the wgmma probe (probe_sm90.cu, mode 2) checks on a device.
//
// Shared memory (from a 1024-byte aligned base; the launcher adds 1 KiB for the rounding):
//   [K stage 0 .. STAGES-1][V^T][V stage 0 .. STAGES-1]
//   K stage: K_PANELS panels of 64 rows x 128 bytes (64 bf16 of d each; d 72 needs two, the
//            second holding d 64..71 and 8 zero columns that pad the QK^T depth to 80);
//   V^T:     d rows x 128 bytes (64 keys);
//   V stage: 64 rows x d bf16, unpadded (ldmatrix reads 8 rows 144 bytes apart: conflict-free).
// Swizzled layout (the wgmma 128-byte swizzle): row r of a panel at (r / 8) * 1024 + (r % 8) * 128,
// its 16-byte chunk c at (c ^ (r % 8)) * 16. Descriptor: start >> 4, stride byte offset 1024
// (between 8-row atoms), swizzle mode 1; a 16-deep k-step is 32 bytes further into the row.
//
// Pipeline per key tile j (STAGES - 1 tiles in flight by cp.async; one group committed per tile):
//   wait for tile j, fence it into the async proxy, barrier A (every warpgroup has finished tile
//   j - 1: its wgmmas and its V transpose, so tile j + STAGES - 1 may refill stage (j - 1) % STAGES
//   and V^T may be overwritten); issue that load; issue the QK^T wgmmas; transpose V into V^T;
//   fence; barrier B (V^T complete); wait for S; softmax; issue P V; wait. (The V_MN kernels
//   issue the load after the QK^T wgmmas, under them.)
// Out-of-range keys are zero-filled by cp.async (so V^T holds zeros there) and masked to -inf;
// out-of-range query rows are computed on zero Q and never stored.
//
// Other architectures (sm_80 SASS, compute_80 PTX) get a stub that traps: the launcher refuses
// this implementation on a device whose compute capability is not 9.x.

#include "attention_common.cuh"
#include "attention_sm90.cuh"
#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

// V_MN: V is read MN-major by PV's wgmma (the transpose-B bit), from its stage in the K tile's
// swizzled panel layout; no V^T, no transpose, one barrier a tile. Otherwise V arrives in its
// natural layout and is transposed into V^T.
// STAGES: K/V tiles in the cp.async ring (STAGES - 1 in flight while one is computed): two, or
// four in the deep variant for small grids (one CTA an SM: one image + CFG), where a tile's load
// latency is not hidden by other CTAs and 256 keys are four tiles.
template <int D, int WG, bool V_MN, int STAGES_ = 2>
struct WgmmaAttentionShape {
    static constexpr int WARPGROUPS = WG;
    static constexpr int THREADS = 128 * WARPGROUPS;
    static constexpr int BLOCK_M = 64 * WARPGROUPS;
    static constexpr int BLOCK_N = 64;  // keys per tile = one 128-byte row of V^T
    static constexpr int STAGES = STAGES_;
    static constexpr int DK = (D + 15) / 16 * 16;  // QK^T depth, padded to the k of 16
    static constexpr int K_PANELS = (DK + 63) / 64;
    static constexpr int CHUNKS = D / 8;  // 16-byte chunks per row in global memory
    static constexpr int K_STAGE_BYTES = K_PANELS * BLOCK_N * 128;
    // V_MN: a V stage in K's layout (ceil(D / 64) = K_PANELS panels for d 64, 72 and 128).
    static constexpr int VT_BYTES = V_MN ? 0 : D * 128;
    static constexpr int V_STAGE_BYTES = V_MN ? K_STAGE_BYTES : BLOCK_N * D * 2;
    static constexpr int SMEM_BYTES = STAGES * (K_STAGE_BYTES + V_STAGE_BYTES) + VT_BYTES;
    // Output staging after the loop (reuses the K stages and V^T): BLOCK_M rows of DK + 8 bf16
    // (the +8 puts the 8 rows a quad writes in distinct bank groups).
    static constexpr int O_STRIDE = DK + 8;
    static_assert(D % 8 == 0 && D <= 128, "head_dim must be a multiple of 8, at most 128");
    static_assert(DK - D == 0 || DK - D == 8, "padding is one 16-byte chunk at most");
    static_assert((D + 63) / 64 == K_PANELS, "V's panels are K's");
    static_assert(VT_BYTES % 1024 == 0, "V^T must start and end on 1024-byte swizzle atoms");
    static_assert(BLOCK_M * O_STRIDE * 2 <= SMEM_BYTES, "output staging must fit in the stages");
};

}  // namespace

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

// Key tile `tile` of (batch, head) into K/V stage `stage` by the block's THREADS threads
// (cp.async, one group for the caller to commit): K rows to their swizzled panel chunk, V rows
// as they are or (V_MN) in K's layout; rows past the last token are zero-filled (src-size 0,
// address clamped to row 0).
template <typename S, int D, bool V_MN, int THREADS>
FORA_DEVICE void load_kv_tile(unsigned char* s_k, unsigned char* s_v, int stage, int tile, int tid,
                              const HeadRows& rows, int tokens) {
    constexpr int BN = S::BLOCK_N;
    unsigned char* dk = s_k + stage * S::K_STAGE_BYTES;
    unsigned char* dv = s_v + stage * S::V_STAGE_BYTES;
    for (int c = tid; c < BN * S::CHUNKS; c += THREADS) {
        const int r = c / S::CHUNKS;
        const int ch = c - r * S::CHUNKS;
        const int t = tile * BN + r;
        const bool in_range = t < tokens;
        const size_t off = static_cast<size_t>(in_range ? t : 0) * rows.row_stride + ch * 8;
        const uint32_t swizzled = (ch >> 3) * (BN * 128) + sw128_chunk(r, ch & 7);
        cp_async_16(dk + swizzled, rows.k + off, in_range ? 16 : 0);
        cp_async_16(dv + (V_MN ? swizzled : r * (D * 2) + ch * 16), rows.v + off, in_range ? 16 : 0);
    }
}

// The K-depth padding [D, DK) of every K stage, zeroed by the block's THREADS threads:
// cp.async never writes it, and stale shared memory could hold NaN bit patterns (0 * NaN =
// NaN). The caller fences it into the async proxy with the first tile.
template <typename S, int D, int THREADS>
FORA_DEVICE void zero_k_padding(unsigned char* s_k, int tid) {
    constexpr int BN = S::BLOCK_N;
    if constexpr (S::DK > D) {
        for (int r = tid; r < S::STAGES * BN; r += THREADS) {
            const int stage = r / BN;
            const int row = r - stage * BN;
            st_shared_for_async_proxy(s_k + stage * S::K_STAGE_BYTES + (S::K_PANELS - 1) * (BN * 128) +
                                          sw128_chunk(row, (D / 8) & 7),
                                      make_uint4(0u, 0u, 0u, 0u));
        }
    }
}

// Q in the A-fragment layout, straight from global memory (each element is read once per
// warpgroup): rows row0 (= the warp's first row + g) and row0 + 8, columns 16 kk + 2 quad (+ 8),
// zero past the head dim and past the last token.
template <int D, int KSTEPS>
FORA_DEVICE void load_q_fragments(uint32_t (&q_frag)[KSTEPS][4], const HeadRows& rows, int row0, int tokens,
                                  int quad) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + (i & 1) * 8;
            const int col = kk * 16 + (i >> 1) * 8 + 2 * quad;
            q_frag[kk][i] =
                row < tokens && col < D
                    ? *reinterpret_cast<const uint32_t*>(rows.q + static_cast<size_t>(row) * rows.row_stride + col)
                    : 0u;
        }
    }
}

template <int D, int WG, bool V_MN, int STAGES>
FORA_DEVICE void attention_wgmma_block(const AttentionParams& p) {
    using S = WgmmaAttentionShape<D, WG, V_MN, STAGES>;
    constexpr int BN = S::BLOCK_N;
    constexpr int KSTEPS = S::DK / 16;

    FORA_DYNAMIC_SMEM(uint4, attention_wgmma_smem);
    const uint32_t raw = smem_addr(attention_wgmma_smem);
    const uint32_t align_pad = ((raw + 1023u) & ~1023u) - raw;
    unsigned char* base = reinterpret_cast<unsigned char*>(attention_wgmma_smem) + align_pad;
    const uint32_t base_addr = raw + align_pad;
    unsigned char* s_k = base;                                              // [STAGES] K tiles
    unsigned char* s_vt = base + S::STAGES * S::K_STAGE_BYTES;              // V^T
    unsigned char* s_v = s_vt + S::VT_BYTES;                                // [STAGES] V tiles
    const uint32_t k_addr = base_addr;
    const uint32_t vt_addr = base_addr + S::STAGES * S::K_STAGE_BYTES;
    const uint32_t v_addr = vt_addr + S::VT_BYTES;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int quad = lane & 3;
    const int tokens = p.tokens;
    const int q0 = blockIdx.x * S::BLOCK_M;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;

    const HeadRows rows_of_head = head_rows<D>(p, batch, head);
    const int n_tiles = (tokens + BN - 1) / BN;

    auto load_tile = [&](int stage, int tile) {
        load_kv_tile<S, D, V_MN, S::THREADS>(s_k, s_v, stage, tile, tid, rows_of_head, tokens);
    };

#pragma unroll
    for (int s = 0; s < S::STAGES - 1; ++s) {
        if (s < n_tiles) load_tile(s, s);
        cp_async_commit();
    }

    zero_k_padding<S, D, S::THREADS>(s_k, tid);
    uint32_t q_frag[KSTEPS][4];
    load_q_fragments<D, KSTEPS>(q_frag, rows_of_head, q0 + warp * 16 + g, tokens, quad);

    float o_acc[D / 2], row_max[2], row_sum[2];
    start_online_softmax<D>(o_acc, row_max, row_sum);
    const float scale_log2 = softmax_scale_log2(p);

    for (int j = 0; j < n_tiles; ++j) {
        cp_async_wait<S::STAGES - 2>();
        fence_proxy_async_shared();
        __syncthreads();  // A
        const int stage = j % S::STAGES;

        // The refill of the stage tile j - 1 used. V_MN: after S = Q K^T is issued, so that its
        // address arithmetic (a few hundred instructions a thread) runs under the wgmmas; the
        // transposing kernel keeps it first (there the V transpose runs under them, and S live
        // across the loads too would pass 128 registers at d 72: a stack frame).
        auto refill = [&] {
            const int next = j + S::STAGES - 1;
            if (next < n_tiles) load_tile(next % S::STAGES, next);
            cp_async_commit();
        };
        if constexpr (!V_MN) refill();

        // S = Q K^T, issued now and left running.
        float s_acc[BN / 2];
        issue_scores<BN, KSTEPS>(s_acc, q_frag, k_addr + stage * S::K_STAGE_BYTES);
        wgmma_commit();
        if constexpr (V_MN) refill();

        // Meanwhile V^T: 4 consecutive 8-key blocks of one 8-column d block per ldmatrix.x4.trans;
        // register m then holds (V[key 2 quad], V[key 2 quad + 1]) of d column g in key block m.
        // (V_MN: PV reads V's stage as it is; nothing to do.)
        if constexpr (!V_MN) {
            const unsigned char* v = s_v + stage * S::V_STAGE_BYTES;
            constexpr int GROUPS = (BN / 32) * (D / 8);
            for (int grp = warp; grp < GROUPS; grp += S::THREADS / 32) {
                const int kb0 = (grp % (BN / 32)) * 4;
                const int db = grp / (BN / 32);
                const int m = lane >> 3;
                uint32_t r[4];
                ldmatrix_x4_trans(r[0], r[1], r[2], r[3],
                                  v + ((kb0 + m) * 8 + (lane & 7)) * (D * 2) + db * 16);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    // Row n = 8 db + g of V^T, keys 8 (kb0 + i) + 2 quad, + 1.
                    st_shared_for_async_proxy(s_vt + sw128_chunk(db * 8 + g, kb0 + i) + 4 * quad, r[i]);
                }
            }
            fence_proxy_async_shared();
            __syncthreads();  // B
        }

        wgmma_wait<0>();
        pin_accumulators(s_acc);

        // Keys past the end of the sequence (only in the last tile) get -inf; then
        // attention.cu's online softmax (every tile holds a valid key). O += P V: keys
        // 16 kk .. 16 kk + 15 are S n-tiles 2 kk and 2 kk + 1.
        uint32_t p_frag[BN / 16][4];
        scores_to_p_fragments<BN, D>(s_acc, o_acc, row_max, row_sum, scale_log2, j * BN, tokens, lane, p_frag);
        pin_accumulators(o_acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            // V^T K-major: keys 16 kk .. are 32 bytes further along its rows. V MN-major: they
            // are rows 16 kk .., two 8-row atoms (1024 bytes apart) from byte 2048 kk; d 64 ..
            // in the next panel.
            const uint64_t desc =
                V_MN ? wgmma_desc_sw128_mn(v_addr + stage * S::V_STAGE_BYTES + kk * 2048, BN * 128, 1024)
                     : wgmma_desc_sw128(vt_addr + kk * 32);
            wgmma_pv<D, V_MN>(o_acc, p_frag[kk], desc);
        }
        wgmma_commit();
        wgmma_wait<0>();
        pin_accumulators(o_acc);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) pin_registers(p_frag[kk]);
    }
    // Only empty groups can still be pending; drain them so no cp.async outlives the CTA.
    cp_async_wait<0>();

    float inv_sum[2];
    quad_inverse_sums(row_sum, inv_sum);

    // Every warpgroup is done with the K stages and V^T: stage this warp's 16 output rows there,
    // then write whole 16-byte chunks.
    __syncthreads();
    __nv_bfloat16* s_o = reinterpret_cast<__nv_bfloat16*>(base) + warp * 16 * S::O_STRIDE;
    stage_output_rows<D>(s_o, S::O_STRIDE, o_acc, inv_sum, lane);
    __syncwarp();
    store_output_rows<D>(s_o, S::O_STRIDE, 16, q0 + warp * 16, batch, head, p, lane);
}

// ---- split over the keys (attention_wgmma_mn_split_m64_d*, FORA_ATTENTION=wgmma_mn_split) ----
//
// For small grids (one image + CFG: 128 blocks of 64 query rows on 132 SMs, one an SM) the
// 64-row block's time is a chain of key tiles (256 keys: four), each its QK^T, softmax and PV in
// turn. Here two warpgroups share the block's 64 query rows and split the key tiles: warpgroup w
// takes tiles 2i + w, so the chain is half as long, and each keeps its own online softmax (its
// running max, partial sums and O). At the end warpgroup 1 hands its (O, max, sums) to
// warpgroup 0 through shared memory, which rescales both to the common max, adds them, and
// normalizes and stores O as the other kernels do. The merge is per thread: a thread of either
// warpgroup holds the same rows and columns of the fragments.
//
// Tiles arrive in pairs (tiles 2i and 2i + 1 are one cp.async group) through PAIR_STAGES pair
// slots, PAIR_STAGES - 1 pairs in flight from the start (three slots: every tile of 256 keys).
// A pair's barrier says that both warpgroups are done with the pair before, whose slot is then
// refilled. V is read MN-major from its stage (as wgmma_mn).
template <int D, int PAIR_STAGES>
FORA_DEVICE void attention_wgmma_split_block(const AttentionParams& p) {
    // The stage sizes of the 64-row V-MN-major shape, with 2 PAIR_STAGES stages.
    using S = WgmmaAttentionShape<D, 1, true, 2 * PAIR_STAGES>;
    constexpr int BN = S::BLOCK_N;
    constexpr int KSTEPS = S::DK / 16;
    constexpr int kThreads = 2 * S::THREADS;  // two warpgroups on the same 64 rows
    constexpr int kMergeFloats = D / 2 + 4;  // O, then row_max[2] and row_sum[2], of a thread
    static_assert(64 * S::O_STRIDE * 2 % 16 == 0, "the merge area starts 16-byte aligned");
    static_assert(64 * S::O_STRIDE * 2 + kMergeFloats * 128 * 4 <= S::SMEM_BYTES,
                  "output staging and the merge area must fit in the stages");

    FORA_DYNAMIC_SMEM(uint4, attention_split_smem);
    const uint32_t raw = smem_addr(attention_split_smem);
    const uint32_t align_pad = ((raw + 1023u) & ~1023u) - raw;
    unsigned char* base = reinterpret_cast<unsigned char*>(attention_split_smem) + align_pad;
    const uint32_t base_addr = raw + align_pad;
    unsigned char* s_k = base;                                  // [STAGES] K tiles
    unsigned char* s_v = base + S::STAGES * S::K_STAGE_BYTES;   // [STAGES] V tiles (K's layout)
    const uint32_t k_addr = base_addr;
    const uint32_t v_addr = base_addr + S::STAGES * S::K_STAGE_BYTES;

    const int tid = threadIdx.x;
    const int warpgroup = tid >> 7;
    const int t = tid & 127;  // the thread's place in its warpgroup
    const int lane = tid & 31;
    const int warp = t >> 5;  // warp within the warpgroup: query rows 16 warp ..
    const int g = lane >> 2;
    const int quad = lane & 3;
    const int tokens = p.tokens;
    const int q0 = blockIdx.x * 64;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;

    const HeadRows rows_of_head = head_rows<D>(p, batch, head);
    const int n_tiles = (tokens + BN - 1) / BN;
    const int n_pairs = (n_tiles + 1) / 2;

    // Pair `pair` (tiles 2 pair, 2 pair + 1 where they exist) into pair slot `slot`.
    auto load_pair = [&](int slot, int pair) {
        for (int w = 0; w < 2; ++w) {
            if (2 * pair + w < n_tiles) {
                load_kv_tile<S, D, true, kThreads>(s_k, s_v, 2 * slot + w, 2 * pair + w, tid, rows_of_head,
                                                   tokens);
            }
        }
    };

#pragma unroll
    for (int s = 0; s < PAIR_STAGES - 1; ++s) {
        if (s < n_pairs) load_pair(s, s);
        cp_async_commit();
    }

    zero_k_padding<S, D, kThreads>(s_k, tid);
    // Q fragments of this warp's 16 rows (both warpgroups hold the block's 64 rows).
    uint32_t q_frag[KSTEPS][4];
    load_q_fragments<D, KSTEPS>(q_frag, rows_of_head, q0 + warp * 16 + g, tokens, quad);

    float o_acc[D / 2], row_max[2], row_sum[2];
    start_online_softmax<D>(o_acc, row_max, row_sum);
    const float scale_log2 = softmax_scale_log2(p);

    for (int i = 0; i < n_pairs; ++i) {
        cp_async_wait<PAIR_STAGES - 2>();
        fence_proxy_async_shared();
        __syncthreads();  // pair i landed; both warpgroups are done with pair i - 1
        const int j = 2 * i + warpgroup;  // this warpgroup's tile
        // The next pair's loads, by every thread. A warpgroup with a tile issues them after its
        // QK^T wgmmas (their address arithmetic under the wgmmas, as in the block kernel), in
        // the same branch: wgmmas in flight across the end of a branch are serialized (C7518).
        auto refill = [&] {
            const int next = i + PAIR_STAGES - 1;
            if (next < n_pairs) load_pair(next % PAIR_STAGES, next);
            cp_async_commit();
        };
        if (j >= n_tiles) {
            refill();
        } else {
            const int stage = 2 * (i % PAIR_STAGES) + warpgroup;
            float s_acc[BN / 2];
            issue_scores<BN, KSTEPS>(s_acc, q_frag, k_addr + stage * S::K_STAGE_BYTES);
            wgmma_commit();
            refill();
            wgmma_wait<0>();
            pin_accumulators(s_acc);
            uint32_t p_frag[BN / 16][4];
            scores_to_p_fragments<BN, D>(s_acc, o_acc, row_max, row_sum, scale_log2, j * BN, tokens, lane, p_frag);
            pin_accumulators(o_acc);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                const uint64_t desc =
                    wgmma_desc_sw128_mn(v_addr + stage * S::V_STAGE_BYTES + kk * 2048, BN * 128, 1024);
                wgmma_pv<D, true>(o_acc, p_frag[kk], desc);
            }
            wgmma_commit();
            wgmma_wait<0>();
            pin_accumulators(o_acc);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) pin_registers(p_frag[kk]);
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every wgmma of both warpgroups is done: the stages are free

    // Warpgroup 1's state to shared memory, value v of thread t at merge[v * 128 + t]
    // (consecutive threads, consecutive words).
    float* merge = reinterpret_cast<float*>(base + 64 * S::O_STRIDE * 2);
    if (warpgroup == 1) {
#pragma unroll
        for (int v = 0; v < D / 2; ++v) merge[v * 128 + t] = o_acc[v];
        merge[(D / 2 + 0) * 128 + t] = row_max[0];
        merge[(D / 2 + 1) * 128 + t] = row_max[1];
        merge[(D / 2 + 2) * 128 + t] = row_sum[0];
        merge[(D / 2 + 3) * 128 + t] = row_sum[1];
    }
    __syncthreads();
    if (warpgroup == 1) return;

    // Warpgroup 0: both states at the common max (warpgroup 1 without a tile has max -inf, sums
    // and O zero: its factor is 0), added.
    float a0[2], a1[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float m1 = merge[(D / 2 + r) * 128 + t];
        const float l1 = merge[(D / 2 + 2 + r) * 128 + t];
        const float m = fmaxf(row_max[r], m1);
        a0[r] = fast_exp2(row_max[r] - m);
        a1[r] = fast_exp2(m1 - m);
        row_sum[r] = row_sum[r] * a0[r] + l1 * a1[r];
    }
#pragma unroll
    for (int v = 0; v < D / 2; ++v) {
        const int r = (v >> 1) & 1;  // accumulators 4i, 4i + 1: row g; 4i + 2, 4i + 3: row g + 8
        o_acc[v] = o_acc[v] * a0[r] + merge[v * 128 + t] * a1[r];
    }

    float inv_sum[2];
    quad_inverse_sums(row_sum, inv_sum);
    __nv_bfloat16* s_o = reinterpret_cast<__nv_bfloat16*>(base) + warp * 16 * S::O_STRIDE;
    stage_output_rows<D>(s_o, S::O_STRIDE, o_acc, inv_sum, lane);
    __syncwarp();
    store_output_rows<D>(s_o, S::O_STRIDE, 16, q0 + warp * 16, batch, head, p, lane);
}

}  // namespace

#define FORA_ATTENTION_WGMMA_BODY(D, WG, V_MN, STAGES) attention_wgmma_block<D, WG, V_MN, STAGES>(p)
#else
// Not sm_90a: wgmma does not exist; the launcher never launches this.
#define FORA_ATTENTION_WGMMA_BODY(D, WG, V_MN, STAGES) \
    do {                                               \
        (void)p;                                       \
        __trap();                                      \
    } while (0)
#endif

// Dynamic shared memory = WgmmaAttentionShape<D, WG, V_MN, STAGES>::SMEM_BYTES + 1024, the same
// for both block sizes (src/cuda/attention.rs mirrors it): with two stages, transposing V, d64
// 40 KiB, d72 59 KiB, d128 80 KiB; V MN-major, 32, 64 and 64 KiB; + 1 KiB (four stages: twice
// the MN-major figures).
// attention_wgmma[_mn]_d*: 128 query rows (two warpgroups), two CTAs an SM for d 64 and 72 (at
// most 128 registers a thread), one for d 128 (its Q fragments and O need more).
// attention_wgmma[_mn]_m64_d*: 64 query rows (one warpgroup), for grids too small to fill the SMs
// with 128-row blocks (one image + CFG: 64 blocks); three CTAs an SM (two for d 128).
#define FORA_ATTENTION_WGMMA_KERNEL(NAME, D, WG, V_MN, STAGES, MIN_BLOCKS)                          \
    extern "C" __global__ void __launch_bounds__(WgmmaAttentionShape<D, WG, V_MN, STAGES>::THREADS, \
                                                 MIN_BLOCKS) NAME(const AttentionParams p) {        \
        grid_dependency_sync();                                                                     \
        static_assert(WgmmaAttentionShape<D, WG, V_MN, STAGES>::SMEM_BYTES + 1024 <= 227 * 1024,    \
                      "smem too large");                                                            \
        static_assert(WgmmaAttentionShape<D, WG, V_MN, STAGES>::CHUNKS * 8 == D,                    \
                      "16-byte chunks cover a row of the head dim");                                \
        FORA_ATTENTION_WGMMA_BODY(D, WG, V_MN, STAGES);                                             \
    }

FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_d64, 64, 2, false, 2, 2)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_d72, 72, 2, false, 2, 2)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_d128, 128, 2, false, 2, 1)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_m64_d64, 64, 1, false, 2, 3)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_m64_d72, 72, 1, false, 2, 3)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_m64_d128, 128, 1, false, 2, 2)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_d64, 64, 2, true, 2, 2)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_d72, 72, 2, true, 2, 2)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_d128, 128, 2, true, 2, 1)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_m64_d64, 64, 1, true, 2, 3)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_m64_d72, 72, 1, true, 2, 3)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_m64_d128, 128, 1, true, 2, 2)
// The deep variant (FORA_ATTENTION=wgmma_mn_deep) of the 64-row V-MN-major blocks: four K/V
// stages, three tiles in flight from the start (all of 256 keys after the first tile's wait);
// 64 KiB (d64) or 128 KiB (d72, d128) of stages, for grids of at most one block an SM.
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_deep_m64_d64, 64, 1, true, 4, 1)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_deep_m64_d72, 72, 1, true, 4, 1)
FORA_ATTENTION_WGMMA_KERNEL(attention_wgmma_mn_deep_m64_d128, 128, 1, true, 4, 1)

// The split-key variant (FORA_ATTENTION=wgmma_mn_split) of the 64-row blocks: two warpgroups
// on the same rows, three pair slots (six K/V stages: 96 KiB for d64, 192 KiB for d72 and
// d128), for grids of at most one block an SM.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FORA_ATTENTION_SPLIT_BODY(D) attention_wgmma_split_block<D, 3>(p)
#else
#define FORA_ATTENTION_SPLIT_BODY(D) \
    do {                             \
        (void)p;                     \
        __trap();                    \
    } while (0)
#endif
#define FORA_ATTENTION_SPLIT_KERNEL(NAME, D)                                                        \
    extern "C" __global__ void __launch_bounds__(2 * WgmmaAttentionShape<D, 1, true, 6>::THREADS, 1)  \
        NAME(const AttentionParams p) {                                                             \
        grid_dependency_sync();                                                                     \
        static_assert(WgmmaAttentionShape<D, 1, true, 6>::SMEM_BYTES + 1024 <= 227 * 1024,          \
                      "smem too large");                                                            \
        static_assert(WgmmaAttentionShape<D, 1, true, 6>::CHUNKS * 8 == D,                          \
                      "16-byte chunks cover a row of the head dim");                                \
        FORA_ATTENTION_SPLIT_BODY(D);                                                               \
    }
FORA_ATTENTION_SPLIT_KERNEL(attention_wgmma_mn_split_m64_d64, 64)
FORA_ATTENTION_SPLIT_KERNEL(attention_wgmma_mn_split_m64_d72, 72)
FORA_ATTENTION_SPLIT_KERNEL(attention_wgmma_mn_split_m64_d128, 128)

// ---- the persistent TMA kernel (attention_tma_d*, FORA_ATTENTION=tma) -----------------------
//
// At DiT shapes (256 tokens, d 72) attention moves more bytes than it does math: per (batch,
// head) 4 x 256 x 72 bf16 (q, k, v, out) against 20 MFLOP, so the H200 needs ~150 us of DRAM
// for (256, 16, 256, 72) and ~85 us of tensor cores. The kernels above load each block's Q, K
// and V after it starts and wait for them, which leaves DRAM idle between a CTA's loads (ncu of
// attention_wgmma_d72: 54% memory throughput, latency-bound). This one streams, as the TMA GEMM
// does: a persistent grid of one CTA an SM, a producer warpgroup that loads the next units' Q
// and K/V tiles while two consumer warpgroups compute, mbarriers between them.
//
// Unit = (batch, head, 128-query block), query block fastest (the units of one head run on
// neighbouring CTAs at once and share K/V through L2). Consumer c owns rows 64c .. 64c + 63 of
// the unit. K/V come in tiles of 128 keys through a ring of STAGES slots; Q through one slot,
// which the consumers release as soon as they hold Q in registers (the producer then fetches
// the next unit's Q during this unit's mainloop).
//
// Layout: every tile is PANELS 128-byte-swizzle panels of 128 rows (the wgmma K-major canonical
// layout, as the TMA box lands it): panel p holds columns 64p .. 64p + 63 of the head dim. The
// producer's thread 0 issues one TMA box (64 columns x 128 rows) per whole panel. A last panel
// that is partly the head dim (d 72: columns 64 .. 71) is not a TMA box: a box of 64 columns
// would move 112 bytes of the next head per 16 useful ones (~1.8x the L2 -> SM traffic), so the
// producer's 128 threads load that 16-byte chunk of their row each, store it, fence it into the
// async proxy and arrive on the slot's `full` barrier themselves (its count is 1 + 128 then).
// The chunk after it (columns 72 .. 79, the QK^T depth padding) is zeroed once at the start and
// never written again; Q's padding is zero in registers.
//
// Per unit a consumer loads its Q fragments from the Q slot (zero past the head dim) and
// releases it (the next unit's during this unit's last tile, whose P V goes out with the next
// unit's first QK^T); per K/V tile: S = Q K^T (RS wgmma m64n128k16, DK / 16 k-steps), the online
// softmax of attention_common.cuh with keys past the end masked, O += P V (RS wgmma, V read
// MN-major from its slot as for wgmma_mn) issued together with the next tile's QK^T, then the
// slot goes back to the producer. Rows past the
// head's tokens load the next batch's rows (or zeros past the tensor, from the TMA): finite,
// masked as keys, never stored as queries. The output is staged per warp in its own rows of a
// staging area and written in 16-byte chunks, as by the other kernels.
//
// Barriers (one arrival a consumer warp where consumers arrive: 8): q_full (1, or 1 + 128),
// q_empty (8), kv_full[STAGES] (1, or 1 + 128), kv_empty[STAGES] (8); ring positions and parities
// as in the TMA GEMM (gemm_sm90.cu).

template <int D>
struct TmaAttentionShape {
    static constexpr int BLOCK_M = 128;  // query rows of a unit: 64 a consumer warpgroup
    static constexpr int BLOCK_N = 128;  // keys of a K/V tile
    static constexpr int STAGES = 2;
    static constexpr int DK = (D + 15) / 16 * 16;       // QK^T depth
    static constexpr int PANELS = (DK + 63) / 64;
    static constexpr bool PARTIAL_PANEL = D % 64 != 0;  // the last panel's chunk by hand
    static constexpr int TMA_PANELS = PARTIAL_PANEL ? PANELS - 1 : PANELS;
    static constexpr int PANEL_BYTES = BLOCK_N * 128;   // 128 rows of 128 bytes (issue_scores')
    static constexpr int TILE_BYTES = PANELS * PANEL_BYTES;
    static constexpr uint32_t TMA_TILE_BYTES = TMA_PANELS * PANEL_BYTES;
    static constexpr int FULL_ARRIVALS = 1 + (PARTIAL_PANEL ? 128 : 0);
    static constexpr int O_STRIDE = DK + 8;             // staging row, bf16
    static constexpr int Q_OFF = 0;
    static constexpr int K_OFF = Q_OFF + TILE_BYTES;
    static constexpr int V_OFF = K_OFF + STAGES * TILE_BYTES;
    static constexpr int STAGING_OFF = V_OFF + STAGES * TILE_BYTES;
    static constexpr int STAGING_BYTES = 8 * 16 * O_STRIDE * 2;  // 16 rows a consumer warp
    static constexpr int BAR_OFF = (STAGING_OFF + STAGING_BYTES + 7) / 8 * 8;
    // q_full, q_empty, kv_full[STAGES], kv_empty[STAGES]
    static constexpr int SMEM_BYTES = BAR_OFF + 8 * (2 + 2 * STAGES);
    static_assert(D % 8 == 0 && D <= 128, "head_dim must be a multiple of 8, at most 128");
    static_assert(!PARTIAL_PANEL || D % 64 == 8, "a partial panel holds one 16-byte chunk");
    static_assert(PANEL_BYTES % 1024 == 0, "panels start on 1024-byte swizzle atoms");
    static_assert(BLOCK_M == BLOCK_N, "Q, K and V tiles share one panel size");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

// The bf16 pair at columns (col, col + 1) of `row` in a tile of 128-byte-swizzled panels.
FORA_DEVICE uint32_t tile_pair(const unsigned char* tile, int row, int col) {
    const int byte = (col & 63) * 2;
    return ld_shared_for_async_proxy<uint32_t>(tile + (col >> 6) * (128 * 128) + sw128_chunk(row, byte >> 4) +
                                               (byte & 15));
}

// PINGPONG (attention_tma_pp_d*, FORA_ATTENTION=tma_pp): the two consumer warpgroups take turns
// issuing their wgmmas, so that one's softmax runs while the other's products keep the tensor
// cores busy (FlashAttention-3's inter-warpgroup overlap). Without it both tend to issue at
// once, wait at once and run their softmax at once, the tensor cores idle meanwhile (a tile's
// PV and the next QK^T are one wait: the softmax between them cannot overlap them within a
// warpgroup). Consumer c waits on named barrier 1 + c (256 threads: its own 128 syncing, the
// other's 128 arriving) before it issues, and arrives on the other's after its commit; consumer
// 1 arrives once at the start, so consumer 0 goes first. Both walk the same units and tiles, so
// they issue equally often (consumer 1's last arrival is left unmatched at the exit).
template <int D, bool PINGPONG>
FORA_DEVICE void attention_tma_block(const AttentionTmaParams& params) {
    using S = TmaAttentionShape<D>;
    constexpr int BN = S::BLOCK_N;
    constexpr int KSTEPS = S::DK / 16;
    const AttentionParams& p = params.attn;

    FORA_DYNAMIC_SMEM(uint4, attention_tma_smem);
    const uint32_t raw = smem_addr(attention_tma_smem);
    const uint32_t align_pad = ((raw + 1023u) & ~1023u) - raw;
    unsigned char* base = reinterpret_cast<unsigned char*>(attention_tma_smem) + align_pad;
    const uint32_t base_addr = raw + align_pad;
    const uint32_t q_full = base_addr + S::BAR_OFF;
    const uint32_t q_empty = q_full + 8;
    const uint32_t kv_full = q_empty + 8;              // + 8 slot
    const uint32_t kv_empty = kv_full + 8 * S::STAGES;  // + 8 slot

    const int tid = threadIdx.x;
    const int warpgroup = tid >> 7;
    const int tokens = p.tokens;
    const int q_blocks = (tokens + S::BLOCK_M - 1) / S::BLOCK_M;
    const int n_tiles = (tokens + BN - 1) / BN;
    const int units = q_blocks * p.heads * p.batch;
    const int hd = p.heads * D;  // columns of each of q, k, v in a qkv row
    // Unit u: (query block, head, batch), query block fastest. Both roles walk the same units.
    struct Unit {
        int qb, head, batch;
    };
    auto unit_of = [&](int u) { return Unit{u % q_blocks, (u / q_blocks) % p.heads, u / q_blocks / p.heads}; };

    // The K tiles' QK^T padding (columns D .. DK - 1 of the last panel) is never loaded: zero
    // it once (stale shared memory may hold NaN bit patterns, and 0 * NaN = NaN).
    if constexpr (S::DK > D) {
        for (int r = tid; r < S::STAGES * BN; r += blockDim.x) {
            st_shared_for_async_proxy(base + S::K_OFF + (r / BN) * S::TILE_BYTES + (S::PANELS - 1) * S::PANEL_BYTES +
                                          sw128_chunk(r % BN, (D % 64) / 8),
                                      make_uint4(0u, 0u, 0u, 0u));
        }
        fence_proxy_async_shared();
    }
    if (tid == 0) {
        mbarrier_init(q_full, S::FULL_ARRIVALS);
        mbarrier_init(q_empty, 8);
        for (int s = 0; s < S::STAGES; ++s) {
            mbarrier_init(kv_full + 8 * s, S::FULL_ARRIVALS);
            mbarrier_init(kv_empty + 8 * s, 8);
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    if (warpgroup == 0) {
        // The producer. Thread r also carries row r's chunk of a partial last panel (its loads
        // and addresses need more registers than a TMA-only producer's 40). The launch gives
        // every thread 168 (__launch_bounds__(384, 1)); 128 x (168 - 56) go to the consumers,
        // 256 x (224 - 168), whose code ptxas fits in 168 anyway.
        setmaxnreg_dec<56>();
        // Without a partial panel only thread 0 has work. The others leave rather than follow
        // the `empty` waits: they arrive on nothing, so nothing would stop one from falling two
        // phases behind, where a parity wait mistakes an old phase for the current one and
        // may wait for a phase that never comes.
        if (!S::PARTIAL_PANEL && tid != 0) return;
        if (tid == 0) tma_prefetch_descriptor(&params.qkv_map);
        const __nv_bfloat16* qkv = reinterpret_cast<const __nv_bfloat16*>(p.qkv);
        const size_t row_stride = 3 * static_cast<size_t>(hd);
        // Row `t` (of the batch's tokens) of tensor column offset `col0` (q, k or v of a head):
        // its chunk at column 64 (PANELS - 1), zero past the tokens.
        auto partial_chunk = [&](int b, int t, int col0) {
            if (!S::PARTIAL_PANEL || t >= tokens) return make_uint4(0u, 0u, 0u, 0u);
            return *reinterpret_cast<const uint4*>(qkv + (static_cast<size_t>(b) * tokens + t) * row_stride + col0 +
                                                   64 * (S::PANELS - 1));
        };
        auto store_partial = [&](uint32_t tile_off, uint4 v) {
            st_shared_for_async_proxy(base + tile_off + (S::PANELS - 1) * S::PANEL_BYTES + sw128_chunk(tid, 0), v);
        };
        uint32_t it = 0;
        uint32_t qi = 0;
        for (int u = blockIdx.x; u < units; u += gridDim.x, ++qi) {
            const auto [qb, head, batch] = unit_of(u);
            const int row0 = batch * tokens;
            const int q_col = head * D, k_col = hd + head * D, v_col = 2 * hd + head * D;

            const uint4 q_chunk = partial_chunk(batch, qb * S::BLOCK_M + tid, q_col);
            mbarrier_wait(q_empty, (qi & 1u) ^ 1u);
            if (tid == 0) {
                mbarrier_arrive_expect_tx(q_full, S::TMA_TILE_BYTES);
                for (int pn = 0; pn < S::TMA_PANELS; ++pn) {
                    tma_load_2d(base_addr + S::Q_OFF + pn * S::PANEL_BYTES, &params.qkv_map, q_col + 64 * pn,
                                row0 + qb * S::BLOCK_M, q_full);
                }
            }
            if (S::PARTIAL_PANEL) {
                store_partial(S::Q_OFF, q_chunk);
                fence_proxy_async_shared();
                mbarrier_arrive(q_full);
            }

            for (int j = 0; j < n_tiles; ++j, ++it) {
                const uint32_t slot = it % S::STAGES;
                const uint4 k_chunk = partial_chunk(batch, j * BN + tid, k_col);
                const uint4 v_chunk = partial_chunk(batch, j * BN + tid, v_col);
                mbarrier_wait(kv_empty + 8 * slot, ((it / S::STAGES) & 1u) ^ 1u);
                const uint32_t k_off = S::K_OFF + slot * S::TILE_BYTES;
                const uint32_t v_off = S::V_OFF + slot * S::TILE_BYTES;
                if (tid == 0) {
                    mbarrier_arrive_expect_tx(kv_full + 8 * slot, 2 * S::TMA_TILE_BYTES);
                    for (int pn = 0; pn < S::TMA_PANELS; ++pn) {
                        tma_load_2d(base_addr + k_off + pn * S::PANEL_BYTES, &params.qkv_map, k_col + 64 * pn,
                                    row0 + j * BN, kv_full + 8 * slot);
                        tma_load_2d(base_addr + v_off + pn * S::PANEL_BYTES, &params.qkv_map, v_col + 64 * pn,
                                    row0 + j * BN, kv_full + 8 * slot);
                    }
                }
                if (S::PARTIAL_PANEL) {
                    store_partial(k_off, k_chunk);
                    store_partial(v_off, v_chunk);
                    fence_proxy_async_shared();
                    mbarrier_arrive(kv_full + 8 * slot);
                }
            }
        }
        return;
    }

    // The consumers.
    setmaxnreg_inc<224>();
    const int consumer = warpgroup - 1;
    const int lane = tid & 31;
    const int warp_in_group = (tid >> 5) & 3;
    const int g = lane >> 2;
    const int quad = lane & 3;
    const int tile_row = 64 * consumer + 16 * warp_in_group + g;  // and + 8
    __nv_bfloat16* s_o = reinterpret_cast<__nv_bfloat16*>(base + S::STAGING_OFF) +
                         (4 * consumer + warp_in_group) * 16 * S::O_STRIDE;
    const float scale_log2 = softmax_scale_log2(p);
    uint32_t it = 0;
    uint32_t qi = 0;
    uint32_t q_frag[KSTEPS][4];
    float s_acc[BN / 2];
    // Q of this consumer's unit `q_index` in the A-fragment layout, then the slot goes back to
    // the producer (which then fetches the next unit's Q).
    auto load_q = [&](uint32_t q_index) {
        mbarrier_wait(q_full, q_index & 1u);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int col = kk * 16 + (i >> 1) * 8 + 2 * quad;
                q_frag[kk][i] = col < D ? tile_pair(base + S::Q_OFF, tile_row + (i & 1) * 8, col) : 0u;
            }
        }
        // The next unit's Q comes by TMA (the async proxy) into what these generic loads read.
        fence_proxy_async_shared();
        __syncwarp();
        if (lane == 0) mbarrier_arrive(q_empty);
    };
    // The ring's tile `tile_it` has landed.
    auto wait_kv = [&](uint32_t tile_it) { mbarrier_wait(kv_full + 8 * (tile_it % S::STAGES), (tile_it / S::STAGES) & 1u); };
    // S = Q K^T of the ring's tile `tile_it` (landed), issued (not waited for) into s_acc.
    auto issue_landed_qk = [&](uint32_t tile_it) {
        issue_scores<BN, KSTEPS>(s_acc, q_frag, base_addr + S::K_OFF + (tile_it % S::STAGES) * S::TILE_BYTES);
    };
    auto issue_qk = [&](uint32_t tile_it) {
        wait_kv(tile_it);
        issue_landed_qk(tile_it);
    };
    // PINGPONG's turns (no-ops without it): wait for this warpgroup's turn before issuing (the
    // data it needs has landed first, so a turn is not held waiting on memory); hand the turn
    // over once the wgmmas are committed.
    constexpr uint32_t kTurnBarrier = 1;
    auto my_turn = [&] {
        if constexpr (PINGPONG) named_barrier_sync(kTurnBarrier + static_cast<uint32_t>(consumer), 256);
    };
    auto their_turn = [&] {
        if constexpr (PINGPONG) named_barrier_arrive(kTurnBarrier + static_cast<uint32_t>(consumer ^ 1), 256);
    };
    if constexpr (PINGPONG) {
        if (consumer == 1) named_barrier_arrive(kTurnBarrier, 256);
    }
    // A unit's Q and first scores: each unit's own at its start, or (kCrossUnit) the first
    // unit's here and every later unit's with the last P V of the unit before it (below), so
    // that no unit starts on a Q load and a lone QK^T. Not for d 128, where the next unit's
    // scores and Q held through the output pass spill (ptxas: 160 bytes).
    constexpr bool kCrossUnit = D <= 96;
    auto first_scores = [&](uint32_t q_index) {
        load_q(q_index);
        wait_kv(it);
        my_turn();
        issue_landed_qk(it);
        wgmma_commit();
        their_turn();
        wgmma_wait<0>();
        pin_accumulators(s_acc);
    };
    if constexpr (kCrossUnit) {
        if (static_cast<int>(blockIdx.x) < units) first_scores(0);
    }
    for (int u = blockIdx.x; u < units; u += gridDim.x, ++qi) {
        const auto [qb, head, batch] = unit_of(u);
        const bool has_next = u + static_cast<int>(gridDim.x) < units;
        if constexpr (!kCrossUnit) first_scores(qi);

        float o_acc[D / 2], row_max[2], row_sum[2];
        start_online_softmax<D>(o_acc, row_max, row_sum);

        // Per tile: softmax of S_j (already in s_acc), then P_j V_j issued together with the
        // next scores (S_j's registers are free once P_j is packed): S_{j+1} of this unit, or
        // after its last tile the next unit's S_0 (its Q loaded first: every QK^T of this unit
        // is done, so q_frag is free), so the tensor cores start them while this PV runs
        // instead of after a wait. The last tile, the only one that can pass the last token, is
        // peeled off (with and without a next unit): a branch around a QK^T issue made ptxas
        // inject a warpgroup.arrive and a dummy wgmma at its join on every tile (info C7519),
        // and the tiles before it need no mask.
        auto tile = [&](int j, auto not_last, auto next_unit) {
            constexpr bool kNotLast = decltype(not_last)::value;
            constexpr bool kNextUnit = decltype(next_unit)::value;
            const uint32_t slot = it % S::STAGES;
            const uint32_t v_addr = base_addr + S::V_OFF + slot * S::TILE_BYTES;

            uint32_t p_frag[BN / 16][4];
            scores_to_p_fragments<BN, D, kNotLast ? TileMask::Never : TileMask::Always>(
                s_acc, o_acc, row_max, row_sum, scale_log2, j * BN, tokens, lane, p_frag);
            if constexpr (kNextUnit) load_q(qi + 1);
            if constexpr (PINGPONG) {
                if constexpr (kNotLast || kNextUnit) wait_kv(it + 1);
                my_turn();
            }
            pin_accumulators(o_acc);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                // Keys 16 kk .. 16 kk + 15: two 8-row atoms from byte 2048 kk; d 64 .. in the
                // next panel.
                wgmma_pv<D, true>(o_acc, p_frag[kk],
                                  wgmma_desc_sw128_mn(v_addr + kk * 2048, S::PANEL_BYTES, 1024));
            }
            if constexpr (kNotLast || kNextUnit) {
                if constexpr (PINGPONG) {
                    issue_landed_qk(it + 1);
                } else {
                    issue_qk(it + 1);
                }
            }
            wgmma_commit();
            their_turn();
            wgmma_wait<0>();
            pin_accumulators(o_acc);
            pin_accumulators(s_acc);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) pin_registers(p_frag[kk]);
            // Both products of tile j are done: its slot goes back to the producer.
            __syncwarp();
            if (lane == 0) mbarrier_arrive(kv_empty + 8 * slot);
            ++it;
        };
        for (int j = 0; j + 1 < n_tiles; ++j) tile(j, CompileTimeFlag<true>{}, CompileTimeFlag<false>{});
        if (kCrossUnit && has_next) {
            tile(n_tiles - 1, CompileTimeFlag<false>{}, CompileTimeFlag<true>{});
        } else {
            tile(n_tiles - 1, CompileTimeFlag<false>{}, CompileTimeFlag<false>{});
        }
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) pin_registers(q_frag[kk]);

        float inv_sum[2];
        quad_inverse_sums(row_sum, inv_sum);
        stage_output_rows<D>(s_o, S::O_STRIDE, o_acc, inv_sum, lane);
        __syncwarp();
        store_output_rows<D>(s_o, S::O_STRIDE, 16, qb * S::BLOCK_M + 64 * consumer + 16 * warp_in_group, batch, head,
                             p, lane);
        __syncwarp();  // the next unit stages into the same rows
    }
}

}  // namespace

#define FORA_ATTENTION_TMA_BODY(D, PINGPONG) attention_tma_block<D, PINGPONG>(p)
#else
#define FORA_ATTENTION_TMA_BODY(D, PINGPONG) \
    do {                                     \
        (void)p;                             \
        __trap();                            \
    } while (0)
#endif

// 384 threads (a producer and two consumer warpgroups), one CTA an SM, a persistent grid.
// Dynamic shared memory = TmaAttentionShape<D>::SMEM_BYTES + 1024 (src/cuda/attention.rs
// mirrors it).
#define FORA_ATTENTION_TMA_KERNEL(NAME, D, PINGPONG)                                                           \
    extern "C" __global__ void __launch_bounds__(384, 1) NAME(const __grid_constant__ AttentionTmaParams p) { \
        grid_dependency_sync();                                                                                \
        static_assert(TmaAttentionShape<D>::SMEM_BYTES + 1024 <= 227 * 1024, "smem too large");                \
        FORA_ATTENTION_TMA_BODY(D, PINGPONG);                                                                  \
    }

FORA_ATTENTION_TMA_KERNEL(attention_tma_d64, 64, false)
FORA_ATTENTION_TMA_KERNEL(attention_tma_d72, 72, false)
FORA_ATTENTION_TMA_KERNEL(attention_tma_d128, 128, false)
// The consumer warpgroups taking turns (PINGPONG above): the same shared memory and launch.
FORA_ATTENTION_TMA_KERNEL(attention_tma_pp_d64, 64, true)
FORA_ATTENTION_TMA_KERNEL(attention_tma_pp_d72, 72, true)
FORA_ATTENTION_TMA_KERNEL(attention_tma_pp_d128, 128, true)
