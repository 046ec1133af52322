//! The GEMM launcher: `out[M, N] = epilogue(A[M, K] @ W[N, K]^T + bias[N])` with bf16 operands and
//! f32 accumulation, by the hand-written tensor-core kernels of `kernels/gemm.cu` (mma.sync, any
//! sm_80+ device), the Hopper wgmma kernels of `kernels/gemm_sm90.cu` (compute capability 9.x
//! only, opt-in), or cuBLASLt (the default, the reference and fallback), chosen at run time
//! ([`GemmImpl`], env `FORA_GEMM`).
//!
//! Epilogues ([`Epilogue`], `GemmParams::epilogue`): bias -> bf16; bias + tanh-GELU -> bf16;
//! bias -> f32; and bias + FORA cache store + gate + residual add:
//! `v = acc + bias; cache[m, n] = bf16(v) (if cache != 0); residual[m, n] += gate[(m / rows_per_gate) * ldg + n] * v`.
//!
//! Requirements (checked, each a clear error): M, N, K > 0; K % 8 == 0; lda, ldw multiples of 8
//! and >= K, A and W 16-byte aligned (every 8-element chunk is one 16-byte async copy); ldo (and
//! ldc, ldg) >= N; out and cache 8-byte aligned; bias and gate 4-byte aligned.
//!
//! Nothing here allocates per call: the cuBLASLt path's f32 scratch (for the epilogues cuBLASLt
//! cannot do) is sized at construction, so launches can be captured in CUDA graphs.

use super::cublaslt::{CublasLt, LtBatch, LtEpilogue, LtMatmul, LtOutput, LtRun};
use super::device::{dptr, ensure_hopper, Gpu, KernelLauncher, TmaTensor2d};
use super::params::{
    GemmEpilogueParams, GemmParams, GemmTmaParams, FORA_EPI_BIAS_BF16, FORA_EPI_BIAS_F32,
    FORA_EPI_BIAS_GATE_RESIDUAL, FORA_EPI_BIAS_GELU_BF16, FORA_EPI_PARTIAL_F32,
};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice};
use std::str::FromStr;

pub use super::tma_tiles::{TmaOverride, TmaOverrides, TmaTile};

/// Which GEMM implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmImpl {
    /// The kernels of `kernels/gemm.cu`, epilogue fused.
    Custom,
    /// cuBLASLt (its bias / GELU-bias epilogues where it has them) plus the stand-alone
    /// epilogue kernel for the rest.
    CublasLt,
    /// The Hopper kernels of `kernels/gemm_sm90.cu` (wgmma, epilogue fused); refused by
    /// [`Gemm::new`] on a device whose compute capability is not 9.x.
    Wgmma,
    /// The warp-specialized Hopper kernels of `kernels/gemm_sm90.cu` (`gemm_tma_*`: TMA loads,
    /// mbarrier pipeline, wgmma, persistent grid, epilogue fused); 9.x only, like `Wgmma`.
    Tma,
    /// `Tma` with clusters of CTAs that share (multicast) the operand tiles
    /// ([`TmaTile::pick_multicast`]: two along M sharing W, four along M sharing W, or four
    /// by two also sharing A), where M has at least two row tiles; 9.x only. For the L2 bound
    /// of a TMA tile (bench's `l2_tile_rooflines`). Correct on an H200 (session 18), and no
    /// faster than [`GemmImpl::Tma`]: L2 does not bound those tiles.
    TmaMulticast,
}

impl FromStr for GemmImpl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<GemmImpl> {
        match s.trim().to_ascii_lowercase().as_str() {
            "custom" => Ok(GemmImpl::Custom),
            "cublaslt" | "cublas" => Ok(GemmImpl::CublasLt),
            "wgmma" => Ok(GemmImpl::Wgmma),
            "tma" => Ok(GemmImpl::Tma),
            "tma_mc" => Ok(GemmImpl::TmaMulticast),
            other => bail!(
                "unknown GEMM implementation {other:?}: expected \"custom\", \"cublaslt\", \"wgmma\", \"tma\" or \"tma_mc\""
            ),
        }
    }
}

impl GemmImpl {
    /// The name `FORA_GEMM`, `--gemm` and the bench's rows use for it.
    pub fn name(self) -> &'static str {
        match self {
            GemmImpl::Custom => "custom",
            GemmImpl::CublasLt => "cublaslt",
            GemmImpl::Wgmma => "wgmma",
            GemmImpl::Tma => "tma",
            GemmImpl::TmaMulticast => "tma_mc",
        }
    }

    /// Built for Hopper only (wgmma): refused off compute capability 9.x.
    pub fn is_hopper_only(self) -> bool {
        matches!(
            self,
            GemmImpl::Wgmma | GemmImpl::Tma | GemmImpl::TmaMulticast
        )
    }

    /// One of the warp-specialized TMA implementations.
    pub fn is_tma(self) -> bool {
        matches!(self, GemmImpl::Tma | GemmImpl::TmaMulticast)
    }

    /// Whether this implementation on a device of compute capability major `cc_major` runs
    /// the shapes `FORA_TMA_TILES` names on TMA tiles instead of its own GEMM: cuBLASLt on a
    /// Hopper ([`Gemm::with_tma_overrides`]).
    pub fn routes_tma_overrides(self, cc_major: i32) -> bool {
        self == GemmImpl::CublasLt && cc_major == 9
    }

    /// Whether a GEMM of this implementation on a device of compute capability major
    /// `cc_major` looks up `FORA_TMA_TILES` at all: the TMA implementations' plans, or the
    /// shapes cuBLASLt routes ([`GemmImpl::routes_tma_overrides`]); the mma.sync and wgmma
    /// kernels never do.
    pub fn takes_tma_overrides(self, cc_major: i32) -> bool {
        self.is_tma() || self.routes_tma_overrides(cc_major)
    }

    /// `FORA_GEMM=custom|cublaslt|wgmma|tma|tma_mc`; unset or empty means [`GemmImpl::CublasLt`]: on an H200
    /// (2026-11-26, docs/bench_h200_2026-11-26.md) cuBLASLt plus the epilogue kernel beat the
    /// custom mma.sync kernels at every DiT-XL/2 shape (custom 0.32x-0.81x; a full step 1.8x
    /// faster at 2 rows, 1.33x at 256). The custom kernels stay tested and selectable; they
    /// become the default once a Hopper (wgmma) version wins.
    pub fn from_env() -> Result<GemmImpl> {
        match std::env::var("FORA_GEMM") {
            Ok(v) if !v.trim().is_empty() => v.parse().context("environment variable FORA_GEMM"),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(GemmImpl::CublasLt),
            Err(std::env::VarError::NotUnicode(v)) => {
                bail!("environment variable FORA_GEMM is not UTF-8: {v:?}")
            }
        }
    }
}

/// The epilogue of a GEMM (`GemmParams::epilogue`, `enum fora_gemm_epilogue` in params.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// bf16 out = acc + bias.
    BiasBf16,
    /// bf16 out = gelu_tanh(acc + bias).
    BiasGeluBf16,
    /// f32 out = acc + bias.
    BiasF32,
    /// v = acc + bias; cache bf16 = v (if any); f32 residual (`out`) += gate * v.
    BiasGateResidual,
}

impl Epilogue {
    /// Every epilogue.
    pub const ALL: [Epilogue; 4] = [
        Epilogue::BiasBf16,
        Epilogue::BiasGeluBf16,
        Epilogue::BiasF32,
        Epilogue::BiasGateResidual,
    ];

    /// The value of `GemmParams::epilogue`.
    pub fn raw(self) -> i32 {
        (match self {
            Epilogue::BiasBf16 => FORA_EPI_BIAS_BF16,
            Epilogue::BiasGeluBf16 => FORA_EPI_BIAS_GELU_BF16,
            Epilogue::BiasF32 => FORA_EPI_BIAS_F32,
            Epilogue::BiasGateResidual => FORA_EPI_BIAS_GATE_RESIDUAL,
        }) as i32
    }

    /// The epilogue of a `GemmParams::epilogue` value; an error for any other value.
    pub fn from_raw(v: i32) -> Result<Epilogue> {
        Epilogue::ALL
            .into_iter()
            .find(|e| e.raw() == v)
            .with_context(|| {
                format!("GEMM: unknown epilogue {v} (expected 0..=3, enum fora_gemm_epilogue)")
            })
    }

    /// Whether `out` holds f32 (else bf16).
    pub fn out_is_f32(self) -> bool {
        matches!(self, Epilogue::BiasF32 | Epilogue::BiasGateResidual)
    }
}

