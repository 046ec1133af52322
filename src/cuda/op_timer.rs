//! In-model op times: a CUDA event pair around each op of a forward, recorded only while a
//! caller (the bench's `ops` section) has asked [`Gpu::start_op_times`] for them, so that kernel
//! engineers see where a step's time goes inside the step itself, with its real inputs and the
//! caches as they are, not in kernels timed alone.
//!
//! The model marks its ops with [`crate::op_range!`]: an NVTX range always (as
//! [`crate::nvtx_range!`]), and while timing is on, events on the device's stream before and after
//! the op. Only the outermost op of a nesting is timed. Timing needs the ops launched one by one
//! (a workspace without CUDA graphs): an event recorded into a stream capture would become a
//! graph node, so an op entered during a capture is not timed and [`Gpu::finish_op_times`] says
//! so. With timing off (always, outside the bench) an op costs one relaxed atomic load on top of
//! its NVTX range, and allocates nothing.

use super::device::Gpu;
use anyhow::{bail, Context, Result};
use cudarc::driver::{sys, CudaEvent};
use std::fmt::Write;

/// One timed op of a step: its range's name, when it started (ms after the timing started) and
/// how long it took (ms), from the events around it on the device's stream.
#[derive(Clone, Debug, PartialEq)]
pub struct OpSpan {
    /// The op range's name ("qkv", "attention", ...).
    pub label: String,
    /// Start, ms after [`Gpu::start_op_times`]'s event.
    pub start_ms: f64,
    /// Duration, ms.
    pub ms: f64,
}

/// What one timing (from [`Gpu::start_op_times`] to [`Gpu::finish_op_times`]) recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTimes {
    /// The timed ops, in the order they were enqueued.
    pub spans: Vec<OpSpan>,
    /// From the start event to the finish event, ms: everything enqueued in between, ops or not.
    pub total_ms: f64,
}

/// The recorder a [`Gpu`] carries (behind a mutex; used only while timing is on).
#[derive(Default)]
pub(crate) struct OpRecorder {
    /// Event pool, reused from one timing to the next: [0] is the timing's start, then two a
    /// span (start, end), and after the last span the timing's finish.
    events: Vec<CudaEvent>,
    /// Events of the pool in use.
    used: usize,
    /// (label, index of the span's start event; its end event follows it).
    spans: Vec<(String, usize)>,
    /// Op ranges entered and not yet left (only the outermost is timed).
    depth: usize,
    /// The first failure while timing (reported by `finish_op_times`; an op's guard cannot
    /// return an error).
    error: Option<String>,
}

impl OpRecorder {
    /// The next pooled event, created on first use.
    fn event(&mut self, gpu: &Gpu) -> Result<usize> {
        if self.used == self.events.len() {
            let e = gpu
                .context()
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .context("cannot create a CUDA event for the op times")?;
            self.events.push(e);
        }
        self.used += 1;
        Ok(self.used - 1)
    }

    /// Records a new pooled event on `gpu`'s stream and returns its index.
    fn record(&mut self, gpu: &Gpu) -> Result<usize> {
        let i = self.event(gpu)?;
        self.events[i]
            .record(gpu.stream())
            .context("cannot record an op-time event")?;
        Ok(i)
    }

    fn fail(&mut self, e: anyhow::Error) {
        if self.error.is_none() {
            self.error = Some(format!("{e:#}"));
        }
    }
}

/// Whether `gpu`'s stream is capturing into a graph.
fn capturing(gpu: &Gpu) -> Result<bool> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: the stream is alive (owned by `gpu`); the driver writes one status.
    unsafe { sys::cuStreamIsCapturing(gpu.stream().cu_stream(), &mut status) }
        .result()
        .context("cuStreamIsCapturing")?;
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

impl Gpu {
    /// Starts timing ops: records the start event, then every outermost [`crate::op_range!`] on
    /// this handle gets an event pair until [`Gpu::finish_op_times`]. Fails if timing is already
    /// on or the stream is capturing a graph.
    pub fn start_op_times(&self) -> Result<()> {
        if capturing(self)? {
            bail!("op times need ops launched one by one; the stream is capturing a graph");
        }
        let mut rec = self.op_recorder();
        if self.op_timing() {
            bail!("op times are already being recorded on this device handle");
        }
        rec.used = 0;
        rec.spans.clear();
        rec.depth = 0;
        rec.error = None;
        rec.record(self)?;
        self.set_op_timing(true);
        Ok(())
    }

