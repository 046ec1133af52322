//! Launcher of `gemm_tma_ln_{64,128}x72` and `gemm_tma_ln_mc_{64,128}x72`
//! (`kernels/gemm_ln_sm90.cu`, Hopper only): proj or fc2 with its gated residual and the
//! LayerNorm + modulate after it in one launch, in clusters of 16 CTAs that each hold a 64 x 72
//! (or 128 x 72) tile of a block of whole 1152-wide rows and exchange the rows' statistics
//! through distributed shared memory (the `_mc` kernels also share the A tile across the
//! cluster by multicast). It replaces the GEMM and the `residual_layernorm` pass of the
//! fused-LayerNorm path: for few token rows (one image + CFG), where that pass is a launch of
//! mostly latency ([`GemmLayerNorm::rows_limit`] says where), with [`GemmLnTile::Rows64`]; for
//! many, where it is ~15% of a step's memory traffic, with [`GemmLnTile::Rows128`]. Same
//! contract as `residual_layernorm` over an f32 product, or (`round_v`) over the bf16 v of
//! `FORA_BF16_RESIDUAL`.

use super::device::{check_positive, check_ptr, KernelLauncher, TmaTensor2d};
use super::params::{GemmLayerNormParams, TmaDescriptor};
use anyhow::{ensure, Context, Result};

/// The kernel: each CTA loads its A tile.
pub const GEMM_LN_KERNEL: &str = "gemm_tma_ln_64x72";
/// The kernel with the A tile multicast across the cluster ([`GemmLayerNorm::multicast`]).
pub const GEMM_LN_MC_KERNEL: &str = "gemm_tma_ln_mc_64x72";
/// The row width every tile's cluster covers (DiT-XL/2's 1152 = 16 x 72 = 8 x 144).
const DIM: u32 = 1152;
/// k-depth of a ring slot (one 128-byte swizzle row of bf16).
const DEPTH: u32 = 64;

/// The token rows a cluster covers, and with them the kernel's warpgroups, ring and occupancy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmLnTile {
    /// `gemm_tma_ln[_mc]_64x72`: 64 rows, one consumer warpgroup, five stages; for few rows
    /// (one image + CFG of DiT-XL/2 is 8 clusters, 128 CTAs).
    Rows64,
    /// `gemm_tma_ln[_mc]_128x72`: 128 rows, two consumer warpgroups on each W tile (half the W
    /// bytes a FLOP), three stages and at most 112 registers so that two CTAs share an SM: one's
    /// epilogue traffic under the other's mainloop. For many rows (FORA_GEMM_LN_MANY_ROWS).
    Rows128,
    /// `gemm_tma_ln[_mc]_128x144`: 128 rows of 144 columns a CTA, in clusters of 8 (wgmma
    /// m64n144k16: twice m64n72k16's math a k-step for 1.5x its shared-memory operand bytes),
    /// six stages, one CTA an SM. The other tile for many rows (FORA_GEMM_LN_WIDE).
    Wide128,
}

impl GemmLnTile {
    /// Every tile, the few-rows one first.
    pub const ALL: [GemmLnTile; 3] = [GemmLnTile::Rows64, GemmLnTile::Rows128, GemmLnTile::Wide128];

    /// Token rows a cluster.
    pub const fn rows(self) -> u32 {
        match self {
            GemmLnTile::Rows64 => 64,
            GemmLnTile::Rows128 | GemmLnTile::Wide128 => 128,
        }
    }

    /// Columns a CTA.
    pub const fn columns(self) -> u32 {
        match self {
            GemmLnTile::Rows64 | GemmLnTile::Rows128 => 72,
            GemmLnTile::Wide128 => 144,
        }
    }

    /// CTAs a cluster: a whole row's width.
    pub const fn cluster(self) -> u32 {
        DIM / self.columns()
    }