/// Tile variant of the custom kernel (`gemm_bf16_<BM>x128`); [`Gemm::run`] picks one, tests and
/// benchmarks may force one with [`Gemm::run_custom_split`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// 128 x 128.
    M128,
    /// 128 x 128 with 64-deep k-steps (3 stages).
    M128K64,
    /// 64 x 128.
    M64,
    /// 32 x 128.
    M32,
}

/// Kernel name, BM, BN, BK, threads, pipeline stages and CTAs an SM holds (`__launch_bounds__`)
/// of a tile variant; must match the instantiations in gemm.cu.
struct TileSpec {
    name: &'static str,
    bm: u32,
    bn: u32,
    bk: u32,
    threads: u32,
    stages: u32,
    ctas_per_sm: usize,
}

impl Tile {
    /// Every tile.
    pub const ALL: [Tile; 4] = [Tile::M128, Tile::M128K64, Tile::M64, Tile::M32];

    fn spec(self) -> TileSpec {
        let (name, bm, bk, threads, stages, ctas_per_sm) = match self {
            Tile::M128 => ("gemm_bf16_128x128", 128, 32, 256, 4, 2),
            Tile::M128K64 => ("gemm_bf16_128x128_k64", 128, 64, 256, 3, 2),
            Tile::M64 => ("gemm_bf16_64x128", 64, 32, 128, 4, 4),
            Tile::M32 => ("gemm_bf16_32x128", 32, 32, 128, 4, 4),
        };
        TileSpec {
            name,
            bm,
            bn: 128,
            bk,
            threads,
            stages,
            ctas_per_sm,
        }
    }

    fn smem_bytes(self) -> u32 {
        let t = self.spec();
        t.stages * (t.bm + t.bn) * t.bk * 2
    }

    fn ctas(self, m: usize, n: usize) -> usize {
        let t = self.spec();
        m.div_ceil(t.bm as usize) * n.div_ceil(t.bn as usize)
    }

    /// Largest tile whose grid still fills the machine; small M always gets 32-row tiles. The
    /// 128-row tile is M128K64 on Hopper (two 96 KiB CTAs per SM; 5-15% faster than M128 on an
    /// H200) and M128 before (sm_80 holds only one 96 KiB CTA, but two of M128's 64 KiB).
    pub fn pick(m: usize, n: usize, sm_count: usize, cc_major: i32) -> Tile {
        if m <= 32 {
            Tile::M32
        } else if Tile::M128.ctas(m, n) >= sm_count {
            if cc_major >= 9 {
                Tile::M128K64
            } else {
                Tile::M128
            }
        } else if Tile::M64.ctas(m, n) >= sm_count || m <= 64 {
            Tile::M64
        } else {
            Tile::M32
        }
    }

    /// Split-K slices for a grid too small to fill the SMs: enough to give every SM its resident
    /// CTAs, at least 32 k-tiles per slice (shorter slices measured slower than no split on an
    /// H200: the partial round trip costs more than the parallelism gains), at most 8 slices,
    /// within `workspace` f32 elements.
    pub fn pick_splits(
        self,
        m: usize,
        n: usize,
        k: usize,
        sm_count: usize,
        workspace: usize,
    ) -> u32 {
        let t = self.spec();
        let k_tiles = k.div_ceil(t.bk as usize);
        split_k_slices(
            self.ctas(m, n),
            sm_count * t.ctas_per_sm,
            k_tiles,
            32,
            m * n,
            workspace,
        )
    }
}

/// Most split-K slices of a cuBLASLt product ([`Gemm::lt_product_splits`]).
pub const MAX_LT_SPLITS: usize = 4;

/// [`Gemm::lt_product_splits`] for an M x N x K product on `sm_count` SMs with `scratch` f32
/// elements of room. Pure.
pub fn lt_product_splits(m: usize, n: usize, k: usize, sm_count: usize, scratch: usize) -> usize {
    let tiles = m.div_ceil(128) * n.div_ceil(128);
    if tiles == 0 || tiles >= sm_count {
        return 1;
    }
    let mut splits = sm_count.div_ceil(tiles).min(MAX_LT_SPLITS);
    while splits > 1
        && (!k.is_multiple_of(8 * splits) || k / splits < 256 || splits * m * n > scratch)
    {
        splits -= 1;
    }
    splits
}

/// The split-K rule both GEMM families share: slices only when `ctas` CTAs fall short of the
/// `target` resident on the machine, enough to reach it, at least `min_tiles` k-tiles a slice, at
/// most 8 slices, and `slices * mn` f32 partials within `workspace`.
fn split_k_slices(
    ctas: usize,
    target: usize,
    k_tiles: usize,
    min_tiles: usize,
    mn: usize,
    workspace: usize,
) -> u32 {
    if ctas >= target {
        return 1;
    }
    let mut splits = target.div_ceil(ctas).min(k_tiles / min_tiles).min(8);
    while splits > 1 && splits * mn > workspace {
        splits -= 1;
    }
    splits.max(1) as u32
}

/// Tile variant of the Hopper kernel (`gemm_wgmma_<BM>x<BN>`, kernels/gemm_sm90.cu); [`Gemm::run`]
/// picks one, tests and benchmarks may force one with [`Gemm::run_wgmma`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaTile {
    /// 128 x 256: two warpgroups of 64 x 256, one CTA per SM.
    M128N256,
    /// 128 x 128: two warpgroups of 64 x 128, one CTA per SM.
    M128N128,
    /// 64 x 128: one warpgroup, two CTAs per SM (small M).
    M64N128,
}

impl WgmmaTile {
    /// Every tile.
    pub const ALL: [WgmmaTile; 3] = [WgmmaTile::M128N256, WgmmaTile::M128N128, WgmmaTile::M64N128];

    /// k-depth of one pipeline stage (one 128-byte swizzle row of bf16).
    pub const BK: u32 = 64;

    /// Kernel name, BM, BN, threads, stages and CTAs an SM holds; must match the instantiations
    /// in gemm_sm90.cu (`FORA_WGMMA_BODY(warpgroups, BN, STAGES)`, `__launch_bounds__`).
    fn spec(self) -> TileSpec {
        let (name, bm, bn, stages, ctas_per_sm) = match self {
            WgmmaTile::M128N256 => ("gemm_wgmma_128x256", 128, 256, 4, 1),
            WgmmaTile::M128N128 => ("gemm_wgmma_128x128", 128, 128, 4, 1),
            WgmmaTile::M64N128 => ("gemm_wgmma_64x128", 64, 128, 4, 2),
        };
        TileSpec {
            name,
            bm,
            bn,
            bk: Self::BK,
            // One 128-thread warpgroup per 64 rows.
            threads: bm * 2,
            stages,
            ctas_per_sm,
        }
    }

    /// The kernel's `extern "C"` name.
    pub fn kernel_name(self) -> &'static str {
        self.spec().name
    }

    /// Dynamic shared memory: the stage ring plus 1 KiB, which the kernel spends on rounding
    /// its base up to the 1024-byte alignment of the 128-byte swizzle atoms.
    pub fn smem_bytes(self) -> u32 {
        let t = self.spec();
        t.stages * (t.bm + t.bn) * t.bk * 2 + 1024
    }

    fn ctas(self, m: usize, n: usize) -> usize {
        let t = self.spec();
        m.div_ceil(t.bm as usize) * n.div_ceil(t.bn as usize)
    }

    /// M <= 64 always gets 64-row tiles (a 128-row tile would multiply mostly zero rows).
    /// Otherwise the widest tile whose grid fills the machine: 128 x 256 when N wastes at most
    /// 1/16 of its columns (1152 = 4.5 x 256 would waste 10%: 128 x 128 instead), then
    /// 128 x 128, else 64 x 128 ([`WgmmaTile::pick_splits`] adds split-K). Not yet tuned on a
    /// device.
    pub fn pick(m: usize, n: usize, sm_count: usize) -> WgmmaTile {
        let n256 = n.div_ceil(256) * 256;
        if m <= 64 {
            WgmmaTile::M64N128
        } else if WgmmaTile::M128N256.ctas(m, n) >= sm_count && (n256 - n) * 16 <= n256 {
            WgmmaTile::M128N256
        } else if WgmmaTile::M128N128.ctas(m, n) >= sm_count {
            WgmmaTile::M128N128
        } else {
            WgmmaTile::M64N128
        }
    }

    /// Split-K slices for a grid too small to fill the SMs, by the custom path's rule at this
    /// k-depth: at least 16 k-tiles (1024 of K) a slice, at most 8 slices, within `workspace`
    /// f32 elements.
    pub fn pick_splits(
        self,
        m: usize,
        n: usize,
        k: usize,
        sm_count: usize,
        workspace: usize,
    ) -> u32 {
        let t = self.spec();
        let k_tiles = k.div_ceil(t.bk as usize);
        split_k_slices(
            self.ctas(m, n),
            sm_count * t.ctas_per_sm,
            k_tiles,
            16,
            m * n,
            workspace,
        )
    }
}

