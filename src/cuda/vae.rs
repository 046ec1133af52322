//! The VAE decoder ([`crate::vae`]) on the GPU: activations f32 channels-last
//! `[pixels, C]`, each convolution an unfold (`vae_unfold`, bf16, the nearest 2x upsampling read
//! through it) and a cuBLASLt GEMM with its bias (f32 accumulation, f32 output), GroupNorm +
//! SiLU in three small kernels (f64 sums), the mid block's attention as cuBLASLt products around
//! `vae_softmax`. One image at a time; `post_quant_conv` (16 values a pixel) runs on the host
//! in f32, exactly as the CPU decoder. bf16 operands make it agree with the f32 CPU decoder to
//! about 1e-2 (`tests/gpu_vae.rs`).
//!
//! The decoder is written over [`VaeDevice`] (buffers, kernel launches, GEMMs): [`CudaVae`] is
//! it on a GPU with cuBLASLt; the tests also run it whole on the CPU emulator of the kernels
//! with a plain GEMM (`tests/kernel_emulation.rs`), which checks every buffer, offset and
//! padding of this file without a GPU.

use super::cublaslt::{CublasLt, LtEpilogue, LtMatmul, LtOutput, LtRun};
use super::device::{check_positive, check_ptr, grid_x, to_bf16, Gpu, KernelLauncher};
use super::params::{VaeElementwiseParams, VaeGroupNormParams, VaeSoftmaxParams, VaeUnfoldParams};
use super::testing::DeviceAddr;
use crate::vae::{Attention, Conv, Norm, Resnet, VaeDecoder, GROUP_NORM_EPS};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::CudaSlice;
use half::bf16;
use std::sync::Arc;

const THREADS: u32 = 256;
/// Grid-stride kernels launch at most this many blocks (each then loops).
const MAX_BLOCKS: i64 = 1 << 16;
/// At most this many pixel chunks a GroupNorm's statistics: blocks enough to fill a GPU at
/// one image ...
const STAT_CHUNKS: usize = 64;
/// ... and at least this many pixels a chunk.
const STAT_CHUNK_PIXELS: usize = 32;
/// Elements of the unfold scratch (bf16): a convolution unfolds this many at a time (64 MiB).
const UNFOLD_ELEMENTS: usize = 1 << 25;

fn round8(v: usize) -> usize {
    v.div_ceil(8) * 8
}

fn blocks(kernel: &str, items: i64) -> Result<u32> {
    Ok(grid_x(kernel, items, THREADS as i64)?.min(MAX_BLOCKS as u32))
}

/// Validates `p` and returns the grid of [`vae_unfold`].
pub fn vae_unfold_plan(p: &VaeUnfoldParams) -> Result<(u32, u32, u32)> {
    const K: &str = "vae_unfold";
    check_ptr(K, "x", p.x, 4)?;
    check_ptr(K, "cols", p.cols, 16)?;
    for (f, v) in [
        ("images", p.images),
        ("height", p.height),
        ("width", p.width),
        ("channels", p.channels),
    ] {
        check_positive(K, f, v as i64)?;
    }
    ensure!(
        p.kernel == 1 || p.kernel == 3,
        "{K}: kernel {} is neither 1 nor 3",
        p.kernel
    );
    ensure!(
        p.upsample == 0 || (p.height % 2 == 0 && p.width % 2 == 0),
        "{K}: upsampling to {} x {} needs even sizes",
        p.height,
        p.width
    );
    let used = p.kernel as i64 * p.kernel as i64 * p.channels as i64;
    ensure!(
        p.ldc as i64 >= used && p.ldc % 8 == 0,
        "{K}: ldc {} must be a multiple of 8 and at least {used}",
        p.ldc
    );
    let all = p.images as i64 * p.height as i64 * p.width as i64;
    ensure!(
        p.first >= 0 && p.pixels > 0 && p.first + p.pixels <= all,
        "{K}: pixels {}..{} outside the {all} of the images",
        p.first,
        p.first + p.pixels
    );
    Ok((blocks(K, p.pixels * p.ldc as i64)?, 1, 1))
}

/// `cols = unfold(x)` (see `VaeUnfoldParams` in kernels/params.h).
///
/// # Safety
/// Every device address in `p` must point to a live allocation of the launching context
/// holding what the kernel reads or writes at the given sizes.
pub unsafe fn vae_unfold<L: KernelLauncher>(gpu: &L, p: &VaeUnfoldParams) -> Result<()> {
    let grid = vae_unfold_plan(p)?;
    // SAFETY: validated above; the caller vouches for the allocations.
    unsafe { gpu.launch_kernel("vae_unfold", grid, (THREADS, 1, 1), 0, p) }
}

