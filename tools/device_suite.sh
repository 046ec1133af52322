#!/usr/bin/env bash
# One device call on a lent GPU machine (../shared/device/README.md) that runs, phase by phase,
# the GPU tests, fora's benchmark, the PyTorch reference, compute-sanitizer, and the embedded
# model's training + quality measurement; each phase is bounded so that the whole call ends by
# DEADLINE_S seconds (default 450: leave the rest of a 15-minute loan for the machine's start
# and one short rerun). Everything lands under $OUT.
#
#   here:   tools/pack_device.sh                      (packs .devpack/ and .devpack.txz)
#   device: run, carry [".devpack.txz"] (unpacked here; the unpacked pack is over the 64 MiB
#           carry limit since session 5; an older pack's .devpack.tgz is unpacked too), command
#           "bash tools/device_suite.sh", timeout_s 500
#
# The defaults are one call of about 7 min on an H200 (sized on session 7's runs: tests ~110 s,
# bench ~45 s, PyTorch ~20 s, variants ~9 s each, memcheck's subset a few minutes): every GPU
# test, the benchmark and the PyTorch reference, the step times of the opt-in paths still to
# decide, and memcheck over a subset of the test binaries.
#
# PHASES picks phases in order (default "tests bench torch variants memcheck"):
#   tests      every GPU test binary with FORA_REQUIRE_GPU=1, and the embedded model's sample
#              timed as a whole process (TEST_PART_S bounds each part, TESTS_S the phase: no
#              part starts after it);
#   memcheck   compute-sanitizer memcheck over a subset (SANITIZE_FULL=1: every test binary);
#   racecheck  racecheck over the kernel tests, our kernels only (RACECHECK_RUNS overrides);
#   sanitize   memcheck, then racecheck;
#   variants   `fora bench --sections steps` of each execution path in VARIANTS (default
#              "default qkv_attention gemm_ln qkv_gemm_ln qkv_gemm_ln_pdl gemm_ln_one_per_sm
#              ours_pdl lt_narrow gemm_ln_many gemm_ln_wide attention_tma_pp tma tma_staged
#              lt_cluster_k prefetch_weights"; VARIANTS=all: every one, among them s17_steps,
#              no_reuse_sum, no_final_sampler, attention_deep, attention_split, f32_product,
#              attention_tma, copy_table, side_stream, pdl, tma_mc, tma_unstaged; s17_steps: the reuse-step defaults before session
#              18; tma_staged / tma_unstaged: STAGED_TILES with and without the staged
#              epilogue; tma_no_cluster_k / tma_staged_cluster_k: the TMA path without session
#              22's cluster split-K pick, and with it beside the staged tiles; lt_cluster_k:
#              the default path with proj and fc2 on the cluster split-K tiles;
#              prefetch_weights: FORA_PREFETCH_WEIGHTS=1; gemm_ln (gemm_ln_pdl,
#              gemm_ln_prefetch): the default path with proj / fc2 and their LayerNorm as one
#              gemm_tma_ln_mc_64x72 launch at few rows (FORA_GEMM_LN=1; with FORA_PDL=1, with
#              FORA_PREFETCH_WEIGHTS=1); qkv_attention: each block's qkv Linear and attention
#              as one qkv_attention_mc_d72 launch at few rows (FORA_QKV_ATTENTION=1);
#              qkv_gemm_ln (qkv_gemm_ln_pdl): both fusions (with FORA_PDL=1);
#              attention_tma_pp: FORA_ATTENTION=tma_pp (session 25); gemm_ln_many
#              (gemm_ln_all): proj / fc2 and their LayerNorm as one gemm_tma_ln_mc_128x72
#              launch at many rows (FORA_GEMM_LN_MANY_ROWS=1; with FORA_GEMM_LN=1 too);
#              gemm_ln_wide: the same on gemm_tma_ln_mc_128x144 (FORA_GEMM_LN_WIDE=1, session
#              26); gemm_ln_one_per_sm: gemm_ln with its CTAs one an SM
#              (FORA_GEMM_LN_ONE_PER_SM=1); lt_narrow: qkv and fc1 on the TMA tiles 128 x 112 / 128 x 144 under
#              cuBLASLt; ours_pdl: every block launch ours under PDL (session 26); "all"
#              adds unfused, f32_bias, full_table, fused_final, forward_graph, lt_autotune, lt_splitk,
#              l2_persist, tma_pdl, tma_mc_pdl, attention_v1, attention_v2, attention_wgmma,
#              attention_wgmma_mn and wgmma; VARIANT_ROWS / VARIANT_SECTIONS /
#              VARIANT_ARGS / VARIANT_S change what each runs);
#   bench      `fora bench` (FORA_BENCH_ARGS overrides its arguments);
#   ops        where a step's time goes inside the step: `fora bench --sections steps,ops` at
#              OPS_ROWS (default 2,256) with OPS_GEMM (default cublaslt; also e.g. tma), each
#              op's time a step from CUDA events around it, beside the graph-replayed step;
#   torch      tools/bench_torch.py, the PyTorch reference (TORCH_BENCH_ARGS; TORCH_S, default 60,
#              bounds it);
#   issue5     what issue 5 still asks measured in one call: our steps at 2, 16, 64, 256 rows and
#              N = 1..5, PyTorch eager / graph / torch.compile / torch.compile in a CUDA graph,
#              its fast model structure first, then the plain one (ISSUE5_TORCH_MODES: e.g.
#              "eager,graph" where an earlier call timed torch.compile), and the merged report +
#              plot;
#   issue5_more  FORA_REUSE_SUM=0 steps and end to end (the cache sums' default since session
#              18, here off), and the Hopper GEMM rows (TMA tiles,
#              multicast included) with the L2 rooflines;
#   tma_tuned  `tma_mc` steps with FORA_TMA_TILES set to the fastest forced tile of each GEMM
#              (tools/tma_tiles.py over an earlier phase's Hopper GEMM rows), as variant
#              `tma_mc_tuned`;
#   tuned      `fora bench --tune` at TUNE_ROWS (default 2,256): every candidate path checked
#              and timed on a window of each batch's own FORA run, a process a batch, then the
#              chosen one's steps and end to end (sessions 27-29; TUNE_S bounds it, default
#              240 s); a batch whose candidate left the GPU unusable is tuned again without it;
#   hopper_rows  the Hopper GEMM rows alone (every TMA tile, multicast included, against
#              cuBLASLt and their L2 rooflines), as bench and issue5_more also run them;
#   kernelprof ncu --set full of one launch of each kernel in PROF_KERNELS;
#   profile    ncu kernel time per op of a computing and a reuse step (PROFILE_ROWS,
#              PROFILE_METRICS, PROFILE_GEMM), summarised by tools/ncu_summary.py;
#   train      tools/train_tiny.py on the GPU for TRAIN_MINUTES;
#   tiny       train_tiny.py, then tools/quality.py through the fora binary (TINY_MINUTES).
# FORA_TMA_TILES (exported before the command) forces TMA tiles by GEMM shape in every run that
# uses the TMA GEMMs (docs/cuda_options.md), e.g. the hopper_rows table's fastest tiles, then
# VARIANTS="tma_mc" to time whole steps with them.
# Everything lands in a work folder whose $OUT/all.tgz is refreshed after every phase (the
# device tool returns at most 8 files, and a call killed at its limit keeps the last one).
set -u
# A carried archive is always unpacked afresh: a warm machine keeps an earlier call's .devpack/.
# xz where the machine has it, else Python's lzma (the archive is a plain tar in xz).
if [ -f .devpack.txz ]; then
  rm -rf .devpack
  if command -v xz > /dev/null; then
    xz -dc .devpack.txz | tar xf -
  else
    python3 -c 'import sys, tarfile
kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
tarfile.open(sys.argv[1]).extractall(**kw)' .devpack.txz
  fi
elif [ -f .devpack.tgz ]; then
  rm -rf .devpack && tar xzf .devpack.tgz
fi
export FORA_REQUIRE_GPU=1 RUST_BACKTRACE=1 FORA_BIN=.devpack/bin/fora PYTHONUNBUFFERED=1
if [ ! -x "$FORA_BIN" ]; then
  echo "device_suite: no $FORA_BIN: carry .devpack.txz (tools/pack_device.sh)" >&2
  exit 2
fi
# The pack must be of this tree's sources (tools/pack_device.sh lists them with their sums):
# binaries older than the suite may lack a flag it passes, and every run of them would fail.
# SUITE_ALLOW_STALE=1 runs them anyway.
if [ "${SUITE_ALLOW_STALE:-0}" != 1 ]; then
  if [ ! -f .devpack/source.sums ]; then
    echo "device_suite: the pack lists no sources (packed before session 34): run tools/pack_device.sh again" >&2
    exit 2
  fi
  if ! stale=$(sha256sum -c --quiet .devpack/source.sums 2>&1); then
    echo "device_suite: the pack was built from other sources than this tree: run tools/pack_device.sh again" >&2
    head -n 10 <<< "$stale" >&2
    exit 2
  fi
fi
FINAL_OUT=${OUT:-/tmp/out}; mkdir -p "$FINAL_OUT"
OUT=$(mktemp -d "${TMPDIR:-/tmp}/fora_suite.XXXXXX")
# snapshot: $FINAL_OUT/all.tgz (every file so far) and the phase summaries beside it.
snapshot() {
  # Exit status 1 is GNU tar's "file changed as we read it" (the clock log grows as it is
  # read): the archive is whole all the same.
  tar czf "$FINAL_OUT/all.tgz.part" -C "$OUT" . 2> /dev/null
  [ $? -le 1 ] && mv "$FINAL_OUT/all.tgz.part" "$FINAL_OUT/all.tgz"
  local f
  for f in tests.log sanitize.log bench.md bench_torch.log; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL_OUT/"
  done
  return 0
}
DEADLINE_S=${DEADLINE_S:-450}
PHASES=${PHASES:-tests bench torch variants memcheck}
# memcheck over a subset of the test binaries unless SANITIZE_FULL=1 (every one: too long for
# one call beside the other phases).
SANITIZE_FULL=${SANITIZE_FULL:-0}
# The variants whose default is still to decide (VARIANTS=all: every one).
# The reuse-step defaults before session 18 (no cache sums, the final GEMM, the table copied):
# variant s17_steps and phase issue5_more.
S17_STEPS_ENV="FORA_FINAL_SAMPLER=0 FORA_REUSE_SUM=0 FORA_REUSE_TABLE_IN_PLACE=0"
# Session 19's staged-epilogue tiles forced on every DiT-XL/2 block GEMM (variant tma_staged),
# and the same tiles with the register epilogue (variant tma_unstaged, "st-" dropped): the A/B
# of the staged epilogue in whole steps.
STAGED_TILES="3456x1152=st-128x128,1152x1152=st-128x128,4608x1152=st-128x192,1152x4608=st-pp-128x128"
# Session 22's cluster split-K tiles: `tma` picks clusters of three along K for proj and fc2 at
# 2 rows (k3-128x128); variant tma_no_cluster_k forces the tiles it picked before (128 x 128,
# fc2 in 3 workspace slices and the epilogue kernel), variant tma_staged_cluster_k the staged
# tiles for qkv and fc1 beside the cluster split-K pick for proj and fc2.
NO_CLUSTER_K_TILES="1152x1152=128x128,1152x4608=128x128"
# ... and variant lt_cluster_k: the default cuBLASLt path with proj and fc2 routed to them
# (FORA_TMA_TILES under cuBLASLt on a Hopper).
CLUSTER_K_TILES="1152x1152=k3-128x128,1152x4608=k3-128x128"
# Session 26's narrow tiles, TmaTile::pick's for qkv and fc1 at 2 rows (one round of 124 and 128
# CTAs): variant lt_narrow routes those two shapes to them under cuBLASLt; variant ours_pdl runs
# every launch of a block on our kernels under PDL (qkv + attention, proj / fc2 + LayerNorm, fc1
# on the TMA pick), each loading its weights before it waits for the kernel before.
NARROW_TILES="3456x1152=128x112,4608x1152=128x144"
STAGED_CLUSTER_K_TILES="3456x1152=st-128x128,4608x1152=st-128x192"
# The default list: the paths not yet timed in whole steps on a GPU (sessions 20-26), the
# default first.
VARIANTS=${VARIANTS:-default qkv_attention gemm_ln qkv_gemm_ln qkv_gemm_ln_pdl gemm_ln_one_per_sm ours_pdl lt_narrow gemm_ln_many gemm_ln_wide attention_tma_pp tma tma_staged lt_cluster_k prefetch_weights}
start=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - start) )); }
# bounded <seconds> <command...>: runs with min(seconds, time left - 5), skipped under 10 s left.
bounded() {
  local want=$1; shift; local l=$(( $(left) - 5 ))
  if [ "$l" -lt 10 ]; then echo "SKIPPED (deadline): $*"; return 0; fi
  [ "$want" -gt "$l" ] && want=$l
  local s=$(date +%s); timeout -k 10 "$want" "$@"; local rc=$?
  echo "rc=$rc after $(( $(date +%s) - s ))s (limit ${want}s): $*"
}
# TESTS picks test binaries (default: every one), each in parts (ISOLATE, below); "binary:part"
# runs one part only (e.g. gpu_gemm:_tma, the never-run TMA GEMM tests). HOPPER_ROWS=0 leaves out
# the bench and issue5 phases' kernels-only runs of the Hopper GEMMs.
TESTS=${TESTS:-gpu_small_kernels gpu_attention gpu_gemm gpu_backend gpu_vae cli}
# The test-name filters that phase_tests runs in processes of their own (see there).
ISOLATE=${ISOLATE:-_tma sum reuse_final bandwidth final_sampler mn_deep mn_split}