/// Checks a GEMM's parameters: every violation is an error naming the field.
pub fn validate(p: &GemmParams) -> Result<Epilogue> {
    let epi = Epilogue::from_raw(p.epilogue)?;
    ensure!(
        p.m > 0 && p.n > 0 && p.k > 0,
        "GEMM: dimensions must be positive, got M={} N={} K={}",
        p.m,
        p.n,
        p.k
    );
    ensure!(
        p.k % 8 == 0,
        "GEMM: K={} is not a multiple of 8 (rows are read in 16-byte chunks of 8 bf16)",
        p.k
    );
    for (name, ld) in [("lda", p.lda), ("ldw", p.ldw)] {
        ensure!(
            ld >= p.k && ld % 8 == 0,
            "GEMM: {name}={ld} must be >= K={} and a multiple of 8 (16-byte aligned rows)",
            p.k
        );
    }
    ensure!(
        p.ldo >= p.n,
        "GEMM: ldo={} is smaller than N={}",
        p.ldo,
        p.n
    );
    for (name, ptr, align) in [("a", p.a, 16u64), ("w", p.w, 16), ("out", p.out, 8)] {
        ensure!(ptr != 0, "GEMM: null pointer {name}");
        ensure!(
            ptr.is_multiple_of(align),
            "GEMM: pointer {name}={ptr:#x} is not {align}-byte aligned"
        );
    }
    ensure!(
        p.bias.is_multiple_of(4),
        "GEMM: bias pointer {:#x} is not 4-byte aligned",
        p.bias
    );
    if epi == Epilogue::BiasGateResidual {
        ensure!(
            p.gate != 0,
            "GEMM: the gate/residual epilogue needs a gate pointer"
        );
        ensure!(
            p.gate.is_multiple_of(4),
            "GEMM: gate pointer {:#x} is not 4-byte aligned",
            p.gate
        );
        ensure!(
            p.rows_per_gate > 0,
            "GEMM: rows_per_gate={} must be positive (tokens per image)",
            p.rows_per_gate
        );
        ensure!(
            p.ldg >= p.n,
            "GEMM: ldg={} is smaller than N={}",
            p.ldg,
            p.n
        );
        if p.cache != 0 {
            ensure!(
                p.cache.is_multiple_of(8),
                "GEMM: cache pointer {:#x} is not 8-byte aligned",
                p.cache
            );
            ensure!(
                p.ldc >= p.n,
                "GEMM: ldc={} is smaller than N={}",
                p.ldc,
                p.n
            );
        }
    } else {
        ensure!(
            p.cache == 0,
            "GEMM: a cache pointer is only used by the gate/residual epilogue, got one with {epi:?}"
        );
    }
    ensure!(
        p.m as usize <= GEMM_MAX_M,
        "GEMM: M={} is too large (at most {GEMM_MAX_M} rows per launch)",
        p.m,
    );
    Ok(epi)
}

/// f32 elements of the custom path's split-K workspace (32 MiB): slices x M x N of the small-M
/// GEMMs that need splitting (e.g. 4 x 512 x 1152).
pub const SPLITK_WORKSPACE: usize = 8 << 20;

/// A GEMM engine for one device: the loaded kernels, and for cuBLASLt its handle and scratch.
pub struct Gemm {
    imp: GemmImpl,
    tiles: Vec<(Tile, CudaFunction)>,
    /// The Hopper kernels; loaded for [`GemmImpl::Wgmma`], and for [`GemmImpl::Tma`] (its
    /// M <= 64 GEMMs), whose own kernels are launched by name.
    wgmma_tiles: Vec<(WgmmaTile, CudaFunction)>,
    lt: Option<CublasLt>,
    /// f32 [scratch_len] for cuBLASLt products that still need the epilogue kernel.
    scratch: Option<CudaSlice<f32>>,
    /// f32 split-K partial sums of the custom path ([`SPLITK_WORKSPACE`] elements).
    splitk: Option<CudaSlice<f32>>,
    sm_count: usize,
    cc_major: i32,
    /// Forced TMA plans by shape ([`Gemm::with_tma_overrides`]).
    tma_overrides: TmaOverrides,
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemm")
            .field("impl", &self.imp)
            .field("scratch_len", &self.scratch.as_ref().map(|s| s.len()))
            .finish()
    }
}

