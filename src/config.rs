//! The DiT family: depth, width, heads and patch size of every official model, plus custom
//! configurations for tests. Heads cannot be inferred from checkpoint shapes, so they come from
//! an architecture name (`DiT-XL/2`), a key list (`depth=2,hidden=64,heads=4,patch=2`) or the
//! checkpoint's safetensors metadata.

use crate::weights::FREQ_DIM;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;

/// One DiT architecture at one resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DitConfig {
    /// Number of transformer blocks.
    pub depth: usize,
    /// Hidden size D.
    pub hidden: usize,
    /// Attention heads; `hidden % heads == 0`.
    pub heads: usize,
    /// Patch size p.
    pub patch: usize,
    /// Input channels C (4 for SD-VAE latents).
    pub in_channels: usize,
    /// Spatial size of the (latent) input, H = W.
    pub input_size: usize,
    /// Number of classes; the label table has `num_classes + 1` rows (the last is the null class).
    pub num_classes: usize,
    /// When true the model predicts eps and a variance interpolation (out channels = 2C).
    pub learn_sigma: bool,
    /// MLP hidden size = `mlp_ratio * hidden` (4 in every official model).
    pub mlp_ratio: usize,
}

/// Depth, hidden, heads of the official model sizes.
const SIZES: [(&str, usize, usize, usize); 4] = [
    ("S", 12, 384, 6),
    ("B", 12, 768, 12),
    ("L", 24, 1024, 16),
    ("XL", 28, 1152, 16),
];

/// The largest sizes [`DitConfig::validate`] accepts: far past every DiT (XL/2 at 512 px has
/// depth 28, hidden 1152, 1024 tokens), and small enough that the sizes derived from them fit
/// a `usize` with room for a batch (tokens x hidden x mlp_ratio < 2^42).
pub struct SizeLimits {
    /// Transformer blocks.
    pub depth: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Input side (latent pixels).
    pub input_size: usize,
    /// Classes.
    pub num_classes: usize,
    /// MLP width over hidden.
    pub mlp_ratio: usize,
    /// Tokens (patches of the input).
    pub tokens: usize,
}

/// See [`SizeLimits`].
pub const SIZE_LIMITS: SizeLimits = SizeLimits {
    depth: 4096,
    hidden: 1 << 16,
    in_channels: 4096,
    input_size: 1 << 16,
    num_classes: 1 << 24,
    mlp_ratio: 64,
    tokens: 1 << 20,
};

/// The architecture part of a config (what `--arch` names): everything but the data shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arch {
    /// Transformer blocks.
    pub depth: usize,
    /// Hidden size D.
    pub hidden: usize,
    /// Attention heads (D / heads is the head dimension).
    pub heads: usize,
    /// Patch side p (p x p latent pixels a token).
    pub patch: usize,
}

impl Arch {
    /// Parses `DiT-XL/2` (official names, S/B/L/XL x 2/4/8) or `depth=2,hidden=64,heads=4,patch=2`.
    pub fn parse(name: &str) -> Result<Arch> {
        let name = name.trim();
        if let Some(rest) = name.strip_prefix("DiT-") {
            let (size, patch) = rest.split_once('/').with_context(|| {
                format!("architecture {name:?}: expected DiT-<S|B|L|XL>/<2|4|8>")
            })?;
            let patch: usize = patch.parse().with_context(|| {
                format!("architecture {name:?}: patch {patch:?} is not a number")
            })?;
            ensure!(
                [2, 4, 8].contains(&patch),
                "architecture {name:?}: official patch sizes are 2, 4 and 8"
            );
            let &(_, depth, hidden, heads) =
                SIZES.iter().find(|s| s.0 == size).with_context(|| {
                    format!("architecture {name:?}: unknown size {size:?} (S, B, L, XL)")
                })?;
            return Ok(Arch {
                depth,
                hidden,
                heads,
                patch,
            });
        }
        let mut kv = HashMap::new();
        for part in name.split(',') {
            let (k, v) = part.split_once('=').with_context(|| {
                format!("architecture {name:?}: expected DiT-XL/2 style name or depth=..,hidden=..,heads=..,patch=..")
            })?;
            let k = k.trim();
            ensure!(
                ["depth", "hidden", "heads", "patch"].contains(&k),
                "architecture {name:?}: unknown key {k:?} (depth, hidden, heads, patch)"
            );
            let v: usize = v
                .trim()
                .parse()
                .with_context(|| format!("architecture {name:?}: {k}={v:?} is not a number"))?;
            ensure!(
                kv.insert(k.to_string(), v).is_none(),
                "architecture {name:?}: {k} is given twice"
            );
        }
        let get = |k: &str| {
            kv.get(k)
                .copied()
                .with_context(|| format!("architecture {name:?}: missing {k}=.."))
        };
        let arch = Arch {
            depth: get("depth")?,
            hidden: get("hidden")?,
            heads: get("heads")?,
            patch: get("patch")?,
        };
        ensure!(
            arch.depth > 0 && arch.hidden > 0 && arch.heads > 0 && arch.patch > 0,
            "architecture {name:?}: every field must be positive"
        );
        ensure!(
            arch.hidden.is_multiple_of(arch.heads),
            "architecture {name:?}: hidden {} is not divisible by heads {}",
            arch.hidden,
            arch.heads
        );
        Ok(arch)
    }

