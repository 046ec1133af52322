//! `fora decode`, and the VAE decode that `sample` and `generate` share.

use crate::{ensure_finite, is_png, Device};
use anyhow::{ensure, Context, Result};
use clap::Args;
use fora::cuda::vae::CudaVae;
use fora::cuda::{CudaBackend, Gpu};
use fora::io::{write_tensors, OutTensor, TensorFile};
use fora::vae::VaeDecoder;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Args, Debug)]
pub(crate) struct DecodeArgs {
    /// The VAE decoder's weights (safetensors or a PyTorch checkpoint, in diffusers'
    /// AutoencoderKL key layout, e.g. stabilityai/sd-vae-ft-ema's
    /// diffusion_pytorch_model.safetensors or .bin, with the config.json beside it read where
    /// present; or the original Stable Diffusion one, a whole SD checkpoint included).
    #[arg(long, value_name = "VAE")]
    pub(crate) vae: PathBuf,
    /// safetensors with the latents [B, C, H, W] f32 (what `fora sample` writes).
    #[arg(long, value_name = "IN")]
    pub(crate) input: PathBuf,
    /// The tensor of --input that holds the latents.
    #[arg(long, default_value = "samples")]
    pub(crate) tensor: String,
    /// Output: `.png` (a grid of the B images) or `.safetensors` with `images` [B, 3, 8H, 8W]
    /// f32 (values about [-1, 1]).
    #[arg(long, value_name = "OUT")]
    pub(crate) out: PathBuf,
    /// Where to decode: `auto` takes the GPU (--gpu, default 0) when it is usable (bf16
    /// operands), and the CPU (f32) otherwise or where the GPU's decode fails; `cuda` fails
    /// instead.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub(crate) device: Device,
    /// CUDA device ordinal. Default 0.
    #[arg(long, value_name = "N")]
    pub(crate) gpu: Option<usize>,
}

/// A handle on the backend's GPU for a VAE decoder, or where there is none an error if
/// `strict`, else None after saying it will decode on the CPU.
pub(crate) fn vae_gpu_handle(backend: &CudaBackend, strict: bool) -> Result<Option<Gpu>> {
    match backend.gpu().fork() {
        Ok(gpu) => Ok(Some(gpu)),
        Err(e) if strict => {
            Err(e.context("a GPU handle for the VAE decoder (a run on a GPU decodes there)"))
        }
        Err(e) => {
            eprintln!("fora: no GPU handle for the VAE decoder ({e:#}); it will decode on the CPU");
            Ok(None)
        }
    }
}

/// `vae` on `gpu`, or None after saying why it stays on the CPU.
pub(crate) fn gpu_vae(gpu: Gpu, vae: &Arc<VaeDecoder>) -> Option<CudaVae> {
    match CudaVae::on_gpu(gpu, vae.clone()) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("fora: the VAE decoder cannot run on the GPU ({e:#}); decoding on the CPU");
            None
        }
    }
}

/// Decodes latents `[B, C, H, W]` with `gpu` where given, else (or where the GPU's decode
/// fails: too little memory, say, after a run's sampling; unless `strict`) `vae` on the CPU,
/// timing it on stderr where `log`; non-finite images are an error naming `out` (nothing is
/// written then).
pub(crate) fn decode_latents(
    gpu: &Option<CudaVae>,
    strict: bool,
    vae: &VaeDecoder,
    latents: &[f32],
    shape: [usize; 4],
    out: &Path,
    log: bool,
) -> Result<(Vec<f32>, [usize; 4])> {
    let start = std::time::Instant::now();
    let on_gpu = match gpu.as_ref().map(|g| g.decode(latents, shape)) {
        Some(Ok(decoded)) => Some(decoded),
        Some(Err(e)) if strict => return Err(e.context("the GPU's VAE decode")),
        Some(Err(e)) => {
            eprintln!("fora: the GPU's VAE decode failed ({e:#}); decoding on the CPU");
            None
        }
        None => None,
    };
    let where_ = if on_gpu.is_some() {
        "GPU (bf16 operands)"
    } else {
        "CPU (f32)"
    };
    let (images, image_shape) = match on_gpu {
        Some(decoded) => decoded,
        None => vae.decode(latents, shape).context("the VAE decode")?,
    };
    ensure_finite("images", &images, out)?;
    if log {
        eprintln!(
            "fora: decoded {} latent(s) {:?} into images {:?} on the {where_} in {:.2} s",
            shape[0],
            &shape[1..],
            &image_shape[1..],
            start.elapsed().as_secs_f64()
        );
    }
    Ok((images, image_shape))
}

/// `--vae`'s decoder, saying where its settings came from where the file alone does not.
pub(crate) fn load_vae(path: &Path) -> Result<Arc<VaeDecoder>> {
    let vae = VaeDecoder::load(path).context("--vae")?;
    if vae.source_is_chosen() {
        eprintln!("fora: --vae {}: {}", path.display(), vae.source());
    }
    Ok(Arc::new(vae))
}

pub(crate) fn decode(args: DecodeArgs) -> Result<()> {
    fora::io::check_output_path("--out", &args.out, &["safetensors", "png"])?;
    ensure!(
        !(args.device == Device::Cpu && args.gpu.is_some()),
        "--gpu chooses a GPU; --device cpu uses none"
    );
    let vae = load_vae(&args.vae)?;
    let file = TensorFile::open(&args.input).context("--input")?;
    let latents = file.f32(&args.tensor, 4).context("--input")?;
    let shape: [usize; 4] = latents
        .shape
        .clone()
        .try_into()
        .expect("rank checked above");
    // Latents this decoder cannot take, and images a PNG cannot hold, are refused before a
    // GPU is set up.
    let [_, channels, _, _] = vae.image_shape(shape).context("--input")?;
    ensure!(
        !is_png(&args.out) || channels == 1 || channels == 3,
        "--out {}: this decoder makes images of {channels} channels; a PNG here is gray (1) \
         or RGB (3): write .safetensors",
        args.out.display()
    );
    let ordinal = args.gpu.unwrap_or(0);
    let gpu = match args.device {
        Device::Cpu => None,
        Device::Cuda => {
            let gpu = Gpu::new(ordinal).context("--device cuda")?;
            Some(CudaVae::on_gpu(gpu, vae.clone()).context("--device cuda")?)
        }
        Device::Auto => match Gpu::new(ordinal) {
            Ok(gpu) => gpu_vae(gpu, &vae),
            Err(e) => {
                eprintln!("fora: no usable GPU ({e:#}); decoding on the CPU");
                None
            }
        },
    };
    let strict = args.device == Device::Cuda;
    let decoded = decode_latents(&gpu, strict, &vae, &latents.data, shape, &args.out, true);
    let (images, shape) = if strict {
        decoded.context("--device cuda")?
    } else {
        decoded?
    };
    if is_png(&args.out) {
        let columns = fora::png_out::default_columns(shape[0]);
        fora::png_out::write_png_grid(&args.out, &images, shape, columns)?;
    } else {
        write_tensors(
            &args.out,
            &[("images", OutTensor::F32(&shape, &images))],
            None,
        )?;
    }
    eprintln!("fora: -> {}", args.out.display());
    Ok(())
}
