#!/usr/bin/env bash
# Packs what tools/device_suite.sh runs into .devpack/ (ignored by git) within the device
# tool's 64 MiB carry limit: ../shared/device/pack.sh builds everything in release mode, then
# only the GPU test binaries, the CLI test and the fora binary stay, stripped. Every binary
# embeds all the kernels (~7 MiB each), so the cargo bench binaries are left out: `fora bench`
# is the same harness (benches/dit.rs calls it), and device_suite.sh runs that; but for
# benches/vae.rs (the VAE decoder, which `fora bench` does not time). The pack is
# also written as .devpack.txz, the archive to carry (device_suite.sh unpacks it): xz with its
# 64 MiB window stores the kernels, the bulk of every binary, about once (session 33: 152 MiB
# of binaries in 8 MiB, where gzip's 32 KiB window made 56 MiB of them). Fails when even the
# archive is over the limit.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# build.rs builds without kernels (a warning only) where it finds no nvcc: a pack of such
# binaries would fail every GPU test and bench on the device. Refuse it here.
if [ -n "${FORA_SKIP_KERNELS:-}" ]; then
  echo "pack_device: FORA_SKIP_KERNELS is set: the pack would hold no kernels" >&2
  exit 1
fi
# ../shared/device/pack.sh appends to .git/info/exclude, which a fresh clone may lack.
mkdir -p .git/info
../shared/device/pack.sh > /dev/null
# (The output is read whole: `grep -q` on a pipe would end it early, a failure under pipefail.)
info=$(.devpack/bin/fora info 2>&1 || true)
if ! grep -q "^cuda kernels: compiled" <<< "$info"; then
  echo "pack_device: the packed fora has no kernels (is nvcc found? set NVCC, see DESIGN.md):" >&2
  grep "^cuda kernels" <<< "$info" >&2
  exit 1
fi
# The sources the binaries were built from, checked by device_suite.sh on the device: a pack
# older than the tree (a flag the suite passes that its fora lacks) would waste the call.
# (Untracked sources too: they were built and travel with the tree.)
git ls-files -z --cached --others --exclude-standard -- src kernels tests benches build.rs Cargo.toml Cargo.lock models \
  | xargs -0 -r sha256sum > .devpack/source.sums
if [ ! -s .devpack/source.sums ]; then
  echo "pack_device: no sources to list in .devpack/source.sums" >&2
  exit 1
fi
keep_tests="gpu_small_kernels gpu_attention gpu_gemm gpu_backend gpu_vae cli"
for t in .devpack/test/*; do
  case " $keep_tests " in *" $(basename "$t") "*) ;; *) rm -f "$t" ;; esac
done
find .devpack/bench -type f ! -name vae -delete
strip .devpack/test/* .devpack/bin/* $(find .devpack/bench -type f)
bytes=$(du -sb .devpack | cut -f1)
rm -f .devpack.tgz  # an older pack's archive, which device_suite.sh would otherwise unpack
tar cf - .devpack | xz -9 > .devpack.txz
archive=$(stat -c %s .devpack.txz)
echo "packed $((bytes / 1048576)) MiB, .devpack.txz $((archive / 1048576)) MiB (limit 64):"; ls .devpack/*
# The working tree that travels with it (tracked and untracked-not-ignored files) counts too.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -n 1 | cut -f1)
limit=$((64 * 1048576 - tree))
echo "the working tree that travels with it: $((tree / 1048576)) MiB"
if [ "$archive" -gt "$limit" ]; then
  echo "pack_device: .devpack.txz is $archive bytes, over the device tool's 64 MiB carry limit with the working tree's $tree" >&2
  exit 1
fi
echo "pack_device: carry [\".devpack.txz\"]" 