/// Validates `p` for kernel `name` (`vae_cast_bf16` or `vae_add`) and returns its grid.
pub fn vae_elementwise_plan(name: &str, p: &VaeElementwiseParams) -> Result<(u32, u32, u32)> {
    ensure!(
        name == "vae_cast_bf16" || name == "vae_add",
        "{name}: not an elementwise VAE kernel"
    );
    check_ptr(name, "x", p.x, 4)?;
    check_ptr(name, "y", p.y, if name == "vae_add" { 4 } else { 2 })?;
    check_positive(name, "n", p.n)?;
    Ok((blocks(name, p.n)?, 1, 1))
}

/// `vae_cast_bf16` (y = bf16(x)) or `vae_add` (y += x) over `p.n` elements.
///
/// # Safety
/// As [`vae_unfold`].
pub unsafe fn vae_elementwise<L: KernelLauncher>(
    gpu: &L,
    name: &str,
    p: &VaeElementwiseParams,
) -> Result<()> {
    let grid = vae_elementwise_plan(name, p)?;
    // SAFETY: validated above; the caller vouches for the allocations.
    unsafe { gpu.launch_kernel(name, grid, (THREADS, 1, 1), 0, p) }
}

/// Validates `p` for the three GroupNorm kernels.
pub fn vae_group_norm_plan(p: &VaeGroupNormParams) -> Result<()> {
    const K: &str = "vae_group_norm";
    for (f, v, align) in [
        ("x", p.x, 4),
        ("y", p.y, 4),
        ("partials", p.partials, 8),
        ("stats", p.stats, 4),
        ("weight", p.weight, 4),
        ("bias", p.bias, 4),
    ] {
        check_ptr(K, f, v, align)?;
    }
    check_positive(K, "pixels", p.pixels)?;
    for (f, v) in [
        ("images", p.images),
        ("channels", p.channels),
        ("groups", p.groups),
        ("chunks", p.chunks),
    ] {
        check_positive(K, f, v as i64)?;
    }
    let c = p.channels;
    ensure!(
        c % p.groups == 0,
        "{K}: {} groups do not divide {c} channels",
        p.groups
    );
    ensure!(
        (c % THREADS as i32 == 0 && c <= 4 * THREADS as i32) || THREADS as i32 % c == 0,
        "{K}: {c} channels: the statistics kernel takes a divisor of {THREADS} or a multiple of \
         it up to {}",
        4 * THREADS
    );
    ensure!(
        p.eps.is_finite() && p.eps > 0.0,
        "{K}: eps {} must be > 0",
        p.eps
    );
    Ok(())
}

/// GroupNorm (+ SiLU with `p.silu`) of `p.x` into `p.y`: statistics, their reduction, then
/// every element (see `VaeGroupNormParams`).
///
/// # Safety
/// As [`vae_unfold`].
pub unsafe fn vae_group_norm<L: KernelLauncher>(gpu: &L, p: &VaeGroupNormParams) -> Result<()> {
    vae_group_norm_plan(p)?;
    let block = (THREADS, 1, 1);
    let total = p.pixels * p.channels as i64 * p.images as i64;
    // SAFETY: validated above; the caller vouches for the allocations.
    unsafe {
        gpu.launch_kernel(
            "vae_group_stats",
            (p.chunks as u32, p.images as u32, 1),
            block,
            0,
            p,
        )?;
        gpu.launch_kernel("vae_group_finalize", (p.images as u32, 1, 1), block, 0, p)?;
        gpu.launch_kernel(
            "vae_group_apply",
            (blocks("vae_group_apply", total)?, 1, 1),
            block,
            0,
            p,
        )
    }
}

/// Validates `p` and returns the grid of [`vae_softmax`].
pub fn vae_softmax_plan(p: &VaeSoftmaxParams) -> Result<(u32, u32, u32)> {
    const K: &str = "vae_softmax";
    check_ptr(K, "scores", p.scores, 4)?;
    check_ptr(K, "probs", p.probs, 2)?;
    check_positive(K, "rows", p.rows)?;
    check_positive(K, "cols", p.cols as i64)?;
    ensure!(p.ld >= p.cols, "{K}: ld {} < cols {}", p.ld, p.cols);
    ensure!(p.scale.is_finite(), "{K}: scale is not finite");
    Ok((grid_x(K, p.rows, 1)?, 1, 1))
}

/// Row-wise softmax (see `VaeSoftmaxParams`).
///
/// # Safety
/// As [`vae_unfold`].
pub unsafe fn vae_softmax<L: KernelLauncher>(gpu: &L, p: &VaeSoftmaxParams) -> Result<()> {
    let grid = vae_softmax_plan(p)?;
    // SAFETY: validated above; the caller vouches for the allocations.
    unsafe { gpu.launch_kernel("vae_softmax", grid, (THREADS, 1, 1), 0, p) }
}

