//! VAE decoder test bodies shared by `tests/gpu_vae.rs` (on a GPU, cuBLASLt) and
//! `tests/kernel_emulation.rs` (the whole decoder on the CPU emulator of its kernels, a plain
//! GEMM in cuBLASLt's place): the decoder over a [`VaeDevice`] against the f32 CPU decoder.
#![allow(dead_code)] // each test crate uses its own subset

use anyhow::{ensure, Result};
use fora::cuda::testing::{rel_l2, TestRng};
use fora::cuda::vae::{GpuVae, VaeDevice};
use fora::io::TensorFile;
use fora::vae::VaeDecoder;
use std::sync::Arc;

pub const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vae_tiny.model.safetensors"
);
pub const IO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vae_tiny.io.safetensors"
);

/// The tensors of a decoder in diffusers' key layout: (name, shape, fan-in).
type Specs = Vec<(String, Vec<usize>, usize)>;

fn conv(specs: &mut Specs, prefix: &str, cout: usize, cin: usize, k: usize) {
    specs.push((
        format!("{prefix}.weight"),
        vec![cout, cin, k, k],
        cin * k * k,
    ));
    specs.push((format!("{prefix}.bias"), vec![cout], cin * k * k));
}

fn norm(specs: &mut Specs, prefix: &str, c: usize) {
    specs.push((format!("{prefix}.weight"), vec![c], c));
    specs.push((format!("{prefix}.bias"), vec![c], c));
}

fn resnet(specs: &mut Specs, prefix: &str, cin: usize, cout: usize) {
    norm(specs, &format!("{prefix}.norm1"), cin);
    conv(specs, &format!("{prefix}.conv1"), cout, cin, 3);
    norm(specs, &format!("{prefix}.norm2"), cout);
    conv(specs, &format!("{prefix}.conv2"), cout, cout, 3);
    if cin != cout {
        conv(specs, &format!("{prefix}.conv_shortcut"), cout, cin, 1);
    }
}

/// A random decoder of up-block `widths` and `resnets` a block: PyTorch's default init
/// (uniform within 1 / sqrt(fan_in)) for convs and Linears, GroupNorm affine near 1 and 0.
pub fn random_vae_bytes(widths: &[usize], resnets: usize, seed: u64) -> Vec<u8> {
    let mut specs = Specs::new();
    let c0 = widths[0];
    conv(&mut specs, "post_quant_conv", 4, 4, 1);
    conv(&mut specs, "decoder.conv_in", c0, 4, 3);
    for j in 0..2 {
        resnet(
            &mut specs,
            &format!("decoder.mid_block.resnets.{j}"),
            c0,
            c0,
        );
    }
    let a = "decoder.mid_block.attentions.0";
    norm(&mut specs, &format!("{a}.group_norm"), c0);
    for l in ["to_q", "to_k", "to_v", "to_out.0"] {
        specs.push((format!("{a}.{l}.weight"), vec![c0, c0], c0));
        specs.push((format!("{a}.{l}.bias"), vec![c0], c0));
    }
    let mut width = c0;
    for (i, &out) in widths.iter().enumerate() {
        for j in 0..resnets {
            let cin = if j == 0 { width } else { out };
            resnet(
                &mut specs,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                cin,
                out,
            );
        }
        if i + 1 < widths.len() {
            conv(
                &mut specs,
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                out,
                out,
                3,
            );
        }
        width = out;
    }
    norm(&mut specs, "decoder.conv_norm_out", width);
    conv(&mut specs, "decoder.conv_out", 3, width, 3);
    let mut rng = TestRng::new(seed);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .into_iter()
        .map(|(name, shape, fan_in)| {
            let n: usize = shape.iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let data = if name.contains("norm") && name.ends_with("weight") {
                (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
            } else if name.contains("norm") {
                rng.normal_vec(n, 0.1)
            } else {
                rng.uniform_vec(n, -bound, bound)
            };
            let data: Vec<u8> = data.iter().flat_map(|v: &f32| v.to_le_bytes()).collect();
            (name, shape, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), v.unwrap())
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// The device's decode of `latents` against the CPU's: rel-L2 within 2e-2 (a whole forward's
/// bound for bf16 operands, DESIGN.md), finite, and a second decode the same bits
/// (deterministic; images after the first reuse one decode's scratch). Returns the rel-L2.
pub fn compare<D: VaeDevice>(
    dev: D,
    vae: VaeDecoder,
    latents: &[f32],
    shape: [usize; 4],
) -> Result<f64> {
    let vae = Arc::new(vae);
    let (want, want_shape) = vae.decode(latents, shape)?;
    let on_dev = GpuVae::new(dev, vae.clone())?;
    let (got, got_shape) = on_dev.decode(latents, shape)?;
    ensure!(
        got_shape == want_shape,
        "{got_shape:?} against {want_shape:?}"
    );
    ensure!(got.iter().all(|v| v.is_finite()), "non-finite pixels");
    let err = rel_l2(&got, &want);
    println!("VAE decode {shape:?} -> {got_shape:?}: rel-L2 {err:.3e} against the CPU");
    ensure!(err <= 2e-2, "rel-L2 {err:e} > 2e-2");
    let (again, _) = on_dev.decode(latents, shape)?;
    ensure!(again == got, "a second decode differs");
    Ok(err)
}

/// The diffusers fixture (5 x 6 latents, two images: 30 attention tokens padded to 32; widths
/// 32, 32, 16 with a shortcut conv; 8 groups).
pub fn check_fixture<D: VaeDevice>(dev: D) -> Result<()> {
    let io = TensorFile::open(IO)?;
    let z = io.f32("latents", 4)?;
    compare(
        dev,
        VaeDecoder::load(MODEL)?,
        &z.data,
        z.shape.try_into().unwrap(),
    )?;
    Ok(())
}

/// A random decoder of `widths` (three resnets a block, 32 groups) on latents `[1, 4, h, w]`.
pub fn check_random<D: VaeDevice>(dev: D, widths: &[usize], (h, w): (usize, usize)) -> Result<()> {
    let vae = VaeDecoder::from_bytes(&random_vae_bytes(widths, 3, 3))?;
    let latents = TestRng::new(4).normal_vec(4 * h * w, 1.0);
    compare(dev, vae, &latents, [1, 4, h, w])?;
    Ok(())
}
