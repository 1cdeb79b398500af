"""Tail dropping (elastic inference) and slot planning (paper §3.3, batched chunking and padding) against brute-force Python references.

Tail drop: among a sample's n boundaries, the ⌊f·n⌋ with the lowest p are dropped (f is a decimal
fraction: ⌊f·n⌋ is computed exactly with ``fractions.Fraction``), ties → lowest grid index first
(documented choice), and at least one token stays.
Slots: kept tokens in raster order, then the next-highest-p non-kept tokens (ties → lower index),
up to M = the batch maximum kept count.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from dcdit.models.chunking import plan_slots, route_and_plan, sort_key, tail_drop


def exact_floor(f, n: int) -> int:
    return math.floor(Fraction(str(f)) * n)


def brute_force_tail_drop(p: torch.Tensor, mask: torch.Tensor, fractions: list) -> torch.Tensor:
    B, L = p.shape
    kept = mask.clone()
    for b in range(B):
        bounds = [j for j in range(L) if mask[b, j]]
        n = len(bounds)
        k = min(exact_floor(fractions[b], n), n - 1) if n else 0
        for j in sorted(bounds, key=lambda j: (float(p[b, j]), j))[:k]:
            kept[b, j] = False
    return kept


def brute_force_slots(p: torch.Tensor, kept_mask: torch.Tensor):
    B, L = p.shape
    kept = [[j for j in range(L) if kept_mask[b, j]] for b in range(B)]
    M = max(len(k) for k in kept)
    rows = []
    for b in range(B):
        rest = sorted((j for j in range(L) if not kept_mask[b, j]), key=lambda j: (-float(p[b, j]), j))
        rows.append(kept[b] + rest[: M - len(kept[b])])
    return rows, [len(k) for k in kept], M


def random_mask(B, L, counts, g):
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(counts):
        mask[b, torch.randperm(L, generator=g)[:n]] = True
    return mask


@pytest.mark.parametrize("f", [0.0, 0.1, 0.25, 0.29, 0.5, 0.6, 0.9, 0.99])
def test_tail_drop_matches_brute_force(f):
    g = torch.Generator().manual_seed(int(f * 1000))
    L = 256
    counts = [100, 37, 1, 3, 256, 64]
    p = torch.rand(len(counts), L, generator=g)
    mask = random_mask(len(counts), L, counts, g)
    kept = tail_drop(p, mask, f)
    assert torch.equal(kept, brute_force_tail_drop(p, mask, [f] * len(counts)))
    n = mask.sum(1)
    expected_drop = torch.tensor([min(exact_floor(f, int(k)), max(int(k) - 1, 0)) for k in n])
    assert torch.equal(n - kept.sum(1), expected_drop)
    assert not bool((kept & ~mask).any()), "a non-boundary became kept"
    assert bool((kept.sum(1) >= 1).all())
    for b in range(len(counts)):  # the dropped ones are the lowest-p boundaries
        dropped = mask[b] & ~kept[b]
        if dropped.any():
            assert float(p[b][dropped].max()) <= float(p[b][kept[b]].min())


def test_tail_drop_029_of_100_drops_29():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(1, 400, generator=g)
    mask = random_mask(1, 400, [100], g)
    kept = tail_drop(p, mask, 0.29)
    assert int(kept.sum()) == 71
    assert int((mask & ~kept).sum()) == 29


def test_tail_drop_ties_dropped_lowest_index_first():
    p = torch.tensor([[0.7, 0.6, 0.6, 0.9, 0.6, 0.8]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    kept = tail_drop(p, mask, 0.5)  # drop 3: the three 0.6 tokens
    assert kept.tolist() == [[True, False, False, True, False, True]]
    kept = tail_drop(p, mask, 0.34)  # drop 2 of the three tied 0.6: indices 1 and 2
    assert kept.tolist() == [[True, False, False, True, True, True]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tail_drop_per_sample_fraction_tensor(dtype):
    """Per-sample fractions (Lite-CFG). ``forward_with_cfg`` itself passes a float32 tensor, so a
    float32 tensor of decimal fractions must give the same ⌊f·n⌋ as the decimals (e.g. 0.9·50 = 45)."""
    fr = [0.0, 0.29, 0.5, 0.9, 0.9, 0.7, 0.3, 0.6]
    counts = [40, 100, 7, 50, 60, 100, 90, 95]
    g = torch.Generator().manual_seed(1)
    L = 128
    p = torch.rand(len(fr), L, generator=g)
    mask = random_mask(len(fr), L, counts, g)
    kept = tail_drop(p, mask, torch.tensor(fr, dtype=dtype))
    ref = brute_force_tail_drop(p, mask, fr)
    assert (mask.sum(1) - kept.sum(1)).tolist() == [exact_floor(f, n) for f, n in zip(fr, counts)]
    assert torch.equal(kept, ref)


def test_tail_drop_at_least_one_token_stays():
    p = torch.rand(3, 20)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, 5] = True  # n = 1
    mask[1, :10] = True  # n = 10, f·n = 9.999999 within the 1e-6 tolerance
    mask[2, :2] = True
    kept = tail_drop(p, mask, 0.9999999)
    assert kept.sum(1).tolist() == [1, 1, 1]
    assert bool(kept[0, 5])
    assert int(kept[1].float().argmax()) == int(p[1, :10].argmax())  # the highest-p boundary stays


@pytest.mark.parametrize("bad", [-0.1, -1e-9, 1.0, 1.5])
def test_tail_drop_rejects_fraction_outside_unit_interval(bad):
    p = torch.rand(2, 16)
    mask = p > 0.5
    with pytest.raises(ValueError):
        tail_drop(p, mask, bad)
    with pytest.raises(ValueError):
        tail_drop(p, mask, torch.tensor([0.2, bad], dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_slots_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    L = 48
    counts = [12, 1, 30, 7]
    p = torch.rand(len(counts), L, generator=g)
    p[1, 10:20] = 0.42  # ties among padding candidates -> lower index first
    kept_mask = random_mask(len(counts), L, counts, g)
    kept_idx, kept_count = plan_slots(p, kept_mask)
    rows, cnt, M = brute_force_slots(p, kept_mask)
    assert kept_idx.shape == (len(counts), M) and M == 30
    assert kept_idx.dtype == torch.long and kept_count.dtype == torch.long
    assert kept_idx.tolist() == rows
    assert kept_count.tolist() == cnt


def test_sort_key_orders_like_the_floats():
    """The int64 keys sort exactly as the float64 values do (stable: equal values keep index order),
    across the values routing meets: 0 and −0 (equal), denormals, ties, 1, p-derived keys above 1, inf."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 300, generator=g, dtype=torch.float64)
    x[0, :40] = 0.0
    x[0, 40:80] = -0.0
    x[1, ::3] = 0.5  # ties
    x[2, :50] = torch.tensor(5e-324, dtype=torch.float64) * torch.arange(50)  # denormals and 0
    x[3, ::2] = float("inf")
    x[4] = 1025.0 - torch.rand(300, generator=g).double()  # plan_slots' keys L + 1 − p
    x[5] = torch.rand(300, generator=g).double().round(decimals=1)  # many ties
    expected = torch.sort(x, dim=1, stable=True).indices
    assert torch.equal(torch.sort(sort_key(x), dim=1, stable=True).indices, expected)
    # a sort key that drops the sign handling would order −0 before +0: row 0 checks it is not so
    assert expected[0, :80].tolist() == list(range(80))


def test_route_and_plan_record_fields():
    g = torch.Generator().manual_seed(4)
    L = 35
    p = torch.rand(3, L, generator=g)
    natural = p > 0.6
    rec = route_and_plan(p, natural, torch.tensor([0.0, 0.5, 0.2], dtype=torch.float64), (5, 7))
    kept = brute_force_tail_drop(p, natural, [0.0, 0.5, 0.2])
    rows, cnt, M = brute_force_slots(p, kept)
    assert torch.equal(rec.natural_mask, natural) and torch.equal(rec.kept_mask, kept)
    assert rec.kept_idx.tolist() == rows and rec.kept_count.tolist() == cnt
    assert rec.slot_mask.tolist() == [[s < c for s in range(M)] for c in cnt]
    torch.testing.assert_close(rec.compression_ratio, torch.tensor([L / c for c in cnt]))
    n = natural.sum(1).tolist()
    torch.testing.assert_close(rec.natural_compression_ratio, torch.tensor([L / k for k in n]))
    a, b = rec.split(3)[0], rec.split(3)[2]
    assert torch.equal(a.p, p[:1]) and torch.equal(b.kept_idx, rec.kept_idx[2:]) and b.grid == (5, 7)
