//! The image decoder of latent DiT models: the decoder of the Stable Diffusion VAE
//! (`AutoencoderKL`), which DiT's official sampling code runs on its latents
//! (`vae.decode(samples / 0.18215).sample`, weights `stabilityai/sd-vae-ft-ema` or `-mse`).
//! f32 on the CPU, plain and in the order of the published architecture:
//!
//! ```text
//! z / scaling_factor -> post_quant_conv (1x1) -> conv_in (3x3)
//!   -> mid block: resnet, attention (one head over every pixel), resnet
//!   -> up blocks, widest first: resnets (GroupNorm, SiLU, 3x3 conv, twice, plus the input,
//!      through a 1x1 conv where the width changes); all but the last: nearest 2x + 3x3 conv
//!   -> GroupNorm, SiLU, conv_out (3x3) -> image in about [-1, 1]
//! ```
//!
//! Weights are read from a safetensors file or a PyTorch checkpoint (diffusers'
//! `diffusion_pytorch_model.bin`, a Stable Diffusion `.ckpt`) in diffusers' key layout (`decoder.*`,
//! `post_quant_conv.*`; the encoder's keys are ignored). The mid block's attention may use
//! either of diffusers' names (`to_q`/`to_k`/`to_v`/`to_out.0`, or the older
//! `query`/`key`/`value`/`proj_attn`), as Linear `[C, C]` or 1x1 conv `[C, C, 1, 1]` weights.
//! A file in the original Stable Diffusion (LDM) layout is read too (`decoder.mid.block_1`,
//! `decoder.up.3.block.0`, `decoder.mid.attn_1.q`, ..., bare or under `first_stage_model.` as
//! in a whole Stable Diffusion checkpoint), its names translated ([`ldm_to_diffusers`]).
//! The widths, depth and channel counts come from the tensor shapes; GroupNorm's group count
//! (32 in every Stable Diffusion VAE) and the latent scaling factor (0.18215) from the metadata
//! `fora.vae.groups` and `fora.vae.scaling_factor` where present, else from diffusers'
//! `config.json` beside the weights ([`VaeDecoder::load`]).
//!
//! `tests/vae.rs` holds this to diffusers' own decoder (fixtures of `tools/make_vae_fixture.py`).

use crate::cpu::ops::{attention, linear, silu};
use crate::io::TensorReader;
use crate::weights::{checked_product, zeros};
use anyhow::{bail, ensure, Context, Result};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// GroupNorm's epsilon in every norm of the decoder (diffusers' `resnet_eps` and
/// `conv_norm_out`).
pub const GROUP_NORM_EPS: f64 = 1e-6;
/// GroupNorm groups where the file does not say (every Stable Diffusion VAE).
pub const DEFAULT_GROUPS: usize = 32;
/// The latent scaling factor where the file does not say (DiT's `samples / 0.18215`).
pub const DEFAULT_SCALING_FACTOR: f32 = 0.18215;

/// The decoder's architecture, as read from a weights file.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Channels of a latent (4 for Stable Diffusion's VAE).
    pub latent_channels: usize,
    /// Channels of an image (3).
    pub out_channels: usize,
    /// Width of each up block, in the order they run (widest first: 512, 512, 256, 128).
    pub block_channels: Vec<usize>,
    /// Resnets per up block (3; diffusers' `layers_per_block + 1`).
    pub resnets_per_block: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Whether the mid block has its attention.
    pub mid_attention: bool,
    /// Latents are divided by it before decoding.
    pub scaling_factor: f32,
}

impl VaeConfig {
    /// How many times larger an image side is than a latent side (2 per upsampler: 8).
    pub fn upscale(&self) -> usize {
        1 << (self.block_channels.len() - 1)
    }

    /// Multiply-adds of decoding one `h x w` latent: every convolution (pixels x cout x cin x
    /// k x k) and the attention's products (q, k, v and the output projection; q k^T and the
    /// probabilities times v), the elementwise work left out. For throughput figures.
    pub fn macs(&self, h: usize, w: usize) -> f64 {
        if self.block_channels.is_empty() {
            return 0.0;
        }
        let conv = |pixels: f64, cout: usize, cin: usize, k: usize| {
            pixels * cout as f64 * cin as f64 * (k * k) as f64
        };
        let resnet = |pixels: f64, cin: usize, cout: usize| {
            conv(pixels, cout, cin, 3)
                + conv(pixels, cout, cout, 3)
                + if cin != cout {
                    conv(pixels, cout, cin, 1)
                } else {
                    0.0
                }
        };
        let (z, c0) = (self.latent_channels, self.block_channels[0]);
        let mut pixels = h as f64 * w as f64;
        let mut total =
            conv(pixels, z, z, 1) + conv(pixels, c0, z, 3) + 2.0 * resnet(pixels, c0, c0);
        if self.mid_attention {
            let t = pixels;
            let c = c0 as f64;
            total += 4.0 * t * c * c + 2.0 * t * t * c;
        }
        let mut width = c0;
        for (i, &out) in self.block_channels.iter().enumerate() {
            for j in 0..self.resnets_per_block {
                total += resnet(pixels, if j == 0 { width } else { out }, out);
            }
            width = out;
            if i + 1 < self.block_channels.len() {
                pixels *= 4.0;
                total += conv(pixels, out, out, 3);
            }
        }
        total + conv(pixels, self.out_channels, width, 3)
    }
}

/// The tensors of a decoder in diffusers' key layout: (name, shape, fan-in).
type Specs = Vec<(String, Vec<usize>, usize)>;

fn conv_specs(specs: &mut Specs, prefix: &str, cout: usize, cin: usize, k: usize) {
    specs.push((
        format!("{prefix}.weight"),
        vec![cout, cin, k, k],
        cin * k * k,
    ));
    specs.push((format!("{prefix}.bias"), vec![cout], cin * k * k));
}

