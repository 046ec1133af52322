//! Kernel test bodies shared by `tests/gpu_small_kernels.rs` (on a GPU) and
//! `tests/kernel_emulation.rs` (on the CPU emulator): the conditioning kernels, the patch
//! embedding, LayerNorm + modulate, the residual epilogue + LayerNorm, the FORA reuse kernel,
//! the fused reuse forward, the sampler update, unpatchify and the Philox noise, each run through
//! its launcher on fresh random inputs with outputs poisoned first, and compared with its CPU
//! twin (src/cpu/ops.rs, crate::diffusion::apply_update, crate::rng, or a plain loop here) at
//! DiT-XL/2, DiT-S/2, the embedded model's and odd shapes. `check_*` runs every case of a
//! kernel on a [`TestDevice`].
#![allow(dead_code)] // each test crate uses its own subset

use anyhow::{ensure, Result};
use fora::backend::{Guidance, GuidanceMode, StepUpdate};
use fora::cpu::ops;
use fora::cuda::bandwidth::{bandwidth_copy, bandwidth_read, bandwidth_read_words};
use fora::cuda::conditioning::{label_silu, silu_f32_bf16, timestep_embedding};
use fora::cuda::embed::{patch_embed, transpose_patch_weight};
use fora::cuda::fora::{
    fora_cache_sum, fora_reuse, fora_reuse_final_with, fora_sum_final_with,
    fused_final_linear_supported, ReuseTokens, CACHE_SUM_MAX,
};
use fora::cuda::gemm::{launch_epilogue, Epilogue};
use fora::cuda::gemm_ln::{GemmLayerNorm, GemmLnTile};
use fora::cuda::norm::{layernorm_modulate_with, residual_layernorm_with, RowWarps};
use fora::cuda::params::{
    BandwidthParams, ForaCacheSumParams, ForaReuseFinalParams, ForaReuseParams, GemmEpilogueParams,
    LabelSiluParams, LayerNormModulateParams, NormalFillParams, PatchEmbedParams,
    ResidualLayerNormParams, SamplerStepParams, SiluParams, TimestepEmbedParams, UnpatchifyParams,
};
use fora::cuda::sampler::{
    final_sampler_step, guided_channels, normal_fill, sampler_step, set_update, unpatchify,
};
use fora::cuda::testing::{
    biased_product, check_close, round_bf16, DeviceAddr, TestDevice, TestRng,
};
use fora::diffusion::{apply_update, Diffusion, SamplerKind};

/// Every element within `atol + rtol * |ref|` (and finite). Catches single unwritten or wrong
/// elements that a rel-L2 over millions of elements would hide.
pub fn check_elementwise(
    what: &str,
    out: &[f32],
    reference: &[f32],
    atol: f32,
    rtol: f32,
) -> Result<()> {
    ensure!(
        out.len() == reference.len(),
        "{what}: length {} vs {}",
        out.len(),
        reference.len()
    );
    let mut worst = (0usize, 0f32);
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        let excess = (o - r).abs() - (atol + rtol * r.abs());
        ensure!(
            o.is_finite() && excess <= 0.0,
            "{what}: element {i} is {o}, reference {r} (bound {atol} + {rtol}*|ref|)"
        );
        if (o - r).abs() > worst.1 {
            worst = (i, (o - r).abs());
        }
    }
    println!("{what}: max |diff| {:.3e} at {}", worst.1, worst.0);
    Ok(())
}

// ---- patch embedding ------------------------------------------------------------------------

pub struct EmbedCase {
    pub images: usize,
    pub rows: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: usize,
    pub dim: usize,
}

pub fn run_patch_embed<D: TestDevice>(gpu: &D, c: &EmbedCase, seed: u64) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let (gh, gw) = (c.height / c.patch, c.width / c.patch);
    let tokens = gh * gw;
    let k = c.channels * c.patch * c.patch;
    let latents = rng.normal_vec(c.images * c.channels * c.height * c.width, 1.0);
    let weight = rng.normal_vec(c.dim * k, 1.0 / (k as f32).sqrt());
    let bias = rng.normal_vec(c.dim, 0.1);
    let pos = rng.uniform_vec(tokens * c.dim, -1.0, 1.0);
    let (lat_d, w_d, b_d, pos_d) = (
        gpu.upload_f32(&latents)?,
        gpu.upload_f32(&transpose_patch_weight(&weight, c.dim))?,
        gpu.upload_f32(&bias)?,
        gpu.upload_f32(&pos)?,
    );
    let out = gpu.poisoned_f32(c.rows * tokens * c.dim)?;
    let p = PatchEmbedParams {
        latents: lat_d.addr(),
        weight_t: w_d.addr(),
        bias: b_d.addr(),
        pos: pos_d.addr(),
        out: out.addr(),
        images: c.images as i32,
        rows: c.rows as i32,
        channels: c.channels as i32,
        height: c.height as i32,
        width: c.width as i32,
        patch: c.patch as i32,
        dim: c.dim as i32,
    };
    unsafe { patch_embed(gpu, &p) }?;
    let got = gpu.download_f32(&out)?;
    // Plain loop in f64: conv (weight [D, C, p, p]) + bias, then + pos_embed. Alongside, the
    // rigorous bound on the f32 kernel's rounding error (Higham: an n-term f32 sum is within
    // ~n * 2^-24 * sum|terms| of exact), so the element-wise check cannot fail spuriously yet
    // catches any wrong index (an O(1) error).
    let mut want = vec![0f32; c.rows * tokens * c.dim];
    let mut bound = vec![0f32; c.rows * tokens * c.dim];
    for r in 0..c.rows {
        let img = &latents[(r % c.images) * c.channels * c.height * c.width..];
        for gy in 0..gh {
            for gx in 0..gw {
                let t = gy * gw + gx;
                for d in 0..c.dim {
                    let (mut acc, mut mag) = (0f64, 0f64);
                    for ch in 0..c.channels {
                        for i in 0..c.patch {
                            for j in 0..c.patch {
                                let w = weight[((d * c.channels + ch) * c.patch + i) * c.patch + j];
                                let x = img[(ch * c.height + gy * c.patch + i) * c.width
                                    + gx * c.patch
                                    + j];
                                acc += w as f64 * x as f64;
                                mag += (w as f64 * x as f64).abs();
                            }
                        }
                    }
                    let o = (r * tokens + t) * c.dim + d;
                    want[o] = ((acc + bias[d] as f64) as f32) + pos[t * c.dim + d];
                    let total = mag + bias[d].abs() as f64 + pos[t * c.dim + d].abs() as f64;
                    bound[o] = ((k + 3) as f64 * total * 2f64.powi(-23) + 1e-30) as f32;
                }
            }
        }
    }
    let what = format!(
        "patch_embed images={} rows={} C={} {}x{} p={} D={}",
        c.images, c.rows, c.channels, c.height, c.width, c.patch, c.dim
    );
    check_close(&what, &got, &want, 1e-5)?;
    for (i, ((&g, &w), &b)) in got.iter().zip(&want).zip(&bound).enumerate() {
        ensure!(
            (g - w).abs() <= b,
            "{what}: element {i} is {g}, reference {w}, f32 rounding bound {b:e}"
        );
    }
    Ok(())
}

/// Every case of patch_embed.
pub fn check_patch_embed<D: TestDevice>(gpu: &D) -> Result<()> {
    // DiT-XL/2 256 px, CFG rows [x; x] from 2 images.
    let xl = EmbedCase {
        images: 2,
        rows: 4,
        channels: 4,
        height: 32,
        width: 32,
        patch: 2,
        dim: 1152,
    };
    run_patch_embed(gpu, &xl, 31)?;
    // DiT-S/2 512 px, no CFG.
    let s = EmbedCase {
        images: 3,
        rows: 3,
        channels: 4,
        height: 64,
        width: 64,
        patch: 2,
        dim: 384,
    };
    run_patch_embed(gpu, &s, 32)?;
    // Odd: non-square, patch 4, 3 channels, dim not a multiple of the block, rows % images != 0.
    let odd = EmbedCase {
        images: 2,
        rows: 5,
        channels: 3,
        height: 12,
        width: 20,
        patch: 4,
        dim: 100,
    };
    run_patch_embed(gpu, &odd, 33)?;
    // Largest patch the kernel takes (C*p*p = 1024).
    let big = EmbedCase {
        images: 1,
        rows: 2,
        channels: 16,
        height: 16,
        width: 8,
        patch: 8,
        dim: 130,
    };
    run_patch_embed(gpu, &big, 34)?;
    Ok(())
}

// ---- LayerNorm + modulate -------------------------------------------------------------------

pub struct NormCase {
    pub rows: usize,
    pub tokens: usize,
    pub dim: usize,
    pub ld_mod: usize,
    pub shift_col: usize,
    pub scale_col: usize,
}

/// One case with `warps` warps per token row (Four needs the register path's rows).
pub fn run_layernorm<D: TestDevice>(
    gpu: &D,
    c: &NormCase,
    warps: RowWarps,
    seed: u64,
) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let n = c.rows * c.tokens * c.dim;
    // An offset and a per-row spread so the two-pass statistics matter.
    let x: Vec<f32> = (0..n)
        .map(|i| rng.uniform(-2.0, 2.0) * 3.0 + 5.0 + (i % 7) as f32)
        .collect();
    let modulation = rng.uniform_vec(c.rows * c.ld_mod, -1.0, 1.0);
    let x_d = gpu.upload_f32(&x)?;
    let mod_d = gpu.upload_f32(&modulation)?;
    let out = gpu.poisoned_bf16(n)?;
    let p = LayerNormModulateParams {
        x: x_d.addr(),
        modulation: mod_d.addr(),
        out: out.addr(),
        rows: c.rows as i32,
        tokens: c.tokens as i32,
        dim: c.dim as i32,
        ld_mod: c.ld_mod as i32,
        shift_col: c.shift_col as i32,
        scale_col: c.scale_col as i32,
        eps: 1e-6,
    };
    unsafe { layernorm_modulate_with(gpu, &p, warps) }?;
    let got = gpu.download_bf16(&out)?;
    let mut want = vec![0f32; n];
    ops::layernorm_modulate(
        &mut want,
        &x,
        &modulation[c.shift_col..],
        &modulation[c.scale_col..],
        c.ld_mod,
        c.tokens,
        c.dim,
        false,
    );
    let what = format!(
        "layernorm_modulate {warps:?} rows={} T={} D={} ld_mod={} shift={} scale={}",
        c.rows, c.tokens, c.dim, c.ld_mod, c.shift_col, c.scale_col
    );
    check_close(&what, &got, &want, 1e-2)?;
    // One bf16 ulp (2^-8 relative) plus f32-vs-f64 statistics.
    check_elementwise(&what, &got, &want, 1e-4, 2.0f32.powi(-8))
}

