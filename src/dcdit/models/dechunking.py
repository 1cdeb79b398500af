"""De-chunking: back from the M kept tokens to the full H×W grid (paper §3.4).

1. Confidence-weighted Gaussian smoothing over the real kept tokens (p clamped to [1e-4, 1 − 1e-4]):
   W_ij = exp(−d²_ij / 2σ²) · p_j,  W̃ = W / Σ_j W_ij,  h̃_i = Σ_j W̃_ij h_j,  out_i = p_i h_i + (1 − p_i) h̃_i,
   with d_ij the Euclidean distance of the tokens' grid positions (j runs over every kept token, i included).
2. Plug-back: each of the L grid positions takes ``out`` of its nearest kept token (Euclidean on the
   grid; ties go to the lowest grid index).

Both run in float32 even under autocast. This is the direct O(M²) + O(L·M) form, as in the release.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .chunking import RoutingRecord, gather_tokens


def grid_coords(idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster indices (...,) -> (..., 2) float (row, col)."""
    W = grid[1]
    return torch.stack([torch.div(idx, W, rounding_mode="floor"), idx % W], dim=-1).float()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n, 2), (B, m, 2) integer grid coordinates -> (B, n, m) squared Euclidean distances.

    |a|² + |b|² − 2 a·b with one batched matmul instead of an (n, m, 2) difference tensor. Integer
    coordinates below 2^11 keep every term an exact float32 integer, so the result (and any tie) is exact.
    """
    cross = torch.bmm(a, b.transpose(1, 2))
    return (a * a).sum(-1, keepdim=True) + (b * b).sum(-1)[:, None, :] - 2 * cross


def nearest_kept_slot(record: RoutingRecord) -> torch.Tensor:
    """(B, L) long: for every grid position, the inner slot of its nearest real kept token.

    Real kept tokens occupy the first slots in raster order, and argmin returns the first minimum,
    so ties resolve to the lowest grid index. Squared distances of integer coordinates are exact.
    """
    H, W = record.grid
    B = record.kept_idx.shape[0]
    all_pos = grid_coords(torch.arange(H * W, device=record.kept_idx.device), record.grid).expand(B, -1, -1)
    d2 = squared_distances(all_pos, grid_coords(record.kept_idx, record.grid))  # (B, L, M)
    d2 = d2.masked_fill(~record.slot_mask[:, None, :], float("inf"))
    return d2.argmin(dim=-1)


# Gaussian weights below exp(−60) ≈ 9e-27 are set to exactly 0. A row's sum is at least its own
# weight p_i ≥ 1e-4, so dropping them changes no float32 result; keeping them would make exp and bmm
# run on denormal floats, which is 5–20× slower on CPUs (measured: exp over a (32, 306, 306) tensor
# 167 ms vs 9 ms, the bmm 48 ms vs 10 ms).
_NEGLIGIBLE_EXPONENT = 60.0


class DeChunk(nn.Module):
    """z (B, M, D) inner outputs + routing record -> (B, L, D) on the full grid."""

    def __init__(self, sigma: float = 1.0, eps: float = 0.0):
        super().__init__()
        self.sigma = sigma
        self.eps = eps  # added to every row's weight sum; the release adds 1e-8

    def smooth(self, z: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        """Gaussian smoothing over the real kept tokens: (B, M, D) -> (B, M, D)."""
        p = record.p.gather(1, record.kept_idx).clamp(1e-4, 1 - 1e-4)  # (B, M)
        pos = grid_coords(record.kept_idx, record.grid)  # (B, M, 2)
        d2 = squared_distances(pos, pos)  # (B, M, M)
        e = d2 / (2 * self.sigma**2)  # (B, M, M), no gradient (grid positions)
        w = torch.where(e <= _NEGLIGIBLE_EXPONENT, torch.exp(-e.clamp(max=_NEGLIGIBLE_EXPONENT)), 0.0) * p[:, None, :]
        real = record.slot_mask  # (B, M)
        w = w * real[:, None, :]  # padding slots are not sources
        # A real row always has W_ii = p_i > 0. A padding row (never read by plug-back) may underflow
        # to an all-zero row: add 1 to its denominator so no 0/0 reaches the backward pass.
        w = w / (w.sum(-1, keepdim=True) + (~real)[..., None] + self.eps)
        h_tilde = torch.bmm(w, z)
        return p[..., None] * z + (1 - p[..., None]) * h_tilde

    def forward(self, z: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self.smooth(z.float(), record)
            return gather_tokens(out, nearest_kept_slot(record))
