//! The benchmark harness (`fora bench`, `cargo bench --bench dit`): DiT + FORA on one NVIDIA GPU,
//! measured with CUDA events on the device's stream.
//!
//! Sections (each can be selected with `--sections`; measured in the order steps, ops, e2e,
//! ceilings, kernels, so that the step times come before the kernel rows' long 256-row runs):
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
//! - **steps**: one sampler step as the sampler runs it ([`Backend::step`](crate::backend::Backend::step) on the backend's
//!   workspace: the captured compute or reuse graph, the sampler update), per batch of model
//!   rows (rows include the CFG half), with effective TFLOP/s `2 * macs_per_row * rows / time`
//!   and the launches of one step, counted by capturing a step of a graph-less workspace and
//!   counting the graph's nodes.
//! - **ops**: where a step's time goes inside the step, per batch: a computing and a reuse step
//!   launched op by op (no graphs) behind a stream hold, so that they run back to back, with
//!   CUDA events around every op the model marks (qkv, attention, proj, residual_ln, fc1, fc2,
//!   conditioning, the sampler update, ...): each op's time a step, its share, TFLOP/s for the
//!   matrix products, and the time between ops, beside the step as the steps section timed it.
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

use crate::backend::{Guidance, GuidanceMode};
use crate::config::{Arch, DitConfig};
use crate::cuda::backend::CudaOptions;
use crate::cuda::gemm::GemmImpl;
use crate::cuda::{CudaBackend, Gpu};
use crate::weights::DitWeights;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys;
use serde_json::{json, Value};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod kernels;
mod ops;
mod report;
mod steps;
pub(crate) mod timer;

use kernels::{bench_ceilings, bench_kernels};
use ops::bench_ops;
pub use ops::{aggregate_op_times, op_flops, OpRow, OpStep};
pub use report::*;
use steps::{bench_e2e, bench_steps};
use timer::Timer;

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
    /// The TMA kernels in clusters that multicast the operand tiles (pairs along M sharing W,
    /// or 4 x 1 and 4 x 2 clusters also sharing A; 9.x only; opt-in).
    #[value(name = "tma_mc")]
    TmaMc,
}

/// A part of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// The card's measured ceilings: a large cuBLASLt GEMM, device copies and reads.
    Ceilings,
    /// Each kernel against cuBLASLt and the ceilings.
    Kernels,
    /// Computing and reuse steps per batch.
    Steps,
    /// Each op's time inside a computing and a reuse step, per batch.
    Ops,
    /// 250-step FORA runs end to end per interval.
    E2e,
}