    /// Stops timing ops: records the finish event, waits for the stream, and returns every
    /// timed op. Fails if timing was not on, an op could not be timed (entered during a
    /// capture, an event that failed), or an op was still open.
    pub fn finish_op_times(&self) -> Result<OpTimes> {
        let mut rec = self.op_recorder();
        if !self.op_timing() {
            bail!("op times were not started on this device handle");
        }
        self.set_op_timing(false);
        let end = rec.record(self)?;
        self.synchronize().context("the timed ops failed")?;
        if let Some(e) = rec.error.take() {
            bail!("an op could not be timed: {e}");
        }
        if rec.depth != 0 {
            bail!(
                "{} op range(s) were still open when the op times finished",
                rec.depth
            );
        }
        let ms = |a: usize, b: usize| -> Result<f64> {
            Ok(rec.events[a]
                .elapsed_ms(&rec.events[b])
                .context("cannot read an op-time event")? as f64)
        };
        let spans = rec
            .spans
            .iter()
            .map(|(label, i)| {
                Ok(OpSpan {
                    label: label.clone(),
                    start_ms: ms(0, *i)?,
                    ms: ms(*i, *i + 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(OpTimes {
            spans,
            total_ms: ms(0, end)?,
        })
    }

    /// An op range begins (see [`OpRange`]): Some(its start event) when it is timed.
    fn op_enter(&self, name: core::fmt::Arguments<'_>) -> Option<usize> {
        let mut rec = self.op_recorder();
        rec.depth += 1;
        if rec.depth > 1 {
            return None;
        }
        match capturing(self) {
            Ok(false) => {}
            Ok(true) => {
                rec.fail(anyhow::anyhow!(
                    "op {name} was enqueued into a graph capture"
                ));
                return None;
            }
            Err(e) => {
                rec.fail(e);
                return None;
            }
        }
        let mut label = String::new();
        let _ = label.write_fmt(name);
        // The start event, recorded now; its end event is the next one of the pool.
        let pair = rec
            .record(self)
            .and_then(|start| rec.event(self).map(|_| start));
        match pair {
            Ok(start) => {
                rec.spans.push((label, start));
                Some(start)
            }
            Err(e) => {
                rec.fail(e);
                None
            }
        }
    }

    /// An op range ends: its end event, if it was timed.
    fn op_leave(&self, start: Option<usize>) {
        let mut rec = self.op_recorder();
        rec.depth = rec.depth.saturating_sub(1);
        if let Some(start) = start {
            if let Err(e) = rec.events[start + 1]
                .record(self.stream())
                .context("cannot record an op-time event")
            {
                rec.fail(e);
            }
        }
    }
}

/// An op of a forward: an NVTX range, and while [`Gpu::start_op_times`] is on, an event pair on
/// the device's stream around it. Ends when dropped. Use [`crate::op_range!`].
#[must_use = "the op ends when this guard is dropped"]
pub struct OpRange<'a> {
    _nvtx: crate::profile::NvtxRange,
    /// (the device handle, the span's start event) while timing was on when it began.
    timed: Option<(&'a Gpu, Option<usize>)>,
}

impl<'a> OpRange<'a> {
    /// Begins an op named by `name` on `gpu` (use [`crate::op_range!`]).
    pub fn push(gpu: &'a Gpu, name: core::fmt::Arguments<'_>) -> OpRange<'a> {
        let nvtx = crate::profile::NvtxRange::push(name);
        let timed = gpu.op_timing().then(|| (gpu, gpu.op_enter(name)));
        OpRange { _nvtx: nvtx, timed }
    }
}

impl Drop for OpRange<'_> {
    fn drop(&mut self) {
        if let Some((gpu, start)) = self.timed {
            gpu.op_leave(start);
        }
    }
}

/// `op_range!(gpu, "qkv")`, `op_range!(gpu, "{op}")`: an [`OpRange`] guard for the rest of the
/// scope: an NVTX range, and an in-model op time while the bench records them.
#[macro_export]
macro_rules! op_range {
    ($gpu:expr, $($arg:tt)*) => {
        $crate::cuda::op_timer::OpRange::push($gpu, format_args!($($arg)*))
    };
}
