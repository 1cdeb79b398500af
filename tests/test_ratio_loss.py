"""Ratio loss (paper §3.5) against the closed form computed by hand with exact fractions.

L = N/(N − 1) · ((1 − r̂)(1 − p̄) + (N − 1) r̂ p̄), r̂ = mean(m), p̄ = mean(p), per group of
``group_size`` consecutive samples, averaged over groups.  ∂L/∂p̄ = N (N r̂ − 1)/(N − 1), and every
element of a group of n elements has ∂p̄/∂p = 1/n.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from dcdit.models.chunking import RoutingRecord
from dcdit.ratio_loss import ratio_loss, ratio_loss_from_stats


def record(p, m):
    p = torch.as_tensor(p, dtype=torch.float32)
    m = torch.as_tensor(m, dtype=torch.bool)
    B, L = p.shape
    idx = torch.arange(L).expand(B, L)
    return RoutingRecord(p, m, m, idx, m.sum(1), (1, L))


def hand_loss(p_rows, m_rows, N, group_size):
    """Exact: groups of consecutive rows, mean over a group's elements, mean over groups."""
    N = Fraction(N)
    losses = []
    for g0 in range(0, len(p_rows), group_size):
        ps = [Fraction(str(v)) for row in p_rows[g0 : g0 + group_size] for v in row]
        ms = [int(v) for row in m_rows[g0 : g0 + group_size] for v in row]
        r = Fraction(sum(ms), len(ms))
        pb = sum(ps) / len(ps)
        losses.append(N / (N - 1) * ((1 - r) * (1 - pb) + (N - 1) * r * pb))
    return sum(losses) / len(losses)


def test_single_group_closed_form():
    p = [[0.2, 0.8, 0.6, 0.1]]
    m = [[0, 1, 1, 0]]
    # r̂ = 1/2, p̄ = 0.425, N = 4: 4/3 · (0.5·0.575 + 3·0.5·0.425) = 4/3 · 0.925
    got = ratio_loss(record(p, m), 4.0)
    assert abs(float(got) - 4 / 3 * 0.925) < 1e-6
    assert abs(float(got) - float(hand_loss(p, m, 4, 16))) < 1e-6


@pytest.mark.parametrize("B, group_size", [(5, 2), (7, 3), (4, 16), (6, 1), (6, 6)])
@pytest.mark.parametrize("N", [2.0, 4.0, 16.0])
def test_grouped_closed_form(B, group_size, N):
    g = torch.Generator().manual_seed(B * 100 + group_size)
    p = torch.rand(B, 6, generator=g)
    p = torch.round(p * 1000) / 1000  # decimals, so the exact reference reads them back exactly
    m = torch.rand(B, 6, generator=g) < 0.3
    p_rows = [[float(f"{v:.3f}") for v in row] for row in p.tolist()]
    got = ratio_loss(record(p_rows, m), N, group_size=group_size)
    ref = hand_loss(p_rows, m.int().tolist(), int(N), group_size)
    assert abs(float(got) - float(ref)) < 1e-5


def test_uneven_last_group_is_mean_of_group_losses():
    """5 samples in groups of 2: losses of {0,1}, {2,3}, {4} averaged equally (not element-weighted)."""
    p = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.3], [0.1, 0.1], [0.7, 0.6]]
    m = [[1, 0], [1, 0], [0, 0], [0, 0], [1, 1]]
    N = 4
    groups = [hand_loss(p[i : i + 2], m[i : i + 2], N, 2) for i in (0, 2, 4)]
    expected = sum(groups) / 3
    assert abs(float(ratio_loss(record(p, m), N, group_size=2)) - float(expected)) < 1e-6
    pooled = hand_loss(p, m, N, 5)  # differs from the element-weighted pooled loss
    assert abs(float(expected) - float(pooled)) > 1e-3