impl Gemm {
    /// Loads what `imp` needs. `max_mn` is the largest M * N any later `run` will use: the
    /// cuBLASLt path allocates an f32 scratch of that size now (the custom path needs none).
    pub fn new(gpu: &Gpu, imp: GemmImpl, max_mn: usize) -> Result<Gemm> {
        gpu.bind_context()?;
        let mut tiles = Vec::with_capacity(Tile::ALL.len());
        for tile in Tile::ALL {
            let name = tile.spec().name;
            let f = gpu.function(name)?;
            // Above 48 KiB dynamic shared memory must be opted into per kernel.
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                tile.smem_bytes() as i32,
            )
            .with_context(|| {
                format!(
                    "cannot give kernel {name} {} bytes of shared memory",
                    tile.smem_bytes()
                )
            })?;
            tiles.push((tile, f));
        }
        // Launched by name; loading it now makes a binary without it fail here, clearly.
        gpu.function("gemm_epilogue_f32")?;
        if imp.is_hopper_only() {
            ensure_hopper(
                gpu,
                &format!("GEMM: the {imp:?} implementation"),
                "; use FORA_GEMM=custom or cublaslt",
            )?;
        }
        if imp.is_tma() {
            // A device where a cluster cannot run fails here for `TmaMulticast`, whose picks
            // need them; `Tma` (whose picks take the cluster split-K tiles for few tiles)
            // reports it when such a launch fails.
            prepare_tma_tiles(gpu, TmaTile::ALL, imp == GemmImpl::TmaMulticast)?;
        }
        let mut wgmma_tiles = Vec::new();
        if imp.is_hopper_only() {
            for tile in WgmmaTile::ALL {
                let name = tile.kernel_name();
                let f = gpu.function(name)?;
                f.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    tile.smem_bytes() as i32,
                )
                .with_context(|| {
                    format!(
                        "cannot give kernel {name} {} bytes of shared memory",
                        tile.smem_bytes()
                    )
                })?;
                wgmma_tiles.push((tile, f));
            }
        }
        let (lt, scratch, splitk) = match imp {
            GemmImpl::Custom | GemmImpl::Wgmma | GemmImpl::Tma | GemmImpl::TmaMulticast => {
                let ws = gpu.alloc_zeros::<f32>(SPLITK_WORKSPACE, "the GEMM split-K workspace")?;
                (None, None, Some(ws))
            }
            GemmImpl::CublasLt => {
                ensure!(max_mn > 0, "GEMM: the cuBLASLt scratch needs max_mn > 0");
                let lt = CublasLt::new(gpu)?;
                let scratch = gpu.alloc_zeros::<f32>(max_mn, "the cuBLASLt GEMM scratch")?;
                (Some(lt), Some(scratch), None)
            }
        };
        Ok(Gemm {
            imp,
            tiles,
            wgmma_tiles,
            lt,
            scratch,
            splitk,
            sm_count: gpu.sm_count(),
            cc_major: gpu.compute_capability().0,
            tma_overrides: TmaOverrides::default(),
        })
    }

    /// This engine with the TMA plans of `overrides` forced by shape (`FORA_TMA_TILES`). With
    /// [`GemmImpl::CublasLt`] on a Hopper, [`Gemm::run`] and [`Gemm::run_with_bias_bf16`] run
    /// the shapes it names (M > 64) on those TMA kernels instead of cuBLASLt, with their fused
    /// epilogue (an f32 bias), so that one TMA tile can be tried in the default path's whole
    /// steps (e.g. the cluster split-K tiles for proj and fc2); without a split-K workspace,
    /// a plan of several slices is refused when it runs. Elsewhere the overrides apply to the
    /// TMA implementations only. Errors when a routed tile's kernel cannot get its shared
    /// memory.
    pub fn with_tma_overrides(mut self, gpu: &Gpu, overrides: TmaOverrides) -> Result<Gemm> {
        if self.imp.routes_tma_overrides(self.cc_major) {
            // The routed tiles' set-up, as Gemm::new's for the TMA implementations.
            prepare_tma_tiles(gpu, overrides.iter().map(|o| o.tile), false)?;
        }
        self.tma_overrides = overrides;
        Ok(self)
    }

    /// The forced TMA plan (tile, split-K slices) that this cuBLASLt engine runs an M x N x K
    /// GEMM on instead of cuBLASLt ([`Gemm::with_tma_overrides`]), if any.
    pub fn lt_routed_tma_plan(&self, m: usize, n: usize, k: usize) -> Option<(TmaTile, u32)> {
        if !self.imp.routes_tma_overrides(self.cc_major) || m <= 64 {
            return None;
        }
        let o = self.tma_overrides.get(n, k)?;
        let splits = o.splits.unwrap_or_else(|| {
            o.tile
                .pick_splits(m, n, k, self.sm_count, self.splitk_len())
        });
        Some((o.tile, splits))
    }

    /// [`Gemm::new`] with the implementation from `FORA_GEMM`.
    pub fn from_env(gpu: &Gpu, max_mn: usize) -> Result<Gemm> {
        Gemm::new(gpu, GemmImpl::from_env()?, max_mn)
    }

    /// The implementation this GEMM runs (`FORA_GEMM`).
    pub fn implementation(&self) -> GemmImpl {
        self.imp
    }

    /// Runs one GEMM on the device's stream (asynchronously).
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run(&self, gpu: &Gpu, p: &GemmParams) -> Result<()> {
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        if let Some((tile, splits)) = self.lt_routed_tma_plan(m, n, k) {
            return unsafe { launch_tma(gpu, p, tile, splits, self.splitk_workspace()) }
                .with_context(|| {
                    let tile = tile.bench_name();
                    format!("GEMM: FORA_TMA_TILES routes {n}x{k} to {tile} under cuBLASLt")
                });
        }
        match self.imp {
            GemmImpl::Custom => unsafe { self.run_custom(gpu, p, None) },
            GemmImpl::CublasLt => unsafe { self.run_cublaslt(gpu, p) },
            GemmImpl::Wgmma => unsafe { self.run_wgmma(gpu, p, None, None) },
            // A 128-row TMA tile would multiply mostly zero rows at M <= 64 (the conditioning
            // MLP, a few adaLN rows): the 64-row wgmma kernel instead.
            GemmImpl::Tma | GemmImpl::TmaMulticast if p.m <= 64 => unsafe {
                self.run_wgmma(gpu, p, None, None)
            },
            GemmImpl::Tma | GemmImpl::TmaMulticast => unsafe { self.run_tma(gpu, p, None, None) },
        }
    }

    /// The custom kernel, with the tile variant forced (`Some`) or picked by shape (`None`),
    /// split-K picked by shape.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run_custom(&self, gpu: &Gpu, p: &GemmParams, tile: Option<Tile>) -> Result<()> {
        unsafe { self.run_custom_split(gpu, p, tile, None) }
    }

    /// The split-K workspace as (device address, f32 elements), when this engine has one.
    fn splitk_workspace(&self) -> Option<(u64, usize)> {
        self.splitk.as_ref().map(|w| (dptr(w), w.len()))
    }

    /// f32 elements of the split-K workspace (0 without one), the bound of the split picks.
    fn splitk_len(&self) -> usize {
        self.splitk.as_ref().map_or(0, |w| w.len())
    }

    /// The tile variant and split-K slice count the custom path uses for a shape.
    pub fn plan(&self, m: usize, n: usize, k: usize) -> (Tile, u32) {
        let tile = Tile::pick(m, n, self.sm_count, self.cc_major);
        (
            tile,
            tile.pick_splits(m, n, k, self.sm_count, self.splitk_len()),
        )
    }

    /// The custom kernel with the tile variant and the number of split-K slices forced
    /// (`Some`) or picked by shape (`None`). More than one slice writes f32 partial sums to the
    /// workspace, and the epilogue kernel adds them in order and applies the epilogue.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run_custom_split(
        &self,
        gpu: &Gpu,
        p: &GemmParams,
        tile: Option<Tile>,
        splits: Option<u32>,
    ) -> Result<()> {
        validate(p)?;
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let tile = tile.unwrap_or_else(|| Tile::pick(m, n, self.sm_count, self.cc_major));
        let splits = match splits {
            Some(s) => s,
            None => tile.pick_splits(m, n, k, self.sm_count, self.splitk_len()),
        };
        ensure!(
            self.tiles.iter().any(|(x, _)| *x == tile),
            "GEMM kernel {} not loaded",
            tile.spec().name
        );
        unsafe {
            launch_tiled(
                gpu,
                p,
                &tile.spec(),
                tile.smem_bytes(),
                splits,
                self.splitk_workspace(),
            )
        }
    }

    /// The tile variant and split-K slice count the wgmma path uses for a shape.
    pub fn plan_wgmma(&self, m: usize, n: usize, k: usize) -> (WgmmaTile, u32) {
        let tile = WgmmaTile::pick(m, n, self.sm_count);
        (
            tile,
            tile.pick_splits(m, n, k, self.sm_count, self.splitk_len()),
        )
    }

    /// The Hopper wgmma kernel with the tile variant and the number of split-K slices forced
    /// (`Some`) or picked by shape (`None`). Errors unless this `Gemm` was built for
    /// [`GemmImpl::Wgmma`] (which checked the device is a 9.x).
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run_wgmma(
        &self,
        gpu: &Gpu,
        p: &GemmParams,
        tile: Option<WgmmaTile>,
        splits: Option<u32>,
    ) -> Result<()> {
        validate(p)?;
        ensure!(
            self.imp.is_hopper_only(),
            "GEMM: this Gemm was built for {:?}, not the wgmma implementation (its kernels are \
             loaded only on a Hopper device by Gemm::new with GemmImpl::Wgmma or Tma)",
            self.imp
        );
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let tile = tile.unwrap_or_else(|| WgmmaTile::pick(m, n, self.sm_count));
        let splits = match splits {
            Some(s) => s,
            None => tile.pick_splits(m, n, k, self.sm_count, self.splitk_len()),
        };
        ensure!(
            self.wgmma_tiles.iter().any(|(x, _)| *x == tile),
            "GEMM kernel {} not loaded",
            tile.kernel_name()
        );
        unsafe {
            launch_tiled(
                gpu,
                p,
                &tile.spec(),
                tile.smem_bytes(),
                splits,
                self.splitk_workspace(),
            )
        }
    }

    /// The tile variant and split-K slice count the TMA path uses for a shape (a forced plan's
    /// where [`Gemm::with_tma_overrides`] names the shape).
    pub fn plan_tma(&self, m: usize, n: usize, k: usize) -> (TmaTile, u32) {
        self.tma_plan((m, n, k), false)
    }

    /// [`TmaOverrides::plan`] with this engine's implementation, overrides, SMs and workspace:
    /// with [`GemmImpl::TmaMulticast`] the multicast tiles where M has two row tiles or more
    /// (at one, a cluster's other rows of CTAs would only compute zero rows).
    fn tma_plan(&self, mnk: (usize, usize, usize), summed: bool) -> (TmaTile, u32) {
        let multicast = self.imp == GemmImpl::TmaMulticast;
        let (sms, ws) = (self.sm_count, self.splitk_len());
        self.tma_overrides.plan(multicast, mnk, sms, ws, summed)
    }

    /// The warp-specialized TMA kernel with the tile variant and the number of split-K slices
    /// forced (`Some`) or picked by shape (`None`). Errors unless this `Gemm` was built for
    /// [`GemmImpl::Tma`] (which checked the device is a 9.x). With programmatic launches on
    /// ([`Gpu::set_programmatic_launch`]) the kernel reads its first k-tiles of W before it
    /// waits for the kernel before it on the stream: that kernel must not write W.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run_tma(
        &self,
        gpu: &Gpu,
        p: &GemmParams,
        tile: Option<TmaTile>,
        splits: Option<u32>,
    ) -> Result<()> {
        validate(p)?;
        ensure!(
            self.imp.is_tma(),
            "GEMM: this Gemm was built for {:?}, not the TMA implementation (its kernels are \
             loaded only on a Hopper device by Gemm::new with GemmImpl::Tma or TmaMulticast)",
            self.imp
        );
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let (tile, splits) = match (tile, splits) {
            // The shape's plan (forced or picked).
            (None, None) => self.plan_tma(m, n, k),
            (None, Some(s)) => (self.plan_tma(m, n, k).0, s),
            (Some(t), s) => (
                t,
                s.unwrap_or_else(|| t.pick_splits(m, n, k, self.sm_count, self.splitk_len())),
            ),
        };
        unsafe { launch_tma(gpu, p, tile, splits, self.splitk_workspace()) }
    }

    /// Where the TMA path ([`GemmImpl::Tma`], [`GemmImpl::TmaMulticast`]) splits this shape's
    /// K for a summing consumer ([`TmaTile::pick_splits_summed`]): runs only the kernel, its
    /// slices' raw f32 partial sums (no bias, no epilogue) into the split-K workspace, slice z
    /// at element z * M * N, and returns (address, slices) for a pass that sums them as it
    /// loads them (`residual_layernorm`) instead of the epilogue kernel. `None` (nothing run) for one slice, M <= 64 (the wgmma
    /// kernel runs there) or another implementation.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn tma_product_split(
        &self,
        gpu: &Gpu,
        p: &GemmParams,
    ) -> Result<Option<(u64, usize)>> {
        validate(p)?;
        if !self.imp.is_tma() || p.m <= 64 {
            return Ok(None);
        }
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let (tile, splits) = self.tma_plan((m, n, k), true);
        if splits <= 1 {
            return Ok(None);
        }
        let ws = unsafe { launch_tma_kernel(gpu, p, tile, splits, self.splitk_workspace()) }?;
        Ok(Some((ws, splits as usize)))
    }

    /// cuBLASLt with its fused bias / GELU-bias epilogue where it has one (else the unfused
    /// path). Errors when this `Gemm` was built for the custom implementation.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run_cublaslt(&self, gpu: &Gpu, p: &GemmParams) -> Result<()> {
        self.run_cublaslt_with_bias_bf16(gpu, p, 0)
    }

    /// Runs one GEMM like [`Gemm::run`]; with a bf16 output, `bias_bf16` (a bf16 copy of
    /// `p.bias`, 0 for none) lets cuBLASLt fuse the bias where it refuses an f32 bias with a
    /// bf16 output (the H200 did): one GEMM writing bf16 instead of an f32 product and a pass
    /// of the epilogue kernel over it. The bias is then rounded to bf16 before the add, as
    /// PyTorch's autocast rounds it. The other implementations use the f32 bias.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run_with_bias_bf16(
        &self,
        gpu: &Gpu,
        p: &GemmParams,
        bias_bf16: u64,
    ) -> Result<()> {
        let routed = self
            .lt_routed_tma_plan(p.m as usize, p.n as usize, p.k as usize)
            .is_some();
        match self.imp {
            // A shape routed to the TMA kernels runs as `run` runs it.
            GemmImpl::CublasLt if !routed => self.run_cublaslt_with_bias_bf16(gpu, p, bias_bf16),
            _ => unsafe { self.run(gpu, p) },
        }
    }

    fn run_cublaslt_with_bias_bf16(&self, gpu: &Gpu, p: &GemmParams, bias_bf16: u64) -> Result<()> {
        let epi = validate(p)?;
        let lt = self.lt()?;
        let output = match epi {
            Epilogue::BiasGateResidual => return unsafe { self.run_cublaslt_unfused(gpu, p) },
            Epilogue::BiasF32 => LtOutput::F32,
            Epilogue::BiasBf16 | Epilogue::BiasGeluBf16 => LtOutput::Bf16,
        };
        let gelu = epi == Epilogue::BiasGeluBf16;
        let mut mm = lt_matmul(
            p,
            output,
            if gelu {
                LtEpilogue::Gelu
            } else {
                LtEpilogue::None
            },
        );
        // cuBLASLt may want a 16-byte aligned bias vector; ours need only be 4-byte aligned.
        let mut tries = Vec::with_capacity(2);
        if p.bias == 0 {
            tries.push(mm.epilogue);
        } else {
            if p.bias.is_multiple_of(16) {
                tries.push(if gelu {
                    LtEpilogue::GeluBias(p.bias)
                } else {
                    LtEpilogue::Bias(p.bias)
                });
            }
            if bias_bf16 != 0 && bias_bf16.is_multiple_of(16) && output == LtOutput::Bf16 {
                tries.push(if gelu {
                    LtEpilogue::GeluBiasOutType(bias_bf16)
                } else {
                    LtEpilogue::BiasOutType(bias_bf16)
                });
            }
        }
        for epilogue in tries {
            mm.epilogue = epilogue;
            if unsafe { lt.matmul(&mm) }.with_context(|| gemm_what(p, "cuBLASLt"))? == LtRun::Done {
                return Ok(());
            }
        }
        unsafe { self.run_cublaslt_unfused(gpu, p) }
    }

    /// cuBLASLt only: `batch.count` GEMMs of `p`'s shape with `p`'s f32 + bias epilogue
    /// (`BiasF32`), matmul b at `p`'s operands plus the strides of `batch` (elements; the
    /// caller makes sure every matmul's operands lie inside its buffers). Ok(false), running
    /// nothing, when this engine is not cuBLASLt or cuBLASLt has no algorithm for it: the caller
    /// then takes another path.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run_cublaslt_strided(&self, p: &GemmParams, batch: LtBatch) -> Result<bool> {
        if self.imp != GemmImpl::CublasLt {
            return Ok(false);
        }
        let epi = validate(p)?;
        ensure!(
            epi == Epilogue::BiasF32 && p.bias != 0 && p.bias.is_multiple_of(16),
            "{}: strided batches take the f32 + bias epilogue with a 16-byte aligned bias",
            gemm_what(p, "cuBLASLt")
        );
        let mm = LtMatmul {
            batch: Some(batch),
            ..lt_matmul(p, LtOutput::F32, LtEpilogue::Bias(p.bias))
        };
        let run = unsafe { self.lt()?.matmul(&mm) };
        Ok(run.with_context(|| gemm_what(p, "cuBLASLt strided batch"))? == LtRun::Done)
    }

    /// cuBLASLt product into the f32 scratch, then the stand-alone epilogue kernel (any
    /// epilogue). Errors when M * N exceeds the scratch sized at construction.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn run_cublaslt_unfused(&self, gpu: &Gpu, p: &GemmParams) -> Result<()> {
        let acc = unsafe { self.cublaslt_product(p) }?;
        unsafe { launch_epilogue(gpu, &epilogue_params(p, acc, 1), self.sm_count) }
    }

    /// Only the product `A @ W^T` of `p` (no bias, no epilogue), by cuBLASLt into the f32
    /// scratch: returns its device address, `[M, N]` with leading dimension N, valid until the
    /// next GEMM on this engine. For a caller that applies the epilogue itself, fused with more
    /// work (`residual_layernorm`). cuBLASLt engines only.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn cublaslt_product(&self, p: &GemmParams) -> Result<u64> {
        let (acc, _) = unsafe { self.product_slices(p, 1) }?;
        Ok(acc)
    }

    /// Split-K slices for [`Gemm::cublaslt_product_split`] at `p`'s shape: 1 (no split) when its
    /// output has at least as many 128 x 128 tiles as the device has SMs; else enough slices
    /// to cover the SMs, at most [`MAX_LT_SPLITS`], each at least 256 deep, with K a multiple of
    /// 8 slices (16-byte aligned slice operands) and every slice inside the f32 scratch. One
    /// image + CFG at DiT-XL/2 (M = 512): proj and fc2 (N = 1152, 36 tiles) take 4 slices.
    pub fn lt_product_splits(&self, p: &GemmParams) -> usize {
        let (m, n, k) = (
            p.m.max(0) as usize,
            p.n.max(0) as usize,
            p.k.max(0) as usize,
        );
        let scratch = self.scratch.as_ref().map_or(0, |s| s.len());
        lt_product_splits(m, n, k, self.sm_count, scratch)
    }

    /// The product `A @ W^T` of `p` (no bias, no epilogue) as `splits` split-K slices, by one
    /// cuBLASLt strided batch into the f32 scratch: slice s multiplies columns
    /// `[s K / splits, (s + 1) K / splits)` of A and W and lies at `+ s * M * N` elements,
    /// `[M, N]` with leading dimension N. Returns (address, slices written): the product is the
    /// slices' sum in order. One slice, or cuBLASLt without an algorithm for the batch, is
    /// [`Gemm::cublaslt_product`]. Valid until the next GEMM on this engine.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn cublaslt_product_split(
        &self,
        p: &GemmParams,
        splits: usize,
    ) -> Result<(u64, usize)> {
        unsafe { self.product_slices(p, splits.max(1)) }
    }

    /// The product of `p` as `splits` split-K slices into the f32 scratch (one: a plain
    /// product), for [`Gemm::cublaslt_product`] and [`Gemm::cublaslt_product_split`]: (address,
    /// slices written). A batch cuBLASLt has no algorithm for falls back to one slice.
    /// # Safety
    /// As [`Gemm::cublaslt_product_split`]: `p`'s addresses must point to live device memory of
    /// its sizes.
    unsafe fn product_slices(&self, p: &GemmParams, splits: usize) -> Result<(u64, usize)> {
        validate(p)?;
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        ensure!(
            k.is_multiple_of(8 * splits) || splits == 1,
            "{}: K is not a multiple of 8 x {splits} split-K slices",
            gemm_what(p, "cuBLASLt")
        );
        let lt = self.lt()?;
        let scratch = self
            .scratch
            .as_ref()
            .context("GEMM: no cuBLASLt scratch (built for the custom implementation)")?;
        ensure!(
            splits * m * n <= scratch.len(),
            "GEMM: {splits} slice(s) of M*N = {m}*{n} exceed the cuBLASLt scratch of {} elements \
             sized at construction (max_mn)",
            scratch.len()
        );
        let acc = dptr(scratch);
        let depth = k / splits;
        // Into the dense scratch, not p.out.
        let mm = LtMatmul {
            d: acc,
            ldd: n,
            k: depth,
            batch: (splits > 1).then_some(LtBatch {
                count: splits,
                stride_w: depth as i64,
                stride_a: depth as i64,
                stride_d: (m * n) as i64,
                stride_bias: 0,
            }),
            ..lt_matmul(p, LtOutput::F32, LtEpilogue::None)
        };
        match unsafe { lt.matmul(&mm) }.with_context(|| gemm_what(p, "cuBLASLt"))? {
            LtRun::Done => Ok((acc, splits)),
            LtRun::Unsupported if splits > 1 => unsafe { self.product_slices(p, 1) },
            LtRun::Unsupported => bail!(
                "{}: cuBLASLt has no algorithm for a plain bf16 x bf16 -> f32 product",
                gemm_what(p, "cuBLASLt")
            ),
        }
    }

    /// Turns cuBLASLt autotuning on or off (see [`CublasLt::set_autotune`]); the custom
    /// implementations have nothing to tune.
    pub fn set_lt_autotune(&self, on: bool) {
        if let Some(lt) = &self.lt {
            lt.set_autotune(on);
        }
    }

    /// Whether this Gemm autotunes cuBLASLt algorithms.
    pub fn lt_autotune(&self) -> bool {
        self.lt.as_ref().is_some_and(|lt| lt.autotune())
    }

    fn lt(&self) -> Result<&CublasLt> {
        self.lt
            .as_ref()
            .context("GEMM: this Gemm was built for the custom implementation, not cuBLASLt")
    }
}

