"""Attention kernels for the two token layouts of the inner network (see ``models/packing.py``).

* **Padded** (B, M, ·): PyTorch's ``scaled_dot_product_attention`` with an optional key-padding mask
  (B, M) bool, True = real token. DiT's blocks and DC-DiT's reference path (``execution: padded``).
* **Packed** (T, ·), T = Σ_b n_b tokens of B samples back to back, segment offsets ``cu_seqlens``
  (B + 1,): attention never crosses a segment boundary. Three backends, chosen per call from q's
  dtype and device (so bf16 autocast, which makes the qkv Linear's output bf16, selects the kernel;
  the block's input stays fp32 after LayerNorm and says nothing):

  - ``flash_attn_varlen_func`` (the authors' release) on CUDA with fp16/bf16 q/k/v when ``flash-attn``
    is installed; without it, PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (torch ≥ 2.10,
    the same flash kernel shipped with torch and the same (T, heads, hd) / cu_seqlens contract) on
    GPUs of compute capability 8.0 or newer;
  - on CPU when gradients are needed, with several threads, enough attention work and more than one
    length: one call per segment, the backward's segments spread over single-threaded workers
    (``models/segment_threads.py``: the kernel's backward parallelises one short sequence poorly);
  - everywhere else, SDPA once per segment (one batched call when all segments have one length).

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
try:  # torch's own varlen flash attention (CUDA only)
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:  # pragma: no cover - torch < 2.10
    torch_varlen_attn = None


#: Where a varlen flash kernel runs: device types and q/k/v dtypes (tests swap in a CPU stand-in).
FLASH_DEVICES = ("cuda",)
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def varlen_kernel(q: torch.Tensor):
    """The varlen flash kernel for q, or None: on a flash device with fp16 / bf16 q (under autocast the
    qkv Linear's output is bf16 even though the block's fp32 input is not), flash-attn's when
    installed, else torch's own on a GPU that has its kernel (compute capability ≥ 8.0)."""
    if q.device.type not in FLASH_DEVICES or q.dtype not in FLASH_DTYPES:
        return None
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func
    if torch_varlen_attn is not None and (q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) >= (8, 0)):
        return torch_varlen_attn
    return None


def padded_attention(qkv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
    """qkv (B, M, 3, heads, hd), kv_mask (B, M) bool or None -> (B, M, heads, hd)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, heads, M, hd)
    attn_mask = None if kv_mask is None else kv_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)


def varlen_attention(qkv: torch.Tensor, packing: "Packing") -> torch.Tensor:
    """qkv (T, 3, heads, hd) packed by ``packing`` -> (T, heads, hd); each segment attends to itself."""
    kernel = varlen_kernel(qkv)
    if kernel is not None:
        return flash_varlen(kernel, *qkv.unbind(1), packing)
    if use_segment_threads(qkv, packing):
        return segment_threads.segment_attention(qkv, packing.sizes, packing.starts)
    return sdpa_per_segment(qkv, packing)


#: Attention work Σ n²·(heads·hd) per thread from which the workers pay. Measured on the 2-core CPU
#: (``bench_varlen_attention.py --sweep``, docs/benchmarks.md): forward + backward time against
#: per-segment SDPA 0.66–0.96× for every batch with Σ n²·D ≥ 1.3·10⁸, 1.05–1.27× for every one with
#: Σ n²·D ≤ 0.96·10⁸ (8 to 32 segments of 77–340 tokens, D = heads·hd from 96 to 1152).
WORK_PER_THREAD = 5 * 10**7


def use_segment_threads(qkv: torch.Tensor, packing: "Packing") -> bool:
    """CPU, a backward to come (without one the workers have nothing to do and per-segment SDPA gives
    the same outputs), more than one thread, enough attention work, more than one length (all equal:
    one batched SDPA call is faster)."""
    threads = torch.get_num_threads()
    if not (segment_threads.AVAILABLE and qkv.device.type == "cpu" and qkv.requires_grad and torch.is_grad_enabled()
            and threads > 1 and not packing.one_length):
        return False
    return sum(n * n for n in packing.sizes) * qkv.shape[2] * qkv.shape[3] >= WORK_PER_THREAD * threads


def flash_varlen(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: "Packing") -> torch.Tensor:
    """The varlen call (both kernels take q, k, v, cu_q, cu_k, max_q, max_k; full attention and the
    1/√hd scale by default): q, k, v (T, heads, hd) in the packed order, int32 offsets on q's device."""
    cu = packing.cu_seqlens.to(device=q.device, dtype=torch.int32)
    return kernel(q, k, v, cu, cu, packing.max_len, packing.max_len)


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    """(S, n, 3, heads, hd) -> (S, n, heads, hd): S same-length sequences in one call."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (S, heads, n, hd)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def sdpa_per_segment(qkv: torch.Tensor, packing: "Packing") -> torch.Tensor:
    """SDPA over every segment of a packed (T, 3, heads, hd) tensor -> (T, heads, hd).

    Segments all of one length: one batched call on a view of the rows. Otherwise one call per
    segment, cut with one ``split``. Regrouping the rows of equal-length segments by a permutation so
    that they share calls (what this did until 2026-12-01) cost more than it saved: forward + backward
    took 1.07–1.26× the time of this on the MNIST training and sampling batches, 1 and 2 threads
    (``bench_varlen_attention.py``, backend ``grouped``; docs/benchmarks.md)."""
    if packing.one_length:
        return _sdpa(qkv.unflatten(0, (packing.batch, packing.sizes[0]))).flatten(0, 1)
    return torch.cat([_sdpa(seg[None])[0] for seg in qkv.split(packing.sizes)])
