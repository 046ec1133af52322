//! Forward invariants of the CPU reference on small configurations (odd sizes included).

use fora::backend::{Backend, Guidance, GuidanceMode, StepMode};
use fora::config::{Arch, DitConfig};
use fora::cpu::model::{Activations, FeatureCache};
use fora::cpu::{ops, CpuBackend};
use fora::weights::DitWeights;

/// Uniform-ish pseudo-random values in [-1, 1), never all zero.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// depth 2, hidden 48, heads 3 (head_dim 16), input 6, patch 2: a 3x3 grid of 9 tokens.
fn odd_config() -> DitConfig {
    let arch = Arch::parse("depth=2,hidden=48,heads=3,patch=2").unwrap();
    DitConfig::from_arch(&arch, 4, 6, 10, true).unwrap()
}

/// 3 channels, no learned sigma, patch 4 on 8x8, 5 heads of 8.
fn other_config() -> DitConfig {
    let arch = Arch::parse("depth=3,hidden=40,heads=5,patch=4").unwrap();
    DitConfig::from_arch(&arch, 3, 8, 7, false).unwrap()
}

fn backend(cfg: &DitConfig, seed: u64) -> CpuBackend {
    CpuBackend::new(cfg.clone(), DitWeights::random(cfg, seed).unwrap()).unwrap()
}

fn inputs(cfg: &DitConfig, n: usize, seed: u64) -> (Vec<f32>, Vec<i64>, Vec<usize>) {
    let x = randn(n * cfg.image_len(), seed);
    let t = (0..n)
        .map(|i| (137 * i as i64 + 11 * seed as i64) % 1000)
        .collect();
    let y = (0..n)
        .map(|i| (i * 3 + seed as usize) % cfg.num_classes)
        .collect();
    (x, t, y)
}

#[test]
fn output_shape_finite_and_deterministic() {
    for cfg in [odd_config(), other_config()] {
        let be = backend(&cfg, 1);
        let (x, t, y) = inputs(&cfg, 3, 5);
        let out = be.forward(&x, &t, &y, None).unwrap();
        assert_eq!(out.len(), 3 * cfg.out_len());
        assert!(out.iter().all(|v| v.is_finite()));
        let rms = (out.iter().map(|v| (v * v) as f64).sum::<f64>() / out.len() as f64).sqrt();
        assert!(
            rms > 1e-2 && rms < 1e2,
            "output rms {rms} is not of a realistic size"
        );
        let again = be.forward(&x, &t, &y, None).unwrap();
        assert_eq!(out, again, "two forwards differ");
        // Rows are independent: a row's output does not depend on its batch mates.
        let img = cfg.image_len();
        let one = be
            .forward(&x[img..2 * img], &t[1..2], &y[1..2], None)
            .unwrap();
        let o = cfg.out_len();
        assert!(rel_l2(&one, &out[o..2 * o]) < 1e-6);
    }
}

#[test]
fn every_input_matters() {
    let cfg = odd_config();
    let be = backend(&cfg, 2);
    let (x, t, y) = inputs(&cfg, 2, 9);
    let base = be.forward(&x, &t, &y, None).unwrap();
    let mut x2 = x.clone();
    x2[5] += 0.5;
    let t2: Vec<i64> = t.iter().map(|v| v + 1).collect();
    let y2: Vec<usize> = y.iter().map(|v| (v + 1) % cfg.num_classes).collect();
    for (name, out) in [
        ("x", be.forward(&x2, &t, &y, None).unwrap()),
        ("t", be.forward(&x, &t2, &y, None).unwrap()),
        ("y", be.forward(&x, &t, &y2, None).unwrap()),
    ] {
        assert!(
            rel_l2(&out, &base) > 1e-4,
            "changing {name} does not change the output"
        );
    }
}

