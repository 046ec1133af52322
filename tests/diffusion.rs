//! Official-semantics facts of the diffusion process. Every literal below was recorded by running
//! the official DiT code (facebookresearch/DiT, `diffusion/`) with numpy/torch on CPU:
//! `sorted(space_timesteps(1000, spec))`, the attributes of `create_diffusion(spec)`, and
//! `p_sample` / `ddim_sample` with a fixed model output and `th.randn_like` patched to return
//! the given noise.

use fora::backend::StepUpdate;
use fora::diffusion::{apply_update, linear_betas, space_timesteps, Diffusion, SamplerKind};

const RESPACED_250: [usize; 250] = [
    0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92,
    96, 100, 104, 108, 112, 116, 120, 124, 128, 132, 136, 140, 144, 148, 152, 156, 160, 164, 169,
    173, 177, 181, 185, 189, 193, 197, 201, 205, 209, 213, 217, 221, 225, 229, 233, 237, 241, 245,
    249, 253, 257, 261, 265, 269, 273, 277, 281, 285, 289, 293, 297, 301, 305, 309, 313, 317, 321,
    325, 329, 333, 337, 341, 345, 349, 353, 357, 361, 365, 369, 373, 377, 381, 385, 389, 393, 397,
    401, 405, 409, 413, 417, 421, 425, 429, 433, 437, 441, 445, 449, 453, 457, 461, 465, 469, 473,
    477, 481, 485, 489, 493, 497, 502, 506, 510, 514, 518, 522, 526, 530, 534, 538, 542, 546, 550,
    554, 558, 562, 566, 570, 574, 578, 582, 586, 590, 594, 598, 602, 606, 610, 614, 618, 622, 626,
    630, 634, 638, 642, 646, 650, 654, 658, 662, 666, 670, 674, 678, 682, 686, 690, 694, 698, 702,
    706, 710, 714, 718, 722, 726, 730, 734, 738, 742, 746, 750, 754, 758, 762, 766, 770, 774, 778,
    782, 786, 790, 794, 798, 802, 806, 810, 814, 818, 822, 826, 830, 835, 839, 843, 847, 851, 855,
    859, 863, 867, 871, 875, 879, 883, 887, 891, 895, 899, 903, 907, 911, 915, 919, 923, 927, 931,
    935, 939, 943, 947, 951, 955, 959, 963, 967, 971, 975, 979, 983, 987, 991, 995, 999,
];
const RESPACED_DDIM50: [usize; 50] = [
    0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 220, 240, 260, 280, 300, 320, 340, 360, 380,
    400, 420, 440, 460, 480, 500, 520, 540, 560, 580, 600, 620, 640, 660, 680, 700, 720, 740, 760,
    780, 800, 820, 840, 860, 880, 900, 920, 940, 960, 980,
];
const RESPACED_50: [usize; 50] = [
    0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224, 245, 265, 285, 306, 326, 347, 367, 387,
    408, 428, 449, 469, 489, 510, 530, 550, 571, 591, 612, 632, 652, 673, 693, 714, 734, 754, 775,
    795, 816, 836, 856, 877, 897, 917, 938, 958, 979, 999,
];
const RESPACED_10_20_30: [usize; 60] = [
    0, 37, 74, 111, 148, 185, 222, 259, 296, 333, 334, 351, 369, 386, 404, 421, 439, 456, 474, 491,
    509, 526, 544, 561, 579, 596, 614, 631, 649, 666, 667, 678, 690, 701, 713, 724, 736, 747, 759,
    770, 781, 793, 804, 816, 827, 839, 850, 862, 873, 885, 896, 907, 919, 930, 942, 953, 965, 976,
    988, 999,
];
// (spec, i, t, beta, abar, abar_prev, sqrt_recip, sqrt_recipm1, coef1, coef2, post_var, post_log_clipped)
const COEFFS: &[(&str, usize, usize, [f64; 9])] = &[
    (
        "250",
        0,
        0,
        [
            9.999999999998899e-05,
            0.9999,
            1.0,
            1.0000500037503124,
            0.01000050003749898,
            1.0,
            0.0,
            0.0,
            -9.364628159803084,
        ],
    ),
    (
        "250",
        1,
        4,
        [
            0.0005990655644756426,
            0.9993009943420809,
            0.9999,
            1.0003496861640975,
            0.026447960386545833,
            0.8569824917180376,
            0.1430175007910898,
            8.570253440564813e-05,
            -9.364628159803084,
        ],
    ),
    (
        "250",
        2,
        8,
        [
            0.0009176029928172902,
            0.9983840327589473,
            0.9993009943420809,
            1.0008089641973954,
            0.040231614656429375,
            0.567636650427796,
            0.43236326933114155,
            0.00039691997919770396,
            -7.831775861327526,
        ],
    ),
    (
        "250",
        125,
        502,
        [
            0.04929790363417974,
            0.07623466678988594,
            0.0801877550089588,
            3.6217940156072923,
            3.481004437154425,
            0.01511196081567503,
            0.9708670288147777,
            0.0490869420889959,
            -3.0141622247856663,
        ],
    ),
    (
        "250",
        248,
        995,
        [
            0.07721930545605926,
            4.3749749585179176e-05,
            4.741077684422223e-05,
            151.18622188168905,
            151.18291466584216,
            0.0005317205281952787,
            0.9606112312533837,
            0.07721902274170839,
            -2.56110944373366,
        ],
    ),
    (
        "250",
        249,
        999,
        [
            0.07751934499235003,
            4.035829765375675e-05,
            4.3749749585179176e-05,
            157.41045725150065,
            157.4072808104076,
            0.0005127614983862911,
            0.9604553074808463,
            0.07751908207860697,
            -2.557231152560974,
        ],
    ),
    (
        "ddim50",
        0,
        0,
        [
            9.999999999998899e-05,
            0.9999,
            1.0,
            1.0000500037503124,
            0.01000050003749898,
            1.0,
            0.0,
            0.0,
            -9.226331928392868,
        ],
    ),
    (
        "ddim50",
        1,
        20,
        [
            0.006165187946595374,
            0.9937354285721993,
            0.9999,
            1.003147079786928,
            0.07939813401485646,
            0.9840864216397792,
            0.01591350105303375,
            9.841356296513845e-05,
            -9.226331928392868,
        ],
    ),
    (
        "ddim50",
        2,
        40,
        [
            0.01405656286603274,
            0.9797669240482703,
            0.9937354285721993,
            1.0102726895883967,
            0.1437042355957989,
            0.6925523610744929,
            0.3074365187868032,
            0.004352197476731391,
            -5.437074394370783,
        ],
    ),
    (
        "ddim50",
        25,
        500,
        [
            0.17995439100829413,
            0.07779665836502389,
            0.09486869695050186,
            3.5852506938754507,
            3.4429671125258228,
            0.060103148675513016,
            0.8887996951307324,
            0.17662303428009896,
            -1.7337375673806428,
        ],
    ),
    (
        "ddim50",
        48,
        960,
        [
            0.3191051161359908,
            8.741305391053611e-05,
            0.000128379660329471,
            106.95765025494848,
            106.95297540536158,
            0.0036159285722864817,
            0.8251297426614025,
            0.3190920423394713,
            -1.142275683835682,
        ],
    ),
    (
        "ddim50",
        49,
        980,
        [
            0.3246144475291255,
            5.9037513708533764e-05,
            8.741305391053611e-05,
            130.1475419882165,
            130.1437001378652,
            0.0030351602930384037,
            0.8217951216039028,
            0.3246052358749863,
            -1.1251454937945642,
        ],
    ),
    (
        "7",
        0,
        0,
        [
            9.999999999998899e-05,
            0.9999,
            1.0,
            1.0000500037503124,
            0.01000050003749898,
            1.0,
            0.0,
            0.0,
            -9.210634012767658,
        ],
    ),
    (
        "7",
        1,
        166,
        [
            0.254010890354353,
            0.7459145107346825,
            0.9999,
            1.157858456997289,
            0.583640477040569,
            0.9996564157470617,
            0.0003399275627107517,
            9.997064023167627e-05,
            -9.210634012767658,
        ],
    ),
    (
        "7",
        2,
        333,
        [
            0.5728399831602435,
            0.31862485496644566,
            0.7459145107346825,
            1.771577576414208,
            1.4623566969975688,
            0.7260918528138415,
            0.24371871146471158,
            0.21361261627005645,
            -1.5435911087056406,
        ],
    ),
    (
        "7",
        3,
        500,
        [
            0.7558361905783633,
            0.07779665836502388,
            0.31862485496644566,
            3.585250693875451,
            3.442967112525823,
            0.46263748308583436,
            0.3650902559099666,
            0.5584538362915524,
            -0.5825833204843771,
        ],
    ),
    (
        "7",
        5,
        832,
        [
            0.9190557286324822,
            0.0008891105083393641,
            0.010984230178593664,
            33.53683918912361,
            33.521926895647525,
            0.09640797626855749,
            0.28163237853407425,
            0.9097694945800257,
            -0.09456401421709093,
        ],
    ),
    (
        "7",
        6,
        999,
        [
            0.954608232300464,
            4.0358297653756794e-05,
            0.0008891105083393641,
            157.41045725150056,
            157.4072808104075,
            0.028465615224948518,
            0.21287260172531666,
            0.9537979737523047,
            -0.04730339751500154,
        ],
    ),
];

