// The emulator's runner (see cuda_emulation.h), built by tests/kernel_emulation.rs into a shared
// library together with every kernels/*.cu (each its own translation unit, compiled as C++
// with -DFORA_EMULATION): fora_emulate_launch(name, grid,
// block, shared_mem_bytes, params) runs one kernel launch to completion.
//
// Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread; blocks run one
// after another, or a cluster's blocks together (kernels with __cluster_dims__, cluster_size_of),
// their threads one scheduler's fibers. A fiber runs until it reaches a barrier (__syncthreads, or one of the two
// barriers of a warp shuffle) and then yields; a barrier opens when every live thread of its
// block (warp, cluster) has arrived, and a thread that returns leaves its barriers. Cooperative
// scheduling makes this deterministic and cheap (no OS threads, no locks).
//
// A fiber starts with makecontext / setcontext and then switches with _setjmp / _longjmp, which
// save no signal mask: swapcontext makes a sigprocmask system call at every switch, which was
// half the emulator's time. (_FORTIFY_SOURCE's longjmp check refuses a jump to another stack.)
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "cuda_emulation.h"
#include "params.h"

#ifdef FORA_EMULATION_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" {
void __tsan_read_range(void* addr, unsigned long size);
void __tsan_write_range(void* addr, unsigned long size);
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
}
#endif

// The race check (kernel_emulation.rs: emulated_kernels_have_no_data_races). Its build defines
// FORA_EMULATION_TSAN and compiles the kernels with ThreadSanitizer, this file without: every
// emulated thread is a TSan fiber, switched to without implied order, and the emulator tells TSan
// what orders threads (block, warp, warpgroup and cluster barriers, mbarrier phases, the end of
// one cluster before the next starts) and which memory its own operations access on the kernels'
// behalf (cp.async, TMA, ldmatrix, wgmma operands, mbarriers). TSan then reports two accesses to
// a byte, one a write, that nothing orders: a race on a GPU whatever the schedule, where the
// warps-ahead schedules show only the races that change a result. Elsewhere these are no-ops.
namespace race {
#ifdef FORA_EMULATION_TSAN
void release(const void* sync) { __tsan_release(const_cast<void*>(sync)); }
void acquire(const void* sync) { __tsan_acquire(const_cast<void*>(sync)); }
void read(const void* p, size_t bytes) { __tsan_read_range(const_cast<void*>(p), bytes); }
void write(const void* p, size_t bytes) { __tsan_write_range(const_cast<void*>(p), bytes); }
// The emulator's own copies in and out of its bookkeeping, which TSan would see through its
// memcpy / memset interceptors, are not the kernels' accesses (those are reported explicitly).
struct Untracked {
    Untracked() { __tsan_ignore_thread_begin(); }
    ~Untracked() { __tsan_ignore_thread_end(); }
    Untracked(const Untracked&) = delete;
    Untracked& operator=(const Untracked&) = delete;
};
// The OS thread's own context, where the scheduler runs (first asked for there: launch_begins).
void* scheduler_fiber() {
    thread_local void* const fiber = __tsan_get_current_fiber();
    return fiber;
}
// Fiber i of this OS thread (thread i of a cluster's blocks, rank-major). Creating one takes TSan
// most of a millisecond, so they are made once and kept: thread i of the next block runs on the
// same fiber (ordered after its predecessor, as every thread of a cluster is after the previous
// cluster's anyway).
void* thread_fiber(size_t i) {
    thread_local std::vector<void*> pool;
    while (pool.size() <= i) pool.push_back(__tsan_create_fiber(0));
    return pool[i];
}
void switch_to(void* fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
// The scheduler runs emulated thread i (of the running cluster) next / the thread hands back.
void enter_thread(size_t i) { switch_to(thread_fiber(i)); }
void leave_thread() { switch_to(scheduler_fiber()); }
void in_scheduler() { (void)scheduler_fiber(); }
#else
void release(const void*) {}
void acquire(const void*) {}
void read(const void*, size_t) {}
void write(const void*, size_t) {}
struct Untracked {
    Untracked() {}
    ~Untracked() {}
};
void enter_thread(size_t) {}
void leave_thread() {}
void in_scheduler() {}
#endif
// Clusters run one after another on an OS thread (and reuse its `__shared__` statics): the
// threads of cluster s start after what every thread of cluster s - 1 did (each releases
// `order[s % 2]` as it ends and acquires `order[(s - 1) % 2]` as it starts), and the host's work
// before a launch comes before its first cluster, its last cluster's before the host goes on.
// Threads of one cluster get no order from this: one that starts after another has ended
// acquires the previous cluster's object, not theirs.
thread_local unsigned serial = 0;
thread_local char order[2];
void cluster_begins() { ++serial; }
void thread_starts() { acquire(&order[(serial - 1) & 1]); }
void thread_ends() { release(&order[serial & 1]); }
void launch_begins() {
    in_scheduler();
    release(&order[serial & 1]);
}
void launch_ends() { acquire(&order[serial & 1]); }
}  // namespace race

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// The kernels, from their own translation units.
extern "C" {
void bandwidth_read(const BandwidthParams p);
void bandwidth_copy(const BandwidthParams p);
void timestep_embedding(const TimestepEmbedParams p);
void silu_f32_bf16(const SiluParams p);
void label_silu(const LabelSiluParams p);
void sampler_step(const SamplerStepParams p);
void final_sampler_step(const SamplerStepParams p);
void unpatchify(const UnpatchifyParams p);
void normal_fill(const NormalFillParams p);
void patch_embed(const PatchEmbedParams p);
void vae_unfold(const VaeUnfoldParams p);
void vae_cast_bf16(const VaeElementwiseParams p);
void vae_add(const VaeElementwiseParams p);
void vae_group_stats(const VaeGroupNormParams p);
void vae_group_finalize(const VaeGroupNormParams p);
void vae_group_apply(const VaeGroupNormParams p);
void vae_softmax(const VaeSoftmaxParams p);
void fora_reuse(const ForaReuseParams p);
void fora_reuse_final(const ForaReuseFinalParams p);
void fora_reuse_final_t4(const ForaReuseFinalParams p);
void fora_reuse_final_l4(const ForaReuseFinalParams p);
void fora_reuse_final_t2(const ForaReuseFinalParams p);
void fora_reuse_final_p4(const ForaReuseFinalParams p);
void fora_reuse_final_t4_p2(const ForaReuseFinalParams p);
void fora_reuse_final_t4_r3(const ForaReuseFinalParams p);
void fora_reuse_final_r4(const ForaReuseFinalParams p);
void fora_sum_final(const ForaReuseFinalParams p);
void fora_sum_final_t4(const ForaReuseFinalParams p);
void fora_cache_sum_1(const ForaCacheSumParams p);
void fora_cache_sum_2(const ForaCacheSumParams p);
void fora_cache_sum_3(const ForaCacheSumParams p);
void fora_cache_sum_4(const ForaCacheSumParams p);
void layernorm_modulate(const LayerNormModulateParams p);
void residual_layernorm(const ResidualLayerNormParams p);
void layernorm_modulate_w4(const LayerNormModulateParams p);
void residual_layernorm_w4(const ResidualLayerNormParams p);
void attention_d64(const AttentionParams p);
void attention_d72(const AttentionParams p);
void attention_d128(const AttentionParams p);
void attention_v2_d64(const AttentionParams p);
void attention_v2_d72(const AttentionParams p);
void attention_v2_d128(const AttentionParams p);
void attention_wgmma_d64(const AttentionParams p);
void attention_wgmma_d72(const AttentionParams p);
void attention_wgmma_d128(const AttentionParams p);
void attention_wgmma_m64_d64(const AttentionParams p);
void attention_wgmma_m64_d72(const AttentionParams p);
void attention_wgmma_m64_d128(const AttentionParams p);
void attention_wgmma_mn_d64(const AttentionParams p);
void attention_wgmma_mn_d72(const AttentionParams p);
void attention_wgmma_mn_d128(const AttentionParams p);
void attention_wgmma_mn_m64_d64(const AttentionParams p);
void attention_wgmma_mn_m64_d72(const AttentionParams p);
void attention_wgmma_mn_m64_d128(const AttentionParams p);
void attention_wgmma_mn_deep_m64_d64(const AttentionParams p);
void attention_wgmma_mn_deep_m64_d72(const AttentionParams p);
void attention_wgmma_mn_deep_m64_d128(const AttentionParams p);
void attention_wgmma_mn_split_m64_d64(const AttentionParams p);
void attention_wgmma_mn_split_m64_d72(const AttentionParams p);
void attention_wgmma_mn_split_m64_d128(const AttentionParams p);
void attention_tma_d64(const AttentionTmaParams p);
void attention_tma_d72(const AttentionTmaParams p);
void attention_tma_d128(const AttentionTmaParams p);
void attention_tma_pp_d64(const AttentionTmaParams p);
void attention_tma_pp_d72(const AttentionTmaParams p);
void attention_tma_pp_d128(const AttentionTmaParams p);
void gemm_bf16_128x128(const GemmParams p);
void gemm_bf16_128x128_k64(const GemmParams p);
void gemm_bf16_64x128(const GemmParams p);
void gemm_bf16_32x128(const GemmParams p);
void gemm_epilogue_f32(const GemmEpilogueParams p);
void wgmma_probe(const WgmmaProbeParams p);
void tma_probe(const TmaProbeParams p);
void tma_cluster_probe(const TmaProbeParams p);
void gemm_wgmma_128x256(const GemmParams p);
void gemm_wgmma_128x128(const GemmParams p);
void gemm_wgmma_64x128(const GemmParams p);
void gemm_tma_128x128(const GemmTmaParams p);
void gemm_tma_ln_64x72(const GemmLayerNormParams p);
void gemm_tma_ln_mc_64x72(const GemmLayerNormParams p);
void gemm_tma_ln_128x72(const GemmLayerNormParams p);
void gemm_tma_ln_mc_128x72(const GemmLayerNormParams p);
void gemm_tma_ln_128x144(const GemmLayerNormParams p);
void gemm_tma_ln_mc_128x144(const GemmLayerNormParams p);
void qkv_attention_d64(const QkvAttentionParams p);
void qkv_attention_d72(const QkvAttentionParams p);
void qkv_attention_mc_d64(const QkvAttentionParams p);
void qkv_attention_mc_d72(const QkvAttentionParams p);
void gemm_tma_128x192(const GemmTmaParams p);
void gemm_tma_128x112(const GemmTmaParams p);
void gemm_tma_128x144(const GemmTmaParams p);
void gemm_tma_128x256(const GemmTmaParams p);
void gemm_tma_256x128(const GemmTmaParams p);
void gemm_tma_st_128x128(const GemmTmaParams p);
void gemm_tma_st_pp_128x128(const GemmTmaParams p);
void gemm_tma_st_256x128(const GemmTmaParams p);
void gemm_tma_st_128x192(const GemmTmaParams p);
void gemm_tma_pp_128x128(const GemmTmaParams p);
void gemm_tma_mc_128x128(const GemmTmaParams p);
void gemm_tma_mc_128x192(const GemmTmaParams p);
void gemm_tma_mc_128x256(const GemmTmaParams p);
void gemm_tma_mc_pp_128x128(const GemmTmaParams p);
void gemm_tma_c4x1_128x128(const GemmTmaParams p);
void gemm_tma_c4x1_128x192(const GemmTmaParams p);
void gemm_tma_c4x2_128x128(const GemmTmaParams p);
void gemm_tma_c4x2_128x192(const GemmTmaParams p);
void gemm_tma_k2_128x128(const GemmTmaParams p);
void gemm_tma_k3_128x128(const GemmTmaParams p);
void gemm_tma_k4_128x128(const GemmTmaParams p);
// The emulator's own race probes (race_probes.cpp).
void race_probe_warps(const uint64_t out);
void race_probe_warps_synced(const uint64_t out);
void race_probe_blocks(const uint64_t out);
}

namespace {

using Kernel = void (*)(const void* params);

// A barrier of cooperative fibers: opens when `arrived` reaches the live participants.
struct Barrier {
    int live = 0;
    int arrived = 0;
    unsigned generation = 0;
    // The race check's order: an arrival in generation g releases sync[g % 2], which the
    // generation's waiters acquire once it opens (two objects: a thread that has passed may
    // arrive for g + 1 before a slower one leaves g; none can reach g + 2 first).
    char sync[2] = {};

