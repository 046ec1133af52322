//! Launcher of `kernels/fora.cu`: the FORA reuse step. One launch applies every block's cached
//! attention and MLP outputs to the f32 residual stream with the current step's gates:
//! `for l in 0..L { x += gate_msa_l * A_l; x += gate_mlp_l * M_l }`, in f32, in order; and
//! the fused reuse forward, which does the same between the patch embedding and the final
//! LayerNorm + modulate, all in one launch; and the cache sums (`FORA_REUSE_SUM`): one pass over
//! the cache for the layers' summed updates of several reuse steps (`fora_cache_sum`), and the
//! fused reuse forward from such a sum (`fora_sum_final`).

use super::device::{
    check_latent_grid, check_positive, check_ptr, grid_x, Gpu, KernelLauncher, L2Window,
};
use super::params::{ForaCacheSumParams, ForaReuseFinalParams, ForaReuseParams};
use anyhow::{ensure, Result};

const THREADS: u32 = 256;
/// Elements per thread on the kernel's vector path (kVec in fora.cu).
const VEC: i64 = 8;

/// The cache layout the kernel reads: `[layers][2][slab]` bf16, A_l then M_l. Elements of the
/// whole cache for `rows * tokens * dim` activations per slab.
pub fn cache_elements(layers: usize, rows: usize, tokens: usize, dim: usize) -> usize {
    layers * 2 * rows * tokens * dim
}

/// Whether the kernel takes its 8-wide vector path for `p` (DiT shapes always do).
fn vector_path(p: &ForaReuseParams) -> bool {
    p.dim as i64 % VEC == 0
        && p.slab % VEC == 0
        && p.ld_mod % 4 == 0
        && p.layer_cols % 4 == 0
        && p.gate_msa_col % 4 == 0
        && p.gate_mlp_col % 4 == 0
}

/// Where the gates sit in a modulation row: layer l's at `l * layer_cols + gate_*_col`.
struct GateColumns {
    layers: i32,
    dim: i32,
    ld_mod: i32,
    layer_cols: i32,
    gate_msa_col: i32,
    gate_mlp_col: i32,
}

/// The [`GateColumns`] of a kernel's params (every FORA params struct names them alike).
macro_rules! gate_columns {
    ($p:expr) => {
        GateColumns {
            layers: $p.layers,
            dim: $p.dim,
            ld_mod: $p.ld_mod,
            layer_cols: $p.layer_cols,
            gate_msa_col: $p.gate_msa_col,
            gate_mlp_col: $p.gate_mlp_col,
        }
    };
}

/// Each table offset a multiple of 4: the kernel reads those columns as float4.
fn check_float4_offsets(kernel: &str, offsets: &[(&str, i32)]) -> Result<()> {
    for &(field, v) in offsets {
        ensure!(
            v % 4 == 0,
            "{kernel}: {field} = {v} must be a multiple of 4"
        );
    }
    Ok(())
}

/// [`check_gate_columns`], and every column offset a multiple of 4 (float4 gate loads).
fn check_vector_gates(kernel: &str, g: &GateColumns) -> Result<()> {
    check_gate_columns(kernel, g)?;
    check_float4_offsets(
        kernel,
        &[
            ("ld_mod", g.ld_mod),
            ("layer_cols", g.layer_cols),
            ("gate_msa_col", g.gate_msa_col),
            ("gate_mlp_col", g.gate_mlp_col),
        ],
    )
}

/// Every layer's gates lie inside a modulation row.
fn check_gate_columns(kernel: &str, g: &GateColumns) -> Result<()> {
    ensure!(
        g.layer_cols >= 0 && g.gate_msa_col >= 0 && g.gate_mlp_col >= 0,
        "{kernel}: modulation column offsets must be >= 0"
    );
    let last_layer = (g.layers as i64 - 1) * g.layer_cols as i64;
    let widest = g.gate_msa_col.max(g.gate_mlp_col) as i64 + g.dim as i64;
    ensure!(
        last_layer + widest <= g.ld_mod as i64,
        "{kernel}: layer {} gates (column {} + {}) exceed the modulation row length ld_mod {}",
        g.layers - 1,
        last_layer,
        widest,
        g.ld_mod
    );
    Ok(())
}

