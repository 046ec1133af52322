//! Host tensor files: reading named f32 / int64 tensors from safetensors files or PyTorch
//! checkpoints with shape and dtype checks that name the file and the tensor, and writing
//! files atomically (a temporary file in
//! the same directory, flushed, then renamed over the target), so an output is whole or absent.

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The largest header a safetensors file may have (the bound the safetensors crate keeps).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A tensor file's index, with each tensor's bytes read only when it is asked for: from a
/// byte slice, or from the file itself ([`TensorReader::open`]). So a whole Stable Diffusion
/// checkpoint given for its 100 MB VAE decoder costs the decoder's bytes, not the file's 4 GB,
/// and a DiT checkpoint is never in memory twice (its bytes whole beside the f32 weights made
/// from them).
///
/// The file is a safetensors file or, from a file only, a PyTorch checkpoint (`torch.save`'s
/// `.pt`, `.pth`, `.bin`, `.ckpt`: the official DiT release is one), told apart by its first
/// bytes. A safetensors header is checked whole at the start: offsets, sizes, and that the
/// file holds exactly the tensor data it describes (a truncated file is refused before
/// anything is read). A PyTorch checkpoint's pickle is read by the `pytorch-reader` crate,
/// which never runs the pickle's code and checks that each tensor fits its storage; where the
/// checkpoint nests its weights ([`PYTORCH_NESTS`]) the first nest present is taken.
pub struct TensorReader<'a> {
    /// The safetensors header; for a PyTorch checkpoint, one made from its tensors' dtypes and
    /// shapes (its offsets number the bytes as if the tensors were laid end to end).
    header: Metadata,
    data: TensorData<'a>,
    /// For a PyTorch checkpoint, the top-level key its tensors were taken from.
    nest: Option<&'static str>,
    /// For a PyTorch checkpoint, the wrappers' prefix taken off every name
    /// ([`PYTORCH_WRAPPER_PREFIXES`]; empty where none).
    unwrapped: String,
}

/// The top-level keys under which a PyTorch checkpoint may hold the weights, in the order they
/// are looked for: `ema` first, as the official DiT sampler's `find_model` takes it from a
/// training checkpoint (`{"model", "ema", "opt", "args"}`), then `state_dict` (Stable
/// Diffusion's and PyTorch Lightning's `.ckpt`) and `model`. A checkpoint whose top-level
/// dictionary has none of them as a dictionary is read whole (a plain state dict, as the DiT
/// release is).
pub const PYTORCH_NESTS: [&str; 3] = ["ema", "state_dict", "model"];

/// The prefixes a wrapped module adds to every name of its state dict, taken off a PyTorch
/// checkpoint's names for as long as every one starts with one of them: `module.` of
/// DistributedDataParallel and DataParallel, `_orig_mod.` of `torch.compile` (both, in either
/// order, where one wraps the other).
pub const PYTORCH_WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// `tensors` with the [`PYTORCH_WRAPPER_PREFIXES`] that every name has taken off, outermost
/// first and as often as they wrap, and what was taken.
fn pytorch_unwrap<T>(mut tensors: HashMap<String, T>) -> (HashMap<String, T>, String) {
    let mut taken = String::new();
    while let Some(prefix) = PYTORCH_WRAPPER_PREFIXES
        .into_iter()
        .find(|p| !tensors.is_empty() && tensors.keys().all(|k| k.starts_with(p)))
    {
        tensors = tensors
            .into_iter()
            .map(|(k, t)| (k[prefix.len()..].to_string(), t))
            .collect();
        taken.push_str(prefix);
    }
    (tensors, taken)
}

/// What a tensor file is, as [`TensorReader`] read it; shown as the kind, then the choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileFormat {
    /// "safetensors" or "PyTorch checkpoint".
    pub kind: &'static str,
    /// What reading took that the file does not state, which a command says: the top-level
    /// key a PyTorch checkpoint's tensors were taken from ([`PYTORCH_NESTS`]) and the
    /// wrappers' prefix taken off their names ([`PYTORCH_WRAPPER_PREFIXES`]); `None` where
    /// nothing was chosen.
    pub choice: Option<String>,
}

impl std::fmt::Display for FileFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.choice {
            Some(choice) => write!(f, "{}, {choice}", self.kind),
            None => f.write_str(self.kind),
        }
    }
}

/// Where a [`TensorReader`]'s tensor bytes come from.
enum TensorData<'a> {
    /// The bytes after the header.
    Bytes(&'a [u8]),
    /// The open file and the offset of its tensor data. Behind a mutex: a read is a seek and a
    /// read on the file's one cursor.
    File { file: Mutex<File>, start: u64 },
    /// A PyTorch checkpoint's tensors by name (after [`PYTORCH_NESTS`]), each read from the
    /// file by `pytorch-reader` when it is taken.
    Pytorch(HashMap<String, pytorch_reader::Tensor>),
}

