"""
Condition embedding perturbation (CEP, Chen et al. 2024), its fixed variant, and the input perturbation baseline
(IP, Ning et al. 2023).

CEP trains with || eps - eps_theta(x_t, t, c(y) + delta) ||^2, where c(y) is the condition encoder's output and
delta is drawn afresh for every sample at every step, with elements
    CEP-U: Uniform(-gamma/sqrt(d), gamma/sqrt(d))      CEP-G: Normal(0, std=gamma/sqrt(d))
and d the embedding width (the last dimension: per token for text). Training only: in eval mode it is the
identity. The denoiser applies it to real conditions, not to the null condition of classifier-free guidance.

Imports nothing from the project: copy this file into another project as it is.
"""
import math

import torch
import torch.nn as nn


class CEP(nn.Module):
    def __init__(self, kind="uniform", scale=1.0):
        super().__init__()
        if kind not in ("uniform", "gaussian"):
            raise ValueError(f"cep_type must be 'uniform' or 'gaussian', got {kind!r}")
        if not scale >= 0:
            raise ValueError(f"cep_scale (gamma) must be >= 0, got {scale}")
        self.kind, self.scale = kind, scale

    def delta(self, shape, dtype, device, generator=None):
        bound = self.scale / math.sqrt(shape[-1])
        if self.kind == "uniform":
            return (torch.rand(shape, dtype=dtype, device=device, generator=generator) * 2 - 1) * bound
        return torch.randn(shape, dtype=dtype, device=device, generator=generator) * bound

    def forward(self, emb):
        return emb + self.delta(emb.shape, emb.dtype, emb.device) if self.training else emb

    def extra_repr(self):
        return f"kind={self.kind}, scale={self.scale}"


class FixedCEP(CEP):
    """Fixed CEP (paper App. E.4, Table 7): a subset of the samples, chosen once, each keeps one delta for the whole
    run; the others are not perturbed. The paper does not give the subset's size: `fraction` is ours. Membership
    and delta are drawn from a generator seeded by (seed, the sample's dataset index) alone, so no table of deltas
    is kept and every rank and every resume agrees. Set `index` (the batch's dataset indices) before each forward."""

    def __init__(self, kind="uniform", scale=1.0, fraction=0.05, seed=0):
        super().__init__(kind, scale)
        if not 0 < fraction <= 1:
            raise ValueError(f"the fixed CEP fraction must be in (0, 1], got {fraction}")
        self.fraction, self.seed, self.index = fraction, seed, None

    def forward(self, emb):
        if not self.training:
            return emb
        deltas = []
        for i in self.index.tolist():
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            chosen = torch.rand((), generator=g) < self.fraction
            deltas.append(self.delta(emb.shape[1:], emb.dtype, "cpu", g) * chosen)
        return emb + torch.stack(deltas).to(emb.device, non_blocking=True)

    def extra_repr(self):
        return f"kind={self.kind}, scale={self.scale}, fraction={self.fraction}, seed={self.seed}"


def input_perturbation(noise, strength=0.1):
    """IP: x_t is built from eps + lambda*xi while the target stays eps (Ning et al. 2023, lambda = 0.1)."""
    return noise + strength * torch.randn_like(noise)
