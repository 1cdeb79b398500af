"""Presets and config handling. Parameter counts against the papers' figures and against closed
forms written by hand from the architecture (paper §3.1-3.2, conv_blocks.py docstring):

ResBlock(i → m → o) with condition width D: GroupNorm(i) 2i, Conv3×3 i→m 9im + m, Linear D→m Dm + m,
GroupNorm(m) 2m, Conv3×3 m→o 9mo + o, skip Conv1×1 io + o when i ≠ o.
Models are built on the meta device (no memory is allocated).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dcdit.config import (
    DCDiTConfig,
    DiTConfig,
    build_model,
    count_parameters,
    get_preset,
    model_config_from_dict,
)
from dcdit.models.dcdit import DCDiT
from dcdit.models.dit import DiT


def resblock(i, m, o, D):
    return 2 * i + (9 * i * m + m) + (D * m + m) + 2 * m + (9 * m * o + o) + ((i * o + o) if i != o else 0)


def dit_block(D, mlp=4):
    h = int(D * mlp)
    return (3 * D * D + 3 * D) + (D * D + D) + (D * h + h) + (h * D + D) + (6 * D * D + 6 * D)


def embedders(D, K=1000):
    return (256 * D + D) + (D * D + D) + (K + 1) * D


def dcdit_count(D, depth, C=4, K=1000):
    d = D // 4
    Cout = 2 * C
    n = 9 * C * d + d  # 3×3 embedder C → d
    n += embedders(D, K)
    n += resblock(d, d, d, D) + resblock(d, d, D, D) + 2 * D  # encoder + LayerNorm(D)
    n += 2 * D * D + 9 * D  # cosine router: W_Q, W_K (no bias), depthwise 3×3 (no bias)
    n += depth * dit_block(D)
    n += D * D + D  # residual projection
    n += resblock(D, d, d, D) + resblock(d, d, d, D) + 2 * d  # decoder + LayerNorm(d)
    n += (D * 2 * d + 2 * d) + (d * Cout + Cout)  # final layer: adaLN (cond D) + linear
    return n


def dit_count(D, depth, P, grid=32, C=4, K=1000):
    T = (grid // P) ** 2
    Cout = 2 * C
    n = P * P * C * D + D + T * D  # patch embed + pos_embed (a parameter in the DiT release)
    n += embedders(D, K)
    n += depth * dit_block(D)
    n += (D * 2 * D + 2 * D) + (D * P * P * Cout + P * P * Cout)
    return n


def meta_count(name):
    with torch.device("meta"):
        return count_parameters(build_model(name))


@pytest.mark.parametrize("name, paper_m", [("DC-DiT-B/N4", 138.0), ("DC-DiT-XL/N4", 690.0),
                                           ("DC-DiT-B/N16", 138.0), ("DC-DiT-XL/N16", 690.0)])
def test_dcdit_parameter_counts_near_paper(name, paper_m):
    n = meta_count(name)
    assert abs(n / 1e6 - paper_m) / paper_m < 0.02, n


@pytest.mark.parametrize("name, D, depth", [("DC-DiT-B/N4", 768, 12), ("DC-DiT-XL/N16", 1152, 28)])
def test_dcdit_parameter_count_closed_form(name, D, depth):
    assert meta_count(name) == dcdit_count(D, depth)


@pytest.mark.parametrize("name, millions", [("DiT-B/2", 130.5), ("DiT-XL/2", 675.1)])
def test_dit_parameter_counts(name, millions):
    n = meta_count(name)
    assert abs(n / 1e6 - millions) < 0.05, n


@pytest.mark.parametrize("name, D, depth, P", [("DiT-B/2", 768, 12, 2), ("DiT-XL/2", 1152, 28, 2),
                                               ("DiT-S/4", 384, 12, 4), ("DiT-L/8", 1024, 24, 8)])
def test_dit_parameter_count_closed_form(name, D, depth, P):
    assert meta_count(name) == dit_count(D, depth, P)


def test_tiny_closed_form_on_a_real_model(helpers):
    """The same closed form on an allocated model with non-default widths (C = 1, 10 classes)."""
    model = helpers.make_model(helpers.TINY_DCDIT)
    assert count_parameters(model) == dcdit_count(64, 2, C=1, K=10)


def test_presets():
    b = get_preset("DC-DiT-B/N4")
    assert isinstance(b, DCDiTConfig)
    assert (b.hidden_size, b.depth, b.num_heads, b.target_ratio) == (768, 12, 12, 4.0)
    xl = get_preset("DC-DiT-XL/N16")
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.target_ratio) == (1152, 28, 16, 16.0)
    d = get_preset("DiT-XL/2")
    assert isinstance(d, DiTConfig) and (d.hidden_size, d.depth, d.num_heads, d.patch_size) == (1152, 28, 16, 2)
    # a copy: editing it leaves the preset alone
    b.depth = 1
    assert get_preset("DC-DiT-B/N4").depth == 12


def test_unknown_preset_raises_with_valid_names():
    with pytest.raises(ValueError, match="DC-DiT-B/N4") as e:
        get_preset("DC-DiT-Q/N3")
    assert "DC-DiT-Q/N3" in str(e.value)
    with pytest.raises(ValueError):
        build_model("nope")


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        model_config_from_dict({"arch": "dcdit", "hidden_sise": 64})
    msg = str(e.value)
    assert "hidden_sise" in msg
    for key in ("hidden_size", "router", "target_ratio", "dechunk_sigma", "residual_init"):
        assert key in msg
    with pytest.raises(ValueError, match="patch_size"):
        model_config_from_dict({"preset": "DC-DiT-B/N4", "patch_size": 2})  # a DiT-only key
    with pytest.raises(ValueError):
        model_config_from_dict({"arch": "unet"})
    with pytest.raises(ValueError):
        model_config_from_dict({"preset": "DiT-B/2", "arch": "dcdit"})


def test_config_from_dict_overrides_and_builds(helpers):
    cfg = model_config_from_dict({"preset": "DC-DiT-B/N16", "depth": 3, "input_size": [16, 24]})
    assert isinstance(cfg, DCDiTConfig)
    assert cfg.depth == 3 and cfg.input_size == (16, 24) and cfg.target_ratio == 16.0
    assert cfg.hidden_size == 768
    with torch.device("meta"):
        m = build_model(cfg)
    assert isinstance(m, DCDiT) and len(m.blocks) == 3 and m.grid == (16, 24)
    tiny = helpers.make_model(helpers.TINY_DCDIT, router="predictability", dechunk_sigma=2.0)
    assert tiny.dechunk.sigma == 2.0 and type(tiny.router).__name__ == "PredictabilityRouter"
    dit = build_model(dataclasses.replace(get_preset("DiT-S/4"), input_size=16, depth=1))
    assert isinstance(dit, DiT) and dit.token_grid == (4, 4)


@pytest.mark.parametrize("residual_init", ["zero", "xavier"])
def test_residual_init_option(helpers, residual_init):
    m = helpers.make_model(helpers.TINY_DCDIT, residual_init=residual_init)
    w = m.residual_proj.weight
    assert bool((w == 0).all()) == (residual_init == "zero")
    assert bool((m.residual_proj.bias == 0).all())
    with pytest.raises(ValueError, match="residual_init"):
        helpers.make_model(helpers.TINY_DCDIT, residual_init="kaiming")


@pytest.mark.parametrize("arch", ["dcdit", "dit"])
def test_unknown_noise_schedule_names_the_valid_ones(helpers, arch):
    """A typo in model.noise_schedule fails when the model is built, listing what is accepted."""
    tiny = helpers.TINY_DCDIT if arch == "dcdit" else helpers.TINY_DIT
    with pytest.raises(ValueError, match="noise_schedule 'cosin'.*linear, cosine, squaredcos_cap_v2"):
        helpers.make_model(tiny, noise_schedule="cosin")
    assert helpers.make_model(tiny, noise_schedule="cosine").noise_schedule == "cosine"


@pytest.mark.parametrize("arch", ["dcdit", "dit"])
@pytest.mark.parametrize("std", [0.02, 1.0])
def test_label_embed_std_sets_the_class_table_init(helpers, arch, std):
    """The class-embedding table is drawn from N(0, std²): its sample std over 11 × 64 entries is within
    10% of std (a 704-sample std has a relative standard error of ~2.7%); nothing else changes."""
    tiny = helpers.TINY_DCDIT if arch == "dcdit" else helpers.TINY_DIT
    model = helpers.make_model(tiny, label_embed_std=std)
    table = model.y_embedder.embedding_table.weight
    assert table.shape == (11, 64)
    assert table.std().item() == pytest.approx(std, rel=0.1) and abs(table.mean().item()) < 4 * std / 704 ** 0.5
    default = helpers.make_model(tiny)
    for (name, a), (_, b) in zip(model.state_dict().items(), default.state_dict().items()):
        if name != "y_embedder.embedding_table.weight":
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="label_embed_std must be > 0"):
        helpers.make_model(tiny, label_embed_std=0.0)


def test_the_two_model_configs_share_their_common_fields():
    """DiT and DC-DiT extend one base: a field added there reaches both (and a baseline DiT derived
    from a DC-DiT copies it, see dcdit.baselines); only arch, patch_size and DC-DiT's own fields differ."""
    from dcdit.config import ModelConfigBase

    base = {f.name for f in dataclasses.fields(ModelConfigBase)}
    dit, dc = {f.name for f in dataclasses.fields(DiTConfig)}, {f.name for f in dataclasses.fields(DCDiTConfig)}
    assert base <= dit and base <= dc and dit - base == {"patch_size"}
    assert (DiTConfig().arch, DCDiTConfig().arch) == ("dit", "dcdit")
    assert (DCDiTConfig().hidden_size, DCDiTConfig().depth, DCDiTConfig().num_heads) == (768, 12, 12)  # DC-DiT-B
    assert (DiTConfig().hidden_size, DiTConfig().depth, DiTConfig().num_heads) == (1152, 28, 16)  # DiT-XL


def test_baseline_dit_copies_every_shared_field():
    from dcdit.baselines import isoparam_dit
    from dcdit.config import ModelConfigBase

    dc = model_config_from_dict({"preset": "DC-DiT-B/N4", "noise_schedule": "cosine", "label_embed_std": 1.0,
                                 "timestep_freq_shift": 1.0, "class_dropout_prob": 0.2, "input_size": [16, 24]})
    dit = isoparam_dit(dc)
    for f in dataclasses.fields(ModelConfigBase):
        if f.name not in ("arch", "depth"):
            assert getattr(dit, f.name) == getattr(dc, f.name), f.name
    assert dit.patch_size == 2
