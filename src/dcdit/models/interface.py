"""One way to call every model: ``predict(model, x, t, y, ...) -> (prediction, RoutingRecord or None)``.

A DiT keeps the official ``forward(x, t, y) -> tensor`` (code written for the DiT release relies on
it); a DC-DiT returns ``(prediction, RoutingRecord)`` (paper §3). Sampling, training and evaluation
call both through :func:`predict` and :func:`predict_guided`, the only place that tells them apart,
so none of them needs a branch per architecture. Both accept models wrapped in DDP or torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..utils import unwrap
from .chunking import RoutingRecord
from .dcdit import DCDiT
from .guidance import guide, lite_cfg_fractions


def routes_tokens(model: nn.Module) -> bool:
    """True for a DC-DiT (also behind DDP / torch.compile): it routes tokens and returns a RoutingRecord."""
    return isinstance(unwrap(model), DCDiT)


def _is_zero(fraction) -> bool:
    return not bool(torch.as_tensor(fraction).ne(0).any())


def predict(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
    tail_dropping_fraction: float | torch.Tensor = 0.0, budget_groups: int = 1,
    force_drop_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RoutingRecord | None]:
    """x (B, C, H, W), t (B,), y (B,) -> (prediction (B, C_out, H, W), RoutingRecord or None).

    ``tail_dropping_fraction`` (a float or (B,) tensor) and ``budget_groups`` are DC-DiT's elastic
    inference (see ``DCDiT.forward``); a DiT has fixed patches and refuses non-zero fractions.
    ``force_drop_ids`` (B,): 1 where the label becomes the null class (both models)."""
    if routes_tokens(model):
        return model(x, t, y, tail_dropping_fraction=tail_dropping_fraction, budget_groups=budget_groups,
                     force_drop_ids=force_drop_ids)
    if not _is_zero(tail_dropping_fraction) or budget_groups != 1:
        raise ValueError("tail-dropping applies to DC-DiT only; this DiT has fixed patches (use fractions 0 / None)")
    kwargs = {} if force_drop_ids is None else {"force_drop_ids": force_drop_ids}
    return model(x, t, y, **kwargs), None


def predict_guided(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, *,
    tail_dropping_fraction: float = 0.0, uncond_tail_dropping_fraction: float | None = None,
    guidance_channels: int | None = None,
) -> tuple[torch.Tensor, RoutingRecord | None]:
    """Classifier-free guidance on a [cond; uncond] batch of 2B samples (DiT's sampling convention).

    ``y`` is [labels; null] (:func:`~dcdit.models.guidance.cfg_labels`). The first half of ``x``
    feeds both branches and both output halves hold the guided ε (``guide``); the record covers all
    2B samples. Lite-CFG: ``uncond_tail_dropping_fraction`` gives the unconditional half of a DC-DiT
    its own tail-drop fraction (e.g. 0.0 for cond, 0.9 for uncond)."""
    half = x[: len(x) // 2]
    fractions, groups = lite_cfg_fractions(len(half), tail_dropping_fraction, uncond_tail_dropping_fraction, x.device)
    out, record = predict(model, torch.cat([half, half], dim=0), t, y, tail_dropping_fraction=fractions,
                          budget_groups=groups)
    return guide(out, cfg_scale, unwrap(model).in_channels, guidance_channels), record
