"""Elastic inference: dropped tokens leave the sequence; with packed execution every sample (and each
Lite-CFG half) runs at its own length, the padded reference at the batch maximum."""

from __future__ import annotations

import pytest
import torch


def inner_shapes(model):
    """Record the shape of the tokens entering the first inner block on every call."""
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    return seen


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_tail_dropping_shortens_the_inner_sequence(random_dcdit, helpers, execution):
    model = random_dcdit
    model.execution = execution
    x, t, y = helpers.tiny_inputs(4)
    seen = inner_shapes(model)
    with torch.no_grad():
        _, r0 = model(x, t, y, 0.0)
        _, r5 = model(x, t, y, 0.5)
    n = r0.natural_mask.sum(1)
    assert torch.equal(r5.kept_count, n - torch.floor(0.5 * n.double()).long())
    D = model.pos_embed.shape[-1]
    if execution == "packed":  # (T, D): exactly the kept tokens of the batch
        assert seen == [(int(r0.kept_count.sum()), D), (int(r5.kept_count.sum()), D)]
    else:  # (B, M, D): every sample padded to the batch maximum
        assert seen == [(4, int(r0.kept_count.max()), D), (4, int(r5.kept_count.max()), D)]
    assert seen[1] < seen[0]


def test_lite_cfg_runs_each_sample_at_its_own_length(random_dcdit, helpers):
    """Packed Lite-CFG computes Σ of the kept counts, the padded reference 2B × the longest; the
    outputs agree, and guidance combines the two halves' outputs."""
    model = random_dcdit
    x, t, y = helpers.tiny_inputs(3)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    yy = torch.cat([y, torch.full_like(y, model.num_classes)])
    seen = inner_shapes(model)
    fr = torch.tensor([0.0] * 3 + [0.9] * 3, dtype=torch.float64)
    with torch.no_grad():
        guided, rec = model.forward_with_cfg(xx, tt, yy, 1.5, tail_dropping_fraction=0.0, uncond_tail_dropping_fraction=0.9)
        out_packed, _ = model(xx, tt, yy, fr)
        model.execution = "padded"
        out_padded, rec_padded = model(xx, tt, yy, fr)
    cond, uncond = rec.split(2)
    assert int(uncond.kept_count.max()) < int(cond.kept_count.min())  # the halves' budgets really differ
    assert seen[0][0] == seen[1][0] == int(rec.kept_count.sum()) and seen[2][:2] == (6, int(rec.kept_count.max()))
    assert torch.equal(rec.kept_count, rec_padded.kept_count)
    torch.testing.assert_close(out_packed, out_padded, atol=1e-5, rtol=1e-5)
    c, u = out_packed[:3, :1], out_packed[3:, :1]
    torch.testing.assert_close(guided[:3, :1], u + 1.5 * (c - u), atol=1e-5, rtol=1e-5)
