// Tensor-core GEMM with the fused DiT epilogues, and the stand-alone epilogue that the cuBLASLt
// reference path runs after its own GEMM.
//
//   out[M, N] = epilogue(A[M, K] @ W[N, K]^T + bias[N])
//
// A (activations) and W (PyTorch Linear weight [out, in]) are bf16, row-major and K-contiguous,
// so both operands are "K-major" and feed mma.sync m16n8k16 (row.col) through plain ldmatrix.
// Accumulation is f32. Requirements checked by the launcher (src/cuda/gemm.rs): K % 8 == 0,
// lda/ldw % 8 == 0 and 16-byte aligned A/W (every 8-element chunk is one 16-byte cp.async),
// out/cache 8-byte aligned, bias/gate 4-byte aligned. M and N are arbitrary.
//
// Pipeline: STAGES-deep cp.async ring of BMxBK (A) and BNxBK (W) tiles in dynamic shared memory,
// one __syncthreads per k-tile; 16-byte chunks XOR-swizzled within a row (see tile_offset) so
// ldmatrix is free of bank conflicts without padding.
//
// Split-K (few CTAs, long K): gridDim.z slices each sum a contiguous share of the k-tiles into an
// f32 workspace (epilogue FORA_EPI_PARTIAL_F32); gemm_epilogue_f32 adds the slices in a fixed
// order and applies the epilogue, so results are deterministic (no atomics).
//
// The epilogue runs straight from the accumulator registers: each thread owns pairs of adjacent
// columns (c0, c1) / (c2, c3) of the m16n8 fragments, so bf16 pairs and f32 pairs are stored with
// one 4- or 8-byte access when the leading dimension is even.

#include "common.cuh"
#include "gemm_epilogue.cuh"

namespace {

// Offset, in bf16 elements, of 16-byte chunk `chunk` (0 .. BK/8 - 1) of `row` in a [rows][BK]
// smem tile. BK = 32: 64-byte rows, row pairs share a 128-byte bank line, so the chunk is XOR-ed
// with (row / 2) % 4. BK = 64: 128-byte rows, XOR with row % 8. Either way the 8 consecutive rows
// one ldmatrix phase reads (same logical chunk) hit 8 distinct 16-byte bank groups.
template <int BK>
FORA_DEVICE int tile_offset(int row, int chunk) {
    static_assert(BK == 32 || BK == 64, "tile rows are 32 or 64 bf16");
    if constexpr (BK == 32) {
        return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3);
    } else {
        return row * BK + ((chunk ^ (row & 7)) << 3);
    }
}

