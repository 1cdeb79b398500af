"""dcdit.evaluation.fid: the metric math against independent references, input checks, file I/O and
the ``dcdit evaluate`` entry point with a tiny stand-in feature network (nothing downloads)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dcdit.evaluation import fid as F
from dcdit.sampling import write_npz




def _spd(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fd_reference(mu1, s1, mu2, s2):
    """Brute force: Tr sqrt(Σ1Σ2) from the eigenvalues of the (non-symmetric) product, which are
    real and non-negative for SPD Σ1, Σ2 (similar to Σ1^½ Σ2 Σ1^½)."""
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.abs(lam.imag).max() < 1e-8 and lam.real.min() > -1e-10
    tr = np.sqrt(np.clip(lam.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


# ------------------------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("d,seed", [(1, 0), (5, 1), (24, 2)])
def test_frechet_matches_eigenvalue_bruteforce(d, seed):
    s1, s2 = _spd(d, seed), _spd(d, seed + 100)
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    got = F.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_reference(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(3)
    v1, v2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_identical_feature_sets_is_zero():
    feats = np.random.default_rng(4).normal(size=(300, 32)) * 3 + 1
    mu, sigma = F.feature_statistics(feats)
    mu2, sigma2 = F.feature_statistics(feats.copy())
    assert abs(F.frechet_distance(mu, sigma, mu2, sigma2)) < 1e-6
    # rank-deficient covariance (N < D): zero up to the sqrt(machine eps) error that the square roots
    # of the ~1e-14 round-off eigenvalues contribute (any method: sqrtm and eigh agree on this)
    mu, sigma = F.feature_statistics(feats[:10])
    assert abs(F.frechet_distance(mu, sigma, mu, sigma)) < 1e-7 * np.trace(sigma)


def test_frechet_falls_back_when_sqrtm_returns_nan(monkeypatch):
    """A broken BLAS returning NaN from sqrtm (LightningDiT #97): eps retry, then the eigh path."""
    import scipy.linalg

    calls = []

    def broken(a, *args, **kw):
        calls.append(1)
        return np.full_like(a, np.nan)

    monkeypatch.setattr(scipy.linalg, "sqrtm", broken)
    s1, s2 = _spd(8, 5), _spd(8, 6)
    mu1, mu2 = np.zeros(8), np.ones(8)
    fd, info = F.frechet_distance(mu1, s1, mu2, s2, return_info=True)
    assert len(calls) == 2 and info["eps_added"] > 0 and "eigh" in info["method"]
    assert fd == pytest.approx(_fd_reference(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_raises_on_large_imaginary_part():
    s1 = np.diag([1.0, -1.0])  # not a covariance: sqrtm(Σ1Σ2) has an imaginary diagonal entry of 1
    with pytest.raises(ValueError, match="imaginary"):
        F.frechet_distance(np.zeros(2), s1, np.zeros(2), np.eye(2))


def test_frechet_rejects_nan_and_shape_mismatch():
    with pytest.raises(ValueError, match="NaN"):
        F.frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(ValueError, match="shape"):
        F.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------------ Inception Score


def test_inception_score_closed_forms():
    K = 10
    onehot = np.eye(K)[np.repeat(np.arange(K), 7)]  # confident and uniform over classes
    assert F.inception_score(onehot, split_size=None)[0] == pytest.approx(K, rel=1e-12)
    row = np.random.default_rng(0).dirichlet(np.ones(K))
    same = np.tile(row, (50, 1))  # identical predictions: p(y|x) = p(y)
    assert F.inception_score(same, split_size=None)[0] == pytest.approx(1.0, abs=1e-12)
    # confident over only 4 of 10 classes, uniformly: IS = 4
    four = np.eye(K)[np.repeat([1, 3, 5, 7], 5)]
    assert F.inception_score(four, split_size=None)[0] == pytest.approx(4.0, rel=1e-12)


def test_inception_score_splits():
    K = 5
    probs = np.eye(K)[np.tile(np.arange(K), 20)]  # every split of 25 holds 5 of each class
    mean, std = F.inception_score(probs, split_size=25)
    assert mean == pytest.approx(K) and std == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="sum to 1"):
        F.inception_score(np.ones((4, 3)))


# ------------------------------------------------------------------------------ precision / recall


def _pr_bruteforce(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= rf[j] for j, f in enumerate(fake)) for r in real])
    return prec, rec


