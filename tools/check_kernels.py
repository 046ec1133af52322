#!/usr/bin/env python3
"""Compiles every kernels/*.cu for sm_80 and sm_90a (one compile a core; every nvcc and ptxas
warning an error) and checks what ptxas reports and what the machine code (SASS) shows. CI runs
it; build.rs only warns.

ptxas rules (from `ptxas -v`):
  no_local_memory      no function has a stack frame or spills registers (local memory).
  no_serialized_wgmma  ptxas serializes no kernel's wgmma (infos C7510-C7518, "wgmma.mma_async
                       instructions are serialized": a non-wgmma instruction may touch registers
                       of a wgmma in flight, or a wgmma is still in flight where a branch ends;
                       either way ptxas waits after every wgmma: correct, but without overlap).
  no_injected_arrive   ptxas injects no warpgroup.arrive (info C7519: registers a wgmma uses were
                       touched where the code has no wgmma fence, e.g. at a branch's join; it
                       also issued a dummy wgmma there on every tile of attention_tma before
                       session 14 peeled its last tile). The probes (*_probe), which test layouts
                       rather than speed, are exempt.

SASS rules: the order in which a kernel's hot loop issues its loads and its tensor-core
instructions, and instructions that must not be there. A warp issues in order, so an mma that
waits for its operands holds back every load after it, and ptxas's scheduler does not know which
order the design needs. Each was found by reading the SASS without a GPU and fixed in the kernels:
  loads_before_mma     final_sampler_step: in each stretch between block barriers, no global
                       load after the first mma (ptxas had interleaved them: the first mma's wait
                       for its operands held the remaining loads back one memory round trip).
  wgmma_before_refill  the V-MN-major wgmma attention block kernels and the cp.async wgmma GEMMs:
                       after each block barrier, the tile's wgmmas (QK^T; the k-tile's product)
                       are issued before the cp.async loads that refill the ring (their address
                       arithmetic, up to a few hundred instructions, runs under the wgmmas).
  two_softmax_paths    the wgmma_mn attention block kernels hold the online softmax twice (at
                       least 64 MUFU.EX2 for 32 scores a thread and tile): a masked path for the
                       tile past the last token and an unmasked one for every other tile (ptxas
                       had if-converted the mask into ~130 selects a thread on every tile; one
                       path would mean that it merged them again).
  hopper_uses_wgmma    every sm_90a kernel that the launchers run only on a Hopper holds wgmma
                       (HGMMA) instructions: it was not compiled to its trap stub.
  no_gpu_membar        no kernel has a GPU-scope memory barrier but a cluster barrier's release
                       (the multicast GEMM's slot releases once carried one each), and the
                       cluster split-K GEMMs (gemm_tma_k<n>_*) two more: the releases of their
                       once-a-unit `staged` and `drained` arrivals (a remote mbarrier arrive
                       right after each).
  pdl_wait_first       sm_90a: every kernel waits for the grid before it (griddepcontrol.wait,
                       SASS ACQBULK) before its first global memory access, so that with
                       programmatic dependent launch (FORA_PDL) it never reads what that grid has
                       yet to write.

Usage: tools/check_kernels.py [--only SUBSTRING-OF-A-SOURCE]
       tools/check_kernels.py --dump KERNEL [--file kernels/X.cu] [--arch sm_90a]   (one kernel's SASS)
       tools/check_kernels.py --compare REV [--only ...] [--all]   (registers, stack and instruction
           counts per kernel at git revision REV against the working tree: what a change did to
           the machine code, without a GPU)
It needs nvcc and cuobjdump + nvdisasm (NVIDIA's pip wheels nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm put them beside the wheel's nvcc; .ci/run installs them). It runs its rules
on synthetic ptxas logs and SASS first (each must pass a good and fail a bad one), then on the
kernels.
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The architectures build.rs compiles SASS for: every source is checked for each.
ARCHES = ["sm_80", "sm_90a"]
SOURCES = sorted("kernels/" + f for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".cu"))

HOPPER_ONLY = re.compile(r"^(gemm_wgmma_|gemm_tma_|attention_wgmma|attention_tma_|qkv_attention_)")
REFILL_AFTER_WGMMA = re.compile(r"^(attention_wgmma_mn_(m64_|deep_m64_)?d\d+|gemm_wgmma_\d+x\d+)$")


def find_tool(name, nvcc):
    """`name` beside nvcc (the pip wheels' layout), else on PATH."""
    if nvcc:
        beside = os.path.join(os.path.dirname(nvcc), name)
        if os.access(beside, os.X_OK):
            return beside
    return shutil.which(name)


def find_nvcc():
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        for d in [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]:
            if d and os.access(os.path.join(d, "bin", "nvcc"), os.X_OK):
                return os.path.join(d, "bin", "nvcc")
    return nvcc


def ptxas_failures(log):
    """Failures [(rule, function, why)] of the ptxas rules in one compile's `ptxas -v` log."""
    failures = []
    function = "?"
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            function = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and any(int(g) for g in m.groups()):
            failures.append(("no_local_memory", function, line.strip()))
        if "warpgroup.arrive is injected" in line:
            name = re.search(r"in function '([^']+)'", line)
            name = name.group(1) if name else "?"
            if not name.endswith("_probe"):
                failures.append(("no_injected_arrive", name, line.split("ptxas info    : ")[-1].strip()))
        if "mma_async instructions are serialized" in line:
            name = re.search(r"in the function '([^']+)'", line)
            why = re.search(r"(\(C\d+\).*?)(?: in the function|$)", line)
            failures.append(("no_serialized_wgmma", name.group(1) if name else "?",
                             why.group(1) if why else line.strip()))
    return failures


def ptxas_summary(log):
    """(entry functions, most registers any uses) of one compile's `ptxas -v` log."""
    stats = kernel_stats("", log)
    return len(stats), max((st.get("regs", 0) for st in stats.values()), default=0)


def parse_sass(text):
    """{function: [opcode, ...]} from `cuobjdump -sass`: the opcode with its modifiers, without
    the predicate (`@!P0 LDG.E.128 R4, ...` -> `LDG.E.128`)."""
    functions = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if current is None or not m:
            continue
        words = m.group(1).split()
        if words and words[0].startswith("@"):
            words = words[1:]
        if words:
            current.append(words[0])
    return functions


def segments(ops):
    """The stretches of `ops` between block barriers (BAR.SYNC*), each with the barrier that
    starts it (None for the first)."""
    out, start, cur = [], None, []
    for op in ops:
        if op.startswith("BAR.SYNC"):
            out.append((start, cur))
            start, cur = op, []
        else:
            cur.append(op)
    out.append((start, cur))
    return out


def loads_before_mma(ops):
    """A global load after the first mma of its barrier-delimited stretch, or None."""
    for i, (_, seg) in enumerate(segments(ops)):
        seen_mma = False
        for op in seg:
            if op.startswith("HMMA"):
                seen_mma = True
            elif seen_mma and op.startswith("LDG"):
                return f"stretch {i}: {op} after the first HMMA"
    return None


def wgmma_before_refill(ops):
    """A stretch after a block barrier that issues a cp.async (LDGSTS) before its first wgmma."""
    checked = 0
    for i, (start, seg) in enumerate(segments(ops)):
        if start is None or not any(op.startswith("HGMMA") for op in seg):
            continue
        first_mma = next(j for j, op in enumerate(seg) if op.startswith("HGMMA"))
        loads = [j for j, op in enumerate(seg) if op.startswith("LDGSTS")]
        if not loads:
            continue
        checked += 1
        if loads[0] < first_mma:
            return f"stretch {i}: LDGSTS at {loads[0]} before the first HGMMA at {first_mma}"
    if checked == 0:
        return "no barrier stretch with both wgmmas and cp.async loads (the tile loop was not found)"
    return None


def two_softmax_paths(ops):
    ex2 = sum(op.startswith("MUFU.EX2") for op in ops)
    if ex2 < 64:
        return f"{ex2} MUFU.EX2: one softmax path (the key mask on every tile?)"
    return None


def hopper_uses_wgmma(ops):
    if not any(op.startswith("HGMMA") for op in ops):
        return "no HGMMA instruction (the trap stub?)"
    return None


def no_gpu_membar(ops, remote_releases=0, cluster_proxy_fences=0):
    """A GPU- or system-scope MEMBAR that is not the release of a cluster barrier's arrive
    (barrier.cluster.arrive, once at a cluster kernel's start and end: MEMBAR.ALL.GPU, ERRBAR,
    CGAERRBAR, UCGABAR_ARV), beyond `remote_releases` of a remote mbarrier arrive
    (mbarrier.arrive.release.cluster: SYNCS.ARRIVE.TRANS64.RED within a few instructions) and
    `cluster_proxy_fences` of fence.proxy.async.shared::cluster (MEMBAR.ALL.GPU then
    FENCE.VIEW.ASYNC.S)."""
    for i, op in enumerate(ops):
        if op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op):
            if "UCGABAR_ARV" in ops[i + 1:i + 5]:
                continue
            if remote_releases > 0 and any(o.startswith("SYNCS.ARRIVE.TRANS64.RED") for o in ops[i + 1:i + 5]):
                remote_releases -= 1
                continue
            if cluster_proxy_fences > 0 and ops[i + 1:i + 2] == ["FENCE.VIEW.ASYNC.S"]:
                cluster_proxy_fences -= 1
                continue
            return f"{op} at instruction {i}"
    return None


