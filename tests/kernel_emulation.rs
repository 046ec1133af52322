//! The kernels run on the CPU: every kernels/*.cu compiled as host C++ against a CUDA emulator
//! (tests/emulation: every CUDA thread a fiber, blocks one after another; __syncthreads, warp
//! shuffles, ldmatrix and mma.sync carried out by the warp's lanes together with the PTX
//! fragment layouts; wgmma from its shared-memory descriptors; cp.async as a plain copy),
//! launched through the crate's own launchers (their validation, grid, block and shared memory),
//! and checked by the very test bodies the GPU tests run (tests/small_kernel_cases,
//! tests/attention_cases) against the CPU twins, or for the GEMMs against an f64 product.
//!
//! This proves the kernels' indexing, bounds, reductions and rounding on every machine, GPU or
//! not; that no vector access is misaligned and no fixed-size array is indexed past its end
//! (UBSan's alignment and bounds checks); and, a CPU stand-in for
//! memcheck, that no kernel reads or writes past its buffers (each buffer ends at a guard page,
//! with a canary in the bytes before it; see `HostBuf`); and, run with the warps of a block out
//! of step (`emulated_warps_ahead`), a stand-in for racecheck's shared-memory hazards between
//! warps; and, under ThreadSanitizer (`emulated_kernels_have_no_data_races`), that no two
//! threads of a block touch a byte, one writing, with nothing ordering them. It cannot show
//! timing or
//! memory-model behaviour, which only a GPU run shows. Without a C++20 compiler (`CXX`, else g++, c++, clang++) each test prints `SKIP`,
//! unless `FORA_REQUIRE_EMULATION=1` (CI sets it), which makes that a failure.

mod attention_cases;
mod small_kernel_cases;
mod vae_cases;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::DeviceRepr;
use fora::cuda::device::{KernelLauncher, TmaTensor2d};
use fora::cuda::gemm_ln::GemmLnTile;
use fora::cuda::params::TmaDescriptor;
use fora::cuda::testing::{biased_product, from_bf16, to_bf16, DeviceAddr, TestDevice};
use half::bf16;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `fora_emulate_launch(name, grid x, y, z, block x, shared bytes, params)` in
/// tests/emulation/launch.cpp.
type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *const c_void,
) -> c_int;

/// `fora_emulate_encode_tma_2d(out, base, cols, rows, row stride bytes, box cols, box rows)`
/// in tests/emulation/launch.cpp.
type EncodeTmaFn =
    unsafe extern "C" fn(*mut c_void, *const c_void, u64, u64, u64, c_uint, c_uint) -> c_int;

/// `fora_emulate_set_lazy_threads(stride)` in tests/emulation/launch.cpp.
type SetLazyFn = unsafe extern "C" fn(c_uint);

/// `fora_emulate_set_warps_ahead(order)` in tests/emulation/launch.cpp.
type SetWarpsAheadFn = unsafe extern "C" fn(c_int);
/// `fora_emulate_last_error()`: what the calling thread's last launch found wrong.
type LastErrorFn = unsafe extern "C" fn() -> *const std::ffi::c_char;

/// Multiprocessors the emulator reports (an H100's), for launch heuristics.
const EMULATED_SMS: usize = 132;
/// Dynamic shared memory a block may have (an H100's opt-in limit).
const EMULATED_SMEM_LIMIT: u32 = 227 * 1024;
/// The emulator library a race-check child process loads (its parent built it), instead of
/// building its own.
const EMULATION_LIB: &str = "FORA_EMULATION_LIB";

/// The emulator library, loaded once per test process, and the SMs it reports.
struct Emulator {
    lib: std::sync::Arc<libloading::Library>,
    launch: LaunchFn,
    encode_tma: EncodeTmaFn,
    set_lazy: SetLazyFn,
    set_warps_ahead: SetWarpsAheadFn,
    last_error: LastErrorFn,
    sms: usize,
}

impl Emulator {
    /// The same emulator reporting `sms` multiprocessors, so that a persistent kernel's CTAs
    /// each take several work units (the TMA GEMM's ring then runs on across units).
    fn with_sms(&self, sms: usize) -> Emulator {
        Emulator {
            lib: self.lib.clone(),
            launch: self.launch,
            encode_tma: self.encode_tma,
            set_lazy: self.set_lazy,
            set_warps_ahead: self.set_warps_ahead,
            last_error: self.last_error,
            sms,
        }
    }

    /// Runs `f` with lazy threads on this OS thread: thread t of every block with t % stride ==
    /// stride - 1 runs only when no other thread can move (launch.cpp's is_lazy), so a thread
    /// whose waits nothing keeps in step falls behind as it may on a GPU.
    fn with_lazy_threads<T>(&self, stride: u32, f: impl FnOnce() -> T) -> T {
        with_schedule(self.set_lazy, stride, 0, f)
    }

    /// Runs `f` with the warps of each block run one at a time on this OS thread, each as far
    /// as it can go before the next starts (launch.cpp's warps_ahead): the lowest warp first
    /// for `order` 1, the highest for -1 (which also runs a launch's blocks from the last).
    /// Round robin keeps warps in step at every shuffle, which hides a warp overwriting shared
    /// memory another has yet to read. `order` 2 runs whole blocks so, the cluster's lowest rank
    /// first (blocks ahead).
    fn with_warps_ahead<T>(&self, order: i32, f: impl FnOnce() -> T) -> T {
        with_schedule(self.set_warps_ahead, order, 0, f)
    }
}

/// Runs `f` with one of the emulator's scheduling settings (`set`, a setter of a thread_local
/// of the emulator library, so only this OS thread's launches see it) at `on`, then back at
/// `off`.
fn with_schedule<V, T>(set: unsafe extern "C" fn(V), on: V, off: V, f: impl FnOnce() -> T) -> T {
    // SAFETY: the setter only stores its argument in a thread_local of the emulator library.
    unsafe { set(on) };
    let out = f();
    // SAFETY: as above.
    unsafe { set(off) };
    out
}

/// A host buffer standing in for device memory: 256-byte aligned like cudaMalloc, written by
/// the emulated kernels through the raw address in a parameter struct (no Rust reference to
/// it is alive while they run).
///
/// A CPU stand-in for compute-sanitizer's memcheck: the buffer ends where an inaccessible
/// guard page begins (another one precedes it), so a kernel reading or writing past either
/// end faults the test process; the few bytes between the end and the guard page (the start
/// is aligned down to 256) hold a canary that every download and the drop check, so a write
/// there is reported with the buffer's size.
struct HostBuf<T> {
    ptr: *mut T,
    len: usize,
    map: *mut u8,
    map_len: usize,
}

const CANARY: u8 = 0xA5;

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl<T> HostBuf<T> {
    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The bytes between the buffer's end and the guard page.
    fn slack(&self) -> &[u8] {
        let end = self.ptr as usize + self.bytes();
        let guard = self.map as usize + self.map_len - page_size();
        // SAFETY: [end, guard) lies inside the readable part of the mapping.
        unsafe { std::slice::from_raw_parts(end as *const u8, guard - end) }
    }

    /// Err when a kernel wrote past the end into the slack before the guard page.
    fn check_canary(&self) -> Result<()> {
        match self.slack().iter().position(|&b| b != CANARY) {
            None => Ok(()),
            Some(i) => bail!(
                "an emulated kernel wrote past the end of a {}-byte buffer (byte {} after it)",
                self.bytes(),
                i
            ),
        }
    }
}

impl<T: Copy> HostBuf<T> {
    fn from_slice(v: &[T]) -> HostBuf<T> {
        let page = page_size();
        let bytes = std::mem::size_of_val(v);
        let data_pages = (bytes + 255).div_ceil(page).max(1);
        let map_len = (data_pages + 2) * page;
        // SAFETY: an anonymous private mapping; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            map != libc::MAP_FAILED,
            "out of host memory for a test buffer"
        );
        let map = map as *mut u8;
        // SAFETY: the first and the last page of the mapping just made.
        unsafe {
            assert_eq!(libc::mprotect(map as *mut _, page, libc::PROT_NONE), 0);
            assert_eq!(
                libc::mprotect(map.add(map_len - page) as *mut _, page, libc::PROT_NONE),
                0
            );
        }
        let guard = map as usize + map_len - page;
        let start = (guard - bytes) & !255;
        // SAFETY: [start, guard) is readable and writable, and does not overlap `v`.
        unsafe {
            std::ptr::write_bytes(start as *mut u8, CANARY, guard - start);
            std::ptr::copy_nonoverlapping(v.as_ptr(), start as *mut T, v.len());
        }
        HostBuf {
            ptr: start as *mut T,
            len: v.len(),
            map,
            map_len,
        }
    }

    fn to_vec(&self) -> Result<Vec<T>> {
        self.check_canary()?;
        // SAFETY: `ptr` holds `len` initialized elements; no launch is running (launches
        // return when the kernel is done).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec())
    }

    fn fill(&mut self, v: T) {
        // SAFETY: as `to_vec`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }.fill(v);
    }
}

impl<T> Drop for HostBuf<T> {
    fn drop(&mut self) {
        let overrun = self.check_canary();
        // SAFETY: mapped in `from_slice` with this length.
        unsafe { libc::munmap(self.map as *mut _, self.map_len) };
        if let Err(e) = overrun {
            if !std::thread::panicking() {
                panic!("{e:#}");
            }
        }
    }
}

impl<T> DeviceAddr for HostBuf<T> {
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl KernelLauncher for Emulator {
    fn multiprocessors(&self) -> usize {
        self.sms
    }

    /// A Hopper: the emulator carries out the sm_90a kernels' wgmma too.
    fn compute_capability(&self) -> (i32, i32) {
        (9, 0)
    }

    fn allow_dynamic_shared_memory(&self, name: &str, bytes: u32) -> Result<()> {
        ensure!(
            bytes <= EMULATED_SMEM_LIMIT,
            "{name}: {bytes} bytes of shared memory per block exceed a GPU's {EMULATED_SMEM_LIMIT}"
        );
        Ok(())
    }

    /// The emulator's own tensor map (launch.cpp's `EmulatedTensorMap`), after the checks the
    /// driver would make.
    fn tma_descriptor_2d(&self, t: &TmaTensor2d) -> Result<TmaDescriptor> {
        t.validate()?;
        let mut map = TmaDescriptor::default();
        // SAFETY: `map` has the 128 bytes the encoder writes; the base is only recorded.
        let rc = unsafe {
            (self.encode_tma)(
                map.opaque.as_mut_ptr() as *mut c_void,
                t.base as *const c_void,
                t.cols,
                t.rows,
                t.row_stride * 2,
                t.box_cols,
                t.box_rows,
            )
        };
        ensure!(rc == 0, "the emulator refused the tensor map {t:?}");
        Ok(map)
    }

    unsafe fn launch_kernel<P: DeviceRepr>(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &P,
    ) -> Result<()> {
        ensure!(
            block.1 == 1 && block.2 == 1,
            "the emulator runs 1-D blocks; {name} asked for block {block:?}"
        );
        let cname = CString::new(name)?;
        // SAFETY: forwarded to the caller; the emulator returns when the launch is done.
        let rc = unsafe {
            (self.launch)(
                cname.as_ptr(),
                grid.0,
                grid.1,
                grid.2,
                block.0,
                shared_mem_bytes,
                params as *const P as *const c_void,
            )
        };
        match rc {
            0 => Ok(()),
            1 => bail!("the emulator has no kernel {name:?}"),
            3 => {
                // SAFETY: a NUL-terminated string the emulator keeps until this thread's next
                // launch.
                let why = unsafe { std::ffi::CStr::from_ptr((self.last_error)()) };
                bail!("{}", why.to_string_lossy())
            }
            _ => {
                bail!("the emulator refused the launch of {name} (grid {grid:?}, block {block:?})")
            }
        }
    }
}

impl TestDevice for Emulator {
    type F32 = HostBuf<f32>;
    type Bf16 = HostBuf<bf16>;
    type I32 = HostBuf<i32>;

