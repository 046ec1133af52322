//! [`CudaBackend`]: the [`Backend`] the sampler drives on an NVIDIA GPU. A workspace holds every
//! device buffer of one sampling run (activations, the modulation table, the FORA cache, the
//! latents, the noise file, every step's timesteps), allocated once, and CUDA graphs captured
//! once: by default whole steps (computing, reuse, and with cache sums reuse from a sum: the copy
//! of the step's table or timesteps, the forward and the sampler update), so a step is one graph
//! launch; with `FORA_STEP_GRAPH=0` the computing and the reuse forward, a step then being a
//! device-to-device copy, one graph launch and the sampler-update kernel. No allocation, no
//! host synchronization. `FORA_CUDA_GRAPHS=0` launches kernel by kernel instead (for profilers
//! that filter by NVTX range, and for debugging).
//!
//! A plan without reuse steps ([`SamplePlan::reuses`] false: FORA N = 1) gets a workspace
//! without the FORA cache (bf16 `[depth][2][rows*T*D]`: 8.4 GB at 256 rows of DiT-XL/2) and
//! without what only reuse steps use (cache sums, the L2 window over the cache, reuse graphs);
//! its computing forwards write their block outputs into a scratch, and a reuse step on it is
//! an error ([`CudaWorkspace::has_fora_cache`]).

// The launches here (`unsafe`: raw device addresses) pass a workspace's own buffers, which
// `workspace` made for this backend's model at the plan's rows, and a step first checks that
// the workspace is this backend's (`check_built_here`).

use super::attention::AttentionImpl;
use super::device::{dptr_at, ensure_hopper};
use super::fora::CACHE_SUM_MAX;
use super::gemm::{Gemm, GemmImpl};
use super::model::{
    ada_cols, max_gemm_mn, Activations, CondBuffers, ForwardKind, FusionSwitches, GpuModel,
    SumTables, TableColumns,
};
use super::params::{NormalFillParams, SamplerStepParams, UnpatchifyParams};
use super::sampler::guided_channels;
use super::step_graph::{StepGraph, StepTableSource};
use super::{dptr, Gpu};
use crate::backend::{Backend, Guidance, NoiseSource, SamplePlan, StepMode, StepSpec, StepUpdate};
use crate::config::DitConfig;
use crate::weights::DitWeights;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{sys, CudaEvent, CudaGraph, CudaSlice, CudaStream};
use std::sync::Arc;

/// A DiT on one GPU.
///
/// `Send` but not `Sync`: all its work goes on one stream, where a CUDA graph being captured
/// for one thread's sampling run would also record (and so never run) what another thread
/// launched meanwhile. Move it to the thread that samples, or share it behind a `Mutex`; for
/// concurrent runs on one GPU build one backend per thread, each on its own stream
/// ([`Gpu::with_stream`]).
pub struct CudaBackend {
    gpu: Gpu,
    model: GpuModel,
    options: CudaOptions,
    /// Who this backend is to its workspaces: each holds a `Weak` of it, so that a step is
    /// refused on a workspace another backend built (its buffers are sized, and its graphs
    /// captured, for that backend's model), or one whose backend is gone.
    identity: std::sync::Arc<()>,
    /// Makes the backend `!Sync` (see above); `Cell<()>` is `Send`, so the backend still is.
    one_thread_at_a_time: std::marker::PhantomData<std::cell::Cell<()>>,
}

