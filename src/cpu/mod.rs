//! The CPU reference backend: f32, the official DiT maths step by step (see `model.rs`), the
//! block GEMMs through the `gemm` crate and attention per (batch, head) on rayon.
//!
//! A workspace holds everything a sampling run touches (activations, modulations, the FORA
//! cache of the model rows, the latents, the noise buffer), so steps allocate nothing of their
//! own. Reuse steps are allocation-free and single-threaded; computing steps call `gemm`,
//! which allocates a few small bookkeeping vectors per product.

pub mod model;
pub mod ops;

use crate::backend::{
    Backend, Guidance, GuidanceMode, NoiseSource, SamplePlan, StepMode, StepSpec, StepUpdate,
};
use crate::config::DitConfig;
use crate::weights::DitWeights;
use anyhow::{bail, ensure, Context, Result};
use model::{Activations, FeatureCache};

/// The reference backend: a validated config and its weights.
pub struct CpuBackend {
    cfg: DitConfig,
    weights: DitWeights,
}

/// Noise of a run, as the workspace keeps it.
enum WorkspaceNoise {
    Seed(u64),
    /// `[S, B, C, H, W]`.
    File(Vec<f32>),
}

/// Everything one sampling run needs, allocated by [`CpuBackend::workspace`].
pub struct CpuWorkspace {
    /// The model it was built for: its buffers are sized for it.
    cfg: DitConfig,
    images: usize,
    guidance: Option<Guidance>,
    steps: usize,
    /// Labels of the model rows: `[y; null]` with guidance, `y` without.
    labels: Vec<usize>,
    /// The step's timestep for every model row.
    t_rows: Vec<i64>,
    /// The sampler state, the B conditional rows `[B, C, H, W]`.
    latents: Vec<f32>,
    /// Model input `[rows, C, H, W]` (`[x; x]` with guidance).
    model_in: Vec<f32>,
    /// Guided model output of the conditional rows `[B, out_ch, H, W]`.
    guided: Vec<f32>,
    /// This step's noise `[B, C, H, W]`.
    noise: Vec<f32>,
    noise_source: WorkspaceNoise,
    acts: Activations,
    /// None where the plan has no reuse step ([`SamplePlan::reuses`]).
    cache: Option<FeatureCache>,
}

impl CpuWorkspace {
    /// The FORA cache of the model rows (for tests and inspection); None where the plan has
    /// no reuse step, so the workspace holds none.
    pub fn cache(&self) -> Option<&FeatureCache> {
        self.cache.as_ref()
    }
    /// The activations of the last step (its model output is `activations().out`).
    pub fn activations(&self) -> &Activations {
        &self.acts
    }
}

/// Eps channels that guidance combines: the official code guides `model_out[:, :3]` whatever
/// the channel count; the alternative guides the C eps channels.
pub fn guided_channels(cfg: &DitConfig, mode: GuidanceMode) -> usize {
    match mode {
        GuidanceMode::Official3 => 3.min(cfg.out_channels()),
        GuidanceMode::AllEps => cfg.in_channels,
    }
}

impl CpuBackend {
    /// Checks that `weights` fit `cfg` (sizes, finite values).
    pub fn new(cfg: DitConfig, weights: DitWeights) -> Result<CpuBackend> {
        weights.check(&cfg)?;
        Ok(CpuBackend { cfg, weights })
    }

    /// The model's weights (f32, as loaded).
    pub fn weights(&self) -> &DitWeights {
        &self.weights
    }

    /// A plain forward into caller-owned buffers: `Compute` fills `cache` when given, `Reuse`
    /// reads it (see [`model::forward`]). The output is `acts.out`.
    pub fn forward_into(
        &self,
        acts: &mut Activations,
        cache: Option<&mut FeatureCache>,
        mode: StepMode,
        x: &[f32],
        t: &[i64],
        y: &[usize],
    ) -> Result<()> {
        model::forward(&self.cfg, &self.weights, acts, cache, mode, x, t, y)
    }
}

