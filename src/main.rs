//! The `fora` command line: `fora forward`, `fora sample`, `fora generate`, `fora decode`,
//! `fora info`, `fora bench`.
//!
//! Every bad input ends in a clear message on stderr and a non-zero exit; outputs are written
//! whole or not at all (temporary file + rename, see `fora::io`).

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fora::backend::{Backend, Guidance, GuidanceMode, NoiseSource};
use fora::cache::policy_for_interval;
use fora::config::{Arch, DitConfig};
use fora::cpu::CpuBackend;
use fora::cuda::tune::{TuneCache, TuneCandidate, TuneKey, TuneSettings};
use fora::cuda::vae::CudaVae;
use fora::cuda::{CudaBackend, CudaOptions, Gpu};
use fora::diffusion::SamplerKind;
use fora::io::{write_tensors, OutTensor, TensorFile};
use fora::npz::{NpyDtype, NpzWriter};
use fora::sampler::{Sampler, SamplerOptions, Samples, StepEvent};
use fora::vae::VaeDecoder;
use fora::weights::DitWeights;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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
    /// Decodes latents (the `samples` of `fora sample` with a latent model) into images with
    /// the Stable Diffusion VAE's decoder, on a GPU or the CPU.
    Decode(DecodeArgs),
    /// The build (kernels compiled or not, for which GPU architectures) and the GPUs seen.
    Info,
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
    /// Checkpoint (safetensors, official DiT key layout; f32, f16 or bf16). Default: the
    /// embedded tiny digits model (models/tiny.safetensors).
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

#[derive(Args, Debug)]
struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// safetensors with `x` [N, C, H, W] f32, `t` [N] int64 (0..999), `y` [N] int64
    /// (num_classes = the null class).
    #[arg(long, value_name = "IN")]
    input: PathBuf,
    /// Output safetensors: `out` [N, out_ch, H, W] f32 (+ `out_cfg` with --cfg-scale).
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
    /// Also run forward_with_cfg at this scale (N even; the first half are the conditional rows).
    #[arg(long, allow_hyphen_values = true)]
    cfg_scale: Option<f32>,
    /// Which channels guidance combines.
    #[arg(long, value_enum, default_value_t = CfgMode::Official, requires = "cfg_scale")]
    cfg_mode: CfgMode,
}

/// How images are sampled: steps, reverse process, guidance, FORA (`sample` and `generate`).
#[derive(Args, Debug)]
struct SamplingArgs {
    /// Sampling steps (respacing of the 1000-step process at the official fractional stride).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..=1000))]
    steps: u64,
    /// Explicit official respacing string instead of --steps (`250`, `ddim50`, `10,20,30`).
    #[arg(long, conflicts_with = "steps")]
    respacing: Option<String>,
    /// Reverse process.
    #[arg(long, value_enum, default_value_t = SamplerChoice::Ddpm)]
    sampler: SamplerChoice,
    /// DDIM eta >= 0 (0 = deterministic, 1 = DDPM's variance; past 1 only as far as the
    /// schedule allows, the error says); DDIM only.
    #[arg(long, allow_hyphen_values = true)]
    eta: Option<f64>,
    /// Classifier-free guidance scale; absent or 1.0 means no guidance (batch B), otherwise the
    /// model runs on 2B rows.
    #[arg(long, allow_hyphen_values = true)]
    cfg_scale: Option<f32>,
    /// Which channels guidance combines [default: official]. Needs guidance: a --cfg-scale,
    /// or the embedded model (guided at 4 unless told otherwise).
    #[arg(long, value_enum)]
    cfg_mode: Option<CfgMode>,
    /// FORA static cache interval N: compute when i == S-1 or i % N == 0 (1 = no caching).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    cache_interval: u64,
}

impl SamplingArgs {
    /// The sampler's options; `embedded`: no --model (the embedded model guides at 4 unless
    /// told otherwise). Bad respacing, eta or scale are refused before a checkpoint loads.
    fn sampler_options(&self, embedded: bool) -> Result<SamplerOptions> {
        let kind = match (self.sampler, self.eta) {
            (SamplerChoice::Ddpm, None) => SamplerKind::Ddpm,
            (SamplerChoice::Ddpm, Some(_)) => bail!("--eta applies to --sampler ddim only"),
            (SamplerChoice::Ddim, eta) => {
                let eta = eta.unwrap_or(0.0);
                ensure!(
                    eta.is_finite() && eta >= 0.0,
                    "--eta must be a finite number >= 0, got {eta:e}"
                );
                SamplerKind::Ddim { eta }
            }
        };
        // The embedded model is measured with guidance 4 (tools/quality.py): its default.
        let cfg_scale = match (embedded, self.cfg_scale) {
            (true, None) => Some(fora::embedded::DEFAULT_CFG_SCALE),
            (_, s) => s,
        };
        ensure!(
            cfg_scale.is_some() || self.cfg_mode.is_none(),
            "--cfg-mode needs guidance: give --cfg-scale (only the embedded model guides by \
             default)"
        );
        // Scale 1.0 is the unguided model exactly; run it on B rows, not 2B.
        let scale = cfg_scale.filter(|&s| s != 1.0);
        let options = SamplerOptions {
            respacing: self
                .respacing
                .clone()
                .unwrap_or_else(|| self.steps.to_string()),
            kind,
            guidance: guidance(scale, self.cfg_mode.unwrap_or(CfgMode::Official))?,
        };
        options.validate()?;
        Ok(options)
    }
}