fn norm_specs(specs: &mut Specs, prefix: &str, c: usize) {
    specs.push((format!("{prefix}.weight"), vec![c], c));
    specs.push((format!("{prefix}.bias"), vec![c], c));
}

fn resnet_specs(specs: &mut Specs, prefix: &str, cin: usize, cout: usize) {
    norm_specs(specs, &format!("{prefix}.norm1"), cin);
    conv_specs(specs, &format!("{prefix}.conv1"), cout, cin, 3);
    norm_specs(specs, &format!("{prefix}.norm2"), cout);
    conv_specs(specs, &format!("{prefix}.conv2"), cout, cout, 3);
    if cin != cout {
        conv_specs(specs, &format!("{prefix}.conv_shortcut"), cout, cin, 1);
    }
}

/// A random decoder's weights as a safetensors file in diffusers' key layout, for tests and
/// benchmarks without the real weights: up blocks of `widths` (widest first; the Stable
/// Diffusion VAE's are 512, 512, 256, 128) with `resnets` each (3), 4 latent and 3 image
/// channels, `groups` GroupNorm groups (in the metadata). PyTorch's default initialisation
/// (uniform within 1 / sqrt(fan-in)) for convolutions and Linears, GroupNorm's scale and shift
/// near 1 and 0.
pub fn random_weights(
    widths: &[usize],
    resnets: usize,
    groups: usize,
    seed: u64,
) -> Result<Vec<u8>> {
    ensure!(
        !widths.is_empty()
            && widths.iter().all(|&c| c > 0 && c <= 1 << 16)
            && resnets > 0
            && groups > 0,
        "a random VAE needs widths of 1 to 65536 channels, resnets and groups; got widths \
         {widths:?}, {resnets} resnets, {groups} groups"
    );
    let mut specs = Specs::new();
    let c0 = widths[0];
    conv_specs(&mut specs, "post_quant_conv", 4, 4, 1);
    conv_specs(&mut specs, "decoder.conv_in", c0, 4, 3);
    for j in 0..2 {
        resnet_specs(
            &mut specs,
            &format!("decoder.mid_block.resnets.{j}"),
            c0,
            c0,
        );
    }
    let a = "decoder.mid_block.attentions.0";
    norm_specs(&mut specs, &format!("{a}.group_norm"), c0);
    for l in ["to_q", "to_k", "to_v", "to_out.0"] {
        specs.push((format!("{a}.{l}.weight"), vec![c0, c0], c0));
        specs.push((format!("{a}.{l}.bias"), vec![c0], c0));
    }
    let mut width = c0;
    for (i, &out) in widths.iter().enumerate() {
        for j in 0..resnets {
            let cin = if j == 0 { width } else { out };
            resnet_specs(
                &mut specs,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                cin,
                out,
            );
        }
        if i + 1 < widths.len() {
            let up = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
            conv_specs(&mut specs, &up, out, out, 3);
        }
        width = out;
    }
    norm_specs(&mut specs, "decoder.conv_norm_out", width);
    conv_specs(&mut specs, "decoder.conv_out", 3, width, 3);
    let mut rng = crate::weights::SplitMix64::new(seed);
    let mut tensors = Vec::with_capacity(specs.len());
    for (name, shape, fan_in) in specs {
        let mut values = zeros("random VAE weights", &shape)?;
        let norm = name.contains("norm");
        let bound = if norm {
            0.2
        } else {
            1.0 / (fan_in as f64).sqrt()
        };
        let base = if norm && name.ends_with("weight") {
            1.0
        } else {
            0.0
        };
        values
            .iter_mut()
            .for_each(|v| *v = base + rng.uniform(bound));
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name, shape, bytes));
    }
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map_err(|e| anyhow::anyhow!("tensor {n}: {e}"))?;
            Ok((n.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("fora.vae.groups".to_string(), groups.to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| anyhow::anyhow!("a random VAE: {e}"))
}

/// A convolution: weight `[cout, cin, k, k]`, bias `[cout]`, stride 1, padding `k / 2`.
pub(crate) struct Conv {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) cout: usize,
    pub(crate) cin: usize,
    pub(crate) k: usize,
}

/// GroupNorm's affine parameters.
pub(crate) struct Norm {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
}

/// diffusers' `ResnetBlock2D` (no time embedding, output scale 1).
pub(crate) struct Resnet {
    pub(crate) norm1: Norm,
    pub(crate) conv1: Conv,
    pub(crate) norm2: Norm,
    pub(crate) conv2: Conv,
    /// 1x1 conv of the input where the width changes.
    pub(crate) shortcut: Option<Conv>,
}

/// The mid block's self-attention: one head over every pixel, with a residual.
pub(crate) struct Attention {
    pub(crate) norm: Norm,
    /// q, k and v stacked: `[3C, C]`, bias `[3C]`.
    pub(crate) qkv_weight: Vec<f32>,
    pub(crate) qkv_bias: Vec<f32>,
    pub(crate) out_weight: Vec<f32>,
    pub(crate) out_bias: Vec<f32>,
}

pub(crate) struct UpBlock {
    pub(crate) resnets: Vec<Resnet>,
    pub(crate) upsampler: Option<Conv>,
}

/// The decoder and its weights (f32).
pub struct VaeDecoder {
    cfg: VaeConfig,
    post_quant_conv: Conv,
    pub(crate) conv_in: Conv,
    pub(crate) mid_resnets: [Resnet; 2],
    pub(crate) mid_attention: Option<Attention>,
    pub(crate) up_blocks: Vec<UpBlock>,
    pub(crate) norm_out: Norm,
    pub(crate) conv_out: Conv,
    /// A hash of every weight, in the order they were read ([`VaeDecoder::fingerprint`]).
    fingerprint: u64,
    /// The weights file's format ([`VaeDecoder::source`]).
    format: crate::io::FileFormat,
    /// The diffusers `config.json` the settings came from, if one did.
    config_json: Option<std::path::PathBuf>,
}

