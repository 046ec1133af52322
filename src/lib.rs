//! fora: Diffusion Transformers (DiT) with FORA step caching. A CPU reference backend that
//! computes exactly what the official PyTorch code computes, and a CUDA backend of fused
//! kernels, both driven by one sampler (`sampler.rs`) through the [`backend::Backend`] trait.

pub mod backend;
pub mod bench;
pub mod cache;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod diffusion;
pub mod embedded;
pub mod io;
pub mod png_out;
pub mod profile;
pub mod rng;
pub mod sampler;
pub mod weights;
