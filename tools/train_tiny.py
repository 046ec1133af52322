#!/usr/bin/env python3
"""Trains fora's embedded default model: a small class-conditional DiT (official architecture
and key layout, learn_sigma, a null class for classifier-free guidance) in pixel space on
scikit-learn's bundled handwritten digits (8x8, 10 classes, no download), upscaled to 32x32,
values in [-1, 1]. Patch 2 gives 256 tokens, as DiT-XL/2 at 256 px. The gray images are stored as
3 (equal) channels by default: the official classifier-free guidance combines channels 0..2 of
the model output, which for 3 channels are exactly the eps channels (with 1 channel it would
also extrapolate the learned variance).

Training follows the official DiT / ADM recipe: uniform timesteps of the 1000-step linear-beta
process, the hybrid loss (MSE on eps + the variational bound for the learned-range variance,
with the mean frozen inside the VB term, loss type MSE so the VB term is not rescaled),
labels dropped to the null class 10% of the time, AdamW without weight decay, an EMA of the
weights (the EMA is what gets saved). Departures from the official ImageNet recipe, because this
model trains in under an hour on 2 CPU cores instead of days: a larger learning rate with a
linear warm-up and a cosine decay, gradient clipping, an EMA decay that warms up (a 0.9999 EMA
would still be mostly the initialisation after a few thousand steps), and Min-SNR weighting
(gamma 5) of the eps term, which its authors report to speed up convergence several times;
with it this small model draws recognisable digits within the hour.

The defaults are the recipe of the committed models/tiny.safetensors (DiT depth 4, hidden 64,
one head of 64, 10000 steps of 64 images): 55 minutes on 2 CPU cores, and it reproduces it:

    python3 tools/train_tiny.py --device cpu --threads 2 --out models/tiny.safetensors
    python3 tools/train_tiny.py --device cuda --out /tmp/tiny.safetensors      # minutes on a GPU
    python3 tools/train_tiny.py --device cpu --steps 20 --threads 1 --out /tmp/t.safetensors

Everything random is seeded (init on the CPU; batches, timesteps, label drops and noise on the
training device), so a run is reproducible on one kind of device: CPU runs are bitwise
reproducible, CUDA runs up to the non-determinism of some GPU kernels. CPU and CUDA runs of one
seed draw different batches.

At the end (by default on CUDA) the script samples `--eval-per-class` images of every class
with the EMA weights (250-step DDPM, learned variance, classifier-free guidance at scale 4, the
official recipe, in PyTorch) and prints the accuracy of tools/quality.py's classifier on them,
so one run says whether the model is good enough before fora is involved.
"""

import argparse
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

NUM_TIMESTEPS = 1000
NUM_CLASSES = 10
IMAGE_SIZE = 32


def digits_dataset(size=IMAGE_SIZE, channels=3):
    """scikit-learn's digits as float32 [N, channels, size, size] in [-1, 1] (bilinear upscaling
    of the 8x8 images, 0..16 -> -1..1, gray repeated over the channels) and int64 labels [N].
    Deterministic."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0).repeat(1, channels, 1, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    return x.contiguous(), y


def sincos_pos_embed(hidden, grid):
    """The official fixed 2-D sin-cos position embedding [grid*grid, hidden]: for the token at
    row i, column j, the first half encodes j and the second half i, each [sin(p w), cos(p w)]
    with w_k = 10000^(-k / (hidden/4)) (the same as fora's `weights::sincos_pos_embed`)."""
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    out = np.zeros((grid * grid, hidden), dtype=np.float64)
    for i in range(grid):
        for j in range(grid):
            row = out[i * grid + j]
            for half, pos in ((0, j), (1, i)):
                a = pos * omega
                row[half * 2 * quarter: half * 2 * quarter + quarter] = np.sin(a)
                row[half * 2 * quarter + quarter: (half + 1) * 2 * quarter] = np.cos(a)
    return out.astype(np.float32)


def official_init(model, generator):
    """The official DiT initialisation: xavier-uniform Linears with zero biases, the patch
    embedding as a Linear, N(0, 0.02) label table and t-MLP, the fixed sin-cos pos_embed, and
    zeroed adaLN modulations and final linear (every block starts as the identity)."""
    import torch
    import torch.nn as nn

    def xavier_(w):
        fan_out, fan_in = w.shape[0], w[0].numel()
        a = math.sqrt(6.0 / (fan_in + fan_out))
        with torch.no_grad():
            w.copy_(torch.rand(w.shape, generator=generator) * (2 * a) - a)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            xavier_(m.weight)
            nn.init.zeros_(m.bias)
    xavier_(model.x_embedder.proj.weight)
    nn.init.zeros_(model.x_embedder.proj.bias)
    with torch.no_grad():
        table = model.y_embedder.embedding_table.weight
        table.copy_(torch.randn(table.shape, generator=generator) * 0.02)
        for k in (0, 2):
            w = model.t_embedder.mlp[k].weight
            w.copy_(torch.randn(w.shape, generator=generator) * 0.02)
        hidden = model.pos_embed.shape[-1]
        grid = int(round(math.sqrt(model.pos_embed.shape[1])))
        model.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(hidden, grid))[None])
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def linear_betas():
    return np.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=np.float64)