/// How the CUDA backend runs a sampling loop. Every choice computes the same numbers; they
/// trade memory and launch overhead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// cuBLASLt (default), our mma.sync GEMMs, or the opt-in Hopper wgmma / TMA GEMMs
    /// (`FORA_GEMM=cublaslt|custom|wgmma|tma|tma_mc`).
    pub gemm: GemmImpl,
    /// The flash-attention kernels (`FORA_ATTENTION`; default [`AttentionImpl::Auto`]:
    /// `wgmma_mn` on a Hopper, `v1` elsewhere). The wgmma families are refused off Hopper
    /// when the backend is built.
    pub attention: AttentionImpl,
    /// Replay the computing and the reuse forward as CUDA graphs (`FORA_CUDA_GRAPHS=0`: off).
    pub graphs: bool,
    /// Compute the modulation tables of every step when the workspace is built (one batched
    /// GEMM instead of reading all adaLN weights every step), when they fit in
    /// [`CudaOptions::max_modulation_table_bytes`] (`FORA_PRECOMPUTE_MODULATION=0`: off).
    pub precompute_modulation: bool,
    /// Upper bound for the precomputed tables; a quarter of the free memory bounds it too.
    pub max_modulation_table_bytes: usize,
    /// With cuBLASLt: time the heuristic's first candidates for every GEMM shape when a
    /// workspace is built and keep the fastest, instead of its first choice
    /// (`FORA_LT_AUTOTUNE=1`: on). Off by default: the choice depends on timing, so the bits of
    /// a run reproduce across processes only without it.
    pub lt_autotune: bool,
    /// Run a reuse step's patch embedding, cached residuals and final LayerNorm as one launch
    /// (`fora_reuse_final`) instead of three (`FORA_FUSED_REUSE=0`: off). On by default: on an
    /// H200 it halved the 2-row reuse step (0.113 -> 0.060 ms). The numbers equal the
    /// three-launch path's up to the final LayerNorm's summation order.
    pub fused_reuse: bool,
    /// With `fused_reuse`: the final Linear inside `fora_reuse_final` too where its picked
    /// variant holds one token a thread (few rows), instead of the final GEMM after it
    /// (`FORA_FUSED_FINAL=1`: on). Off by default: each token re-reads the Linear's weight, and
    /// on an H200 (2026-11-26) the 2-row reuse step took 0.0531 ms with it, 0.0464 without
    /// (the kernel 40.7 us with it, 24.5 without, the GEMM 6.6).
    pub fused_final: bool,
    /// When the tables are not precomputed: compute the next step's modulation table on a
    /// second stream while the current step's forward runs, instead of before it on the one
    /// stream (`FORA_SIDE_STREAM=1`: on). Off by default until it has been measured on a GPU;
    /// the numbers are the same.
    pub side_stream: bool,
    /// With cuBLASLt: proj's and fc2's residual epilogue and the LayerNorm that follows each
    /// in one `residual_layernorm` pass (`FORA_FUSED_LN=0`: off). On by default: on an H200
    /// the 256-row computing step went from 174.7 to 168.4 ms, 56 launches fewer.
    pub fused_ln: bool,
    /// With cuBLASLt: qkv's and fc1's bias (and GELU) fused into the GEMM with a bf16 copy of
    /// the bias where cuBLASLt refuses the f32 one with a bf16 output, as the H200's did
    /// (`FORA_LT_BIAS_BF16=0`: off, the f32 product and the epilogue kernel instead). The bias
    /// is rounded to bf16 before the add, as under PyTorch's autocast.
    pub lt_bias_bf16: bool,
    /// With `fused_ln`: proj and fc2 write their bf16 block output (bias added) from cuBLASLt
    /// straight into the FORA cache, and the residual adds that bf16 value, as a reuse step
    /// adds the cached one (`FORA_BF16_RESIDUAL=0`: off, the f32 product, its bias added and
    /// the cache stored by `residual_layernorm`). The residual stream itself stays f32; the
    /// block outputs added to it are bf16 like every other activation (as under PyTorch's
    /// autocast), and a computing step adds exactly the values a reuse step adds from the
    /// cache. Halves the bytes of those GEMMs' outputs and drops a cache store. On by default
    /// since session 8: on an H200 (2026-11-26) the 256-row step took 113.4 ms against 119.4
    /// (534 against 508 TFLOP/s), the 2-row step and N=3 run the same, rel-L2 against the
    /// CPU reference 4.8e-3 against 4.5e-3 (bound 2e-2); every GPU path test passed with it.
    pub bf16_residual: bool,
    /// When the tables are not precomputed (large batches): a reuse step's forward computes
    /// only the modulation columns it reads, every gate and the final shift / scale, in one
    /// cuBLASLt strided batch and one GEMM: a third of the adaLN GEMM
    /// (`FORA_REUSE_GATES_ONLY=0`: off, the whole table). On by default: on an H200
    /// (2026-11-26) the 256-row reuse step went from 2.655 to 2.513 ms, bits unchanged.
    pub reuse_gates_only: bool,
    /// With graphs and without the side stream: a whole step (its table or timestep copy,
    /// the forward and the sampler update) as one graph launch, the copy's source and the
    /// update's parameters set in the instantiated graph before each launch
    /// (`FORA_STEP_GRAPH=0`: off). On by default: on an H200 (2026-11-26) the 2-row reuse
    /// step went from 0.0531 to 0.0471 ms and the host's issue time of a step from 15 to 6-9
    /// us; the same bits (`gpu_step_graph_is_exact`).
    pub step_graph: bool,
    /// With the whole-step graph, precomputed tables and the fused reuse forward: the reuse
    /// step's graph copies no table; its `fora_reuse_final` node is re-pointed at step k's
    /// precomputed table before each launch instead (`FORA_REUSE_TABLE_IN_PLACE=1`: on). A
    /// 2-row reuse step is ~40 us, of which the copy of the whole 1.5 MB table (the reuse
    /// kernel reads the gates and the final shift / scale of it) and its dependency are a few.
    /// The same bits (`gpu_step_graph_is_exact`). On by default since session 18 (with
    /// `final_sampler` and `reuse_sum`: on an H200 a reuse step's mean over a run of two at 2
    /// rows 0.0302 ms against 0.0366 with the sums alone; `FORA_REUSE_TABLE_IN_PLACE=0`: off).
    pub reuse_table_in_place: bool,
    /// With `fused_ln` and without `bf16_residual`: where proj's or fc2's output has fewer
    /// 128 x 128 tiles than the device has SMs (one image + CFG: M = 512, N = 1152), the f32
    /// product is split over K into up to 4 slices by one cuBLASLt strided batch, and
    /// `residual_layernorm` sums the slices as it loads them (`FORA_LT_SPLITK=1`: on). For the
    /// latency-bound small-batch GEMMs (at 2 rows proj ran at 139 TFLOP/s, fc2 at 318 on an
    /// H200). Off by default: on an H200 (session 7) it made the 2-row step slower, 1.642 ms
    /// against 1.505.
    pub lt_splitk: bool,
    /// Keep the FORA cache in the persisting set-aside of L2 between reuse steps where most of
    /// it fits (one image + CFG of DiT-XL/2: 66 MB against an H200's set-aside of tens of MB):
    /// the fused reuse launch carries an access-policy window over the cache
    /// (`FORA_L2_PERSIST=1`: on). Changes the context's persisting-L2 set-aside while a
    /// workspace lives (restored when it drops). Only without cache sums (`FORA_REUSE_SUM=0`,
    /// since session 18 not the default), whose steps do not read the cache. Off by default:
    /// on an H200 (session 7) the 2-row reuse step went from 0.0526 to 0.0487 ms but the
    /// computing step from 1.505 to 2.146 ms (L2 set aside).
    pub l2_persist: bool,
    /// With the fused LayerNorm (`residual_layernorm`, or `gemm_tma_ln` under
    /// [`CudaOptions::gemm_ln`]) and few rows (at most
    /// [`super::model::PREFETCH_MAX_TOKENS`] token rows: one image + CFG is 512): each of those
    /// passes asks L2 to fetch the next two GEMMs' weights while it runs (after proj: fc1's and
    /// fc2's; after fc2: the next block's qkv and proj), so that those GEMMs read their weights
    /// from L2 instead of DRAM (a step reads 0.9 GB of weights, which never stay in L2). One
    /// bulk prefetch a CTA on a Hopper; a hint, the same bits (`FORA_PREFETCH_WEIGHTS=1`: on).
    /// Off by default: not yet measured on a GPU (the bench's "W in L2" rows say what a GEMM
    /// would gain at most).
    pub prefetch_weights: bool,
    /// With the fused LayerNorm on a Hopper, few rows (up to
    /// [`super::gemm_ln::GemmLayerNorm::rows_limit`] token rows: 1,024 on 132 SMs) and rows of
    /// 1,152 (DiT-XL/2): proj and fc2 with their gated residual and the LayerNorm after each as
    /// one `gemm_tma_ln_64x72` launch (clusters of 16 CTAs of 64 x 72 tiles exchanging the
    /// rows' statistics through distributed shared memory) instead of a GEMM and a
    /// `residual_layernorm` pass: 56 launches fewer a step (`FORA_GEMM_LN=1`: on). The same
    /// maths (with `bf16_residual` the residual adds bf16 v, as there), the LayerNorm's
    /// statistics combined in another order. Off by default: not yet run on a GPU.
    pub gemm_ln: bool,
    /// With the fused LayerNorm on a Hopper, many rows (past
    /// [`super::gemm_ln::GemmLayerNorm::rows_limit`] token rows) and rows of 1,152: proj and fc2
    /// with their gated residual and the LayerNorm after each as one `gemm_tma_ln_mc_128x72`
    /// launch (128-row clusters of 16 CTAs, two a SM) instead of a cuBLASLt GEMM and a
    /// `residual_layernorm` pass, which at 256 rows moves 12 bytes an element (~300 us on an
    /// H200, twice a block: ~15% of the step) (`FORA_GEMM_LN_MANY_ROWS=1`: on). The same maths
    /// as [`CudaOptions::gemm_ln`]. Off by default: not yet run on a GPU.
    pub gemm_ln_many_rows: bool,
    /// With [`CudaOptions::gemm_ln_many_rows`]: its launches on `gemm_tma_ln_mc_128x144`
    /// (clusters of 8 CTAs of 128 x 144, two consumer warpgroups on wgmma m64n144k16, six
    /// stages, one CTA an SM) instead of `gemm_tma_ln_mc_128x72` (clusters of 16 of 128 x 72,
    /// two CTAs an SM): the tensor cores' work a k-step doubles for 1.5x the shared-memory
    /// operand bytes, where m64n72k16 reads about as many cycles of shared memory as it
    /// computes, but no second CTA's mainloop runs under an epilogue. Which is faster is for a
    /// GPU to say (`FORA_GEMM_LN_WIDE=1`: on). The same maths. Off by default: not yet run on
    /// a GPU.
    pub gemm_ln_wide: bool,
    /// With [`CudaOptions::gemm_ln`] (or `gemm_ln_many_rows`): each fused launch asks for more
    /// than half an SM's shared memory, so that no two of its CTAs share an SM
    /// ([`super::gemm_ln::GemmLayerNorm::one_per_sm`]). Without it two fit an SM, so a cluster
    /// of 16 fits a GPC of 8 free SMs, but the scheduler may also place two of a cluster on one
    /// SM (sharing its tensor cores) while other SMs idle, more so when a kernel launched early
    /// (`FORA_PDL`) finds the SMs half taken by the one before. The bench's `proj+ln` /
    /// `fc2+ln` rows time both alone; this switch times them in whole steps
    /// (`FORA_GEMM_LN_ONE_PER_SM=1`: on; variant `gemm_ln_one_per_sm`). Taken at few rows only
    /// where the driver still holds every cluster at once
    /// ([`super::gemm_ln::GemmLnTile::one_per_sm_serves`]). The same bits. Off by default: not
    /// yet run on a GPU.
    pub gemm_ln_one_per_sm: bool,
    /// On a Hopper with head_dim 64 or 72, at most 256 tokens and few rows (the clusters' CTAs,
    /// four a sequence and head, in one wave: one image + CFG of DiT-XL/2 is 128 CTAs): each
    /// block's qkv Linear and attention as one `qkv_attention_*` launch (clusters of four CTAs of
    /// 64 tokens exchanging K and V through distributed shared memory; the qkv activations
    /// never reach memory) instead of a GEMM and an attention kernel: 28 launches fewer a step
    /// (`FORA_QKV_ATTENTION=1`: on). The same maths (q, k, v rounded to bf16 as the GEMM stores
    /// them; the bias added in f32). Off by default: not yet run on a GPU.
    pub qkv_attention: bool,
    /// Launch our kernels with programmatic stream serialization (`FORA_PDL=1`: on; compute
    /// capability 9.0 and later, ignored before): each starts launching while the kernel before
    /// it finishes and waits for it in its first statement, so the ~1 us launch gap between
    /// dependent kernels overlaps (a 2-row step is ~200 launches). The TMA GEMMs wait later:
    /// their first k-tiles' weights load before the wait (so nothing may write a GEMM's
    /// weights in the kernel right before it; the model never does). cuBLASLt's kernels launch
    /// as before. Off by default: on an H200 (session 7) within noise (2-row step 1.522 ms
    /// against 1.505, reuse step 0.0518 against 0.0526; the same bits, `gpu_pdl_is_exact`);
    /// the TMA GEMMs' early weight loads not yet measured.
    pub pdl: bool,
    /// Sums the FORA cache once for a whole run of reuse steps (`FORA_REUSE_SUM=k`, k = 1..=4;
    /// 0: off; default 2). A reuse step's residual updates are linear in the cache (x =
    /// embedding + sum over layers of gate * cached output, the gates the step's own), so the
    /// run's first reuse step reads the cache once (`fora_cache_sum`) and writes the sums of
    /// up to k steps of the run (the sampler's `StepSpec::reuse_ahead` says how many follow),
    /// and each step then reads its f32 sum (`fora_sum_final`) instead of the whole cache: at
    /// N = 3, one read of the cache per two reuse steps instead of two. The same maths; the
    /// f32 sums are associated differently (relative differences ~1e-7 before the final
    /// LayerNorm). Needs the fused reuse forward, and with graphs the whole-step graph (not
    /// the side stream); elsewhere it is not used. A step alone in its run reads the cache as without
    /// ([`SumAction::Cache`]: a sum for one step costs more), so k = 1 is the same as off.
    /// k sums of rows x T x D f32 (and, without precomputed tables, k gate tables) of device
    /// memory. On by default since session 18 (H200): a reuse step's mean over a run of two
    /// 0.0366 ms against 0.0389 at 2 rows (0.0302 with `final_sampler` and the table in place
    /// as well) and 1.81 against 2.40 ms at 256; one image's 250 steps at N = 3 131.5 against
    /// 133.0 ms with all three (speedup 2.86x against 2.83x).
    pub reuse_sum: usize,
    /// A step's sampler update applies the model's final Linear itself: one
    /// `final_sampler_step` launch (mma.sync, the model output kept in shared memory) instead
    /// of the final GEMM and `sampler_step` (`FORA_FINAL_SAMPLER=1`: on). For the final Linear
    /// of every DiT/2 (N = 32, K = 1152: cuBLASLt took 4.4 us at 2 rows and 43.5 us at 256 on
    /// an H200) and its f32 output's round trip. Small batches only, up to
    /// [`super::sampler::FINAL_SAMPLER_MAX_IMAGES`] images (each block re-reads the weight), and
    /// where the model's sizes allow it ([`super::sampler::final_sampler_supported`]); elsewhere
    /// the step runs as without. The same maths, summed in another order. On by default since
    /// session 18: on an H200 `final_sampler_step` took 5.0 us at 2 rows against 4.5 + 4.4 us
    /// for the final GEMM and `sampler_step` (126 against 43 + 11 us at 256 rows, where it is
    /// not used); with the table in place and the cache sums, one image's 250 steps at N = 3
    /// took 131.5 ms against 133.0 (`FORA_FINAL_SAMPLER=0`: off).
    pub final_sampler: bool,
    /// TMA tiles and split-K slices forced by GEMM shape (`FORA_TMA_TILES`, see
    /// [`super::gemm::TmaOverrides`]; empty by default): for trying the bench's fastest tiles
    /// in whole steps on a machine without a rebuild.
    pub tma_tiles: super::gemm::TmaOverrides,
}

impl Default for CudaOptions {
    /// The defaults, whatever the environment says: the paths measured fastest on an H200
    /// (see each field); the opt-in ones off.
    fn default() -> CudaOptions {
        CudaOptions {
            gemm: GemmImpl::CublasLt,
            attention: AttentionImpl::Auto,
            graphs: true,
            precompute_modulation: true,
            max_modulation_table_bytes: 8 << 30,
            lt_autotune: false,
            fused_reuse: true,
            fused_final: false,
            side_stream: false,
            fused_ln: true,
            lt_bias_bf16: true,
            bf16_residual: true,
            reuse_gates_only: true,
            step_graph: true,
            reuse_table_in_place: true,
            lt_splitk: false,
            l2_persist: false,
            prefetch_weights: false,
            gemm_ln: false,
            gemm_ln_many_rows: false,
            gemm_ln_wide: false,
            gemm_ln_one_per_sm: false,
            qkv_attention: false,
            pdl: false,
            reuse_sum: 2,
            final_sampler: true,
            tma_tiles: super::gemm::TmaOverrides::default(),
        }
    }
}

impl CudaOptions {
    /// The environment settings that turn [`CudaOptions::default`] into these options, one
    /// `FORA_NAME=value` per option that differs (none for the defaults; the table bound
    /// `max_modulation_table_bytes` has no variable and is left out).
    pub fn env_overrides(&self) -> Vec<String> {
        let d = CudaOptions::default();
        let mut out = Vec::new();
        if self.gemm != d.gemm {
            out.push(format!("FORA_GEMM={}", self.gemm.name()));
        }
        if self.attention != d.attention {
            out.push(format!("FORA_ATTENTION={}", self.attention.name()));
        }
        for (name, field) in SWITCHES {
            let (mut this, mut default) = (*self, d);
            let value = *field(&mut this);
            if value != *field(&mut default) {
                out.push(format!("{name}={}", u8::from(value)));
            }
        }
        if self.reuse_sum != d.reuse_sum {
            out.push(format!("FORA_REUSE_SUM={}", self.reuse_sum));
        }
        if self.tma_tiles != d.tma_tiles {
            out.push(format!("FORA_TMA_TILES={}", self.tma_tiles));
        }
        out
    }