/// Every case of layernorm_modulate.
pub fn check_layernorm_modulate<D: TestDevice>(gpu: &D) -> Result<()> {
    // DiT-XL/2: the modulation table of all blocks + final layer, [rows, 28*6D + 2D].
    let d = 1152;
    let ld = 28 * 6 * d + 2 * d;
    // Block 5's attention branch (shift_msa, scale_msa), batch 2 with CFG.
    let xl = NormCase {
        rows: 4,
        tokens: 256,
        dim: d,
        ld_mod: ld,
        shift_col: 5 * 6 * d,
        scale_col: 5 * 6 * d + d,
    };
    for warps in [RowWarps::One, RowWarps::Four] {
        run_layernorm(gpu, &xl, warps, 41)?;
    }
    // The final layer's (shift, scale) at 256 rows.
    let xl_big = NormCase {
        rows: 256,
        tokens: 256,
        dim: d,
        ld_mod: ld,
        shift_col: 28 * 6 * d,
        scale_col: 28 * 6 * d + d,
    };
    // (Many rows: the one-warp variant's case; four warps a row are for few rows.)
    run_layernorm(gpu, &xl_big, RowWarps::One, 42)?;
    // DiT-S/2 512 px, the MLP branch of block 11.
    let d = 384;
    let s = NormCase {
        rows: 8,
        tokens: 1024,
        dim: d,
        ld_mod: 12 * 6 * d + 2 * d,
        shift_col: 11 * 6 * d + 3 * d,
        scale_col: 11 * 6 * d + 4 * d,
    };
    for warps in [RowWarps::One, RowWarps::Four] {
        run_layernorm(gpu, &s, warps, 43)?;
    }
    // The embedded digits model: dim 64, lanes 16..31 hold no columns (register path).
    let tiny = NormCase {
        rows: 2,
        tokens: 256,
        dim: 64,
        ld_mod: 4 * 6 * 64 + 2 * 64,
        shift_col: 6 * 64,
        scale_col: 6 * 64 + 64,
    };
    for warps in [RowWarps::One, RowWarps::Four] {
        run_layernorm(gpu, &tiny, warps, 45)?;
    }
    // dim 2048, beyond the register path's 1536: the looped float4 path.
    let wide = NormCase {
        rows: 3,
        tokens: 19,
        dim: 2048,
        ld_mod: 3 * 2048,
        shift_col: 2048,
        scale_col: 4096,
    };
    run_layernorm(gpu, &wide, RowWarps::One, 46)?;
    // Odd: dim 100, T = 77, unaligned columns (the scalar path).
    let odd = NormCase {
        rows: 3,
        tokens: 77,
        dim: 100,
        ld_mod: 303,
        shift_col: 3,
        scale_col: 201,
    };
    run_layernorm(gpu, &odd, RowWarps::One, 44)?;
    Ok(())
}

// ---- residual epilogue + LayerNorm ----------------------------------------------------------

pub struct ResidualLnCase {
    pub rows: usize,
    pub tokens: usize,
    pub dim: usize,
    /// Row stride of the GEMM product (>= dim).
    pub ld_acc: usize,
    pub with_cache: bool,
    /// The GEMM wrote v = bf16(product + bias) itself (acc_bf16; no bias, no cache).
    pub v_bf16: bool,
    /// The f32 product as this many split-K slices (0 or 1: one), a 4-element gap between
    /// slices.
    pub splits: usize,
}

/// One case with `warps` warps per token row.
pub fn run_residual_layernorm<D: TestDevice>(
    gpu: &D,
    c: &ResidualLnCase,
    warps: RowWarps,
    seed: u64,
) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let m = c.rows * c.tokens;
    let n = m * c.dim;
    let layers = 2;
    let ld_mod = layers * 6 * c.dim + 2 * c.dim;
    // Layer 1's gate_mlp, then the final layer's shift / scale: the columns fc2's fused epilogue
    // of the last block uses.
    let (gate_col, shift_col) = (6 * c.dim + 5 * c.dim, layers * 6 * c.dim);
    let slices = c.splits.max(1);
    let stride = m * c.ld_acc + if slices > 1 { 4 } else { 0 };
    let parts = rng.normal_vec(slices * stride, 2.0);
    // The product: the slices summed in order in f32, as the kernel (and the GEMM epilogue
    // kernel) sums them.
    let acc: Vec<f32> = (0..m * c.ld_acc)
        .map(|i| (1..slices).fold(parts[i], |a, s| a + parts[s * stride + i]))
        .collect();
    let bias = rng.normal_vec(c.dim, 0.5);
    // A residual with an offset so the two-pass statistics matter.
    let x: Vec<f32> = (0..n)
        .map(|i| rng.normal() + 3.0 + (i % 5) as f32)
        .collect();
    let modulation = rng.uniform_vec(c.rows * ld_mod, -1.0, 1.0);
    // v = acc + bias in f32, or (v_bf16) as the GEMM rounded it, in the product's layout.
    let v_of = |i: usize| {
        let y = acc[(i / c.dim) * c.ld_acc + i % c.dim] + bias[i % c.dim];
        if c.v_bf16 {
            round_bf16(&[y])[0]
        } else {
            y
        }
    };
    let acc16: Vec<f32> = (0..m * c.ld_acc)
        .map(|i| {
            let (r, j) = (i / c.ld_acc, i % c.ld_acc);
            if j < c.dim {
                v_of(r * c.dim + j)
            } else {
                acc[i]
            }
        })
        .collect();
    let acc_d = gpu.upload_f32(&parts)?;
    let acc16_d = gpu.upload_bf16(&acc16)?;
    let bias_d = gpu.upload_f32(&bias)?;
    let x_d = gpu.upload_f32(&x)?;
    let mod_d = gpu.upload_f32(&modulation)?;
    let out = gpu.poisoned_bf16(n)?;
    let cache = gpu.poisoned_bf16(n)?;
    let prefetch = c.rows.is_multiple_of(2);
    let p = ResidualLayerNormParams {
        acc: if c.v_bf16 {
            acc16_d.addr()
        } else {
            acc_d.addr()
        },
        bias: if c.v_bf16 { 0 } else { bias_d.addr() },
        cache: if c.with_cache && !c.v_bf16 {
            cache.addr()
        } else {
            0
        },
        x: x_d.addr(),
        modulation: mod_d.addr(),
        out: out.addr(),
        rows: c.rows as i32,
        tokens: c.tokens as i32,
        dim: c.dim as i32,
        ld_acc: c.ld_acc as i32,
        ld_mod: ld_mod as i32,
        gate_col: gate_col as i32,
        shift_col: shift_col as i32,
        scale_col: (shift_col + c.dim) as i32,
        acc_bf16: c.v_bf16 as i32,
        eps: 1e-6,
        acc_splits: c.splits as i32,
        acc_split_stride: if slices > 1 { stride as i64 } else { 0 },
        // Every other case asks L2 to fetch two ranges as it runs (FORA_PREFETCH_WEIGHTS's
        // hint, here the table and the product): no result may change.
        prefetch_a: if prefetch { mod_d.addr() } else { 0 },
        prefetch_a_bytes: if prefetch {
            (modulation.len() * 4) as i64 & !15
        } else {
            0
        },
        prefetch_b: if prefetch { acc_d.addr() } else { 0 },
        prefetch_b_bytes: if prefetch {
            (parts.len() * 4) as i64 & !15
        } else {
            0
        },
    };
    unsafe { residual_layernorm_with(gpu, &p, warps) }?;
    let got_x = gpu.download_f32(&x_d)?;
    let got = gpu.download_bf16(&out)?;
    let got_cache = gpu.download_bf16(&cache)?;

    // CPU: v = acc + bias (f32), the cache holds bf16(v); x += gate * v (ops::gate_residual);
    // then LayerNorm + modulate (ops::layernorm_modulate).
    let v: Vec<f32> = (0..n).map(v_of).collect();
    let (want_x, want) = cpu_residual_layernorm(
        &x,
        &v,
        &modulation,
        ld_mod,
        (gate_col, shift_col),
        (c.tokens, c.dim),
    );
    let what = format!(
        "residual_layernorm {warps:?} rows={} T={} D={} ld_acc={} cache={} v_bf16={} splits={}",
        c.rows, c.tokens, c.dim, c.ld_acc, c.with_cache, c.v_bf16, c.splits
    );
    if c.with_cache && !c.v_bf16 {
        // bf16 of the same f32 sum: equal to the bit.
        check_elementwise(
            &format!("{what} cache"),
            &got_cache,
            &round_bf16(&v),
            0.0,
            0.0,
        )?;
    } else {
        ensure_unwritten_cache(&what, &got_cache)?;
    }
    // x: the GPU may contract x + gate * v into one FMA (one rounding less than the CPU).
    check_elementwise(&format!("{what} x"), &got_x, &want_x, 1e-6, 1e-6)?;
    check_layernorm_out(&what, &got, &want, (1e-4, 2.0f32.powi(-8)))
}

