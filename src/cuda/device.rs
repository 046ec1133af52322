//! The CUDA device: a context, the one non-default stream all work goes on, and the embedded
//! kernel modules. No global state: every launcher takes a `&Gpu`.
//!
//! Event tracking (cudarc's per-slice read/write events) is disabled: one stream does all the
//! work, so the events would only cost time, and they must not appear inside CUDA-graph
//! captures. That makes [`dptr`] a plain address read.

use super::kernels;
use super::op_timer::OpRecorder;
use super::params::TmaDescriptor;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A CUDA device ready to run this crate's kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// (module name, loaded module, the kernels it defines).
    modules: Vec<(&'static str, Arc<CudaModule>, &'static [&'static str])>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// [`KernelLauncher::max_active_clusters`] by kernel, cluster size, block size and shared
    /// memory, asked of the driver once each: one kernel is asked with several shared-memory
    /// sizes (a gemm_ln tile two CTAs an SM or one), whose answers differ.
    active_clusters: Mutex<HashMap<(String, u32, u32, u32), usize>>,
    cc: (i32, i32),
    sm_count: usize,
    name: String,
    allocations: AtomicUsize,
    /// Launch kernels with programmatic stream serialization ([`Gpu::set_programmatic_launch`]).
    programmatic: AtomicBool,
    /// In-model op times ([`Gpu::start_op_times`]): whether they are being recorded, and the
    /// recorder.
    op_timing: AtomicBool,
    op_recorder: Mutex<OpRecorder>,
}

impl Drop for Gpu {
    /// Waits for the work queued on this handle's stream before its kernel modules may unload:
    /// a workspace may outlive its backend (it then refuses every step), and work it or the
    /// backend launched last may still be running. Errors are ignored (a context a kernel
    /// fault left unusable has nothing left to wait for), and a stream in the middle of a
    /// capture (an error path that abandons it) is not waited for, which would end the capture
    /// with an error of its own.
    fn drop(&mut self) {
        let idle = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        if self.stream.capture_status().is_ok_and(|s| s == idle) {
            let _ = self.stream.synchronize();
        }
    }
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.cc)
            .field("sm_count", &self.sm_count)
            .finish()
    }
}

/// A row-major 2-D bf16 tensor in device memory as a TMA copies it: boxes of `box_rows` rows of
/// `box_cols` elements, laid out in shared memory with the 128-byte swizzle (so a box row must be
/// 128 bytes: `box_cols` = 64), elements outside `rows` x `cols` read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaTensor2d {
    /// Device address of element (0, 0); 16-byte aligned.
    pub base: u64,
    /// Rows of the tensor.
    pub rows: u64,
    /// Columns (bf16 elements a row).
    pub cols: u64,
    /// Elements between consecutive rows (a multiple of 8: 16-byte row starts).
    pub row_stride: u64,
    /// Rows of one TMA box (one copy).
    pub box_rows: u32,
    /// Columns of one box (64: 128 bytes, the swizzle width).
    pub box_cols: u32,
}

impl TmaTensor2d {
    /// What `cuTensorMapEncodeTiled` requires of this tensor, checked with errors that name the
    /// field (the driver only says "invalid value").
    pub fn validate(&self) -> Result<()> {
        ensure!(self.base != 0, "TMA tensor: null base address");
        ensure!(
            self.base.is_multiple_of(16),
            "TMA tensor: base address {:#x} is not 16-byte aligned",
            self.base
        );
        ensure!(
            self.rows > 0 && self.cols > 0,
            "TMA tensor: empty ({} x {})",
            self.rows,
            self.cols
        );
        ensure!(
            self.row_stride.is_multiple_of(8) && self.row_stride >= self.cols,
            "TMA tensor: row stride {} elements must be a multiple of 8 and at least the {} columns",
            self.row_stride,
            self.cols
        );
        ensure!(
            self.row_stride * 2 < (1u64 << 40)
                && self.rows < (1u64 << 32)
                && self.cols < (1u64 << 32),
            "TMA tensor: {} x {} with row stride {} is beyond a tensor map's range",
            self.rows,
            self.cols,
            self.row_stride
        );
        ensure!(
            self.box_cols == 64,
            "TMA tensor: a 128-byte-swizzled box row is 64 bf16, got {}",
            self.box_cols
        );
        ensure!(
            (1..=256).contains(&self.box_rows),
            "TMA tensor: box rows must be 1..=256, got {}",
            self.box_rows
        );
        Ok(())
    }
}

