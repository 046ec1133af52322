// Hopper's asynchronous copy engine (TMA) and the shared-memory transaction barriers (mbarrier)
// that say when its copies have landed, plus the warpgroup register reallocation of
// warp-specialized kernels. Only for sm_90a: include it inside
// `#if defined(__CUDA_ARCH_FEAT_SM90_ALL)`. The CPU emulator (tests/emulation) carries out a TMA
// copy when a thread waits on its barrier and fills the destination with NaN until then.
//
// Barriers and shared-memory destinations are named by their 32-bit shared-window addresses
// (smem_addr); a tensor map by the generic address of a __grid_constant__ kernel parameter.
#pragma once

#include "common.cuh"

// A kernel attribute: clusters of n CTAs along x (__cluster_dims__ exists only for sm_90; other
// architectures get the kernels' trap stubs without it). The CPU emulator takes a kernel's
// cluster size from its name (cluster_size_of in tests/emulation/launch.cpp).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FORA_CLUSTER(n) __cluster_dims__(n, 1, 1)
#else
#define FORA_CLUSTER(n)
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#ifdef FORA_EMULATION
FORA_DEVICE void mbarrier_init(uint32_t bar, int arrivals) { fora_emulation_mbarrier_init(bar, arrivals); }
FORA_DEVICE void fence_mbarrier_init() {}
FORA_DEVICE void mbarrier_arrive(uint32_t bar) { fora_emulation_mbarrier_arrive(bar, 0); }
FORA_DEVICE void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    fora_emulation_mbarrier_arrive(bar, bytes);
}
FORA_DEVICE void mbarrier_wait(uint32_t bar, uint32_t parity) { fora_emulation_mbarrier_wait(bar, parity); }
FORA_DEVICE void tma_load_2d(uint32_t dst, const TmaDescriptor* map, int x, int y, uint32_t bar) {
    fora_emulation_tma_load_2d(dst, map, x, y, bar);
}
template <int REGS>
FORA_DEVICE void setmaxnreg_inc() {}
template <int REGS>
FORA_DEVICE void setmaxnreg_dec() {}
FORA_DEVICE void tma_prefetch_descriptor(const TmaDescriptor*) {}
FORA_DEVICE uint32_t cluster_ctarank() { return fora_emulation_cluster_ctarank(); }
FORA_DEVICE void cluster_sync() { fora_emulation_cluster_sync(); }
FORA_DEVICE void cluster_arrive_relaxed() { fora_emulation_cluster_arrive(); }
FORA_DEVICE void cluster_wait() { fora_emulation_cluster_wait(); }
FORA_DEVICE void cluster_arrive_release() { fora_emulation_cluster_arrive(); }
FORA_DEVICE void st_shared_cluster_f32x2(uint32_t cluster_addr, float2 v) {
    fora_emulation_st_shared_cluster(cluster_addr, &v, sizeof(v));
}
FORA_DEVICE void st_shared_cluster_u32x4(uint32_t cluster_addr, uint4 v) {
    fora_emulation_st_shared_cluster(cluster_addr, &v, sizeof(v));
}
FORA_DEVICE void fence_proxy_async_shared_cluster() { fora_emulation_fence_proxy_async(); }
FORA_DEVICE uint32_t mapa_shared(uint32_t addr, uint32_t rank) { return fora_emulation_mapa(addr, rank); }
FORA_DEVICE void mbarrier_arrive_cluster(uint32_t cluster_bar) { fora_emulation_mbarrier_arrive_cluster(cluster_bar); }
FORA_DEVICE void mbarrier_arrive_release_cluster(uint32_t cluster_bar) {
    fora_emulation_mbarrier_arrive_cluster(cluster_bar);
}
FORA_DEVICE void mbarrier_wait_acquire_cluster(uint32_t bar, uint32_t parity) {
    fora_emulation_mbarrier_wait(bar, parity);
}
FORA_DEVICE float4 ld_shared_cluster_f32x4(uint32_t cluster_addr) {
    float4 v;
    fora_emulation_ld_shared_cluster(&v, cluster_addr, sizeof(v));
    return v;
}
FORA_DEVICE void tma_load_2d_multicast(uint32_t dst, const TmaDescriptor* map, int x, int y, uint32_t bar,
                                       uint16_t mask) {
    fora_emulation_tma_load_2d_multicast(dst, map, x, y, bar, mask);
}
#else
// Initializes the barrier at `bar` for `arrivals` arrivals a phase (before any thread uses it).
FORA_DEVICE void mbarrier_init(uint32_t bar, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes the initializations visible to the other threads and to the async proxy (TMA); a
// __syncthreads must follow before anyone else uses the barriers.
FORA_DEVICE void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One arrival (release semantics: this thread's earlier accesses happen before the phase ends).
FORA_DEVICE void mbarrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival that also expects `bytes` more bytes of TMA transactions this phase: the phase ends
// when every arrival is in and every expected byte has landed.
FORA_DEVICE void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the phase of parity `parity` has completed (acquire: what the arrivals released,
// and the bytes the TMA delivered, are visible afterwards). On a fresh barrier (phase 0 running)
// waiting for parity 1 returns at once: the phase "before" it counts as complete.
// A watchdog: a wait that spins 2^26 times (seconds; the longest legitimate wait here is one
// unit's mainloop, microseconds) traps, so a pipeline bug faults the launch with an error
// instead of hanging the device.
// One try_wait of the barrier's phase of parity `parity` into `done` (1: completed), with the
// semantics suffix SEM ("" for the default acquire at CTA scope, ".acquire.cluster").
#define FORA_MBARRIER_TRY_WAIT(done, bar, parity, SEM)                                     \
    asm volatile("{\n"                                                                     \
                 ".reg .pred p;\n"                                                         \
                 "mbarrier.try_wait.parity" SEM ".shared::cta.b64 p, [%1], %2;\n"          \
                 "selp.u32 %0, 1, 0, p;\n"                                                 \
                 "}\n"                                                                     \
                 : "=r"(done)                                                              \
                 : "r"(bar), "r"(parity)                                                   \
                 : "memory")
// CLUSTER: acquire at cluster scope instead of the CTA's (mbarrier_wait_acquire_cluster).
template <bool CLUSTER>
FORA_DEVICE void mbarrier_wait_scoped(uint32_t bar, uint32_t parity) {
    uint32_t done;
    uint32_t spins = 0;
    do {
        if (++spins == (1u << 26)) __trap();
        if constexpr (CLUSTER) {
            FORA_MBARRIER_TRY_WAIT(done, bar, parity, ".acquire.cluster");
        } else {
            FORA_MBARRIER_TRY_WAIT(done, bar, parity, "");
        }
    } while (done == 0);
}
FORA_DEVICE void mbarrier_wait(uint32_t bar, uint32_t parity) { mbarrier_wait_scoped<false>(bar, parity); }
// Copies the box at (x = innermost coordinate, y) of the 2-D tensor `map` describes into shared
// memory at `dst` (laid out and swizzled as the map says; 1024-byte aligned for the 128-byte
// swizzle); the bytes count against the transactions `bar` expects. Elements outside the
// tensor arrive as zeros, and the whole box's bytes are counted.
FORA_DEVICE void tma_load_2d(uint32_t dst, const TmaDescriptor* map, int x, int y, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
            dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(x), "r"(y)
        : "memory");
}
// Fetches a tensor map into the descriptor cache ahead of its first copy (a hint: the first
// TMA of a CTA otherwise waits for it).
FORA_DEVICE void tma_prefetch_descriptor(const TmaDescriptor* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Warp-specialized register budgets: every warp of a warpgroup executes the same one. The
// producer gives registers back, the consumers (the accumulators) take them.
template <int REGS>
FORA_DEVICE void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
FORA_DEVICE void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

// Thread-block clusters (kernels compiled with __cluster_dims__).
// This CTA's rank in its cluster.
FORA_DEVICE uint32_t cluster_ctarank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
// Every thread of every CTA of the cluster: what each wrote before (shared memory, barrier
// initializations after fence_mbarrier_init) is visible to all after. Every thread of every
// CTA must reach it, so warp-specialized kernels call it outside their role branches; not the
// .aligned form, which would also require the warps to be converged there.
FORA_DEVICE void cluster_sync() {
    asm volatile(
        "barrier.cluster.arrive.release;\n"
        "barrier.cluster.wait.acquire;\n" ::
            : "memory");
}
// cluster_sync in two halves, so that work can run between them: every thread arrives (relaxed:
// no memory ordering of its own; fence_mbarrier_init orders barrier initializations before it),
// and later waits (acquire) for every thread of the cluster to have arrived; a thread must wait
// before it arrives again, and before it exits.
FORA_DEVICE void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed;\n" ::: "memory"); }
FORA_DEVICE void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory"); }
// The arrival with release semantics: this thread's earlier memory accesses (its stores into
// other CTAs' shared memory, st_shared_cluster_*) are visible to every thread of the cluster
// after its cluster_wait.
FORA_DEVICE void cluster_arrive_release() { asm volatile("barrier.cluster.arrive.release;\n" ::: "memory"); }
// 8 bytes into any CTA of the cluster's shared memory (distributed shared memory), named by a
// shared::cluster address (mapa_shared); 8-byte aligned. The CTA must have started (a cluster
// barrier since the kernel began) and must not have exited.
FORA_DEVICE void st_shared_cluster_f32x2(uint32_t cluster_addr, float2 v) {
    asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};\n" ::"r"(cluster_addr), "f"(v.x), "f"(v.y) : "memory");
}
// 16 bytes likewise; 16-byte aligned. (Distributed shared memory wants the accesses of global
// memory: a warp's lanes on consecutive chunks, whole 32-byte segments.)
FORA_DEVICE void st_shared_cluster_u32x4(uint32_t cluster_addr, uint4 v) {
    asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(cluster_addr), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w)
                 : "memory");
}
// Orders this thread's generic-proxy writes into the cluster's shared memory (its own CTA's or
// another's, st_shared_cluster_*) before later async-proxy accesses of it (a wgmma of the CTA
// that holds them, once a cluster barrier has passed them on).
FORA_DEVICE void fence_proxy_async_shared_cluster() { asm volatile("fence.proxy.async.shared::cluster;\n" ::: "memory"); }
// The shared::cluster address of this CTA's shared byte `addr` in the CTA of rank `rank`.
FORA_DEVICE uint32_t mapa_shared(uint32_t addr, uint32_t rank) {
    uint32_t out;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
    return out;
}
// One arrival on an mbarrier of any CTA of the cluster, named by its shared::cluster address
// (mapa_shared). The default semantics (release at CTA scope), as CUTLASS's ClusterBarrier: the
// arrival only says that this warp's wgmmas are done with a slot (wgmma.wait_group orders
// that), and .release.cluster would put a GPU-wide memory barrier before every arrival (ptxas:
// MEMBAR.ALL.GPU), waiting on the previous unit's epilogue stores in the mainloop.
FORA_DEVICE void mbarrier_arrive_cluster(uint32_t cluster_bar) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_bar) : "memory");
}
// The same arrival with release semantics at cluster scope: this thread's earlier memory
// accesses (and those a __syncwarp ordered before it) are visible to a thread of the barrier's
// CTA once mbarrier_wait_acquire_cluster sees the phase end. For data handed between CTAs
// (the cluster split-K reduction); ptxas puts a GPU-wide memory barrier before it, so it is
// for once-a-tile hand-overs, not a mainloop.
FORA_DEVICE void mbarrier_arrive_release_cluster(uint32_t cluster_bar) {
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_bar) : "memory");
}
// mbarrier_wait with acquire semantics at cluster scope: what other CTAs' arrivals on this
// barrier released (mbarrier_arrive_release_cluster) is visible afterwards.
FORA_DEVICE void mbarrier_wait_acquire_cluster(uint32_t bar, uint32_t parity) {
    mbarrier_wait_scoped<true>(bar, parity);
}
// 16 bytes of any CTA of the cluster's shared memory (distributed shared memory), named by a
// shared::cluster address (mapa_shared); 16-byte aligned.
FORA_DEVICE float4 ld_shared_cluster_f32x4(uint32_t cluster_addr) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(cluster_addr)
                 : "memory");
    return v;
}
// tma_load_2d into every CTA of the cluster whose bit is set in `mask`: the box lands at the same
// shared byte `dst` in each and counts against the barrier at the same byte `bar` in each.
FORA_DEVICE void tma_load_2d_multicast(uint32_t dst, const TmaDescriptor* map, int x, int y, uint32_t bar,
                                       uint16_t mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(x), "r"(y), "h"(mask)
        : "memory");
}
#endif  // FORA_EMULATION

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
