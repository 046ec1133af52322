//! NVTX ranges for nsys and ncu, through NVIDIA's header-only NVTX3 as the `nvtx` crate builds
//! it. Without a profiler attached every call is a no-op of a few nanoseconds.
//!
//! The `nvtx` crate's own macros allocate (a `String` and a `CString` per range), which a reuse
//! step must not do, so this module calls the C functions that crate compiles (`ffi_range_push`,
//! `ffi_range_pop` in its `export.c`) with the name formatted into a stack buffer.
//!
//! Ranges are push/pop ranges on the calling thread: ncu's `--nvtx-include` filter matches
//! them (it does not match start/end ranges). Names used: `sample`, `workspace`,
//! `step <k> <compute|reuse>` (in `fora bench`: `rows <R> step <i> full|reuse`, and `rows <R>
//! run <i> reuse_summed` over a run of reuse steps that read cache sums), `conditioning`,
//! `next_modulation` (the side stream's), `patch_embed`, `block <l>` and per op `ln_msa`,
//! `qkv`, `attention`, `proj`, `ln_mlp`, `fc1`, `fc2`, `residual_ln`, the fusions
//! `qkv+attention`, `proj+ln` and `fc2+ln`, then `fora_reuse` or `fora_reuse_final`, with cache
//! sums `sum_gates` and `fora_cache_sum`, `final_layer`, `sampler_step` (or
//! `final_sampler_step`). CUDA-graph replays carry only the step ranges
//! (the per-op ranges are recorded when the graph is captured); `FORA_CUDA_GRAPHS=0` launches
//! op by op under them. The model opens its op ranges with [`crate::op_range!`]
//! ([`crate::cuda::op_timer`]), which also times them with CUDA events for `fora bench --sections
//! ops`.

use core::ffi::c_char;
use core::fmt::Write;

// Links the static library the `nvtx` crate builds (its `export.c` over NVTX3).
extern crate nvtx;

extern "C" {
    fn ffi_range_push(message: *const c_char) -> i32;
    fn ffi_range_pop() -> i32;
}

/// Range names longer than this are cut.
const NAME_CAP: usize = 96;

/// A NUL-terminated name built on the stack.
struct Name {
    buf: [u8; NAME_CAP + 1],
    len: usize,
}

impl Write for Name {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            // An interior NUL would end the C string early; cut the name there instead.
            if self.len == NAME_CAP || b == 0 {
                break;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// A push/pop NVTX range, popped when dropped. Allocates nothing.
#[must_use = "the range ends when this guard is dropped"]
pub struct NvtxRange(());

impl NvtxRange {
    /// Pushes a range named by `name` (use `format_args!`, or the [`crate::nvtx_range!`] macro).
    pub fn push(name: core::fmt::Arguments<'_>) -> NvtxRange {
        let mut n = Name {
            buf: [0; NAME_CAP + 1],
            len: 0,
        };
        let _ = n.write_fmt(name);
        n.buf[n.len] = 0;
        // SAFETY: `buf` is NUL-terminated and outlives the call; NVTX copies the string.
        unsafe { ffi_range_push(n.buf.as_ptr().cast()) };
        NvtxRange(())
    }
}

impl Drop for NvtxRange {
    fn drop(&mut self) {
        // SAFETY: pops the range this guard pushed on this thread.
        unsafe { ffi_range_pop() };
    }
}

/// `nvtx_range!("step {k}")`: an [`NvtxRange`] guard for the rest of the scope.
#[macro_export]
macro_rules! nvtx_range {
    ($($arg:tt)*) => {
        $crate::profile::NvtxRange::push(::core::format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_and_terminated() {
        let mut n = Name {
            buf: [0xff; NAME_CAP + 1],
            len: 0,
        };
        let long = "x".repeat(200);
        let _ = write!(n, "{long}");
        assert_eq!(n.len, NAME_CAP);
        let mut m = Name {
            buf: [0xff; NAME_CAP + 1],
            len: 0,
        };
        let _ = write!(m, "a\0b");
        assert_eq!(&m.buf[..m.len], b"a");
        // Push and pop without a profiler attached: a no-op that must not crash.
        let _r = crate::nvtx_range!("test {}", 1);
    }
}
