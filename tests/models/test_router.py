"""Routers (paper §3.3; the release's predictability router) against closed forms and brute-force loops.

Cosine router reference: q = W_Q h, k = W_K h, ℓ2-normalised per token; k̄_i[c] = Σ_taps w[c, tap] ·
k[clamp(neighbour)][c] (the 3×3 depthwise kernel over the replicate-padded grid — the documented
border choice); p_i = (1 − q_i·k̄_i)/2; hard mask p > 0.5, or the argmax token when nothing passes.
"""

from __future__ import annotations

import math

import pytest
import torch

from dcdit.models.router import (
    CosineRouter,
    PredictabilityRouter,
    RandomRouter,
    build_router,
    hard_boundaries,
    to_grid,
    unit_rows,
)


def brute_force_hard_mask(p: torch.Tensor) -> torch.Tensor:
    B, L = p.shape
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        vals = [float(v) for v in p[b]]
        for j, v in enumerate(vals):
            mask[b, j] = v > 0.5
        if not any(v > 0.5 for v in vals):
            mask[b, max(range(L), key=lambda j: (vals[j], -j))] = True  # first maximum
    return mask


def brute_force_cosine_p(h, grid, Wq, Wk, kernel):
    """h (B, L, D); Wq, Wk (D, D); kernel (D, 3, 3). Python loops, float64."""
    H, W = grid
    h = h.double()
    B, L, D = h.shape
    q = h @ Wq.double().T
    k = h @ Wk.double().T
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    p = torch.empty(B, L, dtype=torch.float64)
    for b in range(B):
        for r in range(H):
            for c in range(W):
                kbar = torch.zeros(D, dtype=torch.float64)
                for a in range(3):
                    for e in range(3):
                        rr = min(max(r + a - 1, 0), H - 1)
                        cc = min(max(c + e - 1, 0), W - 1)
                        kbar += kernel[:, a, e].double() * k[b, rr * W + cc]
                s = float((q[b, r * W + c] * kbar).sum())
                p[b, r * W + c] = (1 - s) / 2
    return p


