//! PyTorch checkpoints (`torch.save`: the official DiT release's format, diffusers' `.bin`)
//! read as the safetensors files they were made from (`tools/make_pt_fixtures.py`), through
//! the reader, the DiT and VAE loaders and the command line; and their refusals.

use fora::config::Arch;
use fora::io::TensorReader;
use fora::vae::VaeDecoder;
use fora::weights::DitWeights;
use safetensors::tensor::Dtype;
use std::path::{Path, PathBuf};
use std::process::Command;

mod temp_dir;
use temp_dir::TempDir;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

const DIT_ARCH: &str = "depth=1,hidden=24,heads=2,patch=4";

/// `bytes` (f32, little-endian) rounded to bf16 as PyTorch's `.to(torch.bfloat16)` rounds
/// (to nearest, ties to even), as bf16 bytes.
fn f32_bytes_to_bf16(bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks_exact(4)
        .flat_map(|b| {
            let v = f32::from_le_bytes(b.try_into().unwrap());
            half::bf16::from_f32(v).to_le_bytes()
        })
        .collect()
}

/// What a checkpoint's tensors are against their twin's: a dtype and the twin's bytes in it.
type Conversion = (Dtype, fn(&[u8]) -> Vec<u8>);

/// Every tensor of `pt` has the name, shape and bytes of `safetensors`' (its dtype `dtype`
/// where given, its bytes then `convert`ed), and no tensor is left over.
fn assert_same_tensors(pt: &TensorReader, safetensors: &TensorReader, convert: Option<Conversion>) {
    assert_eq!(pt.names(), safetensors.names());
    for name in safetensors.names() {
        let (got, want) = (
            pt.tensor(&name).unwrap(),
            safetensors.tensor(&name).unwrap(),
        );
        assert_eq!(got.shape, want.shape, "{name}");
        let (dtype, bytes) = match convert {
            Some((dtype, f)) => (dtype, f(&want.data)),
            None => (want.dtype, want.data.to_vec()),
        };
        assert_eq!(got.dtype, dtype, "{name}");
        assert!(got.data[..] == bytes[..], "{name}: the bytes differ");
    }
}

/// The reader gives a PyTorch checkpoint's tensors exactly as the safetensors file they were
/// saved from holds them: in torch.save's ZIP format and in the legacy one, with a transposed
/// view and a view at a storage offset gathered; the `ema` of a training checkpoint (bf16)
/// rather than its `model`, past an optimizer state and an argparse.Namespace; the
/// `state_dict` of a Lightning checkpoint; a flat state dict's names whole; and diffusers'
/// `.bin` of a VAE decoder (f16).
#[test]
fn pytorch_checkpoints_read_as_their_safetensors_twins() {
    let dit = TensorReader::open(&fixture("oracle_b.model.safetensors"), "").unwrap();
    assert_eq!(dit.format().to_string(), "safetensors");
    for file in ["dit_b.pt", "dit_b_legacy.pt"] {
        let pt = TensorReader::open(&fixture(file), "").unwrap();
        assert_eq!(pt.format().to_string(), "PyTorch checkpoint", "{file}");
        assert!(pt.metadata().is_empty());
        assert_same_tensors(&pt, &dit, None);
    }
    let training = TensorReader::open(&fixture("dit_b_training.pt"), "").unwrap();
    assert_eq!(training.format().to_string(), "PyTorch checkpoint, \"ema\"");
    assert_same_tensors(&training, &dit, Some((Dtype::BF16, f32_bytes_to_bf16)));

    let lightning = TensorReader::open(&fixture("dit_b_lightning.ckpt"), "").unwrap();
    assert_eq!(
        lightning.format().to_string(),
        "PyTorch checkpoint, \"state_dict\""
    );
    assert_same_tensors(&lightning, &dit, None);

    // A compiled model's state dict under DistributedDataParallel: the wrappers' prefixes
    // come off every name.
    let ddp = TensorReader::open(&fixture("dit_b_ddp.pt"), "").unwrap();
    assert_eq!(
        ddp.format().to_string(),
        "PyTorch checkpoint, names without \"module._orig_mod.\""
    );
    assert_same_tensors(&ddp, &dit, None);

    // A flat state dict whose names begin with a nest's name and a dot: nothing is stripped.
    let flat = TensorReader::open(&fixture("flat_sd.ckpt"), "").unwrap();
    assert_eq!(flat.format().to_string(), "PyTorch checkpoint");
    assert_eq!(
        flat.names(),
        [
            "cond_stage_model.transformer.final_layer_norm.bias",
            "first_stage_model.decoder.conv_in.bias",
            "model.diffusion_model.input_blocks.0.0.weight",
            "model_ema.decay",
        ]
    );
    assert_eq!(flat.shape("model_ema.decay"), Some(&[][..]));

    let vae = TensorReader::open(&fixture("vae_tiny.model.safetensors"), "").unwrap();
    let bin = TensorReader::open(&vae_folder().join("diffusion_pytorch_model.bin"), "").unwrap();
    assert_same_tensors(&bin, &vae, None);
}

