//! The benchmark harness (`fora bench`, `cargo bench --bench dit`): DiT + FORA on one NVIDIA GPU,
//! measured with CUDA events on the device's stream.
//!
//! Sections (each can be selected with `--sections`):
//! - **ceilings**: what the card can do, measured in the same run: a large bf16 cuBLASLt GEMM
//!   (TFLOP/s); memory bandwidth three ways (GB/s): cuMemcpyDtoD and our `bandwidth_copy`
//!   kernel (read + write bytes), and our `bandwidth_read` kernel (bytes read). A memory-bound
//!   kernel's "% ceiling" is of the best of the three: most of ours mostly read, and a copy
//!   alone understates what reading reaches.
//! - **kernels**: every GEMM of a DiT block at the model's shapes (qkv, proj, fc1, fc2, the
//!   stacked adaLN GEMM, the final Linear), the custom kernel with its fused epilogue against
//!   cuBLASLt (its fused bias/GELU where it has one) and cuBLASLt + the stand-alone epilogue
//!   kernel; flash attention (TFLOP/s); the FORA reuse kernel and LayerNorm+modulate (GB/s).
//!   Inputs rotate through copies that together exceed the L2 cache (4x L2, >= 256 MiB), and
//!   each time is per launch, from CUDA-graph replays of several launches, so the host's launch
//!   cost (and cuBLASLt's per-call heuristic query) does not count, as in a captured step.
//! - **steps**: one sampler step as the sampler runs it ([`Backend::step`] on the backend's
//!   workspace: the captured compute or reuse graph, the sampler update), per batch of model
//!   rows (rows include the CFG half), with effective TFLOP/s `2 * macs_per_row * rows / time`
//!   and the launches of one step, counted by capturing a step of a graph-less workspace and
//!   counting the graph's nodes.
//! - **e2e**: whole sampling runs (250-step DDPM, one image with CFG) for FORA N = 1..5: wall
//!   time of the loop and the realized speedup over N = 1 next to the theoretical one.
//!
//! Every timing is the median of `--runs` (default 20) back-to-back runs after `--warmup` runs
//! (for kernels, runs are graph replays):
//! the host enqueues run i+1 while the GPU executes run i, as the sampler does, so a time is
//! the GPU's unless the host cannot keep up (then it is the host's, which is what a user sees).
//! A measurement that fails is recorded as an error (shown as "—") and the others go on; the
//! JSON (`--json`, else `$FORA_BENCH_JSON`, else `target/bench.json`) is rewritten after every
//! section so a crash loses little, and the Markdown is written beside it at the end. Nothing
//! printed was not measured. `tools/bench_torch.py` times PyTorch the same way and
//! `tools/bench_report.py` merges both JSONs into the comparison tables and a plot.

use crate::backend::{
    Backend, Guidance, GuidanceMode, NoiseSource, SamplePlan, StepMode, StepSpec,
};
use crate::cache::policy_for_interval;
use crate::config::{Arch, DitConfig};
use crate::cuda::attention::{attention, attention_flops, attention_with, AttentionImpl};
use crate::cuda::backend::CudaOptions;
use crate::cuda::bandwidth::{bandwidth_copy, bandwidth_read, bandwidth_read_words};
use crate::cuda::cublaslt::{CublasLt, LtEpilogue, LtMatmul, LtOutput, LtRun};
use crate::cuda::device::KernelLauncher;
use crate::cuda::embed::patch_embed;
use crate::cuda::fora::{fora_reuse, fora_reuse_final_with, ReuseTokens};
use crate::cuda::gemm::{Epilogue, Gemm, GemmImpl, TmaTile};
use crate::cuda::model::{ada_cols, reuse_final_params};
use crate::cuda::norm::{layernorm_modulate_with, residual_layernorm_with, RowWarps};
use crate::cuda::params::{
    AttentionParams, BandwidthParams, ForaReuseFinalParams, ForaReuseParams, GemmParams,
    LayerNormModulateParams, PatchEmbedParams, ResidualLayerNormParams, SamplerStepParams,
};
use crate::cuda::sampler::{guided_channels, sampler_step, set_update};
use crate::cuda::{dptr, CudaBackend, Gpu};
use crate::diffusion::{Diffusion, SamplerKind};
use crate::sampler::{Sampler, SamplerOptions};
use crate::weights::DitWeights;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use serde_json::{json, Value};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the JSON report goes by default (relative to the working directory), unless
/// `FORA_BENCH_JSON` names another path (e.g. `$OUT/bench.json` on a device runner).
pub const DEFAULT_JSON: &str = "target/bench.json";
/// Identifies the JSON layout for `tools/bench_report.py`.
pub const SCHEMA: &str = "fora-bench/1";
/// Rotated input bytes of a kernel measured alone: at least this, and at least 4x the L2.
const MIN_ROTATE_BYTES: usize = 256 << 20;
/// At most this many copies of a kernel's buffers.
const MAX_COPIES: usize = 64;
/// Random values are uploaded in chunks of this many elements (an odd count, so a repeated
/// chunk does not line up with matrix rows).
const FILL_CHUNK: usize = (1 << 22) - 3;

/// Which GEMM implementation the step and end-to-end sections run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GemmChoice {
    /// The custom kernels with fused epilogues.
    Custom,
    /// cuBLASLt (fused bias/GELU where it has them) + the epilogue kernel.
    Cublaslt,
    /// Both, cuBLASLt first (end to end runs the first only).
    Both,
    /// The Hopper wgmma kernels (compute capability 9.x only; opt-in, not the default).
    Wgmma,
    /// The warp-specialized Hopper TMA kernels (compute capability 9.x only; opt-in).
    Tma,
}

/// A part of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Ceilings,
    Kernels,
    Steps,
    E2e,
}

/// Arguments of `fora bench` and of the `dit` bench binary.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct BenchArgs {
    /// Checkpoint to benchmark (safetensors, official DiT key layout). Default: random weights
    /// of --arch (DiT-XL/2) at --input-size, so no checkpoint is needed.
    #[arg(long, value_name = "CKPT")]
    pub model: Option<PathBuf>,
    /// Architecture: of the random model (default DiT-XL/2), or of --model when its metadata
    /// does not record it.
    #[arg(long)]
    pub arch: Option<String>,
    /// Latent size of the random model: 32 (256 px, default) or 64 (512 px).
    #[arg(long, conflicts_with = "model")]
    pub input_size: Option<usize>,
    /// Seed of the random weights and of the sampling noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A smaller set: rows 2 and 64, kernels at rows 2, N = 1 and 3 once, a 4096^3 ceiling.
    #[arg(long)]
    pub quick: bool,
    /// Sections to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub sections: Option<Vec<Section>>,
    /// Model rows per step, CFG half included (even: rows/2 images with CFG; odd: no CFG).
    /// Default 2,16,64,256.
    #[arg(long, value_delimiter = ',')]
    pub batches: Option<Vec<usize>>,
    /// Model rows of the per-kernel shapes (M = rows x tokens). Default 2,256.
    #[arg(long, value_delimiter = ',')]
    pub kernel_batches: Option<Vec<usize>>,
    /// FORA intervals N of the end-to-end runs (1 = no caching). Default 1,2,3,4,5.
    #[arg(long, value_delimiter = ',')]
    pub intervals: Option<Vec<usize>>,
    /// DDPM steps of the end-to-end runs.
    #[arg(long, default_value_t = 250)]
    pub steps: usize,
    /// End-to-end runs per interval (median). Default 3 (1 with --quick).
    #[arg(long)]
    pub e2e_reps: Option<usize>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Untimed runs before each measurement.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// GEMM implementation of the step and end-to-end sections. Default both (cuBLASLt with
    /// --quick).
    #[arg(long, value_enum)]
    pub gemm: Option<GemmChoice>,
    /// Side of the square bf16 GEMM that measures the card's ceiling. Default 8192 (4096 with
    /// --quick).
    #[arg(long)]
    pub ceiling_size: Option<usize>,
    /// MiB the memory ceilings (copy and read) move. Default 1024.
    #[arg(long)]
    pub copy_mib: Option<usize>,
    /// Classifier-free guidance scale of the CFG batches.
    #[arg(long, default_value_t = 4.0, allow_negative_numbers = true)]
    pub cfg_scale: f32,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// JSON report path (default: $FORA_BENCH_JSON, else target/bench.json). The Markdown
    /// report is also written beside it (same name, .md).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Bracket every timed loop with cuProfilerStart/Stop (for `nsys --capture-range=cudaProfilerApi`
    /// or `ncu --profile-from-start off`).
    #[arg(long)]
    pub profiler_api: bool,
    /// Write the benchmark's random weights (official key layout, f32, config in the metadata)
    /// to this safetensors file and exit: the PyTorch reference can load them. Needs no GPU.
    #[arg(long, value_name = "PATH")]
    pub save_weights: Option<PathBuf>,
}

/// [`BenchArgs`] with every default resolved and every value checked.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchPlan {
    pub quick: bool,
    pub sections: Vec<Section>,
    pub batches: Vec<usize>,
    pub kernel_batches: Vec<usize>,
    pub intervals: Vec<usize>,
    pub steps: usize,
    pub e2e_reps: usize,
    pub runs: usize,
    pub warmup: usize,
    pub gemms: Vec<GemmImpl>,
    pub ceiling_size: usize,
    pub copy_bytes: usize,
    pub cfg_scale: f32,
    /// The JSON report; the Markdown goes beside it with extension .md.
    pub json: PathBuf,
}

impl BenchArgs {
    /// Resolves defaults (full or `--quick` set) and validates every value.
    pub fn plan(&self) -> Result<BenchPlan> {
        let q = self.quick;
        let list = |given: &Option<Vec<usize>>, full: &[usize], quick: &[usize], what: &str| {
            let v = given
                .clone()
                .unwrap_or_else(|| if q { quick } else { full }.to_vec());
            ensure!(!v.is_empty(), "--{what}: give at least one value");
            if let Some(bad) = v.iter().find(|&&x| x == 0) {
                bail!("--{what}: {bad} is not a positive number");
            }
            Ok(v)
        };
        let batches = list(&self.batches, &[2, 16, 64, 256], &[2, 64], "batches")?;
        let kernel_batches = list(&self.kernel_batches, &[2, 256], &[2], "kernel-batches")?;
        let intervals = list(&self.intervals, &[1, 2, 3, 4, 5], &[1, 3], "intervals")?;
        ensure!(
            (1..=1000).contains(&self.steps),
            "--steps {}: the diffusion process has 1 to 1000 steps",
            self.steps
        );
        ensure!(self.runs > 0, "--runs must be at least 1");
        let e2e_reps = self.e2e_reps.unwrap_or(if q { 1 } else { 3 });
        ensure!(e2e_reps > 0, "--e2e-reps must be at least 1");
        let ceiling_size = self.ceiling_size.unwrap_or(if q { 4096 } else { 8192 });
        ensure!(
            ceiling_size >= 256 && ceiling_size.is_multiple_of(8),
            "--ceiling-size {ceiling_size}: use a multiple of 8, at least 256"
        );
        let copy_mib = self.copy_mib.unwrap_or(1024);
        ensure!(
            (1..=65536).contains(&copy_mib),
            "--copy-mib {copy_mib}: use 1 to 65536"
        );
        ensure!(
            self.cfg_scale.is_finite(),
            "--cfg-scale {} is not a finite number",
            self.cfg_scale
        );
        if let Some(s) = self.input_size {
            ensure!(s > 0, "--input-size must be positive");
        }
        let gemm = self.gemm.unwrap_or(if q {
            GemmChoice::Cublaslt
        } else {
            GemmChoice::Both
        });
        let gemms = match gemm {
            GemmChoice::Custom => vec![GemmImpl::Custom],
            GemmChoice::Cublaslt => vec![GemmImpl::CublasLt],
            GemmChoice::Wgmma => vec![GemmImpl::Wgmma],
            GemmChoice::Tma => vec![GemmImpl::Tma],
            // The default implementation first: the end-to-end section runs on the first only.
            GemmChoice::Both => vec![GemmImpl::CublasLt, GemmImpl::Custom],
        };
        let mut sections = self.sections.clone().unwrap_or_else(|| {
            vec![
                Section::Ceilings,
                Section::Kernels,
                Section::Steps,
                Section::E2e,
            ]
        });
        ensure!(
            !sections.is_empty(),
            "--sections: give at least one section"
        );
        sections.dedup();
        Ok(BenchPlan {
            quick: q,
            sections,
            batches,
            kernel_batches,
            intervals,
            steps: self.steps,
            e2e_reps,
            runs: self.runs,
            warmup: self.warmup,
            gemms,
            ceiling_size,
            copy_bytes: copy_mib << 20,
            cfg_scale: self.cfg_scale,
            json: self.json.clone().unwrap_or_else(|| {
                std::env::var_os("FORA_BENCH_JSON")
                    .filter(|v| !v.is_empty())
                    .map_or_else(|| PathBuf::from(DEFAULT_JSON), PathBuf::from)
            }),
        })
    }
}

