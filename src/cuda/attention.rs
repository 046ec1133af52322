//! Launcher of the flash-attention kernel (`kernels/attention.cu`).
//!
//! Input: the qkv Linear's output, bf16 `[B, T, 3, H, d]` (row stride `3*H*d`; q, k, v of head
//! `h` at `h*d`, `H*d + h*d`, `2*H*d + h*d`). Output: bf16 `[B, T, H, d]` (= `[B*T, D]`, the
//! proj Linear's input). `out = softmax(q k^T * scale) v` per (batch, head), no mask.
//!
//! Kernel families, chosen at run time by [`AttentionImpl`]
//! (`FORA_ATTENTION=v1|v2|wgmma|wgmma_mn|wgmma_mn_deep|wgmma_mn_split|tma|tma_pp|auto`, read once per
//! process; unset means auto), each instantiated for head_dim 64, 72 and 128:
//! - v1 (`attention_d*`): grid `(ceil(T / 64), heads, batch)` blocks of 4 warps, each warp
//!   owning 16 query rows.
//! - v2 (opt-in, `attention_v2_d*`): grid `(ceil(T / 128), heads, batch)` blocks of 4 warps,
//!   each warp owning 32 query rows (every K/V fragment feeds two mma), K and V loaded as
//!   separate cp.async groups.
//! - wgmma (opt-in, Hopper only, `attention_wgmma_d*` in `kernels/attention_sm90.cu`): grid
//!   `(ceil(T / 128), heads, batch)` blocks of two warpgroups, each owning 64 query rows; both
//!   products on wgmma.mma_async with A from registers. Grids of fewer blocks than SMs take
//!   one-warpgroup blocks of 64 rows instead (`attention_wgmma_m64_d*`, [`attention_plan_on`]).
//! - wgmma_mn (Hopper only, `attention_wgmma_mn[_m64]_d*`): the same with PV reading V
//!   MN-major from its stage (no V^T transpose).
//! - wgmma_mn_deep (opt-in, Hopper only): wgmma_mn with four K/V stages in its 64-row blocks
//!   (`attention_wgmma_mn_deep_m64_d*`, small grids), every tile of 256 keys in flight at once.
//! - wgmma_mn_split (opt-in, Hopper only): wgmma_mn whose 64-row blocks (small grids) are two
//!   warpgroups splitting the key tiles, merged at the end (`attention_wgmma_mn_split_m64_d*`).
//! - tma (opt-in, Hopper only, `attention_tma_d*`): a persistent grid (one CTA an SM) of a
//!   TMA producer warpgroup and two wgmma consumer warpgroups streaming (batch, head, 128-query)
//!   units, so that DRAM stays busy between units ([`AttentionTmaParams`]).
//! - tma_pp (opt-in, Hopper only, `attention_tma_pp_d*`): tma with its consumer warpgroups
//!   taking turns at the tensor cores (one's softmax under the other's products).
//! - auto (the default): wgmma_mn on a Hopper, v1 elsewhere ([`AttentionImpl::resolve`]).

use super::device::{ensure_hopper, KernelLauncher, TmaTensor2d};
use super::params::{AttentionParams, AttentionTmaParams};
use anyhow::{bail, ensure, Context, Result};
use std::str::FromStr;

