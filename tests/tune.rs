//! The tuning loop of `fora::cuda::tune` on a CPU mock backend (no GPU): what it checks, what
//! it times, what it chooses and leaves set, and how it handles candidates that are wrong, that
//! fail, or that leave the device unusable. `gpu_tune_picks_the_fastest_checked_path`
//! (gpu_backend) runs the same loop on the CUDA backend.

use anyhow::{bail, ensure, Result};
use fora::backend::{Backend, Guidance, GuidanceMode, NoiseSource, SamplePlan, StepMode, StepSpec};
use fora::bench::Stats;
use fora::cache::StaticInterval;
use fora::config::{Arch, DitConfig};
use fora::cuda::tune::{tune, Tunable, TuneCandidate, TuneOutcome, TuneSettings, WindowRun};
use fora::sampler::{Sampler, SamplerOptions};
use std::cell::{Cell, RefCell};

/// A mock path: its window time, and how its forward misbehaves.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MockOptions {
    /// ms a window takes.
    window_ms: f64,
    /// Added to every forward output (0: the given options' output).
    offset: f32,
    /// The forward returns NaN.
    nan: bool,
    /// The forward fails (a kernel this card lacks).
    fail: bool,
    /// The forward fails and the device stops answering.
    kill: bool,
    /// Added to the latents' change over a window (a step path gone wrong where the forward
    /// is right).
    step_offset: f32,
    /// The same, a second path's share (two paths each within the tolerance alone, past it
    /// together).
    step_offset_b: f32,
    /// ms that independent paths save, each on its own option (so that they combine).
    saves: [f64; 4],
    /// ms a path costs each other path that saves time (one that takes SMs from the rest).
    crowd: f64,
    /// A switch of no effect at the run's rows (a fusion that does not serve them).
    idle: bool,
    /// Its window never ends (30 s here: a deadlocked kernel, for the watchdog).
    hang: bool,
}

impl MockOptions {
    /// What a window takes: the base time less every path's saving, plus the crowding.
    fn window(&self) -> f64 {
        let saving = self.saves.iter().filter(|&&s| s != 0.0).count();
        self.window_ms - self.saves.iter().sum::<f64>()
            + self.crowd * saving.saturating_sub(1) as f64
    }
}

struct Mock {
    config: DitConfig,
    options: MockOptions,
    dead: Cell<bool>,
    /// Added to the next window run's times once (a card still raising its clocks).
    cold_ms: Cell<f64>,
    /// Window runs (by their order in the tuning) that come out 3 ms fast (a transient).
    lucky_runs: Vec<usize>,
    /// (t, y) of every forward.
    forwards: RefCell<Vec<(Vec<i64>, Vec<usize>)>>,
    /// (modes of the window, warm-up, runs) of every timing.
    timings: RefCell<Vec<(Vec<StepMode>, usize, usize)>>,
    /// Real time every window run takes (sleeping), for the tuning's time budget.
    window_sleep: std::time::Duration,
}

impl Mock {
    fn new() -> Mock {
        let arch = Arch::parse("depth=1,hidden=8,heads=2,patch=2").unwrap();
        Mock {
            config: DitConfig::from_arch(&arch, 3, 4, 10, true).unwrap(),
            options: MockOptions {
                window_ms: 10.0,
                offset: 0.0,
                nan: false,
                fail: false,
                kill: false,
                step_offset: 0.0,
                step_offset_b: 0.0,
                saves: [0.0; 4],
                crowd: 0.0,
                idle: false,
                hang: false,
            },
            dead: Cell::new(false),
            cold_ms: Cell::new(0.0),
            lucky_runs: Vec::new(),
            forwards: RefCell::new(Vec::new()),
            timings: RefCell::new(Vec::new()),
            window_sleep: std::time::Duration::ZERO,
        }
    }
}

impl Backend for Mock {
    type Workspace = ();

    fn name(&self) -> String {
        "mock".into()
    }
    fn config(&self) -> &DitConfig {
        &self.config
    }
    fn workspace(&self, _plan: &SamplePlan) -> Result<()> {
        Ok(())
    }
    fn step(&self, _ws: &mut (), _step: &StepSpec) -> Result<()> {
        Ok(())
    }
    fn latents(&self, _ws: &mut ()) -> Result<Vec<f32>> {
        Ok(Vec::new())
    }
    fn forward(
        &self,
        x: &[f32],
        t: &[i64],
        y: &[usize],
        _guidance: Option<Guidance>,
    ) -> Result<Vec<f32>> {
        ensure!(!self.dead.get(), "mock: the device is gone");
        self.forwards.borrow_mut().push((t.to_vec(), y.to_vec()));
        let o = self.options;
        if o.kill {
            self.dead.set(true);
            bail!("mock: illegal address");
        }
        ensure!(!o.fail, "mock: no kernel for this card");
        Ok(x.iter()
            .map(|v| if o.nan { f32::NAN } else { v * 2.0 + o.offset })
            .collect())
    }
}

impl Tunable for Mock {
    type Options = MockOptions;