/// One cuBLASLt matmul over `p`'s operands (A, W and out, with their leading dimensions),
/// with `output` and `epilogue`.
fn lt_matmul(p: &GemmParams, output: LtOutput, epilogue: LtEpilogue) -> LtMatmul {
    LtMatmul {
        a: p.a,
        w: p.w,
        d: p.out,
        m: p.m as usize,
        n: p.n as usize,
        k: p.k as usize,
        lda: p.lda as usize,
        ldw: p.ldw as usize,
        ldd: p.ldo as usize,
        output,
        epilogue,
        batch: None,
    }
}

fn gemm_what(p: &GemmParams, imp: &str) -> String {
    format!("{imp} GEMM M={} N={} K={}", p.m, p.n, p.k)
}

/// Loads the kernels of `tiles` now (a binary without them fails here) with their shared
/// memory, and asks how many clusters of each cluster kernel fit at once (cached: no driver
/// query inside a later graph capture); with `clusters_required`, a device where a cluster
/// cannot run fails here, else such a launch reports it.
fn prepare_tma_tiles(
    gpu: &Gpu,
    tiles: impl IntoIterator<Item = TmaTile>,
    clusters_required: bool,
) -> Result<()> {
    for tile in tiles {
        gpu.allow_dynamic_shared_memory(tile.kernel_name(), tile.smem_bytes())?;
        if tile.cluster() > 1 {
            let fits = gpu.max_active_clusters(
                tile.kernel_name(),
                tile.cluster(),
                TmaTile::THREADS,
                tile.smem_bytes(),
            );
            if clusters_required {
                fits?;
            }
        }
    }
    Ok(())
}

