//! The CUDA backend: kernels compiled by build.rs from `kernels/*.cu` and embedded in the binary,
//! a device layer over cudarc ([`device::Gpu`]), one launcher per kernel, and test helpers.

pub mod attention;
pub mod backend;
pub mod bandwidth;
pub mod conditioning;
pub mod cublaslt;
pub mod device;
pub mod embed;
pub mod fora;
pub mod gemm;
pub mod gemm_ln;
pub mod kernels;
pub mod model;
pub mod norm;
pub mod op_timer;
pub mod params;
pub mod probe;
pub mod qkv_attention;
pub mod sampler;
pub mod step_graph;
// The crate's own GPU tests share it (it prints SKIP lines and reads FORA_REQUIRE_GPU): not
// part of the API a dependent builds on.
#[doc(hidden)]
pub mod testing;
mod tma_tiles;
pub mod tune;
pub mod vae;

pub use backend::{CudaBackend, CudaOptions, CudaWorkspace};
pub use device::{dptr, Gpu};
