"""Image-quality metrics for generated samples: FID, Inception Score, precision/recall.

Inputs are what ``dcdit sample-ddp`` writes: a folder of PNGs or an ADM ``.npz`` (``arr_0``, uint8
N×H×W×3, optionally ``arr_1`` = class labels as guided-diffusion writes them). The reference is a
folder, an ``.npz`` of images, or a statistics file written by :func:`save_reference_stats`.

The feature network is supplied by the user, as a local file; nothing is ever downloaded.
``torch-fidelity`` was not usable here (it requires torchvision and a different torch build), so
the metric math is implemented in this module (numpy/scipy) and the network is pluggable:

* ``kind="nvlabs"``: the TorchScript Inception-v3 of StyleGAN2-ADA / StyleGAN3 / clean-fid
  (``inception-2015-12-05.pt``, a direct translation of the TF graph the ADM suite uses). It is
  called as ``net(x_uint8_nchw, return_features=True)`` for the 2048-d pool features and
  ``net(x, no_output_bias=True)`` for the 1008-way softmax (Inception Score), as those tools do;
  it resizes to 299×299 internally.
* ``kind="generic"``: any TorchScript module mapping float images (``input_range``) to features
  (a tensor), or to ``(features, logits)`` (a tuple) for the Inception Score.
* In Python, any :class:`FeatureExtractor` (e.g. :class:`ModuleExtractor` around an ``nn.Module``).

Conventions follow pytorch-fid / OpenAI's ADM ``evaluator.py``: statistics in float64 with
``np.cov`` (ddof = 1); FID = ||μ1−μ2||² + Tr(Σ1) + Tr(Σ2) − 2·Tr(sqrtm(Σ1Σ2)); Inception Score over
splits of 5,000 samples (ADM's ``split_size``), reported as the mean over splits (and std);
precision/recall = the k-NN manifold estimate of Kynkäänniemi et al. 2019 with k = 3 (ADM's
``ManifoldEstimator``). A torch port does not reproduce the TF evaluator bit for bit; see
``docs/evaluation.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from ..utils import jsonable, sha256_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "check_samples",
    "load_images",
    "load_labels",
    "find_settings",
    "FeatureExtractor",
    "ModuleExtractor",
    "NVLabsInceptionExtractor",
    "load_feature_extractor",
    "compute_features",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "save_reference_stats",
    "load_reference",
    "evaluate_samples",
    "add_evaluate_args",
    "evaluate_main",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
STATS_FORMAT = "dcdit-fid-stats-1"


# ============================================================================ images: reading, checks


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


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def resolve_samples_path(path) -> Path:
    """A `dcdit sample-ddp` output folder -> its ``samples.npz`` (which carries the labels); else ``path``."""
    path = Path(path)
    return path / "samples.npz" if path.is_dir() and (path / "samples.npz").exists() else path


def load_images(path, max_images: int | None = None) -> np.ndarray:
    """A folder of images (sorted by file name, converted to RGB) or an ``.npz`` (``arr_0``) /
    ``.npy`` -> checked uint8 (N, H, W, 3). ``max_images`` keeps the first N."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        files = _image_files(path)
        if max_images is not None:
            files = files[:max_images]
        imgs = []
        for f in files:
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert("RGB")))
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise ValueError(f"{path}: images have different sizes {sorted(shapes)[:4]}; resize them to one size first")
        return check_samples(np.stack(imgs), source=str(path))
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


def load_labels(samples_path, num_images: int, labels_path=None, settings: dict | None = None):
    """Class labels of the samples, or (None, reason). Looked up in this order: ``labels_path``
    (.npy / .npz ``arr_0`` / .json / .txt), the samples' ``.npz`` ``arr_1`` (guided-diffusion's
    convention), ``settings["labels"]`` when it has one label per image. Returns (labels, source)."""
    def _ok(y, src):
        y = np.asarray(y)
        if y.ndim != 1 or len(y) < num_images:
            raise ValueError(f"labels from {src} have shape {y.shape}, expected ({num_images},)")
        if y.dtype.kind not in "iu":
            if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise ValueError(f"labels from {src} must be integers, got {y.dtype}")
        return y[:num_images].astype(np.int64), src

    if labels_path is not None:
        p = Path(labels_path)
        if p.suffix == ".npy":
            return _ok(np.load(p, allow_pickle=False), str(p))
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                key = "labels" if "labels" in z.files else "arr_0"
                return _ok(z[key], f"{p}:{key}")
        if p.suffix == ".json":
            d = json.loads(p.read_text())
            return _ok(d["labels"] if isinstance(d, dict) else d, str(p))
        return _ok(np.loadtxt(p, dtype=np.int64, ndmin=1), str(p))
    sp = Path(samples_path) if samples_path is not None else None
    if sp is not None and sp.suffix == ".npz" and sp.is_file():
        with np.load(sp, allow_pickle=False) as z:
            if "arr_1" in z.files:
                return _ok(z["arr_1"], f"{sp}:arr_1")
    if settings and isinstance(settings.get("labels"), list) and len(settings["labels"]) == num_images:
        return _ok(settings["labels"], "settings.json:labels")
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


