// Hopper (sm_90a) GEMM on warpgroup tensor-core instructions (wgmma.mma_async), the opt-in
// `GemmImpl::Wgmma` of src/cuda/gemm.rs, with the same contract and fused epilogues as gemm.cu:
//
//   out[M, N] = epilogue(A[M, K] @ W[N, K]^T + bias[N])
//
// A and W are bf16, row-major, K-contiguous ("K-major"), which is the operand order wgmma reads
// from shared memory without transposes. Requirements (checked by the launcher): K % 8 == 0,
// lda/ldw % 8 == 0, A/W 16-byte aligned; M and N arbitrary.
//
// Design: a CTA of WG consumer warpgroups (128 threads each) computes a (64 * WG) x BN tile, each
// warpgroup a 64 x BN slab with one wgmma m64nBNk16 per 16-deep k-step, accumulators in
// registers. Every thread also loads: 16-byte cp.async chunks into a STAGES-deep ring of
// BM x 64 (A) and BN x 64 (W) tiles. (No TMA and no producer warp: this could not be run while
// it was written, and the cp.async ring is the simplest pipeline to get right blind.)
//
// Shared-memory layout = the wgmma "128-byte swizzle, K-major" canonical layout: a 64-deep tile
// row is 128 bytes, 8 rows form a 1024-byte atom, and 16-byte chunk c of row r sits at chunk
// c ^ (r % 8). The hardware applies that XOR to address bits [4:6] from bits [7:9], so every
// tile starts on a 1024-byte boundary (the launcher adds 1 KiB of dynamic smem for the
// alignment). Descriptor: start address >> 4, leading byte offset 16 (unused for swizzled
// K-major), stride byte offset 1024 (between 8-row atoms), swizzle mode 1 (128 B). The k-step
// kk (16 elements = 32 bytes) of a row starts 32 * kk bytes further: add 2 * kk to the encoded
// start address; the swizzle is applied to the final address, so this stays correct.
//
// Pipeline (LOOKAHEAD = STAGES - 2 tiles in flight): iteration kt waits for its own copies of
// tile kt, fences them into the async proxy (wgmma reads shared memory through it, cp.async
// writes through the generic proxy), and meets the other threads at a barrier. Then it issues
// tile kt's wgmmas and commits them, issues the copies of tile kt + LOOKAHEAD into the slot of
// tile kt - 2 (their address arithmetic under the wgmmas), and waits until at most one wgmma
// group is pending. So when any thread passes the barrier of iteration kt, every warpgroup has
// finished the wgmmas of tile kt - 2 (it waited at the end of kt - 1), and overwriting that
// slot is safe, while tile kt - 1's wgmmas may still run.
//
// Split-K (gridDim.z > 1) and the epilogues are those of gemm.cu (gemm_epilogue.cuh). The
// accumulator fragment of wgmma m64nN is the mma.sync m16n8 one repeated: warp w of the
// warpgroup owns rows 16w .. 16w + 15; registers 4j .. 4j + 3 are (row g, cols 8j + 2t, +1)
// and (row g + 8, same cols), g = lane / 4, t = lane % 4.
//
// Other architectures (sm_80 SASS, compute_80 PTX) get a stub that traps: the launcher refuses
// this implementation on a device whose compute capability is not 9.x.

#include "common.cuh"
#include "gemm_epilogue.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kWgmmaBK = 64;  // k-depth of a tile: one 128-byte swizzle row of bf16

// Offset in bf16 elements of 16-byte chunk `chunk` (0..7) of `row` in a [rows][64] tile in the
// 128-byte-swizzled layout (the same permutation as gemm.cu's tile_offset<64>).
FORA_DEVICE int swizzle128_offset(int row, int chunk) {
    return row * kWgmmaBK + ((chunk ^ (row & 7)) << 3);
}

