"""Noise (beta) schedules for the forward diffusion process.

All schedules are returned as 1-D ``float64`` numpy arrays of length ``T`` where
``betas[t]`` is the variance of the step ``x_t -> x_{t+1}`` in 0-based indexing
(``t = 0`` is the first noising step).

References
----------
* Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models":
  the linear schedule ``1e-4 -> 0.02`` over 1000 steps.
* Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models":
  the cosine schedule ``alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2)``
  discretised with betas clipped at 0.999, and the rule that rescales the linear
  schedule by ``1000 / T`` so that it stays similar for any number of steps.
* Peebles & Xie (2023), "Scalable Diffusion Models with Transformers" (DiT):
  trains with the linear schedule over T = 1000 steps.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["linear_beta_schedule", "betas_for_alpha_bar", "get_named_beta_schedule"]


def linear_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """Linear schedule of Ho et al. (2020), rescaled for ``T`` steps.

    ``betas`` go linearly from ``1e-4 * 1000 / T`` to ``0.02 * 1000 / T`` (inclusive);
    for ``T = 1000`` this is exactly the DDPM schedule ``1e-4 -> 0.02``.

    Returns:
        ``(T,)`` float64 array.
    """
    scale = 1000.0 / num_diffusion_timesteps
    return np.linspace(
        scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64
    )


def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    alpha_bar: Callable[[float], float],
    max_beta: float = 0.999,
) -> np.ndarray:
    """Discretise a continuous ``alpha_bar(s)``, ``s in [0, 1]``, into betas.

    ``beta_t = min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta)``, so the
    cumulative product of ``1 - beta`` follows ``alpha_bar`` at the grid points
    (up to the clipping, which avoids a singular last step).

    Returns:
        ``(T,)`` float64 array.
    """
    T = num_diffusion_timesteps
    betas = [
        min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)
    ]
    return np.asarray(betas, dtype=np.float64)


def _cosine_alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


NOISE_SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2")


def check_noise_schedule(name: str) -> str:
    if name not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise_schedule {name!r}; valid: {', '.join(NOISE_SCHEDULES)} "
                         "(linear = DDPM / DiT, cosine = improved DDPM, better for small pixel-space images)")
    return name


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Return a named beta schedule as a ``(T,)`` float64 numpy array.

    Args:
        schedule_name: ``"linear"`` (DDPM / DiT) or ``"squaredcos_cap_v2"``
            (the cosine schedule of improved DDPM; the name follows diffusers).
        num_diffusion_timesteps: ``T``.
    """
    if schedule_name == "linear":
        return linear_beta_schedule(num_diffusion_timesteps)
    if schedule_name in ("squaredcos_cap_v2", "cosine"):
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name!r}")
