//! Launcher of `kernels/fora.cu`: the FORA reuse step. One launch applies every block's cached
//! attention and MLP outputs to the f32 residual stream with the current step's gates:
//! `for l in 0..L { x += gate_msa_l * A_l; x += gate_mlp_l * M_l }`, in f32, in order.

use super::device::{check_positive, check_ptr, grid_x, Gpu};
use super::params::ForaReuseParams;
use anyhow::{ensure, Result};

const THREADS: u32 = 256;
/// Elements per thread on the kernel's vector path (kVec in fora.cu).
const VEC: i64 = 8;

/// The cache layout the kernel reads: `[layers][2][slab]` bf16, A_l then M_l. Elements of the
/// whole cache for `rows * tokens * dim` activations per slab.
pub fn cache_elements(layers: usize, rows: usize, tokens: usize, dim: usize) -> usize {
    layers * 2 * rows * tokens * dim
}

/// Whether the kernel takes its 8-wide vector path for `p` (DiT shapes always do).
fn vector_path(p: &ForaReuseParams) -> bool {
    p.dim as i64 % VEC == 0
        && p.slab % VEC == 0
        && p.ld_mod % 4 == 0
        && p.layer_cols % 4 == 0
        && p.gate_msa_col % 4 == 0
        && p.gate_mlp_col % 4 == 0
}

/// Validates `p` and returns the grid of [`fora_reuse`].
pub fn fora_reuse_plan(p: &ForaReuseParams) -> Result<(u32, u32, u32)> {
    const K: &str = "fora_reuse";
    check_positive(K, "rows", p.rows.into())?;
    check_positive(K, "tokens", p.tokens.into())?;
    check_positive(K, "dim", p.dim.into())?;
    check_positive(K, "layers", p.layers.into())?;
    let total = p.rows as i64 * p.tokens as i64 * p.dim as i64;
    ensure!(
        p.slab >= total,
        "{K}: cache slab {} is smaller than rows*tokens*dim = {total}",
        p.slab
    );
    ensure!(
        p.layer_cols >= 0 && p.gate_msa_col >= 0 && p.gate_mlp_col >= 0,
        "{K}: modulation column offsets must be >= 0"
    );
    let last_layer = (p.layers as i64 - 1) * p.layer_cols as i64;
    let widest = p.gate_msa_col.max(p.gate_mlp_col) as i64 + p.dim as i64;
    ensure!(
        last_layer + widest <= p.ld_mod as i64,
        "{K}: layer {} gates (column {} + {}) exceed the modulation row length ld_mod {}",
        p.layers - 1,
        last_layer,
        widest,
        p.ld_mod
    );
    let vec = vector_path(p);
    let align = if vec { 16 } else { 4 };
    check_ptr(K, "x", p.x, align)?;
    check_ptr(K, "cache", p.cache, if vec { 16 } else { 2 })?;
    check_ptr(K, "modulation", p.modulation, align)?;
    let per_thread = if vec { VEC } else { 1 };
    Ok((grid_x(K, total, THREADS as i64 * per_thread)?, 1, 1))
}

/// Applies the cached block outputs of all `layers` to `x` with the current gates.
pub fn fora_reuse(gpu: &Gpu, p: &ForaReuseParams) -> Result<()> {
    let grid = fora_reuse_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch("fora_reuse", grid, (THREADS, 1, 1), 0, p) }
}
