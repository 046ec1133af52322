//! The DiT forward on the GPU, assembled from the launchers: weights uploaded once (bf16 GEMM
//! operands, f32 biases and tables), activations and the FORA cache allocated once per row
//! count, and the forward as a fixed sequence of launches on the device's stream.
//!
//! Per forward (R model rows, T tokens, L blocks):
//! conditioning (timestep features -> t-MLP -> + label -> SiLU) -> ONE adaLN GEMM for all L
//! blocks and the final layer -> patch embed into the f32 residual stream -> L blocks (compute)
//! or one FORA reuse launch -> final LayerNorm/modulate -> final Linear (f32, token layout).
//! The caller then unpatchifies (plain forward) or runs the sampler update (sampling).

use super::attention::AttentionImpl;
use super::cublaslt::LtBatch;
use super::device::{dptr_at, to_bf16, KernelLauncher, L2SetAside, L2Window};
use super::gemm::{gemm_params, Epilogue, Gemm, GemmImpl};
use super::gemm_ln::GemmLnTile;
use super::params::{
    AttentionParams, ForaCacheSumParams, ForaReuseFinalParams, ForaReuseParams, GemmParams,
    LabelSiluParams, LayerNormModulateParams, PatchEmbedParams, ResidualLayerNormParams,
    SiluParams, TimestepEmbedParams,
};
use super::{dptr, Gpu};
use crate::backend::StepMode;
use crate::config::DitConfig;
use crate::weights::{DitWeights, FREQ_DIM};
use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;
use half::bf16;

/// What one forward does, besides reading its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardKind {
    /// Run the blocks and fill the FORA cache, or reuse the cache.
    pub mode: StepMode,
    /// The flash-attention kernels of a computing forward
    /// ([`super::CudaOptions::attention`]).
    pub attention: AttentionImpl,
    /// First compute the modulation table from `acts.t` and `acts.labels`; without, the table
    /// is already there (a sampler that precomputed every step's tables, or computed this
    /// step's on a second stream).
    pub with_modulation: bool,
    /// Device address of the modulation table, f32 [rows, ada_cols] (None: `acts.modulation`).
    pub table: Option<u64>,
    /// A reuse forward as one `fora_reuse_final` launch (patch embedding, cached residuals,
    /// final LayerNorm, and the final Linear where the model's rows are whole warps and it has
    /// at most 32 outputs a token: every DiT/2) instead of four, where the model's sizes allow
    /// it. The same numbers up to the LayerNorm's and the Linear's summation orders.
    pub fused_reuse: bool,
    /// With `fused_reuse`: the final Linear in the same launch where the picked variant holds
    /// one token a thread; without, the final GEMM runs after it.
    pub fused_final: bool,
    /// Apply the final Linear (into `acts.final_out`). Without, the forward ends at the final
    /// LayerNorm + modulate (`acts.xn`): the sampler's `final_sampler_step` applies the Linear
    /// itself ([`GpuModel::final_linear`]).
    pub final_linear: bool,
    /// With cuBLASLt GEMMs, or the TMA GEMMs and `bf16_residual`: proj's and fc2's residual
    /// epilogue and the LayerNorm after each as one `residual_layernorm` launch (instead of the
    /// epilogue kernel and layernorm_modulate). The same numbers up to the residual's FMA
    /// contraction and the LayerNorm's summation order.
    pub fused_ln: bool,
    /// With cuBLASLt GEMMs: qkv and fc1 fuse their bias (and GELU) with a bf16 copy of the
    /// bias where cuBLASLt refuses an f32 bias with a bf16 output (see
    /// [`Gemm::run_with_bias_bf16`]); without, they fall back to the f32 product and the
    /// epilogue kernel there.
    pub bias_bf16: bool,
    /// With `fused_ln`: proj and fc2 write their block output v = bf16(product + bias) from
    /// cuBLASLt straight into the FORA cache (or a scratch without one), and the residual adds
    /// that bf16 v, as a reuse step adds the cached one; instead of an f32 product, f32 v in
    /// the residual and a separate cache store. With the TMA GEMMs, likewise from our kernel,
    /// except where it splits K: there its raw f32 slices go to `residual_layernorm`, which
    /// sums them (no epilogue kernel between).
    pub bf16_residual: bool,
    /// A reuse forward that computes its own modulation table computes only the columns it
    /// reads (every gate and the final shift / scale: a third of the adaLN GEMM), with a
    /// cuBLASLt strided batch where there is one.
    pub reuse_gates_only: bool,
    /// With `fused_ln` and without `bf16_residual`: proj's and fc2's f32 products as cuBLASLt
    /// split-K slices where the output is too small to fill the SMs
    /// ([`Gemm::lt_product_splits`]), summed by `residual_layernorm`.
    pub lt_splitk: bool,
    /// The fusions that serve some row counts and not others ([`FusionsInEffect::resolve`]
    /// says which run).
    pub fusions: FusionSwitches,
    /// A reuse forward whose cache sum is ready (`FORA_REUSE_SUM`): the device address of
    /// the step's sum, f32 [rows*T, D] (from [`GpuModel::cache_sums`]); `fora_sum_final`
    /// reads it instead of the cache, and the forward's own table (if it computes one) needs
    /// only the final shift / scale. Needs the fused reuse forward.
    pub reuse_sum: Option<u64>,
}

/// The switches of the fusions that serve some row counts and not others
/// ([`ForwardKind::fusions`], from [`super::CudaOptions`]'s fields of the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusionSwitches {
    /// With `fused_ln` and at most [`PREFETCH_MAX_TOKENS`] token rows: each
    /// `residual_layernorm` pass asks L2 to fetch the next two GEMMs' weights
    /// ([`super::CudaOptions::prefetch_weights`]).
    pub prefetch_weights: bool,
    /// With `fused_ln`: proj and fc2 with their residual and LayerNorm as one
    /// `gemm_tma_ln_mc_64x72` launch where it serves the shape ([`GemmLnTile::for_rows`]),
    /// instead of the GEMM and `residual_layernorm` ([`super::CudaOptions::gemm_ln`]).
    pub gemm_ln: bool,
    /// The same past the few rows, with `gemm_tma_ln_mc_128x72`
    /// ([`GemmLnTile::for_rows`], [`super::CudaOptions::gemm_ln_many_rows`]).
    pub gemm_ln_many_rows: bool,
    /// With `gemm_ln_many_rows`: past the few rows `gemm_tma_ln_mc_128x144` instead
    /// ([`super::CudaOptions::gemm_ln_wide`]).
    pub gemm_ln_wide: bool,
    /// The fused proj / fc2 + LayerNorm's CTAs one an SM
    /// ([`super::gemm_ln::GemmLayerNorm::one_per_sm`], [`super::CudaOptions::gemm_ln_one_per_sm`]).
    pub gemm_ln_one_per_sm: bool,
    /// Each block's qkv Linear and attention as one `qkv_attention_*` launch where it serves the
    /// shape ([`GpuModel::qkv_attention_serves`]) instead of the GEMM and the attention kernel
    /// ([`super::CudaOptions::qkv_attention`]).
    pub qkv_attention: bool,
}

/// What [`FusionSwitches`] come to in a computing forward of some rows on some card: what
/// [`GpuModel::forward`] launches (it takes its decisions from here), and how the tuner tells
/// options that differ only in switches of no effect at a run's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusionsInEffect {
    /// proj / fc2 with their residual and LayerNorm in one launch on this tile.
    pub gemm_ln_tile: Option<GemmLnTile>,
    /// Its CTAs one an SM.
    pub gemm_ln_one_per_sm: bool,
    /// The fused qkv + attention.
    pub qkv_attention: bool,
    /// The fused LayerNorm passes' L2 prefetch of the next weights.
    pub prefetch_weights: bool,
}

