#!/usr/bin/env python3
"""The FORA_TMA_TILES setting that forces, for each block GEMM (qkv, proj, fc1, fc2), the TMA
tile that ran it fastest at one row count in a `fora bench --json` report with the forced-tile
rows ("tma-128x192", "tma-c4x2-128x128", ...; `fora bench` writes them on a Hopper). So that
one device call can time whole steps with the bench's fastest tiles (`tools/device_suite.sh`'s
`tma_tuned` phase) on a machine where the picks cannot be retuned and rebuilt. The slices are
left to the picks (the fused LayerNorm's summed split where it applies).

    python3 tools/tma_tiles.py BENCH_JSON [--rows 2]

Prints the setting (`NxK=tile,...`; empty when the report has no forced-tile rows at those
rows). Standard library only."""

import argparse
import json
import re
import sys

BLOCK_GEMMS = ("qkv", "proj", "fc1", "fc2")
SHAPE = re.compile(r"M=(\d+) N=(\d+) K=(\d+)")


def fastest_tiles(report, rows):
    """{(n, k): (tile without "tma-", median ms)} of the fastest measured forced-tile row of
    each block GEMM at `rows`, in the order the GEMMs first appear."""
    best = {}
    for k in report.get("kernels", []):
        imp, ms = k.get("impl", ""), k.get("median_ms")
        if k.get("name") not in BLOCK_GEMMS or k.get("rows") != rows or ms is None:
            continue
        # A forced tile's row: "tma-" and a tile name; the picks are "tma" and "tma_mc".
        if not imp.startswith("tma-"):
            continue
        shape = SHAPE.search(k.get("shape", ""))
        if not shape:
            continue
        key = (int(shape.group(2)), int(shape.group(3)))
        if key not in best or ms < best[key][1]:
            best[key] = (imp[len("tma-"):], ms)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="a fora bench --json file with the forced TMA tile rows")
    ap.add_argument("--rows", type=int, default=2, help="the row count to take the tiles at")
    args = ap.parse_args()
    try:
        with open(args.report) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"tma_tiles.py: cannot read {args.report}: {e}")
    try:
        best = fastest_tiles(report, args.rows)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        sys.exit(f"tma_tiles.py: {args.report} is not a fora bench report ({type(e).__name__}: {e})")
    print(",".join(f"{n}x{k}={tile}" for (n, k), (tile, _) in best.items()))


if __name__ == "__main__":
    main()
