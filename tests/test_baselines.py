"""Isoparam / isoflop DiT baselines derived from a DC-DiT (paper §4.1)."""

from __future__ import annotations

import pytest
import torch

from dcdit.baselines import _dit_like, build_baselines, isoparam_dit, params_of, write_baseline_configs
from dcdit.config import build_model, load_run_config, model_config_from_dict
from dcdit.flops import dit_macs


def test_isoparam_is_the_closest_depth_by_brute_force():
    for n in (4, 16):
        dc = model_config_from_dict(dict(arch="dcdit", hidden_size=128, depth=4, num_heads=4, target_ratio=n))
        target = params_of(dc)
        best = min(range(1, 13), key=lambda d: abs(params_of(_dit_like(dc, d)) - target))
        iso = isoparam_dit(dc)
        assert iso.depth == best and iso.patch_size == (2 if dc.target_ratio == 4 else 4)
        assert (iso.hidden_size, iso.num_heads) == (dc.hidden_size, dc.num_heads)


def test_baselines_train_and_sample_with_the_dcdits_noise_schedule():
    """Same diffusion and same label-embedding init: the baselines differ from the DC-DiT in the backbone only."""
    dc = model_config_from_dict(dict(arch="dcdit", hidden_size=128, depth=4, num_heads=4, noise_schedule="cosine",
                                     label_embed_std=1.0))
    for base in (isoparam_dit(dc), _dit_like(dc, 3)):
        assert (base.noise_schedule, base.label_embed_std) == ("cosine", 1.0)
    model = build_model(isoparam_dit(dc))
    assert model.noise_schedule == "cosine"
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(1.0, rel=0.1)


def test_isoflop_is_the_smallest_depth_reaching_the_target(tmp_path):
    cfg = load_run_config("DC-DiT-B-N16")
    base = build_baselines(cfg)
    iso, target = base["isoflop"]["config"], base["dcdit"]["macs"]
    assert dit_macs(iso).total >= target > dit_macs(_dit_like(cfg.model, iso.depth - 1)).total
    paths = write_baseline_configs(cfg, base, tmp_path)
    again = load_run_config(paths["isoflop"])
    assert again.model == iso and again.train == cfg.train and again.data == cfg.data


def test_measured_budget_from_a_model(tmp_path):
    """With a model, the DC-DiT's MACs come from the tokens it kept along a sampling run."""
    dc = model_config_from_dict(dict(arch="dcdit", input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                                     num_classes=10, encoder_width=16, conv_norm_groups=8, router="random", target_ratio=4))
    cfg = load_run_config("mnist")
    cfg.model = dc
    torch.manual_seed(0)
    model = build_model(dc).eval()
    base = build_baselines(cfg, model, num_samples=4, sampling_steps=3)
    assert base["dcdit"]["macs_source"] == "measured"
    nominal = build_baselines(cfg)["dcdit"]["macs"]
    # the random router keeps ~L/N = 16 tokens: the measured cost is near the nominal one but not equal
    assert 0.5 * nominal < base["dcdit"]["macs"] < 1.5 * nominal and base["dcdit"]["macs"] != nominal
