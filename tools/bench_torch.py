#!/usr/bin/env python3
"""The PyTorch reference timings next to `fora bench`, on the same card in the same device call.

The model is the plain PyTorch DiT of tools/dit_torch.py (written from the published
architecture, with FORA caching), in bfloat16. What is timed, with the same method as the Rust
harness (CUDA events between back-to-back runs, warm-up runs first, median of --runs):

- a sampler step at each batch of model rows (rows include the CFG half: even rows = rows/2
  images with CFG), full (FORA computing step: every block runs and fills the cache) and
  reuse (FORA reuse step), in four modes:
    eager          plain PyTorch;
    graph          the step captured once as a CUDA graph and replayed;
    compile        torch.compile (default mode, static shapes; slow to compile, so only
                   --compile-batches);
    compile_graph  the compiled step captured as a CUDA graph (same compilation; CUDA only);
  and two model structures (--variants):
    plain    the official structure (tools/dit_torch.py): the reuse step recomputes the
             embeddings and every adaLN Linear, the computing step copies block outputs into
             the cache;
    fast     the same maths as a capable PyTorch user runs it (tools/dit_torch_fast.py):
             every step's conditioning computed once per run (its time is the set-up, as
             fora's workspace build is), block outputs written into the cache, in-place reuse
             adds, SDPA on the fastest backend timed below (--fast-sdpa);
  A step is what the sampler does per step on both sides: forward_with_cfg on [x; x] (the
  official CFG, eps channels 0..2 guided), then the DDPM update (learned-range variance) of the
  conditional rows with fresh Gaussian noise. The step's timestep and coefficients are copied
  on the device from a per-step table (outside the graph), as the Rust backend does.
- PyTorch SDPA (F.scaled_dot_product_attention) at (B, heads, tokens, head_dim), inputs rotated
  through copies larger than L2, per-launch time from CUDA-graph replays (as the Rust harness
  times its kernels).
- end to end: a 250-step DDPM loop for one image with CFG (2 rows), FORA N = 1 and 3, in the
  eager and CUDA-graph modes, and with the compiled steps (compile, compile_graph) where 2 rows
  are compiled with the reuse step, each variant; wall time including the copy of the final
  latents to the host (the fast variant's set-up is reported beside it, not in it).

Weights: by default random weights generated here (nn default initialisation) with the same
shapes and dtype as the Rust benchmark's random DiT-XL/2 (timings depend on shapes and dtype
only); --weights loads a safetensors checkpoint (e.g. written by `fora bench --save-weights`).

A time budget (--budget-s, default 150 s including start-up) keeps the run bounded: an item is
only started when its estimated cost fits in what is left; skipped items are listed in the JSON
(never invented). Every item that fails is recorded with its error and the run goes on.

    python3 tools/bench_torch.py --json target/bench_torch.json
    python3 tools/bench_torch.py --quick
    python3 tools/bench_torch.py --device cpu --arch depth=2,hidden=64,heads=4,patch=2 \\
        --batches 2,4 --steps 10 --runs 3 --warmup 1 --modes eager   # a smoke test without a GPU
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

# The budget counts from here, before torch's import (seconds on a cold machine), as the
# device suite's bound on the process does.
_STARTED = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_torch  # noqa: E402
from dit_torch import DiT, parse_arch  # noqa: E402
from dit_torch_fast import FastFora, sdpa_backend  # noqa: E402

SCHEMA = "fora-bench-torch/1"
# Step modes: plain PyTorch, the step captured as a CUDA graph, torch.compile, and torch.compile
# with the compiled step captured as a CUDA graph (the strongest at few rows).
MODES = ("eager", "graph", "compile", "compile_graph")
# End to end: the compiled modes run with the compiled steps (2 rows in --compile-batches and
# --compile-reuse yes).
E2E_MODES = ("eager", "graph", "compile", "compile_graph")
# Model structures: the official one, and the same maths run as a capable user would.
VARIANTS = ("plain", "fast")
FREQ_DIM = 256


def ints(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def words(allowed):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return values
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="safetensors checkpoint (official key layout); default random")
    p.add_argument("--arch", default=None, help="architecture (default DiT-XL/2, or the checkpoint's)")
    p.add_argument("--input-size", type=int, default=32, help="latent size of the random model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test only)")
    p.add_argument("--quick", action="store_true",
                   help="rows 2 and 64, compile at rows 2 only, end to end N=3 eager only")
    p.add_argument("--batches", type=ints, default=None, help="model rows (default 2,16,64,256)")
    p.add_argument("--compile-batches", type=ints, default=None, help="rows for torch.compile (default 2,64)")
    p.add_argument("--modes", type=words(MODES), default=None,
                   help="step modes (default eager,graph,compile,compile_graph)")
    p.add_argument("--variants", type=words(VARIANTS), default=None,
                   help="model structures (default plain,fast): plain is the official structure "
                        "(tools/dit_torch.py), fast the same maths as a capable PyTorch user "
                        "runs it (tools/dit_torch_fast.py)")
    p.add_argument("--fast-sdpa", choices=["auto", "default", "flash", "efficient", "cudnn"],
                   default="auto",
                   help="SDPA backend of the fast variant (auto: the fastest timed at the "
                        "nearest batch, else torch's default)")
    p.add_argument("--compile-reuse", choices=["yes", "no"], default="yes",
                   help="also compile and time the reuse step")
    p.add_argument("--sdpa", type=str, default=None,
                   help="SDPA shapes B:H:T:d separated by commas (default 2:H:T:d,256:H:T:d,32:H:4T:d)")
    p.add_argument("--steps", type=int, default=250, help="end-to-end DDPM steps")
    p.add_argument("--intervals", type=ints, default=None, help="end-to-end FORA N (default 1,3)")
    p.add_argument("--e2e-modes", type=words(E2E_MODES), default=None,
                   help="end-to-end modes (default eager,graph,compile_graph; the compiled "
                        "ones need rows 2 in --compile-batches and --compile-reuse yes)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="stop starting new items after this many seconds from start-up")
    p.add_argument("--compile-estimate-s", type=float, default=75.0,
                   help="seconds a full-step torch.compile is assumed to take (budget planning)")
    p.add_argument("--json", default="target/bench_torch.json")
    a = p.parse_args(argv)
    q = a.quick
    a.batches = a.batches or ([2, 64] if q else [2, 16, 64, 256])
    a.compile_batches = a.compile_batches or ([2] if q else [2, 64])
    a.modes = a.modes or list(MODES)
    a.variants = a.variants or list(VARIANTS)
    a.intervals = a.intervals or ([3] if q else [1, 3])
    a.e2e_modes = a.e2e_modes or (["eager"] if q else ["eager", "graph", "compile_graph"])
    if a.runs < 1 or a.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if not 1 <= a.steps <= 1000:
        p.error("--steps must be 1..1000")
    if not math.isfinite(a.cfg_scale):
        p.error("--cfg-scale must be finite")
    return a


# ---------------------------------------------------------------------------------------------
# Diffusion coefficients (the official linear schedule, respacing and DDPM p_sample terms).

def space_timesteps(num_timesteps, count):
    """The official space_timesteps for one section of `count` steps (fractional stride)."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    taken, cur = set(), 0.0
    for _ in range(count):  # accumulated, as the official loop (rounding may differ otherwise)
        taken.add(round(cur))
        cur += stride
    return taken


