//! CPU tests of the benchmark harness (`fora::bench`): argument parsing and defaults, timing
//! statistics, the Markdown and JSON reports (unmeasured values are "—" / null, ratios come
//! out right), the weights export, and the Python side: `tools/bench_report.py` reads the JSON
//! the Rust report writes, and `tools/bench_torch.py` times the same diffusion process
//! (timesteps and DDPM coefficients) as the Rust sampler.

use fora::backend::StepUpdate;
use fora::bench::{
    args_from_bench_argv, fmt_opt, gbps, launches_per_graph, op_flops, rotation_copies,
    rows_request, tflops, utc_date, BenchError, Bound, Ceiling, DeviceInfo, E2eRow, GemmChoice,
    KernelRow, LaunchCount, ModelInfo, OpRow, OpStep, Report, Section, Stats, StepKind, StepRow,
};
use fora::config::DitConfig;
use fora::cuda::gemm::GemmImpl;
use fora::cuda::tune::{TuneOutcome, TuneRow, Tuning};
use fora::cuda::CudaOptions;
use fora::diffusion::{Diffusion, SamplerKind};
use fora::weights::DitWeights;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn parse(args: &[&str]) -> (fora::bench::BenchArgs, bool) {
    let mut argv = vec!["dit"];
    argv.extend_from_slice(args);
    args_from_bench_argv(argv).unwrap_or_else(|e| panic!("{args:?} should parse: {e}"))
}

