"""The shipped MNIST classifier and the MNIST metrics built on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.data.mnist import load_mnist_tensors
from dcdit.evaluation import fid as F
from dcdit.evaluation import mnist_classifier as M
from dcdit.sampling import to_uint8_images, write_npz




@pytest.fixture(scope="module")
def test_split():
    return load_mnist_tensors("test")


def test_shipped_classifier_reaches_95_percent_on_held_out_split(test_split):
    path = M.CLASSIFIER_PATH
    assert path.exists() and path.stat().st_size < 1_000_000
    model, info = M.load_classifier()
    x, y = test_split
    assert len(x) == 500
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.95
    assert info["test_accuracy"] == pytest.approx(acc, abs=1e-4)  # the metadata tells the truth
    settings = info["train_settings"]
    assert settings["train_split"] == "train" and settings["train_images"] == 4500 and settings["test_images"] == 500


def test_mnist_metrics_on_real_test_digits(test_split):
    x, y = test_split
    model, info = M.load_classifier()
    res = M.mnist_metrics(x, y)
    # the reference IS the test split: identical features -> Fréchet distance 0
    assert abs(res["mnist_fid"]) < 1e-6
    assert res["class_accuracy"] == pytest.approx(info["test_accuracy"], abs=1e-4)
    assert 8.0 < res["mnist_is"] <= 10.0 + 1e-9
    assert res["num_samples"] == 500 and sum(res["predicted_histogram"]) == 500
    # wrong labels: accuracy = share predicted as the shifted label (≈ the error rate / 9 per class)
    wrong = M.mnist_metrics(x, (y + 1) % 10)
    assert wrong["class_accuracy"] < 0.05
    # a different distribution (the train split vs the test reference) is further away than test vs itself
    xt, _ = load_mnist_tensors("train")
    assert M.mnist_metrics(xt[::9])["mnist_fid"] > 1e-3


class CodedStub(nn.Module):
    """Predicts the digit written into pixel (0, 0): value -1 + k / 4.5 -> class k."""

    def features(self, x):
        k = ((x[:, 0, 0, 0] + 1) * 4.5).round().long().clamp(0, 9)
        return torch.nn.functional.one_hot(k, 10).float() * 20 + 0.01 * x[:, 0, 10:20, 16]

    def head(self, f):
        return f


def test_class_accuracy_and_is_on_known_inputs():
    codes = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3])
    x = torch.full((12, 1, 32, 32), -1.0)
    x[:, 0, 0, 0] = -1 + codes.float() / 4.5
    x[:, 0, 10:20, 16] = torch.linspace(-1, 1, 12)[:, None]
    labels = codes.clone()
    labels[[0, 4, 10]] = torch.tensor([5, 5, 5])  # 3 of 12 wrong
    res = M.mnist_metrics(x, labels, classifier=CodedStub())
    assert res["class_accuracy"] == pytest.approx(9 / 12)
    assert res["predicted_histogram"] == [1, 1, 1, 3, 1, 1, 1, 1, 1, 1]
    per = res["per_class_accuracy"]
    assert per[5] == pytest.approx(1 / 4) and per[3] == pytest.approx(1.0) and per[0] is None and per[4] is None
    # IS from near-one-hot predictions: exp(H(p(y))) of the predicted class histogram
    hist = np.array(res["predicted_histogram"]) / 12
    assert res["mnist_is"] == pytest.approx(np.exp(-(hist * np.log(hist)).sum()), rel=1e-6)


def test_mnist_metrics_rejects_bad_samples():
    x = torch.zeros(4, 1, 32, 32)
    x[2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf values in 1 of 4 images"):
        M.mnist_metrics(x)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        M.mnist_metrics(torch.full((2, 1, 32, 32), 3.0))
    with pytest.raises(ValueError, match="uint8"):
        M.mnist_metrics(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        M.mnist_metrics(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="labels"):
        M.mnist_metrics(torch.zeros(2, 1, 32, 32), torch.tensor([0, 10]))


def test_uint8_roundtrip_is_exact_for_mnist(test_split):
    x, _ = test_split
    back = M.uint8_to_mnist(to_uint8_images(x[:50]))
    torch.testing.assert_close(back, x[:50], atol=1e-6, rtol=0)


def test_evaluate_npz_of_test_digits_with_labels(tmp_path, test_split):
    x, y = test_split
    np.savez(tmp_path / "samples.npz", arr_0=to_uint8_images(x), arr_1=y.numpy())
    res = F.evaluate_samples(str(tmp_path / "samples.npz"))  # auto: 32x32 gray -> MNIST metrics
    mm = res["metrics"]["mnist"]
    assert res["evaluation_settings"]["metrics"] == ["mnist"]
    assert mm["labels_source"].endswith("arr_1")
    assert abs(mm["mnist_fid"]) < 1e-4 and mm["class_accuracy"] >= 0.95
    # labels from settings.json when the npz has none
    write_npz(to_uint8_images(x[:20]), tmp_path / "run" / "samples.npz")
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"labels": y[:20].tolist(), "cfg_scale": 2.0}))
    res = F.evaluate_samples(str(tmp_path / "run" / "samples.npz"))
    assert res["metrics"]["mnist"]["labels_source"] == "settings.json:labels"
    assert res["sampling_settings"]["cfg_scale"] == 2.0


def test_grey_background_is_measured_and_warned_about(tmp_path, test_split):
    """Real digits have a black frame; a uniform grey offset (what undertrained samplers draw) is
    measured in grey levels, flagged by `evaluate`, and really does break the classifier."""
    x, y = test_split
    x = x[:200]
    y = y[:200]
    assert M.background_level(x) == 0.0
    grey = (x + 20 / 127.5).clamp(-1, 1)  # +20 grey levels everywhere
    assert M.background_level(grey) == pytest.approx(20.0, abs=1e-3)
    clean = M.mnist_metrics(x, y)
    shifted = M.mnist_metrics(grey, y)
    assert clean["background_level"] == 0.0 and shifted["background_level"] == pytest.approx(20.0, abs=1e-3)
    assert clean["class_accuracy"] > 0.95 and shifted["class_accuracy"] < 0.5  # why the warning exists
    for name, imgs, warned in (("clean", x, False), ("grey", grey, True)):
        np.savez(tmp_path / f"{name}.npz", arr_0=to_uint8_images(imgs), arr_1=y.numpy())
        res = F.evaluate_samples(str(tmp_path / f"{name}.npz"))
        assert any("background is grey" in w for w in res["warnings"]) is warned


def test_train_classifier_writes_metadata(tmp_path):
    out = tmp_path / "clf.safetensors"
    summary = M.train_classifier(out, epochs=1, seed=3, max_train_images=128, batch_size=64, progress=False,
                                 width=8, feature_dim=16)
    assert out.exists() and out.stat().st_size < 1_000_000
    model, info = M.load_classifier(out)
    assert info["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert info["train_settings"]["epochs"] == 1 and info["train_settings"]["seed"] == 3
    assert info["feature_dim"] == 16 and model.feature_dim == 16


def test_evaluate_main_mnist_folder_with_labels_file(tmp_path, test_split, capsys):
    import argparse

    from PIL import Image

    x, y = test_split
    u8 = to_uint8_images(x[:30])
    (tmp_path / "out" / "images").mkdir(parents=True)
    for i, im in enumerate(u8):
        Image.fromarray(im).save(tmp_path / "out" / "images" / f"{i:06d}.png")
    (tmp_path / "out" / "settings.json").write_text(json.dumps({"sampler": "ddim", "num_samples": 30}))
    (tmp_path / "labels.json").write_text(json.dumps(y[:30].tolist()))
    p = argparse.ArgumentParser()
    F.add_evaluate_args(p)
    args = p.parse_args([str(tmp_path / "out" / "images"), "--labels", str(tmp_path / "labels.json"), "--no-progress"])
    assert F.evaluate_main(args) == 0
    res = json.loads((tmp_path / "out" / "evaluation.json").read_text())  # next to settings.json
    mm = res["metrics"]["mnist"]
    assert mm["labels_source"] == str(tmp_path / "labels.json") and mm["num_samples"] == 30
    assert mm["class_accuracy"] >= 0.9 and res["sampling_settings"]["sampler"] == "ddim"
    assert "class_accuracy" in capsys.readouterr().out