#[test]
fn compute_then_reuse_with_same_inputs_equals_compute() {
    for cfg in [odd_config(), other_config()] {
        let be = backend(&cfg, 3);
        let (x, t, y) = inputs(&cfg, 2, 4);
        let mut acts = Activations::new(&cfg, 2).unwrap();
        let mut cache = FeatureCache::new(&cfg, 2).unwrap();
        be.forward_into(&mut acts, Some(&mut cache), StepMode::Compute, &x, &t, &y)
            .unwrap();
        let computed = acts.out.clone();
        assert_eq!(computed, be.forward(&x, &t, &y, None).unwrap());
        acts.out.iter_mut().for_each(|v| *v = f32::NAN);
        be.forward_into(&mut acts, Some(&mut cache), StepMode::Reuse, &x, &t, &y)
            .unwrap();
        // The same operations in the same order: identical bits.
        assert_eq!(acts.out, computed);
    }
}

#[test]
fn reuse_with_new_timestep_uses_current_gates_and_cached_outputs() {
    let cfg = odd_config();
    let be = backend(&cfg, 4);
    let w = be.weights();
    let (x, t1, y) = inputs(&cfg, 2, 6);
    let t2: Vec<i64> = t1.iter().map(|v| (v + 250) % 1000).collect();
    let mut x2 = x.clone();
    x2.iter_mut().for_each(|v| *v *= 0.9);
    let mut acts = Activations::new(&cfg, 2).unwrap();
    let mut cache = FeatureCache::new(&cfg, 2).unwrap();
    be.forward_into(&mut acts, Some(&mut cache), StepMode::Compute, &x, &t1, &y)
        .unwrap();
    let cached_attn = cache.attn.clone();
    be.forward_into(&mut acts, Some(&mut cache), StepMode::Reuse, &x2, &t2, &y)
        .unwrap();
    let reused = acts.out.clone();
    assert_eq!(
        cache.attn, cached_attn,
        "a reuse step must not write the cache"
    );
    let full = be.forward(&x2, &t2, &y, None).unwrap();
    assert!(
        rel_l2(&reused, &full) > 1e-4,
        "reuse equals a full step: cache unused?"
    );

    // Hand-built expectation, written out from the definitions: embeddings of (x2, t2, y),
    // then per layer x += gate_msa(t2) * A_l(t1); x += gate_mlp(t2) * M_l(t1), then the final
    // layer with t2's shift/scale.
    let (n, d, tk) = (2, cfg.hidden, cfg.tokens());
    let feat = cfg.in_channels * cfg.patch * cfg.patch;
    let mut patches = vec![0f32; n * tk * feat];
    ops::patchify(
        &mut patches,
        &x2,
        n,
        cfg.in_channels,
        cfg.input_size,
        cfg.patch,
    );
    let mut h = vec![0f32; n * tk * d];
    for r in 0..n * tk {
        for j in 0..d {
            let mut s = w.x_embed_b[j] as f64 + w.pos_embed[(r % tk) * d + j] as f64;
            for k in 0..feat {
                s += patches[r * feat + k] as f64 * w.x_embed_w[j * feat + k] as f64;
            }
            h[r * d + j] = s as f32;
        }
    }
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let lin = |inp: &[f64], wm: &[f32], b: &[f32], out: usize| -> Vec<f64> {
        (0..out)
            .map(|j| {
                b[j] as f64
                    + inp
                        .iter()
                        .zip(&wm[j * inp.len()..(j + 1) * inp.len()])
                        .map(|(a, b)| a * *b as f64)
                        .sum::<f64>()
            })
            .collect()
    };
    let mut feats = vec![0f32; n * 256];
    ops::timestep_features(&t2, &mut feats);
    let mut expected = vec![0f32; n * cfg.out_len()];
    let mut hs: Vec<f64> = h.iter().map(|&v| v as f64).collect();
    for r in 0..n {
        let f: Vec<f64> = feats[r * 256..(r + 1) * 256]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let t_h: Vec<f64> = lin(&f, &w.t_mlp0_w, &w.t_mlp0_b, d)
            .into_iter()
            .map(silu)
            .collect();
        let temb = lin(&t_h, &w.t_mlp2_w, &w.t_mlp2_b, d);
        let c: Vec<f64> = (0..d)
            .map(|j| temb[j] + w.y_table[y[r] * d + j] as f64)
            .collect();
        let sc: Vec<f64> = c.iter().map(|&v| silu(v)).collect();
        let len = n * tk * d;
        for (l, b) in w.blocks.iter().enumerate() {
            let m = lin(&sc, &b.ada_w, &b.ada_b, 6 * d);
            for tok in 0..tk {
                for j in 0..d {
                    let idx = (r * tk + tok) * d + j;
                    hs[idx] += m[2 * d + j] * cache.attn[l * len + idx] as f64;
                    hs[idx] += m[5 * d + j] * cache.mlp[l * len + idx] as f64;
                }
            }
        }
        let fm = lin(&sc, &w.final_ada_w, &w.final_ada_b, 2 * d);
        let p = cfg.patch;
        let oc = cfg.out_channels();
        for tok in 0..tk {
            let row = &hs[(r * tk + tok) * d..(r * tk + tok + 1) * d];
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            let normed: Vec<f64> = (0..d)
                .map(|j| (row[j] - mean) / (var + 1e-6).sqrt() * (1.0 + fm[d + j]) + fm[j])
                .collect();
            let o = lin(&normed, &w.final_w, &w.final_b, cfg.patch_out());
            let (gy, gx) = (tok / cfg.grid(), tok % cfg.grid());
            for i in 0..p {
                for jj in 0..p {
                    for ch in 0..oc {
                        let (yy, xx) = (gy * p + i, gx * p + jj);
                        expected[((r * oc + ch) * cfg.input_size + yy) * cfg.input_size + xx] =
                            o[(i * p + jj) * oc + ch] as f32;
                    }
                }
            }
        }
    }
    let err = rel_l2(&reused, &expected);
    assert!(
        err < 1e-5,
        "reuse step vs hand-built expectation: rel-L2 {err}"
    );
}