/// What --tune / --tune-cache asked for, read before the model loads.
struct Tuning {
    candidates: Vec<TuneCandidate>,
    cache: Option<std::cell::RefCell<TuneCache>>,
}

impl TuneArgs {
    /// The tuning asked for, or None; refused with --device cpu.
    fn tuning(&self, device: Device) -> Result<Option<Tuning>> {
        let tune = self.tune || self.tune_cache.is_some();
        if !tune {
            return Ok(None);
        }
        ensure!(
            device != Device::Cpu,
            "--tune and --tune-cache try the GPU's execution paths; --device cpu has none"
        );
        let candidates = fora::cuda::tune::candidates_from_env()?;
        let cache = match &self.tune_cache {
            Some(path) => {
                let cache = TuneCache::open(path).context("--tune-cache")?;
                // A tuning of minutes whose choice could not be stored would be lost: where no
                // choice can be found (a new cache) that is said now, else before a tuning (a
                // read-only cache that holds the run's choice is only read).
                if cache.is_empty() {
                    fora::io::check_writable("--tune-cache", path)?;
                }
                Some(std::cell::RefCell::new(cache))
            }
            None => None,
        };
        Ok(Some(Tuning { candidates, cache }))
    }
}

/// The CPU backend's note for a run asked to tune.
const UNTUNED_ON_CPU: &str = "--tune tries the GPU's execution paths; the CPU backend runs untuned";

impl Tuning {
    /// Tunes `backend` on a run of `options` sampling `classes` (seed `seed`, FORA interval
    /// `interval`), or takes the cached choice, and sets the chosen options on it.
    fn apply(
        &self,
        backend: &mut CudaBackend,
        options: &SamplerOptions,
        classes: &[usize],
        seed: u64,
        interval: usize,
    ) -> Result<()> {
        let candidates = &self.candidates;
        // A candidate whose launch never ends ends the process, named, instead of hanging it.
        let settings = TuneSettings {
            watchdog: Some(fora::bench::DEFAULT_WATCHDOG),
            ..TuneSettings::default()
        };
        let (plan, schedule) = {
            let sampler = Sampler::new(&*backend, options.clone())?;
            // The tuning's own run: the seed's noise (a noise file is read once, by the run
            // itself; what is timed and compared does not depend on the noise values).
            let mut plan = sampler.plan(classes, NoiseSource::Seed(seed))?;
            let mut policy = policy_for_interval(interval)?;
            let schedule = sampler.schedule(policy.as_mut());
            // As the run itself (Sampler::sample): without reuse steps the tuning's workspaces
            // leave the FORA cache out too, so that they time what the run will run.
            plan.set_reuses_from(&schedule);
            (plan, schedule)
        };
        // The cache and this run's key in it (a hash of the kernels: only where a cache is
        // read and written), and the cached choice if there is one.
        let cache = self.cache.as_ref().map(|c| {
            let key = TuneKey::for_run(backend, &plan, &schedule, candidates, &settings);
            (c, key)
        });
        let hit = cache.as_ref().and_then(|(c, key)| {
            let choice = c.borrow().lookup(key).cloned()?;
            Some((c.borrow().path().display().to_string(), choice))
        });
        let name = match hit {
            Some((path, choice)) => {
                let options = backend
                    .options()
                    .with_settings(&choice.settings)
                    .with_context(|| format!("the cached choice {:?}", choice.name))?;
                backend.set_options(options);
                eprintln!(
                    "fora: tuned options from {path} (measured {}{})",
                    choice.date,
                    choice
                        .speedup
                        .map_or(String::new(), |s| format!(", {s:.3}x the given options"))
                );
                choice.name
            }
            None => {
                // (A new cache was checked when it was opened.)
                if let Some((cache, _)) = cache.as_ref().filter(|(c, _)| !c.borrow().is_empty()) {
                    fora::io::check_writable("--tune-cache", cache.borrow().path())?;
                }
                let tuning =
                    fora::cuda::tune::tune(backend, &plan, &schedule, candidates, &settings)?;
                eprintln!("{}", tuning.markdown());
                if let Some((cache, key)) = cache {
                    // A tuning cut short by a time budget never saw every candidate: its
                    // choice is not stored as if it had (`Tuning::cached_choice`).
                    match tuning.cached_choice() {
                        Some(choice) => cache.borrow_mut().store(key, choice)?,
                        None => eprintln!(
                            "fora: the tuning was cut short by its time budget: not stored in {}",
                            cache.borrow().path().display()
                        ),
                    }
                }
                tuning.chosen().name.clone()
            }
        };
        eprintln!(
            "fora: sampling with {name} ({})",
            match backend.options().env_overrides().join(" ") {
                o if o.is_empty() => "the default options".to_string(),
                o => o,
            }
        );
        Ok(())
    }
}

