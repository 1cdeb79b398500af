"""The evaluation driver: which metrics a set of samples gets, and the results JSON of ``dcdit evaluate``.

:func:`evaluate_samples` scores samples in memory or on disk and returns the results dict;
:func:`evaluate_to_file` is ``dcdit evaluate`` as a library call (load the feature network, score,
write ``evaluation.json``). The pieces: samples and side files (:mod:`.images`), feature networks
(:mod:`.extractors`), the reference (:mod:`.reference`), the metric math (:mod:`.metrics`) and the
MNIST metrics (:mod:`.mnist_classifier`). Conventions and the JSON layout: docs/evaluation.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..utils import atomic_write_text, jsonable
from .extractors import FeatureExtractor, compute_features, load_feature_extractor
from .images import (check_samples, describe_path, find_settings, load_images, load_labels, looks_like_mnist,
                     resolve_samples_path, sample_warnings)
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from .mnist_classifier import BACKGROUND_WARN_LEVEL, mnist_metrics, uint8_to_mnist
from .reference import load_reference, save_reference_stats

__all__ = ["METRICS", "evaluate_samples", "evaluate_to_file", "default_output_path", "summary_lines"]

METRICS = ("fid", "is", "pr", "mnist")


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
    known = {*METRICS, "auto"}
    if out - known:
        raise ValueError(f"unknown metrics {sorted(out - known)}; choose from fid, is, pr, mnist (or auto)")
    return out


def _read_samples(samples, settings: dict | None, max_samples: int | None):
    """(checked uint8 images, samples info for the JSON, settings, settings path) of a path or an array."""
    settings_path = None
    if isinstance(samples, (str, os.PathLike)):
        samples = resolve_samples_path(samples)
        info = describe_path(Path(samples)) if Path(samples).is_dir() else {
            "path": str(samples), "format": Path(samples).suffix.lstrip(".")}
        if settings is None:
            settings, settings_path = find_settings(samples)
        u8 = load_images(samples, max_images=max_samples)
    else:
        info = {"path": None, "format": "array"}
        u8 = check_samples(samples)
        if max_samples is not None:
            u8 = u8[:max_samples]
    info.update(num_images=int(len(u8)), image_shape=list(u8.shape[1:]))
    return u8, info, settings, settings_path


def _plan(wanted: set[str], u8: np.ndarray, extractor, reference, save_ref_stats) -> tuple[set[str], bool]:
    """The metrics to compute (``auto`` resolved; ``features`` = featurise even without a named metric)
    and whether the IS joins once the network turns out to give probabilities. Refuses impossible requests."""
    auto_is = False
    if "auto" in wanted:
        wanted = set()
        if extractor is not None:
            wanted.add("features")
            auto_is = True  # decided once we know whether the network gives probabilities
            if reference is not None:
                wanted |= {"fid", "pr"}
        if looks_like_mnist(u8):
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
    return wanted, auto_is


def _is_metrics(probs, extractor, split_size) -> dict:
    if probs is None:
        raise ValueError(f"the feature extractor {extractor.name!r} gives no class probabilities; "
                         f"the Inception Score needs them (drop 'is' from --metrics)")
    m, s = inception_score(probs, split_size)
    return {"inception_score": m, "inception_score_std": s,
            "inception_score_splits": int(np.ceil(len(probs) / (split_size or len(probs))))}


def _fid_metrics(feats, ref: dict, eps: float, warn: list[str]) -> dict:
    mu, sigma = feature_statistics(feats)
    fd, fd_info = frechet_distance(mu, sigma, ref["mu"], ref["sigma"], eps=eps, return_info=True)
    if len(feats) < feats.shape[1]:
        warn.append(f"FID from {len(feats)} samples in {feats.shape[1]} dimensions: the covariance is singular "
                    f"and FID is strongly biased at small N; compare only at equal N (FID-50K is the convention)")
    return {"fid": fd, "fid_sqrt_method": fd_info["method"], "fid_eps_added": fd_info["eps_added"]}


def _feature_metrics(u8, extractor: FeatureExtractor, reference, wanted: set[str], auto_is: bool, warn: list[str], *,
                     batch_size, nearest_k, is_split_size, fid_eps, save_ref_stats, source, progress) -> dict:
    """IS / FID / precision-recall with the feature network; returns the results entries
    (``metrics``, and ``reference``, ``saved_reference_stats``, ``feature_extractor``). Updates ``wanted``."""
    feats, probs = compute_features(u8, extractor, batch_size, progress)
    wanted.discard("features")
    if auto_is and probs is not None:
        wanted.add("is")
    out: dict = {"metrics": {}}
    if "is" in wanted:
        out["metrics"].update(_is_metrics(probs, extractor, is_split_size))
    if reference is not None and wanted & {"fid", "pr"}:
        ref = load_reference(reference, extractor, batch_size, progress=progress)
        warn += ref["warnings"]
        out["reference"] = ref["info"]
        if "fid" in wanted:
            out["metrics"].update(_fid_metrics(feats, ref, fid_eps, warn))
        if "pr" in wanted:
            if ref["features"] is None:
                warn.append("precision/recall skipped: the reference statistics file holds no features")
            else:
                out["metrics"].update(precision_recall(ref["features"], feats, k=nearest_k))
    if save_ref_stats:
        out["saved_reference_stats"] = save_reference_stats(save_ref_stats, feats, extractor, source=source)
    out["feature_extractor"] = extractor.describe()
    if not out["metrics"] and "mnist" not in wanted:
        warn.append("no metric computed: the network gives no probabilities (no IS) and no --ref was given (no FID/PR)")
    return out


def _mnist_section(u8, samples_path, labels, labels_path, settings, reference: str, classifier, warn: list[str]) -> dict:
    """``metrics.mnist``: the MNIST metrics of 32×32 digits, with the labels found next to the samples."""
    if labels is None:
        labels, label_source = load_labels(samples_path, len(u8), labels_path, settings)
    else:
        labels, label_source = np.asarray(labels)[: len(u8)], "argument"
    if labels is None:
        warn.append(f"MNIST class accuracy skipped: {label_source}")
    res = mnist_metrics(uint8_to_mnist(u8), labels, reference=reference, classifier=classifier)
    res["labels_source"] = label_source
    bg = res["background_level"]
    if bg > BACKGROUND_WARN_LEVEL:
        warn.append(f"the samples' background is grey ({bg:.1f} of 255 on the 2-pixel frame; real digits: 0): the "
                    f"MNIST classifier reads grey backgrounds as '8', so class accuracy and MNIST-FID are "
                    f"dominated by the background; look at the samples")
    if not looks_like_mnist(u8):
        warn.append("MNIST metrics on images that are not 32x32 gray: channels were averaged")
    return res


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
    """Score generated samples; returns the results dict that :func:`evaluate_to_file` writes as JSON.

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
    u8, samples_info, settings, settings_path = _read_samples(samples, settings, max_samples)
    warn = sample_warnings(u8)
    wanted, auto_is = _plan(wanted, u8, extractor, reference, save_ref_stats)
    results: dict = {"metrics": {}}
    if wanted & {"fid", "is", "pr", "features"} or (save_ref_stats and extractor is not None):
        results.update(_feature_metrics(
            u8, extractor, reference, wanted, auto_is, warn, batch_size=batch_size, nearest_k=nearest_k,
            is_split_size=is_split_size, fid_eps=fid_eps, save_ref_stats=save_ref_stats,
            source=str(samples_info.get("path")), progress=progress))
    if "mnist" in wanted:
        results["metrics"]["mnist"] = _mnist_section(u8, samples_info.get("path"), labels, labels_path, settings,
                                                     mnist_reference, mnist_classifier, warn)
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


