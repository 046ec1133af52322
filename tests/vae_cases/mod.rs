//! VAE decoder test bodies shared by `tests/gpu_vae.rs` (on a GPU, cuBLASLt) and
//! `tests/kernel_emulation.rs` (the whole decoder on the CPU emulator of its kernels, a plain
//! GEMM in cuBLASLt's place): the decoder over a [`VaeDevice`] against the f32 CPU decoder.
#![allow(dead_code)] // each test crate uses its own subset

use anyhow::{ensure, Result};
use fora::cuda::testing::{rel_l2, TestRng};
use fora::cuda::vae::{GpuVae, VaeDevice};
use fora::io::TensorFile;
use fora::vae::VaeDecoder;
use std::sync::Arc;

/// A committed fixture, under `FORA_ROOT` or the working directory (the package root under
/// `cargo test`, the project root of the device's copy for a packed binary), never a
/// compiled-in path.
pub fn fixture(name: &str) -> String {
    let root = std::env::var("FORA_ROOT").unwrap_or_else(|_| ".".into());
    format!("{root}/tests/fixtures/{name}")
}

/// A random decoder of `widths` with `resnets` each and 32 groups (`fora::vae::random_weights`).
pub fn random_vae_bytes(widths: &[usize], resnets: usize, seed: u64) -> Vec<u8> {
    fora::vae::random_weights(widths, resnets, 32, seed).unwrap()
}

/// The device's decode of `latents` against the CPU's: rel-L2 within 2e-2 (a whole forward's
/// bound for bf16 operands, DESIGN.md), finite, and a second decode the same bits
/// (deterministic; images after the first reuse one decode's scratch). Returns the rel-L2.
pub fn compare<D: VaeDevice>(
    dev: D,
    vae: VaeDecoder,
    latents: &[f32],
    shape: [usize; 4],
) -> Result<f64> {
    let vae = Arc::new(vae);
    let (want, want_shape) = vae.decode(latents, shape)?;
    let on_dev = GpuVae::new(dev, vae.clone())?;
    let (got, got_shape) = on_dev.decode(latents, shape)?;
    ensure!(
        got_shape == want_shape,
        "{got_shape:?} against {want_shape:?}"
    );
    ensure!(got.iter().all(|v| v.is_finite()), "non-finite pixels");
    let err = rel_l2(&got, &want);
    // Also about the reference's mean: a reference nearly flat around a large mean would let
    // a wrong pixel index pass the plain rel-L2 (and a flat one fails this: NaN).
    let mean = want.iter().map(|&v| v as f64).sum::<f64>() / want.len() as f64;
    let centre = |v: &[f32]| {
        v.iter()
            .map(|&x| (x as f64 - mean) as f32)
            .collect::<Vec<f32>>()
    };
    let centred = rel_l2(&centre(&got), &centre(&want));
    println!(
        "VAE decode {shape:?} -> {got_shape:?}: rel-L2 {err:.3e} against the CPU, \
         {centred:.3e} about its mean {mean:.3e}"
    );
    ensure!(
        err <= 2e-2 && centred <= 2e-2,
        "rel-L2 {err:e}, about the mean {centred:e}: > 2e-2"
    );
    let (again, _) = on_dev.decode(latents, shape)?;
    ensure!(again == got, "a second decode differs");
    Ok(err)
}

/// The diffusers fixture (5 x 6 latents, two images: 30 attention tokens padded to 32; widths
/// 32, 32, 16 with a shortcut conv; 8 groups).
pub fn check_fixture<D: VaeDevice>(dev: D) -> Result<()> {
    let io = TensorFile::open(fixture("vae_tiny.io.safetensors"))?;
    let z = io.f32("latents", 4)?;
    compare(
        dev,
        VaeDecoder::load(fixture("vae_tiny.model.safetensors"))?,
        &z.data,
        z.shape.try_into().unwrap(),
    )?;
    Ok(())
}

/// A random decoder of `widths` (three resnets a block, 32 groups) on latents `[1, 4, h, w]`.
pub fn check_random<D: VaeDevice>(dev: D, widths: &[usize], (h, w): (usize, usize)) -> Result<()> {
    let vae = VaeDecoder::from_bytes(&random_vae_bytes(widths, 3, 3))?;
    let latents = TestRng::new(4).normal_vec(4 * h * w, 1.0);
    compare(dev, vae, &latents, [1, 4, h, w])?;
    Ok(())
}
