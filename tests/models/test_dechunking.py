"""De-chunking (paper §3.4) against a brute-force loop of the paper's formula, in all three forms: the
direct one (padded execution: (M, M) weights, (L, M) distances), the grid one (packed execution:
separable blur on the grid) and the window-pairs one (packed execution: sparse (T, T) kernel over the
kept neighbours in the truncated window), both packed forms with the two-pass nearest-neighbour
plug-back, and the forms against each other.

Reference: for every sample, over its REAL kept tokens only (p clamped to [1e-4, 1 − 1e-4]),
    W_ij = exp(−d²_ij / 2σ²) · p_j,  h̃_i = Σ_j W_ij h_j / Σ_j W_ij,  out_i = p_i h_i + (1 − p_i) h̃_i,
then every grid position takes `out` of its nearest kept token (Euclidean, ties → lowest grid index).
The records are built by hand here (kept tokens first in raster order, then arbitrary padding), so
the reference does not depend on the chunking helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from dcdit.models.chunking import RoutingRecord
from dcdit.models.dechunking import (
    DeChunk,
    gaussian_factor,
    nearest_kept_cell,
    nearest_kept_slot,
    pair_kernel,
    prefer_pairs,
    window_ranges,
)

FORMS = ["direct", "grid", "pairs"]


def dechunk(form: str, sigma: float, z: torch.Tensor, rec: RoutingRecord, eps: float = 0.0) -> torch.Tensor:
    """DeChunk on padded slots z (B, M, D) (direct form) or on their real tokens packed (T, D) (the
    grid or window-pairs form, forced)."""
    if form == "direct":
        return DeChunk(sigma, eps)(z, rec)
    return DeChunk(sigma, eps, packed_form=form)(z[rec.slot_mask], rec)


def make_record(p: torch.Tensor, kept: list[list[int]], padding: list[list[int]], grid) -> RoutingRecord:
    """Hand-built record: slots = sorted kept tokens, then the given padding tokens, up to M = max count."""
    B, L = p.shape
    M = max(len(k) for k in kept)
    rows, mask = [], torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        ks = sorted(kept[b])
        pad = [j for j in padding[b] if j not in ks][: M - len(ks)]
        assert len(ks) + len(pad) == M, "test setup: not enough padding tokens"
        rows.append(ks + pad)
        mask[b, ks] = True
    kept_idx = torch.tensor(rows, dtype=torch.long)
    kept_count = torch.tensor([len(k) for k in kept], dtype=torch.long)
    return RoutingRecord(p, mask, mask.clone(), kept_idx, kept_count, tuple(grid))


def brute_force_dechunk(z, p, kept, grid, sigma):
    """Loop form of paper §3.4 + plug-back. z (B, M, D) with the sample's kept tokens in the first slots
    in raster order; p (B, L). Works with autograd (float64 recommended). Returns (B, L, D)."""
    H, W = grid
    B = z.shape[0]
    result = []
    for b in range(B):
        ks = sorted(kept[b])
        pos = [(k // W, k % W) for k in ks]
        pc = [torch.clamp(p[b, k], 1e-4, 1 - 1e-4) for k in ks]
        outs = []
        for i in range(len(ks)):
            num = torch.zeros_like(z[b, 0])
            den = torch.zeros((), dtype=z.dtype)
            for j in range(len(ks)):
                d2 = (pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2
                w = math.exp(-d2 / (2 * sigma**2)) * pc[j]
                num = num + w * z[b, j]
                den = den + w
            h_tilde = num / den
            outs.append(pc[i] * z[b, i] + (1 - pc[i]) * h_tilde)
        full = []
        for r in range(H):
            for c in range(W):
                best, best_d2 = None, None
                for i, (kr, kc) in enumerate(pos):  # ks ascending: strict < keeps the lowest index on ties
                    d2 = (r - kr) ** 2 + (c - kc) ** 2
                    if best_d2 is None or d2 < best_d2:
                        best, best_d2 = i, d2
                full.append(outs[best])
        result.append(torch.stack(full))
    return torch.stack(result)


def brute_force_nearest(kept: list[int], grid) -> list[int]:
    """For every grid position, the grid index of the nearest kept token (ties → lowest index)."""
    H, W = grid
    out = []
    for r in range(H):
        for c in range(W):
            cands = [((r - k // W) ** 2 + (c - k % W) ** 2, k) for k in kept]
            out.append(min(cands)[1])  # tuple order: distance, then grid index
    return out


def random_case(grid, counts, seed, D=4):
    g = torch.Generator().manual_seed(seed)
    H, W = grid
    L = H * W
    p = torch.rand(len(counts), L, generator=g)
    kept, padding = [], []
    for n in counts:
        perm = torch.randperm(L, generator=g).tolist()
        kept.append(sorted(perm[:n]))
        padding.append(perm[n:])
    # exercise the clamp: some kept tokens with p exactly 0 or 1
    p[0, kept[0][0]] = 0.0
    p[0, kept[0][-1]] = 1.0
    rec = make_record(p, kept, padding, grid)
    z = torch.randn(len(counts), rec.kept_idx.shape[1], D, generator=g)
    z = torch.where(rec.slot_mask[..., None], z, torch.full_like(z, 1e3))  # loud padding values
    return rec, z, kept


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("grid", [(6, 6), (5, 7), (7, 5)])
@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_dechunk_matches_brute_force(grid, sigma, form):
    rec, z, kept = random_case(grid, counts=[11, 4, 1], seed=grid[0] * 10 + grid[1] + int(sigma))
    got = dechunk(form, sigma, z, rec)
    ref = brute_force_dechunk(z.double(), rec.p.double(), kept, grid, sigma)
    assert got.shape == (3, grid[0] * grid[1], z.shape[-1])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_dechunk_matches_brute_force_where_far_weights_underflow(form):
    """A 32×32 grid (MNIST's): distances up to √1922, so most Gaussian weights are below exp(−60)
    (per axis exp(−30) in the grid form) and are set to 0 rather than computed as denormals; the
    result must still be the formula's."""
    rec, z, kept = random_case((32, 32), counts=[40, 3], seed=7)
    got = dechunk(form, 1.0, z, rec)
    torch.testing.assert_close(got.double(), brute_force_dechunk(z.double(), rec.p.double(), kept, (32, 32), 1.0),
                               atol=1e-5, rtol=1e-5)


def test_padding_slots_are_not_sources():
    grid = (5, 7)
    rec, z, kept = random_case(grid, counts=[9, 3], seed=3)
    out1 = DeChunk(1.0)(z, rec)
    z2 = torch.where(rec.slot_mask[..., None], z, -7.0 * torch.ones_like(z))
    p2 = rec.p.clone()
    pad = rec.kept_idx[1, rec.kept_count[1]:]
    p2[1, pad] = 1.0 - p2[1, pad]  # the padding tokens' p must not matter either
    rec2 = RoutingRecord(p2, rec.natural_mask, rec.kept_mask, rec.kept_idx, rec.kept_count, grid)
    out2 = DeChunk(1.0)(z2, rec2)
    assert torch.equal(out1, out2)


@pytest.mark.parametrize(
    "grid, kept, expect",
    [
        # kept (0,0) and (0,2): (0,1) is equidistant -> (0,0)
        ((3, 3), [0, 2], {1: 0, 0: 0, 2: 2, 4: 0, 5: 2}),
        # kept (0,0) and (2,2): the centre is equidistant -> (0,0)
        ((3, 3), [0, 8], {4: 0, 2: 0, 6: 0, 5: 8, 7: 8}),
        # kept (0,2) and (2,0): the centre is equidistant -> (0,2) (index 2 < 6)
        ((3, 3), [2, 6], {4: 2, 0: 2, 8: 2}),
        # kept (0,1) and (1,0) on a 5x7 grid: (0,0) and (1,1) tie -> (0,1)
        ((5, 7), [1, 7], {0: 1, 8: 1}),
    ],
)
def test_plug_back_ties_go_to_lowest_grid_index(grid, kept, expect):
    L = grid[0] * grid[1]
    p = torch.full((1, L), 0.3)
    rec = make_record(p, [kept], [list(range(L))], grid)
    slot = nearest_kept_slot(rec)[0]
    got = rec.kept_idx[0, slot].tolist()
    assert got == brute_force_nearest(kept, grid)
    for pos, k in expect.items():
        assert got[pos] == k
    assert nearest_kept_cell(rec.kept_mask, grid)[0].tolist() == got  # the grid form's search agrees exactly
    # and the de-chunked output at each position is the one of that kept token
    z = torch.arange(len(kept), dtype=torch.float32)[None, :, None].expand(1, len(kept), 2) * 10
    ref = brute_force_dechunk(z.double(), p.double(), [kept], grid, 1.0)
    for form in FORMS:
        torch.testing.assert_close(dechunk(form, 1.0, z.contiguous(), rec).double(), ref)


@pytest.mark.parametrize("grid", [(5, 7), (6, 6)])
def test_plug_back_random_matches_brute_force_nearest(grid):
    rec, _, kept = random_case(grid, counts=[8, 2, 5, 1], seed=11)
    slots = nearest_kept_slot(rec)
    cells = nearest_kept_cell(rec.kept_mask, grid)
    for b in range(len(kept)):
        assert rec.kept_idx[b, slots[b]].tolist() == brute_force_nearest(kept[b], grid)
        assert bool((slots[b] < rec.kept_count[b]).all())  # never a padding slot
        assert cells[b].tolist() == brute_force_nearest(kept[b], grid)


@pytest.mark.parametrize("form", FORMS)
def test_dechunk_gradients_match_brute_force(form):
    """d out / d p (the smoothing path of the router gradient) and d out / d z against autograd
    through the loop reference in float64."""
    grid = (5, 6)
    rec, z, kept = random_case(grid, counts=[7, 3], seed=5)
    p = rec.p.clamp(0.05, 0.95)  # interior values: the clamp has no effect on the gradient
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(2, 30, z.shape[-1], generator=g)

    p1 = p.clone().requires_grad_(True)
    z1 = z.clone().requires_grad_(True)
    rec1 = RoutingRecord(p1, rec.natural_mask, rec.kept_mask, rec.kept_idx, rec.kept_count, grid)
    (dechunk(form, 1.5, z1, rec1) * weight).sum().backward()

    p2 = p.double().requires_grad_(True)
    z2 = z.double().requires_grad_(True)
    (brute_force_dechunk(z2, p2, kept, grid, 1.5) * weight.double()).sum().backward()

    torch.testing.assert_close(p1.grad.double(), p2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z1.grad.double(), z2.grad, atol=1e-5, rtol=1e-4)
    # only the real kept tokens' p can carry gradient (padding slots are not sources, and
    # padding outputs are never plugged back)
    assert bool((p1.grad[~rec.kept_mask] == 0).all())
    assert bool((p1.grad[rec.kept_mask] != 0).any())


def test_dechunk_far_padding_gives_finite_values_and_gradients():
    """A padding slot far (> ~14 cells at σ = 1) from every real kept token of its sample: all its
    smoothing weights underflow to 0, and 0/0 must not leak NaN into the real outputs or into the
    gradient (it would poison the whole batch's parameter gradients). This happens in training at
    32×32 when one sample keeps few tokens and its padding lies far away."""
    grid = (20, 20)
    L = 400
    p = torch.full((2, L), 0.2)
    p[0, L - 1] = 0.45  # sample 0: only (0,0) kept; its highest-p padding is the far corner
    kept = [[0], list(range(0, L, 7))]
    rec = make_record(p, kept, [[L - 1, L - 2, L - 3] + list(range(1, L)), list(range(L))], grid)
    assert rec.kept_idx[0, 1].item() == L - 1
    z = torch.randn(2, rec.kept_idx.shape[1], 3, requires_grad=True)
    p_leaf = rec.p.clone().requires_grad_(True)
    rec = RoutingRecord(p_leaf, rec.natural_mask, rec.kept_mask, rec.kept_idx, rec.kept_count, grid)
    out = DeChunk(1.0)(z, rec)
    assert bool(torch.isfinite(out).all())
    # sample 0 has one real token: out = p z + (1 − p) z = z everywhere
    torch.testing.assert_close(out[0], z[0, 0].detach().expand(L, 3))
    out.sum().backward()
    assert bool(torch.isfinite(z.grad).all()), "NaN/inf gradient from an all-underflow padding row"
    assert bool(torch.isfinite(p_leaf.grad).all())


@pytest.mark.parametrize("form", FORMS)
def test_dechunk_runs_in_fp32_under_autocast(form):
    grid = (5, 7)
    rec, z, _ = random_case(grid, counts=[6, 2], seed=2)
    ref = dechunk(form, 1.0, z.bfloat16().float(), rec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dechunk(form, 1.0, z.bfloat16(), rec)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------- grid form vs direct form


def brute_force_nearest_table(kept_mask: torch.Tensor, grid) -> torch.Tensor:
    """(B, L) nearest kept cell from the full (B, L, L) table of squared distances, ties to the lowest
    index (the key d²·L + index), vectorised: an independent check of the two-pass search on big grids."""
    H, W = grid
    L = H * W
    idx = torch.arange(L)
    d2 = (idx[:, None] // W - idx[None] // W) ** 2 + (idx[:, None] % W - idx[None] % W) ** 2  # (L, L)
    key = torch.where(kept_mask[:, None, :], d2[None] * L + idx, torch.iinfo(torch.long).max)
    return key.argmin(-1)


def lattice_mask(B, grid, seed):
    """Kept cells on sparse lattices and random points: many cells equidistant from 2 or 4 kept cells."""
    g = torch.Generator().manual_seed(seed)
    H, W = grid
    masks = []
    for b in range(B):
        step = 2 + b % 3
        m = torch.zeros(H, W, dtype=torch.bool)
        m[b % step::step, (b // 2) % step::step] = True
        m |= torch.rand(H, W, generator=g) < 0.01 * b
        masks.append(m.flatten())
    return torch.stack(masks)


@pytest.mark.parametrize("grid", [(16, 16), (13, 21), (64, 64)])
def test_nearest_kept_cell_ties_exact_on_lattices(grid):
    """Lattice spacings 2–4 put half of the grid on ties; one kept cell per sample is the extreme
    (every column but one is empty). Catches a tie broken by column before row, an empty column
    winning, and a wrong vertical candidate."""
    kept = lattice_mask(6, grid, seed=0)
    single = torch.zeros(1, grid[0] * grid[1], dtype=torch.bool)
    single[0, grid[0] * grid[1] // 2 + 1] = True
    kept = torch.cat([kept, single])
    assert torch.equal(nearest_kept_cell(kept, grid), brute_force_nearest_table(kept, grid))


def random_record(B, grid, M, seed, p_low=0.0):
    g = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1]
    kept = torch.stack([torch.randperm(L, generator=g)[:M].sort().values for _ in range(B)])  # (B, M)
    mask = torch.zeros(B, L, dtype=torch.bool).scatter_(1, kept, True)
    p = p_low + (1 - p_low) * torch.rand(B, L, generator=g)
    return RoutingRecord(p, mask, mask.clone(), kept, torch.full((B,), M), tuple(grid))


@pytest.mark.parametrize("grid, M, sigma", [((32, 32), 256, 1.0), ((32, 32), 12, 1.0), ((64, 64), 1024, 2.0),
                                            ((64, 64), 40, 2.0), ((24, 40), 300, 1.5)])
def test_packed_forms_equal_direct_form(grid, M, sigma):
    """The grid and window-pairs forms against the direct form: within 1e-6 of the output's scale (elementwise
    relative error is meaningless where an output crosses 0), the same plug-back cell everywhere
    (ties exact), and the same gradients. σ = 2 on a 64×64 grid is the 512 px setting."""
    rec = random_record(2, grid, M, seed=M)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, M, 16, generator=g)
    direct = DeChunk(sigma)(z, rec)
    for form in ("grid", "pairs"):
        packed = DeChunk(sigma, packed_form=form)(z.reshape(-1, 16), rec)  # every sample keeps M: all slots real
        assert bool(torch.isfinite(packed).all())
        assert (packed - direct).abs().max() <= 1e-6 * direct.abs().max(), form
    cells = rec.kept_idx.gather(1, nearest_kept_slot(rec))
    assert torch.equal(nearest_kept_cell(rec.kept_mask, grid), cells)
    weight = torch.randn(direct.shape, generator=g)
    grads = []
    for form in FORMS:  # direct first: the reference
        zz, pp = z.clone().requires_grad_(True), rec.p.clone().requires_grad_(True)
        r = RoutingRecord(pp, rec.natural_mask, rec.kept_mask, rec.kept_idx, rec.kept_count, rec.grid)
        (dechunk(form, sigma, zz, r) * weight).sum().backward()
        grads.append((zz.grad, pp.grad))
    for packed_grads in grads[1:]:
        for a, b in zip(packed_grads, grads[0]):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_gaussian_factor_is_the_truncated_kernel():
    """G[a, b] = exp(−(a − b)²/2σ²) exactly where (a − b)²/2σ² ≤ 30, else 0 (σ = 1: |a − b| ≤ 7)."""
    G = gaussian_factor(12, 1.0)
    for a in range(12):
        for b in range(12):
            want = math.exp(-((a - b) ** 2) / 2) if (a - b) ** 2 / 2 <= 30 else 0.0
            assert G[a, b].item() == pytest.approx(want, rel=1e-6, abs=0)
    assert G[0, 7] > 0 and G[0, 8] == 0


@pytest.mark.parametrize("form", ["grid", "pairs"])
def test_packed_forms_add_dechunk_eps_like_the_direct_form(form):
    """``dechunk_eps`` (the release's 1e-8) enters every form's weight sums: a large eps makes the
    difference visible, so a packed form that ignored it would fail."""
    rec = random_record(2, (6, 7), 9, seed=3)
    z = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(2))
    direct = DeChunk(1.0, eps=0.5)(z, rec)
    packed = DeChunk(1.0, eps=0.5, packed_form=form)(z.reshape(-1, 4), rec)
    torch.testing.assert_close(packed, direct, atol=1e-6, rtol=1e-6)
    assert (packed - DeChunk(1.0, packed_form=form)(z.reshape(-1, 4), rec)).abs().max() > 1e-3


# ------------------------------------------------------------------------------- window-pairs form


def brute_force_kernel(kept_mask: torch.Tensor, grid, sigma: float) -> torch.Tensor:
    """(T, T) dense: exp(−Δr²/2σ²)·exp(−Δc²/2σ²) for every pair of kept tokens of the same sample whose
    per-axis exponents are both ≤ 30 (the grid form's cut), 0 otherwise; packed order, by loops."""
    _, W = grid
    B, L = kept_mask.shape
    toks = [(b, l // W, l % W) for b in range(B) for l in range(L) if kept_mask[b, l]]
    K = torch.zeros(len(toks), len(toks), dtype=torch.float64)
    for i, (bi, ri, ci) in enumerate(toks):
        for j, (bj, rj, cj) in enumerate(toks):
            er, ec = (ri - rj) ** 2 / (2 * sigma**2), (ci - cj) ** 2 / (2 * sigma**2)
            if bi == bj and er <= 30 and ec <= 30:
                K[i, j] = math.exp(-er) * math.exp(-ec)
    return K


@pytest.mark.parametrize("grid, counts, sigma", [((5, 7), [1, 9, 35], 1.0), ((9, 4), [36, 2, 20], 2.0),
                                                 ((20, 17), [150, 1, 40], 1.0), ((20, 17), [340, 60], 1.5)])
def test_pair_kernel_is_the_truncated_gaussian_over_kept_pairs(grid, counts, sigma):
    """The sparse K against a loop over all kept pairs. Catches a run that crosses a sample or a row
    boundary, a window clipped wrongly at the grid edge (σ = 2 on 9×4: the window is larger than the
    grid), an off-by-one radius (20×17 at σ = 1: |Δ| = 7 in, 8 out) and unsorted or shifted columns."""
    rec, _, _ = random_case(grid, counts, seed=sum(counts))
    ranges = window_ranges(rec.kept_mask, grid, sigma)
    K = pair_kernel(ranges, sigma)
    want = brute_force_kernel(rec.kept_mask, grid, sigma)
    assert ranges.pairs == int((want > 0).sum())
    # float32 exponents up to 60: exp(−e) carries the rounding of e, ~2e-6 relative at e ≈ 30 + 30
    torch.testing.assert_close(K.to_dense().double(), want, rtol=1e-5, atol=0)
    cols, crow = K.col_indices(), K.crow_indices()
    for i in range(K.shape[0]):  # sorted columns within every row (CSR's canonical form)
        assert bool((cols[crow[i]:crow[i + 1]].diff() > 0).all())


@pytest.mark.parametrize("grid, counts", [((6, 6), [1, 36, 12]), ((5, 9), [45, 1]), ((12, 12), [1, 2, 144, 70])])
@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_pairs_form_matches_brute_force_from_one_to_all_tokens(grid, counts, sigma):
    """Kept counts from 1 token to the whole grid in one batch: the window-pairs form against the loop
    formula. A sample with 1 token must give its token everywhere; a full sample exercises every
    window run."""
    rec, z, kept = random_case(grid, counts, seed=len(counts) * 7 + grid[1])
    got = dechunk("pairs", sigma, z, rec)
    torch.testing.assert_close(got.double(), brute_force_dechunk(z.double(), rec.p.double(), kept, grid, sigma),
                               atol=1e-5, rtol=1e-5)


def test_pairs_form_gradcheck_float64():
    """torch.autograd.gradcheck of the window-pairs smoothing + plug-back w.r.t. z and p in float64
    (finite differences): catches a wrong backward of the symmetric kernel product (K @ grad must equal
    Kᵀ @ grad), a missing denominator gradient to p, or a gradient that leaks into K."""
    grid, counts = (5, 4), [6, 1, 20]
    rec, _, _ = random_case(grid, counts, seed=4)
    T = sum(counts)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(T, 3, dtype=torch.float64, generator=g, requires_grad=True)
    p = (0.05 + 0.9 * torch.rand(len(counts), 20, dtype=torch.float64, generator=g)).requires_grad_(True)
    dc = DeChunk(1.5, eps=1e-3, packed_form="pairs")

    def f(z, p):
        r = RoutingRecord(p, rec.natural_mask, rec.kept_mask, rec.kept_idx, rec.kept_count, grid)
        return dc.plug_back(dc.smooth_pairs(z, r), r)

    assert torch.autograd.gradcheck(f, (z, p), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_pairs_form_gradients_equal_direct_form_with_uneven_counts():
    """A realistic batch whose kept counts differ widely (1 token, 20%, 90% of a 32×32 grid), D = 64:
    outputs and the gradients w.r.t. z and p of the window-pairs form against the direct form's
    (padded slots), within 1e-6 / 1e-5 of their scales."""
    grid = (32, 32)
    rec, z, _ = random_case(grid, counts=[1, 205, 922], seed=21, D=64)
    weight = torch.randn(3, 1024, 64, generator=torch.Generator().manual_seed(5))
    outs, grads = [], []
    for form in ("direct", "pairs"):
        zz, pp = z.clone().requires_grad_(True), rec.p.clone().requires_grad_(True)
        r = RoutingRecord(pp, rec.natural_mask, rec.kept_mask, rec.kept_idx, rec.kept_count, grid)
        out = dechunk(form, 1.0, zz, r)
        (out * weight).sum().backward()
        outs.append(out.detach())
        grads.append((zz.grad[rec.slot_mask], pp.grad))
    assert (outs[1] - outs[0]).abs().max() <= 1e-6 * outs[0].abs().max()
    for a, b in zip(grads[1], grads[0]):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("grid, M, sigma, D, expect_pairs", [((32, 32), 40, 1.0, 160, True), ((32, 32), 1024, 2.0, 160, False),
                                                                ((8, 8), 4, 1.0, 8, False)])
def test_auto_form_choice_is_numerically_irrelevant(grid, M, sigma, D, expect_pairs):
    """The per-batch rule picks window pairs for a sparse record, the grid blur when every cell is kept
    at σ = 2 (more pairs than grid MACs per channel) and on a tiny grid (below PAIRS_MIN_GRID_MACS);
    whichever it picks, the output and the z-gradient equal both forced forms within 1e-6 of their scale."""
    rec = random_record(2, grid, M, seed=M)
    pairs = window_ranges(rec.kept_mask, grid, sigma).pairs
    assert prefer_pairs(pairs, 2, grid, D) is expect_pairs
    z = torch.randn(2 * M, D, generator=torch.Generator().manual_seed(0))
    results = {}
    for form in ("auto", "grid", "pairs"):
        zz = z.clone().requires_grad_(True)
        out = DeChunk(sigma, packed_form=form)(zz, rec)
        out.square().sum().backward()
        results[form] = (out.detach(), zz.grad)
    for form in ("grid", "pairs"):
        for a, b in zip(results["auto"], results[form]):
            assert (a - b).abs().max() <= 1e-6 * b.abs().max(), form


@pytest.mark.parametrize("grid, counts, sigma", [((9, 4), [36, 2, 20], 2.0), ((20, 17), [150, 1, 40], 1.0)])
def test_pair_counts_are_each_samples_kernel_non_zeros(grid, counts, sigma):
    """The pairs a packed de-chunk records (RoutingRecord.dechunk_pairs, what dcdit.flops charges)
    against the loop kernel's non-zeros per sample block: catches counts summed over the batch,
    attributed to the wrong sample, or a different window."""
    rec, _, _ = random_case(grid, counts, seed=sum(counts) + 1)
    K = brute_force_kernel(rec.kept_mask, grid, sigma)
    bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
    want = [int((K[a:b, a:b] > 0).sum()) for a, b in zip(bounds, bounds[1:])]
    z = torch.randn(sum(counts), 8)
    DeChunk(sigma, packed_form="pairs")(z, rec)
    assert rec.dechunk_pairs.tolist() == want
    DeChunk(sigma, packed_form="grid")(z, rec)
    assert rec.dechunk_pairs is None


def test_dechunk_rejects_an_unknown_packed_form():
    with pytest.raises(ValueError, match="packed_form"):
        DeChunk(1.0, packed_form="sparse")