/// Refuses a workspace for `plan` larger than the memory and swap this machine has free, with
/// its size by part, before any of it is allocated (buffer by buffer, the one that does not
/// fit would be refused only once the others were made and zeroed).
fn check_workspace_fits(cfg: &DitConfig, plan: &SamplePlan, free: Option<u64>) -> Result<()> {
    let (b, rows, img) = (plan.images(), plan.model_rows(), cfg.image_len());
    let noise_file = match &plan.noise {
        NoiseSource::File { noise, .. } => noise.len(),
        NoiseSource::Seed(_) => 0,
    };
    let parts = [
        ("activations", Activations::bytes(cfg, rows)),
        (
            "FORA cache",
            match plan.reuses {
                true => FeatureCache::bytes(cfg, rows),
                false => Some(0),
            },
        ),
        (
            "latents, noise and outputs",
            crate::weights::f32_bytes([
                [b, img].as_slice(),
                &[rows, img],
                &[b, cfg.out_len()],
                &[b, img],
                &[noise_file],
            ]),
        ),
    ];
    let context = || {
        format!(
            "a CPU workspace for {rows} model rows of {}",
            cfg.arch_name()
        )
    };
    let mut total = 0u64;
    let mut by_part = Vec::new();
    for (part, bytes) in parts {
        let overflow = || format!("{part}: sizes overflow the address space");
        let bytes = bytes.with_context(overflow).with_context(context)?;
        total = total
            .checked_add(bytes)
            .with_context(overflow)
            .with_context(context)?;
        by_part.push(format!("{part} {}", crate::weights::show_bytes(bytes)));
    }
    crate::weights::ensure_within_free(&by_part.join(", "), total, free).with_context(context)
}

impl CpuBackend {
    /// Refuses a workspace built for another model (a backend of other sizes built it).
    fn check_built_for(&self, ws: &CpuWorkspace) -> Result<()> {
        ensure!(
            ws.cfg == self.cfg,
            "this workspace was built for {}, the backend runs {}: build one with this \
             backend's `workspace`",
            ws.cfg.arch_name(),
            self.cfg.arch_name()
        );
        Ok(())
    }
}

impl Backend for CpuBackend {
    type Workspace = CpuWorkspace;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn config(&self) -> &DitConfig {
        &self.cfg
    }

    fn workspace(&self, plan: &SamplePlan) -> Result<CpuWorkspace> {
        let cfg = &self.cfg;
        let b = plan.images();
        plan.validate(cfg)?;
        let img = cfg.image_len();
        let rows = plan.model_rows();
        check_workspace_fits(cfg, plan, crate::weights::free_memory_bytes())?;
        let sample_buffer = |what: &str, len: usize| crate::weights::zeros(what, &[len]);
        let mut latents = sample_buffer("latents", b * img)?;
        let noise_source = match &plan.noise {
            NoiseSource::Seed(s) => {
                crate::rng::fill_normal(*s, 0, &mut latents);
                WorkspaceNoise::Seed(*s)
            }
            NoiseSource::File { x_t, noise } => {
                latents.copy_from_slice(x_t);
                WorkspaceNoise::File(noise.clone())
            }
        };
        let mut labels = plan.classes.clone();
        if plan.guidance.is_some() {
            labels.extend(std::iter::repeat_n(cfg.null_class(), b));
        }
        Ok(CpuWorkspace {
            cfg: cfg.clone(),
            images: b,
            guidance: plan.guidance,
            steps: plan.steps,
            labels,
            t_rows: vec![0; rows],
            latents,
            model_in: sample_buffer("model input", rows * img)?,
            guided: sample_buffer("guided output", b * cfg.out_len())?,
            noise: sample_buffer("step noise", b * img)?,
            noise_source,
            acts: Activations::new(cfg, rows)?,
            cache: match plan.reuses {
                true => Some(FeatureCache::new(cfg, rows)?),
                false => None,
            },
        })
    }

    fn step(&self, ws: &mut CpuWorkspace, step: &StepSpec) -> Result<()> {
        let cfg = &self.cfg;
        self.check_built_for(ws)?;
        ensure!(
            step.k < ws.steps,
            "step {} is past the {} steps this workspace was planned for",
            step.k,
            ws.steps
        );
        if step.mode == StepMode::Reuse {
            let Some(cache) = &ws.cache else {
                bail!(
                    "step {}: a reuse step in a workspace planned without one (its plan's \
                     `reuses` is false, so it holds no FORA cache)",
                    step.k
                );
            };
            ensure!(
                cache.valid,
                "step {}: a reuse step needs a computing step before it (the first step must compute)",
                step.k
            );
        }
        let img = cfg.image_len();
        for half in ws.model_in.chunks_exact_mut(ws.images * img) {
            half.copy_from_slice(&ws.latents);
        }
        ws.t_rows.iter_mut().for_each(|t| *t = step.t);
        model::forward(
            cfg,
            &self.weights,
            &mut ws.acts,
            ws.cache.as_mut(),
            step.mode,
            &ws.model_in,
            &ws.t_rows,
            &ws.labels,
        )?;
        let model_out: &[f32] = match ws.guidance {
            Some(g) => {
                ops::guide(
                    &ws.acts.out,
                    2 * ws.images,
                    cfg.out_channels(),
                    cfg.input_size * cfg.input_size,
                    guided_channels(cfg, g.mode),
                    g.scale,
                    &mut ws.guided,
                );
                &ws.guided
            }
            None => &ws.acts.out,
        };
        let add_noise = match step.update {
            StepUpdate::Ddpm { add_noise, .. } | StepUpdate::Ddim { add_noise, .. } => add_noise,
        };
        if add_noise {
            match &ws.noise_source {
                WorkspaceNoise::Seed(s) => {
                    crate::rng::fill_normal(*s, step.k as u64 + 1, &mut ws.noise)
                }
                WorkspaceNoise::File(all) => {
                    let len = ws.noise.len();
                    ws.noise
                        .copy_from_slice(&all[step.k * len..(step.k + 1) * len]);
                }
            }
        }
        crate::diffusion::apply_update(
            &step.update,
            cfg.learn_sigma,
            cfg.in_channels,
            cfg.input_size * cfg.input_size,
            &mut ws.latents,
            model_out,
            &ws.noise,
        );
        Ok(())
    }