// One CTA: a (64 * WG) x BN tile of out (see the file comment).
template <int WG, int BN, int STAGES>
FORA_DEVICE void gemm_wgmma_tile(const GemmParams& p) {
    constexpr int BM = 64 * WG;
    constexpr int kThreads = 128 * WG;
    constexpr int kAcc = BN / 2;                 // f32 accumulators a thread
    constexpr int kRowChunks = kWgmmaBK / 8;     // 16-byte chunks per tile row
    constexpr int kStageA = BM * kWgmmaBK;       // bf16 elements of one A tile
    constexpr int kStageB = BN * kWgmmaBK;
    constexpr int kLookahead = STAGES - 2;
    static_assert(STAGES >= 3, "a slot is refilled two k-tiles after its wgmmas were issued");
    static_assert((BM * kRowChunks) % kThreads == 0 && (BN * kRowChunks) % kThreads == 0,
                  "tile loads must split evenly");
    static_assert((kStageA * 2) % 1024 == 0 && (kStageB * 2) % 1024 == 0,
                  "every tile must start on a 1024-byte swizzle atom");

    FORA_DYNAMIC_SMEM(uint4, gemm_wgmma_smem);
    // Round the dynamic smem base up to 1024 bytes (the launcher asked for 1 KiB extra).
    const uint32_t raw = smem_addr(gemm_wgmma_smem);
    const uint32_t align_pad = ((raw + 1023u) & ~1023u) - raw;
    __nv_bfloat16* smem_a =
        reinterpret_cast<__nv_bfloat16*>(reinterpret_cast<char*>(gemm_wgmma_smem) + align_pad);
    __nv_bfloat16* smem_b = smem_a + STAGES * kStageA;  // [STAGES][BN * 64]
    const uint32_t smem_a_addr = raw + align_pad;
    const uint32_t smem_b_addr = smem_a_addr + STAGES * kStageA * 2;

    const int tid = threadIdx.x;
    const int warpgroup = tid >> 7;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const __nv_bfloat16* a = reinterpret_cast<const __nv_bfloat16*>(p.a);
    const __nv_bfloat16* w = reinterpret_cast<const __nv_bfloat16*>(p.w);
    // This slice's k-tiles [kt_begin, kt_begin + k_tiles); a slice past the end gets none and
    // writes a zero partial.
    const int k_tiles_all = (p.k + kWgmmaBK - 1) / kWgmmaBK;
    const int k_per_slice = (k_tiles_all + gridDim.z - 1) / gridDim.z;
    const int kt_begin = min(k_tiles_all, static_cast<int>(blockIdx.z) * k_per_slice);
    const int k_tiles = min(k_tiles_all - kt_begin, k_per_slice);

    // Rows past M or N and chunks past K are zero-filled (src size 0) from the base pointer;
    // K % 8 == 0 makes every chunk wholly in or out.
    auto load_stage = [&](int slot, int k_tile) {
        const int k0 = (kt_begin + k_tile) * kWgmmaBK;
        __nv_bfloat16* dst_a = smem_a + slot * kStageA;
        __nv_bfloat16* dst_b = smem_b + slot * kStageB;
#pragma unroll
        for (int i = 0; i < BM * kRowChunks / kThreads; ++i) {
            const int c = tid + i * kThreads;
            const int row = c / kRowChunks;
            const int chunk = c % kRowChunks;
            const int gm = m0 + row;
            const int gk = k0 + chunk * 8;
            const bool in = gm < p.m && gk < p.k;
            const __nv_bfloat16* src = in ? a + static_cast<long long>(gm) * p.lda + gk : a;
            cp_async_16(dst_a + swizzle128_offset(row, chunk), src, in ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < BN * kRowChunks / kThreads; ++i) {
            const int c = tid + i * kThreads;
            const int row = c / kRowChunks;
            const int chunk = c % kRowChunks;
            const int gn = n0 + row;
            const int gk = k0 + chunk * 8;
            const bool in = gn < p.n && gk < p.k;
            const __nv_bfloat16* src = in ? w + static_cast<long long>(gn) * p.ldw + gk : w;
            cp_async_16(dst_b + swizzle128_offset(row, chunk), src, in ? 16 : 0);
        }
    };

    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;

    // Prologue: LOOKAHEAD tiles in flight. Every iteration commits exactly one cp.async group
    // (maybe empty), so group g holds k-tile g and, at iteration kt, LOOKAHEAD + kt groups are
    // committed: waiting until LOOKAHEAD - 1 are pending means tile kt landed.
#pragma unroll
    for (int s = 0; s < kLookahead; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kLookahead - 1>();
        fence_proxy_async_shared();
        __syncthreads();
        const int slot = kt % STAGES;
        // This warpgroup's 64 rows of A; all BN rows of W. Each k-step is 32 bytes further.
        const uint64_t desc_a =
            wgmma_desc_sw128(smem_a_addr + (slot * kStageA + warpgroup * 64 * kWgmmaBK) * 2);
        const uint64_t desc_b = wgmma_desc_sw128(smem_b_addr + slot * kStageB * 2);
        pin_accumulators(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kWgmmaBK / 16; ++kk) {
            wgmma_m64k16<BN>(acc, desc_a + 2 * kk, desc_b + 2 * kk);
        }
        wgmma_commit();
        // The refill after the wgmmas, so that its address arithmetic runs under them.
        const int next = kt + kLookahead;
        if (next < k_tiles) load_stage(next % STAGES, next);
        cp_async_commit();
        wgmma_wait<1>();
        pin_accumulators(acc);
    }
    wgmma_wait<0>();
    pin_accumulators(acc);
    // Only empty groups can still be pending; drain them so no cp.async outlives the CTA.
    cp_async_wait<0>();

    const Epilogue e = gemm_epilogue_of(p, blockIdx.z);
    const int lane = tid & 31;
    const int warp_in_group = (tid >> 5) & 3;
    const int row = m0 + warpgroup * 64 + warp_in_group * 16 + (lane >> 2);
    const int col_base = n0 + 2 * (lane & 3);
    epilogue_fragments<BN / 8>(e, row, col_base, acc, m0 + BM <= p.m && n0 + BN <= p.n);
}

// ---- the warp-specialized TMA kernel (gemm_tma_128x<BN>) ------------------------------------
//
// The Hopper GEMM design of CUTLASS's warp-specialized kernels and FlashAttention 3, written for
// our contract and epilogues: a CTA of three warpgroups. Warpgroup 0 is the producer: one thread
// issues TMA copies of 128 x 64 A tiles and BN x 64 W tiles into a STAGES-deep ring of shared
// memory (the tensor maps' 128-byte swizzle is the wgmma K-major canonical layout above) and
// gives most of its registers back. Warpgroups 1 and 2 are consumers: each owns 64 rows of the
// 128 x BN output tile (or, in the ping-pong kernel, whole tiles in turn; see gemm_tma_tile),
// runs wgmma m64nBNk16 over the ring and applies the epilogue from its accumulators. Two
// mbarriers a slot pace the ring: `full` (1 arrival: the producer's, with the tile's byte count;
// its phase ends when the TMA has delivered them) and `empty` (one arrival per warp that reads
// the slot, once its wgmmas are done: 8, or 4 in ping-pong). Rows past M, columns past N and
// k past K arrive as zeros from the TMA, so the mainloop has no bounds checks.
//
// The grid is persistent (one CTA per SM, at most one per work unit): CTA b takes units b,
// b + gridDim.x, ... and both roles walk the same sequence, so the producer streams the next
// unit's tiles while the consumers are still in this unit's epilogue. A unit is (split-K slice,
// M tile, N tile), N fastest: the CTAs of a wave share A rows and reread W from L2.
//
// Ring position `it` counts k-tiles over all of a CTA's units: slot it % STAGES, phase parity
// (it / STAGES) & 1. The producer waits for `empty` of the previous use of the slot (parity
// flipped: on a fresh barrier that wait returns at once). A consumer keeps one wgmma group in
// flight: after committing k-tile it, waiting until one group is pending means k-tile it - 1's
// wgmmas are done, so its slot is released then (and the last one after the final wait).

// A work unit: output tile origin, split-K slice and its k-tiles [kt_begin, kt_begin + k_tiles).
struct TmaUnit {
    int m0, n0, slice, kt_begin, k_tiles;
};

// Work units of a CM x CN cluster: a block of CM x CN tiles, CM vertically adjacent M tiles by
// CN adjacent N tiles, of one split-K slice. The cluster's CTA of rank r takes the tile at
// (r % CM, r / CM) of the block: the CTAs of a column (same N tile) share W's tile, those of a
// row (same M tile) A's. Past the last M tile (a count not a multiple of CM) a CTA computes a
// tile of zero rows, and past the last N tile one of zero columns: its producer still loads and
// multicasts its share of the operands, its epilogue writes nothing, so the cluster's pipelines
// stay in step.
template <int BM, int BN, int CM, int CN>
FORA_DEVICE int tma_units(const GemmTmaParams& params) {
    const GemmParams& p = params.gemm;
    const int tiles_m = (p.m + BM * CM - 1) / (BM * CM);
    const int tiles_n = (p.n + BN * CN - 1) / (BN * CN);
    return tiles_m * tiles_n * params.splits;
}

//
// Cluster split-K (KS > 1 CTAs along K, `gemm_tma_k<KS>_*`): the KS CTAs of a cluster take the
// same unit, the CTA of k-rank r the r-th of KS near-equal runs of the unit's k-tiles (the last
// runs may be short or empty); `rank` is then the CTA's place in the CM x CN block.
template <int BM, int BN, int CM, int CN, int KS = 1>
FORA_DEVICE TmaUnit tma_unit(const GemmTmaParams& params, int u, int rank, int k_rank = 0) {
    const GemmParams& p = params.gemm;
    const int tiles_n = (p.n + BN * CN - 1) / (BN * CN);
    const int tiles_m = (p.m + BM * CM - 1) / (BM * CM);
    const int k_tiles_all = (p.k + kWgmmaBK - 1) / kWgmmaBK;
    const int k_per_slice = (k_tiles_all + params.splits - 1) / params.splits;
    TmaUnit w;
    w.n0 = ((u % tiles_n) * CN + rank / CM) * BN;
    w.m0 = (((u / tiles_n) % tiles_m) * CM + rank % CM) * BM;
    w.slice = u / tiles_n / tiles_m;
    w.kt_begin = min(k_tiles_all, w.slice * k_per_slice);
    w.k_tiles = min(k_tiles_all - w.kt_begin, k_per_slice);
    if (KS > 1) {
        const int run = (w.k_tiles + KS - 1) / KS;
        const int skip = min(w.k_tiles, k_rank * run);
        w.kt_begin += skip;
        w.k_tiles = min(w.k_tiles - skip, run);
    }
    return w;
}

// ---- the staged epilogue (STAGED tiles, `gemm_tma_st_*`) ------------------------------------
//
// The register epilogue (epilogue_fragments) is straight-line code: every column pair of every
// fragment unrolled, for each epilogue kind and bounds case (12-25 thousand SASS instructions a
// kernel). Session 19's ncu of the 256 x 128 tile at 256 rows put a third of its warp samples in
// that code, mostly stall_no_inst: the instruction fetch cannot keep up with code run once per
// tile. The staged epilogue instead has each consumer warp write its 16 accumulator rows, 128
// (or, 192 wide, 96) columns at a time, to shared memory (the stage ring slots of the unit's
// last k-tiles, which the consumers hold back from the producer until then) and apply the
// epilogue from there in a rolled loop, a row of those columns at a time: a few hundred
// instructions, four contiguous columns a lane, so each row's stores are whole segments. The
// same maths as epilogue_pair, in the same order (identical results).

// Float index of column c of row r in a warp's 16 x CP f32 staging area (CP = 128 or 96, a
// multiple of 32 floats, so every row starts on bank 0): 8-float groups XORed with the row's
// low two bits (within the row's 32-float block), so the fragment stores (8 bytes, rows g and
// g + 8 of the mma layout, half a warp a phase) and the row loads (16 bytes, a quarter warp a
// phase) hit 32 distinct banks.
template <int CP>
FORA_DEVICE int staged_index(int r, int c) {
    return r * CP + (c ^ ((r & 3) << 3));
}

// One row's four columns col .. col + 3 of the epilogue, from the product a (no bias). VEC: the
// four are inside the output and every access is aligned for 16-byte (f32) or 8-byte (bf16)
// vectors; bias4, gate and res were loaded (bias4 zero without a bias). Otherwise column pairs
// through epilogue_pair, which checks N and adds the bias itself (the caller checks the row).
FORA_DEVICE void staged_quad(const Epilogue& e, int rr, int col, float4 a, bool vec, float4 bias4, float4 gate,
                             float4 res) {
    if (!vec) {
        epilogue_pair(e, rr, col, a.x, a.y);
        if (col + 2 < e.n) epilogue_pair(e, rr, col + 2, a.z, a.w);
        return;
    }
    float v0 = a.x, v1 = a.y, v2 = a.z, v3 = a.w;
    if (e.bias != nullptr) {
        v0 += bias4.x;
        v1 += bias4.y;
        v2 += bias4.z;
        v3 += bias4.w;
    }
    const long long o = static_cast<long long>(rr) * e.ldo + col;
    if (e.kind == FORA_EPI_BIAS_BF16 || e.kind == FORA_EPI_BIAS_GELU_BF16) {
        if (e.kind == FORA_EPI_BIAS_GELU_BF16) {
            v0 = gelu_tanh(v0);
            v1 = gelu_tanh(v1);
            v2 = gelu_tanh(v2);
            v3 = gelu_tanh(v3);
        }
        *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(e.out) + o) =
            make_uint2(pack_bf16x2(v0, v1), pack_bf16x2(v2, v3));
    } else if (e.kind == FORA_EPI_BIAS_F32) {
        *reinterpret_cast<float4*>(static_cast<float*>(e.out) + o) = make_float4(v0, v1, v2, v3);
    } else {  // FORA_EPI_BIAS_GATE_RESIDUAL
        if (e.cache != nullptr) {
            *reinterpret_cast<uint2*>(e.cache + static_cast<long long>(rr) * e.ldc + col) =
                make_uint2(pack_bf16x2(v0, v1), pack_bf16x2(v2, v3));
        }
        res.x += gate.x * v0;
        res.y += gate.y * v1;
        res.z += gate.z * v2;
        res.w += gate.w * v3;
        *reinterpret_cast<float4*>(static_cast<float*>(e.out) + o) = res;
    }
}

