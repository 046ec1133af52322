//! Flash-attention benchmark (`cargo bench --bench attention`): DiT shapes, CUDA events around
//! each launch, 5 warm-up launches, the median of 30 timed ones, inputs rotated over copies
//! that together exceed the L2 cache so every launch reads qkv from device memory.
//! Every implementation (`AttentionImpl`: v1, the default; the opt-in v2; the opt-in wgmma, on a
//! Hopper only) on every shape, with each one's speedup over v1. Prints a Markdown table;
//! without a CUDA device prints `SKIP` and exits 0.

use anyhow::{Context, Result};
use cudarc::driver::sys::CUevent_flags;
use fora::cuda::attention::{attention_flops, attention_with, AttentionImpl};
use fora::cuda::params::AttentionParams;
use fora::cuda::testing::{test_gpu, to_bf16, TestRng};
use fora::cuda::{dptr, Gpu};
use half::bf16;

const WARMUP: usize = 5;
const RUNS: usize = 30;
/// Rotated input bytes per shape: well above the 50-60 MB L2 of an H100/H200.
const ROTATE_BYTES: usize = 256 << 20;
const MAX_COPIES: usize = 64;

/// (batch, heads, tokens, head_dim, what)
const SHAPES: &[(usize, usize, usize, usize, &str)] = &[
    (2, 16, 256, 72, "XL/2 256px, 1 image + CFG"),
    (64, 16, 256, 72, "XL/2 256px, batch 64"),
    (256, 16, 256, 72, "XL/2 256px, batch 256"),
    (2, 16, 1024, 72, "XL/2 512px, 1 image + CFG"),
    (32, 16, 1024, 72, "XL/2 512px, batch 32"),
    (64, 6, 256, 64, "S/2 256px, batch 64"),
    (16, 8, 1024, 128, "d 128, batch 16"),
];

fn bench_shape(
    gpu: &Gpu,
    rng: &mut TestRng,
    shape: (usize, usize, usize, usize),
    imp: AttentionImpl,
) -> Result<f64> {
    let (batch, heads, tokens, head_dim) = shape;
    let qkv_len = batch * tokens * 3 * heads * head_dim;
    let out_len = batch * tokens * heads * head_dim;
    let copies = (ROTATE_BYTES / (qkv_len * 2)).clamp(1, MAX_COPIES);
    // One random buffer uploaded to every copy: same values, distinct addresses.
    let host = to_bf16(&rng.normal_vec(qkv_len, 1.0));
    let mut inputs = Vec::with_capacity(copies);
    for _ in 0..copies {
        inputs.push(gpu.upload(&host, "attention bench qkv")?);
    }
    let out = gpu.alloc_zeros::<bf16>(out_len, "attention bench out")?;
    let params = |i: usize| AttentionParams {
        qkv: dptr(&inputs[i % copies]),
        out: dptr(&out),
        batch: batch as i32,
        tokens: tokens as i32,
        heads: heads as i32,
        head_dim: head_dim as i32,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    for i in 0..WARMUP {
        unsafe { attention_with(gpu, &params(i), imp) }?;
    }
    gpu.synchronize()?;
    let ctx = gpu.context();
    let mut times_ms = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .context("cannot create a CUDA event")?;
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .context("cannot create a CUDA event")?;
        start.record(gpu.stream())?;
        unsafe { attention_with(gpu, &params(WARMUP + i), imp) }?;
        end.record(gpu.stream())?;
        times_ms.push(start.elapsed_ms(&end)? as f64);
    }
    gpu.synchronize()?;
    times_ms.sort_by(f64::total_cmp);
    Ok(times_ms[RUNS / 2])
}

fn main() -> Result<()> {
    let Some(gpu) = test_gpu("bench_attention") else {
        return Ok(());
    };
    println!(
        "## Flash attention on {} (sm_{}{}), median of {RUNS}\n",
        gpu.name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1
    );
    println!("| shape | B | H | T | d | impl | time (us) | TFLOP/s | vs v1 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rng = TestRng::new(42);
    for &(batch, heads, tokens, head_dim, what) in SHAPES {
        let mut v1_ms = None;
        for imp in AttentionImpl::ALL {
            if imp.is_wgmma() && gpu.compute_capability().0 != 9 {
                continue;
            }
            let ms = bench_shape(&gpu, &mut rng, (batch, heads, tokens, head_dim), imp)
                .with_context(|| format!("attention bench {what} ({})", imp.name()))?;
            let tflops = attention_flops(batch, heads, tokens, head_dim) / (ms * 1e-3) / 1e12;
            let vs_v1 = match v1_ms {
                Some(base) => format!("{:.2}x", base / ms),
                None => "—".to_string(),
            };
            if imp == AttentionImpl::V1 {
                v1_ms = Some(ms);
            }
            println!(
                "| {what} | {batch} | {heads} | {tokens} | {head_dim} | {} | {:.1} | {tflops:.1} | {vs_v1} |",
                imp.name(),
                ms * 1e3
            );
        }
    }
    Ok(())
}