    void open_if_complete() {
        if (arrived > 0 && arrived >= live) {
            arrived = 0;
            ++generation;
        }
    }
};

// A cp.async issued and not yet retired: its 16 source bytes (read at issue) and where they go.
struct PendingCopy {
    unsigned char* dst;
    unsigned char bytes[16];
};

// A wgmma issued and not yet retired: where its accumulators are and its operands. An RS wgmma's
// A rows of this thread (g and g + 8 of its warp's 16) are taken at issue, when the warpgroup's
// threads exchange their registers; shared-memory operands are read when it is carried out.
struct PendingWgmma {
    int n;
    float* d;
    bool rs;
    bool b_mn;  // B MN-major (transpose-B)
    uint64_t desc_a, desc_b;
    float a_rows[2][16];
    // RS: this thread's 4 A registers (the kernel's array) and their values at issue, which the
    // thread may not change before the wait that retires the wgmma (the in-flight check).
    const uint32_t* a_regs = nullptr;
    uint32_t a_at_issue[4];
};

// An accumulator array with wgmmas in flight on it: its values as the last of them to retire
// left it (or as at the first issue), which the thread itself may not change meanwhile.
struct InFlightAccumulator {
    float* d;
    std::vector<float> expect;
    int pending;
};

// A thread's asynchronous operations in flight: committed groups, oldest first, and the group
// still open (operations issued since the last commit).
template <typename Op>
struct AsyncGroups {
    std::vector<std::vector<Op>> committed;
    std::vector<Op> open;
    void clear() {
        committed.clear();
        open.clear();
    }
    // No operation in flight (empty groups may stay pending: they hold nothing).
    bool empty() const {
        for (const std::vector<Op>& g : committed)
            if (!g.empty()) return false;
        return open.empty();
    }
    void commit() {
        committed.push_back(std::move(open));
        open.clear();
    }
};

// A TMA copy issued and not yet landed: its box, already swizzled, and where it goes.
struct PendingTma {
    unsigned char* smem;  // the destination block's dynamic shared memory
    uint32_t dst;
    std::vector<unsigned char> bytes;
};

// An mbarrier: arrivals a phase, arrivals still due and transaction bytes still due in the
// running phase, phases completed (its parity is what try_wait.parity compares), and the TMA
// copies that count against it.
struct MBarrier {
    int arrivals = 0;
    int pending = 0;
    long long tx = 0;
    unsigned phase = 0;
    std::vector<PendingTma> copies;
    // The race check's order: arrivals and TMA copies counted against a phase release
    // sync[phase % 2], which a wait that sees that phase complete acquires.
    char sync[2] = {};
};

struct Fiber {
    ucontext_t context;  // its start (fiber_main on its stack)
    jmp_buf resume;      // where it yielded
    bool started = false;
    std::vector<char> stack;
    bool done = false;
    AsyncGroups<PendingCopy> copies;
    AsyncGroups<PendingWgmma> wgmmas;
    std::vector<InFlightAccumulator> accumulators;
    // (dynamic shared offset, bytes) of this thread's generic-proxy writes (landed cp.async
    // copies, st_shared_for_async_proxy stores) and reads (ld_shared_for_async_proxy) since its
    // last fence.proxy.async (see Block::unfenced).
    std::vector<std::pair<uint32_t, uint32_t>> unfenced_writes, unfenced_reads;
    // barrier.cluster.arrive without its wait yet: the cluster barrier's generation it arrived in.
    bool cluster_arrived = false;
    unsigned cluster_generation = 0;
    // Whether it has waited on the cluster barrier: before that, another block of the cluster
    // may not have started, and touching its shared memory is undefined (CUDA's cluster.sync
    // before distributed shared memory).
    bool cluster_waited = false;
};

constexpr size_t kStackBytes = 64 * 1024;  // the kernels' frames are a few KiB
// Bytes after a block's dynamic shared memory, NaN-filled at its start and checked at its end:
// a read past the end reads NaN, a write past it aborts the launch (on a GPU it would land in
// another block's shared memory, or fault).
constexpr size_t kSmemGuardBytes = 256;

// One block of a launch: its threads, barriers, warp-collective exchange slots and shared memory.
struct Block {
    uint3 idx{};
    std::vector<Fiber> fibers;
    Barrier block_barrier;
    // bar.sync / bar.arrive with an id (1-15) and a thread count: `live` is the count of the
    // first use (every use must name the same), set again when a generation opens.
    std::array<Barrier, 16> named_barriers;
    std::vector<Barrier> warp_barriers;
    std::vector<Barrier> warpgroup_barriers;  // 128 threads each
    std::vector<float> warp_slots;  // 32 per warp
    // Per warp and lane: an address and 8 registers, for the warp-collective operations.
    std::vector<const void*> warp_addrs;
    std::vector<uint32_t> warp_regs;
    // Per warpgroup and thread: the 4 A registers of an RS wgmma.
    std::vector<uint32_t> warpgroup_regs;
    std::vector<unsigned char> smem_storage;
    unsigned char* dynamic_smem = nullptr;  // 1024-byte aligned inside smem_storage
    std::map<uint32_t, MBarrier> mbarriers;  // by shared address
    // The proxy check: per dynamic shared byte, 1 + the thread whose generic-proxy write (a
    // cp.async, or a store through st_shared_for_async_proxy) it holds with no fence.proxy.async
    // by that thread since, else 0. The async proxy (a wgmma reading its operands, a TMA copy
    // being issued) may not see such a write: reading or overwriting it there is an error. Also
    // per byte, 1 + the thread whose generic read (ld_shared_for_async_proxy) has had no fence
    // since: a TMA copy may not overwrite it (a read not yet ordered before the copy may see its
    // bytes). Other plain C++ loads and stores are not tracked (the emulator does not see them).
    std::vector<uint16_t> unfenced, unfenced_read;
};

// A launch runs one cluster of blocks at a time (a cluster of one without __cluster_dims__): the
// cluster's blocks' threads are fibers of one scheduler, so they can wait on each other
// (cluster barrier, another block's mbarrier, TMA multicast into every block of the cluster).
struct Launch {
    const char* name = "";
    Kernel kernel = nullptr;
    const void* params = nullptr;
    dim3 grid_dim;
    unsigned block = 0;    // threads a block
    unsigned cluster = 1;  // blocks a cluster, along x
    std::vector<Block> blocks;  // the running cluster's, by rank
    Barrier cluster_barrier;
    jmp_buf scheduler;  // where the scheduler switched to the running fiber
    // The first failure of a check the launch runs on after (the proxy check, the in-flight
    // register check): the launch returns 3 with it.
    std::string check_error;
    size_t dynamic_smem_bytes = 0;
    unsigned rank = 0;     // the running fiber's block in the cluster
    unsigned current = 0;  // the running fiber's thread in its block
    // Counts events that can unblock a waiting thread (arrivals, copies issued or landed, waits
    // returning, threads ending, yields of threads not blocked): a scheduler round in which it
    // does not move had every thread blocked, a deadlock (a hang on a GPU).
    unsigned long long progress = 0;

    Block& here() { return blocks[rank]; }
};

thread_local Launch* launch_state = nullptr;

Block& here() { return launch_state->here(); }

void yield_to_scheduler() {
    Launch& l = *launch_state;
    if (_setjmp(l.here().fibers[l.current].resume) == 0) {
        race::leave_thread();
        _longjmp(l.scheduler, 1);
    }
}

void wait_at(Barrier& b) {
    const unsigned gen = b.generation;
    race::release(&b.sync[gen & 1]);
    ++b.arrived;
    ++launch_state->progress;
    b.open_if_complete();
    while (b.generation == gen) yield_to_scheduler();
    race::acquire(&b.sync[gen & 1]);
    ++launch_state->progress;
}

void fiber_main(int rank, int index) {
    Launch& l = *launch_state;
    race::thread_starts();
    l.kernel(l.params);
    race::thread_ends();
    // The hardware gives no result for copies or wgmmas still in flight when a thread exits.
    Block& block = l.blocks[static_cast<unsigned>(rank)];
    const Fiber& self = block.fibers[index];
    if (self.cluster_arrived) {
        std::fprintf(stderr, "emulated %s: thread %d exited between barrier.cluster.arrive and its wait\n", l.name,
                     index);
        std::abort();
    }
    if (!self.copies.empty() || !self.wgmmas.empty()) {
        std::fprintf(stderr, "emulated %s: thread %d exited with cp.async or wgmma operations not waited for\n",
                     l.name, index);
        std::abort();
    }
    // A thread that returned no longer takes part in barriers.
    Barrier& w = block.warp_barriers[index / 32];
    --w.live;
    w.open_if_complete();
    Barrier& wg = block.warpgroup_barriers[index / 128];
    --wg.live;
    wg.open_if_complete();
    --block.block_barrier.live;
    block.block_barrier.open_if_complete();
    --l.cluster_barrier.live;
    l.cluster_barrier.open_if_complete();
    block.fibers[index].done = true;
    ++l.progress;
    // Back to the scheduler for good: this stack is reused or freed, never resumed.
    race::leave_thread();
    _longjmp(l.scheduler, 1);
}

void start_block(Launch& l, unsigned rank, uint3 idx) {
    Block& blk = l.blocks[rank];
    const unsigned n = l.block;
    blk.idx = idx;
    blk.block_barrier = Barrier{static_cast<int>(n), 0, 0};
    blk.named_barriers = {};
    for (unsigned w = 0; w < blk.warp_barriers.size(); ++w) {
        const unsigned lanes = n - w * 32 < 32 ? n - w * 32 : 32;
        blk.warp_barriers[w] = Barrier{static_cast<int>(lanes), 0, 0};
    }
    for (unsigned w = 0; w < blk.warpgroup_barriers.size(); ++w) {
        const unsigned threads = n - w * 128 < 128 ? n - w * 128 : 128;
        blk.warpgroup_barriers[w] = Barrier{static_cast<int>(threads), 0, 0};
    }
    // Uninitialized shared memory: NaN bytes, so reading unwritten smem shows.
    {
        race::Untracked untracked;
        std::memset(blk.dynamic_smem, 0xff, l.dynamic_smem_bytes + kSmemGuardBytes);
    }
    std::fill(blk.unfenced.begin(), blk.unfenced.end(), uint16_t{0});
    std::fill(blk.unfenced_read.begin(), blk.unfenced_read.end(), uint16_t{0});
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = blk.fibers[t];
        f.done = false;
        f.copies.clear();
        f.wgmmas.clear();
        f.accumulators.clear();
        f.unfenced_writes.clear();
        f.unfenced_reads.clear();
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.data();
        f.context.uc_stack.ss_size = f.stack.size();
        f.context.uc_link = nullptr;  // fiber_main never returns
        f.started = false;
        makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_main), 2, static_cast<int>(rank),
                    static_cast<int>(t));
    }
    blk.mbarriers.clear();
}