// Whether a staged epilogue may use vectors throughout: a whole tile, leading dimensions that
// keep every row's quads aligned, and aligned bases (the model's buffers always are).
FORA_DEVICE bool staged_vectors(const Epilogue& e, bool whole_tile) {
    auto aligned = [](const void* q, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(q) & (bytes - 1)) == 0; };
    return whole_tile && (e.ldo & 3) == 0 && aligned(e.out, 16) &&
           (e.cache == nullptr || ((e.ldc & 3) == 0 && aligned(e.cache, 8))) &&
           (e.bias == nullptr || aligned(e.bias, 16)) &&
           (e.kind != FORA_EPI_BIAS_GATE_RESIDUAL || ((e.ldg & 3) == 0 && aligned(e.gate, 16)));
}

// Writes NJ accumulator fragments of a warp's 16 rows (8 columns each, from `acc`: a thread's
// four values a fragment, rows g and g + 8 of the mma layout) to the first 8 NJ columns of its
// 16 x CP f32 staging area `stage` (staged_index's layout).
template <int CP, int NJ>
FORA_DEVICE void stage_fragments(float* stage, const float* acc) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        const int c = 8 * j + 2 * t;
        st_shared_for_async_proxy(stage + staged_index<CP>(g, c), make_float2(acc[4 * j], acc[4 * j + 1]));
        st_shared_for_async_proxy(stage + staged_index<CP>(g + 8, c), make_float2(acc[4 * j + 2], acc[4 * j + 3]));
    }
}

// Columns a staged pass covers for a tile BN wide: 128 (a lane's four of every row), or 96 for
// BN = 192 (two passes, lanes 24 .. 31 idle in the row loop).
template <int BN>
__host__ __device__ constexpr int staged_pass_columns() {
    return BN % 128 == 0 ? 128 : 96;
}

