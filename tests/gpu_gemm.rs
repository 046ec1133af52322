//! The GEMM (kernels/gemm.cu and the cuBLASLt path) against a plain CPU twin on the same
//! bf16-rounded inputs, every epilogue, every implementation (custom with each tile variant,
//! with forced split-K, and with the automatic pick; cuBLASLt fused; cuBLASLt + stand-alone
//! epilogue kernel), and the implementations against each other. The `gemm_wgmma_*` tests do the
//! same for the Hopper kernels of kernels/gemm_sm90.cu (each tile, forced split-K, automatic
//! pick) on a compute capability 9.x device, and print `SKIP <name>: not a Hopper GPU` on others.
//!
//! Every output buffer has padding columns (ldo > N in most cases) and two guard rows after row
//! M, poisoned with NaN (or, for the residual, holding its random initial values): the region
//! [M, N] must be finite and within rel-L2 1e-2 of the CPU, everything else untouched. A and W
//! have NaN padding past K, so a read beyond K poisons the result.
//!
//! Without a CUDA device the GPU tests print `SKIP <name>: no CUDA device` and pass; with
//! `FORA_REQUIRE_GPU=1` they fail instead. `gemm_rejects_bad_params` needs no device.

use anyhow::{ensure, Context, Result};
use cudarc::driver::CudaSlice;
use fora::cuda::gemm::{validate, Epilogue, Gemm, GemmImpl, Tile, TmaTile, WgmmaTile};
use fora::cuda::params::GemmParams;
use fora::cuda::testing::{
    check_close, from_bf16, poison_bf16, poison_f32, rel_l2, round_bf16, test_gpu, to_bf16, TestRng,
};
use fora::cuda::{dptr, Gpu};
use half::bf16;
use rayon::prelude::*;

const TOL: f64 = 1e-2;
/// Rows after row M in every output buffer that must stay untouched.
const GUARD_ROWS: usize = 2;

#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    epi: Epilogue,
    bias: bool,
    /// GATE_RESIDUAL only: also store the FORA cache.
    cache: bool,
    /// GATE_RESIDUAL only: rows sharing one gate row (tokens per image).
    rows_per_gate: usize,
    /// Extra columns of out/cache/gate (may be odd: odd leading dimensions take the scalar
    /// store path); A and W get it rounded up to a multiple of 8.
    pad: usize,
}

impl Case {
    fn lda(&self) -> usize {
        self.k + self.pad.div_ceil(8) * 8
    }
    fn ldo(&self) -> usize {
        self.n + self.pad
    }
    fn gate_rows(&self) -> usize {
        self.m.div_ceil(self.rows_per_gate)
    }
    fn out_len(&self) -> usize {
        (self.m + GUARD_ROWS) * self.ldo()
    }
    fn residual(&self) -> bool {
        self.epi == Epilogue::BiasGateResidual
    }
}

/// Host inputs (already bf16-rounded where the device holds bf16) and the CPU twin's results.
struct Host {
    a: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    gate: Vec<f32>,
    /// Initial residual, [(m + GUARD_ROWS), ldo] (residual epilogue only).
    residual0: Vec<f32>,
    /// v = A W^T + bias, [m, n].
    v: Vec<f32>,
    /// The epilogue's value in the [m, n] region: v, gelu(v), or gate * v (the residual delta).
    expect: Vec<f32>,
}

fn host_case(c: &Case, seed: u64) -> Host {
    let mut rng = TestRng::new(seed);
    let (m, n, k, lda) = (c.m, c.n, c.k, c.lda());
    // Entries ~U(-1, 1) and W scaled by 1/sqrt(K) keep outputs O(1); padding is NaN.
    let w_scale = 1.0 / (k as f32).sqrt();
    let mut a = vec![f32::NAN; m * lda];
    for row in a.chunks_mut(lda) {
        for x in &mut row[..k] {
            *x = rng.uniform(-1.0, 1.0);
        }
    }
    let mut w = vec![f32::NAN; n * lda];
    for row in w.chunks_mut(lda) {
        for x in &mut row[..k] {
            *x = rng.uniform(-1.0, 1.0) * w_scale;
        }
    }
    let a = round_bf16(&a);
    let w = round_bf16(&w);
    let bias = if c.bias {
        rng.uniform_vec(n, -0.5, 0.5)
    } else {
        vec![0.0; n]
    };
    let ldg = c.ldo();
    let gate = if c.residual() {
        rng.uniform_vec(c.gate_rows() * ldg, -1.5, 1.5)
    } else {
        Vec::new()
    };
    let residual0 = if c.residual() {
        rng.uniform_vec(c.out_len(), -1.0, 1.0)
    } else {
        Vec::new()
    };
    let mut v = vec![0.0f32; m * n];
    v.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let ar = &a[i * lda..i * lda + k];
        for (j, out) in row.iter_mut().enumerate() {
            let wr = &w[j * lda..j * lda + k];
            let dot: f64 = ar.iter().zip(wr).map(|(&x, &y)| x as f64 * y as f64).sum();
            *out = (dot + bias[j] as f64) as f32;
        }
    });
    let expect = match c.epi {
        Epilogue::BiasBf16 | Epilogue::BiasF32 => v.clone(),
        Epilogue::BiasGeluBf16 => v
            .iter()
            .map(|&x| fora::cuda::testing::gelu_tanh_f64(x as f64) as f32)
            .collect(),
        Epilogue::BiasGateResidual => (0..m * n)
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                gate[(i / c.rows_per_gate) * ldg + j] * v[idx]
            })
            .collect(),
    };
    Host {
        a,
        w,
        bias,
        gate,
        residual0,
        v,
        expect,
    }
}

/// Device buffers of one case.
struct Dev {
    a: CudaSlice<bf16>,
    w: CudaSlice<bf16>,
    bias: Option<CudaSlice<f32>>,
    /// The bias rounded to bf16 (cuBLASLt's fused bias with a bf16 output).
    bias16: Option<CudaSlice<bf16>>,
    gate: Option<CudaSlice<f32>>,
    out_bf16: Option<CudaSlice<bf16>>,
    out_f32: Option<CudaSlice<f32>>,
    cache: Option<CudaSlice<bf16>>,
}

