//! Step-option tuning: which of the CUDA backend's execution paths runs one sampling run
//! fastest on this GPU, measured on the spot, the way cuDNN's benchmark mode picks its
//! convolution algorithms.
//!
//! The backend computes the same model along several paths (cuBLASLt or our TMA GEMMs, the
//! fused proj / fc2 + LayerNorm, the fused qkv + attention, programmatic launches, ...). Which
//! is fastest depends on the card, the batch and the schedule, and a path new to a card may
//! be slower there, or wrong. [`tune`] therefore runs every candidate the same way:
//! - **checks its forward**: one forward at the run's rows on fixed random inputs, its output
//!   finite and within [`TuneSettings::tolerance`] (relative L2) of the given options' (always
//!   the first candidate: the reference and the baseline, never rejected, but they must run);
//! - **checks and times its steps**: on a fresh workspace of the run's own plan, a window of
//!   the run's own schedule (its first steps, computing and reusing as the policy orders them,
//!   up to the step before a computing step), once untimed, the latents' change over that pass
//!   finite and within the tolerance of the given options' (what the forward does not cover:
//!   graphs, cache sums, tables, the sampler update); then [`TuneSettings::warmup`] passes
//!   more and [`TuneSettings::runs`] timed ones, CUDA events around each; the median counts;
//! - **combines**: the candidates that beat the given options alone are tried together,
//!   greedily ([`TuneSettings::combine`]): from the fastest, each next-fastest winner's settings
//!   are added ([`Tunable::merge_settings`]; two that set one option differently are
//!   alternatives and are not combined), the sum checked and timed as a candidate of its own,
//!   and kept as the base for the next where it beats the base by the margin. The built-in
//!   paths are mostly independent (attention, the GEMM tiles, the LayerNorm fusions, launch
//!   order), so the fastest run is often several of them at once;
//! - **picks**: the given options are timed again last (a card still raising its clocks while
//!   they ran first would otherwise hand the next candidate the margin) and keep the better of
//!   their two medians; then the fastest candidate that passed, where it beats them by at least
//!   [`TuneSettings::min_gain`] (so noise does not trade a measured default for an unmeasured
//!   path), else the given options; a winner is then timed in turn with the given options
//!   ([`TuneSettings::confirm`] rounds) and kept only if it still saves the margin there; if
//!   it does not, the next fastest that beat the margin is timed in turn the same way, up to
//!   [`TuneSettings::contenders`] of them (a sum measured fast in a lucky window must not cost
//!   the part of it that is faster); the backend is left set to the choice.
//!
//! With a time budget ([`TuneSettings::budget`], from the start of [`tune`]), the search stops
//! where it is spent: the candidates and combinations not yet measured are listed as
//! [`TuneOutcome::Untried`], never chosen, and the choice is made as above among those measured
//! (the given options' second timing, where another row was measured, and the first
//! contender's head-to-head rounds still run: a few windows past the budget; the next
//! contenders only while it lasts, the rest listed as not timed in turn). Such a tuning is not
//! [`Tuning::complete`], and is never cached ([`Tuning::cached_choice`]).
//!
//! A candidate whose options come to an earlier one's at the run's rows
//! ([`Tunable::options_in_effect`]: a fusion that does not serve them) is not run again. A
//! candidate that fails (a kernel this card lacks, too little memory) is recorded with its
//! error and the others go on; if the failure left the CUDA context unusable, tuning stops
//! with that error. Paths differ in rounding only, so the bits of a tuned run can differ from
//! an untuned one's (within the tolerance), as with cuBLASLt's autotuning.
//!
//! Tuning a backend for one image with CFG over 250 DDPM steps at FORA N = 3, then sampling
//! on the choice:
//!
//! ```no_run
//! use fora::backend::{Guidance, GuidanceMode, NoiseSource};
//! use fora::cache::StaticInterval;
//! use fora::cuda::tune::{default_candidates, tune, TuneSettings};
//! use fora::cuda::{CudaBackend, CudaOptions, Gpu};
//! use fora::sampler::{Sampler, SamplerOptions};
//!
//! let (config, weights) = fora::weights::DitWeights::load("DiT-XL-2-256.safetensors", None)?;
//! let mut backend =
//!     CudaBackend::with_options(Gpu::new(0)?, &config, &weights, CudaOptions::default())?;
//! let options = SamplerOptions::ddpm(250).with_guidance(Some(Guidance {
//!     scale: 4.0,
//!     mode: GuidanceMode::Official3,
//! }));
//! let (plan, schedule) = {
//!     let sampler = Sampler::new(&backend, options.clone())?;
//!     let plan = sampler.plan(&[207], NoiseSource::Seed(0))?;
//!     (plan, sampler.schedule(&mut StaticInterval::new(3)?))
//! };
//! let candidates = default_candidates();
//! let tuning = tune(&mut backend, &plan, &schedule, &candidates, &TuneSettings::default())?;
//! eprintln!("{}", tuning.markdown());
//! // The backend now runs the chosen options (`tuning.chosen().settings` over the given ones).
//! let sampler = Sampler::new(&backend, options)?;
//! let out = sampler.sample(&[207], NoiseSource::Seed(0), &mut StaticInterval::new(3)?)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

use super::backend::{CudaBackend, CudaOptions};
use crate::backend::{Backend, SamplePlan, StepMode, StepSpec};
use crate::bench::Stats;
use crate::watchdog::Watchdog;
use anyhow::{bail, ensure, Context, Result};

/// What [`tune`] needs of a backend beside [`Backend`]: its options, set from settings words,
/// a timed window of steps, and whether the device still answers after a failure.
/// [`CudaBackend`] is the one that matters; the trait lets the tuning loop run on a CPU mock in
/// the tests.
pub trait Tunable: Backend {
    /// The execution options a candidate sets.
    type Options: Copy + PartialEq + std::fmt::Debug;

    /// The options later workspaces and forwards use.
    fn tuned_options(&self) -> Self::Options;

    /// Changes them.
    fn set_tuned_options(&mut self, options: Self::Options);

    /// `options` with a candidate's settings applied (`NAME=value` words).
    fn apply_settings(options: Self::Options, settings: &str) -> Result<Self::Options>;

    /// On a fresh workspace of `plan`: `steps` once untimed, the latents' change over it
    /// recorded, then `warmup` more times untimed and `runs` times timed.
    fn run_window(
        &self,
        plan: &SamplePlan,
        steps: &[StepSpec],
        warmup: usize,
        runs: usize,
    ) -> Result<WindowRun>;

    /// Ok while the device answers (a failed candidate may have left it unusable).
    fn still_usable(&self) -> Result<()>;

    /// `options` as they run at `plan`'s rows: switches that change nothing there turned off,
    /// so that two candidates that come to the same launches compare equal (the later one is
    /// not run again). By default `options` as they are.
    fn options_in_effect(&self, options: Self::Options, _plan: &SamplePlan) -> Self::Options {
        options
    }

    /// The settings of two candidates at once, or `None` where they set one option to
    /// different values (alternatives, such as two attention kernels). By default
    /// [`merge_settings_with`] joining nothing.
    fn merge_settings(first: &str, second: &str) -> Result<Option<String>> {
        merge_settings_with(first, second, |_, _, _| None)
    }
}

/// The settings of two candidates at once: `first`'s `NAME=value` words (the last of a name
/// counts, as when they are applied), then `second`'s for the names `first` lacks. Where both
/// set a name to different values, `join(name, first's, second's)` gives the value that does
/// both (a list option), or `None`: the candidates are alternatives and the result is `None`.
/// A word that is not `NAME=value` is an error.
pub fn merge_settings_with(
    first: &str,
    second: &str,
    join: impl Fn(&str, &str, &str) -> Option<String>,
) -> Result<Option<String>> {
    fn words(settings: &str) -> Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = Vec::new();
        for word in settings.split_whitespace() {
            let Some((name, value)) = word.split_once('=') else {
                bail!("option setting {word:?} is not NAME=value");
            };
            match out.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = value.to_string(),
                None => out.push((name.to_string(), value.to_string())),
            }
        }
        Ok(out)
    }
    let mut merged = words(first)?;
    for (name, value) in words(second)? {
        match merged.iter_mut().find(|(n, _)| *n == name) {
            None => merged.push((name, value)),
            Some((_, v)) if *v == value => {}
            Some((_, v)) => match join(&name, v, &value) {
                Some(joined) => *v = joined,
                None => return Ok(None),
            },
        }
    }
    Ok(Some(
        merged
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    ))
}

