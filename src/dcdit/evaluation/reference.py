"""The reference side of FID and precision/recall: images featurised with this run's network, or
statistics saved earlier with the identity of the network that made them (docs/evaluation.md).

ADM reference batches also carry ``mu``/``sigma`` from the TF Inception: they are NOT used, because
both sides of a Fréchet distance must come from the same network and preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .extractors import FeatureExtractor, compute_features
from .images import describe_path, load_images
from .metrics import feature_statistics

__all__ = ["STATS_FORMAT", "save_reference_stats", "load_reference"]

STATS_FORMAT = "dcdit-fid-stats-1"


def save_reference_stats(path, features, extractor: FeatureExtractor | None = None, keep_features: bool = True,
                         source: str = "") -> str:
    """Write μ, Σ (and the features, for precision/recall) with the extractor identity to an .npz."""
    mu, sigma = feature_statistics(features)
    arrays = {"mu": mu, "sigma": sigma, "format": np.array(STATS_FORMAT),
              "extractor_identity": np.array(extractor.identity if extractor else ""),
              "num_images": np.array(len(features)), "source": np.array(str(source))}
    if keep_features:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    path = str(path)
    if not path.endswith(".npz"):
        path += ".npz"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _stats_from_file(p: Path, z, extractor: FeatureExtractor, info: dict) -> dict:
    """An open statistics .npz (mu, sigma[, features]) -> the reference dict, after the identity check."""
    warn: list[str] = []
    ident = str(z["extractor_identity"]) if "extractor_identity" in z.files else ""
    if ident and ident != extractor.identity:
        raise ValueError(f"{p}: statistics were computed with feature extractor {ident!r}, "
                         f"but this run uses {extractor.identity!r}; recompute them")
    if not ident:
        warn.append(f"{p} records no feature extractor; its statistics must come from the same network "
                    f"and preprocessing as the samples' (e.g. ADM's TF-Inception mu/sigma do not match a torch network exactly)")
    info.update(kind="statistics", num_images=int(z["num_images"]) if "num_images" in z.files else None)
    feats = z["features"].astype(np.float64) if "features" in z.files else None
    return {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64), "features": feats,
            "probs": None, "info": info, "warnings": warn}


def load_reference(path, extractor: FeatureExtractor, batch_size: int = 100, max_images: int | None = None,
                   progress: bool = False) -> dict:
    """The reference as ``{"mu", "sigma", "features" (or None), "probs", "info", "warnings"}``.

    * a folder / an ``.npz`` with ``arr_0`` / an ``.npy``: images, featurised with ``extractor``
      (precomputed ``mu``/``sigma`` next to the images are ignored, with a warning).
    * an ``.npz`` from :func:`save_reference_stats`: ``mu``, ``sigma`` (and ``features`` when
      saved). Its extractor identity must equal ``extractor.identity`` (ValueError otherwise).
    """
    p = Path(path)
    info = describe_path(p)
    warn: list[str] = []
    if p.is_file() and p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                if not {"mu", "sigma"} <= set(z.files):
                    raise ValueError(f"{p}: neither images (arr_0) nor statistics (mu, sigma); keys: {z.files}")
                return _stats_from_file(p, z, extractor, info)
            if {"mu", "sigma"} <= set(z.files):
                warn.append(f"{p} also holds precomputed mu/sigma (an ADM reference batch); they were ignored and the "
                            f"reference images were featurised with this run's network instead")
    images = load_images(p, max_images=max_images)
    feats, probs = compute_features(images, extractor, batch_size, progress)
    mu, sigma = feature_statistics(feats)
    info.update(kind="images", num_images=len(images), image_shape=list(images.shape[1:]))
    return {"mu": mu, "sigma": sigma, "features": feats, "probs": probs, "info": info, "warnings": warn}
