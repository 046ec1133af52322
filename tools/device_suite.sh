#!/usr/bin/env bash
# One device call for a lent GPU machine (../shared/device/README.md): the GPU tests, fora's
# benchmark, the PyTorch reference and compute-sanitizer, in that order, each phase bounded so
# that the whole call ends by DEADLINE_S seconds (default 270); what ran is under $OUT.
# Prepare here with tools/pack_device.sh (packs .devpack/), then run with carry [".devpack"]:
#   bash tools/device_suite.sh
set -u
export FORA_REQUIRE_GPU=1 RUST_BACKTRACE=1 FORA_BIN=.devpack/bin/fora
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-270}
start=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }
# bounded <seconds> <command...>: runs with min(seconds, time left - 5), skipped under 10 s left.
bounded() {
  local want=$1; shift; local l=$(( $(left) - 5 ))
  if [ "$l" -lt 10 ]; then echo "SKIPPED (deadline): $*"; return 0; fi
  [ "$want" -gt "$l" ] && want=$l
  local s=$(date +%s); timeout "$want" "$@"; local rc=$?
  echo "rc=$rc after $(( $(date +%s) - s ))s (limit ${want}s): $*"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  for t in gpu_small_kernels gpu_attention gpu_gemm gpu_backend cli; do
    echo "=== test $t"
    bounded 100 .devpack/test/$t --test-threads=1 --nocapture 2>&1 \
      | grep -E "^test |rel_l2|SKIP|panicked|FAILED|failures|test result|^rc=" | grep -v "^test .* \.\.\. ok$" | tail -n 80
  done
} > "$OUT/tests.log" 2>&1
grep -E "test result|^rc=|FAILED|panicked" "$OUT/tests.log"

echo "=== fora bench"
bounded 75 .devpack/bin/fora bench --json "$OUT/bench.json" ${FORA_BENCH_ARGS:---batches 2,256 --intervals 1,3 --e2e-reps 1} >> "$OUT/bench.log" 2>&1
tail -n 3 "$OUT/bench.log"


echo "=== PyTorch reference"
budget=$(( $(left) - 60 ))
[ "$budget" -gt 60 ] && budget=60
if [ "$budget" -gt 20 ]; then
  bounded $(( budget + 10 )) python3 tools/bench_torch.py --json "$OUT/bench_torch.json" --budget-s "$budget" \
    ${TORCH_BENCH_ARGS:---batches 2,256 --modes eager,graph --intervals 3 --e2e-modes graph} > "$OUT/bench_torch.log" 2>&1
  tail -n 3 "$OUT/bench_torch.log"
else
  echo "SKIPPED (deadline): PyTorch reference"
fi

{
  echo "=== memcheck gpu_small_kernels"
  bounded 20 compute-sanitizer --tool memcheck --error-exitcode 9 .devpack/test/gpu_small_kernels --test-threads=1 2>&1 | tail -n 4
  echo "=== memcheck gpu_attention (512 px case skipped)"
  bounded 20 compute-sanitizer --tool memcheck --error-exitcode 9 .devpack/test/gpu_attention --test-threads=1 --skip xl2_512px 2>&1 | tail -n 4
  echo "=== memcheck gpu_backend (small-model sampling tests)"
  bounded 40 compute-sanitizer --tool memcheck --error-exitcode 9 .devpack/test/gpu_backend --test-threads=1 gpu_execution_paths_agree gpu_sampling_allocates_nothing gpu_noise_file 2>&1 | tail -n 4
  echo "=== racecheck gpu_gemm (cuBLAS's own nvjet kernels excluded)"
  bounded 40 compute-sanitizer --tool racecheck --error-exitcode 9 --kernel-name-exclude kns=nvjet .devpack/test/gpu_gemm --test-threads=1 2>&1 | tail -n 4
} > "$OUT/sanitize.log" 2>&1
grep -E "SUMMARY|^rc=|SKIPPED" "$OUT/sanitize.log"
echo "=== done after $(( $(date +%s) - start ))s"