    fn tuned_options(&self) -> MockOptions {
        self.options
    }
    fn set_tuned_options(&mut self, options: MockOptions) {
        self.options = options;
    }
    /// Words `MS=<window ms>`, `OFFSET=<f32>`, `STEPS=<f32>`, `STEPSB=<f32>`, `SAVE<0-3>=<ms>`,
    /// `CROWD=<ms>`, `IDLE=1`, `NAN=1`, `FAIL=1`, `KILL=1`, `HANG=1`.
    fn apply_settings(mut o: MockOptions, settings: &str) -> Result<MockOptions> {
        for word in settings.split_whitespace() {
            match word.split_once('=') {
                Some(("MS", v)) => o.window_ms = v.parse()?,
                Some(("OFFSET", v)) => o.offset = v.parse()?,
                Some(("STEPS", v)) => o.step_offset = v.parse()?,
                Some(("STEPSB", v)) => o.step_offset_b = v.parse()?,
                Some(("CROWD", v)) => o.crowd = v.parse()?,
                Some((save, v)) if save.starts_with("SAVE") => {
                    let i: usize = save["SAVE".len()..].parse()?;
                    ensure!(i < o.saves.len(), "mock: no path {i}");
                    o.saves[i] = v.parse()?;
                }
                Some(("NAN", "1")) => o.nan = true,
                Some(("FAIL", "1")) => o.fail = true,
                Some(("KILL", "1")) => o.kill = true,
                Some(("IDLE", "1")) => o.idle = true,
                Some(("HANG", "1")) => o.hang = true,
                _ => bail!("mock: bad setting {word:?}"),
            }
        }
        Ok(o)
    }
    fn run_window(
        &self,
        _plan: &SamplePlan,
        steps: &[StepSpec],
        warmup: usize,
        runs: usize,
    ) -> Result<WindowRun> {
        ensure!(!self.dead.get(), "mock: the device is gone");
        std::thread::sleep(self.window_sleep);
        if self.options.hang {
            std::thread::sleep(std::time::Duration::from_secs(30));
        }
        let lucky = if self.lucky_runs.contains(&self.timings.borrow().len()) {
            3.0
        } else {
            0.0
        };
        self.timings
            .borrow_mut()
            .push((steps.iter().map(|s| s.mode).collect(), warmup, runs));
        let o = self.options;
        let cold = self.cold_ms.replace(0.0);
        // Noisy windows whose median is the path's time.
        let samples: Vec<f64> = (0..runs)
            .map(|i| o.window() + cold - lucky + [0.0, 0.3, -0.2][i % 3])
            .collect();
        Ok(WindowRun {
            first_change: (0..64)
                .map(|i| (i as f32 * 0.37).sin() + o.step_offset + o.step_offset_b)
                .collect(),
            stats: Stats::from_samples(&samples)?,
        })
    }
    fn still_usable(&self) -> Result<()> {
        ensure!(!self.dead.get(), "mock: the device is gone");
        Ok(())
    }
    /// `IDLE=1` changes nothing.
    fn options_in_effect(&self, options: MockOptions, _plan: &SamplePlan) -> MockOptions {
        MockOptions {
            idle: false,
            ..options
        }
    }
}

/// One image with CFG over 30 DDPM steps at FORA N = 3: the plan and its schedule.
fn run_of(backend: &Mock) -> (SamplePlan, Vec<StepSpec>) {
    let options = SamplerOptions::ddpm(30).with_guidance(Some(Guidance {
        scale: 4.0,
        mode: GuidanceMode::Official3,
    }));
    let sampler = Sampler::new(backend, options).unwrap();
    let plan = sampler.plan(&[2], NoiseSource::Seed(1)).unwrap();
    let schedule = sampler.schedule(&mut StaticInterval::new(3).unwrap());
    (plan, schedule)
}

fn candidates(list: &[(&str, &str)]) -> Vec<TuneCandidate> {
    list.iter()
        .map(|(name, settings)| TuneCandidate::new(name, settings))
        .collect()
}

const SETTINGS: TuneSettings = TuneSettings {
    window: 6,
    warmup: 2,
    runs: 5,
    tolerance: 2e-2,
    min_gain: 0.01,
    combine: true,
    // Confirming is tested on its own (`a_lucky_window_is_not_confirmed`).
    confirm: 0,
    contenders: 1,
    progress: false,
    budget: None,
    watchdog: None,
};

#[test]
fn the_fastest_checked_candidate_is_chosen_and_left_set() {
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    let list = candidates(&[
        ("given", ""),
        ("faster", "MS=8 OFFSET=0.001"),
        ("noise", "MS=9.95"),
        ("again", "MS=10"),
        ("fastest_but_wrong", "MS=1 OFFSET=1"),
        ("nan", "MS=1 NAN=1"),
        ("missing", "MS=1 FAIL=1"),
        ("slow", "MS=30"),
        ("steps_wrong", "MS=2 STEPS=0.5"),
    ]);
    let t = tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap();
    println!("{}", t.markdown());
    let outcome = |i: usize| t.rows_tried[i].outcome.clone();
    assert_eq!(t.chosen, 1);
    assert_eq!(outcome(1), TuneOutcome::Chosen);
    assert_eq!(mock.options.window_ms, 8.0, "the choice is left set");
    assert_eq!(outcome(0), TuneOutcome::Slower);
    assert_eq!(outcome(2), TuneOutcome::Slower);
    // The same options as the given ones: not run again.
    assert_eq!(outcome(3), TuneOutcome::SameAs("given".into()));
    assert!(t.rows_tried[3].window.is_none());
    // Fast but wrong: rejected on its forward, never timed.
    assert!(
        matches!(outcome(4), TuneOutcome::Rejected(ref w) if w.contains("rel-L2")),
        "{:?}",
        outcome(4)
    );
    assert!(t.rows_tried[4].rel_l2.unwrap() > 0.02 && t.rows_tried[4].window.is_none());
    assert!(
        matches!(outcome(5), TuneOutcome::Rejected(ref w) if w.contains("NaN")),
        "{:?}",
        outcome(5)
    );
    assert!(
        matches!(outcome(6), TuneOutcome::Failed(ref e) if e.contains("no kernel")),
        "{:?}",
        outcome(6)
    );
    assert_eq!(outcome(7), TuneOutcome::Slower);
    // Its forward is right, its steps are not: rejected on the latents' change, not timed.
    assert!(
        matches!(outcome(8), TuneOutcome::Rejected(ref w) if w.contains("steps")),
        "{:?}",
        outcome(8)
    );
    assert_eq!(t.rows_tried[8].rel_l2, Some(0.0));
    assert!(t.rows_tried[8].steps_rel_l2.unwrap() > 0.02 && t.rows_tried[8].window.is_none());
    assert_eq!(t.rows_tried[1].steps_rel_l2, Some(0.0));
    // The small offset is within the tolerance; the given options are the reference.
    let rel = t.rows_tried[1].rel_l2.unwrap();
    assert!(rel > 0.0 && rel < 2e-2, "{rel}");
    assert_eq!(t.rows_tried[0].rel_l2, Some(0.0));
    assert!((t.speedup().unwrap() - 10.0 / 8.0).abs() < 1e-12);
    // Run: given, faster, noise, slow, steps_wrong, and the given options again last; each the
    // same window of the run's own schedule (steps 0..8: C R C R R C R R, ending before a
    // computing step), 2 warm-ups, 5 runs.
    let timings = mock.timings.borrow();
    assert_eq!(timings.len(), 6);
    use StepMode::{Compute as C, Reuse as R};
    for (modes, warmup, runs) in timings.iter() {
        assert_eq!(modes, &[C, R, C, R, R, C, R, R]);
        assert_eq!((*warmup, *runs), (2, 5));
    }
    assert_eq!(
        (t.window_steps, t.window_computing, t.run_steps),
        (8, 3, 30)
    );
    // Every forward: two rows (CFG) at the run's first timestep, the class then the null one.
    for (tt, y) in mock.forwards.borrow().iter() {
        assert_eq!(tt, &[plan.timesteps[0]; 2]);
        assert_eq!(y, &[2, mock.config.num_classes]);
    }
    assert_eq!(
        mock.forwards.borrow().len(),
        8,
        "every candidate but the repeat"
    );
    // The table: the window, the run it estimates (x 30 / 8), the outcome.
    let md = t.markdown();
    assert!(
        md.contains("| faster | `MS=8 OFFSET=0.001` | 8.000 | 30.0 |"),
        "{md}"
    );
    assert!(
        md.contains("| given | `(as given)` | 10.000 | 37.5 | 0.00e0 | 0.00e0 | slower |"),
        "{md}"
    );
}

