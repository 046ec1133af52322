// Shared device helpers for every kernels/*.cu: bf16 conversion, tensor-core mma, ldmatrix,
// cp.async, warp reductions and the activation functions, written once.
#pragma once

#ifdef FORA_EMULATION
// Compiled as host C++ by tests/kernel_emulation.rs: the CUDA built-ins come from the emulator.
#include "cuda_emulation.h"
#else
#include <cuda_bf16.h>
#endif
#include <stdint.h>
#include "params.h"

#define FORA_DEVICE __device__ __forceinline__

// A bool as a type, so that a generic lambda can branch on it at compile time (`if constexpr
// (decltype(flag)::value)`): one body, two straight-line copies.
template <bool B>
struct CompileTimeFlag {
    static constexpr bool value = B;
};

// A kernel's dynamic shared memory (the launch's shared_mem_bytes), as `type name[]`, 128-byte
// aligned.
#ifdef FORA_EMULATION
#define FORA_DYNAMIC_SMEM(type, name) type* name = fora_emulation_dynamic_smem<type>()
#else
#define FORA_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#endif

// ---- programmatic dependent launch ----------------------------------------------------------

// Launched with programmatic stream serialization (FORA_PDL=1, sm_90+), a kernel may start
// while the kernel before it on the stream is still running. Launched normally, and before
// sm_90 (and in the CPU emulator), these are no-ops.

// Blocks this thread until the kernel before it has completed and its memory is visible.
FORA_DEVICE void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(FORA_EMULATION)
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel on the stream start launching (once every CTA of this grid has called
// it or exited; a CTA's later calls do nothing). Always after the caller's grid_dependency_wait,
// so a kernel that starts early overlaps only the one right before it.
FORA_DEVICE void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(FORA_EMULATION)
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ---- named barriers ----------------------------------------------------------------------

// Barrier `id` (1-15; 0 is __syncthreads') of `threads` threads of the block (a multiple of 32,
// whole warps): sync arrives and waits until `threads` have arrived; arrive only arrives (its
// earlier memory accesses are ordered before the waiters' later ones). Lets some warps wait on
// others, e.g. warpgroups taking turns (attention_sm90.cu's ping-pong).
FORA_DEVICE void named_barrier_sync(uint32_t id, uint32_t threads) {
#ifdef FORA_EMULATION
    fora_emulation_named_barrier(id, threads, true);
#else
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}
FORA_DEVICE void named_barrier_arrive(uint32_t id, uint32_t threads) {
#ifdef FORA_EMULATION
    fora_emulation_named_barrier(id, threads, false);
#else
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}

// Every kernel's first statement, in every thread (tests/kernel_sources.rs): nothing reads or
// writes global memory before the kernel before it is done.
FORA_DEVICE void grid_dependency_sync() {
    grid_dependency_wait();
    grid_launch_dependents();
}

// The first statement instead of grid_dependency_sync of a kernel that waits later (allowed for
// the TMA GEMMs only): before its grid_dependency_wait a thread may read only memory that no
// kernel writes (the weights), and every thread that touches other global memory waits first.
FORA_DEVICE void grid_dependency_deferred() {}

// Asks L2 to fetch the 128-byte line that holds `p`: a hint that takes no register and is never
// waited for, so a kernel can keep more DRAM reads in flight than its registers hold. Nothing in
// the CPU emulator (it changes no value).
FORA_DEVICE void prefetch_l2(const void* p) {
#ifdef FORA_EMULATION
    (void)p;
#else
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#endif
}

// Asks L2 to fetch `bytes` (a multiple of 16) from the 16-byte aligned `p`, one thread's hint
// that is never waited for: on sm_90 one bulk prefetch (cp.async.bulk.prefetch.L2), before
// that a prefetch.global.L2 a 128-byte line (the caller spreads them over its threads with
// `lane` / `lanes`). Nothing in the CPU emulator.
FORA_DEVICE void prefetch_bytes_l2(const unsigned char* p, long long bytes, int lane, int lanes) {
#ifdef FORA_EMULATION
    (void)p, (void)bytes, (void)lane, (void)lanes;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (lane == 0 && bytes > 0) {
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(static_cast<uint32_t>(bytes))
                     : "memory");
    }
#else
    for (long long o = 128LL * lane; o < bytes; o += 128LL * lanes) prefetch_l2(p + o);
#endif
}

// FORA_PREFETCH_WEIGHTS: CTA `block` of `blocks`'s share of each of two ranges (the next GEMMs'
// weights; `bytes` 0 for none) asked of L2, spread over `lanes` threads; the shares are
// multiples of 16 bytes, so each starts aligned.
FORA_DEVICE void prefetch_shares_l2(const fora_ptr (&base)[2], const long long (&bytes)[2], long long block,
                                    long long blocks, int lane, int lanes) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (bytes[r] <= 0) continue;
        const long long share = ((bytes[r] + blocks - 1) / blocks + 15) / 16 * 16;
        const long long start = block * share;
        if (start >= bytes[r]) continue;
        prefetch_bytes_l2(reinterpret_cast<const unsigned char*>(base[r]) + start, min(share, bytes[r] - start), lane,
                          lanes);
    }
}

// ---- LayerNorm ----------------------------------------------------------------------------

