"""dcdit.evaluation.evaluate: which metrics a set of samples gets, the reference paths, the results
JSON written by evaluate_to_file (``dcdit evaluate``), with a tiny stand-in feature network."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dcdit.evaluation as E
from dcdit.sampling import to_uint8_images, write_npz


def test_nan_npz_is_rejected_before_scoring(tmp_path, ev):
    bad = np.random.default_rng(0).uniform(0, 255, size=(3, 8, 8, 3)).astype(np.float32)
    bad[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "s.npz", arr_0=bad)
    with pytest.raises(ValueError, match="NaN"):
        E.evaluate_samples(str(tmp_path / "s.npz"), None, extractor=ev.tiny_extractor(), metrics="is")


def test_folder_and_npz_give_identical_metrics(tmp_path, ev):
    u8 = np.random.default_rng(1).integers(0, 256, size=(7, 12, 10, 3), dtype=np.uint8)
    ev.write_folder(u8, tmp_path / "images")
    write_npz(u8, tmp_path / "samples.npz")
    ref = np.random.default_rng(2).integers(0, 256, size=(9, 12, 10, 3), dtype=np.uint8)
    write_npz(ref, tmp_path / "ref.npz")
    ex = ev.tiny_extractor()
    r1 = E.evaluate_samples(str(tmp_path / "images"), str(tmp_path / "ref.npz"), extractor=ex, metrics="fid,is,pr")
    r2 = E.evaluate_samples(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), extractor=ex, metrics="fid,is,pr")
    for k in ("fid", "inception_score", "precision", "recall"):
        assert r1["metrics"][k] == r2["metrics"][k]


def test_metrics_equal_the_math_on_the_network_features(tmp_path, ev):
    """The driver's numbers are the metric functions on the extractor's features: catches a driver that
    swaps samples and reference, featurises the wrong images, or passes the wrong split size / k."""
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    ref = rng.integers(0, 200, size=(25, 16, 16, 3), dtype=np.uint8)
    ex = ev.tiny_extractor()
    res = E.evaluate_samples(u8, None, extractor=ex, metrics="is", is_split_size=10)
    f, p = E.compute_features(u8, ex)
    assert res["metrics"]["inception_score"] == E.inception_score(p, 10)[0] and res["metrics"]["inception_score_splits"] == 3
    write_npz(ref, tmp_path / "ref.npz")
    res = E.evaluate_samples(u8, str(tmp_path / "ref.npz"), extractor=ex, metrics="fid,pr", nearest_k=4)
    fr, _ = E.compute_features(ref, ex)
    assert res["metrics"]["fid"] == pytest.approx(
        E.frechet_distance(*E.feature_statistics(f), *E.feature_statistics(fr)), rel=1e-12)
    pr = E.precision_recall(fr, f, k=4)
    assert (res["metrics"]["precision"], res["metrics"]["recall"]) == (pr["precision"], pr["recall"])
    assert res["evaluation_settings"]["metrics"] == ["fid", "pr"] and "inception_score" not in res["metrics"]


def test_evaluate_requires_extractor_and_reference(ev):
    u8 = np.random.default_rng(6).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="feature network"):
        E.evaluate_samples(u8, None, metrics="fid")
    with pytest.raises(ValueError, match="reference"):
        E.evaluate_samples(u8, None, extractor=ev.tiny_extractor(), metrics="fid")
    with pytest.raises(ValueError, match="nothing to compute"):
        E.evaluate_samples(u8, None)
    with pytest.raises(ValueError, match=r"unknown metrics \['xx'\]"):
        E.evaluate_samples(u8, None, metrics="fid,xx")


def test_evaluate_to_file_with_sampling_settings_and_reference_stats(tmp_path, torchscript_nets, ev):
    tiny, nv = torchscript_nets
    rng = np.random.default_rng(5)
    run = tmp_path / "run"
    write_npz(rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8), run / "samples.npz")
    settings = {"sampler": "ddpm", "num_sampling_steps": 250, "cfg_scale": 1.5, "seed": 3, "tail_dropping_fraction": 0.2}
    (run / "settings.json").write_text(json.dumps(settings))
    ev.write_folder(rng.integers(0, 256, size=(15, 16, 16, 3), dtype=np.uint8), tmp_path / "ref")
    res, out = E.evaluate_to_file(run, str(tmp_path / "ref"), feature_extractor=tiny, is_split_size=6,
                                  save_ref_stats=str(tmp_path / "sample_stats.npz"))
    assert out == run / "evaluation.json" and json.loads(out.read_text())["metrics"] == json.loads(json.dumps(res["metrics"]))
    m = res["metrics"]
    assert set(m) >= {"fid", "inception_score", "inception_score_std", "precision", "recall"}
    assert m["inception_score_splits"] == 2 and 1.0 <= m["inception_score"] <= 5.0 and m["fid"] > 0
    assert res["sampling_settings"] == settings and res["sampling_settings_path"].endswith("settings.json")
    assert res["samples"]["num_images"] == 12 and res["reference"]["kind"] == "images"
    assert "sha256=" in res["feature_extractor"]["identity"]
    assert E.summary_lines(res)[0].strip().startswith("fid:")

    # reference given as statistics: same FID; precision/recall from the stored features
    ex = E.load_feature_extractor(tiny)
    E.save_reference_stats(tmp_path / "ref_stats.npz", E.compute_features(E.load_images(tmp_path / "ref"), ex)[0], ex)
    r2 = E.evaluate_samples(str(run / "samples.npz"), str(tmp_path / "ref_stats.npz"), extractor=ex, metrics="fid,pr")
    assert r2["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-6)
    assert r2["metrics"]["precision"] == pytest.approx(m["precision"])
    # the samples' own statistics against the samples: FID 0
    r3 = E.evaluate_samples(str(run / "samples.npz"), str(tmp_path / "sample_stats.npz"), extractor=ex, metrics="fid")
    assert abs(r3["metrics"]["fid"]) < 1e-6
    # statistics from another network are refused
    with pytest.raises(ValueError, match="feature extractor"):
        E.evaluate_samples(str(run / "samples.npz"), str(tmp_path / "ref_stats.npz"),
                           extractor=E.load_feature_extractor(nv), metrics="fid")


def test_mnist_npz_with_labels_and_settings(tmp_path, test_split):
    x, y = test_split
    np.savez(tmp_path / "samples.npz", arr_0=to_uint8_images(x), arr_1=y.numpy())
    res = E.evaluate_samples(str(tmp_path / "samples.npz"))  # auto: 32x32 gray -> MNIST metrics
    mm = res["metrics"]["mnist"]
    assert res["evaluation_settings"]["metrics"] == ["mnist"]
    assert mm["labels_source"].endswith("arr_1")
    assert abs(mm["mnist_fid"]) < 1e-4 and mm["class_accuracy"] >= 0.95
    # labels from settings.json when the npz has none
    write_npz(to_uint8_images(x[:20]), tmp_path / "run" / "samples.npz")
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"labels": y[:20].tolist(), "cfg_scale": 2.0}))
    res = E.evaluate_samples(str(tmp_path / "run" / "samples.npz"))
    assert res["metrics"]["mnist"]["labels_source"] == "settings.json:labels"
    assert res["sampling_settings"]["cfg_scale"] == 2.0


def test_grey_background_is_warned_about(tmp_path, test_split):
    """Above BACKGROUND_WARN_LEVEL grey levels on the frame the driver warns (why: test_mnist_classifier)."""
    x, y = test_split
    x, y = x[:200], y[:200]
    grey = (x + 20 / 127.5).clamp(-1, 1)  # +20 grey levels everywhere
    for name, imgs, warned in (("clean", x, False), ("grey", grey, True)):
        np.savez(tmp_path / f"{name}.npz", arr_0=to_uint8_images(imgs), arr_1=y.numpy())
        res = E.evaluate_samples(str(tmp_path / f"{name}.npz"))
        assert any("background is grey" in w for w in res["warnings"]) is warned