/// An L2 access-policy window: a launch that carries it ([`Gpu::launch_in_l2_window`]) marks its
/// accesses to `[base, base + bytes)` persisting with probability `hit_ratio` (by address), so
/// the context's persisting set-aside of L2 keeps them across launches while other traffic
/// streams through the rest. A cache hint only: results never depend on it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct L2Window {
    /// Device address of the window's first byte.
    pub base: u64,
    /// Bytes of the window.
    pub bytes: usize,
    /// Fraction of the window's accesses marked persisting (0..=1).
    pub hit_ratio: f32,
}

/// How much of `bytes` of data, re-read by later launches, a device can keep in L2: the
/// persisting set-aside to ask for (at most `max_persisting`, the device's limit), the window
/// (at most `max_window` bytes from the start of the data) and its hit ratio (set-aside over
/// window, at most 1). None when the device has no set-aside or under a tenth of the data
/// would persist (the set-aside would only take L2 from everything else). Pure.
pub fn l2_persisting_plan(
    bytes: usize,
    max_persisting: usize,
    max_window: usize,
) -> Option<(usize, usize, f32)> {
    let window = bytes.min(max_window);
    let set_aside = max_persisting.min(window);
    if window == 0 || set_aside * 10 < bytes {
        return None;
    }
    Some((set_aside, window, (set_aside as f64 / window as f64) as f32))
}

/// The context's persisting-L2 set-aside, changed by [`Gpu::persist_in_l2`]: when dropped it
/// resets the persisting lines to normal and restores the set-aside the context had before.
pub struct L2SetAside {
    ctx: Arc<CudaContext>,
    previous: usize,
}

impl Drop for L2SetAside {
    fn drop(&mut self) {
        // Best effort: a failure here leaves only a cache policy behind.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: plain context calls on a context bound to this thread.
            unsafe {
                let _ = sys::cuCtxResetPersistingL2Cache();
                let _ = sys::cuCtxSetLimit(
                    sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE,
                    self.previous,
                );
            }
        }
    }
}

impl std::fmt::Debug for L2SetAside {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2SetAside")
            .field("previous", &self.previous)
            .finish()
    }
}

/// Where a launcher's kernel runs: a [`Gpu`], or in tests the CPU emulator of the small kernels
/// (`tests/kernel_emulation.rs`), so that one launcher (validation, grid, block, shared memory)
/// serves both.
pub trait KernelLauncher {
    /// Streaming multiprocessors (launch heuristics scale with it).
    fn multiprocessors(&self) -> usize;

    /// (major, minor) compute capability: kernels built for one architecture only (the Hopper
    /// wgmma kernels) are refused elsewhere.
    fn compute_capability(&self) -> (i32, i32);

    /// Lets kernel `name` use `bytes` of dynamic shared memory per block (where its static and
    /// dynamic shared memory pass 48 KiB it must be opted into per kernel on a GPU). Not a
    /// stream operation: safe inside a capture.
    fn allow_dynamic_shared_memory(&self, name: &str, bytes: u32) -> Result<()>;

    /// Lets kernel `name` run in clusters of more than 8 CTAs (the portable limit; a Hopper
    /// schedules up to 16 once a kernel opts in). Not a stream operation. The emulator runs any
    /// cluster size: there it does nothing.
    fn allow_non_portable_clusters(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }

    /// Encodes the TMA tensor map of a 2-D bf16 tensor (the driver's `cuTensorMapEncodeTiled`
    /// on a GPU; the emulator's own encoding under the CPU emulator), for kernels that take it
    /// in a `__grid_constant__` parameter struct.
    fn tma_descriptor_2d(&self, t: &TmaTensor2d) -> Result<TmaDescriptor>;

    /// Clusters of kernel `name` (compiled with `__cluster_dims__(cluster, 1, 1)`, `block`
    /// threads and `smem` bytes of dynamic shared memory a CTA, already allowed) resident on the
    /// device at once: a persistent grid launches no more. A GPU places a cluster within one
    /// GPC, so this can be less than `multiprocessors() / cluster` (the driver's
    /// `cuOccupancyMaxActiveClusters`); the default is that quotient (at least 1).
    fn max_active_clusters(
        &self,
        name: &str,
        cluster: u32,
        block: u32,
        smem: u32,
    ) -> Result<usize> {
        let _ = (name, block, smem);
        Ok((self.multiprocessors() / cluster.max(1) as usize).max(1))
    }

    /// Runs kernel `name` with one parameter struct by value (asynchronously on a GPU).
    ///
    /// # Safety
    /// `params` must describe memory the kernel may read and write for this grid (the
    /// launchers validate sizes, pointers and alignment before calling this).
    unsafe fn launch_kernel<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &P,
    ) -> Result<()>;
}

impl KernelLauncher for Gpu {
    fn multiprocessors(&self) -> usize {
        self.sm_count
    }

    fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    fn allow_dynamic_shared_memory(&self, name: &str, bytes: u32) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let f = self.function(name)?;
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        // The default limit is 48 KiB less the kernel's static shared memory (static + dynamic
        // may not pass 48 KiB without the opt-in), so a size under 48 KiB can need it too:
        // always compare with the kernel's own limit. Query first so that repeated launches
        // (and graph captures) only read it.
        let current = f
            .get_attribute(attr)
            .with_context(|| format!("cannot query {name}'s shared-memory limit"))?;
        if current < bytes as i32 {
            f.set_attribute(attr, bytes as i32).with_context(|| {
                format!(
                    "{name} needs {bytes} bytes of shared memory per block, more than device {} \
                     allows",
                    self.ordinal()
                )
            })?;
        }
        Ok(())
    }

    fn allow_non_portable_clusters(&self, name: &str) -> Result<()> {
        let f = self.function(name)?;
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED;
        // Query first so that repeated launches (and graph captures) only read it.
        let current = f
            .get_attribute(attr)
            .with_context(|| format!("cannot query {name}'s non-portable cluster attribute"))?;
        if current != 1 {
            f.set_attribute(attr, 1).with_context(|| {
                format!(
                    "device {} refuses clusters of more than 8 CTAs for {name}",
                    self.ordinal()
                )
            })?;
        }
        Ok(())
    }

    fn tma_descriptor_2d(&self, t: &TmaTensor2d) -> Result<TmaDescriptor> {
        use sys::{
            CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
            CUtensorMapL2promotion, CUtensorMapSwizzle,
        };
        t.validate()?;
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        let dims = [t.cols, t.rows];
        let strides = [t.row_stride * 2];
        let boxes = [t.box_cols, t.box_rows];
        let element_strides = [1u32, 1];
        // SAFETY: the arrays have the rank's lengths (rank - 1 for the strides) and outlive the
        // call; the driver only encodes (no memory is touched).
        let rc = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                2,
                t.base as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        ensure!(
            rc == sys::CUresult::CUDA_SUCCESS,
            "cuTensorMapEncodeTiled refused {t:?}: {rc:?}"
        );
        Ok(TmaDescriptor { opaque: map.opaque })
    }

    fn max_active_clusters(
        &self,
        name: &str,
        cluster: u32,
        block: u32,
        smem: u32,
    ) -> Result<usize> {
        let mut cache = self
            .active_clusters
            .lock()
            .map_err(|_| anyhow::anyhow!("cluster cache poisoned by a panic on another thread"))?;
        let key = (name.to_string(), cluster, block, smem);
        if let Some(&n) = cache.get(&key) {
            return Ok(n);
        }
        let f = self.function(name)?;
        self.bind_context()?;
        // No cluster attribute: the kernel's compiled __cluster_dims__ is the cluster shape (a
        // config's must be absent or equal), and one cluster is the grid. No stream: this is a
        // query, not a stream operation (Gemm::new asks it before any graph capture).
        let config = sys::CUlaunchConfig {
            gridDimX: cluster,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: std::ptr::null_mut(),
            attrs: std::ptr::null_mut(),
            numAttrs: 0,
        };
        let mut clusters: std::ffi::c_int = 0;
        // SAFETY: `clusters` and `config` outlive the call, which only reads the config (no
        // attributes) and writes the count.
        let rc =
            unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &config) };
        ensure!(
            rc == sys::CUresult::CUDA_SUCCESS,
            "cuOccupancyMaxActiveClusters for {name} (clusters of {cluster}, {block} threads, \
             {smem} bytes of shared memory): {rc:?}"
        );
        ensure!(
            clusters > 0,
            "{name}: no cluster of {cluster} CTAs of {block} threads and {smem} bytes of shared \
             memory fits device {} ({})",
            self.ordinal(),
            self.name
        );
        cache.insert(key, clusters as usize);
        Ok(clusters as usize)
    }

    unsafe fn launch_kernel<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &P,
    ) -> Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.launch(name, grid, block, shared_mem_bytes, params) }
    }
}

/// Number of CUDA devices, 0 when there is no driver library (never panics).
pub fn device_count() -> Result<usize> {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made when it is absent.
    if !unsafe { sys::is_culib_present() } {
        return Ok(0);
    }
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        // A driver without a usable device (e.g. in a container without GPUs).
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        Err(e) => Err(e).context("CUDA driver: cannot count devices (cuInit failed)"),
    }
}

