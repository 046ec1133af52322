//! Build script: compiles every `kernels/*.cu` with nvcc straight to a fatbin (SASS for sm_80 and
//! sm_90a, plus compute_80 PTX so newer cards can JIT it) and embeds them through the generated
//! `OUT_DIR/kernels.rs`; turns `kernels/params.h` into Rust with bindgen (`OUT_DIR/params_bindings.rs`).
//!
//! Without nvcc the crate still builds (CPU only): `MODULES` is empty and `Gpu::new` says so.
//! Without libclang the committed `src/cuda/params_bindings.rs` is used unchanged and
//! `tests/bindings.rs` skips its comparison.
//!
//! Environment:
//! - `NVCC`: path of nvcc (else PATH, `CUDA_HOME/bin`, `CUDA_PATH/bin`, `/usr/local/cuda/bin`, the
//!   pip wheel `site-packages/nvidia/cu13/bin/nvcc`).
//! - `FORA_SKIP_KERNELS=1`: build without kernels even when nvcc exists (fast CPU-only builds).
//! - `FORA_WRITE_BINDINGS=<path>`: also write the regenerated bindings there
//!   (`tools/update_bindings.sh` uses it to refresh the committed file).
//!
//! Flags: `-O3 -std=c++17`, no `--use_fast_math`: it would flush denormals and swap expf/sinf/cosf
//! for approximations whose results the GPU tests compare against the f32 CPU reference (and the
//! timestep embedding evaluates sin/cos of arguments up to 999 rad, where `__sinf` is poor).
//! Kernels that want a fast intrinsic call it explicitly.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Architectures in each fatbin: SASS for Ampere and Hopper, PTX of compute_80 for anything newer.
const GENCODES: &[(&str, &str)] = &[
    ("compute_80", "sm_80"),
    ("compute_90a", "sm_90a"),
    ("compute_80", "compute_80"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "FORA_SKIP_KERNELS",
        "FORA_WRITE_BINDINGS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("kernels");
    // cargo only watches files that exist when it records the directory; list each one too.
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernel_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    bindings(&kernel_dir, &out_dir);
    kernels(&sources, &out_dir);
}

// ---- kernels -------------------------------------------------------------------------------

fn kernels(sources: &[PathBuf], out_dir: &Path) {
    let cu: Vec<&PathBuf> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    let skip = std::env::var("FORA_SKIP_KERNELS").is_ok_and(|v| v == "1");
    let nvcc = if skip { None } else { find_nvcc() };
    let Some(nvcc) = nvcc else {
        let why = if skip {
            "FORA_SKIP_KERNELS=1"
        } else {
            "nvcc not found (set NVCC, put nvcc on PATH, set CUDA_HOME, or install the pinned nvidia-cuda-nvcc wheels)"
        };
        println!("cargo:warning=fora: building WITHOUT CUDA kernels: {why}; the CUDA backend will report it");
        write_kernels_rs(out_dir, &[], "", why);
        std::fs::write(
            out_dir.join("ptxas.txt"),
            format!("no kernels built: {why}\n"),
        )
        .expect("write ptxas.txt");
        return;
    };
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().last().map(str::to_string))
        .unwrap_or_default();

    // Compile in parallel, at most as many nvcc processes as cores.
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(1);
    let mut results: Vec<(String, PathBuf, String)> = Vec::new();
    for chunk in cu.chunks(jobs) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|src| {
                let src = (*src).clone();
                let nvcc = nvcc.clone();
                let out_dir = out_dir.to_path_buf();
                std::thread::spawn(move || compile(&nvcc, &src, &out_dir))
            })
            .collect();
        for h in handles {
            match h.join().expect("nvcc thread panicked") {
                Ok(r) => results.push(r),
                Err(e) => panic!("{e}"),
            }
        }
    }

    let mut report = format!("nvcc: {} ({version})\n", nvcc.display());
    let mut bad = Vec::new();
    for (name, _, log) in &results {
        let _ = writeln!(report, "==== {name}.cu\n{log}");
        for f in spilling_functions(log) {
            bad.push(format!("{name}.cu: {f}"));
        }
    }
    std::fs::write(out_dir.join("ptxas.txt"), &report).expect("write ptxas.txt");
    for b in &bad {
        println!("cargo:warning=fora: ptxas: {b} (see OUT_DIR/ptxas.txt, tools/check_kernels.py)");
    }
    let modules: Vec<(String, PathBuf, Vec<String>)> = results
        .into_iter()
        .map(|(n, p, log)| (n, p, entry_functions(&log)))
        .collect();
    write_kernels_rs(out_dir, &modules, &version, "");
}

