//! [`CudaBackend`]: the [`Backend`] the sampler drives on an NVIDIA GPU. A workspace holds every
//! device buffer of one sampling run (activations, the modulation table, the FORA cache, the
//! latents, the noise file), allocated once; a step only launches kernels and copies the step's
//! timestep (one f32 per row) to the device.

use super::device::dptr_at;
use super::gemm::{Gemm, GemmImpl};
use super::model::{max_gemm_mn, Activations, GpuModel};
use super::params::{NormalFillParams, SamplerStepParams, UnpatchifyParams};
use super::sampler::guided_channels;
use super::{dptr, Gpu};
use crate::backend::{Backend, Guidance, NoiseSource, SamplePlan, StepMode, StepSpec};
use crate::config::DitConfig;
use crate::weights::DitWeights;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::CudaSlice;

/// A DiT on one GPU.
pub struct CudaBackend {
    gpu: Gpu,
    model: GpuModel,
    gemm_impl: GemmImpl,
}

/// Device state of one sampling run.
pub struct CudaWorkspace {
    acts: Activations,
    gemm: Gemm,
    /// The B conditional rows' latents, f32 [B, C, H, W].
    latents: CudaSlice<f32>,
    /// The noise file's per-step noise, f32 [S, B, C, H, W] (None: Philox from the seed).
    noise: Option<CudaSlice<f32>>,
    seed: u64,
    images: usize,
    steps: usize,
    guidance: Option<Guidance>,
    /// Host staging for the per-row timestep, sized once.
    t_host: Vec<f32>,
}

impl CudaWorkspace {
    /// Device allocations and bytes are fixed after construction; tests read this.
    pub fn rows(&self) -> usize {
        self.acts.rows
    }
}

impl CudaBackend {
    /// Uploads `weights` to `gpu`. The GEMM implementation comes from `FORA_GEMM`
    /// (custom by default, `cublaslt` for the reference path).
    pub fn new(gpu: Gpu, cfg: &DitConfig, weights: &DitWeights) -> Result<CudaBackend> {
        let gemm_impl = GemmImpl::from_env()?;
        CudaBackend::with_gemm(gpu, cfg, weights, gemm_impl)
    }

