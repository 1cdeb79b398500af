"""The DiT block with adaLN-Zero and DiT's final layer (Peebles & Xie 2023, §3.2).

One block class serves the DiT baseline and DC-DiT's inner network. Parameter names follow the
official release (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``).

A block takes its tokens in one of two layouts (``models/packing.py``): a batch (B, M, D) with an
optional key-padding mask ``kv_mask`` (B, M) bool (DiT, and DC-DiT's padded reference path), or a
:class:`~dcdit.models.packing.Packing` with the tokens of all samples in one sequence (T, D)
(DC-DiT's packed path): the adaLN modulators are computed per sample (B, 6D) and expanded to each
sample's rows, and attention never crosses samples (``models/attention.py`` picks the kernel).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .packing import Packing, Padded, as_layout

#: What a block accepts as its token layout: None (a plain batch), a (B, M) bool key mask, or a layout.
Layout = torch.Tensor | Padded | Packing | None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, M, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias) as in timm / DiT."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: Layout = None) -> torch.Tensor:
        """x (B, M, D) or packed (T, D) -> the same shape."""
        *rows, D = x.shape
        qkv = self.qkv(x).reshape(*rows, 3, self.num_heads, self.head_dim)
        return self.proj(as_layout(layout).attend(qkv).reshape(*rows, D))


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm's ``Mlp`` layout)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """x (B, M, D) or packed (T, D), c (B, D) -> the shape of x. adaLN-Zero: gates start at zero, so
    a new block is the identity.

    ``has_mlp=False`` is the release's ``d`` block (``HNetDiTBlock(has_mlp=False)``, docs/release.md):
    no ``norm2`` and no ``mlp``, x + gate_msa · attn(modulate(norm1(x), shift_msa, scale_msa)) only.
    Its adaLN Linear still produces all 6D modulators (the release's layout, so its state dict loads);
    the MLP's shift/scale/gate rows are computed and unused."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, has_mlp: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.has_mlp = has_mlp
        if has_mlp:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: Layout = None) -> torch.Tensor:
        """x (B, M, D) or packed (T, D), c (B, D) -> the shape of x."""
        layout = as_layout(layout)
        # (B, 1, D) or (T, D) each; expanded chunk by chunk: contiguous operands make the elementwise
        # ops and the backward's segment sums ~1.7× faster than chunks of one (T, 6D) tensor (measured)
        chunks = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa = [layout.per_token(v) for v in chunks[:3]]
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, layout)
        if not self.has_mlp:  # a ``d`` block: attention only, the MLP's modulators are not expanded
            return x
        shift_mlp, scale_mlp, gate_mlp = [layout.per_token(v) for v in chunks[3:]]
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


def inner_mlp_flags(inner_mlp: list[bool] | None, depth: int) -> list[bool]:
    """``model.inner_mlp`` -> one has-MLP flag per block (None: every block has its MLP), or a one-line
    error naming the key."""
    if inner_mlp is None:
        return [True] * depth
    if not isinstance(inner_mlp, (list, tuple)) or not all(isinstance(v, bool) for v in inner_mlp):
        raise ValueError(f"model.inner_mlp must be null or a list of true/false, one per inner block, got {inner_mlp!r}")
    if len(inner_mlp) != depth:
        raise ValueError(f"model.inner_mlp has {len(inner_mlp)} entries; it needs one per inner block (model.depth = {depth})")
    return list(inner_mlp)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + Linear: x (B, M, in) , c (B, cond) -> (B, M, P²·C_out).

    DiT uses ``cond_size == hidden_size``; DC-DiT's decoder runs at d = D/4 with a width-D condition.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cond_size: int | None = None):
        super().__init__()
        cond_size = cond_size or hidden_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