phase_tests() {
  {
    bounded 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    # The kernels, the options and, on a Hopper, the fused kernels' resident clusters and what
    # DiT-XL/2 would take with the fusions enabled (session 26).
    bounded 30 .devpack/bin/fora info 2>&1 | grep -E "^(cuda|hopper|tune|rc=)"
    # The tests of never-run kernels in processes of their own, one per name filter in
    # ISOLATE (default: "_tma", the TMA kernels (plain "tma" would also take "softmax");
    # "sum", session 9's cache sums; "reuse_final", whose test runs session 8's ring variants;
    # "bandwidth", the masked probe; "final_sampler", "mn_deep" and "mn_split", session 12's
    # final_sampler_step and deep and split-key attention): a kernel fault poisons the CUDA
    # context for every later
    # test of its process. Each part's whole output is kept in test_<binary>_<part>.log (in
    # all.tgz); the summary keeps results, errors and the lines after a panic (its message).
    # TESTS_S bounds the phase: no part starts after it (the phases after it keep their time).
    local entry t parts raw f skips="" tests_start=$(date +%s)
    for f in $ISOLATE; do skips="$skips --skip $f"; done
    for entry in $TESTS; do
      t=${entry%%:*}
      if [ "$t" = "$entry" ]; then
        parts=("${skips# }")
        for f in $ISOLATE; do parts+=("$f"); done
      else
        parts=("${entry#*:}")
      fi
      for part in "${parts[@]}"; do
        if [ $(( $(date +%s) - tests_start )) -ge "${TESTS_S:-100000}" ]; then
          echo "SKIPPED (TESTS_S): test $t $part"
          continue
        fi
        echo "=== test $t $part"
        raw="$OUT/test_${t}_$(echo "$part" | tr -c 'a-zA-Z0-9_\n' '_').log"
        # shellcheck disable=SC2086 # $part is a flag and its value, or a filter
        # TEST_PART_S bounds each part (a never-run kernel that hangs costs no more than that).
        bounded "${TEST_PART_S:-150}" .devpack/test/$t --test-threads=1 --nocapture $part > "$raw" 2>&1
        grep -E "^test |rel_l2|rel-L2|SKIP|NOTE|^FAIL|FAILED|failures|failure\(s\)|^Error|test result|^rc=|^gpu_wgmma_probe:|^gpu_tma_probe:|^gpu_tma_cluster_probe:" "$raw" \
          | grep -v "^test .* \.\.\. ok$" | tail -n 60
        grep -A 3 "panicked at" "$raw" | head -n 24
        # A "binary:filter" entry that ran nothing says "test result: ok" all the same.
        if [ "$t" != "$entry" ] && grep -q "^running 0 tests" "$raw"; then
          echo "NO TESTS: the filter $part matches no test of $t"
        fi
      done
    done
    # Issue 3 asks the embedded model's main job to take under 1 s on a GPU, process included.
    echo "=== embedded model: fora sample --class 3 (wall time of the whole process)"
    local s=$(date +%s%N)
    bounded 60 .devpack/bin/fora sample --class 3 --device cuda --out "$OUT/three.png" 2>&1 | tail -n 3
    echo "wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
    # The GPU VAE decoder's speed (session 35; a random decoder of the Stable Diffusion shape,
    # about 15 s): the one cargo bench binary the pack keeps.
    if [ -x .devpack/bench/vae ]; then
      echo "=== VAE decode: cargo bench --bench vae"
      bounded 90 .devpack/bench/vae --bench 2>&1 | tail -n 8
    fi
  } > "$OUT/tests.log" 2>&1
  grep -E "test result|^rc=|FAILED|panicked|NOTE|^wall|^NO TESTS|^\| (CPU|GPU)" "$OUT/tests.log"
}

phase_bench() {
  echo "=== fora bench"
  # The never-run Hopper GEMMs (wgmma, TMA) in a run of their own: one that faults would poison
  # the context for every later measurement of the main run.
  FORA_BENCH_HOPPER_GEMMS=0 FORA_BENCH_UNTRIED=0 bounded 75 .devpack/bin/fora bench --json "$OUT/bench.json" \
    ${FORA_BENCH_ARGS:---sections ceilings,kernels,steps,e2e --batches 2,256 --intervals 1,3 --e2e-reps 1} >> "$OUT/bench.log" 2>&1
  tail -n 3 "$OUT/bench.log"
  echo "=== fora bench: Hopper GEMM and untried kernel rows (attention tma)"
  HOPPER_KERNELS=all hopper_rows bench_hopper
}

# hopper_rows <name>: the kernel rows with the Hopper GEMMs (every TMA tile, the multicast ones
# included, and wgmma beside cuBLASLt; the untried attention too) in a process of their own, so
# that a fault cannot poison another run's context; HOPPER_ROWS=0 skips it.
hopper_rows() {
  [ "${HOPPER_ROWS:-1}" = 0 ] && return 0
  # With the ceilings: the L2 read rate the tiles' rooflines are drawn at. Each row is also
  # logged as it is measured ("bench: qkv 256 rows tma-mc-128x192: ..."), so a run cut short
  # keeps what it measured; the never-run multicast tiles come last in each shape.
  # HOPPER_KERNELS (FORA_BENCH_KERNELS: gemm, the default here, or all) picks the rows.
  # --watchdog-s (ROWS_WATCHDOG_S, default 30 s a row; each takes a second or two): a row whose
  # launch never ends ends the run there, its last `bench:` line naming the row before it.
  FORA_BENCH_KERNELS=${HOPPER_KERNELS:-gemm} bounded 100 .devpack/bin/fora bench --sections ceilings,kernels \
    --batches 2,256 --watchdog-s "${ROWS_WATCHDOG_S:-30}" --json "$OUT/$1.json" > "$OUT/$1.log" 2>&1
  # The block GEMMs at 256 rows, every implementation (~60 rows); at 2 rows the picks.
  grep -E "^\| (qkv|proj|fc1|fc2) \| 256 \| [^|]* \| (custom|tma|wgmma|cublaslt)[a-zA-Z0-9_+, -]* \|" "$OUT/$1.log" | head -n 80
  # At 2 rows the picks, and the forced cluster tiles (session 17's 4 x 1 and 4 x 2 clusters are
  # aimed at M = 512, where each W tile is otherwise read from L2 by four CTAs; session 22's
  # clusters along K at proj's and fc2's 36 tiles there, beside the plain 128 x 128; session
  # 26's 128 x 112 and 128 x 144, qkv's and fc1's picks there, in one round of the SMs).
  grep -E "^\| (qkv|proj|fc1|fc2) \| 2 \| [^|]* \| (tma|tma_mc|tma-128x(112|128|144|192)|tma-k[0-9]-128x128|tma-mc-128x[0-9]+|tma-c4x[12]-128x[0-9]+|tma-st-[a-z0-9-]+|cublaslt|cublaslt\+bf16 bias|cublaslt product)(, W in L2)? \|" "$OUT/$1.log" | head -n 90
  grep -E "^\| attention \|" "$OUT/$1.log" | head -n 16
  # FORA_GEMM_LN's fused proj / fc2 + LayerNorm (HOPPER_KERNELS=all) against the cuBLASLt
  # product rows above plus residual_ln.
  grep -E "^\| (proj\+ln|fc2\+ln|residual_ln) \| 2 \|" "$OUT/$1.log" | head -n 24
  # FORA_GEMM_LN_MANY_ROWS's 128-row tiles (128 x 72 and 128 x 144, FORA_GEMM_LN_WIDE; and the
  # 64-row ones) at 256 rows, against the
  # cuBLASLt product rows plus residual_ln there.
  grep -E "^\| (proj\+ln|fc2\+ln|residual_ln) \| 256 \|" "$OUT/$1.log" | head -n 24
  # FORA_QKV_ATTENTION's qkv + attention (HOPPER_KERNELS=all) against the qkv rows plus the
  # attention rows above.
  grep -E "^\| qkv\+attention \| 2 \|" "$OUT/$1.log" | head -n 4
  # The same fusions against the launches they replace, as the report computes it.
  grep -A 24 "^The block fusions against" "$OUT/$1.log" | grep -E "^\| [a-z0-9]+\+" | head -n 20
  # A block from the rows: the default launches against the fastest way through each segment
  # (session 26), at each row count.
  grep -A 14 "^A block from the kernel rows" "$OUT/$1.log" | grep -E "^\| [0-9]+ \|" | head -n 12
  # Each forced TMA tile against its L2 roofline at 256 rows (the L2 hypothesis, yes or no).
  grep -A 80 "^TMA tiles against their L2 roofline" "$OUT/$1.log" | grep -E "^\| [a-z0-9]+ \| 256 \|" | head -n 40
  grep -E "^L2 roofline" "$OUT/$1.log"
  # The fastest forced tile of each GEMM against the picks and cuBLASLt (what to tune from).
  grep -A 12 "^The fastest forced TMA tile" "$OUT/$1.log" | grep -E "^\| "
  # A run cut short: the last rows it logged.
  grep -q "^bench: done" "$OUT/$1.log" || grep -E "^bench: " "$OUT/$1.log" | tail -n 8
  tail -n 2 "$OUT/$1.log"
}