/// Which flash-attention kernel family [`attention_with`] launches (the backend's:
/// [`super::CudaOptions::attention`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionImpl {
    /// 64 query rows per block, 16 per warp; what [`AttentionImpl::Auto`] runs off Hopper.
    /// Measured correct on an H200 (2026-11-26).
    V1,
    /// 128 query rows per block, 32 per warp. Opt-in until measured on a device.
    V2,
    /// The default: [`AttentionImpl::WgmmaMn`] on a Hopper (compute capability 9.x), else
    /// [`AttentionImpl::V1`]; resolved per launch by [`AttentionImpl::resolve`]. On an H200
    /// (2026-11-26) wgmma_mn took 274 us at 256 rows (v1 410, wgmma 312, PyTorch's SDPA 286)
    /// and 6.8 us at 2 rows (v1 7.2), and the 256-row step went from 124.0 to 120.8 ms.
    Auto,
    /// Hopper (compute capability 9.x) only: 128 query rows per block, 64 per warpgroup, QK^T
    /// and PV on wgmma, V transposed in shared memory for PV. Measured correct on an H200
    /// (2026-11-26), slower than [`AttentionImpl::WgmmaMn`].
    Wgmma,
    /// [`AttentionImpl::Wgmma`] with PV reading V MN-major (the transpose-B bit) from its
    /// stage as loaded: no transpose, one barrier a key tile. What [`AttentionImpl::Auto`] runs
    /// on a Hopper; measured correct on an H200 (2026-11-26).
    WgmmaMn,
    /// Hopper only: a persistent grid, one CTA an SM, each a TMA producer warpgroup and two
    /// wgmma consumer warpgroups (64 query rows each) over (batch, head, 128-query) units, K/V
    /// tiles of 128 keys through a two-slot ring, so loads of the next unit overlap this one's
    /// math. Opt-in: on an H200 (session 18) 239-240 us at 256 rows alone (1.19x
    /// [`AttentionImpl::WgmmaMn`]); its ~1% of the 256-row step is within the drift between
    /// the processes that measured it.
    Tma,
    /// [`AttentionImpl::Tma`] whose two consumer warpgroups take turns issuing their wgmmas
    /// (named barriers, FlashAttention-3's ping-pong), so that one's softmax runs while the
    /// other's products keep the tensor cores busy; the same results to the bit. Opt-in: not
    /// yet run on a GPU (session 25).
    TmaPingPong,
    /// [`AttentionImpl::WgmmaMn`] whose 64-row blocks (small grids: one image + CFG) keep four
    /// K/V tiles in flight instead of one (`attention_wgmma_mn_deep_m64_d*`, one block an SM):
    /// at one block an SM nothing hides a tile's load latency, and 256 keys are four tiles in
    /// a row. Larger grids run WgmmaMn's 128-row blocks. Opt-in: on an H200 (session 18)
    /// 6.6-6.7 us at 2 rows against 7.0-7.1, the 2-row step within 1%.
    WgmmaMnDeep,
    /// [`AttentionImpl::WgmmaMn`] whose 64-row blocks (small grids) are two warpgroups that
    /// split the key tiles between them, each with its own online softmax, merged at the end
    /// (`attention_wgmma_mn_split_m64_d*`, 256 threads, six K/V stages, one block an SM): half
    /// the chain of key tiles a block waits for. Larger grids run WgmmaMn's 128-row blocks.
    /// Opt-in: on an H200 (session 18) 6.9-7.0 us at 2 rows against 7.0-7.1.
    WgmmaMnSplit,
}

impl FromStr for AttentionImpl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<AttentionImpl> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Ok(AttentionImpl::V1),
            "v2" | "2" => Ok(AttentionImpl::V2),
            "auto" => Ok(AttentionImpl::Auto),
            "wgmma" => Ok(AttentionImpl::Wgmma),
            "wgmma_mn" => Ok(AttentionImpl::WgmmaMn),
            "wgmma_mn_deep" => Ok(AttentionImpl::WgmmaMnDeep),
            "wgmma_mn_split" => Ok(AttentionImpl::WgmmaMnSplit),
            "tma" => Ok(AttentionImpl::Tma),
            "tma_pp" => Ok(AttentionImpl::TmaPingPong),
            other => bail!(
                "unknown attention implementation {other:?}: expected \"v1\", \"v2\", \"wgmma\", \
                 \"wgmma_mn\", \"wgmma_mn_deep\", \"wgmma_mn_split\", \"tma\", \"tma_pp\" or \
                 \"auto\""
            ),
        }
    }
}

impl AttentionImpl {
    /// Whether this is one of the Hopper-only wgmma families.
    pub fn is_wgmma(self) -> bool {
        matches!(
            self,
            AttentionImpl::Wgmma
                | AttentionImpl::WgmmaMn
                | AttentionImpl::WgmmaMnDeep
                | AttentionImpl::WgmmaMnSplit
                | AttentionImpl::Tma
                | AttentionImpl::TmaPingPong
        )
    }

    /// Whether this is a persistent TMA kernel ([`AttentionTmaParams`], one CTA an SM).
    pub fn is_tma(self) -> bool {
        matches!(self, AttentionImpl::Tma | AttentionImpl::TmaPingPong)
    }

    /// The kernel families (every implementation but [`AttentionImpl::Auto`]).
    pub const ALL: [AttentionImpl; 8] = [
        AttentionImpl::V1,
        AttentionImpl::V2,
        AttentionImpl::Wgmma,
        AttentionImpl::WgmmaMn,
        AttentionImpl::WgmmaMnDeep,
        AttentionImpl::WgmmaMnSplit,
        AttentionImpl::Tma,
        AttentionImpl::TmaPingPong,
    ];

