"""dcdit.models.guidance: the label batch, Lite-CFG fractions and the guidance formula, each alone."""

from __future__ import annotations

import pytest
import torch

from dcdit.models.guidance import cfg_labels, guide, lite_cfg_fractions


def test_cfg_labels_appends_the_null_class():
    assert cfg_labels(torch.tensor([3, 0, 9]), 10).tolist() == [3, 0, 9, 10, 10, 10]


@pytest.mark.parametrize("f, f_u, groups", [(0.2, None, 1), (0.2, 0.2, 1), (0.0, 0.9, 2)])
def test_lite_cfg_fractions(f, f_u, groups):
    fractions, g = lite_cfg_fractions(2, f, f_u, "cpu")
    assert fractions.dtype == torch.float64 and g == groups
    assert fractions.tolist() == [f, f, f if f_u is None else f_u, f if f_u is None else f_u]


def test_guide_hand_computed():
    """cond ε = 2, uncond ε = 1, scale 3 -> 1 + 3·(2 − 1) = 4 on guided channels; the rest pass through."""
    cond = torch.tensor([2.0, 2.0, 7.0]).view(1, 3, 1, 1)
    uncond = torch.tensor([1.0, 1.0, 5.0]).view(1, 3, 1, 1)
    out = guide(torch.cat([cond, uncond]), 3.0, eps_channels=2)
    assert out[:, :, 0, 0].tolist() == [[4.0, 4.0, 7.0], [4.0, 4.0, 5.0]]
    out = guide(torch.cat([cond, uncond]), 3.0, eps_channels=2, guidance_channels=1)
    assert out[:, :, 0, 0].tolist() == [[4.0, 2.0, 7.0], [4.0, 1.0, 5.0]]
    with pytest.raises(ValueError, match="guidance_channels"):
        guide(torch.cat([cond, uncond]), 3.0, eps_channels=2, guidance_channels=3)
