//! DiT weights in the official key layout: loading (safetensors or a PyTorch checkpoint such
//! as the official release's `.pt`, through [`crate::io::TensorReader`]; f32/f16/bf16
//! converted to f32, every tensor validated before use), deterministic random weights for tests and
//! benchmarks, and saving (f32, the config in the metadata, written atomically).
//!
//! Layouts are PyTorch's: a Linear weight is `[out, in]` row-major, the patch embedding is a
//! convolution weight `[D, C, p, p]`, `pos_embed` is `[1, T, D]` (stored here as `[T, D]`).

use crate::config::{Arch, DitConfig};
use crate::io::TensorReader;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::Dtype;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Width of the sinusoidal timestep features fed to the t-MLP (fixed in DiT).
pub const FREQ_DIM: usize = 256;

/// One transformer block; every matrix is `[out, in]` row-major (PyTorch Linear).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockWeights {
    /// `attn.qkv.weight` `[3D, D]` (rows: q of all heads, then k, then v).
    pub qkv_w: Vec<f32>,
    /// `attn.qkv.bias` `[3D]`.
    pub qkv_b: Vec<f32>,
    /// `attn.proj.weight` `[D, D]`.
    pub proj_w: Vec<f32>,
    /// `attn.proj.bias` `[D]`.
    pub proj_b: Vec<f32>,
    /// `mlp.fc1.weight` `[M, D]`.
    pub fc1_w: Vec<f32>,
    /// `mlp.fc1.bias` `[M]`.
    pub fc1_b: Vec<f32>,
    /// `mlp.fc2.weight` `[D, M]`.
    pub fc2_w: Vec<f32>,
    /// `mlp.fc2.bias` `[D]`.
    pub fc2_b: Vec<f32>,
    /// `adaLN_modulation.1.weight` `[6D, D]` (rows: shift_msa, scale_msa, gate_msa, shift_mlp,
    /// scale_mlp, gate_mlp).
    pub ada_w: Vec<f32>,
    /// `adaLN_modulation.1.bias` `[6D]`.
    pub ada_b: Vec<f32>,
}

/// All weights of a DiT, host f32.
#[derive(Clone, Debug, PartialEq)]
pub struct DitWeights {
    /// `x_embedder.proj.weight` `[D, C, p, p]`.
    pub x_embed_w: Vec<f32>,
    /// `x_embedder.proj.bias` `[D]`.
    pub x_embed_b: Vec<f32>,
    /// `pos_embed` `[1, T, D]`, stored as `[T, D]`.
    pub pos_embed: Vec<f32>,
    /// `t_embedder.mlp.0.weight` `[D, 256]`.
    pub t_mlp0_w: Vec<f32>,
    /// `t_embedder.mlp.0.bias` `[D]`.
    pub t_mlp0_b: Vec<f32>,
    /// `t_embedder.mlp.2.weight` `[D, D]`.
    pub t_mlp2_w: Vec<f32>,
    /// `t_embedder.mlp.2.bias` `[D]`.
    pub t_mlp2_b: Vec<f32>,
    /// `y_embedder.embedding_table.weight` `[num_classes + 1, D]` (last row: null class).
    pub y_table: Vec<f32>,
    /// The transformer blocks, in order.
    pub blocks: Vec<BlockWeights>,
    /// `final_layer.adaLN_modulation.1.weight` `[2D, D]` (rows: shift, scale).
    pub final_ada_w: Vec<f32>,
    /// `final_layer.adaLN_modulation.1.bias` `[2D]`.
    pub final_ada_b: Vec<f32>,
    /// `final_layer.linear.weight` `[p*p*out_ch, D]`.
    pub final_w: Vec<f32>,
    /// `final_layer.linear.bias` `[p*p*out_ch]`.
    pub final_b: Vec<f32>,
}

/// A tensor's official key, its shape and its values.
pub type NamedTensor<'a> = (String, Vec<usize>, &'a [f32]);