def test_precision_recall_matches_bruteforce():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(30, 5)) * 0.6 + 0.8
    got = F.precision_recall(real, fake, k=3, batch_size=7)
    p, r = _pr_bruteforce(real, fake, 3)
    assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
    assert 0 < p < 1 and 0 < r < 1  # a non-trivial case


def test_precision_recall_extremes():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(25, 4))
    same = F.precision_recall(real, real.copy(), k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = F.precision_recall(real, real + 1000.0, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


# ------------------------------------------------------------------------------ input checks, I/O


def test_check_samples_rejects_nan_float_and_bad_shapes():
    x = np.zeros((4, 8, 8, 3), dtype=np.float32)
    x[1, 2, 3, 0] = np.nan
    x[2, 0, 0, 1] = np.inf
    with pytest.raises(ValueError, match=r"2 NaN/inf values in 2 of 4 images"):
        F.check_samples(x)
    with pytest.raises(ValueError, match="must be uint8.*to_uint8_images"):
        F.check_samples(np.zeros((4, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        F.check_samples(np.zeros((4, 8, 8, 3), dtype=np.int16))
    with pytest.raises(ValueError, match="shape"):
        F.check_samples(np.zeros((4, 8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="no images"):
        F.check_samples(np.zeros((0, 8, 8, 3), dtype=np.uint8))
    gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    rgb = F.check_samples(gray)
    assert rgb.shape == (2, 4, 4, 3) and (rgb == gray[..., None]).all()


def test_nan_npz_is_rejected_before_scoring(tmp_path):
    bad = np.random.default_rng(0).uniform(0, 255, size=(3, 8, 8, 3)).astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "s.npz", arr_0=bad)
    with pytest.raises(ValueError, match="NaN"):
        F.evaluate_samples(str(tmp_path / "s.npz"), None, extractor=_tiny_extractor(), metrics="is")


def _write_folder(u8, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(u8):
        Image.fromarray(im).save(folder / f"{i:06d}.png")


def test_npz_and_folder_read_identically(tmp_path):
    u8 = np.random.default_rng(1).integers(0, 256, size=(7, 12, 10, 3), dtype=np.uint8)
    _write_folder(u8, tmp_path / "images")
    write_npz(u8, tmp_path / "samples.npz")
    a, b = F.load_images(tmp_path / "images"), F.load_images(tmp_path / "samples.npz")
    assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, u8) and np.array_equal(b, u8)
    ex = _tiny_extractor()
    ref = np.random.default_rng(2).integers(0, 256, size=(9, 12, 10, 3), dtype=np.uint8)
    write_npz(ref, tmp_path / "ref.npz")
    r1 = F.evaluate_samples(str(tmp_path / "images"), str(tmp_path / "ref.npz"), extractor=ex, metrics="fid,is,pr")
    r2 = F.evaluate_samples(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), extractor=ex, metrics="fid,is,pr")
    for k in ("fid", "inception_score", "precision", "recall"):
        assert r1["metrics"][k] == r2["metrics"][k]


# ------------------------------------------------------------------------------ extractors, driver


class TinyNet(nn.Module):
    """A fixed random conv net standing in for Inception: uint8-range input -> (features (B, 8), logits (B, 5))."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor):
        f = torch.tanh(self.conv(x / 127.5 - 1.0)).mean((2, 3))
        return f, self.fc(f)


class NVLabsStub(nn.Module):
    """The calling convention of StyleGAN's inception-2015-12-05.pt."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        f, logits = self.net(x.to(torch.float32))
        if return_features:
            return f
        return torch.softmax(logits, dim=1)


def _tiny_extractor():
    return F.ModuleExtractor(TinyNet(), input_range="0-255", name="tiny")


def test_load_feature_extractor_torchscript_kinds(tmp_path):
    torch.jit.script(TinyNet()).save(str(tmp_path / "tiny.pt"))
    torch.jit.script(NVLabsStub()).save(str(tmp_path / "nv.pt"))
    u8 = np.random.default_rng(3).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    g = F.load_feature_extractor(tmp_path / "tiny.pt")
    n = F.load_feature_extractor(tmp_path / "nv.pt")
    assert g.describe()["kind"] == "generic" and n.describe()["kind"] == "nvlabs"
    fg, pg = F.compute_features(u8, g)
    fn, pn = F.compute_features(u8, n)
    fe, pe = F.compute_features(u8, _tiny_extractor())
    np.testing.assert_allclose(fg, fe, atol=1e-6)
    np.testing.assert_allclose(fn, fe, atol=1e-6)
    np.testing.assert_allclose(pg, pe, atol=1e-6)
    np.testing.assert_allclose(pn, pe, atol=1e-6)
    assert "sha256=" in g.identity
    with pytest.raises(ValueError, match="local files only"):
        F.load_feature_extractor("https://example.com/inception.pt")


def _parse(argv):
    p = argparse.ArgumentParser()
    F.add_evaluate_args(p)
    return p.parse_args(argv)


def test_evaluate_main_writes_json_with_sampling_settings(tmp_path, capsys):
    torch.jit.script(TinyNet()).save(str(tmp_path / "tiny.pt"))
    rng = np.random.default_rng(5)
    run = tmp_path / "run"
    samples = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    write_npz(samples, run / "samples.npz")
    settings = {"sampler": "ddpm", "num_sampling_steps": 250, "cfg_scale": 1.5, "seed": 3, "tail_dropping_fraction": 0.2}
    (run / "settings.json").write_text(json.dumps(settings))
    _write_folder(rng.integers(0, 256, size=(15, 16, 16, 3), dtype=np.uint8), tmp_path / "ref")
    args = _parse([str(run / "samples.npz"), "--ref", str(tmp_path / "ref"), "--feature-extractor", str(tmp_path / "tiny.pt"),
                   "--save-ref-stats", str(tmp_path / "sample_stats.npz"), "--is-split-size", "6", "--no-progress"])
    assert F.evaluate_main(args) == 0
    res = json.loads((run / "evaluation.json").read_text())
    m = res["metrics"]
    assert set(m) >= {"fid", "inception_score", "inception_score_std", "precision", "recall"}
    assert m["inception_score_splits"] == 2 and 1.0 <= m["inception_score"] <= 5.0 and m["fid"] > 0
    assert res["sampling_settings"] == settings and res["sampling_settings_path"].endswith("settings.json")
    assert res["samples"]["num_images"] == 12 and res["reference"]["kind"] == "images"
    assert "sha256=" in res["feature_extractor"]["identity"]
    assert "fid" in capsys.readouterr().out

    # reference given as statistics: same FID; precision/recall from the stored features
    ex = F.load_feature_extractor(tmp_path / "tiny.pt")
    F.save_reference_stats(tmp_path / "ref_stats.npz", F.compute_features(F.load_images(tmp_path / "ref"), ex)[0], ex)
    r2 = F.evaluate_samples(str(run / "samples.npz"), str(tmp_path / "ref_stats.npz"), extractor=ex, metrics="fid,pr")
    assert r2["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-6)
    assert r2["metrics"]["precision"] == pytest.approx(m["precision"])
    # the samples' own statistics against the samples: FID 0
    r3 = F.evaluate_samples(str(run / "samples.npz"), str(tmp_path / "sample_stats.npz"), extractor=ex, metrics="fid")
    assert abs(r3["metrics"]["fid"]) < 1e-6
    # statistics from another network are refused
    other = F.ModuleExtractor(TinyNet(), name="other")
    with pytest.raises(ValueError, match="feature extractor"):
        F.evaluate_samples(str(run / "samples.npz"), str(tmp_path / "ref_stats.npz"), extractor=other, metrics="fid")


def test_evaluate_requires_extractor_and_reference(tmp_path):
    u8 = np.random.default_rng(6).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="feature network"):
        F.evaluate_samples(u8, None, metrics="fid")
    with pytest.raises(ValueError, match="reference"):
        F.evaluate_samples(u8, None, extractor=_tiny_extractor(), metrics="fid")
    with pytest.raises(ValueError, match="nothing to compute"):
        F.evaluate_samples(u8, None)
