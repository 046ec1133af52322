//! Launchers of `kernels/sampler.cu`: the whole per-step sampler update in one kernel
//! (unpatchify by index, CFG combine, DDPM or DDIM, device-side Philox noise or a noise buffer),
//! the plain unpatchify of `forward` / `forward_with_cfg`, and x_T from Philox stream 0.
//!
//! The update is `crate::diffusion::apply_update` on the device: [`set_update`] casts the
//! step's f64 coefficients to f32 exactly as it does, and the kernel repeats its f32
//! operations in order without FMA contraction. The noise is `crate::rng::normal(seed, stream,
//! flat index)` (Philox4x32-10 + Box-Muller), the same numbers as the CPU's to within an ulp or
//! two of log/cos/sin (see kernels/philox.cuh).

use super::device::{
    check_dims, check_latent_grid, check_patch_grid, check_positive, check_ptr, grid_x,
    KernelLauncher,
};
use super::params::{
    NormalFillParams, SamplerStepParams, UnpatchifyParams, FORA_SAMPLER_DDIM, FORA_SAMPLER_DDPM,
};
use crate::backend::{Guidance, GuidanceMode, StepUpdate};
use anyhow::{ensure, Result};

const THREADS: u32 = 256;
/// Threads of a `sampler_step` block (kStepThreads in sampler.cu): small, so that one image +
/// CFG (2048 threads) spreads over 32 SMs.
const STEP_THREADS: u32 = 64;

/// Model-output channels `[0, g)` that classifier-free guidance combines: the official mode
/// guides `model_out[:, :3]` (whatever those channels are when out_channels < 3), the all-eps
/// mode the C eps channels. 0 without guidance.
pub fn guided_channels(guidance: Option<Guidance>, channels: usize, out_channels: usize) -> i32 {
    match guidance {
        None => 0,
        Some(g) => match g.mode {
            GuidanceMode::Official3 => 3.min(out_channels) as i32,
            GuidanceMode::AllEps => channels as i32,
        },
    }
}

/// Writes the update kind, the noise flag and the coefficients of `update` into `p`, cast to
/// f32 as `diffusion::apply_update` casts them (DDIM's square roots taken in f32 likewise).
pub fn set_update(p: &mut SamplerStepParams, update: &StepUpdate) {
    match *update {
        StepUpdate::Ddpm {
            sqrt_recip_abar,
            sqrt_recipm1_abar,
            post_coef1,
            post_coef2,
            max_log,
            min_log,
            add_noise,
        } => {
            p.kind = FORA_SAMPLER_DDPM as i32;
            p.add_noise = add_noise as i32;
            p.sqrt_recip_abar = sqrt_recip_abar as f32;
            p.sqrt_recipm1_abar = sqrt_recipm1_abar as f32;
            p.post_coef1 = post_coef1 as f32;
            p.post_coef2 = post_coef2 as f32;
            p.max_log = max_log as f32;
            p.min_log = min_log as f32;
        }
        StepUpdate::Ddim {
            sqrt_recip_abar,
            sqrt_recipm1_abar,
            abar_prev,
            sigma,
            add_noise,
        } => {
            p.kind = FORA_SAMPLER_DDIM as i32;
            p.add_noise = add_noise as i32;
            p.sqrt_recip_abar = sqrt_recip_abar as f32;
            p.sqrt_recipm1_abar = sqrt_recipm1_abar as f32;
            let (abp, sigma) = (abar_prev as f32, sigma as f32);
            p.sqrt_abar_prev = abp.sqrt();
            p.dir_coef = (1.0 - abp - sigma * sigma).sqrt();
            p.sigma = sigma;
        }
    }
}

/// Validates `p` and returns the grid of [`sampler_step`].
pub fn sampler_step_plan(p: &SamplerStepParams) -> Result<(u32, u32, u32)> {
    const K: &str = "sampler_step";
    check_update(K, p)?;
    check_ptr(K, "model_out", p.model_out, 4)?;
    let total = p.images as i64 * p.channels as i64 * p.height as i64 * p.width as i64;
    Ok((grid_x(K, total, STEP_THREADS as i64 * 4)?, 1, 1))
}

