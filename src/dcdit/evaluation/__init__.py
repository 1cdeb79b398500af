"""Evaluation tools: image metrics (FID, IS, precision/recall), MNIST metrics with the shipped
classifier, and router analysis (foreground retention, compression vs timestep).

CLI hooks (registered by ``dcdit.cli``): ``add_evaluate_args`` / ``evaluate_main`` (``dcdit
evaluate``), ``add_train_classifier_args`` / ``train_classifier_main`` (``dcdit train-classifier``),
``add_router_analysis_args`` / ``router_analysis_main`` (``dcdit analyze-router``).
See ``docs/evaluation.md``.
"""

from .fid import (
    FeatureExtractor,
    ModuleExtractor,
    NVLabsInceptionExtractor,
    add_evaluate_args,
    check_samples,
    compute_features,
    evaluate_main,
    evaluate_samples,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_feature_extractor,
    load_images,
    load_reference,
    precision_recall,
    save_reference_stats,
)
from .mnist_classifier import (
    CLASSIFIER_PATH,
    MNISTClassifier,
    add_train_classifier_args,
    load_classifier,
    mnist_metrics,
    train_classifier,
    train_classifier_main,
    uint8_to_mnist,
)
from .router_analysis import (
    add_router_analysis_args,
    compression_vs_timestep,
    foreground_retention,
    foreground_retention_curve,
    plot_router_analysis,
    router_analysis_main,
)

__all__ = [
    "FeatureExtractor",
    "ModuleExtractor",
    "NVLabsInceptionExtractor",
    "add_evaluate_args",
    "check_samples",
    "compute_features",
    "evaluate_main",
    "evaluate_samples",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "load_feature_extractor",
    "load_images",
    "load_reference",
    "precision_recall",
    "save_reference_stats",
    "CLASSIFIER_PATH",
    "MNISTClassifier",
    "add_train_classifier_args",
    "load_classifier",
    "mnist_metrics",
    "train_classifier",
    "train_classifier_main",
    "uint8_to_mnist",
    "add_router_analysis_args",
    "compression_vs_timestep",
    "foreground_retention",
    "foreground_retention_curve",
    "plot_router_analysis",
    "router_analysis_main",
]