/// The CPU twin of a residual + LayerNorm pass: x + gate * v (ops::gate_residual), then the
/// LayerNorm of that modulated by the shift and scale columns `shift_col`, `shift_col + dim`
/// (ops::layernorm_modulate); the table's rows `ld_mod` apart, one a model row of `tokens`.
fn cpu_residual_layernorm(
    x: &[f32],
    v: &[f32],
    modulation: &[f32],
    ld_mod: usize,
    (gate_col, shift_col): (usize, usize),
    (tokens, dim): (usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let mut new_x = x.to_vec();
    ops::gate_residual(
        &mut new_x,
        v,
        &modulation[gate_col..],
        ld_mod,
        tokens,
        dim,
        false,
    );
    let mut out = vec![0f32; x.len()];
    ops::layernorm_modulate(
        &mut out,
        &new_x,
        &modulation[shift_col..],
        &modulation[shift_col + dim..],
        ld_mod,
        tokens,
        dim,
        false,
    );
    (new_x, out)
}

/// A residual + LayerNorm kernel given no cache pointer left the (NaN-poisoned) cache alone.
fn ensure_unwritten_cache(what: &str, got_cache: &[f32]) -> Result<()> {
    ensure!(
        got_cache.iter().all(|v| v.is_nan()),
        "{what}: wrote the cache although its pointer was 0"
    );
    Ok(())
}

/// A LayerNorm's bf16 output against the CPU's: rel-L2 within 1e-2, and every element within
/// `(atol, rtol)`.
fn check_layernorm_out(
    what: &str,
    got: &[f32],
    want: &[f32],
    (atol, rtol): (f32, f32),
) -> Result<()> {
    check_close(what, got, want, 1e-2)?;
    check_elementwise(what, got, want, atol, rtol)
}

/// Every case of residual_layernorm.
pub fn check_residual_layernorm<D: TestDevice>(gpu: &D) -> Result<()> {
    let case = |rows, tokens, dim, ld_acc, with_cache| ResidualLnCase {
        rows,
        tokens,
        dim,
        ld_acc,
        with_cache,
        v_bf16: false,
        splits: 1,
    };
    let bf16_v = |rows, tokens, dim, ld_acc| ResidualLnCase {
        v_bf16: true,
        ..case(rows, tokens, dim, ld_acc, false)
    };
    let cases = [
        // DiT-XL/2 256 px, CFG batch of 2 images; as the sampler's computing step (cache) and as a
        // plain forward (none).
        (case(4, 256, 1152, 1152, true), 71),
        (case(2, 256, 1152, 1152, false), 72),
        // The embedded model (dim 64: two float4 lanes of 32 idle past the row end).
        (case(2, 256, 64, 64, true), 73),
        // Odd: dim 100, T = 77, a padded product, rows not a multiple of the block's 4.
        (case(3, 77, 100, 104, true), 74),
        // The widest row (1536) and DiT-S (384).
        (case(1, 9, 1536, 1536, true), 75),
        (case(5, 64, 384, 384, true), 76),
        // bf16 v from the GEMM (FORA_BF16_RESIDUAL): DiT-XL/2 and odd, padded rows.
        (bf16_v(2, 256, 1152, 1152), 77),
        (bf16_v(3, 77, 100, 104), 78),
        // Split-K slices of the product (FORA_LT_SPLITK): one image + CFG at DiT-XL/2 in 4,
        // and odd padded rows in 3.
        (
            ResidualLnCase {
                splits: 4,
                ..case(2, 256, 1152, 1152, true)
            },
            79,
        ),
        (
            ResidualLnCase {
                splits: 3,
                ..case(3, 77, 100, 104, false)
            },
            80,
        ),
    ];
    for (c, seed) in &cases {
        for warps in [RowWarps::One, RowWarps::Four] {
            run_residual_layernorm(gpu, c, warps, *seed)?;
        }
    }
    Ok(())
}

// ---- the fused GEMM + residual + LayerNorm (Hopper) -----------------------------------------

/// One launch of `gemm_tma_ln_*`: `rows` model rows of `tokens` tokens, product depth `k`.
pub struct GemmLnCase {
    pub rows: usize,
    pub tokens: usize,
    pub k: usize,
    pub with_cache: bool,
    /// The residual adds bf16(v) (FORA_BF16_RESIDUAL).
    pub round_v: bool,
}

/// One case against the CPU twin: the product of the bf16 operands in f64 plus the bias (f32
/// v), the cache bf16(v), x += gate * v (ops::gate_residual), then ops::layernorm_modulate:
/// residual_layernorm's contract with the product computed in the kernel.
pub fn run_gemm_layernorm<D: TestDevice>(
    gpu: &D,
    c: &GemmLnCase,
    tile: GemmLnTile,
    multicast: bool,
    seed: u64,
) -> Result<()> {
    let dim = 1152;
    let (m, k) = (c.rows * c.tokens, c.k);
    let n = m * dim;
    let mut rng = TestRng::new(seed);
    let a = round_bf16(&rng.normal_vec(m * k, 1.0));
    let w = round_bf16(&rng.normal_vec(dim * k, 1.0 / (k as f32).sqrt()));
    let bias = rng.normal_vec(dim, 0.5);
    // An offset residual, so that the statistics' centring matters.
    let x: Vec<f32> = (0..n)
        .map(|i| rng.normal() + 3.0 + (i % 7) as f32)
        .collect();
    let layers = 2;
    let ld_mod = layers * 6 * dim + 2 * dim;
    // Layer 1's gate_mlp, then the final layer's shift / scale (fc2 of the last block).
    let (gate_col, shift_col) = (6 * dim + 5 * dim, layers * 6 * dim);
    let modulation = rng.uniform_vec(c.rows * ld_mod, -1.0, 1.0);
    let (a_d, w_d, bias_d) = (
        gpu.upload_bf16(&a)?,
        gpu.upload_bf16(&w)?,
        gpu.upload_f32(&bias)?,
    );
    let (x_d, mod_d) = (gpu.upload_f32(&x)?, gpu.upload_f32(&modulation)?);
    let out = gpu.poisoned_bf16(n)?;
    let cache = gpu.poisoned_bf16(n)?;
    let launch = GemmLayerNorm {
        a: a_d.addr(),
        w: w_d.addr(),
        lda: k,
        ldw: k,
        bias: bias_d.addr(),
        cache: if c.with_cache { cache.addr() } else { 0 },
        x: x_d.addr(),
        modulation: mod_d.addr(),
        out: out.addr(),
        m,
        k,
        dim,
        tokens: c.tokens,
        ld_mod,
        gate_col,
        shift_col,
        scale_col: shift_col + dim,
        round_v: c.round_v,
        eps: 1e-6,
        // Only the shared memory asked for differs: every other case.
        one_per_sm: seed.is_multiple_of(2),
        multicast,
        tile,
        // Every other case asks L2 to fetch two ranges as it runs (FORA_PREFETCH_WEIGHTS's
        // hint, here W and the table): no result may change.
        prefetch: if multicast {
            [
                (w_d.addr(), (w.len() * 2) as i64 & !15),
                (mod_d.addr(), (modulation.len() * 4) as i64 & !15),
            ]
        } else {
            [(0, 0); 2]
        },
    };
    unsafe { launch.launch(gpu) }?;
    let (got_x, got, got_cache) = (
        gpu.download_f32(&x_d)?,
        gpu.download_bf16(&out)?,
        gpu.download_bf16(&cache)?,
    );

    let v: Vec<f32> = biased_product(&a, &w, &bias, (m, dim, k))
        .into_iter()
        .map(|x| x as f32)
        .collect();
    // The residual's v: f32, or (round_v) the kernel's own bf16 v as the cache holds it: its f32
    // sums may round to the bf16 neighbour of the f64 product's rounding (the cache check
    // bounds that to an ulp).
    ensure!(
        c.with_cache || !c.round_v,
        "a round_v case needs the cache to see the kernel's v"
    );
    let v_added = if c.round_v {
        got_cache.clone()
    } else {
        v.clone()
    };
    let (want_x, want) = cpu_residual_layernorm(
        &x,
        &v_added,
        &modulation,
        ld_mod,
        (gate_col, shift_col),
        (c.tokens, dim),
    );
    let what = format!(
        "{} rows={} T={} M={m} K={k} cache={} round_v={}",
        launch.kernel(),
        c.rows,
        c.tokens,
        c.with_cache,
        c.round_v
    );
    if c.with_cache {
        let want_cache = round_bf16(&v);
        check_close(&format!("{what} cache"), &got_cache, &want_cache, 1e-2)?;
        // Element by element: an ulp of bf16 (the two sums may round to neighbours) plus the
        // rigorous bound on the f32 sums' error, (k + 1) * 2^-23 * sum|a_i w_i| (the tensor
        // cores may truncate each partial sum instead of rounding it), with sum|a_i w_i| bounded
        // by |a_row| |w_col| (Cauchy-Schwarz): ~5e-3 here, where a wrong index or k-tile errs by
        // O(1). (A fixed 1e-6 assumed round-to-nearest sums and would fail near v = 0.)
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let a_norms: Vec<f64> = a.chunks(k).map(norm).collect();
        let w_norms: Vec<f64> = w.chunks(k).map(norm).collect();
        let ulp = 2.0f64.powi(-7);
        for (i, (&g, &r)) in got_cache.iter().zip(&want_cache).enumerate() {
            let (row, col) = (i / dim, i % dim);
            let sums = (k + 1) as f64
                * 2.0f64.powi(-23)
                * (a_norms[row] * w_norms[col] + bias[col].abs() as f64);
            let bound = sums + ulp * (r as f64).abs();
            ensure!(
                g.is_finite() && ((g - r).abs() as f64) <= bound,
                "{what} cache: element {i} is {g}, reference {r} (bound {bound:.3e})"
            );
        }
    } else {
        ensure_unwritten_cache(&what, &got_cache)?;
    }
    // v differs from the f64 product by the tensor cores' f32 sums (~1e-6 of |v|).
    check_elementwise(&format!("{what} x"), &got_x, &want_x, 1e-4, 1e-5)?;
    check_close(&format!("{what} x"), &got_x, &want_x, 1e-5)?;
    check_layernorm_out(&what, &got, &want, (1e-3, 2.0f32.powi(-7)))
}

/// Every case of the fused GEMM + residual + LayerNorm: one image + CFG of DiT-XL/2 as proj (K
/// 1152, caching, the bf16 v of the default path) and fc2 (K 4608, f32 v, on a quarter of the
/// rows to keep the emulator quick), and odd shapes: M = 150 (a partial last cluster of 64 or
/// 128 rows), 10 tokens a model row (a warp's two rows in different model rows), K = 200 (a
/// partial k-tile) and K = 8 (one); each with both tiles, with and without the A tile's
/// multicast.
pub fn check_gemm_layernorm<D: TestDevice>(gpu: &D) -> Result<()> {
    let case = |rows, tokens, k, with_cache, round_v| GemmLnCase {
        rows,
        tokens,
        k,
        with_cache,
        round_v,
    };
    for (c, seed) in [
        (case(2, 256, 1152, true, true), 81),
        (case(2, 64, 4608, false, false), 82),
        (case(15, 10, 200, true, false), 83),
        (case(3, 7, 8, true, true), 84),
    ] {
        for tile in GemmLnTile::ALL {
            for multicast in [false, true] {
                run_gemm_layernorm(gpu, &c, tile, multicast, seed)?;
            }
        }
    }
    Ok(())
}

// ---- FORA reuse -----------------------------------------------------------------------------

pub struct ForaCase {
    pub rows: usize,
    pub tokens: usize,
    pub dim: usize,
    pub layers: usize,
    /// Extra elements after each slab (a cache allocated for more rows than used).
    pub slab_pad: usize,
}

/// The CPU reuse path: every layer's cached outputs (`cache`, `[layers][2][slab]`, the first
/// `x.len()` elements of each slab) added to `x` with the gates of `modulation` (`[rows,
/// ld_mod]`, layer l's at `l * 6 * dim`, gate_msa at + 2 dim, gate_mlp at + 5 dim), in layer
/// order: `x += gate_msa * A_l; x += gate_mlp * M_l`, each product and sum rounded on its own.
#[allow(clippy::too_many_arguments)] // the cache layout and the table layout
pub fn apply_cached_updates(
    x: &mut [f32],
    cache: &[f32],
    slab: usize,
    modulation: &[f32],
    ld_mod: usize,
    layers: usize,
    tokens: usize,
    dim: usize,
) {
    let n = x.len();
    for l in 0..layers {
        for (which, col) in [(0, 2 * dim), (1, 5 * dim)] {
            let start = (2 * l + which) * slab;
            ops::gate_residual(
                x,
                &cache[start..start + n],
                &modulation[l * 6 * dim + col..],
                ld_mod,
                tokens,
                dim,
                false,
            );
        }
    }
}

pub fn run_fora_reuse<D: TestDevice>(gpu: &D, c: &ForaCase, seed: u64) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let n = c.rows * c.tokens * c.dim;
    let slab = n + c.slab_pad;
    let ld_mod = c.layers * 6 * c.dim + 2 * c.dim;
    let x = rng.normal_vec(n, 1.0);
    let cache = round_bf16(&rng.uniform_vec(c.layers * 2 * slab, -2.0, 2.0));
    let modulation = rng.uniform_vec(c.rows * ld_mod, -1.0, 1.0);
    let x_d = gpu.upload_f32(&x)?;
    let cache_d = gpu.upload_bf16(&cache)?;
    let mod_d = gpu.upload_f32(&modulation)?;
    let p = ForaReuseParams {
        x: x_d.addr(),
        cache: cache_d.addr(),
        modulation: mod_d.addr(),
        slab: slab as i64,
        rows: c.rows as i32,
        tokens: c.tokens as i32,
        dim: c.dim as i32,
        layers: c.layers as i32,
        ld_mod: ld_mod as i32,
        layer_cols: (6 * c.dim) as i32,
        gate_msa_col: (2 * c.dim) as i32,
        gate_mlp_col: (5 * c.dim) as i32,
    };
    unsafe { fora_reuse(gpu, &p) }?;
    let got = gpu.download_f32(&x_d)?;
    let mut want = x.clone();
    apply_cached_updates(
        &mut want,
        &cache,
        slab,
        &modulation,
        ld_mod,
        c.layers,
        c.tokens,
        c.dim,
    );
    let what = format!(
        "fora_reuse rows={} T={} D={} L={} pad={}",
        c.rows, c.tokens, c.dim, c.layers, c.slab_pad
    );
    // Same f32 products and sums in the same order (no FMA): equal to the last bit.
    check_close(&what, &got, &want, 1e-6)?;
    check_elementwise(&what, &got, &want, 0.0, 0.0)
}

/// Every case of fora_reuse.
pub fn check_fora_reuse<D: TestDevice>(gpu: &D) -> Result<()> {
    run_fora_reuse(
        gpu,
        &ForaCase {
            rows: 4,
            tokens: 256,
            dim: 1152,
            layers: 28,
            slab_pad: 0,
        },
        51,
    )?;
    run_fora_reuse(
        gpu,
        &ForaCase {
            rows: 64,
            tokens: 256,
            dim: 1152,
            layers: 2,
            slab_pad: 0,
        },
        52,
    )?;
    run_fora_reuse(
        gpu,
        &ForaCase {
            rows: 8,
            tokens: 256,
            dim: 384,
            layers: 12,
            slab_pad: 8 * 384,
        },
        53,
    )?;
    // Odd: dim 100 (the scalar path), T = 77, padded slabs.
    run_fora_reuse(
        gpu,
        &ForaCase {
            rows: 3,
            tokens: 77,
            dim: 100,
            layers: 3,
            slab_pad: 5,
        },
        54,
    )?;
    Ok(())
}

// ---- the cache sums of a run of reuse steps --------------------------------------------------

pub struct CacheSumCase {
    pub rows: usize,
    pub tokens: usize,
    pub dim: usize,
    pub layers: usize,
    /// Sums (upcoming reuse steps) of the launch.
    pub count: usize,
    /// Extra elements after each cache slab, each step's table and each sum.
    pub pad: usize,
}

