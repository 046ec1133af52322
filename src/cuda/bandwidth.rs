//! Launchers of `kernels/bandwidth.cu`, the bench's device helpers: the memory-bandwidth probes
//! behind its memory ceilings (a read-only sweep and a copy with 16-byte accesses, as our kernels
//! access memory), and the stream hold its in-model op times enqueue a step behind.

use super::device::{check_positive, check_ptr, KernelLauncher};
use super::params::{BandwidthParams, HoldParams};
use anyhow::{ensure, Result};

/// Threads per block (the kernels' `__launch_bounds__`).
pub const THREADS: u32 = 256;
/// Blocks per multiprocessor at most: 2048 threads an SM, so every SM holds all of its blocks.
const BLOCKS_PER_SM: usize = 8;
/// Chunks a thread has in flight (the kernels' kInFlight): a grid needs no more threads than
/// that many chunks apart.
const IN_FLIGHT: i64 = 4;

/// The grid of either probe over `chunks` 16-byte chunks on a GPU of `sms` multiprocessors.
pub fn bandwidth_grid(chunks: i64, sms: usize) -> u32 {
    let per_block = IN_FLIGHT * THREADS as i64;
    let needed = (chunks.max(1) + per_block - 1) / per_block;
    needed.min((sms.max(1) * BLOCKS_PER_SM) as i64) as u32
}

/// Words `bandwidth_read` writes for `chunks` chunks on `gpu` (one a thread of its grid): the
/// size of its `dst`.
pub fn bandwidth_read_words(gpu: &impl KernelLauncher, chunks: i64) -> usize {
    bandwidth_grid(chunks, gpu.multiprocessors()) as usize * THREADS as usize
}

fn check(kernel: &str, p: &BandwidthParams) -> Result<()> {
    check_positive(kernel, "chunks", p.chunks)?;
    check_ptr(kernel, "src", p.src, 16)?;
    Ok(())
}

/// Validates `p` and returns the grid of [`bandwidth_read`].
pub fn bandwidth_read_plan(gpu: &impl KernelLauncher, p: &BandwidthParams) -> Result<u32> {
    const K: &str = "bandwidth_read";
    check(K, p)?;
    check_ptr(K, "dst", p.dst, 4)?;
    ensure!(
        p.mask == -1 || (p.mask >= 0 && (p.mask + 1).count_ones() == 1),
        "{K}: mask {} must be -1 (read src once) or one less than a power of two",
        p.mask
    );
    let grid = bandwidth_grid(p.chunks, gpu.multiprocessors());
    let threads = grid as i64 * THREADS as i64;
    ensure!(
        p.out_words >= threads,
        "{K}: dst holds {} words, the grid's {threads} threads write one each",
        p.out_words
    );
    Ok(grid)
}

/// Reads `16 * chunks` bytes of `src` (with `mask`, `src`'s first `mask + 1` chunks over and
/// over); `dst[i]` = the XOR of the 32-bit words thread `i` read.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn bandwidth_read(gpu: &impl KernelLauncher, p: &BandwidthParams) -> Result<()> {
    let grid = bandwidth_read_plan(gpu, p)?;
    // SAFETY: validated above; the caller owns `16 * chunks` bytes at src and `out_words`
    // words at dst.
    unsafe { gpu.launch_kernel("bandwidth_read", (grid, 1, 1), (THREADS, 1, 1), 0, p) }
}

/// Validates `p` and returns the grid of [`bandwidth_copy`].
pub fn bandwidth_copy_plan(gpu: &impl KernelLauncher, p: &BandwidthParams) -> Result<u32> {
    const K: &str = "bandwidth_copy";
    check(K, p)?;
    ensure!(
        p.mask == -1,
        "{K}: a copy reads its source once (mask must be -1)"
    );
    check_ptr(K, "dst", p.dst, 16)?;
    let bytes = 16 * p.chunks as u64;
    ensure!(
        p.src + bytes <= p.dst || p.dst + bytes <= p.src,
        "{K}: src and dst overlap"
    );
    Ok(bandwidth_grid(p.chunks, gpu.multiprocessors()))
}

/// Copies `16 * chunks` bytes from `src` to `dst` (not overlapping).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn bandwidth_copy(gpu: &impl KernelLauncher, p: &BandwidthParams) -> Result<()> {
    let grid = bandwidth_copy_plan(gpu, p)?;
    // SAFETY: validated above; the caller owns `16 * chunks` bytes at src and at dst.
    unsafe { gpu.launch_kernel("bandwidth_copy", (grid, 1, 1), (THREADS, 1, 1), 0, p) }
}

/// Longest hold [`hold_stream`] takes: one second.
pub const MAX_HOLD_NS: i64 = 1_000_000_000;

/// Holds the stream for `ns` nanoseconds (1 ..= [`MAX_HOLD_NS`]) of the GPU's clock: what the
/// host enqueues behind it then runs back to back, as from a graph, however slowly the host
/// enqueued it. One thread; touches no memory. (The CPU emulator returns at once.)
pub fn hold_stream(gpu: &impl KernelLauncher, ns: i64) -> Result<()> {
    ensure!(
        (1..=MAX_HOLD_NS).contains(&ns),
        "hold_stream: {ns} ns is outside 1 ..= {MAX_HOLD_NS}"
    );
    let p = HoldParams { ns };
    // SAFETY: the kernel reads only its parameter.
    unsafe { gpu.launch_kernel("hold_stream", (1, 1, 1), (32, 1, 1), 0, &p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_small_sweeps_and_caps_large_ones() {
        assert_eq!(bandwidth_grid(1, 132), 1);
        assert_eq!(bandwidth_grid(1024, 132), 1);
        assert_eq!(bandwidth_grid(1025, 132), 2);
        assert_eq!(bandwidth_grid(1 << 26, 132), 132 * 8);
        assert_eq!(bandwidth_grid(1 << 26, 0), 8);
    }
}