    pub fn with_gemm(
        gpu: Gpu,
        cfg: &DitConfig,
        weights: &DitWeights,
        gemm_impl: GemmImpl,
    ) -> Result<CudaBackend> {
        let model = GpuModel::upload(&gpu, cfg, weights)?;
        Ok(CudaBackend {
            gpu,
            model,
            gemm_impl,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn gemm_impl(&self) -> GemmImpl {
        self.gemm_impl
    }

    fn sampler_params(&self, ws: &CudaWorkspace, step: &StepSpec) -> Result<SamplerStepParams> {
        let cfg = self.model.config();
        let img = ws.images * cfg.image_len();
        let noise = match &ws.noise {
            Some(n) => {
                ensure!(
                    step.k < ws.steps,
                    "step {} beyond the noise file's {} steps",
                    step.k,
                    ws.steps
                );
                dptr_at(n, step.k * img)
            }
            None => 0,
        };
        let guided = guided_channels(ws.guidance, cfg.in_channels, cfg.out_channels());
        let scale = ws.guidance.map_or(1.0, |g| g.scale);
        let mut p = SamplerStepParams {
            model_out: dptr(&ws.acts.final_out),
            x: dptr(&ws.latents),
            noise,
            seed: ws.seed,
            noise_stream: step.k as u64 + 1,
            images: ws.images as i32,
            rows: ws.acts.rows as i32,
            channels: cfg.in_channels as i32,
            out_channels: cfg.out_channels() as i32,
            height: cfg.input_size as i32,
            width: cfg.input_size as i32,
            patch: cfg.patch as i32,
            guided_channels: guided,
            cfg_scale: scale,
            kind: 0,
            add_noise: 0,
            learn_sigma: cfg.learn_sigma as i32,
            sqrt_recip_abar: 0.0,
            sqrt_recipm1_abar: 0.0,
            post_coef1: 0.0,
            post_coef2: 0.0,
            max_log: 0.0,
            min_log: 0.0,
            sqrt_abar_prev: 0.0,
            dir_coef: 0.0,
            sigma: 0.0,
        };
        super::sampler::set_update(&mut p, &step.update);
        Ok(p)
    }
}

/// Labels of the model rows: `[y; null]` with guidance, `y` without.
fn row_labels(cfg: &DitConfig, classes: &[usize], guided: bool) -> Vec<i32> {
    let mut labels: Vec<i32> = classes.iter().map(|&c| c as i32).collect();
    if guided {
        labels.extend(std::iter::repeat_n(cfg.null_class() as i32, classes.len()));
    }
    labels
}

impl Backend for CudaBackend {
    type Workspace = CudaWorkspace;

    fn name(&self) -> String {
        format!("cuda:{} {}", self.gpu.ordinal(), self.gpu.name())
    }

    fn config(&self) -> &DitConfig {
        self.model.config()
    }

    fn workspace(&self, plan: &SamplePlan) -> Result<CudaWorkspace> {
        let cfg = self.model.config();
        let gpu = &self.gpu;
        let b = plan.images();
        ensure!(b > 0, "a sampling run needs at least one class");
        if let Some(&bad) = plan.classes.iter().find(|&&c| c >= cfg.num_classes) {
            bail!(
                "class {bad} out of range: the model has classes 0..{}",
                cfg.num_classes - 1
            );
        }
        ensure!(plan.steps > 0, "a sampling run needs at least one step");
        if let Some(g) = plan.guidance {
            ensure!(g.scale.is_finite(), "cfg scale {} is not finite", g.scale);
        }
        let rows = plan.model_rows();
        let img = b * cfg.image_len();
        let acts = Activations::new(gpu, cfg, rows, true)?;
        let gemm = Gemm::new(gpu, self.gemm_impl, max_gemm_mn(cfg, rows))?;
        let mut latents = gpu.alloc_zeros::<f32>(img, "the latents")?;
        let (noise, seed) = match &plan.noise {
            NoiseSource::Seed(seed) => {
                super::sampler::normal_fill(
                    gpu,
                    &NormalFillParams {
                        out: dptr(&latents),
                        seed: *seed,
                        stream: 0,
                        n: img as i64,
                    },
                )?;
                (None, *seed)
            }
            NoiseSource::File { x_t, noise } => {
                ensure!(
                    x_t.len() == img,
                    "noise file x_T holds {} values, {b} images need {img}",
                    x_t.len()
                );
                ensure!(
                    noise.len() == plan.steps * img,
                    "noise file noise holds {} values, {} steps x {b} images need {}",
                    noise.len(),
                    plan.steps,
                    plan.steps * img
                );
                gpu.stream()
                    .memcpy_htod(x_t, &mut latents)
                    .context("cannot copy x_T to the device")?;
                (Some(gpu.upload(noise, "the noise file")?), 0)
            }
        };
        let mut acts = acts;
        let labels = row_labels(cfg, &plan.classes, plan.guidance.is_some());
        gpu.stream()
            .memcpy_htod(&labels, &mut acts.labels)
            .context("cannot copy labels to the device")?;
        Ok(CudaWorkspace {
            acts,
            gemm,
            latents,
            noise,
            seed,
            images: b,
            steps: plan.steps,
            guidance: plan.guidance,
            t_host: vec![0.0; rows],
        })
    }

    fn step(&self, ws: &mut CudaWorkspace, step: &StepSpec) -> Result<()> {
        if step.mode == StepMode::Reuse && !ws.acts.cache_valid {
            bail!(
                "step {}: the first step of a run must compute (the FORA cache is empty)",
                step.k
            );
        }
        ensure!(
            (0..1000).contains(&step.t),
            "timestep {} outside 0..999",
            step.t
        );
        ws.t_host.fill(step.t as f32);
        self.gpu
            .stream()
            .memcpy_htod(&ws.t_host, &mut ws.acts.t)
            .context("cannot copy the timestep to the device")?;
        self.model.forward(
            &self.gpu,
            &ws.gemm,
            &mut ws.acts,
            step.mode,
            &ws.latents,
            ws.images,
        )?;
        let p = self.sampler_params(ws, step)?;
        super::sampler::sampler_step(&self.gpu, &p)
    }

    fn latents(&self, ws: &mut CudaWorkspace) -> Result<Vec<f32>> {
        self.gpu.download(&ws.latents)
    }

    fn forward(
        &self,
        x: &[f32],
        t: &[i64],
        y: &[usize],
        guidance: Option<Guidance>,
    ) -> Result<Vec<f32>> {
        let cfg = self.model.config();
        let gpu = &self.gpu;
        let n = t.len();
        crate::cpu::model::check_inputs(cfg, n, x, t, y)?;
        let images = match guidance {
            Some(_) => {
                ensure!(
                    n % 2 == 0,
                    "forward_with_cfg needs an even number of rows, got {n}"
                );
                n / 2
            }
            None => n,
        };
        let mut acts = Activations::new(gpu, cfg, n, false)?;
        let gemm = Gemm::new(gpu, self.gemm_impl, max_gemm_mn(cfg, n))?;
        let latents = gpu.upload(&x[..images * cfg.image_len()], "the forward input x")?;
        let t32: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let y32: Vec<i32> = y.iter().map(|&v| v as i32).collect();
        gpu.stream()
            .memcpy_htod(&t32, &mut acts.t)
            .context("cannot copy t to the device")?;
        gpu.stream()
            .memcpy_htod(&y32, &mut acts.labels)
            .context("cannot copy y to the device")?;
        self.model
            .forward(gpu, &gemm, &mut acts, StepMode::Compute, &latents, images)?;
        let out = gpu.alloc_zeros::<f32>(n * cfg.out_len(), "the forward output")?;
        let guided = guided_channels(guidance, cfg.in_channels, cfg.out_channels());
        let scale = guidance.map_or(1.0, |g| g.scale);
        super::sampler::unpatchify(
            gpu,
            &UnpatchifyParams {
                model_out: dptr(&acts.final_out),
                out: dptr(&out),
                rows: n as i32,
                out_channels: cfg.out_channels() as i32,
                height: cfg.input_size as i32,
                width: cfg.input_size as i32,
                patch: cfg.patch as i32,
                guided_channels: guided,
                cfg_scale: scale,
            },
        )?;
        gpu.download(&out)
    }
}
