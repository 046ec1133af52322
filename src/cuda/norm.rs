//! Launchers of `kernels/norm.cu`: LayerNorm (no affine, eps, f32 statistics) + adaLN modulate,
//! the f32 residual stream -> the bf16 input of the next GEMM; and the same preceded by the
//! residual epilogue of the GEMM before it (bias, FORA cache store, gate, residual add) in one
//! pass. One warp per token row.

use super::device::{check_positive, check_ptr, grid_x, KernelLauncher};
use super::params::{LayerNormModulateParams, ResidualLayerNormParams};
use anyhow::{ensure, Result};

/// Token rows per block (kWarps in norm.cu).
const WARPS: u32 = 4;

/// Validates `p` and returns the grid of [`layernorm_modulate`].
pub fn layernorm_modulate_plan(p: &LayerNormModulateParams) -> Result<(u32, u32, u32)> {
    const K: &str = "layernorm_modulate";
    check_positive(K, "rows", p.rows.into())?;
    check_positive(K, "tokens", p.tokens.into())?;
    check_positive(K, "dim", p.dim.into())?;
    ensure!(
        p.shift_col >= 0 && p.scale_col >= 0,
        "{K}: shift_col {} and scale_col {} must be >= 0",
        p.shift_col,
        p.scale_col
    );
    ensure!(
        p.shift_col as i64 + p.dim as i64 <= p.ld_mod as i64
            && p.scale_col as i64 + p.dim as i64 <= p.ld_mod as i64,
        "{K}: shift/scale columns {}/{} + dim {} exceed the modulation row length ld_mod {}",
        p.shift_col,
        p.scale_col,
        p.dim,
        p.ld_mod
    );
    ensure!(
        p.eps.is_finite() && p.eps > 0.0,
        "{K}: eps must be finite and > 0, got {}",
        p.eps
    );
    // The kernel takes its float4 path exactly when these dims allow it; then the base
    // pointers must be 16-byte (x, mod) and 8-byte (out) aligned.
    let vec = p.dim % 4 == 0 && p.ld_mod % 4 == 0 && p.shift_col % 4 == 0 && p.scale_col % 4 == 0;
    let (a_in, a_out) = if vec { (16, 8) } else { (4, 2) };
    check_ptr(K, "x", p.x, a_in)?;
    check_ptr(K, "mod", p.modulation, a_in)?;
    check_ptr(K, "out", p.out, a_out)?;
    let tokens = p.rows as i64 * p.tokens as i64;
    Ok((grid_x(K, tokens, WARPS as i64)?, 1, 1))
}

/// `out = bf16(LN(x) * (1 + scale) + shift)` per token row.
/// Warps per token row of the LayerNorm kernels: one (`layernorm_modulate`,
/// `residual_layernorm`), or four (the `_w4` variants: four times the warps in flight, every
/// load of a row issued at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowWarps {
    /// One warp a token row (`layernorm_modulate`, `residual_layernorm`).
    One,
    /// Four warps a row, one row a block (the `_w4` kernels).
    Four,
}

/// Four warps a row: on an H200 they were faster at every batch measured (batch 2:
/// residual_layernorm 11.2 -> 4.4 us, layernorm 6.4 -> 2.9 us; 256 rows of 256 tokens: 445 ->
/// 300 us and 183 -> 121 us), since every load of a row is in flight at once. One warp a row
/// remains for rows the register path cannot hold (see [`layernorm_modulate`]) and as the
/// measured baseline.
impl Default for RowWarps {
    fn default() -> RowWarps {
        RowWarps::Four
    }
}

impl RowWarps {
    fn warps(self) -> i64 {
        match self {
            RowWarps::One => 1,
            RowWarps::Four => 4,
        }
    }

    /// The grid of `token_rows` rows: blocks of WARPS warps hold WARPS / warps rows.
    fn grid(self, kernel: &str, token_rows: i64) -> Result<(u32, u32, u32)> {
        Ok((
            grid_x(kernel, token_rows, WARPS as i64 / self.warps())?,
            1,
            1,
        ))
    }
}