// Lazy threads (fora_emulate_set_lazy_threads): with stride s > 0, thread t of every block with
// t % s == s - 1 runs only in rounds where no other thread could move, and then one at a time,
// the highest first, until one moves: a lazy thread runs only when no eager thread and no
// higher lazy one can, so it falls as far behind as the kernel's synchronization allows. On a
// GPU nothing bounds how far a thread that only waits on an mbarrier (and never arrives on one)
// falls behind, and a parity wait two phases stale waits for a phase that may never come: round
// robin never shows that, lazy threads do (as a deadlock). Off (0) by default: it costs
// scheduler rounds.
thread_local unsigned lazy_stride = 0;

bool is_lazy(unsigned t) { return lazy_stride > 0 && t % lazy_stride == lazy_stride - 1; }

// Warps ahead (fora_emulate_set_warps_ahead): 0, round robin (every thread to its next barrier,
// then the next round), keeps the warps of a block in step at every warp-level barrier (each
// shuffle), so a race between a warp's shared-memory reads and another warp's later writes
// with no block barrier between them never shows. 1: each round runs the warps one at a time,
// the lowest first, each as far as it can go before the next starts; -1: the highest first.
// Either is a schedule a GPU may choose (nothing orders warps between barriers), and a
// kernel's result must not depend on which. -1 also runs a launch's blocks from the last
// (fora_emulate_launch). 2: the same with whole blocks for warps, the lowest rank of the cluster
// first, so that a block runs on past every barrier of its own (a warpgroup's wgmma, a
// __syncthreads) before the next block of its cluster moves: what another block writes into its
// shared memory after a cluster barrier the reader did not wait on arrives too late. Off (0) by
// default.
thread_local int warps_ahead = 0;

// Runs the cluster whose first block is `first` (its blocks at x, x + 1, ..., same y and z).
void run_cluster(Launch& l, uint3 first) {
    const unsigned n = l.block;
    race::cluster_begins();
    for (unsigned r = 0; r < l.cluster; ++r) start_block(l, r, uint3{first.x + r, first.y, first.z});
    l.cluster_barrier = Barrier{static_cast<int>(n * l.cluster), 0, 0};
    blockDim = {n, 1, 1};
    gridDim = l.grid_dim;
    // Round robin until every fiber has returned; a waiting fiber re-checks its barrier. The
    // eager threads first; the lazy ones only when the eager ones did not move.
    for (bool running = true; running;) {
        running = false;
        const unsigned long long before = l.progress;
        auto run_thread = [&](unsigned r, unsigned t) {
            Block& blk = l.blocks[r];
            running = true;
            l.rank = r;
            l.current = t;
            threadIdx = {t, 0, 0};
            blockIdx = blk.idx;
            Fiber& f = blk.fibers[t];
            if (_setjmp(l.scheduler) == 0) {
                race::enter_thread(static_cast<size_t>(r) * n + t);
                if (f.started) _longjmp(f.resume, 1);
                f.started = true;
                setcontext(&f.context);
            }
        };
        if (warps_ahead == 0) {
            for (unsigned r = 0; r < l.cluster; ++r) {
                for (unsigned t = 0; t < n; ++t) {
                    if (!l.blocks[r].fibers[t].done && !is_lazy(t)) run_thread(r, t);
                }
            }
        } else {
            // Each warp (2: block) of every block of the cluster, in the chosen order, until it
            // stops moving: blocked at a barrier a slower warp has yet to reach, or returned.
            const unsigned width = warps_ahead == 2 ? n : 32;
            const unsigned warps = (n + width - 1) / width, all = l.cluster * warps;
            for (unsigned k = 0; k < all; ++k) {
                const unsigned i = warps_ahead > 0 ? k : all - 1 - k;
                const unsigned r = i / warps, first = i % warps * width, end = std::min(first + width, n);
                for (bool moved = true; moved;) {
                    const unsigned long long warp_before = l.progress;
                    bool ran = false;
                    for (unsigned t = first; t < end; ++t) {
                        if (!l.blocks[r].fibers[t].done && !is_lazy(t)) {
                            run_thread(r, t);
                            ran = true;
                        }
                    }
                    moved = ran && l.progress != warp_before;
                }
            }
        }
        // The lazy threads, highest first, until one moves.
        for (unsigned r = l.cluster; lazy_stride > 0 && l.progress == before && r-- > 0;) {
            for (unsigned t = n; l.progress == before && t-- > 0;) {
                if (!l.blocks[r].fibers[t].done && is_lazy(t)) run_thread(r, t);
            }
        }
        if (running && l.progress == before) {
            std::fprintf(stderr, "emulated %s: deadlock in the cluster of block (%u, %u, %u): every thread waits on a barrier no one will complete\n",
                         l.name, first.x, first.y, first.z);
            std::abort();
        }
    }
    for (const Block& blk : l.blocks) {
        const unsigned char* guard = blk.dynamic_smem + l.dynamic_smem_bytes;
        for (size_t i = 0; i < kSmemGuardBytes; ++i) {
            if (guard[i] != 0xff) {
                std::fprintf(stderr, "emulated %s: a thread of block (%u, %u, %u) wrote past its %zu bytes of dynamic shared memory (at byte %zu)\n",
                             l.name, blk.idx.x, blk.idx.y, blk.idx.z, l.dynamic_smem_bytes, l.dynamic_smem_bytes + i);
                std::abort();
            }
        }
    }
    // A TMA copy no thread ever waited for has no defined result either.
    for (const Block& blk : l.blocks) {
        for (const auto& [addr, bar] : blk.mbarriers) {
            if (!bar.copies.empty()) {
                std::fprintf(stderr, "emulated %s: block ended with TMA copies on the mbarrier at shared byte %u never waited for\n",
                             l.name, addr);
                std::abort();
            }
        }
    }
}

// What a wgmma probe's threads do to the wgmma's registers: nothing; add 1 to d[0] after its
// wait (allowed); change d[0] or an A register between its issue and its wait (refused).
enum class RegisterTouch { None, After, Accumulator, A };

