//! Flash-attention test bodies shared by `tests/gpu_attention.rs` (on a GPU) and
//! `tests/kernel_emulation.rs` (on the CPU emulator): random qkv in the fused layout, the
//! kernel through its launcher, the CPU reference (`ops::attention`, cross-checked by a plain
//! loop) on the same bf16 values.
#![allow(dead_code)] // each test crate uses its own subset

use anyhow::{ensure, Result};
use fora::cpu::ops;
use fora::cuda::attention::{attention_sized_for, AttentionImpl};
use fora::cuda::params::AttentionParams;
use fora::cuda::qkv_attention::QkvAttention;
use fora::cuda::testing::{
    biased_product, check_close, round_bf16, DeviceAddr, TestDevice, TestRng,
};
use rayon::prelude::*;

/// Rows of poisoned guard elements after the output: a store past the last token shows up.
pub const GUARD_ROWS: usize = 64;

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub tokens: usize,
    pub head_dim: usize,
}

/// The CPU twin: out[b, t, h, :] = softmax(q k^T / sqrt(d)) v in f32, straight from the fused
/// qkv buffer. Parallel over (batch, head) so the 1024-token case stays quick.
pub fn attention_reference(qkv: &[f32], s: Shape) -> Vec<f32> {
    let (b_n, h_n, t_n, d) = (s.batch, s.heads, s.tokens, s.head_dim);
    let row = 3 * h_n * d;
    let scale = 1.0 / (d as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..b_n * h_n)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / h_n, bh % h_n);
            let at = |t: usize, which: usize| (b * t_n + t) * row + which * h_n * d + h * d;
            let mut out = vec![0.0f32; t_n * d];
            let mut scores = vec![0.0f32; t_n];
            for tq in 0..t_n {
                let q = &qkv[at(tq, 0)..at(tq, 0) + d];
                let mut max = f32::NEG_INFINITY;
                for (tk, sc) in scores.iter_mut().enumerate() {
                    let k = &qkv[at(tk, 1)..at(tk, 1) + d];
                    *sc = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0.0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let o = &mut out[tq * d..(tq + 1) * d];
                for (tk, &p) in scores.iter().enumerate() {
                    let v = &qkv[at(tk, 2)..at(tk, 2) + d];
                    for (oi, vi) in o.iter_mut().zip(v) {
                        *oi += p * vi;
                    }
                }
                for oi in o.iter_mut() {
                    *oi /= sum;
                }
            }
            out
        })
        .collect();
    // [B, H, T, d] -> [B, T, H, d]
    let mut out = vec![0.0f32; b_n * t_n * h_n * d];
    for (bh, head_out) in per_head.iter().enumerate() {
        let (b, h) = (bh / h_n, bh % h_n);
        for t in 0..t_n {
            let dst = ((b * t_n + t) * h_n + h) * d;
            out[dst..dst + d].copy_from_slice(&head_out[t * d..(t + 1) * d]);
        }
    }
    out
}

/// The project's CPU reference attention on the same layout.
pub fn attention_oracle(qkv: &[f32], s: Shape) -> Vec<f32> {
    let mut out = vec![0.0f32; s.batch * s.tokens * s.heads * s.head_dim];
    // One [T, T] score matrix per parallel task, at most one per (batch, head).
    let tasks = (s.batch * s.heads).min(rayon::current_num_threads().max(1));
    let mut scores = vec![0.0f32; tasks * s.tokens * s.tokens];
    ops::attention(
        &mut out,
        qkv,
        &mut scores,
        s.batch,
        s.tokens,
        s.heads,
        s.head_dim,
    );
    out
}

/// The plain loop and the oracle agree to f32 rounding.
pub fn check_oracle(name: &str, qkv: &[f32], s: Shape) -> Result<Vec<f32>> {
    let oracle = attention_oracle(qkv, s);
    let plain = attention_reference(qkv, s);
    check_close(
        &format!("{name}: CPU oracle vs plain loop"),
        &oracle,
        &plain,
        1e-5,
    )?;
    Ok(oracle)
}