const X: [f32; 12] = [
    -0.80193144,
    -1.3243589,
    -0.24836162,
    0.42044523,
    1.1360465,
    0.1097064,
    -0.5526473,
    -0.7847804,
    0.7487458,
    1.634783,
    0.27276877,
    -1.2333287,
];
const MODEL_OUT: [f32; 24] = [
    -0.9582652,
    1.6000191,
    0.20288244,
    -1.7321348,
    -0.083696194,
    -1.163226,
    -0.5575618,
    -0.45263222,
    -0.61275035,
    0.50304806,
    -0.063002415,
    -0.5294865,
    0.40963784,
    0.8298553,
    -1.6430234,
    -0.25673014,
    -0.98074734,
    -0.17315522,
    -0.8589742,
    0.020687442,
    -0.037867624,
    -0.2952772,
    -0.78099895,
    -0.37668458,
];
const NOISE: [f32; 12] = [
    -1.0913289,
    -1.3552088,
    0.22478573,
    -1.10935,
    1.1702961,
    0.71658766,
    -1.9978167,
    0.27212888,
    -1.1017166,
    0.03305722,
    0.043631993,
    -1.9884298,
];
/// (respacing, i, learn_sigma, eta (None = DDPM), expected x').
type UpdateCase = (&'static str, usize, bool, Option<f64>, [f32; 12]);
const UPDATES: &[UpdateCase] = &[
    (
        "250",
        125,
        true,
        None,
        [
            -1.013956,
            -1.742861,
            -0.21556887,
            0.27614778,
            1.4290779,
            0.3325503,
            -1.0310383,
            -0.78816694,
            0.61000067,
            1.6974674,
            0.34101272,
            -1.696635,
        ],
    ),
    (
        "250",
        0,
        true,
        None,
        [
            -0.7923884,
            -1.3404261,
            -0.25040296,
            0.43778846,
            1.1369402,
            0.12134472,
            -0.55677146,
            -0.7931186,
            0.7652142,
            1.6374321,
            0.28259036,
            -1.2316587,
        ],
    ),
    (
        "250",
        1,
        true,
        None,
        [
            -0.7929796,
            -1.3773913,
            -0.25052243,
            0.43850583,
            1.1553688,
            0.14444305,
            -0.5819049,
            -0.79968685,
            0.7699286,
            1.6415228,
            0.29552886,
            -1.2546966,
        ],
    ),
    (
        "250",
        249,
        false,
        None,
        [
            -1.0614536,
            -1.8853445,
            -0.21237612,
            0.2686909,
            1.5154094,
            0.40762413,
            -1.1647003,
            -0.8083019,
            0.6054403,
            1.7320112,
            0.3753051,
            -1.8237528,
        ],
    ),
    (
        "250",
        0,
        false,
        None,
        [
            -0.7923884,
            -1.3404261,
            -0.25040296,
            0.43778846,
            1.1369402,
            0.12134472,
            -0.55677146,
            -0.7931186,
            0.7652142,
            1.6374321,
            0.28259036,
            -1.2316587,
        ],
    ),
    (
        "ddim50",
        25,
        true,
        Some(0.0),
        [
            -0.7810365,
            -1.6369933,
            -0.29639155,
            0.6532259,
            1.2636479,
            0.24802744,
            -0.6549616,
            -0.95713836,
            1.0060433,
            1.8332688,
            0.4081906,
            -1.3430587,
        ],
    ),
    (
        "ddim50",
        25,
        true,
        Some(0.5),
        [
            -0.98784477,
            -1.9593613,
            -0.25392365,
            0.46081373,
            1.5115318,
            0.4259373,
            -1.0843931,
            -0.9194537,
            0.81314147,
            1.8462474,
            0.44040293,
            -1.7568243,
        ],
    ),
    (
        "ddim50",
        0,
        false,
        Some(1.0),
        [
            -0.7923884,
            -1.3404261,
            -0.25040296,
            0.43778846,
            1.1369402,
            0.12134472,
            -0.55677146,
            -0.7931186,
            0.7652142,
            1.6374321,
            0.28259036,
            -1.2316587,
        ],
    ),
    // Near i = 1 sigma's f32 roundings (the official order) matter: in f64 it differs by
    // ~1e-4 relative.
    (
        "250",
        1,
        true,
        Some(1.0),
        [
            -0.7905566, -1.3735665, -0.2509532, 0.44955903, 1.1491187, 0.14273778, -0.5805934,
            -0.8013046, 0.77600896, 1.6413976, 0.29548284, -1.2481829,
        ],
    ),
    (
        "ddim50",
        1,
        true,
        Some(1.0),
        [
            -0.7403689,
            -1.4669219,
            -0.2627527,
            0.54608047,
            1.1577151,
            0.20804337,
            -0.6061862,
            -0.84935105,
            0.8685108,
            1.6602331,
            0.3506764,
            -1.2433465,
        ],
    ),
    (
        "250",
        2,
        true,
        Some(0.7),
        [
            -0.80050373,
            -1.3722776,
            -0.24894328,
            0.4359242,
            1.1543753,
            0.14040524,
            -0.5880363,
            -0.79608107,
            0.7628996,
            1.6405534,
            0.29091728,
            -1.2585508,
        ],
    ),
];

fn rel_close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1e-300)
}