/// What [`Tunable::run_window`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowRun {
    /// The latents after the first, untimed pass of the window minus the latents before it
    /// (the plan's x_T): what the candidate's steps did, compared between candidates.
    pub first_change: Vec<f32>,
    /// The timed passes, in ms.
    pub stats: Stats,
}

impl Tunable for CudaBackend {
    type Options = CudaOptions;

    fn tuned_options(&self) -> CudaOptions {
        self.options()
    }

    fn set_tuned_options(&mut self, options: CudaOptions) {
        self.set_options(options);
    }

    fn apply_settings(options: CudaOptions, settings: &str) -> Result<CudaOptions> {
        options.with_settings(settings)
    }

    /// The latents read before and after the first pass; CUDA events around each timed
    /// window on the backend's stream (the bench's `Timer`: the host does not wait between
    /// windows).
    fn run_window(
        &self,
        plan: &SamplePlan,
        steps: &[StepSpec],
        warmup: usize,
        runs: usize,
    ) -> Result<WindowRun> {
        let mut ws = self.workspace(plan).context("building the workspace")?;
        let pass = |ws: &mut _| -> Result<()> {
            for spec in steps {
                self.step(ws, spec)
                    .with_context(|| format!("step {} ({:?})", spec.k, spec.mode))?;
            }
            Ok(())
        };
        let before = self.latents(&mut ws).context("reading the first latents")?;
        pass(&mut ws)?;
        let after = self
            .latents(&mut ws)
            .context("reading the latents after the first window")?;
        let timer = crate::bench::timer::Timer {
            warmup,
            runs,
            profiler_api: false,
            // The tuning's own watchdog watches the whole candidate.
            watchdog: None,
        };
        let stats = timer.time(self.gpu(), |_| pass(&mut ws))?;
        // cudarc keeps an error of a free in a destructor for the next call on the context,
        // whatever it is: freed here and asked at once, it is this candidate's.
        drop(ws);
        self.gpu()
            .context()
            .check_err()
            .context("freeing the workspace")?;
        Ok(WindowRun {
            first_change: after.iter().zip(&before).map(|(a, b)| a - b).collect(),
            stats,
        })
    }

    fn still_usable(&self) -> Result<()> {
        self.gpu().synchronize()
    }

    /// [`CudaBackend::options_in_effect`] at the plan's model rows.
    fn options_in_effect(&self, options: CudaOptions, plan: &SamplePlan) -> CudaOptions {
        CudaBackend::options_in_effect(self, options, plan.model_rows())
    }

    /// `FORA_TMA_TILES` of both joined where they force no shape differently.
    fn merge_settings(first: &str, second: &str) -> Result<Option<String>> {
        merge_settings_with(first, second, |name, a, b| match name {
            "FORA_TMA_TILES" => {
                let a: super::gemm::TmaOverrides = a.parse().ok()?;
                let b: super::gemm::TmaOverrides = b.parse().ok()?;
                Some(a.union(&b)?.to_string())
            }
            _ => None,
        })
    }
}

/// One set of options to try: a name for reports and `NAME=value` settings applied on top of
/// the options given to [`tune`] ([`CudaOptions::with_settings`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TuneCandidate {
    /// A short name (`gemm_ln`, `ours_pdl`).
    pub name: String,
    /// Whitespace-separated `NAME=value` words; empty for the options as given.
    pub settings: String,
}

impl TuneCandidate {
    /// A candidate named `name` with `settings`.
    pub fn new(name: &str, settings: &str) -> TuneCandidate {
        TuneCandidate {
            name: name.to_string(),
            settings: settings.to_string(),
        }
    }

    /// Candidates written `name:SETTINGS` and separated by semicolons (a setting's value may
    /// hold commas: `FORA_TMA_TILES`) (`"gemm_ln:FORA_GEMM_LN=1;pdl:FORA_PDL=1 FORA_GEMM=tma"`),
    /// each name a word of letters,
    /// digits and `_`, given once; settings as [`CudaOptions::with_settings`] takes them (checked
    /// here against the defaults, so a typo fails before any GPU work).
    pub fn parse_list(list: &str) -> Result<Vec<TuneCandidate>> {
        let mut out: Vec<TuneCandidate> = Vec::new();
        for item in list.split(';').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, settings) = item.split_once(':').unwrap_or((item, ""));
            let name = name.trim();
            ensure!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "tuning candidate {item:?}: the name before ':' must be letters, digits or '_'"
            );
            ensure!(
                out.iter().all(|c| c.name != name),
                "tuning candidate {name:?} is given twice"
            );
            CudaOptions::default()
                .with_settings(settings)
                .with_context(|| format!("tuning candidate {name:?}"))?;
            out.push(TuneCandidate::new(name, settings.trim()));
        }
        ensure!(!out.is_empty(), "no tuning candidates in {list:?}");
        Ok(out)
    }
}

/// The paths [`tune`] tries by default, the options as given first: each opt-in path of the
/// backend that a demanding run may want, alone where it stands alone and in the combinations
/// that remove a block's launches together. A path that does not serve the run's rows or card
/// (a Hopper fusion elsewhere, the many-rows tile at one image) runs as the options without it
/// and so is never faster.
pub fn default_candidates() -> Vec<TuneCandidate> {
    [
        ("given", ""),
        // Paths that ran on a GPU before (session 7's PDL, session 19's TMA attention)...
        ("pdl", "FORA_PDL=1"),
        ("attention_tma", "FORA_ATTENTION=tma"),
        // cuBLASLt's first heuristic algorithms timed per shape: +2% at 256 rows in session
        // 18's runs, nothing at 2 (its choice, and so its bits, can differ from one workspace
        // to the next, within the tolerance).
        ("lt_autotune", "FORA_LT_AUTOTUNE=1"),
        // ... then those that had not when this list was written (sessions 23-26), so that a
        // log holds the others' times should one of these hang.
        ("attention_tma_pp", "FORA_ATTENTION=tma_pp"),
        ("prefetch_weights", "FORA_PREFETCH_WEIGHTS=1"),
        // Under cuBLASLt, one DiT-XL GEMM shape at a time routed to our TMA tile for it
        // (`FORA_TMA_TILES`, on a Hopper): qkv and fc1 on session 26's narrow tiles, proj and
        // fc2 on session 22's cluster split-K ones. One shape a candidate, so that the
        // combination stage keeps the routes that pay and leaves those that do not.
        ("lt_qkv_narrow", "FORA_TMA_TILES=3456x1152=128x112"),
        ("lt_fc1_narrow", "FORA_TMA_TILES=4608x1152=128x144"),
        ("lt_proj_cluster_k", "FORA_TMA_TILES=1152x1152=k3-128x128"),
        ("lt_fc2_cluster_k", "FORA_TMA_TILES=1152x4608=k3-128x128"),
        ("qkv_attention", "FORA_QKV_ATTENTION=1"),
        ("gemm_ln", "FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1"),
        (
            "gemm_ln_one_per_sm",
            "FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1 FORA_GEMM_LN_ONE_PER_SM=1",
        ),
        (
            "gemm_ln_wide",
            "FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1 FORA_GEMM_LN_WIDE=1",
        ),
        (
            "qkv_gemm_ln",
            "FORA_QKV_ATTENTION=1 FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1",
        ),
        (
            "fused_pdl",
            "FORA_QKV_ATTENTION=1 FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1 FORA_PDL=1",
        ),
        ("tma", "FORA_GEMM=tma"),
        (
            "ours_pdl",
            "FORA_GEMM=tma FORA_QKV_ATTENTION=1 FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1 FORA_PDL=1",
        ),
    ]
    .into_iter()
    .map(|(name, settings)| TuneCandidate::new(name, settings))
    .collect()
}