/// Parses the command line of the `dit` bench binary: `cargo bench` runs it as
/// `dit [ARGS..] --bench`, the device runner as `dit --bench $BENCH_ARGS`. Returns the
/// arguments and whether `--bench` was given (without it, cargo is running the binary as a
/// test and nothing should be measured).
pub fn args_from_bench_argv<I, T>(argv: I) -> std::result::Result<(BenchArgs, bool), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    use clap::Parser;
    #[derive(clap::Parser, Debug)]
    #[command(
        name = "dit-bench",
        about = "DiT + FORA benchmark (the same as `fora bench`)"
    )]
    struct BenchCli {
        /// Set by `cargo bench`; without it nothing is measured.
        #[arg(long)]
        bench: bool,
        #[command(flatten)]
        args: BenchArgs,
    }
    let cli = BenchCli::try_parse_from(argv)?;
    Ok((cli.args, cli.bench))
}

/// Timing statistics of one measurement, in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Stats {
    /// Statistics of measured times (an even count takes the mean of the two middle values).
    pub fn from_samples(samples_ms: &[f64]) -> Result<Stats> {
        ensure!(!samples_ms.is_empty(), "no timing samples");
        if let Some(bad) = samples_ms.iter().find(|v| !v.is_finite() || **v < 0.0) {
            bail!("timing sample {bad} ms is not a finite non-negative time");
        }
        let mut s = samples_ms.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            0.5 * (s[n / 2 - 1] + s[n / 2])
        };
        Ok(Stats {
            runs: n,
            median_ms: median,
            min_ms: s[0],
            max_ms: s[n - 1],
            mean_ms: s.iter().sum::<f64>() / n as f64,
        })
    }

    /// Every time multiplied by `f` (per-launch times from per-replay times).
    pub fn scaled(&self, f: f64) -> Stats {
        Stats {
            runs: self.runs,
            median_ms: self.median_ms * f,
            min_ms: self.min_ms * f,
            max_ms: self.max_ms * f,
            mean_ms: self.mean_ms * f,
        }
    }

    fn json(&self) -> Value {
        json!({
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
            "runs": self.runs,
        })
    }
}

/// TFLOP/s of `flops` floating-point operations in `ms` milliseconds.
pub fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
}

/// GB/s (10^9 bytes) of `bytes` moved in `ms` milliseconds.
pub fn gbps(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

/// Copies of a kernel's buffers (`set_bytes` each) so that together they hold at least
/// `rotate_bytes`: consecutive runs then read inputs that are not in L2.
pub fn rotation_copies(set_bytes: usize, rotate_bytes: usize) -> usize {
    if set_bytes == 0 {
        return 1;
    }
    rotate_bytes.div_ceil(set_bytes).clamp(1, MAX_COPIES)
}

/// Launches per CUDA graph when a kernel is timed alone: enough for a replay of about 0.2 ms
/// (so a graph launch's host cost is hidden), at least one per rotated buffer copy, at most 64.
/// `single_ms` is one launch's time, measured roughly.
pub fn launches_per_graph(single_ms: f64, copies: usize) -> usize {
    let by_time = if single_ms.is_finite() && single_ms > 0.0 {
        (0.2 / single_ms).ceil().min(64.0) as usize
    } else {
        64
    };
    by_time.max(copies).clamp(1, MAX_COPIES)
}

/// The images and guidance of a batch of `rows` model rows: even rows are rows/2 images with
/// CFG (the batch `[cond; uncond]`), odd rows are that many images without guidance.
pub fn rows_request(
    rows: usize,
    num_classes: usize,
    cfg_scale: f32,
) -> (Vec<usize>, Option<Guidance>) {
    let (images, guidance) = if rows.is_multiple_of(2) {
        (
            rows / 2,
            Some(Guidance {
                scale: cfg_scale,
                mode: GuidanceMode::Official3,
            }),
        )
    } else {
        (rows, None)
    };
    let classes = (0..images).map(|b| b % num_classes.max(1)).collect();
    (classes, guidance)
}

/// `YYYY-MM-DD` (UTC) of a Unix time.
pub fn utc_date(unix_secs: u64) -> String {
    // Days to civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_date(secs)
}

/// The card.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub sm_count: usize,
    pub l2_bytes: usize,
    pub memory_bytes: usize,
}

/// The model benchmarked.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub arch: String,
    pub input_size: usize,
    pub tokens: usize,
    pub hidden: usize,
    pub depth: usize,
    pub heads: usize,
    pub macs_per_row: u64,
    /// "random (seed 0)" or the checkpoint path.
    pub weights: String,
}

impl ModelInfo {
    pub fn new(cfg: &DitConfig, weights: String) -> ModelInfo {
        ModelInfo {
            arch: cfg.arch_name(),
            input_size: cfg.input_size,
            tokens: cfg.tokens(),
            hidden: cfg.hidden,
            depth: cfg.depth,
            heads: cfg.heads,
            macs_per_row: cfg.macs_per_row(),
            weights,
        }
    }
}

/// A measured ceiling of the card.
#[derive(Clone, Debug, PartialEq)]
pub struct Ceiling {
    /// "bf16 GEMM 8192^3 (cuBLASLt)", "device copy 1024 MiB (cuMemcpyDtoD, ...)".
    pub what: String,
    pub stats: Stats,
    /// TFLOP/s (GEMM) or GB/s (memory) at the median time.
    pub rate: f64,
}

/// Whether a step ran the blocks or reused the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    Full,
    Reuse,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Full => "full",
            StepKind::Reuse => "reuse",
        }
    }
}

/// Graph nodes one step enqueues, by type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchCount {
    pub kernels: usize,
    pub memcpys: usize,
    pub memsets: usize,
    pub other: usize,
}

/// One per-step measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    /// "custom" or "cublaslt".
    pub gemm: String,
    pub rows: usize,
    pub kind: StepKind,
    pub stats: Option<Stats>,
    /// What one step enqueues when it is launched kernel by kernel (the captured graphs hold
    /// the same kernels).
    pub launches: Option<LaunchCount>,
    /// Whether the timed workspace replayed CUDA graphs (None: no workspace).
    pub graphs: Option<bool>,
    /// Whether the timed workspace computed every step's modulation table up front.
    pub precomputed_modulation: Option<bool>,
    /// Host time to issue one step (the timed runs' wall clock before the final
    /// synchronization, per run): when it reaches the step's GPU time, the host, not the GPU,
    /// sets the pace of back-to-back steps.
    pub host_issue_ms: Option<f64>,
}

/// One end-to-end configuration (median over the reps).
#[derive(Clone, Debug, PartialEq)]
pub struct E2eRow {
    pub gemm: String,
    pub interval: usize,
    pub steps: usize,
    pub rows: usize,
    pub computed: usize,
    pub reused: usize,
    pub reps: usize,
    /// The denoising loop and the copy of the latents to the host.
    pub loop_ms: f64,
    /// Workspace build (allocation, x_T, graph capture).
    pub setup_ms: f64,
    /// Everything `Sampler::sample` did.
    pub wall_ms: f64,
    /// Whether every final latent value was finite (random weights may not keep them so; the
    /// times do not depend on it).
    pub finite: bool,
}

/// What a kernel row's rate is measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// TFLOP/s, against the GEMM ceiling.
    Compute,
    /// GB/s, against the copy ceiling.
    Memory,
}

/// One per-kernel measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRow {
    /// "qkv", "proj", "fc1", "fc2", "adaLN", "final", "attention", "patch_embed",
    /// "sampler_step", "fora_reuse", "fora_reuse_final", "layernorm", "residual_ln".
    pub name: String,
    /// "custom", "cublaslt", "cublaslt+epilogue", "cublaslt-tuned" (GEMMs); "custom" otherwise.
    pub imp: String,
    /// Model rows of the shape.
    pub rows: usize,
    /// "M=512 N=3456 K=1152", "B=2 H=16 T=256 d=72", "1.2 GB".
    pub shape: String,
    pub bound: Bound,
    /// FLOPs (Compute) or bytes (Memory) of one launch.
    pub work: f64,
    /// Per-launch times: each sample is one graph replay of this many launches, divided.
    pub stats: Option<Stats>,
    pub launches_per_replay: usize,
}

impl KernelRow {
    /// TFLOP/s or GB/s at the median.
    pub fn rate(&self) -> Option<f64> {
        let ms = self.stats.as_ref()?.median_ms;
        Some(match self.bound {
            Bound::Compute => tflops(self.work, ms),
            Bound::Memory => gbps(self.work, ms),
        })
    }
}

/// A measurement that failed.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchError {
    pub section: String,
    pub what: String,
    pub error: String,
}

/// Everything one benchmark run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub date: String,
    pub device: Option<DeviceInfo>,
    pub model: ModelInfo,
    pub warmup: usize,
    pub runs: usize,
    pub quick: bool,
    /// The backend options in this run (`CudaOptions::from_env`: `FORA_CUDA_GRAPHS`,
    /// `FORA_FUSED_REUSE`, ...); each step row says what its workspace did.
    pub options: CudaOptions,
    /// The flash-attention implementation the steps ran (`FORA_ATTENTION`, e.g. "v1").
    pub attention: String,
    pub cfg_scale: f32,
    pub gemm_ceiling: Option<Ceiling>,
    /// Memory bandwidth measured in several ways (copy, copy kernel, read kernel); the best is
    /// the memory ceiling ([`Report::memory_ceiling`]).
    pub memory_ceilings: Vec<Ceiling>,
    pub steps: Vec<StepRow>,
    pub e2e: Vec<E2eRow>,
    pub kernels: Vec<KernelRow>,
    pub errors: Vec<BenchError>,
}

/// `v` with `decimals` decimals, or "—" when not measured.
pub fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "—".to_string(),
    }
}

fn num(v: Option<f64>) -> Value {
    match v {
        Some(x) if x.is_finite() => json!(x),
        _ => Value::Null,
    }
}

