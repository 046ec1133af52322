#!/usr/bin/env bash
# Compiles every kernels/*.cu for sm_80 and sm_90a with `ptxas -v` and fails when any kernel
# spills registers or uses a local-memory stack frame, or when ptxas serializes a kernel's
# wgmma instructions (info C7514: a non-wgmma instruction may touch registers of a wgmma in
# flight; C7518: a wgmma still in flight where a branch ends; either way ptxas waits after
# every wgmma: the kernel stays correct but loses the overlap).
# CI calls it; build.rs only warns.
# nvcc: $NVCC, else PATH, else $CUDA_HOME/bin, /usr/local/cuda/bin, the pip wheel location.
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
    if command -v nvcc >/dev/null; then nvcc=$(command -v nvcc)
    elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then nvcc="$CUDA_HOME/bin/nvcc"
    elif [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc
    else
        site=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null || true)
        if [ -n "$site" ] && [ -x "$site/nvidia/cu13/bin/nvcc" ]; then nvcc="$site/nvidia/cu13/bin/nvcc"; fi
    fi
fi
if [ -z "$nvcc" ]; then echo "check_ptxas: nvcc not found (set NVCC)" >&2; exit 2; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# check_one <cu> <arch> <result file>: compiles one file for one architecture and writes its
# verdict ("ok ..." or "FAIL ..." and the offending lines) to the result file.
check_one() {
    local cu=$1 arch=$2 result=$3
    local log="$result.log"
    if ! "$nvcc" -cubin -arch="$arch" -O3 -std=c++17 -I kernels -Xptxas -v "$cu" -o "$result.cubin" >"$log" 2>&1; then
        { echo "FAIL $cu ($arch): does not compile"; cat "$log"; } > "$result"; return
    fi
    # "N bytes stack frame, N bytes spill stores, N bytes spill loads" per function.
    local bad serialized kernels regs
    bad=$(awk '/Function properties for/ {f=$NF} /bytes stack frame/ {
             if ($1 != 0 || $5 != 0 || $9 != 0) print f ": " $0 }' "$log")
    serialized=$(grep -E "C7514|C7518|mma_async instructions are serialized" "$log" || true)
    if [ -n "$serialized" ]; then bad="${bad:+$bad
}$serialized"; fi
    kernels=$(grep -c "Compiling entry function" "$log" || true)
    if [ -n "$bad" ]; then
        { echo "FAIL $cu ($arch):"; echo "$bad"; } > "$result"
    else
        regs=$(grep -o "Used [0-9]* registers" "$log" | awk '{print $2}' | sort -n | tail -1)
        echo "ok   $cu ($arch): $kernels kernels, no spills, no stack, no serialized wgmma, max ${regs:-0} registers" > "$result"
    fi
}
# One compile a core at a time (ptxas is single-threaded); the verdicts print in file order.
max_jobs=$(nproc 2>/dev/null || echo 2)
results=()
for cu in kernels/*.cu; do
    for arch in sm_80 sm_90a; do
        result="$tmp/${#results[@]}"
        results+=("$result")
        check_one "$cu" "$arch" "$result" &
        while [ "$(jobs -rp | wc -l)" -ge "$max_jobs" ]; do wait -n || true; done
    done
done
wait
status=0
for result in "${results[@]}"; do
    cat "$result"
    if grep -q "^FAIL" "$result"; then status=1; fi
done
exit $status
