"""Packed attention on CPU whose backward spreads whole segments over the threads, one intra-op
thread each.

Why: PyTorch's CPU flash-attention kernel parallelises one call over batch × heads, and a packed
segment is a single sequence of a few heads. Its forward still scales (at the MNIST training shape,
n ≈ 263, 4 heads, hd 24: 1.45× from 1 to 2 threads), its backward hardly does (1.16×; a batch of 32
sequences: 1.45×). So the forward runs segment after segment on the caller's threads, and the
backward gives each thread whole segments (shares of about equal Σ n² work) run single-threaded.
Measured on the 2-core CPU, 2 threads, against per-segment SDPA (``sdpa_per_segment``), forward +
backward over packed segments of 120–340 tokens (docs/benchmarks.md, "Attention backends on CPU"):
0.66–0.96× the time for every batch whose attention work Σ n²·D was at least 1.3·10⁸, 1.05–1.27×
for every one at or below 0.96·10⁸ (8 to 32 segments, (heads, head dim) from (4, 24) to (16, 72)),
so ``models/attention.py`` uses it from Σ n²·D ≥ 5·10⁷ per thread, and only when a backward
follows. In a whole MNIST training step (batch 32, 4 heads of 24) the step takes 0.95× the time.

Exactness: the forward calls the kernel ``F.scaled_dot_product_attention`` picks on CPU
(``aten._scaled_dot_product_flash_attention_for_cpu``) on the same inputs and threads: outputs equal
SDPA's bit for bit. The single-threaded backward sums the key/value gradients in another order than
the 2-thread kernel: gradients agree to rounding (~1e-7 relative; tests/models/test_segment_threads.py).

The workers are a small thread pool, built on first use with as many threads as
``torch.get_num_threads()``; it is rebuilt when that number changes or in a forked child. Each
worker fixes its own intra-op thread count at 1 when it starts; the caller's is restored at once.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_KERNEL_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
AVAILABLE = _KERNEL is not None and _KERNEL_BACKWARD is not None

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (threads, pid) the pool was built for
_lock = threading.Lock()


def worker_pool(threads: int) -> ThreadPoolExecutor:
    """The pool of ``threads`` single-threaded workers (built, or rebuilt after a fork or a change)."""
    global _pool, _pool_key
    with _lock:
        if _pool is None or _pool_key != (threads, os.getpid()):
            if _pool is not None and _pool_key[1] == os.getpid():
                _pool.shutdown(wait=True)
            ready = threading.Barrier(threads + 1, timeout=60)  # a worker that fails to start raises, never hangs

            def single_threaded():
                torch.set_num_threads(1)
                torch.get_num_threads()  # ATen's once-per-thread set-up runs now, while the count is 1
                ready.wait()

            _pool = ThreadPoolExecutor(threads, thread_name_prefix="dcdit-segments", initializer=single_threaded)
            for _ in range(threads):  # start every worker now, while the count is 1
                _pool.submit(int)
            ready.wait()
            torch.set_num_threads(threads)  # the caller's count back
            _pool_key = (threads, os.getpid())
        return _pool


def balanced_shares(sizes: tuple[int, ...], parts: int) -> list[list[int]]:
    """Segment indices in ``parts`` lists of about equal attention work Σ n² (longest first, each to
    the least loaded list)."""
    shares: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = load.index(min(load))
        shares[j].append(i)
        load[j] += sizes[i] ** 2
    return [s for s in shares if s]


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(n, heads, hd) rows -> (1, heads, n, hd), a view."""
    return x[None].transpose(1, 2)


def _run(work, shares: list[list[int]], threads: int) -> None:
    """``work(indices)`` for every share on the workers (without autograd: grad mode is per thread)."""

    def task(indices):
        with torch.no_grad():
            work(indices)

    for f in [worker_pool(threads).submit(task, s) for s in shares]:
        f.result()  # re-raises a worker's exception here


class SegmentAttention(torch.autograd.Function):
    """qkv (T, 3, heads, hd), segment sizes and starts -> (T, heads, hd), each segment attending to itself."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, sizes: tuple[int, ...], starts: tuple[int, ...], threads: int) -> torch.Tensor:
        out = qkv.new_empty(qkv.shape[0], *qkv.shape[2:])
        lse = []
        for start, n in zip(starts, sizes):  # on the caller's threads: one call's forward scales well enough
            q, k, v = (_heads_first(t) for t in qkv[start:start + n].unbind(1))
            o, segment_lse = _KERNEL(q, k, v)
            out[start:start + n].copy_(o[0].transpose(0, 1))
            lse.append(segment_lse)
        ctx.sizes, ctx.starts, ctx.threads = sizes, starts, threads
        ctx.save_for_backward(qkv, out, *lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qkv, out, *lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad = torch.empty_like(qkv)

        def work(indices):
            for i in indices:
                rows = slice(ctx.starts[i], ctx.starts[i] + ctx.sizes[i])
                q, k, v = (_heads_first(t) for t in qkv[rows].unbind(1))
                d = _KERNEL_BACKWARD(_heads_first(grad_out[rows]), q, k, v, _heads_first(out[rows]), lse[i], 0.0, False)
                for j in range(3):
                    grad[rows, j].copy_(d[j][0].transpose(0, 1))

        _run(work, balanced_shares(ctx.sizes, ctx.threads), ctx.threads)
        return grad, None, None, None


def _cpu_autocast_dtype() -> torch.dtype | None:
    """CPU autocast's dtype when it is on (torch >= 2.4 names it per device; older torch has the CPU calls)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None  # pragma: no cover


def segment_attention(qkv: torch.Tensor, sizes: tuple[int, ...], starts: tuple[int, ...]) -> torch.Tensor:
    """Per-segment attention on the worker threads (see the module doc). Under CPU autocast the inputs
    are cast as ``F.scaled_dot_product_attention`` casts them, so the result is the same."""
    dtype = _cpu_autocast_dtype()
    if dtype is not None:
        qkv = qkv.to(dtype)
    return SegmentAttention.apply(qkv, sizes, starts, torch.get_num_threads())