/// fora_cache_sum against the CPU: each sum is the reuse path's residual updates applied to
/// zeros (ops::gate_residual per layer in order, no FMA), equal to the last bit; the padding
/// after each sum stays unwritten. Also checks the identity the kernel rests on: embedding +
/// sum is the sequential reuse path's x up to f32 rounding.
pub fn run_fora_cache_sum<D: TestDevice>(gpu: &D, c: &CacheSumCase, seed: u64) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let n = c.rows * c.tokens * c.dim;
    let slab = n + c.pad;
    let ld_mod = c.layers * 6 * c.dim + 2 * c.dim;
    let table_stride = c.rows * ld_mod + c.pad;
    let sum_stride = n + c.pad;
    let cache = round_bf16(&rng.uniform_vec(c.layers * 2 * slab, -2.0, 2.0));
    let tables = rng.uniform_vec(c.count * table_stride, -1.0, 1.0);
    let cache_d = gpu.upload_bf16(&cache)?;
    let tables_d = gpu.upload_f32(&tables)?;
    let sums_d = gpu.poisoned_f32(c.count * sum_stride)?;
    let p = ForaCacheSumParams {
        cache: cache_d.addr(),
        tables: tables_d.addr(),
        sums: sums_d.addr(),
        slab: slab as i64,
        table_stride: table_stride as i64,
        sum_stride: sum_stride as i64,
        rows: c.rows as i32,
        tokens: c.tokens as i32,
        dim: c.dim as i32,
        layers: c.layers as i32,
        ld_mod: ld_mod as i32,
        layer_cols: (6 * c.dim) as i32,
        gate_msa_col: (2 * c.dim) as i32,
        gate_mlp_col: (5 * c.dim) as i32,
        count: c.count as i32,
    };
    unsafe { fora_cache_sum(gpu, &p) }?;
    let got = gpu.download_f32(&sums_d)?;
    let what = format!(
        "fora_cache_sum rows={} T={} D={} L={} count={} pad={}",
        c.rows, c.tokens, c.dim, c.layers, c.count, c.pad
    );
    let updates = |x: &mut [f32], table: &[f32]| {
        apply_cached_updates(x, &cache, slab, table, ld_mod, c.layers, c.tokens, c.dim);
    };
    for r in 0..c.count {
        let table = &tables[r * table_stride..][..c.rows * ld_mod];
        let mut want = vec![0f32; n];
        updates(&mut want, table);
        let sum = &got[r * sum_stride..][..n];
        check_elementwise(&format!("{what} sum {r}"), sum, &want, 0.0, 0.0)?;
        ensure!(
            got[r * sum_stride + n..(r + 1) * sum_stride]
                .iter()
                .all(|v| v.is_nan()),
            "{what}: wrote past sum {r}"
        );
        // The identity: (embedding + sum) against the sequential updates of the embedding.
        let embedding = rng.normal_vec(n, 1.0);
        let mut sequential = embedding.clone();
        updates(&mut sequential, table);
        let summed: Vec<f32> = embedding.iter().zip(sum).map(|(e, s)| e + s).collect();
        check_close(
            &format!("{what} sum {r}: embedding + sum"),
            &summed,
            &sequential,
            1e-6,
        )?;
    }
    Ok(())
}

/// Every case of fora_cache_sum: each count, DiT-XL/2 and odd shapes.
pub fn check_fora_cache_sum<D: TestDevice>(gpu: &D) -> Result<()> {
    let case = |rows, tokens, dim, layers, count, pad| CacheSumCase {
        rows,
        tokens,
        dim,
        layers,
        count,
        pad,
    };
    // DiT-XL/2 (one image + CFG, 28 layers), every count.
    for count in 1..=CACHE_SUM_MAX {
        run_fora_cache_sum(gpu, &case(2, 256, 1152, 28, count, 0), 70 + count as u64)?;
    }
    // The embedded model's sizes; DiT-S/2 with padding; odd: T = 25 (a short last token
    // group), dim 200 (25 chunks: a partial block of channel chunks), 3 layers (an odd last
    // pair), padded.
    run_fora_cache_sum(gpu, &case(2, 16, 64, 4, 2, 0), 75)?;
    run_fora_cache_sum(gpu, &case(3, 256, 384, 12, 3, 8 * 384), 76)?;
    run_fora_cache_sum(gpu, &case(3, 25, 200, 3, 2, 16), 77)?;
    run_fora_cache_sum(gpu, &case(5, 25, 200, 3, 4, 16), 78)?;
    run_fora_cache_sum(gpu, &case(1, 7, 8, 1, 1, 8), 79)?;
    Ok(())
}

// ---- the fused reuse forward ----------------------------------------------------------------

pub struct ReuseFinalCase {
    pub images: usize,
    pub rows: usize,
    pub channels: usize,
    pub size: usize,
    pub patch: usize,
    pub dim: usize,
    pub layers: usize,
    pub slab_pad: usize,
}

/// What a fused reuse forward adds to the embedding: every layer's cached outputs
/// (`fora_reuse_final`, the variant given) or their sum precomputed (`fora_sum_final`, so many
/// tokens a thread).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReuseSource {
    Cache(ReuseTokens),
    Sum(i32),
}

impl ReuseSource {
    fn launch<D: TestDevice>(self, gpu: &D, p: &ForaReuseFinalParams) -> Result<()> {
        match self {
            ReuseSource::Cache(tpt) => unsafe { fora_reuse_final_with(gpu, p, tpt) },
            ReuseSource::Sum(tokens) => unsafe { fora_sum_final_with(gpu, p, tokens) },
        }
    }
}

/// Runs one case with `tpt` tokens per thread against the CPU; returns the bf16 output.
pub fn run_fora_reuse_final<D: TestDevice>(
    gpu: &D,
    c: &ReuseFinalCase,
    tpt: ReuseTokens,
    seed: u64,
) -> Result<Vec<f32>> {
    run_reuse_forward(gpu, c, ReuseSource::Cache(tpt), seed)
}

/// One case of a fused reuse forward against the CPU; returns the bf16 output. With
/// [`ReuseSource::Sum`] the sum is random (f32) and the CPU adds it to the embedding.
pub fn run_reuse_forward<D: TestDevice>(
    gpu: &D,
    c: &ReuseFinalCase,
    source: ReuseSource,
    seed: u64,
) -> Result<Vec<f32>> {
    let mut rng = TestRng::new(seed);
    let g = c.size / c.patch;
    let tokens = g * g;
    let k = c.channels * c.patch * c.patch;
    let n = c.rows * tokens * c.dim;
    let slab = n + c.slab_pad;
    let ld_mod = c.layers * 6 * c.dim + 2 * c.dim;
    let fin = c.layers * 6 * c.dim;
    let latents = rng.normal_vec(c.images * c.channels * c.size * c.size, 1.0);
    let weight = rng.normal_vec(c.dim * k, 1.0 / (k as f32).sqrt());
    let bias = rng.normal_vec(c.dim, 0.1);
    let pos = rng.uniform_vec(tokens * c.dim, -1.0, 1.0);
    let cache = round_bf16(&rng.uniform_vec(c.layers * 2 * slab, -2.0, 2.0));
    let modulation = rng.uniform_vec(c.rows * ld_mod, -1.0, 1.0);
    let sum = rng.normal_vec(n, 2.0);
    let sum_d = gpu.upload_f32(&sum)?;
    let lat_d = gpu.upload_f32(&latents)?;
    let w_d = gpu.upload_f32(&transpose_patch_weight(&weight, c.dim))?;
    let b_d = gpu.upload_f32(&bias)?;
    let pos_d = gpu.upload_f32(&pos)?;
    let cache_d = gpu.upload_bf16(&cache)?;
    let mod_d = gpu.upload_f32(&modulation)?;
    let out = gpu.poisoned_bf16(n)?;
    let mut x_out = gpu.poisoned_f32(n)?;
    let mut p = ForaReuseFinalParams {
        latents: lat_d.addr(),
        embed_weight_t: w_d.addr(),
        embed_bias: b_d.addr(),
        pos: pos_d.addr(),
        cache: match source {
            ReuseSource::Cache(_) => cache_d.addr(),
            ReuseSource::Sum(_) => 0,
        },
        sum: match source {
            ReuseSource::Cache(_) => 0,
            ReuseSource::Sum(_) => sum_d.addr(),
        },
        modulation: mod_d.addr(),
        out: out.addr(),
        x: x_out.addr(),
        final_w: 0,
        final_b: 0,
        final_out: 0,
        slab: slab as i64,
        images: c.images as i32,
        rows: c.rows as i32,
        channels: c.channels as i32,
        height: c.size as i32,
        width: c.size as i32,
        patch: c.patch as i32,
        dim: c.dim as i32,
        layers: c.layers as i32,
        ld_mod: ld_mod as i32,
        layer_cols: (6 * c.dim) as i32,
        gate_msa_col: (2 * c.dim) as i32,
        gate_mlp_col: (5 * c.dim) as i32,
        shift_col: fin as i32,
        scale_col: (fin + c.dim) as i32,
        n_out: 0,
        eps: 1e-6,
    };
    source.launch(gpu, &p)?;
    let got_x = gpu.download_f32(&x_out)?;
    let got = gpu.download_bf16(&out)?;

    // The three-kernel path on the CPU: the patch embedding with patch_embed's f32 operations
    // (fused multiply-adds over k in order, then + bias, + pos), the cached residuals in order
    // (ops::gate_residual, no FMA), then LayerNorm + modulate (ops::layernorm_modulate).
    let mut patches = vec![0f32; c.images * tokens * k];
    ops::patchify(
        &mut patches,
        &latents,
        c.images,
        c.channels,
        c.size,
        c.patch,
    );
    let mut x = vec![0f32; n];
    for r in 0..c.rows {
        for t in 0..tokens {
            let patch = &patches[((r % c.images) * tokens + t) * k..][..k];
            for d in 0..c.dim {
                let acc = (0..k).fold(0f32, |acc, i| weight[d * k + i].mul_add(patch[i], acc));
                x[(r * tokens + t) * c.dim + d] = (acc + bias[d]) + pos[t * c.dim + d];
            }
        }
    }
    match source {
        ReuseSource::Cache(_) => apply_cached_updates(
            &mut x,
            &cache,
            slab,
            &modulation,
            ld_mod,
            c.layers,
            tokens,
            c.dim,
        ),
        ReuseSource::Sum(_) => x.iter_mut().zip(&sum).for_each(|(x, s)| *x += s),
    }
    let mut want = vec![0f32; n];
    ops::layernorm_modulate(
        &mut want,
        &x,
        &modulation[fin..],
        &modulation[fin + c.dim..],
        ld_mod,
        tokens,
        c.dim,
        false,
    );
    let what = format!(
        "fused reuse forward {source:?} images={} rows={} C={} {}px p={} D={} L={} pad={}",
        c.images, c.rows, c.channels, c.size, c.patch, c.dim, c.layers, c.slab_pad
    );
    // x before the LayerNorm: the same f32 operations in the same order, equal to the last bit.
    check_elementwise(&format!("{what} x"), &got_x, &x, 0.0, 0.0)?;
    check_close(&what, &got, &want, 1e-2)?;
    check_elementwise(&what, &got, &want, 1e-4, 2.0f32.powi(-8))?;

    // Without the optional x output: the same LayerNorm output, and the old x buffer (poisoned
    // again) is left alone.
    let again = gpu.poisoned_bf16(n)?;
    gpu.poison_f32(&mut x_out)?;
    p.out = again.addr();
    p.x = 0;
    source.launch(gpu, &p)?;
    ensure!(
        gpu.download_bf16(&again)? == got,
        "{what}: the output differs when x is not written"
    );
    ensure!(
        gpu.download_f32(&x_out)?.iter().all(|v| v.is_nan()),
        "{what}: x was written although its pointer was 0"
    );

    // The final Linear in the same pass (rows of whole warps only): its input is the bf16
    // LayerNorm output just checked, so the product of `got` with the weight in f64 must match
    // to f32 accumulation error; and it must match the CPU's LayerNorm output to bf16 noise.
    let n_out = if c.dim >= 1024 { 32 } else { 24 };
    if fused_final_linear_supported(c.dim, n_out) {
        let token_rows = c.rows * tokens;
        let w = round_bf16(&rng.normal_vec(n_out * c.dim, 1.0 / (c.dim as f32).sqrt()));
        let b = rng.normal_vec(n_out, 0.1);
        let w_d = gpu.upload_bf16(&w)?;
        let b_d = gpu.upload_f32(&b)?;
        let final_out = gpu.poisoned_f32(token_rows * n_out)?;
        let untouched = gpu.poisoned_bf16(n)?;
        p.out = untouched.addr();
        p.final_w = w_d.addr();
        p.final_b = b_d.addr();
        p.final_out = final_out.addr();
        p.n_out = n_out as i32;
        source.launch(gpu, &p)?;
        let got_final = gpu.download_f32(&final_out)?;
        let linear = |y: &[f32]| -> Vec<f32> {
            (0..token_rows * n_out)
                .map(|i| {
                    let (r, o) = (i / n_out, i % n_out);
                    let dot: f64 = (0..c.dim)
                        .map(|d| y[r * c.dim + d] as f64 * w[o * c.dim + d] as f64)
                        .sum();
                    (dot + b[o] as f64) as f32
                })
                .collect()
        };
        let what = format!("{what} + final Linear (n_out {n_out})");
        check_elementwise(
            &format!("{what} vs its own LN"),
            &got_final,
            &linear(&got),
            1e-4,
            1e-4,
        )?;
        check_close(
            &format!("{what} vs CPU"),
            &got_final,
            &linear(&round_bf16(&want)),
            1e-2,
        )?;
        ensure!(
            gpu.download_bf16(&untouched)?.iter().all(|v| v.is_nan()),
            "{what}: wrote the LayerNorm output although the final Linear was fused"
        );
    }
    Ok(got)
}