// adaLN's modulate of a LayerNorm'd value: (x - mean) * rstd * (1 + scale) + shift (norm.cu,
// the fused reuse forward in fora.cu, the fused GEMM + LayerNorm in gemm_ln_sm90.cu).
FORA_DEVICE float modulate(float x, float mean, float rstd, float shift, float scale) {
    return (x - mean) * rstd * (1.0f + scale) + shift;
}

// ---- conversions -------------------------------------------------------------------------

FORA_DEVICE float bf16_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
FORA_DEVICE __nv_bfloat16 f32_to_bf16(float v) { return __float2bfloat16_rn(v); }

// Two floats -> one 32-bit register holding (lo, hi) as bf16, the mma operand layout.
FORA_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x on the SFU (flash attention's softmax); ex2.approx(-inf) = +0, which is what masked
// keys need.
FORA_DEVICE float fast_exp2(float x) {
#ifdef FORA_EMULATION
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
#endif
}

// ---- activations --------------------------------------------------------------------------

// GELU, tanh approximation (nn.GELU(approximate="tanh")): x (1 + tanh u) / 2 with
// u = sqrt(2/pi) (x + 0.044715 x^3), in f32, written as x / (1 + e^(-2u)) (the same function:
// (1 + tanh u) / 2 is the logistic of 2u) so that it takes the SFU's 2^x and a fast divide,
// ~10 instructions, instead of tanhf's ~20 with a branch: fc1's epilogue applies it to every
// output of its GEMM. Unlike tanh.approx (absolute error ~2^-11, which 1 + tanh u would turn
// into a relative error of several percent for x below -3), ex2.approx and the fast divide are
// accurate to a few ulp of f32, so the result is too, everywhere. Large negative x: e^(-2u) = inf and the quotient -0, as GELU tends to.
FORA_DEVICE float gelu_tanh(float x) {
    const float k0 = 0.7978845608028654f;  // sqrt(2/pi)
    const float k1 = 0.044715f;
    const float u = k0 * (x + k1 * x * x * x);
    const float e = fast_exp2(-2.8853900817779268f * u);  // e^(-2u): -2u log2(e)
#ifdef FORA_EMULATION
    return x / (1.0f + e);
#else
    return __fdividef(x, 1.0f + e);
#endif
}

FORA_DEVICE float silu(float x) { return x / (1.0f + __expf(-x)); }

// ---- warp reductions ----------------------------------------------------------------------

FORA_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

FORA_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- patches ------------------------------------------------------------------------------

// Value k = (c, i, j) of patch t (row-major over the (H/p) x (W/p) grid) of `image` in the
// latents f32 [images, C, H, W]: the input of the patch-embedding conv (kernel = stride = p).
FORA_DEVICE float latent_patch_value(const float* latents, int image, int channels, int height,
                                     int width, int patch, int t, int k) {
    const int gw = width / patch;
    const int ty = t / gw, tx = t % gw;
    const int pp = patch * patch;
    const int c = k / pp, i = (k % pp) / patch, j = k % patch;
    return latents[(((size_t)image * channels + c) * height + ty * patch + i) * width +
                   tx * patch + j];
}

// ---- shared-memory addresses, ldmatrix, cp.async, tensor-core mma -------------------------

#ifdef FORA_EMULATION
// The CPU emulator's versions (tests/emulation/launch.cpp): the same operands and fragment
// layouts, carried out by the warp's emulated lanes together; cp.async copies at once.
// Shared addresses are offsets into the block's dynamic shared memory.
FORA_DEVICE uint32_t smem_addr(const void* p) { return fora_emulation_smem_offset(p); }
FORA_DEVICE void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
    uint32_t r[4];
    fora_emulation_ldmatrix(4, false, p, r);
    r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
FORA_DEVICE void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
    uint32_t r[4];
    fora_emulation_ldmatrix(4, true, p, r);
    r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
FORA_DEVICE void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* p) {
    uint32_t r[2];
    fora_emulation_ldmatrix(2, false, p, r);
    r0 = r[0]; r1 = r[1];
}
FORA_DEVICE void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* p) {
    uint32_t r[2];
    fora_emulation_ldmatrix(2, true, p, r);
    r0 = r[0]; r1 = r[1];
}
FORA_DEVICE void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    fora_emulation_cp_async(smem, gmem, src_bytes);
}
FORA_DEVICE void cp_async_commit() { fora_emulation_cp_async_commit(); }
template <int N>
FORA_DEVICE void cp_async_wait() {
    fora_emulation_cp_async_wait(N);
}
FORA_DEVICE void mma_bf16_16816(float* c, const uint32_t* a, const uint32_t* b) {
    fora_emulation_mma(16, c, a, b);
}
#else
FORA_DEVICE uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8.
FORA_DEVICE void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

FORA_DEVICE void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p)));
}

FORA_DEVICE void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(smem_addr(p)));
}

FORA_DEVICE void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy, bypassing L1. `src_bytes` < 16 zero-fills the rest
// (0 = pure zero fill, used for out-of-range rows and columns).
FORA_DEVICE void cp_async_16(void* smem, const void* gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes));
}

FORA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
FORA_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- tensor-core mma ----------------------------------------------------------------------

// D[16x8] += A[16x16] (row) * B[16x8] (col), bf16 operands, f32 accumulators.
// a: 4 regs, b: 2 regs, c: 4 floats (the standard m16n8k16 fragment layouts).
FORA_DEVICE void mma_bf16_16816(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif  // FORA_EMULATION