// proxy_probe_fenced / proxy_probe_unfenced (kernel_emulation.rs: emulator_checks_proxy_fences):
// one warpgroup cp.asyncs a 64 x 64 bf16 tile of ones (64 rows of 128 bytes) into shared memory,
// waits for it, fences the async proxy (or not), meets at a block barrier and runs one RS wgmma
// m64n64k16 of ones over it (the tile as a K-major B); out[thread] is its first accumulator, 16.
// Without the fence the proxy check must fail the launch. register_probe_after / _acc / _a
// (emulator_checks_registers_in_flight): the fenced probe touching its registers (TOUCH): after
// the wait out[thread] is 17; before it, the in-flight register check must fail the launch.
template <bool FENCE, RegisterTouch TOUCH = RegisterTouch::None>
void proxy_probe(const uint64_t out) {
    static const uint16_t ones[8] = {0x3f80, 0x3f80, 0x3f80, 0x3f80, 0x3f80, 0x3f80, 0x3f80, 0x3f80};
    unsigned char* smem = fora_emulation_dynamic_smem<unsigned char>();
    const unsigned t = threadIdx.x;
    for (unsigned i = 0; i < 4; ++i) fora_emulation_cp_async(smem + 16 * (4 * t + i), ones, 16);
    fora_emulation_cp_async_commit();
    fora_emulation_cp_async_wait(0);
    if (FENCE) fora_emulation_fence_proxy_async();
    __syncthreads();
    // K-major, 128-byte swizzle, 8-row atoms 1024 bytes apart, from shared offset 0.
    const uint64_t desc = (uint64_t{16 >> 4} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
    uint32_t a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
    float d[32] = {};
    fora_emulation_wgmma_rs(64, d, a, desc, 0);
    fora_emulation_wgmma_commit();
    if (TOUCH == RegisterTouch::Accumulator) d[0] += 1.0f;
    if (TOUCH == RegisterTouch::A) a[0] = 0;
    fora_emulation_wgmma_wait(0);
    if (TOUCH == RegisterTouch::After) d[0] += 1.0f;
    reinterpret_cast<float*>(out)[t] = d[0];
}

// smem_guard_probe (kernel_emulation.rs: emulator_guards_dynamic_shared_memory): thread t writes
// byte t of the dynamic shared memory, all of it and, with one thread more than its bytes, one
// past its end, which the emulator must refuse.
void smem_guard_probe(const uint64_t /*unused*/) {
    fora_emulation_dynamic_smem<unsigned char>()[threadIdx.x] = 1;
}

// proxy_probe_tma_fenced / _unfenced (TmaProbeParams; 128 threads, dynamic shared memory
// box_rows x 128 bytes + 8): the threads zero the box with plain stores (the generic proxy), fence
// the async proxy (or not), meet, and thread 0 loads the box at (x0, y0) over them by TMA; out
// gets the box (box_rows x 64 bf16). Without the fence the proxy check must fail the launch.
template <bool FENCE>
void proxy_probe_tma(const TmaProbeParams p) {
    unsigned char* smem = fora_emulation_dynamic_smem<unsigned char>();  // 1024-byte aligned
    const uint32_t box_bytes = static_cast<uint32_t>(p.box_rows) * 128u;
    const uint32_t bar = box_bytes;
    if (threadIdx.x == 0) fora_emulation_mbarrier_init(bar, 1);
    for (uint32_t i = threadIdx.x; i < box_bytes / 16; i += blockDim.x) {
        std::memset(smem + 16 * i, 0, 16);
        fora_emulation_generic_store(smem + 16 * i, 16);
    }
    if (FENCE) fora_emulation_fence_proxy_async();
    __syncthreads();
    if (threadIdx.x == 0) {
        fora_emulation_mbarrier_arrive(bar, box_bytes);
        fora_emulation_tma_load_2d(0, &p.map, p.x0, p.y0, bar);
    }
    fora_emulation_mbarrier_wait(bar, 0);
    uint16_t* out = reinterpret_cast<uint16_t*>(p.out);
    for (uint32_t i = threadIdx.x; i < box_bytes / 2; i += blockDim.x) std::memcpy(out + i, smem + 2 * i, 2);
}

template <typename P, void (*K)(const P)>
void call(const void* params) {
    K(*static_cast<const P*>(params));
}

Kernel find(const std::string& name) {
    if (name == "bandwidth_read") return call<BandwidthParams, bandwidth_read>;
    if (name == "bandwidth_copy") return call<BandwidthParams, bandwidth_copy>;
    if (name == "timestep_embedding") return call<TimestepEmbedParams, timestep_embedding>;
    if (name == "silu_f32_bf16") return call<SiluParams, silu_f32_bf16>;
    if (name == "label_silu") return call<LabelSiluParams, label_silu>;
    if (name == "sampler_step") return call<SamplerStepParams, sampler_step>;
    if (name == "final_sampler_step") return call<SamplerStepParams, final_sampler_step>;
    if (name == "unpatchify") return call<UnpatchifyParams, unpatchify>;
    if (name == "normal_fill") return call<NormalFillParams, normal_fill>;
    if (name == "patch_embed") return call<PatchEmbedParams, patch_embed>;
    if (name == "vae_unfold") return call<VaeUnfoldParams, vae_unfold>;
    if (name == "vae_cast_bf16") return call<VaeElementwiseParams, vae_cast_bf16>;
    if (name == "vae_add") return call<VaeElementwiseParams, vae_add>;
    if (name == "vae_group_stats") return call<VaeGroupNormParams, vae_group_stats>;
    if (name == "vae_group_finalize") return call<VaeGroupNormParams, vae_group_finalize>;
    if (name == "vae_group_apply") return call<VaeGroupNormParams, vae_group_apply>;
    if (name == "vae_softmax") return call<VaeSoftmaxParams, vae_softmax>;
    if (name == "fora_reuse") return call<ForaReuseParams, fora_reuse>;
    if (name == "fora_reuse_final") return call<ForaReuseFinalParams, fora_reuse_final>;
    if (name == "fora_reuse_final_t4") return call<ForaReuseFinalParams, fora_reuse_final_t4>;
    if (name == "fora_reuse_final_l4") return call<ForaReuseFinalParams, fora_reuse_final_l4>;
    if (name == "fora_reuse_final_t2") return call<ForaReuseFinalParams, fora_reuse_final_t2>;
    if (name == "fora_reuse_final_p4") return call<ForaReuseFinalParams, fora_reuse_final_p4>;
    if (name == "fora_reuse_final_t4_p2") return call<ForaReuseFinalParams, fora_reuse_final_t4_p2>;
    if (name == "fora_reuse_final_t4_r3") return call<ForaReuseFinalParams, fora_reuse_final_t4_r3>;
    if (name == "fora_reuse_final_r4") return call<ForaReuseFinalParams, fora_reuse_final_r4>;
    if (name == "fora_sum_final") return call<ForaReuseFinalParams, fora_sum_final>;
    if (name == "fora_sum_final_t4") return call<ForaReuseFinalParams, fora_sum_final_t4>;
    if (name == "fora_cache_sum_1") return call<ForaCacheSumParams, fora_cache_sum_1>;
    if (name == "fora_cache_sum_2") return call<ForaCacheSumParams, fora_cache_sum_2>;
    if (name == "fora_cache_sum_3") return call<ForaCacheSumParams, fora_cache_sum_3>;
    if (name == "fora_cache_sum_4") return call<ForaCacheSumParams, fora_cache_sum_4>;
    if (name == "layernorm_modulate") return call<LayerNormModulateParams, layernorm_modulate>;
    if (name == "residual_layernorm") return call<ResidualLayerNormParams, residual_layernorm>;
    if (name == "layernorm_modulate_w4") return call<LayerNormModulateParams, layernorm_modulate_w4>;
    if (name == "residual_layernorm_w4") return call<ResidualLayerNormParams, residual_layernorm_w4>;
    if (name == "attention_d64") return call<AttentionParams, attention_d64>;
    if (name == "attention_d72") return call<AttentionParams, attention_d72>;
    if (name == "attention_d128") return call<AttentionParams, attention_d128>;
    if (name == "attention_v2_d64") return call<AttentionParams, attention_v2_d64>;
    if (name == "attention_v2_d72") return call<AttentionParams, attention_v2_d72>;
    if (name == "attention_v2_d128") return call<AttentionParams, attention_v2_d128>;
    if (name == "attention_wgmma_d64") return call<AttentionParams, attention_wgmma_d64>;
    if (name == "attention_wgmma_d72") return call<AttentionParams, attention_wgmma_d72>;
    if (name == "attention_wgmma_d128") return call<AttentionParams, attention_wgmma_d128>;
    if (name == "attention_wgmma_m64_d64") return call<AttentionParams, attention_wgmma_m64_d64>;
    if (name == "attention_wgmma_m64_d72") return call<AttentionParams, attention_wgmma_m64_d72>;
    if (name == "attention_wgmma_m64_d128") return call<AttentionParams, attention_wgmma_m64_d128>;
    if (name == "attention_wgmma_mn_d64") return call<AttentionParams, attention_wgmma_mn_d64>;
    if (name == "attention_wgmma_mn_d72") return call<AttentionParams, attention_wgmma_mn_d72>;
    if (name == "attention_wgmma_mn_d128") return call<AttentionParams, attention_wgmma_mn_d128>;
    if (name == "attention_wgmma_mn_m64_d64") return call<AttentionParams, attention_wgmma_mn_m64_d64>;
    if (name == "attention_wgmma_mn_m64_d72") return call<AttentionParams, attention_wgmma_mn_m64_d72>;
    if (name == "attention_wgmma_mn_m64_d128") return call<AttentionParams, attention_wgmma_mn_m64_d128>;
    if (name == "attention_wgmma_mn_deep_m64_d64") return call<AttentionParams, attention_wgmma_mn_deep_m64_d64>;
    if (name == "attention_wgmma_mn_deep_m64_d72") return call<AttentionParams, attention_wgmma_mn_deep_m64_d72>;
    if (name == "attention_wgmma_mn_deep_m64_d128") return call<AttentionParams, attention_wgmma_mn_deep_m64_d128>;
    if (name == "attention_wgmma_mn_split_m64_d64") return call<AttentionParams, attention_wgmma_mn_split_m64_d64>;
    if (name == "attention_wgmma_mn_split_m64_d72") return call<AttentionParams, attention_wgmma_mn_split_m64_d72>;
    if (name == "attention_wgmma_mn_split_m64_d128") return call<AttentionParams, attention_wgmma_mn_split_m64_d128>;
    if (name == "attention_tma_d64") return call<AttentionTmaParams, attention_tma_d64>;
    if (name == "attention_tma_d72") return call<AttentionTmaParams, attention_tma_d72>;
    if (name == "attention_tma_d128") return call<AttentionTmaParams, attention_tma_d128>;
    if (name == "attention_tma_pp_d64") return call<AttentionTmaParams, attention_tma_pp_d64>;
    if (name == "attention_tma_pp_d72") return call<AttentionTmaParams, attention_tma_pp_d72>;
    if (name == "attention_tma_pp_d128") return call<AttentionTmaParams, attention_tma_pp_d128>;
    if (name == "gemm_bf16_128x128") return call<GemmParams, gemm_bf16_128x128>;
    if (name == "gemm_bf16_128x128_k64") return call<GemmParams, gemm_bf16_128x128_k64>;
    if (name == "gemm_bf16_64x128") return call<GemmParams, gemm_bf16_64x128>;
    if (name == "gemm_bf16_32x128") return call<GemmParams, gemm_bf16_32x128>;
    if (name == "gemm_epilogue_f32") return call<GemmEpilogueParams, gemm_epilogue_f32>;
    if (name == "gemm_wgmma_128x256") return call<GemmParams, gemm_wgmma_128x256>;
    if (name == "gemm_wgmma_128x128") return call<GemmParams, gemm_wgmma_128x128>;
    if (name == "gemm_wgmma_64x128") return call<GemmParams, gemm_wgmma_64x128>;
    if (name == "gemm_tma_128x128") return call<GemmTmaParams, gemm_tma_128x128>;
    if (name == "gemm_tma_ln_64x72") return call<GemmLayerNormParams, gemm_tma_ln_64x72>;
    if (name == "gemm_tma_ln_mc_64x72") return call<GemmLayerNormParams, gemm_tma_ln_mc_64x72>;
    if (name == "gemm_tma_ln_128x72") return call<GemmLayerNormParams, gemm_tma_ln_128x72>;
    if (name == "gemm_tma_ln_mc_128x72") return call<GemmLayerNormParams, gemm_tma_ln_mc_128x72>;
    if (name == "gemm_tma_ln_128x144") return call<GemmLayerNormParams, gemm_tma_ln_128x144>;
    if (name == "gemm_tma_ln_mc_128x144") return call<GemmLayerNormParams, gemm_tma_ln_mc_128x144>;
    if (name == "qkv_attention_d64") return call<QkvAttentionParams, qkv_attention_d64>;
    if (name == "qkv_attention_d72") return call<QkvAttentionParams, qkv_attention_d72>;
    if (name == "qkv_attention_mc_d64") return call<QkvAttentionParams, qkv_attention_mc_d64>;
    if (name == "qkv_attention_mc_d72") return call<QkvAttentionParams, qkv_attention_mc_d72>;
    if (name == "gemm_tma_128x192") return call<GemmTmaParams, gemm_tma_128x192>;
    if (name == "gemm_tma_128x112") return call<GemmTmaParams, gemm_tma_128x112>;
    if (name == "gemm_tma_128x144") return call<GemmTmaParams, gemm_tma_128x144>;
    if (name == "gemm_tma_128x256") return call<GemmTmaParams, gemm_tma_128x256>;
    if (name == "gemm_tma_256x128") return call<GemmTmaParams, gemm_tma_256x128>;
    if (name == "gemm_tma_st_128x128") return call<GemmTmaParams, gemm_tma_st_128x128>;
    if (name == "gemm_tma_st_pp_128x128") return call<GemmTmaParams, gemm_tma_st_pp_128x128>;
    if (name == "gemm_tma_st_256x128") return call<GemmTmaParams, gemm_tma_st_256x128>;
    if (name == "gemm_tma_st_128x192") return call<GemmTmaParams, gemm_tma_st_128x192>;
    if (name == "gemm_tma_pp_128x128") return call<GemmTmaParams, gemm_tma_pp_128x128>;
    if (name == "gemm_tma_mc_128x128") return call<GemmTmaParams, gemm_tma_mc_128x128>;
    if (name == "gemm_tma_mc_128x192") return call<GemmTmaParams, gemm_tma_mc_128x192>;
    if (name == "gemm_tma_mc_128x256") return call<GemmTmaParams, gemm_tma_mc_128x256>;
    if (name == "gemm_tma_mc_pp_128x128") return call<GemmTmaParams, gemm_tma_mc_pp_128x128>;
    if (name == "gemm_tma_c4x1_128x128") return call<GemmTmaParams, gemm_tma_c4x1_128x128>;
    if (name == "gemm_tma_c4x1_128x192") return call<GemmTmaParams, gemm_tma_c4x1_128x192>;
    if (name == "gemm_tma_c4x2_128x128") return call<GemmTmaParams, gemm_tma_c4x2_128x128>;
    if (name == "gemm_tma_c4x2_128x192") return call<GemmTmaParams, gemm_tma_c4x2_128x192>;
    if (name == "gemm_tma_k2_128x128") return call<GemmTmaParams, gemm_tma_k2_128x128>;
    if (name == "gemm_tma_k3_128x128") return call<GemmTmaParams, gemm_tma_k3_128x128>;
    if (name == "gemm_tma_k4_128x128") return call<GemmTmaParams, gemm_tma_k4_128x128>;
    if (name == "wgmma_probe") return call<WgmmaProbeParams, wgmma_probe>;
    if (name == "tma_probe") return call<TmaProbeParams, tma_probe>;
    if (name == "tma_cluster_probe") return call<TmaProbeParams, tma_cluster_probe>;
    if (name == "race_probe_warps") return call<uint64_t, race_probe_warps>;
    if (name == "race_probe_warps_synced") return call<uint64_t, race_probe_warps_synced>;
    if (name == "race_probe_blocks") return call<uint64_t, race_probe_blocks>;
    if (name == "proxy_probe_fenced") return call<uint64_t, proxy_probe<true>>;
    if (name == "proxy_probe_unfenced") return call<uint64_t, proxy_probe<false>>;
    if (name == "smem_guard_probe") return call<uint64_t, smem_guard_probe>;
    if (name == "register_probe_after") return call<uint64_t, proxy_probe<true, RegisterTouch::After>>;
    if (name == "register_probe_acc") return call<uint64_t, proxy_probe<true, RegisterTouch::Accumulator>>;
    if (name == "register_probe_a") return call<uint64_t, proxy_probe<true, RegisterTouch::A>>;
    if (name == "proxy_probe_tma_fenced") return call<TmaProbeParams, proxy_probe_tma<true>>;
    if (name == "proxy_probe_tma_unfenced") return call<TmaProbeParams, proxy_probe_tma<false>>;
    return nullptr;
}

// Blocks a cluster: the kernels compiled with __cluster_dims__(n, 1, 1) (FORA_CLUSTER(n)), by name.
unsigned cluster_size_of(const std::string& name) {
    if (name.rfind("gemm_tma_mc_", 0) == 0 || name == "tma_cluster_probe") return 2;
    if (name.rfind("gemm_tma_c4x1_", 0) == 0) return 4;
    if (name.rfind("gemm_tma_c4x2_", 0) == 0) return 8;
    if (name.rfind("gemm_tma_k2_", 0) == 0) return 2;
    if (name.rfind("gemm_tma_k3_", 0) == 0) return 3;
    if (name.rfind("gemm_tma_k4_", 0) == 0) return 4;
    if (name.rfind("gemm_tma_ln_", 0) == 0) {
        // 1152 columns a cluster: 16 CTAs of 72, or 8 of 144.
        const std::string wide = "_128x144";
        const bool is_wide = name.size() > wide.size() && name.compare(name.size() - wide.size(), wide.size(), wide) == 0;
        return is_wide ? 8 : 16;
    }
    if (name.rfind("qkv_attention_", 0) == 0) return 4;
    return 1;
}

}  // namespace

