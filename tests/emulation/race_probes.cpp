// The emulator's own test kernels for its race checks (kernel_emulation.rs), in a translation unit
// of their own so that the race build (FORA_EMULATION_TSAN) instruments them as it does the
// kernels; the parameter is the address of their f32 output.
#include "cuda_emulation.h"

namespace {

// Every warp reads the next warp's shared slot, then overwrites its own: after only a shuffle
// (race_probe_warps), or after a block barrier too (SYNCED: race-free).
template <bool SYNCED>
void read_next_warp(const uint64_t out) {
    __shared__ float slot[32];
    const unsigned warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if (threadIdx.x % 32 == 0) slot[warp] = 1.0f + static_cast<float>(warp);
    __syncthreads();
    const float read = __shfl_xor_sync(0xffffffffu, slot[(warp + 1) % warps], 1);
    if (SYNCED) __syncthreads();
    if (threadIdx.x % 32 == 0) slot[warp] = -1.0f;  // unsynced, the missing barrier is before this
    reinterpret_cast<float*>(out)[blockIdx.x * blockDim.x + threadIdx.x] = read;
}

}  // namespace

extern "C" {

// race_probe_warps: out[thread] is what it read (1 + the next warp, race-free). Round robin hides
// the race, warps ahead shows it (emulator_schedules_show_races), ThreadSanitizer reports it in
// any schedule (emulated_kernels_have_no_data_races).
void race_probe_warps(const uint64_t out) { read_next_warp<false>(out); }

// race_probe_warps_synced: the same with the block barrier before the overwrite: race-free.
void race_probe_warps_synced(const uint64_t out) { read_next_warp<true>(out); }

// race_probe_blocks: block b writes 1 + what block b - 1 wrote (block 0: 1), a chain no launch
// orders; out[b] = b + 1 only when the blocks run in order.
void race_probe_blocks(const uint64_t out) {
    float* o = reinterpret_cast<float*>(out);
    if (threadIdx.x == 0) o[blockIdx.x] = blockIdx.x == 0 ? 1.0f : o[blockIdx.x - 1] + 1.0f;
}

}  // extern "C"