    fn upload_f32(&self, v: &[f32]) -> Result<HostBuf<f32>> {
        Ok(HostBuf::from_slice(v))
    }

    fn upload_i32(&self, v: &[i32]) -> Result<HostBuf<i32>> {
        Ok(HostBuf::from_slice(v))
    }

    fn upload_bf16(&self, v: &[f32]) -> Result<HostBuf<bf16>> {
        Ok(HostBuf::from_slice(&to_bf16(v)))
    }

    fn poisoned_f32(&self, n: usize) -> Result<HostBuf<f32>> {
        Ok(HostBuf::from_slice(&vec![f32::NAN; n]))
    }

    fn poisoned_bf16(&self, n: usize) -> Result<HostBuf<bf16>> {
        Ok(HostBuf::from_slice(&vec![bf16::NAN; n]))
    }

    fn poison_f32(&self, b: &mut HostBuf<f32>) -> Result<()> {
        b.fill(f32::NAN);
        Ok(())
    }

    fn poison_bf16(&self, b: &mut HostBuf<bf16>) -> Result<()> {
        b.fill(bf16::NAN);
        Ok(())
    }

    fn download_f32(&self, b: &HostBuf<f32>) -> Result<Vec<f32>> {
        b.to_vec()
    }

    fn download_bf16(&self, b: &HostBuf<bf16>) -> Result<Vec<f32>> {
        Ok(from_bf16(&b.to_vec()?))
    }
}

/// The kernel sources the emulator builds: all of them.
const EMULATED_SOURCES: [&str; 14] = [
    "bandwidth.cu",
    "conditioning.cu",
    "embed.cu",
    "norm.cu",
    "fora.cu",
    "sampler.cu",
    "attention.cu",
    "attention_sm90.cu",
    "gemm.cu",
    "gemm_sm90.cu",
    "gemm_ln_sm90.cu",
    "probe_sm90.cu",
    "qkv_attention_sm90.cu",
    "vae.cu",
];

/// The first C++ compiler of `CXX`, g++, c++, clang++ that runs.
fn compiler() -> Option<String> {
    let candidates = std::env::var("CXX")
        .into_iter()
        .chain(["g++", "c++", "clang++"].map(String::from));
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Where [`build`] puts the [`Build::Checked`] library.
fn checked_library() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("libfora_kernel_emulation.so")
}

/// Which emulator library [`build`] makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    /// The kernels with UBSan's alignment and bounds checks: what every emulated test loads.
    Checked,
    /// The kernels with ThreadSanitizer and the runner with its race annotations
    /// (`FORA_EMULATION_TSAN`), for [`emulated_kernels_have_no_data_races`]'s child processes.
    Races,
}

