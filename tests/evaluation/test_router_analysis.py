"""dcdit.evaluation.router_analysis: foreground retention with a router that keeps a known set of
tokens, the q_sample noising, compression vs timestep, the figures and the CLI hook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.evaluation import router_analysis as R
from dcdit.models.router import hard_boundaries




class KeepMaskRouter(nn.Module):
    """Stub router: p = 0.9 on the tokens of ``keep`` (B, L) with a per-token offset (distinct p
    values, fg ordered by raster index), 0.1 elsewhere; boundaries = p > 0.5."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep = keep.flatten(1)
        self.calls = 0

    def forward(self, h, grid):
        self.calls += 1
        assert h.shape[0] == self.keep.shape[0]
        L = self.keep.shape[1]
        ramp = torch.arange(L, dtype=torch.float32) / (10 * L)  # < 0.1: keeps the order, distinct values
        p = torch.where(self.keep, 0.9 - ramp, 0.1 - ramp).expand(h.shape[0], L).to(h.device)
        return p, hard_boundaries(p)


def _synthetic(N=3, H=8, W=8):
    """Images in [-1, 1] with known foreground rectangles of different sizes."""
    x = torch.full((N, 1, H, W), -1.0)
    fg = torch.zeros(N, H, W, dtype=torch.bool)
    boxes = [(1, 4, 2, 6), (0, 8, 0, 2), (3, 5, 3, 5)]
    for i in range(N):
        r0, r1, c0, c1 = boxes[i % len(boxes)]
        fg[i, r0:r1, c0:c1] = True
    x[fg[:, None]] = 0.8
    return x, fg


def test_router_keeping_exactly_the_foreground(helpers):
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    x, fg = _synthetic()
    model.router = KeepMaskRouter(fg)
    res = R.foreground_retention(model, x, torch.tensor([1, 2, 3]), t=500)
    assert res["fg_retention"] == [1.0, 1.0, 1.0] and res["bg_retention"] == [0.0, 0.0, 0.0]
    assert res["mean_fg_retention"] == 1.0 and res["mean_bg_retention"] == 0.0
    assert res["fg_share_of_kept"] == [1.0, 1.0, 1.0]
    assert res["kept"] == fg.flatten(1).sum(1).tolist()
    assert res["fg_fraction"] == pytest.approx((fg.flatten(1).sum(1) / 64.0).tolist())
    assert res["mean_p_fg_avg"] > 0.8 and res["mean_p_bg_avg"] < 0.11
    json.dumps({k: v for k, v in res.items() if not k.startswith("_")})  # JSON-ready


def test_partial_keep_and_tail_dropping(helpers):
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    x, fg = _synthetic()
    keep = fg.clone()
    keep[:, 7, 7] = True  # one background token per sample (fg boxes never reach (7, 7))
    model.router = KeepMaskRouter(keep)
    res = R.foreground_retention(model, x, torch.tensor([0, 0, 0]), t=10)
    n_fg = fg.flatten(1).sum(1).double()
    assert res["fg_retention"] == [1.0] * 3
    assert res["bg_retention"] == pytest.approx((1.0 / (64 - n_fg)).tolist())
    assert res["pooled_bg_retention"] == pytest.approx(3 / float((64 - n_fg).sum()))
    # tail-dropping f drops the floor(f * n) lowest-p boundaries; the stub's p falls with the raster
    # index, so the drop starts at the bg token (7, 7), then the last foreground tokens
    res = R.foreground_retention(model, x, torch.tensor([0, 0, 0]), t=10, tail_dropping_fraction=0.5)
    n_nat = n_fg + 1
    n_keep = n_nat - torch.floor(0.5 * n_nat)
    assert res["kept"] == n_keep.long().tolist()
    assert res["natural_kept"] == n_nat.long().tolist()
    # the bg token at (7, 7) has the lowest p among boundaries (largest raster index) and is dropped first
    assert res["bg_retention"] == [0.0] * 3
    assert res["fg_retention"] == pytest.approx(((n_keep) / n_fg).tolist())


def test_user_masks_for_latent_models(helpers):
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT, in_channels=2)).eval()
    _, fg = _synthetic()
    latents = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    model.router = KeepMaskRouter(fg)
    with pytest.raises(ValueError, match="masks"):
        R.foreground_retention(model, latents, torch.tensor([0, 1, 2]), t=100)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        R.foreground_retention(model, latents, torch.tensor([0, 1, 2]), t=100, masks=fg[:, :4])
    res = R.foreground_retention(model, latents, torch.tensor([0, 1, 2]), t=100, masks=fg)
    assert res["mean_fg_retention"] == 1.0 and res["mean_bg_retention"] == 0.0 and res["mask_source"] == "user masks"


def test_noised_input_is_q_sample_with_fixed_seed(helpers):
    """The model sees sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps from torch.Generator(seed), with
    DiT's linear schedule (betas 1e-4 .. 0.02 over 1000 steps) computed here independently."""
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    seen = {}
    forward = model.forward

    def spy(x, t, y, **kwargs):
        seen["x"], seen["t"] = x.clone(), t.clone()
        return forward(x, t, y, **kwargs)

    model.forward = spy
    x, _ = _synthetic()
    t = 640
    R.foreground_retention(model, x, torch.tensor([4, 5, 6]), t=t, seed=11)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)[t]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    expected = float(np.sqrt(abar)) * x + float(np.sqrt(1 - abar)) * eps
    torch.testing.assert_close(seen["x"], expected, atol=1e-5, rtol=1e-5)
    assert seen["t"].tolist() == [t] * 3


