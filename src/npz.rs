//! NumPy `.npz` output written as the data come: a zip archive (stored, ZIP64) of `.npy` arrays
//! (format 1.0), each array's header first, then its bytes in any number of pieces. The
//! 50,000 images of an FID evaluation (9.8 GB at 256 x 256) are never in memory at once, and
//! the file is what `numpy.load` and the ADM evaluation suite (`arr_0`) read. [`NpzReader`]
//! reads such files back, an array at a time, as a stream.

use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

/// An element type of an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    /// `uint8`.
    U8,
    /// `int64`, little-endian.
    I64,
}

impl NpyDtype {
    /// NumPy's type string (`descr`).
    fn descr(self) -> &'static str {
        match self {
            NpyDtype::U8 => "|u1",
            NpyDtype::I64 => "<i8",
        }
    }

    /// Bytes an element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::U8 => 1,
            NpyDtype::I64 => 8,
        }
    }
}

/// The header of a C-order `.npy` file (format 1.0) of `dtype` and `shape`, byte for byte as
/// NumPy writes it: the magic, the version, the header length, and the header dict with room
/// for the first axis to grow to 21 digits, padded with 1 to 64 spaces and a newline so that the
/// data start at a multiple of 64 bytes.
pub fn npy_header(dtype: NpyDtype, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}",
        dtype.descr()
    );
    if let Some(first) = shape.first() {
        dict.push_str(&" ".repeat(21usize.saturating_sub(first.to_string().len())));
    }
    // 6 magic + 2 version + 2 length bytes, then the dict and its newline.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(64 - unpadded % 64));
    dict.push('\n');
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header
}

/// An `.npz` archive being written: [`NpzWriter::start_array`], then the array's bytes with
/// [`NpzWriter::write`], for each array; then [`NpzWriter::finish`]. An array given fewer or
/// more bytes than its shape holds is an error, never a file NumPy cannot read.
pub struct NpzWriter<W: Write + Seek> {
    /// None once finished.
    zip: Option<ZipWriter<Sink<W>>>,
    /// The array being written and the bytes it still needs.
    open: Option<(String, u64)>,
}

/// An [`NpzWriter`]'s output. The zip crate finishes an archive it drops and prints to stderr
/// where that fails (a full disk): once a write or seek here has failed, or the writer is
/// dropped unfinished, the sink takes everything and writes nothing (its position following
/// what it is given), so that the failure is reported once, by the call that met it, and an
/// archive abandoned is not completed.
struct Sink<W> {
    inner: W,
    quiet: std::cell::Cell<bool>,
    pos: u64,
    end: u64,
}

impl<W> Sink<W> {
    /// `r`, going quiet where it is an error.
    fn watch<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        // (An interrupted call is retried by its caller, write_all: not a failure.)
        if r.as_ref()
            .is_err_and(|e| e.kind() != std::io::ErrorKind::Interrupted)
        {
            self.quiet.set(true);
        }
        r
    }

    fn moved_to(&mut self, pos: u64) -> u64 {
        self.pos = pos;
        self.end = self.end.max(pos);
        pos
    }
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = if self.quiet.get() {
            buf.len()
        } else {
            let r = self.inner.write(buf);
            self.watch(r)?
        };
        self.moved_to(self.pos + n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.quiet.get() {
            return Ok(());
        }
        let r = self.inner.flush();
        self.watch(r)
    }
}

impl<W: Seek> Seek for Sink<W> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        use std::io::SeekFrom;
        if !self.quiet.get() {
            let r = self.inner.seek(to);
            let pos = self.watch(r)?;
            return Ok(self.moved_to(pos));
        }
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.end.checked_add_signed(d),
        }
        .ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(self.moved_to(pos))
    }
}

impl<W: Write + Seek> Drop for NpzWriter<W> {
    fn drop(&mut self) {
        if let Some(sink) = self.zip.as_ref().and_then(|z| z.get_ref()) {
            sink.quiet.set(true);
        }
    }
}

impl<W: Write + Seek> NpzWriter<W> {
    /// An empty archive on `out`.
    pub fn new(out: W) -> NpzWriter<W> {
        NpzWriter {
            zip: Some(ZipWriter::new(Sink {
                inner: out,
                quiet: std::cell::Cell::new(false),
                pos: 0,
                end: 0,
            })),
            open: None,
        }
    }

    /// The archive, until it is finished.
    fn zip(&mut self) -> Result<&mut ZipWriter<Sink<W>>> {
        self.zip.as_mut().context("npz: the archive is finished")
    }

