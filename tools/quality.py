#!/usr/bin/env python3
"""Sample quality of a digits DiT under FORA caching, measured with `fora sample` itself.

1. Trains a small classifier on the same scikit-learn digits the model was trained on (the
   32x32 images of tools/train_tiny.py, averaged over channels and 4x4-pooled back to 8x8, an RBF
   SVM), and reports its accuracy on a held-out quarter of the digits.
2. Runs the built `fora` binary (`fora sample --model .. --class .. --seed .. --cache-interval N
   --out x.safetensors`) for `--per-class` images of every class, without caching (N = 1) and
   for every FORA interval of `--intervals`, all with the same seeds (so the same x_T and noise).
3. Reports per N: the classifier's accuracy on the requested class, and the PSNR of each image
   against its uncached twin (images clamped to [-1, 1], peak-to-peak 2, i.e. 8-bit-style PSNR
   of the displayed picture; the mean over images, and the PSNR of the pooled MSE).

Prints a markdown table, writes JSON, and saves a picture (PNG): one image of each class, the
top row without caching, the bottom row with FORA N=3 (or the first interval given), same seeds.

    python3 tools/quality.py --fora target/release/fora --model models/tiny.safetensors \\
        --out-dir quality                      # defaults: 100 per class, 250 DDPM steps, cfg 4
    python3 tools/quality.py --per-class 2 --steps 50 --device cpu --out-dir /tmp/q   # a smoke run
"""

import argparse
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


# ---------------------------------------------------------------------------------------------
# classifier

def pooled_features(images):
    """[N, C, 32, 32] in [-1, 1] -> [N, 64]: clamp, mean over channels, 4x4 average pooling back
    to the 8x8 grid of the source digits, mapped to the digits' 0..16 scale."""
    x = np.clip(np.asarray(images, dtype=np.float64), -1.0, 1.0).mean(axis=1)
    n, h, w = x.shape
    if h % 8 or w % 8:
        raise ValueError(f"images of {h}x{w} cannot be pooled to 8x8")
    x = x.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return ((x + 1.0) * 8.0).reshape(n, 64)


class DigitClassifier:
    """An RBF SVM on pooled 8x8 features, trained on 75% of the digits (stratified, seeded) and
    tested on the rest."""

    def __init__(self, seed=0):
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC
        from train_tiny import digits_dataset

        x, y = digits_dataset(channels=1)
        feats = pooled_features(x.numpy())
        labels = y.numpy()
        f_train, f_test, y_train, y_test = train_test_split(
            feats, labels, test_size=0.25, random_state=seed, stratify=labels)
        self.svm = SVC(C=10.0, gamma="scale")
        self.svm.fit(f_train, y_train)
        self.test_accuracy = float((self.svm.predict(f_test) == y_test).mean())
        self.n_train, self.n_test = len(y_train), len(y_test)

    def predict(self, images):
        return self.svm.predict(pooled_features(images))


# ---------------------------------------------------------------------------------------------
# sampling through the fora binary

STATS_RE = re.compile(r"(\d+) steps \((\d+) computed, (\d+) reused.*? in ([0-9.]+) s")