#[test]
fn respaced_timesteps_match_official() {
    assert_eq!(space_timesteps(1000, "250").unwrap(), RESPACED_250);
    assert_eq!(space_timesteps(1000, "ddim50").unwrap(), RESPACED_DDIM50);
    assert_eq!(space_timesteps(1000, "50").unwrap(), RESPACED_50);
    assert_eq!(
        space_timesteps(1000, "10,20,30").unwrap(),
        RESPACED_10_20_30
    );
    assert_eq!(
        space_timesteps(1000, "1000").unwrap(),
        (0..1000).collect::<Vec<_>>()
    );
    let d = Diffusion::new("250", true).unwrap();
    assert_eq!(d.steps(), 250);
    assert_eq!(d.original_timestep(249).unwrap(), 999);
    assert_eq!(d.original_timestep(42).unwrap(), 169);
    assert!(d.original_timestep(250).is_err());
}

#[test]
fn bad_respacings_are_errors() {
    for bad in [
        "", "0", "abc", "ddim", "ddimx", "ddim0", "ddim3000", "1001", "10,,20", "-5", "600,600",
    ] {
        let err = space_timesteps(1000, bad);
        assert!(err.is_err(), "{bad:?} should be rejected, got {err:?}");
    }
    // No integer stride takes exactly 999 of 1000 steps (ceil(1000 / s) skips 999).
    assert!(space_timesteps(1000, "ddim999").is_err());
}

