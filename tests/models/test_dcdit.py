"""The full DC-DiT forward pass: STE and gradient paths, batch independence, shapes, Lite-CFG,
input validation.

References are independent of the implementation: the chain rule written out by hand for the STE
path, one-by-one runs for batch independence, exact ⌊f·n⌋ (``fractions.Fraction``) for tail
dropping, and the CFG formula uncond + s·(cond − uncond) from two separate forward passes.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import dcdit.models.dcdit as dcdit_module
from dcdit.models.chunking import RoutingRecord
from dcdit.models.dcdit import straight_through


def exact_floor(f, n: int) -> int:
    return math.floor(Fraction(str(f)) * n)


class Capture:
    """Forward hooks: the router's p (retain_grad), the de-chunked tokens, the decoder input."""

    def __init__(self, model):
        self.data = {}
        self.handles = [
            model.router.register_forward_hook(self._router),
            model.dechunk.register_forward_hook(self._dechunk),
            model.decoder.register_forward_pre_hook(self._decoder),
        ]

    def _router(self, mod, args, out):
        self.data["p"] = out[0]

    def _dechunk(self, mod, args, out):
        self.data["dechunked"] = out.detach()

    def _decoder(self, mod, args):
        args[0].retain_grad()
        self.data["dec_in"] = args[0]

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- straight-through estimator


def test_straight_through_is_exactly_one_and_passes_gradient():
    x = torch.cat([torch.rand(100), torch.tensor([0.0, 1.0, 1e-30, 0.999999, 123.456])]).requires_grad_(True)
    y = straight_through(x)
    assert torch.equal(y, torch.ones_like(y))
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, g)


# ---------------------------------------------------------------- gradient paths to the router


def _router_grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.router.named_parameters()}


def _run(model, x, t, y, w, fraction):
    model.zero_grad(set_to_none=True)
    cap = Capture(model)
    out, rec = model(x, t, y, fraction)
    rec.p.retain_grad()
    (out * w).sum().backward()
    cap.remove()
    return out.detach(), rec, cap.data, _router_grads(model)


def test_router_gradient_flows_only_through_ste_and_dechunk_smoothing(random_dcdit, helpers, monkeypatch):
    """The hard mask, tail dropping and the gather of kept indices are discrete: the diffusion loss
    reaches p (and the router's parameters) only through
      (a) the STE gate  x = dechunked · STE(selected_p) + r, selected_p = p (natural boundary) or 1 − p,
      (b) the de-chunk smoothing weights W_ij ∝ exp(−d²/2σ²) p_j and the mix p_i h_i + (1 − p_i) h̃_i.
    Run 1: the model as is. Run 2: STE replaced by a constant 1 (same forward value, no gradient).
    Run 3: STE constant and de-chunk fed a detached p. Then
      * run 2's p-gradient is zero at every non-kept token (incl. tail-dropped boundaries), nonzero at kept;
      * run 1 − run 2 equals the STE path by the chain rule: ±Σ_D (∂loss/∂x_l) · dechunked_l,
        with + at natural boundaries (the decision BEFORE tail dropping) and − elsewhere;
      * run 3 gives the router's parameters no gradient at all: there is no third path.
    """
    model = random_dcdit
    x, t, y = helpers.tiny_inputs(4)
    w = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    f = torch.tensor([0.0, 0.3, 0.5, 0.3], dtype=torch.float64)

    out1, rec1, cap1, g1 = _run(model, x, t, y, w, f)
    assert bool((rec1.natural_mask & ~rec1.kept_mask).any()), "test setup: want tail-dropped boundaries"
    assert bool((~rec1.natural_mask).any())
    for name in ("q_proj.weight", "k_proj.weight", "k_neighbourhood.weight"):
        assert g1[name] is not None and float(g1[name].abs().max()) > 0, name

    monkeypatch.setattr(dcdit_module, "straight_through", lambda s: torch.ones_like(s).detach())
    out2, rec2, cap2, g2 = _run(model, x, t, y, w, f)
    assert torch.equal(out1, out2)  # the STE is exactly 1 in the forward pass
    gp2 = rec2.p.grad
    assert bool((gp2[~rec2.kept_mask] == 0).all()), "gradient reached p at a non-kept token without the STE"
    assert float(gp2[rec2.kept_mask].abs().max()) > 0
    for name in ("q_proj.weight", "k_proj.weight", "k_neighbourhood.weight"):
        assert g2[name] is not None and float(g2[name].abs().max()) > 0, name  # smoothing path alone
        assert not torch.allclose(g1[name], g2[name])  # the STE path contributes

    # chain rule for the STE path, from the decoder input's gradient and the de-chunked tokens
    B, L = rec1.p.shape
    dx = cap1["dec_in"].grad.flatten(2).transpose(1, 2)  # (B, L, D)
    ste_path = (dx * cap1["dechunked"]).sum(-1)
    sign = torch.where(rec1.natural_mask, 1.0, -1.0)
    expected = gp2 + sign * ste_path
    scale = float(rec1.p.grad.abs().max())
    torch.testing.assert_close(rec1.p.grad, expected, atol=1e-5 * scale, rtol=1e-4)

    # no third path: detach p on its way into the de-chunk as well
    real_forward = type(model.dechunk).forward

    def detached_forward(self, z, record):
        r = RoutingRecord(record.p.detach(), record.natural_mask, record.kept_mask, record.kept_idx,
                          record.kept_count, record.grid)
        return real_forward(self, z, r)

    monkeypatch.setattr(type(model.dechunk), "forward", detached_forward)
    _, rec3, _, g3 = _run(model, x, t, y, w, f)
    assert rec3.p.grad is None or bool((rec3.p.grad == 0).all())
    for name, g in g3.items():
        assert g is None or bool((g == 0).all()), name