#[derive(Args, Debug)]
struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Class id of an image to sample (repeat for a batch).
    #[arg(long = "class", value_name = "ID", required = true)]
    classes: Vec<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Seed of the project's Philox noise (x_T: stream 0, step k: stream k+1).
    #[arg(long, conflicts_with = "noise_file")]
    seed: Option<u64>,
    /// safetensors with `x_T` [B, C, H, W] f32 and `noise` [S, B, C, H, W] f32.
    #[arg(long, value_name = "NOISE")]
    noise_file: Option<PathBuf>,
    /// Output: `.safetensors` with `samples` [B, C, H, W] f32 (and `images` with --vae), or
    /// `.png` (a grid of the B images: pixel-space models with 1 or 3 channels, or a latent
    /// model with --vae).
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
    /// For a latent model (DiT-XL/2 and the other official checkpoints): the VAE decoder's
    /// weights (safetensors in diffusers' AutoencoderKL key layout, e.g.
    /// stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors, or the original Stable
    /// Diffusion one, a whole SD checkpoint included). The samples are decoded into images
    /// after sampling, as the official sample.py does: on the model's GPU (bf16 operands)
    /// where it runs on one, else on the CPU (f32).
    #[arg(long, value_name = "VAE")]
    vae: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    tuning: TuneArgs,
}

