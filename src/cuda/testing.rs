//! Helpers for the GPU tests: get a device or skip, compare with the CPU twin, poison outputs,
//! seeded random data. Public so every `tests/gpu_*.rs` shares one implementation.

use super::device::{device_count, dptr, Gpu, KernelLauncher};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::CudaSlice;
use half::bf16;

/// The device for a GPU test, or `None` after printing `SKIP <test>: no CUDA device`.
/// With `FORA_REQUIRE_GPU=1` a missing device panics (the test fails). A device that exists
/// but cannot be used (no kernels in the binary, compute capability < 8.0) always panics: that
/// is a failure, not a skip.
pub fn test_gpu(test: &str) -> Option<Gpu> {
    let require = std::env::var("FORA_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let count = match device_count() {
        Ok(n) => n,
        Err(e) if require => panic!("{test}: FORA_REQUIRE_GPU=1 but the CUDA driver failed: {e:#}"),
        Err(e) => {
            println!("SKIP {test}: no CUDA device ({e:#})");
            return None;
        }
    };
    if count == 0 {
        if require {
            panic!("{test}: FORA_REQUIRE_GPU=1 but there is no CUDA device");
        }
        println!("SKIP {test}: no CUDA device");
        return None;
    }
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => panic!("{test}: a CUDA device exists but cannot be used: {e:#}"),
    }
}

/// Relative L2 error `||out - reference|| / ||reference||` in f64 (absolute when the reference
/// is all zeros). NaN in `out` gives NaN, which fails every `<=` check.
pub fn rel_l2(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(
        out.len(),
        reference.len(),
        "rel_l2: output has {} elements, reference {}",
        out.len(),
        reference.len()
    );
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        let d = o as f64 - r as f64;
        num += d * d;
        den += r as f64 * r as f64;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Checks `out` against `reference`: same length, every element finite, rel-L2 <= `tol`.
/// Prints the error so the test log shows the margin. Returns the rel-L2.
pub fn check_close(what: &str, out: &[f32], reference: &[f32], tol: f64) -> Result<f64> {
    ensure!(
        out.len() == reference.len(),
        "{what}: output has {} elements, reference {}",
        out.len(),
        reference.len()
    );
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        bail!(
            "{what}: element {i} of {} is {} (unwritten or overflowed; reference {})",
            out.len(),
            out[i],
            reference[i]
        );
    }
    let err = rel_l2(out, reference);
    println!(
        "{what}: rel_l2 = {err:.3e} (tol {tol:.0e}, {} elements)",
        out.len()
    );
    ensure!(err <= tol, "{what}: rel_l2 {err:.3e} exceeds {tol:.0e}");
    Ok(err)
}

/// Fills a device buffer with NaN so an element a kernel fails to write fails the test.
pub fn poison_f32(gpu: &Gpu, buf: &mut CudaSlice<f32>) -> Result<()> {
    let nan = vec![f32::NAN; buf.len()];
    gpu.stream()
        .memcpy_htod(&nan, buf)
        .context("cannot poison a device buffer")
}

/// Fills a bf16 device buffer with NaN (0x7FC0).
pub fn poison_bf16(gpu: &Gpu, buf: &mut CudaSlice<bf16>) -> Result<()> {
    let nan = vec![bf16::NAN; buf.len()];
    gpu.stream()
        .memcpy_htod(&nan, buf)
        .context("cannot poison a device buffer")
}

