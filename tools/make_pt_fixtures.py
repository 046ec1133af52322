"""Makes tests/fixtures/*.pt, *.bin: PyTorch checkpoints (torch.save) of tensors the repo
already holds as safetensors, for tests/pytorch.rs, which reads both and holds them equal.

  dit_b.pt           oracle_b.model.safetensors' DiT as a plain state dict (as the official
                     DiT-XL-2-256x256.pt is), f32, in torch.save's ZIP format; its
                     blocks.0.attn.qkv.weight is a transposed view (not contiguous) and its
                     pos_embed a view at an offset into a larger storage, so the reader must
                     gather them
  dit_b_legacy.pt    the same state dict in the legacy (pre-1.6) format
  dit_b_training.pt  a training checkpoint as the official train.py writes one: {"model",
                     "ema", "opt", "args"}; "ema" holds the weights in bf16, "model" the same
                     plus one (the sampler must take "ema"), "opt" an optimizer state with
                     tensors, "args" an argparse.Namespace
  dit_b_lightning.ckpt
                     the state dict under "state_dict" beside a global_step and optimizer
                     states, as PyTorch Lightning (and Stable Diffusion's .ckpt) nest it
  dit_b_ddp.pt       the state dict of a compiled model under DistributedDataParallel: every name
                     under "module._orig_mod."
  flat_sd.ckpt       a flat state dict of a few small tensors named as a whole Stable Diffusion
                     checkpoint names them (model.diffusion_model.*, first_stage_model.*,
                     cond_stage_model.*, model_ema.*): no key is a nest, so nothing is stripped
  broadcast.pt       {"w": one float expanded to 2^30 elements}: a view larger than its file
  noise_tiny.pt      {"x_T" [1, 3, 32, 32], "noise" [5, 1, 3, 32, 32]} f32: a --noise-file for
                     the embedded model, as one might save it from the official sampler
  vae_tiny_diffusers/
    diffusion_pytorch_model.bin, config.json
                     vae_tiny.model.safetensors' decoder (f16) as diffusers saves an
                     AutoencoderKL (tools/make_vae_fixture.py's settings; the GroupNorm groups
                     and scaling factor, which the .bin cannot hold, in config.json)

    pip install torch safetensors
    python3 tools/make_pt_fixtures.py --dir tests/fixtures
"""

import argparse
import collections
import json
import os

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="tests/fixtures")
    args = ap.parse_args()
    d = args.dir
    torch.manual_seed(0)

    dit = load_file(os.path.join(d, "oracle_b.model.safetensors"))
    state = collections.OrderedDict(sorted(dit.items()))
    qkv = state["blocks.0.attn.qkv.weight"]
    state["blocks.0.attn.qkv.weight"] = qkv.t().contiguous().t()
    assert not state["blocks.0.attn.qkv.weight"].is_contiguous()
    pos = state["pos_embed"]
    big = torch.cat([torch.randn(7), pos.flatten(), torch.randn(5)])
    state["pos_embed"] = big[7 : 7 + pos.numel()].view(pos.shape)
    assert state["pos_embed"].storage_offset() == 7
    torch.save(state, os.path.join(d, "dit_b.pt"))
    torch.save(
        state,
        os.path.join(d, "dit_b_legacy.pt"),
        _use_new_zipfile_serialization=False,
    )

    ema = collections.OrderedDict((k, v.to(torch.bfloat16)) for k, v in sorted(dit.items()))
    model = collections.OrderedDict((k, v + 1) for k, v in sorted(dit.items()))
    first = next(iter(model.values()))
    opt = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(first)}},
        "param_groups": [{"lr": 1e-4, "weight_decay": 0, "params": [0]}],
    }
    training = {
        "model": model,
        "ema": ema,
        "opt": opt,
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256, global_seed=0),
    }
    torch.save(training, os.path.join(d, "dit_b_training.pt"))

    lightning = {
        "state_dict": collections.OrderedDict(sorted(dit.items())),
        "global_step": 3,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4)}}}],
    }
    torch.save(lightning, os.path.join(d, "dit_b_lightning.ckpt"))
    wrapped = collections.OrderedDict(
        ("module._orig_mod." + k, v) for k, v in sorted(dit.items())
    )
    torch.save(wrapped, os.path.join(d, "dit_b_ddp.pt"))
    flat = collections.OrderedDict(
        [
            ("model.diffusion_model.input_blocks.0.0.weight", torch.randn(2, 3)),
            ("first_stage_model.decoder.conv_in.bias", torch.randn(4)),
            ("cond_stage_model.transformer.final_layer_norm.bias", torch.randn(5)),
            ("model_ema.decay", torch.tensor(0.9999)),
        ]
    )
    torch.save(flat, os.path.join(d, "flat_sd.ckpt"))
    torch.save({"w": torch.ones(1).expand(1 << 30)}, os.path.join(d, "broadcast.pt"))
    noise = {"x_T": torch.randn(1, 3, 32, 32), "noise": torch.randn(5, 1, 3, 32, 32)}
    torch.save(noise, os.path.join(d, "noise_tiny.pt"))

    vae = load_file(os.path.join(d, "vae_tiny.model.safetensors"))
    folder = os.path.join(d, "vae_tiny_diffusers")
    os.makedirs(folder, exist_ok=True)
    torch.save(
        collections.OrderedDict(sorted(vae.items())),
        os.path.join(folder, "diffusion_pytorch_model.bin"),
    )
    config = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.31.0",
        "act_fn": "silu",
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 32,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