def default_output_path(samples: Path, settings_path: str | None) -> Path:
    """``evaluation.json`` next to the sampling ``settings.json``, else in / next to the samples."""
    if settings_path:
        return Path(settings_path).parent / "evaluation.json"
    return (samples if samples.is_dir() else samples.parent) / "evaluation.json"


def evaluate_to_file(
    samples,
    reference=None,
    *,
    feature_extractor=None,
    extractor_kind: str = "auto",
    extractor_input_range: str = "0-255",
    resize: int | None = None,
    device: str = "cpu",
    out=None,
    **options,
) -> tuple[dict, Path]:
    """``dcdit evaluate``: score the samples on disk and write the results JSON; returns (results, path).

    ``feature_extractor``: path of a local TorchScript file (:func:`load_feature_extractor` with
    ``extractor_kind``, ``extractor_input_range``, ``resize``, ``device``) or None. ``out``: the JSON
    path (default :func:`default_output_path`). Every other keyword goes to :func:`evaluate_samples`
    (``metrics``, ``labels_path``, ``batch_size``, ``nearest_k``, ``is_split_size``, ``max_samples``,
    ``save_ref_stats``, ``mnist_classifier``, ``mnist_reference``, ``progress``).
    """
    extractor = None
    if feature_extractor:
        extractor = load_feature_extractor(feature_extractor, kind=extractor_kind, input_range=extractor_input_range,
                                           resize=resize, device=device)
    samples = resolve_samples_path(samples)
    settings, settings_path = find_settings(samples) if samples.exists() else (None, None)
    res = evaluate_samples(str(samples), reference, extractor=extractor, settings=settings, **options)
    res["sampling_settings_path"] = settings_path
    path = Path(out) if out else default_output_path(samples, settings_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(jsonable(res), indent=2, sort_keys=True) + "\n")
    return res, path


def summary_lines(results: dict) -> list[str]:
    """The lines ``dcdit evaluate`` prints: the headline metrics, then the warnings."""
    m = results["metrics"]
    lines = [f"{k:>16}: {m[k]:.4f}" for k in ("fid", "inception_score", "precision", "recall") if k in m]
    if "mnist" in m:
        mm = m["mnist"]
        lines += [f"{'mnist_fid':>16}: {mm['mnist_fid']:.4f}", f"{'mnist_is':>16}: {mm['mnist_is']:.4f}"]
        if mm["class_accuracy"] is not None:
            lines.append(f"{'class_accuracy':>16}: {mm['class_accuracy']:.4f}")
    return lines + [f"warning: {w}" for w in results["warnings"]]
