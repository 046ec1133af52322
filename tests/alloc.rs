//! A FORA reuse step allocates nothing: a counting global allocator watches a whole sampling run
//! of the CPU backend and the sampler loop, and every reuse step (with the sampler bookkeeping
//! around it) must leave the allocation count unchanged.
//!
//! This binary holds one test, so no other test thread allocates while it counts.

use fora::backend::{Guidance, GuidanceMode, NoiseSource, StepMode};
use fora::cache::StaticInterval;
use fora::config::{Arch, DitConfig};
use fora::cpu::CpuBackend;
use fora::sampler::{Sampler, SamplerOptions};
use fora::weights::DitWeights;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts every allocation and reallocation, on all threads.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwards the caller's contract to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn reuse_steps_allocate_nothing() {
    let arch = Arch::parse("depth=3,hidden=64,heads=4,patch=2").unwrap();
    let config = DitConfig::from_arch(&arch, 4, 8, 10, true).unwrap();
    let weights = DitWeights::random(&config, 3).unwrap();
    let backend = CpuBackend::new(config, weights).unwrap();
    // Start every rayon worker before counting: a worker still starting up (its thread-locals)
    // when the first reuse step runs would count against that step. Seen once in CI on a loaded
    // machine ("reuse step k=1 made 2 allocations"); broadcast returns once each worker ran.
    rayon::broadcast(|_| ());
    let steps = 30;
    for guidance in [
        None,
        Some(Guidance {
            scale: 4.0,
            mode: GuidanceMode::Official3,
        }),
    ] {
        let sampler = Sampler::new(
            &backend,
            SamplerOptions::ddpm(steps).with_guidance(guidance),
        )
        .unwrap();
        let mut policy = StaticInterval::new(3).unwrap();
        // (mode, allocation count after the step), reserved up front so recording allocates
        // nothing.
        let mut after: Vec<(StepMode, usize)> = Vec::with_capacity(steps);
        let out = sampler
            .sample_with_progress(&[1, 7], NoiseSource::Seed(9), &mut policy, &mut |e| {
                after.push((e.mode, ALLOCATIONS.load(Ordering::SeqCst)))
            })
            .unwrap();
        assert_eq!(after.len(), steps);
        assert_eq!(
            out.stats.reused, 19,
            "i = 29 and the 10 multiples of 3 compute"
        );
        let mut reuse_steps = 0;
        for k in 1..steps {
            let (mode, count) = after[k];
            if mode == StepMode::Reuse {
                reuse_steps += 1;
                let during = count - after[k - 1].1;
                assert_eq!(
                    during, 0,
                    "reuse step k={k} (guidance {guidance:?}) made {during} allocations"
                );
            }
        }
        assert_eq!(reuse_steps, 19);
        // The counter does see allocations: the run as a whole made some (workspace, output).
        assert!(after[steps - 1].1 > after[0].1 || after[0].1 > 0);
    }
}