# The cluster split-K GEMMs: two released hand-overs a unit, `staged` and `drained`
# (gemm_sm90.cu's cluster_reduced_epilogue).
CLUSTER_K_GEMM = re.compile(r"gemm_tma_k\d_")


# SASS opcodes that read or write global memory (LD / ST with generic addresses included).
GLOBAL_MEMORY_OPS = ("LDG", "STG", "LD.", "ST.", "LDGSTS", "UTMALDG", "UTMASTG", "UBLKCP", "RED", "ATOM")


def pdl_wait_first(ops):
    """With programmatic dependent launch (FORA_PDL), a kernel may start while the one before
    it still runs: griddepcontrol.wait (SASS ACQBULK) must come before its first global memory
    access."""
    first = next((i for i, op in enumerate(ops) if op.startswith(GLOBAL_MEMORY_OPS)), None)
    if first is None:
        return None
    wait = next((i for i, op in enumerate(ops) if op.startswith("ACQBULK")), None)
    if wait is None or wait > first:
        return f"{ops[first]} at instruction {first} before any ACQBULK (griddepcontrol.wait)"
    return None


def check(functions, arch):
    """Failures [(rule, function, why)] of every rule that applies to these functions."""
    failures = []
    for name, ops in sorted(functions.items()):
        releases = 2 if CLUSTER_K_GEMM.match(name) else 0
        # qkv_attention_*: the K / V pushed into the cluster's shared memory are fenced into
        # the async proxy once, before the exchange's barrier (qkv_attention_sm90.cu).
        proxy_fences = 1 if name.startswith("qkv_attention_") else 0
        rules = [("no_gpu_membar", lambda ops, r=releases, f=proxy_fences: no_gpu_membar(ops, r, f))]
        if arch == "sm_90a":
            rules.append(("pdl_wait_first", pdl_wait_first))
        if name == "final_sampler_step":
            rules.append(("loads_before_mma", loads_before_mma))
        if arch == "sm_90a" and REFILL_AFTER_WGMMA.match(name):
            rules.append(("wgmma_before_refill", wgmma_before_refill))
            if name.startswith("attention_"):
                rules.append(("two_softmax_paths", two_softmax_paths))
        if arch == "sm_90a" and HOPPER_ONLY.match(name):
            rules.append(("hopper_uses_wgmma", hopper_uses_wgmma))
        for rule, fn in rules:
            why = fn(ops)
            if why:
                failures.append((rule, name, why))
    return failures


