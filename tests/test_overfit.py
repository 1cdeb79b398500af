"""Tiny DC-DiT and DiT each overfit ONE fixed batch (fixed images, labels, timesteps and noise) with
the real diffusion objective (MSE(ε) + VLB, DiT's hybrid) on CPU. For DC-DiT the ratio loss is
added and the compression ratio L / kept must move toward the target N = 4.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusion_mod = pytest.importorskip("dcdit.diffusion")
from dcdit.ratio_loss import ratio_loss  # noqa: E402


def fixed_batch(grid=8, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: a few random blobs, plus the fixed noise and timesteps
    yy, xx = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    x0 = torch.zeros(B, 1, grid, grid)
    for b in range(B):
        for _ in range(2):
            cy, cx = torch.rand(2, generator=g) * grid
            x0[b, 0] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
    x0 = x0 / x0.amax(dim=(1, 2, 3), keepdim=True) * 2 - 1
    y = torch.randint(0, 10, (B,), generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    noise = torch.randn(B, 1, grid, grid, generator=g)
    return x0, y, t, noise


def train(model, steps, ratio_weight=0.0, target_ratio=4.0, lr=1e-3):
    diffusion = diffusion_mod.create_diffusion(timestep_respacing="")
    x0, y, t, noise = fixed_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses, ratios = [], []
    for _ in range(steps):
        terms = diffusion.training_losses(model, x0, t, model_kwargs=dict(y=y), noise=noise)
        loss = terms["loss"].mean()
        losses.append(float(loss.detach()))
        total = loss
        if "aux" in terms:
            rec = terms["aux"]
            ratios.append(float(rec.compression_ratio.mean()))
            if ratio_weight:
                total = total + ratio_weight * ratio_loss(rec, target_ratio)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return losses, ratios


def test_tiny_dit_overfits_one_batch(helpers):
    model = helpers.make_model(helpers.TINY_DIT, class_dropout_prob=0.0)
    losses, _ = train(model, 200)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.25 * losses[0], (losses[0], losses[-5:])


@pytest.mark.parametrize("router", ["cosine", "predictability"])
def test_tiny_dcdit_overfits_one_batch_and_ratio_moves_to_target(helpers, router):
    model = helpers.make_model(helpers.TINY_DCDIT, class_dropout_prob=0.0, router=router)
    losses, ratios = train(model, 200, ratio_weight=0.1)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.25 * losses[0], (losses[0], losses[-5:])
    start, end = ratios[0], sum(ratios[-5:]) / 5
    # the compression ratio moves toward N = 4 (measured on a log scale)
    assert abs(math.log(end / 4)) < abs(math.log(start / 4)), (start, end)
