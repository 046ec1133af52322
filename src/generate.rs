//! Many images for an evaluation (`fora generate`): the class ids, each batch's noise seed, and
//! the 8-bit images, as the official `sample_ddp.py` makes the 50,000 samples of an FID.
//!
//! The official script draws each batch's labels uniformly over the classes and its noise from
//! PyTorch's generator; fora draws both from its own Philox ([`crate::rng`]). The class ids
//! depend on the run's seed only; each batch's noise comes from its own seed, derived from the
//! run's seed and the batch's index, so a run of one seed and batch size draws the same labels
//! and noise on every machine.

use crate::rng::philox4x32_10;
use anyhow::{ensure, Context, Result};
use std::ops::Range;

/// The `.npz` array in which `fora generate` records its run and shard: `[shard index, shard
/// count, images of the whole run, batch size, seed, first image of the shard, settings hash]`
/// as int64 (the seed and the hash are 64-bit patterns). `fora merge` checks and joins the
/// shards by it.
pub const RUN_ARRAY: &str = "fora_run";

/// Writes the [`RUN_ARRAY`] record `run` into `npz`.
pub fn write_run<W: std::io::Write + std::io::Seek>(
    npz: &mut crate::npz::NpzWriter<W>,
    run: [u64; 7],
) -> Result<()> {
    npz.start_array(RUN_ARRAY, crate::npz::NpyDtype::I64, &[run.len()])?;
    npz.write(
        &run.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
}

/// A 64-bit FNV-1a hash of `settings` (a run's description: model and decoder fingerprints,
/// sampling settings, backend), recorded in [`RUN_ARRAY`].
pub fn settings_hash(settings: &str) -> u64 {
    crate::fnv::bytes(crate::fnv::OFFSET, settings.as_bytes())
}

/// A part of a run (`--shard I/N`): shard `index` of `count` takes a contiguous run of batches,
/// so that the shards' images, joined in order, are the whole run's, byte for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// 0-based.
    pub index: u64,
    /// Shards of the run (1: the whole run).
    pub count: u64,
}

