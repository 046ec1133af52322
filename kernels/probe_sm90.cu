// Hardware-contract probes of the Hopper instructions the sm_90a kernels are built on, each
// small enough that a failure points at one assumption (WgmmaProbeParams in params.h):
//   mode 0  RS wgmma: A from registers in the mma.sync m16n8k16 fragment layout of each warp's
//           16 rows, B K-major 128-byte swizzled (attention_sm90.cu's QK^T and PV);
//   mode 1  SS wgmma: both operands K-major 128-byte swizzled (gemm_sm90.cu; measured correct);
//   mode 2  RS wgmma with B MN-major (the transpose-B bit) through wgmma_desc_sw128_mn: what a
//           flash attention reading V in its natural layout would need.
// The shared-memory layouts are written element by element from plain row-major inputs, so
// the probe depends on nothing but the instruction, its descriptor and its fragment layouts.
// K = 32: two wgmmas, the second at the next k-step (32 bytes along K-major rows, two atoms
// down MN-major), as the attention kernels step through the head dim and the keys.

#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

namespace {

constexpr int kProbeK = 32;              // two k-steps: the second checks the descriptor advance
constexpr uint32_t kProbeB = 0;          // B: up to 16 atoms (K-major n = 128) or 2 panels
constexpr uint32_t kProbeA = 16 * 1024;  // A (mode 1): 8 atoms
constexpr uint32_t kPanelBytes = 4096;   // MN-major: one 64-wide n panel of 32 k-rows

// Byte offset of element (row, k) of a K-major 128-byte-swizzled operand (k < 64 in one row).
FORA_DEVICE uint32_t k_major_offset(int row, int k) {
    return (row / 8) * 1024 + (row % 8) * 128 + (((k / 8) ^ (row % 8)) << 4) + (k % 8) * 2;
}

// Byte offset of element (n, k) of an MN-major 128-byte-swizzled operand (wgmma_desc_sw128_mn
// with panels kPanelBytes apart and 8-row k groups 1024 bytes apart).
FORA_DEVICE uint32_t mn_major_offset(int n, int k) {
    return (n / 64) * kPanelBytes + (k / 8) * 1024 + (k % 8) * 128 + ((((n % 64) / 8) ^ (k % 8)) << 4) +
           (n % 8) * 2;
}

template <int N>
FORA_DEVICE void store_fragment(const WgmmaProbeParams& p, const float (&d)[N / 2]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* out = reinterpret_cast<float*>(p.d);
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = 16 * warp + lane / 4 + 8 * (r / 2);
            const int col = 8 * j + 2 * (lane % 4) + (r % 2);
            out[row * N + col] = d[4 * j + r];
        }
    }
}