/// One `.cu` -> `OUT_DIR/<name>.fatbin`; returns (name, fatbin path, ptxas log).
fn compile(nvcc: &Path, src: &Path, out_dir: &Path) -> Result<(String, PathBuf, String), String> {
    let name = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("kernel file name {} is not UTF-8", src.display()))?
        .to_string();
    let out = out_dir.join(format!("{name}.fatbin"));
    let log_path = out_dir.join(format!("{name}.ptxas.log"));
    // The script reruns on any change under kernels/: recompile only what is stale.
    if let (Some(built), Ok(log)) = (mtime(&out), std::fs::read_to_string(&log_path)) {
        let newest_input = std::fs::read_dir(src.parent().unwrap_or(Path::new(".")))
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p == src || p.extension().is_some_and(|e| e == "h" || e == "cuh"))
                    .filter_map(|p| mtime(&p))
                    .max()
            })
            .ok()
            .flatten()
            .max(mtime(Path::new("build.rs")));
        if newest_input.is_some_and(|t| t < built) {
            return Ok((name, out, log));
        }
    }
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .args(["-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v"])
        .arg("-I")
        .arg(src.parent().unwrap_or(Path::new(".")));
    for (arch, code) in GENCODES {
        cmd.arg("-gencode").arg(format!("arch={arch},code={code}"));
    }
    cmd.arg("-o").arg(&out).arg(src);
    let output = cmd
        .output()
        .map_err(|e| format!("fora: cannot run {}: {e}", nvcc.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(format!(
            "fora: nvcc failed on {} ({}):\n{log}\n(set FORA_SKIP_KERNELS=1 to build without kernels)",
            src.display(),
            output.status
        ));
    }
    std::fs::write(&log_path, &log)
        .map_err(|e| format!("fora: write {}: {e}", log_path.display()))?;
    Ok((name, out, log))
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Functions whose ptxas report shows a stack frame or spills, as "function (arch): line".
fn spilling_functions(log: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut current = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = rest.trim().to_string();
        } else if line.contains("bytes stack frame") {
            let nonzero = line
                .split(',')
                .filter_map(|part| part.split_whitespace().next())
                .filter_map(|n| n.parse::<u64>().ok())
                .any(|n| n > 0);
            if nonzero {
                bad.push(format!("{current}: {}", line.trim()));
            }
        }
    }
    bad
}

