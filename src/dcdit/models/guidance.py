"""Classifier-free guidance (Ho & Salimans 2022) on a batch [conditional half; unconditional half].

Everything guidance needs, in one place: the label batch with the null class, the per-sample
tail-drop fractions of Lite-CFG, and the guided output. The model call that ties them together is
:func:`dcdit.models.interface.predict_guided`.
"""

from __future__ import annotations

import torch


def cfg_labels(y: torch.Tensor, null_label: int) -> torch.Tensor:
    """(B,) labels -> (2B,) [y; null]: the unconditional half gets the null class (index ``num_classes``)."""
    return torch.cat([y, torch.full_like(y, null_label)])


def lite_cfg_fractions(n: int, fraction: float, uncond_fraction: float | None, device) -> tuple[torch.Tensor, int]:
    """Tail-drop fractions of a [cond; uncond] batch of 2n samples and the number of budget groups.

    Lite-CFG gives the unconditional half its own (usually larger) fraction; the halves then keep very
    different numbers of tokens and are padded separately (2 groups). ``uncond_fraction=None``: the
    same fraction for both halves, one group."""
    f_u = fraction if uncond_fraction is None else uncond_fraction
    fractions = torch.tensor([fraction] * n + [f_u] * n, dtype=torch.float64, device=device)
    return fractions, 1 if f_u == fraction else 2


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
