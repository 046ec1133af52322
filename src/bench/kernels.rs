//! The ceilings and the per-kernel rows: every GEMM of a block at the model's shapes, flash
//! attention, the FORA reuse kernels, LayerNorm, the sampler update.

use crate::backend::{Guidance, GuidanceMode};
use crate::config::DitConfig;
use crate::cuda::attention::{attention_flops, attention_with, AttentionImpl};
use crate::cuda::bandwidth::{bandwidth_copy, bandwidth_read, bandwidth_read_words};
use crate::cuda::cublaslt::{CublasLt, LtEpilogue, LtMatmul, LtOutput, LtRun};
use crate::cuda::device::KernelLauncher;
use crate::cuda::embed::patch_embed;
use crate::cuda::fora::{
    fora_cache_sum, fora_reuse, fora_reuse_final_with, fora_sum_final_with, sum_final_tokens,
    ReuseTokens,
};
use crate::cuda::gemm::{Epilogue, Gemm, GemmImpl, TmaTile};
use crate::cuda::model::{ada_cols, cache_sum_params, reuse_final_params};
use crate::cuda::norm::{layernorm_modulate_with, residual_layernorm_with, RowWarps};
use crate::cuda::params::{
    AttentionParams, BandwidthParams, ForaCacheSumParams, ForaReuseFinalParams, ForaReuseParams,
    GemmParams, LayerNormModulateParams, PatchEmbedParams, ResidualLayerNormParams,
    SamplerStepParams,
};
use crate::cuda::qkv_attention::QkvAttention;
use crate::cuda::sampler::{
    final_sampler_step, final_sampler_supported, guided_channels, sampler_step, set_update,
};
use crate::cuda::{dptr, Gpu};
use crate::diffusion::{Diffusion, SamplerKind};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{sys, CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use super::timer::Timer;
use super::Stats;
use super::{
    gbps, rotate_bytes, rotation_copies, tflops, BenchPlan, Bound, Ceiling, KernelRow, Report,
    FILL_CHUNK,
};

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

pub(super) fn bench_ceilings(gpu: &Gpu, plan: &BenchPlan, timer: &Timer, report: &mut Report) {
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
    // L2: the read kernel over a quarter of L2, the same buffer every launch.
    let l2 = gpu
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_or(0, |v| v.max(0) as usize);
    let l2_read = if l2 >= 1 << 20 {
        ceiling_memory(gpu, l2 / 4, MemoryProbe::L2Read, timer)
    } else {
        Err(anyhow::anyhow!("the device reports an L2 of {l2} bytes"))
    };
    match l2_read {
        Ok(c) => report.l2_ceiling = Some(c),
        Err(e) => report.error("ceilings", "L2 read", &e),
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
    /// `bandwidth_read` of a buffer small enough to stay in L2 between launches.
    L2Read,
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
    let (stats, _) = timer.time_alone(gpu, 1, |_| match unsafe { lt.matmul(&mm) }? {
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
    // The L2 probe: the largest power-of-two buffer in `bytes`, read 64 times a launch (so the
    // launch gaps of the timing graph do not count).
    let (bytes, repeats) = match probe {
        MemoryProbe::L2Read => (
            1usize << (usize::BITS - 1 - bytes.max(16).leading_zeros()),
            64,
        ),
        _ => (bytes / 16 * 16, 1),
    };
    ensure!(
        bytes > 0,
        "the memory ceilings need at least 16 bytes (--copy-mib)"
    );
    let src = random_buffer(gpu, bytes, 1.0, 13, |v| v.to_bits() as u8, "copy source")?;
    let chunks = (bytes / 16 * repeats) as i64;
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
        MemoryProbe::L2Read => (
            format!(
                "L2 read {:.1} MiB x {repeats} (bandwidth_read over one buffer: not a memory \
                 ceiling)",
                bytes as f64 / (1 << 20) as f64
            ),
            bytes * repeats,
        ),
    };
    let out_len = match probe {
        MemoryProbe::ReadKernel | MemoryProbe::L2Read => 4 * bandwidth_read_words(gpu, chunks),
        _ => bytes,
    };
    let mut dst = gpu.alloc_zeros::<u8>(out_len, "copy destination")?;
    let params = BandwidthParams {
        src: dptr(&src),
        dst: dptr(&dst),
        chunks,
        out_words: (out_len / 4) as i64,
        mask: if probe == MemoryProbe::L2Read {
            (bytes / 16 - 1) as i64
        } else {
            -1
        },
    };
    let stream = gpu.stream().clone();
    let (stats, _) = timer.time_alone(gpu, 1, |_| match probe {
        MemoryProbe::Memcpy => stream
            .memcpy_dtod(&src, &mut dst)
            .context("device-to-device copy failed"),
        MemoryProbe::CopyKernel => unsafe { bandwidth_copy(gpu, &params) },
        MemoryProbe::ReadKernel | MemoryProbe::L2Read => unsafe { bandwidth_read(gpu, &params) },
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

/// `save` writes the report as it stands: after every row,
/// so that a run ended by a hang (the watchdog) or a time bound keeps what it measured.
pub(super) fn bench_kernels(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    report: &mut Report,
    save: &dyn Fn(&Report),
) {
    let rotate = rotate_bytes(gpu);
    // FORA_BENCH_KERNELS=gemm: the GEMM rows only; =other: every row but the GEMMs (a run for
    // the attention or the FORA kernels need not time the GEMMs again); all (default): both.
    let (gemms, others) = match std::env::var("FORA_BENCH_KERNELS")
        .unwrap_or_default()
        .trim()
    {
        "" | "all" => (true, true),
        "gemm" => (true, false),
        "other" => (false, true),
        v => {
            let e = anyhow::anyhow!("FORA_BENCH_KERNELS must be all, gemm or other, got {v:?}");
            report.error("kernels", "row selection", &e);
            return;
        }
    };
    if gemms {
        bench_gemm_rows(gpu, cfg, rows, timer, report, rotate, save);
    }
    if !others {
        return;
    }
    // The selected implementation ("custom"), then the others worth comparing on this card.
    let selected = report.options.attention.resolve(gpu.compute_capability().0);
    let attention_row = bench_attention(gpu, cfg, rows, timer, rotate, selected, true);
    push_kernel(report, save, "attention", rows, attention_row);
    // FORA_BENCH_UNTRIED=0 leaves out the newest kernels (last below; first run on a GPU in
    // session 18), as FORA_BENCH_HOPPER_GEMMS=0 does the Hopper GEMMs: a fault would poison
    // every later row.
    let untried = std::env::var("FORA_BENCH_UNTRIED").map_or(true, |v| v.trim() != "0");
    let other_attention = |imp: AttentionImpl| {
        (!imp.is_wgmma() || gpu.compute_capability().0 == 9) && selected != imp
    };
    // A row for each of `imps` but the selected one, where this device runs it.
    let other_attention_rows = |report: &mut Report, imps: &[AttentionImpl]| {
        for &imp in imps {
            if other_attention(imp) {
                let row = bench_attention(gpu, cfg, rows, timer, rotate, imp, false);
                push_kernel(report, save, "attention", rows, row);
            }
        }
    };
    other_attention_rows(
        report,
        &[
            AttentionImpl::V1,
            AttentionImpl::Wgmma,
            AttentionImpl::WgmmaMn,
        ],
    );
    let embed_row = bench_patch_embed(gpu, cfg, rows, timer, rotate);
    push_kernel(report, save, "patch_embed", rows, embed_row);
    let sampler_row = bench_sampler_step(gpu, cfg, rows, timer, rotate);
    push_kernel(report, save, "sampler_step", rows, sampler_row);
    let reuse_row = bench_fora_reuse(gpu, cfg, rows, timer, rotate);
    push_kernel(report, save, "fora_reuse", rows, reuse_row);
    for tpt in ReuseTokens::ALL {
        let fused_row =
            bench_fora_reuse_final(gpu, cfg, rows, timer, rotate, FusedSource::Cache(tpt));
        push_kernel(report, save, "fora_reuse_final", rows, fused_row);
    }
    for warps in [RowWarps::One, RowWarps::Four] {
        let ln_row = bench_layernorm(gpu, cfg, rows, timer, rotate, false, warps);
        push_kernel(report, save, "layernorm", rows, ln_row);
        let residual_ln_row = bench_layernorm(gpu, cfg, rows, timer, rotate, true, warps);
        push_kernel(report, save, "residual_ln", rows, residual_ln_row);
    }
    if untried {
        // The newest kernels, last (first run on a GPU in session 18): FORA_REUSE_SUM's
        // (session 9), the deep and split (session 12), TMA (session 8) and TMA ping-pong
        // (session 25) attention,
        // final_sampler_step (session 12).
        for tokens in [1, 4] {
            let source = FusedSource::Sum(tokens);
            let sum_final_row = bench_fora_reuse_final(gpu, cfg, rows, timer, rotate, source);
            push_kernel(report, save, "fora_sum_final", rows, sum_final_row);
        }
        for count in [1, 2, 4] {
            let sum_row = bench_fora_cache_sum(gpu, cfg, rows, timer, rotate, count);
            push_kernel(report, save, "fora_cache_sum", rows, sum_row);
        }
        other_attention_rows(
            report,
            &[
                AttentionImpl::WgmmaMnDeep,
                AttentionImpl::WgmmaMnSplit,
                AttentionImpl::Tma,
                AttentionImpl::TmaPingPong,
            ],
        );
        // FORA_FINAL_SAMPLER's kernel (session 12).
        let final_row = bench_final_sampler_step(gpu, cfg, rows, timer, rotate);
        push_kernel(report, save, "final_sampler_step", rows, final_row);
        // FORA_GEMM_LN's kernels (session 23; the 128-row tile of FORA_GEMM_LN_MANY_ROWS,
        // session 25), where the model would take one: against the cuBLASLt product rows of
        // proj / fc2 plus a residual_ln row. The model's tile first, A multicast and two CTAs an
        // SM allowed first (the 128-row tile only so: one an SM would undo its point).
        use crate::cuda::gemm_ln::GemmLnTile;
        let wide = report.options.gemm_ln_wide;
        let model_tile = GemmLnTile::for_rows(gpu, cfg.hidden, rows * cfg.tokens(), wide);
        // The model's tile, then the others.
        let tiles: Vec<GemmLnTile> = model_tile
            .into_iter()
            .chain(
                GemmLnTile::ALL
                    .into_iter()
                    .filter(|&t| model_tile.is_some_and(|m| m != t)),
            )
            .collect();
        for (op, k) in [("proj+ln", cfg.hidden), ("fc2+ln", cfg.mlp_hidden())] {
            for &tile in &tiles {
                let variants: &[(bool, bool)] = match tile {
                    GemmLnTile::Rows64 => {
                        &[(true, false), (true, true), (false, false), (false, true)]
                    }
                    // Both many-rows tiles as they are (Wide128 is one an SM anyway).
                    GemmLnTile::Rows128 | GemmLnTile::Wide128 => &[(true, false), (false, false)],
                };
                for &variant in variants {
                    let row =
                        bench_gemm_layernorm(gpu, cfg, rows, timer, rotate, op, k, tile, variant);
                    push_kernel(report, save, op, rows, row);
                }
            }
        }
        // FORA_QKV_ATTENTION's kernel (session 24), where its shape test holds (the model also
        // asks that every cluster be resident at once, which the row's time then shows):
        // against the qkv GEMM rows plus an attention row. The model's (W multicast) first.
        if crate::cuda::model::GpuModel::qkv_attention_shape_serves(gpu, cfg, rows) {
            for multicast in [true, false] {
                let row = bench_qkv_attention(gpu, cfg, rows, timer, rotate, multicast);
                push_kernel(report, save, "qkv+attention", rows, row);
            }
        }
    }
}

/// `qkv_attention_*` (FORA_QKV_ATTENTION): the qkv Linear and the attention of `rows` model rows
/// in one launch, W multicast across each cluster or not ([`QkvAttention::multicast`]). Its
/// FLOPs are the GEMM's and the attention's.
fn bench_qkv_attention(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
    multicast: bool,
) -> Result<KernelRow> {
    let (d, t) = (cfg.hidden, cfg.tokens());
    let m = rows * t;
    // A and W (bf16) in, the attention output (bf16) out.
    let set = m * d * 2 + 3 * d * d * 2 + m * d * 2;
    let copies = rotation_copies(set, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 700 + 10 * c as u64;
        sets.push((
            random_bf16(gpu, m * d, 1.0, seed, "qkv_attention A")?,
            random_bf16(gpu, 3 * d * d, 0.03, seed + 1, "qkv_attention W")?,
            gpu.alloc_zeros::<bf16>(m * d, "qkv_attention out")?,
        ));
    }
    let bias = random_f32(gpu, 3 * d, 0.1, 799, "qkv_attention bias")?;
    let shape = QkvAttention {
        a: 0,
        lda: d,
        w: 0,
        bias: dptr(&bias),
        out: 0,
        batch: rows,
        tokens: t,
        heads: cfg.heads,
        head_dim: cfg.head_dim(),
        scale: 1.0 / (cfg.head_dim() as f32).sqrt(),
        multicast,
    };
    let launch = |i: usize| {
        let (a, w, out) = &sets[i % copies];
        unsafe {
            QkvAttention {
                a: dptr(a),
                w: dptr(w),
                out: dptr(out),
                ..shape
            }
            .launch(gpu)
        }
    };
    let (stats, per_replay) = timer.time_alone(gpu, copies, launch)?;
    let attention_flops = 4.0 * (rows * cfg.heads * t * t * cfg.head_dim()) as f64;
    // The clusters the device holds at once against the launch's (the model asks all).
    let resident = QkvAttention::resident_clusters(gpu, cfg.head_dim(), multicast);
    Ok(KernelRow {
        name: "qkv+attention".into(),
        imp: format!(
            "custom ({}, {resident} of {} clusters resident)",
            shape.kernel(),
            rows * cfg.heads
        ),
        rows,
        shape: format!("M={m} N={} K={d} H={} T={t}", 3 * d, cfg.heads),
        bound: Bound::Compute,
        work: 2.0 * (m * 3 * d * d) as f64 + attention_flops,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

/// `gemm_tma_ln_*` as proj (`k` = hidden) or fc2 (`k` = mlp_hidden): the GEMM, its gated
/// residual and the next LayerNorm in one launch (FORA_GEMM_LN), the cache written and the
/// bf16 v added as on the default path, on `tile`, with the A tile multicast or not
/// ([`GemmLayerNorm::multicast`]), one CTA an SM or two ([`GemmLayerNorm::one_per_sm`]). Its
/// FLOPs are the GEMM's.
#[allow(clippy::too_many_arguments)] // the bench context, the op, its tile and two variants
fn bench_gemm_layernorm(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
    op: &str,
    k: usize,
    tile: crate::cuda::gemm_ln::GemmLnTile,
    (multicast, one_per_sm): (bool, bool),
) -> Result<KernelRow> {
    use crate::cuda::gemm_ln::GemmLayerNorm;
    let (d, t) = (cfg.hidden, cfg.tokens());
    let m = rows * t;
    let cols = ada_cols(cfg);
    // A, W (bf16), x read and written (f32), out and cache (bf16), the table's rows.
    let set = m * k * 2 + d * k * 2 + m * d * (4 + 2 + 2) + rows * cols * 4;
    let copies = rotation_copies(set, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 600 + 10 * c as u64;
        sets.push((
            random_bf16(gpu, m * k, 1.0, seed, "gemm_ln A")?,
            random_bf16(gpu, d * k, 0.03, seed + 1, "gemm_ln W")?,
            random_f32(gpu, m * d, 1.0, seed + 2, "gemm_ln x")?,
            random_f32(gpu, rows * cols, 0.1, seed + 3, "gemm_ln modulation")?,
            gpu.alloc_zeros::<bf16>(m * d, "gemm_ln out")?,
            gpu.alloc_zeros::<bf16>(m * d, "gemm_ln cache")?,
        ));
    }
    let bias = random_f32(gpu, d, 0.1, 699, "gemm_ln bias")?;
    // Every launch but its rotated operands (set per launch below).
    let shape = GemmLayerNorm {
        a: 0,
        w: 0,
        lda: k,
        ldw: k,
        bias: dptr(&bias),
        cache: 0,
        x: 0,
        modulation: 0,
        out: 0,
        m,
        k,
        dim: d,
        tokens: t,
        ld_mod: cols,
        gate_col: 2 * d,
        shift_col: 3 * d,
        scale_col: 4 * d,
        round_v: true,
        eps: 1e-6,
        one_per_sm,
        multicast,
        tile,
        // The kernel alone (no weight prefetch), as the residual_ln rows.
        prefetch: [(0, 0); 2],
    };
    let launch = |i: usize| {
        let (a, w, x, table, out, cache) = &sets[i % copies];
        unsafe {
            GemmLayerNorm {
                a: dptr(a),
                w: dptr(w),
                cache: dptr(cache),
                x: dptr(x),
                modulation: dptr(table),
                out: dptr(out),
                ..shape
            }
            .launch(gpu)
        }
    };
    let (stats, per_replay) = timer.time_alone(gpu, copies, launch)?;
    Ok(KernelRow {
        name: op.into(),
        imp: format!(
            "custom ({}{})",
            shape.kernel(),
            if one_per_sm { ", 1 CTA/SM" } else { "" }
        ),
        rows,
        shape: format!("M={m} N={d} K={k}"),
        bound: Bound::Compute,
        work: 2.0 * (m * d * k) as f64,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

/// The GEMM rows of `bench_kernels`: every block GEMM, adaLN and final shape, on every
/// implementation (the never-run ones last).
fn bench_gemm_rows(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    report: &mut Report,
    rotate: usize,
    save: &dyn Fn(&Report),
) {
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
    let tma_mc = hopper.then(|| Gemm::new(gpu, GemmImpl::TmaMulticast, 0));
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
    for (what, g) in [("wgmma", &wgmma), ("tma", &tma), ("tma_mc", &tma_mc)] {
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
        // The same launches with every one reading the first set's weight (and bias): the
        // weight stays in L2 while the activations rotate. Against the rotated rows: what a
        // layer would gain if its weights were in L2 before its GEMM (prefetched during the op
        // before), as they are not in a step (a DiT-XL/2 step reads 0.9 GB of weights).
        let params_w_in_l2: Vec<GemmParams> = params
            .iter()
            .map(|p| GemmParams {
                w: params[0].w,
                bias: params[0].bias,
                ..*p
            })
            .collect();
        let params = &params;
        let params_w_in_l2 = &params_w_in_l2;
        let bias16 = &bias16;
        let n = params.len();
        type Runner<'g> = Box<dyn Fn(usize) -> Result<()> + 'g>;
        let mut variants: Vec<(&str, Runner)> = Vec::new();
        if let Ok(g) = &custom {
            variants.push((
                "custom",
                Box::new(move |i| unsafe { g.run(gpu, &params[i % n]) }),
            ));
        }
        if let Some(Ok(g)) = &wgmma {
            variants.push((
                "wgmma",
                Box::new(move |i| unsafe { g.run(gpu, &params[i % n]) }),
            ));
        }
        if let Some(Ok(g)) = &tma {
            variants.push((
                "tma",
                Box::new(move |i| unsafe { g.run(gpu, &params[i % n]) }),
            ));
            // Every tile forced (split-K by shape), to tune TmaTile::pick from.
            for t in TmaTile::ALL {
                variants.push((
                    t.bench_name(),
                    Box::new(move |i| unsafe { g.run_tma(gpu, &params[i % n], Some(t), None) }),
                ));
            }
        }
        if let Some(Ok(g)) = &tma_mc {
            // The automatic pick of FORA_GEMM=tma_mc (multicast where M has two row tiles).
            variants.push((
                "tma_mc",
                Box::new(move |i| unsafe { g.run(gpu, &params[i % n]) }),
            ));
        }
        if let Ok(g) = &lt {
            variants.push((
                "cublaslt",
                Box::new(move |i| unsafe { g.run(gpu, &params[i % n]) }),
            ));
            variants.push((
                "cublaslt+epilogue",
                Box::new(move |i| unsafe { g.run_cublaslt_unfused(gpu, &params[i % n]) }),
            ));
            if !s.epi.out_is_f32() {
                variants.push((
                    "cublaslt+bf16 bias",
                    Box::new(move |i| unsafe {
                        g.run_with_bias_bf16(gpu, &params[i % n], bias16[i % n])
                    }),
                ));
                variants.push((
                    "cublaslt+bf16 bias, W in L2",
                    Box::new(move |i| unsafe {
                        g.run_with_bias_bf16(gpu, &params_w_in_l2[i % n], bias16[0])
                    }),
                ));
            }
            if s.epi == Epilogue::BiasGateResidual {
                // proj and fc2 on the fused-LayerNorm path: cuBLASLt's f32 product alone (the
                // residual and the LayerNorm follow in residual_layernorm), and with
                // FORA_LT_SPLITK its split-K slices where the grid is small.
                variants.push((
                    "cublaslt product",
                    Box::new(move |i| unsafe { g.cublaslt_product(&params[i % n]) }.map(|_| ())),
                ));
                variants.push((
                    "cublaslt product, W in L2",
                    Box::new(move |i| {
                        unsafe { g.cublaslt_product(&params_w_in_l2[i % n]) }.map(|_| ())
                    }),
                ));
                let splits = g.lt_product_splits(&params[0]);
                if splits > 1 {
                    variants.push((
                        "cublaslt product split-K",
                        Box::new(move |i| {
                            unsafe { g.cublaslt_product_split(&params[i % n], splits) }.map(|_| ())
                        }),
                    ));
                }
            }
        }
        if let Ok(g) = &lt_tuned {
            variants.push((
                "cublaslt-tuned",
                Box::new(move |i| unsafe { g.run(gpu, &params[i % n]) }),
            ));
        }
        // cuBLASLt's rows first, the tiles never run on a GPU last (stable: the others keep
        // their order), so that a fault, which poisons the context for every later launch, or
        // a hang, which ends the run, costs no baseline and no tried kernel's row.
        let auto_tile_untried =
            matches!(&tma, Some(Ok(g)) if !g.plan_tma(s.m, s.n, s.k).0.ran_on_a_gpu());
        variants.sort_by_key(|(imp, _)| gemm_row_rank(imp, auto_tile_untried));
        for (imp, runner) in variants {
            let timed = timer.time_alone(gpu, n, &runner);
            log_row(
                &format!("{} {rows} rows {imp}", s.name),
                timed.as_ref().map(|(st, _)| Some(st)),
            );
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
            // After every row: a hang ends the process (the watchdog), and this shape's rows
            // before it are kept.
            save(report);
        }
    }
}

/// Where a GEMM row runs among a shape's rows: 0 cuBLASLt's, 1 the kernels that have run on a
/// GPU, 2 those never run ([`TmaTile::ran_on_a_gpu`]; `auto_tile_untried`: the `tma` row's own
/// pick at this shape is one of them).
fn gemm_row_rank(imp: &str, auto_tile_untried: bool) -> u8 {
    let untried_tile = TmaTile::ALL
        .iter()
        .any(|t| t.bench_name() == imp && !t.ran_on_a_gpu());
    if imp.starts_with("cublaslt") {
        0
    } else if untried_tile || (imp == "tma" && auto_tile_untried) {
        2
    } else {
        1
    }
}

/// One measured row on stderr as soon as it is measured (`what`: kernel, rows, implementation):
/// if a later kernel hangs until the run is killed, the log still has the rows before it.
fn log_row(what: &str, time: std::result::Result<Option<&Stats>, &anyhow::Error>) {
    match time {
        Ok(Some(st)) => eprintln!("bench: {what}: {:.4} ms", st.median_ms),
        Ok(None) => eprintln!("bench: {what}: no time"),
        Err(e) => eprintln!("bench: {what}: failed: {e:#}"),
    }
}

fn push_kernel(
    report: &mut Report,
    save: &dyn Fn(&Report),
    name: &str,
    rows: usize,
    r: Result<KernelRow>,
) {
    match r {
        Ok(row) => {
            log_row(
                &format!("{name} {rows} rows {}", row.imp),
                Ok(row.stats.as_ref()),
            );
            report.kernels.push(row);
        }
        Err(e) => {
            log_row(&format!("{name} {rows} rows"), Err(&e));
            report.error("kernels", &format!("{name} at {rows} rows"), &e);
        }
    }
    save(report);
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

/// One attention row: `imp` timed over rotating inputs; `selected`: it is what the model runs.
fn bench_attention(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
    imp: AttentionImpl,
    selected: bool,
) -> Result<KernelRow> {
    let (t, h, hd) = (cfg.tokens(), cfg.heads, cfg.head_dim());
    let qkv_len = rows * t * 3 * cfg.hidden;
    let copies = rotation_copies(2 * qkv_len, rotate);
    let inputs = (0..copies)
        .map(|c| random_bf16(gpu, qkv_len, 1.0, 200 + c as u64, "attention qkv"))
        .collect::<Result<Vec<_>>>()?;
    let out = gpu.alloc_zeros::<bf16>(rows * t * cfg.hidden, "attention out")?;
    let params = |i: usize| attention_params(cfg, rows, dptr(&inputs[i % copies]), dptr(&out));
    let (stats, per_replay) = timer.time_alone(gpu, copies, |i| unsafe {
        attention_with(gpu, &params(i), imp)
    })?;
    Ok(KernelRow {
        name: "attention".into(),
        // The row of what the model runs (FORA_ATTENTION) is "custom"; the others are named.
        imp: if selected {
            "custom".into()
        } else {
            format!("custom ({})", imp.name())
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
    let (stats, per_replay) =
        timer.time_alone(gpu, copies, |i| unsafe { fora_reuse(gpu, &params(i)) })?;
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
    let (stats, per_replay) =
        timer.time_alone(gpu, copies, |i| unsafe { patch_embed(gpu, &params(i)) })?;
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
    let base = bench_update_params(cfg, images)?;
    let params = |i: usize| {
        let (model_out, x) = &sets[i % copies];
        SamplerStepParams {
            model_out: dptr(model_out),
            x: dptr(x),
            ..base
        }
    };
    // The update rewrites x in place: every replay steps the same latents once more, which
    // changes their values, not the work.
    let (stats, per_replay) =
        timer.time_alone(gpu, copies, |i| unsafe { sampler_step(gpu, &params(i)) })?;
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

/// The update parameters both sampler rows time (buffers left null): `images` images with
/// CFG (official guidance, scale 4), DDPM-250 step 200 with Philox noise.
fn bench_update_params(cfg: &DitConfig, images: usize) -> Result<SamplerStepParams> {
    let update = Diffusion::new("250", cfg.learn_sigma)?.step_update(200, SamplerKind::Ddpm)?;
    let guidance = Guidance {
        scale: 4.0,
        mode: GuidanceMode::Official3,
    };
    let mut p = SamplerStepParams {
        seed: 1,
        noise_stream: 49,
        images: images as i32,
        rows: 2 * images as i32,
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
    Ok(p)
}

/// The final Linear and the sampler update in one launch (`final_sampler_step`,
/// FORA_FINAL_SAMPLER): what the final GEMM and `sampler_step` do at the end of a step, with
/// `rows / 2` images and CFG as `bench_sampler_step`.
fn bench_final_sampler_step(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
) -> Result<KernelRow> {
    let images = (rows / 2).max(1);
    let model_rows = 2 * images;
    let (d, cols) = (cfg.hidden, cfg.patch_out());
    ensure!(
        final_sampler_supported(d, cols),
        "final_sampler_step does not take {}'s final Linear ({d} x {cols})",
        cfg.arch_name()
    );
    let xn_len = model_rows * cfg.tokens() * d;
    let img = images * cfg.image_len();
    // The final LayerNorm's output and the weight read (bf16), x_t read and x_{t-1} written.
    let bytes = xn_len * 2 + cols * d * 2 + 2 * img * 4;
    let copies = rotation_copies(bytes, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 760 + 10 * c as u64;
        sets.push((
            random_bf16(gpu, xn_len, 1.0, seed, "final LayerNorm output")?,
            random_f32(gpu, img, 1.0, seed + 1, "sampler latents")?,
        ));
    }
    let w = random_bf16(gpu, cols * d, 1.0 / (d as f32).sqrt(), 758, "final weight")?;
    let b = random_f32(gpu, cols, 0.1, 759, "final bias")?;
    let base = bench_update_params(cfg, images)?;
    let params = |i: usize| {
        let (xn, x) = &sets[i % copies];
        SamplerStepParams {
            x: dptr(x),
            xn: dptr(xn),
            final_w: dptr(&w),
            final_b: dptr(&b),
            dim: d as i32,
            ..base
        }
    };
    let (stats, per_replay) = timer.time_alone(gpu, copies, |i| unsafe {
        final_sampler_step(gpu, &params(i))
    })?;
    Ok(KernelRow {
        name: "final_sampler_step".into(),
        imp: "custom".into(),
        rows: model_rows,
        shape: format!(
            "{model_rows}x{} tokens x {d} -> {cols}, {images} image(s) + CFG, {:.1} MB",
            cfg.tokens(),
            bytes as f64 / 1e6
        ),
        bound: Bound::Memory,
        work: bytes as f64,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

/// What a fused reuse forward adds to the embedding.
#[derive(Clone, Copy)]
enum FusedSource {
    /// The cache, through this `fora_reuse_final` variant.
    Cache(ReuseTokens),
    /// A cache sum, through `fora_sum_final` with so many tokens a thread.
    Sum(i32),
}

/// The fused reuse forward: what patch_embed + fora_reuse + layernorm_modulate do in a reuse
/// step, in one launch; from the cache (fora_reuse_final) or from a cache sum (fora_sum_final).
fn bench_fora_reuse_final(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
    source: FusedSource,
) -> Result<KernelRow> {
    let tpt = match source {
        FusedSource::Cache(tpt) => Some(tpt),
        FusedSource::Sum(_) => None,
    };
    let (d, t, l) = (cfg.hidden, cfg.tokens(), cfg.depth);
    let k = cfg.in_channels * cfg.patch * cfg.patch;
    let slab = rows * t * d;
    let img = rows * cfg.image_len();
    let cols = ada_cols(cfg);
    // Minimum traffic: the cache once (the gates of every row) or the f32 sum, latents read,
    // the bf16 LayerNorm output written, the shift and scale vectors of every row, the
    // embedding weight and positions once.
    let source_bytes = match tpt {
        Some(_) => 2 * l * slab * 2 + rows * 2 * l * d * 4,
        None => slab * 4,
    };
    let bytes = source_bytes + img * 4 + slab * 2 + rows * 2 * d * 4 + (k * d + t * d + d) * 4;
    let set = source_bytes + img * 4 + slab * 2 + rows * cols * 4;
    let copies = rotation_copies(set, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 600 + 10 * c as u64;
        let (cache, sum) = match tpt {
            Some(_) => (
                Some(random_bf16(
                    gpu,
                    2 * l * slab,
                    1.0,
                    seed + 1,
                    "fused cache",
                )?),
                None,
            ),
            None => (
                None,
                Some(random_f32(gpu, slab, 1.0, seed + 3, "fused sum")?),
            ),
        };
        sets.push((
            random_f32(gpu, img, 1.0, seed, "fused latents")?,
            cache,
            sum,
            random_f32(gpu, rows * cols, 1e-3, seed + 2, "fused modulation")?,
            gpu.alloc_zeros::<bf16>(slab, "fused out")?,
        ));
    }
    let weight_t = random_f32(gpu, k * d, 0.1, 690, "fused embed weight")?;
    let bias = random_f32(gpu, d, 0.1, 691, "fused embed bias")?;
    let pos = random_f32(gpu, t * d, 1.0, 692, "fused pos")?;
    let params = |i: usize| {
        let (lat, cache, sum, m, out) = &sets[i % copies];
        ForaReuseFinalParams {
            latents: dptr(lat),
            embed_weight_t: dptr(&weight_t),
            embed_bias: dptr(&bias),
            pos: dptr(&pos),
            cache: cache.as_ref().map_or(0, dptr),
            sum: sum.as_ref().map_or(0, dptr),
            modulation: dptr(m),
            out: dptr(out),
            ..reuse_final_params(cfg, rows, rows)
        }
    };
    let (stats, per_replay) = timer.time_alone(gpu, copies, |i| match source {
        FusedSource::Cache(tpt) => unsafe { fora_reuse_final_with(gpu, &params(i), tpt) },
        FusedSource::Sum(tokens) => unsafe { fora_sum_final_with(gpu, &params(i), tokens) },
    })?;
    let (name, imp, what) = match source {
        FusedSource::Sum(tokens) => {
            let picked = sum_final_tokens(&params(0), gpu.multiprocessors()) == tokens;
            (
                "fora_sum_final",
                if picked {
                    "custom".to_string()
                } else {
                    format!("custom ({tokens} tokens/thread)")
                },
                format!("embed + sum {rows}x{t}x{d} + LN"),
            )
        }
        FusedSource::Cache(tpt) => {
            let picked = ReuseTokens::pick(&params(0), gpu.multiprocessors()) == tpt;
            // The variant the launcher picks at these rows is "custom"; the others are named.
            let imp = if picked {
                "custom".into()
            } else {
                format!(
                    "custom ({} tokens/thread, {} layers in flight{})",
                    tpt.tokens(),
                    tpt.layers_in_flight(),
                    match (tpt.layers_prefetched(), tpt.ring()) {
                        (0, 0) => String::new(),
                        (0, r) => format!(" through a {r}-layer ring in shared memory"),
                        (n, _) => format!(", {n} more prefetched to L2"),
                    }
                )
            };
            (
                "fora_reuse_final",
                imp,
                format!("embed + {l} layers x 2 x {rows}x{t}x{d} + LN"),
            )
        }
    };
    Ok(KernelRow {
        name: name.into(),
        imp,
        rows,
        shape: format!("{what}, {:.1} MB", bytes as f64 / 1e6),
        bound: Bound::Memory,
        work: bytes as f64,
        stats: Some(stats),
        launches_per_replay: per_replay,
    })
}

/// fora_cache_sum: one pass over the cache for the sums of `count` reuse steps.
fn bench_fora_cache_sum(
    gpu: &Gpu,
    cfg: &DitConfig,
    rows: usize,
    timer: &Timer,
    rotate: usize,
    count: usize,
) -> Result<KernelRow> {
    let (d, t, l) = (cfg.hidden, cfg.tokens(), cfg.depth);
    let slab = rows * t * d;
    let cols = ada_cols(cfg);
    // Minimum traffic: the cache once, the sums written, every row's gates of every step.
    let bytes = 2 * l * slab * 2 + count * slab * 4 + count * rows * 2 * l * d * 4;
    let set = 2 * l * slab * 2 + count * (slab + rows * cols) * 4;
    let copies = rotation_copies(set, rotate);
    let mut sets = Vec::with_capacity(copies);
    for c in 0..copies {
        let seed = 700 + 10 * c as u64;
        sets.push((
            random_bf16(gpu, 2 * l * slab, 1.0, seed, "sum cache")?,
            random_f32(gpu, count * rows * cols, 1e-3, seed + 1, "sum gates")?,
            gpu.alloc_zeros::<f32>(count * slab, "sums")?,
        ));
    }
    let params = |i: usize| {
        let (cache, tables, sums) = &sets[i % copies];
        ForaCacheSumParams {
            cache: dptr(cache),
            tables: dptr(tables),
            sums: dptr(sums),
            count: count as i32,
            ..cache_sum_params(cfg, rows)
        }
    };
    let (stats, per_replay) =
        timer.time_alone(gpu, copies, |i| unsafe { fora_cache_sum(gpu, &params(i)) })?;
    Ok(KernelRow {
        name: "fora_cache_sum".into(),
        imp: format!("custom ({count} sums)"),
        rows,
        shape: format!(
            "{l} layers x 2 x {rows}x{t}x{d} -> {count} sums, {:.1} MB",
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
            (Some(acc), Some(cache)) => unsafe {
                residual_layernorm_with(
                    gpu,
                    &ResidualLayerNormParams {
                        // No weight prefetch: the pass alone.
                        prefetch_a: 0,
                        prefetch_b: 0,
                        prefetch_a_bytes: 0,
                        prefetch_b_bytes: 0,
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
                )
            },
            _ => unsafe {
                layernorm_modulate_with(
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
                )
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLASLt's rows first, the tiles never run last, the `tma` row with them where its own
    /// pick is such a tile.
    #[test]
    fn gemm_rows_run_baselines_first_and_untried_tiles_last() {
        assert_eq!(gemm_row_rank("cublaslt+bf16 bias", false), 0);
        assert_eq!(gemm_row_rank("custom", false), 1);
        assert_eq!(gemm_row_rank(TmaTile::N128.bench_name(), false), 1);
        assert_eq!(gemm_row_rank(TmaTile::K3N128.bench_name(), false), 2);
        assert_eq!(gemm_row_rank("tma", false), 1);
        assert_eq!(gemm_row_rank("tma", true), 2);
        assert!(TmaTile::ALL.iter().any(|t| !t.ran_on_a_gpu()));
    }
}
