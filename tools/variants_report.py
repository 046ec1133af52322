#!/usr/bin/env python3
"""One Markdown table of the execution paths `tools/device_suite.sh` measured (its `variants`
phase writes one `fora bench --json` file per path, `variant_<name>.json`): per path the full
and reuse step times at each row count, TFLOP/s of the full step, kernels per step, the host's
issue time of a step, and one image end to end at N = 1 and 3 with the realized speedup. Each
ratio column compares with the path named `default` measured in the same run, and a verdict
per path says where it is faster or slower than the default and whether to adopt it. With
several rounds (`VARIANT_ROUNDS`: `<name>_r2` etc.), each round's path is compared with that
round's `default_r<n>`, and a verdict counts only what holds in every round (separate processes
drift ~1%).

    python3 tools/variants_report.py OUT_DIR [--md variants.md]

Standard library only. Paths whose JSON is missing or broken are listed, not fatal."""

import argparse
import glob
import json
import os
import re
import sys

DASH = "—"


def fmt(v, digits, suffix=""):
    return DASH if v is None else f"{v:.{digits}f}{suffix}"


def load(path):
    try:
        with open(path) as f:
            return json.load(f), None
    except (OSError, ValueError) as e:
        return None, f"{os.path.basename(path)}: {e}"


def step(d, rows, kind):
    for s in d.get("steps", []):
        if s.get("rows") == rows and s.get("kind") == kind and s.get("median_ms") is not None:
            return s
    return None


def e2e(d, interval):
    for r in d.get("e2e", []):
        if r.get("interval") == interval and r.get("loop_ms") is not None:
            return r
    return None


FASTER, SLOWER = 1.02, 0.99  # speedup against the default that counts as a change