/// Validates `p` and returns the grid of [`fora_reuse`].
pub fn fora_reuse_plan(p: &ForaReuseParams) -> Result<(u32, u32, u32)> {
    const K: &str = "fora_reuse";
    check_positive(K, "rows", p.rows.into())?;
    check_positive(K, "tokens", p.tokens.into())?;
    check_positive(K, "dim", p.dim.into())?;
    check_positive(K, "layers", p.layers.into())?;
    let total = p.rows as i64 * p.tokens as i64 * p.dim as i64;
    ensure!(
        p.slab >= total,
        "{K}: cache slab {} is smaller than rows*tokens*dim = {total}",
        p.slab
    );
    check_gate_columns(K, &gate_columns!(p))?;
    let vec = vector_path(p);
    let align = if vec { 16 } else { 4 };
    check_ptr(K, "x", p.x, align)?;
    check_ptr(K, "cache", p.cache, if vec { 16 } else { 2 })?;
    check_ptr(K, "modulation", p.modulation, align)?;
    let per_thread = if vec { VEC } else { 1 };
    Ok((grid_x(K, total, THREADS as i64 * per_thread)?, 1, 1))
}

/// Applies the cached block outputs of all `layers` to `x` with the current gates.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn fora_reuse(gpu: &impl KernelLauncher, p: &ForaReuseParams) -> Result<()> {
    let grid = fora_reuse_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel("fora_reuse", grid, (THREADS, 1, 1), 0, p) }
}

/// Threads per block of the fused kernel at most (kReuseBlock in fora.cu).
const FUSED_BLOCK: i32 = 256;
/// Largest C*p*p the fused kernel embeds (kReuseMaxPatch).
pub const FUSED_MAX_PATCH_ELEMENTS: i32 = 64;
/// Token rows per block at most (kReuseMaxRows).
const FUSED_MAX_ROWS: i32 = 32;
/// Widest model the fused kernel takes: a token row's chunks of 8 fit one block.
pub const FUSED_MAX_DIM: i32 = 8 * FUSED_BLOCK;

/// Threads per token row of the fused kernel: dim / 8 rounded up to a power of two below a
/// warp, to whole warps above (reuse_group_threads in fora.cu).
fn fused_group_threads(dim: i32) -> i32 {
    let chunks = dim / VEC as i32;
    if chunks >= 32 {
        (chunks + 31) / 32 * 32
    } else {
        (chunks.max(1) as u32).next_power_of_two() as i32
    }
}

/// Most outputs a token of the final Linear fused into `fora_reuse_final` (kMaxOut).
pub const FUSED_FINAL_MAX_OUT: i32 = 32;

/// Whether `fora_reuse_final` can apply the final Linear itself: `n_out` (p*p*out_channels)
/// outputs at most [`FUSED_FINAL_MAX_OUT`], and rows of whole warps (dim > 128). Every DiT
/// with patch 2 can; the embedded model (dim 64) uses the GEMM.
pub fn fused_final_linear_supported(dim: usize, n_out: usize) -> bool {
    (1..=FUSED_FINAL_MAX_OUT as usize).contains(&n_out) && fused_group_threads(dim as i32) >= 32
}

/// Why the fused reuse forward cannot run a model of these sizes (None: it can). Every DiT can;
/// a caller falls back to patch_embed + fora_reuse + layernorm_modulate otherwise.
pub fn fused_reuse_unsupported(dim: usize, patch_elements: usize) -> Option<String> {
    if !dim.is_multiple_of(VEC as usize) || dim > FUSED_MAX_DIM as usize {
        return Some(format!(
            "fora_reuse_final needs dim % 8 == 0 and dim <= {FUSED_MAX_DIM}, got {dim}"
        ));
    }
    if patch_elements > FUSED_MAX_PATCH_ELEMENTS as usize {
        return Some(format!(
            "fora_reuse_final embeds patches of C*p*p <= {FUSED_MAX_PATCH_ELEMENTS}, got \
             {patch_elements}"
        ));
    }
    None
}

/// Validates `p` and returns the grid and block of [`fora_reuse_final`].
pub fn fora_reuse_final_plan(
    p: &ForaReuseFinalParams,
    tpt: ReuseTokens,
) -> Result<((u32, u32, u32), u32)> {
    const K: &str = "fora_reuse_final";
    check_positive(K, "layers", p.layers.into())?;
    let launch = reuse_final_common(K, p, tpt.tokens())?;
    let tokens = (p.height / p.patch) as i64 * (p.width / p.patch) as i64;
    let total = p.rows as i64 * tokens * p.dim as i64;
    ensure!(
        p.slab >= total && p.slab % VEC == 0,
        "{K}: cache slab {} must be a multiple of 8 and >= rows*T*dim = {total}",
        p.slab
    );
    check_vector_gates(K, &gate_columns!(p))?;
    check_ptr(K, "cache", p.cache, 16)?;
    Ok(launch)
}