fn plan_err(args: &[&str]) -> String {
    let (a, _) = parse(args);
    match a.plan() {
        Ok(p) => panic!("{args:?} should be rejected, got {p:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn default_and_quick_plans() {
    let (a, bench) = parse(&["--bench"]);
    assert!(bench);
    let p = a.plan().unwrap();
    assert_eq!(p.batches, vec![2, 16, 64, 256]);
    assert_eq!(p.kernel_batches, vec![2, 256]);
    assert_eq!(p.intervals, vec![1, 2, 3, 4, 5]);
    assert_eq!((p.steps, p.e2e_reps, p.runs, p.warmup), (250, 3, 20, 3));
    assert_eq!(p.gemms, vec![GemmImpl::CublasLt, GemmImpl::Custom]);
    assert_eq!(p.ceiling_size, 8192);
    assert_eq!(p.copy_bytes, 1 << 30);
    assert_eq!(
        p.sections,
        vec![
            Section::Ceilings,
            Section::Kernels,
            Section::Steps,
            Section::Ops,
            Section::E2e
        ]
    );
    assert!(a.json.is_none());
    if std::env::var_os("FORA_BENCH_JSON").is_none() {
        assert_eq!(p.json, PathBuf::from("target/bench.json"));
    }
    assert!(a.model.is_none() && a.save_weights.is_none());
    assert!(!p.tune, "tuning is opt-in");

    let (q, _) = parse(&["--quick", "--bench"]);
    let p = q.plan().unwrap();
    assert!(p.quick);
    assert_eq!(p.batches, vec![2, 64]);
    assert_eq!(p.kernel_batches, vec![2]);
    assert_eq!(p.intervals, vec![1, 3]);
    assert_eq!(p.e2e_reps, 1);
    assert_eq!(p.gemms, vec![GemmImpl::CublasLt]);
    assert_eq!(p.ceiling_size, 4096);
}

/// `--tune` reaches the plan.
fn p_tune(a: &fora::bench::BenchArgs) -> bool {
    a.tune && a.plan().unwrap().tune
}

#[test]
fn explicit_values_override_the_defaults() {
    let (a, bench) = parse(&[
        "--quick",
        "--batches",
        "2,3,128",
        "--kernel-batches",
        "64",
        "--intervals",
        "1,6",
        "--steps",
        "50",
        "--e2e-reps",
        "2",
        "--runs",
        "31",
        "--warmup",
        "0",
        "--gemm",
        "cublaslt",
        "--sections",
        "steps,e2e",
        "--ceiling-size",
        "1024",
        "--copy-mib",
        "64",
        "--json",
        "out/b.json",
        "--cfg-scale",
        "-1.5",
        "--gpu",
        "1",
        "--profiler-api",
        "--tune",
    ]);
    assert!(!bench, "no --bench flag was given");
    assert!(p_tune(&a));
    let p = a.plan().unwrap();
    assert_eq!(p.batches, vec![2, 3, 128]);
    assert_eq!(p.kernel_batches, vec![64]);
    assert_eq!(p.intervals, vec![1, 6]);
    assert_eq!((p.steps, p.e2e_reps, p.runs, p.warmup), (50, 2, 31, 0));
    assert_eq!(p.gemms, vec![GemmImpl::CublasLt]);
    assert_eq!(p.sections, vec![Section::Steps, Section::E2e]);
    assert_eq!((p.ceiling_size, p.copy_bytes), (1024, 64 << 20));
    assert_eq!(p.cfg_scale, -1.5);
    assert_eq!((a.gpu, a.profiler_api), (1, true));
    assert_eq!(a.gemm, Some(GemmChoice::Cublaslt));
    assert_eq!(
        p.json,
        PathBuf::from("out/b.json"),
        "--json wins over FORA_BENCH_JSON"
    );
}

#[test]
fn bench_flag_anywhere() {
    // cargo bench appends --bench; the device runner puts it first.
    assert!(parse(&["--quick", "--bench"]).1);
    assert!(parse(&["--bench", "--quick", "--json", "x.json"]).1);
    assert!(!parse(&[]).1);
}

#[test]
fn bad_arguments_are_clear_errors() {
    for (args, needle) in [
        (&["--batches", "2,0"][..], "--batches"),
        (&["--kernel-batches", "0"][..], "--kernel-batches"),
        (&["--intervals", "0"][..], "--intervals"),
        (&["--steps", "0"][..], "--steps"),
        (&["--steps", "1001"][..], "--steps"),
        (&["--runs", "0"][..], "--runs"),
        (&["--e2e-reps", "0"][..], "--e2e-reps"),
        (&["--ceiling-size", "100"][..], "--ceiling-size"),
        (&["--ceiling-size", "1001"][..], "--ceiling-size"),
        // Past any use (session 30's review: 2^32 wrapped size^2 to 0).
        (&["--ceiling-size", "4294967296"][..], "--ceiling-size"),
        (&["--ceiling-size", "32776"][..], "--ceiling-size"),
        (&["--intervals", "1000000"][..], "--intervals"),
        (&["--batches", "2,100000"][..], "--batches"),
        (&["--runs", "1000000"][..], "--runs"),
        (&["--warmup", "1000000"][..], "--warmup"),
        (&["--e2e-reps", "1001"][..], "--e2e-reps"),
        (&["--copy-mib", "0"][..], "--copy-mib"),
        (&["--cfg-scale", "NaN"][..], "--cfg-scale"),
        (&["--input-size", "0"][..], "--input-size"),
        // The Markdown goes beside the JSON with .md: one file would hold both (session 33).
        (&["--json", "out.md"][..], "must end in .json"),
        (
            &["--json", "/etc/passwd/report.json"][..],
            "/etc/passwd is not a directory",
        ),
        (
            &["--json", "/etc/passwd/sub/report.json"][..],
            "/etc/passwd is not a directory",
        ),
        // A tuning no section would time.
        (
            &["--tune", "--sections", "kernels"][..],
            "steps, ops or e2e",
        ),
        (
            &["--tune", "--tune-budget-s", "1e-15"][..],
            "--tune-budget-s",
        ),
    ] {
        let e = plan_err(args);
        assert!(
            e.contains(needle),
            "{args:?}: error {e:?} should name {needle}"
        );
    }
    for args in [
        &["dit", "--sections", "everything"][..],
        &["dit", "--gemm", "cutlass"][..],
        &["dit", "--batches", "two"][..],
        &["dit", "--model", "m.safetensors", "--input-size", "32"][..],
        &["dit", "--frobnicate"][..],
    ] {
        assert!(
            args_from_bench_argv(args.iter().copied()).is_err(),
            "{args:?} should be refused by the parser"
        );
    }
}

#[test]
fn stats_of_samples() {
    let s = Stats::from_samples(&[3.0, 1.0, 2.0]).unwrap();
    assert_eq!(
        (s.runs, s.median_ms, s.min_ms, s.max_ms, s.mean_ms),
        (3, 2.0, 1.0, 3.0, 2.0)
    );
    let s = Stats::from_samples(&[4.0, 1.0, 2.0, 10.0]).unwrap();
    assert_eq!(s.median_ms, 3.0, "even count: mean of the middle two");
    assert_eq!(s.mean_ms, 4.25);
    assert!(Stats::from_samples(&[]).is_err());
    assert!(Stats::from_samples(&[1.0, f64::NAN]).is_err());
    assert!(Stats::from_samples(&[1.0, -0.5]).is_err());
    assert!(Stats::from_samples(&[f64::INFINITY]).is_err());
}

#[test]
fn rates_copies_rows_and_dates() {
    // 2 x 118.6 GMAC x 256 rows in 100 ms is 607 TFLOP/s.
    let t = tflops(2.0 * 118.6e9 * 256.0, 100.0);
    assert!((t - 607.232).abs() < 1e-9, "{t}");
    assert!((gbps(4.2e9, 1.0) - 4200.0).abs() < 1e-9);

    assert_eq!(rotation_copies(100 << 20, 256 << 20), 3);
    assert_eq!(rotation_copies(1 << 30, 256 << 20), 1);
    assert_eq!(rotation_copies(1 << 20, 256 << 20), 64, "capped");
    assert_eq!(rotation_copies(0, 256 << 20), 1);

    assert_eq!(launches_per_graph(1.5, 1), 1, "a long launch alone");
    assert_eq!(launches_per_graph(5.0, 2), 2, "one per rotated copy");
    assert_eq!(launches_per_graph(0.01, 1), 20, "about 0.2 ms per replay");
    assert_eq!(launches_per_graph(0.01, 30), 30);
    assert_eq!(launches_per_graph(0.001, 1), 64, "capped");
    assert_eq!(launches_per_graph(0.0, 3), 64);
    assert_eq!(launches_per_graph(f64::NAN, 1), 64);
    let s = Stats::from_samples(&[2.0, 4.0, 6.0]).unwrap().scaled(0.5);
    assert_eq!(
        (s.median_ms, s.min_ms, s.max_ms, s.mean_ms, s.runs),
        (2.0, 1.0, 3.0, 2.0, 3)
    );

    let (classes, g) = rows_request(2, 1000, 4.0);
    assert_eq!(classes, vec![0]);
    assert_eq!(g.map(|g| g.scale), Some(4.0));
    let (classes, g) = rows_request(3, 1000, 4.0);
    assert_eq!(classes, vec![0, 1, 2]);
    assert!(g.is_none(), "odd rows: no CFG");
    let (classes, _) = rows_request(256, 10, 4.0);
    assert_eq!(classes.len(), 128);
    assert!(
        classes.iter().all(|&c| c < 10),
        "classes wrap around num_classes"
    );

    for (secs, date) in [
        (43_200, "1970-01-01"),
        (951_825_600, "2000-02-29"),
        (946_641_600, "1999-12-31"),
        (1_709_208_000, "2024-02-29"),
        (1_795_694_400, "2026-11-26"),
        (4_107_585_600, "2100-03-01"),
    ] {
        assert_eq!(utc_date(secs), date, "{secs}");
    }
    assert_eq!(fmt_opt(None, 2), "—");
    assert_eq!(fmt_opt(Some(f64::NAN), 2), "—");
    assert_eq!(fmt_opt(Some(1.23456), 2), "1.23");
}

fn stats(ms: f64) -> Option<Stats> {
    Some(Stats::from_samples(&[ms]).unwrap())
}

fn kernel(
    name: &str,
    imp: &str,
    rows: usize,
    bound: Bound,
    work: f64,
    ms: Option<f64>,
) -> KernelRow {
    KernelRow {
        name: name.into(),
        imp: imp.into(),
        rows,
        shape: format!("shape of {name}"),
        bound,
        work,
        stats: ms.and_then(stats),
        launches_per_replay: 10,
    }
}

/// A report with measured and unmeasured values (fake numbers).
fn fake_report() -> Report {
    let cfg = DitConfig::official("DiT-XL/2", 32).unwrap();
    let launches = |k| {
        Some(LaunchCount {
            kernels: k,
            memcpys: 1,
            memsets: 0,
            other: 0,
        })
    };
    let step = |rows, kind, ms: Option<f64>, k| StepRow {
        gemm: "custom".into(),
        rows,
        kind,
        stats: ms.and_then(stats),
        launches: launches(k),
        graphs: Some(true),
        precomputed_modulation: Some(rows == 2),
        host_issue_ms: Some(0.01),
    };
    let e2e = |n, computed, loop_ms| E2eRow {
        gemm: "custom".into(),
        interval: n,
        steps: 250,
        rows: 2,
        computed,
        reused: 250 - computed,
        reps: 3,
        loop_ms,
        setup_ms: 20.0,
        wall_ms: loop_ms + 20.0,
        finite: true,
    };
    Report {
        date: "2026-11-26".into(),
        device: Some(DeviceInfo {
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            sm_count: 132,
            l2_bytes: 50 << 20,
            memory_bytes: 80 << 30,
        }),
        model: ModelInfo::new(&cfg, "random (seed 0)".into()),
        warmup: 3,
        runs: 20,
        quick: false,
        options: CudaOptions {
            gemm: GemmImpl::Custom,
            fused_reuse: false,
            fused_ln: false,
            bf16_residual: false,
            reuse_gates_only: false,
            step_graph: false,
            reuse_sum: 2,
            reuse_table_in_place: false,
            final_sampler: false,
            ..CudaOptions::default()
        },
        attention: "v1".into(),
        cfg_scale: 4.0,
        gemm_ceiling: Some(Ceiling {
            what: "bf16 GEMM 8192^3".into(),
            stats: Stats::from_samples(&[1.5]).unwrap(),
            rate: 700.0,
        }),
        // The best memory rate (what "% ceiling" divides by) is neither the first nor the
        // last measured.
        memory_ceilings: vec![
            Ceiling {
                what: "device copy 1024 MiB".into(),
                stats: Stats::from_samples(&[0.86]).unwrap(),
                rate: 2500.0,
            },
            Ceiling {
                what: "read kernel 1024 MiB".into(),
                stats: Stats::from_samples(&[0.36]).unwrap(),
                rate: 3000.0,
            },
            Ceiling {
                what: "copy kernel 1024 MiB".into(),
                stats: Stats::from_samples(&[0.74]).unwrap(),
                rate: 2900.0,
            },
        ],
        l2_ceiling: Some(Ceiling {
            what: "L2 read 8.0 MiB x 64".into(),
            stats: Stats::from_samples(&[0.067]).unwrap(),
            rate: 8000.0,
        }),
        steps: vec![
            step(2, StepKind::Full, Some(1.2), 207),
            step(2, StepKind::Reuse, Some(0.06), 12),
            step(256, StepKind::Full, Some(120.0), 207),
            step(256, StepKind::Reuse, None, 12),
            // FORA_REUSE_SUM=2: a reuse step's mean over a run of two.
            step(2, StepKind::ReuseSummed, Some(0.03), 0),
        ],
        e2e: vec![e2e(1, 250, 300.0), e2e(3, 84, 110.0)],
        kernels: vec![
            kernel("qkv", "custom", 2, Bound::Compute, 8.0e9, Some(0.020)),
            kernel("qkv", "cublaslt", 2, Bound::Compute, 8.0e9, Some(0.025)),
            kernel(
                "qkv",
                "cublaslt+epilogue",
                2,
                Bound::Compute,
                8.0e9,
                Some(0.030),
            ),
            kernel("fc1", "custom", 2, Bound::Compute, 1.0e10, None),
            kernel("fc1", "cublaslt", 2, Bound::Compute, 1.0e10, Some(0.030)),
            kernel(
                "attention",
                "custom",
                256,
                Bound::Compute,
                4.0 * 256.0 * 16.0 * 256.0 * 256.0 * 72.0,
                Some(0.5),
            ),
            kernel(
                "fora_reuse",
                "custom",
                2,
                Bound::Memory,
                70.0e6,
                Some(0.028),
            ),
            kernel("patch_embed", "custom", 2, Bound::Memory, 3e6, Some(0.004)),
            kernel("layernorm", "custom", 2, Bound::Memory, 4e6, Some(0.007)),
            kernel(
                "fora_reuse_final",
                "custom",
                2,
                Bound::Memory,
                68e6,
                Some(0.020),
            ),
            // The step's end: the final GEMM (cuBLASLt) and sampler_step against
            // final_sampler_step; at 256 rows only the latter, so no line.
            kernel("final", "cublaslt", 2, Bound::Compute, 3.8e7, Some(0.0044)),
            kernel("final", "custom", 2, Bound::Compute, 3.8e7, Some(0.0030)),
            kernel(
                "sampler_step",
                "custom",
                2,
                Bound::Memory,
                1e5,
                Some(0.0030),
            ),
            kernel(
                "final_sampler_step",
                "custom",
                2,
                Bound::Memory,
                1.3e6,
                Some(0.0025),
            ),
            kernel(
                "final_sampler_step",
                "custom",
                256,
                Bound::Memory,
                1.6e8,
                Some(0.040),
            ),
            // Not all three parts measured at 256 rows: no comparison line.
            kernel(
                "fora_reuse_final",
                "custom",
                256,
                Bound::Memory,
                9e9,
                Some(2.0),
            ),
            kernel(
                "qkv",
                "cublaslt+bf16 bias",
                2,
                Bound::Compute,
                8.0e9,
                Some(0.026),
            ),
            // The Hopper TMA GEMM: its automatic picks (plain and multicast) are compared with
            // cuBLASLt, a forced tile is not.
            kernel("qkv", "tma", 2, Bound::Compute, 8.0e9, Some(0.0125)),
            // Weights kept in L2: never the cuBLASLt a row is compared with.
            kernel(
                "qkv",
                "cublaslt+bf16 bias, W in L2",
                2,
                Bound::Compute,
                8.0e9,
                Some(0.001),
            ),
            kernel("qkv", "tma-128x192", 2, Bound::Compute, 8.0e9, Some(0.011)),
            kernel("qkv", "tma_mc", 2, Bound::Compute, 8.0e9, Some(0.02)),
            kernel(
                "qkv",
                "tma-mc-128x192",
                2,
                Bound::Compute,
                8.0e9,
                Some(0.011),
            ),
            // A forced tile on adaLN's two rows: not in the L2 roofline table (its tiles are
            // not full, so the tile's intensity is not the row's).
            kernel("adaLN", "tma-128x192", 2, Bound::Compute, 1.0e9, Some(0.05)),
        ],
        // A 2-row computing step op by op: 1.3 ms, of which the ops cover 1.2.
        ops: vec![OpStep {
            gemm: "custom".into(),
            rows: 2,
            kind: StepKind::Full,
            total: Stats::from_samples(&[1.3, 1.4, 1.2]).unwrap(),
            hold_ms: 3.0,
            ops: vec![
                op_row("qkv", 28, 0.3, op_flops(&cfg, 2, "qkv").map(|f| 28.0 * f)),
                op_row("residual_ln", 56, 0.2, None),
                op_row("fc2", 28, 0.7, op_flops(&cfg, 2, "fc2").map(|f| 28.0 * f)),
            ],
        }],
        tunings: vec![(3, fake_tuning())],
        errors: vec![BenchError {
            section: "steps".into(),
            what: "custom GEMM, 256 rows: reuse step".into(),
            error: "fake failure".into(),
        }],
    }
}

/// A 2-row tuning: the given options, a faster fusion (chosen), a path with the same options
/// as the given ones, a rejected one and a failed one (its error holding a table separator),
/// then a combination of two winners, slower, and one the time budget left untried.
fn fake_tuning() -> Tuning {
    let row = |name: &str, settings: &str, ms: Option<f64>, rel: Option<f64>, outcome| TuneRow {
        name: name.into(),
        settings: settings.into(),
        options: CudaOptions::default().with_settings(settings).unwrap(),
        rel_l2: rel,
        // The steps' distance is measured only where the forward passed and a window ran.
        steps_rel_l2: ms.and(rel.map(|r| r / 2.0)),
        window: ms.map(|ms| Stats::from_samples(&[ms, ms + 0.1, ms - 0.1]).unwrap()),
        outcome,
    };
    Tuning {
        rows: 2,
        window_steps: 12,
        window_computing: 4,
        run_steps: 250,
        rows_tried: vec![
            row("given", "", Some(6.0), Some(0.0), TuneOutcome::Slower),
            row(
                "gemm_ln",
                "FORA_GEMM_LN=1",
                Some(4.8),
                Some(3.1e-3),
                TuneOutcome::Chosen,
            ),
            row("again", "", None, None, TuneOutcome::SameAs("given".into())),
            row(
                "broken",
                "FORA_PDL=1",
                None,
                Some(0.9),
                TuneOutcome::Rejected("rel-L2 9.00e-1 > tolerance 2e-2".into()),
            ),
            row(
                "missing",
                "FORA_GEMM=tma",
                None,
                None,
                TuneOutcome::Failed("no kernel | for this card".into()),
            ),
            row(
                "gemm_ln+pdl",
                "FORA_GEMM_LN=1 FORA_PDL=1",
                Some(4.9),
                Some(3.2e-3),
                TuneOutcome::Slower,
            ),
            row(
                "gemm_ln+lt",
                "FORA_GEMM_LN=1 FORA_LT_AUTOTUNE=1",
                None,
                None,
                TuneOutcome::Untried("the tuning's time budget (90 s) was spent".into()),
            ),
        ],
        candidates: 5,
        chosen: 1,
        head_to_head: Some((6.1, 4.88)),
    }
}

fn op_row(op: &str, count: usize, ms: f64, flops: Option<f64>) -> OpRow {
    OpRow {
        op: op.into(),
        count,
        stats: Stats::from_samples(&[ms]).unwrap(),
        flops,
    }
}

/// [`fake_report`] with every step's time multiplied by `factor` (another execution path).
fn fake_report_steps_scaled(factor: f64) -> Report {
    let mut r = fake_report();
    for s in &mut r.steps {
        if let Some(st) = s.stats.as_mut() {
            *st = Stats::from_samples(&[st.median_ms * factor]).unwrap();
        }
    }
    r
}

#[test]
fn report_markdown_and_json() {
    let r = fake_report();
    let macs = r.model.macs_per_row as f64;
    let md = r.markdown();
    println!("{md}");
    let j = r.to_json();

    assert_eq!(j["schema"], "fora-bench/1");

    // --tune: every candidate with its window and the run it estimates (x 250 / 12), the
    // chosen one marked; a '|' in an error does not break the table.
    assert!(md.contains("## Tuned options (`--tune`)"), "{md}");
    assert!(
        md.contains(
            "| gemm_ln | `FORA_GEMM_LN=1` | 4.800 | 100.0 | 3.10e-3 | 1.55e-3 | **chosen** |"
        ),
        "{md}"
    );
    assert!(
        md.contains("| given | `(as given)` | 6.000 | 125.0 | 0.00e0 | 0.00e0 | slower |"),
        "{md}"
    );
    assert!(md.contains("| again | `(as given)` | — | — | — | — | same path as given |"));
    assert!(md.contains(
        "| missing | `FORA_GEMM=tma` | — | — | — | — | failed: no kernel / for this card |"
    ));
    let t = &j["tunings"][0];
    assert_eq!(
        (t["rows"].as_u64(), t["interval"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(t["chosen"], "gemm_ln");
    assert_eq!(t["chosen_env"], "FORA_GEMM_LN=1");
    // From the head-to-head timing: 6.1 / 4.88.
    assert!((t["speedup"].as_f64().unwrap() - 1.25).abs() < 1e-12);
    assert_eq!(t["head_to_head_ms"]["given"], 6.1);
    assert_eq!(t["candidates"][3]["outcome"], "rejected");
    assert_eq!(t["candidates"][3]["window_median_ms"], Value::Null);
    assert_eq!(t["candidates"][4]["detail"], "no kernel | for this card");
    assert_eq!(t["candidates"][4]["combination"], false);
    assert_eq!(t["candidates"][5]["name"], "gemm_ln+pdl");
    assert_eq!(t["candidates"][5]["combination"], true);
    assert!(md.contains("Rows named a+b"), "{md}");
    assert!(
        md.contains("| gemm_ln+pdl | `FORA_GEMM_LN=1 FORA_PDL=1` | 4.900 |"),
        "{md}"
    );
    // --tune-budget-s: the row the budget left untried, and the tuning marked incomplete.
    assert!(
        md.contains("| — | — | — | — | not tried: the tuning's time budget (90 s) was spent |"),
        "{md}"
    );
    assert!(
        md.contains("Cut short by the time budget: 1 row(s) not tried"),
        "{md}"
    );
    assert_eq!(t["complete"], false);
    assert_eq!(t["candidates"][6]["outcome"], "untried");
    assert_eq!(j["model"]["arch"], "DiT-XL/2");
    assert_eq!(j["device"]["compute_capability"], "9.0");
    assert_eq!(j["ceilings"]["gemm"]["tflops"], 700.0);

    // In-model op times: the step op by op against the steps section's (graph) step, the ops
    // by time; fc2's 28 ranges of 2 x 512 x 1152 x 4608 FLOPs in 0.7 ms are 217.4 TFLOP/s,
    // 31.1% of the 700 TFLOP/s ceiling.
    assert!(
        md.contains(
            "### custom GEMM, 2 rows, full step: 1.300 ms op by op (the steps section's step: \
             1.200 ms); between ops 0.100 ms"
        ),
        "{md}"
    );
    let fc2 = md.find("| fc2 | 0.700 | 53.8% | 28 | 25.0 | 217.4 | 31.1 |");
    let qkv = md.find("| qkv | 0.300 | 23.1% | 28 | 10.7 |");
    let ln = md.find("| residual_ln | 0.200 | 15.4% | 56 | 3.6 | — | — |");
    assert!(
        matches!((fc2, qkv, ln), (Some(a), Some(b), Some(c)) if a < b && b < c),
        "{md}"
    );
    let ops = j["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 4);
    assert_eq!(ops[0]["op"], "(step)");
    assert_eq!(ops[0]["median_ms"], 1.3);
    assert_eq!(ops[0]["ranges"], Value::Null);
    assert_eq!(
        (ops[1]["op"].as_str(), ops[1]["ranges"].as_u64()),
        (Some("qkv"), Some(28))
    );
    assert_eq!(ops[2]["tflops"], Value::Null);
    assert!((ops[3]["tflops"].as_f64().unwrap() - 217.43).abs() < 0.01);
    assert_eq!(ops[3]["kind"], "full");
    assert_eq!(j["ceilings"]["memory"].as_array().map(|a| a.len()), Some(3));
    assert_eq!(j["ceilings"]["memory_best"]["gbps"], 3000.0);
    assert_eq!(j["ceilings"]["memory_best"]["what"], "read kernel 1024 MiB");
    assert!(
        md.contains("| copy kernel 1024 MiB | 0.740 | 2900 GB/s |"),
        "{md}"
    );
    assert!(
        md.contains("best memory rate: 3000 GB/s (read kernel 1024 MiB)"),
        "{md}"
    );
    // The L2 read rate: its own row and the GEMM tile rooflines at it, not a memory ceiling.
    assert_eq!(j["ceilings"]["l2_read"]["gbps"], 8000.0);
    assert!(
        md.contains("| L2 read 8.0 MiB x 64 | 0.067 | 8000 GB/s |"),
        "{md}"
    );
    assert!(
        md.contains(
            "128x128 64 FLOP/B -> 512 TFLOP/s, 128x192 77 FLOP/B -> 614 TFLOP/s, 128x256 85 \
             FLOP/B -> 683 TFLOP/s, 256x128 85 FLOP/B -> 683 TFLOP/s, 128x128 W multicast to 2 85 FLOP/B -> 683 TFLOP/s, 128x192 \
             W multicast to 2 110 FLOP/B -> 878 TFLOP/s, 128x256 W multicast to 2 128 FLOP/B -> \
             1024 TFLOP/s, 128x128 W multicast to 4 102 FLOP/B -> 819 TFLOP/s, 128x192 W \
             multicast to 4 140 FLOP/B -> 1117 TFLOP/s, 128x128 W to 4, A to 2 171 FLOP/B -> 1365 \
             TFLOP/s, 128x192 W to 4, A to 2 219 FLOP/B -> 1755 TFLOP/s, 128x256 A multicast to \
             2 102 FLOP/B -> 819 TFLOP/s"
        ),
        "{md}"
    );
    // The forced TMA tiles against their L2 roofline at 8000 GB/s: 128 x 192 loads 320 rows a
    // k-step (76.8 FLOP/B -> 614 TFLOP/s), its multicast twin 224 (109.7 -> 878); both rows
    // do 8 GFLOP in 11 us (727.3 TFLOP/s).
    assert!(
        md.contains("| qkv | 2 | tma-128x192 | 727.3 | 614 | 118 |"),
        "{md}"
    );
    assert!(
        md.contains("| qkv | 2 | tma-mc-128x192 | 727.3 | 878 | 83 |"),
        "{md}"
    );
    assert!(
        !md.contains("| qkv | 2 | tma_mc | 727"),
        "a pick is not a tile: {md}"
    );
    assert!(
        !md.contains("| adaLN | 2 | tma-128x192 | 20.0 |"),
        "adaLN is not a block GEMM: {md}"
    );
    // The fastest forced tile of qkv at 2 rows (11 us; the first of a tie) against the picks
    // (12.5 and 20 us) and the best cuBLASLt (25 us): 2.27x. adaLN is not a block GEMM.
    assert!(
        md.contains("| qkv | 2 | tma-128x192 | 11.0 | 12.5 | 20.0 | 25.0 | 2.27 |"),
        "{md}"
    );
    assert!(!md.contains("| adaLN | 2 | tma-128x192 | 50.0 |"), "{md}");
    assert_eq!(fora::bench::tma_row_flop_per_byte("tma"), None);
    assert_eq!(fora::bench::tma_row_flop_per_byte("tma_mc"), None);
    assert_eq!(
        fora::bench::tma_row_flop_per_byte("tma-pp-128x128"),
        Some(64.0)
    );
    let mc_pp = fora::bench::tma_row_flop_per_byte("tma-mc-pp-128x128").unwrap();
    assert!((mc_pp - 128.0 * 128.0 / 192.0).abs() < 1e-9, "{mc_pp}");
    // Clusters of 4 x 1 load a quarter of W a CTA, of 4 x 2 also half of A: 128 x 128 x 64 x 2
    // FLOP on (128 + 32) and (64 + 48) rows of 128 bytes.
    let c4x1 = fora::bench::tma_row_flop_per_byte("tma-c4x1-128x128").unwrap();
    assert!((c4x1 - 128.0 * 128.0 / 160.0).abs() < 1e-9, "{c4x1}");
    let c4x2 = fora::bench::tma_row_flop_per_byte("tma-c4x2-128x192").unwrap();
    assert!((c4x2 - 128.0 * 192.0 / 112.0).abs() < 1e-9, "{c4x2}");
    assert_eq!(fora::bench::tma_row_flop_per_byte("tma-cAxB-128x128"), None);
    // 256 x 128: 256 x 128 x 64 x 2 FLOP on 256 + 128 rows.
    let tall = fora::bench::tma_row_flop_per_byte("tma-256x128").unwrap();
    assert!((tall - 256.0 * 128.0 / 384.0).abs() < 1e-9, "{tall}");
    assert_eq!(
        fora::bench::tma_row_flop_per_byte("tma-st-pp-128x128"),
        Some(64.0)
    );
    // Clusters along K: each CTA loads its own k-tiles of A and W, as a plain tile.
    assert_eq!(
        fora::bench::tma_row_flop_per_byte("tma-k3-128x128"),
        Some(64.0)
    );
    assert_eq!(fora::bench::tma_row_flop_per_byte("tma-kx-128x128"), None);
    assert_eq!(j["settings"]["reuse_sum"], 2);
    // No TMA tiles forced (FORA_TMA_TILES): the empty setting.
    assert_eq!(j["settings"]["tma_tiles"], "");
    assert_eq!(j["steps"][4]["kind"], "reuse_summed");
    assert!(
        md.contains(
            "custom 2 rows, reuse steps from cache sums (FORA_REUSE_SUM=2): 0.0300 ms a step, \
             the mean over a run of 2"
        ),
        "{md}"
    );
    assert_eq!(j["settings"]["attention"], "v1");
    assert!(md.contains("attention `v1` (FORA_ATTENTION)"), "{md}");

    // Full step at 256 rows: TFLOP/s from the model's MACs; % of the GEMM ceiling.
    let t256 = 2.0 * macs * 256.0 / 0.120 / 1e12;
    let s = &j["steps"][2];
    assert_eq!(
        (s["rows"].as_u64(), s["kind"].as_str()),
        (Some(256), Some("full"))
    );
    assert!((s["tflops"].as_f64().unwrap() - t256).abs() < 1e-9);
    assert!((s["pct_gemm_ceiling"].as_f64().unwrap() - 100.0 * t256 / 700.0).abs() < 1e-9);
    assert_eq!(s["kernels"], 207);
    assert_eq!(
        (s["graphs"].as_bool(), s["precomputed_modulation"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(j["settings"]["precompute_modulation"], true);
    assert_eq!(j["settings"]["fused_reuse"], false);
    assert_eq!(j["settings"]["final_sampler"], false);
    assert_eq!(j["settings"]["reuse_table_in_place"], false);
    assert!(
        md.contains(
            "Reuse forward at 2 rows: fora_reuse_final 20.0 us vs patch_embed + fora_reuse + \
             layernorm 39.0 us (1.95x)."
        ),
        "{md}"
    );
    assert!(!md.contains("Reuse forward at 256 rows"), "{md}");
    // The cuBLASLt final GEMM (not our custom one) + sampler_step.
    assert!(
        md.contains(
            "Step end at 2 rows: final_sampler_step 2.5 us vs the final GEMM (cuBLASLt) + \
             sampler_step 7.4 us (2.96x)."
        ),
        "{md}"
    );
    assert!(!md.contains("Step end at 256 rows"), "{md}");
    assert!(
        md.contains(&format!("| custom | 256 | 120.000 | {t256:.1} |")),
        "{md}"
    );
    // Reuse steps have no TFLOP/s; the failed one is null / "—".
    let reuse256 = &j["steps"][3];
    assert!(reuse256["median_ms"].is_null() && reuse256["tflops"].is_null());
    assert!(j["steps"][1]["tflops"].is_null());
    assert!(
        md.contains("| 0.0600 | 0.050 |"),
        "reuse/full at 2 rows: {md}"
    );
    assert!(
        md.contains(&format!(
            "| {:.1} | — | — | 207 | 12 | yes | no |",
            100.0 * t256 / 700.0
        )),
        "{md}"
    );

    // End to end: speedup over N=1 and the theoretical limit.
    let e3 = &j["e2e"][1];
    assert!((e3["speedup"].as_f64().unwrap() - 300.0 / 110.0).abs() < 1e-12);
    assert!((e3["theoretical_speedup"].as_f64().unwrap() - 250.0 / 84.0).abs() < 1e-12);
    assert!(
        md.contains("| custom | 3 | 250 | 84 | 110.0 | 20.0 | 2.73 | 2.98 | yes |"),
        "{md}"
    );

    // Kernels: custom vs the best cuBLASLt path; unmeasured rows are null and "—".
    let k = &j["kernels"];
    assert!((k[0]["vs_cublaslt"].as_f64().unwrap() - 1.25).abs() < 1e-12);
    assert!(
        k[1]["vs_cublaslt"].is_null(),
        "only custom rows carry the ratio"
    );
    assert!(
        k[3]["median_ms"].is_null() && k[3]["tflops"].is_null() && k[3]["vs_cublaslt"].is_null()
    );
    assert!((k[0]["tflops"].as_f64().unwrap() - 400.0).abs() < 1e-9);
    assert!((k[0]["pct_ceiling"].as_f64().unwrap() - 400.0 / 7.0).abs() < 1e-9);
    assert!(k[5]["vs_cublaslt"].is_null(), "attention is not a GEMM");
    // The TMA GEMM's pick against the best cuBLASLt of qkv (0.025 ms); forced tiles: no ratio.
    let tma = |imp: &str| {
        k.as_array()
            .unwrap()
            .iter()
            .find(|row| row["impl"] == imp)
            .unwrap_or_else(|| panic!("a {imp} row"))
    };
    assert!((tma("tma")["vs_cublaslt"].as_f64().unwrap() - 2.0).abs() < 1e-12);
    assert!(tma("tma-128x192")["vs_cublaslt"].is_null());
    assert!((tma("tma_mc")["vs_cublaslt"].as_f64().unwrap() - 1.25).abs() < 1e-12);
    assert!(tma("tma-mc-128x192")["vs_cublaslt"].is_null());
    assert!((k[6]["gbps"].as_f64().unwrap() - 2500.0).abs() < 1e-9);
    assert!(k[6]["tflops"].is_null());
    assert!((k[6]["pct_ceiling"].as_f64().unwrap() - 250.0 / 3.0).abs() < 1e-9);
    assert!(
        md.contains("| qkv | 2 | shape of qkv | custom | 20.0 | 400.0 TFLOP/s | 57.1 | 1.25 |"),
        "{md}"
    );
    assert!(
        md.contains("| fc1 | 2 | shape of fc1 | custom | — | — | — | — |"),
        "{md}"
    );
    assert!(
        md.contains(
            "| fora_reuse | 2 | shape of fora_reuse | custom | 28.0 | 2500 GB/s | 83.3 | — |"
        ),
        "{md}"
    );

    assert_eq!(j["errors"][0]["error"], "fake failure");
    assert!(md.contains("fake failure"));
    // Every number in the JSON is finite (serde_json would write null for NaN anyway).
    assert!(!serde_json::to_string(&j).unwrap().contains("NaN"));
}

/// The block fusions' table: each fused row against the rows of what the model runs instead
/// (the GEMM's cuBLASLt product + the model's residual_ln; qkv's best cuBLASLt with its bias +
/// the model's attention), "—" where a part was not measured, nothing without fused rows.
#[test]
fn fused_block_rows_against_their_parts() {
    let c = Bound::Compute;
    let mut r = fake_report();
    r.kernels = vec![
        kernel("proj", "cublaslt product", 2, c, 1e9, Some(0.005)),
        kernel("proj", "cublaslt", 2, c, 1e9, Some(0.006)),
        kernel("residual_ln", "custom", 2, Bound::Memory, 1e7, Some(0.0044)),
        kernel(
            "residual_ln",
            "custom (1 warp/row)",
            2,
            Bound::Memory,
            1e7,
            Some(0.0113),
        ),
        kernel("qkv", "cublaslt+bf16 bias", 2, c, 1e9, Some(0.0093)),
        kernel("qkv", "cublaslt+epilogue", 2, c, 1e9, Some(0.0110)),
        kernel("qkv", "cublaslt product", 2, c, 1e9, Some(0.0050)),
        kernel("attention", "custom", 2, c, 1e9, Some(0.0070)),
        kernel("attention", "custom (tma)", 2, c, 1e9, Some(0.0060)),
        kernel(
            "proj+ln",
            "custom (gemm_tma_ln_mc_64x72)",
            2,
            c,
            1e9,
            Some(0.0047),
        ),
        // fc2's parts were not measured.
        kernel(
            "fc2+ln",
            "custom (gemm_tma_ln_mc_64x72)",
            2,
            c,
            1e9,
            Some(0.0120),
        ),
        kernel(
            "qkv+attention",
            "custom (qkv_attention_mc_d72)",
            2,
            c,
            1e9,
            Some(0.0125),
        ),
        // Unmeasured: no line.
        kernel("proj+ln", "custom (gemm_tma_ln_64x72)", 2, c, 1e9, None),
    ];
    let md = r.markdown();
    // 5.0 + 4.4 = 9.4 us against 4.7: 2.00x.
    assert!(
        md.contains(
            "| proj+ln | 2 | custom (gemm_tma_ln_mc_64x72) | 4.7 | proj cuBLASLt product + \
             residual_ln | 9.4 | 2.00 |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| fc2+ln | 2 | custom (gemm_tma_ln_mc_64x72) | 12.0 | fc2 cuBLASLt product + \
             residual_ln | — | — |"
        ),
        "{md}"
    );
    // qkv's best cuBLASLt with its bias (9.3, not the product's 5.0) + the model's attention
    // (7.0, not tma's 6.0): 16.3 against 12.5, 1.30x.
    assert!(
        md.contains(
            "| qkv+attention | 2 | custom (qkv_attention_mc_d72) | 12.5 | qkv cuBLASLt + \
             attention | 16.3 | 1.30 |"
        ),
        "{md}"
    );
    assert!(
        !md.contains("| proj+ln | 2 | custom (gemm_tma_ln_64x72) |"),
        "{md}"
    );
    assert!(md.contains("The block fusions against the launches they replace"));
    // Without fused rows, no table.
    r.kernels.retain(|k| !k.name.contains('+'));
    assert!(!r.markdown().contains("The block fusions"));
}

#[test]
fn report_without_measurements() {
    let mut r = fake_report();
    r.device = None;
    r.gemm_ceiling = None;
    r.memory_ceilings.clear();
    r.steps.clear();
    r.e2e.clear();
    r.errors.clear();
    let j = r.to_json();
    assert!(j["device"].is_null());
    assert!(j["ceilings"]["gemm"].is_null() && j["ceilings"]["memory_best"].is_null());
    assert_eq!(j["ceilings"]["memory"].as_array().map(|a| a.len()), Some(0));
    assert!(
        j["kernels"][0]["pct_ceiling"].is_null(),
        "no ceiling, no percentage"
    );
    let md = r.markdown();
    assert!(md.contains("| GEMM ceiling | — | — |"), "{md}");
    assert!(md.contains("| memory ceiling | — | — |"), "{md}");
    assert!(!md.contains("## Per step"), "no empty sections");
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fora_bench_{name}_{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `python3 tools/bench_report.py --ours OURS --torch TORCH`, to add to and run.
fn bench_report_py(
    ours: impl AsRef<std::ffi::OsStr>,
    torch: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("tools/bench_report.py"))
        .arg("--ours")
        .arg(ours)
        .arg("--torch")
        .arg(torch);
    cmd
}

fn root() -> PathBuf {
    PathBuf::from(std::env::var("FORA_ROOT").unwrap_or_else(|_| ".".into()))
}

/// Runs `cmd` (a python3 tool or snippet) to success and returns its stdout; a failure shows
/// the command with its stdout and stderr.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn fake_torch_json(macs: u64) -> Value {
    // The plain structure's rows as bench_torch.py wrote them before it had variants (no
    // "variant" field: plain), the fast structure's with theirs.
    let step = |mode: &str, kind: &str, rows: usize, ms: f64| {
        json!({"mode": mode, "kind": kind, "rows": rows, "compile_s": null,
               "median_ms": ms, "min_ms": ms, "max_ms": ms, "mean_ms": ms, "runs": 20})
    };
    let fast = |mode: &str, kind: &str, rows: usize, ms: f64| {
        json!({"mode": mode, "variant": "fast", "kind": kind, "rows": rows, "compile_s": null,
               "sdpa": "cudnn", "median_ms": ms, "min_ms": ms, "max_ms": ms, "mean_ms": ms,
               "runs": 20})
    };
    json!({
        "schema": "fora-bench-torch/1",
        "tool": "tools/bench_torch.py",
        "date": "2026-11-26",
        "torch": "2.11.0",
        "cuda": "13.0",
        "device": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        "model": {"arch": "DiT-XL/2", "input_size": 32, "tokens": 256, "hidden": 1152,
                  "depth": 28, "heads": 16, "macs_per_row": macs,
                  "weights": "random (python, seed 0)", "dtype": "bfloat16"},
        "settings": {"warmup": 3, "runs": 20, "cfg_scale": 4.0, "budget_s": 150.0},
        "steps": [
            step("eager", "full", 2, 13.0), step("eager", "reuse", 2, 2.99),
            step("graph", "full", 2, 3.52), step("graph", "reuse", 2, 0.88),
            step("compile", "full", 2, 10.7),
            step("eager", "full", 256, 203.0), step("eager", "reuse", 256, 40.8),
            fast("eager", "full", 2, 11.0), fast("eager", "reuse", 2, 1.5),
            fast("graph", "full", 2, 3.3), fast("graph", "reuse", 2, 0.3),
            fast("compile_graph", "full", 2, 2.9), fast("compile_graph", "reuse", 2, 0.2),
            // Slower than the plain structure here: the plain row stays the one compared.
            fast("eager", "full", 256, 210.0),
        ],
        "sdpa": [{"batch": 256, "heads": 16, "tokens": 256, "head_dim": 72,
                  "flops": 1.0, "tflops": 122.0, "median_ms": 2.0, "min_ms": 2.0,
                  "max_ms": 2.0, "mean_ms": 2.0, "runs": 20, "backend": "flash"},
                 {"batch": 256, "heads": 16, "tokens": 256, "head_dim": 72,
                  "flops": 1.0, "tflops": 244.0, "median_ms": 1.0, "min_ms": 1.0,
                  "max_ms": 1.0, "mean_ms": 1.0, "runs": 20, "backend": "cudnn"}],
        "e2e": [
            {"mode": "eager", "interval": 1, "steps": 250, "rows": 2, "computed": 250,
             "reused": 0, "wall_ms": 3250.0, "finite": true},
            {"mode": "eager", "interval": 3, "steps": 250, "rows": 2, "computed": 84,
             "reused": 166, "wall_ms": 1560.0, "finite": true},
            {"mode": "eager", "variant": "fast", "interval": 1, "steps": 250, "rows": 2,
             "computed": 250, "reused": 0, "wall_ms": 3000.0, "setup_ms": 40.0,
             "finite": true},
            {"mode": "eager", "variant": "fast", "interval": 3, "steps": 250, "rows": 2,
             "computed": 84, "reused": 166, "wall_ms": 1300.0, "setup_ms": 40.0,
             "finite": true},
            {"mode": "compile_graph", "variant": "fast", "interval": 1, "steps": 250,
             "rows": 2, "computed": 250, "reused": 0, "wall_ms": 900.0, "setup_ms": 40.0,
             "finite": true},
            {"mode": "compile_graph", "variant": "fast", "interval": 3, "steps": 250,
             "rows": 2, "computed": 84, "reused": 166, "wall_ms": 400.0, "setup_ms": 40.0,
             "finite": true},
        ],
        "skipped": [{"what": "compile full rows 64", "why": "time budget"}],
        "errors": [],
        "elapsed_s": 140.0,
    })
}

/// Writes fake_report() as fora bench's JSON to `ours` and fake_torch_json() of its model to
/// `torch`: bench_report.py's inputs.
fn write_fake_inputs(ours: &Path, torch: &Path) -> Report {
    let report = fake_report();
    report.write_json(ours).unwrap();
    let torch_json = fake_torch_json(report.model.macs_per_row);
    std::fs::write(torch, serde_json::to_string_pretty(&torch_json).unwrap()).unwrap();
    report
}

/// bench_report.py's target rows pair like with like and never claim what was not measured:
/// the N = 3 speedup divides runs of one GEMM implementation (not another's N = 1 where the
/// first one's failed), a loop other than the issue's 250 steps has no status, the attention
/// target is the model's kernel (a faster alternative listed without a goal), a GEMM row that
/// failed leaves its worst case incomplete, and a value is shown with the digits that keep it
/// on its side of the goal.
#[test]
fn python_report_pairs_like_with_like() {
    if !python_has("json") {
        println!("SKIP python_report_pairs_like_with_like: no python3");
        return;
    }
    let dir = tmp_dir("report_pairs");
    let (ours_path, torch) = (dir.join("bench.json"), dir.join("bench_torch.json"));
    let report = write_fake_inputs(&ours_path, &torch);
    let base: Value = serde_json::from_str(&std::fs::read_to_string(&ours_path).unwrap()).unwrap();
    let markdown_of = |ours: &Value| {
        std::fs::write(&ours_path, serde_json::to_string_pretty(ours).unwrap()).unwrap();
        run_ok(&mut bench_report_py(&ours_path, &torch))
    };

    // Our N = 1 loop failed (no row); another GEMM's loops ran: no speedup from a mix.
    let mut j = base.clone();
    let e2e = j["e2e"].as_array_mut().unwrap();
    let mut tuned: Vec<Value> = e2e.clone();
    for r in &mut tuned {
        r["gemm"] = json!("tuned");
        r["loop_ms"] = json!(500.0);
    }
    e2e.retain(|r| r["interval"] != 1);
    e2e.extend(tuned);
    let md = markdown_of(&j);
    assert!(
        md.contains("| FORA N=3 realized speedup over N=1 | >= 2.85x | — | — |"),
        "{md}"
    );

    // A 50-step loop: its time and speedup, no status against the 250-step goals.
    let mut j = base.clone();
    for r in j["e2e"].as_array_mut().unwrap() {
        r["steps"] = json!(50);
        r["computed"] = json!(if r["interval"] == 1 { 50 } else { 17 });
    }
    let md = markdown_of(&j);
    assert!(
        md.contains("| 50-step DDPM, FORA N=3, one image: end to end | <= 100 ms | 110.0 ms | — |"),
        "{md}"
    );
    assert!(md.contains("(limit 2.94x) | — |"), "{md}");

    // A faster attention kernel than the model's: the target stays the model's.
    let mut j = base.clone();
    let kernels = j["kernels"].as_array_mut().unwrap();
    let model_att = kernels
        .iter()
        .find(|k| k["name"] == "attention" && k["impl"] == "custom" && k["rows"] == 256)
        .expect("fake_report has the model's attention at 256 rows")
        .clone();
    let mut faster = model_att.clone();
    faster["impl"] = json!("custom (tma)");
    faster["median_ms"] = json!(model_att["median_ms"].as_f64().unwrap() / 2.0);
    kernels.push(faster);
    let md = markdown_of(&j);
    assert!(
        md.contains("the model's kernel (custom): vs PyTorch SDPA | >= 1.5x | 2.00x | met |"),
        "{md}"
    );
    assert!(
        md.contains(
            "a faster kernel, not the model's (custom (tma)): vs PyTorch SDPA | — | 4.00x | — |"
        ),
        "{md}"
    );

    // A GEMM of ours that failed (fake_report's custom fc1): its worst case is incomplete,
    // never met.
    let md = markdown_of(&base);
    assert!(
        md.contains(
            "| each GEMM with its fused epilogue vs best cuBLASLt (worst case) | >= 1.0x | 1.25x \
             (qkv, rows 2); incomplete, failed: fc1 rows 2 | — |"
        ),
        "{md}"
    );

    // A PyTorch file of the FLOP count before session 33 (0.19% less): a note, not a warning.
    let old_count = (report.model.macs_per_row as f64 * 0.998) as u64;
    let old_torch = dir.join("bench_torch_old_count.json");
    std::fs::write(&old_torch, fake_torch_json(old_count).to_string()).unwrap();
    std::fs::write(&ours_path, base.to_string()).unwrap();
    let md = run_ok(&mut bench_report_py(&ours_path, &old_torch));
    assert!(
        md.contains("(one is from before session 33's count)") && !md.contains("WARNING"),
        "{md}"
    );

    // A loop whose samples were not finite fails its targets whatever its time.
    let mut j = base.clone();
    for r in j["e2e"].as_array_mut().unwrap() {
        if r["interval"] == 3 {
            r["finite"] = json!(false);
            r["loop_ms"] = json!(90.0);
        }
    }
    let md = markdown_of(&j);
    assert!(
        md.contains(
            "| 250-step DDPM, FORA N=3, one image: end to end | <= 100 ms | 90.0 ms (NON-FINITE \
             samples) | MISSED |"
        ),
        "{md}"
    );
    assert!(
        md.contains("(limit 2.98x) (NON-FINITE samples) | MISSED |"),
        "{md}"
    );

    // Without --gemm, the implementation fora bench timed first (its default), not custom.
    let mut j = base.clone();
    let steps = j["steps"].as_array_mut().unwrap();
    let mut lt: Vec<Value> = steps.clone();
    for r in &mut lt {
        r["gemm"] = json!("cublaslt");
    }
    lt.append(steps);
    *steps = lt;
    let md = markdown_of(&j);
    assert!(
        md.contains("- our steps: GEMM implementation `cublaslt`"),
        "{md}"
    );

    // 599.6 TFLOP/s against >= 600 shows as 599.6, not 600, beside MISSED.
    let mut j = base.clone();
    let flops = 2.0 * report.model.macs_per_row as f64 * 256.0;
    let ms = flops / 599.6e12 * 1e3;
    for r in j["steps"].as_array_mut().unwrap() {
        if r["rows"] == 256 && r["kind"] == "full" {
            r["median_ms"] = json!(ms);
        }
    }
    let md = markdown_of(&j);
    assert!(
        md.contains("| full step, rows 256: effective TFLOP/s | >= 600 | 599.6 | MISSED |"),
        "{md}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `tools/tma_tiles.py` turns a report's forced TMA tile rows into the FORA_TMA_TILES setting:
/// per block GEMM at the asked row count, its fastest measured forced tile, keyed by N x K.
#[test]
fn tma_tiles_tool_reads_the_fastest_forced_tiles() {
    if !python_has("json") {
        println!("SKIP tma_tiles_tool_reads_the_fastest_forced_tiles: no python3");
        return;
    }
    let shaped = |name: &str, imp: &str, rows: usize, shape: &str, ms: Option<f64>| KernelRow {
        shape: shape.into(),
        ..kernel(name, imp, rows, Bound::Compute, 1e9, ms)
    };
    let qkv = "M=512 N=3456 K=1152";
    let fc2 = "M=512 N=1152 K=4608";
    let mut report = fake_report();
    report.kernels = vec![
        shaped("qkv", "tma-128x128", 2, qkv, Some(0.010)),
        shaped("qkv", "tma-c4x2-128x128", 2, qkv, Some(0.008)),
        // Not forced tiles: cuBLASLt and the picks.
        shaped("qkv", "cublaslt", 2, qkv, Some(0.007)),
        shaped("qkv", "tma_mc", 2, qkv, Some(0.006)),
        shaped("qkv", "tma", 2, qkv, Some(0.006)),
        // Unmeasured: left out.
        shaped("fc2", "tma-c4x2-128x192", 2, fc2, None),
        shaped("fc2", "tma-mc-128x128", 2, fc2, Some(0.012)),
        shaped("fc2", "tma-c4x1-128x192", 2, fc2, Some(0.013)),
        shaped(
            "fc2",
            "tma-c4x2-128x128",
            256,
            "M=65536 N=1152 K=4608",
            Some(0.5),
        ),
        // Not a block GEMM.
        shaped("adaLN", "tma-128x128", 2, "M=2 N=6912 K=1152", Some(0.001)),
    ];
    let dir = tmp_dir("tma_tiles");
    let path = dir.join("bench.json");
    report.write_json(&path).unwrap();
    let tiles = |rows: &str| {
        run_ok(
            Command::new("python3")
                .arg(root().join("tools/tma_tiles.py"))
                .arg(&path)
                .args(["--rows", rows]),
        )
        .trim()
        .to_string()
    };
    assert_eq!(tiles("2"), "3456x1152=c4x2-128x128,1152x4608=mc-128x128");
    assert_eq!(tiles("256"), "1152x4608=c4x2-128x128");
    assert_eq!(tiles("16"), "");
    // What it prints is a setting the library takes.
    let parsed: fora::cuda::gemm::TmaOverrides = tiles("2").parse().unwrap();
    assert_eq!(
        parsed.get(3456, 1152).unwrap().tile,
        fora::cuda::gemm::TmaTile::C4x2N128
    );
    assert_eq!(
        parsed.get(1152, 4608).unwrap().tile,
        fora::cuda::gemm::TmaTile::Mc128
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn python_report_reads_the_rust_json() {
    if !python_has("json") {
        println!("SKIP python_report_reads_the_rust_json: no python3");
        return;
    }
    let dir = tmp_dir("report");
    let (ours, torch) = (
        dir.join("sub").join("bench.json"),
        dir.join("bench_torch.json"),
    );
    write_fake_inputs(&ours, &torch);
    let md_path = dir.join("report.md");
    let png = dir.join("latency.png");
    let out = bench_report_py(&ours, &torch)
        .arg("--md")
        .arg(&md_path)
        .arg("--plot")
        .arg(&png)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Its stderr is checked below (the plot's fallback): not run_ok.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench_report.py failed:\n{stdout}\n{stderr}"
    );
    let md = std::fs::read_to_string(&md_path).unwrap();
    println!("{md}");
    assert_eq!(md.trim(), stdout.trim());
    // The tuning: what the `tuned` rows ran.
    assert!(
        md.contains(
            "- `tuned` at 2 rows (FORA N = 3): `gemm_ln` (FORA_GEMM_LN=1), 1.250x the given \
             options' window"
        ),
        "{md}"
    );
    // A tuning cut short by its budget says so.
    assert!(
        md.contains("the given options' window (cut short by its time budget: 1 not tried)"),
        "{md}"
    );
    // Targets: measured ones with their status, unmeasured ones "—".
    assert!(
        md.contains("| full step, rows 2 (one image + CFG) | <= 1.0 ms | 1.200 ms | MISSED |"),
        "{md}"
    );
    // Against PyTorch's fastest of the modes named, either model structure: at 2 rows the
    // fast structure's compiled step in a CUDA graph (2.9 ms) beats both graph rows.
    assert!(
        md.contains(&format!(
            "| full step, rows 2: vs PyTorch CUDA graph | >= 3.5x | {:.2}x (compile_graph, fast) \
             | MISSED |",
            2.9 / 1.2
        )),
        "{md}"
    );
    // At 256 rows the fast structure's eager step (210 ms) is slower: the plain one's counts.
    assert!(
        md.contains(
            "| full step, rows 256: vs PyTorch eager | >= 2.0x | 1.69x (eager, plain) | MISSED |"
        ),
        "{md}"
    );
    assert!(
        md.contains(&format!(
            "| reuse step, rows 2: vs the fastest PyTorch | — | {:.2}x (compile_graph, fast) | — |",
            0.2 / 0.06
        )),
        "{md}"
    );
    assert!(
        md.contains("| full step, rows 256: vs torch.compile | >= 1.3x | — | — |"),
        "{md}"
    );
    assert!(
        md.contains("| reuse step, rows 256 | <= 2.5 ms | — | — |"),
        "{md}"
    );
    assert!(
        md.contains(
            "| reuse step, rows 2, mean over a run from cache sums (FORA_REUSE_SUM=2) | <= 0.05 \
             ms | 0.0300 ms | met |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| FORA N=3 realized speedup over N=1 | >= 2.85x | 2.73x (limit 2.98x) | MISSED |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "| 250-step DDPM, FORA N=3, one image: end to end | <= 100 ms | 110.0 ms | MISSED |"
        ),
        "{md}"
    );
    // Attention at 256 rows: the fastest SDPA backend's 1.0 ms (cuDNN; flash took 2.0) vs
    // ours 0.5 ms.
    assert!(
        md.contains(": vs PyTorch SDPA | >= 1.5x | 2.00x | met |"),
        "{md}"
    );
    assert!(md.contains("| cudnn | 2.00x |"), "{md}");
    // fc1's custom row failed: the worst case of the others, incomplete. Against the issue's
    // bar (cuBLASLt + our separate epilogue: qkv 0.030 ms against ours 0.020; final has no
    // such row, also incomplete) and the best cuBLASLt row (0.025).
    assert!(
        md.contains(
            "each GEMM with its fused epilogue vs cuBLASLt + separate epilogue pass (worst case) \
             | >= 1.0x | 1.50x (qkv, rows 2); incomplete, failed: fc1 rows 2; incomplete, no \
             cuBLASLt + separate epilogue pass row for: final rows 2 | — |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "each GEMM with its fused epilogue vs best cuBLASLt (worst case) | >= 1.0x | 1.25x \
             (qkv, rows 2); incomplete, failed: fc1 rows 2 | — |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "each GEMM on the warp-specialized TMA kernels (fused epilogue) vs best cuBLASLt \
             (worst case) | >= 1.0x | 2.00x (qkv, rows 2) | met |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "each GEMM on the cluster-multicast TMA kernels (fused epilogue) vs best cuBLASLt \
             (worst case) | >= 1.0x | 1.25x (qkv, rows 2) | met |"
        ),
        "{md}"
    );
    assert!(
        !md.contains("each GEMM on the wgmma kernels"),
        "no wgmma rows were measured: {md}"
    );
    // As the model runs qkv: bias fused by cuBLASLt 0.026 ms vs product + epilogue 0.030 ms.
    assert!(
        md.contains("separate epilogue pass (worst case) | >= 1.0x | 1.15x (qkv, rows 2) | met |"),
        "{md}"
    );
    // Per-step ratios: PyTorch time / ours, each mode's faster structure (the fast one
    // marked).
    assert!(
        md.contains(&format!(
            "| {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            11.0 / 1.2,
            3.3 / 1.2,
            10.7 / 1.2,
            2.9 / 1.2
        )),
        "{md}"
    );
    assert!(md.contains("| 11.000* ("), "{md}");
    assert!(md.contains("| 10.700 ("), "{md}");
    // End to end: PyTorch's realized speedup and ours vs eager at N=3, eager's faster
    // structure (fast: 1300 ms, its speedup against its own N=1 of 3000 ms); the compiled
    // step in a CUDA graph gets columns because it ran (compile alone did not).
    assert!(
        md.contains(
            "| compile_graph (ms) | compile_graph speedup | ours vs eager | ours vs graph | ours \
             vs compile_graph |"
        ),
        "{md}"
    );
    assert!(
        md.contains(&format!(
            "| 3 | 84 of 250 | 110.0 | 2.73x | 2.98x | 1300.0* | {:.2}x | — | — | 400.0* | {:.2}x \
             | {:.2}x | — | {:.2}x |",
            3000.0 / 1300.0,
            900.0 / 400.0,
            1300.0 / 110.0,
            400.0 / 110.0
        )),
        "{md}"
    );
    // The set-up the loops leave out: ours 20 ms (fake_report), the fast structure's 40.
    assert!(
        md.contains(
            "Set-up, not in the times above (the largest of the runs): ours 20.0 ms (workspace: \
             allocation, x_T, tables, graph capture); PyTorch's fast structure 40.0 ms"
        ),
        "{md}"
    );
    // And the loop PyTorch's fastest steps would make, both of one mode and structure:
    // 84 x 2.9 + 166 x 0.2 ms (the plain graph pair, 84 x 3.52 + 166 x 0.88, is slower).
    assert!(
        md.contains(&format!(
            "- N=3: PyTorch's fastest steps at 2 rows (compile_graph, fast), 84 x 2.900 ms + \
             166 x 0.200 ms = 276.8 ms (an estimate from step times); ours 110.0 ms, {:.2}x",
            276.8 / 110.0
        )),
        "{md}"
    );
    assert!(
        md.contains("PyTorch skipped: compile full rows 64 (time budget)"),
        "{md}"
    );
    assert!(
        md.contains("ours FAILED: steps / custom GEMM, 256 rows: reuse step: fake failure"),
        "{md}"
    );
    if python_has("matplotlib") {
        let bytes = std::fs::read(&png).expect("the plot was written");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    } else {
        println!("matplotlib missing: plot not checked");
        assert!(stderr.contains("matplotlib is not installed"), "{stderr}");
    }

    // Only one side measured: still a report, the other side's cells are "—".
    let md = run_ok(&mut bench_report_py(&ours, dir.join("missing.json")));
    assert!(md.contains("- PyTorch: not measured"), "{md}");
    assert!(
        md.contains("| full step, rows 2: vs PyTorch CUDA graph | >= 3.5x | — | — |"),
        "{md}"
    );
    if std::env::var_os("FORA_KEEP_BENCH_TMP").is_none() {
        std::fs::remove_dir_all(&dir).ok();
    } else {
        println!("kept {}", dir.display());
    }
}

#[test]
fn torch_reference_times_the_same_diffusion_process() {
    if !python_has("torch") {
        println!("SKIP torch_reference_times_the_same_diffusion_process: no python3 with torch");
        return;
    }
    // The Python side sizes its CUDA graphs of SDPA launches as the Rust harness does.
    let cases = [
        (1.5, 1usize),
        (5.0, 2),
        (0.01, 1),
        (0.01, 30),
        (0.001, 1),
        (0.0, 3),
        (0.07, 2),
    ];
    let code = format!(
        "import sys; sys.path.insert(0, 'tools'); import bench_torch; \
         print(' '.join(str(bench_torch.launches_per_graph(t, c)) for t, c in {cases:?}))"
    );
    let python: Vec<usize> = run_ok(
        Command::new("python3")
            .current_dir(root())
            .args(["-c", &code]),
    )
    .split_whitespace()
    .map(|v| v.parse().unwrap())
    .collect();
    let rust: Vec<usize> = cases
        .iter()
        .map(|&(t, c)| launches_per_graph(t, c))
        .collect();
    assert_eq!(python, rust);

    for steps in [250usize, 50, 7] {
        let code = format!(
            "import json, sys; sys.path.insert(0, 'tools'); import bench_torch; \
             print(json.dumps(bench_torch.ddpm_table({steps}, True)))"
        );
        let stdout = run_ok(
            Command::new("python3")
                .current_dir(root())
                .args(["-c", &code]),
        );
        let table: Value = serde_json::from_str(&stdout).unwrap();
        let table = table.as_array().unwrap();
        assert_eq!(table.len(), steps);
        let diffusion = Diffusion::new(&steps.to_string(), true).unwrap();
        for (k, row) in table.iter().enumerate() {
            let i = steps - 1 - k;
            assert_eq!(
                row[0].as_u64().unwrap() as usize,
                diffusion.timestep_map[i],
                "steps {steps}, k {k}: timestep"
            );
            let StepUpdate::Ddpm {
                sqrt_recip_abar,
                sqrt_recipm1_abar,
                post_coef1,
                post_coef2,
                max_log,
                min_log,
                add_noise,
            } = diffusion.step_update(i, SamplerKind::Ddpm).unwrap()
            else {
                panic!("DDPM update expected");
            };
            let want = [
                sqrt_recip_abar,
                sqrt_recipm1_abar,
                post_coef1,
                post_coef2,
                max_log,
                min_log,
                if add_noise { 1.0 } else { 0.0 },
            ];
            for (j, w) in want.iter().enumerate() {
                let got = row[1][j].as_f64().unwrap();
                assert!(
                    (got - w).abs() <= 1e-9 * w.abs().max(1.0),
                    "steps {steps}, k {k}, coefficient {j}: python {got}, rust {w}"
                );
            }
        }
    }
}

#[test]
fn torch_fast_variant_matches_the_plain_dit() {
    if !python_has("torch") {
        println!("SKIP torch_fast_variant_matches_the_plain_dit: no python3 with torch");
        return;
    }
    // bench_torch.py's "fast" variant (tools/dit_torch_fast.py) restructures the official DiT
    // (conditioning precomputed, outputs written into the cache, in-place reuse adds): the same
    // maths, checked here in float32 on the CPU over a FORA sequence of both step kinds, and a
    // computing step that keeps nothing (FORA N = 1), which the reuse after it must not see.
    let code = "import json, sys; sys.path.insert(0, 'tools'); import dit_torch_fast; \
                print(json.dumps(dit_torch_fast.compare_with_plain()))";
    let stdout = run_ok(
        Command::new("python3")
            .current_dir(root())
            .args(["-c", code]),
    );
    let steps: Vec<(String, f64, f64)> = serde_json::from_str(stdout.trim()).unwrap();
    for kind in ["compute", "reuse", "alone"] {
        assert!(
            steps.iter().any(|s| s.0 == kind),
            "no {kind} step in {steps:?}"
        );
    }
    for (k, (mode, fast_err, computing_err)) in steps.iter().enumerate() {
        assert!(
            *fast_err <= 1e-5,
            "step {k} ({mode}): fast and plain differ by {fast_err} of the output's scale"
        );
        if mode == "reuse" {
            // A reuse step that recomputed would match computing: the check above could not
            // tell the cache was read.
            assert!(
                *computing_err >= 1e-2,
                "step {k}: the reuse step matches a computing step ({computing_err})"
            );
        }
    }
}

#[test]
fn torch_bench_runs_every_variant_and_compiled_loop_on_the_cpu() {
    if !python_has("torch") {
        println!(
            "SKIP torch_bench_runs_every_variant_and_compiled_loop_on_the_cpu: no python3 with torch"
        );
        return;
    }
    // bench_torch.py's smoke test on a tiny random DiT: both model structures, eager and
    // compiled steps, and the end-to-end loops in eager and with the compiled steps.
    let dir = tmp_dir("torch_smoke");
    let json_path = dir.join("torch.json");
    run_ok(
        Command::new("python3")
            .current_dir(root())
            .args([
                "tools/bench_torch.py",
                "--device",
                "cpu",
                "--arch",
                "depth=2,hidden=64,heads=4,patch=2",
                "--input-size",
                "8",
                "--batches",
                "2",
                "--modes",
                "eager,compile,compile_graph",
                "--compile-batches",
                "2",
                "--steps",
                "5",
                "--intervals",
                "1,3",
                "--e2e-modes",
                "eager,compile,compile_graph",
                "--runs",
                "2",
                "--warmup",
                "1",
                "--sdpa",
                "2:4:16:16",
                "--budget-s",
                "600",
                "--json",
            ])
            .arg(&json_path),
    );
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(j["errors"], json!([]), "{j:#}");
    // Its FLOP count is fora's (both sides' TFLOP/s divide the same work).
    let cfg = DitConfig::official("depth=2,hidden=64,heads=4,patch=2", 8).unwrap();
    assert_eq!(j["model"]["macs_per_row"], json!(cfg.macs_per_row()));
    let steps = j["steps"].as_array().unwrap();
    for mode in ["eager", "compile"] {
        for variant in ["plain", "fast"] {
            for kind in ["full", "reuse"] {
                let found = steps.iter().any(|r| {
                    r["mode"] == mode
                        && r["variant"] == variant
                        && r["kind"] == kind
                        && r["rows"] == 2
                        && r["median_ms"].as_f64().is_some_and(|v| v > 0.0)
                });
                assert!(found, "no {mode} {variant} {kind} step: {j:#}");
            }
        }
    }
    // 5 steps: FORA N=3 computes at i = 4, 3 and 0.
    let e2e = j["e2e"].as_array().unwrap();
    for mode in ["eager", "compile"] {
        for variant in ["plain", "fast"] {
            for (n, computed) in [(1, 5), (3, 3)] {
                let row = e2e
                    .iter()
                    .find(|r| r["mode"] == mode && r["variant"] == variant && r["interval"] == n)
                    .unwrap_or_else(|| panic!("no e2e {mode} {variant} N={n}: {j:#}"));
                assert_eq!(row["computed"], computed, "{row}");
                assert_eq!(row["finite"], true, "{row}");
                // The fast structure's conditioning table is its set-up; the plain one has none.
                assert_eq!(row["setup_ms"].is_f64(), variant == "fast", "{row}");
            }
        }
    }
    // On the CPU the CUDA-graph modes are skipped, each said once.
    let skipped = j["skipped"].to_string();
    for what in ["compile_graph mode", "e2e compile_graph"] {
        assert!(skipped.contains(what), "{skipped}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn save_weights_needs_no_gpu() {
    let dir = tmp_dir("weights");
    let path = dir.join("tiny.safetensors");
    let (args, _) = parse(&[
        "--arch",
        "depth=2,hidden=64,heads=4,patch=2",
        "--input-size",
        "8",
        "--seed",
        "5",
        "--save-weights",
        path.to_str().unwrap(),
    ]);
    fora::bench::run(&args).unwrap();
    let (cfg, w) = DitWeights::load(&path, None).unwrap();
    assert_eq!(
        (cfg.depth, cfg.hidden, cfg.heads, cfg.patch, cfg.input_size),
        (2, 64, 4, 2, 8)
    );
    let want = DitWeights::random(&cfg, 5).unwrap();
    assert_eq!(
        w.blocks[1].fc2_w, want.blocks[1].fc2_w,
        "the seed's weights were saved"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_without_a_device_is_a_clear_error() {
    if fora::cuda::device::device_count().unwrap_or(0) > 0 {
        println!("SKIP bench_without_a_device_is_a_clear_error: a CUDA device is present");
        return;
    }
    let (args, _) = parse(&[
        "--arch",
        "depth=1,hidden=32,heads=2,patch=2",
        "--input-size",
        "4",
    ]);
    let e = format!("{:#}", fora::bench::run(&args).unwrap_err());
    assert!(e.contains("CUDA"), "{e}");
}

#[test]
fn ncu_summary_sums_kernel_time_per_step_kind_and_op() {
    if !python_has("csv") {
        println!("SKIP ncu_summary_sums_kernel_time_per_step_kind_and_op: no python3");
        return;
    }
    let dir = tmp_dir("ncu_summary");
    let header = "\"ID\",\"Process ID\",\"Process Name\",\"Host Name\",\
        \"thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLevel:NBHandle\",\"Kernel Name\",\
        \"Context\",\"Stream\",\"Section Name\",\"Metric Name\",\"Metric Unit\",\"Metric Value\"";
    let row = |id: usize, nvtx: &str, kernel: &str, ns: &str| {
        format!(
            "\"{id}\",\"1\",\"fora\",\"h\",\"<default domain>:{nvtx}:none:none:0:0\",\
             \"{kernel}\",\"1\",\"7\",\"Command line profiler metrics\",\
             \"gpu__time_duration.sum\",\"nsecond\",\"{ns}\""
        )
    };
    let csv = [
        "==PROF== Connected to process 1 (fora)".to_string(),
        "fora bench output that is not CSV".to_string(),
        header.to_string(),
        row(0, "rows 2 step 0 full:block 0:qkv", "nvjet_a", "1,000"),
        row(
            1,
            "rows 2 step 0 full:block 0:attention",
            "attention_d72",
            "3000",
        ),
        row(2, "rows 2 step 1 full:block 0:qkv", "nvjet_a", "2000"),
        row(
            3,
            "rows 2 step 1 full:final_layer",
            "layernorm_modulate",
            "500",
        ),
        row(4, "rows 2 step 0 reuse:fora_reuse", "fora_reuse", "700"),
        row(5, "rows 2 step 0 reuse:sampler_step", "sampler_step", "100"),
        // A fused op's name holds a '+'; a run of summed reuse steps has its own range.
        row(
            6,
            "rows 4 step 0 full:block 0:proj+ln",
            "gemm_tma_ln",
            "800",
        ),
        row(
            7,
            "rows 4 run 1 reuse_summed:fora_cache_sum",
            "fora_cache_sum_2",
            "400",
        ),
    ]
    .join("\n");
    let path = dir.join("profile.csv");
    std::fs::write(&path, csv).unwrap();
    let stdout = run_ok(
        Command::new("python3")
            .arg(root().join("tools/ncu_summary.py"))
            .arg(&path),
    );
    println!("{stdout}");
    // Two full steps: (1 + 3 + 2 + 0.5) us / 2 = 3.25 us per step; qkv 1.5 us per step.
    assert!(stdout.contains("### rows 2, full (2 step(s) profiled; kernel time per step 0.003 ms)"));
    assert!(
        stdout.contains("| qkv | 1.5 | 46.2% | 1.0 | `nvjet_a` 1.5 |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| attention | 1.5 | 46.2% | 0.5 |"),
        "{stdout}"
    );
    assert!(stdout.contains("| final_layer | 0.2 |") || stdout.contains("| final_layer | 0.3 |"));
    assert!(stdout.contains("### rows 2, reuse (1 step(s) profiled"));
    assert!(
        stdout.contains("| fora_reuse | 0.7 | 87.5% | 1.0 |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("### rows 4, full") && stdout.contains("| proj+ln | 0.8 | 100.0% |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("### rows 4, reuse_summed")
            && stdout.contains("| fora_cache_sum | 0.4 | 100.0% |"),
        "{stdout}"
    );

    // Not an ncu CSV: a clear error, non-zero exit.
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, "no csv here\n").unwrap();
    let out = Command::new("python3")
        .arg(root().join("tools/ncu_summary.py"))
        .arg(&bad)
        .output()
        .expect("run python3");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ncu CSV header"));
}

/// tools/variants_report.py: one row per path's `fora bench` JSON, the default first, ratios
/// against it, and a broken file listed rather than fatal.
#[test]
fn python_variants_report_compares_paths() {
    if !python_has("json") {
        println!("SKIP python_variants_report_compares_paths: no python3");
        return;
    }
    let dir = tmp_dir("variants");
    let default = fake_report();
    default
        .write_json(&dir.join("variant_default.json"))
        .unwrap();
    fake_report_steps_scaled(0.5)
        .write_json(&dir.join("variant_lt_splitk.json"))
        .unwrap();
    // A path twice as slow in every step, its run without errors.
    let mut slower = fake_report_steps_scaled(2.0);
    slower.errors.clear();
    slower.write_json(&dir.join("variant_pdl.json")).unwrap();
    std::fs::write(dir.join("variant_broken.json"), "{").unwrap();
    let md_path = dir.join("variants.md");
    let stdout = run_ok(
        Command::new("python3")
            .arg(root().join("tools/variants_report.py"))
            .arg(&dir)
            .arg("--md")
            .arg(&md_path),
    );
    assert_eq!(std::fs::read_to_string(&md_path).unwrap(), stdout);
    // Full step at 2 rows: 1.2 ms, and half of it on the faster path (2.00x the default).
    assert!(stdout.contains("| `default` | 1.200 | — |"), "{stdout}");
    assert!(
        stdout.contains("| `lt_splitk` | 0.600 | 2.00x |"),
        "{stdout}"
    );
    // One image end to end: 300 ms at N = 1, 110 ms at N = 3.
    assert!(
        stdout.contains("| 300.0 | 110.0 | 2.73x (limit 2.98x) |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Unreadable: variant_broken.json"),
        "{stdout}"
    );
    // The verdicts: the faster path's run had an error (as the default's fake one does), the
    // slower path is slower everywhere it was measured.
    assert!(
        stdout.contains("- `lt_splitk`: faster in full 2 rows (2.00x)")
            && stdout.contains("check them before adopting it"),
        "{stdout}"
    );
    assert!(
        stdout.contains("- `pdl`: faster in nothing; slower in full 2 rows (0.50x)")
            && stdout.contains(": keep the default"),
        "{stdout}"
    );
    assert!(
        stdout.contains("- `default`: steps / custom GEMM, 256 rows: reuse step: fake failure"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// tools/variants_report.py with VARIANT_ROUNDS: each round's path against its own round's
/// default, and a change counted only where it holds in every round.
#[test]
fn python_variants_report_needs_every_round() {
    if !python_has("json") {
        println!("SKIP python_variants_report_needs_every_round: no python3");
        return;
    }
    let dir = tmp_dir("variant_rounds");
    let scaled = |factor: f64| {
        let mut r = fake_report_steps_scaled(factor);
        r.errors.clear();
        r
    };
    // Round 2's process runs 10% slower throughout (drift), its default included.
    for (name, factor) in [
        ("default", 1.0),
        ("default_r2", 1.1),
        // 5% faster than its round's default in both rounds.
        ("pdl", 1.0 / 1.05),
        ("pdl_r2", 1.1 / 1.05),
        // 5% faster in round 1 only: the same time as round 2's default there.
        ("side_stream", 1.0 / 1.05),
        ("side_stream_r2", 1.1),
    ] {
        scaled(factor)
            .write_json(&dir.join(format!("variant_{name}.json")))
            .unwrap();
    }
    let stdout = run_ok(
        Command::new("python3")
            .arg(root().join("tools/variants_report.py"))
            .arg(&dir),
    );
    // The round-2 rows compare with default_r2: 1.05x, not 1.05 / 1.1.
    assert!(stdout.contains("| `pdl_r2` | 1.257 | 1.05x |"), "{stdout}");
    assert!(stdout.contains("| `default_r2` | 1.320 | — |"), "{stdout}");
    assert!(
        stdout.contains("in every round, each against its own round's default"),
        "{stdout}"
    );
    assert!(
        stdout.contains("- `pdl` (2 rounds): faster in full 2 rows (1.05x)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("- `side_stream` (2 rounds): faster in nothing; slower in nothing"),
        "{stdout}"
    );
    // No verdict of its own for a later round.
    assert!(!stdout.contains("- `pdl_r2`:"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn clock_summary_reports_each_phase() {
    if !python_has("statistics") {
        println!("SKIP clock_summary_reports_each_phase: no python3");
        return;
    }
    let dir = tmp_dir("clocks");
    // Local-time timestamps, as nvidia-smi writes them; the phases' Unix times from python.
    let epoch = |s: &str| {
        let out = run_ok(Command::new("python3").args([
            "-c",
            &format!(
                "import datetime; print(datetime.datetime.strptime('{s}', \
                 '%Y/%m/%d %H:%M:%S.%f').timestamp())"
            ),
        ]));
        out.trim().parse::<f64>().unwrap()
    };
    let clocks = "\
2026/11/27 10:00:00.000, 1980, 3201, 300.5, 40
2026/11/27 10:00:01.000, 1980, 3201, 650.0, 55
2026/11/27 10:00:02.000, 1700, 3201, 699.9, 61
2026/11/27 10:00:03.000, 1750, 3201, 690.0, 63
[N/A], [N/A], [N/A], [N/A], [N/A]
2026/11/27 10:00:09.000, 1980, 3201, 120.0, 45
2026/11/27 10:00:10";
    let t0 = epoch("2026/11/27 10:00:00.500");
    let phases = format!(
        "tests {} {}\nbench {} {}\nidle {} {}\n",
        t0 - 1.0,
        t0 + 0.6,
        t0 + 0.6,
        t0 + 3.0,
        t0 + 20.0,
        t0 + 30.0
    );
    std::fs::write(dir.join("clocks.csv"), clocks).unwrap();
    std::fs::write(dir.join("phases.txt"), phases).unwrap();
    let out = run_ok(Command::new("python3").args([
        root().join("tools/clock_summary.py").to_str().unwrap(),
        dir.join("clocks.csv").to_str().unwrap(),
        dir.join("phases.txt").to_str().unwrap(),
    ]));
    println!("{out}");
    // tests: the samples at 10:00:00 and 10:00:01; bench: 10:00:02 and 10:00:03 (the cut and
    // unreadable lines skipped); idle: none.
    assert!(
        out.contains("| tests | 2 | 2 | 1980 | 1980 | 3201 | 650 | 55 |"),
        "{out}"
    );
    assert!(
        out.contains("| bench | 2 | 2 | 1725 | 1700 | 3201 | 700 | 63 |"),
        "{out}"
    );
    assert!(out.contains("| idle | 10 | 0 | — |"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The block budget: the default path's launches against the fastest measured way through each
/// segment (fused or not; product-only and "W in L2" rows never count), times DiT-XL/2's 28
/// blocks; no table where a default part is unmeasured.
#[test]
fn block_budget_from_the_kernel_rows() {
    let c = Bound::Compute;
    let mut r = fake_report();
    r.kernels = vec![
        kernel("qkv", "cublaslt+bf16 bias", 2, c, 1e9, Some(0.0093)),
        kernel("qkv", "cublaslt product", 2, c, 1e9, Some(0.0050)),
        kernel("qkv", "tma-128x112", 2, c, 1e9, Some(0.0080)),
        kernel("attention", "custom", 2, c, 1e9, Some(0.0070)),
        kernel("attention", "custom (tma)", 2, c, 1e9, Some(0.0060)),
        kernel(
            "qkv+attention",
            "custom (qkv_attention_mc_d72)",
            2,
            c,
            1e9,
            Some(0.0125),
        ),
        kernel("proj", "cublaslt product", 2, c, 1e9, Some(0.0050)),
        kernel("residual_ln", "custom", 2, Bound::Memory, 1e7, Some(0.0044)),
        kernel(
            "proj+ln",
            "custom (gemm_tma_ln_mc_64x72)",
            2,
            c,
            1e9,
            Some(0.0047),
        ),
        kernel("fc1", "cublaslt", 2, c, 1e9, Some(0.0118)),
        kernel("fc1", "tma-128x144", 2, c, 1e9, Some(0.0100)),
        kernel("fc1", "cublaslt, W in L2", 2, c, 1e9, Some(0.0090)),
        kernel("fc2", "cublaslt product", 2, c, 1e9, Some(0.0119)),
        kernel(
            "fc2+ln",
            "custom (gemm_tma_ln_mc_64x72)",
            2,
            c,
            1e9,
            Some(0.0120),
        ),
    ];
    let md = r.markdown();
    for line in [
        "| 2 | qkv + attention | 16.3 | 12.5 | qkv+attention custom (qkv_attention_mc_d72) |",
        "| 2 | proj + LayerNorm | 9.4 | 4.7 | proj+ln custom (gemm_tma_ln_mc_64x72) |",
        "| 2 | fc1 | 11.8 | 10.0 | fc1 tma-128x144 |",
        "| 2 | fc2 + LayerNorm | 16.3 | 12.0 | fc2+ln custom (gemm_tma_ln_mc_64x72) |",
        // 53.8 and 39.2 us a block, x 28.
        "| 2 | block (x 28) | 53.8 (1.506 ms) | 39.2 (1.098 ms) | 1.37x |",
    ] {
        assert!(md.contains(line), "{line}\n{md}");
    }
    // The unfused pair wins where it is faster: 8.0 + 3.0 against 12.5.
    for k in &mut r.kernels {
        if k.name == "attention" && k.imp == "custom (tma)" {
            k.stats = stats(0.0030);
        }
    }
    let md = r.markdown();
    let line = "| 2 | qkv + attention | 16.3 | 11.0 | qkv tma-128x112 + attention custom (tma) |";
    assert!(md.contains(line), "{line}\n{md}");
    // A default part unmeasured: no budget.
    r.kernels.retain(|k| k.name != "residual_ln");
    assert!(!r.markdown().contains("A block from the kernel rows"));
}

/// The report tools on malformed files (session 30's review found tracebacks): a one-line
/// error naming the file and a non-zero exit, never a Python traceback.
#[test]
fn report_tools_refuse_malformed_files_without_a_traceback() {
    if !python_has("json") {
        println!("SKIP report_tools_refuse_malformed_files_without_a_traceback: no python3");
        return;
    }
    let dir = tmp_dir("malformed_reports");
    let files = [
        ("fields.json", r#"{"schema":"fora-bench/1"}"#),
        ("types.json", r#"{"schema":"fora-bench/1","steps":"x"}"#),
        ("list.json", "[]"),
        ("garbage.json", "garbage"),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let mut runs = vec![bench_report_py(&path, dir.join("absent.json"))
            .output()
            .expect("run python3")];
        if name == "list.json" || name == "garbage.json" {
            // A report without kernel rows is a valid (empty) one to tma_tiles.py.
            runs.push(
                Command::new("python3")
                    .arg(root().join("tools/tma_tiles.py"))
                    .arg(&path)
                    .output()
                    .expect("run python3"),
            );
        }
        for out in runs {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{name}: accepted; {stderr}");
            assert!(
                !stderr.contains("Traceback") && stderr.contains(name),
                "{name}: {stderr}"
            );
        }
    }
    // Valid JSON with odd values (session 33's probe): nested past Python's recursion limit,
    // a loop of no computing steps (a division by zero), and a Markdown path that is a folder.
    let deep = dir.join("deep.json");
    let nested = "[".repeat(100_000) + &"]".repeat(100_000);
    std::fs::write(
        &deep,
        format!(r#"{{"schema":"fora-bench/1","steps":{nested}}}"#),
    )
    .unwrap();
    let (ours, torch) = (dir.join("ours.json"), dir.join("torch.json"));
    write_fake_inputs(&ours, &torch);
    let mut j: Value = serde_json::from_str(&std::fs::read_to_string(&ours).unwrap()).unwrap();
    for r in j["e2e"].as_array_mut().unwrap() {
        r["computed"] = json!(0);
    }
    let no_computing = dir.join("no_computing.json");
    std::fs::write(&no_computing, j.to_string()).unwrap();
    for (what, args) in [
        ("deep.json", vec![deep.clone(), dir.join("absent.json")]),
        ("no_computing.json", vec![no_computing, torch.clone()]),
    ] {
        let out = bench_report_py(&args[0], &args[1])
            .output()
            .expect("run python3");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted; {stderr}");
        assert!(
            !stderr.contains("Traceback") && stderr.contains(what),
            "{what}: {stderr}"
        );
    }
    let out = bench_report_py(&ours, &torch)
        .arg("--md")
        .arg(&dir)
        .output()
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--md a folder: accepted; {stderr}");
    assert!(
        !stderr.contains("Traceback") && stderr.contains("cannot write"),
        "{stderr}"
    );
    // variants_report.py: nothing readable is a failure that says why.
    std::fs::write(dir.join("variant_default.json"), "bad").unwrap();
    let out = Command::new("python3")
        .arg(root().join("tools/variants_report.py"))
        .arg(&dir)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("variant_default.json"), "{stdout}");
}
