"""Converts an official DiT PyTorch checkpoint (.pt) to safetensors for `fora`.

fora reads the .pt itself (`fora sample --model DiT-XL-2-256x256.pt --arch DiT-XL/2`), and
`fora bench --model X.pt --arch A --save-weights X.safetensors` writes an f32 safetensors copy
without PyTorch; this tool remains for a copy in f16 or bf16, checked by PyTorch.

The input is a state dict (the released DiT-XL-2-256x256.pt) or a training checkpoint, a dict
holding "ema" and/or "model" (like the official sampler, "ema" is taken when present; choose
with --use). The architecture must be given (--arch DiT-XL/2 or
depth=..,hidden=..,heads=..,patch=..): heads cannot be inferred from shapes. Every key is
checked against the official layout of that architecture (unknown or missing keys, shapes,
non-finite values are refused, naming the key); the data shape (channels, input size, classes,
learn_sigma) is read from the tensors. The output holds the tensors in the chosen dtype and the
config in its metadata (fora.*), and is written to a temporary file, then renamed.

    python3 tools/convert_pt.py DiT-XL-2-256x256.pt --arch DiT-XL/2 --out dit-xl-2-256.safetensors
"""

import argparse
import math
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dit_torch import FREQ_DIM, config_metadata, parse_arch  # noqa: E402

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def fail(msg):
    sys.exit(f"convert_pt: error: {msg}")


def pick_state(ckpt, use):
    if not isinstance(ckpt, dict):
        fail(f"expected a state dict or a dict with 'ema'/'model', got {type(ckpt).__name__}")
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if use not in ("auto",):
            fail(f"--use {use}: the file is a plain state dict, not a training checkpoint")
        return ckpt
    order = ["ema", "model"] if use == "auto" else [use]
    for k in order:
        if k in ckpt and isinstance(ckpt[k], dict):
            return ckpt[k]
    fail(f"no state dict under {order} in the checkpoint (top-level keys: {sorted(ckpt)[:10]})")


def expected_layout(depth, hidden, patch, in_channels, tokens, num_classes, out_channels,
                    mlp_hidden):
    d = hidden
    layout = {
        "x_embedder.proj.weight": (d, in_channels, patch, patch),
        "x_embedder.proj.bias": (d,),
        "pos_embed": (1, tokens, d),
        "t_embedder.mlp.0.weight": (d, FREQ_DIM),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "final_layer.linear.weight": (patch * patch * out_channels, d),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        for suffix, shape in [
            ("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
            ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
            ("mlp.fc1.weight", (mlp_hidden, d)), ("mlp.fc1.bias", (mlp_hidden,)),
            ("mlp.fc2.weight", (d, mlp_hidden)), ("mlp.fc2.bias", (d,)),
            ("adaLN_modulation.1.weight", (6 * d, d)), ("adaLN_modulation.1.bias", (6 * d,)),
        ]:
            layout[f"blocks.{i}.{suffix}"] = shape
    return layout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="official .pt file")
    ap.add_argument("--arch", required=True, help="DiT-XL/2 or depth=..,hidden=..,heads=..,patch=..")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--use", choices=["auto", "ema", "model"], default="auto",
                    help="which weights of a training checkpoint (auto: ema, else model)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    args = ap.parse_args()

    try:
        arch = parse_arch(args.arch)
    except (ValueError, KeyError) as e:
        fail(str(e))
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
        fail(f"cannot read {args.checkpoint}: {e}")
    state = pick_state(ckpt, args.use)

    for key in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight"):
        if key not in state:
            fail(f"missing key {key}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    if (hidden, patch) != (arch["hidden"], arch["patch"]):
        fail(f"--arch {args.arch} has hidden {arch['hidden']}, patch {arch['patch']} but "
             f"x_embedder.proj.weight is {tuple(state['x_embedder.proj.weight'].shape)}")
    depth = 1 + max((int(k.split(".")[1]) for k in state
                     if k.startswith("blocks.") and k.split(".")[1].isdigit()), default=-1)
    if depth != arch["depth"]:
        fail(f"--arch {args.arch} has depth {arch['depth']} but the checkpoint has {depth} blocks")
    tokens = state["pos_embed"].shape[1]
    grid = int(round(math.sqrt(tokens)))
    if grid * grid != tokens:
        fail(f"pos_embed: {tokens} tokens is not a square grid")
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    out_rows = state["final_layer.linear.weight"].shape[0]
    if out_rows == patch * patch * 2 * in_channels:
        learn_sigma = True
    elif out_rows == patch * patch * in_channels:
        learn_sigma = False
    else:
        fail(f"final_layer.linear.weight has {out_rows} rows: expected "
             f"{patch * patch * 2 * in_channels} (learn_sigma) or {patch * patch * in_channels}")
    out_channels = in_channels * (2 if learn_sigma else 1)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] // hidden if fc1 is not None and fc1.shape[0] % hidden == 0 else 4
    layout = expected_layout(depth, hidden, patch, in_channels, tokens, num_classes,
                             out_channels, mlp_ratio * hidden)

    unknown = sorted(set(state) - set(layout))
    missing = sorted(set(layout) - set(state))
    if unknown:
        fail(f"unknown keys ({len(unknown)}): {', '.join(unknown[:20])}")
    if missing:
        fail(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    out = {}
    for key, shape in layout.items():
        t = state[key]
        if tuple(t.shape) != shape:
            fail(f"{key}: expected shape {list(shape)}, got {list(t.shape)}")
        if not t.is_floating_point():
            fail(f"{key}: dtype {t.dtype} is not floating point")
        if not torch.isfinite(t).all():
            fail(f"{key}: non-finite values")
        out[key] = t.detach().to(DTYPES[args.dtype]).contiguous()

    meta = config_metadata(depth, hidden, arch["heads"], patch, in_channels, grid * patch,
                           num_classes, learn_sigma, mlp_ratio)
    tmp = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                       f".{os.path.basename(args.out)}.tmp.{os.getpid()}")
    try:
        save_file(out, tmp, metadata=meta)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out}: {meta['fora.arch']}, input {grid * patch}, {in_channels} channels, "
          f"{num_classes} classes, learn_sigma={learn_sigma}, {len(out)} tensors ({args.dtype})")


if __name__ == "__main__":
    main()
