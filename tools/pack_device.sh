#!/usr/bin/env bash
# Packs what tools/device_suite.sh runs into .devpack/ (ignored by git) within the device
# tool's 64 MiB carry limit: ../shared/device/pack.sh builds everything in release mode, then
# only the GPU test binaries, the CLI test, the fora binary and the dit, gemm and attention
# benches stay, stripped.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
../shared/device/pack.sh > /dev/null
keep_tests="gpu_small_kernels gpu_attention gpu_gemm gpu_backend cli"
for t in .devpack/test/*; do
  case " $keep_tests " in *" $(basename "$t") "*) ;; *) rm -f "$t" ;; esac
done
keep_benches="dit gemm attention"
for b in .devpack/bench/*; do
  case " $keep_benches " in *" $(basename "$b") "*) ;; *) rm -f "$b" ;; esac
done
strip .devpack/test/* .devpack/bench/* .devpack/bin/*
du -sh .devpack; ls .devpack/*
