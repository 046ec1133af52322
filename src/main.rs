//! The `fora` command line: `fora forward`, `fora sample`, `fora generate`, `fora merge`,
//! `fora unpack`, `fora decode`, `fora info`, `fora bench`.
//!
//! Every bad input ends in a clear message on stderr and a non-zero exit; outputs are written
//! whole or not at all (temporary file + rename, see `fora::io`).
//!
//! Here: the command list, the flags the commands share (the model and where it runs), and
//! [`run_on`], which loads the model and runs a [`Job`] on the backend it picks. Each command
//! is a module of `cli/`; `fora bench` is the library's `fora::bench`.

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cli::decode::DecodeArgs;
use cli::forward::ForwardArgs;
use cli::generate::{GenerateArgs, Stopped};
use cli::merge::MergeArgs;
use cli::sample::SampleArgs;
use fora::backend::{Backend, Guidance, GuidanceMode};
use fora::config::{Arch, DitConfig};
use fora::cpu::CpuBackend;
use fora::cuda::{CudaBackend, CudaOptions, Gpu};
use fora::weights::DitWeights;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod cli;

#[derive(Parser, Debug)]
#[command(
    name = "fora",
    version,
    about = "DiT (Diffusion Transformer) inference with FORA step caching"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One model forward on given tensors (x, t, y); writes `out` (and `out_cfg` with --cfg-scale).
    Forward(ForwardArgs),
    /// Samples latents for the given classes; writes `samples` [B, C, H, W] f32, or a PNG.
    Sample(SampleArgs),
    /// Many images of random classes in batches, for an evaluation such as FID: writes an .npz
    /// with `arr_0` [N, H, W, C] uint8 and `labels` [N] int64 (as the official sample_ddp.py).
    Generate(GenerateArgs),
    /// Joins the shards of a `fora generate --shard I/N` run into the whole run's .npz.
    Merge(MergeArgs),
    /// Writes the images of an .npz (`fora generate`'s) as a folder of PNGs named as the official
    /// sample_ddp.py names them (000000.png, ...), for FID tools that read folders.
    Unpack(cli::unpack::UnpackArgs),
    /// Decodes latents (the `samples` of `fora sample` with a latent model) into images with
    /// the Stable Diffusion VAE's decoder, on a GPU or the CPU.
    Decode(DecodeArgs),
    /// The build (kernels compiled or not, for which GPU architectures) and the GPUs seen;
    /// with --model or --vae, what those files hold (checked as the other commands read them).
    Info(cli::info::InfoArgs),
    /// Benchmarks on the GPU: kernels vs cuBLASLt and the card's ceilings, computing and reuse
    /// steps per batch, end-to-end FORA runs (random-weight DiT-XL/2 unless --model).
    Bench(fora::bench::BenchArgs),
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    /// The CUDA device (--gpu, default 0) when it is usable (driver, compute capability >= 8.0,
    /// kernels in this binary), else the CPU.
    Auto,
    /// The f32 CPU reference.
    Cpu,
    /// The CUDA backend on the device --gpu names (default 0; an error when it is not usable).
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CfgMode {
    /// Guide eps channels 0..2 only, as the official DiT code.
    Official,
    /// Guide all eps channels.
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SamplerChoice {
    Ddpm,
    Ddim,
}

#[derive(Args, Clone, Debug)]
struct ModelArgs {
    /// Checkpoint in the official DiT key layout (f32, f16 or bf16): safetensors, or a PyTorch
    /// checkpoint (.pt, .pth: the official release's DiT-XL-2-256x256.pt as downloaded, with
    /// --arch; a training checkpoint's "ema"). Default: the embedded tiny digits model
    /// (models/tiny.safetensors).
    #[arg(long, value_name = "CKPT")]
    model: Option<PathBuf>,
    /// Architecture (`DiT-XL/2`, or `depth=..,hidden=..,heads=..,patch=..`) when the checkpoint's
    /// metadata does not record it.
    #[arg(long)]
    arch: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// CUDA device ordinal (as the driver numbers them, after CUDA_VISIBLE_DEVICES). Default 0.
    #[arg(long, value_name = "N")]
    gpu: Option<usize>,
    /// GEMM kernels on a GPU: cublaslt, custom, wgmma, tma or tma_mc. Default: $FORA_GEMM, else
    /// cublaslt.
    #[arg(long, value_name = "IMPL")]
    gemm: Option<String>,
    /// Attention kernels on a GPU: auto, v1, v2, wgmma, wgmma_mn, wgmma_mn_deep,
    /// wgmma_mn_split, tma or tma_pp. Default: $FORA_ATTENTION, else auto (wgmma_mn on a Hopper, v1
    /// elsewhere).
    #[arg(long, value_name = "IMPL")]
    attention: Option<String>,
}

impl ModelArgs {
    /// The CUDA backend's options: the environment's (`FORA_*`), with --gemm and --attention
    /// over them; None with --device cpu (which refuses them, and reads no `FORA_*`).
    fn cuda_options(&self) -> Result<Option<CudaOptions>> {
        if self.device == Device::Cpu {
            ensure!(
                self.gemm.is_none() && self.attention.is_none() && self.gpu.is_none(),
                "--gpu, --gemm and --attention choose a GPU and its kernels; --device cpu uses none"
            );
            return Ok(None);
        }
        let mut options = CudaOptions::from_env()?;
        if let Some(gemm) = &self.gemm {
            options.gemm = gemm.parse().context("--gemm")?;
        }
        if let Some(attention) = &self.attention {
            options.attention = attention.parse().context("--attention")?;
        }
        Ok(Some(options))
    }
}

/// Refuses a `RAYON_NUM_THREADS` far past the machine's cores before rayon spawns them: tens of
/// thousands of threads make a one-step run take minutes or never end.
fn check_rayon_threads() -> Result<()> {
    let Ok(v) = std::env::var("RAYON_NUM_THREADS") else {
        return Ok(());
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = (8 * cores).max(64);
    if let Ok(n) = v.trim().parse::<usize>() {
        ensure!(
            n <= most,
            "RAYON_NUM_THREADS={n}: more CPU threads than this machine can use ({cores} cores); \
             use at most {most}, or 0 for one a core"
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = check_rayon_threads().and_then(|()| match cli.command {
        Command::Forward(args) => cli::forward::forward(args),
        Command::Sample(args) => cli::sample::sample(args),
        Command::Generate(args) => cli::generate::generate(args),
        Command::Merge(args) => cli::merge::merge(args),
        Command::Unpack(args) => cli::unpack::unpack(args),
        Command::Decode(args) => cli::decode::decode(args),
        Command::Info(args) => cli::info::info(args),
        Command::Bench(args) => fora::bench::run(&args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<Stopped>() {
                Some(stopped) => ExitCode::from((128 + stopped.signal).clamp(0, 255) as u8),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Work that runs on any backend; [`run_on`] picks the backend (monomorphised per backend, so
/// the sampler loop stays static).
trait Job {
    /// Work on the CUDA backend before [`Job::run`] (tuning its options); none by default.
    fn prepare_cuda(&self, _backend: &mut CudaBackend) -> Result<()> {
        Ok(())
    }
    /// What the job cannot do on the CPU backend, said when `auto` falls back to it.
    fn cpu_note(&self) -> Option<&'static str> {
        None
    }
    /// Checks of the job against the model, before any backend is set up (and so before any
    /// tuning); none by default.
    fn check(&self, _cfg: &DitConfig, _weights: &DitWeights) -> Result<()> {
        Ok(())
    }
    fn run<B: Backend>(self, backend: &B) -> Result<()>;
}

/// An error where `data` (output tensor `name`) holds a value that is not finite: nothing is
/// written to `out` then (inputs so large that f32 overflows, or a broken model).
fn ensure_finite(name: &str, data: &[f32], out: &Path) -> Result<()> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let count = data.iter().filter(|v| !v.is_finite()).count();
        bail!(
            "{name} holds {count} non-finite values of {} (the first at flat index {i}: {}); \
             nothing written to {} (inputs this large overflow f32, or the model is broken)",
            data.len(),
            data[i],
            out.display()
        );
    }
    Ok(())
}

/// Loads the model and runs `job` on the chosen device: `cuda` fails with the reason when no
/// usable GPU is there; `auto` takes the GPU when it can and otherwise says it runs on the CPU.
fn run_on<J: Job>(model: &ModelArgs, job: J) -> Result<()> {
    let options = model.cuda_options()?.unwrap_or_default();
    let (cfg, weights) = load_model(model)?;
    job.check(&cfg, &weights)?;
    match model.device {
        Device::Cpu => job.run(&CpuBackend::new(cfg, weights)?),
        Device::Cuda => {
            let gpu = Gpu::new(model.gpu.unwrap_or(0)).context("--device cuda")?;
            let mut cuda = CudaBackend::with_options(gpu, &cfg, &weights, options)?;
            job.prepare_cuda(&mut cuda)?;
            job.run(&cuda)
        }
        Device::Auto => match Gpu::new(model.gpu.unwrap_or(0))
            .and_then(|gpu| CudaBackend::with_options(gpu, &cfg, &weights, options))
        {
            Ok(mut cuda) => {
                job.prepare_cuda(&mut cuda)?;
                job.run(&cuda)
            }
            Err(e) => {
                eprintln!("fora: the CUDA backend is not usable here ({e:#}); running on the CPU");
                if let Some(note) = job.cpu_note() {
                    eprintln!("fora: {note}");
                }
                job.run(&CpuBackend::new(cfg, weights)?)
            }
        },
    }
}

fn load_model(model: &ModelArgs) -> Result<(DitConfig, DitWeights)> {
    let arch = model.arch.as_deref().map(Arch::parse).transpose()?;
    let Some(path) = &model.model else {
        ensure!(
            arch.is_none(),
            "--arch describes a --model checkpoint; without --model the embedded model is used"
        );
        eprintln!(
            "fora: no --model: using the {}",
            fora::embedded::DEFAULT_MODEL_DESCRIPTION
        );
        return fora::embedded::default_model();
    };
    let (cfg, weights, format) = DitWeights::load_with_format(path, arch.as_ref())?;
    if format.choice.is_some() {
        eprintln!("fora: --model {}: {format}", path.display());
    }
    Ok((cfg, weights))
}

/// Whether `out` names a PNG file (any case of `.png`).
fn is_png(out: &Path) -> bool {
    out.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

fn guidance(scale: Option<f32>, mode: CfgMode) -> Result<Option<Guidance>> {
    let Some(scale) = scale else { return Ok(None) };
    ensure!(
        scale.is_finite(),
        "--cfg-scale must be a finite number, got {scale}"
    );
    let mode = match mode {
        CfgMode::Official => GuidanceMode::Official3,
        CfgMode::All => GuidanceMode::AllEps,
    };
    Ok(Some(Guidance { scale, mode }))
}