/// Reads the tensors of one file by their diffusers names, each at most once, checking names,
/// shapes and values.
struct Loader<'a> {
    st: TensorReader<'a>,
    /// The file's key of each diffusers name.
    keys: BTreeMap<String, String>,
    taken: BTreeSet<String>,
    /// Every tensor taken, hashed in the order taken.
    fingerprint: u64,
}

impl Loader<'_> {
    fn has(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// `key`, and the file's name for it where that differs.
    fn label(&self, key: &str) -> String {
        match self.keys.get(key) {
            Some(file) if file != key => format!("{key} ({file} in the file)"),
            _ => key.to_string(),
        }
    }

    /// The file's name of `key`.
    fn file_key(&self, key: &str) -> Result<&str> {
        self.keys
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("missing key {key}"))
    }

    /// Shape of `key`, from the header (nothing is read).
    fn shape(&self, key: &str) -> Result<Vec<usize>> {
        let file = self.file_key(key)?;
        self.st
            .shape(file)
            .map(<[usize]>::to_vec)
            .with_context(|| format!("missing key {file}"))
    }

    /// Tensor `key`, whose shape must be one of `shapes` (they hold the same values in the
    /// same order), as f32. The shape is checked before the tensor is read.
    fn take_any(&mut self, key: &str, shapes: &[&[usize]]) -> Result<Vec<f32>> {
        let shape = self.shape(key)?;
        let label = self.label(key);
        ensure!(
            shapes.contains(&shape.as_slice()),
            "tensor {label}: expected shape {}, got {:?}",
            shapes
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(" or "),
            shape
        );
        let data = crate::weights::read_f32(&self.st, self.file_key(key)?, &label)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            bail!(
                "tensor {label}: non-finite value {} at flat index {i}",
                data[i]
            );
        }
        self.taken.insert(key.to_string());
        self.fingerprint = crate::weights::fingerprint_f32(self.fingerprint, &data);
        Ok(data)
    }

    fn take(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.take_any(key, &[shape])
    }

    fn conv(&mut self, prefix: &str, cout: usize, cin: usize, k: usize) -> Result<Conv> {
        Ok(Conv {
            weight: self.take(&format!("{prefix}.weight"), &[cout, cin, k, k])?,
            bias: self.take(&format!("{prefix}.bias"), &[cout])?,
            cout,
            cin,
            k,
        })
    }

    fn norm(&mut self, prefix: &str, c: usize) -> Result<Norm> {
        Ok(Norm {
            weight: self.take(&format!("{prefix}.weight"), &[c])?,
            bias: self.take(&format!("{prefix}.bias"), &[c])?,
        })
    }

    fn resnet(&mut self, prefix: &str, cin: usize, cout: usize) -> Result<Resnet> {
        let shortcut_key = format!("{prefix}.conv_shortcut.weight");
        let shortcut = if cin != cout {
            Some(self.conv(&format!("{prefix}.conv_shortcut"), cout, cin, 1)?)
        } else {
            ensure!(
                !self.has(&shortcut_key),
                "unexpected key {shortcut_key}: the resnet keeps its width ({cin} channels)"
            );
            None
        };
        Ok(Resnet {
            norm1: self.norm(&format!("{prefix}.norm1"), cin)?,
            conv1: self.conv(&format!("{prefix}.conv1"), cout, cin, 3)?,
            norm2: self.norm(&format!("{prefix}.norm2"), cout)?,
            conv2: self.conv(&format!("{prefix}.conv2"), cout, cout, 3)?,
            shortcut,
        })
    }

    /// A Linear `[c, c]` (or a 1x1 conv of the same values) under `names`, the first present.
    fn linear(&mut self, prefix: &str, names: [&str; 2], c: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let name = names
            .iter()
            .find(|n| self.has(&format!("{prefix}.{n}.weight")))
            .with_context(|| {
                format!(
                    "missing key {prefix}.{}.weight (or {prefix}.{}.weight)",
                    names[0], names[1]
                )
            })?;
        let w = self.take_any(
            &format!("{prefix}.{name}.weight"),
            &[&[c, c], &[c, c, 1, 1]],
        )?;
        let b = self.take(&format!("{prefix}.{name}.bias"), &[c])?;
        Ok((w, b))
    }

    fn attention(&mut self, prefix: &str, c: usize) -> Result<Attention> {
        let norm = self.norm(&format!("{prefix}.group_norm"), c)?;
        let (q, qb) = self.linear(prefix, ["to_q", "query"], c)?;
        let (k, kb) = self.linear(prefix, ["to_k", "key"], c)?;
        let (v, vb) = self.linear(prefix, ["to_v", "value"], c)?;
        let (out_weight, out_bias) = self.linear(prefix, ["to_out.0", "proj_attn"], c)?;
        Ok(Attention {
            norm,
            qkv_weight: [q, k, v].concat(),
            qkv_bias: [qb, kb, vb].concat(),
            out_weight,
            out_bias,
        })
    }
}

/// The diffusers name of `key`, a name of the original Stable Diffusion (LDM) layout (with
/// any `first_stage_model.` prefix removed) in a decoder of `blocks` up blocks: LDM numbers
/// its up blocks from the narrowest (`up.0`), diffusers from the widest (`up_blocks.0`).
/// Names outside the decoder come back as they are.
pub fn ldm_to_diffusers(key: &str, blocks: usize) -> String {
    let resnet = |rest: &str| rest.replace("nin_shortcut", "conv_shortcut");
    if let Some(rest) = key.strip_prefix("decoder.mid.block_1.") {
        return format!("decoder.mid_block.resnets.0.{}", resnet(rest));
    }
    if let Some(rest) = key.strip_prefix("decoder.mid.block_2.") {
        return format!("decoder.mid_block.resnets.1.{}", resnet(rest));
    }
    if let Some(rest) = key.strip_prefix("decoder.mid.attn_1.") {
        let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let layer = match layer {
            "norm" => "group_norm",
            "q" => "query",
            "k" => "key",
            "v" => "value",
            "proj_out" => "proj_attn",
            other => other,
        };
        return format!("decoder.mid_block.attentions.0.{layer}.{tail}");
    }
    if let Some(rest) = key.strip_prefix("decoder.norm_out.") {
        return format!("decoder.conv_norm_out.{rest}");
    }
    if let Some(rest) = key.strip_prefix("decoder.up.") {
        let Some((i, tail)) = rest.split_once('.') else {
            return key.to_string();
        };
        let Some(i) = canonical_index(i).filter(|&i| i < blocks) else {
            return key.to_string();
        };
        let block = blocks - 1 - i;
        if let Some(r) = tail.strip_prefix("block.") {
            return format!("decoder.up_blocks.{block}.resnets.{}", resnet(r));
        }
        if let Some(r) = tail.strip_prefix("upsample.") {
            return format!("decoder.up_blocks.{block}.upsamplers.0.{r}");
        }
    }
    key.to_string()
}

