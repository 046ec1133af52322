//! A watchdog for processes that run launches new to a card: a launch that never ends (a
//! deadlock in a kernel) cannot be stopped from the host, and the CUDA context is lost with
//! it, so past a limit the process is better ended at once with a line that names what hung
//! than left to an outer timeout. Used by the tuning ([`crate::cuda::tune::TuneSettings::watchdog`])
//! and by `fora bench`'s timed measurements (`--watchdog-s`).

use anyhow::{Context, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The exit status of a process that a [`Watchdog`] ended.
pub const WATCHDOG_EXIT: i32 = 3;

/// A thread that ends the process where a measurement armed with [`Watchdog::arm`] (or
/// [`Watchdog::arm_expecting`]) runs past its limit, after printing its message to stderr. Dropping it
/// ends the thread. One measurement at a time: each guard is dropped before the next arming
/// (a debug build asserts it).
pub struct Watchdog {
    limit: Duration,
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the thread watches: the measurement in flight, since when and for how long, and
/// whether the watchdog is being dropped.
struct WatchState {
    armed: Option<(String, Instant, Duration)>,
    over: bool,
}

/// Disarms its [`Watchdog`] when dropped (the measurement ended, well or not).
pub struct WatchGuard<'a>(Option<&'a Watchdog>);

impl Watchdog {
    /// Starts the thread; `limit` is [`Watchdog::arm`]'s. `message(name, limit)`: the line
    /// printed before the process ends, for the measurement armed as `name` (its limit as
    /// `"20 s"`).
    pub fn start(
        limit: Duration,
        message: impl Fn(&str, &str) -> String + Send + 'static,
    ) -> Result<Watchdog> {
        let shared = Arc::new((
            Mutex::new(WatchState {
                armed: None,
                over: false,
            }),
            Condvar::new(),
        ));
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fora-watchdog".into())
            .spawn(move || {
                let (lock, wake) = &*watched;
                let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if state.over {
                        return;
                    }
                    let Some((name, since, limit)) = &state.armed else {
                        state = wake.wait(state).unwrap_or_else(|e| e.into_inner());
                        continue;
                    };
                    let (elapsed, limit) = (since.elapsed(), *limit);
                    if elapsed >= limit {
                        // Not eprintln!, which panics where stderr is gone (the thread would
                        // die and leave the hang unbounded): the line if it can be written,
                        // then the end either way.
                        use std::io::Write;
                        let line = message(name, &format!("{} s", limit.as_secs_f64()));
                        let _ = writeln!(std::io::stderr(), "{line}");
                        end_process(WATCHDOG_EXIT);
                    }
                    state = wake
                        .wait_timeout(state, limit - elapsed)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })
            .context("starting the watchdog thread")?;
        Ok(Watchdog {
            limit,
            shared,
            thread: Some(thread),
        })
    }

    /// Sets the state with `f` and wakes the thread.
    fn update(&self, f: impl FnOnce(&mut WatchState)) {
        let (lock, wake) = &*self.shared;
        f(&mut lock.lock().unwrap_or_else(|e| e.into_inner()));
        wake.notify_one();
    }

    /// Watches the measurement `name` from now until the guard is dropped, for the limit the
    /// watchdog was started with (nothing where `watchdog` is `None`).
    pub fn arm<'a>(watchdog: Option<&'a Watchdog>, name: &str) -> WatchGuard<'a> {
        Watchdog::arm_expecting(watchdog, name, Duration::ZERO)
    }

    /// [`Watchdog::arm`] for a measurement expected to take about `expected` (seen at its
    /// pace so far): the larger of the limit and [`Watchdog::SLACK`] times that, so that a
    /// long but healthy measurement (a batch of many rows, many runs) is not a hang.
    pub fn arm_expecting<'a>(
        watchdog: Option<&'a Watchdog>,
        name: &str,
        expected: Duration,
    ) -> WatchGuard<'a> {
        if let Some(w) = watchdog {
            let limit = w.limit.max(expected.saturating_mul(Watchdog::SLACK));
            let armed = Some((name.to_string(), Instant::now(), limit));
            w.update(|s| {
                // One at a time: an inner guard's drop would disarm the outer measurement.
                debug_assert!(s.armed.is_none(), "a watchdog armed twice at once");
                s.armed = armed;
            });
        }
        WatchGuard(watchdog)
    }

    /// How many times its expected length a measurement armed with
    /// [`Watchdog::arm_expecting`] may take.
    pub const SLACK: u32 = 10;
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.0 {
            w.update(|s| s.armed = None);
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.update(|s| s.over = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Ends the process with `status` at once: no destructors, no exit handlers (the CUDA
/// context's teardown would wait for the launch that does not end).
fn end_process(status: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: `_exit` ends the process; nothing after it runs.
    unsafe {
        libc::_exit(status)
    }
    #[cfg(not(unix))]
    std::process::abort()
}
