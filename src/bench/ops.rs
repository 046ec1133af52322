//! The `ops` section: where a step's time goes, op by op, inside the step itself.
//!
//! A computing and a reuse step are launched op by op (a workspace without CUDA graphs) behind
//! a stream hold (`hold_stream`, longer than the host takes to enqueue the step), so that they
//! run back to back as from a graph, and CUDA events bracket every op the model marks
//! ([`crate::op_range!`]: qkv, attention, proj, residual_ln, fc1, fc2, conditioning, ...). Unlike
//! the kernels section (each kernel alone, inputs rotated out of L2), the ops see the step's own
//! inputs and caches, and the times add up to the step: what they do not cover ("between ops")
//! is launch gaps and work outside any op. The events themselves cost a little between kernels
//! (two an op): the op-by-op total against the graph-replayed step says how much.

use crate::backend::{Backend, StepMode};
use crate::config::DitConfig;
use crate::cuda::op_timer::OpTimes;
use crate::cuda::CudaBackend;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::time::Instant;

use super::report::fmt_opt;
use super::steps::{graphless_workspace, prepare_steps};
use super::{tflops, BenchPlan, Bound, Report, Stats, StepKind};

/// One op's time in the step (every range of that name summed).
#[derive(Clone, Debug, PartialEq)]
pub struct OpRow {
    /// The op's range name ("qkv", "residual_ln", ...).
    pub op: String,
    /// Ranges of that name a step (28 for a block op of DiT-XL/2).
    pub count: usize,
    /// Their summed time a step, over the timed steps.
    pub stats: Stats,
    /// FLOPs a step of the op's matrix products, for the block GEMMs and attention.
    pub flops: Option<f64>,
}

/// One step kind's op times (the `ops` section).
#[derive(Clone, Debug, PartialEq)]
pub struct OpStep {
    /// The GEMM implementation ("cublaslt", ...).
    pub gemm: String,
    /// Model rows (images, twice with CFG).
    pub rows: usize,
    /// Computing or reuse step.
    pub kind: StepKind,
    /// The whole step, op by op behind the hold: from an event before its first launch to one
    /// after its last.
    pub total: Stats,
    /// The stream hold before each timed step, ms.
    pub hold_ms: f64,
    /// Its ops, in the order of their first launch.
    pub ops: Vec<OpRow>,
}

impl OpStep {
    /// The step's time that no op covers (launch gaps, work outside the ops): the total's
    /// median less the ops' medians.
    pub fn between_ops_ms(&self) -> f64 {
        self.total.median_ms - self.ops.iter().map(|o| o.stats.median_ms).sum::<f64>()
    }
}

/// FLOPs of one `op` range of a `rows`-row forward of `cfg`, for the ops that are matrix
/// products (the block GEMMs and attention); None for the rest.
pub fn op_flops(cfg: &DitConfig, rows: usize, op: &str) -> Option<f64> {
    let tokens = (rows * cfg.tokens()) as f64;
    let d = cfg.hidden as f64;
    let gemm = |n: f64, k: f64| 2.0 * tokens * n * k;
    match op {
        "qkv" => Some(gemm(3.0 * d, d)),
        "proj" => Some(gemm(d, d)),
        "fc1" => Some(gemm(cfg.mlp_hidden() as f64, d)),
        "fc2" => Some(gemm(d, cfg.mlp_hidden() as f64)),
        // FORA_GEMM_LN's launches: the GEMM's FLOPs (the LayerNorm's are not counted).
        "proj+ln" => Some(gemm(d, d)),
        "fc2+ln" => Some(gemm(d, cfg.mlp_hidden() as f64)),
        // QK^T and PV: 2 x 2 x T x T x head_dim a head.
        "attention" => Some(4.0 * tokens * cfg.tokens() as f64 * d),
        // FORA_QKV_ATTENTION's one launch.
        "qkv+attention" => Some(gemm(3.0 * d, d) + 4.0 * tokens * cfg.tokens() as f64 * d),
        _ => None,
    }
}