def test_encoder_gets_gradient_through_residual_and_inner_path(random_dcdit, helpers):
    model = random_dcdit
    x, t, y = helpers.tiny_inputs(2)
    out, _ = model(x, t, y)
    out.square().sum().backward()
    for mod in (model.x_embedder, model.encoder, model.blocks, model.residual_proj, model.decoder):
        assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in mod.parameters())


def test_residual_sum_equals_its_formula_and_leaves_the_dechunked_tokens_alone(random_dcdit, helpers):
    """The decoder's input is dechunked · 1 + residual_proj(h) exactly (the fused in-place multiply-add
    of DCDiT.forward), and the de-chunked tokens a forward hook saw are not overwritten by it. Catches
    the sum written into the de-chunk's output (hooks and the release comparison read it) and a dropped
    bias or term. (The gate's gradient is checked by the STE chain-rule test above.)"""
    model = random_dcdit
    x, t, y = helpers.tiny_inputs(3, seed=2)
    seen = {}
    hooks = [model.encoder.register_forward_hook(lambda m, a, o: seen.update(h=o.clone())),
             model.dechunk.register_forward_hook(lambda m, a, o: seen.update(z=o, z_copy=o.clone())),
             model.decoder.register_forward_pre_hook(lambda m, a: seen.update(dec_in=a[0].clone()))]
    with torch.no_grad():
        model(x, t, y, torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64))
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen["z"], seen["z_copy"])
    want = seen["z_copy"] + model.residual_proj(seen["h"])
    got = seen["dec_in"].flatten(2).transpose(1, 2)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- batch independence


@pytest.mark.parametrize("per_sample", [False, True])
def test_batch_independence(random_dcdit, helpers, per_sample):
    model = random_dcdit
    x, t, y = helpers.tiny_inputs(3, seed=5)
    x = x * torch.tensor([0.5, 1.0, 2.0])[:, None, None, None]  # different inputs, different counts
    fr = [0.0, 0.4, 0.7] if per_sample else [0.0, 0.0, 0.0]
    fraction = torch.tensor(fr, dtype=torch.float64) if per_sample else 0.0
    with torch.no_grad():
        out, rec = model(x, t, y, fraction)
        counts = rec.kept_count.tolist()
        assert len(set(counts)) == 3, f"test setup: kept counts should differ, got {counts}"
        assert bool((rec.kept_count < rec.kept_idx.shape[1]).any())  # padding is present
        for b in range(3):
            out_b, rec_b = model(x[b : b + 1], t[b : b + 1], y[b : b + 1], fr[b])
            torch.testing.assert_close(out[b : b + 1], out_b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rec.p[b : b + 1], rec_b.p, atol=1e-6, rtol=1e-6)
            assert torch.equal(rec.kept_mask[b : b + 1], rec_b.kept_mask)
            assert rec_b.kept_count.item() == counts[b]