phase_ops() {
  for g in ${OPS_GEMM:-cublaslt}; do
    echo "=== in-model op times ($g GEMM, rows ${OPS_ROWS:-2,256})"
    bounded 90 .devpack/bin/fora bench --sections steps,ops --batches "${OPS_ROWS:-2,256}" --runs 10 \
      --gemm "$g" --json "$OUT/ops_$g.json" > "$OUT/ops_$g.log" 2>&1
    sed -n '/^## In-model op times/,$p' "$OUT/ops_$g.log" | grep -E "^(###|\| )" | head -n 100
    tail -n 2 "$OUT/ops_$g.log"
  done
}

# `fora bench --tune` (sessions 27-29): per batch of TUNE_ROWS (default 2,256), in a process of
# its own, every candidate path (FORA_TUNE_CANDIDATES, else the built-in list: the defaults, PDL,
# the TMA attentions and every fusion of sessions 23-26) checked against the defaults' forward
# and timed on a window of the batch's FORA N=3 run; then the chosen path's steps (and at 2 rows
# one image end to end), labelled `tuned`, beside the defaults' (labelled cublaslt). A line per
# candidate is logged as it ends, so a hang keeps the others' times. A candidate that leaves the
# GPU unusable (a never-run kernel's fault, or its watchdog's trap) ends its process's tuning: the
# batch is then tuned again in a new process without it (FORA_TUNE_SKIP; of a sum `a+b`, the
# candidate it added last) and so are the later batches, up to TUNE_TRIES (3) processes a batch;
# one still in flight when its process was cut (a hang cut by the bound, a crash) is left out of
# that batch's next process only; the given options are never left out. TUNE_S (240) bounds the
# phase, a batch of at most 16 rows TUNE_FEW_S (90) of it, all its processes together. Each
# tuning gets --tune-budget-s (the process's bound less 60 s, at least half of it): a budget
# spent lists the rest as not tried and the process goes on (rc=0), so it is not taken for a hang.
# And --watchdog-s (TUNE_WATCHDOG_S; default 20 s a measurement at up to 16 rows, 60 s
# above: a few times what one takes on an H200): a candidate whose launch never ends (a
# kernel's deadlock; the kernels' own mbarrier watchdogs trap only after 2^26 waits, of a
# length the hardware sets) ends the process at once, named as one that left the GPU unusable,
# so the batch is tuned again without it instead of losing the rest of its time to the hang.
phase_tuned() {
  local phase_end=$(( $(date +%s) + ${TUNE_S:-240} ))
  local rows try budget tune_budget watchdog sections log killer rc batch_end tune_rows=${TUNE_ROWS:-2,256}
  # A candidate that left the GPU unusable is left out of the later batches too (a broken
  # kernel); one only in flight when its process was cut is left out of its batch only.
  local skip=${FORA_TUNE_SKIP:-} batch_skip
  for rows in ${tune_rows//,/ }; do
    batch_skip=$skip
    batch_end=$phase_end
    if [ "$rows" -le 16 ] && [ $(( $(date +%s) + ${TUNE_FEW_S:-90} )) -lt "$phase_end" ]; then
      batch_end=$(( $(date +%s) + ${TUNE_FEW_S:-90} ))
    fi
    for try in $(seq 1 "${TUNE_TRIES:-3}"); do
      budget=$(( batch_end - $(date +%s) ))
      if [ "$budget" -lt 20 ]; then
        echo "=== tuned, $rows rows: SKIPPED (${budget}s of TUNE_S left)"
        break
      fi
      sections=steps
      if [ "$rows" = 2 ]; then sections=steps,e2e; fi
      log="$OUT/tuned_${rows}_$try.log"
      echo "=== tuned steps, $rows rows (process $try${batch_skip:+, FORA_TUNE_SKIP=$batch_skip})"
      # The tuning's own budget inside the process's bound (the rest of the process: start-up,
      # the weights, the untuned steps, the tuned steps and end to end; 60 s is a guess), so
      # that a slow but healthy tuning ends with what it measured (the rest "not tried")
      # instead of being killed and taken for a hang.
      # (Of the bound the process really gets: `bounded` also cuts it to the deadline's.)
      tune_budget=$(( $(left) - 5 ))
      [ "$budget" -lt "$tune_budget" ] && tune_budget=$budget
      tune_budget=$(( tune_budget - 60 > tune_budget / 2 ? tune_budget - 60 : tune_budget / 2 ))
      watchdog=${TUNE_WATCHDOG_S:-$([ "$rows" -le 16 ] && echo 20 || echo 60)}
      FORA_TUNE_SKIP="$batch_skip" bounded "$budget" .devpack/bin/fora bench --tune \
        --tune-budget-s "$tune_budget" --watchdog-s "$watchdog" --gemm cublaslt \
        --sections "$sections" --batches "$rows" --runs 10 --warmup 2 --intervals 1,3 \
        --e2e-reps 1 --json "$OUT/tuned_${rows}_$try.json" > "$log" 2>&1
      # 18 candidates, their sums, the given options again and in turn: up to ~37 lines each.
      grep -E "^tune: " "$log" | grep -v ": measuring$" | head -n 47
      sed -n '/^## Tuned options/,/^## Failed/p' "$log" | grep -E "^(FORA|\| )" | head -n 45
      grep -E "^\| (cublaslt|tuned) \| $rows \|" "$log" | head -n 4
      grep -E "^\| (cublaslt|tuned) \| [13] \| 250 \|" "$log" | head -n 4
      grep -E "FAILED" "$log" | grep -v "^rc=" | head -n 4
      tail -n 1 "$log"
      killer=$(grep -oE 'candidate "[A-Za-z0-9_+]+" left the GPU unusable' "$log" | head -n 1 \
        | sed -E 's/^candidate "([^"]*)".*/\1/')
      local sticky=1
      rc=$(tail -n 1 "$log" | sed -nE 's/^rc=([0-9]+) .*/\1/p')
      if [ -z "$killer" ] && [ "${rc:-0}" -ge 124 ]; then
        # Cut by the bound or killed by a signal: the candidate in flight (its "measuring"
        # line is the last) is blamed for this batch only.
        killer=$(grep -E "^tune: $rows rows, " "$log" | tail -n 1 \
          | sed -nE "s/^tune: $rows rows, ([A-Za-z0-9_+]+): measuring$/\1/p")
        sticky=0
      fi
      killer=${killer##*+}
      # The given options are the reference: nothing to tune without them.
      if [ -z "$killer" ] || [ "$killer" = given ] || [ "$killer" = as_given ]; then break; fi
      batch_skip="${batch_skip:+$batch_skip,}$killer"
      if [ "$sticky" = 1 ]; then skip="${skip:+$skip,}$killer"; fi
      if [ "$try" -lt "${TUNE_TRIES:-3}" ]; then
        echo "=== tuned, $rows rows: candidate $killer broke the process (rc=${rc:-?}); tuning again without it"
      else
        echo "=== tuned, $rows rows: candidate $killer broke the process (rc=${rc:-?}); no tries left"
      fi
    done
  done
}

# The Hopper GEMM rows alone, as a phase (bench and issue5_more run them too).
phase_hopper_rows() {
  echo "=== Hopper GEMM rows (TMA tiles, multicast included)"
  hopper_rows hopper_rows
}

phase_torch() {
  echo "=== PyTorch reference"
  # TORCH_S (default 60) caps the phase's budget; TORCH_RESERVE_S (default 60) is left to the
  # phases after it.
  local budget=$(( $(left) - ${TORCH_RESERVE_S:-60} ))
  [ "$budget" -gt "${TORCH_S:-60}" ] && budget=${TORCH_S:-60}
  if [ "$budget" -gt 20 ]; then
    bounded $(( budget + 10 )) python3 tools/bench_torch.py --json "$OUT/bench_torch.json" --budget-s "$budget" \
      ${TORCH_BENCH_ARGS:---batches 2,256 --modes eager,graph --intervals 3 --e2e-modes graph} \
      > "$OUT/bench_torch.log" 2>&1
    tail -n 3 "$OUT/bench_torch.log"
  else
    echo "SKIPPED (deadline): PyTorch reference"
  fi
}

# What issue 5 still asks to be measured in one call beside the rest: our steps at 2, 16, 64 and
# 256 rows with N = 1..5 end to end, and PyTorch eager, CUDA graph and torch.compile (full steps
# at 2 and 256 rows; compiling takes minutes), then the merged report with every ratio.
phase_issue5() {
  echo "=== issue 5: fora bench, rows 2,16,64,256, N = 1..5"
  FORA_BENCH_HOPPER_GEMMS=0 FORA_BENCH_UNTRIED=0 bounded 150 .devpack/bin/fora bench --json "$OUT/issue5_fora.json" \
    --sections ceilings,kernels,steps,e2e --batches 2,16,64,256 --kernel-batches 2,256 --intervals 1,2,3,4,5 --e2e-reps 1 \
    > "$OUT/issue5_fora.log" 2>&1
  tail -n 2 "$OUT/issue5_fora.log"
  # The attention kernels, the untried TMA one included, in a process of their own (ceilings
  # and every kernel row but the GEMMs: the attention and FORA rows are what it is for).
  echo "=== issue 5: kernel rows with the untried kernels (attention tma / wgmma_mn_deep / wgmma_mn_split, cache sums, final_sampler_step)"
  # (The GEMM rows are in issue5_fora.json already: FORA_BENCH_KERNELS=other. final_sampler_step
  # replaces the `final` cuBLASLt row there plus `sampler_step` here.)
  FORA_BENCH_KERNELS=other bounded 60 .devpack/bin/fora bench --sections ceilings,kernels --batches 2,256 \
    --json "$OUT/issue5_kernels.json" > "$OUT/issue5_kernels.log" 2>&1
  grep -E "^\| (attention|fora_cache_sum|fora_sum_final|fora_reuse_final|sampler_step|final_sampler_step) \||^\| (device copy|copy kernel|read kernel|L2 read)|^L2 roofline" \
    "$OUT/issue5_kernels.log" | head -n 56
  grep -E "^\| final \| (2|256) \|.*\| cublaslt \|" "$OUT/issue5_fora.log" | head -n 2
  echo "=== issue 5: PyTorch eager, graph and torch.compile"
  local budget=$(( $(left) - 40 ))
  if [ "$budget" -gt 60 ]; then
    bounded $(( budget + 20 )) python3 tools/bench_torch.py --json "$OUT/issue5_torch.json" --budget-s "$budget" \
      --batches 2,16,64,256 --modes "${ISSUE5_TORCH_MODES:-eager,graph,compile,compile_graph}" --variants fast,plain \
      --compile-batches 2,256 --compile-reuse yes \
      --intervals 1,3 --e2e-modes graph,compile_graph > "$OUT/issue5_torch.log" 2>&1
    tail -n 3 "$OUT/issue5_torch.log"
    python3 tools/bench_report.py --ours "$OUT/issue5_fora.json" --torch "$OUT/issue5_torch.json" \
      --gemm cublaslt --md "$OUT/issue5_report.md" --plot "$OUT/issue5_latency.png" > /dev/null 2>&1
    sed -n '/^## Targets/,/^## Per step/p' "$OUT/issue5_report.md"
  else
    echo "SKIPPED (deadline): PyTorch with torch.compile"
  fi
}

# The rest of issue 5's measurements, short, for a call of its own (e.g. after `tests`) so that
# torch.compile in `issue5` keeps its budget: steps and one image end to end with the reuse-step
# defaults before session 18 (no cache sums, final GEMM, table copy), and the TMA tiles (the
# cluster-multicast ones, session 10) against cuBLASLt and their L2 rooflines. Their targets
# table needs issue5_torch.json: here when `issue5` ran in the same call, else merge on the
# host afterwards with
#   tools/bench_report.py --ours issue5_fora_s17.json --torch issue5_torch.json --gemm cublaslt
phase_issue5_more() {
  echo "=== issue 5: $S17_STEPS_ENV, rows 2,256, N = 1,3,5"
  (
    # shellcheck disable=SC2086 # several VAR=value words
    export $S17_STEPS_ENV
    bounded 60 .devpack/bin/fora bench --sections steps,e2e --batches 2,256 --gemm cublaslt \
      --intervals 1,3,5 --e2e-reps 1 --json "$OUT/issue5_fora_s17.json" > "$OUT/issue5_fora_s17.log" 2>&1
  )
  grep -E "^\| cublaslt \| (2|256) \||reuse steps from cache sums|^\| cublaslt \| [135] \| 250 \|" "$OUT/issue5_fora_s17.log" | head -n 8
  if [ -f "$OUT/issue5_torch.json" ]; then
    python3 tools/bench_report.py --ours "$OUT/issue5_fora_s17.json" --torch "$OUT/issue5_torch.json" \
      --gemm cublaslt --md "$OUT/issue5_report_s17.md" > /dev/null 2>&1
    sed -n '/^## Targets/,/^## Per step/p' "$OUT/issue5_report_s17.md"
  fi
  # The TMA GEMM tiles (the cluster-multicast ones never run) against cuBLASLt, with the L2
  # read rate: whether the tiles are L2-bound.
  echo "=== issue 5: Hopper GEMM rows (TMA tiles, multicast included)"
  hopper_rows issue5_hopper
}

phase_memcheck() {
  {
    if [ "$SANITIZE_FULL" = 1 ]; then
      for t in $TESTS; do
        echo "=== memcheck $t"
        bounded 300 compute-sanitizer --tool memcheck --error-exitcode 9 .devpack/test/$t --test-threads=1 2>&1 | tail -n 4
      done
    else
      echo "=== memcheck gpu_small_kernels"
      bounded 20 compute-sanitizer --tool memcheck --error-exitcode 9 .devpack/test/gpu_small_kernels --test-threads=1 2>&1 | tail -n 4
      echo "=== memcheck gpu_attention (512 px case skipped)"
      bounded 40 compute-sanitizer --tool memcheck --error-exitcode 9 .devpack/test/gpu_attention --test-threads=1 --skip xl2_512px --skip many_blocks 2>&1 | tail -n 4
      echo "=== memcheck gpu_gemm"
      bounded 60 compute-sanitizer --tool memcheck --error-exitcode 9 .devpack/test/gpu_gemm --test-threads=1 2>&1 | tail -n 4
      echo "=== memcheck gpu_backend (small-model tests)"
      bounded 40 compute-sanitizer --tool memcheck --error-exitcode 9 .devpack/test/gpu_backend --test-threads=1 \
        gpu_execution_paths gpu_sampling_allocates gpu_noise_file gpu_caller 2>&1 | tail -n 4
    fi
  } >> "$OUT/sanitize.log" 2>&1
  grep -E "SUMMARY|^rc=|SKIPPED" "$OUT/sanitize.log"
}

# racecheck over the kernel tests; each run's whole report lands in racecheck_<name>.log.
# cuBLASLt's own nvjet kernels draw hazards, and with --kernel-name kns=gemm_ the sanitizer
# crashed on them ("failed to handle a hardware exception", H200, 2026-11-26), so the GEMM test
# leaves its cuBLASLt variants out (FORA_TEST_SKIP_CUBLASLT=1) and every kernel left is ours.
# RACECHECK_RUNS overrides the runs ("binary[:kernel-substring[:test-filter]]", space-separated).
phase_racecheck() {
  local run bin kns filter
  export FORA_TEST_SKIP_CUBLASLT=1
  for run in ${RACECHECK_RUNS:-gpu_small_kernels gpu_attention gpu_gemm}; do
    IFS=: read -r bin kns filter <<< "$run"
    local name=${run//[:]/_}
    echo "=== racecheck $run" | tee -a "$OUT/sanitize.log"
    # shellcheck disable=SC2086 # the filter is optional
    bounded 300 compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 \
      ${kns:+--kernel-name kns=$kns} .devpack/test/$bin --test-threads=1 $filter \
      > "$OUT/racecheck_$name.log" 2>&1
    grep -E "SUMMARY|^rc=|^test result|FAILED|panicked" "$OUT/racecheck_$name.log" | tee -a "$OUT/sanitize.log"
    grep -E "Race reported|hazard" "$OUT/racecheck_$name.log" | sort | uniq -c | head -n 10
  done
}

phase_sanitize() {
  phase_memcheck
  phase_racecheck
}

phase_tiny() {
  echo "=== embedded model: training on the GPU"
  bounded $(( ${TINY_MINUTES:-2} * 60 + 60 )) python3 tools/train_tiny.py --device cuda \
    --max-minutes "${TINY_MINUTES:-2}" --out "$OUT/tiny.safetensors" > "$OUT/train.log" 2>&1
  grep -E "eval|saved|rc=" "$OUT/train.log" | tail -n 5
  if [ -f "$OUT/tiny.safetensors" ]; then
    echo "=== embedded model: quality through fora"
    bounded 240 python3 tools/quality.py --fora .devpack/bin/fora --model "$OUT/tiny.safetensors" \
      --device cuda --out-dir "$OUT/quality" > "$OUT/quality.log" 2>&1
    tail -n 20 "$OUT/quality.log"
  fi
}

# The embedded model's training recipe on the GPU, bounded by TRAIN_MINUTES (default 1.5):
# issue 3 asks for minutes on a GPU; the log's last lines say how many steps ran in how long.
phase_train() {
  echo "=== embedded model: train_tiny.py on the GPU (at most ${TRAIN_MINUTES:-1.5} min)"
  bounded 150 python3 tools/train_tiny.py --device cuda --max-minutes "${TRAIN_MINUTES:-1.5}" \
    --log-every 1000 --out "$OUT/tiny_gpu.safetensors" > "$OUT/train.log" 2>&1
  tail -n 4 "$OUT/train.log"; rm -f "$OUT/tiny_gpu.safetensors"
}

phase_profile() {
  echo "=== ncu: kernel time per op of computing and reuse steps (rows ${PROFILE_ROWS:-2,256})"
  # Op by op (no graphs) so that every launch sits in its NVTX op range; one timed run each.
  # PROFILE_METRICS adds metrics (comma-separated) to the raw CSV; the summary reads the time.
  # By default ncu locks the SM clock to base (1.44 GHz on an H200, against ~1.98 boost) and
  # flushes every cache before each kernel, so its kernel times are longer than a normal run's
  # (session 18's rows-2 profile of the tma_mc path: 4.3 ms of kernels a computing step);
  # PROFILE_NATIVE=1 (default) leaves both as a normal run has them, so that the times compare
  # with the bench's step (PROFILE_NATIVE=0: ncu's defaults).
  local native=()
  [ "${PROFILE_NATIVE:-1}" = 1 ] && native=(--clock-control none --cache-control none)
  FORA_CUDA_GRAPHS=0 bounded 150 ncu "${native[@]}" --nvtx --csv --print-units base \
    --metrics "gpu__time_duration.sum${PROFILE_METRICS:+,$PROFILE_METRICS}" \
    .devpack/bin/fora bench --sections steps --batches "${PROFILE_ROWS:-2,256}" --runs "${PROFILE_RUNS:-2}" --warmup 1 \
    --gemm "${PROFILE_GEMM:-cublaslt}" --json "$OUT/profile_bench.json" > "$OUT/profile.csv" 2> "$OUT/profile.err"
  python3 tools/ncu_summary.py "$OUT/profile.csv" > "$OUT/profile.md" 2>> "$OUT/profile.err"
  head -n 60 "$OUT/profile.md"; tail -n 3 "$OUT/profile.err"
}

# ncu's full report (speed of light, occupancy, warp stalls, memory chart) of one launch of each
# kernel named in PROF_KERNELS (default: the 256-row attention, the TMA GEMM plain and multicast
# (their L2 throughput says whether the tiles are L2-bound), and the fused reuse kernel, the ones
# issue 5 still waits on; a TMA kernel is profiled in a `--gemm tma` or `tma_mc` run: e.g.
# PROF_ROWS=2 PROF_KERNELS=gemm_tma_c4x2_128x128 for session 17's clusters at M = 512), from
# `fora bench` steps at PROF_ROWS
# (default 256) op by op; ncu_<kernel>.txt each, the headline numbers printed.
phase_kernelprof() {
  local k attention gemm
  for k in ${PROF_KERNELS:-attention_tma_d72 attention_wgmma_mn_d72 gemm_tma_128x128 gemm_tma_mc_128x128 fora_reuse_final_t4_r3}; do
    echo "=== ncu --set full: $k (rows ${PROF_ROWS:-256})"
    # The steps run the selected attention: the wgmma kernels only with FORA_ATTENTION=wgmma.
    case $k in
      attention_tma_pp*) attention=tma_pp ;;
      attention_tma*) attention=tma ;;
      attention_wgmma_mn*) attention=wgmma_mn ;;
      attention_wgmma*) attention=wgmma ;;
      *) attention=${FORA_ATTENTION:-v1} ;;
    esac
    # The steps run the TMA GEMM only with --gemm tma (the multicast tiles with tma_mc).
    case $k in gemm_tma_mc*|gemm_tma_c4x*) gemm=tma_mc ;; gemm_tma*) gemm=tma ;; *) gemm=cublaslt ;; esac
    # PROF_SOURCE=1 also keeps the report and prints its per-SASS-instruction page (warp stall
    # samples per instruction) as ncu_<kernel>_sass.csv: where a kernel waits, not only why.
    # Only launches inside a computing step's NVTX range (PROF_NVTX; empty: any launch): the
    # workspace's setup runs the same kernels at other shapes (session 18's first try profiled
    # the timestep MLP of the table precompute, K = 256, instead of a block GEMM).
    local filter=${PROF_NVTX-regex:step [0-9]+ full/} nvtx=()
    [ -n "$filter" ] && nvtx=(--nvtx --nvtx-include "$filter")
    # PROF_TMA_TILES: FORA_TMA_TILES for these runs only (e.g. "3456x1152=pp-128x128" to catch
    # the ping-pong tile in the qkv GEMM), so the tests of the same call run without it.
    FORA_TMA_TILES=${PROF_TMA_TILES:-${FORA_TMA_TILES:-}} FORA_ATTENTION=$attention FORA_CUDA_GRAPHS=0 bounded 90 ncu --kernel-name "$k" "${nvtx[@]}" \
      --launch-skip "${PROF_SKIP:-2}" --launch-count 1 --set full \
      ${PROF_SOURCE:+--import-source yes -o "$OUT/ncu_$k" -f} \
      .devpack/bin/fora bench --sections steps --batches "${PROF_ROWS:-256}" --runs 1 --warmup 1 \
      --gemm "$gemm" > "$OUT/ncu_$k.txt" 2>&1
    if [ -n "${PROF_SOURCE:-}" ] && [ -f "$OUT/ncu_$k.ncu-rep" ]; then
      ncu -i "$OUT/ncu_$k.ncu-rep" --page details > "$OUT/ncu_$k.txt" 2>&1
      ncu -i "$OUT/ncu_$k.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_${k}_sass.csv" 2>&1
      rm -f "$OUT/ncu_$k.ncu-rep"
    fi
    grep -E "^ +(Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Theoretical Occupancy)" \
      "$OUT/ncu_$k.txt" | head -n 8
  done
}

