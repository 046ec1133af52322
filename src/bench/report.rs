//! The benchmark's results: one [`Report`] of every measurement, as Markdown and as JSON
//! (schema [`SCHEMA`]).

use crate::config::DitConfig;
use crate::cuda::attention::AttentionImpl;
use crate::cuda::backend::CudaOptions;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;

use super::{gbps, tflops, today, BenchPlan, Stats, SCHEMA};

/// The GPU a benchmark ran on.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// The driver's name for it ("NVIDIA H200").
    pub name: String,
    /// (major, minor): (9, 0) for a Hopper.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: usize,
    /// L2 cache size in bytes.
    pub l2_bytes: usize,
    /// Device memory in bytes.
    pub memory_bytes: usize,
}

/// The model benchmarked.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// "DiT-XL/2", or the `depth=..` form for other shapes.
    pub arch: String,
    /// Latent side (32 for 256 px images).
    pub input_size: usize,
    /// Tokens a row (image).
    pub tokens: usize,
    /// Model width.
    pub hidden: usize,
    /// DiT blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Multiply-adds of one row's forward (FLOPs are twice this).
    pub macs_per_row: u64,
    /// "random (seed 0)" or the checkpoint path.
    pub weights: String,
}

impl ModelInfo {
    /// The description of `cfg`, with where its `weights` came from.
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
    /// Its times.
    pub stats: Stats,
    /// TFLOP/s (GEMM) or GB/s (memory) at the median time.
    pub rate: f64,
}

/// Whether a step ran the blocks or reused the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A computing step (the blocks run and fill the cache).
    Full,
    /// A reuse step on its own (with `FORA_REUSE_SUM`, a sums pass of one step, then its sum).
    Reuse,
    /// With `FORA_REUSE_SUM=k`: a reuse step's mean over a run of k (the run's one pass over
    /// the cache included).
    ReuseSummed,
}

impl StepKind {
    /// The name the reports use ("full", "reuse", "reuse_summed").
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Full => "full",
            StepKind::Reuse => "reuse",
            StepKind::ReuseSummed => "reuse_summed",
        }
    }
}

/// Graph nodes one step enqueues, by type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchCount {
    /// Kernel launches.
    pub kernels: usize,
    /// Memory copies.
    pub memcpys: usize,
    /// Memory sets.
    pub memsets: usize,
    /// Any other node (events, host functions, ...).
    pub other: usize,
}

/// One per-step measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    /// "custom" or "cublaslt".
    pub gemm: String,
    /// Model rows (images, twice with CFG).
    pub rows: usize,
    /// Computing or reuse step.
    pub kind: StepKind,
    /// Its times (None: it failed, see the report's errors).
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
    /// The GEMM implementation ("cublaslt", ...).
    pub gemm: String,
    /// FORA interval N (1: no caching).
    pub interval: usize,
    /// Sampling steps.
    pub steps: usize,
    /// Model rows (images, twice with CFG).
    pub rows: usize,
    /// Steps that ran the blocks.
    pub computed: usize,
    /// Steps that reused the cache.
    pub reused: usize,
    /// Runs the medians are over.
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
    /// "sampler_step", "fora_reuse", "fora_reuse_final", "layernorm", "residual_ln", "proj+ln",
    /// "fc2+ln" (FORA_GEMM_LN's fused kernel), "qkv+attention" (FORA_QKV_ATTENTION's).
    pub name: String,
    /// "custom", "cublaslt", "cublaslt+epilogue", "cublaslt-tuned" (GEMMs); "custom" otherwise.
    pub imp: String,
    /// Model rows of the shape.
    pub rows: usize,
    /// "M=512 N=3456 K=1152", "B=2 H=16 T=256 d=72", "1.2 GB".
    pub shape: String,
    /// What its rate is measured against.
    pub bound: Bound,
    /// FLOPs (Compute) or bytes (Memory) of one launch.
    pub work: f64,
    /// Per-launch times: each sample is one graph replay of this many launches, divided.
    pub stats: Option<Stats>,
    /// Launches in one timed graph replay.
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
    /// The section it happened in ("kernels", "steps", ...).
    pub section: String,
    /// The measurement ("attention rows 256", ...).
    pub what: String,
    /// The error, with its causes.
    pub error: String,
}

