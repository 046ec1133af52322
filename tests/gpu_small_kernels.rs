//! GPU tests of the small kernels (conditioning, patch embedding, LayerNorm + modulate, the
//! residual epilogue + LayerNorm, FORA reuse, the fused reuse forward, sampler update,
//! unpatchify, Philox noise), each against its CPU twin (src/cpu/ops.rs,
//! crate::diffusion::apply_update, crate::rng, or a plain loop) on fresh random inputs, outputs
//! poisoned with NaN first, at DiT-XL/2, DiT-S/2 and odd shapes. The bodies are in
//! `small_kernel_cases`, shared with the CPU emulator's tests (tests/kernel_emulation.rs).
//!
//! Without a CUDA device every test prints `SKIP <name>: no CUDA device` and passes; with
//! `FORA_REQUIRE_GPU=1` a missing device fails.
//!
//! Tolerances: bf16 outputs rel-L2 <= 1e-2 (the design's bound for bf16 kernels) plus an
//! element-wise bound of about one bf16 ulp; f32 outputs whose maths is the CPU's (FORA
//! reuse, unpatchify, the sampler update) are checked element by element to ~1e-6 relative.

mod small_kernel_cases;

use anyhow::Result;
use fora::cuda::testing::test_gpu;

#[test]
fn gpu_timestep_embedding() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_timestep_embedding") else {
        return Ok(());
    };
    small_kernel_cases::check_timestep_embedding(&gpu)
}

#[test]
fn gpu_vae_kernels() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_vae_kernels") else {
        return Ok(());
    };
    small_kernel_cases::check_vae_kernels(&gpu)
}

#[test]
fn gpu_silu() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_silu") else {
        return Ok(());
    };
    small_kernel_cases::check_silu(&gpu)
}

#[test]
fn gpu_gelu_epilogue() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_gelu_epilogue") else {
        return Ok(());
    };
    small_kernel_cases::check_gelu_epilogue(&gpu)
}

#[test]
fn gpu_label_silu() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_label_silu") else {
        return Ok(());
    };
    small_kernel_cases::check_label_silu(&gpu)
}

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

/// The fused proj / fc2 + residual + LayerNorm: Hopper only (wgmma, TMA, clusters of 16).
#[test]
fn gpu_gemm_layernorm() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_gemm_layernorm") else {
        return Ok(());
    };
    if gpu.compute_capability().0 != 9 {
        println!("SKIP gpu_gemm_layernorm: not a Hopper (sm_90a only)");
        return Ok(());
    }
    small_kernel_cases::check_gemm_layernorm(&gpu)
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

#[test]
fn gpu_fora_sum_final() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_fora_sum_final") else {
        return Ok(());
    };
    small_kernel_cases::check_fora_sum_final(&gpu)
}

#[test]
fn gpu_fora_cache_sum() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_fora_cache_sum") else {
        return Ok(());
    };
    small_kernel_cases::check_fora_cache_sum(&gpu)
}

#[test]
fn gpu_sampler_step() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_sampler_step") else {
        return Ok(());
    };
    small_kernel_cases::check_sampler_step(&gpu)
}

#[test]
fn gpu_final_sampler_step() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_final_sampler_step") else {
        return Ok(());
    };
    small_kernel_cases::check_final_sampler_step(&gpu)
}

#[test]
fn gpu_unpatchify() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_unpatchify") else {
        return Ok(());
    };
    small_kernel_cases::check_unpatchify(&gpu)
}

#[test]
fn gpu_normal_fill() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_normal_fill") else {
        return Ok(());
    };
    small_kernel_cases::check_normal_fill(&gpu)
}

#[test]
fn gpu_bandwidth_probes() -> Result<()> {
    let Some(gpu) = test_gpu("gpu_bandwidth_probes") else {
        return Ok(());
    };
    small_kernel_cases::check_bandwidth(&gpu)
}
