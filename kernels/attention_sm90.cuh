// Hopper pieces of the wgmma flash attention shared by attention_sm90.cu and
// qkv_attention_sm90.cu: the 128-byte-swizzle addressing of a K / V tile, S = Q K^T of one key
// tile with Q from registers, and O += P V's wgmma. Only for sm_90a (empty elsewhere).
#pragma once

#include "common.cuh"
#include "wgmma.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

// Byte offset of 16-byte chunk `chunk` (0..7) of `row` in a 128-byte-swizzled panel.
FORA_DEVICE uint32_t sw128_chunk(int row, int chunk) {
    return static_cast<uint32_t>((row >> 3) * 1024 + (row & 7) * 128 + ((chunk ^ (row & 7)) << 4));
}

template <int D, bool V_MN>
FORA_DEVICE void wgmma_pv(float (&o)[D / 2], const uint32_t (&a)[4], uint64_t desc_b) {
    constexpr int T = V_MN ? 1 : 0;
    if constexpr (D == 64) {
        wgmma_rs_m64n64k16<T>(o, a, desc_b);
    } else if constexpr (D == 72) {
        wgmma_rs_m64n72k16<T>(o, a, desc_b);
    } else {
        static_assert(D == 128, "wgmma attention is instantiated for head_dim 64, 72 and 128");
        wgmma_rs_m64n128k16<T>(o, a, desc_b);
    }
}

// S = Q K^T of one key tile, issued and committed by neither: s zeroed, then KSTEPS RS wgmmas
// (Q fragments from registers) over the tile at k_tile, BN rows in 128-byte-swizzle panels of
// BN * 128 bytes (k-steps 0..3 in the first panel, 4.. in the next).
template <int BN, int KSTEPS>
FORA_DEVICE void issue_scores(float (&s)[BN / 2], const uint32_t (&q_frag)[KSTEPS][4], uint32_t k_tile) {
    static_assert(BN == 64 || BN == 128, "key tiles of 64 or 128");
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = 0.0f;
    pin_accumulators(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        const uint64_t desc = wgmma_desc_sw128(k_tile + (kk >> 2) * (BN * 128) + (kk & 3) * 32);
        if constexpr (BN == 64) {
            wgmma_rs_m64n64k16(s, q_frag[kk], desc);
        } else {
            wgmma_rs_m64n128k16(s, q_frag[kk], desc);
        }
    }
}

}  // namespace

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