/// Arguments of `fora bench` and of the `dit` bench binary.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct BenchArgs {
    /// Checkpoint to benchmark (safetensors or a PyTorch checkpoint, official DiT key layout).
    /// Default: random weights of --arch (DiT-XL/2) at --input-size, so no checkpoint is needed.
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
    /// FORA intervals N of the end-to-end runs (1 = no caching; at most 1000). Default
    /// 1,2,3,4,5.
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
    /// Attention kernels of the step and end-to-end sections (auto, v1, v2, wgmma, wgmma_mn,
    /// wgmma_mn_deep, wgmma_mn_split, tma, tma_pp). Default: $FORA_ATTENTION, else auto. The kernel
    /// section times every one this card runs.
    #[arg(long, value_name = "IMPL")]
    pub attention: Option<String>,
    /// Side of the square bf16 GEMM that measures the card's ceiling: a multiple of 8 from 256
    /// to 32768. Default 8192 (4096 with --quick).
    #[arg(long)]
    pub ceiling_size: Option<usize>,
    /// MiB the memory ceilings (copy and read) move. Default 1024.
    #[arg(long)]
    pub copy_mib: Option<usize>,
    /// Classifier-free guidance scale of the CFG batches.
    #[arg(long, default_value_t = 4.0, allow_hyphen_values = true)]
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
    /// Also run the step, op and end-to-end sections on tuned options: per batch, before its
    /// rows, the backend's execution paths are each checked and timed on a window of that
    /// batch's FORA run (N = 3 where --intervals has it) and the fastest is taken
    /// (`fora::cuda::tune`; candidates: $FORA_TUNE_CANDIDATES, else the built-in list, less
    /// $FORA_TUNE_SKIP's names); those
    /// rows are labelled `tuned`, the end-to-end runs take the 2-row choice, and the report
    /// lists every candidate.
    #[arg(long)]
    pub tune: bool,
    /// With --tune: the longest each batch's tuning may search, in seconds (finite, above 0;
    /// default: no limit). Once it is spent, the candidates not yet measured are listed as not
    /// tried and the combinations are skipped; the choice is made among those measured (the
    /// given options always are, and are timed again and in turn with the first winner after
    /// it, a few windows more; later winners only while the budget lasts), so a tuning ends
    /// near its budget instead of being killed by an outer timeout. A measurement in flight is
    /// not cut.
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    pub tune_budget_s: Option<f64>,
    /// The longest one measurement may take, in seconds (at least 1; default 300): each
    /// timed kernel or step row (its first warm-up run, then the rest: ten times what they
    /// take at the first one's pace where that is longer), and with --tune each candidate's
    /// check and windows (ten times the given options' where that is longer; the given
    /// options' own are not watched). Past it the process ends (exit status 3) with a line
    /// naming what hung: a launch that never ends cannot be stopped otherwise. Not watched:
    /// the end-to-end runs (a 250-step run of many rows takes minutes), workspace set-up, the
    /// in-model op times.
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    pub watchdog_s: Option<f64>,
    /// Write the benchmark's weights (the random ones, or --model's: a PyTorch checkpoint so
    /// becomes a safetensors file that records its architecture) to this safetensors file
    /// (official key layout, f32, config in the metadata) and exit: the PyTorch reference can
    /// load them. Needs no GPU.
    #[arg(long, value_name = "PATH")]
    pub save_weights: Option<PathBuf>,
}

/// [`BenchArgs`] with every default resolved and every value checked.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchPlan {
    /// The smaller set (`--quick`).
    pub quick: bool,
    /// The parts to run, in order.
    pub sections: Vec<Section>,
    /// Model rows of the step measurements.
    pub batches: Vec<usize>,
    /// Model rows of the per-kernel shapes.
    pub kernel_batches: Vec<usize>,
    /// FORA intervals N of the end-to-end runs.
    pub intervals: Vec<usize>,
    /// DDPM steps of the end-to-end runs.
    pub steps: usize,
    /// End-to-end runs per interval.
    pub e2e_reps: usize,
    /// Timed runs per measurement.
    pub runs: usize,
    /// Untimed runs before each measurement.
    pub warmup: usize,
    /// The GEMM implementations the steps are measured with.
    pub gemms: Vec<GemmImpl>,
    /// Side of the square GEMM that measures the tensor-core ceiling.
    pub ceiling_size: usize,
    /// Bytes of the copy and read that measure the memory ceiling.
    pub copy_bytes: usize,
    /// Classifier-free guidance scale of the CFG batches.
    pub cfg_scale: f32,
    /// The JSON report; the Markdown goes beside it with extension .md.
    pub json: PathBuf,
    /// Also measure on tuned options (`--tune`).
    pub tune: bool,
    /// With `tune`: the candidates (`FORA_TUNE_CANDIDATES`, else the built-in list, less
    /// `FORA_TUNE_SKIP`'s), read when
    /// the plan is made so that a bad list fails before anything runs; empty otherwise.
    pub tune_candidates: Vec<crate::cuda::tune::TuneCandidate>,
    /// With `tune`: the time budget of each batch's tuning (`--tune-budget-s`;
    /// [`crate::cuda::tune::TuneSettings::budget`]); `None`: no limit.
    pub tune_budget: Option<std::time::Duration>,
    /// The longest one timed measurement, or one tuning candidate's
    /// ([`crate::cuda::tune::TuneSettings::watchdog`]), may take before the process ends
    /// (`--watchdog-s`, default [`DEFAULT_WATCHDOG`]; [`crate::watchdog`]).
    pub watchdog: std::time::Duration,
}

