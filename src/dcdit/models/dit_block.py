"""The DiT block with adaLN-Zero and DiT's final layer (Peebles & Xie 2023, §3.2).

One block class serves the DiT baseline and DC-DiT's inner network. Parameter names follow the
official release (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``).

Attention takes an optional key-padding mask ``kv_mask`` (B, M) bool, True = real token: DC-DiT pads
samples that kept fewer tokens up to the batch maximum, and masked keys make every sample's output
independent of its batch. On CUDA with ``flash-attn`` installed and bf16/fp16 activations, the padded
batch is packed into one variable-length sequence (``flash_attn_varlen_func``), as the authors'
release does; everywhere else PyTorch's ``scaled_dot_product_attention`` is used.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_varlen_func = None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, M, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _use_flash(x: torch.Tensor) -> bool:
    return flash_attn_varlen_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


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

    def forward(self, x: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, D = x.shape
        qkv = self.qkv(x).reshape(B, M, 3, self.num_heads, self.head_dim)
        if _use_flash(x):
            out = self._flash(qkv, kv_mask)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, heads, M, head_dim)
            attn_mask = None if kv_mask is None else kv_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)
        return self.proj(out.reshape(B, M, D))

    @staticmethod
    def _flash(qkv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - GPU only
        B, M = qkv.shape[:2]
        if kv_mask is None:
            kv_mask = torch.ones(B, M, dtype=torch.bool, device=qkv.device)
        lens = kv_mask.sum(1, dtype=torch.int32)
        cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        packed = qkv[kv_mask]  # (total, 3, heads, head_dim); real tokens come first in every row
        out = flash_attn_varlen_func(
            packed[:, 0], packed[:, 1], packed[:, 2], cu, cu, int(lens.max()), int(lens.max())
        )
        full = qkv.new_zeros(B, M, *out.shape[1:])
        full[kv_mask] = out
        return full


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
    """x (B, M, D), c (B, D) -> (B, M, D). adaLN-Zero: gates start at zero, so a new block is the identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), kv_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


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