/// The official key names and shapes of every tensor of `cfg`, in a fixed order.
pub fn expected_tensors(cfg: &DitConfig) -> Vec<(String, Vec<usize>)> {
    let (d, c, p, m) = (cfg.hidden, cfg.in_channels, cfg.patch, cfg.mlp_hidden());
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("x_embedder.proj.weight".into(), vec![d, c, p, p]),
        ("x_embedder.proj.bias".into(), vec![d]),
        ("pos_embed".into(), vec![1, cfg.tokens(), d]),
        ("t_embedder.mlp.0.weight".into(), vec![d, FREQ_DIM]),
        ("t_embedder.mlp.0.bias".into(), vec![d]),
        ("t_embedder.mlp.2.weight".into(), vec![d, d]),
        ("t_embedder.mlp.2.bias".into(), vec![d]),
        (
            "y_embedder.embedding_table.weight".into(),
            vec![cfg.num_classes + 1, d],
        ),
    ];
    for i in 0..cfg.depth {
        for (suffix, shape) in [
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("mlp.fc1.weight", vec![m, d]),
            ("mlp.fc1.bias", vec![m]),
            ("mlp.fc2.weight", vec![d, m]),
            ("mlp.fc2.bias", vec![d]),
            ("adaLN_modulation.1.weight", vec![6 * d, d]),
            ("adaLN_modulation.1.bias", vec![6 * d]),
        ] {
            v.push((format!("blocks.{i}.{suffix}"), shape));
        }
    }
    v.push((
        "final_layer.adaLN_modulation.1.weight".into(),
        vec![2 * d, d],
    ));
    v.push(("final_layer.adaLN_modulation.1.bias".into(), vec![2 * d]));
    v.push(("final_layer.linear.weight".into(), vec![cfg.patch_out(), d]));
    v.push(("final_layer.linear.bias".into(), vec![cfg.patch_out()]));
    v
}

impl BlockWeights {
    fn slots(&self) -> [&Vec<f32>; 10] {
        [
            &self.qkv_w,
            &self.qkv_b,
            &self.proj_w,
            &self.proj_b,
            &self.fc1_w,
            &self.fc1_b,
            &self.fc2_w,
            &self.fc2_b,
            &self.ada_w,
            &self.ada_b,
        ]
    }
    fn slots_mut(&mut self) -> [&mut Vec<f32>; 10] {
        [
            &mut self.qkv_w,
            &mut self.qkv_b,
            &mut self.proj_w,
            &mut self.proj_b,
            &mut self.fc1_w,
            &mut self.fc1_b,
            &mut self.fc2_w,
            &mut self.fc2_b,
            &mut self.ada_w,
            &mut self.ada_b,
        ]
    }
    fn empty() -> BlockWeights {
        BlockWeights {
            qkv_w: Vec::new(),
            qkv_b: Vec::new(),
            proj_w: Vec::new(),
            proj_b: Vec::new(),
            fc1_w: Vec::new(),
            fc1_b: Vec::new(),
            fc2_w: Vec::new(),
            fc2_b: Vec::new(),
            ada_w: Vec::new(),
            ada_b: Vec::new(),
        }
    }
}

impl DitWeights {
    /// A 64-bit hash of every weight's bits (FNV-1a over the f32 values, tensor by tensor in
    /// the order of [`expected_tensors`]): equal for the same weights wherever they were
    /// loaded from, and different, but by a 2^-64 chance, for any others.
    pub fn fingerprint(&self) -> u64 {
        self.slots()
            .into_iter()
            .fold(crate::fnv::OFFSET, |h, t| fingerprint_f32(h, t))
    }

    /// Every tensor in the order of [`expected_tensors`].
    fn slots(&self) -> Vec<&Vec<f32>> {
        let mut v = vec![
            &self.x_embed_w,
            &self.x_embed_b,
            &self.pos_embed,
            &self.t_mlp0_w,
            &self.t_mlp0_b,
            &self.t_mlp2_w,
            &self.t_mlp2_b,
            &self.y_table,
        ];
        for b in &self.blocks {
            v.extend(b.slots());
        }
        v.extend([
            &self.final_ada_w,
            &self.final_ada_b,
            &self.final_w,
            &self.final_b,
        ]);
        v
    }

