#!/usr/bin/env python3
"""Clocks, power and temperature per device-suite phase: did the GPU hold its clock?

tools/device_suite.sh samples `nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,
power.draw,temperature.gpu --format=csv,noheader,nounits -lms 250` into clocks.csv while the
phases run, and writes each phase's start and end (Unix seconds) into phases.txt
("<phase> <start> <end>"). This prints, per phase, the SM clock's median and lowest, the
highest power and temperature: a step timed in long back-to-back runs at a lower clock than
the kernels timed alone is power- or heat-bound, not slower code.

Usage: tools/clock_summary.py CLOCKS_CSV PHASES_TXT
"""
import datetime
import statistics
import sys


def parse_clocks(lines):
    """[(unix seconds, sm MHz, mem MHz, watts, celsius)] of nvidia-smi's CSV lines; lines it
    cannot read ("[N/A]", a cut last line) are skipped."""
    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        try:
            # nvidia-smi's timestamp is the machine's local time, as time.time() compares.
            when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            sm, mem, watts, temp = (float(p) for p in parts[1:5])
        except ValueError:
            continue
        out.append((when, sm, mem, watts, temp))
    return out


def parse_phases(lines):
    """[(phase, start, end)] of phases.txt."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            try:
                out.append((parts[0], float(parts[1]), float(parts[2])))
            except ValueError:
                continue
    return out


def summary(clocks, phases):
    rows = ["| phase | seconds | samples | SM clock median (MHz) | SM clock lowest | memory clock | "
            "power highest (W) | temperature highest (C) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, start, end in phases:
        inside = [c for c in clocks if start <= c[0] <= end]
        if not inside:
            rows.append(f"| {name} | {end - start:.0f} | 0 | — | — | — | — | — |")
            continue
        sm = [c[1] for c in inside]
        rows.append(
            f"| {name} | {end - start:.0f} | {len(inside)} | {statistics.median(sm):.0f} | {min(sm):.0f} | "
            f"{statistics.median(c[2] for c in inside):.0f} | {max(c[3] for c in inside):.0f} | "
            f"{max(c[4] for c in inside):.0f} |")
    return "\n".join(rows)


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        clocks = parse_clocks(f)
    with open(argv[2]) as f:
        phases = parse_phases(f)
    if not clocks:
        print("clock_summary: no readable samples in " + argv[1], file=sys.stderr)
        return 1
    print(summary(clocks, phases))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