impl Gpu {
    /// Opens device `ordinal`: checks the driver, the device, compute capability >= 8.0 and that
    /// this binary carries kernels, loads every module and creates a non-default stream.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        ensure_kernels()?;
        // SAFETY: see device_count.
        ensure!(
            unsafe { sys::is_culib_present() },
            "no CUDA driver: libcuda.so could not be loaded (is an NVIDIA driver installed?)"
        );
        let count = device_count()?;
        ensure!(count > 0, "no CUDA device: the driver reports 0 devices");
        ensure!(
            ordinal < count,
            "no CUDA device {ordinal}: the driver reports {count} device(s)"
        );
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("cannot create a CUDA context on device {ordinal}"))?;
        check_capability(&ctx)?;
        // SAFETY: every slice this crate creates lives on `stream` (one stream), so no
        // cross-stream synchronization is needed; see the module comment.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().context("cannot create a CUDA stream")?;
        Gpu::build(ctx, stream)
    }

    /// Uses a caller's context and stream (an engine embedding this crate). All work of this
    /// `Gpu` goes on `stream`; the caller orders it with its own streams. Dropping it (and
    /// [`Gpu::mem_info`]) waits for `stream`, which a graph capture in the driver's global
    /// mode on another thread would count as an unsafe call: do neither during such a capture.
    ///
    /// # Safety
    /// This disables cudarc's event tracking on the caller's context for slices created from
    /// now on (the same as [`Gpu::new`] does on its own context): the caller's own safe cudarc
    /// code that uses such a slice on more than one stream no longer gets cudarc's
    /// synchronization between those streams, and must order them itself (events, stream
    /// waits), or it races.
    pub unsafe fn with_stream(stream: Arc<CudaStream>) -> Result<Gpu> {
        ensure_kernels()?;
        let ctx = stream.context().clone();
        check_capability(&ctx)?;
        // SAFETY: the caller takes on the cross-stream ordering (the contract above).
        unsafe { ctx.disable_event_tracking() };
        Gpu::build(ctx, stream)
    }

    fn build(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Gpu> {
        let cc = ctx.compute_capability()?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .context("cannot query the multiprocessor count")? as usize;
        let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
        let mut modules = Vec::with_capacity(kernels::MODULES.len());
        for (module, bytes, names) in kernels::MODULES {
            let loaded = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
                .with_context(|| {
                    format!(
                        "cannot load kernel module {module:?} on {name} (sm_{}{}); it carries {:?}",
                        cc.0,
                        cc.1,
                        kernels::ARCHS
                    )
                })?;
            modules.push((*module, loaded, *names));
        }
        Ok(Gpu {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            active_clusters: Mutex::new(HashMap::new()),
            cc,
            sm_count,
            name,
            allocations: AtomicUsize::new(0),
            programmatic: AtomicBool::new(false),
            op_timing: AtomicBool::new(false),
            op_recorder: Mutex::new(OpRecorder::default()),
        })
    }

    /// A second handle on this device with a new stream of its own, sharing the context and
    /// the loaded kernel modules: for work that may overlap this handle's (the next step's
    /// modulation table beside the current step's forward). Ordering between the two streams
    /// is the caller's (events); cudarc's event tracking is off (see the module comment).
    pub fn fork(&self) -> Result<Gpu> {
        let stream = self
            .ctx
            .new_stream()
            .context("cannot create a second CUDA stream")?;
        Ok(Gpu {
            ctx: self.ctx.clone(),
            stream,
            modules: self.modules.clone(),
            functions: Mutex::new(HashMap::new()),
            active_clusters: Mutex::new(HashMap::new()),
            cc: self.cc,
            sm_count: self.sm_count,
            name: self.name.clone(),
            allocations: AtomicUsize::new(0),
            programmatic: AtomicBool::new(false),
            op_timing: AtomicBool::new(false),
            op_recorder: Mutex::new(OpRecorder::default()),
        })
    }

    /// Whether [`Gpu::start_op_times`] is on (see [`super::op_timer`]).
    pub(crate) fn op_timing(&self) -> bool {
        self.op_timing.load(Ordering::Relaxed)
    }

    pub(crate) fn set_op_timing(&self, on: bool) {
        self.op_timing.store(on, Ordering::Relaxed);
    }

    /// The op-time recorder (a panic while it was held leaves it usable: it holds no invariant
    /// that a half-done update breaks beyond the error it reports).
    pub(crate) fn op_recorder(&self) -> std::sync::MutexGuard<'_, OpRecorder> {
        self.op_recorder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stream all of this device's work goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cudarc context (for allocations and streams of a caller's own).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A kernel by its `extern "C"` name, from whichever embedded module defines it.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| anyhow::anyhow!("kernel cache poisoned by a panic on another thread"))?;
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        // Only the module that defines the kernel is asked (see kernels::MODULES).
        let Some((module_name, module, _)) = self.modules.iter().find(|m| m.2.contains(&name))
        else {
            let names: Vec<&str> = self.modules.iter().map(|m| m.0).collect();
            bail!("kernel {name:?} is in none of the embedded modules {names:?}")
        };
        let f = module
            .load_function(name)
            .with_context(|| format!("cannot load kernel {name:?} from module {module_name:?}"))?;
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// (major, minor) compute capability: (9, 0) for an H100 or H200.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// The device's name ("NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's CUDA ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Free and total device memory in bytes. Synchronizes this stream first (so not inside a
    /// capture): buffers are freed stream-ordered (`cuMemFreeAsync`) into the memory pool,
    /// which gives them back only at a synchronization, and until then the driver counts them
    /// as used (a workspace dropped just before would otherwise make the next one's check
    /// fail). Only this stream: a context-wide synchronize would break another thread's
    /// capture on another stream of the device.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.synchronize()?;
        self.ctx
            .mem_get_info()
            .context("cannot query free device memory")
    }

    /// Fails with `out of device memory for <what>` when fewer than `bytes` are free.
    pub fn ensure_free(&self, bytes: usize, what: &str) -> Result<()> {
        let (free, total) = self.mem_info()?;
        ensure!(
            bytes <= free,
            "out of device memory for {what}: needs {:.1} MiB, {:.1} MiB free of {:.1} MiB on {}",
            mib(bytes),
            mib(free),
            mib(total),
            self.name
        );
        Ok(())
    }

    /// Allocates `len` zeroed elements on the stream, counting the allocation (see
    /// [`Gpu::allocations`]) and turning CUDA_ERROR_OUT_OF_MEMORY into a clear error.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        match self.stream.alloc_zeros::<T>(len) {
            Ok(s) => {
                self.allocations.fetch_add(1, Ordering::Relaxed);
                Ok(s)
            }
            Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                let free = self.mem_info().map(|m| m.0).unwrap_or(0);
                bail!(
                    "out of device memory for {what}: {:.1} MiB requested, {:.1} MiB free on {}",
                    mib(bytes),
                    mib(free),
                    self.name
                )
            }
            Err(e) => {
                Err(e).with_context(|| format!("cannot allocate {:.1} MiB for {what}", mib(bytes)))
            }
        }
    }

    /// Uploads a host slice into a new device buffer (counted like [`Gpu::alloc_zeros`]).
    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        host: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        let mut dev = self.alloc_zeros::<T>(host.len(), what)?;
        self.stream
            .memcpy_htod(host, &mut dev)
            .with_context(|| format!("cannot copy {what} to the device"))?;
        Ok(dev)
    }

    /// Copies a device buffer to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        let mut host = vec![T::default(); dev.len()];
        self.stream
            .memcpy_dtoh(dev, &mut host)
            .context("cannot copy a device buffer to the host")?;
        self.synchronize()?;
        Ok(host)
    }

    /// How many buffers [`Gpu::alloc_zeros`]/[`Gpu::upload`] have allocated so far: the
    /// zero-allocation proof compares it before and after sampling.
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Launches kernel `name` on the stream with one parameter struct by value.
    ///
    /// # Safety
    /// `params` must describe memory the kernel may read and write for this grid (the
    /// launchers validate sizes, pointers and alignment before calling this).
    pub unsafe fn launch<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &P,
    ) -> Result<()> {
        if self.programmatic_launch() {
            // SAFETY: forwarded to the caller (see above).
            return unsafe { self.launch_ex(name, grid, block, shared_mem_bytes, params, None) };
        }
        let f = self.function(name)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes,
        };
        // SAFETY: forwarded to the caller (see above).
        unsafe { self.stream.launch_builder(&f).arg(params).launch(cfg) }
            .map(|_| ())
            .with_context(|| format!("launching kernel {name} (grid {grid:?}, block {block:?})"))
    }

    /// Launch this handle's kernels with programmatic stream serialization (`FORA_PDL=1`): each
    /// may begin launching while the kernel before it on the stream finishes, and waits for it
    /// in its first statement (`grid_dependency_sync` in kernels/common.cuh), so only launch
    /// latency and prologue overlap. A graph captured from the stream keeps the programmatic
    /// edges. Only on compute capability 9.0 and later; returns whether it is on.
    pub fn set_programmatic_launch(&self, on: bool) -> bool {
        let on = on && self.cc.0 >= 9;
        self.programmatic.store(on, Ordering::Relaxed);
        on
    }

    /// Whether [`Gpu::set_programmatic_launch`] is on.
    pub fn programmatic_launch(&self) -> bool {
        self.programmatic.load(Ordering::Relaxed)
    }

    /// Sets aside persisting L2 for `bytes` of device memory at `base` that later launches
    /// re-read (the FORA cache between steps): the context's set-aside grows to what
    /// [`l2_persisting_plan`] allows on this device, and launches given the returned window keep
    /// that much of it in L2. None (nothing changed) where the device has no set-aside or it
    /// would cover under a tenth of the data, or where the driver refuses to change the set-aside
    /// (MPS, MIG). The guard restores the set-aside when dropped.
    pub fn persist_in_l2(&self, base: u64, bytes: usize) -> Result<Option<(L2Window, L2SetAside)>> {
        let attr = |a, what: &str| -> Result<usize> {
            let v = self
                .ctx
                .attribute(a)
                .with_context(|| format!("cannot query the device's {what}"))?;
            Ok(v.max(0) as usize)
        };
        let max_persisting = attr(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE,
            "persisting L2 limit",
        )?;
        let max_window = attr(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE,
            "access-policy window limit",
        )?;
        let Some((set_aside, window, hit_ratio)) =
            l2_persisting_plan(bytes, max_persisting, max_window)
        else {
            return Ok(None);
        };
        // Binds the context too.
        let previous = self.persisting_l2_limit()?;
        // SAFETY: a context call on the bound context.
        let rc = unsafe {
            sys::cuCtxSetLimit(
                sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE,
                set_aside.max(previous),
            )
        };
        if rc != sys::CUresult::CUDA_SUCCESS {
            // Refused where the set-aside is not the context's to change (MPS sets it at server
            // start; MIG has none): a cache hint, so run without it.
            return Ok(None);
        }
        let guard = L2SetAside {
            ctx: self.ctx.clone(),
            previous,
        };
        Ok(Some((
            L2Window {
                base,
                bytes: window,
                hit_ratio,
            },
            guard,
        )))
    }

    /// Makes this device's context current on the calling thread, as a raw driver call needs
    /// (another backend's, on another GPU, may be current there).
    pub fn bind_context(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .context("cannot make the CUDA context current")
    }

    /// The context's persisting-L2 set-aside in bytes (`cuCtxGetLimit`).
    pub fn persisting_l2_limit(&self) -> Result<usize> {
        self.bind_context()?;
        let mut bytes = 0usize;
        // SAFETY: a context call on the bound context with a valid out pointer.
        let rc = unsafe {
            sys::cuCtxGetLimit(&mut bytes, sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE)
        };
        ensure!(
            rc == sys::CUresult::CUDA_SUCCESS,
            "cannot read the persisting L2 set-aside: {rc:?}"
        );
        Ok(bytes)
    }

    /// [`Gpu::launch`] with an access-policy window attribute on the launch: its accesses inside
    /// the window persist in L2 with the window's hit ratio, the rest stream. A graph captured
    /// from the stream keeps the attribute on the kernel node.
    ///
    /// # Safety
    /// As [`Gpu::launch`].
    pub unsafe fn launch_in_l2_window<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &P,
        window: &L2Window,
    ) -> Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.launch_ex(name, grid, block, shared_mem_bytes, params, Some(window)) }
    }

    /// A launch through `cuLaunchKernelEx` with this handle's launch attributes: programmatic
    /// stream serialization when [`Gpu::programmatic_launch`] is on, and `window` if given.
    ///
    /// # Safety
    /// As [`Gpu::launch`].
    unsafe fn launch_ex<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &P,
        window: Option<&L2Window>,
    ) -> Result<()> {
        let f = self.function(name)?;
        self.bind_context()?;
        let empty = || sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_IGNORE,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue { pad: [0; 64] },
        };
        let mut attrs = [empty(), empty()];
        let mut n = 0;
        if self.programmatic_launch() {
            attrs[n].id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n].value.programmaticStreamSerializationAllowed = 1;
            n += 1;
        }
        if let Some(w) = window {
            attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW;
            attrs[n].value.accessPolicyWindow = sys::CUaccessPolicyWindow {
                base_ptr: w.base as *mut std::ffi::c_void,
                num_bytes: w.bytes,
                hitRatio: w.hit_ratio,
                hitProp: sys::CUaccessProperty::CU_ACCESS_PROPERTY_PERSISTING,
                missProp: sys::CUaccessProperty::CU_ACCESS_PROPERTY_STREAMING,
            };
            n += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n as u32,
        };
        // The kernel takes one parameter: the struct, by value.
        let mut args = [params as *const P as *mut std::ffi::c_void];
        // SAFETY: the config, attributes and argument array outlive the call; the kernel's one
        // parameter is `P` (the launchers' contract, as for `launch`); the rest is the caller's.
        let rc = unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        ensure!(
            rc == sys::CUresult::CUDA_SUCCESS,
            "launching kernel {name} (grid {grid:?}, block {block:?}) with launch attributes: {rc:?}"
        );
        Ok(())
    }

    /// Waits for all work on the stream; reports an asynchronous kernel fault as an error.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .context("CUDA stream failed (a kernel faulted or the device was lost)")
    }
}