    /// Rows of the A tile a CTA loads and multicasts (gemm_ln_sm90.cu's kLnSliceRows): 8, or
    /// as many more as spread the tile over the cluster.
    const fn slice_rows(self) -> u32 {
        let spread = self.rows() / self.cluster();
        if spread > 8 {
            spread
        } else {
            8
        }
    }

    /// Ring stages (gemm_ln_sm90.cu's instantiations).
    const fn stages(self) -> u32 {
        match self {
            GemmLnTile::Rows64 => 5,
            GemmLnTile::Rows128 => 3,
            GemmLnTile::Wide128 => 6,
        }
    }

    /// The consumer warpgroups (one per 64 rows) and the producer warp.
    const fn threads(self) -> u32 {
        2 * self.rows() + 32
    }

    /// Whether a cluster of this tile's kernel (A multicast or not) can be resident on `gpu`
    /// (the driver's count, after the launch's shared-memory and non-portable-cluster
    /// attributes are set): a cluster of 16 must fit one GPC (8 SMs at two CTAs an SM), which
    /// a small partition of a GPU may not have (a cluster of 8 of the one-an-SM
    /// [`GemmLnTile::Wide128`]: 8 SMs). A device that refuses the attributes or the query
    /// counts as no, so that the model keeps the unfused path there.
    pub fn fits(self, gpu: &impl KernelLauncher, multicast: bool) -> bool {
        self.resident_clusters(gpu, multicast, false) > 0
    }

    /// Clusters of this tile's kernel (A multicast or not) the driver holds at once on `gpu`,
    /// launched as [`GemmLayerNorm::one_per_sm`] says; 0 where the device refuses the
    /// launch's attributes or the query.
    pub fn resident_clusters(
        self,
        gpu: &impl KernelLauncher,
        multicast: bool,
        one_per_sm: bool,
    ) -> usize {
        let name = self.kernel_name(multicast);
        let smem = launch_smem_bytes(self, one_per_sm);
        if gpu.allow_dynamic_shared_memory(name, smem).is_err()
            || (self.non_portable() && gpu.allow_non_portable_clusters(name).is_err())
        {
            return 0;
        }
        gpu.max_active_clusters(name, self.cluster(), self.threads(), smem)
            .unwrap_or(0)
    }

    /// The tile that serves a computing forward of `token_rows` rows of width `dim` on `gpu`:
    /// the one decision of the model, the bench and the GPU tests. [`GemmLnTile::Rows64`] up to
    /// [`GemmLayerNorm::rows_limit`] token rows where the driver holds every one of its
    /// clusters at once (a second wave would double the launch); past them
    /// [`GemmLnTile::Rows128`], or with `wide` [`GemmLnTile::Wide128`], where the driver holds
    /// one of its clusters (many waves either way). None off a Hopper or for rows other than
    /// 1,152.
    pub fn for_rows(
        gpu: &impl KernelLauncher,
        dim: usize,
        token_rows: usize,
        wide: bool,
    ) -> Option<GemmLnTile> {
        if gpu.compute_capability().0 != 9 || !gemm_ln_supports_dim(dim) {
            return None;
        }
        if token_rows <= GemmLayerNorm::rows_limit(gpu.multiprocessors()) {
            let tile = GemmLnTile::Rows64;
            return (tile.resident_clusters(gpu, true, false) >= tile.clusters_for(token_rows))
                .then_some(tile);
        }
        let tile = if wide {
            GemmLnTile::Wide128
        } else {
            GemmLnTile::Rows128
        };
        tile.fits(gpu, true).then_some(tile)
    }

    /// Clusters a launch over `token_rows` rows takes.
    pub fn clusters_for(self, token_rows: usize) -> usize {
        token_rows.div_ceil(self.rows() as usize)
    }

