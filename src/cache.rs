//! FORA cache policies: which loop step runs the blocks in full and which reuses the cache.
//! The sampler asks the policy once per step; a policy never sees the backend, so new policies
//! (per-step masks, adaptive ones fed by [`StepContext`]) need no change to the sampler.

use crate::backend::StepMode;
use anyhow::{ensure, Result};

/// What a policy may look at when deciding a step.
#[derive(Clone, Copy, Debug)]
pub struct StepContext {
    /// Loop position, 0 first.
    pub k: usize,
    /// Respaced index i, S-1 down to 0.
    pub i: usize,
    /// Loop length S.
    pub steps: usize,
    /// Original timestep of the step.
    pub t: i64,
}

/// Decides per step whether the model computes or reuses.
pub trait CachePolicy: Send {
    /// The mode of this step. Called once per step, in loop order. The sampler forces the
    /// first step to `Compute` whatever a policy says (an empty cache cannot be reused).
    fn mode(&mut self, ctx: &StepContext) -> StepMode;
    /// A short description for logs and stats.
    fn describe(&self) -> String;
}

/// Always compute (no caching).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCache;

impl CachePolicy for NoCache {
    fn mode(&mut self, _: &StepContext) -> StepMode {
        StepMode::Compute
    }
    fn describe(&self) -> String {
        "none".into()
    }
}

/// The official FORA static schedule: compute when `i == S-1` or `i % N == 0`, else reuse.
#[derive(Clone, Copy, Debug)]
pub struct StaticInterval {
    /// N: compute every N-th step (1: every step, no caching).
    pub interval: usize,
}

impl StaticInterval {
    /// The schedule with interval N (at least 1).
    pub fn new(interval: usize) -> Result<StaticInterval> {
        ensure!(
            interval >= 1,
            "cache interval must be at least 1 (1 = no caching), got {interval}"
        );
        Ok(StaticInterval { interval })
    }
}

impl CachePolicy for StaticInterval {
    fn mode(&mut self, ctx: &StepContext) -> StepMode {
        if ctx.i + 1 == ctx.steps || ctx.i.is_multiple_of(self.interval) {
            StepMode::Compute
        } else {
            StepMode::Reuse
        }
    }
    fn describe(&self) -> String {
        format!("fora-static N={}", self.interval)
    }
}

/// An explicit per-step mask, `compute[k]` for loop step k (true = compute).
#[derive(Clone, Debug)]
pub struct StepMask {
    /// `compute[k]`: whether loop step k computes (steps past the end compute).
    pub compute: Vec<bool>,
}

impl CachePolicy for StepMask {
    fn mode(&mut self, ctx: &StepContext) -> StepMode {
        if self.compute.get(ctx.k).copied().unwrap_or(true) {
            StepMode::Compute
        } else {
            StepMode::Reuse
        }
    }
    fn describe(&self) -> String {
        format!("mask({} steps)", self.compute.len())
    }
}

/// The policy for a CLI `--cache-interval N` (1 = no caching).
pub fn policy_for_interval(interval: usize) -> Result<Box<dyn CachePolicy>> {
    Ok(match interval {
        1 => Box::new(NoCache),
        n => Box::new(StaticInterval::new(n)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn computing_steps(policy: &mut dyn CachePolicy, steps: usize) -> usize {
        (0..steps)
            .filter(|&k| {
                let ctx = StepContext {
                    k,
                    i: steps - 1 - k,
                    steps,
                    t: 0,
                };
                policy.mode(&ctx) == StepMode::Compute
            })
            .count()
    }

    #[test]
    fn official_fora_counts_over_250_steps() {
        for (n, want) in [(2, 126), (3, 84), (4, 64), (5, 51), (6, 43)] {
            let mut p = StaticInterval::new(n).unwrap();
            assert_eq!(computing_steps(&mut p, 250), want, "N={n}");
        }
        assert_eq!(computing_steps(&mut NoCache, 250), 250);
        assert!(StaticInterval::new(0).is_err());
    }
}