impl Report {
    pub fn new(model: ModelInfo, plan: &BenchPlan, options: &CudaOptions) -> Report {
        Report {
            date: today(),
            device: None,
            model,
            warmup: plan.warmup,
            runs: plan.runs,
            quick: plan.quick,
            options: *options,
            attention: AttentionImpl::V1.name().to_string(),
            cfg_scale: plan.cfg_scale,
            gemm_ceiling: None,
            memory_ceilings: Vec::new(),
            steps: Vec::new(),
            e2e: Vec::new(),
            kernels: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Records a failed measurement (printed to stderr at once, listed in the report).
    pub fn error(&mut self, section: &str, what: &str, e: &anyhow::Error) {
        eprintln!("bench: {section}: {what} FAILED: {e:#}");
        self.errors.push(BenchError {
            section: section.into(),
            what: what.into(),
            error: format!("{e:#}"),
        });
    }

    /// Effective TFLOP/s of a full step: 2 x MACs of every row / time.
    pub fn step_tflops(&self, row: &StepRow) -> Option<f64> {
        if row.kind != StepKind::Full {
            return None;
        }
        let ms = row.stats.as_ref()?.median_ms;
        Some(tflops(
            2.0 * self.model.macs_per_row as f64 * row.rows as f64,
            ms,
        ))
    }

    /// The highest of the measured memory bandwidths.
    pub fn memory_ceiling(&self) -> Option<&Ceiling> {
        self.memory_ceilings
            .iter()
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
    }

    /// Percent of the measured ceiling of `bound`.
    pub fn pct_of_ceiling(&self, rate: Option<f64>, bound: Bound) -> Option<f64> {
        let ceiling = match bound {
            Bound::Compute => self.gemm_ceiling.as_ref(),
            Bound::Memory => self.memory_ceiling(),
        }?;
        Some(100.0 * rate? / ceiling.rate)
    }

    /// The best cuBLASLt time of the same GEMM (fused or + epilogue kernel) over this row's
    /// time, for our own GEMM kernels' rows (custom, wgmma, tma): > 1 means ours is faster.
    pub fn vs_cublaslt(&self, row: &KernelRow) -> Option<f64> {
        let ours = matches!(row.imp.as_str(), "custom" | "wgmma" | "tma");
        if !ours || row.bound != Bound::Compute || row.name == "attention" {
            return None;
        }
        let ours = row.stats.as_ref()?.median_ms;
        let best = self
            .kernels
            .iter()
            // Whole GEMMs with their epilogue only: a product-only row does less work.
            .filter(|k| {
                k.name == row.name
                    && k.rows == row.rows
                    && k.imp.starts_with("cublaslt")
                    && !k.imp.contains("product")
            })
            .filter_map(|k| k.stats.as_ref().map(|s| s.median_ms))
            .min_by(f64::total_cmp)?;
        Some(best / ours)
    }

    fn e2e_speedup(&self, row: &E2eRow) -> Option<f64> {
        let base = self
            .e2e
            .iter()
            .find(|r| r.gemm == row.gemm && r.interval == 1 && r.steps == row.steps)?;
        Some(base.loop_ms / row.loop_ms)
    }

    /// The report as JSON (layout [`SCHEMA`], read by `tools/bench_report.py`); unmeasured
    /// values are null.
    pub fn to_json(&self) -> Value {
        let device = self.device.as_ref().map(|d| {
            json!({
                "name": d.name,
                "compute_capability": format!("{}.{}", d.compute_capability.0, d.compute_capability.1),
                "sm_count": d.sm_count,
                "l2_bytes": d.l2_bytes,
                "memory_bytes": d.memory_bytes,
            })
        });
        let ceiling = |c: &Option<Ceiling>, unit: &str| match c {
            Some(c) => {
                let mut v = c.stats.json();
                v["what"] = json!(c.what);
                v[unit] = json!(c.rate);
                v
            }
            None => Value::Null,
        };
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|r| {
                let t = self.step_tflops(r);
                let mut v = json!({
                    "gemm": r.gemm,
                    "rows": r.rows,
                    "kind": r.kind.name(),
                    "tflops": num(t),
                    "pct_gemm_ceiling": num(self.pct_of_ceiling(t, Bound::Compute)),
                    "kernels": r.launches.map(|l| l.kernels),
                    "memcpys": r.launches.map(|l| l.memcpys),
                    "memsets": r.launches.map(|l| l.memsets),
                    "other_nodes": r.launches.map(|l| l.other),
                    "graphs": r.graphs,
                    "precomputed_modulation": r.precomputed_modulation,
                    "host_issue_ms": r.host_issue_ms,
                });
                merge_stats(&mut v, r.stats.as_ref());
                v
            })
            .collect();
        let e2e: Vec<Value> = self
            .e2e
            .iter()
            .map(|r| {
                json!({
                    "gemm": r.gemm,
                    "interval": r.interval,
                    "steps": r.steps,
                    "rows": r.rows,
                    "computed": r.computed,
                    "reused": r.reused,
                    "reps": r.reps,
                    "loop_ms": r.loop_ms,
                    "setup_ms": r.setup_ms,
                    "wall_ms": r.wall_ms,
                    "finite": r.finite,
                    "speedup": num(self.e2e_speedup(r)),
                    "theoretical_speedup": r.steps as f64 / r.computed.max(1) as f64,
                })
            })
            .collect();
        let kernels: Vec<Value> = self
            .kernels
            .iter()
            .map(|k| {
                let rate = k.rate();
                let (tf, gb) = match k.bound {
                    Bound::Compute => (rate, None),
                    Bound::Memory => (None, rate),
                };
                let mut v = json!({
                    "name": k.name,
                    "impl": k.imp,
                    "rows": k.rows,
                    "shape": k.shape,
                    "bound": match k.bound { Bound::Compute => "compute", Bound::Memory => "memory" },
                    "flops": if k.bound == Bound::Compute { json!(k.work) } else { Value::Null },
                    "bytes": if k.bound == Bound::Memory { json!(k.work) } else { Value::Null },
                    "tflops": num(tf),
                    "gbps": num(gb),
                    "pct_ceiling": num(self.pct_of_ceiling(rate, k.bound)),
                    "vs_cublaslt": num(self.vs_cublaslt(k)),
                    "launches_per_replay": k.launches_per_replay,
                });
                merge_stats(&mut v, k.stats.as_ref());
                v
            })
            .collect();
        json!({
            "schema": SCHEMA,
            "tool": "fora bench",
            "version": env!("CARGO_PKG_VERSION"),
            "date": self.date,
            "device": device,
            "model": {
                "arch": self.model.arch,
                "input_size": self.model.input_size,
                "tokens": self.model.tokens,
                "hidden": self.model.hidden,
                "depth": self.model.depth,
                "heads": self.model.heads,
                "macs_per_row": self.model.macs_per_row,
                "weights": self.model.weights,
            },
            "settings": {
                "warmup": self.warmup,
                "runs": self.runs,
                "quick": self.quick,
                "cuda_graphs": self.options.graphs,
                "precompute_modulation": self.options.precompute_modulation,
                "lt_autotune": self.options.lt_autotune,
                "fused_reuse": self.options.fused_reuse,
                "side_stream": self.options.side_stream,
                "fused_ln": self.options.fused_ln,
                "lt_bias_bf16": self.options.lt_bias_bf16,
                "bf16_residual": self.options.bf16_residual,
                "reuse_gates_only": self.options.reuse_gates_only,
                "step_graph": self.options.step_graph,
                "lt_splitk": self.options.lt_splitk,
                "l2_persist": self.options.l2_persist,
                "pdl": self.options.pdl,
                "attention": self.attention,
                "cfg_scale": self.cfg_scale,
                "timing": "CUDA events, back-to-back runs, median",
            },
            "ceilings": {
                "gemm": ceiling(&self.gemm_ceiling, "tflops"),
                "memory": self.memory_ceilings.iter().map(|c| ceiling(&Some(c.clone()), "gbps")).collect::<Vec<_>>(),
                "memory_best": ceiling(&self.memory_ceiling().cloned(), "gbps"),
            },
            "steps": steps,
            "e2e": e2e,
            "kernels": kernels,
            "errors": self.errors.iter().map(|e| json!({
                "section": e.section, "what": e.what, "error": e.error,
            })).collect::<Vec<_>>(),
        })
    }

    /// Per row count: the fused reuse forward against the three launches it replaces.
    fn fused_reuse_lines(&self) -> String {
        let us = |name: &str, rows: usize| {
            self.kernels
                .iter()
                .find(|k| k.name == name && k.rows == rows && k.imp == "custom")
                .and_then(|k| k.stats.as_ref())
                .map(|s| s.median_ms * 1e3)
        };
        let mut s = String::new();
        let mut rows: Vec<usize> = self.kernels.iter().map(|k| k.rows).collect();
        rows.sort_unstable();
        rows.dedup();
        for r in rows {
            let fused = us("fora_reuse_final", r);
            let parts = [
                us("patch_embed", r),
                us("fora_reuse", r),
                us("layernorm", r),
            ];
            if let (Some(f), [Some(a), Some(b), Some(c)]) = (fused, parts) {
                s += &format!(
                    "\nReuse forward at {r} rows: fora_reuse_final {f:.1} us vs patch_embed + \
                     fora_reuse + layernorm {:.1} us ({:.2}x).\n",
                    a + b + c,
                    (a + b + c) / f
                );
            }
        }
        s
    }

    /// The report as Markdown tables.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let device = match &self.device {
            Some(d) => format!(
                "{} (sm_{}{}, {} SMs, L2 {} MiB, {:.0} GiB)",
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                d.sm_count,
                d.l2_bytes >> 20,
                d.memory_bytes as f64 / (1u64 << 30) as f64
            ),
            None => "— (no device)".to_string(),
        };
        let m = &self.model;
        s += &format!(
            "# fora bench: {} at {} px ({} tokens), weights {}\n\n",
            m.arch,
            m.input_size * 8,
            m.tokens,
            m.weights
        );
        s += &format!(
            "{device}, {}. Median of {} runs after {} warm-up runs (CUDA events). CUDA graphs {}{}; \
             modulation tables precomputed {}; cuBLASLt algorithms {}; reuse steps {}; per-step \
             tables {}; proj / fc2 epilogues {}; qkv / fc1 bias {}; attention `{}` \
             (FORA_ATTENTION). FLOPs = 2 x {:.1} GMAC per model row.\n\n",
            self.date,
            self.runs,
            self.warmup,
            match (self.options.graphs, self.options.step_graph) {
                (true, true) => "on, a whole step per graph",
                (true, false) => "on, the forward per graph (FORA_STEP_GRAPH=0)",
                (false, _) => "off (FORA_CUDA_GRAPHS=0)",
            },
            if self.options.pdl {
                ", programmatic launches (FORA_PDL=1)"
            } else {
                ""
            },
            if self.options.precompute_modulation {
                "when they fit"
            } else {
                "never (FORA_PRECOMPUTE_MODULATION=0)"
            },
            if self.options.lt_autotune {
                "autotuned (FORA_LT_AUTOTUNE=1)"
            } else {
                "the heuristic's first choice"
            },
            if self.options.fused_reuse && self.options.l2_persist {
                "fused, one fora_reuse_final launch, the cache persisting in L2 where most of it \
                 fits (FORA_L2_PERSIST=1)"
            } else if self.options.fused_reuse && !self.options.fused_final {
                "fused, one fora_reuse_final launch, then the final GEMM (FORA_FUSED_FINAL=0)"
            } else if self.options.fused_reuse {
                "fused, one fora_reuse_final launch"
            } else {
                "patch_embed + fora_reuse + layernorm_modulate (FORA_FUSED_REUSE=0)"
            },
            match (self.options.side_stream, self.options.reuse_gates_only) {
                (true, _) => "the next step's on a second stream (FORA_SIDE_STREAM=1)",
                (false, true) => "before each step on the one stream, a reuse step's gates only",
                (false, false) => {
                    "before each step on the one stream, a reuse step's whole table \
                     (FORA_REUSE_GATES_ONLY=0)"
                }
            },
            if self.options.fused_ln && self.options.bf16_residual {
                "bf16 into the cache, fused with the next LayerNorm (FORA_BF16_RESIDUAL=1)"
            } else if self.options.fused_ln && self.options.lt_splitk {
                "fused with the next LayerNorm on cuBLASLt, split-K slices at small batches \
                 (FORA_LT_SPLITK=1)"
            } else if self.options.fused_ln {
                "fused with the next LayerNorm on cuBLASLt"
            } else {
                "then a separate LayerNorm (FORA_FUSED_LN=0 or not cuBLASLt)"
            },
            if self.options.lt_bias_bf16 {
                "fused by cuBLASLt, in bf16 where it refuses f32"
            } else {
                "fused by cuBLASLt only in f32 (FORA_LT_BIAS_BF16=0)"
            },
            self.attention,
            m.macs_per_row as f64 / 1e9
        );