impl FusionsInEffect {
    /// The fusions a forward of `rows` model rows of `cfg` on `gpu` runs under `switches`;
    /// `fuse_ln`: whether proj / fc2 + LayerNorm are fused at all there (a computing step,
    /// `fused_ln`, a GEMM path that serves it).
    pub fn resolve(
        gpu: &Gpu,
        cfg: &DitConfig,
        rows: usize,
        fuse_ln: bool,
        switches: FusionSwitches,
    ) -> FusionsInEffect {
        let rt = rows * cfg.tokens();
        // proj / fc2 with their residual and LayerNorm in one launch (FORA_GEMM_LN, few rows;
        // FORA_GEMM_LN_MANY_ROWS, many, on the tile FORA_GEMM_LN_WIDE says).
        let gemm_ln_tile = if fuse_ln && (switches.gemm_ln || switches.gemm_ln_many_rows) {
            GemmLnTile::for_rows(gpu, cfg.hidden, rt, switches.gemm_ln_wide).filter(|&tile| {
                match tile {
                    GemmLnTile::Rows64 => switches.gemm_ln,
                    GemmLnTile::Rows128 | GemmLnTile::Wide128 => switches.gemm_ln_many_rows,
                }
            })
        } else {
            None
        };
        FusionsInEffect {
            gemm_ln_tile,
            // FORA_GEMM_LN_ONE_PER_SM, where every few-rows cluster stays resident so.
            gemm_ln_one_per_sm: switches.gemm_ln_one_per_sm
                && gemm_ln_tile.is_some_and(|t| t.one_per_sm_serves(gpu, rt)),
            qkv_attention: switches.qkv_attention && GpuModel::qkv_attention_serves(gpu, cfg, rows),
            // Weights the fused LayerNorm passes ask L2 to fetch (FORA_PREFETCH_WEIGHTS, few
            // rows): only where those passes run.
            prefetch_weights: switches.prefetch_weights && prefetch_serves(fuse_ln, rt),
        }
    }

    /// The fewest switches that come to these fusions ([`FusionsInEffect::resolve`] of them,
    /// with `fuse_ln`, gives these back): each switch on only where it changes a launch.
    pub fn switches(&self) -> FusionSwitches {
        FusionSwitches {
            gemm_ln: self.gemm_ln_tile == Some(GemmLnTile::Rows64),
            gemm_ln_many_rows: matches!(
                self.gemm_ln_tile,
                Some(GemmLnTile::Rows128 | GemmLnTile::Wide128)
            ),
            gemm_ln_wide: self.gemm_ln_tile == Some(GemmLnTile::Wide128),
            gemm_ln_one_per_sm: self.gemm_ln_one_per_sm,
            qkv_attention: self.qkv_attention,
            prefetch_weights: self.prefetch_weights,
        }
    }
}

/// Whether `FORA_PREFETCH_WEIGHTS` changes a computing forward of `token_rows` rows: the fused
/// LayerNorm passes (`fuse_ln`) carry the prefetch, at most [`PREFETCH_MAX_TOKENS`] rows.
pub fn prefetch_serves(fuse_ln: bool, token_rows: usize) -> bool {
    fuse_ln && token_rows <= PREFETCH_MAX_TOKENS
}

/// Most token rows (model rows x tokens) a forward prefetches weights at
/// ([`FusionSwitches::prefetch_weights`]): 2,048 (8 rows of DiT/2 at 256 px). Past that the
/// activations a GEMM streams would evict the weights before it reads them.
pub const PREFETCH_MAX_TOKENS: usize = 2048;

/// The columns of a modulation table a forward computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableColumns {
    /// Every block's six chunks and the final shift / scale.
    All,
    /// What a reuse forward reads: every gate and the final shift / scale.
    Gates,
    /// What a reuse forward from a cache sum reads: the final shift / scale.
    Final,
    /// What a cache-sum pass reads: every gate.
    GatesOnly,
}

/// Where the gates of the steps one [`GpuModel::cache_sums`] pass serves come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumTables {
    /// Precomputed tables, f32 [rows, ada_cols] each, step j's at `first + j * stride`
    /// elements.
    Precomputed {
        /// Device address of step 0's table.
        first: u64,
        /// Elements from one step's table to the next.
        stride: usize,
    },
    /// Computed here (gates only) from the steps' timesteps, f32 `[count][rows]` at `t`, into
    /// `scratch`, f32 `[count][rows, ada_cols]`.
    Compute {
        /// Device address of the steps' timesteps.
        t: u64,
        /// Device address of the tables' scratch.
        scratch: u64,
    },
}

/// A block's output (proj or fc2) on the fused-LayerNorm path, as a device address.
#[derive(Clone, Copy)]
enum BlockOutput {
    /// The f32 product without the bias (cuBLASLt's scratch): the sum, in order, of `splits`
    /// split-K slices `[rows*T, D]` one after another.
    F32Product { acc: u64, splits: usize },
    /// v = bf16(product + bias), `[rows*T, D]`.
    Bf16(u64),
}

/// One transformer block's GEMM weights on the device.
struct BlockWeights {
    qkv_w: CudaSlice<bf16>,
    qkv_b: CudaSlice<f32>,
    proj_w: CudaSlice<bf16>,
    proj_b: CudaSlice<f32>,
    fc1_w: CudaSlice<bf16>,
    fc1_b: CudaSlice<f32>,
    fc2_w: CudaSlice<bf16>,
    fc2_b: CudaSlice<f32>,
    /// bf16 copies of the biases, for cuBLASLt's fused bias with a bf16 output.
    qkv_b16: CudaSlice<bf16>,
    fc1_b16: CudaSlice<bf16>,
    proj_b16: CudaSlice<bf16>,
    fc2_b16: CudaSlice<bf16>,
}

/// A DiT's weights on the device.
pub struct GpuModel {
    cfg: DitConfig,
    /// The patch-embedding conv weight transposed, `[C*p*p, D]` (coalesced kernel reads).
    x_embed_w_t: CudaSlice<f32>,
    x_embed_b: CudaSlice<f32>,
    pos_embed: CudaSlice<f32>,
    t_mlp0_w: CudaSlice<bf16>,
    t_mlp0_b: CudaSlice<f32>,
    t_mlp2_w: CudaSlice<bf16>,
    t_mlp2_b: CudaSlice<f32>,
    y_table: CudaSlice<f32>,
    /// Every block's adaLN Linear and the final layer's, stacked: [L*6D + 2D, D], so that one
    /// GEMM produces the whole modulation table of a step.
    ada_w: CudaSlice<bf16>,
    ada_b: CudaSlice<f32>,
    blocks: Vec<BlockWeights>,
    final_w: CudaSlice<bf16>,
    final_b: CudaSlice<f32>,
}

