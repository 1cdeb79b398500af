"""Arguments of ``dcdit evaluate``, ``dcdit train-classifier`` and ``dcdit analyze-router``.

Each ``*_main`` only turns the parsed arguments into a call of the library (:mod:`dcdit.evaluation`)
and prints what it returns; ``dcdit.cli`` registers the sub-commands.
"""

from __future__ import annotations

import json
import sys

from .evaluation import (CLASSIFIER_PATH, INPUT_RANGES, analyze_router, evaluate_to_file, retention_summary,
                         summary_lines, train_classifier)

__all__ = [
    "add_evaluate_args",
    "evaluate_main",
    "add_train_classifier_args",
    "train_classifier_main",
    "add_router_analysis_args",
    "router_analysis_main",
]


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
    parser.add_argument("--extractor-input-range", choices=list(INPUT_RANGES), default="0-255",
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
    """``dcdit evaluate``: :func:`dcdit.evaluation.evaluate_to_file`, then print the metrics. Returns 0."""
    res, out = evaluate_to_file(
        args.samples, args.ref, feature_extractor=args.feature_extractor, extractor_kind=args.extractor_kind,
        extractor_input_range=args.extractor_input_range, resize=args.resize, device=args.device, out=args.out,
        metrics=args.metrics, labels_path=args.labels, batch_size=args.batch_size, nearest_k=args.nearest_k,
        is_split_size=args.is_split_size, max_samples=args.max_samples, save_ref_stats=args.save_ref_stats,
        mnist_classifier=args.mnist_classifier, mnist_reference=args.mnist_reference, progress=not args.no_progress,
    )
    for line in summary_lines(res):
        print(line)
    print(f"wrote {out}")
    return 0


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
    """``dcdit train-classifier``: :func:`dcdit.evaluation.train_classifier`, then print the summary."""
    command = " ".join(["dcdit train-classifier"] + sys.argv[2:]) if len(sys.argv) > 1 else "dcdit train-classifier"
    summary = train_classifier(
        args.out, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        max_shift=args.max_shift, threads=args.threads, progress=not args.no_progress, command=command,
    )
    print(json.dumps({k: summary[k] for k in ("path", "test_accuracy", "train_accuracy", "test_errors", "seconds")}, indent=2))
    return 0


def add_router_analysis_args(parser) -> None:
    """Arguments of ``dcdit analyze-router``."""
    parser.add_argument("--ckpt", required=True, help="DC-DiT run folder, checkpoint folder or .safetensors")
    parser.add_argument("--out", default="router_analysis", help="output folder (default router_analysis)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 750, 500, 250, 100, 20],
                        help="timesteps to noise the real images to (default 999 750 500 250 100 20)")
    parser.add_argument("--images", default=None,
                        help=".npz with 'images' (N,C,H,W) in model space, 'labels' (N,) and optional 'masks' (N,H,W); "
                             "default for MNIST models: the held-out test split")
    parser.add_argument("--num-images", type=int, default=100, help="images to use (default 100)")
    parser.add_argument("--threshold", type=float, default=0.0, help="foreground = clean pixel > threshold (default 0)")
    parser.add_argument("--tail-dropping-fraction", type=float, default=0.0)
    parser.add_argument("--sampling-steps", type=int, default=0,
                        help="also sample this many DDIM steps (one image per label) for compression vs timestep (default 0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-weights", action="store_true")
    parser.add_argument("--device", default="cpu")


def router_analysis_main(args) -> int:
    """``dcdit analyze-router``: :func:`dcdit.evaluation.analyze_router`, then print the retention per t."""
    rets, files = analyze_router(
        args.ckpt, args.out, timesteps=args.timesteps, images=args.images, num_images=args.num_images,
        threshold=args.threshold, tail_dropping_fraction=args.tail_dropping_fraction,
        sampling_steps=args.sampling_steps, seed=args.seed, raw_weights=args.raw_weights, device=args.device,
    )
    for line in retention_summary(rets):
        print(line)
    print(json.dumps(files, indent=2))
    return 0