/// The file's key of each diffusers name: the names themselves in diffusers' layout, or the
/// LDM layout's translated.
fn diffusers_keys(file_keys: &[String]) -> Result<BTreeMap<String, String>> {
    const PREFIX: &str = "first_stage_model.";
    let bare = |k: &str| k.strip_prefix(PREFIX).unwrap_or(k).to_string();
    let ldm = file_keys.iter().any(|k| {
        let k = bare(k);
        k.starts_with("decoder.mid.") || k.starts_with("decoder.up.")
    });
    // One past the highest up level (a gap then shows as a missing level by name).
    let blocks = file_keys
        .iter()
        .filter_map(|k| {
            let i = bare(k);
            let i = i.strip_prefix("decoder.up.")?.split('.').next()?;
            canonical_index(i)
        })
        .max()
        .map_or(0, |i| i + 1);
    let mut keys = BTreeMap::new();
    for k in file_keys {
        let name = if ldm {
            ldm_to_diffusers(&bare(k), blocks)
        } else {
            k.clone()
        };
        // Two tensors of one name (a half-converted file, a decoder both bare and under the
        // prefix) would leave one of them unread, and which one would change from run to run.
        if let Some(earlier) = keys.insert(name.clone(), k.clone()) {
            bail!("tensors {earlier} and {k} are both {name}");
        }
    }
    Ok(keys)
}

/// `text` as an index where it is written as one (`3`; not `03` or `+3`).
fn canonical_index(text: &str) -> Option<usize> {
    text.parse::<usize>().ok().filter(|i| i.to_string() == text)
}

/// The numbers `i` of the keys `{prefix}{i}.*`, sorted; an error unless they are 0..n.
fn indices(names: &[&str], prefix: &str) -> Result<usize> {
    let found: BTreeSet<usize> = names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    let n = found.len();
    ensure!(
        found.iter().copied().eq(0..n),
        "keys {prefix}N.*: the numbers {found:?} are not 0..{n}"
    );
    Ok(n)
}

/// A setting from the weights file's metadata `key`, else from its diffusers `config.json`
/// (`from_config`: the file and its value), else `default`; the two disagreeing is an error.
fn setting<T: std::str::FromStr + PartialEq + std::fmt::Display + Copy>(
    meta: &HashMap<String, String>,
    key: &str,
    from_config: Option<(&Path, T)>,
    default: T,
) -> Result<T> {
    let from_meta = match meta.get(key) {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("metadata {key} = {v:?} is not a valid value"))?,
        ),
    };
    match (from_meta, from_config) {
        (Some(m), Some((path, c))) if m != c => bail!(
            "metadata {key} = {m} disagrees with {} ({c})",
            path.display()
        ),
        (Some(m), _) => Ok(m),
        (None, Some((_, c))) => Ok(c),
        (None, None) => Ok(default),
    }
}

/// What diffusers' `config.json` beside a VAE's weights (`stabilityai/sd-vae-ft-ema/
/// config.json` beside its `diffusion_pytorch_model.bin` or `.safetensors`) says of an
/// `AutoencoderKL`: the settings its tensors do not show (GroupNorm groups, scaling factor),
/// and the architecture they do, to check against them.
#[derive(Debug, Default)]
struct DiffusersConfig {
    path: std::path::PathBuf,
    norm_num_groups: Option<usize>,
    scaling_factor: Option<f32>,
    latent_channels: Option<usize>,
    out_channels: Option<usize>,
    /// The encoder's order (narrowest first); the decoder's up blocks run it reversed.
    block_out_channels: Option<Vec<usize>>,
    /// Resnets per up block, less one.
    layers_per_block: Option<usize>,
}

