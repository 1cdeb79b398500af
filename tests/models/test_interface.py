"""dcdit.models.interface: one call for every model, (prediction, record or None), and guidance through it.

The guided prediction is checked against two separate model calls (conditional with the labels,
unconditional with the null label) combined by the CFG formula written out here; that needs batch
independence, which DC-DiT has with masked padding (tests/models/test_dcdit.py)."""

from __future__ import annotations

import pytest
import torch

from dcdit.models.chunking import RoutingRecord
from dcdit.models.guidance import cfg_labels
from dcdit.models.interface import predict, predict_guided, routes_tokens


class Compiled(torch.nn.Module):
    """Stands for a torch.compile wrapper: the real module under ``_orig_mod``, calls forwarded."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner

    def forward(self, *a, **k):
        return self._orig_mod(*a, **k)


@pytest.fixture
def models(helpers):
    dc = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    dit = helpers.randomize_(helpers.make_model(helpers.TINY_DIT)).eval()
    return dc, dit


def test_routes_tokens_tells_the_architectures_apart_through_wrappers(models):
    dc, dit = models
    assert routes_tokens(dc) and routes_tokens(Compiled(dc))
    assert not routes_tokens(dit) and not routes_tokens(Compiled(dit))


def test_predict_returns_the_models_own_outputs(models, helpers):
    """DiT: (its tensor, None); DC-DiT: (its prediction, its RoutingRecord), for any fraction."""
    dc, dit = models
    x, t, y = helpers.tiny_inputs(4)
    with torch.no_grad():
        out, rec = predict(dit, x, t, y)
        assert rec is None and torch.equal(out, dit(x, t, y))
        out, rec = predict(dc, x, t, y, tail_dropping_fraction=0.5)
        ref, ref_rec = dc(x, t, y, tail_dropping_fraction=0.5)
    assert isinstance(rec, RoutingRecord) and torch.equal(out, ref) and torch.equal(rec.kept_mask, ref_rec.kept_mask)
    assert bool((rec.kept_count < rec.natural_mask.sum(1)).any())  # the fraction reached the model


def test_predict_passes_forced_label_drops_to_both_models(models, helpers):
    """force_drop_ids=1 everywhere is the same as asking for the null class."""
    x, t, y = helpers.tiny_inputs(3)
    null = torch.full_like(y, 10)
    with torch.no_grad():
        for model in models:
            dropped, _ = predict(model, x, t, y, force_drop_ids=torch.ones_like(y))
            torch.testing.assert_close(dropped, predict(model, x, t, null)[0], atol=0, rtol=0)


def test_predict_refuses_tail_dropping_on_a_dit(models, helpers):
    x, t, y = helpers.tiny_inputs(2)
    with pytest.raises(ValueError, match="DC-DiT only"):
        predict(models[1], x, t, y, tail_dropping_fraction=0.2)
    with pytest.raises(ValueError, match="DC-DiT only"):
        predict(models[1], x, t, y, tail_dropping_fraction=torch.tensor([0.0, 0.3]))


@pytest.mark.parametrize("arch", ["dcdit", "dit"])
@pytest.mark.parametrize("guidance_channels", [None, 1])
def test_predict_guided_is_the_cfg_formula_on_separate_calls(helpers, arch, guidance_channels):
    """ε̂ = ε_u + s(ε_c − ε_u) on the guided channels, each half's own values elsewhere, both halves
    equal. Two input channels (four outputs), so guiding one channel differs from guiding both."""
    config = helpers.TINY_DCDIT if arch == "dcdit" else helpers.TINY_DIT
    model = helpers.randomize_(helpers.make_model(config, in_channels=2)).eval()
    x, t, y = helpers.tiny_inputs(3, channels=2)
    s = 3.0
    with torch.no_grad():
        cond, _ = predict(model, x, t, y)
        uncond, _ = predict(model, x, t, torch.full_like(y, 10))
        x2 = torch.cat([x, torch.randn_like(x)])  # the second half of x is ignored (DiT's convention)
        out, record = predict_guided(model, x2, torch.cat([t, t]), cfg_labels(y, 10), s, guidance_channels=guidance_channels)
    k = 2 if guidance_channels is None else guidance_channels
    guided = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
    torch.testing.assert_close(out[:3, :k], guided, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3:, :k], guided, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:3, k:], cond[:, k:], atol=1e-5, rtol=1e-5)  # unguided: from its own half
    torch.testing.assert_close(out[3:, k:], uncond[:, k:], atol=1e-5, rtol=1e-5)
    assert (record is None) == (arch == "dit")


def test_predict_guided_lite_cfg_gives_each_half_its_own_fraction(models, helpers):
    """The record of a Lite-CFG call: cond half = a plain call at fraction 0, uncond half = a plain
    null-label call at 0.9 (each padded to its own length)."""
    dc = models[0]
    x, t, y = helpers.tiny_inputs(4)
    with torch.no_grad():
        _, rec = predict_guided(dc, torch.cat([x, x]), torch.cat([t, t]), cfg_labels(y, 10), 2.0,
                                tail_dropping_fraction=0.0, uncond_tail_dropping_fraction=0.9)
        _, cond = predict(dc, x, t, y)
        _, uncond = predict(dc, x, t, torch.full_like(y, 10), tail_dropping_fraction=0.9)
    c, u = rec.split(2)
    assert torch.equal(c.kept_mask, cond.kept_mask) and torch.equal(u.kept_mask, uncond.kept_mask)
    assert bool((u.kept_count < c.kept_count).any())


def test_predict_guided_matches_the_models_own_forward_with_cfg(models, helpers):
    """The official DiT method and DC-DiT's method give the same result as the shared path, bit for bit."""
    dc, dit = models
    x, t, y = helpers.tiny_inputs(3)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), cfg_labels(y, 10)
    with torch.no_grad():
        assert torch.equal(predict_guided(dit, x2, t2, y2, 2.5)[0], dit.forward_with_cfg(x2, t2, y2, 2.5))
        ours, rec = predict_guided(dc, x2, t2, y2, 2.5, tail_dropping_fraction=0.1, uncond_tail_dropping_fraction=0.6)
        theirs, rec2 = dc.forward_with_cfg(x2, t2, y2, 2.5, tail_dropping_fraction=0.1, uncond_tail_dropping_fraction=0.6)
    assert torch.equal(ours, theirs) and torch.equal(rec.kept_idx, rec2.kept_idx)
