//! Launcher of the Hopper instruction probes (`kernels/probe_sm90.cu`): two wgmma k-steps on small
//! row-major inputs, in the operand forms and shared-memory layouts the sm_90a kernels rely on
//! (or may rely on next), so that a device run says which assumption holds
//! ([`WgmmaProbeMode`]). Tests only: nothing in the model launches it.

use super::device::{check_ptr, ensure_hopper, KernelLauncher, TmaTensor2d};
use super::params::{TmaProbeParams, WgmmaProbeParams};
use anyhow::{ensure, Context, Result};

/// Which form of wgmma [`wgmma_probe`] runs (the `mode` of `WgmmaProbeParams`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaProbeMode {
    /// A from registers, B K-major 128-byte swizzled: the flash-attention kernel's form.
    RegistersKMajor,
    /// A and B from shared memory, both K-major: the wgmma GEMM's form (n = 128 only).
    SharedKMajor,
    /// A from registers, B MN-major (transpose-B bit) 128-byte swizzled.
    RegistersMnMajor,
}

impl WgmmaProbeMode {
    /// Every mode, in the probe's order.
    pub const ALL: [WgmmaProbeMode; 3] = [
        WgmmaProbeMode::RegistersKMajor,
        WgmmaProbeMode::SharedKMajor,
        WgmmaProbeMode::RegistersMnMajor,
    ];

    fn raw(self) -> i32 {
        match self {
            WgmmaProbeMode::RegistersKMajor => 0,
            WgmmaProbeMode::SharedKMajor => 1,
            WgmmaProbeMode::RegistersMnMajor => 2,
        }
    }

    /// The widths n the probe runs in this mode.
    pub fn widths(self) -> &'static [i32] {
        match self {
            WgmmaProbeMode::SharedKMajor => &[128],
            _ => &[64, 72, 128],
        }
    }
}

/// Dynamic shared memory of `wgmma_probe`: B and A regions, + 1 KiB of alignment.
const PROBE_SMEM: u32 = 25 * 1024;

/// `d[64, n] = a[64, 32] @ bt[n, 32]^T` (f32 out) by two wgmmas (k-steps) of `mode`, on a
/// Hopper GPU: `a` bf16 `[64, 32]`, `bt` bf16 `[n, 32]`, `d` f32 `[64, n]` (device addresses).
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn wgmma_probe(
    gpu: &impl KernelLauncher,
    mode: WgmmaProbeMode,
    n: i32,
    a: u64,
    bt: u64,
    d: u64,
) -> Result<()> {
    const K: &str = "wgmma_probe";
    ensure_hopper(gpu, &format!("{K}: wgmma"), "")?;
    ensure!(
        mode.widths().contains(&n),
        "{K}: n must be one of {:?} in mode {mode:?}, got {n}",
        mode.widths()
    );
    check_ptr(K, "a", a, 4)?;
    check_ptr(K, "bt", bt, 2)?;
    check_ptr(K, "d", d, 4)?;
    let p = WgmmaProbeParams {
        a,
        bt,
        d,
        n,
        mode: mode.raw(),
    };
    gpu.allow_dynamic_shared_memory(K, PROBE_SMEM)?;
    // SAFETY: the kernel reads 64 x 32 bf16 at a, n x 32 at bt and writes 64 x n f32 at d, the
    // buffers the caller passes; one warpgroup.
    unsafe { gpu.launch_kernel(K, (1, 1, 1), (128, 1, 1), PROBE_SMEM, &p) }
        .with_context(|| format!("{K}: launch in mode {mode:?} with n = {n} failed"))
}

/// Launches the TMA probe kernel `name` on `grid_x` CTAs of one warpgroup with `smem` bytes of
/// dynamic shared memory: the tensor map of `tensor` and the two boxes' coordinates as its
/// params, after checking the device and `out`.
fn launch_tma_probe(
    gpu: &impl KernelLauncher,
    name: &str,
    (grid_x, smem): (u32, u32),
    tensor: &TmaTensor2d,
    boxes: [(i32, i32); 2],
    out: u64,
) -> Result<()> {
    ensure_hopper(gpu, &format!("{name}: TMA"), "")?;
    check_ptr(name, "out", out, 2)?;
    let map = gpu
        .tma_descriptor_2d(tensor)
        .with_context(|| format!("{name}: the tensor map"))?;
    let p = TmaProbeParams {
        map,
        out,
        x0: boxes[0].0,
        y0: boxes[0].1,
        x1: boxes[1].0,
        y1: boxes[1].1,
        box_rows: tensor.box_rows as i32,
    };
    gpu.allow_dynamic_shared_memory(name, smem)?;
    // SAFETY: the kernel reads the tensor the map describes (validated) and writes grid_x x 2 x
    // box_rows x 64 bf16 at out, the buffer the caller sized for it; grid_x is the kernel's
    // cluster (1 or its __cluster_dims__ 2), one warpgroup a CTA.
    unsafe { gpu.launch_kernel(name, (grid_x, 1, 1), (128, 1, 1), smem, &p) }
        .with_context(|| format!("{name}: launch of {tensor:?} at {boxes:?} failed"))
}

/// `tma_probe`: loads the box of `tensor` (a bf16 tensor map, 128-byte swizzle) at `boxes[0]`
/// and then at `boxes[1]` ((innermost, row) coordinates; past the edges reads zeros) into the
/// same 1024-byte-aligned shared memory through one mbarrier's phases 0 and 1, and writes the
/// shared bytes after each to `out` (bf16 `[2][box_rows * 64]`, device address), on a Hopper
/// GPU or the emulator.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn tma_probe(
    gpu: &impl KernelLauncher,
    tensor: &TmaTensor2d,
    boxes: [(i32, i32); 2],
    out: u64,
) -> Result<()> {
    // The box, the 8-byte barrier after it, 1 KiB for the alignment.
    let smem = tensor.box_rows * 128 + 8 + 1024;
    launch_tma_probe(gpu, "tma_probe", (1, smem), tensor, boxes, out)
}

/// `tma_cluster_probe`: one cluster of two CTAs; CTA r multicasts the box of `tensor` at
/// `boxes[r]` into slot r of both CTAs' shared memory (one mbarrier each, expecting both boxes),
/// and each writes its two slots to `out` (bf16 `[2 CTAs][2 slots][box_rows * 64]`, device
/// address); then the CTAs relay an arrival through each other's barriers (`mapa`). The
/// primitives of the multicast TMA GEMM, on a Hopper GPU or the emulator.
///
/// # Safety
/// Every device address in the parameters must point to a live allocation of the launching
/// context holding at least what the kernel reads or writes at the given sizes (the
/// parameters' docs say how much); only null and misaligned addresses are refused here.
pub unsafe fn tma_cluster_probe(
    gpu: &impl KernelLauncher,
    tensor: &TmaTensor2d,
    boxes: [(i32, i32); 2],
    out: u64,
) -> Result<()> {
    // Two boxes, two 8-byte barriers, 1 KiB for the alignment.
    let smem = 2 * tensor.box_rows * 128 + 16 + 1024;
    launch_tma_probe(gpu, "tma_cluster_probe", (2, smem), tensor, boxes, out)
}