impl DiffusersConfig {
    /// The `config.json` in the folder of `weights`, where `weights` has the name diffusers
    /// gives a model's weights (`diffusion_pytorch_model[.fp16].{safetensors,bin}`) and the
    /// config is an `AutoencoderKL`'s (`_class_name`); another file's folder, another model's
    /// config or a file that is not JSON is passed over. A field of the wrong type is an error
    /// naming it, as is a latent shift or mean (`shift_factor`, `latents_mean`,
    /// `latents_std`: the SD3 and FLUX VAEs), which this decoder does not apply.
    fn beside(weights: &Path) -> Result<Option<DiffusersConfig>> {
        let diffusers_weights = weights
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("diffusion_pytorch_model"));
        if !diffusers_weights {
            return Ok(None);
        }
        let path = weights
            .parent()
            .unwrap_or(Path::new(""))
            .join("config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&text) else {
            return Ok(None);
        };
        if json.get("_class_name").and_then(|v| v.as_str()) != Some("AutoencoderKL") {
            return Ok(None);
        }
        let field = |key: &str| json.get(key).filter(|v| !v.is_null());
        let bad =
            |key: &str, what: &str| anyhow::anyhow!("{}: {key} is not {what}", path.display());
        for key in ["shift_factor", "latents_mean", "latents_std"] {
            let Some(v) = field(key) else { continue };
            ensure!(
                v.as_f64() == Some(0.0),
                "{}: {key} is {v}: a VAE whose latents are shifted (SD3, FLUX), which this \
                 decoder (Stable Diffusion's) does not apply",
                path.display()
            );
        }
        let count = |key: &str| -> Result<Option<usize>> {
            field(key)
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| bad(key, "a whole number"))
                })
                .transpose()
        };
        let scaling_factor = field("scaling_factor")
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| bad("scaling_factor", "a number"))
            })
            .transpose()?;
        let block_out_channels = field("block_out_channels")
            .map(|v| {
                v.as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|c| c.as_u64().and_then(|n| usize::try_from(n).ok()))
                            .collect::<Option<Vec<usize>>>()
                    })
                    .ok_or_else(|| bad("block_out_channels", "a list of whole numbers"))
            })
            .transpose()?;
        Ok(Some(DiffusersConfig {
            norm_num_groups: count("norm_num_groups")?,
            scaling_factor,
            latent_channels: count("latent_channels")?,
            out_channels: count("out_channels")?,
            block_out_channels,
            layers_per_block: count("layers_per_block")?,
            path,
        }))
    }

    /// An error unless the architecture it states is `cfg`'s, read from the tensors.
    fn check(&self, cfg: &VaeConfig) -> Result<()> {
        let path = self.path.display();
        let differs = |key: &str, said: String, got: String| {
            anyhow::anyhow!("{path} says {key} {said}, the weights have {got}")
        };
        if let Some(c) = self.latent_channels.filter(|&c| c != cfg.latent_channels) {
            return Err(differs(
                "latent_channels",
                c.to_string(),
                cfg.latent_channels.to_string(),
            ));
        }
        if let Some(c) = self.out_channels.filter(|&c| c != cfg.out_channels) {
            return Err(differs(
                "out_channels",
                c.to_string(),
                cfg.out_channels.to_string(),
            ));
        }
        if let Some(l) = self
            .layers_per_block
            .filter(|&l| l.checked_add(1) != Some(cfg.resnets_per_block))
        {
            return Err(differs(
                "layers_per_block",
                format!("{l} (resnets per up block, less one)"),
                format!("{} resnets per up block", cfg.resnets_per_block),
            ));
        }
        if let Some(c) = &self.block_out_channels {
            let decoder_order: Vec<usize> = c.iter().rev().copied().collect();
            if decoder_order != cfg.block_channels {
                return Err(differs(
                    "block_out_channels",
                    format!("{c:?}"),
                    format!("{:?} (up blocks, widest first)", cfg.block_channels),
                ));
            }
        }
        Ok(())
    }
}

impl VaeDecoder {
    /// Reads a VAE weights file: safetensors or a PyTorch checkpoint (diffusers' `.bin`, a
    /// Stable Diffusion `.ckpt`), in diffusers' key layout or the original one; f32, f16 or
    /// bf16. Where it is diffusers' `diffusion_pytorch_model[.fp16].{safetensors,bin}` and
    /// the `config.json` of an `AutoencoderKL` sits beside it, its
    /// `norm_num_groups` and `scaling_factor` are taken where the file's metadata does not give
    /// them (and must agree where it does), and the architecture it states must be the
    /// tensors'.
    pub fn load(path: impl AsRef<Path>) -> Result<VaeDecoder> {
        let path = path.as_ref();
        // Tensor by tensor from the file: a whole Stable Diffusion checkpoint costs its
        // decoder's tensors, not its gigabytes.
        let st = TensorReader::open(path, "VAE weights")?;
        let config = DiffusersConfig::beside(path)?;
        Self::from_parts(st, config.as_ref())
            .with_context(|| format!("VAE weights {}", path.display()))
    }

    /// [`VaeDecoder::load`] from the bytes of a safetensors file.
    pub fn from_bytes(bytes: &[u8]) -> Result<VaeDecoder> {
        Self::from_reader(TensorReader::from_bytes(bytes)?)
    }

    /// [`VaeDecoder::load`] from a safetensors file's tensors.
    pub fn from_reader(st: TensorReader) -> Result<VaeDecoder> {
        Self::from_parts(st, None)
    }