/// The shapes of the fused reuse forward's cases, each with its seed.
pub fn reuse_final_cases() -> Vec<(ReuseFinalCase, u64)> {
    let case = |images, rows, channels, size, patch, dim, layers, slab_pad| ReuseFinalCase {
        images,
        rows,
        channels,
        size,
        patch,
        dim,
        layers,
        slab_pad,
    };
    let cases = [
        // DiT-XL/2 256 px, CFG rows [x; x]: 160 threads (5 warps) per token row, 144 active.
        (case(2, 4, 4, 32, 2, 1152, 28, 0), 61),
        // The embedded model: 8 threads per token row, 32 rows per block.
        (case(1, 2, 3, 32, 2, 64, 4, 0), 62),
        // DiT-S/2 sizes, no CFG, padded slabs.
        (case(3, 3, 4, 16, 2, 384, 3, 8 * 384), 63),
        // Odd: dim 200 (25 chunks in a 32-thread group), T = 25 (not a multiple of 4: a
        // short last chunk in every row), rows % images != 0, a short last block.
        (case(3, 7, 3, 10, 2, 200, 2, 16), 64),
        // dim 8: one thread per token row; patch 1; T = 36.
        (case(2, 2, 1, 6, 1, 8, 3, 0), 65),
        // The limits: dim 2048 (one 256-thread group), C*p*p = 64; T = 4.
        (case(1, 2, 4, 8, 4, 2048, 2, 0), 66),
    ];
    cases.into()
}

/// Every case of fora_reuse_final, every variant.
pub fn check_fora_reuse_final<D: TestDevice>(gpu: &D) -> Result<()> {
    check_fora_reuse_final_on(gpu, &reuse_final_cases())
}

/// `cases` of fora_reuse_final, every variant.
pub fn check_fora_reuse_final_on<D: TestDevice>(
    gpu: &D,
    cases: &[(ReuseFinalCase, u64)],
) -> Result<()> {
    for (c, seed) in cases {
        let one = run_fora_reuse_final(gpu, c, ReuseTokens::One, *seed)?;
        // Every other variant: the same operations per token, so the same bits.
        for tpt in &ReuseTokens::ALL[1..] {
            let other = run_fora_reuse_final(gpu, c, *tpt, *seed)?;
            ensure!(
                one == other,
                "fora_reuse_final D={} T={}: {tpt:?} differs from One",
                c.dim,
                (c.size / c.patch).pow(2)
            );
        }
    }
    Ok(())
}

/// Every case of fora_sum_final (the fused reuse forward from a cache sum), one and four
/// tokens a thread: the same operations per token, so the same bits.
pub fn check_fora_sum_final<D: TestDevice>(gpu: &D) -> Result<()> {
    check_fora_sum_final_on(gpu, &reuse_final_cases())
}

/// `cases` of fora_sum_final, one and four tokens a thread.
pub fn check_fora_sum_final_on<D: TestDevice>(
    gpu: &D,
    cases: &[(ReuseFinalCase, u64)],
) -> Result<()> {
    for (c, seed) in cases {
        let one = run_reuse_forward(gpu, c, ReuseSource::Sum(1), *seed)?;
        let four = run_reuse_forward(gpu, c, ReuseSource::Sum(4), *seed)?;
        ensure!(
            one == four,
            "fora_sum_final D={}: four tokens a thread differ from one",
            c.dim
        );
    }
    Ok(())
}

/// Columns `cols` of each row of a `[rows, ld]` matrix.
pub fn compact(v: &[f32], rows: usize, cols: usize, ld: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| v[r * ld..r * ld + cols].iter().copied())
        .collect()
}

/// The padding columns `cols..ld` of every row are still NaN (the kernel wrote nothing there).
pub fn check_padding_untouched(
    what: &str,
    v: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<()> {
    for r in 0..rows {
        for c in cols..ld {
            ensure!(
                v[r * ld + c].is_nan(),
                "{what}: wrote padding element ({r}, {c})"
            );
        }
    }
    Ok(())
}

// ---- conditioning ---------------------------------------------------------------------------

pub fn run_timestep_embedding<D: TestDevice>(
    gpu: &D,
    rows: usize,
    ldo: usize,
    seed: u64,
) -> Result<()> {
    let half = fora::weights::FREQ_DIM / 2;
    let mut rng = TestRng::new(seed);
    let mut t: Vec<i64> = (0..rows).map(|_| rng.below(1000) as i64).collect();
    t[0] = 999;
    if rows > 1 {
        t[1] = 0;
    }
    let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    let t_dev = gpu.upload_f32(&tf)?;
    let out = gpu.poisoned_bf16(rows * ldo)?;
    let p = TimestepEmbedParams {
        t: t_dev.addr(),
        out: out.addr(),
        rows: rows as i32,
        half: half as i32,
        ldo: ldo as i32,
    };
    unsafe { timestep_embedding(gpu, &p) }?;
    let got = gpu.download_bf16(&out)?;
    let mut want = vec![0f32; rows * 2 * half];
    ops::timestep_features(&t, &mut want);
    let what = format!("timestep_embedding rows={rows} ldo={ldo}");
    check_padding_untouched(&what, &got, rows, 2 * half, ldo)?;
    let got = compact(&got, rows, 2 * half, ldo);
    check_close(&what, &got, &want, 1e-2)?;
    // |value| <= 1: one bf16 rounding is at most 2^-9; plus up to ~1e-4 where exp's f32
    // rounding of a frequency differs by an ulp (arguments reach 999 rad).
    check_elementwise(&what, &got, &want, 2.0f32.powi(-9) + 5e-4, 0.0)
}

/// Every case of timestep_embedding.
pub fn check_timestep_embedding<D: TestDevice>(gpu: &D) -> Result<()> {
    run_timestep_embedding(gpu, 2, 256, 1)?;
    run_timestep_embedding(gpu, 256, 256, 2)?;
    run_timestep_embedding(gpu, 7, 264, 3)?;
    Ok(())
}

pub fn run_silu<D: TestDevice>(
    gpu: &D,
    rows: usize,
    cols: usize,
    ld_in: usize,
    ldo: usize,
    seed: u64,
) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let input = rng.normal_vec(rows * ld_in, 3.0);
    let in_dev = gpu.upload_f32(&input)?;
    let out = gpu.poisoned_bf16(rows * ldo)?;
    let p = SiluParams {
        input: in_dev.addr(),
        out: out.addr(),
        rows: rows as i32,
        cols: cols as i32,
        ld_in: ld_in as i32,
        ldo: ldo as i32,
    };
    unsafe { silu_f32_bf16(gpu, &p) }?;
    let got = gpu.download_bf16(&out)?;
    let what = format!("silu_f32_bf16 {rows}x{cols} ld_in={ld_in} ldo={ldo}");
    check_padding_untouched(&what, &got, rows, cols, ldo)?;
    let got = compact(&got, rows, cols, ldo);
    let want: Vec<f32> = compact(&input, rows, cols, ld_in)
        .iter()
        .map(|&v| ops::silu(v))
        .collect();
    check_close(&what, &got, &want, 1e-2)?;
    check_elementwise(&what, &got, &want, 1e-6, 2.0f32.powi(-8))
}

/// Every case of silu.
pub fn check_silu<D: TestDevice>(gpu: &D) -> Result<()> {
    run_silu(gpu, 2, 1152, 1152, 1152, 11)?; // XL t-MLP hidden, batch 2
    run_silu(gpu, 256, 384, 384, 384, 12)?; // S, 256 rows
    run_silu(gpu, 5, 77, 80, 96, 13)?; // odd, strided
    Ok(())
}

pub fn run_label_silu<D: TestDevice>(
    gpu: &D,
    rows: usize,
    dim: usize,
    ldo: usize,
    seed: u64,
) -> Result<()> {
    let num_labels = 1001; // 1000 classes + the null class
    let mut rng = TestRng::new(seed);
    let ld_t = dim + 3;
    let t_emb = rng.normal_vec(rows * ld_t, 1.5);
    let table = rng.normal_vec(num_labels * dim, 1.0);
    let mut labels: Vec<i32> = (0..rows).map(|_| rng.below(num_labels) as i32).collect();
    labels[0] = (num_labels - 1) as i32; // the null class
    let t_dev = gpu.upload_f32(&t_emb)?;
    let table_dev = gpu.upload_f32(&table)?;
    let labels_dev = gpu.upload_i32(&labels)?;
    let out = gpu.poisoned_bf16(rows * ldo)?;
    let p = LabelSiluParams {
        t_emb: t_dev.addr(),
        labels: labels_dev.addr(),
        table: table_dev.addr(),
        out: out.addr(),
        rows: rows as i32,
        dim: dim as i32,
        ld_t: ld_t as i32,
        ldo: ldo as i32,
        num_labels: num_labels as i32,
    };
    unsafe { label_silu(gpu, &p) }?;
    let got = gpu.download_bf16(&out)?;
    let what = format!("label_silu rows={rows} dim={dim} ldo={ldo}");
    check_padding_untouched(&what, &got, rows, dim, ldo)?;
    let got = compact(&got, rows, dim, ldo);
    let mut want = Vec::with_capacity(rows * dim);
    for r in 0..rows {
        let y = labels[r] as usize;
        for d in 0..dim {
            want.push(ops::silu(t_emb[r * ld_t + d] + table[y * dim + d]));
        }
    }
    check_close(&what, &got, &want, 1e-2)?;
    check_elementwise(&what, &got, &want, 1e-6, 2.0f32.powi(-8))
}

