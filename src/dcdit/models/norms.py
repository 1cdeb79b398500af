"""Normalisations that end a block stack: the release's RMSNorm and our LayerNorm, chosen by name.

The authors' release ends the encoder, the inner DiT stack and the decoder each with an RMSNorm
(learned weight, no bias, eps 1e-5): RMS_w(z) = z · (mean_k z_k² + eps)^(−1/2) · w. Our original
choice (still the default, so existing checkpoints load) is a LayerNorm with affine weight and bias
after the encoder and the decoder and nothing after the inner stack.
"""

from __future__ import annotations

import torch
import torch.nn as nn

STACK_NORMS = ("layernorm", "rmsnorm", "none")


class RMSNorm(nn.Module):
    """z (..., D) -> z · rsqrt(mean(z²) + eps) · weight, computed in float32 and returned in z's dtype
    (as the release's fused kernel does, so bf16 activations keep an fp32 statistic). Key: ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zf = z.float()
        out = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(z.dtype)


def stack_norm(kind: str, dim: int) -> nn.Module:
    """The norm after a block stack: "layernorm" (affine, eps 1e-5), "rmsnorm" (the release) or "none"."""
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown stack norm {kind!r}; choose one of {', '.join(STACK_NORMS)}")
