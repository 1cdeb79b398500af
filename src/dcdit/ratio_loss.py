"""The ratio (load-balancing) loss that steers the router toward a target downsampling N (paper §3.5).

L_ratio = N/(N − 1) · ((1 − r̂)(1 − p̄) + (N − 1) r̂ p̄),   r̂ = mean(m), p̄ = mean(p),

with m the router's natural (pre-tail-drop) hard mask (no gradient) and p its probabilities. Its
minimum over p̄ at fixed r̂ pushes p̄ down when r̂ > 1/N and up when r̂ < 1/N; at r̂ = p̄ = 1/N it equals 1.
As in the authors' release, the statistics are taken per group of ``group_size`` consecutive samples
(``ratio_batch_size``, 16 by default) and the group losses are averaged.
"""

from __future__ import annotations

import torch

from .models.chunking import RoutingRecord


def ratio_loss_from_stats(r_hat: torch.Tensor, p_bar: torch.Tensor, target_ratio: float) -> torch.Tensor:
    N = float(target_ratio)
    if N <= 1:
        raise ValueError(f"the target downsampling N must be > 1, got {N}")
    return N / (N - 1) * ((1 - r_hat) * (1 - p_bar) + (N - 1) * r_hat * p_bar)


def ratio_loss(record: RoutingRecord, target_ratio: float, group_size: int = 16) -> torch.Tensor:
    """Scalar loss from a routing record: (B, L) p and natural mask, grouped along the batch."""
    if group_size < 1:
        raise ValueError(f"ratio_batch_size must be >= 1, got {group_size}")
    losses = [
        ratio_loss_from_stats(m.float().mean(), p.mean(), target_ratio)
        for p, m in zip(record.p.split(group_size), record.natural_mask.split(group_size))
    ]
    return torch.stack(losses).mean()


def curriculum_target_ratio(step: int, target: float, start: float | None = None, warmup_steps: int = 0) -> float:
    """N at a training step under the release's curriculum: linear from ``start`` at step 0 to ``target``
    at ``warmup_steps``, then constant (``downsample_factor_start`` / ``downsample_factor_warmup_steps``
    in the release). Without a start or warm-up, N is ``target`` throughout."""
    if start is None or warmup_steps <= 0:
        return float(target)
    progress = min(1.0, step / warmup_steps)
    return float(start) + (float(target) - float(start)) * progress
