//! cuBLASLt, the reference and fallback GEMM: `d[M, N] = A[M, K] @ W[N, K]^T` (+ bias, GELU) in
//! the crate's row-major convention, bf16 operands, f32 accumulation, bf16 or f32 output.
//!
//! cuBLAS is column-major, so the row-major product is computed as its transpose:
//! `d^T (N x M, ld ldd) = W (op T of the K x N column-major view of W) @ A^T (the K x M view of A)`,
//! which makes cuBLAS's per-row bias vector our per-column `bias[N]`.
//!
//! cudarc's safe `Matmul` wants the bias in the output type and keeps its workspace private, so
//! this goes through `cudarc::cublaslt::result` with its own descriptors and workspace.
//!
//! The algorithm of each distinct matmul (shapes, leading dimensions, output, epilogue, pointer
//! alignments) is chosen once and remembered: by default cuBLASLt's heuristic first choice; with
//! autotuning ([`CublasLt::set_autotune`]) the fastest of the heuristic's first
//! [`AUTOTUNE_CANDIDATES`] timed with CUDA events on the real operands, the way cuDNN's
//! benchmark mode does. Autotuned choices may differ between processes (timing noise), so bits
//! reproduce across runs only without it; within one `CublasLt` a shape always gets one choice.

use super::device::Gpu;
use anyhow::{ensure, Context, Result};
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::sys as driver_sys;
use cudarc::driver::{CudaSlice, CudaStream};
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Heuristic candidates timed per matmul when autotuning.
pub const AUTOTUNE_CANDIDATES: usize = 8;
/// Timed runs per candidate (after one untimed run).
const AUTOTUNE_RUNS: usize = 5;

/// Output element type of a cuBLASLt matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LtOutput {
    /// bf16 (rounded to nearest even).
    Bf16,
    /// f32.
    F32,
}

/// What cuBLASLt applies after the product. Bias pointers are `[N]` device addresses: f32 for
/// `Bias` / `GeluBias`; of the output type for `BiasOutType` / `GeluBiasOutType` (bf16 for a
/// bf16 output, as under PyTorch's autocast: cuBLASLt refuses an f32 bias with a bf16 output
/// on some cards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LtEpilogue {
    /// The product as is.
    None,
    /// GELU of the product (cuBLASLt's).
    Gelu,
    /// Product + f32 bias.
    Bias(u64),
    /// GELU(product + f32 bias).
    GeluBias(u64),
    /// Product + bias of the output type.
    BiasOutType(u64),
    /// GELU(product + bias of the output type).
    GeluBiasOutType(u64),
}

/// One matmul, row-major: `d[m, n] = epilogue(sum_k a[m, k] * w[n, k])`. Pointers are device
/// addresses; leading dimensions are in elements.
#[derive(Clone, Copy, Debug)]
pub struct LtMatmul {
    /// Activations, bf16 `[m, k]`.
    pub a: u64,
    /// Weight, bf16 `[n, k]` (a Linear's, PyTorch layout).
    pub w: u64,
    /// Output `[m, n]`, of type `output`.
    pub d: u64,
    /// Rows of `a` and `d`.
    pub m: usize,
    /// Rows of `w`, columns of `d`.
    pub n: usize,
    /// The reduction length.
    pub k: usize,
    /// Elements between rows of `a`.
    pub lda: usize,
    /// Elements between rows of `w`.
    pub ldw: usize,
    /// Elements between rows of `d`.
    pub ldd: usize,
    /// The output's element type.
    pub output: LtOutput,
    /// What is applied to the product.
    pub epilogue: LtEpilogue,
    /// A strided batch of such matmuls, or None for one.
    pub batch: Option<LtBatch>,
}

/// `count` matmuls of one shape: matmul b reads `w + b * stride_w`, `a + b * stride_a` and
/// `bias + b * stride_bias` and writes `d + b * stride_d` (strides in elements; 0 shares the
/// operand).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtBatch {
    /// Matmuls in the batch.
    pub count: usize,
    /// Elements from one matmul's `w` to the next.
    pub stride_w: i64,
    /// Elements from one matmul's `a` to the next.
    pub stride_a: i64,
    /// Elements from one matmul's `d` to the next.
    pub stride_d: i64,
    /// Elements from one matmul's bias to the next.
    pub stride_bias: i64,
}

/// Whether cuBLASLt ran the matmul or has no algorithm for that combination (the caller then
/// takes another path; every other failure is an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LtRun {
    /// Launched.
    Done,
    /// cuBLASLt has no algorithm for it; nothing was launched.
    Unsupported,
}