impl Shard {
    /// The whole run.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The batches of this shard among a run's `batches`: contiguous, in order; the shards'
    /// counts differ by one at most.
    pub fn batches(&self, batches: u64) -> Range<u64> {
        let at = |i: u64| (batches as u128 * i as u128 / self.count as u128) as u64;
        at(self.index)..at(self.index + 1)
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    /// `I/N`: shard I (from 0) of N.
    fn from_str(text: &str) -> Result<Shard> {
        let (i, n) = text
            .split_once('/')
            .with_context(|| format!("{text:?} is not I/N (shard I, from 0, of N)"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<u64>()
                .with_context(|| format!("{text:?}: {v:?} is not a whole number"))
        };
        let (index, count) = (parse(i)?, parse(n)?);
        ensure!(
            count > 0 && index < count,
            "{text:?}: shard I of N needs 0 <= I < N"
        );
        Ok(Shard { index, count })
    }
}

/// The Philox stream (counter words 2 and 3) of the class ids. The sampler's noise uses streams
/// 0 to 1000 (x_T, then a stream a step) under a batch's own seed: none of them is this one.
const CLASS_STREAM: u64 = u64::MAX;
/// The Philox stream of the batch seeds.
const BATCH_SEED_STREAM: u64 = u64::MAX - 1;

/// Four Philox words of `index` in `stream` under `seed`.
fn words(seed: u64, stream: u64, index: u64) -> [u32; 4] {
    philox4x32_10(
        [
            index as u32,
            (index >> 32) as u32,
            stream as u32,
            (stream >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The class ids of images `first..first + count` of a run of `seed`: independent and uniform
/// over `0..num_classes` (the official script's `torch.randint(0, num_classes, (n,))`). Image
/// `i`'s id is the high word of `word0 * num_classes` (Lemire's multiply-shift; its bias, under
/// `num_classes / 2^32`, is a 4-millionth at 1000 classes), so any range of a run can be drawn
/// alone. Panics if `num_classes` is 0 or past `u32::MAX`.
pub fn class_ids(seed: u64, first: u64, count: usize, num_classes: usize) -> Vec<usize> {
    let n = u32::try_from(num_classes).expect("class count fits in 32 bits");
    assert!(n > 0, "class ids need at least one class");
    (first..first + count as u64)
        .map(|i| ((words(seed, CLASS_STREAM, i)[0] as u64 * n as u64) >> 32) as usize)
        .collect()
}

/// The noise seed of batch `batch` of a run of `seed` (a Philox output: batches' noise is
/// independent, and a run of another seed shares none of them but by chance).
pub fn batch_seed(seed: u64, batch: u64) -> u64 {
    let w = words(seed, BATCH_SEED_STREAM, batch);
    w[0] as u64 | (w[1] as u64) << 32
}

/// A sample value in [-1, 1] as 8 bits, as the official `sample_ddp.py`:
/// `clamp(127.5 * x + 128, 0, 255)` in f32 (a multiply, then an add), truncated to `uint8`.
pub fn to_u8(v: f32) -> u8 {
    let scaled = 127.5f32 * v;
    (scaled + 128.0).clamp(0.0, 255.0) as u8
}

/// Images `[B, C, H, W]` f32 as `[B, H, W, C]` 8-bit values ([`to_u8`]), the layout of the
/// official `.npz` (`permute(0, 2, 3, 1)`).
pub fn to_nhwc_u8(images: &[f32], shape: [usize; 4]) -> Vec<u8> {
    let [b, c, h, w] = shape;
    assert_eq!(images.len(), b * c * h * w, "images do not fill {shape:?}");
    let mut out = Vec::with_capacity(images.len());
    for img in images.chunks_exact(c * h * w) {
        for p in 0..h * w {
            out.extend((0..c).map(|ch| to_u8(img[ch * h * w + p])));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_ids_are_uniform_and_fixed_by_the_seed() {
        let ids = class_ids(3, 0, 100_000, 1000);
        assert_eq!(ids, class_ids(3, 0, 100_000, 1000));
        assert_ne!(ids[..100], class_ids(4, 0, 100, 1000)[..]);
        // A range of a run is that range of the longer run.
        assert_eq!(ids[..10], class_ids(3, 0, 10, 1000)[..]);
        assert_eq!(ids[500..532], class_ids(3, 500, 32, 1000)[..]);
        let mut counts = vec![0usize; 1000];
        ids.iter().for_each(|&i| counts[i] += 1);
        // 100 expected a class; a count off by 6 standard deviations (10) fails.
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*lo > 40 && *hi < 160, "counts from {lo} to {hi}");
        assert_eq!(class_ids(9, 7, 50, 1), vec![0; 50]);
    }

    #[test]
    fn shards_cover_the_run_in_order() {
        for (batches, count) in [(1563, 8), (3, 2), (5, 5), (7, 3), (2, 4)] {
            let mut next = 0;
            for index in 0..count {
                let r = Shard { index, count }.batches(batches);
                assert_eq!(r.start, next);
                let size = r.end - r.start;
                assert!(size == batches / count || size == batches / count + 1);
                next = r.end;
            }
            assert_eq!(next, batches);
        }
        assert_eq!(
            "2/8".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 8 }
        );
        for bad in ["8/8", "1/0", "3", "a/2", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn batch_seeds_differ() {
        let seeds: std::collections::BTreeSet<u64> = (0..1000).map(|j| batch_seed(0, j)).collect();
        assert_eq!(seeds.len(), 1000);
        assert_ne!(batch_seed(0, 0), batch_seed(1, 0));
    }

    #[test]
    fn eight_bits_as_the_official_script() {
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(0.0), 128);
        assert_eq!(to_u8(-3.0), 0);
        assert_eq!(to_u8(7.0), 255);
        // 127.5 * x + 128 truncated: -1/255 -> 127.5, truncated to 127.
        assert_eq!(to_u8(-1.0 / 255.0), 127);
        let nhwc = to_nhwc_u8(&[-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [1, 3, 1, 2]);
        assert_eq!(nhwc, [0, 255, 128, 128, 128, 128]);
    }
}