impl Dev {
    fn new(gpu: &Gpu, c: &Case, h: &Host) -> Result<Dev> {
        let out_len = c.out_len();
        let out_f32 = c.epi.out_is_f32();
        Ok(Dev {
            a: gpu.upload(&to_bf16(&h.a), "A")?,
            w: gpu.upload(&to_bf16(&h.w), "W")?,
            bias: if c.bias {
                Some(gpu.upload(&h.bias, "bias")?)
            } else {
                None
            },
            bias16: if c.bias {
                Some(gpu.upload(&to_bf16(&h.bias), "bf16 bias")?)
            } else {
                None
            },
            gate: if c.residual() {
                Some(gpu.upload(&h.gate, "gate")?)
            } else {
                None
            },
            out_bf16: if out_f32 {
                None
            } else {
                Some(gpu.alloc_zeros(out_len, "out")?)
            },
            out_f32: if out_f32 {
                Some(gpu.alloc_zeros(out_len, "out")?)
            } else {
                None
            },
            cache: if c.residual() && c.cache {
                Some(gpu.alloc_zeros(out_len, "cache")?)
            } else {
                None
            },
        })
    }

    fn params(&self, c: &Case) -> GemmParams {
        GemmParams {
            a: dptr(&self.a),
            w: dptr(&self.w),
            bias: self.bias.as_ref().map_or(0, dptr),
            out: self
                .out_f32
                .as_ref()
                .map(dptr)
                .or(self.out_bf16.as_ref().map(dptr))
                .unwrap_or(0),
            cache: self.cache.as_ref().map_or(0, dptr),
            gate: self.gate.as_ref().map_or(0, dptr),
            m: c.m as i32,
            n: c.n as i32,
            k: c.k as i32,
            lda: c.lda() as i32,
            ldw: c.lda() as i32,
            ldo: c.ldo() as i32,
            ldc: c.ldo() as i32,
            ldg: c.ldo() as i32,
            rows_per_gate: c.rows_per_gate as i32,
            epilogue: c.epi.raw(),
        }
    }

    /// Poisons the outputs (the residual gets its initial values back).
    fn reset(&mut self, gpu: &Gpu, c: &Case, h: &Host) -> Result<()> {
        if let Some(o) = self.out_bf16.as_mut() {
            poison_bf16(gpu, o)?;
        }
        if let Some(o) = self.out_f32.as_mut() {
            if c.residual() {
                gpu.stream().memcpy_htod(&h.residual0, o)?;
            } else {
                poison_f32(gpu, o)?;
            }
        }
        if let Some(cache) = self.cache.as_mut() {
            poison_bf16(gpu, cache)?;
        }
        Ok(())
    }

    fn download(&self, gpu: &Gpu) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let out = match (&self.out_f32, &self.out_bf16) {
            (Some(o), _) => gpu.download(o)?,
            (None, Some(o)) => from_bf16(&gpu.download(o)?),
            (None, None) => unreachable!("every case has an output"),
        };
        let cache = match &self.cache {
            Some(cb) => Some(from_bf16(&gpu.download(cb)?)),
            None => None,
        };
        Ok((out, cache))
    }
}

/// The [m, n] region of a [rows, ld] buffer, and a check that the rest is untouched: NaN where
/// it was poisoned, else bit-equal to `initial`.
fn region_and_guard(
    what: &str,
    buf: &[f32],
    c: &Case,
    initial: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let ld = c.ldo();
    let mut region = Vec::with_capacity(c.m * c.n);
    for (idx, &x) in buf.iter().enumerate() {
        let (i, j) = (idx / ld, idx % ld);
        if i < c.m && j < c.n {
            region.push(x);
            continue;
        }
        let untouched = match initial {
            None => x.is_nan(),
            Some(init) => x.to_bits() == init[idx].to_bits(),
        };
        ensure!(
            untouched,
            "{what}: element ({i}, {j}) outside the [{}, {}] output was written ({x})",
            c.m,
            c.n
        );
    }
    Ok(region)
}

/// One way of running the GEMM.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    /// One tile variant, split-K picked by shape.
    Custom(Tile),
    /// One tile variant with this many split-K slices.
    CustomSplit(Tile, u32),
    CustomAuto,
    CublasLt,
    CublasLtUnfused,
    /// cuBLASLt with a bf16 copy of the bias where it refuses the f32 one (bf16 outputs).
    CublasLtBiasBf16,
    /// cuBLASLt with autotuned algorithms (the first run of a shape times the candidates).
    CublasLtTuned,
    /// One Hopper tile variant, split-K picked by shape.
    Wgmma(WgmmaTile),
    /// One Hopper tile variant with this many split-K slices.
    WgmmaSplit(WgmmaTile, u32),
    WgmmaAuto,
    /// One warp-specialized TMA tile variant, split-K picked by shape.
    Tma(TmaTile),
    /// One TMA tile variant with this many split-K slices.
    TmaSplit(TmaTile, u32),
    TmaAuto,
    /// `GemmImpl::TmaMulticast`'s automatic pick (`TmaTile::pick_multicast` where M has two
    /// row tiles or more).
    TmaMcAuto,
}

const VARIANTS: [Variant; 13] = [
    Variant::Custom(Tile::M128),
    Variant::Custom(Tile::M128K64),
    Variant::CustomSplit(Tile::M128K64, 2),
    Variant::Custom(Tile::M64),
    Variant::Custom(Tile::M32),
    // Forced split-K, including slices left without k-tiles when K is short.
    Variant::CustomSplit(Tile::M32, 3),
    Variant::CustomSplit(Tile::M64, 2),
    Variant::CustomSplit(Tile::M128, 3),
    Variant::CustomAuto,
    Variant::CublasLt,
    Variant::CublasLtUnfused,
    Variant::CublasLtBiasBf16,
    Variant::CublasLtTuned,
];