/// Whether a file that starts with `head` (its first 9 bytes, or fewer in a shorter file) is a
/// PyTorch checkpoint rather than a safetensors file. A safetensors file starts with its
/// header's length (at most [`MAX_HEADER_BYTES`]) and the header's `{`; anything else that is
/// a ZIP archive (`torch.save` since PyTorch 1.6) or a pickle (protocol 2 to 5: the legacy
/// format and plain pickles) is PyTorch's. The rest goes to the safetensors reader, whose
/// errors say what is wrong with it as one.
fn looks_like_pytorch(head: &[u8]) -> bool {
    let safetensors = head.len() == 9
        && u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) <= MAX_HEADER_BYTES
        && head[8] == b'{';
    let zip = head.starts_with(b"PK\x03\x04");
    let pickle = head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]);
    !safetensors && (zip || pickle)
}

/// The safetensors dtype of a PyTorch tensor's element type (every one `pytorch-reader` reads
/// has one).
fn pytorch_dtype(d: pytorch_reader::DType) -> Dtype {
    use pytorch_reader::DType as P;
    match d {
        P::F64 => Dtype::F64,
        P::F32 => Dtype::F32,
        P::F16 => Dtype::F16,
        P::BF16 => Dtype::BF16,
        P::I64 => Dtype::I64,
        P::I32 => Dtype::I32,
        P::I16 => Dtype::I16,
        P::I8 => Dtype::I8,
        P::U64 => Dtype::U64,
        P::U32 => Dtype::U32,
        P::U16 => Dtype::U16,
        P::U8 => Dtype::U8,
        P::Bool => Dtype::BOOL,
    }
}

/// The first of [`PYTORCH_NESTS`] that is a dictionary at the top of the checkpoint `path`
/// (`root`, its pickle without the tensors), if any. The keys are the pickle's own, not a
/// prefix of the flattened tensor names: a flat Stable Diffusion state dict's
/// `model.diffusion_model.*` is no `model` nest.
fn pytorch_nest(root: &pytorch_reader::PickleValue) -> Option<&'static str> {
    let pytorch_reader::PickleValue::Dict(top) = root else {
        return None;
    };
    PYTORCH_NESTS
        .into_iter()
        .find(|nest| matches!(top.get(*nest), Some(pytorch_reader::PickleValue::Dict(_))))
}

/// One tensor as the file stores it: dtype, shape and little-endian bytes.
pub struct RawTensor<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major little-endian bytes: borrowed from a byte slice, or read from the file.
    pub data: Cow<'a, [u8]>,
}