/// `--watchdog-s`'s default, and `fora sample --tune`'s watchdog: far past one warm-up run or
/// tuning window at the batches a card holds (the limits also scale with what a measurement
/// is seen to take), short of a lost evening.
pub const DEFAULT_WATCHDOG: std::time::Duration = std::time::Duration::from_secs(300);

impl BenchArgs {
    /// Resolves defaults (full or `--quick` set) and validates every value.
    pub fn plan(&self) -> Result<BenchPlan> {
        let q = self.quick;
        let list = |given: &Option<Vec<usize>>,
                    full: &[usize],
                    quick: &[usize],
                    what: &str,
                    max: usize| {
            let v = given
                .clone()
                .unwrap_or_else(|| if q { quick } else { full }.to_vec());
            ensure!(!v.is_empty(), "--{what}: give at least one value");
            if let Some(bad) = v.iter().find(|&&x| x == 0 || x > max) {
                bail!("--{what}: {bad} is not a number from 1 to {max}");
            }
            Ok(v)
        };
        // Bounds far past any use, so that products of them cannot overflow.
        let batches = list(&self.batches, &[2, 16, 64, 256], &[2, 64], "batches", 65536)?;
        let kernel_batches = list(
            &self.kernel_batches,
            &[2, 256],
            &[2],
            "kernel-batches",
            65536,
        )?;
        // An interval past the 1000 steps of the diffusion process reuses nothing.
        let intervals = list(
            &self.intervals,
            &[1, 2, 3, 4, 5],
            &[1, 3],
            "intervals",
            1000,
        )?;
        ensure!(
            (1..=1000).contains(&self.steps),
            "--steps {}: the diffusion process has 1 to 1000 steps",
            self.steps
        );
        ensure!(
            (1..=100_000).contains(&self.runs),
            "--runs {}: use 1 to 100000",
            self.runs
        );
        ensure!(
            self.warmup <= 100_000,
            "--warmup {}: use 0 to 100000",
            self.warmup
        );
        let e2e_reps = self.e2e_reps.unwrap_or(if q { 1 } else { 3 });
        ensure!(
            (1..=1000).contains(&e2e_reps),
            "--e2e-reps {e2e_reps}: use 1 to 1000"
        );
        let ceiling_size = self.ceiling_size.unwrap_or(if q { 4096 } else { 8192 });
        // 32768^2 bf16 is 2 GiB a matrix, three of them: past that the square GEMM is no
        // better a ceiling, and size^2 would overflow a 32-bit count.
        ensure!(
            (256..=32768).contains(&ceiling_size) && ceiling_size.is_multiple_of(8),
            "--ceiling-size {ceiling_size}: use a multiple of 8 from 256 to 32768"
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
        let tune_budget = self
            .tune_budget_s
            .map(|s| seconds_flag("--tune-budget-s", "time budget", s))
            .transpose()?;
        ensure!(
            self.tune || tune_budget.is_none(),
            "--tune-budget-s bounds the tuning of --tune: give --tune too"
        );
        let watchdog = self
            .watchdog_s
            .map(|s| seconds_flag("--watchdog-s", "watchdog", s))
            .transpose()?
            .unwrap_or(DEFAULT_WATCHDOG);
        // Under a second a healthy first launch (module loading, a graph's instantiation)
        // would be taken for a hang.
        ensure!(
            watchdog >= std::time::Duration::from_secs(1),
            "--watchdog-s {}: under a second every measurement would be taken for a launch \
             that never ends; give at least 1",
            watchdog.as_secs_f64()
        );
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
            GemmChoice::TmaMc => vec![GemmImpl::TmaMulticast],
            // The default implementation first: the end-to-end section runs on the first only.
            GemmChoice::Both => vec![GemmImpl::CublasLt, GemmImpl::Custom],
        };
        let mut sections = self.sections.clone().unwrap_or_else(|| {
            vec![
                Section::Ceilings,
                Section::Kernels,
                Section::Steps,
                Section::Ops,
                Section::E2e,
            ]
        });
        ensure!(
            !sections.is_empty(),
            "--sections: give at least one section"
        );
        sections.dedup();
        // The tuning serves the steps, ops and end-to-end sections (their `tuned` rows).
        ensure!(
            !self.tune
                || sections
                    .iter()
                    .any(|s| matches!(s, Section::Steps | Section::Ops | Section::E2e)),
            "--tune times its choice in the steps, ops or e2e section: --sections has none of them"
        );
        let json = self.json.clone().unwrap_or_else(|| {
            std::env::var_os("FORA_BENCH_JSON")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_JSON), PathBuf::from)
        });
        check_json_path(&json)?;
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
            tune: self.tune,
            tune_candidates: if self.tune {
                crate::cuda::tune::candidates_from_env()?
            } else {
                Vec::new()
            },
            tune_budget,
            watchdog,
            json,
        })
    }
}