/// What the decoder needs of a device: buffers, the kernels of kernels/vae.cu, and GEMMs of
/// cuBLASLt's contract (bf16 operands, f32 output, no batch).
pub trait VaeDevice {
    /// What launches the kernels.
    type Launcher: KernelLauncher;
    /// A buffer of f32.
    type F32: DeviceAddr;
    /// A buffer of bf16.
    type Bf16: DeviceAddr;
    /// The kernel launcher.
    fn launcher(&self) -> &Self::Launcher;
    /// A new buffer holding `v`.
    fn upload_f32(&self, v: &[f32], what: &str) -> Result<Self::F32>;
    /// A new buffer holding `v`.
    fn upload_bf16(&self, v: &[bf16], what: &str) -> Result<Self::Bf16>;
    /// `n` zeros.
    fn zeros_f32(&self, n: usize, what: &str) -> Result<Self::F32>;
    /// `n` zeros.
    fn zeros_bf16(&self, n: usize, what: &str) -> Result<Self::Bf16>;
    /// The first `n` values of `b`, once the work before has finished.
    fn download_f32(&self, b: &Self::F32, n: usize) -> Result<Vec<f32>>;
    /// `mm` (output f32, epilogue none or f32 bias, no batch), or an error naming `what`.
    fn matmul(&self, mm: &LtMatmul, what: &str) -> Result<()>;
}

/// A GPU with a cuBLASLt handle: the [`VaeDevice`] of [`CudaVae`].
pub struct CudaVaeDevice {
    gpu: Gpu,
    lt: CublasLt,
}

impl CudaVaeDevice {
    /// `gpu` (the decoder's work runs on its stream: a handle of its own, e.g. a
    /// [`Gpu::fork`] of the sampler's) with cuBLASLt on it.
    pub fn new(gpu: Gpu) -> Result<CudaVaeDevice> {
        let lt = CublasLt::new(&gpu)?;
        Ok(CudaVaeDevice { gpu, lt })
    }
}

impl VaeDevice for CudaVaeDevice {
    type Launcher = Gpu;
    type F32 = CudaSlice<f32>;
    type Bf16 = CudaSlice<bf16>;

    fn launcher(&self) -> &Gpu {
        &self.gpu
    }

    fn upload_f32(&self, v: &[f32], what: &str) -> Result<CudaSlice<f32>> {
        self.gpu.upload(v, what)
    }

    fn upload_bf16(&self, v: &[bf16], what: &str) -> Result<CudaSlice<bf16>> {
        self.gpu.upload(v, what)
    }

    fn zeros_f32(&self, n: usize, what: &str) -> Result<CudaSlice<f32>> {
        self.gpu.alloc_zeros(n, what)
    }

    fn zeros_bf16(&self, n: usize, what: &str) -> Result<CudaSlice<bf16>> {
        self.gpu.alloc_zeros(n, what)
    }

    fn download_f32(&self, b: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut host = vec![0f32; n];
        self.gpu
            .stream()
            .memcpy_dtoh(&b.slice(0..n), &mut host)
            .context("copying a decoded image to the host")?;
        self.gpu.synchronize()?;
        Ok(host)
    }

    fn matmul(&self, mm: &LtMatmul, what: &str) -> Result<()> {
        // SAFETY: the decoder passes its own buffers, sized for these shapes.
        match unsafe { self.lt.matmul(mm) }.with_context(|| what.to_string())? {
            LtRun::Done => Ok(()),
            LtRun::Unsupported => bail!(
                "{what}: cuBLASLt has no algorithm for m={} n={} k={} on this device",
                mm.m,
                mm.n,
                mm.k
            ),
        }
    }
}

/// The decoder on a GPU.
pub type CudaVae = GpuVae<CudaVaeDevice>;

impl CudaVae {
    /// Uploads `vae`'s weights to `gpu`'s device (a stream and cuBLASLt handle of its own).
    pub fn on_gpu(gpu: Gpu, vae: Arc<VaeDecoder>) -> Result<CudaVae> {
        GpuVae::new(CudaVaeDevice::new(gpu)?, vae)
    }
}

/// The weights of [`vae_unfold_weight`]'s order on the device.
struct GpuConv<D: VaeDevice> {
    /// bf16 `[cout_pad, ldk]`: columns (ky, kx, ci), zeros past k k cin.
    weight: D::Bf16,
    /// f32 `[cout_pad]`, zeros past cout.
    bias: D::F32,
    cin: usize,
    cout_pad: usize,
    k: usize,
    ldk: usize,
}

