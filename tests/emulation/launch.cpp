// The emulator's runner (see cuda_emulation.h), built by tests/kernel_emulation.rs into a shared
// library together with kernels/embed.cu, fora.cu and norm.cu (each its own translation unit,
// compiled as C++ with -DFORA_EMULATION): fora_emulate_launch(name, grid, block,
// shared_mem_bytes, params) runs one kernel launch to completion.
//
// Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread; blocks run one
// after another. A fiber runs until it reaches a barrier (__syncthreads, or one of the two
// barriers of a warp shuffle) and then yields; a barrier opens when every live thread of its
// block (or warp) has arrived, and a thread that returns leaves its barriers. Cooperative
// scheduling makes this deterministic and cheap (no OS threads, no locks).
#include <ucontext.h>

#include <cstring>
#include <string>
#include <vector>

#include "cuda_emulation.h"
#include "params.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// The kernels, from their own translation units.
extern "C" {
void patch_embed(const PatchEmbedParams p);
void fora_reuse(const ForaReuseParams p);
void fora_reuse_final(const ForaReuseFinalParams p);
void layernorm_modulate(const LayerNormModulateParams p);
void residual_layernorm(const ResidualLayerNormParams p);
}

namespace {

using Kernel = void (*)(const void* params);

// A barrier of cooperative fibers: opens when `arrived` reaches the live participants.
struct Barrier {
    int live = 0;
    int arrived = 0;
    unsigned generation = 0;

    void open_if_complete() {
        if (arrived > 0 && arrived >= live) {
            arrived = 0;
            ++generation;
        }
    }
};

struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    bool done = false;
};

constexpr size_t kStackBytes = 64 * 1024;  // the kernels' frames are a few KiB

struct Launch {
    Kernel kernel = nullptr;
    const void* params = nullptr;
    unsigned grid = 0, block = 0;
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<float> warp_slots;  // 32 per warp
    std::vector<unsigned char> dynamic_smem;
    unsigned current = 0;  // the running fiber
};

thread_local Launch* launch_state = nullptr;

void yield_to_scheduler() {
    Launch& l = *launch_state;
    swapcontext(&l.fibers[l.current].context, &l.scheduler);
}

void wait_at(Barrier& b) {
    const unsigned gen = b.generation;
    ++b.arrived;
    b.open_if_complete();
    while (b.generation == gen) yield_to_scheduler();
}

void fiber_main(int index) {
    Launch& l = *launch_state;
    l.kernel(l.params);
    // A thread that returned no longer takes part in barriers.
    Barrier& w = l.warp_barriers[index / 32];
    --w.live;
    w.open_if_complete();
    --l.block_barrier.live;
    l.block_barrier.open_if_complete();
    l.fibers[index].done = true;
    // Returning switches to uc_link, the scheduler.
}

void run_block(Launch& l, unsigned b) {
    const unsigned n = l.block;
    l.block_barrier = Barrier{static_cast<int>(n), 0, 0};
    for (unsigned w = 0; w < l.warp_barriers.size(); ++w) {
        const unsigned lanes = n - w * 32 < 32 ? n - w * 32 : 32;
        l.warp_barriers[w] = Barrier{static_cast<int>(lanes), 0, 0};
    }
    // Uninitialized shared memory: NaN bytes, so reading unwritten smem shows.
    std::memset(l.dynamic_smem.data(), 0xff, l.dynamic_smem.size());
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = l.fibers[t];
        f.done = false;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.data();
        f.context.uc_stack.ss_size = f.stack.size();
        f.context.uc_link = &l.scheduler;
        makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_main), 1, static_cast<int>(t));
    }
    blockIdx = {b, 0, 0};
    blockDim = {n, 1, 1};
    gridDim = {l.grid, 1, 1};
    // Round robin until every fiber has returned; a waiting fiber re-checks its barrier.
    for (bool running = true; running;) {
        running = false;
        for (unsigned t = 0; t < n; ++t) {
            if (l.fibers[t].done) continue;
            running = true;
            l.current = t;
            threadIdx = {t, 0, 0};
            swapcontext(&l.scheduler, &l.fibers[t].context);
        }
    }
}

template <typename P, void (*K)(const P)>
void call(const void* params) {
    K(*static_cast<const P*>(params));
}

Kernel find(const std::string& name) {
    if (name == "patch_embed") return call<PatchEmbedParams, patch_embed>;
    if (name == "fora_reuse") return call<ForaReuseParams, fora_reuse>;
    if (name == "fora_reuse_final") return call<ForaReuseFinalParams, fora_reuse_final>;
    if (name == "layernorm_modulate") return call<LayerNormModulateParams, layernorm_modulate>;
    if (name == "residual_layernorm") return call<ResidualLayerNormParams, residual_layernorm>;
    return nullptr;
}

}  // namespace

void fora_emulation_syncthreads() { wait_at(launch_state->block_barrier); }

float fora_emulation_shfl_xor(float v, int lane_mask) {
    Launch& l = *launch_state;
    const unsigned warp = l.current / 32, lane = l.current % 32;
    float* slots = &l.warp_slots[warp * 32];
    slots[lane] = v;
    wait_at(l.warp_barriers[warp]);
    const float other = slots[lane ^ static_cast<unsigned>(lane_mask)];
    wait_at(l.warp_barriers[warp]);
    return other;
}

void* fora_emulation_dynamic_smem_bytes() { return launch_state->dynamic_smem.data(); }

// 0: ran; 1: unknown kernel; 2: bad launch shape.
extern "C" int fora_emulate_launch(const char* name, unsigned grid_x, unsigned block_x,
                                   unsigned shared_mem_bytes, const void* params) {
    const Kernel kernel = find(name);
    if (kernel == nullptr) return 1;
    if (grid_x == 0 || block_x == 0 || block_x > 1024) return 2;
    Launch l;
    l.kernel = kernel;
    l.params = params;
    l.grid = grid_x;
    l.block = block_x;
    l.fibers.resize(block_x);
    for (Fiber& f : l.fibers) f.stack.resize(kStackBytes);
    l.warp_barriers.resize((block_x + 31) / 32);
    l.warp_slots.assign(l.warp_barriers.size() * 32, 0.0f);
    l.dynamic_smem.resize(shared_mem_bytes);
    launch_state = &l;
    for (unsigned b = 0; b < grid_x; ++b) run_block(l, b);
    launch_state = nullptr;
    return 0;
}
