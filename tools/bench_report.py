#!/usr/bin/env python3
"""Merges the JSON of `fora bench` (ours) and of tools/bench_torch.py (PyTorch, same card, same
device call) into Markdown tables with every ratio issue 5's target table asks for, and a PNG
plot of step latency vs batch size, ours against PyTorch.

    python3 tools/bench_report.py --ours target/bench.json --torch target/bench_torch.json \\
        --md target/bench_report.md --plot target/bench_latency.png

Only measured numbers are printed: anything missing (not run, skipped, failed) is "—". Needs
only the standard library; the plot needs matplotlib and is skipped with a note without it.
A ratio "ours vs X" is X's time over ours (> 1: ours is faster).
"""

import argparse
import json
import os
import sys

DASH = "—"
# The model's GEMMs as `fora bench` names its kernel rows.
GEMMS = ("qkv", "proj", "fc1", "fc2", "adaLN", "final")
# bench_torch.py's step modes.
MODES = ("eager", "graph", "compile", "compile_graph")

# Issue 5's targets (DiT-XL/2, 256x256, bf16).
TARGETS = {
    "full_tflops_256": 600.0,
    "full_vs_eager_256": 2.0,
    "full_vs_compile_256": 1.3,
    "full_ms_2": 1.0,
    "full_vs_graph_2": 3.5,
    "reuse_ms_2": 0.05,
    "reuse_ms_256": 2.5,
    "e2e_ms_n3": 100.0,
    "speedup_n3": 2.85,
    "attention_vs_sdpa": 1.5,
    "gemm_vs_cublaslt": 1.0,
}


def load(path, schema):
    if not path:
        return None
    if not os.path.exists(path):
        print(f"bench_report: {path} does not exist; its columns are {DASH}", file=sys.stderr)
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise SystemExit(f"bench_report: cannot read {path}: {type(e).__name__}: {e}")
    if not isinstance(data, dict):
        raise SystemExit(f"bench_report: {path} holds a JSON {type(data).__name__}, not a report object")
    if data.get("schema") != schema:
        raise SystemExit(f"bench_report: {path} has schema {data.get('schema')!r}, expected {schema!r}")
    return data


def fmt(v, digits=2, suffix=""):
    if v is None:
        return DASH
    return f"{v:.{digits}f}{suffix}"


def fmt_against(v, digits, suffix, limit, at_least):
    """fmt(v) with as many more digits as it takes (up to 4) for the shown value to lie on the
    same side of `limit` as v itself: 599.6 TFLOP/s against ">= 600" shows "599.6", not a
    "600" beside MISSED."""
    if v is None:
        return DASH
    side = (lambda x: x >= limit) if at_least else (lambda x: x <= limit)
    for d in range(digits, digits + 5):
        if side(round(v, d)) == side(v):
            return fmt(v, d, suffix)
    return fmt(v, digits + 4, suffix)


