#!/usr/bin/env bash
# Regenerates src/cuda/params_bindings.rs from kernels/params.h (bindgen in build.rs; needs
# libclang, e.g. apt-get install libclang-dev). Run after adding or changing a struct in
# params.h, then commit params.h and src/cuda/params_bindings.rs together.
set -euo pipefail
cd "$(dirname "$0")/.."
FORA_WRITE_BINDINGS="$PWD/src/cuda/params_bindings.rs" cargo check --lib --quiet
# Reset the build script's env so the next ordinary build does not rerun it for this variable.
cargo check --lib --quiet
git --no-pager diff --stat -- src/cuda/params_bindings.rs