/// How [`tune`] measures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TuneSettings {
    /// Steps of the timed window, at least (the window runs on to the step before the next
    /// computing step, or the run's end).
    pub window: usize,
    /// Untimed windows before the timed ones.
    pub warmup: usize,
    /// Timed windows (the median counts).
    pub runs: usize,
    /// The largest relative L2 distance of a candidate's forward, and of its first window's
    /// change of the latents, from the given options' (the whole-forward tolerance against the
    /// CPU reference: 2e-2).
    pub tolerance: f64,
    /// The fraction of the given options' window time another candidate must save to be
    /// chosen (0.01: 1% faster).
    pub min_gain: f64,
    /// Whether the candidates that beat the given options alone are then tried together
    /// (greedily, fastest first; see the module comment).
    pub combine: bool,
    /// Rounds of timing the winner and the given options in turn before the winner is taken
    /// (0: none): it stays chosen only if the median of its rounds still saves `min_gain` of
    /// theirs, so that a drift of the card between their first timings cannot pick it.
    pub confirm: usize,
    /// How many of the candidates that beat the given options by the margin, fastest first,
    /// are timed in turn with them until one is confirmed (at least one; with `confirm` 0 the
    /// fastest is taken).
    pub contenders: usize,
    /// A line to stderr per candidate as it starts and as it ends, and per head-to-head round
    /// and choice (default on: the device suite reads them to name a candidate that hung or
    /// killed the process); off, tuning prints nothing and the result is only the returned
    /// [`Tuning`].
    pub progress: bool,
    /// The longest the search may take, counted from the start of [`tune`] (`None`, the
    /// default: no limit). Checked before each candidate after the given options (which always
    /// run) and before each combination: once it is spent, those not yet measured are listed as
    /// [`TuneOutcome::Untried`] (a candidate whose options come to an earlier one's is still
    /// listed as [`TuneOutcome::SameAs`]: that costs nothing) and the combination stage is
    /// skipped. The given options' second timing (where another row was measured) and the
    /// first contender's head-to-head rounds still run (a few windows: they keep a drifting
    /// card from choosing wrongly); the budget is checked again before each next contender,
    /// which is otherwise listed as not timed in turn ([`TuneOutcome::Untried`]). So a tuning
    /// ends a little past its budget, instead of being killed by an outer timeout with nothing
    /// to show. A measurement in flight is never cut. A tuning cut short is not
    /// [`Tuning::complete`] and has no [`Tuning::cached_choice`]. Not part of [`TuneSettings::key`]: a complete tuning
    /// is the same with or without a budget, and one cut short is never cached.
    pub budget: Option<std::time::Duration>,
    /// The longest one measurement of a candidate may take (its check and timed windows, or
    /// one later timing of it) before the process is ended (`None`, the default: no limit),
    /// or ten times what the given options' first measurement took where that is longer (a
    /// batch of many rows is not a hang). The given options' first measurement, the
    /// reference, is not watched: they are the options the caller runs anyway (the defaults in
    /// the device suite), and it is what the other limits scale from. A launch that never ends (a deadlock in a kernel new to the card) cannot be stopped
    /// from the host, and the context is lost with it: past the limit a thread prints
    /// `tune: R rows, NAME: no answer after S s: tuning stopped: candidate "NAME" left the GPU
    /// unusable ...` to stderr and ends the process at once with exit status
    /// [`crate::watchdog::WATCHDOG_EXIT`], running no destructors (they would wait on the device). So only for a
    /// process whose job the tuning is (`fora bench --tune`, `fora sample --tune`): the device
    /// suite then tunes again in a new process without that candidate, instead of losing the
    /// rest of its time to the hang. Not part of [`TuneSettings::key`].
    pub watchdog: Option<std::time::Duration>,
}

/// Prints `line` to stderr when `on` ([`TuneSettings::progress`]).
fn progress(on: bool, line: impl FnOnce() -> String) {
    if on {
        eprintln!("{}", line());
    }
}

impl Default for TuneSettings {
    fn default() -> TuneSettings {
        TuneSettings {
            window: 12,
            warmup: 1,
            runs: 5,
            tolerance: 2e-2,
            min_gain: 0.01,
            combine: true,
            confirm: 2,
            contenders: 3,
            progress: true,
            budget: None,
            watchdog: None,
        }
    }
}

impl TuneSettings {
    /// What of these settings a choice depends on, for [`TuneKey::search`] (the window's
    /// length, the tolerance, the margin, combining; not how many windows are timed, nor the
    /// [`budget`](TuneSettings::budget): only complete tunings are cached).
    pub fn key(&self) -> String {
        format!(
            "window {} steps, tolerance {:e}, margin {}, {}, confirmed in {} rounds (of {} at most)",
            self.window,
            self.tolerance,
            self.min_gain,
            if self.combine {
                "winners combined"
            } else {
                "candidates alone"
            },
            self.confirm,
            self.contenders.max(1)
        )
    }
}

/// What became of a candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum TuneOutcome {
    /// The one the backend now runs.
    Chosen,
    /// Measured and correct, not chosen.
    Slower,
    /// Its options come to those of an earlier candidate (named) at the run's rows
    /// ([`Tunable::options_in_effect`]): not run again.
    SameAs(String),
    /// Its forward or its steps were not finite or not within the tolerance (the reason).
    Rejected(String),
    /// The fastest, but not by the margin when timed in turn with the given options
    /// ([`TuneSettings::confirm`]; the times).
    Unconfirmed(String),
    /// It failed to run (the error).
    Failed(String),
    /// Never measured, or measured but never timed in turn with the given options (a contender
    /// after the first): the tuning's time budget ([`TuneSettings::budget`]) was spent before
    /// its turn (the reason). Never chosen; the tuning is not [`Tuning::complete`].
    Untried(String),
}

/// One candidate's results.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneRow<O = CudaOptions> {
    /// The candidate's name.
    pub name: String,
    /// Its settings.
    pub settings: String,
    /// The options it ran with.
    pub options: O,
    /// Relative L2 distance of its forward from the given options' (0 for those).
    pub rel_l2: Option<f64>,
    /// Relative L2 distance of its first window's change of the latents from the given
    /// options' (0 for those): the steps as the run takes them (graphs, cache sums, tables,
    /// the sampler update), which the forward does not.
    pub steps_rel_l2: Option<f64>,
    /// The timed windows, in ms.
    pub window: Option<Stats>,
    /// What became of it.
    pub outcome: TuneOutcome,
}

/// The result of [`tune`]: every candidate in order, the one chosen among them.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning<O = CudaOptions> {
    /// Model rows of the run (CFG half included).
    pub rows: usize,
    /// Steps of the timed window and how many of them compute.
    pub window_steps: usize,
    /// Computing steps in the window.
    pub window_computing: usize,
    /// Steps of the whole run (the window's time x steps / window steps estimates it).
    pub run_steps: usize,
    /// Every candidate, in the order tried, then the combinations tried (see
    /// [`TuneSettings::combine`]), each named by its parts joined with `+` (where the budget
    /// ran out during that stage, those it would have tried next on its base, untried).
    pub rows_tried: Vec<TuneRow<O>>,
    /// How many of `rows_tried` are candidates (the rest are combinations).
    pub candidates: usize,
    /// Index of the chosen one in `rows_tried`.
    pub chosen: usize,
    /// The given options' and the winner's median windows when timed in turn
    /// ([`TuneSettings::confirm`]), in ms: the chosen one's, or where none was confirmed the
    /// last contender's; `None` where the given options won outright.
    pub head_to_head: Option<(f64, f64)>,
}

impl<O> Tuning<O> {
    /// The chosen candidate.
    pub fn chosen(&self) -> &TuneRow<O> {
        &self.rows_tried[self.chosen]
    }

    /// How many rows were never measured ([`TuneOutcome::Untried`]: the time budget ran out).
    pub fn untried(&self) -> usize {
        self.rows_tried
            .iter()
            .filter(|r| matches!(r.outcome, TuneOutcome::Untried(_)))
            .count()
    }

    /// Whether the search ran to its end: every candidate, and every combination the
    /// combination stage chose to try, measured (false where [`TuneSettings::budget`] cut it
    /// short). Only a complete tuning's choice is worth caching.
    pub fn complete(&self) -> bool {
        self.untried() == 0
    }

    /// The given options' median window over the chosen one's (1 where the given options won):
    /// from the head-to-head timing where the chosen one had one.
    pub fn speedup(&self) -> Option<f64> {
        if let (Some((given, chosen)), true) = (self.head_to_head, self.chosen != 0) {
            return (chosen > 0.0).then(|| given / chosen);
        }
        let given = self.rows_tried.first()?.window.as_ref()?.median_ms;
        let chosen = self.chosen().window.as_ref()?.median_ms;
        (chosen > 0.0).then(|| given / chosen)
    }

