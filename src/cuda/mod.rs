//! The CUDA backend: kernels compiled by build.rs from `kernels/*.cu` and embedded in the binary,
//! a device layer over cudarc ([`device::Gpu`]), one launcher per kernel, and test helpers.

pub mod attention;
pub mod cublaslt;
pub mod device;
pub mod gemm;
pub mod kernels;
pub mod params;
pub mod testing;

pub use device::{dptr, Gpu};
