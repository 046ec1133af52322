//! CUDA-event timing: back-to-back runs, and a kernel alone from CUDA-graph replays.

use crate::cuda::Gpu;
use anyhow::{Context, Result};
use cudarc::driver::sys;

use super::{launches_per_graph, Stats};

/// CUDA-event timing of back-to-back runs.
pub(crate) struct Timer {
    pub(crate) warmup: usize,
    pub(crate) runs: usize,
    pub(crate) profiler_api: bool,
    /// Ends the process where one measurement (warm-up and timed runs) does not end in time
    /// (`--watchdog-s`).
    pub(crate) watchdog: Option<crate::watchdog::Watchdog>,
}

/// What the watchdog names: the last `bench:` line names the section, or the kernel row
/// before the one that hung (the kernel rows are logged as they are measured).
const MEASUREMENT: &str = "a timed measurement (after the last `bench:` line)";

impl Timer {
    /// Runs `launch(i)` for i in 0..warmup untimed, then i in warmup..warmup+runs with an event
    /// between consecutive runs; the host does not wait between runs.
    pub(crate) fn time(&self, gpu: &Gpu, launch: impl FnMut(usize) -> Result<()>) -> Result<Stats> {
        self.time_with_host(gpu, launch).map(|(stats, _)| stats)
    }

    /// [`Timer::time`], and the host's wall-clock time per run to issue the timed runs (from
    /// the first event's record to the last one's, before waiting for the GPU), in ms.
    ///
    /// The watchdog (`--watchdog-s`) watches the first warm-up run for its limit, and the
    /// other runs for the larger of it and ten times what they take at the first one's pace (a
    /// long `--runs` of many rows is not a hang).
    pub(super) fn time_with_host(
        &self,
        gpu: &Gpu,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<(Stats, f64)> {
        use crate::watchdog::Watchdog;
        let watchdog = self.watchdog.as_ref();
        let first = Watchdog::arm(watchdog, MEASUREMENT);
        let started = std::time::Instant::now();
        if self.warmup > 0 {
            launch(0)?;
            gpu.synchronize().context("the first warm-up run failed")?;
        }
        let per_run = started.elapsed();
        drop(first);
        let rest = u32::try_from(self.warmup.saturating_sub(1) + self.runs).unwrap_or(u32::MAX);
        let _rest = Watchdog::arm_expecting(watchdog, MEASUREMENT, per_run.saturating_mul(rest));
        for i in 1..self.warmup {
            launch(i)?;
        }
        gpu.synchronize().context("warm-up runs failed")?;
        let ctx = gpu.context();
        let stream = gpu.stream();
        let events = (0..=self.runs)
            .map(|_| {
                ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .context("cannot create a CUDA event")
            })
            .collect::<Result<Vec<_>>>()?;
        if self.profiler_api {
            profiler(true)?;
        }
        events[0].record(stream).context("cannot record an event")?;
        let issue = std::time::Instant::now();
        for (i, event) in events[1..].iter().enumerate() {
            launch(self.warmup + i)?;
            event.record(stream).context("cannot record an event")?;
        }
        let host_ms = issue.elapsed().as_secs_f64() * 1e3 / self.runs.max(1) as f64;
        gpu.synchronize().context("timed runs failed")?;
        if self.profiler_api {
            profiler(false)?;
        }
        let samples = events
            .windows(2)
            .map(|w| {
                Ok(w[0]
                    .elapsed_ms(&w[1])
                    .context("cannot read an event time")? as f64)
            })
            .collect::<Result<Vec<f64>>>()?;
        Ok((Stats::from_samples(&samples)?, host_ms))
    }
}

impl Timer {
    /// Per-launch time of a kernel measured alone: after eager warm-up runs, `launch(i)` is
    /// captured n times (i = 0..n, cycling through `copies` rotated buffer sets) into one CUDA
    /// graph, the graph is timed as [`Timer::time`] times a step, and each sample is divided by
    /// n. Host costs per launch (cuBLASLt's per-call heuristic query included) stay out of the
    /// numbers, as they do in a captured sampler step. Returns the stats and n.
    pub(super) fn time_alone(
        &self,
        gpu: &Gpu,
        copies: usize,
        mut launch: impl FnMut(usize) -> Result<()>,
    ) -> Result<(Stats, usize)> {
        // The launches and their capture; the graph's timing is watched by time_with_host.
        let setup = crate::watchdog::Watchdog::arm(self.watchdog.as_ref(), MEASUREMENT);
        for i in 0..self.warmup.max(1) {
            launch(i)?;
        }
        gpu.synchronize().context("warm-up launches failed")?;
        let ctx = gpu.context();
        let stream = gpu.stream();
        let event = || {
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .context("cannot create a CUDA event")
        };
        let (start, end) = (event()?, event()?);
        start.record(stream).context("cannot record an event")?;
        launch(0)?;
        end.record(stream).context("cannot record an event")?;
        let single_ms = start
            .elapsed_ms(&end)
            .context("cannot read an event time")? as f64;
        let n = launches_per_graph(single_ms, copies);
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("cannot start a stream capture")?;
        let mut captured = Ok(());
        for i in 0..n {
            captured = launch(i);
            if captured.is_err() {
                break;
            }
        }
        // End the capture whatever happened, so the stream stays usable.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        captured.context("while capturing the launches")?;
        let graph = graph
            .context("cannot instantiate the captured launches")?
            .context("the captured graph is empty")?;
        graph.upload().context("cannot upload a CUDA graph")?;
        drop(setup);
        let stats = self.time(gpu, |_| {
            graph.launch().context("cannot launch a CUDA graph")
        })?;
        Ok((stats.scaled(1.0 / n as f64), n))
    }
}

fn profiler(start: bool) -> Result<()> {
    // SAFETY: plain driver calls without arguments; the context is current (bound by the
    // event calls before).
    let r = unsafe {
        if start {
            sys::cuProfilerStart()
        } else {
            sys::cuProfilerStop()
        }
    };
    r.result()
        .with_context(|| format!("cuProfiler{} failed", if start { "Start" } else { "Stop" }))
}