    /// [`VaeDecoder::from_reader`] with the settings of a diffusers `config.json`.
    fn from_parts(st: TensorReader, config: Option<&DiffusersConfig>) -> Result<VaeDecoder> {
        let meta = st.metadata();
        let format = st.format();
        let file_keys = st.names();
        let keys = diffusers_keys(&file_keys)?;
        let names: Vec<String> = keys.keys().cloned().collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut l = Loader {
            st,
            keys,
            taken: BTreeSet::new(),
            fingerprint: crate::fnv::OFFSET,
        };

        const CONV_IN: &str = "decoder.conv_in.weight";
        ensure!(
            l.has(CONV_IN),
            "no tensor {CONV_IN}: not the weights of a VAE decoder in diffusers' key layout \
             (e.g. stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors) or the \
             original Stable Diffusion one"
        );
        let conv_in = l.shape(CONV_IN)?;
        ensure!(
            conv_in.len() == 4 && conv_in[2] == 3 && conv_in[3] == 3,
            "tensor {}: expected shape [C, latent channels, 3, 3], got {conv_in:?}",
            l.label(CONV_IN)
        );
        let latent_channels = conv_in[1];
        let blocks = indices(&names, "decoder.up_blocks.")?;
        ensure!(blocks > 0, "no decoder.up_blocks.N.* keys");
        let resnets_per_block = indices(&names, "decoder.up_blocks.0.resnets.")?;
        ensure!(
            resnets_per_block > 0,
            "no decoder.up_blocks.0.resnets.N.* keys"
        );
        let mut block_channels = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let key = format!("decoder.up_blocks.{i}.resnets.0.conv1.weight");
            let shape = l.shape(&key)?;
            ensure!(
                shape.len() == 4,
                "tensor {}: expected 4 dimensions, got {shape:?}",
                l.label(&key)
            );
            block_channels.push(shape[0]);
        }
        let conv_out = l.shape("decoder.conv_out.weight")?;
        ensure!(
            conv_out.len() == 4,
            "tensor {}: expected 4 dimensions, got {conv_out:?}",
            l.label("decoder.conv_out.weight")
        );
        let cfg = VaeConfig {
            latent_channels,
            out_channels: conv_out[0],
            block_channels,
            resnets_per_block,
            groups: setting(
                &meta,
                "fora.vae.groups",
                config.and_then(|c| Some((c.path.as_path(), c.norm_num_groups?))),
                DEFAULT_GROUPS,
            )?,
            mid_attention: names
                .iter()
                .any(|n| n.starts_with("decoder.mid_block.attentions.0.")),
            scaling_factor: setting(
                &meta,
                "fora.vae.scaling_factor",
                config.and_then(|c| Some((c.path.as_path(), c.scaling_factor?))),
                DEFAULT_SCALING_FACTOR,
            )?,
        };
        if let Some(config) = config {
            config.check(&cfg)?;
        }
        let c0 = cfg.block_channels[0];
        let widths = std::iter::once(c0).chain(cfg.block_channels.iter().copied());
        ensure!(
            cfg.groups > 0 && widths.clone().all(|c| c > 0 && c % cfg.groups == 0),
            "GroupNorm with {} groups (metadata fora.vae.groups or config.json's \
             norm_num_groups, default {DEFAULT_GROUPS}) does not divide the widths {:?}",
            cfg.groups,
            cfg.block_channels
        );
        ensure!(
            cfg.scaling_factor.is_finite() && cfg.scaling_factor > 0.0,
            "metadata fora.vae.scaling_factor = {} must be a finite number > 0",
            cfg.scaling_factor
        );
        ensure!(
            blocks <= 8 && latent_channels > 0 && cfg.out_channels > 0,
            "a decoder of {blocks} up blocks, {latent_channels} latent and {} image channels \
             is not a VAE this decoder runs",
            cfg.out_channels
        );