phase_variants() {
  echo "=== step times of the opt-in paths (rows ${VARIANT_ROWS:-2,256})"
  local name
  # VARIANTS (names, space-separated) picks some of them; VARIANT_SECTIONS / VARIANT_ARGS /
  # VARIANT_S change what each runs (default: steps at VARIANT_ROWS, and one image end to end
  # at N = 1 and 3, "--intervals 1,3 --e2e-reps 1"). VARIANT_ROUNDS=2 (or more) runs the whole
  # list again, each path's later rounds as `<name>_r2` etc.: separate processes drift ~1% from
  # one another (session 18: the same default 256-row step 114.5 and 116.0 ms), so a difference
  # that small shows only if it holds in every round.
  local all=("default:cublaslt:" "unfused:cublaslt:FORA_FUSED_REUSE=0 FORA_FUSED_LN=0 FORA_LT_BIAS_BF16=0" \
           "f32_bias:cublaslt:FORA_LT_BIAS_BF16=0" "f32_product:cublaslt:FORA_BF16_RESIDUAL=0" \
           "full_table:cublaslt:FORA_REUSE_GATES_ONLY=0" "forward_graph:cublaslt:FORA_STEP_GRAPH=0" \
           "copy_table:cublaslt:FORA_REUSE_TABLE_IN_PLACE=0" "no_reuse_sum:cublaslt:FORA_REUSE_SUM=0" \
           "no_final_sampler:cublaslt:FORA_FINAL_SAMPLER=0" \
           "s17_steps:cublaslt:$S17_STEPS_ENV" \
           "fused_final:cublaslt:FORA_FUSED_FINAL=1" "attention_v1:cublaslt:FORA_ATTENTION=v1" \
           "lt_splitk:cublaslt:FORA_LT_SPLITK=1 FORA_BF16_RESIDUAL=0" "l2_persist:cublaslt:FORA_L2_PERSIST=1 FORA_REUSE_SUM=0" \
           "pdl:cublaslt:FORA_PDL=1" "tma_pdl:tma:FORA_PDL=1" "tma_mc_pdl:tma_mc:FORA_PDL=1" \
           "side_stream:cublaslt:FORA_SIDE_STREAM=1" "lt_autotune:cublaslt:FORA_LT_AUTOTUNE=1" \
           "attention_v2:cublaslt:FORA_ATTENTION=v2" "attention_wgmma:cublaslt:FORA_ATTENTION=wgmma" \
           "attention_wgmma_mn:cublaslt:FORA_ATTENTION=wgmma_mn" "attention_tma:cublaslt:FORA_ATTENTION=tma" \
           "attention_tma_pp:cublaslt:FORA_ATTENTION=tma_pp" \
           "attention_deep:cublaslt:FORA_ATTENTION=wgmma_mn_deep" \
           "attention_split:cublaslt:FORA_ATTENTION=wgmma_mn_split" \
           "wgmma:wgmma:" "tma:tma:" "tma_mc:tma_mc:" \
           "tma_staged:tma:FORA_TMA_TILES=$STAGED_TILES" "tma_unstaged:tma:FORA_TMA_TILES=${STAGED_TILES//st-/}" \
           "tma_staged_pdl:tma:FORA_TMA_TILES=$STAGED_TILES FORA_PDL=1" \
           "tma_no_cluster_k:tma:FORA_TMA_TILES=$NO_CLUSTER_K_TILES" \
           "lt_cluster_k:cublaslt:FORA_TMA_TILES=$CLUSTER_K_TILES" \
           "tma_staged_cluster_k:tma:FORA_TMA_TILES=$STAGED_CLUSTER_K_TILES" \
           "prefetch_weights:cublaslt:FORA_PREFETCH_WEIGHTS=1" \
           "gemm_ln:cublaslt:FORA_GEMM_LN=1" "gemm_ln_pdl:cublaslt:FORA_GEMM_LN=1 FORA_PDL=1" \
           "gemm_ln_prefetch:cublaslt:FORA_GEMM_LN=1 FORA_PREFETCH_WEIGHTS=1" \
           "qkv_attention:cublaslt:FORA_QKV_ATTENTION=1" \
           "qkv_gemm_ln:cublaslt:FORA_QKV_ATTENTION=1 FORA_GEMM_LN=1" \
           "qkv_gemm_ln_pdl:cublaslt:FORA_QKV_ATTENTION=1 FORA_GEMM_LN=1 FORA_PDL=1" \
           "gemm_ln_many:cublaslt:FORA_GEMM_LN_MANY_ROWS=1" \
           "gemm_ln_all:cublaslt:FORA_GEMM_LN=1 FORA_GEMM_LN_MANY_ROWS=1" \
           "gemm_ln_wide:cublaslt:FORA_GEMM_LN_MANY_ROWS=1 FORA_GEMM_LN_WIDE=1" \
           "gemm_ln_one_per_sm:cublaslt:FORA_GEMM_LN=1 FORA_GEMM_LN_ONE_PER_SM=1" \
           "lt_narrow:cublaslt:FORA_TMA_TILES=$NARROW_TILES" \
           "ours_pdl:tma:FORA_QKV_ATTENTION=1 FORA_GEMM_LN=1 FORA_PDL=1")
  local round suffix
  for round in $(seq 1 "${VARIANT_ROUNDS:-1}"); do
    suffix=""; [ "$round" -gt 1 ] && suffix="_r$round"
    for v in "${all[@]}"; do
      name=${v%%:*}; rest=${v#*:}; gemm=${rest%%:*}; envs=${rest#*:}
      case " ${VARIANTS/all/$name} " in *" $name "*) ;; *) continue ;; esac
      name=$name$suffix
      echo "--- $name (--gemm $gemm ${envs})"
      (
        # shellcheck disable=SC2086 # several VAR=value words
        [ -n "$envs" ] && export $envs
        # shellcheck disable=SC2086 # VARIANT_ARGS is several words
        bounded "${VARIANT_S:-60}" .devpack/bin/fora bench --sections "${VARIANT_SECTIONS:-steps,e2e}" \
          --batches "${VARIANT_ROWS:-2,256}" --gemm "$gemm" --runs 10 --warmup 2 \
          ${VARIANT_ARGS:---intervals 1,3 --e2e-reps 1} \
          --json "$OUT/variant_$name.json" > "$OUT/variant_$name.log" 2>&1
      )
      grep -E "^\| (cublaslt|custom|wgmma|tma)[a-z_-]* \| (2|256) \|" "$OUT/variant_$name.log" | head -n 4
      # End to end, one image: N = 1 and 3 (the realized speedup of each path).
      grep -E "^\| (cublaslt|custom|wgmma|tma)[a-z_-]* \| [13] \| 250 \|" "$OUT/variant_$name.log" | head -n 2
      grep -E "reuse steps from cache sums" "$OUT/variant_$name.log" | head -n 2
      tail -n 1 "$OUT/variant_$name.log"
    done
  done
  python3 tools/variants_report.py "$OUT" --md "$OUT/variants.md"
}