/// The JSON report's path, checked before anything runs (a run of minutes that could not
/// write its report would be lost): a `.json` file name, since the Markdown goes beside it
/// with `.md` (`--json out.md` would write both to one file), and no regular file where a
/// folder must be. Folders not there yet are made when the report is written.
fn check_json_path(json: &Path) -> Result<()> {
    let flag = "--json (or FORA_BENCH_JSON)";
    let ext = json.extension().and_then(|e| e.to_str()).unwrap_or("");
    ensure!(
        json.file_name().is_some() && ext.eq_ignore_ascii_case("json"),
        "{flag} {}: the file name must end in .json (the Markdown is written beside it, .md)",
        json.display()
    );
    match json.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Folders to be made: the nearest one that exists must be a folder.
        Some(parent) if !parent.exists() => crate::io::nearest_folder(flag, json).map(|_| ()),
        _ => crate::io::check_output_path(flag, json, &["json"]),
    }
}

/// `flag SECONDS` (a `what`: "time budget", "watchdog") as a duration: a finite number of
/// seconds > 0 that a [`std::time::Duration`] holds, else an error naming the flag.
fn seconds_flag(flag: &str, what: &str, seconds: f64) -> Result<std::time::Duration> {
    ensure!(
        seconds.is_finite() && seconds > 0.0,
        "{flag} {seconds}: give a finite number of seconds > 0"
    );
    let d = std::time::Duration::try_from_secs_f64(seconds)
        .map_err(|_| anyhow::anyhow!("{flag} {seconds:e}: too long a {what}"))?;
    // A budget that rounds to nothing would stop the tuning after the given options; a
    // watchdog, end it at once.
    ensure!(
        !d.is_zero(),
        "{flag} {seconds:e}: under a nanosecond, give a finite number of seconds > 0"
    );
    Ok(d)
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
    /// Timed runs.
    pub runs: usize,
    /// Their median.
    pub median_ms: f64,
    /// The fastest.
    pub min_ms: f64,
    /// The slowest.
    pub max_ms: f64,
    /// Their mean.
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

/// Today's date, `YYYY-MM-DD` (UTC).
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_date(secs)
}

/// The model to benchmark: a checkpoint, or random weights of `--arch` (default DiT-XL/2).
pub fn bench_model(args: &BenchArgs) -> Result<(DitConfig, DitWeights, String)> {
    match &args.model {
        Some(path) => {
            let arch = args.arch.as_deref().map(Arch::parse).transpose()?;
            let (cfg, w, format) = DitWeights::load_with_format(path, arch.as_ref())?;
            if format.choice.is_some() {
                eprintln!("bench: --model {}: {format}", path.display());
            }
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
            let w = DitWeights::random(&cfg, args.seed)?;
            Ok((cfg, w, format!("random (seed {})", args.seed)))
        }
    }
}