pub fn params(s: Shape, qkv: u64, out: u64) -> AttentionParams {
    AttentionParams {
        qkv,
        out,
        batch: s.batch as i32,
        tokens: s.tokens as i32,
        heads: s.heads as i32,
        head_dim: s.head_dim as i32,
        scale: 1.0 / (s.head_dim as f32).sqrt(),
    }
}

/// Random qkv (q and k with standard deviation `qk_std`, v standard normal), the kernel on the
/// GPU, the CPU twin on the same bf16 values; rel-L2 <= 1e-2, no NaN, guard rows untouched,
/// and a second launch gives identical bits.
pub fn run_case<D: TestDevice>(
    gpu: &D,
    name: &str,
    s: Shape,
    qk_std: f32,
    seed: u64,
    imp: AttentionImpl,
) -> Result<()> {
    run_case_sized(gpu, name, s, qk_std, seed, imp, gpu.multiprocessors())
}

/// [`run_case`] with block sizes chosen as for a device of `sm_count` SMs (1: the largest
/// blocks of the family, whatever the shape).
pub fn run_case_sized<D: TestDevice>(
    gpu: &D,
    name: &str,
    s: Shape,
    qk_std: f32,
    seed: u64,
    imp: AttentionImpl,
    sm_count: usize,
) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let (b_n, h_n, t_n, d) = (s.batch, s.heads, s.tokens, s.head_dim);
    let mut qkv = Vec::with_capacity(b_n * t_n * 3 * h_n * d);
    for _ in 0..b_n * t_n {
        qkv.extend(rng.normal_vec(2 * h_n * d, qk_std)); // q, k
        qkv.extend(rng.normal_vec(h_n * d, 1.0)); // v
    }
    let qkv = round_bf16(&qkv);
    let reference = check_oracle(name, &qkv, s)?;

    let out_len = b_n * t_n * h_n * d;
    let qkv_dev = gpu.upload_bf16(&qkv)?;
    let mut out_dev = gpu.poisoned_bf16(out_len + GUARD_ROWS * h_n * d)?;
    let p = params(s, qkv_dev.addr(), out_dev.addr());
    check_output_twice(gpu, name, &mut out_dev, &reference, || unsafe {
        attention_sized_for(gpu, &p, imp, sm_count)
    })
}

/// Two implementations that differ only in when their warps issue (tma_pp against tma) give
/// the same bits on the same random qkv, with blocks as for a device of `sm_count` SMs (each
/// output poisoned first, neither may leave a NaN).
pub fn check_same_bits<D: TestDevice>(
    gpu: &D,
    name: &str,
    s: Shape,
    seed: u64,
    (a, b): (AttentionImpl, AttentionImpl),
    sm_count: usize,
) -> Result<()> {
    let mut rng = TestRng::new(seed);
    let n = s.batch * s.tokens * 3 * s.heads * s.head_dim;
    let qkv = gpu.upload_bf16(&round_bf16(&rng.normal_vec(n, 1.0)))?;
    let out_len = s.batch * s.tokens * s.heads * s.head_dim;
    let run = |imp: AttentionImpl| -> Result<Vec<f32>> {
        let out = gpu.poisoned_bf16(out_len)?;
        unsafe { attention_sized_for(gpu, &params(s, qkv.addr(), out.addr()), imp, sm_count) }?;
        gpu.download_bf16(&out)
    };
    let (x, y) = (run(a)?, run(b)?);
    ensure!(
        x.iter().all(|v| v.is_finite()),
        "{name}: {} left NaN or inf",
        a.name()
    );
    if let Some(i) = (0..out_len).find(|&i| x[i].to_bits() != y[i].to_bits()) {
        anyhow::bail!(
            "{name}: {} and {} differ at element {i} ({} against {})",
            a.name(),
            b.name(),
            x[i],
            y[i]
        );
    }
    Ok(())
}

