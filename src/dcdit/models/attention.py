"""Attention kernels for the two token layouts of the inner network (see ``models/packing.py``).

* **Padded** (B, M, ·): PyTorch's ``scaled_dot_product_attention`` with an optional key-padding mask
  (B, M) bool, True = real token. DiT's blocks and DC-DiT's reference path (``execution: padded``).
* **Packed** (T, ·), T = Σ_b n_b tokens of B samples back to back, segment offsets ``cu_seqlens``
  (B + 1,): attention never crosses a segment boundary. Two backends, chosen per call from q's
  dtype and device (so bf16 autocast, which makes the qkv Linear's output bf16, selects the kernel;
  the block's input stays fp32 after LayerNorm and says nothing):

  - ``flash_attn_varlen_func`` (the authors' release) on CUDA with fp16/bf16 q/k/v when ``flash-attn``
    is installed;
  - on CPU with several threads, enough attention work and more than one length: one call per
    segment, the backward's segments spread over single-threaded workers
    (``models/segment_threads.py``: the kernel's backward parallelises one short sequence poorly);
  - everywhere else, SDPA once per segment, segments of equal length batched into one call.

    Measured on the 2-core CPU, forward + backward (``benchmarks/bench_varlen_attention.py``,
    docs/benchmarks.md): per-segment SDPA beats the padded masked SDPA (it computes no padded row and
    runs the unmasked CPU flash kernel), nested jagged tensors (no fused CPU kernel: SDPA falls back to
    a per-sample math path, 5–12× slower) and one block-diagonal mask (O(T²) work, B× too much).
    The segments are cut with ``split`` rather than slicing: the backward of B slices writes B
    full-size zero gradients, that of one split a single concatenation (MNIST shapes, forward +
    backward 129 ms → 82 ms).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import segment_threads

if TYPE_CHECKING:  # pragma: no cover
    from .packing import Packing

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_varlen_func = None


#: Where ``flash_attn_varlen_func`` runs: device types and q/k/v dtypes (tests swap in a CPU stand-in).
FLASH_DEVICES = ("cuda",)
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def use_flash(q: torch.Tensor) -> bool:
    """True when ``flash_attn_varlen_func`` can run on q: installed, CUDA, fp16 or bf16 (under autocast
    the qkv Linear's output is bf16 even though the block's fp32 input is not)."""
    return flash_attn_varlen_func is not None and q.device.type in FLASH_DEVICES and q.dtype in FLASH_DTYPES


def padded_attention(qkv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
    """qkv (B, M, 3, heads, hd), kv_mask (B, M) bool or None -> (B, M, heads, hd)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, heads, M, hd)
    attn_mask = None if kv_mask is None else kv_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)


def varlen_attention(qkv: torch.Tensor, packing: "Packing") -> torch.Tensor:
    """qkv (T, 3, heads, hd) packed by ``packing`` -> (T, heads, hd); each segment attends to itself."""
    if use_flash(qkv):
        return flash_varlen(*qkv.unbind(1), packing)
    if use_segment_threads(qkv, packing):
        return segment_threads.segment_attention(qkv, packing.sizes, packing.starts)
    return sdpa_per_segment(qkv, packing)


#: Attention work Σ n²·(heads·hd) per thread from which the workers pay. Measured on the 2-core CPU
#: (``bench_varlen_attention.py --sweep``, docs/benchmarks.md): forward + backward time against
#: per-segment SDPA 0.66–0.96× for every batch with Σ n²·D ≥ 1.3·10⁸, 1.05–1.27× for every one with
#: Σ n²·D ≤ 0.96·10⁸ (8 to 32 segments of 77–340 tokens, D = heads·hd from 96 to 1152).
WORK_PER_THREAD = 5 * 10**7


def use_segment_threads(qkv: torch.Tensor, packing: "Packing") -> bool:
    """CPU, more than one thread, enough attention work, more than one length (all equal: one
    batched SDPA call is faster)."""
    threads = torch.get_num_threads()
    if not (segment_threads.AVAILABLE and qkv.device.type == "cpu" and threads > 1 and len(set(packing.sizes)) > 1):
        return False
    return sum(n * n for n in packing.sizes) * qkv.shape[2] * qkv.shape[3] >= WORK_PER_THREAD * threads


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: "Packing") -> torch.Tensor:
    """The flash-attn varlen call: q, k, v (T, heads, hd) in the packed order, int32 offsets on q's device."""
    cu = packing.cu_seqlens.to(device=q.device, dtype=torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, packing.max_len, packing.max_len)


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    """(S, n, 3, heads, hd) -> (S, n, heads, hd): S same-length sequences in one call."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (S, heads, n, hd)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def sdpa_per_segment(qkv: torch.Tensor, packing: "Packing") -> torch.Tensor:
    """SDPA over every segment of a packed (T, 3, heads, hd) tensor -> (T, heads, hd).

    Segments of equal length share one batched call: the rows are permuted once so that every
    length's segments are adjacent (one gather forward, one scatter backward — per-group gathers
    would write a full-size gradient per group), and the outputs are permuted back."""
    if packing.all_lengths_differ:
        return torch.cat([_sdpa(seg[None])[0] for seg in qkv.split(packing.sizes)])
    order, inverse, groups = packing.length_order()
    parts = qkv.index_select(0, order).split([k * n for n, k in groups])
    out = torch.cat([_sdpa(part.unflatten(0, (k, n))).flatten(0, 1) for part, (n, k) in zip(parts, groups)])
    return out.index_select(0, inverse)