/// A conv weight `[cout, cin, k, k]` as the GEMM's `[cout_pad, ldk]`: row co, column
/// (ky, kx, ci) (the unfold's order), zero rows past cout and zero columns past k k cin.
pub fn vae_unfold_weight(w: &[f32], cout: usize, cin: usize, k: usize) -> (Vec<f32>, usize, usize) {
    let (cout_pad, ldk) = (round8(cout), round8(k * k * cin));
    let mut out = vec![0f32; cout_pad * ldk];
    for co in 0..cout {
        for ci in 0..cin {
            for tap in 0..k * k {
                out[co * ldk + tap * cin + ci] = w[(co * cin + ci) * k * k + tap];
            }
        }
    }
    (out, cout_pad, ldk)
}

struct GpuNorm<D: VaeDevice> {
    weight: D::F32,
    bias: D::F32,
}

struct GpuResnet<D: VaeDevice> {
    norm1: GpuNorm<D>,
    conv1: GpuConv<D>,
    norm2: GpuNorm<D>,
    conv2: GpuConv<D>,
    shortcut: Option<GpuConv<D>>,
}

struct GpuAttention<D: VaeDevice> {
    norm: GpuNorm<D>,
    /// q and k stacked, bf16 `[2C, C]`, bias f32 `[2C]`.
    qk_weight: D::Bf16,
    qk_bias: D::F32,
    /// v, bf16 `[C, C]` (its bias joins the output: softmax rows sum to 1).
    v_weight: D::Bf16,
    v_bias: D::F32,
    out_weight: D::Bf16,
    out_bias: D::F32,
}

struct GpuUpBlock<D: VaeDevice> {
    resnets: Vec<GpuResnet<D>>,
    upsampler: Option<GpuConv<D>>,
}

/// The decoder's weights on a [`VaeDevice`].
pub struct GpuVae<D: VaeDevice> {
    dev: D,
    host: Arc<VaeDecoder>,
    conv_in: GpuConv<D>,
    mid: [GpuResnet<D>; 2],
    attention: Option<GpuAttention<D>>,
    up_blocks: Vec<GpuUpBlock<D>>,
    norm_out: GpuNorm<D>,
    conv_out: GpuConv<D>,
}

/// Device buffers of one decode, sized for its largest activation.
struct Scratch<D: VaeDevice> {
    /// Activations f32 `[pixels, C]`, four of the largest.
    act: [D::F32; 4],
    cols: D::Bf16,
    /// Elements of `cols`.
    cols_len: usize,
    /// GroupNorm's f64 sums, in an f32 buffer of twice their count.
    partials: D::F32,
    stats: D::F32,
    /// The attention's v^T f32 `[C, t8]`: columns past the t tokens are never written and stay
    /// zero, so the padded product with the probabilities (zero there too) adds nothing.
    vt: Option<D::F32>,
}