    /// Every tensor in the order of [`expected_tensors`], mutably.
    fn slots_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut v = vec![
            &mut self.x_embed_w,
            &mut self.x_embed_b,
            &mut self.pos_embed,
            &mut self.t_mlp0_w,
            &mut self.t_mlp0_b,
            &mut self.t_mlp2_w,
            &mut self.t_mlp2_b,
            &mut self.y_table,
        ];
        for b in &mut self.blocks {
            v.extend(b.slots_mut());
        }
        v.extend([
            &mut self.final_ada_w,
            &mut self.final_ada_b,
            &mut self.final_w,
            &mut self.final_b,
        ]);
        v
    }

    fn empty(depth: usize) -> DitWeights {
        DitWeights {
            x_embed_w: Vec::new(),
            x_embed_b: Vec::new(),
            pos_embed: Vec::new(),
            t_mlp0_w: Vec::new(),
            t_mlp0_b: Vec::new(),
            t_mlp2_w: Vec::new(),
            t_mlp2_b: Vec::new(),
            y_table: Vec::new(),
            blocks: (0..depth).map(|_| BlockWeights::empty()).collect(),
            final_ada_w: Vec::new(),
            final_ada_b: Vec::new(),
            final_w: Vec::new(),
            final_b: Vec::new(),
        }
    }

    /// Every tensor with its official key and shape.
    pub fn named(&self, cfg: &DitConfig) -> Result<Vec<NamedTensor<'_>>> {
        self.check(cfg)?;
        Ok(expected_tensors(cfg)
            .into_iter()
            .zip(self.slots())
            .map(|((k, s), v)| (k, s, v.as_slice()))
            .collect())
    }

    /// Checks that every tensor has the size `cfg` asks for and holds finite values.
    pub fn check(&self, cfg: &DitConfig) -> Result<()> {
        cfg.validate()?;
        ensure!(
            self.blocks.len() == cfg.depth,
            "weights have {} blocks but the config has depth {}",
            self.blocks.len(),
            cfg.depth
        );
        for ((key, shape), v) in expected_tensors(cfg).iter().zip(self.slots()) {
            let want: usize = shape.iter().product();
            ensure!(
                v.len() == want,
                "weight {key}: expected {want} values (shape {shape:?}), got {}",
                v.len()
            );
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!("weight {key}: non-finite value {} at index {i}", v[i]);
            }
        }
        Ok(())
    }

    /// Deterministic random weights with realistic scales: every matrix ~ U(-a, a) with
    /// std 1/sqrt(fan_in), small nonzero biases, the official 2-D sin-cos `pos_embed` (U(-1, 1)
    /// where hidden is not a multiple of 4, which the sin-cos table needs), and —
    /// unlike the official initialisation, which zeroes them — NONZERO adaLN and final-layer
    /// weights, so that gates, shifts and scales all influence the output (a test on zeroed
    /// modulations would be blind to them). An error for an invalid config, or where the
    /// weights cannot be allocated.
    pub fn random(cfg: &DitConfig, seed: u64) -> Result<DitWeights> {
        cfg.validate()?;
        ensure_weights_fit(cfg, &expected_tensors(cfg), false)?;
        let mut rng = SplitMix64::new(seed);
        let (d, m) = (cfg.hidden, cfg.mlp_hidden());
        let patch_in = cfg.in_channels * cfg.patch * cfg.patch;
        // `dims` values ~ U(-a, a), allocated fallibly.
        let uniform = |dims: &[usize], a: f64, rng: &mut SplitMix64| -> Result<Vec<f32>> {
            let mut v = zeros("random weights", dims)
                .with_context(|| format!("random weights of {}", cfg.arch_name()))?;
            v.iter_mut().for_each(|x| *x = rng.uniform(a));
            Ok(v)
        };
        let mat = |rows: usize, fan_in: usize, rng: &mut SplitMix64| {
            uniform(&[rows, fan_in], (3.0 / fan_in as f64).sqrt(), rng)
        };
        let bias = |n: usize, rng: &mut SplitMix64| uniform(&[n], 0.05, rng);
        let x_embed_w = mat(d, patch_in, &mut rng)?;
        let x_embed_b = bias(d, &mut rng)?;
        let pos_embed = if d % 4 == 0 {
            sincos_pos_embed(d, cfg.grid())
        } else {
            uniform(&[cfg.tokens(), d], 1.0, &mut rng)?
        };
        let t_mlp0_w = mat(d, FREQ_DIM, &mut rng)?;
        let t_mlp0_b = bias(d, &mut rng)?;
        let t_mlp2_w = mat(d, d, &mut rng)?;
        let t_mlp2_b = bias(d, &mut rng)?;
        // Labels as strong as timesteps, so that guidance and the null class matter.
        let y_table = uniform(&[cfg.num_classes + 1, d], 1.0, &mut rng)?;
        let blocks = (0..cfg.depth)
            .map(|_| {
                Ok(BlockWeights {
                    qkv_w: mat(3 * d, d, &mut rng)?,
                    qkv_b: bias(3 * d, &mut rng)?,
                    proj_w: mat(d, d, &mut rng)?,
                    proj_b: bias(d, &mut rng)?,
                    fc1_w: mat(m, d, &mut rng)?,
                    fc1_b: bias(m, &mut rng)?,
                    fc2_w: mat(d, m, &mut rng)?,
                    fc2_b: bias(d, &mut rng)?,
                    ada_w: mat(6 * d, d, &mut rng)?,
                    ada_b: bias(6 * d, &mut rng)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_ada_w = mat(2 * d, d, &mut rng)?;
        let final_ada_b = bias(2 * d, &mut rng)?;
        let final_w = mat(cfg.patch_out(), d, &mut rng)?;
        let final_b = bias(cfg.patch_out(), &mut rng)?;
        Ok(DitWeights {
            x_embed_w,
            x_embed_b,
            pos_embed,
            t_mlp0_w,
            t_mlp0_b,
            t_mlp2_w,
            t_mlp2_b,
            y_table,
            blocks,
            final_ada_w,
            final_ada_b,
            final_w,
            final_b,
        })
    }

    /// Writes the weights in the official key layout, f32, with `cfg` in the safetensors
    /// metadata (see [`DitConfig::to_metadata`]). The file appears whole or not at all
    /// ([`crate::io::write_atomic_with`]: a temporary file beside `path`, flushed, then
    /// renamed; a link followed, a device written into).
    pub fn save(&self, path: impl AsRef<Path>, cfg: &DitConfig) -> Result<()> {
        let path = path.as_ref();
        let named = self.named(cfg)?;
        let views: Vec<(String, F32Tensor)> = named
            .into_iter()
            .map(|(k, shape, data)| (k, F32Tensor { shape, data }))
            .collect();
        // Whole or not at all, a link followed and a device written into, as every output.
        crate::io::write_atomic_with(path, |p| {
            safetensors::serialize_to_file(views, Some(cfg.to_metadata()), p)
                .with_context(|| format!("writing checkpoint {}", p.display()))
        })
    }

    /// Loads a checkpoint in the official key layout (f32, f16 or bf16 tensors) and infers its
    /// config from the tensor shapes; heads come from `arch` or the metadata `fora.heads`.
    /// Everything is validated before use; every failure names the key and the expectation.
    pub fn load(path: impl AsRef<Path>, arch: Option<&Arch>) -> Result<(DitConfig, DitWeights)> {
        Self::load_with_format(path, arch).map(|(cfg, w, _)| (cfg, w))
    }

    /// [`DitWeights::load`], and the file's [`TensorReader::format`]: with which part of a
    /// PyTorch checkpoint was taken (a training checkpoint's `ema`, a wrapped model's names
    /// unwrapped), a choice the file does not state, for the caller to say.
    pub fn load_with_format(
        path: impl AsRef<Path>,
        arch: Option<&Arch>,
    ) -> Result<(DitConfig, DitWeights, crate::io::FileFormat)> {
        let path = path.as_ref();
        // Tensor by tensor from the file: the checkpoint's bytes are never all in memory
        // beside the f32 weights made from them.
        let st = TensorReader::open(path, "checkpoint")?;
        let (cfg, w) = Self::from_reader(&st, arch)
            .with_context(|| format!("checkpoint {}", path.display()))?;
        Ok((cfg, w, st.format()))
    }

    /// [`DitWeights::load`] from the bytes of a safetensors file.
    pub fn from_bytes(bytes: &[u8], arch: Option<&Arch>) -> Result<(DitConfig, DitWeights)> {
        Self::from_reader(&TensorReader::from_bytes(bytes)?, arch)
    }

    /// [`DitWeights::load`] from a safetensors file's tensors.
    pub fn from_reader(st: &TensorReader, arch: Option<&Arch>) -> Result<(DitConfig, DitWeights)> {
        let meta = st.metadata();
        let cfg = infer_config(st, &meta, arch)?;

        let expected = expected_tensors(&cfg);
        let present: BTreeSet<String> = st.names().into_iter().collect();
        let wanted: BTreeSet<String> = expected.iter().map(|(k, _)| k.clone()).collect();
        let missing: Vec<&String> = wanted.difference(&present).collect();
        let unexpected: Vec<&String> = present.difference(&wanted).collect();
        ensure!(
            missing.is_empty(),
            "missing keys for {} ({}): {}",
            cfg.arch_name(),
            missing.len(),
            list(&missing)
        );
        ensure!(
            unexpected.is_empty(),
            "unexpected keys ({}): {}",
            unexpected.len(),
            list(&unexpected)
        );

        ensure_weights_fit(&cfg, &expected, true)?;
        let mut w = DitWeights::empty(cfg.depth);
        for ((key, shape), slot) in expected.iter().zip(w.slots_mut()) {
            // The shape is checked from the header, before the tensor is read.
            let got = st
                .shape(key)
                .with_context(|| format!("missing key {key}"))?;
            ensure!(
                got == shape.as_slice(),
                "tensor {key}: expected shape {shape:?} for {}, got {got:?}",
                cfg.arch_name(),
            );
            *slot = read_f32(st, key, key)?;
            if let Some(i) = slot.iter().position(|x| !x.is_finite()) {
                bail!(
                    "tensor {key}: non-finite value {} at flat index {i}",
                    slot[i]
                );
            }
        }
        Ok((cfg, w))
    }
}

/// An error where the f32 weights of `cfg` (tensors `expected`), and beside them (`reading` a
/// file) the largest one's bytes as read, are more than the machine has free: refused before
/// the first tensor, not after the memory is gone (each tensor is also checked as it comes).
fn ensure_weights_fit(
    cfg: &DitConfig,
    expected: &[(String, Vec<usize>)],
    reading: bool,
) -> Result<()> {
    let what = format!("the {} weights in f32", cfg.arch_name());
    let all = f32_bytes(expected.iter().map(|(_, s)| s.as_slice()));
    let largest = expected
        .iter()
        .map(|(_, s)| f32_bytes([s.as_slice()]))
        .try_fold(0u64, |m, b| Some(m.max(b?)));
    let bytes = all
        .zip(largest)
        .and_then(|(a, l)| a.checked_add(if reading { l } else { 0 }))
        .with_context(|| format!("{what}: their size overflows"))?;
    ensure_free_memory(&what, bytes)
}

/// `dims`' product zeros, or an error naming `what` where the size overflows or the memory
/// cannot be had (a batch or a model too large for this machine), instead of an abort.
///
/// A buffer larger than the memory and swap the machine has free ([`free_memory_bytes`]) is
/// refused before it is allocated: where the kernel overcommits memory (Linux's
/// `vm.overcommit_memory = 1`) such an allocation succeeds and the process is killed later,
/// without a message, when the pages are touched. The buffers are zeroed as they are made, so
/// each one lessens what the next may take: a workspace of many buffers, each small enough
/// alone, is refused at the one that does not fit.
pub fn zeros(what: &str, dims: &[usize]) -> Result<Vec<f32>> {
    let len = f32_len(dims)
        .with_context(|| format!("{what}: {dims:?} elements overflow the address space"))?;
    ensure_free_memory(
        &format!("{what}: {len} f32 values {dims:?}"),
        len as u64 * 4,
    )?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        anyhow::anyhow!(
            "{what}: cannot allocate {len} f32 values ({}) {dims:?}",
            show_bytes(len as u64 * 4)
        )
    })?;
    v.resize(len, 0.0);
    Ok(v)
}

/// Elements of an f32 buffer of `dims`, or None where their product, or its bytes, overflow.
pub fn f32_len(dims: &[usize]) -> Option<usize> {
    checked_product(dims).filter(|&n| n.checked_mul(4).is_some())
}

/// The product of `dims`, None where it overflows.
pub(crate) fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |a, &b| a.checked_mul(b))
}