// The staged epilogue of one consumer warp: its 16 rows (row0 .. row0 + 15 of block b, blocks 64
// rows apart) by the tile's BN columns from n0, for each of its ROWBLOCKS accumulator blocks,
// in passes of CP columns through its 16 x CP f32 `stage` (a generic pointer into shared
// memory). whole_tile as for epilogue_fragments. The caller fences the async proxy and frees the
// slots afterwards.
template <int ROWBLOCKS, int BN>
FORA_DEVICE void staged_epilogue(const Epilogue& e, float* stage, const float (&acc)[ROWBLOCKS][BN / 2], int row0,
                                 int n0, bool whole_tile) {
    constexpr int CP = staged_pass_columns<BN>();
    constexpr int kFragments = CP / 8;  // accumulator fragments (8 columns each) a pass
    static_assert(BN % CP == 0, "whole passes");
    const int lane = threadIdx.x & 31;
    const bool active = lane < CP / 4;  // lanes with four columns of the pass
    const bool gated = e.kind == FORA_EPI_BIAS_GATE_RESIDUAL;
    const bool vec = staged_vectors(e, whole_tile);
#pragma unroll
    for (int pass = 0; pass < ROWBLOCKS * (BN / CP); ++pass) {
        const int b = pass / (BN / CP);  // accumulator block
        const int j0 = (pass % (BN / CP)) * kFragments;
        const int col = n0 + 8 * j0 + 4 * lane;  // this lane's four columns of every row
        __syncwarp();  // the previous pass's row loads are done before its area is rewritten
        stage_fragments<CP, kFragments>(stage, acc[b] + 4 * j0);
        __syncwarp();
        if (!active) continue;
        float4 bias4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (vec && e.bias != nullptr) bias4 = *reinterpret_cast<const float4*>(e.bias + col);
        const int rows = row0 + 64 * b;
        // Four rows a round. The gated residual's loads (gates, residuals) are a round ahead:
        // round r + 1's are issued before round r's stores, so the rounds' memory round trips
        // overlap instead of following one another (the compiler may not move a load above a
        // store it cannot prove disjoint; here the order is written out).
        float4 gate[4], res[4];
        auto load_round = [&](int r0, float4 (&g)[4], float4 (&x)[4]) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int rr = rows + r0 + i;
                g[i] = x[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (vec && gated) {
                    g[i] = *reinterpret_cast<const float4*>(e.gate + static_cast<long long>(rr / e.rows_per_gate) * e.ldg +
                                                            col);
                    x[i] = *reinterpret_cast<const float4*>(static_cast<const float*>(e.out) +
                                                            static_cast<long long>(rr) * e.ldo + col);
                }
            }
        };
        load_round(0, gate, res);
#pragma unroll 1
        for (int r0 = 0; r0 < 16; r0 += 4) {
            float4 a[4], next_gate[4], next_res[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a[i] = ld_shared_for_async_proxy<float4>(stage + staged_index<CP>(r0 + i, 4 * lane));
            }
            if (r0 + 4 < 16) load_round(r0 + 4, next_gate, next_res);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int rr = rows + r0 + i;
                if (vec || (rr < e.m && col < e.n)) staged_quad(e, rr, col, a[i], vec, bias4, gate[i], res[i]);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                gate[i] = next_gate[i];
                res[i] = next_res[i];
            }
        }
    }
}

// ---- the cluster split-K reduction (KS > 1, `gemm_tma_k<KS>_128x128`) --------------------
//
// At M = 512 (one image + CFG) a 1152-wide product has 36 tiles of 128 x 128 for 132 SMs, each
// a long chain of k-tiles on one SM. Split-K over a workspace fills the SMs but costs an
// epilogue kernel and an f32 round trip through memory. Here the KS CTAs of a cluster split the
// unit's k-tiles instead and sum their accumulators through distributed shared memory: each
// consumer warp writes its 16 x 128 f32 (8 KiB of a 64 KiB area of its own, outside the ring)
// and arrives on the `staged` barrier of that warp in every CTA of the cluster; once its own
// `staged` phase ends (the same warp of all KS CTAs has written), it reads rows k_rank,
// k_rank + KS, ... of the 16 from all KS areas (ld.shared::cluster), sums them in rank order
// (every row's sum in the same order whichever CTA makes it) and applies the epilogue to those
// rows, a lane four columns as in the staged epilogue. It then arrives on the `drained` barrier
// of the warp in every CTA; a warp writes its area for its next unit only after its own
// `drained` phase of the last one ended (every reader is done), and the kernel's final cluster
// barrier keeps a CTA's shared memory alive until its peers are done reading it. `phase`
// counts the warp's units. The `staged` arrivals release and its waits acquire at cluster
// scope (the hand-over of plain shared-memory data between CTAs; one GPU-scope memory barrier
// a warp and unit, before which the consumer has issued no global access in this unit). The
// `drained` arrivals release at cluster scope too: every value read is consumed by the
// epilogue's stores before the arrival, but only a release orders the peers' reads before the
// owner's next writes of its area under the PTX memory model (a plain remote arrive is a
// CTA-scope release, which a waiter in another CTA does not pair with). Its memory barrier
// waits for this unit's stores; with one unit a CTA (M = 512) the kernel's closing cluster
// barrier would wait for them anyway.
template <int KS>
FORA_DEVICE void cluster_reduced_epilogue(const Epilogue& e, const float (&acc)[64], float* area, uint32_t area_addr,
                                          uint32_t staged_bar, uint32_t drained_bar, uint32_t phase, int k_rank,
                                          int row0, int n0, bool whole_tile) {
    const int lane = threadIdx.x & 31;
    mbarrier_wait_acquire_cluster(drained_bar, (phase & 1u) ^ 1u);
    stage_fragments<128, 16>(area, acc);
    __syncwarp();
    if (lane < KS) mbarrier_arrive_release_cluster(mapa_shared(staged_bar, static_cast<uint32_t>(lane)));
    uint32_t areas[KS];
#pragma unroll
    for (int s = 0; s < KS; ++s) areas[s] = mapa_shared(area_addr, static_cast<uint32_t>(s));
    mbarrier_wait_acquire_cluster(staged_bar, phase & 1u);
    const bool vec = staged_vectors(e, whole_tile);
    const bool gated = e.kind == FORA_EPI_BIAS_GATE_RESIDUAL;
    const int col = n0 + 4 * lane;
    float4 bias4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (vec && e.bias != nullptr) bias4 = *reinterpret_cast<const float4*>(e.bias + col);
    // A row's loads (its KS slices from distributed shared memory, the gated residual's gate
    // and residual from global memory) are issued a row ahead, before the row before is summed
    // and stored, so two rows' round trips overlap in a rolled loop (straight-line code for
    // every row would be fetched cold, the register epilogue's stall).
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float4 parts[KS], gate = zero, res = zero;
    auto load_row = [&](int r, float4 (&into)[KS], float4& g, float4& x) {
        const uint32_t offset = 4u * static_cast<uint32_t>(staged_index<128>(r, 4 * lane));
#pragma unroll
        for (int s = 0; s < KS; ++s) into[s] = ld_shared_cluster_f32x4(areas[s] + offset);
        const int rr = row0 + r;
        if (vec && gated) {
            g = *reinterpret_cast<const float4*>(e.gate + static_cast<long long>(rr / e.rows_per_gate) * e.ldg + col);
            x = *reinterpret_cast<const float4*>(static_cast<const float*>(e.out) + static_cast<long long>(rr) * e.ldo +
                                                 col);
        }
    };
    load_row(k_rank, parts, gate, res);
#pragma unroll 1
    for (int r = k_rank; r < 16; r += KS) {
        float4 next[KS], next_gate = zero, next_res = zero;
#pragma unroll
        for (int s = 0; s < KS; ++s) next[s] = zero;
        if (r + KS < 16) load_row(r + KS, next, next_gate, next_res);
        float4 a = parts[0];
#pragma unroll
        for (int s = 1; s < KS; ++s) {
            a.x += parts[s].x;
            a.y += parts[s].y;
            a.z += parts[s].z;
            a.w += parts[s].w;
        }
        const int rr = row0 + r;
        if (vec || (rr < e.m && col < e.n)) staged_quad(e, rr, col, a, vec, bias4, gate, res);
#pragma unroll
        for (int s = 0; s < KS; ++s) parts[s] = next[s];
        gate = next_gate;
        res = next_res;
    }
    __syncwarp();
    if (lane < KS) mbarrier_arrive_release_cluster(mapa_shared(drained_bar, static_cast<uint32_t>(lane)));
}