def listing(name, lines):
    body = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(lines))
    return f"\t\tFunction : {name}\n{body}\n"


PTXAS_GOOD = """ptxas info    : Compiling entry function 'patch_embed' for 'sm_90a'
ptxas info    : Function properties for patch_embed
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers
"""


def ptxas_selftest():
    """Each ptxas rule passes a good synthetic log and fails a bad one."""
    cases = [
        ("no_local_memory", PTXAS_GOOD.replace("0 bytes spill stores, 0 bytes spill loads", "8 bytes spill stores, "
                                         "8 bytes spill loads")),
        ("no_local_memory", PTXAS_GOOD.replace("0 bytes stack frame", "16 bytes stack frame")),
        ("no_serialized_wgmma", PTXAS_GOOD + "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async "
         "instructions are serialized due to the presence of Extern calls in the function 'gemm_tma_128x128'\n"),
        ("no_injected_arrive", PTXAS_GOOD + "ptxas info    : (C7519) warpgroup.arrive is injected in around line 56847 "
         "by compiler to allow use of registers in GMMA in function 'gemm_tma_128x128'\n"),
    ]
    ok = True
    # A probe may have injected arrives; a kernel may not.
    probe = PTXAS_GOOD + ("ptxas info    : (C7519) warpgroup.arrive is injected in around line 1642 by compiler to "
                          "allow use of registers in GMMA in function 'wgmma_probe'\n")
    if ptxas_failures(probe):
        print(f"check_kernels selftest FAIL no_injected_arrive: a probe's log -> {ptxas_failures(probe)}")
        ok = False
    if ptxas_failures(PTXAS_GOOD) or ptxas_summary(PTXAS_GOOD) != (1, 32):
        print(f"check_kernels selftest FAIL: good ptxas log -> {ptxas_failures(PTXAS_GOOD)}, "
              f"{ptxas_summary(PTXAS_GOOD)}")
        ok = False
    for rule, bad in cases:
        if not any(f[0] == rule and f[1] in ("patch_embed", "gemm_tma_128x128") for f in ptxas_failures(bad)):
            print(f"check_kernels selftest FAIL {rule}: bad ptxas log -> {ptxas_failures(bad)}")
            ok = False
    return ok