/// The Hopper wgmma kernels: every tile (each M x N edge case reaches every tile), forced
/// split-K (including slices left without k-tiles when K is short), the automatic pick, and
/// cuBLASLt as the cross-check. Forced slices x M x N must fit the split-K workspace
/// (`SPLITK_WORKSPACE`, 8 Mi f32): 3 x 512 x 4608 does.
const WGMMA_VARIANTS: [Variant; 8] = [
    Variant::Wgmma(WgmmaTile::M128N256),
    Variant::Wgmma(WgmmaTile::M128N128),
    Variant::Wgmma(WgmmaTile::M64N128),
    Variant::WgmmaSplit(WgmmaTile::M64N128, 3),
    Variant::WgmmaSplit(WgmmaTile::M128N256, 2),
    Variant::WgmmaSplit(WgmmaTile::M128N128, 3),
    Variant::WgmmaAuto,
    Variant::CublasLt,
];

/// [`WGMMA_VARIANTS`] without forced split-K, for M x N too large for the workspace.
const WGMMA_VARIANTS_NO_FORCED_SPLIT: [Variant; 5] = [
    Variant::Wgmma(WgmmaTile::M128N256),
    Variant::Wgmma(WgmmaTile::M128N128),
    Variant::Wgmma(WgmmaTile::M64N128),
    Variant::WgmmaAuto,
    Variant::CublasLt,
];

/// The warp-specialized TMA kernels, likewise: every tile (ping-pong and the cluster-multicast
/// tiles included), forced split-K, the automatic picks. In tests of their own (`gemm_tma_*`):
/// the device suite runs them in a process of their own, so that a fault in these never-run
/// kernels cannot poison the context of the other tests.
const TMA_VARIANTS: [Variant; 38] = [
    Variant::Tma(TmaTile::N128),
    Variant::Tma(TmaTile::N192),
    Variant::Tma(TmaTile::N256),
    Variant::Tma(TmaTile::M256N128),
    Variant::TmaSplit(TmaTile::M256N128, 2),
    Variant::Tma(TmaTile::StagedN128),
    Variant::Tma(TmaTile::StagedPingPong128),
    Variant::Tma(TmaTile::StagedM256N128),
    Variant::Tma(TmaTile::StagedN192),
    Variant::TmaSplit(TmaTile::StagedN192, 2),
    Variant::TmaSplit(TmaTile::StagedN128, 3),
    Variant::TmaSplit(TmaTile::StagedPingPong128, 2),
    Variant::TmaSplit(TmaTile::N128, 3),
    Variant::TmaSplit(TmaTile::N192, 2),
    Variant::TmaSplit(TmaTile::N256, 3),
    Variant::Tma(TmaTile::PingPong128),
    Variant::TmaSplit(TmaTile::PingPong128, 2),
    Variant::Tma(TmaTile::Mc128),
    Variant::Tma(TmaTile::Mc192),
    Variant::Tma(TmaTile::Mc256),
    Variant::TmaSplit(TmaTile::Mc128, 3),
    Variant::TmaSplit(TmaTile::Mc192, 2),
    Variant::Tma(TmaTile::McPingPong128),
    Variant::TmaSplit(TmaTile::McPingPong128, 2),
    Variant::Tma(TmaTile::C4x1N128),
    Variant::Tma(TmaTile::C4x1N192),
    Variant::Tma(TmaTile::C4x2N128),
    Variant::Tma(TmaTile::C4x2N192),
    Variant::TmaSplit(TmaTile::C4x2N128, 3),
    Variant::TmaSplit(TmaTile::C4x1N192, 2),
    Variant::Tma(TmaTile::K2N128),
    Variant::Tma(TmaTile::K3N128),
    Variant::Tma(TmaTile::K4N128),
    Variant::TmaSplit(TmaTile::K3N128, 2),
    Variant::TmaSplit(TmaTile::K2N128, 3),
    Variant::TmaAuto,
    Variant::TmaMcAuto,
    Variant::CublasLt,
];

/// [`TMA_VARIANTS`] without forced split-K.
const TMA_VARIANTS_NO_FORCED_SPLIT: [Variant; 23] = [
    Variant::Tma(TmaTile::N128),
    Variant::Tma(TmaTile::N192),
    Variant::Tma(TmaTile::N256),
    Variant::Tma(TmaTile::M256N128),
    Variant::Tma(TmaTile::StagedN128),
    Variant::Tma(TmaTile::StagedPingPong128),
    Variant::Tma(TmaTile::StagedM256N128),
    Variant::Tma(TmaTile::StagedN192),
    Variant::Tma(TmaTile::PingPong128),
    Variant::Tma(TmaTile::Mc128),
    Variant::Tma(TmaTile::Mc192),
    Variant::Tma(TmaTile::Mc256),
    Variant::Tma(TmaTile::McPingPong128),
    Variant::Tma(TmaTile::C4x1N128),
    Variant::Tma(TmaTile::C4x1N192),
    Variant::Tma(TmaTile::C4x2N128),
    Variant::Tma(TmaTile::C4x2N192),
    Variant::Tma(TmaTile::K2N128),
    Variant::Tma(TmaTile::K3N128),
    Variant::Tma(TmaTile::K4N128),
    Variant::TmaAuto,
    Variant::TmaMcAuto,
    Variant::CublasLt,
];

struct Engines {
    custom: Gemm,
    lt: Gemm,
    lt_tuned: Gemm,
    /// Built only on a Hopper device (the wgmma tests).
    wgmma: Option<Gemm>,
    /// The TMA kernels, likewise.
    tma: Option<Gemm>,
    /// The TMA kernels with the multicast pick, likewise.
    tma_mc: Option<Gemm>,
}

impl Engines {
    fn new(gpu: &Gpu, max_mn: usize) -> Result<Engines> {
        Ok(Engines {
            custom: Gemm::new(gpu, GemmImpl::Custom, 0)?,
            lt: Gemm::new(gpu, GemmImpl::CublasLt, max_mn)?,
            lt_tuned: {
                let g = Gemm::new(gpu, GemmImpl::CublasLt, max_mn)?;
                g.set_lt_autotune(true);
                g
            },
            wgmma: None,
            tma: None,
            tma_mc: None,
        })
    }

