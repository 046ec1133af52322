//! GEMM benchmark at DiT-XL/2 shapes: the custom kernel (automatic tile and split-K pick, no
//! split, and each tile variant) against cuBLASLt (fused bias/GELU where it has them) and cuBLASLt + the stand-alone
//! epilogue kernel; on a Hopper GPU also the wgmma kernels of kernels/gemm_sm90.cu (automatic
//! tile and split-K pick, no split, each tile variant). CUDA events around each launch, 3
//! warm-up launches, median of 20.
//!
//! `cargo bench --bench gemm` (prints a Markdown table; SKIP without a CUDA device).
//! `FORA_BENCH_ROWS=512,16384` restricts the token-row counts (default 512, 16384, 65536).

use anyhow::{Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use fora::cuda::device::device_count;
use fora::cuda::gemm::{Epilogue, Gemm, GemmImpl, Tile, TmaTile, WgmmaTile};
use fora::cuda::params::GemmParams;
use fora::cuda::{dptr, Gpu};
use half::bf16;

const WARMUP: usize = 3;
const REPS: usize = 20;

#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    epi: Epilogue,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    CustomAuto,
    CustomNoSplit,
    Custom(Tile),
    CublasLt,
    CublasLtUnfused,
    WgmmaAuto,
    WgmmaNoSplit,
    Wgmma(WgmmaTile),
    TmaAuto,
    Tma(TmaTile),
}

fn main() {
    if let Err(e) = run() {
        eprintln!("gemm bench failed: {e:#}");
        std::process::exit(1);
    }
}

