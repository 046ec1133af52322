//! The DiT operations in f32, one plain function each, on row-major slices. They are the
//! CPU reference and the CPU twins of the CUDA kernels (GPU tests call them directly).
//!
//! Two kinds of matrix products:
//! - [`linear`]: the large block GEMMs (qkv, proj, fc1, fc2) through the `gemm` crate,
//!   multithreaded with rayon. `gemm` allocates small bookkeeping vectors per call, and rayon
//!   may allocate when work enters its pool from outside, so these only run on computing steps.
//! - [`linear_rows`]: a plain dot-product kernel for the conditioning path and the embeddings
//!   (few rows, or a tiny inner dimension). With `parallel = false` it touches no allocator and
//!   no thread pool, which is what a FORA reuse step needs; the parallel version computes every
//!   element with the same code, so both give identical bits.

use crate::weights::checked_product;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// A raw pointer that may cross threads. Used only where parallel tasks write provably
/// disjoint elements of one buffer in a strided pattern that `chunks_mut` cannot express.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// `out[m, n] = bias[n] + sum_k x[m, k] * w[n, k]`: x `[rows, k]`, w `[n, k]` (PyTorch Linear
/// layout), out `[rows, n]`, via `gemm` on every rayon thread.
pub fn linear(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    rows: usize,
    n: usize,
    k: usize,
) {
    assert_linear_lens(out, x, w, bias, rows, n, k);
    for row in out.chunks_exact_mut(n) {
        row.copy_from_slice(bias);
    }
    // SAFETY: the strides describe exactly the slices checked above.
    unsafe {
        gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        )
    }
}

/// Dot product with 16 independent accumulators (vectorizes; a fixed summation order).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let mut s = [0f32; 8];
    for i in 0..8 {
        s[i] = acc[i] + acc[i + 8];
    }
    (s[0] + s[4]) + (s[1] + s[5]) + ((s[2] + s[6]) + (s[3] + s[7])) + tail
}

/// Output columns `cols` of [`linear_rows`], written through `out` (row stride `n`).
///
/// SAFETY: `out` points at a `[rows, n]` buffer, and no other thread writes columns `cols`.
#[allow(clippy::too_many_arguments)]
unsafe fn linear_cols(
    out: SharedMut,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    cols: std::ops::Range<usize>,
) {
    for j in cols {
        let wj = &w[j * k..(j + 1) * k];
        for r in 0..rows {
            let v = bias[j] + dot(&x[r * k..(r + 1) * k], wj);
            // SAFETY: (r, j) lies inside the [rows, n] buffer, column j is this caller's.
            unsafe { *out.0.add(r * n + j) = v };
        }
    }
}

/// Same maths as [`linear`] with a plain dot-product kernel: each weight row is read once and
/// dotted with every input row. `parallel` splits the output columns over rayon; without it
/// nothing allocates. Results do not depend on `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn linear_rows(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    parallel: bool,
) {
    assert_linear_lens(out, x, w, bias, rows, n, k);
    let ptr = SharedMut(out.as_mut_ptr());
    if parallel && n >= 64 {
        let chunk = 16;
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let cols = c * chunk..((c + 1) * chunk).min(n);
            // SAFETY: column ranges are disjoint across tasks; `out` outlives the loop.
            unsafe { linear_cols(ptr, x, w, bias, rows, n, k, cols) }
        });
    } else {
        // SAFETY: single writer over the whole buffer.
        unsafe { linear_cols(ptr, x, w, bias, rows, n, k, 0..n) }
    }
}