/// The update's part of `p`, shared by both update kernels: geometry, guidance, coefficients,
/// the latents and the noise buffer.
fn check_update(kernel: &str, p: &SamplerStepParams) -> Result<()> {
    check_latent_grid(
        kernel,
        [p.images, p.rows, p.channels, p.height, p.width, p.patch],
    )?;
    ensure!(
        p.rows == p.images || p.rows as i64 == 2 * p.images as i64,
        "{kernel}: rows {} must be images {} (no guidance) or 2*images (guidance)",
        p.rows,
        p.images
    );
    let expect_out = if p.learn_sigma != 0 {
        2 * p.channels
    } else {
        p.channels
    };
    ensure!(
        p.out_channels == expect_out,
        "{kernel}: out_channels {} but channels {} with learn_sigma={} means {expect_out}",
        p.out_channels,
        p.channels,
        p.learn_sigma != 0
    );
    ensure!(
        (0..=p.out_channels).contains(&p.guided_channels),
        "{kernel}: guided_channels {} is outside 0..={}",
        p.guided_channels,
        p.out_channels
    );
    ensure!(
        p.guided_channels == 0 || p.rows != p.images,
        "{kernel}: guided_channels {} needs the CFG rows (rows = 2*images)",
        p.guided_channels
    );
    ensure!(p.cfg_scale.is_finite(), "{kernel}: cfg_scale is not finite");
    ensure!(
        p.kind == FORA_SAMPLER_DDPM as i32 || p.kind == FORA_SAMPLER_DDIM as i32,
        "{kernel}: kind {} is neither DDPM (0) nor DDIM (1)",
        p.kind
    );
    let coefs = [
        p.sqrt_recip_abar,
        p.sqrt_recipm1_abar,
        p.post_coef1,
        p.post_coef2,
        p.max_log,
        p.min_log,
        p.sqrt_abar_prev,
        p.dir_coef,
        p.sigma,
    ];
    ensure!(
        coefs.iter().all(|c| c.is_finite()),
        "{kernel}: a step coefficient is not finite: {coefs:?}"
    );
    if p.kind == FORA_SAMPLER_DDIM as i32 {
        ensure!(
            p.sqrt_recipm1_abar != 0.0,
            "{kernel}: DDIM divides by sqrt_recipm1_abar, which is 0"
        );
    }
    check_ptr(kernel, "x", p.x, 4)?;
    if p.noise != 0 {
        check_ptr(kernel, "noise", p.noise, 4)?;
    }
    Ok(())
}

/// One sampler update of the latents `x` in place (see the module docs).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn sampler_step(gpu: &impl KernelLauncher, p: &SamplerStepParams) -> Result<()> {
    let grid = sampler_step_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel("sampler_step", grid, (STEP_THREADS, 1, 1), 0, p) }
}

/// Threads of a `final_sampler_step` block (kFinalWarps warps in sampler.cu).
const FINAL_THREADS: u32 = 256;
/// Tokens of one image a `final_sampler_step` block computes (kFinalTokens in sampler.cu).
const FINAL_TOKENS: i64 = 8;
/// The k values of one load in `final_sampler_step` (kFinalChunk): the model width's multiple.
const FINAL_CHUNK: i32 = 32;
/// The widest final Linear `final_sampler_step` computes (p*p*out_channels: 8 n-tiles of 8).
const FINAL_MAX_COLS: i32 = 64;

/// Whether [`final_sampler_step`] computes the final Linear of a model of width `dim` with
/// `cols` = p*p*out_channels outputs a token (every DiT/2: 1152 x 32).
pub fn final_sampler_supported(dim: usize, cols: usize) -> bool {
    dim > 0
        && dim.is_multiple_of(FINAL_CHUNK as usize)
        && cols > 0
        && cols.is_multiple_of(8)
        && cols <= FINAL_MAX_COLS as usize
}

/// The most images whose steps use [`final_sampler_step`] (with [`final_sampler_supported`]):
/// each of its blocks reads the whole final weight (74 KB for DiT-XL/2) for 8 tokens, so at
/// many images its L2 traffic (~3.5 MB an image) passes the final GEMM's, which reads the
/// weight once per large tile. Up to here the launch's latency is what counts (one image +
/// CFG: 32 blocks). A guess from the kernels' traffic, to be set from `fora bench`'s
/// `final_sampler_step` rows against the final GEMM's.
pub const FINAL_SAMPLER_MAX_IMAGES: usize = 8;

/// Whether a step of `images` images is better served by [`final_sampler_step`] than by the
/// final GEMM and [`sampler_step`] ([`FINAL_SAMPLER_MAX_IMAGES`]).
pub fn final_sampler_pays(images: usize) -> bool {
    images <= FINAL_SAMPLER_MAX_IMAGES
}