    /// The official name (`DiT-XL/2`) of the official architecture of this depth, hidden size
    /// and patch, if there is one: what the tensor shapes of a checkpoint without metadata
    /// (the official release's `.pt`) say, less the heads.
    pub fn official_name_for(depth: usize, hidden: usize, patch: usize) -> Option<String> {
        SIZES.iter().find_map(|&(s, d, h, _)| {
            (d == depth && h == hidden && [2, 4, 8].contains(&patch))
                .then(|| format!("DiT-{s}/{patch}"))
        })
    }

    /// The official name (`DiT-XL/2`) when this is an official architecture.
    pub fn official_name(&self) -> Option<String> {
        SIZES.iter().find_map(|&(s, d, h, n)| {
            (d == self.depth
                && h == self.hidden
                && n == self.heads
                && [2, 4, 8].contains(&self.patch))
            .then(|| format!("DiT-{s}/{}", self.patch))
        })
    }
}

impl DitConfig {
    /// An official architecture at the official data shape: 4 latent channels, 1000 classes,
    /// learn_sigma, `input_size` 32 (256 px) or 64 (512 px).
    pub fn official(name: &str, input_size: usize) -> Result<DitConfig> {
        let arch = Arch::parse(name)?;
        DitConfig::from_arch(&arch, 4, input_size, 1000, true)
    }