/// The options as given are always the reference and the baseline: put first when the list
/// does not start with them.
#[test]
fn the_given_options_come_first() {
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    let list = candidates(&[("pdl", "MS=9"), ("given", "MS=9.5")]);
    let t = tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap();
    let names: Vec<&str> = t.rows_tried.iter().map(|r| r.name.as_str()).collect();
    // "given" is taken by a candidate with settings: the inserted one is "as_given".
    assert_eq!(names, ["as_given", "pdl", "given"]);
    assert_eq!(t.rows_tried[0].options, Mock::new().options);
    assert_eq!(t.chosen, 1);
    assert!((t.speedup().unwrap() - 10.0 / 9.0).abs() < 1e-12);
}

/// A card still raising its clocks while the given options run first: they are timed again
/// last and their better time counts, so a candidate no faster than them is not chosen.
#[test]
fn the_given_options_are_timed_again_last() {
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    // The first window run of the tuning is 2 ms slow.
    mock.cold_ms.set(2.0);
    let list = candidates(&[("given", ""), ("as_fast", "MS=10 OFFSET=0.0001")]);
    let t = tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap();
    // 12 ms first, 10 again: 10 counts, and the candidate's 10 does not beat it.
    assert_eq!(t.rows_tried[0].window.as_ref().unwrap().median_ms, 10.0);
    assert_eq!(t.chosen, 0);
    assert_eq!(mock.timings.borrow().len(), 3);
    // A candidate alone is not timed twice.
    let mut mock = Mock::new();
    let t = tune(
        &mut mock,
        &plan,
        &schedule,
        &candidates(&[("given", "")]),
        &SETTINGS,
    )
    .unwrap();
    assert_eq!((t.chosen, mock.timings.borrow().len()), (0, 1));
}

/// The candidates that beat the given options alone are tried together, greedily from the
/// fastest: alternatives (one option set two ways) are not combined, a sum no faster than its
/// base is measured but not built on, and the fastest sum is chosen.
#[test]
fn winners_are_combined_greedily() {
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    let list = candidates(&[
        ("given", ""),
        ("a", "SAVE0=2"),
        ("b", "SAVE1=1"),
        ("alt", "SAVE0=1.5"),
        ("crowd", "SAVE2=0.5 CROWD=1"),
        ("noise", "SAVE2=0.05"),
        ("c", "SAVE3=0.6"),
        ("wrong", "SAVE3=3 OFFSET=1"),
        ("e", "MS=9.6"),
    ]);
    let t = tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap();
    println!("{}", t.markdown());
    let names: Vec<&str> = t.rows_tried.iter().map(|r| r.name.as_str()).collect();
    // Winners, fastest first: a 8, alt 8.5, b 9, c 9.4, crowd 9.5, e 9.6 (noise is within
    // the margin, wrong was rejected). a + alt set SAVE0 both ways: not combined. a + b = 7
    // and a + b + c = 6.4 each beat their base; a + b + c + crowd = 8.9 does not, so e is
    // added to a + b + c: 6.0.
    assert_eq!(
        names,
        [
            "given",
            "a",
            "b",
            "alt",
            "crowd",
            "noise",
            "c",
            "wrong",
            "e",
            "a+b",
            "a+b+c",
            "a+b+c+crowd",
            "a+b+c+e"
        ]
    );
    assert_eq!(t.candidates, 9);
    let row = |name: &str| t.rows_tried.iter().find(|r| r.name == name).unwrap();
    assert_eq!(row("a+b").settings, "SAVE0=2 SAVE1=1");
    assert_eq!(row("a+b+c").settings, "SAVE0=2 SAVE1=1 SAVE3=0.6");
    assert_eq!(row("a+b+c+crowd").window.as_ref().unwrap().median_ms, 8.9);
    assert_eq!(row("a+b+c+crowd").outcome, TuneOutcome::Slower);
    // Each sum is checked like a candidate.
    assert_eq!(row("a+b").rel_l2, Some(0.0));
    assert_eq!(row("a+b").steps_rel_l2, Some(0.0));
    assert_eq!(row("a+b+c+e").settings, "SAVE0=2 SAVE1=1 SAVE3=0.6 MS=9.6");
    assert_eq!(t.chosen().name, "a+b+c+e");
    assert_eq!(t.chosen().outcome, TuneOutcome::Chosen);
    assert_eq!(row("a+b+c").outcome, TuneOutcome::Slower);
    assert_eq!(
        mock.options.saves,
        [2.0, 1.0, 0.0, 0.6],
        "the sum is left set"
    );
    assert_eq!(mock.options.window_ms, 9.6);
    assert!((t.speedup().unwrap() - 10.0 / 6.0).abs() < 1e-9);
    // Timed: the eight that passed their forward, the four sums, the given options again.
    assert_eq!(mock.timings.borrow().len(), 13);
    assert!(t.markdown().contains("Rows named a+b"));

    // Off: the candidates alone.
    let mut mock = Mock::new();
    let alone = TuneSettings {
        combine: false,
        ..SETTINGS
    };
    let t = tune(&mut mock, &plan, &schedule, &list, &alone).unwrap();
    assert_eq!((t.rows_tried.len(), t.candidates), (9, 9));
    assert_eq!(t.chosen().name, "a");
    assert!(!t.markdown().contains("Rows named a+b"));
}

