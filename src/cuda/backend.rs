//! [`CudaBackend`]: the [`Backend`] the sampler drives on an NVIDIA GPU. A workspace holds every
//! device buffer of one sampling run (activations, the modulation table, the FORA cache, the
//! latents, the noise file, every step's timesteps), allocated once, and two CUDA graphs: the
//! computing forward and the reuse forward, captured once. A step is then one device-to-device
//! copy of its timesteps, one graph launch and the sampler-update kernel: no allocation, no
//! host synchronization. `FORA_CUDA_GRAPHS=0` launches kernel by kernel instead (for profilers
//! that filter by NVTX range, and for debugging).

use super::device::dptr_at;
use super::gemm::{Gemm, GemmImpl};
use super::model::{ada_cols, max_gemm_mn, Activations, CondBuffers, ForwardKind, GpuModel};
use super::params::{NormalFillParams, SamplerStepParams, UnpatchifyParams};
use super::sampler::guided_channels;
use super::{dptr, Gpu};
use crate::backend::{Backend, Guidance, NoiseSource, SamplePlan, StepMode, StepSpec};
use crate::config::DitConfig;
use crate::weights::DitWeights;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{sys, CudaGraph, CudaSlice};

/// A DiT on one GPU.
pub struct CudaBackend {
    gpu: Gpu,
    model: GpuModel,
    options: CudaOptions,
}

/// How the CUDA backend runs a sampling loop. Every choice computes the same numbers; they
/// trade memory and launch overhead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// cuBLASLt (default), our mma.sync GEMMs, or the opt-in Hopper wgmma GEMMs
    /// (`FORA_GEMM=cublaslt|custom|wgmma`).
    pub gemm: GemmImpl,
    /// Replay the computing and the reuse forward as CUDA graphs (`FORA_CUDA_GRAPHS=0`: off).
    pub graphs: bool,
    /// Compute the modulation tables of every step when the workspace is built (one batched
    /// GEMM instead of reading all adaLN weights every step), when they fit in
    /// [`CudaOptions::max_modulation_table_bytes`] (`FORA_PRECOMPUTE_MODULATION=0`: off).
    pub precompute_modulation: bool,
    /// Upper bound for the precomputed tables; a quarter of the free memory bounds it too.
    pub max_modulation_table_bytes: usize,
    /// With cuBLASLt: time the heuristic's first candidates for every GEMM shape when a
    /// workspace is built and keep the fastest, instead of its first choice
    /// (`FORA_LT_AUTOTUNE=1`: on). Off by default: the choice depends on timing, so the bits of
    /// a run reproduce across processes only without it.
    pub lt_autotune: bool,
    /// Run a reuse step's patch embedding, cached residuals and final LayerNorm as one launch
    /// (`fora_reuse_final`) instead of three (`FORA_FUSED_REUSE=1`: on). Off by default until
    /// it has been measured on a GPU; the numbers equal the three-launch path's up to the
    /// final LayerNorm's summation order.
    pub fused_reuse: bool,
}

impl CudaOptions {
    /// Defaults, overridden by `FORA_GEMM`, `FORA_CUDA_GRAPHS`, `FORA_PRECOMPUTE_MODULATION`,
    /// `FORA_LT_AUTOTUNE` and `FORA_FUSED_REUSE`.
    pub fn from_env() -> Result<CudaOptions> {
        let on = |var: &str| std::env::var(var).map_or(true, |v| v.trim() != "0");
        let opt_in = |var: &str| match std::env::var(var) {
            Err(_) => Ok(false),
            Ok(v) => match v.trim() {
                "" | "0" => Ok(false),
                "1" => Ok(true),
                other => bail!("{var} must be 0 or 1, got {other:?}"),
            },
        };
        Ok(CudaOptions {
            gemm: GemmImpl::from_env()?,
            graphs: graphs_enabled(),
            precompute_modulation: on("FORA_PRECOMPUTE_MODULATION"),
            max_modulation_table_bytes: 8 << 30,
            lt_autotune: opt_in("FORA_LT_AUTOTUNE")?,
            fused_reuse: opt_in("FORA_FUSED_REUSE")?,
        })
    }
}