    /// With the Hopper engines: wgmma, and with `tma` the TMA ones (only the tests that run
    /// them build them, so that a TMA kernel that fails to load fails only those).
    fn with_wgmma(gpu: &Gpu, max_mn: usize, tma: bool) -> Result<Engines> {
        let engine = |imp| tma.then(|| Gemm::new(gpu, imp, 0)).transpose();
        Ok(Engines {
            wgmma: Some(Gemm::new(gpu, GemmImpl::Wgmma, 0)?),
            tma: engine(GemmImpl::Tma)?,
            tma_mc: engine(GemmImpl::TmaMulticast)?,
            ..Engines::new(gpu, max_mn)?
        })
    }

    fn tma(&self) -> Result<&Gemm> {
        self.tma
            .as_ref()
            .context("test bug: a TMA variant on engines built without the TMA GEMM")
    }

    fn wgmma(&self) -> Result<&Gemm> {
        self.wgmma
            .as_ref()
            .context("test bug: a wgmma variant on engines built without the wgmma GEMM")
    }

    /// Runs `p` through variant `v`; `bias16` is the bf16 copy of the bias (0: none).
    fn run(&self, gpu: &Gpu, v: Variant, p: &GemmParams, bias16: u64) -> Result<()> {
        match v {
            Variant::Custom(t) => unsafe { self.custom.run_custom(gpu, p, Some(t)) },
            Variant::CustomSplit(t, s) => unsafe {
                self.custom.run_custom_split(gpu, p, Some(t), Some(s))
            },
            Variant::CustomAuto => unsafe { self.custom.run(gpu, p) },
            Variant::CublasLt => unsafe { self.lt.run(gpu, p) },
            Variant::CublasLtUnfused => unsafe { self.lt.run_cublaslt_unfused(gpu, p) },
            Variant::CublasLtBiasBf16 => unsafe { self.lt.run_with_bias_bf16(gpu, p, bias16) },
            Variant::CublasLtTuned => unsafe { self.lt_tuned.run(gpu, p) },
            Variant::Wgmma(t) => unsafe { self.wgmma()?.run_wgmma(gpu, p, Some(t), None) },
            Variant::WgmmaSplit(t, s) => unsafe {
                self.wgmma()?.run_wgmma(gpu, p, Some(t), Some(s))
            },
            Variant::WgmmaAuto => unsafe { self.wgmma()?.run(gpu, p) },
            Variant::Tma(t) => unsafe { self.tma()?.run_tma(gpu, p, Some(t), None) },
            Variant::TmaSplit(t, s) => unsafe { self.tma()?.run_tma(gpu, p, Some(t), Some(s)) },
            Variant::TmaAuto => unsafe { self.tma()?.run(gpu, p) },
            Variant::TmaMcAuto => unsafe {
                self.tma_mc
                    .as_ref()
                    .context("test bug: a TMA variant on engines built without the TMA GEMM")?
                    .run(gpu, p)
            },
        }
    }
}

/// Runs one case through every variant; returns the failures (empty = pass).
fn run_case(gpu: &Gpu, eng: &Engines, variants: &[Variant], c: &Case, seed: u64) -> Vec<String> {
    match run_case_inner(gpu, eng, variants, c, seed) {
        Ok(failures) => failures,
        Err(e) => vec![format!("{}: setup failed: {e:#}", c.name)],
    }
}

