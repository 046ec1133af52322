//! The denoising loop, written once for every backend.
//!
//! A [`Sampler`] holds a respaced diffusion process and the per-step updates of one sampler
//! kind (DDPM or DDIM), evaluated on the host once. [`Sampler::sample`] then:
//! 1. validates the request (classes, noise shapes) and builds the backend's workspace once
//!    ([`Backend::workspace`]: activations, modulations, FORA caches, x_T);
//! 2. runs loop step k = 0..S with respaced index i = S-1-k: asks the [`CachePolicy`] (the first
//!    step always computes: an empty cache cannot be reused) and hands a [`StepSpec`] with the
//!    ORIGINAL timestep to [`Backend::step`];
//! 3. copies the final latents out and reports [`SampleStats`].
//!
//! The loop itself allocates nothing: every update and the step record are prepared before
//! it, so a reuse step costs what the backend's reuse path costs.
//!
//! ```no_run
//! # fn demo<B: fora::backend::Backend>(backend: &B) -> anyhow::Result<()> {
//! use fora::backend::NoiseSource;
//! use fora::cache::StaticInterval;
//! use fora::sampler::{Sampler, SamplerOptions};
//!
//! let sampler = Sampler::new(backend, SamplerOptions::ddpm(250))?;
//! let mut policy = StaticInterval::new(3)?;
//! let out = sampler.sample(&[207, 360], NoiseSource::Seed(0), &mut policy)?;
//! println!("{} computed, {} reused in {:?}", out.stats.computed, out.stats.reused, out.stats.wall);
//! # Ok(()) }
//! ```

use crate::backend::{Backend, Guidance, NoiseSource, SamplePlan, StepMode, StepSpec, StepUpdate};
use crate::cache::{CachePolicy, StepContext};
use crate::diffusion::{Diffusion, SamplerKind};
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

/// How to sample: the respaced process, the reverse-process kind and guidance.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerOptions {
    /// Respacing of the 1000-step process as the official `timestep_respacing`: `"250"`
    /// (fractional stride), `"ddim50"` (integer stride), `"10,20,30"` (sections).
    pub respacing: String,
    /// DDPM (official `p_sample`) or DDIM with eta.
    pub kind: SamplerKind,
    /// Classifier-free guidance. `Some` always runs the 2B-row batch `[cond; uncond]`, even at
    /// scale 1.0 (the CLI maps scale 1.0 to `None`, the plain B-row batch).
    pub guidance: Option<Guidance>,
}

impl SamplerOptions {
    /// DDPM over `steps` steps at the official fractional stride, no guidance.
    pub fn ddpm(steps: usize) -> SamplerOptions {
        SamplerOptions {
            respacing: steps.to_string(),
            kind: SamplerKind::Ddpm,
            guidance: None,
        }
    }

    /// DDIM (eta) over `steps` steps at the official fractional stride, no guidance.
    pub fn ddim(steps: usize, eta: f64) -> SamplerOptions {
        SamplerOptions {
            respacing: steps.to_string(),
            kind: SamplerKind::Ddim { eta },
            guidance: None,
        }
    }

    /// The same options with guidance.
    pub fn with_guidance(mut self, guidance: Option<Guidance>) -> SamplerOptions {
        self.guidance = guidance;
        self
    }

    /// Checks these options without a model: the respacing string, each step's update (DDIM's
    /// eta against the schedule) and the guidance scale, as [`Sampler::new`] does. A caller
    /// can refuse bad options before a checkpoint of gigabytes loads (none of the checks
    /// depends on the model: learn_sigma changes DDPM's variance only, which has none).
    pub fn validate(&self) -> Result<()> {
        self.process(true).map(|_| ())
    }