    /// The name `FORA_ATTENTION` and the bench's rows use for it.
    pub fn name(self) -> &'static str {
        match self {
            AttentionImpl::V1 => "v1",
            AttentionImpl::V2 => "v2",
            AttentionImpl::Auto => "auto",
            AttentionImpl::Wgmma => "wgmma",
            AttentionImpl::WgmmaMn => "wgmma_mn",
            AttentionImpl::WgmmaMnDeep => "wgmma_mn_deep",
            AttentionImpl::WgmmaMnSplit => "wgmma_mn_split",
            AttentionImpl::Tma => "tma",
            AttentionImpl::TmaPingPong => "tma_pp",
        }
    }

    /// The kernel family that runs on a device of compute capability major `cc_major`: `self`
    /// unless it is [`AttentionImpl::Auto`].
    pub fn resolve(self, cc_major: i32) -> AttentionImpl {
        match self {
            AttentionImpl::Auto if cc_major == 9 => AttentionImpl::WgmmaMn,
            AttentionImpl::Auto => AttentionImpl::V1,
            concrete => concrete,
        }
    }

    /// `FORA_ATTENTION=v1|v2|wgmma|wgmma_mn|wgmma_mn_deep|wgmma_mn_split|tma|tma_pp|auto`, parsed now;
    /// unset or empty means [`AttentionImpl::Auto`].
    pub fn from_env() -> Result<AttentionImpl> {
        match std::env::var("FORA_ATTENTION") {
            Ok(v) if !v.trim().is_empty() => {
                v.parse().context("environment variable FORA_ATTENTION")
            }
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(AttentionImpl::Auto),
            Err(std::env::VarError::NotUnicode(v)) => {
                bail!("environment variable FORA_ATTENTION is not UTF-8: {v:?}")
            }
        }
    }
}

/// v1: query rows per block (16 per warp, 4 warps).
pub const ATTENTION_BLOCK_M: u32 = 64;
/// v2: query rows per block (32 per warp, 4 warps).
pub const ATTENTION_V2_BLOCK_M: u32 = 128;
/// wgmma: query rows per block (64 per warpgroup, 2 warpgroups).
pub const ATTENTION_WGMMA_BLOCK_M: u32 = 128;
/// Keys per K/V tile (every implementation).
pub const ATTENTION_BLOCK_N: u32 = 64;
/// tma: query rows of a unit (64 per consumer warpgroup) and keys of a K/V tile.
pub const ATTENTION_TMA_BLOCK: u32 = 128;
const THREADS: u32 = 128;
const WGMMA_THREADS: u32 = 256;
/// tma: a producer and two consumer warpgroups.
const TMA_THREADS: u32 = 384;

/// The head dims the kernel is instantiated for.
pub const ATTENTION_HEAD_DIMS: [i32; 3] = [64, 72, 128];

/// What [`attention`] launches for a given set of parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionLaunch {
    /// The kernel's `extern "C"` name.
    pub kernel: &'static str,
    /// Grid of blocks.
    pub grid: (u32, u32, u32),
    /// Threads a block.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes: a Q tile (`block_m` rows) and two K and two V tiles of
    /// 64 rows, each row the head_dim rounded up to 16 (the mma k) plus 8 bf16 of bank-conflict
    /// padding.
    pub shared_mem_bytes: u32,
}

/// Shared memory of a kernel with `block_m` query rows for `head_dim` (mirrors
/// `AttentionShape` / `AttentionV2Shape` in attention.cu).
fn smem_bytes(block_m: u32, head_dim: u32) -> u32 {
    let stride = head_dim.div_ceil(16) * 16 + 8;
    (block_m + 4 * ATTENTION_BLOCK_N) * stride * 2
}

/// Shared memory of the wgmma kernels for `head_dim` (mirrors `WgmmaAttentionShape` in
/// attention_sm90.cu): `stages` stages of a K tile (64 rows of 128-byte swizzle panels, one per
/// 64 columns of the head dim rounded up to 16) and a V tile, and 1 KiB to align the base to the
/// 1024-byte swizzle atom. Transposing V (`v_mn` false): V stages of 64 rows of head_dim and a V^T
/// tile of head_dim rows of 128 bytes; V MN-major: V stages in K's layout, no V^T.
fn wgmma_smem_bytes(head_dim: u32, v_mn: bool, stages: u32) -> u32 {
    let k_panels = (head_dim.div_ceil(16) * 16).div_ceil(64);
    let k_stage = k_panels * ATTENTION_BLOCK_N * 128;
    if v_mn {
        stages * (2 * k_stage) + 1024
    } else {
        let v_stage = ATTENTION_BLOCK_N * head_dim * 2;
        stages * (k_stage + v_stage) + head_dim * 128 + 1024
    }
}