/// `DitWeights::load` of a PyTorch checkpoint gives the config and weights of its safetensors
/// twin (given the architecture, which a PyTorch checkpoint does not record, and says so).
#[test]
fn dit_weights_load_from_pytorch_checkpoints() {
    let arch = Arch::parse(DIT_ARCH).unwrap();
    let (want_cfg, want) =
        DitWeights::load(fixture("oracle_b.model.safetensors"), Some(&arch)).unwrap();
    for file in [
        "dit_b.pt",
        "dit_b_legacy.pt",
        "dit_b_ddp.pt",
        "dit_b_lightning.ckpt",
    ] {
        let (cfg, w) = DitWeights::load(fixture(file), Some(&arch)).unwrap();
        assert_eq!(cfg, want_cfg, "{file}");
        assert_eq!(w.fingerprint(), want.fingerprint(), "{file}");
    }

    // The training checkpoint's ema is the weights rounded to bf16; its model (the weights
    // plus one) is not taken.
    let (cfg, w) = DitWeights::load(fixture("dit_b_training.pt"), Some(&arch)).unwrap();
    assert_eq!(cfg, want_cfg);
    let rounded = want.named(&want_cfg).unwrap();
    let mut changed = 0;
    for ((name, shape, data), (want_name, want_shape, want_data)) in
        w.named(&cfg).unwrap().into_iter().zip(rounded)
    {
        assert_eq!((&name, &shape), (&want_name, &want_shape));
        let bf16: Vec<f32> = want_data
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(data, bf16, "{name}");
        changed += data
            .iter()
            .zip(want_data.iter())
            .filter(|(a, b)| a != b)
            .count();
    }
    assert!(
        changed > 1000,
        "bf16 rounding changed only {changed} values"
    );

    let err = format!(
        "{:#}",
        DitWeights::load(fixture("dit_b.pt"), None).unwrap_err()
    );
    assert!(
        err.contains("dit_b.pt") && err.contains("--arch"),
        "the error should name the file and ask for --arch: {err}"
    );
}

fn vae_folder() -> PathBuf {
    fixture("vae_tiny_diffusers")
}

/// A VAE decoder as diffusers saves one (`diffusion_pytorch_model.bin` beside its
/// `config.json`) loads as its safetensors twin with its metadata: the same settings from
/// config.json (GroupNorm groups, scaling factor), the same weights, the same images.
#[test]
fn vae_loads_from_diffusers_bin_and_config() {
    let want = VaeDecoder::load(fixture("vae_tiny.model.safetensors")).unwrap();
    let got = VaeDecoder::load(vae_folder().join("diffusion_pytorch_model.bin")).unwrap();
    assert_eq!(got.config(), want.config());
    assert!(
        got.source()
            .starts_with("PyTorch checkpoint; settings from")
            && got.source().ends_with("config.json")
            && got.source_is_chosen(),
        "{}",
        got.source()
    );
    assert_eq!(want.source(), "safetensors");
    assert!(!want.source_is_chosen());
    assert_eq!(got.fingerprint(), want.fingerprint());
    let io = fora::io::TensorFile::open(fixture("vae_tiny.io.safetensors")).unwrap();
    let latents = io.f32("latents", 4).unwrap();
    let shape: [usize; 4] = latents.shape.clone().try_into().unwrap();
    let (a, _) = got.decode(&latents.data, shape).unwrap();
    let (b, _) = want.decode(&latents.data, shape).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&a) == bits(&b), "the images differ");
}