/// Everything the algorithm choice depends on: the heuristic sees shapes, types, the epilogue
/// and pointer alignments, never the addresses themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldw: usize,
    ldd: usize,
    output: LtOutput,
    /// 0 none, 1 GELU, 2 bias, 3 GELU + bias.
    epilogue: u8,
    /// Alignments of w, a, d in bytes.
    align: [u32; 3],
    batch: Option<LtBatch>,
}

/// An algorithm chosen for an [`AlgoKey`] (one whose workspace fits ours).
#[derive(Clone, Copy, Debug)]
struct Chosen {
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle with its workspace, bound to the `Gpu`'s stream.
pub struct CublasLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_bytes: usize,
    stream: Arc<CudaStream>,
    /// Set once cuBLASLt has refused an f32 bias with a bf16 output (cuBLASLt 13 on an H200
    /// answers CUBLAS_STATUS_INVALID_VALUE): later calls skip the doomed heuristic query.
    bf16_out_f32_bias_refused: AtomicBool,
    /// Time the heuristic's candidates instead of taking its first choice.
    autotune: AtomicBool,
    /// The algorithm of every matmul seen so far.
    chosen: Mutex<HashMap<AlgoKey, Chosen>>,
}

// SAFETY: cuBLASLt handles may be used from any host thread (the library is thread safe); all
// work goes on the one stream this struct holds.
unsafe impl Send for CublasLt {}
unsafe impl Sync for CublasLt {}

impl std::fmt::Debug for CublasLt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CublasLt")
            .field("workspace_bytes", &self.workspace_bytes)
            .field("autotune", &self.autotune.load(Ordering::Relaxed))
            .finish()
    }
}