    /// Builds and validates a config from an architecture and a data shape.
    pub fn from_arch(
        arch: &Arch,
        in_channels: usize,
        input_size: usize,
        num_classes: usize,
        learn_sigma: bool,
    ) -> Result<DitConfig> {
        let c = DitConfig {
            depth: arch.depth,
            hidden: arch.hidden,
            heads: arch.heads,
            patch: arch.patch,
            in_channels,
            input_size,
            num_classes,
            learn_sigma,
            mlp_ratio: 4,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks that the sizes are positive and consistent (heads divide hidden, the patch
    /// divides the input size) and within [`SIZE_LIMITS`], so that every size derived from
    /// them (tokens, image and output lengths, parameters, a batch's activations) is computed
    /// without overflow.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.depth > 0 && self.hidden > 0 && self.heads > 0,
            "config: depth, hidden and heads must be positive"
        );
        ensure!(
            self.hidden.is_multiple_of(self.heads),
            "config: hidden {} not divisible by heads {}",
            self.hidden,
            self.heads
        );
        ensure!(
            self.patch > 0 && self.in_channels > 0,
            "config: patch and in_channels must be positive"
        );
        ensure!(self.num_classes > 0, "config: num_classes must be positive");
        ensure!(self.mlp_ratio > 0, "config: mlp_ratio must be positive");
        if self.input_size == 0 || !self.input_size.is_multiple_of(self.patch) {
            bail!(
                "config: input size {} is not a positive multiple of the patch {}",
                self.input_size,
                self.patch
            );
        }
        for (what, value, limit) in [
            ("depth", self.depth, SIZE_LIMITS.depth),
            ("hidden", self.hidden, SIZE_LIMITS.hidden),
            ("in_channels", self.in_channels, SIZE_LIMITS.in_channels),
            ("input size", self.input_size, SIZE_LIMITS.input_size),
            ("num_classes", self.num_classes, SIZE_LIMITS.num_classes),
            ("mlp_ratio", self.mlp_ratio, SIZE_LIMITS.mlp_ratio),
            ("tokens", self.tokens(), SIZE_LIMITS.tokens),
        ] {
            ensure!(
                value <= limit,
                "config: {what} {value} is past the supported {limit} ({})",
                self.arch_name()
            );
        }
        Ok(())
    }

    /// The architecture part (depth, hidden, heads, patch).
    pub fn arch(&self) -> Arch {
        Arch {
            depth: self.depth,
            hidden: self.hidden,
            heads: self.heads,
            patch: self.patch,
        }
    }

    /// Official name when official (`DiT-XL/2`), else the key list.
    pub fn arch_name(&self) -> String {
        self.arch().official_name().unwrap_or_else(|| {
            format!(
                "depth={},hidden={},heads={},patch={}",
                self.depth, self.hidden, self.heads, self.patch
            )
        })
    }

    /// Dimension of one attention head, hidden / heads.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    /// Output channels: 2C with learn_sigma (eps and the variance interpolation), else C.
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }
    /// Patches per side.
    pub fn grid(&self) -> usize {
        // 0 for a patch of 0 (which `validate` refuses) rather than a division by zero.
        self.input_size.checked_div(self.patch).unwrap_or(0)
    }
    /// Tokens T = grid^2 (saturating: a config past [`SIZE_LIMITS`] fails `validate` with it).
    pub fn tokens(&self) -> usize {
        self.grid().saturating_mul(self.grid())
    }
    /// The MLP's inner width, mlp_ratio * hidden.
    pub fn mlp_hidden(&self) -> usize {
        self.mlp_ratio * self.hidden
    }
    /// Elements of one input image, C*H*W.
    pub fn image_len(&self) -> usize {
        self.in_channels * self.input_size * self.input_size
    }
    /// Elements of one model output, out_ch*H*W.
    pub fn out_len(&self) -> usize {
        self.out_channels() * self.input_size * self.input_size
    }
    /// Width of the final linear: p*p*out_ch.
    pub fn patch_out(&self) -> usize {
        self.patch * self.patch * self.out_channels()
    }
    /// The null (unconditional) class id.
    pub fn null_class(&self) -> usize {
        self.num_classes
    }
    /// Multiply-accumulates of one forward of one row (the figure behind TFLOP/s: 2 x MACs):
    /// everything the official forward computes for a row, as the DiT paper counts it (118.6
    /// GMAC for DiT-XL/2): the patch embedding, the timestep MLP, every block's adaLN Linear,
    /// attention and MLP, and the final layer. fora computes the conditioning (the timestep MLP
    /// and the adaLN Linears, 0.2% of the total) once per run, not per step; effective TFLOP/s
    /// counts it anyway, as the figure it is measured against does.
    pub fn macs_per_row(&self) -> u64 {
        let (t, d, m) = (
            self.tokens() as u64,
            self.hidden as u64,
            self.mlp_hidden() as u64,
        );
        let per_block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * m + d * 6 * d;
        let embed = t * (self.in_channels * self.patch * self.patch) as u64 * d;
        let timestep = FREQ_DIM as u64 * d + d * d;
        let fin = d * 2 * d + t * d * self.patch_out() as u64;
        self.depth as u64 * per_block + embed + timestep + fin
    }

