//! Launcher of `kernels/embed.cu`: patch embedding + bias + position embedding into the f32
//! residual stream `[rows * T, D]`, model row r reading image r % images (the CFG rows [x; x]
//! share their image without a copy). The conv weight comes transposed, `[C*p*p, D]`
//! ([`transpose_patch_weight`]), so that the kernel's weight loads are coalesced.

use super::device::{check_latent_grid, check_positive, check_ptr, grid_x, KernelLauncher};
use super::params::PatchEmbedParams;
use anyhow::{ensure, Result};

const THREADS: u32 = 128;
/// Token rows per block (kTokens in embed.cu).
const TOKENS_PER_BLOCK: i64 = 8;
/// Largest C*p*p the kernel takes: its shared patch buffer is TOKENS_PER_BLOCK * C*p*p floats
/// (32 KiB at the limit).
pub const MAX_PATCH_ELEMENTS: i32 = 1024;

/// The conv weight `[dim, C, p, p]` (flattened `[dim, k]`) as the kernels read it: `[k, dim]`.
pub fn transpose_patch_weight(weight: &[f32], dim: usize) -> Vec<f32> {
    let k = weight.len() / dim.max(1);
    let mut t = vec![0f32; weight.len()];
    for d in 0..dim {
        for i in 0..k {
            t[i * dim + d] = weight[d * k + i];
        }
    }
    t
}

/// Validates `p` and returns the grid of [`patch_embed`] and its dynamic shared memory bytes.
pub fn patch_embed_plan(p: &PatchEmbedParams) -> Result<((u32, u32, u32), u32)> {
    const K: &str = "patch_embed";
    let (tokens, k) = check_latent_grid(
        K,
        [p.images, p.rows, p.channels, p.height, p.width, p.patch],
    )?;
    check_positive(K, "dim", p.dim.into())?;
    ensure!(
        k <= MAX_PATCH_ELEMENTS as i64,
        "{K}: C*p*p = {k} exceeds the kernel's {MAX_PATCH_ELEMENTS}"
    );
    for (f, ptr) in [
        ("latents", p.latents),
        ("weight_t", p.weight_t),
        ("bias", p.bias),
        ("pos", p.pos),
        ("out", p.out),
    ] {
        check_ptr(K, f, ptr, 4)?;
    }
    let grid = grid_x(K, p.rows as i64 * tokens, TOKENS_PER_BLOCK)?;
    // One channel a thread: blockIdx.y covers dim in chunks of THREADS.
    let chunks = (p.dim as u64).div_ceil(THREADS as u64);
    ensure!(
        chunks <= 65535,
        "{K}: dim {} needs {chunks} channel blocks, over the grid's 65535",
        p.dim
    );
    Ok(((grid, chunks as u32, 1), (TOKENS_PER_BLOCK * k * 4) as u32))
}

/// `out[r*T + t] = conv(latents[r % images])[t] + bias + pos[t]`.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn patch_embed(gpu: &impl KernelLauncher, p: &PatchEmbedParams) -> Result<()> {
    let (grid, smem) = patch_embed_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel("patch_embed", grid, (THREADS, 1, 1), smem, p) }
}

#[cfg(test)]
mod tests {
    use super::transpose_patch_weight;

    #[test]
    fn transposed_patch_weight_is_k_major() {
        // dim 3, k 2: w[d][k] = 10 d + k.
        let w = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0];
        assert_eq!(
            transpose_patch_weight(&w, 3),
            vec![0.0, 10.0, 20.0, 1.0, 11.0, 21.0]
        );
    }
}