/// config.json is read only where it is an AutoencoderKL's; what it states must be the
/// weights' and agree with the file's metadata; a field of the wrong type is an error naming
/// the file.
#[test]
fn vae_config_json_is_checked() {
    let dir = TempDir::new("pt", "vae-config");
    let bin = dir.path("diffusion_pytorch_model.bin");
    std::fs::copy(vae_folder().join("diffusion_pytorch_model.bin"), &bin).unwrap();
    let good: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vae_folder().join("config.json")).unwrap()).unwrap();
    let load_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut config = good.clone();
        edit(&mut config);
        std::fs::write(dir.path("config.json"), config.to_string()).unwrap();
        VaeDecoder::load(&bin).map(|d| d.config().clone())
    };
    let refused = |edit: &dyn Fn(&mut serde_json::Value), needles: &[&str]| {
        let err = format!("{:#}", load_with(edit).unwrap_err());
        for n in needles {
            assert!(err.contains(n), "{err} lacks {n:?}");
        }
    };
    assert_eq!(load_with(&|_| {}).unwrap().groups, 8);
    let scaled = load_with(&|c| c["scaling_factor"] = 0.5.into()).unwrap();
    assert_eq!(scaled.scaling_factor, 0.5);
    // Another model's config.json, or none: the defaults (32 groups do not fit 16 channels).
    refused(
        &|c| c["_class_name"] = "UNet2DModel".into(),
        &["GroupNorm with 32 groups"],
    );
    refused(
        &|c| c["block_out_channels"] = serde_json::json!([16, 32, 64]),
        &[
            "config.json says block_out_channels [16, 32, 64]",
            "[32, 32, 16]",
        ],
    );
    refused(
        &|c| c["layers_per_block"] = 2.into(),
        &["config.json says layers_per_block 2"],
    );
    refused(
        &|c| c["latent_channels"] = 8.into(),
        &["config.json says latent_channels 8"],
    );
    refused(
        &|c| c["norm_num_groups"] = "eight".into(),
        &["config.json: norm_num_groups is not a whole number"],
    );
    refused(
        &|c| c["scaling_factor"] = serde_json::json!([1]),
        &["config.json: scaling_factor is not a number"],
    );
    refused(
        &|c| c["shift_factor"] = 0.0609.into(),
        &["config.json: shift_factor is 0.0609", "does not apply"],
    );
    // diffusers writes these as null (or a zero shift) for the VAEs this decoder runs.
    let plain = load_with(&|c| {
        c["shift_factor"] = serde_json::Value::Null;
        c["latents_mean"] = serde_json::Value::Null;
    });
    assert_eq!(plain.unwrap().groups, 8);
    // A file not named as diffusers names its weights does not take the config.json beside
    // it (the defaults: 32 groups, which do not fit).
    let other = dir.path("vae.bin");
    std::fs::copy(&bin, &other).unwrap();
    std::fs::write(dir.path("config.json"), good.to_string()).unwrap();
    let err = format!("{:#}", VaeDecoder::load(&other).err().unwrap());
    assert!(err.contains("GroupNorm with 32 groups"), "{err}");
    // The safetensors twin's metadata says 8 groups: config.json saying 16 disagrees.
    let st = dir.path("diffusion_pytorch_model.safetensors");
    std::fs::copy(fixture("vae_tiny.model.safetensors"), &st).unwrap();
    let mut config = good.clone();
    config["norm_num_groups"] = 16.into();
    std::fs::write(dir.path("config.json"), config.to_string()).unwrap();
    let err = format!("{:#}", VaeDecoder::load(&st).err().unwrap());
    assert!(
        err.contains("metadata fora.vae.groups = 8 disagrees with") && err.contains("(16)"),
        "{err}"
    );
    std::fs::remove_file(dir.path("config.json")).unwrap();
    let err = format!("{:#}", VaeDecoder::load(&bin).err().unwrap());
    assert!(err.contains("GroupNorm with 32 groups"), "{err}");
}