# ---------------------------------------------------------------- forward: shapes, record


def _check_record(rec, B, grid, threshold=0.5):
    L = grid[0] * grid[1]
    assert rec.grid == tuple(grid)
    assert rec.p.shape == (B, L) and rec.p.dtype == torch.float32
    assert rec.natural_mask.shape == (B, L) and rec.natural_mask.dtype == torch.bool
    assert rec.kept_mask.shape == (B, L) and rec.kept_mask.dtype == torch.bool
    assert rec.kept_count.shape == (B,) and rec.kept_count.dtype == torch.long
    M = int(rec.kept_count.max())
    assert rec.kept_idx.shape == (B, M) and rec.kept_idx.dtype == torch.long
    assert not bool((rec.kept_mask & ~rec.natural_mask).any())
    assert rec.kept_count.tolist() == rec.kept_mask.sum(1).tolist()
    for b in range(B):
        k = int(rec.kept_count[b])
        assert rec.kept_idx[b, :k].tolist() == torch.nonzero(rec.kept_mask[b]).flatten().tolist()
        assert len(set(rec.kept_idx[b].tolist())) == M  # padding never repeats a token
    # natural mask: p > threshold (0.5; 1 − 1/N for the random router), or the argmax where nothing passes
    expect = rec.p > threshold
    for b in range(B):
        if not expect[b].any():
            expect[b, int(rec.p[b].argmax())] = True
    assert torch.equal(rec.natural_mask, expect)


@pytest.mark.parametrize("router", ["cosine", "predictability", "random"])
@pytest.mark.parametrize("grid", [(8, 8), (8, 12)])
def test_forward_shapes_and_record(helpers, grid, router):
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT, input_size=grid, router=router)).eval()
    x, t, y = helpers.tiny_inputs(3, grid=grid)
    out, rec = model(x, t, y)
    assert out.shape == (3, 2, *grid) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    threshold = 1 - 1 / 4.0 if router == "random" else 0.5
    _check_record(rec, 3, grid, threshold)
    _, rec = model(x, t, y, 0.5)
    _check_record(rec, 3, grid, threshold)
    n = rec.natural_mask.sum(1).tolist()
    assert rec.kept_count.tolist() == [k - min(exact_floor(0.5, k), k - 1) for k in n]


def test_forward_under_bf16_autocast(random_dcdit, helpers):
    x, t, y = helpers.tiny_inputs(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, rec = random_dcdit(x, t, y)
    assert bool(torch.isfinite(out.float()).all())
    assert rec.p.dtype == torch.float32


def test_zero_initialised_model_outputs_zero(tiny_dcdit, helpers):
    """DiT's adaLN-Zero / zero final layer: a fresh model predicts exactly 0."""
    x, t, y = helpers.tiny_inputs(2)
    out, _ = tiny_dcdit(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- Lite-CFG


def test_forward_with_cfg_lite_cfg(random_dcdit, helpers):
    model = random_dcdit
    n = 3
    x, t, y = helpers.tiny_inputs(n, seed=3)
    x2 = torch.cat([x, torch.randn_like(x)])  # the second half of x must be ignored
    t2 = torch.cat([t, t])
    y2 = torch.cat([y, torch.full_like(y, 10)])  # the null class for the unconditional half
    f_c, f_u = 0.2, 0.6
    scale = 2.5
    with torch.no_grad():
        guided, rec = model.forward_with_cfg(x2, t2, y2, scale, f_c, f_u)
        cond, rec_c = model(x, t, y, f_c)
        uncond, rec_u = model(x, t, torch.full_like(y, 10), f_u)
    c_half, u_half = rec.split(2)
    for half, f in ((c_half, f_c), (u_half, f_u)):
        nat = half.natural_mask.sum(1).tolist()
        assert half.kept_count.tolist() == [k - exact_floor(f, k) for k in nat]
    assert torch.equal(c_half.kept_mask, rec_c.kept_mask) and torch.equal(u_half.kept_mask, rec_u.kept_mask)
    C = 1
    eps = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])
    torch.testing.assert_close(guided[:n, :C], eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[n:, :C], eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:n, C:], cond[:, C:], atol=1e-5, rtol=1e-5)  # variance: own half
    torch.testing.assert_close(guided[n:, C:], uncond[:, C:], atol=1e-5, rtol=1e-5)
    # cfg_scale = 1: the guided ε is the conditional ε
    with torch.no_grad():
        guided1, _ = model.forward_with_cfg(x2, t2, y2, 1.0, f_c, f_u)
    torch.testing.assert_close(guided1[:n, :C], cond[:, :C], atol=1e-5, rtol=1e-5)