#[test]
fn reuse_needs_a_filled_cache() {
    let cfg = odd_config();
    let be = backend(&cfg, 5);
    let (x, t, y) = inputs(&cfg, 2, 1);
    let mut acts = Activations::new(&cfg, 2).unwrap();
    let mut cache = FeatureCache::new(&cfg, 2).unwrap();
    let err = be
        .forward_into(&mut acts, Some(&mut cache), StepMode::Reuse, &x, &t, &y)
        .unwrap_err();
    assert!(err.to_string().contains("computing step"), "{err}");
    let err = be
        .forward_into(&mut acts, None, StepMode::Reuse, &x, &t, &y)
        .unwrap_err();
    assert!(err.to_string().contains("cache"), "{err}");
    let mut small = FeatureCache::new(&cfg, 1).unwrap();
    let err = be
        .forward_into(&mut acts, Some(&mut small), StepMode::Compute, &x, &t, &y)
        .unwrap_err();
    assert!(err.to_string().contains("rows"), "{err}");
}

#[test]
fn cfg_scale_one_equals_conditional_forward() {
    for cfg in [odd_config(), other_config()] {
        let be = backend(&cfg, 6);
        let (x, t, mut y) = inputs(&cfg, 4, 2);
        y[2] = cfg.null_class();
        y[3] = cfg.null_class();
        let plain = be.forward(&x, &t, &y, None).unwrap();
        // forward_with_cfg only reads the first half of x: poison the second.
        let mut xp = x.clone();
        let img = cfg.image_len();
        xp[2 * img..].iter_mut().for_each(|v| *v = f32::NAN);
        // Plain forward of [half; half]: the reference for both halves.
        let mut xx = x[..2 * img].to_vec();
        xx.extend_from_slice(&x[..2 * img]);
        let dup = be.forward(&xx, &t, &y, None).unwrap();
        for mode in [GuidanceMode::Official3, GuidanceMode::AllEps] {
            let g = Guidance { scale: 1.0, mode };
            let out = be.forward(&xp, &t, &y, Some(g)).unwrap();
            let o = cfg.out_len();
            let hw = cfg.input_size * cfg.input_size;
            let k = fora::cpu::guided_channels(&cfg, mode);
            for r in 0..4 {
                for ch in 0..cfg.out_channels() {
                    // Guided channels of both halves: uncond + 1 * (cond - uncond) = cond
                    // (to rounding); the others: the row's own value.
                    let src = if ch < k { r % 2 } else { r };
                    let a = &out[r * o + ch * hw..r * o + (ch + 1) * hw];
                    let b = &dup[src * o + ch * hw..src * o + (ch + 1) * hw];
                    let e = rel_l2(a, b);
                    assert!(e < 1e-6, "{mode:?} row {r} channel {ch}: rel-L2 {e}");
                }
            }
        }
        assert!(plain.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn official3_and_all_eps_differ_only_in_channel_3() {
    let cfg = odd_config();
    assert_eq!(cfg.in_channels, 4);
    let be = backend(&cfg, 7);
    let (x, t, mut y) = inputs(&cfg, 4, 3);
    y[2] = cfg.null_class();
    y[3] = cfg.null_class();
    let off = be
        .forward(
            &x,
            &t,
            &y,
            Some(Guidance {
                scale: 4.0,
                mode: GuidanceMode::Official3,
            }),
        )
        .unwrap();
    let all = be
        .forward(
            &x,
            &t,
            &y,
            Some(Guidance {
                scale: 4.0,
                mode: GuidanceMode::AllEps,
            }),
        )
        .unwrap();
    let (o, hw) = (cfg.out_len(), cfg.input_size * cfg.input_size);
    for r in 0..4 {
        for ch in 0..cfg.out_channels() {
            let a = &off[r * o + ch * hw..r * o + (ch + 1) * hw];
            let b = &all[r * o + ch * hw..r * o + (ch + 1) * hw];
            if ch == 3 {
                assert!(rel_l2(a, b) > 1e-3, "row {r}: channel 3 should differ");
            } else {
                assert_eq!(a, b, "row {r} channel {ch} should be identical");
            }
        }
    }
    // Guidance at scale 4 really changes the guided channels.
    let plain = be.forward(&x, &t, &y, None).unwrap();
    assert!(rel_l2(&off[..hw], &plain[..hw]) > 1e-3);
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = odd_config();
    let be = backend(&cfg, 8);
    let (x, t, mut y) = inputs(&cfg, 2, 1);
    y[1] = cfg.num_classes + 1;
    let err = be.forward(&x, &t, &y, None).unwrap_err().to_string();
    assert!(err.contains("label 11 out of range"), "{err}");
    y[1] = cfg.num_classes; // the null class is a valid label
    be.forward(&x, &t, &y, None).unwrap();
    let err = be.forward(&x[1..], &t, &y, None).unwrap_err().to_string();
    assert!(err.contains("input x has"), "{err}");
    let err = be.forward(&x, &t[..1], &y, None).unwrap_err().to_string();
    assert!(err.contains("timesteps"), "{err}");
    // Timesteps outside the diffusion's 0..999.
    for bad in [1000, 5000, -1] {
        let mut t2 = t.clone();
        t2[1] = bad;
        let err = be.forward(&x, &t2, &y, None).unwrap_err().to_string();
        assert!(err.contains(&format!("t[1] = {bad} is outside")), "{err}");
    }
    let mut t2 = t.clone();
    t2[0] = 999;
    be.forward(&x, &t2, &y, None).unwrap();
    let (x3, t3, y3) = inputs(&cfg, 3, 1);
    let g = Guidance {
        scale: 2.0,
        mode: GuidanceMode::Official3,
    };
    let err = be.forward(&x3, &t3, &y3, Some(g)).unwrap_err().to_string();
    assert!(err.contains("even number of rows"), "{err}");
    let bad = DitWeights::random(&other_config(), 1).unwrap();
    assert!(CpuBackend::new(cfg.clone(), bad).is_err());
}

/// DiT-XL/2 at 256 px, batch 2: `cargo test --release --test forward -- --ignored --nocapture`.
#[test]
#[ignore = "DiT-XL/2: 2.7 GB of weights and seconds of compute"]
fn xl2_forward_timing() {
    let cfg = DitConfig::official("DiT-XL/2", 32).unwrap();
    let be = backend(&cfg, 9);
    let (x, t, y) = inputs(&cfg, 2, 3);
    let start = std::time::Instant::now();
    let out = be.forward(&x, &t, &y, None).unwrap();
    let first = start.elapsed();
    let start = std::time::Instant::now();
    let out2 = be.forward(&x, &t, &y, None).unwrap();
    let second = start.elapsed();
    assert!(out.iter().all(|v| v.is_finite()));
    assert_eq!(out, out2);
    let rms = (out.iter().map(|v| (v * v) as f64).sum::<f64>() / out.len() as f64).sqrt();
    println!(
        "DiT-XL/2 batch 2 forward on {} threads: {:.2} s, then {:.2} s (output rms {rms:.3})",
        rayon::current_num_threads(),
        first.as_secs_f64(),
        second.as_secs_f64()
    );
    // A FORA reuse step of the same rows (single-threaded by design: it must not allocate).
    let mut acts = Activations::new(&cfg, 2).unwrap();
    let mut cache = FeatureCache::new(&cfg, 2).unwrap();
    be.forward_into(&mut acts, Some(&mut cache), StepMode::Compute, &x, &t, &y)
        .unwrap();
    assert_eq!(acts.out, out);
    let start = std::time::Instant::now();
    be.forward_into(&mut acts, Some(&mut cache), StepMode::Reuse, &x, &t, &y)
        .unwrap();
    println!(
        "DiT-XL/2 batch 2 reuse step: {:.3} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(acts.out, out);
}

fn ddpm_update(add_noise: bool) -> fora::backend::StepUpdate {
    fora::backend::StepUpdate::Ddpm {
        sqrt_recip_abar: 1.02,
        sqrt_recipm1_abar: 0.2,
        post_coef1: 0.4,
        post_coef2: 0.6,
        max_log: -4.0,
        min_log: -5.0,
        add_noise,
    }
}

fn plan(
    cfg: &DitConfig,
    noise: fora::backend::NoiseSource,
    steps: usize,
) -> fora::backend::SamplePlan {
    fora::backend::SamplePlan::new(
        vec![1, cfg.num_classes - 1],
        Some(Guidance {
            scale: 3.0,
            mode: GuidanceMode::Official3,
        }),
        steps,
        (0..steps as i64).map(|k| 999 - 100 * k).collect(),
        noise,
    )
}

/// Runs `steps` steps computing at k % 3 == 0 and returns the latents.
fn run_steps(be: &CpuBackend, p: &fora::backend::SamplePlan) -> Vec<f32> {
    use fora::backend::StepSpec;
    let mut ws = be.workspace(p).unwrap();
    for k in 0..p.steps {
        let mode = if k % 3 == 0 {
            StepMode::Compute
        } else {
            StepMode::Reuse
        };
        let spec = StepSpec {
            k,
            i: p.steps - 1 - k,
            t: p.timesteps[k],
            mode,
            update: ddpm_update(k + 1 < p.steps),
            reuse_ahead: 0,
        };
        be.step(&mut ws, &spec).unwrap();
    }
    be.latents(&mut ws).unwrap()
}

#[test]
fn sampling_steps_are_deterministic_and_use_their_noise() {
    use fora::backend::{NoiseSource, StepSpec};
    let cfg = odd_config();
    let be = backend(&cfg, 10);
    let a = run_steps(&be, &plan(&cfg, NoiseSource::Seed(7), 6));
    let b = run_steps(&be, &plan(&cfg, NoiseSource::Seed(7), 6));
    assert_eq!(a, b, "same seed, different latents");
    assert!(a.iter().all(|v| v.is_finite()));
    let c = run_steps(&be, &plan(&cfg, NoiseSource::Seed(8), 6));
    assert!(rel_l2(&c, &a) > 1e-3, "the seed does not matter");

    // A noise file drives x_T and every step's noise.
    let img = 2 * cfg.image_len();
    let file = |scale: f32| NoiseSource::File {
        x_t: randn(img, 21),
        noise: randn(6 * img, 22).iter().map(|v| v * scale).collect(),
    };
    let f1 = run_steps(&be, &plan(&cfg, file(1.0), 6));
    let f2 = run_steps(&be, &plan(&cfg, file(0.5), 6));
    assert!(rel_l2(&f1, &f2) > 1e-3, "the file's noise is not used");

    // The first step must compute; steps past the plan and bad noise files are errors.
    let p = plan(&cfg, NoiseSource::Seed(1), 2);
    let mut ws = be.workspace(&p).unwrap();
    let mut spec = StepSpec {
        k: 0,
        i: 1,
        t: 999,
        mode: StepMode::Reuse,
        update: ddpm_update(true),
        reuse_ahead: 0,
    };
    let err = be.step(&mut ws, &spec).unwrap_err().to_string();
    assert!(err.contains("first step must compute"), "{err}");
    spec.mode = StepMode::Compute;
    be.step(&mut ws, &spec).unwrap();
    spec.k = 2;
    let err = be.step(&mut ws, &spec).unwrap_err().to_string();
    assert!(err.contains("past the 2 steps"), "{err}");
    let short = NoiseSource::File {
        x_t: randn(img, 1),
        noise: randn(img, 2),
    };
    let err = be
        .workspace(&plan(&cfg, short, 2))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("noise file noise has"), "{err}");
    let mut bad_class = plan(&cfg, NoiseSource::Seed(1), 2);
    bad_class.classes[0] = cfg.num_classes;
    let err = be.workspace(&bad_class).err().unwrap().to_string();
    assert!(err.contains("class 10 out of range"), "{err}");
}

#[test]
fn a_guided_step_is_forward_with_cfg_then_the_update() {
    use fora::backend::{NoiseSource, StepSpec};
    for mode in [GuidanceMode::Official3, GuidanceMode::AllEps] {
        let cfg = odd_config();
        let be = backend(&cfg, 12);
        let img = 2 * cfg.image_len();
        let (x_t, noise) = (randn(img, 31), randn(2 * img, 32));
        let mut p = plan(
            &cfg,
            NoiseSource::File {
                x_t: x_t.clone(),
                noise: noise.clone(),
            },
            2,
        );
        p.guidance = Some(Guidance { scale: 3.0, mode });
        let mut ws = be.workspace(&p).unwrap();
        let spec = StepSpec {
            k: 1,
            i: 0,
            t: 420,
            mode: StepMode::Compute,
            update: ddpm_update(true),
            reuse_ahead: 0,
        };
        be.step(&mut ws, &spec).unwrap();
        let got = be.latents(&mut ws).unwrap();

        // By hand: official forward_with_cfg on [x; x] with labels [y; null], the conditional
        // rows, then the update with noise[k = 1].
        let xx = [x_t.clone(), x_t.clone()].concat();
        let y = [p.classes.clone(), vec![cfg.null_class(); 2]].concat();
        let out = be.forward(&xx, &[420; 4], &y, p.guidance).unwrap();
        let mut want = x_t.clone();
        fora::diffusion::apply_update(
            &spec.update,
            cfg.learn_sigma,
            cfg.in_channels,
            cfg.input_size * cfg.input_size,
            &mut want,
            &out[..2 * cfg.out_len()],
            &noise[img..],
        );
        assert_eq!(got, want, "{mode:?}");
        assert!(rel_l2(&got, &x_t) > 1e-3);
    }
}

/// Official-semantics fact: the sinusoidal timestep embedding (half = 128, max period 10000,
/// cos first) at t = 0, 1, 250, 999, against values recorded from the official DiT
/// `TimestepEmbedder.timestep_embedding` (torch 2.11, f32) at columns 0, 1, 64, 127 (cos) and
/// 128, 129, 200, 255 (sin).
#[test]
fn timestep_embedding_matches_official_values() {
    let official: [(i64, [f32; 8]); 4] = [
        (0, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]),
        (
            1,
            [
                5.4030234e-01,
                5.9737533e-01,
                9.9995e-01,
                1.0,
                8.4147096e-01,
                8.019618e-01,
                5.6233825e-03,
                1.0746076e-04,
            ],
        ),
        (
            250,
            [
                2.409883e-01,
                9.8639387e-01,
                -8.011436e-01,
                9.9963915e-01,
                -9.70528e-01,
                1.6439931e-01,
                9.8642766e-01,
                2.6861958e-02,
            ],
        ),
        (
            999,
            [
                9.996498e-01,
                9.637853e-01,
                -8.444698e-01,
                9.9424314e-01,
                -2.6460752e-02,
                -2.6667938e-01,
                -6.173711e-01,
                1.0714722e-01,
            ],
        ),
    ];
    let cols = [0, 1, 64, 127, 128, 129, 200, 255];
    let t: Vec<i64> = official.iter().map(|o| o.0).collect();
    let mut feats = vec![f32::NAN; t.len() * 256];
    ops::timestep_features(&t, &mut feats);
    for (r, (ti, want)) in official.iter().enumerate() {
        for (&c, &w) in cols.iter().zip(want) {
            let got = feats[r * 256 + c];
            assert!(
                (got - w).abs() <= 1e-6,
                "t={ti} column {c}: {got} vs official {w}"
            );
        }
    }
}

/// Buffers too large for the machine are an error naming them, not an abort: a million tokens
/// (a checkpoint's `pos_embed` says how many) need a [T, T] attention score matrix of 4 TB.
#[test]
fn buffers_too_large_are_an_error() {
    let arch = Arch::parse("depth=1,hidden=4,heads=1,patch=1").unwrap();
    let cfg = DitConfig::from_arch(&arch, 1, 1000, 2, false).unwrap();
    assert_eq!(cfg.tokens(), 1_000_000);
    let err = format!("{:#}", Activations::new(&cfg, 1).err().unwrap());
    assert!(
        err.contains("attention scores")
            && (err.contains("more than this machine has free") || err.contains("cannot allocate")),
        "{err}"
    );
    // Sizes whose product overflows.
    let err = format!(
        "{:#}",
        Activations::new(&cfg, usize::MAX / 2).err().unwrap()
    );
    assert!(err.contains("overflow"), "{err}");
    let err = format!(
        "{:#}",
        FeatureCache::new(&cfg, usize::MAX / 4).err().unwrap()
    );
    assert!(
        err.contains("FORA cache") && err.contains("overflow"),
        "{err}"
    );
}

/// A plan without reuse steps gets a workspace without the FORA cache (the largest part of a
/// CPU workspace), samples the same bits, and refuses a reuse step by name.
#[test]
fn a_plan_without_reuse_steps_holds_no_cache() {
    use fora::backend::{NoiseSource, StepSpec};
    let cfg = odd_config();
    let be = backend(&cfg, 14);
    let with_cache = plan(&cfg, NoiseSource::Seed(3), 3);
    let mut without = with_cache.clone();
    without.reuses = false;
    let run = |p: &fora::backend::SamplePlan| {
        let mut ws = be.workspace(p).unwrap();
        assert_eq!(ws.cache().is_some(), p.reuses);
        for k in 0..p.steps {
            let spec = StepSpec {
                k,
                i: p.steps - 1 - k,
                t: p.timesteps[k],
                mode: StepMode::Compute,
                update: ddpm_update(k + 1 < p.steps),
                reuse_ahead: 0,
            };
            be.step(&mut ws, &spec).unwrap();
        }
        (be.latents(&mut ws).unwrap(), ws)
    };
    let (a, mut ws) = run(&without);
    let (b, _) = run(&with_cache);
    assert_eq!(a, b, "the cache changed a run that never reuses it");
    let reuse = StepSpec {
        k: 1,
        i: 1,
        t: with_cache.timesteps[1],
        mode: StepMode::Reuse,
        update: ddpm_update(true),
        reuse_ahead: 0,
    };
    let err = be.step(&mut ws, &reuse).unwrap_err().to_string();
    assert!(err.contains("planned without one"), "{err}");
}

/// A workspace built for one model is refused by a backend of another, not indexed past its
/// buffers.
#[test]
fn a_workspace_of_another_model_is_refused() {
    use fora::backend::{NoiseSource, StepSpec};
    let (cfg, other) = (odd_config(), other_config());
    let (be, other_be) = (backend(&cfg, 15), backend(&other, 16));
    let p = plan(&cfg, NoiseSource::Seed(4), 2);
    let mut ws = be.workspace(&p).unwrap();
    let spec = StepSpec {
        k: 0,
        i: 1,
        t: p.timesteps[0],
        mode: StepMode::Compute,
        update: ddpm_update(true),
        reuse_ahead: 0,
    };
    let err = other_be.step(&mut ws, &spec).unwrap_err().to_string();
    assert!(
        err.contains("built for") && err.contains("build one"),
        "{err}"
    );
    let err = other_be.latents(&mut ws).unwrap_err().to_string();
    assert!(err.contains("built for"), "{err}");
    be.step(&mut ws, &spec).unwrap();
}

/// Slice lengths are checked without overflow before the unsafe strided products: sizes whose
/// product wraps to an empty slice's length panic at the check instead of writing through a
/// dangling pointer.
#[test]
fn wrapping_sizes_are_refused_by_the_cpu_ops() {
    use fora::cpu::ops;
    let caught = |f: &dyn Fn()| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .expect_err("sizes that wrap must be refused")
    };
    let message =
        |e: Box<dyn std::any::Any + Send>| e.downcast_ref::<String>().cloned().unwrap_or_default();
    let e = caught(&|| ops::linear(&mut [], &[], &[], &[0.0; 2], 1 << 63, 2, 0));
    assert!(message(e).contains("linear: slices"));
    let e = caught(&|| ops::linear_rows(&mut [], &[], &[], &[0.0; 2], 1 << 63, 2, 0, false));
    assert!(message(e).contains("linear: slices"));
    let e = caught(&|| ops::attention(&mut [], &[], &mut [0.0; 4], 1 << 62, 2, 1, 4));
    assert!(message(e).contains("attention: qkv"));
}

/// A config built by hand with zero heads is refused by the CUDA backend's shape check, not
/// divided by.
#[test]
fn a_config_of_zero_heads_is_refused_by_the_cuda_check() {
    let mut cfg = odd_config();
    cfg.heads = 0;
    let err = format!("{:#}", fora::cuda::backend::supports(&cfg).unwrap_err());
    assert!(err.contains("heads"), "{err}");
}

/// `forward_into` takes caller-owned buffers whose fields are public: buffers of another
/// model, or resized ones, are refused by name (they were indexed past their end: a panic).
#[test]
fn forward_into_refuses_buffers_of_another_model() {
    let cfg = odd_config();
    let be = backend(&cfg, 4);
    let (x, t, y) = inputs(&cfg, 2, 7);
    let other = other_config();
    let mut acts = Activations::new(&cfg, 2).unwrap();
    let mut cache = FeatureCache::new(&cfg, 2).unwrap();
    let err = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
    // Activations of another model, the same rows.
    let mut foreign = Activations::new(&other, 2).unwrap();
    let e = err(be.forward_into(&mut foreign, None, StepMode::Compute, &x, &t, &y));
    assert!(e.contains("another model"), "{e}");
    // A cache of another model, computing and reusing.
    let mut foreign_cache = FeatureCache::new(&other, 2).unwrap();
    for mode in [StepMode::Compute, StepMode::Reuse] {
        foreign_cache.valid = true;
        let e = err(be.forward_into(&mut acts, Some(&mut foreign_cache), mode, &x, &t, &y));
        assert!(e.contains("another model"), "{mode:?}: {e}");
    }
    // A resized buffer of the right model.
    cache.attn.truncate(3);
    let e = err(be.forward_into(&mut acts, Some(&mut cache), StepMode::Compute, &x, &t, &y));
    assert!(e.contains("attention outputs hold 3 values"), "{e}");
    acts.mlp.push(0.0);
    let e = err(be.forward_into(&mut acts, None, StepMode::Compute, &x, &t, &y));
    assert!(e.contains("MLP hidden buffer"), "{e}");
    // Right-sized buffers still run.
    let mut acts = Activations::new(&cfg, 2).unwrap();
    let mut cache = FeatureCache::new(&cfg, 2).unwrap();
    be.forward_into(&mut acts, Some(&mut cache), StepMode::Compute, &x, &t, &y)
        .unwrap();
    be.forward_into(&mut acts, Some(&mut cache), StepMode::Reuse, &x, &t, &y)
        .unwrap();
}
