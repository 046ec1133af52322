//! `fora info`: the build, the CUDA options in effect, the GPUs seen; and, given files, what a
//! DiT checkpoint and a VAE decoder hold, checked as the other commands read them.

use anyhow::{Context, Result};
use clap::Args;
use fora::config::{Arch, DitConfig};
use fora::cuda::{CudaOptions, Gpu};
use fora::vae::VaeDecoder;
use fora::weights::DitWeights;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub(crate) struct InfoArgs {
    /// A DiT checkpoint (safetensors or PyTorch) to describe: its format, architecture, data
    /// shape and parameters, after the checks `fora sample` makes (an error if it fails them).
    #[arg(long, value_name = "CKPT")]
    model: Option<PathBuf>,
    /// The checkpoint's architecture where its metadata does not record it (as `fora sample`).
    #[arg(long, requires = "model")]
    arch: Option<String>,
    /// A VAE decoder's weights to describe, as `fora sample --vae` reads them.
    #[arg(long, value_name = "VAE")]
    vae: Option<PathBuf>,
}

pub(crate) fn info(args: InfoArgs) -> Result<()> {
    // The files first: a bad one ends the command before the rest is printed.
    let mut files = Vec::new();
    if let Some(path) = &args.model {
        let arch = args.arch.as_deref().map(Arch::parse).transpose()?;
        files.push(describe_model(path, arch.as_ref())?);
    }
    if let Some(path) = &args.vae {
        files.push(describe_vae(path)?);
    }
    build_info()?;
    for line in files {
        println!("{line}");
    }
    Ok(())
}

/// "model: PATH: FORMAT; ARCH (...), data shape, parameters", once the checkpoint has loaded.
fn describe_model(path: &Path, arch: Option<&Arch>) -> Result<String> {
    let (cfg, weights, format) = DitWeights::load_with_format(path, arch)?;
    let parameters: usize = weights.named(&cfg)?.iter().map(|t| t.2.len()).sum();
    Ok(format!(
        "model: {}: {format}; {} (depth {}, hidden {}, {} heads, patch {}), input {} x {} x {} \
         ({} tokens), {} classes, {}; {:.2} M parameters",
        path.display(),
        cfg.arch_name(),
        cfg.depth,
        cfg.hidden,
        cfg.heads,
        cfg.patch,
        cfg.in_channels,
        cfg.input_size,
        cfg.input_size,
        cfg.tokens(),
        cfg.num_classes,
        if cfg.learn_sigma {
            "learn_sigma"
        } else {
            "no learn_sigma"
        },
        parameters as f64 / 1e6
    ))
}

/// "vae: PATH: FORMAT; the decoder's shape and settings", once the decoder has loaded.
fn describe_vae(path: &Path) -> Result<String> {
    let vae = VaeDecoder::load(path)?;
    let c = vae.config();
    Ok(format!(
        "vae: {}: {}; {} latent channels to {} image channels, {}x upscale, up blocks \
         {:?} of {} resnets, {} GroupNorm groups, mid attention {}, scaling factor {}",
        path.display(),
        vae.source(),
        c.latent_channels,
        c.out_channels,
        c.upscale(),
        c.block_channels,
        c.resnets_per_block,
        c.groups,
        if c.mid_attention { "yes" } else { "no" },
        c.scaling_factor
    ))
}

