"""DiT-only tests: non-square grids, classifier-free guidance, the official DiT-XL/2 layout, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dcdit.models.dit import DiT
from dcdit.models.embedders import get_2d_sincos_pos_embed

SMALL = dict(patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def _randomise(model: nn.Module, seed: int, std: float = 0.2) -> None:
    """Every trainable parameter (the zero-initialised adaLN / output layers too); pos_embed is fixed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                nn.init.normal_(p, std=std, generator=g)


def _small(input_size=8, seed=0, **over) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, **{**SMALL, **over})
    _randomise(model, seed)
    return model.eval()


# --- non-square grids --------------------------------------------------------------------------------


class _EncodingFinal(nn.Module):
    """Stands in for the final layer: token n, output feature j -> n·1000 + j."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features

    def forward(self, x, c):
        B, T, _ = x.shape
        code = torch.arange(T)[:, None] * 1000 + torch.arange(self.features)[None]
        return code.float().expand(B, T, self.features)


def test_non_square_forward_shape_and_positions():
    model = _small(input_size=(8, 12))
    assert model.token_grid == (4, 6)
    ref = torch.from_numpy(get_2d_sincos_pos_embed(64, (4, 6))).float()
    torch.testing.assert_close(model.pos_embed[0], ref)
    x = torch.randn(3, 4, 8, 12)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 50, 999]), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 8, 8, 12)
    assert torch.isfinite(out).all()


def test_non_square_unpatchify_brute_force():
    model = _small(input_size=(8, 12))
    P, C_out = model.patch_size, model.out_channels
    gh, gw = model.token_grid
    model.final_layer = _EncodingFinal(P * P * C_out)
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 12), torch.tensor([3, 4]), torch.tensor([1, 2]))
    assert out.shape == (2, C_out, 8, 12)
    for c in range(C_out):
        for H in range(gh * P):
            for W in range(gw * P):
                token = (H // P) * gw + (W // P)  # raster order of the patch-embed conv
                feature = ((H % P) * P + (W % P)) * C_out + c  # (p, q, c) within a token
                assert out[0, c, H, W].item() == token * 1000 + feature, (c, H, W)
    assert torch.equal(out[0], out[1])


def test_non_square_tokens_follow_the_input():
    """Moving the image by one patch column moves the patch tokens with it: conv raster order is (h, w)."""
    model = _small(input_size=(8, 12))
    x = torch.randn(1, 4, 8, 12)
    tok = model.x_embedder(x).reshape(1, 4, 6, -1)
    tok_shift = model.x_embedder(torch.roll(x, shifts=2, dims=3)).reshape(1, 4, 6, -1)
    torch.testing.assert_close(tok_shift[:, :, 1:], tok[:, :, :-1])


# --- classifier-free guidance -------------------------------------------------------------------------


def _cfg_batch(B=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    x2 = torch.cat([x, torch.randn(B, 4, 8, 8, generator=g)])  # second half must be ignored
    t = torch.tensor([10, 700] * 2)[: 2 * B]
    y = torch.cat([torch.tensor([3, 7])[:B], torch.full((B,), 10)])
    return x, x2, t, y


def _cond_uncond(model, x, t, y):
    """Both branches from one plain forward of [x; x] (the same batch of 2B as forward_with_cfg runs, so
    the comparison is exact; separate batches of B differ by fp32 rounding, ~1e-6 relative)."""
    return model(torch.cat([x, x]), t, y).chunk(2)


def test_forward_with_cfg_scale_one_is_conditional():
    model = _small()
    x, x2, t, y = _cfg_batch()
    B = len(x)
    with torch.no_grad():
        out = model.forward_with_cfg(x2, t, y, cfg_scale=1.0)
        cond, uncond = _cond_uncond(model, x, t, y)
        alone = model(x, t[:B], y[:B])
    torch.testing.assert_close(alone, cond, atol=1e-4, rtol=1e-5)  # batch-independent up to fp32 rounding
    assert (cond - uncond).abs().max() > 1e-2  # the label matters, so the check below is not vacuous
    torch.testing.assert_close(out[:B], cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[B:, :4], cond[:, :4], atol=1e-5, rtol=0)  # ε: guided in both halves
    torch.testing.assert_close(out[B:, 4:], uncond[:, 4:], atol=1e-5, rtol=0)  # variance: own half


def test_forward_with_cfg_guides_only_first_channels():
    model = _small()
    x, x2, t, y = _cfg_batch()
    B, s = len(x), 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(x2, t, y, cfg_scale=s, guidance_channels=3)
        full = model.forward_with_cfg(x2, t, y, cfg_scale=s)
        cond, uncond = _cond_uncond(model, x, t, y)
    guided = uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3])
    for half in (slice(0, B), slice(B, 2 * B)):
        torch.testing.assert_close(out[half, :3], guided, atol=1e-4, rtol=0)
    # channels 3.. (the 4th ε channel and the variance) pass through from their own half
    torch.testing.assert_close(out[:B, 3:], cond[:, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[B:, 3:], uncond[:, 3:], atol=1e-5, rtol=0)
    # the default guides all four ε channels, so channel 3 differs from the 3-channel form
    torch.testing.assert_close(full[:B, 3], uncond[:, 3] + s * (cond[:, 3] - uncond[:, 3]), atol=1e-4, rtol=0)
    assert (full[:B, 3] - out[:B, 3]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="guidance_channels"):
        model.forward_with_cfg(x2, t, y, cfg_scale=s, guidance_channels=5)


# --- the official DiT-XL/2 layout -----------------------------------------------------------------------


def _official_xl2_shapes() -> dict[str, tuple[int, ...]]:
    """DiT-XL/2 (256×256 -> 32×32 latents): D=1152, 28 blocks, 16 heads, P=2, 4 -> 8 channels, 1000+1 classes."""
    D, L, P, C, C_out, T, F = 1152, 28, 2, 4, 8, 256, 256
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, P, P),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, F),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
    }
    for i in range(L):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3 * D, D),
            f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D),
            f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D),
            f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D),
            f"blocks.{i}.mlp.fc2.bias": (D,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
        })
    shapes.update({
        "final_layer.linear.weight": (P * P * C_out, D),
        "final_layer.linear.bias": (P * P * C_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })
    return shapes


def test_official_dit_xl2_layout_and_parameter_count():
    with torch.device("meta"):
        model = DiT(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16)
    sd = model.state_dict()
    expected = _official_xl2_shapes()
    assert set(sd) == set(expected)
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert expected["blocks.27.adaLN_modulation.1.weight"] == (6912, 1152)
    assert expected["final_layer.linear.weight"] == (32, 1152)
    assert not model.pos_embed.requires_grad  # a Parameter (in the checkpoint) that never trains

    count = sum(p.numel() for p in model.parameters())
    # closed form from the architecture (pos_embed included, as in the release's model summary)
    D, L, P, C, C_out, T, F, K = 1152, 28, 2, 4, 8, 256, 256, 1001
    per_block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    closed = (
        T * D  # pos_embed
        + D * C * P * P + D  # patch embed
        + F * D + D + D * D + D  # timestep MLP
        + K * D  # label table incl. the null class
        + L * per_block
        + (P * P * C_out * D + P * P * C_out) + (2 * D * D + 2 * D)  # final layer
    )
    assert closed == 675_129_632
    assert count == 675_129_632


# --- bad inputs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()


def _ok(B=2):
    return torch.randn(B, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 9])


def test_bad_channel_count(tiny):
    _, t, y = _ok()
    with pytest.raises(ValueError, match="channels"):
        tiny(torch.randn(2, 3, 8, 8), t, y)


def test_bad_grid(tiny):
    _, t, y = _ok()
    with pytest.raises(ValueError, match="grid"):
        tiny(torch.randn(2, 4, 8, 10), t, y)


def test_label_above_range(tiny):
    x, t, _ = _ok()
    with pytest.raises(ValueError, match=r"class labels.*max 11"):
        tiny(x, t, torch.tensor([0, 11]))  # 10 is the null class, 11 is out of range
    torch.manual_seed(0)
    no_null = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                  num_classes=10, class_dropout_prob=0.0).eval()
    with pytest.raises(ValueError, match="no null class"):
        no_null(x, t, torch.tensor([0, 10]))


def test_negative_label(tiny):
    x, t, _ = _ok()
    with pytest.raises(ValueError, match=r"class labels.*min -1"):
        tiny(x, t, torch.tensor([-1, 3]))


def test_nan_input(tiny):
    x, t, y = _ok()
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny(x, t, y)


def test_valid_input_including_null_class_runs(tiny):
    x, t, _ = _ok()
    with torch.no_grad():
        assert tiny(x, t, torch.tensor([0, 10])).shape == (2, 8, 8, 8)


def test_force_drop_ids_replace_the_random_label_dropout():
    """Training mode with force_drop_ids: the given rows get the null class, no others (DiT's semantics)."""
    model = _small(class_dropout_prob=0.9)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([1, 2, 3, 4])
    drop = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        expected = model(x, t, torch.where(drop == 1, 10, y))  # eval mode: labels used as given
        model.train()
        got = model(x, t, y, force_drop_ids=drop)
    torch.testing.assert_close(got, expected)
