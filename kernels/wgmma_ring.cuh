// The consumer side of a TMA ring that feeds one warpgroup's wgmmas (gemm_ln_sm90.cu,
// qkv_attention_sm90.cu): per k-step, wait for its slot's `full` barrier, issue the step's
// wgmmas, keep one step in flight, and hand the slot of the step before back to the producer(s).
// Only for sm_90a: include it inside `#if defined(__CUDA_ARCH_FEAT_SM90_ALL)`.
#pragma once

#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// acc += the k_steps steps of `mma(acc, slot)` (the step's wgmmas on ring slot `slot`, issued
// between a fence and a commit here), ring slots of STAGES `full` / `empty` mbarriers (8 bytes
// apart from `full` / `empty`). A freed slot is an arrival of the warp's lane 0 on this CTA's
// `empty` barrier, or with MC (a ring that peers multicast into) of lanes 0 .. cluster - 1 on
// the same barrier of each CTA of the cluster (`peer_empty`: lane i's mapa of `empty` into CTA
// i, after the cluster barrier that follows the barriers' initialization).
template <int STAGES, bool MC, int R, typename Mma>
FORA_DEVICE void consume_ring(float (&acc)[R], int k_steps, uint32_t full, uint32_t empty, uint32_t peer_empty,
                              int cluster, int lane, Mma mma) {
#pragma unroll 1
    for (int kt = 0; kt < k_steps; ++kt) {
        const uint32_t slot = kt % STAGES;
        mbarrier_wait(full + 8 * slot, (kt / STAGES) & 1u);
        pin_accumulators(acc);
        wgmma_fence();
        mma(acc, slot);
        wgmma_commit();
        wgmma_wait<1>();
        pin_accumulators(acc);
        // k-step kt - 1's wgmmas are done: its slot goes back to the producer(s).
        if (kt > 0) {
            const uint32_t freed = 8 * ((kt - 1) % STAGES);
            if (MC) {
                if (lane < cluster) mbarrier_arrive_cluster(peer_empty + freed);
            } else if (lane == 0) {
                mbarrier_arrive(empty + freed);
            }
        }
    }
    wgmma_wait<0>();
    pin_accumulators(acc);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