/// Tuning the GPU's execution paths before a run (`sample` and `generate`).
#[derive(Args, Debug)]
struct TuneArgs {
    /// On a GPU: before sampling, try the backend's execution paths on this run's own plan and
    /// schedule (each checked against the options as given, then timed) and sample with the
    /// fastest; prints the table to stderr. Candidates: $FORA_TUNE_CANDIDATES
    /// (`name:FORA_X=1 FORA_Y=1;...`), else the built-in list, less the names in
    /// $FORA_TUNE_SKIP (`name,name`). The bits may differ from an untuned run's, within the
    /// forward's tolerance. A candidate whose measurement takes over 300 s, and over ten times
    /// the options as given, is taken for a launch that never ends: the run stops (exit status
    /// 3) with a line naming it, to leave out with $FORA_TUNE_SKIP.
    #[arg(long)]
    tune: bool,
    /// With --tune (implied): a JSON file of earlier tunings' choices. A run whose card,
    /// kernels, model, rows, schedule, options, candidates and tuning settings are all in it
    /// takes the cached choice without measuring; another tunes and adds its choice. Created if
    /// absent; a file that is not such a cache is an error.
    #[arg(long, value_name = "FILE")]
    tune_cache: Option<PathBuf>,
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
        Command::Forward(args) => forward(args),
        Command::Sample(args) => sample(args),
        Command::Generate(args) => generate(args),
        Command::Decode(args) => decode(args),
        Command::Info => info(),
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
    /// Checks of the job against the model's config, before any backend is set up (and so
    /// before any tuning); none by default.
    fn check(&self, _cfg: &DitConfig) -> Result<()> {
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
    job.check(&cfg)?;
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
    DitWeights::load(path, arch.as_ref())
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

// ---------------------------------------------------------------------------------------------
// fora forward

struct ForwardJob {
    input: PathBuf,
    out: PathBuf,
    guidance: Option<Guidance>,
}

fn forward(args: ForwardArgs) -> Result<()> {
    fora::io::check_output_path("--out", &args.out, &["safetensors"])?;
    let job = ForwardJob {
        input: args.input,
        out: args.out,
        guidance: guidance(args.cfg_scale, args.cfg_mode)?,
    };
    run_on(&args.model, job)
}

impl Job for ForwardJob {
    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let cfg = backend.config();
        let file = TensorFile::open(&self.input).context("--input")?;
        let x = file.f32("x", 4)?;
        let t = file.i64("t", 1)?;
        let y = file.i64("y", 1)?;
        let n = x.shape[0];
        let (c, s) = (cfg.in_channels, cfg.input_size);
        ensure!(
            x.shape[1..] == [c, s, s],
            "{}: x has shape {:?}, the model expects [N, {c}, {s}, {s}]",
            self.input.display(),
            x.shape
        );
        ensure!(n > 0, "{}: x holds no rows (N = 0)", self.input.display());
        ensure!(
            t.shape == [n] && y.shape == [n],
            "{}: t {:?} and y {:?} must both be [N] = [{n}] to match x",
            self.input.display(),
            t.shape,
            y.shape
        );
        if let Some((j, &v)) = t
            .data
            .iter()
            .enumerate()
            .find(|(_, &v)| !(0..1000).contains(&v))
        {
            bail!(
                "{}: t[{j}] = {v} is outside the timesteps 0..999",
                self.input.display()
            );
        }
        let null = cfg.null_class() as i64;
        if let Some((j, &v)) = y
            .data
            .iter()
            .enumerate()
            .find(|(_, &v)| !(0..=null).contains(&v))
        {
            bail!(
                "{}: y[{j}] = {v} is outside the labels 0..={null} ({null} = the null class)",
                self.input.display()
            );
        }
        let labels: Vec<usize> = y.data.iter().map(|&v| v as usize).collect();
        if self.guidance.is_some() {
            ensure!(
                n % 2 == 0,
                "--cfg-scale: forward_with_cfg needs an even N (conditional rows, then unconditional), got N = {n}"
            );
        }
        let out = backend.forward(&x.data, &t.data, &labels, None)?;
        let out_shape = [n, cfg.out_channels(), s, s];
        let out_cfg = match self.guidance {
            Some(g) => Some(backend.forward(&x.data, &t.data, &labels, Some(g))?),
            None => None,
        };
        ensure_finite("out", &out, &self.out)?;
        if let Some(o) = &out_cfg {
            ensure_finite("out_cfg", o, &self.out)?;
        }
        let mut tensors = vec![("out", OutTensor::F32(&out_shape, &out))];
        if let Some(o) = &out_cfg {
            tensors.push(("out_cfg", OutTensor::F32(&out_shape, o)));
        }
        let mut meta = cfg.to_metadata();
        if let Some(g) = self.guidance {
            meta.insert("fora.cfg_scale".into(), g.scale.to_string());
            meta.insert("fora.cfg_mode".into(), format!("{:?}", g.mode));
        }
        write_tensors(&self.out, &tensors, Some(meta))?;
        eprintln!(
            "fora: forward of {n} rows on {} -> {}",
            backend.name(),
            self.out.display()
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// fora sample

/// What `sample` and `generate` read and check before the model loads: a bad setting, tuning
/// cache or VAE file is refused before minutes of loading and sampling, not after.
struct RunSetup {
    options: SamplerOptions,
    /// With --tune: the candidates and the cache.
    tuning: Option<Tuning>,
    /// With --vae: the decoder.
    vae: Option<Arc<VaeDecoder>>,
    /// With --vae on the CUDA backend: a handle on its GPU (`prepare_cuda`).
    vae_gpu: std::cell::RefCell<Option<Gpu>>,
}

impl RunSetup {
    fn read(
        model: &ModelArgs,
        sampling: &SamplingArgs,
        tuning: &TuneArgs,
        vae: Option<&Path>,
    ) -> Result<RunSetup> {
        Ok(RunSetup {
            options: sampling.sampler_options(model.model.is_none())?,
            tuning: tuning.tuning(model.device)?,
            vae: vae
                .map(|p| VaeDecoder::load(p).context("--vae").map(Arc::new))
                .transpose()?,
            vae_gpu: std::cell::RefCell::new(None),
        })
    }
}

struct SampleJob {
    args: SampleArgs,
    /// With --vae, the decoder is set up on the GPU once the samples are there: its weights and
    /// scratch stay off the GPU during the sampling and any tuning.
    setup: RunSetup,
}

fn sample(args: SampleArgs) -> Result<()> {
    fora::io::check_output_path("--out", &args.out, &["safetensors", "png"])?;
    let setup = RunSetup::read(
        &args.model,
        &args.sampling,
        &args.tuning,
        args.vae.as_deref(),
    )?;
    let model = args.model.clone();
    run_on(&model, SampleJob { args, setup })
}

/// Reads a noise file for `images` images of `cfg` over `steps` steps.
fn read_noise_file(
    path: &Path,
    cfg: &DitConfig,
    images: usize,
    steps: usize,
) -> Result<NoiseSource> {
    let file = TensorFile::open(path).context("--noise-file")?;
    let x_t = file.f32("x_T", 4)?;
    let noise = file.f32("noise", 5)?;
    let (c, s) = (cfg.in_channels, cfg.input_size);
    ensure!(
        x_t.shape == [images, c, s, s],
        "{}: x_T has shape {:?}, expected [B={images}, C={c}, H={s}, W={s}] for {images} class(es)",
        path.display(),
        x_t.shape
    );
    ensure!(
        noise.shape == [steps, images, c, s, s],
        "{}: noise has shape {:?}, expected [S={steps}, B={images}, C={c}, H={s}, W={s}]",
        path.display(),
        noise.shape
    );
    Ok(NoiseSource::File {
        x_t: x_t.data,
        noise: noise.data,
    })
}

impl Job for SampleJob {
    fn cpu_note(&self) -> Option<&'static str> {
        self.setup.tuning.as_ref().map(|_| UNTUNED_ON_CPU)
    }

    fn prepare_cuda(&self, backend: &mut CudaBackend) -> Result<()> {
        if self.setup.vae.is_some() {
            // The decoder itself is set up once the samples are there: its weights and scratch
            // stay off the GPU while the model samples (and tunes).
            *self.setup.vae_gpu.borrow_mut() = vae_gpu_handle(backend, false)?;
        }
        match &self.setup.tuning {
            Some(tuning) => tuning.apply(
                backend,
                &self.setup.options,
                &self.args.classes,
                self.args.seed.unwrap_or(0),
                self.args.sampling.cache_interval as usize,
            ),
            None => Ok(()),
        }
    }

    fn check(&self, cfg: &DitConfig) -> Result<()> {
        let c = cfg.in_channels;
        match &self.setup.vae {
            Some(vae) => ensure!(
                vae.config().latent_channels == c,
                "--vae decodes latents of {} channels; this model samples {c}",
                vae.config().latent_channels
            ),
            None => ensure!(
                !is_png(&self.args.out) || c == 1 || c == 3,
                "--out {}: PNG output needs a pixel-space model with 1 or 3 channels; this one \
                 has {c} latent channels: give --vae with the VAE decoder's weights, or write \
                 .safetensors latents",
                self.args.out.display()
            ),
        }
        Ok(())
    }

    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let args = &self.args;
        let sampler = Sampler::new(backend, self.setup.options.clone())?;
        let steps = sampler.steps();
        let noise = match &args.noise_file {
            Some(path) => read_noise_file(path, backend.config(), args.classes.len(), steps)?,
            None => NoiseSource::Seed(args.seed.unwrap_or(0)),
        };
        let mut policy = policy_for_interval(args.sampling.cache_interval as usize)?;
        let bar = if args.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(steps as u64)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} steps  {msg}  (eta {eta})",
            )
            .context("progress bar template")?,
        );
        let (mut computed, mut reused) = (0usize, 0usize);
        let samples: Samples = sampler.sample_with_progress(
            &args.classes,
            noise,
            policy.as_mut(),
            &mut |e: &StepEvent| {
                match e.mode {
                    fora::backend::StepMode::Compute => computed += 1,
                    fora::backend::StepMode::Reuse => reused += 1,
                }
                bar.set_message(format!("{computed} computed, {reused} reused"));
                bar.inc(1);
            },
        )?;
        bar.finish_and_clear();
        ensure_finite("samples", &samples.latents, &args.out)?;
        let cfg = backend.config();
        let mut meta: HashMap<String, String> = cfg.to_metadata();
        meta.insert(
            "fora.respacing".into(),
            self.setup.options.respacing.clone(),
        );
        meta.insert(
            "fora.sampler".into(),
            format!("{:?}", self.setup.options.kind),
        );
        meta.insert("fora.cache".into(), samples.stats.policy.clone());
        meta.insert(
            "fora.classes".into(),
            args.classes
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        if let Some(g) = self.setup.options.guidance {
            meta.insert("fora.cfg_scale".into(), g.scale.to_string());
            meta.insert("fora.cfg_mode".into(), format!("{:?}", g.mode));
        }
        if let Some(vae) = &args.vae {
            meta.insert("fora.vae".into(), vae.display().to_string());
        }
        match &args.noise_file {
            Some(p) => meta.insert("fora.noise_file".into(), p.display().to_string()),
            None => meta.insert("fora.seed".into(), args.seed.unwrap_or(0).to_string()),
        };
        let images = match &self.setup.vae {
            Some(vae) => Some(decode_latents(
                &self
                    .setup
                    .vae_gpu
                    .borrow_mut()
                    .take()
                    .and_then(|g| gpu_vae(g, vae)),
                false,
                vae,
                &samples.latents,
                samples.shape,
                &args.out,
                true,
            )?),
            None => None,
        };
        if is_png(&args.out) {
            let (pixels, shape) = match &images {
                Some((images, shape)) => (images, *shape),
                None => (&samples.latents, samples.shape),
            };
            let columns = fora::png_out::default_columns(shape[0]);
            fora::png_out::write_png_grid(&args.out, pixels, shape, columns)?;
        } else {
            let mut tensors = vec![("samples", OutTensor::F32(&samples.shape, &samples.latents))];
            if let Some((images, shape)) = &images {
                tensors.push(("images", OutTensor::F32(shape, images)));
            }
            write_tensors(&args.out, &tensors, Some(meta))?;
        }
        let st = &samples.stats;
        eprintln!(
            "fora: {} image(s), {} steps ({} computed, {} reused, {}) on {} in {:.2} s -> {}",
            samples.shape[0],
            st.steps,
            st.computed,
            st.reused,
            st.policy,
            st.backend,
            st.wall.as_secs_f64(),
            args.out.display()
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// fora generate

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Images to generate (an FID evaluation takes 50,000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    num_samples: u64,
    /// Images a sampler run (the model runs on twice as many rows with guidance); the last
    /// batch samples as many too and keeps what the run still needs.
    #[arg(long, value_name = "B", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Seed of the class ids (uniform over the model's classes) and of each batch's noise
    /// (`fora::generate`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// For a latent model: the VAE decoder's weights, as `fora sample --vae` (each batch is
    /// decoded on the model's GPU where it runs on one, else on the CPU).
    #[arg(long, value_name = "VAE")]
    vae: Option<PathBuf>,
    /// Output `.npz`: `arr_0` [N, H, W, C] uint8 (127.5 x + 128, clamped and truncated, as the
    /// official sample_ddp.py) and `labels` [N] int64.
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    // Tuned on the first batch's plan: its rows and schedule.
    #[command(flatten)]
    tuning: TuneArgs,
}

struct GenerateJob {
    args: GenerateArgs,
    setup: RunSetup,
}

fn generate(args: GenerateArgs) -> Result<()> {
    fora::io::check_output_path("--out", &args.out, &["npz"])?;
    let setup = RunSetup::read(
        &args.model,
        &args.sampling,
        &args.tuning,
        args.vae.as_deref(),
    )?;
    let model = args.model.clone();
    run_on(&model, GenerateJob { args, setup })
}

impl GenerateJob {
    /// One image's `[1, C, H, W]` for a model of `cfg`: the decoder's output for a latent model,
    /// the model's own for a pixel-space one (1 or 3 channels).
    fn image_shape(&self, cfg: &DitConfig) -> Result<[usize; 4]> {
        let (c, s) = (cfg.in_channels, cfg.input_size);
        match &self.setup.vae {
            Some(vae) => {
                ensure!(
                    vae.config().latent_channels == c,
                    "--vae decodes latents of {} channels; this model samples {c}",
                    vae.config().latent_channels
                );
                vae.image_shape([1, c, s, s]).context("--vae")
            }
            None => {
                ensure!(
                    c == 1 || c == 3,
                    "this model samples {c} latent channels: give --vae with the VAE decoder's \
                     weights (images are written, not latents)"
                );
                Ok([1, c, s, s])
            }
        }
    }
}

impl Job for GenerateJob {
    fn cpu_note(&self) -> Option<&'static str> {
        self.setup.tuning.as_ref().map(|_| UNTUNED_ON_CPU)
    }

    fn check(&self, cfg: &DitConfig) -> Result<()> {
        let [_, ic, ih, iw] = self.image_shape(cfg)?;
        // The file's size (its arrays and their .npy headers, and a kilobyte for the zip
        // records), refused now where the disk cannot take it, not after hours of sampling.
        let n = self.args.num_samples;
        let npz_bytes = n
            .checked_mul((ih * iw * ic) as u64 + 8)
            .and_then(|data| data.checked_add(2 * 128 + 1024))
            .with_context(|| format!("--num-samples {n}: the images' bytes overflow"))?;
        fora::io::check_free_space("--out", &self.args.out, npz_bytes)
            .with_context(|| format!("--num-samples {n}"))
    }

    fn prepare_cuda(&self, backend: &mut CudaBackend) -> Result<()> {
        if self.setup.vae.is_some() {
            // A run on the GPU decodes there: the CPU decoder (about 5 s an image at 256 x 256)
            // is no fallback for thousands of images.
            *self.setup.vae_gpu.borrow_mut() = vae_gpu_handle(backend, true)?;
        }
        let Some(tuning) = &self.setup.tuning else {
            return Ok(());
        };
        // The first batch: the rows and schedule of every batch.
        let rows =
            usize::try_from(self.args.batch.min(self.args.num_samples)).context("--batch")?;
        let seed = self.args.seed;
        let classes = fora::generate::class_ids(seed, 0, rows, backend.config().num_classes);
        tuning.apply(
            backend,
            &self.setup.options,
            &classes,
            fora::generate::batch_seed(seed, 0),
            self.args.sampling.cache_interval as usize,
        )
    }

    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let args = &self.args;
        let cfg = backend.config();
        let [_, ic, ih, iw] = self.image_shape(cfg)?;
        let n = args.num_samples;
        let batch = args.batch.min(n);
        let batches = n.div_ceil(batch);
        let sampler = Sampler::new(backend, self.setup.options.clone())?;
        let steps = sampler.steps();
        // The decoder runs after every batch: set up on the model's GPU once, for the whole
        // run; a GPU decode that fails later is an error too.
        let vae_gpu = match (&self.setup.vae, self.setup.vae_gpu.borrow_mut().take()) {
            (Some(vae), Some(gpu)) => Some(CudaVae::on_gpu(gpu, vae.clone()).context(
                "the VAE decoder on the model's GPU (a run on a GPU decodes there; --device cpu \
                 runs both on the CPU)",
            )?),
            _ => None,
        };
        let bar = if args.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(batches.saturating_mul(steps as u64))
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} steps  {msg}  (eta {eta})",
            )
            .context("progress bar template")?,
        );
        let signal = stop_on_signal();
        let stopped = |done: u64| -> Result<()> {
            match signal.load(std::sync::atomic::Ordering::SeqCst) {
                0 => Ok(()),
                sig => Err(Stopped {
                    signal: sig as i32,
                    what: format!(
                        "after {done} of {batches} batches: nothing written to {}",
                        args.out.display()
                    ),
                }
                .into()),
            }
        };
        let start = std::time::Instant::now();
        let (mut computed, mut reused, mut announced) = (0usize, 0usize, false);
        let written = fora::io::write_atomic_with(&args.out, |path| {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut npz = NpzWriter::new(std::io::BufWriter::new(file));
            let count = usize::try_from(n).context("--num-samples")?;
            npz.start_array("arr_0", NpyDtype::U8, &[count, ih, iw, ic])?;
            for j in 0..batches {
                stopped(j)?;
                let first = j * batch;
                // Every batch samples `batch` images, the last one too, of which it keeps what the
                // run still needs (as the official script rounds its total up to whole batches
                // and keeps the first N): one plan, one workspace size, and the options tuned
                // for it, for the whole run.
                let rows = usize::try_from(batch).context("--batch")?;
                let keep = usize::try_from(batch.min(n - first)).context("--batch")?;
                let classes = fora::generate::class_ids(args.seed, first, rows, cfg.num_classes);
                let noise = NoiseSource::Seed(fora::generate::batch_seed(args.seed, j));
                let mut policy = policy_for_interval(args.sampling.cache_interval as usize)?;
                let which = || format!("batch {} of {batches}", j + 1);
                let samples = sampler
                    .sample_with_progress(&classes, noise, policy.as_mut(), &mut |e| {
                        match e.mode {
                            fora::backend::StepMode::Compute => computed += 1,
                            fora::backend::StepMode::Reuse => reused += 1,
                        }
                        if !announced && signal.load(std::sync::atomic::Ordering::SeqCst) != 0 {
                            announced = true;
                            bar.suspend(|| {
                                eprintln!(
                                    "fora: stopping after this batch (a second signal stops at \
                                     once, leaving the partial output behind)"
                                )
                            });
                        }
                        bar.set_message(format!(
                            "batch {}/{batches}, {computed} computed, {reused} reused",
                            j + 1
                        ));
                        bar.inc(1);
                    })
                    .with_context(which)?;
                let [_, c, h, w] = samples.shape;
                let latents = &samples.latents[..keep * c * h * w];
                ensure_finite("samples", latents, &args.out).with_context(which)?;
                let images = match &self.setup.vae {
                    Some(vae) => {
                        decode_latents(
                            &vae_gpu,
                            true,
                            vae,
                            latents,
                            [keep, c, h, w],
                            &args.out,
                            false,
                        )
                        .with_context(which)?
                        .0
                    }
                    None => latents.to_vec(),
                };
                let shape = [keep, ic, ih, iw];
                npz.write(&fora::generate::to_nhwc_u8(&images, shape))?;
            }
            stopped(batches)?;
            // The labels again from the seed, a batch at a time: none is held for the run.
            npz.start_array("labels", NpyDtype::I64, &[count])?;
            for j in 0..batches {
                let first = j * batch;
                let keep = usize::try_from(batch.min(n - first)).context("--batch")?;
                let ids = fora::generate::class_ids(args.seed, first, keep, cfg.num_classes);
                let bytes: Vec<u8> = ids.iter().flat_map(|&l| (l as i64).to_le_bytes()).collect();
                npz.write(&bytes)?;
            }
            npz.finish()?
                .into_inner()
                .map_err(|e| anyhow::anyhow!("cannot write {}: {}", path.display(), e.error()))?;
            Ok(())
        });
        bar.finish_and_clear();
        written?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "fora: {n} images [{ih}, {iw}, {ic}] in {batches} batch(es) of {batch}, {steps} \
             steps ({computed} computed, {reused} reused, FORA interval {}), on {} in {secs:.1} s \
             ({:.2} images/s) -> {}",
            args.sampling.cache_interval,
            backend.name(),
            n as f64 / secs,
            args.out.display()
        );
        Ok(())
    }
}

