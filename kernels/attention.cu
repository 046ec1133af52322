// Flash attention over DiT's fused qkv buffer (FlashAttention-2 style forward, no mask).
//
// qkv bf16 [B, T, 3, H, d] exactly as the qkv Linear writes it; out bf16 [B, T, H, d].
// out[b, t, h] = softmax(q k^T * scale) v for every (batch, head).
//
// One block = BLOCK_M = 16 * WARPS query rows of one (batch, head); each warp owns 16 rows
// and walks over all keys in tiles of BLOCK_N = 64 with an online softmax (fp32 running max,
// sum and output accumulators, exp2 with log2(e) folded into the scale). Both products run on
// bf16 tensor cores (mma.sync m16n8k16): S = Q K^T with ldmatrix fragments of Q (kept in
// registers) and K, O += P V with P re-packed from the S accumulators and V fragments from
// ldmatrix.trans. K/V tiles are double-buffered with cp.async so the next tile loads while
// the current one is computed.
//
// head_dim 72 (DiT-XL/2) is 4.5 x 16: the QK^T reduction dimension is padded to 80 with zeros
// in shared memory only (global memory is read at exactly d columns); P V's n-dim 72 = 9 x 8
// tiles needs no padding. Out-of-range keys (T not a multiple of 64) are zero-filled by
// cp.async and masked to -inf before the softmax; out-of-range query rows are computed on
// zeros and never stored.
//
// Alignment: every row and head offset is a multiple of 8 bf16 (d in {64, 72, 128}: the row
// stride 3*H*d and head offset h*d are multiples of 8), so 16-byte cp.async and vector stores
// are aligned when the qkv and out base pointers are 16-byte aligned (the launcher checks).

#include "attention_common.cuh"
#include "common.cuh"