/// The stand-alone epilogue of `p` over `splits` f32 slices `[M, N]` at `acc`.
fn epilogue_params(p: &GemmParams, acc: u64, splits: u32) -> GemmEpilogueParams {
    GemmEpilogueParams {
        acc,
        bias: p.bias,
        out: p.out,
        cache: p.cache,
        gate: p.gate,
        m: p.m,
        n: p.n,
        ld_acc: p.n,
        ldo: p.ldo,
        ldc: p.ldc,
        ldg: p.ldg,
        rows_per_gate: p.rows_per_gate,
        epilogue: p.epilogue,
        splits: splits as i32,
    }
}

/// Runs the custom mma.sync GEMM kernel of `tile` with `splits` split-K slices on `gpu` (a
/// device or the CPU emulator): validates `p` and launches what [`Gemm::run_custom_split`]
/// launches. More than one slice needs `splitk`, an f32 workspace of at least
/// `splits * M * N` elements (device address, elements).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn launch_custom(
    gpu: &impl KernelLauncher,
    p: &GemmParams,
    tile: Tile,
    splits: u32,
    splitk: Option<(u64, usize)>,
) -> Result<()> {
    validate(p)?;
    gpu.allow_dynamic_shared_memory(tile.spec().name, tile.smem_bytes())?;
    unsafe { launch_tiled(gpu, p, &tile.spec(), tile.smem_bytes(), splits, splitk) }
}

/// Runs the Hopper wgmma GEMM kernel of `tile` with `splits` split-K slices on `gpu`: what
/// [`Gemm::run_wgmma`] launches, without its engine (for the CPU emulator; on a GPU only a
/// compute capability 9.x device runs it, which [`Gemm::new`] checks). `splitk` as for
/// [`launch_custom`].
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn launch_wgmma(
    gpu: &impl KernelLauncher,
    p: &GemmParams,
    tile: WgmmaTile,
    splits: u32,
    splitk: Option<(u64, usize)>,
) -> Result<()> {
    validate(p)?;
    gpu.allow_dynamic_shared_memory(tile.kernel_name(), tile.smem_bytes())?;
    unsafe { launch_tiled(gpu, p, &tile.spec(), tile.smem_bytes(), splits, splitk) }
}

/// Launches a tiled GEMM kernel (grid: N tiles x M tiles x slices) on validated params; more
/// than one slice writes f32 partial sums to the split-K workspace `splitk` (device address,
/// elements), and the epilogue kernel adds them in order and applies the epilogue.
///
/// # Safety
/// The addresses given must point to live device memory of the sizes the launch reads and
/// writes (the callers pass a workspace's own buffers).
unsafe fn launch_tiled(
    gpu: &impl KernelLauncher,
    p: &GemmParams,
    t: &TileSpec,
    smem_bytes: u32,
    splits: u32,
    splitk: Option<(u64, usize)>,
) -> Result<()> {
    ensure!(
        (1..=64).contains(&splits),
        "GEMM: split-K slices must be 1..=64, got {splits}"
    );
    let grid_y = (p.m as u32).div_ceil(t.bm);
    ensure!(
        grid_y <= 65535,
        "GEMM: M={} needs {grid_y} row tiles of {}, more than 65535",
        p.m,
        t.bm
    );
    let grid = ((p.n as u32).div_ceil(t.bn), grid_y, splits);
    let block = (t.threads, 1, 1);
    if splits == 1 {
        // SAFETY: `validate` checked the shapes, strides, alignment and non-null pointers the
        // kernel relies on; the buffers' extents are the caller's contract.
        unsafe { gpu.launch_kernel(t.name, grid, block, smem_bytes, p) }
            .with_context(|| format!("launching {} (M={} N={} K={})", t.name, p.m, p.n, p.k))?;
        return Ok(());
    }
    let (partial, ws) = split_k_partial(p, splits, splitk)?;
    // SAFETY: as above for A and W; the partial sums go to the workspace, whose size was
    // checked against splits x M x N.
    unsafe { gpu.launch_kernel(t.name, grid, block, smem_bytes, &partial) }.with_context(|| {
        format!(
            "launching {} split-K x{splits} (M={} N={} K={})",
            t.name, p.m, p.n, p.k
        )
    })?;
    unsafe { launch_epilogue(gpu, &epilogue_params(p, ws, splits), gpu.multiprocessors()) }
}