impl CublasLt {
    /// Loads libcublasLt (a clear error when it is missing), creates a handle and allocates the
    /// workspace NVIDIA recommends: 32 MiB on Hopper, 4 MiB before.
    pub fn new(gpu: &Gpu) -> Result<CublasLt> {
        // SAFETY: only tries to dlopen the library.
        ensure!(
            unsafe { sys::is_culib_present() },
            "cuBLASLt is not available: libcublasLt.so could not be loaded (install the CUDA \
             toolkit's cuBLAS or the nvidia-cublas wheel, or use FORA_GEMM=custom)"
        );
        gpu.bind_context().context("cuBLASLt")?;
        let handle = lt::create_handle().map_err(|e| lt_error(e, "cublasLtCreate"))?;
        let workspace_bytes = if gpu.compute_capability().0 >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        let workspace = match gpu.alloc_zeros::<u8>(workspace_bytes, "the cuBLASLt workspace") {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: the handle was created above and is not used again.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e);
            }
        };
        Ok(CublasLt {
            handle,
            workspace,
            workspace_bytes,
            stream: gpu.stream().clone(),
            bf16_out_f32_bias_refused: AtomicBool::new(false),
            autotune: AtomicBool::new(false),
            chosen: Mutex::new(HashMap::new()),
        })
    }

    /// Turns autotuning on or off for matmuls not seen yet (see the module comment). A matmul
    /// first seen while the stream is capturing a graph cannot be timed: it gets the heuristic's
    /// choice for that capture and is tuned on its first uncaptured run.
    pub fn set_autotune(&self, on: bool) {
        self.autotune.store(on, Ordering::Relaxed);
    }

    /// Whether autotuning is on.
    pub fn autotune(&self) -> bool {
        self.autotune.load(Ordering::Relaxed)
    }

    /// Distinct matmuls whose algorithm has been chosen.
    pub fn chosen_count(&self) -> usize {
        self.chosen.lock().map_or(0, |m| m.len())
    }

    /// Runs `mm` on the stream, or reports [`LtRun::Unsupported`] when cuBLASLt has no algorithm
    /// for it. The caller has validated shapes and pointers (see `gemm::validate`).
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn matmul(&self, mm: &LtMatmul) -> Result<LtRun> {
        ensure!(
            mm.m > 0 && mm.n > 0 && mm.k > 0,
            "cuBLASLt matmul: empty shape m={} n={} k={}",
            mm.m,
            mm.n,
            mm.k
        );
        ensure!(
            mm.lda >= mm.k && mm.ldw >= mm.k && mm.ldd >= mm.n,
            "cuBLASLt matmul: leading dimensions lda={} ldw={} ldd={} too small for m={} n={} k={}",
            mm.lda,
            mm.ldw,
            mm.ldd,
            mm.m,
            mm.n,
            mm.k
        );
        ensure!(
            mm.a != 0 && mm.w != 0 && mm.d != 0,
            "cuBLASLt matmul: null pointer (a={:#x} w={:#x} d={:#x})",
            mm.a,
            mm.w,
            mm.d
        );
        self.stream
            .context()
            .bind_to_thread()
            .context("cannot bind the CUDA context for cuBLASLt")?;
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let f32 = sys::cudaDataType_t::CUDA_R_32F;
        let d_type = match mm.output {
            LtOutput::Bf16 => bf16,
            LtOutput::F32 => f32,
        };
        // Column-major views (see the module comment): cuBLAS A = W as K x N, op T; cuBLAS B =
        // A as K x M, op N; D = N x M.
        let layout_w = Layout::new(bf16, mm.k, mm.n, mm.ldw)?;
        let layout_a = Layout::new(bf16, mm.k, mm.m, mm.lda)?;
        let layout_d = Layout::new(d_type, mm.n, mm.m, mm.ldd)?;
        if let Some(b) = mm.batch {
            ensure!(
                b.count >= 1 && b.count <= i32::MAX as usize,
                "cuBLASLt matmul: batch count {}",
                b.count
            );
            for (layout, stride) in [
                (&layout_w, b.stride_w),
                (&layout_a, b.stride_a),
                (&layout_d, b.stride_d),
            ] {
                layout.set(
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &(b.count as i32),
                )?;
                layout.set(
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &stride,
                )?;
            }
        }
        let desc = Desc::new()?;
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &1i32, // CUBLAS_OP_T
        )?;
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &0i32, // CUBLAS_OP_N
        )?;
        let bf16_out_f32_bias = mm.output == LtOutput::Bf16
            && matches!(mm.epilogue, LtEpilogue::Bias(_) | LtEpilogue::GeluBias(_));
        if bf16_out_f32_bias && self.bf16_out_f32_bias_refused.load(Ordering::Relaxed) {
            return Ok(LtRun::Unsupported);
        }
        use sys::cublasLtEpilogue_t::{
            CUBLASLT_EPILOGUE_BIAS, CUBLASLT_EPILOGUE_DEFAULT, CUBLASLT_EPILOGUE_GELU,
            CUBLASLT_EPILOGUE_GELU_BIAS,
        };
        // (epilogue, bias pointer, whether the bias is f32 rather than the output type)
        let (epilogue, bias, bias_f32) = match mm.epilogue {
            LtEpilogue::None => (CUBLASLT_EPILOGUE_DEFAULT, None, false),
            LtEpilogue::Gelu => (CUBLASLT_EPILOGUE_GELU, None, false),
            LtEpilogue::Bias(b) => (CUBLASLT_EPILOGUE_BIAS, Some(b), true),
            LtEpilogue::GeluBias(b) => (CUBLASLT_EPILOGUE_GELU_BIAS, Some(b), true),
            LtEpilogue::BiasOutType(b) => (CUBLASLT_EPILOGUE_BIAS, Some(b), false),
            LtEpilogue::GeluBiasOutType(b) => (CUBLASLT_EPILOGUE_GELU_BIAS, Some(b), false),
        };
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue,
        )?;
        if let Some(bias) = bias {
            ensure!(bias != 0, "cuBLASLt matmul: null bias pointer");
            desc.set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias,
            )?;
            if let Some(b) = mm.batch {
                desc.set(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                    &b.stride_bias,
                )?;
            }
            // The default bias type is the output type.
            if bias_f32 {
                desc.set(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &f32,
                )?;
            }
        }
        let pref = Pref::new()?;
        pref.set(
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &self.workspace_bytes,
        )?;
        // The heuristic assumes 256-byte aligned pointers unless told otherwise; sub-buffers of
        // an arena may be less aligned.
        for (attr, ptr) in [
            (
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                mm.w,
            ),
            (
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                mm.a,
            ),
            (
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                mm.d,
            ),
            (
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                mm.d,
            ),
        ] {
            pref.set(attr, &alignment(ptr))?;
        }
        let key = AlgoKey {
            m: mm.m,
            n: mm.n,
            k: mm.k,
            lda: mm.lda,
            ldw: mm.ldw,
            ldd: mm.ldd,
            output: mm.output,
            epilogue: match mm.epilogue {
                LtEpilogue::None => 0,
                LtEpilogue::Gelu => 1,
                LtEpilogue::Bias(_) => 2,
                LtEpilogue::GeluBias(_) => 3,
                LtEpilogue::BiasOutType(_) => 4,
                LtEpilogue::GeluBiasOutType(_) => 5,
            },
            align: [alignment(mm.w), alignment(mm.a), alignment(mm.d)],
            batch: mm.batch,
        };
        let op = Op {
            desc: &desc,
            layout_w: &layout_w,
            layout_a: &layout_a,
            layout_d: &layout_d,
            mm,
        };
        let known = self.chosen()?.get(&key).copied();
        let chosen = match known {
            Some(c) => c,
            None => {
                let capturing = self
                    .stream
                    .capture_status()
                    .context("cannot query the stream's capture status")?
                    != driver_sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
                let tune = self.autotune() && !capturing;
                let want = if tune { AUTOTUNE_CANDIDATES } else { 1 };
                let candidates = match self.heuristics(&op, &pref, want) {
                    Ok(c) if c.is_empty() => return Ok(LtRun::Unsupported),
                    Ok(c) => c,
                    Err(CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                        return Ok(LtRun::Unsupported)
                    }
                    // An f32 bias with a bf16 output is an attribute combination cuBLASLt may
                    // reject outright rather than find no algorithm for; remember it.
                    Err(CublasError(sys::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE))
                        if bf16_out_f32_bias =>
                    {
                        self.bf16_out_f32_bias_refused
                            .store(true, Ordering::Relaxed);
                        return Ok(LtRun::Unsupported);
                    }
                    Err(e) => return Err(lt_error(e, "cublasLtMatmulAlgoGetHeuristic")),
                };
                let chosen = if tune && candidates.len() > 1 {
                    self.fastest(&op, &candidates)?
                } else {
                    candidates[0]
                };
                // Under capture with autotuning on, leave the shape to be tuned later.
                if !(self.autotune() && capturing) {
                    self.chosen()?.insert(key, chosen);
                }
                chosen
            }
        };
        self.launch(&op, &chosen)
            .map_err(|e| lt_error(e, "cublasLtMatmul"))?;
        Ok(LtRun::Done)
    }

    /// The algorithm cache, locked.
    fn chosen(&self) -> Result<std::sync::MutexGuard<'_, HashMap<AlgoKey, Chosen>>> {
        self.chosen
            .lock()
            .map_err(|_| anyhow::anyhow!("cuBLASLt: the algorithm cache lock is poisoned"))
    }

    /// Up to `want` algorithms the heuristic proposes for `op`, best first, each fitting the
    /// workspace.
    fn heuristics(
        &self,
        op: &Op,
        pref: &Pref,
        want: usize,
    ) -> std::result::Result<Vec<Chosen>, CublasError> {
        let mut results = vec![
            sys::cublasLtMatmulHeuristicResult_t {
                algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
                workspaceSize: 0,
                state: sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
                wavesCount: 0.0,
                reserved: [0; 4],
            };
            want
        ];
        let mut returned = 0i32;
        // SAFETY: every descriptor is alive for the call; `results` holds `want` entries.
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                op.desc.0,
                op.layout_w.0,
                op.layout_a.0,
                op.layout_d.0,
                op.layout_d.0,
                pref.0,
                want as i32,
                results.as_mut_ptr(),
                &mut returned,
            )
        }
        .result()?;
        results.truncate(returned.max(0) as usize);
        Ok(results
            .into_iter()
            .filter(|r| {
                r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && r.workspaceSize <= self.workspace_bytes
            })
            .map(|r| Chosen { algo: r.algo })
            .collect())
    }

    /// The candidate with the shortest mean time over [`AUTOTUNE_RUNS`] runs on `op`'s own
    /// operands (after one untimed run). Candidates that fail to run are skipped.
    fn fastest(&self, op: &Op, candidates: &[Chosen]) -> Result<Chosen> {
        let ctx = self.stream.context();
        let event = || {
            ctx.new_event(Some(driver_sys::CUevent_flags::CU_EVENT_DEFAULT))
                .context("cannot create a CUDA event for cuBLASLt autotuning")
        };
        let (start, end) = (event()?, event()?);
        let mut best: Option<(f32, Chosen)> = None;
        let mut first_error = None;
        for c in candidates {
            if let Err(e) = self.launch(op, c) {
                first_error.get_or_insert(e);
                continue;
            }
            start
                .record(&self.stream)
                .context("cannot record an event")?;
            for _ in 0..AUTOTUNE_RUNS {
                self.launch(op, c)
                    .map_err(|e| lt_error(e, "cublasLtMatmul (autotuning)"))?;
            }
            end.record(&self.stream).context("cannot record an event")?;
            let ms = start
                .elapsed_ms(&end)
                .context("cannot read an autotuning time")?;
            if best.is_none_or(|(b, _)| ms < b) {
                best = Some((ms, *c));
            }
        }
        match (best, first_error) {
            (Some((_, c)), _) => Ok(c),
            (None, Some(e)) => Err(lt_error(e, "cublasLtMatmul (every autotuning candidate)")),
            (None, None) => anyhow::bail!("cuBLASLt autotuning: no candidate algorithm"),
        }
    }

    /// Enqueues `op` with algorithm `c` on the stream.
    fn launch(&self, op: &Op, c: &Chosen) -> std::result::Result<(), CublasError> {
        let alpha = 1.0f32;
        let beta = 0.0f32;
        let mm = op.mm;
        let workspace = super::device::dptr(&self.workspace);
        // SAFETY: pointers were validated by the caller for these shapes; beta = 0 so C (= D)
        // is not read; the algorithm came from the heuristic for exactly these descriptors (an
        // equal `AlgoKey`) and its workspace fits ours.
        unsafe {
            lt::matmul(
                self.handle,
                op.desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                mm.w as *const c_void,
                op.layout_w.0,
                mm.a as *const c_void,
                op.layout_a.0,
                mm.d as *const c_void,
                op.layout_d.0,
                mm.d as *mut c_void,
                op.layout_d.0,
                &c.algo,
                workspace as *mut c_void,
                self.workspace_bytes,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
    }
}

/// One matmul's descriptors, borrowed for the heuristic query and the launches.
struct Op<'a> {
    desc: &'a Desc,
    layout_w: &'a Layout,
    layout_a: &'a Layout,
    layout_d: &'a Layout,
    mm: &'a LtMatmul,
}