    /// The row-dependent fusion switches among these options ([`ForwardKind::fusions`]).
    pub fn fusion_switches(&self) -> FusionSwitches {
        FusionSwitches {
            gemm_ln: self.gemm_ln,
            gemm_ln_many_rows: self.gemm_ln_many_rows,
            gemm_ln_wide: self.gemm_ln_wide,
            gemm_ln_one_per_sm: self.gemm_ln_one_per_sm,
            qkv_attention: self.qkv_attention,
            prefetch_weights: self.prefetch_weights,
        }
    }

    /// These options with the fusion switches `s`.
    pub fn with_fusion_switches(self, s: FusionSwitches) -> CudaOptions {
        CudaOptions {
            gemm_ln: s.gemm_ln,
            gemm_ln_many_rows: s.gemm_ln_many_rows,
            gemm_ln_wide: s.gemm_ln_wide,
            gemm_ln_one_per_sm: s.gemm_ln_one_per_sm,
            qkv_attention: s.qkv_attention,
            prefetch_weights: s.prefetch_weights,
            ..self
        }
    }

    /// [`CudaOptions::default`], overridden by every variable of [`CudaOptions::VARIABLES`]
    /// set in the environment (an empty value keeps the default; one that is not UTF-8 is an
    /// error): `FORA_GEMM`, `FORA_ATTENTION`, `FORA_REUSE_SUM`, `FORA_TMA_TILES` and the 0/1
    /// switches (`FORA_CUDA_GRAPHS`, `FORA_PRECOMPUTE_MODULATION`, `FORA_GEMM_LN`, `FORA_PDL`,
    /// ...; see each field).
    pub fn from_env() -> Result<CudaOptions> {
        let mut o = CudaOptions::default();
        for name in CudaOptions::VARIABLES {
            match std::env::var(name) {
                Err(std::env::VarError::NotPresent) => {}
                Err(std::env::VarError::NotUnicode(v)) => {
                    bail!("environment variable {name} is not UTF-8: {v:?}")
                }
                Ok(v) if v.trim().is_empty() => {}
                Ok(v) => o
                    .set(name, &v)
                    .with_context(|| format!("environment variable {name}"))?,
            }
        }
        Ok(o)
    }

    /// Every environment variable [`CudaOptions::from_env`] reads, each the name
    /// [`CudaOptions::set`] takes.
    pub const VARIABLES: [&'static str; 4 + SWITCHES.len()] = {
        let mut names = [""; 4 + SWITCHES.len()];
        let head = [
            "FORA_GEMM",
            "FORA_ATTENTION",
            "FORA_REUSE_SUM",
            "FORA_TMA_TILES",
        ];
        let mut i = 0;
        while i < head.len() {
            names[i] = head[i];
            i += 1;
        }
        let mut j = 0;
        while j < SWITCHES.len() {
            names[head.len() + j] = SWITCHES[j].0;
            j += 1;
        }
        names
    };

    /// Sets the option the environment variable `name` controls to `value`, read as
    /// [`CudaOptions::from_env`] reads it (0 or 1 for a switch).
    /// An unknown name or a bad value is an error naming it.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let v = value.trim();
        match name {
            "FORA_GEMM" => self.gemm = v.parse()?,
            "FORA_ATTENTION" => self.attention = v.parse()?,
            "FORA_REUSE_SUM" => {
                self.reuse_sum = match v.parse::<usize>() {
                    Ok(k) if k <= CACHE_SUM_MAX => k,
                    _ => bail!(
                        "FORA_REUSE_SUM must be 0 (off) or the steps a cache sum serves, \
                         1..={CACHE_SUM_MAX}; got {v:?}"
                    ),
                }
            }
            "FORA_TMA_TILES" => self.tma_tiles = v.parse()?,
            _ => {
                let Some((_, field)) = SWITCHES.iter().find(|(n, _)| *n == name) else {
                    bail!(
                        "{name:?} is not an option of the CUDA backend; the options are {}",
                        CudaOptions::VARIABLES.join(", ")
                    );
                };
                *field(self) = match v {
                    "0" => false,
                    "1" => true,
                    other => bail!("{name} must be 0 or 1, got {other:?}"),
                };
            }
        }
        Ok(())
    }

    /// These options with `settings` applied in order: whitespace-separated `NAME=value`
    /// words, each as [`CudaOptions::set`] takes it (`"FORA_GEMM=tma FORA_PDL=1"`, the form of
    /// [`CudaOptions::env_overrides`]). Errors name the word at fault.
    pub fn with_settings(mut self, settings: &str) -> Result<CudaOptions> {
        for word in settings.split_whitespace() {
            let Some((name, value)) = word.split_once('=') else {
                bail!("option setting {word:?} is not NAME=value");
            };
            self.set(name, value)
                .with_context(|| format!("option setting {word:?}"))?;
        }
        Ok(self)
    }
}

/// The field of [`CudaOptions`] a 0/1 switch sets.
type SwitchField = fn(&mut CudaOptions) -> &mut bool;

/// The 0/1 switches of [`CudaOptions`]: each environment variable and the field it sets (its
/// default is [`CudaOptions::default`]'s). The kernel choices, `FORA_REUSE_SUM` and
/// `FORA_TMA_TILES` are parsed apart.
const SWITCHES: [(&str, SwitchField); 22] = [
    ("FORA_CUDA_GRAPHS", |o| &mut o.graphs),
    ("FORA_PRECOMPUTE_MODULATION", |o| {
        &mut o.precompute_modulation
    }),
    ("FORA_LT_AUTOTUNE", |o| &mut o.lt_autotune),
    ("FORA_FUSED_REUSE", |o| &mut o.fused_reuse),
    ("FORA_FUSED_FINAL", |o| &mut o.fused_final),
    ("FORA_SIDE_STREAM", |o| &mut o.side_stream),
    ("FORA_FUSED_LN", |o| &mut o.fused_ln),
    ("FORA_LT_BIAS_BF16", |o| &mut o.lt_bias_bf16),
    ("FORA_BF16_RESIDUAL", |o| &mut o.bf16_residual),
    ("FORA_REUSE_GATES_ONLY", |o| &mut o.reuse_gates_only),
    ("FORA_STEP_GRAPH", |o| &mut o.step_graph),
    ("FORA_REUSE_TABLE_IN_PLACE", |o| &mut o.reuse_table_in_place),
    ("FORA_LT_SPLITK", |o| &mut o.lt_splitk),
    ("FORA_L2_PERSIST", |o| &mut o.l2_persist),
    ("FORA_PREFETCH_WEIGHTS", |o| &mut o.prefetch_weights),
    ("FORA_GEMM_LN", |o| &mut o.gemm_ln),
    ("FORA_GEMM_LN_MANY_ROWS", |o| &mut o.gemm_ln_many_rows),
    ("FORA_GEMM_LN_WIDE", |o| &mut o.gemm_ln_wide),
    ("FORA_GEMM_LN_ONE_PER_SM", |o| &mut o.gemm_ln_one_per_sm),
    ("FORA_QKV_ATTENTION", |o| &mut o.qkv_attention),
    ("FORA_PDL", |o| &mut o.pdl),
    ("FORA_FINAL_SAMPLER", |o| &mut o.final_sampler),
];

/// Whether the CUDA backend can run `cfg`: its attention kernels exist for head_dim 64, 72
/// and 128 (every official DiT); other models run on the CPU backend.
pub fn supports(cfg: &DitConfig) -> Result<()> {
    // A config built by hand (its fields are public) may hold zero heads: head_dim divides.
    cfg.validate()?;
    let hd = cfg.head_dim() as i32;
    ensure!(
        super::attention::ATTENTION_HEAD_DIMS.contains(&hd),
        "the CUDA backend has attention kernels for head_dim {:?}; {} has head_dim {hd} \
         ({} / {} heads)",
        super::attention::ATTENTION_HEAD_DIMS,
        cfg.arch_name(),
        cfg.hidden,
        cfg.heads
    );
    Ok(())
}

/// The `FORA_TMA_TILES` entries of `options` that a GEMM of `cfg` looks up on a device of
/// compute capability major `cc_major`: those of the model's GEMM shapes
/// ([`super::model::gemm_shapes`]), where the GEMM implementation takes them
/// ([`GemmImpl::takes_tma_overrides`]); none elsewhere.
pub fn tma_tiles_in_effect(
    options: &CudaOptions,
    cc_major: i32,
    cfg: &DitConfig,
) -> super::gemm::TmaOverrides {
    let applies = options.gemm.takes_tma_overrides(cc_major);
    let shapes = super::model::gemm_shapes(cfg);
    options
        .tma_tiles
        .retain(|o| applies && shapes.contains(&(o.n as usize, o.k as usize)))
}

/// Rows of conditioning computed per batched GEMM when precomputing modulation tables.
const MODULATION_CHUNK_ROWS: usize = 4096;

/// Steps whose modulation tables one batched GEMM computes.
fn modulation_chunk_steps(rows: usize, steps: usize) -> usize {
    (MODULATION_CHUNK_ROWS / rows.max(1)).clamp(1, steps.max(1))
}

/// Device state of one sampling run.
///
/// Not `Send`: its CUDA graphs are cudarc's raw handles. Build, step and drop it on one
/// thread, as [`crate::sampler::Sampler::sample`] does. (A `Sampler` over a `CudaBackend`
/// borrows a backend that is not `Sync`, so it stays on its thread too: move the backend to
/// the thread that samples and make the sampler there.)
pub struct CudaWorkspace {
    /// The backend that built it ([`CudaBackend::identity`]).
    built_by: std::sync::Weak<()>,
    /// The backend's options when it was built: its steps follow them, whatever
    /// [`CudaBackend::set_options`] says later (its buffers and graphs were made for them).
    options: CudaOptions,
    /// The activations, with the FORA cache only where the plan reuses it
    /// ([`SamplePlan::reuses`], [`CudaWorkspace::has_fora_cache`]).
    acts: Activations,
    gemm: Gemm,
    /// The B conditional rows' latents, f32 [B, C, H, W].
    latents: CudaSlice<f32>,
    /// The noise file's per-step noise, f32 [S, B, C, H, W] (None: Philox from the seed).
    noise: Option<CudaSlice<f32>>,
    seed: u64,
    images: usize,
    steps: usize,
    guidance: Option<Guidance>,
    /// Timestep of every (loop step, model row), f32 [S, rows]: a step copies its row into
    /// `acts.t` on the device.
    t_table: CudaSlice<f32>,
    timesteps: Vec<i64>,
    /// Every step's modulation table, f32 [S, rows, ada_cols], when precomputed: a step copies
    /// its table into `acts.modulation` and the forward skips the conditioning path.
    mod_table: Option<CudaSlice<f32>>,
    /// The next step's table on a second stream (tables not precomputed, `side_stream` on).
    side: Option<SideModulation>,
    /// Captured forwards, one slot per [`graph_index`] (None: graphs disabled or step graphs).
    /// A slot is None where that mode was not captured ([`forward_modes`]: no reuse forward
    /// without the FORA cache).
    graphs: Option<Vec<Option<CudaGraph>>>,
    /// Captured whole steps, one slot per [`step_graph_index`] ([`STEP_GRAPH_SLOTS`]):
    /// computing, reuse from the cache, and with cache sums reuse from a sum (`step_graph`;
    /// None otherwise). A slot is None where that kind was not captured
    /// ([`step_graph_kinds`]: no reuse kind without the FORA cache, no summed one without
    /// cache sums).
    step_graphs: Option<Vec<Option<StepGraph>>>,
    /// True once a computing step has filled the FORA cache (without a cache: has run).
    cache_valid: bool,
    /// The cache sums of a run of reuse steps (`reuse_sum`; None: off or not usable here).
    sums: Option<ReuseSums>,
}