// The two k-steps: A fragments a[0] (k 0..15) and a[1] (k 16..31); B's second step starts 32
// bytes further along the K-major rows, or 16 rows (two atoms, 2048 bytes) further MN-major.
template <int N>
FORA_DEVICE void probe_rs(const WgmmaProbeParams& p, const uint32_t (&a)[2][4], uint32_t b_addr, bool mn) {
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
    pin_accumulators(d);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kProbeK / 16; ++ks) {
        const uint64_t desc = mn ? wgmma_desc_sw128_mn(b_addr + ks * 2048, kPanelBytes, 1024)
                                 : wgmma_desc_sw128(b_addr + ks * 32);
        if constexpr (N == 64) {
            mn ? wgmma_rs_m64n64k16<1>(d, a[ks], desc) : wgmma_rs_m64n64k16<0>(d, a[ks], desc);
        } else if constexpr (N == 72) {
            mn ? wgmma_rs_m64n72k16<1>(d, a[ks], desc) : wgmma_rs_m64n72k16<0>(d, a[ks], desc);
        } else {
            mn ? wgmma_rs_m64n128k16<1>(d, a[ks], desc) : wgmma_rs_m64n128k16<0>(d, a[ks], desc);
        }
    }
    wgmma_commit();
    wgmma_wait<0>();
    pin_accumulators(d);
    store_fragment<N>(p, d);
}

}  // namespace

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// One warpgroup; dynamic shared memory 24 KiB + 1 KiB for the 1024-byte alignment.
extern "C" __global__ void __launch_bounds__(128) wgmma_probe(const WgmmaProbeParams p) {
    grid_dependency_sync();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    FORA_DYNAMIC_SMEM(uint4, probe_smem);
    const uint32_t raw = smem_addr(probe_smem);
    const uint32_t align_pad = ((raw + 1023u) & ~1023u) - raw;
    unsigned char* base = reinterpret_cast<unsigned char*>(probe_smem) + align_pad;
    const uint32_t base_addr = raw + align_pad;
    const __nv_bfloat16* a = reinterpret_cast<const __nv_bfloat16*>(p.a);
    const __nv_bfloat16* bt = reinterpret_cast<const __nv_bfloat16*>(p.bt);
    const int t = threadIdx.x;

    for (int i = t; i < (kProbeA + 8 * 1024) / 16; i += 128) {
        st_shared_for_async_proxy(base + 16 * i, make_uint4(0u, 0u, 0u, 0u));
    }
    __syncthreads();
    for (int i = t; i < p.n * kProbeK; i += 128) {
        const int n = i / kProbeK, k = i % kProbeK;
        const uint32_t off = p.mode == 2 ? mn_major_offset(n, k) : k_major_offset(n, k);
        st_shared_for_async_proxy(base + kProbeB + off, bt[i]);
    }
    if (p.mode == 1) {
        for (int i = t; i < 64 * kProbeK; i += 128) {
            st_shared_for_async_proxy(base + kProbeA + k_major_offset(i / kProbeK, i % kProbeK), a[i]);
        }
    }
    fence_proxy_async_shared();
    __syncthreads();

    if (p.mode == 1) {
        float d[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) d[i] = 0.0f;
        pin_accumulators(d);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kProbeK / 16; ++ks) {
            wgmma_m64n128k16(d, wgmma_desc_sw128(base_addr + kProbeA + ks * 32),
                             wgmma_desc_sw128(base_addr + kProbeB + ks * 32));
        }
        wgmma_commit();
        wgmma_wait<0>();
        pin_accumulators(d);
        store_fragment<128>(p, d);
        return;
    }
    // A in the mma.sync m16n8k16 A layout: a0 = (g, 2q..), a1 = (g + 8, 2q..), a2 = (g, 2q + 8..),
    // a3 = (g + 8, 2q + 8..) of this warp's 16 rows.
    const int warp = t / 32, g = (t % 32) / 4, q = t % 4;
    uint32_t frag[kProbeK / 16][4];
#pragma unroll
    for (int ks = 0; ks < kProbeK / 16; ++ks) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = 16 * warp + g + 8 * (i & 1);
            const int col = 16 * ks + 8 * (i >> 1) + 2 * q;
            frag[ks][i] = *reinterpret_cast<const uint32_t*>(a + row * kProbeK + col);
        }
    }
    const bool mn = p.mode == 2;
    if (p.n == 64) {
        probe_rs<64>(p, frag, base_addr + kProbeB, mn);
    } else if (p.n == 72) {
        probe_rs<72>(p, frag, base_addr + kProbeB, mn);
    } else {
        probe_rs<128>(p, frag, base_addr + kProbeB, mn);
    }
#else
    (void)p;
    __trap();
#endif
}