impl<'a> TensorReader<'a> {
    /// The tensors of the safetensors file `bytes`, checked whole.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<TensorReader<'a>> {
        let head = &bytes[..bytes.len().min(9)];
        ensure!(
            !looks_like_pytorch(head),
            "a PyTorch checkpoint, which is read from its file (TensorReader::open, \
             DitWeights::load, VaeDecoder::load), not from bytes"
        );
        let (n, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow::anyhow!("not a valid safetensors file: {e}"))?;
        // read_metadata checked that the bytes hold exactly header and data.
        let data = bytes
            .get(8 + n..)
            .context("not a valid safetensors file: no tensor data")?;
        Ok(TensorReader {
            header,
            data: TensorData::Bytes(data),
            nest: None,
            unwrapped: String::new(),
        })
    }

    /// Opens the regular file at `path` (links followed; a device, FIFO or directory is refused
    /// before any read, as [`read_file`] does) and reads its header only (a PyTorch
    /// checkpoint's pickle). Its errors name the file, as `what` ("checkpoint", "VAE weights",
    /// or empty) and the path; [`TensorReader::tensor`]'s do not (its callers say which file
    /// they read).
    pub fn open(path: &Path, what: &str) -> Result<TensorReader<'static>> {
        let (mut file, named) = open_regular(path, what)?;
        let len = file.metadata().with_context(|| named.clone())?.len();
        let mut head = Vec::with_capacity(9);
        (&mut file)
            .take(9)
            .read_to_end(&mut head)
            .with_context(|| named.clone())?;
        if looks_like_pytorch(&head) {
            drop(file);
            return Self::open_pytorch(path, what, len);
        }
        file.seek(SeekFrom::Start(0))
            .with_context(|| named.clone())?;
        let invalid = |why: String| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file: {why}",
                file_label(what, path)
            )
        };
        if len < 8 {
            return Err(invalid(format!(
                "{len} bytes, too short for the 8-byte header length"
            )));
        }
        let mut n = [0u8; 8];
        file.read_exact(&mut n).with_context(|| named.clone())?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n > len - 8 {
            return Err(invalid(format!(
                "a header of {n} bytes in a file of {len} bytes"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .with_context(|| named.clone())?;
        // Metadata's deserializer checks what SafeTensors::read_metadata does: names, dtypes,
        // offsets contiguous from 0, each tensor's bytes equal to its shape's.
        let header: Metadata =
            serde_json::from_slice(&header).map_err(|e| invalid(format!("its header: {e}")))?;
        let described = header.data_len() as u64;
        let held = len - 8 - n;
        if described != held {
            return Err(invalid(format!(
                "its header describes {described} bytes of tensor data, the file holds {held} \
                 (truncated, or not one file)"
            )));
        }
        Ok(TensorReader {
            header,
            data: TensorData::File {
                file: Mutex::new(file),
                start: 8 + n,
            },
            nest: None,
            unwrapped: String::new(),
        })
    }

    /// [`TensorReader::open`] of a PyTorch checkpoint of `len` bytes: its pickle read whole,
    /// no tensor yet.
    fn open_pytorch(path: &Path, what: &str, len: u64) -> Result<TensorReader<'static>> {
        let file = file_label(what, path);
        let invalid = |e: pytorch_reader::PytorchError| {
            anyhow::anyhow!("{file}: not a valid PyTorch checkpoint: {e}")
        };
        // The pickle is read twice: for its top-level keys, then for the tensors of the nest.
        let root = pytorch_reader::PytorchReader::read_pickle_data(path, None).map_err(invalid)?;
        let nest = pytorch_nest(&root);
        drop(root);
        let reader = match nest {
            Some(key) => pytorch_reader::PytorchReader::with_top_level_key(path, key),
            None => pytorch_reader::PytorchReader::new(path),
        }
        .map_err(invalid)?;
        let tensors = reader.into_tensors();
        ensure!(
            !tensors.is_empty(),
            "{file}: a PyTorch checkpoint without tensors{}",
            nest.map_or(String::new(), |n| format!(" under {n:?}"))
        );
        let (tensors, unwrapped) = pytorch_unwrap(tensors);
        // A strided view may describe far more elements than its storage holds (a broadcast, of
        // stride 0); reading one would allocate them all. No checkpoint's tensor is larger than
        // its file.
        if let Some((name, t)) = tensors.iter().find(|(_, t)| t.byte_len() as u64 > len) {
            bail!(
                "{file}: not a valid PyTorch checkpoint: tensor {name} of shape {:?} holds {} \
                 bytes, more than the file's {len} (a view repeating its storage)",
                t.shape(),
                t.byte_len()
            );
        }
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut infos = Vec::with_capacity(names.len());
        let mut end = 0usize;
        for name in names {
            let t = &tensors[name];
            let begin = end;
            end = end
                .checked_add(t.byte_len())
                .with_context(|| format!("{file}: its tensors' sizes overflow"))?;
            let info = TensorInfo {
                dtype: pytorch_dtype(t.dtype()),
                shape: t.shape().to_vec(),
                data_offsets: (begin, end),
            };
            infos.push((name.clone(), info));
        }
        let header = Metadata::new(None, infos)
            .map_err(|e| anyhow::anyhow!("{file}: its tensors' index: {e}"))?;
        Ok(TensorReader {
            header,
            data: TensorData::Pytorch(tensors),
            nest,
            unwrapped,
        })
    }

    /// The file's format, and what reading it chose.
    pub fn format(&self) -> FileFormat {
        let TensorData::Pytorch(_) = self.data else {
            return FileFormat {
                kind: "safetensors",
                choice: None,
            };
        };
        let mut parts = Vec::new();
        if let Some(nest) = self.nest {
            parts.push(format!("{nest:?}"));
        }
        if !self.unwrapped.is_empty() {
            parts.push(format!("names without {:?}", self.unwrapped));
        }
        FileFormat {
            kind: "PyTorch checkpoint",
            choice: (!parts.is_empty()).then(|| parts.join(", ")),
        }
    }

    /// The tensors' names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names = self.header.offset_keys();
        names.sort();
        names
    }

    /// The file's string metadata (`__metadata__`); empty where it has none (a PyTorch
    /// checkpoint has none).
    pub fn metadata(&self) -> HashMap<String, String> {
        self.header.metadata().clone().unwrap_or_default()
    }

    /// Dtype, shape and offsets of tensor `name`, from the header (nothing is read; a PyTorch
    /// checkpoint's offsets are only an index).
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.info(name)
    }

    /// Shape of tensor `name`, from the header (nothing is read).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.info(name).map(|i| i.shape.as_slice())
    }

    /// Tensor `name`: borrowed where the reader holds bytes, read from the file otherwise.
    pub fn tensor(&self, name: &str) -> Result<RawTensor<'_>> {
        let info = self
            .info(name)
            .with_context(|| format!("no tensor {name}"))?;
        let (begin, end) = info.data_offsets;
        if !matches!(self.data, TensorData::Bytes(_)) {
            // Read into a new buffer. Where memory is overcommitted an allocation past it
            // succeeds and the process is killed as the bytes come in (and pytorch-reader
            // allocates without asking): refused here instead.
            crate::weights::ensure_free_memory(&format!("tensor {name}"), (end - begin) as u64)?;
        }
        let data = match &self.data {
            TensorData::Bytes(bytes) => {
                Cow::Borrowed(bytes.get(begin..end).with_context(|| {
                    format!("tensor {name}: bytes {begin}..{end} past the data")
                })?)
            }
            TensorData::File { file, start } => {
                let size = end - begin;
                let mut buf = Vec::new();
                buf.try_reserve_exact(size).map_err(|_| {
                    anyhow::anyhow!(
                        "tensor {name}: cannot allocate {} to read it",
                        crate::weights::show_bytes(size as u64)
                    )
                })?;
                buf.resize(size, 0);
                // The file may have changed since its header was read: a short read is an
                // error here, never a short tensor.
                let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
                file.seek(SeekFrom::Start(start + begin as u64))
                    .and_then(|_| file.read_exact(&mut buf))
                    .with_context(|| format!("cannot read tensor {name}"))?;
                Cow::Owned(buf)
            }
            TensorData::Pytorch(tensors) => {
                let t = tensors
                    .get(name)
                    .with_context(|| format!("no tensor {name}"))?;
                // pytorch-reader checks the bytes against the tensor's storage and its own
                // checksum; a file changed since the pickle was read fails here by name.
                let mut buf = t
                    .read()
                    .map_err(|e| anyhow::anyhow!("cannot read tensor {name}: {e}"))?;
                ensure!(
                    buf.len() == end - begin,
                    "tensor {name}: read {} bytes, its shape holds {}",
                    buf.len(),
                    end - begin
                );
                // Its bytes are the host's order; the callers read little-endian.
                if cfg!(target_endian = "big") {
                    for element in buf.chunks_exact_mut(t.dtype().size()) {
                        element.reverse();
                    }
                }
                Cow::Owned(buf)
            }
        };
        Ok(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data,
        })
    }
}

