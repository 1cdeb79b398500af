"""Validation of model inputs: every mistake gets a ValueError that names the problem and the fix."""

from __future__ import annotations

import torch


def as_grid(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``32`` -> (32, 32); ``(32, 48)`` -> (32, 48)."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def check_inputs(
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    *,
    in_channels: int,
    grid: tuple[int, int],
    num_classes: int,
    allow_null: bool,
) -> None:
    """x (B, C, H, W) finite with C = in_channels and (H, W) = grid; t (B,); y (B,) in [0, num_classes]."""
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    if C != in_channels:
        raise ValueError(
            f"x has {C} channels but the model was built for in_channels={in_channels}; "
            f"pass {in_channels}-channel inputs or build the model with in_channels={C}"
        )
    if (H, W) != tuple(grid):
        raise ValueError(
            f"x has a {H}x{W} grid but the model was built for input_size={grid[0]}x{grid[1]}; "
            f"resize the input or build the model with input_size=({H}, {W})"
        )
    if t.shape != (B,):
        raise ValueError(f"expected t of shape ({B},) (one timestep per sample), got {tuple(t.shape)}")
    if y.shape != (B,):
        raise ValueError(f"expected y of shape ({B},) (one class label per sample), got {tuple(y.shape)}")
    if y.dtype.is_floating_point:
        raise ValueError(f"class labels must be integers, got dtype {y.dtype}")
    hi = num_classes if allow_null else num_classes - 1
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > hi):
        raise ValueError(
            f"class labels must lie in [0, {hi}] ({num_classes} classes"
            + (f", {num_classes} = the null class" if allow_null else ", no null class: class_dropout_prob=0")
            + f"), got min {int(y.min())}, max {int(y.max())}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf; check the data pipeline / the previous sampling step")