def ratio(a, b):
    """a / b when both are measured and b > 0."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


class Report:
    def __init__(self, ours, torch, gemm=None):
        self.ours = ours
        self.torch = torch
        self.macs = None
        for d in (ours, torch):
            if d and d.get("model") and d["model"].get("macs_per_row"):
                self.macs = self.macs or d["model"]["macs_per_row"]
        # Our step rows of one GEMM implementation: the one asked for, else the first (fora
        # bench times the model's default implementation first, cuBLASLt unless told).
        self.gemm = None
        if ours and ours.get("steps"):
            gemms = [r["gemm"] for r in ours["steps"]]
            if gemm is not None and gemm not in gemms:
                raise SystemExit(f"bench_report: no step rows with GEMM {gemm!r} (have {sorted(set(gemms))})")
            self.gemm = gemm or gemms[0]

    # -- lookups ------------------------------------------------------------------------------

    def our_step(self, rows, kind):
        if not self.ours:
            return None
        for r in self.ours.get("steps", []):
            if r["gemm"] == self.gemm and r["rows"] == rows and r["kind"] == kind:
                return r.get("median_ms")
        return None

    def torch_best(self, modes, rows, kind):
        """PyTorch's fastest step row of `modes` at `rows` and `kind`, over the model
        structures timed (bench_torch.py's variants: plain, fast); None if none."""
        best = None
        for r in (self.torch or {}).get("steps", []):
            if r["mode"] in modes and r["rows"] == rows and r["kind"] == kind \
                    and r.get("median_ms") and (best is None or r["median_ms"] < best["median_ms"]):
                best = r
        return best

    def torch_step(self, mode, rows, kind):
        r = self.torch_best((mode,), rows, kind)
        return r["median_ms"] if r else None

    def tflops(self, rows, ms):
        if ms is None or ms <= 0 or not self.macs:
            return None
        return 2.0 * self.macs * rows / (ms * 1e-3) / 1e12

    def rows(self):
        found = set()
        if self.ours:
            found |= {r["rows"] for r in self.ours.get("steps", [])}
        if self.torch:
            found |= {r["rows"] for r in self.torch.get("steps", [])}
        return sorted(found)

    def e2e_gemm(self):
        """The GEMM implementation of our end-to-end rows: the step rows' where it has
        end-to-end rows, else the first end-to-end row's (fora bench runs the loops for its
        first GEMM and for `tuned`). Every N of a table comes from this one implementation."""
        rows = (self.ours or {}).get("e2e", [])
        gemms = [r["gemm"] for r in rows]
        if self.gemm in gemms:
            return self.gemm
        return gemms[0] if gemms else None

    def our_e2e(self, n):
        """Our end-to-end row at FORA N = n of e2e_gemm() (its "finite" says whether the
        samples were finite: a loop that made NaNs is a failed target, not a missing one)."""
        gemm = self.e2e_gemm()
        for r in (self.ours or {}).get("e2e", []):
            if r["interval"] == n and r["gemm"] == gemm:
                return r
        return None

    def torch_e2e(self, mode, n, variant=None):
        """PyTorch's end-to-end row of `mode` at FORA N = n: of `variant`, or the fastest of
        the model structures timed."""
        best = None
        for r in (self.torch or {}).get("e2e", []):
            if r["mode"] == mode and r["interval"] == n \
                    and variant in (None, r.get("variant", "plain")) \
                    and (best is None or r["wall_ms"] < best["wall_ms"]):
                best = r
        return best

    def our_attention(self, impl=None):
        """Our fastest attention row keyed by (batch, heads, tokens, head_dim), of any
        implementation or only `impl` ("custom" is the one the model runs, FORA_ATTENTION);
        its "impl" says which."""
        out = {}
        if not self.ours:
            return out
        m = self.ours["model"]
        for k in self.ours.get("kernels", []):
            if k["name"] == "attention" and k.get("median_ms") is not None \
                    and impl in (None, k["impl"]):
                key = (k["rows"], m["heads"], m["tokens"], m["hidden"] // m["heads"])
                if key not in out or k["median_ms"] < out[key]["median_ms"]:
                    out[key] = k
        return out

    def sdpa(self):
        """The fastest SDPA row of each shape, over the backends timed (bench_torch.py times
        the default choice and each fused backend alone)."""
        out = {}
        if self.torch:
            for r in self.torch.get("sdpa", []):
                key = (r["batch"], r["heads"], r["tokens"], r["head_dim"])
                if r.get("median_ms") and (key not in out or r["median_ms"] < out[key]["median_ms"]):
                    out[key] = r
        return out

    # -- tables -------------------------------------------------------------------------------

    def header(self):
        lines = []
        for name, d in (("ours", self.ours), ("PyTorch", self.torch)):
            if not d:
                lines.append(f"- {name}: not measured")
                continue
            dev = (d.get("device") or {}).get("name", DASH)
            m = d.get("model") or {}
            extra = f", torch {d['torch']}" if name == "PyTorch" else ""
            lines.append(f"- {name}: {dev}, {d.get('date', DASH)}, {m.get('arch', DASH)} "
                         f"({m.get('weights', DASH)}){extra}, median of "
                         f"{d['settings'].get('runs', DASH)} runs")
        if self.ours and self.torch:
            a = (self.ours.get("device") or {}).get("name")
            b = (self.torch.get("device") or {}).get("name")
            if a and b and a != b:
                lines.append(f"- WARNING: different cards ({a} vs {b}): ratios are not comparable")
        if self.ours and self.torch:
            a = (self.ours.get("model") or {}).get("macs_per_row")
            b = (self.torch.get("model") or {}).get("macs_per_row")
            if a and b and abs(a - b) > 0.005 * max(a, b):
                lines.append(f"- WARNING: different models ({a} vs {b} MACs per row): ratios are "
                             "not comparable")
            elif a and b and a != b:
                # Session 33 added the adaLN Linears and the timestep MLP (0.19% of DiT-XL/2)
                # to the count: files of either side of it, the same model.
                lines.append(f"- note: the two files count {a / 1e9:.2f} and {b / 1e9:.2f} GMAC "
                             "a row (one is from before session 33's count); the TFLOP/s "
                             "below use ours")
        if self.macs:
            lines.append(f"- FLOPs = 2 x {self.macs / 1e9:.1f} GMAC per model row; rows include "
                         "the CFG half; a step = model + CFG + DDPM update on both sides")
        if self.gemm:
            lines.append(f"- our steps: GEMM implementation `{self.gemm}`")
        # `fora bench --tune`: what each batch's rows labelled `tuned` ran.
        for t in (self.ours or {}).get("tunings", []):
            env = t.get("chosen_env") or "the default options"
            sp = t.get("speedup")
            cut = ""
            if t.get("complete") is False:
                n = sum(c.get("outcome") == "untried" for c in t.get("candidates", []))
                cut = f" (cut short by its time budget: {n} not tried)"
            lines.append(f"- `tuned` at {t['rows']} rows (FORA N = {t['interval']}): "
                         f"`{t['chosen']}` ({env}), {fmt(sp, 3, 'x')} the given options' window"
                         f"{cut}")
        return "\n".join(lines)

    def targets(self):
        rows = []

        def add(what, goal, value, text, ok):
            status = DASH if ok is None else ("met" if ok else "MISSED")
            rows.append(f"| {what} | {goal} | {text if value is not None else DASH} | {status} |")

        full256 = self.our_step(256, "full")
        t = self.tflops(256, full256)
        goal = TARGETS["full_tflops_256"]
        add("full step, rows 256: effective TFLOP/s", ">= 600", t,
            fmt_against(t, 0, "", goal, True), None if t is None else t >= goal)

        def versus(modes, rows_, kind, ours, goal=None):
            """Ratio to PyTorch's fastest of `modes` (any structure), and its text (digits
            enough to tell it from `goal`)."""
            t = self.torch_best(modes, rows_, kind)
            r = ratio(t["median_ms"] if t else None, ours)
            shown = fmt(r, 2, "x") if goal is None else fmt_against(r, 2, "x", goal, True)
            return r, (f"{shown} ({t['mode']}, {t.get('variant', 'plain')})"
                       if r is not None else DASH)

        # Each PyTorch comparison is with its fastest row of the modes named (either model
        # structure): torch.compile includes the compiled step captured as a CUDA graph, a
        # CUDA graph includes the compiled one.
        goal = TARGETS["full_vs_eager_256"]
        r, text = versus(("eager",), 256, "full", full256, goal)
        add("full step, rows 256: vs PyTorch eager", ">= 2.0x", r, text,
            None if r is None else r >= goal)
        goal = TARGETS["full_vs_compile_256"]
        r, text = versus(("compile", "compile_graph"), 256, "full", full256, goal)
        add("full step, rows 256: vs torch.compile", ">= 1.3x", r, text,
            None if r is None else r >= goal)
        full2 = self.our_step(2, "full")
        goal = TARGETS["full_ms_2"]
        add("full step, rows 2 (one image + CFG)", "<= 1.0 ms", full2,
            fmt_against(full2, 3, " ms", goal, False), None if full2 is None else full2 <= goal)
        goal = TARGETS["full_vs_graph_2"]
        r, text = versus(("graph", "compile_graph"), 2, "full", full2, goal)
        add("full step, rows 2: vs PyTorch CUDA graph", ">= 3.5x", r, text,
            None if r is None else r >= goal)
        # No goal of the issue's: fora against the fastest PyTorch has, in any mode.
        for kind, rows_ in (("full", 2), ("full", 256), ("reuse", 2), ("reuse", 256)):
            r, text = versus(MODES, rows_, kind, self.our_step(rows_, kind))
            add(f"{kind} step, rows {rows_}: vs the fastest PyTorch", DASH, r, text, None)
        for rows_, goal in ((2, "reuse_ms_2"), (256, "reuse_ms_256")):
            v = self.our_step(rows_, "reuse")
            add(f"reuse step, rows {rows_}", f"<= {TARGETS[goal]} ms", v,
                fmt_against(v, 4, " ms", TARGETS[goal], False),
                None if v is None else v <= TARGETS[goal])
            # FORA_REUSE_SUM runs: a reuse step's mean over a run, its one cache pass included.
            v = self.our_step(rows_, "reuse_summed")
            if v is not None:
                add(f"reuse step, rows {rows_}, mean over a run from cache sums "
                    f"(FORA_REUSE_SUM={self.ours.get('settings', {}).get('reuse_sum', '?')})",
                    f"<= {TARGETS[goal]} ms", v, fmt_against(v, 4, " ms", TARGETS[goal], False),
                    v <= TARGETS[goal])
        # Both from one GEMM implementation and step count (e2e_gemm); the goal is the issue's
        # loop (250 steps, one image: 2 rows), so another loop has no status.
        e3 = self.our_e2e(3)
        v = e3["loop_ms"] if e3 else None
        issue_loop = e3 is not None and e3["steps"] == 250 and e3.get("rows", 2) == 2
        goal = TARGETS["e2e_ms_n3"]
        gemm = self.e2e_gemm()
        note = f" (GEMM `{gemm}`)" if e3 and gemm != self.gemm else ""
        # A loop whose samples were not finite fails its target whatever its time.
        nan = " (NON-FINITE samples)"
        bad3 = e3 is not None and e3.get("finite") is False
        add(f"{e3['steps'] if e3 else 250}-step DDPM, FORA N=3, "
            f"{'one image' if not e3 or e3.get('rows', 2) == 2 else str(e3['rows']) + ' rows'}: "
            f"end to end{note}", "<= 100 ms", v,
            fmt_against(v, 1, " ms", goal, False) + (nan if bad3 else ""),
            None if v is None or not issue_loop else (v <= goal and not bad3))
        e1 = self.our_e2e(1)
        if e1 and e3 and e1["steps"] != e3["steps"]:
            e1 = None  # another loop: no speedup
        s = ratio(e1["loop_ms"], e3["loop_ms"]) if (e1 and e3) else None
        bad = bad3 or (e1 is not None and e1.get("finite") is False)
        theo = ratio(e3["steps"], e3["computed"]) if e3 else None
        goal = TARGETS["speedup_n3"]
        add(f"FORA N=3 realized speedup over N=1{note}", ">= 2.85x", s,
            f"{fmt_against(s, 2, 'x', goal, True)} (limit {fmt(theo, 2, 'x')})"
            + (nan if bad else ""),
            None if s is None or not issue_loop else (s >= goal and not bad))
        key = None
        if self.ours:
            m = self.ours["model"]
            key = (256, m["heads"], m["tokens"], m["hidden"] // m["heads"])
        # The target is the kernel the model runs (impl "custom": FORA_ATTENTION); a faster
        # alternative measured beside it is listed without a goal.
        sd = self.sdpa().get(key) if key else None
        label = f"attention {key}" if key else "attention (256, 16, 256, 72)"
        goal = TARGETS["attention_vs_sdpa"]
        model_att = self.our_attention("custom").get(key) if key else None
        fastest = self.our_attention().get(key) if key else None
        shown = [(model_att, "the model's kernel", True)]
        if fastest and (model_att is None or fastest["median_ms"] < model_att["median_ms"]):
            shown.append((fastest, "a faster kernel, not the model's", False))
        for k, what, is_target in shown:
            r = ratio(sd["median_ms"] if sd else None, k["median_ms"] if k else None)
            add(f"{label}, {what}{' (' + k['impl'] + ')' if k else ''}: vs PyTorch SDPA",
                ">= 1.5x" if is_target else DASH, r, fmt_against(r, 2, "x", goal, True),
                None if r is None or not is_target else r >= goal)
        # Our own GEMM kernels with their fused epilogues against the best cuBLASLt of the same
        # GEMM: the mma.sync kernels always, the Hopper wgmma and TMA (plain, multicast) kernels
        # where they ran.
        # Two bars for each: the issue's (cuBLASLt's GEMM + our separate epilogue kernel, the
        # "cublaslt+epilogue" rows) and a stricter one (the best cuBLASLt row of the GEMM,
        # epilogue fused by cuBLASLt where it can: vs_cublaslt).
        ks = (self.ours or {}).get("kernels", [])
        separate = {(k["name"], k["rows"]): k.get("median_ms") for k in ks
                    if k["impl"] == "cublaslt+epilogue"}
        bars = (("cuBLASLt + separate epilogue pass",
                 lambda k: ratio(separate.get((k["name"], k["rows"])), k.get("median_ms"))),
                ("best cuBLASLt", lambda k: k.get("vs_cublaslt")))
        goal = TARGETS["gemm_vs_cublaslt"]
        for imp, label in (("custom", "each GEMM with its fused epilogue"),
                           ("wgmma", "each GEMM on the wgmma kernels (fused epilogue)"),
                           ("tma", "each GEMM on the warp-specialized TMA kernels (fused epilogue)"),
                           ("tma_mc", "each GEMM on the cluster-multicast TMA kernels (fused epilogue)")):
            # GEMM rows only (vs_cublaslt is null for ours' attention and memory-bound rows).
            gemms = [k for k in ks if k["impl"] == imp and k["name"] in GEMMS]
            # A row that failed: no worst case is known.
            failed = [f"{k['name']} rows {k['rows']}" for k in gemms if k.get("median_ms") is None]
            for bar, of in bars:
                worst, v, unmatched = None, None, []
                for k in gemms:
                    r = of(k)
                    if r is not None and (v is None or r < v):
                        worst, v = k, r
                    elif r is None and k.get("median_ms") is not None:
                        # Ours timed, its bar not (that row failed or was not run).
                        unmatched.append(f"{k['name']} rows {k['rows']}")
                if imp != "custom" and worst is None and not failed:
                    continue
                text = (f"{fmt_against(v, 2, 'x', goal, True)} "
                        f"({worst['name']}, rows {worst['rows']})" if worst else DASH)
                if failed:
                    text += f"; incomplete, failed: {', '.join(failed)}"
                if unmatched:
                    text += f"; incomplete, no {bar} row for: {', '.join(unmatched)}"
                add(f"{label} vs {bar} (worst case)", ">= 1.0x", v, text,
                    None if worst is None or failed or unmatched else v >= goal)
        # The same target for the GEMMs as the model runs them: qkv and fc1 with bias (+ GELU)
        # fused by cuBLASLt (bf16 bias) against cuBLASLt's product + our epilogue kernel.
        fused = {}
        if self.ours:
            ks = self.ours.get("kernels", [])
            ms = {(k["name"], k["rows"], k["impl"]): k.get("median_ms") for k in ks}
            for (name, rows_, imp), m in ms.items():
                sep = ms.get((name, rows_, "cublaslt+epilogue"))
                if imp == "cublaslt+bf16 bias" and m and sep:
                    fused[(name, rows_)] = sep / m
        w = min(fused.items(), key=lambda kv: kv[1]) if fused else None
        add("qkv / fc1 as the model runs them (epilogue fused by cuBLASLt) vs cuBLASLt + "
            "separate epilogue pass (worst case)", ">= 1.0x", w[1] if w else None,
            f"{fmt(w[1], 2, 'x')} ({w[0][0]}, rows {w[0][1]})" if w else DASH,
            None if w is None else w[1] >= TARGETS["gemm_vs_cublaslt"])
        return ("| target | goal | measured | status |\n|---|---|---|---|\n" + "\n".join(rows))

    def steps_table(self):
        out = []
        for kind in ("full", "reuse"):
            third = "TFLOP/s" if kind == "full" else "reuse / full"
            out += [f"| rows | ours {kind} (ms) | {third} | eager | graph | compile | "
                    "compile + graph | ours vs eager | vs graph | vs compile | "
                    "vs compile + graph |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]
            for rows in self.rows():
                ours = self.our_step(rows, kind)
                theirs = [self.torch_best((m,), rows, kind) for m in MODES]
                times = [t["median_ms"] if t else None for t in theirs]
                if kind == "full":
                    third = fmt(self.tflops(rows, ours), 1)
                else:
                    third = fmt(ratio(ours, self.our_step(rows, "full")), 3)

                def cell(t):
                    if t is None:
                        return DASH
                    ms = t["median_ms"]
                    mark = "*" if t.get("variant") == "fast" else ""
                    if kind == "full":
                        return f"{ms:.3f}{mark} ({fmt(self.tflops(rows, ms), 0)} TF/s)"
                    return f"{ms:.3f}{mark}"

                out.append(f"| {rows} | {fmt(ours, 3 if kind == 'full' else 4)} | {third} | "
                           + " | ".join(cell(t) for t in theirs) + " | "
                           + " | ".join(fmt(ratio(t, ours), 2, "x") for t in times) + " |")
            out.append("")
        out.append("Each PyTorch cell is the faster of its model structures: * the fast one "
                   "(tools/dit_torch_fast.py: conditioning precomputed per run, outputs written "
                   "into the cache, in-place reuse adds, SDPA on its fastest backend), "
                   "unmarked the plain official one (tools/dit_torch.py).")
        return "\n".join(out).rstrip()

    def e2e_table(self):
        ns = set()
        if self.ours:
            ns |= {r["interval"] for r in self.ours.get("e2e", []) if self.our_e2e(r["interval"])}
        if self.torch:
            ns |= {r["interval"] for r in self.torch.get("e2e", [])}
        if not ns:
            return None
        base_ours = self.our_e2e(1)
        # eager and graph always; the compiled modes where they ran.
        timed = {r["mode"] for r in (self.torch or {}).get("e2e", [])}
        modes = ["eager", "graph"] + [m for m in ("compile", "compile_graph") if m in timed]
        out = ["| N | computing steps | ours (ms) | ours speedup | limit | "
               + " | ".join(f"{m} (ms) | {m} speedup" for m in modes) + " | "
               + " | ".join(f"ours vs {m}" for m in modes) + " |",
               "|---|---|---|---|---|" + "---|---|---|" * len(modes)]
        marked = False
        for n in sorted(ns):
            o = self.our_e2e(n)
            # Each mode's fastest structure at this N, its speedup against the same
            # structure's N = 1.
            cells, times = [], []
            for mode in modes:
                t = self.torch_e2e(mode, n)
                ms = t["wall_ms"] if t else None
                variant = t.get("variant", "plain") if t else None
                base = self.torch_e2e(mode, 1, variant) if t else None
                mark = "*" if variant == "fast" else ""
                marked |= bool(mark)
                cells += [f"{fmt(ms, 1)}{mark if ms is not None else ''}",
                          fmt(ratio(base["wall_ms"] if base else None, ms), 2, "x")]
                times.append(ms)
            any_row = o or next((r for r in (self.torch_e2e(m, n) for m in modes) if r), None)
            if any_row is None:
                continue
            computed = any_row["computed"]
            steps = any_row["steps"]
            om = o["loop_ms"] if o else None
            out.append(
                f"| {n} | {computed} of {steps} | {fmt(om, 1)} | "
                f"{fmt(ratio(base_ours['loop_ms'] if base_ours else None, om), 2, 'x')} | "
                f"{steps / computed:.2f}x | " + " | ".join(cells) + " | "
                + " | ".join(fmt(ratio(t, om), 2, "x") for t in times) + " |")
        if marked:
            out.append("")
            out.append("\\* the fast model structure (its conditioning precomputed in a set-up "
                       "that is not in its time, as our workspace build is not in ours).")
        setups = self.e2e_setups()
        if setups:
            out += ["", setups]
        estimate = self.e2e_estimate(sorted(ns))
        if estimate:
            out += [""] + estimate
        return "\n".join(out)

    def e2e_setups(self):
        """The set-up times the loops above leave out: our workspace build (allocation, x_T,
        tables, graph capture) and the fast PyTorch structure's conditioning table, the
        largest of each side's rows."""
        ours = [r["setup_ms"] for r in (self.ours or {}).get("e2e", [])
                if r.get("setup_ms") is not None]
        theirs = [r["setup_ms"] for r in (self.torch or {}).get("e2e", [])
                  if r.get("setup_ms") is not None]
        if not ours and not theirs:
            return None
        return (f"Set-up, not in the times above (the largest of the runs): ours "
                f"{fmt(max(ours) if ours else None, 1)} ms (workspace: allocation, x_T, "
                f"tables, graph capture); PyTorch's fast structure "
                f"{fmt(max(theirs) if theirs else None, 1)} ms (its conditioning table; graph "
                f"capture and compilation not counted).")

    def e2e_estimate(self, ns):
        """PyTorch's loop at its fastest steps: for each (mode, structure) with both a full
        and a reuse step timed at 2 rows, computing steps x its full step + reuse steps x its
        reuse step (both of one pair: a structure's reuse step reads its own cache), the
        smallest. An estimate from step times, beside our measured loop."""
        pairs = {}
        for r in (self.torch or {}).get("steps", []):
            if r["rows"] == 2 and r["kind"] in ("full", "reuse") and r.get("median_ms"):
                key = (r["mode"], r.get("variant", "plain"))
                pairs.setdefault(key, {})[r["kind"]] = r["median_ms"]
        pairs = {k: v for k, v in pairs.items() if len(v) == 2}
        if not pairs:
            return []
        lines = []
        for n in ns:
            o = self.our_e2e(n)
            if not o:
                continue
            (mode, variant), t = min(
                pairs.items(),
                key=lambda kv: o["computed"] * kv[1]["full"] + o["reused"] * kv[1]["reuse"])
            est = o["computed"] * t["full"] + o["reused"] * t["reuse"]
            lines.append(
                f"- N={n}: PyTorch's fastest steps at 2 rows ({mode}, {variant}), "
                f"{o['computed']} x {t['full']:.3f} ms + {o['reused']} x {t['reuse']:.3f} ms "
                f"= {est:.1f} ms (an estimate from step times); ours {o['loop_ms']:.1f} ms, "
                f"{fmt(ratio(est, o['loop_ms']), 2, 'x')}")
        return lines

    def attention_table(self):
        ours, sd = self.our_attention(), self.sdpa()
        keys = sorted(set(ours) | set(sd))
        if not keys:
            return None
        out = ["| B | H | T | d | ours (us) | ours TFLOP/s | kernel | SDPA (us) | SDPA TFLOP/s | "
               "SDPA backend | ours vs SDPA |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in keys:
            o, s = ours.get(key), sd.get(key)
            om = o["median_ms"] if o else None
            sm = s["median_ms"] if s else None
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | "
                       f"{fmt(om * 1e3 if om else None, 1)} | {fmt(o['tflops'] if o else None, 1)} | "
                       f"{o.get('impl', 'custom') if o else '—'} | "
                       f"{fmt(sm * 1e3 if sm else None, 1)} | {fmt(s['tflops'] if s else None, 1)} | "
                       f"{s.get('backend', 'default') if s else '—'} | "
                       f"{fmt(ratio(sm, om), 2, 'x')} |")
        return "\n".join(out)

    def kernels_table(self):
        if not self.ours or not self.ours.get("kernels"):
            return None
        c = self.ours.get("ceilings") or {}
        # memory_best: the best of the memory probes (fora bench after session 8); copy: the
        # one copy of earlier JSONs.
        gemm, memory = c.get("gemm"), c.get("memory_best") or c.get("copy")
        out = [f"Ceilings measured in the same run: {gemm['what'] if gemm else 'GEMM'} "
               f"{fmt(gemm['tflops'] if gemm else None, 0)} TFLOP/s; memory "
               f"{memory['what'] if memory else ''} {fmt(memory['gbps'] if memory else None, 0)} GB/s "
               f"(memory-bound rows' % ceiling is of this).",
               "",
               "| kernel | rows | shape | impl | time (us) | rate | % ceiling | ours vs best cuBLASLt |",
               "|---|---|---|---|---|---|---|---|"]
        for k in self.ours["kernels"]:
            ms = k.get("median_ms")
            if k["bound"] == "compute":
                rate = fmt(k["tflops"], 1, " TFLOP/s")
            else:
                rate = fmt(k["gbps"], 0, " GB/s")
            out.append(f"| {k['name']} | {k['rows']} | {k['shape']} | {k['impl']} | "
                       f"{fmt(ms * 1e3 if ms is not None else None, 1)} | {rate} | "
                       f"{fmt(k.get('pct_ceiling'), 1, '%')} | {fmt(k.get('vs_cublaslt'), 2, 'x')} |")
        return "\n".join(out)

    def notes(self):
        lines = []
        for name, d in (("ours", self.ours), ("PyTorch", self.torch)):
            if not d:
                continue
            for e in d.get("errors", []):
                what = e.get("what", DASH)
                where = f"{e['section']} / " if "section" in e else ""
                lines.append(f"- {name} FAILED: {where}{what}: {e['error']}")
            for s in d.get("skipped", []):
                lines.append(f"- {name} skipped: {s['what']} ({s['why']})")
        return "\n".join(lines) if lines else None

    def markdown(self):
        parts = ["# DiT + FORA: fora vs PyTorch", "", self.header(), "",
                 "## Targets (issue 5)", "", self.targets(), "",
                 "## Per step (ms; ratios = PyTorch time / ours)", "", self.steps_table()]
        e2e_gemms = sorted({r["gemm"] for r in (self.ours or {}).get("e2e", [])})
        e2e_title = "## End to end (one image with CFG, DDPM)"
        if e2e_gemms:
            e2e_title += f" — our runs with GEMM `{', '.join(e2e_gemms)}`"
        for title, table in ((e2e_title, self.e2e_table()),
                             ("## Attention: ours vs PyTorch SDPA", self.attention_table()),
                             ("## Our kernels", self.kernels_table()),
                             ("## Failed or skipped", self.notes())):
            if table:
                parts += ["", title, "", table]
        return "\n".join(parts) + "\n"

    def series(self):
        """Latency series for the plot: label -> [(rows, ms)]."""
        out = {}
        for kind in ("full", "reuse"):
            pts = [(r, self.our_step(r, kind)) for r in self.rows()]
            out[f"fora {kind}"] = [(r, v) for r, v in pts if v is not None]
            for mode in MODES:
                pts = [(r, self.torch_step(mode, r, kind)) for r in self.rows()]
                out[f"PyTorch {mode} {kind}"] = [(r, v) for r, v in pts if v is not None]
        return {k: v for k, v in out.items() if v}

    def plot(self, path):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(f"bench_report: matplotlib is not installed; no plot written to {path}",
                  file=sys.stderr)
            return False
        series = self.series()
        if not series:
            print("bench_report: no step latencies to plot", file=sys.stderr)
            return False
        fig, ax = plt.subplots(figsize=(7.5, 5))
        styles = {"fora": dict(color="tab:red", linewidth=2.5), "eager": dict(color="tab:blue"),
                  "graph": dict(color="tab:green"), "compile": dict(color="tab:purple"),
                  "compile_graph": dict(color="tab:orange")}
        for label, pts in series.items():
            key = "fora" if label.startswith("fora") else label.split()[1]
            ls = "-" if label.endswith("full") else "--"
            xs, ys = zip(*pts)
            ax.plot(xs, ys, ls, marker="o", label=label, **styles[key])
        ax.set_xscale("log", base=2)
        ticks = sorted({r for pts in series.values() for r, _ in pts})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("model rows per step (CFG half included)")
        ax.set_ylabel("step latency (ms)")
        d = self.ours or self.torch
        dev = (d.get("device") or {}).get("name", "")
        arch = (d.get("model") or {}).get("arch", "")
        ax.set_title(f"{arch} step latency, {dev} ({d.get('date', '')})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ours", default="target/bench.json", help="JSON of fora bench")
    p.add_argument("--torch", default="target/bench_torch.json", help="JSON of bench_torch.py")
    p.add_argument("--md", default=None, help="also write the Markdown here")
    p.add_argument("--plot", default=None, help="PNG of step latency vs rows (needs matplotlib)")
    p.add_argument("--gemm", default=None, choices=["custom", "cublaslt", "wgmma", "tma", "tma_mc", "tuned"],
                   help="our GEMM implementation to report (default: the first timed, fora bench's default; "
                        "the names of `fora bench --gemm`, or `tuned` for `fora bench --tune`)")
    a = p.parse_args(argv)
    ours = load(a.ours, "fora-bench/1")
    torch = load(a.torch, "fora-bench-torch/1")
    if ours is None and torch is None:
        print("bench_report: neither JSON exists: nothing to report", file=sys.stderr)
        return 2
    # A file with the right schema but fields missing, of the wrong type, or zero where a
    # count divides (e.g. no computing steps).
    malformed = (KeyError, TypeError, AttributeError, ValueError, IndexError, ArithmeticError,
                 RecursionError)
    try:
        r = Report(ours, torch, a.gemm)
        text = r.markdown()
    except malformed as e:
        raise SystemExit(f"bench_report: {a.ours} / {a.torch}: a malformed report "
                         f"({type(e).__name__}: {e})")
    print(text)
    if a.md:
        try:
            os.makedirs(os.path.dirname(a.md) or ".", exist_ok=True)
            with open(a.md, "w") as f:
                f.write(text)
        except OSError as e:
            raise SystemExit(f"bench_report: cannot write {a.md}: {e}")
    try:
        if a.plot and r.plot(a.plot):
            print(f"bench_report: plot in {a.plot}", file=sys.stderr)
    except OSError as e:
        raise SystemExit(f"bench_report: cannot write {a.plot}: {e}")
    except malformed as e:
        raise SystemExit(f"bench_report: {a.ours} / {a.torch}: a malformed report for the plot "
                         f"({type(e).__name__}: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
