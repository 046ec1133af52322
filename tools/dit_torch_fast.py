"""The PyTorch DiT of dit_torch.py with FORA, run the way a capable PyTorch user (and fora)
would run a sampling loop: the same maths, another structure. The benchmark's "fast" variant
(tools/bench_torch.py --variants), so that fora is compared with PyTorch's best and not only
with the plain official structure.

What differs from `DiT.forward_with_cfg(..., cache=...)`:
- conditioning up front: the labels are fixed for a run and the timesteps known, so every
  step's conditioning (timestep and label embeddings, all blocks' adaLN Linears and the final
  layer's, as one Linear of the concatenated weights) is computed once, before the loop; a step
  copies its rows of the table into a fixed buffer (fora does the same);
- the computing step writes each block's attention and MLP outputs straight into a
  preallocated cache (`torch.addmm(out=)`) instead of copying them there;
- the reuse step adds the gated cached outputs in place (`addcmul_`), two launches a block,
  which torch.compile fuses into one pass over the cache;
- SDPA can be held to one backend (the fastest the benchmark measured).

    fast = FastFora(model, labels, timesteps)   # timesteps: [S] original timesteps
    fast.set_step(k)                            # device-side copy of step k's table
    out = fast.forward_with_cfg(x, cfg_scale, compute=True)   # or compute=False: reuse
    out = fast.forward_with_cfg(x, cfg_scale, compute=True, keep=False)  # no FORA (N = 1)
"""

import contextlib

import torch
import torch.nn.functional as F

from dit_torch import guide, modulate