/// A safetensors file of the command line's inputs (`fora forward --input`, `--noise-file`,
/// `fora decode --input`): its header read at open, a tensor's bytes when it is asked for.
pub struct TensorFile {
    path: PathBuf,
    reader: TensorReader<'static>,
}

/// A named tensor: shape and row-major values.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor<T> {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<T>,
}

impl TensorFile {
    /// Opens `path` and checks its header (see [`TensorReader::open`]); tensors are read when
    /// asked for.
    pub fn open(path: impl AsRef<Path>) -> Result<TensorFile> {
        let path = path.as_ref().to_path_buf();
        let reader = TensorReader::open(&path, "")?;
        Ok(TensorFile { path, reader })
    }

    /// Tensor `name` with the expected dtype and rank checked from the header, then read.
    fn read(&self, name: &str, dtype: Dtype, rank: usize) -> Result<RawTensor<'_>> {
        let path = self.path.display();
        let info = self.reader.info(name).with_context(|| {
            let names = self.reader.names();
            format!(
                "{path}: no tensor {name:?} (the file holds {})",
                if names.is_empty() {
                    "no tensors".to_string()
                } else {
                    names.join(", ")
                }
            )
        })?;
        ensure!(
            info.dtype == dtype,
            "{path}: tensor {name:?} has dtype {:?}, expected {dtype:?}",
            info.dtype
        );
        ensure!(
            info.shape.len() == rank,
            "{path}: tensor {name:?} has shape {:?}, expected {rank} dimensions",
            info.shape
        );
        self.reader.tensor(name).with_context(|| path.to_string())
    }

    /// Names of the tensors in the file, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.reader.names())
    }

    /// Tensor `name` as f32; its dtype must be F32 and its rank `rank`. Values must be finite.
    pub fn f32(&self, name: &str, rank: usize) -> Result<HostTensor<f32>> {
        let view = self.read(name, Dtype::F32, rank)?;
        let data: Vec<f32> = view
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(j) = data.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor {name:?} value #{j} is not finite ({})",
                self.path.display(),
                data[j]
            );
        }
        Ok(HostTensor {
            shape: view.shape,
            data,
        })
    }

    /// Tensor `name` as i64; its dtype must be I64 and its rank `rank`.
    pub fn i64(&self, name: &str, rank: usize) -> Result<HostTensor<i64>> {
        let view = self.read(name, Dtype::I64, rank)?;
        let data = view
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        Ok(HostTensor {
            shape: view.shape,
            data,
        })
    }
}

/// One f32 tensor to write.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// One i64 tensor to write.
struct I64View<'a> {
    shape: &'a [usize],
    data: &'a [i64],
}

impl safetensors::View for I64View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::I64
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 8
    }
}

/// A tensor to write: f32 or i64 values with a shape.
pub enum OutTensor<'a> {
    /// Shape and f32 values.
    F32(&'a [usize], &'a [f32]),
    /// Shape and i64 values.
    I64(&'a [usize], &'a [i64]),
}