/// The most rows (M) one GEMM launch takes: grid y is the M tiles (32 rows at the smallest),
/// at most 65535 CTAs.
pub const GEMM_MAX_M: usize = 65535 * 32;

/// A plain GEMM's params: dense row-major operands, no cache or gate.
#[allow(clippy::too_many_arguments)] // the eight numbers of one GEMM, named at every call
pub fn gemm_params(
    a: u64,
    w: u64,
    bias: u64,
    out: u64,
    m: usize,
    n: usize,
    k: usize,
    epi: Epilogue,
) -> GemmParams {
    // A size past i32 saturates, so that the launchers' checks refuse it (M is held to 65535
    // tiles) instead of seeing it wrapped to a small one.
    let int = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    GemmParams {
        a,
        w,
        bias,
        out,
        cache: 0,
        gate: 0,
        m: int(m),
        n: int(n),
        k: int(k),
        lda: int(k),
        ldw: int(k),
        ldo: int(n),
        ldc: int(n),
        ldg: 0,
        rows_per_gate: 1,
        epilogue: epi.raw(),
    }
}

/// The parameters that make a GEMM kernel write split-K slice z's raw f32 partial sums into
/// slice z of the workspace `splitk` (device address, elements), after checking it holds
/// `splits` slices of M x N; and the workspace's address.
fn split_k_partial(
    p: &GemmParams,
    splits: u32,
    splitk: Option<(u64, usize)>,
) -> Result<(GemmParams, u64)> {
    let (m, n) = (p.m as usize, p.n as usize);
    let (ws, ws_len) =
        splitk.context("GEMM: no split-K workspace (this Gemm was built for cuBLASLt)")?;
    ensure!(
        splits as usize * m * n <= ws_len,
        "GEMM: {splits} split-K slices of M*N = {m}*{n} exceed the workspace of {ws_len} elements"
    );
    let partial = GemmParams {
        bias: 0,
        out: ws,
        cache: 0,
        gate: 0,
        ldo: p.n,
        ldc: 0,
        ldg: 0,
        rows_per_gate: 1,
        epilogue: FORA_EPI_PARTIAL_F32 as i32,
        ..*p
    };
    Ok((partial, ws))
}

/// Runs the warp-specialized TMA GEMM kernel of `tile` with `splits` split-K slices on `gpu` (a
/// Hopper or the CPU emulator): encodes the operands' tensor maps, launches a persistent grid of
/// at most one CTA per SM and work unit, and with more than one slice the epilogue kernel over
/// the workspace `splitk` (as for [`launch_custom`]).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn launch_tma(
    gpu: &impl KernelLauncher,
    p: &GemmParams,
    tile: TmaTile,
    splits: u32,
    splitk: Option<(u64, usize)>,
) -> Result<()> {
    let ws = unsafe { launch_tma_kernel(gpu, p, tile, splits, splitk) }?;
    if splits > 1 {
        unsafe { launch_epilogue(gpu, &epilogue_params(p, ws, splits), gpu.multiprocessors()) }?;
    }
    Ok(())
}

/// [`launch_tma`] without the epilogue kernel: one slice applies `p`'s epilogue; more than one
/// write their raw f32 partial sums (no bias) into the workspace `splitk`, slice z at element
/// z * M * N (rows of N), for a consumer that sums them as it loads them (`residual_layernorm`).
/// Returns the workspace's address (0 for one slice).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn launch_tma_kernel(
    gpu: &impl KernelLauncher,
    p: &GemmParams,
    tile: TmaTile,
    splits: u32,
    splitk: Option<(u64, usize)>,
) -> Result<u64> {
    validate(p)?;
    ensure!(
        (1..=64).contains(&splits),
        "GEMM: split-K slices must be 1..=64, got {splits}"
    );
    let operand = |base: u64, rows: i32, ld: i32, box_rows: u32| TmaTensor2d {
        base,
        rows: rows as u64,
        cols: p.k as u64,
        row_stride: ld as u64,
        box_rows,
        box_cols: TmaTile::BK,
    };
    // A cluster's CTAs each load (and multicast) their share of the A tile (along a row of the
    // cluster) and of the W tile (down a column).
    let a_map = gpu
        .tma_descriptor_2d(&operand(p.a, p.m, p.lda, tile.bm() / tile.cluster_n()))
        .context("GEMM: the tensor map of A")?;
    let w_map = gpu
        .tma_descriptor_2d(&operand(p.w, p.n, p.ldw, tile.bn() / tile.cluster_m()))
        .context("GEMM: the tensor map of W")?;
    let (gemm, ws) = if splits == 1 {
        (*p, 0)
    } else {
        split_k_partial(p, splits, splitk)?
    };
    let params = GemmTmaParams {
        a_map,
        w_map,
        gemm,
        splits: splits as i32,
    };
    // Whole clusters (the kernel's __cluster_dims__): the CTAs' units are a multiple of them.
    // At most the CTAs resident at once: a cluster that waited for another to end would run
    // its units after a whole round.
    let name = tile.kernel_name();
    gpu.allow_dynamic_shared_memory(name, tile.smem_bytes())?;
    let cluster = tile.cluster() as usize;
    let resident = if cluster > 1 {
        cluster
            * gpu.max_active_clusters(name, tile.cluster(), TmaTile::THREADS, tile.smem_bytes())?
    } else {
        gpu.multiprocessors()
    };
    let units = tile.tiles(p.m as usize, p.n as usize) * splits as usize;
    let grid = ((units.min(resident) / cluster).max(1) * cluster) as u32;
    // SAFETY: `validate` checked the shapes, strides, alignment and non-null pointers the kernel
    // relies on, and the tensor maps describe exactly A [M, K] and W [N, K]; a split-K run
    // writes the workspace, whose size was checked; the buffers' extents are the caller's
    // contract.
    unsafe {
        gpu.launch_kernel(
            name,
            (grid, 1, 1),
            (TmaTile::THREADS, 1, 1),
            tile.smem_bytes(),
            &params,
        )
    }
    .with_context(|| {
        format!(
            "launching {name} x{splits} slices (M={} N={} K={})",
            p.m, p.n, p.k
        )
    })?;
    Ok(ws)
}