/// Shared memory of the persistent TMA kernel for `head_dim` (mirrors `TmaAttentionShape` in
/// attention_sm90.cu): a Q tile and two K and two V tiles, each of 128 rows in 128-byte swizzle
/// panels (one per 64 columns of the head dim rounded up to 16); the output staging of 8 warps x
/// 16 rows of head_dim rounded up to 16 plus 8 bf16; six mbarriers; 1 KiB to align the base.
fn tma_smem_bytes(head_dim: u32) -> u32 {
    let dk = head_dim.div_ceil(16) * 16;
    let tile = dk.div_ceil(64) * ATTENTION_TMA_BLOCK * 128;
    let staging = 8 * 16 * (dk + 8) * 2;
    let barriers = (5 * tile + staging).div_ceil(8) * 8;
    barriers + 8 * 6 + 1024
}

/// Validates `p` and says which v1 kernel (the default off Hopper) runs, with which grid. Pure:
/// needs no device, so callers (and tests) can check parameters up front.
pub fn attention_plan(p: &AttentionParams) -> Result<AttentionLaunch> {
    attention_plan_for(p, AttentionImpl::V1)
}

/// Validates `p` and says which kernel of implementation `imp` runs, with which grid, on a device
/// with enough SMs for the largest blocks. Pure; `imp` must be a kernel family
/// ([`AttentionImpl::resolve`] turns `Auto` into one).
pub fn attention_plan_for(p: &AttentionParams, imp: AttentionImpl) -> Result<AttentionLaunch> {
    plan(p, imp, false, None)
}

/// [`attention_plan_for`] as launched on a device with `sm_count` SMs: the wgmma family takes its
/// 64-row blocks (one warpgroup, `attention_wgmma_m64_d*`) when its 128-row blocks would be
/// fewer than the SMs (one image + CFG at DiT-XL/2: 64 blocks). Pure.
pub fn attention_plan_on(
    p: &AttentionParams,
    imp: AttentionImpl,
    sm_count: usize,
) -> Result<AttentionLaunch> {
    let blocks = (p.tokens.max(0) as u64).div_ceil(ATTENTION_WGMMA_BLOCK_M as u64)
        * p.heads.max(0) as u64
        * p.batch.max(0) as u64;
    plan(
        p,
        imp,
        imp.is_wgmma() && blocks < sm_count as u64,
        Some(sm_count),
    )
}