def ddpm_table(steps, learn_sigma):
    """Per loop step k (i = steps-1-k): original timestep and the 7 update coefficients
    [sqrt_recip_abar, sqrt_recipm1_abar, post_coef1, post_coef2, max_log, min_log, noise]."""
    n = 1000
    base = [1e-4 + (0.02 - 1e-4) * j / (n - 1) for j in range(n)]
    use = space_timesteps(n, steps)
    abar_orig, acc = [], 1.0
    for b in base:
        acc *= 1.0 - b
        abar_orig.append(acc)
    betas, tmap, last = [], [], 1.0
    for j, a in enumerate(abar_orig):
        if j in use:
            betas.append(1.0 - a / last)
            last = a
            tmap.append(j)
    abar, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        abar.append(acc)
    prev = [1.0] + abar[:-1]
    post_var = [b * (1 - p) / (1 - a) for b, p, a in zip(betas, prev, abar)]
    clipped = [post_var[1] if len(post_var) > 1 else post_var[0]] + post_var[1:]
    rows = []
    for k in range(steps):
        i = steps - 1 - k
        max_log = math.log(betas[i])
        min_log = math.log(clipped[i]) if clipped[i] > 0 else max_log
        if not learn_sigma:  # FIXED_LARGE: log of [post_var[1], betas[1:]]
            max_log = math.log(post_var[1] if i == 0 and steps > 1 else betas[i])
        rows.append((tmap[i], [
            math.sqrt(1.0 / abar[i]),
            math.sqrt(1.0 / abar[i] - 1.0),
            betas[i] * math.sqrt(prev[i]) / (1.0 - abar[i]),
            (1.0 - prev[i]) * math.sqrt(1.0 - betas[i]) / (1.0 - abar[i]),
            max_log,
            min_log,
            1.0 if i != 0 else 0.0,
        ]))
    return rows


