"""Samples on disk and what lies next to them: images, class labels, the sampling ``settings.json``.

Inputs are what ``dcdit sample-ddp`` writes: a folder of PNGs or an ADM ``.npz`` (``arr_0``, uint8
N×H×W×3, optionally ``arr_1`` = class labels as guided-diffusion writes them). Everything is checked
before it is scored (docs/evaluation.md): NaN/inf and float arrays are refused with their count.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..utils import sha256_file

# also used by the other evaluation modules: image_files, describe_path, sample_warnings, looks_like_mnist
__all__ = ["IMAGE_EXTENSIONS", "check_samples", "resolve_samples_path", "load_images", "load_labels", "find_settings"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def check_samples(arr, source: str = "samples") -> np.ndarray:
    """Validate images before scoring; returns uint8 (N, H, W, 3).

    Accepts uint8 (N, H, W, 3), (N, H, W, 1) or (N, H, W) (gray is replicated to 3 channels).
    Raises ValueError, naming ``source``, for: NaN/inf values (with their count; a float array
    with NaNs is what crashed the ADM evaluator in DiT #27), any dtype other than uint8 (with the
    value range found, pointing to ``dcdit.sampling.to_uint8_images``), a wrong shape, or no images.
    """
    a = np.asarray(arr)
    if a.dtype.kind in "fc":
        bad = int((~np.isfinite(a)).sum())
        if bad:
            nimg = int((~np.isfinite(a)).reshape(len(a), -1).any(1).sum()) if a.ndim >= 2 else 1
            raise ValueError(
                f"{source}: {bad} NaN/inf values in {nimg} of {len(a) if a.ndim else 1} images; refusing to score them "
                f"(a diverged model or fp16 overflow; regenerate or drop those images)"
            )
        rng = f"[{float(a.min()):.4g}, {float(a.max()):.4g}]" if a.size else "[]"
        raise ValueError(
            f"{source}: images must be uint8 in [0, 255] (the ADM .npz format), got {a.dtype} with values in {rng}; "
            f"convert images in [-1, 1] with dcdit.sampling.to_uint8_images"
        )
    if a.dtype != np.uint8:
        rng = f"[{a.min()}, {a.max()}]" if a.size else "[]"
        raise ValueError(f"{source}: images must be uint8 (ADM .npz format), got {a.dtype} with values in {rng}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: expected uint8 images of shape (N, H, W, 3), (N, H, W, 1) or (N, H, W), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{source}: no images")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name (ValueError when there are none)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def resolve_samples_path(path) -> Path:
    """A `dcdit sample-ddp` output folder -> its ``samples.npz`` (which carries the labels); else ``path``."""
    path = Path(path)
    return path / "samples.npz" if path.is_dir() and (path / "samples.npz").exists() else path


def _load_folder(path: Path, max_images: int | None) -> np.ndarray:
    from PIL import Image

    files = image_files(path)
    if max_images is not None:
        files = files[:max_images]
    imgs = []
    for f in files:
        with Image.open(f) as im:
            imgs.append(np.asarray(im.convert("RGB")))
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images have different sizes {sorted(shapes)[:4]}; resize them to one size first")
    return np.stack(imgs)


def load_images(path, max_images: int | None = None) -> np.ndarray:
    """A folder of images (sorted by file name, converted to RGB) or an ``.npz`` (``arr_0``) /
    ``.npy`` -> checked uint8 (N, H, W, 3). ``max_images`` keeps the first N."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return check_samples(_load_folder(path, max_images), source=str(path))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise ValueError(f"{path}: no 'arr_0' array (keys: {z.files}); expected the ADM format (uint8 N×H×W×3 under arr_0)")
            a = z["arr_0"]
    elif path.suffix == ".npy":
        a = np.load(path, allow_pickle=False)
    else:
        raise ValueError(f"{path}: expected a folder of images, an .npz (ADM format) or an .npy file")
    if max_images is not None:
        a = a[:max_images]
    return check_samples(a, source=str(path))


def _integer_labels(y, src: str, num_images: int) -> tuple[np.ndarray, str]:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) < num_images:
        raise ValueError(f"labels from {src} have shape {y.shape}, expected ({num_images},)")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels from {src} must be integers, got {y.dtype}")
    return y[:num_images].astype(np.int64), src


def _read_labels_file(p: Path, num_images: int) -> tuple[np.ndarray, str]:
    if p.suffix == ".npy":
        return _integer_labels(np.load(p, allow_pickle=False), str(p), num_images)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            key = "labels" if "labels" in z.files else "arr_0"
            return _integer_labels(z[key], f"{p}:{key}", num_images)
    if p.suffix == ".json":
        d = json.loads(p.read_text())
        return _integer_labels(d["labels"] if isinstance(d, dict) else d, str(p), num_images)
    return _integer_labels(np.loadtxt(p, dtype=np.int64, ndmin=1), str(p), num_images)


def load_labels(samples_path, num_images: int, labels_path=None, settings: dict | None = None):
    """Class labels of the samples, or (None, reason). Looked up in this order: ``labels_path``
    (.npy / .npz ``arr_0`` / .json / .txt), the samples' ``.npz`` ``arr_1`` (guided-diffusion's
    convention), ``settings["labels"]`` when it has one label per image. Returns (labels, source)."""
    if labels_path is not None:
        return _read_labels_file(Path(labels_path), num_images)
    sp = Path(samples_path) if samples_path is not None else None
    if sp is not None and sp.suffix == ".npz" and sp.is_file():
        with np.load(sp, allow_pickle=False) as z:
            if "arr_1" in z.files:
                return _integer_labels(z["arr_1"], f"{sp}:arr_1", num_images)
    if settings and isinstance(settings.get("labels"), list) and len(settings["labels"]) == num_images:
        return _integer_labels(settings["labels"], "settings.json:labels", num_images)
    return None, "no labels found (pass --labels, or write them as arr_1 of the .npz)"


def find_settings(samples_path) -> tuple[dict | None, str | None]:
    """The sampling ``settings.json`` next to the samples (in the samples folder, next to the
    .npz, or one level up, where ``dcdit sample-ddp`` writes it for its ``images/`` folder)."""
    p = Path(samples_path)
    base = p if p.is_dir() else p.parent
    for cand in (base / "settings.json", base.parent / "settings.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text()), str(cand)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cand} is not valid JSON: {e}") from e
    return None, None


def describe_path(p: Path) -> dict:
    """Provenance of an input: a file's sha256 and size, or a hash of a folder's image names and sizes."""
    if p.is_dir():
        files = image_files(p)
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}:{f.stat().st_size};".encode())
        return {"path": str(p), "format": "folder", "num_files": len(files), "names_sizes_sha256": h.hexdigest()}
    return {"path": str(p), "format": p.suffix.lstrip("."), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def sample_warnings(u8: np.ndarray) -> list[str]:
    """Warnings about checked uint8 samples that are valid but suspicious (constant images)."""
    flat = u8.reshape(len(u8), -1)
    const = int((flat.max(1) == flat.min(1)).sum())
    out = []
    if const:
        out.append(f"{const} of {len(u8)} images are a single constant colour (NaN samples cast to uint8 look like this)")
    return out


def looks_like_mnist(u8: np.ndarray) -> bool:
    """32×32 images whose three channels are equal (gray digits: the MNIST metrics apply)."""
    return u8.shape[1:3] == (32, 32) and bool((u8[..., 0] == u8[..., 1]).all() and (u8[..., 1] == u8[..., 2]).all())