/// Runs the benchmark: Markdown to stdout, JSON to `--json`. Errors when there is no usable
/// GPU, and (after writing both reports) when any measurement failed.
pub fn run(args: &BenchArgs) -> Result<()> {
    let plan = args.plan()?;
    let attention = (args.attention.as_deref())
        .map(str::parse::<crate::cuda::attention::AttentionImpl>)
        .transpose()
        .context("--attention")?;
    if let Some(path) = &args.save_weights {
        crate::io::check_output_path("--save-weights", path, &["safetensors"])?;
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
    let mut options = CudaOptions::from_env()?;
    if let Some(attention) = attention {
        options.attention = attention;
    }
    let (cfg, weights, source) = bench_model(args)?;
    let mut report = Report::new(ModelInfo::new(&cfg, source), &plan, &options);
    report.device = Some(device_info(&gpu)?);
    // The kernel that runs (auto resolved for this card), not the setting.
    report.attention = options
        .attention
        .resolve(gpu.compute_capability().0)
        .name()
        .to_string();
    let started = Instant::now();
    let json_path = plan.json.clone();
    // The JSON and the Markdown as they stand (a run ended early keeps both).
    let save = |report: &Report| {
        if let Err(e) = report.write_json(&json_path) {
            eprintln!("bench: cannot write {}: {e:#}", json_path.display());
        }
        let md_path = json_path.with_extension("md");
        if let Err(e) = crate::io::write_atomic(&md_path, report.markdown().as_bytes()) {
            eprintln!("bench: cannot write {}: {e:#}", md_path.display());
        }
    };
    let timer = Timer {
        warmup: plan.warmup,
        runs: plan.runs,
        profiler_api: args.profiler_api,
        watchdog: Some(crate::watchdog::Watchdog::start(
            plan.watchdog,
            |what, after| {
                format!(
                    "bench: {what} gave no answer after {after}: the run ends (a launch that \
                     does not end; exit status {})",
                    crate::watchdog::WATCHDOG_EXIT
                )
            },
        )?),
    };
    // Steps and end to end first: the headline numbers, measured before the kernel rows'
    // minutes of 256-row launches (session 18: processes that ran the kernel section first
    // timed the 2-row step 3-5% slower than processes that timed only the steps).
    let want_steps = plan.sections.contains(&Section::Steps);
    let want_ops = plan.sections.contains(&Section::Ops);
    let want_e2e = plan.sections.contains(&Section::E2e);
    // Set where a failure left the GPU unusable: the rest of the run is skipped.
    let mut lost = false;
    if want_steps || want_ops || want_e2e {
        'gemms: for (i, &imp) in plan.gemms.iter().enumerate() {
            let name = imp.name();
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
                    let errors = report.errors.len();
                    bench_steps(
                        &mut backend,
                        &plan,
                        &timer,
                        rows,
                        args.seed,
                        name,
                        &mut report,
                    );
                    save(&report);
                    let after = format!("the {name} steps at {rows} rows");
                    if gpu_lost(backend.gpu(), errors, &mut report, &after) {
                        lost = true;
                        break 'gemms;
                    }
                }
            }
            if want_ops {
                for &rows in &plan.batches {
                    eprintln!("bench: op times, {name} GEMM, {rows} rows");
                    let errors = report.errors.len();
                    bench_ops(&mut backend, &plan, rows, args.seed, name, &mut report);
                    save(&report);
                    let after = format!("the {name} op times at {rows} rows");
                    if gpu_lost(backend.gpu(), errors, &mut report, &after) {
                        lost = true;
                        break 'gemms;
                    }
                }
            }
            // End to end on the first implementation (the default, cuBLASLt) only: it is the slow
            // section.
            if want_e2e && i == 0 {
                eprintln!("bench: end to end, {name} GEMM");
                let errors = report.errors.len();
                bench_e2e(&backend, &plan, args.seed, name, &mut report);
                save(&report);
                let after = format!("the {name} end-to-end runs");
                if gpu_lost(backend.gpu(), errors, &mut report, &after) {
                    lost = true;
                    break 'gemms;
                }
            }
        }
    }
    if !lost && plan.tune && (want_steps || want_ops || want_e2e) {
        bench_tuned(
            args,
            &plan,
            &timer,
            &cfg,
            &weights,
            options,
            &mut report,
            &save,
        );
        save(&report);
    }
    if lost {
        eprintln!("bench: the GPU no longer answers: the rest of the run is skipped");
    } else if plan.sections.contains(&Section::Ceilings) {
        eprintln!("bench: ceilings");
        bench_ceilings(&gpu, &plan, &timer, &mut report);
        save(&report);
    }
    if !lost && plan.sections.contains(&Section::Kernels) {
        for &rows in &plan.kernel_batches {
            eprintln!("bench: kernels at {rows} rows");
            let errors = report.errors.len();
            bench_kernels(&gpu, &cfg, rows, &timer, &mut report, &save);
            save(&report);
            if gpu_lost(
                &gpu,
                errors,
                &mut report,
                &format!("the kernels at {rows} rows"),
            ) {
                break;
            }
        }
    }
    drop(gpu);
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

