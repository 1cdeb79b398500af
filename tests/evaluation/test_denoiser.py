"""The x̂0-by-timestep measurement, checked with oracle models whose answer is known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcdit.diffusion import create_diffusion
from dcdit.evaluation.denoiser import denoiser_error_by_timestep, wrong_labels


class Oracle(nn.Module):
    """Returns the exact ε = (x_t − √ᾱ x0) / √(1−ᾱ) for the right label and 0 for any other label."""

    def __init__(self, x0, y, schedule="linear"):
        super().__init__()
        self.x0, self.y, self.num_classes, self.noise_schedule, self.learn_sigma = x0, y, 10, schedule, False
        self.alphas = torch.as_tensor(create_diffusion("", noise_schedule=schedule).alphas_cumprod, dtype=torch.float32)

    def forward(self, x_t, t, y):
        a = self.alphas[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        return torch.where((y == self.y).view(-1, 1, 1, 1), eps, torch.zeros_like(eps))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_oracle_recovers_x0_with_the_right_label_only(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(6)
    model = Oracle(x0, y, schedule)
    rows = denoiser_error_by_timestep(model, x0, y, [100, 500, 900], seed=3)
    alphas = model.alphas
    noise_gen = torch.Generator().manual_seed(3)
    for r in rows:
        assert r.t in (100, 500, 900) and r.alpha_bar == pytest.approx(float(alphas[r.t]))
        assert r.x0_mse_right == pytest.approx(0.0, abs=1e-8)
        assert r.eps_mse_right == pytest.approx(0.0, abs=1e-8)
        # wrong / null label: ε̂ = 0, so x̂0 = clip(x_t / √ᾱ), recomputed here from the same noise draw
        a = alphas[r.t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=noise_gen)
        expected = ((x_t / a.sqrt()).clamp(-1, 1) - x0).pow(2).mean().item()
        assert r.x0_mse_wrong == pytest.approx(expected, rel=1e-5)
        assert r.x0_mse_null == pytest.approx(expected, rel=1e-5)


def test_wrong_labels_are_never_right_and_shapes_are_checked():
    y = torch.arange(10)
    assert (wrong_labels(y, 10) != y).all() and wrong_labels(y, 10).max() < 10
    with pytest.raises(ValueError, match="expected x0 of shape"):
        denoiser_error_by_timestep(Oracle(torch.zeros(2, 1, 4, 4), y[:2]), torch.zeros(2, 4, 4), y[:2], [10])