# The tma_mc steps with the fastest forced tile of each GEMM (tools/tma_tiles.py over the Hopper
# GEMM rows an earlier phase of this call wrote: hopper_rows, issue5_more or bench), at the first
# of VARIANT_ROWS, as variant `tma_mc_tuned`; then the variants table again.
phase_tma_tuned() {
  local json="" f rows=${VARIANT_ROWS:-2}
  rows=${rows%%,*}
  for f in "$OUT/bench_hopper.json" "$OUT/issue5_hopper.json" "$OUT/hopper_rows.json"; do
    [ -f "$f" ] && json=$f
  done
  if [ -z "$json" ]; then
    echo "=== tma_tuned: no Hopper GEMM rows in this call (run hopper_rows first)"
    return 0
  fi
  local tiles
  tiles=$(python3 tools/tma_tiles.py "$json" --rows "$rows")
  echo "=== tma_mc_tuned: FORA_TMA_TILES=$tiles (fastest forced tiles at $rows rows, $(basename "$json"))"
  # shellcheck disable=SC2086 # VARIANT_ARGS is several words
  FORA_TMA_TILES=$tiles bounded "${VARIANT_S:-60}" .devpack/bin/fora bench --sections "${VARIANT_SECTIONS:-steps,e2e}" \
    --batches "$rows" --gemm tma_mc --runs 10 --warmup 2 ${VARIANT_ARGS:---intervals 1,3 --e2e-reps 1} \
    --json "$OUT/variant_tma_mc_tuned.json" > "$OUT/variant_tma_mc_tuned.log" 2>&1
  grep -E "^\| tma[a-z_-]* \| $rows \|" "$OUT/variant_tma_mc_tuned.log" | head -n 4
  grep -E "^\| tma[a-z_-]* \| [13] \| 250 \|" "$OUT/variant_tma_mc_tuned.log" | head -n 2
  tail -n 1 "$OUT/variant_tma_mc_tuned.log"
  python3 tools/variants_report.py "$OUT" --md "$OUT/variants.md"
}