/// `--tune`: per batch, tunes the options as given (the environment's, --attention) on that
/// batch's FORA run and measures its steps and ops on the choice, labelled `tuned`; then one
/// image end to end on the 2-row choice (tuned for it if 2 is not a batch). Each tuning's
/// table goes to stderr and the report is saved (`save`) as it ends, so that a run cut short
/// keeps them; a failure that leaves the GPU unusable ends the section.
#[allow(clippy::too_many_arguments)]
fn bench_tuned(
    args: &BenchArgs,
    plan: &BenchPlan,
    timer: &Timer,
    cfg: &DitConfig,
    weights: &DitWeights,
    options: CudaOptions,
    report: &mut Report,
    save: &dyn Fn(&Report),
) {
    let candidates = &plan.tune_candidates;
    let mut backend = match Gpu::new(args.gpu)
        .and_then(|g| CudaBackend::with_options(g, cfg, weights, options))
    {
        Ok(b) => b,
        Err(e) => {
            report.error("tune", "backend", &e);
            return;
        }
    };
    let interval = if plan.intervals.contains(&3) {
        3
    } else {
        plan.intervals[0]
    };
    let want = |s: Section| plan.sections.contains(&s);
    // Every batch where its steps or ops are measured; 2 rows for the end-to-end runs.
    let mut rows_list = if want(Section::Steps) || want(Section::Ops) {
        plan.batches.clone()
    } else {
        Vec::new()
    };
    if want(Section::E2e) && !rows_list.contains(&2) {
        rows_list.push(2);
    }
    let mut e2e_options = None;
    for rows in rows_list {
        backend.set_options(options);
        eprintln!(
            "bench: tuning at {rows} rows (FORA N = {interval}{}, a watchdog of {} s a candidate)",
            plan.tune_budget.map_or(String::new(), |b| format!(
                ", a time budget of {} s",
                b.as_secs_f64()
            )),
            plan.watchdog.as_secs_f64()
        );
        match steps::tune_rows(&mut backend, plan, rows, args.seed, interval, candidates) {
            Ok(t) => {
                eprintln!("{}", t.markdown());
                report.tunings.push((interval, t));
                save(report);
            }
            Err(e) => {
                report.error("tune", &format!("{rows} rows"), &e);
                save(report);
                if let Err(sticky) = backend.gpu().synchronize() {
                    let e = anyhow::anyhow!("the GPU no longer answers ({sticky:#})");
                    report.error("tune", "the rest of the tuned section", &e);
                    return;
                }
                continue;
            }
        }
        if rows == 2 {
            e2e_options = Some(backend.options());
        }
        if !plan.batches.contains(&rows) {
            continue;
        }
        let errors = report.errors.len();
        if want(Section::Steps) {
            bench_steps(&mut backend, plan, timer, rows, args.seed, "tuned", report);
        }
        if want(Section::Ops) {
            bench_ops(&mut backend, plan, rows, args.seed, "tuned", report);
        }
        let after = format!("the tuned steps at {rows} rows");
        if gpu_lost(backend.gpu(), errors, report, &after) {
            return;
        }
    }
    if want(Section::E2e) {
        match e2e_options {
            Some(o) => {
                backend.set_options(o);
                eprintln!("bench: end to end, tuned");
                bench_e2e(&backend, plan, args.seed, "tuned", report);
            }
            None => report.error(
                "e2e",
                "tuned",
                &anyhow::anyhow!("not run: the 2-row tuning failed (above)"),
            ),
        }
    }
}