fn run_case_inner(
    gpu: &Gpu,
    eng: &Engines,
    variants: &[Variant],
    c: &Case,
    seed: u64,
) -> Result<Vec<String>> {
    let h = host_case(c, seed);
    let mut dev = Dev::new(gpu, c, &h)?;
    let p = dev.params(c);
    let mut failures = Vec::new();
    // (variant, epilogue region, cache region) of the variants that passed, for cross-checks.
    let mut results: Vec<(Variant, Vec<f32>, Option<Vec<f32>>)> = Vec::new();
    for &v in variants {
        let what = format!(
            "{} {:?} M={} N={} K={} {:?}",
            c.name, c.epi, c.m, c.n, c.k, v
        );
        let outcome = (|| -> Result<(Vec<f32>, Option<Vec<f32>>)> {
            dev.reset(gpu, c, &h)?;
            eng.run(gpu, v, &p, dev.bias16.as_ref().map_or(0, dptr))?;
            gpu.synchronize()?;
            let (out, cache) = dev.download(gpu)?;
            let initial = c.residual().then_some(h.residual0.as_slice());
            let mut region = region_and_guard(&format!("{what} out"), &out, c, initial)?;
            if c.residual() {
                // Check what the epilogue added: the residual itself is dominated by its initial
                // values and would hide errors in gate * v.
                let ld = c.ldo();
                for (idx, r) in region.iter_mut().enumerate() {
                    let (i, j) = (idx / c.n, idx % c.n);
                    *r -= h.residual0[i * ld + j];
                }
            }
            check_close(&format!("{what} out"), &region, &h.expect, TOL)?;
            let cache_region = match cache {
                Some(cb) => {
                    let reg = region_and_guard(&format!("{what} cache"), &cb, c, None)?;
                    check_close(&format!("{what} cache"), &reg, &h.v, TOL)?;
                    Some(reg)
                }
                None => None,
            };
            Ok((region, cache_region))
        })();
        match outcome {
            Ok((region, cache)) => results.push((v, region, cache)),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    // The automatic pick (custom or wgmma) vs cuBLASLt on the same inputs.
    let custom = results.iter().find(|r| {
        matches!(
            r.0,
            Variant::CustomAuto | Variant::WgmmaAuto | Variant::TmaAuto | Variant::TmaMcAuto
        )
    });
    let lt = results.iter().find(|r| r.0 == Variant::CublasLt);
    if let (Some(cu), Some(lt)) = (custom, lt) {
        let err = rel_l2(&cu.1, &lt.1);
        println!(
            "{} {:?}: {:?} vs cuBLASLt rel_l2 = {err:.3e}",
            c.name, c.epi, cu.0
        );
        if err.is_nan() || err > TOL {
            failures.push(format!(
                "{} {:?}: {:?} vs cuBLASLt rel_l2 {err:.3e} exceeds {TOL:.0e}",
                c.name, c.epi, cu.0
            ));
        }
        if let (Some(cc), Some(lc)) = (&cu.2, &lt.2) {
            let err = rel_l2(cc, lc);
            if err.is_nan() || err > TOL {
                failures.push(format!(
                    "{} {:?}: cache {:?} vs cuBLASLt rel_l2 {err:.3e} exceeds {TOL:.0e}",
                    c.name, c.epi, cu.0
                ));
            }
        }
    }
    Ok(failures)
}

fn run_cases(test: &str, cases: &[Case]) {
    let Some(gpu) = test_gpu(test) else {
        return;
    };
    let max_mn = cases.iter().map(|c| c.m * c.n).max().unwrap_or(1);
    let eng = Engines::new(&gpu, max_mn).expect("GEMM engines");
    check_cases(test, &gpu, &eng, &VARIANTS, cases);
}

/// The device of a wgmma test: None (after printing SKIP) without a device, or when it is not a
/// Hopper GPU (the wgmma kernels exist only for sm_90a).
fn hopper_gpu(test: &str) -> Option<Gpu> {
    let gpu = test_gpu(test)?;
    let (major, minor) = gpu.compute_capability();
    if major != 9 {
        println!("SKIP {test}: not a Hopper GPU (compute capability {major}.{minor})");
        return None;
    }
    Some(gpu)
}

/// Runs `body` on a Hopper GPU (SKIP elsewhere) and fails with every failure it returns, or
/// with the error that stopped it.
fn run_on_hopper(test: &str, body: impl FnOnce(&Gpu) -> Result<Vec<String>>) {
    let Some(gpu) = hopper_gpu(test) else {
        return;
    };
    let failures = body(&gpu).unwrap_or_else(|e| vec![format!("{test}: setup failed: {e:#}")]);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn run_wgmma_cases(test: &str, cases: &[Case], variants: &[Variant]) {
    let Some(gpu) = hopper_gpu(test) else {
        return;
    };
    let max_mn = cases.iter().map(|c| c.m * c.n).max().unwrap_or(1);
    let tma = variants.iter().any(|v| {
        matches!(
            v,
            Variant::Tma(_) | Variant::TmaSplit(..) | Variant::TmaAuto | Variant::TmaMcAuto
        )
    });
    let eng = Engines::with_wgmma(&gpu, max_mn, tma).expect("GEMM engines");
    check_cases(test, &gpu, &eng, variants, cases);
}

/// Whether `v` runs cuBLASLt's kernels.
fn is_cublaslt(v: Variant) -> bool {
    matches!(
        v,
        Variant::CublasLt
            | Variant::CublasLtUnfused
            | Variant::CublasLtBiasBf16
            | Variant::CublasLtTuned
    )
}

fn check_cases(test: &str, gpu: &Gpu, eng: &Engines, variants: &[Variant], cases: &[Case]) {
    // FORA_TEST_SKIP_CUBLASLT=1 leaves out the cuBLASLt variants, so that compute-sanitizer's
    // racecheck sees only our kernels (it reports hazards in, or crashes on, cuBLASLt's own);
    // every variant is still checked against the f64 product.
    let skip_lt = std::env::var("FORA_TEST_SKIP_CUBLASLT").is_ok_and(|v| v.trim() == "1");
    if skip_lt {
        println!("{test}: cuBLASLt variants left out (FORA_TEST_SKIP_CUBLASLT=1)");
    }
    let variants: Vec<Variant> = variants
        .iter()
        .copied()
        .filter(|&v| !(skip_lt && is_cublaslt(v)))
        .collect();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        failures.extend(run_case(gpu, eng, &variants, c, 0x6e11_0000 + i as u64));
    }
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{test}: {} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn case(name: &'static str, m: usize, n: usize, k: usize, epi: Epilogue) -> Case {
    Case {
        name,
        m,
        n,
        k,
        epi,
        bias: true,
        cache: epi == Epilogue::BiasGateResidual,
        rows_per_gate: 256,
        pad: 8,
    }
}

/// A DiT model's linear layers at `rows` tokens x `d` width, and its adaLN table at `batch` rows.
fn dit_cases(tag: &'static str, d: usize, depth: usize, rows: usize, batch: usize) -> Vec<Case> {
    let tokens = rows / batch;
    let mut v = vec![
        case(tag, rows, 3 * d, d, Epilogue::BiasBf16), // qkv
        case(tag, rows, d, d, Epilogue::BiasGateResidual), // proj -> cache + gate + residual
        case(tag, rows, 4 * d, d, Epilogue::BiasGeluBf16), // fc1 + GELU
        case(tag, rows, d, 4 * d, Epilogue::BiasGateResidual), // fc2
        case(tag, rows, 32, d, Epilogue::BiasF32),     // final linear (p*p*out_ch = 32)
        case(tag, batch, d, 256, Epilogue::BiasBf16),  // t-MLP first linear
        case(tag, batch, depth * 6 * d + 2 * d, d, Epilogue::BiasF32), // all adaLN tables
    ];
    for c in &mut v {
        c.rows_per_gate = tokens;
    }
    // fc2 without the cache (reuse-free path of a computing step that does not cache).
    v[3].cache = false;
    v
}

#[test]
fn gemm_dit_xl2_shapes() {
    run_cases(
        "gemm_dit_xl2_shapes",
        &dit_cases("DiT-XL/2", 1152, 28, 512, 2),
    );
}

#[test]
fn gemm_dit_s2_shapes() {
    run_cases("gemm_dit_s2_shapes", &dit_cases("DiT-S/2", 384, 12, 512, 2));
}

#[test]
fn gemm_tiny_m() {
    run_cases("gemm_tiny_m", &tiny_m_cases());
}

fn tiny_m_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for m in [1, 2, 7] {
        for epi in Epilogue::ALL {
            let mut c = case("tiny M", m, 1152, 1152, epi);
            c.rows_per_gate = 1;
            c.pad = 3;
            cases.push(c);
        }
    }
    cases
}

#[test]
fn gemm_odd_shapes() {
    run_cases("gemm_odd_shapes", &odd_cases());
}

fn odd_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for epi in Epilogue::ALL {
        for (m, n, k, pad, rows_per_gate) in [
            (77, 40, 24, 0, 7),
            (300, 1000, 136, 5, 77),
            (129, 130, 264, 1, 128),
            (1000, 77, 8, 0, 300),
            (33, 8, 1160, 2, 1),
            (65, 129, 40, 7, 64),
        ] {
            let mut c = case("odd", m, n, k, epi);
            c.pad = pad;
            c.rows_per_gate = rows_per_gate;
            cases.push(c);
        }
    }
    // No bias, and the residual epilogue without a cache.
    for epi in Epilogue::ALL {
        let mut c = case("odd, no bias", 130, 72, 64, epi);
        c.bias = false;
        c.cache = false;
        c.rows_per_gate = 13;
        cases.push(c);
    }
    cases
}

/// The shape sets every Hopper GEMM family runs.
#[derive(Clone, Copy)]
enum HopperShapes {
    /// One image + CFG of DiT-XL/2 (M = 512).
    Xl2,
    /// Eight images of 256 tokens: the automatic pick takes 128-row tiles with full grids.
    Xl2Rows2048,
    S2,
    TinyM,
    Odd,
}

/// Runs `shapes` through `variants` on a Hopper (SKIP elsewhere); the 2048-row set with
/// `no_split` instead (forced slices of it would not fit the workspace).
fn run_hopper(test: &str, shapes: HopperShapes, variants: &[Variant], no_split: &[Variant]) {
    let (cases, variants) = match shapes {
        HopperShapes::Xl2 => (dit_cases("DiT-XL/2", 1152, 28, 512, 2), variants),
        HopperShapes::Xl2Rows2048 => (dit_cases("DiT-XL/2 x8", 1152, 28, 2048, 8), no_split),
        HopperShapes::S2 => (dit_cases("DiT-S/2", 384, 12, 512, 2), variants),
        HopperShapes::TinyM => (tiny_m_cases(), variants),
        HopperShapes::Odd => (odd_cases(), variants),
    };
    run_wgmma_cases(test, &cases, variants);
}

fn run_wgmma_family(test: &str, shapes: HopperShapes) {
    run_hopper(
        test,
        shapes,
        &WGMMA_VARIANTS,
        &WGMMA_VARIANTS_NO_FORCED_SPLIT,
    );
}

fn run_tma_family(test: &str, shapes: HopperShapes) {
    run_hopper(test, shapes, &TMA_VARIANTS, &TMA_VARIANTS_NO_FORCED_SPLIT);
}

#[test]
fn gemm_wgmma_dit_xl2_shapes() {
    run_wgmma_family("gemm_wgmma_dit_xl2_shapes", HopperShapes::Xl2);
}

#[test]
fn gemm_wgmma_dit_xl2_shapes_2048_rows() {
    run_wgmma_family(
        "gemm_wgmma_dit_xl2_shapes_2048_rows",
        HopperShapes::Xl2Rows2048,
    );
}

#[test]
fn gemm_wgmma_dit_s2_shapes() {
    run_wgmma_family("gemm_wgmma_dit_s2_shapes", HopperShapes::S2);
}

#[test]
fn gemm_wgmma_tiny_m() {
    run_wgmma_family("gemm_wgmma_tiny_m", HopperShapes::TinyM);
}

#[test]
fn gemm_wgmma_odd_shapes() {
    run_wgmma_family("gemm_wgmma_odd_shapes", HopperShapes::Odd);
}

#[test]
fn gemm_tma_dit_xl2_shapes() {
    run_tma_family("gemm_tma_dit_xl2_shapes", HopperShapes::Xl2);
}

#[test]
fn gemm_tma_dit_xl2_shapes_2048_rows() {
    run_tma_family(
        "gemm_tma_dit_xl2_shapes_2048_rows",
        HopperShapes::Xl2Rows2048,
    );
}

#[test]
fn gemm_tma_dit_s2_shapes() {
    run_tma_family("gemm_tma_dit_s2_shapes", HopperShapes::S2);
}

#[test]
fn gemm_tma_tiny_m() {
    run_tma_family("gemm_tma_tiny_m", HopperShapes::TinyM);
}

#[test]
fn gemm_tma_odd_shapes() {
    run_tma_family("gemm_tma_odd_shapes", HopperShapes::Odd);
}

/// The wgmma implementation is refused with a clear error off Hopper, and on Hopper its
/// launchers refuse bad parameters before touching the device, and a non-wgmma `Gemm` refuses
/// the wgmma entry point.
#[test]
fn gemm_wgmma_refusals() {
    let Some(gpu) = test_gpu("gemm_wgmma_refusals") else {
        return;
    };
    let (major, minor) = gpu.compute_capability();
    if major != 9 {
        for imp in [GemmImpl::Wgmma, GemmImpl::Tma, GemmImpl::TmaMulticast] {
            let err = Gemm::new(&gpu, imp, 0).expect_err("Hopper kernels off Hopper");
            let err = format!("{err:#}");
            assert!(
                err.contains("Hopper") && err.contains(&format!("{major}.{minor}")),
                "{err}"
            );
        }
        return;
    }
    let eng = Engines::with_wgmma(&gpu, 64 * 64, true).expect("GEMM engines");
    for (what, p, needle) in &bad_params() {
        for v in WGMMA_VARIANTS.into_iter().chain(TMA_VARIANTS) {
            let err = match eng.run(&gpu, v, p, 0) {
                Ok(()) => panic!("{what}: {v:?} launched"),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains(needle),
                "{what} {v:?}: error {err:?} does not mention {needle:?}"
            );
        }
    }
    let c = case("refusal", 64, 64, 64, Epilogue::BiasBf16);
    let h = host_case(&c, 11);
    let dev = Dev::new(&gpu, &c, &h).expect("buffers");
    let p = dev.params(&c);
    let err = unsafe { eng.custom.run_wgmma(&gpu, &p, None, None) }
        .expect_err("a custom Gemm has no wgmma kernels");
    assert!(format!("{err:#}").contains("wgmma"), "{err:#}");
    let err = unsafe {
        eng.wgmma()
            .expect("built")
            .run_wgmma(&gpu, &p, Some(WgmmaTile::M64N128), Some(65))
    }
    .expect_err("65 slices");
    assert!(format!("{err:#}").contains("split-K"), "{err:#}");
    let err = unsafe { eng.wgmma().expect("built").run_tma(&gpu, &p, None, None) }
        .expect_err("a wgmma Gemm has no TMA kernels");
    assert!(format!("{err:#}").contains("TMA"), "{err:#}");
    let err = unsafe {
        eng.tma()
            .expect("built")
            .run_tma(&gpu, &p, Some(TmaTile::N192), Some(65))
    }
    .expect_err("65 slices");
    assert!(format!("{err:#}").contains("split-K"), "{err:#}");
    gpu.synchronize().expect("nothing was launched");
}

/// Parameters that would make the kernel read or write out of bounds are clear errors.
#[test]
fn gemm_rejects_bad_params() {
    validate(&good_params()).expect("the reference parameters are valid");
    let bad = bad_params();
    for (what, p, needle) in &bad {
        let err = match validate(p) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(needle),
            "{what}: error {err:?} does not mention {needle:?}"
        );
    }

    // The launchers refuse them too, before touching the device; and the cuBLASLt scratch
    // bound is enforced.
    let Some(gpu) = test_gpu("gemm_rejects_bad_params") else {
        return;
    };
    let eng = Engines::new(&gpu, 64 * 64).expect("GEMM engines");
    for (what, p, needle) in &bad {
        for v in VARIANTS {
            let err = match eng.run(&gpu, v, p, 0) {
                Ok(()) => panic!("{what}: {v:?} launched"),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains(needle),
                "{what} {v:?}: error {err:?} does not mention {needle:?}"
            );
        }
    }
    let c = case("scratch", 65, 64, 64, Epilogue::BiasGateResidual);
    let h = host_case(&c, 7);
    let dev = Dev::new(&gpu, &c, &h).expect("buffers");
    let err = unsafe { eng.lt.run_cublaslt_unfused(&gpu, &dev.params(&c)) }
        .expect_err("M*N beyond the scratch must be refused");
    assert!(format!("{err:#}").contains("scratch"), "{err:#}");
    let err = unsafe { eng.custom.run_cublaslt(&gpu, &dev.params(&c)) }
        .expect_err("a custom Gemm has no cuBLASLt");
    assert!(format!("{err:#}").contains("custom"), "{err:#}");
    gpu.synchronize().expect("nothing was launched");
}