/// Bytes of the f32 buffers of each of `layout`'s dims together, or None where they overflow.
pub fn f32_bytes<'a>(layout: impl IntoIterator<Item = &'a [usize]>) -> Option<u64> {
    layout.into_iter().try_fold(0u64, |sum, dims| {
        sum.checked_add((f32_len(dims)? as u64).checked_mul(4)?)
    })
}

/// An error naming `what` where `bytes` are more than the memory and swap this machine has
/// free ([`free_memory_bytes`]; nothing is refused where the system does not say).
pub fn ensure_free_memory(what: &str, bytes: u64) -> Result<()> {
    ensure_within_free(what, bytes, free_memory_bytes())
}

/// [`ensure_free_memory`] against a given count of free bytes (None: nothing is refused).
pub(crate) fn ensure_within_free(what: &str, bytes: u64, free: Option<u64>) -> Result<()> {
    if let Some(free) = free {
        ensure!(
            bytes <= free,
            "{what}: {}, more than this machine has free ({} of memory and swap)",
            show_bytes(bytes),
            show_bytes(free)
        );
    }
    Ok(())
}

/// `bytes` for a message: in GiB, MiB or KiB to a tenth, or in bytes below one KiB.
pub(crate) fn show_bytes(bytes: u64) -> String {
    let units = [(30, "GiB"), (20, "MiB"), (10, "KiB")];
    match units.iter().find(|(shift, _)| bytes >= 1u64 << shift) {
        Some(&(shift, unit)) => format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64),
        None => format!("{bytes} bytes"),
    }
}

