//! Kernel test bodies shared by `tests/gpu_small_kernels.rs` (on a GPU) and
//! `tests/kernel_emulation.rs` (on the CPU emulator): the patch embedding, LayerNorm + modulate,
//! the residual epilogue + LayerNorm, the FORA reuse kernel and the fused reuse forward, each
//! run through its launcher on fresh random inputs with outputs poisoned first, and compared
//! with its CPU twin (src/cpu/ops.rs or a plain loop here) at DiT-XL/2, DiT-S/2, the embedded
//! model's and odd shapes. `check_*` runs every case of a kernel on a [`TestDevice`].
#![allow(dead_code)] // each test crate uses its own subset

use anyhow::{ensure, Result};
use fora::cpu::ops;
use fora::cuda::embed::{patch_embed, transpose_patch_weight};
use fora::cuda::fora::{fora_reuse, fora_reuse_final};
use fora::cuda::norm::{layernorm_modulate, residual_layernorm};
use fora::cuda::params::{
    ForaReuseFinalParams, ForaReuseParams, LayerNormModulateParams, PatchEmbedParams,
    ResidualLayerNormParams,
};
use fora::cuda::testing::{check_close, round_bf16, DeviceAddr, TestDevice, TestRng};

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
    patch_embed(gpu, &p)?;
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

pub fn run_layernorm<D: TestDevice>(gpu: &D, c: &NormCase, seed: u64) -> Result<()> {
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
    layernorm_modulate(gpu, &p)?;
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
        "layernorm_modulate rows={} T={} D={} ld_mod={} shift={} scale={}",
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
    run_layernorm(gpu, &xl, 41)?;
    // The final layer's (shift, scale) at 256 rows.
    let xl_big = NormCase {
        rows: 256,
        tokens: 256,
        dim: d,
        ld_mod: ld,
        shift_col: 28 * 6 * d,
        scale_col: 28 * 6 * d + d,
    };
    run_layernorm(gpu, &xl_big, 42)?;
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
    run_layernorm(gpu, &s, 43)?;
    // The embedded digits model: dim 64, lanes 16..31 hold no columns (register path).
    let tiny = NormCase {
        rows: 2,
        tokens: 256,
        dim: 64,
        ld_mod: 4 * 6 * 64 + 2 * 64,
        shift_col: 6 * 64,
        scale_col: 6 * 64 + 64,
    };
    run_layernorm(gpu, &tiny, 45)?;
    // dim 2048, beyond the register path's 1536: the looped float4 path.
    let wide = NormCase {
        rows: 3,
        tokens: 19,
        dim: 2048,
        ld_mod: 3 * 2048,
        shift_col: 2048,
        scale_col: 4096,
    };
    run_layernorm(gpu, &wide, 46)?;
    // Odd: dim 100, T = 77, unaligned columns (the scalar path).
    let odd = NormCase {
        rows: 3,
        tokens: 77,
        dim: 100,
        ld_mod: 303,
        shift_col: 3,
        scale_col: 201,
    };
    run_layernorm(gpu, &odd, 44)?;
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
}

pub fn run_residual_layernorm<D: TestDevice>(gpu: &D, c: &ResidualLnCase, seed: u64) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let m = c.rows * c.tokens;
    let n = m * c.dim;
    let layers = 2;
    let ld_mod = layers * 6 * c.dim + 2 * c.dim;
    // Layer 1's gate_mlp, then the final layer's shift / scale: the columns fc2's fused epilogue
    // of the last block uses.
    let (gate_col, shift_col) = (6 * c.dim + 5 * c.dim, layers * 6 * c.dim);
    let acc = rng.normal_vec(m * c.ld_acc, 2.0);
    let bias = rng.normal_vec(c.dim, 0.5);
    // A residual with an offset so the two-pass statistics matter.
    let x: Vec<f32> = (0..n)
        .map(|i| rng.normal() + 3.0 + (i % 5) as f32)
        .collect();
    let modulation = rng.uniform_vec(c.rows * ld_mod, -1.0, 1.0);
    let acc_d = gpu.upload_f32(&acc)?;
    let bias_d = gpu.upload_f32(&bias)?;
    let x_d = gpu.upload_f32(&x)?;
    let mod_d = gpu.upload_f32(&modulation)?;
    let out = gpu.poisoned_bf16(n)?;
    let cache = gpu.poisoned_bf16(n)?;
    let p = ResidualLayerNormParams {
        acc: acc_d.addr(),
        bias: bias_d.addr(),
        cache: if c.with_cache { cache.addr() } else { 0 },
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
        eps: 1e-6,
    };
    residual_layernorm(gpu, &p)?;
    let got_x = gpu.download_f32(&x_d)?;
    let got = gpu.download_bf16(&out)?;
    let got_cache = gpu.download_bf16(&cache)?;

    // CPU: v = acc + bias (f32), the cache holds bf16(v); x += gate * v (ops::gate_residual);
    // then LayerNorm + modulate (ops::layernorm_modulate).
    let v: Vec<f32> = (0..n)
        .map(|i| acc[(i / c.dim) * c.ld_acc + i % c.dim] + bias[i % c.dim])
        .collect();
    let mut want_x = x.clone();
    ops::gate_residual(
        &mut want_x,
        &v,
        &modulation[gate_col..],
        ld_mod,
        c.tokens,
        c.dim,
        false,
    );
    let mut want = vec![0f32; n];
    ops::layernorm_modulate(
        &mut want,
        &want_x,
        &modulation[shift_col..],
        &modulation[shift_col + c.dim..],
        ld_mod,
        c.tokens,
        c.dim,
        false,
    );
    let what = format!(
        "residual_layernorm rows={} T={} D={} ld_acc={} cache={}",
        c.rows, c.tokens, c.dim, c.ld_acc, c.with_cache
    );
    if c.with_cache {
        // bf16 of the same f32 sum: equal to the bit.
        check_elementwise(
            &format!("{what} cache"),
            &got_cache,
            &round_bf16(&v),
            0.0,
            0.0,
        )?;
    } else {
        ensure!(
            got_cache.iter().all(|v| v.is_nan()),
            "{what}: wrote the cache although its pointer was 0"
        );
    }
    // x: the GPU may contract x + gate * v into one FMA (one rounding less than the CPU).
    check_elementwise(&format!("{what} x"), &got_x, &want_x, 1e-6, 1e-6)?;
    check_close(&what, &got, &want, 1e-2)?;
    check_elementwise(&what, &got, &want, 1e-4, 2.0f32.powi(-8))
}