/// Whether the CUDA backend can run `cfg`: its attention kernels exist for head_dim 64, 72
/// and 128 (every official DiT); other models run on the CPU backend.
pub fn supports(cfg: &DitConfig) -> Result<()> {
    let hd = cfg.head_dim() as i32;
    ensure!(
        super::attention::ATTENTION_HEAD_DIMS.contains(&hd),
        "the CUDA backend has attention kernels for head_dim {:?}; {} has head_dim {hd} \
         ({} / {} heads)",
        super::attention::ATTENTION_HEAD_DIMS,
        cfg.arch_name(),
        cfg.hidden,
        cfg.heads
    );
    Ok(())
}

/// Whether steps replay CUDA graphs by default (`FORA_CUDA_GRAPHS=0` turns them off).
pub fn graphs_enabled() -> bool {
    std::env::var("FORA_CUDA_GRAPHS").map_or(true, |v| v.trim() != "0")
}

/// Rows of conditioning computed per batched GEMM when precomputing modulation tables.
const MODULATION_CHUNK_ROWS: usize = 4096;

/// Steps whose modulation tables one batched GEMM computes.
fn modulation_chunk_steps(rows: usize, steps: usize) -> usize {
    (MODULATION_CHUNK_ROWS / rows.max(1)).clamp(1, steps.max(1))
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
    /// Timestep of every (loop step, model row), f32 [S, rows]: a step copies its row into
    /// `acts.t` on the device.
    t_table: CudaSlice<f32>,
    timesteps: Vec<i64>,
    /// Every step's modulation table, f32 [S, rows, ada_cols], when precomputed: a step copies
    /// its table into `acts.modulation` and the forward skips the conditioning path.
    mod_table: Option<CudaSlice<f32>>,
    /// Captured forwards, `[compute, reuse]` (None: graphs disabled).
    graphs: Option<[CudaGraph; 2]>,
    /// True once a computing step has filled the FORA cache.
    cache_valid: bool,
}

impl CudaWorkspace {
    /// Device allocations and bytes are fixed after construction; tests read this.
    pub fn rows(&self) -> usize {
        self.acts.rows
    }

    /// Whether every step's modulation table was computed up front.
    pub fn modulation_precomputed(&self) -> bool {
        self.mod_table.is_some()
    }

    /// Whether steps replay CUDA graphs.
    pub fn uses_graphs(&self) -> bool {
        self.graphs.is_some()
    }
}

impl CudaBackend {
    /// Uploads `weights` to `gpu`, with [`CudaOptions::from_env`].
    pub fn new(gpu: Gpu, cfg: &DitConfig, weights: &DitWeights) -> Result<CudaBackend> {
        CudaBackend::with_options(gpu, cfg, weights, CudaOptions::from_env()?)
    }

    /// Uploads `weights` to `gpu` with explicit options.
    pub fn with_options(
        gpu: Gpu,
        cfg: &DitConfig,
        weights: &DitWeights,
        options: CudaOptions,
    ) -> Result<CudaBackend> {
        supports(cfg)?;
        let model = GpuModel::upload(&gpu, cfg, weights)?;
        Ok(CudaBackend {
            gpu,
            model,
            options,
        })
    }

    /// [`CudaBackend::new`] with the GEMM implementation chosen by the caller.
    pub fn with_gemm(
        gpu: Gpu,
        cfg: &DitConfig,
        weights: &DitWeights,
        gemm: GemmImpl,
    ) -> Result<CudaBackend> {
        let options = CudaOptions {
            gemm,
            ..CudaOptions::from_env()?
        };
        CudaBackend::with_options(gpu, cfg, weights, options)
    }

    /// The options later workspaces are built with.
    pub fn options(&self) -> CudaOptions {
        self.options
    }

