// The bench's device helpers. Memory-bandwidth probes: the bench's memory ceilings measured with kernels shaped like ours
// (16-byte accesses, several in flight a thread, a grid-stride loop over a few waves of
// blocks), next to cuMemcpyDtoD. A read-dominated kernel (fora_reuse_final reads 98% of its
// bytes) is compared with what reading alone reaches, not with a copy that also writes.
#include "common.cuh"

namespace {

constexpr int kInFlight = 4;  // 16-byte loads issued before the first is used

FORA_DEVICE uint32_t xor4(uint4 v) { return (v.x ^ v.y) ^ (v.z ^ v.w); }

}  // namespace

// Thread i reads chunks i, i + S, i + 2S, ... (S = the grid's threads), kInFlight at a time,
// and writes the XOR of their 32-bit words to dst[i]. Chunk c is at src[c & mask] (mask: all
// ones, -1, unless the params ask for a small buffer read over and over; 0 is a buffer of one
// chunk).
extern "C" __global__ void __launch_bounds__(256) bandwidth_read(const BandwidthParams p) {
    grid_dependency_sync();
    const uint4* src = reinterpret_cast<const uint4*>(p.src);
    const long long mask = p.mask;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    uint32_t acc = 0;
    long long i = first;
    for (; i + (kInFlight - 1) * stride < p.chunks; i += kInFlight * stride) {
        uint4 v[kInFlight];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) v[u] = src[(i + u * stride) & mask];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) acc ^= xor4(v[u]);
    }
    for (; i < p.chunks; i += stride) acc ^= xor4(src[i & mask]);
    reinterpret_cast<uint32_t*>(p.dst)[first] = acc;
}

// The same walk, each chunk stored to dst at the same offset.
extern "C" __global__ void __launch_bounds__(256) bandwidth_copy(const BandwidthParams p) {
    grid_dependency_sync();
    const uint4* src = reinterpret_cast<const uint4*>(p.src);
    uint4* dst = reinterpret_cast<uint4*>(p.dst);
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (kInFlight - 1) * stride < p.chunks; i += kInFlight * stride) {
        uint4 v[kInFlight];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) v[u] = src[i + u * stride];
#pragma unroll
        for (int u = 0; u < kInFlight; ++u) dst[i + u * stride] = v[u];
    }
    for (; i < p.chunks; i += stride) dst[i] = src[i];
}

// Holds the stream for p.ns nanoseconds of the global timer (one thread; touches no memory).
// The CPU emulator has no clock to wait on: there it returns at once.
extern "C" __global__ void __launch_bounds__(32) hold_stream(const HoldParams p) {
    grid_dependency_sync();
#ifdef FORA_EMULATION
    (void)p;
#else
    if (threadIdx.x != 0) return;
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < static_cast<unsigned long long>(p.ns));
#endif
}
