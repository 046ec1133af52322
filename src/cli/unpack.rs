//! `fora unpack`: the images of an `.npz` (`arr_0` [N, H, W, C] uint8, as `fora generate`, `fora
//! merge` and the official sample_ddp.py write it) as a folder of PNG files named as
//! sample_ddp.py names its samples (`000000.png`, `000001.png`, ...), for the FID tools that
//! read folders (pytorch-fid, clean-fid, torch-fidelity).
//!
//! The folder appears whole or not at all: the images go into a hidden folder beside it, renamed
//! into place once every one is written; an error or a signal removes it.

use super::generate::{stop_on_signal, Stopped};
use anyhow::{ensure, Context, Result};
use clap::Args;
use fora::npz::{NpyDtype, NpzReader};
use fora::png_out::{encode_png, Picture};
use rayon::prelude::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// Images read, encoded (on every core) and written at a time.
const CHUNK: usize = 64;

#[derive(Args, Debug)]
pub(crate) struct UnpackArgs {
    /// The `.npz` whose `arr_0` [N, H, W, C] uint8 (C = 1, gray, or 3, RGB) to write out.
    #[arg(value_name = "NPZ")]
    pub(crate) npz: PathBuf,
    /// The folder to write, absent or empty: image i as `{i:06}.png`.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
}

pub(crate) fn unpack(args: UnpackArgs) -> Result<()> {
    let out = &check_folder(&args.out)?;
    let mut npz = NpzReader::open(&args.npz)?;
    let array = npz.array("arr_0")?;
    let name = args.npz.display();
    let [n, h, w, c] = array.shape[..] else {
        anyhow::bail!(
            "{name}: arr_0 has shape {:?}; images are [N, H, W, C]",
            array.shape
        );
    };
    ensure!(
        array.dtype == NpyDtype::U8,
        "{name}: arr_0 is {:?}; images are uint8",
        array.dtype
    );
    ensure!(n > 0, "{name}: arr_0 holds no images");
    ensure!(
        h > 0 && w > 0 && h <= u32::MAX as usize && w <= u32::MAX as usize,
        "{name}: arr_0's images are {h} x {w}: not a size a PNG can have"
    );
    ensure!(
        c == 1 || c == 3,
        "{name}: arr_0's images have {c} channels; a PNG here is gray (1) or RGB (3)"
    );
    // Within the file's size: NpzReader checked it against the shape.
    let image = h * w * c;
    // A PNG stores at most about the raw bytes (stored deflate blocks) and its chunks.
    let bytes = (n as u64).saturating_mul(image as u64 + image as u64 / 1000 + 1024);
    fora::io::check_free_space("--out", out, bytes)?;

    let signal = stop_on_signal(); // before the staging folder, which it then removes
    let staging = Staging::create(out)?;
    let bar = super::sample::count_bar(args.quiet, n as u64, "images")?;
    let mut data = array.data;
    let mut pixels = vec![0u8; CHUNK * image];
    for first in (0..n).step_by(CHUNK) {
        let count = CHUNK.min(n - first);
        let chunk = &mut pixels[..count * image];
        data.read_exact(chunk)
            .with_context(|| format!("{name}: arr_0 is cut short after image {first}"))?;
        chunk
            .par_chunks_exact(image)
            .enumerate()
            .try_for_each(|(k, pixels)| {
                if signal.load(Ordering::SeqCst) != 0 {
                    return Ok(()); // stopping: the rest of the chunk is not needed
                }
                let picture = Picture {
                    width: w,
                    height: h,
                    channels: c,
                    pixels: pixels.to_vec(),
                };
                let path = staging.dir.join(image_name(first + k));
                std::fs::write(&path, encode_png(&picture)?)
                    .with_context(|| format!("cannot write {}", path.display()))
            })?;
        bar.inc(count as u64);
        let sig = signal.load(Ordering::SeqCst);
        if sig != 0 {
            bar.abandon();
            return Err(Stopped {
                signal: sig as i32,
                what: format!("at image {first} of {n}; nothing written"),
            }
            .into());
        }
    }
    bar.finish_and_clear();
    staging.finish(out)?;
    eprintln!(
        "fora: {n} images {h}x{w}x{c} -> {}/{}..{}",
        out.display(),
        image_name(0),
        image_name(n - 1)
    );
    Ok(())
}

/// Image `i`'s file name, as the official sample_ddp.py names it.
pub(crate) fn image_name(i: usize) -> String {
    format!("{i:06}.png")
}

/// `--out` as its parent folder and its name (`DIR/.` is `DIR`), the folder renamed into place
/// at the end; refused where it is a link (a folder cannot be renamed over one), a file or a
/// folder holding anything, or its parent folder does not exist.
fn check_folder(given: &Path) -> Result<PathBuf> {
    let shown = given.display();
    let name = given
        .file_name()
        .with_context(|| format!("--out {shown}: not a folder path"))?;
    let out = fora::io::parent_folder(given).join(name);
    ensure!(
        !std::fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink()),
        "--out {shown}: a symbolic link; give the folder it leads to"
    );
    if out.exists() {
        ensure!(out.is_dir(), "--out {shown}: exists and is not a folder");
        let mut entries = std::fs::read_dir(&out).with_context(|| format!("--out {shown}"))?;
        ensure!(
            entries.next().is_none(),
            "--out {shown}: the folder is not empty"
        );
    }
    let parent = fora::io::parent_folder(&out);
    ensure!(
        parent.is_dir(),
        "--out {shown}: folder {} does not exist",
        parent.display()
    );
    Ok(out)
}

/// The hidden folder beside `--out` the images are written into; removed when dropped unless
/// [`Staging::finish`] renamed it into place.
struct Staging {
    dir: PathBuf,
    done: bool,
}

impl Staging {
    fn create(out: &Path) -> Result<Staging> {
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        let dir = fora::io::parent_folder(out).join(format!(".{name}.tmp.{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
        Ok(Staging { dir, done: false })
    }

    /// Renames the folder to `out` (an empty folder there is replaced).
    fn finish(mut self, out: &Path) -> Result<()> {
        std::fs::rename(&self.dir, out)
            .with_context(|| format!("cannot move {} to {}", self.dir.display(), out.display()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