def run_fora(args, classes, seed, interval, out_path):
    """One `fora sample` call; returns (samples [B, C, H, W] f32, stats dict)."""
    from safetensors.numpy import load_file

    cmd = [args.fora, "sample", "--model", args.model, "--steps", str(args.steps),
           "--sampler", args.sampler, "--seed", str(seed), "--cache-interval", str(interval),
           "--out", out_path, "--quiet"]
    if args.cfg_scale is not None:
        cmd += ["--cfg-scale", str(args.cfg_scale), "--cfg-mode", args.cfg_mode]
    if args.device:
        cmd += ["--device", args.device]
    for c in classes:
        cmd += ["--class", str(c)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        shown = " ".join(cmd[:20]) + (" ..." if len(cmd) > 20 else "")
        sys.exit(f"error: `{shown}` failed with exit code {proc.returncode}:\n"
                 f"{proc.stderr.strip()}")
    tensors = load_file(out_path)
    if "samples" not in tensors:
        sys.exit(f"error: {out_path} has no `samples` tensor (has {sorted(tensors)})")
    samples = tensors["samples"]
    if samples.ndim != 4 or samples.shape[0] != len(classes):
        sys.exit(f"error: {out_path}: samples has shape {samples.shape}, "
                 f"expected [{len(classes)}, C, H, W]")
    if not np.isfinite(samples).all():
        sys.exit(f"error: {out_path}: samples hold non-finite values")
    stats = {"process_seconds": wall}
    m = STATS_RE.search(proc.stderr)
    if m:
        stats.update(steps=int(m.group(1)), computed=int(m.group(2)), reused=int(m.group(3)),
                     sampling_seconds=float(m.group(4)))
    return samples, stats


def sample_all(args, interval, labels, work_dir):
    """All images of the run for one interval, in chunks of `--chunk` images; chunk k uses seed
    `--seed + k`, so every interval sees the same noise."""
    parts, totals = [], {"process_seconds": 0.0}
    for k, lo in enumerate(range(0, len(labels), args.chunk)):
        classes = labels[lo: lo + args.chunk]
        out = os.path.join(work_dir, f"samples_n{interval}_chunk{k}.safetensors")
        samples, stats = run_fora(args, classes, args.seed + k, interval, out)
        if not args.keep_samples:
            os.remove(out)
        parts.append(samples)
        for key, v in stats.items():
            totals[key] = totals.get(key, 0) + v
    return np.concatenate(parts, axis=0), totals


# ---------------------------------------------------------------------------------------------
# metrics and pictures

def psnr_db(a, b):
    """PSNR of clamped images, peak-to-peak 2 ([-1, 1]): per image [N], and of the pooled MSE.
    Identical images (MSE 0) give +inf per image; the mean is then over finite values, with the
    count of identical images reported beside it."""
    a = np.clip(a.astype(np.float64), -1.0, 1.0)
    b = np.clip(b.astype(np.float64), -1.0, 1.0)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        per_image = 10.0 * np.log10(4.0 / mse)
    pooled = 10.0 * math.log10(4.0 / mse.mean()) if mse.mean() > 0 else math.inf
    return per_image, pooled


def to_u8(x):
    """[-1, 1] -> 0..255, as fora's PNG writer (clamped, rounded)."""
    return np.clip(np.round((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_png(path, pixels):
    """A minimal PNG writer (8-bit gray [H, W] or RGB [H, W, 3]); no imaging library needed."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w = pixels.shape[:2]
    color = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def comparison_picture(rows, scale, gap=2, gap_value=128):
    """Rows of images [K, C, H, W] -> one [H', W', 3] (or [H', W']) picture, nearest-upscaled by
    `scale`, with `gap` pixels between tiles."""
    k, c, h, w = rows[0].shape
    hs, ws = h * scale, w * scale
    height = len(rows) * hs + (len(rows) - 1) * gap
    width = k * ws + (k - 1) * gap
    out = np.full((height, width, c), gap_value, dtype=np.uint8)
    for r, images in enumerate(rows):
        for j, img in enumerate(to_u8(images)):
            tile = img.transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)
            y0, x0 = r * (hs + gap), j * (ws + gap)
            out[y0:y0 + hs, x0:x0 + ws] = tile
    return out[:, :, 0] if c == 1 else out


# ---------------------------------------------------------------------------------------------

def strict_json(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fora", default=os.path.join(ROOT, "target", "release", "fora"),
                   help="the fora binary (default target/release/fora)")
    p.add_argument("--model", default=os.path.join(ROOT, "models", "tiny.safetensors"),
                   help="checkpoint passed to fora --model (default models/tiny.safetensors)")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=250, help="sampling steps (default 250)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--cfg-scale", type=float, default=4.0,
                   help="classifier-free guidance scale (default 4.0; 1 = none)")
    p.add_argument("--cfg-mode", choices=["official", "all"], default="official")
    p.add_argument("--intervals", default="2,3,4,6",
                   help="FORA intervals N to compare with no caching (default 2,3,4,6; "
                        "\"\" = the uncached baseline only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first chunk (default 0)")
    p.add_argument("--chunk", type=int, default=1000,
                   help="images per fora call (default 1000; each chunk its own seed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="passed to fora --device (default: fora's own default)")
    p.add_argument("--out-dir", default="quality", help="where results go (default quality/)")
    p.add_argument("--picture-scale", type=int, default=3,
                   help="nearest upscaling of the comparison picture (default 3)")
    p.add_argument("--keep-samples", action="store_true",
                   help="keep fora's sample files in --out-dir")
    args = p.parse_args(argv)
    for name in ("per_class", "num_classes", "steps", "chunk", "picture_scale"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        args.interval_list = [int(v) for v in args.intervals.split(",") if v.strip()]
    except ValueError:
        p.error(f"--intervals {args.intervals!r}: expected comma-separated integers")
    if any(n < 2 for n in args.interval_list):
        p.error("--intervals: every FORA interval must be >= 2 (1 is the uncached baseline)")
    if not os.path.isfile(args.fora) or not os.access(args.fora, os.X_OK):
        p.error(f"--fora {args.fora}: not an executable file (build it: cargo build --release)")
    if not os.path.isfile(args.model):
        p.error(f"--model {args.model}: no such file")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        p.error("--cfg-scale must be finite")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)

    clf = DigitClassifier()
    print(f"classifier: RBF SVM on 4x4-pooled digits, test accuracy "
          f"{clf.test_accuracy * 100:.1f}% ({clf.n_test} held-out of "
          f"{clf.n_train + clf.n_test})", flush=True)

    labels = [c for c in range(args.num_classes) for _ in range(args.per_class)]
    truth = np.array(labels)
    results = []
    base = None
    for interval in [1] + args.interval_list:
        samples, stats = sample_all(args, interval, labels, args.out_dir)
        pred = clf.predict(samples)
        correct = pred == truth
        per_class = [float(correct[truth == c].mean()) for c in range(args.num_classes)]
        row = {"interval": interval, "accuracy": float(correct.mean()),
               "per_class_accuracy": per_class, **stats}
        if interval == 1:
            base = samples
        else:
            per_image, pooled = psnr_db(samples, base)
            finite = per_image[np.isfinite(per_image)]
            row.update(psnr_mean_db=float(finite.mean()) if len(finite) else math.inf,
                       psnr_min_db=float(finite.min()) if len(finite) else math.inf,
                       psnr_pooled_db=pooled, identical_images=int((~np.isfinite(per_image)).sum()))
        row["samples"] = samples
        results.append(row)
        print(f"N={interval}: accuracy {row['accuracy'] * 100:.1f}%"
              + (f", PSNR {row['psnr_mean_db']:.2f} dB" if interval > 1 else "")
              + f" ({stats['process_seconds']:.1f} s)", flush=True)

    base_time = results[0].get("sampling_seconds")
    lines = [
        "| FORA interval N | computing steps | accuracy (requested class) | PSNR vs no cache, "
        "mean (min) dB | sampling time | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        n_label = "1 (no cache)" if r["interval"] == 1 else str(r["interval"])
        computed = f"{r['computed']} / {r['steps']}" if "computed" in r else "?"
        psnr = ("—" if r["interval"] == 1
                else f"{r['psnr_mean_db']:.2f} ({r['psnr_min_db']:.2f})")
        t = r.get("sampling_seconds")
        time_s = f"{t:.2f} s" if t is not None else f"{r['process_seconds']:.2f} s (process)"
        speed = f"{base_time / t:.2f}x" if t and base_time else "?"
        lines.append(f"| {n_label} | {computed} | {r['accuracy'] * 100:.1f}% | {psnr} | "
                     f"{time_s} | {speed} |")
    table = "\n".join(lines)
    cfg = (f"{args.steps}-step {args.sampler.upper()}, cfg scale {args.cfg_scale} "
           f"({args.cfg_mode}), {args.per_class} images per class, seed {args.seed}")
    print()
    print(f"Model {os.path.basename(args.model)}; {cfg}; classifier test accuracy "
          f"{clf.test_accuracy * 100:.1f}%.")
    print()
    print(table)

    # The comparison picture needs a FORA run (--intervals "" measures the baseline only).
    pic_n = pic_path = None
    if args.interval_list:
        pic_n = 3 if 3 in args.interval_list else args.interval_list[0]
        firsts = [labels.index(c) for c in range(args.num_classes)]
        pic_rows = [results[0]["samples"][firsts],
                    next(r for r in results if r["interval"] == pic_n)["samples"][firsts]]
        pic_path = os.path.join(args.out_dir, f"uncached_vs_fora{pic_n}.png")
        write_png(pic_path, comparison_picture(pic_rows, args.picture_scale))

    report = {
        "model": os.path.abspath(args.model),
        "fora": os.path.abspath(args.fora),
        "steps": args.steps, "sampler": args.sampler, "cfg_scale": args.cfg_scale,
        "cfg_mode": args.cfg_mode, "per_class": args.per_class, "seed": args.seed,
        "chunk": args.chunk, "device": args.device,
        "classifier": {"kind": "RBF SVM on 4x4-pooled 8x8 features",
                       "test_accuracy": clf.test_accuracy, "n_train": clf.n_train,
                       "n_test": clf.n_test},
        "results": [{k: v for k, v in r.items() if k != "samples"} for r in results],
        "picture": os.path.abspath(pic_path) if pic_path else None,
        "picture_rows": ["no cache", f"FORA N={pic_n}"] if pic_path else None,
        "table_markdown": table,
    }
    json_path = os.path.join(args.out_dir, "quality.json")
    with open(json_path + ".tmp", "w") as f:
        # Strict JSON: an infinite PSNR (all images identical) is written as null.
        json.dump(strict_json(report), f, indent=2, allow_nan=False)
    os.replace(json_path + ".tmp", json_path)
    print()
    if pic_path:
        print(f"wrote {json_path} and {pic_path} (top: no cache, bottom: FORA N={pic_n})")
    else:
        print(f"wrote {json_path} (no FORA interval asked: no comparison picture)")


if __name__ == "__main__":
    main()
