//! The sampler loop on a small mock backend (cheap arithmetic standing in for the DiT): step
//! order and timesteps, the FORA schedule, determinism, seeds vs noise files, request
//! validation. The real backends are tested against each other in their own suites.

use anyhow::{ensure, Result};
use fora::backend::{Backend, Guidance, GuidanceMode, NoiseSource, SamplePlan, StepMode, StepSpec};
use fora::cache::{CachePolicy, NoCache, StaticInterval, StepMask};
use fora::config::{Arch, DitConfig};
use fora::diffusion::{apply_update, space_timesteps};
use fora::rng::fill_normal;
use fora::sampler::{fill_initial_noise, fill_step_noise, reuse_runs, Sampler, SamplerOptions};
use std::cell::RefCell;

/// A stand-in model: a "block" term that depends on x (cached on compute steps, reused
/// otherwise) plus a term in t and the class, so that caching, timesteps and labels all change
/// the result.
struct MockBackend {
    config: DitConfig,
    /// (k, i, t, mode) of every step, in order.
    log: RefCell<Vec<(usize, usize, i64, StepMode)>>,
    /// reuse_ahead of every step, in order.
    ahead: RefCell<Vec<usize>>,
    /// `reuses` of every plan a workspace was made for.
    reuses: RefCell<Vec<bool>>,
}

struct MockWorkspace {
    classes: Vec<usize>,
    noise_source: NoiseSource,
    x: Vec<f32>,
    cache: Vec<f32>,
    cache_valid: bool,
    model_out: Vec<f32>,
    noise: Vec<f32>,
}

impl MockBackend {
    fn new(learn_sigma: bool) -> MockBackend {
        let arch = Arch::parse("depth=1,hidden=8,heads=2,patch=2").unwrap();
        MockBackend {
            config: DitConfig::from_arch(&arch, 3, 4, 10, learn_sigma).unwrap(),
            log: RefCell::new(Vec::new()),
            ahead: RefCell::new(Vec::new()),
            reuses: RefCell::new(Vec::new()),
        }
    }
}

impl Backend for MockBackend {
    type Workspace = MockWorkspace;

