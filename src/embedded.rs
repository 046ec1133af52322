//! The default model compiled into the binary: a small class-conditional DiT trained by the
//! project (`tools/train_tiny.py`) on scikit-learn's handwritten digits, 32x32 pixels, 3 (equal)
//! channels, 10 classes, patch 2 (256 tokens), learn_sigma, official key layout. It lets
//! `fora sample` draw a real picture on any machine without a downloaded checkpoint.
//!
//! The file is `models/tiny.safetensors`; its safetensors metadata records the architecture
//! (`fora.*`, read by [`DitWeights::from_bytes`]) and how it was trained (`fora.train.*`).
//! The weights come from `python3 tools/train_tiny.py --device cpu --threads 2` (its defaults:
//! DiT depth 4, hidden 64, one head of 64, 10000 steps of 64 images, Min-SNR-weighted hybrid
//! loss, EMA 0.999; 55 minutes on 2 CPU cores). `tools/quality.py` measures them through this
//! binary: the project's digit classifier recognises the requested class in 95.3% of 300
//! uncached samples (250 DDPM steps, guidance 4; the README has the table and a picture).

use crate::config::DitConfig;
use crate::weights::DitWeights;
use anyhow::{Context, Result};
use safetensors::SafeTensors;
use std::collections::HashMap;

/// The safetensors bytes of the embedded model.
pub const DEFAULT_MODEL_BYTES: &[u8] = include_bytes!("../models/tiny.safetensors");

/// What the embedded model is, for messages and `fora info`.
pub const DEFAULT_MODEL_DESCRIPTION: &str =
    "embedded tiny digits DiT (models/tiny.safetensors: 32x32 px, 10 classes, trained by tools/train_tiny.py)";

/// Sampling settings the embedded model is measured with (tools/quality.py defaults): the
/// official DiT sampling recipe, 250 DDPM steps with classifier-free guidance at scale 4.
pub const DEFAULT_STEPS: usize = 250;
/// See [`DEFAULT_STEPS`].
pub const DEFAULT_CFG_SCALE: f32 = 4.0;

/// The embedded model's config and weights, validated like any checkpoint.
pub fn default_model() -> Result<(DitConfig, DitWeights)> {
    DitWeights::from_bytes(DEFAULT_MODEL_BYTES, None)
        .context("the embedded default model (models/tiny.safetensors)")
}

/// The embedded model's safetensors metadata (`fora.*` config and `fora.train.*` provenance).
pub fn default_model_metadata() -> Result<HashMap<String, String>> {
    let (_, header) = SafeTensors::read_metadata(DEFAULT_MODEL_BYTES).map_err(|e| {
        anyhow::anyhow!("the embedded default model is not a valid safetensors file: {e}")
    })?;
    Ok(header.metadata().clone().unwrap_or_default())
}
