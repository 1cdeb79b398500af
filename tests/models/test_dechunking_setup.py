"""The packed de-chunk's set-up (models/dechunking.py: nearest_kept_cell, window_ranges, pair_kernel and
their cached constants) against the implementations they replaced in issue 17, kept here verbatim as
references: the same integers exactly (indices, run bounds, ties) and the same kernel values bit for
bit, on random masks from one kept cell to every cell, with per-sample counts that differ.
(test_dechunking.py checks the same functions against brute-force loops of the paper's rules.)"""

from __future__ import annotations

import pytest
import torch

from dcdit.models.dechunking import (
    DeChunk,
    axis_kernel,
    axis_radius,
    nearest_kept_cell,
    pair_kernel,
    window_ranges,
    window_weights,
)


def previous_nearest_kept_cell(kept, grid):
    """Before issue 17: d², d²·L and the key as separate int64 (B, H, W, W') tables."""
    H, W = grid
    B, L = kept.shape
    k = kept.view(B, H, W)
    rows = torch.arange(H).view(1, H, 1)
    far = 4 * (H + W)
    above = torch.where(k, rows, -far).cummax(dim=1).values
    below = torch.where(k, rows, H + far).flip(1).cummin(dim=1).values.flip(1)
    take_above = rows - above <= below - rows
    cand = torch.where(take_above, above, below)
    dr = (rows - cand).abs()
    cols = torch.arange(W)
    d2 = (cols[:, None] - cols[None, :]) ** 2 + (dr**2)[:, :, None, :]
    key = d2 * L + (cand * W + cols)[:, :, None, :]
    return (key.min(dim=-1).values % L).view(B, L)


def previous_window_ranges(kept, grid, sigma):
    """Before issue 17: (start, count, col, (R, R'), pairs), radii from axis_kernel on every call."""
    H, W = grid
    B, L = kept.shape
    Rr = int((axis_kernel(H, sigma) > 0).sum()) - 1
    Rc = int((axis_kernel(W, sigma) > 0).sum()) - 1
    flat = kept.reshape(-1)
    after = flat.cumsum(0).view(B, H, W)
    first = after.new_zeros(B, H + 2 * Rr, W + 1)
    first[:, Rr:Rr + H, 1:] = after
    first[:, Rr:Rr + H, 0] = after[:, :, 0] - kept.view(B, H, W)[:, :, 0].long()
    cells = flat.nonzero().squeeze(1)
    b, r, c = cells // L, cells % L // W, cells % W
    rows = (b * (H + 2 * Rr) + r)[:, None] + torch.arange(2 * Rr + 1)
    first = first.view(-1, W + 1)
    start = first[rows, (c - Rc).clamp(min=0)[:, None]]
    count = first[rows, (c + Rc + 1).clamp(max=W)[:, None]] - start
    return start, count, c, (Rr, Rc), int(count.sum())


def previous_weight_table(grid, sigma):
    """Before issue 17, pair_kernel's weight table built on every call."""
    H, W = grid
    Rr = int((axis_kernel(H, sigma) > 0).sum()) - 1
    dr = torch.arange(-Rr, Rr + 1).abs()
    dc = torch.arange(-(W - 1), W).abs()
    return axis_kernel(H, sigma)[dr][:, None] * axis_kernel(W, sigma)[dc][None, :]


def random_masks(B, grid, fraction, seed):
    """(B, L) masks, sample b keeping ~fraction·(b + 1)/B of the cells and at least one (different counts)."""
    g = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1]
    kept = torch.rand(B, L, generator=g) < fraction * (torch.arange(1, B + 1)[:, None] / B)
    kept[torch.arange(B), torch.randint(0, L, (B,), generator=g)] = True
    return kept