/// The plan of `imp`; `wgmma_m64`: the wgmma family's 64-row blocks; `sm_count`: the
/// persistent TMA kernel's CTAs at most (one an SM; None: one a unit).
fn plan(
    p: &AttentionParams,
    imp: AttentionImpl,
    wgmma_m64: bool,
    sm_count: Option<usize>,
) -> Result<AttentionLaunch> {
    let (block_m, threads) = match imp {
        AttentionImpl::Tma | AttentionImpl::TmaPingPong => (ATTENTION_TMA_BLOCK, TMA_THREADS),
        AttentionImpl::V1 => (ATTENTION_BLOCK_M, THREADS),
        AttentionImpl::V2 => (ATTENTION_V2_BLOCK_M, THREADS),
        // Two warpgroups on the 64 rows, splitting the keys.
        AttentionImpl::WgmmaMnSplit if wgmma_m64 => (ATTENTION_WGMMA_BLOCK_M / 2, WGMMA_THREADS),
        AttentionImpl::Wgmma | AttentionImpl::WgmmaMn | AttentionImpl::WgmmaMnDeep if wgmma_m64 => {
            (ATTENTION_WGMMA_BLOCK_M / 2, WGMMA_THREADS / 2)
        }
        AttentionImpl::Wgmma
        | AttentionImpl::WgmmaMn
        | AttentionImpl::WgmmaMnDeep
        | AttentionImpl::WgmmaMnSplit => (ATTENTION_WGMMA_BLOCK_M, WGMMA_THREADS),
        AttentionImpl::Auto => {
            bail!("attention: AttentionImpl::Auto has no plan of its own; resolve it for a device first")
        }
    };
    let kernel = match (imp, p.head_dim) {
        (AttentionImpl::V1, 64) => "attention_d64",
        (AttentionImpl::V1, 72) => "attention_d72",
        (AttentionImpl::V1, 128) => "attention_d128",
        (AttentionImpl::V2, 64) => "attention_v2_d64",
        (AttentionImpl::V2, 72) => "attention_v2_d72",
        (AttentionImpl::V2, 128) => "attention_v2_d128",
        (AttentionImpl::Wgmma, 64) if wgmma_m64 => "attention_wgmma_m64_d64",
        (AttentionImpl::Wgmma, 72) if wgmma_m64 => "attention_wgmma_m64_d72",
        (AttentionImpl::Wgmma, 128) if wgmma_m64 => "attention_wgmma_m64_d128",
        (AttentionImpl::Wgmma, 64) => "attention_wgmma_d64",
        (AttentionImpl::Wgmma, 72) => "attention_wgmma_d72",
        (AttentionImpl::Wgmma, 128) => "attention_wgmma_d128",
        (AttentionImpl::WgmmaMn, 64) if wgmma_m64 => "attention_wgmma_mn_m64_d64",
        (AttentionImpl::WgmmaMn, 72) if wgmma_m64 => "attention_wgmma_mn_m64_d72",
        (AttentionImpl::WgmmaMn, 128) if wgmma_m64 => "attention_wgmma_mn_m64_d128",
        (AttentionImpl::WgmmaMnDeep, 64) if wgmma_m64 => "attention_wgmma_mn_deep_m64_d64",
        (AttentionImpl::WgmmaMnDeep, 72) if wgmma_m64 => "attention_wgmma_mn_deep_m64_d72",
        (AttentionImpl::WgmmaMnDeep, 128) if wgmma_m64 => "attention_wgmma_mn_deep_m64_d128",
        (AttentionImpl::WgmmaMnSplit, 64) if wgmma_m64 => "attention_wgmma_mn_split_m64_d64",
        (AttentionImpl::WgmmaMnSplit, 72) if wgmma_m64 => "attention_wgmma_mn_split_m64_d72",
        (AttentionImpl::WgmmaMnSplit, 128) if wgmma_m64 => "attention_wgmma_mn_split_m64_d128",
        // Their 128-row blocks are wgmma_mn's.
        (AttentionImpl::WgmmaMn | AttentionImpl::WgmmaMnDeep | AttentionImpl::WgmmaMnSplit, 64) => {
            "attention_wgmma_mn_d64"
        }
        (AttentionImpl::WgmmaMn | AttentionImpl::WgmmaMnDeep | AttentionImpl::WgmmaMnSplit, 72) => {
            "attention_wgmma_mn_d72"
        }
        (
            AttentionImpl::WgmmaMn | AttentionImpl::WgmmaMnDeep | AttentionImpl::WgmmaMnSplit,
            128,
        ) => "attention_wgmma_mn_d128",
        (AttentionImpl::Tma, 64) => "attention_tma_d64",
        (AttentionImpl::Tma, 72) => "attention_tma_d72",
        (AttentionImpl::Tma, 128) => "attention_tma_d128",
        (AttentionImpl::TmaPingPong, 64) => "attention_tma_pp_d64",
        (AttentionImpl::TmaPingPong, 72) => "attention_tma_pp_d72",
        (AttentionImpl::TmaPingPong, 128) => "attention_tma_pp_d128",
        (_, d) => bail!(
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
    let grid = if imp.is_tma() {
        // Persistent: (batch, head, query block) units over at most one CTA an SM; the kernel
        // counts units and rows in int, and steps a CTA's unit by the grid (`u += gridDim.x`),
        // so the last unit plus the grid must fit too.
        let units = tokens.div_ceil(block_m) as u64 * p.heads as u64 * p.batch as u64;
        let ctas = sm_count.map_or(units, |s| units.min(s.max(1) as u64));
        ensure!(
            units + ctas <= i32::MAX as u64 && p.batch as u64 * p.tokens as u64 <= i32::MAX as u64,
            "attention: {} x {} tokens is too many for the TMA kernel's 32-bit unit and row counts",
            p.batch,
            p.tokens
        );
        (ctas as u32, 1, 1)
    } else {
        (tokens.div_ceil(block_m), p.heads as u32, p.batch as u32)
    };
    Ok(AttentionLaunch {
        kernel,
        grid,
        block: (threads, 1, 1),
        shared_mem_bytes: match imp {
            AttentionImpl::Wgmma => wgmma_smem_bytes(p.head_dim as u32, false, 2),
            // K/V stages: two, but four (deep) or six (split: three pairs) in the small-grid
            // blocks of those two.
            AttentionImpl::WgmmaMn | AttentionImpl::WgmmaMnDeep | AttentionImpl::WgmmaMnSplit => {
                let stages = match imp {
                    AttentionImpl::WgmmaMnDeep if wgmma_m64 => 4,
                    AttentionImpl::WgmmaMnSplit if wgmma_m64 => 6,
                    _ => 2,
                };
                wgmma_smem_bytes(p.head_dim as u32, true, stages)
            }
            AttentionImpl::Tma | AttentionImpl::TmaPingPong => tma_smem_bytes(p.head_dim as u32),
            _ => smem_bytes(block_m, p.head_dim as u32),
        },
    })
}

/// Multiply-adds x 2 of one attention call (QK^T and PV), for TFLOP/s figures.
pub fn attention_flops(batch: usize, heads: usize, tokens: usize, head_dim: usize) -> f64 {
    4.0 * batch as f64 * heads as f64 * tokens as f64 * tokens as f64 * head_dim as f64
}

/// Launches flash attention with the default implementation for the device
/// ([`AttentionImpl::Auto`]: wgmma_mn on a Hopper, else v1) on `gpu`'s stream: reads `p.qkv`,
/// writes every element of `p.out`. `out` must not overlap `qkv` (blocks read the K/V rows of
/// other blocks' queries). Allocates nothing, so it can be captured in a CUDA graph.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn attention(gpu: &impl KernelLauncher, p: &AttentionParams) -> Result<()> {
    unsafe { attention_with(gpu, p, AttentionImpl::Auto) }
}

/// [`attention`] with an explicit implementation (the backend runs
/// [`super::CudaOptions::attention`]; tests and benchmarks run each).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn attention_with(
    gpu: &impl KernelLauncher,
    p: &AttentionParams,
    imp: AttentionImpl,
) -> Result<()> {
    unsafe { attention_sized_for(gpu, p, imp, gpu.multiprocessors()) }
}