/// A sum of two paths, each right alone, is checked as a whole: wrong together, it is
/// rejected and the fastest single path stays chosen. Sums whose options a candidate already
/// has are not run again.
#[test]
fn combinations_are_checked_and_not_repeated() {
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    // Each shifts the latents' change by 0.01 (rel-L2 ~0.014 of its ~0.71 RMS), 0.02 together.
    let list = candidates(&[
        ("given", ""),
        ("a", "SAVE0=2 STEPS=0.01"),
        ("b", "SAVE1=1 STEPSB=0.01"),
    ]);
    let t = tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap();
    let sum = &t.rows_tried[3];
    assert_eq!(sum.name, "a+b");
    assert!(
        matches!(sum.outcome, TuneOutcome::Rejected(ref w) if w.contains("steps")),
        "{:?}",
        sum.outcome
    );
    assert!(sum.window.is_none());
    assert_eq!(t.chosen().name, "a");
    assert_eq!(mock.options.saves, [2.0, 0.0, 0.0, 0.0]);

    // A candidate that is already the sum: nothing new to try. Options that differ only in a
    // switch of no effect at the run's rows are the same path: not run again, alone or summed.
    let mut mock = Mock::new();
    let list = candidates(&[
        ("given", ""),
        ("idle", "IDLE=1"),
        ("a", "SAVE0=2"),
        ("ab", "SAVE0=2 SAVE1=1"),
        ("b", "SAVE1=1"),
        ("b_idle", "SAVE1=1 IDLE=1"),
        ("c", "SAVE2=0.5"),
    ]);
    let t = tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap();
    println!("{}", t.markdown());
    assert_eq!(t.rows_tried[1].outcome, TuneOutcome::SameAs("given".into()));
    assert_eq!(t.rows_tried[5].outcome, TuneOutcome::SameAs("b".into()));
    assert!(t.markdown().contains("same path as given"));
    // ab 7 is the base; ab + a and ab + b are ab; ab + c = 6.5.
    let names: Vec<&str> = t.rows_tried.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names[7..], ["ab+c"]);
    assert_eq!(t.chosen().name, "ab+c");
    // given, a, ab, b, c, ab+c, the given options again.
    assert_eq!(mock.timings.borrow().len(), 7);
}

/// The winner is timed in turn with the given options before it is taken: one lucky window
/// (a transient of the card) does not pick a path that is no faster.
#[test]
fn a_lucky_window_is_not_confirmed() {
    let (plan, schedule) = run_of(&Mock::new());
    let confirm = TuneSettings {
        confirm: 2,
        ..SETTINGS
    };
    let list = candidates(&[("given", ""), ("lucky", "MS=10 OFFSET=0.0001")]);
    let mut mock = Mock::new();
    // Window runs: 0 given, 1 lucky (7 ms), 2 given again, then in turn 3 given, 4 lucky,
    // 5 given, 6 lucky.
    mock.lucky_runs = vec![1];
    let t = tune(&mut mock, &plan, &schedule, &list, &confirm).unwrap();
    println!("{}", t.markdown());
    assert_eq!(t.rows_tried[1].window.as_ref().unwrap().median_ms, 7.0);
    assert!(
        matches!(t.rows_tried[1].outcome, TuneOutcome::Unconfirmed(ref w) if w.contains("10.000")),
        "{:?}",
        t.rows_tried[1].outcome
    );
    assert_eq!(t.chosen, 0);
    assert_eq!(t.rows_tried[0].outcome, TuneOutcome::Chosen);
    assert_eq!(
        mock.options,
        Mock::new().options,
        "the given options set back"
    );
    assert_eq!(t.head_to_head, Some((10.0, 10.0)));
    assert_eq!(t.speedup(), Some(1.0));
    assert_eq!(mock.timings.borrow().len(), 7);
    assert!(t.markdown().contains("not confirmed"));
    // A path that is faster stays chosen; its speedup is the head-to-head one.
    let mut mock = Mock::new();
    mock.lucky_runs = vec![1];
    let list = candidates(&[("given", ""), ("fast", "SAVE0=2")]);
    let t = tune(&mut mock, &plan, &schedule, &list, &confirm).unwrap();
    assert_eq!(t.chosen().name, "fast");
    assert_eq!(t.head_to_head, Some((10.0, 8.0)));
    assert!((t.speedup().unwrap() - 1.25).abs() < 1e-12);
    assert_eq!(mock.options.saves[0], 2.0);
    // The given options winning outright are not timed again in turn.
    let mut mock = Mock::new();
    let list = candidates(&[("given", ""), ("slow", "MS=12")]);
    let t = tune(&mut mock, &plan, &schedule, &list, &confirm).unwrap();
    assert_eq!((t.chosen, t.head_to_head), (0, None));
    assert_eq!(mock.timings.borrow().len(), 3);
}

