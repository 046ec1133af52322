//! The seam between the sampler (written once, in `sampler.rs`) and a device (CPU reference in
//! `cpu/`, CUDA in `cuda/`). The sampler owns the loop, the FORA schedule and the diffusion
//! coefficients; a backend owns memory and arithmetic.
//!
//! Layouts, shared by every backend:
//! - images / latents: `[N, C, H, W]` f32, row-major;
//! - model output: `[N, out_ch, H, W]`, eps in channels `0..C`, the variance interpolation
//!   value in `C..2C` when `learn_sigma`;
//! - the sampler state holds the B *conditional* rows only. With CFG the model runs on the
//!   2B rows `[x; x]` with labels `[y; null]`, exactly as the official `forward_with_cfg`
//!   duplicates the first half of its batch; the unconditional half of the official state is
//!   discarded each step, so carrying it would change nothing.

use crate::config::DitConfig;
use anyhow::{bail, ensure, Result};

/// How classifier-free guidance combines the conditional and unconditional predictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GuidanceMode {
    /// Official DiT: guide only `model_out[:, :3]`; every other channel (eps channel 3 of a
    /// 4-channel latent, and the variance channels) keeps the conditional row's value.
    #[default]
    Official3,
    /// Guide all `C` eps channels; variance channels keep the conditional row's value.
    AllEps,
}

/// Classifier-free guidance settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance {
    /// The guidance scale s: `uncond + s * (cond - uncond)` (the official sampler uses 4.0).
    pub scale: f32,
    /// Which channels are guided.
    pub mode: GuidanceMode,
}

/// Whether a step runs the transformer blocks or reuses the FORA cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// Run every block in full and store each block's attention output (after proj) and MLP
    /// output (after fc2) in the cache.
    Compute,
    /// Recompute embeddings, modulations and the final layer; take every block's attention and
    /// MLP output from the cache.
    Reuse,
}

/// Where the sampler's Gaussian noise comes from.
#[derive(Clone, Debug)]
pub enum NoiseSource {
    /// The project's counter-based generator (Philox4x32-10 + Box-Muller, `rng.rs`), computed
    /// identically on every backend. x_T uses stream 0; the noise of loop step k uses stream k+1.
    Seed(u64),
    /// Given numbers: `x_t` is `[B, C, H, W]`, `noise` is `[S, B, C, H, W]` (`noise[k]` is the
    /// noise of the k-th loop step, k = 0 being i = S-1).
    File {
        /// The starting latents x_T, `[B, C, H, W]`.
        x_t: Vec<f32>,
        /// Every loop step's noise, `[S, B, C, H, W]`.
        noise: Vec<f32>,
    },
}

/// The per-step diffusion update, with every coefficient already evaluated on the host for the
/// step's respaced index i (see `diffusion.rs`). All backends apply it element-wise as:
///
/// DDPM (learned range variance, clip_denoised = false, as the official p_sample):
/// ```text
/// x0   = sqrt_recip_abar * x - sqrt_recipm1_abar * eps
/// mean = post_coef1 * x0 + post_coef2 * x
/// log_var = frac * max_log + (1 - frac) * min_log,  frac = (v + 1) / 2
///           (without learn_sigma there is no v: log_var = max_log, where the sampler puts
///            the official FIXED_LARGE log variance)
/// x'   = mean + (add_noise ? exp(0.5 * log_var) * z : 0)
/// ```
/// DDIM:
/// ```text
/// x0   = sqrt_recip_abar * x - sqrt_recipm1_abar * eps
/// eps' = (sqrt_recip_abar * x - x0) / sqrt_recipm1_abar
/// x'   = x0 * sqrt(abar_prev) + sqrt(1 - abar_prev - sigma^2) * eps' + (add_noise ? sigma * z : 0)
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepUpdate {
    /// The official ancestral DDPM step (`p_sample`).
    Ddpm {
        /// sqrt(1 / alpha_bar_t).
        sqrt_recip_abar: f64,
        /// sqrt(1 / alpha_bar_t - 1).
        sqrt_recipm1_abar: f64,
        /// The posterior mean's coefficient of x0.
        post_coef1: f64,
        /// The posterior mean's coefficient of x_t.
        post_coef2: f64,
        /// log(beta_t) (the upper end of the learned range).
        max_log: f64,
        /// posterior log variance, clipped at step 0 (the lower end).
        min_log: f64,
        /// Whether noise is added (every step but the last, i = 0).
        add_noise: bool,
    },
    /// The DDIM step (`ddim_sample`), eta folded into `sigma`.
    Ddim {
        /// sqrt(1 / alpha_bar_t).
        sqrt_recip_abar: f64,
        /// sqrt(1 / alpha_bar_t - 1).
        sqrt_recipm1_abar: f64,
        /// alpha_bar of the previous (less noisy) respaced step.
        abar_prev: f64,
        /// The step's noise scale: eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).
        sigma: f64,
        /// Whether noise is added (every step but the last, i = 0).
        add_noise: bool,
    },
}

