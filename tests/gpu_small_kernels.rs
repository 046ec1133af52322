//! GPU tests of the small kernels (conditioning, patch embedding, LayerNorm + modulate, the
//! residual epilogue + LayerNorm, FORA reuse, the fused reuse forward, sampler update,
//! unpatchify, Philox noise), each against its CPU twin (src/cpu/ops.rs,
//! crate::diffusion::apply_update, crate::rng, or a plain loop) on fresh random inputs, outputs
//! poisoned with NaN first, at DiT-XL/2, DiT-S/2 and odd shapes. The bodies of five of them are
//! in `small_kernel_cases`, shared with the CPU emulator's tests (tests/kernel_emulation.rs).
//!
//! Without a CUDA device every test prints `SKIP <name>: no CUDA device` and passes; with
//! `FORA_REQUIRE_GPU=1` a missing device fails.
//!
//! Tolerances: bf16 outputs rel-L2 <= 1e-2 (the design's bound for bf16 kernels) plus an
//! element-wise bound of about one bf16 ulp; f32 outputs whose maths is the CPU's (FORA
//! reuse, unpatchify, the sampler update) are checked element by element to ~1e-6 relative.

mod small_kernel_cases;

use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;
use fora::backend::{Guidance, GuidanceMode, StepUpdate};
use fora::cpu::ops;
use fora::cuda::conditioning::{label_silu, silu_f32_bf16, timestep_embedding};
use fora::cuda::params::{
    LabelSiluParams, NormalFillParams, SamplerStepParams, SiluParams, TimestepEmbedParams,
    UnpatchifyParams,
};
use fora::cuda::sampler::{guided_channels, normal_fill, sampler_step, set_update, unpatchify};
use fora::cuda::testing::{check_close, from_bf16, poison_bf16, poison_f32, test_gpu, TestRng};
use fora::cuda::{dptr, Gpu};
use fora::diffusion::{apply_update, Diffusion, SamplerKind};
use half::bf16;
use small_kernel_cases::check_elementwise;

// ---- helpers --------------------------------------------------------------------------------

fn upload_f32(gpu: &Gpu, v: &[f32]) -> Result<CudaSlice<f32>> {
    gpu.upload(v, "test input")
}

fn poisoned_f32(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    let mut s = gpu.alloc_zeros::<f32>(n, "test output")?;
    poison_f32(gpu, &mut s)?;
    Ok(s)
}

fn poisoned_bf16(gpu: &Gpu, n: usize) -> Result<CudaSlice<bf16>> {
    let mut s = gpu.alloc_zeros::<bf16>(n, "test output")?;
    poison_bf16(gpu, &mut s)?;
    Ok(s)
}

fn download_bf16(gpu: &Gpu, s: &CudaSlice<bf16>) -> Result<Vec<f32>> {
    Ok(from_bf16(&gpu.download(s)?))
}

/// Columns `cols` of each row of a `[rows, ld]` matrix.
fn compact(v: &[f32], rows: usize, cols: usize, ld: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| v[r * ld..r * ld + cols].iter().copied())
        .collect()
}

/// The padding columns `cols..ld` of every row are still NaN (the kernel wrote nothing there).
fn check_padding_untouched(
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

fn run_timestep_embedding(gpu: &Gpu, rows: usize, ldo: usize, seed: u64) -> Result<()> {
    let half = fora::weights::FREQ_DIM / 2;
    let mut rng = TestRng::new(seed);
    let mut t: Vec<i64> = (0..rows).map(|_| rng.below(1000) as i64).collect();
    t[0] = 999;
    if rows > 1 {
        t[1] = 0;
    }
    let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    let t_dev = upload_f32(gpu, &tf)?;
    let out = poisoned_bf16(gpu, rows * ldo)?;
    let p = TimestepEmbedParams {
        t: dptr(&t_dev),
        out: dptr(&out),
        rows: rows as i32,
        half: half as i32,
        ldo: ldo as i32,
    };
    timestep_embedding(gpu, &p)?;
    let got = download_bf16(gpu, &out)?;
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

#[test]
fn gpu_timestep_embedding() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_timestep_embedding") else {
        return Ok(());
    };
    run_timestep_embedding(&gpu, 2, 256, 1)?;
    run_timestep_embedding(&gpu, 256, 256, 2)?;
    run_timestep_embedding(&gpu, 7, 264, 3)?;
    Ok(())
}

