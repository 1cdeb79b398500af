"""The release's ``arch_layout`` and model configuration: what is accepted (``d`` blocks included), and
one-line refusals for what the release cannot run (nested stages) or what dcdit does not build."""

from __future__ import annotations

import pytest

from dcdit.config import RELEASE_MODEL_OPTIONS, build_model, count_parameters, get_preset
from dcdit.release import parse_layout, release_model_config


def test_layouts_parse_into_block_counts():
    layout = parse_layout(["c2", ["D12"], "c2"])
    assert (layout.encoder_blocks, layout.decoder_blocks, layout.inner_mlp) == (2, 2, [True] * 12)
    layout = parse_layout(["c1C2", ["D3d1"], "C1"])  # c and C build the same block; d has no MLP
    assert (layout.encoder_blocks, layout.decoder_blocks, layout.inner_mlp) == (3, 1, [True] * 3 + [False])


@pytest.mark.parametrize("layout, message", [
    (["c1", ["c1", ["D1"], "c1"], "c1"], "cannot run them"),  # crashes in the release itself
    (["c2", "D12", "c2"], "must be \\[encoder, \\[inner\\], decoder\\]"),
    (["D12"], "must be \\[encoder"),
    (["c2", ["D12"], "c2x"], "string of blocks"),  # the release's parser would silently skip the typo
    (["D2", ["D12"], "c2"], "must be conv blocks"),
    (["c2", ["c1D2"], "c2"], "must be DiT blocks"),
])
def test_unsupported_layouts_are_refused_in_one_line(layout, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_layout(layout)
    assert "\n" not in str(err.value)


def _config(**hnet):
    base = {"arch_layout": ["c2", ["D2"], "c2"], "d_model": [64, 64], "num_heads": [4, 4], "enc_dec_dim_factor": [2, None]}
    return {"model": {"hnet": {**base, **hnet}}, "input_size": 8, "in_channels": 4, "num_classes": 10,
            "class_dropout_prob": 0.1, "learn_sigma": True}


@pytest.mark.parametrize("hnet, message", [
    ({"d_model": [64, 128]}, "equal at both stages"),
    ({"enc_dec_dim_factor": [2, 2]}, "must be null"),
    ({"enc_dec_dim_factor": [4, None]}, "multiples of 32"),  # d = 16: the release's GroupNorm(32) cannot build it
    ({"num_heads": [4]}, "two stages"),
])
def test_unbuildable_configurations_are_refused(hnet, message):
    with pytest.raises(ValueError, match=message):
        release_model_config(_config(**hnet))


def test_the_release_config_reads_as_the_release_options():
    cfg = release_model_config(_config(dechunk_kernel_sigma=2.0), target_ratio=16.0)
    assert (cfg.hidden_size, cfg.encoder_width, cfg.depth, cfg.num_heads, cfg.dechunk_sigma, cfg.target_ratio) == (64, 32, 2, 4, 2.0, 16.0)
    assert all(getattr(cfg, k) == v for k, v in RELEASE_MODEL_OPTIONS.items())


def test_d_blocks_become_inner_mlp_and_all_d_keeps_the_default():
    """``d`` -> false in ``model.inner_mlp`` at its position; a layout of ``D`` blocks only keeps null, so
    configs and state dicts of such models are unchanged."""
    assert release_model_config(_config(arch_layout=["c2", ["d1D2d1"], "c2"])).inner_mlp == [False, True, True, False]
    assert release_model_config(_config(arch_layout=["c2", ["D3"], "c2"])).inner_mlp is None
    cfg = release_model_config(_config(arch_layout=["c1", ["d2"], "c1"]))
    assert (cfg.depth, cfg.inner_mlp) == (2, [False, False])
    assert not any(k.startswith("blocks.") and ".mlp." in k for k in build_model(cfg).state_dict())


@pytest.mark.parametrize("size, paper", [("B", 138e6), ("XL", 690e6)])
def test_release_presets_match_the_paper_parameter_counts(size, paper):
    """DC-DiT-{B,XL}/N4-release is the release's shipped configs/DCDiT-B-N4.yaml model at that size:
    within 2% of the paper's count, counting the release's frozen pos_embed parameter as it does."""
    import torch

    cfg = get_preset(f"DC-DiT-{size}/N4-release")
    with torch.device("meta"):
        model = build_model(cfg)
    n = count_parameters(model) + model.pos_embed.numel()
    assert abs(n - paper) / paper < 0.02


def test_the_release_exact_mnist_config_trains_from_the_command_line(tmp_path):
    """configs/mnist-release.yaml: the MNIST default with the release's model, a few steps end to end."""
    from safetensors.torch import load_file

    from dcdit.cli import main

    run = tmp_path / "run"
    assert main(["train", "mnist-release", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                 "model.encoder_width=16", "train.global_batch_size=4", "train.ratio_batch_size=4", "train.steps=2",
                 "train.tensorboard=false", "--out", str(run), "--no-progress"]) == 0
    state = load_file(str(run / "checkpoints" / "0000002" / "model.safetensors"))
    assert {"inner_norm.weight", "encoder.norm.weight", "router.predict.weight"} <= set(state)
    assert "encoder.norm.bias" not in state  # an RMSNorm, not a LayerNorm