/// Everything one benchmark run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The day it ran (YYYY-MM-DD, UTC).
    pub date: String,
    /// The GPU (None before one was opened).
    pub device: Option<DeviceInfo>,
    /// The model benchmarked.
    pub model: ModelInfo,
    /// Untimed runs before each measurement.
    pub warmup: usize,
    /// Timed runs a measurement (its median is reported).
    pub runs: usize,
    /// A `--quick` run (smaller ceilings and batches).
    pub quick: bool,
    /// The backend options in this run (`CudaOptions::from_env`: `FORA_CUDA_GRAPHS`,
    /// `FORA_FUSED_REUSE`, ...); each step row says what its workspace did.
    pub options: CudaOptions,
    /// The flash-attention implementation the steps ran (`FORA_ATTENTION`, e.g. "v1").
    pub attention: String,
    /// Classifier-free guidance scale of the CFG batches.
    pub cfg_scale: f32,
    /// The large cuBLASLt GEMM that gives the compute ceiling.
    pub gemm_ceiling: Option<Ceiling>,
    /// Memory bandwidth measured in several ways (copy, copy kernel, read kernel); the best is
    /// the memory ceiling ([`Report::memory_ceiling`]).
    pub memory_ceilings: Vec<Ceiling>,
    /// Reading a buffer that stays in L2 (not a memory ceiling: the roofline of operands that
    /// come from L2, such as a GEMM tile's A and W each k-step).
    pub l2_ceiling: Option<Ceiling>,
    /// Per-step rows.
    pub steps: Vec<StepRow>,
    /// End-to-end rows.
    pub e2e: Vec<E2eRow>,
    /// Per-kernel rows.
    pub kernels: Vec<KernelRow>,
    /// In-model op times, per GEMM, rows and step kind (the `ops` section).
    pub ops: Vec<super::ops::OpStep>,
    /// `--tune`: the tuning of each row count, with the FORA interval whose schedule it timed;
    /// the rows labelled `tuned` ran its choice.
    pub tunings: Vec<(usize, crate::cuda::tune::Tuning)>,
    /// Measurements that failed (the others still ran).
    pub errors: Vec<BenchError>,
}

/// The GEMMs of a DiT block, which the TMA tile tables cover.
const BLOCK_GEMMS: [&str; 4] = ["qkv", "proj", "fc1", "fc2"];

/// FLOP per byte a `bm` x `bn` tile's k-step of 64 loads from L2: 2 BM BN 64 FLOP on
/// (`a_rows` + `w_rows`) x 64 bf16 (fewer rows than the tile's where a cluster shares one).
fn l2_flop_per_byte(bm: f64, a_rows: f64, w_rows: f64, bn: f64) -> f64 {
    (2.0 * bm * bn * 64.0) / ((a_rows + w_rows) * 64.0 * 2.0)
}

