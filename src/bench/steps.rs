//! The per-step rows (one sampler step as the sampler runs it) and the end-to-end runs.

use crate::backend::{Backend, NoiseSource, SamplePlan, StepMode, StepSpec};
use crate::cache::{policy_for_interval, CachePolicy, NoCache};
use crate::cuda::backend::CudaOptions;
use crate::cuda::{CudaBackend, CudaWorkspace, Gpu};
use crate::sampler::{Sampler, SamplerOptions};
use anyhow::{Context, Result};
use cudarc::driver::sys;

use super::timer::Timer;
use super::{rows_request, BenchPlan, E2eRow, LaunchCount, Report, Stats, StepKind, StepRow};

/// Tunes `backend`'s options ([`crate::cuda::tune::tune`]) on the run of a `rows`-row batch
/// (`plan`'s steps and guidance) at FORA interval `interval`, within `plan.tune_budget`
/// (`--tune-budget-s`) and under `plan.watchdog` (`--watchdog-s`), and leaves it
/// set to the choice.
pub(super) fn tune_rows(
    backend: &mut CudaBackend,
    plan: &BenchPlan,
    rows: usize,
    seed: u64,
    interval: usize,
    candidates: &[crate::cuda::tune::TuneCandidate],
) -> Result<crate::cuda::tune::Tuning> {
    let mut policy = policy_for_interval(interval)?;
    let (splan, schedule) = prepare_run(backend, plan, rows, seed, policy.as_mut())?;
    // A window of many rows is long (256 rows at N = 3: ~0.5 s on an H200) and steady: fewer
    // windows do.
    let many = rows * backend.config().tokens() >= 16384;
    let settings = crate::cuda::tune::TuneSettings {
        warmup: if many { 1 } else { plan.warmup.clamp(1, 3) },
        runs: if many { 3 } else { plan.runs.clamp(3, 10) },
        budget: plan.tune_budget,
        watchdog: Some(plan.watchdog),
        ..Default::default()
    };
    crate::cuda::tune::tune(backend, &splan, &schedule, candidates, &settings)
}

/// The sampling plan of a `rows`-row batch (`plan`'s DDPM steps and guidance, noise seed
/// `seed`) and its steps as `policy` schedules them ([`Sampler::schedule`]).
fn prepare_run(
    backend: &CudaBackend,
    plan: &BenchPlan,
    rows: usize,
    seed: u64,
    policy: &mut dyn CachePolicy,
) -> Result<(SamplePlan, Vec<StepSpec>)> {
    let cfg = backend.config();
    let (classes, guidance) = rows_request(rows, cfg.num_classes, plan.cfg_scale);
    let sampler = Sampler::new(
        backend,
        SamplerOptions::ddpm(plan.steps).with_guidance(guidance),
    )?;
    let splan = sampler.plan(&classes, NoiseSource::Seed(seed))?;
    Ok((splan, sampler.schedule(policy)))
}

/// [`prepare_run`] with every step computing (callers set the mode).
pub(super) fn prepare_steps(
    backend: &CudaBackend,
    plan: &BenchPlan,
    rows: usize,
    seed: u64,
) -> Result<(SamplePlan, Vec<StepSpec>)> {
    prepare_run(backend, plan, rows, seed, &mut NoCache)
}

/// Times a computing and a reuse step of `rows` rows (and a run of reuse steps from cache
/// sums) into `report.steps`, each row labelled `label` (the GEMM implementation's name, or
/// `tuned`).
pub(super) fn bench_steps(
    backend: &mut CudaBackend,
    plan: &BenchPlan,
    timer: &Timer,
    rows: usize,
    seed: u64,
    label: &str,
    report: &mut Report,
) {
    let gemm = label.to_string();
    let what = format!("{gemm} GEMM, {rows} rows");
    let (splan, specs) = match prepare_steps(backend, plan, rows, seed) {
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
    let mut summed = None;
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
            if ws.uses_reuse_sums() {
                // Runs of `run` reuse steps, each run's first step summing the cache for all.
                let run = backend.options().reuse_sum;
                let timed = timer.time_with_host(backend.gpu(), |i| {
                    let _run = crate::nvtx_range!("rows {rows} run {i} reuse_summed");
                    (0..run).try_for_each(|j| {
                        let spec = StepSpec {
                            reuse_ahead: run - 1 - j,
                            ..spec(i * run + j, StepMode::Reuse)
                        };
                        backend.step(&mut ws, &spec)
                    })
                });
                match timed {
                    Ok((st, h)) => {
                        let per_step = 1.0 / run as f64;
                        summed = Some((st.scaled(per_step), h * per_step));
                    }
                    Err(e) => report.error("steps", &format!("{what}: reuse run from sums"), &e),
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
    if let Some((stats, host_issue_ms)) = summed {
        report.steps.push(StepRow {
            gemm: gemm.clone(),
            rows,
            kind: StepKind::ReuseSummed,
            stats: Some(stats),
            launches: None,
            graphs: flags.0,
            precomputed_modulation: flags.1,
            host_issue_ms: Some(host_issue_ms),
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
    let mut ws = graphless_workspace(backend, plan)?;
    let gpu = backend.gpu();
    let c = capture_count(gpu, || backend.step(&mut ws, compute))
        .context("counting the launches of a compute step")?;
    let r = capture_count(gpu, || backend.step(&mut ws, reuse))
        .context("counting the launches of a reuse step")?;
    Ok((c, r))
}

/// A workspace of `plan` that launches its steps kernel by kernel (no CUDA graphs), whatever
/// the backend's options say (they are left as they were).
pub(super) fn graphless_workspace(
    backend: &mut CudaBackend,
    plan: &SamplePlan,
) -> Result<CudaWorkspace> {
    let options = backend.options();
    backend.set_options(CudaOptions {
        graphs: false,
        ..options
    });
    let ws = backend.workspace(plan);
    backend.set_options(options);
    ws
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

/// Whole sampling runs of one image with CFG per interval into `report.e2e`, each row
/// labelled `label` (as [`bench_steps`]).
pub(super) fn bench_e2e(
    backend: &CudaBackend,
    plan: &BenchPlan,
    seed: u64,
    label: &str,
    report: &mut Report,
) {
    let gemm = label.to_string();
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
