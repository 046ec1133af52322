//! PNG output of pixel-space samples: one image, or a grid of several (row-major, `columns`
//! tiles per row, [`GRID_GAP`] pixels of [`GAP_VALUE`] between tiles). Values in [-1, 1] map to
//! 0..255 (clamped, rounded); 1 channel is written as gray, 3 channels as RGB. Latent-space
//! samples (4 channels) are refused: [`crate::vae`] decodes them into pictures first.

use crate::io::write_atomic;
use anyhow::{ensure, Context, Result};
use std::path::Path;

/// Pixels between neighbouring tiles of a grid (and no border around it).
pub const GRID_GAP: usize = 2;
/// The 8-bit value of the gap pixels and of the empty cells of a last, partial row (mid gray,
/// so that tiles stay distinct whether their background is black or white).
pub const GAP_VALUE: u8 = 128;

/// An 8-bit picture: `height` rows of `width * channels` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picture {
    /// Pixels a row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// 1 (gray) or 3 (RGB).
    pub channels: usize,
    /// Row-major samples, `height * width * channels` bytes.
    pub pixels: Vec<u8>,
}

/// Maps a sample value in [-1, 1] to 0..255 (clamped, rounded to nearest).
pub fn to_u8(v: f32) -> u8 {
    ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}

/// Arranges `samples` [B, C, H, W] (f32, NCHW) as a grid of `columns` tiles per row (fewer when
/// B < columns) and converts to 8 bits.
pub fn grid_picture(samples: &[f32], shape: [usize; 4], columns: usize) -> Result<Picture> {
    let [b, c, h, w] = shape;
    ensure!(
        b > 0 && h > 0 && w > 0,
        "PNG output: shape {shape:?} [B, C, H, W] has an empty dimension"
    );
    ensure!(
        c == 1 || c == 3,
        "PNG output: {c} channels in shape {shape:?}; PNG needs 1 (gray) or 3 (RGB) pixel-space \
         channels (latent samples need a VAE decoder first: fora::vae)"
    );
    let len = b
        .checked_mul(c)
        .and_then(|v| v.checked_mul(h))
        .and_then(|v| v.checked_mul(w))
        .with_context(|| format!("PNG output: shape {shape:?} is too large"))?;
    ensure!(
        samples.len() == len,
        "PNG output: shape {shape:?} needs {len} values, got {}",
        samples.len()
    );
    ensure!(columns > 0, "PNG output: a grid needs at least one column");
    if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
        let per_image = c * h * w;
        anyhow::bail!(
            "PNG output: sample {} holds a non-finite value ({}) at flat index {i}",
            i / per_image,
            samples[i]
        );
    }
    let cols = columns.min(b);
    let rows = b.div_ceil(cols);
    let width = cols * w + (cols - 1) * GRID_GAP;
    let height = rows * h + (rows - 1) * GRID_GAP;
    ensure!(
        width <= u32::MAX as usize && height <= u32::MAX as usize,
        "PNG output: a {width}x{height} grid is larger than PNG allows"
    );
    let stride = width * c;
    let mut pixels = vec![GAP_VALUE; stride * height];
    for (n, image) in samples.chunks_exact(c * h * w).enumerate() {
        let (row0, col0) = ((n / cols) * (h + GRID_GAP), (n % cols) * (w + GRID_GAP));
        for y in 0..h {
            let line = &mut pixels[(row0 + y) * stride + col0 * c..][..w * c];
            for x in 0..w {
                for ch in 0..c {
                    line[x * c + ch] = to_u8(image[(ch * h + y) * w + x]);
                }
            }
        }
    }
    Ok(Picture {
        width,
        height,
        channels: c,
        pixels,
    })
}

/// PNG bytes of a picture (8-bit gray or RGB).
pub fn encode_png(picture: &Picture) -> Result<Vec<u8>> {
    let color = match picture.channels {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        c => anyhow::bail!("PNG output: {c} channels; PNG needs 1 (gray) or 3 (RGB)"),
    };
    ensure!(
        picture.pixels.len() == picture.width * picture.height * picture.channels,
        "PNG output: {} bytes do not make a {}x{}x{} picture",
        picture.pixels.len(),
        picture.width,
        picture.height,
        picture.channels
    );
    let mut bytes = Vec::new();
    {
        let mut encoder =
            png::Encoder::new(&mut bytes, picture.width as u32, picture.height as u32);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .context("PNG output: cannot write the header")?;
        writer
            .write_image_data(&picture.pixels)
            .context("PNG output: cannot encode the pixels")?;
        writer
            .finish()
            .context("PNG output: cannot finish the file")?;
    }
    Ok(bytes)
}

/// Writes `samples` [B, C, H, W] (values in [-1, 1], C = 1 or 3) to `path` as one PNG: a grid
/// of `columns` tiles per row when B > 1. The file is written whole or not at all (temporary
/// file beside it, then rename).
pub fn write_png_grid(
    path: impl AsRef<Path>,
    samples: &[f32],
    shape: [usize; 4],
    columns: usize,
) -> Result<()> {
    let path = path.as_ref();
    let picture = grid_picture(samples, shape, columns)?;
    let bytes = encode_png(&picture)?;
    write_atomic(path, &bytes).with_context(|| format!("writing PNG {}", path.display()))
}

/// A grid's default column count for `b` images: all in one row up to 10 (one per class of a
/// 10-class model), otherwise about square.
pub fn default_columns(b: usize) -> usize {
    if b <= 10 {
        b.max(1)
    } else {
        (b as f64).sqrt().ceil() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_mapping() {
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(0.0), 128);
        assert_eq!(to_u8(-7.0), 0);
        assert_eq!(to_u8(3.5), 255);
    }

    #[test]
    fn default_columns_shape() {
        assert_eq!(default_columns(1), 1);
        assert_eq!(default_columns(10), 10);
        assert_eq!(default_columns(16), 4);
        assert_eq!(default_columns(17), 5);
    }
}
