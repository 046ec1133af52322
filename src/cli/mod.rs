//! The subcommands, a module each. What they share (the model flags, the `Job` trait and
//! `run_on`, which picks the backend) is in main.rs.

pub(crate) mod decode;
pub(crate) mod forward;
pub(crate) mod generate;
pub(crate) mod info;
pub(crate) mod sample;
