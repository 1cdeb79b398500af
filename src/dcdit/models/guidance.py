"""Classifier-free guidance on a model output whose batch is [conditional half; unconditional half]."""

from __future__ import annotations

import torch


def guide(model_out: torch.Tensor, cfg_scale: float, eps_channels: int, guidance_channels: int | None = None):
    """(2B, C_out, H, W) -> (2B, C_out, H, W) with both halves = uncond + s·(cond − uncond).

    Guidance acts on the ε channels (the first ``eps_channels``); learned-variance channels pass
    through from their own half. ``guidance_channels`` limits guidance to the first k channels:
    ``guidance_channels=3`` reproduces the official DiT release, which guides 3 of the 4 latent
    channels "for exact reproducibility" (DiT PR #12); the default (None) guides all ε channels.
    """
    k = eps_channels if guidance_channels is None else guidance_channels
    if not 0 < k <= eps_channels:
        raise ValueError(f"guidance_channels must be in [1, {eps_channels}], got {guidance_channels}")
    eps, rest = model_out[:, :k], model_out[:, k:]
    cond_eps, uncond_eps = eps.chunk(2, dim=0)
    half = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half, half], dim=0), rest], dim=1)