    fn latents(&self, ws: &mut CpuWorkspace) -> Result<Vec<f32>> {
        self.check_built_for(ws)?;
        Ok(ws.latents.clone())
    }

    fn forward(
        &self,
        x: &[f32],
        t: &[i64],
        y: &[usize],
        guidance: Option<Guidance>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let n = t.len();
        ensure!(n > 0, "a forward needs at least one row");
        ensure!(
            t.len() == y.len(),
            "got {} timesteps and {} labels: one of each per row",
            t.len(),
            y.len()
        );
        model::check_inputs(cfg, n, x, t, y)?;
        let mut acts = Activations::new(cfg, n)?;
        let Some(g) = guidance else {
            model::forward(
                cfg,
                &self.weights,
                &mut acts,
                None,
                StepMode::Compute,
                x,
                t,
                y,
            )?;
            return Ok(acts.out);
        };
        // The official forward_with_cfg: the model runs on [half; half] with the given t, y;
        // the guided channels of both halves become the guided eps of the conditional rows,
        // every other channel keeps its own row's value.
        ensure!(
            n.is_multiple_of(2),
            "forward with guidance needs an even number of rows (conditional half first), got {n}"
        );
        ensure!(g.scale.is_finite(), "cfg scale {} is not finite", g.scale);
        let half = &x[..n / 2 * cfg.image_len()];
        let combined = [half, half].concat();
        model::forward(
            cfg,
            &self.weights,
            &mut acts,
            None,
            StepMode::Compute,
            &combined,
            t,
            y,
        )?;
        let (out_ch, hw) = (cfg.out_channels(), cfg.input_size * cfg.input_size);
        let mut guided = vec![0f32; n / 2 * cfg.out_len()];
        let channels = guided_channels(cfg, g.mode);
        ops::guide(&acts.out, n, out_ch, hw, channels, g.scale, &mut guided);
        let mut out = acts.out;
        let img = cfg.out_len();
        for half_out in out.chunks_exact_mut(n / 2 * img) {
            for (o, gr) in half_out.chunks_exact_mut(img).zip(guided.chunks_exact(img)) {
                o[..channels * hw].copy_from_slice(&gr[..channels * hw]);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;

    #[test]
    fn a_workspace_past_free_memory_is_refused_by_its_total() {
        let arch = Arch::parse("depth=3,hidden=64,heads=2,patch=2").unwrap();
        let cfg = DitConfig::from_arch(&arch, 4, 32, 10, true).unwrap();
        let mut plan = SamplePlan {
            classes: vec![1; 8],
            guidance: Some(Guidance {
                scale: 4.0,
                mode: GuidanceMode::Official3,
            }),
            steps: 3,
            timesteps: vec![999, 500, 0],
            noise: NoiseSource::Seed(1),
            reuses: true,
        };
        let acts = Activations::bytes(&cfg, 16).unwrap();
        let cache = FeatureCache::bytes(&cfg, 16).unwrap();
        let samples = 4 * ((2 * 8 + 16) * cfg.image_len() + 8 * cfg.out_len()) as u64;
        assert!(samples < cache && cache < acts, "{samples} {cache} {acts}");
        // Each part fits alone; the whole does not, and is refused before anything is made.
        let free = acts + cache - 1;
        let err = format!(
            "{:#}",
            check_workspace_fits(&cfg, &plan, Some(free)).unwrap_err()
        );
        assert!(
            err.contains("a CPU workspace for 16 model rows")
                && err.contains("FORA cache")
                && err.contains("more than this machine has free"),
            "{err}"
        );
        check_workspace_fits(&cfg, &plan, Some(acts + cache + samples)).unwrap();
        check_workspace_fits(&cfg, &plan, None).unwrap();
        // Without reuse steps the cache is left out, and the rest fits.
        plan.reuses = false;
        check_workspace_fits(&cfg, &plan, Some(free)).unwrap();
    }
}
