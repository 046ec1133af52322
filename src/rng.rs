//! The project's Gaussian noise: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
//! as 1, 2, 3", SC 2011) plus Box-Muller, specified exactly so that a CUDA kernel computes the
//! same numbers from the same `(seed, stream, index)` with no state to carry between threads.
//!
//! # The exact recipe (re-implement it literally on a GPU)
//!
//! For normal number `index` of stream `stream` under seed `seed`:
//!
//! ```text
//! block = index / 4          lane = index % 4
//! key     = [lo32(seed), hi32(seed)]
//! counter = [lo32(block), hi32(block), lo32(stream), hi32(stream)]
//! [r0, r1, r2, r3] = philox4x32_10(counter, key)
//! (a, b) = lane < 2 ? (r0, r1) : (r2, r3)
//! u     = f32((a >> 8) + 1) * 2^-24          // in (0, 1], exact in f32: log(u) is finite
//! v     = f32(b >> 8) * 2^-24                // in [0, 1), exact in f32
//! rad   = sqrtf(-2.0f * logf(u))             // single precision throughout
//! theta = 6.2831855f * v                     // 2*pi rounded to f32, one f32 multiply
//! normal = lane is even ? rad * cosf(theta) : rad * sinf(theta)
//! ```
//!
//! One Philox call yields four normals (two Box-Muller pairs), so a GPU thread that owns four
//! consecutive indices makes one call. `u`, `v`, `theta` and the products are exactly
//! reproducible (single IEEE operations); `logf`, `sqrtf`, `cosf`, `sinf` are the only
//! library calls, and CUDA's non-fast-math versions are within an ulp or two of the host
//! libm, so CPU and GPU noise agree to ~1e-6 relative, not bit for bit.
//!
//! Streams: the sampler draws x_T from stream 0 and the noise of loop step k from stream k + 1.

/// Philox4x32 round multipliers and Weyl key increments (Random123's constants).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// 2^-24: scales a 24-bit integer into [0, 1) exactly.
const INV_2_POW_24: f32 = 1.0 / 16_777_216.0;
/// 2*pi rounded to the nearest f32.
const TWO_PI_F32: f32 = std::f32::consts::TAU;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds (the Random123 `philox4x32_10`): one block of four u32 from a
/// 128-bit counter and a 64-bit key.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, c[0]);
        let (hi1, lo1) = mulhilo(PHILOX_M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four standard normals of Philox block `block` (indices `4*block .. 4*block + 4`).
#[inline]
fn normal_block(seed: u64, stream: u64, block: u64) -> [f32; 4] {
    let key = [seed as u32, (seed >> 32) as u32];
    let counter = [
        block as u32,
        (block >> 32) as u32,
        stream as u32,
        (stream >> 32) as u32,
    ];
    let r = philox4x32_10(counter, key);
    let (a, b) = box_muller(r[0], r[1]);
    let (c, d) = box_muller(r[2], r[3]);
    [a, b, c, d]
}

/// Box-Muller on two u32: (rad * cos(theta), rad * sin(theta)) in f32, as the module docs say.
#[inline]
fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let u = ((a >> 8) + 1) as f32 * INV_2_POW_24;
    let v = (b >> 8) as f32 * INV_2_POW_24;
    let rad = (-2.0f32 * u.ln()).sqrt();
    let theta = TWO_PI_F32 * v;
    (rad * theta.cos(), rad * theta.sin())
}

/// Standard normal number `index` of `stream` under `seed`.
pub fn normal(seed: u64, stream: u64, index: u64) -> f32 {
    normal_block(seed, stream, index / 4)[(index % 4) as usize]
}

/// Fills `out[j] = normal(seed, stream, j)`, one Philox call per four numbers.
pub fn fill_normal(seed: u64, stream: u64, out: &mut [f32]) {
    for (block, chunk) in out.chunks_mut(4).enumerate() {
        let n = normal_block(seed, stream, block as u64);
        chunk.copy_from_slice(&n[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123 `tests/kat_vectors`, the three `philox4x32 10` lines (counter, key, expected).
    #[test]
    fn philox_known_answers() {
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0, 0, 0, 0],
                [0, 0],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in kat {
            assert_eq!(
                philox4x32_10(ctr, key),
                want,
                "counter {ctr:x?} key {key:x?}"
            );
        }
    }

    #[test]
    fn fill_matches_pointwise_and_is_deterministic() {
        let mut a = vec![0f32; 1001];
        fill_normal(42, 3, &mut a);
        for (j, &x) in a.iter().enumerate() {
            assert_eq!(x.to_bits(), normal(42, 3, j as u64).to_bits(), "index {j}");
        }
        let mut b = vec![0f32; 1001];
        fill_normal(42, 3, &mut b);
        assert_eq!(a, b);
        let mut other_stream = vec![0f32; 1001];
        fill_normal(42, 4, &mut other_stream);
        let mut other_seed = vec![0f32; 1001];
        fill_normal(43, 3, &mut other_seed);
        let same = |x: &[f32], y: &[f32]| x.iter().zip(y).filter(|(p, q)| p == q).count();
        assert!(same(&a, &other_stream) < 5);
        assert!(same(&a, &other_seed) < 5);
        // The high halves of seed and stream matter too.
        assert_ne!(normal(1, 0, 0), normal(1 | (1 << 32), 0, 0));
        assert_ne!(normal(1, 0, 0), normal(1, 1 << 32, 0));
        assert_ne!(normal(1, 0, 0), normal(1, 0, 4 << 32));
    }

    #[test]
    fn moments_are_standard_normal() {
        let n = 1 << 20;
        let mut x = vec![0f32; n];
        fill_normal(7, 1, &mut x);
        assert!(x.iter().all(|v| v.is_finite()));
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt =
            x.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n as f64 / var.powi(2);
        // Standard errors at n = 2^20: mean ~0.001, variance ~0.0014, kurtosis ~0.005.
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.007, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.03, "kurtosis {kurt}");
        let tail = x.iter().filter(|v| v.abs() > 1.959964).count() as f64 / n as f64;
        assert!((tail - 0.05).abs() < 0.002, "two-sided 5% tail {tail}");
    }
}