/// The GEMM epilogues' GELU (`gelu_tanh` in kernels/common.cuh, through `gemm_epilogue_f32`)
/// over x in [-12, 12] and beyond, every output within bf16's rounding of the exact function:
/// x (1 + tanh u) / 2 evaluated in f64 as x / (1 + e^(-2u)) (the same function, without the
/// cancellation of 1 + tanh u for negative x, which a tanh of absolute error ~2^-11 would turn
/// into errors of several percent below x = -3). Tiny outputs (x below about -10) may flush to
/// zero.
pub fn check_gelu_epilogue<D: TestDevice>(gpu: &D) -> Result<()> {
    let (m, n) = (3usize, 1000usize);
    let mut rng = TestRng::new(31);
    let bias: Vec<f32> = rng.normal_vec(n, 0.01);
    let mut acc: Vec<f32> = (0..m * n)
        .map(|i| -12.0 + 24.0 * i as f32 / (m * n - 1) as f32)
        .collect();
    // Past the range: large magnitudes both ways, and zero.
    acc[..6].copy_from_slice(&[-60.0, -25.0, -10.5, 0.0, 25.0, 60.0]);
    let acc_dev = gpu.upload_f32(&acc)?;
    let bias_dev = gpu.upload_f32(&bias)?;
    let out = gpu.poisoned_bf16(m * n)?;
    let p = GemmEpilogueParams {
        acc: acc_dev.addr(),
        bias: bias_dev.addr(),
        out: out.addr(),
        cache: 0,
        gate: 0,
        m: m as i32,
        n: n as i32,
        ld_acc: n as i32,
        ldo: n as i32,
        ldc: 0,
        ldg: 0,
        rows_per_gate: 1,
        epilogue: Epilogue::BiasGeluBf16.raw(),
        splits: 1,
    };
    unsafe { launch_epilogue(gpu, &p, gpu.multiprocessors()) }?;
    let got = gpu.download_bf16(&out)?;
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            // The kernel's f32 sum, then the exact GELU of it.
            let x = f64::from(acc[i] + bias[i % n]);
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            (x / (1.0 + (-2.0 * u).exp())) as f32
        })
        .collect();
    // bf16 rounds to a relative 2^-9; twice that covers the f32 evaluation as well.
    check_elementwise(
        "gelu epilogue over [-12, 12]",
        &got,
        &want,
        1e-30,
        2.0f32.powi(-8),
    )
}

/// Every case of label_silu.
pub fn check_label_silu<D: TestDevice>(gpu: &D) -> Result<()> {
    run_label_silu(gpu, 2, 1152, 1152, 21)?;
    run_label_silu(gpu, 256, 1152, 1152, 22)?;
    run_label_silu(gpu, 8, 384, 384, 23)?;
    run_label_silu(gpu, 3, 100, 104, 24)?;
    Ok(())
}

// ---- sampler update, unpatchify, noise ------------------------------------------------------

pub struct SamplerCase {
    pub images: usize,
    pub channels: usize,
    pub size: usize,
    pub patch: usize,
    pub learn_sigma: bool,
    pub guidance: Option<Guidance>,
    pub respacing: &'static str,
    pub kind: SamplerKind,
    pub i: usize,
    /// Noise from a buffer instead of Philox.
    pub noise_buffer: bool,
}

/// Image layout `[n, c, H, W]` -> the final Linear's token layout `[n*T, p*p*c]` (features
/// ordered (i, j, c)), the inverse of the official unpatchify.
pub fn to_tokens(img: &[f32], n: usize, c: usize, size: usize, p: usize) -> Vec<f32> {
    let g = size / p;
    let mut tok = vec![0f32; img.len()];
    for b in 0..n {
        for gy in 0..g {
            for gx in 0..g {
                for i in 0..p {
                    for j in 0..p {
                        for ch in 0..c {
                            tok[((b * g * g + gy * g + gx) * p * p + i * p + j) * c + ch] =
                                img[((b * c + ch) * size + gy * p + i) * size + gx * p + j];
                        }
                    }
                }
            }
        }
    }
    tok
}

/// Random model output in image layout: eps ~ N(0, 1), the variance value v in [-1, 1].
pub fn random_model_out(
    rng: &mut TestRng,
    rows: usize,
    c: usize,
    out_ch: usize,
    hw: usize,
) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * out_ch * hw);
    for _ in 0..rows {
        for ch in 0..out_ch {
            for _ in 0..hw {
                v.push(if ch < c {
                    rng.normal()
                } else {
                    rng.uniform(-1.0, 1.0)
                });
            }
        }
    }
    v
}

pub fn run_sampler_step<D: TestDevice>(gpu: &D, c: &SamplerCase, seed: u64) -> Result<()> {
    run_update(gpu, c, None, seed)
}

/// The model output's source in [`run_update`]: the width of the final Linear that
/// `final_sampler_step` applies (None: `sampler_step` reads a given model output).
type FinalLinear = Option<usize>;

/// One update case through `sampler_step`, or with `final_linear = Some(dim)` through
/// `final_sampler_step` (the model output computed in the kernel from random bf16 activations
/// and weights of width dim, the CPU's in f64 from the same values).
pub fn run_update<D: TestDevice>(
    gpu: &D,
    c: &SamplerCase,
    final_linear: FinalLinear,
    seed: u64,
) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let out_ch = if c.learn_sigma {
        2 * c.channels
    } else {
        c.channels
    };
    let rows = if c.guidance.is_some() {
        2 * c.images
    } else {
        c.images
    };
    let hw = c.size * c.size;
    let image = c.channels * hw;
    let cols = c.patch * c.patch * out_ch;
    let row_tokens = hw / (c.patch * c.patch);
    // The final Linear's inputs (final_sampler_step): bf16 activations ~ N(0, 1) and weights
    // ~ N(0, 1/dim), so that every model value (eps and v alike) is ~ N(0, 1).
    let linear = final_linear.map(|dim| {
        let xn = round_bf16(&rng.normal_vec(rows * row_tokens * dim, 1.0));
        let w = round_bf16(&rng.normal_vec(cols * dim, 1.0 / (dim as f32).sqrt()));
        let b = rng.normal_vec(cols, 0.1);
        (dim, xn, w, b)
    });
    let (model_img, tokens) = match &linear {
        None => {
            let model_img = random_model_out(&mut rng, rows, c.channels, out_ch, hw);
            let tokens = to_tokens(&model_img, rows, out_ch, c.size, c.patch);
            // The CPU's own unpatchify must give back the image layout (checks to_tokens).
            let mut back = vec![0f32; model_img.len()];
            ops::unpatchify(&mut back, &tokens, rows, out_ch, c.size, c.patch);
            ensure!(
                back == model_img,
                "test bug: to_tokens is not the inverse of ops::unpatchify"
            );
            (model_img, tokens)
        }
        Some((dim, xn, w, b)) => {
            // The final Linear in f64, rounded once.
            let mut tokens = vec![0f32; rows * row_tokens * cols];
            for (r, out) in tokens.chunks_exact_mut(cols).enumerate() {
                let x = &xn[r * dim..(r + 1) * dim];
                for (j, o) in out.iter_mut().enumerate() {
                    let wj = &w[j * dim..(j + 1) * dim];
                    let dot: f64 = x.iter().zip(wj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    *o = (dot + b[j] as f64) as f32;
                }
            }
            let mut model_img = vec![0f32; tokens.len()];
            ops::unpatchify(&mut model_img, &tokens, rows, out_ch, c.size, c.patch);
            (model_img, tokens)
        }
    };

    let x = rng.normal_vec(c.images * image, 1.0);
    let diffusion = Diffusion::new(c.respacing, c.learn_sigma)?;
    let update = diffusion.step_update(c.i, c.kind)?;
    let noise_seed = rng.next_u64();
    let noise_stream = 1 + rng.below(250) as u64;
    let noise: Vec<f32> = if c.noise_buffer {
        rng.normal_vec(c.images * image, 1.0)
    } else {
        let mut z = vec![0f32; c.images * image];
        fora::rng::fill_normal(noise_seed, noise_stream, &mut z);
        z
    };

    // sampler_step reads the model output; final_sampler_step gets a poisoned one it must not
    // read, and the final Linear's inputs.
    let tok_d = match linear {
        None => gpu.upload_f32(&tokens)?,
        Some(_) => gpu.poisoned_f32(tokens.len())?,
    };
    let linear_d = match &linear {
        None => None,
        Some((dim, xn, w, b)) => Some((
            *dim,
            gpu.upload_bf16(xn)?,
            gpu.upload_bf16(w)?,
            gpu.upload_f32(b)?,
        )),
    };
    let x_d = gpu.upload_f32(&x)?;
    let noise_d = gpu.upload_f32(&noise)?;
    let mut p = SamplerStepParams {
        model_out: tok_d.addr(),
        x: x_d.addr(),
        noise: if c.noise_buffer { noise_d.addr() } else { 0 },
        seed: noise_seed,
        noise_stream,
        images: c.images as i32,
        rows: rows as i32,
        channels: c.channels as i32,
        out_channels: out_ch as i32,
        height: c.size as i32,
        width: c.size as i32,
        patch: c.patch as i32,
        guided_channels: guided_channels(c.guidance, c.channels, out_ch),
        cfg_scale: c.guidance.map_or(1.0, |g| g.scale),
        learn_sigma: c.learn_sigma as i32,
        ..Default::default()
    };
    set_update(&mut p, &update);
    match &linear_d {
        None => unsafe { sampler_step(gpu, &p) }?,
        Some((dim, xn, w, b)) => {
            p.xn = xn.addr();
            p.final_w = w.addr();
            p.final_b = b.addr();
            p.dim = *dim as i32;
            unsafe { final_sampler_step(gpu, &p) }?
        }
    }
    let got = gpu.download_f32(&x_d)?;

    // CPU twin: guidance as the CPU backend (ops::guide), then diffusion::apply_update.
    let guided = match c.guidance {
        Some(g) => {
            let mut cond = vec![0f32; c.images * out_ch * hw];
            let ch = guided_channels(c.guidance, c.channels, out_ch) as usize;
            ops::guide(&model_img, rows, out_ch, hw, ch, g.scale, &mut cond);
            cond
        }
        None => model_img.clone(),
    };
    let mut want = x.clone();
    apply_update(
        &update,
        c.learn_sigma,
        c.channels,
        hw,
        &mut want,
        &guided,
        &noise,
    );
    let add_noise = matches!(
        update,
        StepUpdate::Ddpm {
            add_noise: true,
            ..
        } | StepUpdate::Ddim {
            add_noise: true,
            ..
        }
    );
    let what = format!(
        "{} B={} C={} {}px p={} sigma={} guidance={:?} {} {:?} i={} noise={}",
        match final_linear {
            None => "sampler_step".to_string(),
            Some(dim) => format!("final_sampler_step dim={dim}"),
        },
        c.images,
        c.channels,
        c.size,
        c.patch,
        c.learn_sigma,
        c.guidance.map(|g| g.mode),
        c.respacing,
        c.kind,
        c.i,
        if !add_noise {
            "none"
        } else if c.noise_buffer {
            "buffer"
        } else {
            "philox"
        }
    );
    if final_linear.is_some() {
        // The kernel's f32 sums of the final Linear against the f64 one: ~1e-6 of each model
        // value, through the update's coefficients.
        check_close(&what, &got, &want, 1e-4)?;
        return check_elementwise(&what, &got, &want, 1e-4, 1e-4);
    }
    // Identical f32 operations; only log/cos/sin/exp may round differently (noise, sigma).
    check_close(&what, &got, &want, 1e-5)?;
    check_elementwise(&what, &got, &want, 1e-5, 1e-5)
}

/// Every case of sampler_step.
pub fn check_sampler_step<D: TestDevice>(gpu: &D) -> Result<()> {
    for (k, c) in sampler_cases().iter().enumerate() {
        run_sampler_step(gpu, c, 60 + k as u64)?;
    }
    Ok(())
}