/// The slice lengths a product of `[rows, k] x [n, k]^T` into `[rows, n]` needs, checked
/// without overflow: the unsafe strides of [`linear`] and [`linear_rows`] rest on them (a
/// wrapped `rows * n` would pass an unchecked comparison with an empty slice).
fn assert_linear_lens(
    out: &[f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    rows: usize,
    n: usize,
    k: usize,
) {
    assert!(
        checked_product(&[rows, n]) == Some(out.len())
            && checked_product(&[rows, k]) == Some(x.len())
            && checked_product(&[n, k]) == Some(w.len())
            && bias.len() == n,
        "linear: slices of {}, {}, {}, {} values for rows {rows}, n {n}, k {k}",
        out.len(),
        x.len(),
        w.len(),
        bias.len()
    );
}

/// SiLU, v * sigmoid(v).
#[inline]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// GELU, tanh approximation (`nn.GELU(approximate="tanh")`).
#[inline]
pub fn gelu_tanh(v: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let cube = v * v * v;
    0.5 * v * (1.0 + (SQRT_2_OVER_PI * (v + 0.044715 * cube)).tanh())
}

/// [`gelu_tanh`] over a slice, on rayon's threads when `parallel`.
pub fn gelu_tanh_inplace(x: &mut [f32], parallel: bool) {
    if parallel {
        x.par_chunks_mut(4096)
            .for_each(|c| c.iter_mut().for_each(|v| *v = gelu_tanh(*v)));
    } else {
        x.iter_mut().for_each(|v| *v = gelu_tanh(*v));
    }
}

/// Sinusoidal timestep features `[N, 256]` exactly as the official f32 code:
/// `freqs = exp(-ln(10000) * arange(128) / 128)`, `args = t * freqs`, `cat[cos, sin]`.
/// Each f32 step is rounded as PyTorch rounds it (the products in f32, the transcendental
/// functions evaluated in f64 and rounded once), so the features match to the last bit or so.
pub fn timestep_features(t: &[i64], out: &mut [f32]) {
    const HALF: usize = crate::weights::FREQ_DIM / 2;
    assert_eq!(out.len(), t.len() * 2 * HALF);
    let neg_log = -(10000f64.ln() as f32);
    for (row, &ti) in out.chunks_exact_mut(2 * HALF).zip(t) {
        let tf = ti as f32;
        for i in 0..HALF {
            let e = (neg_log * i as f32) / HALF as f32;
            let freq = (e as f64).exp() as f32;
            let arg = tf * freq;
            row[i] = (arg as f64).cos() as f32;
            row[HALF + i] = (arg as f64).sin() as f32;
        }
    }
}

/// `out = LN(x) * (1 + scale) + shift` per token: x `[N*T, D]`, shift/scale `[N, D]` read
/// with a row stride of `mod_stride` (they live inside a wider modulation table). LayerNorm
/// eps 1e-6, no affine; statistics accumulated in f64.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_modulate(
    out: &mut [f32],
    x: &[f32],
    shift: &[f32],
    scale: &[f32],
    mod_stride: usize,
    tokens: usize,
    d: usize,
    parallel: bool,
) {
    assert!(out.len() == x.len() && x.len().is_multiple_of(tokens * d));
    let one = |(idx, (o, xr)): (usize, (&mut [f32], &[f32]))| {
        let n = idx / tokens;
        let sh = &shift[n * mod_stride..n * mod_stride + d];
        let sc = &scale[n * mod_stride..n * mod_stride + d];
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr
            .iter()
            .map(|&v| {
                let c = v as f64 - mean;
                c * c
            })
            .sum::<f64>()
            / d as f64;
        let rstd = 1.0 / (var + 1e-6).sqrt();
        for i in 0..d {
            let nv = ((xr[i] as f64 - mean) * rstd) as f32;
            o[i] = nv * (1.0 + sc[i]) + sh[i];
        }
    };
    if parallel {
        out.par_chunks_exact_mut(d)
            .zip(x.par_chunks_exact(d))
            .enumerate()
            .for_each(one);
    } else {
        out.chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .enumerate()
            .for_each(one);
    }
}

/// `x += gate * y` per token: x, y `[N*T, D]`, gate `[N, D]` with row stride `mod_stride`.
pub fn gate_residual(
    x: &mut [f32],
    y: &[f32],
    gate: &[f32],
    mod_stride: usize,
    tokens: usize,
    d: usize,
    parallel: bool,
) {
    assert!(x.len() == y.len() && x.len().is_multiple_of(tokens * d));
    let one = |(idx, (xr, yr)): (usize, (&mut [f32], &[f32]))| {
        let n = idx / tokens;
        let g = &gate[n * mod_stride..n * mod_stride + d];
        for i in 0..d {
            xr[i] += g[i] * yr[i];
        }
    };
    if parallel {
        x.par_chunks_exact_mut(d)
            .zip(y.par_chunks_exact(d))
            .enumerate()
            .for_each(one);
    } else {
        x.chunks_exact_mut(d)
            .zip(y.chunks_exact(d))
            .enumerate()
            .for_each(one);
    }
}

/// Patch extraction for the patch-embedding convolution (kernel = stride = p): images
/// `[N, C, H, W]` -> `[N*T, C*p*p]`, token `gy * grid + gx`, features ordered `(c, i, j)` like
/// the conv weight `[D, C, p, p]`.
pub fn patchify(out: &mut [f32], x: &[f32], n: usize, c: usize, size: usize, p: usize) {
    let g = size / p;
    assert!(x.len() == n * c * size * size && out.len() == x.len());
    let feat = c * p * p;
    for b in 0..n {
        for gy in 0..g {
            for gx in 0..g {
                let row = &mut out[((b * g + gy) * g + gx) * feat..][..feat];
                for ch in 0..c {
                    for i in 0..p {
                        let src = &x[((b * c + ch) * size + gy * p + i) * size + gx * p..][..p];
                        row[(ch * p + i) * p..][..p].copy_from_slice(src);
                    }
                }
            }
        }
    }
}