// TmaProbeParams: two TMA loads of a box into the same shared memory, one mbarrier, its phases 0
// and 1; the raw shared bytes after each go to out, so the host checks the 128-byte swizzle, the
// zero fill past the tensor's edges and the transaction accounting the TMA GEMM relies on.
extern "C" __global__ void __launch_bounds__(128, 1) tma_probe(const __grid_constant__ TmaProbeParams p) {
    grid_dependency_sync();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    FORA_DYNAMIC_SMEM(uint4, tma_probe_smem);
    const uint32_t raw = smem_addr(tma_probe_smem);
    const uint32_t box = (raw + 1023u) & ~1023u;
    const uint32_t box_bytes = static_cast<uint32_t>(p.box_rows) * 128u;
    const uint32_t bar = box + box_bytes;
    const uint16_t* box_ptr =
        reinterpret_cast<const uint16_t*>(reinterpret_cast<const unsigned char*>(tma_probe_smem) + (box - raw));
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    for (int phase = 0; phase < 2; ++phase) {
        if (threadIdx.x == 0) {
            mbarrier_arrive_expect_tx(bar, box_bytes);
            tma_load_2d(box, &p.map, phase == 0 ? p.x0 : p.x1, phase == 0 ? p.y0 : p.y1, bar);
        }
        mbarrier_wait(bar, static_cast<uint32_t>(phase));
        uint16_t* out = reinterpret_cast<uint16_t*>(p.out) + static_cast<long long>(phase) * p.box_rows * 64;
        for (int i = threadIdx.x; i < p.box_rows * 64; i += blockDim.x) {
            out[i] = ld_shared_for_async_proxy<uint16_t>(box_ptr + i);
        }
        // Each thread's reads of the box (generic proxy) before thread 0's next TMA write of it.
        fence_proxy_async_shared();
        __syncthreads();  // every thread has read the box before thread 0 reloads it
    }
#else
    (void)p;
    __trap();
#endif
}

// tma_cluster_probe (TmaProbeParams; one cluster of two CTAs of 128 threads): CTA r multicasts
// the box at (x_r, y_r) into slot r of both CTAs' shared memory, each CTA's one mbarrier
// expecting both boxes (the peer's may land before this CTA announced it); each CTA writes its two
// slots to out + r * 2 * box_rows * 64. Then the CTAs relay an arrival through each other's
// second barrier (mapa, remote arrival); cluster barriers before the first copy and before exit. The primitives the multicast TMA GEMM (gemm_tma_mc_*) rests on, alone.
extern "C" __global__ void __launch_bounds__(128, 1) FORA_CLUSTER(2)
    tma_cluster_probe(const __grid_constant__ TmaProbeParams p) {
    grid_dependency_sync();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    FORA_DYNAMIC_SMEM(uint4, tma_cluster_probe_smem);
    const uint32_t raw = smem_addr(tma_cluster_probe_smem);
    const uint32_t slots = (raw + 1023u) & ~1023u;
    const uint32_t box_bytes = static_cast<uint32_t>(p.box_rows) * 128u;
    const uint32_t full = slots + 2 * box_bytes;
    const uint32_t ping = full + 8;
    const uint32_t rank = cluster_ctarank();
    if (threadIdx.x == 0) {
        mbarrier_init(full, 1);
        mbarrier_init(ping, 1);
        fence_mbarrier_init();
    }
    cluster_sync();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(full, 2 * box_bytes);
        tma_load_2d_multicast(slots + rank * box_bytes, &p.map, rank == 0 ? p.x0 : p.x1, rank == 0 ? p.y0 : p.y1,
                              full, 0x3);
    }
    mbarrier_wait(full, 0);
    const uint16_t* box = reinterpret_cast<const uint16_t*>(
        reinterpret_cast<const unsigned char*>(tma_cluster_probe_smem) + (slots - raw));
    uint16_t* out = reinterpret_cast<uint16_t*>(p.out) + static_cast<long long>(rank) * 2 * p.box_rows * 64;
    for (int i = threadIdx.x; i < 2 * p.box_rows * 64; i += blockDim.x) out[i] = box[i];
    // A relay: CTA 0 arrives on CTA 1's barrier, CTA 1 waits for it and then arrives on CTA 0's;
    // an arrival that lands in the wrong CTA leaves one of them waiting (the watchdog traps).
    if (threadIdx.x == 0) {
        if (rank == 1) mbarrier_wait(ping, 0);
        mbarrier_arrive_cluster(mapa_shared(ping, rank ^ 1u));
        if (rank == 0) mbarrier_wait(ping, 0);
    }
    cluster_sync();
#else
    (void)p;
    __trap();
#endif
}