/// One step of the loop as the sampler hands it to a backend.
#[derive(Clone, Copy, Debug)]
pub struct StepSpec {
    /// Position in the loop, 0 for the first step (i = S-1).
    pub k: usize,
    /// Respaced index i (S-1 down to 0).
    pub i: usize,
    /// The ORIGINAL timestep (0..999) the model is conditioned on.
    pub t: i64,
    /// Whether the blocks run or the FORA cache is reused.
    pub mode: StepMode,
    /// The diffusion update after the model's forward.
    pub update: StepUpdate,
    /// For a `Reuse` step: how many of the steps right after it reuse too (the run of reuse
    /// steps until the next computing step, as the sampler's schedule says), so a backend may
    /// prepare them together (the CUDA backend's `FORA_REUSE_SUM` sums the cache once for the
    /// whole run). 0 when unknown; ignored for `Compute` steps.
    pub reuse_ahead: usize,
}

/// What a sampling run needs to allocate: fixed for the life of a workspace.
///
/// Non-exhaustive, so that a field can be added without breaking a dependent: outside this
/// crate, build one with [`SamplePlan::new`] (or [`crate::sampler::Sampler::plan`]) and set the
/// public fields after.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SamplePlan {
    /// Class ids of the B images (each < num_classes).
    pub classes: Vec<usize>,
    /// Classifier-free guidance (each image then runs as two model rows, conditional and
    /// null class); None: one row an image.
    pub guidance: Option<Guidance>,
    /// Number of loop steps S.
    pub steps: usize,
    /// The original timestep of each loop step, `timesteps[k]` for k = 0..S (known before
    /// sampling starts, so a backend can keep them on the device and launch steps without a
    /// host-to-device copy).
    pub timesteps: Vec<i64>,
    /// Where x_T and every step's noise come from.
    pub noise: NoiseSource,
    /// Whether any step of the run reuses the FORA cache. False: every step computes, and a
    /// backend may leave the cache out of the workspace (the CPU and the CUDA backend do; the
    /// CUDA one also leaves out what only serves reuse steps: cache sums, the L2 window over
    /// the cache, reuse graphs). A reuse step on such a workspace is then an error. True where
    /// the schedule is not known yet ([`SamplePlan::new`], [`crate::sampler::Sampler::plan`];
    /// [`crate::sampler::Sampler::sample`] sets it from its schedule).
    pub reuses: bool,
}

impl SamplePlan {
    /// A plan of these fields, with [`SamplePlan::reuses`] true (the FORA cache kept; set it
    /// false when no step reuses it).
    pub fn new(
        classes: Vec<usize>,
        guidance: Option<Guidance>,
        steps: usize,
        timesteps: Vec<i64>,
        noise: NoiseSource,
    ) -> SamplePlan {
        SamplePlan {
            classes,
            guidance,
            steps,
            timesteps,
            noise,
            reuses: true,
        }
    }