        s += "## Ceilings (measured in this run)\n\n| what | time (ms) | rate |\n|---|---|---|\n";
        let mut ceilings = vec![(self.gemm_ceiling.as_ref(), "TFLOP/s", "GEMM")];
        if self.memory_ceilings.is_empty() {
            ceilings.push((None, "GB/s", "memory"));
        }
        ceilings.extend(
            self.memory_ceilings
                .iter()
                .map(|c| (Some(c), "GB/s", "memory")),
        );
        for (c, unit, what) in ceilings {
            match c {
                Some(c) => {
                    s += &format!(
                        "| {} | {:.3} | {:.0} {unit} |\n",
                        c.what, c.stats.median_ms, c.rate
                    )
                }
                None => s += &format!("| {what} ceiling | — | — |\n"),
            }
        }
        if let Some(best) = self.memory_ceiling() {
            s += &format!(
                "\nMemory-bound rows' % ceiling is of the best memory rate: {:.0} GB/s ({}).\n",
                best.rate, best.what
            );
        }

        if !self.kernels.is_empty() {
            s += "\n## Kernels (inputs rotated through buffers larger than L2; per-launch time from \
                  CUDA-graph replays, host launch cost excluded)\n\n";
            s += "| kernel | rows | shape | impl | time (us) | rate | % ceiling | ours vs best cuBLASLt |\n\
                  |---|---|---|---|---|---|---|---|\n";
            for k in &self.kernels {
                let rate = k.rate();
                let unit = match k.bound {
                    Bound::Compute => "TFLOP/s",
                    Bound::Memory => "GB/s",
                };
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    k.name,
                    k.rows,
                    k.shape,
                    k.imp,
                    fmt_opt(k.stats.as_ref().map(|s| s.median_ms * 1e3), 1),
                    match rate {
                        Some(_) => format!(
                            "{} {unit}",
                            fmt_opt(rate, if k.bound == Bound::Compute { 1 } else { 0 })
                        ),
                        None => "—".to_string(),
                    },
                    fmt_opt(self.pct_of_ceiling(rate, k.bound), 1),
                    fmt_opt(self.vs_cublaslt(k), 2)
                );
            }
            s += &self.fused_reuse_lines();
        }

        if !self.steps.is_empty() {
            s += "\n## Per step (model + CFG + sampler update, as `Backend::step` runs it)\n\n";
            s += "| GEMM | rows | full (ms) | TFLOP/s | % GEMM ceiling | reuse (ms) | reuse / full | \
                  kernels full | kernels reuse | graphs | tables precomputed |\n\
                  |---|---|---|---|---|---|---|---|---|---|---|\n";
            let mut keys: Vec<(String, usize)> = Vec::new();
            for r in &self.steps {
                if !keys.contains(&(r.gemm.clone(), r.rows)) {
                    keys.push((r.gemm.clone(), r.rows));
                }
            }
            for (gemm, rows) in keys {
                let find = |kind| {
                    self.steps
                        .iter()
                        .find(|r| r.gemm == gemm && r.rows == rows && r.kind == kind)
                };
                let full = find(StepKind::Full);
                let reuse = find(StepKind::Reuse);
                let ms =
                    |r: Option<&StepRow>| r.and_then(|r| r.stats.as_ref().map(|s| s.median_ms));
                let t = full.and_then(|r| self.step_tflops(r));
                let ratio = match (ms(reuse), ms(full)) {
                    (Some(a), Some(b)) => Some(a / b),
                    _ => None,
                };
                let launches = |r: Option<&StepRow>| {
                    r.and_then(|r| r.launches)
                        .map_or("—".to_string(), |l| l.kernels.to_string())
                };
                let yes_no = |v: Option<bool>| match v {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "—",
                };
                s += &format!(
                    "| {gemm} | {rows} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    fmt_opt(ms(full), 3),
                    fmt_opt(t, 1),
                    fmt_opt(self.pct_of_ceiling(t, Bound::Compute), 1),
                    fmt_opt(ms(reuse), 4),
                    fmt_opt(ratio, 3),
                    launches(full),
                    launches(reuse),
                    yes_no(full.and_then(|r| r.graphs)),
                    yes_no(full.and_then(|r| r.precomputed_modulation))
                );
            }
            // Host issue time per step against the GPU's: a host-bound step shows it.
            for r in &self.steps {
                if let (Some(h), Some(st)) = (r.host_issue_ms, r.stats.as_ref()) {
                    s += &format!(
                        "\n{} {} rows, {} step: the host took {:.1} us to issue it, the GPU {:.1} \
                         us{}",
                        r.gemm,
                        r.rows,
                        r.kind.name(),
                        h * 1e3,
                        st.median_ms * 1e3,
                        if h >= 0.9 * st.median_ms {
                            " (host-bound)."
                        } else {
                            "."
                        }
                    );
                }
            }
            s += "\n";
            s +=
                "\nKernels per step: kernel launches of one step run kernel by kernel (a captured \
                  step replays them from one graph launch, plus the timestep copy and the sampler \
                  update). Tables precomputed: every step's adaLN modulation table computed when \
                  the workspace was built (when they fit), so a step only copies its table.\n";
        }

        if !self.e2e.is_empty() {
            s += "\n## End to end (DDPM, one image with CFG = 2 rows)\n\n";
            s += "| GEMM | N | steps | computing | loop (ms) | setup (ms) | speedup vs N=1 | \
                  theoretical | latents finite |\n|---|---|---|---|---|---|---|---|---|\n";
            for r in &self.e2e {
                s += &format!(
                    "| {} | {} | {} | {} | {:.1} | {:.1} | {} | {:.2} | {} |\n",
                    r.gemm,
                    r.interval,
                    r.steps,
                    r.computed,
                    r.loop_ms,
                    r.setup_ms,
                    fmt_opt(self.e2e_speedup(r), 2),
                    r.steps as f64 / r.computed.max(1) as f64,
                    if r.finite { "yes" } else { "NO" }
                );
            }
        }

        if !self.errors.is_empty() {
            s += "\n## Failed measurements\n\n";
            for e in &self.errors {
                s += &format!("- {} / {}: {}\n", e.section, e.what, e.error);
            }
        }
        s
    }

    /// Writes the JSON report (creating the directory).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let text =
            serde_json::to_string_pretty(&self.to_json()).context("cannot serialize the report")?;
        crate::io::write_atomic(path, text.as_bytes())
    }
}

fn merge_stats(v: &mut Value, stats: Option<&Stats>) {
    let fields = ["median_ms", "min_ms", "max_ms", "mean_ms", "runs"];
    match stats {
        Some(s) => {
            let sj = s.json();
            for f in fields {
                v[f] = sj[f].clone();
            }
        }
        None => {
            for f in fields {
                v[f] = Value::Null;
            }
        }
    }
}

/// The model to benchmark: a checkpoint, or random weights of `--arch` (default DiT-XL/2).
pub fn bench_model(args: &BenchArgs) -> Result<(DitConfig, DitWeights, String)> {
    match &args.model {
        Some(path) => {
            let arch = args.arch.as_deref().map(Arch::parse).transpose()?;
            let (cfg, w) = DitWeights::load(path, arch.as_ref())?;
            Ok((cfg, w, path.display().to_string()))
        }
        None => {
            let arch = args.arch.as_deref().unwrap_or("DiT-XL/2");
            let cfg = DitConfig::official(arch, args.input_size.unwrap_or(32))
                .with_context(|| format!("benchmark model {arch}"))?;
            eprintln!(
                "bench: generating random {} weights (seed {})",
                cfg.arch_name(),
                args.seed
            );
            let w = DitWeights::random(&cfg, args.seed);
            Ok((cfg, w, format!("random (seed {})", args.seed)))
        }
    }
}

/// Runs the benchmark: Markdown to stdout, JSON to `--json`. Errors when there is no usable
/// GPU, and (after writing both reports) when any measurement failed.
pub fn run(args: &BenchArgs) -> Result<()> {
    let plan = args.plan()?;
    if let Some(path) = &args.save_weights {
        let (cfg, weights, source) = bench_model(args)?;
        weights
            .save(path, &cfg)
            .with_context(|| format!("cannot save the benchmark weights to {}", path.display()))?;
        println!(
            "wrote {} weights ({source}) to {}",
            cfg.arch_name(),
            path.display()
        );
        return Ok(());
    }
    let gpu = Gpu::new(args.gpu).context("the benchmark needs a CUDA device")?;
    let options = CudaOptions::from_env()?;
    let (cfg, weights, source) = bench_model(args)?;
    let mut report = Report::new(ModelInfo::new(&cfg, source), &plan, &options);
    report.device = Some(device_info(&gpu)?);
    report.attention = AttentionImpl::selected()?.name().to_string();
    let started = Instant::now();
    let json_path = plan.json.clone();
    let save = |report: &Report| {
        if let Err(e) = report.write_json(&json_path) {
            eprintln!("bench: cannot write {}: {e:#}", json_path.display());
        }
    };
    let timer = Timer {
        warmup: plan.warmup,
        runs: plan.runs,
        profiler_api: args.profiler_api,
    };
    if plan.sections.contains(&Section::Ceilings) {
        eprintln!("bench: ceilings");
        bench_ceilings(&gpu, &plan, &timer, &mut report);
        save(&report);
    }
    if plan.sections.contains(&Section::Kernels) {
        for &rows in &plan.kernel_batches {
            eprintln!("bench: kernels at {rows} rows");
            bench_kernels(&gpu, &cfg, rows, &timer, &mut report);
            save(&report);
        }
    }
    drop(gpu);
    let want_steps = plan.sections.contains(&Section::Steps);
    let want_e2e = plan.sections.contains(&Section::E2e);
    if want_steps || want_e2e {
        for (i, &imp) in plan.gemms.iter().enumerate() {
            let name = gemm_name(imp);
            let options = CudaOptions {
                gemm: imp,
                ..options
            };
            let mut backend = match Gpu::new(args.gpu)
                .and_then(|g| CudaBackend::with_options(g, &cfg, &weights, options))
            {
                Ok(b) => b,
                Err(e) => {
                    report.error("steps", &format!("{name} backend"), &e);
                    continue;
                }
            };
            if want_steps {
                for &rows in &plan.batches {
                    eprintln!("bench: steps, {name} GEMM, {rows} rows");
                    bench_steps(&mut backend, &plan, &timer, rows, args.seed, &mut report);
                    save(&report);
                }
            }
            // End to end on the first implementation (the default, cuBLASLt) only: it is the slow
            // section.
            if want_e2e && i == 0 {
                eprintln!("bench: end to end, {name} GEMM");
                bench_e2e(&backend, &plan, args.seed, &mut report);
                save(&report);
            }
        }
    }
    let markdown = report.markdown();
    println!("{markdown}");
    report.write_json(&plan.json)?;
    let md_path = plan.json.with_extension("md");
    crate::io::write_atomic(&md_path, markdown.as_bytes())?;
    eprintln!(
        "bench: done in {:.1} s; JSON in {}, Markdown in {}",
        started.elapsed().as_secs_f64(),
        plan.json.display(),
        md_path.display()
    );
    ensure!(
        report.errors.is_empty(),
        "{} measurement(s) failed (listed above and in {})",
        report.errors.len(),
        plan.json.display()
    );
    Ok(())
}

