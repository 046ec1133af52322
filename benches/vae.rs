//! The VAE decoder's benchmark (`cargo bench --bench vae`): a random decoder of the Stable
//! Diffusion VAE's shape (widths 512, 512, 256, 128, three resnets a block, 32 groups;
//! `fora::vae::random_weights`) decoding DiT-XL/2's 32 x 32 latents into 256 x 256 images,
//! on the GPU (`fora::cuda::vae::CudaVae`: host latents in, host images out, the work's one
//! synchronisation included) for 1, 8 and 32 images a call, 2 warm-up calls and the median of
//! 10, against the f32 CPU decoder on the same machine (one image, one call). TFLOP/s count
//! the convolutions' and the attention's multiply-adds (`VaeConfig::macs`). Markdown to
//! stdout. Without a CUDA device it prints `SKIP` and exits 0.

use anyhow::{Context, Result};
use fora::cuda::testing::{test_gpu, TestRng};
use fora::cuda::vae::CudaVae;
use fora::vae::VaeDecoder;
use std::sync::Arc;
use std::time::Instant;

const WARMUP: usize = 2;
const RUNS: usize = 10;
const BATCHES: [usize; 3] = [1, 8, 32];

fn median_s(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..WARMUP {
        f()?;
    }
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("vae bench: not run as `cargo bench` (no --bench flag): nothing measured");
        return Ok(());
    }
    let Some(gpu) = test_gpu("bench_vae") else {
        return Ok(());
    };
    let vae = Arc::new(VaeDecoder::from_bytes(&fora::vae::random_weights(
        &[512, 512, 256, 128],
        3,
        32,
        1,
    )?)?);
    let (h, w) = (32, 32);
    let macs = vae.config().macs(h, w);
    let card = gpu.name().to_string();
    let on_gpu = CudaVae::on_gpu(gpu, vae.clone())?;
    let mut rng = TestRng::new(2);
    let one = rng.normal_vec(4 * h * w, 1.0);
    let start = Instant::now();
    vae.decode(&one, [1, 4, h, w]).context("the CPU decode")?;
    let cpu_s = start.elapsed().as_secs_f64();
    println!(
        "## VAE decode on {card} ({} GMAC an image), median of {RUNS}\n",
        (macs / 1e9).round()
    );
    println!("| decoder | images | ms a call | ms an image | TFLOP/s | vs the CPU |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| CPU f32 ({} threads) | 1 | {:.0} | {:.0} | {:.3} | 1.00x |",
        rayon::current_num_threads(),
        cpu_s * 1e3,
        cpu_s * 1e3,
        2.0 * macs / cpu_s / 1e12
    );
    for images in BATCHES {
        let latents = rng.normal_vec(images * 4 * h * w, 1.0);
        let s = median_s(|| {
            on_gpu.decode(&latents, [images, 4, h, w])?;
            Ok(())
        })
        .with_context(|| format!("the GPU decode of {images} images"))?;
        let per = s / images as f64;
        println!(
            "| GPU bf16 operands | {images} | {:.2} | {:.2} | {:.1} | {:.0}x |",
            s * 1e3,
            per * 1e3,
            2.0 * macs / per / 1e12,
            cpu_s / per
        );
    }
    Ok(())
}
