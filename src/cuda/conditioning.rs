//! Launchers of `kernels/conditioning.cu`: the sinusoidal timestep embedding (the t-MLP's
//! input), the t-MLP's inner SiLU, and SiLU(t_emb + y_emb) (the input of every adaLN Linear).
//! The timestep values are the ORIGINAL timesteps (0..999) as f32 (exact).

use super::device::{check_positive, check_ptr, grid_x, KernelLauncher};
use super::params::{LabelSiluParams, SiluParams, TimestepEmbedParams};
use anyhow::{ensure, Result};

const THREADS: u32 = 256;

/// Validates `p` and returns (grid, block) of [`timestep_embedding`].
pub fn timestep_embedding_plan(p: &TimestepEmbedParams) -> Result<((u32, u32, u32), u32)> {
    const K: &str = "timestep_embedding";
    check_positive(K, "rows", p.rows.into())?;
    check_positive(K, "half", p.half.into())?;
    ensure!(
        p.ldo >= 2 * p.half,
        "{K}: ldo {} is smaller than the embedding width 2*half = {}",
        p.ldo,
        2 * p.half
    );
    check_ptr(K, "t", p.t, 4)?;
    check_ptr(K, "out", p.out, 2)?;
    let threads = (p.half as u32).div_ceil(32).min(THREADS / 32) * 32;
    Ok(((p.rows as u32, 1, 1), threads))
}

/// `out[r] = cat[cos(t_r f), sin(t_r f)]` in bf16, `f_j = exp(-ln(10000) j / half)`.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn timestep_embedding(gpu: &impl KernelLauncher, p: &TimestepEmbedParams) -> Result<()> {
    let (grid, threads) = timestep_embedding_plan(p)?;
    // SAFETY: validated above; the caller owns buffers of the described sizes.
    unsafe { gpu.launch_kernel("timestep_embedding", grid, (threads, 1, 1), 0, p) }
}

/// Validates `p` and returns the grid of [`silu_f32_bf16`].
pub fn silu_plan(p: &SiluParams) -> Result<(u32, u32, u32)> {
    const K: &str = "silu_f32_bf16";
    check_positive(K, "rows", p.rows.into())?;
    check_positive(K, "cols", p.cols.into())?;
    ensure!(
        p.ld_in >= p.cols,
        "{K}: ld_in {} < cols {}",
        p.ld_in,
        p.cols
    );
    ensure!(p.ldo >= p.cols, "{K}: ldo {} < cols {}", p.ldo, p.cols);
    check_ptr(K, "input", p.input, 4)?;
    check_ptr(K, "out", p.out, 2)?;
    // Grid-stride loop: enough blocks to fill any GPU, never more than the elements need.
    let total = p.rows as i64 * p.cols as i64;
    Ok((grid_x(K, total, THREADS as i64)?.min(1 << 16), 1, 1))
}

/// `out = bf16(silu(input))` over a `[rows, cols]` matrix.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn silu_f32_bf16(gpu: &impl KernelLauncher, p: &SiluParams) -> Result<()> {
    let grid = silu_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel("silu_f32_bf16", grid, (THREADS, 1, 1), 0, p) }
}

/// Validates `p` and returns the grid of [`label_silu`].
pub fn label_silu_plan(p: &LabelSiluParams) -> Result<(u32, u32, u32)> {
    const K: &str = "label_silu";
    check_positive(K, "rows", p.rows.into())?;
    check_positive(K, "dim", p.dim.into())?;
    check_positive(K, "num_labels", p.num_labels.into())?;
    ensure!(p.ld_t >= p.dim, "{K}: ld_t {} < dim {}", p.ld_t, p.dim);
    ensure!(p.ldo >= p.dim, "{K}: ldo {} < dim {}", p.ldo, p.dim);
    check_ptr(K, "t_emb", p.t_emb, 4)?;
    check_ptr(K, "labels", p.labels, 4)?;
    check_ptr(K, "table", p.table, 4)?;
    check_ptr(K, "out", p.out, 2)?;
    let chunks = (p.dim as u32).div_ceil(THREADS).min(65535);
    Ok((p.rows as u32, chunks, 1))
}

/// `out[r] = bf16(silu(t_emb[r] + table[labels[r]]))`. Labels must be validated by the caller
/// (`< num_labels`); the kernel clamps out-of-range ones instead of reading out of bounds.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn label_silu(gpu: &impl KernelLauncher, p: &LabelSiluParams) -> Result<()> {
    let grid = label_silu_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel("label_silu", grid, (THREADS, 1, 1), 0, p) }
}