def timestep_features_on_device(t, dim=FREQ_DIM, max_period=10000):
    """dit_torch.timestep_features with the frequencies made on t's device. The official code
    makes them on the host and copies them to the GPU every forward: a synchronizing copy that
    CUDA-graph capture forbids, and a cost that only slows PyTorch down, so every mode here
    uses this (same values)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


dit_torch.timestep_features = timestep_features_on_device


def fora_computes(i, steps, interval):
    """The official static FORA policy (with loop index i from steps-1 down to 0)."""
    return i == steps - 1 or i % interval == 0


def macs_per_row(cfg):
    """Multiply-accumulates of one forward row: the same formula as DitConfig::macs_per_row."""
    t = (cfg["input_size"] // cfg["patch"]) ** 2
    d, m = cfg["hidden"], cfg["mlp_ratio"] * cfg["hidden"]
    out_ch = 2 * cfg["in_channels"] if cfg["learn_sigma"] else cfg["in_channels"]
    per_block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * m + d * 6 * d
    embed = t * cfg["in_channels"] * cfg["patch"] ** 2 * d
    timestep = 256 * d + d * d  # the timestep MLP on its 256 frequencies
    fin = d * 2 * d + t * d * cfg["patch"] ** 2 * out_ch
    return cfg["depth"] * per_block + embed + timestep + fin


# ---------------------------------------------------------------------------------------------

class Stepper:
    """One sampler step on static buffers, so that it can be captured as a CUDA graph."""

    def __init__(self, model, rows, cfg_scale, table, device, seed, variant="plain",
                 table_steps=None, sdpa=None):
        """variant: "plain" (DiT.forward_with_cfg) or "fast" (FastFora); table_steps: how
        many of the table's steps a run selects (step k reads step k % table_steps; fewer
        bound the fast variant's precomputed conditioning)."""
        cfg = model.config
        table = table[: table_steps or len(table)]
        self.model = model
        self.guided = rows % 2 == 0
        self.images = rows // 2 if self.guided else rows
        self.channels = cfg["in_channels"]
        self.learn_sigma = cfg["learn_sigma"]
        self.cfg_scale = cfg_scale
        self.rows = rows
        self.steps = len(table)
        h = cfg["input_size"]
        gen = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(self.images, self.channels, h, h, device=device, generator=gen)
        self.x_init = self.x.clone()
        labels = [b % cfg["num_classes"] for b in range(self.images)]
        if self.guided:
            labels += [cfg["num_classes"]] * self.images
        self.y = torch.tensor(labels, dtype=torch.long, device=device)
        self.t = torch.zeros(rows, dtype=torch.long, device=device)
        self.coef = torch.zeros(7, dtype=torch.float32, device=device)
        self.table_t = torch.tensor([r[0] for r in table], dtype=torch.long, device=device)
        self.table_coef = torch.tensor([r[1] for r in table], dtype=torch.float32, device=device)
        self.dtype = next(model.parameters()).dtype
        # The fast variant's conditioning is computed here, once: its cost, as fora's
        # workspace build, is set-up and not part of a step.
        self.fast, self.setup_ms = None, None
        self.sdpa = sdpa if variant == "fast" else None  # the fast variant's SDPA backend
        if variant == "fast":
            t0 = time.perf_counter()
            self.fast = FastFora(model, labels, [r[0] for r in table], sdpa=sdpa)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.setup_ms = (time.perf_counter() - t0) * 1e3
        elif variant != "plain":
            raise ValueError(f"unknown variant {variant!r}")

    def set_step(self, k):
        """Selects loop step k with device-side copies only (no host synchronization)."""
        k %= self.steps
        self.t.copy_(self.table_t[k].expand(self.rows))
        self.coef.copy_(self.table_coef[k])
        if self.fast is not None:
            self.fast.set_step(k)

    def reset(self):
        self.x.copy_(self.x_init)

    def body(self, cache):
        """forward_with_cfg (or forward) and the DDPM update of the conditional rows; cache:
        "compute" (fill the FORA cache), "reuse", or None (compute, no cache: FORA N = 1)."""
        xin = self.x.to(self.dtype)
        if self.fast is not None:
            compute, keep = cache != "reuse", cache is not None
            if self.guided:
                out = self.fast.forward_with_cfg(torch.cat([xin, xin]), self.cfg_scale, compute,
                                                 keep=keep)
            else:
                out = self.fast.forward(xin, compute, keep)
        elif self.guided:
            out = self.model.forward_with_cfg(torch.cat([xin, xin]), self.t, self.y,
                                              self.cfg_scale, cache=cache)
        else:
            out = self.model(xin, self.t, self.y, cache=cache)
        out = out[: self.images].float()
        c = self.coef
        eps = out[:, : self.channels]
        if self.learn_sigma:
            frac = (out[:, self.channels:] + 1) / 2
            log_var = frac * c[4] + (1 - frac) * c[5]
        else:
            log_var = c[4].expand_as(eps)
        x0 = c[0] * self.x - c[1] * eps
        mean = c[2] * x0 + c[3] * self.x
        self.x.copy_(mean + c[6] * torch.exp(0.5 * log_var) * torch.randn_like(self.x))


