"""DC-DiT's encoder and decoder: convolutional residual blocks on the full-resolution grid (paper §3.2).

Each block is Stable Diffusion's ResBlock (Rombach et al. 2022) with a class/timestep condition:
GroupNorm → SiLU → Conv3×3 → + Linear(SiLU(c)) → GroupNorm → SiLU → Conv3×3, plus the skip.
The blocks run at d = D/4; the encoder's last block projects up to D in its second conv (where
routing happens) and the decoder's first block projects D back down in its first conv (the authors'
release places the projections the same way). With this placement DC-DiT-B has 136.6M and DC-DiT-XL
688.8M parameters (paper: 138M, 690M).

Each stack ends with a norm over channels (``models.norms``): a LayerNorm by default, the release's
RMSNorm with ``stack_norm="rmsnorm"``. GroupNorm's eps is 1e-6 by default (Stable Diffusion's); the
release uses PyTorch's 1e-5, which moves its outputs by ~2e-5 (docs/release.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norms import stack_norm


def group_norm(channels: int, groups: int, eps: float = 1e-6) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(
            f"GroupNorm({groups}) needs a channel count divisible by {groups}, got {channels}: "
            f"set conv_norm_groups to a divisor of the encoder width"
        )
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """x (B, in, H, W), c (B, cond) -> (B, out, H, W); conv1: in→mid, conv2: mid→out."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, cond_size: int, norm_groups: int,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups, norm_eps)
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, mid_channels))
        self.norm2 = group_norm(mid_channels, norm_groups, norm_eps)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond_proj(c)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConvStage(nn.Module):
    """A stack of ResBlocks over the (H, W) grid followed by a norm over channels (``stack_norm``).

    Input (B, in, H, W) grid; output (B, L, out) tokens in raster order. ``cond_adaptor`` adds a
    trainable LayerNorm on the condition c (used when upcycling a pretrained DiT, paper §4.4).
    """

    def __init__(self, widths: list[tuple[int, int, int]], cond_size: int, norm_groups: int, cond_adaptor: bool = False,
                 norm_eps: float = 1e-6, final_norm: str = "layernorm"):
        super().__init__()
        self.cond_norm = nn.LayerNorm(cond_size) if cond_adaptor else nn.Identity()
        self.blocks = nn.ModuleList([ResBlock(i, m, o, cond_size, norm_groups, norm_eps) for i, m, o in widths])
        self.norm = stack_norm(final_norm, widths[-1][2])

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = self.cond_norm(c)
        for block in self.blocks:
            x = block(x, c)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, out, H, W) -> (B, L, out)
