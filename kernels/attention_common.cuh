// Pieces shared by the flash-attention kernels (attention.cu's v1 and v2, attention_sm90.cu):
// the online softmax of a 16-row slice and the output epilogue. Every kernel ends with a warp's rows of O in the mma accumulator layout
// (8-column tiles, registers (row g, cols 2q, 2q + 1) and (row g + 8, same cols), g = lane / 4,
// q = lane % 4), normalizes them, stages them in shared memory and writes whole 16-byte chunks.
#pragma once

#include "common.cuh"

// The q, k and v rows of one (batch, head) in the fused qkv buffer [B, T, 3, H, D]: token t's q
// at q + t * row_stride, its k and v likewise.
struct HeadRows {
    const __nv_bfloat16* q;
    const __nv_bfloat16* k;
    const __nv_bfloat16* v;
    size_t row_stride;
};

template <int D>
FORA_DEVICE HeadRows head_rows(const AttentionParams& p, int batch, int head) {
    const size_t row_stride = 3 * static_cast<size_t>(p.heads) * D;
    const __nv_bfloat16* q = reinterpret_cast<const __nv_bfloat16*>(p.qkv) +
                             static_cast<size_t>(batch) * p.tokens * row_stride + static_cast<size_t>(head) * D;
    return {q, q + static_cast<size_t>(p.heads) * D, q + 2 * static_cast<size_t>(p.heads) * D, row_stride};
}

// ---- the online softmax of a 16-row slice --------------------------------------------------
// Scores and P live in the mma accumulator layout: BN / 8 tiles of 4 values a thread, (row g,
// keys 8 nt + 2q, + 1) and (row g + 8, the same keys), `s[4 nt + r]`.

// The softmax scale in the log2 domain the kernels' exp2 works in: scale * log2(e).
FORA_DEVICE float softmax_scale_log2(const AttentionParams& p) { return p.scale * 1.4426950408889634f; }

// The state before the first key tile of a thread's rows g and g + 8: O (D / 8 tiles of 4) zero,
// running max (log2 domain) -inf, partial row sums (reduced over the quad at the end) zero.
template <int D>
FORA_DEVICE void start_online_softmax(float (&o)[D / 2], float (&row_max)[2], float (&row_sum)[2]) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.0f;
}

// Keys at or past `tokens` (only in the last tile, which starts at key0) get -inf.
template <int BN>
FORA_DEVICE void mask_keys_past_end(float* s, int key0, int tokens, int lane) {
    if (key0 + BN <= tokens) return;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
        const int key = key0 + nt * 8 + 2 * (lane & 3);
        if (key >= tokens) s[4 * nt] = s[4 * nt + 2] = -INFINITY;
        if (key + 1 >= tokens) s[4 * nt + 1] = s[4 * nt + 3] = -INFINITY;
    }
}

// One online-softmax step over a tile of BN scores: s becomes P = 2^(s * scale_log2 - max) with
// the running max (log2 domain) of rows g and g + 8 updated, this thread's partial row sums
// rescaled and extended, and the slice's output accumulators o (D / 8 tiles) rescaled by
// 2^(old max - new max). Every row of the tile must hold a finite score (a valid key), so the
// new max is finite; on the first tile the old max is -inf and the factor 0.
template <int BN, int D>
FORA_DEVICE void online_softmax_tile(float* s, float* o, float (&row_max)[2], float (&row_sum)[2],
                                     float scale_log2) {
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
        tile_max[0] = fmaxf(tile_max[0], fmaxf(s[4 * nt], s[4 * nt + 1]));
        tile_max[1] = fmaxf(tile_max[1], fmaxf(s[4 * nt + 2], s[4 * nt + 3]));
    }
    float alpha[2];
    float neg_max[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // The 4 threads of a quad hold one row.
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float new_max = fmaxf(row_max[r], tile_max[r] * scale_log2);
        alpha[r] = fast_exp2(row_max[r] - new_max);
        row_max[r] = new_max;
        neg_max[r] = -new_max;
    }
    float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
        s[4 * nt] = fast_exp2(fmaf(s[4 * nt], scale_log2, neg_max[0]));
        s[4 * nt + 1] = fast_exp2(fmaf(s[4 * nt + 1], scale_log2, neg_max[0]));
        s[4 * nt + 2] = fast_exp2(fmaf(s[4 * nt + 2], scale_log2, neg_max[1]));
        s[4 * nt + 3] = fast_exp2(fmaf(s[4 * nt + 3], scale_log2, neg_max[1]));
        tile_sum[0] += s[4 * nt] + s[4 * nt + 1];
        tile_sum[1] += s[4 * nt + 2] + s[4 * nt + 3];
    }
    row_sum[0] = row_sum[0] * alpha[0] + tile_sum[0];
    row_sum[1] = row_sum[1] * alpha[1] + tile_sum[1];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        o[4 * i] *= alpha[0];
        o[4 * i + 1] *= alpha[0];
        o[4 * i + 2] *= alpha[1];
        o[4 * i + 3] *= alpha[1];
    }
}