/// The kernels a module defines, from ptxas's "Compiling entry function 'NAME'" lines, so that
/// a kernel is looked up only in its own module (a failed cuModuleGetFunction in another module
/// would be an API error under compute-sanitizer).
fn entry_functions(log: &str) -> Vec<String> {
    let mut names: Vec<String> = log
        .lines()
        .filter_map(|l| l.split("Compiling entry function '").nth(1))
        .filter_map(|rest| rest.split('\'').next())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn write_kernels_rs(
    out_dir: &Path,
    modules: &[(String, PathBuf, Vec<String>)],
    version: &str,
    missing: &str,
) {
    let mut s = String::from("// Generated by build.rs: the embedded kernel fatbins.\n");
    s.push_str("/// (module name, fatbin bytes, its kernels), one per kernels/*.cu.\n");
    s.push_str("pub const MODULES: &[(&str, &[u8], &[&str])] = &[\n");
    for (name, path, kernels) in modules {
        let _ = writeln!(
            s,
            "    ({name:?}, include_bytes!({:?}), &{kernels:?}),",
            path.display().to_string()
        );
    }
    s.push_str("];\n");
    s.push_str(
        "/// Architectures every module carries (SASS, and PTX for the compute_ entries).\n",
    );
    s.push_str("pub const ARCHS: &[&str] = &[");
    if !modules.is_empty() {
        for (_, code) in GENCODES {
            let _ = write!(s, "{code:?}, ");
        }
    }
    s.push_str("];\n");
    let _ = writeln!(s, "/// The nvcc that built them (empty without kernels).\npub const NVCC_VERSION: &str = {version:?};");
    let _ = writeln!(s, "/// Why there are no kernels (empty when there are).\npub const MISSING_REASON: &str = {missing:?};");
    std::fs::write(out_dir.join("kernels.rs"), s).expect("write kernels.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Ok(p) = std::env::var("NVCC") {
        if !p.is_empty() {
            return match exe(PathBuf::from(&p)) {
                Some(p) => Some(p),
                None => {
                    println!("cargo:warning=fora: NVCC={p} is not a file; looking elsewhere");
                    None
                }
            }
            .or_else(find_nvcc_elsewhere);
        }
    }
    find_nvcc_elsewhere()
}

fn find_nvcc_elsewhere() -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if let Some(p) = exe(dir.join("nvcc")) {
                return Some(p);
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            if let Some(p) = exe(Path::new(&home).join("bin/nvcc")) {
                return Some(p);
            }
        }
    }
    if let Some(p) = exe(PathBuf::from("/usr/local/cuda/bin/nvcc")) {
        return Some(p);
    }
    // The pip wheels (nvidia-cuda-nvcc): site-packages/nvidia/cu13/bin/nvcc.
    for python in ["python3", "python"] {
        let out = Command::new(python)
            .args([
                "-c",
                "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))",
            ])
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                let site = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if let Some(p) = exe(Path::new(&site).join("nvidia/cu13/bin/nvcc")) {
                    return Some(p);
                }
            }
        }
    }
    None
}

// ---- bindings ------------------------------------------------------------------------------

/// kernels/params.h -> OUT_DIR/params_bindings.rs (empty when libclang is unavailable, which
/// tests/bindings.rs reports as a skip). Every struct gets a `DeviceRepr` impl appended, so a
/// struct added to params.h needs no hand-written Rust.
fn bindings(kernel_dir: &Path, out_dir: &Path) {
    let header = kernel_dir.join("params.h");
    let target = out_dir.join("params_bindings.rs");
    let header_str = header.display().to_string();
    // bindgen panics when it cannot load libclang; that must not break a CPU-only build.
    let generated = std::panic::catch_unwind(move || {
        bindgen::Builder::default()
            .header(header_str)
            .allowlist_file(".*params\\.h")
            .derive_default(true)
            .derive_copy(true)
            .derive_debug(true)
            .prepend_enum_name(false)
            .layout_tests(true)
            .formatter(bindgen::Formatter::Prettyplease)
            .generate()
            .map(|b| b.to_string())
    });
    let text = match generated {
        Ok(Ok(text)) => with_device_repr(&text),
        Ok(Err(e)) => {
            println!("cargo:warning=fora: bindgen failed on kernels/params.h: {e}; using the committed src/cuda/params_bindings.rs");
            String::new()
        }
        Err(_) => {
            println!("cargo:warning=fora: libclang not available; using the committed src/cuda/params_bindings.rs unchecked");
            String::new()
        }
    };
    std::fs::write(&target, &text).expect("write params_bindings.rs");
    if let Ok(dest) = std::env::var("FORA_WRITE_BINDINGS") {
        if !dest.is_empty() {
            if text.is_empty() {
                panic!("fora: FORA_WRITE_BINDINGS is set but bindgen could not run (libclang missing?)");
            }
            std::fs::write(&dest, &text)
                .unwrap_or_else(|e| panic!("fora: cannot write bindings to {dest}: {e}"));
        }
    }
}

fn with_device_repr(text: &str) -> String {
    let mut out = String::from(
        "// Generated from kernels/params.h by build.rs (bindgen); refresh with tools/update_bindings.sh.\n",
    );
    out.push_str(text);
    out.push_str(
        "\n// Plain C structs of integers and device addresses: valid kernel arguments by value.\n",
    );
    for line in text.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("pub struct ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let _ = writeln!(
                out,
                "unsafe impl cudarc::driver::DeviceRepr for {name} {{}}"
            );
        }
    }
    out
}
