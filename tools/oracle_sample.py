#!/usr/bin/env python3
"""Reference sampler: the OFFICIAL DiT code (facebookresearch/DiT: models.py, diffusion/) with the
official FORA static schedule, on a checkpoint and a noise file, to compare with `fora sample`.

The official repository is not part of this project: fetch it and pass its path, e.g.

    git clone https://github.com/facebookresearch/DiT /tmp/DiT
    pip install torch timm safetensors numpy
    python3 tools/oracle_sample.py --dit-repo /tmp/DiT --model ckpt.safetensors \
        --noise-file noise.safetensors --class 3 --class 9 --steps 50 --cfg-scale 4 \
        --cache-interval 3 --out oracle.safetensors --compare fora_samples.safetensors

What it runs, step for step as the official `sample.py` + `p_sample_loop`:
- the model is the official `DiT` class, loaded from the safetensors checkpoint (official key
  layout; the architecture from `--arch` or the checkpoint's `fora.*` metadata);
- `create_diffusion(str(steps))`, the loop i = S-1 .. 0 calling the official `p_sample` (or
  `ddim_sample`) with clip_denoised=False; the Gaussian noise of loop step k is `noise[k]` of
  the noise file (`th.randn_like` is patched to return it), x_T is `x_T`;
- with --cfg-scale: batch [z; z], labels [y; null], the official `forward_with_cfg`
  (guidance on eps channels 0..2; `--cfg-mode all` guides all eps channels instead);
- FORA: every block's `attn` and `mlp` modules are wrapped; on a computing step (i == S-1 or
  i % N == 0) they run and store their output (attention after proj, MLP after fc2, i.e.
  before gate and residual); on a reuse step they return the stored output, so adaLN, gates,
  residual adds, embeddings and the final layer are recomputed as FORA specifies.

`--make-noise SEED` writes a fresh noise file (`x_T` [B,C,H,W], `noise` [S,B,C,H,W], f32) first.
`--compare FILE` prints the relative L2 distance of FILE's `samples` to the oracle and exits
non-zero when it exceeds `--tolerance`.
"""

import argparse
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def parse_arch(name):
    """DiT-XL/2 or depth=..,hidden=..,heads=..,patch=.. -> (depth, hidden, heads, patch)."""
    if name.startswith("DiT-"):
        size, patch = name[4:].split("/")
        depth, hidden, heads = SIZES[size]
        return depth, hidden, heads, int(patch)
    kv = dict(part.split("=") for part in name.split(","))
    return int(kv["depth"]), int(kv["hidden"]), int(kv["heads"]), int(kv["patch"])


def build_model(dit_models, path, arch):
    state = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if arch:
        depth, hidden, heads, patch = parse_arch(arch)
    elif "fora.heads" in meta:
        depth, hidden, heads, patch = (int(meta[f"fora.{k}"]) for k in ("depth", "hidden", "heads", "patch"))
    else:
        sys.exit(f"{path}: no fora.* metadata; pass --arch")
    state = {k: v.float() for k, v in state.items()}
    in_channels = state["x_embedder.proj.weight"].shape[1]
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    tokens = state["pos_embed"].shape[1]
    input_size = int(round(tokens ** 0.5)) * patch
    out_ch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    learn_sigma = out_ch == 2 * in_channels
    model = dit_models.DiT(
        input_size=input_size,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,  # > 0 so the table has the null row, as the official models
        num_classes=num_classes,
        learn_sigma=learn_sigma,
    )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, dict(in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                       learn_sigma=learn_sigma)


class CachedModule(torch.nn.Module):
    """Runs `inner` and stores its output on computing steps; returns the stored output on
    reuse steps (FORA's per-layer attention / MLP cache)."""

    def __init__(self, inner, state):
        super().__init__()
        self.inner = inner
        self.state = state
        self.cached = None

    def forward(self, x):
        if self.state["compute"]:
            self.cached = self.inner(x)
        elif self.cached is None or self.cached.shape[0] != x.shape[0]:
            raise RuntimeError("FORA reuse step before any computing step")
        return self.cached


def install_fora(model):
    state = {"compute": True}
    for block in model.blocks:
        block.attn = CachedModule(block.attn, state)
        block.mlp = CachedModule(block.mlp, state)
    return state


