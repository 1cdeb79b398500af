"""Packed execution (dcdit.models.packing, ``model.execution``): the packing bookkeeping against
brute force, and the packed model against the padded reference path — outputs and gradients on
batches whose kept counts run from 1 token to all tokens, plain and DyDiT blocks, CFG and Lite-CFG,
fp32 and CPU bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dcdit.config import build_model, model_config_from_dict
from dcdit.models import attention, segment_threads
from dcdit.models.dydit import dydit_flops_loss, set_dydit_execution
from dcdit.models.packing import Packing, Padded, as_layout
from dcdit.ratio_loss import ratio_loss

SIZES = [3, 1, 4, 4, 2]


def test_packing_offsets_and_segment_ids():
    p = Packing.from_counts(torch.tensor(SIZES))
    assert p.sizes == (3, 1, 4, 4, 2) and p.total == 14 and p.max_len == 4 and p.batch == 5
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 4, 8, 12, 14]
    assert p.seg_ids.tolist() == [b for b, n in enumerate(SIZES) for _ in range(n)]
    with pytest.raises(ValueError, match="at least one token"):
        Packing.from_counts(torch.tensor([2, 0, 1]))


def test_per_token_to_padded_and_select_against_brute_force():
    p = Packing.from_counts(torch.tensor(SIZES))
    v = torch.arange(5.0)[:, None] * torch.ones(1, 2)  # (B, 2): sample b's value is b
    assert p.per_token(v)[:, 0].tolist() == [float(b) for b, n in enumerate(SIZES) for _ in range(n)]
    x = torch.arange(14.0, requires_grad=True)
    padded = p.to_padded(x, width=6)
    rows = [list(range(s, s + n)) + [None] * (6 - n) for s, n in zip([0, 3, 4, 8, 12], SIZES)]
    assert padded.tolist() == [[0.0 if r is None else float(r) for r in row] for row in rows]
    padded.sum().backward()
    assert x.grad.tolist() == [1.0] * 14  # every packed row lands in exactly one slot
    positions, sub = p.select(torch.tensor([1, 3]))
    assert positions.tolist() == [3, 8, 9, 10, 11] and sub.sizes == (1, 4)
    assert p.starts == (0, 3, 4, 8, 12)


def test_as_layout():
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert as_layout(None) == Padded(None) and as_layout(mask).kv_mask is mask
    p = Packing.from_counts(torch.tensor([2]))
    assert as_layout(p) is p


# ------------------------------------------------------------------------------- the whole model


class KeepAllInSampleZero(nn.Module):
    """Wraps a router: sample 0 keeps every token (natural mask all True, p unchanged, gradients intact)."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.inner = router

    def forward(self, h, grid):
        p, natural = self.inner(h, grid)
        natural = natural.clone()
        natural[0] = True
        return p, natural


#: per-sample tail-drop fractions: sample 0 keeps all 64 tokens, sample 1 a single one (⌊0.99·n⌋ = n − 1)
FRACTIONS = torch.tensor([0.0, 0.99, 0.3, 0.5, 0.0, 0.2])


def spread_model(helpers, **overrides) -> nn.Module:
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT, **overrides))
    model.router = KeepAllInSampleZero(model.router)
    return model


def noise_free_rand(*shape, dtype=None, device=None, **_):
    """torch.rand returning 0.5: label dropout never fires (0.5 > 0.1) and the Gumbel noise of DyDiT's
    training-mode gates is log 0.5 − log 0.5 = 0, so both executions take the same (STE) decisions
    although their noise tensors would have different shapes ((B, M) vs (T,))."""
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
    return torch.full(tuple(shape), 0.5, dtype=dtype or torch.float32, device=device)


