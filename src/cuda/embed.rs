//! Launcher of `kernels/embed.cu`: patch embedding + bias + position embedding into the f32
//! residual stream `[rows * T, D]`, model row r reading image r % images (the CFG rows [x; x]
//! share their image without a copy).

use super::device::{check_dims, check_patch_grid, check_ptr, grid_x, Gpu};
use super::params::PatchEmbedParams;
use anyhow::{ensure, Result};

const THREADS: u32 = 128;
/// Largest C*p*p the kernel's shared patch buffer holds (kMaxPatch in embed.cu).
pub const MAX_PATCH_ELEMENTS: i32 = 1024;

/// Validates `p` and returns the grid of [`patch_embed`] (one block per output token row).
pub fn patch_embed_plan(p: &PatchEmbedParams) -> Result<(u32, u32, u32)> {
    const K: &str = "patch_embed";
    check_dims(
        K,
        &[
            ("images", p.images),
            ("rows", p.rows),
            ("channels", p.channels),
            ("height", p.height),
            ("width", p.width),
            ("patch", p.patch),
            ("dim", p.dim),
        ],
    )?;
    check_patch_grid(K, p.height, p.width, p.patch)?;
    let k = p.channels as i64 * p.patch as i64 * p.patch as i64;
    ensure!(
        k <= MAX_PATCH_ELEMENTS as i64,
        "{K}: C*p*p = {k} exceeds the kernel's {MAX_PATCH_ELEMENTS}"
    );
    for (f, ptr) in [
        ("latents", p.latents),
        ("weight", p.weight),
        ("bias", p.bias),
        ("pos", p.pos),
        ("out", p.out),
    ] {
        check_ptr(K, f, ptr, 4)?;
    }
    let tokens = (p.height / p.patch) as i64 * (p.width / p.patch) as i64;
    Ok((grid_x(K, p.rows as i64 * tokens, 1)?, 1, 1))
}

/// `out[r*T + t] = conv(latents[r % images])[t] + bias + pos[t]`.
pub fn patch_embed(gpu: &Gpu, p: &PatchEmbedParams) -> Result<()> {
    let grid = patch_embed_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch("patch_embed", grid, (THREADS, 1, 1), 0, p) }
}