/// [`attention_with`], choosing block sizes as for a device of `sm_count` SMs (tests run every
/// block size of a family on small shapes this way).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn attention_sized_for(
    gpu: &impl KernelLauncher,
    p: &AttentionParams,
    imp: AttentionImpl,
    sm_count: usize,
) -> Result<()> {
    let imp = imp.resolve(gpu.compute_capability().0);
    if imp.is_wgmma() {
        ensure_hopper(
            gpu,
            "attention: the wgmma implementation",
            "; use FORA_ATTENTION=v1",
        )?;
    }
    let plan = attention_plan_on(p, imp, sm_count)?;
    gpu.allow_dynamic_shared_memory(plan.kernel, plan.shared_mem_bytes)
        .context("attention")?;
    let launched = if imp.is_tma() {
        let tma = AttentionTmaParams {
            qkv_map: gpu.tma_descriptor_2d(&qkv_tensor(p))?,
            attn: *p,
        };
        // SAFETY: the kernel takes one AttentionTmaParams by value; its map describes the
        // caller's qkv buffer [batch * tokens, 3 * heads * head_dim] (validated by the plan and
        // the encoder), out the caller's output buffer.
        unsafe {
            gpu.launch_kernel(
                plan.kernel,
                plan.grid,
                plan.block,
                plan.shared_mem_bytes,
                &tma,
            )
        }
    } else {
        // SAFETY: the kernel takes one AttentionParams by value (the ABI of params.h); the
        // pointers are the caller's device buffers of the documented shapes (validated by the
        // plan).
        unsafe { gpu.launch_kernel(plan.kernel, plan.grid, plan.block, plan.shared_mem_bytes, p) }
    };
    launched.with_context(|| {
        format!(
            "attention: launching {} (batch {}, heads {}, tokens {}) failed",
            plan.kernel, p.batch, p.heads, p.tokens
        )
    })?;
    Ok(())
}

/// The TMA kernel's view of `p.qkv`: a bf16 matrix [batch * tokens, 3 * heads * head_dim], boxes of
/// 64 columns (one 128-byte swizzle panel) x 128 rows.
fn qkv_tensor(p: &AttentionParams) -> TmaTensor2d {
    let cols = 3 * p.heads as u64 * p.head_dim as u64;
    TmaTensor2d {
        base: p.qkv,
        rows: p.batch as u64 * p.tokens as u64,
        cols,
        row_stride: cols,
        box_rows: ATTENTION_TMA_BLOCK,
        box_cols: 64,
    }
}