/// When the fastest is not confirmed, the next fastest winner is timed in turn: a sum measured
/// fast in a lucky window does not cost the part of it that is faster.
#[test]
fn the_next_contender_is_confirmed_when_the_fastest_is_not() {
    let (plan, schedule) = run_of(&Mock::new());
    let confirm = TuneSettings {
        confirm: 2,
        contenders: 2,
        ..SETTINGS
    };
    let list = candidates(&[
        ("given", ""),
        ("a", "SAVE0=1"),
        ("lucky", "MS=10 OFFSET=0.0001"),
        ("slow", "MS=11"),
    ]);
    // Window runs: 0 given, 1 a (9 ms), 2 lucky (7 ms), 3 slow, 4 lucky+a (9 ms: not the
    // base), 5 given again; in turn 6-9 given and lucky (10 against 10), 10-13 given and a.
    let run = |contenders: usize| {
        let mut mock = Mock::new();
        mock.lucky_runs = vec![2];
        let settings = TuneSettings {
            contenders,
            ..confirm
        };
        let t = tune(&mut mock, &plan, &schedule, &list, &settings).unwrap();
        println!("{}", t.markdown());
        (t, mock)
    };
    let (t, mock) = run(2);
    let names: Vec<&str> = t.rows_tried.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["given", "a", "lucky", "slow", "lucky+a"]);
    assert!(
        matches!(t.rows_tried[2].outcome, TuneOutcome::Unconfirmed(ref w) if w.contains("10.000")),
        "{:?}",
        t.rows_tried[2].outcome
    );
    assert_eq!(t.chosen().name, "a");
    assert_eq!(t.head_to_head, Some((10.0, 9.0)));
    assert_eq!(mock.options.saves[0], 1.0, "the choice is left set");
    assert_eq!(mock.timings.borrow().len(), 14);
    // One contender: the given options stay, the last head to head reported.
    let (t, mock) = run(1);
    assert_eq!(t.chosen, 0);
    assert_eq!(t.rows_tried[1].outcome, TuneOutcome::Slower);
    assert_eq!(t.head_to_head, Some((10.0, 10.0)));
    assert_eq!(mock.options, Mock::new().options);
    assert_eq!(mock.timings.borrow().len(), 10);
    // Contenders past the winners: only the winners are timed in turn (a, lucky+a and lucky
    // beat the margin; slow does not).
    let (t, mock) = run(9);
    assert_eq!(t.chosen().name, "a");
    assert_eq!(mock.timings.borrow().len(), 14);
}

#[test]
fn noise_does_not_replace_the_given_options() {
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    let list = candidates(&[("given", ""), ("within_noise", "MS=9.95")]);
    let t = tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap();
    assert_eq!(t.chosen, 0);
    assert_eq!(t.rows_tried[0].outcome, TuneOutcome::Chosen);
    assert_eq!(mock.options.window_ms, 10.0);
    // Without a margin, any gain counts.
    let any = TuneSettings {
        min_gain: 0.0,
        ..SETTINGS
    };
    let t = tune(&mut mock, &plan, &schedule, &list, &any).unwrap();
    assert_eq!(t.chosen, 1);
    assert_eq!(mock.options.window_ms, 9.95);
}

#[test]
fn failures_that_end_the_tuning() {
    let (plan, schedule) = run_of(&Mock::new());
    // A candidate that leaves the device unusable stops the tuning, the given options set back.
    let mut mock = Mock::new();
    let list = candidates(&[("given", ""), ("faster", "MS=5"), ("killer", "KILL=1")]);
    let err = format!(
        "{:#}",
        tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap_err()
    );
    assert!(
        err.contains("killer") && err.contains("unusable") && err.contains("illegal address"),
        "{err}"
    );
    assert_eq!(mock.options, Mock::new().options);
    // The given options (the backend's own) must run, and give finite numbers.
    for (setting, says) in [("FAIL=1", "no kernel"), ("NAN=1", "is NaN")] {
        let mut mock = Mock::new();
        mock.options = Mock::apply_settings(mock.options, setting).unwrap();
        let given = mock.options;
        let list = candidates(&[("given", ""), ("other", "MS=1")]);
        let err = format!(
            "{:#}",
            tune(&mut mock, &plan, &schedule, &list, &SETTINGS).unwrap_err()
        );
        assert!(err.contains("given") && err.contains(says), "{err}");
        assert_eq!(mock.options, given);
    }
    // Bad settings (read before anything runs: nothing was timed), an empty list, no timed
    // windows, a schedule of another plan.
    let mut mock = Mock::new();
    let list = candidates(&[("given", ""), ("fast", "MS=1"), ("bad", "WHAT=1")]);
    assert!(tune(&mut mock, &plan, &schedule, &list, &SETTINGS).is_err());
    assert!(mock.timings.borrow().is_empty() && mock.forwards.borrow().is_empty());
    for (list, settings, schedule, says) in [
        (
            candidates(&[("given", ""), ("bad", "WHAT=1")]),
            SETTINGS,
            &schedule[..],
            "bad",
        ),
        (
            Vec::new(),
            SETTINGS,
            &schedule[..],
            "at least one candidate",
        ),
        (
            candidates(&[("given", "")]),
            TuneSettings {
                tolerance: f64::NAN,
                ..SETTINGS
            },
            &schedule[..],
            "tolerance",
        ),
        (
            candidates(&[("given", "")]),
            TuneSettings {
                min_gain: 1.0,
                ..SETTINGS
            },
            &schedule[..],
            "margin",
        ),
        (
            candidates(&[("given", "")]),
            TuneSettings {
                runs: 0,
                ..SETTINGS
            },
            &schedule[..],
            "timed at least once",
        ),
        (
            candidates(&[("given", "")]),
            SETTINGS,
            &schedule[..10],
            "schedule",
        ),
    ] {
        let err = format!(
            "{:#}",
            tune(&mut mock, &plan, schedule, &list, &settings).unwrap_err()
        );
        assert!(err.contains(says), "{says}: {err}");
    }
}

/// A key whose fields say what they are.
fn key(rows: usize) -> fora::cuda::tune::TuneKey {
    fora::cuda::tune::TuneKey {
        device: "NVIDIA H200 (sm_90, 132 SMs)".into(),
        build: "fora 0.1.0 kernels 0123456789abcdef".into(),
        model: "DiT-XL/2 at 256 px".into(),
        rows,
        schedule: "250 steps, 84 computing, modes fedcba9876543210".into(),
        given: String::new(),
        candidates: "given:;pdl:FORA_PDL=1".into(),
        search: fora::cuda::tune::TuneSettings::default().key(),
    }
}