def _sample_warnings(u8: np.ndarray) -> list[str]:
    flat = u8.reshape(len(u8), -1)
    const = int((flat.max(1) == flat.min(1)).sum())
    out = []
    if const:
        out.append(f"{const} of {len(u8)} images are a single constant colour (NaN samples cast to uint8 look like this)")
    return out


# ============================================================================ feature extractors


class FeatureExtractor:
    """Maps a batch of uint8 images (B, 3, H, W) to ``(features (B, D), probs (B, K) or None)``.

    Subclasses set ``has_probs`` (class probabilities available for the Inception Score) and
    implement :meth:`extract`; :meth:`describe` goes into the results JSON, and its ``identity``
    guards precomputed reference statistics against a different network.
    """

    has_probs: bool = False
    name: str = "custom"

    def extract(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.name}

    @property
    def identity(self) -> str:
        return str(self.describe().get("identity", self.name))


_RANGES = {"0-255": (0.0, 1.0), "0-1": (0.0, 1.0 / 255.0), "-1-1": (-1.0, 2.0 / 255.0)}


class ModuleExtractor(FeatureExtractor):
    """An ``nn.Module`` / TorchScript module ``f(x)`` on float images.

    ``input_range``: "0-255", "0-1" or "-1-1" (how uint8 values are scaled). ``resize``: optional
    side length, bilinear resize (antialias off, as pytorch-fid) before the call. The module returns
    features (B, D), or ``(features, logits)`` for the Inception Score (softmax is applied here),
    or a dict with ``features`` and optionally ``logits``.
    """

    def __init__(self, module: Callable, *, input_range: str = "0-255", resize: int | None = None,
                 name: str = "module", identity: str | None = None, has_probs: bool | None = None,
                 device: str | torch.device = "cpu"):
        if input_range not in _RANGES:
            raise ValueError(f"input_range must be one of {list(_RANGES)}, got {input_range!r}")
        self.module, self.input_range, self.resize = module, input_range, resize
        self.name, self._identity, self.device = name, identity or name, torch.device(device)
        self._has_probs = has_probs
        if isinstance(module, nn.Module):
            module.eval()

    @property
    def has_probs(self) -> bool:  # type: ignore[override]
        return bool(self._has_probs)

    def extract(self, images_u8):
        off, scale = _RANGES[self.input_range]
        x = images_u8.to(self.device).float() * scale + off
        if self.resize and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        out = self.module(x)
        logits = None
        if isinstance(out, dict):
            feats, logits = out["features"], out.get("logits")
        elif isinstance(out, (tuple, list)):
            feats = out[0]
            logits = out[1] if len(out) > 1 else None
        else:
            feats = out
        if self._has_probs is None:
            self._has_probs = logits is not None
        probs = torch.softmax(logits.double(), dim=1) if logits is not None else None
        return feats.reshape(feats.shape[0], -1), probs

    def describe(self) -> dict:
        return {"name": self.name, "kind": "generic", "identity": self._identity,
                "input_range": self.input_range, "resize": self.resize}


class NVLabsInceptionExtractor(FeatureExtractor):
    """The TorchScript Inception-v3 of StyleGAN2-ADA/StyleGAN3 (``inception-2015-12-05.pt``).

    Features: ``net(x, return_features=True)`` (2048-d pool3); probabilities:
    ``net(x, no_output_bias=True)`` (1008-way softmax, as the original TF Inception Score). The
    network takes uint8-valued NCHW tensors of any size and resizes to 299 itself.
    """

    has_probs = True

    def __init__(self, module, name: str = "nvlabs-inception", identity: str | None = None, device="cpu"):
        self.module, self.name, self._identity, self.device = module, name, identity or name, torch.device(device)

    def extract(self, images_u8):
        x = images_u8.to(self.device)
        feats = self.module(x, return_features=True)
        probs = self.module(x, no_output_bias=True)
        return feats.reshape(feats.shape[0], -1), probs.double()

    def describe(self) -> dict:
        return {"name": self.name, "kind": "nvlabs", "identity": self._identity, "input_range": "0-255 (uint8)",
                "resize": "299 inside the network"}