def test_hard_boundaries_closed_cases():
    p = torch.tensor([[0.1, 0.7, 0.6, 0.5], [0.2, 0.45, 0.3, 0.45], [0.5, 0.5, 0.5, 0.5]])
    got = hard_boundaries(p)
    assert got.tolist() == [[False, True, True, False], [False, True, False, False], [True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    p = torch.rand(16, 30, generator=g) * torch.rand(16, 1, generator=g)  # some rows never pass 0.5
    assert torch.equal(hard_boundaries(p), brute_force_hard_mask(p))


def test_cosine_router_init_is_identity_and_uniform_average():
    r = CosineRouter(16)
    assert torch.equal(r.q_proj.weight, torch.eye(16))
    assert torch.equal(r.k_proj.weight, torch.eye(16))
    assert r.k_neighbourhood.weight.shape == (16, 1, 3, 3)
    assert torch.equal(r.k_neighbourhood.weight, torch.full((16, 1, 3, 3), 1.0 / 9.0))
    assert r.k_neighbourhood.bias is None and r.q_proj.bias is None and r.k_proj.bias is None


@pytest.mark.parametrize("randomise", [False, True])
@pytest.mark.parametrize("grid", [(4, 4), (5, 7)])
def test_cosine_router_constant_input_gives_uniform_p(grid, randomise):
    """All tokens equal → every token (borders included) sees the same neighbourhood → same p.
    At init q = k, so s = 1 and p = 0 everywhere (closed form)."""
    torch.manual_seed(0)
    D = 12
    r = CosineRouter(D)
    if randomise:
        with torch.no_grad():
            for prm in r.parameters():
                prm.copy_(torch.randn_like(prm))
    L = grid[0] * grid[1]
    h = torch.randn(3, 1, D).expand(3, L, D).contiguous()
    with torch.no_grad():
        p, mask = r(h, grid)
    assert p.shape == (3, L) and p.dtype == torch.float32
    assert float((p - p[:, :1]).abs().max()) < 1e-6
    if not randomise:
        assert float(p.abs().max()) < 1e-6
    assert torch.equal(mask, brute_force_hard_mask(p))


@pytest.mark.parametrize("randomise", [False, True])
@pytest.mark.parametrize("grid", [(4, 4), (5, 7)])
def test_cosine_router_matches_brute_force(grid, randomise):
    torch.manual_seed(1)
    D = 8
    r = CosineRouter(D)
    if randomise:
        with torch.no_grad():
            for prm in r.parameters():
                prm.copy_(torch.randn_like(prm))
    h = torch.randn(2, grid[0] * grid[1], D)
    with torch.no_grad():
        p, mask = r(h, grid)
    ref = brute_force_cosine_p(h, grid, r.q_proj.weight.detach(), r.k_proj.weight.detach(),
                               r.k_neighbourhood.weight.detach()[:, 0])
    torch.testing.assert_close(p.double(), ref.clamp(0, 1), atol=1e-5, rtol=0)
    assert bool(((p >= 0) & (p <= 1)).all())
    assert torch.equal(mask, brute_force_hard_mask(p))


def _rows_with_edge_cases(dtype):
    """Ordinary rows plus the ones F.normalize treats specially: an exact zero row, rows below and at
    its eps (1e-12, the norm is clamped), and a large one."""
    torch.manual_seed(4)
    x = torch.randn(3, 6, 5, dtype=dtype)
    x[0, 0] = 0
    x[0, 1] *= 1e-14
    x[1, 2] = torch.tensor([1e-12, 0, 0, 0, 0], dtype=dtype)
    x[2, 3] *= 1e6
    return x


def test_unit_rows_forward_is_f_normalize_bit_for_bit():
    """The cosine router's outputs (and every pinned output) must not move: same arithmetic exactly."""
    x = _rows_with_edge_cases(torch.float32)
    assert torch.equal(unit_rows(x), torch.nn.functional.normalize(x, dim=-1))
    h = torch.randn(4, 64, 96)
    assert torch.equal(unit_rows(h), torch.nn.functional.normalize(h, dim=-1))


def test_unit_rows_gradient_equals_autograd_of_f_normalize():
    """The closed-form backward against autograd through F.normalize (division, norm, clamp), in
    float64, including zero and clamped rows; and against finite differences on ordinary rows.
    Catches a missing projection term, a projection applied on clamped rows, a wrong divisor."""
    x = _rows_with_edge_cases(torch.float64)
    g = torch.randn_like(x)
    a = x.clone().requires_grad_()
    torch.nn.functional.normalize(a, dim=-1).backward(g)
    b = x.clone().requires_grad_()
    unit_rows(b).backward(g)
    # a row's gradient scales as 1 / max(‖x‖, eps) (1e12 on the clamped rows, where autograd's
    # cancellation leaves ~1e-4 of noise): compare in that unit
    scale = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(b.grad * scale, a.grad * scale, rtol=0, atol=1e-10)
    ordinary = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(unit_rows, (ordinary,))


def test_cosine_router_gradients_equal_the_autograd_formula():
    """The router's gradients (input and all three weights) equal autograd's through the plain
    formula with F.normalize: the custom backward changes nothing but rounding."""
    torch.manual_seed(2)
    D, grid = 8, (5, 6)
    r = CosineRouter(D)
    with torch.no_grad():
        for prm in r.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    h = torch.randn(3, 30, D, requires_grad=True)
    w = torch.randn(3, 30)

    def formula(h):
        F = torch.nn.functional
        q = F.normalize(F.linear(h, r.q_proj.weight), dim=-1)
        k = F.normalize(F.linear(h, r.k_proj.weight), dim=-1)
        k_bar = F.conv2d(F.pad(to_grid(k, grid), (1, 1, 1, 1), mode="replicate"), r.k_neighbourhood.weight, groups=D)
        return ((1 - (q * k_bar.flatten(2).transpose(1, 2)).sum(-1)) / 2).clamp(0, 1)

    params = [h, *r.parameters()]
    ref = torch.autograd.grad((formula(h) * w).sum(), params)
    got = torch.autograd.grad((r(h, grid)[0] * w).sum(), params)
    for name, a, b in zip(["h", "q_proj", "k_proj", "k_neighbourhood"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_cosine_router_extremes_stay_in_unit_interval():
    """W_K = −W_Q makes q·k̄ = −1 on constant inputs: p = 1 exactly at the top of the range."""
    D = 6
    r = CosineRouter(D)
    with torch.no_grad():
        r.k_proj.weight.mul_(-1)
    h = torch.randn(1, 1, D).expand(1, 20, D).contiguous()
    p, mask = r(h, (4, 5))
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p, torch.ones_like(p))
    assert bool(mask.all())


def test_predictability_router_forces_first_and_last_token():
    torch.manual_seed(0)
    D, grid = 32, (5, 6)
    r = PredictabilityRouter(D)
    h = torch.randn(2, 30, D, requires_grad=True)
    p, mask = r(h, grid)
    assert bool((p[:, 0] == 1).all()) and bool((p[:, -1] == 1).all())
    assert bool(mask[:, 0].all()) and bool(mask[:, -1].all())
    # zero gradient at the forced tokens
    (p[:, 0].sum() + p[:, -1].sum()).backward()
    assert bool((h.grad == 0).all())
    for prm in r.parameters():
        assert prm.grad is None or bool((prm.grad == 0).all())
    # ... while an interior token does carry gradient (the check above is not vacuous)
    h.grad = None
    p, _ = r(h, grid)
    p[:, 7].sum().backward()
    assert float(h.grad.abs().sum()) > 0


def test_predictability_router_initial_bias():
    r = PredictabilityRouter(32)
    last = r.score[-1]
    assert torch.equal(last.bias, torch.tensor([-1.1]))
    with torch.no_grad():
        last.weight.zero_()  # logit = bias: p = sigmoid(−1.1) ≈ 0.25 away from the forced tokens
    p, mask = r(torch.randn(2, 20, 32), (4, 5))
    expected = 1 / (1 + math.exp(1.1))
    torch.testing.assert_close(p[:, 1:-1], torch.full_like(p[:, 1:-1], expected))
    assert abs(expected - 0.25) < 0.01
    assert mask[:, 1:-1].sum() == 0


def test_predictability_router_centre_tap_has_no_effect():
    torch.manual_seed(0)
    D, grid = 32, (5, 5)
    r = PredictabilityRouter(D)
    h = torch.randn(2, 25, D)
    p1, _ = r(h, grid)
    with torch.no_grad():
        r.predict.weight[..., 1, 1] = torch.randn_like(r.predict.weight[..., 1, 1]) * 10
    p2, _ = r(h, grid)
    assert torch.equal(p1, p2)
    with torch.no_grad():  # an off-centre tap does change p (the prediction is live)
        r.predict.weight[..., 0, 1] += torch.randn_like(r.predict.weight[..., 0, 1])
    p3, _ = r(h, grid)
    assert float((p3 - p1).detach().abs().max()) > 1e-4


@pytest.mark.parametrize("N", [4.0, 16.0])
def test_random_router_rate(N):
    torch.manual_seed(0)
    r = RandomRouter(N)
    assert list(r.parameters()) == []
    B, L = 64, 1024
    p, mask = r(torch.randn(B, L, 8), (32, 32))
    assert bool(((p >= 0) & (p <= 1)).all())
    rate = float(mask.float().mean())
    std = math.sqrt((1 / N) * (1 - 1 / N) / (B * L))
    assert abs(rate - 1 / N) < 6 * std + 1 / L  # + the forced argmax of an empty sample
    # p and the mask agree: a boundary is p > 1 − 1/N
    torch.testing.assert_close(mask.float().mean(), (p > 1 - 1 / N).float().mean(), atol=1 / L, rtol=0)


@pytest.mark.parametrize("kind", ["cosine", "predictability", "random"])
def test_routers_fp32_under_bf16_autocast(kind):
    torch.manual_seed(0)
    D, grid = 32, (6, 5)
    r = build_router(kind, D, 4.0)
    h = torch.randn(2, 30, D).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p, mask = r(h, grid)
    assert p.dtype == torch.float32 and mask.dtype == torch.bool
    assert bool(torch.isfinite(p).all())
    if kind != "random":  # deterministic: equal to the float32 computation on the same input
        p_ref, _ = r(h.float(), grid)
        torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=1e-6)


def test_unknown_router_raises():
    with pytest.raises(ValueError, match="bogus"):
        build_router("bogus", 16, 4.0)
