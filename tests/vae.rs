//! The VAE decoder against diffusers' own (`AutoencoderKL`, the decoder DiT's sampling code
//! runs): a small random configuration of the same architecture, decoded by diffusers into
//! tests/fixtures/vae_tiny.io.safetensors (`tools/make_vae_fixture.py`), and the loader's
//! refusals of files that are not such a decoder.

use anyhow::Result;
use fora::io::TensorFile;
use fora::vae::VaeDecoder;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vae_tiny.model.safetensors"
);
const IO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vae_tiny.io.safetensors"
);

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The fixture's tensors (name, dtype, shape, bytes) and metadata, to rewrite.
struct Tensors {
    entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

impl Tensors {
    fn read(bytes: &[u8]) -> Tensors {
        let st = SafeTensors::deserialize(bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
        let mut entries: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Tensors {
            entries,
            meta: header.metadata().clone().unwrap_or_default(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = self
            .entries
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, Some(self.meta.clone())).unwrap()
    }

    fn rename(&mut self, from: &str, to: &str) {
        for e in &mut self.entries {
            if let Some(rest) = e.0.strip_prefix(from) {
                e.0 = format!("{to}{rest}");
            }
        }
    }

    fn remove(&mut self, name: &str) {
        let before = self.entries.len();
        self.entries.retain(|e| e.0 != name);
        assert_eq!(self.entries.len(), before - 1, "no tensor {name}");
    }
}

fn fixture() -> Tensors {
    Tensors::read(&std::fs::read(MODEL).unwrap())
}

/// Decodes the fixture's latents with `bytes` as the weights.
fn decode_fixture(bytes: &[u8]) -> Result<(Vec<f32>, [usize; 4])> {
    let vae = VaeDecoder::from_bytes(bytes)?;
    let io = TensorFile::open(IO)?;
    let z = io.f32("latents", 4)?;
    vae.decode(&z.data, z.shape.try_into().unwrap())
}

#[test]
fn decodes_as_diffusers() -> Result<()> {
    let vae = VaeDecoder::load(MODEL)?;
    let cfg = vae.config();
    assert_eq!(
        (cfg.latent_channels, cfg.out_channels, cfg.upscale()),
        (4, 3, 4)
    );
    assert_eq!(cfg.block_channels, [32, 32, 16]);
    assert_eq!((cfg.resnets_per_block, cfg.groups), (2, 8));
    assert!(cfg.mid_attention);
    let io = TensorFile::open(IO)?;
    let z = io.f32("latents", 4)?;
    let want = io.f32("images", 4)?;
    let (got, shape) = vae.decode(&z.data, z.shape.clone().try_into().unwrap())?;
    assert_eq!(shape.to_vec(), want.shape);
    let err = rel_l2(&got, &want.data);
    let max = got
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // f32 against f32 in another summation order through 14 convolutions.
    assert!(err < 1e-5 && max < 1e-4, "rel-L2 {err:e}, max abs {max:e}");
    // The images differ from each other and are not flat: a decode that ignored its input
    // could not pass the comparison above by luck.
    let half = got.len() / 2;
    assert!(rel_l2(&got[..half], &got[half..]) > 0.1);
    Ok(())
}

/// The fixture's multiply-adds at 5 x 6, counted by hand layer by layer: post_quant_conv 480,
/// conv_in 34,560, mid resnets 1,105,920, attention 180,480 (4 t C^2 + 2 t^2 C), block 0's
/// resnets 1,105,920 and upsampler 1,105,920, block 1's 4,423,680 and 4,423,680, block 2's
/// resnets 3,563,520 (with the shortcut) + 2,211,840, conv_out 207,360.
#[test]
fn multiply_adds_are_counted_layer_by_layer() -> Result<()> {
    let vae = VaeDecoder::load(MODEL)?;
    assert_eq!(vae.config().macs(5, 6), 18_363_360.0);
    Ok(())
}

#[test]
fn older_attention_names_and_conv_shaped_weights_decode_the_same() -> Result<()> {
    let (want, _) = decode_fixture(&fixture().bytes())?;
    let mut old = fixture();
    let a = "decoder.mid_block.attentions.0.";
    for (new, older) in [
        ("to_q.", "query."),
        ("to_k.", "key."),
        ("to_v.", "value."),
        ("to_out.0.", "proj_attn."),
    ] {
        old.rename(&format!("{a}{new}"), &format!("{a}{older}"));
    }
    // The older LDM conversion kept q as a 1x1 conv.
    for e in &mut old.entries {
        if e.0 == format!("{a}query.weight") {
            e.2.extend([1, 1]);
        }
    }
    let (got, _) = decode_fixture(&old.bytes())?;
    assert_eq!(got, want);
    Ok(())
}

/// The fixture's diffusers name in the original Stable Diffusion (LDM) layout, written out
/// here from that layout's published names (three up blocks, numbered from the narrowest).
fn ldm_name(name: &str) -> String {
    let mut n = name
        .replace("decoder.mid_block.resnets.0.", "decoder.mid.block_1.")
        .replace("decoder.mid_block.resnets.1.", "decoder.mid.block_2.")
        .replace(
            "decoder.mid_block.attentions.0.group_norm.",
            "decoder.mid.attn_1.norm.",
        )
        .replace(
            "decoder.mid_block.attentions.0.to_q.",
            "decoder.mid.attn_1.q.",
        )
        .replace(
            "decoder.mid_block.attentions.0.to_k.",
            "decoder.mid.attn_1.k.",
        )
        .replace(
            "decoder.mid_block.attentions.0.to_v.",
            "decoder.mid.attn_1.v.",
        )
        .replace(
            "decoder.mid_block.attentions.0.to_out.0.",
            "decoder.mid.attn_1.proj_out.",
        )
        .replace("decoder.conv_norm_out.", "decoder.norm_out.")
        .replace("conv_shortcut", "nin_shortcut");
    for b in 0..3 {
        n = n
            .replace(
                &format!("decoder.up_blocks.{b}.resnets."),
                &format!("decoder.up.{}.block.", 2 - b),
            )
            .replace(
                &format!("decoder.up_blocks.{b}.upsamplers.0."),
                &format!("decoder.up.{}.upsample.", 2 - b),
            );
    }
    n
}

#[test]
fn the_original_stable_diffusion_layout_decodes_the_same() -> Result<()> {
    let (want, _) = decode_fixture(&fixture().bytes())?;
    for prefix in ["", "first_stage_model."] {
        let mut t = fixture();
        for e in &mut t.entries {
            e.0 = format!("{prefix}{}", ldm_name(&e.0));
            // LDM's attention layers are 1x1 convs.
            if e.0.contains("attn_1.") && e.2.len() == 2 {
                e.2.extend([1, 1]);
            }
        }
        assert!(t
            .entries
            .iter()
            .any(|e| e.0.ends_with("decoder.up.0.block.1.conv2.weight")));
        // A whole Stable Diffusion checkpoint's other parts are not the decoder's.
        t.entries.push((
            "model.diffusion_model.out.0.bias".into(),
            Dtype::F32,
            vec![1],
            vec![0; 4],
        ));
        let (got, _) = decode_fixture(&t.bytes())?;
        assert_eq!(got, want, "prefix {prefix:?}");
    }
    // One tensor under two names (a decoder both bare and under the prefix): refused, not one
    // of them left unread.
    let mut t = fixture();
    for e in &mut t.entries {
        e.0 = ldm_name(&e.0);
    }
    let twin = t
        .entries
        .iter()
        .find(|e| e.0 == "decoder.norm_out.bias")
        .unwrap()
        .clone();
    t.entries.push((
        "first_stage_model.decoder.norm_out.bias".into(),
        twin.1,
        twin.2,
        twin.3,
    ));
    assert_refused(
        &t.bytes(),
        &[
            "decoder.norm_out.bias",
            "are both decoder.conv_norm_out.bias",
        ],
    );
    // A misshapen tensor is named both ways.
    let mut t = fixture();
    for e in &mut t.entries {
        e.0 = ldm_name(&e.0);
        if e.0 == "decoder.up.2.block.0.conv1.weight" {
            e.2 = vec![32, 32, 9];
        }
    }
    assert_refused(
        &t.bytes(),
        &["decoder.up_blocks.0.resnets.0.conv1.weight (decoder.up.2.block.0.conv1.weight in the file)"],
    );
    Ok(())
}

#[test]
fn encoder_keys_are_ignored() -> Result<()> {
    let (want, _) = decode_fixture(&fixture().bytes())?;
    let mut t = fixture();
    let bias = 1f32.to_le_bytes().to_vec();
    t.entries.push((
        "encoder.conv_in.bias".into(),
        Dtype::F32,
        vec![1],
        bias.clone(),
    ));
    t.entries
        .push(("quant_conv.bias".into(), Dtype::F32, vec![1], bias));
    let (got, _) = decode_fixture(&t.bytes())?;
    assert_eq!(got, want);
    Ok(())
}

/// A whole Stable Diffusion checkpoint is mostly UNet: the decoder reads its own tensors from the
/// file and nothing else. Here the fixture's decoder sits in front of a 32 GiB UNet tensor (a
/// sparse file: its length set, nothing written), more than this machine's memory; loading it
/// reads the decoder only and decodes as the fixture does.
#[test]
fn a_checkpoint_larger_than_memory_is_read_for_its_decoder_only() -> Result<()> {
    let (want, _) = decode_fixture(&fixture().bytes())?;
    let t = fixture();
    let huge_bytes = 32u64 << 30;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(&t.meta)?);
    let mut offset = 0u64;
    for (name, dtype, shape, bytes) in &t.entries {
        let end = offset + bytes.len() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    header.insert(
        "model.diffusion_model.output_blocks.0.0.weight".into(),
        serde_json::json!({
            "dtype": "F32",
            "shape": [8, 1u64 << 30],
            "data_offsets": [offset, offset + huge_bytes],
        }),
    );
    let header = serde_json::to_string(&header)?;
    let dir = std::env::temp_dir().join(format!("fora-vae-sparse-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("sd-checkpoint.safetensors");
    let written = (|| -> Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(header.as_bytes())?;
        for (_, _, _, bytes) in &t.entries {
            file.write_all(bytes)?;
        }
        file.set_len(8 + header.len() as u64 + offset + huge_bytes)?;
        Ok(())
    })();
    let loaded = written.and_then(|()| VaeDecoder::load(&path));
    std::fs::remove_dir_all(&dir)?;
    let io = TensorFile::open(IO)?;
    let z = io.f32("latents", 4)?;
    let (got, _) = loaded?.decode(&z.data, z.shape.try_into().unwrap())?;
    assert_eq!(got, want);
    Ok(())
}

/// `bytes` is refused with a message holding every one of `needles`.
fn assert_refused(bytes: &[u8], needles: &[&str]) {
    let err = match VaeDecoder::from_bytes(bytes) {
        Ok(_) => panic!("accepted; expected an error with {needles:?}"),
        Err(e) => format!("{e:#}"),
    };
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}: {err}");
    }
}

#[test]
fn bad_files_are_refused_by_name() {
    let mut t = fixture();
    t.remove("decoder.conv_out.bias");
    assert_refused(&t.bytes(), &["missing key decoder.conv_out.bias"]);

    let mut t = fixture();
    t.remove("decoder.mid_block.attentions.0.to_k.weight");
    assert_refused(&t.bytes(), &["to_k.weight", "key.weight"]);

    let mut t = fixture();
    let e = t
        .entries
        .iter_mut()
        .find(|e| e.0 == "decoder.up_blocks.1.resnets.0.conv2.weight")
        .unwrap();
    e.2 = vec![32, 32, 9];
    assert_refused(
        &t.bytes(),
        &[
            "decoder.up_blocks.1.resnets.0.conv2.weight",
            "[32, 32, 3, 3]",
        ],
    );

    let mut t = fixture();
    t.entries.push((
        "decoder.up_blocks.0.extra.weight".into(),
        Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    assert_refused(&t.bytes(), &["unexpected decoder keys", "extra.weight"]);

    let mut t = fixture();
    t.meta.insert("fora.vae.groups".into(), "5".into());
    assert_refused(&t.bytes(), &["5 groups", "fora.vae.groups"]);
    t.meta.insert("fora.vae.groups".into(), "eight".into());
    assert_refused(&t.bytes(), &["fora.vae.groups", "eight"]);

    let mut t = fixture();
    t.meta.insert("fora.vae.scaling_factor".into(), "0".into());
    assert_refused(&t.bytes(), &["scaling_factor"]);

    let mut t = fixture();
    let e = t
        .entries
        .iter_mut()
        .find(|e| e.0 == "decoder.conv_in.bias")
        .unwrap();
    e.3[..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    assert_refused(&t.bytes(), &["decoder.conv_in.bias", "non-finite"]);

    let bytes = fixture().bytes();
    assert_refused(&bytes[..bytes.len() / 2], &["not a valid safetensors file"]);

    // A DiT checkpoint is not a VAE.
    let dit = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sample_model.safetensors"
    ))
    .unwrap();
    assert_refused(&dit, &["not the weights of a VAE decoder"]);
}

#[test]
fn latents_that_do_not_fit_are_refused() -> Result<()> {
    let vae = VaeDecoder::load(MODEL)?;
    let err = |shape: [usize; 4], len: usize| {
        format!("{:#}", vae.decode(&vec![0.5; len], shape).unwrap_err())
    };
    assert!(err([1, 3, 4, 4], 48).contains("3 channels; this VAE decodes 4"));
    assert!(err([0, 4, 4, 4], 0).contains("empty dimension"));
    assert!(err([1, 4, 4, 4], 63).contains("need 64 values, got 63"));
    assert!(err([1, 4, usize::MAX / 2, 4], 0).contains("too large"));
    Ok(())
}
