//! Gaussian diffusion exactly as the official DiT code (`diffusion/gaussian_diffusion.py`,
//! `diffusion/respace.py`, inherited from OpenAI's improved/guided diffusion) computes it:
//! linear betas in f64, timestep respacing, the respaced process's coefficients, and the
//! per-step update ([`StepUpdate`]) that every backend applies element-wise.
//!
//! Coefficients are computed in f64 as numpy does; the official sampler then casts each one to
//! f32 (`_extract_into_tensor(..).float()`) and does the element-wise maths in f32, and so does
//! [`apply_update`].

use crate::backend::StepUpdate;
use anyhow::{bail, ensure, Context, Result};

/// Length of the original diffusion process (timesteps 0..999).
pub const DIFFUSION_STEPS: usize = 1000;

/// The official linear schedule: `np.linspace(1e-4 * s, 0.02 * s, n)` with `s = 1000 / n`,
/// reproduced operation for operation (`i * step + start`, the last element set to `stop`);
/// empty for `n = 0`.
pub fn linear_betas(n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let scale = 1000.0 / n as f64;
    let (start, stop) = (scale * 0.0001, scale * 0.02);
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut betas: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    betas[n - 1] = stop;
    betas
}

/// The retained original timesteps of a respacing, ascending, exactly as the official
/// `space_timesteps(num_timesteps, spec)`:
/// - `"ddimN"`: the smallest integer stride s with `len(range(0, n, s)) == N`;
/// - `"N"` or `"N1,N2,..."`: the process is cut into equal sections (the first `n % k` one
///   step longer) and section j takes `Nj` steps at a fractional stride `(size-1)/(Nj-1)`,
///   accumulated in f64 and rounded half to even (Python's `round`). `"250"` gives
///   0, 4, 8, ..., 995, 999.
pub fn space_timesteps(num_timesteps: usize, spec: &str) -> Result<Vec<usize>> {
    let spec = spec.trim();
    let shown = quoted(spec);
    ensure!(num_timesteps > 0, "diffusion needs at least one timestep");
    // The official create_diffusion reads "" as no respacing; refused here, where it is more
    // likely an unset variable than a request for every step.
    ensure!(
        !spec.is_empty(),
        "respacing is empty; for all {num_timesteps} steps (the official code's reading of \"\") \
         give \"{num_timesteps}\""
    );
    if let Some(count) = spec.strip_prefix("ddim") {
        let desired: usize = count
            .parse()
            .with_context(|| format!("respacing {shown}: {} is not a step count", quoted(count)))?;
        ensure!(
            desired > 0,
            "respacing {shown}: the step count must be at least 1"
        );
        for stride in 1..num_timesteps {
            if num_timesteps.div_ceil(stride) == desired {
                return Ok((0..num_timesteps).step_by(stride).collect());
            }
        }
        bail!(
            "respacing {shown}: cannot take exactly {desired} of {num_timesteps} steps with an integer stride"
        );
    }
    let counts: Vec<usize> = spec
        .split(',')
        .map(|part| {
            part.trim().parse::<usize>().with_context(|| {
                format!("respacing {shown}: {} is not a step count (expected e.g. \"250\", \"10,20\" or \"ddim50\")", quoted(part))
            })
        })
        .collect::<Result<_>>()?;
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0usize;
    let mut steps = Vec::new();
    for (j, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(j < extra);
        ensure!(
            count <= size,
            "respacing {shown}: cannot divide a section of {size} steps into {count}"
        );
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            steps.push(start + cur.round_ties_even() as usize);
            cur += stride;
        }
        start += size;
    }
    // The official code returns a set; only membership matters.
    steps.sort_unstable();
    steps.dedup();
    ensure!(
        !steps.is_empty(),
        "respacing {shown} keeps no timesteps: ask for at least 1 step"
    );
    Ok(steps)
}

/// `text` quoted for an error, cut to its first 60 characters (a list of thousands of sections
/// would make a line of kilobytes).
fn quoted(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// Which reverse process the sampler runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerKind {
    /// Ancestral DDPM (`p_sample`): learned-range variance when the model learns sigma, the
    /// official FIXED_LARGE variance otherwise.
    Ddpm,
    /// DDIM (`ddim_sample`) with the given eta (0 = deterministic).
    Ddim {
        /// 0 gives the deterministic DDIM; 1 the DDPM-like stochastic limit.
        eta: f64,
    },
}