/// Serializes named tensors (with optional string metadata) to safetensors bytes.
pub fn safetensors_bytes(
    tensors: &[(&str, OutTensor<'_>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    enum Either<'a> {
        F(F32View<'a>),
        I(I64View<'a>),
    }
    impl safetensors::View for Either<'_> {
        fn dtype(&self) -> Dtype {
            match self {
                Either::F(v) => v.dtype(),
                Either::I(v) => v.dtype(),
            }
        }
        fn shape(&self) -> &[usize] {
            match self {
                Either::F(v) => v.shape(),
                Either::I(v) => v.shape(),
            }
        }
        fn data(&self) -> Cow<'_, [u8]> {
            match self {
                Either::F(v) => v.data(),
                Either::I(v) => v.data(),
            }
        }
        fn data_len(&self) -> usize {
            match self {
                Either::F(v) => v.data_len(),
                Either::I(v) => v.data_len(),
            }
        }
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (shape, len) = match t {
            OutTensor::F32(s, d) => (*s, d.len()),
            OutTensor::I64(s, d) => (*s, d.len()),
        };
        ensure!(
            shape.iter().product::<usize>() == len,
            "tensor {name:?}: shape {shape:?} does not hold {len} values"
        );
        let view = match t {
            OutTensor::F32(shape, data) => Either::F(F32View { shape, data }),
            OutTensor::I64(shape, data) => Either::I(I64View { shape, data }),
        };
        views.push((name.to_string(), view));
    }
    safetensors::serialize(views, metadata).context("cannot serialize safetensors")
}

/// Writes named tensors to `path` atomically (see [`write_atomic`]).
pub fn write_tensors(
    path: impl AsRef<Path>,
    tensors: &[(&str, OutTensor<'_>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors_bytes(tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// The bytes of the regular file at `path` (links followed), or an error naming it: a device,
/// FIFO or directory is refused before any read (`/dev/zero` would be read until memory runs
/// out, a FIFO without a writer would block forever).
/// `what` ("checkpoint", or empty) names the file in the error.
pub fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    let (mut file, named) = open_regular(path, what)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).with_context(|| named)?;
    Ok(bytes)
}

/// The regular file at `path` opened for reading (links followed; a device, FIFO or directory
/// refused before it is opened), and "cannot read {what} {path}" for its I/O errors.
pub fn open_regular(path: &Path, what: &str) -> Result<(File, String)> {
    let named = format!("cannot read {}", file_label(what, path));
    let meta = fs::metadata(path).with_context(|| named.clone())?;
    ensure!(meta.is_file(), "{named}: not a regular file");
    let file = File::open(path).with_context(|| named.clone())?;
    Ok((file, named))
}

/// A file as errors name it: `what` ("checkpoint", "VAE weights", or empty) and the path.
fn file_label(what: &str, path: &Path) -> String {
    format!(
        "{what}{}{}",
        if what.is_empty() { "" } else { " " },
        path.display()
    )
}

/// Fails before any long computation when the output `out` (given as `flag`) could not be
/// written, or its extension (case-insensitive) is none of `extensions` (what the command
/// writes; a device such as `/dev/null` takes any).
pub fn check_output_path(flag: &str, out: &Path, extensions: &[&str]) -> Result<()> {
    ensure!(
        out.file_name().is_some() && !out.is_dir(),
        "{flag} {}: not a file path",
        out.display()
    );
    let (_, a_file) = write_target(out).with_context(|| format!("{flag} {}", out.display()))?;
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    ensure!(
        !a_file || extensions.iter().any(|e| e.eq_ignore_ascii_case(ext)),
        "{flag} {}: the file name must end in .{} (what this command writes)",
        out.display(),
        extensions.join(" or .")
    );
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        ensure!(
            dir.exists(),
            "{flag} {}: directory {} does not exist",
            out.display(),
            dir.display()
        );
        ensure!(
            dir.is_dir(),
            "{flag} {}: {} is not a directory",
            out.display(),
            dir.display()
        );
    }
    // A folder that takes no new file (read-only, /proc) is found now, not after the work.
    check_writable(flag, out)
}

/// [`check_output_path`] for a file written with seeks (a zip archive: `.npz`): a FIFO, socket
/// or pipe (`/dev/stdout` into `| cat`) cannot take one, and is refused before the work.
pub fn check_seekable_output(flag: &str, out: &Path, extensions: &[&str]) -> Result<()> {
    check_output_path(flag, out, extensions)?;
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = fs::metadata(out) {
        let t = m.file_type();
        ensure!(
            !t.is_fifo() && !t.is_socket(),
            "{flag} {}: a pipe or socket cannot take this file, which is written with seeks",
            out.display()
        );
    }
    Ok(())
}

/// The folder `path` is in: its parent, or `.` for a bare name.
pub fn parent_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The nearest folder of `path` that exists (its parent, else the parent's, and so on; `.` for
/// a bare file name): where a writer that makes the missing folders first puts `path`. An
/// error naming `flag` where that is not a directory (a regular file on the way).
pub fn nearest_folder(flag: &str, path: &Path) -> Result<PathBuf> {
    let mut dir = path.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        dir = d.parent();
    }
    let dir = dir
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    ensure!(
        dir.is_dir(),
        "{flag} {}: {} is not a directory",
        path.display(),
        dir.display()
    );
    Ok(dir)
}

/// Checks, before any long work, that a file can later be written at `path` by
/// [`write_atomic`] (which makes missing folders first where the caller does, then renames a
/// temporary file into place): the nearest folder of `path` that exists must take a new file.
/// Tried with a file made and removed at once; `flag` names the option in the error.
pub fn check_writable(flag: &str, path: &Path) -> Result<()> {
    let (target, replace) =
        write_target(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !replace {
        return Ok(()); // a device or FIFO, written into as it stands
    }
    let dir = nearest_folder(flag, &target)?;
    // The pid and the time: no file an earlier run (or another process) left can be hit.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let probe = dir.join(format!(".fora-write-probe.{}.{nanos}", std::process::id()));
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "{flag} {}: cannot write in {}: {e}",
            path.display(),
            dir.display()
        )),
    }
}