/// The cache sums of the current run of reuse steps ([`CudaOptions::reuse_sum`]): the run's
/// first reuse step computes them in one pass over the cache, every step of the run reads its
/// own.
struct ReuseSums {
    /// f32 [slots][rows*T*D].
    sums: CudaSlice<f32>,
    /// Without precomputed tables: the gates of the steps being summed, f32 [slots][rows,
    /// ada_cols].
    tables: Option<CudaSlice<f32>>,
    slots: usize,
    /// Elements of one sum.
    slab: usize,
    /// Steps [first, first + count) have their sums in slots 0..count (None after a computing
    /// step: the cache changed).
    ready: Option<(usize, usize)>,
}

impl ReuseSums {
    /// Device address of sum `slot`.
    fn sum(&self, slot: usize) -> u64 {
        dptr_at(&self.sums, slot * self.slab)
    }
}

/// What reuse step `k` of a workspace with cache sums does first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumAction {
    /// Its sum is in this slot already (an earlier step of its run computed it).
    Ready(usize),
    /// Sum the cache now for steps k..k+count (slots 0..count); its own is slot 0.
    Compute {
        /// Steps of the run the pass sums for (2..=4).
        count: usize,
    },
    /// No sum: the step reads the cache as without sums. A step left alone in its run (or
    /// with one slot) would sum for itself only: a pass over the cache writing the sum, then
    /// one reading it, where reading the cache once does (H200, session 18: 35 + 7 against
    /// 24.5 us at 2 rows, 2517 + 388 against 2164 us at 256).
    Cache,
}

/// The bookkeeping of [`CudaOptions::reuse_sum`] for reuse step `k` of `steps`, `reuse_ahead`
/// reuse steps right after it, `slots` sums, and the steps whose sums are ready (`ready`:
/// first step and count, None after a computing step).
pub fn sum_action(
    ready: Option<(usize, usize)>,
    k: usize,
    reuse_ahead: usize,
    slots: usize,
    steps: usize,
) -> SumAction {
    match ready {
        Some((first, count)) if (first..first + count).contains(&k) => SumAction::Ready(k - first),
        _ => match reuse_ahead
            .saturating_add(1)
            .min(slots)
            .min(steps.saturating_sub(k))
        {
            0 | 1 => SumAction::Cache,
            count => SumAction::Compute { count },
        },
    }
}

/// The next step's modulation table, computed on a second stream while the current step's
/// forward runs: step k reads table k % 2 while its forward's side branch writes the other one
/// for step k + 1. A step whose table is not ready (the first, or one out of order) computes
/// it first on the main stream.
struct SideModulation {
    /// The second stream (sharing the device's context and kernels).
    gpu: Gpu,
    /// Its own GEMM engine: cuBLASLt scratch is not shared between concurrent GEMMs.
    gemm: Gemm,
    cond: CondBuffers,
    /// The second table; the first is the activations' own.
    second: CudaSlice<f32>,
    /// Timesteps of the step after the current one, f32 [rows].
    t_next: CudaSlice<f32>,
    fork: CudaEvent,
    join: CudaEvent,
    /// The step whose table the last forward's side branch computed.
    ready: Option<usize>,
    /// The device's main stream: the graphs that use these buffers run on it.
    main: Arc<CudaStream>,
}

impl Drop for SideModulation {
    fn drop(&mut self) {
        // These buffers are freed stream-ordered on the side stream, but the captured graphs
        // that use them run on the main stream: make the side stream wait for the main
        // stream's work first. (Errors here have nowhere to go; the frees are then unordered,
        // as they would be without this.)
        if let Ok(done) = self.main.record_event(None) {
            let _ = self.gpu.stream().wait(&done);
        }
    }
}

impl SideModulation {
    /// Device address of table `parity` (0: the activations' own).
    fn table(&self, acts: &Activations, parity: usize) -> u64 {
        if parity == 0 {
            dptr(&acts.modulation)
        } else {
            dptr(&self.second)
        }
    }
}

/// Slots of [`CudaWorkspace`]'s whole-step graphs, one per [`step_graph_index`].
const STEP_GRAPH_SLOTS: usize = 3;

/// Index in [`CudaWorkspace`]'s whole-step graphs of a step of `mode`, reading a cache sum
/// (`summed`) or not: computing, reuse from the cache, reuse from a sum (captured only with
/// cache sums). Every index is below [`STEP_GRAPH_SLOTS`]; a slot not captured holds None.
fn step_graph_index(mode: StepMode, summed: bool) -> usize {
    match (mode, summed) {
        (StepMode::Compute, _) => 0,
        (StepMode::Reuse, false) => 1,
        (StepMode::Reuse, true) => 2,
    }
}

/// The whole-step graphs a workspace captures, as (mode, reads a cache sum), in
/// [`step_graph_index`] order: the computing step always; with the FORA cache (`with_cache`:
/// the plan has reuse steps) the reuse step from the cache, and with cache sums (`sums`, which
/// exist only with the cache) the reuse step from a sum.
fn step_graph_kinds(with_cache: bool, sums: bool) -> Vec<(StepMode, bool)> {
    let mut kinds = vec![(StepMode::Compute, false)];
    if with_cache {
        kinds.push((StepMode::Reuse, false));
        if sums {
            kinds.push((StepMode::Reuse, true));
        }
    }
    kinds
}

/// Which captured graph runs a step: `[compute, reuse]`, times two table parities when the
/// next step's table is computed on a second stream (`2 * parities` slots; a mode not captured,
/// see [`forward_modes`], leaves its slots None).
fn graph_index(mode: StepMode, parity: usize) -> usize {
    2 * parity + (mode == StepMode::Reuse) as usize
}

/// The forwards a workspace captures as per-forward graphs (one per table parity) and, with
/// cuBLASLt autotuning, runs once before capture: the computing one always, the reuse one only
/// with the FORA cache (`with_cache`).
fn forward_modes(with_cache: bool) -> &'static [StepMode] {
    if with_cache {
        &[StepMode::Compute, StepMode::Reuse]
    } else {
        &[StepMode::Compute]
    }
}

/// The error of a reuse step (step `k`) on a workspace built without the FORA cache.
fn no_cache_error(k: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "step {k}: a reuse step, but this workspace was built for a plan without reuse steps \
         (SamplePlan::reuses is false), so it holds no FORA cache: build the workspace from a \
         plan with `reuses` true to reuse the cache"
    )
}

impl CudaWorkspace {
    /// Whether the next step's modulation table is computed on a second stream.
    pub fn uses_side_stream(&self) -> bool {
        self.side.is_some()
    }

    /// Device allocations and bytes are fixed after construction; tests read this.
    pub fn rows(&self) -> usize {
        self.acts.rows
    }

    /// Whether every step's modulation table was computed up front.
    pub fn modulation_precomputed(&self) -> bool {
        self.mod_table.is_some()
    }

    /// Whether steps replay CUDA graphs.
    pub fn uses_graphs(&self) -> bool {
        self.graphs.is_some() || self.step_graphs.is_some()
    }

    /// Whether a step is one graph launch (copy, forward and update captured together).
    pub fn uses_step_graphs(&self) -> bool {
        self.step_graphs.is_some()
    }

    /// Whether the captured reuse step reads its precomputed table in place (no copy;
    /// `FORA_REUSE_TABLE_IN_PLACE`).
    pub fn reuse_reads_table_in_place(&self) -> bool {
        self.step_graphs
            .as_ref()
            .is_some_and(|g| g.iter().flatten().any(StepGraph::reads_table_in_place))
    }

    /// Whether this workspace holds the FORA cache (bf16 `[depth][2][rows*T*D]`): false when
    /// built for a plan without reuse steps ([`SamplePlan::reuses`] false), whose steps must
    /// all compute (a reuse step is then an error); true otherwise.
    pub fn has_fora_cache(&self) -> bool {
        self.acts.has_cache()
    }

    /// Whether reuse steps read cache sums computed once per run of reuse steps
    /// ([`CudaOptions::reuse_sum`]).
    pub fn uses_reuse_sums(&self) -> bool {
        self.sums.is_some()
    }

    /// Whether reuse steps read the FORA cache through an L2 persisting window
    /// (`FORA_L2_PERSIST=1` on a device with a set-aside the cache mostly fits).
    pub fn cache_in_l2(&self) -> bool {
        self.acts.cache_l2_window().is_some()
    }
}

impl CudaBackend {
    /// Uploads `weights` to `gpu`, with [`CudaOptions::from_env`].
    pub fn new(gpu: Gpu, cfg: &DitConfig, weights: &DitWeights) -> Result<CudaBackend> {
        CudaBackend::with_options(gpu, cfg, weights, CudaOptions::from_env()?)
    }

    /// Uploads `weights` to `gpu` with explicit options.
    pub fn with_options(
        gpu: Gpu,
        cfg: &DitConfig,
        weights: &DitWeights,
        options: CudaOptions,
    ) -> Result<CudaBackend> {
        supports(cfg)?;
        // A kernel this device cannot run is refused before any upload rather than at the
        // first forward.
        if options.attention.is_wgmma() {
            ensure_hopper(
                &gpu,
                &format!("FORA_ATTENTION={}", options.attention.name()),
                "; use FORA_ATTENTION=v1",
            )?;
        }
        let model = GpuModel::upload(&gpu, cfg, weights)?;
        gpu.set_programmatic_launch(options.pdl);
        Ok(CudaBackend {
            gpu,
            model,
            options,
            identity: std::sync::Arc::new(()),
            one_thread_at_a_time: std::marker::PhantomData,
        })
    }

    /// [`CudaBackend::new`] with the GEMM implementation chosen by the caller.
    pub fn with_gemm(
        gpu: Gpu,
        cfg: &DitConfig,
        weights: &DitWeights,
        gemm: GemmImpl,
    ) -> Result<CudaBackend> {
        let options = CudaOptions {
            gemm,
            ..CudaOptions::from_env()?
        };
        CudaBackend::with_options(gpu, cfg, weights, options)
    }

    /// The options later workspaces are built with.
    pub fn options(&self) -> CudaOptions {
        self.options
    }

    /// Changes the options of later workspaces (the weights stay); a workspace built before
    /// keeps running with the options it was built with. A kernel choice this device cannot
    /// run (a wgmma family off a Hopper) fails at the first forward, with the reason.
    pub fn set_options(&mut self, options: CudaOptions) {
        self.gpu.set_programmatic_launch(options.pdl);
        self.options = options;
    }