    /// Whether launches of this tile over `token_rows` rows may run one CTA an SM
    /// ([`GemmLayerNorm::one_per_sm`], `FORA_GEMM_LN_ONE_PER_SM`): the few-rows tile only where
    /// the driver still holds every cluster at once (a cluster of 16 then needs 16 SMs of one
    /// GPC, which some GPCs may not have); the many-rows tiles (which run in waves) where it
    /// holds at least one cluster so (a partition without a GPC of 16 free SMs has none).
    pub fn one_per_sm_serves(self, gpu: &impl KernelLauncher, token_rows: usize) -> bool {
        let resident = self.resident_clusters(gpu, true, true);
        if self == GemmLnTile::Rows64 {
            resident >= self.clusters_for(token_rows)
        } else {
            resident > 0
        }
    }

    /// Whether the cluster is past the portable 8 CTAs (the kernel must be opted in).
    const fn non_portable(self) -> bool {
        self.cluster() > 8
    }

    /// The kernel, with the A tile multicast across the cluster or not.
    pub const fn kernel_name(self, multicast: bool) -> &'static str {
        match (self, multicast) {
            (GemmLnTile::Rows64, false) => GEMM_LN_KERNEL,
            (GemmLnTile::Rows64, true) => GEMM_LN_MC_KERNEL,
            (GemmLnTile::Rows128, false) => "gemm_tma_ln_128x72",
            (GemmLnTile::Rows128, true) => "gemm_tma_ln_mc_128x72",
            (GemmLnTile::Wide128, false) => "gemm_tma_ln_128x144",
            (GemmLnTile::Wide128, true) => "gemm_tma_ln_mc_128x144",
        }
    }
}

/// Dynamic shared memory a CTA of `tile`: the ring, the cluster's statistics (cluster x rows
/// float pairs), two mbarriers a stage and 1 KiB to align the base to 1024 bytes
/// (gemm_ln_sm90.cu).
pub const fn gemm_ln_smem_bytes(tile: GemmLnTile) -> u32 {
    let (rows, stages) = (tile.rows(), tile.stages());
    stages * (rows + tile.columns()) * DEPTH * 2 + tile.cluster() * rows * 8 + stages * 16 + 1024
}

/// The shared memory a launch of `tile` asks for a CTA: [`gemm_ln_smem_bytes`], or with
/// `one_per_sm` at least [`ONE_PER_SM_SMEM`].
pub const fn launch_smem_bytes(tile: GemmLnTile, one_per_sm: bool) -> u32 {
    let smem = gemm_ln_smem_bytes(tile);
    if one_per_sm && smem < ONE_PER_SM_SMEM {
        ONE_PER_SM_SMEM
    } else {
        smem
    }
}

/// Whether the kernels serve rows of `dim` columns (16 CTAs x 72 or 8 x 144: DiT-XL/2's 1152).
pub fn gemm_ln_supports_dim(dim: usize) -> bool {
    dim == DIM as usize
}