namespace {

template <int D, int WARPS>
struct AttentionShape {
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int BLOCK_M = 16 * WARPS;
    static constexpr int BLOCK_N = 64;
    // QK^T reduction dim rounded up to the mma k of 16 (72 -> 80).
    static constexpr int DK = (D + 15) / 16 * 16;
    // Shared row stride in bf16: +8 (16 bytes) makes the 8 row addresses of every ldmatrix
    // fall in distinct bank groups (stride 36/44/68 words for DK 64/80/128).
    static constexpr int STRIDE = DK + 8;
    static constexpr int CHUNKS = D / 8;  // 16-byte chunks per row in global memory
    static constexpr int Q_ELEMS = BLOCK_M * STRIDE;
    static constexpr int KV_ELEMS = BLOCK_N * STRIDE;
    // Q tile, two K tiles, two V tiles.
    static constexpr int SMEM_BYTES = (Q_ELEMS + 4 * KV_ELEMS) * 2;
    static_assert(D % 8 == 0, "head_dim must be a multiple of 8");
    static_assert(DK - D == 0 || DK - D == 8, "padding is one 16-byte chunk at most");
};

// Copies `rows` rows of D bf16 starting at token row0 into shared memory (stride STRIDE);
// rows at or past `tokens` are zero-filled (src-size 0 reads nothing; the address is clamped
// to row 0 so it stays valid anyway).
template <int D, int WARPS>
FORA_DEVICE void load_rows_async(__nv_bfloat16* dst, const __nv_bfloat16* src, int rows, int row0,
                                 int tokens, size_t row_stride) {
    using S = AttentionShape<D, WARPS>;
    for (int c = threadIdx.x; c < rows * S::CHUNKS; c += S::THREADS) {
        const int r = c / S::CHUNKS;
        const int ch = c - r * S::CHUNKS;
        const int t = row0 + r;
        const bool in_range = t < tokens;
        const __nv_bfloat16* g = src + static_cast<size_t>(in_range ? t : 0) * row_stride + ch * 8;
        cp_async_16(dst + r * S::STRIDE + ch * 8, g, in_range ? 16 : 0);
    }
}

template <int D, int WARPS>
FORA_DEVICE void attention_block(const AttentionParams& p, unsigned char* smem_raw) {
    using S = AttentionShape<D, WARPS>;
    constexpr int BM = S::BLOCK_M;
    constexpr int BN = S::BLOCK_N;
    constexpr int STRIDE = S::STRIDE;
    constexpr int N_TILES_O = D / 8;  // 8-wide output column tiles (9 for d = 72)

    __nv_bfloat16* s_q = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* s_k = s_q + S::Q_ELEMS;        // 2 buffers
    __nv_bfloat16* s_v = s_k + 2 * S::KV_ELEMS;   // 2 buffers

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int tokens = p.tokens;
    const int q0 = blockIdx.x * BM;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;

    const HeadRows rows_of_head = head_rows<D>(p, batch, head);
    const size_t row_stride = rows_of_head.row_stride;
    const __nv_bfloat16* q_base = rows_of_head.q;
    const __nv_bfloat16* k_base = rows_of_head.k;
    const __nv_bfloat16* v_base = rows_of_head.v;

    const int n_tiles = (tokens + BN - 1) / BN;

    // Q tile and the first K/V tile in one cp.async group.
    load_rows_async<D, WARPS>(s_q, q_base, BM, q0, tokens, row_stride);
    load_rows_async<D, WARPS>(s_k, k_base, BN, 0, tokens, row_stride);
    load_rows_async<D, WARPS>(s_v, v_base, BN, 0, tokens, row_stride);
    cp_async_commit();

    // Zero the K-dim padding columns [D, DK) of Q and both K buffers once: cp.async never
    // writes them, and uninitialised shared memory could hold NaN bit patterns (0 * NaN = NaN).
    if constexpr (S::DK > D) {
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        for (int r = threadIdx.x; r < BM + 2 * BN; r += S::THREADS) {
            __nv_bfloat16* row = r < BM ? s_q + r * STRIDE : s_k + (r - BM) * STRIDE;
            *reinterpret_cast<uint4*>(row + D) = zero;
        }
    }

    uint32_t q_frag[S::DK / 16][4];
    float o_acc[N_TILES_O][4];
#pragma unroll
    for (int i = 0; i < N_TILES_O; ++i) {
        o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.0f;
    }
    // Rows g = lane / 4 and g + 8 of this warp's 16: running max (log2 domain) and this
    // thread's partial row sum (reduced over the quad once at the end).
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    const float scale_log2 = softmax_scale_log2(p);

    for (int j = 0; j < n_tiles; ++j) {
        cp_async_wait<0>();
        // Tile j is visible to all warps, and every warp has finished tile j - 1, so its
        // buffer may be refilled with tile j + 1 while tile j is computed.
        __syncthreads();
        if (j + 1 < n_tiles) {
            const int nb = (j + 1) & 1;
            load_rows_async<D, WARPS>(s_k + nb * S::KV_ELEMS, k_base, BN, (j + 1) * BN, tokens, row_stride);
            load_rows_async<D, WARPS>(s_v + nb * S::KV_ELEMS, v_base, BN, (j + 1) * BN, tokens, row_stride);
            cp_async_commit();
        }
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < S::DK / 16; ++kk) {
                ldmatrix_x4(q_frag[kk][0], q_frag[kk][1], q_frag[kk][2], q_frag[kk][3],
                            s_q + (warp * 16 + (lane & 15)) * STRIDE + kk * 16 + (lane >> 4) * 8);
            }
        }

        const __nv_bfloat16* kt = s_k + (j & 1) * S::KV_ELEMS;
        const __nv_bfloat16* vt = s_v + (j & 1) * S::KV_ELEMS;

        // S = Q K^T: 16 rows x 64 keys per warp, 8 n-tiles of 8 keys.
        float s_acc[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) s_acc[i][0] = s_acc[i][1] = s_acc[i][2] = s_acc[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < S::DK / 16; ++kk) {
#pragma unroll
            for (int nn = 0; nn < BN / 16; ++nn) {
                // Matrices: (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7),
                // (keys 8-15, k 8-15): the b0/b1 pairs of two 8-key n-tiles.
                uint32_t b[4];
                ldmatrix_x4(b[0], b[1], b[2], b[3],
                            kt + (nn * 16 + ((lane >> 4) & 1) * 8 + (lane & 7)) * STRIDE + kk * 16 +
                                ((lane >> 3) & 1) * 8);
                mma_bf16_16816(s_acc[2 * nn], q_frag[kk], b);
                mma_bf16_16816(s_acc[2 * nn + 1], q_frag[kk], b + 2);
            }
        }

        // Keys past the end of the sequence (only in the last tile) get -inf; then the online
        // softmax (every tile holds at least one valid key).
        masked_online_softmax_tile<BN, D>(&s_acc[0][0], &o_acc[0][0], row_max, row_sum, scale_log2, j * BN, tokens,
                                          lane);