/// The build, the CUDA backend and options, the tuner's candidates and the GPUs.
fn build_info() -> Result<()> {
    println!("fora {}", env!("CARGO_PKG_VERSION"));
    println!(
        "cpu backend: f32 reference, {} threads",
        rayon::current_num_threads()
    );
    let meta = fora::embedded::default_model_metadata()?;
    let field = |k: &str| meta.get(k).map_or("?", String::as_str);
    println!(
        "default model: {} ({}, trained {} steps on {})",
        fora::embedded::DEFAULT_MODEL_DESCRIPTION,
        field("fora.arch"),
        field("fora.train.steps"),
        field("fora.train.device"),
    );
    if fora::cuda::kernels::available() {
        let modules: Vec<&str> = fora::cuda::kernels::MODULES.iter().map(|m| m.0).collect();
        println!(
            "cuda kernels: compiled by {} for {} ({} modules: {})",
            fora::cuda::kernels::NVCC_VERSION,
            fora::cuda::kernels::ARCHS.join(", "),
            modules.len(),
            modules.join(", ")
        );
    } else {
        println!(
            "cuda kernels: not compiled into this binary ({})",
            fora::cuda::kernels::MISSING_REASON
        );
    }
    let gpu = Gpu::new(0);
    match &gpu {
        Ok(gpu) => println!(
            "cuda backend: usable on device 0, {} (sm_{}{}, {} SMs)",
            gpu.name(),
            gpu.compute_capability().0,
            gpu.compute_capability().1,
            gpu.sm_count()
        ),
        Err(e) => println!("cuda backend: not usable here ({e:#}); --device auto runs on the CPU"),
    }
    match CudaOptions::from_env() {
        Ok(o) => {
            let overrides = o.env_overrides();
            let resolved = match &gpu {
                Ok(gpu) => format!(
                    " ({} on device 0)",
                    o.attention.resolve(gpu.compute_capability().0).name()
                ),
                Err(_) => String::new(),
            };
            println!(
                "cuda options: gemm {}, attention {}{resolved}; from the environment: {}",
                o.gemm.name(),
                o.attention.name(),
                if overrides.is_empty() {
                    "nothing (the defaults)".to_string()
                } else {
                    overrides.join(" ")
                }
            );
        }
        Err(e) => println!("cuda options: {e:#}"),
    }
    // What `--tune` would try (FORA_TUNE_CANDIDATES, else the built-in list, less FORA_TUNE_SKIP).
    match fora::cuda::tune::candidates_from_env() {
        Ok(list) => println!(
            "tune candidates: {}",
            list.iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(e) => println!("tune candidates: {e:#}"),
    }
    if let Ok(gpu) = &gpu {
        if gpu.compute_capability().0 == 9 && fora::cuda::kernels::available() {
            for line in hopper_fusion_lines(gpu) {
                println!("{line}");
            }
        }
    }
    match gpus_seen() {
        Ok(gpus) if gpus.is_empty() => println!("gpus: none seen"),
        Ok(gpus) => {
            for g in gpus {
                println!("gpu: {g}");
            }
        }
        Err(e) => println!("gpus: cannot query the CUDA driver: {e:#}"),
    }
    Ok(())
}

/// On a Hopper: the clusters of each fused block kernel the driver holds at once on `gpu` (the
/// residency checks the model makes before it takes one), and what DiT-XL/2 would take at one
/// image + CFG (2 rows) and at 128 images + CFG (256 rows) with the fusions enabled.
pub(crate) fn hopper_fusion_lines(gpu: &Gpu) -> Vec<String> {
    use fora::cuda::gemm_ln::GemmLnTile;
    use fora::cuda::model::GpuModel;
    use fora::cuda::qkv_attention::QkvAttention;
    let cfg = DitConfig::official("DiT-XL/2", 32).expect("DiT-XL/2 is an official model");
    let token_rows = |rows: usize| rows * cfg.tokens();
    let tiles: Vec<String> = GemmLnTile::ALL
        .into_iter()
        .map(|t| {
            format!(
                "{} {} (one CTA an SM: {})",
                t.kernel_name(true),
                t.resident_clusters(gpu, true, false),
                t.resident_clusters(gpu, true, true)
            )
        })
        .collect();
    let gemm_ln = |rows: usize, wide: bool| {
        GemmLnTile::for_rows(gpu, cfg.hidden, token_rows(rows), wide)
            .map_or("none".to_string(), |t| t.kernel_name(true).to_string())
    };
    vec![
        format!(
            "hopper fusions: clusters resident at once: {}; qkv_attention_mc_d{} {} (2 rows \
             need {} and {})",
            tiles.join(", "),
            cfg.head_dim(),
            QkvAttention::resident_clusters(gpu, cfg.head_dim(), true),
            GemmLnTile::Rows64.clusters_for(token_rows(2)),
            2 * cfg.heads
        ),
        format!(
            "hopper fusions for DiT-XL/2 when enabled: 2 rows: gemm_ln {}, qkv + attention {}; \
             256 rows: gemm_ln {} (wide: {})",
            gemm_ln(2, false),
            if GpuModel::qkv_attention_serves(gpu, &cfg, 2) {
                "yes"
            } else {
                "no"
            },
            gemm_ln(256, false),
            gemm_ln(256, true)
        ),
    ]
}

/// The GPUs the CUDA driver reports, as "index: name (sm_XY)". Never panics without a driver.
pub(crate) fn gpus_seen() -> Result<Vec<String>> {
    let count = fora::cuda::device::device_count()?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let ctx = cudarc::driver::CudaContext::new(i)
            .with_context(|| format!("cannot open device {i}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let (major, minor) = ctx
            .compute_capability()
            .with_context(|| format!("device {i}: compute capability"))?;
        out.push(format!("{i}: {name} (sm_{major}{minor})"));
    }
    Ok(out)
}