/// What a kernel test body needs of the device it runs on: buffers in, launches (through the
/// same launchers), buffers out. Implemented by [`Gpu`] and by the CPU emulator of
/// `tests/kernel_emulation.rs`, so that one test body checks a kernel on both.
pub trait TestDevice: KernelLauncher {
    /// A buffer of f32.
    type F32: DeviceAddr;
    /// A buffer of bf16.
    type Bf16: DeviceAddr;
    /// A buffer of i32.
    type I32: DeviceAddr;
    /// A new buffer holding `v`.
    fn upload_f32(&self, v: &[f32]) -> Result<Self::F32>;
    /// A new buffer holding `v`.
    fn upload_i32(&self, v: &[i32]) -> Result<Self::I32>;
    /// `v` rounded to bf16.
    fn upload_bf16(&self, v: &[f32]) -> Result<Self::Bf16>;
    /// `n` NaNs, so that an element the kernel fails to write fails the test.
    fn poisoned_f32(&self, n: usize) -> Result<Self::F32>;
    /// `n` NaNs in bf16.
    fn poisoned_bf16(&self, n: usize) -> Result<Self::Bf16>;
    /// Fills `b` with NaN again (before a second launch into it).
    fn poison_f32(&self, b: &mut Self::F32) -> Result<()>;
    /// Fills `b` with bf16 NaN again.
    fn poison_bf16(&self, b: &mut Self::Bf16) -> Result<()>;
    /// Waits for the launches before it.
    fn download_f32(&self, b: &Self::F32) -> Result<Vec<f32>>;
    /// Waits for the launches before it; the values widened to f32.
    fn download_bf16(&self, b: &Self::Bf16) -> Result<Vec<f32>>;
}

/// The address a kernel parameter struct holds for a test buffer.
pub trait DeviceAddr {
    /// The buffer's first byte as a device address.
    fn addr(&self) -> u64;
}

impl<T> DeviceAddr for CudaSlice<T> {
    fn addr(&self) -> u64 {
        dptr(self)
    }
}

impl TestDevice for Gpu {
    type F32 = CudaSlice<f32>;
    type Bf16 = CudaSlice<bf16>;
    type I32 = CudaSlice<i32>;

    fn upload_f32(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.upload(v, "test input")
    }

    fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        self.upload(v, "test input")
    }

    fn upload_bf16(&self, v: &[f32]) -> Result<CudaSlice<bf16>> {
        self.upload(&to_bf16(v), "test input")
    }

    fn poisoned_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        let mut s = self.alloc_zeros::<f32>(n, "test output")?;
        poison_f32(self, &mut s)?;
        Ok(s)
    }

    fn poisoned_bf16(&self, n: usize) -> Result<CudaSlice<bf16>> {
        let mut s = self.alloc_zeros::<bf16>(n, "test output")?;
        poison_bf16(self, &mut s)?;
        Ok(s)
    }

    fn poison_f32(&self, b: &mut CudaSlice<f32>) -> Result<()> {
        poison_f32(self, b)
    }

    fn poison_bf16(&self, b: &mut CudaSlice<bf16>) -> Result<()> {
        poison_bf16(self, b)
    }

    fn download_f32(&self, b: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.download(b)
    }

    fn download_bf16(&self, b: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        Ok(from_bf16(&self.download(b)?))
    }
}

pub use super::device::to_bf16;

/// bf16 -> f32.
pub fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// The f32 values a bf16 buffer made from `v` holds: the CPU twin's inputs.
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// GELU, tanh form, in f64: the reference of the GEMM epilogues' GELU.
pub fn gelu_tanh_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh())
}

/// A @ W^T + bias in f64 (`a` `[m, k]` and `w` `[n, k]` row-major, `bias` `[n]`), row-major `[m, n]`:
/// the reference of the kernels that compute a Linear (parallel over the rows).
pub fn biased_product(
    a: &[f32],
    w: &[f32],
    bias: &[f32],
    (m, n, k): (usize, usize, usize),
) -> Vec<f64> {
    use rayon::prelude::*;
    assert!(a.len() >= m * k && w.len() >= n * k && bias.len() >= n);
    (0..m)
        .into_par_iter()
        .flat_map_iter(|r| {
            let a = &a[r * k..(r + 1) * k];
            (0..n).map(move |c| {
                let w = &w[c * k..(c + 1) * k];
                a.iter()
                    .zip(w)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum::<f64>()
                    + bias[c] as f64
            })
        })
        .collect()
}

/// A small seeded generator (SplitMix64) for test data: reproducible, no dependency.
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    /// A generator whose sequence `seed` fixes.
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    /// The next 64 random bits (SplitMix64).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit() as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }

    /// `n` values uniform in [lo, hi).
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    /// `n` normals scaled by `std`.
    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}