def cuda_graph(fn):
    """fn() captured as a CUDA graph after the side-stream warm-up torch requires, and
    replayed once (the first replay uploads the graph: not in anything timed after)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def clear_cache(model):
    for block in model.blocks:
        block.cached_attn = None
        block.cached_mlp = None


def summarize(samples):
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "mean_ms": statistics.fmean(samples),
        "runs": len(samples),
    }


def time_runs(fn, warmup, runs, cuda):
    """fn(i) for i < warmup untimed, then `runs` back-to-back runs with an event between each."""
    for i in range(warmup):
        fn(i)
    if cuda:
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(runs + 1)]
        events[0].record()
        for i in range(runs):
            fn(warmup + i)
            events[i + 1].record()
        torch.cuda.synchronize()
        samples = [events[i].elapsed_time(events[i + 1]) for i in range(runs)]
    else:
        samples = []
        for i in range(runs):
            t0 = time.perf_counter()
            fn(warmup + i)
            samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def launches_per_graph(single_ms, copies):
    """As fora::bench::launches_per_graph: about 0.2 ms per replay, >= copies, <= 64."""
    by_time = math.ceil(0.2 / single_ms) if single_ms > 0 and math.isfinite(single_ms) else 64
    return max(1, min(64, max(min(by_time, 64), copies)))


def sdpa_backends(cuda):
    """The SDPA backends timed: torch's default choice, then each fused backend on its own
    (on a Hopper cuDNN's attention can beat flash, which the default prefers), so that the
    report compares with the fastest PyTorch has. On the CPU only the default."""
    if not cuda:
        return ["default"]
    return ["default", "flash", "efficient", "cudnn"]


def time_alone(fn, copies, warmup, runs, cuda):
    """Per-launch time of fn(i) measured alone, as the Rust harness does it: n launches
    captured in one CUDA graph (host launch costs excluded), replays timed back to back, each
    sample divided by n. Returns (stats, n). On the CPU: plain timing, n = 1."""
    if not cuda:
        return time_runs(fn, warmup, runs, cuda), 1
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(max(warmup, 1)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(0)
    end.record()
    end.synchronize()
    n = launches_per_graph(start.elapsed_time(end), copies)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fn(i)
    stats = time_runs(lambda i: graph.replay(), warmup, runs, cuda)
    del graph
    return {k: (v / n if k != "runs" else v) for k, v in stats.items()}, n


class Bench:
    def __init__(self, args):
        self.args = args
        self.start = _STARTED
        # Rows where the fast variant's SDPA backend failed under torch.compile: torch's
        # default there instead.
        self.sdpa_refused = set()
        self.cuda = args.device.startswith("cuda")
        self.out = {
            "schema": SCHEMA,
            "tool": "tools/bench_torch.py",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": None,
            "model": None,
            "settings": {
                "warmup": args.warmup,
                "runs": args.runs,
                "cfg_scale": args.cfg_scale,
                "budget_s": args.budget_s,
                "quick": args.quick,
                "variants": {
                    "plain": "the official structure (tools/dit_torch.py)",
                    "fast": "the same maths with conditioning precomputed per run, block "
                            "outputs written into the cache, in-place reuse adds, SDPA on "
                            "the fastest backend (tools/dit_torch_fast.py)",
                },
                "step": "forward_with_cfg on [x; x] + DDPM update (learned-range variance)",
                "timing": "CUDA events, back-to-back runs, median" if self.cuda
                else "host wall clock per run, median (CPU smoke test)",
            },
            "steps": [],
            "sdpa": [],
            "e2e": [],
            "skipped": [],
            "errors": [],
            "elapsed_s": None,
        }

    def left(self):
        return self.args.budget_s - (time.perf_counter() - self.start)

    def fits(self, what, estimate_s):
        if self.left() >= estimate_s:
            return True
        self.out["skipped"].append({
            "what": what,
            "why": f"time budget: {self.left():.0f} s left of {self.args.budget_s:.0f} s, "
                   f"needs ~{estimate_s:.0f} s",
        })
        print(f"bench_torch: skip {what} (time budget)", file=sys.stderr)
        return False

    def error(self, what, e):
        print(f"bench_torch: {what} FAILED: {e!r}", file=sys.stderr)
        self.out["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}"})
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def save(self):
        self.out["elapsed_s"] = time.perf_counter() - self.start
        path = self.args.json
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.out, f, indent=2)
        os.replace(tmp, path)

    # -----------------------------------------------------------------------------------------

    def load_model(self):
        a = self.args
        if a.weights:
            model = DiT.from_safetensors(a.weights, arch=a.arch, device=a.device,
                                         dtype=torch.bfloat16)
            source = a.weights
        else:
            arch = parse_arch(a.arch or "DiT-XL/2")
            torch.manual_seed(a.seed)
            with torch.device(a.device):
                model = DiT(arch["depth"], arch["hidden"], arch["heads"], arch["patch"],
                            in_channels=4, input_size=a.input_size, num_classes=1000,
                            learn_sigma=True)
            model = model.to(torch.bfloat16).eval()
            source = f"random (python, seed {a.seed})"
        cfg = model.config
        self.model = model
        self.out["model"] = {
            "arch": model.metadata()["fora.arch"],
            "input_size": cfg["input_size"],
            "tokens": (cfg["input_size"] // cfg["patch"]) ** 2,
            "hidden": cfg["hidden"],
            "depth": cfg["depth"],
            "heads": cfg["heads"],
            "macs_per_row": macs_per_row(cfg),
            "weights": source,
            "dtype": "bfloat16",
        }
        if self.cuda:
            props = torch.cuda.get_device_properties(torch.device(a.device))
            self.out["device"] = {
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "sm_count": props.multi_processor_count,
                "memory_bytes": props.total_memory,
            }
        else:
            self.out["device"] = {"name": "cpu"}
        self.table = ddpm_table(a.steps, cfg["learn_sigma"])

    def fast_sdpa(self, rows):
        """The fast variant's SDPA backend at `rows`: --fast-sdpa, or with auto the fastest
        timed at the model's heads, tokens and head size and the batch nearest `rows` (None:
        torch's default choice)."""
        if rows in self.sdpa_refused:
            return None
        if self.args.fast_sdpa != "auto":
            return self.args.fast_sdpa
        m = self.out["model"]
        shape = (m["heads"], m["tokens"], m["hidden"] // m["heads"])
        timed = [r for r in self.out["sdpa"]
                 if (r["heads"], r["tokens"], r["head_dim"]) == shape and r.get("median_ms")]
        if not timed:
            return None
        nearest = min(timed, key=lambda r: abs(math.log(r["batch"] / rows)))["batch"]
        return min((r for r in timed if r["batch"] == nearest),
                   key=lambda r: r["median_ms"])["backend"]

    def stepper(self, rows, seed_offset=0, variant="plain", table_steps=None):
        def make(sdpa):
            clear_cache(self.model)
            return Stepper(self.model, rows, self.args.cfg_scale, self.table, self.args.device,
                           self.args.seed + seed_offset, variant=variant,
                           table_steps=table_steps, sdpa=sdpa)

        sdpa = self.fast_sdpa(rows) if variant == "fast" else None
        st = make(sdpa)
        if sdpa not in (None, "default"):
            # The backend was timed on contiguous q, k, v; the model's are strided views of
            # one qkv product, which a backend may refuse: then torch's own choice.
            try:
                st.set_step(0)
                st.body("compute")
            except RuntimeError as e:
                note = {"what": f"SDPA backend {sdpa} for the fast variant at {rows} rows",
                        "why": f"it failed on the model's q, k, v ({e}); torch's default instead"}
                if note not in self.out["skipped"]:
                    self.out["skipped"].append(note)
                st = make(None)
        return st

    def step_stepper(self, rows, variant):
        """A stepper for timing single steps: its table covers the steps the timing selects."""
        return self.stepper(rows, variant=variant,
                            table_steps=self.args.warmup + self.args.runs + 2)

    def record_step(self, mode, kind, rows, variant, stats, compile_s=None, sdpa=None):
        row = {"mode": mode, "variant": variant, "kind": kind, "rows": rows,
               "compile_s": compile_s, "sdpa": sdpa}
        row.update(stats)
        self.out["steps"].append(row)
        print(f"bench_torch: {mode:13s} {variant:5s} {kind:5s} rows {rows:4d}: "
              f"{stats['median_ms']:.3f} ms", file=sys.stderr)

    def run_eager(self, rows, variant):
        a = self.args
        st = self.step_stepper(rows, variant)

        def full(i):
            st.set_step(i)
            st.body("compute")

        def reuse(i):
            st.set_step(i)
            st.body("reuse")

        st.set_step(0)
        st.body("compute")  # the first reuse step must find a cache
        self.record_step("eager", "full", rows, variant,
                         time_runs(full, a.warmup, a.runs, self.cuda), sdpa=st.sdpa)
        self.record_step("eager", "reuse", rows, variant,
                         time_runs(reuse, a.warmup, a.runs, self.cuda), sdpa=st.sdpa)

    def capture(self, st):
        """CUDA graphs of the computing and the reuse step of `st`; the reuse graph reads the
        cache tensors the compute graph writes (its replay in cuda_graph fills them)."""
        st.set_step(0)
        g_full = cuda_graph(lambda: st.body("compute"))
        return g_full, cuda_graph(lambda: st.body("reuse"))

    def run_graph(self, rows, variant):
        a = self.args
        st = self.step_stepper(rows, variant)
        g_full, g_reuse = self.capture(st)

        def full(i):
            st.set_step(i)
            g_full.replay()

        def reuse(i):
            st.set_step(i)
            g_reuse.replay()

        self.record_step("graph", "full", rows, variant,
                         time_runs(full, a.warmup, a.runs, self.cuda), sdpa=st.sdpa)
        self.record_step("graph", "reuse", rows, variant,
                         time_runs(reuse, a.warmup, a.runs, self.cuda), sdpa=st.sdpa)
        del g_full, g_reuse

    def run_compile(self, rows, variant, kinds):
        """torch.compile of each step kind in `kinds` on one stepper, timed as it is (mode
        compile) and captured as a CUDA graph (mode compile_graph, CUDA only): one compilation
        serves both. At 2 rows with both kinds, the end-to-end loop in the compiled modes asked
        for (--e2e-modes) replays them too."""
        a = self.args
        torch._dynamo.reset()  # earlier compilations are done with: no cache limit to hit
        loop = rows == 2 and kinds == ["full", "reuse"]
        st = self.stepper(rows, variant=variant,
                          table_steps=None if loop else a.warmup + a.runs + 2)
        # Eager first: the cache exists before anything is traced (the compiled reuse step
        # reads it; a cache made during the first compiled call would change what the trace
        # guards on and recompile).
        st.set_step(0)
        st.body("compute")
        compiled, graphs = {}, {}
        for kind in kinds:
            # The full step writes the cache, as eager, graph and fora's computing steps do.
            cache = "compute" if kind == "full" else "reuse"

            def body(cache=cache):
                st.body(cache)

            fn = compiled[kind] = torch.compile(body, dynamic=False)
            t0 = time.perf_counter()
            st.set_step(0)
            fn()
            if self.cuda:
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0

            def run(i, fn=fn):
                st.set_step(i)
                fn()

            if "compile" in a.modes:
                self.record_step("compile", kind, rows, variant,
                                 time_runs(run, a.warmup, a.runs, self.cuda), compile_s, st.sdpa)
            if "compile_graph" in a.modes and self.cuda:
                graph = graphs[kind] = cuda_graph(fn)

                def replay(i, graph=graph):
                    st.set_step(i)
                    graph.replay()

                self.record_step("compile_graph", kind, rows, variant,
                                 time_runs(replay, a.warmup, a.runs, self.cuda), compile_s,
                                 st.sdpa)
        # At N = 1 the loop runs a third compilation: the computing step without the cache.
        alone = {}
        if self.compiles_alone(rows, kinds):
            fn = alone["compile"] = torch.compile(lambda: st.body(None), dynamic=False)
            st.set_step(0)
            fn()
            if graphs and "compile_graph" in a.e2e_modes:
                alone["compile_graph"] = cuda_graph(fn).replay
        if loop and "compile" in a.e2e_modes:
            self.e2e_loops(st, "compile", variant, compiled["full"], compiled["reuse"],
                           alone.get("compile"))
        if loop and "compile_graph" in a.e2e_modes and graphs:
            self.e2e_loops(st, "compile_graph", variant, graphs["full"].replay,
                           graphs["reuse"].replay, alone.get("compile_graph"))
        del graphs, alone

    def compiles_alone(self, rows, kinds):
        """Whether run_compile(rows, kinds) also compiles the computing step without the
        cache, for the compiled end-to-end loops at N = 1."""
        a = self.args
        return rows == 2 and kinds == ["full", "reuse"] and 1 in a.intervals \
            and any(m in a.e2e_modes for m in ("compile", "compile_graph"))

    def run_sdpa(self):
        a = self.args
        m = self.out["model"]
        heads, tokens, hd = m["heads"], m["tokens"], m["hidden"] // m["heads"]
        if a.sdpa:
            shapes = []
            for part in a.sdpa.split(","):
                b, h, t, d = (int(v) for v in part.split(":"))
                shapes.append((b, h, t, d))
        else:
            shapes = [(2, heads, tokens, hd), (256, heads, tokens, hd), (32, heads, 4 * tokens, hd)]
        l2 = 0
        if self.cuda:
            l2 = getattr(torch.cuda.get_device_properties(torch.device(a.device)), "L2_cache_size", 0)
        rotate = max(4 * l2, 256 << 20)
        for (b, h, t, d), backend in ((s, k) for s in shapes for k in sdpa_backends(self.cuda)):
            what = f"sdpa {b}x{h}x{t}x{d} {backend}"
            if not self.fits(what, 5):
                continue
            try:
                set_bytes = 4 * b * h * t * d * 2  # q, k, v in, o out (bf16)
                copies = max(1, min(64, -(-rotate // set_bytes)))
                qkv = [torch.randn(3, b, h, t, d, device=a.device, dtype=torch.bfloat16)
                       for _ in range(copies)]

                def run(i):
                    q, k, v = qkv[i % copies]
                    with sdpa_backend(backend):
                        F.scaled_dot_product_attention(q, k, v)

                stats, n = time_alone(run, copies, a.warmup, a.runs, self.cuda)
                flops = 4.0 * b * h * t * t * d
                row = {"batch": b, "heads": h, "tokens": t, "head_dim": d, "backend": backend,
                       "flops": flops,
                       "tflops": flops / (stats["median_ms"] * 1e-3) / 1e12,
                       "launches_per_replay": n}
                row.update(stats)
                self.out["sdpa"].append(row)
                del qkv
                print(f"bench_torch: {what}: {stats['median_ms']:.3f} ms, "
                      f"{row['tflops']:.0f} TFLOP/s", file=sys.stderr)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                self.error(what, e)

    def run_e2e(self, mode, variant):
        a = self.args
        st = self.stepper(2, seed_offset=1, variant=variant)
        if mode == "graph":
            g_full, g_reuse = self.capture(st)
            run_full, run_reuse = g_full.replay, g_reuse.replay
            run_alone = None
            if 1 in self.args.intervals:
                run_alone = cuda_graph(lambda: st.body(None)).replay
        else:
            def run_full():
                st.body("compute")

            def run_reuse():
                st.body("reuse")

            def run_alone():
                st.body(None)

        self.e2e_loops(st, mode, variant, run_full, run_reuse, run_alone)

    def e2e_loops(self, st, mode, variant, run_full, run_reuse, run_alone):
        """The end-to-end DDPM loop at each FORA N asked for, on a 2-row stepper whose table
        covers every step: run_full() / run_reuse() run the selected step; at N = 1, where
        nothing reuses, every step is run_alone(), which writes no cache (as fora's loop at
        N = 1 has none)."""
        a = self.args
        for n in a.intervals:
            what = f"e2e {mode} {variant} N={n}"
            if not self.fits(what, 10 if mode in ("eager", "compile") else 4):
                continue
            try:
                st.reset()
                if self.cuda:
                    torch.cuda.synchronize()
                computed = 0
                t0 = time.perf_counter()
                for k in range(a.steps):
                    i = a.steps - 1 - k
                    st.set_step(k)
                    if k == 0 or fora_computes(i, a.steps, n):
                        # At N = 1 (run_alone given wherever 1 is among the intervals)
                        # nothing reuses: no cache is written.
                        (run_alone if n == 1 else run_full)()
                        computed += 1
                    else:
                        run_reuse()
                latents = st.x.cpu()
                wall_ms = (time.perf_counter() - t0) * 1e3
                self.out["e2e"].append({
                    "mode": mode, "variant": variant, "interval": n, "steps": a.steps,
                    "rows": 2, "computed": computed, "reused": a.steps - computed,
                    "wall_ms": wall_ms, "setup_ms": st.setup_ms, "sdpa": st.sdpa,
                    "finite": bool(torch.isfinite(latents).all()),
                })
                print(f"bench_torch: {what}: {wall_ms:.1f} ms ({computed} computing steps)",
                      file=sys.stderr)
            except Exception as e:  # noqa: BLE001
                self.error(what, e)

    # -----------------------------------------------------------------------------------------

    def main(self):
        a = self.args
        self.load_model()
        self.save()
        with torch.no_grad():
            self.run_sdpa()
            self.save()
            for mode in ("eager", "graph"):
                if mode not in a.modes:
                    continue
                if mode == "graph" and not self.cuda:
                    self.out["skipped"].append({"what": "graph mode", "why": "needs CUDA"})
                    continue
                for rows, variant in ((r, v) for r in a.batches for v in a.variants):
                    what = f"{mode} {variant} rows {rows}"
                    if not self.fits(what, 3 + 0.06 * rows):
                        continue
                    try:
                        getattr(self, f"run_{mode}")(rows, variant)
                    except Exception as e:  # noqa: BLE001
                        self.error(what, e)
                    clear_cache(self.model)
                    self.save()
            for mode, variant in ((m, v) for m in a.e2e_modes for v in a.variants):
                if mode in ("compile", "compile_graph"):
                    continue  # with the compiled steps at 2 rows, below
                if mode == "graph" and not self.cuda:
                    if variant == a.variants[0]:
                        self.out["skipped"].append({"what": "e2e graph", "why": "needs CUDA"})
                    continue
                try:
                    self.run_e2e(mode, variant)
                except Exception as e:  # noqa: BLE001
                    self.error(f"e2e {mode} {variant}", e)
                clear_cache(self.model)
                self.save()
            if "compile_graph" in a.modes and not self.cuda:
                self.out["skipped"].append({"what": "compile_graph mode", "why": "needs CUDA"})
            # The compiled end-to-end loops replay the compiled 2-row steps: say why not.
            for mode in (m for m in ("compile", "compile_graph") if m in a.e2e_modes):
                why = None
                if mode == "compile_graph" and "compile_graph" not in a.modes:
                    why = "--modes has no compile_graph"
                elif mode == "compile_graph" and not self.cuda:
                    why = "needs CUDA"
                elif "compile" not in a.modes and "compile_graph" not in a.modes:
                    why = "--modes compiles nothing"
                elif 2 not in a.compile_batches:
                    why = "2 rows are not in --compile-batches"
                elif a.compile_reuse != "yes":
                    why = "the reuse step is not compiled (--compile-reuse no)"
                if why:
                    self.out["skipped"].append({"what": f"e2e {mode}", "why": why})
            if "compile" in a.modes or ("compile_graph" in a.modes and self.cuda):
                kinds = ["full", "reuse"] if a.compile_reuse == "yes" else ["full"]
                # Variants outermost: the first variant named (e.g. fast) gets every batch
                # compiled before the budget reaches the next.
                for variant, rows in ((v, r) for v in a.variants for r in a.compile_batches):
                    what = f"compile {variant} {'+'.join(kinds)} rows {rows}"
                    estimate = a.compile_estimate_s * ((1.4 if len(kinds) == 2 else 1.0)
                                                       + 0.4 * self.compiles_alone(rows, kinds))
                    if not self.fits(what, estimate):
                        continue
                    try:
                        self.run_compile(rows, variant, kinds)
                    except Exception as e:  # noqa: BLE001
                        # The backend chosen for the fast variant (timed on contiguous q, k,
                        # v, checked eagerly) may refuse what the compiled graph hands it:
                        # compile again on torch's own choice.
                        sdpa = self.fast_sdpa(rows) if variant == "fast" else None
                        if sdpa not in (None, "default") \
                                and "attention" in str(e).lower() \
                                and self.fits(f"{what} on torch's SDPA choice", estimate):
                            self.out["skipped"].append({
                                "what": f"SDPA backend {sdpa} for the compiled fast variant "
                                        f"at {rows} rows",
                                "why": f"compiling with it failed ({type(e).__name__}: {e}); "
                                       "compiled again on torch's default"})
                            self.sdpa_refused.add(rows)
                            clear_cache(self.model)
                            try:
                                self.run_compile(rows, variant, kinds)
                            except Exception as e2:  # noqa: BLE001
                                self.error(what, e2)
                        else:
                            self.error(what, e)
                    clear_cache(self.model)
                    self.save()
        self.save()
        text = markdown(self.out)
        print(text)
        with open(os.path.splitext(a.json)[0] + ".md", "w") as f:
            f.write(text + "\n")
        print(f"bench_torch: done in {self.out['elapsed_s']:.1f} s; JSON in {a.json}",
              file=sys.stderr)
        return 1 if self.out["errors"] else 0


def fmt(v, digits=3):
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(out):
    m = out["model"] or {}
    dev = (out["device"] or {}).get("name", "—")
    lines = [f"# PyTorch reference: {m.get('arch', '—')} ({m.get('weights', '—')}, bf16) on {dev}, "
             f"torch {out['torch']}, {out['date']}", ""]
    macs = m.get("macs_per_row")
    lines += ["| mode | variant | kind | rows | median (ms) | TFLOP/s | compile (s) |",
              "|---|---|---|---|---|---|---|"]
    for r in out["steps"]:
        tf = None
        if macs and r["kind"] == "full" and r["median_ms"]:
            tf = 2 * macs * r["rows"] / (r["median_ms"] * 1e-3) / 1e12
        lines.append(f"| {r['mode']} | {r.get('variant', 'plain')} | {r['kind']} | {r['rows']} | "
                     f"{fmt(r['median_ms'])} | {fmt(tf, 1)} | {fmt(r['compile_s'], 1)} |")
    if out["sdpa"]:
        lines += ["", "| SDPA B | H | T | d | backend | median (ms) | TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in out["sdpa"]:
            lines.append(f"| {r['batch']} | {r['heads']} | {r['tokens']} | {r['head_dim']} | "
                         f"{r.get('backend', 'default')} | {fmt(r['median_ms'])} | "
                         f"{fmt(r['tflops'], 1)} |")
    if out["e2e"]:
        lines += ["", "| end to end | variant | N | steps | computing | wall (ms) | set-up (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for r in out["e2e"]:
            lines.append(f"| {r['mode']} | {r.get('variant', 'plain')} | {r['interval']} | "
                         f"{r['steps']} | {r['computed']} | {r['wall_ms']:.1f} | "
                         f"{fmt(r.get('setup_ms'), 1)} |")
    for s in out["skipped"]:
        lines.append(f"\nskipped: {s['what']} ({s['why']})")
    for e in out["errors"]:
        lines.append(f"\nFAILED: {e['what']}: {e['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("SKIP bench_torch: no CUDA device (use --device cpu for a smoke test)")
        sys.exit(0)
    sys.exit(Bench(args).main())