/// final_sampler_step: the update cases whose final Linear it computes (p*p*out_channels a
/// multiple of 8 up to 64) at DiT-XL/2's width, and odd ones: token counts that leave a
/// partial tile of 8 (25, 9), 8 and 24 outputs a token (one and three n-tiles), and widths of
/// one chunk of 32 (fewer chunks than warps), three, and 25 (a partial group of loads).
pub fn check_final_sampler_step<D: TestDevice>(gpu: &D) -> Result<()> {
    let official = Some(Guidance {
        scale: 4.0,
        mode: GuidanceMode::Official3,
    });
    let mut cases: Vec<(SamplerCase, usize)> = sampler_cases()
        .into_iter()
        .filter(|c| {
            let out_ch = if c.learn_sigma { 2 } else { 1 } * c.channels;
            fora::cuda::sampler::final_sampler_supported(1152, c.patch * c.patch * out_ch)
        })
        .map(|c| (c, 1152))
        .collect();
    ensure!(
        cases.len() >= 6,
        "test bug: the DiT cases must take the fused update"
    );
    let odd = |images, channels, size, learn_sigma, guidance, i| SamplerCase {
        images,
        channels,
        size,
        patch: 2,
        learn_sigma,
        guidance,
        respacing: "250",
        kind: SamplerKind::Ddpm,
        i,
        noise_buffer: false,
    };
    // 25 tokens, 32 outputs, one chunk of k.
    cases.push((odd(2, 4, 10, true, official, 120), 32));
    // 9 tokens, 8 outputs (C = 1: official guidance covers the variance too), three chunks.
    cases.push((odd(3, 1, 6, true, official, 248), 96));
    // 64 tokens, 24 outputs, no guidance, 25 chunks.
    cases.push((odd(2, 3, 16, true, None, 0), 800));
    for (k, (c, dim)) in cases.iter().enumerate() {
        run_update(gpu, c, Some(*dim), 90 + k as u64)?;
    }
    Ok(())
}

/// The update cases of sampler_step: DiT shapes, every guidance mode and update kind, and odd
/// shapes.
pub fn sampler_cases() -> Vec<SamplerCase> {
    let official = Some(Guidance {
        scale: 4.0,
        mode: GuidanceMode::Official3,
    });
    let all_eps = Some(Guidance {
        scale: 1.5,
        mode: GuidanceMode::AllEps,
    });
    let cases = [
        // DiT-XL/2 256 px: DDPM-250 learned sigma, official CFG, Philox noise, early and late.
        SamplerCase {
            images: 2,
            channels: 4,
            size: 32,
            patch: 2,
            learn_sigma: true,
            guidance: official,
            respacing: "250",
            kind: SamplerKind::Ddpm,
            i: 249,
            noise_buffer: false,
        },
        SamplerCase {
            images: 2,
            channels: 4,
            size: 32,
            patch: 2,
            learn_sigma: true,
            guidance: official,
            respacing: "250",
            kind: SamplerKind::Ddpm,
            i: 3,
            noise_buffer: false,
        },
        // The last step adds no noise.
        SamplerCase {
            images: 2,
            channels: 4,
            size: 32,
            patch: 2,
            learn_sigma: true,
            guidance: official,
            respacing: "250",
            kind: SamplerKind::Ddpm,
            i: 0,
            noise_buffer: false,
        },
        // 512 px, all-eps guidance, noise from a buffer (a noise file).
        SamplerCase {
            images: 3,
            channels: 4,
            size: 64,
            patch: 2,
            learn_sigma: true,
            guidance: all_eps,
            respacing: "250",
            kind: SamplerKind::Ddpm,
            i: 100,
            noise_buffer: true,
        },
        // Fixed variance (no learn_sigma), no guidance, patch 4.
        SamplerCase {
            images: 4,
            channels: 4,
            size: 32,
            patch: 4,
            learn_sigma: false,
            guidance: None,
            respacing: "50",
            kind: SamplerKind::Ddpm,
            i: 20,
            noise_buffer: false,
        },
        // DDIM eta 0 and eta 1.
        SamplerCase {
            images: 2,
            channels: 4,
            size: 32,
            patch: 2,
            learn_sigma: true,
            guidance: official,
            respacing: "ddim50",
            kind: SamplerKind::Ddim { eta: 0.0 },
            i: 30,
            noise_buffer: false,
        },
        SamplerCase {
            images: 2,
            channels: 4,
            size: 32,
            patch: 2,
            learn_sigma: true,
            guidance: None,
            respacing: "ddim50",
            kind: SamplerKind::Ddim { eta: 1.0 },
            i: 10,
            noise_buffer: false,
        },
        // Odd: 1 channel (official guidance then covers the variance channel too), 5x5 latent,
        // patch 5, 75 elements (not a multiple of 4: a partial Philox block).
        SamplerCase {
            images: 3,
            channels: 1,
            size: 5,
            patch: 5,
            learn_sigma: true,
            guidance: official,
            respacing: "250",
            kind: SamplerKind::Ddpm,
            i: 7,
            noise_buffer: false,
        },
    ];
    cases.into()
}

pub struct UnpatchCase {
    pub rows: usize,
    pub channels: usize,
    pub learn_sigma: bool,
    pub size: usize,
    pub patch: usize,
    pub guidance: Option<Guidance>,
}

pub fn run_unpatchify<D: TestDevice>(gpu: &D, c: &UnpatchCase, seed: u64) -> Result<()> {
    let (rows, channels, learn_sigma, size, patch, guidance) = (
        c.rows,
        c.channels,
        c.learn_sigma,
        c.size,
        c.patch,
        c.guidance,
    );
    let mut rng = TestRng::new(seed);
    let out_ch = if learn_sigma { 2 * channels } else { channels };
    let hw = size * size;
    let img = random_model_out(&mut rng, rows, channels, out_ch, hw);
    let tokens = to_tokens(&img, rows, out_ch, size, patch);
    let tok_d = gpu.upload_f32(&tokens)?;
    let out = gpu.poisoned_f32(rows * out_ch * hw)?;
    let p = UnpatchifyParams {
        model_out: tok_d.addr(),
        out: out.addr(),
        rows: rows as i32,
        out_channels: out_ch as i32,
        height: size as i32,
        width: size as i32,
        patch: patch as i32,
        guided_channels: guided_channels(guidance, channels, out_ch),
        cfg_scale: guidance.map_or(1.0, |g| g.scale),
    };
    unsafe { unpatchify(gpu, &p) }?;
    let got = gpu.download_f32(&out)?;
    // CPU twin: ops::unpatchify, then (forward_with_cfg) the guided channels of both halves
    // become the guided conditional values, as CpuBackend::forward does.
    let mut want = vec![0f32; rows * out_ch * hw];
    ops::unpatchify(&mut want, &tokens, rows, out_ch, size, patch);
    if let Some(g) = guidance {
        let ch = guided_channels(guidance, channels, out_ch) as usize;
        let mut guided = vec![0f32; rows / 2 * out_ch * hw];
        ops::guide(&want.clone(), rows, out_ch, hw, ch, g.scale, &mut guided);
        let per = out_ch * hw;
        for half in want.chunks_exact_mut(rows / 2 * per) {
            for (o, gr) in half.chunks_exact_mut(per).zip(guided.chunks_exact(per)) {
                o[..ch * hw].copy_from_slice(&gr[..ch * hw]);
            }
        }
    }
    let what = format!(
        "unpatchify rows={rows} out_ch={out_ch} {size}px p={patch} guidance={:?}",
        guidance.map(|g| g.mode)
    );
    check_close(&what, &got, &want, 1e-6)?;
    check_elementwise(&what, &got, &want, 0.0, 0.0)
}

/// Every case of unpatchify.
pub fn check_unpatchify<D: TestDevice>(gpu: &D) -> Result<()> {
    let official = Some(Guidance {
        scale: 4.0,
        mode: GuidanceMode::Official3,
    });
    let all_eps = Some(Guidance {
        scale: 2.5,
        mode: GuidanceMode::AllEps,
    });
    let cases = [
        (4, 4, true, 32, 2, None),
        (4, 4, true, 32, 2, official),
        (6, 4, true, 64, 2, all_eps),
        (3, 4, false, 32, 8, None),
        (2, 1, true, 5, 5, official),
    ];
    for (k, &(rows, channels, learn_sigma, size, patch, guidance)) in cases.iter().enumerate() {
        let case = UnpatchCase {
            rows,
            channels,
            learn_sigma,
            size,
            patch,
            guidance,
        };
        run_unpatchify(gpu, &case, 71 + k as u64)?;
    }
    Ok(())
}

pub fn run_normal_fill<D: TestDevice>(gpu: &D, n: usize, seed: u64, stream: u64) -> Result<()> {
    let out = gpu.poisoned_f32(n)?;
    let p = NormalFillParams {
        out: out.addr(),
        seed,
        stream,
        n: n as i64,
    };
    unsafe { normal_fill(gpu, &p) }?;
    let got = gpu.download_f32(&out)?;
    // Same seed again: identical bits.
    let again = gpu.poisoned_f32(n)?;
    unsafe {
        normal_fill(
            gpu,
            &NormalFillParams {
                out: again.addr(),
                ..p
            },
        )
    }?;
    let again = gpu.download_f32(&again)?;
    ensure!(
        got.iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "normal_fill: two runs of seed {seed} stream {stream} differ"
    );
    let mut want = vec![0f32; n];
    fora::rng::fill_normal(seed, stream, &mut want);
    let exact = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    let what = format!("normal_fill n={n} seed={seed:#x} stream={stream}");
    println!("{what}: {exact} of {n} bit-exact");
    // Within 1e-6 relative (absolute below 1) of crate::rng: a few ulp of log/cos/sin.
    check_elementwise(&what, &got, &want, 1e-6, 1e-6)?;
    check_close(&what, &got, &want, 1e-6).map(|_| ())
}

/// Every case of normal_fill.
pub fn check_normal_fill<D: TestDevice>(gpu: &D) -> Result<()> {
    run_normal_fill(gpu, 2 * 4 * 32 * 32, 0, 0)?; // x_T of 2 images, seed 0
    run_normal_fill(gpu, 256 * 4 * 32 * 32, 42, 0)?; // 256 images
    run_normal_fill(gpu, 3 * 4 * 64 * 64, 0xDEAD_BEEF_1234_5678, 250)?; // 512 px, 64-bit seed
    run_normal_fill(gpu, 1001, 7, 1 << 40)?; // partial block, 64-bit stream
    Ok(())
}

// ---- memory-bandwidth probes (the bench's memory ceilings) -----------------------------------