def respaced_betas(steps):
    """The official respacing of the 1000-step process to `steps` steps at the fractional stride
    (`space_timesteps(1000, "250")`): (betas of the respaced process, original timesteps)."""
    stride = (NUM_TIMESTEPS - 1) / (steps - 1) if steps > 1 else 1
    use = sorted({round(i * stride) for i in range(steps)})
    abar = np.cumprod(1.0 - linear_betas())
    betas, last = [], 1.0
    for i in use:
        betas.append(1.0 - abar[i] / last)
        last = abar[i]
    return np.array(betas), use


class Schedule:
    """A Gaussian diffusion process (default: the 1000-step linear-beta one, 1e-4 .. 0.02),
    float64 tables as the official code, gathered per step index as float32 [N, 1, 1, 1]."""

    def __init__(self, device, betas=None):
        import torch

        betas = linear_betas() if betas is None else betas
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "sqrt_abar": np.sqrt(abar),
            "sqrt_1m_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar),
            "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1.0),
            # Clipped: the posterior variance is 0 at t = 0.
            "post_logvar": np.log(np.append(post_var[1], post_var[1:])),
            "log_beta": np.log(betas),
            "coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        self.t = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in tables.items()}

    def __call__(self, name, t):
        return self.t[name][t][:, None, None, None]


def sample_ddpm(model, labels, steps, cfg_scale, generator, device):
    """The official DDPM sampler with learned-range variance and classifier-free guidance
    (`forward_with_cfg`, scale != 1) over the respaced process; returns x_0 [N, C, H, W]."""
    import torch

    betas, timesteps = respaced_betas(steps)
    sched = Schedule(device, betas)
    n = len(labels)
    c, size = model.in_channels, int(round(math.sqrt(model.pos_embed.shape[1]))) * model.patch
    y = torch.as_tensor(labels, device=device)
    guided = cfg_scale != 1.0
    if guided:
        y = torch.cat([y, torch.full_like(y, model.num_classes)])
    x = torch.randn((n, c, size, size), generator=generator, device=device)
    for i in reversed(range(len(timesteps))):
        xin = torch.cat([x, x]) if guided else x
        t_orig = torch.full((len(xin),), timesteps[i], device=device, dtype=torch.int64)
        out = (model.forward_with_cfg(xin, t_orig, y, cfg_scale) if guided
               else model(xin, t_orig, y))[:n]
        eps, v = out[:, :c], out[:, c:]
        idx = torch.full((n,), i, device=device, dtype=torch.int64)
        frac = (v + 1.0) / 2.0
        logvar = frac * sched("log_beta", idx) + (1.0 - frac) * sched("post_logvar", idx)
        x0 = sched("sqrt_recip_abar", idx) * x - sched("sqrt_recipm1_abar", idx) * eps
        mean = sched("coef1", idx) * x0 + sched("coef2", idx) * x
        if i > 0:
            noise = torch.randn(x.shape, generator=generator, device=device)
            x = mean + torch.exp(0.5 * logvar) * noise
        else:
            x = mean
    return x