/// A checkpoint that is cut short, a ZIP that is not a PyTorch checkpoint, a pickle without
/// tensors and a PyTorch checkpoint given as bytes are refused with the file named; no
/// mutation of a checkpoint panics the loader.
#[test]
fn broken_pytorch_checkpoints_are_refused() {
    let dir = TempDir::new("pt", "broken");
    let arch = Arch::parse(DIT_ARCH).unwrap();
    let good = std::fs::read(fixture("dit_b.pt")).unwrap();
    let load = |bytes: &[u8]| {
        let path = dir.path("broken.pt");
        std::fs::write(&path, bytes).unwrap();
        DitWeights::load(&path, Some(&arch)).map(|_| ())
    };
    let refused = |bytes: &[u8], needles: &[&str]| {
        let err = format!("{:#}", load(bytes).unwrap_err());
        assert!(err.contains("broken.pt"), "{err}");
        for n in needles {
            assert!(err.contains(n), "{err} lacks {n:?}");
        }
    };
    refused(&good[..good.len() / 2], &["not a valid PyTorch checkpoint"]);
    refused(&good[..100], &["not a valid PyTorch checkpoint"]);
    let legacy = std::fs::read(fixture("dit_b_legacy.pt")).unwrap();
    refused(&legacy[..legacy.len() - 1000], &[]);

    // A ZIP archive that is no PyTorch checkpoint (an .npz, say).
    let mut npz = Vec::new();
    {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(&mut npz));
        zip.start_file("arr_0.npy", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, b"not a pickle").unwrap();
        zip.finish().unwrap();
    }
    refused(&npz, &["not a valid PyTorch checkpoint"]);

    // A plain pickle of a dict without tensors: {"a": 1}, protocol 2.
    let pickle = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.";
    refused(pickle, &["without tensors"]);

    // A view that repeats one float 2^30 times (stride 0) is refused before anything is read.
    let err = format!(
        "{:#}",
        TensorReader::open(&fixture("broadcast.pt"), "")
            .err()
            .unwrap()
    );
    assert!(
        err.contains("tensor w of shape [1073741824]") && err.contains("a view repeating"),
        "{err}"
    );

    let err = format!(
        "{:#}",
        DitWeights::from_bytes(&good, Some(&arch)).unwrap_err()
    );
    assert!(err.contains("read from its file"), "{err}");

    // Seeded byte flips and cuts anywhere in the file: an error or (a flipped data byte) a
    // load, never a panic, which would fail this test.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let (mut ok, mut err) = (0, 0);
    for case in 0..300 {
        let mut bytes = good.clone();
        if case % 3 == 0 {
            bytes.truncate(next(good.len()));
        } else {
            for _ in 0..1 + next(4) {
                let i = next(bytes.len());
                bytes[i] ^= 1 << next(8);
            }
        }
        match load(&bytes) {
            Ok(()) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert!(
        err > 100,
        "only {err} of 300 mutations were refused ({ok} loaded)"
    );
}

/// `fora sample --model X.pt` samples what the safetensors twin samples, bit for bit.
#[test]
fn sample_from_a_pytorch_checkpoint() {
    let dir = TempDir::new("pt", "sample");
    let run = |model: &Path, out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_fora"))
            .args(["sample", "--model"])
            .arg(model)
            .args(["--arch", DIT_ARCH, "--class", "3", "--steps", "6"])
            .args(["--cache-interval", "2", "--device", "cpu", "--quiet"])
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // The file's metadata names the model; the samples must not differ.
        let samples = fora::io::TensorFile::open(out).unwrap().f32("samples", 4);
        samples.unwrap()
    };
    let want = run(
        &fixture("oracle_b.model.safetensors"),
        &dir.path("st.safetensors"),
    );
    let got = run(&fixture("dit_b.pt"), &dir.path("pt.safetensors"));
    // A training checkpoint: the run says it took the "ema" (as bf16, other samples).
    let o = Command::new(env!("CARGO_BIN_EXE_fora"))
        .args(["sample", "--model"])
        .arg(fixture("dit_b_training.pt"))
        .args([
            "--arch", DIT_ARCH, "--class", "3", "--steps", "2", "--device", "cpu",
        ])
        .arg("--out")
        .arg(dir.path("ema.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("dit_b_training.pt: PyTorch checkpoint, \"ema\""),
        "{err}"
    );
    assert_eq!(got.shape, [1, 3, 8, 8]);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&got.data) == bits(&want.data), "the samples differ");
}