        let z = latent_channels;
        let post_quant_conv = l.conv("post_quant_conv", z, z, 1)?;
        let conv_in = l.conv("decoder.conv_in", c0, z, 3)?;
        let mid_resnets = [
            l.resnet("decoder.mid_block.resnets.0", c0, c0)?,
            l.resnet("decoder.mid_block.resnets.1", c0, c0)?,
        ];
        let mid_attention = if cfg.mid_attention {
            Some(l.attention("decoder.mid_block.attentions.0", c0)?)
        } else {
            None
        };
        let mut up_blocks = Vec::with_capacity(blocks);
        let mut width = c0;
        for (i, &out) in cfg.block_channels.iter().enumerate() {
            let mut resnets = Vec::with_capacity(resnets_per_block);
            for j in 0..resnets_per_block {
                let cin = if j == 0 { width } else { out };
                resnets.push(l.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), cin, out)?);
            }
            let upsampler = if i + 1 < blocks {
                Some(l.conv(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    out,
                    out,
                    3,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            width = out;
        }
        let norm_out = l.norm("decoder.conv_norm_out", width)?;
        let conv_out = l.conv("decoder.conv_out", cfg.out_channels, width, 3)?;

        // Every decoder key must have been read: one left over is a layout this code does not
        // run (another architecture), not something to skip silently.
        let unused: Vec<String> = names
            .iter()
            .copied()
            .filter(|n| n.starts_with("decoder.") || n.starts_with("post_quant_conv."))
            .filter(|n| !l.taken.contains(*n))
            .map(|n| l.label(n))
            .collect();
        ensure!(
            unused.is_empty(),
            "unexpected decoder keys ({}): {}",
            unused.len(),
            unused[..unused.len().min(20)].join(", ")
        );
        Ok(VaeDecoder {
            cfg,
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attention,
            up_blocks,
            norm_out,
            conv_out,
            fingerprint: l.fingerprint,
            format,
            config_json: config.map(|c| c.path.clone()),
        })
    }

    /// Where the weights came from: the file's format ([`TensorReader::format`]: which part of
    /// a PyTorch checkpoint was taken), and the diffusers `config.json` its settings came from,
    /// if one did.
    pub fn source(&self) -> String {
        match &self.config_json {
            Some(path) => format!("{}; settings from {}", self.format, path.display()),
            None => self.format.to_string(),
        }
    }

    /// Whether [`VaeDecoder::source`] holds a choice the weights file alone does not state (a
    /// part of a PyTorch checkpoint, a `config.json`), which a command says.
    pub fn source_is_chosen(&self) -> bool {
        self.format.choice.is_some() || self.config_json.is_some()
    }

    /// A 64-bit hash of every weight's bits (FNV-1a, in the order the loader reads them): equal
    /// for the same decoder in either key layout, different for any other but by chance.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The architecture read from the file.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The shape of the images of latents of shape `[n, c, h, w]`, or an error naming what
    /// does not fit the decoder.
    pub fn image_shape(&self, latents: [usize; 4]) -> Result<[usize; 4]> {
        let [n, c, h, w] = latents;
        ensure!(
            c == self.cfg.latent_channels,
            "latents of shape {latents:?} have {c} channels; this VAE decodes {}",
            self.cfg.latent_channels
        );
        ensure!(
            n > 0 && h > 0 && w > 0,
            "latents of shape {latents:?} have an empty dimension"
        );
        let s = self.cfg.upscale();
        let shape = [n, self.cfg.out_channels, h * s, w * s];
        // The widest activation (the first up block's width at the last block's size) and
        // the attention's [h w, h w] scores must have a size.
        let widest = self.cfg.block_channels.iter().max().copied().unwrap_or(1);
        ensure!(
            checked_product(&[h, s, w, s, widest, 9]).is_some()
                && checked_product(&[h, w, h, w]).is_some()
                && checked_product(&shape).is_some(),
            "latents of shape {latents:?} are too large to decode"
        );
        Ok(shape)
    }

    /// [`VaeDecoder::image_shape`], and an error unless `latents` holds `shape`'s values.
    pub fn check_latents(&self, latents: &[f32], shape: [usize; 4]) -> Result<[usize; 4]> {
        let out_shape = self.image_shape(shape)?;
        let values = shape.iter().product::<usize>();
        ensure!(
            latents.len() == values,
            "latents of shape {shape:?} need {values} values, got {}",
            latents.len()
        );
        Ok(out_shape)
    }

    /// Values of the largest activation of one image decoded from `h x w` latents: up block i
    /// runs at 2^i times the latent side with its width (its first resnet's input has the
    /// block before's), and its upsampler's output is its width at twice that side.
    fn largest_activation(&self, h: usize, w: usize) -> Option<usize> {
        let widths = &self.cfg.block_channels;
        let (mut most, mut pixels) = (0usize, h.checked_mul(w)?);
        for (i, &c) in widths.iter().enumerate() {
            let before = widths[i.saturating_sub(1)];
            most = most.max(c.max(before).checked_mul(pixels)?);
            if i + 1 < widths.len() {
                pixels = pixels.checked_mul(4)?;
                most = most.max(c.checked_mul(pixels)?);
            }
        }
        Some(most)
    }

    /// Decodes latents `[n, c, h, w]` (as a latent DiT samples them: scaled by the scaling
    /// factor) into images `[n, out_channels, h * upscale, w * upscale]`, values about
    /// [-1, 1], one image at a time.
    pub fn decode(&self, latents: &[f32], shape: [usize; 4]) -> Result<(Vec<f32>, [usize; 4])> {
        let out_shape = self.check_latents(latents, shape)?;
        let [_, c, h, w] = shape;
        let per_image = out_shape[1] * out_shape[2] * out_shape[3];
        // At the least the images, one image's attention scores [h w, h w] and a few (a
        // resnet's input, normed input, conv output and sum) of its largest activation,
        // refused before the work rather than part way through it.
        let bytes = self.largest_activation(h, w).and_then(|largest| {
            crate::weights::f32_bytes([&out_shape[..], &[h, w, h, w], &[4, largest]])
        });
        crate::weights::ensure_free_memory(
            &format!("decoding latents of shape {shape:?} on the CPU"),
            bytes.unwrap_or(u64::MAX),
        )?;
        let mut images = zeros("decoded images", &out_shape)?;
        for (z, out) in latents
            .chunks_exact(c * h * w)
            .zip(images.chunks_exact_mut(per_image))
        {
            let image = self.decode_one(z, h, w)?;
            out.copy_from_slice(&image);
        }
        Ok((images, out_shape))
    }

    /// The decoder's first step on one latent `[c, h, w]`: the division by the scaling factor
    /// (a division, as the official code, not a product with the reciprocal) and
    /// `post_quant_conv`, `[c, h, w]` (the GPU decoder runs it here too: 16 values a pixel).
    pub(crate) fn post_quant(&self, z: &[f32], h: usize, w: usize) -> Result<Vec<f32>> {
        let z: Vec<f32> = z.iter().map(|v| v / self.cfg.scaling_factor).collect();
        conv2d(&self.post_quant_conv, &z, h, w)
    }

    /// One latent `[c, h, w]` to one image.
    fn decode_one(&self, z: &[f32], h: usize, w: usize) -> Result<Vec<f32>> {
        let g = self.cfg.groups;
        let x = self.post_quant(z, h, w)?;
        let mut x = conv2d(&self.conv_in, &x, h, w)?;
        x = resnet(&self.mid_resnets[0], &x, h, w, g)?;
        if let Some(attn) = &self.mid_attention {
            self_attention(attn, &mut x, self.cfg.block_channels[0], h * w, g)?;
        }
        x = resnet(&self.mid_resnets[1], &x, h, w, g)?;
        let (mut h, mut w) = (h, w);
        let mut width = self.cfg.block_channels[0];
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = resnet(r, &x, h, w, g)?;
                width = r.conv2.cout;
            }
            if let Some(conv) = &block.upsampler {
                x = upsample_nearest2(&x, width, h, w)?;
                (h, w) = (2 * h, 2 * w);
                x = conv2d(conv, &x, h, w)?;
            }
        }
        group_norm(&mut x, &self.norm_out, width, h * w, g);
        silu_inplace(&mut x);
        conv2d(&self.conv_out, &x, h, w)
    }
}

fn silu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14)
        .for_each(|c| c.iter_mut().for_each(|v| *v = silu(*v)));
}

/// GroupNorm over `x` `[c, pixels]` in place: each group of `c / groups` channels normalised
/// by its mean and (biased) variance, accumulated in f64, then scaled and shifted per channel.
fn group_norm(x: &mut [f32], norm: &Norm, c: usize, pixels: usize, groups: usize) {
    let per_group = c / groups * pixels;
    x.par_chunks_exact_mut(per_group)
        .enumerate()
        .for_each(|(gi, xs)| {
            let len = xs.len() as f64;
            let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / len;
            let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len;
            let inv = 1.0 / (var + GROUP_NORM_EPS).sqrt();
            for (j, row) in xs.chunks_exact_mut(pixels).enumerate() {
                let ch = gi * (c / groups) + j;
                let (scale, shift) = (norm.weight[ch] as f64, norm.bias[ch] as f64);
                for v in row {
                    *v = ((*v as f64 - mean) * inv * scale + shift) as f32;
                }
            }
        });
}

/// Pixels a 3x3 convolution unfolds at a time: bounds its scratch to about 16 MB.
const UNFOLD_VALUES: usize = 1 << 22;

