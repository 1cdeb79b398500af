"""Elastic inference: dropped tokens leave the sequence; Lite-CFG pads each half to its own length."""

from __future__ import annotations

import torch

from dcdit.models.chunking import RoutingRecord


def inner_lengths(model):
    """Record the sequence length entering the first inner block on every call."""
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    return seen


def test_tail_dropping_shortens_the_inner_sequence(random_dcdit, helpers):
    model = random_dcdit
    x, t, y = helpers.tiny_inputs(4)
    seen = inner_lengths(model)
    with torch.no_grad():
        _, r0 = model(x, t, y, 0.0)
        _, r5 = model(x, t, y, 0.5)
    n = r0.natural_mask.sum(1)
    assert torch.equal(r5.kept_count, n - torch.floor(0.5 * n.double()).long())
    assert seen == [int(r0.kept_count.max()), int(r5.kept_count.max())] and seen[1] < seen[0]


def test_record_cat_inverts_split(random_dcdit, helpers):
    x, t, y = helpers.tiny_inputs(4)
    with torch.no_grad():
        _, rec = random_dcdit(x, t, y, torch.tensor([0.0, 0.0, 0.6, 0.6]))
    a, b = rec.split(2)
    trimmed = [RoutingRecord(r.p, r.natural_mask, r.kept_mask, r.kept_idx[:, : int(r.kept_count.max())], r.kept_count, r.grid)
               for r in (a, b)]
    back = RoutingRecord.cat(trimmed)
    for k in ("p", "natural_mask", "kept_mask", "kept_count"):
        assert torch.equal(getattr(back, k), getattr(rec, k))
    assert torch.equal(back.kept_idx[back.slot_mask], rec.kept_idx[rec.slot_mask])


def test_lite_cfg_runs_each_half_at_its_own_length(random_dcdit, helpers):
    model = random_dcdit
    x, t, y = helpers.tiny_inputs(3)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    yy = torch.cat([y, torch.full_like(y, model.num_classes)])
    seen = inner_lengths(model)
    with torch.no_grad():
        guided, rec = model.forward_with_cfg(xx, tt, yy, 1.5, tail_dropping_fraction=0.0, uncond_tail_dropping_fraction=0.9)
        # the same computation as one padded batch (no grouping): equal outputs, one longer sequence
        fr = torch.tensor([0.0] * 3 + [0.9] * 3, dtype=torch.float64)
        out_one, rec_one = model(xx, tt, yy, fr, budget_groups=1)
        out_two, _ = model(xx, tt, yy, fr, budget_groups=2)
    cond, uncond = rec.split(2)
    assert seen[:2] == [int(cond.kept_count.max()), int(uncond.kept_count.max())]
    assert seen[2] == int(rec_one.kept_count.max()) and seen[1] < seen[0]
    assert torch.equal(rec.kept_count, rec_one.kept_count)
    torch.testing.assert_close(out_two, out_one, atol=1e-5, rtol=1e-5)
    # and guidance used the grouped outputs
    c, u = out_two[:3, :1], out_two[3:, :1]
    torch.testing.assert_close(guided[:3, :1], u + 1.5 * (c - u), atol=1e-5, rtol=1e-5)