def run_both(model, x, t, y, bf16: bool, dydit_cfg=None):
    """Training-mode forward + backward in both executions: {execution: (out, record, grads)}."""
    results = {}
    for execution in ("packed", "padded"):
        model.execution = execution
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, rec = model(x, t, y, FRACTIONS)
        loss = (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + ratio_loss(rec, 4.0)
        if dydit_cfg is not None:  # the FLOPs loss reads the gates' STE masks from the record
            loss = loss + dydit_flops_loss(rec, dydit_cfg, 0.5)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[execution] = out.detach().float(), rec, grads
    return results


def spread_batch_both_ways(helpers, monkeypatch, dydit: bool, bf16: bool) -> dict:
    """The spread model (plain or with mixed DyDiT routers) on 6 samples, noise-free, in both executions."""
    model = spread_model(helpers, dydit=dydit).train()
    if dydit:
        helpers.mix_dydit_routers_(model)
    x, t, y = helpers.tiny_inputs(6)
    monkeypatch.setattr(torch, "rand", noise_free_rand)
    cfg = model_config_from_dict(dict(helpers.TINY_DCDIT, dydit=True)) if dydit else None
    return run_both(model, x, t, y, bf16, cfg)


@pytest.mark.parametrize("dydit", [False, True], ids=["plain", "dydit"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_packed_equals_padded_outputs_and_gradients(helpers, monkeypatch, dydit, bf16):
    """The reference is the padded path with masked keys. fp32: outputs within 1e-5 and every
    parameter gradient within 1e-5 of its largest entry. bf16 autocast: the two layouts run GEMMs and
    attention kernels of different shapes whose bf16 roundings differ, so the bound is the bf16
    resolution: outputs within 2 bf16 steps (2⁻⁷ relative) of their scale, gradients within 3%.
    Catches cross-sample attention, a wrong segment order, modulators expanded to the wrong rows,
    a de-chunk reading the wrong cells, and lost gradients (e.g. to the router through the de-chunk)."""
    res = spread_batch_both_ways(helpers, monkeypatch, dydit, bf16)
    (out_k, rec_k, g_k), (out_d, rec_d, g_d) = res["packed"], res["padded"]
    assert torch.equal(rec_k.kept_count, rec_d.kept_count)
    counts = rec_k.kept_count.tolist()
    assert counts[0] == 64 and counts[1] == 1 and len(set(counts)) >= 4
    scale = out_d.abs().max()
    atol = 2 * 2**-7 * float(scale) if bf16 else 1e-5
    torch.testing.assert_close(out_k, out_d, atol=atol, rtol=0)
    assert g_k.keys() == g_d.keys() and any(n.startswith("router.") for n in g_d)
    for name in g_d:
        tol = (3e-2 if bf16 else 1e-5) * float(g_d[name].abs().max().clamp_min(1e-6))
        torch.testing.assert_close(g_k[name], g_d[name], atol=tol, rtol=0, msg=name)
    if dydit:
        for field in ("head_mask", "group_mask", "token_mask", "real_mask"):
            assert torch.equal(getattr(rec_k.dydit, field), getattr(rec_d.dydit, field)), field
        assert 0 < float(rec_k.dydit.token_mask.detach()[rec_k.dydit.real_mask.expand_as(rec_k.dydit.token_mask)].mean()) < 1


@pytest.mark.parametrize("dydit", [False, True], ids=["plain", "dydit"])
def test_packed_equals_padded_with_the_attention_backward_on_worker_threads(helpers, monkeypatch, dydit):
    """The segment-threads attention (models/segment_threads.py) inside the whole model: its rule
    lowered to 0 so that the tiny batch qualifies, 2 threads. Same bounds as the fp32 case above;
    catches a layout of the block's qkv that the per-segment kernel calls read wrongly."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(attention, "WORK_PER_THREAD", 0)
    used = []
    real = segment_threads.segment_attention
    monkeypatch.setattr(segment_threads, "segment_attention", lambda *a: used.append(1) or real(*a))
    try:
        res = spread_batch_both_ways(helpers, monkeypatch, dydit, bf16=False)
    finally:
        torch.set_num_threads(n)
    assert used, "the worker-thread attention did not run"
    (out_k, _, g_k), (out_d, _, g_d) = res["packed"], res["padded"]
    torch.testing.assert_close(out_k, out_d, atol=1e-5, rtol=0)
    for name in g_d:
        torch.testing.assert_close(g_k[name], g_d[name], atol=1e-5 * float(g_d[name].abs().max().clamp_min(1e-6)), rtol=0,
                                   msg=name)


@pytest.mark.parametrize("dydit", [False, True], ids=["plain", "dydit-sliced"])
def test_packed_equals_padded_under_cfg_and_lite_cfg(helpers, dydit):
    """Guided eval forward ([cond; uncond], sample 0 keeping every token): the same f for both
    halves and Lite-CFG (uncond f = 0.9), plain blocks and DyDiT's sliced inference with mixed
    head patterns (mixed timesteps), which selects samples of the packed sequence."""
    model = spread_model(helpers, dydit=dydit).eval()
    if dydit:
        helpers.mix_dydit_routers_(model)
        set_dydit_execution(model, True)
    x, t, y = helpers.tiny_inputs(3)
    t = torch.tensor([3, 500, 999])
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
    for f_uncond in (None, 0.9):
        outs = {}
        for execution in ("packed", "padded"):
            model.execution = execution
            with torch.no_grad():
                outs[execution] = model.forward_with_cfg(xx, tt, yy, 1.5, 0.0, f_uncond)
        (g_k, rec_k), (g_d, rec_d) = outs["packed"], outs["padded"]
        assert torch.equal(rec_k.kept_count, rec_d.kept_count) and int(rec_k.kept_count[0]) == 64
        torch.testing.assert_close(g_k, g_d, atol=1e-5, rtol=0)
        if dydit:
            assert len({tuple(r) for r in rec_k.dydit.head_mask[0].tolist()}) > 1  # mixed patterns
            assert torch.equal(rec_k.dydit.token_mask, rec_d.dydit.token_mask)


def test_execution_is_validated_in_one_line(helpers):
    with pytest.raises(ValueError, match=r"model\.execution must be one of packed, padded, got 'ragged'"):
        build_model(dict(helpers.TINY_DCDIT, execution="ragged"))
    assert build_model(helpers.TINY_DCDIT).execution == "packed"
    # unmasked padding (padding slots attended as tokens) only exists in the padded layout
    assert build_model(dict(helpers.TINY_DCDIT, mask_padding=False)).execution == "padded"
