//! The library API end to end, with no download: build a random-weight DiT-S/2 (256 px latents,
//! 1000 classes), sample two classes with classifier-free guidance and FORA (N = 3) on the CPU
//! reference backend, print the stats, and save the checkpoint so that the `fora` CLI can use it.
//!
//! ```text
//! cargo run --release --example sample                  # 50 DDPM steps
//! cargo run --release --example sample -- 250 ckpt.safetensors
//! ```
//!
//! Random weights draw noise-like latents, not pictures: this shows the API and the speed, not
//! image quality.

use anyhow::{Context, Result};
use fora::backend::{Guidance, GuidanceMode, NoiseSource};
use fora::cache::StaticInterval;
use fora::config::DitConfig;
use fora::cpu::CpuBackend;
use fora::sampler::{Sampler, SamplerOptions};
use fora::weights::DitWeights;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: usize = match args.next() {
        Some(s) => s
            .parse()
            .with_context(|| format!("steps {s:?} is not a number"))?,
        None => 50,
    };
    // Beside the build outputs when run from the repository, else in the temp directory.
    let checkpoint = args.next().unwrap_or_else(|| {
        let dir = if std::path::Path::new("target").is_dir() {
            std::path::PathBuf::from("target")
        } else {
            std::env::temp_dir()
        };
        dir.join("dit-s2-random.safetensors").display().to_string()
    });

    // A model: here random weights; `DitWeights::load(path, arch)` reads a real checkpoint.
    let config = DitConfig::official("DiT-S/2", 32)?;
    let weights = DitWeights::random(&config, 0)?;
    weights.save(&checkpoint, &config)?;
    let backend = CpuBackend::new(config, weights)?;

    // A sampler: DDPM over `steps` respaced steps, guidance 4.0 on the official channels.
    let options = SamplerOptions::ddpm(steps).with_guidance(Some(Guidance {
        scale: 4.0,
        mode: GuidanceMode::Official3,
    }));
    let sampler = Sampler::new(&backend, options)?;

    // Sample two classes from seed 0 with the official FORA schedule, N = 3.
    let mut policy = StaticInterval::new(3)?;
    let out =
        sampler.sample_with_progress(&[207, 360], NoiseSource::Seed(0), &mut policy, &mut |e| {
            if e.k % 10 == 0 || e.k + 1 == e.steps {
                eprintln!("step {:>3}/{} t={:>3} {:?}", e.k + 1, e.steps, e.t, e.mode);
            }
        })?;

    let s = &out.stats;
    let mean_abs =
        out.latents.iter().map(|v| v.abs() as f64).sum::<f64>() / out.latents.len() as f64;
    println!(
        "sampled latents {:?} on {}: {} steps, {} computed, {} reused ({}), {:.2} s (setup {:.3} s); mean |x| = {mean_abs:.4}",
        out.shape,
        s.backend,
        s.steps,
        s.computed,
        s.reused,
        s.policy,
        s.wall.as_secs_f64(),
        s.setup.as_secs_f64()
    );
    println!(
        "checkpoint written to {checkpoint}; try:\n  cargo run --release -- sample --model {checkpoint} --class 207 --cfg-scale 4 --cache-interval 3 --steps {steps} --out samples.safetensors"
    );
    Ok(())
}
