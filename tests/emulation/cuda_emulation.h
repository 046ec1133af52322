// A CPU emulation of the CUDA built-ins the small kernels use, so that tests/kernel_emulation.rs
// can run kernels/embed.cu, norm.cu and fora.cu as host C++ on machines without a GPU: every
// CUDA thread of a block is a fiber (launch.cpp), blocks run one after another (so `static`
// locals, one per OS thread, are the block's shared memory; a cluster's blocks run together and
// share them, so cluster kernels keep their shared memory dynamic), __syncthreads is a block barrier
// and a warp shuffle exchanges through a per-warp slot array between two warp barriers. It
// checks indexing, bounds, reductions and rounding (and, built with UBSan's alignment check,
// misaligned vector accesses); not timing, not the memory model. cp.async and wgmma are
// asynchronous as on the hardware: a copy's destination holds NaN bytes until the wait that
// retires its group, and a wgmma reads its shared-memory operands and writes its accumulators
// only at the wait that retires it, so a pipeline that reads a tile too early, refills a slot a
// wgmma still reads, or reads accumulators before their wait fails its test; a thread that exits
// with either in flight aborts. The scheduler's order is round robin, or (launch.cpp's
// warps_ahead) one warp at a time as far as it can go, so that shared-memory races between
// warps show. Built with FORA_EMULATION_TSAN, the kernels run under ThreadSanitizer and the
// runner annotates what orders threads (launch.cpp, `race`), so any unordered pair of
// accesses is reported whatever the schedule.
#pragma once

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define __grid_constant__
#define __cluster_dims__(...)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct __nv_bfloat16 {
    uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
// Round to nearest even, as the device's cvt.rn.bf16.f32.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
    return {__bfloat162float(v.x), __bfloat162float(v.y)};
}

// IEEE single operations (the emulator is built with -ffp-contract=off: no silent FMA).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint2float_rn(unsigned v) { return static_cast<float>(v); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
// sin(pi x), cos(pi x) in double (CUDA's sincospi reduces the range exactly; libm's sin/cos of
// pi * x agree to an ulp or so of double, far below the f32 results' rounding).
inline void sincospi(double x, double* s, double* c) {
    const double pi = 3.14159265358979323846;
    *s = sin(pi * x);
    *c = cos(pi * x);
}
inline float __expf(float x) { return expf(x); }

void fora_emulation_syncthreads();
void fora_emulation_syncwarp();
// bar.sync / bar.arrive on named barrier `id` (1-15) of `threads` threads: an arrival, and with
// `wait` a wait until `threads` have arrived in this generation.
void fora_emulation_named_barrier(unsigned id, unsigned threads, bool wait);
float fora_emulation_shfl_xor(float v, int lane_mask);
// Warp-collective tensor-core operations, with the PTX fragment layouts (common.cuh's ldmatrix_*,
// mma_bf16_16816; attention.cu's mma_bf16_1688 with k = 8).
void fora_emulation_ldmatrix(int matrices, bool trans, const void* row, uint32_t* out);
void fora_emulation_mma(int k, float* c, const uint32_t* a, const uint32_t* b);
// cp.async: the source is read at issue, the shared memory written when a wait retires the
// copy's group (cp.async.wait_group semantics), so reading a tile before its wait shows.
void fora_emulation_cp_async(void* smem, const void* gmem, int src_bytes);
void fora_emulation_cp_async_commit();
void fora_emulation_cp_async_wait(int pending);
void fora_emulation_fence_proxy_async();
void fora_emulation_generic_store(const void* smem, unsigned bytes);
void fora_emulation_generic_load(const void* smem, unsigned bytes);
// wgmma.mma_async m64nNk16 f32 += bf16 x bf16, both operands K-major 128-byte-swizzled in shared
// memory (descriptors), for this thread's accumulator fragment (gemm_sm90.cu).
void fora_emulation_wgmma(int n, float* d, uint64_t desc_a, uint64_t desc_b);
// The same with A[64 x 16] from registers: each thread passes its 4 A registers (the mma.sync
// m16n8k16 A fragment of its warp's 16 rows); warpgroup-collective (attention_sm90.cu).
// trans_b: B MN-major (the transpose-B bit; wgmma.cuh's wgmma_desc_sw128_mn layout).
void fora_emulation_wgmma_rs(int n, float* d, const uint32_t* a, uint64_t desc_b, int trans_b);
// Both forms are carried out when wgmma.wait_group retires their commit group: shared-memory
// operands are read then, accumulators written then.
void fora_emulation_wgmma_commit();
void fora_emulation_wgmma_wait(int pending);
// mbarrier and TMA (kernels/tma.cuh), by shared-window address. A barrier counts arrivals and
// expected transaction bytes per phase; a TMA copy's box is read from global memory at issue, its
// destination filled with NaN bytes, and the box written (swizzled) and its bytes counted when a
// thread waits on its barrier, so reading a slot before its barrier's phase ends, or refilling
// one a wgmma still reads, shows.
void fora_emulation_mbarrier_init(uint32_t bar, int arrivals);
void fora_emulation_mbarrier_arrive(uint32_t bar, uint32_t expect_tx_bytes);
void fora_emulation_mbarrier_wait(uint32_t bar, uint32_t parity);
void fora_emulation_tma_load_2d(uint32_t dst, const void* map, int x, int y, uint32_t bar);
// Thread-block clusters (a launch runs a cluster's blocks together): the block's rank, the
// cluster barrier, shared::cluster addresses of another block's shared memory (mapa), an arrival
// on another block's mbarrier, and a TMA box multicast into every block of a mask (same byte,
// same barrier byte in each).
unsigned fora_emulation_cluster_ctarank();
void fora_emulation_cluster_sync();
void fora_emulation_cluster_arrive();
void fora_emulation_cluster_wait();
uint32_t fora_emulation_mapa(uint32_t addr, unsigned rank);
void fora_emulation_mbarrier_arrive_cluster(uint32_t cluster_bar);
// ld.shared::cluster: `bytes` bytes of any block of the cluster's shared memory (a mapa address).
void fora_emulation_ld_shared_cluster(void* dst, uint32_t cluster_addr, unsigned bytes);
// st.shared::cluster: `bytes` bytes into any block of the cluster's shared memory.
void fora_emulation_st_shared_cluster(uint32_t cluster_addr, const void* src, unsigned bytes);
void fora_emulation_tma_load_2d_multicast(uint32_t dst, const void* map, int x, int y, uint32_t bar, uint16_t mask);
// The shared-window address of a pointer into the block's dynamic shared memory.
uint32_t fora_emulation_smem_offset(const void* p);

// gemm_sm90.cu's real path (not the trap stub of other architectures).
#define __CUDA_ARCH_FEAT_SM90_ALL 1
void* fora_emulation_dynamic_smem_bytes();
template <typename T>
T* fora_emulation_dynamic_smem() {
    return static_cast<T*>(fora_emulation_dynamic_smem_bytes());
}
inline void __syncthreads() { fora_emulation_syncthreads(); }
inline void __syncwarp(unsigned /*mask: every lane*/ = 0xffffffffu) { fora_emulation_syncwarp(); }
using std::max;
using std::min;
inline float __shfl_xor_sync(unsigned /*mask: every lane*/, float v, int lane_mask) {
    return fora_emulation_shfl_xor(v, lane_mask);
}