/// A respaced diffusion process (the official `SpacedDiffusion`) with every coefficient the
/// samplers need, indexed by the respaced index i in `0..steps()`.
#[derive(Clone, Debug)]
pub struct Diffusion {
    /// Original timestep of respaced index i (`timestep_map`).
    pub timestep_map: Vec<usize>,
    /// Respaced betas: `1 - abar_orig[t_i] / abar_orig[t_{i-1}]`.
    pub betas: Vec<f64>,
    /// abar_i = prod_{j <= i} (1 - beta_j) of the respaced betas.
    pub alphas_cumprod: Vec<f64>,
    /// abar_{i-1}, 1 at i = 0.
    pub alphas_cumprod_prev: Vec<f64>,
    /// sqrt(1 / abar_i).
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    /// sqrt(1 / abar_i - 1).
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// beta_i (1 - abar_{i-1}) / (1 - abar_i), the variance of q(x_{i-1} | x_i, x_0).
    pub posterior_variance: Vec<f64>,
    /// `log(posterior_variance)` with entry 0 replaced by entry 1 (the posterior variance is 0
    /// at the start of the chain).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Weight of x_0 in the posterior mean: beta_i sqrt(abar_{i-1}) / (1 - abar_i).
    pub posterior_mean_coef1: Vec<f64>,
    /// Weight of x_i in the posterior mean: (1 - abar_{i-1}) sqrt(1 - beta_i) / (1 - abar_i).
    pub posterior_mean_coef2: Vec<f64>,
    /// Whether the model predicts the variance interpolation (LEARNED_RANGE) or not
    /// (FIXED_LARGE).
    pub learn_sigma: bool,
}

impl Diffusion {
    /// The official `create_diffusion(respacing, learn_sigma=..)` with the linear schedule over
    /// 1000 steps. `respacing` as [`space_timesteps`] (`"250"`, `"ddim50"`, `"10,20,30"`).
    pub fn new(respacing: &str, learn_sigma: bool) -> Result<Diffusion> {
        let base_betas = linear_betas(DIFFUSION_STEPS);
        let base_abar = cumprod_alphas(&base_betas);
        let use_steps = space_timesteps(DIFFUSION_STEPS, respacing)?;
        let mut betas = Vec::with_capacity(use_steps.len());
        let mut last = 1.0f64;
        for &t in &use_steps {
            betas.push(1.0 - base_abar[t] / last);
            last = base_abar[t];
        }
        Ok(Diffusion::from_betas(betas, use_steps, learn_sigma))
    }