impl Drop for CublasLt {
    fn drop(&mut self) {
        // The handle owns no device work of its own; a failure here cannot be acted on.
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Largest power of two (<= 256) dividing a device address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

fn lt_error(e: CublasError, call: &str) -> anyhow::Error {
    anyhow::anyhow!("{call} failed: {:?}", e.0)
}

/// Owned cuBLASLt matrix layout.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(ty: sys::cudaDataType, rows: usize, cols: usize, ld: usize) -> Result<Layout> {
        let h = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
            .map_err(|e| lt_error(e, "cublasLtMatrixLayoutCreate"))?;
        Ok(Layout(h))
    }

    fn set<T>(&self, attr: sys::cublasLtMatrixLayoutAttribute_t, value: &T) -> Result<()> {
        // SAFETY: `value` is a live T of exactly the size passed.
        unsafe {
            lt::set_matrix_layout_attribute(
                self.0,
                attr,
                value as *const T as *const c_void,
                size_of::<T>(),
            )
        }
        .map_err(|e| lt_error(e, &format!("cublasLtMatrixLayoutSetAttribute({attr:?})")))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// Owned matmul descriptor (f32 compute and scale).
struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    fn new() -> Result<Desc> {
        let h = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| lt_error(e, "cublasLtMatmulDescCreate"))?;
        Ok(Desc(h))
    }

    fn set<T>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<()> {
        // SAFETY: `value` is a live T of exactly the size passed.
        unsafe {
            lt::set_matmul_desc_attribute(
                self.0,
                attr,
                value as *const T as *const c_void,
                size_of::<T>(),
            )
        }
        .map_err(|e| lt_error(e, &format!("cublasLtMatmulDescSetAttribute({attr:?})")))
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// Owned heuristic preference.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Pref {
    fn new() -> Result<Pref> {
        let h =
            lt::create_matmul_pref().map_err(|e| lt_error(e, "cublasLtMatmulPreferenceCreate"))?;
        Ok(Pref(h))
    }

    fn set<T>(&self, attr: sys::cublasLtMatmulPreferenceAttributes_t, value: &T) -> Result<()> {
        // SAFETY: `value` is a live T of exactly the size passed.
        unsafe {
            lt::set_matmul_pref_attribute(
                self.0,
                attr,
                value as *const T as *const c_void,
                size_of::<T>(),
            )
        }
        .map_err(|e| {
            lt_error(
                e,
                &format!("cublasLtMatmulPreferenceSetAttribute({attr:?})"),
            )
        })
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_of_addresses() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1004), 4);
        assert_eq!(alignment(0), 256);
    }
}