/// A `--noise-file` saved by `torch.save` gives the samples of the same tensors in safetensors.
#[test]
fn noise_file_from_pytorch() {
    let dir = TempDir::new("pt", "noise");
    let pt = fixture("noise_tiny.pt");
    let reader = TensorReader::open(&pt, "").unwrap();
    let f32s = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = reader.tensor(name).unwrap();
        let values = t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape, values)
    };
    let (xs, x) = f32s("x_T");
    let (ns, noise) = f32s("noise");
    let twin = dir.path("noise.safetensors");
    fora::io::write_tensors(
        &twin,
        &[
            ("x_T", fora::io::OutTensor::F32(&xs, &x)),
            ("noise", fora::io::OutTensor::F32(&ns, &noise)),
        ],
        None,
    )
    .unwrap();
    let sample = |noise: &Path, out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_fora"))
            .args(["sample", "--class", "3", "--steps", "5", "--device", "cpu"])
            .arg("--noise-file")
            .arg(noise)
            .arg("--quiet")
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        fora::io::TensorFile::open(out)
            .unwrap()
            .f32("samples", 4)
            .unwrap()
    };
    let a = sample(&pt, &dir.path("a.safetensors"));
    let b = sample(&twin, &dir.path("b.safetensors"));
    assert_eq!(a.shape, [1, 3, 32, 32]);
    assert!(a == b, "the samples differ");
}

/// `fora info --model --vae` describes the files after loading them as `fora sample` does, and
/// fails (exit 1, the file named) on one that does not load.
#[test]
fn info_describes_checkpoints() {
    let info = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_fora"))
            .arg("info")
            .args(args)
            .output()
            .unwrap()
    };
    let model = fixture("dit_b_training.pt");
    let vae = vae_folder().join("diffusion_pytorch_model.bin");
    let o = info(&[
        "--model".as_ref(),
        model.as_os_str(),
        "--arch".as_ref(),
        DIT_ARCH.as_ref(),
        "--vae".as_ref(),
        vae.as_os_str(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for needle in [
        "dit_b_training.pt: PyTorch checkpoint, \"ema\"; depth=1,hidden=24,heads=2,patch=4",
        "input 3 x 8 x 8 (4 tokens), 5 classes, no learn_sigma",
        "diffusion_pytorch_model.bin: PyTorch checkpoint; settings from",
        "vae_tiny_diffusers/config.json; 4 latent channels",
        "up blocks [32, 32, 16] of 2 resnets, 8 GroupNorm groups",
    ] {
        assert!(out.contains(needle), "{needle:?} not in {out}");
    }
    // A safetensors copy that records the architecture, then described without --arch.
    let dir = TempDir::new("pt", "info");
    let copy = dir.path("copy.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_fora"))
        .args(["bench", "--model"])
        .arg(fixture("dit_b.pt"))
        .args(["--arch", DIT_ARCH, "--save-weights"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = info(&["--model".as_ref(), copy.as_os_str()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("copy.safetensors: safetensors; depth=1,hidden=24,heads=2,patch=4"),
        "{out}"
    );
    let (_, copied) = DitWeights::load(&copy, None).unwrap();
    let arch = Arch::parse(DIT_ARCH).unwrap();
    let (_, original) = DitWeights::load(fixture("dit_b.pt"), Some(&arch)).unwrap();
    assert_eq!(copied.fingerprint(), original.fingerprint());

    let o = info(&["--model".as_ref(), fixture("dit_b.pt").as_os_str()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("dit_b.pt") && err.contains("--arch") && !err.contains("panicked"));
}
