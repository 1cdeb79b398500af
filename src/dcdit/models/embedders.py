"""Input, timestep, class and position embedders shared by DiT and DC-DiT.

Layouts (parameter names and shapes) follow the official DiT release (Peebles & Xie 2023,
``models.py``) so its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


class PatchEmbed(nn.Module):
    """Conv embedder: (B, C, H, W) -> (B, (H/k)·(W/k), D) tokens in raster order.

    DiT uses ``kernel = stride = patch_size`` (non-overlapping patches). DC-DiT uses P = 1 tokens
    with a 3×3 "same" conv (``kernel_size=3, stride=1, padding=1``), as the authors' release does.
    The parameter is ``proj`` as in timm's ``PatchEmbed`` that DiT uses.
    """

    def __init__(self, in_channels: int, embed_dim: int, kernel_size: int, stride: int, padding: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size, stride=stride, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h·w, D)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, downscale_freq_shift: float = 0.0):
    """Sinusoidal timestep features, cos then sin: (B,) -> (B, dim).

    frequency_k = max_period ** (-k / (half - downscale_freq_shift)), k = 0..half-1.
    The official DiT uses ``downscale_freq_shift = 0`` (divide by half); diffusers' DiT uses 1
    (divide by half - 1). The two differ by O(1) at equal weights, so the shift is a setting.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal features (256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, downscale_freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size, downscale_freq_shift=self.downscale_freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y (B,) -> (B, D). Row ``num_classes`` is the null class (label dropout and the CFG
    unconditional branch); it exists only when ``dropout_prob > 0``, as in DiT."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Fixed 2D sin-cos table, (H·W, D) in raster order (the MAE / DiT layout).

    The first half of the channels encodes the column (w) coordinate, the second half the row (h)
    coordinate, each as [sin, cos] over D/4 frequencies 1/10000^(k/(D/4)). Rows and columns are
    separate, so non-square grids work. Cell (r, c) sits at coordinates ((r − offset)·scale,
    (c − offset)·scale); the defaults give DiT's integer grid.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {embed_dim}")
    r, c = (np.arange(n, dtype=np.float64) for n in (gh, gw))
    rows, cols = np.meshgrid((r - offset) * scale, (c - offset) * scale, indexing="ij")
    return np.concatenate(
        [_1d_sincos(embed_dim // 2, cols.reshape(-1)), _1d_sincos(embed_dim // 2, rows.reshape(-1))], axis=1
    )


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