    /// safetensors metadata that records this config (written with every checkpoint we save).
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("fora.arch".into(), self.arch_name());
        for (k, v) in [
            ("depth", self.depth),
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("patch", self.patch),
            ("in_channels", self.in_channels),
            ("input_size", self.input_size),
            ("num_classes", self.num_classes),
            ("mlp_ratio", self.mlp_ratio),
        ] {
            m.insert(format!("fora.{k}"), v.to_string());
        }
        m.insert("fora.learn_sigma".into(), self.learn_sigma.to_string());
        m
    }

    /// The heads recorded in checkpoint metadata, if any (`fora.heads`).
    pub fn heads_from_metadata(meta: &HashMap<String, String>) -> Result<Option<usize>> {
        match meta.get("fora.heads") {
            None => Ok(None),
            Some(v) => Ok(Some(v.parse().with_context(|| {
                format!("checkpoint metadata fora.heads={v:?} is not a number")
            })?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_names() {
        let xl = DitConfig::official("DiT-XL/2", 32).unwrap();
        assert_eq!(
            (xl.depth, xl.hidden, xl.heads, xl.head_dim()),
            (28, 1152, 16, 72)
        );
        assert_eq!(xl.tokens(), 256);
        assert_eq!(xl.out_channels(), 8);
        // 118.6 GMAC per image row, as the DiT paper's 118.6 GFLOPs (it counts MACs).
        let g = xl.macs_per_row() as f64 / 1e9;
        assert!((g - 118.6).abs() < 0.05, "DiT-XL/2 GMAC {g}");
        assert_eq!(Arch::parse("DiT-S/8").unwrap().heads, 6);
        assert_eq!(xl.arch_name(), "DiT-XL/2");
        // Named from the shapes alone, as a checkpoint without metadata gives them.
        assert_eq!(
            Arch::official_name_for(28, 1152, 2).as_deref(),
            Some("DiT-XL/2")
        );
        assert_eq!(
            Arch::official_name_for(12, 384, 8).as_deref(),
            Some("DiT-S/8")
        );
        assert_eq!(Arch::official_name_for(28, 1152, 3), None);
        assert_eq!(Arch::official_name_for(27, 1152, 2), None);
    }

    #[test]
    fn bad_arch_names() {
        for bad in [
            "DiT-M/2",
            "DiT-XL/3",
            "DiT-XL",
            "depth=2,hidden=10,heads=4,patch=2",
            "foo",
        ] {
            assert!(Arch::parse(bad).is_err(), "{bad} should fail");
        }
        // Unknown and repeated keys are refused, by name.
        for (bad, says) in [
            (
                "depth=2,hidden=64,heads=4,patch=2,foo=3",
                "unknown key \"foo\"",
            ),
            (
                "depth=2,hidden=64,heads=4,patch=2,depth=3",
                "depth is given twice",
            ),
        ] {
            let err = format!("{:#}", Arch::parse(bad).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
        let a = Arch::parse("depth=2,hidden=64,heads=4,patch=2").unwrap();
        assert!(
            DitConfig::from_arch(&a, 4, 9, 10, true).is_err(),
            "9 not divisible by 2"
        );
    }

    /// Sizes whose products would overflow, or that no machine holds, are refused by name.
    #[test]
    fn sizes_past_the_limits_are_refused() {
        let a = Arch::parse("depth=1,hidden=8,heads=1,patch=1").unwrap();
        for (input_size, says) in [(1usize << 32, "input size"), (2048, "tokens")] {
            let err = format!(
                "{:#}",
                DitConfig::from_arch(&a, 4, input_size, 10, true).unwrap_err()
            );
            assert!(
                err.contains(says) && err.contains("past the supported"),
                "{err}"
            );
        }
        // 1024 x 1024 tokens is the limit.
        assert!(DitConfig::from_arch(&a, 4, 1024, 10, true).is_ok());
        let deep = Arch::parse("depth=1000000000000,hidden=8,heads=1,patch=1").unwrap();
        let err = format!(
            "{:#}",
            DitConfig::from_arch(&deep, 4, 8, 10, true).unwrap_err()
        );
        assert!(err.contains("depth 1000000000000"), "{err}");
        let wide = Arch::parse("depth=1,hidden=1048576,heads=1,patch=1").unwrap();
        assert!(DitConfig::from_arch(&wide, 4, 8, 10, true).is_err());
        assert!(DitConfig::from_arch(&a, 4, 8, 1 << 30, true).is_err());
        // A hand-built config with a patch of 0: no division by zero, an error.
        let zero = DitConfig {
            patch: 0,
            ..DitConfig::from_arch(&a, 4, 8, 10, true).unwrap()
        };
        assert_eq!(zero.tokens(), 0);
        assert!(zero.validate().is_err());
    }
}