def test_real_router_matches_direct_forward_and_batching(helpers):
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    x, fg = _synthetic(N=5)
    y = torch.tensor([0, 1, 2, 3, 4])
    a = R.foreground_retention(model, x, y, t=300, seed=2)
    b = R.foreground_retention(model, x, y, t=300, seed=2, batch_size=2)
    assert a["fg_retention"] == b["fg_retention"] and a["kept"] == b["kept"]
    kept = a["_masks"]["kept"]
    from dcdit.diffusion import create_diffusion

    x_t = create_diffusion("").q_sample(x, torch.full((5,), 300), noise=torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        rec = model(x_t, torch.full((5,), 300), y)[1]
    assert torch.equal(rec.kept_mask.reshape(5, 8, 8), kept)
    for i in range(5):
        f = fg[i]
        exp_fg = float((kept[i] & f).sum()) / float(f.sum())
        exp_bg = float((kept[i] & ~f).sum()) / float((~f).sum())
        assert a["fg_retention"][i] == pytest.approx(exp_fg) and a["bg_retention"][i] == pytest.approx(exp_bg)


def test_compression_vs_timestep_from_trace():
    trace = [
        {"t": 999, "step": 0, "tokens": 64, "kept": torch.tensor([16, 32]), "natural": torch.tensor([16, 64])},
        {"t": 500, "step": 1, "tokens": 64, "kept": torch.tensor([8, 4]), "natural": torch.tensor([8, 4])},
        {"t": 0, "step": 2, "tokens": 64, "kept": torch.tensor([64, 1]), "natural": torch.tensor([64, 1])},
    ]
    c = R.compression_vs_timestep(trace)
    assert c["t"].tolist() == [999, 500, 0]
    np.testing.assert_allclose(c["mean"], [3.0, 12.0, 32.5])
    np.testing.assert_allclose(c["min"], [2.0, 8.0, 1.0])
    np.testing.assert_allclose(c["max"], [4.0, 16.0, 64.0])
    np.testing.assert_allclose(c["natural_min"], [1.0, 8.0, 1.0])
    assert "uncond_mean" not in c


def test_compression_from_generate_and_plots(helpers, tmp_path):
    from dcdit.sampling import generate

    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    res = generate(model, [1, 2], num_sampling_steps=3, cfg_scale=1.5, uncond_tail_dropping_fraction=0.5, num_snapshots=0)
    c = R.compression_vs_timestep(res)
    assert len(c["t"]) == 3 and "uncond_mean" in c
    kept = np.stack([e["kept"].numpy() for e in res.trace])
    np.testing.assert_allclose(c["mean"], (64 / kept).mean(1))
    x, fg = _synthetic()
    rets = R.foreground_retention_curve(model, x, torch.tensor([0, 1, 2]), [900, 100])
    files = R.plot_router_analysis(tmp_path / "ra", rets, c, extra={"note": "test"})
    for k in ("retention_vs_timestep", "retention_examples", "compression_vs_timestep", "json"):
        assert (tmp_path / "ra").joinpath(files[k].split("/")[-1]).stat().st_size > 0
    data = json.loads((tmp_path / "ra" / "router_analysis.json").read_text())
    assert [r["t"] for r in data["retention"]] == [900, 100] and "_masks" not in data["retention"][0]
    assert data["compression_vs_timestep"]["t"] == c["t"].tolist() and data["extra"]["note"] == "test"


@pytest.fixture
def tiny_mnist_ckpt(tmp_path):
    """A tiny DC-DiT saved with the mnist run config (random weights)."""
    from dcdit.checkpoint import save_weights
    from dcdit.config import build_model, load_run_config

    cfg = load_run_config("mnist", ["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                                    "model.encoder_width=8"])
    torch.manual_seed(0)
    save_weights(tmp_path / "ema.safetensors", build_model(cfg.model).state_dict(), cfg, 0)
    return tmp_path / "ema.safetensors"


def test_analyze_router_on_a_tiny_mnist_checkpoint(tmp_path, tiny_mnist_ckpt):
    """The checkpoint's retention at each t equals foreground_retention on the same seeded test digits,
    and the JSON holds it (strict JSON: NaN retentions become null)."""
    from dcdit.checkpoint import load_model

    rets, files = R.analyze_router(tiny_mnist_ckpt, tmp_path / "out", timesteps=[800, 50], num_images=6,
                                   sampling_steps=2, seed=4)
    data = json.loads((tmp_path / "out" / "router_analysis.json").read_text(), parse_constant=pytest.fail)
    assert files["json"] == str(tmp_path / "out" / "router_analysis.json")
    assert len(data["retention"]) == 2 and data["retention"][0]["num_samples"] == 6
    assert data["extra"]["images"] == "dcdit.data.mnist test split" and len(data["compression_vs_timestep"]["t"]) == 2
    model, _, _ = load_model(tiny_mnist_ckpt)
    x, y, masks, _ = R.load_analysis_images(None, 6, data_name="mnist", seed=4)
    direct = R.foreground_retention(model, x, y, 800, seed=4)
    assert data["retention"][0]["kept"] == direct["kept"] and rets[0]["fg_retention"] == direct["fg_retention"]
    assert R.retention_summary(rets)[0].startswith("t= 800: fg kept ")


def test_analysis_images_from_an_npz_with_masks(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.normal(size=(5, 4, 8, 8)).astype(np.float32),
             labels=np.arange(5), masks=rng.random((5, 8, 8)) > 0.5)
    x, y, masks, source = R.load_analysis_images(tmp_path / "d.npz", 3, data_name="latents")
    assert x.shape == (3, 4, 8, 8) and y.tolist() == [0, 1, 2] and masks.shape == (3, 8, 8) and masks.dtype == torch.bool
    assert source == str(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="pass --images"):
        R.load_analysis_images(None, 3, data_name="latents")
