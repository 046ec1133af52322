//! The VAE decoder on the GPU (`fora::cuda::vae::CudaVae`: bf16 operands, cuBLASLt GEMMs)
//! against the f32 CPU decoder (`fora::vae`), to a whole forward's tolerance (rel-L2 <= 2e-2,
//! DESIGN.md): the diffusers fixture, and a random decoder of the Stable Diffusion VAE's own
//! shape (widths 512, 512, 256, 128, three resnets a block, 32 groups) on a 32 x 32 latent,
//! DiT-XL/2's. The bodies are in `vae_cases`, shared with the emulator's run of the whole
//! decoder (tests/kernel_emulation.rs). Without a CUDA device each test prints
//! `SKIP <name>` and passes (`FORA_REQUIRE_GPU=1` fails instead).

mod vae_cases;

use anyhow::Result;
use fora::cuda::testing::{test_gpu, TestRng};
use fora::cuda::vae::CudaVaeDevice;
use fora::vae::VaeDecoder;

#[test]
fn gpu_vae_decodes_the_fixture_as_the_cpu() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_vae_decodes_the_fixture_as_the_cpu") else {
        return Ok(());
    };
    vae_cases::check_fixture(CudaVaeDevice::new(gpu)?)
}

#[test]
fn gpu_vae_decodes_the_sd_vae_shape_as_the_cpu() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_vae_decodes_the_sd_vae_shape_as_the_cpu") else {
        return Ok(());
    };
    vae_cases::check_random(CudaVaeDevice::new(gpu)?, &[512, 512, 256, 128], (32, 32))
}

/// The random decoder decodes on the CPU (the GPU test's reference: it must not be something
/// the CPU decoder refuses or turns into NaN or a flat image).
#[test]
fn random_sd_shaped_vae_decodes_on_the_cpu() -> Result<()> {
    let bytes = vae_cases::random_vae_bytes(&[64, 64, 32, 32], 3, 3);
    let vae = VaeDecoder::from_bytes(&bytes)?;
    assert_eq!(vae.config().upscale(), 8);
    assert_eq!(vae.config().resnets_per_block, 3);
    let (img, _) = vae.decode(&TestRng::new(4).normal_vec(4 * 4 * 4, 1.0), [1, 4, 4, 4])?;
    assert!(img.iter().all(|v| v.is_finite()));
    let n = img.len() as f64;
    let mean = img.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (img.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        std > 1e-3 && std >= 0.1 * mean.abs(),
        "a nearly flat image: mean {mean:e}, standard deviation {std:e}"
    );
    Ok(())
}