    /// `options` with the fusion switches that change no launch at `rows` model rows on this
    /// card turned off ([`super::model::FusionsInEffect`]: the few-rows LayerNorm fusion at
    /// many rows, the many-rows one and its wide tile at few, the fused qkv + attention and the
    /// weight prefetch where they do not serve) and without the `FORA_TMA_TILES` entries that
    /// no GEMM looks up ([`tma_tiles_in_effect`]), and `lt_autotune` off unless the GEMMs are
    /// cuBLASLt's (ours have no algorithms to time): two options equal after this run the same
    /// kernels at those rows, whatever they were before.
    pub fn options_in_effect(&self, options: CudaOptions, rows: usize) -> CudaOptions {
        let cfg = self.config();
        // The computing step's decision (GpuModel::forward): reuse steps run none of these.
        let fuse_ln = super::model::fuses_ln(
            options.gemm,
            options.fused_ln,
            options.bf16_residual,
            cfg.hidden,
        );
        let switches = options.fusion_switches();
        let on = super::model::FusionsInEffect::resolve(&self.gpu, cfg, rows, fuse_ln, switches);
        let mut tiles = tma_tiles_in_effect(&options, self.gpu.compute_capability().0, cfg);
        // fc2's shape (d x mlp) is fc2's alone and qkv's (3d x d) qkv's: where those GEMMs do
        // not go through the engine's routed paths, no GEMM looks their entries up. fc2 skips
        // them inside the fused GEMM + LayerNorm, and under cuBLASLt's f32 products
        // (`cublaslt_product_split`, fused LayerNorm without bf16_residual); qkv inside the
        // fused qkv + attention. (d x d is proj's but also other GEMMs': kept.)
        let (d, mlp) = (cfg.hidden, cfg.mlp_hidden());
        let fc2_unrouted = on.gemm_ln_tile.is_some()
            || (options.gemm == GemmImpl::CublasLt && fuse_ln && !options.bf16_residual);
        let shape = |o: &super::gemm::TmaOverride| (o.n as usize, o.k as usize);
        if fc2_unrouted {
            tiles = tiles.retain(|o| shape(o) != (d, mlp));
        }
        if on.qkv_attention {
            tiles = tiles.retain(|o| shape(o) != (3 * d, d));
        }
        CudaOptions {
            tma_tiles: tiles,
            // Only cuBLASLt has algorithms to time: our GEMMs ignore it.
            lt_autotune: options.lt_autotune && options.gemm == GemmImpl::CublasLt,
            ..options.with_fusion_switches(on.switches())
        }
    }

    /// The device handle this backend launches on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The model's weights on the device and the kernels' shape decisions (which fused paths
    /// serve which row counts).
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// The GEMM implementation the blocks use (`FORA_GEMM`).
    pub fn gemm_impl(&self) -> GemmImpl {
        self.options.gemm
    }

    /// Whether every step's modulation table of `rows` rows is to be precomputed: asked for,
    /// and within the options' bound and a quarter of the free device memory.
    fn modulation_tables_fit(&self, plan: &SamplePlan, rows: usize) -> Result<bool> {
        let bytes = plan.steps * rows * ada_cols(self.model.config()) * 4;
        Ok(self.options.precompute_modulation
            && bytes <= self.options.max_modulation_table_bytes
            && bytes <= self.gpu.mem_info()?.0 / 4)
    }

    /// The buffers, stream and events of [`SideModulation`] for `rows` rows.
    fn side_modulation(&self, rows: usize, lt_autotune: bool) -> Result<SideModulation> {
        let cfg = self.model.config();
        let gpu = self.gpu.fork()?;
        let gemm = Gemm::new(&gpu, self.options.gemm, rows * ada_cols(cfg))?
            .with_tma_overrides(&gpu, self.options.tma_tiles)?;
        gemm.set_lt_autotune(lt_autotune);
        let event = || {
            self.gpu
                .context()
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .context("cannot create a CUDA event")
        };
        let side = SideModulation {
            cond: CondBuffers::new(&gpu, cfg, rows)?,
            second: gpu.alloc_zeros(rows * ada_cols(cfg), "the second modulation table")?,
            t_next: gpu.alloc_zeros(rows, "the next step's timesteps")?,
            fork: event()?,
            join: event()?,
            ready: None,
            main: self.gpu.stream().clone(),
            gemm,
            gpu,
        };
        // The side stream's allocations must be complete before the main stream uses them.
        side.gpu.synchronize()?;
        Ok(side)
    }

    /// Every step's modulation table, computed in chunks of batched GEMMs.
    fn precompute_modulation(
        &self,
        gemm: &Gemm,
        plan: &SamplePlan,
        rows: usize,
        labels: &[i32],
        t_table: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        let cfg = self.model.config();
        let gpu = &self.gpu;
        let cols = ada_cols(cfg);
        let chunk_steps = modulation_chunk_steps(rows, plan.steps);
        let chunk_rows = chunk_steps * rows;
        let table = gpu.alloc_zeros::<f32>(plan.steps * rows * cols, "the modulation tables")?;
        let cond = CondBuffers::new(gpu, cfg, chunk_rows)?;
        let chunk_labels: Vec<i32> = (0..chunk_steps)
            .flat_map(|_| labels.iter().copied())
            .collect();
        let chunk_labels = gpu.upload(&chunk_labels, "the labels of a step chunk")?;
        for k0 in (0..plan.steps).step_by(chunk_steps) {
            let n = (plan.steps - k0).min(chunk_steps) * rows;
            unsafe {
                self.model.modulation(
                    gpu,
                    gemm,
                    &cond,
                    n,
                    dptr_at(t_table, k0 * rows),
                    dptr(&chunk_labels),
                    dptr_at(&table, k0 * rows * cols),
                    TableColumns::All,
                )
            }?;
        }
        // The chunk buffers are freed when this returns; wait so that they are not in use.
        gpu.synchronize()?;
        Ok(table)
    }