void fora_emulation_syncthreads() { wait_at(here().block_barrier); }

void fora_emulation_syncwarp() { wait_at(here().warp_barriers[launch_state->current / 32]); }

void fora_emulation_named_barrier(unsigned id, unsigned threads, bool wait) {
    if (id == 0 || id >= 16 || threads == 0 || threads % 32 != 0 || threads > launch_state->block) {
        std::fprintf(stderr,
                     "emulated %s: bar.sync / bar.arrive %u, %u: the id must be 1-15 and the thread count a "
                     "positive multiple of 32 within the block\n",
                     launch_state->name, id, threads);
        std::abort();
    }
    Barrier& b = here().named_barriers[id];
    if (b.arrived == 0) {
        b.live = static_cast<int>(threads);
    } else if (b.live != static_cast<int>(threads)) {
        std::fprintf(stderr, "emulated %s: named barrier %u used with two thread counts (%d, %u) in one generation\n",
                     launch_state->name, id, b.live, threads);
        std::abort();
    }
    if (wait) {
        wait_at(b);
        return;
    }
    // An arrival that does not wait: it releases what this thread did before to the waiters.
    race::release(&b.sync[b.generation & 1]);
    ++b.arrived;
    ++launch_state->progress;
    b.open_if_complete();
}

float fora_emulation_shfl_xor(float v, int lane_mask) {
    Launch& l = *launch_state;
    const unsigned warp = l.current / 32, lane = l.current % 32;
    Block& b = l.here();
    float* slots = &b.warp_slots[warp * 32];
    slots[lane] = v;
    wait_at(b.warp_barriers[warp]);
    const float other = slots[lane ^ static_cast<unsigned>(lane_mask)];
    wait_at(b.warp_barriers[warp]);
    return other;
}

namespace {

uint16_t b16_at(const void* row, int col) {
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * col, 2);
    return v;
}