/// Deterministic values in [-scale, scale) (a cheap LCG: benchmark data, not test data).
fn fill(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn bf16_vec(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn run() -> Result<()> {
    if device_count().unwrap_or(0) == 0 {
        println!("SKIP gemm bench: no CUDA device");
        return Ok(());
    }
    let gpu = Gpu::new(0)?;
    let rows: Vec<usize> = match std::env::var("FORA_BENCH_ROWS") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .context("FORA_BENCH_ROWS must be a comma-separated list of row counts")?,
        Err(_) => vec![512, 16384, 65536],
    };
    let d = 1152;
    let mut shapes = Vec::new();
    for &m in &rows {
        shapes.push(Shape {
            name: "qkv",
            m,
            n: 3 * d,
            k: d,
            epi: Epilogue::BiasBf16,
        });
        shapes.push(Shape {
            name: "proj+gate+res+cache",
            m,
            n: d,
            k: d,
            epi: Epilogue::BiasGateResidual,
        });
        shapes.push(Shape {
            name: "fc1+gelu",
            m,
            n: 4 * d,
            k: d,
            epi: Epilogue::BiasGeluBf16,
        });
        shapes.push(Shape {
            name: "fc2+gate+res",
            m,
            n: d,
            k: 4 * d,
            epi: Epilogue::BiasGateResidual,
        });
    }
    let ada_n = 28 * 6 * d + 2 * d;
    for m in [2, 512] {
        shapes.push(Shape {
            name: "adaLN table",
            m,
            n: ada_n,
            k: d,
            epi: Epilogue::BiasF32,
        });
    }

    let max_a = shapes.iter().map(|s| s.m * s.k).max().unwrap_or(1);
    let max_w = shapes.iter().map(|s| s.n * s.k).max().unwrap_or(1);
    let max_mn = shapes.iter().map(|s| s.m * s.n).max().unwrap_or(1);
    let max_n = shapes.iter().map(|s| s.n).max().unwrap_or(1);
    let a: CudaSlice<bf16> = gpu.upload(&bf16_vec(&fill(max_a, 1.0, 1)), "A")?;
    let w: CudaSlice<bf16> = gpu.upload(&bf16_vec(&fill(max_w, 0.03, 2)), "W")?;
    let bias: CudaSlice<f32> = gpu.upload(&fill(max_n, 0.5, 3), "bias")?;
    // Gates of up to 256 images; tiny so the residual stays finite over all launches.
    let gate: CudaSlice<f32> = gpu.upload(&fill(256 * d, 1e-4, 4), "gate")?;
    let out_f32: CudaSlice<f32> = gpu.upload(&fill(max_mn, 1.0, 5), "out f32")?;
    let out_bf16: CudaSlice<bf16> = gpu.alloc_zeros(max_mn, "out bf16")?;
    let cache: CudaSlice<bf16> = gpu.alloc_zeros(max_mn, "cache")?;

    let custom = Gemm::new(&gpu, GemmImpl::Custom, 0)?;
    let lt = Gemm::new(&gpu, GemmImpl::CublasLt, max_mn)?;
    let mut variants = vec![
        Variant::CustomAuto,
        Variant::CustomNoSplit,
        Variant::Custom(Tile::M128),
        Variant::Custom(Tile::M128K64),
        Variant::Custom(Tile::M64),
        Variant::Custom(Tile::M32),
        Variant::CublasLt,
        Variant::CublasLtUnfused,
    ];
    // The wgmma kernels exist only for sm_90a.
    let wgmma = if gpu.compute_capability().0 == 9 {
        variants.extend([Variant::WgmmaAuto, Variant::WgmmaNoSplit]);
        variants.extend(WgmmaTile::ALL.map(Variant::Wgmma));
        Some(Gemm::new(&gpu, GemmImpl::Wgmma, 0)?)
    } else {
        None
    };
    let wgmma_gemm = || wgmma.as_ref().context("the wgmma GEMM is not loaded");
    // The warp-specialized TMA kernels, likewise sm_90a only.
    let tma = if gpu.compute_capability().0 == 9 {
        variants.push(Variant::TmaAuto);
        variants.extend(TmaTile::ALL.map(Variant::Tma));
        Some(Gemm::new(&gpu, GemmImpl::Tma, 0)?)
    } else {
        None
    };
    let tma_gemm = || tma.as_ref().context("the TMA GEMM is not loaded");

    println!(
        "GEMM on {} (sm_{}{}, {} SMs): median of {REPS} after {WARMUP} warm-up launches\n",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count()
    );
    println!("| op | M | N | K | variant | us | TFLOP/s | vs cuBLASLt |");
    println!("|---|---|---|---|---|---|---|---|");
    for s in &shapes {
        let p = GemmParams {
            a: dptr(&a),
            w: dptr(&w),
            bias: dptr(&bias),
            out: if s.epi.out_is_f32() {
                dptr(&out_f32)
            } else {
                dptr(&out_bf16)
            },
            cache: if s.name.contains("cache") {
                dptr(&cache)
            } else {
                0
            },
            gate: if s.epi == Epilogue::BiasGateResidual {
                dptr(&gate)
            } else {
                0
            },
            m: s.m as i32,
            n: s.n as i32,
            k: s.k as i32,
            lda: s.k as i32,
            ldw: s.k as i32,
            ldo: s.n as i32,
            ldc: s.n as i32,
            ldg: s.n as i32,
            rows_per_gate: 256,
            epilogue: s.epi.raw(),
        };
        let flops = 2.0 * s.m as f64 * s.n as f64 * s.k as f64;
        let mut timings = Vec::new();
        for &v in &variants {
            let launch = || match v {
                Variant::CustomAuto => unsafe { custom.run(&gpu, &p) },
                Variant::CustomNoSplit => unsafe {
                    custom.run_custom_split(&gpu, &p, None, Some(1))
                },
                Variant::Custom(t) => unsafe { custom.run_custom(&gpu, &p, Some(t)) },
                Variant::CublasLt => unsafe { lt.run(&gpu, &p) },
                Variant::CublasLtUnfused => unsafe { lt.run_cublaslt_unfused(&gpu, &p) },
                Variant::WgmmaAuto => unsafe { wgmma_gemm()?.run(&gpu, &p) },
                Variant::WgmmaNoSplit => unsafe {
                    wgmma_gemm()?.run_wgmma(&gpu, &p, None, Some(1))
                },
                Variant::Wgmma(t) => unsafe { wgmma_gemm()?.run_wgmma(&gpu, &p, Some(t), None) },
                Variant::TmaAuto => unsafe { tma_gemm()?.run(&gpu, &p) },
                Variant::Tma(t) => unsafe { tma_gemm()?.run_tma(&gpu, &p, Some(t), None) },
            };
            let us =
                median_us(&gpu, launch).with_context(|| format!("{} M={} {v:?}", s.name, s.m))?;
            timings.push((v, us));
        }
        let lt_us = timings
            .iter()
            .find(|t| t.0 == Variant::CublasLt)
            .map_or(f64::NAN, |t| t.1);
        for (v, us) in timings {
            let name = match v {
                Variant::CustomAuto => {
                    let (t, splits) = custom.plan(s.m, s.n, s.k);
                    format!("custom auto ({t:?}, split-K {splits})")
                }
                Variant::CustomNoSplit => format!(
                    "custom auto tile, no split ({:?})",
                    Tile::pick(s.m, s.n, gpu.sm_count(), gpu.compute_capability().0)
                ),
                Variant::Custom(t) => format!("custom {t:?}, auto split"),
                Variant::CublasLt => "cuBLASLt".to_string(),
                Variant::CublasLtUnfused => "cuBLASLt + epilogue kernel".to_string(),
                Variant::WgmmaAuto => {
                    let (t, splits) = wgmma_gemm()?.plan_wgmma(s.m, s.n, s.k);
                    format!("wgmma auto ({t:?}, split-K {splits})")
                }
                Variant::WgmmaNoSplit => format!(
                    "wgmma auto tile, no split ({:?})",
                    WgmmaTile::pick(s.m, s.n, gpu.sm_count())
                ),
                Variant::Wgmma(t) => format!("wgmma {t:?}, auto split"),
                Variant::TmaAuto => {
                    let (t, splits) = tma_gemm()?.plan_tma(s.m, s.n, s.k);
                    format!("tma auto ({t:?}, split-K {splits})")
                }
                Variant::Tma(t) => format!("tma {t:?}, auto split"),
            };
            println!(
                "| {} | {} | {} | {} | {name} | {us:.1} | {:.1} | {:.2}x |",
                s.name,
                s.m,
                s.n,
                s.k,
                flops / (us * 1e-6) / 1e12,
                lt_us / us
            );
        }
    }
    Ok(())
}

/// Median time of one launch in microseconds. The launches are queued back to back (events
/// recorded between them, read after one synchronize), so the GPU is not idle while the host
/// enqueues the next one unless the kernel is shorter than the host's launch cost.
fn median_us(gpu: &Gpu, launch: impl Fn() -> Result<()>) -> Result<f64> {
    for _ in 0..WARMUP {
        launch()?;
    }
    let stream = gpu.stream();
    let mut events = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        launch()?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        events.push((start, end));
    }
    gpu.synchronize()?;
    let mut times = events
        .iter()
        .map(|(s, e)| Ok(s.elapsed_ms(e)? as f64 * 1e3))
        .collect::<Result<Vec<f64>>>()?;
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[REPS / 2])
}
