"""Tests of dcdit.viz: the image grid (pixel-exact placement) and the two routing figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit.sampling import SampleResult, generate
from dcdit.viz import make_grid, plot_chunking, plot_compression_vs_timestep, save_image_grid




@pytest.fixture
def lite_cfg_result(helpers):
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()
    return generate(
        model, [1, 2, 3], num_sampling_steps=10, cfg_scale=1.5,
        tail_dropping_fraction=0.0, uncond_tail_dropping_fraction=0.9, num_snapshots=4,
    )


def _value_of(k: int) -> float:
    """A distinct value in [-1, 1] for image k whose uint8 code is 20·k + 10 (no rounding ambiguity)."""
    return (20 * k + 10) / 127.5 - 1.0


@pytest.mark.parametrize("B,nrow,padding", [(7, 3, 2), (4, 8, 1), (6, 2, 0)])
def test_save_image_grid_places_each_image(tmp_path, B, nrow, padding):
    H, W = 5, 4
    imgs = torch.empty(B, 3, H, W)
    for k in range(B):
        imgs[k, 0] = _value_of(k)  # R: identifies the image
        imgs[k, 1] = 1.0  # G = 255 inside every tile
        imgs[k, 2] = -1.0
        imgs[k, 0, 0, 0] = 1.0  # top-left pixel of each tile marked 255 in R
    path = save_image_grid(imgs, tmp_path / "out" / "grid.png", nrow=nrow, padding=padding)
    grid = np.asarray(Image.open(path).convert("RGB"))
    ncol = min(nrow, B)
    nrows = -(-B // ncol)
    assert grid.shape == (nrows * (H + padding) + padding, ncol * (W + padding) + padding, 3)
    covered = np.zeros(grid.shape[:2], bool)
    for k in range(B):
        r, c = k // ncol, k % ncol
        y0, x0 = padding + r * (H + padding), padding + c * (W + padding)
        tile = grid[y0 : y0 + H, x0 : x0 + W]
        assert tile[0, 0, 0] == 255
        red = tile[..., 0].copy()
        red[0, 0] = 20 * k + 10
        assert (red == 20 * k + 10).all(), f"tile {k} has the wrong image"
        assert (tile[..., 1] == 255).all() and (tile[..., 2] == 0).all()
        covered[y0 : y0 + H, x0 : x0 + W] = True
    assert (grid[~covered] == 0).all()  # padding and unused tiles


def test_save_image_grid_grayscale(tmp_path):
    imgs = torch.stack([torch.full((1, 3, 3), _value_of(k)) for k in range(3)])
    path = save_image_grid(imgs, tmp_path / "g.png", nrow=3, padding=1)
    assert Image.open(path).mode == "L"  # one channel stays one channel
    grid = np.asarray(Image.open(path).convert("RGB"))
    for k in range(3):
        assert (grid[1:4, 1 + 4 * k : 4 + 4 * k] == 20 * k + 10).all()


def test_make_grid_brute_force_random():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 3, 2, 3), dtype=np.uint8)
    g = make_grid(imgs, nrow=2, padding=1, pad_value=7)
    # brute force: every grid pixel is either padding (7) or exactly one image's pixel
    for yy in range(g.shape[0]):
        for xx in range(g.shape[1]):
            r, ry = divmod(yy - 1, 4)
            c, cx = divmod(xx - 1, 3)
            k = r * 2 + c
            inside = yy >= 1 and xx >= 1 and ry < 3 and cx < 2 and c < 2 and k < 5
            expected = imgs[k, ry, cx] if inside else np.array([7, 7, 7])
            assert (g[yy, xx] == expected).all()


def _png_size(path):
    with Image.open(path) as im:
        im.load()
        return im.size, im.format


def test_plot_chunking_writes_png(tmp_path, lite_cfg_result):
    path = plot_chunking(lite_cfg_result, tmp_path / "viz" / "chunking_viz.png", max_samples=2)
    (w, h), fmt = _png_size(path)
    assert fmt == "PNG"
    # 4 snapshot columns × 1.6 in + 1.2 in at 100 dpi; 2 samples × 3 rows × 1.6 in
    assert 600 <= w <= 900 and 800 <= h <= 1100
    # with a decoder (upsample ×4 to "pixels"); a bigger image must still align and render
    path2 = plot_chunking(
        lite_cfg_result, tmp_path / "viz2.png", max_samples=1,
        decode=lambda z: torch.nn.functional.interpolate(z.clamp(-1, 1), scale_factor=4).expand(-1, 3, -1, -1),
    )
    (w2, h2), _ = _png_size(path2)
    assert w2 == w and 400 <= h2 <= 600


def test_plot_chunking_titles_report_kept_share(tmp_path, lite_cfg_result, monkeypatch):
    import matplotlib.axes

    titles = []
    orig = matplotlib.axes.Axes.set_title

    def spy(self, label, *a, **k):
        titles.append(label)
        return orig(self, label, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", spy)
    plot_chunking(lite_cfg_result, tmp_path / "c.png", max_samples=3)
    expected = []
    for s in lite_cfg_result.snapshots:
        for i in range(3):
            share = 100 * int(s["kept_mask"][i].sum()) / 64
            expected.append(f"t={s['t']} kept {share:.0f}%")
    assert sorted(titles) == sorted(expected)
    assert titles[0].startswith("t=999 ")


def test_plot_chunking_refuses_dit(tmp_path):
    res = SampleResult(samples=torch.zeros(1, 1, 8, 8), trace=[], snapshots=[])
    with pytest.raises(ValueError, match="snapshots"):
        plot_chunking(res, tmp_path / "x.png")


def test_plot_compression_vs_timestep(tmp_path, lite_cfg_result, monkeypatch):
    import matplotlib.axes

    plotted = []
    orig = matplotlib.axes.Axes.plot

    def spy(self, *a, **k):
        plotted.append((np.asarray(a[0]), np.asarray(a[1]), k.get("label")))
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    path = plot_compression_vs_timestep(lite_cfg_result, tmp_path / "cmp" / "compression.png")
    (w, h), fmt = _png_size(path)
    assert fmt == "PNG" and (w, h) == (640, 400)
    by_label = {lab: (x, y) for x, y, lab in plotted}
    tr = lite_cfg_result.trace
    ts = np.array([e["t"] for e in tr], float)
    cond = by_label["cond: L / kept (mean)"]
    unc = by_label["uncond: L / kept (mean)"]
    np.testing.assert_array_equal(cond[0], ts)
    np.testing.assert_allclose(cond[1], [np.mean(64 / e["kept"].double().numpy()) for e in tr])
    np.testing.assert_allclose(unc[1], [np.mean(64 / e["uncond_kept"].double().numpy()) for e in tr])
    assert (unc[1] >= cond[1]).all()  # the 0.9-tail-dropped uncond half is compressed more


def test_plot_compression_axis_runs_999_to_0(tmp_path, helpers, monkeypatch):
    import matplotlib.figure

    lims = []
    orig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        lims.append(tuple(self.axes[0].get_xlim()))
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    model = helpers.make_model(helpers.TINY_DIT).eval()
    res = generate(model, [0, 1], sampler="ddim", num_sampling_steps=5)  # t = 800 .. 0
    plot_compression_vs_timestep(res, tmp_path / "dit.png")
    assert lims == [(999.0, 0.0)]  # sampling direction, left to right