def sdpa_backend(name):
    """A context that restricts SDPA to backend `name` (None or "default": no restriction)."""
    if name in (None, "default"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[name]
    return sdpa_kernel([getattr(SDPBackend, which)])


def layer_norm(v):
    return F.layer_norm(v, v.shape[-1:], eps=1e-6)


class FastFora:
    """DiT sampling with FORA for fixed labels and timesteps; see the module's docstring.

    model: a dit_torch.DiT (its weights are used, not copied, except the concatenated adaLN
    Linears); labels: [rows] class ids (the null class for the unconditional half);
    timesteps: [S] original timesteps of the steps a run may select."""

    def __init__(self, model, labels, timesteps, sdpa=None):
        cfg = model.config
        self.model = model
        self.sdpa = sdpa
        self.rows = len(labels)
        self.depth = cfg["depth"]
        self.hidden = d = cfg["hidden"]
        self.tokens = (cfg["input_size"] // cfg["patch"]) ** 2
        weight = model.final_layer.linear.weight
        dtype, device = weight.dtype, weight.device
        blocks = model.blocks
        # One Linear of every block's adaLN weights, then the final layer's: [L*6D + 2D, D].
        w = torch.cat([b.adaLN_modulation[1].weight for b in blocks]
                      + [model.final_layer.adaLN_modulation[1].weight]).detach()
        bias = torch.cat([b.adaLN_modulation[1].bias for b in blocks]
                         + [model.final_layer.adaLN_modulation[1].bias]).detach()
        self.width = w.shape[0]
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        timesteps = torch.as_tensor(timesteps, dtype=torch.long, device=device)
        # Every step's table, one step at a time (bounded intermediates): [S, rows, width].
        self.table = torch.empty(len(timesteps), self.rows, self.width, dtype=dtype,
                                 device=device)
        with torch.no_grad():
            y_emb = model.y_embedder(labels)
            for k, t in enumerate(timesteps):
                c = model.t_embedder(t.expand(self.rows)) + y_emb
                torch.addmm(bias, F.silu(c), w.t(), out=self.table[k])
        self.mod = torch.empty_like(self.table[0])
        # FORA cache: per block its attention and its MLP output, [rows * T, D] each, written
        # in place by computing steps. Separate tensors, not slices of one: torch.compile
        # turns out= writes into slices of one tensor into copies of the whole tensor, a
        # block at a time.
        self.cache = [[torch.zeros(self.rows * self.tokens, d, dtype=dtype, device=device)
                       for _ in range(2)] for _ in range(self.depth)]
        # Where a computing step that keeps nothing (a loop that never reuses: FORA N = 1)
        # writes its blocks' outputs: one pair serves every block, as in a model without FORA.
        self.scratch = [torch.empty_like(self.cache[0][0]) for _ in range(2)]
        self.computed = False

    def set_step(self, k):
        """Selects step k's conditioning (a device-side copy, no host synchronization)."""
        self.mod.copy_(self.table[k % len(self.table)])

    def block_modulation(self, l):
        """Block l's shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
        d = self.hidden
        return self.mod[:, 6 * d * l: 6 * d * (l + 1)].chunk(6, dim=1)

    def attention(self, block, x, out):
        """block's attention of x [N, T, D], proj written into out [N*T, D]."""
        n, t, d = x.shape
        heads = block.attn.heads
        qkv = block.attn.qkv(x).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        with sdpa_backend(self.sdpa):
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        proj = block.attn.proj
        torch.addmm(proj.bias, o.transpose(1, 2).reshape(n * t, d), proj.weight.t(), out=out)

    def mlp(self, block, x, out):
        """block's MLP of x [N, T, D], fc2 written into out [N*T, D]."""
        n, t, d = x.shape
        hidden = F.gelu(block.mlp.fc1(x), approximate="tanh")
        fc2 = block.mlp.fc2
        torch.addmm(fc2.bias, hidden.reshape(n * t, -1), fc2.weight.t(), out=out)

    @torch.no_grad()  # inference only: the outputs are written in place (out=)
    def forward(self, x, compute, keep=True):
        """DiT.forward at the selected step: x [rows, C, H, W]; compute: run the blocks and
        fill the cache (keep=False: leave it alone, DiT.forward without FORA), else reuse it."""
        model = self.model
        n, t, d = self.rows, self.tokens, self.hidden
        if x.shape[0] != n:
            raise ValueError(f"FastFora was built for {n} rows, got {x.shape[0]}")
        if not compute and not self.computed:
            raise RuntimeError("FORA reuse step before any computing step (the first must compute)")
        h = model.x_embedder(x) + model.pos_embed
        for l, block in enumerate(model.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
                self.block_modulation(l)
            outs = self.cache[l] if keep or not compute else self.scratch
            a, m = outs[0].view(n, t, d), outs[1].view(n, t, d)
            if compute:
                self.attention(block, modulate(layer_norm(h), shift_msa, scale_msa), outs[0])
                h = h + gate_msa.unsqueeze(1) * a
                self.mlp(block, modulate(layer_norm(h), shift_mlp, scale_mlp), outs[1])
                h = h + gate_mlp.unsqueeze(1) * m
            else:  # h is this forward's own sum: adding in place is safe
                h.addcmul_(gate_msa.unsqueeze(1), a)
                h.addcmul_(gate_mlp.unsqueeze(1), m)
        if compute and keep:
            self.computed = True
        shift, scale = self.mod[:, 6 * d * self.depth:].chunk(2, dim=1)
        out = model.final_layer.linear(modulate(layer_norm(h), shift, scale))
        return model.unpatchify(out)

    def forward_with_cfg(self, x, cfg_scale, compute, all_eps=False, keep=True):
        """DiT.forward_with_cfg at the selected step (x: [rows, C, H, W], the first half the
        images; the labels are the table's)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), compute, keep)
        return guide(out, self.model.in_channels, cfg_scale, all_eps)


def compare_with_plain(seed=0, arch="depth=3,hidden=64,heads=4,patch=2", input_size=8,
                       cfg_scale=4.0):
    """Runs FastFora and the plain DiT (float32, CPU) through the same FORA sequence of
    computing and reuse steps and returns, per step, (mode, largest |fast - plain| over the
    largest |plain|, the same for the plain computing step at that timestep). The first says
    the two agree; the second that a reuse step really reused (it differs from computing).
    Mode "alone" is a computing step that keeps nothing (keep=False; the plain model's
    cache=None): the reuse step after it must still read the cache of the step before."""
    from dit_torch import DiT, parse_arch

    a = parse_arch(arch)
    torch.manual_seed(seed)
    model = DiT(a["depth"], a["hidden"], a["heads"], a["patch"], in_channels=4,
                input_size=input_size, num_classes=10, learn_sigma=True).eval()
    labels = [3, 7, 10, 10]  # two images with CFG: their labels, then the null class twice
    timesteps = [999, 870, 600, 500, 420, 150, 3]
    modes = ["compute", "reuse", "alone", "reuse", "compute", "reuse", "compute"]
    fast = FastFora(model, labels, timesteps)
    y = torch.tensor(labels)
    out = []
    with torch.no_grad():
        for k, (t, mode) in enumerate(zip(timesteps, modes)):
            x = torch.randn(len(labels), 4, input_size, input_size)
            tt = torch.full((len(labels),), t, dtype=torch.long)
            want = model.forward_with_cfg(x, tt, y, cfg_scale,
                                          cache=None if mode == "alone" else mode)
            full = model.forward_with_cfg(x, tt, y, cfg_scale)  # no cache: computing
            fast.set_step(k)
            got = fast.forward_with_cfg(x, cfg_scale, compute=mode != "reuse",
                                        keep=mode != "alone")
            scale = want.abs().max().item()
            out.append((mode, (got - want).abs().max().item() / scale,
                        (full - want).abs().max().item() / scale))
    return out