    /// Starts array `name` (`name.npy` in the archive; NumPy's positional arrays are `arr_0`,
    /// `arr_1`, ...) of `dtype` and `shape`, C order.
    pub fn start_array(&mut self, name: &str, dtype: NpyDtype, shape: &[usize]) -> Result<()> {
        self.ensure_complete()?;
        let bytes = shape
            .iter()
            .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d as u64))
            .with_context(|| format!("array {name} {shape:?}: its size overflows"))?;
        // Stored, not compressed: images barely compress and the evaluator reads them back
        // at once; ZIP64 for arrays past 4 GiB.
        // A fixed time (the zip epoch): the same arrays make the same file.
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .last_modified_time(zip::DateTime::default())
            .large_file(true);
        let zip = self.zip()?;
        zip.start_file(format!("{name}.npy"), options)
            .with_context(|| format!("starting array {name}"))?;
        zip.write_all(&npy_header(dtype, shape))
            .with_context(|| format!("writing array {name}"))?;
        self.open = Some((name.to_string(), bytes));
        Ok(())
    }

    /// The next bytes of the array being written (C order, little-endian).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let (name, left) = self
            .open
            .as_mut()
            .context("npz: bytes written before any array was started")?;
        ensure!(
            bytes.len() as u64 <= *left,
            "array {name}: {} more bytes than its shape holds",
            bytes.len() as u64 - *left
        );
        self.zip
            .as_mut()
            .context("npz: the archive is finished")?
            .write_all(bytes)
            .with_context(|| format!("writing array {name}"))?;
        *left -= bytes.len() as u64;
        Ok(())
    }

    /// Ends the archive (its central directory) and gives back the writer.
    pub fn finish(mut self) -> Result<W> {
        self.ensure_complete()?;
        let zip = self.zip.take().context("npz: the archive is finished")?;
        let sink = zip.finish().context("finishing the npz archive")?;
        Ok(sink.inner)
    }

    /// An error where the array being written is short of bytes.
    fn ensure_complete(&mut self) -> Result<()> {
        if let Some((name, left)) = self.open.take() {
            ensure!(left == 0, "array {name}: {left} bytes short of its shape");
        }
        Ok(())
    }
}

impl NpzWriter<std::io::BufWriter<File>> {
    /// An empty archive in a new file at `path` (buffered).
    pub fn create(path: &Path) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(NpzWriter::new(std::io::BufWriter::new(file)))
    }

    /// [`NpzWriter::finish`], the buffer flushed to the file (`path` names it in an error).
    pub fn close(self, path: &Path) -> Result<()> {
        self.finish()?
            .into_inner()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {}", path.display(), e.error()))?;
        Ok(())
    }
}

/// An `.npz` file read back: its arrays' headers checked, their bytes streamed. Reads what
/// [`NpzWriter`] writes (and NumPy's own files of the same types): `.npy` format 1.0, C order,
/// `uint8` or little-endian `int64`.
pub struct NpzReader {
    path: PathBuf,
    zip: ZipArchive<BufReader<File>>,
}

/// One array of an [`NpzReader`]: its type and shape, and a reader of its bytes (C order).
pub struct NpyArray<'a> {
    /// Element type.
    pub dtype: NpyDtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The array's bytes, after the header.
    pub data: Box<dyn Read + 'a>,
}

impl NpzReader {
    /// Opens the `.npz` at `path`.
    pub fn open(path: &Path) -> Result<NpzReader> {
        // A FIFO would block the open for ever, a folder give an unclear error.
        let (file, _) = crate::io::open_regular(path, "")?;
        let zip = ZipArchive::new(BufReader::new(file))
            .with_context(|| format!("{}: not an .npz (zip) file", path.display()))?;
        Ok(NpzReader {
            path: path.to_path_buf(),
            zip,
        })
    }

