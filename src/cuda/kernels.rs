//! The kernel fatbins build.rs compiled from `kernels/*.cu` and embedded in this binary.
//!
//! - `MODULES`: `(module name, fatbin bytes)`, one per `.cu` file; empty when the crate was built
//!   without nvcc (then `MISSING_REASON` says why).
//! - `ARCHS`: the architectures every module carries (SASS `sm_*`, PTX `compute_*`).
//! - `NVCC_VERSION`: the compiler that built them.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// True when this binary carries kernels.
pub fn available() -> bool {
    !MODULES.is_empty()
}