    /// A Markdown table of every candidate, the chosen one marked.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Tuned at {} rows: a window of {} steps ({} computing) of the {}-step run, median of \
             the timed windows (the given options timed first and again last, the better kept); \
             the run estimated as window x {}/{}. rel-L2 against the given options': of the \
             forward, and of the latents' change over the first window.{}{}\n\n\
             | candidate | settings | window ms | run ms (est.) | rel-L2 forward | rel-L2 steps | outcome |\n\
             |---|---|---|---|---|---|---|\n",
            self.rows,
            self.window_steps,
            self.window_computing,
            self.run_steps,
            self.run_steps,
            self.window_steps,
            if self.rows_tried.len() > self.candidates {
                " Rows named a+b: candidates that beat the given options alone, tried together."
            } else {
                ""
            },
            match self.untried() {
                0 => String::new(),
                n => format!(
                    " Cut short by the time budget: {n} row(s) not tried, never measured; the \
                     choice is among those measured."
                ),
            }
        );
        for r in &self.rows_tried {
            let (window, run) = match &r.window {
                Some(w) => (
                    format!("{:.3}", w.median_ms),
                    format!(
                        "{:.1}",
                        w.median_ms * self.run_steps as f64 / self.window_steps.max(1) as f64
                    ),
                ),
                None => ("—".to_string(), "—".to_string()),
            };
            let outcome = match &r.outcome {
                TuneOutcome::Chosen => "**chosen**".to_string(),
                TuneOutcome::Slower => "slower".to_string(),
                TuneOutcome::SameAs(n) => format!("same path as {n}"),
                TuneOutcome::Rejected(why) => format!("rejected: {why}"),
                TuneOutcome::Unconfirmed(why) => format!("not confirmed: {why}"),
                TuneOutcome::Failed(e) => format!("failed: {}", e.replace('|', "/")),
                TuneOutcome::Untried(why) => format!("not tried: {why}"),
            };
            let rel = |e: Option<f64>| e.map_or("—".to_string(), |e| format!("{e:.2e}"));
            s += &format!(
                "| {} | `{}` | {window} | {run} | {} | {} | {outcome} |\n",
                r.name,
                if r.settings.is_empty() {
                    "(as given)"
                } else {
                    &r.settings
                },
                rel(r.rel_l2),
                rel(r.steps_rel_l2),
            );
        }
        s
    }
}

/// Steps of the timed window: at least `target` (and at least one), then on to the step
/// before the next computing step, so that the window ends where a run of reuse steps ends
/// (a reuse step's cache sums serve the steps after it) and repeats from a computing step;
/// the whole schedule if it is shorter.
pub fn window_len(modes: &[StepMode], target: usize) -> usize {
    let mut w = target.max(1).min(modes.len());
    while w < modes.len() && modes[w] != StepMode::Compute {
        w += 1;
    }
    w
}

/// The candidates that beat the first (the given options), strictly and by at least
/// `min_gain` of its time, from their median window times (`None` for those that did not
/// pass), fastest first (the earlier of equal times first). Empty if the first has no time.
pub fn winners(times_ms: &[Option<f64>], min_gain: f64) -> Vec<usize> {
    let Some(Some(given)) = times_ms.first() else {
        return Vec::new();
    };
    let mut won: Vec<(usize, f64)> = times_ms
        .iter()
        .enumerate()
        .skip(1)
        .filter_map(|(i, t)| t.map(|t| (i, t)))
        // Strictly faster as well: at a margin of 0, a tie is no reason to change path.
        .filter(|&(_, t)| t < *given && t <= given * (1.0 - min_gain))
        .collect();
    won.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    won.into_iter().map(|(i, _)| i).collect()
}

/// The candidate to choose from the median window times of those that passed (`None` for
/// the others; the first is the given options): the fastest, if it saves at least `min_gain`
/// of the first's time, else the first. `None` if the first has no time.
pub fn choose(times_ms: &[Option<f64>], min_gain: f64) -> Option<usize> {
    times_ms.first()?.as_ref()?;
    Some(winners(times_ms, min_gain).first().copied().unwrap_or(0))
}

/// Fixed random forward inputs of a plan's rows: x `[rows, C, H, W]` (standard normal), every
/// row at the run's first timestep, the plan's labels (and the null class on the CFG half).
fn forward_inputs<B: Backend>(backend: &B, plan: &SamplePlan) -> (Vec<f32>, Vec<i64>, Vec<usize>) {
    let cfg = backend.config();
    let rows = plan.model_rows();
    let mut x = vec![0f32; rows * cfg.image_len()];
    crate::rng::fill_normal(0x7475_6e65, 0, &mut x);
    let t = vec![plan.timesteps.first().copied().unwrap_or(0); rows];
    let mut y = plan.classes.clone();
    if plan.guidance.is_some() {
        y.extend(std::iter::repeat_n(cfg.null_class(), plan.classes.len()));
    }
    (x, t, y)
}

/// Relative L2 distance of `out` from `reference`, or why it is not acceptable (not finite,
/// or past `tolerance`); `what` names the compared quantity.
fn checked_distance(
    what: &str,
    out: &[f32],
    reference: &[f32],
    tolerance: f64,
) -> (f64, Option<String>) {
    if let Some(j) = out.iter().position(|v| !v.is_finite()) {
        return (f64::NAN, Some(format!("{what} value {j} is {}", out[j])));
    }
    let rel = super::testing::rel_l2(out, reference);
    let why =
        (rel > tolerance).then(|| format!("{what} rel-L2 {rel:.2e} > tolerance {tolerance:.0e}"));
    (rel, why)
}

impl<O> TuneRow<O> {
    /// A row with nothing measured yet: `outcome` says why (or what measuring will set).
    fn unmeasured(name: &str, settings: &str, options: O, outcome: TuneOutcome) -> TuneRow<O> {
        TuneRow {
            name: name.to_string(),
            settings: settings.to_string(),
            options,
            rel_l2: None,
            steps_rel_l2: None,
            window: None,
            outcome,
        }
    }

    /// A row of a candidate whose options come to those of the earlier row `earlier` (not
    /// run again).
    fn same_as(c: &TuneCandidate, options: O, earlier: &str) -> TuneRow<O> {
        let outcome = TuneOutcome::SameAs(earlier.to_string());
        TuneRow::unmeasured(&c.name, &c.settings, options, outcome)
    }

    /// A row of a candidate (or combination) never measured: the time budget was spent.
    fn untried(name: &str, settings: &str, options: O, why: &str) -> TuneRow<O> {
        TuneRow::unmeasured(
            name,
            settings,
            options,
            TuneOutcome::Untried(why.to_string()),
        )
    }

    /// The median window of a candidate that passed its checks (and is not a repeat; never
    /// one rejected, failed, or not tried).
    fn passed_ms(&self) -> Option<f64> {
        match self.outcome {
            TuneOutcome::Slower | TuneOutcome::Chosen => self.window.as_ref().map(|w| w.median_ms),
            _ => None,
        }
    }
}

/// What measuring a candidate needs: the run, its window, the check forward's inputs, the
/// given options' forward and first change of the latents (the reference; set by the first
/// candidate measured, the given options), and when the tuning started (its budget's clock).
struct CandidateBench<'a> {
    plan: &'a SamplePlan,
    window: &'a [StepSpec],
    inputs: (&'a [f32], &'a [i64], &'a [usize]),
    settings: &'a TuneSettings,
    reference: Option<(Vec<f32>, Vec<f32>)>,
    started: std::time::Instant,
    /// [`TuneSettings::watchdog`]'s thread, where one is set.
    watchdog: Option<Watchdog>,
    /// How long the given options' first measurement took: what the watchdog expects of each
    /// later one ([`Watchdog::arm_expecting`]).
    given_took: std::time::Duration,
}