    /// Changes the options of later workspaces (the weights stay).
    pub fn set_options(&mut self, options: CudaOptions) {
        self.options = options;
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn gemm_impl(&self) -> GemmImpl {
        self.options.gemm
    }

    /// Every step's modulation table, computed in chunks of batched GEMMs, or None when the
    /// tables would not fit the options' bound.
    /// Whether every step's modulation table of `rows` rows is to be precomputed: asked for,
    /// and within the options' bound and a quarter of the free device memory.
    fn modulation_tables_fit(&self, plan: &SamplePlan, rows: usize) -> Result<bool> {
        let bytes = plan.steps * rows * ada_cols(self.model.config()) * 4;
        Ok(self.options.precompute_modulation
            && bytes <= self.options.max_modulation_table_bytes
            && bytes <= self.gpu.mem_info()?.0 / 4)
    }

    /// Every step's modulation table, computed in chunks of batched GEMMs.
    fn precompute_modulation(
        &self,
        gemm: &Gemm,
        plan: &SamplePlan,
        rows: usize,
        labels: &[i32],
        t_table: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let cfg = self.model.config();
        let gpu = &self.gpu;
        let cols = ada_cols(cfg);
        let chunk_steps = modulation_chunk_steps(rows, plan.steps);
        let chunk_rows = chunk_steps * rows;
        let table = gpu.alloc_zeros::<f32>(plan.steps * rows * cols, "the modulation tables")?;
        let cond = CondBuffers::new(gpu, cfg, chunk_rows)?;
        let chunk_labels: Vec<i32> = (0..chunk_steps)
            .flat_map(|_| labels.iter().copied())
            .collect();
        let chunk_labels = gpu.upload(&chunk_labels, "the labels of a step chunk")?;
        for k0 in (0..plan.steps).step_by(chunk_steps) {
            let n = (plan.steps - k0).min(chunk_steps) * rows;
            self.model.modulation(
                gpu,
                gemm,
                &cond,
                n,
                dptr_at(t_table, k0 * rows),
                dptr(&chunk_labels),
                dptr_at(&table, k0 * rows * cols),
            )?;
        }
        // The chunk buffers are freed when this returns; wait so that they are not in use.
        gpu.synchronize()?;
        Ok(table)
    }

    /// Records one forward of the workspace's buffers as a CUDA graph (nothing runs).
    fn capture(
        &self,
        gemm: &Gemm,
        acts: &Activations,
        mode: StepMode,
        latents: &CudaSlice<f32>,
        images: usize,
        with_modulation: bool,
    ) -> Result<CudaGraph> {
        let stream = self.gpu.stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("cannot start capturing a CUDA graph")?;
        let recorded = self.model.forward(
            &self.gpu,
            gemm,
            acts,
            self.forward_kind(mode, with_modulation),
            latents,
            images,
        );
        // End the capture whatever happened, so that the stream stays usable.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded.with_context(|| format!("while capturing the {mode:?} forward"))?;
        let graph = graph
            .with_context(|| format!("cannot instantiate the {mode:?} forward graph"))?
            .with_context(|| format!("the {mode:?} forward graph is empty"))?;
        graph.upload().context("cannot upload a CUDA graph")?;
        Ok(graph)
    }

    fn forward_kind(&self, mode: StepMode, with_modulation: bool) -> ForwardKind {
        ForwardKind {
            mode,
            with_modulation,
            fused_reuse: self.options.fused_reuse,
        }
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
        plan.validate(cfg)?;
        let rows = plan.model_rows();
        let img = b * cfg.image_len();
        let mut acts = Activations::new(gpu, cfg, rows, true)?;
        let precompute = self.modulation_tables_fit(plan, rows)?;
        // The batched conditioning GEMMs of the precomputation are the largest when they run.
        let chunk_mn = if precompute {
            modulation_chunk_steps(rows, plan.steps) * rows * ada_cols(cfg)
        } else {
            0
        };
        let gemm = Gemm::new(gpu, self.options.gemm, max_gemm_mn(cfg, rows).max(chunk_mn))?;
        gemm.set_lt_autotune(self.options.lt_autotune);
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
        let labels = row_labels(cfg, &plan.classes, plan.guidance.is_some());
        gpu.stream()
            .memcpy_htod(&labels, &mut acts.labels)
            .context("cannot copy labels to the device")?;
        let t_rows: Vec<f32> = plan
            .timesteps
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t as f32, rows))
            .collect();
        let t_table = gpu.upload(&t_rows, "the timestep table")?;
        let mod_table = if precompute {
            Some(self.precompute_modulation(&gemm, plan, rows, &labels, &t_table)?)
        } else {
            None
        };
        let with_modulation = mod_table.is_none();
        if self.options.graphs && gemm.lt_autotune() {
            // A capture cannot time anything: run both forwards once uncaptured so that every
            // GEMM shape is tuned before it is recorded. Harmless: the first step computes and
            // overwrites the activations and caches these write.
            for mode in [StepMode::Compute, StepMode::Reuse] {
                self.model
                    .forward(
                        gpu,
                        &gemm,
                        &acts,
                        self.forward_kind(mode, with_modulation),
                        &latents,
                        b,
                    )
                    .context("while tuning the cuBLASLt GEMMs")?;
            }
        }
        let graphs = if self.options.graphs {
            let capture = |mode| self.capture(&gemm, &acts, mode, &latents, b, with_modulation);
            Some([capture(StepMode::Compute)?, capture(StepMode::Reuse)?])
        } else {
            None
        };
        gpu.synchronize()?;
        Ok(CudaWorkspace {
            acts,
            gemm,
            latents,
            noise,
            seed,
            images: b,
            steps: plan.steps,
            guidance: plan.guidance,
            t_table,
            timesteps: plan.timesteps.clone(),
            mod_table,
            graphs,
            cache_valid: false,
        })
    }

    fn step(&self, ws: &mut CudaWorkspace, step: &StepSpec) -> Result<()> {
        if step.mode == StepMode::Reuse && !ws.cache_valid {
            bail!(
                "step {}: the first step of a run must compute (the FORA cache is empty)",
                step.k
            );
        }
        ensure!(
            ws.timesteps.get(step.k) == Some(&step.t),
            "step {} has timestep {}, the plan said {:?}",
            step.k,
            step.t,
            ws.timesteps.get(step.k)
        );
        let rows = ws.acts.rows;
        let stream = self.gpu.stream();
        let src = ws.t_table.slice(step.k * rows..(step.k + 1) * rows);
        stream
            .memcpy_dtod(&src, &mut ws.acts.t)
            .context("cannot select the step's timesteps")?;
        if let Some(table) = &ws.mod_table {
            let len = ws.acts.modulation.len();
            let src = table.slice(step.k * len..(step.k + 1) * len);
            stream
                .memcpy_dtod(&src, &mut ws.acts.modulation)
                .context("cannot select the step's modulation table")?;
        }
        match &ws.graphs {
            Some(graphs) => {
                let graph = &graphs[(step.mode == StepMode::Reuse) as usize];
                graph
                    .launch()
                    .context("cannot launch the captured forward")?;
            }
            None => self.model.forward(
                &self.gpu,
                &ws.gemm,
                &ws.acts,
                self.forward_kind(step.mode, ws.mod_table.is_none()),
                &ws.latents,
                ws.images,
            )?,
        }
        if step.mode == StepMode::Compute {
            ws.cache_valid = true;
        }
        let _update = crate::nvtx_range!("sampler_step");
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
                    n.is_multiple_of(2),
                    "forward_with_cfg needs an even number of rows, got {n}"
                );
                n / 2
            }
            None => n,
        };
        let mut acts = Activations::new(gpu, cfg, n, false)?;
        let gemm = Gemm::new(gpu, self.options.gemm, max_gemm_mn(cfg, n))?;
        gemm.set_lt_autotune(self.options.lt_autotune);
        let latents = gpu.upload(&x[..images * cfg.image_len()], "the forward input x")?;
        let t32: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let y32: Vec<i32> = y.iter().map(|&v| v as i32).collect();
        gpu.stream()
            .memcpy_htod(&t32, &mut acts.t)
            .context("cannot copy t to the device")?;
        gpu.stream()
            .memcpy_htod(&y32, &mut acts.labels)
            .context("cannot copy y to the device")?;
        self.model.forward(
            gpu,
            &gemm,
            &acts,
            self.forward_kind(StepMode::Compute, true),
            &latents,
            images,
        )?;
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