fn ensure_kernels() -> Result<()> {
    ensure!(
        kernels::available(),
        "this binary was built without CUDA kernels ({}); rebuild with nvcc available \
         (NVCC=/path/to/nvcc, CUDA_HOME, or the nvidia-cuda-nvcc wheels)",
        if kernels::MISSING_REASON.is_empty() {
            "nvcc not found at build time"
        } else {
            kernels::MISSING_REASON
        }
    );
    Ok(())
}

fn check_capability(ctx: &Arc<CudaContext>) -> Result<()> {
    let (major, minor) = ctx
        .compute_capability()
        .context("cannot query the compute capability")?;
    ensure!(
        major >= 8,
        "CUDA device {} ({}) has compute capability {major}.{minor}; fora needs 8.0 or newer (Ampere, Hopper)",
        ctx.ordinal(),
        ctx.name().unwrap_or_default()
    );
    Ok(())
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Every named dimension of a kernel's params is positive (one error naming the first that is
/// not).
pub fn check_dims(kernel: &str, dims: &[(&str, i32)]) -> Result<()> {
    for &(field, v) in dims {
        check_positive(kernel, field, v.into())?;
    }
    Ok(())
}

/// The latent grid of a launch: `images`, `rows`, `channels`, `height`, `width` and `patch`
/// positive, the sides whole numbers of patches. Returns (tokens per row, C*p*p).
pub fn check_latent_grid(kernel: &str, g: [i32; 6]) -> Result<(i64, i64)> {
    let [images, rows, channels, height, width, patch] = g;
    check_dims(
        kernel,
        &[
            ("images", images),
            ("rows", rows),
            ("channels", channels),
            ("height", height),
            ("width", width),
            ("patch", patch),
        ],
    )?;
    check_patch_grid(kernel, height, width, patch)?;
    let tokens = (height / patch) as i64 * (width / patch) as i64;
    Ok((tokens, channels as i64 * patch as i64 * patch as i64))
}

/// The latent's sides are whole numbers of patches.
pub fn check_patch_grid(kernel: &str, height: i32, width: i32, patch: i32) -> Result<()> {
    ensure!(patch > 0, "{kernel}: patch size {patch} is not positive");
    ensure!(
        height % patch == 0 && width % patch == 0,
        "{kernel}: latent {height}x{width} is not divisible by the patch size {patch}"
    );
    Ok(())
}

/// `v` rounded to bf16 (to nearest even), for uploads of weights and operands.
pub fn to_bf16(v: &[f32]) -> Vec<half::bf16> {
    v.iter().map(|&x| half::bf16::from_f32(x)).collect()
}

/// The raw device address of a slice, for a kernel parameter struct.
pub fn dptr<T>(s: &CudaSlice<T>) -> u64 {
    let (p, _no_event) = s.device_ptr(s.stream());
    p
}

/// The raw device address of element `offset` of a slice (a sub-buffer for a kernel).
pub fn dptr_at<T>(s: &CudaSlice<T>, offset: usize) -> u64 {
    dptr(s) + (offset * std::mem::size_of::<T>()) as u64
}

/// Launcher validation: `ptr` is a non-null device address aligned to `align` bytes.
/// Err unless `gpu` is a Hopper (compute capability 9.x), the only architecture the sm_90a
/// kernels (wgmma, TMA) are built for: "`what` needs a Hopper GPU ..., this device is M.m`hint`".
pub fn ensure_hopper(gpu: &impl KernelLauncher, what: &str, hint: &str) -> Result<()> {
    let (major, minor) = gpu.compute_capability();
    ensure!(
        major == 9,
        "{what} needs a Hopper GPU (compute capability 9.x), this device is {major}.{minor}{hint}"
    );
    Ok(())
}

/// An error naming `kernel` and `field` unless `ptr` is non-null and `align`-byte aligned (the
/// launchers' check of every pointer they pass).
pub fn check_ptr(kernel: &str, field: &str, ptr: u64, align: u64) -> Result<()> {
    ensure!(ptr != 0, "{kernel}: {field} pointer is null");
    ensure!(
        ptr.is_multiple_of(align),
        "{kernel}: {field} pointer {ptr:#x} is not {align}-byte aligned"
    );
    Ok(())
}

/// Launcher validation: a dimension is positive.
pub fn check_positive(kernel: &str, field: &str, v: i64) -> Result<()> {
    ensure!(v > 0, "{kernel}: {field} must be > 0, got {v}");
    Ok(())
}

/// Blocks of `per_block` items covering `items`, as a grid x dimension (at most 2^31 - 1).
pub fn grid_x(kernel: &str, items: i64, per_block: i64) -> Result<u32> {
    ensure!(
        per_block > 0,
        "{kernel}: {per_block} items a block is not positive"
    );
    let items = items.max(0);
    let blocks = items / per_block + i64::from(items % per_block != 0);
    ensure!(
        blocks <= i32::MAX as i64,
        "{kernel}: {items} items need {blocks} blocks, more than a grid holds (split the launch)"
    );
    Ok(blocks.max(1) as u32)
}

/// A Hopper of 132 SMs without a device, for the launchers' unit tests: it refuses shared
/// memory past `smem_limit` and clusters of more than 8 unless `non_portable`, answers
/// `clusters` to every residency question, and launches nothing.
#[cfg(test)]
pub(crate) struct FakeLauncher {
    pub smem_limit: u32,
    pub non_portable: bool,
    pub clusters: usize,
}

#[cfg(test)]
impl KernelLauncher for FakeLauncher {
    fn multiprocessors(&self) -> usize {
        132
    }

    fn compute_capability(&self) -> (i32, i32) {
        (9, 0)
    }

    fn allow_dynamic_shared_memory(&self, name: &str, bytes: u32) -> Result<()> {
        ensure!(
            bytes <= self.smem_limit,
            "{name}: {bytes} bytes of shared memory refused"
        );
        Ok(())
    }

    fn allow_non_portable_clusters(&self, name: &str) -> Result<()> {
        ensure!(self.non_portable, "{name}: clusters of more than 8 refused");
        Ok(())
    }

    fn tma_descriptor_2d(&self, t: &TmaTensor2d) -> Result<TmaDescriptor> {
        bail!("no device to encode {t:?}")
    }

    fn max_active_clusters(&self, _: &str, _: u32, _: u32, _: u32) -> Result<usize> {
        Ok(self.clusters)
    }

    unsafe fn launch_kernel<P: DeviceRepr>(
        &self,
        name: &str,
        _: (u32, u32, u32),
        _: (u32, u32, u32),
        _: u32,
        _: &P,
    ) -> Result<()> {
        bail!("no device to launch {name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_sizes_of_zero_are_errors() {
        assert!(check_patch_grid("k", 4, 4, 0).is_err());
        assert!(check_patch_grid("k", 4, 4, 2).is_ok());
        assert!(grid_x("k", 10, 0).is_err());
        assert_eq!(grid_x("k", 10, 4).unwrap(), 3);
        assert_eq!(grid_x("k", 0, 4).unwrap(), 1);
        assert_eq!(grid_x("k", i64::MAX, 1 << 40).unwrap(), 1 << 23);
    }

    #[test]
    fn l2_persisting_plan_covers_what_fits() {
        const MB: usize = 1 << 20;
        // One image + CFG of DiT-XL/2: a 66 MB cache, a 45 MB set-aside, 128 MB windows.
        let (set_aside, window, hit) = l2_persisting_plan(66 * MB, 45 * MB, 128 * MB).unwrap();
        assert_eq!((set_aside, window), (45 * MB, 66 * MB));
        assert!((hit - 45.0 / 66.0).abs() < 1e-6);
        // Data smaller than the set-aside: all of it, hit ratio 1.
        assert_eq!(
            l2_persisting_plan(10 * MB, 45 * MB, 128 * MB),
            Some((10 * MB, 10 * MB, 1.0))
        );
        // A window shorter than the data covers its start only.
        let (_, window, hit) = l2_persisting_plan(400 * MB, 45 * MB, 128 * MB).unwrap();
        assert_eq!(window, 128 * MB);
        assert!((hit - 45.0 / 128.0).abs() < 1e-6);
        // Under a tenth of the data would persist (256 rows of DiT-XL/2: an 8.5 GB cache), or
        // no set-aside: nothing.
        assert_eq!(l2_persisting_plan(8704 * MB, 45 * MB, 128 * MB), None);
        assert_eq!(l2_persisting_plan(500 * MB, 4 * MB, 128 * MB), None);
        assert_eq!(l2_persisting_plan(66 * MB, 0, 128 * MB), None);
        assert_eq!(l2_persisting_plan(0, 45 * MB, 128 * MB), None);
    }
}