/// A duration in seconds as a person writes it: `90 s`, `0.5 s`.
fn seconds(d: std::time::Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

impl CandidateBench<'_> {
    /// Why the next candidate or combination is not tried, where [`TuneSettings::budget`] is
    /// spent; `None` while there is time left (or no budget).
    fn budget_spent(&self) -> Option<String> {
        let budget = self.settings.budget?;
        (self.started.elapsed() >= budget)
            .then(|| format!("the tuning's time budget ({}) was spent", seconds(budget)))
    }

    /// The progress line of the budget stopping the search: `left` of `what` not tried.
    fn log_budget_stop(&self, left: usize, what: &str) {
        progress(self.settings.progress, || {
            format!(
                "tune: {} rows, time budget ({}) spent after {:.1} s: {left} {what} left untried",
                self.plan.model_rows(),
                self.settings.budget.map_or_else(String::new, seconds),
                self.started.elapsed().as_secs_f64()
            )
        });
    }

    /// Checks and times one candidate on `backend` (left set to `options`), as the module
    /// comment says, and logs its line. `first`: the given options, which become the
    /// reference. A candidate that fails is a row saying so; an error only where the tuning
    /// must stop: the given options failing, or the device unusable after a failure.
    fn measure<B: Tunable>(
        &mut self,
        backend: &mut B,
        name: &str,
        settings: &str,
        options: B::Options,
        first: bool,
    ) -> Result<TuneRow<B::Options>> {
        // Before it runs, so that a log cut short by a hang or a crash names the candidate in
        // flight (the device suite tunes again without it).
        progress(self.settings.progress, || {
            format!("tune: {} rows, {name}: measuring", self.plan.model_rows())
        });
        let mut row = TuneRow::unmeasured(name, settings, options, TuneOutcome::Slower);
        let started = std::time::Instant::now();
        let watchdog = self.watchdog.as_ref().filter(|_| !first);
        let _watch = Watchdog::arm_expecting(watchdog, name, self.given_took);
        backend.set_tuned_options(options);
        let tolerance = self.settings.tolerance;
        let measured = (|| -> Result<()> {
            let (x, t, y) = self.inputs;
            let out = backend
                .forward(x, t, y, self.plan.guidance)
                .context("the check forward")?;
            if let Some((ref_out, _)) = &self.reference {
                let (rel, why) = checked_distance("forward", &out, ref_out, tolerance);
                row.rel_l2 = Some(rel);
                if let Some(why) = why {
                    row.outcome = TuneOutcome::Rejected(why);
                    return Ok(());
                }
            }
            let run = backend.run_window(
                self.plan,
                self.window,
                self.settings.warmup,
                self.settings.runs,
            )?;
            match &self.reference {
                None => {
                    let (_, bad) = checked_distance("forward", &out, &out, 0.0);
                    let (_, bad_steps) =
                        checked_distance("latents", &run.first_change, &run.first_change, 0.0);
                    if let Some(why) = bad.or(bad_steps) {
                        bail!("the given options' {why}");
                    }
                    row.rel_l2 = Some(0.0);
                    row.steps_rel_l2 = Some(0.0);
                    self.reference = Some((out, run.first_change));
                }
                Some((_, ref_change)) => {
                    let (rel, why) = checked_distance(
                        "steps: the latents' change",
                        &run.first_change,
                        ref_change,
                        tolerance,
                    );
                    row.steps_rel_l2 = Some(rel);
                    if let Some(why) = why {
                        row.outcome = TuneOutcome::Rejected(why);
                        return Ok(());
                    }
                }
            }
            row.window = Some(run.stats);
            Ok(())
        })();
        if first {
            self.given_took = started.elapsed();
        }
        match measured {
            Ok(()) => {}
            Err(e) if first => {
                return Err(e.context(format!(
                    "tuning: the given options (candidate {name:?}) failed"
                )));
            }
            Err(e) => {
                row.outcome = TuneOutcome::Failed(format!("{e:#}"));
                if let Err(sticky) = backend.still_usable() {
                    bail!(
                        "tuning stopped: candidate {name:?} left the GPU unusable ({sticky:#}); it \
                         failed with: {e:#}"
                    );
                }
            }
        }
        // A line per candidate as it ends, so that a log keeps what was measured even if a
        // later candidate hangs or kills the process.
        progress(self.settings.progress, || {
            format!(
                "tune: {} rows, {}: window {}, rel-L2 forward {} steps {}{}",
                self.plan.model_rows(),
                row.name,
                row.window
                    .as_ref()
                    .map_or("—".to_string(), |w| format!("{:.3} ms", w.median_ms)),
                row.rel_l2.map_or("—".to_string(), |e| format!("{e:.2e}")),
                row.steps_rel_l2
                    .map_or("—".to_string(), |e| format!("{e:.2e}")),
                match &row.outcome {
                    TuneOutcome::Rejected(why) => format!(", rejected: {why}"),
                    TuneOutcome::Failed(e) => format!(", failed: {e}"),
                    _ => String::new(),
                }
            )
        });
        Ok(row)
    }
}

/// The row of `rows` whose options run the same path as `options` at `plan`'s rows
/// ([`Tunable::options_in_effect`]), if any.
fn same_path<'r, B: Tunable>(
    backend: &B,
    plan: &SamplePlan,
    rows: &'r [TuneRow<B::Options>],
    options: B::Options,
) -> Option<&'r TuneRow<B::Options>> {
    let effect = backend.options_in_effect(options, plan);
    rows.iter()
        .find(|r| backend.options_in_effect(r.options, plan) == effect)
}

/// The greedy combination stage ([`TuneSettings::combine`]): the candidates that beat the given
/// options (`rows[0]`) by the margin, fastest first; from the fastest, each next one's settings
/// added to the base's ([`Tunable::merge_settings`]; alternatives and sums whose options were
/// already measured are skipped), the sum measured as a row of its own and made the base where
/// it beats the base by the margin. Where [`TuneSettings::budget`] is spent before a sum is
/// measured, that sum and the others the stage would try on the same base are rows not tried.
fn combine<B: Tunable>(
    backend: &mut B,
    bench: &mut CandidateBench,
    given: B::Options,
    rows: &mut Vec<TuneRow<B::Options>>,
) -> Result<()> {
    let keep = 1.0 - bench.settings.min_gain;
    let times: Vec<Option<f64>> = rows.iter().map(TuneRow::passed_ms).collect();
    let won = winners(&times, bench.settings.min_gain);
    let Some((&first, rest)) = won.split_first() else {
        return Ok(());
    };
    let (mut base, mut base_ms) = (first, times[first].unwrap_or(f64::INFINITY));
    let mut untried = 0;
    for &next in rest {
        let Some(settings) = B::merge_settings(&rows[base].settings, &rows[next].settings)? else {
            continue;
        };
        let name = format!("{}+{}", rows[base].name, rows[next].name);
        let options = B::apply_settings(given, &settings)
            .with_context(|| format!("tuning: the combined settings of {name}"))?;
        if same_path(backend, bench.plan, rows, options).is_some() {
            continue;
        }
        if let Some(why) = bench.budget_spent() {
            rows.push(TuneRow::untried(&name, &settings, options, &why));
            untried += 1;
            continue;
        }
        let row = bench.measure(backend, &name, &settings, options, false)?;
        let ms = row.passed_ms();
        rows.push(row);
        if let Some(ms) = ms.filter(|&ms| ms <= base_ms * keep) {
            (base, base_ms) = (rows.len() - 1, ms);
        }
    }
    if untried > 0 {
        bench.log_budget_stop(untried, "combinations");
    }
    Ok(())
}