/// Per-op statistics over timed steps (FLOPs not filled in): each op's ranges summed a step,
/// the ops in the order of their first appearance, and the total's statistics. Every step must
/// have the same ops the same number of times (they ran the same forward).
pub fn aggregate_op_times(runs: &[OpTimes]) -> Result<(Vec<OpRow>, Stats)> {
    ensure!(!runs.is_empty(), "no timed steps");
    let per_step = |t: &OpTimes| {
        let mut ops: Vec<(String, usize, f64)> = Vec::new();
        for s in &t.spans {
            match ops.iter_mut().find(|(l, ..)| *l == s.label) {
                Some(o) => {
                    o.1 += 1;
                    o.2 += s.ms;
                }
                None => ops.push((s.label.clone(), 1, s.ms)),
            }
        }
        ops
    };
    let first = per_step(&runs[0]);
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(runs.len()); first.len()];
    for (i, run) in runs.iter().enumerate() {
        let ops = per_step(run);
        let same = ops.len() == first.len()
            && ops
                .iter()
                .zip(&first)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1);
        ensure!(
            same,
            "timed step {i} ran other ops than the first: {:?} against {:?}",
            ops.iter().map(|o| (&o.0, o.1)).collect::<Vec<_>>(),
            first.iter().map(|o| (&o.0, o.1)).collect::<Vec<_>>()
        );
        for (j, o) in ops.iter().enumerate() {
            samples[j].push(o.2);
        }
    }
    let ops = first
        .into_iter()
        .zip(&samples)
        .map(|((op, count, _), s)| {
            Ok(OpRow {
                op,
                count,
                stats: Stats::from_samples(s)?,
                flops: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let totals: Vec<f64> = runs.iter().map(|r| r.total_ms).collect();
    Ok((ops, Stats::from_samples(&totals)?))
}

/// Hold before each timed step: twice what the host took to enqueue one, plus a millisecond,
/// within 1 ms ..= 1 s.
pub fn hold_ms_for(host_enqueue_ms: f64) -> f64 {
    let want = 2.0 * host_enqueue_ms + 1.0;
    if want.is_finite() {
        want.clamp(1.0, 1000.0)
    } else {
        1000.0
    }
}

/// Times a computing and a reuse step of `rows` rows op by op (see the module comment) and adds
/// them to `report.ops`; a failure is recorded as an error and the rest goes on.
pub(super) fn bench_ops(
    backend: &mut CudaBackend,
    plan: &BenchPlan,
    rows: usize,
    seed: u64,
    label: &str,
    report: &mut Report,
) {
    let gemm = label.to_string();
    let what = format!("{gemm} GEMM, {rows} rows");
    let cfg = backend.config().clone();
    let (splan, specs) = match prepare_steps(backend, plan, rows, seed) {
        Ok(p) => p,
        Err(e) => {
            report.error("ops", &what, &e);
            return;
        }
    };
    // A workspace that launches op by op: events between launches, not graph nodes.
    let mut ws = match graphless_workspace(backend, &splan) {
        Ok(ws) => ws,
        Err(e) => {
            report.error("ops", &format!("{what}: workspace"), &e);
            return;
        }
    };
    let spec = |i: usize, mode: StepMode| crate::backend::StepSpec {
        mode,
        ..specs[i % specs.len()]
    };
    for (mode, kind) in [
        (StepMode::Compute, StepKind::Full),
        (StepMode::Reuse, StepKind::Reuse),
    ] {
        let timed = (|| -> Result<OpStep> {
            // Warm-up steps, timed op by op as the runs are: the last one's host enqueue time,
            // with the events' records and the pool they come from already made, sizes the hold
            // (a step enqueued without them took ~1-2 ms less at 2 rows, and a hold that ran
            // out before the step was issued would count host time as the GPU's).
            let mut host_ms = 0.0;
            for i in 0..plan.warmup.max(1) {
                let start = Instant::now();
                backend.gpu().start_op_times()?;
                let stepped = backend.step(&mut ws, &spec(i, mode));
                // Enqueued: the host's part ends here (finishing waits for the GPU).
                host_ms = start.elapsed().as_secs_f64() * 1e3;
                let times = backend.gpu().finish_op_times();
                stepped?;
                times.context("warm-up step failed")?;
            }
            let hold_ms = hold_ms_for(host_ms);
            let mut runs = Vec::with_capacity(plan.runs);
            for i in 0..plan.runs {
                let gpu = backend.gpu();
                crate::cuda::bandwidth::hold_stream(gpu, (hold_ms * 1e6) as i64)?;
                gpu.start_op_times()?;
                let stepped = backend.step(&mut ws, &spec(plan.warmup + i, mode));
                // Finish whatever happened, so the device handle stops timing.
                let times = backend.gpu().finish_op_times();
                stepped?;
                runs.push(times?);
            }
            let (mut ops, total) = aggregate_op_times(&runs)?;
            for o in &mut ops {
                o.flops = op_flops(&cfg, rows, &o.op).map(|f| f * o.count as f64);
            }
            Ok(OpStep {
                gemm: gemm.clone(),
                rows,
                kind,
                total,
                hold_ms,
                ops,
            })
        })();
        match timed {
            Ok(step) => report.ops.push(step),
            Err(e) => report.error("ops", &format!("{what}: {} step", kind.name()), &e),
        }
    }
}

impl Report {
    /// The `ops` section as JSON rows (one per op, and one "(step)" row per step kind).
    pub(super) fn ops_json(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for st in &self.ops {
            let mut row = |op: &str, count: Option<usize>, stats: &Stats, flops: Option<f64>| {
                let t = flops.map(|f| tflops(f, stats.median_ms));
                let mut v = json!({
                    "gemm": st.gemm,
                    "rows": st.rows,
                    "kind": st.kind.name(),
                    "op": op,
                    "ranges": count,
                    "share": stats.median_ms / st.total.median_ms,
                    "flops": flops,
                    "tflops": t,
                    "pct_gemm_ceiling": self.pct_of_ceiling(t, Bound::Compute),
                    "hold_ms": st.hold_ms,
                });
                super::report::merge_stats(&mut v, Some(stats));
                out.push(v);
            };
            row("(step)", None, &st.total, None);
            for o in &st.ops {
                row(&o.op, Some(o.count), &o.stats, o.flops);
            }
        }
        out
    }

    /// The `ops` section as Markdown: per step kind, its ops by time, with the step as the
    /// steps section timed it (from its graphs) beside the op-by-op total.
    pub(super) fn ops_markdown(&self) -> String {
        if self.ops.is_empty() {
            return String::new();
        }
        let mut s = String::from(
            "\n## In-model op times (a step launched op by op behind a stream hold, so it runs \
             back to back; CUDA events around each op; per step, the op's ranges summed)\n",
        );
        if self.options.pdl {
            // An event between two kernels is the second one's predecessor: it cannot start
            // early, so these times are those of serialized launches.
            s += "\nProgrammatic launches (FORA_PDL=1) are on, but an event between two kernels \
                  keeps the second from starting early: these are serialized launches' times, and \
                  what PDL saves shows only in the steps section's graph time.\n";
        }
        for st in &self.ops {
            let graph = self
                .steps
                .iter()
                .find(|r| r.gemm == st.gemm && r.rows == st.rows && r.kind == st.kind)
                .and_then(|r| r.stats.as_ref())
                .map(|g| g.median_ms);
            s += &format!(
                "\n### {} GEMM, {} rows, {} step: {:.3} ms op by op{}; between ops {:.3} ms\n\n",
                st.gemm,
                st.rows,
                st.kind.name(),
                st.total.median_ms,
                match graph {
                    Some(g) => format!(" (the steps section's step: {g:.3} ms)"),
                    None => String::new(),
                },
                st.between_ops_ms()
            );
            s += "| op | ms a step | share | ranges a step | us a range | TFLOP/s | % GEMM ceiling |\n\
                  |---|---|---|---|---|---|---|\n";
            let mut ops: Vec<&OpRow> = st.ops.iter().collect();
            ops.sort_by(|a, b| b.stats.median_ms.total_cmp(&a.stats.median_ms));
            for o in ops {
                let ms = o.stats.median_ms;
                let t = o.flops.map(|f| tflops(f, ms));
                s += &format!(
                    "| {} | {:.3} | {:.1}% | {} | {:.1} | {} | {} |\n",
                    o.op,
                    ms,
                    100.0 * ms / st.total.median_ms,
                    o.count,
                    1e3 * ms / o.count.max(1) as f64,
                    fmt_opt(t, 1),
                    fmt_opt(self.pct_of_ceiling(t, Bound::Compute), 1)
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::op_timer::OpSpan;

    fn span(label: &str, ms: f64) -> OpSpan {
        OpSpan {
            label: label.into(),
            start_ms: 0.0,
            ms,
        }
    }

    #[test]
    fn op_times_sum_per_step_and_take_medians() {
        let run = |a: f64, b: f64, total: f64| OpTimes {
            spans: vec![span("qkv", a), span("attention", 1.0), span("qkv", b)],
            total_ms: total,
        };
        let runs = [run(1.0, 2.0, 5.0), run(2.0, 2.0, 6.0), run(1.0, 1.0, 4.0)];
        let (ops, total) = aggregate_op_times(&runs).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].op.as_str(), ops[0].count), ("qkv", 2));
        assert_eq!(ops[0].stats.median_ms, 3.0);
        assert_eq!(ops[0].stats.min_ms, 2.0);
        assert_eq!((ops[1].op.as_str(), ops[1].count), ("attention", 1));
        assert_eq!(ops[1].stats.median_ms, 1.0);
        assert_eq!(total.median_ms, 5.0);
    }

    #[test]
    fn op_times_refuse_steps_that_ran_other_ops() {
        let a = OpTimes {
            spans: vec![span("qkv", 1.0)],
            total_ms: 1.0,
        };
        let b = OpTimes {
            spans: vec![span("qkv", 1.0), span("qkv", 1.0)],
            total_ms: 2.0,
        };
        let err = aggregate_op_times(&[a, b]).unwrap_err().to_string();
        assert!(err.contains("other ops"), "{err}");
        assert!(aggregate_op_times(&[]).is_err());
    }

    #[test]
    fn op_flops_are_the_block_products() {
        let cfg = DitConfig::official("DiT-XL/2", 32).unwrap();
        let rt = 2.0 * 256.0;
        assert_eq!(op_flops(&cfg, 2, "qkv"), Some(2.0 * rt * 3456.0 * 1152.0));
        assert_eq!(op_flops(&cfg, 2, "fc2"), Some(2.0 * rt * 1152.0 * 4608.0));
        // 16 heads of 72: 4 T^2 x 72 x 16 a row.
        assert_eq!(
            op_flops(&cfg, 2, "attention"),
            Some(4.0 * 2.0 * 256.0 * 256.0 * 72.0 * 16.0)
        );
        assert_eq!(op_flops(&cfg, 2, "residual_ln"), None);
        // FORA_GEMM_LN's launches: their GEMMs'.
        assert_eq!(op_flops(&cfg, 2, "proj+ln"), op_flops(&cfg, 2, "proj"));
        assert_eq!(op_flops(&cfg, 2, "fc2+ln"), op_flops(&cfg, 2, "fc2"));
        // FORA_QKV_ATTENTION's launch: both.
        assert_eq!(
            op_flops(&cfg, 2, "qkv+attention"),
            Some(op_flops(&cfg, 2, "qkv").unwrap() + op_flops(&cfg, 2, "attention").unwrap())
        );
        // The four GEMMs and attention are the blocks' MACs of a row (the rest is small).
        let per_row: f64 = ["qkv", "proj", "fc1", "fc2", "attention"]
            .iter()
            .map(|op| op_flops(&cfg, 1, op).unwrap())
            .sum::<f64>()
            * cfg.depth as f64;
        let model = 2.0 * cfg.macs_per_row() as f64;
        assert!(
            per_row < model && per_row > 0.98 * model,
            "{per_row} vs {model}"
        );
    }

    #[test]
    fn hold_covers_the_host_and_stays_bounded() {
        assert_eq!(hold_ms_for(0.0), 1.0);
        assert_eq!(hold_ms_for(2.0), 5.0);
        assert_eq!(hold_ms_for(1e6), 1000.0);
        assert_eq!(hold_ms_for(f64::NAN), 1000.0);
    }
}