/// Valid parameters (fake device addresses) that [`bad_params`] breaks one field at a time.
fn good_params() -> GemmParams {
    GemmParams {
        a: 0x1000,
        w: 0x2000,
        bias: 0x3000,
        out: 0x4000,
        cache: 0x5000,
        gate: 0x6000,
        m: 64,
        n: 96,
        k: 128,
        lda: 128,
        ldw: 136,
        ldo: 97,
        ldc: 96,
        ldg: 100,
        rows_per_gate: 16,
        epilogue: Epilogue::BiasGateResidual.raw(),
    }
}

/// Parameters that would make a kernel read or write out of bounds, with a word the error must
/// contain.
fn bad_params() -> Vec<(&'static str, GemmParams, &'static str)> {
    let good = good_params();
    vec![
        (
            "K % 8",
            GemmParams {
                k: 100,
                lda: 104,
                ldw: 104,
                ..good
            },
            "multiple of 8",
        ),
        ("zero M", GemmParams { m: 0, ..good }, "positive"),
        ("zero N", GemmParams { n: 0, ..good }, "positive"),
        ("negative K", GemmParams { k: -8, ..good }, "positive"),
        ("lda < K", GemmParams { lda: 120, ..good }, "lda"),
        ("lda % 8", GemmParams { lda: 130, ..good }, "lda"),
        ("ldw % 8", GemmParams { ldw: 129, ..good }, "ldw"),
        ("ldo < N", GemmParams { ldo: 95, ..good }, "ldo"),
        ("ldc < N", GemmParams { ldc: 90, ..good }, "ldc"),
        ("ldg < N", GemmParams { ldg: 10, ..good }, "ldg"),
        ("null A", GemmParams { a: 0, ..good }, "null pointer a"),
        ("null W", GemmParams { w: 0, ..good }, "null pointer w"),
        (
            "null out",
            GemmParams { out: 0, ..good },
            "null pointer out",
        ),
        ("null gate", GemmParams { gate: 0, ..good }, "gate"),
        ("misaligned A", GemmParams { a: 0x1008, ..good }, "aligned"),
        ("misaligned W", GemmParams { w: 0x2002, ..good }, "aligned"),
        (
            "misaligned out",
            GemmParams {
                out: 0x4004,
                ..good
            },
            "aligned",
        ),
        (
            "misaligned bias",
            GemmParams {
                bias: 0x3002,
                ..good
            },
            "aligned",
        ),
        (
            "rows_per_gate 0",
            GemmParams {
                rows_per_gate: 0,
                ..good
            },
            "rows_per_gate",
        ),
        (
            "epilogue 7",
            GemmParams {
                epilogue: 7,
                ..good
            },
            "unknown epilogue",
        ),
        (
            "cache without residual",
            GemmParams {
                epilogue: Epilogue::BiasBf16.raw(),
                ..good
            },
            "cache",
        ),
        (
            "M too large",
            GemmParams {
                m: 65535 * 32 + 1,
                ..good
            },
            "too large",
        ),
    ]
}

