"""Attention kernels (dcdit.models.attention): packed variable-length attention against a per-sample
softmax written out, and the flash-attn varlen branch run on CPU with an exact stand-in."""

from __future__ import annotations

import math

import pytest
import torch

from dcdit.models import attention
from dcdit.models.packing import Packing


def brute_force_varlen(qkv: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """softmax(q kᵀ / √hd) v for every segment on its own, in float64, one head at a time."""
    out, start = [], 0
    for n in sizes:
        q, k, v = qkv[start:start + n].double().unbind(1)  # (n, heads, hd)
        heads = [torch.softmax(q[:, h] @ k[:, h].T / math.sqrt(q.shape[-1]), -1) @ v[:, h] for h in range(q.shape[1])]
        out.append(torch.stack(heads, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("sizes", [[5, 1, 9, 3], [4, 7, 4, 1, 7, 4], [3, 3, 5, 2, 2, 2], [6, 6, 6], [2, 2, 1, 2, 1]],
                         ids=["all-different", "equal-lengths-scattered", "equal-lengths-adjacent", "all-equal", "mixed"])
def test_varlen_attention_matches_per_segment_softmax(sizes):
    """Catches attention across segments, a wrong segment order after grouping equal lengths (segments
    of one length, adjacent or scattered, share one call and every output row must go back to its
    sample), and a wrong gradient through the split / gather."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(sizes), 3, 2, 8, generator=g, requires_grad=True)
    packing = Packing.from_counts(torch.tensor(sizes))
    out = attention.varlen_attention(qkv, packing)
    ref = brute_force_varlen(qkv, sizes)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    w = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad((out * w).sum(), qkv)
    (grad_ref,) = torch.autograd.grad((ref * w.double()).sum(), qkv)
    torch.testing.assert_close(grad.double(), grad_ref.double(), atol=1e-5, rtol=1e-5)


class ExactFlashStandIn:
    """flash_attn_varlen_func's contract, computed exactly in fp32 from the offsets it is given:
    q, k, v (T, heads, hd); cu_seqlens_q/k (B + 1,) int32 on q's device; max_seqlen_q/k Python ints."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        assert q.shape == k.shape == v.shape and q.dim() == 3
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.device == q.device
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and isinstance(max_seqlen_q, int) and max_seqlen_q == max_seqlen_k
        cu = cu_seqlens_q.tolist()
        assert cu[0] == 0 and cu[-1] == q.shape[0] and max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
        self.calls.append((q.dtype, cu))
        out = []
        for a, b in zip(cu, cu[1:]):
            qs, ks, vs = (x[a:b].float().transpose(0, 1) for x in (q, k, v))  # (heads, n, hd)
            w = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            out.append((w @ vs).transpose(0, 1))
        return torch.cat(out).to(q.dtype)


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """The CUDA branch made reachable on CPU: the stand-in as flash_attn_varlen_func, CPU allowed."""
    stand_in = ExactFlashStandIn()
    monkeypatch.setattr(attention, "flash_attn_varlen_func", stand_in)
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cpu",))
    return stand_in


def test_flash_branch_of_the_packed_model_equals_the_padded_reference(flash_on_cpu, monkeypatch, helpers):
    """The packed model's flash-attn code path (cu_seqlens, max_seqlen, q/k/v order, unpacking of the
    output), run on CPU in fp32 through the stand-in, against padded SDPA: outputs and gradients.
    A wrong offset (e.g. kept counts of the wrong sample) or a wrong unpacking changes the output."""
    monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float32,))
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT, class_dropout_prob=0.0))
    x, t, y = helpers.tiny_inputs(5)
    fractions = torch.tensor([0.0, 0.9, 0.3, 0.6, 0.1])
    results = {}
    for execution in ("packed", "padded"):
        model.execution = execution
        model.zero_grad()
        out, rec = model(x, t, y, fractions)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[execution] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(set(rec.kept_count.tolist())) >= 4
    cu = [0, *rec.kept_count.cumsum(0).tolist()]
    assert flash_on_cpu.calls == [(torch.float32, cu)] * len(model.blocks)  # the packed path only, every block
    (out_packed, g_packed), (out_padded, g_padded) = results["packed"], results["padded"]
    torch.testing.assert_close(out_packed, out_padded, atol=1e-5, rtol=1e-5)
    assert g_packed.keys() == g_padded.keys()
    for name in g_padded:
        torch.testing.assert_close(g_packed[name], g_padded[name], atol=1e-5, rtol=1e-4, msg=name)


def test_kernel_choice_sees_bf16_under_cpu_autocast(flash_on_cpu, helpers):
    """Under bf16 autocast the block's input is fp32 (LayerNorm runs in fp32) but q/k/v are bf16: the
    kernel choice must look at q, or flash-attn would never run under autocast on a GPU."""
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    x, t, y = helpers.tiny_inputs(3)
    with torch.no_grad():
        model(x, t, y)  # fp32: not a flash dtype
        assert flash_on_cpu.calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, t, y)
    assert [dtype for dtype, _ in flash_on_cpu.calls] == [torch.bfloat16] * len(model.blocks)


@pytest.fixture
def torch_varlen_on_cpu(monkeypatch):
    """The CUDA branch without flash-attn: torch's varlen_attn replaced by the stand-in, CPU allowed."""
    stand_in = ExactFlashStandIn()
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention, "torch_varlen_attn", stand_in)
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cpu",))
    monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float32,))
    return stand_in


def test_without_flash_attn_the_packed_model_runs_torchs_varlen_kernel(torch_varlen_on_cpu, helpers):
    """Same contract as flash-attn's: the packed model through the stand-in equals padded SDPA."""
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT, class_dropout_prob=0.0)).eval()
    x, t, y = helpers.tiny_inputs(4)
    fractions = torch.tensor([0.0, 0.8, 0.4, 0.2])
    outs = {}
    with torch.no_grad():
        for execution in ("packed", "padded"):
            model.execution = execution
            outs[execution], rec = model(x, t, y, fractions)
    assert torch_varlen_on_cpu.calls == [(torch.float32, [0, *rec.kept_count.cumsum(0).tolist()])] * len(model.blocks)
    torch.testing.assert_close(outs["packed"], outs["padded"], atol=1e-5, rtol=1e-5)


def test_cuda_kernel_choice(monkeypatch):
    """flash-attn when installed; else torch's kernel on compute capability ≥ 8.0; else none (per-segment
    SDPA), and never for fp32 q/k/v. Also: this torch's varlen_attn takes the positional call we make."""
    import inspect
    from types import SimpleNamespace

    assert attention.torch_varlen_attn is not None  # torch 2.13 ships it
    inspect.signature(attention.torch_varlen_attn).bind("q", "k", "v", "cu", "cu", 7, 7)
    q = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    flash = object()
    monkeypatch.setattr(attention, "flash_attn_varlen_func", flash)
    assert attention.varlen_kernel(q) is flash
    assert attention.varlen_kernel(SimpleNamespace(device=q.device, dtype=torch.float32)) is None
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert attention.varlen_kernel(q) is attention.torch_varlen_attn
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert attention.varlen_kernel(q) is None
    assert attention.varlen_kernel(torch.zeros(1, dtype=torch.bfloat16)) is None  # CPU
