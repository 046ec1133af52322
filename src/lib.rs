//! fora: Diffusion Transformers (DiT) with FORA step caching. A CPU reference backend that
//! computes exactly what the official PyTorch code computes, and a CUDA backend of fused
//! kernels, both driven by one sampler ([`sampler::Sampler`]) through the [`backend::Backend`]
//! trait.
//!
//! Sampling the embedded digits model (no download, no GPU) with classifier-free guidance and
//! the official FORA schedule (N = 3):
//!
//! ```
//! use fora::backend::{Guidance, GuidanceMode, NoiseSource};
//! use fora::cache::StaticInterval;
//! use fora::cpu::CpuBackend;
//! use fora::sampler::{Sampler, SamplerOptions};
//!
//! let (config, weights) = fora::embedded::default_model()?; // or DitWeights::load(path, arch)
//! let backend = CpuBackend::new(config, weights)?;
//! let options = SamplerOptions::ddpm(12).with_guidance(Some(Guidance {
//!     scale: 4.0,
//!     mode: GuidanceMode::Official3,
//! }));
//! let sampler = Sampler::new(&backend, options)?;
//! let mut policy = StaticInterval::new(3)?;
//! let out = sampler.sample(&[3, 7], NoiseSource::Seed(0), &mut policy)?;
//! assert_eq!(out.shape, [2, 3, 32, 32]); // two images, 3 channels, 32 x 32 px
//! // i = 11 and every i % 3 == 0 compute: 11, 9, 6, 3, 0; the other 7 steps reuse the cache.
//! assert_eq!((out.stats.computed, out.stats.reused), (5, 7));
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! On an NVIDIA GPU the same sampler drives [`cuda::CudaBackend`]; its kernels and execution
//! paths are [`cuda::CudaOptions`] (the `FORA_*` environment variables, or chosen in code):
//!
//! ```no_run
//! use fora::cuda::attention::AttentionImpl;
//! use fora::cuda::{CudaBackend, CudaOptions, Gpu};
//!
//! let (config, weights) = fora::weights::DitWeights::load("DiT-XL-2-256.safetensors", None)?;
//! let options = CudaOptions {
//!     attention: AttentionImpl::Auto, // wgmma_mn on a Hopper, v1 elsewhere
//!     ..CudaOptions::default()
//! };
//! let backend = CudaBackend::with_options(Gpu::new(0)?, &config, &weights, options)?;
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Modules: [`config`] (architectures), [`weights`] (checkpoints), [`diffusion`] (the official
//! schedule and respacing), [`cache`] (FORA policies), [`sampler`], [`cpu`] and [`cuda`] (the
//! backends), [`io`] and [`png_out`] (files: safetensors and PyTorch checkpoints read,
//! safetensors and PNG written), [`rng`] (noise), [`profile`] (NVTX ranges),
//! [`bench`](mod@bench) (`fora bench`), [`embedded`] (the default model), [`watchdog`] (a
//! launch that never ends), [`vae`] (the Stable Diffusion VAE's decoder: latents to images),
//! [`generate`] and [`npz`] (`fora generate`'s class ids, seeds and 8-bit images, and the
//! `.npz` it streams them into).

// Every public item is documented (CI: clippy -D warnings).
#![warn(missing_docs)]
// An unsafe fn's body is not one unsafe block: each unsafe operation in it is marked.
#![warn(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod bench;
pub mod cache;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod diffusion;
pub mod embedded;
pub(crate) mod fnv;
pub mod generate;
pub mod io;
pub mod npz;
pub mod png_out;
pub mod profile;
pub mod rng;
pub mod sampler;
pub mod vae;
pub mod watchdog;
pub mod weights;