/// Launches `gemm_epilogue_f32` over acc[M, ld_acc] (grid-stride, a few waves of CTAs).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn launch_epilogue(
    gpu: &impl KernelLauncher,
    p: &GemmEpilogueParams,
    sm_count: usize,
) -> Result<()> {
    ensure!(
        p.m > 0 && p.n > 0,
        "GEMM epilogue: dimensions must be positive, got M={} N={}",
        p.m,
        p.n
    );
    ensure!(
        p.ld_acc >= p.n,
        "GEMM epilogue: ld_acc={} is smaller than N={}",
        p.ld_acc,
        p.n
    );
    ensure!(
        p.splits >= 1,
        "GEMM epilogue: splits={} must be >= 1",
        p.splits
    );
    ensure!(
        p.acc != 0 && p.acc.is_multiple_of(4),
        "GEMM epilogue: acc pointer {:#x} is null or misaligned",
        p.acc
    );
    let pairs = p.m as u64 * (p.n as u64).div_ceil(2);
    let threads = 256u32;
    let blocks = pairs
        .div_ceil(threads as u64)
        .min(sm_count.max(1) as u64 * 16) as u32;
    // SAFETY: the GemmParams this came from passed `validate`; acc is checked above.
    unsafe {
        gpu.launch_kernel(
            "gemm_epilogue_f32",
            (blocks.max(1), 1, 1),
            (threads, 1, 1),
            0,
            p,
        )
    }
    .with_context(|| format!("launching gemm_epilogue_f32 (M={} N={})", p.m, p.n))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lt_product_splits_fill_small_grids_only() {
        let big = usize::MAX;
        // One image + CFG at DiT-XL/2 on 132 SMs: proj and fc2 have 36 tiles of 128 x 128.
        assert_eq!(lt_product_splits(512, 1152, 1152, 132, big), 4);
        assert_eq!(lt_product_splits(512, 1152, 4608, 132, big), 4);
        // Grids that fill the SMs are not split: 16 and 256 images.
        assert_eq!(lt_product_splits(4096, 1152, 1152, 132, big), 1);
        assert_eq!(lt_product_splits(65536, 1152, 4608, 132, big), 1);
        // The scratch bounds the slices.
        assert_eq!(lt_product_splits(512, 1152, 1152, 132, 2 * 512 * 1152), 2);
        assert_eq!(lt_product_splits(512, 1152, 1152, 132, 512 * 1152), 1);
        // Slices at least 256 deep, K a multiple of 8 slices.
        assert_eq!(lt_product_splits(512, 1152, 512, 132, big), 2);
        assert_eq!(lt_product_splits(512, 1152, 1000, 132, big), 1);
        assert_eq!(lt_product_splits(512, 1152, 255, 132, big), 1);
        // Few tiles short of the SMs: only as many slices as fill them.
        assert_eq!(lt_product_splits(512, 4096, 4608, 132, big), 2);
        assert_eq!(lt_product_splits(0, 1152, 1152, 132, big), 1);
    }

    #[test]
    fn impl_parses() {
        assert_eq!("custom".parse::<GemmImpl>().unwrap(), GemmImpl::Custom);
        assert_eq!("cuBLASLt".parse::<GemmImpl>().unwrap(), GemmImpl::CublasLt);
        assert_eq!(" WGMMA ".parse::<GemmImpl>().unwrap(), GemmImpl::Wgmma);
        assert_eq!("tma".parse::<GemmImpl>().unwrap(), GemmImpl::Tma);
        assert_eq!(
            "tma_mc".parse::<GemmImpl>().unwrap(),
            GemmImpl::TmaMulticast
        );
        assert!(GemmImpl::Tma.is_hopper_only() && GemmImpl::Wgmma.is_hopper_only());
        assert!(GemmImpl::TmaMulticast.is_hopper_only() && GemmImpl::TmaMulticast.is_tma());
        assert!(!GemmImpl::CublasLt.is_hopper_only() && !GemmImpl::Custom.is_hopper_only());
        assert!(!GemmImpl::Wgmma.is_tma());
        let e = "cutlass".parse::<GemmImpl>().unwrap_err().to_string();
        assert!(
            e.contains("cutlass") && e.contains("\"tma\"") && e.contains("\"tma_mc\""),
            "{e}"
        );
    }

    #[test]
    fn tile_pick() {
        assert_eq!(Tile::pick(2, 195_840, 132, 9), Tile::M32);
        assert_eq!(Tile::pick(65_536, 3456, 132, 9), Tile::M128K64);
        assert_eq!(Tile::pick(65_536, 3456, 108, 8), Tile::M128);
        assert_eq!(Tile::pick(2048, 1152, 132, 9), Tile::M128K64);
        assert_eq!(Tile::pick(512, 3456, 132, 9), Tile::M64);
        assert_eq!(Tile::pick(512, 32, 132, 9), Tile::M32);
        assert_eq!(Tile::pick(48, 32, 132, 9), Tile::M64);
    }

    #[test]
    fn smem_matches_kernels() {
        assert_eq!(Tile::M128.smem_bytes(), 64 * 1024);
        assert_eq!(Tile::M128K64.smem_bytes(), 96 * 1024);
        assert_eq!(Tile::M64.smem_bytes(), 48 * 1024);
        assert_eq!(Tile::M32.smem_bytes(), 40 * 1024);
    }

    #[test]
    fn wgmma_tile_pick() {
        // DiT-XL/2 at 256 images of 256 tokens (M = 65536): qkv (3456 = 13.5 x 256, 3.6%
        // waste) and fc1 (4608) take 256-wide tiles.
        assert_eq!(WgmmaTile::pick(65_536, 3456, 132), WgmmaTile::M128N256);
        assert_eq!(WgmmaTile::pick(65_536, 4608, 132), WgmmaTile::M128N256);
        // proj / fc2 (N = 1152 = 4.5 x 256) wastes 10% at 256 wide.
        assert_eq!(WgmmaTile::pick(65_536, 1152, 132), WgmmaTile::M128N128);
        // One image pair (M = 512): 128-row tiles do not fill 132 SMs.
        assert_eq!(WgmmaTile::pick(512, 3456, 132), WgmmaTile::M64N128);
        assert_eq!(WgmmaTile::pick(512, 1152, 132), WgmmaTile::M64N128);
        // The adaLN tables of two rows: 765 CTAs of 128 x 256 would fill the machine, but with
        // 2 of 128 rows used.
        assert_eq!(WgmmaTile::pick(2, 195_840, 132), WgmmaTile::M64N128);
        assert_eq!(WgmmaTile::pick(64, 195_840, 132), WgmmaTile::M64N128);
        assert_eq!(WgmmaTile::pick(512, 195_840, 132), WgmmaTile::M128N256);
        // 2048 x 4608 = 16 x 18 tiles of 128 x 256.
        assert_eq!(WgmmaTile::pick(2048, 4608, 132), WgmmaTile::M128N256);
        assert_eq!(WgmmaTile::pick(2048, 1152, 132), WgmmaTile::M128N128);
    }

    #[test]
    fn wgmma_smem_matches_kernels() {
        // STAGES * (BM + BN) * 64 * 2 + 1 KiB alignment slack, per gemm_sm90.cu.
        assert_eq!(WgmmaTile::M128N256.smem_bytes(), 4 * 384 * 128 + 1024);
        assert_eq!(WgmmaTile::M128N128.smem_bytes(), 4 * 256 * 128 + 1024);
        assert_eq!(WgmmaTile::M64N128.smem_bytes(), 4 * 192 * 128 + 1024);
        // Hopper: at most 227 KiB a CTA, 228 KiB an SM (1 KiB reserved per CTA).
        for t in WgmmaTile::ALL {
            let spec = t.spec();
            assert!(t.smem_bytes() <= 227 * 1024, "{t:?}");
            assert!(
                spec.ctas_per_sm * (t.smem_bytes() as usize + 1024) <= 228 * 1024,
                "{t:?} does not fit {} CTAs an SM",
                spec.ctas_per_sm
            );
            assert_eq!(spec.threads, spec.bm * 2, "one warpgroup per 64 rows");
            assert!(t.kernel_name().starts_with("gemm_wgmma_"));
        }
    }

    #[test]
    fn wgmma_split_pick() {
        // fc2 of one CFG image pair: 72 CTAs of 64 x 128 against 264 resident, K = 4608 is 72
        // k-tiles of 64 -> 4 slices of 18.
        assert_eq!(
            WgmmaTile::M64N128.pick_splits(512, 1152, 4608, 132, SPLITK_WORKSPACE),
            4
        );
        // proj of the same: K = 1152 is 18 k-tiles, too short to split.
        assert_eq!(
            WgmmaTile::M64N128.pick_splits(512, 1152, 1152, 132, SPLITK_WORKSPACE),
            1
        );
        // qkv: 216 CTAs, still under 264 resident, but K is too short.
        assert_eq!(
            WgmmaTile::M64N128.pick_splits(512, 3456, 1152, 132, SPLITK_WORKSPACE),
            1
        );
        assert_eq!(
            WgmmaTile::M128N256.pick_splits(65_536, 4608, 1152, 132, SPLITK_WORKSPACE),
            1
        );
        // The workspace bounds the slices.
        assert_eq!(
            WgmmaTile::M64N128.pick_splits(512, 1152, 4608, 132, 2 * 512 * 1152),
            2
        );
    }

    #[test]
    fn split_pick() {
        // fc2 of one CFG image pair: 144 CTAs of 32 x 128, K = 4608 -> 4 slices.
        assert_eq!(
            Tile::M32.pick_splits(512, 1152, 4608, 132, SPLITK_WORKSPACE),
            4
        );
        // A full machine is never split.
        assert_eq!(
            Tile::M128.pick_splits(16_384, 1152, 1152, 132, SPLITK_WORKSPACE),
            1
        );
        // Short K is not split below 32 k-tiles a slice.
        assert_eq!(Tile::M32.pick_splits(64, 32, 96, 132, SPLITK_WORKSPACE), 1);
        assert_eq!(
            Tile::M64.pick_splits(512, 3456, 1152, 132, SPLITK_WORKSPACE),
            1
        );
        // The workspace bounds the slices.
        assert_eq!(
            Tile::M32.pick_splits(512, 1152, 4608, 132, 2 * 512 * 1152),
            2
        );
    }
}