/// Under programmatic launches (`FORA_PDL=1`) the TMA GEMMs load their first k-tiles of W
/// before they wait for the kernel before them, and A only after it. Here that kernel is a copy
/// of a 64 MiB buffer whose last rows become A (poisoned with NaN before it), so it writes A
/// tens of microseconds after the GEMM may start: a GEMM that read A before its wait would read
/// NaN. Every TMA tile at one image + CFG's proj shape (M = 512), each against the CPU twin.
#[test]
fn gemm_tma_programmatic_launch_waits_for_a() {
    use fora::cuda::bandwidth::bandwidth_copy;
    use fora::cuda::params::BandwidthParams;
    const TEST: &str = "gemm_tma_programmatic_launch_waits_for_a";
    run_on_hopper(TEST, |gpu| {
        let c = case("pdl", 512, 1152, 1152, Epilogue::BiasBf16);
        let h = host_case(&c, 23);
        let mut dev = Dev::new(gpu, &c, &h)?;
        let eng = Gemm::new(gpu, GemmImpl::Tma, 0)?;
        // The copy's source: NaN, then A in its last m * lda elements.
        let len = 32usize << 20;
        let a = to_bf16(&h.a);
        let mut host = vec![bf16::NAN; len];
        host[len - a.len()..].copy_from_slice(&a);
        let src = gpu.upload(&host, "copy source")?;
        let mut dst = gpu.alloc_zeros::<bf16>(len, "copy destination")?;
        let a_offset = 2 * (len - a.len()) as u64;
        ensure!(
            a_offset.is_multiple_of(16),
            "test bug: A must start 16-byte aligned"
        );
        let p = GemmParams {
            a: dptr(&dst) + a_offset,
            ..dev.params(&c)
        };
        let copy = BandwidthParams {
            src: dptr(&src),
            dst: dptr(&dst),
            chunks: (2 * len / 16) as i64,
            out_words: 0,
            mask: -1,
        };
        let mut failures = Vec::new();
        for tile in TmaTile::ALL {
            poison_bf16(gpu, &mut dst)?;
            dev.reset(gpu, &c, &h)?;
            ensure!(
                gpu.set_programmatic_launch(true),
                "programmatic launches refused on a Hopper GPU"
            );
            let launched = unsafe { bandwidth_copy(gpu, &copy) }
                .and_then(|()| unsafe { eng.run_tma(gpu, &p, Some(tile), None) });
            gpu.set_programmatic_launch(false);
            launched?;
            let (out, _) = dev.download(gpu)?;
            let what = format!("{TEST} {tile:?}");
            if let Err(e) = region_and_guard(&what, &out, &c, None)
                .and_then(|region| check_close(&what, &region, &h.expect, TOL))
            {
                failures.push(format!("{e:#}"));
            }
        }
        Ok(failures)
    });
}