    /// The official `GaussianDiffusion.__init__` coefficients for `betas`, f64 as numpy.
    fn from_betas(betas: Vec<f64>, timestep_map: Vec<usize>, learn_sigma: bool) -> Diffusion {
        let n = betas.len();
        let abar = cumprod_alphas(&betas);
        let abar_prev: Vec<f64> = (0..n)
            .map(|i| if i == 0 { 1.0 } else { abar[i - 1] })
            .collect();
        let sqrt_recip = abar.iter().map(|&a| (1.0 / a).sqrt()).collect();
        let sqrt_recipm1 = abar.iter().map(|&a| (1.0 / a - 1.0).sqrt()).collect();
        let post_var: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - abar_prev[i]) / (1.0 - abar[i]))
            .collect();
        // With a single step there is no entry 1 to clip with (the official code leaves the
        // array empty and could not sample); step 0 adds no noise, so log(beta_0) is a harmless
        // finite stand-in.
        let post_log_clipped = (0..n)
            .map(|i| match (i, n) {
                (0, 1) => betas[0].ln(),
                (0, _) => post_var[1].ln(),
                _ => post_var[i].ln(),
            })
            .collect();
        let coef1 = (0..n)
            .map(|i| betas[i] * abar_prev[i].sqrt() / (1.0 - abar[i]))
            .collect();
        let coef2 = (0..n)
            .map(|i| (1.0 - abar_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - abar[i]))
            .collect();
        Diffusion {
            timestep_map,
            betas,
            alphas_cumprod: abar,
            alphas_cumprod_prev: abar_prev,
            sqrt_recip_alphas_cumprod: sqrt_recip,
            sqrt_recipm1_alphas_cumprod: sqrt_recipm1,
            posterior_variance: post_var,
            posterior_log_variance_clipped: post_log_clipped,
            posterior_mean_coef1: coef1,
            posterior_mean_coef2: coef2,
            learn_sigma,
        }
    }

    /// Number of respaced steps S.
    pub fn steps(&self) -> usize {
        self.timestep_map.len()
    }

    /// The original timestep (0..999) the model is conditioned on at respaced index i.
    pub fn original_timestep(&self, i: usize) -> Result<i64> {
        self.timestep_map
            .get(i)
            .map(|&t| t as i64)
            .with_context(|| format!("respaced index {i} out of range 0..{}", self.steps()))
    }

    /// The official FIXED_LARGE log variance at i: `log(posterior_variance[1])` at i = 0,
    /// `log(beta_i)` elsewhere.
    fn fixed_large_log_variance(&self, i: usize) -> f64 {
        if i == 0 && self.steps() > 1 {
            self.posterior_variance[1].ln()
        } else {
            self.betas[i].ln()
        }
    }

    /// The update of respaced index i (noise is added unless i == 0, as the official
    /// `nonzero_mask`).
    pub fn step_update(&self, i: usize, kind: SamplerKind) -> Result<StepUpdate> {
        ensure!(
            i < self.steps(),
            "respaced index {i} out of range 0..{}",
            self.steps()
        );
        let add_noise = i != 0;
        Ok(match kind {
            SamplerKind::Ddpm => {
                let (max_log, min_log) = if self.learn_sigma {
                    (self.betas[i].ln(), self.posterior_log_variance_clipped[i])
                } else {
                    let v = self.fixed_large_log_variance(i);
                    (v, v)
                };
                StepUpdate::Ddpm {
                    sqrt_recip_abar: self.sqrt_recip_alphas_cumprod[i],
                    sqrt_recipm1_abar: self.sqrt_recipm1_alphas_cumprod[i],
                    post_coef1: self.posterior_mean_coef1[i],
                    post_coef2: self.posterior_mean_coef2[i],
                    max_log,
                    min_log,
                    add_noise,
                }
            }
            SamplerKind::Ddim { eta } => {
                ensure!(
                    eta.is_finite() && eta >= 0.0,
                    "DDIM eta must be a finite non-negative number, got {eta:e}"
                );
                let (abar, abar_prev) = (self.alphas_cumprod[i], self.alphas_cumprod_prev[i]);
                // sigma at eta = 1; eta scales it.
                let unit =
                    ((1.0 - abar_prev) / (1.0 - abar)).sqrt() * (1.0 - abar / abar_prev).sqrt();
                // The official ddim_sample computes sigma in f32 from the f32 abar and
                // abar_prev (`_extract_into_tensor` casts them), in this order; in f64 it
                // differs by up to ~1e-4 relative near i = 1. An eta past f32's range (refused
                // below where sigma is not 0) is held at its largest value, so that sigma is 0,
                // not inf x 0, at i = 0.
                let (a, p, e) = (abar as f32, abar_prev as f32, (eta as f32).min(f32::MAX));
                let sigma32 = e * ((1.0 - p) / (1.0 - a)).sqrt() * (1.0 - a / p).sqrt();
                let sigma = eta * unit;
                // Past 1, sigma^2 can exceed 1 - abar_prev, whose root DDIM takes: NaN latents
                // (as in the official code). How far past 1 depends on the schedule. Checked
                // as the update computes it (in f32), and in f64 for the message.
                let room = 1.0 - abar_prev;
                ensure!(
                    sigma * sigma <= room && 1.0 - p - sigma32 * sigma32 >= 0.0,
                    "DDIM eta {} is too large for step {i} of this schedule (sigma^2 {:.3e} > \
                     1 - abar_prev {room:.3e}; eta <= {:.4} here, and any eta <= 1 always works)",
                    // A huge eta in scientific notation, not hundreds of digits.
                    if eta >= 1e6 {
                        format!("{eta:e}")
                    } else {
                        eta.to_string()
                    },
                    sigma * sigma,
                    // From sigma at eta = 1: finite where sigma^2 itself overflowed.
                    room.sqrt() / unit
                );
                StepUpdate::Ddim {
                    sqrt_recip_abar: self.sqrt_recip_alphas_cumprod[i],
                    sqrt_recipm1_abar: self.sqrt_recipm1_alphas_cumprod[i],
                    abar_prev,
                    sigma: f64::from(sigma32),
                    add_noise,
                }
            }
        })
    }
}

