"""Timestep respacing: sample (or train) with a subset of the original diffusion steps.

Given kept steps ``S = {s_0 < s_1 < ... < s_{K-1}}`` of a ``T``-step process, the
respaced process has ``K`` steps with ``abar'_k = abar_{s_k}``, i.e. betas
``beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}`` (``abar_{s_{-1}} = 1``), so its marginals
``q(x_k | x_0)`` coincide with those of the original process at the kept steps
(Nichol & Dhariwal 2021, Sec. 4). The network was trained on the original indices, so
it is always called with ``timestep_map[k] = s_k`` (as a long tensor, like DiT).
"""

from __future__ import annotations

from typing import Iterable, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["space_timesteps", "SpacedDiffusion"]


def space_timesteps(num_timesteps: int, section_counts: Union[str, Iterable[int]]) -> set:
    """Choose which steps of a ``num_timesteps``-step process to keep.

    Args:
        num_timesteps: ``T`` of the original process.
        section_counts: one of
            * a list of ints / comma-separated string ``"10,15,20"``: split ``[0, T)`` into
              that many equal sections (the first ``T % n`` sections one step longer) and
              take the given number of evenly spaced steps in each, including both ends
              of the section (positions rounded to the nearest integer). ``"250"`` keeps
              250 steps spread over ``[0, T - 1]``.
            * ``"ddimN"``: the DDIM striding ``range(0, T, stride)`` with the smallest integer
              stride that gives exactly ``N`` steps (``"ddim50"`` -> ``0, 20, ..., 980``).

    Returns:
        set of kept original timestep indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                steps = range(0, num_timesteps, stride)
                if len(steps) == desired:
                    return set(steps)
            if desired == 1:  # stride T is the only way to get one step
                return {0}
            raise ValueError(f"cannot create exactly {desired} DDIM steps from {num_timesteps} with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    section_counts = list(section_counts)

    n = len(section_counts)
    base, extra = divmod(num_timesteps, n)
    kept = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        # Walk the section with a fractional stride so both ends are included; the
        # position is accumulated (not multiplied) and rounded half-to-even, which
        # reproduces the improved-DDPM / DiT step sets exactly.
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A :class:`GaussianDiffusion` over a subset of the steps of a base process.

    Args:
        use_timesteps: original step indices to keep (any iterable).
        **kwargs: arguments of :class:`GaussianDiffusion` for the *base* process
            (``betas`` of length ``T``, ``model_mean_type``, ``model_var_type``, ``loss_type``).

    Attributes:
        timestep_map: list, ``timestep_map[k]`` = original index of respaced step ``k``.
        original_num_steps: ``T`` of the base process.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(int(s) for s in use_timesteps)
        base_betas = np.asarray(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)
        if not self.use_timesteps or min(self.use_timesteps) < 0 or max(self.use_timesteps) >= self.original_num_steps:
            raise ValueError("use_timesteps must be a non-empty subset of range(T)")

        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        self.timestep_map = sorted(self.use_timesteps)
        kept_ac = base_alphas_cumprod[self.timestep_map]
        new_betas = 1.0 - kept_ac / np.append(1.0, kept_ac[:-1])
        super().__init__(**{**kwargs, "betas": new_betas})
        self._timestep_map_tensor = torch.tensor(self.timestep_map, dtype=torch.long)

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map respaced indices ``t`` (``(B,)``) to original indices (long, same device)."""
        return self._timestep_map_tensor.to(t.device)[t.long()]