fn run_silu(
    gpu: &Gpu,
    rows: usize,
    cols: usize,
    ld_in: usize,
    ldo: usize,
    seed: u64,
) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let input = rng.normal_vec(rows * ld_in, 3.0);
    let in_dev = upload_f32(gpu, &input)?;
    let out = poisoned_bf16(gpu, rows * ldo)?;
    let p = SiluParams {
        input: dptr(&in_dev),
        out: dptr(&out),
        rows: rows as i32,
        cols: cols as i32,
        ld_in: ld_in as i32,
        ldo: ldo as i32,
    };
    silu_f32_bf16(gpu, &p)?;
    let got = download_bf16(gpu, &out)?;
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

#[test]
fn gpu_silu() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_silu") else {
        return Ok(());
    };
    run_silu(&gpu, 2, 1152, 1152, 1152, 11)?; // XL t-MLP hidden, batch 2
    run_silu(&gpu, 256, 384, 384, 384, 12)?; // S, 256 rows
    run_silu(&gpu, 5, 77, 80, 96, 13)?; // odd, strided
    Ok(())
}

fn run_label_silu(gpu: &Gpu, rows: usize, dim: usize, ldo: usize, seed: u64) -> Result<()> {
    let num_labels = 1001; // 1000 classes + the null class
    let mut rng = TestRng::new(seed);
    let ld_t = dim + 3;
    let t_emb = rng.normal_vec(rows * ld_t, 1.5);
    let table = rng.normal_vec(num_labels * dim, 1.0);
    let mut labels: Vec<i32> = (0..rows).map(|_| rng.below(num_labels) as i32).collect();
    labels[0] = (num_labels - 1) as i32; // the null class
    let t_dev = upload_f32(gpu, &t_emb)?;
    let table_dev = upload_f32(gpu, &table)?;
    let labels_dev = gpu.upload(&labels, "labels")?;
    let out = poisoned_bf16(gpu, rows * ldo)?;
    let p = LabelSiluParams {
        t_emb: dptr(&t_dev),
        labels: dptr(&labels_dev),
        table: dptr(&table_dev),
        out: dptr(&out),
        rows: rows as i32,
        dim: dim as i32,
        ld_t: ld_t as i32,
        ldo: ldo as i32,
        num_labels: num_labels as i32,
    };
    label_silu(gpu, &p)?;
    let got = download_bf16(gpu, &out)?;
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

#[test]
fn gpu_label_silu() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_label_silu") else {
        return Ok(());
    };
    run_label_silu(&gpu, 2, 1152, 1152, 21)?;
    run_label_silu(&gpu, 256, 1152, 1152, 22)?;
    run_label_silu(&gpu, 8, 384, 384, 23)?;
    run_label_silu(&gpu, 3, 100, 104, 24)?;
    Ok(())
}

// ---- patch embedding, LayerNorm, residual + LayerNorm, FORA reuse, the fused reuse forward ---
// (the bodies are shared with the CPU emulator: tests/small_kernel_cases)

#[test]
fn gpu_patch_embed() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_patch_embed") else {
        return Ok(());
    };
    small_kernel_cases::check_patch_embed(&gpu)
}

#[test]
fn gpu_layernorm_modulate() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_layernorm_modulate") else {
        return Ok(());
    };
    small_kernel_cases::check_layernorm_modulate(&gpu)
}

#[test]
fn gpu_residual_layernorm() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_residual_layernorm") else {
        return Ok(());
    };
    small_kernel_cases::check_residual_layernorm(&gpu)
}

#[test]
fn gpu_fora_reuse() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_fora_reuse") else {
        return Ok(());
    };
    small_kernel_cases::check_fora_reuse(&gpu)
}

#[test]
fn gpu_fora_reuse_final() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_fora_reuse_final") else {
        return Ok(());
    };
    small_kernel_cases::check_fora_reuse_final(&gpu)
}

// ---- sampler update, unpatchify, noise ------------------------------------------------------

struct SamplerCase {
    images: usize,
    channels: usize,
    size: usize,
    patch: usize,
    learn_sigma: bool,
    guidance: Option<Guidance>,
    respacing: &'static str,
    kind: SamplerKind,
    i: usize,
    /// Noise from a buffer instead of Philox.
    noise_buffer: bool,
}

