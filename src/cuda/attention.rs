//! Launcher of the flash-attention kernel (`kernels/attention.cu`).
//!
//! Input: the qkv Linear's output, bf16 `[B, T, 3, H, d]` (row stride `3*H*d`; q, k, v of head
//! `h` at `h*d`, `H*d + h*d`, `2*H*d + h*d`). Output: bf16 `[B, T, H, d]` (= `[B*T, D]`, the
//! proj Linear's input). `out = softmax(q k^T * scale) v` per (batch, head), no mask.
//!
//! One kernel instantiation per supported head_dim (64, 72, 128); the grid is
//! `(ceil(T / 64), heads, batch)` blocks of 4 warps, each warp owning 16 query rows.

use super::device::Gpu;
use super::params::AttentionParams;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Query rows per block (16 per warp, 4 warps).
pub const ATTENTION_BLOCK_M: u32 = 64;
/// Keys per K/V tile.
pub const ATTENTION_BLOCK_N: u32 = 64;
const THREADS: u32 = 128;
/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

/// The head dims the kernel is instantiated for.
pub const ATTENTION_HEAD_DIMS: [i32; 3] = [64, 72, 128];

/// What [`attention`] launches for a given set of parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionLaunch {
    /// The kernel's `extern "C"` name.
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes: a Q tile and two K and two V tiles of 64 rows, each row
    /// the head_dim rounded up to 16 (the mma k) plus 8 bf16 of bank-conflict padding.
    pub shared_mem_bytes: u32,
}

impl AttentionLaunch {
    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: self.grid,
            block_dim: self.block,
            shared_mem_bytes: self.shared_mem_bytes,
        }
    }
}

/// Shared memory of the kernel for `head_dim` (mirrors `AttentionShape` in attention.cu).
fn smem_bytes(head_dim: u32) -> u32 {
    let stride = head_dim.div_ceil(16) * 16 + 8;
    (ATTENTION_BLOCK_M + 4 * ATTENTION_BLOCK_N) * stride * 2
}

/// Validates `p` and says which kernel [`attention`] launches, with which grid. Pure: needs no
/// device, so callers (and tests) can check parameters up front.
pub fn attention_plan(p: &AttentionParams) -> Result<AttentionLaunch> {
    let kernel = match p.head_dim {
        64 => "attention_d64",
        72 => "attention_d72",
        128 => "attention_d128",
        d => bail!(
            "attention: head_dim {d} is not supported; the kernel is built for head_dim {:?}",
            ATTENTION_HEAD_DIMS
        ),
    };
    ensure!(p.batch > 0, "attention: batch must be > 0, got {}", p.batch);
    ensure!(
        p.tokens > 0,
        "attention: tokens must be > 0, got {}",
        p.tokens
    );
    ensure!(p.heads > 0, "attention: heads must be > 0, got {}", p.heads);
    // Grid y and z are limited to 65535 blocks.
    ensure!(
        p.batch <= 65535,
        "attention: batch {} exceeds the grid's 65535 (launch in chunks)",
        p.batch
    );
    ensure!(
        p.heads <= 65535,
        "attention: heads {} exceeds the grid's 65535",
        p.heads
    );
    // The kernel computes (tile + 1) * 64 and query-row indices in int.
    ensure!(
        p.tokens <= i32::MAX - 2 * ATTENTION_BLOCK_N as i32,
        "attention: tokens {} is too large for the kernel's 32-bit row indices",
        p.tokens
    );
    // The online softmax folds the scale into max(): only valid for a positive scale.
    ensure!(
        p.scale.is_finite() && p.scale > 0.0,
        "attention: scale must be finite and > 0 (1/sqrt(head_dim)), got {}",
        p.scale
    );
    ensure!(p.qkv != 0, "attention: qkv pointer is null");
    ensure!(p.out != 0, "attention: out pointer is null");
    // 16-byte cp.async loads and 16-byte stores: with d a multiple of 8 every row and head
    // offset is 16-byte aligned, so only the base pointers need checking.
    ensure!(
        p.qkv.is_multiple_of(16),
        "attention: qkv pointer {:#x} is not 16-byte aligned (the kernel loads 16-byte chunks)",
        p.qkv
    );
    ensure!(
        p.out.is_multiple_of(16),
        "attention: out pointer {:#x} is not 16-byte aligned (the kernel stores 16-byte chunks)",
        p.out
    );
    let tokens = p.tokens as u32;
    Ok(AttentionLaunch {
        kernel,
        grid: (
            tokens.div_ceil(ATTENTION_BLOCK_M),
            p.heads as u32,
            p.batch as u32,
        ),
        block: (THREADS, 1, 1),
        shared_mem_bytes: smem_bytes(p.head_dim as u32),
    })
}

/// Multiply-adds x 2 of one attention call (QK^T and PV), for TFLOP/s figures.
pub fn attention_flops(batch: usize, heads: usize, tokens: usize, head_dim: usize) -> f64 {
    4.0 * batch as f64 * heads as f64 * tokens as f64 * tokens as f64 * head_dim as f64
}

/// Launches flash attention on `gpu`'s stream: reads `p.qkv`, writes every element of `p.out`.
/// `out` must not overlap `qkv` (blocks read the K/V rows of other blocks' queries).
/// Allocates nothing, so it can be captured in a CUDA graph.
pub fn attention(gpu: &Gpu, p: &AttentionParams) -> Result<()> {
    let plan = attention_plan(p)?;
    let f = gpu.function(plan.kernel)?;
    if plan.shared_mem_bytes > DEFAULT_SMEM_LIMIT {
        // Opt in to more than 48 KiB of dynamic shared memory. A function attribute, not a
        // stream operation: query first so repeated launches (and graph captures) only read it.
        let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let current = f.get_attribute(attr).with_context(|| {
            format!(
                "attention: cannot query {}'s shared-memory limit",
                plan.kernel
            )
        })?;
        if current < plan.shared_mem_bytes as i32 {
            f.set_attribute(attr, plan.shared_mem_bytes as i32)
                .with_context(|| {
                    format!(
                        "attention: {} needs {} bytes of shared memory per block, more than device {} allows",
                        plan.kernel,
                        plan.shared_mem_bytes,
                        gpu.ordinal()
                    )
                })?;
        }
    }
    // SAFETY: the kernel takes one AttentionParams by value (the ABI of params.h); the pointers
    // are the caller's device buffers of the documented shapes.
    unsafe { gpu.stream().launch_builder(&f).arg(p).launch(plan.config()) }.with_context(|| {
        format!(
            "attention: launching {} (batch {}, heads {}, tokens {}) failed",
            plan.kernel, p.batch, p.heads, p.tokens
        )
    })?;
    Ok(())
}