        // O += P V, 16 keys per mma step. P's A fragment comes straight from two S n-tiles.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            pack_p_fragment(&s_acc[0][0], kk, a);
            const __nv_bfloat16* v_rows = vt + (kk * 16 + (lane & 15)) * STRIDE;
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                // Transposed matrices: (keys 0-7, dims 0-7), (keys 8-15, dims 0-7),
                // (keys 0-7, dims 8-15), (keys 8-15, dims 8-15).
                uint32_t b[4];
                ldmatrix_x4_trans(b[0], b[1], b[2], b[3], v_rows + dn * 16 + (lane >> 4) * 8);
                mma_bf16_16816(o_acc[2 * dn], a, b);
                mma_bf16_16816(o_acc[2 * dn + 1], a, b + 2);
            }
            if constexpr (D % 16 == 8) {
                // The odd last 8 columns (64..71 for d = 72); lanes 0-15 supply the addresses.
                uint32_t b[2];
                ldmatrix_x2_trans(b[0], b[1], v_rows + (D - 8));
                mma_bf16_16816(o_acc[N_TILES_O - 1], a, b);
            }
        }
    }

    // Finish the row sums over the quad and normalise.
    float inv_sum[2];
    quad_inverse_sums(row_sum, inv_sum);

    // Stage this warp's 16 output rows in its own Q rows (only this warp ever read them, and
    // its Q fragments are in registers), then write whole 16-byte chunks to global memory.
    __syncwarp();
    __nv_bfloat16* s_o = s_q + warp * 16 * STRIDE;
    stage_output_rows<D>(s_o, STRIDE, &o_acc[0][0], inv_sum, lane);
    __syncwarp();
    store_output_rows<D>(s_o, STRIDE, 16, q0 + warp * 16, batch, head, p, lane);
}

}  // namespace

// Dynamic shared memory per variant (bytes), mirrored by src/cuda/attention.rs:
// d64: (64*72 + 4*64*72)*2 = 46080, d72: (64*88 + 4*64*88)*2 = 56320,
// d128: (64*136 + 4*64*136)*2 = 87040.
#define FORA_ATTENTION_KERNEL(D)                                                           \
    extern "C" __global__ void __launch_bounds__(AttentionShape<D, 4>::THREADS)            \
        attention_d##D(const AttentionParams p) {                                          \
        grid_dependency_sync();                                                            \
        FORA_DYNAMIC_SMEM(unsigned char, attention_smem);                                  \
        static_assert(AttentionShape<D, 4>::SMEM_BYTES <= 227 * 1024, "smem too large");   \
        attention_block<D, 4>(p, attention_smem);                                          \
    }

FORA_ATTENTION_KERNEL(64)
FORA_ATTENTION_KERNEL(72)
FORA_ATTENTION_KERNEL(128)

// ---- v2: 128 query rows per block, 32 per warp (opt-in, FORA_ATTENTION=v2) ---------------
//
// Same maths, global layouts and numerics as v1 (bf16 mma.sync, fp32 online softmax in the
// log2 domain, exp2 with log2(e) folded into the scale). What changes:
//
// * Each of the 4 warps owns 32 query rows (two m16 tiles), so every K fragment (QK^T) and V
//   fragment (PV) read from shared memory with ldmatrix feeds two mma instead of one: half the
//   shared-memory traffic per mma, and two independent accumulator chains per B fragment.
// * 128 query rows per block: each K/V tile copied into shared memory serves twice as many
//   queries, halving the L2 -> shared traffic of K and V.
// * K and V of a tile are separate cp.async groups: QK^T of tile j waits only for K_j, and V_j
//   keeps loading during QK^T and the softmax; K_{j+1} is issued as soon as every warp has
//   finished QK^T of tile j - 1, V_{j+1} as soon as every warp has finished PV of tile j - 1.
// * d = 72 runs QK^T as 4 k16 steps plus one m16n8k8 step over columns 64..71 instead of 5
//   k16 steps over zero padding: 10% less QK^T tensor work, and no padding columns to zero.
// * Q fragments stay in registers for the whole key loop when DK <= 80 (36 registers for
//   d = 72); for d = 128 they are re-read from shared memory per 16-wide k step to stay
//   within 255 registers without spilling.
namespace {

// D[16x8] += A[16x8] (row) * B[8x8] (col), bf16 operands, f32 accumulators. Fragments (PTX
// ISA, m16n8k8 .bf16): a0 = A[g][2q, 2q+1], a1 = A[g+8][2q, 2q+1], b0 = B[2q, 2q+1][g], c as
// for m16n8k16 (g = lane / 4, q = lane % 4): the first k half of the m16n8k16 layouts.
FORA_DEVICE void mma_bf16_1688(float* c, const uint32_t* a, uint32_t b) {
#ifdef FORA_EMULATION
    fora_emulation_mma(8, c, a, &b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b));
#endif
}