/// Validates `p` for [`fora_sum_final`] with `tokens` (1 or 4) tokens a thread (the cache,
/// layers and gates are not read; `sum` is) and returns its grid and block.
pub fn fora_sum_final_plan(
    p: &ForaReuseFinalParams,
    tokens: i32,
) -> Result<((u32, u32, u32), u32)> {
    const K: &str = "fora_sum_final";
    ensure!(
        tokens == 1 || tokens == 4,
        "{K}: 1 or 4 tokens a thread, not {tokens}"
    );
    let launch = reuse_final_common(K, p, tokens)?;
    check_ptr(K, "sum", p.sum, 16)?;
    Ok(launch)
}

/// The checks `fora_reuse_final` and `fora_sum_final` share (the embedding, the final
/// LayerNorm's columns, the outputs), and the grid and block of `tpt` tokens a thread.
fn reuse_final_common(
    kernel: &str,
    p: &ForaReuseFinalParams,
    tpt: i32,
) -> Result<((u32, u32, u32), u32)> {
    let (tokens, k) = check_latent_grid(
        kernel,
        [p.images, p.rows, p.channels, p.height, p.width, p.patch],
    )?;
    check_positive(kernel, "dim", p.dim.into())?;
    if let Some(why) = fused_reuse_unsupported(p.dim as usize, k as usize) {
        anyhow::bail!("{why}");
    }
    ensure!(
        p.shift_col >= 0
            && p.scale_col >= 0
            && p.shift_col.max(p.scale_col) as i64 + p.dim as i64 <= p.ld_mod as i64,
        "{kernel}: the final shift/scale columns {} / {} (+ dim {}) exceed ld_mod {}",
        p.shift_col,
        p.scale_col,
        p.dim,
        p.ld_mod
    );
    // float4 shift and scale loads.
    check_float4_offsets(
        kernel,
        &[
            ("ld_mod", p.ld_mod),
            ("shift_col", p.shift_col),
            ("scale_col", p.scale_col),
        ],
    )?;
    check_ptr(kernel, "latents", p.latents, 4)?;
    for (field, ptr) in [
        ("embed_weight_t", p.embed_weight_t),
        ("embed_bias", p.embed_bias),
        ("pos", p.pos),
        ("modulation", p.modulation),
    ] {
        check_ptr(kernel, field, ptr, 16)?;
    }
    if p.final_w != 0 {
        ensure!(
            fused_final_linear_supported(p.dim as usize, p.n_out.max(0) as usize),
            "{kernel}: the fused final Linear needs 1..={FUSED_FINAL_MAX_OUT} outputs and dim > \
             128, got n_out {} and dim {}",
            p.n_out,
            p.dim
        );
        check_ptr(kernel, "final_w", p.final_w, 16)?;
        check_ptr(kernel, "final_b", p.final_b, 4)?;
        check_ptr(kernel, "final_out", p.final_out, 4)?;
    } else {
        check_ptr(kernel, "out", p.out, 16)?;
    }
    if p.x != 0 {
        check_ptr(kernel, "x", p.x, 16)?;
    }
    ensure!(p.eps > 0.0, "{kernel}: eps must be > 0, got {}", p.eps);
    let group = fused_group_threads(p.dim);
    let per_block = (FUSED_BLOCK / group).clamp(1, FUSED_MAX_ROWS / tpt);
    let chunks = (tokens + tpt as i64 - 1) / tpt as i64;
    let groups = p.rows as i64 * chunks;
    let grid = grid_x(kernel, groups, per_block as i64)?;
    Ok(((grid, 1, 1), (group * per_block) as u32))
}

