//! The CPU reference against outputs of the OFFICIAL DiT code (facebookresearch/DiT models.py),
//! stored in tests/fixtures by tools/make_oracle_fixtures.py: plain forward, forward_with_cfg
//! (official 3-channel guidance and all-eps guidance) at rel-L2 <= 1e-5, and a FORA reuse step
//! against tools/dit_torch.py (the official code has no FORA).

use anyhow::{bail, ensure, Context, Result};
use fora::backend::{Backend, Guidance, GuidanceMode, StepMode};
use fora::cpu::model::{Activations, FeatureCache};
use fora::cpu::CpuBackend;
use fora::weights::DitWeights;
use safetensors::tensor::{Dtype, SafeTensors};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    let root = std::env::var_os("FORA_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    root.join("tests").join("fixtures")
}

fn f32s(st: &SafeTensors, key: &str) -> Result<Vec<f32>> {
    let v = st
        .tensor(key)
        .with_context(|| format!("fixture tensor {key}"))?;
    ensure!(
        v.dtype() == Dtype::F32,
        "fixture {key}: dtype {}",
        v.dtype()
    );
    Ok(v.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn i64s(st: &SafeTensors, key: &str) -> Result<Vec<i64>> {
    let v = st
        .tensor(key)
        .with_context(|| format!("fixture tensor {key}"))?;
    if v.dtype() != Dtype::I64 {
        bail!("fixture {key}: dtype {}", v.dtype());
    }
    Ok(v.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect())
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn check(name: &str) -> Result<()> {
    let dir = fixtures();
    let (cfg, w) = DitWeights::load(dir.join(format!("oracle_{name}.model.safetensors")), None)?;
    let io_bytes = std::fs::read(dir.join(format!("oracle_{name}.io.safetensors")))
        .with_context(|| format!("reading fixtures in {} (set FORA_ROOT?)", dir.display()))?;
    let io = SafeTensors::deserialize(&io_bytes)?;
    let x = f32s(&io, "x")?;
    let t = i64s(&io, "t")?;
    let y: Vec<usize> = i64s(&io, "y")?.into_iter().map(|v| v as usize).collect();
    let scale = f32s(&io, "cfg_scale")?[0];
    let be = CpuBackend::new(cfg.clone(), w)?;

    let mut results = Vec::new();
    results.push(("forward", be.forward(&x, &t, &y, None)?, f32s(&io, "out")?));
    for (key, mode) in [
        ("out_cfg", GuidanceMode::Official3),
        ("out_cfg_all", GuidanceMode::AllEps),
    ] {
        let g = Guidance { scale, mode };
        results.push((key, be.forward(&x, &t, &y, Some(g))?, f32s(&io, key)?));
    }
    // FORA: compute on (x, t, y), reuse on (x2, t2, y), against tools/dit_torch.py.
    let n = t.len();
    let mut acts = Activations::new(&cfg, n)?;
    let mut cache = FeatureCache::new(&cfg, n)?;
    be.forward_into(&mut acts, Some(&mut cache), StepMode::Compute, &x, &t, &y)?;
    let (x2, t2) = (f32s(&io, "x2")?, i64s(&io, "t2")?);
    acts.out.iter_mut().for_each(|v| *v = f32::NAN);
    be.forward_into(&mut acts, Some(&mut cache), StepMode::Reuse, &x2, &t2, &y)?;
    results.push((
        "reuse (dit_torch)",
        acts.out.clone(),
        f32s(&io, "out_reuse")?,
    ));

    for (what, ours, theirs) in results {
        ensure!(
            ours.len() == theirs.len(),
            "{name} {what}: {} vs {} values",
            ours.len(),
            theirs.len()
        );
        ensure!(
            ours.iter().all(|v| v.is_finite()),
            "{name} {what}: non-finite output"
        );
        let e = rel_l2(&ours, &theirs);
        println!("oracle {name} {what}: rel-L2 {e:.2e}");
        ensure!(e <= 1e-5, "oracle {name} {what}: rel-L2 {e:.3e} > 1e-5");
    }
    Ok(())
}

#[test]
fn official_dit_learned_sigma_4_channels() {
    check("a").unwrap();
}

#[test]
fn official_dit_fixed_sigma_3_channels_patch_4() {
    check("b").unwrap();
}
