"""Training the packaged MNIST classifier (:class:`~.mnist_classifier.MNISTClassifier`).

On the TRAIN split of ``MNISTDigits`` only (the TEST split stays held out for MNIST-FID and the
stored accuracy); AdamW with a one-cycle learning rate, random shifts, cross-entropy. How the shipped
file was made and what it scores: docs/evaluation.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.mnist import load_mnist_tensors
from ..utils import atomic_write_bytes
from .mnist_classifier import CLASSIFIER_PATH, FORMAT, NUM_CLASSES, MNISTClassifier, load_classifier

__all__ = ["train_classifier"]


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


def _splits(seed: int, max_train_images: int | None):
    """(x_train, y_train, x_test, y_test); ``max_train_images`` keeps a seeded random subset of train
    (the file is sorted by class, so the first N would be a few digits only)."""
    x_train, y_train = load_mnist_tensors("train")
    x_test, y_test = load_mnist_tensors("test")
    if max_train_images is not None:
        keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:max_train_images]
        x_train, y_train = x_train[keep], y_train[keep]
    return x_train, y_train, x_test, y_test


def _train_epoch(model, opt, sched, x, y, batch_size: int, max_shift: int, gen: torch.Generator) -> tuple[float, float]:
    """One pass over (x, y) in a random order, shifted batches; returns (mean loss, accuracy) on the way."""
    model.train()
    n = len(x)
    perm = torch.randperm(n, generator=gen)
    total, correct, loss_sum = 0, 0, 0.0
    for k in range(0, n, batch_size):
        idx = perm[k: k + batch_size]
        xb = _shift(x[idx], max_shift, gen)
        yb = y[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += len(idx)
        correct += int((logits.argmax(1) == yb).sum())
        loss_sum += loss.item() * len(idx)
    return loss_sum / total, correct / total


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_predict(model, x).argmax(1) == y).float().mean())


def _file_metadata(summary: dict, width: int, feature_dim: int) -> dict[str, str]:
    """The safetensors metadata (strings only) that :func:`~.mnist_classifier.load_classifier` reads back."""
    return {
        "format": FORMAT,
        "test_accuracy": f"{summary['test_accuracy']:.4f}",
        "train_accuracy": f"{summary['train_accuracy']:.4f}",
        "width": str(width),
        "feature_dim": str(feature_dim),
        "num_classes": str(NUM_CLASSES),
        "input": "1x32x32 float in [-1, 1] (dcdit.data.mnist format)",
        "train_settings": json.dumps(summary["train_settings"], sort_keys=True),
        "history": json.dumps(summary["history"]),
        "command": summary["command"],
        "torch_version": summary["torch_version"],
        "date": summary["date"],
    }


def _write_classifier(model: nn.Module, out_path: Path, meta: dict[str, str]) -> None:
    """Atomic write of the weights; readable like any package file (the temporary file is 0600)."""
    from safetensors.torch import save

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_path, save(tensors, metadata=meta))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out_path, 0o666 & ~umask)


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
    out_path = Path(out_path) if out_path is not None else CLASSIFIER_PATH
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = _splits(seed, max_train_images)
    model = MNISTClassifier(width=width, feature_dim=feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * math.ceil(len(x_train) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    t0 = time.time()
    history = []
    for epoch in range(epochs):
        loss, acc = _train_epoch(model, opt, sched, x_train, y_train, batch_size, max_shift, gen)
        test_acc = _accuracy(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": loss, "train_acc": acc, "test_acc": test_acc})
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}  train acc {acc:.4f}  "
                  f"test acc {test_acc:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    test_pred = _predict(model, x_test).argmax(1)
    summary = {
        "format": FORMAT,
        "test_accuracy": float((test_pred == y_test).float().mean()),
        "train_accuracy": _accuracy(model, x_train, y_train),
        "test_errors": int((test_pred != y_test).sum()),
        "train_settings": dict(
            epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer="AdamW",
            schedule="OneCycleLR", augmentation=f"random integer shifts of up to {max_shift} px (-1 fill)",
            max_shift=max_shift, width=width, feature_dim=feature_dim, train_split="train", test_split="test",
            train_images=len(x_train), test_images=len(x_test), threads=torch.get_num_threads(),
        ),
        "history": history,
        "seconds": time.time() - t0,
        "command": command or "",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    _write_classifier(model, out_path, _file_metadata(summary, width, feature_dim))
    summary["path"] = str(out_path)
    load_classifier.cache_clear()
    return summary
