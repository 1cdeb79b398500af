"""dcdit.evaluation.mnist_training: a short training run writes a loadable, honest, reproducible file."""

from __future__ import annotations

import os

import pytest
import torch

from dcdit.data.mnist import load_mnist_tensors
from dcdit.evaluation import mnist_classifier as M
from dcdit.evaluation.mnist_training import train_classifier

_SMALL = dict(epochs=1, max_train_images=128, batch_size=64, progress=False, width=8, feature_dim=16)


def test_train_classifier_writes_metadata(tmp_path):
    out = tmp_path / "clf.safetensors"
    summary = train_classifier(out, seed=3, **_SMALL)
    assert out.exists() and out.stat().st_size < 1_000_000
    model, info = M.load_classifier(out)
    assert info["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert info["train_settings"]["epochs"] == 1 and info["train_settings"]["seed"] == 3
    assert info["feature_dim"] == 16 and model.feature_dim == 16
    # the stored accuracy is the loaded model's accuracy on the held-out split, not a training-time number
    x, y = load_mnist_tensors("test")
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).float().mean()) == pytest.approx(summary["test_accuracy"], abs=1e-6)
    # readable like any package file (the atomic writer's temporary file is 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name != "clf.safetensors"]  # no temporary file left


def test_train_classifier_is_reproducible(tmp_path):
    """Same seed -> bit-identical weights; another seed -> different ones (catches an unseeded draw)."""
    a = train_classifier(tmp_path / "a.safetensors", seed=5, **_SMALL)
    b = train_classifier(tmp_path / "b.safetensors", seed=5, **_SMALL)
    c = train_classifier(tmp_path / "c.safetensors", seed=6, **_SMALL)
    wa, wb, wc = (M.load_classifier(s["path"])[0].state_dict() for s in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["history"] == b["history"]