/// Fails before any long work when the file system that would hold `path` (as [`write_atomic`]
/// writes it: a temporary file in the target's folder) has fewer than `bytes` free for this
/// user; `flag` names the option in the error. A device or FIFO target is not checked, nor a
/// file system that does not say.
pub fn check_free_space(flag: &str, path: &Path, bytes: u64) -> Result<()> {
    let (target, replace) = write_target(path)?;
    if !replace {
        return Ok(());
    }
    let dir = nearest_folder(flag, &target)?;
    let Some(free) = free_bytes(&dir) else {
        return Ok(());
    };
    ensure!(
        bytes <= free,
        "{flag} {}: the output takes {}, and its file system has {} free",
        path.display(),
        crate::weights::show_bytes(bytes),
        crate::weights::show_bytes(free)
    );
    Ok(())
}

/// Bytes free for an unprivileged user on the file system of `dir` (statvfs), if it says.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer statvfs fills on success.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    // A file system of no blocks (some FUSE mounts) says nothing of its space.
    if st.f_blocks == 0 {
        return None;
    }
    (st.f_bavail as u64).checked_mul(st.f_frsize as u64)
}

/// Where a write to `path` goes: `path` itself, or for a symbolic link the file it leads to
/// (the link stays a link); and whether that is a regular file (or nothing yet), replaced
/// whole by [`write_atomic`], or something else that is written into as it stands (a device
/// such as `/dev/null`, a FIFO), which a rename would replace.
pub fn write_target(path: &Path) -> Result<(PathBuf, bool)> {
    // Something that is not a file, reached through links or not, is written through `path`
    // as given: `/dev/stdout` onto a pipe is a link to `/proc/self/fd/1`, a link in turn to
    // `pipe:[N]`, which no path names.
    if let Ok(m) = fs::metadata(path) {
        if !m.is_file() && !m.is_dir() {
            return Ok((path.to_path_buf(), false));
        }
    }
    let target = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path).with_context(|| {
            format!(
                "cannot write {}: it is a symbolic link to nothing",
                path.display()
            )
        })?,
        _ => path.to_path_buf(),
    };
    let replace = match fs::metadata(&target) {
        Ok(m) => m.is_file() || m.is_dir(),
        Err(_) => true,
    };
    Ok((target, replace))
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file beside it (same
/// directory, so the rename stays on one file system), flushed to disk, then renamed over
/// `path`. On any failure the temporary file is removed and `path` is untouched. A symbolic
/// link is followed (the file it leads to is replaced, the link stays); a device or FIFO is
/// written into ([`write_target`]).
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path.as_ref(), |p| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .with_context(|| format!("cannot open {}", p.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", p.display()))
    })
}