/// Compiles the emulator and the kernels into a shared library in the test's target folder.
fn build(cxx: &str, kind: Build) -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let emulation = root.join("tests").join("emulation");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let common = [
        "-std=c++20",
        "-O1",
        "-g",
        "-fPIC",
        "-pthread",
        // Only the IEEE operations the kernels spell out: no silent FMA contraction.
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-comment",
        "-DFORA_EMULATION",
    ];
    let compile = |args: &[&std::ffi::OsStr], what: &str| -> Result<()> {
        let output = Command::new(cxx)
            .args(common)
            .arg("-I")
            .arg(&emulation)
            .arg("-I")
            .arg(&kernels)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {cxx}"))?;
        ensure!(
            output.status.success(),
            "{cxx} failed to build {what}:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    let sources: Vec<PathBuf> = EMULATED_SOURCES
        .map(|f| kernels.join(f))
        .into_iter()
        .chain([emulation.join("race_probes.cpp")])
        .collect();
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let launch = emulation.join("launch.cpp");
    match kind {
        Build::Checked => {
            let out = checked_library();
            let mut args = vec![
                os("-shared"),
                // A misaligned vector access faults on a GPU; here UBSan turns it into an abort,
                // as it does an index past a fixed-size array (shared or register arrays, which
                // a GPU would spill or silently misread).
                os("-fsanitize=alignment,bounds"),
                os("-fno-sanitize-recover=alignment,bounds"),
                launch.as_os_str(),
                os("-x"),
                os("c++"),
            ];
            args.extend(sources.iter().map(|p| p.as_os_str()));
            args.extend([os("-o"), out.as_os_str()]);
            compile(&args, "the kernel emulator")?;
            Ok(out)
        }
        Build::Races => {
            // The runner is not instrumented: its own bookkeeping is no kernel's access.
            let runner = tmp.join("fora_emulation_launch_tsan.o");
            compile(
                &[
                    os("-DFORA_EMULATION_TSAN"),
                    os("-c"),
                    launch.as_os_str(),
                    os("-o"),
                    runner.as_os_str(),
                ],
                "the race-checking emulator runner",
            )?;
            let out = tmp.join("libfora_kernel_emulation_tsan.so");
            let mut args = vec![
                os("-shared"),
                os("-fsanitize=thread"),
                os("-DFORA_EMULATION_TSAN"),
                runner.as_os_str(),
                os("-x"),
                os("c++"),
            ];
            args.extend(sources.iter().map(|p| p.as_os_str()));
            args.extend([os("-o"), out.as_os_str()]);
            compile(&args, "the race-checking kernel emulator")?;
            Ok(out)
        }
    }
}

fn load() -> Result<Option<Emulator>> {
    let Some(cxx) = compiler() else {
        return Ok(None);
    };
    // A race-check child process loads the library its parent built.
    let path = match std::env::var_os(EMULATION_LIB) {
        Some(lib) => PathBuf::from(lib),
        None => build(&cxx, Build::Checked)?,
    };
    // SAFETY: our own library, built just now; its initializers only set up thread_locals.
    let lib = unsafe { libloading::Library::new(&path) }
        .with_context(|| format!("cannot load {}", path.display()))?;
    // SAFETY: the symbol has this signature in tests/emulation/launch.cpp.
    let launch: LaunchFn = unsafe { *lib.get::<LaunchFn>(b"fora_emulate_launch\0")? };
    // SAFETY: as above.
    let encode_tma: EncodeTmaFn =
        unsafe { *lib.get::<EncodeTmaFn>(b"fora_emulate_encode_tma_2d\0")? };
    // SAFETY: as above.
    let set_lazy: SetLazyFn = unsafe { *lib.get::<SetLazyFn>(b"fora_emulate_set_lazy_threads\0")? };
    // SAFETY: as above.
    let set_warps_ahead: SetWarpsAheadFn =
        unsafe { *lib.get::<SetWarpsAheadFn>(b"fora_emulate_set_warps_ahead\0")? };
    // SAFETY: as above.
    let last_error: LastErrorFn = unsafe { *lib.get::<LastErrorFn>(b"fora_emulate_last_error\0")? };
    Ok(Some(Emulator {
        lib: std::sync::Arc::new(lib),
        sms: EMULATED_SMS,
        launch,
        encode_tma,
        set_lazy,
        set_warps_ahead,
        last_error,
    }))
}

/// The emulator, or None after printing `SKIP <test>` (no C++ compiler). Panics when it does
/// not build, or when `FORA_REQUIRE_EMULATION=1` and there is no compiler.
fn emulator(test: &str) -> Option<&'static Emulator> {
    static EMULATOR: OnceLock<Result<Option<Emulator>, String>> = OnceLock::new();
    let loaded = EMULATOR.get_or_init(|| load().map_err(|e| format!("{e:#}")));
    match loaded {
        Ok(Some(e)) => Some(e),
        Ok(None) => {
            if std::env::var("FORA_REQUIRE_EMULATION").is_ok_and(|v| v == "1") {
                panic!("{test}: FORA_REQUIRE_EMULATION=1 but no C++ compiler was found");
            }
            println!(
                "SKIP {test}: no C++ compiler (CXX, g++, c++, clang++) for the kernel emulator"
            );
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// A kernel file left out of the emulator's build would go untested without a word.
#[test]
fn emulator_builds_every_kernel_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = EMULATED_SOURCES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(
        listed, on_disk,
        "EMULATED_SOURCES must list every kernels/*.cu"
    );
}

#[test]
fn emulated_bandwidth_probes() -> Result<()> {
    let Some(emu) = emulator("emulated_bandwidth_probes") else {
        return Ok(());
    };
    small_kernel_cases::check_bandwidth(emu)
}

#[test]
fn emulated_timestep_embedding() -> Result<()> {
    let Some(emu) = emulator("emulated_timestep_embedding") else {
        return Ok(());
    };
    small_kernel_cases::check_timestep_embedding(emu)
}

#[test]
fn emulated_silu() -> Result<()> {
    let Some(emu) = emulator("emulated_silu") else {
        return Ok(());
    };
    small_kernel_cases::check_silu(emu)
}

#[test]
fn emulated_gelu_epilogue() -> Result<()> {
    let Some(emu) = emulator("emulated_gelu_epilogue") else {
        return Ok(());
    };
    small_kernel_cases::check_gelu_epilogue(emu)
}

#[test]
fn emulated_label_silu() -> Result<()> {
    let Some(emu) = emulator("emulated_label_silu") else {
        return Ok(());
    };
    small_kernel_cases::check_label_silu(emu)
}

#[test]
fn emulated_sampler_step() -> Result<()> {
    let Some(emu) = emulator("emulated_sampler_step") else {
        return Ok(());
    };
    small_kernel_cases::check_sampler_step(emu)
}

#[test]
fn emulated_final_sampler_step() -> Result<()> {
    let Some(emu) = emulator("emulated_final_sampler_step") else {
        return Ok(());
    };
    small_kernel_cases::check_final_sampler_step(emu)
}

#[test]
fn emulated_unpatchify() -> Result<()> {
    let Some(emu) = emulator("emulated_unpatchify") else {
        return Ok(());
    };
    small_kernel_cases::check_unpatchify(emu)
}

#[test]
fn emulated_normal_fill() -> Result<()> {
    let Some(emu) = emulator("emulated_normal_fill") else {
        return Ok(());
    };
    small_kernel_cases::check_normal_fill(emu)
}

#[test]
fn emulated_patch_embed() -> Result<()> {
    let Some(emu) = emulator("emulated_patch_embed") else {
        return Ok(());
    };
    small_kernel_cases::check_patch_embed(emu)
}

/// The VAE decoder's device on the emulator: its kernels emulated, cuBLASLt's GEMMs an f64
/// product of the bf16 operands (rounded to f32), read and written at the buffers' host
/// addresses, so that a GEMM past a buffer meets its guard page.
struct EmulatedVae(&'static Emulator);

impl fora::cuda::vae::VaeDevice for EmulatedVae {
    type Launcher = Emulator;
    type F32 = HostBuf<f32>;
    type Bf16 = HostBuf<bf16>;

    fn launcher(&self) -> &Emulator {
        self.0
    }

    fn upload_f32(&self, v: &[f32], _what: &str) -> Result<HostBuf<f32>> {
        Ok(HostBuf::from_slice(v))
    }

    fn upload_bf16(&self, v: &[bf16], _what: &str) -> Result<HostBuf<bf16>> {
        Ok(HostBuf::from_slice(v))
    }

    fn zeros_f32(&self, n: usize, _what: &str) -> Result<HostBuf<f32>> {
        Ok(HostBuf::from_slice(&vec![0f32; n]))
    }

    fn zeros_bf16(&self, n: usize, _what: &str) -> Result<HostBuf<bf16>> {
        Ok(HostBuf::from_slice(&vec![bf16::ZERO; n]))
    }

    fn download_f32(&self, b: &HostBuf<f32>, n: usize) -> Result<Vec<f32>> {
        let all = b.to_vec()?;
        ensure!(n <= all.len(), "download of {n} from {} values", all.len());
        Ok(all[..n].to_vec())
    }

    fn matmul(&self, mm: &fora::cuda::cublaslt::LtMatmul, what: &str) -> Result<()> {
        use fora::cuda::cublaslt::{LtEpilogue, LtOutput};
        ensure!(
            mm.output == LtOutput::F32 && mm.batch.is_none(),
            "{what}: the emulated GEMM takes f32 outputs without a batch"
        );
        let bias = match mm.epilogue {
            LtEpilogue::None => None,
            LtEpilogue::Bias(b) => Some(b as *const f32),
            e => bail!("{what}: the emulated GEMM has no epilogue {e:?}"),
        };
        ensure!(
            mm.lda >= mm.k && mm.ldw >= mm.k && mm.ldd >= mm.n,
            "{what}: leading dimensions"
        );
        let (a, w, d) = (mm.a as *const bf16, mm.w as *const bf16, mm.d as *mut f32);
        for i in 0..mm.m {
            for j in 0..mm.n {
                let mut acc = 0f64;
                for k in 0..mm.k {
                    // SAFETY: the decoder's operands, host memory of the emulator's buffers;
                    // an address past one meets its guard page.
                    let (x, y) = unsafe { (*a.add(i * mm.lda + k), *w.add(j * mm.ldw + k)) };
                    acc += x.to_f64() * y.to_f64();
                }
                // SAFETY: as above.
                unsafe {
                    if let Some(b) = bias {
                        acc += *b.add(j) as f64;
                    }
                    *d.add(i * mm.ldd + j) = acc as f32;
                }
            }
        }
        Ok(())
    }
}

/// The whole VAE decoder (tests/vae_cases: src/cuda/vae.rs's buffers, offsets, padding and
/// launches) on the emulator against the f32 CPU decoder: the diffusers fixture, and a
/// random decoder with widths past the GroupNorm statistics kernel's 256 threads.
#[test]
fn emulated_vae_decoder() -> Result<()> {
    let Some(emu) = emulator("emulated_vae_decoder") else {
        return Ok(());
    };
    vae_cases::check_fixture(EmulatedVae(emu))?;
    vae_cases::check_random(EmulatedVae(emu), &[512, 256, 32], (3, 5))
}

#[test]
fn emulated_vae_kernels() -> Result<()> {
    let Some(emu) = emulator("emulated_vae_kernels") else {
        return Ok(());
    };
    small_kernel_cases::check_vae_kernels(emu)
}

#[test]
fn emulated_layernorm_modulate() -> Result<()> {
    let Some(emu) = emulator("emulated_layernorm_modulate") else {
        return Ok(());
    };
    small_kernel_cases::check_layernorm_modulate(emu)
}

#[test]
fn emulated_residual_layernorm() -> Result<()> {
    let Some(emu) = emulator("emulated_residual_layernorm") else {
        return Ok(());
    };
    small_kernel_cases::check_residual_layernorm(emu)
}

/// The fused proj / fc2 + residual + LayerNorm in clusters of 16 CTAs (gemm_ln_sm90.cu).
#[test]
fn emulated_gemm_layernorm() -> Result<()> {
    let Some(emu) = emulator("emulated_gemm_layernorm") else {
        return Ok(());
    };
    small_kernel_cases::check_gemm_layernorm(emu)
}

#[test]
fn emulated_fora_reuse() -> Result<()> {
    let Some(emu) = emulator("emulated_fora_reuse") else {
        return Ok(());
    };
    small_kernel_cases::check_fora_reuse(emu)
}

#[test]
fn emulated_fora_reuse_final() -> Result<()> {
    let Some(emu) = emulator("emulated_fora_reuse_final") else {
        return Ok(());
    };
    small_kernel_cases::check_fora_reuse_final(emu)
}

#[test]
fn emulated_fora_sum_final() -> Result<()> {
    let Some(emu) = emulator("emulated_fora_sum_final") else {
        return Ok(());
    };
    small_kernel_cases::check_fora_sum_final(emu)
}

#[test]
fn emulated_fora_cache_sum() -> Result<()> {
    let Some(emu) = emulator("emulated_fora_cache_sum") else {
        return Ok(());
    };
    small_kernel_cases::check_fora_cache_sum(emu)
}

/// The stand-in device memory reports a write past a buffer's end (into the bytes before its
/// guard page) at the next download, with the buffer's size; a buffer written only inside
/// downloads as written. (A write or read reaching the guard page itself faults the process.)
#[test]
fn host_buffers_catch_writes_past_the_end() {
    // 3 floats: 12 bytes, the start aligned down to 256, so 244 bytes of canary follow.
    let good = HostBuf::from_slice(&[1.0f32, 2.0, 3.0]);
    assert_eq!(good.to_vec().unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(good.addr() % 256, 0, "cudaMalloc-like alignment");
    let bad = HostBuf::from_slice(&[1.0f32, 2.0, 3.0]);
    // SAFETY: one float past the end lies in the readable canary bytes before the guard page.
    unsafe { bad.ptr.add(3).write(4.0) };
    let err = format!("{:#}", bad.to_vec().unwrap_err());
    assert!(err.contains("past the end of a 12-byte buffer"), "{err}");
    // Dropping it would panic on the same overrun; restore the canary first.
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(bad.ptr.add(3) as *mut u8, CANARY, 4) };
    assert!(bad.to_vec().is_ok());
}

/// The emulator's proxy check (tests/emulation/launch.cpp): shared memory written by cp.async
/// (the generic proxy) and then read by a wgmma (the async proxy) needs a fence.proxy.async by
/// the writing thread in between; a GPU may otherwise feed the wgmma stale bytes, which no
/// GPU test is sure to show. The probe with the fence runs (and sums its ones right); the one
/// without is refused with the byte and the thread. The same for a TMA copy issued over plain
/// stores (the box lands with the fence, the launch is refused without).
#[test]
fn emulator_checks_proxy_fences() -> Result<()> {
    let Some(emu) = emulator("emulator_checks_proxy_fences") else {
        return Ok(());
    };
    let run = |name: &str| run_wgmma_probe(emu, name);
    ensure!(
        run("proxy_probe_fenced")? == vec![16.0f32; 128],
        "proxy_probe_fenced: a wgmma of 16 ones did not give 16"
    );
    let Err(err) = run("proxy_probe_unfenced") else {
        bail!("proxy_probe_unfenced ran: not refused for its missing fence");
    };
    let err = format!("{err:#}");
    ensure!(
        err.contains("fence.proxy.async") && err.contains("cp.async") && err.contains("wgmma"),
        "proxy_probe_unfenced: not refused for its missing fence: {err}"
    );

    // A TMA copy over plain stores: lands (the box, as swizzled in shared memory) with the
    // fence, is refused without it.
    let (rows, cols) = (64usize, 64usize);
    let src: Vec<f32> = (0..rows * cols).map(|i| (i % 251) as f32).collect();
    let src_d = emu.upload_bf16(&src)?;
    let tensor = fora::cuda::device::TmaTensor2d {
        base: src_d.addr(),
        rows: rows as u64,
        cols: cols as u64,
        row_stride: cols as u64,
        box_rows: rows as u32,
        box_cols: cols as u32,
    };
    let run_tma = |name: &str| -> Result<Vec<f32>> {
        let out = emu.poisoned_bf16(rows * cols)?;
        let p = fora::cuda::params::TmaProbeParams {
            map: emu.tma_descriptor_2d(&tensor)?,
            out: out.addr(),
            x0: 0,
            y0: 0,
            x1: 0,
            y1: 0,
            box_rows: rows as i32,
        };
        // SAFETY: the probe reads the tensor the map describes and writes rows x 64 bf16 at out.
        unsafe { emu.launch_kernel(name, (1, 1, 1), (128, 1, 1), (rows * 128 + 8) as u32, &p)? };
        emu.download_bf16(&out)
    };
    let landed = run_tma("proxy_probe_tma_fenced")?;
    let mut sorted_in = src.clone();
    let mut sorted_out = landed.clone();
    sorted_in.sort_by(f32::total_cmp);
    sorted_out.sort_by(f32::total_cmp);
    ensure!(
        sorted_out == sorted_in,
        "proxy_probe_tma_fenced: the box did not land whole (the swizzle moves, never loses, values)"
    );
    let Err(err) = run_tma("proxy_probe_tma_unfenced") else {
        bail!("proxy_probe_tma_unfenced ran: not refused for its missing fence");
    };
    let err = format!("{err:#}");
    ensure!(
        err.contains("TMA copy overwrites") && err.contains("fence.proxy.async"),
        "proxy_probe_tma_unfenced: not refused for its missing fence: {err}"
    );
    Ok(())
}

/// The emulator itself: a kernel it does not have and a launch it cannot run are errors, not
/// silent successes (so the tests above cannot pass by running nothing).
#[test]
fn emulator_refuses_what_it_cannot_run() {
    let Some(emu) = emulator("emulator_refuses_what_it_cannot_run") else {
        return;
    };
    let p = 0u64;
    // SAFETY: refused before anything runs.
    let e = unsafe { emu.launch_kernel("no_such_kernel", (1, 1, 1), (32, 1, 1), 0, &p) };
    assert!(format!("{:#}", e.unwrap_err()).contains("no kernel"));
    // SAFETY: refused before anything runs.
    let e = unsafe { emu.launch_kernel("fora_reuse", (1, 1, 1), (32, 2, 1), 0, &p) };
    assert!(format!("{:#}", e.unwrap_err()).contains("1-D"));
    // SAFETY: refused before anything runs.
    let e = unsafe { emu.launch_kernel("fora_reuse", (0, 1, 1), (32, 1, 1), 0, &p) };
    assert!(format!("{:#}", e.unwrap_err()).contains("refused"));
    // A cluster kernel (__cluster_dims__(2, 1, 1)) on a grid that is not whole clusters, as
    // cuLaunchKernel refuses it.
    // SAFETY: refused before anything runs.
    let e = unsafe { emu.launch_kernel("gemm_tma_mc_128x128", (3, 1, 1), (384, 1, 1), 0, &p) };
    assert!(format!("{:#}", e.unwrap_err()).contains("refused"));
}

/// The emulator's schedules on its two race probes (tests/emulation/launch.cpp): a warp that
/// overwrites a shared slot another warp has yet to read (a missing block barrier), and a
/// block that reads what the previous block of the launch writes. Round robin hides both (so
/// the other tests could not catch them); warps ahead shows the first in both orders, and
/// the second with the blocks run from the last.
#[test]
fn emulator_schedules_show_races() -> Result<()> {
    let Some(emu) = emulator("emulator_schedules_show_races") else {
        return Ok(());
    };
    let (blocks, threads) = (3u32, 128u32);
    let run = |name: &str, order: i32, n: usize| -> Result<Vec<f32>> {
        let out = emu.poisoned_f32(n)?;
        let addr = out.addr();
        emu.with_warps_ahead(order, || {
            // SAFETY: the probes write n floats of `out` (one per thread, or one per block).
            unsafe { emu.launch_kernel(name, (blocks, 1, 1), (threads, 1, 1), 0, &addr) }
        })?;
        emu.download_f32(&out)
    };
    let n = (blocks * threads) as usize;
    let warps = threads / 32;
    let race_free: Vec<f32> = (0..n as u32)
        .map(|t| 1.0 + ((t % threads / 32 + 1) % warps) as f32)
        .collect();
    let chain: Vec<f32> = (1..=blocks).map(|b| b as f32).collect();
    ensure!(
        run("race_probe_warps", 0, n)? == race_free,
        "round robin: race_probe_warps read other than 1 + the next warp"
    );
    ensure!(
        run("race_probe_blocks", 0, blocks as usize)? == chain,
        "round robin: race_probe_blocks did not run its blocks in order"
    );
    for order in [1, -1] {
        ensure!(
            run("race_probe_warps", order, n)? != race_free,
            "warps ahead {order} hid a missing block barrier"
        );
    }
    ensure!(
        run("race_probe_blocks", 1, blocks as usize)? == chain,
        "warps ahead 1: race_probe_blocks did not run its blocks in order"
    );
    ensure!(
        run("race_probe_blocks", -1, blocks as usize)? != chain,
        "warps ahead -1 ran the blocks in order"
    );
    Ok(())
}

/// The qkv Linear and attention in one launch, in clusters of four CTAs (qkv_attention_sm90.cu).
#[test]
fn emulated_qkv_attention() -> Result<()> {
    let Some(emu) = emulator("emulated_qkv_attention") else {
        return Ok(());
    };
    attention_cases::check_qkv_attention(emu)
}

/// Flash attention, v1 (run on an H200: it validates the emulated ldmatrix / mma layouts) and v2
/// (not yet run on a GPU), on small shapes with every edge: d 64 / 72 / 128, a partial last key
/// tile, partial query blocks, one token, a peaked softmax.
/// The TMA attention with its warpgroups taking turns (tma_pp) gives tma's bits: the turns
/// change when the wgmmas are issued, not what they compute. On 1 and 3 CTAs (units wrap).
#[test]
fn emulated_tma_pp_gives_tma_bits() -> Result<()> {
    use attention_cases::{check_same_bits, Shape};
    use fora::cuda::attention::AttentionImpl;
    let Some(emu) = emulator("emulated_tma_pp_gives_tma_bits") else {
        return Ok(());
    };
    for (i, (batch, heads, tokens, head_dim)) in [(1, 2, 130, 72), (2, 1, 65, 64), (1, 1, 77, 128)]
        .into_iter()
        .enumerate()
    {
        for sms in [1, 3] {
            let s = Shape {
                batch,
                heads,
                tokens,
                head_dim,
            };
            let name =
                format!("tma_pp vs tma B={batch} H={heads} T={tokens} d={head_dim} on {sms}");
            let imps = (AttentionImpl::TmaPingPong, AttentionImpl::Tma);
            check_same_bits(emu, &name, s, 500 + i as u64, imps, sms)?;
        }
    }
    Ok(())
}

#[test]
fn emulated_attention() -> Result<()> {
    use attention_cases::{run_case_sized, Shape};
    use fora::cuda::attention::AttentionImpl;
    let Some(emu) = emulator("emulated_attention") else {
        return Ok(());
    };
    let shape = |batch, heads, tokens, head_dim| Shape {
        batch,
        heads,
        tokens,
        head_dim,
    };
    // The wgmma family twice: 64-row blocks (these small grids on 132 SMs) and 128-row blocks
    // (as on a device of one SM).
    let runs = AttentionImpl::ALL
        .iter()
        .map(|&imp| (imp, EMULATED_SMS, imp.name().to_string()))
        .chain([
            (AttentionImpl::Wgmma, 1, "wgmma 128-row".to_string()),
            (AttentionImpl::WgmmaMn, 1, "wgmma_mn 128-row".to_string()),
            // The persistent TMA kernel with one and with three CTAs: every CTA walks several
            // units, so the Q slot and the K/V ring wrap and change phase.
            (AttentionImpl::Tma, 1, "tma on 1 CTA".to_string()),
            (AttentionImpl::Tma, 3, "tma on 3 CTAs".to_string()),
            (AttentionImpl::TmaPingPong, 1, "tma_pp on 1 CTA".to_string()),
            (
                AttentionImpl::TmaPingPong,
                3,
                "tma_pp on 3 CTAs".to_string(),
            ),
        ]);
    for (imp, sms, label) in runs {
        for (i, (s, qk_std)) in [
            (shape(1, 2, 65, 72), 1.0),
            (shape(2, 1, 130, 64), 1.0),
            (shape(1, 1, 77, 128), 1.0),
            (shape(1, 1, 1, 72), 1.0),
            (shape(1, 1, 129, 72), 1.0),
            (shape(1, 1, 200, 72), 3.0),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!(
                "emulated attention {label} B={} H={} T={} d={}",
                s.batch, s.heads, s.tokens, s.head_dim
            );
            run_case_sized(emu, &name, s, qk_std, 100 + i as u64, imp, sms)?;
        }
    }
    Ok(())
}

/// The GEMM kernel families the emulated GEMM test runs.
#[derive(Debug)]
enum GemmKernel {
    Custom(fora::cuda::gemm::Tile),
    Wgmma(fora::cuda::gemm::WgmmaTile),
    Tma(fora::cuda::gemm::TmaTile),
}

/// The custom mma.sync GEMM, the Hopper wgmma GEMM and the warp-specialized TMA GEMM (every tile
/// variant, with and without
/// split-K and its epilogue kernel, every epilogue) on a shape with partial tiles in M, N and K,
/// padded output columns and a guard row, against an f64 CPU product of the same bf16 inputs.
#[test]
fn emulated_gemm() -> Result<()> {
    use fora::cuda::gemm::Epilogue;
    use fora::cuda::params::GemmParams;
    use fora::cuda::testing::{check_close, gelu_tanh_f64, round_bf16, TestRng};
    let Some(emu) = emulator("emulated_gemm") else {
        return Ok(());
    };
    // M = 2 model rows of 35 tokens; N and K not multiples of the tiles. K = 520 (9 k-tiles of
    // 64) also cycles the wgmma kernels' 4-stage ring twice, which the emulator's asynchronous
    // cp.async and wgmma check (a slot refilled while a wgmma may still read it shows as NaN).
    // Then, for the TMA kernels only (their persistent unit order is the newest indexing),
    // M = 4 rows of 75 tokens: three M tiles, the last partial, so units walk M and N; N = 392
    // (256 + 136) gives every tile width whole tiles beside partial ones, so both the checked
    // and the unchecked epilogue (`epilogue_fragments`' FULL) run.
    let shapes = [
        (70usize, 136usize, 35usize, 200usize, false),
        (70, 136, 35, 520, false),
        (300, 392, 75, 200, true),
    ];
    for (m, n, tokens, k, tma_only) in shapes {
        let ldo = n + 8;
        let mut rng = TestRng::new(7);
        let a = round_bf16(&rng.normal_vec(m * k, 1.0));
        let w = round_bf16(&rng.normal_vec(n * k, 1.0 / (k as f32).sqrt()));
        let bias = rng.normal_vec(n, 0.5);
        let gate = rng.uniform_vec((m / tokens) * n, -1.0, 1.0);
        let residual = rng.normal_vec((m + 1) * ldo, 1.0);
        let product = biased_product(&a, &w, &bias, (m, n, k));
        let (a_d, w_d) = (emu.upload_bf16(&a)?, emu.upload_bf16(&w)?);
        let (bias_d, gate_d) = (emu.upload_f32(&bias)?, emu.upload_f32(&gate)?);
        let workspace = emu.poisoned_f32(3 * m * n)?;
        // Every custom tile, every Hopper wgmma tile, every TMA tile (the TMA kernels have never
        // run on a GPU: this is their only check so far). The TMA kernels run on 1 emulated SM:
        // its persistent CTA then takes every work unit (1-9), with the producer's ring running
        // on from one unit into the next, and the ping-pong kernel's consumers taking turns.
        // The multicast tiles run on 4: two clusters of two, taking every other pair of tiles
        // (M = 70: one tile, its pair computing zero rows; M = 300: two pairs, the second with
        // such a tile). The clusters of four along M (by one or two along N) run on 8: their
        // rows of CTAs past M compute zero rows, their columns past N zero columns (N = 136 or
        // 392: one or two cluster columns, the last partial or wholly past N), and each CTA
        // multicasts its slice of A along its row and of W down its column.
        let tiles: Vec<GemmKernel> = every_gemm_kernel()
            .into_iter()
            .filter(|g| !tma_only || matches!(g, GemmKernel::Tma(_)))
            .collect();
        for kernel in &tiles {
            for splits in [1u32, 3] {
                for epi in Epilogue::ALL {
                    let what = format!("emulated GEMM {kernel:?} M={m} K={k} x{splits} {epi:?}");
                    let residual_epi = epi == Epilogue::BiasGateResidual;
                    // bf16 out, f32 out, or the f32 residual (random, not poisoned).
                    let out_f32 = if residual_epi {
                        emu.upload_f32(&residual)?
                    } else {
                        emu.poisoned_f32((m + 1) * ldo)?
                    };
                    let out_bf16 = emu.poisoned_bf16((m + 1) * ldo)?;
                    let cache = emu.poisoned_bf16(m * n)?;
                    let bf16_out = matches!(epi, Epilogue::BiasBf16 | Epilogue::BiasGeluBf16);
                    let p = GemmParams {
                        a: a_d.addr(),
                        w: w_d.addr(),
                        bias: bias_d.addr(),
                        out: if bf16_out {
                            out_bf16.addr()
                        } else {
                            out_f32.addr()
                        },
                        cache: if residual_epi { cache.addr() } else { 0 },
                        gate: if residual_epi { gate_d.addr() } else { 0 },
                        m: m as i32,
                        n: n as i32,
                        k: k as i32,
                        lda: k as i32,
                        ldw: k as i32,
                        ldo: ldo as i32,
                        ldc: n as i32,
                        ldg: n as i32,
                        rows_per_gate: tokens as i32,
                        epilogue: epi.raw(),
                    };
                    let splitk = Some((workspace.addr(), 3 * m * n));
                    launch_gemm(emu, kernel, &p, splits, splitk)?;
                    let got = if bf16_out {
                        emu.download_bf16(&out_bf16)?
                    } else {
                        emu.download_f32(&out_f32)?
                    };
                    // The gated residual's check is of what the kernel added (got - residual
                    // against gate * v): the residual in the norm would hide errors in it.
                    let want_at = |r: usize, c: usize| -> f64 {
                        let v = product[r * n + c];
                        match epi {
                            Epilogue::BiasGeluBf16 => gelu_tanh_f64(v),
                            Epilogue::BiasGateResidual => gate[(r / tokens) * n + c] as f64 * v,
                            _ => v,
                        }
                    };
                    let mut region = Vec::with_capacity(m * n);
                    let mut want = Vec::with_capacity(m * n);
                    for r in 0..m + 1 {
                        for c in 0..ldo {
                            let g = got[r * ldo + c];
                            if r < m && c < n {
                                region.push(if residual_epi {
                                    g - residual[r * ldo + c]
                                } else {
                                    g
                                });
                                want.push(want_at(r, c) as f32);
                            } else if residual_epi {
                                ensure!(
                                    g == residual[r * ldo + c],
                                    "{what}: wrote padding or guard element ({r}, {c})"
                                );
                            } else {
                                ensure!(
                                    g.is_nan(),
                                    "{what}: wrote padding or guard element ({r}, {c})"
                                );
                            }
                        }
                    }
                    check_close(&what, &region, &want, 1e-2)?;
                    if residual_epi {
                        let want_cache: Vec<f32> = product.iter().map(|&v| v as f32).collect();
                        check_close(
                            &format!("{what} cache"),
                            &emu.download_bf16(&cache)?,
                            &round_bf16(&want_cache),
                            1e-2,
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The mbarrier-paced kernels (the TMA attention, the TMA GEMMs plain and multicast, the fused
/// GEMM + LayerNorm and qkv + attention, the
/// probes) with lazy threads: every fifth thread of a block runs only when no other can, so
/// a thread that waits on an mbarrier it never arrives on falls behind by as many phases as
/// the kernel lets it. A parity wait that is two phases stale waits for a phase that may never
/// come (a hang on a GPU, a deadlock here): `attention_tma`'s idle producer threads did that
/// before they left the loop.
#[test]
fn emulated_lazy_threads() -> Result<()> {
    use attention_cases::{run_case_sized, Shape};
    use fora::cuda::attention::AttentionImpl;
    let Some(emu) = emulator("emulated_lazy_threads") else {
        return Ok(());
    };
    emu.with_lazy_threads(5, || -> Result<()> {
        for (i, (batch, heads, tokens, head_dim)) in
            [(2, 1, 130, 64), (1, 2, 65, 72), (1, 1, 77, 128)]
                .into_iter()
                .enumerate()
        {
            let s = Shape {
                batch,
                heads,
                tokens,
                head_dim,
            };
            for imp in [AttentionImpl::Tma, AttentionImpl::TmaPingPong] {
                let name = format!(
                    "lazy threads: attention {} B={batch} H={heads} T={tokens} d={head_dim}",
                    imp.name()
                );
                run_case_sized(emu, &name, s, 1.0, 300 + i as u64, imp, 1)?;
            }
        }
        attention_cases::run_tma_probe(emu, 63)?;
        attention_cases::run_tma_cluster_probe(emu, 64)?;
        let tma: Vec<GemmKernel> = fora::cuda::gemm::TmaTile::ALL
            .into_iter()
            .map(GemmKernel::Tma)
            .collect();
        small_gemm_cases(emu, "lazy threads", &tma)?;
        let gemm_ln = small_kernel_cases::GemmLnCase {
            rows: 11,
            tokens: 10,
            k: 520,
            with_cache: false,
            round_v: false,
        };
        for (tile, multicast, seed) in small_gemm_ln_kernels(86) {
            small_kernel_cases::run_gemm_layernorm(emu, &gemm_ln, tile, multicast, seed)?;
        }
        for multicast in [false, true] {
            attention_cases::run_qkv_attention(emu, &small_qkv_attention_case(), multicast, 88)?;
        }
        Ok(())
    })
}

/// The fused GEMM + LayerNorm kernels the schedule tests run (tile, multicast, seed): both of
/// the 64-row tile, the model's of each 128-row one.
fn small_gemm_ln_kernels(seed: u64) -> [(GemmLnTile, bool, u64); 4] {
    [
        (GemmLnTile::Rows64, false, seed),
        (GemmLnTile::Rows64, true, seed + 1),
        (GemmLnTile::Rows128, true, seed + 2),
        (GemmLnTile::Wide128, true, seed + 3),
    ]
}

/// The fused GEMM + LayerNorm's odd case for the schedule tests: two clusters of 16 (one of 128
/// rows), the last partial, 10 tokens a model row, a partial k-tile.
fn small_gemm_ln_case() -> small_kernel_cases::GemmLnCase {
    small_kernel_cases::GemmLnCase {
        rows: 11,
        tokens: 10,
        k: 200,
        with_cache: true,
        round_v: true,
    }
}

/// The fused qkv + attention's small edge case for the schedule tests: two sequences of 200
/// tokens (a partial last key tile), two heads of 72 (dim 144: a partial k-step), padded A rows.
fn small_qkv_attention_case() -> attention_cases::QkvAttentionCase {
    attention_cases::QkvAttentionCase {
        shape: attention_cases::Shape {
            batch: 2,
            heads: 2,
            tokens: 200,
            head_dim: 72,
        },
        lda: 152,
    }
}

/// The TMA kernels' split-K slices alone (`launch_tma_kernel`, what `Gemm::tma_product_split`
/// hands `residual_layernorm` on the fused path): each slice's raw f32 partial sums, no bias,
/// slice z at element z * M * N, summing to the product. A plain and a 4 x 2 cluster tile, on
/// partial tiles in M, N and K (the last slice short of k-tiles).
#[test]
fn emulated_tma_split_partials() -> Result<()> {
    use fora::cuda::gemm::{launch_tma_kernel, TmaTile};
    use fora::cuda::testing::check_close;
    let Some(emu) = emulator("emulated_tma_split_partials") else {
        return Ok(());
    };
    let (m, n, k, splits) = (300usize, 392usize, 520usize, 4u32);
    let case = SmallGemm::new(emu, (m, n, k), 17)?;
    let want = case.product(false);
    for tile in [TmaTile::N128, TmaTile::C4x2N128] {
        let out = emu.poisoned_bf16(m * n)?;
        let p = case.params(&out);
        let workspace = emu.poisoned_f32(splits as usize * m * n)?;
        let ws = unsafe {
            launch_tma_kernel(
                &emu.with_sms(tma_sms(tile)),
                &p,
                tile,
                splits,
                Some((workspace.addr(), splits as usize * m * n)),
            )
        }?;
        anyhow::ensure!(ws == workspace.addr(), "{tile:?}: the workspace's address");
        let sum = sum_slices(&emu.download_f32(&workspace)?, splits as usize);
        check_close(
            &format!("TMA {tile:?} x{splits}: the slices' sum"),
            &sum,
            &want,
            1e-4,
        )?;
        // The output itself is not written: no epilogue ran.
        anyhow::ensure!(
            emu.download_bf16(&out)?.iter().all(|v| v.is_nan()),
            "{tile:?}: a split run without the epilogue kernel wrote the output"
        );
    }
    Ok(())
}

/// `FORA_GEMM=tma_mc`'s picks at one image + CFG of DiT-XL/2 (M = 512) on 132 emulated SMs,
/// as `Gemm::run` would launch them (the tile of `TmaTile::pick_multicast`, the slices of
/// `pick_splits`; proj's and fc2's slices also as `Gemm::tma_product_split` hands them to the
/// fused LayerNorm): 4 x 2 clusters with every cluster row full, 96-120 CTAs a launch (about a
/// minute on 2 cores).
#[test]
fn emulated_tma_mc_dit_xl2_two_rows() -> Result<()> {
    use fora::cuda::gemm::{launch_tma, launch_tma_kernel, TmaTile, SPLITK_WORKSPACE};
    use fora::cuda::testing::check_close;
    let Some(emu) = emulator("emulated_tma_mc_dit_xl2_two_rows") else {
        return Ok(());
    };
    let sms = 132;
    let gpu = emu.with_sms(sms);
    // qkv, proj, fc1, fc2 of DiT-XL/2 (hidden 1152, MLP 4608) at M = 2 x 256 tokens.
    for (name, n, k) in [
        ("qkv", 3456, 1152),
        ("proj", 1152, 1152),
        ("fc1", 4608, 1152),
        ("fc2", 1152, 4608),
    ] {
        let m = 512;
        let tile = TmaTile::pick_multicast(m, n, k, sms);
        let splits = tile.pick_splits(m, n, k, sms, SPLITK_WORKSPACE);
        let what = format!("{name} (M={m} N={n} K={k}) on {tile:?} x{splits}");
        eprintln!("{what}");
        let case = SmallGemm::new(emu, (m, n, k), 23)?;
        let out = emu.poisoned_bf16(m * n)?;
        let p = case.params(&out);
        let workspace = emu.poisoned_f32(splits as usize * m * n)?;
        let splitk = Some((workspace.addr(), splits as usize * m * n));
        unsafe { launch_tma(&gpu, &p, tile, splits, splitk) }?;
        check_close(&what, &emu.download_bf16(&out)?, &case.product(true), 1e-2)?;
        // The fused LayerNorm path's raw slices (no epilogue kernel), where it splits.
        let summed = tile.pick_splits_summed(m, n, k, sms, SPLITK_WORKSPACE);
        if summed > 1 {
            let len = summed as usize * m * n;
            let ws = emu.poisoned_f32(len)?;
            unsafe { launch_tma_kernel(&gpu, &p, tile, summed, Some((ws.addr(), len))) }?;
            let sum = sum_slices(&emu.download_f32(&ws)?, summed as usize);
            let what = format!("{what}: {summed} slices for the fused LayerNorm");
            check_close(&what, &sum, &case.product(false), 1e-4)?;
        }
    }
    Ok(())
}

/// `FORA_GEMM=tma`'s picks for proj and fc2 at one image + CFG of DiT-XL/2 (M = 512) on 132
/// emulated SMs: their 36 tiles in clusters of three along K (108 CTAs, each a third of the
/// k-tiles, summed through distributed shared memory), the gated-residual epilogue into the f32
/// residual and the bf16 cache, as the blocks run them.
#[test]
fn emulated_tma_cluster_k_dit_xl2_two_rows() -> Result<()> {
    use fora::cuda::gemm::{TmaTile, SPLITK_WORKSPACE};
    let Some(emu) = emulator("emulated_tma_cluster_k_dit_xl2_two_rows") else {
        return Ok(());
    };
    let sms = 132;
    let gpu = emu.with_sms(sms);
    let (m, tokens) = (512, 256);
    for (name, n, k) in [("proj", 1152, 1152), ("fc2", 1152, 4608)] {
        let tile = TmaTile::pick(m, n, k, sms);
        let splits = tile.pick_splits(m, n, k, sms, SPLITK_WORKSPACE);
        ensure!(
            (tile, splits) == (TmaTile::K3N128, 1),
            "{name}: the pick is {tile:?} x{splits}, not clusters of three along K"
        );
        let what = format!("{name} (M={m} N={n} K={k}) on {tile:?}, gated residual");
        check_gated_residual_tma(
            emu,
            &gpu,
            (m, n, k),
            tokens,
            (tile, splits),
            &what,
            (29, 31),
        )?;
    }
    Ok(())
}

/// A TMA GEMM on `tile` (in `splits` slices) with the blocks' gated-residual epilogue, on
/// random data (`seeds`: the operands', then the gate's and residual's) of `m` token rows in
/// rows of `tokens`: the output against residual + gate * the f64 product, the cache against
/// the bf16 product.
fn check_gated_residual_tma(
    emu: &Emulator,
    gpu: &Emulator,
    (m, n, k): (usize, usize, usize),
    tokens: usize,
    (tile, splits): (fora::cuda::gemm::TmaTile, u32),
    what: &str,
    seeds: (u64, u64),
) -> Result<()> {
    use fora::cuda::gemm::{gemm_params, launch_tma, Epilogue};
    use fora::cuda::testing::{check_close, round_bf16, TestRng};
    eprintln!("{what}");
    let case = SmallGemm::new(emu, (m, n, k), seeds.0)?;
    let mut rng = TestRng::new(seeds.1);
    let gate = rng.uniform_vec(m.div_ceil(tokens) * n, -1.0, 1.0);
    let residual = rng.normal_vec(m * n, 1.0);
    let (gate_d, out) = (emu.upload_f32(&gate)?, emu.upload_f32(&residual)?);
    let cache = emu.poisoned_bf16(m * n)?;
    let p = fora::cuda::params::GemmParams {
        cache: cache.addr(),
        gate: gate_d.addr(),
        ldg: n as i32,
        rows_per_gate: tokens as i32,
        ..gemm_params(
            case.a_d.addr(),
            case.w_d.addr(),
            case.bias_d.addr(),
            out.addr(),
            m,
            n,
            k,
            Epilogue::BiasGateResidual,
        )
    };
    unsafe { launch_tma(gpu, &p, tile, splits, None) }?;
    let product = case.product(true);
    let want: Vec<f32> = (0..m * n)
        .map(|i| residual[i] + gate[(i / n / tokens) * n + i % n] * product[i])
        .collect();
    check_close(what, &emu.download_f32(&out)?, &want, 1e-4)?;
    check_close(
        &format!("{what}: cache"),
        &emu.download_bf16(&cache)?,
        &round_bf16(&product),
        1e-2,
    )?;
    Ok(())
}

/// The cluster split-K tile forced on shapes that do not fill it (`FORA_TMA_TILES` routes a
/// shape to it whatever its size, as gpu_backend's `gpu_tma_sampling_paths` does on its small
/// model): a partial N tile (144 columns in tiles of 128), K of 2.25 and 9 k-tiles over three
/// CTAs, and the timestep MLP's few rows.
#[test]
fn emulated_tma_cluster_k_partial_tiles() -> Result<()> {
    use fora::cuda::gemm::TmaTile;
    let Some(emu) = emulator("emulated_tma_cluster_k_partial_tiles") else {
        return Ok(());
    };
    let gpu = emu.with_sms(132);
    for (m, n, k) in [(256, 144, 144), (256, 144, 576), (4, 144, 144)] {
        let what = format!("M={m} N={n} K={k} on {:?}, gated residual", TmaTile::K3N128);
        check_gated_residual_tma(
            emu,
            &gpu,
            (m, n, k),
            64,
            (TmaTile::K3N128, 1),
            &what,
            (37, 41),
        )?;
    }
    Ok(())
}

/// The kernels' `extern "C" __global__` declarations in `src` (a kernels/*.cu file's text): each
/// literal name with the cluster size of its `FORA_CLUSTER(n)` (1 without one). Names built by
/// a macro (token pasting) are left out.
fn declared_clusters(src: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for (start, _) in src.match_indices("extern \"C\" __global__ void") {
        let rest = &src[start..];
        let Some(end) = rest.find('{') else { continue };
        let mut head = rest[..end].to_string();
        let mut cluster = 1;
        for wrapper in ["__launch_bounds__(", "FORA_CLUSTER("] {
            if let Some(at) = head.find(wrapper) {
                let close = at + head[at..].find(')').expect("a closing parenthesis");
                if wrapper == "FORA_CLUSTER(" {
                    cluster = head[at + wrapper.len()..close]
                        .trim()
                        .parse()
                        .expect("a cluster size");
                }
                head.replace_range(at..=close, " ");
            }
        }
        let Some(open) = head.find('(') else { continue };
        let name = head[..open].split_whitespace().last().unwrap_or("");
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push((name.to_string(), cluster));
        }
    }
    out
}

/// The emulator runs each kernel's blocks in clusters of the size the kernel declares
/// (`FORA_CLUSTER(n)`; the emulator keeps its own table by name, `cluster_size_of`): a kernel
/// run in clusters of another size indexes peers that do not exist or writes past its output
/// (session 26's 8-CTA clusters first ran as 16 and crashed the test process).
#[test]
fn emulated_cluster_sizes_match_the_kernels() -> Result<()> {
    let Some(emu) = emulator("emulated_cluster_sizes_match_the_kernels") else {
        return Ok(());
    };
    type ClusterSizeFn = unsafe extern "C" fn(*const c_char) -> c_uint;
    // SAFETY: the symbol has this signature in tests/emulation/launch.cpp.
    let cluster_size: ClusterSizeFn = unsafe {
        *emu.lib
            .get::<ClusterSizeFn>(b"fora_emulate_cluster_size\0")?
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut checked = 0;
    let mut clustered = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let src = std::fs::read_to_string(&path)?;
        for (name, declared) in declared_clusters(&src) {
            let c_name = CString::new(name.as_str())?;
            // SAFETY: a NUL-terminated string the function only reads.
            let emulated = unsafe { cluster_size(c_name.as_ptr()) };
            ensure!(
                emulated == declared,
                "{}: {name} declares clusters of {declared}, the emulator runs {emulated}",
                path.display()
            );
            checked += 1;
            clustered += usize::from(declared > 1);
        }
    }
    // Every cluster kernel family is among them (GEMMs, gemm_ln, qkv_attention, the probe).
    ensure!(
        checked > 50 && clustered >= 20,
        "only {checked} kernels ({clustered} in clusters) found in {}",
        dir.display()
    );
    eprintln!("{checked} kernels, {clustered} in clusters: the emulator's sizes match");
    Ok(())
}

/// `FORA_GEMM=tma`'s picks for qkv and fc1 at one image + CFG of DiT-XL/2 (M = 512) on 132
/// emulated SMs: one round of the narrow tiles (qkv's 3456 columns in 124 tiles of 128 x 112,
/// fc1's 4608 in 128 of 128 x 144, the last qkv tile 96 columns wide past N), with the
/// epilogues the blocks run them with (bias to bf16; bias + GELU to bf16).
#[test]
fn emulated_tma_narrow_tiles_dit_xl2_two_rows() -> Result<()> {
    use fora::cuda::gemm::{launch_tma, Epilogue, TmaTile, SPLITK_WORKSPACE};
    use fora::cuda::testing::{check_close, gelu_tanh_f64};
    let Some(emu) = emulator("emulated_tma_narrow_tiles_dit_xl2_two_rows") else {
        return Ok(());
    };
    let sms = 132;
    let gpu = emu.with_sms(sms);
    let m = 512;
    for (name, n, k, epilogue, want_tile) in [
        ("qkv", 3456, 1152, Epilogue::BiasBf16, TmaTile::N112),
        ("fc1", 4608, 1152, Epilogue::BiasGeluBf16, TmaTile::N144),
    ] {
        let tile = TmaTile::pick(m, n, k, sms);
        let splits = tile.pick_splits(m, n, k, sms, SPLITK_WORKSPACE);
        ensure!(
            (tile, splits) == (want_tile, 1),
            "{name}: the pick is {tile:?} x{splits}, not {want_tile:?}"
        );
        let what = format!("{name} (M={m} N={n} K={k}) on {tile:?}, {epilogue:?}");
        eprintln!("{what}");
        let case = SmallGemm::new(emu, (m, n, k), 37)?;
        let out = emu.poisoned_bf16(m * n)?;
        let p = fora::cuda::params::GemmParams {
            epilogue: epilogue.raw(),
            ..case.params(&out)
        };
        unsafe { launch_tma(&gpu, &p, tile, splits, None) }?;
        let want: Vec<f32> = case
            .product(true)
            .into_iter()
            .map(|v| match epilogue {
                Epilogue::BiasGeluBf16 => gelu_tanh_f64(v as f64) as f32,
                _ => v,
            })
            .collect();
        check_close(&what, &emu.download_bf16(&out)?, &want, 1e-2)?;
    }
    Ok(())
}

/// Every kernel with a block barrier, with the warps of a block out of step (the lowest warp
/// first; then the highest first, with the blocks of each launch from the last): each warp runs
/// as far as its barriers let it before the next starts. Round robin moves every warp to its
/// next shuffle before any goes on, so a warp that overwrites shared memory another warp has
/// yet to read (a missing block barrier) passes there; here the warp that runs ahead
/// overwrites it first. The same test bodies as the other
/// emulated tests, the attention kernels and GEMMs on their small edge shapes.
#[test]
fn emulated_warps_ahead() -> Result<()> {
    let Some(emu) = emulator("emulated_warps_ahead") else {
        return Ok(());
    };
    for order in [1, -1] {
        emu.with_warps_ahead(order, || small_cases_of_every_kernel(emu, "warps ahead"))
            .with_context(|| format!("warps ahead, order {order}"))?;
    }
    Ok(())
}

/// The cluster kernels that write into other blocks' shared memory (the fused GEMM + LayerNorm's
/// statistics, the fused qkv + attention's K and V) with blocks ahead: each block of a cluster
/// runs as far as its own barriers let it (a warpgroup's wgmma included) before the next moves,
/// so a block that reads its shared memory before the cluster barrier that follows the other
/// blocks' stores reads it before they are made. Round robin and warps ahead give the other
/// blocks a turn at each of the reader's warpgroup barriers, which hides that.
#[test]
fn emulated_blocks_ahead() -> Result<()> {
    let Some(emu) = emulator("emulated_blocks_ahead") else {
        return Ok(());
    };
    emu.with_warps_ahead(2, || -> Result<()> {
        for (tile, multicast, seed) in small_gemm_ln_kernels(85) {
            small_kernel_cases::run_gemm_layernorm(
                emu,
                &small_gemm_ln_case(),
                tile,
                multicast,
                seed,
            )?;
        }
        for multicast in [false, true] {
            attention_cases::run_qkv_attention(emu, &small_qkv_attention_case(), multicast, 90)?;
        }
        Ok(())
    })
    .context("blocks ahead")
}

/// Small cases of every kernel family with shared memory or warp exchanges, what the warps-ahead
/// schedules and the race check run; `label` names them in errors.
fn small_cases_of_every_kernel(emu: &Emulator, label: &str) -> Result<()> {
    use attention_cases::{run_case_sized, Shape};
    use fora::cuda::attention::AttentionImpl;
    small_kernel_cases::check_patch_embed(emu)?;
    small_norm_cases(emu)?;
    small_kernel_cases::check_fora_reuse(emu)?;
    // The reuse forward's small cases (all but DiT-XL/2's 28 layers).
    let small_reuse: Vec<_> = small_kernel_cases::reuse_final_cases()
        .into_iter()
        .filter(|(c, _)| c.dim < 1152)
        .collect();
    small_kernel_cases::check_fora_reuse_final_on(emu, &small_reuse)?;
    small_kernel_cases::check_fora_sum_final_on(emu, &small_reuse)?;
    small_kernel_cases::check_fora_cache_sum(emu)?;
    small_kernel_cases::check_sampler_step(emu)?;
    small_kernel_cases::check_final_sampler_step(emu)?;
    small_kernel_cases::check_vae_kernels(emu)?;
    for imp in AttentionImpl::ALL {
        for (i, (batch, heads, tokens, head_dim)) in
            [(1, 2, 65, 72), (1, 1, 200, 128)].into_iter().enumerate()
        {
            let s = Shape {
                batch,
                heads,
                tokens,
                head_dim,
            };
            let name = format!(
                "{label}: attention {} B={batch} H={heads} T={tokens} d={head_dim}",
                imp.name()
            );
            run_case_sized(emu, &name, s, 1.0, 400 + i as u64, imp, EMULATED_SMS)?;
        }
    }
    attention_cases::run_tma_probe(emu, 65)?;
    attention_cases::run_tma_cluster_probe(emu, 66)?;
    for (tile, multicast, seed) in small_gemm_ln_kernels(85) {
        small_kernel_cases::run_gemm_layernorm(emu, &small_gemm_ln_case(), tile, multicast, seed)?;
    }
    for multicast in [false, true] {
        attention_cases::run_qkv_attention(emu, &small_qkv_attention_case(), multicast, 89)?;
    }
    small_gemm_cases(emu, label, &every_gemm_kernel())
}

/// The LayerNorms (layernorm_modulate, residual_layernorm) with one and four warps a row, on
/// small rows of every path: the register path (dim 64, 384, 1152, 1536), the looped path
/// (2048) and the scalar one (dim 100, unaligned columns).
fn small_norm_cases(emu: &Emulator) -> Result<()> {
    use fora::cuda::norm::RowWarps;
    use small_kernel_cases::{run_layernorm, run_residual_layernorm, NormCase, ResidualLnCase};
    let norm = |rows, tokens, dim: usize| NormCase {
        rows,
        tokens,
        dim,
        ld_mod: 8 * dim,
        shift_col: 2 * dim,
        scale_col: 5 * dim,
    };
    for (i, c) in [norm(2, 40, 64), norm(3, 9, 384), norm(2, 5, 1152)]
        .iter()
        .enumerate()
    {
        for warps in [RowWarps::One, RowWarps::Four] {
            run_layernorm(emu, c, warps, 500 + i as u64)?;
        }
    }
    run_layernorm(emu, &norm(3, 7, 2048), RowWarps::One, 503)?;
    let unaligned = NormCase {
        ld_mod: 303,
        shift_col: 3,
        scale_col: 201,
        ..norm(3, 11, 100)
    };
    run_layernorm(emu, &unaligned, RowWarps::One, 504)?;
    let residual = |rows, tokens, dim, ld_acc, splits| ResidualLnCase {
        rows,
        tokens,
        dim,
        ld_acc,
        with_cache: true,
        v_bf16: false,
        splits,
    };
    for (i, c) in [
        residual(2, 40, 64, 64, 1),
        residual(3, 13, 100, 104, 3),
        residual(2, 5, 1152, 1152, 1),
        residual(1, 9, 1536, 1536, 2),
    ]
    .iter()
    .enumerate()
    {
        for warps in [RowWarps::One, RowWarps::Four] {
            run_residual_layernorm(emu, c, warps, 510 + i as u64)?;
        }
    }
    Ok(())
}

/// Emulated SMs for a TMA tile: 1 (its persistent CTA takes every work unit) or, for the
/// multicast tiles, 4 (two clusters of two) or 8 (two clusters of four, one of eight), so that
/// a cluster takes several units on the small shapes.
fn tma_sms(t: fora::cuda::gemm::TmaTile) -> usize {
    match t.cluster() {
        1 => 1,
        2 => 4,
        _ => 8,
    }
}

/// Launches one GEMM of the emulated families (the TMA tiles on tma_sms SMs).
fn launch_gemm(
    emu: &Emulator,
    kernel: &GemmKernel,
    p: &fora::cuda::params::GemmParams,
    splits: u32,
    splitk: Option<(u64, usize)>,
) -> Result<()> {
    use fora::cuda::gemm::{launch_custom, launch_tma, launch_wgmma};
    match kernel {
        GemmKernel::Custom(t) => unsafe { launch_custom(emu, p, *t, splits, splitk) },
        GemmKernel::Wgmma(t) => unsafe { launch_wgmma(emu, p, *t, splits, splitk) },
        GemmKernel::Tma(t) => unsafe {
            launch_tma(&emu.with_sms(tma_sms(*t)), p, *t, splits, splitk)
        },
    }
}

/// The element-wise sum of `splits` equal slices laid end to end (split-K partial sums, slice z
/// at z * len / splits).
fn sum_slices(slices: &[f32], splits: usize) -> Vec<f32> {
    let len = slices.len() / splits;
    (0..len)
        .map(|i| (0..splits).map(|z| slices[z * len + i]).sum())
        .collect()
}

/// A random GEMM on the emulator: bf16 A [M, K] and W [N, K] (W scaled by 1 / sqrt(K)) and an f32
/// bias, uploaded.
struct SmallGemm {
    a: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    a_d: HostBuf<bf16>,
    w_d: HostBuf<bf16>,
    bias_d: HostBuf<f32>,
    shape: (usize, usize, usize),
}

impl SmallGemm {
    fn new(emu: &Emulator, (m, n, k): (usize, usize, usize), seed: u64) -> Result<SmallGemm> {
        use fora::cuda::testing::{round_bf16, TestRng};
        let mut rng = TestRng::new(seed);
        let a = round_bf16(&rng.normal_vec(m * k, 1.0));
        let w = round_bf16(&rng.normal_vec(n * k, 1.0 / (k as f32).sqrt()));
        let bias = rng.normal_vec(n, 0.5);
        Ok(SmallGemm {
            a_d: emu.upload_bf16(&a)?,
            w_d: emu.upload_bf16(&w)?,
            bias_d: emu.upload_f32(&bias)?,
            a,
            w,
            bias,
            shape: (m, n, k),
        })
    }

    /// A W^T in f64, plus the bias `with_bias`, as f32.
    fn product(&self, with_bias: bool) -> Vec<f32> {
        let zeros = vec![0.0; self.shape.1];
        let bias = if with_bias { &self.bias } else { &zeros };
        biased_product(&self.a, &self.w, bias, self.shape)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    }

    /// The bias + bf16-out GEMM into `out`.
    fn params(&self, out: &HostBuf<bf16>) -> fora::cuda::params::GemmParams {
        let (m, n, k) = self.shape;
        fora::cuda::gemm::gemm_params(
            self.a_d.addr(),
            self.w_d.addr(),
            self.bias_d.addr(),
            out.addr(),
            m,
            n,
            k,
            fora::cuda::gemm::Epilogue::BiasBf16,
        )
    }
}

/// `kernels` on one small shape (M = 300: three M tiles, the last partial; N = 392: whole and
/// partial tiles of every width; on tma_sms SMs a TMA CTA takes several units), against the
/// f64 product (bias epilogue, bf16 out).
fn small_gemm_cases(emu: &Emulator, what: &str, kernels: &[GemmKernel]) -> Result<()> {
    small_gemm_cases_sized(emu, what, kernels, (300, 392, 200), 1)
}

/// [`small_gemm_cases`] at M x N x K = `(m, n, k)`, in `splits` split-K slices (more than one:
/// the partial products in a workspace, then the epilogue kernel).
fn small_gemm_cases_sized(
    emu: &Emulator,
    what: &str,
    kernels: &[GemmKernel],
    (m, n, k): (usize, usize, usize),
    splits: u32,
) -> Result<()> {
    use fora::cuda::testing::check_close;
    let case = SmallGemm::new(emu, (m, n, k), 11)?;
    let want = case.product(true);
    for kernel in kernels {
        let out = emu.poisoned_bf16(m * n)?;
        let p = case.params(&out);
        let workspace = emu.poisoned_f32(splits as usize * m * n)?;
        let splitk = (splits > 1).then(|| (workspace.addr(), splits as usize * m * n));
        launch_gemm(emu, kernel, &p, splits, splitk)?;
        check_close(
            &format!("{what}: GEMM {kernel:?} x{splits}"),
            &emu.download_bf16(&out)?,
            &want,
            1e-2,
        )?;
    }
    Ok(())
}

/// Every GEMM kernel family the emulator runs: each custom, wgmma and TMA tile.
fn every_gemm_kernel() -> Vec<GemmKernel> {
    use fora::cuda::gemm::{Tile, TmaTile, WgmmaTile};
    Tile::ALL
        .into_iter()
        .map(GemmKernel::Custom)
        .chain(WgmmaTile::ALL.into_iter().map(GemmKernel::Wgmma))
        .chain(TmaTile::ALL.into_iter().map(GemmKernel::Tma))
        .collect()
}

/// The cluster probe on the emulator (its cluster of two run together): the expectations of
/// `gpu_tma_cluster_probe`.
#[test]
fn emulated_tma_cluster_probe() -> Result<()> {
    let Some(emu) = emulator("emulated_tma_cluster_probe") else {
        return Ok(());
    };
    attention_cases::run_tma_cluster_probe(emu, 62)
}

/// The TMA probe (kernels/probe_sm90.cu) on the emulator: the same expectations the GPU test
/// checks, so the emulator's TMA and the hardware's are held to one description.
#[test]
fn emulated_tma_probe() -> Result<()> {
    let Some(emu) = emulator("emulated_tma_probe") else {
        return Ok(());
    };
    attention_cases::run_tma_probe(emu, 61)
}

/// The wgmma probes (kernels/probe_sm90.cu) in every mode and width: the emulator and the
/// probe kernel agree on the layouts (the GPU run of the same cases checks the hardware).
#[test]
fn emulated_wgmma_probe() -> Result<()> {
    use fora::cuda::probe::WgmmaProbeMode;
    let Some(emu) = emulator("emulated_wgmma_probe") else {
        return Ok(());
    };
    for (i, mode) in WgmmaProbeMode::ALL.into_iter().enumerate() {
        for &n in mode.widths() {
            attention_cases::run_wgmma_probe(emu, mode, n as usize, 60 + i as u64)?;
        }
    }
    Ok(())
}

/// The emulated tests [`emulated_kernels_have_no_data_races`] runs under ThreadSanitizer, each in
/// a child process: the elementwise kernels and probes with their own cases, the rest on small
/// cases ([`race_check_every_kernel`]).
const RACE_CHECKED_TESTS: &[&str] = &[
    "emulated_timestep_embedding",
    "emulated_silu",
    "emulated_label_silu",
    "emulated_unpatchify",
    "emulated_normal_fill",
    "emulated_bandwidth_probes",
    "emulated_wgmma_probe",
    "emulated_tma_probe",
    "emulated_tma_cluster_probe",
    "race_check_every_kernel",
];

/// The ThreadSanitizer runtime of `cxx` (g++'s shared libtsan), if it has one.
fn tsan_runtime(cxx: &str) -> Option<PathBuf> {
    let out = Command::new(cxx)
        .arg("-print-file-name=libtsan.so")
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // (Without it the compiler prints the bare name back.)
    path.is_absolute()
        .then(|| path.canonicalize().ok())
        .flatten()
}

/// Runs `tests` of this binary (ignored ones too) in a child process that loads the emulator
/// library `lib` instead of building one, with `setup` adding to its command.
fn run_child_tests(
    tests: &[&str],
    lib: &Path,
    setup: impl FnOnce(&mut Command),
) -> Result<std::process::Output> {
    let exe = std::env::current_exe().context("cannot find the test binary")?;
    let mut child = Command::new(&exe);
    child
        .args(["--exact", "--include-ignored", "--test-threads=1"])
        .args(tests)
        .env(EMULATION_LIB, lib);
    setup(&mut child);
    child
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))
}

/// Runs `tests` of this binary in a child process under ThreadSanitizer (`runtime` preloaded),
/// loading the race-checking emulator `lib`; the first race ends it with exit status 66.
fn run_race_checked(runtime: &Path, lib: &Path, tests: &[&str]) -> Result<std::process::Output> {
    run_child_tests(tests, lib, |child| {
        child
            .env("LD_PRELOAD", runtime)
            .env("FORA_REQUIRE_EMULATION", "1")
            // The Rust test harness is not instrumented: its memcpys are no kernel's.
            .env(
                "TSAN_OPTIONS",
                "halt_on_error=1:exitcode=66:ignore_noninstrumented_modules=1:report_signal_unsafe=0",
            );
    })
}

/// The last `lines` lines of a child's standard error.
fn stderr_tail(out: &std::process::Output, lines: usize) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// ThreadSanitizer over the emulated kernels: the kernels built with it, every emulated thread a
/// TSan fiber, and the emulator telling it what orders threads (barriers, warp-collective
/// exchanges, mbarrier phases) and which memory cp.async, TMA, ldmatrix and wgmma touch
/// (tests/emulation/launch.cpp, `race`). Two accesses to a byte, one a write, with nothing
/// ordering them are a race on a GPU in any schedule; the warps-ahead schedules
/// (`emulated_warps_ahead`) show only the races that change a result in the schedules they try.
/// Races between blocks of a launch are not checked (blocks run in order). The probes show the
/// check can fail: a missing block barrier is reported, the same kernel with it is not.
/// Each test runs in a child process (two to three minutes in all, on two cores);
/// `FORA_RACE_CHECK_TESTS=emulated_attention,...` runs only those after the probes.
#[test]
fn emulated_kernels_have_no_data_races() -> Result<()> {
    const TEST: &str = "emulated_kernels_have_no_data_races";
    let Some(cxx) = compiler() else {
        // Prints SKIP (or fails under FORA_REQUIRE_EMULATION=1).
        let _ = emulator(TEST);
        return Ok(());
    };
    let Some(runtime) = tsan_runtime(&cxx) else {
        ensure!(
            std::env::var("FORA_REQUIRE_EMULATION").as_deref() != Ok("1"),
            "{TEST}: FORA_REQUIRE_EMULATION=1 but {cxx} has no ThreadSanitizer runtime"
        );
        println!("SKIP {TEST}: {cxx} has no ThreadSanitizer runtime (libtsan)");
        return Ok(());
    };
    let lib = build(&cxx, Build::Races)?;
    let racy = run_race_checked(&runtime, &lib, &["race_check_probe_unsynced"])?;
    let report = String::from_utf8_lossy(&racy.stderr);
    if report.contains("FATAL: ThreadSanitizer: unexpected memory mapping") {
        // TSan cannot lay out its shadow memory beside this kernel's address-space layout
        // (some kernels' mmap randomization): the machine, not the kernels.
        println!(
            "SKIP {TEST}: ThreadSanitizer cannot run on this machine:\n{}",
            stderr_tail(&racy, 5)
        );
        return Ok(());
    }
    ensure!(
        racy.status.code() == Some(66)
            && report.contains("ThreadSanitizer: data race")
            && report.contains("race_probe_warps"),
        "{TEST}: the probe with a missing block barrier was not reported as a race (status {:?}):\n{}",
        racy.status,
        stderr_tail(&racy, 40)
    );
    // FORA_RACE_CHECK_TESTS=a,b: only these tests of this binary (while working on a kernel).
    let chosen = std::env::var("FORA_RACE_CHECK_TESTS").ok();
    let tests: Vec<&str> = match &chosen {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect(),
        None => RACE_CHECKED_TESTS.to_vec(),
    };
    for test in ["race_check_probe_synced"].iter().chain(&tests) {
        let out = run_race_checked(&runtime, &lib, &[test])?;
        ensure!(
            out.status.success(),
            "{TEST}: {test} under ThreadSanitizer failed (status {:?}; 66: a data race):\n{}",
            out.status,
            stderr_tail(&out, 80)
        );
        // A name that matches no test runs none and succeeds: the test must have run.
        ensure!(
            String::from_utf8_lossy(&out.stdout).contains("test result: ok. 1 passed"),
            "{TEST}: {test} is no test of this binary (or did not run):\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// A proxy or register probe (tests/emulation/launch.cpp, `proxy_probe`): what each thread of its
/// one 128-thread block computed.
fn run_wgmma_probe(emu: &Emulator, name: &str) -> Result<Vec<f32>> {
    let out = emu.poisoned_f32(128)?;
    let addr = out.addr();
    // SAFETY: the probes write one float per thread of their one 128-thread block, and use
    // 8 KiB of dynamic shared memory.
    unsafe { emu.launch_kernel(name, (1, 1, 1), (128, 1, 1), 8192, &addr)? };
    emu.download_f32(&out)
}

/// The in-flight register check: a thread that changes a wgmma's accumulators or its A registers
/// between the issue and the wait that retires it (undefined on a GPU; the emulator, applying
/// the wgmma at its retirement, would otherwise compute as if it had waited) fails the launch;
/// changing them after the wait is the kernels' normal course.
#[test]
fn emulator_checks_registers_in_flight() -> Result<()> {
    let Some(emu) = emulator("emulator_checks_registers_in_flight") else {
        return Ok(());
    };
    let run = |name: &str| run_wgmma_probe(emu, name);
    ensure!(
        run("register_probe_after")? == vec![17.0f32; 128],
        "register_probe_after: 16 from the wgmma, plus 1 after its wait, is not 17"
    );
    for (probe, what) in [
        ("register_probe_acc", "accumulators"),
        ("register_probe_a", "A registers"),
    ] {
        let Err(err) = run(probe) else {
            bail!("{probe} ran: changing the {what} of a wgmma in flight was not refused");
        };
        let err = format!("{err:#}");
        ensure!(
            err.contains(what) && err.contains("before the wait that retires it"),
            "{probe}: refused for another reason: {err}"
        );
    }
    Ok(())
}

/// A write past a block's dynamic shared memory aborts the launch (a child process runs it): 64
/// threads writing a byte each into 64 bytes pass; into 63, the last one lands past the end.
#[test]
fn emulator_guards_dynamic_shared_memory() -> Result<()> {
    let Some(emu) = emulator("emulator_guards_dynamic_shared_memory") else {
        return Ok(());
    };
    smem_guard_probe(emu, 64)?;
    // (The library this process built and loaded.)
    let out = run_child_tests(
        &["smem_guard_probe_writes_past"],
        &checked_library(),
        |_| {},
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("wrote past its 63 bytes of dynamic shared memory"),
        "a write past the dynamic shared memory was not refused (status {:?}):\n{}",
        out.status,
        stderr_tail(&out, 20)
    );
    Ok(())
}

/// smem_guard_probe over `bytes` bytes of dynamic shared memory, 64 threads.
fn smem_guard_probe(emu: &Emulator, bytes: u32) -> Result<()> {
    let unused = 0u64;
    // SAFETY: the probe writes one byte per thread of its dynamic shared memory, nothing else.
    unsafe { emu.launch_kernel("smem_guard_probe", (1, 1, 1), (64, 1, 1), bytes, &unused) }
}

#[test]
#[ignore = "aborts: emulator_guards_dynamic_shared_memory runs it in a child process"]
fn smem_guard_probe_writes_past() -> Result<()> {
    let emu = emulator("smem_guard_probe_writes_past").context("no emulator")?;
    smem_guard_probe(emu, 63)
}

/// Runs a race probe (tests/emulation/race_probes.cpp) over 2 blocks of 128 threads; what it
/// read, per thread.
fn run_race_probe(name: &str) -> Result<Vec<f32>> {
    let emu = emulator(name).context("no emulator")?;
    let n = 2 * 128;
    let out = emu.poisoned_f32(n)?;
    let addr = out.addr();
    // SAFETY: the probe writes one float per thread of `out`.
    unsafe { emu.launch_kernel(name, (2, 1, 1), (128, 1, 1), 0, &addr) }?;
    emu.download_f32(&out)
}

#[test]
#[ignore = "a race-check probe: emulated_kernels_have_no_data_races runs it under ThreadSanitizer"]
fn race_check_probe_unsynced() -> Result<()> {
    run_race_probe("race_probe_warps").map(|_| ())
}

#[test]
#[ignore = "a race-check probe: emulated_kernels_have_no_data_races runs it under ThreadSanitizer"]
fn race_check_probe_synced() -> Result<()> {
    let read = run_race_probe("race_probe_warps_synced")?;
    let want: Vec<f32> = (0..256u32)
        .map(|t| 1.0 + ((t % 128 / 32 + 1) % 4) as f32)
        .collect();
    ensure!(
        read == want,
        "race_probe_warps_synced read other than 1 + the next warp"
    );
    Ok(())
}

/// What the race check runs of the kernels with shared memory or warp exchanges: the small cases
/// of every family, then the pipelines wrapping around (a slot refilled after its last reader):
/// the wgmma GEMMs' 4-stage ring over 9 k-tiles (then in three split-K slices, with the epilogue
/// kernel), the persistent TMA attention on one CTA (its Q slot and K/V ring across units), the
/// 128-row wgmma attention.
#[test]
#[ignore = "run under ThreadSanitizer by emulated_kernels_have_no_data_races"]
fn race_check_every_kernel() -> Result<()> {
    use attention_cases::{run_case_sized, Shape};
    use fora::cuda::attention::AttentionImpl;
    let emu = emulator("race_check_every_kernel").context("no emulator")?;
    small_cases_of_every_kernel(emu, "race check")?;
    let s = Shape {
        batch: 1,
        heads: 2,
        tokens: 130,
        head_dim: 72,
    };
    for (imp, sms) in [
        (AttentionImpl::Tma, 1),
        (AttentionImpl::TmaPingPong, 1),
        (AttentionImpl::Wgmma, 1),
        (AttentionImpl::WgmmaMn, 1),
    ] {
        let name = format!("race check: attention {} on {sms} SM", imp.name());
        run_case_sized(emu, &name, s, 1.0, 450, imp, sms)?;
    }
    for splits in [1, 3] {
        let what = "race check, K = 520";
        small_gemm_cases_sized(emu, what, &every_gemm_kernel(), (70, 136, 520), splits)?;
    }
    Ok(())
}