/// Image layout `[n, c, H, W]` -> the final Linear's token layout `[n*T, p*p*c]` (features
/// ordered (i, j, c)), the inverse of the official unpatchify.
fn to_tokens(img: &[f32], n: usize, c: usize, size: usize, p: usize) -> Vec<f32> {
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
fn random_model_out(
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

fn run_sampler_step(gpu: &Gpu, c: &SamplerCase, seed: u64) -> Result<()> {
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
    let model_img = random_model_out(&mut rng, rows, c.channels, out_ch, hw);
    let tokens = to_tokens(&model_img, rows, out_ch, c.size, c.patch);
    // The CPU's own unpatchify must give back the image layout (checks to_tokens).
    let mut back = vec![0f32; model_img.len()];
    ops::unpatchify(&mut back, &tokens, rows, out_ch, c.size, c.patch);
    ensure!(
        back == model_img,
        "test bug: to_tokens is not the inverse of ops::unpatchify"
    );

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

    let tok_d = upload_f32(gpu, &tokens)?;
    let x_d = upload_f32(gpu, &x)?;
    let noise_d = upload_f32(gpu, &noise)?;
    let mut p = SamplerStepParams {
        model_out: dptr(&tok_d),
        x: dptr(&x_d),
        noise: if c.noise_buffer { dptr(&noise_d) } else { 0 },
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
    sampler_step(gpu, &p)?;
    let got = gpu.download(&x_d)?;

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
        "sampler_step B={} C={} {}px p={} sigma={} guidance={:?} {} {:?} i={} noise={}",
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
    // Identical f32 operations; only log/cos/sin/exp may round differently (noise, sigma).
    check_close(&what, &got, &want, 1e-5)?;
    check_elementwise(&what, &got, &want, 1e-5, 1e-5)
}

#[test]
fn gpu_sampler_step() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_sampler_step") else {
        return Ok(());
    };
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
    for (k, c) in cases.iter().enumerate() {
        run_sampler_step(&gpu, c, 60 + k as u64)?;
    }
    Ok(())
}

struct UnpatchCase {
    rows: usize,
    channels: usize,
    learn_sigma: bool,
    size: usize,
    patch: usize,
    guidance: Option<Guidance>,
}

fn run_unpatchify(gpu: &Gpu, c: &UnpatchCase, seed: u64) -> Result<()> {
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
    let tok_d = upload_f32(gpu, &tokens)?;
    let out = poisoned_f32(gpu, rows * out_ch * hw)?;
    let p = UnpatchifyParams {
        model_out: dptr(&tok_d),
        out: dptr(&out),
        rows: rows as i32,
        out_channels: out_ch as i32,
        height: size as i32,
        width: size as i32,
        patch: patch as i32,
        guided_channels: guided_channels(guidance, channels, out_ch),
        cfg_scale: guidance.map_or(1.0, |g| g.scale),
    };
    unpatchify(gpu, &p)?;
    let got = gpu.download(&out)?;
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

#[test]
fn gpu_unpatchify() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_unpatchify") else {
        return Ok(());
    };
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
        run_unpatchify(&gpu, &case, 71 + k as u64)?;
    }
    Ok(())
}

fn run_normal_fill(gpu: &Gpu, n: usize, seed: u64, stream: u64) -> Result<()> {
    let out = poisoned_f32(gpu, n)?;
    let p = NormalFillParams {
        out: dptr(&out),
        seed,
        stream,
        n: n as i64,
    };
    normal_fill(gpu, &p)?;
    let got = gpu.download(&out)?;
    // Same seed again: identical bits.
    let again = poisoned_f32(gpu, n)?;
    normal_fill(
        gpu,
        &NormalFillParams {
            out: dptr(&again),
            ..p
        },
    )?;
    let again = gpu.download(&again)?;
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

#[test]
fn gpu_normal_fill() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_normal_fill") else {
        return Ok(());
    };
    run_normal_fill(&gpu, 2 * 4 * 32 * 32, 0, 0)?; // x_T of 2 images, seed 0
    run_normal_fill(&gpu, 256 * 4 * 32 * 32, 42, 0)?; // 256 images
    run_normal_fill(&gpu, 3 * 4 * 64 * 64, 0xDEAD_BEEF_1234_5678, 250)?; // 512 px, 64-bit seed
    run_normal_fill(&gpu, 1001, 7, 1 << 40)?; // partial block, 64-bit stream
    Ok(())
}