// mask_keys_past_end, then online_softmax_tile. The mask's per-key compares and selects are
// only on the path of a tile that reaches past the last token: with the mask's early return
// alone, ptxas if-converted it into ~130 instructions a thread on every tile.
template <int BN, int D>
FORA_DEVICE void masked_online_softmax_tile(float* s, float* o, float (&row_max)[2], float (&row_sum)[2],
                                            float scale_log2, int key0, int tokens, int lane) {
    if (key0 + BN > tokens) {
        mask_keys_past_end<BN>(s, key0, tokens, lane);
        online_softmax_tile<BN, D>(s, o, row_max, row_sum, scale_log2);
    } else {
        online_softmax_tile<BN, D>(s, o, row_max, row_sum, scale_log2);
    }
}

// The mma A fragment of P for keys 16 kk .. 16 kk + 15: S tiles 2 kk and 2 kk + 1, as bf16.
FORA_DEVICE void pack_p_fragment(const float* p, int kk, uint32_t (&a)[4]) {
    a[0] = pack_bf16x2(p[8 * kk], p[8 * kk + 1]);
    a[1] = pack_bf16x2(p[8 * kk + 2], p[8 * kk + 3]);
    a[2] = pack_bf16x2(p[8 * kk + 4], p[8 * kk + 5]);
    a[3] = pack_bf16x2(p[8 * kk + 6], p[8 * kk + 7]);
}

// Which keys of a tile a kernel masks: those past the end when the tile reaches past it (a
// branch, two softmax paths), none (a tile known to be full), or those past the end always
// (the last tile of a loop that peels it: one path, the mask a no-op on a full tile).
enum class TileMask { IfPartial, Never, Always };

// The wgmma kernels' step from the scores of the key tile at key0 to P: keys past the end
// masked (per MASK), one online-softmax step (o, row_max, row_sum updated), P packed as the A
// fragments of the BN / 16 PV k-steps.
template <int BN, int D, TileMask MASK = TileMask::IfPartial>
FORA_DEVICE void scores_to_p_fragments(float* s, float* o, float (&row_max)[2], float (&row_sum)[2],
                                       float scale_log2, int key0, int tokens, int lane,
                                       uint32_t (&p_frag)[BN / 16][4]) {
    if constexpr (MASK == TileMask::IfPartial) {
        masked_online_softmax_tile<BN, D>(s, o, row_max, row_sum, scale_log2, key0, tokens, lane);
    } else {
        if constexpr (MASK == TileMask::Always) mask_keys_past_end<BN>(s, key0, tokens, lane);
        online_softmax_tile<BN, D>(s, o, row_max, row_sum, scale_log2);
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) pack_p_fragment(s, kk, p_frag[kk]);
}

// This thread's partial row sums of rows g and g + 8, summed over the quad and inverted.
FORA_DEVICE void quad_inverse_sums(const float (&row_sum)[2], float (&inv_sum)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv_sum[r] = 1.0f / l;
    }
}

// Stages 16 rows of O at s_o (row stride `stride` bf16): o holds D / 8 tiles of 4 accumulators
// (rows g and g + 8), scaled by inv_sum[0] and inv_sum[1].
template <int D>
FORA_DEVICE void stage_output_rows(__nv_bfloat16* s_o, int stride, const float* o, const float (&inv_sum)[2],
                                   int lane) {
    const int g = lane >> 2;
    const int col = 2 * (lane & 3);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        *reinterpret_cast<uint32_t*>(s_o + g * stride + i * 8 + col) =
            pack_bf16x2(o[4 * i] * inv_sum[0], o[4 * i + 1] * inv_sum[0]);
        *reinterpret_cast<uint32_t*>(s_o + (g + 8) * stride + i * 8 + col) =
            pack_bf16x2(o[4 * i + 2] * inv_sum[1], o[4 * i + 3] * inv_sum[1]);
    }
}

// Writes `rows` staged rows (this warp's, from s_o with row stride `stride`) of query rows
// t0, t0 + 1, ... of (batch, head) to out[B, T, H, D] in 16-byte chunks; rows past the last token
// are skipped. The staging writes must be visible to the warp (__syncwarp) first.
template <int D>
FORA_DEVICE void store_output_rows(const __nv_bfloat16* s_o, int stride, int rows, int t0, int batch, int head,
                                   const AttentionParams& p, int lane) {
    constexpr int CHUNKS = D / 8;
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out);
    for (int c = lane; c < rows * CHUNKS; c += 32) {
        const int r = c / CHUNKS;
        const int ch = c - r * CHUNKS;
        const int t = t0 + r;
        if (t < p.tokens) {
            const size_t o_off = ((static_cast<size_t>(batch) * p.tokens + t) * p.heads + head) * D + ch * 8;
            *reinterpret_cast<uint4*>(out + o_off) = *reinterpret_cast<const uint4*>(s_o + r * stride + ch * 8);
        }
    }
}