/// Bytes of memory a new allocation can have without the system running out: `MemAvailable`
/// (free memory and what it can reclaim, e.g. the page cache) plus `SwapFree` of
/// `/proc/meminfo`, where the system says; `None` elsewhere.
pub fn free_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let free = kib("MemAvailable:")?.checked_add(kib("SwapFree:").unwrap_or(0))?;
    free.checked_mul(1024)
}

/// At most 20 names, then a count.
fn list(keys: &[&String]) -> String {
    let mut s = keys
        .iter()
        .take(20)
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > 20 {
        s.push_str(&format!(", ... and {} more", keys.len() - 20));
    }
    s
}

/// `h` extended by the bits of `values` (FNV-1a, a 32-bit word at a time), and by their count.
pub(crate) fn fingerprint_f32(h: u64, values: &[f32]) -> u64 {
    let h = values
        .iter()
        .fold(h, |h, v| crate::fnv::step(h, u64::from(v.to_bits())));
    crate::fnv::step(h, values.len() as u64)
}

/// Tensor `key` of `st` as f32 (`label` names it in errors). Its dtype (f32, f16 or bf16) is
/// checked from the header, before the tensor is read.
pub(crate) fn read_f32(st: &TensorReader, key: &str, label: &str) -> Result<Vec<f32>> {
    let dtype = st
        .info(key)
        .with_context(|| format!("missing key {label}"))?
        .dtype;
    ensure!(
        matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16),
        "tensor {label}: unsupported dtype {dtype} (expected F32, F16 or BF16)"
    );
    let tensor = st.tensor(key)?;
    let data = &tensor.data;
    Ok(match tensor.dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => unreachable!("dtype checked above"),
    })
}