/// One launch: `a` bf16 `[m, k]` (rows `lda` apart), `w` bf16 `[dim, k]` (rows `ldw` apart), and the
/// residual / LayerNorm operands of [`GemmLayerNormParams`] (device addresses).
#[derive(Clone, Copy, Debug)]
pub struct GemmLayerNorm {
    /// bf16 `[m, k]`, 16-byte aligned.
    pub a: u64,
    /// bf16 `[dim, k]` (a Linear weight `[out, in]`), 16-byte aligned.
    pub w: u64,
    /// Elements between rows of `a` (a multiple of 8, at least k).
    pub lda: usize,
    /// Elements between rows of `w` (a multiple of 8, at least k).
    pub ldw: usize,
    /// f32 `[dim]`.
    pub bias: u64,
    /// bf16 `[m, dim]` for v (the FORA cache), or 0.
    pub cache: u64,
    /// f32 `[m, dim]`, the residual stream, updated in place.
    pub x: u64,
    /// f32 `[m / tokens, ld_mod]`: the adaLN table.
    pub modulation: u64,
    /// bf16 `[m, dim]`: the modulated LayerNorm of the new x.
    pub out: u64,
    /// Token rows.
    pub m: usize,
    /// Depth of the product.
    pub k: usize,
    /// Row width (the Linear's out features).
    pub dim: usize,
    /// Token rows a model row (its modulation row).
    pub tokens: usize,
    /// Elements between the modulation table's rows.
    pub ld_mod: usize,
    /// The table's column of the residual gate.
    pub gate_col: usize,
    /// The table's column of the LayerNorm's shift.
    pub shift_col: usize,
    /// The table's column of the LayerNorm's scale.
    pub scale_col: usize,
    /// The residual adds bf16(v) (`FORA_BF16_RESIDUAL`'s numbers: a computing step adds what a
    /// reuse step adds from the cache) instead of the f32 v.
    pub round_v: bool,
    /// LayerNorm epsilon (1e-6 in DiT).
    pub eps: f32,
    /// Ask for [`ONE_PER_SM_SMEM`] bytes of shared memory a CTA, more than half an SM's, so
    /// that no two CTAs share an SM. Without it two fit an SM, so a cluster of 16 fits a GPC of
    /// 8 free SMs, but the scheduler may also put two of a cluster on one SM (the tensor cores
    /// shared); with it a cluster needs 16 SMs of one GPC. Which is faster is for a GPU to say
    /// (the bench times both).
    pub one_per_sm: bool,
    /// `gemm_tma_ln_mc_*`: the 16 CTAs of a cluster share the A tile, 8 (or 16) of them loading
    /// 8 rows each and multicasting them to all, so each A tile is read from L2 once a cluster
    /// instead of 16 times (the 64 x 72 tiles need about twice the L2 bytes a FLOP of 128 x
    /// 128 ones without it). The same results.
    pub multicast: bool,
    /// The rows a cluster: [`GemmLnTile::Rows64`] for few rows, [`GemmLnTile::Rows128`] for
    /// many. The same results.
    pub tile: GemmLnTile,
    /// `FORA_PREFETCH_WEIGHTS`: up to two ranges (address, bytes; 0 for none) that the launch
    /// asks L2 to fetch while it runs, each CTA its share: the next GEMMs' weights. 16-byte
    /// aligned, whole 16-byte chunks. A hint: no result depends on it.
    pub prefetch: [(u64, i64); 2],
}

/// The shared memory a CTA asks for with [`GemmLayerNorm::one_per_sm`]: 120 KiB (two CTAs
/// with their 1 KiB reserve each would need more than an SM's 228 KiB).
pub const ONE_PER_SM_SMEM: u32 = 120 * 1024;

impl GemmLayerNorm {
    /// Token rows up to which the model takes this kernel (when enabled): 8 clusters of 16
    /// CTAs at 512 rows are about one CTA an SM of a Hopper; past a few times that the CTAs'
    /// 64 x 72 tiles are too small for the tensor cores and the unfused GEMM's larger tiles win.
    pub fn rows_limit(sm_count: usize) -> usize {
        let tile = GemmLnTile::Rows64;
        (sm_count / tile.cluster() as usize).max(1) * tile.rows() as usize * 2
    }

