"""Metric math: pure functions on features and class probabilities (no files, no networks).

Conventions follow pytorch-fid / OpenAI's ADM ``evaluator.py`` (docs/evaluation.md):

* statistics in float64 with ``np.cov`` (ddof = 1);
* Fréchet distance FD = ||μ1−μ2||² + Tr(Σ1) + Tr(Σ2) − 2·Tr(sqrtm(Σ1Σ2)) with ``scipy.linalg.sqrtm``;
* Inception Score exp(E_x KL(p(y|x) || p(y))) over consecutive splits of 5,000 samples (ADM's
  ``split_size``), mean and std over splits;
* improved precision/recall: the k-NN manifold estimate of Kynkäänniemi et al. 2019, k = 3 (ADM's
  ``ManifoldEstimator``);
* class accuracy of a classifier's predictions against the labels the samples were conditioned on
  (the MNIST metrics; their IS-style score is :func:`inception_score` in one split);
* :func:`bootstrap_interval`: the percentile bootstrap interval of any of these over the samples.

``tests/evaluation/test_metrics.py`` checks each against brute force, closed forms and torchmetrics.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "class_accuracy",
    "bootstrap_interval",
]


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


def _checked_gaussians(mu1, sigma1, mu2, sigma2):
    """The four arrays in float64, with the shape and finiteness checks of :func:`frechet_distance`."""
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
    return mu1, s1, mu2, s2


def _trace_sqrtm_scipy(s1: np.ndarray, s2: np.ndarray, eps: float, max_imag: float) -> tuple[float | None, float]:
    """(Tr sqrtm(Σ1Σ2) or None when not finite / scipy missing, the eps added to the diagonals)."""
    try:
        from scipy import linalg
    except ImportError:  # scipy is optional at run time
        return None, 0.0
    eps_added = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * eps
            covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
            eps_added = eps
    if not np.isfinite(covmean).all():
        return None, eps_added
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > max_imag:
            raise ValueError(
                f"sqrtm(Σ1Σ2) has an imaginary component of {imag:.3g} on its diagonal (> {max_imag}); the "
                f"covariances are ill-conditioned (too few samples for the feature dimension?)"
            )
        covmean = covmean.real
    return float(np.trace(covmean)), eps_added


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
    mu1, s1, mu2, s2 = _checked_gaussians(mu1, sigma1, mu2, sigma2)
    tr_covmean, eps_added = _trace_sqrtm_scipy(s1, s2, eps, max_imag)
    info = {"method": "scipy.linalg.sqrtm", "eps_added": eps_added}
    if tr_covmean is None:
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
        info["method"] = "eigh (Tr sqrt of sqrt(S1) S2 sqrt(S1))"
    diff = mu1 - mu2
    fd = float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return (fd, info) if return_info else fd


def inception_score(probs, split_size: int | None = 5000) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split of ``split_size`` consecutive samples (ADM: 5,000;
    None = one split), returned as (mean, std) over splits (std with ddof = 0, as ADM's np.std).
    ``probs``: (N, K) rows summing to 1."""
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


def class_accuracy(predicted, labels, num_classes: int) -> tuple[float, list[float | None]]:
    """(share of ``predicted`` equal to ``labels``, per-class share for each label value; None for a
    class absent from ``labels``). Both (N,) integer arrays."""
    pred, y = np.asarray(predicted), np.asarray(labels)
    if pred.shape != y.shape or pred.ndim != 1:
        raise ValueError(f"predictions and labels must both have shape (N,), got {pred.shape} and {y.shape}")
    per_class = [float((pred[y == c] == c).mean()) if (y == c).any() else None for c in range(num_classes)]
    return float((pred == y).mean()), per_class


def bootstrap_interval(statistic, *arrays, num_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)`` (Efron & Tibshirani 1993, §13.3).

    Draws ``num_resamples`` sets of N row indices with replacement (numpy ``default_rng(seed)``),
    evaluates ``statistic`` on the rows of every array at those indices (the arrays are resampled
    jointly: e.g. predictions with their labels) and returns the (1 − confidence)/2 and
    (1 + confidence)/2 quantiles of the results (``np.percentile``, linear interpolation). Only the
    generated samples are resampled; a reference the statistic compares with (FID's real statistics)
    stays fixed. For FID the duplicated rows of a resample shrink its covariance, so the interval is
    that of the finite-sample estimator, not a correction of its bias."""
    if not arrays:
        raise ValueError("bootstrap_interval needs at least one array to resample")
    arrs = [np.asarray(a) for a in arrays]
    n = len(arrs[0])
    if n == 0 or any(len(a) != n for a in arrs):
        raise ValueError(f"arrays must be non-empty and of equal length, got {[len(a) for a in arrs]}")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and num_resamples >= 1, got {confidence}, {num_resamples}")
    rng = np.random.default_rng(seed)
    values = np.array([float(statistic(*(a[idx] for a in arrs))) for idx in rng.integers(0, n, size=(num_resamples, n))])
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)