    /// Array `name` (`name.npy` in the archive): its header read and checked.
    pub fn array(&mut self, name: &str) -> Result<NpyArray<'_>> {
        let path = self.path.display().to_string();
        let mut entry = self
            .zip
            .by_name(&format!("{name}.npy"))
            .with_context(|| format!("{path}: no array {name}"))?;
        ensure!(
            entry.compression() == CompressionMethod::Stored,
            "{path}: array {name} is compressed ({:?}; numpy.savez_compressed): only stored \
             arrays (numpy.savez, fora generate) are read",
            entry.compression()
        );
        let mut lead = [0u8; 10];
        entry
            .read_exact(&mut lead)
            .with_context(|| format!("{path}: array {name}: no .npy header"))?;
        ensure!(
            &lead[..8] == b"\x93NUMPY\x01\x00",
            "{path}: array {name}: not an .npy array of format 1.0"
        );
        let header_len = u16::from_le_bytes([lead[8], lead[9]]) as u64;
        let mut dict = vec![0u8; header_len as usize];
        entry
            .read_exact(&mut dict)
            .with_context(|| format!("{path}: array {name}: its .npy header is cut short"))?;
        let dict = String::from_utf8_lossy(&dict);
        let (dtype, shape) =
            parse_header(&dict).with_context(|| format!("{path}: array {name}: {dict:?}"))?;
        let bytes = shape
            .iter()
            .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d as u64))
            .with_context(|| format!("{path}: array {name}: its size {shape:?} overflows"))?;
        ensure!(
            Some(entry.size()) == bytes.checked_add(10 + header_len),
            "{path}: array {name}: {} bytes of data, its shape {shape:?} needs {bytes}",
            entry.size().saturating_sub(10 + header_len)
        );
        Ok(NpyArray {
            dtype,
            shape,
            data: Box::new(entry),
        })
    }
}