/// The register path of the LayerNorm kernels, which the four-warp variants always take:
/// 16-byte aligned rows of at most [`RESIDUAL_LN_MAX_DIM`] elements.
fn layernorm_in_registers(p: &LayerNormModulateParams) -> bool {
    p.dim % 4 == 0
        && p.ld_mod % 4 == 0
        && p.shift_col % 4 == 0
        && p.scale_col % 4 == 0
        && p.dim <= RESIDUAL_LN_MAX_DIM
}

/// LayerNorm (no affine) of each token row of `p.x`, modulated by its image's shift and scale
/// columns of the table, `x * (1 + scale) + shift`, to bf16, with the default [`RowWarps`].
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn layernorm_modulate(
    gpu: &impl KernelLauncher,
    p: &LayerNormModulateParams,
) -> Result<()> {
    let warps = match RowWarps::default() {
        RowWarps::Four if layernorm_in_registers(p) => RowWarps::Four,
        _ => RowWarps::One,
    };
    unsafe { layernorm_modulate_with(gpu, p, warps) }
}

/// [`layernorm_modulate`] with the warps per row chosen by the caller (tests, benchmarks); four
/// need the register path's rows (see `layernorm_in_registers`).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn layernorm_modulate_with(
    gpu: &impl KernelLauncher,
    p: &LayerNormModulateParams,
    warps: RowWarps,
) -> Result<()> {
    let one_warp_grid = layernorm_modulate_plan(p)?;
    let (name, grid) = match warps {
        RowWarps::One => ("layernorm_modulate", one_warp_grid),
        RowWarps::Four => {
            ensure!(
                layernorm_in_registers(p),
                "layernorm_modulate_w4: needs dim % 4 == 0, dim <= {RESIDUAL_LN_MAX_DIM} and \
                 16-byte aligned columns (dim {}, ld_mod {}, shift {}, scale {})",
                p.dim,
                p.ld_mod,
                p.shift_col,
                p.scale_col
            );
            let rows = p.rows as i64 * p.tokens as i64;
            (
                "layernorm_modulate_w4",
                warps.grid("layernorm_modulate_w4", rows)?,
            )
        }
    };
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel(name, grid, (WARPS * 32, 1, 1), 0, p) }
}

/// Widest row [`residual_layernorm`] takes (128 * kMaxChunks in norm.cu): every DiT.
pub const RESIDUAL_LN_MAX_DIM: i32 = 1536;

/// Largest prefetch range [`residual_layernorm`] takes (a CTA's share of one is one bulk
/// prefetch, whose size the instruction takes in 32 bits: 4 GiB less 16 bytes, the largest
/// multiple of 16 that fits).
pub const MAX_PREFETCH_BYTES: i64 = (1 << 32) - 16;

/// Most split-K slices [`residual_layernorm`] sums (`acc_splits`).
pub const MAX_ACC_SPLITS: i32 = 16;

/// Whether [`residual_layernorm`] takes rows of `dim` elements.
pub fn residual_layernorm_supports(dim: usize) -> bool {
    dim.is_multiple_of(4) && dim <= RESIDUAL_LN_MAX_DIM as usize
}