    /// The computing and the reuse step of `ws` captured whole (`step_graph`): the copy of
    /// step 0's table (or timesteps), the forward, and the sampler update with step 0's
    /// parameters; [`StepGraph::set_step`] re-points both per step. One slot per
    /// [`step_graph_index`], None where [`step_graph_kinds`] captures nothing (every reuse kind
    /// without the FORA cache).
    fn capture_steps(&self, ws: &CudaWorkspace) -> Result<Vec<Option<StepGraph>>> {
        let ctx = self.gpu.context().cu_ctx();
        let placeholder = |mode| StepSpec {
            k: 0,
            i: ws.steps - 1,
            t: ws.timesteps[0],
            mode,
            update: StepUpdate::Ddpm {
                sqrt_recip_abar: 1.0,
                sqrt_recipm1_abar: 0.0,
                post_coef1: 1.0,
                post_coef2: 0.0,
                max_log: 0.0,
                min_log: 0.0,
                add_noise: false,
            },
            reuse_ahead: 0,
        };
        // The update kernel (sampler_step, or final_sampler_step with the final Linear) whose
        // node each step re-points.
        let update = self.sampler_params(ws, &placeholder(StepMode::Compute))?;
        let sampler_fn = self
            .gpu
            .function(super::sampler::update_kernel(&update))?
            .cu_function();
        // The reuse step reads its precomputed table in place: only fora_reuse_final reads it.
        let reuse_in_place = ws.options.reuse_table_in_place
            && ws.mod_table.is_some()
            && self.model.reuse_is_fused(ws.options.fused_reuse);
        // Computing, reuse from the cache, and with cache sums reuse from a sum (in the order
        // of step_graph_index); no reuse kind without the cache.
        let kinds = step_graph_kinds(ws.acts.has_cache(), ws.sums.is_some());
        // The fused reuse kernels: one of them is re-pointed per step (table in place, sum).
        // Loaded only where a reuse step is captured.
        let reuse_fns = if kinds.iter().any(|&(mode, _)| mode == StepMode::Reuse) {
            super::fora::fused_reuse_kernels()
                .map(|name| Ok(self.gpu.function(name)?.cu_function()))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let mut graphs: Vec<Option<StepGraph>> = (0..STEP_GRAPH_SLOTS).map(|_| None).collect();
        for (mode, summed) in kinds {
            // Captured with sum 0; each reuse step from a sum re-points it.
            let reuse_sum = match (summed, &ws.sums) {
                (false, _) => None,
                (true, Some(sums)) => Some(sums.sum(0)),
                (true, None) => bail!("a summed reuse step graph without cache sums"),
            };
            let slot = step_graph_index(mode, summed);
            debug_assert!(
                graphs[slot].is_none(),
                "step graph slot {slot} captured twice"
            );
            let step = placeholder(mode);
            let in_place = mode == StepMode::Reuse && reuse_in_place;
            let graph = self.capture(&format!("{mode:?} step"), || {
                if in_place {
                    let kind = self.forward_kind(
                        &ws.options,
                        ws.images,
                        mode,
                        false,
                        Some(self.step_copy_source(ws, 0)),
                        reuse_sum,
                    );
                    unsafe {
                        self.model.forward(
                            &self.gpu,
                            &ws.gemm,
                            &ws.acts,
                            kind,
                            &ws.latents,
                            ws.images,
                        )
                    }?;
                } else {
                    self.step_copy(ws, 0)?;
                    self.enqueue_forward(
                        &ws.options,
                        &ws.gemm,
                        &ws.acts,
                        mode,
                        &ws.latents,
                        ws.images,
                        ws.mod_table.is_none(),
                        None,
                        reuse_sum,
                    )?;
                }
                unsafe {
                    super::sampler::sampler_update(&self.gpu, &self.sampler_params(ws, &step)?)
                }
            })?;
            let table_source = if in_place {
                StepTableSource::InPlace
            } else {
                StepTableSource::Copy
            };
            let reader = (in_place || reuse_sum.is_some()).then_some(reuse_fns.as_slice());
            graphs[slot] = Some(StepGraph::new(
                graph,
                sampler_fn,
                table_source,
                reader,
                ctx,
            )?);
        }
        Ok(graphs)
    }

    /// Copies step k's modulation table (precomputed tables) or timesteps (a forward that
    /// computes its table) where the forward reads them, on the device's stream.
    fn step_copy(&self, ws: &CudaWorkspace, k: usize) -> Result<()> {
        let (dst, elements) = match &ws.mod_table {
            Some(_) => (dptr(&ws.acts.modulation), ws.acts.modulation.len()),
            None => (dptr(&ws.acts.t), ws.acts.rows),
        };
        let src = self.step_copy_source(ws, k);
        ensure!(k < ws.steps, "step {k} of a {}-step workspace", ws.steps);
        // A raw driver call.
        self.gpu.bind_context()?;
        // SAFETY: both ranges lie inside buffers of this workspace (k < steps), of f32.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst,
                src,
                elements * 4,
                self.gpu.stream().cu_stream(),
            )
        }
        .context("cannot select the step's table or timesteps")
    }

    /// The source [`CudaBackend::step_copy`] reads for step k.
    fn step_copy_source(&self, ws: &CudaWorkspace, k: usize) -> u64 {
        match &ws.mod_table {
            Some(table) => dptr_at(table, k * ws.acts.modulation.len()),
            None => dptr_at(&ws.t_table, k * ws.acts.rows),
        }
    }

    /// Records what `enqueue` puts on the device's stream as a CUDA graph (nothing runs).
    fn capture(&self, what: &str, enqueue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        let stream = self.gpu.stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("cannot start capturing a CUDA graph")?;
        let recorded = enqueue();
        // End the capture whatever happened, so that the stream stays usable.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded.with_context(|| format!("while capturing the {what} forward"))?;
        let graph = graph
            .with_context(|| format!("cannot instantiate the {what} forward graph"))?
            .with_context(|| format!("the {what} forward graph is empty"))?;
        graph.upload().context("cannot upload a CUDA graph")?;
        Ok(graph)
    }

    /// One forward on the device's stream. With `side`, the forward reads modulation table
    /// `parity` while a branch on the second stream computes the other one from `t_next`: the
    /// branch forks from the stream before the forward and joins it after, so a graph captured
    /// from here holds both and the next launch on the stream waits for both.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_forward(
        &self,
        options: &CudaOptions,
        gemm: &Gemm,
        acts: &Activations,
        mode: StepMode,
        latents: &CudaSlice<f32>,
        images: usize,
        with_modulation: bool,
        side: Option<(&SideModulation, usize)>,
        reuse_sum: Option<u64>,
    ) -> Result<()> {
        let Some((side, parity)) = side else {
            let kind = self.forward_kind(options, images, mode, with_modulation, None, reuse_sum);
            return unsafe {
                self.model
                    .forward(&self.gpu, gemm, acts, kind, latents, images)
            };
        };
        let main = self.gpu.stream();
        side.fork
            .record(main)
            .context("cannot record the side stream's fork")?;
        side.gpu
            .stream()
            .wait(&side.fork)
            .context("cannot fork the side stream")?;
        let branch = {
            let _next = crate::nvtx_range!("next_modulation");
            unsafe {
                self.model.modulation(
                    &side.gpu,
                    &side.gemm,
                    &side.cond,
                    acts.rows,
                    dptr(&side.t_next),
                    dptr(&acts.labels),
                    side.table(acts, 1 - parity),
                    TableColumns::All,
                )
            }
        };
        let kind = self.forward_kind(
            options,
            images,
            mode,
            false,
            Some(side.table(acts, parity)),
            reuse_sum,
        );
        let forward = unsafe {
            self.model
                .forward(&self.gpu, gemm, acts, kind, latents, images)
        };
        // Join whatever happened, so that a capture can end and the stream stays ordered.
        side.join
            .record(side.gpu.stream())
            .context("cannot record the side stream's join")?;
        main.wait(&side.join)
            .context("cannot join the side stream")?;
        branch.context("the next step's modulation table on the side stream")?;
        forward
    }

    fn forward_kind(
        &self,
        options: &CudaOptions,
        images: usize,
        mode: StepMode,
        with_modulation: bool,
        table: Option<u64>,
        reuse_sum: Option<u64>,
    ) -> ForwardKind {
        ForwardKind {
            mode,
            with_modulation,
            table,
            attention: options.attention,
            fused_reuse: options.fused_reuse,
            fused_final: options.fused_final,
            final_linear: !self.final_in_sampler(options, images),
            fused_ln: options.fused_ln,
            bias_bf16: options.lt_bias_bf16,
            bf16_residual: options.bf16_residual,
            reuse_gates_only: options.reuse_gates_only,
            lt_splitk: options.lt_splitk,
            fusions: options.fusion_switches(),
            reuse_sum: reuse_sum.filter(|_| mode == StepMode::Reuse),
        }
    }

    /// The cache sum of reuse step `step` ([`CudaOptions::reuse_sum`]): ready when an earlier
    /// step of its run computed it, else computed now, in one pass over the cache, for this
    /// step and up to `slots - 1` of the reuse steps after it (`step.reuse_ahead`). Returns
    /// its device address, or None where the step reads the cache instead
    /// ([`SumAction::Cache`]: alone in its run).
    fn prepare_sum(&self, ws: &mut CudaWorkspace, step: &StepSpec) -> Result<Option<u64>> {
        let CudaWorkspace {
            sums,
            acts,
            gemm,
            mod_table,
            t_table,
            steps,
            ..
        } = ws;
        let Some(sums) = sums.as_mut() else {
            bail!("step {}: this workspace keeps no cache sums", step.k);
        };
        let count = match sum_action(sums.ready, step.k, step.reuse_ahead, sums.slots, *steps) {
            SumAction::Ready(slot) => return Ok(Some(sums.sum(slot))),
            SumAction::Compute { count } => count,
            SumAction::Cache => return Ok(None),
        };
        let rows = acts.rows;
        let cols = ada_cols(self.model.config());
        let tables = match (mod_table.as_ref(), sums.tables.as_ref()) {
            (Some(table), _) => SumTables::Precomputed {
                first: dptr_at(table, step.k * rows * cols),
                stride: rows * cols,
            },
            (None, Some(scratch)) => SumTables::Compute {
                t: dptr_at(t_table, step.k * rows),
                scratch: dptr(scratch),
            },
            (None, None) => bail!("cache sums without tables to read the gates from"),
        };
        unsafe {
            self.model.cache_sums(
                &self.gpu,
                gemm,
                acts,
                tables,
                count,
                dptr(&sums.sums),
                sums.slab,
            )
        }?;
        sums.ready = Some((step.k, count));
        Ok(Some(sums.sum(0)))
    }

    /// The buffers of [`ReuseSums`] for `rows` rows, `slots` sums; gate tables too when the
    /// workspace does not precompute them.
    fn reuse_sums(&self, rows: usize, slots: usize, with_tables: bool) -> Result<ReuseSums> {
        let cfg = self.model.config();
        let slab = rows * cfg.tokens() * cfg.hidden;
        let table = rows * ada_cols(cfg);
        let bytes = slots * (slab + if with_tables { table } else { 0 }) * 4;
        self.gpu.ensure_free(
            bytes,
            &format!("the cache sums of {slots} reuse steps (FORA_REUSE_SUM={slots})"),
        )?;
        // The passes launch outside the step graphs, the first one during sampling: load their
        // kernels now (lazy module loading may take device memory on first use), so that the
        // sampling loop allocates nothing.
        for count in 1..=slots {
            self.gpu.function(super::fora::cache_sum_kernel(count))?;
        }
        Ok(ReuseSums {
            sums: self.gpu.alloc_zeros(slots * slab, "the cache sums")?,
            tables: if with_tables {
                Some(
                    self.gpu
                        .alloc_zeros(slots * table, "the gate tables of the cache sums")?,
                )
            } else {
                None
            },
            slots,
            slab,
            ready: None,
        })
    }

    fn sampler_params(&self, ws: &CudaWorkspace, step: &StepSpec) -> Result<SamplerStepParams> {
        let cfg = self.model.config();
        let img = ws.images * cfg.image_len();
        let noise = match &ws.noise {
            Some(n) => {
                ensure!(
                    step.k < ws.steps,
                    "step {} beyond the noise file's {} steps",
                    step.k,
                    ws.steps
                );
                dptr_at(n, step.k * img)
            }
            None => 0,
        };
        let guided = guided_channels(ws.guidance, cfg.in_channels, cfg.out_channels());
        let scale = ws.guidance.map_or(1.0, |g| g.scale);
        let mut p = SamplerStepParams {
            model_out: dptr(&ws.acts.final_out),
            x: dptr(&ws.latents),
            noise,
            seed: ws.seed,
            noise_stream: step.k as u64 + 1,
            images: ws.images as i32,
            rows: ws.acts.rows as i32,
            channels: cfg.in_channels as i32,
            out_channels: cfg.out_channels() as i32,
            height: cfg.input_size as i32,
            width: cfg.input_size as i32,
            patch: cfg.patch as i32,
            guided_channels: guided,
            cfg_scale: scale,
            kind: 0,
            add_noise: 0,
            learn_sigma: cfg.learn_sigma as i32,
            sqrt_recip_abar: 0.0,
            sqrt_recipm1_abar: 0.0,
            post_coef1: 0.0,
            post_coef2: 0.0,
            max_log: 0.0,
            min_log: 0.0,
            sqrt_abar_prev: 0.0,
            dir_coef: 0.0,
            sigma: 0.0,
            xn: 0,
            final_w: 0,
            final_b: 0,
            dim: 0,
        };
        if self.final_in_sampler(&ws.options, ws.images) {
            // final_sampler_step: the model output from the final LayerNorm's output.
            let (w, b) = self.model.final_linear();
            p.xn = dptr(&ws.acts.xn);
            p.final_w = w;
            p.final_b = b;
            p.dim = cfg.hidden as i32;
        }
        super::sampler::set_update(&mut p, &step.update);
        Ok(p)
    }

    /// One step of [`Backend::step`], with the GPU's PDL setting already the workspace's.
    fn run_step(&self, ws: &mut CudaWorkspace, step: &StepSpec) -> Result<()> {
        // Before anything launches: a workspace without the cache has nothing to reuse (and no
        // reuse graph, sums or cache for a launch to read).
        if step.mode == StepMode::Reuse && !ws.acts.has_cache() {
            return Err(no_cache_error(step.k));
        }
        if step.mode == StepMode::Reuse && !ws.cache_valid {
            bail!(
                "step {}: the first step of a run must compute (the FORA cache is empty)",
                step.k
            );
        }
        ensure!(
            ws.timesteps.get(step.k) == Some(&step.t),
            "step {} has timestep {}, the plan said {:?}",
            step.k,
            step.t,
            ws.timesteps.get(step.k)
        );
        // A reuse step's cache sum (computed now if this is the first step of its run); a
        // computing step changes the cache under any sums.
        let reuse_sum = match (step.mode, ws.sums.as_mut()) {
            (_, None) => None,
            (StepMode::Reuse, Some(_)) => self.prepare_sum(ws, step)?,
            (StepMode::Compute, Some(sums)) => {
                sums.ready = None;
                None
            }
        };
        if let Some(graphs) = &ws.step_graphs {
            // The whole step in one launch: re-point the copy and the update, then launch.
            let slot = step_graph_index(step.mode, reuse_sum.is_some());
            let Some(g) = graphs.get(slot).and_then(Option::as_ref) else {
                bail!(
                    "step {}: this workspace captured no whole-step graph for a {:?} step{}",
                    step.k,
                    step.mode,
                    if reuse_sum.is_some() {
                        " from a cache sum"
                    } else {
                        ""
                    }
                );
            };
            let p = self.sampler_params(ws, step)?;
            super::sampler::update_plan(&p)?;
            // The graph updates are raw driver calls: make the context current on this thread
            // (a step may run on another thread than the one that built the workspace).
            self.gpu.bind_context()?;
            unsafe { g.set_step(Some(self.step_copy_source(ws, step.k)), reuse_sum, &p) }?;
            g.graph
                .launch()
                .context("cannot launch the captured step")?;
            if step.mode == StepMode::Compute {
                ws.cache_valid = true;
            }
            return Ok(());
        }
        let rows = ws.acts.rows;
        let stream = self.gpu.stream();
        // The table parity (with the side stream, step k reads table k % 2) and the captured
        // forward this step launches, looked up before anything launches.
        let parity = if ws.side.is_some() { step.k % 2 } else { 0 };
        let graph = match &ws.graphs {
            Some(graphs) => Some(
                graphs
                    .get(graph_index(step.mode, parity))
                    .and_then(Option::as_ref)
                    .with_context(|| {
                        format!(
                            "step {}: this workspace captured no {:?} forward",
                            step.k, step.mode
                        )
                    })?,
            ),
            None => None,
        };
        // The step's precomputed table, or the timesteps the forward's own conditioning reads
        // (with the side stream, the side branch reads them).
        if ws.mod_table.is_some() || ws.side.is_none() {
            self.step_copy(ws, step.k)?;
        }
        if let Some(side) = &mut ws.side {
            if side.ready != Some(step.k) {
                // Not computed by the previous step's side branch: compute it now, first.
                let _cond = crate::op_range!(&self.gpu, "conditioning");
                unsafe {
                    self.model.modulation(
                        &self.gpu,
                        &ws.gemm,
                        &side.cond,
                        rows,
                        dptr_at(&ws.t_table, step.k * rows),
                        dptr(&ws.acts.labels),
                        side.table(&ws.acts, parity),
                        TableColumns::All,
                    )
                }?;
            }
            // The side branch computes the next step's table (the last step's branch
            // recomputes its own: harmless, and it keeps one graph per parity).
            let next = (step.k + 1).min(ws.steps - 1);
            let src = ws.t_table.slice(next * rows..(next + 1) * rows);
            stream
                .memcpy_dtod(&src, &mut side.t_next)
                .context("cannot select the next step's timesteps")?;
            side.ready = (step.k + 1 < ws.steps).then_some(step.k + 1);
        }
        match graph {
            Some(graph) => {
                graph
                    .launch()
                    .context("cannot launch the captured forward")?;
            }
            None => self.enqueue_forward(
                &ws.options,
                &ws.gemm,
                &ws.acts,
                step.mode,
                &ws.latents,
                ws.images,
                ws.mod_table.is_none(),
                ws.side.as_ref().map(|s| (s, parity)),
                reuse_sum,
            )?,
        }
        if step.mode == StepMode::Compute {
            ws.cache_valid = true;
        }
        let p = self.sampler_params(ws, step)?;
        let _update = crate::op_range!(&self.gpu, "{}", super::sampler::update_kernel(&p));
        unsafe { super::sampler::sampler_update(&self.gpu, &p) }
    }

    /// Refuses a workspace that another backend built, or whose backend is gone: its buffers
    /// are sized for that backend's model and its graphs read that backend's weights.
    fn check_built_here(&self, ws: &CudaWorkspace) -> Result<()> {
        ensure!(
            ws.built_by
                .ptr_eq(&std::sync::Arc::downgrade(&self.identity)),
            "this workspace was built by another CUDA backend (its buffers and captured graphs \
             belong to that backend's model): build one with this backend's `workspace`"
        );
        Ok(())
    }

    /// Whether the steps of `images` images apply the final Linear in their update
    /// (`final_sampler_step`, option [`CudaOptions::final_sampler`], where the model's sizes
    /// allow it and the batch is small: [`super::sampler::final_sampler_pays`]) and their
    /// forwards stop before it.
    fn final_in_sampler(&self, options: &CudaOptions, images: usize) -> bool {
        let cfg = self.model.config();
        options.final_sampler
            && super::sampler::final_sampler_supported(cfg.hidden, cfg.patch_out())
            && super::sampler::final_sampler_pays(images)
    }
}