/// The variants of `fora_reuse_final`: tokens per thread (each f32 gate load serves that many
/// bf16 cache loads) and layers of loads in flight. Every variant gives the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReuseTokens {
    /// One token a thread, two layers in flight (`fora_reuse_final`).
    One,
    /// One token a thread, four layers in flight (`fora_reuse_final_l4`): half the dependent
    /// round trips, more registers. Not picked; measured by `fora bench`.
    OneDeep,
    /// Two tokens a thread, two layers in flight (`fora_reuse_final_t2`). Not picked; measured
    /// by `fora bench`.
    Two,
    /// Four tokens a thread, one layer in flight (`fora_reuse_final_t4`); what
    /// [`ReuseTokens::pick`] took for many rows until session 18.
    Four,
    /// [`ReuseTokens::One`] asking L2 for four more layers ahead (`fora_reuse_final_p4`): more
    /// DRAM reads in flight at few rows without more registers. Not picked: on an H200
    /// (session 18) 26.6 us at 2 rows, 3130 at 256.
    OnePrefetch,
    /// [`ReuseTokens::Four`] asking L2 for two more layers ahead (`fora_reuse_final_t4_p2`).
    /// Not picked: on an H200 (session 18) 38.5 us at 2 rows, 2801 at 256.
    FourPrefetch,
    /// Four tokens a thread, loads through a ring of three layers in shared memory, two in
    /// flight by cp.async (`fora_reuse_final_t4_r3`, 96 KiB dynamic shared memory): what
    /// [`ReuseTokens::pick`] takes for many rows. On an H200 (session 18) 2164 us at 256 rows
    /// against 2307 for [`ReuseTokens::Four`] (4.0 against 3.8 TB/s); at 2 rows 36.7 us
    /// against [`ReuseTokens::One`]'s 24.5.
    FourRing,
    /// One token a thread, a ring of four layers, three in flight (`fora_reuse_final_r4`,
    /// 32 KiB). Not picked: on an H200 (session 18) 28.7 us at 2 rows, 2699 at 256.
    OneRing,
}

impl ReuseTokens {
    /// Every variant, `One` (the default) first.
    pub const ALL: [ReuseTokens; 8] = [
        ReuseTokens::One,
        ReuseTokens::OneDeep,
        ReuseTokens::Two,
        ReuseTokens::Four,
        ReuseTokens::OnePrefetch,
        ReuseTokens::FourPrefetch,
        ReuseTokens::FourRing,
        ReuseTokens::OneRing,
    ];

    /// Kernel name, tokens a thread, layers of cache loads a thread has in flight, layers
    /// asked of L2 ahead of those (prefetch hints, no registers), and the layers of the
    /// shared-memory ring (0: loads into registers); must match fora.cu's
    /// `reuse_final_body<TPT, CHUNK, AHEAD, RING>` (a ring keeps RING - 1 layers in flight).
    fn spec(self) -> (&'static str, i32, i32, i32, i32) {
        match self {
            ReuseTokens::One => ("fora_reuse_final", 1, 2, 0, 0),
            ReuseTokens::OneDeep => ("fora_reuse_final_l4", 1, 4, 0, 0),
            ReuseTokens::Two => ("fora_reuse_final_t2", 2, 2, 0, 0),
            ReuseTokens::Four => ("fora_reuse_final_t4", 4, 1, 0, 0),
            ReuseTokens::OnePrefetch => ("fora_reuse_final_p4", 1, 2, 4, 0),
            ReuseTokens::FourPrefetch => ("fora_reuse_final_t4_p2", 4, 1, 2, 0),
            ReuseTokens::FourRing => ("fora_reuse_final_t4_r3", 4, 2, 0, 3),
            ReuseTokens::OneRing => ("fora_reuse_final_r4", 1, 3, 0, 4),
        }
    }

    /// Layers of the shared-memory ring the cache loads go through (0: none).
    pub fn ring(self) -> i32 {
        self.spec().4
    }

    /// Dynamic shared memory of a block of `block` threads: the ring's uint4 slots, both slabs
    /// of every token of every thread, for each of its layers.
    pub fn dynamic_smem_bytes(self, block: u32) -> u32 {
        (self.ring() * 2 * self.tokens()) as u32 * block * 16
    }

    /// Tokens a thread.
    pub fn tokens(self) -> i32 {
        self.spec().1
    }

    /// Layers of cache loads each thread has in flight (in registers, or in the ring).
    pub fn layers_in_flight(self) -> i32 {
        self.spec().2
    }

    /// Layers asked of L2 ahead of those in flight (prefetch hints, no registers).
    pub fn layers_prefetched(self) -> i32 {
        self.spec().3
    }