    fn name(&self) -> String {
        "mock".into()
    }
    fn config(&self) -> &DitConfig {
        &self.config
    }
    fn workspace(&self, plan: &SamplePlan) -> Result<MockWorkspace> {
        self.reuses.borrow_mut().push(plan.reuses);
        let n = plan.images() * self.config.image_len();
        let mut x = vec![0.0; n];
        fill_initial_noise(&plan.noise, &mut x)?;
        Ok(MockWorkspace {
            classes: plan.classes.clone(),
            noise_source: plan.noise.clone(),
            x,
            cache: vec![0.0; n],
            cache_valid: false,
            model_out: vec![0.0; plan.images() * self.config.out_len()],
            noise: vec![0.0; n],
        })
    }
    fn step(&self, ws: &mut MockWorkspace, step: &StepSpec) -> Result<()> {
        self.log
            .borrow_mut()
            .push((step.k, step.i, step.t, step.mode));
        self.ahead.borrow_mut().push(step.reuse_ahead);
        match step.mode {
            StepMode::Compute => {
                for (c, &x) in ws.cache.iter_mut().zip(&ws.x) {
                    *c = 0.5 * (1.3 * x).sin();
                }
                ws.cache_valid = true;
            }
            StepMode::Reuse => ensure!(ws.cache_valid, "reuse before any compute step"),
        }
        let (image, out) = (self.config.image_len(), self.config.out_len());
        for (b, &class) in ws.classes.iter().enumerate() {
            for j in 0..image {
                let idx = b * image + j;
                let eps =
                    ws.cache[idx] + 0.3 * ws.x[idx] + 1e-4 * step.t as f32 + 0.01 * class as f32;
                ws.model_out[b * out + j] = eps;
                if self.config.learn_sigma {
                    ws.model_out[b * out + image + j] = (0.2 * ws.x[idx]).tanh();
                }
            }
        }
        fill_step_noise(&ws.noise_source, step.k, &mut ws.noise)?;
        let hw = self.config.input_size * self.config.input_size;
        apply_update(
            &step.update,
            self.config.learn_sigma,
            self.config.in_channels,
            hw,
            &mut ws.x,
            &ws.model_out,
            &ws.noise,
        );
        Ok(())
    }
    fn latents(&self, ws: &mut MockWorkspace) -> Result<Vec<f32>> {
        Ok(ws.x.clone())
    }
    fn forward(&self, _: &[f32], _: &[i64], _: &[usize], _: Option<Guidance>) -> Result<Vec<f32>> {
        anyhow::bail!("the mock backend has no forward")
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn steps_run_in_order_with_original_timesteps() {
    let backend = MockBackend::new(true);
    let sampler = Sampler::new(&backend, SamplerOptions::ddpm(250)).unwrap();
    let out = sampler
        .sample(&[1, 2], NoiseSource::Seed(5), &mut NoCache)
        .unwrap();
    let log = backend.log.borrow();
    let respaced = space_timesteps(1000, "250").unwrap();
    assert_eq!(log.len(), 250);
    for (k, &(lk, i, t, mode)) in log.iter().enumerate() {
        assert_eq!((lk, i), (k, 249 - k));
        assert_eq!(t, respaced[i] as i64);
        assert_eq!(mode, StepMode::Compute);
    }
    assert_eq!(out.shape, [2, 3, 4, 4]);
    assert_eq!(
        (out.stats.computed, out.stats.reused, out.stats.steps),
        (250, 0, 250)
    );
    assert!(out.latents.iter().all(|v| v.is_finite()));
}

#[test]
fn fora_static_schedule_counts() {
    for (n, want) in [(1, 250), (2, 126), (3, 84), (4, 64), (5, 51), (6, 43)] {
        let backend = MockBackend::new(true);
        let sampler = Sampler::new(&backend, SamplerOptions::ddpm(250)).unwrap();
        let mut policy = StaticInterval::new(n).unwrap();
        let out = sampler
            .sample(&[0], NoiseSource::Seed(1), &mut policy)
            .unwrap();
        assert_eq!(out.stats.computed, want, "N={n}");
        assert_eq!(out.stats.reused, 250 - want, "N={n}");
        assert_eq!(out.stats.policy, format!("fora-static N={n}"));
        let computed_by_backend = backend
            .log
            .borrow()
            .iter()
            .filter(|e| e.3 == StepMode::Compute)
            .count();
        assert_eq!(computed_by_backend, want);
        // The workspace is told whether the cache is ever read (the CPU backend leaves it
        // out at N = 1).
        assert_eq!(*backend.reuses.borrow(), [n > 1], "N={n}");
    }
}

#[test]
fn first_step_always_computes() {
    let backend = MockBackend::new(false);
    let sampler = Sampler::new(&backend, SamplerOptions::ddim(10, 0.0)).unwrap();
    let mut never = StepMask {
        compute: vec![false; 10],
    };
    let out = sampler
        .sample(&[3], NoiseSource::Seed(2), &mut never)
        .unwrap();
    assert_eq!((out.stats.computed, out.stats.reused), (1, 9));
    assert_eq!(backend.log.borrow()[0].3, StepMode::Compute);
}

#[test]
fn same_seed_same_bits_different_seed_differs() {
    let backend = MockBackend::new(true);
    let sampler = Sampler::new(&backend, SamplerOptions::ddpm(50)).unwrap();
    let run = |seed| {
        let mut policy = StaticInterval::new(3).unwrap();
        sampler
            .sample(&[4, 9], NoiseSource::Seed(seed), &mut policy)
            .unwrap()
            .latents
    };
    let (a, b, c) = (run(11), run(11), run(12));
    assert_eq!(bits(&a), bits(&b));
    let equal = a.iter().zip(&c).filter(|(x, y)| x == y).count();
    assert!(
        equal < a.len() / 10,
        "{equal} of {} values equal across seeds",
        a.len()
    );
}

#[test]
fn noise_file_with_the_seed_numbers_gives_the_seed_result() {
    let backend = MockBackend::new(true);
    let sampler = Sampler::new(&backend, SamplerOptions::ddpm(20)).unwrap();
    let classes = [7, 0, 5];
    let n = classes.len() * backend.config.image_len();
    let mut x_t = vec![0.0; n];
    fill_normal(99, 0, &mut x_t);
    let mut noise = vec![0.0; 20 * n];
    for (k, slab) in noise.chunks_mut(n).enumerate() {
        fill_normal(99, k as u64 + 1, slab);
    }
    let mut p1 = StaticInterval::new(2).unwrap();
    let from_seed = sampler
        .sample(&classes, NoiseSource::Seed(99), &mut p1)
        .unwrap();
    let mut p2 = StaticInterval::new(2).unwrap();
    let from_file = sampler
        .sample(&classes, NoiseSource::File { x_t, noise }, &mut p2)
        .unwrap();
    assert_eq!(bits(&from_seed.latents), bits(&from_file.latents));
}

#[test]
fn caching_and_sampler_kind_change_the_result() {
    let backend = MockBackend::new(true);
    let run = |options: SamplerOptions, policy: &mut dyn CachePolicy| {
        Sampler::new(&backend, options)
            .unwrap()
            .sample(&[1], NoiseSource::Seed(3), policy)
            .unwrap()
            .latents
    };
    let plain = run(SamplerOptions::ddpm(30), &mut NoCache);
    let cached = run(
        SamplerOptions::ddpm(30),
        &mut StaticInterval::new(3).unwrap(),
    );
    let ddim = run(SamplerOptions::ddim(30, 0.0), &mut NoCache);
    assert_ne!(bits(&plain), bits(&cached));
    assert_ne!(bits(&plain), bits(&ddim));
}

#[test]
fn bad_requests_are_clear_errors() {
    let backend = MockBackend::new(true);
    let sampler = Sampler::new(&backend, SamplerOptions::ddpm(5)).unwrap();
    let err = |r: Result<fora::sampler::Samples>| format!("{:#}", r.expect_err("should fail"));

    let e = err(sampler.sample(&[10], NoiseSource::Seed(0), &mut NoCache));
    assert!(e.contains("class 10") && e.contains("10 classes"), "{e}");
    let e = err(sampler.sample(&[], NoiseSource::Seed(0), &mut NoCache));
    assert!(e.contains("no classes"), "{e}");

    let n = backend.config.image_len();
    let file = |x_len: usize, noise_len: usize| NoiseSource::File {
        x_t: vec![0.5; x_len],
        noise: vec![0.5; noise_len],
    };
    let e = err(sampler.sample(&[1], file(n + 1, 5 * n), &mut NoCache));
    assert!(e.contains("x_T has"), "{e}");
    let e = err(sampler.sample(&[1], file(n, 4 * n), &mut NoCache));
    assert!(e.contains("noise has") && e.contains("S=5"), "{e}");
    let mut bad = file(n, 5 * n);
    if let NoiseSource::File { noise, .. } = &mut bad {
        noise[7] = f32::NAN;
    }
    let e = err(sampler.sample(&[1], bad, &mut NoCache));
    assert!(e.contains("not finite"), "{e}");

    assert!(Sampler::new(&backend, SamplerOptions::ddpm(0)).is_err());
    assert!(Sampler::new(&backend, SamplerOptions::ddpm(1001)).is_err());
    let nan_cfg = SamplerOptions::ddpm(5).with_guidance(Some(Guidance {
        scale: f32::NAN,
        mode: GuidanceMode::Official3,
    }));
    assert!(Sampler::new(&backend, nan_cfg).is_err());
}

/// A backend whose third step fails.
struct Failing {
    config: DitConfig,
}

impl Backend for Failing {
    type Workspace = usize;
    fn name(&self) -> String {
        "failing".into()
    }
    fn config(&self) -> &DitConfig {
        &self.config
    }
    fn workspace(&self, _: &SamplePlan) -> Result<usize> {
        Ok(0)
    }
    fn step(&self, steps_done: &mut usize, step: &StepSpec) -> Result<()> {
        ensure!(step.k < 2, "device on fire");
        *steps_done += 1;
        Ok(())
    }
    fn latents(&self, _: &mut usize) -> Result<Vec<f32>> {
        Ok(vec![])
    }
    fn forward(&self, _: &[f32], _: &[i64], _: &[usize], _: Option<Guidance>) -> Result<Vec<f32>> {
        Ok(vec![])
    }
}

#[test]
fn backend_errors_name_the_step() {
    let backend = Failing {
        config: MockBackend::new(true).config,
    };
    let sampler = Sampler::new(&backend, SamplerOptions::ddpm(4)).unwrap();
    let e = format!(
        "{:#}",
        sampler
            .sample(&[1], NoiseSource::Seed(0), &mut NoCache)
            .expect_err("the third step fails")
    );
    assert!(
        e.contains("step 2") && e.contains("t = 333") && e.contains("device on fire"),
        "{e}"
    );
}

#[test]
fn progress_events_follow_the_loop() {
    let backend = MockBackend::new(true);
    let sampler = Sampler::new(&backend, SamplerOptions::ddpm(12)).unwrap();
    let mut events = Vec::new();
    let mut policy = StaticInterval::new(4).unwrap();
    sampler
        .sample_with_progress(&[2], NoiseSource::Seed(4), &mut policy, &mut |e| {
            events.push((e.k, e.i, e.steps, e.mode))
        })
        .unwrap();
    assert_eq!(events.len(), 12);
    for (k, &(ek, i, steps, mode)) in events.iter().enumerate() {
        assert_eq!((ek, i, steps), (k, 11 - k, 12));
        let want = if i == 11 || i % 4 == 0 {
            StepMode::Compute
        } else {
            StepMode::Reuse
        };
        assert_eq!(mode, want, "k={k}");
    }
}

/// Where the committed fixtures are: `FORA_ROOT` or the working directory (the package root
/// under `cargo test`), never a compiled-in path.
fn fixture(name: &str) -> std::path::PathBuf {
    let root = std::env::var("FORA_ROOT").unwrap_or_else(|_| ".".into());
    std::path::Path::new(&root)
        .join("tests/fixtures")
        .join(name)
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The "Done when" check of the foundation issue, kept as a fixture: the OFFICIAL DiT code
/// (models.py + diffusion/, run by tools/oracle_sample.py --make-fixture with the FORA static
/// schedule wrapped around its blocks) sampled a tiny random DiT for 50 steps from a noise
/// file; the CPU backend through the sampler must agree to rel-L2 <= 1e-4.
#[test]
fn fifty_steps_match_the_official_code() {
    use fora::cpu::CpuBackend;
    use fora::io::TensorFile;
    use fora::weights::DitWeights;

    let (config, weights) = DitWeights::load(fixture("sample_model.safetensors"), None).unwrap();
    let backend = CpuBackend::new(config, weights).unwrap();
    let noise_file = TensorFile::open(fixture("sample_noise.safetensors")).unwrap();
    let noise = NoiseSource::File {
        x_t: noise_file.f32("x_T", 4).unwrap().data,
        noise: noise_file.f32("noise", 5).unwrap().data,
    };
    let expected = TensorFile::open(fixture("sample_expected.safetensors")).unwrap();
    let guidance = |scale, mode| Some(Guidance { scale, mode });
    let cases = [
        (
            "ddpm_cfg4_fora3",
            SamplerOptions::ddpm(50).with_guidance(guidance(4.0, GuidanceMode::Official3)),
            3,
            18,
        ),
        ("ddpm_plain", SamplerOptions::ddpm(50), 1, 50),
        (
            "ddim_eta05_cfg2_all_fora2",
            SamplerOptions::ddim(50, 0.5).with_guidance(guidance(2.0, GuidanceMode::AllEps)),
            2,
            26,
        ),
    ];
    let mut results = Vec::new();
    for (name, options, interval, computed) in cases {
        let want = expected.f32(name, 4).unwrap();
        let sampler = Sampler::new(&backend, options).unwrap();
        let mut policy = fora::cache::policy_for_interval(interval).unwrap();
        let got = sampler
            .sample(&[3, 9], noise.clone(), policy.as_mut())
            .unwrap();
        assert_eq!(got.shape.to_vec(), want.shape, "{name}");
        assert_eq!(got.stats.computed, computed, "{name}");
        let err = rel_l2(&got.latents, &want.data);
        eprintln!("{name}: rel-L2 vs official {err:.3e}");
        assert!(err <= 1e-4, "{name}: rel-L2 {err:e} vs the official code");
        results.push(got.latents);
    }
    // The check can fail: caching visibly changes the result.
    let uncached = Sampler::new(
        &backend,
        SamplerOptions::ddpm(50).with_guidance(guidance(4.0, GuidanceMode::Official3)),
    )
    .unwrap()
    .sample(&[3, 9], noise, &mut NoCache)
    .unwrap();
    let gap = rel_l2(&uncached.latents, &results[0]);
    assert!(gap > 1e-3, "FORA N=3 vs no cache differ by only {gap:e}");
}

#[test]
fn reuse_steps_know_the_rest_of_their_run() {
    use StepMode::{Compute as C, Reuse as R};
    assert_eq!(reuse_runs(&[C, R, R, C, R]), [0, 1, 0, 0, 0]);
    assert_eq!(reuse_runs(&[C, R, R, R, R]), [0, 3, 2, 1, 0]);
    assert_eq!(reuse_runs(&[C, C]), [0, 0]);
    assert!(reuse_runs(&[]).is_empty());

    // The sampler hands every step the rest of its run, per the policy's schedule (the official
    // N=3 over 10 steps computes at i = 9, 6, 3, 0: k = 0, 3, 6, 9).
    let backend = MockBackend::new(true);
    let sampler = Sampler::new(&backend, SamplerOptions::ddpm(10)).unwrap();
    let mut policy = StaticInterval::new(3).unwrap();
    sampler
        .sample(&[1], NoiseSource::Seed(3), &mut policy)
        .unwrap();
    assert_eq!(*backend.ahead.borrow(), [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]);
    let modes: Vec<StepMode> = backend.log.borrow().iter().map(|e| e.3).collect();
    assert_eq!(modes, [C, R, R, C, R, R, C, R, R, C]);

    // Sampler::schedule (what the tuner times a window of) is the loop's steps exactly.
    let schedule = sampler.schedule(&mut StaticInterval::new(3).unwrap());
    let steps: Vec<(usize, usize, i64, StepMode)> =
        schedule.iter().map(|s| (s.k, s.i, s.t, s.mode)).collect();
    assert_eq!(steps, *backend.log.borrow());
    let ahead: Vec<usize> = schedule.iter().map(|s| s.reuse_ahead).collect();
    assert_eq!(ahead, *backend.ahead.borrow());
    // 30 steps at N = 3: i = 29 - k computes at 29, 27, 24, 21, ... (the tuner's GPU test
    // relies on it).
    let sampler = Sampler::new(&backend, SamplerOptions::ddpm(30)).unwrap();
    let modes: Vec<StepMode> = sampler
        .schedule(&mut StaticInterval::new(3).unwrap())
        .iter()
        .map(|s| s.mode)
        .collect();
    assert_eq!(modes[..9], [C, R, C, R, R, C, R, R, C]);
}