float bf16_bits_to_f32(uint32_t bits16) {
    const uint32_t u = bits16 << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lane 8 m + r gives the address of row
// r of matrix m; lane i receives of matrix m the pair (row i / 4, columns 2 (i % 4) + {0, 1}),
// or with .trans (rows 2 (i % 4) + {0, 1}, column i / 4); the first element in the low half.
void fora_emulation_ldmatrix(int matrices, bool trans, const void* row, uint32_t* out) {
    Launch& l = *launch_state;
    const unsigned warp = l.current / 32, lane = l.current % 32;
    Block& b = l.here();
    const void** addrs = &b.warp_addrs[warp * 32];
    addrs[lane] = row;
    race::read(row, 16);  // this lane's row of 8 b16
    wait_at(b.warp_barriers[warp]);
    for (int m = 0; m < matrices; ++m) {
        uint32_t lo, hi;
        if (!trans) {
            const void* r = addrs[8 * m + lane / 4];
            lo = b16_at(r, 2 * (lane % 4));
            hi = b16_at(r, 2 * (lane % 4) + 1);
        } else {
            lo = b16_at(addrs[8 * m + 2 * (lane % 4)], lane / 4);
            hi = b16_at(addrs[8 * m + 2 * (lane % 4) + 1], lane / 4);
        }
        out[m] = lo | (hi << 16);
    }
    wait_at(b.warp_barriers[warp]);
}

// mma.sync.aligned.m16n8k{16,8}.row.col.f32.bf16.bf16.f32, D = A B + C, with g = lane / 4 and
// q = lane % 4: A regs (k16) a0 = A[g][2q, 2q+1], a1 = A[g+8][2q..], a2 = A[g][2q+8..],
// a3 = A[g+8][2q+8..] (k8: a0, a1 only); B regs b0 = B[2q, 2q+1][g], b1 = B[2q+8, 2q+9][g]
// (k8: b0 only); C/D c0, c1 = D[g][2q, 2q+1], c2, c3 = D[g+8][2q, 2q+1]. The products of
// bf16 values are exact in f32; they are summed in k order (the tensor core's order differs,
// within the tests' tolerances).
void fora_emulation_mma(int k, float* c, const uint32_t* a, const uint32_t* b) {
    Launch& l = *launch_state;
    const unsigned warp = l.current / 32, lane = l.current % 32;
    Block& blk = l.here();
    uint32_t* regs = &blk.warp_regs[warp * 32 * 8];
    const int a_regs = k == 16 ? 4 : 2, b_regs = k == 16 ? 2 : 1;
    for (int i = 0; i < a_regs; ++i) regs[lane * 8 + i] = a[i];
    for (int i = 0; i < b_regs; ++i) regs[lane * 8 + 4 + i] = b[i];
    wait_at(blk.warp_barriers[warp]);
    float A[16][16], B[16][8];
    for (unsigned L = 0; L < 32; ++L) {
        const int g = L / 4, q = L % 4;
        const uint32_t* r = &regs[L * 8];
        const int rows[4] = {g, g + 8, g, g + 8};
        const int cols[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
        for (int i = 0; i < a_regs; ++i) {
            A[rows[i]][cols[i]] = bf16_bits_to_f32(r[i] & 0xffffu);
            A[rows[i]][cols[i] + 1] = bf16_bits_to_f32(r[i] >> 16);
        }
        for (int i = 0; i < b_regs; ++i) {
            B[2 * q + 8 * i][g] = bf16_bits_to_f32(r[4 + i] & 0xffffu);
            B[2 * q + 8 * i + 1][g] = bf16_bits_to_f32(r[4 + i] >> 16);
        }
    }
    const int g = lane / 4, q = lane % 4;
    const int out_rows[4] = {g, g, g + 8, g + 8};
    const int out_cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    for (int i = 0; i < 4; ++i) {
        float sum = 0.0f;
        for (int kk = 0; kk < k; ++kk) sum += A[out_rows[i]][kk] * B[kk][out_cols[i]];
        c[i] += sum;
    }
    wait_at(blk.warp_barriers[warp]);
}

// cp.async.cg.shared.global [smem], [gmem], 16, src_bytes: the source read now (bytes past
// src_bytes zero), the shared memory written when a wait retires the copy's group. Until then
// the destination holds NaN bytes, as a copy in progress leaves it undefined: a read before the
// wait, or a wgmma still to read the old contents (a slot refilled too early), shows.
void fora_emulation_cp_async(void* smem, const void* gmem, int src_bytes) {
    // The copy may write its destination at any time until its wait: a write now and at the wait.
    if (src_bytes > 0) race::read(gmem, static_cast<size_t>(src_bytes));
    race::write(smem, 16);
    race::Untracked untracked;
    PendingCopy c;
    c.dst = static_cast<unsigned char*>(smem);
    std::memcpy(c.bytes, gmem, static_cast<size_t>(src_bytes));
    std::memset(c.bytes + src_bytes, 0, static_cast<size_t>(16 - src_bytes));
    std::memset(c.dst, 0xff, 16);
    here().fibers[launch_state->current].copies.open.push_back(c);
}

void fora_emulation_cp_async_commit() { here().fibers[launch_state->current].copies.commit(); }

namespace {

// Thread t of block b wrote (or read) `bytes` bytes at `p` through the generic proxy: if that is
// dynamic shared memory, the async proxy may not see (or may overwrite too early) them before t's
// next fence.proxy.async.
void note_generic_access(Block& b, unsigned t, const void* p, unsigned bytes, bool write) {
    const std::ptrdiff_t off = static_cast<const unsigned char*>(p) - b.dynamic_smem;
    if (off < 0 || static_cast<size_t>(off) + bytes > b.unfenced.size()) return;
    std::vector<uint16_t>& shadow = write ? b.unfenced : b.unfenced_read;
    std::fill_n(shadow.begin() + off, bytes, static_cast<uint16_t>(t + 1));
    Fiber& f = b.fibers[t];
    (write ? f.unfenced_writes : f.unfenced_reads).emplace_back(static_cast<uint32_t>(off), bytes);
}

}  // namespace

void fora_emulation_generic_store(const void* smem, unsigned bytes) {
    note_generic_access(here(), launch_state->current, smem, bytes, true);
}

void fora_emulation_generic_load(const void* smem, unsigned bytes) {
    note_generic_access(here(), launch_state->current, smem, bytes, false);
}

// cp.async.wait_group N: every committed group but the newest N lands, oldest first. A copy
// into the dynamic shared memory is a generic-proxy write the async proxy may not see until this
// thread's next fence.proxy.async (the proxy check).
void fora_emulation_cp_async_wait(int pending) {
    Block& b = here();
    const unsigned t = launch_state->current;
    Fiber& f = b.fibers[t];
    AsyncGroups<PendingCopy>& g = f.copies;
    while (g.committed.size() > static_cast<size_t>(pending)) {
        for (const PendingCopy& c : g.committed.front()) {
            {
                race::Untracked untracked;
                std::memcpy(c.dst, c.bytes, 16);
            }
            race::write(c.dst, 16);
            note_generic_access(b, t, c.dst, 16, true);
        }
        g.committed.erase(g.committed.begin());
    }
}

// fence.proxy.async.shared::cta: this thread's generic-proxy accesses so far (landed cp.async
// copies, st_shared_for_async_proxy stores, ld_shared_for_async_proxy loads) are ordered
// before its later async-proxy ones.
void fora_emulation_fence_proxy_async() {
    Block& b = here();
    const unsigned t = launch_state->current;
    Fiber& f = b.fibers[t];
    // Clears this thread's marks (a later access by another thread keeps its own).
    auto clear = [t](std::vector<std::pair<uint32_t, uint32_t>>& accesses, std::vector<uint16_t>& shadow) {
        for (const auto& [off, bytes] : accesses)
            for (uint32_t i = off; i < off + bytes; ++i)
                if (shadow[i] == t + 1) shadow[i] = 0;
        accesses.clear();
    };
    clear(f.unfenced_writes, b.unfenced);
    clear(f.unfenced_reads, b.unfenced_read);
}

uint32_t fora_emulation_smem_offset(const void* p) {
    return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - here().dynamic_smem);
}

namespace {

// A wgmma shared-memory descriptor, decoded: start address (bits 0-13), leading byte offset
// (bits 16-29) and stride byte offset (bits 32-45), each stored >> 4; only the 128-byte swizzle
// (bits 62-63 = 1) is emulated.
struct SmemDescriptor {
    uint32_t start, leading, stride;
};

SmemDescriptor decode(uint64_t desc) {
    if ((desc >> 62) != 1) {
        std::fprintf(stderr, "emulated wgmma: swizzle mode %d is not emulated\n", int(desc >> 62));
        std::abort();
    }
    return {static_cast<uint32_t>(desc & 0x3FFF) << 4, static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
            static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4};
}

// A bf16 operand of a wgmma in the block's dynamic shared memory, by its descriptor (decoded
// once, not per element).
struct SmemOperand {
    SmemDescriptor d;
    const unsigned char* smem;
    size_t bytes;
    const char* layout;

    SmemOperand(uint64_t desc, const char* layout_name)
        : d(decode(desc)),
          smem(here().dynamic_smem),
          bytes(launch_state->dynamic_smem_bytes),
          layout(layout_name) {}

    // The shared byte of element (i, k): (row, k) of a K-major operand, or (n, k) of an MN-major B
    // operand, in the 128-byte-swizzle canonical layout, after the swizzle: the hardware XORs
    // address bits [4:6] with bits [7:9] (the dynamic shared memory is 1024-byte aligned, so
    // offsets and host addresses agree on those bits).
    // K-major: rows of an 8-row atom 128 bytes apart, atoms `stride` apart. The leading byte
    // offset is unused for this layout when the k extent (32 bytes) fits the swizzle width.
    // MN-major (as wgmma.cuh's wgmma_desc_sw128_mn describes it): 128-byte rows of 64 n-values,
    // one per k; 8 k-rows an atom, atoms `stride` apart along k and `leading` apart per 64-wide n
    // panel.
    uint32_t address(int i, int k, bool mn_major) const {
        const uint32_t addr = mn_major ? d.start + (i / 64) * d.leading + (k / 8) * d.stride + (k % 8) * 128 + 2 * (i % 64)
                                       : d.start + (i / 8) * d.stride + (i % 8) * 128 + 2 * k;
        return addr ^ (((addr >> 7) & 7u) << 4);
    }

    // The bf16 at (swizzled) byte `addr`; (i, k) name the element in the error.
    float at(uint32_t addr, int i, int k) const {
        if (addr + 2 > bytes) {
            std::fprintf(stderr, "emulated wgmma: %s operand (%d, k %d) at shared byte %u is past the %zu bytes of dynamic shared memory\n",
                         layout, i, k, addr, bytes);
            std::abort();
        }
        uint16_t bits;
        std::memcpy(&bits, smem + addr, 2);
        return bf16_bits_to_f32(bits);
    }

    // Element (row, k) of a K-major bf16 operand.
    float k_major(int row, int k) const { return at(address(row, k, false), row, k); }

    // Element (n, k) of an MN-major bf16 B operand.
    float mn_major(int n, int k) const { return at(address(n, k, true), n, k); }
};

// The proxy check of `bytes` bytes from the (unswizzled) dynamic shared offset `addr` of block
// `b`, about to be read (`overwrite` false) or written by the async proxy (`what`): records the
// first byte a generic-proxy write (or, for a write, a generic read) left with no
// fence.proxy.async since by its thread.
void check_proxy(const Block& b, uint32_t addr, uint32_t bytes, const char* what, bool overwrite = false) {
    Launch& l = *launch_state;
    if (!l.check_error.empty()) return;
    for (uint32_t i = addr; i < addr + bytes && i < b.unfenced.size(); ++i) {
        const bool written = b.unfenced[i] != 0;
        if (written || (overwrite && b.unfenced_read[i] != 0)) {
            char msg[320];
            std::snprintf(msg, sizeof msg,
                          "emulated %s: %s shared byte %u, which thread %u %s with no fence.proxy.async by "
                          "that thread since (the async proxy may not see it, or may overwrite it first)",
                          l.name, what, i, static_cast<unsigned>((written ? b.unfenced[i] : b.unfenced_read[i]) - 1),
                          written ? "wrote (cp.async or a store)" : "read");
            l.check_error = msg;
            return;
        }
    }
}

// The race check's read of a wgmma's shared-memory operand: `rows` x 16 k (K-major) or n x 16 k
// (MN-major) bf16 elements, by 16-byte chunks (the swizzle moves whole chunks): K-major, k 0-7
// and 8-15 of each row; MN-major, 8 n-values of a k.
void race_read_operand(uint64_t desc, int rows, bool mn_major) {
    const SmemOperand op(desc, mn_major ? "MN-major" : "K-major");
    const unsigned char* smem = here().dynamic_smem;
    for (int r = 0; r < rows; r += mn_major ? 8 : 1)
        for (int k = 0; k < 16; k += mn_major ? 1 : 8) race::read(smem + op.address(r, k, mn_major), 16);
}

// The warpgroup issues a wgmma reading this operand (called once, by its first thread): the
// proxy check of its elements at their swizzled addresses, and the race check's read.
void wgmma_operand_issued(uint64_t desc, int rows, bool mn_major) {
    const SmemOperand op(desc, mn_major ? "MN-major" : "K-major");
    for (int r = 0; r < rows; ++r)
        for (int k = 0; k < 16; ++k) check_proxy(here(), op.address(r, k, mn_major), 2, "a wgmma reads");
    race_read_operand(desc, rows, mn_major);
}

// This thread's fragment of D[64 x n] += A[64 x 16] B[16 x n]: warp w of the warpgroup owns rows
// 16 w .. 16 w + 15; registers 4 j .. 4 j + 3 are (row g, columns 8 j + 2 q, + 1) and (row g + 8,
// the same columns), g = lane / 4, q = lane % 4. a[r][k] is A's element (row 16 w + g + 8 r, k).
// The operands this thread needs are read once, then each sum is taken in k order.
void wgmma_fragment(int n, float* d, uint64_t desc_b, bool b_mn, const float (&a)[2][16]) {
    const unsigned t = launch_state->current % 128;
    const int q = static_cast<int>(t % 32) % 4;
    const SmemOperand b_op(desc_b, b_mn ? "MN-major" : "K-major");
    float b[2][16];
    for (int j = 0; j < n / 8; ++j) {
        for (int c = 0; c < 2; ++c) {
            const int col = 8 * j + 2 * q + c;
            for (int k = 0; k < 16; ++k) b[c][k] = b_mn ? b_op.mn_major(col, k) : b_op.k_major(col, k);
        }
        for (int r = 0; r < 4; ++r) {
            float sum = 0.0f;
            for (int k = 0; k < 16; ++k) sum += a[r / 2][k] * b[r % 2][k];
            d[4 * j + r] += sum;
        }
    }
}

void carry_out(const PendingWgmma& op) {
    // The tensor cores may read the operands at any time from issue to retirement: the race
    // check takes the warpgroup's reads at both (by its first thread).
    if (launch_state->current % 128 == 0) {
        if (!op.rs) race_read_operand(op.desc_a, 64, false);
        race_read_operand(op.desc_b, op.n, op.b_mn);
    }
    race::Untracked untracked;
    if (op.rs) {
        wgmma_fragment(op.n, op.d, op.desc_b, op.b_mn, op.a_rows);
    } else {
        const unsigned t = launch_state->current % 128;
        const int row0 = 16 * static_cast<int>(t / 32) + static_cast<int>(t % 32) / 4;
        const SmemOperand a_op(op.desc_a, "K-major");
        float a[2][16];
        for (int r = 0; r < 2; ++r)
            for (int k = 0; k < 16; ++k) a[r][k] = a_op.k_major(row0 + 8 * r, k);
        wgmma_fragment(op.n, op.d, op.desc_b, op.b_mn, a);
    }
}

// The in-flight register check. The tensor cores read a wgmma's accumulators (and an RS wgmma's A
// registers) and write its accumulators at any time until the wait that retires it, so the
// thread may not change them meanwhile (on a GPU the result is undefined; the emulator, which
// applies a wgmma at its retirement, would hide it). Chains of wgmmas on one accumulator are
// ordered by the hardware: only the thread's own writes count.
void register_check_failed(const char* what) {
    Launch& l = *launch_state;
    if (!l.check_error.empty()) return;
    char msg[320];
    std::snprintf(msg, sizeof msg, "emulated %s: thread %u %s", l.name, l.current, what);
    l.check_error = msg;
}

bool same_bits(const void* a, const void* b, size_t bytes) { return std::memcmp(a, b, bytes) == 0; }

InFlightAccumulator* in_flight(Fiber& f, const float* d) {
    for (InFlightAccumulator& a : f.accumulators)
        if (a.d == d) return &a;
    return nullptr;
}

// A wgmma on `d` (n / 2 floats a thread) is issued.
void accumulators_issued(float* d, int n) {
    Fiber& f = here().fibers[launch_state->current];
    const size_t count = static_cast<size_t>(n / 2);
    if (InFlightAccumulator* a = in_flight(f, d)) {
        if (!same_bits(d, a->expect.data(), count * 4))
            register_check_failed("changed the accumulators of a wgmma in flight, then issued another on them");
        ++a->pending;
        return;
    }
    f.accumulators.push_back(InFlightAccumulator{d, std::vector<float>(d, d + count), 1});
}

// `op` retires: before it is carried out, its registers must be as the thread left them.
void check_registers_at_retirement(Fiber& f, const PendingWgmma& op) {
    const InFlightAccumulator* a = in_flight(f, op.d);
    if (a == nullptr || !same_bits(op.d, a->expect.data(), a->expect.size() * 4))
        register_check_failed("changed the accumulators of a wgmma before the wait that retires it");
    if (op.a_regs != nullptr && !same_bits(op.a_regs, op.a_at_issue, sizeof op.a_at_issue))
        register_check_failed("changed the A registers of an RS wgmma before the wait that retires it");
}

// ... and once carried out, its accumulators are what the next in the chain expects.
void accumulators_retired(Fiber& f, const PendingWgmma& op) {
    InFlightAccumulator* a = in_flight(f, op.d);
    if (a == nullptr) return;
    a->expect.assign(op.d, op.d + a->expect.size());
    if (--a->pending == 0) f.accumulators.erase(f.accumulators.begin() + (a - f.accumulators.data()));
}

}  // namespace

// Both operands from shared memory: recorded now, carried out at the wait that retires it. The
// warpgroup's threads issue it together (wgmma.mma_async is warpgroup-collective, .aligned).
void fora_emulation_wgmma(int n, float* d, uint64_t desc_a, uint64_t desc_b) {
    wait_at(here().warpgroup_barriers[launch_state->current / 128]);
    if (launch_state->current % 128 == 0) {
        wgmma_operand_issued(desc_a, 64, false);
        wgmma_operand_issued(desc_b, n, false);
    }
    PendingWgmma op{};
    op.n = n;
    op.d = d;
    op.rs = false;
    op.desc_a = desc_a;
    op.desc_b = desc_b;
    accumulators_issued(d, n);
    here().fibers[launch_state->current].wgmmas.open.push_back(op);
}

// The RS form: A[64 x 16] comes from the registers of the warpgroup's 128 threads (warp w holds
// rows 16 w .. 16 w + 15 in the mma.sync m16n8k16 A layout: a0 = (g, 2q .. 2q + 1), a1 = (g + 8,
// 2q ..), a2 = (g, 2q + 8 ..), a3 = (g + 8, 2q + 8 ..)), so the threads meet twice: once after
// depositing their registers, once after every thread has taken the two rows it needs.
void fora_emulation_wgmma_rs(int n, float* d, const uint32_t* a, uint64_t desc_b, int trans_b) {
    Launch& l = *launch_state;
    const unsigned group = l.current / 128, t = l.current % 128;
    Block& blk = l.here();
    uint32_t* regs = &blk.warpgroup_regs[group * 128 * 4];
    for (int i = 0; i < 4; ++i) regs[t * 4 + i] = a[i];
    wait_at(blk.warpgroup_barriers[group]);
    if (t == 0) wgmma_operand_issued(desc_b, n, trans_b != 0);
    PendingWgmma op{};
    op.n = n;
    op.d = d;
    op.rs = true;
    op.b_mn = trans_b != 0;
    op.desc_b = desc_b;
    op.a_regs = a;
    std::memcpy(op.a_at_issue, a, sizeof op.a_at_issue);
    // Rows g and g + 8 of this warp are held by the 4 threads of quad g: (g, cols 2q, 2q + 1,
    // 2q + 8, 2q + 9) in registers 0 and 2, (g + 8, ...) in registers 1 and 3.
    const unsigned warp = t / 32, g = (t % 32) / 4;
    for (unsigned q = 0; q < 4; ++q) {
        const uint32_t* r = &regs[(warp * 32 + g * 4 + q) * 4];
        for (int half = 0; half < 2; ++half) {
            for (int hi = 0; hi < 2; ++hi) {
                const uint32_t v = r[half + 2 * hi];
                op.a_rows[half][2 * q + 8 * hi] = bf16_bits_to_f32(v & 0xffffu);
                op.a_rows[half][2 * q + 8 * hi + 1] = bf16_bits_to_f32(v >> 16);
            }
        }
    }
    wait_at(blk.warpgroup_barriers[group]);
    accumulators_issued(d, n);
    blk.fibers[l.current].wgmmas.open.push_back(op);
}


void fora_emulation_wgmma_commit() { here().fibers[launch_state->current].wgmmas.commit(); }

// wgmma.wait_group N: every committed group but the newest N is carried out, oldest first. The
// waiting thread first yields, as a warp waiting on the tensor cores may be descheduled: the
// other threads (a TMA producer) run while its wgmmas are in flight, so a shared-memory slot
// handed back before the wait that retires the wgmmas reading it gets refilled (NaN) too early.
// The warp's threads then leave the wait together (.sync.aligned): each carries out its part
// first, so no lane of the warp goes on (and hands a slot back) while another has yet to read it.
void fora_emulation_wgmma_wait(int pending) {
    ++launch_state->progress;  // not blocked: it runs on at its next turn
    yield_to_scheduler();
    Fiber& f = here().fibers[launch_state->current];
    AsyncGroups<PendingWgmma>& g = f.wgmmas;
    while (g.committed.size() > static_cast<size_t>(pending)) {
        for (const PendingWgmma& op : g.committed.front()) {
            check_registers_at_retirement(f, op);
            carry_out(op);
            accumulators_retired(f, op);
        }
        g.committed.erase(g.committed.begin());
    }
    wait_at(here().warp_barriers[launch_state->current / 32]);
}

namespace {

[[noreturn]] void emulation_error(const char* what, uint32_t addr) {
    std::fprintf(stderr, "emulated %s: %s (shared byte %u)\n", launch_state->name, what, addr);
    std::abort();
}

MBarrier& mbarrier_in(Block& block, uint32_t bar) {
    auto it = block.mbarriers.find(bar);
    if (it == block.mbarriers.end()) emulation_error("mbarrier used before mbarrier.init", bar);
    return it->second;
}

MBarrier& mbarrier_at(uint32_t bar) { return mbarrier_in(here(), bar); }

// The emulator's shared::cluster addresses (from mapa): (rank + 1) << 24 | the byte in that
// block's shared memory. An address below 1 << 24 is the running block's own (a shared::cta
// address is a valid shared::cluster address of the executing CTA).
constexpr uint32_t kClusterRankShift = 24;

// A block whose threads have all returned: its shared memory is gone (on a GPU another CTA may
// already own it), so an arrival or a multicast into it is an error.
void check_live(const Block& block, uint32_t addr) {
    if (block.block_barrier.live == 0) emulation_error("access to the shared memory of a block that has exited (a cluster needs a barrier before its CTAs exit)", addr);
}

std::pair<Block*, uint32_t> cluster_address(uint32_t addr) {
    Launch& l = *launch_state;
    if (addr < (1u << kClusterRankShift)) return {&l.here(), addr};
    const uint32_t rank = (addr >> kClusterRankShift) - 1;
    if (rank >= l.cluster) emulation_error("shared::cluster address of a block outside the cluster", addr);
    if (rank != l.rank && !l.here().fibers[l.current].cluster_waited)
        emulation_error("another block's shared memory touched before a cluster barrier (it may not have started)", addr);
    check_live(l.blocks[rank], addr);
    return {&l.blocks[rank], addr & ((1u << kClusterRankShift) - 1)};
}

void complete_phase_if_done(MBarrier& b) {
    if (b.pending == 0 && b.tx == 0) {
        ++b.phase;
        b.pending = b.arrivals;
    }
}

// The copies counted against `b` land: written to the shared memory of the barrier's block, their
// bytes taken off the phase.
void land_copies(MBarrier& b) {
    if (!b.copies.empty()) ++launch_state->progress;
    race::Untracked untracked;  // (the race check took the copies' writes at their issue)
    for (const PendingTma& c : b.copies) {
        std::memcpy(c.smem + c.dst, c.bytes.data(), c.bytes.size());
        b.tx -= static_cast<long long>(c.bytes.size());
    }
    b.copies.clear();
    complete_phase_if_done(b);
}

// The emulator's stand-in for a CUtensorMap (128 bytes): a 2-D bf16 tensor, its box, 128-byte
// swizzle; written by fora_emulate_encode_tma_2d, which checks what cuTensorMapEncodeTiled does.
struct EmulatedTensorMap {
    uint64_t magic;
    const unsigned char* base;
    uint64_t cols, rows, row_stride_bytes;
    uint32_t box_cols, box_rows;
};
constexpr uint64_t kTensorMapMagic = 0x666f7261746d6170ull;  // "foratmap"
static_assert(sizeof(EmulatedTensorMap) <= 128, "a CUtensorMap has 128 bytes");

}  // namespace

void fora_emulation_mbarrier_init(uint32_t bar, int arrivals) {
    if (bar % 8 != 0 || bar + 8 > launch_state->dynamic_smem_bytes) emulation_error("mbarrier misaligned or outside shared memory", bar);
    if (arrivals < 1) emulation_error("mbarrier initialized with no arrivals", bar);
    race::write(here().dynamic_smem + bar, 8);
    MBarrier b;
    b.arrivals = arrivals;
    b.pending = arrivals;
    here().mbarriers[bar] = b;
}

namespace {

// One arrival on the barrier at byte `bar` of `block` (an atomic access of it for the race check,
// and a release for the phase's waiters).
void arrive_on(Block& block, uint32_t bar, uint32_t expect_tx_bytes) {
    MBarrier& b = mbarrier_in(block, bar);
    race::read(block.dynamic_smem + bar, 8);
    race::release(&b.sync[b.phase & 1]);
    ++launch_state->progress;
    b.tx += expect_tx_bytes;
    if (--b.pending < 0) emulation_error("more mbarrier arrivals than the phase expects", bar);
    complete_phase_if_done(b);
}

}  // namespace

void fora_emulation_mbarrier_arrive(uint32_t bar, uint32_t expect_tx_bytes) {
    arrive_on(here(), bar, expect_tx_bytes);
}

// mbarrier.arrive.release.cluster.shared::cluster: one arrival on the barrier of any block of the
// cluster (an address from mapa).
void fora_emulation_mbarrier_arrive_cluster(uint32_t cluster_bar) {
    const auto [block, bar] = cluster_address(cluster_bar);
    arrive_on(*block, bar, 0);
}

// ld.shared::cluster: a load from the shared memory of any block of the cluster (an address
// from mapa, or the running block's own), which must lie inside its dynamic shared memory.
namespace {

// The `bytes` bytes at a shared::cluster address (from mapa) in their block's dynamic shared
// memory, checked aligned and inside it; `op` names the instruction in the error.
unsigned char* cluster_bytes(const char* op, uint32_t cluster_addr, unsigned bytes) {
    const auto [block, addr] = cluster_address(cluster_addr);
    if (addr % bytes != 0 || addr + bytes > launch_state->dynamic_smem_bytes)
        emulation_error((std::string(op) + " misaligned or outside the dynamic shared memory").c_str(), cluster_addr);
    return block->dynamic_smem + addr;
}

}  // namespace

void fora_emulation_ld_shared_cluster(void* dst, uint32_t cluster_addr, unsigned bytes) {
    std::memcpy(dst, cluster_bytes("ld.shared::cluster", cluster_addr, bytes), bytes);
}

void fora_emulation_st_shared_cluster(uint32_t cluster_addr, const void* src, unsigned bytes) {
    std::memcpy(cluster_bytes("st.shared::cluster", cluster_addr, bytes), src, bytes);
}

// mapa.shared::cluster: the address of the running block's shared byte `addr` in block `rank`.
uint32_t fora_emulation_mapa(uint32_t addr, unsigned rank) {
    if (addr >= (1u << kClusterRankShift) || addr >= launch_state->dynamic_smem_bytes)
        emulation_error("mapa of an address outside the dynamic shared memory", addr);
    if (rank >= launch_state->cluster) emulation_error("mapa to a rank outside the cluster", addr);
    return ((rank + 1) << kClusterRankShift) | addr;
}

unsigned fora_emulation_cluster_ctarank() { return launch_state->rank; }

// barrier.cluster.arrive + wait: every live thread of every block of the cluster.
void fora_emulation_cluster_sync() {
    fora_emulation_cluster_arrive();
    fora_emulation_cluster_wait();
}

// barrier.cluster.arrive: this thread's arrival for the barrier's current generation (a release
// for its waiters); a second arrival before this thread's wait is an error (undefined on a GPU).
void fora_emulation_cluster_arrive() {
    Launch& l = *launch_state;
    Fiber& f = l.here().fibers[l.current];
    if (f.cluster_arrived) emulation_error("barrier.cluster.arrive twice without barrier.cluster.wait", 0);
    Barrier& b = l.cluster_barrier;
    f.cluster_arrived = true;
    f.cluster_generation = b.generation;
    race::release(&b.sync[b.generation & 1]);
    ++b.arrived;
    ++l.progress;
    b.open_if_complete();
}

// barrier.cluster.wait: until every live thread of the cluster has arrived in the generation
// this thread arrived in (an acquire); without an arrival first, an error.
void fora_emulation_cluster_wait() {
    Launch& l = *launch_state;
    Fiber& f = l.here().fibers[l.current];
    if (!f.cluster_arrived) emulation_error("barrier.cluster.wait without barrier.cluster.arrive", 0);
    Barrier& b = l.cluster_barrier;
    while (b.generation == f.cluster_generation) yield_to_scheduler();
    race::acquire(&b.sync[f.cluster_generation & 1]);
    ++l.progress;
    l.here().fibers[l.current].cluster_arrived = false;
    l.here().fibers[l.current].cluster_waited = true;
}

// try_wait.parity in a loop: done once the phase of that parity has completed, i.e. the phases
// completed so far have the other parity. Parity is all the hardware compares, so a wait for a
// phase two or more ahead of the barrier passes at once: the check is made before the barrier's
// copies in flight land (as they may not have on a GPU), so such a wait reads their NaN. Only a
// wait that fails lands them and checks again.
void fora_emulation_mbarrier_wait(uint32_t bar, uint32_t parity) {
    race::read(here().dynamic_smem + bar, 8);
    for (;;) {
        MBarrier& b = mbarrier_at(bar);
        if ((b.phase & 1u) == (parity & 1u)) land_copies(b);
        if ((b.phase & 1u) != (parity & 1u)) {
            race::acquire(&b.sync[parity & 1u]);
            ++launch_state->progress;
            return;
        }
        yield_to_scheduler();
    }
}

namespace {

// cp.async.bulk.tensor.2d with the 128-byte swizzle: box row r (128 bytes) at dst + 128 r, its
// 16-byte chunk c at chunk c ^ (address bits [7:9]); elements outside the tensor are zeros. The
// box lands in the blocks of `ranks` (bit r: block r of the cluster), at the same shared byte
// in each, and counts against the barrier at byte `bar` of each.
void tma_load_2d_into(uint32_t dst, const void* map, int x, int y, uint32_t bar, unsigned ranks) {
    const EmulatedTensorMap& m = *static_cast<const EmulatedTensorMap*>(map);
    if (m.magic != kTensorMapMagic) emulation_error("TMA copy through a tensor map the emulator did not encode", dst);
    const uint32_t bytes = m.box_rows * m.box_cols * 2;
    if (dst % 1024 != 0) emulation_error("128-byte-swizzled TMA destination not 1024-byte aligned", dst);
    if (dst + bytes > launch_state->dynamic_smem_bytes) emulation_error("TMA box past the dynamic shared memory", dst);
    if (ranks == 0 || ranks >> launch_state->cluster != 0) emulation_error("TMA multicast mask names a block outside the cluster", dst);
    // The box's elements inside the tensor, read now (for the race check too: the copy may read
    // them, and land, at any time before its barrier's phase completes); the rest stay zeros.
    std::vector<unsigned char> box(bytes, 0);
    const long long c0 = std::max<long long>(x, 0);
    const long long c1 = std::min<long long>(static_cast<long long>(x) + m.box_cols, static_cast<long long>(m.cols));
    for (uint32_t r = 0; r < m.box_rows; ++r) {
        const long long gr = static_cast<long long>(y) + r;
        if (gr < 0 || static_cast<uint64_t>(gr) >= m.rows || c1 <= c0) continue;
        const unsigned char* row = m.base + gr * m.row_stride_bytes;
        race::read(row + c0 * 2, static_cast<size_t>(c1 - c0) * 2);
        for (long long gc = c0; gc < c1; ++gc) {
            const uint32_t addr = dst + r * m.box_cols * 2 + static_cast<uint32_t>(gc - x) * 2;
            const uint32_t swizzled = addr ^ (((addr >> 7) & 7u) << 4);
            std::memcpy(box.data() + (swizzled - dst), row + gc * 2, 2);
        }
    }
    for (unsigned rank = 0; rank < launch_state->cluster; ++rank) {
        if ((ranks >> rank & 1u) == 0) continue;
        Block& block = launch_state->blocks[rank];
        check_live(block, dst);
        check_proxy(block, dst, bytes, "a TMA copy overwrites", true);
        MBarrier& b = mbarrier_in(block, bar);
        race::write(block.dynamic_smem + dst, bytes);
        race::release(&b.sync[b.phase & 1]);
        race::Untracked untracked;
        std::memset(block.dynamic_smem + dst, 0xff, bytes);
        b.copies.push_back(PendingTma{block.dynamic_smem, dst, box});
    }
    ++launch_state->progress;
}

}  // namespace

void fora_emulation_tma_load_2d(uint32_t dst, const void* map, int x, int y, uint32_t bar) {
    tma_load_2d_into(dst, map, x, y, bar, 1u << launch_state->rank);
}

// .multicast::cluster: the same box into every block of `mask`.
void fora_emulation_tma_load_2d_multicast(uint32_t dst, const void* map, int x, int y, uint32_t bar, uint16_t mask) {
    Launch& l = *launch_state;
    if ((mask & ~(1u << l.rank)) != 0 && !l.here().fibers[l.current].cluster_waited)
        emulation_error("multicast into other blocks before a cluster barrier (they may not have started)", dst);
    tma_load_2d_into(dst, map, x, y, bar, mask);
}

// Fills `out` (128 bytes) for a bf16 [rows, cols] tensor with `row_stride_bytes` between rows and
// a box of box_rows x box_cols, 128-byte swizzle. 0: done; 1: an argument cuTensorMapEncodeTiled
// would refuse (alignment, stride, box size).
// The lazy-thread stride of this OS thread's later launches (0: off; see is_lazy).
extern "C" void fora_emulate_set_lazy_threads(unsigned stride) { lazy_stride = stride; }

// The warp order of this OS thread's later launches (0: round robin; 1 / -1: warps ahead, the
// lowest / highest first; 2: blocks ahead; see warps_ahead).
extern "C" void fora_emulate_set_warps_ahead(int order) { warps_ahead = order; }

extern "C" int fora_emulate_encode_tma_2d(void* out, const void* base, uint64_t cols, uint64_t rows,
                                          uint64_t row_stride_bytes, uint32_t box_cols, uint32_t box_rows) {
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || row_stride_bytes % 16 != 0 || cols == 0 || rows == 0 ||
        box_cols * 2 != 128 || box_rows == 0 || box_rows > 256 || row_stride_bytes < cols * 2)
        return 1;
    EmulatedTensorMap m{kTensorMapMagic, static_cast<const unsigned char*>(base), cols, rows, row_stride_bytes,
                        box_cols, box_rows};
    std::memset(out, 0, 128);
    std::memcpy(out, &m, sizeof m);
    return 0;
}