fn gemm_name(imp: GemmImpl) -> &'static str {
    match imp {
        GemmImpl::Custom => "custom",
        GemmImpl::CublasLt => "cublaslt",
        GemmImpl::Wgmma => "wgmma",
        GemmImpl::Tma => "tma",
    }
}

fn device_info(gpu: &Gpu) -> Result<DeviceInfo> {
    let l2 = gpu
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .context("cannot query the L2 cache size")?;
    Ok(DeviceInfo {
        name: gpu.name().to_string(),
        compute_capability: gpu.compute_capability(),
        sm_count: gpu.sm_count(),
        l2_bytes: l2.max(0) as usize,
        memory_bytes: gpu.mem_info()?.1,
    })
}

/// Rotated bytes for a kernel measured alone on `gpu`.
fn rotate_bytes(gpu: &Gpu) -> usize {
    let l2 = gpu
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_or(0, |v| v.max(0) as usize);
    (4 * l2).max(MIN_ROTATE_BYTES)
}

/// CUDA-event timing of back-to-back runs.
struct Timer {
    warmup: usize,
    runs: usize,
    profiler_api: bool,
}

impl Timer {
    /// Runs `launch(i)` for i in 0..warmup untimed, then i in warmup..warmup+runs with an event
    /// between consecutive runs; the host does not wait between runs.
    fn time(&self, gpu: &Gpu, launch: impl FnMut(usize) -> Result<()>) -> Result<Stats> {
        self.time_with_host(gpu, launch).map(|(stats, _)| stats)
    }

