//! `fora merge`: the shards of a `fora generate --shard I/N` run joined into the whole run's
//! `.npz`.

use anyhow::{ensure, Context, Result};
use clap::Args;
use fora::generate::RUN_ARRAY;
use fora::npz::{NpyDtype, NpzReader, NpzWriter};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// The shards' `.npz` files (`fora generate --shard I/N`), all N of one run, in any order.
    #[arg(required = true, value_name = "PART")]
    pub(crate) parts: Vec<PathBuf>,
    /// Output `.npz`: the whole run's `arr_0`, `labels` and `fora_run`, as one `fora generate`
    /// without --shard writes them.
    #[arg(long, value_name = "OUT")]
    pub(crate) out: PathBuf,
}

/// One shard file: its run record and its images' shape.
pub(crate) struct Part {
    pub(crate) path: PathBuf,
    /// `fora_run`: shard index, shard count, images of the run, batch, seed, first image,
    /// settings hash.
    pub(crate) run: [u64; 7],
    /// `arr_0`'s `[images, H, W, C]`.
    pub(crate) shape: Vec<usize>,
}

impl Part {
    pub(crate) fn read(path: &Path) -> Result<Part> {
        let mut npz = NpzReader::open(path)?;
        let name = path.display();
        let mut run = npz.array(RUN_ARRAY).with_context(|| {
            format!("{name}: not a file of fora generate (no {RUN_ARRAY} array)")
        })?;
        ensure!(
            run.dtype == NpyDtype::I64 && run.shape == [7],
            "{name}: {RUN_ARRAY} is not 7 int64 values"
        );
        let mut bytes = [0u8; 56];
        run.data
            .read_exact(&mut bytes)
            .with_context(|| format!("{name}: {RUN_ARRAY}"))?;
        let mut values = [0u64; 7];
        for (v, b) in values.iter_mut().zip(bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
        drop(run);
        let images = npz.array("arr_0")?;
        ensure!(
            images.dtype == NpyDtype::U8
                && images.shape.len() == 4
                && images.shape[1..].iter().all(|&d| d > 0),
            "{name}: arr_0 is not uint8 [N, H, W, C] (H, W, C > 0)"
        );
        let shape = images.shape.clone();
        drop(images);
        let mut labels = npz.array("labels")?;
        ensure!(
            labels.dtype == NpyDtype::I64 && labels.shape == [shape[0]],
            "{name}: labels are not int64 [{}]",
            shape[0]
        );
        // Class ids (the file records no class count: at least none negative).
        let mut buf = vec![0u8; 8 << 10];
        let mut left = shape[0];
        let mut index = 0;
        while left > 0 {
            let chunk = &mut buf[..8 * left.min(1 << 10)];
            labels
                .data
                .read_exact(chunk)
                .with_context(|| format!("{name}: labels"))?;
            for b in chunk.chunks_exact(8) {
                let label = i64::from_le_bytes(b.try_into().expect("8 bytes"));
                ensure!(label >= 0, "{name}: label {index} is {label}, no class id");
                index += 1;
            }
            left -= chunk.len() / 8;
        }
        Ok(Part {
            path: path.to_path_buf(),
            run: values,
            shape,
        })
    }
}

/// Streams array `name` of every part, in order, into `npz` (started by the caller).
fn copy_arrays<W: std::io::Write + std::io::Seek>(
    parts: &[Part],
    name: &str,
    npz: &mut NpzWriter<W>,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 24];
    for part in parts {
        let mut reader = NpzReader::open(&part.path)?;
        let mut array = reader.array(name)?;
        loop {
            let got = array
                .data
                .read(&mut buf)
                .with_context(|| format!("{}: array {name}", part.path.display()))?;
            if got == 0 {
                break;
            }
            npz.write(&buf[..got])?;
        }
    }
    Ok(())
}

pub(crate) fn merge(args: MergeArgs) -> Result<()> {
    fora::io::check_seekable_output("--out", &args.out, &["npz"])?;
    let mut parts = args
        .parts
        .iter()
        .map(|p| Part::read(p))
        .collect::<Result<Vec<_>>>()?;
    parts.sort_by_key(|p| p.run[0]);
    // One run (shard count, images, batch, seed), every shard once, each where the one before
    // it ends, the images of one shape, and all of the run's images.
    let [_, count, n, batch, seed, _, settings] = parts[0].run;
    let mut next = 0u64;
    for (i, part) in parts.iter().enumerate() {
        let name = part.path.display();
        let [index, c, pn, pb, ps, first, set] = part.run;
        ensure!(
            (c, pn, pb, ps) == (count, n, batch, seed),
            "{name}: shard {index}/{c} of a run of {pn} images, batch {pb}, seed {ps}; {} is of \
             a run of {n} images, batch {batch}, seed {seed} in {count} shards",
            parts[0].path.display()
        );
        ensure!(
            set == settings,
            "{name}: made with other settings than {} (model, decoder, sampling flags, or the \
             GPU kind and options: settings hash {set:016x}, not {settings:016x})",
            parts[0].path.display()
        );
        ensure!(
            index == i as u64,
            "{}shard {i} of {count} is missing (the files hold shards {:?})",
            if index < i as u64 {
                "a shard is given twice, or "
            } else {
                ""
            },
            parts.iter().map(|p| p.run[0]).collect::<Vec<_>>()
        );
        ensure!(
            first == next && part.shape[1..] == parts[0].shape[1..],
            "{name}: shard {index} holds images {first}.. of shape {:?}; the shards before it \
             end at {next}, of shape {:?}",
            &part.shape[1..],
            &parts[0].shape[1..]
        );
        next = next
            .checked_add(part.shape[0] as u64)
            .context("the shards' image counts overflow")?;
    }
    ensure!(
        parts.len() as u64 == count && next == n,
        "{} of {count} shards, holding {next} of the run's {n} images",
        parts.len()
    );
    // As the whole run's own file records it.
    join(&parts, &args.out, [0, 1, n, batch, seed, 0, settings])?;
    eprintln!(
        "fora: {count} shard(s), {n} images [{}] -> {}",
        parts[0].shape[1..]
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.out.display()
    );
    Ok(())
}

/// Writes `parts` (checked: consecutive images of one run, of one shape) into `out` as one
/// file with the run record `run`: their images, then their labels, streamed in order.
pub(crate) fn join(parts: &[Part], out: &Path, run: [u64; 7]) -> Result<()> {
    let [_, h, w, c] = parts[0].shape[..] else {
        unreachable!("arr_0 is 4-d, checked by Part::read")
    };
    let n: u64 = parts.iter().map(|p| p.shape[0] as u64).sum();
    let images = usize::try_from(n).context("images")?;
    let image = (h as u64)
        .checked_mul(w as u64)
        .and_then(|hw| hw.checked_mul(c as u64))
        .context("an image's bytes overflow")?;
    let bytes = n
        .checked_mul(image.saturating_add(8))
        .and_then(|b| b.checked_add(3 * 128 + 1024))
        .context("the images' bytes overflow")?;
    fora::io::check_free_space("--out", out, bytes)?;
    fora::io::write_atomic_with(out, |path| {
        let mut npz = NpzWriter::create(path)?;
        npz.start_array("arr_0", NpyDtype::U8, &[images, h, w, c])?;
        copy_arrays(parts, "arr_0", &mut npz)?;
        npz.start_array("labels", NpyDtype::I64, &[images])?;
        copy_arrays(parts, "labels", &mut npz)?;
        fora::generate::write_run(&mut npz, run)?;
        npz.close(path)
    })
}