/// Shape of `key`, or an error naming the key when it is absent.
fn shape_of(st: &TensorReader, key: &str) -> Result<Vec<usize>> {
    st.shape(key)
        .map(<[usize]>::to_vec)
        .with_context(|| format!("missing key {key} (needed to infer the architecture)"))
}

/// Infers the config from the shapes, the metadata and `arch`, and checks they agree.
fn infer_config(
    st: &TensorReader,
    meta: &HashMap<String, String>,
    arch: Option<&Arch>,
) -> Result<DitConfig> {
    const XE: &str = "x_embedder.proj.weight";
    const PE: &str = "pos_embed";
    const YT: &str = "y_embedder.embedding_table.weight";
    const FL: &str = "final_layer.linear.weight";
    const FC1: &str = "blocks.0.mlp.fc1.weight";

    let xe = shape_of(st, XE)?;
    ensure!(
        xe.len() == 4 && xe[2] == xe[3] && xe.iter().all(|&s| s > 0),
        "tensor {XE}: expected shape [hidden, in_channels, patch, patch], got {xe:?}"
    );
    let (hidden, in_channels, patch) = (xe[0], xe[1], xe[2]);

    let pe = shape_of(st, PE)?;
    ensure!(
        pe.len() == 3 && pe[0] == 1 && pe[2] == hidden,
        "tensor {PE}: expected shape [1, tokens, {hidden}], got {pe:?}"
    );
    let tokens = pe[1];
    let grid = (tokens as f64).sqrt().round() as usize;
    ensure!(
        grid > 0 && grid * grid == tokens,
        "tensor {PE}: {tokens} tokens is not a square grid of patches"
    );
    let input_size = grid * patch;

    let yt = shape_of(st, YT)?;
    ensure!(
        yt.len() == 2 && yt[0] >= 2 && yt[1] == hidden,
        "tensor {YT}: expected shape [num_classes + 1, {hidden}] with at least one class, got {yt:?}"
    );
    let num_classes = yt[0] - 1;

    let fl = shape_of(st, FL)?;
    let pp = patch * patch;
    let learn_sigma = match fl.as_slice() {
        [o, d] if *d == hidden && *o == pp * 2 * in_channels => true,
        [o, d] if *d == hidden && *o == pp * in_channels => false,
        _ => bail!(
            "tensor {FL}: expected shape [{} (learn_sigma) or {}, {hidden}], got {fl:?}",
            pp * 2 * in_channels,
            pp * in_channels
        ),
    };

    // Depth: the block indices present; a gap shows up later as missing keys. An index past
    // what the file's tensors could hold (10 a block) is refused here, before the key list of
    // that many blocks is built.
    let names = st.names();
    let mut depth = 0usize;
    for name in &names {
        if let Some(rest) = name.strip_prefix("blocks.") {
            if let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                ensure!(
                    i < names.len(),
                    "tensor {name}: block index {i}, but the checkpoint has {} tensors (10 a \
                     block): not a DiT checkpoint's keys",
                    names.len()
                );
                depth = depth.max(i + 1);
            }
        }
    }
    ensure!(
        depth > 0,
        "no transformer blocks in the checkpoint (no blocks.0.* keys)"
    );

    // MLP width from block 0 when it is a multiple of hidden; otherwise keep the official 4
    // and let the shape check name the tensor.
    let mlp_ratio = match st.shape(FC1) {
        Some(s) if s.len() == 2 && s[1] == hidden && s[0] > 0 && s[0] % hidden == 0 => {
            s[0] / hidden
        }
        _ => 4,
    };

    let meta_heads = DitConfig::heads_from_metadata(meta)?;
    let shapes = format!(
        "depth {depth}, hidden {hidden}, patch {patch} (from {XE} {xe:?} and the block keys)"
    );
    if let Some(a) = arch {
        let name = a.official_name().unwrap_or_else(|| {
            format!(
                "depth={},hidden={},heads={},patch={}",
                a.depth, a.hidden, a.heads, a.patch
            )
        });
        for (what, want, got) in [
            ("depth", a.depth, depth),
            ("hidden", a.hidden, hidden),
            ("patch", a.patch, patch),
        ] {
            ensure!(
                want == got,
                "--arch {name} has {what} {want} but the checkpoint has {shapes}"
            );
        }
        if let Some(h) = meta_heads {
            ensure!(
                h == a.heads,
                "--arch {name} has {} heads but the checkpoint metadata says fora.heads={h}",
                a.heads
            );
        }
    }
    // Metadata written by this project records the whole config: it must match the shapes.
    for (key, got) in [
        ("fora.depth", depth),
        ("fora.hidden", hidden),
        ("fora.patch", patch),
        ("fora.in_channels", in_channels),
        ("fora.input_size", input_size),
        ("fora.num_classes", num_classes),
        ("fora.mlp_ratio", mlp_ratio),
    ] {
        if let Some(v) = meta.get(key) {
            let want: usize = v
                .parse()
                .with_context(|| format!("checkpoint metadata {key}={v:?} is not a number"))?;
            ensure!(
                want == got,
                "checkpoint metadata {key}={want} disagrees with the tensor shapes ({key} = {got})"
            );
        }
    }
    if let Some(v) = meta.get("fora.learn_sigma") {
        ensure!(
            v == &learn_sigma.to_string(),
            "checkpoint metadata fora.learn_sigma={v} disagrees with {FL} {fl:?} (learn_sigma = {learn_sigma})"
        );
    }
    let heads = match (arch, meta_heads) {
        (Some(a), _) => a.heads,
        (None, Some(h)) => h,
        (None, None) => {
            // An official model's depth and width name it (the official release's .pt files
            // record no architecture); the heads are still the user's to confirm.
            let official = Arch::official_name_for(depth, hidden, patch);
            bail!(
                "the number of attention heads cannot be inferred from the tensor shapes \
                 ({shapes}) and the checkpoint metadata has no fora.heads: pass --arch ({})",
                match official {
                    Some(name) => format!(
                        "these shapes are {name}'s: --arch {name}; or \
                         depth={depth},hidden={hidden},heads=H,patch={patch}"
                    ),
                    None => format!(
                        "e.g. DiT-XL/2, or depth={depth},hidden={hidden},heads=H,patch={patch}"
                    ),
                }
            )
        }
    };
    ensure!(
        heads > 0 && hidden % heads == 0,
        "{heads} heads do not divide hidden {hidden}"
    );
    let mut cfg = DitConfig::from_arch(
        &Arch {
            depth,
            hidden,
            heads,
            patch,
        },
        in_channels,
        input_size,
        num_classes,
        learn_sigma,
    )?;
    cfg.mlp_ratio = mlp_ratio;
    // The ratio comes from the file: hold it to the limits every other size is held to.
    cfg.validate()?;
    Ok(cfg)
}