/// Tries `candidates` on a run of `plan` whose steps are `schedule`
/// ([`crate::sampler::Sampler::schedule`]), as the module comment says, and leaves `backend`
/// set to the chosen options. The options as given are the reference and the baseline: a
/// candidate `given` with no settings is put first unless the first candidate's options are
/// already those. Errors (the given options set back) on bad settings, when the given options
/// fail or give non-finite numbers, and when a failure leaves the device unusable. With
/// [`TuneSettings::budget`], the search stops where it is spent (see there).
pub fn tune<B: Tunable>(
    backend: &mut B,
    plan: &SamplePlan,
    schedule: &[StepSpec],
    candidates: &[TuneCandidate],
    settings: &TuneSettings,
) -> Result<Tuning<B::Options>> {
    let started = std::time::Instant::now();
    ensure!(
        !candidates.is_empty(),
        "tuning needs at least one candidate"
    );
    ensure!(
        settings.runs > 0 && settings.window > 0,
        "tuning needs a window of at least one step, timed at least once (window {}, runs {})",
        settings.window,
        settings.runs
    );
    ensure!(
        settings.tolerance.is_finite() && settings.tolerance >= 0.0,
        "tuning tolerance {} is not a finite number >= 0",
        settings.tolerance
    );
    ensure!(
        (0.0..1.0).contains(&settings.min_gain),
        "tuning margin {} is not in [0, 1)",
        settings.min_gain
    );
    ensure!(
        schedule.len() == plan.steps && schedule.first().map(|s| s.mode) == Some(StepMode::Compute),
        "tuning: the schedule has {} steps for a {}-step plan, the first must compute",
        schedule.len(),
        plan.steps
    );
    let given = backend.tuned_options();
    // Every candidate's settings are read before anything runs, so that a bad one fails the
    // tuning with the backend untouched; the given options first.
    let mut list = candidates
        .iter()
        .map(|c| {
            B::apply_settings(given, &c.settings)
                .map(|o| (c.clone(), o))
                .with_context(|| format!("tuning candidate {:?}", c.name))
        })
        .collect::<Result<Vec<_>>>()?;
    if list[0].1 != given {
        let name = if list.iter().any(|(c, _)| c.name == "given") {
            "as_given"
        } else {
            "given"
        };
        list.insert(0, (TuneCandidate::new(name, ""), given));
    }
    let modes: Vec<StepMode> = schedule.iter().map(|s| s.mode).collect();
    let w = window_len(&modes, settings.window);
    let window = &schedule[..w];
    let (x, t, y) = forward_inputs(backend, plan);
    let mut bench = CandidateBench {
        plan,
        window,
        inputs: (&x, &t, &y),
        settings,
        reference: None,
        started,
        watchdog: match settings.watchdog {
            Some(limit) => {
                let rows = plan.model_rows();
                Some(Watchdog::start(limit, move |name, after| {
                    format!(
                        "tune: {rows} rows, {name}: no answer after {after}: tuning stopped: \
                         candidate {name:?} left the GPU unusable (a launch that does not end; \
                         the watchdog ends the process, exit status {})",
                        crate::watchdog::WATCHDOG_EXIT
                    )
                })?)
            }
            None => None,
        },
        given_took: std::time::Duration::ZERO,
    };
    let fail = |backend: &mut B, e: anyhow::Error| -> anyhow::Error {
        backend.set_tuned_options(given);
        e
    };
    let mut rows: Vec<TuneRow<B::Options>> = Vec::new();
    // The budget is checked before each candidate after the first (the given options, which
    // always run); once spent it stays spent (a monotonic clock).
    let mut untried = 0;
    for (c, options) in &list {
        if let Some(same) = same_path(backend, plan, &rows, *options) {
            rows.push(TuneRow::same_as(c, *options, &same.name));
            continue;
        }
        if let Some(why) = bench.budget_spent().filter(|_| !rows.is_empty()) {
            rows.push(TuneRow::untried(&c.name, &c.settings, *options, &why));
            untried += 1;
            continue;
        }
        let row = bench.measure(backend, &c.name, &c.settings, *options, rows.is_empty());
        rows.push(row.map_err(|e| fail(backend, e))?);
    }
    let candidates_tried = rows.len();
    if untried > 0 {
        let what = if settings.combine {
            "candidates (and the combination stage)"
        } else {
            "candidates"
        };
        bench.log_budget_stop(untried, what);
    }
    // A search cut short does not combine: the winners so far are not all the winners.
    if settings.combine && untried == 0 {
        combine(backend, &mut bench, given, &mut rows).map_err(|e| fail(backend, e))?;
    }
    // The given options again, last: a card that was still raising its clocks while they ran
    // first would otherwise hand the next candidate the margin. The better median counts.
    // The given options (or the winner) timed on a fresh workspace, the backend set to them.
    let watchdog = bench.watchdog.as_ref();
    let given_took = bench.given_took;
    let given_name = rows[0].name.clone();
    let time = |backend: &mut B, options: B::Options, name: &str, what: &str| -> Result<Stats> {
        let _watch = Watchdog::arm_expecting(watchdog, name, given_took);
        backend.set_tuned_options(options);
        let run = backend.run_window(plan, window, settings.warmup, settings.runs);
        Ok(run.with_context(|| format!("tuning: timing {what}"))?.stats)
    };
    // `confirm` rounds of the given options and `options` in turn: their median windows.
    let head_to_head_ms = |backend: &mut B, options: B::Options, name: &str| {
        let (mut given_ms, mut chosen_ms) = (Vec::new(), Vec::new());
        for _ in 0..settings.confirm {
            for (options, name, times) in [
                (given, given_name.as_str(), &mut given_ms),
                (options, name, &mut chosen_ms),
            ] {
                let what = "a contender against the given options";
                times.push(time(backend, options, name, what)?.median_ms);
            }
        }
        let median = |v: &[f64]| Stats::from_samples(v).map(|s| s.median_ms);
        anyhow::Ok((median(&given_ms)?, median(&chosen_ms)?))
    };
    // (Not where nothing else was measured: nothing to compare with.)
    if rows[1..].iter().any(|r| r.passed_ms().is_some()) {
        let again = time(backend, given, &given_name, "the given options again")
            .map_err(|e| fail(backend, e))?;
        progress(settings.progress, || {
            format!(
                "tune: {} rows, {} again: window {:.3} ms",
                plan.model_rows(),
                rows[0].name,
                again.median_ms
            )
        });
        if let Some(first) = &rows[0].window {
            if again.median_ms < first.median_ms {
                rows[0].window = Some(again);
            }
        }
    }
    let times: Vec<Option<f64>> = rows.iter().map(TuneRow::passed_ms).collect();
    let Some(fastest) = choose(&times, settings.min_gain) else {
        return Err(fail(
            backend,
            anyhow::anyhow!("tuning: the given options have no time (nothing to compare with)"),
        ));
    };
    // Head to head: a contender and the given options in turn, so that both see the same
    // state of the card (its clocks, its temperature) in every round; it is chosen only if it
    // still saves the margin. The contenders: those that beat the margin, fastest first.
    let mut chosen = fastest;
    let mut head_to_head = None;
    if fastest != 0 && settings.confirm > 0 {
        chosen = 0;
        let contenders = winners(&times, settings.min_gain);
        let contenders = &contenders[..contenders.len().min(settings.contenders.max(1))];
        for (i, &contender) in contenders.iter().enumerate() {
            // The first contender is always timed in turn; the next ones only while the budget
            // lasts (their rounds are the longest part of a tuning at many rows).
            if i > 0 {
                if let Some(why) = bench.budget_spent() {
                    for &c in &contenders[i..] {
                        rows[c].outcome = TuneOutcome::Untried(format!(
                            "not timed in turn with the given options: {why}"
                        ));
                    }
                    bench.log_budget_stop(contenders.len() - i, "contenders");
                    break;
                }
            }
            let (g, c) = head_to_head_ms(backend, rows[contender].options, &rows[contender].name)
                .map_err(|e| fail(backend, e))?;
            progress(settings.progress, || {
                format!(
                    "tune: {} rows, {} against {}, {} rounds in turn: {c:.3} against {g:.3} ms",
                    plan.model_rows(),
                    rows[contender].name,
                    rows[0].name,
                    settings.confirm
                )
            });
            head_to_head = Some((g, c));
            if c <= g * (1.0 - settings.min_gain) {
                chosen = contender;
                break;
            }
            rows[contender].outcome = TuneOutcome::Unconfirmed(format!(
                "{c:.3} ms against the given options' {g:.3} in turn"
            ));
        }
    }
    rows[chosen].outcome = TuneOutcome::Chosen;
    progress(settings.progress, || {
        format!(
            "tune: {} rows, chosen: {} ({})",
            plan.model_rows(),
            rows[chosen].name,
            if rows[chosen].settings.is_empty() {
                "the options as given"
            } else {
                &rows[chosen].settings
            }
        )
    });
    backend.set_tuned_options(rows[chosen].options);
    Ok(Tuning {
        rows: plan.model_rows(),
        window_steps: w,
        window_computing: modes[..w]
            .iter()
            .filter(|&&m| m == StepMode::Compute)
            .count(),
        run_steps: plan.steps,
        rows_tried: rows,
        candidates: candidates_tried,
        chosen,
        head_to_head,
    })
}

/// What a tuning's choice depends on: the card, the kernels in this binary, the model, the
/// run's rows and schedule, the options as given, the candidates and how they were weighed. A [`TuneCache`] entry
/// serves a run only when every field is the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TuneKey {
    /// The card: its name, compute capability and SM count.
    pub device: String,
    /// The crate's version and a hash of the embedded kernels.
    pub build: String,
    /// The model's architecture and latent size.
    pub model: String,
    /// Model rows of the run (CFG half included).
    pub rows: usize,
    /// The schedule: its steps, computing steps, and a hash of its modes in order.
    pub schedule: String,
    /// The options as given, as settings (`CudaOptions::env_overrides`).
    pub given: String,
    /// The candidates, `name:settings` joined by `;`.
    pub candidates: String,
    /// How the candidates were weighed ([`TuneSettings`]: the window, the tolerance, the
    /// margin, whether the winners were combined). Empty in entries written before it was
    /// part of the key, which therefore serve no run.
    pub search: String,
}

/// 64-bit FNV-1a of `bytes`, in hex: a stable fingerprint (not a secure hash).
fn fingerprint(chunks: &[&[u8]]) -> String {
    let h = chunks
        .iter()
        .fold(crate::fnv::OFFSET, |h, c| crate::fnv::bytes(h, c));
    format!("{h:016x}")
}