/// The official unpatchify (`einsum nhwpqc->nchpwq`): `[N*T, p*p*C]` with features ordered
/// `(i, j, c)` -> images `[N, C, H, W]`.
pub fn unpatchify(out: &mut [f32], x: &[f32], n: usize, c: usize, size: usize, p: usize) {
    let g = size / p;
    assert!(x.len() == n * c * size * size && out.len() == x.len());
    let feat = p * p * c;
    for b in 0..n {
        for gy in 0..g {
            for gx in 0..g {
                let row = &x[((b * g + gy) * g + gx) * feat..][..feat];
                for i in 0..p {
                    for j in 0..p {
                        for ch in 0..c {
                            out[((b * c + ch) * size + gy * p + i) * size + gx * p + j] =
                                row[(i * p + j) * c + ch];
                        }
                    }
                }
            }
        }
    }
}

/// Multi-head self-attention core: qkv `[N*T, 3D]` (columns: q of head 0..H, then k, then v,
/// each head `hd` wide) -> out `[N*T, D]` (heads concatenated), `softmax(q k^T / sqrt(hd)) v`.
/// One task per group of (batch, head) pairs on rayon; `scores` is scratch holding at least one
/// `[T, T]` matrix, and as many (up to N*H) as there should be parallel tasks.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    out: &mut [f32],
    qkv: &[f32],
    scores: &mut [f32],
    n: usize,
    tokens: usize,
    heads: usize,
    hd: usize,
) {
    // Checked without overflow: the unsafe strided views below rest on these lengths.
    assert!(
        n > 0
            && tokens > 0
            && heads > 0
            && hd > 0
            && checked_product(&[n, tokens, 3, heads, hd]) == Some(qkv.len())
            && checked_product(&[n, tokens, heads, hd]) == Some(out.len())
            && checked_product(&[tokens, tokens]).is_some(),
        "attention: qkv of {} and out of {} values for n {n}, tokens {tokens}, heads {heads}, \
         head dim {hd}",
        qkv.len(),
        out.len()
    );
    let d = heads * hd;
    let tt = tokens * tokens;
    assert!(
        scores.len() >= tt,
        "attention scratch smaller than one [T, T] matrix"
    );
    let items = n * heads;
    let groups = (scores.len() / tt).min(items);
    let per_group = items.div_ceil(groups);
    let outp = SharedMut(out.as_mut_ptr());
    let scale = 1.0 / (hd as f32).sqrt();
    scores[..groups * tt]
        .par_chunks_exact_mut(tt)
        .enumerate()
        .for_each(|(g, s)| {
            for item in g * per_group..((g + 1) * per_group).min(items) {
                let (b, h) = (item / heads, item % heads);
                let base = b * tokens * 3 * d;
                let q = qkv[base + h * hd..].as_ptr();
                let k = qkv[base + d + h * hd..].as_ptr();
                let v = qkv[base + 2 * d + h * hd..].as_ptr();
                // SAFETY: q, k, v are [T, hd] views with row stride 3D inside qkv (bounds
                // checked above); s is this task's own [T, T]; the output view [T, hd] with row
                // stride D at (b, h) is written by this item only.
                unsafe {
                    gemm(
                        tokens,
                        tokens,
                        hd,
                        s.as_mut_ptr(),
                        1,
                        tokens as isize,
                        false,
                        q,
                        1,
                        3 * d as isize,
                        k,
                        3 * d as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                for row in s.chunks_exact_mut(tokens) {
                    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut sum = 0f32;
                    for e in row.iter_mut() {
                        *e = (*e - m).exp();
                        sum += *e;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|e| *e *= inv);
                }
                let o = outp;
                unsafe {
                    gemm(
                        tokens,
                        hd,
                        tokens,
                        o.0.add(b * tokens * d + h * hd),
                        1,
                        d as isize,
                        false,
                        s.as_ptr(),
                        1,
                        tokens as isize,
                        v,
                        1,
                        3 * d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
}

/// Classifier-free guidance on model rows `[2B, out_ch, H, W]` (`[cond; uncond]`): channels
/// `0..guided` become `uncond + s * (cond - uncond)`. Writes the combined conditional rows to
/// `cond_out` `[B, out_ch, H, W]`; other channels keep the conditional row's values. Panics
/// when the lengths disagree (the caller's bug: the backends size both from the config).
pub fn guide(
    model_out: &[f32],
    rows: usize,
    out_ch: usize,
    hw: usize,
    guided: usize,
    scale: f32,
    cond_out: &mut [f32],
) {
    let b = rows / 2;
    let img = out_ch * hw;
    assert!(rows.is_multiple_of(2) && model_out.len() == rows * img && cond_out.len() == b * img);
    let (cond, uncond) = model_out.split_at(b * img);
    cond_out.copy_from_slice(cond);
    for r in 0..b {
        let g = &mut cond_out[r * img..r * img + guided * hw];
        let u = &uncond[r * img..r * img + guided * hw];
        for (gv, &uv) in g.iter_mut().zip(u) {
            *gv = uv + scale * (*gv - uv);
        }
    }
}