#[test]
fn linear_schedule_is_numpy_linspace() {
    let b = linear_betas(1000);
    assert_eq!(b.len(), 1000);
    assert_eq!(b[0], 1e-4);
    assert_eq!(b[999], 0.02);
    let step = (0.02 - 1e-4) / 999.0;
    assert_eq!(b[500], 500.0 * step + 1e-4);
}

#[test]
fn coefficients_match_official() {
    for &(spec, i, t, want) in COEFFS {
        let d = Diffusion::new(spec, true).unwrap();
        assert_eq!(d.timestep_map[i], t, "{spec} i={i}");
        let got = [
            d.betas[i],
            d.alphas_cumprod[i],
            d.alphas_cumprod_prev[i],
            d.sqrt_recip_alphas_cumprod[i],
            d.sqrt_recipm1_alphas_cumprod[i],
            d.posterior_mean_coef1[i],
            d.posterior_mean_coef2[i],
            d.posterior_variance[i],
            d.posterior_log_variance_clipped[i],
        ];
        for (k, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
            // numpy and Rust may round log/sqrt differently by an ulp; 1e-12 is far below any
            // f32 consequence and far above such rounding.
            let ok = if w == 0.0 {
                g == 0.0
            } else {
                rel_close(g, w, 1e-12)
            };
            assert!(
                ok,
                "{spec} i={i} coefficient #{k}: got {g:e}, official {w:e}"
            );
        }
    }
}