def split_round(name):
    """(path, round) of a variant name: `<path>_r<n>` is round n, anything else round 1."""
    m = re.fullmatch(r"(.+)_r([0-9]+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, 1)


def default_of(runs, name):
    """The `default` run of `name`'s round (round 1's where that round has none)."""
    _, r = split_round(name)
    return runs.get("default" if r == 1 else f"default_r{r}") or runs.get("default")


def ratios(d, base, rows):
    """(what, default time / this time) over the step times and one image at N = 3."""
    pairs = [(f"{kind} {r} rows", step(d, r, kind), step(base, r, kind))
             for r in rows for kind in ("full", "reuse")]
    out = [(what, b["median_ms"] / s["median_ms"]) for what, s, b in pairs
           if s and b and s["median_ms"]]
    e3, b3 = e2e(d, 3), e2e(base, 3)
    if e3 and b3 and e3["loop_ms"]:
        out.append(("one image N=3", b3["loop_ms"] / e3["loop_ms"]))
    return out


def span(rs):
    lo, hi = min(rs), max(rs)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def verdicts(runs, names, rows):
    """Per path, where it is faster (>= 2% less time) or slower (>= 1% more) than the default
    of its round, in every round it ran, over the step times and one image at N = 3, and what
    that suggests."""
    paths = {}
    for n in names:
        p, r = split_round(n)
        paths.setdefault(p, {})[r] = n
    several = any(len(rs) > 1 for rs in paths.values())
    lines = [f"Verdicts against `default` (faster: at least {round((FASTER - 1) * 100)}% less time; "
             f"slower: at least {round((1 - SLOWER) * 100)}% more"
             + ("; in every round, each against its own round's default" if several else "") + "):"]
    for p, by_round in paths.items():
        if p == "default":
            continue
        per_what, errors = {}, 0
        for r in sorted(by_round):
            n = by_round[r]
            errors += len(runs[n].get("errors", []))
            base = default_of(runs, n)
            if base is None:
                continue
            for what, ratio in ratios(runs[n], base, rows):
                per_what.setdefault(what, []).append(ratio)
        pairs = list(per_what.items())
        faster = [f"{what} ({span(rs)})" for what, rs in pairs if min(rs) >= FASTER]
        slower = [f"{what} ({span(rs)})" for what, rs in pairs if max(rs) <= SLOWER]
        rounds = f" ({len(by_round)} rounds)" if len(by_round) > 1 else ""
        if errors:
            verdict = f"{errors} error(s) in its run: check them before adopting it"
        elif not pairs:
            verdict = "nothing measured"
        elif faster and not slower:
            verdict = "adopt it where its GPU tests pass"
        elif faster:
            verdict = "mixed: weigh the targets"
        else:
            verdict = "keep the default"
        lines.append(f"- `{p}`{rounds}: faster in {', '.join(faster) or 'nothing'}; "
                     f"slower in {', '.join(slower) or 'nothing'}: {verdict}")
    return "\n".join(lines)


def report(out_dir):
    """The Markdown report of the variant runs under `out_dir`, and whether any was readable."""
    paths = sorted(glob.glob(os.path.join(out_dir, "variant_*.json")))
    runs, problems = {}, []
    for p in paths:
        name = os.path.basename(p)[len("variant_"):-len(".json")]
        d, err = load(p)
        if err:
            problems.append(err)
        else:
            runs[name] = d
    if not runs:
        unread = "".join(f"- {e}\n" for e in problems)
        return f"no readable variant_*.json under {out_dir}\n" + unread, False
    # The defaults first (round by round), the rest by name and round.
    names = sorted(runs, key=lambda n: (split_round(n)[0] != "default", split_round(n)[0],
                                        split_round(n)[1]))
    rows = sorted({s["rows"] for d in runs.values() for s in d.get("steps", [])})

    head = ["path"]
    for r in rows:
        head += [f"full, {r} rows (ms)", f"vs default", f"reuse, {r} rows (ms)", "vs default"]
    head += [f"TFLOP/s at {rows[-1]} rows" if rows else "TFLOP/s", "kernels full / reuse",
             "host issue full / reuse (ms)", "e2e N=1 (ms)", "e2e N=3 (ms)", "N=3 speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        d = runs[n]
        att = (d.get("settings") or {}).get("attention")
        cells = [f"`{n}`" + (f" (attention {att})" if att and att != "v1" else "")]
        base = default_of(runs, n)
        for r in rows:
            for kind in ("full", "reuse"):
                s = step(d, r, kind)
                b = step(base, r, kind) if base else None
                ms = s["median_ms"] if s else None
                cells.append(fmt(ms, 4 if kind == "reuse" else 3))
                ratio = (b["median_ms"] / ms) if (s and b and ms) else None
                cells.append(fmt(ratio, 2, "x") if base is not d else DASH)
        big = step(d, rows[-1], "full") if rows else None
        cells.append(fmt(big.get("tflops") if big else None, 1))
        small_f = step(d, rows[0], "full") if rows else None
        small_r = step(d, rows[0], "reuse") if rows else None
        k = lambda s: DASH if not s or s.get("kernels") is None else str(s["kernels"])
        cells.append(f"{k(small_f)} / {k(small_r)}")
        h = lambda s: fmt(s.get("host_issue_ms") if s else None, 4)
        cells.append(f"{h(small_f)} / {h(small_r)}")
        e1, e3 = e2e(d, 1), e2e(d, 3)
        cells.append(fmt(e1["loop_ms"] if e1 else None, 1))
        cells.append(fmt(e3["loop_ms"] if e3 else None, 1))
        sp = (e1["loop_ms"] / e3["loop_ms"]) if (e1 and e3 and e3["loop_ms"]) else None
        theo = e3.get("theoretical_speedup") if e3 else None
        cells.append(f"{fmt(sp, 2, 'x')} (limit {fmt(theo, 2, 'x')})" if e3 else DASH)
        lines.append("| " + " | ".join(cells) + " |")

    out = []
    dev = next((d.get("device") or {} for d in runs.values() if d.get("device")), {})
    out.append(f"Execution paths on {dev.get('name', DASH)} ({', '.join(names)}); "
               f"rows: {', '.join(map(str, rows))}; kernels and host issue time at {rows[0] if rows else DASH} rows.\n")
    out.append("\n".join(lines))
    # FORA_REUSE_SUM runs: a reuse step's mean over a run of reuse steps (its sums pass included).
    summed = [(n, r, step(runs[n], r, "reuse_summed")) for n in names for r in rows]
    summed = [f"- `{n}`, {r} rows: {fmt(s['median_ms'], 4)} ms a reuse step, mean over a run of "
              f"{(runs[n].get('settings') or {}).get('reuse_sum', DASH)} (its one pass over the cache included)"
              for n, r, s in summed if s]
    if summed:
        out.append("\nReuse steps from cache sums:\n" + "\n".join(summed))
    if "default" in runs and len(names) > 1:
        out.append("\n" + verdicts(runs, names, rows))
    errors = [f"- `{n}`: {e.get('section')} / {e.get('what')}: {e.get('error')}"
              for n in names for e in runs[n].get("errors", [])]
    if errors:
        out.append("\nErrors:\n" + "\n".join(errors))
    if problems:
        out.append("\nUnreadable: " + "; ".join(problems))
    return "\n".join(out) + "\n", True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--md", help="also write the table here")
    a = ap.parse_args()
    text, found = report(a.out_dir)
    sys.stdout.write(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    # Nothing readable is a failure the caller should see (the reasons are in the text).
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