impl TuneKey {
    /// The key of tuning `backend` (with its current options) on `plan` / `schedule` over
    /// `candidates` with `settings`.
    pub fn for_run(
        backend: &CudaBackend,
        plan: &SamplePlan,
        schedule: &[StepSpec],
        candidates: &[TuneCandidate],
        settings: &TuneSettings,
    ) -> TuneKey {
        let gpu = backend.gpu();
        let (major, minor) = gpu.compute_capability();
        let kernels: Vec<&[u8]> = super::kernels::MODULES.iter().map(|m| m.1).collect();
        let cfg = backend.config();
        let modes: Vec<u8> = schedule
            .iter()
            .map(|s| match s.mode {
                StepMode::Compute => b'C',
                StepMode::Reuse => b'R',
            })
            .collect();
        TuneKey {
            device: format!("{} (sm_{major}{minor}, {} SMs)", gpu.name(), gpu.sm_count()),
            build: format!(
                "fora {} kernels {}",
                env!("CARGO_PKG_VERSION"),
                fingerprint(&kernels)
            ),
            model: format!("{} at {} px", cfg.arch_name(), cfg.input_size * 8),
            rows: plan.model_rows(),
            schedule: format!(
                "{} steps, {} computing, modes {}",
                schedule.len(),
                modes.iter().filter(|&&m| m == b'C').count(),
                fingerprint(&[&modes])
            ),
            given: backend.options().env_overrides().join(" "),
            candidates: candidates
                .iter()
                .map(|c| format!("{}:{}", c.name, c.settings))
                .collect::<Vec<_>>()
                .join(";"),
            search: settings.key(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "device": self.device,
            "build": self.build,
            "model": self.model,
            "rows": self.rows,
            "schedule": self.schedule,
            "given": self.given,
            "candidates": self.candidates,
            "search": self.search,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<TuneKey> {
        let s = |k: &str| v.get(k)?.as_str().map(str::to_string);
        Some(TuneKey {
            device: s("device")?,
            build: s("build")?,
            model: s("model")?,
            rows: usize::try_from(v.get("rows")?.as_u64()?).ok()?,
            schedule: s("schedule")?,
            given: s("given")?,
            candidates: s("candidates")?,
            search: v
                .get("search")
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_string(),
        })
    }
}

/// A cached choice: the candidate's name and settings, and what it gained when measured.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedChoice {
    /// The chosen candidate's name.
    pub name: String,
    /// Its settings (over the options as given).
    pub settings: String,
    /// The given options' window over its window, when measured.
    pub speedup: Option<f64>,
    /// When it was measured (`YYYY-MM-DD`, UTC).
    pub date: String,
}

/// The tuning choices of earlier runs, in a JSON file (`fora sample --tune-cache FILE`): a run
/// whose [`TuneKey`] is there takes its choice without measuring; another tunes and adds its
/// choice (only a complete tuning's: [`Tuning::cached_choice`]). A file that is not such a
/// cache is an error naming it, never overwritten.
#[derive(Clone, Debug)]
pub struct TuneCache {
    path: std::path::PathBuf,
    entries: Vec<(TuneKey, CachedChoice)>,
}

/// The cache file's `schema`.
pub const TUNE_CACHE_SCHEMA: &str = "fora-tune-cache/1";

impl TuneCache {
    /// Reads `path`, or starts an empty cache there if it does not exist.
    pub fn open(path: &std::path::Path) -> Result<TuneCache> {
        let mut cache = TuneCache {
            path: path.to_path_buf(),
            entries: Vec::new(),
        };
        let bytes = match crate::io::read_file(path, "the tuning cache") {
            Ok(bytes) => bytes,
            Err(e)
                if e.root_cause()
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) =>
            {
                return Ok(cache)
            }
            Err(e) => return Err(e),
        };
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "{} is not a fora tuning cache (not UTF-8); remove it or name another file",
                path.display()
            )
        })?;
        let bad = |why: &str| {
            anyhow::anyhow!(
                "{} is not a fora tuning cache ({why}); remove it or name another file",
                path.display()
            )
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&format!("not JSON: {e}")))?;
        if v.get("schema").and_then(|s| s.as_str()) != Some(TUNE_CACHE_SCHEMA) {
            return Err(bad(&format!("its schema is not {TUNE_CACHE_SCHEMA:?}")));
        }
        let entries = v
            .get("entries")
            .and_then(|e| e.as_array())
            .ok_or_else(|| bad("no entries list"))?;
        for (i, e) in entries.iter().enumerate() {
            let entry = (|| {
                let key = TuneKey::from_json(e.get("key")?)?;
                let s = |k: &str| e.get(k)?.as_str().map(str::to_string);
                let choice = CachedChoice {
                    name: s("chosen")?,
                    settings: s("settings")?,
                    speedup: e.get("speedup").and_then(|v| v.as_f64()),
                    date: s("date")?,
                };
                Some((key, choice))
            })()
            .ok_or_else(|| bad(&format!("entry {i} is malformed")))?;
            cache.entries.push(entry);
        }
        Ok(cache)
    }

    /// The file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Whether the cache holds no choice (a new file): every lookup misses.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The choice cached for `key`.
    pub fn lookup(&self, key: &TuneKey) -> Option<&CachedChoice> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, c)| c)
    }

    /// Records `choice` for `key` (replacing an earlier one) and rewrites the file atomically.
    pub fn store(&mut self, key: TuneKey, choice: CachedChoice) -> Result<()> {
        self.entries.retain(|(k, _)| *k != key);
        self.entries.push((key, choice));
        let v = serde_json::json!({
            "schema": TUNE_CACHE_SCHEMA,
            "entries": self.entries.iter().map(|(k, c)| serde_json::json!({
                "key": k.to_json(),
                "chosen": c.name,
                "settings": c.settings,
                "speedup": c.speedup,
                "date": c.date,
            })).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&v).context("cannot serialize the tuning cache")?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        crate::io::write_atomic(&self.path, text.as_bytes())
            .with_context(|| format!("cannot write the tuning cache {}", self.path.display()))
    }
}

impl<O> Tuning<O> {
    /// The choice as a cache entry, dated today; `None` for a tuning that is not
    /// [`complete`](Tuning::complete) (its time budget cut the search short): a choice that
    /// never saw every candidate must not serve later runs as if it had, so such a tuning is
    /// not stored (the cache format has no room for a partial entry; the next run with a
    /// cache tunes again).
    pub fn cached_choice(&self) -> Option<CachedChoice> {
        if !self.complete() {
            return None;
        }
        let c = self.chosen();
        Some(CachedChoice {
            name: c.name.clone(),
            settings: c.settings.clone(),
            speedup: self.speedup(),
            date: crate::bench::today(),
        })
    }
}

/// The candidates of `FORA_TUNE_CANDIDATES` ([`TuneCandidate::parse_list`]), or
/// [`default_candidates`] where it is unset or empty, less those `FORA_TUNE_SKIP` names
/// ([`skip_candidates`]); a value that is not UTF-8, not a list, or that skips a name the list
/// lacks is an error naming the variable.
pub fn candidates_from_env() -> Result<Vec<TuneCandidate>> {
    let var = |name: &str| match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(String::new()),
        Err(std::env::VarError::NotUnicode(v)) => {
            bail!("environment variable {name} is not UTF-8: {v:?}")
        }
        Ok(v) => Ok(v),
    };
    let list = var("FORA_TUNE_CANDIDATES")?;
    let candidates = if list.trim().is_empty() {
        default_candidates()
    } else {
        TuneCandidate::parse_list(&list).context("environment variable FORA_TUNE_CANDIDATES")?
    };
    skip_candidates(candidates, &var("FORA_TUNE_SKIP")?)
        .context("environment variable FORA_TUNE_SKIP")
}

