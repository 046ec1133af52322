"""A plain PyTorch DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with
FORA step caching (arXiv 2407.01425), written from the published architecture.

It loads safetensors checkpoints in the official key layout (the ones `fora` reads and writes),
runs on CPU or CUDA in float32 or bfloat16, and is the PyTorch reference the project checks
against and times (eager, CUDA graph, torch.compile). No timm needed.

    model = DiT.from_safetensors("ckpt.safetensors", arch="DiT-XL/2")
    out = model(x, t, y)                                  # plain forward
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)  # official CFG (3 guided channels)
    out = model(x, t, y, cache="compute")                 # FORA: run blocks, fill the cache
    out = model(x, t, y, cache="reuse")                   # FORA: reuse block outputs

FORA: per block the attention output (after proj) and MLP output (after fc2) are cached
before gate and residual; a reuse step recomputes embeddings, every adaLN modulation (so the
current step's gates apply), the residual adds from the cache, and the final layer.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

OFFICIAL = {  # name: (depth, hidden, heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
FREQ_DIM = 256


def parse_arch(name):
    """`DiT-XL/2` or `depth=2,hidden=64,heads=4,patch=2` -> dict(depth, hidden, heads, patch)."""
    name = name.strip()
    if name.startswith("DiT-"):
        size, patch = name[4:].split("/")
        if size not in OFFICIAL or patch not in ("2", "4", "8"):
            raise ValueError(f"unknown architecture {name!r}")
        depth, hidden, heads = OFFICIAL[size]
        return dict(depth=depth, hidden=hidden, heads=heads, patch=int(patch))
    kv = dict(part.split("=") for part in name.split(","))
    try:
        return {k: int(kv[k]) for k in ("depth", "hidden", "heads", "patch")}
    except KeyError as e:
        raise ValueError(f"architecture {name!r}: missing {e.args[0]}=..") from None


def arch_name(depth, hidden, heads, patch):
    for size, (d, h, n) in OFFICIAL.items():
        if (d, h, n) == (depth, hidden, heads) and patch in (2, 4, 8):
            return f"DiT-{size}/{patch}"
    return f"depth={depth},hidden={hidden},heads={heads},patch={patch}"


def config_metadata(depth, hidden, heads, patch, in_channels, input_size, num_classes,
                    learn_sigma, mlp_ratio=4):
    """The safetensors metadata `fora` writes and reads (`DitConfig::to_metadata`)."""
    meta = {
        "fora.arch": arch_name(depth, hidden, heads, patch),
        "fora.depth": depth,
        "fora.hidden": hidden,
        "fora.heads": heads,
        "fora.patch": patch,
        "fora.in_channels": in_channels,
        "fora.input_size": input_size,
        "fora.num_classes": num_classes,
        "fora.mlp_ratio": mlp_ratio,
        "fora.learn_sigma": "true" if learn_sigma else "false",
    }
    return {k: str(v) for k, v in meta.items()}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_features(t, dim=FREQ_DIM, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps: cat[cos(t f), sin(t f)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def guide(out, in_channels, cfg_scale, all_eps=False):
    """The official classifier-free guidance of a forward `out` over [half; half] (conditional
    rows first): eps channels 0..2 (all `in_channels` with all_eps) of both halves become
    uncond + s * (cond - uncond); the other channels stay."""
    k = in_channels if all_eps else 3
    eps, rest = out[:, :k], out[:, k:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_channels, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):  # [N, C, H, W] -> [N, T, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """num_classes + 1 rows: the last is the null class used for guidance."""

    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(o.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, hidden, mlp_hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio=4):
        super().__init__()
        self.attn = Attention(hidden, heads)
        self.mlp = Mlp(hidden, hidden * mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        # FORA cache: this block's attention and MLP outputs from the last computing step.
        self.cached_attn = None
        self.cached_mlp = None

    def forward(self, x, c, cache=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        if cache == "reuse":
            a, m = self.cached_attn, self.cached_mlp
            if a is None or a.shape != x.shape:
                raise RuntimeError("FORA reuse step without a cache of this batch "
                                   "(the first step must compute)")
            x = x + gate_msa.unsqueeze(1) * a
            return x + gate_mlp.unsqueeze(1) * m
        norm = lambda v: F.layer_norm(v, v.shape[-1:], eps=1e-6)
        a = self.attn(modulate(norm(x), shift_msa, scale_msa))
        x = x + gate_msa.unsqueeze(1) * a
        m = self.mlp(modulate(norm(x), shift_mlp, scale_mlp))
        x = x + gate_mlp.unsqueeze(1) * m
        if cache == "compute":
            # Copy into the same buffers every time once they exist, so that a captured CUDA
            # graph of the reuse step keeps reading the latest cache.
            if self.cached_attn is not None and self.cached_attn.shape == a.shape \
                    and self.cached_attn.dtype == a.dtype and self.cached_attn.device == a.device:
                self.cached_attn.copy_(a)
                self.cached_mlp.copy_(m)
            else:
                self.cached_attn, self.cached_mlp = a.clone(), m.clone()
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    def __init__(self, depth, hidden, heads, patch, in_channels=4, input_size=32,
                 num_classes=1000, learn_sigma=True, mlp_ratio=4):
        super().__init__()
        self.config = dict(depth=depth, hidden=hidden, heads=heads, patch=patch,
                           in_channels=in_channels, input_size=input_size,
                           num_classes=num_classes, learn_sigma=learn_sigma, mlp_ratio=mlp_ratio)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch = patch
        self.num_classes = num_classes
        tokens = (input_size // patch) ** 2
        self.x_embedder = PatchEmbed(patch, in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, self.out_channels)

    def metadata(self):
        return config_metadata(**self.config)

    @classmethod
    def from_safetensors(cls, path, arch=None, device="cpu", dtype=torch.float32):
        """Loads a checkpoint in the official key layout; the architecture comes from `arch`
        or the `fora.*` metadata; the data shape from the tensor shapes."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if arch is not None:
            a = parse_arch(arch)
        elif "fora.heads" in meta:
            a = {k: int(meta[f"fora.{k}"]) for k in ("depth", "hidden", "heads", "patch")}
        else:
            raise ValueError(f"{path}: heads cannot be inferred from shapes; pass arch=")
        hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        input_size = int(round(math.sqrt(tokens))) * patch
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        learn_sigma = state["final_layer.linear.weight"].shape[0] == patch * patch * 2 * in_channels
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] // hidden
        if (a["hidden"], a["patch"]) != (hidden, patch):
            raise ValueError(f"{path}: arch {a} disagrees with hidden {hidden}, patch {patch}")
        model = cls(a["depth"], hidden, a["heads"], patch, in_channels, input_size,
                    num_classes, learn_sigma, mlp_ratio)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    def unpatchify(self, x):
        """[N, T, p*p*C] -> [N, C, H, W] (einsum nhwpqc->nchpwq)."""
        n, t, _ = x.shape
        p, c = self.patch, self.out_channels
        g = int(round(math.sqrt(t)))
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x, t, y, cache=None):
        """x [N, C, H, W], t [N] original timesteps, y [N] labels (num_classes = null).
        cache: None (no FORA), "compute" (run blocks, store outputs) or "reuse"."""
        if cache not in (None, "compute", "reuse"):
            raise ValueError(f"cache must be None, 'compute' or 'reuse', got {cache!r}")
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c, cache)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x, t, y, cfg_scale, all_eps=False, cache=None):
        """The official classifier-free guidance: the model runs on [half; half] (half = the
        first N/2 rows of x) with the given t, y; eps channels 0..2 (all C eps channels with
        all_eps) of both halves become uncond + s * (cond - uncond); other channels stay."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y, cache)
        return guide(out, self.in_channels, cfg_scale, all_eps)