/// `bandwidth_read` and `bandwidth_copy` over random words, outputs poisoned: the XOR of every
/// word the read probe's threads report is the XOR of the source (and no thread left its word
/// unwritten); the copy is the source bit for bit. One chunk, sizes around the grid's
/// kInFlight x threads step, and one whose grid is capped at 8 blocks an SM (a thread then
/// walks several strides, the tail loop included).
pub fn check_bandwidth<D: TestDevice>(gpu: &D) -> Result<()> {
    let mut rng = TestRng::new(0xba4d);
    let capped = (gpu.multiprocessors() * 8 * 256 * 4 + 3 * 256 + 5) as i64;
    for chunks in [1i64, 3, 1023, 1024, 1025, 4099, capped] {
        let words: Vec<u32> = (0..4 * chunks).map(|_| rng.next_u64() as u32).collect();
        let as_f32: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
        let src = gpu.upload_f32(&as_f32)?;

        let out_words = bandwidth_read_words(gpu, chunks);
        let out = gpu.poisoned_f32(out_words)?;
        let poison = f32::NAN.to_bits();
        unsafe {
            bandwidth_read(
                gpu,
                &BandwidthParams {
                    src: src.addr(),
                    dst: out.addr(),
                    chunks,
                    out_words: out_words as i64,
                    mask: -1,
                },
            )
        }?;
        let got: Vec<u32> = gpu
            .download_f32(&out)?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let unwritten = got.iter().filter(|&&w| w == poison).count();
        ensure!(
            unwritten == 0,
            "bandwidth_read, {chunks} chunks: {unwritten} of {out_words} threads left their word unwritten"
        );
        let want = words.iter().fold(0u32, |a, &w| a ^ w);
        let have = got.iter().fold(0u32, |a, &w| a ^ w);
        ensure!(
            have == want,
            "bandwidth_read, {chunks} chunks: XOR of the threads' words {have:#010x}, of the source {want:#010x}"
        );

        let dst = gpu.poisoned_f32(as_f32.len())?;
        unsafe {
            bandwidth_copy(
                gpu,
                &BandwidthParams {
                    src: src.addr(),
                    dst: dst.addr(),
                    chunks,
                    out_words: 0,
                    mask: -1,
                },
            )
        }?;
        let copied = gpu.download_f32(&dst)?;
        if let Some(i) = (0..words.len()).find(|&i| copied[i].to_bits() != words[i]) {
            anyhow::bail!(
                "bandwidth_copy, {chunks} chunks: word {i} is {:#010x}, the source's {:#010x}",
                copied[i].to_bits(),
                words[i]
            );
        }
        println!("bandwidth probes, {chunks} chunks: read XOR and copy exact");
    }
    // The L2 probe: a buffer of 2^k chunks read over and over (one chunk: mask 0). Reading it
    // an even number of times XORs to zero, an odd number to the buffer's XOR; a mask ignored
    // would read past the buffer (the emulator's guard) and give neither.
    for (buffer, reads) in [(1i64 << 10, 7i64), (1 << 12, 4), (1, 8)] {
        let words: Vec<u32> = (0..4 * buffer).map(|_| rng.next_u64() as u32).collect();
        let as_f32: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
        let src = gpu.upload_f32(&as_f32)?;
        let chunks = buffer * reads;
        let out_words = bandwidth_read_words(gpu, chunks);
        let out = gpu.poisoned_f32(out_words)?;
        unsafe {
            bandwidth_read(
                gpu,
                &BandwidthParams {
                    src: src.addr(),
                    dst: out.addr(),
                    chunks,
                    out_words: out_words as i64,
                    mask: buffer - 1,
                },
            )
        }?;
        let have = gpu
            .download_f32(&out)?
            .iter()
            .fold(0u32, |a, v| a ^ v.to_bits());
        let once = words.iter().fold(0u32, |a, &w| a ^ w);
        let want = if reads % 2 == 1 { once } else { 0 };
        ensure!(
            have == want,
            "bandwidth_read, {buffer} chunks read {reads} times: XOR {have:#010x}, want {want:#010x}"
        );
    }
    Ok(())
}

// ---- the VAE decoder's kernels (kernels/vae.cu) -----------------------------------------------

/// The unfold of a channels-last image, as `vae_unfold` documents it: rows `first..first+rows`
/// of the `[images * h * w, ldc]` matrix, columns (ky, kx, c) then zeros.
#[allow(clippy::too_many_arguments)]
pub fn vae_unfold_reference(
    x: &[f32],
    (images, h, w, c): (usize, usize, usize, usize),
    k: usize,
    upsample: bool,
    ldc: usize,
    first: usize,
    rows: usize,
) -> Vec<f32> {
    assert!(first + rows <= images * h * w);
    let (sh, sw) = if upsample { (h / 2, w / 2) } else { (h, w) };
    let pad = (k / 2) as isize;
    let mut out = vec![0f32; rows * ldc];
    for r in 0..rows {
        let q = first + r;
        let (image, y, xx) = (q / (h * w), (q % (h * w)) / w, q % w);
        for ky in 0..k {
            for kx in 0..k {
                let (sy, sx) = (
                    y as isize + ky as isize - pad,
                    xx as isize + kx as isize - pad,
                );
                if sy < 0 || sy >= h as isize || sx < 0 || sx >= w as isize {
                    continue;
                }
                let (sy, sx) = if upsample {
                    (sy as usize / 2, sx as usize / 2)
                } else {
                    (sy as usize, sx as usize)
                };
                for ch in 0..c {
                    out[r * ldc + (ky * k + kx) * c + ch] =
                        half::bf16::from_f32(x[((image * sh + sy) * sw + sx) * c + ch]).to_f32();
                }
            }
        }
    }
    out
}

/// GroupNorm (+ SiLU) of channels-last `x` `[images, pixels, c]`, in f64.
pub fn vae_group_norm_reference(
    x: &[f32],
    (images, pixels, c, groups): (usize, usize, usize, usize),
    weight: &[f32],
    bias: &[f32],
    silu: bool,
) -> Vec<f32> {
    let per = c / groups;
    let mut out = vec![0f32; x.len()];
    for i in 0..images {
        for g in 0..groups {
            let values = (0..pixels)
                .flat_map(|p| (g * per..(g + 1) * per).map(move |ch| (p, ch)))
                .map(|(p, ch)| x[(i * pixels + p) * c + ch] as f64);
            let n = (pixels * per) as f64;
            let mean = values.clone().sum::<f64>() / n;
            let var = values.map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + fora::vae::GROUP_NORM_EPS).sqrt();
            for p in 0..pixels {
                for ch in g * per..(g + 1) * per {
                    let at = (i * pixels + p) * c + ch;
                    let v = (x[at] as f64 - mean) * inv * weight[ch] as f64 + bias[ch] as f64;
                    out[at] = if silu {
                        (v / (1.0 + (-v).exp())) as f32
                    } else {
                        v as f32
                    };
                }
            }
        }
    }
    out
}

/// The VAE decoder's kernels against plain loops, outputs poisoned first: the unfold (3x3 with
/// and without the 2x upsampling read through, 1x1, a band starting mid-image, several images,
/// padded columns), GroupNorm + SiLU (widths below, at and above the statistics kernel's 256
/// threads, as in the Stable Diffusion VAE: 128, 256, 512 with 32 groups; odd pixel counts;
/// more chunks than pixels), the padded softmax, the cast and the add.
pub fn check_vae_kernels<D: TestDevice>(dev: &D) -> Result<()> {
    use fora::cuda::params::{
        VaeElementwiseParams, VaeGroupNormParams, VaeSoftmaxParams, VaeUnfoldParams,
    };
    use fora::cuda::vae::{vae_elementwise, vae_group_norm, vae_softmax, vae_unfold};
    let mut rng = TestRng::new(71);
    // (images, h, w, c, kernel, upsample, first, rows)
    let unfolds = [
        (2, 6, 10, 16, 3, false, 0, 120),
        (1, 8, 6, 4, 3, true, 0, 48),
        (2, 5, 7, 24, 1, false, 9, 50),
        (1, 4, 6, 512, 3, true, 5, 13),
        (3, 3, 3, 8, 3, false, 10, 7),
    ];
    for (images, h, w, c, k, up, first, rows) in unfolds {
        let (sh, sw) = if up { (h / 2, w / 2) } else { (h, w) };
        let x = rng.normal_vec(images * sh * sw * c, 1.0);
        let ldc = (k * k * c).div_ceil(8) * 8 + if c == 8 { 8 } else { 0 };
        let xd = dev.upload_f32(&x)?;
        let out = dev.poisoned_bf16(rows * ldc)?;
        let p = VaeUnfoldParams {
            x: xd.addr(),
            cols: out.addr(),
            first: first as i64,
            pixels: rows as i64,
            images: images as i32,
            height: h as i32,
            width: w as i32,
            channels: c as i32,
            kernel: k as i32,
            upsample: up as i32,
            ldc: ldc as i32,
        };
        // SAFETY: x holds the source images, out rows * ldc bf16.
        unsafe { vae_unfold(dev, &p)? };
        let want = vae_unfold_reference(&x, (images, h, w, c), k, up, ldc, first, rows);
        let what = format!("vae_unfold {images}x{h}x{w}x{c} k{k} up{up} rows {first}+{rows}");
        check_elementwise(&what, &dev.download_bf16(&out)?, &want, 0.0, 0.0)?;
    }

    // (images, pixels, channels, groups, chunks, silu)
    let norms = [
        (1, 30, 32, 8, 4, true),
        (2, 37, 128, 32, 64, true),
        (1, 65, 256, 32, 3, false),
        (2, 23, 512, 32, 5, true),
        (1, 3, 16, 8, 64, false),
    ];
    for (images, pixels, c, groups, chunks, silu) in norms {
        // An offset far from zero: the variance of such values is where a one-pass sum of
        // squares in f32 would lose its digits.
        let x: Vec<f32> = rng
            .normal_vec(images * pixels * c, 2.0)
            .iter()
            .map(|v| v + 30.0)
            .collect();
        let weight = rng.uniform_vec(c, 0.5, 1.5);
        let bias = rng.normal_vec(c, 0.5);
        let (xd, wd, bd) = (
            dev.upload_f32(&x)?,
            dev.upload_f32(&weight)?,
            dev.upload_f32(&bias)?,
        );
        let y = dev.poisoned_f32(x.len())?;
        // f64 partials in an f32 buffer of twice the length.
        let partials = dev.poisoned_f32(images * chunks * groups * 4)?;
        let stats = dev.poisoned_f32(images * groups * 2)?;
        let p = VaeGroupNormParams {
            x: xd.addr(),
            y: y.addr(),
            partials: partials.addr(),
            stats: stats.addr(),
            weight: wd.addr(),
            bias: bd.addr(),
            pixels: pixels as i64,
            images: images as i32,
            channels: c as i32,
            groups: groups as i32,
            chunks: chunks as i32,
            silu: silu as i32,
            eps: fora::vae::GROUP_NORM_EPS as f32,
        };
        // SAFETY: every buffer holds what the parameters say.
        unsafe { vae_group_norm(dev, &p)? };
        let want = vae_group_norm_reference(&x, (images, pixels, c, groups), &weight, &bias, silu);
        let what =
            format!("vae_group_norm {images}x{pixels}x{c} / {groups} groups, {chunks} chunks");
        check_elementwise(&what, &dev.download_f32(&y)?, &want, 2e-5, 2e-5)?;
    }

    // (rows, cols, ld)
    for (rows, cols, ld) in [(30, 30, 32), (7, 1024, 1024), (3, 300, 304)] {
        let scale = 0.125f32;
        let s = rng.normal_vec(rows * ld, 8.0);
        let sd = dev.upload_f32(&s)?;
        let probs = dev.poisoned_bf16(rows * ld)?;
        let p = VaeSoftmaxParams {
            scores: sd.addr(),
            probs: probs.addr(),
            rows: rows as i64,
            cols: cols as i32,
            ld: ld as i32,
            scale,
        };
        // SAFETY: scores and probabilities hold rows * ld.
        unsafe { vae_softmax(dev, &p)? };
        let mut want = vec![0f32; rows * ld];
        for r in 0..rows {
            let row = &s[r * ld..r * ld + cols];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let e: Vec<f64> = row
                .iter()
                .map(|&v| (scale as f64 * (v as f64 - m)).exp())
                .collect();
            let sum: f64 = e.iter().sum();
            for (c, v) in e.iter().enumerate() {
                want[r * ld + c] = (v / sum) as f32;
            }
        }
        // bf16 output: half an ulp of 2^-8, relative.
        let what = format!("vae_softmax {rows}x{cols} (ld {ld})");
        check_elementwise(&what, &dev.download_bf16(&probs)?, &want, 1e-6, 4e-3)?;
    }

    for n in [1, 1000, 4099] {
        let x = rng.normal_vec(n, 3.0);
        let y0 = rng.normal_vec(n, 3.0);
        let xd = dev.upload_f32(&x)?;
        let cast = dev.poisoned_bf16(n)?;
        let p = VaeElementwiseParams {
            x: xd.addr(),
            y: cast.addr(),
            n: n as i64,
        };
        // SAFETY: n elements each.
        unsafe { vae_elementwise(dev, "vae_cast_bf16", &p)? };
        let want = round_bf16(&x);
        check_elementwise("vae_cast_bf16", &dev.download_bf16(&cast)?, &want, 0.0, 0.0)?;
        let yd = dev.upload_f32(&y0)?;
        let p = VaeElementwiseParams {
            x: xd.addr(),
            y: yd.addr(),
            n: n as i64,
        };
        // SAFETY: n elements each.
        unsafe { vae_elementwise(dev, "vae_add", &p)? };
        let want: Vec<f32> = x.iter().zip(&y0).map(|(a, b)| b + a).collect();
        check_elementwise("vae_add", &dev.download_f32(&yd)?, &want, 0.0, 0.0)?;
    }
    Ok(())
}