/// Validates `p` and returns the grid of [`final_sampler_step`].
pub fn final_sampler_step_plan(p: &SamplerStepParams) -> Result<(u32, u32, u32)> {
    const K: &str = "final_sampler_step";
    check_update(K, p)?;
    let cols = p.patch as i64 * p.patch as i64 * p.out_channels as i64;
    check_positive(K, "dim", p.dim.into())?;
    ensure!(
        final_sampler_supported(p.dim as usize, cols as usize),
        "{K}: the final Linear must be {FINAL_CHUNK}k wide (dim {}) with a multiple of 8 up to          {FINAL_MAX_COLS} outputs a token (p*p*out_channels = {cols})",
        p.dim
    );
    check_ptr(K, "xn", p.xn, 16)?;
    check_ptr(K, "final_w", p.final_w, 16)?;
    check_ptr(K, "final_b", p.final_b, 4)?;
    ensure!(
        p.images <= 65535,
        "{K}: {} images is more than a grid's y dimension holds (65535)",
        p.images
    );
    let tokens = (p.height / p.patch) as i64 * (p.width / p.patch) as i64;
    Ok((grid_x(K, tokens, FINAL_TOKENS)?, p.images as u32, 1))
}

/// One sampler update of the latents `x` in place with the model's final Linear applied in the
/// same kernel: the model output is `final_b + xn @ final_w^T`, computed from `p.xn` (see
/// kernels/params.h); `p.model_out` is not read.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn final_sampler_step(gpu: &impl KernelLauncher, p: &SamplerStepParams) -> Result<()> {
    let grid = final_sampler_step_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel("final_sampler_step", grid, (FINAL_THREADS, 1, 1), 0, p) }
}

/// The update kernel `p` is for: [`final_sampler_step`] when it carries the final layer's
/// input (`xn`), else [`sampler_step`].
pub fn update_kernel(p: &SamplerStepParams) -> &'static str {
    if p.xn != 0 {
        "final_sampler_step"
    } else {
        "sampler_step"
    }
}

/// Validates `p` for its update kernel ([`update_kernel`]).
pub fn update_plan(p: &SamplerStepParams) -> Result<(u32, u32, u32)> {
    if p.xn != 0 {
        final_sampler_step_plan(p)
    } else {
        sampler_step_plan(p)
    }
}

/// One sampler update by the kernel `p` is for ([`update_kernel`]).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn sampler_update(gpu: &impl KernelLauncher, p: &SamplerStepParams) -> Result<()> {
    if p.xn != 0 {
        unsafe { final_sampler_step(gpu, p) }
    } else {
        unsafe { sampler_step(gpu, p) }
    }
}

/// Validates `p` and returns the grid of [`unpatchify`].
pub fn unpatchify_plan(p: &UnpatchifyParams) -> Result<(u32, u32, u32)> {
    const K: &str = "unpatchify";
    check_dims(
        K,
        &[
            ("rows", p.rows),
            ("out_channels", p.out_channels),
            ("height", p.height),
            ("width", p.width),
            ("patch", p.patch),
        ],
    )?;
    check_patch_grid(K, p.height, p.width, p.patch)?;
    ensure!(
        (0..=p.out_channels).contains(&p.guided_channels),
        "{K}: guided_channels {} is outside 0..={}",
        p.guided_channels,
        p.out_channels
    );
    ensure!(
        p.guided_channels == 0 || p.rows % 2 == 0,
        "{K}: forward_with_cfg needs an even number of rows, got {}",
        p.rows
    );
    ensure!(p.cfg_scale.is_finite(), "{K}: cfg_scale is not finite");
    check_ptr(K, "model_out", p.model_out, 4)?;
    check_ptr(K, "out", p.out, 4)?;
    let total = p.rows as i64 * p.out_channels as i64 * p.height as i64 * p.width as i64;
    Ok((grid_x(K, total, THREADS as i64)?, 1, 1))
}

/// The final Linear's token-layout output -> images `[rows, out_channels, H, W]`, guided as
/// `forward_with_cfg` when `guided_channels > 0`.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn unpatchify(gpu: &impl KernelLauncher, p: &UnpatchifyParams) -> Result<()> {
    let grid = unpatchify_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel("unpatchify", grid, (THREADS, 1, 1), 0, p) }
}

/// Validates `p` and returns the grid of [`normal_fill`].
pub fn normal_fill_plan(p: &NormalFillParams) -> Result<(u32, u32, u32)> {
    const K: &str = "normal_fill";
    check_positive(K, "n", p.n)?;
    check_ptr(K, "out", p.out, 4)?;
    Ok((grid_x(K, p.n, THREADS as i64 * 4)?, 1, 1))
}

/// `out[i] = crate::rng::normal(seed, stream, i)` for `i < n` (x_T: stream 0).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn normal_fill(gpu: &impl KernelLauncher, p: &NormalFillParams) -> Result<()> {
    let grid = normal_fill_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel("normal_fill", grid, (THREADS, 1, 1), 0, p) }
}