/// A run stopped by a signal: the process exits 128 + `signal`, as a shell reports one.
#[derive(Debug)]
struct Stopped {
    signal: i32,
    /// Where the run stood.
    what: String,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            signal_hook::consts::SIGINT => "SIGINT (Ctrl-C)",
            signal_hook::consts::SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        write!(f, "stopped by {name} {}", self.what)
    }
}

impl std::error::Error for Stopped {}

/// The signal that asked a long run to stop (0: none yet): SIGINT (Ctrl-C) or SIGTERM, each
/// where it is not ignored (under `nohup`, or in a background job whose SIGINT is ignored, they
/// stay ignored; SIGHUP keeps its own action). The run stops between two batches and removes
/// its partial output; a second signal ends the process at once (exit 128 + the signal).
fn stop_on_signal() -> Arc<std::sync::atomic::AtomicUsize> {
    use signal_hook::flag;
    let signal = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if signal_ignored(sig) {
            continue;
        }
        // The shutdown goes first: it acts only once an earlier signal has armed it.
        let set = flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())
            .and_then(|_| flag::register(sig, armed.clone()))
            .and_then(|_| flag::register_usize(sig, signal.clone(), sig as usize));
        if let Err(e) = set {
            eprintln!(
                "fora: no handler for signal {sig} ({e}); it ends the run at once, leaving the \
                 partial output behind"
            );
        }
    }
    signal
}

