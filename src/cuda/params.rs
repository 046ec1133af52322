//! The kernel parameter structs, generated from `kernels/params.h` by bindgen (build.rs) and
//! committed as `params_bindings.rs` so machines without libclang build too. `tests/bindings.rs`
//! checks the committed file against a fresh generation; after changing params.h run
//! `tools/update_bindings.sh`. Each struct also gets `DeviceRepr` (appended by the generator), so
//! it can be passed by value to a kernel.

// Generated: the fields' meanings are documented in kernels/params.h.
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    missing_docs
)]
#![allow(clippy::all)]

include!("params_bindings.rs");