impl GpuModel {
    /// Uploads validated weights (checked against `cfg` first).
    pub fn upload(gpu: &Gpu, cfg: &DitConfig, w: &DitWeights) -> Result<GpuModel> {
        w.check(cfg)?;
        let bytes = weight_bytes(cfg);
        gpu.ensure_free(bytes, &format!("the {} weights", cfg.arch_name()))?;
        let f32s = |v: &[f32], what: &str| gpu.upload(v, what);
        let bf16s = |v: &[f32], what: &str| gpu.upload(&to_bf16(v), what);
        let mut ada_w = Vec::with_capacity(ada_cols(cfg) * cfg.hidden);
        let mut ada_b = Vec::with_capacity(ada_cols(cfg));
        for b in &w.blocks {
            ada_w.extend_from_slice(&b.ada_w);
            ada_b.extend_from_slice(&b.ada_b);
        }
        ada_w.extend_from_slice(&w.final_ada_w);
        ada_b.extend_from_slice(&w.final_ada_b);
        let mut blocks = Vec::with_capacity(cfg.depth);
        for (l, b) in w.blocks.iter().enumerate() {
            blocks.push(BlockWeights {
                qkv_w: bf16s(&b.qkv_w, &format!("blocks.{l}.attn.qkv.weight"))?,
                qkv_b: f32s(&b.qkv_b, &format!("blocks.{l}.attn.qkv.bias"))?,
                proj_w: bf16s(&b.proj_w, &format!("blocks.{l}.attn.proj.weight"))?,
                proj_b: f32s(&b.proj_b, &format!("blocks.{l}.attn.proj.bias"))?,
                fc1_w: bf16s(&b.fc1_w, &format!("blocks.{l}.mlp.fc1.weight"))?,
                fc1_b: f32s(&b.fc1_b, &format!("blocks.{l}.mlp.fc1.bias"))?,
                fc2_w: bf16s(&b.fc2_w, &format!("blocks.{l}.mlp.fc2.weight"))?,
                fc2_b: f32s(&b.fc2_b, &format!("blocks.{l}.mlp.fc2.bias"))?,
                qkv_b16: bf16s(&b.qkv_b, &format!("blocks.{l}.attn.qkv.bias (bf16)"))?,
                fc1_b16: bf16s(&b.fc1_b, &format!("blocks.{l}.mlp.fc1.bias (bf16)"))?,
                proj_b16: bf16s(&b.proj_b, &format!("blocks.{l}.attn.proj.bias (bf16)"))?,
                fc2_b16: bf16s(&b.fc2_b, &format!("blocks.{l}.mlp.fc2.bias (bf16)"))?,
            });
        }
        Ok(GpuModel {
            cfg: cfg.clone(),
            x_embed_w_t: f32s(
                &super::embed::transpose_patch_weight(&w.x_embed_w, cfg.hidden),
                "x_embedder.proj.weight",
            )?,
            x_embed_b: f32s(&w.x_embed_b, "x_embedder.proj.bias")?,
            pos_embed: f32s(&w.pos_embed, "pos_embed")?,
            t_mlp0_w: bf16s(&w.t_mlp0_w, "t_embedder.mlp.0.weight")?,
            t_mlp0_b: f32s(&w.t_mlp0_b, "t_embedder.mlp.0.bias")?,
            t_mlp2_w: bf16s(&w.t_mlp2_w, "t_embedder.mlp.2.weight")?,
            t_mlp2_b: f32s(&w.t_mlp2_b, "t_embedder.mlp.2.bias")?,
            y_table: f32s(&w.y_table, "y_embedder.embedding_table.weight")?,
            ada_w: gpu.upload(&to_bf16(&ada_w), "the stacked adaLN weights")?,
            ada_b: f32s(&ada_b, "the stacked adaLN biases")?,
            blocks,
            final_w: bf16s(&w.final_w, "final_layer.linear.weight")?,
            final_b: f32s(&w.final_b, "final_layer.linear.bias")?,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &DitConfig {
        &self.cfg
    }

    /// The final Linear's device weight (bf16 [p*p*out_channels, D]) and bias (f32), for an
    /// update kernel that applies it (`final_sampler_step`).
    pub fn final_linear(&self) -> (u64, u64) {
        (dptr(&self.final_w), dptr(&self.final_b))
    }
}

/// The (N, K) of every GEMM the model runs through [`Gemm`], by which `FORA_TMA_TILES`
/// entries are looked up: the timestep MLP's two, the modulation table (whole, and the gate
/// and final-layer chunks a reuse step computes), the blocks' qkv, proj, fc1 and fc2, and the
/// final Linear. An entry for another shape changes nothing.
pub fn gemm_shapes(cfg: &DitConfig) -> [(usize, usize); 8] {
    let (d, mlp) = (cfg.hidden, cfg.mlp_hidden());
    [
        (d, FREQ_DIM),
        (d, d),
        (ada_cols(cfg), d),
        (2 * d, d),
        (3 * d, d),
        (mlp, d),
        (d, mlp),
        (cfg.patch_out(), d),
    ]
}

/// Whether a computing step fuses proj's / fc2's residual with the LayerNorm after each, for
/// model width `d`: asked for (`fused_ln`), on a GEMM path that serves it (cuBLASLt's products,
/// or our TMA GEMMs' bf16 v or split-K slices with `bf16_residual`), where the pass supports `d`.
pub fn fuses_ln(gemm: GemmImpl, fused_ln: bool, bf16_residual: bool, d: usize) -> bool {
    fused_ln
        && match gemm {
            GemmImpl::CublasLt => true,
            GemmImpl::Tma | GemmImpl::TmaMulticast => bf16_residual,
            GemmImpl::Custom | GemmImpl::Wgmma => false,
        }
        && super::norm::residual_layernorm_supports(d)
}

/// Columns of the modulation table: 6D per block, then the final layer's shift and scale.
pub fn ada_cols(cfg: &DitConfig) -> usize {
    cfg.depth * 6 * cfg.hidden + 2 * cfg.hidden
}

/// Device bytes of the uploaded weights (bf16 GEMM weights, f32 the rest).
pub fn weight_bytes(cfg: &DitConfig) -> usize {
    let (d, l) = (cfg.hidden, cfg.depth);
    let gemm_w = FREQ_DIM * d
        + d * d
        + ada_cols(cfg) * d
        + l * (3 * d * d + d * d + 2 * d * cfg.mlp_hidden())
        + cfg.patch_out() * d;
    let f32s = d * cfg.in_channels * cfg.patch * cfg.patch
        + cfg.tokens() * d
        + (cfg.num_classes + 1) * d
        + ada_cols(cfg)
        + l * (3 * d + d + cfg.mlp_hidden() + d)
        + 4 * d
        + cfg.patch_out();
    2 * gemm_w + 4 * f32s
}

/// Buffers of the conditioning path (timestep features -> t-MLP -> + label embedding -> SiLU)
/// for up to `rows` rows.
pub struct CondBuffers {
    /// Model rows the buffers hold.
    pub rows: usize,
    t_freq: CudaSlice<bf16>,
    t_hidden_f32: CudaSlice<f32>,
    t_hidden: CudaSlice<bf16>,
    t_emb: CudaSlice<f32>,
    silu_c: CudaSlice<bf16>,
}

/// Device bytes of [`CondBuffers`] for `rows` rows.
pub fn cond_bytes(cfg: &DitConfig, rows: usize) -> usize {
    rows * (FREQ_DIM * 2 + cfg.hidden * (4 + 2 + 4 + 2))
}

impl CondBuffers {
    /// Buffers for `rows` model rows (at least one).
    pub fn new(gpu: &Gpu, cfg: &DitConfig, rows: usize) -> Result<CondBuffers> {
        ensure!(rows > 0, "conditioning needs at least one row");
        let d = cfg.hidden;
        Ok(CondBuffers {
            rows,
            t_freq: gpu.alloc_zeros(rows * FREQ_DIM, "timestep features")?,
            t_hidden_f32: gpu.alloc_zeros(rows * d, "t-MLP hidden (f32)")?,
            t_hidden: gpu.alloc_zeros(rows * d, "t-MLP hidden")?,
            t_emb: gpu.alloc_zeros(rows * d, "timestep embedding")?,
            silu_c: gpu.alloc_zeros(rows * d, "SiLU(c)")?,
        })
    }
}

/// Activations of one forward of `rows` model rows, and the FORA cache of those rows where
/// they were made `with_cache` (a sampling workspace whose plan reuses it).
pub struct Activations {
    /// Model rows the buffers hold.
    pub rows: usize,
    /// Original timestep of each row, f32 `[rows]` (written by the host before a forward).
    pub t: CudaSlice<f32>,
    /// Label of each row, i32 `[rows]`.
    pub labels: CudaSlice<i32>,
    cond: CondBuffers,
    /// f32 [rows, ada_cols]: every block's six chunks, then the final shift and scale.
    pub modulation: CudaSlice<f32>,
    /// The residual stream, f32 [rows*T, D].
    pub x: CudaSlice<f32>,
    /// A LayerNorm + modulate's output, bf16 [rows*T, D]: after a forward, the final layer's.
    pub xn: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    hidden: CudaSlice<bf16>,
    /// The final Linear's output in token layout, f32 [rows*T, p*p*out_ch].
    pub final_out: CudaSlice<f32>,
    /// FORA cache, bf16 [L][2][rows*T*D]: attention output (after proj), MLP output (after fc2).
    cache: Option<CudaSlice<bf16>>,
    /// An L2 window over the cache for the fused reuse launch, and the set-aside it holds
    /// ([`Activations::persist_cache_in_l2`]).
    cache_l2: Option<(L2Window, L2SetAside)>,
}

/// Device bytes of [`Activations`] for `rows` rows (with or without the cache).
pub fn activation_bytes(cfg: &DitConfig, rows: usize, with_cache: bool) -> usize {
    let (d, t) = (cfg.hidden, cfg.tokens());
    let rt = rows * t;
    let small = rows * (2 * 4 + ada_cols(cfg) * 4) + cond_bytes(cfg, rows);
    let big = rt * d * 4
        + rt * d * 2
        + rt * 3 * d * 2
        + rt * d * 2
        + rt * cfg.mlp_hidden() * 2
        + rt * cfg.patch_out() * 4;
    let cache = if with_cache {
        cfg.depth * 2 * rt * d * 2
    } else {
        0
    };
    small + big + cache
}

/// Whether a forward of `rows` model rows fits one GEMM launch's rows
/// ([`GEMM_MAX_M`](super::gemm::GEMM_MAX_M) token rows); an error naming the largest batch if
/// not.
pub fn check_model_rows(cfg: &DitConfig, rows: usize) -> Result<()> {
    let token_rows = rows.saturating_mul(cfg.tokens());
    ensure!(
        token_rows <= super::gemm::GEMM_MAX_M,
        "{rows} model rows of {} are {token_rows} token rows, past the {} one GEMM launch takes: \
         at most {} model rows a run (with guidance, two an image)",
        cfg.arch_name(),
        super::gemm::GEMM_MAX_M,
        super::gemm::GEMM_MAX_M / cfg.tokens()
    );
    Ok(())
}

impl Activations {
    /// Buffers for a forward of `rows` model rows (at least one), with the FORA cache when
    /// `with_cache`.
    pub fn new(gpu: &Gpu, cfg: &DitConfig, rows: usize, with_cache: bool) -> Result<Activations> {
        ensure!(rows > 0, "a forward needs at least one row");
        // Refused here, before any allocation, rather than at the first GEMM's launch.
        check_model_rows(cfg, rows)?;
        let bytes = activation_bytes(cfg, rows, with_cache);
        gpu.ensure_free(bytes, &format!("{rows} model rows of {}", cfg.arch_name()))?;
        let (d, t) = (cfg.hidden, cfg.tokens());
        let rt = rows * t;
        Ok(Activations {
            rows,
            t: gpu.alloc_zeros(rows, "timesteps")?,
            labels: gpu.alloc_zeros(rows, "labels")?,
            cond: CondBuffers::new(gpu, cfg, rows)?,
            modulation: gpu.alloc_zeros(rows * ada_cols(cfg), "the modulation table")?,
            x: gpu.alloc_zeros(rt * d, "the residual stream")?,
            xn: gpu.alloc_zeros(rt * d, "normalized activations")?,
            qkv: gpu.alloc_zeros(rt * 3 * d, "qkv")?,
            attn: gpu.alloc_zeros(rt * d, "attention output")?,
            hidden: gpu.alloc_zeros(rt * cfg.mlp_hidden(), "MLP hidden")?,
            final_out: gpu.alloc_zeros(rt * cfg.patch_out(), "final layer output")?,
            cache: if with_cache {
                Some(gpu.alloc_zeros(cfg.depth * 2 * rt * d, "the FORA cache")?)
            } else {
                None
            },
            cache_l2: None,
        })
    }

    /// Keeps as much of the FORA cache in L2 between reuse steps as the device's persisting
    /// set-aside allows (`FORA_L2_PERSIST=1`): the fused reuse launch then carries an
    /// access-policy window over the cache. Returns whether it does (not without a cache, where
    /// the device has no set-aside, or where under a tenth of the cache would fit: 256 rows of
    /// DiT-XL/2 is 8.5 GB). The context's set-aside is restored when these activations drop.
    pub fn persist_cache_in_l2(&mut self, gpu: &Gpu) -> Result<bool> {
        let Some(cache) = &self.cache else {
            return Ok(false);
        };
        let bytes = cache.len() * std::mem::size_of::<bf16>();
        self.cache_l2 = gpu.persist_in_l2(dptr(cache), bytes)?;
        Ok(self.cache_l2.is_some())
    }

    /// Whether these activations hold the FORA cache (made `with_cache`): without it a
    /// computing forward writes its block outputs into a scratch and a reuse forward is an
    /// error.
    pub fn has_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// The L2 window over the cache, when [`Activations::persist_cache_in_l2`] set one.
    pub fn cache_l2_window(&self) -> Option<L2Window> {
        self.cache_l2.as_ref().map(|(w, _)| *w)
    }
}

/// The largest M*N of the forward's GEMMs for `rows` rows (sizes the cuBLASLt scratch).
pub fn max_gemm_mn(cfg: &DitConfig, rows: usize) -> usize {
    let rt = rows * cfg.tokens();
    [
        rt * cfg.mlp_hidden(),
        rt * 3 * cfg.hidden,
        rt * cfg.patch_out(),
        rows * ada_cols(cfg),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

/// The sizes and modulation-table columns of `fora_reuse_final` for `rows` model rows of a
/// DiT reading `images` images (every pointer 0, x not written): the caller adds its buffers.
pub fn reuse_final_params(cfg: &DitConfig, rows: usize, images: usize) -> ForaReuseFinalParams {
    let d = cfg.hidden;
    let fin = cfg.depth * 6 * d;
    ForaReuseFinalParams {
        latents: 0,
        embed_weight_t: 0,
        embed_bias: 0,
        pos: 0,
        cache: 0,
        sum: 0,
        modulation: 0,
        out: 0,
        x: 0,
        final_w: 0,
        final_b: 0,
        final_out: 0,
        slab: (rows * cfg.tokens() * d) as i64,
        images: images as i32,
        rows: rows as i32,
        channels: cfg.in_channels as i32,
        height: cfg.input_size as i32,
        width: cfg.input_size as i32,
        patch: cfg.patch as i32,
        dim: d as i32,
        layers: cfg.depth as i32,
        ld_mod: ada_cols(cfg) as i32,
        layer_cols: (6 * d) as i32,
        gate_msa_col: (2 * d) as i32,
        gate_mlp_col: (5 * d) as i32,
        shift_col: fin as i32,
        scale_col: (fin + d) as i32,
        n_out: cfg.patch_out() as i32,
        eps: 1e-6,
    }
}

/// The sizes and modulation-table columns of `fora_cache_sum` for `rows` model rows of a DiT
/// (every pointer 0, one sum; tables and sums packed: strides of one table and one sum): the
/// caller adds its buffers and count.
pub fn cache_sum_params(cfg: &DitConfig, rows: usize) -> ForaCacheSumParams {
    let (d, slab) = (cfg.hidden, rows * cfg.tokens() * cfg.hidden);
    ForaCacheSumParams {
        cache: 0,
        tables: 0,
        sums: 0,
        slab: slab as i64,
        table_stride: (rows * ada_cols(cfg)) as i64,
        sum_stride: slab as i64,
        rows: rows as i32,
        tokens: cfg.tokens() as i32,
        dim: d as i32,
        layers: cfg.depth as i32,
        ld_mod: ada_cols(cfg) as i32,
        layer_cols: (6 * d) as i32,
        gate_msa_col: (2 * d) as i32,
        gate_mlp_col: (5 * d) as i32,
        count: 1,
    }
}

impl GpuModel {
    /// Whether the fused qkv + attention ([`FusionSwitches::qkv_attention`]) serves `rows` model
    /// rows of a model of `cfg` on `gpu` ([`super::qkv_attention::QkvAttention::serves`], and
    /// [`super::qkv_attention::QkvAttention::resident_clusters`] holds them all at once).
    pub fn qkv_attention_serves(gpu: &Gpu, cfg: &DitConfig, rows: usize) -> bool {
        Self::qkv_attention_shape_serves(gpu, cfg, rows)
            // Every cluster (one a sequence and head) resident at once, as the driver counts
            // them (a cluster's CTAs share a GPC): else a second wave doubles the launch.
            && super::qkv_attention::QkvAttention::resident_clusters(gpu, cfg.head_dim(), true)
                >= rows * cfg.heads
    }

    /// The shape test of [`GpuModel::qkv_attention_serves`] alone
    /// ([`super::qkv_attention::QkvAttention::serves`]: a Hopper, a supported head and token
    /// count, at most SMs / 4 clusters), without the driver's residency count.
    pub fn qkv_attention_shape_serves(gpu: &Gpu, cfg: &DitConfig, rows: usize) -> bool {
        super::qkv_attention::QkvAttention::serves(
            gpu.compute_capability(),
            gpu.multiprocessors(),
            rows,
            cfg.heads,
            cfg.head_dim(),
            cfg.tokens(),
        )
    }

    /// Whether a reuse forward runs as the one `fora_reuse_final` launch (then the final GEMM):
    /// asked for (`fused_reuse`) and supported by this model's shapes. Its modulation table is
    /// then read by that launch alone.
    pub fn reuse_is_fused(&self, fused_reuse: bool) -> bool {
        let cfg = self.config();
        let patch_elements = cfg.in_channels * cfg.patch * cfg.patch;
        fused_reuse && super::fora::fused_reuse_unsupported(cfg.hidden, patch_elements).is_none()
    }

    /// The modulation table of `rows` rows: every block's six adaLN chunks and the final
    /// layer's shift and scale, f32 [rows, ada_cols] at `out`, from the rows' original
    /// timesteps (f32 `[rows]` at `t`) and labels (i32 `[rows]` at `labels`).
    ///
    /// # Safety
    /// `t`, `labels` and `out` must address live device memory of at least `rows` f32, `rows`
    /// i32 and `rows * ada_cols` f32, and `cond` and `gemm` must have been made for at least
    /// `rows` rows of this model.
    #[allow(clippy::too_many_arguments)] // device addresses of the inputs and the output
    pub unsafe fn modulation(
        &self,
        gpu: &Gpu,
        gemm: &Gemm,
        cond: &CondBuffers,
        rows: usize,
        t: u64,
        labels: u64,
        out: u64,
        columns: TableColumns,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (d, cols) = (cfg.hidden, ada_cols(cfg));
        ensure!(
            rows > 0 && rows <= cond.rows,
            "conditioning of {rows} rows with buffers for {}",
            cond.rows
        );
        // Conditioning: c = t_mlp(timestep features) + label embedding; SiLU(c) feeds every adaLN.
        unsafe {
            super::conditioning::timestep_embedding(
                gpu,
                &TimestepEmbedParams {
                    t,
                    out: dptr(&cond.t_freq),
                    rows: rows as i32,
                    half: (FREQ_DIM / 2) as i32,
                    ldo: FREQ_DIM as i32,
                },
            )
        }?;
        unsafe {
            gemm.run(
                gpu,
                &gemm_params(
                    dptr(&cond.t_freq),
                    dptr(&self.t_mlp0_w),
                    dptr(&self.t_mlp0_b),
                    dptr(&cond.t_hidden_f32),
                    rows,
                    d,
                    FREQ_DIM,
                    Epilogue::BiasF32,
                ),
            )
        }?;
        unsafe {
            super::conditioning::silu_f32_bf16(
                gpu,
                &SiluParams {
                    input: dptr(&cond.t_hidden_f32),
                    out: dptr(&cond.t_hidden),
                    rows: rows as i32,
                    cols: d as i32,
                    ld_in: d as i32,
                    ldo: d as i32,
                },
            )
        }?;
        unsafe {
            gemm.run(
                gpu,
                &gemm_params(
                    dptr(&cond.t_hidden),
                    dptr(&self.t_mlp2_w),
                    dptr(&self.t_mlp2_b),
                    dptr(&cond.t_emb),
                    rows,
                    d,
                    d,
                    Epilogue::BiasF32,
                ),
            )
        }?;
        unsafe {
            super::conditioning::label_silu(
                gpu,
                &LabelSiluParams {
                    t_emb: dptr(&cond.t_emb),
                    labels,
                    table: dptr(&self.y_table),
                    out: dptr(&cond.silu_c),
                    rows: rows as i32,
                    dim: d as i32,
                    ld_t: d as i32,
                    ldo: d as i32,
                    num_labels: (cfg.num_classes + 1) as i32,
                },
            )
        }?;
        if columns != TableColumns::All
            && unsafe { self.reuse_columns(gpu, gemm, cond, rows, out, columns) }?
        {
            return Ok(());
        }
        // Every block's modulations and the final layer's in one GEMM.
        unsafe {
            gemm.run(
                gpu,
                &gemm_params(
                    dptr(&cond.silu_c),
                    dptr(&self.ada_w),
                    dptr(&self.ada_b),
                    out,
                    rows,
                    cols,
                    d,
                    Epilogue::BiasF32,
                ),
            )
        }?;

        Ok(())
    }

    /// The `columns` (not `All`) of the modulation table, from SiLU(c) in `cond.silu_c`: the
    /// gates, every block's gate_msa and gate_mlp (one cuBLASLt strided batch: they start every
    /// 3D columns from 2D, 2L chunks of D; a third of the adaLN GEMM's work and weight
    /// traffic), and the final layer's shift and scale (one GEMM). Ok(false), writing nothing,
    /// where the gates need a cuBLASLt strided batch it does not have (or the GEMMs are not
    /// cuBLASLt).
    ///
    /// # Safety
    /// The addresses given must point to live device memory of the sizes the launch reads and
    /// writes (the callers pass a workspace's own buffers).
    unsafe fn reuse_columns(
        &self,
        gpu: &Gpu,
        gemm: &Gemm,
        cond: &CondBuffers,
        rows: usize,
        out: u64,
        columns: TableColumns,
    ) -> Result<bool> {
        let gates = matches!(columns, TableColumns::Gates | TableColumns::GatesOnly);
        let cfg = &self.cfg;
        let (d, cols, layers) = (cfg.hidden, ada_cols(cfg), cfg.depth);
        let chunk = |col: usize, n: usize| {
            let mut p = gemm_params(
                dptr(&cond.silu_c),
                dptr(&self.ada_w) + (col * d * 2) as u64,
                dptr(&self.ada_b) + (col * 4) as u64,
                out + (col * 4) as u64,
                rows,
                n,
                d,
                Epilogue::BiasF32,
            );
            p.ldo = cols as i32;
            p
        };
        let batch = LtBatch {
            count: 2 * layers,
            stride_w: (3 * d * d) as i64,
            stride_a: 0,
            stride_d: (3 * d) as i64,
            stride_bias: (3 * d) as i64,
        };
        if gates && !unsafe { gemm.run_cublaslt_strided(&chunk(2 * d, d), batch) }? {
            return Ok(false);
        }
        if columns != TableColumns::GatesOnly {
            let fin = layers * 6 * d;
            unsafe { gemm.run(gpu, &chunk(fin, 2 * d)) }?;
        }
        Ok(true)
    }

    /// The cache sums of the next `count` reuse steps (`FORA_REUSE_SUM`) in one pass over the
    /// FORA cache: `sums + j * sum_stride` elements gets step j's sum over the layers of
    /// `gate_msa x A_l + gate_mlp x M_l` (f32 [rows*T, D]), with the gates of `tables`. The
    /// cache must hold a computing step's outputs.
    ///
    /// # Safety
    /// `acts` must have been made for this model (its config, with the cache), `tables` must
    /// address live tables of `acts.rows` rows, and `sums` room for `count` sums `sum_stride`
    /// f32 apart; `gemm` must serve GEMMs of `acts.rows` rows.
    #[allow(clippy::too_many_arguments)] // device addresses and sizes of one pass
    pub unsafe fn cache_sums(
        &self,
        gpu: &Gpu,
        gemm: &Gemm,
        acts: &Activations,
        tables: SumTables,
        count: usize,
        sums: u64,
        sum_stride: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let rows = acts.rows;
        let cols = ada_cols(cfg);
        let Some(cache) = &acts.cache else {
            anyhow::bail!("cache sums need activations allocated with a FORA cache");
        };
        let (first, stride) = match tables {
            SumTables::Precomputed { first, stride } => (first, stride),
            SumTables::Compute {
                t: steps_t,
                scratch,
            } => {
                let _cond = crate::op_range!(gpu, "sum_gates");
                for j in 0..count {
                    unsafe {
                        self.modulation(
                            gpu,
                            gemm,
                            &acts.cond,
                            rows,
                            steps_t + (j * rows * 4) as u64,
                            dptr(&acts.labels),
                            scratch + (j * rows * cols * 4) as u64,
                            TableColumns::GatesOnly,
                        )
                    }?;
                }
                (scratch, rows * cols)
            }
        };
        let _sum = crate::op_range!(gpu, "fora_cache_sum");
        unsafe {
            super::fora::fora_cache_sum(
                gpu,
                &ForaCacheSumParams {
                    cache: dptr(cache),
                    tables: first,
                    sums,
                    table_stride: stride as i64,
                    sum_stride: sum_stride as i64,
                    count: count as i32,
                    ..cache_sum_params(cfg, rows)
                },
            )
        }
    }

    /// One forward of `acts.rows` rows on the device's stream, up to the final Linear (its
    /// output in `acts.final_out`). `latents` holds `images` images [images, C, H, W]; model row
    /// r reads image r % images. `kind` says whether it computes or reuses, and where the
    /// modulation table comes from.
    ///
    /// # Safety
    /// `acts` must have been made for this model (its config; with the cache for a reuse
    /// step), `latents` must hold `images` images that divide `acts.rows`, the raw addresses in
    /// `kind` (a table, a cache sum) must address live device memory of `acts.rows` rows, and
    /// `gemm` must serve GEMMs of `acts.rows` rows.
    pub unsafe fn forward(
        &self,
        gpu: &Gpu,
        gemm: &Gemm,
        acts: &Activations,
        kind: ForwardKind,
        latents: &CudaSlice<f32>,
        images: usize,
    ) -> Result<()> {
        let ForwardKind {
            mode,
            attention,
            with_modulation,
            table,
            fused_reuse,
            fused_final,
            final_linear,
            fused_ln,
            bias_bf16,
            bf16_residual,
            reuse_gates_only,
            lt_splitk,
            fusions,
            reuse_sum,
        } = kind;
        // qkv and fc1: with bias_bf16, cuBLASLt may fuse a bf16 copy of the bias.
        let biased_gemm = |p: &GemmParams, bias16: &CudaSlice<bf16>| {
            if bias_bf16 {
                unsafe { gemm.run_with_bias_bf16(gpu, p, dptr(bias16)) }
            } else {
                unsafe { gemm.run(gpu, p) }
            }
        };
        let table = table.unwrap_or_else(|| dptr(&acts.modulation));
        let cfg = &self.cfg;
        let (rows, d, t) = (acts.rows, cfg.hidden, cfg.tokens());
        let rt = rows * t;
        let cols = ada_cols(cfg);
        ensure!(
            images > 0 && rows % images == 0 && latents.len() >= images * cfg.image_len(),
            "forward: {rows} rows cannot read {images} images from {} latent values",
            latents.len()
        );
        // Whether the cache holds a computed step is the caller's to track: a CUDA graph of the
        // reuse step is recorded before any step has run.
        ensure!(
            mode == StepMode::Compute || acts.cache.is_some(),
            "a reuse step needs activations allocated with a FORA cache"
        );

        if with_modulation {
            let _cond = crate::op_range!(gpu, "conditioning");
            // A reuse forward reads only the gates and the final shift / scale; from a cache
            // sum, only the final shift / scale.
            let columns = match (mode, reuse_sum) {
                (StepMode::Reuse, Some(_)) => TableColumns::Final,
                (StepMode::Reuse, None) if reuse_gates_only => TableColumns::Gates,
                _ => TableColumns::All,
            };
            unsafe {
                self.modulation(
                    gpu,
                    gemm,
                    &acts.cond,
                    rows,
                    dptr(&acts.t),
                    dptr(&acts.labels),
                    table,
                    columns,
                )
            }?;
        }

        let fused = mode == StepMode::Reuse && self.reuse_is_fused(fused_reuse);
        ensure!(
            mode == StepMode::Compute || reuse_sum.is_none() || fused,
            "a reuse forward from a cache sum needs the fused reuse forward (FORA_FUSED_REUSE=1 \
             and dim % 8 == 0)"
        );
        // The fused reuse forward applies the final Linear too where it can (every DiT/2) with
        // one token a thread: each token row re-reads the whole weight (74 KB for DiT-XL/2), so
        // with four a thread (many rows) the GEMM is faster (H200, 256 rows: a reuse step of
        // 3.67 ms with it in the kernel, the kernel alone 2.29 ms, the GEMM 43 us).
        let final_fused = fused
            && fused_final
            && final_linear
            && super::fora::fused_final_linear_supported(d, cfg.patch_out())
            && super::fora::ReuseTokens::pick(
                &reuse_final_params(cfg, rows, images),
                gpu.multiprocessors(),
            )
            .tokens()
                == 1;
        if !fused {
            let _embed = crate::op_range!(gpu, "patch_embed");
            unsafe {
                super::embed::patch_embed(
                    gpu,
                    &PatchEmbedParams {
                        latents: dptr(latents),
                        weight_t: dptr(&self.x_embed_w_t),
                        bias: dptr(&self.x_embed_b),
                        pos: dptr(&self.pos_embed),
                        out: dptr(&acts.x),
                        images: images as i32,
                        rows: rows as i32,
                        channels: cfg.in_channels as i32,
                        height: cfg.input_size as i32,
                        width: cfg.input_size as i32,
                        patch: cfg.patch as i32,
                        dim: d as i32,
                    },
                )
            }?;
        }

        let slab = rt * d;
        let ln_params =
            |acts: &Activations, shift_col: usize, scale_col: usize| LayerNormModulateParams {
                x: dptr(&acts.x),
                modulation: table,
                out: dptr(&acts.xn),
                rows: rows as i32,
                tokens: t as i32,
                dim: d as i32,
                ld_mod: cols as i32,
                shift_col: shift_col as i32,
                scale_col: scale_col as i32,
                eps: 1e-6,
            };
        // proj / fc2 epilogue + the next LayerNorm fused: cuBLASLt products, or our TMA GEMMs'
        // bf16 v or split-K slices (block_output).
        let fuse_ln = mode == StepMode::Compute
            && fuses_ln(gemm.implementation(), fused_ln, bf16_residual, d);
        let FusionsInEffect {
            gemm_ln_tile,
            gemm_ln_one_per_sm: gemm_ln_one_per_sm_on,
            qkv_attention: qkv_attention_on,
            prefetch_weights: prefetch_on,
        } = FusionsInEffect::resolve(gpu, cfg, rows, fuse_ln, fusions);
        // The fused passes' L2 prefetch ranges: the next two GEMMs' weights, whole 16-byte
        // chunks, where FORA_PREFETCH_WEIGHTS applies.
        let prefetch_ranges = |prefetch: [Option<&CudaSlice<bf16>>; 2]| {
            prefetch.map(|w| match w {
                Some(w) if prefetch_on => (dptr(w), (w.len() * 2) as i64 & !15),
                _ => (0, 0),
            })
        };
        // v: the f32 product (bias still to add, cache stored here) or, with bf16_residual, the
        // GEMM's bf16 v (written where the cache wants it already). `prefetch`: the next two
        // GEMMs' weights.
        let residual_ln = |acts: &Activations,
                           v: BlockOutput,
                           bias: &CudaSlice<f32>,
                           cache: u64,
                           gate_col: usize,
                           shift_col: usize,
                           prefetch: [Option<&CudaSlice<bf16>>; 2]| {
            let [(prefetch_a, prefetch_a_bytes), (prefetch_b, prefetch_b_bytes)] =
                prefetch_ranges(prefetch);
            let _op = crate::op_range!(gpu, "residual_ln");
            let (acc, splits, bias, cache, acc_bf16) = match v {
                BlockOutput::F32Product { acc, splits } => (acc, splits, dptr(bias), cache, 0),
                BlockOutput::Bf16(v) => (v, 1, 0, 0, 1),
            };
            unsafe {
                super::norm::residual_layernorm(
                    gpu,
                    &ResidualLayerNormParams {
                        acc,
                        bias,
                        cache,
                        x: dptr(&acts.x),
                        modulation: table,
                        out: dptr(&acts.xn),
                        rows: rows as i32,
                        tokens: t as i32,
                        dim: d as i32,
                        ld_acc: d as i32,
                        ld_mod: cols as i32,
                        gate_col: gate_col as i32,
                        shift_col: shift_col as i32,
                        scale_col: (shift_col + d) as i32,
                        acc_bf16,
                        eps: 1e-6,
                        acc_splits: splits as i32,
                        acc_split_stride: (rows * t * d) as i64,
                        prefetch_a,
                        prefetch_b,
                        prefetch_a_bytes,
                        prefetch_b_bytes,
                    },
                )
            }
        };
        // proj / fc2 on the fused path: the f32 product, or bf16 v written by cuBLASLt (or our
        // TMA GEMM) into the cache slab (a computing step that caches) or into the free qkv
        // buffer; where our TMA GEMM splits K, its raw f32 slices (summed by residual_ln).
        let block_output = |p: &GemmParams, bias16: &CudaSlice<bf16>, cache: u64| {
            if let Some((acc, splits)) = unsafe { gemm.tma_product_split(gpu, p) }? {
                return Ok(BlockOutput::F32Product { acc, splits });
            }
            if bf16_residual {
                let out = if cache != 0 { cache } else { dptr(&acts.qkv) };
                let p16 = gemm_params(
                    p.a,
                    p.w,
                    p.bias,
                    out,
                    p.m as usize,
                    p.n as usize,
                    p.k as usize,
                    Epilogue::BiasBf16,
                );
                unsafe { gemm.run_with_bias_bf16(gpu, &p16, dptr(bias16)) }?;
                Ok::<_, anyhow::Error>(BlockOutput::Bf16(out))
            } else {
                let splits = if lt_splitk {
                    gemm.lt_product_splits(p)
                } else {
                    1
                };
                let (acc, splits) = unsafe { gemm.cublaslt_product_split(p, splits) }?;
                Ok(BlockOutput::F32Product { acc, splits })
            }
        };
        // proj / fc2: x += gate * (a w + b), the output cached where this step caches, then the
        // LayerNorm of x with shift column `shift_col`: fused into one pass where `fuse_ln`
        // (cuBLASLt, or the TMA GEMMs with bf16 v); else the GEMM's epilogue, then that
        // LayerNorm on its own if `unfused_ln` (fc2's runs at the next block's start, or in the
        // final layer).
        type Linear<'a> = (
            &'a CudaSlice<bf16>,
            &'a CudaSlice<bf16>,
            &'a CudaSlice<f32>,
            &'a CudaSlice<bf16>,
        );
        let gated_residual =
            |op: &str,
             (a, w, bias, bias16): Linear,
             k: usize,
             cache: u64,
             gate_col: usize,
             shift_col: usize,
             unfused_ln: bool,
             prefetch: [Option<&CudaSlice<bf16>>; 2]| {
                if let Some(tile) = gemm_ln_tile {
                    // Its own op name: the GEMM and the residual_ln pass in one launch.
                    let _op = crate::op_range!(gpu, "{op}+ln");
                    return unsafe {
                        super::gemm_ln::GemmLayerNorm {
                            a: dptr(a),
                            w: dptr(w),
                            lda: k,
                            ldw: k,
                            bias: dptr(bias),
                            cache,
                            x: dptr(&acts.x),
                            modulation: table,
                            out: dptr(&acts.xn),
                            m: rt,
                            k,
                            dim: d,
                            tokens: t,
                            ld_mod: cols,
                            gate_col,
                            shift_col,
                            scale_col: shift_col + d,
                            round_v: bf16_residual,
                            eps: 1e-6,
                            // Two CTAs an SM allowed (a cluster fits any GPC) unless
                            // FORA_GEMM_LN_ONE_PER_SM; the A tile multicast (the bench times all
                            // four).
                            one_per_sm: gemm_ln_one_per_sm_on,
                            multicast: true,
                            tile,
                            prefetch: prefetch_ranges(prefetch),
                        }
                        .launch(gpu)
                    };
                }
                let mut p = gemm_params(
                    dptr(a),
                    dptr(w),
                    dptr(bias),
                    dptr(&acts.x),
                    rt,
                    d,
                    k,
                    Epilogue::BiasGateResidual,
                );
                p.cache = cache;
                p.gate = table + (gate_col * 4) as u64;
                p.ldg = cols as i32;
                p.rows_per_gate = t as i32;
                if fuse_ln {
                    let v = {
                        let _op = crate::op_range!(gpu, "{op}");
                        block_output(&p, bias16, cache)?
                    };
                    residual_ln(acts, v, bias, cache, gate_col, shift_col, prefetch)
                } else {
                    {
                        let _op = crate::op_range!(gpu, "{op}");
                        unsafe { gemm.run(gpu, &p) }?;
                    }
                    if unfused_ln {
                        let _op = crate::op_range!(gpu, "ln_mlp");
                        unsafe {
                            super::norm::layernorm_modulate(
                                gpu,
                                &ln_params(acts, shift_col, shift_col + d),
                            )
                        }?;
                    }
                    Ok(())
                }
            };
        match mode {
            StepMode::Compute => {
                for (l, b) in self.blocks.iter().enumerate() {
                    let _block = crate::nvtx_range!("block {l}");
                    let base = l * 6 * d; // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
                    let (cache_a, cache_m) = match &acts.cache {
                        Some(c) => (dptr_at(c, (2 * l) * slab), dptr_at(c, (2 * l + 1) * slab)),
                        None => (0, 0),
                    };
                    // (Fused: the previous block's fc2 wrote this LayerNorm's output.)
                    if !fuse_ln || l == 0 {
                        let _op = crate::op_range!(gpu, "ln_msa");
                        unsafe {
                            super::norm::layernorm_modulate(gpu, &ln_params(acts, base, base + d))
                        }?;
                    }
                    if qkv_attention_on {
                        let _op = crate::op_range!(gpu, "qkv+attention");
                        unsafe {
                            super::qkv_attention::QkvAttention {
                                a: dptr(&acts.xn),
                                lda: d,
                                w: dptr(&b.qkv_w),
                                bias: dptr(&b.qkv_b),
                                out: dptr(&acts.attn),
                                batch: rows,
                                tokens: t,
                                heads: cfg.heads,
                                head_dim: cfg.head_dim(),
                                scale: 1.0 / (cfg.head_dim() as f32).sqrt(),
                                multicast: true,
                            }
                            .launch(gpu)
                        }?;
                    } else {
                        {
                            let _op = crate::op_range!(gpu, "qkv");
                            biased_gemm(
                                &gemm_params(
                                    dptr(&acts.xn),
                                    dptr(&b.qkv_w),
                                    dptr(&b.qkv_b),
                                    dptr(&acts.qkv),
                                    rt,
                                    3 * d,
                                    d,
                                    Epilogue::BiasBf16,
                                ),
                                &b.qkv_b16,
                            )?;
                        }
                        {
                            let _op = crate::op_range!(gpu, "attention");
                            unsafe {
                                super::attention::attention_with(
                                    gpu,
                                    &AttentionParams {
                                        qkv: dptr(&acts.qkv),
                                        out: dptr(&acts.attn),
                                        batch: rows as i32,
                                        tokens: t as i32,
                                        heads: cfg.heads as i32,
                                        head_dim: cfg.head_dim() as i32,
                                        scale: 1.0 / (cfg.head_dim() as f32).sqrt(),
                                    },
                                    attention,
                                )
                            }?;
                        }
                    }
                    gated_residual(
                        "proj",
                        (&acts.attn, &b.proj_w, &b.proj_b, &b.proj_b16),
                        d,
                        cache_a,
                        base + 2 * d,
                        base + 3 * d,
                        true,
                        [Some(&b.fc1_w), Some(&b.fc2_w)],
                    )?;
                    {
                        let _op = crate::op_range!(gpu, "fc1");
                        biased_gemm(
                            &gemm_params(
                                dptr(&acts.xn),
                                dptr(&b.fc1_w),
                                dptr(&b.fc1_b),
                                dptr(&acts.hidden),
                                rt,
                                cfg.mlp_hidden(),
                                d,
                                Epilogue::BiasGeluBf16,
                            ),
                            &b.fc1_b16,
                        )?;
                    }
                    // The next block's ln_msa, or after the last block the final layer's.
                    gated_residual(
                        "fc2",
                        (&acts.hidden, &b.fc2_w, &b.fc2_b, &b.fc2_b16),
                        cfg.mlp_hidden(),
                        cache_m,
                        base + 5 * d,
                        (l + 1) * 6 * d,
                        false,
                        match self.blocks.get(l + 1) {
                            Some(next) => [Some(&next.qkv_w), Some(&next.proj_w)],
                            None => [None, None],
                        },
                    )?;
                }
            }
            StepMode::Reuse if fused => {
                let _reuse = crate::op_range!(gpu, "fora_reuse_final");
                let mut p = ForaReuseFinalParams {
                    sum: reuse_sum.unwrap_or(0),
                    latents: dptr(latents),
                    embed_weight_t: dptr(&self.x_embed_w_t),
                    embed_bias: dptr(&self.x_embed_b),
                    pos: dptr(&self.pos_embed),
                    cache: acts.cache.as_ref().map(dptr).unwrap_or(0),
                    modulation: table,
                    out: dptr(&acts.xn),
                    ..reuse_final_params(cfg, rows, images)
                };
                if final_fused {
                    p.final_w = dptr(&self.final_w);
                    p.final_b = dptr(&self.final_b);
                    p.final_out = dptr(&acts.final_out);
                }
                match (reuse_sum, acts.cache_l2_window()) {
                    (Some(_), _) => unsafe { super::fora::fora_sum_final(gpu, &p) }?,
                    (None, Some(w)) => {
                        unsafe { super::fora::fora_reuse_final_in_l2_window(gpu, &p, &w) }?
                    }
                    (None, None) => unsafe { super::fora::fora_reuse_final(gpu, &p) }?,
                }
                if final_fused {
                    // The final layer is done: the sampler reads final_out.
                    return Ok(());
                }
            }
            StepMode::Reuse => {
                let cache = acts.cache.as_ref().map(dptr).unwrap_or(0);
                {
                    let _reuse = crate::op_range!(gpu, "fora_reuse");
                    unsafe {
                        super::fora::fora_reuse(
                            gpu,
                            &ForaReuseParams {
                                x: dptr(&acts.x),
                                cache,
                                modulation: table,
                                slab: slab as i64,
                                rows: rows as i32,
                                tokens: t as i32,
                                dim: d as i32,
                                layers: cfg.depth as i32,
                                ld_mod: cols as i32,
                                layer_cols: (6 * d) as i32,
                                gate_msa_col: (2 * d) as i32,
                                gate_mlp_col: (5 * d) as i32,
                            },
                        )
                    }?;
                }
            }
        }

        // Final layer: LN + modulate(shift, scale) + Linear, in token layout.
        let fin = cfg.depth * 6 * d;
        let _final = crate::op_range!(gpu, "final_layer");
        if !fused && !fuse_ln {
            // (fora_reuse_final or the last block's residual_layernorm wrote it already.)
            unsafe { super::norm::layernorm_modulate(gpu, &ln_params(acts, fin, fin + d)) }?;
        }
        if !final_linear {
            // The sampler update applies it (final_sampler_step reads acts.xn).
            return Ok(());
        }
        unsafe {
            gemm.run(
                gpu,
                &gemm_params(
                    dptr(&acts.xn),
                    dptr(&self.final_w),
                    dptr(&self.final_b),
                    dptr(&acts.final_out),
                    rt,
                    cfg.patch_out(),
                    d,
                    Epilogue::BiasF32,
                ),
            )
        }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{fuses_ln, GemmImpl};

    #[test]
    fn fused_layernorm_where_the_gemm_path_serves_it() {
        let d = 1152;
        // cuBLASLt: with or without the bf16 residual; the TMA GEMMs only with it.
        for (gemm, bf16, fused) in [
            (GemmImpl::CublasLt, false, true),
            (GemmImpl::CublasLt, true, true),
            (GemmImpl::Tma, false, false),
            (GemmImpl::Tma, true, true),
            (GemmImpl::TmaMulticast, true, true),
            (GemmImpl::Custom, true, false),
            (GemmImpl::Wgmma, true, false),
        ] {
            assert_eq!(fuses_ln(gemm, true, bf16, d), fused, "{gemm:?} bf16 {bf16}");
            assert!(!fuses_ln(gemm, false, bf16, d), "{gemm:?}: not asked for");
        }
        // A width the pass does not take.
        assert!(!fuses_ln(GemmImpl::CublasLt, true, true, 1150));
    }

    /// The weight prefetch rides on the fused LayerNorm passes: without them (or past the few
    /// rows) it changes no launch, so the tuner does not time it as a path of its own.
    #[test]
    fn the_weight_prefetch_serves_only_the_fused_passes() {
        use super::{prefetch_serves, PREFETCH_MAX_TOKENS};
        assert!(prefetch_serves(true, 512));
        assert!(prefetch_serves(true, PREFETCH_MAX_TOKENS));
        assert!(!prefetch_serves(false, 512));
        assert!(!prefetch_serves(true, PREFETCH_MAX_TOKENS + 1));
    }
}
