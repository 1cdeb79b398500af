"""dcdit.evaluation.extractors: TorchScript feature networks in both calling conventions, from local files only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcdit.evaluation import extractors as E


def test_load_feature_extractor_torchscript_kinds(torchscript_nets, ev):
    """The generic and the nvlabs calling convention of the same network give the same features and
    probabilities as the module called directly (catches a wrong input scale, kind detection or softmax)."""
    tiny, nv = torchscript_nets
    u8 = np.random.default_rng(3).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    g, n = E.load_feature_extractor(tiny), E.load_feature_extractor(nv)
    assert g.describe()["kind"] == "generic" and n.describe()["kind"] == "nvlabs"
    fg, pg = E.compute_features(u8, g)
    fn, pn = E.compute_features(u8, n)
    with torch.no_grad():
        f_direct, logits = ev.TinyNet()(torch.from_numpy(u8).permute(0, 3, 1, 2).float())
    for f in (fg, fn):
        np.testing.assert_allclose(f, f_direct.double().numpy(), atol=1e-6)
    for p in (pg, pn):
        np.testing.assert_allclose(p, torch.softmax(logits.double(), 1).numpy(), atol=1e-6)
    assert "sha256=" in g.identity and g.identity != n.identity


def test_input_range_and_resize_reach_the_module():
    """ModuleExtractor maps uint8 to the declared range and resizes before the call."""
    seen = {}

    def probe(x):
        seen["min"], seen["max"], seen["shape"] = float(x.min()), float(x.max()), tuple(x.shape)
        return x.mean((2, 3))

    u8 = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    u8[0, 0, 0] = 255
    for rng_name, lo, hi in (("0-255", 0.0, 255.0), ("0-1", 0.0, 1.0), ("-1-1", -1.0, 1.0)):
        E.compute_features(u8, E.ModuleExtractor(probe, input_range=rng_name))
        assert (seen["min"], seen["max"]) == pytest.approx((lo, hi))
    feats, probs = E.compute_features(u8, E.ModuleExtractor(probe, resize=12))
    assert seen["shape"] == (2, 3, 12, 12) and feats.shape == (2, 3) and probs is None
    with pytest.raises(ValueError, match="input_range"):
        E.ModuleExtractor(probe, input_range="0-2")


def test_only_local_torchscript_files_load(tmp_path):
    with pytest.raises(ValueError, match="local files only"):
        E.load_feature_extractor("https://example.com/inception.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        E.load_feature_extractor(tmp_path / "missing.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        E.load_feature_extractor(tmp_path / "pickle.pt")


def test_non_finite_features_are_refused():
    u8 = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 non-finite feature values"):
        E.compute_features(u8, E.ModuleExtractor(lambda x: torch.full((len(x), 1), float("nan"))))