@pytest.mark.parametrize("N", [2.0, 4.0, 16.0])
def test_minimum_is_one_at_target(N):
    r = 1 / N
    assert abs(float(ratio_loss_from_stats(torch.tensor(r), torch.tensor(r), N)) - 1.0) < 1e-6
    # along r̂ = p̄ = x the loss is N/(N−1)((1−x)² + (N−1)x²) ≥ 1 with equality only at x = 1/N
    xs = torch.linspace(0, 1, 1001, dtype=torch.float64)
    vals = ratio_loss_from_stats(xs, xs, N)
    assert float(vals.min()) > 1 - 1e-9
    assert abs(float(xs[vals.argmin()]) - 1 / N) <= 1e-3
    # through a record: L = 16 tokens, 16/N boundaries, p̄ = 1/N
    L = 16
    k = int(L / N)
    m = [[1] * k + [0] * (L - k)]
    p = [[1 / N] * L]
    assert abs(float(ratio_loss(record(p, m), N)) - 1.0) < 1e-6


@pytest.mark.parametrize("boundaries, N", [(1, 4.0), (2, 4.0), (6, 4.0), (12, 4.0), (3, 16.0), (0, 2.0)])
def test_gradient_closed_form_and_sign(boundaries, N):
    L = 12
    g = torch.Generator().manual_seed(boundaries)
    p = torch.rand(2, L, generator=g).requires_grad_(True)
    m = torch.zeros(2, L, dtype=torch.bool)
    m[:, :boundaries] = True
    rec = RoutingRecord(p, m, m, torch.arange(L).expand(2, L), m.sum(1), (3, 4))
    ratio_loss(rec, N).backward()
    r = boundaries / L
    expected = N * (N * r - 1) / (N - 1) / p.numel()
    torch.testing.assert_close(p.grad, torch.full_like(p, expected), atol=1e-7, rtol=1e-5)
    if r > 1 / N:
        assert bool((p.grad > 0).all())  # descent pushes p down
    elif r < 1 / N:
        assert bool((p.grad < 0).all())  # descent pushes p up
    else:
        assert bool((p.grad.abs() < 1e-7).all())


def test_grouped_gradient_and_no_gradient_through_mask():
    """The mask is derived from p here (as in the model): r̂ must act as a constant."""
    g = torch.Generator().manual_seed(3)
    p = torch.rand(3, 8, generator=g).requires_grad_(True)
    m = p.detach() > 0.5
    rec = RoutingRecord(p, m, m, torch.arange(8).expand(3, 8), m.sum(1), (2, 4))
    N = 4.0
    ratio_loss(rec, N, group_size=2).backward()
    groups = [(0, 2), (2, 3)]
    for a, b in groups:
        r = float(m[a:b].float().mean())
        n = (b - a) * 8
        expected = N * (N * r - 1) / (N - 1) / n / len(groups)
        torch.testing.assert_close(p.grad[a:b], torch.full_like(p.grad[a:b], expected), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("N", [1.0, 0.5, 0.0, -2.0])
def test_target_ratio_must_exceed_one(N):
    with pytest.raises(ValueError):
        ratio_loss(record([[0.2, 0.7]], [[0, 1]]), N)


def test_group_size_must_be_positive():
    with pytest.raises(ValueError):
        ratio_loss(record([[0.2, 0.7]], [[0, 1]]), 4.0, group_size=0)


def test_curriculum_moves_n_linearly_then_holds():
    """The release's N curriculum: start at step 0, the target from warmup_steps on, linear in between."""
    from dcdit.ratio_loss import curriculum_target_ratio as n_at

    assert [n_at(s, 4.0, 2.0, 100) for s in (0, 25, 50, 100, 1000)] == [2.0, 2.5, 3.0, 4.0, 4.0]
    assert n_at(30, 16.0, None, 100) == 16.0 and n_at(30, 16.0, 2.0, 0) == 16.0  # no curriculum
    assert n_at(10, 4.0, 8.0, 20) == 6.0  # it may also come down from a larger start
