//! The subcommands, a module each. What every command shares (the model flags, the `Job` trait
//! and `run_on`, which picks the backend) is in main.rs; sample.rs also holds what `sample` and
//! `generate` share (the sampling flags, the tuning, the set-up read before the model loads),
//! decode.rs the VAE decode that `sample`, `generate` and `decode` use.

pub(crate) mod decode;
pub(crate) mod forward;
pub(crate) mod generate;
pub(crate) mod info;
pub(crate) mod merge;
pub(crate) mod sample;
pub(crate) mod unpack;