/// `np.cumprod(1 - betas)`, sequential as numpy's accumulate.
fn cumprod_alphas(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// Applies one diffusion update in place, in f32 as the official sampler does (each f64
/// coefficient cast to f32 first, then the operations of `p_sample` / `ddim_sample` in their
/// order):
/// - `x`: the latents `[B, C, H, W]`, replaced by x_{i-1};
/// - `model_out`: `[B, out_ch, H, W]` (already guided), eps in channels `0..C`, the variance
///   value v in `C..2C` when `learn_sigma`;
/// - `noise`: `[B, C, H, W]` standard normals (not read when the update adds no noise).
///
/// `channels` is C and `hw` is H*W. Slice lengths are a caller's invariant: a mismatch is a
/// bug in the backend and panics with the lengths.
pub fn apply_update(
    update: &StepUpdate,
    learn_sigma: bool,
    channels: usize,
    hw: usize,
    x: &mut [f32],
    model_out: &[f32],
    noise: &[f32],
) {
    let image = channels * hw;
    let out_ch = if learn_sigma { 2 * channels } else { channels };
    assert!(
        image > 0 && x.len().is_multiple_of(image),
        "apply_update: x has {} elements, not a multiple of C*H*W = {image}",
        x.len()
    );
    let batch = x.len() / image;
    assert_eq!(
        model_out.len(),
        batch * out_ch * hw,
        "apply_update: model_out length vs [B={batch}, {out_ch}, {hw}]"
    );
    let add_noise = match update {
        StepUpdate::Ddpm { add_noise, .. } | StepUpdate::Ddim { add_noise, .. } => *add_noise,
    };
    if add_noise {
        assert_eq!(
            noise.len(),
            x.len(),
            "apply_update: noise length vs x length"
        );
    }
    for b in 0..batch {
        let xb = &mut x[b * image..(b + 1) * image];
        let ob = &model_out[b * out_ch * hw..(b + 1) * out_ch * hw];
        let eps = &ob[..image];
        let nb = if add_noise {
            &noise[b * image..(b + 1) * image]
        } else {
            &[][..]
        };
        match *update {
            StepUpdate::Ddpm {
                sqrt_recip_abar,
                sqrt_recipm1_abar,
                post_coef1,
                post_coef2,
                max_log,
                min_log,
                add_noise,
            } => {
                let (ra, rm1) = (sqrt_recip_abar as f32, sqrt_recipm1_abar as f32);
                let (c1, c2) = (post_coef1 as f32, post_coef2 as f32);
                let (max_log, min_log) = (max_log as f32, min_log as f32);
                for j in 0..image {
                    let xt = xb[j];
                    let x0 = ra * xt - rm1 * eps[j];
                    let mean = c1 * x0 + c2 * xt;
                    xb[j] = if add_noise {
                        let log_var = if learn_sigma {
                            let frac = (ob[image + j] + 1.0) / 2.0;
                            frac * max_log + (1.0 - frac) * min_log
                        } else {
                            max_log
                        };
                        mean + (0.5 * log_var).exp() * nb[j]
                    } else {
                        mean
                    };
                }
            }
            StepUpdate::Ddim {
                sqrt_recip_abar,
                sqrt_recipm1_abar,
                abar_prev,
                sigma,
                add_noise,
            } => {
                let (ra, rm1) = (sqrt_recip_abar as f32, sqrt_recipm1_abar as f32);
                let (abp, sigma) = (abar_prev as f32, sigma as f32);
                let (sqrt_abp, dir) = (abp.sqrt(), (1.0 - abp - sigma * sigma).sqrt());
                for j in 0..image {
                    let xt = xb[j];
                    let x0 = ra * xt - rm1 * eps[j];
                    let eps2 = (ra * xt - x0) / rm1;
                    let mean = x0 * sqrt_abp + dir * eps2;
                    xb[j] = if add_noise {
                        mean + sigma * nb[j]
                    } else {
                        mean
                    };
                }
            }
        }
    }
}