/// `candidates` without those `skip` names (names separated by commas or whitespace; empty:
/// none): how a run leaves out a path that broke an earlier one (a kernel that left the GPU
/// unusable ends that tuning; the device suite then tunes again without it). A name the list
/// lacks is an error, as is skipping one without settings (the options as given, the
/// reference).
pub fn skip_candidates(candidates: Vec<TuneCandidate>, skip: &str) -> Result<Vec<TuneCandidate>> {
    let names: Vec<&str> = skip
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|n| !n.is_empty())
        .collect();
    for name in &names {
        let found = candidates.iter().find(|c| c.name == *name);
        ensure!(
            found.is_some(),
            "no tuning candidate {name:?} to skip (the candidates: {})",
            candidates
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        ensure!(
            found.is_some_and(|c| !c.settings.trim().is_empty()),
            "tuning candidate {name:?} is the options as given (the reference): it cannot be \
             skipped"
        );
    }
    let left: Vec<TuneCandidate> = candidates
        .into_iter()
        .filter(|c| !names.contains(&c.name.as_str()))
        .collect();
    // Said here, before a model loads, rather than by the tuning after it.
    ensure!(
        !left.is_empty(),
        "skipping {} leaves no tuning candidate",
        names.join(", ")
    );
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepMode::{Compute as C, Reuse as R};

    #[test]
    fn the_window_ends_before_a_computing_step() {
        // FORA N = 3 from the first step: C R R C R R ...
        let n3: Vec<StepMode> = (0..20).map(|k| if k % 3 == 0 { C } else { R }).collect();
        assert_eq!(window_len(&n3, 12), 12);
        assert_eq!(window_len(&n3, 11), 12);
        assert_eq!(window_len(&n3, 10), 12);
        assert_eq!(window_len(&n3, 13), 15);
        // Every step computing (N = 1): exactly the target; never past the schedule, never 0.
        assert_eq!(window_len(&[C; 30], 12), 12);
        assert_eq!(window_len(&[C; 5], 12), 5);
        assert_eq!(window_len(&[C, R, R], 0), 3);
        assert_eq!(window_len(&[C, C], 0), 1);
    }

    #[test]
    fn the_given_options_win_unless_beaten_by_the_margin() {
        let t = |v: &[Option<f64>]| choose(v, 0.01);
        assert_eq!(t(&[Some(10.0), Some(9.0), Some(9.5)]), Some(1));
        // 0.5% faster is noise: the given options stay.
        assert_eq!(t(&[Some(10.0), Some(9.95)]), Some(0));
        assert_eq!(t(&[Some(10.0), Some(9.9)]), Some(1));
        // Candidates without a time (rejected, failed, the same as another) never win.
        assert_eq!(t(&[Some(10.0), None, Some(11.0)]), Some(0));
        // The first of equal times.
        assert_eq!(t(&[Some(10.0), Some(8.0), Some(8.0)]), Some(1));
        // Nothing to compare with.
        assert_eq!(t(&[None, Some(1.0)]), None);
        assert_eq!(t(&[]), None);
        assert_eq!(choose(&[Some(10.0), Some(9.99)], 0.0), Some(1));
        // A tie is not a gain, even without a margin.
        assert_eq!(choose(&[Some(10.0), Some(10.0)], 0.0), Some(0));
        assert!(winners(&[Some(10.0), Some(10.0)], 0.0).is_empty());
        // The winners, fastest first, the earlier of equal times first; none past the margin.
        let w = |v: &[Option<f64>]| winners(v, 0.01);
        assert_eq!(
            w(&[
                Some(10.0),
                Some(9.0),
                None,
                Some(8.0),
                Some(9.95),
                Some(9.0)
            ]),
            [3, 1, 5]
        );
        assert!(w(&[Some(10.0), Some(9.95), Some(11.0)]).is_empty());
        assert!(w(&[None, Some(1.0)]).is_empty());
    }

    #[test]
    fn candidates_are_skipped_by_name() {
        let list = TuneCandidate::parse_list("given;pdl:FORA_PDL=1;tma:FORA_GEMM=tma;x:FORA_PDL=0")
            .unwrap();
        let names = |l: &[TuneCandidate]| l.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        let kept = skip_candidates(list.clone(), " pdl, x ").unwrap();
        assert_eq!(names(&kept), ["given", "tma"]);
        assert_eq!(kept[1].settings, "FORA_GEMM=tma");
        assert_eq!(skip_candidates(list.clone(), "").unwrap(), list);
        let err = format!(
            "{:#}",
            skip_candidates(list.clone(), "pdl,nope").unwrap_err()
        );
        assert!(
            err.contains("\"nope\"") && err.contains("given, pdl, tma, x"),
            "{err}"
        );
        let err = format!("{:#}", skip_candidates(list.clone(), "given").unwrap_err());
        assert!(err.contains("options as given"), "{err}");
        // The first may be skipped where it has settings (tune puts the given options first).
        assert_eq!(
            names(&skip_candidates(list[1..].to_vec(), "pdl").unwrap()),
            ["tma", "x"]
        );
        // Skipping every candidate is said before anything loads.
        let err = format!(
            "{:#}",
            skip_candidates(list[1..2].to_vec(), "pdl").unwrap_err()
        );
        assert!(err.contains("leaves no tuning candidate"), "{err}");
    }

    #[test]
    fn settings_merge_unless_they_are_alternatives() {
        let none = |_: &str, _: &str, _: &str| None;
        let m = |a: &str, b: &str| merge_settings_with(a, b, none).unwrap();
        assert_eq!(
            m("FORA_PDL=1", "FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1").as_deref(),
            Some("FORA_PDL=1 FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1")
        );
        // The same value twice is one word; the last of a name in one list counts.
        assert_eq!(
            m(
                "FORA_GEMM_LN=1 FORA_PDL=1",
                "FORA_GEMM_LN=1 FORA_GEMM_LN_WIDE=1"
            )
            .as_deref(),
            Some("FORA_GEMM_LN=1 FORA_PDL=1 FORA_GEMM_LN_WIDE=1")
        );
        assert_eq!(
            m("FORA_PDL=0 FORA_PDL=1", "FORA_PDL=1").as_deref(),
            Some("FORA_PDL=1")
        );
        assert_eq!(m("", "").as_deref(), Some(""));
        // One option two ways: alternatives.
        assert_eq!(m("FORA_ATTENTION=tma", "FORA_ATTENTION=tma_pp"), None);
        assert_eq!(m("FORA_PDL=1 FORA_GEMM=tma", "FORA_GEMM=cublaslt"), None);
        assert!(merge_settings_with("FORA_PDL", "", none).is_err());
        // A join decides for the names it knows.
        let joined = merge_settings_with("X=a Y=1", "X=b", |n, a, b| {
            (n == "X").then(|| format!("{a},{b}"))
        })
        .unwrap();
        assert_eq!(joined.as_deref(), Some("X=a,b Y=1"));
        // The CUDA backend joins the forced TMA tiles of different shapes.
        let narrow = "FORA_TMA_TILES=3456x1152=128x112,4608x1152=128x144";
        let cluster_k = "FORA_TMA_TILES=1152x1152=k3-128x128,1152x4608=k3-128x128";
        let both = CudaBackend::merge_settings(narrow, cluster_k)
            .unwrap()
            .unwrap();
        let o = CudaOptions::default().with_settings(&both).unwrap();
        assert_eq!(o.tma_tiles.iter().count(), 4, "{both}");
        for (a, b) in [(narrow, narrow), (cluster_k, narrow)] {
            let alone = |s: &str| CudaOptions::default().with_settings(s).unwrap().tma_tiles;
            let t = CudaBackend::merge_settings(a, b).unwrap().unwrap();
            let t = CudaOptions::default().with_settings(&t).unwrap().tma_tiles;
            for shape in alone(a).iter().chain(alone(b).iter()) {
                assert_eq!(t.get(shape.n as usize, shape.k as usize), Some(shape));
            }
        }
        // One shape on two tiles: alternatives.
        assert_eq!(
            CudaBackend::merge_settings(narrow, "FORA_TMA_TILES=3456x1152=128x128").unwrap(),
            None
        );
        assert_eq!(
            CudaBackend::merge_settings(
                "FORA_TMA_TILES=3456x1152=128x112",
                "FORA_TMA_TILES=3456x1152=128x112/2"
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn candidate_lists() {
        let c = TuneCandidate::parse_list(
            " given ; gemm_ln:FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1;pdl:FORA_PDL=1;",
        )
        .unwrap();
        assert_eq!(
            c,
            vec![
                TuneCandidate::new("given", ""),
                TuneCandidate::new("gemm_ln", "FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1"),
                TuneCandidate::new("pdl", "FORA_PDL=1"),
            ]
        );
        for (bad, says) in [
            ("", "no tuning candidates"),
            ("a:FORA_PDL=1;a:FORA_GEMM_LN=1", "given twice"),
            ("a:FORA_PDL=1,b:FORA_GEMM_LN=1", "FORA_PDL"),
            ("bad name:FORA_PDL=1", "letters, digits"),
            (":FORA_PDL=1", "letters, digits"),
            ("x:FORA_PDL=2", "FORA_PDL"),
            ("x:FORA_WHAT=1", "FORA_WHAT"),
        ] {
            let err = format!("{:#}", TuneCandidate::parse_list(bad).unwrap_err());
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        // The built-in list: the options as given first, every name once, every setting valid.
        let d = default_candidates();
        assert_eq!((d[0].name.as_str(), d[0].settings.as_str()), ("given", ""));
        let joined: Vec<String> = d
            .iter()
            .map(|c| format!("{}:{}", c.name, c.settings))
            .collect();
        assert_eq!(TuneCandidate::parse_list(&joined.join(";")).unwrap(), d);
        // Each changes the defaults, except the first.
        for c in &d[1..] {
            let o = CudaOptions::default().with_settings(&c.settings).unwrap();
            assert_ne!(o, CudaOptions::default(), "{}", c.name);
        }
    }
}