    /// Checks everything the kernel relies on, on a device of `compute_capability`, with errors
    /// that name the field (the operands' tensor maps check A's and W's addresses and strides).
    pub fn validate(&self, compute_capability: (i32, i32)) -> Result<()> {
        let name = self.kernel();
        let (major, minor) = compute_capability;
        ensure!(
            major == 9,
            "{name}: needs a Hopper (sm_90a: wgmma, TMA, clusters); this device is sm_{major}{minor}"
        );
        ensure!(
            gemm_ln_supports_dim(self.dim),
            "{name}: rows of {} columns; it is built for {DIM} ({} CTAs of {})",
            self.dim,
            self.tile.cluster(),
            self.tile.columns()
        );
        check_positive(name, "m", self.m as i64)?;
        check_positive(name, "k", self.k as i64)?;
        check_positive(name, "tokens", self.tokens as i64)?;
        ensure!(
            self.m <= i32::MAX as usize && self.k <= i32::MAX as usize,
            "{name}: M = {} or K = {} beyond the kernel's 32-bit indices",
            self.m,
            self.k
        );
        ensure!(
            self.k.is_multiple_of(8),
            "{name}: K = {} must be a multiple of 8 (16-byte TMA rows)",
            self.k
        );
        // float2 accesses of the columns' pairs.
        for (field, col) in [
            ("ld_mod", self.ld_mod),
            ("gate_col", self.gate_col),
            ("shift_col", self.shift_col),
            ("scale_col", self.scale_col),
        ] {
            ensure!(
                col.is_multiple_of(2),
                "{name}: {field} = {col} must be even"
            );
        }
        for (field, col) in [
            ("gate_col", self.gate_col),
            ("shift_col", self.shift_col),
            ("scale_col", self.scale_col),
        ] {
            ensure!(
                col + self.dim <= self.ld_mod,
                "{name}: {field} {col} + dim {} exceeds the modulation row length ld_mod {}",
                self.dim,
                self.ld_mod
            );
        }
        ensure!(
            self.eps.is_finite() && self.eps > 0.0,
            "{name}: eps must be finite and > 0, got {}",
            self.eps
        );
        check_ptr(name, "bias", self.bias, 8)?;
        check_ptr(name, "x", self.x, 8)?;
        check_ptr(name, "modulation", self.modulation, 8)?;
        check_ptr(name, "out", self.out, 4)?;
        if self.cache != 0 {
            check_ptr(name, "cache", self.cache, 4)?;
        }
        for (i, &(base, bytes)) in self.prefetch.iter().enumerate() {
            ensure!(
                bytes == 0
                    || (base != 0 && base.is_multiple_of(16) && bytes > 0 && bytes % 16 == 0),
                "{name}: prefetch range {i} ({base:#x}, {bytes} bytes) must be 16-byte aligned \
                 whole chunks, or 0 bytes"
            );
        }
        Ok(())
    }