/// Runs `launch` into the poisoned `out` (the output, then poisoned guard rows): nothing may be
/// written past `reference.len()` elements, the output must match `reference` (rel-L2 <= 1e-2),
/// and after poisoning `out` again a second launch must give the same bits.
pub fn check_output_twice<D: TestDevice>(
    gpu: &D,
    name: &str,
    out: &mut D::Bf16,
    reference: &[f32],
    launch: impl Fn() -> Result<()>,
) -> Result<()> {
    launch()?;
    let first = gpu.download_bf16(out)?;
    let (got, guard) = first.split_at(reference.len());
    if let Some(i) = guard.iter().position(|v| !v.is_nan()) {
        anyhow::bail!(
            "{name}: the kernel wrote past the output (guard element {i} is {})",
            guard[i]
        );
    }
    check_close(name, got, reference, 1e-2)?;

    // Deterministic: the same launch again gives the same bits.
    gpu.poison_bf16(out)?;
    launch()?;
    let second = gpu.download_bf16(out)?;
    ensure!(
        first
            .iter()
            .zip(&second)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{name}: two launches on the same input gave different bits"
    );
    Ok(())
}

/// The TMA probes' tensor: a random bf16 tensor of 100 rows x 200 columns (row stride 208, the
/// 8 padding columns holding 7.0, which must never arrive), and boxes of 64 rows x 64 columns at
/// (0, 0) and at (192, 80), the second past both edges.
struct ProbeTensor<B> {
    values: Vec<f32>,
    buffer: B,
    rows: usize,
    cols: usize,
    box_rows: usize,
    boxes: [(i32, i32); 2],
}