/// The official fixed 2-D sin-cos position embedding `[T, D]` (D divisible by 4): for the
/// token at row i, column j, the first D/2 features encode j and the last D/2 encode i, each as
/// `[sin(pos * w), cos(pos * w)]` with `w_k = 10000^(-k / (D/4))`.
pub fn sincos_pos_embed(hidden: usize, grid: usize) -> Vec<f32> {
    let quarter = hidden / 4;
    let mut out = vec![0f32; grid * grid * hidden];
    for i in 0..grid {
        for j in 0..grid {
            let row = &mut out[(i * grid + j) * hidden..][..hidden];
            for (half, pos) in [(0, j), (1, i)] {
                let dst = &mut row[half * 2 * quarter..][..2 * quarter];
                for k in 0..quarter {
                    let omega = 1.0 / 10000f64.powf(k as f64 / quarter as f64);
                    let a = pos as f64 * omega;
                    dst[k] = a.sin() as f32;
                    dst[quarter + k] = a.cos() as f32;
                }
            }
        }
    }
    out
}

/// A small deterministic generator for random weights (not the sampler's noise generator).
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed ^ 0x6a09_e667_f3bc_c909)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-a, a).
    pub(crate) fn uniform(&mut self, a: f64) -> f32 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((2.0 * u - 1.0) * a) as f32
    }
}