def load_feature_extractor(path, kind: str = "auto", input_range: str = "0-255", resize: int | None = None,
                           device: str | torch.device = "cpu") -> FeatureExtractor:
    """Load a TorchScript feature network from a LOCAL file (URLs are refused: nothing downloads).

    ``kind``: "nvlabs" (StyleGAN-style Inception: ``return_features`` / ``no_output_bias``
    keywords), "generic" (see :class:`ModuleExtractor`) or "auto" (nvlabs when the forward
    accepts ``return_features``). The file's sha256 is the extractor's identity.
    """
    s = str(path)
    if "://" in s:
        raise ValueError(f"{s}: feature extractors are loaded from local files only (dcdit never downloads); "
                         f"fetch the file yourself and pass its path")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"feature extractor {p} not found")
    try:
        module = torch.jit.load(str(p), map_location=device)
    except Exception as e:  # noqa: BLE001 - report what the file must be
        raise ValueError(f"{p}: not a TorchScript file that torch.jit.load can read ({type(e).__name__}: {e}); "
                         f"pickled networks (.pkl) are not loaded for safety") from e
    module.eval()
    if kind == "auto":
        try:
            schema = str(module.forward.schema)
        except Exception:  # noqa: BLE001
            schema = ""
        kind = "nvlabs" if "return_features" in schema else "generic"
    ident = f"{p.name}:sha256={sha256_file(p)}"
    if kind == "nvlabs":
        return NVLabsInceptionExtractor(module, name=p.name, identity=ident, device=device)
    if kind == "generic":
        return ModuleExtractor(module, input_range=input_range, resize=resize, name=p.name, identity=ident, device=device)
    raise ValueError(f"kind must be 'auto', 'nvlabs' or 'generic', got {kind!r}")


