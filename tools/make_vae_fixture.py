"""Makes tests/fixtures/vae_tiny.*.safetensors, the oracle of tests/vae.rs, by running the
VAE decoder the official DiT sampling code uses (diffusers' AutoencoderKL, as
`AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")` in DiT's sample.py) with a small
random configuration of the same architecture.

The tests read only the written files:

  vae_tiny.model.safetensors  post_quant_conv.* and decoder.* in diffusers' key layout, stored
                              as f16 (the f32 maths below runs on the f16-rounded values), with
                              metadata fora.vae.groups (GroupNorm groups; the real VAE's 32
                              is the loader's default) and fora.vae.scaling_factor
  vae_tiny.io.safetensors     latents [N, 4, h, w] f32 (what a latent DiT samples) and
                              images [N, 3, 4h, 4w] f32 = decode(latents / scaling_factor)

    pip install torch diffusers safetensors
    python3 tools/make_vae_fixture.py --out tests/fixtures
"""

import argparse
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

GROUPS = 8
SCALING = 0.18215


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    # Three up blocks (two upsamplers: 4x), 32 then 16 channels (a conv_shortcut where the
    # width changes), two resnets an up block, the mid block's attention over h*w tokens.
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=GROUPS,
        latent_channels=4,
        scaling_factor=SCALING,
    ).eval()
    state = {}
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if not (name.startswith("decoder.") or name.startswith("post_quant_conv.")):
                continue
            # Every parameter away from its init (GroupNorm's are ones and zeros), then
            # rounded to f16 so that the file holds exactly what the maths used.
            if name.endswith("bias") or "norm" in name:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
            else:
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
            p.copy_(p.half().float())
            state[name] = p.detach().half().contiguous()
        latents = torch.randn(2, 4, 5, 6)
        images = vae.decode(latents / SCALING).sample
    os.makedirs(args.out, exist_ok=True)
    save_file(state, os.path.join(args.out, "vae_tiny.model.safetensors"),
              metadata={"fora.vae.groups": str(GROUPS), "fora.vae.scaling_factor": str(SCALING)})
    save_file({"latents": latents.contiguous(), "images": images.contiguous()},
              os.path.join(args.out, "vae_tiny.io.safetensors"))
    print("images", tuple(images.shape), "std", images.std().item(),
          "range", images.min().item(), images.max().item())


if __name__ == "__main__":
    main()