    /// The respaced process for these options and a model's `learn_sigma`, and every step's
    /// update coefficients; an error naming what is wrong.
    fn process(&self, learn_sigma: bool) -> Result<(Diffusion, Vec<StepUpdate>)> {
        if let Some(g) = self.guidance {
            ensure!(
                g.scale.is_finite(),
                "guidance scale must be a finite number, got {}",
                g.scale
            );
        }
        let diffusion = Diffusion::new(&self.respacing, learn_sigma)?;
        let updates = (0..diffusion.steps())
            .map(|i| diffusion.step_update(i, self.kind))
            .collect::<Result<Vec<_>>>()?;
        Ok((diffusion, updates))
    }
}

impl Default for SamplerOptions {
    /// The official DiT sampling setup: 250 DDPM steps, no guidance.
    fn default() -> SamplerOptions {
        SamplerOptions::ddpm(250)
    }
}

/// What the progress callback sees after each step.
#[derive(Clone, Copy, Debug)]
pub struct StepEvent {
    /// Loop position, 0 first.
    pub k: usize,
    /// Respaced index i (S-1 down to 0).
    pub i: usize,
    /// Loop length S.
    pub steps: usize,
    /// The original timestep the model saw.
    pub t: i64,
    /// Whether the step ran the blocks or reused the cache.
    pub mode: StepMode,
    /// Time since the loop started (workspace setup excluded).
    pub elapsed: Duration,
}

/// Statistics of one sampling run.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleStats {
    /// Loop steps S.
    pub steps: usize,
    /// Steps that ran the transformer blocks.
    pub computed: usize,
    /// Steps that reused the FORA cache.
    pub reused: usize,
    /// Building the workspace (allocation, x_T).
    pub setup: Duration,
    /// The denoising loop and the copy of the latents to the host.
    pub sampling: Duration,
    /// Everything: validation, setup, loop, copy-out.
    pub wall: Duration,
    /// The policy's description (`none`, `fora-static N=3`).
    pub policy: String,
    /// The backend's name.
    pub backend: String,
}

/// The result of one sampling run.
#[derive(Clone, Debug)]
pub struct Samples {
    /// Final latents `[B, C, H, W]` of the B requested classes (the conditional rows).
    pub latents: Vec<f32>,
    /// `[B, C, H, W]`.
    pub shape: [usize; 4],
    /// Steps computed and reused, timings.
    pub stats: SampleStats,
}

/// A respaced diffusion sampler bound to one backend. Holds no device memory: every
/// [`Sampler::sample`] call builds the workspace for its batch once and frees it at the end.
pub struct Sampler<'a, B: Backend> {
    backend: &'a B,
    options: SamplerOptions,
    diffusion: Diffusion,
    /// The update of respaced index i, `updates[i]`.
    updates: Vec<StepUpdate>,
}