    /// The kernel's `extern "C"` name.
    pub fn kernel(self) -> &'static str {
        self.spec().0
    }

    /// Four tokens a thread, loads through the shared-memory ring ([`ReuseTokens::FourRing`],
    /// the fastest on an H200 at 256 rows), once that still leaves 8 groups of threads per SM
    /// (from 32 rows of 256 tokens on an H100); fewer rows keep one a thread, for enough loads
    /// in flight.
    pub fn pick(p: &ForaReuseFinalParams, multiprocessors: usize) -> ReuseTokens {
        let tokens = (p.height / p.patch.max(1)) as i64 * (p.width / p.patch.max(1)) as i64;
        if p.rows as i64 * tokens / 4 >= 8 * multiprocessors as i64 {
            ReuseTokens::FourRing
        } else {
            ReuseTokens::One
        }
    }
}

/// The reuse forward up to the final Linear: patch embedding, every block's cached outputs
/// with this step's gates, the final LayerNorm + modulate into `p.out` (bf16). The variant is
/// [`ReuseTokens::pick`]'s.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn fora_reuse_final(gpu: &impl KernelLauncher, p: &ForaReuseFinalParams) -> Result<()> {
    let tpt = ReuseTokens::pick(p, gpu.multiprocessors());
    unsafe { fora_reuse_final_with(gpu, p, tpt) }
}

/// [`fora_reuse_final`] launched with an L2 access-policy window over the FORA cache
/// (`FORA_L2_PERSIST=1`): the part of the cache the window's hit ratio selects stays in the
/// persisting set-aside of L2 from one reuse step to the next (the full steps in between update
/// those lines in place), instead of coming from DRAM each time. Same numbers.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn fora_reuse_final_in_l2_window(
    gpu: &Gpu,
    p: &ForaReuseFinalParams,
    window: &L2Window,
) -> Result<()> {
    let tpt = ReuseTokens::pick(p, gpu.multiprocessors());
    let (grid, block) = fora_reuse_final_plan(p, tpt)?;
    let smem = tpt.dynamic_smem_bytes(block);
    gpu.allow_dynamic_shared_memory(tpt.kernel(), smem)?;
    // SAFETY: validated by the plan, as in fora_reuse_final_with.
    unsafe { gpu.launch_in_l2_window(tpt.kernel(), grid, (block, 1, 1), smem, p, window) }
}

/// [`fora_reuse_final`] with the tokens per thread chosen by the caller (tests, benchmarks).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn fora_reuse_final_with(
    gpu: &impl KernelLauncher,
    p: &ForaReuseFinalParams,
    tpt: ReuseTokens,
) -> Result<()> {
    let (grid, block) = fora_reuse_final_plan(p, tpt)?;
    let smem = tpt.dynamic_smem_bytes(block);
    gpu.allow_dynamic_shared_memory(tpt.kernel(), smem)?;
    // SAFETY: validated above; the ring (if any) is the dynamic shared memory of `block`.
    unsafe { gpu.launch_kernel(tpt.kernel(), grid, (block, 1, 1), smem, p) }
}

/// The reuse forward of a step whose cache sum is ready (`p.sum`, from [`fora_cache_sum`]):
/// the patch embedding + the sum, the final LayerNorm + modulate into `p.out` (or, with
/// `p.final_w`, the final Linear into `p.final_out`). Four tokens a thread where
/// [`ReuseTokens::pick`] takes four for the cache kernel (many rows), else one.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn fora_sum_final(gpu: &impl KernelLauncher, p: &ForaReuseFinalParams) -> Result<()> {
    unsafe { fora_sum_final_with(gpu, p, sum_final_tokens(p, gpu.multiprocessors())) }
}

/// Tokens a thread [`fora_sum_final`] takes for `p` on `multiprocessors` SMs: four where
/// [`ReuseTokens::pick`] takes four for the cache kernel, else one.
pub fn sum_final_tokens(p: &ForaReuseFinalParams, multiprocessors: usize) -> i32 {
    ReuseTokens::pick(p, multiprocessors).tokens()
}

/// The `fora_sum_final` kernels: one and four tokens a thread.
const SUM_FINAL_KERNELS: [&str; 2] = ["fora_sum_final", "fora_sum_final_t4"];

/// Every fused reuse forward kernel (`fora_reuse_final`'s variants and `fora_sum_final`'s):
/// a captured reuse step holds one of them.
pub fn fused_reuse_kernels() -> impl Iterator<Item = &'static str> {
    ReuseTokens::ALL
        .iter()
        .map(|t| t.kernel())
        .chain(SUM_FINAL_KERNELS)
}

