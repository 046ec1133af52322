//! The DiT + FORA benchmark (`cargo bench --bench dit`), the same harness as `fora bench`
//! (see `fora::bench`): ceilings of the card, every kernel at DiT shapes, computing and reuse
//! steps per batch with launch counts, and 250-step end-to-end runs for FORA N = 1..5.
//! Markdown to stdout, JSON to `--json` (default `target/bench.json`).
//!
//! Arguments go after `--`: `cargo bench --bench dit -- --quick`; a runner may call the built
//! binary as `dit --bench $BENCH_ARGS`. Without `--bench` (cargo running benches as tests)
//! nothing is measured. Without a CUDA device it prints `SKIP` and exits 0, unless
//! `FORA_REQUIRE_GPU=1`.

use fora::bench::{args_from_bench_argv, run};
use fora::cuda::device::device_count;
use std::process::ExitCode;

fn main() -> ExitCode {
    let (args, bench) = match args_from_bench_argv(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    if let Err(e) = args.plan() {
        eprintln!("dit bench: {e:#}");
        return ExitCode::from(2);
    }
    if !bench {
        println!("dit bench: not run as `cargo bench` (no --bench flag): nothing measured");
        return ExitCode::SUCCESS;
    }
    // Saving the random weights needs no device.
    if args.save_weights.is_none() && device_count().unwrap_or(0) == 0 {
        if std::env::var("FORA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            eprintln!("dit bench: FORA_REQUIRE_GPU=1 but there is no CUDA device");
            return ExitCode::FAILURE;
        }
        println!("SKIP dit bench: no CUDA device");
        return ExitCode::SUCCESS;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dit bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
