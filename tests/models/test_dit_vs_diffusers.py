"""Our DiT against the real diffusers ``DiTTransformer2DModel``, through ``dcdit.diffusers_convert``.

Every weight is randomised (including the adaLN-Zero / output layers that start at zero) so that
agreement is not an artefact of zero gates. The diffusers model stores a timestep/class embedder in
every block; the random model ties them (as a converted DiT checkpoint has them) before comparing.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

from dcdit.diffusers_convert import (  # noqa: E402
    ConversionReport,
    diffusers_config_from_dit,
    diffusers_to_dit_state_dict,
    dit_config_from_diffusers,
    dit_to_diffusers_state_dict,
    set_diffusers_timestep_freq_shift,
)
from dcdit.models.dit import DiT  # noqa: E402

SMALL = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
    norm_eps=1e-6,  # diffusers' default 1e-5 differs from the official DiT's 1e-6 in the pre-MLP norm
)
STD = 0.2  # large enough that nothing is near zero, small enough that activations stay O(1-10)


def _randomise(module: torch.nn.Module, seed: int, skip=()) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in skip:
                torch.nn.init.normal_(p, std=STD, generator=g)


def _tie_block_embedders(model: DiTTransformer2DModel) -> None:
    src = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(src)


def _random_diffusers(seed: int = 0, **over) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**SMALL, **over})
    _randomise(model, seed)
    _tie_block_embedders(model)
    return model.eval()


def _inputs(B: int = 4, C: int = 4, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, size, size, generator=g)
    t = torch.tensor([0, 17, 500, 999])[:B]
    y = torch.tensor([0, 3, 9, 10])[:B]  # 10 = the null (CFG) class
    return x, t, y


def _diffusers_out(model, x, t, y):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, class_labels=y).sample


def _ours_out(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y)


def _ours_from_diffusers(dm: DiTTransformer2DModel, shift: float | None = None) -> DiT:
    kwargs = dit_config_from_diffusers(dm.config)
    if shift is not None:
        kwargs["timestep_freq_shift"] = shift
    ours = DiT(**kwargs)
    sd, report = diffusers_to_dit_state_dict(dm.state_dict(), input_size=kwargs["input_size"])
    assert isinstance(report, ConversionReport)
    assert report.generated == ["pos_embed"] and not report.missing and not report.unexpected
    ours.load_state_dict(sd, strict=True)
    return ours.eval()


# ---------------------------------------------------------------------------------------------------


def test_diffusers_to_ours_matches_diffusers_output():
    dm = _random_diffusers()
    ours = _ours_from_diffusers(dm)
    assert ours.t_embedder.downscale_freq_shift == 1.0
    x, t, y = _inputs()
    ref = _diffusers_out(dm, x, t, y)
    out = _ours_out(ours, x, t, y)
    assert out.shape == ref.shape == (4, 8, 8, 8)
    assert ref.abs().max() > 0.1  # a meaningful output, not zeros
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_timestep_frequency_convention_both_directions():
    dm = _random_diffusers()
    x, t, y = _inputs()
    ref_shift1 = _diffusers_out(dm, x, t, y)
    official = _ours_from_diffusers(dm, shift=0.0)
    out_official = _ours_out(official, x, t, y)
    # same weights, official convention: O(1) different from diffusers' default
    assert (out_official - ref_shift1).abs().max() > 1e-2
    # diffusers switched to the official convention agrees with our official form
    assert set_diffusers_timestep_freq_shift(dm, 0.0) == SMALL["num_layers"]
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0.0 for b in dm.transformer_blocks)
    ref_shift0 = _diffusers_out(dm, x, t, y)
    torch.testing.assert_close(out_official, ref_shift0, atol=1e-5, rtol=0)
    assert (ref_shift0 - ref_shift1).abs().max() > 1e-2


def _random_ours(seed: int = 3) -> tuple[DiT, dict]:
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                  num_classes=10)
    torch.manual_seed(seed)
    ours = DiT(**kwargs)
    # pos_embed is the fixed (non-trainable) sin-cos table, which diffusers recomputes: keep it
    _randomise(ours, seed, skip={"pos_embed"})
    return ours.eval(), kwargs


def test_ours_to_diffusers_matches_and_round_trips():
    ours, kwargs = _random_ours()
    assert ours.final_layer.linear.weight.abs().min() > 0  # zero-initialised layers were randomised
    with pytest.warns(UserWarning, match="timestep_freq_shift"):
        cfg = diffusers_config_from_dit(kwargs)
    assert cfg["norm_eps"] == 1e-6 and cfg["out_channels"] == 8 and cfg["attention_head_dim"] == 32
    dm = DiTTransformer2DModel(**cfg).eval()
    converted = dit_to_diffusers_state_dict(ours.state_dict(), num_layers=kwargs["depth"])
    dm.load_state_dict(converted, strict=True)
    set_diffusers_timestep_freq_shift(dm, 0.0)  # our model uses the official convention

    x, t, y = _inputs(seed=5)
    ref = _ours_out(ours, x, t, y)
    out = _diffusers_out(dm, x, t, y)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    back, report = diffusers_to_dit_state_dict(dm.state_dict(), input_size=8)
    orig = ours.state_dict()
    assert set(back) == set(orig)
    for k in orig:
        assert back[k].shape == orig[k].shape, k
        assert torch.equal(back[k], orig[k]), k
    assert report.num_layers == 2
    assert report.mapped["blocks.1.attn.qkv.weight"] == [
        f"transformer_blocks.1.attn1.to_{n}.weight" for n in "qkv"
    ]
    assert report.mapped["y_embedder.embedding_table.weight"] == [
        f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight" for i in range(2)
    ]


def test_converted_keys_equal_diffusers_keys():
    ours, kwargs = _random_ours()
    with pytest.warns(UserWarning):
        cfg = diffusers_config_from_dit(kwargs)
    dm = DiTTransformer2DModel(**cfg)
    converted = dit_to_diffusers_state_dict(ours.state_dict(), num_layers=2)
    expected = dm.state_dict()
    assert set(converted) == set(expected)
    assert "pos_embed.pos_embed" not in expected  # non-persistent buffer: diffusers recomputes it
    for k, v in expected.items():
        assert converted[k].shape == v.shape, k
    # diffusers' own sin-cos table equals ours
    torch.testing.assert_close(dm.pos_embed.pos_embed, ours.pos_embed.detach(), atol=1e-6, rtol=0)


def test_untied_block_embedders_are_rejected():
    torch.manual_seed(0)
    dm = DiTTransformer2DModel(**SMALL)
    _randomise(dm, 0)  # every block gets its own random embedder
    with pytest.raises(ValueError, match="single shared embedder"):
        diffusers_to_dit_state_dict(dm.state_dict(), input_size=8)


def test_diffusers_to_ours_needs_grid_and_reports_keys():
    sd = _random_diffusers().state_dict()
    with pytest.raises(ValueError, match="input_size"):
        diffusers_to_dit_state_dict(sd)
    extra = {**sd, "something.else": torch.zeros(1)}
    del extra["proj_out_2.bias"]
    with pytest.raises(ValueError, match="missing"):
        diffusers_to_dit_state_dict(extra, input_size=8)
    out, report = diffusers_to_dit_state_dict(extra, input_size=8, strict=False)
    assert report.missing == ["proj_out_2.bias"]
    assert report.unexpected == ["something.else"]
    assert "final_layer.linear.bias" not in out


def test_non_sincos_pos_embed_is_rejected():
    ours, _ = _random_ours()
    sd = dict(ours.state_dict())
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])
    with pytest.raises(ValueError, match="sin-cos"):
        dit_to_diffusers_state_dict(sd, num_layers=2)
    with pytest.raises(ValueError, match="num_layers"):
        dit_to_diffusers_state_dict(ours.state_dict(), num_layers=3)


def test_config_round_trip_and_eps_warning():
    kw = dit_config_from_diffusers(SMALL)
    assert kw == dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                      mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True,
                      timestep_freq_shift=1.0)
    back = diffusers_config_from_dit(kw)  # shift 1: no warning needed
    for k, v in SMALL.items():
        assert back[k] == v, k
    # diffusers' default norm_eps (1e-5) is not what our (and the official) pre-MLP LayerNorm uses
    with pytest.warns(UserWarning, match="norm_eps"):
        dit_config_from_diffusers({**SMALL, "norm_eps": 1e-5})
    # the DiT-XL/2 defaults on both sides line up (except eps, see above)
    with pytest.warns(UserWarning, match="norm_eps"):
        xl = dit_config_from_diffusers({})
    assert (xl["hidden_size"], xl["depth"], xl["num_heads"], xl["num_classes"]) == (1152, 28, 16, 1000)
    assert xl["learn_sigma"] is False  # diffusers' out_channels=None means out = in
    with pytest.raises(ValueError, match="square"):
        diffusers_config_from_dit({"input_size": (8, 12)})
    with pytest.raises(ValueError, match="mlp_ratio"):
        diffusers_config_from_dit({"mlp_ratio": 2.0, "timestep_freq_shift": 1.0})
    with pytest.raises(ValueError, match="out_channels"):
        dit_config_from_diffusers({**SMALL, "out_channels": 6})