impl<'a, B: Backend> Sampler<'a, B> {
    /// Builds the respaced process for `options` and the model's `learn_sigma`, and evaluates
    /// every step's update coefficients.
    pub fn new(backend: &'a B, options: SamplerOptions) -> Result<Sampler<'a, B>> {
        let (diffusion, updates) = options.process(backend.config().learn_sigma)?;
        Ok(Sampler {
            backend,
            options,
            diffusion,
            updates,
        })
    }

    /// Loop steps S.
    pub fn steps(&self) -> usize {
        self.diffusion.steps()
    }

    /// The respaced diffusion process.
    pub fn diffusion(&self) -> &Diffusion {
        &self.diffusion
    }

    /// The options this sampler was built with.
    pub fn options(&self) -> &SamplerOptions {
        &self.options
    }

    /// Validates a request and turns it into the backend's [`SamplePlan`]: classes in range,
    /// noise-file shapes `x_T` `[B, C, H, W]` and `noise` `[S, B, C, H, W]`, all finite.
    pub fn plan(&self, classes: &[usize], noise: NoiseSource) -> Result<SamplePlan> {
        let config = self.backend.config();
        ensure!(
            !classes.is_empty(),
            "no classes requested: ask for at least one image"
        );
        for (b, &class) in classes.iter().enumerate() {
            ensure!(
                class < config.num_classes,
                "class {class} (image {b}) is out of range: the model has {} classes, 0..{}",
                config.num_classes,
                config.num_classes - 1
            );
        }
        let image = config.image_len();
        let batch = classes.len() * image;
        if let NoiseSource::File { x_t, noise } = &noise {
            let (c, h) = (config.in_channels, config.input_size);
            ensure!(
                x_t.len() == batch,
                "noise file: x_T has {} values, expected [B={}, C={c}, H={h}, W={h}] = {batch}",
                x_t.len(),
                classes.len()
            );
            ensure!(
                noise.len() == self.steps() * batch,
                "noise file: noise has {} values, expected [S={}, B={}, C={c}, H={h}, W={h}] = {}",
                noise.len(),
                self.steps(),
                classes.len(),
                self.steps() * batch
            );
            if let Some(j) = x_t.iter().position(|v| !v.is_finite()) {
                anyhow::bail!("noise file: x_T[{j}] is not finite ({})", x_t[j]);
            }
            if let Some(j) = noise.iter().position(|v| !v.is_finite()) {
                anyhow::bail!("noise file: noise value #{j} is not finite ({})", noise[j]);
            }
        }
        Ok(SamplePlan {
            classes: classes.to_vec(),
            guidance: self.options.guidance,
            steps: self.steps(),
            timesteps: (0..self.steps())
                .map(|k| self.diffusion.timestep_map[self.steps() - 1 - k] as i64)
                .collect(),
            noise,
            reuses: true,
        })
    }

    /// Every step of a run in loop order, as `policy` decides them: each step's mode (the
    /// first always computes), timestep, update and the reuse steps that follow it. The
    /// policy is asked once per step, in loop order, before any step runs, so that a reuse step
    /// knows how many reuse steps follow it ([`StepSpec::reuse_ahead`]).
    pub fn schedule(&self, policy: &mut dyn CachePolicy) -> Vec<StepSpec> {
        let steps = self.steps();
        let modes: Vec<StepMode> = (0..steps)
            .map(|k| {
                let i = steps - 1 - k;
                let t = self.diffusion.timestep_map[i] as i64;
                let asked = policy.mode(&StepContext { k, i, steps, t });
                if k == 0 {
                    StepMode::Compute
                } else {
                    asked
                }
            })
            .collect();
        let reuse_ahead = reuse_runs(&modes);
        modes
            .iter()
            .enumerate()
            .map(|(k, &mode)| {
                let i = steps - 1 - k;
                StepSpec {
                    k,
                    i,
                    t: self.diffusion.timestep_map[i] as i64,
                    mode,
                    update: self.updates[i],
                    reuse_ahead: reuse_ahead[k],
                }
            })
            .collect()
    }

    /// Samples one batch: final latents of `classes` from `noise`, with `policy` deciding
    /// compute or reuse per step.
    pub fn sample(
        &self,
        classes: &[usize],
        noise: NoiseSource,
        policy: &mut dyn CachePolicy,
    ) -> Result<Samples> {
        self.sample_with_progress(classes, noise, policy, &mut |_| {})
    }

    /// As [`Sampler::sample`], calling `on_step` after every step (progress bars, tracing).
    pub fn sample_with_progress(
        &self,
        classes: &[usize],
        noise: NoiseSource,
        policy: &mut dyn CachePolicy,
        on_step: &mut dyn FnMut(&StepEvent),
    ) -> Result<Samples> {
        let _sample = crate::nvtx_range!("sample");
        let start = Instant::now();
        let mut plan = self.plan(classes, noise)?;
        let schedule = self.schedule(policy);
        plan.set_reuses_from(&schedule);
        let workspace_range = crate::nvtx_range!("workspace");
        let mut ws = self.backend.workspace(&plan).with_context(|| {
            format!(
                "{}: cannot build the sampling workspace",
                self.backend.name()
            )
        })?;
        drop(workspace_range);
        let setup = start.elapsed();
        let loop_start = Instant::now();
        let steps = self.steps();
        let (mut computed, mut reused) = (0usize, 0usize);
        for spec in schedule {
            let StepSpec { k, i, t, mode, .. } = spec;
            let _step = crate::nvtx_range!(
                "step {k} {}",
                match mode {
                    StepMode::Compute => "compute",
                    StepMode::Reuse => "reuse",
                }
            );
            self.backend.step(&mut ws, &spec).with_context(|| {
                format!(
                    "{}: step {k} (i = {i}, t = {t}, {mode:?}) failed",
                    self.backend.name()
                )
            })?;
            match mode {
                StepMode::Compute => computed += 1,
                StepMode::Reuse => reused += 1,
            }
            on_step(&StepEvent {
                k,
                i,
                steps,
                t,
                mode,
                elapsed: loop_start.elapsed(),
            });
        }
        let latents = self
            .backend
            .latents(&mut ws)
            .with_context(|| format!("{}: cannot read the final latents", self.backend.name()))?;
        let config = self.backend.config();
        let shape = [
            classes.len(),
            config.in_channels,
            config.input_size,
            config.input_size,
        ];
        ensure!(
            latents.len() == shape.iter().product::<usize>(),
            "{}: returned {} latent values, expected {shape:?}",
            self.backend.name(),
            latents.len()
        );
        let sampling = loop_start.elapsed();
        Ok(Samples {
            latents,
            shape,
            stats: SampleStats {
                steps,
                computed,
                reused,
                setup,
                sampling,
                wall: start.elapsed(),
                policy: policy.describe(),
                backend: self.backend.name(),
            },
        })
    }
}

/// For each step of a schedule, how many of the steps right after it reuse
/// ([`StepSpec::reuse_ahead`]): for a reuse step the rest of its run, 0 for a computing step
/// (`[C, R, R, C, R]` gives `[0, 1, 0, 0, 0]`).
pub fn reuse_runs(modes: &[StepMode]) -> Vec<usize> {
    let mut ahead = vec![0usize; modes.len()];
    for k in (0..modes.len().saturating_sub(1)).rev() {
        if modes[k] == StepMode::Reuse && modes[k + 1] == StepMode::Reuse {
            ahead[k] = ahead[k + 1] + 1;
        }
    }
    ahead
}

/// Fills `out` (`[B, C, H, W]`, the conditional rows) with x_T from `source`: stream 0 of the
/// seed, or the noise file's `x_T`. For backends; never allocates.
pub fn fill_initial_noise(source: &NoiseSource, out: &mut [f32]) -> Result<()> {
    match source {
        NoiseSource::Seed(seed) => crate::rng::fill_normal(*seed, 0, out),
        NoiseSource::File { x_t, .. } => {
            ensure!(
                x_t.len() == out.len(),
                "noise file: x_T has {} values, the batch needs {}",
                x_t.len(),
                out.len()
            );
            out.copy_from_slice(x_t);
        }
    }
    Ok(())
}

/// Fills `out` (`[B, C, H, W]`) with the noise of loop step `k`: stream k + 1 of the seed, or
/// `noise[k]` of the noise file. For backends; never allocates.
pub fn fill_step_noise(source: &NoiseSource, k: usize, out: &mut [f32]) -> Result<()> {
    match source {
        NoiseSource::Seed(seed) => crate::rng::fill_normal(*seed, k as u64 + 1, out),
        NoiseSource::File { noise, .. } => {
            let n = out.len();
            let slab = noise.get(k * n..(k + 1) * n).with_context(|| {
                format!(
                    "noise file: no noise for loop step {k} ({} values hold {} steps of {n})",
                    noise.len(),
                    noise.len() / n.max(1)
                )
            })?;
            out.copy_from_slice(slab);
        }
    }
    Ok(())
}