def forward_with_cfg_all(model, x, t, y, cfg_scale):
    """The official forward_with_cfg with its documented alternative: guide all eps channels."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model.forward(combined, t, y)
    eps, rest = model_out[:, : model.in_channels], model_out[:, model.in_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def rel_l2(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_oracle(dit_models, create_diffusion, model_path, arch, noise_path, classes, steps=250,
               respacing=None, sampler="ddpm", eta=0.0, cfg_scale=None, cfg_mode="official",
               cache_interval=1, make_noise=None):
    """Samples `classes` with the official code; returns (samples [B,C,H,W], steps computed)."""
    model, info = build_model(dit_models, model_path, arch)
    b, c, s = len(classes), info["in_channels"], info["input_size"]
    for cls in classes:
        if not 0 <= cls < info["num_classes"]:
            sys.exit(f"class {cls} outside 0..{info['num_classes'] - 1}")
    if cache_interval < 1:
        sys.exit("--cache-interval must be at least 1")
    diffusion = create_diffusion(respacing or str(steps), learn_sigma=info["learn_sigma"])
    steps = diffusion.num_timesteps

    if make_noise is not None:
        g = torch.Generator().manual_seed(make_noise)
        save_file({"x_T": torch.randn(b, c, s, s, generator=g),
                   "noise": torch.randn(steps, b, c, s, s, generator=g)}, noise_path)
    noise_file = load_file(noise_path)
    x_t, noise = noise_file["x_T"].float(), noise_file["noise"].float()
    assert tuple(x_t.shape) == (b, c, s, s), f"x_T shape {tuple(x_t.shape)} != {(b, c, s, s)}"
    assert tuple(noise.shape) == (steps, b, c, s, s), \
        f"noise shape {tuple(noise.shape)} != {(steps, b, c, s, s)}"

    fora = install_fora(model)
    y = torch.tensor(classes, dtype=torch.long)
    guided = cfg_scale is not None and cfg_scale != 1.0
    if guided:
        z = torch.cat([x_t, x_t], 0)
        y = torch.cat([y, torch.full_like(y, info["num_classes"])], 0)
        if cfg_mode == "official":
            model_fn = model.forward_with_cfg
        else:
            def model_fn(x, t, y, cfg_scale):
                return forward_with_cfg_all(model, x, t, y, cfg_scale)
        kwargs = dict(y=y, cfg_scale=cfg_scale)
    else:
        z = x_t.clone()
        model_fn = model.forward
        kwargs = dict(y=y)

    # noise[k] for both halves: the unconditional half is discarded by forward_with_cfg anyway.
    current = {"k": 0}
    original_randn_like = torch.randn_like

    def step_noise(like):
        n = noise[current["k"]]
        n = torch.cat([n, n], 0) if guided else n
        assert n.shape == like.shape
        return n.clone()

    torch.randn_like = step_noise
    computed = 0
    try:
        img = z
        for k, i in enumerate(reversed(range(steps))):
            current["k"] = k
            fora["compute"] = i == steps - 1 or i % cache_interval == 0
            computed += fora["compute"]
            t = torch.tensor([i] * img.shape[0])
            if sampler == "ddpm":
                out = diffusion.p_sample(model_fn, img, t, clip_denoised=False, model_kwargs=kwargs)
            else:
                out = diffusion.ddim_sample(model_fn, img, t, clip_denoised=False,
                                            model_kwargs=kwargs, eta=eta)
            img = out["sample"]
    finally:
        torch.randn_like = original_randn_like
    samples = img[:b].contiguous() if guided else img.contiguous()
    return samples, computed


# The cases of tests/fixtures/sample_expected.safetensors (read by tests/sampler.rs):
# name -> (sampler, eta, cfg_scale, cfg_mode, cache_interval), all over 50 steps, classes 3, 9.
FIXTURE_CASES = {
    "ddpm_cfg4_fora3": ("ddpm", 0.0, 4.0, "official", 3),
    "ddpm_plain": ("ddpm", 0.0, None, "official", 1),
    "ddim_eta05_cfg2_all_fora2": ("ddim", 0.5, 2.0, "all", 2),
}


def make_fixture(dit_models, create_diffusion, out_dir):
    """Writes sample_model / sample_noise / sample_expected .safetensors into out_dir: a tiny
    random DiT (depth 2, hidden 32, 2 heads, patch 2, 4x8x8 latents, 10 classes, learn_sigma)
    with NONZERO adaLN and final-layer weights (the official init zeroes them, which would hide
    gates and modulations), a torch noise file, and the official samples of FIXTURE_CASES."""
    import os
    torch.manual_seed(0)
    depth, hidden, heads, patch, size, classes_n = 2, 32, 2, 2, 8, 10
    m = dit_models.DiT(input_size=size, patch_size=patch, in_channels=4, hidden_size=hidden,
                       depth=depth, num_heads=heads, num_classes=classes_n, learn_sigma=True)
    state = {}
    for k, v in m.state_dict().items():
        if k == "pos_embed":
            state[k] = v.contiguous()  # the official fixed 2-D sin-cos table
            continue
        fan_in = int(np.prod(v.shape[1:])) if v.dim() > 1 else 0
        a = 1.0 if "embedding_table" in k else ((3.0 / fan_in) ** 0.5 if fan_in else 0.05)
        state[k] = ((torch.rand_like(v) * 2 - 1) * a).contiguous()
    meta = {"fora.arch": f"depth={depth},hidden={hidden},heads={heads},patch={patch}",
            "fora.depth": str(depth), "fora.hidden": str(hidden), "fora.heads": str(heads),
            "fora.patch": str(patch), "fora.in_channels": "4", "fora.input_size": str(size),
            "fora.num_classes": str(classes_n), "fora.mlp_ratio": "4", "fora.learn_sigma": "true"}
    model_path = os.path.join(out_dir, "sample_model.safetensors")
    noise_path = os.path.join(out_dir, "sample_noise.safetensors")
    save_file(state, model_path, metadata=meta)
    expected = {}
    for i, (name, (sampler, eta, cfg, mode, n)) in enumerate(FIXTURE_CASES.items()):
        samples, computed = run_oracle(dit_models, create_diffusion, model_path, None, noise_path,
                                       [3, 9], steps=50, sampler=sampler, eta=eta, cfg_scale=cfg,
                                       cfg_mode=mode, cache_interval=n,
                                       make_noise=1 if i == 0 else None)
        print(f"{name}: {computed} computed, mean |x| {samples.abs().mean().item():.6g}")
        expected[name] = samples
    save_file(expected, os.path.join(out_dir, "sample_expected.safetensors"))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit-repo", required=True, help="path of a facebookresearch/DiT checkout")
    p.add_argument("--make-fixture", metavar="DIR",
                   help="write the tests/fixtures/sample_* files into DIR and exit")
    p.add_argument("--model")
    p.add_argument("--arch")
    p.add_argument("--noise-file")
    p.add_argument("--make-noise", type=int, metavar="SEED", help="write a fresh noise file first")
    p.add_argument("--class", dest="classes", type=int, action="append")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--respacing", help="official respacing string (default: str(steps))")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--cfg-mode", choices=["official", "all"], default="official")
    p.add_argument("--cache-interval", type=int, default=1)
    p.add_argument("--out", help="write the oracle samples here (safetensors, `samples`)")
    p.add_argument("--compare", help="a `fora sample` output to compare with")
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args()

    sys.path.insert(0, args.dit_repo)
    import models as dit_models  # the official DiT models.py
    from diffusion import create_diffusion  # the official diffusion package

    torch.set_grad_enabled(False)
    if args.make_fixture:
        make_fixture(dit_models, create_diffusion, args.make_fixture)
        return
    if not (args.model and args.noise_file and args.classes):
        p.error("--model, --noise-file and at least one --class are required")
    samples, computed = run_oracle(
        dit_models, create_diffusion, args.model, args.arch, args.noise_file, args.classes,
        steps=args.steps, respacing=args.respacing, sampler=args.sampler, eta=args.eta,
        cfg_scale=args.cfg_scale, cfg_mode=args.cfg_mode, cache_interval=args.cache_interval,
        make_noise=args.make_noise)
    steps = args.steps if not args.respacing else None
    print(f"oracle: {computed} steps computed of {steps or args.respacing}; "
          f"samples {tuple(samples.shape)}, mean |x| {samples.abs().mean().item():.6g}")
    if args.out:
        save_file({"samples": samples}, args.out)
    if args.compare:
        got = load_file(args.compare)["samples"].float()
        assert got.shape == samples.shape, \
            f"{args.compare}: shape {tuple(got.shape)} != {tuple(samples.shape)}"
        err = rel_l2(got.numpy(), samples.numpy())
        ok = err <= args.tolerance
        print(f"rel-L2 {args.compare} vs oracle: {err:.3e} (tolerance {args.tolerance:g}) "
              f"{'OK' if ok else 'FAIL'}")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