/// An f32 tensor to serialize, converted to bytes one tensor at a time while writing.
struct F32Tensor<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl safetensors::View for F32Tensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_past_the_machines_memory_are_refused_before_allocating() {
        let Some(free) = free_memory_bytes() else {
            eprintln!("SKIP: no /proc/meminfo here");
            return;
        };
        assert!(free > 1 << 20, "free memory and swap read as {free} bytes");
        // Twice what is free: refused by the bound even where the kernel would overcommit.
        let len = (free / 2 + 1) as usize;
        let err = zeros("a test buffer", &[len, 1]).unwrap_err().to_string();
        assert!(
            err.contains("a test buffer") && err.contains("more than this machine has free"),
            "{err}"
        );
        assert_eq!(zeros("small", &[3, 2]).unwrap(), vec![0.0; 6]);
    }

    #[test]
    fn layout_counts() {
        let cfg = DitConfig::official("DiT-XL/2", 32).unwrap();
        let w = DitWeights::empty(cfg.depth);
        assert_eq!(expected_tensors(&cfg).len(), w.slots().len());
        let params: usize = expected_tensors(&cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        // DiT-XL/2 has 675M parameters (plus the 295k pos_embed buffer).
        assert!((675_000_000..676_500_000).contains(&params), "{params}");
    }

    #[test]
    fn pos_embed_matches_formula() {
        let pe = sincos_pos_embed(8, 3);
        // token (i=1, j=2): first half encodes j=2, second half i=1; quarter = 2, omega = [1, 0.01].
        let row = &pe[5 * 8..6 * 8];
        let want = [
            2f64.sin(),
            0.02f64.sin(),
            2f64.cos(),
            0.02f64.cos(),
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (a, b) in row.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{row:?}");
        }
    }
}