/// [`write_atomic`] with the file written by `write`, given the path to write whole (the
/// temporary file, or the device itself): for writers that take a path, such as
/// `safetensors::serialize_to_file`, which streams a checkpoint without a copy in memory.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (target, replace) = write_target(path)?;
    let path = target.as_path();
    if !replace {
        return write(path);
    }
    let file_name = path
        .file_name()
        .with_context(|| format!("output path {} names no file", path.display()))?;
    let dir = parent_folder(path);
    ensure!(
        dir.is_dir(),
        "cannot write {}: directory {} does not exist",
        path.display(),
        dir.display()
    );
    ensure!(
        !path.is_dir(),
        "cannot write {}: it is a directory",
        path.display()
    );
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        write(&tmp)?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot flush {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("fora-io-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let x = [1.5f32, -2.0, 3.25, 0.125, 7.0, -0.5];
        let t = [0i64, 999];
        write_tensors(
            &path,
            &[
                ("x", OutTensor::F32(&[2, 3], &x)),
                ("t", OutTensor::I64(&[2], &t)),
            ],
            None,
        )
        .unwrap();
        let f = TensorFile::open(&path).unwrap();
        assert_eq!(f.names().unwrap(), ["t", "x"]);
        let got = f.f32("x", 2).unwrap();
        assert_eq!(
            (got.shape.as_slice(), got.data.as_slice()),
            (&[2, 3][..], &x[..])
        );
        assert_eq!(f.i64("t", 1).unwrap().data, t);
        let e = format!("{:#}", f.f32("t", 1).unwrap_err());
        assert!(e.contains("dtype I64, expected F32"), "{e}");
        let e = format!("{:#}", f.f32("x", 4).unwrap_err());
        assert!(e.contains("expected 4 dimensions"), "{e}");
        let e = format!("{:#}", f.f32("y", 1).unwrap_err());
        assert!(e.contains("no tensor \"y\"") && e.contains("t, x"), "{e}");
        // No temporary file is left beside the output.
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Bad shapes and missing directories are errors that write nothing.
        assert!(write_tensors(dir.join("bad"), &[("x", OutTensor::F32(&[4], &x))], None).is_err());
        assert!(!dir.join("bad").exists());
        assert!(write_atomic(dir.join("missing/out"), b"abc").is_err());
        // A link is followed: the file it leads to is replaced, the link stays a link.
        let real = dir.join("real.bin");
        let link = dir.join("link.bin");
        fs::write(&real, b"old").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&real).unwrap(), b"new");
        let dangling = dir.join("dangling.bin");
        std::os::unix::fs::symlink(dir.join("nothing"), &dangling).unwrap();
        let e = format!("{:#}", write_atomic(&dangling, b"x").unwrap_err());
        assert!(e.contains("symbolic link to nothing"), "{e}");
        // A device is written into, never renamed over (here only asked: not written).
        let (target, replace) = write_target(Path::new("/dev/null")).unwrap();
        assert_eq!((target.as_path(), replace), (Path::new("/dev/null"), false));
        assert_eq!(write_target(&real).unwrap(), (real.clone(), true));
        // A pipe reached through links that no path resolves (`/dev/stdout` onto a pipe):
        // written into through the links.
        let (mut reader, writer) = std::io::pipe().unwrap();
        use std::os::fd::AsRawFd;
        let through = PathBuf::from(format!("/proc/self/fd/{}", writer.as_raw_fd()));
        assert_eq!(write_target(&through).unwrap(), (through.clone(), false));
        write_atomic(&through, b"piped").unwrap();
        drop(writer);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut got).unwrap();
        assert_eq!(got, b"piped");
        assert_eq!(
            write_target(&dir.join("new.bin")).unwrap(),
            (dir.join("new.bin"), true)
        );
        // Special files are refused by name before any read.
        for special in ["/dev/zero", "/dev/null"] {
            let e = format!("{:#}", TensorFile::open(special).err().unwrap());
            assert!(
                e.contains(special) && e.contains("not a regular file"),
                "{e}"
            );
        }
        let e = format!("{:#}", read_file(&dir, "a test file").unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        fs::write(dir.join("junk"), b"not safetensors").unwrap();
        assert!(TensorFile::open(dir.join("junk")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The wrappers' prefixes come off in either order, and only where every name has them.
    #[test]
    fn wrapped_names_are_unwrapped() {
        let names = |list: &[&str]| -> HashMap<String, ()> {
            list.iter().map(|n| (n.to_string(), ())).collect()
        };
        let sorted = |m: HashMap<String, ()>| {
            let mut k: Vec<String> = m.into_keys().collect();
            k.sort();
            k
        };
        for (given, taken) in [
            (
                ["module._orig_mod.a", "module._orig_mod.b.c"],
                "module._orig_mod.",
            ),
            (
                ["_orig_mod.module.a", "_orig_mod.module.b.c"],
                "_orig_mod.module.",
            ),
            (["module.a", "module.b.c"], "module."),
            (["_orig_mod.a", "_orig_mod.b.c"], "_orig_mod."),
        ] {
            let (unwrapped, what) = pytorch_unwrap(names(&given));
            assert_eq!(
                (sorted(unwrapped), what.as_str()),
                (vec!["a".to_string(), "b.c".to_string()], taken)
            );
        }
        let (kept, what) = pytorch_unwrap(names(&["module.a", "b"]));
        assert_eq!(
            (sorted(kept), what.as_str()),
            (vec!["b".to_string(), "module.a".to_string()], "")
        );
        // Once a name no longer has it, no more comes off.
        let (kept, what) = pytorch_unwrap(names(&["module.", "module.module."]));
        assert_eq!(what, "module.");
        assert_eq!(sorted(kept), ["", "module."]);
    }

    /// A safetensors file is told from a PyTorch checkpoint by its first bytes, whatever its
    /// header length's low bytes are; a pickle of protocol 2 to 5 or a ZIP is PyTorch's.
    #[test]
    fn pytorch_checkpoints_are_told_from_safetensors() {
        let safetensors = |n: u64| [&n.to_le_bytes()[..], b"{"].concat();
        for n in [0x80, 0x0280, 0x0580, 0x04_0380, 1000, MAX_HEADER_BYTES] {
            assert!(!looks_like_pytorch(&safetensors(n)), "header length {n:#x}");
        }
        // Protocol 4 and 5 pickles start with a frame length that reads as a plausible
        // header length: the missing `{` tells them apart.
        assert!(looks_like_pytorch(b"\x80\x04\x95\x0d\0\0\0\0\x8c"));
        assert!(looks_like_pytorch(b"\x80\x05\x95\x0d\0\0\0\0\x00"));
        assert!(looks_like_pytorch(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9"));
        assert!(looks_like_pytorch(b"\x80\x02}q"));
        assert!(looks_like_pytorch(b"PK\x03\x04\x00\x00\x08\x00\x00"));
        assert!(!looks_like_pytorch(b"\x80\x06\x95\x0d\0\0\0\0\x00"));
        assert!(!looks_like_pytorch(b""));
        assert!(!looks_like_pytorch(b"PK\x05\x06"));
        // Past the bound on a header's length a `{` does not make a safetensors file.
        let mut pickle = safetensors(1 << 56);
        pickle[..2].copy_from_slice(b"\x80\x02");
        assert!(u64::from_le_bytes(pickle[..8].try_into().unwrap()) > MAX_HEADER_BYTES);
        assert!(looks_like_pytorch(&pickle));
    }

    /// The reader of a file gives the tensors the reader of its bytes does; a file that is not
    /// exactly what its header describes is refused at open; a file cut short after the header
    /// was read fails the tensor read by name; and a tensor far larger than memory that nobody
    /// asks for is never read (a sparse file of 32 GiB on a machine of 24).
    #[test]
    fn reader_reads_what_is_asked_and_checks_the_file() {
        let dir = std::env::temp_dir().join(format!("fora-io-reader-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let a: Vec<f32> = (0..60).map(|i| (i as f32 * 0.7).cos()).collect();
        let b: Vec<f32> = (0..4000).map(|i| (i as f32 * 0.3).sin()).collect();
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let bytes = safetensors_bytes(
            &[
                ("a", OutTensor::F32(&[3, 20], &a)),
                ("b", OutTensor::F32(&[4000], &b)),
            ],
            Some(meta.clone()),
        )
        .unwrap();
        let path = dir.join("ok.safetensors");
        fs::write(&path, &bytes).unwrap();
        let from_bytes = TensorReader::from_bytes(&bytes).unwrap();
        let from_file = TensorReader::open(&path, "a test file").unwrap();
        for r in [&from_bytes, &from_file] {
            assert_eq!(r.names(), ["a", "b"]);
            assert_eq!(r.metadata(), meta);
            assert_eq!(r.shape("a"), Some(&[3usize, 20][..]));
            assert!(r.shape("c").is_none());
            let e = format!("{:#}", r.tensor("c").err().unwrap());
            assert!(e.contains("no tensor c"), "{e}");
        }
        for name in ["a", "b"] {
            let (x, y) = (
                from_bytes.tensor(name).unwrap(),
                from_file.tensor(name).unwrap(),
            );
            assert_eq!((x.dtype, &x.shape, &x.data), (y.dtype, &y.shape, &y.data));
            assert!(matches!(x.data, Cow::Borrowed(_)));
        }
        let got = from_file.tensor("b").unwrap();
        let got: Vec<f32> = got
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, b);

        // Not exactly what the header describes: refused at open, the file named.
        let bad = dir.join("bad.safetensors");
        let refused = |contents: &[u8], needle: &str| {
            fs::write(&bad, contents).unwrap();
            let e = format!("{:#}", TensorReader::open(&bad, "").err().unwrap());
            assert!(
                e.contains("bad.safetensors") && e.contains("not a valid safetensors file"),
                "{e}"
            );
            assert!(e.contains(needle), "{e}");
            assert!(TensorReader::from_bytes(contents).is_err());
        };
        refused(&bytes[..bytes.len() - 1], "truncated");
        refused(&[&bytes[..], &[0u8]].concat(), "truncated");
        refused(&bytes[..5], "too short");
        let mut long_header = bytes.clone();
        long_header[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        refused(&long_header, "a header of");
        let mut broken = bytes.clone();
        broken[8] = b'[';
        refused(&broken, "its header");

        // Cut short after the header was read: the read of b fails, naming b and the file.
        let cut = dir.join("cut.safetensors");
        fs::write(&cut, &bytes).unwrap();
        let reader = TensorReader::open(&cut, "").unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&cut)
            .unwrap()
            .set_len(bytes.len() as u64 - 100)
            .unwrap();
        let e = format!("{:#}", reader.tensor("b").err().unwrap());
        assert!(e.contains("cannot read tensor b"), "{e}");
        assert_eq!(reader.tensor("a").unwrap().data.len(), 240);

        // A 32 GiB tensor behind the small one, never asked for: the file is sparse (its
        // length set, nothing written), opening and reading `small` take no time or memory.
        let huge_bytes = 32u64 << 30;
        let header = serde_json::json!({
            "small": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "huge": {"dtype": "F32", "shape": [8, 1u64 << 30], "data_offsets": [8, 8 + huge_bytes]},
        })
        .to_string();
        let sparse = dir.join("sparse.safetensors");
        let mut file = fs::File::create(&sparse).unwrap();
        file.write_all(&(header.len() as u64).to_le_bytes())
            .unwrap();
        file.write_all(header.as_bytes()).unwrap();
        file.write_all(&[1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat())
            .unwrap();
        file.set_len(8 + header.len() as u64 + 8 + huge_bytes)
            .unwrap();
        drop(file);
        let reader = TensorReader::open(&sparse, "").unwrap();
        assert_eq!(reader.shape("huge"), Some(&[8usize, 1 << 30][..]));
        let small = reader.tensor("small").unwrap();
        assert_eq!(
            small.data.as_ref(),
            [1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat()
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