    /// [`Timer::time`], and the host's wall-clock time per run to issue the timed runs (from
    /// the first event's record to the last one's, before waiting for the GPU), in ms.
    fn time_with_host(
        &self,
        gpu: &Gpu,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<(Stats, f64)> {
        for i in 0..self.warmup {
            launch(i)?;
        }
        gpu.synchronize().context("warm-up runs failed")?;
        let ctx = gpu.context();
        let stream = gpu.stream();
        let events = (0..=self.runs)
            .map(|_| {
                ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .context("cannot create a CUDA event")
            })
            .collect::<Result<Vec<_>>>()?;
        if self.profiler_api {
            profiler(true)?;
        }
        events[0].record(stream).context("cannot record an event")?;
        let issue = std::time::Instant::now();
        for (i, event) in events[1..].iter().enumerate() {
            launch(self.warmup + i)?;
            event.record(stream).context("cannot record an event")?;
        }
        let host_ms = issue.elapsed().as_secs_f64() * 1e3 / self.runs.max(1) as f64;
        gpu.synchronize().context("timed runs failed")?;
        if self.profiler_api {
            profiler(false)?;
        }
        let samples = events
            .windows(2)
            .map(|w| {
                Ok(w[0]
                    .elapsed_ms(&w[1])
                    .context("cannot read an event time")? as f64)
            })
            .collect::<Result<Vec<f64>>>()?;
        Ok((Stats::from_samples(&samples)?, host_ms))
    }
}

impl Timer {
    /// Per-launch time of a kernel measured alone: after eager warm-up runs, `launch(i)` is
    /// captured n times (i = 0..n, cycling through `copies` rotated buffer sets) into one CUDA
    /// graph, the graph is timed as [`Timer::time`] times a step, and each sample is divided by
    /// n. Host costs per launch (cuBLASLt's per-call heuristic query included) stay out of the
    /// numbers, as they do in a captured sampler step. Returns the stats and n.
    fn time_alone(
        &self,
        gpu: &Gpu,
        copies: usize,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<(Stats, usize)> {
        for i in 0..self.warmup.max(1) {
            launch(i)?;
        }
        gpu.synchronize().context("warm-up launches failed")?;
        let ctx = gpu.context();
        let stream = gpu.stream();
        let event = || {
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .context("cannot create a CUDA event")
        };
        let (start, end) = (event()?, event()?);
        start.record(stream).context("cannot record an event")?;
        launch(0)?;
        end.record(stream).context("cannot record an event")?;
        let single_ms = start
            .elapsed_ms(&end)
            .context("cannot read an event time")? as f64;
        let n = launches_per_graph(single_ms, copies);
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("cannot start a stream capture")?;
        let mut captured = Ok(());
        for i in 0..n {
            captured = launch(i);
            if captured.is_err() {
                break;
            }
        }
        // End the capture whatever happened, so the stream stays usable.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        captured.context("while capturing the launches")?;
        let graph = graph
            .context("cannot instantiate the captured launches")?
            .context("the captured graph is empty")?;
        graph.upload().context("cannot upload a CUDA graph")?;
        let stats = self.time(gpu, |_| {
            graph.launch().context("cannot launch a CUDA graph")
        })?;
        Ok((stats.scaled(1.0 / n as f64), n))
    }
}

fn profiler(start: bool) -> Result<()> {
    // SAFETY: plain driver calls without arguments; the context is current (bound by the
    // event calls before).
    let r = unsafe {
        if start {
            sys::cuProfilerStart()
        } else {
            sys::cuProfilerStop()
        }
    };
    r.result()
        .with_context(|| format!("cuProfiler{} failed", if start { "Start" } else { "Stop" }))
}

/// A device buffer of `len` values uniform in [-scale, scale) (a chunk of random values
/// repeated: benchmark data, never zeros).
fn random_buffer<T: DeviceRepr + ValidAsZeroBits + Copy>(
    gpu: &Gpu,
    len: usize,
    scale: f32,
    seed: u64,
    convert: impl Fn(f32) -> T,
    what: &str,
) -> Result<CudaSlice<T>> {
    let mut dev = gpu.alloc_zeros::<T>(len, what)?;
    let mut state = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    let chunk: Vec<T> = (0..FILL_CHUNK.min(len))
        .map(|_| {
            // xorshift64*: fast, and plenty for benchmark data.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            convert((r as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        })
        .collect();
    let mut start = 0;
    while start < len {
        let end = (start + chunk.len()).min(len);
        let mut view = dev.slice_mut(start..end);
        gpu.stream()
            .memcpy_htod(&chunk[..end - start], &mut view)
            .with_context(|| format!("cannot fill {what}"))?;
        start = end;
    }
    Ok(dev)
}

fn random_bf16(
    gpu: &Gpu,
    len: usize,
    scale: f32,
    seed: u64,
    what: &str,
) -> Result<CudaSlice<bf16>> {
    random_buffer(gpu, len, scale, seed, bf16::from_f32, what)
}

fn random_f32(gpu: &Gpu, len: usize, scale: f32, seed: u64, what: &str) -> Result<CudaSlice<f32>> {
    random_buffer(gpu, len, scale, seed, |v| v, what)
}

fn bench_ceilings(gpu: &Gpu, plan: &BenchPlan, timer: &Timer, report: &mut Report) {
    match ceiling_gemm(gpu, plan.ceiling_size, timer) {
        Ok(c) => report.gemm_ceiling = Some(c),
        Err(e) => report.error("ceilings", "bf16 GEMM", &e),
    }
    for (what, probe) in [
        ("device copy", MemoryProbe::Memcpy),
        ("copy kernel", MemoryProbe::CopyKernel),
        ("read kernel", MemoryProbe::ReadKernel),
    ] {
        match ceiling_memory(gpu, plan.copy_bytes, probe, timer) {
            Ok(c) => report.memory_ceilings.push(c),
            Err(e) => report.error("ceilings", what, &e),
        }
    }
}

/// How a memory ceiling moves its bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MemoryProbe {
    /// cuMemcpyDtoD (read + write bytes).
    Memcpy,
    /// `bandwidth_copy` (read + write bytes).
    CopyKernel,
    /// `bandwidth_read` (bytes read; a word a thread written).
    ReadKernel,
}

fn ceiling_gemm(gpu: &Gpu, size: usize, timer: &Timer) -> Result<Ceiling> {
    let lt = CublasLt::new(gpu)?;
    let a = random_bf16(gpu, size * size, 1.0, 11, "ceiling GEMM A")?;
    let w = random_bf16(gpu, size * size, 1.0, 12, "ceiling GEMM W")?;
    let d = gpu.alloc_zeros::<bf16>(size * size, "ceiling GEMM D")?;
    let mm = LtMatmul {
        a: dptr(&a),
        w: dptr(&w),
        d: dptr(&d),
        m: size,
        n: size,
        k: size,
        lda: size,
        ldw: size,
        ldd: size,
        output: LtOutput::Bf16,
        epilogue: LtEpilogue::None,
        batch: None,
    };
    let (stats, _) = timer.time_alone(gpu, 1, |_| match lt.matmul(&mm)? {
        LtRun::Done => Ok(()),
        LtRun::Unsupported => bail!("cuBLASLt has no algorithm for a bf16 {size}^3 GEMM"),
    })?;
    let flops = 2.0 * (size as f64).powi(3);
    Ok(Ceiling {
        what: format!("bf16 GEMM {size}^3 (cuBLASLt, f32 accumulate)"),
        rate: tflops(flops, stats.median_ms),
        stats,
    })
}

fn ceiling_memory(gpu: &Gpu, bytes: usize, probe: MemoryProbe, timer: &Timer) -> Result<Ceiling> {
    let bytes = bytes / 16 * 16;
    ensure!(
        bytes > 0,
        "the memory ceilings need at least 16 bytes (--copy-mib)"
    );
    let src = random_buffer(gpu, bytes, 1.0, 13, |v| v.to_bits() as u8, "copy source")?;
    let chunks = (bytes / 16) as i64;
    let mib = bytes >> 20;
    let (what, moved) = match probe {
        MemoryProbe::Memcpy => (
            format!("device copy {mib} MiB (cuMemcpyDtoD, read + write bytes)"),
            2 * bytes,
        ),
        MemoryProbe::CopyKernel => (
            format!("copy kernel {mib} MiB (bandwidth_copy, read + write bytes)"),
            2 * bytes,
        ),
        MemoryProbe::ReadKernel => (
            format!("read kernel {mib} MiB (bandwidth_read, bytes read)"),
            bytes,
        ),
    };
    let out_len = match probe {
        MemoryProbe::ReadKernel => 4 * bandwidth_read_words(gpu, chunks),
        _ => bytes,
    };
    let mut dst = gpu.alloc_zeros::<u8>(out_len, "copy destination")?;
    let params = BandwidthParams {
        src: dptr(&src),
        dst: dptr(&dst),
        chunks,
        out_words: (out_len / 4) as i64,
    };
    let stream = gpu.stream().clone();
    let (stats, _) = timer.time_alone(gpu, 1, |_| match probe {
        MemoryProbe::Memcpy => stream
            .memcpy_dtod(&src, &mut dst)
            .context("device-to-device copy failed"),
        MemoryProbe::CopyKernel => bandwidth_copy(gpu, &params),
        MemoryProbe::ReadKernel => bandwidth_read(gpu, &params),
    })?;
    Ok(Ceiling {
        what,
        rate: gbps(moved as f64, stats.median_ms),
        stats,
    })
}

/// One GEMM of the model at `rows` model rows.
struct GemmShape {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    epi: Epilogue,
}

fn gemm_shapes(cfg: &DitConfig, rows: usize) -> Vec<GemmShape> {
    let (d, t, mh) = (cfg.hidden, cfg.tokens(), cfg.mlp_hidden());
    let rt = rows * t;
    vec![
        GemmShape {
            name: "qkv",
            m: rt,
            n: 3 * d,
            k: d,
            epi: Epilogue::BiasBf16,
        },
        GemmShape {
            name: "proj",
            m: rt,
            n: d,
            k: d,
            epi: Epilogue::BiasGateResidual,
        },
        GemmShape {
            name: "fc1",
            m: rt,
            n: mh,
            k: d,
            epi: Epilogue::BiasGeluBf16,
        },
        GemmShape {
            name: "fc2",
            m: rt,
            n: d,
            k: mh,
            epi: Epilogue::BiasGateResidual,
        },
        GemmShape {
            name: "adaLN",
            m: rows,
            n: ada_cols(cfg),
            k: d,
            epi: Epilogue::BiasF32,
        },
        GemmShape {
            name: "final",
            m: rt,
            n: cfg.patch_out(),
            k: d,
            epi: Epilogue::BiasF32,
        },
    ]
}

/// The buffers of one GEMM launch.
struct GemmBuffers {
    a: CudaSlice<bf16>,
    w: CudaSlice<bf16>,
    bias: CudaSlice<f32>,
    /// The bias in bf16, for cuBLASLt's fused bias with a bf16 output.
    bias16: CudaSlice<bf16>,
    out_bf16: Option<CudaSlice<bf16>>,
    out_f32: Option<CudaSlice<f32>>,
    cache: Option<CudaSlice<bf16>>,
    gate: Option<CudaSlice<f32>>,
}

fn gemm_set_bytes(s: &GemmShape, rows: usize) -> usize {
    let out = s.m * s.n * if s.epi.out_is_f32() { 4 } else { 2 };
    let gated = s.epi == Epilogue::BiasGateResidual;
    2 * s.m * s.k
        + 2 * s.n * s.k
        + 4 * s.n
        + out
        + if gated {
            2 * s.m * s.n + 4 * rows * s.n
        } else {
            0
        }
}

fn gemm_buffers(gpu: &Gpu, s: &GemmShape, rows: usize, seed: u64) -> Result<GemmBuffers> {
    let gated = s.epi == Epilogue::BiasGateResidual;
    let w_scale = 1.0 / (s.k as f32).sqrt();
    Ok(GemmBuffers {
        a: random_bf16(gpu, s.m * s.k, 1.0, seed, "GEMM A")?,
        w: random_bf16(gpu, s.n * s.k, w_scale, seed + 1, "GEMM W")?,
        bias: random_f32(gpu, s.n, 0.1, seed + 2, "GEMM bias")?,
        bias16: random_bf16(gpu, s.n, 0.1, seed + 5, "GEMM bf16 bias")?,
        out_bf16: if s.epi.out_is_f32() {
            None
        } else {
            Some(gpu.alloc_zeros(s.m * s.n, "GEMM out")?)
        },
        // The residual stream the gated epilogue adds into: random, like a real one.
        out_f32: if s.epi.out_is_f32() {
            Some(random_f32(gpu, s.m * s.n, 1.0, seed + 3, "GEMM out")?)
        } else {
            None
        },
        cache: if gated {
            Some(gpu.alloc_zeros(s.m * s.n, "GEMM FORA cache")?)
        } else {
            None
        },
        // Small gates keep the residual finite over every run.
        gate: if gated {
            Some(random_f32(gpu, rows * s.n, 1e-3, seed + 4, "GEMM gate")?)
        } else {
            None
        },
    })
}

fn gemm_params(s: &GemmShape, b: &GemmBuffers, tokens: usize) -> GemmParams {
    let gated = s.epi == Epilogue::BiasGateResidual;
    GemmParams {
        a: dptr(&b.a),
        w: dptr(&b.w),
        bias: dptr(&b.bias),
        out: match (&b.out_bf16, &b.out_f32) {
            (Some(o), _) => dptr(o),
            (None, Some(o)) => dptr(o),
            (None, None) => 0,
        },
        cache: b.cache.as_ref().map_or(0, dptr),
        gate: b.gate.as_ref().map_or(0, dptr),
        m: s.m as i32,
        n: s.n as i32,
        k: s.k as i32,
        lda: s.k as i32,
        ldw: s.k as i32,
        ldo: s.n as i32,
        ldc: s.n as i32,
        ldg: if gated { s.n as i32 } else { 0 },
        rows_per_gate: if gated { tokens as i32 } else { 1 },
        epilogue: s.epi.raw(),
    }
}

fn bench_kernels(gpu: &Gpu, cfg: &DitConfig, rows: usize, timer: &Timer, report: &mut Report) {
    let rotate = rotate_bytes(gpu);
    let shapes = gemm_shapes(cfg, rows);
    let max_mn = shapes.iter().map(|s| s.m * s.n).max().unwrap_or(1);
    let custom = Gemm::new(gpu, GemmImpl::Custom, 0);
    // The Hopper kernels (rows only on a 9.x card), compared with cuBLASLt at the same shapes.
    // FORA_BENCH_HOPPER_GEMMS=0 leaves them out: a kernel that faults poisons the context for
    // every later row, so a run whose other numbers matter can keep them apart.
    let hopper = gpu.compute_capability().0 == 9
        && std::env::var("FORA_BENCH_HOPPER_GEMMS").map_or(true, |v| v.trim() != "0");
    let wgmma = hopper.then(|| Gemm::new(gpu, GemmImpl::Wgmma, 0));
    let tma = hopper.then(|| Gemm::new(gpu, GemmImpl::Tma, 0));
    let lt = Gemm::new(gpu, GemmImpl::CublasLt, max_mn);
    // The same with autotuned algorithms (the first, eager warm-up run of a shape tunes it).
    let lt_tuned = Gemm::new(gpu, GemmImpl::CublasLt, max_mn);
    if let Ok(g) = &lt_tuned {
        g.set_lt_autotune(true);
    }
    if let Err(e) = &custom {
        report.error("kernels", "custom GEMM setup", e);
    }
    if let Err(e) = &lt {
        report.error("kernels", "cuBLASLt GEMM setup", e);
    }
    for (what, g) in [("wgmma", &wgmma), ("tma", &tma)] {
        if let Some(Err(e)) = g {
            report.error("kernels", &format!("{what} GEMM setup"), e);
        }
    }
    for s in &shapes {
        let shape = format!("M={} N={} K={}", s.m, s.n, s.k);
        let flops = 2.0 * s.m as f64 * s.n as f64 * s.k as f64;
        let copies = rotation_copies(gemm_set_bytes(s, rows), rotate);
        let sets = match (0..copies)
            .map(|c| gemm_buffers(gpu, s, rows, 100 + 10 * c as u64))
            .collect::<Result<Vec<_>>>()
        {
            Ok(v) => v,
            Err(e) => {
                report.error("kernels", &format!("{} {shape} buffers", s.name), &e);
                continue;
            }
        };
        let params: Vec<GemmParams> = sets
            .iter()
            .map(|b| gemm_params(s, b, cfg.tokens()))
            .collect();
        let bias16: Vec<u64> = sets.iter().map(|b| dptr(&b.bias16)).collect();
        let params = &params;
        let bias16 = &bias16;
        let n = params.len();
        type Runner<'g> = Box<dyn Fn(usize) -> Result<()> + 'g>;
        let mut variants: Vec<(&str, Runner)> = Vec::new();
        if let Ok(g) = &custom {
            variants.push(("custom", Box::new(move |i| g.run(gpu, &params[i % n]))));
        }
        if let Some(Ok(g)) = &wgmma {
            variants.push(("wgmma", Box::new(move |i| g.run(gpu, &params[i % n]))));
        }
        if let Some(Ok(g)) = &tma {
            variants.push(("tma", Box::new(move |i| g.run(gpu, &params[i % n]))));
            // Every tile forced (split-K by shape), to tune TmaTile::pick from.
            for t in TmaTile::ALL {
                variants.push((
                    t.bench_name(),
                    Box::new(move |i| g.run_tma(gpu, &params[i % n], Some(t), None)),
                ));
            }
        }
        if let Ok(g) = &lt {
            variants.push(("cublaslt", Box::new(move |i| g.run(gpu, &params[i % n]))));
            variants.push((
                "cublaslt+epilogue",
                Box::new(move |i| g.run_cublaslt_unfused(gpu, &params[i % n])),
            ));
            if !s.epi.out_is_f32() {
                variants.push((
                    "cublaslt+bf16 bias",
                    Box::new(move |i| g.run_with_bias_bf16(gpu, &params[i % n], bias16[i % n])),
                ));
            }
            if s.epi == Epilogue::BiasGateResidual {
                // proj and fc2 on the fused-LayerNorm path: cuBLASLt's f32 product alone (the
                // residual and the LayerNorm follow in residual_layernorm), and with
                // FORA_LT_SPLITK its split-K slices where the grid is small.
                variants.push((
                    "cublaslt product",
                    Box::new(move |i| g.cublaslt_product(&params[i % n]).map(|_| ())),
                ));
                let splits = g.lt_product_splits(&params[0]);
                if splits > 1 {
                    variants.push((
                        "cublaslt product split-K",
                        Box::new(move |i| {
                            g.cublaslt_product_split(&params[i % n], splits).map(|_| ())
                        }),
                    ));
                }
            }
        }
        if let Ok(g) = &lt_tuned {
            variants.push((
                "cublaslt-tuned",
                Box::new(move |i| g.run(gpu, &params[i % n])),
            ));
        }
        for (imp, runner) in variants {
            let timed = timer.time_alone(gpu, n, &runner);
            let (stats, per_replay) = match timed {
                Ok((st, n)) => (Some(st), n),
                Err(e) => {
                    report.error("kernels", &format!("{} {shape} {imp}", s.name), &e);
                    (None, 0)
                }
            };
            report.kernels.push(KernelRow {
                name: s.name.to_string(),
                imp: imp.to_string(),
                rows,
                shape: shape.clone(),
                bound: Bound::Compute,
                work: flops,
                stats,
                launches_per_replay: per_replay,
            });
        }
    }
    // The selected implementation ("custom"), then the others worth comparing on this card.
    let selected = AttentionImpl::selected().map(|a| a.resolve(gpu.compute_capability().0));
    let attention_row = bench_attention(gpu, cfg, rows, timer, rotate, None);
    push_kernel(report, "attention", rows, attention_row);
    for imp in [
        AttentionImpl::V1,
        AttentionImpl::Wgmma,
        AttentionImpl::WgmmaMn,
    ] {
        let runs_here = !imp.is_wgmma() || gpu.compute_capability().0 == 9;
        if runs_here && selected.as_ref().is_ok_and(|s| *s != imp) {
            let row = bench_attention(gpu, cfg, rows, timer, rotate, Some(imp));
            push_kernel(report, "attention", rows, row);
        }
    }
    let embed_row = bench_patch_embed(gpu, cfg, rows, timer, rotate);
    push_kernel(report, "patch_embed", rows, embed_row);
    let sampler_row = bench_sampler_step(gpu, cfg, rows, timer, rotate);
    push_kernel(report, "sampler_step", rows, sampler_row);
    let reuse_row = bench_fora_reuse(gpu, cfg, rows, timer, rotate);
    push_kernel(report, "fora_reuse", rows, reuse_row);
    for tpt in ReuseTokens::ALL {
        let fused_row = bench_fora_reuse_final(gpu, cfg, rows, timer, rotate, tpt);
        push_kernel(report, "fora_reuse_final", rows, fused_row);
    }
    for warps in [RowWarps::One, RowWarps::Four] {
        let ln_row = bench_layernorm(gpu, cfg, rows, timer, rotate, false, warps);
        push_kernel(report, "layernorm", rows, ln_row);
        let residual_ln_row = bench_layernorm(gpu, cfg, rows, timer, rotate, true, warps);
        push_kernel(report, "residual_ln", rows, residual_ln_row);
    }
}

fn push_kernel(report: &mut Report, name: &str, rows: usize, r: Result<KernelRow>) {
    match r {
        Ok(row) => report.kernels.push(row),
        Err(e) => report.error("kernels", &format!("{name} at {rows} rows"), &e),
    }
}

/// Attention over `rows` images of `cfg` reading `qkv`, writing `out` (device addresses).
fn attention_params(cfg: &DitConfig, rows: usize, qkv: u64, out: u64) -> AttentionParams {
    let hd = cfg.head_dim();
    AttentionParams {
        qkv,
        out,
        batch: rows as i32,
        tokens: cfg.tokens() as i32,
        heads: cfg.heads as i32,
        head_dim: hd as i32,
        scale: 1.0 / (hd as f32).sqrt(),
    }
}

fn bench_attention(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
    imp: Option<AttentionImpl>,
) -> Result<KernelRow> {
    let (t, h, hd) = (cfg.tokens(), cfg.heads, cfg.head_dim());
    let qkv_len = rows * t * 3 * cfg.hidden;
    let copies = rotation_copies(2 * qkv_len, rotate);
    let inputs = (0..copies)
        .map(|c| random_bf16(gpu, qkv_len, 1.0, 200 + c as u64, "attention qkv"))
        .collect::<Result<Vec<_>>>()?;
    let out = gpu.alloc_zeros::<bf16>(rows * t * cfg.hidden, "attention out")?;
    let params = |i: usize| attention_params(cfg, rows, dptr(&inputs[i % copies]), dptr(&out));
    // None: what the model runs (FORA_ATTENTION); Some: that implementation, named.
    let (stats, per_replay) = timer.time_alone(gpu, copies, |i| match imp {
        None => attention(gpu, &params(i)),
        Some(imp) => attention_with(gpu, &params(i), imp),
    })?;
    Ok(KernelRow {
        name: "attention".into(),
        imp: match imp {
            None => "custom".into(),
            Some(imp) => format!("custom ({})", imp.name()),
        },
        rows,
        shape: format!("B={rows} H={h} T={t} d={hd}"),
        bound: Bound::Compute,
        work: attention_flops(rows, h, t, hd),
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

fn bench_fora_reuse(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
) -> Result<KernelRow> {
    let (d, t, l) = (cfg.hidden, cfg.tokens(), cfg.depth);
    let slab = rows * t * d;
    let cols = ada_cols(cfg);
    // Minimum traffic: the cache once, x read and written once, two gate vectors per layer.
    let bytes = 2 * l * slab * 2 + 2 * slab * 4 + rows * l * 2 * d * 4;
    let set = 2 * l * slab * 2 + slab * 4 + rows * cols * 4;
    let copies = rotation_copies(set, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 300 + 10 * c as u64;
        sets.push((
            random_f32(gpu, slab, 1.0, seed, "reuse x")?,
            random_bf16(gpu, 2 * l * slab, 1.0, seed + 1, "reuse cache")?,
            random_f32(gpu, rows * cols, 1e-3, seed + 2, "reuse modulation")?,
        ));
    }
    let params = |i: usize| {
        let (x, cache, m) = &sets[i % copies];
        ForaReuseParams {
            x: dptr(x),
            cache: dptr(cache),
            modulation: dptr(m),
            slab: slab as i64,
            rows: rows as i32,
            tokens: t as i32,
            dim: d as i32,
            layers: l as i32,
            ld_mod: cols as i32,
            layer_cols: (6 * d) as i32,
            gate_msa_col: (2 * d) as i32,
            gate_mlp_col: (5 * d) as i32,
        }
    };
    let (stats, per_replay) = timer.time_alone(gpu, copies, |i| fora_reuse(gpu, &params(i)))?;
    Ok(KernelRow {
        name: "fora_reuse".into(),
        imp: "custom".into(),
        rows,
        shape: format!(
            "{l} layers x 2 x {rows}x{t}x{d}, {:.1} MB",
            bytes as f64 / 1e6
        ),
        bound: Bound::Memory,
        work: bytes as f64,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

fn bench_patch_embed(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
) -> Result<KernelRow> {
    let (d, t) = (cfg.hidden, cfg.tokens());
    let k = cfg.in_channels * cfg.patch * cfg.patch;
    let slab = rows * t * d;
    let img = rows * cfg.image_len();
    // Latents read, x written (f32); the weight and the position table once.
    let bytes = img * 4 + slab * 4 + (k * d + t * d + d) * 4;
    let copies = rotation_copies(img * 4 + slab * 4, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 500 + 10 * c as u64;
        sets.push((
            random_f32(gpu, img, 1.0, seed, "embed latents")?,
            gpu.alloc_zeros::<f32>(slab, "embed out")?,
        ));
    }
    let weight_t = random_f32(gpu, k * d, 0.1, 590, "embed weight")?;
    let bias = random_f32(gpu, d, 0.1, 591, "embed bias")?;
    let pos = random_f32(gpu, t * d, 1.0, 592, "embed pos")?;
    let params = |i: usize| {
        let (lat, out) = &sets[i % copies];
        PatchEmbedParams {
            latents: dptr(lat),
            weight_t: dptr(&weight_t),
            bias: dptr(&bias),
            pos: dptr(&pos),
            out: dptr(out),
            images: rows as i32,
            rows: rows as i32,
            channels: cfg.in_channels as i32,
            height: cfg.input_size as i32,
            width: cfg.input_size as i32,
            patch: cfg.patch as i32,
            dim: d as i32,
        }
    };
    let (stats, per_replay) = timer.time_alone(gpu, copies, |i| patch_embed(gpu, &params(i)))?;
    Ok(KernelRow {
        name: "patch_embed".into(),
        imp: "custom".into(),
        rows,
        shape: format!(
            "{rows}x{t} tokens, k {k}, D {d}, {:.1} MB",
            bytes as f64 / 1e6
        ),
        bound: Bound::Memory,
        work: bytes as f64,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

/// The sampler update of one step (unpatchify + CFG + DDPM with learned sigma + Philox noise,
/// `sampler_step`): `rows` model rows are `rows / 2` images with CFG, as the steps run them.
fn bench_sampler_step(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
) -> Result<KernelRow> {
    let images = (rows / 2).max(1);
    let model_rows = 2 * images;
    let out_len = model_rows * cfg.out_len();
    let img = images * cfg.image_len();
    // The model output read (both halves), x_t read and x_{t-1} written (f32).
    let bytes = out_len * 4 + 2 * img * 4;
    let copies = rotation_copies(bytes, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 700 + 10 * c as u64;
        sets.push((
            random_f32(gpu, out_len, 1.0, seed, "sampler model output")?,
            random_f32(gpu, img, 1.0, seed + 1, "sampler latents")?,
        ));
    }
    let diffusion = Diffusion::new("250", cfg.learn_sigma)?;
    let update = diffusion.step_update(200, SamplerKind::Ddpm)?;
    let guidance = Guidance {
        scale: 4.0,
        mode: GuidanceMode::Official3,
    };
    let params = |i: usize| {
        let (model_out, x) = &sets[i % copies];
        let mut p = SamplerStepParams {
            model_out: dptr(model_out),
            x: dptr(x),
            noise: 0,
            seed: 1,
            noise_stream: 49,
            images: images as i32,
            rows: model_rows as i32,
            channels: cfg.in_channels as i32,
            out_channels: cfg.out_channels() as i32,
            height: cfg.input_size as i32,
            width: cfg.input_size as i32,
            patch: cfg.patch as i32,
            guided_channels: guided_channels(Some(guidance), cfg.in_channels, cfg.out_channels()),
            cfg_scale: guidance.scale,
            learn_sigma: cfg.learn_sigma as i32,
            ..Default::default()
        };
        set_update(&mut p, &update);
        p
    };
    // The update rewrites x in place: every replay steps the same latents once more, which
    // changes their values, not the work.
    let (stats, per_replay) = timer.time_alone(gpu, copies, |i| sampler_step(gpu, &params(i)))?;
    Ok(KernelRow {
        name: "sampler_step".into(),
        imp: "custom".into(),
        rows: model_rows,
        shape: format!(
            "{images} image(s) + CFG, {}x{}x{}, {:.1} MB",
            cfg.in_channels,
            cfg.input_size,
            cfg.input_size,
            bytes as f64 / 1e6
        ),
        bound: Bound::Memory,
        work: bytes as f64,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

/// The fused reuse forward: what patch_embed + fora_reuse + layernorm_modulate do in a reuse
/// step, in one launch.
fn bench_fora_reuse_final(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
    tpt: ReuseTokens,
) -> Result<KernelRow> {
    let (d, t, l) = (cfg.hidden, cfg.tokens(), cfg.depth);
    let k = cfg.in_channels * cfg.patch * cfg.patch;
    let slab = rows * t * d;
    let img = rows * cfg.image_len();
    let cols = ada_cols(cfg);
    // Minimum traffic: the cache once, latents read, the bf16 LayerNorm output written, the
    // gates, shift and scale vectors of every row, the embedding weight and positions once.
    let bytes = 2 * l * slab * 2
        + img * 4
        + slab * 2
        + rows * (2 * l + 2) * d * 4
        + (k * d + t * d + d) * 4;
    let set = 2 * l * slab * 2 + img * 4 + slab * 2 + rows * cols * 4;
    let copies = rotation_copies(set, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 600 + 10 * c as u64;
        sets.push((
            random_f32(gpu, img, 1.0, seed, "fused latents")?,
            random_bf16(gpu, 2 * l * slab, 1.0, seed + 1, "fused cache")?,
            random_f32(gpu, rows * cols, 1e-3, seed + 2, "fused modulation")?,
            gpu.alloc_zeros::<bf16>(slab, "fused out")?,
        ));
    }
    let weight_t = random_f32(gpu, k * d, 0.1, 690, "fused embed weight")?;
    let bias = random_f32(gpu, d, 0.1, 691, "fused embed bias")?;
    let pos = random_f32(gpu, t * d, 1.0, 692, "fused pos")?;
    let params = |i: usize| {
        let (lat, cache, m, out) = &sets[i % copies];
        ForaReuseFinalParams {
            latents: dptr(lat),
            embed_weight_t: dptr(&weight_t),
            embed_bias: dptr(&bias),
            pos: dptr(&pos),
            cache: dptr(cache),
            modulation: dptr(m),
            out: dptr(out),
            ..reuse_final_params(cfg, rows, rows)
        }
    };
    let (stats, per_replay) =
        timer.time_alone(gpu, copies, |i| fora_reuse_final_with(gpu, &params(i), tpt))?;
    let picked = ReuseTokens::pick(&params(0), gpu.multiprocessors()) == tpt;
    Ok(KernelRow {
        name: "fora_reuse_final".into(),
        // The variant the launcher picks at these rows is "custom"; the others are named.
        imp: if picked {
            "custom".into()
        } else {
            format!(
                "custom ({} tokens/thread, {} layers in flight{})",
                tpt.tokens(),
                tpt.layers_in_flight(),
                match tpt.layers_prefetched() {
                    0 => String::new(),
                    n => format!(", {n} more prefetched to L2"),
                }
            )
        },
        rows,
        shape: format!(
            "embed + {l} layers x 2 x {rows}x{t}x{d} + LN, {:.1} MB",
            bytes as f64 / 1e6
        ),
        bound: Bound::Memory,
        work: bytes as f64,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

/// layernorm_modulate, or with `residual` the residual_layernorm that fuses proj / fc2's
/// residual epilogue into it (its extra traffic: the f32 product read, x written, the bf16
/// cache written, a gate vector per row).
fn bench_layernorm(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
    residual: bool,
    warps: RowWarps,
) -> Result<KernelRow> {
    let (d, t) = (cfg.hidden, cfg.tokens());
    let slab = rows * t * d;
    let cols = ada_cols(cfg);
    // x read (f32), out written (bf16), one shift and one scale vector per row.
    let mut bytes = slab * 4 + slab * 2 + rows * 2 * d * 4;
    let mut set = slab * 4 + slab * 2 + rows * cols * 4;
    if residual {
        bytes += slab * 4 + slab * 4 + slab * 2 + rows * d * 4 + d * 4;
        set += slab * 4 + slab * 2;
    }
    let copies = rotation_copies(set, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 400 + 10 * c as u64;
        let (acc, cache) = if residual {
            (
                Some(random_f32(gpu, slab, 1.0, seed + 2, "residual_ln product")?),
                Some(gpu.alloc_zeros::<bf16>(slab, "residual_ln cache")?),
            )
        } else {
            (None, None)
        };
        sets.push((
            random_f32(gpu, slab, 1.0, seed, "layernorm x")?,
            random_f32(gpu, rows * cols, 0.1, seed + 1, "layernorm modulation")?,
            gpu.alloc_zeros::<bf16>(slab, "layernorm out")?,
            acc,
            cache,
        ));
    }
    let bias = random_f32(gpu, d, 0.1, 499, "residual_ln bias")?;
    let launch = |i: usize| {
        let (x, m, out, acc, cache) = &sets[i % copies];
        match (acc, cache) {
            (Some(acc), Some(cache)) => residual_layernorm_with(
                gpu,
                &ResidualLayerNormParams {
                    acc: dptr(acc),
                    bias: dptr(&bias),
                    cache: dptr(cache),
                    x: dptr(x),
                    modulation: dptr(m),
                    out: dptr(out),
                    rows: rows as i32,
                    tokens: t as i32,
                    dim: d as i32,
                    ld_acc: d as i32,
                    ld_mod: cols as i32,
                    gate_col: (2 * d) as i32,
                    shift_col: (3 * d) as i32,
                    scale_col: (4 * d) as i32,
                    acc_bf16: 0,
                    eps: 1e-6,
                    acc_splits: 1,
                    acc_split_stride: 0,
                },
                warps,
            ),
            _ => layernorm_modulate_with(
                gpu,
                &LayerNormModulateParams {
                    x: dptr(x),
                    modulation: dptr(m),
                    out: dptr(out),
                    rows: rows as i32,
                    tokens: t as i32,
                    dim: d as i32,
                    ld_mod: cols as i32,
                    shift_col: 0,
                    scale_col: d as i32,
                    eps: 1e-6,
                },
                warps,
            ),
        }
    };
    let (stats, per_replay) = timer.time_alone(gpu, copies, launch)?;
    // The variant the launchers pick at these rows is "custom"; the other is named.
    let picked = RowWarps::default() == warps;
    Ok(KernelRow {
        name: if residual { "residual_ln" } else { "layernorm" }.into(),
        imp: if picked {
            "custom".into()
        } else {
            match warps {
                RowWarps::One => "custom (1 warp/row)".into(),
                RowWarps::Four => "custom (4 warps/row)".into(),
            }
        },
        rows,
        shape: format!("{rows}x{t}x{d}, {:.1} MB", bytes as f64 / 1e6),
        bound: Bound::Memory,
        work: bytes as f64,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

/// The step records of a sampler's plan: step k with the sampler's own update for i = S-1-k.
fn step_specs(sampler: &Sampler<'_, CudaBackend>, plan: &SamplePlan) -> Result<Vec<StepSpec>> {
    let s = plan.steps;
    (0..s)
        .map(|k| {
            let i = s - 1 - k;
            Ok(StepSpec {
                k,
                i,
                t: plan.timesteps[k],
                mode: StepMode::Compute,
                update: sampler.diffusion().step_update(i, SamplerKind::Ddpm)?,
            })
        })
        .collect()
}

fn bench_steps(
    backend: &mut CudaBackend,
    plan: &BenchPlan,
    timer: &Timer,
    rows: usize,
    seed: u64,
    report: &mut Report,
) {
    let gemm = gemm_name(backend.gemm_impl()).to_string();
    let cfg = backend.config();
    let (classes, guidance) = rows_request(rows, cfg.num_classes, plan.cfg_scale);
    let what = format!("{gemm} GEMM, {rows} rows");
    let prepared = Sampler::new(
        &*backend,
        SamplerOptions::ddpm(plan.steps).with_guidance(guidance),
    )
    .and_then(|sampler| {
        let splan = sampler.plan(&classes, NoiseSource::Seed(seed))?;
        let specs = step_specs(&sampler, &splan)?;
        Ok((splan, specs))
    });
    let (splan, specs) = match prepared {
        Ok(p) => p,
        Err(e) => {
            report.error("steps", &what, &e);
            return;
        }
    };
    let spec = |i: usize, mode: StepMode| StepSpec {
        mode,
        ..specs[i % specs.len()]
    };
    let launches = match count_launches(
        backend,
        &splan,
        &spec(0, StepMode::Compute),
        &spec(1, StepMode::Reuse),
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            report.error("steps", &format!("{what}: launch count"), &e);
            None
        }
    };
    let mut times = [None, None];
    let mut host = [None, None];
    let mut flags = (None, None);
    match backend.workspace(&splan) {
        Ok(mut ws) => {
            flags = (Some(ws.uses_graphs()), Some(ws.modulation_precomputed()));
            for (slot, (mode, kind)) in [
                (StepMode::Compute, StepKind::Full),
                (StepMode::Reuse, StepKind::Reuse),
            ]
            .into_iter()
            .enumerate()
            {
                // A range per step so that a profile (tools/ncu_summary.py) can group kernels
                // by rows and step kind.
                let timed = timer.time_with_host(backend.gpu(), |i| {
                    let _step = crate::nvtx_range!("rows {rows} step {i} {}", kind.name());
                    backend.step(&mut ws, &spec(i, mode))
                });
                match timed {
                    Ok((st, h)) => {
                        times[slot] = Some(st);
                        host[slot] = Some(h);
                    }
                    Err(e) => report.error("steps", &format!("{what}: {} step", kind.name()), &e),
                }
            }
        }
        Err(e) => report.error("steps", &format!("{what}: workspace"), &e),
    }
    let [full, reuse] = times;
    for (kind, stats, count, host_issue_ms) in [
        (StepKind::Full, full, launches.map(|c| c.0), host[0]),
        (StepKind::Reuse, reuse, launches.map(|c| c.1), host[1]),
    ] {
        report.steps.push(StepRow {
            gemm: gemm.clone(),
            rows,
            kind,
            stats,
            launches: count,
            graphs: flags.0,
            precomputed_modulation: flags.1,
            host_issue_ms,
        });
    }
}

/// What one compute step and one reuse step enqueue: a workspace built without CUDA graphs
/// runs a step kernel by kernel; capturing that step in a graph (nothing executes) and
/// counting the graph's nodes counts every kernel, cuBLASLt's included. The captured graphs of
/// a normal workspace hold the same kernels.
fn count_launches(
    backend: &mut CudaBackend,
    plan: &SamplePlan,
    compute: &StepSpec,
    reuse: &StepSpec,
) -> Result<(LaunchCount, LaunchCount)> {
    let options = backend.options();
    backend.set_options(CudaOptions {
        graphs: false,
        ..options
    });
    let ws = backend.workspace(plan);
    backend.set_options(options);
    let mut ws = ws?;
    let gpu = backend.gpu();
    let c = capture_count(gpu, || backend.step(&mut ws, compute))
        .context("counting the launches of a compute step")?;
    let r = capture_count(gpu, || backend.step(&mut ws, reuse))
        .context("counting the launches of a reuse step")?;
    Ok((c, r))
}

fn capture_count(gpu: &Gpu, enqueue: impl FnOnce() -> Result<()>) -> Result<LaunchCount> {
    let stream = gpu.stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .context("cannot start a stream capture")?;
    let enqueued = enqueue();
    // End the capture whatever happened, so the stream stays usable.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    enqueued?;
    let graph = graph
        .context("cannot end the stream capture")?
        .context("the captured step is empty")?;
    let mut n = 0usize;
    // SAFETY: the graph is alive (owned by `graph`) for both calls; the second call writes at
    // most `n` nodes into a buffer of `n`.
    unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut n) }
        .result()
        .context("cuGraphGetNodes")?;
    let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
    unsafe { sys::cuGraphGetNodes(graph.cu_graph(), nodes.as_mut_ptr(), &mut n) }
        .result()
        .context("cuGraphGetNodes")?;
    let mut count = LaunchCount::default();
    for &node in &nodes[..n.min(nodes.len())] {
        let mut ty = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: `node` belongs to the live graph.
        unsafe { sys::cuGraphNodeGetType(node, &mut ty) }
            .result()
            .context("cuGraphNodeGetType")?;
        match ty {
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => count.kernels += 1,
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY => count.memcpys += 1,
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET => count.memsets += 1,
            _ => count.other += 1,
        }
    }
    Ok(count)
}

fn bench_e2e(backend: &CudaBackend, plan: &BenchPlan, seed: u64, report: &mut Report) {
    let gemm = gemm_name(backend.gemm_impl()).to_string();
    let cfg = backend.config();
    let (classes, guidance) = rows_request(2, cfg.num_classes, plan.cfg_scale);
    let sampler = match Sampler::new(
        backend,
        SamplerOptions::ddpm(plan.steps).with_guidance(guidance),
    ) {
        Ok(s) => s,
        Err(e) => {
            report.error("e2e", "sampler", &e);
            return;
        }
    };
    let run = |interval: usize| -> Result<crate::sampler::Samples> {
        let mut policy = policy_for_interval(interval)?;
        sampler.sample(&classes, NoiseSource::Seed(seed), policy.as_mut())
    };
    // One untimed run: first-use costs (module loading, cuBLASLt heuristics) stay out.
    if let Err(e) = run(plan.intervals[0]) {
        report.error("e2e", "warm-up run", &e);
        return;
    }
    for &n in &plan.intervals {
        let mut loops = Vec::with_capacity(plan.e2e_reps);
        let mut setups = Vec::with_capacity(plan.e2e_reps);
        let mut walls = Vec::with_capacity(plan.e2e_reps);
        let mut last = None;
        let mut failed = false;
        for _ in 0..plan.e2e_reps {
            match run(n) {
                Ok(out) => {
                    loops.push(out.stats.sampling.as_secs_f64() * 1e3);
                    setups.push(out.stats.setup.as_secs_f64() * 1e3);
                    walls.push(out.stats.wall.as_secs_f64() * 1e3);
                    last = Some(out);
                }
                Err(e) => {
                    report.error("e2e", &format!("N={n}"), &e);
                    failed = true;
                    break;
                }
            }
        }
        let (Some(out), false) = (last, failed) else {
            continue;
        };
        let median = |v: &[f64]| Stats::from_samples(v).map(|s| s.median_ms);
        let (Ok(loop_ms), Ok(setup_ms), Ok(wall_ms)) =
            (median(&loops), median(&setups), median(&walls))
        else {
            report.error(
                "e2e",
                &format!("N={n}"),
                &anyhow::anyhow!("invalid wall times"),
            );
            continue;
        };
        report.e2e.push(E2eRow {
            gemm: gemm.clone(),
            interval: n,
            steps: out.stats.steps,
            rows: 2,
            computed: out.stats.computed,
            reused: out.stats.reused,
            reps: loops.len(),
            loop_ms,
            setup_ms,
            wall_ms,
            finite: out.latents.iter().all(|v| v.is_finite()),
        });
    }
}
