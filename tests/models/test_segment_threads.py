"""Packed attention whose backward runs whole segments on single-threaded workers
(dcdit.models.segment_threads) against per-segment SDPA (outputs bit for bit, gradients to rounding),
and the worker pool's thread handling."""

from __future__ import annotations

import pytest
import torch

from dcdit.models import attention, segment_threads
from dcdit.models.packing import Packing

pytestmark = pytest.mark.skipif(not segment_threads.AVAILABLE, reason="this torch has no CPU flash-attention op")


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _qkv(sizes, heads=4, hd=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(sizes), 3, heads, hd, generator=g).to(dtype)


def _both(qkv, sizes, fn_kwargs=None):
    """(output, qkv gradient) of the threaded path and of per-segment SDPA, same upstream gradient."""
    packing = Packing.from_counts(torch.tensor(sizes))
    w = torch.randn(qkv.shape[0], *qkv.shape[2:], generator=torch.Generator().manual_seed(1)).to(qkv.dtype)
    results = []
    for fn in (lambda x: segment_threads.segment_attention(x, packing.sizes, packing.starts),
               lambda x: attention.sdpa_per_segment(x, packing)):
        x = qkv.clone().requires_grad_()
        out = fn(x)
        (grad,) = torch.autograd.grad((out * w).sum(), x)
        results.append((out.detach(), grad))
    return results


@pytest.mark.parametrize("sizes,heads,hd", [
    ([263, 155, 340, 1, 288, 2, 260, 260], 4, 24),  # the MNIST step's range, 1-token segments, a repeat
    ([513, 64, 700, 65], 2, 8),  # past the kernel's query / key block sizes
    ([7, 3, 9, 1, 1, 5, 11], 6, 64),  # more segments than threads, odd lengths
], ids=["mnist-like", "long", "short"])
def test_outputs_equal_per_segment_sdpa_and_gradients_agree(two_threads, sizes, heads, hd):
    """Catches a segment written to the wrong rows, a share that skips or repeats a segment (its
    gradient rows stay uninitialised), q/k/v or their gradients swapped, a wrong saved logsumexp. The
    single-threaded backward sums in another order than SDPA's 2-thread one: rounding only."""
    (out, grad), (ref, ref_grad) = _both(_qkv(sizes, heads, hd), sizes)
    assert torch.equal(out, ref)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_inference_and_no_grad_modes(two_threads):
    """Sampling runs under inference mode and no_grad: the same outputs, nothing saved that fails."""
    sizes = [30, 12, 45, 12, 7]
    qkv = _qkv(sizes)
    packing = Packing.from_counts(torch.tensor(sizes))
    ref = attention.sdpa_per_segment(qkv, packing)
    with torch.inference_mode():
        assert torch.equal(segment_threads.segment_attention(qkv, packing.sizes, packing.starts), ref)
    with torch.no_grad():
        assert torch.equal(segment_threads.segment_attention(qkv, packing.sizes, packing.starts), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-input", "bf16-input"])
def test_cpu_bf16_autocast_equals_sdpa(two_threads, dtype):
    """Under autocast SDPA casts fp32 inputs to bf16 first; the threaded path must do the same."""
    sizes = [40, 17, 33]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, grad), (ref, ref_grad) = _both(_qkv(sizes, dtype=dtype), sizes)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=1e-3)  # bf16 rounding of the summation order


def test_workers_run_single_threaded_and_the_caller_keeps_its_thread_count(two_threads):
    pool = segment_threads.worker_pool(2)
    assert torch.get_num_threads() == 2
    assert [pool.submit(torch.get_num_threads).result() for _ in range(4)] == [1] * 4


def test_the_pool_follows_the_thread_count_and_a_fork(two_threads, monkeypatch):
    a = segment_threads.worker_pool(2)
    assert segment_threads.worker_pool(2) is a
    b = segment_threads.worker_pool(3)
    assert b is not a and torch.get_num_threads() == 3
    monkeypatch.setattr(segment_threads.os, "getpid", lambda: -1)  # as in a forked child
    assert segment_threads.worker_pool(3) is not b


def test_a_worker_error_reaches_the_caller(two_threads, monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(segment_threads, "_KERNEL_BACKWARD", broken)
    out = segment_threads.segment_attention(_qkv([5, 6]).requires_grad_(), (5, 6), (0, 5))
    with pytest.raises(RuntimeError, match="kernel failed"):
        out.sum().backward()


@pytest.mark.parametrize("sizes,parts", [([263, 155, 340, 1, 288, 2, 260, 260], 2), ([5], 2), ([9, 9, 9, 9, 9], 3),
                                         (list(range(1, 40)), 4)])
def test_balanced_shares_cover_every_segment_once_with_close_loads(sizes, parts):
    """Every index exactly once, no empty share, and the greedy bound: loads differ by at most the
    largest single n²."""
    shares = segment_threads.balanced_shares(tuple(sizes), parts)
    assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
    assert all(shares) and len(shares) == min(parts, len(sizes))
    loads = [sum(sizes[i] ** 2 for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(n * n for n in sizes)


BIG = [300, 310] * 8  # Σ n² · 96 = 1.4e8 ≥ 2 threads · WORK_PER_THREAD
SMALL = [150, 160] * 8  # 3.7e7: below it


@pytest.mark.parametrize("threads,sizes,grad,expected", [(2, BIG, True, "threads"), (1, BIG, True, "sdpa"),
                                                         (2, [300] * 16, True, "sdpa"), (2, SMALL, True, "sdpa"),
                                                         (2, BIG, False, "sdpa")],
                         ids=["2-threads-enough-work", "1-thread", "all-equal", "little-work", "no-backward"])
def test_varlen_attention_uses_the_workers_only_where_they_are_faster(monkeypatch, threads, sizes, grad, expected):
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls = []
    real_threads, real_sdpa = segment_threads.segment_attention, attention.sdpa_per_segment
    monkeypatch.setattr(segment_threads, "segment_attention", lambda *a: calls.append("threads") or real_threads(*a))
    monkeypatch.setattr(attention, "sdpa_per_segment", lambda *a: calls.append("sdpa") or real_sdpa(*a))
    try:
        attention.varlen_attention(_qkv(sizes).requires_grad_(grad), Packing.from_counts(torch.tensor(sizes)))
    finally:
        torch.set_num_threads(n)
    assert calls == [expected]