class FixedRouter(nn.Module):
    """Test stub: a fixed p with exactly ``n`` boundaries per sample."""

    def __init__(self, L: int, n: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.L, self.n, self.g = L, n, g

    def forward(self, h, grid):
        B = h.shape[0]
        p = torch.rand(B, self.L, generator=self.g) * 0.4
        for b in range(B):
            idx = torch.randperm(self.L, generator=self.g)[: self.n]
            p[b, idx] = 0.55 + 0.4 * torch.rand(self.n, generator=self.g)
        return p, p > 0.5


def test_forward_with_cfg_tail_drop_counts_are_exact(helpers):
    """Lite-CFG with the release's f_u = 0.9 on samples with 50 boundaries must drop ⌊0.9·50⌋ = 45.
    (forward_with_cfg builds its per-sample fractions as a tensor; its dtype must not change ⌊f·n⌋.)"""
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    model.router = FixedRouter(64, 50)
    x, t, y = helpers.tiny_inputs(2)
    with torch.no_grad():
        _, rec = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]),
                                        1.5, 0.0, 0.9)
    assert rec.natural_mask.sum(1).tolist() == [50] * 4
    assert rec.kept_count.tolist() == [50, 50, 5, 5]


# ---------------------------------------------------------------- input validation


def test_bad_inputs_raise_value_error_naming_the_problem(tiny_dcdit, helpers):
    x, t, y = helpers.tiny_inputs(2)
    with pytest.raises(ValueError, match="channels"):
        tiny_dcdit(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="grid|input_size"):
        tiny_dcdit(torch.randn(2, 1, 8, 9), t, y)
    with pytest.raises(ValueError, match="class label"):
        tiny_dcdit(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="class label"):
        tiny_dcdit(x, t, torch.tensor([-1, 3]))
    tiny_dcdit(x, t, torch.tensor([10, 3]))  # 10 = the null class: allowed
    with pytest.raises(ValueError, match="integers"):
        tiny_dcdit(x, t, y.float())
    with pytest.raises(ValueError, match="timestep"):
        tiny_dcdit(x, t[:1], y)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tiny_dcdit(x[0], t, y)
    for bad in (float("nan"), float("inf"), -float("inf")):
        xb = x.clone()
        xb[1, 0, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            tiny_dcdit(xb, t, y)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        tiny_dcdit(x, t, y, 1.0)


def test_unknown_router_name_raises(helpers):
    with pytest.raises(ValueError, match="unknown router 'bogus'"):
        helpers.make_model(helpers.TINY_DCDIT, router="bogus")


class FarPaddingRouter(nn.Module):
    """Test stub on a 20×20 grid: sample 0 keeps only (0,0) and its padding is the far corner (19,19);
    sample 1 keeps every 7th token, so sample 0 needs padding."""

    def forward(self, h, grid):
        B, L = h.shape[:2]
        p = torch.full((B, L), 0.1)
        p[0, 0] = 0.9
        p[0, L - 1] = 0.45
        p[1, ::7] = 0.8
        return p + 0 * h.float().sum(-1), p > 0.5  # keep p in the graph


def test_far_padding_does_not_poison_gradients(helpers):
    """End to end: a batch where one sample's padding slot is far from its only kept token must give
    finite parameter gradients (the padding row's smoothing weights all underflow at σ = 1)."""
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT, input_size=20)).train()
    model.router = FarPaddingRouter()
    x, t, y = helpers.tiny_inputs(2, grid=(20, 20))
    out, rec = model(x, t, y)
    assert rec.kept_idx[0, 1].item() == 399 and rec.kept_count.tolist()[0] == 1
    assert bool(torch.isfinite(out).all())
    out.square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    assert not bad, f"non-finite gradients in {len(bad)} parameters, e.g. {bad[:3]}"