template <int D>
struct AttentionV2Shape {
    static constexpr int WARPS = 4;
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int M_TILES = 2;  // m16 tiles per warp
    static constexpr int WARP_M = 16 * M_TILES;
    static constexpr int BLOCK_M = WARP_M * WARPS;
    static constexpr int BLOCK_N = 64;
    // Full 16-wide k steps of QK^T, then (d = 72) one 8-wide step over the last 8 columns.
    static constexpr int K16_STEPS = D / 16;
    static constexpr bool HAS_K8 = D % 16 == 8;
    static constexpr int DK = (D + 15) / 16 * 16;
    // Row stride in bf16 (the v1 layout): 88 for d = 72 puts the 8 row addresses of every
    // ldmatrix in distinct bank groups (72 + 8 = 80 would not: 160-byte rows repeat every 4).
    // Columns [D, DK) are never read.
    static constexpr int STRIDE = DK + 8;
    static constexpr int CHUNKS = D / 8;
    static constexpr int Q_ELEMS = BLOCK_M * STRIDE;
    static constexpr int KV_ELEMS = BLOCK_N * STRIDE;
    // Q tile, two K tiles, two V tiles.
    static constexpr int SMEM_BYTES = (Q_ELEMS + 4 * KV_ELEMS) * 2;
    static constexpr bool Q_IN_REGS = DK <= 80;
    static_assert(D % 8 == 0, "head_dim must be a multiple of 8");
};

// `rows` rows of D bf16 from token row0 into shared memory (stride STRIDE), zero-filling rows
// at or past `tokens` (src-size 0; the source address is clamped to row 0 to stay valid).
template <int D>
FORA_DEVICE void load_rows_async_v2(__nv_bfloat16* dst, const __nv_bfloat16* src, int rows, int row0,
                                    int tokens, size_t row_stride) {
    using S = AttentionV2Shape<D>;
    for (int c = threadIdx.x; c < rows * S::CHUNKS; c += S::THREADS) {
        const int r = c / S::CHUNKS;
        const int ch = c - r * S::CHUNKS;
        const int t = row0 + r;
        const bool in_range = t < tokens;
        const __nv_bfloat16* g = src + static_cast<size_t>(in_range ? t : 0) * row_stride + ch * 8;
        cp_async_16(dst + r * S::STRIDE + ch * 8, g, in_range ? 16 : 0);
    }
}