# The GPU's clocks, power and temperature every 250 ms while the phases run (clocks.csv), each
# phase's start and end (phases.txt), summarized per phase at the end (tools/clock_summary.py):
# a long run of back-to-back steps at a lower clock than the kernels timed alone is power- or
# heat-bound.
CLOCK_PID=
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv,noheader,nounits -lms 250 > "$OUT/clocks.csv" 2> "$OUT/clocks.err" &
  CLOCK_PID=$!
fi
for phase in $PHASES; do
  phase_start=$(date +%s.%N)
  "phase_$phase"
  echo "$phase $phase_start $(date +%s.%N)" >> "$OUT/phases.txt"
  snapshot
done
if [ -n "$CLOCK_PID" ]; then
  kill "$CLOCK_PID" 2> /dev/null
  echo "=== clocks per phase (nvidia-smi every 250 ms)"
  python3 tools/clock_summary.py "$OUT/clocks.csv" "$OUT/phases.txt" | tee "$OUT/clocks.md"
fi
# The outcome in brief, last: the device tool shows the end of a call's output (12,000
# characters), and the phases above can print more than that.
digest() {
  echo "=== digest (every log is in all.tgz)"
  if [ -f "$OUT/tests.log" ]; then
    awk '/test result:/ { for (i = 1; i < NF; i++) { if ($(i + 1) ~ /^passed/) p += $i; if ($(i + 1) ~ /^failed/) f += $i } }
      END { printf "tests: %d passed, %d failed\n", p, f }' "$OUT/tests.log"
    grep -E "^NO TESTS|^rc=(124|137) |^SKIPPED" "$OUT/tests.log" | head -n 12
    # From the tests' own logs: with --nocapture a test's first output shares the line of its
    # name ("test x ... NOTE ..."), and its FAILED comes on a later line, so the failed tests
    # are taken from libtest's closing list.
    grep -hoE "NOTE .*" "$OUT"/test_*.log 2> /dev/null | sort -u | head -n 8
    awk '/^failures:$/ { f = 1; next } /^test result/ { f = 0 } f && /^    [^ ]/ { print "FAILED " $1 }' \
      "$OUT"/test_*.log 2> /dev/null | sort -u | head -n 16
    grep -h "panicked at" "$OUT"/test_*.log 2> /dev/null | head -n 6
  fi
  local f
  for f in "$OUT"/*.log; do
    # (The tests' own logs are summarised above.)
    case $(basename "$f") in test_*|tests.log|sanitize.log|racecheck_*) continue ;; esac
    [ -f "$f" ] || continue
    # A tuning's choice, a launch that never ended, a candidate that broke the GPU, a process
    # cut by its bound.
    grep -hE "^tune: [0-9]+ rows, chosen: |no answer after|left the GPU unusable|^rc=(124|137) " "$f" \
      | head -n 6 | sed "s|^|$(basename "$f"): |"
  done
}
digest
echo "=== done after $(( $(date +%s) - start ))s"
# The device tool brings back at most 8 files: all.tgz and the phase summaries beside it.
snapshot