/// Validates `p` and returns the grid of [`residual_layernorm`].
pub fn residual_layernorm_plan(p: &ResidualLayerNormParams) -> Result<(u32, u32, u32)> {
    const K: &str = "residual_layernorm";
    check_positive(K, "rows", p.rows.into())?;
    check_positive(K, "tokens", p.tokens.into())?;
    check_positive(K, "dim", p.dim.into())?;
    ensure!(
        residual_layernorm_supports(p.dim as usize),
        "{K}: dim must be a multiple of 4 and <= {RESIDUAL_LN_MAX_DIM}, got {}",
        p.dim
    );
    ensure!(
        p.ld_acc >= p.dim && p.ld_acc % 4 == 0,
        "{K}: ld_acc {} must be >= dim {} and a multiple of 4",
        p.ld_acc,
        p.dim
    );
    for (field, col) in [
        ("gate_col", p.gate_col),
        ("shift_col", p.shift_col),
        ("scale_col", p.scale_col),
    ] {
        ensure!(
            col >= 0 && col % 4 == 0 && col as i64 + p.dim as i64 <= p.ld_mod as i64,
            "{K}: {field} {col} must be a multiple of 4 with {field} + dim {} <= ld_mod {}",
            p.dim,
            p.ld_mod
        );
    }
    ensure!(
        p.ld_mod % 4 == 0,
        "{K}: ld_mod {} must be a multiple of 4",
        p.ld_mod
    );
    ensure!(
        p.eps.is_finite() && p.eps > 0.0,
        "{K}: eps must be finite and > 0, got {}",
        p.eps
    );
    for (field, ptr) in [("x", p.x), ("modulation", p.modulation)] {
        check_ptr(K, field, ptr, 16)?;
    }
    match p.acc_bf16 {
        0 => {
            check_ptr(K, "acc", p.acc, 16)?;
            check_ptr(K, "bias", p.bias, 16)?;
            if p.cache != 0 {
                check_ptr(K, "cache", p.cache, 8)?;
            }
        }
        1 => {
            // bf16 v, 4 elements (8 bytes) a load.
            check_ptr(K, "acc", p.acc, 8)?;
            ensure!(
                p.bias == 0 && p.cache == 0,
                "{K}: with acc_bf16 the GEMM added the bias and v is the cache; bias and cache \
                 must be 0"
            );
        }
        other => anyhow::bail!("{K}: acc_bf16 must be 0 or 1, got {other}"),
    }
    // Split-K slices of the f32 product: disjoint, each 16-byte aligned like the first.
    ensure!(
        (0..=MAX_ACC_SPLITS).contains(&p.acc_splits),
        "{K}: acc_splits must be 0..={MAX_ACC_SPLITS} (0 or 1: one product), got {}",
        p.acc_splits
    );
    if p.acc_splits > 1 {
        ensure!(
            p.acc_bf16 == 0,
            "{K}: acc_splits {} needs the f32 product (acc_bf16 0)",
            p.acc_splits
        );
        let slice = p.rows as i64 * p.tokens as i64 * p.ld_acc as i64;
        ensure!(
            p.acc_split_stride >= slice && p.acc_split_stride % 4 == 0,
            "{K}: acc_split_stride {} must be >= rows * tokens * ld_acc = {slice} (disjoint \
             slices) and a multiple of 4",
            p.acc_split_stride
        );
    }
    check_ptr(K, "out", p.out, 8)?;
    for (field, ptr, bytes) in [
        ("prefetch_a", p.prefetch_a, p.prefetch_a_bytes),
        ("prefetch_b", p.prefetch_b, p.prefetch_b_bytes),
    ] {
        if bytes == 0 && ptr == 0 {
            continue;
        }
        ensure!(
            bytes > 0 && bytes % 16 == 0 && bytes <= MAX_PREFETCH_BYTES,
            "{K}: {field} must be 0 bytes at a null pointer, or a positive multiple of 16 bytes \
             up to {MAX_PREFETCH_BYTES}; got {bytes} bytes at {ptr:#x}"
        );
        check_ptr(K, field, ptr, 16)?;
    }
    let tokens = p.rows as i64 * p.tokens as i64;
    Ok((grid_x(K, tokens, WARPS as i64)?, 1, 1))
}

/// Per token row: `v = acc + bias; cache = bf16(v); x += gate * v;`
/// `out = bf16(LN(x) * (1 + scale) + shift)`; with `acc_bf16`, v is read as bf16 from `acc`.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn residual_layernorm(
    gpu: &impl KernelLauncher,
    p: &ResidualLayerNormParams,
) -> Result<()> {
    unsafe { residual_layernorm_with(gpu, p, RowWarps::default()) }
}

/// [`residual_layernorm`] with the warps per row chosen by the caller (tests, benchmarks).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn residual_layernorm_with(
    gpu: &impl KernelLauncher,
    p: &ResidualLayerNormParams,
    warps: RowWarps,
) -> Result<()> {
    residual_layernorm_plan(p)?;
    let rows = p.rows as i64 * p.tokens as i64;
    let name = match warps {
        RowWarps::One => "residual_layernorm",
        RowWarps::Four => "residual_layernorm_w4",
    };
    let grid = warps.grid(name, rows)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel(name, grid, (WARPS * 32, 1, 1), 0, p) }
}