@torch.no_grad()
def compute_features(images_u8: np.ndarray, extractor: FeatureExtractor, batch_size: int = 100,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Checked uint8 images (N, H, W, 3) -> (features (N, D) float64, probabilities (N, K) float64 or None)."""
    images_u8 = check_samples(images_u8)
    feats, probs = [], []
    rng = range(0, len(images_u8), batch_size)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="features")
    for i in rng:
        x = torch.from_numpy(images_u8[i: i + batch_size]).permute(0, 3, 1, 2).contiguous()
        f, p = extractor.extract(x)
        feats.append(f.detach().double().cpu())
        if p is not None:
            probs.append(p.detach().double().cpu())
    f = torch.cat(feats).numpy()
    if not np.isfinite(f).all():
        raise ValueError(f"the feature extractor returned {int((~np.isfinite(f)).sum())} non-finite feature values")
    return f, (torch.cat(probs).numpy() if probs else None)


# ============================================================================ metric math


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (μ (D,), Σ (D, D)) in float64, Σ = np.cov (unbiased, ddof = 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN/inf values")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr(sqrtm(Σ1 Σ2)) = Σ √λ_i(√Σ1 Σ2 √Σ1): symmetric PSD eigenproblems only (no complex parts)."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, max_imag: float = 1e-3,
                     return_info: bool = False):
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2):
    ||μ1 − μ2||² + Tr(Σ1) + Tr(Σ2) − 2·Tr(sqrtm(Σ1 Σ2)), in float64.

    ``scipy.linalg.sqrtm`` (as pytorch-fid and the ADM evaluator). When its result is not finite
    (singular product, or the NaN that broken BLAS builds return, LightningDiT #97), ``eps`` is added
    to both diagonals and it is retried; when still not finite, or scipy is missing, the trace is
    computed from symmetric eigendecompositions instead. Imaginary parts with ``|Im| ≤ max_imag`` on
    the diagonal are numerical noise and dropped; larger ones raise ValueError.
    With ``return_info`` returns ``(fd, {"method": ..., "eps_added": ...})``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN/inf values")
    diff = mu1 - mu2
    info = {"method": "scipy.linalg.sqrtm", "eps_added": 0.0}
    tr_covmean = None
    try:
        from scipy import linalg
    except ImportError:  # scipy is optional at run time
        linalg = None
    if linalg is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm(s1.dot(s2))
            if not np.isfinite(covmean).all():
                offset = np.eye(d) * eps
                covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
                info["eps_added"] = eps
        if np.isfinite(covmean).all():
            if np.iscomplexobj(covmean):
                imag = np.abs(np.diagonal(covmean).imag).max()
                if imag > max_imag:
                    raise ValueError(
                        f"sqrtm(Σ1Σ2) has an imaginary component of {imag:.3g} on its diagonal (> {max_imag}); the "
                        f"covariances are ill-conditioned (too few samples for the feature dimension?)"
                    )
                covmean = covmean.real
            tr_covmean = float(np.trace(covmean))
    if tr_covmean is None:
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
        info["method"] = "eigh (Tr sqrt of sqrt(S1) S2 sqrt(S1))"
    fd = float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return (fd, info) if return_info else fd


def inception_score(probs, split_size: int | None = 5000) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of ``split_size`` samples (ADM: 5,000; None = one
    split), returned as (mean, std) over splits. ``probs``: (N, K) rows summing to 1."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (N, K), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("probs rows must sum to 1 (pass softmax outputs, not logits)")
    size = len(p) if not split_size else int(split_size)
    scores = []
    for i in range(0, len(p), size):
        part = p[i: i + size]
        py = part.mean(0, keepdims=True)
        safe = np.where(part > 0, part, 1.0)
        kl = np.where(part > 0, part * (np.log(safe) - np.log(np.where(py > 0, py, 1.0))), 0.0).sum(1).mean()
        scores.append(float(np.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(x)}")
    radii = []
    for i in range(0, len(x), batch):
        d = torch.cdist(x[i: i + batch], x)  # (b, N); includes the zero self-distance
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of queries inside at least one ball (points[j], radii[j])."""
    inside = []
    for i in range(0, len(queries), batch):
        d = torch.cdist(queries[i: i + batch], points)
        inside.append((d <= radii[None]).any(1).cpu())
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 500,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019), ADM's defaults (k = 3).

    precision: share of generated samples within the k-NN ball of some real sample;
    recall: share of real samples within the k-NN ball of some generated sample.
    Pairwise distances in ``dtype`` (float32 as ADM; float64 for exactness on small sets), rows
    in batches of ``batch_size`` (memory: batch_size × N distances).
    """
    r = torch.as_tensor(np.asarray(real_features)).to(device=device, dtype=dtype)
    f = torch.as_tensor(np.asarray(fake_features)).to(device=device, dtype=dtype)
    if r.dim() != 2 or f.dim() != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(r.shape)} and {tuple(f.shape)}")
    r_radii, f_radii = _knn_radii(r, k, batch_size), _knn_radii(f, k, batch_size)
    return {"precision": _coverage(f, r, r_radii, batch_size), "recall": _coverage(r, f, f_radii, batch_size),
            "nearest_k": k}


# ============================================================================ reference


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


def _describe_path(p: Path) -> dict:
    if p.is_dir():
        files = _image_files(p)
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}:{f.stat().st_size};".encode())
        return {"path": str(p), "format": "folder", "num_files": len(files), "names_sizes_sha256": h.hexdigest()}
    return {"path": str(p), "format": p.suffix.lstrip("."), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def load_reference(path, extractor: FeatureExtractor, batch_size: int = 100, max_images: int | None = None,
                   progress: bool = False) -> dict:
    """The reference as ``{"mu", "sigma", "features" (or None), "probs", "info", "warnings"}``.

    * a folder / an ``.npz`` with ``arr_0`` / an ``.npy``: images, featurised with ``extractor``.
      ADM reference batches also carry ``mu``/``sigma`` from the TF Inception: they are NOT used,
      because both sides must come from the same network.
    * an ``.npz`` from :func:`save_reference_stats`: ``mu``, ``sigma`` (and ``features`` when
      saved). Its extractor identity must equal ``extractor.identity`` (ValueError otherwise).
    """
    p = Path(path)
    info = _describe_path(p)
    warn: list[str] = []
    if p.is_file() and p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                if not {"mu", "sigma"} <= set(z.files):
                    raise ValueError(f"{p}: neither images (arr_0) nor statistics (mu, sigma); keys: {z.files}")
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
            if {"mu", "sigma"} <= set(z.files):
                warn.append(f"{p} also holds precomputed mu/sigma (an ADM reference batch); they were ignored and the "
                            f"reference images were featurised with this run's network instead")
    images = load_images(p, max_images=max_images)
    feats, probs = compute_features(images, extractor, batch_size, progress)
    mu, sigma = feature_statistics(feats)
    info.update(kind="images", num_images=len(images), image_shape=list(images.shape[1:]))
    return {"mu": mu, "sigma": sigma, "features": feats, "probs": probs, "info": info, "warnings": warn}


# ============================================================================ evaluation driver


def _versions() -> dict:
    from .. import __version__

    v = {"dcdit": __version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import scipy

        v["scipy"] = scipy.__version__
    except ImportError:
        v["scipy"] = None
    return v


def _parse_metrics(metrics) -> set[str]:
    if metrics is None or metrics == "auto":
        return {"auto"}
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out = {m.strip().lower() for m in items if m.strip()}
    known = {"fid", "is", "pr", "mnist", "auto"}
    if out - known:
        raise ValueError(f"unknown metrics {sorted(out - known)}; choose from fid, is, pr, mnist (or auto)")
    return out


def _looks_like_mnist(u8: np.ndarray) -> bool:
    return u8.shape[1:3] == (32, 32) and bool((u8[..., 0] == u8[..., 1]).all() and (u8[..., 1] == u8[..., 2]).all())


def evaluate_samples(
    samples,
    reference=None,
    *,
    extractor: FeatureExtractor | None = None,
    metrics: str | Sequence[str] | None = "auto",
    labels=None,
    labels_path=None,
    settings: dict | None = None,
    batch_size: int = 100,
    nearest_k: int = 3,
    is_split_size: int | None = 5000,
    max_samples: int | None = None,
    fid_eps: float = 1e-6,
    save_ref_stats: str | None = None,
    mnist_classifier=None,
    mnist_reference: str = "test",
    progress: bool = False,
) -> dict:
    """Score generated samples; returns the results dict that :func:`evaluate_main` writes as JSON.

    Args:
        samples: a path (folder / .npz / .npy) or a uint8 array (N, H, W, 3).
        reference: a path (folder / .npz images / stats .npz) for FID and precision/recall.
        extractor: the feature network (:func:`load_feature_extractor`) for fid / is / pr.
        metrics: comma list or sequence of ``fid``, ``is``, ``pr``, ``mnist``; ``auto`` = fid+pr
            (with a reference) and is (when the extractor has probabilities) if an extractor is
            given, plus mnist when the samples are 32×32 gray.
        labels: (N,) class labels (for MNIST class accuracy); default: read from ``labels_path``,
            else looked up next to the samples (:func:`load_labels`).
        settings: the sampling settings (default: the ``settings.json`` next to the samples).
    """
    wanted = _parse_metrics(metrics)
    warn: list[str] = []
    settings_path = None
    if isinstance(samples, (str, os.PathLike)):
        samples = resolve_samples_path(samples)
        samples_info = _describe_path(Path(samples)) if Path(samples).is_dir() else {
            "path": str(samples), "format": Path(samples).suffix.lstrip(".")}
        if settings is None:
            settings, settings_path = find_settings(samples)
        u8 = load_images(samples, max_images=max_samples)
    else:
        samples_info = {"path": None, "format": "array"}
        u8 = check_samples(samples)
        if max_samples is not None:
            u8 = u8[:max_samples]
    samples_info.update(num_images=int(len(u8)), image_shape=list(u8.shape[1:]))
    warn += _sample_warnings(u8)

    auto_is = False
    if "auto" in wanted:
        wanted = set()
        if extractor is not None:
            wanted.add("features")
            auto_is = True  # decided once we know whether the network gives probabilities
            if reference is not None:
                wanted |= {"fid", "pr"}
        if _looks_like_mnist(u8):
            wanted.add("mnist")
        if not wanted:
            raise ValueError("nothing to compute: pass --feature-extractor (and --ref) for FID/IS/precision-recall; "
                             "the MNIST metrics apply only to 32x32 gray samples")
    if wanted & {"fid", "is", "pr"} and extractor is None:
        raise ValueError(f"metrics {sorted(wanted & {'fid', 'is', 'pr'})} need a feature network: pass --feature-extractor "
                         f"(a local TorchScript file, e.g. StyleGAN's inception-2015-12-05.pt)")
    if wanted & {"fid", "pr"} and reference is None:
        raise ValueError("FID and precision/recall need a reference: pass --ref (folder, .npz images or statistics .npz)")
    if save_ref_stats and extractor is None:
        raise ValueError("--save-ref-stats needs --feature-extractor (the statistics are of that network's features)")

    results: dict = {"metrics": {}}
    if wanted & {"fid", "is", "pr", "features"} or (save_ref_stats and extractor is not None):
        feats, probs = compute_features(u8, extractor, batch_size, progress)
        wanted.discard("features")
        if auto_is and probs is not None:
            wanted.add("is")
        if "is" in wanted:
            if probs is None:
                raise ValueError(f"the feature extractor {extractor.name!r} gives no class probabilities; "
                                 f"the Inception Score needs them (drop 'is' from --metrics)")
            m, s = inception_score(probs, is_split_size)
            results["metrics"]["inception_score"] = m
            results["metrics"]["inception_score_std"] = s
            results["metrics"]["inception_score_splits"] = int(np.ceil(len(probs) / (is_split_size or len(probs))))
        if reference is not None and wanted & {"fid", "pr"}:
            ref = load_reference(reference, extractor, batch_size, progress=progress)
            warn += ref["warnings"]
            results["reference"] = ref["info"]
            if "fid" in wanted:
                mu, sigma = feature_statistics(feats)
                fd, fd_info = frechet_distance(mu, sigma, ref["mu"], ref["sigma"], eps=fid_eps, return_info=True)
                results["metrics"]["fid"] = fd
                results["metrics"]["fid_sqrt_method"] = fd_info["method"]
                results["metrics"]["fid_eps_added"] = fd_info["eps_added"]
                if len(feats) < feats.shape[1]:
                    warn.append(f"FID from {len(feats)} samples in {feats.shape[1]} dimensions: the covariance is singular "
                                f"and FID is strongly biased at small N; compare only at equal N (FID-50K is the convention)")
            if "pr" in wanted:
                if ref["features"] is None:
                    warn.append("precision/recall skipped: the reference statistics file holds no features")
                else:
                    results["metrics"].update(precision_recall(ref["features"], feats, k=nearest_k))
        if save_ref_stats:
            results["saved_reference_stats"] = save_reference_stats(
                save_ref_stats, feats, extractor, source=str(samples_info.get("path")))
        results["feature_extractor"] = extractor.describe()
        if not results["metrics"] and "mnist" not in wanted:
            warn.append("no metric computed: the network gives no probabilities (no IS) and no --ref was given (no FID/PR)")

    label_source = None
    if "mnist" in wanted:
        from .mnist_classifier import BACKGROUND_WARN_LEVEL, mnist_metrics, uint8_to_mnist

        if labels is None:
            labels, label_source = load_labels(samples_info.get("path"), len(u8), labels_path, settings)
        else:
            labels, label_source = np.asarray(labels)[: len(u8)], "argument"
        if labels is None:
            warn.append(f"MNIST class accuracy skipped: {label_source}")
        results["metrics"]["mnist"] = mnist_metrics(
            uint8_to_mnist(u8), labels, reference=mnist_reference, classifier=mnist_classifier)
        results["metrics"]["mnist"]["labels_source"] = label_source
        bg = results["metrics"]["mnist"]["background_level"]
        if bg > BACKGROUND_WARN_LEVEL:
            warn.append(f"the samples' background is grey ({bg:.1f} of 255 on the 2-pixel frame; real digits: 0): the "
                        f"MNIST classifier reads grey backgrounds as '8', so class accuracy and MNIST-FID are "
                        f"dominated by the background; look at the samples")
        if not _looks_like_mnist(u8):
            warn.append("MNIST metrics on images that are not 32x32 gray: channels were averaged")

    results.update(
        samples=samples_info,
        sampling_settings=settings,
        sampling_settings_path=settings_path,
        evaluation_settings={
            "metrics": sorted(wanted), "batch_size": batch_size, "nearest_k": nearest_k,
            "is_split_size": is_split_size, "max_samples": max_samples, "fid_eps": fid_eps,
            "mnist_reference": mnist_reference if "mnist" in wanted else None,
            "implementation": "dcdit.evaluation (numpy/scipy metric math; pytorch-fid / ADM conventions; not the "
                              "TF ADM evaluator bit for bit)",
        },
        warnings=warn,
        versions=_versions(),
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    return results


def add_evaluate_args(parser) -> None:
    """Arguments of ``dcdit evaluate``."""
    parser.add_argument("samples", help="generated images: a folder of PNGs, an ADM .npz (arr_0 uint8 NxHxWx3) or a `dcdit sample-ddp` output folder")
    parser.add_argument("--ref", default=None,
                        help="reference: a folder, an .npz of images (arr_0), or statistics written by --save-ref-stats")
    parser.add_argument("--feature-extractor", default=None,
                        help="LOCAL TorchScript feature network for FID/IS/precision-recall, e.g. StyleGAN's "
                             "inception-2015-12-05.pt (never downloaded)")
    parser.add_argument("--extractor-kind", choices=["auto", "nvlabs", "generic"], default="auto",
                        help="nvlabs: return_features/no_output_bias interface; generic: f(x) -> features or "
                             "(features, logits); auto: detect (default)")
    parser.add_argument("--extractor-input-range", choices=list(_RANGES), default="0-255",
                        help="generic extractors: pixel scale fed to the network (default 0-255)")
    parser.add_argument("--resize", type=int, default=None, help="generic extractors: bilinear resize to this side first")
    parser.add_argument("--metrics", default="auto",
                        help="comma list of fid,is,pr,mnist (default auto: fid/pr with --ref, is when the network "
                             "gives probabilities, mnist for 32x32 gray samples)")
    parser.add_argument("--labels", default=None,
                        help="class labels of the samples (.npy/.npz/.json/.txt); default: arr_1 of the .npz or "
                             "settings.json 'labels'")
    parser.add_argument("--out", default=None, help="results JSON (default: evaluation.json next to the samples)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--nearest-k", type=int, default=3, help="k of the precision/recall k-NN balls (ADM: 3)")
    parser.add_argument("--is-split-size", type=int, default=5000, help="Inception Score split size (ADM: 5000)")
    parser.add_argument("--max-samples", type=int, default=None, help="score only the first N samples")
    parser.add_argument("--save-ref-stats", default=None, help="also write the samples' feature statistics to this .npz")
    parser.add_argument("--mnist-classifier", default=None, help="MNIST classifier .safetensors (default: the packaged one)")
    parser.add_argument("--mnist-reference", choices=["test", "train"], default="test",
                        help="real split for MNIST-FID (default test: held out from classifier and diffusion model)")
    parser.add_argument("--device", default="cpu", help="device of the feature network (default cpu)")
    parser.add_argument("--no-progress", action="store_true")


def evaluate_main(args) -> int:
    """``dcdit evaluate``: score samples, write the results JSON, print the metrics. Returns 0."""
    extractor = None
    if args.feature_extractor:
        extractor = load_feature_extractor(args.feature_extractor, kind=args.extractor_kind,
                                           input_range=args.extractor_input_range, resize=args.resize, device=args.device)
    samples = resolve_samples_path(args.samples)
    settings, settings_path = find_settings(samples) if samples.exists() else (None, None)
    res = evaluate_samples(
        str(samples), args.ref, extractor=extractor, metrics=args.metrics, labels_path=args.labels, settings=settings,
        batch_size=args.batch_size, nearest_k=args.nearest_k, is_split_size=args.is_split_size,
        max_samples=args.max_samples, save_ref_stats=args.save_ref_stats, mnist_classifier=args.mnist_classifier,
        mnist_reference=args.mnist_reference, progress=not args.no_progress,
    )
    res["sampling_settings_path"] = settings_path
    out = Path(args.out) if args.out else (Path(settings_path).parent if settings_path else
                                           (samples if samples.is_dir() else samples.parent)) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(res), indent=2, sort_keys=True) + "\n")
    m = res["metrics"]
    for k in ("fid", "inception_score", "precision", "recall"):
        if k in m:
            print(f"{k:>16}: {m[k]:.4f}")
    if "mnist" in m:
        mm = m["mnist"]
        print(f"{'mnist_fid':>16}: {mm['mnist_fid']:.4f}\n{'mnist_is':>16}: {mm['mnist_is']:.4f}")
        if mm["class_accuracy"] is not None:
            print(f"{'class_accuracy':>16}: {mm['class_accuracy']:.4f}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {out}")
    return 0
