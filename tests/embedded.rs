//! The embedded default model (models/tiny.safetensors) and the PNG writer.

use fora::backend::Backend;
use fora::cpu::CpuBackend;
use fora::embedded::{default_model, default_model_metadata, DEFAULT_MODEL_BYTES};
use fora::png_out::{default_columns, grid_picture, to_u8, write_png_grid, GAP_VALUE, GRID_GAP};
use std::path::PathBuf;

/// Deterministic values in [-1.25, 1.25) (beyond [-1, 1] on purpose, to exercise clamping).
fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.5 - 1.25) as f32
        })
        .collect()
}

/// A fresh, empty directory for one test.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fora-embedded-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Decodes a PNG file: (width, height, color type, pixels).
fn decode(path: &std::path::Path) -> (u32, u32, png::ColorType, Vec<u8>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type, buf)
}

#[test]
fn embedded_model_loads_with_the_promised_shape() {
    assert!(
        DEFAULT_MODEL_BYTES.len() <= 10 * 1024 * 1024,
        "embedded model is {} bytes, over 10 MB",
        DEFAULT_MODEL_BYTES.len()
    );
    let (cfg, weights) = default_model().expect("embedded model loads");
    assert!(cfg.num_classes >= 10, "{} classes", cfg.num_classes);
    assert_eq!(cfg.tokens(), 256, "{cfg:?}");
    assert!(cfg.learn_sigma);
    assert_eq!(cfg.out_channels(), 2 * cfg.in_channels);
    assert!(
        cfg.in_channels == 1 || cfg.in_channels == 3,
        "a pixel-space model"
    );
    weights.check(&cfg).unwrap();
    // adaLN-zero initialisation zeroes the final linear: nonzero values mean it was trained.
    let trained = weights.final_w.iter().filter(|v| **v != 0.0).count();
    assert!(
        trained > weights.final_w.len() / 2,
        "final_layer.linear.weight is mostly zero: untrained weights?"
    );
    let meta = default_model_metadata().unwrap();
    assert_eq!(
        meta.get("fora.trained_by").map(String::as_str),
        Some("tools/train_tiny.py")
    );
    let steps: usize = meta["fora.train.steps"].parse().unwrap();
    assert!(steps > 0);
}

#[test]
fn embedded_model_runs_a_forward() {
    let (cfg, weights) = default_model().unwrap();
    let backend = CpuBackend::new(cfg.clone(), weights).unwrap();
    let x = random_values(2 * cfg.image_len(), 7);
    let out = backend
        .forward(&x, &[999, 10], &[3, cfg.null_class()], None)
        .unwrap();
    assert_eq!(out.len(), 2 * cfg.out_len());
    assert!(out.iter().all(|v| v.is_finite()));
    // A trained eps-predictor at t = 999 returns roughly its input noise.
    let c = cfg.image_len();
    let (eps, noise) = (&out[..c], &x[..c]);
    let dot: f64 = eps.iter().zip(noise).map(|(a, b)| (a * b) as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|a| (a * a) as f64).sum::<f64>().sqrt();
    let cosine = dot / (norm(eps) * norm(noise));
    assert!(
        cosine > 0.5,
        "eps prediction at t=999 has cosine {cosine} with the input"
    );
}

#[test]
fn png_single_rgb_image_round_trips() {
    let dir = scratch_dir("rgb");
    let (c, h, w) = (3, 5, 7);
    let v = random_values(c * h * w, 1);
    let path = dir.join("one.png");
    write_png_grid(&path, &v, [1, c, h, w], 4).unwrap();
    let (pw, ph, color, px) = decode(&path);
    assert_eq!((pw, ph, color), (w as u32, h as u32, png::ColorType::Rgb));
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                assert_eq!(
                    px[(y * w + x) * 3 + ch],
                    to_u8(v[(ch * h + y) * w + x]),
                    "pixel ({y},{x}) channel {ch}"
                );
            }
        }
    }
    // Written atomically: nothing but the PNG is left in the directory.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("one.png")]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn png_gray_grid_layout() {
    let dir = scratch_dir("grid");
    let (b, h, w, cols) = (5, 4, 3, 3);
    let v = random_values(b * h * w, 2);
    let path = dir.join("grid.png");
    write_png_grid(&path, &v, [b, 1, h, w], cols).unwrap();
    let (pw, ph, color, px) = decode(&path);
    let (width, height) = (cols * w + (cols - 1) * GRID_GAP, 2 * h + GRID_GAP);
    assert_eq!(
        (pw, ph, color),
        (width as u32, height as u32, png::ColorType::Grayscale)
    );
    let pixel = |y: usize, x: usize| px[y * width + x];
    for n in 0..b {
        let (y0, x0) = ((n / cols) * (h + GRID_GAP), (n % cols) * (w + GRID_GAP));
        for y in 0..h {
            for x in 0..w {
                assert_eq!(
                    pixel(y0 + y, x0 + x),
                    to_u8(v[(n * h + y) * w + x]),
                    "image {n} ({y},{x})"
                );
            }
        }
    }
    // Gaps between tiles and the empty sixth cell hold the gap value.
    for y in 0..height {
        for g in 0..GRID_GAP {
            assert_eq!(pixel(y, w + g), GAP_VALUE);
        }
    }
    for x in 0..width {
        assert_eq!(pixel(h, x), GAP_VALUE);
    }
    for y in h + GRID_GAP..height {
        for x in 2 * (w + GRID_GAP)..width {
            assert_eq!(pixel(y, x), GAP_VALUE, "empty cell at ({y},{x})");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn png_grid_columns_clamp_to_the_batch() {
    let v = random_values(2 * 3 * 4 * 4, 3);
    let pic = grid_picture(&v, [2, 3, 4, 4], 10).unwrap();
    assert_eq!(
        (pic.width, pic.height, pic.channels),
        (4 + GRID_GAP + 4, 4, 3)
    );
    assert_eq!(default_columns(10), 10);
    assert_eq!(default_columns(100), 10);
}

#[test]
fn png_bad_inputs_are_clear_errors() {
    let dir = scratch_dir("bad");
    let path = dir.join("x.png");
    let v = random_values(2 * 4 * 4 * 4, 4);
    let err = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
    let e = err(write_png_grid(&path, &v, [2, 4, 4, 4], 2));
    assert!(e.contains("4 channels"), "{e}");
    let e = err(write_png_grid(&path, &v[..10], [2, 1, 4, 4], 2));
    assert!(e.contains("needs 32 values, got 10"), "{e}");
    let e = err(write_png_grid(&path, &[], [0, 1, 4, 4], 2));
    assert!(e.contains("empty dimension"), "{e}");
    let e = err(write_png_grid(&path, &v[..32], [2, 1, 4, 4], 0));
    assert!(e.contains("at least one column"), "{e}");
    let mut nan = v[..32].to_vec();
    nan[20] = f32::NAN;
    let e = err(write_png_grid(&path, &nan, [2, 1, 4, 4], 2));
    assert!(e.contains("sample 1") && e.contains("non-finite"), "{e}");
    let e = err(write_png_grid(
        dir.join("no/such/dir/x.png"),
        &v[..32],
        [2, 1, 4, 4],
        2,
    ));
    assert!(e.contains("does not exist"), "{e}");
    assert!(!path.exists(), "a failed write must leave no file");
    std::fs::remove_dir_all(&dir).unwrap();
}