fn probe_tensor<D: TestDevice>(gpu: &D, seed: u64) -> Result<ProbeTensor<D::Bf16>> {
    let (rows, cols, stride, box_rows) = (100usize, 200usize, 208usize, 64usize);
    let mut rng = TestRng::new(seed);
    let values = round_bf16(&rng.normal_vec(rows * cols, 1.0));
    let mut host = vec![7.0f32; rows * stride];
    for r in 0..rows {
        host[r * stride..r * stride + cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
    }
    Ok(ProbeTensor {
        values,
        buffer: gpu.upload_bf16(&host)?,
        rows,
        cols,
        box_rows,
        boxes: [(0, 0), (192, 80)],
    })
}

impl<B: fora::cuda::testing::DeviceAddr> ProbeTensor<B> {
    fn map(&self) -> fora::cuda::device::TmaTensor2d {
        fora::cuda::device::TmaTensor2d {
            base: self.buffer.addr(),
            rows: self.rows as u64,
            cols: self.cols as u64,
            row_stride: 208,
            box_rows: self.box_rows as u32,
            box_cols: 64,
        }
    }

    /// `image` (box_rows x 64 bf16 of shared memory) must be the 128-byte swizzle of box
    /// `which` (16-byte chunk c of box row r at chunk c ^ (r % 8)) with zeros outside the
    /// tensor, element for element.
    fn check_box(&self, what: &str, image: &[f32], which: usize) -> Result<()> {
        let (x, y) = self.boxes[which];
        for r in 0..self.box_rows {
            for slot in 0..64usize {
                // Shared chunk slot / 8 of box row r holds logical chunk (slot / 8) ^ (r % 8).
                let col = x as usize + 8 * ((slot / 8) ^ (r % 8)) + slot % 8;
                let row = y as usize + r;
                let want = if row < self.rows && col < self.cols {
                    self.values[row * self.cols + col]
                } else {
                    0.0
                };
                let g = image[r * 64 + slot];
                ensure!(
                    g == want,
                    "{what}: box {which} at ({x}, {y}): shared row {r} element {slot} is {g}, \
                     want {want} (tensor row {row}, column {col})"
                );
            }
        }
        Ok(())
    }
}

/// Runs a TMA probe over [`probe_tensor`]'s boxes: `launch(map, boxes, out)` writes `images`
/// shared-memory images of box_rows x 64 bf16, image i holding box i % 2; each must be its box
/// and nothing may be written past them.
fn run_box_probe<D: TestDevice>(
    gpu: &D,
    seed: u64,
    what: &str,
    images: usize,
    launch: impl FnOnce(&fora::cuda::device::TmaTensor2d, [(i32, i32); 2], u64) -> Result<()>,
) -> Result<()> {
    let t = probe_tensor(gpu, seed)?;
    let image = t.box_rows * 64;
    let guard = 64;
    let out = gpu.poisoned_bf16(images * image + guard)?;
    launch(&t.map(), t.boxes, out.addr())?;
    let got = gpu.download_bf16(&out)?;
    ensure!(
        got[images * image..].iter().all(|v| v.is_nan()),
        "{what}: wrote past out"
    );
    for i in 0..images {
        t.check_box(
            &format!("{what}, image {i}"),
            &got[i * image..(i + 1) * image],
            i % 2,
        )?;
    }
    Ok(())
}

/// The TMA probe (`fora::cuda::probe::tma_probe`) on [`probe_tensor`]'s boxes, one after the
/// other through one mbarrier's two phases: image i is box i.
pub fn run_tma_probe<D: TestDevice>(gpu: &D, seed: u64) -> Result<()> {
    run_box_probe(gpu, seed, "tma probe", 2, |map, boxes, out| unsafe {
        fora::cuda::probe::tma_probe(gpu, map, boxes, out)
    })
}

/// The cluster probe (`fora::cuda::probe::tma_cluster_probe`): each CTA of a cluster of two
/// multicasts one of [`probe_tensor`]'s boxes into both; both CTAs' shared memory must hold both
/// boxes, each in its slot (image 2 CTA + slot is box slot), and the kernel must finish (the
/// remote arrivals: a lost one traps in the barrier watchdog or deadlocks the emulator).
pub fn run_tma_cluster_probe<D: TestDevice>(gpu: &D, seed: u64) -> Result<()> {
    run_box_probe(
        gpu,
        seed,
        "tma cluster probe",
        4,
        |map, boxes, out| unsafe { fora::cuda::probe::tma_cluster_probe(gpu, map, boxes, out) },
    )
}

/// One wgmma probe (`fora::cuda::probe`): random bf16 a [64, 32] and bt [n, 32], the device's
/// d [64, n] against the f64 product; every element written, nothing past it.
pub fn run_wgmma_probe<D: TestDevice>(
    gpu: &D,
    mode: fora::cuda::probe::WgmmaProbeMode,
    n: usize,
    seed: u64,
) -> Result<()> {
    let mut rng = TestRng::new(seed);
    const K: usize = 32;
    let a = round_bf16(&rng.normal_vec(64 * K, 1.0));
    let bt = round_bf16(&rng.normal_vec(n * K, 1.0));
    let want: Vec<f32> = (0..64 * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..K)
                .map(|k| a[r * K + k] as f64 * bt[c * K + k] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    let (a_d, bt_d) = (gpu.upload_bf16(&a)?, gpu.upload_bf16(&bt)?);
    let guard = 64;
    let d = gpu.poisoned_f32(64 * n + guard)?;
    unsafe {
        fora::cuda::probe::wgmma_probe(gpu, mode, n as i32, a_d.addr(), bt_d.addr(), d.addr())
    }?;
    let got = gpu.download_f32(&d)?;
    let what = format!("wgmma probe {mode:?} n={n}");
    ensure!(
        got[64 * n..].iter().all(|v| v.is_nan()),
        "{what}: wrote past d"
    );
    check_close(&what, &got[..64 * n], &want, 1e-5).map(|_| ())
}

// ---- the qkv Linear + attention in one launch (Hopper) ---------------------------------------

/// One `qkv_attention_*` launch: `s` (dim = heads x head_dim), A's rows `lda` apart.
pub struct QkvAttentionCase {
    pub shape: Shape,
    pub lda: usize,
}

/// One case against the CPU twin: q, k, v = bf16(A W^T + bias) from the product of the bf16
/// operands in f64 (as the qkv Linear writes qkv), then the attention reference on them; rel-L2
/// <= 1e-2, no NaN, guard rows untouched, a second launch the same bits.
pub fn run_qkv_attention<D: TestDevice>(
    gpu: &D,
    c: &QkvAttentionCase,
    multicast: bool,
    seed: u64,
) -> Result<()> {
    let s = c.shape;
    let dim = s.heads * s.head_dim;
    let m = s.batch * s.tokens;
    let mut rng = TestRng::new(seed);
    // A's padding columns (lda > dim) hold 7.0, which must never enter the product.
    let a = round_bf16(&rng.normal_vec(m * dim, 1.0));
    let mut a_host = vec![7.0f32; m * c.lda];
    for r in 0..m {
        a_host[r * c.lda..r * c.lda + dim].copy_from_slice(&a[r * dim..(r + 1) * dim]);
    }
    // q, k and v of about unit variance: W's rows have norm ~1.
    let w = round_bf16(&rng.normal_vec(3 * dim * dim, 1.0 / (dim as f32).sqrt()));
    let bias = rng.normal_vec(3 * dim, 0.5);
    let qkv: Vec<f32> = biased_product(&a, &w, &bias, (m, 3 * dim, dim))
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let qkv = round_bf16(&qkv);
    let name = format!(
        "qkv_attention{} B={} H={} T={} d={} lda={}",
        if multicast { "_mc" } else { "" },
        s.batch,
        s.heads,
        s.tokens,
        s.head_dim,
        c.lda
    );
    let reference = check_oracle(&name, &qkv, s)?;

    let (a_d, w_d, bias_d) = (
        gpu.upload_bf16(&a_host)?,
        gpu.upload_bf16(&w)?,
        gpu.upload_f32(&bias)?,
    );
    let out_len = m * dim;
    let mut out_d = gpu.poisoned_bf16(out_len + GUARD_ROWS * dim)?;
    let launch = QkvAttention {
        a: a_d.addr(),
        lda: c.lda,
        w: w_d.addr(),
        bias: bias_d.addr(),
        out: out_d.addr(),
        batch: s.batch,
        tokens: s.tokens,
        heads: s.heads,
        head_dim: s.head_dim,
        scale: 1.0 / (s.head_dim as f32).sqrt(),
        multicast,
    };
    // The kernel's q, k, v are its f32 sums rounded to bf16, which may round to the other bf16
    // neighbour of the f64 product's: the attention tolerance covers that.
    check_output_twice(gpu, &name, &mut out_d, &reference, || unsafe {
        launch.launch(gpu)
    })
}

/// Every case of the fused qkv + attention: one image + CFG of DiT-XL/2 at 256 px (d 72, 16
/// heads, 256 tokens), and odd shapes: 10 tokens (three CTAs of a cluster past the sequence),
/// 200 tokens (a partial last key tile, a partial k-step: dim 216) with padded A rows, d 64 at 256
/// tokens, 65 tokens (a second tile of one key); each with and without W's multicast.
pub fn check_qkv_attention<D: TestDevice>(gpu: &D) -> Result<()> {
    let case = |batch, heads, tokens, head_dim, pad| QkvAttentionCase {
        shape: Shape {
            batch,
            heads,
            tokens,
            head_dim,
        },
        lda: heads * head_dim + pad,
    };
    for (c, seed) in [
        (case(2, 16, 256, 72, 0), 91),
        (case(3, 2, 10, 64, 0), 92),
        (case(2, 3, 200, 72, 8), 93),
        (case(1, 2, 256, 64, 16), 94),
        (case(2, 1, 65, 72, 0), 95),
    ] {
        for multicast in [false, true] {
            run_qkv_attention(gpu, &c, multicast, seed)?;
        }
    }
    Ok(())
}