/// [`fora_sum_final`] with `tokens` (1 or 4) tokens a thread chosen by the caller (tests,
/// benchmarks); both give the same bits.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn fora_sum_final_with(
    gpu: &impl KernelLauncher,
    p: &ForaReuseFinalParams,
    tokens: i32,
) -> Result<()> {
    let (grid, block) = fora_sum_final_plan(p, tokens)?;
    let kernel = SUM_FINAL_KERNELS[(tokens == 4) as usize];
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel(kernel, grid, (block, 1, 1), 0, p) }
}

/// Most sums one [`fora_cache_sum`] launch computes (kernels `fora_cache_sum_1` ..
/// `fora_cache_sum_4`).
pub const CACHE_SUM_MAX: usize = 4;
/// Threads a block of `fora_cache_sum_*` (kSumThreads) and channel chunks of 8 it spans
/// (kSumLanes).
const SUM_THREADS: i64 = 256;
const SUM_LANES: i64 = 16;

/// Tokens a thread of `fora_cache_sum_<count>` holds (the kernels' TOKENS).
fn cache_sum_tokens(count: i32) -> i64 {
    if count <= 2 {
        2
    } else {
        1
    }
}

/// Validates `p` and returns the kernel and grid of [`fora_cache_sum`].
pub fn fora_cache_sum_plan(p: &ForaCacheSumParams) -> Result<(&'static str, (u32, u32, u32))> {
    const K: &str = "fora_cache_sum";
    check_positive(K, "rows", p.rows.into())?;
    check_positive(K, "tokens", p.tokens.into())?;
    check_positive(K, "dim", p.dim.into())?;
    check_positive(K, "layers", p.layers.into())?;
    ensure!(
        (1..=CACHE_SUM_MAX as i32).contains(&p.count),
        "{K}: count (sums a launch) must be 1..={CACHE_SUM_MAX}, got {}",
        p.count
    );
    ensure!(
        p.dim as i64 % VEC == 0,
        "{K}: dim must be a multiple of 8, got {}",
        p.dim
    );
    let total = p.rows as i64 * p.tokens as i64 * p.dim as i64;
    ensure!(
        p.slab >= total && p.slab % VEC == 0,
        "{K}: cache slab {} must be a multiple of 8 and >= rows*tokens*dim = {total}",
        p.slab
    );
    ensure!(
        p.sum_stride >= total && p.sum_stride % 4 == 0,
        "{K}: sum_stride {} must be a multiple of 4 and >= rows*tokens*dim = {total}",
        p.sum_stride
    );
    let table = p.rows as i64 * p.ld_mod as i64;
    ensure!(
        p.table_stride >= table && p.table_stride % 4 == 0,
        "{K}: table_stride {} must be a multiple of 4 and >= rows*ld_mod = {table}",
        p.table_stride
    );
    check_vector_gates(K, &gate_columns!(p))?;
    check_ptr(K, "cache", p.cache, 16)?;
    check_ptr(K, "tables", p.tables, 16)?;
    check_ptr(K, "sums", p.sums, 16)?;
    let chunk_blocks = (p.dim as i64 / VEC + SUM_LANES - 1) / SUM_LANES;
    let tokens = cache_sum_tokens(p.count);
    let groups = p.rows as i64 * ((p.tokens as i64 + tokens - 1) / tokens);
    let group_blocks = (groups + SUM_THREADS / SUM_LANES - 1) / (SUM_THREADS / SUM_LANES);
    let kernel = cache_sum_kernel(p.count as usize);
    Ok((kernel, (grid_x(K, chunk_blocks * group_blocks, 1)?, 1, 1)))
}

/// The `fora_cache_sum_<count>` kernel that computes `count` sums (1..=[`CACHE_SUM_MAX`]).
pub fn cache_sum_kernel(count: usize) -> &'static str {
    match count {
        1 => "fora_cache_sum_1",
        2 => "fora_cache_sum_2",
        3 => "fora_cache_sum_3",
        _ => "fora_cache_sum_4",
    }
}

/// The cache sums of the next `p.count` reuse steps in one pass over the cache: for each step
/// r (its table at `p.tables + r * p.table_stride`), `sums[r] = sum over layers of gate_msa *
/// A_l + gate_mlp * M_l` in layer order, f32. Each of those steps then runs
/// [`fora_sum_final`] on its sum instead of reading the whole cache.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn fora_cache_sum(gpu: &impl KernelLauncher, p: &ForaCacheSumParams) -> Result<()> {
    let (kernel, grid) = fora_cache_sum_plan(p)?;
    // SAFETY: validated above.
    unsafe { gpu.launch_kernel(kernel, grid, (SUM_THREADS as u32, 1, 1), 0, p) }
}