template <int D>
FORA_DEVICE void attention_block_v2(const AttentionParams& p, unsigned char* smem_raw) {
    using S = AttentionV2Shape<D>;
    constexpr int BM = S::BLOCK_M;
    constexpr int BN = S::BLOCK_N;
    constexpr int STRIDE = S::STRIDE;
    constexpr int MT = S::M_TILES;
    constexpr int KSTEPS = S::K16_STEPS;
    constexpr int N_TILES_O = D / 8;

    __nv_bfloat16* s_q = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* s_k = s_q + S::Q_ELEMS;       // 2 buffers
    __nv_bfloat16* s_v = s_k + 2 * S::KV_ELEMS;  // 2 buffers

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int tokens = p.tokens;
    const int q0 = blockIdx.x * BM;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;

    const HeadRows rows_of_head = head_rows<D>(p, batch, head);
    const size_t row_stride = rows_of_head.row_stride;
    const __nv_bfloat16* q_base = rows_of_head.q;
    const __nv_bfloat16* k_base = rows_of_head.k;
    const __nv_bfloat16* v_base = rows_of_head.v;

    const int n_tiles = (tokens + BN - 1) / BN;

    // Group 0: Q and K_0. Group 1: V_0.
    load_rows_async_v2<D>(s_q, q_base, BM, q0, tokens, row_stride);
    load_rows_async_v2<D>(s_k, k_base, BN, 0, tokens, row_stride);
    cp_async_commit();
    load_rows_async_v2<D>(s_v, v_base, BN, 0, tokens, row_stride);
    cp_async_commit();

    // This warp's Q rows start here; m tile mt covers rows [16 mt, 16 mt + 16).
    const __nv_bfloat16* s_q_warp = s_q + warp * S::WARP_M * STRIDE;
    uint32_t q_frag[S::Q_IN_REGS ? MT : 1][S::Q_IN_REGS ? KSTEPS : 1][4];
    uint32_t q_tail[S::Q_IN_REGS && S::HAS_K8 ? MT : 1][2];  // A of the k8 step (d = 72)
    float o_acc[MT][N_TILES_O][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < N_TILES_O; ++i) {
            o_acc[mt][i][0] = o_acc[mt][i][1] = o_acc[mt][i][2] = o_acc[mt][i][3] = 0.0f;
        }
    }
    // Per m tile, rows g = lane / 4 and g + 8: running max (log2 domain) and this thread's
    // partial row sum (reduced over the quad once at the end).
    float row_max[MT][2];
    float row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        row_max[mt][0] = row_max[mt][1] = -INFINITY;
        row_sum[mt][0] = row_sum[mt][1] = 0.0f;
    }
    const float scale_log2 = softmax_scale_log2(p);

    for (int j = 0; j < n_tiles; ++j) {
        const int buf = j & 1;
        // Outstanding groups here: K_j, V_j (newest). Wait for K_j; the barrier makes every
        // thread's part of it visible and shows every warp has finished QK^T of tile j - 1,
        // whose K buffer is refilled next.
        cp_async_wait<1>();
        __syncthreads();
        if (j + 1 < n_tiles) {
            load_rows_async_v2<D>(s_k + (buf ^ 1) * S::KV_ELEMS, k_base, BN, (j + 1) * BN, tokens,
                                  row_stride);
        }
        cp_async_commit();  // possibly empty: keeps the group count uniform
        if constexpr (S::Q_IN_REGS) {
            if (j == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int kk = 0; kk < KSTEPS; ++kk) {
                        ldmatrix_x4(q_frag[mt][kk][0], q_frag[mt][kk][1], q_frag[mt][kk][2], q_frag[mt][kk][3],
                                    s_q_warp + (mt * 16 + (lane & 15)) * STRIDE + kk * 16 + (lane >> 4) * 8);
                    }
                    if constexpr (S::HAS_K8) {
                        // Rows 0-7 and 8-15 of columns D-8 .. D-1; lanes 0-15 give the addresses.
                        ldmatrix_x2(q_tail[mt][0], q_tail[mt][1],
                                    s_q_warp + (mt * 16 + (lane & 15)) * STRIDE + (D - 8));
                    }
                }
            }
        }

        const __nv_bfloat16* kt = s_k + buf * S::KV_ELEMS;
        const __nv_bfloat16* vt = s_v + buf * S::KV_ELEMS;

        // S = Q K^T: 32 rows x 64 keys per warp.
        float s_acc[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) {
                s_acc[mt][i][0] = s_acc[mt][i][1] = s_acc[mt][i][2] = s_acc[mt][i][3] = 0.0f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (S::Q_IN_REGS) {
                    qa[mt][0] = q_frag[mt][kk][0];
                    qa[mt][1] = q_frag[mt][kk][1];
                    qa[mt][2] = q_frag[mt][kk][2];
                    qa[mt][3] = q_frag[mt][kk][3];
                } else {
                    ldmatrix_x4(qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3],
                                s_q_warp + (mt * 16 + (lane & 15)) * STRIDE + kk * 16 + (lane >> 4) * 8);
                }
            }