// PINGPONG = false ("cooperative"): both consumer warpgroups work on every unit, 64 rows each.
// PINGPONG = true: the consumers take the CTA's units in turn, each a whole 128-row tile (two
// m64 wgmmas a k-step, 2 x BN / 2 accumulators a thread), so one's epilogue runs while the other
// computes. A consumer starts unit i's mainloop only once the other has waited for every k-tile
// of unit i - 1 (the `order` barriers, one a consumer, 4 arrivals: a warp's lane 0 each): the
// `full` barriers are then at most one phase behind the k-tiles it waits for, which their parity
// needs (waiting for a phase two ahead would pass at once, on stale data).
//
// Clusters (the kernel is compiled with __cluster_dims__(CM * CN, 1, 1)): the CTA at (i, j) of
// its cluster's CM x CN block of tiles (rank i + CM j, tma_unit) shares the W tile with the CM
// CTAs of column j and the A tile with the CN CTAs of row i. Its producer loads slice j of the
// A tile (128 / CN rows) multicast into its row, and slice i of the W tile (BN / CM rows)
// multicast into its column (same slot, same `full` barrier byte), so a CTA reads 128 / CN +
// BN / CM rows from L2 a k-step instead of 128 + BN (the L2-bandwidth bound of bench's
// `l2_tile_rooflines`). A slot is refilled by the producers of the CTA's row and column, so a
// producer may refill it only once the consumers of every CTA it writes into are done with it:
// its `empty` barrier counts the consumer warps of its row and column (CM + CN - 1 CTAs), and
// each consumer warp arrives on its own CTA's and, through mapa, on those of its row and
// column. Each `full` expects the whole tile's bytes (most of them delivered by peers, possibly
// before this CTA's producer announced them: the transaction count may run negative within a
// phase). Every CTA of a cluster walks the same units and k-tiles, so their rings stay in step
// (in ping-pong, the same consumer of every CTA reads a unit's slots, and its 4 warps a CTA
// free them); a cluster barrier after the barriers' initialization (before any multicast or
// remote arrival) and one at the end (no CTA exits while a peer may still arrive on its
// barriers or multicast into it) bracket the kernel, and every thread, the producer's too,
// takes part in both.
//
// STAGED (the `gemm_tma_st_*` kernels): the staged epilogue above. A consumer keeps the slots of
// its unit's last kHeld k-tiles (two cooperatively, one in ping-pong: 64 or 32 KiB, 8 KiB for
// each of its warps) from the producer until its epilogue is done, staging its accumulators in
// them; a unit of fewer k-tiles takes the register epilogue. The warps that read a unit's slots
// (cooperatively both consumers) meet on an mbarrier before any of them stages.
//
// KS > 1: clusters of KS CTAs along K (cluster_reduced_epilogue above), cooperative 128 x 128
// tiles without multicast; rank = the CTA's k-rank.
template <int BM, int BN, int STAGES, bool PINGPONG, int CM, int CN, bool STAGED = false, int KS = 1>
FORA_DEVICE void gemm_tma_tile(const GemmTmaParams& params) {
    static_assert((CM == 1 || CM == 2 || CM == 4) && (CN == 1 || CN == 2), "clusters of 1 .. 8 CTAs");
    static_assert(!STAGED || ((BN == 128 || BN == 192) && CM == 1 && CN == 1),
                  "the staged epilogue is written for 128- and 192-wide tiles without clusters");
    static_assert(BM == 128 || (BM == 256 && !PINGPONG && CM == 1 && CN == 1),
                  "256-row tiles are cooperative and clusterless");
    static_assert(KS >= 1 && KS <= 4 && (KS == 1 || (BM == 128 && BN == 128 && !PINGPONG && !STAGED && CM == 1 && CN == 1)),
                  "cluster split-K: cooperative 128 x 128 tiles without multicast, 2 to 4 CTAs");
    constexpr int kCluster = CM * CN * KS;
    // m64 blocks a consumer computes per unit: two (a whole 128-row tile) in ping-pong, its
    // half of the tile's BM / 64 blocks cooperatively.
    constexpr int kRowBlocks = PINGPONG ? 2 : BM / 128;
    constexpr int kAcc = BN / 2;
    constexpr int kHeld = STAGED ? (PINGPONG ? 1 : 2) : 0;  // slots a consumer stages in
    constexpr uint32_t kStageA = BM * kWgmmaBK * 2;  // bytes of one A tile
    constexpr uint32_t kStageB = BN * kWgmmaBK * 2;
    constexpr uint32_t kSliceA = kStageA / CN;  // the part of the A tile a producer loads
    constexpr uint32_t kSliceB = kStageB / CM;  // the part of the W tile a producer loads
    // CTAs whose producers write into this CTA's slots (and into which its producer writes):
    // its row and its column of the cluster, itself once.
    constexpr int kPeers = CM + CN - 1;
    // Arrivals that free a slot: every warp of the consumers that read it, in every CTA that
    // the slot's producer fills.
    constexpr int kEmptyArrivals = (PINGPONG ? 4 : 8) * kPeers;
    static_assert(kStageA % 1024 == 0 && kSliceA % 1024 == 0 && kSliceB % 1024 == 0,
                  "every tile (and multicast slice) must start on a 1024-byte swizzle atom");
    const GemmParams& p = params.gemm;

    // Dynamic smem (the launcher adds 1 KiB to round the base up to 1024 bytes):
    // [STAGES] A tiles | [STAGES] W tiles | KS > 1: the reduction area | STAGES full barriers |
    // STAGES empty barriers | 2 order barriers (ping-pong only) | STAGED: 2 meeting barriers |
    // KS > 1: 8 `staged` and 8 `drained` barriers (one each a consumer warp).
    constexpr uint32_t kReduceBytes = KS > 1 ? 8u * 16u * BN * 4u : 0u;
    FORA_DYNAMIC_SMEM(uint4, gemm_tma_smem);
    const uint32_t raw = smem_addr(gemm_tma_smem);
    const uint32_t smem_a = (raw + 1023u) & ~1023u;
    const uint32_t smem_b = smem_a + STAGES * kStageA;
    const uint32_t reduce_area = smem_b + STAGES * kStageB;
    const uint32_t full = reduce_area + kReduceBytes;
    const uint32_t empty = full + STAGES * 8;
    const uint32_t order = empty + STAGES * 8;  // order + 8 c: consumer c may start its next unit
    // STAGED: the warps that read a unit's slots meet on `meet` before any stages in them (both
    // consumers on meet cooperatively, consumer c's four warps on meet + 8 c in ping-pong).
    const uint32_t meet = order + 16;
    const uint32_t reduce_bars = meet + (STAGED ? 16 : 0);

    const int tid = threadIdx.x;
    const int warpgroup = tid >> 7;
    const int cluster_rank = kCluster > 1 ? static_cast<int>(cluster_ctarank()) : 0;
    const int rank = cluster_rank % (CM * CN);  // place in the CM x CN block
    const int k_rank = cluster_rank / (CM * CN);
    const int cluster_row = rank % CM, cluster_col = rank / CM;
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(full + 8 * s, 1);
            mbarrier_init(empty + 8 * s, kEmptyArrivals);
        }
        if (PINGPONG) {
            mbarrier_init(order, 4);
            mbarrier_init(order + 8, 4);
        }
        if (STAGED) {
            mbarrier_init(meet, PINGPONG ? 4 : 8);
            mbarrier_init(meet + 8, 4);
        }
        if (KS > 1) {
            for (int b = 0; b < 16; ++b) mbarrier_init(reduce_bars + 8 * b, KS);
        }
        fence_mbarrier_init();
    }
    // Cluster split-K (no multicast): nothing reaches another CTA before the reduction, so the
    // cluster barrier that makes the peers' barriers ready is split around the mainloop (its
    // wait before the first `staged` arrival, peers_ready) and the CTA's own barriers only need
    // the block's.
    bool peers_ready = KS == 1;
    if (KS > 1) {
        __syncthreads();
        cluster_arrive_relaxed();
    } else if (kCluster > 1) {
        cluster_sync();
    } else {
        __syncthreads();
    }

    const int units = tma_units<BM, BN, CM, CN>(params);
    const int first = static_cast<int>(blockIdx.x) / kCluster;
    const int stride = static_cast<int>(gridDim.x) / kCluster;

    if (warpgroup == 0) {
        setmaxnreg_dec<40>();
        if (tid == 0) {
            tma_prefetch_descriptor(&params.a_map);
            tma_prefetch_descriptor(&params.w_map);
            // Multicast masks: the CTAs of this one's row (ranks cluster_row + CM j) take its
            // A slice, those of its column (ranks CM cluster_col + i) its W slice.
            uint16_t row_mask = 0, col_mask = 0;
            for (int j = 0; j < CN; ++j) row_mask |= static_cast<uint16_t>(1u << (cluster_row + CM * j));
            for (int i = 0; i < CM; ++i) col_mask |= static_cast<uint16_t>(1u << (CM * cluster_col + i));
            // One slice into `dst` (for the `full` barrier of `slot`): rows from `row` of `map`,
            // k from k-tile kt of unit w; multicast to `mask` if `peers`. A slice wholly past its
            // tensor's `rows` (a zero-row tile, or the last rows of a partial one) reads the
            // first rows instead: an output row depends only on the same row of A (a column only
            // on the same row of W), those rows and columns are never stored, and no box lies
            // wholly outside its tensor.
            auto load = [&](const TmaDescriptor* map, uint32_t dst, const TmaUnit& w, int kt, int row, int rows,
                            bool peers, uint16_t mask, uint32_t slot) {
                const int k0 = (w.kt_begin + kt) * kWgmmaBK;
                if (!peers) {
                    tma_load_2d(dst, map, k0, row < rows ? row : 0, full + 8 * slot);
                } else {
                    tma_load_2d_multicast(dst, map, k0, row < rows ? row : 0, full + 8 * slot, mask);
                }
            };
            // This CTA's slice of k-tile kt of unit w's W tile (down its cluster column), and of
            // its A tile (along its cluster row), into ring slot `slot`.
            auto load_w = [&](const TmaUnit& w, int kt, uint32_t slot) {
                load(&params.w_map, smem_b + slot * kStageB + cluster_row * kSliceB, w, kt,
                     w.n0 + cluster_row * (BN / CM), p.n, CM > 1, col_mask, slot);
            };
            auto load_a = [&](const TmaUnit& w, int kt, uint32_t slot) {
                load(&params.a_map, smem_a + slot * kStageA + cluster_col * kSliceA, w, kt,
                     w.m0 + cluster_col * (BM / CN), p.m, CN > 1, row_mask, slot);
            };
            // Launched early (FORA_PDL), the kernel before may still be writing A, but no kernel
            // writes W: the first unit's first k-tiles (a fresh ring: their slots are free) get
            // their W slices before the wait, overlapping that kernel's end, and their A slices
            // after it; the main loop takes over from there.
            const TmaUnit first_unit = tma_unit<BM, BN, CM, CN, KS>(params, first, rank, k_rank);
            const int early = first < units ? min(STAGES, first_unit.k_tiles) : 0;
#pragma unroll 1
            for (int kt = 0; kt < early; ++kt) {
                mbarrier_arrive_expect_tx(full + 8 * kt, kStageA + kStageB);
                load_w(first_unit, kt, static_cast<uint32_t>(kt));
            }
            grid_dependency_wait();
            grid_launch_dependents();
#pragma unroll 1
            for (int kt = 0; kt < early; ++kt) load_a(first_unit, kt, static_cast<uint32_t>(kt));
            uint32_t it = static_cast<uint32_t>(early);
            for (int u = first; u < units; u += stride) {
                const TmaUnit w = tma_unit<BM, BN, CM, CN, KS>(params, u, rank, k_rank);
                for (int kt = u == first ? early : 0; kt < w.k_tiles; ++kt, ++it) {
                    const uint32_t slot = it % STAGES;
                    const uint32_t parity = (it / STAGES) & 1u;
                    mbarrier_wait(empty + 8 * slot, parity ^ 1u);
                    mbarrier_arrive_expect_tx(full + 8 * slot, kStageA + kStageB);
                    load_a(w, kt, slot);
                    load_w(w, kt, slot);
                }
            }
        }
    } else {
        setmaxnreg_inc<232>();
        // The epilogue reads and writes what earlier kernels use.
        grid_dependency_wait();
        grid_launch_dependents();
        const int consumer = warpgroup - 1;
        const int lane = tid & 31;
        const int warp_in_group = (tid >> 5) & 3;
        // The `empty` barriers this warp frees a slot on: lane 0 its own CTA's; lanes 1 ..
        // kPeers - 1 (through mapa) those of the other CTAs of its row and column, whose
        // producers multicast into this CTA.
        uint32_t peer_empty = 0;
        if (kCluster > 1 && lane > 0 && lane < kPeers) {
            // Lanes 1 .. CM - 1: the rest of the column; then the rest of the row.
            const int peer = lane < CM ? CM * cluster_col + (cluster_row + lane) % CM
                                       : cluster_row + CM * ((cluster_col + lane - CM + 1) % CN);
            peer_empty = mapa_shared(empty, static_cast<uint32_t>(peer));
        }
        // A warp has finished reading `slot`: one arrival on its `empty` in each of those CTAs.
        auto release = [&](uint32_t slot) {
            if (lane == 0) {
                mbarrier_arrive(empty + 8 * slot);
            } else if (kCluster > 1 && lane < kPeers) {
                mbarrier_arrive_cluster(peer_empty + 8 * slot);
            }
        };
        // The m64 blocks of the tile this consumer covers: b (ping-pong), or its half's
        // consumer * kRowBlocks + b (cooperative).
        const int row_block0 = PINGPONG ? 0 : consumer * kRowBlocks;
        uint32_t it = 0;
        float acc[kRowBlocks][kAcc];
        int local = 0;  // the CTA's units in order: pingpong consumers take every other one
        int mine = 0;   // ping-pong: units this consumer has computed
        uint32_t staged_units = 0;  // STAGED: units this consumer staged (its `meet` phase)
        uint32_t reduced_units = 0;  // KS > 1: units this warp summed (its barriers' phase)
        for (int u = first; u < units; u += stride, ++local) {
            const TmaUnit w = tma_unit<BM, BN, CM, CN, KS>(params, u, rank, k_rank);
            if (PINGPONG && (local & 1) != consumer) {
                it += static_cast<uint32_t>(w.k_tiles);  // the other consumer's k-tiles
                continue;
            }
            if (PINGPONG && local > 0) {
                // The other consumer's signal after unit local - 1: its (mine + 1)-th for consumer 1
                // (after units 0, 2, ...), its mine-th for consumer 0 (after units 1, 3, ...).
                mbarrier_wait(order + 8 * consumer, static_cast<uint32_t>(consumer == 1 ? mine : mine - 1) & 1u);
            }
            // The staged epilogue needs kHeld k-tiles' slots to stage in.
            const bool staged = STAGED && w.k_tiles >= kHeld;
#pragma unroll
            for (int b = 0; b < kRowBlocks; ++b) {
#pragma unroll
                for (int i = 0; i < kAcc; ++i) acc[b][i] = 0.0f;
            }
            for (int kt = 0; kt < w.k_tiles; ++kt, ++it) {
                const uint32_t slot = it % STAGES;
                mbarrier_wait(full + 8 * slot, (it / STAGES) & 1u);
                const uint64_t desc_b = wgmma_desc_sw128(smem_b + slot * kStageB);
#pragma unroll
                for (int b = 0; b < kRowBlocks; ++b) pin_accumulators(acc[b]);
                wgmma_fence();
#pragma unroll
                for (int b = 0; b < kRowBlocks; ++b) {
                    const uint64_t desc_a =
                        wgmma_desc_sw128(smem_a + slot * kStageA + (row_block0 + b) * 64 * kWgmmaBK * 2);
#pragma unroll
                    for (int kk = 0; kk < kWgmmaBK / 16; ++kk) {
                        wgmma_m64k16<BN>(acc[b], desc_a + 2 * kk, desc_b + 2 * kk);
                    }
                }
                wgmma_commit();
                wgmma_wait<1>();
#pragma unroll
                for (int b = 0; b < kRowBlocks; ++b) pin_accumulators(acc[b]);
                // k-tile it - 1's wgmmas are done: its slot goes back to the producer(s), unless
                // the staged epilogue keeps it.
                if (kt > 0 && !(staged && kt - 1 >= w.k_tiles - kHeld)) release((it - 1) % STAGES);
            }
            if (PINGPONG) {
                // Every k-tile of this unit has been waited for: the other consumer may start.
                if (lane == 0) mbarrier_arrive(order + 8 * (1 - consumer));
                ++mine;
            }
            wgmma_wait<0>();
#pragma unroll
            for (int b = 0; b < kRowBlocks; ++b) pin_accumulators(acc[b]);
            if (w.k_tiles > 0 && !staged) release((it - 1) % STAGES);

            const Epilogue e = gemm_epilogue_of(p, static_cast<unsigned>(w.slice));
            const bool whole_tile = w.m0 + BM <= p.m && w.n0 + BN <= p.n;
            if constexpr (KS > 1) {
                if (!peers_ready) {
                    cluster_wait();
                    peers_ready = true;
                }
                const int warp = 4 * consumer + warp_in_group;
                const uint32_t area = reduce_area + static_cast<uint32_t>(warp) * (kReduceBytes / 8);
                float* area_ptr = reinterpret_cast<float*>(reinterpret_cast<char*>(gemm_tma_smem) + (area - raw));
                cluster_reduced_epilogue<KS>(e, acc[0], area_ptr, area, reduce_bars + 8 * warp, reduce_bars + 64 + 8 * warp,
                                             reduced_units++, k_rank, w.m0 + consumer * 64 + warp_in_group * 16, w.n0,
                                             whole_tile);
                continue;
            }
            if constexpr (STAGED) {
                if (staged) {
                    // Every warp that read the held slots (a wgmma's warps read the whole W tile
                    // and each other's A rows; cooperatively both consumers) must be done with
                    // them before any warp stages there: wgmma.wait_group waits for this warp's
                    // share only.
                    const uint32_t my_meet = PINGPONG ? meet + 8 * consumer : meet;
                    __syncwarp();
                    if (lane == 0) mbarrier_arrive(my_meet);
                    mbarrier_wait(my_meet, staged_units & 1u);
                    ++staged_units;
                    // This warp's 16 x CP f32 (8 or 6 KiB): the held slots' A and W tiles (at
                    // least 16 KiB each), two warps to each.
                    constexpr uint32_t kWarpBytes = 16 * staged_pass_columns<BN>() * 4;
                    static_assert(2 * kWarpBytes <= 16384, "two warps' staging in each A and W tile");
                    const int warp = (PINGPONG ? 0 : 4 * consumer) + warp_in_group;
                    const uint32_t slot = (it - kHeld + warp / 4) % STAGES;
                    const uint32_t area = ((warp / 2) % 2 == 0 ? smem_a + slot * kStageA : smem_b + slot * kStageB) +
                                          (warp % 2) * kWarpBytes;
                    float* stage = reinterpret_cast<float*>(reinterpret_cast<char*>(gemm_tma_smem) + (area - raw));
                    staged_epilogue<kRowBlocks, BN>(e, stage, acc, w.m0 + row_block0 * 64 + warp_in_group * 16, w.n0,
                                                    whole_tile);
                    // The staging's plain accesses before the producer's TMA refills the slots.
                    fence_proxy_async_shared();
                    __syncwarp();
                    for (int h = 0; h < kHeld; ++h) release((it - kHeld + h) % STAGES);
                    continue;
                }
            }
            const int col_base = w.n0 + 2 * (lane & 3);
#pragma unroll
            for (int b = 0; b < kRowBlocks; ++b) {
                const int row = w.m0 + (row_block0 + b) * 64 + warp_in_group * 16 + (lane >> 2);
                epilogue_fragments<BN / 8>(e, row, col_base, acc[b], whole_tile);
            }
        }
    }
    // Every thread waits on the split barrier before it arrives again (the producer's, and
    // consumers without a unit, here).
    if (!peers_ready) cluster_wait();
    if (kCluster > 1) cluster_sync();
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace

// Tile variants; dynamic smem = STAGES * (BM + BN) * 64 * 2 + 1024 bytes (src/cuda/gemm.rs,
// WgmmaTile, must match): 193, 129 and 97 KiB.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FORA_WGMMA_BODY(...) gemm_wgmma_tile<__VA_ARGS__>(p)
#else
// Not sm_90a: wgmma does not exist; the launcher never launches this.
#define FORA_WGMMA_BODY(...) \
    do {                     \
        (void)p;             \
        __trap();            \
    } while (0)
#endif

// Large M: two warpgroups, each 64 x 256 (128 accumulators a thread), one CTA per SM.
extern "C" __global__ void __launch_bounds__(256, 1) gemm_wgmma_128x256(const GemmParams p) {
    grid_dependency_sync();
    FORA_WGMMA_BODY(2, 256, 4);
}

// Large M with N not a multiple of 256 (1152 = 9 x 128), or too few 128 x 256 tiles.
extern "C" __global__ void __launch_bounds__(256, 1) gemm_wgmma_128x128(const GemmParams p) {
    grid_dependency_sync();
    FORA_WGMMA_BODY(2, 128, 4);
}

// Small M (one image pair of 256 tokens = 512 rows): one warpgroup, two CTAs per SM.
extern "C" __global__ void __launch_bounds__(128, 2) gemm_wgmma_64x128(const GemmParams p) {
    grid_dependency_sync();
    FORA_WGMMA_BODY(1, 128, 4);
}

