"""
Condition embedding perturbation (CEP, Chen et al. 2024) and the input perturbation baseline (IP, Ning et al. 2023).

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

    def forward(self, emb):
        if not self.training:
            return emb
        bound = self.scale / math.sqrt(emb.shape[-1])
        if self.kind == "uniform":
            return emb + (torch.rand_like(emb) * 2 - 1) * bound
        return emb + torch.randn_like(emb) * bound

    def extra_repr(self):
        return f"kind={self.kind}, scale={self.scale}"


def input_perturbation(noise, strength=0.1):
    """IP: x_t is built from eps + lambda*xi while the target stays eps (Ning et al. 2023, lambda = 0.1)."""
    return noise + strength * torch.randn_like(noise)