/// After a section that recorded errors past the first `errors_before`: whether the GPU no
/// longer answers. A kernel fault leaves the process's context unusable for good (every backend
/// here shares the device's primary context), so each later row would fail and be reported as
/// a fault of its own; where that is so, one error says what is skipped after `after`.
fn gpu_lost(gpu: &Gpu, errors_before: usize, report: &mut Report, after: &str) -> bool {
    if report.errors.len() == errors_before {
        return false;
    }
    match gpu.synchronize() {
        Ok(()) => false,
        Err(sticky) => {
            let e = anyhow::anyhow!("not run: the GPU no longer answers ({sticky:#})");
            report.error("bench", &format!("everything after {after}"), &e);
            true
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The plan of `fora bench ARGS`.
    fn plan_of(args: &[&str]) -> Result<BenchPlan> {
        let argv = std::iter::once("dit").chain(args.iter().copied());
        let (args, _) = args_from_bench_argv(argv).expect("the parser takes these");
        args.plan()
    }

    /// `--tune-budget-s`: seconds > 0, finite, that a duration holds, with `--tune`; anything
    /// else an error naming the flag (never a panic).
    #[test]
    fn the_tune_budget_is_checked() {
        assert_eq!(plan_of(&["--tune"]).unwrap().tune_budget, None);
        assert_eq!(plan_of(&[]).unwrap().tune_budget, None);
        assert_eq!(
            plan_of(&["--tune", "--tune-budget-s", "90"])
                .unwrap()
                .tune_budget,
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            plan_of(&["--tune-budget-s", "0.25", "--tune"])
                .unwrap()
                .tune_budget,
            Some(Duration::from_millis(250))
        );
        for bad in ["0", "-0", "-5", "NaN", "inf", "-inf", "1e300"] {
            let e = format!(
                "{:#}",
                plan_of(&["--tune", "--tune-budget-s", bad]).unwrap_err()
            );
            assert!(e.contains("--tune-budget-s"), "{bad}: {e}");
        }
        let e = format!("{:#}", plan_of(&["--tune-budget-s", "60"]).unwrap_err());
        assert!(
            e.contains("--tune-budget-s") && e.contains("--tune too"),
            "{e}"
        );
        // The watchdog: the default unless given, with or without --tune; the same checks.
        assert_eq!(
            plan_of(&["--tune"]).unwrap().watchdog,
            super::DEFAULT_WATCHDOG
        );
        assert_eq!(plan_of(&[]).unwrap().watchdog, super::DEFAULT_WATCHDOG);
        assert_eq!(
            plan_of(&["--watchdog-s", "20"]).unwrap().watchdog,
            Duration::from_secs(20)
        );
        for bad in ["0", "-5", "NaN", "inf", "1e300", "1e-12", "0.5"] {
            let e = format!(
                "{:#}",
                plan_of(&["--tune", "--watchdog-s", bad]).unwrap_err()
            );
            assert!(e.contains("--watchdog-s"), "{bad}: {e}");
        }
        assert_eq!(
            plan_of(&["--watchdog-s", "1"]).unwrap().watchdog,
            Duration::from_secs(1)
        );
        // Not a number, or no value: the parser's error.
        for args in [
            &["dit", "--tune", "--tune-budget-s", "soon"][..],
            &["dit", "--tune", "--tune-budget-s"][..],
        ] {
            assert!(
                args_from_bench_argv(args.iter().copied()).is_err(),
                "{args:?}"
            );
        }
    }
}