/// Whether signal `sig` is set to be ignored (queried; nothing is changed).
fn signal_ignored(sig: i32) -> bool {
    let mut current = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: with a null new action, sigaction only writes the current one into `current`,
    // a zeroed sigaction (all of whose fields are plain integers or pointers).
    unsafe {
        libc::sigaction(sig, std::ptr::null(), current.as_mut_ptr()) == 0
            && current.assume_init().sa_sigaction == libc::SIG_IGN
    }
}

// ---------------------------------------------------------------------------------------------
// fora info

fn info() -> Result<()> {
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
fn hopper_fusion_lines(gpu: &Gpu) -> Vec<String> {
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
fn gpus_seen() -> Result<Vec<String>> {
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

#[derive(Args, Debug)]
struct DecodeArgs {
    /// The VAE decoder's weights (safetensors in diffusers' AutoencoderKL key layout, e.g.
    /// stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors, or the original Stable
    /// Diffusion one, a whole SD checkpoint included).
    #[arg(long, value_name = "VAE")]
    vae: PathBuf,
    /// safetensors with the latents [B, C, H, W] f32 (what `fora sample` writes).
    #[arg(long, value_name = "IN")]
    input: PathBuf,
    /// The tensor of --input that holds the latents.
    #[arg(long, default_value = "samples")]
    tensor: String,
    /// Output: `.png` (a grid of the B images) or `.safetensors` with `images` [B, 3, 8H, 8W]
    /// f32 (values about [-1, 1]).
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
    /// Where to decode: `auto` takes the GPU (--gpu, default 0) when it is usable (bf16
    /// operands), and the CPU (f32) otherwise or where the GPU's decode fails; `cuda` fails
    /// instead.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// CUDA device ordinal. Default 0.
    #[arg(long, value_name = "N")]
    gpu: Option<usize>,
}

/// A handle on the backend's GPU for a VAE decoder, or where there is none an error if
/// `strict`, else None after saying it will decode on the CPU.
fn vae_gpu_handle(backend: &CudaBackend, strict: bool) -> Result<Option<Gpu>> {
    match backend.gpu().fork() {
        Ok(gpu) => Ok(Some(gpu)),
        Err(e) if strict => Err(e.context("--device cuda: a GPU handle for the VAE decoder")),
        Err(e) => {
            eprintln!("fora: no GPU handle for the VAE decoder ({e:#}); it will decode on the CPU");
            Ok(None)
        }
    }
}

/// `vae` on `gpu`, or None after saying why it stays on the CPU.
fn gpu_vae(gpu: Gpu, vae: &Arc<VaeDecoder>) -> Option<CudaVae> {
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
fn decode_latents(
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
        None => vae.decode(latents, shape).context("--vae")?,
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

fn decode(args: DecodeArgs) -> Result<()> {
    fora::io::check_output_path("--out", &args.out, &["safetensors", "png"])?;
    ensure!(
        !(args.device == Device::Cpu && args.gpu.is_some()),
        "--gpu chooses a GPU; --device cpu uses none"
    );
    let vae = Arc::new(VaeDecoder::load(&args.vae).context("--vae")?);
    let file = TensorFile::open(&args.input).context("--input")?;
    let latents = file.f32(&args.tensor, 4).context("--input")?;
    let shape: [usize; 4] = latents
        .shape
        .clone()
        .try_into()
        .expect("rank checked above");
    // Latents this decoder cannot take are refused before a GPU is set up.
    vae.image_shape(shape).context("--input")?;
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
