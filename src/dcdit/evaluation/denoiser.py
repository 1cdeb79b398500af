"""How good is a trained pixel-space model's clean-image estimate at each noise level, and does it use the label?

Held-out images ``x0`` are noised to ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` at a few timesteps and the
model's ε̂ is turned into ``x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t`` (clipped to [−1, 1], as the pixel-space
samplers do). The MSE of x̂0 with the right, a wrong (``y + 3 mod C``) and the null label, next to
yardsticks that need no model (the mean training image, the right / wrong class-mean image), says
whether a model can draw class-conditional images: one whose x̂0 at large t is worse than the mean
image, or whose right and wrong labels give the same error, cannot, however good its ε-MSE looks.
Used by ``scripts/denoiser_by_timestep.py`` and the demo checkpoint's tests (docs/demo-checkpoint.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..diffusion import create_diffusion
from ..models.interface import predict


@dataclass
class DenoiserRow:
    """x̂0-MSE at one timestep with the right / wrong / null label, and the ε-MSE with the right one."""

    t: int
    alpha_bar: float
    x0_mse_right: float
    x0_mse_wrong: float
    x0_mse_null: float
    eps_mse_right: float


def wrong_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A label that is never the right one: ``(y + 3) mod num_classes``."""
    return (y + 3) % num_classes


@torch.no_grad()
def denoiser_error_by_timestep(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, timesteps, seed: int = 0) -> list[DenoiserRow]:
    """x0 (B, C, H, W) in [-1, 1], y (B,) -> one DenoiserRow per timestep (same noise for all three labels).

    Noising and x̂0 go through the diffusion the model was trained with (its ``noise_schedule`` and
    ``learn_sigma``), the same ``q_sample`` / ``_p_from_output`` path as training and sampling.
    """
    if x0.ndim != 4 or y.shape != (x0.shape[0],):
        raise ValueError(f"expected x0 of shape (B, C, H, W) and y of shape (B,), got {tuple(x0.shape)} and {tuple(y.shape)}")
    diffusion = create_diffusion("", noise_schedule=getattr(model, "noise_schedule", "linear"),
                                 learn_sigma=bool(getattr(model, "learn_sigma", True)))
    num_classes = model.num_classes
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t0 in timesteps:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.full((len(x0),), int(t0))
        x_t = diffusion.q_sample(x0, t, noise)
        x0_mse, eps_mse = [], []
        for labels in (y, wrong_labels(y, num_classes), torch.full_like(y, num_classes)):
            output, _ = predict(model, x_t, t, labels)
            out = diffusion._p_from_output(output, x_t, t, clip_denoised=True)  # x̂0 clipped, as the samplers do
            x0_mse.append(((out["pred_xstart"] - x0) ** 2).mean().item())
            eps_mse.append(((out["model_output"] - noise) ** 2).mean().item())
        rows.append(DenoiserRow(int(t0), float(diffusion.alphas_cumprod[int(t0)]), *x0_mse, eps_mse[0]))
    return rows
