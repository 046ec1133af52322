"""Makes the oracle fixtures of tests/oracle.rs by running the OFFICIAL DiT code
(facebookresearch/DiT models.py, with torch CPU + timm) on small random-weight models.

The official code is not part of this project: fetch it yourself and point --official at the
directory that holds its models.py. Nothing here is needed at test time; the tests read only
the files written to --out:

  oracle_<name>.model.safetensors  weights in the official key layout (f32) + fora.* metadata
  oracle_<name>.io.safetensors     x [N,C,H,W] f32, t [N] i64, y [N] i64 and the outputs:
    out           official forward(x, t, y)
    out_cfg       official forward_with_cfg(x, t, y, cfg_scale) (guides eps channels 0..2)
    out_cfg_all   forward_with_cfg guiding all C eps channels: the official forward on
                  [half; half] combined by this script (the official code ships this variant
                  only as a commented-out line)
    cfg_scale     [1] f32
    x2, t2        inputs of a FORA reuse step
    out_reuse     tools/dit_torch.py (NOT official code: the official DiT has no FORA):
                  a computing step on (x, t, y), then a reuse step on (x2, t2, y)

It also checks tools/dit_torch.py against the official code (plain and CFG) and fails when
they disagree beyond float32 rounding.

    python3 tools/make_oracle_fixtures.py --official /path/to/DiT --out tests/fixtures
"""

import argparse
import math
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_torch  # noqa: E402

CONFIGS = {
    # hidden 48, 3 heads of 16, a 3x3 grid of tokens, learned sigma, 4 channels.
    "a": dict(depth=2, hidden=48, heads=3, patch=2, in_channels=4, input_size=6,
              num_classes=10, learn_sigma=True, rows=4, cfg_scale=4.0, seed=1),
    # fixed variance, 3 channels, patch 4 on 8x8 (4 tokens), 2 heads of 12.
    "b": dict(depth=1, hidden=24, heads=2, patch=4, in_channels=3, input_size=8,
              num_classes=5, learn_sigma=False, rows=2, cfg_scale=2.5, seed=2),
}


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_state(model, gen):
    """Realistic random weights: U(-a, a) with std 1/sqrt(fan_in) for matrices, small
    nonzero biases, labels of unit size, the official sin-cos pos_embed, and NONZERO adaLN
    and final layers (the official init zeroes them, which would hide their maths)."""
    state = {}
    for k, v in model.state_dict().items():
        if k == "pos_embed":
            state[k] = v.clone()
        elif k == "y_embedder.embedding_table.weight":
            state[k] = (torch.rand(v.shape, generator=gen) * 2 - 1)
        elif v.dim() == 1:
            state[k] = (torch.rand(v.shape, generator=gen) * 2 - 1) * 0.05
        else:
            fan_in = v[0].numel()
            a = math.sqrt(3.0 / fan_in)
            state[k] = (torch.rand(v.shape, generator=gen) * 2 - 1) * a
    return state


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="directory holding the official models.py")
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.official))
    import models as official  # the official DiT code, never committed here

    torch.set_grad_enabled(False)
    os.makedirs(args.out, exist_ok=True)
    for name, c in CONFIGS.items():
        gen = torch.Generator().manual_seed(c["seed"])
        ref = official.DiT(input_size=c["input_size"], patch_size=c["patch"],
                           in_channels=c["in_channels"], hidden_size=c["hidden"],
                           depth=c["depth"], num_heads=c["heads"], mlp_ratio=4.0,
                           class_dropout_prob=0.1, num_classes=c["num_classes"],
                           learn_sigma=c["learn_sigma"]).eval()
        state = random_state(ref, gen)
        ref.load_state_dict(state, strict=True)

        n, ch, s = c["rows"], c["in_channels"], c["input_size"]
        x = torch.randn(n, ch, s, s, generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        # Conditional labels first, null class in the second half (as a CFG batch).
        y = torch.randint(0, c["num_classes"], (n,), generator=gen)
        y[n // 2:] = c["num_classes"]
        out = ref.forward(x, t, y)
        out_cfg = ref.forward_with_cfg(x, t, y, c["cfg_scale"])
        half = x[: n // 2]
        both = ref.forward(torch.cat([half, half]), t, y)
        eps, rest = both[:, :ch], both[:, ch:]
        cond, uncond = torch.split(eps, n // 2, dim=0)
        g = uncond + c["cfg_scale"] * (cond - uncond)
        out_cfg_all = torch.cat([torch.cat([g, g]), rest], dim=1)

        meta = dit_torch.config_metadata(c["depth"], c["hidden"], c["heads"], c["patch"],
                                         ch, s, c["num_classes"], c["learn_sigma"])
        model_path = os.path.join(args.out, f"oracle_{name}.model.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, model_path, metadata=meta)

        # tools/dit_torch.py against the official code, on the file just written.
        ours = dit_torch.DiT.from_safetensors(model_path)
        e_plain = rel_l2(ours(x, t, y), out)
        e_cfg = rel_l2(ours.forward_with_cfg(x, t, y, c["cfg_scale"]), out_cfg)
        e_all = rel_l2(ours.forward_with_cfg(x, t, y, c["cfg_scale"], all_eps=True), out_cfg_all)
        print(f"{name}: dit_torch vs official: forward {e_plain:.2e}, cfg {e_cfg:.2e}, "
              f"cfg all-eps {e_all:.2e}")
        assert max(e_plain, e_cfg, e_all) < 1e-6, "tools/dit_torch.py disagrees with official"

        # FORA: compute at (x, t, y), then reuse at (x2, t2, y); reuse with unchanged inputs
        # must reproduce the computing step.
        x2 = x * 0.9 + 0.1 * torch.randn(x.shape, generator=gen)
        t2 = (t + 137) % 1000
        computed = ours(x, t, y, cache="compute")
        same = ours(x, t, y, cache="reuse")
        assert rel_l2(same, computed) < 1e-6
        out_reuse = ours(x2, t2, y, cache="reuse")
        assert rel_l2(out_reuse, ours(x2, t2, y)) > 1e-4, "reuse should differ from compute"

        io = dict(x=x, t=t.long(), y=y.long(), out=out, out_cfg=out_cfg,
                  out_cfg_all=out_cfg_all, cfg_scale=torch.tensor([c["cfg_scale"]]),
                  x2=x2, t2=t2.long(), out_reuse=out_reuse)
        io_path = os.path.join(args.out, f"oracle_{name}.io.safetensors")
        save_file({k: v.contiguous() for k, v in io.items()}, io_path)
        print(f"{name}: wrote {model_path} ({os.path.getsize(model_path)} B), "
              f"{io_path} ({os.path.getsize(io_path)} B)")


if __name__ == "__main__":
    main()