#[test]
fn step_updates_carry_the_right_coefficients() {
    let d = Diffusion::new("250", true).unwrap();
    match d.step_update(125, SamplerKind::Ddpm).unwrap() {
        StepUpdate::Ddpm {
            max_log,
            min_log,
            add_noise,
            ..
        } => {
            assert!(rel_close(max_log, d.betas[125].ln(), 1e-15));
            assert_eq!(min_log, -3.0141622247856663);
            assert!(add_noise);
        }
        other => panic!("expected DDPM, got {other:?}"),
    }
    match d.step_update(0, SamplerKind::Ddpm).unwrap() {
        StepUpdate::Ddpm { add_noise, .. } => assert!(!add_noise),
        other => panic!("expected DDPM, got {other:?}"),
    }
    // FIXED_LARGE (learn_sigma = false): log(append(posterior_variance[1], betas[1:])).
    let fixed = Diffusion::new("250", false).unwrap();
    for (i, want) in [
        (0, -9.364628159803084),
        (1, -7.420139509285096),
        (249, -2.5572277609664122),
    ] {
        match fixed.step_update(i, SamplerKind::Ddpm).unwrap() {
            StepUpdate::Ddpm { max_log, .. } => {
                assert!(
                    rel_close(max_log, want, 1e-12),
                    "fixed large i={i}: {max_log} vs {want}"
                )
            }
            other => panic!("expected DDPM, got {other:?}"),
        }
    }
    assert!(d.step_update(250, SamplerKind::Ddpm).is_err());
    assert!(d.step_update(3, SamplerKind::Ddim { eta: -1.0 }).is_err());
    // Far past 1, sigma^2 passes 1 - abar_prev (NaN latents): refused, naming the bound.
    // The bound the message names is the same for any eta past it, also where sigma^2
    // overflows (1e308: it read "eta <= 0.0000"); a huge eta is shown in scientific notation.
    let mut bounds = Vec::new();
    for eta in [3.0, 100.0, 1e308] {
        let err = format!(
            "{:#}",
            d.step_update(3, SamplerKind::Ddim { eta }).unwrap_err()
        );
        assert!(err.contains("too large for step 3"), "{err}");
        let bound = err
            .split("eta <= ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        bounds.push(bound.to_string());
        assert!(err.len() < 300, "{err}");
    }
    assert!(bounds.iter().all(|b| *b == bounds[0]), "{bounds:?}");
    let bound: f64 = bounds[0].parse().unwrap();
    assert!(bound > 1.0 && bound < 3.0, "{bound}");
    assert!(d
        .step_update(3, SamplerKind::Ddim { eta: bound * 0.999 })
        .is_ok());
    assert!(d.step_update(3, SamplerKind::Ddim { eta: 1.0 }).is_ok());
    assert!(d
        .step_update(3, SamplerKind::Ddim { eta: f64::NAN })
        .is_err());
}

#[test]
fn apply_update_matches_official_samplers() {
    let (channels, hw) = (2, 3);
    for &(spec, i, learn_sigma, eta, want) in UPDATES {
        let d = Diffusion::new(spec, learn_sigma).unwrap();
        let kind = match eta {
            None => SamplerKind::Ddpm,
            Some(eta) => SamplerKind::Ddim { eta },
        };
        let update = d.step_update(i, kind).unwrap();
        // The model output of a fixed-variance model has only the eps channels.
        let model_out: Vec<f32> = if learn_sigma {
            MODEL_OUT.to_vec()
        } else {
            MODEL_OUT
                .chunks(2 * channels * hw)
                .flat_map(|row| row[..channels * hw].to_vec())
                .collect()
        };
        let mut x = X;
        apply_update(
            &update,
            learn_sigma,
            channels,
            hw,
            &mut x,
            &model_out,
            &NOISE,
        );
        for (j, (&g, &w)) in x.iter().zip(want.iter()).enumerate() {
            // Same f32 operations in the same order; only exp/sqrt/f64->f32 roundings differ.
            assert!(
                (g - w).abs() <= 2e-6 * w.abs().max(1.0),
                "{spec} i={i} learn_sigma={learn_sigma} eta={eta:?} element {j}: got {g}, official {w}"
            );
        }
    }
}

#[test]
fn apply_update_without_noise_ignores_the_noise_slice() {
    let d = Diffusion::new("250", true).unwrap();
    let update = d.step_update(0, SamplerKind::Ddpm).unwrap();
    let mut a = X;
    apply_update(&update, true, 2, 3, &mut a, &MODEL_OUT, &NOISE);
    let mut b = X;
    apply_update(&update, true, 2, 3, &mut b, &MODEL_OUT, &[]);
    assert_eq!(a, b);
}

#[test]
fn an_empty_schedule_has_no_betas() {
    assert!(linear_betas(0).is_empty());
    assert_eq!(linear_betas(1).len(), 1);
}