def normal_kl(mean1, logvar1, mean2, logvar2):
    import torch

    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log p(x) of a Gaussian discretised to 256 levels over [-1, 1] (nats), as ADM/DiT."""
    import torch

    def cdf(v):  # the tanh approximation of the standard normal CDF the official code uses
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    logp = torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -logp


def hybrid_loss(model_out, x0, x_t, t, noise, sched, min_snr_gamma=0.0):
    """The official learn_sigma training loss (LossType.MSE): per-row mean of
    (eps - eps_pred)^2 plus the VB term in bits of the learned-range variance, computed with
    the eps prediction detached so that the VB term trains only the variance.

    With `min_snr_gamma` > 0 the eps term of each row is weighted by min(SNR(t), gamma) / SNR(t)
    (Min-SNR weighting, Hang et al. 2023, arXiv 2303.09556): nearly-clean timesteps, whose
    imperceptible detail otherwise dominates the gradient, count less, and the model learns the
    shapes several times sooner. Returns (loss, unweighted eps MSE, VB)."""
    import torch

    c = x0.shape[1]
    eps, v = model_out[:, :c], model_out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    weighted = mse
    if min_snr_gamma > 0:
        snr = (sched("sqrt_abar", t) / sched("sqrt_1m_abar", t)).flatten() ** 2
        weighted = mse * torch.clamp(snr, max=min_snr_gamma) / snr

    eps_frozen = eps.detach()
    frac = (v + 1.0) / 2.0
    model_logvar = frac * sched("log_beta", t) + (1.0 - frac) * sched("post_logvar", t)
    pred_x0 = sched("sqrt_recip_abar", t) * x_t - sched("sqrt_recipm1_abar", t) * eps_frozen
    model_mean = sched("coef1", t) * pred_x0 + sched("coef2", t) * x_t
    true_mean = sched("coef1", t) * x0 + sched("coef2", t) * x_t
    true_logvar = sched("post_logvar", t)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(dim=(1, 2, 3))
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3))
    vb = torch.where(t == 0, nll, kl) / math.log(2.0)
    return (weighted + vb).mean(), mse.mean(), vb.mean()


def learning_rate(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where to train (default cuda)")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps (default 10000)")
    p.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default 200)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (default 0.999)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=1,
                   help="attention heads (default 1: head_dim 64, a size the CUDA kernels support)")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--channels", type=int, choices=[1, 3], default=3,
                   help="image channels (default 3: gray repeated, see above)")
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="Min-SNR weighting of the eps loss (default 5; 0 = the official "
                        "unweighted loss)")
    p.add_argument("--class-dropout", type=float, default=0.1,
                   help="probability of training a row on the null class (default 0.1)")
    p.add_argument("--save-dtype", choices=["f32", "f16"], default="f32",
                   help="dtype of the saved tensors (default f32)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default)")
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes and save the EMA weights "
                        "reached (recorded in the metadata); for runs with a hard time budget")
    p.add_argument("--save-every", type=int, default=0,
                   help="also write the EMA weights reached to --out every this many steps "
                        "(0 = only at the end), so a long run can be inspected while it trains")
    p.add_argument("--eval-per-class", type=int, default=None,
                   help="images per class sampled at the end to measure accuracy "
                        "(default 20 on cuda, 0 = none on cpu)")
    p.add_argument("--eval-steps", type=int, default=250,
                   help="DDPM steps of that evaluation (default 250)")
    p.add_argument("--eval-cfg-scale", type=float, default=4.0,
                   help="guidance scale of that evaluation (default 4.0)")
    p.add_argument("--out", default="models/tiny.safetensors", help="output safetensors")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "depth", "hidden", "heads", "patch", "log_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.hidden % args.heads != 0:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.hidden % 4 != 0:
        p.error(f"--hidden {args.hidden} must be a multiple of 4 (sin-cos position embedding)")
    if IMAGE_SIZE % args.patch != 0:
        p.error(f"--patch {args.patch} does not divide the image size {IMAGE_SIZE}")
    if not 0.0 <= args.class_dropout < 1.0:
        p.error("--class-dropout must be in [0, 1)")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error("--ema-decay must be in [0, 1)")
    if args.lr <= 0 or args.warmup < 0:
        p.error("--lr must be positive and --warmup >= 0")
    if args.eval_per_class is None:
        args.eval_per_class = 20 if args.device == "cuda" else 0
    if args.eval_per_class < 0 or args.eval_steps <= 0 or args.eval_steps > NUM_TIMESTEPS:
        p.error(f"--eval-per-class must be >= 0 and --eval-steps in 1..{NUM_TIMESTEPS}")
    if not args.min_snr_gamma >= 0:
        p.error("--min-snr-gamma must be >= 0")
    if args.save_every < 0:
        p.error("--save-every must be >= 0")
    if args.max_minutes is not None and not args.max_minutes > 0:
        p.error("--max-minutes must be positive")
    if not math.isfinite(args.eval_cfg_scale):
        p.error("--eval-cfg-scale must be finite")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: directory {out_dir} does not exist")
    return args


def save_checkpoint(model, path, dtype, extra_meta):
    """Writes the model's state in the official key layout with fora's config metadata,
    atomically (temporary file beside `path`, then rename)."""
    import torch
    from safetensors.torch import save_file

    target = {"f32": torch.float32, "f16": torch.float16}[dtype]
    state = {k: v.detach().to("cpu", target).contiguous() for k, v in model.state_dict().items()}
    meta = dict(model.metadata())
    meta.update(extra_meta)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def train_metadata(args, steps_done, elapsed):
    """The `fora.train.*` metadata that records how a checkpoint was made."""
    return {
        "fora.trained_by": "tools/train_tiny.py",
        "fora.train.data": f"sklearn digits 8x8 -> {IMAGE_SIZE}x{IMAGE_SIZE} bilinear, "
                           f"{args.channels} channel(s), [-1, 1]",
        "fora.train.steps": str(steps_done),
        "fora.train.planned_steps": str(args.steps),
        "fora.train.batch": str(args.batch),
        "fora.train.lr": str(args.lr),
        "fora.train.seed": str(args.seed),
        "fora.train.device": args.device,
        "fora.train.seconds": f"{elapsed:.0f}",
        "fora.train.weights": f"EMA decay {args.ema_decay}",
        "fora.train.recipe": f"depth {args.depth}, hidden {args.hidden}, heads {args.heads}, "
                             f"warmup {args.warmup}, min-SNR gamma {args.min_snr_gamma}, "
                             f"class dropout {args.class_dropout}, threads {args.threads}",
    }


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        # Must be set before cuBLAS initialises for deterministic GEMMs.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import copy

    import torch
    from dit_torch import DiT

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device (use --device cpu)")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    x_all, y_all = digits_dataset(channels=args.channels)
    init_gen = torch.Generator().manual_seed(args.seed)
    # Batches, timesteps, label drops and noise come from a generator on the training device,
    # so a CUDA step never waits on a host-to-device copy.
    data_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    model = DiT(args.depth, args.hidden, args.heads, args.patch, in_channels=args.channels,
                input_size=IMAGE_SIZE, num_classes=NUM_CLASSES, learn_sigma=True)
    official_init(model, init_gen)
    model.to(device).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.state_dict().values())
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    if args.device == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW(params, **opt_kwargs)
    sched = Schedule(device)
    x_dev = x_all.to(device)
    y_dev = y_all.to(device)
    # Parameters in the same order (ema is a deep copy); pos_embed is fixed in both.
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())

    print(f"train_tiny: {model.metadata()['fora.arch']}, {n_params / 1e6:.2f} M params, "
          f"{len(x_all)} digits at {IMAGE_SIZE}x{IMAGE_SIZE}, batch {args.batch}, "
          f"{args.steps} steps on {args.device}", flush=True)
    start = time.time()
    run_loss = run_mse = run_vb = 0.0
    run_n = 0
    steps_done = 0
    for step in range(args.steps):
        if args.max_minutes is not None and time.time() - start > args.max_minutes * 60:
            print(f"train_tiny: --max-minutes {args.max_minutes} reached after {step} of "
                  f"{args.steps} steps; saving the EMA weights reached so far", flush=True)
            break
        idx = torch.randint(len(x_all), (args.batch,), generator=data_gen, device=device)
        t = torch.randint(NUM_TIMESTEPS, (args.batch,), generator=data_gen, device=device)
        drop = torch.rand(args.batch, generator=data_gen, device=device) < args.class_dropout
        noise = torch.randn((args.batch, args.channels, IMAGE_SIZE, IMAGE_SIZE),
                            generator=data_gen, device=device)
        x0 = x_dev[idx]
        y = torch.where(drop, torch.full_like(y_dev[idx], NUM_CLASSES), y_dev[idx])
        x_t = sched("sqrt_abar", t) * x0 + sched("sqrt_1m_abar", t) * noise

        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                            enabled=args.device == "cuda"):
            out = model(x_t, t, y)
        loss, mse, vb = hybrid_loss(out.float(), x0, x_t, t, noise, sched, args.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)

        run_loss += loss.detach()
        run_mse += mse.detach()
        run_vb += vb.detach()
        run_n += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            vals = [float(v) / run_n for v in (run_loss, run_mse, run_vb)]
            if not all(math.isfinite(v) for v in vals):
                sys.exit(f"error: the loss is not finite at step {step + 1}: {vals}")
            el = time.time() - start
            print(f"step {step + 1:6d}/{args.steps}  loss {vals[0]:.4f}  mse {vals[1]:.4f}  "
                  f"vb {vals[2]:.4f}  lr {lr:.2e}  {el:7.1f} s "
                  f"({el / (step + 1) * 1000:.1f} ms/step)", flush=True)
            run_loss = run_mse = run_vb = 0.0
            run_n = 0
        steps_done = step + 1
        if args.save_every and steps_done % args.save_every == 0 and steps_done < args.steps:
            save_checkpoint(ema, args.out, args.save_dtype,
                            train_metadata(args, steps_done, time.time() - start))

    elapsed = time.time() - start
    for name, v in ema.state_dict().items():
        if not torch.isfinite(v).all():
            sys.exit(f"error: EMA weight {name} holds non-finite values")
    meta = train_metadata(args, steps_done, elapsed)
    save_checkpoint(ema, args.out, args.save_dtype, meta)
    size = os.path.getsize(args.out)
    print(f"train_tiny: {steps_done} steps in {elapsed:.1f} s; wrote {args.out} "
          f"({size / 1e6:.2f} MB, EMA weights, {args.save_dtype})", flush=True)
    if args.eval_per_class > 0:
        evaluate(ema, args, device)


def evaluate(model, args, device):
    """Samples `--eval-per-class` images of every class with `model` and prints the accuracy
    of tools/quality.py's digit classifier on them."""
    import torch
    from quality import DigitClassifier

    start = time.time()
    clf = DigitClassifier()
    labels = [c for c in range(NUM_CLASSES) for _ in range(args.eval_per_class)]
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    with torch.no_grad():
        model = model.float().eval()
        samples = sample_ddpm(model, labels, args.eval_steps, args.eval_cfg_scale, gen, device)
    pred = clf.predict(samples.cpu().numpy())
    truth = np.array(labels)
    per_class = " ".join(f"{c}:{(pred[truth == c] == c).mean() * 100:.0f}%"
                         for c in range(NUM_CLASSES))
    print(f"eval: {len(labels)} samples ({args.eval_steps}-step DDPM, cfg {args.eval_cfg_scale}) "
          f"in {time.time() - start:.1f} s: classifier accuracy "
          f"{(pred == truth).mean() * 100:.1f}% (classifier test accuracy "
          f"{clf.test_accuracy * 100:.1f}%); per class {per_class}", flush=True)


if __name__ == "__main__":
    main()