#pragma unroll
            for (int nn = 0; nn < BN / 16; ++nn) {
                // (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15):
                // the b0/b1 pairs of two 8-key n-tiles, shared by both m tiles.
                uint32_t b[4];
                ldmatrix_x4(b[0], b[1], b[2], b[3],
                            kt + (nn * 16 + ((lane >> 4) & 1) * 8 + (lane & 7)) * STRIDE + kk * 16 +
                                ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(s_acc[mt][2 * nn], qa[mt], b);
                    mma_bf16_16816(s_acc[mt][2 * nn + 1], qa[mt], b + 2);
                }
            }
        }
        if constexpr (S::HAS_K8) {
            uint32_t qt[MT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (S::Q_IN_REGS) {
                    qt[mt][0] = q_tail[mt][0];
                    qt[mt][1] = q_tail[mt][1];
                } else {
                    ldmatrix_x2(qt[mt][0], qt[mt][1], s_q_warp + (mt * 16 + (lane & 15)) * STRIDE + (D - 8));
                }
            }
#pragma unroll
            for (int n4 = 0; n4 < BN / 32; ++n4) {
                // Matrix i = keys 8i .. 8i+7 of this 32-key group, columns D-8 .. D-1: the b0 of
                // n-tile 4 n4 + i (lane l addresses key l).
                uint32_t b[4];
                ldmatrix_x4(b[0], b[1], b[2], b[3], kt + (n4 * 32 + lane) * STRIDE + (D - 8));
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma_bf16_1688(s_acc[mt][4 * n4 + i], qt[mt], b[i]);
                }
            }
        }

        // Keys past the end of the sequence (only in the last tile) get -inf; the online
        // softmax of each m tile (every tile holds at least one valid key).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            masked_online_softmax_tile<BN, D>(&s_acc[mt][0][0], &o_acc[mt][0][0], row_max[mt], row_sum[mt],
                                              scale_log2, j * BN, tokens, lane);
        }

        // Outstanding: V_j, K_{j+1} (newest). Wait for V_j; the barrier makes it visible and
        // shows every warp has finished PV of tile j - 1, whose V buffer is refilled next.
        cp_async_wait<1>();
        __syncthreads();
        if (j + 1 < n_tiles) {
            load_rows_async_v2<D>(s_v + (buf ^ 1) * S::KV_ELEMS, v_base, BN, (j + 1) * BN, tokens,
                                  row_stride);
        }
        cp_async_commit();

        // O += P V, 16 keys per mma step; P's A fragments come straight from the S accumulators.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) pack_p_fragment(&s_acc[mt][0][0], kk, a[mt]);
            const __nv_bfloat16* v_rows = vt + (kk * 16 + (lane & 15)) * STRIDE;
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                // Transposed: (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims 8-15),
                // (keys 8-15, dims 8-15).
                uint32_t b[4];
                ldmatrix_x4_trans(b[0], b[1], b[2], b[3], v_rows + dn * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(o_acc[mt][2 * dn], a[mt], b);
                    mma_bf16_16816(o_acc[mt][2 * dn + 1], a[mt], b + 2);
                }
            }
            if constexpr (D % 16 == 8) {
                // The odd last 8 columns (64..71 for d = 72); lanes 0-15 supply the addresses.
                uint32_t b[2];
                ldmatrix_x2_trans(b[0], b[1], v_rows + (D - 8));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) mma_bf16_16816(o_acc[mt][N_TILES_O - 1], a[mt], b);
            }
        }
    }

    // Stage this warp's 32 output rows in its own Q rows (only this warp ever reads them; the
    // __syncwarp orders its last Q ldmatrix before the overwrite), then store 16-byte chunks.
    __syncwarp();
    __nv_bfloat16* s_o = s_q + warp * S::WARP_M * STRIDE;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float inv_sum[2];
        quad_inverse_sums(row_sum[mt], inv_sum);
        stage_output_rows<D>(s_o + mt * 16 * STRIDE, STRIDE, &o_acc[mt][0][0], inv_sum, lane);
    }
    __syncwarp();
    store_output_rows<D>(s_o, STRIDE, S::WARP_M, q0 + warp * S::WARP_M, batch, head, p, lane);
}

}  // namespace

// Dynamic shared memory per v2 variant (bytes), mirrored by src/cuda/attention.rs:
// (128 + 4 * 64) rows x (DK + 8) bf16: d64 55296, d72 67584, d128 104448.
// Two blocks per SM: the register budget (<= 255 per thread at 128 threads) allows it.
#define FORA_ATTENTION_V2_KERNEL(D)                                                             \
    extern "C" __global__ void __launch_bounds__(AttentionV2Shape<D>::THREADS, 2)               \
        attention_v2_d##D(const AttentionParams p) {                                            \
        grid_dependency_sync();                                                                 \
        FORA_DYNAMIC_SMEM(unsigned char, attention_smem);                                       \
        static_assert(2 * AttentionV2Shape<D>::SMEM_BYTES <= 227 * 1024, "smem too large");     \
        attention_block_v2<D>(p, attention_smem);                                               \
    }

FORA_ATTENTION_V2_KERNEL(64)
FORA_ATTENTION_V2_KERNEL(72)
FORA_ATTENTION_V2_KERNEL(128)