def selftest():
    """Every rule passes a good synthetic listing or log and fails a bad one."""
    cases = [
        ("final_sampler_step", ["LDG.E.128 R1, [R2]", "@!P0 LDG.E.128 R3, [R4]", "WARPSYNC.ALL", "HMMA.16816.F32.BF16 R5",
                                "BAR.SYNC.DEFER_BLOCKING 0x0", "LDG.E R7, [R8]", "BAR.SYNC.DEFER_BLOCKING 0x0"],
         ["LDG.E.128 R1, [R2]", "HMMA.16816.F32.BF16 R5", "@!P0 LDG.E.128 R3, [R4]", "HMMA.16816.F32.BF16 R6"],
         "loads_before_mma", "sm_90a"),
        ("attention_wgmma_mn_d72", ["LDGSTS.E.BYPASS.128 [R1]", "BAR.SYNC.DEFER_BLOCKING 0x0", "HGMMA.64x64x16.F32.BF16 R2",
                                    "LDGSTS.E.BYPASS.128 [R1]", "HGMMA.64x72x16.F32.BF16 R3"] + ["MUFU.EX2 R4, R4"] * 68,
         ["BAR.SYNC.DEFER_BLOCKING 0x0", "LDGSTS.E.BYPASS.128 [R1]", "HGMMA.64x64x16.F32.BF16 R2",
          "HGMMA.64x72x16.F32.BF16 R3"],
         "wgmma_before_refill", "sm_90a"),
        ("attention_wgmma_mn_m64_d72", ["BAR.SYNC.DEFER_BLOCKING 0x0", "HGMMA.64x64x16.F32.BF16 R2",
                                        "LDGSTS.E.BYPASS.128 [R1]"] + ["MUFU.EX2 R4, R4"] * 68,
         ["BAR.SYNC.DEFER_BLOCKING 0x0", "HGMMA.64x64x16.F32.BF16 R2", "LDGSTS.E.BYPASS.128 [R1]"]
         + ["MUFU.EX2 R4, R4"] * 34,
         "two_softmax_paths", "sm_90a"),
        ("gemm_tma_128x192", ["UTMALDG.2D [UR4]", "HGMMA.64x192x16.F32.BF16 R24"], ["BPT.TRAP 0x1", "EXIT"],
         "hopper_uses_wgmma", "sm_90a"),
        ("patch_embed", ["LDC R1, c[0x0][0x28]", "ACQBULK", "PREEXIT", "LDG.E R2, desc[UR4][R2.64]", "STG.E [R4], R2"],
         ["LDC R1, c[0x0][0x28]", "LDG.E R2, desc[UR4][R2.64]", "ACQBULK", "STG.E [R4], R2"],
         "pdl_wait_first", "sm_90a"),
        ("gemm_tma_mc_128x192", ["MEMBAR.ALL.CTA", "MEMBAR.ALL.GPU", "ERRBAR", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT",
                                 "HGMMA.64x192x16.F32.BF16 R24", "SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ"],
         ["HGMMA.64x192x16.F32.BF16 R24", "MEMBAR.ALL.GPU", "SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ"],
         "no_gpu_membar", "sm_90a"),
        ("gemm_tma_k3_128x128", ["HGMMA.64x128x16.F32.BF16 R24", "MEMBAR.ALL.GPU", "SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ",
                                 "LD.E.128 R8, [R8]", "MEMBAR.ALL.GPU", "SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ"],
         ["HGMMA.64x128x16.F32.BF16 R24", "MEMBAR.ALL.GPU", "SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ",
          "MEMBAR.ALL.GPU", "SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ", "MEMBAR.ALL.GPU", "SYNCS.ARRIVE.TRANS64.RED.A1T0 RZ"],
         "no_gpu_membar", "sm_90a"),
    ]
    ok = ptxas_selftest()
    for name, good, bad, rule, arch in cases:
        good_fail = [f for f in check(parse_sass(listing(name, good)), arch) if f[0] == rule]
        bad_fail = [f for f in check(parse_sass(listing(name, bad)), arch) if f[0] == rule]
        if good_fail or not bad_fail:
            print(f"check_kernels selftest FAIL {rule}: good listing -> {good_fail}, bad listing -> {bad_fail}")
            ok = False
    return ok


