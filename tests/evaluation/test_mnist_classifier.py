"""dcdit.evaluation.mnist_classifier: the shipped MNIST classifier and the MNIST metrics built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.data.mnist import load_mnist_tensors
from dcdit.evaluation import mnist_classifier as M
from dcdit.sampling import to_uint8_images


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


def test_mnist_fid_agrees_with_torchmetrics_on_real_digits(test_split):
    """MNIST-FID of 500 train digits against the test split, recomputed by torchmetrics'
    FrechetInceptionDistance with the shipped classifier's penultimate layer as its feature network:
    catches wrong features (e.g. logits, or before the ReLU), a wrong reference split or a cached
    reference from another classifier."""
    fid_cls = pytest.importorskip("torchmetrics.image.fid").FrechetInceptionDistance
    model, _ = M.load_classifier()

    class Penultimate(nn.Module):
        num_features = model.feature_dim

        def forward(self, x):
            return model.features(x)

    x_test, _ = test_split
    x_train, _ = load_mnist_tensors("train")
    samples = x_train[::9]
    tm = fid_cls(feature=Penultimate(), normalize=True).set_dtype(torch.float64)
    with torch.no_grad():
        tm.update(x_test, real=True)
        tm.update(samples, real=False)
    ours = M.mnist_metrics(samples)["mnist_fid"]
    assert ours == pytest.approx(float(tm.compute()), rel=1e-6)  # torchmetrics returns float32 here (the features dtype)
    assert ours > 0.5  # a real distance (0.79), not the zero of identical sets


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


def test_grey_background_is_measured_and_breaks_the_classifier(test_split):
    """Real digits have a black frame; a uniform grey offset (what undertrained samplers draw) is
    measured in grey levels and really does break the classifier (why `evaluate` warns)."""
    x, y = test_split
    x, y = x[:200], y[:200]
    assert M.background_level(x) == 0.0
    grey = (x + 20 / 127.5).clamp(-1, 1)  # +20 grey levels everywhere
    assert M.background_level(grey) == pytest.approx(20.0, abs=1e-3)
    clean = M.mnist_metrics(x, y)
    shifted = M.mnist_metrics(grey, y)
    assert clean["background_level"] == 0.0 and shifted["background_level"] == pytest.approx(20.0, abs=1e-3)
    assert clean["class_accuracy"] > 0.95 and shifted["class_accuracy"] < 0.5