    /// Sets [`SamplePlan::reuses`] from the steps the run will take: whether any reuses the
    /// FORA cache.
    pub fn set_reuses_from(&mut self, schedule: &[StepSpec]) {
        self.reuses = schedule.iter().any(|s| s.mode == StepMode::Reuse);
    }

    /// Images B.
    pub fn images(&self) -> usize {
        self.classes.len()
    }
    /// Model rows per forward: 2B with guidance, B without.
    pub fn model_rows(&self) -> usize {
        self.classes.len() * if self.guidance.is_some() { 2 } else { 1 }
    }

    /// The checks every backend makes before allocating a workspace for `cfg`: at least one
    /// class, each in range, at least one step, a finite guidance scale, one original timestep
    /// in 0..999 per step, and a noise file of the plan's shapes holding finite values.
    pub fn validate(&self, cfg: &DitConfig) -> Result<()> {
        ensure!(self.images() > 0, "a sampling run needs at least one class");
        if let Some(&bad) = self.classes.iter().find(|&&c| c >= cfg.num_classes) {
            bail!(
                "class {bad} out of range: the model has classes 0..{}",
                cfg.num_classes - 1
            );
        }
        ensure!(self.steps > 0, "a sampling run needs at least one step");
        if let Some(g) = self.guidance {
            ensure!(g.scale.is_finite(), "cfg scale {} is not finite", g.scale);
        }
        ensure!(
            self.timesteps.len() == self.steps,
            "the plan has {} timesteps for {} steps",
            self.timesteps.len(),
            self.steps
        );
        if let Some(bad) = self.timesteps.iter().find(|t| !(0..1000).contains(*t)) {
            bail!("timestep {bad} outside 0..999");
        }
        if let NoiseSource::File { x_t, noise } = &self.noise {
            let (b, img) = (self.images(), cfg.image_len());
            ensure!(
                x_t.len() == b * img,
                "noise file x_T has {} values, expected [{b}, {}, {}, {}] = {}",
                x_t.len(),
                cfg.in_channels,
                cfg.input_size,
                cfg.input_size,
                b * img
            );
            ensure!(
                noise.len() == self.steps * b * img,
                "noise file noise has {} values, expected [{}, {b}, {}, {}, {}] = {}",
                noise.len(),
                self.steps,
                cfg.in_channels,
                cfg.input_size,
                cfg.input_size,
                self.steps * b * img
            );
            ensure!(
                x_t.iter().chain(noise).all(|v| v.is_finite()),
                "noise file holds non-finite values"
            );
        }
        Ok(())
    }
}

/// A device the sampler can run on.
pub trait Backend {
    /// Everything one sampling run needs (activations, modulations, the FORA cache where the
    /// plan reuses it, the latents), allocated once by [`Backend::workspace`]; steps allocate
    /// nothing.
    type Workspace;

    /// A short name for logs ("cpu", "cuda:0 NVIDIA H200").
    fn name(&self) -> String;
    /// The model this backend runs.
    fn config(&self) -> &DitConfig;

    /// Allocates a workspace for `plan` and loads x_T into it.
    fn workspace(&self, plan: &SamplePlan) -> Result<Self::Workspace>;

    /// Runs one step: the model (compute or reuse), guidance, the diffusion update with the
    /// step's noise. The first step of a run must be a `Compute` step (an empty cache cannot be
    /// reused); backends return an error otherwise.
    fn step(&self, ws: &mut Self::Workspace, step: &StepSpec) -> Result<()>;

    /// Copies the current latents `[B, C, H, W]` (conditional rows) to the host.
    fn latents(&self, ws: &mut Self::Workspace) -> Result<Vec<f32>>;

    /// One plain forward: `x` `[N, C, H, W]`, original timesteps `t` `[N]`, labels `y` `[N]`
    /// (num_classes = null). Returns `[N, out_ch, H, W]`. With `guidance`, runs the official
    /// `forward_with_cfg` instead (N even; the first half are the conditional rows).
    fn forward(
        &self,
        x: &[f32],
        t: &[i64],
        y: &[usize],
        guidance: Option<Guidance>,
    ) -> Result<Vec<f32>>;
}
