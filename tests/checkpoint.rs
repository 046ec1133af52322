//! Checkpoint loading: every validation error names the problem; save/load round trips.

use fora::config::{Arch, DitConfig};
use fora::weights::DitWeights;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

mod temp_dir;
use temp_dir::TempDir;

fn small() -> DitConfig {
    let arch = Arch::parse("depth=2,hidden=48,heads=3,patch=2").unwrap();
    DitConfig::from_arch(&arch, 4, 6, 10, true).unwrap()
}

/// A checkpoint as raw tensors that a test can break: key -> (dtype, shape, bytes).
type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn raw(cfg: &DitConfig, seed: u64) -> Raw {
    let w = DitWeights::random(cfg, seed).unwrap();
    w.named(cfg)
        .unwrap()
        .into_iter()
        .map(|(k, shape, data)| {
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k, (Dtype::F32, shape, bytes))
        })
        .collect()
}

fn write(path: &PathBuf, raw: &Raw, meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(k, (dt, shape, b))| (k.clone(), TensorView::new(*dt, shape.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

/// Loads and expects an error whose message contains every one of `needles`.
fn expect_err(path: &PathBuf, arch: Option<&str>, needles: &[&str]) -> String {
    let arch = arch.map(|a| Arch::parse(a).unwrap());
    let err = match DitWeights::load(path, arch.as_ref()) {
        Ok(_) => panic!(
            "loading {} should fail (expected {needles:?})",
            path.display()
        ),
        Err(e) => format!("{e:#}"),
    };
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
    err
}

const ARCH: &str = "depth=2,hidden=48,heads=3,patch=2";

#[test]
fn round_trip_save_load() {
    let dir = TempDir::new("ckpt", "roundtrip");
    for cfg in [
        small(),
        DitConfig::from_arch(
            &Arch::parse("depth=3,hidden=40,heads=5,patch=4").unwrap(),
            3,
            8,
            7,
            false,
        )
        .unwrap(),
    ] {
        let w = DitWeights::random(&cfg, 11).unwrap();
        let path = dir.path("w.safetensors");
        w.save(&path, &cfg).unwrap();
        // The metadata carries the heads: no --arch needed.
        let (cfg2, w2) = DitWeights::load(&path, None).unwrap();
        assert_eq!(cfg2, cfg);
        assert_eq!(w2, w);
        // And an agreeing --arch is accepted.
        let (cfg3, _) = DitWeights::load(&path, Some(&cfg.arch())).unwrap();
        assert_eq!(cfg3, cfg);
    }
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn random_weights_are_deterministic_and_nonzero() {
    let cfg = small();
    assert_eq!(
        DitWeights::random(&cfg, 3).unwrap(),
        DitWeights::random(&cfg, 3).unwrap()
    );
    assert_ne!(
        DitWeights::random(&cfg, 3).unwrap(),
        DitWeights::random(&cfg, 4).unwrap()
    );
    let w = DitWeights::random(&cfg, 3).unwrap();
    for (k, _, v) in w.named(&cfg).unwrap() {
        assert!(v.iter().any(|x| *x != 0.0), "{k} is all zeros");
    }
}

#[test]
fn half_precision_tensors_load_as_f32() {
    let dir = TempDir::new("ckpt", "half");
    let cfg = small();
    let w = DitWeights::random(&cfg, 5).unwrap();
    for dt in [Dtype::F16, Dtype::BF16] {
        let r: Raw = w
            .named(&cfg)
            .unwrap()
            .into_iter()
            .map(|(k, shape, data)| {
                let bytes = data
                    .iter()
                    .flat_map(|v| match dt {
                        Dtype::F16 => half::f16::from_f32(*v).to_le_bytes(),
                        _ => half::bf16::from_f32(*v).to_le_bytes(),
                    })
                    .collect();
                (k, (dt, shape, bytes))
            })
            .collect();
        let path = dir.path("h.safetensors");
        write(&path, &r, None);
        let (cfg2, w2) = DitWeights::load(&path, Some(&Arch::parse(ARCH).unwrap())).unwrap();
        assert_eq!(cfg2, cfg);
        let tol = if dt == Dtype::F16 { 1e-3 } else { 8e-3 };
        for ((k, _, a), (_, _, b)) in w
            .named(&cfg)
            .unwrap()
            .into_iter()
            .zip(w2.named(&cfg).unwrap())
        {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= tol * x.abs().max(1e-2),
                    "{dt:?} {k}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn unreadable_garbage_and_truncated_files() {
    let dir = TempDir::new("ckpt", "garbage");
    expect_err(
        &dir.path("nope.safetensors"),
        Some(ARCH),
        &["cannot read checkpoint", "nope.safetensors"],
    );

    let garbage = dir.path("garbage.safetensors");
    std::fs::write(
        &garbage,
        b"this is not a safetensors file at all, just text",
    )
    .unwrap();
    expect_err(&garbage, Some(ARCH), &["not a valid safetensors file"]);

    let empty = dir.path("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    expect_err(&empty, Some(ARCH), &["not a valid safetensors file"]);

    let good = dir.path("good.safetensors");
    write(&good, &raw(&small(), 1), None);
    let bytes = std::fs::read(&good).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 12] {
        let t = dir.path("truncated.safetensors");
        std::fs::write(&t, &bytes[..cut]).unwrap();
        expect_err(
            &t,
            Some(ARCH),
            &["not a valid safetensors file", "truncated.safetensors"],
        );
    }
}

#[test]
fn missing_and_unexpected_keys_are_named() {
    let dir = TempDir::new("ckpt", "keys");
    let p = dir.path("k.safetensors");
    let mut r = raw(&small(), 1);
    r.remove("blocks.1.mlp.fc2.bias");
    r.remove("final_layer.adaLN_modulation.1.bias");
    write(&p, &r, None);
    expect_err(
        &p,
        Some(ARCH),
        &[
            "missing keys",
            "blocks.1.mlp.fc2.bias",
            "final_layer.adaLN_modulation.1.bias",
        ],
    );

    let mut r = raw(&small(), 1);
    r.insert(
        "blocks.0.attn.q_norm.weight".into(),
        (Dtype::F32, vec![1], vec![0, 0, 128, 63]),
    );
    r.insert(
        "ema_decay".into(),
        (Dtype::F32, vec![1], vec![0, 0, 128, 63]),
    );
    write(&p, &r, None);
    expect_err(
        &p,
        Some(ARCH),
        &[
            "unexpected keys",
            "blocks.0.attn.q_norm.weight",
            "ema_decay",
        ],
    );

    // A gap in the block indices: every key of the missing block is named.
    let cfg3 = DitConfig::from_arch(
        &Arch::parse("depth=3,hidden=48,heads=3,patch=2").unwrap(),
        4,
        6,
        10,
        true,
    )
    .unwrap();
    let mut r = raw(&cfg3, 1);
    r.retain(|k, _| !k.starts_with("blocks.1."));
    write(&p, &r, None);
    expect_err(
        &p,
        Some("depth=3,hidden=48,heads=3,patch=2"),
        &[
            "missing keys",
            "blocks.1.attn.qkv.weight",
            "blocks.1.adaLN_modulation.1.bias",
        ],
    );

    // A stray key of a block index no checkpoint of this size holds: refused before the key
    // list of that many blocks is built (it took all the memory), the key named.
    for index in ["100000000000", "18446744073709551615"] {
        let mut r = raw(&small(), 1);
        let key = format!("blocks.{index}.x");
        r.insert(key.clone(), (Dtype::F32, vec![1], vec![0, 0, 128, 63]));
        write(&p, &r, None);
        expect_err(&p, Some(ARCH), &[&key, "not a DiT checkpoint's keys"]);
    }

    // A key the architecture is inferred from.
    let mut r = raw(&small(), 1);
    r.remove("pos_embed");
    write(&p, &r, None);
    expect_err(&p, Some(ARCH), &["missing key pos_embed"]);
}

#[test]
fn wrong_shapes_are_named() {
    let dir = TempDir::new("ckpt", "shapes");
    let p = dir.path("s.safetensors");
    let mut r = raw(&small(), 1);
    let e = r.get_mut("blocks.1.attn.proj.weight").unwrap();
    e.1 = vec![48, 47];
    e.2.truncate(48 * 47 * 4);
    write(&p, &r, None);
    expect_err(
        &p,
        Some(ARCH),
        &["blocks.1.attn.proj.weight", "[48, 48]", "[48, 47]"],
    );

    let mut r = raw(&small(), 1);
    let e = r.get_mut("final_layer.linear.weight").unwrap();
    e.1 = vec![24, 48];
    e.2.truncate(24 * 48 * 4);
    write(&p, &r, None);
    expect_err(&p, Some(ARCH), &["final_layer.linear.weight", "[24, 48]"]);

    let mut r = raw(&small(), 1);
    let e = r.get_mut("pos_embed").unwrap();
    e.1 = vec![1, 8, 48];
    e.2.truncate(8 * 48 * 4);
    write(&p, &r, None);
    expect_err(&p, Some(ARCH), &["pos_embed", "not a square grid"]);

    // The architecture disagrees with the shapes.
    write(&p, &raw(&small(), 1), None);
    expect_err(&p, Some("DiT-S/2"), &["DiT-S/2", "depth 12", "depth 2"]);
    expect_err(
        &p,
        Some("depth=2,hidden=64,heads=4,patch=2"),
        &["hidden 64", "hidden 48"],
    );
}

/// The MLP width is read from block 0's fc1: a ratio past the size limits is refused when the
/// file is loaded, as every other size is.
#[test]
fn an_mlp_ratio_past_the_limits_is_refused_on_load() {
    let dir = TempDir::new("ckpt", "mlp_ratio");
    let p = dir.path("m.safetensors");
    let limit = fora::config::SIZE_LIMITS.mlp_ratio;
    let mut r = raw(&small(), 1);
    for l in 0..2 {
        let fc1 = r.get_mut(&format!("blocks.{l}.mlp.fc1.weight")).unwrap();
        fc1.1 = vec![48 * (limit + 1), 48];
        fc1.2 = vec![0; 48 * (limit + 1) * 48 * 4];
        let bias = r.get_mut(&format!("blocks.{l}.mlp.fc1.bias")).unwrap();
        bias.1 = vec![48 * (limit + 1)];
        bias.2 = vec![0; 48 * (limit + 1) * 4];
        let fc2 = r.get_mut(&format!("blocks.{l}.mlp.fc2.weight")).unwrap();
        fc2.1 = vec![48, 48 * (limit + 1)];
        fc2.2 = vec![0; 48 * (limit + 1) * 48 * 4];
    }
    write(&p, &r, None);
    expect_err(&p, Some(ARCH), &["mlp_ratio"]);
}

#[test]
fn unsupported_dtype_and_nonfinite_values_are_named() {
    let dir = TempDir::new("ckpt", "dtype");
    let p = dir.path("d.safetensors");
    let mut r = raw(&small(), 1);
    let e = r.get_mut("blocks.0.mlp.fc1.bias").unwrap();
    e.0 = Dtype::I64;
    e.2 = (0..192i64).flat_map(|v| v.to_le_bytes()).collect();
    write(&p, &r, None);
    expect_err(
        &p,
        Some(ARCH),
        &["blocks.0.mlp.fc1.bias", "unsupported dtype I64"],
    );

    for bad in [f32::NAN, f32::INFINITY] {
        let mut r = raw(&small(), 1);
        let e = r.get_mut("blocks.1.adaLN_modulation.1.weight").unwrap();
        e.2[40..44].copy_from_slice(&bad.to_le_bytes());
        write(&p, &r, None);
        expect_err(
            &p,
            Some(ARCH),
            &[
                "blocks.1.adaLN_modulation.1.weight",
                "non-finite",
                "index 10",
            ],
        );
    }
}

#[test]
fn heads_come_from_arch_or_metadata() {
    let dir = TempDir::new("ckpt", "heads");
    let p = dir.path("h.safetensors");
    let cfg = small();
    write(&p, &raw(&cfg, 1), None);
    expect_err(&p, None, &["heads cannot be inferred", "--arch"]);
    let (c, _) = DitWeights::load(&p, Some(&Arch::parse(ARCH).unwrap())).unwrap();
    assert_eq!(c, cfg);

    // Metadata alone is enough.
    let mut meta = HashMap::new();
    meta.insert("fora.heads".to_string(), "3".to_string());
    write(&p, &raw(&cfg, 1), Some(meta.clone()));
    let (c, _) = DitWeights::load(&p, None).unwrap();
    assert_eq!(c, cfg);

    // --arch and metadata disagree on heads.
    expect_err(
        &p,
        Some("depth=2,hidden=48,heads=6,patch=2"),
        &["6 heads", "fora.heads=3"],
    );

    // Metadata that disagrees with the shapes.
    meta.insert("fora.depth".into(), "3".into());
    write(&p, &raw(&cfg, 1), Some(meta.clone()));
    expect_err(&p, None, &["fora.depth=3", "2"]);
    meta.remove("fora.depth");
    meta.insert("fora.heads".into(), "5".into());
    write(&p, &raw(&cfg, 1), Some(meta.clone()));
    expect_err(&p, None, &["5 heads do not divide hidden 48"]);
    meta.insert("fora.heads".into(), "three".into());
    write(&p, &raw(&cfg, 1), Some(meta));
    expect_err(&p, None, &["fora.heads", "not a number"]);
}

#[test]
fn weights_check_rejects_mismatched_sizes() {
    let cfg = small();
    let mut w = DitWeights::random(&cfg, 1).unwrap();
    w.blocks[1].fc1_b.pop();
    let err = w.check(&cfg).unwrap_err().to_string();
    assert!(err.contains("blocks.1.mlp.fc1.bias"), "{err}");
    let mut w = DitWeights::random(&cfg, 1).unwrap();
    w.final_b[0] = f32::NAN;
    let err = w.check(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("final_layer.linear.bias") && err.contains("non-finite"),
        "{err}"
    );
}

/// Malformed input never panics: a valid checkpoint with random bytes flipped (header and
/// data), truncated at random lengths, or with its header length field changed, loads or fails
/// with an error, but never panics. The mutations are seeded, so a failure reproduces.
#[test]
fn mutated_checkpoints_never_panic() {
    let cfg = small();
    let dir = TempDir::new("ckpt", "fuzz");
    let path = dir.path("valid.safetensors");
    let mut meta = HashMap::new();
    meta.insert("fora.heads".to_string(), "3".to_string());
    write(&path, &raw(&cfg, 5), Some(meta));
    let valid = std::fs::read(&path).unwrap();
    assert!(DitWeights::from_bytes(&valid, None).is_ok());
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    // A small xorshift: the test needs reproducible, not good, randomness.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut err) = (0, 0);
    for case in 0..600 {
        let mut bytes = valid.clone();
        match case % 3 {
            // Flip bytes, mostly inside the JSON header where parsing happens.
            0 => {
                for _ in 0..1 + next() % 4 {
                    let at = if next() % 4 == 0 {
                        next() as usize % bytes.len()
                    } else {
                        8 + next() as usize % header_len
                    };
                    bytes[at] = next() as u8;
                }
            }
            // Truncate anywhere.
            1 => bytes.truncate(next() as usize % bytes.len()),
            // A wrong header length.
            _ => {
                let len = next() % (2 * bytes.len() as u64 + 16);
                bytes[..8].copy_from_slice(&len.to_le_bytes());
            }
        }
        let result = std::panic::catch_unwind(|| DitWeights::from_bytes(&bytes, None).map(|_| ()));
        // The same bytes as a file, read tensor by tensor, load or fail as the bytes do.
        let file = dir.path("mutated.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        let from_file = std::panic::catch_unwind(|| DitWeights::load(&file, None).map(|_| ()));
        match (&result, from_file) {
            (Ok(a), Ok(b)) => assert_eq!(
                a.is_ok(),
                b.is_ok(),
                "mutation case {case}: from bytes {a:?}, from the file {b:?}"
            ),
            (_, Err(_)) => panic!("mutation case {case} panicked the file loader"),
            _ => {}
        }
        match result {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                assert!(!format!("{e:#}").is_empty());
                err += 1
            }
            Err(_) => panic!("mutation case {case} panicked the loader"),
        }
    }
    // Most mutations must be caught as errors (a flipped data byte can still load).
    assert!(
        err > 400,
        "only {err} of 600 mutations were rejected ({ok} loaded)"
    );
}

/// The CLI's tensor files (`fora forward --input`, `--noise-file`) are read through
/// `io::TensorFile`: mutated files open and read with an error, never a panic.
#[test]
fn mutated_tensor_files_never_panic() {
    use fora::io::{safetensors_bytes, OutTensor, TensorFile};
    let dir = TempDir::new("ckpt", "tensorfuzz");
    let x: Vec<f32> = (0..2 * 4 * 6 * 6)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let t = [10i64, 999];
    let valid = safetensors_bytes(
        &[
            ("x", OutTensor::F32(&[2, 4, 6, 6], &x)),
            ("t", OutTensor::I64(&[2], &t)),
        ],
        None,
    )
    .unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let path = dir.path("input.safetensors");
    let mut rejected = 0;
    for case in 0..300 {
        let mut bytes = valid.clone();
        if case % 2 == 0 {
            for _ in 0..1 + next() % 4 {
                let at = next() as usize % bytes.len().min(200);
                bytes[at] = next() as u8;
            }
        } else {
            bytes.truncate(next() as usize % bytes.len());
        }
        std::fs::write(&path, &bytes).unwrap();
        let read = std::panic::catch_unwind(|| -> anyhow::Result<()> {
            let f = TensorFile::open(&path)?;
            f.f32("x", 4)?;
            f.i64("t", 1)?;
            Ok(())
        });
        match read {
            Ok(Ok(())) => {}
            Ok(Err(_)) => rejected += 1,
            Err(_) => panic!("mutation case {case} panicked the tensor reader"),
        }
    }
    assert!(
        rejected > 150,
        "only {rejected} of 300 mutations were rejected"
    );
}