#[test]
fn the_tuning_cache_keeps_choices_by_key() {
    use fora::cuda::tune::{CachedChoice, TuneCache};
    let dir = std::env::temp_dir().join(format!("fora-tune-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("sub").join("tune.json");
    // Absent: an empty cache, nothing written until a choice is stored.
    let mut cache = TuneCache::open(&path).unwrap();
    assert!(cache.lookup(&key(2)).is_none() && !path.exists());
    // A device or FIFO is refused by name, never read (/dev/zero would fill memory).
    let e = format!(
        "{:#}",
        TuneCache::open(std::path::Path::new("/dev/zero"))
            .err()
            .unwrap()
    );
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
    let choice = |name: &str, settings: &str| CachedChoice {
        name: name.into(),
        settings: settings.into(),
        speedup: Some(1.25),
        date: "2026-11-28".into(),
    };
    cache.store(key(2), choice("pdl", "FORA_PDL=1")).unwrap();
    cache.store(key(256), choice("given", "")).unwrap();
    // Read back: each key its choice; any other field different, no entry.
    let cache = TuneCache::open(&path).unwrap();
    assert_eq!(cache.lookup(&key(2)), Some(&choice("pdl", "FORA_PDL=1")));
    assert_eq!(cache.lookup(&key(256)), Some(&choice("given", "")));
    assert!(cache.lookup(&key(16)).is_none());
    for other in [
        fora::cuda::tune::TuneKey {
            build: "fora 0.1.0 kernels 0000000000000000".into(),
            ..key(2)
        },
        fora::cuda::tune::TuneKey {
            device: "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)".into(),
            ..key(2)
        },
        fora::cuda::tune::TuneKey {
            given: "FORA_GEMM=tma".into(),
            ..key(2)
        },
        fora::cuda::tune::TuneKey {
            candidates: "given:".into(),
            ..key(2)
        },
        fora::cuda::tune::TuneKey {
            search: TuneSettings {
                combine: false,
                ..Default::default()
            }
            .key(),
            ..key(2)
        },
    ] {
        assert!(cache.lookup(&other).is_none(), "{other:?}");
    }
    // A new choice for a key replaces the old one.
    let mut cache = TuneCache::open(&path).unwrap();
    cache
        .store(key(2), choice("gemm_ln", "FORA_GEMM_LN=1"))
        .unwrap();
    let cache = TuneCache::open(&path).unwrap();
    assert_eq!(
        cache.lookup(&key(2)).map(|c| c.name.as_str()),
        Some("gemm_ln")
    );
    assert!(cache.lookup(&key(256)).is_some());
    // Files that are not a cache: errors naming the file and why; the file is left as it was.
    for (text, why) in [
        ("{not json", "not JSON"),
        (r#"{"schema": "fora-bench/1", "entries": []}"#, "schema"),
        (r#"{"schema": "fora-tune-cache/1"}"#, "entries"),
        (
            r#"{"schema": "fora-tune-cache/1", "entries": [{"key": {}, "chosen": "x"}]}"#,
            "entry 0",
        ),
    ] {
        let bad = dir.join("bad.json");
        std::fs::write(&bad, text).unwrap();
        let err = format!("{:#}", TuneCache::open(&bad).unwrap_err());
        assert!(
            err.contains("bad.json")
                && err.contains("not a fora tuning cache")
                && err.contains(why),
            "{text}: {err}"
        );
        assert_eq!(std::fs::read_to_string(&bad).unwrap(), text);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A budget already spent when the given options have run: they are measured (the reference
/// and the baseline), timed again, and chosen; every other candidate is listed as not tried
/// (one whose options are the given ones' still as the same path), nothing is combined, and
/// the choice is not one to cache.
#[test]
fn a_spent_budget_leaves_the_rest_untried() {
    use std::time::Duration;
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    let list = candidates(&[
        ("given", ""),
        ("a", "SAVE0=2"),
        ("again", "MS=10"),
        ("b", "SAVE1=1"),
    ]);
    let settings = TuneSettings {
        budget: Some(Duration::ZERO),
        confirm: 2,
        ..SETTINGS
    };
    let t = tune(&mut mock, &plan, &schedule, &list, &settings).unwrap();
    println!("{}", t.markdown());
    let names: Vec<&str> = t.rows_tried.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["given", "a", "again", "b"], "no combinations");
    assert_eq!(t.candidates, 4);
    let why = "the tuning's time budget (0 s) was spent";
    assert_eq!(t.rows_tried[1].outcome, TuneOutcome::Untried(why.into()));
    assert_eq!(t.rows_tried[2].outcome, TuneOutcome::SameAs("given".into()));
    assert_eq!(t.rows_tried[3].outcome, TuneOutcome::Untried(why.into()));
    for r in &t.rows_tried[1..] {
        assert!(r.window.is_none() && r.rel_l2.is_none() && r.steps_rel_l2.is_none());
    }
    assert_eq!((t.chosen, t.head_to_head), (0, None));
    assert_eq!(t.rows_tried[0].outcome, TuneOutcome::Chosen);
    assert_eq!(mock.options, Mock::new().options);
    // The given options only (not again: nothing else was measured); one forward (theirs).
    assert_eq!(mock.timings.borrow().len(), 1);
    assert_eq!(mock.forwards.borrow().len(), 1);
    assert_eq!(t.speedup(), Some(1.0));
    assert!(!t.complete());
    assert_eq!(t.untried(), 2);
    assert_eq!(t.cached_choice(), None, "a tuning cut short is not cached");
    let md = t.markdown();
    assert!(
        md.contains("Cut short by the time budget: 2 row(s) not tried"),
        "{md}"
    );
    assert!(
        md.contains(&format!(
            "| a | `SAVE0=2` | — | — | — | — | not tried: {why} |"
        )),
        "{md}"
    );
}

/// A budget that runs out after a few candidates (real time: each window sleeps): those
/// measured by then compete as usual (the given options timed again, the winner in turn with
/// them), the rest are not tried, even one that would have won, and nothing is combined.
#[test]
fn a_budget_stops_the_search_between_candidates() {
    use std::time::Duration;
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    mock.window_sleep = Duration::from_millis(400);
    let list = candidates(&[
        ("given", ""),
        ("a", "SAVE0=2"),
        ("b", "SAVE1=1"),
        ("c", "SAVE2=0.5"),
        ("fastest", "MS=5"),
    ]);
    // Checked before a at ~400 ms, before b at ~800, before c at ~1200: past 1000 (200 ms of
    // slack before the budget, for a loaded machine: sleeps never end early).
    let settings = TuneSettings {
        budget: Some(Duration::from_millis(1000)),
        confirm: 1,
        ..SETTINGS
    };
    let t = tune(&mut mock, &plan, &schedule, &list, &settings).unwrap();
    println!("{}", t.markdown());
    let names: Vec<&str> = t.rows_tried.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["given", "a", "b", "c", "fastest"], "no a+b");
    let why = "the tuning's time budget (1 s) was spent";
    assert_eq!(t.rows_tried[2].outcome, TuneOutcome::Slower);
    assert_eq!(t.rows_tried[3].outcome, TuneOutcome::Untried(why.into()));
    assert_eq!(t.rows_tried[4].outcome, TuneOutcome::Untried(why.into()));
    assert_eq!(t.chosen().name, "a");
    assert_eq!(t.head_to_head, Some((10.0, 8.0)));
    assert_eq!(
        mock.options.saves,
        [2.0, 0.0, 0.0, 0.0],
        "the choice is left set"
    );
    assert_eq!(mock.options.window_ms, 10.0);
    // given, a, b, the given options again, then given and a in turn.
    assert_eq!(mock.timings.borrow().len(), 6);
    assert!(!t.complete() && t.cached_choice().is_none());
}

/// A budget spent by the time the second contender's turn comes: the first is still timed in
/// turn with the given options (and not confirmed here), the second is listed as not timed
/// in turn, and the given options stay.
#[test]
fn a_budget_stops_the_head_to_head_after_the_first_contender() {
    use std::time::Duration;
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    mock.window_sleep = Duration::from_millis(250);
    // Window runs: 0 given, 1 a (9 ms), 2 lucky (7 ms), 3 given again, 4-7 given and lucky in
    // turn (10 against 10): lucky is the first contender, a the second.
    mock.lucky_runs = vec![2];
    let list = candidates(&[
        ("given", ""),
        ("a", "SAVE0=1"),
        ("lucky", "MS=10 OFFSET=0.0001"),
    ]);
    // Checked before a at ~250 ms and before lucky at ~500 (200 ms of slack before the
    // budget); before a's turn at ~2000: spent.
    let settings = TuneSettings {
        budget: Some(Duration::from_millis(700)),
        combine: false,
        confirm: 2,
        contenders: 2,
        ..SETTINGS
    };
    let t = tune(&mut mock, &plan, &schedule, &list, &settings).unwrap();
    println!("{}", t.markdown());
    assert!(
        matches!(t.rows_tried[2].outcome, TuneOutcome::Unconfirmed(_)),
        "{:?}",
        t.rows_tried[2].outcome
    );
    assert!(
        matches!(t.rows_tried[1].outcome,
            TuneOutcome::Untried(ref w) if w.starts_with("not timed in turn with the given options: the tuning's time budget (0.7 s)")),
        "{:?}",
        t.rows_tried[1].outcome
    );
    assert!(t.rows_tried[1].window.is_some(), "a was measured");
    assert_eq!(t.chosen, 0);
    assert_eq!(
        mock.options,
        Mock::new().options,
        "the given options are left set"
    );
    assert_eq!(mock.timings.borrow().len(), 8);
    assert!(!t.complete() && t.cached_choice().is_none());
}

/// A budget that runs out in the combination stage: the sums it would try next are listed as
/// not tried; the choice is among the candidates and sums measured.
#[test]
fn a_budget_stops_the_combinations() {
    use std::time::Duration;
    let mut mock = Mock::new();
    let (plan, schedule) = run_of(&mock);
    mock.window_sleep = Duration::from_millis(400);
    let list = candidates(&[
        ("given", ""),
        ("a", "SAVE0=2"),
        ("b", "SAVE1=1"),
        ("c", "SAVE2=0.5"),
    ]);
    // Checked before c at ~1200 ms, before a+b at ~1600: past 1400 (200 ms of slack before
    // the budget, for a loaded machine: sleeps never end early).
    let settings = TuneSettings {
        budget: Some(Duration::from_millis(1400)),
        progress: true,
        ..SETTINGS
    };
    let t = tune(&mut mock, &plan, &schedule, &list, &settings).unwrap();
    println!("{}", t.markdown());
    let names: Vec<&str> = t.rows_tried.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["given", "a", "b", "c", "a+b", "a+c"]);
    assert_eq!(t.candidates, 4);
    for r in &t.rows_tried[4..] {
        assert!(
            matches!(r.outcome, TuneOutcome::Untried(ref w) if w.contains("1.4 s")),
            "{}: {:?}",
            r.name,
            r.outcome
        );
        assert!(r.window.is_none());
    }
    assert_eq!(t.rows_tried[4].settings, "SAVE0=2 SAVE1=1");
    assert_eq!(t.chosen().name, "a");
    assert_eq!(mock.options.saves, [2.0, 0.0, 0.0, 0.0]);
    // The four candidates and the given options again: no sum ran.
    assert_eq!(mock.timings.borrow().len(), 5);
    assert_eq!(t.untried(), 2);
    assert!(!t.complete() && t.cached_choice().is_none());
}

/// A budget never reached changes nothing: the same rows, times and choice as none, and the
/// choice is one to cache.
#[test]
fn a_budget_not_reached_changes_nothing() {
    let (plan, schedule) = run_of(&Mock::new());
    let list = candidates(&[
        ("given", ""),
        ("a", "SAVE0=2"),
        ("b", "SAVE1=1"),
        ("alt", "SAVE0=1.5"),
        ("c", "SAVE3=0.6"),
        ("wrong", "SAVE3=3 OFFSET=1"),
    ]);
    let run = |budget| {
        let mut mock = Mock::new();
        let settings = TuneSettings {
            budget,
            confirm: 2,
            contenders: 2,
            ..SETTINGS
        };
        let t = tune(&mut mock, &plan, &schedule, &list, &settings).unwrap();
        let timings = mock.timings.borrow().len();
        (t, mock.options, timings)
    };
    let unlimited = run(None);
    let budgeted = run(Some(std::time::Duration::from_secs(3600)));
    assert_eq!(unlimited, budgeted);
    let t = &unlimited.0;
    assert!(t.complete() && t.untried() == 0);
    assert_eq!(t.chosen().name, "a+b+c");
    let cached = t.cached_choice().expect("a complete tuning is cached");
    assert_eq!(
        (cached.name.as_str(), cached.settings.as_str()),
        ("a+b+c", t.chosen().settings.as_str())
    );
    // The budget is not part of the cache key: a complete tuning is the same with or without.
    let budgeted_key = TuneSettings {
        budget: Some(std::time::Duration::from_secs(60)),
        ..TuneSettings::default()
    }
    .key();
    assert_eq!(budgeted_key, TuneSettings::default().key());
}

/// The tunings the watchdog tests run in a child process (a watchdog that fires ends the
/// whole process): `FORA_TUNE_HANG_CHILD=hang` ([`a_hung_candidate_ends_the_process`]): the
/// given options, a faster path, then one whose window never ends, under a 2 s watchdog;
/// `=slow` ([`a_slow_batch_is_not_a_hang`]): every window takes 0.3 s, under a 0.1 s one.
#[test]
fn hung_candidate_child() {
    let Some(mode) = std::env::var_os("FORA_TUNE_HANG_CHILD") else {
        return; // run by the tests below only
    };
    let (plan, schedule) = run_of(&Mock::new());
    let mut mock = Mock::new();
    let (list, limit) = if mode == "slow" {
        mock.window_sleep = std::time::Duration::from_millis(300);
        let list = candidates(&[("given", ""), ("faster", "MS=5"), ("slower", "MS=12")]);
        (list, std::time::Duration::from_millis(100))
    } else {
        let list = candidates(&[("given", ""), ("faster", "MS=5"), ("hangs", "HANG=1")]);
        (list, std::time::Duration::from_secs(2))
    };
    let settings = TuneSettings {
        progress: true,
        watchdog: Some(limit),
        ..SETTINGS
    };
    let tuning = tune(&mut mock, &plan, &schedule, &list, &settings);
    println!(
        "the tuning returned: {:?}",
        tuning.map(|t| t.chosen().name.clone())
    );
}

/// Runs [`hung_candidate_child`] in a child process in `mode` (`FORA_TUNE_HANG_CHILD`).
fn run_child(mode: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "hung_candidate_child", "--nocapture"])
        .env("FORA_TUNE_HANG_CHILD", mode)
        .output()
        .unwrap()
}

/// A candidate whose measurement never ends: the watchdog names it and ends the process with
/// `WATCHDOG_EXIT` within its limit, in the line the device suite reads to tune again without
/// it; the candidates before it were measured.
#[test]
fn a_hung_candidate_ends_the_process() {
    let started = std::time::Instant::now();
    let out = run_child("hang");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(fora::watchdog::WATCHDOG_EXIT),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // Ended by the watchdog, not by the 30 s window.
    assert!(elapsed < std::time::Duration::from_secs(20), "{elapsed:?}");
    assert!(!stdout.contains("the tuning returned"), "{stdout}");
    for line in [
        "tune: 2 rows, given: window",
        "tune: 2 rows, faster: window",
        "tune: 2 rows, hangs: measuring",
        // (After 2 s, or ten times the given options' measurement where a loaded machine
        // made that longer.)
        "tune: 2 rows, hangs: no answer after ",
        " s: tuning stopped: candidate \"hangs\" left the GPU unusable",
    ] {
        assert!(stderr.contains(line), "{line:?} missing from:\n{stderr}");
    }
    // The device suite finds the candidate in it with its own pattern (tools/device_suite.sh).
    let suite = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/device_suite.sh"),
    )
    .unwrap();
    let pattern = suite
        .lines()
        .find_map(|l| {
            let at = l.find("grep -oE '")? + "grep -oE '".len();
            let p = &l[at..at + l[at..].find('\'')?];
            p.contains("left the GPU unusable").then_some(p)
        })
        .expect("device_suite.sh's pattern of a candidate that left the GPU unusable");
    let mut grep = std::process::Command::new("grep")
        .args(["-oE", pattern])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    grep.stdin.take().unwrap().write_all(&out.stderr).unwrap();
    let found = grep.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&found.stdout).trim(),
        "candidate \"hangs\" left the GPU unusable",
        "{pattern}"
    );
}