// One CTA computes a BM x BN tile of out with WARPS_M x WARPS_N warps, each a
// (BM / WARPS_M) x (BN / WARPS_N) sub-tile of m16n8 mma fragments.
template <int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
FORA_DEVICE void gemm_tile(const GemmParams& p) {
    constexpr int kThreads = WARPS_M * WARPS_N * 32;
    constexpr int kWarpM = BM / WARPS_M;
    constexpr int kWarpN = BN / WARPS_N;
    constexpr int kMi = kWarpM / 16;  // m16 fragments per warp
    constexpr int kNi = kWarpN / 8;   // n8 fragments per warp
    constexpr int kRowChunks = BK / 8;  // 16-byte chunks per tile row
    constexpr int kChunksA = BM * kRowChunks;
    constexpr int kChunksB = BN * kRowChunks;
    static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tile must be whole m16 x n16 blocks");
    static_assert(kChunksA % kThreads == 0 && kChunksB % kThreads == 0, "tile loads must split evenly");
    static_assert(STAGES >= 2, "the pipeline needs at least two stages");

    FORA_DYNAMIC_SMEM(uint4, gemm_smem);
    __nv_bfloat16* smem_a = reinterpret_cast<__nv_bfloat16*>(gemm_smem);  // [STAGES][BM * BK]
    __nv_bfloat16* smem_b = smem_a + STAGES * BM * BK;                       // [STAGES][BN * BK]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int warp_m = warp / WARPS_N;
    const int warp_n = warp % WARPS_N;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const __nv_bfloat16* a = reinterpret_cast<const __nv_bfloat16*>(p.a);
    const __nv_bfloat16* w = reinterpret_cast<const __nv_bfloat16*>(p.w);
    // This slice's k-tiles [kt_begin, kt_end); the whole range when gridDim.z == 1. A slice
    // past the end gets none and writes a zero partial.
    const int k_tiles_all = (p.k + BK - 1) / BK;
    const int k_per_slice = (k_tiles_all + gridDim.z - 1) / gridDim.z;
    const int kt_begin = min(k_tiles_all, static_cast<int>(blockIdx.z) * k_per_slice);
    const int k_tiles = min(k_tiles_all - kt_begin, k_per_slice);

    // Rows past M or N and chunks past K are zero-filled (src size 0), with the base pointer as a
    // harmless in-bounds source address; K % 8 == 0 makes every chunk wholly in or out.
    auto load_stage = [&](int slot, int k_tile) {
        const int k0 = (kt_begin + k_tile) * BK;
        __nv_bfloat16* dst_a = smem_a + slot * BM * BK;
        __nv_bfloat16* dst_b = smem_b + slot * BN * BK;
#pragma unroll
        for (int i = 0; i < kChunksA / kThreads; ++i) {
            const int c = tid + i * kThreads;
            const int row = c / kRowChunks;
            const int chunk = c % kRowChunks;
            const int gm = m0 + row;
            const int gk = k0 + chunk * 8;
            const bool in = gm < p.m && gk < p.k;
            const __nv_bfloat16* src = in ? a + static_cast<long long>(gm) * p.lda + gk : a;
            cp_async_16(dst_a + tile_offset<BK>(row, chunk), src, in ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < kChunksB / kThreads; ++i) {
            const int c = tid + i * kThreads;
            const int row = c / kRowChunks;
            const int chunk = c % kRowChunks;
            const int gn = n0 + row;
            const int gk = k0 + chunk * 8;
            const bool in = gn < p.n && gk < p.k;
            const __nv_bfloat16* src = in ? w + static_cast<long long>(gn) * p.ldw + gk : w;
            cp_async_16(dst_b + tile_offset<BK>(row, chunk), src, in ? 16 : 0);
        }
    };

    float acc[kMi][kNi][4];
#pragma unroll
    for (int i = 0; i < kMi; ++i)
#pragma unroll
        for (int j = 0; j < kNi; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    // Prologue: STAGES - 1 tiles in flight. Every iteration commits exactly one group (maybe
    // empty), so "group g holds k-tile g" and wait_group<STAGES - 2> below means tile kt landed.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }

    // ldmatrix row/chunk of this lane. A (x4): matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) in
    // the a0..a3 order of the mma. W (x4): (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
    // (n 8-15, k 8-15) = b0, b1 of two n8 fragments.
    const int a_row = warp_m * kWarpM + (lane & 15);
    const int a_chunk = lane >> 4;
    const int b_row = warp_n * kWarpN + (lane & 7) + ((lane >> 4) << 3);
    const int b_chunk = (lane >> 3) & 1;

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        // Tile kt is visible to all threads, and every thread is done with the slot of tile
        // kt - 1, which the prefetch below overwrites.
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < k_tiles) load_stage(next % STAGES, next);
        cp_async_commit();

        const int slot = kt % STAGES;
        const __nv_bfloat16* tile_a = smem_a + slot * BM * BK;
        const __nv_bfloat16* tile_b = smem_b + slot * BN * BK;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            uint32_t frag_a[kMi][4];
            uint32_t frag_b[kNi][2];
#pragma unroll
            for (int i = 0; i < kMi; ++i) {
                ldmatrix_x4(frag_a[i][0], frag_a[i][1], frag_a[i][2], frag_a[i][3],
                            tile_a + tile_offset<BK>(a_row + i * 16, kk * 2 + a_chunk));
            }
#pragma unroll
            for (int j = 0; j < kNi / 2; ++j) {
                ldmatrix_x4(frag_b[2 * j][0], frag_b[2 * j][1], frag_b[2 * j + 1][0], frag_b[2 * j + 1][1],
                            tile_b + tile_offset<BK>(b_row + j * 16, kk * 2 + b_chunk));
            }
#pragma unroll
            for (int i = 0; i < kMi; ++i)
#pragma unroll
                for (int j = 0; j < kNi; ++j) mma_bf16_16816(acc[i][j], frag_a[i], frag_b[j]);
        }
    }
    // Only empty groups can still be pending; drain them so no cp.async outlives the CTA.
    cp_async_wait<0>();

    const Epilogue e = gemm_epilogue_of(p, blockIdx.z);
    // Fragment (i, j): c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at row g + 8; g = lane / 4, t = lane % 4.
    const int row_base = m0 + warp_m * kWarpM + (lane >> 2);
    const int col_base = n0 + warp_n * kWarpN + 2 * (lane & 3);