void* fora_emulation_dynamic_smem_bytes() { return here().dynamic_smem; }

thread_local std::string last_error;

// 0: ran; 1: unknown kernel; 2: bad launch shape (a cluster kernel's grid must be a whole number of
// clusters along x, as cuLaunchKernel requires); 3: ran, and the proxy check failed
// (fora_emulate_last_error says where).
extern "C" int fora_emulate_launch(const char* name, unsigned grid_x, unsigned grid_y,
                                   unsigned grid_z, unsigned block_x, unsigned shared_mem_bytes,
                                   const void* params) {
    const Kernel kernel = find(name);
    if (kernel == nullptr) return 1;
    const unsigned cluster = cluster_size_of(name);
    if (grid_x == 0 || grid_y == 0 || grid_z == 0 || block_x == 0 || block_x > 1024 || grid_x % cluster != 0)
        return 2;
    Launch l;
    l.name = name;
    l.kernel = kernel;
    l.params = params;
    l.grid_dim = {grid_x, grid_y, grid_z};
    l.block = block_x;
    l.cluster = cluster;
    l.dynamic_smem_bytes = shared_mem_bytes;
    l.blocks.resize(cluster);
    const unsigned warps = (block_x + 31) / 32;
    for (Block& b : l.blocks) {
        b.fibers.resize(block_x);
        for (Fiber& f : b.fibers) f.stack.resize(kStackBytes);
        b.warp_barriers.resize(warps);
        b.warp_slots.assign(warps * 32, 0.0f);
        b.warp_addrs.assign(warps * 32, nullptr);
        b.warp_regs.assign(warps * 32 * 8, 0);
        b.warpgroup_barriers.resize((block_x + 127) / 128);
        b.warpgroup_regs.assign(b.warpgroup_barriers.size() * 128 * 4, 0);
        b.smem_storage.resize(shared_mem_bytes + 1024 + kSmemGuardBytes);
        b.unfenced.assign(shared_mem_bytes, 0);
        b.unfenced_read.assign(shared_mem_bytes, 0);
        const uintptr_t base = reinterpret_cast<uintptr_t>(b.smem_storage.data());
        b.dynamic_smem = b.smem_storage.data() + ((1024 - base % 1024) % 1024);
    }
    launch_state = &l;
    race::launch_begins();
    // Warps ahead, highest first, also runs the blocks from the last: a block that reads what
    // another block of the same launch writes (no order exists between them on a GPU) then
    // reads it before it is written, where the usual order hides it.
    const unsigned per_row = grid_x / cluster, clusters = per_row * grid_y * grid_z;
    for (unsigned i = 0; i < clusters; ++i) {
        const unsigned c = warps_ahead < 0 ? clusters - 1 - i : i;
        run_cluster(l, uint3{c % per_row * cluster, c / per_row % grid_y, c / per_row / grid_y});
    }
    race::launch_ends();
    launch_state = nullptr;
    last_error = l.check_error;
    return l.check_error.empty() ? 0 : 3;
}

// The CTAs of a cluster the emulator gives kernel `name` (by name: kernel_emulation.rs's
// `emulated_cluster_sizes_match_the_kernels` holds it to each kernel's FORA_CLUSTER).
extern "C" unsigned fora_emulate_cluster_size(const char* name) { return cluster_size_of(name); }

// What the last launch of this thread found wrong (empty when nothing).
extern "C" const char* fora_emulate_last_error() { return last_error.c_str(); }