def sass_of(nvcc, cuobjdump, src, arch, tmp, root=ROOT):
    """(cuobjdump -sass text, ptxas -v log) of kernels/X.cu under `root`, compiled for `arch`."""
    cubin = os.path.join(tmp, f"{os.path.basename(root)}.{os.path.basename(src)}.{arch}.cubin")
    # Every nvcc and ptxas warning is an error here (build.rs only passes them on).
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-I", os.path.join(root, "kernels"),
           "-Werror", "all-warnings", "-Xptxas", "-v", os.path.join(root, src), "-o", cubin]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{src} ({arch}) does not compile (nvcc and ptxas warnings are errors here):\n{r.stderr}")
    ptxas_log = r.stdout + r.stderr
    # cuobjdump runs nvdisasm, which the wheels put beside it.
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=env)
    if r.returncode != 0 or "Function :" not in r.stdout:
        raise RuntimeError(f"cuobjdump -sass {src} ({arch}) failed (nvdisasm beside it?):\n{r.stderr}")
    return r.stdout, ptxas_log


def sass_of_all(nvcc, cuobjdump, jobs, tmp):
    """sass_of for each (src, arch, root) of `jobs`, one compile a core at a time (ptxas is
    single-threaded), in the order given; a job that fails gives its RuntimeError instead."""
    def one(job):
        try:
            return sass_of(nvcc, cuobjdump, job[0], job[1], tmp, job[2])
        except RuntimeError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(one, jobs))
    return results


def sass_of_all_or_raise(nvcc, cuobjdump, jobs, tmp):
    results = sass_of_all(nvcc, cuobjdump, jobs, tmp)
    for r in results:
        if isinstance(r, RuntimeError):
            raise r
    return results


def kernel_stats(sass, ptxas_log):
    """{kernel: {regs, stack, instr, bar, mma, ldg, ldgsts, mufu}}: ptxas's registers and stack
    frame, and static counts of SASS instructions (all, block barriers, tensor-core ops, global
    loads, cp.async, MUFU)."""
    stats = {}
    current = None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = stats.setdefault(m.group(1), {})
        m = re.search(r"(\d+) bytes stack frame", line)
        if m and current is not None:
            current["stack"] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["regs"] = int(m.group(1))
    for name, ops in parse_sass(sass).items():
        st = stats.setdefault(name, {})
        st["instr"] = len(ops)
        st["bar"] = sum(op.startswith("BAR.SYNC") for op in ops)
        st["mma"] = sum(op.startswith(("HGMMA", "HMMA")) for op in ops)
        st["ldg"] = sum(op.startswith("LDG.") for op in ops)
        st["ldgsts"] = sum(op.startswith("LDGSTS") for op in ops)
        st["mufu"] = sum(op.startswith("MUFU") for op in ops)
    return stats


