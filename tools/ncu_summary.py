#!/usr/bin/env python3
"""Per-op time breakdown of fora steps from an Nsight Compute CSV (one row per kernel launch).

The device machines have ncu but no nsys, so the "profile" phase of tools/device_suite.sh runs

    FORA_CUDA_GRAPHS=0 ncu --nvtx --metrics gpu__time_duration.sum --csv \\
        fora bench --sections steps ... > profile.csv

(op by op, so every kernel launch sits inside fora's NVTX ranges: step, block, op) and this
script sums the kernel durations per step kind and op: which op of a computing or a reuse step
takes the time, and how many launches it makes. ncu serialises kernels, so the sums are pure
kernel time (no launch gaps, no overlap): compare them with the step time `fora bench` measured
to see what is kernel time and what is not.

    python3 tools/ncu_summary.py profile.csv            # Markdown tables to stdout
"""

import argparse
import csv
import re
import sys
from collections import OrderedDict, defaultdict

UNIT_TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
              "second": 1e6, "s": 1e6}
# fora's NVTX op ranges (src/cuda/model.rs, src/cuda/backend.rs); anything else is "other".
OPS = ["conditioning", "next_modulation", "patch_embed", "ln_msa", "qkv", "attention", "proj",
       "ln_mlp", "fc1", "fc2", "residual_ln", "qkv+attention", "proj+ln", "fc2+ln", "fora_reuse",
       "fora_reuse_final", "sum_gates", "fora_cache_sum", "final_layer", "sampler_step",
       "final_sampler_step"]
# `step <k> compute|reuse` (fora sample), `rows <R> step <i> full|reuse` and, for a run of
# reuse steps that read cache sums, `rows <R> run <i> reuse_summed` (fora bench).
STEP_RE = re.compile(r"(?:step|run) (\d+) (compute|full|reuse_summed|reuse)")
ROWS_RE = re.compile(r"rows (\d+)")


def read_rows(path):
    """The launch rows of an ncu CSV: (nvtx ranges text, kernel name, duration in us)."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    # ncu prints its own "==PROF==" lines and the program's output around the CSV.
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path}: no ncu CSV header (a line starting with \"ID\")")
    reader = csv.DictReader(l for l in lines[start:] if l.startswith('"'))
    cols = reader.fieldnames or []
    nvtx_col = next((c for c in cols if "Push/Pop" in c or "NVTX" in c.upper()), None)
    for need in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value"):
        if need not in cols:
            raise ValueError(f"{path}: the CSV has no column {need!r} (columns: {cols})")
    out = []
    for r in reader:
        if r["Metric Name"] != "gpu__time_duration.sum":
            continue
        unit = r["Metric Unit"].strip()
        if unit not in UNIT_TO_US:
            raise ValueError(f"{path}: unknown time unit {unit!r}")
        value = float(r["Metric Value"].replace(",", ""))
        out.append(((r.get(nvtx_col) or "") if nvtx_col else "", r["Kernel Name"],
                    value * UNIT_TO_US[unit]))
    if not out:
        raise ValueError(f"{path}: no gpu__time_duration.sum rows")
    return out


def classify(nvtx):
    """(rows, step kind, op) of a launch from its NVTX ranges text."""
    step = STEP_RE.search(nvtx)
    rows = ROWS_RE.search(nvtx)
    op = next((o for o in OPS if re.search(rf"(^|[:/ ]){re.escape(o)}($|[:/ ])", nvtx)), "other")
    return (int(rows.group(1)) if rows else None,
            step.group(2) if step else "no step range",
            op)


def summarize(rows):
    """{(rows, kind): {op: [total us, launches, {kernel: us}]}} and the steps seen per group."""
    groups = OrderedDict()
    steps = defaultdict(set)
    for nvtx, kernel, us in rows:
        n, kind, op = classify(nvtx)
        key = (n, kind)
        g = groups.setdefault(key, OrderedDict())
        entry = g.setdefault(op, [0.0, 0, defaultdict(float)])
        entry[0] += us
        entry[1] += 1
        entry[2][kernel] += us
        m = STEP_RE.search(nvtx)
        steps[key].add(m.group(0) if m else "")
    return groups, steps


def markdown(groups, steps):
    s = []
    for (n, kind), ops in groups.items():
        count = max(1, len(steps[(n, kind)]))
        total = sum(e[0] for e in ops.values()) / count
        s.append(f"### rows {n if n is not None else '?'}, {kind} "
                 f"({count} step(s) profiled; kernel time per step {total / 1e3:.3f} ms)\n")
        s.append("| op | us per step | share | launches per step | kernels (us per step) |")
        s.append("|---|---|---|---|---|")
        for op, (us, launches, kernels) in sorted(ops.items(), key=lambda kv: -kv[1][0]):
            top = ", ".join(f"`{k[:48]}` {v / count:.1f}"
                            for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:3])
            share = us / (total * count) * 100 if total > 0 else 0.0
            s.append(f"| {op} | {us / count:.1f} | {share:.1f}% | {launches / count:.1f} | "
                     f"{top} |")
        s.append("")
    return "\n".join(s)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", help="ncu --csv output with gpu__time_duration.sum and --nvtx")
    args = p.parse_args(argv)
    try:
        groups, steps = summarize(read_rows(args.csv))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(markdown(groups, steps))


if __name__ == "__main__":
    main()
