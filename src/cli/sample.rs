//! `fora sample`, and what it shares with `fora generate`: the sampling flags, the tuning,
//! the set-up read before the model loads.

use crate::cli::decode::{decode_latents, gpu_vae, vae_gpu_handle};
use crate::{
    ensure_finite, guidance, is_png, run_on, CfgMode, Device, Job, ModelArgs, SamplerChoice,
};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use fora::backend::{Backend, NoiseSource};
use fora::cache::policy_for_interval;
use fora::config::DitConfig;
use fora::cuda::tune::{TuneCache, TuneCandidate, TuneKey, TuneSettings};
use fora::cuda::{CudaBackend, Gpu};
use fora::diffusion::SamplerKind;
use fora::io::{write_tensors, OutTensor, TensorFile};
use fora::sampler::{Sampler, SamplerOptions, Samples, StepEvent};
use fora::vae::VaeDecoder;
use fora::weights::DitWeights;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How images are sampled: steps, reverse process, guidance, FORA (`sample` and `generate`).
#[derive(Args, Debug)]
pub(crate) struct SamplingArgs {
    /// Sampling steps (respacing of the 1000-step process at the official fractional stride).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) steps: u64,
    /// Explicit official respacing string instead of --steps (`250`, `ddim50`, `10,20,30`).
    #[arg(long, conflicts_with = "steps")]
    pub(crate) respacing: Option<String>,
    /// Reverse process.
    #[arg(long, value_enum, default_value_t = SamplerChoice::Ddpm)]
    pub(crate) sampler: SamplerChoice,
    /// DDIM eta >= 0 (0 = deterministic, 1 = DDPM's variance; past 1 only as far as the
    /// schedule allows, the error says); DDIM only.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) eta: Option<f64>,
    /// Classifier-free guidance scale; absent (the embedded model: 4) or 1.0 means no guidance
    /// (batch B), otherwise the model runs on 2B rows.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) cfg_scale: Option<f32>,
    /// Which channels guidance combines [default: official]. Needs guidance: a --cfg-scale,
    /// or the embedded model (guided at 4 unless told otherwise).
    #[arg(long, value_enum)]
    pub(crate) cfg_mode: Option<CfgMode>,
    /// FORA static cache interval N: compute when i == S-1 or i % N == 0 (1 = no caching).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) cache_interval: u64,
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
pub(crate) struct Tuning {
    pub(crate) candidates: Vec<TuneCandidate>,
    pub(crate) cache: Option<std::cell::RefCell<TuneCache>>,
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
pub(crate) const UNTUNED_ON_CPU: &str =
    "--tune tries the GPU's execution paths; the CPU backend runs untuned";

impl Tuning {
    /// Tunes `backend` on a run of `options` sampling `classes` (seed `seed`, FORA interval
    /// `interval`), or takes the cached choice, and sets the chosen options on it.
    pub(crate) fn apply(
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
pub(crate) struct SampleArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Class id of an image to sample (repeat for a batch).
    #[arg(long = "class", value_name = "ID", required = true)]
    pub(crate) classes: Vec<usize>,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// Seed of the project's Philox noise (x_T: stream 0, step k: stream k+1).
    #[arg(long, conflicts_with = "noise_file")]
    pub(crate) seed: Option<u64>,
    /// safetensors (or a `torch.save` of a dict) with `x_T` [B, C, H, W] f32 and `noise`
    /// [S, B, C, H, W] f32.
    #[arg(long, value_name = "NOISE")]
    pub(crate) noise_file: Option<PathBuf>,
    /// Output: `.safetensors` with `samples` [B, C, H, W] f32 (and `images` with --vae), or
    /// `.png` (a grid of the B images: pixel-space models with 1 or 3 channels, or a latent
    /// model with --vae).
    #[arg(long, value_name = "OUT")]
    pub(crate) out: PathBuf,
    /// For a latent model (DiT-XL/2 and the other official checkpoints): the VAE decoder's
    /// weights (safetensors or a PyTorch checkpoint, in diffusers' AutoencoderKL key layout,
    /// e.g. stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors or .bin, with the
    /// config.json beside it read where present; or the original Stable Diffusion one, a
    /// whole SD checkpoint included). The samples are decoded into images
    /// after sampling, as the official sample.py does: on the model's GPU (bf16 operands)
    /// where it runs on one, else on the CPU (f32).
    #[arg(long, value_name = "VAE")]
    pub(crate) vae: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
    #[command(flatten)]
    pub(crate) tuning: TuneArgs,
}

/// Tuning the GPU's execution paths before a run (`sample` and `generate`).
#[derive(Args, Debug)]
pub(crate) struct TuneArgs {
    /// On a GPU: before sampling, try the backend's execution paths on this run's own plan and
    /// schedule (each checked against the options as given, then timed) and sample with the
    /// fastest; prints the table to stderr. Candidates: $FORA_TUNE_CANDIDATES
    /// (`name:FORA_X=1 FORA_Y=1;...`), else the built-in list, less the names in
    /// $FORA_TUNE_SKIP (`name,name`). The bits may differ from an untuned run's, within the
    /// forward's tolerance. A candidate whose measurement takes over 300 s, and over ten times
    /// the options as given, is taken for a launch that never ends: the run stops (exit status
    /// 3) with a line naming it, to leave out with $FORA_TUNE_SKIP.
    #[arg(long)]
    pub(crate) tune: bool,
    /// With --tune (implied): a JSON file of earlier tunings' choices. A run whose card,
    /// kernels, model, rows, schedule, options, candidates and tuning settings are all in it
    /// takes the cached choice without measuring; another tunes and adds its choice. Created if
    /// absent; a file that is not such a cache is an error.
    #[arg(long, value_name = "FILE")]
    pub(crate) tune_cache: Option<PathBuf>,
}

/// What `sample` and `generate` read and check before the model loads: a bad setting, tuning
/// cache or VAE file is refused before minutes of loading and sampling, not after.
pub(crate) struct RunSetup {
    pub(crate) options: SamplerOptions,
    /// With --tune: the candidates and the cache.
    pub(crate) tuning: Option<Tuning>,
    /// With --vae: the decoder.
    pub(crate) vae: Option<Arc<VaeDecoder>>,
    /// With --vae on the CUDA backend: a handle on its GPU (`prepare_cuda`).
    pub(crate) vae_gpu: std::cell::RefCell<Option<Gpu>>,
}

impl RunSetup {
    pub(crate) fn read(
        model: &ModelArgs,
        sampling: &SamplingArgs,
        tuning: &TuneArgs,
        vae: Option<&Path>,
    ) -> Result<RunSetup> {
        Ok(RunSetup {
            options: sampling.sampler_options(model.model.is_none())?,
            tuning: tuning.tuning(model.device)?,
            vae: vae.map(crate::cli::decode::load_vae).transpose()?,
            vae_gpu: std::cell::RefCell::new(None),
        })
    }
}

pub(crate) struct SampleJob {
    pub(crate) args: SampleArgs,
    /// With --vae, the decoder is set up on the GPU once the samples are there: its weights and
    /// scratch stay off the GPU during the sampling and any tuning.
    pub(crate) setup: RunSetup,
}

pub(crate) fn sample(args: SampleArgs) -> Result<()> {
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

/// A progress bar of `steps` sampling steps on a terminal (`sample` and `generate`); hidden
/// with --quiet.
pub(crate) fn steps_bar(quiet: bool, steps: u64) -> Result<ProgressBar> {
    count_bar(quiet, steps, "steps")
}

/// A progress bar of `len` things called `unit` on a terminal; hidden with --quiet.
pub(crate) fn count_bar(quiet: bool, len: u64, unit: &str) -> Result<ProgressBar> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit}  {{msg}}  (eta {{eta}})"
        ))
        .context("progress bar template")?,
    );
    Ok(bar)
}

/// Reads a noise file for `images` images of `cfg` over `steps` steps.
pub(crate) fn read_noise_file(
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

    fn check(&self, cfg: &DitConfig, _weights: &DitWeights) -> Result<()> {
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
        let bar = steps_bar(args.quiet, steps as u64)?;
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