def one_and_all(grid):
    """One sample with a single kept cell (every other cell ties on distance rules), one with all."""
    L = grid[0] * grid[1]
    single = torch.zeros(L, dtype=torch.bool)
    single[L // 2] = True
    return torch.stack([single, torch.ones(L, dtype=torch.bool)])


GRIDS = [(1, 1), (1, 9), (9, 1), (4, 6), (13, 9), (32, 32), (64, 64)]


@pytest.mark.parametrize("grid", GRIDS + [(2, 600), (600, 2)])
@pytest.mark.parametrize("fraction", [0.05, 0.4, 1.0])
def test_nearest_kept_cell_equals_the_previous_search(grid, fraction):
    """Exactly the previous indices. (2, 600) and (600, 2) need int64 keys (the far sentinel's key
    exceeds int32 there): catches an overflowing int32 key, a key split into the wrong (W, W') and
    (B, H, W') parts (e.g. the candidate row's index left out, which breaks ties), and a remainder taken
    before the minimum."""
    kept = torch.cat([random_masks(5, grid, fraction, seed=grid[0] * 7 + grid[1]), one_and_all(grid)])
    got = nearest_kept_cell(kept, grid)
    assert got.dtype == torch.long
    assert torch.equal(got, previous_nearest_kept_cell(kept, grid))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_window_ranges_and_pair_kernel_equal_the_previous_construction(grid, sigma, fraction):
    """Run bounds, columns, radii and pair counts exactly, and the CSR kernel (row pointers, columns,
    values) bit for bit. Catches a padding of the running count shifted by a row or a column (runs
    starting one packed row early), a wrong sample offset in the padded rows (runs read from the
    neighbouring sample: 5 samples of different counts), and a cached table for another grid or σ."""
    kept = torch.cat([random_masks(5, grid, fraction, seed=int(sigma * 10) + grid[1]), one_and_all(grid)])
    got = window_ranges(kept, grid, sigma)
    start, count, col, radius, pairs = previous_window_ranges(kept, grid, sigma)
    assert torch.equal(got.start, start) and torch.equal(got.count, count) and torch.equal(got.col, col)
    assert got.radius == radius and got.pairs == pairs
    K = pair_kernel(got, sigma)
    table = previous_weight_table(grid, sigma).reshape(-1)
    rows = torch.repeat_interleave(torch.arange(K.shape[0]), K.crow_indices().diff())
    # the previous values: table[(Δr + R)·(2W − 1) + c_j − c_t + W − 1] for every stored pair (t, j)
    W = grid[1]
    cells = kept.reshape(-1).nonzero().squeeze(1)
    r_of, c_of = cells % (grid[0] * W) // W, cells % W
    j = K.col_indices()
    want = table[(r_of[j] - r_of[rows] + radius[0]) * (2 * W - 1) + c_of[j] - c_of[rows] + W - 1]
    assert torch.equal(K.values(), want)
    assert int(K.crow_indices()[-1]) == pairs


@pytest.mark.parametrize("n, sigma", [(1, 1.0), (5, 1.0), (32, 1.0), (32, 0.5), (9, 2.0), (64, 2.0), (64, 1.7)])
def test_cached_radius_and_weights_are_the_uncached_values(n, sigma):
    assert axis_radius(n, sigma) == int((axis_kernel(n, sigma) > 0).sum()) - 1
    assert torch.equal(window_weights((n, n), sigma, axis_radius(n, sigma), torch.device("cpu")), previous_weight_table((n, n), sigma).reshape(-1))


def test_weights_first_built_in_inference_mode_serve_training():
    """The cache's first call may come from sampling (inference mode); a training step after it must be
    able to use the same cached table (an inference tensor could not take part in autograd)."""
    window_weights.cache_clear()
    kept = random_masks(2, (7, 5), 0.5, seed=1)
    z = torch.randn(int(kept.sum()), 4)
    dc = DeChunk(1.3, packed_form="pairs")
    from dcdit.models.chunking import RoutingRecord
    p = torch.rand(2, 35)
    rec = RoutingRecord(p, kept, kept, torch.zeros(2, 1, dtype=torch.long), kept.sum(1), (7, 5))
    with torch.inference_mode():
        ref = dc(z, rec)
    assert not window_weights((7, 5), 1.3, axis_radius(7, 1.3), torch.device("cpu")).is_inference()
    zz = z.clone().requires_grad_(True)
    out = dc(zz, rec)
    out.sum().backward()
    assert torch.equal(out.detach(), ref) and zz.grad is not None