// The warp-specialized TMA kernels: 384 threads (a producer and two consumer warpgroups), one
// CTA per SM, a persistent grid. Dynamic smem = STAGES * (BM + BN) * 64 * 2 + STAGES * 16 + 16
// (+ 16 STAGED) + 1024 bytes (src/cuda/tma_tiles.rs, TmaTile::smem_bytes, must match): 193 to
// 211 KiB.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FORA_TMA_BODY(...) gemm_tma_tile<__VA_ARGS__>(p)
#else
#define FORA_TMA_BODY(...) \
    do {                   \
        (void)p;           \
        __trap();          \
    } while (0)
#endif

// N a multiple of 128 but not of 192 or 256; six stages.
extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 6, false, 1, 1);
}

// Every DiT-XL/2 width (1152, 3456, 4608 are multiples of 192); five stages.
extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_128x192(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 192, 5, false, 1, 1);
}

// Few rows (one image + CFG, M = 512): a width whose tiles fill the SMs in one round. qkv's
// 3456 columns are 31 tiles of 112 (124 CTAs at M = 512, where 128 wide gives 108 and 96 wide
// 144, two rounds of 132 SMs), fc1's 4608 are 32 of 144 (128 CTAs, where 128 wide gives 144 and
// 192 wide 96 CTAs of a third more work each). Seven and six stages.
extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_128x112(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 112, 7, false, 1, 1);
}

extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_128x144(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 144, 6, false, 1, 1);
}

// Multiples of 256; four stages.
extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_128x256(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 256, 4, false, 1, 1);
}

// 256 x 128 tiles, each consumer 128 x 128 (two m64 blocks, as in ping-pong) of the same unit:
// a k-step loads 256 + 128 rows for 256 x 128 outputs instead of 128 + 128 for 128 x 128, a
// quarter less L2 traffic per FLOP than the 128 x 128 tiles (which are L2-bound at 256 rows:
// session 19's ncu); four stages.
extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_256x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(256, 128, 4, false, 1, 1);
}

// The staged epilogue (gemm_tma_tile's STAGED) on 128 x 128 (six stages), ping-pong 128 x 128,
// 256 x 128 (four stages) and 128 x 192: forced only until measured against their
// register-epilogue twins.
extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_st_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 6, false, 1, 1, true);
}

extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_st_pp_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 6, true, 1, 1, true);
}

extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_st_256x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(256, 128, 4, false, 1, 1, true);
}

// 128 x 192 (five stages) staged in two passes of 96 columns: the tile fc1 took at M = 512
// before 128 x 144.
extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_st_128x192(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 192, 5, false, 1, 1, true);
}

// Ping-pong: 128 x 128 tiles, the two consumers taking the CTA's units in turn; six stages.
extern "C" __global__ void __launch_bounds__(384, 1) gemm_tma_pp_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 6, true, 1, 1);
}

// Clusters of two CTAs along M sharing (multicasting) the W tile; the tiles as above.

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(2)
    gemm_tma_mc_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 6, false, 2, 1);
}

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(2)
    gemm_tma_mc_128x192(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 192, 5, false, 2, 1);
}

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(2)
    gemm_tma_mc_128x256(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 256, 4, false, 2, 1);
}

// Ping-pong 128 x 128 in clusters of two sharing W (the pick's tile for long K).
extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(2)
    gemm_tma_mc_pp_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 6, true, 2, 1);
}

// Clusters of four CTAs along M sharing W (a quarter of the W tile each), and of four along M
// by two along N sharing W down a column and A along a row: at M = 512 (one image + CFG, four
// row tiles) a cluster's column covers every row, so each W tile is read from L2 once instead of
// four times.

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(4)
    gemm_tma_c4x1_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 6, false, 4, 1);
}

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(4)
    gemm_tma_c4x1_128x192(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 192, 5, false, 4, 1);
}

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(8)
    gemm_tma_c4x2_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 6, false, 4, 2);
}

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(8)
    gemm_tma_c4x2_128x192(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 192, 5, false, 4, 2);
}

// Cluster split-K: clusters of 2, 3 or 4 CTAs along K, each a run of a 128 x 128 unit's k-tiles,
// summed through distributed shared memory (cluster_reduced_epilogue); four stages and the
// 64 KiB reduction area. For products whose tiles leave most SMs idle (at M = 512 the 36 tiles
// of proj and fc2: three CTAs each fill 108 SMs) without split-K's epilogue kernel.

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(2)
    gemm_tma_k2_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 4, false, 1, 1, false, 2);
}

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(3)
    gemm_tma_k3_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 4, false, 1, 1, false, 3);
}

extern "C" __global__ void __launch_bounds__(384, 1) FORA_CLUSTER(4)
    gemm_tma_k4_128x128(const __grid_constant__ GemmTmaParams p) {
    grid_dependency_deferred();
    FORA_TMA_BODY(128, 128, 4, false, 1, 1, false, 4);
}