/// The dtype and shape of an `.npy` header dict, of the types [`NpyDtype`] names, C order.
fn parse_header(dict: &str) -> Result<(NpyDtype, Vec<usize>)> {
    let field = |key: &str, open: char, close: char| -> Result<&str> {
        let at = dict
            .find(&format!("'{key}': "))
            .with_context(|| format!("no {key}"))?
            + key.len()
            + 4;
        let rest = dict[at..]
            .strip_prefix(open)
            .with_context(|| format!("{key} is not a {open}...{close}"))?;
        let end = rest
            .find(close)
            .with_context(|| format!("{key} does not end"))?;
        Ok(&rest[..end])
    };
    let dtype = match field("descr", '\'', '\'')? {
        "|u1" => NpyDtype::U8,
        "<i8" => NpyDtype::I64,
        other => bail!("dtype {other}: not uint8 or little-endian int64"),
    };
    ensure!(dict.contains("'fortran_order': False"), "not in C order");
    let shape = field("shape", '(', ')')?
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse::<usize>()
                .with_context(|| format!("dimension {d:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((dtype, shape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    #[test]
    fn headers_are_numpys() {
        // numpy.save's headers (NumPy 2.4): 118 bytes of dict, spaces and newline here.
        for (dtype, shape, dict) in [
            (
                NpyDtype::U8,
                &[5usize, 32, 32, 3][..],
                "{'descr': '|u1', 'fortran_order': False, 'shape': (5, 32, 32, 3), }",
            ),
            (
                NpyDtype::I64,
                &[7],
                "{'descr': '<i8', 'fortran_order': False, 'shape': (7,), }",
            ),
            (
                NpyDtype::U8,
                &[2, 3],
                "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3), }",
            ),
        ] {
            let mut want = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
            want.extend_from_slice(format!("{dict:<117}\n").as_bytes());
            assert_eq!(npy_header(dtype, shape), want, "{shape:?}");
        }
        // A first axis of 50,000: the same length (its growth room shrinks).
        assert_eq!(npy_header(NpyDtype::U8, &[50_000, 256, 256, 3]).len(), 128);
    }

    #[test]
    fn arrays_round_trip_and_wrong_sizes_are_refused() {
        let mut npz = NpzWriter::new(Cursor::new(Vec::new()));
        npz.start_array("arr_0", NpyDtype::U8, &[2, 3]).unwrap();
        npz.write(&[1, 2]).unwrap();
        npz.write(&[3, 4, 5, 6]).unwrap();
        let e = npz.write(&[7]).unwrap_err().to_string();
        assert!(e.contains("1 more bytes"), "{e}");
        npz.start_array("labels", NpyDtype::I64, &[1]).unwrap();
        npz.write(&(-3i64).to_le_bytes()).unwrap();
        let bytes = npz.finish().unwrap().into_inner();
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        let mut read = |name: &str| {
            let mut v = Vec::new();
            zip.by_name(name).unwrap().read_to_end(&mut v).unwrap();
            v
        };
        let arr = read("arr_0.npy");
        assert_eq!(arr[..128], npy_header(NpyDtype::U8, &[2, 3]));
        assert_eq!(&arr[128..], [1, 2, 3, 4, 5, 6]);
        let labels = read("labels.npy");
        assert_eq!(&labels[128..], (-3i64).to_le_bytes());

        let mut short = NpzWriter::new(Cursor::new(Vec::new()));
        short.start_array("arr_0", NpyDtype::U8, &[4]).unwrap();
        short.write(&[1, 2, 3]).unwrap();
        let e = format!("{:#}", short.finish().err().unwrap());
        assert!(e.contains("1 bytes short"), "{e}");
        let mut none = NpzWriter::new(Cursor::new(Vec::new()));
        assert!(none.write(&[1]).is_err());
    }

    #[test]
    fn the_reader_reads_what_the_writer_wrote() {
        let dir = std::env::temp_dir().join(format!("fora-npz-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npz");
        let mut npz = NpzWriter::new(std::fs::File::create(&path).unwrap());
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| (i * 7) as u8).collect();
        npz.start_array("arr_0", NpyDtype::U8, &[2, 3, 4]).unwrap();
        npz.write(&pixels).unwrap();
        npz.start_array("labels", NpyDtype::I64, &[2]).unwrap();
        npz.write(&[5i64.to_le_bytes(), (-1i64).to_le_bytes()].concat())
            .unwrap();
        npz.finish().unwrap();
        let mut r = NpzReader::open(&path).unwrap();
        let mut a = r.array("arr_0").unwrap();
        assert_eq!((a.dtype, a.shape.clone()), (NpyDtype::U8, vec![2, 3, 4]));
        let mut got = Vec::new();
        a.data.read_to_end(&mut got).unwrap();
        assert_eq!(got, pixels);
        drop(a);
        let l = r.array("labels").unwrap();
        assert_eq!((l.dtype, l.shape.clone()), (NpyDtype::I64, vec![2]));
        drop(l);
        let e = format!("{:#}", r.array("nope").err().unwrap());
        assert!(e.contains("no array nope"), "{e}");
        // Headers it does not take, and files that are not .npz, are refused by name.
        assert!(parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }").is_err());
        assert!(parse_header("{'descr': '|u1', 'fortran_order': True, 'shape': (2,), }").is_err());
        assert_eq!(
            parse_header("{'descr': '<i8', 'fortran_order': False, 'shape': (), }").unwrap(),
            (NpyDtype::I64, vec![])
        );
        std::fs::write(dir.join("b.npz"), b"not a zip").unwrap();
        let e = format!("{:#}", NpzReader::open(&dir.join("b.npz")).err().unwrap());
        assert!(e.contains("b.npz") && e.contains("not an .npz"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An array past 4 GiB (ZIP64 sizes, and the next array's offset past 4 GiB), read back by
    /// the zip crate. By hand: `cargo test --release --lib npz -- --ignored` (writes 4.4 GB to
    /// the temporary folder, then removes it).
    #[test]
    #[ignore]
    fn arrays_past_four_gib() {
        use std::io::{Seek, SeekFrom};
        const LEN: u64 = 4_400_000_000;
        const CHUNK: usize = 1 << 26;
        let path = std::env::temp_dir().join(format!("fora-npz-4gib-{}.npz", std::process::id()));
        let pattern: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
        let file = std::fs::File::create(&path).unwrap();
        let mut npz = NpzWriter::new(std::io::BufWriter::new(file));
        npz.start_array("arr_0", NpyDtype::U8, &[LEN as usize])
            .unwrap();
        let mut left = LEN;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            npz.write(&pattern[..n]).unwrap();
            left -= n as u64;
        }
        npz.start_array("labels", NpyDtype::I64, &[2]).unwrap();
        npz.write(&[7i64.to_le_bytes(), 9i64.to_le_bytes()].concat())
            .unwrap();
        npz.finish().unwrap();
        let check = || {
            let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
            let mut labels = Vec::new();
            zip.by_name("labels.npy")
                .unwrap()
                .read_to_end(&mut labels)
                .unwrap();
            assert_eq!(
                &labels[128..],
                [7i64.to_le_bytes(), 9i64.to_le_bytes()].concat()
            );
            let entry = zip.by_name("arr_0.npy").unwrap();
            assert_eq!(entry.size(), 128 + LEN);
            let start = entry.data_start().unwrap();
            drop(entry);
            // The last bytes, where the stored data end.
            let mut file = std::fs::File::open(&path).unwrap();
            let tail = 1000u64;
            file.seek(SeekFrom::Start(start + 128 + LEN - tail))
                .unwrap();
            let mut got = vec![0u8; tail as usize];
            file.read_exact(&mut got).unwrap();
            let first = ((LEN - tail) % CHUNK as u64) as usize;
            assert_eq!(got, pattern[first..first + tail as usize]);
        };
        let result = std::panic::catch_unwind(check);
        std::fs::remove_file(&path).unwrap();
        result.unwrap();
    }
}