/// `FORA_TMA_TILES` under cuBLASLt (the default path) on a Hopper: the shapes it names run on
/// the forced TMA tile, here proj and fc2 of one image + CFG (M = 512) on the cluster split-K
/// tile, through `run` (gated residual into f32 with the cache) and `run_with_bias_bf16` (the
/// bf16 output the fused LayerNorm path asks for), each against the CPU twin; qkv, a shape
/// not named, and M <= 64 stay on cuBLASLt.
#[test]
fn gemm_tma_routed_under_cublaslt() {
    const TEST: &str = "gemm_tma_routed_under_cublaslt";
    run_on_hopper(TEST, |gpu| {
        let overrides = "1152x1152=k3-128x128,1152x4608=k3-128x128".parse()?;
        let eng =
            Gemm::new(gpu, GemmImpl::CublasLt, 512 * 4608)?.with_tma_overrides(gpu, overrides)?;
        ensure!(
            eng.lt_routed_tma_plan(512, 1152, 4608) == Some((TmaTile::K3N128, 1)),
            "fc2 is not routed to the cluster split-K tile"
        );
        ensure!(
            eng.lt_routed_tma_plan(512, 3456, 1152).is_none()
                && eng.lt_routed_tma_plan(64, 1152, 1152).is_none(),
            "a shape not named, or M <= 64, was routed"
        );
        // The forced tile run directly: the routed runs must give its bits (the CPU bound
        // alone would pass cuBLASLt itself).
        let direct = Gemm::new(gpu, GemmImpl::Tma, 512 * 4608)?;
        let mut failures = Vec::new();
        for (name, k) in [("proj", 1152), ("fc2", 4608)] {
            for epi in [Epilogue::BiasGateResidual, Epilogue::BiasBf16] {
                let c = case(name, 512, 1152, k, epi);
                let h = host_case(&c, 31);
                let mut dev = Dev::new(gpu, &c, &h)?;
                dev.reset(gpu, &c, &h)?;
                let p = dev.params(&c);
                let what = format!("{TEST} {name} {epi:?}");
                let checked = (|| -> Result<()> {
                    if epi == Epilogue::BiasBf16 {
                        // The routed kernel takes the f32 bias; the bf16 copy is cuBLASLt's.
                        let bias16 = gpu.upload(&to_bf16(&h.bias), "bf16 bias")?;
                        unsafe { eng.run_with_bias_bf16(gpu, &p, dptr(&bias16)) }?;
                    } else {
                        unsafe { eng.run(gpu, &p) }?;
                    }
                    gpu.synchronize()?;
                    let (out, cache) = dev.download(gpu)?;
                    let initial = c.residual().then_some(h.residual0.as_slice());
                    let mut region = region_and_guard(&format!("{what} out"), &out, &c, initial)?;
                    if c.residual() {
                        // What the epilogue added (gate * v): the residual would hide errors.
                        for (idx, r) in region.iter_mut().enumerate() {
                            *r -= h.residual0[(idx / c.n) * c.ldo() + idx % c.n];
                        }
                    }
                    check_close(&format!("{what} out"), &region, &h.expect, TOL)?;
                    if let Some(cache) = &cache {
                        let reg = region_and_guard(&format!("{what} cache"), cache, &c, None)?;
                        check_close(&format!("{what} cache"), &reg, &h.v, TOL)?;
                    }
                    dev.reset(gpu, &c, &h)?;
                    unsafe { direct.run_tma(gpu, &p, Some(TmaTile::K3N128), Some(1)) }?;
                    gpu.synchronize()?;
                    let (forced_out, forced_cache) = dev.download(gpu)?;
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    ensure!(
                        bits(&forced_out) == bits(&out)
                            && forced_cache.as_deref().map(bits) == cache.as_deref().map(bits),
                        "{what}: the routed run's bits are not those of the forced tile's run \
                         (not routed?)"
                    );
                    Ok(())
                })();
                if let Err(e) = checked {
                    failures.push(format!("{e:#}"));
                }
            }
        }
        Ok(failures)
    });
}