/// A watchdog that does not fire changes nothing: the same rows, times and choice as without
/// one, the head-to-head rounds (armed too) included.
#[test]
fn a_watchdog_that_does_not_fire_changes_nothing() {
    let (plan, schedule) = run_of(&Mock::new());
    let list = candidates(&[("given", ""), ("faster", "MS=5"), ("slower", "MS=12")]);
    let run = |watchdog| {
        let mut mock = Mock::new();
        let settings = TuneSettings {
            confirm: 2,
            watchdog,
            ..SETTINGS
        };
        let t = tune(&mut mock, &plan, &schedule, &list, &settings).unwrap();
        (t, mock.options, mock.timings.into_inner())
    };
    let (with, with_options, with_timings) = run(Some(std::time::Duration::from_secs(60)));
    let (without, without_options, without_timings) = run(None);
    assert_eq!(with.chosen().name, "faster");
    assert_eq!(with, without);
    assert_eq!(with_options, without_options);
    assert_eq!(with_timings, without_timings);
}

/// A batch whose windows are all slow is not a hang: the limit scales with the given options'
/// own measurement (not watched itself), so candidates as slow as it pass a watchdog shorter
/// than each of them, and the tuning ends with its choice.
#[test]
fn a_slow_batch_is_not_a_hang() {
    let out = run_child("slow");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("the tuning returned: Ok(\"faster\")"),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("no answer"), "{stderr}");
}