def compare(nvcc, cuobjdump, rev, only, show_all):
    """Per kernel, its stats at git revision `rev` against the working tree."""
    keys = ["regs", "stack", "instr", "bar", "mma", "ldg", "ldgsts", "mufu"]
    with tempfile.TemporaryDirectory() as tmp:
        old_root = os.path.join(tmp, "base")
        os.makedirs(old_root)
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "kernels"], capture_output=True)
        if archive.returncode != 0:
            print(f"check_kernels: git archive {rev} failed: {archive.stderr.decode()}", file=sys.stderr)
            return 2
        subprocess.run(["tar", "-x", "-C", old_root], input=archive.stdout, check=True)
        print("| file | arch | kernel | " + " | ".join(keys) + " |")
        print("|---|---|---|" + "---|" * len(keys))
        pairs = [(src, arch) for src in SOURCES if only in src for arch in ARCHES]
        had = [(src, arch) for src, arch in pairs if os.path.exists(os.path.join(old_root, src))]
        jobs = [(src, arch, ROOT) for src, arch in pairs] + [(src, arch, old_root) for src, arch in had]
        listings = sass_of_all_or_raise(nvcc, cuobjdump, jobs, tmp)
        news = listings[:len(pairs)]
        olds = dict(zip(had, listings[len(pairs):]))
        for (src, arch), new_sass in zip(pairs, news):
            new = kernel_stats(*new_sass)
            old = kernel_stats(*olds[(src, arch)]) if (src, arch) in olds else {}
            for name in sorted(set(new) | set(old)):
                a, b = old.get(name, {}), new.get(name, {})
                if not show_all and all(a.get(k) == b.get(k) for k in keys):
                    continue
                cells = [f"{a.get(k, '-')} -> {b.get(k, '-')}" if a.get(k) != b.get(k) else f"{b.get(k, '-')}"
                         for k in keys]
                print(f"| {src} | {arch} | {name} | " + " | ".join(cells) + " |")
    return 0


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="only the sources whose path contains this")
    parser.add_argument("--dump", metavar="KERNEL", help="print one kernel's SASS instead of checking")
    parser.add_argument("--file", help="with --dump: the kernel's source (kernels/X.cu)")
    parser.add_argument("--arch", default="sm_90a", help="with --dump: sm_80 or sm_90a")
    parser.add_argument("--compare", metavar="REV",
                        help="instead of checking: registers, stack and SASS instruction counts per kernel at git "
                             "revision REV against the working tree (changed kernels; --all: every one)")
    parser.add_argument("--all", action="store_true", help="with --compare: unchanged kernels too")
    args = parser.parse_args(argv)
    if not selftest():
        return 1
    nvcc = find_nvcc()
    cuobjdump = find_tool("cuobjdump", nvcc)
    if not nvcc or not cuobjdump:
        print("check_kernels: needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump==13.2.86 "
              "nvidia-cuda-nvdisasm==13.2.86 beside the nvcc wheels; NVCC=...)", file=sys.stderr)
        return 2
    if args.compare:
        return compare(nvcc, cuobjdump, args.compare, args.only, args.all)
    if args.dump:
        with tempfile.TemporaryDirectory() as tmp:
            for src in SOURCES if args.file is None else [args.file]:
                text, _ = sass_of(nvcc, cuobjdump, src, args.arch, tmp)
                if f"Function : {args.dump}\n" in text:
                    part = text.split(f"Function : {args.dump}\n", 1)[1].split("Function :", 1)[0]
                    print(re.sub(r"\s*/\* 0x[0-9a-f]+ \*/", "", part))
                    return 0
        print(f"check_kernels: no kernel {args.dump}", file=sys.stderr)
        return 2
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        pairs = [(src, arch) for src in SOURCES if args.only in src for arch in ARCHES]
        listings = sass_of_all(nvcc, cuobjdump, [(src, arch, ROOT) for src, arch in pairs], tmp)
        for (src, arch), result in zip(pairs, listings):
            if isinstance(result, RuntimeError):
                print(f"FAIL {result}")
                failures += 1
                continue
            sass, log = result
            bad = ptxas_failures(log) + check(parse_sass(sass), arch)
            for rule, name, why in bad:
                print(f"FAIL {src} ({arch}) {name}: {rule}: {why}")
            failures += len(bad)
            if not bad:
                kernels, regs = ptxas_summary(log)
                print(f"ok   {src} ({arch}): {kernels} kernels, at most {regs} registers, no spills, no stack, "
                      "no serialized wgmma or injected arrive, SASS rules hold")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