/// Every case of residual_layernorm.
pub fn check_residual_layernorm<D: TestDevice>(gpu: &D) -> Result<()> {
    let case = |rows, tokens, dim, ld_acc, with_cache| ResidualLnCase {
        rows,
        tokens,
        dim,
        ld_acc,
        with_cache,
    };
    // DiT-XL/2 256 px, CFG batch of 2 images; as the sampler's computing step (cache) and as a
    // plain forward (none).
    run_residual_layernorm(gpu, &case(4, 256, 1152, 1152, true), 71)?;
    run_residual_layernorm(gpu, &case(2, 256, 1152, 1152, false), 72)?;
    // The embedded model (dim 64: two float4 lanes of 32 idle past the row end).
    run_residual_layernorm(gpu, &case(2, 256, 64, 64, true), 73)?;
    // Odd: dim 100, T = 77, a padded product, rows not a multiple of the block's 4.
    run_residual_layernorm(gpu, &case(3, 77, 100, 104, true), 74)?;
    // The widest row (1536) and DiT-S (384).
    run_residual_layernorm(gpu, &case(1, 9, 1536, 1536, true), 75)?;
    run_residual_layernorm(gpu, &case(5, 64, 384, 384, true), 76)?;
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
    fora_reuse(gpu, &p)?;
    let got = gpu.download_f32(&x_d)?;
    // The CPU reuse path: per layer, in order, x += gate_msa * A_l; x += gate_mlp * M_l.
    let mut want = x.clone();
    for l in 0..c.layers {
        for (which, col) in [(0, 2 * c.dim), (1, 5 * c.dim)] {
            let slab_start = (2 * l + which) * slab;
            ops::gate_residual(
                &mut want,
                &cache[slab_start..slab_start + n],
                &modulation[l * 6 * c.dim + col..],
                ld_mod,
                c.tokens,
                c.dim,
                false,
            );
        }
    }
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

pub fn run_fora_reuse_final<D: TestDevice>(gpu: &D, c: &ReuseFinalCase, seed: u64) -> Result<()> {
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
        cache: cache_d.addr(),
        modulation: mod_d.addr(),
        out: out.addr(),
        x: x_out.addr(),
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
        eps: 1e-6,
    };
    fora_reuse_final(gpu, &p)?;
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
    for l in 0..c.layers {
        for (which, col) in [(0, 2 * c.dim), (1, 5 * c.dim)] {
            let start = (2 * l + which) * slab;
            ops::gate_residual(
                &mut x,
                &cache[start..start + n],
                &modulation[l * 6 * c.dim + col..],
                ld_mod,
                tokens,
                c.dim,
                false,
            );
        }
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
        "fora_reuse_final images={} rows={} C={} {}px p={} D={} L={} pad={}",
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
    fora_reuse_final(gpu, &p)?;
    ensure!(
        gpu.download_bf16(&again)? == got,
        "{what}: the output differs when x is not written"
    );
    ensure!(
        gpu.download_f32(&x_out)?.iter().all(|v| v.is_nan()),
        "{what}: x was written although its pointer was 0"
    );
    Ok(())
}

/// Every case of fora_reuse_final.
pub fn check_fora_reuse_final<D: TestDevice>(gpu: &D) -> Result<()> {
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
    // DiT-XL/2 256 px, CFG rows [x; x]: 160 threads (5 warps) per token row, 144 active.
    run_fora_reuse_final(gpu, &case(2, 4, 4, 32, 2, 1152, 28, 0), 61)?;
    // The embedded model: 8 threads per token row, 32 rows per block.
    run_fora_reuse_final(gpu, &case(1, 2, 3, 32, 2, 64, 4, 0), 62)?;
    // DiT-S/2 sizes, no CFG, padded slabs.
    run_fora_reuse_final(gpu, &case(3, 3, 4, 16, 2, 384, 3, 8 * 384), 63)?;
    // Odd: dim 200 (25 chunks in a 32-thread group), T = 25, rows % images != 0, a short
    // last block.
    run_fora_reuse_final(gpu, &case(3, 7, 3, 10, 2, 200, 2, 16), 64)?;
    // dim 8: one thread per token row; patch 1.
    run_fora_reuse_final(gpu, &case(2, 2, 1, 6, 1, 8, 3, 0), 65)?;
    // The limits: dim 2048 (one 256-thread group), C*p*p = 64.
    run_fora_reuse_final(gpu, &case(1, 2, 4, 8, 4, 2048, 2, 0), 66)?;
    Ok(())
}