/// Labels of the model rows: `[y; null]` with guidance, `y` without.
fn row_labels(cfg: &DitConfig, classes: &[usize], guided: bool) -> Vec<i32> {
    let mut labels: Vec<i32> = classes.iter().map(|&c| c as i32).collect();
    if guided {
        labels.extend(std::iter::repeat_n(cfg.null_class() as i32, classes.len()));
    }
    labels
}

impl Backend for CudaBackend {
    type Workspace = CudaWorkspace;

    fn name(&self) -> String {
        format!("cuda:{} {}", self.gpu.ordinal(), self.gpu.name())
    }

    fn config(&self) -> &DitConfig {
        self.model.config()
    }

    fn workspace(&self, plan: &SamplePlan) -> Result<CudaWorkspace> {
        let cfg = self.model.config();
        let gpu = &self.gpu;
        let b = plan.images();
        plan.validate(cfg)?;
        let rows = plan.model_rows();
        let img = b * cfg.image_len();
        // The FORA cache only where a step reuses it: a plan without reuse steps (FORA N = 1)
        // leaves it out (its free-memory check, `activation_bytes`, then counts none), and with
        // it everything that only serves reuse steps (the L2 window, the cache sums, the reuse
        // graphs, the reuse forwards' autotuning). Its computing forwards write their block
        // outputs into a scratch (GpuModel::forward), as `Backend::forward` does.
        let with_cache = plan.reuses;
        let mut acts = Activations::new(gpu, cfg, rows, with_cache)?;
        if with_cache && self.options.l2_persist && self.options.reuse_sum <= 1 {
            // Before any capture: the reuse launch records the window into its graph node.
            // (With cache sums only the sums pass reads the cache, once per run of steps.)
            acts.persist_cache_in_l2(gpu)?;
        }
        let precompute = self.modulation_tables_fit(plan, rows)?;
        // The batched conditioning GEMMs of the precomputation are the largest when they run.
        let chunk_mn = if precompute {
            modulation_chunk_steps(rows, plan.steps) * rows * ada_cols(cfg)
        } else {
            0
        };
        let gemm = Gemm::new(gpu, self.options.gemm, max_gemm_mn(cfg, rows).max(chunk_mn))?
            .with_tma_overrides(gpu, self.options.tma_tiles)?;
        gemm.set_lt_autotune(self.options.lt_autotune);
        let mut latents = gpu.alloc_zeros::<f32>(img, "the latents")?;
        let (noise, seed) = match &plan.noise {
            NoiseSource::Seed(seed) => {
                unsafe {
                    super::sampler::normal_fill(
                        gpu,
                        &NormalFillParams {
                            out: dptr(&latents),
                            seed: *seed,
                            stream: 0,
                            n: img as i64,
                        },
                    )
                }?;
                (None, *seed)
            }
            // Its shapes and values: plan.validate above.
            NoiseSource::File { x_t, noise } => {
                gpu.stream()
                    .memcpy_htod(x_t, &mut latents)
                    .context("cannot copy x_T to the device")?;
                (Some(gpu.upload(noise, "the noise file")?), 0)
            }
        };
        let labels = row_labels(cfg, &plan.classes, plan.guidance.is_some());
        gpu.stream()
            .memcpy_htod(&labels, &mut acts.labels)
            .context("cannot copy labels to the device")?;
        let t_rows: Vec<f32> = plan
            .timesteps
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t as f32, rows))
            .collect();
        let t_table = gpu.upload(&t_rows, "the timestep table")?;
        let mod_table = if precompute {
            Some(self.precompute_modulation(&gemm, plan, rows, &labels, &t_table)?)
        } else {
            None
        };
        let with_modulation = mod_table.is_none();
        let side = if with_modulation && self.options.side_stream {
            Some(self.side_modulation(rows, gemm.lt_autotune())?)
        } else {
            None
        };
        let parities = if side.is_some() { 2 } else { 1 };
        let step_graph = self.options.graphs && self.options.step_graph && side.is_none();
        // Cache sums: a reuse step's sum moves from step to step, which the whole-step graph
        // re-points and the per-forward graphs cannot. One slot would serve no step
        // (SumAction::Cache): none then.
        let sums = if with_cache
            && self.options.reuse_sum > 1
            && self.model.reuse_is_fused(self.options.fused_reuse)
            && (!self.options.graphs || step_graph)
        {
            Some(self.reuse_sums(rows, self.options.reuse_sum, mod_table.is_none())?)
        } else {
            None
        };
        let sum0 = sums.as_ref().map(|s| s.sum(0));
        let enqueue = |mode, parity| {
            self.enqueue_forward(
                &self.options,
                &gemm,
                &acts,
                mode,
                &latents,
                b,
                with_modulation,
                side.as_ref().map(|s| (s, parity)),
                sum0,
            )
        };
        if self.options.graphs && gemm.lt_autotune() {
            // A capture cannot time anything: run the forwards once uncaptured so that every
            // GEMM shape is tuned before it is recorded. Harmless: the first step computes and
            // overwrites the activations, caches and tables these write. (Without the cache no
            // reuse forward is captured, so none is tuned.)
            for &mode in forward_modes(with_cache) {
                enqueue(mode, 0).context("while tuning the cuBLASLt GEMMs")?;
            }
            if sum0.is_some() {
                // A reuse step alone in its run reads the cache, not a sum: its gate columns'
                // GEMMs are other shapes than the summed step's.
                self.enqueue_forward(
                    &self.options,
                    &gemm,
                    &acts,
                    StepMode::Reuse,
                    &latents,
                    b,
                    with_modulation,
                    side.as_ref().map(|s| (s, 0)),
                    None,
                )
                .context("while tuning the cuBLASLt GEMMs")?;
            }
        }
        let graphs = if self.options.graphs && !step_graph {
            // One slot per graph_index; the modes not captured (reuse, without the cache) stay
            // None, so that no index can reach another mode's graph.
            let mut graphs: Vec<Option<CudaGraph>> = (0..2 * parities).map(|_| None).collect();
            for parity in 0..parities {
                for &mode in forward_modes(with_cache) {
                    let slot = graph_index(mode, parity);
                    debug_assert!(graphs[slot].is_none(), "forward graph slot {slot} twice");
                    graphs[slot] =
                        Some(self.capture(&format!("{mode:?}"), || enqueue(mode, parity))?);
                }
            }
            Some(graphs)
        } else {
            None
        };
        gpu.synchronize()?;
        let mut ws = CudaWorkspace {
            built_by: std::sync::Arc::downgrade(&self.identity),
            options: self.options,
            acts,
            gemm,
            latents,
            noise,
            seed,
            images: b,
            steps: plan.steps,
            guidance: plan.guidance,
            t_table,
            timesteps: plan.timesteps.clone(),
            mod_table,
            side,
            graphs,
            step_graphs: None,
            cache_valid: false,
            sums,
        };
        if step_graph {
            ws.step_graphs = Some(self.capture_steps(&ws)?);
            gpu.synchronize()?;
        }
        Ok(ws)
    }

    fn step(&self, ws: &mut CudaWorkspace, step: &StepSpec) -> Result<()> {
        self.check_built_here(ws)?;
        // Launches made now (not replayed from a graph) follow the workspace's PDL setting,
        // as its captured graphs do; the backend's own is set back after.
        let pdl = self.gpu.programmatic_launch();
        self.gpu.set_programmatic_launch(ws.options.pdl);
        let stepped = self.run_step(ws, step);
        self.gpu.set_programmatic_launch(pdl);
        stepped
    }

    fn latents(&self, ws: &mut CudaWorkspace) -> Result<Vec<f32>> {
        self.check_built_here(ws)?;
        self.gpu.download(&ws.latents)
    }

    fn forward(
        &self,
        x: &[f32],
        t: &[i64],
        y: &[usize],
        guidance: Option<Guidance>,
    ) -> Result<Vec<f32>> {
        let cfg = self.model.config();
        let gpu = &self.gpu;
        let n = t.len();
        crate::cpu::model::check_inputs(cfg, n, x, t, y)?;
        let images = match guidance {
            Some(_) => {
                ensure!(
                    n.is_multiple_of(2),
                    "forward_with_cfg needs an even number of rows, got {n}"
                );
                n / 2
            }
            None => n,
        };
        let mut acts = Activations::new(gpu, cfg, n, false)?;
        let gemm = Gemm::new(gpu, self.options.gemm, max_gemm_mn(cfg, n))?
            .with_tma_overrides(gpu, self.options.tma_tiles)?;
        gemm.set_lt_autotune(self.options.lt_autotune);
        let latents = gpu.upload(&x[..images * cfg.image_len()], "the forward input x")?;
        let t32: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let y32: Vec<i32> = y.iter().map(|&v| v as i32).collect();
        gpu.stream()
            .memcpy_htod(&t32, &mut acts.t)
            .context("cannot copy t to the device")?;
        gpu.stream()
            .memcpy_htod(&y32, &mut acts.labels)
            .context("cannot copy y to the device")?;
        // The model output itself is wanted here: the final Linear always runs.
        let kind = ForwardKind {
            final_linear: true,
            ..self.forward_kind(&self.options, images, StepMode::Compute, true, None, None)
        };
        unsafe {
            self.model
                .forward(gpu, &gemm, &acts, kind, &latents, images)
        }?;
        let out = gpu.alloc_zeros::<f32>(n * cfg.out_len(), "the forward output")?;
        let guided = guided_channels(guidance, cfg.in_channels, cfg.out_channels());
        let scale = guidance.map_or(1.0, |g| g.scale);
        unsafe {
            super::sampler::unpatchify(
                gpu,
                &UnpatchifyParams {
                    model_out: dptr(&acts.final_out),
                    out: dptr(&out),
                    rows: n as i32,
                    out_channels: cfg.out_channels() as i32,
                    height: cfg.input_size as i32,
                    width: cfg.input_size as i32,
                    patch: cfg.patch as i32,
                    guided_channels: guided,
                    cfg_scale: scale,
                },
            )
        }?;
        gpu.download(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::{sum_action, tma_tiles_in_effect, CudaOptions, SumAction};

    /// `FORA_TMA_TILES` entries count only for the model's GEMM shapes, and only where the GEMM
    /// implementation takes them.
    #[test]
    fn tma_tiles_in_effect_are_the_model_shapes_entries() {
        use super::GemmImpl;
        let cfg = crate::config::DitConfig::official("DiT-XL/2", 32).unwrap();
        let set = "7x7=128x128,3456x1152=128x112,1152x4608=k3-128x128,9x1152=128x128";
        let options = CudaOptions::default()
            .with_settings(&format!("FORA_TMA_TILES={set}"))
            .unwrap();
        let shown = |o: &CudaOptions, cc: i32| tma_tiles_in_effect(o, cc, &cfg).to_string();
        // cuBLASLt (the default) routes them on a Hopper only.
        assert_eq!(options.gemm, GemmImpl::CublasLt);
        assert_eq!(shown(&options, 9), "3456x1152=128x112,1152x4608=k3-128x128");
        assert_eq!(shown(&options, 8), "");
        for (imp, kept) in [
            (GemmImpl::Tma, true),
            (GemmImpl::TmaMulticast, true),
            (GemmImpl::Custom, false),
            (GemmImpl::Wgmma, false),
        ] {
            let o = CudaOptions {
                gemm: imp,
                ..options
            };
            assert_eq!(!shown(&o, 9).is_empty(), kept, "{imp:?}");
        }
        // Every shape the model runs is kept: the timestep MLP, the modulation table and its
        // chunks, the blocks' four, the final Linear.
        let every = "1152x256=128x128,1152x1152=128x128,195840x1152=128x128,2304x1152=128x128,\
                     3456x1152=128x128,4608x1152=128x128,32x1152=128x128,1152x4608=128x128";
        let o = CudaOptions::default()
            .with_settings(&format!("FORA_TMA_TILES={every}"))
            .unwrap();
        assert_eq!(shown(&o, 9), every.replace(' ', ""));
    }

    /// The sums of a whole schedule: every reuse step finds its sum computed by the first
    /// step of its run (up to `slots` at a time), and never reads a slot another step owns.
    #[test]
    fn every_reuse_step_reads_its_own_sum() {
        use crate::backend::StepMode::{Compute as C, Reuse as R};
        // (schedule, slots, passes over the cache, steps reading the cache)
        for (modes, slots, passes, from_cache) in [
            (vec![C, R, R, C, R, R, C], 2, 2, 0),
            (vec![C, R, R, R, R, C, R, R, R, R], 4, 2, 0),
            (vec![C, R, R, R, R, C, R, R, R, R], 2, 4, 0),
            (vec![C, R, R, R, R, C, R, R, R, R], 3, 2, 2),
            (vec![C, R, R, R, R, C, R, R, R, R], 1, 0, 8),
            (vec![C, R, R, R, R], 4, 1, 0),
            (vec![C, R, C, R, C, R, R, R], 2, 1, 3),
        ] {
            let ahead = crate::sampler::reuse_runs(&modes);
            let steps = modes.len();
            let mut ready = None;
            let mut computed = 0;
            let mut cached = 0;
            // slot -> the step whose sum it holds
            let mut owner = vec![None; slots];
            for (k, &mode) in modes.iter().enumerate() {
                if mode == C {
                    ready = None;
                    continue;
                }
                let slot = match sum_action(ready, k, ahead[k], slots, steps) {
                    SumAction::Ready(slot) => slot,
                    SumAction::Cache => {
                        // Only a step that would sum for itself alone reads the cache.
                        assert!(ahead[k] == 0 || slots == 1, "{modes:?}: step {k}");
                        cached += 1;
                        continue;
                    }
                    SumAction::Compute { count } => {
                        assert!((2..=slots).contains(&count) && k + count <= steps);
                        computed += 1;
                        for (j, o) in owner.iter_mut().enumerate() {
                            *o = (j < count).then_some(k + j);
                        }
                        ready = Some((k, count));
                        0
                    }
                };
                assert_eq!(owner[slot], Some(k), "{modes:?} slots={slots}: step {k}");
            }
            assert_eq!(
                (computed, cached),
                (passes, from_cache),
                "{modes:?} slots={slots}: passes over the cache, steps reading it"
            );
        }
    }

    /// Which graphs a workspace captures: without the FORA cache (a plan without reuse steps)
    /// no reuse kind at all; every captured kind in a slot of its own, which the lookups of a
    /// step (`step_graph_index`, `graph_index`) find again, and a slot not captured stays
    /// empty (never another kind's graph).
    #[test]
    fn captured_graphs_follow_the_cache() {
        use super::{
            forward_modes, graph_index, step_graph_index, step_graph_kinds, STEP_GRAPH_SLOTS,
        };
        use crate::backend::StepMode::{Compute as C, Reuse as R};
        for (with_cache, sums) in [(false, false), (false, true), (true, false), (true, true)] {
            let what = format!("with_cache={with_cache} sums={sums}");
            let kinds = step_graph_kinds(with_cache, sums);
            assert_eq!(kinds.first(), Some(&(C, false)), "{what}");
            assert_eq!(kinds.iter().any(|&(m, _)| m == R), with_cache, "{what}");
            assert_eq!(kinds.contains(&(R, true)), with_cache && sums, "{what}");
            let mut slots = [None; STEP_GRAPH_SLOTS];
            for &(mode, summed) in &kinds {
                let slot = step_graph_index(mode, summed);
                assert!(slot < STEP_GRAPH_SLOTS, "{what}");
                assert_eq!(
                    slots[slot].replace((mode, summed)),
                    None,
                    "{what}: slot {slot}"
                );
            }
            // A computing step never reads a sum (run_step asks with summed = false).
            assert_eq!(
                slots[step_graph_index(C, false)],
                Some((C, false)),
                "{what}"
            );
            for summed in [false, true] {
                let want = (with_cache && (sums || !summed)).then_some((R, summed));
                assert_eq!(slots[step_graph_index(R, summed)], want, "{what}");
            }
        }
        for with_cache in [false, true] {
            let modes = forward_modes(with_cache);
            assert!(modes.contains(&C));
            assert_eq!(modes.contains(&R), with_cache);
            for parities in [1, 2] {
                let mut slots = vec![None; 2 * parities];
                for parity in 0..parities {
                    for &mode in modes {
                        let slot = graph_index(mode, parity);
                        assert_eq!(slots[slot].replace((mode, parity)), None);
                    }
                }
                for parity in 0..parities {
                    for mode in [C, R] {
                        let want = (mode == C || with_cache).then_some((mode, parity));
                        assert_eq!(slots[graph_index(mode, parity)], want);
                    }
                }
            }
        }
    }

    /// A reuse step on a workspace without the cache names the reason.
    #[test]
    fn no_cache_error_names_the_plan() {
        let e = super::no_cache_error(4).to_string();
        assert!(e.starts_with("step 4:"), "{e}");
        assert!(e.contains("SamplePlan::reuses is false"), "{e}");
        assert!(e.contains("no FORA cache"), "{e}");
    }

    /// Without lookahead every reuse step reads the cache; a stale range never serves.
    #[test]
    fn unknown_runs_and_stale_ranges() {
        assert_eq!(sum_action(None, 5, 0, 4, 10), SumAction::Cache);
        // The last step of the schedule, whatever its lookahead says.
        assert_eq!(sum_action(None, 9, 3, 4, 10), SumAction::Cache);
        assert_eq!(
            sum_action(Some((1, 2)), 5, 3, 4, 10),
            SumAction::Compute { count: 4 }
        );
        assert_eq!(
            sum_action(Some((1, 2)), 3, 3, 4, 10),
            SumAction::Compute { count: 4 }
        );
        assert_eq!(sum_action(Some((1, 2)), 2, 0, 4, 10), SumAction::Ready(1));
        // The schedule's end bounds the count.
        assert_eq!(
            sum_action(None, 8, 5, 4, 10),
            SumAction::Compute { count: 2 }
        );
        // A caller's lookahead as large as it gets.
        assert_eq!(
            sum_action(None, 1, usize::MAX, 4, 10),
            SumAction::Compute { count: 4 }
        );
    }
}