    /// The kernel this launch runs.
    pub fn kernel(&self) -> &'static str {
        self.tile.kernel_name(self.multicast)
    }

    /// The kernel's parameters: the checks, then the operands' tensor maps.
    pub fn params(&self, gpu: &impl KernelLauncher) -> Result<GemmLayerNormParams> {
        self.validate(gpu.compute_capability())?;
        let operand = |base: u64, rows: usize, ld: usize, box_rows: u32| TmaTensor2d {
            base,
            rows: rows as u64,
            cols: self.k as u64,
            row_stride: ld as u64,
            box_rows,
            box_cols: DEPTH,
        };
        // With multicast a CTA loads a slice of the A tile.
        let a_rows = if self.multicast {
            self.tile.slice_rows()
        } else {
            self.tile.rows()
        };
        let a_map: TmaDescriptor = gpu
            .tma_descriptor_2d(&operand(self.a, self.m, self.lda, a_rows))
            .with_context(|| format!("{}: the tensor map of A", self.kernel()))?;
        let w_map = gpu
            .tma_descriptor_2d(&operand(self.w, self.dim, self.ldw, self.tile.columns()))
            .with_context(|| format!("{}: the tensor map of W", self.kernel()))?;
        Ok(GemmLayerNormParams {
            a_map,
            w_map,
            bias: self.bias,
            cache: self.cache,
            x: self.x,
            modulation: self.modulation,
            out: self.out,
            m: self.m as i32,
            k: self.k as i32,
            dim: self.dim as i32,
            tokens: self.tokens as i32,
            ld_mod: self.ld_mod as i32,
            gate_col: self.gate_col as i32,
            shift_col: self.shift_col as i32,
            scale_col: self.scale_col as i32,
            round_v: self.round_v as i32,
            eps: self.eps,
            prefetch_a: self.prefetch[0].0,
            prefetch_b: self.prefetch[1].0,
            prefetch_a_bytes: self.prefetch[0].1,
            prefetch_b_bytes: self.prefetch[1].1,
        })
    }

    /// Launches the kernel: a cluster ([`GemmLnTile::cluster`] CTAs) for each 64 (128) token
    /// rows.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn launch(&self, gpu: &impl KernelLauncher) -> Result<()> {
        let params = self.params(gpu)?;
        let name = self.kernel();
        let smem = launch_smem_bytes(self.tile, self.one_per_sm);
        gpu.allow_dynamic_shared_memory(name, smem)?;
        if self.tile.non_portable() {
            gpu.allow_non_portable_clusters(name)?;
        }
        let clusters = self.m.div_ceil(self.tile.rows() as usize);
        let grid = clusters
            .checked_mul(self.tile.cluster() as usize)
            .filter(|&g| g <= i32::MAX as usize)
            .with_context(|| format!("{name}: M = {} needs too many CTAs", self.m))?;
        // SAFETY: `params` checked the shapes, alignment and non-null pointers the kernel relies
        // on, and the tensor maps describe exactly A [M, K] and W [dim, K]; the buffers' extents
        // (x, out and cache [M, dim], the modulation rows of M / tokens model rows) are the
        // caller's contract, as for residual_layernorm.
        let threads = self.tile.threads();
        unsafe { gpu.launch_kernel(name, (grid as u32, 1, 1), (threads, 1, 1), smem, &params) }
            .with_context(|| {
                format!(
                    "launching {name} (M={} K={} dim={})",
                    self.m, self.k, self.dim
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_ln_shared_memory_matches_the_kernel() {
        // gemm_ln_sm90.cu's comment: 5 stages of (64 + 72) x 64 bf16, 16 x 64 float pairs, two
        // barriers a stage, 1 KiB of alignment (3 stages of (128 + 72) x 64, 16 x 128 pairs);
        // two CTAs fit an SM's 228 KiB (1 KiB reserved each).
        assert_eq!(gemm_ln_smem_bytes(GemmLnTile::Rows64), 96_336);
        assert_eq!(gemm_ln_smem_bytes(GemmLnTile::Rows128), 94_256);
        // 6 stages of (128 + 144) x 64, 8 x 128 pairs: one CTA an SM, within its 227 KiB.
        assert_eq!(gemm_ln_smem_bytes(GemmLnTile::Wide128), 218_208);
        assert!(gemm_ln_smem_bytes(GemmLnTile::Wide128) <= 227 * 1024);
        for tile in [GemmLnTile::Rows64, GemmLnTile::Rows128] {
            assert!(2 * (gemm_ln_smem_bytes(tile) + 1024) <= 228 * 1024);
            // One a SM with one_per_sm, within a CTA's 227 KiB.
            assert!(ONE_PER_SM_SMEM >= gemm_ln_smem_bytes(tile));
        }
        const { assert!(2 * (ONE_PER_SM_SMEM + 1024) > 228 * 1024 && ONE_PER_SM_SMEM <= 227 * 1024) };
        assert_eq!(GemmLnTile::Rows64.threads(), 160);
        assert_eq!(GemmLnTile::Rows128.threads(), 288);
        assert_eq!(GemmLnTile::Wide128.threads(), 288);
        // Every cluster covers the 1152-wide row; multicast slices of whole 1024-byte atoms.
        for tile in GemmLnTile::ALL {
            assert_eq!(tile.cluster() * tile.columns(), 1152, "{tile:?}");
            assert_eq!(tile.slice_rows() % 8, 0, "{tile:?}");
            assert!(
                tile.rows() / tile.slice_rows() <= tile.cluster(),
                "{tile:?}"
            );
        }
        assert_eq!(GemmLnTile::Wide128.slice_rows(), 16);
    }

    #[test]
    fn gemm_ln_fits_where_the_driver_holds_a_cluster() {
        use crate::cuda::device::FakeLauncher;
        let gpu = |smem_limit, non_portable, clusters| FakeLauncher {
            smem_limit,
            non_portable,
            clusters,
        };
        for tile in GemmLnTile::ALL {
            for multicast in [false, true] {
                assert!(tile.fits(&gpu(227 * 1024, true, 1), multicast));
                // No cluster resident, clusters of 16 refused (those of 8 are portable), or
                // the shared memory refused.
                assert!(!tile.fits(&gpu(227 * 1024, true, 0), multicast));
                assert_eq!(
                    tile.fits(&gpu(227 * 1024, false, 7), multicast),
                    tile == GemmLnTile::Wide128
                );
                assert!(!tile.fits(&gpu(64 * 1024, true, 7), multicast));
            }
        }
    }

    #[test]
    fn gemm_ln_tile_for_rows_and_its_waves() {
        use crate::cuda::device::FakeLauncher;
        let gpu = |clusters| FakeLauncher {
            smem_limit: 227 * 1024,
            non_portable: true,
            clusters,
        };
        // One image + CFG of DiT-XL/2: 512 token rows, 8 clusters of 64, all resident or none.
        assert_eq!(GemmLnTile::Rows64.clusters_for(512), 8);
        assert_eq!(
            GemmLnTile::for_rows(&gpu(8), 1152, 512, false),
            Some(GemmLnTile::Rows64)
        );
        assert_eq!(GemmLnTile::for_rows(&gpu(7), 1152, 512, false), None);
        assert_eq!(GemmLnTile::for_rows(&gpu(8), 1152, 513, false), None);
        assert_eq!(GemmLnTile::for_rows(&gpu(8), 1024, 512, false), None);
        // Past the few rows: one resident cluster is enough; `wide` picks the 144-wide tile.
        assert_eq!(
            GemmLnTile::for_rows(&gpu(1), 1152, 65_536, false),
            Some(GemmLnTile::Rows128)
        );
        assert_eq!(
            GemmLnTile::for_rows(&gpu(1), 1152, 65_536, true),
            Some(GemmLnTile::Wide128)
        );
        assert_eq!(GemmLnTile::for_rows(&gpu(0), 1152, 65_536, true), None);
        // One CTA an SM: the few-rows tile only with every cluster still resident.
        assert!(GemmLnTile::Rows64.one_per_sm_serves(&gpu(8), 512));
        assert!(!GemmLnTile::Rows64.one_per_sm_serves(&gpu(7), 512));
        assert!(GemmLnTile::Rows128.one_per_sm_serves(&gpu(1), 65_536));
        // The many-rows tiles run in waves: one resident cluster is enough, none is not.
        assert!(!GemmLnTile::Rows128.one_per_sm_serves(&gpu(0), 65_536));
        assert!(!GemmLnTile::Wide128.one_per_sm_serves(&gpu(0), 65_536));
        // The launch's shared memory: at least ONE_PER_SM_SMEM one an SM.
        assert_eq!(launch_smem_bytes(GemmLnTile::Rows64, true), ONE_PER_SM_SMEM);
        assert_eq!(launch_smem_bytes(GemmLnTile::Rows64, false), 96_336);
        assert_eq!(launch_smem_bytes(GemmLnTile::Wide128, true), 218_208);
    }

    #[test]
    fn gemm_ln_rows_limit() {
        // 132 SMs: 8 clusters of 16, up to 1024 token rows (one or two images + CFG).
        assert_eq!(GemmLayerNorm::rows_limit(132), 1024);
        assert!(gemm_ln_supports_dim(1152));
        assert!(!gemm_ln_supports_dim(1024) && !gemm_ln_supports_dim(384));
    }
}