#pragma unroll
    for (int i = 0; i < kMi; ++i) {
        const int row = row_base + i * 16;
#pragma unroll
        for (int j = 0; j < kNi; ++j) {
            const int col = col_base + j * 8;
            if (col >= p.n) continue;
            if (row < p.m) epilogue_pair(e, row, col, acc[i][j][0], acc[i][j][1]);
            if (row + 8 < p.m) epilogue_pair(e, row + 8, col, acc[i][j][2], acc[i][j][3]);
        }
    }
}

}  // namespace

// Tile variants (the launcher picks by how many CTAs each gives for M x N), dynamic smem =
// STAGES * (BM + BN) * BK * 2 bytes: 64, 96, 48 and 40 KiB. (A 256x128x64 variant with 64x64 warp
// tiles, one CTA of 8 warps per SM, measured 0.6x of these on an H200 and was dropped.)
extern "C" __global__ void __launch_bounds__(256, 2) gemm_bf16_128x128(const GemmParams p) {
    grid_dependency_sync();
    gemm_tile<128, 128, 32, 2, 4, 4>(p);
}

// Same warp layout with 64-deep k-steps (half the barriers per FLOP), 3 stages = 96 KiB: two
// CTAs per SM on Hopper (228 KiB), one on sm_80 (164 KiB).
extern "C" __global__ void __launch_bounds__(256, 2) gemm_bf16_128x128_k64(const GemmParams p) {
    grid_dependency_sync();
    gemm_tile<128, 128, 64, 2, 4, 3>(p);
}

extern "C" __global__ void __launch_bounds__(128, 4) gemm_bf16_64x128(const GemmParams p) {
    grid_dependency_sync();
    gemm_tile<64, 128, 32, 2, 2, 4>(p);
}

// Small M (adaLN tables, t-MLP, batch-2 rows): 32-row tiles keep the W stream wide.
extern "C" __global__ void __launch_bounds__(128, 4) gemm_bf16_32x128(const GemmParams p) {
    grid_dependency_sync();
    gemm_tile<32, 128, 32, 1, 4, 4>(p);
}

// The epilogue over an f32 product acc = A @ W^T computed elsewhere (cuBLASLt, or the split-K
// slices, summed here in slice order); each thread handles column pairs of one row, grid-stride
// over M x ceil(N / 2).
extern "C" __global__ void __launch_bounds__(256) gemm_epilogue_f32(const GemmEpilogueParams p) {
    grid_dependency_sync();
    const Epilogue e{reinterpret_cast<const float*>(p.bias),
                     reinterpret_cast<void*>(p.out),
                     reinterpret_cast<__nv_bfloat16*>(p.cache),
                     reinterpret_cast<const float*>(p.gate),
                     p.m, p.n, p.ldo, p.ldc, p.ldg, p.rows_per_gate, p.epilogue};
    const float* acc = reinterpret_cast<const float*>(p.acc);
    const long long pairs_per_row = (p.n + 1) / 2;
    const long long total = static_cast<long long>(p.m) * pairs_per_row;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int row = static_cast<int>(i / pairs_per_row);
        const int col = static_cast<int>(i % pairs_per_row) * 2;
        const long long slice = static_cast<long long>(p.m) * p.ld_acc;
        const float* src = acc + static_cast<long long>(row) * p.ld_acc + col;
        const bool has1 = col + 1 < p.n;
        float v0 = 0.0f;
        float v1 = 0.0f;
        for (int s = 0; s < p.splits; ++s) {
            v0 += src[s * slice];
            if (has1) v1 += src[s * slice + 1];
        }
        epilogue_pair(e, row, col, v0, v1);
    }
}