impl<D: VaeDevice> GpuVae<D> {
    /// Uploads `vae`'s weights to `dev`.
    pub fn new(dev: D, vae: Arc<VaeDecoder>) -> Result<GpuVae<D>> {
        let cfg = vae.config();
        // What the kernels and GEMMs take is refused here, before any sampling it would
        // follow: GEMM rows of whole 16-byte vectors, and widths the GroupNorm statistics
        // kernel splits over its threads.
        let threads = THREADS as usize;
        for &c in &cfg.block_channels {
            ensure!(
                c.is_multiple_of(8)
                    && (threads.is_multiple_of(c)
                        || (c.is_multiple_of(threads) && c <= 4 * threads)),
                "the GPU VAE decoder takes widths that are multiples of 8 and divisors of \
                 {threads} or multiples of it up to {}, got {:?}",
                4 * threads,
                cfg.block_channels
            );
        }
        let gpu = &dev;
        let conv = |c: &Conv| -> Result<GpuConv<D>> {
            let (w, cout_pad, ldk) = vae_unfold_weight(&c.weight, c.cout, c.cin, c.k);
            let mut bias = c.bias.clone();
            bias.resize(cout_pad, 0.0);
            Ok(GpuConv {
                weight: gpu.upload_bf16(&to_bf16(&w), "a VAE conv weight")?,
                bias: gpu.upload_f32(&bias, "a VAE conv bias")?,
                cin: c.cin,
                cout_pad,
                k: c.k,
                ldk,
            })
        };
        let norm = |n: &Norm| -> Result<GpuNorm<D>> {
            Ok(GpuNorm {
                weight: gpu.upload_f32(&n.weight, "a VAE norm weight")?,
                bias: gpu.upload_f32(&n.bias, "a VAE norm bias")?,
            })
        };
        let resnet = |r: &Resnet| -> Result<GpuResnet<D>> {
            Ok(GpuResnet {
                norm1: norm(&r.norm1)?,
                conv1: conv(&r.conv1)?,
                norm2: norm(&r.norm2)?,
                conv2: conv(&r.conv2)?,
                shortcut: r.shortcut.as_ref().map(conv).transpose()?,
            })
        };
        let attention = |a: &Attention| -> Result<GpuAttention<D>> {
            let c = a.out_bias.len();
            let w = &a.qkv_weight;
            Ok(GpuAttention {
                norm: norm(&a.norm)?,
                qk_weight: gpu.upload_bf16(&to_bf16(&w[..2 * c * c]), "VAE q, k weights")?,
                qk_bias: gpu.upload_f32(&a.qkv_bias[..2 * c], "VAE q, k biases")?,
                v_weight: gpu.upload_bf16(&to_bf16(&w[2 * c * c..]), "VAE v weight")?,
                v_bias: gpu.upload_f32(&a.qkv_bias[2 * c..], "VAE v bias")?,
                out_weight: gpu.upload_bf16(&to_bf16(&a.out_weight), "VAE attention weight")?,
                out_bias: gpu.upload_f32(&a.out_bias, "VAE attention output bias")?,
            })
        };
        let up_blocks = vae
            .up_blocks
            .iter()
            .map(|b| {
                Ok(GpuUpBlock {
                    resnets: b.resnets.iter().map(resnet).collect::<Result<_>>()?,
                    upsampler: b.upsampler.as_ref().map(conv).transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        let (conv_in, conv_out) = (conv(&vae.conv_in)?, conv(&vae.conv_out)?);
        let mid = [resnet(&vae.mid_resnets[0])?, resnet(&vae.mid_resnets[1])?];
        let attention = vae.mid_attention.as_ref().map(attention).transpose()?;
        let norm_out = norm(&vae.norm_out)?;
        Ok(GpuVae {
            conv_in,
            mid,
            attention,
            up_blocks,
            norm_out,
            conv_out,
            host: vae,
            dev,
        })
    }

    /// [`VaeDecoder::decode`] on the GPU: latents `[n, c, h, w]` (host, as sampled) to images
    /// `[n, out_channels, h * upscale, w * upscale]` (host).
    pub fn decode(&self, latents: &[f32], shape: [usize; 4]) -> Result<(Vec<f32>, [usize; 4])> {
        let out_shape = self.host.check_latents(latents, shape)?;
        let [_, c, h, w] = shape;
        let scratch = self.scratch(h, w)?;
        let per_image = out_shape[1] * out_shape[2] * out_shape[3];
        let mut images = crate::weights::zeros("decoded images", &out_shape)?;
        for (z, out) in latents
            .chunks_exact(c * h * w)
            .zip(images.chunks_exact_mut(per_image))
        {
            self.decode_one(z, h, w, &scratch, out)?;
        }
        Ok((images, out_shape))
    }

    fn scratch(&self, h: usize, w: usize) -> Result<Scratch<D>> {
        let cfg = self.host.config();
        // Walk the decoder's convolutions: the largest activation (every width at every size
        // it runs at; an upsampler's conv runs at the doubled size, padded outputs included)
        // and the largest unfold (pixels x the padded k k cin).
        let mut size = h * w;
        let mut width = cfg.block_channels[0];
        let mut most = size * width;
        let mut unfold = size * round8(9 * cfg.latent_channels.max(width));
        for (i, &out) in cfg.block_channels.iter().enumerate() {
            most = most.max(size * width.max(out));
            unfold = unfold.max(size * round8(9 * width.max(out)));
            width = out;
            if i + 1 < cfg.block_channels.len() {
                size *= 4;
                most = most.max(size * width);
                unfold = unfold.max(size * round8(9 * width));
            }
        }
        most = most.max(size * self.conv_out.cout_pad);
        let (t, c) = (h * w, cfg.block_channels[0]);
        let t8 = round8(t);
        if self.attention.is_some() {
            // In floats (a bf16 is half of one), as `attention` lays them out: normed tokens
            // f32 + bf16; q k f32 + bf16, then v^T bf16; scores f32 + probabilities bf16.
            most = most
                .max(t * c + (t * c).div_ceil(2))
                .max(3 * t * c + (c * t8).div_ceil(2))
                .max(t * t8 + (t * t8).div_ceil(2));
        }
        let dev = &self.dev;
        let act = || dev.zeros_f32(most, "VAE activations");
        let cols_len = unfold.min(UNFOLD_ELEMENTS);
        Ok(Scratch {
            act: [act()?, act()?, act()?, act()?],
            cols: dev.zeros_bf16(cols_len, "VAE unfold scratch")?,
            cols_len,
            partials: dev.zeros_f32(STAT_CHUNKS * cfg.groups * 4, "GroupNorm sums")?,
            stats: dev.zeros_f32(cfg.groups * 2, "GroupNorm statistics")?,
            vt: match self.attention {
                Some(_) => Some(dev.zeros_f32(c * t8, "the VAE attention's v^T")?),
                None => None,
            },
        })
    }

    /// `out[pixels, cout_pad] = conv(x[pixels, cin])` at `h x w` (x at half of it with
    /// `upsample`), unfolded a band of pixels at a time.
    fn conv(
        &self,
        conv: &GpuConv<D>,
        x: u64,
        out: u64,
        (h, w): (usize, usize),
        upsample: bool,
        s: &Scratch<D>,
    ) -> Result<()> {
        let pixels = h * w;
        let band = (s.cols_len / conv.ldk).min(pixels);
        ensure!(band > 0, "a VAE conv of {} columns", conv.ldk);
        for first in (0..pixels).step_by(band) {
            let rows = band.min(pixels - first);
            let p = VaeUnfoldParams {
                x,
                cols: s.cols.addr(),
                first: first as i64,
                pixels: rows as i64,
                images: 1,
                height: h as i32,
                width: w as i32,
                channels: conv.cin as i32,
                kernel: conv.k as i32,
                upsample: upsample as i32,
                ldc: conv.ldk as i32,
            };
            // SAFETY: x holds the image's [sh, sw, cin] (an activation buffer or the latent),
            // cols cols_len >= rows * ldk.
            unsafe { vae_unfold(self.dev.launcher(), &p)? };
            let mm = LtMatmul {
                a: s.cols.addr(),
                w: conv.weight.addr(),
                d: out + (first * conv.cout_pad * 4) as u64,
                m: rows,
                n: conv.cout_pad,
                k: conv.ldk,
                lda: conv.ldk,
                ldw: conv.ldk,
                ldd: conv.cout_pad,
                output: LtOutput::F32,
                epilogue: LtEpilogue::Bias(conv.bias.addr()),
                batch: None,
            };
            self.dev.matmul(&mm, "a VAE convolution")?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn group_norm(
        &self,
        norm: &GpuNorm<D>,
        x: u64,
        y: u64,
        channels: usize,
        pixels: usize,
        silu: bool,
        s: &Scratch<D>,
    ) -> Result<()> {
        let p = VaeGroupNormParams {
            x,
            y,
            partials: s.partials.addr(),
            stats: s.stats.addr(),
            weight: norm.weight.addr(),
            bias: norm.bias.addr(),
            pixels: pixels as i64,
            images: 1,
            channels: channels as i32,
            groups: self.host.config().groups as i32,
            chunks: pixels.div_ceil(STAT_CHUNK_PIXELS).clamp(1, STAT_CHUNKS) as i32,
            silu: silu as i32,
            eps: GROUP_NORM_EPS as f32,
        };
        // SAFETY: x and y hold [pixels, channels]; the partials and stats one image's.
        unsafe { vae_group_norm(self.dev.launcher(), &p) }
    }

    fn elementwise(&self, name: &str, x: u64, y: u64, n: usize) -> Result<()> {
        let p = VaeElementwiseParams { x, y, n: n as i64 };
        // SAFETY: the callers pass buffers of at least n elements.
        unsafe { vae_elementwise(self.dev.launcher(), name, &p) }
    }

    /// A resnet from `act[x]` into a free buffer; returns that buffer's index.
    fn resnet(
        &self,
        r: &GpuResnet<D>,
        x: usize,
        (h, w): (usize, usize),
        s: &Scratch<D>,
    ) -> Result<usize> {
        let pixels = h * w;
        let free: Vec<usize> = (0..4).filter(|&i| i != x).collect();
        let a = |i: usize| s.act[i].addr();
        let (t, u, out) = (free[0], free[1], free[2]);
        let cout = r.conv1.cout_pad;
        self.group_norm(&r.norm1, a(x), a(t), r.conv1.cin, pixels, true, s)?;
        self.conv(&r.conv1, a(t), a(u), (h, w), false, s)?;
        self.group_norm(&r.norm2, a(u), a(u), cout, pixels, true, s)?;
        self.conv(&r.conv2, a(u), a(out), (h, w), false, s)?;
        let skip = match &r.shortcut {
            Some(sc) => {
                self.conv(sc, a(x), a(t), (h, w), false, s)?;
                t
            }
            None => x,
        };
        self.elementwise("vae_add", a(skip), a(out), pixels * cout)?;
        Ok(out)
    }

    /// The mid block's attention on `act[x]` `[t, C]` in place.
    fn attention(&self, at: &GpuAttention<D>, x: usize, t: usize, s: &Scratch<D>) -> Result<()> {
        let c = self.host.config().block_channels[0];
        let t8 = round8(t);
        let free: Vec<usize> = (0..4).filter(|&i| i != x).collect();
        let (normed, qk, scores) = (free[0], free[1], free[2]);
        // An address `floats` f32 values into act[i]: the bf16 copies sit after the f32
        // values in the same buffer (Scratch sizes them).
        let a = |i: usize, floats: usize| s.act[i].addr() + (floats * 4) as u64;
        let mm = |a, w, d, (m, n, k), (lda, ldw, ldd), epilogue| LtMatmul {
            a,
            w,
            d,
            m,
            n,
            k,
            lda,
            ldw,
            ldd,
            output: LtOutput::F32,
            epilogue,
            batch: None,
        };
        self.group_norm(&at.norm, a(x, 0), a(normed, 0), c, t, false, s)?;
        // tokens bf16 [t, C] after the f32 ones.
        let tokens = a(normed, t * c);
        self.elementwise("vae_cast_bf16", a(normed, 0), tokens, t * c)?;
        // q, k f32 [t, 2C], then bf16 after them.
        let (qk_f32, qk_bf) = (a(qk, 0), a(qk, 2 * t * c));
        let qk_mm = mm(
            tokens,
            at.qk_weight.addr(),
            qk_f32,
            (t, 2 * c, c),
            (c, c, 2 * c),
            LtEpilogue::Bias(at.qk_bias.addr()),
        );
        self.dev.matmul(&qk_mm, "the VAE attention's q and k")?;
        self.elementwise("vae_cast_bf16", qk_f32, qk_bf, t * 2 * c)?;
        // v^T f32 [C, t8] = W_v tokens^T (no bias; Scratch::vt), then bf16 after q k's bf16.
        let vt_f32 = s.vt.as_ref().context("no v^T scratch")?.addr();
        let vt_bf = a(qk, 3 * t * c);
        let v_mm = mm(
            at.v_weight.addr(),
            tokens,
            vt_f32,
            (c, t, c),
            (c, c, t8),
            LtEpilogue::None,
        );
        self.dev.matmul(&v_mm, "the VAE attention's v")?;
        self.elementwise("vae_cast_bf16", vt_f32, vt_bf, c * t8)?;
        // scores f32 [t, t8] = q k^T (k: C columns into each bf16 row of 2C), softmax into
        // probabilities bf16 [t, t8] after them.
        let (scores_f32, probs) = (a(scores, 0), a(scores, t * t8));
        let k_bf = qk_bf + (c * 2) as u64;
        let s_mm = mm(
            qk_bf,
            k_bf,
            scores_f32,
            (t, t, c),
            (2 * c, 2 * c, t8),
            LtEpilogue::None,
        );
        self.dev.matmul(&s_mm, "the VAE attention's scores")?;
        let p = VaeSoftmaxParams {
            scores: scores_f32,
            probs,
            rows: t as i64,
            cols: t as i32,
            ld: t8 as i32,
            scale: 1.0 / (c as f32).sqrt(),
        };
        // SAFETY: scores and probabilities [t, t8] fit act[scores] (Scratch).
        unsafe { vae_softmax(self.dev.launcher(), &p)? };
        // mixed f32 [t, C] = probs v + b_v (act[normed]'s f32 part), to bf16 (the tokens'
        // place), the output projection into act[qk], and the residual into act[x].
        let mixed = a(normed, 0);
        let o_mm = mm(
            probs,
            vt_bf,
            mixed,
            (t, c, t8),
            (t8, t8, c),
            LtEpilogue::Bias(at.v_bias.addr()),
        );
        self.dev.matmul(&o_mm, "the VAE attention's output")?;
        self.elementwise("vae_cast_bf16", mixed, tokens, t * c)?;
        let p_mm = mm(
            tokens,
            at.out_weight.addr(),
            qk_f32,
            (t, c, c),
            (c, c, c),
            LtEpilogue::Bias(at.out_bias.addr()),
        );
        self.dev.matmul(&p_mm, "the VAE attention's projection")?;
        self.elementwise("vae_add", qk_f32, a(x, 0), t * c)
    }

    /// One latent `[c, h, w]` (host) into `out` `[out_channels, H, W]` (host).
    fn decode_one(
        &self,
        z: &[f32],
        h: usize,
        w: usize,
        s: &Scratch<D>,
        out: &mut [f32],
    ) -> Result<()> {
        let cfg = self.host.config();
        let latent = self.host.post_quant(z, h, w)?;
        // NCHW -> channels-last.
        let c = cfg.latent_channels;
        let mut nhwc = vec![0f32; latent.len()];
        for ch in 0..c {
            for p in 0..h * w {
                nhwc[p * c + ch] = latent[ch * h * w + p];
            }
        }
        let input = self.dev.upload_f32(&nhwc, "a VAE latent")?;
        let a = |i: usize| s.act[i].addr();
        let mut x = 0;
        self.conv(&self.conv_in, input.addr(), a(x), (h, w), false, s)?;
        x = self.resnet(&self.mid[0], x, (h, w), s)?;
        if let Some(at) = &self.attention {
            self.attention(at, x, h * w, s)?;
        }
        x = self.resnet(&self.mid[1], x, (h, w), s)?;
        let (mut h, mut w) = (h, w);
        let mut width = cfg.block_channels[0];
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = self.resnet(r, x, (h, w), s)?;
                width = r.conv2.cout_pad;
            }
            if let Some(conv) = &block.upsampler {
                (h, w) = (2 * h, 2 * w);
                let y = (x + 1) % 4;
                self.conv(conv, a(x), a(y), (h, w), true, s)?;
                x = y;
            }
        }
        let y = (x + 1) % 4;
        self.group_norm(&self.norm_out, a(x), a(y), width, h * w, true, s)?;
        let z = (y + 1) % 4;
        self.conv(&self.conv_out, a(y), a(z), (h, w), false, s)?;
        let pad = self.conv_out.cout_pad;
        // Also the end of this image's work: `input` may be freed after it.
        let image = self.dev.download_f32(&s.act[z], h * w * pad)?;
        for ch in 0..cfg.out_channels {
            for p in 0..h * w {
                out[ch * h * w + p] = image[p * pad + ch];
            }
        }
        drop(input);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unfold(kernel: i32, upsample: i32, ldc: i32, first: i64, pixels: i64) -> VaeUnfoldParams {
        VaeUnfoldParams {
            x: 256,
            cols: 512,
            first,
            pixels,
            images: 2,
            height: 4,
            width: 6,
            channels: 3,
            kernel,
            upsample,
            ldc,
        }
    }

    #[test]
    fn unfold_plans_refuse_what_the_kernel_cannot_do() {
        assert!(vae_unfold_plan(&unfold(3, 1, 32, 0, 48)).is_ok());
        assert!(vae_unfold_plan(&unfold(1, 0, 8, 40, 8)).is_ok());
        let err = |p: VaeUnfoldParams| format!("{:#}", vae_unfold_plan(&p).unwrap_err());
        assert!(err(unfold(5, 0, 80, 0, 48)).contains("neither 1 nor 3"));
        assert!(err(unfold(3, 0, 27, 0, 48)).contains("multiple of 8"));
        assert!(err(unfold(3, 0, 24, 0, 48)).contains("at least 27"));
        assert!(err(unfold(3, 0, 32, 41, 8)).contains("outside the 48"));
        let mut odd = unfold(3, 1, 32, 0, 10);
        odd.height = 5;
        assert!(err(odd).contains("even sizes"));
    }

    #[test]
    fn group_norm_plans_refuse_widths_the_statistics_cannot_split() {
        let p = |channels, groups| VaeGroupNormParams {
            x: 256,
            y: 256,
            partials: 512,
            stats: 768,
            weight: 1024,
            bias: 1280,
            pixels: 10,
            images: 1,
            channels,
            groups,
            chunks: 2,
            silu: 1,
            eps: 1e-6,
        };
        for (c, g) in [(16, 8), (128, 32), (256, 32), (512, 32), (1024, 32)] {
            assert!(vae_group_norm_plan(&p(c, g)).is_ok(), "{c} / {g}");
        }
        for (c, g, what) in [
            (96, 32, "the statistics kernel"),
            (2048, 32, "the statistics kernel"),
            (128, 24, "do not divide"),
        ] {
            let e = format!("{:#}", vae_group_norm_plan(&p(c, g)).unwrap_err());
            assert!(e.contains(what), "{c} / {g}: {e}");
        }
    }

    /// The GEMM weight's column (ky, kx, ci) of row co is the conv weight [co, ci, ky, kx];
    /// padding rows and columns are zero.
    #[test]
    fn unfold_weight_follows_the_unfold_order() {
        let (cout, cin, k) = (3, 2, 3);
        let w: Vec<f32> = (0..cout * cin * k * k).map(|i| i as f32 + 1.0).collect();
        let (g, cout_pad, ldk) = vae_unfold_weight(&w, cout, cin, k);
        assert_eq!((cout_pad, ldk), (8, 24));
        for co in 0..cout_pad {
            for col in 0..ldk {
                let want = if co < cout && col < k * k * cin {
                    let (tap, ci) = (col / cin, col % cin);
                    w[((co * cin + ci) * k + tap / k) * k + tap % k]
                } else {
                    0.0
                };
                assert_eq!(g[co * ldk + col], want, "row {co} column {col}");
            }
        }
    }
}