/// TFLOP/s that GEMM tiles of 128 x 128, 128 x 192, 128 x 256, 256 x 128, our multicast tiles (the CTAs
/// of a cluster sharing W: each loads half or a quarter of it; in 4 x 2 clusters also A, half
/// each; `FORA_GEMM=tma_mc`) and cuBLASLt's 128 x 256 with A shared by two CTAs can reach when
/// their operands stream from L2 at `l2_gbps`.
pub fn l2_tile_rooflines(l2_gbps: f64) -> String {
    // (name, BM, A rows loaded, W rows loaded, BN).
    [
        ("128x128", 128.0, 128.0, 128.0, 128.0),
        ("128x192", 128.0, 128.0, 192.0, 192.0),
        ("128x256", 128.0, 128.0, 256.0, 256.0),
        ("256x128", 256.0, 256.0, 128.0, 128.0),
        ("128x128 W multicast to 2", 128.0, 128.0, 64.0, 128.0),
        ("128x192 W multicast to 2", 128.0, 128.0, 96.0, 192.0),
        ("128x256 W multicast to 2", 128.0, 128.0, 128.0, 256.0),
        ("128x128 W multicast to 4", 128.0, 128.0, 32.0, 128.0),
        ("128x192 W multicast to 4", 128.0, 128.0, 48.0, 192.0),
        ("128x128 W to 4, A to 2", 128.0, 64.0, 32.0, 128.0),
        ("128x192 W to 4, A to 2", 128.0, 64.0, 48.0, 192.0),
        ("128x256 A multicast to 2", 128.0, 64.0, 256.0, 256.0),
    ]
    .iter()
    .map(|&(name, bm, a_rows, w_rows, bn)| {
        let flop_per_byte = l2_flop_per_byte(bm, a_rows, w_rows, bn);
        format!(
            "{name} {:.0} FLOP/B -> {:.0} TFLOP/s",
            flop_per_byte,
            flop_per_byte * l2_gbps / 1e3
        )
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// FLOP per L2 byte of the TMA tile a forced-tile bench row names ("tma-128x192",
/// "tma-256x128", "tma-st-pp-128x128" (the staged epilogue's), "tma-pp-128x128", "tma-mc-128x256", "tma-mc-pp-128x128", "tma-c4x2-128x192": a cluster of
/// CM x CN CTAs loads 1 / CM of the W tile and 1 / CN of the A tile a CTA, "mc" being 2 x 1;
/// "tma-k3-128x128": a cluster along K, whose CTAs each load their own k-tiles of both, as a
/// plain tile); None for any other row.
pub fn tma_row_flop_per_byte(imp: &str) -> Option<f64> {
    let rest = imp.strip_prefix("tma-")?;
    let (cm, cn, rest): (f64, f64, &str) = match rest.strip_prefix("mc-") {
        Some(r) => (2.0, 1.0, r),
        None => match rest.strip_prefix('c').and_then(|r| r.split_once('-')) {
            Some((shape, r)) => {
                let (cm, cn) = shape.split_once('x')?;
                (cm.parse().ok()?, cn.parse().ok()?, r)
            }
            None => (1.0, 1.0, rest),
        },
    };
    let rest = match rest.strip_prefix('k').and_then(|r| r.split_once('-')) {
        Some((ck, r)) if ck.parse::<u32>().is_ok() => r,
        _ => rest,
    };
    let rest = rest.strip_prefix("st-").unwrap_or(rest);
    let rest = rest.strip_prefix("pp-").unwrap_or(rest);
    let (bm, bn) = rest.split_once('x')?;
    let (bm, bn): (f64, f64) = (bm.parse().ok()?, bn.parse().ok()?);
    Some(l2_flop_per_byte(bm, bm / cn, bn / cm, bn))
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
    /// An empty report of `model` for `plan`'s run under `options`.
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
            l2_ceiling: None,
            steps: Vec::new(),
            e2e: Vec::new(),
            kernels: Vec::new(),
            ops: Vec::new(),
            tunings: Vec::new(),
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

    /// Each forced TMA tile's row of the block GEMMs (qkv, proj, fc1, fc2: the tile's
    /// intensity is its full tiles', which adaLN's few rows and final's 32 columns are not)
    /// against its L2 roofline at the measured L2 read rate: near 100% the tile is L2-bound
    /// (the multicast tiles' roofline is the higher); empty without an L2 rate or such rows.
    fn tma_l2_lines(&self) -> String {
        let Some(l2) = &self.l2_ceiling else {
            return String::new();
        };
        let mut s = String::new();
        for k in &self.kernels {
            if !BLOCK_GEMMS.contains(&k.name.as_str()) {
                continue;
            }
            let (Some(fpb), Some(rate)) = (tma_row_flop_per_byte(&k.imp), k.rate()) else {
                continue;
            };
            if s.is_empty() {
                s += "\nTMA tiles against their L2 roofline (FLOP per L2 byte x the L2 read rate):\n\n\
                      | kernel | rows | tile | TFLOP/s | L2 roofline (TFLOP/s) | % of it |\n\
                      |---|---|---|---|---|---|\n";
            }
            let roof = fpb * l2.rate / 1e3;
            s += &format!(
                "| {} | {} | {} | {:.1} | {:.0} | {:.0} |\n",
                k.name,
                k.rows,
                k.imp,
                rate,
                roof,
                100.0 * rate / roof
            );
        }
        s
    }

    /// For each block GEMM and row count with forced TMA tile rows: the fastest tile beside the
    /// automatic picks (`tma`, `tma_mc`) and the best cuBLASLt, the numbers `TmaTile::pick`,
    /// `pick_multicast` and `pick_splits` are tuned from.
    fn tma_tile_lines(&self) -> String {
        let mut s = String::new();
        let mut done: Vec<(&str, usize)> = Vec::new();
        for k in &self.kernels {
            let key = (k.name.as_str(), k.rows);
            if !BLOCK_GEMMS.contains(&key.0)
                || tma_row_flop_per_byte(&k.imp).is_none()
                || done.contains(&key)
            {
                continue;
            }
            done.push(key);
            let same = |r: &&KernelRow| r.name == k.name && r.rows == k.rows;
            let time = |r: &KernelRow| r.stats.as_ref().map(|st| st.median_ms);
            let Some((tile, best)) = self
                .kernels
                .iter()
                .filter(same)
                .filter(|r| tma_row_flop_per_byte(&r.imp).is_some())
                .filter_map(|r| Some((r.imp.as_str(), time(r)?)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
            else {
                continue;
            };
            let pick = |imp: &str| {
                self.kernels
                    .iter()
                    .filter(same)
                    .find(|r| r.imp == imp)
                    .and_then(time)
            };
            let lt = self.best_cublaslt_ms(&k.name, k.rows);
            if s.is_empty() {
                s += "\nThe fastest forced TMA tile of each GEMM against the automatic picks and the \
                      best cuBLASLt (times in us):\n\n\
                      | kernel | rows | fastest tile | time | `tma` pick | `tma_mc` pick | best \
                      cuBLASLt | fastest tile vs cuBLASLt |\n|---|---|---|---|---|---|---|---|\n";
            }
            s += &format!(
                "| {} | {} | {} | {:.1} | {} | {} | {} | {} |\n",
                k.name,
                k.rows,
                tile,
                best * 1e3,
                fmt_opt(pick("tma").map(|ms| ms * 1e3), 1),
                fmt_opt(pick("tma_mc").map(|ms| ms * 1e3), 1),
                fmt_opt(lt.map(|ms| ms * 1e3), 1),
                fmt_opt(lt.map(|ms| ms / best), 2)
            );
        }
        s
    }

    /// The best cuBLASLt time (ms) of GEMM `name` at `rows` over whole GEMMs with their
    /// epilogue (fused or + the epilogue kernel; a product-only row does less work), weights
    /// rotated out of L2 as for every other row (not the "W in L2" rows).
    fn best_cublaslt_ms(&self, name: &str, rows: usize) -> Option<f64> {
        self.kernels
            .iter()
            .filter(|k| {
                k.name == name
                    && k.rows == rows
                    && k.imp.starts_with("cublaslt")
                    && !k.imp.contains("product")
                    && !k.imp.contains("in L2")
            })
            .filter_map(|k| k.stats.as_ref().map(|s| s.median_ms))
            .min_by(f64::total_cmp)
    }

    /// The best cuBLASLt time of the same GEMM (fused or + epilogue kernel) over this row's
    /// time, for our own GEMM kernels' automatic picks (custom, wgmma, tma, tma_mc; not the
    /// forced-tile rows): > 1 means ours is faster.
    pub fn vs_cublaslt(&self, row: &KernelRow) -> Option<f64> {
        let ours = matches!(row.imp.as_str(), "custom" | "wgmma" | "tma" | "tma_mc");
        if !ours || row.bound != Bound::Compute || row.name == "attention" {
            return None;
        }
        let ours = row.stats.as_ref()?.median_ms;
        Some(self.best_cublaslt_ms(&row.name, row.rows)? / ours)
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
                "fused_final": self.options.fused_final,
                "side_stream": self.options.side_stream,
                "fused_ln": self.options.fused_ln,
                "lt_bias_bf16": self.options.lt_bias_bf16,
                "bf16_residual": self.options.bf16_residual,
                "reuse_gates_only": self.options.reuse_gates_only,
                "step_graph": self.options.step_graph,
                "reuse_table_in_place": self.options.reuse_table_in_place,
                "lt_splitk": self.options.lt_splitk,
                "l2_persist": self.options.l2_persist,
                "prefetch_weights": self.options.prefetch_weights,
                "gemm_ln": self.options.gemm_ln,
                "gemm_ln_many_rows": self.options.gemm_ln_many_rows,
                "gemm_ln_wide": self.options.gemm_ln_wide,
                "gemm_ln_one_per_sm": self.options.gemm_ln_one_per_sm,
                "qkv_attention": self.options.qkv_attention,
                "pdl": self.options.pdl,
                "reuse_sum": self.options.reuse_sum,
                "final_sampler": self.options.final_sampler,
                "tma_tiles": self.options.tma_tiles.to_string(),
                "attention": self.attention,
                "cfg_scale": self.cfg_scale,
                "timing": "CUDA events, back-to-back runs, median",
            },
            "ceilings": {
                "gemm": ceiling(&self.gemm_ceiling, "tflops"),
                "memory": self.memory_ceilings.iter().map(|c| ceiling(&Some(c.clone()), "gbps")).collect::<Vec<_>>(),
                "memory_best": ceiling(&self.memory_ceiling().cloned(), "gbps"),
                "l2_read": ceiling(&self.l2_ceiling, "gbps"),
            },
            "steps": steps,
            "e2e": e2e,
            "kernels": kernels,
            "ops": self.ops_json(),
            "tunings": self.tunings.iter().map(|(interval, t)| tuning_json(*interval, t)).collect::<Vec<_>>(),
            "errors": self.errors.iter().map(|e| json!({
                "section": e.section, "what": e.what, "error": e.error,
            })).collect::<Vec<_>>(),
        })
    }

    /// Per row count: the fused reuse forward against the three launches it replaces, and
    /// final_sampler_step against the final GEMM and sampler_step.
    /// The median time (us) of kernel row `name` / `imp` at `rows`, if it was measured.
    fn kernel_us(&self, name: &str, imp: &str, rows: usize) -> Option<f64> {
        self.kernels
            .iter()
            .find(|k| k.name == name && k.rows == rows && k.imp == imp)
            .and_then(|k| k.stats.as_ref())
            .map(|s| s.median_ms * 1e3)
    }

    fn fused_reuse_lines(&self) -> String {
        let us = |name: &str, rows: usize| self.kernel_us(name, "custom", rows);
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
            // The step's end: the final Linear in the update kernel against the final GEMM
            // (cuBLASLt, its bias fused) and sampler_step.
            if let (Some(f), Some(g), Some(u)) = (
                us("final_sampler_step", r),
                self.kernel_us("final", "cublaslt", r),
                us("sampler_step", r),
            ) {
                s += &format!(
                    "\nStep end at {r} rows: final_sampler_step {f:.1} us vs the final GEMM \
                     (cuBLASLt) + sampler_step {:.1} us ({:.2}x).\n",
                    g + u,
                    (g + u) / f
                );
            }
        }
        s
    }

    /// The block fusions (FORA_GEMM_LN's `proj+ln` / `fc2+ln`, FORA_QKV_ATTENTION's
    /// `qkv+attention`), each of their rows against the rows of this run of the launches the
    /// model runs instead: the GEMM's cuBLASLt product and the `residual_ln` pass the model
    /// picks ("custom"); the qkv GEMM at its best cuBLASLt with the bias, and the model's
    /// attention. Over 1: the fusion is faster.
    fn fused_block_lines(&self) -> String {
        let mut s = String::new();
        for k in &self.kernels {
            let Some((parts, what)) = self.unfused_us(&k.name, k.rows) else {
                continue;
            };
            let Some(fused) = k.stats.as_ref().map(|s| s.median_ms * 1e3) else {
                continue;
            };
            if s.is_empty() {
                s += "\nThe block fusions against the launches they replace, measured in this run \
                      (times in us; over 1: the fusion is faster):\n\n\
                      | fusion | rows | kernel | time | replaces | their time | ratio |\n\
                      |---|---|---|---|---|---|---|\n";
            }
            s += &format!(
                "| {} | {} | {} | {fused:.1} | {what} | {} | {} |\n",
                k.name,
                k.rows,
                k.imp,
                fmt_opt(parts, 1),
                fmt_opt(parts.map(|p| p / fused), 2)
            );
        }
        s
    }

    /// The launches the model runs instead of block fusion `fusion` (`proj+ln`, `fc2+ln`,
    /// `qkv+attention`) at `rows`: their time in this run (us; None if a part is unmeasured)
    /// and what they are. The GEMM's cuBLASLt product and the `residual_ln` pass the model
    /// picks ("custom"); the qkv GEMM at its best cuBLASLt with the bias and the model's
    /// attention. None for any other name.
    fn unfused_us(&self, fusion: &str, rows: usize) -> Option<(Option<f64>, String)> {
        match fusion {
            "proj+ln" | "fc2+ln" => {
                let gemm = fusion.trim_end_matches("+ln");
                let product = self.kernel_us(gemm, "cublaslt product", rows);
                let pass = self.kernel_us("residual_ln", "custom", rows);
                Some((
                    product.zip(pass).map(|(a, b)| a + b),
                    format!("{gemm} cuBLASLt product + residual_ln"),
                ))
            }
            "qkv+attention" => {
                let gemm = self.best_cublaslt_ms("qkv", rows).map(|ms| ms * 1e3);
                let attention = self.kernel_us("attention", "custom", rows);
                Some((
                    gemm.zip(attention).map(|(a, b)| a + b),
                    "qkv cuBLASLt + attention".to_string(),
                ))
            }
            _ => None,
        }
    }

    /// The fastest row (us, its implementation) of kernel `name` at `rows` whose
    /// implementation `keep` accepts, among rows with the weights rotated out of L2.
    fn fastest_us(
        &self,
        name: &str,
        rows: usize,
        keep: impl Fn(&str) -> bool,
    ) -> Option<(f64, &str)> {
        self.kernels
            .iter()
            .filter(|k| {
                k.name == name && k.rows == rows && !k.imp.contains("in L2") && keep(&k.imp)
            })
            .filter_map(|k| {
                k.stats
                    .as_ref()
                    .map(|s| (s.median_ms * 1e3, k.imp.as_str()))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }

    /// A transformer block at each row count from this run's kernel rows, each timed alone: the
    /// launches of the default path (qkv at its best cuBLASLt with the bias, the model's
    /// attention, proj's and fc2's cuBLASLt products each with a `residual_ln` pass, fc1 at its
    /// best cuBLASLt) against the fastest measured way through each of the block's four
    /// segments, fused or not (any qkv row plus any attention row, or `qkv+attention`; the
    /// product plus the pass, or `proj+ln` / `fc2+ln`; any fc1 row), times the model's depth. A
    /// projection, not a measurement: it ignores launch overlap (PDL) and what the rows share
    /// with each other in L2; it says which options to time in whole steps and how far they
    /// could take the step.
    fn block_budget_lines(&self) -> String {
        let mut rows: Vec<usize> = self.kernels.iter().map(|k| k.rows).collect();
        rows.sort_unstable();
        rows.dedup();
        let any = |_: &str| true;
        // qkv and fc1 with their bias (and GELU): not the product-only rows.
        let whole = |imp: &str| !imp.contains("product");
        let mut s = String::new();
        for r in rows {
            // The default path's launches of a fusion's segment (us, what they are).
            let unfused = |fusion: &str| {
                self.unfused_us(fusion, r)
                    .and_then(|(t, what)| t.map(|t| (t, what)))
            };
            let default = [
                unfused("qkv+attention").map(|(t, _)| t),
                unfused("proj+ln").map(|(t, _)| t),
                self.best_cublaslt_ms("fc1", r).map(|ms| ms * 1e3),
                unfused("fc2+ln").map(|(t, _)| t),
            ];
            let Some(default_parts) = default.iter().copied().collect::<Option<Vec<f64>>>() else {
                continue;
            };
            // The fastest way through each segment: (us, how).
            let unfused_qkv = self
                .fastest_us("qkv", r, whole)
                .zip(self.fastest_us("attention", r, any))
                .map(|((a, qi), (b, ai))| (a + b, format!("qkv {qi} + attention {ai}")));
            let fused_qkv = self
                .fastest_us("qkv+attention", r, any)
                .map(|(t, i)| (t, format!("qkv+attention {i}")));
            let fused_ln = |gemm: &str| {
                self.fastest_us(&format!("{gemm}+ln"), r, any)
                    .map(|(t, i)| (t, format!("{gemm}+ln {i}")))
            };
            let fc1 = self
                .fastest_us("fc1", r, whole)
                .map(|(t, i)| (t, format!("fc1 {i}")));
            let fastest = |a: Option<(f64, String)>, b: Option<(f64, String)>| match (a, b) {
                (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
                (a, b) => a.or(b),
            };
            let best = [
                fastest(unfused_qkv, fused_qkv),
                fastest(unfused("proj+ln"), fused_ln("proj")),
                fc1,
                fastest(unfused("fc2+ln"), fused_ln("fc2")),
            ];
            if s.is_empty() {
                s +=
                    "\nA block from the kernel rows, each alone (us): the default path's launches \
                      against the fastest measured way through each segment, fused or not. A \
                      projection (no launch overlap, no shared L2); whole steps measure it.\n\n\
                      | rows | segment | default | fastest | by |\n|---|---|---|---|---|\n";
            }
            let names = [
                "qkv + attention",
                "proj + LayerNorm",
                "fc1",
                "fc2 + LayerNorm",
            ];
            let mut best_total = 0.0;
            for ((name, d), b) in names.iter().zip(&default_parts).zip(&best) {
                // The default's own parts are among the candidates, so a segment has a best.
                let (t, how) = b.clone().unwrap_or((*d, "default".to_string()));
                best_total += t;
                s += &format!("| {r} | {name} | {d:.1} | {t:.1} | {how} |\n");
            }
            let default_total: f64 = default_parts.iter().sum();
            let depth = self.model.depth as f64;
            s += &format!(
                "| {r} | block (x {}) | {default_total:.1} ({:.3} ms) | {best_total:.1} ({:.3} ms) | {:.2}x |\n",
                self.model.depth,
                default_total * depth / 1e3,
                best_total * depth / 1e3,
                default_total / best_total
            );
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
             modulation tables precomputed {}; cuBLASLt algorithms {}; reuse steps {}; the final \
             Linear {}; per-step tables {}; proj / fc2 epilogues {}; qkv / fc1 bias {}; attention `{}` \
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
            if self.options.fused_reuse && self.options.reuse_sum > 1 {
                "fused; the cache summed once per run of reuse steps (fora_cache_sum, up to \
                 FORA_REUSE_SUM steps a pass, with the whole-step graph or no graphs), each \
                 step one fora_sum_final launch, then the final GEMM; a step alone in its run \
                 one fora_reuse_final launch"
            } else if self.options.fused_reuse && self.options.l2_persist {
                "fused, one fora_reuse_final launch, the cache persisting in L2 where most of it \
                 fits (FORA_L2_PERSIST=1)"
            } else if self.options.fused_reuse && !self.options.fused_final {
                "fused, one fora_reuse_final launch, then the final GEMM (FORA_FUSED_FINAL=0)"
            } else if self.options.fused_reuse {
                "fused, one fora_reuse_final launch"
            } else {
                "patch_embed + fora_reuse + layernorm_modulate (FORA_FUSED_REUSE=0)"
            },
            if self.options.final_sampler {
                "in the update kernel where the model allows it (final_sampler_step, \
                 FORA_FINAL_SAMPLER=1)"
            } else {
                "a GEMM, then sampler_step"
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
        if let Some(c) = &self.l2_ceiling {
            s += &format!(
                "| {} | {:.3} | {:.0} GB/s |\n",
                c.what, c.stats.median_ms, c.rate
            );
        }
        if let Some(best) = self.memory_ceiling() {
            s += &format!(
                "\nMemory-bound rows' % ceiling is of the best memory rate: {:.0} GB/s ({}).\n",
                best.rate, best.what
            );
        }
        if let Some(c) = &self.l2_ceiling {
            s += &format!(
                "\nL2 roofline of a GEMM tile whose A and W tiles come from L2 every k-step \
                 (BM x BN x 64: 2 BM BN 64 FLOP per (rows of A and W loaded) x 64 x 2 bytes) at \
                 {:.0} GB/s: {}.\n",
                c.rate,
                l2_tile_rooflines(c.rate)
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
            s += &self.fused_block_lines();
            s += &self.block_budget_lines();
            s += &self.tma_l2_lines();
            s += &self.tma_tile_lines();
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
            for r in self
                .steps
                .iter()
                .filter(|r| r.kind == StepKind::ReuseSummed)
            {
                if let Some(st) = &r.stats {
                    s +=
                        &format!(
                        "\n{} {} rows, reuse steps from cache sums (FORA_REUSE_SUM={}): {:.4} ms \
                         a step, the mean over a run of {} (its one pass over the cache \
                         included).\n",
                        r.gemm, r.rows, self.options.reuse_sum, st.median_ms, self.options.reuse_sum
                    );
                }
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

        s += &self.ops_markdown();

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

        if !self.tunings.is_empty() {
            s += "\n## Tuned options (`--tune`): the rows labelled `tuned` ran the chosen one\n\n";
            for (interval, t) in &self.tunings {
                s += &format!("FORA N = {interval}. ");
                s += &t.markdown();
                s += "\n";
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

pub(super) fn merge_stats(v: &mut Value, stats: Option<&Stats>) {
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

/// A tuning in the JSON report: the chosen candidate, its options as environment settings,
/// whether the search ran to its end, and every candidate's window time, forward distance and
/// outcome (`untried`: the time budget was spent before its turn).
fn tuning_json(interval: usize, t: &crate::cuda::tune::Tuning) -> Value {
    use crate::cuda::tune::TuneOutcome;
    let chosen = t.chosen();
    json!({
        "rows": t.rows,
        "interval": interval,
        "window_steps": t.window_steps,
        "window_computing": t.window_computing,
        "run_steps": t.run_steps,
        "chosen": chosen.name,
        "chosen_env": chosen.options.env_overrides().join(" "),
        "speedup": t.speedup(),
        "head_to_head_ms": t.head_to_head.map(|(given, chosen)| json!({"given": given, "chosen": chosen})),
        // False where --tune-budget-s cut the search short (rows with outcome "untried").
        "complete": t.complete(),
        "candidates": t.rows_tried.iter().enumerate().map(|(i, r)| {
            let (outcome, detail) = match &r.outcome {
                TuneOutcome::Chosen => ("chosen", String::new()),
                TuneOutcome::Slower => ("slower", String::new()),
                TuneOutcome::SameAs(n) => ("same", n.clone()),
                TuneOutcome::Rejected(w) => ("rejected", w.clone()),
                TuneOutcome::Unconfirmed(w) => ("unconfirmed", w.clone()),
                TuneOutcome::Failed(e) => ("failed", e.clone()),
                TuneOutcome::Untried(w) => ("untried", w.clone()),
            };
            json!({
                "name": r.name,
                "settings": r.settings,
                "combination": i >= t.candidates,
                "window_median_ms": r.window.as_ref().map(|w| w.median_ms),
                "window_min_ms": r.window.as_ref().map(|w| w.min_ms),
                "rel_l2": r.rel_l2,
                "steps_rel_l2": r.steps_rel_l2,
                "outcome": outcome,
                "detail": detail,
            })
        }).collect::<Vec<_>>(),
    })
}