/// Convolution of `x` `[cin, h, w]` (zero padding `k / 2`, stride 1) into `[cout, h, w]`: the
/// input unfolded (im2col) a band of pixels at a time, times the weight as `[cout, cin k k]`,
/// through `gemm`.
fn conv2d(conv: &Conv, x: &[f32], h: usize, w: usize) -> Result<Vec<f32>> {
    let (cin, cout, k) = (conv.cin, conv.cout, conv.k);
    let pixels = h * w;
    assert_eq!(x.len(), cin * pixels, "conv2d: input size");
    let mut out = zeros("VAE activation", &[cout, h, w])?;
    for (row, b) in out.chunks_exact_mut(pixels).zip(&conv.bias) {
        row.fill(*b);
    }
    let depth = cin * k * k;
    if k == 1 {
        // SAFETY: out [cout, pixels], weight [cout, cin], x [cin, pixels], all row-major.
        unsafe { gemm_into(out.as_mut_ptr(), pixels, &conv.weight, x, cout, pixels, cin) };
        return Ok(out);
    }
    let pad = (k / 2) as isize;
    let band = (UNFOLD_VALUES / depth).max(1).min(pixels);
    let mut cols = zeros("VAE im2col scratch", &[depth, band])?;
    for p0 in (0..pixels).step_by(band) {
        let len = band.min(pixels - p0);
        // Row (ci, ky, kx) of the unfolded input: x[ci, y + ky - pad, x + kx - pad] at each
        // pixel (y, x) of the band, 0 outside the image.
        cols[..depth * len]
            .par_chunks_exact_mut(len)
            .enumerate()
            .for_each(|(r, col)| {
                let (ci, ky, kx) = (r / (k * k), (r / k) % k, r % k);
                let plane = &x[ci * pixels..(ci + 1) * pixels];
                for (i, v) in col.iter_mut().enumerate() {
                    let p = p0 + i;
                    let sy = (p / w) as isize + ky as isize - pad;
                    let sx = (p % w) as isize + kx as isize - pad;
                    *v = if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                        plane[sy as usize * w + sx as usize]
                    } else {
                        0.0
                    };
                }
            });
        // SAFETY: the destination is columns p0..p0+len of out [cout, pixels] (row stride
        // pixels); weight [cout, depth]; cols [depth, len].
        unsafe {
            gemm_into(
                out.as_mut_ptr().add(p0),
                pixels,
                &conv.weight,
                &cols[..depth * len],
                cout,
                len,
                depth,
            )
        };
    }
    Ok(out)
}

/// `dst[m, n] += a[m, k] b[k, n]` with `a` and `b` row-major and `dst` of row stride
/// `dst_stride`.
///
/// SAFETY: `dst` points at `m` rows of `dst_stride >= n` writable values.
unsafe fn gemm_into(
    dst: *mut f32,
    dst_stride: usize,
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(a.len() == m * k && b.len() == k * n && dst_stride >= n);
    // SAFETY: the strides describe the slices checked above and the caller's destination.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        )
    }
}

/// diffusers' `ResnetBlock2D` on `x` `[cin, h, w]`.
fn resnet(r: &Resnet, x: &[f32], h: usize, w: usize, groups: usize) -> Result<Vec<f32>> {
    let pixels = h * w;
    let mut t = x.to_vec();
    group_norm(&mut t, &r.norm1, r.conv1.cin, pixels, groups);
    silu_inplace(&mut t);
    let mut t = conv2d(&r.conv1, &t, h, w)?;
    group_norm(&mut t, &r.norm2, r.conv1.cout, pixels, groups);
    silu_inplace(&mut t);
    let mut t = conv2d(&r.conv2, &t, h, w)?;
    let shortcut;
    let input = match &r.shortcut {
        Some(conv) => {
            shortcut = conv2d(conv, x, h, w)?;
            &shortcut
        }
        None => x,
    };
    t.iter_mut().zip(input).for_each(|(v, s)| *v += s);
    Ok(t)
}

/// The mid block's attention on `x` `[c, pixels]` in place: GroupNorm, q k v over the pixels
/// as tokens (one head of width c, scale 1 / sqrt(c)), the output projection, plus `x`.
fn self_attention(
    a: &Attention,
    x: &mut [f32],
    c: usize,
    pixels: usize,
    groups: usize,
) -> Result<()> {
    let mut normed = x.to_vec();
    group_norm(&mut normed, &a.norm, c, pixels, groups);
    // [c, pixels] -> tokens [pixels, c].
    let mut tokens = zeros("VAE attention tokens", &[pixels, c])?;
    for (ch, plane) in normed.chunks_exact(pixels).enumerate() {
        for (p, v) in plane.iter().enumerate() {
            tokens[p * c + ch] = *v;
        }
    }
    let mut qkv = zeros("VAE attention qkv", &[pixels, 3 * c])?;
    linear(
        &mut qkv,
        &tokens,
        &a.qkv_weight,
        &a.qkv_bias,
        pixels,
        3 * c,
        c,
    );
    let mut scores = zeros("VAE attention scores", &[pixels, pixels])?;
    let mut mixed = zeros("VAE attention output", &[pixels, c])?;
    attention(&mut mixed, &qkv, &mut scores, 1, pixels, 1, c);
    linear(
        &mut tokens,
        &mixed,
        &a.out_weight,
        &a.out_bias,
        pixels,
        c,
        c,
    );
    for (ch, plane) in x.chunks_exact_mut(pixels).enumerate() {
        for (p, v) in plane.iter_mut().enumerate() {
            *v += tokens[p * c + ch];
        }
    }
    Ok(())
}

/// Nearest-neighbour 2x upsampling of `x` `[c, h, w]`.
fn upsample_nearest2(x: &[f32], c: usize, h: usize, w: usize) -> Result<Vec<f32>> {
    let mut out = zeros("VAE activation", &[c, 2 * h, 2 * w])?;
    out.par_chunks_exact_mut(4 * h * w)
        .zip(x.par_chunks_exact(h * w))
        .for_each(|(o, plane)| {
            for (oy, orow) in o.chunks_exact_mut(2 * w).enumerate() {
                let row = &plane[(oy / 2) * w..(oy / 2 + 1) * w];
                for (ox, v) in orow.iter_mut().enumerate() {
                    *v = row[ox / 2];
                }
            }
        });
    Ok(out)
}
